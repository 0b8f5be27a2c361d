"""Policy: scopes, grants and the decision whether a request may run.

Deny is the default. A request runs only when its capability has a loaded handler, the scope that
handler requires is installed and valid, the component belongs to the Pack the server authenticated,
and that component's grant file holds an enabled, valid entry for the capability.

Files (docs/architecture.md, "Workspace"):
- `docker/scopes/<capability>.json`: `{"version": "1.0", "description": ..., "default_config": {...}}`.
- `docker/grants/<component_id>.json`: `{"component_id": ..., "permissions": {"<capability>": {...}}}`.
- `docker/grants/<pack_id>:*.json`: a Pack-wide grant, for every component of that Pack (the proxy's
  `<pack_id>:pack:_` included). For one capability a component's own entry, enabled or not, replaces
  the Pack-wide entry; the two are never merged (`grant_source`).

Grant file rules (each failure is a `GrantError` naming the file and the field):
- The file name must be `<component_id>.json` and the id must parse; each entry is checked against its
  handler's `grant_schema` (strict types, unknown keys refused) with the scope's `default_config`
  filling the schema keys the entry leaves out; every `directories` path must be absolute and must
  not be, contain or lie inside a protected workspace path (resolved, so symlinks count), nor lie
  on or above a pseudo file system (proc, sysfs, devtmpfs, cgroup, ...: by statfs type);
  an `allowed_domains` CIDR overlapping Rumi's own Docker address pool (`network_pool`) needs
  `"allow_wide_networks": true` (the network handler's schema checks the rest of that rule).
- `allow_wide_networks` and `plaintext_tunnel` are grant-only keys: a scope may not default them.
- Any such error makes the *whole file* invalid: that component is denied everything until it is
  fixed, and nothing else is affected. The one exception is an entry for a capability with no
  installed handler: it cannot grant anything, so it is reported and skipped and the rest of the
  file stays in force (uninstalling a handler must not lock every component out).

The grant a handler sees is `{**scope.default_config, **entry}`, where `entry` is the validated
grant_schema struct as builtins (schema defaults < scope defaults < keys written in the file).

Everything reloads on change (`GrantStore.refresh`, cheap enough to poll every 0.2 s): handler files,
scope files and grant files, and all grants are re-checked when handlers, scopes, the set of Pack
sandboxes or docker/config.json change. The check at load is complemented at run time by the handlers' own resolution
beneath each granted directory (a directory may become a symlink after it was granted).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.abc
import msgspec

from broker.core.errors import Denied, GrantError, ScopeError, UnknownCapability, WorkspaceError
from broker.core.ids import CAPABILITY_RE, is_pack_wide, pack_wide_id, parse_component_id
from broker.core.protected import ProtectedIndex, ProtectedSet, pseudo_fs_of_path, pseudo_mounts_within
from broker.core.workspace import RumiConfig, Workspace
from broker.policy.plugins import HandlerPlugin, HandlerRegistry, WatchedDirectory, display_path

__all__ = [
    "Decision",
    "EffectiveGrant",
    "GrantEntry",
    "GrantFile",
    "GrantFileState",
    "GrantStore",
    "Policy",
    "Scope",
    "ScopeSet",
    "ScopeStore",
    "check_directory",
    "check_grant_document",
    "effective_grants",
    "grant_source",
    "load_scope_source",
    "load_scopes",
    "schema_documents",
    "schema_file_texts",
]

log = logging.getLogger("rumi.policy")

MAX_POLICY_FILE_BYTES = 1024 * 1024
_AT_RE = re.compile(r" - at `\$([^`]*)`$")
GRANT_ONLY_KEYS = ("allow_wide_networks", "plaintext_tunnel")
"""Grant keys that widen what a grant reaches: never a scope default, always written per component."""
# An `allowed_domains` entry that is a CIDR block, with or without a port: `[v6/len]:port`, `v4/len:port`.
_CIDR_ENTRY_RE = re.compile(r"^\[([^\[\]]*/[0-9]+)\](?::[0-9]+)?$|^([^\[\]]*/[0-9]+)(?::[0-9]+)?$")
# Ask mode (docs/ask-mode.md): keys of every grant entry, read by the broker, not by the handler's schema.
ASK_KEYS = ("mode", "ask_timeout")
DEFAULT_ASK_TIMEOUT = 20.0
SDK_REQUEST_TIMEOUT = 30.0  # pack_runtime.Pack's default request_timeout
# An unanswered ask is denied 2 s before the SDK would give up: the Pack sees a deny, never a timeout.
MAX_ASK_TIMEOUT = SDK_REQUEST_TIMEOUT - 2


def _ask_settings(shown: str, where: str, raw: dict[str, Any]) -> dict[str, Any] | GrantError:
    """The ask-mode keys an entry writes, checked: `mode` "allow"|"ask", `ask_timeout` 0 < s < 28."""
    found: dict[str, Any] = {}
    if "mode" in raw:
        if raw["mode"] not in ("allow", "ask"):
            return GrantError(
                f'{shown}: mode must be "allow" or "ask", got {raw["mode"]!r} - at `{where}.mode`'
            )
        found["mode"] = raw["mode"]
    if "ask_timeout" in raw:
        value = raw["ask_timeout"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < MAX_ASK_TIMEOUT:
            return GrantError(
                f"{shown}: ask_timeout must be seconds above 0 and below {MAX_ASK_TIMEOUT:g} (the Pack SDK's "
                f"{SDK_REQUEST_TIMEOUT:g} s request timeout minus 2 s, so an unanswered request is denied, not "
                f"timed out), got {value!r} - at `{where}.ask_timeout`"
            )
        found["ask_timeout"] = float(value)
    return found


# --- scopes ------------------------------------------------------------------------------------------


class Scope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A scope file `docker/scopes/<capability>.json`: installs a capability and its default settings."""

    version: Literal["1.0"]
    description: str
    default_config: dict[str, Any] = {}


