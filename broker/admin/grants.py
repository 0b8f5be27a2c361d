"""Editing and listing `docker/grants/<component_id>.json` (`rumi grant`, `rumi revoke`, `rumi grants`).

`rumi grant` names a component (or `<pack_id>:*`, every component of a Pack) that must exist: its Pack
is in the workspace and, when the Pack's pack.json declares permissions, the block names it (a typo
would otherwise grant a component no Pack has); `force` overrides that. `grant_declared` writes what a
Pack's pack.json declares (`rumi grant --from-pack`, `rumi init` for the example Pack).
"""

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

from broker.core.errors import EXIT_USAGE, RumiError, WorkspaceError
from broker.core.ids import PACK_WIDE, parse_component_id
from broker.core.manifest import PackManifest, declared_permissions, expand_declared, load_manifest
from broker.core.workspace import Workspace
from broker.policy.grants import (
    EffectiveGrant,
    GrantFileState,
    GrantStore,
    ScopeSet,
    ScopeStore,
    check_grant_document,
    effective_grants,
)
from broker.policy.plugins import HandlerPlugin, HandlerRegistry, display_path


class GrantEditError(RumiError):
    """A grant edit refused (nothing written): the message says why and what to do."""

    exit_code = EXIT_USAGE  # an option, the component or the grant file is wrong


@dataclass(frozen=True)
class Granted:
    """A grant written: its file, a warning when requests stay denied all the same, and a notice when
    the options were written in another form than given (host:port entries, so nothing else widens)."""

    path: Path
    warning: str | None = None
    notice: str | None = None


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
    allow_wide_networks: bool = False,
    plaintext_tunnel: bool = False,
    force: bool = False,
) -> Granted:
    """Add PERMISSION (with these settings) to COMPONENT's grant file, creating it when absent.

    COMPONENT may be `<pack_id>:*` (every component of that Pack). Unless `force`, it must exist
    (`target_problem`); a warning says when its Pack's pack.json does not declare PERMISSION for it.

    Entries of `allowed_domains` without a port take every port of `allowed_ports` (a cross product):
    when adding `domains` and `ports` would so grant old hosts the new ports (or new hosts the old
    ports), the new hosts are written as `host:port` entries instead and `Granted.notice` says so. Raises GrantEditError naming what is wrong (nothing is written then).
    """
    import msgspec

    if not ws.handlers.is_dir():
        raise GrantEditError(f"no workspace at {ws.root}: run `rumi init` first (or pass --root)")
    manifest: PackManifest | None = None
    if not force:
        manifest, problem = _target_check(ws, component)
        if problem is not None:
            raise GrantEditError(problem)
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
        "allow_wide_networks": ("--allow-wide-networks", [True] if allow_wide_networks else []),
        "plaintext_tunnel": ("--plaintext-tunnel", [True] if plaintext_tunnel else []),
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
        notice = _merge_network(entry, given["allowed_domains"][1], given["allowed_ports"][1])
        for key, (option, values) in given.items():
            if key in _FLAGS:
                if values:
                    entry[key] = True
            elif key not in ("allowed_domains", "allowed_ports"):
                _merge_list(entry, key, values, option)
        permissions[permission] = entry
        data = _encode(doc)
        scopes = ScopeStore(ws.scopes)
        problem = _refusal(ws, registry, scopes.current, path, data, permission)
        if problem is not None:
            raise GrantEditError(problem.replace(_WIDE_HINT, f"{_WIDE_HINT} (--allow-wide-networks)"))
        _write(path, data)
    warning = _scope_warning(ws, plugin, scopes.current, permission)
    if warning is None and manifest is not None and manifest.permissions is not None:
        declared = manifest.permissions.get(component, {})
        if permission not in declared:
            warning = (
                f"{display_path(ws.pack_source(manifest.id) / 'pack.json')} does not declare {permission} "
                f"for {component}: granted anyway (see `rumi review {manifest.id}`)"
            )
    return Granted(path, warning, notice)


