"""Wake on changes in a few directories (Linux inotify), so an idle watcher need not poll often.

The broker re-reads grants, handlers and scopes when they change. Polling them every 0.2 s kept
revocations prompt but cost an idle broker most of its CPU. `DirectoryNotifier.wait(timeout)` returns
as soon as anything is created, written, renamed, removed or has its attributes changed directly in one
of the watched directories, and at the latest after `timeout` seconds: the watcher still re-reads on
that timeout, which covers what inotify cannot see (changes deeper than the watched directories, file
systems without inotify such as some network mounts, an event queue overflow).

No dependency: inotify is three libc calls. Where it is missing (not Linux, no libc, out of watches)
`available` is False and `wait` simply sleeps for `timeout`; the caller then polls at its short interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

# <sys/inotify.h>
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
WATCH_MASK = (
    IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
    | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
)  # fmt: skip


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        libc.inotify_init1  # noqa: B018 -- absent outside Linux
        libc.inotify_add_watch  # noqa: B018
    except (OSError, AttributeError, TypeError):
        return None
    libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
    return libc


class DirectoryNotifier:
    """inotify on a fixed set of directories; `wait(timeout)` returns early when one of them changes.

    Directories that do not exist yet are watched once they do: every `wait` first re-adds the watch
    of each listed directory (one cheap syscall each; the kernel keeps one watch per inode), so a
    directory created, replaced or renamed into place is picked up on the next round.
    """

    def __init__(self, directories: Iterable[str | os.PathLike[str]]) -> None:
        self.directories = tuple(os.fsencode(Path(d)) for d in directories)
        self._libc = _libc()
        self._fd = -1
        self._changed: asyncio.Event | None = None
        self._reader_loop: asyncio.AbstractEventLoop | None = None
        if self._libc is not None:
            fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd >= 0:
                self._fd = fd
            else:
                log.warning("inotify unavailable (%s): polling instead", os.strerror(ctypes.get_errno()))

    @property
    def available(self) -> bool:
        """True while inotify works here; False means `wait` is a plain sleep."""
        return self._fd >= 0

    def _watch_all(self) -> None:
        assert self._libc is not None
        for directory in self.directories:
            if self._libc.inotify_add_watch(self._fd, directory, WATCH_MASK) < 0:
                err = ctypes.get_errno()
                if err == 28:  # ENOSPC: fs.inotify.max_user_watches reached; poll from now on
                    log.warning("inotify watch limit reached: polling instead")
                    self.close()
                    return
                # ENOENT / ENOTDIR: not there (yet); tried again on the next wait.

    def _drain(self) -> None:
        assert self._changed is not None
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while os.read(self._fd, 65536):
                pass
        self._changed.set()

    async def wait(self, timeout: float) -> bool:
        """Sleep until a watched directory changes or `timeout` s pass; True if it was a change."""
        if not self.available:
            await asyncio.sleep(timeout)
            return False
        loop = asyncio.get_running_loop()
        if self._reader_loop is not loop:
            self._changed = asyncio.Event()
            loop.add_reader(self._fd, self._drain)
            self._reader_loop = loop
        assert self._changed is not None
        self._watch_all()
        if not self.available:
            await asyncio.sleep(timeout)
            return False
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            return False
        finally:
            self._changed.clear()
        return True

    def close(self) -> None:
        """Stop watching (idempotent); `wait` then sleeps."""
        if self._fd < 0:
            return
        if self._reader_loop is not None and not self._reader_loop.is_closed():
            with contextlib.suppress(Exception):
                self._reader_loop.remove_reader(self._fd)
        self._reader_loop = None
        os.close(self._fd)
        self._fd = -1