_SCOPE_DECODER = msgspec.json.Decoder(Scope)


def load_scope_source(path: Path, data: bytes) -> Scope:
    """Decode and check one scope file's bytes; raise a one-line ScopeError naming file and field."""
    shown = display_path(path)
    if not CAPABILITY_RE.match(path.stem):
        raise ScopeError(f"{shown}: scope name {path.stem!r} must match {CAPABILITY_RE.pattern}")
    try:
        scope = _SCOPE_DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise ScopeError(f"{shown}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ScopeError(f"{shown}: not valid JSON ({exc})") from None
    if "enabled" in scope.default_config:
        raise ScopeError(
            f"{shown}: only a grant enables a capability; remove `enabled` - at `$.default_config.enabled`"
        )
    for key in (*GRANT_ONLY_KEYS, *ASK_KEYS):  # ask mode is per component too
        if key in scope.default_config:
            raise ScopeError(
                f"{shown}: `{key}` may only be set in a grant, one component at a time; remove it "
                f"- at `$.default_config.{key}`"
            )
    return scope


def load_scopes(directory: Path) -> tuple[dict[str, Scope], list[ScopeError]]:
    """Load every `*.json` scope in `directory`; an invalid file is reported, the others load."""
    scopes: dict[str, Scope] = {}
    errors: list[ScopeError] = []
    changes = WatchedDirectory(directory, ".json", max_bytes=MAX_POLICY_FILE_BYTES).scan()
    for path in sorted(changes.updated):
        content = changes.updated[path]
        try:
            if isinstance(content, OSError):
                raise ScopeError(f"{display_path(path)}: cannot read ({content.strerror})")
            scopes[path.stem] = load_scope_source(path, content)
        except ScopeError as exc:
            errors.append(exc)
    return scopes, errors


@dataclass(frozen=True)
class ScopeSet:
    """Valid scopes by capability, and capabilities whose scope file exists but is invalid."""

    scopes: Mapping[str, Scope] = field(default_factory=dict)
    paths: Mapping[str, Path] = field(default_factory=dict)
    invalid: Mapping[str, ScopeError] = field(default_factory=dict)


class ScopeStore:
    """The scope files of one directory, reloaded when they change."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._watch = WatchedDirectory(directory, ".json", max_bytes=MAX_POLICY_FILE_BYTES)
        self._scopes: dict[Path, Scope] = {}
        self._errors: dict[Path, ScopeError] = {}
        self._lock = threading.Lock()
        self.current = ScopeSet()
        self.generation = 0
        self.reload_if_changed()

    @property
    def errors(self) -> list[ScopeError]:
        """Scope files refused at the last load."""
        return list(self.current.invalid.values())

    def get(self, capability: str) -> Scope | None:
        """The valid scope of `capability`, or None."""
        return self.current.scopes.get(capability)

    def reload_if_changed(self) -> bool:
        """Re-read changed scope files; return True if anything changed."""
        with self._lock:
            changes = self._watch.scan()
            if not changes.changed:
                return False
            for path in changes.removed:
                self._scopes.pop(path, None)
                self._errors.pop(path, None)
            for path, content in changes.updated.items():
                self._scopes.pop(path, None)
                self._errors.pop(path, None)
                try:
                    if isinstance(content, OSError):
                        raise ScopeError(f"{display_path(path)}: cannot read ({content.strerror})")
                    self._scopes[path] = load_scope_source(path, content)
                except ScopeError as exc:
                    self._errors[path] = exc
            self.current = ScopeSet(
                scopes={p.stem: s for p, s in sorted(self._scopes.items())},
                paths={p.stem: p for p in sorted(self._scopes)},
                invalid={p.stem: e for p, e in sorted(self._errors.items())},
            )
            self.generation += 1
            return True


# --- grants ------------------------------------------------------------------------------------------


class GrantFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A grant file `docker/grants/<component_id>.json`: what one component may do."""

    component_id: str
    permissions: dict[str, dict[str, Any]] = {}


class _GrantFileLoose(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    component_id: str
    permissions: dict[str, Any] = {}


# Entries are checked one by one, so an error can say `$.permissions.<capability>` (msgspec says `[...]`).
_GRANT_DECODER = msgspec.json.Decoder(_GrantFileLoose)


@functools.lru_cache(maxsize=256)
def _field_names(schema: type[msgspec.Struct]) -> frozenset[str]:
    return frozenset(f.encode_name for f in msgspec.structs.fields(schema))


_Parts = tuple[str, ...]


def _forms(path: str | os.PathLike[str]) -> list[_Parts]:
    """A path's components as written (normalised) and as resolved (symlinks followed)."""
    forms = [tuple(c for c in os.path.normpath(path).split(os.sep) if c)]
    real = tuple(c for c in os.path.realpath(path).split(os.sep) if c)
    return forms if real == forms[0] else [*forms, real]


def _within(inner: _Parts, outer: _Parts) -> bool:
    """Component-wise: `inner` is `outer` or lies below it."""
    return inner[: len(outer)] == outer


_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _reserved_networks(ws: Workspace) -> tuple[tuple[_IPNetwork, str], ...]:
    """Rumi's own Docker address pool (`network_pool`), and its IPv4-mapped IPv6 form, each with how to
    show it. The default pool when docker/config.json cannot be read (the broker refuses to start then)."""
    try:
        text = ws.load_config().network_pool
    except WorkspaceError:
        text = RumiConfig().network_pool
    try:
        pool = ipaddress.ip_network(text, strict=False)
    except ValueError:
        pool = ipaddress.ip_network(RumiConfig().network_pool)
    shown = f"{pool} (network_pool in docker/config.json)"
    found: list[tuple[_IPNetwork, str]] = [(pool, shown)]
    if isinstance(pool, ipaddress.IPv4Network):
        mapped = ipaddress.IPv6Network(((0xFFFF << 32) | int(pool.network_address), 96 + pool.prefixlen))
        found.append((mapped, shown))
    return tuple(found)


@dataclass(frozen=True)
class _ProtectedForms:
    """One Pack's protected paths, both forms each, with the sandbox root and the workspace's reserved
    networks; built once per check pass."""

    pack_id: str | None
    paths: list[tuple[_Parts, str]]
    sandboxes: list[_Parts]
    networks: tuple[tuple[_IPNetwork, str], ...] = ()

    @classmethod
    def of(cls, ws: Workspace, pack_id: str | None) -> _ProtectedForms:
        paths = [(form, str(path)) for path in ws.protected_paths(pack_id) for form in _forms(path)]
        return cls(pack_id, list(dict.fromkeys(paths)), _forms(ws.work_areas), _reserved_networks(ws))


def check_directory(
    ws: Workspace, pack_id: str | None, directory: object, *, protected: _ProtectedForms | None = None
) -> str | None:
    """Why `directory` may not be granted to `pack_id` (None when it may).

    Refused: not an absolute path; is, contains or is inside a protected workspace path (compared
    component-wise, as written and resolved); is or contains the sandbox root, or is inside another
    Pack's sandbox (also one not created yet); lies on a pseudo file system (proc, sysfs, devtmpfs,
    devpts, cgroup, ...: told by statfs f_type, not by name; a missing directory by its nearest
    existing parent) or has one mounted at or beneath it.
    """
    if not isinstance(directory, str) or not directory or "\0" in directory or not os.path.isabs(directory):
        return f"directory {directory!r} must be an absolute path"
    try:
        forms = _forms(directory)
    except (OSError, ValueError) as exc:
        return f"directory {directory!r} cannot be resolved ({exc})"
    if protected is None or protected.pack_id != pack_id:
        protected = _ProtectedForms.of(ws, pack_id)
    for form in forms:
        for parts, shown in protected.paths:
            if form == parts:
                return f"directory {directory!r} is the protected workspace path {shown}"
            if _within(form, parts):
                return f"directory {directory!r} is inside the protected workspace path {shown}"
            if _within(parts, form):
                return f"directory {directory!r} contains the protected workspace path {shown}"
    for form in forms:
        for sandbox in protected.sandboxes:
            if _within(sandbox, form):
                return f"directory {directory!r} contains the Pack sandboxes {ws.work_areas}"
            own = (*sandbox, pack_id) if pack_id else None
            if _within(form, sandbox) and (own is None or not _within(form, own)):
                return f"directory {directory!r} is inside another Pack's sandbox under {ws.work_areas}"
    return _pseudo_fs_problem(directory)


def _pseudo_fs_problem(directory: str) -> str | None:
    """Why `directory` is kernel state rather than files (a pseudo file system on or beneath it)."""
    try:
        kind = pseudo_fs_of_path(directory)
        beneath = pseudo_mounts_within(directory)
    except OSError as exc:
        return f"directory {directory!r}: its file system cannot be checked ({exc.strerror})"
    if kind is not None:
        return (
            f"directory {directory!r} is on a {kind} file system (kernel state, not files); "
            "grant a directory on a real file system"
        )
    if beneath:
        point, kind = beneath[0]
        return (
            f"directory {directory!r} has a {kind} file system mounted at {point}; "
            "grant a directory without one beneath it"
        )
    return None


@dataclass(frozen=True)
class GrantFileState:
    """One grant file as checked: its entries when usable, else its errors (the component is denied)."""

    path: Path
    component_id: str | None
    permissions: Mapping[str, Any]  # as written in the file, for display
    entries: Mapping[str, dict[str, Any]]  # capability -> validated entry (enabled or not)
    grants: Mapping[str, dict[str, Any]]  # capability -> {**scope.default_config, **entry}
    errors: tuple[GrantError, ...]
    usable: bool


def _rebase(message: str, prefix: str) -> str:
    """Move msgspec's `$`-relative location under `prefix` (e.g. `$.permissions.file_read`)."""
    if _AT_RE.search(message):
        return _AT_RE.sub(lambda m: f" - at `{prefix}{m.group(1)}`", message)
    return f"{message} - at `{prefix}`"


def _first_key(message: str) -> str | None:
    m = _AT_RE.search(message)
    if not m or not m.group(1).startswith("."):
        return None
    return re.split(r"[.\[]", m.group(1)[1:], maxsplit=1)[0]


def check_grant_document(
    ws: Workspace,
    plugins: Mapping[str, HandlerPlugin],
    scopes: ScopeSet,
    path: Path,
    data: bytes,
    *,
    protected_cache: dict[str, _ProtectedForms] | None = None,
) -> GrantFileState:
    """Check one grant file's bytes as if stored at `path` (the loader and `rumi grant` share this)."""
    doc = _read_grant_document(path, data)
    if isinstance(doc, GrantFileState):
        return doc
    pack_id, document = doc
    if protected_cache is None:
        protected_cache = {}
    if pack_id not in protected_cache:
        protected_cache[pack_id] = _ProtectedForms.of(ws, pack_id)
    check = _EntryCheck(ws, scopes, pack_id, display_path(path), protected_cache[pack_id])
    fatal: list[GrantError] = []
    skipped: list[GrantError] = []
    entries: dict[str, dict[str, Any]] = {}
    grants: dict[str, dict[str, Any]] = {}
    for cap, raw in sorted(document.permissions.items()):
        result = check.entry(cap, raw, plugins.get(cap), plugins)
        if isinstance(result, _Skipped):
            skipped.append(result.error)
        elif isinstance(result, GrantError):
            fatal.append(result)
        else:
            entries[cap], grants[cap] = result
    name = document.component_id
    if fatal:
        return GrantFileState(path, name, document.permissions, {}, {}, (*fatal, *skipped), False)
    return GrantFileState(path, name, document.permissions, entries, grants, tuple(skipped), True)


def _invalid_file(
    path: Path, message: str, component: str | None = None, written: Mapping[str, Any] | None = None
) -> GrantFileState:
    return GrantFileState(path, component, written or {}, {}, {}, (GrantError(message),), False)


def _read_grant_document(path: Path, data: bytes) -> tuple[str, _GrantFileLoose] | GrantFileState:
    """The file's pack id and document, or the state of a file that is invalid as a whole."""
    shown = display_path(path)
    name = path.name.removesuffix(".json")
    try:
        pack_id = parse_component_id(name, pack_wide=True)[0]
    except ValueError as exc:
        return _invalid_file(path, f"{shown}: file name must be <component_id>.json: {exc}")
    try:
        doc = _GRANT_DECODER.decode(data)
    except msgspec.ValidationError as exc:
        return _invalid_file(path, f"{shown}: {exc}", name)
    except msgspec.DecodeError as exc:
        return _invalid_file(path, f"{shown}: not valid JSON ({exc})", name)
    if doc.component_id != name:
        return _invalid_file(
            path,
            f"{shown}: component_id {doc.component_id!r} does not match the file name "
            f"(must be {doc.component_id}.json) - at `$.component_id`",
            name,
            doc.permissions,
        )
    return pack_id, doc


@dataclass(frozen=True)
class _Skipped:
    """An entry ignored without invalidating the file (its handler is not installed)."""

    error: GrantError


@dataclass(frozen=True)
class _EntryCheck:
    """Checks the entries of one grant file: schema, scope defaults, directories."""

    ws: Workspace
    scopes: ScopeSet
    pack_id: str
    shown: str
    protected: _ProtectedForms

    def entry(
        self, cap: str, raw: object, plugin: HandlerPlugin | None, plugins: Mapping[str, HandlerPlugin]
    ) -> tuple[dict[str, Any], dict[str, Any]] | GrantError | _Skipped:
        """(entry as written and typed, entry merged over the scope) or why it is refused."""
        shown, where = self.shown, f"$.permissions.{cap}"
        if not isinstance(raw, dict):
            kind = {"list": "array", "NoneType": "null"}.get(type(raw).__name__, type(raw).__name__)
            return GrantError(f"{shown}: Expected `object`, got `{kind}` - at `{where}`")
        if plugin is None:
            installed = ", ".join(sorted(plugins)) or "none"
            return _Skipped(
                GrantError(
                    f"{shown}: no handler {cap!r} is installed (installed: {installed}); "
                    f"entry ignored - at `{where}`"
                )
            )
        scope = self.scopes.scopes.get(cap)
        scope_config = scope.default_config if scope is not None else {}
        ask = _ask_settings(shown, where, raw)
        if isinstance(ask, GrantError):
            return ask
        raw = {k: v for k, v in raw.items() if k not in ASK_KEYS}
        names = _field_names(plugin.grant_schema)
        unknown = sorted(k for k in raw if k not in names)
        if unknown:
            return GrantError(f"{shown}: Object contains unknown field `{unknown[0]}` - at `{where}`")
        from_scope = {k: v for k, v in scope_config.items() if k in names and k != "enabled"}
        struct = self._convert(cap, raw, from_scope, plugin)
        if isinstance(struct, GrantError):
            return struct
        entry = {**msgspec.to_builtins(struct), **ask}
        merged = {**scope_config, **entry}
        problem = self._directories(cap, merged.get("directories"), from_written="directories" in raw)
        if problem is None:
            problem = self._networks(cap, merged, from_written="allowed_domains" in raw)
        if problem is not None:
            return problem
        return entry, merged

    def _scope_shown(self, cap: str) -> str:
        return display_path(self.scopes.paths.get(cap, self.ws.scopes / f"{cap}.json"))

    def _convert(
        self, cap: str, raw: dict[str, Any], from_scope: dict[str, Any], plugin: HandlerPlugin
    ) -> msgspec.Struct | GrantError:
        shown, where = self.shown, f"$.permissions.{cap}"
        try:
            struct: msgspec.Struct = msgspec.convert({**from_scope, **raw}, plugin.grant_schema)
        except msgspec.ValidationError as exc:
            message = str(exc)
            key = _first_key(message)
            if key is not None and key not in raw and key in from_scope:
                return GrantError(
                    f"{shown}: {where} takes a bad default from {self._scope_shown(cap)}: "
                    f"{_rebase(message, '$.default_config')}"
                )
            return GrantError(f"{shown}: {_rebase(message, where)}")
        except Exception as exc:  # a grant_schema's __post_init__ may raise anything
            detail = " ".join(str(exc).split())
            return GrantError(f"{shown}: {type(exc).__name__}: {detail} - at `{where}`")
        return struct

    def _networks(self, cap: str, merged: Mapping[str, Any], *, from_written: bool) -> GrantError | None:
        """A CIDR entry overlapping Rumi's own Docker address pool needs `allow_wide_networks` (the
        handler's own check knows loopback, link-local, metadata and width, but not the workspace)."""
        domains = merged.get("allowed_domains")
        if not isinstance(domains, list) or merged.get("allow_wide_networks") is True:
            return None
        for text in domains:
            m = _CIDR_ENTRY_RE.match(text.strip()) if isinstance(text, str) else None
            if m is None:
                continue
            try:
                net = ipaddress.ip_network(m.group(1) or m.group(2), strict=False)
            except ValueError:
                continue  # the handler's grant_schema refuses it with its own message
            if net.num_addresses == 1:
                continue  # one address is named on purpose
            for pool, shown in self.protected.networks:
                if pool.version == net.version and net.overlaps(pool):
                    problem = (
                        f"allowed_domains entry {text.strip()!r} overlaps Rumi's own Docker address pool "
                        f'{shown}; name the exact addresses, or set "allow_wide_networks": true in the '
                        "grant to allow it"
                    )
                    where = f"$.permissions.{cap}"
                    if from_written:
                        return GrantError(f"{self.shown}: {problem} - at `{where}.allowed_domains`")
                    return GrantError(
                        f"{self.shown}: {where} takes a bad default from {self._scope_shown(cap)}: "
                        f"{problem} - at `$.default_config.allowed_domains`"
                    )
        return None

    def _directories(self, cap: str, directories: object, *, from_written: bool) -> GrantError | None:
        if directories is None:
            return None
        problem: str | None = None
        if not isinstance(directories, list):
            problem = "directories must be a list of absolute paths"
        else:
            for d in directories:
                if (
                    problem := check_directory(self.ws, self.pack_id, d, protected=self.protected)
                ) is not None:
                    break
        if problem is None:
            return None
        where = f"$.permissions.{cap}"
        if from_written:
            return GrantError(f"{self.shown}: {problem} - at `{where}.directories`")
        return GrantError(
            f"{self.shown}: {where} takes a bad default from {self._scope_shown(cap)}: "
            f"{problem} - at `$.default_config.directories`"
        )


@dataclass(frozen=True)
class _Snapshot:
    """Everything `Policy.decide` reads, swapped in one assignment so a decision never mixes two loads."""

    plugins: Mapping[str, HandlerPlugin]
    scopes: ScopeSet
    # target (component or `<pack_id>:*`) -> capability -> msgpack of the merged grant / of the entry;
    # enabled entries only.
    grants: Mapping[str, Mapping[str, bytes]]
    entries: Mapping[str, Mapping[str, bytes]]
    invalid: frozenset[str]  # targets whose grant file is invalid
    # target -> capabilities its valid file has an entry for, enabled or not (an own entry, even a
    # disabled one, replaces the Pack-wide entry)
    present: Mapping[str, frozenset[str]] = field(default_factory=dict)


_EMPTY = _Snapshot({}, ScopeSet(), {}, {}, frozenset())


def grant_source(
    component_id: str, capability: str, present: Mapping[str, Container[str]], invalid: Container[str]
) -> str | None:
    """The grant target whose entry decides `capability` for `component_id`, or None (denied).

    The component's own file when it has an entry for the capability (enabled or not: an own entry
    replaces the Pack-wide one, never merged with it), else the Pack-wide file `<pack_id>:*`. An invalid
    file denies everything to every component it covers: its own component, or for `<pack_id>:*`
    every component of the Pack.
    """
    wide = pack_wide_id(component_id.partition(":")[0])
    if component_id in invalid or wide in invalid:
        return None
    return component_id if capability in present.get(component_id, ()) else wide


class GrantStore:
    """All grant files of a workspace, checked; `refresh()` re-reads only what changed.

    `refresh()` also reloads the handler registry and the scopes, and re-checks every grant when
    handlers, scopes or the workspace layout (e.g. a new Pack sandbox) changed. It refreshes the
    workspace's protected-path index too (`protected_index`, shared by every Pack's `ProtectedSet`):
    the entries beneath the protected directories are re-listed where they changed, and cached
    grant-root ancestor chains are dropped, on every poll.
    """

    def __init__(self, ws: Workspace, registry: HandlerRegistry, scopes: ScopeStore | None = None) -> None:
        self.ws = ws
        self.registry = registry
        self.scopes = scopes if scopes is not None else ScopeStore(ws.scopes)
        self._watch = WatchedDirectory(ws.grants, ".json", max_bytes=MAX_POLICY_FILE_BYTES)
        self._raw: dict[Path, bytes | OSError] = {}
        self._states: dict[Path, GrantFileState] = {}
        self._inputs: tuple[object, ...] | None = None
        self._reported: set[str] = set()  # errors already logged, so each is logged once
        self._lock = threading.Lock()
        self.snapshot = _EMPTY
        self.protected_index = ProtectedIndex.for_workspace(ws)  # built on first use
        self.refresh()

    @property
    def errors(self) -> list[GrantError]:
        """Current errors of all grant files (an invalid file's component is denied)."""
        return [e for p in sorted(self._states) for e in self._states[p].errors]

    def files(self) -> list[GrantFileState]:
        """Every grant file as last checked, sorted by path."""
        return [self._states[p] for p in sorted(self._states)]

    def entry(self, component_id: str, capability: str) -> dict[str, Any] | None:
        """The validated entry (a fresh builtins dict) if the component's grant enables `capability`:
        its own entry, else its Pack's Pack-wide one (`grant_source`)."""
        snap = self.snapshot
        source = grant_source(component_id, capability, snap.present, snap.invalid)
        raw = None if source is None else snap.entries.get(source, {}).get(capability)
        return None if raw is None else dict(msgspec.msgpack.decode(raw))

    def _layout_stamp(self) -> tuple[object, ...]:
        stamps: list[object] = []
        # docker/config.json: its network_pool is checked against CIDR grants.
        for path in (self.ws.docker, self.ws.work_areas, self.ws.config_file):
            try:
                st = path.stat()
                stamps.append((st.st_ino, st.st_mtime_ns))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def refresh(self) -> bool:
        """Pick up changed handler, scope and grant files; return True if anything was re-checked."""
        try:
            self.protected_index.refresh()  # a few dozen stats; re-lists only directories that changed
        except Exception as exc:  # grants (revocations) must reload even so; checks re-validate on their own
            log.error("protected-path index refresh failed: %s: %s", type(exc).__name__, exc)
        with self._lock:
            self.registry.reload_if_changed()
            self.scopes.reload_if_changed()
            inputs = (self.registry.generation, self.scopes.generation, self._layout_stamp())
            recheck_all = inputs != self._inputs
            changes = self._watch.scan()
            if not changes.changed and not recheck_all:
                return False
            first_load = self._inputs is None  # the owner reports `errors` of the first load itself
            self._inputs = inputs
            for path in changes.removed:
                self._raw.pop(path, None)
                self._states.pop(path, None)
            self._raw.update(changes.updated)
            todo = list(self._raw) if recheck_all else list(changes.updated)
            plugins = self.registry.plugins
            scopes = self.scopes.current
            protected_cache: dict[str, _ProtectedForms] = {}
            for path in todo:
                content = self._raw[path]
                if isinstance(content, OSError):
                    self._states[path] = GrantFileState(
                        path,
                        None,
                        {},
                        {},
                        {},
                        (GrantError(f"{display_path(path)}: cannot read ({content.strerror})"),),
                        False,
                    )
                else:
                    self._states[path] = check_grant_document(
                        self.ws, plugins, scopes, path, content, protected_cache=protected_cache
                    )
            self.snapshot = self._build_snapshot(plugins, scopes)
            current = [str(e) for e in self._all_errors()]
            for message in current:
                if not first_load and message not in self._reported:
                    log.warning("refused: %s", message)
            self._reported = set(current)
            return True

    def _all_errors(self) -> list[WorkspaceError]:
        return [*self.registry.errors, *self.scopes.errors, *self.errors]

    def _build_snapshot(self, plugins: Mapping[str, HandlerPlugin], scopes: ScopeSet) -> _Snapshot:
        grants: dict[str, dict[str, bytes]] = {}
        entries: dict[str, dict[str, bytes]] = {}
        invalid: set[str] = set()
        present: dict[str, frozenset[str]] = {}
        for state in self._states.values():
            if state.component_id is None:
                continue
            if not state.usable:
                invalid.add(state.component_id)
                continue
            present[state.component_id] = frozenset(state.entries)
            for cap, entry in state.entries.items():
                if entry.get("enabled") is True:
                    entries.setdefault(state.component_id, {})[cap] = msgspec.msgpack.encode(entry)
                    grants.setdefault(state.component_id, {})[cap] = msgspec.msgpack.encode(state.grants[cap])
        return _Snapshot(plugins, scopes, grants, entries, frozenset(invalid), present)

    def watched_directories(self) -> list[Path]:
        """Where a change can alter a decision: what `refresh()` reads (grants, handlers, scopes,
        docker/config.json, the work areas) and the top of every protected directory."""
        ws = self.ws
        return [ws.docker, ws.grants, ws.handlers, ws.scopes, ws.work_areas, ws.state, ws.packs, ws.ecosystem]

    async def watch(
        self,
        *,
        interval: float,
        rescan: float | None = None,
        on_refresh: Callable[[bool | None], None] | None = None,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Refresh until cancelled: every `interval` s, or, given `rescan`, as soon as a watched directory
        changes (inotify) and at the latest every `rescan` s (`interval` again where inotify is missing).

        `on_refresh(changed)` follows each refresh: True if anything was re-checked, None if it failed.
        """
        from broker.core.notify import DirectoryNotifier  # asyncio and ctypes: not for `rumi grants`

        notifier = DirectoryNotifier(self.watched_directories() if rescan is not None else ())
        # With inotify, a change wakes the loop and `rescan` is the longest wait; without it (or once it
        # fails: `available` turns False), poll every `interval`.
        longest = max(rescan, interval) if rescan is not None else interval
        task_status.started()
        try:
            while True:
                await notifier.wait(longest if notifier.available else interval)
                try:
                    changed: bool | None = await anyio.to_thread.run_sync(self.refresh)
                except Exception as exc:  # a bug here must not stop revocations for good: keep polling
                    log.error("grant refresh failed: %s: %s", type(exc).__name__, exc)
                    changed = None
                if on_refresh is not None:
                    on_refresh(changed)
        finally:
            notifier.close()


# --- decisions ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """An allowed request: the handler to run, the grant it runs under, the Pack's protected paths, and
    the grant file that allowed it (`source`: the component id, or `<pack_id>:*` for a Pack-wide grant)."""

    plugin: HandlerPlugin
    grant: dict[str, Any]
    protected: ProtectedSet | None = None
    source: str = ""


class Policy:
    """Decides requests from the handler registry, the scopes and the grants of one workspace.

    `Policy(ws, registry, scopes, grants)`; `Policy(ws, registry, grants)` takes the scopes the
    grant store was built with.
    """

    def __init__(
        self,
        ws: Workspace,
        registry: HandlerRegistry,
        scopes: ScopeStore | GrantStore,
        grants: GrantStore | None = None,
    ) -> None:
        if grants is None:
            if not isinstance(scopes, GrantStore):
                raise TypeError("Policy(ws, registry, grants) needs a GrantStore")
            grants, scopes = scopes, scopes.scopes
        if (
            not isinstance(scopes, ScopeStore)
            or grants.registry is not registry
            or grants.scopes is not scopes
        ):
            raise ValueError("Policy: grants must be built from the same registry and scopes")
        self.ws = ws
        self.registry = registry
        self.scopes = scopes
        self.grants = grants
        self._protected: dict[str, ProtectedSet] = {}

    @classmethod
    def for_workspace(cls, ws: Workspace) -> Policy:
        """Load handlers, scopes and grants of `ws`."""
        registry = HandlerRegistry(ws.handlers)
        scopes = ScopeStore(ws.scopes)
        return cls(ws, registry, scopes, GrantStore(ws, registry, scopes))

    @property
    def errors(self) -> list[WorkspaceError]:
        """Every current problem: refused handlers, invalid scopes, invalid grant files."""
        return [*self.registry.errors, *self.scopes.errors, *self.grants.errors]

    def refresh(self) -> bool:
        """Pick up changed handlers, scopes and grants."""
        return self.grants.refresh()

    def decide(self, pack_id: str, component_id: str, capability: str) -> Decision:
        """Allow or refuse; raise UnknownCapability or Denied (messages are safe to show the Pack).

        Order: capability known → scope installed (if required) and valid → component belongs to
        `pack_id` → enabled grant entry: the component's own, else its Pack's Pack-wide one
        (`grant_source`). A request names one component: `<pack_id>:*` is refused as malformed.
        """
        snap = self.grants.snapshot
        plugin = snap.plugins.get(capability)
        if plugin is None:
            raise UnknownCapability(f"unknown capability {capability!r}")
        if capability in snap.scopes.invalid:
            raise Denied(f"capability {capability} has an invalid scope file (see `rumi doctor`)")
        if plugin.requires_scope and capability not in snap.scopes.scopes:
            raise Denied(f"capability {capability} has no scope installed")
        try:
            owner = parse_component_id(component_id)[0]
        except ValueError as exc:
            raise Denied(str(exc)) from None
        if owner != pack_id:
            raise Denied(f"component {component_id!r} does not belong to pack {pack_id!r}")
        source = grant_source(component_id, capability, snap.present, snap.invalid)
        grant = None if source is None else snap.grants.get(source, {}).get(capability)
        if grant is None or source is None:
            hint = ""
            if component_id in snap.invalid:
                hint = " (its grant file is invalid: see `rumi grants`)"
            elif source is None:
                hint = f" (the Pack-wide grant file is invalid: see `rumi grants {pack_wide_id(owner)}`)"
            raise Denied(
                f"no grant for {capability} on component {component_id}{hint}: "
                f"run `rumi grant {component_id} {capability} ...`"
            )
        # A fresh copy per request: a handler cannot change the grant the next request sees.
        protected = self._protected.get(pack_id)
        if protected is None:
            # Lazy; every Pack's set looks up the grant store's one index, which its watcher refreshes.
            index = self.grants.protected_index if self.grants.ws.root == self.ws.root else None
            protected = self._protected[pack_id] = ProtectedSet.for_pack(self.ws, pack_id, index=index)
        return Decision(plugin, dict(msgspec.msgpack.decode(grant)), protected, source)


# --- effective permissions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EffectiveGrant:
    """What one component may do with one capability, and which grant file says so (`rumi grants`).

    `source` is the component id (its own entry) or `<pack_id>:*` (the Pack-wide entry); `entry` is
    that entry as validated, `grant` merged over the scope, `written` as the file has it. `enabled`
    False: the own entry disables the capability (and so replaces a Pack-wide one). `replaces` names
    the Pack-wide file whose entry for the capability the own entry overrides.
    """

    component_id: str
    capability: str
    source: str
    enabled: bool
    entry: Mapping[str, Any]
    grant: Mapping[str, Any]
    replaces: str | None = None
    written: Mapping[str, Any] = field(default_factory=dict)


def effective_grants(states: Iterable[GrantFileState], component_id: str) -> list[EffectiveGrant]:
    """The component's permissions as `Policy.decide` resolves them, from checked grant files (sorted by
    capability); empty when a grant file covering it is invalid (it is denied everything)."""
    by_target = {s.component_id: s for s in states if s.component_id is not None}
    invalid = {t for t, s in by_target.items() if not s.usable}
    present = {t: frozenset(s.entries) for t, s in by_target.items() if s.usable}
    wide = pack_wide_id(component_id.partition(":")[0])
    capabilities = set(present.get(component_id, ())) | (
        set() if is_pack_wide(component_id) else set(present.get(wide, ()))
    )
    found: list[EffectiveGrant] = []
    for cap in sorted(capabilities):
        source = grant_source(component_id, cap, present, invalid)
        if source is None:
            return []
        state = by_target[source]
        entry = state.entries[cap]
        replaces = wide if source != wide and cap in present.get(wide, ()) else None
        found.append(
            EffectiveGrant(
                component_id,
                cap,
                source,
                entry.get("enabled") is True,
                entry,
                state.grants[cap],
                replaces,
                written if isinstance(written := state.permissions.get(cap), dict) else {},
            )
        )
    return found


# --- JSON Schema -------------------------------------------------------------------------------------


class GrantEntry(msgspec.Struct):
    """One permission of a component; its other keys follow that handler's grant_schema."""

    enabled: bool = False


_DRAFT = "https://json-schema.org/draft/2020-12/schema"


def schema_documents(plugins: Mapping[str, HandlerPlugin] | None = None) -> dict[str, dict[str, Any]]:
    """JSON Schema of grant and scope files, keyed by file name (`grant.schema.json`, `scope.schema.json`).

    With `plugins`, each installed permission is described by its handler's own grant_schema.
    """
    permissions: Any = dict[str, GrantEntry]
    if plugins:
        permissions = msgspec.defstruct(
            "Permissions",
            [(n, p.grant_schema | msgspec.UnsetType, msgspec.UNSET) for n, p in sorted(plugins.items())],
        )
        permissions.__doc__ = "Permissions by capability; entries without an installed handler are ignored."
    grant_type = msgspec.defstruct(
        "GrantFile",
        [("component_id", str), ("permissions", permissions, msgspec.field(default_factory=dict))],
        forbid_unknown_fields=True,
    )
    grant_type.__doc__ = GrantFile.__doc__
    grant = {"$schema": _DRAFT, "title": "Rumi grant file", **msgspec.json.schema(grant_type)}
    scope = {"$schema": _DRAFT, "title": "Rumi scope file", **msgspec.json.schema(Scope)}
    return {"grant.schema.json": grant, "scope.schema.json": scope}


def schema_file_texts(plugins: Mapping[str, HandlerPlugin] | None = None) -> dict[str, str]:
    """`schema_documents()` as the exact text of the committed files in `config/schema/`."""
    return {
        name: json.dumps(doc, indent=2, sort_keys=True) + "\n"
        for name, doc in schema_documents(plugins).items()
    }


if __name__ == "__main__":  # python -m broker.policy.grants DIR: (re)write the schema files
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "config/schema")
    for file_name, text in schema_file_texts().items():
        (target / file_name).write_text(text)
        print(target / file_name)