def _refusal(
    ws: Workspace, registry: HandlerRegistry, scopes: ScopeSet, path: Path, data: bytes, permission: str
) -> str | None:
    """Why the broker's own loader would not enable `permission` from the grant file `data`, else None."""
    state = check_grant_document(ws, registry.plugins, scopes, path, data)
    if not state.usable or permission not in state.entries:
        return str(state.errors[0]) if state.errors else f"{permission}: grant entry refused"
    return None


def _scope_warning(ws: Workspace, plugin: HandlerPlugin, scopes: ScopeSet, permission: str) -> str | None:
    """Why requests stay denied although the grant was written (the capability's scope), else None."""
    if permission in scopes.invalid:
        return f"{scopes.invalid[permission]}; requests stay denied"
    if plugin.requires_scope and permission not in scopes.scopes:
        scope_file = display_path(ws.scopes / f"{permission}.json")
        return f"{permission} has no scope installed ({scope_file}); requests denied until it exists"
    return None


def target_problem(ws: Workspace, component: str) -> str | None:
    """Why `rumi grant` refuses COMPONENT without --force, else None: its Pack is not in the workspace,
    its pack.json is invalid, or its `permissions` block does not name it. Every installed Pack has
    `<pack_id>:pack:_` (requests outside a tool call, the proxy's), and `<pack_id>:*` names the Pack
    itself, so those two need only the Pack (`grant_permission` warns when a capability is granted
    that the pack.json does not declare for the target)."""
    return _target_check(ws, component)[1]


def _target_check(ws: Workspace, component: str) -> tuple[PackManifest | None, str | None]:
    try:
        pack_id, kind, name = parse_component_id(component, pack_wide=True)
    except ValueError as exc:
        return None, str(exc)
    source = ws.pack_source(pack_id)
    if not (source / "pack.json").is_file():
        return None, (
            f"pack {pack_id!r} is not installed (no {display_path(source / 'pack.json')}): check the "
            f"component id {component!r}, or pass --force to grant anyway"
        )
    try:
        manifest = load_manifest(ws, pack_id)
    except WorkspaceError as exc:
        return None, f"{exc}; fix it, or pass --force to grant {component} anyway"
    block = manifest.permissions
    if block is None or component in block or kind == PACK_WIDE or (kind, name) == ("pack", "_"):
        return manifest, None
    named = ", ".join(sorted(block)) or "nothing"
    return manifest, (
        f"{display_path(source / 'pack.json')} does not declare {component} (it declares: {named}); "
        "check the component id, or pass --force to grant anyway"
    )


@dataclass(frozen=True)
class DeclaredGrant:
    """One permission granted from a Pack's declaration: where, what, and why the Pack wants it."""

    component_id: str
    capability: str
    path: Path
    reason: str
    warning: str | None = None


def grant_declared(ws: Workspace, pack_id: str, *, only_new_files: bool = False) -> list[DeclaredGrant]:
    """Grant exactly what PACK's pack.json declares: each declared entry (with `$RUMI_SANDBOX` and `~`
    expanded) becomes that component's enabled entry for the capability, replacing the one there;
    other entries of the file are kept. All or nothing: every file is checked with the broker's loader
    before any is written. `only_new_files` skips components that already have a grant file
    (`rumi init` never overwrites the user's grants)."""
    if not ws.handlers.is_dir():
        raise GrantEditError(f"no workspace at {ws.root}: run `rumi init` first (or pass --root)")
    try:
        manifest = load_manifest(ws, pack_id)
    except WorkspaceError as exc:
        raise GrantEditError(str(exc)) from None
    manifest_shown = display_path(ws.pack_source(pack_id) / "pack.json")
    if manifest.permissions is None:
        raise GrantEditError(
            f"{manifest_shown} declares no permissions (no `permissions` block): nothing to grant"
        )
    registry = HandlerRegistry(ws.handlers)
    scopes = ScopeStore(ws.scopes).current
    work_area = ws.pack_work_area(pack_id)
    done: list[DeclaredGrant] = []
    with _locked(ws):
        planned: dict[Path, tuple[str, dict[str, Any]]] = {}
        for declared in declared_permissions(manifest):
            path = ws.grant_file(declared.component_id)
            if only_new_files and path.exists():
                continue
            plugin = registry.get(declared.capability)
            if plugin is None:
                refused = registry.error_for(declared.capability)
                why = f"its handler is refused: {refused}" if refused else "no such handler is installed"
                raise GrantEditError(
                    f"{manifest_shown} declares {declared.capability} for {declared.component_id}, but "
                    f"{why} (installed: {', '.join(registry.names()) or 'none'}); nothing granted"
                )
            if path not in planned:
                doc = _read_document(path, declared.component_id) or {
                    "component_id": declared.component_id,
                    "permissions": {},
                }
                planned[path] = (declared.component_id, doc)
            doc = planned[path][1]
            entry = {"enabled": True, **expand_declared(declared.entry, work_area)}
            doc.setdefault("permissions", {})[declared.capability] = entry
            warning = _scope_warning(ws, plugin, scopes, declared.capability)
            done.append(
                DeclaredGrant(declared.component_id, declared.capability, path, declared.reason, warning)
            )
        encoded = {path: _encode(doc) for path, (_, doc) in planned.items()}
        for grant in done:
            problem = _refusal(ws, registry, scopes, grant.path, encoded[grant.path], grant.capability)
            if problem is not None:
                raise GrantEditError(
                    f"{problem} (declared in {manifest_shown} for {grant.component_id}); nothing granted"
                )
        for path, data in encoded.items():
            _write(path, data)
    return done


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


