"""`rumi grant`, `rumi revoke`, `rumi grants`: edit and show `docker/grants/<component_id>.json`.

Every write is checked with the broker's own loader first (`check_grant_document`), then written
atomically (temp file + rename), so the broker never reads a half-written or invalid grant from us.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer

from broker.cli.common import RootOption, fail, workspace
from broker.core.ids import parse_component_id
from broker.core.workspace import Workspace
from broker.policy.grants import GrantFileState, GrantStore, ScopeStore, check_grant_document
from broker.policy.plugins import HandlerRegistry, display_path

__all__ = ["grant_cmd", "grants_cmd", "register", "revoke_cmd"]

ComponentArg = Annotated[
    str, typer.Argument(help="Component id '<pack_id>:<type>:<name>', e.g. default:tool:my_tool.")
]


def _component(component: str) -> None:
    try:
        parse_component_id(component)
    except ValueError as exc:
        fail(str(exc))


@contextlib.contextmanager
def _locked(ws: Workspace) -> Iterator[None]:
    """Serialise concurrent `rumi grant`/`revoke` runs so no update is lost."""
    ws.grants.mkdir(parents=True, exist_ok=True)
    fd = os.open(ws.grants / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_document(path: Path, component: str) -> dict[str, Any] | None:
    """The grant file as plain JSON (None when absent); refuse one we cannot safely edit."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        fail(f"{display_path(path)}: cannot read ({exc.strerror})")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        fail(f"{display_path(path)}: not valid JSON ({exc}); fix it or run `rumi revoke {component}`")
    if not isinstance(doc, dict) or not isinstance(doc.get("permissions", {}), dict):
        fail(f"{display_path(path)}: not a grant file object; fix it or run `rumi revoke {component}`")
    return doc


def _encode(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2) + "\n").encode()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A dot name not ending in .json: the broker's watcher ignores it.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _merge_list(entry: dict[str, Any], key: str, values: list[Any], option: str) -> None:
    if not values:
        return
    current = entry.get(key, [])
    if not isinstance(current, list):
        fail(
            f"the existing {key} is not a list; fix the grant file or revoke the permission first ({option})"
        )
    entry[key] = current + [v for v in dict.fromkeys(values) if v not in current]


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
    _component(component)
    ws = workspace(root)
    if not ws.handlers.is_dir():
        fail(f"no workspace at {ws.root}: run `rumi init` first (or pass --root)")
    registry = HandlerRegistry(ws.handlers)
    plugin = registry.get(permission)
    if plugin is None:
        refused = registry.error_for(permission)
        if refused is not None:
            fail(f"handler {permission!r} is refused: {refused}")
        fail(f"unknown permission {permission!r}; installed: {', '.join(registry.names()) or 'none'}")
    given: dict[str, tuple[str, list[Any]]] = {
        "directories": ("--dir", [str(Path(d).expanduser().resolve()) for d in dirs or []]),
        "allowed_keys": ("--key", list(keys or [])),
        "allowed_domains": ("--domain", list(domains or [])),
        "allowed_ports": ("--port", list(ports or [])),
        "shell": ("--shell", [True] if shell else []),
    }
    takes = {f.encode_name for f in msgspec.structs.fields(plugin.grant_schema)}
    for key, (option, values) in given.items():
        if values and key not in takes:
            fail(f"{permission} does not take {option} (its grant keys: {', '.join(sorted(takes))})")
    path = ws.grant_file(component)
    with _locked(ws):
        doc = _read_document(path, component) or {"component_id": component, "permissions": {}}
        permissions = doc.setdefault("permissions", {})
        entry = permissions.get(permission, {})
        if not isinstance(entry, dict):
            fail(
                f"{display_path(path)}: the {permission} entry is not an object; run `rumi revoke "
                f"{component} {permission}` first"
            )
        entry = dict(entry)
        entry["enabled"] = True
        for key, (option, values) in given.items():
            if key == "shell":
                if values:
                    entry["shell"] = True
            else:
                _merge_list(entry, key, values, option)
        permissions[permission] = entry
        data = _encode(doc)
        scopes = ScopeStore(ws.scopes)
        state = check_grant_document(ws, registry.plugins, scopes.current, path, data)
        if not state.usable or permission not in state.entries:
            fail(str(state.errors[0]) if state.errors else f"{permission}: grant entry refused")
        _write_atomic(path, data)
    typer.echo(f"granted {permission} to {component} ({display_path(path)})")
    if permission in scopes.current.invalid:
        typer.echo(f"warning: {scopes.current.invalid[permission]}; requests stay denied", err=True)
    elif plugin.requires_scope and scopes.get(permission) is None:
        scope_file = display_path(ws.scopes / f"{permission}.json")
        typer.echo(
            f"warning: {permission} has no scope installed ({scope_file}); requests denied until it exists",
            err=True,
        )


def revoke_cmd(
    component: ComponentArg,
    permission: Annotated[
        str | None, typer.Argument(help="Capability to revoke (default: all of them).")
    ] = None,
    root: RootOption = None,
) -> None:
    """Revoke PERMISSION from COMPONENT, or every permission (removes its grant file)."""
    _component(component)
    ws = workspace(root)
    path = ws.grant_file(component)
    with _locked(ws):
        if not path.exists():
            typer.echo(f"nothing to revoke: {component} has no grant file")
            return
        if permission is None:
            path.unlink()
            typer.echo(f"revoked every permission of {component} (removed {display_path(path)})")
            return
        doc = _read_document(path, component)
        assert doc is not None
        permissions = doc.get("permissions", {})
        if permission not in permissions:
            typer.echo(f"nothing to revoke: {component} has no {permission} grant")
            return
        del permissions[permission]
        if permissions:
            _write_atomic(path, _encode(doc))
            typer.echo(f"revoked {permission} from {component}")
        else:
            path.unlink()
            typer.echo(
                f"revoked {permission} from {component} (no permissions left: removed {display_path(path)})"
            )


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
    if component is not None:
        _component(component)
    ws = workspace(root)
    store = GrantStore(ws, HandlerRegistry(ws.handlers))
    files = [s for s in store.files() if component is None or (s.component_id or s.path.stem) == component]
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
