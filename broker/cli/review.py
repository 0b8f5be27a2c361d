"""`rumi review PACK`: a Pack's declared permissions (its pack.json) against what is granted, per
component, with the risky entries flagged. The comparison is `broker.admin.review`; this prints it.
`rumi grant --from-pack` prints the same review before it asks (`print_review`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

import typer

from broker.cli.common import JsonOption, RootOption, fail, fail_error, print_json, workspace
from broker.core.errors import EXIT_USAGE
from broker.core.ids import is_pack_id

if TYPE_CHECKING:
    from broker.admin.review import Review

__all__ = ["PackArg", "check_pack_arg", "print_review", "register", "review_cmd"]

PackArg = Annotated[str, typer.Argument(help="The Pack: a directory under ecosystem/ with a pack.json.")]
_PAD = " " * 4


def check_pack_arg(pack: str, option: str = "PACK") -> None:
    if not is_pack_id(pack):
        fail(
            f"{option} {pack!r} is not a pack id (a lowercase letter, then [a-z0-9_-], at most 32)",
            EXIT_USAGE,
        )


def settings(entry: Mapping[str, Any] | None) -> str:
    """`key=value ...` of an entry as written (lists comma-joined), or `-`."""
    if not entry:
        return "-" if entry is None else "(no settings)"
    parts = []
    for key, value in entry.items():
        shown = ",".join(str(v) for v in value) if isinstance(value, list) else json.dumps(value)
        parts.append(f"{key}={shown}")
    return " ".join(parts)


def print_review(review: Review) -> None:
    """The review as text: per component, each capability's status, declaration, grant, reason, risks."""
    from broker.core.ids import pack_wide_id
    from broker.policy.plugins import display_path

    manifest = display_path(review.manifest)
    declared = review.declared
    if review.declares:
        typer.echo(
            f"Pack {review.pack_id}: {manifest} declares {len(declared)} permission(s); "
            f"{sum(r.status == 'as declared' for r in review.rows)} granted as declared, "
            f"{len(review.risky)} risky"
        )
    else:
        typer.echo(f"Pack {review.pack_id}: {manifest} declares no permissions (no `permissions` block)")
    if not review.rows:
        typer.echo("nothing declared, nothing granted")
    component = None
    width = max((len(r.capability) for r in review.rows), default=0)
    for row in review.rows:
        if row.component_id != component:
            component = row.component_id
            wide = "  (every component of the Pack)" if component == pack_wide_id(review.pack_id) else ""
            typer.echo(f"\n{component}{wide}")
        typer.echo(f"  {row.capability:<{width}}  {row.status.upper()}")
        inset = f"  {'':<{width}}  "
        if row.declared is not None:
            where = "" if row.declared_for == row.component_id else f"  (declared for {row.declared_for})"
            typer.echo(f"{inset}declared: {settings(row.declared)}{where}")
        if row.granted is not None:
            where = "" if row.source == row.component_id else f"  (from the Pack-wide grant {row.source})"
            typer.echo(f"{inset}granted:  {settings(row.granted)}{where}")
        if row.differences:
            typer.echo(f"{inset}changed:  {'; '.join(row.differences)}")
        if row.reason:
            typer.echo(f"{inset}reason:   {row.reason}")
        for risk in row.risks:
            typer.secho(f"{inset}RISKY:    {risk}", fg=typer.colors.YELLOW)
    for problem in review.problems:
        typer.echo(f"\nproblem: {problem}")


def review_cmd(pack: PackArg, root: RootOption = None, as_json: JsonOption = False) -> None:
    """Show what PACK declares in its pack.json against what is granted, per component; flag risky
    entries (`*` domains, `/` or home directories, wide CIDRs, `shell: true`)."""
    from broker.admin.review import review_pack
    from broker.core.errors import WorkspaceError

    check_pack_arg(pack)
    ws = workspace(root)
    try:
        review = review_pack(ws, pack)
    except WorkspaceError as exc:
        fail_error(exc)
    if as_json:
        print_json(review.as_json())
        return
    print_review(review)


def register(app: typer.Typer) -> None:
    """Add `review` to the main app."""
    app.command("review")(review_cmd)
