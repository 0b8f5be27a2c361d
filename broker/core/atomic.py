"""Write a file whole: a reader sees the old content or the new, never a part.

For the broker's own files (config, grants, NATS config, pidfiles, caches). Writing beneath a
Pack's granted directory is security code with its own rules: `broker.backends.files`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["fsync_directory", "write_atomic"]


def write_atomic(
    path: Path,
    data: bytes | str,
    *,
    mode: int = 0o644,
    fsync: bool = True,
    owner: tuple[int, int] | None = None,
) -> None:
    """Replace `path` with `data` (str is UTF-8) via a temp file in the same directory and a rename.

    The temp name starts with a dot and ends in `.tmp`, so directory watchers ignore it; it is created
    exclusively and without following links. With `fsync`, the content and then the directory entry
    are synced before it returns. `mode` is the new file's permission bits; `owner`
    (uid, gid), when given, owns it before the rename, so the file never appears with another owner.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it
        if owner is not None:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_directory(path.parent)  # the rename itself survives a power loss


def fsync_directory(path: Path) -> None:
    """Make the entries of directory `path` (a new or renamed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
