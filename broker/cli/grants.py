"""`rumi grant`, `rumi revoke`, `rumi grants`: edit and show `docker/grants/<component_id>.json`.

The editing (checked with the broker's own loader, written atomically under a lock) is
`broker.admin.grants`; these commands parse options and print. A grant target is a component id or
`<pack_id>:*` (every component of that Pack). `rumi grant --from-pack PACK` grants what the Pack's
pack.json declares, after showing `rumi review PACK` and asking.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from broker.cli.common import JsonOption, RootOption, fail, fail_error, print_json, workspace
from broker.core.errors import EXIT_DENIED, EXIT_USAGE
from broker.core.ids import parse_component_id

if TYPE_CHECKING:
    from broker.policy.grants import EffectiveGrant, GrantFileState

__all__ = ["grant_cmd", "grants_cmd", "register", "revoke_cmd"]

_TARGET_HELP = "Component id '<pack_id>:<type>:<name>' (e.g. default:tool:my_tool), or '<pack_id>:*' for every component of the Pack."
ComponentArg = Annotated[str, typer.Argument(help=_TARGET_HELP)]


def _component(component: str) -> None:
    try:
        parse_component_id(component, pack_wide=True)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)


def grant_cmd(
    component: Annotated[str | None, typer.Argument(help=_TARGET_HELP, show_default=False)] = None,
    permission: Annotated[
        str | None,
        typer.Argument(
            help="Capability to grant, e.g. file_read (an installed handler).", show_default=False
        ),
    ] = None,
    dirs: Annotated[
        list[str] | None, typer.Option("--dir", help="Directory (made absolute); repeat for more.")
    ] = None,
    keys: Annotated[
        list[str] | None, typer.Option("--key", help="Environment key (env_read); repeat.")
    ] = None,
    domains: Annotated[
        list[str] | None, typer.Option("--domain", help="Domain, *.suffix, IP or CIDR (network); repeat.")
    ] = None,
    ports: Annotated[list[int] | None, typer.Option("--port", help="Port (network); repeat.")] = None,
    shell: Annotated[bool, typer.Option("--shell", help="Let terminal run through a shell.")] = False,
    wide: Annotated[
        bool, typer.Option("--allow-wide-networks", help="Allow wide or special CIDRs (network).")
    ] = False,
    plaintext: Annotated[
        bool, typer.Option("--plaintext-tunnel", help="Allow tunnels to ports other than 443 (network).")
    ] = False,
    from_pack: Annotated[
        str | None,
        typer.Option(
            "--from-pack",
            help="Grant exactly what this Pack's pack.json declares (shows `rumi review` first and asks).",
        ),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="With --from-pack: grant without asking.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Grant to a component whose Pack is not installed, or whose pack.json does not declare it.",
        ),
    ] = False,
    root: RootOption = None,
    as_json: JsonOption = False,
) -> None:
    """Grant PERMISSION to COMPONENT (adds to or creates docker/grants/COMPONENT.json), or with
    --from-pack PACK what that Pack declares."""
    from broker.admin.grants import GrantEditError, grant_permission
    from broker.policy.plugins import display_path

    if from_pack is not None:
        given = [component, permission, *(dirs or []), *(keys or []), *(domains or []), *(ports or [])]
        if any(v is not None for v in given) or shell or wide or plaintext or force:
            fail(
                "--from-pack grants exactly what the Pack declares: give no COMPONENT, PERMISSION or "
                "other option with it (but --yes, --json, --root)",
                EXIT_USAGE,
            )
        _grant_from_pack(from_pack, yes=yes, root=root, as_json=as_json)
        return
    if component is None or permission is None:
        fail(
            "give COMPONENT and PERMISSION (e.g. `rumi grant default:tool:my_tool file_read --dir D`), "
            "or --from-pack PACK",
            EXIT_USAGE,
        )
    if yes:
        fail("--yes only applies to --from-pack (a single grant never asks)", EXIT_USAGE)
    _component(component)
    try:
        granted = grant_permission(
            workspace(root),
            component,
            permission,
            dirs=dirs,
            keys=keys,
            domains=domains,
            ports=ports,
            shell=shell,
            allow_wide_networks=wide,
            plaintext_tunnel=plaintext,
            force=force,
        )
    except GrantEditError as exc:
        fail_error(exc)
    if as_json:
        print_json(
            {
                "component_id": component,
                "permission": permission,
                "file": str(granted.path),
                "warning": granted.warning,
                "notice": granted.notice,
            }
        )
    else:
        typer.echo(f"granted {permission} to {component} ({display_path(granted.path)})")
        if granted.notice:
            typer.echo(f"note: {granted.notice}")
    if granted.warning:
        typer.echo(f"warning: {granted.warning}", err=True)


def _grant_from_pack(pack: str, *, yes: bool, root: str | None, as_json: bool) -> None:
    """`rumi grant --from-pack PACK`: the review, the question, then every declared permission."""
    from broker.admin.grants import GrantEditError, grant_declared
    from broker.admin.review import review_pack
    from broker.cli.review import check_pack_arg, print_review
    from broker.core.errors import WorkspaceError
    from broker.policy.plugins import display_path

    check_pack_arg(pack, "--from-pack")
    if as_json and not yes:
        fail("--from-pack --json cannot ask: add --yes", EXIT_USAGE)
    ws = workspace(root)
    try:
        review = review_pack(ws, pack)
    except WorkspaceError as exc:
        fail_error(exc)
    if not review.declares:
        fail(
            f"{display_path(review.manifest)} declares no permissions (no `permissions` block): nothing to "
            f"grant; use `rumi grant COMPONENT PERMISSION ...`",
            EXIT_USAGE,
        )
    if not as_json:
        print_review(review)
        typer.echo("")
    if not yes:
        count = len(review.declared)
        try:
            confirmed = typer.confirm(
                f"Grant exactly these {count} declared permission(s) of {pack} (replacing those entries)?",
                default=False,
            )
        except typer.Abort:  # no answer (stdin closed)
            typer.echo("")
            confirmed = False
        if not confirmed:
            fail("not confirmed: nothing granted (pass --yes to grant without asking)", EXIT_DENIED)
    try:
        done = grant_declared(ws, pack)
    except GrantEditError as exc:
        fail_error(exc)
    if as_json:
        print_json(
            {
                "pack_id": pack,
                "granted": [
                    {
                        "component_id": d.component_id,
                        "permission": d.capability,
                        "file": str(d.path),
                        "reason": d.reason,
                        "warning": d.warning,
                    }
                    for d in done
                ],
                "review": review.as_json(),
            }
        )
    else:
        for d in done:
            typer.echo(f"granted {d.capability} to {d.component_id} ({display_path(d.path)})")
    for d in done:
        if d.warning:
            typer.echo(f"warning: {d.warning}", err=True)


def revoke_cmd(
    component: ComponentArg,
    permission: Annotated[
        str | None, typer.Argument(help="Capability to revoke (default: all of them).")
    ] = None,
    root: RootOption = None,
    as_json: JsonOption = False,
) -> None:
    """Revoke PERMISSION from COMPONENT, or every permission (removes its grant file)."""
    from broker.admin.grants import GrantEditError, Revoked, revoke_permission
    from broker.policy.plugins import display_path

    _component(component)
    ws = workspace(root)
    try:
        done = revoke_permission(ws, component, permission)
    except GrantEditError as exc:
        fail_error(exc)
    if as_json:
        print_json(
            {
                "component_id": component,
                "permission": permission,
                "result": done.name.lower(),
                "file": str(ws.grant_file(component)),
                "file_removed": done in (Revoked.ALL, Revoked.LAST),
            }
        )
        return
    removed = display_path(ws.grant_file(component))
    messages = {
        Revoked.NO_GRANT_FILE: f"nothing to revoke: {component} has no grant file",
        Revoked.ALL: f"revoked every permission of {component} (removed {removed})",
        Revoked.NOT_GRANTED: f"nothing to revoke: {component} has no {permission} grant",
        Revoked.ONE: f"revoked {permission} from {component}",
        Revoked.LAST: f"revoked {permission} from {component} (no permissions left: removed {removed})",
    }
    typer.echo(messages[done])


def _settings(entry: object) -> str:
    if not isinstance(entry, dict):
        return repr(entry)
    parts = []
    for key, value in entry.items():
        if key == "enabled":
            continue
        shown = ",".join(str(v) for v in value) if isinstance(value, list) else json.dumps(value)
        parts.append(f"{key}={shown}")
    return " ".join(parts)


def _status(state: GrantFileState, cap: str, entry: object) -> str:
    if not state.usable:
        return "invalid"
    if cap not in state.entries:
        return "no handler"
    return "enabled" if isinstance(entry, dict) and entry.get("enabled") is True else "disabled"


def _rows(
    files: list[GrantFileState], effective: list[EffectiveGrant], components: list[str]
) -> list[tuple[str, str, str, str, str]]:
    """(component, permission, status, from, settings): each component's own entries (`own`; an own
    entry replacing the Pack-wide one says so), then what it gets from its Pack's `<pack_id>:*` file."""
    from broker.core.ids import pack_wide_id

    by_target = {s.component_id or s.path.stem: s for s in files}
    replaced = {(g.component_id, g.capability): g.replaces for g in effective if g.replaces}
    rows: list[tuple[str, str, str, str, str]] = []
    for name in components:
        state = by_target.get(name)
        if state is not None:
            if not state.permissions:
                rows.append((name, "-", "invalid" if not state.usable else "none", "own", ""))
            for cap, entry in sorted(state.permissions.items()):
                where = "own" if (name, cap) not in replaced else f"own, replaces {replaced[(name, cap)]}"
                rows.append((name, cap, _status(state, cap, entry), where, _settings(entry)))
        wide = by_target.get(pack_wide_id(name.partition(":")[0]))
        if wide is not None and wide.component_id != name and not wide.usable:
            rows.append((name, "-", "denied", wide.component_id or "", "its Pack-wide grant file is invalid"))
            continue
        for g in effective:
            if g.component_id == name and g.source != name:
                rows.append((name, g.capability, "enabled", g.source, _settings(dict(g.written))))
    return rows


