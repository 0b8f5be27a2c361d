"""`rumi grant`, `rumi revoke`, `rumi grants`: edit and show `docker/grants/<component_id>.json`.

The editing (checked with the broker's own loader, written atomically under a lock) is
`broker.admin.grants`; these commands parse options and print.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from broker.cli.common import RootOption, fail, workspace
from broker.core.ids import parse_component_id

if TYPE_CHECKING:
    from broker.policy.grants import GrantFileState

__all__ = ["grant_cmd", "grants_cmd", "register", "revoke_cmd"]

ComponentArg = Annotated[
    str, typer.Argument(help="Component id '<pack_id>:<type>:<name>', e.g. default:tool:my_tool.")
]


def _component(component: str) -> None:
    try:
        parse_component_id(component)
    except ValueError as exc:
        fail(str(exc))


def grant_cmd(
    component: ComponentArg,
    permission: Annotated[
        str, typer.Argument(help="Capability to grant, e.g. file_read (an installed handler).")
    ],
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
    root: RootOption = None,
) -> None:
    """Grant PERMISSION to COMPONENT (adds to or creates docker/grants/COMPONENT.json)."""
    from broker.admin.grants import GrantEditError, grant_permission
    from broker.policy.plugins import display_path

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
        )
    except GrantEditError as exc:
        fail(str(exc))
    typer.echo(f"granted {permission} to {component} ({display_path(granted.path)})")
    if granted.warning:
        typer.echo(f"warning: {granted.warning}", err=True)


def revoke_cmd(
    component: ComponentArg,
    permission: Annotated[
        str | None, typer.Argument(help="Capability to revoke (default: all of them).")
    ] = None,
    root: RootOption = None,
) -> None:
    """Revoke PERMISSION from COMPONENT, or every permission (removes its grant file)."""
    from broker.admin.grants import GrantEditError, Revoked, revoke_permission
    from broker.policy.plugins import display_path

    _component(component)
    ws = workspace(root)
    try:
        done = revoke_permission(ws, component, permission)
    except GrantEditError as exc:
        fail(str(exc))
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


def grants_cmd(
    component: Annotated[str | None, typer.Argument(help="Show only this component.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    root: RootOption = None,
) -> None:
    """Show grants, and every invalid grant file with its error (that component is denied)."""
    from broker.admin.grants import grant_files
    from broker.policy.plugins import display_path

    if component is not None:
        _component(component)
    ws = workspace(root)
    files = grant_files(ws, component)
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
        typer.echo(json.dumps({"grants": out}, indent=2))
        return
    if not files:
        typer.echo(f"{component} has no grants" if component else f"no grants in {display_path(ws.grants)}")
        return
    rows = [("COMPONENT", "PERMISSION", "STATUS", "SETTINGS")]
    for s in files:
        name = s.component_id or s.path.stem
        if not s.permissions:
            rows.append((name, "-", "invalid" if not s.usable else "none", ""))
        for cap, entry in sorted(s.permissions.items()):
            rows.append((name, cap, _status(s, cap, entry), _settings(entry)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        typer.echo(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip())
    errors = [e for s in files for e in s.errors]
    if errors:
        typer.echo("")
        for s in files:
            for e in s.errors:
                kind = "invalid (component denied)" if not s.usable else "warning"
                typer.echo(f"{kind}: {e}")


def register(app: typer.Typer) -> None:
    """Add `grant`, `revoke` and `grants` to the main app."""
    app.command("grant")(grant_cmd)
    app.command("revoke")(revoke_cmd)
    app.command("grants")(grants_cmd)