def remember_allow(ws: Workspace, component: str, permission: str) -> bool:
    """`rumi approve --remember`: turn the PERMISSION entry that decides for COMPONENT from ask mode into
    a plain allow (its `mode` and `ask_timeout` removed). That entry is in the file the broker's policy
    resolves it to now (`effective_grants`, as `Policy.decide`): COMPONENT's own file when it has an
    entry for PERMISSION, else its Pack's Pack-wide `<pack_id>:*` file, whose entry covers every
    component of the Pack. False when that entry does not ask, or none decides (nothing written)."""
    from broker.core.ids import CAPABILITY_RE, parse_component_id

    try:
        parse_component_id(component)
    except ValueError as exc:
        raise GrantEditError(str(exc)) from None
    if not CAPABILITY_RE.match(permission):
        raise GrantEditError(f"permission {permission!r} must match {CAPABILITY_RE.pattern}")
    registry = HandlerRegistry(ws.handlers)
    scopes = ScopeStore(ws.scopes)
    with _locked(ws):
        store = GrantStore(ws, registry, scopes)
        effective = effective_grants(store.files(), component)
        source = next((g.source for g in effective if g.capability == permission), None)
        if source is None:
            return False  # no entry decides (or a covering grant file is invalid): nothing asks
        path = ws.grant_file(source)
        doc = _read_document(path, source)
        entry = (doc or {}).get("permissions", {}).get(permission)
        if doc is None or not isinstance(entry, dict) or entry.get("mode") != "ask":
            return False
        for key in ("mode", "ask_timeout"):
            entry.pop(key, None)
        data = _encode(doc)
        state = check_grant_document(ws, registry.plugins, scopes.current, path, data)
        if not state.usable:
            raise GrantEditError(str(state.errors[0]) if state.errors else f"{display_path(path)}: refused")
        _write(path, data)
    return True


def grant_files(ws: Workspace, component: str | None = None) -> list[GrantFileState]:
    """Every grant file as the broker loads it (valid or not), or only COMPONENT's."""
    store = GrantStore(ws, HandlerRegistry(ws.handlers))
    return [s for s in store.files() if component is None or (s.component_id or s.path.stem) == component]


def known_components(ws: Workspace, files: list[GrantFileState]) -> list[str]:
    """Components whose permissions `rumi grants` shows: those with a grant file, and for each Pack
    with a Pack-wide file its proxy component `<pack_id>:pack:_` and the components its pack.json
    declares (they get the Pack-wide grant without a file of their own). Sorted; no `<pack_id>:*`."""
    found = {s.component_id for s in files if s.component_id is not None}
    for target in list(found):
        pack_id, _, rest = target.partition(":")
        if rest != PACK_WIDE:
            continue
        found.add(f"{pack_id}:pack:_")
        try:
            manifest = load_manifest(ws, pack_id)
        except WorkspaceError:
            continue
        found.update(manifest.permissions or {})
    return sorted(c for c in found if not c.endswith(f":{PACK_WIDE}"))


