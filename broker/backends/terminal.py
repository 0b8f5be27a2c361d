"""Terminal sandbox: run one argv in a fresh, confined, short-lived container (Docker SDK).

Used by the built-in ``terminal`` handler. One command = one container: created, attached, started,
waited for, removed (also on timeout and on error). Every container carries the labels
``io.rumi.managed=true``, ``io.rumi.role=sandbox`` and ``io.rumi.pack=<pack_id>``, so
``remove_sandboxes`` finds exactly these.

What the command gets (all set in ``container_spec``, starting from "drop every capability"):
no network (``network_mode="none"``), no capabilities, ``no-new-privileges``, a read-only root, a
private IPC/PID/UTS/cgroup namespace, a small ``/tmp`` tmpfs (noexec), memory/pids/CPU limits, core
dumps off, no log driver (output is streamed, never stored by the daemon), a non-root uid/gid, and
exactly three environment variables. The granted directories are the only host paths it sees, each
bind-mounted (non-recursively, private propagation) at its own absolute path.

Mount races. A granted directory is opened with ``openat2(RESOLVE_NO_SYMLINKS)`` from ``/`` and checked
(protected paths by device/inode, pseudo file systems, the Docker socket). Docker mounts by *path*,
though, so a directory swapped for a symlink between that check and the mount would be followed.
To close that window the container does not start with the command: it starts with a small trusted
launcher (``/usr/bin/python3 -I -S -c LAUNCHER``) that compares each mount point's (st_dev, st_ino) with the
identity the broker checked (its fd is held open for the whole run) and only then ``execve``s argv
with a fixed environment. On a mismatch nothing runs and the request is denied.

Output is read from the attach stream (stdout/stderr demultiplexed) with a per-stream cap; what
exceeds it is read and dropped, so memory stays bounded and the command is not blocked.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import selectors
import socket
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.backends.files import (
    RESOLVE_NO_MAGICLINKS,
    RESOLVE_NO_SYMLINKS,
    FileIdentity,
    ProtectedSet,
    openat2,
)
from broker.core.docker_client import docker_client
from broker.core.errors import (
    Denied,
    EngineUnavailable,
    HandlerFailed,
    InvalidRequest,
    RateLimited,
    Unavailable,
)
from broker.core.labels import LABEL_MANAGED, LABEL_PACK, LABEL_ROLE

__all__ = [
    "LABEL_MANAGED",
    "LABEL_PACK",
    "LABEL_ROLE",
    "SANDBOX_ENV",
    "SANDBOX_GID",
    "SANDBOX_UID",
    "GrantedDirectory",
    "SandboxCommand",
    "SandboxLimits",
    "SandboxResult",
    "SandboxSpec",
    "check_cwd",
    "command_slot",
    "container_spec",
    "engine",
    "engine_socket_paths",
    "open_granted_directories",
    "remove_sandboxes",
    "reset_engine",
    "run_in_sandbox",
    "sandbox_user",
]

log = logging.getLogger("rumi.sandbox")

# The Pack containers' non-root user; used when a granted directory belongs to root.
SANDBOX_UID = 10001
SANDBOX_GID = 10001
# The whole environment of a command: nothing from the Pack, nothing from the image.
SANDBOX_ENV: dict[str, str] = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",  # noqa: S108 - the container's private tmpfs
    "LANG": "C.UTF-8",
}

_LAUNCHER_FAILED = 125
_READ_CHUNK = 65536
_WRITE_CHUNK = 65536
_KILL_GRACE = 10.0  # seconds to wait for the engine to confirm a kill
# Never mounted at or below these: pseudo file systems, and the image's own programs, libraries and
# configuration (a host directory there could replace the launcher that checks the mounts).
_IMAGE_ROOTS = frozenset(
    {"proc", "sys", "dev", "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "boot"}
)
# Never mounted exactly here (a host /var or /run would hide the image's); below them is fine.
_SYSTEM_DIRS = frozenset({"/var", "/run"})
_LAUNCHER_PYTHON = "/usr/bin/python3"
_DEFAULT_SOCKETS = (
    "/var/run/docker.sock",
    "/run/docker.sock",
    "/run/containerd/containerd.sock",
    "/var/run/containerd/containerd.sock",
)

# Runs first inside the container (as the sandbox user): checks that each mount is the directory
# the broker checked, then execs argv with the fixed environment. argv: nonce n dev:ino:path... argv...
_LAUNCHER = """\
import os, sys
def fail(nonce, why):
    os.write(2, ("rumi-sandbox:%s:%s\\n" % (nonce, why)).encode())
    os._exit(125)