def grants_cmd(
    component: Annotated[
        str | None, typer.Argument(help="Show only this component (or '<pack_id>:*').")
    ] = None,
    as_json: JsonOption = False,
    root: RootOption = None,
) -> None:
    """Show each component's effective permissions and where each comes from (its own grant file, or
    its Pack's Pack-wide `<pack_id>:*` file), and every invalid grant file with its error."""
    from broker.admin.grants import effective_permissions, grant_files, known_components
    from broker.policy.plugins import display_path

    if component is not None:
        _component(component)
    ws = workspace(root)
    every = grant_files(ws)
    files = [s for s in every if component is None or (s.component_id or s.path.stem) == component]
    effective = effective_permissions(ws, component, every)
    if component is not None:
        components = [component]
    else:
        components = sorted({s.component_id or s.path.stem for s in every} | set(known_components(ws, every)))
    if as_json:
        out = [
            {
                "component_id": s.component_id or s.path.stem,
                "file": str(s.path),
                "valid": s.usable,
                "permissions": dict(s.permissions),
                "active": sorted(cap for cap, e in s.entries.items() if e.get("enabled") is True),
                "errors": [str(e) for e in s.errors],
            }
            for s in files
        ]
        resolved = [
            {
                "component_id": g.component_id,
                "permission": g.capability,
                "enabled": g.enabled,
                "source": g.source,
                "replaces": g.replaces,
                "settings": {k: v for k, v in g.written.items() if k != "enabled"},
            }
            for g in effective
        ]
        typer.echo(json.dumps({"grants": out, "effective": resolved}, indent=2))
        return
    rows = _rows(every, effective, components)
    if not rows:
        typer.echo(f"{component} has no grants" if component else f"no grants in {display_path(ws.grants)}")
        return
    table = [("COMPONENT", "PERMISSION", "STATUS", "FROM", "SETTINGS"), *rows]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for r in table:
        cells = "  ".join(f"{r[i]:<{widths[i]}}" for i in range(4))
        typer.echo(f"{cells}  {r[4]}".rstrip())
    errors = [e for s in files for e in s.errors]
    if errors:
        typer.echo("")
        for s in files:
            for e in s.errors:
                kind = "invalid (component denied)" if not s.usable else "warning"
                if not s.usable and (s.component_id or "").endswith(":*"):
                    kind = "invalid (every component of the Pack denied)"
                typer.echo(f"{kind}: {e}")


def register(app: typer.Typer) -> None:
    """Add `grant`, `revoke` and `grants` to the main app."""
    app.command("grant")(grant_cmd)
    app.command("revoke")(revoke_cmd)
    app.command("grants")(grants_cmd)
