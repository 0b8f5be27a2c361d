"""The workspace paths no grant may reach, compared by device and inode of what really exists.

`ProtectedSet` is shared by the policy (refusing a grant that overlaps protected state at load) and
the back-ends (refusing, per request, an object that is or lies beneath a protected path). Stdlib only.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Generator, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from broker.core.errors import Denied

if TYPE_CHECKING:
    from broker.core.workspace import Workspace

__all__ = ["FileIdentity", "ProtectedSet", "file_identity"]

_MAX_DEPTH = 4096  # bound on walking up parent directories

FileIdentity = tuple[int, int]
"""(st_dev, st_ino) of a file system object."""


def file_identity(st: os.stat_result) -> FileIdentity:
    """(st_dev, st_ino) of a stat result."""
    return (st.st_dev, st.st_ino)


def _is_prefix(short: tuple[str, ...], long: tuple[str, ...]) -> bool:
    return len(short) <= len(long) and long[: len(short)] == short


class ProtectedSet:
    """Paths no grant may reach, compared by (st_dev, st_ino) of what really exists.

    Identities are taken again on every check (a handful of stat calls) so a protected
    directory created or replaced after the broker started is still covered.
    """

    def __init__(
        self,
        paths: Iterable[str | os.PathLike[str]] = (),
        *,
        source: Callable[[], Iterable[str | os.PathLike[str]]] | None = None,
    ) -> None:
        self._fixed = tuple(Path(os.path.abspath(p)) for p in paths)
        self._source = source

    @classmethod
    def for_pack(
        cls, ws: Workspace, pack_id: str | None, extra: Iterable[str | os.PathLike[str]] = ()
    ) -> ProtectedSet:
        """One Pack's set: `ws.protected_paths(pack_id)` (listed again on each check) plus `extra`."""
        return cls(extra, source=lambda: ws.protected_paths(pack_id))

    def paths(self) -> list[Path]:
        """The protected paths as configured (absolute, not resolved)."""
        return [Path(p) for p in self._path_strings()]

    def _path_strings(self) -> list[str]:
        listed = [os.fspath(p) for p in self._fixed]
        if self._source is not None:
            listed.extend(os.path.abspath(p) for p in self._source())
        return listed

    def _snapshot(self) -> tuple[set[FileIdentity], set[tuple[FileIdentity, str]]]:
        """Identities of existing protected objects, and (parent identity, name) of every protected entry."""
        ids: set[FileIdentity] = set()
        entries: set[tuple[FileIdentity, str]] = set()
        parents: dict[str, FileIdentity | None] = {}
        for path in self._path_strings():
            for follow in (True, False):
                try:
                    ids.add(file_identity(os.stat(path, follow_symlinks=follow)))
                except OSError:
                    pass
            parent, name = os.path.split(path)
            if parent not in parents:
                try:
                    parents[parent] = file_identity(os.stat(parent))
                except OSError:
                    parents[parent] = None
            parent_id = parents[parent]
            if parent_id is not None:
                # Lets a write refuse to create a protected name that does not exist yet.
                entries.add((parent_id, name))
        return ids, entries

    def identities(self) -> set[FileIdentity]:
        """(st_dev, st_ino) of every protected path that exists now."""
        return self._snapshot()[0]

    def check_fd(
        self,
        fd: int,
        stop_at: FileIdentity | None = None,
        *,
        parent_fd: int | None = None,
        name: str | None = None,
    ) -> None:
        """Raise Denied if the object behind `fd`, or any directory above it, is protected.

        A directory fd is walked up through ".."; for a non-directory pass the directory it was
        opened in as `parent_fd` (and its `name`, to refuse protected names). The walk ends
        after checking `stop_at` or at "/" when `stop_at` is None (the default, which also
        catches a grant that lies inside a protected directory).
        """
        ids, entries = self._snapshot()
        st = os.fstat(fd)
        if file_identity(st) in ids:
            raise Denied("path is protected")
        start = parent_fd
        if start is None:
            if not stat.S_ISDIR(st.st_mode):
                raise Denied("cannot check a file without its directory")
            start = fd
        elif name is not None and (file_identity(os.fstat(start)), name) in entries:
            raise Denied("path is protected")
        self._walk_up(start, stop_at, ids)

    def check_entry(self, parent_fd: int, name: str, stop_at: FileIdentity | None = None) -> None:
        """Raise Denied if creating `name` in directory `parent_fd` would touch a protected path."""
        ids, entries = self._snapshot()
        if (file_identity(os.fstat(parent_fd)), name) in entries:
            raise Denied("path is protected")
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            if file_identity(st) in ids:
                raise Denied("path is protected")
        self._walk_up(parent_fd, stop_at, ids)

    @staticmethod
    def _walk_up(dir_fd: int, stop_at: FileIdentity | None, ids: set[FileIdentity]) -> None:
        with contextlib.closing(_ancestors(dir_fd)) as walk:
            for ident in walk:
                if ident in ids:
                    raise Denied("path is protected")
                if ident == stop_at:
                    return

    def overlaps(self, path: str | os.PathLike[str]) -> bool:
        """True if `path` is, contains or lies inside a protected path (for refusing grants at load).

        Compared by path components (as given and fully resolved) and by device/inode.
        """
        given = Path(os.path.abspath(path))
        candidates = {given.parts, given.resolve().parts}
        protected = self.paths()
        for p in protected:
            for pp in {p.parts, p.resolve().parts}:
                for c in candidates:
                    if _is_prefix(pp, c) or _is_prefix(c, pp):
                        return True
        ids = self.identities()
        # `path` or one of its ancestors is protected.
        if ids and _any_ancestor(given, lambda ident: ident in ids):
            return True
        # A protected path lies under `path`.
        try:
            target = file_identity(os.stat(given))
        except OSError:
            return False
        return any(_any_ancestor(p, lambda ident: ident == target) for p in protected)


def _ancestors(dir_fd: int) -> Generator[FileIdentity, None, None]:
    """Identities of directory `dir_fd` and each real parent up to "/" (bounded)."""
    cur = os.dup(dir_fd)
    try:
        prev: FileIdentity | None = None
        for _ in range(_MAX_DEPTH):
            ident = file_identity(os.fstat(cur))
            if ident == prev:
                return  # ".." of "/" is "/" itself
            yield ident
            prev = ident
            parent = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=cur)
            os.close(cur)
            cur = parent
        raise Denied("directory tree is too deep")
    finally:
        os.close(cur)


def _any_ancestor(path: Path, pred: Callable[[FileIdentity], bool]) -> bool:
    """Whether `pred` holds for `path` (if it exists) or any real directory above it."""
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None:
        if pred(file_identity(st)):
            return True
        start = path if stat.S_ISDIR(st.st_mode) else path.parent
    else:
        start = path.parent
    while True:
        try:
            fd = os.open(start, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            if start == start.parent:
                return False
            start = start.parent
            continue
        try:
            with contextlib.closing(_ancestors(fd)) as walk:
                return any(pred(ident) for ident in walk)
        finally:
            os.close(fd)