def main():
    nonce, n = sys.argv[1], int(sys.argv[2])
    checks, argv = sys.argv[3:3 + n], sys.argv[3 + n:]
    if os.getuid() == 0 or os.getgid() == 0:
        fail(nonce, "root")
    for item in checks:
        dev, ino, path = item.split(":", 2)
        try:
            st = os.lstat(path)
        except OSError:
            fail(nonce, "mount")
        if (st.st_dev, st.st_ino) != (int(dev), int(ino)):
            fail(nonce, "mount")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
    try:
        os.execvpe(argv[0], argv, env)
    except FileNotFoundError:
        os.write(2, ("rumi-sandbox: command not found: %s\\n" % argv[0]).encode(errors="replace"))
        os._exit(127)
    except OSError as exc:
        os.write(2, ("rumi-sandbox: cannot run %s: %s\\n" % (argv[0], exc.strerror)).encode(errors="replace"))
        os._exit(126)
main()
"""


# ------------------------------------------------------------------------------------- value types


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one command (from the terminal scope, capped by the broker)."""

    timeout: float = 30.0
    max_output_bytes: int = 1024 * 1024
    memory_limit: str = "256m"
    pids_limit: int = 64
    cpus: float = 1.0
    tmp_size: str = "64m"


@dataclass(frozen=True)
class SandboxCommand:
    """What to run: argv (exec form), its working directory, optional stdin, user and mounts."""

    argv: tuple[str, ...]
    cwd: str
    uid: int
    gid: int
    mounts: tuple[tuple[str, FileIdentity], ...]  # (absolute host path = container path, identity)
    stdin: bytes | None = None


