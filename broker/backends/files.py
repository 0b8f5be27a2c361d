"""Safe file access beneath granted directories (used by the file_read / file_write handlers).

Every path a Pack sends is resolved by the kernel relative to a directory fd with
``openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)``: no string prefix checks, no ``normpath``,
no following a link out of the grant, no race between checking and opening. Where ``openat2``
is missing (Linux < 5.6, or filtered by seccomp) file access is refused, never emulated.

What is checked on top, per request (``broker.core.protected``), and nothing more:

- the object itself (a read: the file, by its fd; a write: the entry it would replace, by ``lstat``):
  its (st_dev, st_ino) against the protected-path index. The index holds the protected paths
  themselves (``Workspace.protected_paths``: ``docker/.rumi``, grants, handlers, scopes, config,
  ``ecosystem/``, other Packs' work areas, ...) and the entries beneath them: up to 64 levels under
  ``docker/.rumi``, grants, handlers and scopes, two levels under ``ecosystem/`` and
  ``docker/packs/``, one level under the others, at most ``MAX_ENTRIES`` in all. So a hard link
  to a file the index holds (a credential, ``secrets.env``, a grant file) is refused wherever it
  is, for reading and for writing over it; a hard link to a file deeper in another Pack's work
  area, or beyond the cap, is not recognised by this rule;
- its name in its directory, against the protected names (so a write cannot create one);
- each real directory from the one holding the object up through ".." to the grant root, by
  identity (on to "/" if the walk never meets the root); the grant root's own chain up to "/" is
  checked once and cached per root;
- the file system holding the object (a read: the opened file; a write: its directory), by
  ``fstatfs`` f_type: proc, sysfs, devpts, cgroup and other pseudo file systems are refused
  (devtmpfs, which reports tmpfs, by its device number in the mount table). The policy refuses
  grants of such directories at load; this catches what is mounted beneath a grant later.

Symlinks inside a grant are followed only where they stay beneath it; what is checked is where they
lead (the final object and its real parents), not the links themselves.

Stdlib and ctypes only: this module imports nothing of NATS, Docker or typer.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import secrets
import stat
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio

from broker.core.context import HandlerContext
from broker.core.errors import Denied, HandlerFailed, InvalidRequest, RequestError, TooLarge, Unavailable
from broker.core.protected import (
    FileIdentity,
    ProtectedIndex,
    ProtectedSet,
    file_identity,
    refuse_pseudo_fs,
)

if TYPE_CHECKING:
    from broker.core.workspace import Workspace

__all__ = [
    "RESOLVE_BENEATH",
    "RESOLVE_IN_ROOT",
    "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_SYMLINKS",
    "RESOLVE_NO_XDEV",
    "FileIdentity",
    "ProtectedSet",
    "check_beneath_grant",
    "find_grant_root",
    "open_beneath",
    "openat2",
    "read_beneath",
    "read_beneath_async",
    "write_beneath",
]

# Flags of struct open_how.resolve (linux/openat2.h).
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# openat2 has the same number on every Linux architecture (unified syscall table since 5.1).
_SYS_OPENAT2 = 437
_MAX_SYMLINK_HOPS = 40  # the kernel's own limit (MAXSYMLINKS)
_MAX_RETRIES = 16  # openat2 answers EAGAIN when a rename raced a ".." lookup
_READ_CHUNK = 1 << 20


_BENEATH = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


def _load_syscall() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syscall
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_long
    return fn


_syscall = _load_syscall()
_NR_OPENAT2 = ctypes.c_long(_SYS_OPENAT2)
_HOW_SIZE = ctypes.c_size_t(ctypes.sizeof(_OpenHow))
# open_how structs by (flags, mode, resolve), made once: the kernel only reads them (a handful of
# distinct ones are used; never changed after they are made, so threads may share them).
_HOWS: dict[tuple[int, int, int], _OpenHow] = {}
_NO_OPENAT2 = "openat2 is not available (needs Linux 5.6 or newer); file access is refused"


def openat2(
    dirfd: int,
    path: str,
    flags: int,
    mode: int = 0,
    resolve: int = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
) -> int:
    """Open `path` relative to `dirfd` with openat2(2); return the new fd or raise OSError.

    Raises OSError(ENOSYS) when the kernel lacks openat2: callers refuse, never fall back.
    """
    if _syscall is None:
        raise OSError(errno.ENOSYS, _NO_OPENAT2)
    raw = os.fsencode(path)
    if b"\0" in raw:
        raise OSError(errno.EINVAL, "path contains a NUL byte")
    key = (flags, mode, resolve)
    how = _HOWS.get(key)
    if how is None:
        how = _OpenHow(flags, mode, resolve)
        if len(_HOWS) < 64:
            _HOWS[key] = how
    fd = int(_syscall(_NR_OPENAT2, ctypes.c_int(dirfd), raw, ctypes.byref(how), _HOW_SIZE))
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            raise OSError(errno.ENOSYS, _NO_OPENAT2)
        raise OSError(err, os.strerror(err))
    return fd


def _openat2_retrying(dirfd: int, path: str, flags: int, mode: int = 0) -> int:
    """openat2 beneath `dirfd`, retrying the EAGAIN a concurrent rename may cause."""
    for _ in range(_MAX_RETRIES):
        try:
            return openat2(dirfd, path, flags, mode, _BENEATH)
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                raise
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))


def _components(path: str) -> list[str]:
    # Empty components ("//", trailing "/") carry no meaning; "." and ".." are kept on purpose.
    return [c for c in path.split("/") if c]


def find_grant_root(path: str, directories: list[str]) -> tuple[str, str]:
    """Pick the granted directory containing `path` by path components; return (grant_dir, remainder).

    No normalisation: ".." stays in the remainder, where openat2(RESOLVE_BENEATH) refuses any
    escape. `/data2/x` does not match `/data`. The longest matching grant wins.
    """
    if not isinstance(path, str) or not path:
        raise InvalidRequest("path must be a non-empty string")
    if "\0" in path:
        raise InvalidRequest("path contains a NUL byte")
    if not path.startswith("/"):
        raise InvalidRequest("path must be absolute (start with /)")
    want = _components(path)
    best: tuple[str, int] | None = None
    for directory in directories:
        if not isinstance(directory, str) or not directory.startswith("/") or "\0" in directory:
            continue
        have = _components(directory)
        if any(c in (".", "..") for c in have):
            continue  # an ambiguous grant never matches
        if want[: len(have)] == have and (best is None or len(have) > best[1]):
            best = (directory, len(have))
    if best is None:
        raise Denied("path is outside the granted directories")
    return best[0], "/".join(want[best[1] :]) or "."


def check_beneath_grant(path: str, directories: Sequence[object], *, for_write: bool = False) -> None:
    """Raise unless `path`, read as text, lies beneath one of `directories` (a pure, fast pre-check).

    For `authorize`: absolute, no NUL, beneath a granted directory by components, and no ".." that
    climbs above that directory; `for_write` also wants a file name at the end (as `write_beneath`).
    It follows no link and touches no file: the race-free check is still openat2(RESOLVE_BENEATH)
    when the file is opened, which refuses what this one cannot see.
    """
    granted = [d for d in directories if isinstance(d, str)]
    if not granted:
        raise Denied("no directories are granted")
    if for_write and isinstance(path, str) and path.endswith("/"):
        raise InvalidRequest("path must name a file, not end with /")
    _, rest = find_grant_root(path, granted)
    if for_write and _split(rest)[1] in (".", ".."):
        raise InvalidRequest("path must end with a file name")
    depth = 0
    for part in _components(rest):
        if part == "..":
            depth -= 1
            if depth < 0:
                raise Denied("path escapes the granted directory")
        elif part != ".":
            depth += 1


_ERRNO_MESSAGES: dict[int, RequestError] = {
    errno.EXDEV: Denied("path escapes the granted directory"),
    errno.ELOOP: Denied("path escapes the granted directory"),
    errno.ENOENT: HandlerFailed("no such file"),
    errno.ENOTDIR: HandlerFailed("a component of the path is not a directory"),
    errno.EISDIR: HandlerFailed("path is a directory"),
    errno.EACCES: Denied("the file system refused access"),
    errno.EPERM: Denied("the file system refused access"),
    errno.ENAMETOOLONG: InvalidRequest("path is too long"),
    errno.ENOSPC: HandlerFailed("no space left on the device"),
    errno.EDQUOT: HandlerFailed("disk quota exceeded"),
    errno.EROFS: HandlerFailed("the file system is read-only"),
    errno.EAGAIN: HandlerFailed("the path changed during the request; try again"),
    errno.EBUSY: HandlerFailed("the file is busy"),
    errno.ETXTBSY: HandlerFailed("the file is busy"),
    errno.EFBIG: TooLarge("file too large for the file system"),
    errno.ENOSYS: Unavailable(_NO_OPENAT2),
}


def _safe_error(exc: OSError) -> RequestError:
    """A RequestError for an OSError, without the path (it may name host directories)."""
    known = _ERRNO_MESSAGES.get(exc.errno or 0)
    if known is not None:
        return type(known)(known.message)
    reason = os.strerror(exc.errno) if exc.errno else "unknown error"
    return HandlerFailed(f"file operation failed ({reason})")


def _grant_directories(context: HandlerContext) -> list[str]:
    dirs = context.grant.get("directories")
    if not isinstance(dirs, list) or not dirs:
        raise Denied("no directories are granted")
    return [d for d in dirs if isinstance(d, str)]


@functools.lru_cache(maxsize=8)
def _workspace_index(ws: Workspace) -> ProtectedIndex:
    """One protected-path index per workspace for the fallback below (kept current by its stamps)."""
    return ProtectedIndex.for_workspace(ws)


def protected_set(context: HandlerContext) -> ProtectedSet:
    """The handler context's protected-path set; derived from the workspace if absent, else refuse."""
    if context.protected is not None:
        return context.protected
    if context.workspace_root is not None:
        # Fail closed: without the broker's set, derive it from the workspace.
        from broker.core.workspace import Workspace

        ws = Workspace.at(context.workspace_root)
        return ProtectedSet.for_pack(ws, context.pack_id or None, index=_workspace_index(ws))
    raise HandlerFailed("the broker gave no protected-path set; the request is refused")


