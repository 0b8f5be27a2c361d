"""Handler plugins: load `docker/handlers/<name>.py` files, check their shape, reload them when they change.

A handler file is trusted code (the admin installed it), but a malformed one must not take the broker
down: each file is loaded on its own, and a file that fails to import or has the wrong shape is refused
with a one-line `PluginError` while the others load.

Shape (docs/handlers.md; handler files import only `broker.handler_api`)::

    META = {"requires_scope": bool, "supports_modes": ["sandbox", ...], "description": str,
            "grant_schema": <msgspec.Struct subclass with `enabled: bool = False`>,   # optional
            "args_schema": <msgspec.Struct subclass>,                                  # optional
            "target": "<arg name>" or callable(raw_args) -> str,                       # optional
            "continuation": callable(raw_args) -> bool,                                # optional
            "opens_session": callable(raw_args) -> bool,                               # optional
            "side_effect_free": bool}                                                  # optional
    def execute(ctx: HandlerContext, args) -> dict: ...      # or async def
    def authorize(grant: Mapping[str, Any], args) -> None     # optional, pure: raise Denied
    def shutdown() -> None                                    # optional (or async): end open sessions

`execute` and `authorize` get what the service validated: an `args_schema` instance, or the request's
dict without one. `target` and `continuation` get the request's args as sent (a dict).
"""

from __future__ import annotations

import errno
import functools
import inspect
import itertools
import os
import re
import stat
import sys
import threading
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from broker.core.errors import InvalidRequest, PluginError

__all__ = [
    "HANDLER_NAME_RE",
    "DefaultGrant",
    "DirectoryChanges",
    "HandlerPlugin",
    "HandlerRegistry",
    "WatchedDirectory",
    "display_path",
    "load_handler_source",
    "load_handlers",
]

HANDLER_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_HANDLER_BYTES = 1024 * 1024
_META_KEYS = (
    "requires_scope",
    "supports_modes",
    "description",
    "grant_schema",
    "args_schema",
    "target",
    "continuation",
    "side_effect_free",
    "opens_session",
)
# Unique module names: a reloaded plugin never replaces the module an in-flight request still uses.
_module_counter = itertools.count(1)


