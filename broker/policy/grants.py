"""Policy: scopes, grants and the decision whether a request may run.

Deny is the default. A request runs only when its capability has a loaded handler, the scope that
handler requires is installed and valid, the component belongs to the Pack the server authenticated,
and that component's grant file holds an enabled, valid entry for the capability.

Files (docs/architecture.md, "Workspace"):
- `docker/scopes/<capability>.json`: `{"version": "1.0", "description": ..., "default_config": {...}}`.
- `docker/grants/<component_id>.json`: `{"component_id": ..., "permissions": {"<capability>": {...}}}`.

Grant file rules (each failure is a `GrantError` naming the file and the field):
- The file name must be `<component_id>.json` and the id must parse; each entry is checked against its
  handler's `grant_schema` (strict types, unknown keys refused) with the scope's `default_config`
  filling the schema keys the entry leaves out; every `directories` path must be absolute and must
  not be, contain or lie inside a protected workspace path (resolved, so symlinks count).
- Any such error makes the *whole file* invalid: that component is denied everything until it is
  fixed, and nothing else is affected. The one exception is an entry for a capability with no
  installed handler: it cannot grant anything, so it is reported and skipped and the rest of the
  file stays in force (uninstalling a handler must not lock every component out).

The grant a handler sees is `{**scope.default_config, **entry}`, where `entry` is the validated
grant_schema struct as builtins (schema defaults < scope defaults < keys written in the file).

Everything reloads on change (`GrantStore.refresh`, cheap enough to poll every 0.2 s): handler files,
scope files and grant files, and all grants are re-checked when handlers, scopes or the set of Pack
sandboxes change. The check at load is complemented at run time by the handlers' own resolution
beneath each granted directory (a directory may become a symlink after it was granted).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.abc
import msgspec

from broker.core.errors import Denied, GrantError, ScopeError, UnknownCapability, WorkspaceError
from broker.core.ids import CAPABILITY_RE, parse_component_id
from broker.core.protected import ProtectedIndex, ProtectedSet
from broker.core.workspace import Workspace
from broker.policy.plugins import HandlerPlugin, HandlerRegistry, WatchedDirectory, display_path

__all__ = [
    "Decision",
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
    "load_scope_source",
    "load_scopes",
    "schema_documents",
    "schema_file_texts",
]

log = logging.getLogger("rumi.policy")

MAX_POLICY_FILE_BYTES = 1024 * 1024
_AT_RE = re.compile(r" - at `\$([^`]*)`$")


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


@dataclass(frozen=True)
class _ProtectedForms:
    """One Pack's protected paths, both forms each, with the sandbox root; built once per check pass."""

    pack_id: str | None
    paths: list[tuple[_Parts, str]]
    sandboxes: list[_Parts]

    @classmethod
    def of(cls, ws: Workspace, pack_id: str | None) -> _ProtectedForms:
        paths = [(form, str(path)) for path in ws.protected_paths(pack_id) for form in _forms(path)]
        return cls(pack_id, list(dict.fromkeys(paths)), _forms(ws.work_areas))


def check_directory(
    ws: Workspace, pack_id: str | None, directory: object, *, protected: _ProtectedForms | None = None
) -> str | None:
    """Why `directory` may not be granted to `pack_id` (None when it may).

    Refused: not an absolute path; is, contains or is inside a protected workspace path (compared
    component-wise, as written and resolved); is or contains the sandbox root, or is inside another
    Pack's sandbox (also one not created yet).
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
        pack_id = parse_component_id(name)[0]
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
        names = _field_names(plugin.grant_schema)
        unknown = sorted(k for k in raw if k not in names)
        if unknown:
            return GrantError(f"{shown}: Object contains unknown field `{unknown[0]}` - at `{where}`")
        from_scope = {k: v for k, v in scope_config.items() if k in names and k != "enabled"}
        struct = self._convert(cap, raw, from_scope, plugin)
        if isinstance(struct, GrantError):
            return struct
        entry = msgspec.to_builtins(struct)
        merged = {**scope_config, **entry}
        problem = self._directories(cap, merged.get("directories"), from_written="directories" in raw)
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
    # component -> capability -> msgpack of the merged grant / of the entry; enabled entries only.
    grants: Mapping[str, Mapping[str, bytes]]
    entries: Mapping[str, Mapping[str, bytes]]
    invalid: frozenset[str]  # components whose grant file is invalid


_EMPTY = _Snapshot({}, ScopeSet(), {}, {}, frozenset())


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
        """The validated entry (a fresh builtins dict) if the component's grant enables `capability`."""
        raw = self.snapshot.entries.get(component_id, {}).get(capability)
        return None if raw is None else dict(msgspec.msgpack.decode(raw))

    def _layout_stamp(self) -> tuple[object, ...]:
        stamps: list[object] = []
        for path in (self.ws.docker, self.ws.work_areas):
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
        for state in self._states.values():
            if state.component_id is None:
                continue
            if not state.usable:
                invalid.add(state.component_id)
                continue
            for cap, entry in state.entries.items():
                if entry.get("enabled") is True:
                    entries.setdefault(state.component_id, {})[cap] = msgspec.msgpack.encode(entry)
                    grants.setdefault(state.component_id, {})[cap] = msgspec.msgpack.encode(state.grants[cap])
        return _Snapshot(plugins, scopes, grants, entries, frozenset(invalid))

    async def watch(
        self, *, interval: float, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Poll for changes every `interval` seconds until cancelled."""
        task_status.started()
        while True:
            await anyio.sleep(interval)
            try:
                await anyio.to_thread.run_sync(self.refresh)
            except Exception as exc:  # a bug here must not stop revocations for good: keep polling
                log.error("grant refresh failed: %s: %s", type(exc).__name__, exc)


# --- decisions ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """An allowed request: the handler to run, the grant it runs under, the Pack's protected paths."""

    plugin: HandlerPlugin
    grant: dict[str, Any]
    protected: ProtectedSet | None = None


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
        `pack_id` → enabled grant entry.
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
        grant = snap.grants.get(component_id, {}).get(capability)
        if grant is None:
            hint = " (its grant file is invalid: see `rumi grants`)" if component_id in snap.invalid else ""
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
        return Decision(plugin, dict(msgspec.msgpack.decode(grant)), protected)


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