def _open_root(grant_dir: str) -> int:
    try:
        # Grant directories are admin-set absolute paths: opened as configured.
        return os.open(grant_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise HandlerFailed("the granted directory does not exist") from None
    except NotADirectoryError:
        raise HandlerFailed("the granted directory is not a directory") from None


def _split(rel: str) -> tuple[str, str]:
    parts = _components(rel)
    if not parts:
        return ".", "."
    return "/".join(parts[:-1]) or ".", parts[-1]


class _Entry:
    """A resolved object beneath a grant root: its O_PATH fd and the real directory holding it."""

    def __init__(
        self,
        fd: int,
        st: os.stat_result,
        parent_fd: int | None,
        name: str | None,
        *,
        owns_parent: bool = True,
    ) -> None:
        self.fd = fd
        self.st = st
        self.parent_fd = parent_fd
        self.name = name
        self.owns_parent = owns_parent  # False when the parent is the grant root itself (the caller's fd)

    def close(self) -> None:
        os.close(self.fd)
        if self.parent_fd is not None and self.owns_parent:
            os.close(self.parent_fd)


def _resolve(root_fd: int, rel: str) -> _Entry:
    """Resolve `rel` beneath `root_fd`, following symlinks only where they stay beneath it.

    The directory part is resolved by the kernel; the last component is opened with
    O_PATH|O_NOFOLLOW so a symlink there is read (race-free, from its fd) and the walk
    restarts from the grant root with its target, at most 40 times.
    """
    for _ in range(_MAX_SYMLINK_HOPS):
        dir_part, name = _split(rel)
        if name in (".", ".."):
            fd = _openat2_retrying(root_fd, rel, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            return _Entry(fd, os.fstat(fd), None, None)
        # A name directly in the grant root (the usual case) is opened in the root itself: resolving
        # "." beneath it would only give another fd of the same directory.
        owned = dir_part != "."
        parent = (
            _openat2_retrying(root_fd, dir_part, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            if owned
            else root_fd
        )
        try:
            fd = _openat2_retrying(parent, name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except BaseException:
            if owned:
                os.close(parent)
            raise
        st = os.fstat(fd)
        if not stat.S_ISLNK(st.st_mode):
            return _Entry(fd, st, parent, name, owns_parent=owned)
        try:
            target = os.readlink("", dir_fd=fd)
        finally:
            os.close(fd)
            if owned:
                os.close(parent)
        if target.startswith("/"):
            raise Denied("path escapes the granted directory")
        rel = f"{dir_part}/{target}"
    raise Denied("too many levels of symbolic links")


def read_beneath(context: HandlerContext, path: str, max_bytes: int) -> bytes:
    """Read the regular file at absolute `path` inside one of `context.grant["directories"]`.

    Refuses escapes, magic links, protected paths, non-regular files, files on pseudo file systems;
    TooLarge over `max_bytes`.
    """
    fd, size = _open_beneath(context, path, max_bytes)
    try:
        return _read_capped(fd, max_bytes, size)
    except OSError as exc:
        raise _safe_error(exc) from None
    finally:
        os.close(fd)


INLINE_READ_BYTES = 64 * 1024


async def read_beneath_async(
    context: HandlerContext, path: str, max_bytes: int, *, inline_bytes: int = INLINE_READ_BYTES
) -> bytes:
    """`read_beneath` for an async handler: opened and checked in the event loop (a few syscalls);
    a file up to `inline_bytes` is read there too, a larger one in the Pack's own handler threads."""
    fd, size = _open_beneath(context, path, max_bytes)
    try:
        if size <= inline_bytes:
            return _read_capped(fd, max_bytes, size)
        # Not abandoned on cancel: the fd is closed below only once no thread reads it.
        run = context.run_blocking or anyio.to_thread.run_sync
        data: bytes = await run(_read_capped, fd, max_bytes, size)
        return data
    except OSError as exc:
        raise _safe_error(exc) from None
    finally:
        os.close(fd)


def open_beneath(context: HandlerContext, path: str, max_bytes: int) -> int:
    """The checked, opened file for `read_beneath` (the caller closes the fd)."""
    return _open_beneath(context, path, max_bytes)[0]


def _open_beneath(context: HandlerContext, path: str, max_bytes: int) -> tuple[int, int]:
    """`open_beneath`, and the opened file's size (from the fstat that checked it)."""
    grant_dir, rel = find_grant_root(path, _grant_directories(context))
    protected = protected_set(context)
    root_fd = _open_root(grant_dir)
    try:
        return _open_for_read(root_fd, rel, max_bytes, protected)
    except OSError as exc:
        raise _safe_error(exc) from None
    finally:
        os.close(root_fd)


def _open_for_read(root_fd: int, rel: str, max_bytes: int, protected: ProtectedSet) -> tuple[int, int]:
    entry = _resolve(root_fd, rel)
    try:
        if stat.S_ISDIR(entry.st.st_mode):
            raise HandlerFailed("path is a directory")
        if not stat.S_ISREG(entry.st.st_mode) or entry.parent_fd is None or entry.name is None:
            raise Denied("path is not a regular file")
        protected.check_fd(entry.fd, parent_fd=entry.parent_fd, name=entry.name, root_fd=root_fd)
        if entry.st.st_size > max_bytes:
            raise TooLarge(f"file is larger than {max_bytes} bytes")
        # Open the very name we checked, refusing any link; O_NONBLOCK so a swapped-in FIFO cannot hang us.
        fd = openat2(
            entry.parent_fd,
            entry.name,
            os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
            0,
            _BENEATH | RESOLVE_NO_SYMLINKS,
        )
        try:
            st = os.fstat(fd)
            if file_identity(st) != file_identity(entry.st) or not stat.S_ISREG(st.st_mode):
                raise HandlerFailed("the file changed during the request; try again")
            refuse_pseudo_fs(fd, st)  # one fstatfs: /proc, /sys, ... mounted beneath a grant
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_size
    finally:
        entry.close()


def _read_capped(fd: int, max_bytes: int, size_hint: int = _READ_CHUNK) -> bytes:
    """The file's bytes, TooLarge past `max_bytes`; `size_hint` (its size when checked) sizes the first
    read, so a small file costs a buffer of its own size, not `_READ_CHUNK`. Reads until end of file."""
    chunks: list[bytes] = []
    total = 0
    want = min(max(size_hint, 0) + 1, _READ_CHUNK)
    while total <= max_bytes:
        chunk = os.read(fd, min(want, max_bytes + 1 - total))
        want = _READ_CHUNK
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > max_bytes:
        raise TooLarge(f"file is larger than {max_bytes} bytes")
    return b"".join(chunks)


def _temp_name(name: str) -> str:
    token = secrets.token_hex(8)
    # Keep the temp name within NAME_MAX (255 bytes) for long target names.
    stem = name if len(os.fsencode(name)) <= 200 else "long"
    return f".{stem}.rumi-tmp-{token}"


def write_beneath(
    context: HandlerContext, path: str, data: bytes, max_bytes: int, *, parents: bool = False
) -> int:
    """Atomically replace (or create) the file at absolute `path` inside a granted directory.

    Writes a temp file next to it, fsyncs, renames over the target and fsyncs the directory:
    readers see the old or the new content, never a mix. A symlink at the target is replaced,
    not followed. Returns the number of bytes written.

    `parents`: first create the missing directories between the grant root and the file
    (`_make_parents`: beneath the grant, each checked like the file itself).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidRequest("data must be bytes")
    size = len(data)
    if size > max_bytes:
        raise TooLarge(f"data is larger than {max_bytes} bytes")
    if isinstance(path, str) and path.endswith("/"):
        raise InvalidRequest("path must name a file, not end with /")
    grant_dir, rel = find_grant_root(path, _grant_directories(context))
    dir_part, name = _split(rel)
    if name in (".", ".."):
        raise InvalidRequest("path must end with a file name")
    protected = protected_set(context)
    root_fd = _open_root(grant_dir)
    try:
        if parents and dir_part != ".":
            _make_parents(root_fd, dir_part, protected)
        return _write(root_fd, dir_part, name, bytes(data), protected)
    except OSError as exc:
        if exc.errno == errno.ENOENT and not parents:
            raise HandlerFailed(
                "a directory of the path does not exist: create it first, or pass parents=True"
            ) from None
        raise _safe_error(exc) from None
    finally:
        os.close(root_fd)


_MAX_PARENTS = 32


def _make_parents(root_fd: int, dir_part: str, protected: ProtectedSet) -> None:
    """Create the directories of `dir_part` that are missing beneath `root_fd` (like ``mkdir -p``).

    Walks one component at a time from the grant root: each is checked against the protected paths
    (`check_entry`, as for a file written there) and made (0755, the umask applies) if missing, then
    opened with openat2 beneath the root: an existing symlink is followed only while it stays beneath
    the grant, a directory just made is opened without following any. A root broker gives a new
    directory the owner of the one holding it, as `_write` does for files. Refused: "." and ".."
    components and more than `_MAX_PARENTS` of them.
    """
    parts = _components(dir_part)
    if any(part in (".", "..") for part in parts):
        raise InvalidRequest("with parents=True the path must not contain . or .. components")
    if len(parts) > _MAX_PARENTS:
        raise InvalidRequest(f"with parents=True the path may have at most {_MAX_PARENTS} directories")
    dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    cur = os.dup(root_fd)
    try:
        for part in parts:
            refuse_pseudo_fs(cur)
            protected.check_entry(cur, part, root_fd=root_fd)
            try:
                os.mkdir(part, 0o755, dir_fd=cur)
                created = True
            except FileExistsError:
                created = False
            if created:
                # Exactly the entry just made: no symlink that may have replaced it is followed.
                nxt = _openat2_strict(cur, part, dir_flags)
                if os.geteuid() == 0:
                    owner = os.fstat(cur)
                    os.fchown(nxt, owner.st_uid, owner.st_gid)
            else:
                nxt = _openat2_retrying(cur, part, dir_flags)
            os.close(cur)
            cur = nxt
    finally:
        os.close(cur)


def _openat2_strict(dirfd: int, path: str, flags: int) -> int:
    """openat2 beneath `dirfd` following no symlink at all (retrying EAGAIN)."""
    for _ in range(_MAX_RETRIES):
        try:
            return openat2(dirfd, path, flags, 0, _BENEATH | RESOLVE_NO_SYMLINKS)
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                raise
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))


def _write(root_fd: int, dir_part: str, name: str, data: bytes, protected: ProtectedSet) -> int:
    parent = _openat2_retrying(root_fd, dir_part, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        refuse_pseudo_fs(parent)  # the new file lands on the directory's file system
        protected.check_entry(parent, name, root_fd=root_fd)
        mode = 0o644
        try:
            old = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISDIR(old.st_mode):
                raise HandlerFailed("path is a directory")
            if stat.S_ISREG(old.st_mode):
                mode = stat.S_IMODE(old.st_mode) & 0o777  # never widen an existing file's permissions
        tmp = _temp_name(name)
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent
        )
        renamed = False
        try:
            try:
                os.fchmod(fd, mode)
                if os.geteuid() == 0:
                    # A root broker writes as the directory's owner, so the Pack (whose sandbox it
                    # is) can change its own files; setuid/setgid bits never come along (mode & 0o777).
                    owner = os.fstat(parent)
                    os.fchown(fd, owner.st_uid, owner.st_gid)
                view = memoryview(data)
                written = 0
                while written < len(view):
                    written += os.write(fd, view[written:])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
            renamed = True
        finally:
            if not renamed:
                try:
                    os.unlink(tmp, dir_fd=parent)
                except OSError:
                    pass
        os.fsync(parent)
        return len(data)
    finally:
        os.close(parent)
