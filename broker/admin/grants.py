"""Editing and listing `docker/grants/<component_id>.json` (`rumi grant`, `rumi revoke`, `rumi grants`)."""

# Every write is checked with the broker's own loader first (`check_grant_document`), then written
# atomically (temp file + rename) under a lock, so the broker never reads a half-written or invalid
# grant from us and concurrent edits never lose an update.

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from broker.core.errors import RumiError
from broker.core.workspace import Workspace
from broker.policy.grants import GrantFileState, GrantStore, ScopeStore, check_grant_document
from broker.policy.plugins import HandlerRegistry, display_path


class GrantEditError(RumiError):
    """A grant edit refused (nothing written): the message says why and what to do."""


@dataclass(frozen=True)
class Granted:
    """A grant written: its file, and a warning when requests stay denied all the same."""

    path: Path
    warning: str | None = None


class Revoked(Enum):
    """What `revoke_permission` did."""

    NO_GRANT_FILE = "no grant file"
    NOT_GRANTED = "no such permission in the grant file"
    ONE = "removed that permission"
    LAST = "removed the last permission, and so the file"
    ALL = "removed the grant file"


def grant_permission(
    ws: Workspace,
    component: str,
    permission: str,
    *,
    dirs: list[str] | None = None,
    keys: list[str] | None = None,
    domains: list[str] | None = None,
    ports: list[int] | None = None,
    shell: bool = False,
) -> Granted:
    """Add PERMISSION (with these settings) to COMPONENT's grant file, creating it when absent.

    Raises GrantEditError naming what is wrong (nothing is written then).
    """
    import msgspec

    if not ws.handlers.is_dir():
        raise GrantEditError(f"no workspace at {ws.root}: run `rumi init` first (or pass --root)")
    registry = HandlerRegistry(ws.handlers)
    plugin = registry.get(permission)
    if plugin is None:
        refused = registry.error_for(permission)
        if refused is not None:
            raise GrantEditError(f"handler {permission!r} is refused: {refused}")
        raise GrantEditError(
            f"unknown permission {permission!r}; installed: {', '.join(registry.names()) or 'none'}"
        )
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
            raise GrantEditError(
                f"{permission} does not take {option} (its grant keys: {', '.join(sorted(takes))})"
            )
    path = ws.grant_file(component)
    with _locked(ws):
        doc = _read_document(path, component) or {"component_id": component, "permissions": {}}
        permissions = doc.setdefault("permissions", {})
        entry = permissions.get(permission, {})
        if not isinstance(entry, dict):
            raise GrantEditError(
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
            raise GrantEditError(
                str(state.errors[0]) if state.errors else f"{permission}: grant entry refused"
            )
        _write(path, data)
    if permission in scopes.current.invalid:
        return Granted(path, f"{scopes.current.invalid[permission]}; requests stay denied")
    if plugin.requires_scope and scopes.get(permission) is None:
        scope_file = display_path(ws.scopes / f"{permission}.json")
        return Granted(
            path, f"{permission} has no scope installed ({scope_file}); requests denied until it exists"
        )
    return Granted(path)


def revoke_permission(ws: Workspace, component: str, permission: str | None) -> Revoked:
    """Remove PERMISSION from COMPONENT's grant file, or (None) the whole file; the file goes with
    its last permission."""
    path = ws.grant_file(component)
    with _locked(ws):
        if not path.exists():
            return Revoked.NO_GRANT_FILE
        if permission is None:
            path.unlink()
            return Revoked.ALL
        doc = _read_document(path, component)
        assert doc is not None
        permissions = doc.get("permissions", {})
        if permission not in permissions:
            return Revoked.NOT_GRANTED
        del permissions[permission]
        if permissions:
            _write(path, _encode(doc))
            return Revoked.ONE
        path.unlink()
        return Revoked.LAST


def grant_files(ws: Workspace, component: str | None = None) -> list[GrantFileState]:
    """Every grant file as the broker loads it (valid or not), or only COMPONENT's."""
    store = GrantStore(ws, HandlerRegistry(ws.handlers))
    return [s for s in store.files() if component is None or (s.component_id or s.path.stem) == component]


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
        raise GrantEditError(f"{display_path(path)}: cannot read ({exc.strerror})") from None
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GrantEditError(
            f"{display_path(path)}: not valid JSON ({exc}); fix it or run `rumi revoke {component}`"
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("permissions", {}), dict):
        raise GrantEditError(
            f"{display_path(path)}: not a grant file object; fix it or run `rumi revoke {component}`"
        )
    return doc


def _encode(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2) + "\n").encode()


def _write(path: Path, data: bytes) -> None:
    """Replace the grant file whole (the temp name is a dot name: the broker's watcher ignores it),
    and make the rename itself durable."""
    from broker.core.atomic import write_atomic

    write_atomic(path, data, mode=0o644, fsync=True)


def _merge_list(entry: dict[str, Any], key: str, values: list[Any], option: str) -> None:
    if not values:
        return
    current = entry.get(key, [])
    if not isinstance(current, list):
        raise GrantEditError(
            f"the existing {key} is not a list; fix the grant file or revoke the permission first ({option})"
        )
    entry[key] = current + [v for v in dict.fromkeys(values) if v not in current]