def effective_permissions(
    ws: Workspace, component: str | None = None, files: list[GrantFileState] | None = None
) -> list[EffectiveGrant]:
    """Each component's permissions as the broker resolves them (own entry, else the Pack-wide one),
    with the grant file each comes from; only COMPONENT's when given."""
    states = files if files is not None else grant_files(ws)
    components = [component] if component is not None else known_components(ws, states)
    return [grant for c in components for grant in effective_grants(states, c)]


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


_FLAGS = frozenset({"shell", "allow_wide_networks", "plaintext_tunnel"})
_WIDE_HINT = '"allow_wide_networks": true'
_MAX_SHOWN = 4  # widened pairs named in a notice


def _entry_port(text: object) -> int | None:
    """The port an `allowed_domains` entry carries itself (None: it takes `allowed_ports`)."""
    from broker.backends.egress import parse_host_entry

    if not isinstance(text, str):
        return None
    try:
        return parse_host_entry(text).port
    except ValueError:
        return None  # written as given: the grant check refuses it with its own message


def _with_port(host: str, port: int) -> str:
    from broker.backends.egress import with_port

    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        return f"{host}:{port}"
    return with_port(host, port)


def _merge_network(entry: dict[str, Any], domains: list[Any], ports: list[Any]) -> str | None:
    """Add `domains` and `ports` to a network entry without widening what it already grants.

    Merged naively, every entry without a port would get every port: all old and new hosts times all
    old and new ports. When that grants a pair nobody asked for (an old host on a new port, a new host on an old
    port), the new hosts are written as `host:port` entries and `allowed_ports` is left alone; the
    returned notice says so. Otherwise the lists are merged as before (None returned).
    """
    for key, option in (("allowed_domains", "--domain"), ("allowed_ports", "--port")):
        if not isinstance(entry.get(key, []), list):
            raise GrantEditError(
                f"the existing {key} is not a list; fix the grant file or revoke the permission first ({option})"
            )
    current = entry.get("allowed_domains", [])
    old_hosts = [d.strip() for d in current if isinstance(d, str) and _entry_port(d) is None]
    old_ports = [p for p in entry.get("allowed_ports", []) if isinstance(p, int)]
    new_hosts = [d.strip() for d in dict.fromkeys(domains) if _entry_port(d) is None]
    new_ports = list(dict.fromkeys(ports))
    wanted = {(h, p) for h in old_hosts for p in old_ports} | {(h, p) for h in new_hosts for p in new_ports}
    hosts = list(dict.fromkeys([*old_hosts, *new_hosts]))
    extra = [(h, p) for h in hosts for p in dict.fromkeys([*old_ports, *new_ports]) if (h, p) not in wanted]
    if not (new_hosts and new_ports and extra):
        _merge_list(entry, "allowed_domains", list(domains), "--domain")
        _merge_list(entry, "allowed_ports", list(ports), "--port")
        return None
    pairs = [_with_port(h, p) for h in new_hosts for p in new_ports]
    own_port = [d for d in domains if _entry_port(d) is not None]  # given as host:port already
    _merge_list(entry, "allowed_domains", [*own_port, *pairs], "--domain")
    shown = ", ".join(_with_port(h, p) for h, p in extra[:_MAX_SHOWN])
    more = f" and {len(extra) - _MAX_SHOWN} more" if len(extra) > _MAX_SHOWN else ""
    return (
        f"wrote {', '.join(pairs)} as host:port entries: adding {', '.join(new_hosts)} to allowed_domains "
        f"and {', '.join(map(str, new_ports))} to allowed_ports would also have granted {shown}{more}"
    )


def _merge_list(entry: dict[str, Any], key: str, values: list[Any], option: str) -> None:
    if not values:
        return
    current = entry.get(key, [])
    if not isinstance(current, list):
        raise GrantEditError(
            f"the existing {key} is not a list; fix the grant file or revoke the permission first ({option})"
        )
    entry[key] = current + [v for v in dict.fromkeys(values) if v not in current]
