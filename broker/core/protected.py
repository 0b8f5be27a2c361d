"""The workspace paths no grant may reach, compared by device and inode of what really exists.

`ProtectedSet` is shared by the policy (refusing a grant that overlaps protected state at load) and
the back-ends (refusing, per request, an object that is or lies beneath a protected path, or that is
a hard link to a protected file). Stdlib (and ctypes) only.

Pseudo file systems (end of this module) are the other thing no grant may reach: `proc`, `sysfs`,
`devtmpfs`, `devpts`, `cgroup` and the like hold kernel state, not files (`/proc/self/environ` is the
broker's environment). They are told by type, not by path: the statfs(2) f_type magic number
(`fs_type`, through ctypes: Python has no os.statfs), and for devtmpfs, which reports tmpfs, its
device number in /proc/self/mountinfo (re-read when the mount table changes). The policy refuses a
grant directory on or above one at load (`pseudo_fs_of_path`, `pseudo_mounts_within`); the file
back-end checks each opened file's descriptor with one fstatfs (`refuse_pseudo_fs`).

What a check compares against: `ProtectedIndex`
-----------------------------------------------
One index per workspace (the broker's `GrantStore` owns it; its watcher refreshes it every poll) holds
(st_dev, st_ino) in dicts, so every lookup is O(1):

- **top level**: each protected path (`Workspace.protected_paths`: `docker/.rumi`, grants, handlers,
  scopes, config, `ecosystem/`, the Packs' work areas, ...), followed and not followed, and the
  (parent identity, name) of each, so a write cannot create a protected name that does not exist yet;
- **beneath**: every entry under `docker/.rumi`, grants, handlers and scopes, recursively, and the
  entries directly under the other protected directories (two levels for `ecosystem/` and
  `docker/packs/`), at most `MAX_ENTRIES` in all (the workspace's own state first; a warning is logged
  when the cap cuts the index). A hard link to a protected file has the protected file's identity, so
  `contains()` finds it wherever the link is.

Entries carry a tag saying for whom they are protected: a Pack's own work area is protected for every
other Pack (and the sandboxes' root for the broker's own view only), so one index serves every Pack.

Why it is exact (what changed is seen by the very next check)
-------------------------------------------------------------
A check does not re-stat the protected paths. It re-stats only the directories that hold them
(`docker/`, the workspace root, `docker/sandbox/`: three `stat` calls) and compares (dev, ino,
mtime_ns, ctime_ns) with what they were when the top level was built. Every way the identity behind a
protected *path* can change shows up there or in the two other things a check looks at:

- a protected name created, removed, or replaced by rename (`mv new docker/.rumi`) changes the mtime
  and ctime of the directory holding it; a new Pack work area changes `docker/sandbox/`. ctime cannot
  be set back by `utime`;
- a directory above them replaced or re-pointed (a symlink in the path) changes the identity that
  `stat` of the holding directory resolves to;
- a protected path that is itself a symlink is also re-stat'ed (followed) on every check;
- a mount or unmount anywhere is seen through poll() on `/proc/self/mountinfo`.

On any difference the top level is rebuilt before the check goes on (under a lock; a concurrent check
re-validates after taking it, so no check uses a build older than its own start). A check therefore
sees the protected set as it was at the moment it read the stamps, which is what the old per-request
re-stat gave: a rename racing with a check is ordered before or after it, never half-seen.

Timestamps have a granularity (one clock tick, or one second on some file systems), so a change in the
same tick as the build could leave an identical stamp ("racy git"). A build whose stamps are younger
than `_SETTLE_NS` (2 s) is therefore never trusted: every check rebuilds until the directories have
been quiet that long. Without a watcher (a `ProtectedSet` on its own) an index older than
`_STALE_AFTER` is refreshed in full by the next check.

The entries *beneath* the protected directories are kept by the watcher: each refresh re-stats the
protected paths and every directory of those trees (about 130 stats for 20 Packs, ~1.3 ms) and
re-lists only the directories whose stamp changed (or is younger than `_SETTLE_NS`). A rebuild of the
top level that finds a different top level re-lists them at once, so a replaced `docker/.rumi` is
indexed with its contents before it is used; a new file inside an unchanged protected directory is
in the index within one poll interval. Additions are applied before removals, so an entry renamed
within the trees never drops out, not even briefly. These entries serve the hard-link rule (an object
whose identity is in the index is refused wherever it is linked, for reading and for writing over it:
`check_fd`, `check_entry`; `ProtectedSet.contains` is the O(1) lookup) and catch a bind mount of a
protected directory; everything else is decided by the top level, which is exact.

The walk up, and the grant root's ancestors
-------------------------------------------
An object is refused if it, or any real directory above it (walked through ".."), is protected. A
request now walks only from the object up to its grant root (usually zero or a few levels: the
object was opened beneath that root with openat2(RESOLVE_BENEATH)); the root's own chain up to "/"
is computed once and cached per root identity (keyed by its (dev, ino, ctime) and by the index's
generation and epoch). The cache is dropped when the index changes, when a mount changes, and on
every refresh of the watcher (at most one poll interval: `_STALE_AFTER` without a watcher); the root
itself being moved, or another directory taking its place (another inode, or a new ctime), misses the
cache at once. What the cache cannot see in between is a directory strictly *above* a grant root being
moved under a protected directory while the grant's path is re-pointed by a symlink to follow it (a
mount instead drops the cache at once). That needs write access above a grant root and to protected state: a Pack has neither (it
acts only beneath its grant roots, and grants never contain protected paths), so only the host's
administrator can do it, and it is then seen within one poll interval. If the walk from the object
never meets the grant root (a directory moved out of the grant meanwhile) it goes on to "/" and
checks every step, as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import re
import select
import stat
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.core.errors import Denied

if TYPE_CHECKING:
    from broker.core.workspace import Workspace

__all__ = [
    "MAX_ENTRIES",
    "PSEUDO_FS_MAGIC",
    "PSEUDO_FS_TYPES",
    "FileIdentity",
    "ProtectedIndex",
    "ProtectedSet",
    "file_identity",
    "fs_type",
    "pseudo_fs_of_fd",
    "pseudo_fs_of_path",
    "pseudo_mounts_within",
    "refuse_pseudo_fs",
]

log = logging.getLogger("rumi.protected")

_MAX_DEPTH = 4096  # bound on walking up parent directories
MAX_ENTRIES = 100_000
"""Default cap on the entries indexed beneath the protected directories."""
_DEEP = 64  # levels indexed below docker/.rumi, grants, handlers, scopes (bounded by the entry cap)
_SETTLE_NS = 2_000_000_000  # a stamp younger than this may share its timestamp tick with a later change
_STALE_AFTER = 1.0  # seconds: without a watcher, a check refreshes an index older than this
_MAX_CHAINS = 4096  # cached grant-root chains per ProtectedSet

FileIdentity = tuple[int, int]
"""(st_dev, st_ino) of a file system object."""

_Stamp = tuple[int, int, int, int]  # (st_dev, st_ino, st_mtime_ns, st_ctime_ns) of a directory

# Tags: for whom an entry is protected. Any other tag is a pack id: protected for every view but its own.
_ALL = ""  # every view
_ADMIN = "*"  # only the view without a Pack (the Packs' sandboxes root)


def file_identity(st: os.stat_result) -> FileIdentity:
    """(st_dev, st_ino) of a stat result."""
    return (st.st_dev, st.st_ino)


def _is_prefix(short: tuple[str, ...], long: tuple[str, ...]) -> bool:
    return len(short) <= len(long) and long[: len(short)] == short


def _visible(tag: str, view: str | None) -> bool:
    """Whether an entry tagged `tag` is protected for `view` (a pack id; None: the broker's own view)."""
    return view is None or tag == _ALL or (tag != view and tag != _ADMIN)


def _merge(a: str, b: str) -> str:
    """The tag of an identity reached under both tags (protected wherever either protects it)."""
    if a == b or b == _ADMIN:
        return a
    if a == _ADMIN:
        return b
    return _ALL


def _merge_all(tags: Iterable[str]) -> str:
    return functools.reduce(_merge, tags)


def _dir_stamp(path: str) -> _Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def _identity_or_none(path: str) -> FileIdentity | None:
    try:
        return file_identity(os.stat(path))
    except OSError:
        return None


def _settled(ctime_ns: int, now_ns: int) -> bool:
    """True when a change after `now_ns` cannot leave the same ctime (it is older than any tick)."""
    return now_ns - ctime_ns > _SETTLE_NS


class _MountWatch:
    """Counts changes of this process's mount table: poll() on /proc/self/mountinfo (POLLPRI).

    Each open file reports the changes since its own last poll, so every thread polls a file of its
    own (no lock on the hot path) and a change seen by any thread bumps the shared count. A thread's
    first open bumps it too: a change made before that open is not reported on the new file.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._local = threading.local()
        self._available = True

    def _bump(self) -> int:
        with self._lock:
            self._count += 1
            return self._count

    def count(self) -> int:
        """A number that changes whenever a mount was added, removed or moved before this call."""
        poller: select.poll | None = getattr(self._local, "poller", None)
        if poller is None:
            if not self._available:
                return self._bump()  # unknown: every build is stale, checks re-read everything
            try:
                # Unbuffered file object: closed with the thread's locals when the thread ends.
                file = open("/proc/self/mountinfo", "rb", buffering=0)
            except OSError as exc:
                self._available = False
                log.warning(
                    "cannot watch the mount table (%s): protected paths are re-read on every check", exc
                )
                return self._bump()
            poller = select.poll()
            poller.register(file.fileno(), select.POLLPRI)
            self._local.file, self._local.poller = file, poller
            return self._bump()
        if poller.poll(0):
            return self._bump()
        return self._count


_mount_watch_lock = threading.Lock()
_mount_watch_instance: _MountWatch | None = None


def _mounts() -> _MountWatch:
    global _mount_watch_instance
    watch = _mount_watch_instance
    if watch is None:
        with _mount_watch_lock:
            if _mount_watch_instance is None:
                _mount_watch_instance = _MountWatch()
            watch = _mount_watch_instance
    return watch


@dataclass(frozen=True, slots=True)
class _Root:
    """A protected path, for whom it is protected, and how many levels below it are indexed."""

    path: str  # absolute, not resolved
    tag: str = _ALL
    depth: int = 1


@dataclass(slots=True)
class _Scan:
    """One listed directory beneath a protected path."""

    stamp: _Stamp
    settled: bool
    truncated: bool
    children: dict[str, tuple[FileIdentity, bool]]  # name -> (identity, is a directory)


@dataclass(frozen=True, slots=True)
class _State:
    """One build of the top level; `deep` is the index's live table of entries beneath it."""

    generation: int
    epoch: int
    roots: tuple[_Root, ...]
    top: Mapping[FileIdentity, str]
    entries: Mapping[tuple[FileIdentity, str], str]
    deep: Mapping[FileIdentity, str]
    stamps: tuple[tuple[str, _Stamp | None], ...]
    links: tuple[tuple[str, FileIdentity | None], ...]
    settled: bool
    mounts: int
    refreshed: float  # time.monotonic() of the last full refresh

    def protects(self, ident: FileIdentity, view: str | None) -> bool:
        tag = self.top.get(ident)
        if tag is not None and _visible(tag, view):
            return True
        tag = self.deep.get(ident)
        return tag is not None and _visible(tag, view)

    def refuses_name(self, parent: FileIdentity, name: str, view: str | None) -> bool:
        tag = self.entries.get((parent, name))
        return tag is not None and _visible(tag, view)


def _workspace_roots(ws: Workspace) -> list[_Root]:
    """`ws.protected_paths(None)` tagged: a Pack's work area is its own; the sandboxes root is the broker's."""
    sandboxes = str(ws.work_areas)
    deep = {str(ws.state), str(ws.grants), str(ws.handlers), str(ws.scopes)}
    two = {str(ws.ecosystem), str(ws.packs)}
    first: list[_Root] = []
    rest: list[_Root] = []
    for listed in ws.protected_paths(None):
        path = str(listed)
        parent, name = os.path.split(path)
        if path == sandboxes:
            rest.append(_Root(path, _ADMIN, 0))  # its entries are roots of their own
        elif parent == sandboxes:
            rest.append(_Root(path, name, 1))
        elif path in deep:
            first.append(_Root(path, _ALL, _DEEP))
        else:
            rest.append(_Root(path, _ALL, 2 if path in two else 1))
    return first + rest  # the workspace's own state first: the entry cap never cuts it for a sandbox


class ProtectedIndex:
    """(st_dev, st_ino) of protected paths and of what lies beneath them; O(1) lookups.

    Built on first use; `refresh()` (the policy's watcher, every poll) keeps the entries beneath the
    protected directories current, and every check re-validates the top level through the stamps of
    the directories holding it (see the module docstring). Thread-safe.
    """

    def __init__(
        self,
        roots: Callable[[], Iterable[_Root]],
        *,
        listing_dirs: Iterable[str] = (),
        volatile: bool = False,
        max_entries: int = MAX_ENTRIES,
        workspace_root: Path | None = None,
    ) -> None:
        self._roots_of = roots
        self._listing_dirs = tuple(listing_dirs)  # directories whose entries decide the roots
        self._volatile = volatile  # roots come from a callable no stamp describes: list them per check
        self.max_entries = max_entries
        self.workspace_root = workspace_root
        self._lock = threading.Lock()
        self._state: _State | None = None
        self._generation = 0
        self._epoch = 0
        self._deep: dict[FileIdentity, str] = {}
        self._deep_tags: dict[FileIdentity, dict[str, int]] = {}  # identity -> tag -> times seen
        self._scans: dict[tuple[str, str], _Scan] = {}
        self._deep_entries = 0
        self._complete = True

    @classmethod
    def for_workspace(cls, ws: Workspace, *, max_entries: int = MAX_ENTRIES) -> ProtectedIndex:
        """The index of `ws.protected_paths()`, serving every Pack's view."""
        return cls(
            lambda: _workspace_roots(ws),
            listing_dirs=(str(ws.work_areas),),
            max_entries=max_entries,
            workspace_root=ws.root,
        )

    @classmethod
    def of_paths(
        cls,
        paths: Iterable[str | os.PathLike[str]] = (),
        source: Callable[[], Iterable[str | os.PathLike[str]]] | None = None,
        *,
        max_entries: int = MAX_ENTRIES,
    ) -> ProtectedIndex:
        """An index of fixed `paths` (and of `source()`, listed again on every check), protected for all."""
        fixed = tuple(os.path.abspath(p) for p in paths)

        def roots() -> list[_Root]:
            listed = [*fixed, *(os.path.abspath(p) for p in source())] if source is not None else fixed
            return [_Root(p) for p in listed]

        return cls(roots, volatile=source is not None, max_entries=max_entries)

    # -- lookups -------------------------------------------------------------------------------------

    def current(self) -> _State:
        """The index as it is now: validated by a few stats, rebuilt first if anything changed."""
        state = self._state
        if state is not None and self._valid(state):
            return state
        with self._lock:
            state = self._state
            if state is not None and self._valid(state):  # another check rebuilt it after we looked
                return state
            full = state is None or time.monotonic() - state.refreshed > _STALE_AFTER
            return self._rebuild(full=full)

    def contains(self, identity: FileIdentity) -> bool:
        """Whether `identity` is a protected path or lies in the index beneath one (for any Pack)."""
        state = self.current()
        return identity in state.top or identity in state.deep

    def paths(self, view: str | None = None) -> list[Path]:
        """The protected paths as configured for `view` (listed now; absolute, not resolved)."""
        return [Path(r.path) for r in self._roots_of() if _visible(r.tag, view)]

    @property
    def generation(self) -> int:
        """Changes whenever what the index holds changes."""
        return self._generation

    @property
    def complete(self) -> bool:
        """False while the entry cap keeps part of the protected trees out of the index."""
        return self._complete

    def __len__(self) -> int:
        state = self._state
        return self._deep_entries + (len(state.top) if state is not None else 0)

    # -- upkeep --------------------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Re-stat the protected paths, re-list changed directories beneath them; True if anything changed.

        The policy's watcher calls this every poll. Each call also drops the cached grant-root chains
        of every `ProtectedSet` using this index. Until the index was first used this does nothing.
        """
        if self._state is None:
            return False
        with self._lock:
            before = self._generation
            self._rebuild(full=True)
            return self._generation != before

    def _valid(self, state: _State) -> bool:
        if not state.settled or state.mounts != _mounts().count():
            return False
        if time.monotonic() - state.refreshed > _STALE_AFTER:
            return False
        if self._volatile and tuple(self._roots_of()) != state.roots:
            return False
        for path, stamp in state.stamps:
            if _dir_stamp(path) != stamp:
                return False
        return all(_identity_or_none(path) == ident for path, ident in state.links)

    def _stamp_dirs(self, roots: Iterable[_Root]) -> tuple[str, ...]:
        return tuple(sorted({os.path.dirname(r.path) for r in roots} | set(self._listing_dirs)))

    def _rebuild(self, *, full: bool) -> _State:
        """Rebuild the top level (and, if `full` or it changed, the entries beneath it). Holds the lock."""
        old = self._state
        mounts = _mounts().count()
        now_ns = time.time_ns()  # before the stamps: see _settled
        roots = old.roots if old is not None else tuple(self._roots_of())
        converged = False
        stamps: tuple[tuple[str, _Stamp | None], ...] = ()
        for _ in range(4):
            dirs = self._stamp_dirs(roots)
            # Stamps first, then the listing and the stats: a change in between shows as a new stamp.
            stamps = tuple((d, _dir_stamp(d)) for d in dirs)
            listed = tuple(self._roots_of())
            converged = set(self._stamp_dirs(listed)) <= set(dirs)
            roots = listed
            if converged:
                break
        parents = {d: (s[0], s[1]) for d, s in stamps if s is not None}
        top: dict[FileIdentity, str] = {}
        entries: dict[tuple[FileIdentity, str], str] = {}
        links: list[tuple[str, FileIdentity | None]] = []
        for root in roots:
            try:
                lst = os.stat(root.path, follow_symlinks=False)
            except OSError:
                lst = None
            if lst is not None:
                ident = file_identity(lst)
                top[ident] = _merge(top.get(ident, root.tag), root.tag)
                target = _identity_or_none(root.path) if stat.S_ISLNK(lst.st_mode) else ident
                if target is not None:
                    top[target] = _merge(top.get(target, root.tag), root.tag)
                if stat.S_ISLNK(lst.st_mode):
                    links.append((root.path, target))
            parent, name = os.path.split(root.path)
            parent_id = parents.get(parent)
            if parent_id is not None:
                # Lets a write refuse to create a protected name that does not exist yet.
                key = (parent_id, name)
                entries[key] = _merge(entries.get(key, root.tag), root.tag)
        settled = converged and all(s is None or _settled(s[3], now_ns) for _, s in stamps)
        top_changed = old is None or top != old.top or entries != old.entries or roots != old.roots
        deep_changed = False
        refreshed = old.refreshed if old is not None else 0.0
        if full or top_changed:
            deep_changed = self._refresh_deep(roots)
            refreshed = time.monotonic()
        if top_changed or deep_changed:
            self._generation += 1
        if full or old is None or mounts != old.mounts:
            self._epoch += 1  # a watcher tick or a mount change: cached grant-root chains are recomputed
        state = _State(
            generation=self._generation,
            epoch=self._epoch,
            roots=roots,
            top=top,
            entries=entries,
            deep=self._deep,
            stamps=stamps,
            links=tuple(links),
            settled=settled,
            mounts=mounts,
            refreshed=refreshed,
        )
        self._state = state
        return state

    def _refresh_deep(self, roots: Iterable[_Root]) -> bool:
        """Stat every directory beneath the roots, re-list the changed ones; True if an entry changed."""
        budget = self.max_entries
        seen: set[tuple[str, str]] = set()
        added: list[tuple[FileIdentity, str]] = []
        removed: list[tuple[FileIdentity, str]] = []
        truncated = False
        for root in roots:
            if root.depth < 1:
                continue
            stack: list[tuple[str, int, bool]] = [(root.path, root.depth, True)]
            while stack:
                path, depth, follow = stack.pop()
                key = (path, root.tag)
                if key in seen:
                    continue
                now_ns = time.time_ns()
                try:
                    st = os.stat(path, follow_symlinks=follow)
                except OSError:
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    continue
                seen.add(key)
                stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
                scan = self._scans.get(key)
                if (
                    scan is None
                    or scan.stamp != stamp
                    or not scan.settled
                    or scan.truncated
                    or len(scan.children) > budget
                ):
                    children, cut = _list_dir(path, budget)
                    before = scan.children if scan is not None else {}
                    for name, (ident, _) in children.items():
                        was = before.get(name)
                        if was is None or was[0] != ident:
                            added.append((ident, root.tag))
                            if was is not None:
                                removed.append((was[0], root.tag))
                    removed.extend((was[0], root.tag) for name, was in before.items() if name not in children)
                    scan = _Scan(stamp, _settled(st.st_ctime_ns, now_ns), cut, children)
                    self._scans[key] = scan
                budget -= len(scan.children)
                truncated = truncated or scan.truncated
                if depth > 1:
                    stack.extend(
                        (os.path.join(path, name), depth - 1, False)
                        for name, (_, is_dir) in scan.children.items()
                        if is_dir
                    )
        for key in [k for k in self._scans if k not in seen]:
            removed.extend((ident, key[1]) for ident, _ in self._scans.pop(key).children.values())
        # Additions first: an entry renamed within the trees never leaves the table, not even briefly.
        for ident, tag in added:
            self._add(ident, tag)
        for ident, tag in removed:
            self._remove(ident, tag)
        self._deep_entries = sum(len(s.children) for s in self._scans.values())
        if truncated and self._complete:
            log.warning(
                "protected-path index: more than %d entries beneath the protected directories; "
                "the rest are not indexed (a hard link to one of them is not recognised)",
                self.max_entries,
            )
        elif not truncated and not self._complete:
            log.info("protected-path index: complete again (%d entries)", self._deep_entries)
        self._complete = not truncated
        return bool(added or removed)

    def _add(self, ident: FileIdentity, tag: str) -> None:
        tags = self._deep_tags.setdefault(ident, {})
        tags[tag] = tags.get(tag, 0) + 1
        self._deep[ident] = _merge_all(tags)

    def _remove(self, ident: FileIdentity, tag: str) -> None:
        tags = self._deep_tags.get(ident)
        if tags is None:
            return
        left = tags.get(tag, 0) - 1
        if left > 0:
            tags[tag] = left
        else:
            tags.pop(tag, None)
        if tags:
            self._deep[ident] = _merge_all(tags)
        else:
            del self._deep_tags[ident]
            self._deep.pop(ident, None)


def _list_dir(path: str, budget: int) -> tuple[dict[str, tuple[FileIdentity, bool]], bool]:
    """The entries of directory `path` (lstat'ed), at most `budget`; True when some were left out."""
    children: dict[str, tuple[FileIdentity, bool]] = {}
    try:
        with os.scandir(path) as it:
            for entry in it:
                if len(children) >= budget:
                    return children, True
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                children[entry.name] = (file_identity(st), stat.S_ISDIR(st.st_mode))
    except OSError:
        pass
    return children, False


class ProtectedSet:
    """Paths no grant may reach, as one Pack sees them, compared by (st_dev, st_ino) of what really exists.

    Looks identities up in `ProtectedIndex`es (a shared workspace index, and one of its own for fixed
    `paths`), which stay exact as described in the module docstring, so a protected directory created
    or replaced after the broker started is still covered.
    """

    def __init__(
        self,
        paths: Iterable[str | os.PathLike[str]] = (),
        *,
        source: Callable[[], Iterable[str | os.PathLike[str]]] | None = None,
        index: ProtectedIndex | None = None,
        pack_id: str | None = None,
    ) -> None:
        """`paths` and `source()` are protected for everyone; `index` as Pack `pack_id` sees it."""
        fixed = tuple(Path(os.path.abspath(p)) for p in paths)
        indexes: list[ProtectedIndex] = [] if index is None else [index]
        if fixed or source is not None:
            indexes.append(ProtectedIndex.of_paths(fixed, source))
        self._indexes = tuple(indexes)
        self._view = pack_id
        # grant root identity -> (its ctime_ns, the indexes' (generation, epoch), chain is protected)
        self._chains: dict[FileIdentity, tuple[int, tuple[tuple[int, int], ...], bool]] = {}

    @classmethod
    def for_pack(
        cls,
        ws: Workspace,
        pack_id: str | None,
        extra: Iterable[str | os.PathLike[str]] = (),
        *,
        index: ProtectedIndex | None = None,
    ) -> ProtectedSet:
        """One Pack's set: `ws.protected_paths(pack_id)` plus `extra`.

        `index` is the workspace's shared index (the broker's, refreshed by its watcher); without it
        the set builds one of its own.
        """
        if index is None:
            index = ProtectedIndex.for_workspace(ws)
        elif index.workspace_root != ws.root:
            raise ValueError(f"the protected-path index is not the one of workspace {ws.root}")
        return cls(extra, index=index, pack_id=pack_id)

    def paths(self) -> list[Path]:
        """The protected paths as configured (absolute, not resolved)."""
        return [p for ix in self._indexes for p in ix.paths(self._view)]

    def _states(self) -> tuple[_State, ...]:
        return tuple(ix.current() for ix in self._indexes)

    def _protects(self, states: tuple[_State, ...], ident: FileIdentity) -> bool:
        view = self._view
        return any(s.protects(ident, view) for s in states)

    def identities(self) -> set[FileIdentity]:
        """(st_dev, st_ino) of every protected path that exists now."""
        view = self._view
        return {i for s in self._states() for i, tag in s.top.items() if _visible(tag, view)}

    def contains(self, identity: FileIdentity) -> bool:
        """O(1): whether `identity` is protected for this Pack (a protected path or an entry beneath one)."""
        return self._protects(self._states(), identity)

    def _refuse_object(self, states: tuple[_State, ...], st: os.stat_result) -> None:
        if self._protects(states, file_identity(st)):
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                raise Denied("path is a hard link to a protected file")
            raise Denied("path is protected")

    def check_fd(
        self,
        fd: int,
        stop_at: FileIdentity | None = None,
        *,
        parent_fd: int | None = None,
        name: str | None = None,
        root_fd: int | None = None,
    ) -> None:
        """Raise Denied if the object behind `fd`, or any directory above it, is protected.

        A directory fd is walked up through ".."; for a non-directory pass the directory it was
        opened in as `parent_fd` (and its `name`, to refuse protected names). A file whose identity
        is in the index (a hard link to a protected file, wherever it is) is refused too. The walk
        ends after checking `stop_at`, or at "/" when `stop_at` is None (the default, which also
        catches a grant that lies inside a protected directory). With `root_fd` (the grant root
        the object was resolved beneath) the walk ends at that root and the root's own chain up to
        "/" comes from a cache (module docstring).
        """
        states = self._states()
        st = os.fstat(fd)
        self._refuse_object(states, st)
        root_st: os.stat_result | None = None
        if parent_fd is None:
            if not stat.S_ISDIR(st.st_mode):
                raise Denied("cannot check a file without its directory")
            start, start_id = fd, file_identity(st)
        else:
            parent_st = os.fstat(parent_fd)
            start, start_id = parent_fd, file_identity(parent_st)
            if name is not None and any(s.refuses_name(start_id, name, self._view) for s in states):
                raise Denied("path is protected")
            if parent_fd == root_fd:  # the object lies directly in its grant root: one fstat serves both
                root_st = parent_st
        self._walk_from(states, start, start_id, stop_at, root_fd, root_st)

    def check_entry(
        self,
        parent_fd: int,
        name: str,
        stop_at: FileIdentity | None = None,
        *,
        root_fd: int | None = None,
    ) -> None:
        """Raise Denied if creating `name` in directory `parent_fd` would touch a protected path.

        Refused too: replacing a hard link to a protected file. `root_fd` as for `check_fd`.
        """
        states = self._states()
        parent_id = file_identity(os.fstat(parent_fd))
        if any(s.refuses_name(parent_id, name, self._view) for s in states):
            raise Denied("path is protected")
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            self._refuse_object(states, st)
        self._walk_from(states, parent_fd, parent_id, stop_at, root_fd)

    def _walk_from(
        self,
        states: tuple[_State, ...],
        start: int,
        start_id: FileIdentity,
        stop_at: FileIdentity | None,
        root_fd: int | None,
        root_st: os.stat_result | None = None,
    ) -> None:
        if root_fd is None:
            self._walk_up(states, start, start_id, stop_at)
            return
        if stop_at is not None:
            raise ValueError("pass either stop_at or root_fd")
        if root_st is None:
            root_st = os.fstat(root_fd)
        root_id = file_identity(root_st)
        if self._walk_up(states, start, start_id, root_id):
            self._check_chain(states, root_fd, root_id, root_st.st_ctime_ns)
        # Else the walk went on to "/" (the object left the grant meanwhile) and checked every step.

    def _check_chain(
        self, states: tuple[_State, ...], root_fd: int, root_id: FileIdentity, ctime_ns: int
    ) -> None:
        """Raise Denied if the grant root or a directory above it is protected (cached per root)."""
        key = tuple((s.generation, s.epoch) for s in states)
        hit = self._chains.get(root_id)
        if hit is not None and hit[0] == ctime_ns and hit[1] == key:
            protected = hit[2]
        else:
            try:
                self._walk_up(states, root_fd, root_id, None)
                protected = False
            except Denied:
                protected = True
            if len(self._chains) >= _MAX_CHAINS:
                self._chains.clear()
            self._chains[root_id] = (ctime_ns, key, protected)
        if protected:
            raise Denied("path is protected")

    def _walk_up(
        self, states: tuple[_State, ...], dir_fd: int, ident: FileIdentity, stop_at: FileIdentity | None
    ) -> bool:
        """Check directory `dir_fd` (identity `ident`) and each real parent; True if `stop_at` was met.

        Ends after checking `stop_at`, or at "/" (False). Bounded by _MAX_DEPTH.
        """
        cur = dir_fd
        owned = False
        prev: FileIdentity | None = None
        try:
            for _ in range(_MAX_DEPTH):
                if ident == prev:
                    return False  # ".." of "/" is "/" itself
                if self._protects(states, ident):
                    raise Denied("path is protected")
                if ident == stop_at:
                    return True
                parent = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=cur)
                if owned:
                    os.close(cur)
                cur, owned = parent, True
                prev, ident = ident, file_identity(os.fstat(cur))
            raise Denied("directory tree is too deep")
        finally:
            if owned:
                os.close(cur)

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


# --- pseudo file systems ------------------------------------------------------------------------------

# statfs(2) f_type of file systems that hold kernel state rather than files (linux/magic.h; mqueue from
# ipc/mqueue.c, configfs from fs/configfs). /proc/self/environ, /sys, a pty or a cgroup's controls are
# never data a grant means to hand out. devtmpfs reports TMPFS_MAGIC or RAMFS_MAGIC: it is told apart by
# its device number in the mount table (below).
PSEUDO_FS_MAGIC: Mapping[int, str] = {
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0x1CD1: "devpts",
    0x27E0EB: "cgroup",
    0x63677270: "cgroup2",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0xF97CFF8C: "selinuxfs",
    0x43415D53: "smackfs",
    0x5A3C69F0: "apparmorfs",
    0xCAFE4A11: "bpf",
    0x42494E4D: "binfmt_misc",
    0x6165676C: "pstore",
    0xDE5E81E4: "efivarfs",
    0x62656570: "configfs",
    0x19800202: "mqueue",
    0x65735543: "fusectl",
    0x7655821: "resctrl",
    0x6E736673: "nsfs",
    0x9FA1: "openpromfs",
    0x9FA2: "usbdevfs",
    0x6C6F6F70: "binderfs",
    0xABBA1974: "xenfs",
    0x62646576: "bdev",
    0x50495045: "pipefs",
    0x534F434B: "sockfs",
    0x09041934: "anon_inodefs",
}
_TMPFS_LIKE = frozenset({0x01021994, 0x858458F6})  # tmpfs, ramfs: what devtmpfs reports
# Names in /proc/self/mountinfo of the same file systems (and devtmpfs, which has no magic of its own).
PSEUDO_FS_TYPES = frozenset({*PSEUDO_FS_MAGIC.values(), "devtmpfs", "securityfs", "bpf", "rpc_pipefs"})


class _Statfs(ctypes.Structure):
    # struct statfs: f_type (__fsword_t, a `long` on the 64- and 32-bit Linux ABIs) comes first; the
    # rest is room enough for every ABI's layout (at most 120 bytes).
    _fields_ = (("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 248))


def _load_statfs() -> tuple[Any, Any] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fstatfs, statfs = libc.fstatfs, libc.statfs
    except (OSError, AttributeError):
        return None
    fstatfs.argtypes, fstatfs.restype = (ctypes.c_int, ctypes.POINTER(_Statfs)), ctypes.c_int
    statfs.argtypes, statfs.restype = (ctypes.c_char_p, ctypes.POINTER(_Statfs)), ctypes.c_int
    return fstatfs, statfs


_statfs_calls = _load_statfs()
_statfs_buffers = threading.local()  # one result buffer per thread: no allocation per call


def fs_type(target: int | str | os.PathLike[str]) -> int:
    """statfs(2) f_type of the file system holding `target` (an fd, or a path: followed); OSError if unknown."""
    if _statfs_calls is None:
        raise OSError(errno.ENOSYS, "statfs is not available; file access is refused")
    buf = getattr(_statfs_buffers, "buf", None)
    if buf is None:
        buf = _statfs_buffers.buf = _Statfs()
    if isinstance(target, int):
        rc = _statfs_calls[0](target, buf)
    else:
        rc = _statfs_calls[1](os.fsencode(target), buf)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(buf.f_type) & 0xFFFFFFFF  # magic numbers are 32-bit; a sign-extended long is masked


@dataclass(frozen=True, slots=True)
class _PseudoMounts:
    count: int  # the mount watch's count this was read at
    devices: Mapping[int, str]  # st_dev -> file system type, for pseudo file systems
    points: tuple[tuple[str, str], ...]  # (mount point, type) of pseudo file systems


_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")
_pseudo_lock = threading.Lock()
_pseudo_cache: _PseudoMounts | None = None


def _unescape(field: bytes) -> str:
    """A mountinfo path field: space, tab, newline and backslash are escaped as \\ooo."""
    return os.fsdecode(_OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field))


def _read_pseudo_mounts(count: int) -> _PseudoMounts:
    devices: dict[int, str] = {}
    points: list[tuple[str, str]] = []
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)
            fstype = fields[sep + 1].decode("ascii", "replace")
            major, minor = (int(n) for n in fields[2].split(b":"))
        except (ValueError, IndexError):
            continue
        if fstype.split(".", 1)[0] in PSEUDO_FS_TYPES:  # "fuse.x" style subtypes keep the main type first
            devices[os.makedev(major, minor)] = fstype
            points.append((_unescape(fields[4]), fstype))
    return _PseudoMounts(count, devices, tuple(points))


def _pseudo_mounts() -> _PseudoMounts:
    """The pseudo file systems of this process's mount table, re-read when a mount changed."""
    global _pseudo_cache
    count = _mounts().count()
    cached = _pseudo_cache
    if cached is not None and cached.count == count:
        return cached
    with _pseudo_lock:
        if _pseudo_cache is None or _pseudo_cache.count != count:
            _pseudo_cache = _read_pseudo_mounts(count)
        return _pseudo_cache


def pseudo_fs_of_fd(fd: int, st: os.stat_result | None = None) -> str | None:
    """The type of pseudo file system (`proc`, `sysfs`, `devtmpfs`, ...) holding `fd`, or None.

    One fstatfs(2); only on tmpfs/ramfs (what devtmpfs reports) the mount table is consulted too,
    through its device number (`st`, the fd's fstat, when the caller has it).
    """
    magic = fs_type(fd)
    kind = PSEUDO_FS_MAGIC.get(magic)
    if kind is None and magic in _TMPFS_LIKE:
        dev = (st if st is not None else os.fstat(fd)).st_dev
        kind = _pseudo_mounts().devices.get(dev)
    return kind


def pseudo_fs_of_path(path: str | os.PathLike[str]) -> str | None:
    """Like `pseudo_fs_of_fd` for a path (followed); a missing path is judged by its nearest existing
    ancestor (a grant of `/proc/none` is still a grant on proc). OSError when nothing can be read."""
    current = Path(os.path.abspath(path))
    while True:
        try:
            magic = fs_type(current)
            dev = os.stat(current).st_dev
            break
        except FileNotFoundError:
            if current == current.parent:
                raise
            current = current.parent
    kind = PSEUDO_FS_MAGIC.get(magic)
    if kind is None and magic in _TMPFS_LIKE:
        kind = _pseudo_mounts().devices.get(dev)
    return kind


def pseudo_mounts_within(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(mount point, type) of each pseudo file system mounted at or beneath `path` (resolved)."""
    base = Path(os.path.realpath(path)).parts
    return [(point, kind) for point, kind in _pseudo_mounts().points if _is_prefix(base, Path(point).parts)]


def refuse_pseudo_fs(fd: int, st: os.stat_result | None = None) -> None:
    """Raise Denied if `fd` is on a pseudo file system (kernel state, never served as a file)."""
    try:
        kind = pseudo_fs_of_fd(fd, st)
    except OSError:
        raise Denied("the file system type could not be checked; access refused") from None
    if kind is not None:
        raise Denied(f"path is on a {kind} file system (kernel state); it is never served")