@dataclass
class SandboxResult:
    """How a command ended; `stdout`/`stderr` are capped, the `*_total` counts are not."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    truncated: bool
    duration: float
    stdout_total: int = 0
    stderr_total: int = 0
    oom_killed: bool = False


@dataclass(frozen=True)
class SandboxSpec:
    """Container settings: kwargs for ``APIClient.create_container`` and ``create_host_config``."""

    create: dict[str, Any]
    host: dict[str, Any]


@dataclass
class GrantedDirectory:
    """A granted directory opened without following any symlink; the fd pins what was checked."""

    path: str
    fd: int
    identity: FileIdentity
    uid: int
    gid: int
    _closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)


# ----------------------------------------------------------------------------- granted directories


def _components(path: str) -> list[str]:
    return [c for c in path.split("/") if c]


def _identity(st: os.stat_result) -> FileIdentity:
    return (st.st_dev, st.st_ino)


def engine_socket_paths() -> list[str]:
    """Unix sockets that control a container engine on this host (DOCKER_HOST's and the usual ones)."""
    paths = list(_DEFAULT_SOCKETS)
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("unix://"):
        paths.insert(0, host[len("unix://") :])
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        paths.append(os.path.join(runtime, "docker.sock"))
    return paths


def _contains_socket(identity: FileIdentity, sockets: Sequence[str]) -> bool:
    """Whether a directory with `identity` is a real ancestor of one of `sockets`."""
    for sock in sockets:
        try:
            real = os.path.realpath(sock)
            os.stat(real)
        except OSError:
            continue
        current = os.path.dirname(real)
        for _ in range(len(_components(real)) + 1):
            try:
                if _identity(os.stat(current)) == identity:
                    return True
            except OSError:
                break
            if current == "/":
                break
            current = os.path.dirname(current)
    return False


def _pseudo_devices() -> set[int]:
    devices: set[int] = set()
    for path in ("/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys/fs/cgroup"):  # noqa: S108
        with contextlib.suppress(OSError):
            devices.add(os.stat(path).st_dev)
    return devices


def _open_one(path: str, protected: ProtectedSet, sockets: Sequence[str]) -> GrantedDirectory:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise HandlerFailed(
            "a granted terminal directory is not an absolute path; ask the admin to fix the grant"
        )
    parts = _components(path)
    if any(p in (".", "..") for p in parts):
        raise HandlerFailed("a granted terminal directory contains . or ..; ask the admin to fix the grant")
    shown = "/" + "/".join(parts)
    if not parts or shown in _SYSTEM_DIRS or parts[0] in _IMAGE_ROOTS:
        raise Denied(f"granted directory {shown} cannot be mounted into the sandbox (system directory)")
    if protected.overlaps(shown):
        raise Denied(f"granted directory {shown} overlaps a protected workspace path")
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # No symlink anywhere on the path: the directory is the one the admin named, literally.
        fd = openat2(
            root,
            "/".join(parts),
            os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
            0,
            RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
        )
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Denied(f"granted directory {shown} is or passes through a symbolic link") from None
        if exc.errno == errno.ENOENT:
            raise HandlerFailed(f"granted directory {shown} does not exist") from None
        if exc.errno == errno.ENOTDIR:
            raise HandlerFailed(f"granted directory {shown} is not a directory") from None
        if exc.errno == errno.ENOSYS:
            raise Unavailable(
                "openat2 is not available (needs Linux 5.6 or newer); terminal is refused"
            ) from None
        raise HandlerFailed(
            f"granted directory {shown} cannot be opened ({os.strerror(exc.errno or 0)})"
        ) from None
    finally:
        os.close(root)
    try:
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode):
            raise HandlerFailed(f"granted directory {shown} is not a directory")
        protected.check_fd(fd)  # by identity, walking the real parents up to "/"
        if st.st_dev in _pseudo_devices():
            raise Denied(f"granted directory {shown} is on a pseudo file system")
        if _contains_socket(_identity(st), sockets):
            raise Denied(f"granted directory {shown} contains the container engine's socket")
        return GrantedDirectory(shown, fd, _identity(st), st.st_uid, st.st_gid)
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def open_granted_directories(
    directories: Sequence[str], protected: ProtectedSet, sockets: Sequence[str] | None = None
) -> Iterator[list[GrantedDirectory]]:
    """Open and check every granted directory (deduplicated); close them all on exit.

    Raises Denied for a symlinked, protected, pseudo-fs or engine-socket directory, HandlerFailed for a
    missing one or a malformed grant.
    """
    opened: list[GrantedDirectory] = []
    seen: set[str] = set()
    try:
        for directory in directories:
            entry = _open_one(directory, protected, engine_socket_paths() if sockets is None else sockets)
            if entry.path in seen:
                entry.close()
                continue
            seen.add(entry.path)
            opened.append(entry)
        yield opened
    finally:
        for entry in opened:
            entry.close()


def check_cwd(granted: GrantedDirectory, cwd: str) -> None:
    """Raise unless `cwd` (inside `granted`, by components) is an existing directory beneath it."""
    rel = "/".join(_components(cwd)[len(_components(granted.path)) :]) or "."
    try:
        fd = openat2(granted.fd, rel, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.ELOOP):
            raise Denied("cwd escapes the granted directory") from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise InvalidRequest("cwd is not an existing directory inside the granted directory") from None
        raise HandlerFailed(f"cwd cannot be opened ({os.strerror(exc.errno or 0)})") from None
    os.close(fd)


def sandbox_user(granted: GrantedDirectory) -> tuple[int, int]:
    """The uid:gid a command runs as: the owner of its granted directory, never root (then 10001)."""
    return (granted.uid or SANDBOX_UID, granted.gid or SANDBOX_GID)


# -------------------------------------------------------------------------------- container spec