class DefaultGrant(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Grant entry of a handler without its own `grant_schema`: it can only be switched on."""

    enabled: bool = False


@dataclass(frozen=True)
class HandlerPlugin:
    """One loaded, checked handler file."""

    name: str
    requires_scope: bool
    supports_modes: tuple[str, ...]
    description: str
    grant_schema: type[msgspec.Struct]
    args_schema: type[msgspec.Struct] | None
    target: Callable[[dict[str, Any]], str]
    execute: Callable[..., Any]
    is_async: bool
    path: Path
    # callable(args) -> bool: the request continues a session opened by an audited request
    continuation: Callable[[dict[str, Any]], bool] | None = None
    # authorize(grant, args): pure argument check before the decision is recorded; raises Denied
    authorize: Callable[[Mapping[str, Any], Any], None] | None = None
    # shutdown(): called once when the broker stops, to end the handler's open sessions
    shutdown: Callable[[], Any] | None = None
    # True: the handler changes nothing (a read): one audit event after it ran, before data is released
    side_effect_free: bool = False
    # callable(raw_args) -> bool: the request opens a session whose outcome is written when it ends
    opens_session: Callable[[dict[str, Any]], bool] | None = None

    def convert_args(self, args: Mapping[str, Any]) -> Any:
        """The request's args as the handler takes them: validated into `args_schema`, or a plain dict.

        Raises InvalidRequest (with msgspec's message, which names the field) when they do not fit.
        """
        if self.args_schema is None:
            return dict(args)
        try:
            return msgspec.convert(dict(args), self.args_schema)
        except msgspec.ValidationError as exc:
            raise InvalidRequest(f"invalid arguments: {exc}") from None


def display_path(path: Path) -> str:
    """`path` relative to the current directory when it is below it (shorter errors), else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# --- change detection shared by handlers, scopes and grants ------------------------------------------


# (mtime_ns, ctime_ns, size, inode): a tuple, compared on every poll of every file.
_Stamp = tuple[int, int, int, int]


@dataclass
class DirectoryChanges:
    """What `WatchedDirectory.scan` found: new or changed files (content or read error) and removed files."""

    updated: dict[Path, bytes | OSError] = field(default_factory=dict)
    removed: list[Path] = field(default_factory=list)
    listing_error: OSError | None = None

    @property
    def changed(self) -> bool:
        return bool(self.updated or self.removed)


class WatchedDirectory:
    """The files ending in `suffix` in one directory, and what changed since the last scan.

    A file counts as changed when its (mtime_ns, ctime_ns, size, inode) differs. A file modified in the
    last two seconds is also re-read and compared byte for byte, because two writes within one
    filesystem timestamp tick can leave the same stamp ("racy git").
    """

    RACY_NS = 2_000_000_000

    def __init__(self, directory: Path, suffix: str, *, max_bytes: int) -> None:
        self.directory = directory
        self.suffix = suffix
        self.max_bytes = max_bytes
        self._stamps: dict[str, _Stamp] = {}
        self._contents: dict[str, bytes | None] = {}

    def scan(self) -> DirectoryChanges:
        """Look at the directory once; report and remember what changed."""
        changes = DirectoryChanges()
        seen: set[str] = set()
        now = time.time_ns()
        try:
            with os.scandir(self.directory) as it:
                entries = [e for e in it if e.name.endswith(self.suffix) and not e.name.startswith(".")]
        except (FileNotFoundError, NotADirectoryError):
            entries = []
        except OSError as exc:
            entries = []
            changes.listing_error = exc
        for entry in entries:
            name = entry.name
            try:
                st = entry.stat()
            except OSError:
                continue  # vanished between listing and stat: it is removed
            if not stat.S_ISREG(st.st_mode):
                continue
            seen.add(name)
            stamp = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
            known = self._stamps.get(name)
            if known == stamp and now - st.st_mtime_ns >= self.RACY_NS and name in self._contents:
                continue
            path = self.directory / name
            content = self._read(path)
            previous = self._contents.get(name, b"\0missing")
            self._stamps[name] = stamp
            if isinstance(content, bytes):
                self._contents[name] = content
                if content != previous:
                    changes.updated[path] = content
            else:
                self._contents[name] = None
                # A read error is reported again only when the file's stamp changes.
                if known != stamp or previous is not None:
                    changes.updated[path] = content
        for name in list(self._stamps):
            if name not in seen:
                del self._stamps[name]
                self._contents.pop(name, None)
                changes.removed.append(self.directory / name)
        return changes

    def _read(self, path: Path) -> bytes | OSError:
        try:
            with open(path, "rb") as f:
                data = f.read(self.max_bytes + 1)
        except OSError as exc:
            return exc
        if len(data) > self.max_bytes:
            return OSError(errno.EFBIG, f"file is larger than {self.max_bytes} bytes")
        return data


# --- loading one handler ------------------------------------------------------------------------------


def _arg_target(name: str, args: dict[str, Any]) -> str:
    return str(args.get(name, ""))


def _callable_target(fn: Callable[[dict[str, Any]], object], args: dict[str, Any]) -> str:
    return str(fn(args))


def _no_target(args: dict[str, Any]) -> str:
    return ""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _check_struct(shown: str, key: str, value: object) -> type[msgspec.Struct]:
    if not (isinstance(value, type) and issubclass(value, msgspec.Struct)):
        raise PluginError(f"{shown}: META[{key!r}] must be a msgspec.Struct subclass")
    config = value.__struct_config__
    if config.array_like or config.tag is not None:
        raise PluginError(f"{shown}: META[{key!r}] must be a plain object Struct (no array_like, no tag)")
    try:
        msgspec.structs.fields(value)  # resolves annotations now, not on the first request
    except Exception as exc:
        problem = _one_line(str(exc))
        raise PluginError(f"{shown}: META[{key!r}] has unresolvable field types ({problem})") from None
    return value


def _check_grant_schema(shown: str, value: object) -> type[msgspec.Struct]:
    schema = _check_struct(shown, "grant_schema", value)
    enabled = [f for f in msgspec.structs.fields(schema) if f.encode_name == "enabled"]
    if (
        not enabled
        or enabled[0].type is not bool
        or enabled[0].default not in (False, msgspec.NODEFAULT)
        or enabled[0].default_factory is not msgspec.NODEFAULT
    ):
        raise PluginError(f"{shown}: META['grant_schema'] must have a field `enabled: bool = False`")
    return schema


def _takes_two_positional(fn: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required_kw = [p for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    return len(positional) == 2 and not required_kw and not any(p.kind is p.VAR_POSITIONAL for p in params)


def _check_execute(shown: str, value: object) -> tuple[Callable[..., Any], bool]:
    if not callable(value):
        raise PluginError(f"{shown}: execute must be a function execute(context, args)")
    try:
        sig = inspect.signature(value)
    except (TypeError, ValueError):
        raise PluginError(f"{shown}: execute has no inspectable signature") from None
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    bad = [
        p for p in params if p.kind is p.VAR_POSITIONAL or (p.kind is p.KEYWORD_ONLY and p.default is p.empty)
    ]
    if len(positional) != 2 or bad:
        raise PluginError(f"{shown}: execute must take exactly two positional parameters (context, args)")
    is_async = inspect.iscoroutinefunction(value) or inspect.iscoroutinefunction(
        getattr(value, "__call__", None)  # noqa: B004 -- an async __call__ on an object
    )
    return value, is_async


def _plugin_from_module(name: str, path: Path, module: types.ModuleType) -> HandlerPlugin:
    shown = display_path(path)
    meta = getattr(module, "META", None)
    if not isinstance(meta, dict):
        raise PluginError(f"{shown}: META must be a dict (see docs/handlers.md)")
    unknown = sorted(str(k) for k in meta if k not in _META_KEYS)
    if unknown:
        known = ", ".join(_META_KEYS)
        raise PluginError(f"{shown}: META has unknown key(s) {', '.join(unknown)} (known: {known})")
    if "requires_scope" not in meta or type(meta["requires_scope"]) is not bool:
        raise PluginError(f"{shown}: META['requires_scope'] must be a bool")
    modes = meta.get("supports_modes")
    if not isinstance(modes, list | tuple) or not modes or not all(isinstance(m, str) and m for m in modes):
        raise PluginError(f"{shown}: META['supports_modes'] must be a non-empty list of str")
    description = meta.get("description")
    if not isinstance(description, str):
        raise PluginError(f"{shown}: META['description'] must be a str")
    grant_schema: type[msgspec.Struct] = DefaultGrant
    if "grant_schema" in meta:
        grant_schema = _check_grant_schema(shown, meta["grant_schema"])
    args_schema = None
    if "args_schema" in meta:
        args_schema = _check_struct(shown, "args_schema", meta["args_schema"])
    raw_target = meta.get("target")
    target: Callable[[dict[str, Any]], str]
    if raw_target is None:
        target = _no_target
    elif isinstance(raw_target, str) and raw_target:
        target = functools.partial(_arg_target, raw_target)
    elif callable(raw_target):
        target = functools.partial(_callable_target, raw_target)
    else:
        raise PluginError(f"{shown}: META['target'] must be an argument name (str) or callable(args) -> str")
    continuation = meta.get("continuation")
    if continuation is not None and not callable(continuation):
        raise PluginError(f"{shown}: META['continuation'] must be callable(args) -> bool")
    opens_session = meta.get("opens_session")
    if opens_session is not None and not callable(opens_session):
        raise PluginError(f"{shown}: META['opens_session'] must be callable(args) -> bool")
    side_effect_free = meta.get("side_effect_free", False)
    if type(side_effect_free) is not bool:
        raise PluginError(f"{shown}: META['side_effect_free'] must be a bool")
    execute, is_async = _check_execute(shown, getattr(module, "execute", None))
    authorize = getattr(module, "authorize", None)
    if authorize is not None and not _takes_two_positional(authorize):
        raise PluginError(f"{shown}: authorize must be a function authorize(grant, args)")
    if authorize is not None and inspect.iscoroutinefunction(authorize):
        raise PluginError(f"{shown}: authorize must be a plain (not async) function: it is a pure check")
    shutdown = getattr(module, "shutdown", None)
    if shutdown is not None and not callable(shutdown):
        raise PluginError(f"{shown}: shutdown must be a function shutdown() (sync or async)")
    return HandlerPlugin(
        name=name,
        requires_scope=meta["requires_scope"],
        supports_modes=tuple(modes),
        description=description,
        grant_schema=grant_schema,
        args_schema=args_schema,
        target=target,
        execute=execute,
        is_async=is_async,
        path=path,
        continuation=continuation,
        authorize=authorize,
        shutdown=shutdown,
        side_effect_free=side_effect_free,
        opens_session=opens_session,
    )


def load_handler_source(path: Path, source: bytes) -> HandlerPlugin:
    """Run one handler file's `source` as a fresh module and check its shape; raise a one-line PluginError."""
    shown = display_path(path)
    name = path.stem
    if not HANDLER_NAME_RE.match(name):
        raise PluginError(f"{shown}: handler name {name!r} must match {HANDLER_NAME_RE.pattern}")
    module_name = f"_rumi_handler_{name}_{next(_module_counter)}"
    module = types.ModuleType(module_name)
    module.__file__ = str(path)
    try:
        # Compiled from the bytes we stamped, never from a .pyc: a same-second edit must not run stale code.
        code = compile(source, str(path), "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise PluginError(f"{shown}: syntax error at line {exc.lineno}: {exc.msg}") from None
    except ValueError as exc:
        raise PluginError(f"{shown}: cannot compile ({_one_line(str(exc))})") from None
    # msgspec and dataclasses resolve a plugin's annotations through sys.modules.
    sys.modules[module_name] = module
    try:
        exec(code, module.__dict__)  # noqa: S102 -- handlers are admin-installed, trusted code
        return _plugin_from_module(name, path, module)
    except PluginError:
        sys.modules.pop(module_name, None)
        raise
    except (Exception, SystemExit) as exc:
        sys.modules.pop(module_name, None)
        raise PluginError(f"{shown}: import failed: {type(exc).__name__}: {_one_line(str(exc))}") from None


def _missing_directory_error(directory: Path) -> PluginError:
    return PluginError(f"{display_path(directory)}: handler directory not found (run `rumi init`)")


def _is_candidate(path: Path) -> bool:
    # Files starting with "_" are private helpers of the admin, not handlers.
    return not path.name.startswith("_")


def load_handlers(directory: Path) -> tuple[dict[str, HandlerPlugin], list[PluginError]]:
    """Load every `*.py` handler in `directory`; a malformed file is refused and reported, the rest load."""
    plugins: dict[str, HandlerPlugin] = {}
    errors: list[PluginError] = []
    if not directory.is_dir():
        return plugins, [_missing_directory_error(directory)]
    changes = WatchedDirectory(directory, ".py", max_bytes=MAX_HANDLER_BYTES).scan()
    if changes.listing_error is not None:
        reason = changes.listing_error.strerror
        errors.append(PluginError(f"{display_path(directory)}: cannot list ({reason})"))
    for path in sorted(changes.updated):
        if not _is_candidate(path):
            continue
        content = changes.updated[path]
        try:
            if isinstance(content, OSError):
                raise PluginError(f"{display_path(path)}: cannot read ({content.strerror})")
            plugins[path.stem] = load_handler_source(path, content)
        except PluginError as exc:
            errors.append(exc)
    return plugins, errors


class HandlerRegistry:
    """The handlers of one directory; `reload_if_changed()` re-runs only the files that changed."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._watch = WatchedDirectory(directory, ".py", max_bytes=MAX_HANDLER_BYTES)
        self._plugins: dict[str, HandlerPlugin] = {}
        self._file_errors: dict[Path, PluginError] = {}
        self._dir_error: PluginError | None = None
        self._lock = threading.Lock()
        self.generation = 0  # bumped on every change, so dependants know to re-check
        self.reload_if_changed()

    @property
    def plugins(self) -> Mapping[str, HandlerPlugin]:
        """Name → plugin (a snapshot: replaced, never mutated, on reload)."""
        return self._plugins

    @property
    def errors(self) -> list[PluginError]:
        """Files refused at the last load, one error each."""
        errs = [self._file_errors[p] for p in sorted(self._file_errors)]
        return [self._dir_error, *errs] if self._dir_error else errs

    def get(self, name: str) -> HandlerPlugin | None:
        """The loaded plugin named `name`, or None."""
        return self._plugins.get(name)

    def error_for(self, name: str) -> PluginError | None:
        """Why the handler file named `name` was refused, if it was."""
        for path, error in self._file_errors.items():
            if path.stem == name:
                return error
        return None

    def names(self) -> list[str]:
        """Sorted names of the loaded plugins."""
        return sorted(self._plugins)

    def reload_if_changed(self) -> bool:
        """Re-load handler files whose stamp or content changed; return True if anything changed."""
        with self._lock:
            changes = self._watch.scan()
            dir_error: PluginError | None = None
            if changes.listing_error is not None:
                dir_error = PluginError(
                    f"{display_path(self.directory)}: cannot list ({changes.listing_error.strerror})"
                )
            elif not self.directory.is_dir():
                dir_error = _missing_directory_error(self.directory)
            changed = changes.changed or (dir_error is None) != (self._dir_error is None)
            self._dir_error = dir_error
            if not changes.changed:
                if changed:
                    self.generation += 1
                return changed
            plugins = dict(self._plugins)
            for path in changes.removed:
                self._file_errors.pop(path, None)
                if plugins.get(path.stem) is not None and plugins[path.stem].path == path:
                    del plugins[path.stem]
            for path, content in changes.updated.items():
                if not _is_candidate(path):
                    continue
                # A changed file that no longer loads is dropped: deny is the default.
                plugins.pop(path.stem, None)
                self._file_errors.pop(path, None)
                try:
                    if isinstance(content, OSError):
                        raise PluginError(f"{display_path(path)}: cannot read ({content.strerror})")
                    plugins[path.stem] = load_handler_source(path, content)
                except PluginError as exc:
                    self._file_errors[path] = exc
            self._plugins = plugins
            self.generation += 1
            return True