def container_spec(
    command: SandboxCommand, limits: SandboxLimits, image: str, pack_id: str, nonce: str
) -> SandboxSpec:
    """The one place policy becomes container settings; everything starts denied."""
    if command.uid == 0 or command.gid == 0:
        raise ValueError("the sandbox never runs as root")
    targets = {path for path, _ in command.mounts}
    mounts = [
        {
            "Type": "bind",
            "Source": path,
            "Target": path,
            "ReadOnly": False,
            # Only the directory's own file system: host mounts below it stay invisible.
            "BindOptions": {"Propagation": "rprivate", "NonRecursive": True},
        }
        for path, _ in command.mounts
    ]
    checks = [f"{dev}:{ino}:{path}" for path, (dev, ino) in command.mounts]
    tmp = "/tmp"  # noqa: S108 - the container's own tmpfs, not the host's /tmp
    # A granted host /tmp is mounted there instead (two mounts on one point are refused).
    tmpfs = {} if tmp in targets else {tmp: f"rw,noexec,nosuid,nodev,size={limits.tmp_size}"}
    memory = limits.memory_limit
    create: dict[str, Any] = {
        "image": image,
        "entrypoint": [_LAUNCHER_PYTHON, "-I", "-S", "-c", _LAUNCHER],
        "command": [nonce, str(len(checks)), *checks, *command.argv],
        "user": f"{command.uid}:{command.gid}",
        "working_dir": command.cwd,
        "environment": [f"{k}={v}" for k, v in SANDBOX_ENV.items()],
        "hostname": "sandbox",
        "stdin_open": command.stdin is not None,
        "tty": False,
        "detach": False,
        "labels": {LABEL_MANAGED: "true", LABEL_ROLE: "sandbox", LABEL_PACK: pack_id},
        "name": f"rumi-sandbox-{pack_id}-{secrets.token_hex(6)}",
        "use_config_proxy": False,  # never copy the host user's proxy settings in
    }
    host: dict[str, Any] = {
        "network_mode": "none",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "privileged": False,
        "read_only": True,
        "ipc_mode": "private",
        "cgroupns": "private",
        "tmpfs": tmpfs,
        "mounts": mounts,
        "mem_limit": memory,
        "memswap_limit": memory,  # no swap beyond the memory limit
        "shm_size": "16m",
        "pids_limit": limits.pids_limit,
        "nano_cpus": int(limits.cpus * 1_000_000_000),
        "ulimits": [{"name": "core", "soft": 0, "hard": 0}, {"name": "nofile", "soft": 1024, "hard": 1024}],
        "oom_score_adj": 500,  # under host memory pressure a sandbox goes first
        "log_config": {"Type": "none", "Config": {}},
        "init": False,
    }
    return SandboxSpec(create=create, host=host)


# ------------------------------------------------------------------------------------ concurrency

_slots_lock = threading.Lock()
_running: dict[str, int] = {}


@contextlib.contextmanager
def command_slot(pack_id: str, limit: int) -> Iterator[None]:
    """Hold one of a Pack's `limit` concurrent sandbox commands; RateLimited when all are taken.

    Per Pack, so one Pack's long commands cannot starve another's.
    """
    with _slots_lock:
        if _running.get(pack_id, 0) >= limit:
            raise RateLimited(f"{limit} terminal commands of this Pack are already running; retry later")
        _running[pack_id] = _running.get(pack_id, 0) + 1
    try:
        yield
    finally:
        with _slots_lock:
            left = _running[pack_id] - 1
            if left:
                _running[pack_id] = left
            else:
                del _running[pack_id]


# ---------------------------------------------------------------------------------------- engine

_engine_lock = threading.Lock()
_engine: Any = None


def engine() -> Any:
    """A shared Docker client (`broker.core.docker_client`); Unavailable if no engine answers."""
    global _engine
    with _engine_lock:
        if _engine is None:
            try:
                _engine = docker_client()
            except EngineUnavailable as exc:
                log.warning("docker engine unreachable: %s", exc)
                raise Unavailable(
                    "the Docker engine is not reachable; start it (scripts/ensure-docker.sh) and retry"
                ) from None
        return _engine


def reset_engine() -> None:
    """Forget the shared client (after a connection failure, or when DOCKER_HOST changed)."""
    global _engine
    with _engine_lock:
        client, _engine = _engine, None
    if client is not None:
        with contextlib.suppress(Exception):
            client.close()


def remove_sandboxes(client: Any, pack_id: str | None = None) -> int:
    """Force-remove every sandbox container (of one Pack, or all); return how many were removed."""
    import docker.errors

    filters = [f"{LABEL_MANAGED}=true", f"{LABEL_ROLE}=sandbox"]
    if pack_id is not None:
        filters.append(f"{LABEL_PACK}={pack_id}")
    removed = 0
    for item in client.api.containers(all=True, filters={"label": filters}):
        try:
            client.api.remove_container(item["Id"], force=True)
            removed += 1
        except docker.errors.NotFound:
            continue
    return removed


# ----------------------------------------------------------------------------------------- running


class _Demux:
    """Splits Docker's multiplexed attach stream (8-byte frame headers) into capped stdout/stderr."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.kept = {1: bytearray(), 2: bytearray()}
        self.totals = {1: 0, 2: 0}
        self._header = bytearray()
        self._stream = 0
        self._left = 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        i = 0
        while i < len(view):
            if self._left == 0:
                need = 8 - len(self._header)
                self._header += view[i : i + need]
                i += min(need, len(view) - i)
                if len(self._header) < 8:
                    return
                self._stream = self._header[0]
                self._left = int.from_bytes(self._header[4:8], "big")
                self._header.clear()
                continue
            take = min(self._left, len(view) - i)
            self._keep(self._stream, view[i : i + take])
            i += take
            self._left -= take

    def _keep(self, stream: int, chunk: memoryview) -> None:
        if stream not in self.kept:
            return
        self.totals[stream] += len(chunk)
        buf = self.kept[stream]
        room = self.cap - len(buf)
        if room > 0:
            buf += chunk[:room]

    @property
    def truncated(self) -> bool:
        return any(total > self.cap for total in self.totals.values())


def _raw_socket(attached: Any) -> socket.socket:
    raw = getattr(attached, "_sock", attached)
    if not isinstance(raw, socket.socket):
        raise HandlerFailed(
            "the Docker engine connection does not support attaching; use a local unix socket"
        )
    return raw


def _exchange(sock: socket.socket, stdin: bytes | None, demux: _Demux, deadline: float) -> bool:
    """Send stdin, collect output until the stream ends (True) or the deadline passes (False)."""
    sock.setblocking(False)
    pending = memoryview(stdin) if stdin is not None else memoryview(b"")
    writing = stdin is not None
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0))
        if writing and not pending:
            writing = _close_stdin(sock, sel)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for _key, mask in sel.select(min(remaining, 1.0)):
                if mask & selectors.EVENT_WRITE and writing:
                    try:
                        sent = sock.send(pending[:_WRITE_CHUNK])
                        pending = pending[sent:]
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        pending = memoryview(b"")  # the command stopped reading: drop the rest
                    if not pending:
                        writing = _close_stdin(sock, sel)
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(_READ_CHUNK)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        return True
                    if not data:
                        return True
                    demux.feed(data)


def _close_stdin(sock: socket.socket, sel: selectors.BaseSelector) -> bool:
    # Half-close: with StdinOnce the engine then closes the command's stdin (EOF).
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    sel.modify(sock, selectors.EVENT_READ)
    return False


def _engine_failure(exc: BaseException) -> bool:
    import requests.exceptions

    return isinstance(exc, requests.exceptions.ConnectionError) and not isinstance(
        exc, requests.exceptions.ReadTimeout
    )


def run_in_sandbox(
    client: Any, image: str, command: SandboxCommand, limits: SandboxLimits, *, pack_id: str
) -> SandboxResult:
    """Run `command` in a fresh container made by `container_spec`; always remove the container.

    `duration` is the time from create to remove. Raises HandlerFailed when the image is missing or the
    engine refuses the container, Unavailable when the engine stops answering, Denied when a mount is
    not the directory that was checked (nothing ran then).
    """
    started = time.monotonic()
    result = _run_once(client, image, command, limits, pack_id)
    result.duration = time.monotonic() - started
    return result


def _run_once(
    client: Any, image: str, command: SandboxCommand, limits: SandboxLimits, pack_id: str
) -> SandboxResult:
    import docker.errors
    import requests.exceptions

    nonce = secrets.token_hex(8)
    spec = container_spec(command, limits, image, pack_id, nonce)
    api = client.api
    cid: str | None = None
    attached: Any = None
    try:
        try:
            host_config = api.create_host_config(**spec.host)
            cid = str(api.create_container(host_config=host_config, **spec.create)["Id"])
        except docker.errors.ImageNotFound:
            raise HandlerFailed(f"sandbox image {image} is not built: run `rumi build`") from None
        params = {"stdin": 1 if command.stdin is not None else 0, "stdout": 1, "stderr": 1, "stream": 1}
        attached = api.attach_socket(cid, params=params)
        sock = _raw_socket(attached)
        try:
            api.start(cid)
        except docker.errors.APIError as exc:
            log.warning("sandbox container did not start: %s", str(exc)[:500])
            raise HandlerFailed("the sandbox container could not be started; run `rumi doctor`") from None
        deadline = time.monotonic() + limits.timeout  # the command's own time, setup not counted
        demux = _Demux(limits.max_output_bytes)
        finished = _exchange(sock, command.stdin, demux, deadline)
        exit_code = -1
        if finished:
            try:
                status = api.wait(cid, timeout=max(0.5, deadline - time.monotonic()))
                exit_code = int(status.get("StatusCode", -1))
            except requests.exceptions.RequestException as exc:
                if _engine_failure(exc):
                    raise
                finished = False  # output closed early but the command is still running
        if not finished:
            # Hang up first: an engine still copying unread output would not finish the kill.
            _hang_up(sock)
            with contextlib.suppress(docker.errors.APIError, requests.exceptions.RequestException):
                api.kill(cid)
        oom = False
        if finished and exit_code == 137:
            with contextlib.suppress(docker.errors.APIError):
                oom = bool(api.inspect_container(cid).get("State", {}).get("OOMKilled"))
        stderr = bytes(demux.kept[2])
        if (
            finished
            and exit_code == _LAUNCHER_FAILED
            and stderr.startswith(f"rumi-sandbox:{nonce}:".encode())
        ):
            why = stderr[len(f"rumi-sandbox:{nonce}:") :].split(b"\n", 1)[0]
            if why == b"mount":
                raise Denied("a granted directory changed while the sandbox was set up; nothing was run")
            raise HandlerFailed("the sandbox refused to run the command as root")
        return SandboxResult(
            exit_code=exit_code if finished else -1,
            stdout=bytes(demux.kept[1]),
            stderr=stderr,
            timed_out=not finished,
            truncated=demux.truncated,
            duration=0.0,
            stdout_total=demux.totals[1],
            stderr_total=demux.totals[2],
            oom_killed=oom,
        )
    except requests.exceptions.ConnectionError as exc:
        if not _engine_failure(exc):
            raise
        reset_engine()
        raise Unavailable(
            "the Docker engine stopped answering; start it (scripts/ensure-docker.sh) and retry"
        ) from None
    finally:
        if attached is not None:
            _hang_up(attached)
        if cid is not None:
            _remove(api, cid)


def _hang_up(attached: Any) -> None:
    """Close the attach connection for good (shutdown too: the SDK's response holds other references)."""
    raw = getattr(attached, "_sock", attached)
    with contextlib.suppress(Exception):
        raw.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        raw.close()
    with contextlib.suppress(Exception):
        attached.close()


def _remove(api: Any, cid: str) -> None:
    """Force-remove a container, retrying once; a leftover is logged (``remove_sandboxes`` finds it)."""
    import docker.errors

    for attempt in range(2):
        try:
            api.remove_container(cid, force=True)
            return
        except docker.errors.NotFound:
            return
        except Exception as exc:
            if attempt == 1:
                log.error("could not remove sandbox container %s: %s", cid[:12], str(exc)[:200])
            else:
                time.sleep(0.2)
