"""Run a workspace's Packs in hardened containers (`rumi up` / `down` / `ps` / `stats` / `logs`).

What `rumi up` makes, for workspace tag T (`workspace_tag`) and image prefix P (default ``rumi``)::

    network  rumi-T-control         NATS's own bridge; Docker publishes ports only on a non-internal one
    network  rumi-T-pack-<id>       one per Pack: internal, a /28 from `network_pool`, bridge rumi-<hash>,
                                    no host IPv4 address on it (inhibit_ipv4), no masquerade
    container P-nats                nats-server; config dir + JetStream dir mounted at their host paths;
                                    client port on 127.0.0.1 only; on the control network and every Pack's
    container P-pack-<id>           `pack_container_settings` (the one place hardening is decided), only
                                    its own network, sandbox and credentials
    process  broker                 on the host, detached: docker/.rumi/broker.pid, broker.log
    host guard                      iptables/ip6tables INPUT drop + no IPv6 on every Pack bridge (`_guard`)

Why no host address on a Pack bridge: engines before 26 give containers on an internal network a
default route via the bridge's gateway address, and anything a container sends to a host address is
*input* on the host, which Docker's isolation rules (FORWARD) never see.  Without that address the
route leads nowhere (nobody answers ARP for it), and the guard drops input from the bridge besides.

DNS: every container on a user network asks Docker's embedded resolver, which forwards names it does
not know to the container's `dns` servers — from the host's namespace when that server is a loopback
address (CVE-2024-29018 on engines before 26).  A Pack's only upstream is therefore an address of its
own subnet that IPAM reserves and nobody holds: a query never gets past the bridge.

Everything created carries Rumi's labels (`broker.core.labels.labels`) with the workspace tag; cleanup
removes by label, exactly.  The Docker SDK is the only way this module talks to the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.containers.settings import (
    NATS_CONTAINER_PORT,
    pack_container_settings,
    pack_spec,
    pack_uid,
)
from broker.core.atomic import write_atomic
from broker.core.docker_client import docker_client
from broker.core.errors import EXIT_DENIED, Missing, RumiError, RuntimeSetupError
from broker.core.labels import (
    DEFAULT_PREFIX,
    LABEL_CONFIG_HASH,
    LABEL_MANAGED,
    LABEL_PACK,
    LABEL_ROLE,
    LABEL_WORKSPACE,
    labels,
    workspace_tag,
)
from broker.core.protocol import HeardStatus, stale_after
from broker.core.workspace import RumiConfig, Workspace

if TYPE_CHECKING:
    from broker.bus.server import StatusWatch
    from broker.containers.guard import BridgeGuard

__all__ = [
    "BROKER_SERVE_COMMAND",
    "DEFAULT_PREFIX",
    "ContainerInfo",
    "ContainerStats",
    "DockerRuntime",
    "NetworkInfo",
    "PackNetwork",
    "PackNotReady",
    "PackStart",
    "RuntimeStatus",
    "UpReport",
    "allocate_subnet",
    "bridge_name",
    "broker_log_file",
    "broker_pid_file",
    "describe_exit",
    "guard_status",
    "host_routes",
    "nats_answers",
    "running_broker_pid",
]

Progress = Callable[[str], None]

# The hidden CLI command `rumi up` starts the broker with (broker/cli/containers.py).
BROKER_SERVE_COMMAND = "serve-broker"
ROLE_PACK = "pack"
ROLE_NATS = "nats"
ROLE_PACK_NETWORK = "pack-network"
ROLE_CONTROL_NETWORK = "control-network"
NATS_UID = 65534  # the rumi-nats image's user (nobody)
NATS_MEMORY = "256m"
DNS_OPTIONS = ["timeout:1", "attempts:1"]
MIN_ENGINE_API = (1, 41)
_STATE_FILE = "docker.json"
_BROKER_READY = "rumi broker: serving"
_LOG_KEEP_BYTES = 10 * 1024 * 1024
_SUBNET_RETRIES = 8
# Engine calls in flight at once (docker-py's connection pool holds 10).
_PARALLEL = 8
# Pack containers created and started at once: starting one keeps dockerd, containerd and runc busy,
# and the Packs already started need the CPU to import and connect; more in flight only queue.
_PARALLEL_STARTS = 4
# An upgraded Pack's new container is created under ``<name>-next`` beside the one serving, and takes
# the usual name once the old one is gone.
_NEXT_SUFFIX = "-next"
# Seconds Docker waits for a replaced Pack to stop before SIGKILL: its SDK's grace for the calls it
# took (pack_runtime STOP_GRACE, 8 s) and some.
_RETIRE_STOP_TIMEOUT = 15


def _quiet(_: str) -> None:
    """Progress sink that drops every message."""


class PackNotReady(RuntimeSetupError):
    """A Pack `rumi up` started did not become ready (an upgrade is rolled back): a check failed, exit 1."""

    exit_code = EXIT_DENIED


def describe_exit(
    exit_code: int | None, oom_killed: bool, memory_limit: int = 0, status: str | None = None
) -> str:
    """What ended a container, as a phrase: ``was OOM-killed at its 48 MiB memory limit``, ``exited with code 1``.

    `status` is Docker's state: "restarting" adds that Docker restarts it, "paused" is said as such.
    """
    if status == "paused":
        return "is paused"
    if oom_killed:
        what = "was OOM-killed" + (f" at its {_mib(memory_limit)} memory limit" if memory_limit else "")
    elif exit_code is None:
        what = "stopped"
    elif exit_code == 0:
        what = "exited (code 0)"
    elif exit_code > 128:
        what = f"was killed by signal {exit_code - 128} (exit code {exit_code})"
    else:
        what = f"exited with code {exit_code}"
    if status == "restarting":
        what += "; Docker is restarting it"
    return what


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def _incident(attrs: dict[str, Any]) -> str | None:
    """A Pack container's last abnormal end (and restarts) from `docker inspect`, or None if there is none.

    Docker keeps OOMKilled set after a restart, so an OOM kill stays visible while the container exists.
    """
    state = attrs.get("State") or {}
    restarts = int(attrs.get("RestartCount") or 0)
    status = str(state.get("Status") or "")
    code = state.get("ExitCode")
    oom = bool(state.get("OOMKilled"))
    parts = []
    if oom or (status in ("exited", "dead", "restarting") and code not in (None, 0)):
        memory = int((attrs.get("HostConfig") or {}).get("Memory") or 0)
        what = describe_exit(code if status != "running" else None, oom, memory)
        when = str(state.get("FinishedAt") or "")[:19].replace("T", " ")
        parts.append(f"{what}{f' (last at {when} UTC)' if when and not when.startswith('0001') else ''}")
    if restarts:
        parts.append(f"restarted {restarts} time{'s' if restarts != 1 else ''}")
    return "; ".join(parts) or None


# ------------------------------------------------------------------------------------- names


def bridge_name(tag: str, key: str) -> str:
    """Linux bridge name for network `key` of workspace `tag`: ``rumi-`` + 10 hex (15 chars, the limit)."""
    return "rumi-" + hashlib.sha256(f"{tag}:{key}".encode()).hexdigest()[:10]


def broker_pid_file(ws: Workspace) -> Path:
    """Pidfile of the broker `rumi up` started."""
    return ws.state / "broker.pid"


def broker_log_file(ws: Workspace) -> Path:
    """Log (stdout and stderr) of the broker `rumi up` started."""
    return ws.state / "broker.log"


def _state_file(ws: Workspace) -> Path:
    return ws.state / _STATE_FILE


# ---------------------------------------------------------------------------------- subnets


def host_routes(route_file: Path = Path("/proc/net/route")) -> list[ipaddress.IPv4Network]:
    """IPv4 destinations of the host's main routing table (the default route left out)."""
    out: list[ipaddress.IPv4Network] = []
    try:
        lines = route_file.read_text().splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) < 8:
            continue
        try:
            dest = int(parts[1], 16)
            mask = int(parts[7], 16)
        except ValueError:
            continue
        if mask == 0:
            continue
        # /proc/net/route prints addresses in host (little-endian) byte order.
        d = ipaddress.IPv4Address(int.from_bytes(dest.to_bytes(4, "little"), "big"))
        m = ipaddress.IPv4Address(int.from_bytes(mask.to_bytes(4, "little"), "big"))
        with contextlib.suppress(ValueError):
            out.append(ipaddress.IPv4Network(f"{d}/{m}", strict=False))
    return out


def _docker_subnets(client: Any) -> list[ipaddress.IPv4Network]:
    out: list[ipaddress.IPv4Network] = []
    for net in client.networks.list():
        for conf in (net.attrs.get("IPAM") or {}).get("Config") or []:
            subnet = conf.get("Subnet")
            if not subnet:
                continue
            with contextlib.suppress(ValueError):
                parsed = ipaddress.ip_network(subnet, strict=False)
                if isinstance(parsed, ipaddress.IPv4Network):
                    out.append(parsed)
    return out


def allocate_subnet(
    pool: str, prefix_length: int, used: Iterable[ipaddress.IPv4Network]
) -> ipaddress.IPv4Network:
    """The first /`prefix_length` of `pool` that overlaps none of `used`.

    Linear in len(used) plus the answer's index: fast for thousands of networks.
    """
    try:
        net = ipaddress.ip_network(pool, strict=True)
    except ValueError as exc:
        raise RuntimeSetupError(
            f"docker/config.json: network_pool {pool!r} is not a network ({exc})"
        ) from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise RuntimeSetupError(f"docker/config.json: network_pool {pool!r} must be an IPv4 network")
    if not (net.prefixlen <= prefix_length <= 29):
        raise RuntimeSetupError(
            f"docker/config.json: network_prefix_length {prefix_length} must be between the pool's "
            f"/{net.prefixlen} and /29 (a Pack network needs 8 addresses)"
        )
    size = 1 << (32 - prefix_length)
    start = int(net.network_address)
    end = int(net.broadcast_address)
    count = (end - start + 1) // size
    blocked: set[int] = set()
    for other in used:
        o_start, o_end = int(other.network_address), int(other.broadcast_address)
        if o_end < start or o_start > end:
            continue
        first = (max(o_start, start) - start) // size
        last = (min(o_end, end) - start) // size
        blocked.update(range(first, last + 1))
    for index in range(count):
        if index not in blocked:
            return ipaddress.IPv4Network((start + index * size, prefix_length))
    raise RuntimeSetupError(
        f"network_pool {pool} has no free /{prefix_length} left: give docker/config.json a larger "
        "network_pool (or remove unused Docker networks)"
    )


# ------------------------------------------------------------------------------ value types


@dataclass(frozen=True)
class PackNetwork:
    """One Pack's internal network and the fixed addresses in it."""

    pack_id: str
    name: str
    id: str
    bridge: str
    subnet: str

    @property
    def _net(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def nats_ip(self) -> str:
        """The NATS container's address on this network (the first after the gateway)."""
        return str(self._net[2])

    @property
    def dns_sink(self) -> str:
        """Reserved, never assigned: the only upstream the Pack's DNS resolver may forward to."""
        return str(self._net[-2])

    @property
    def nats_url(self) -> str:
        """The URL a Pack on this network uses."""
        return f"nats://{self.nats_ip}:{NATS_CONTAINER_PORT}"


@dataclass(frozen=True)
class PackStart:
    """How one Pack came up: the states it went through, and seconds from its create to its "ready"."""

    pack_id: str
    container: str
    created: bool
    seconds_to_ready: float
    states: tuple[str, ...] = ()

    @property
    def seconds_to_healthy(self) -> float:
        """The former name of `seconds_to_ready` (a Pack is up when its SDK says "ready")."""
        return self.seconds_to_ready


@dataclass(frozen=True)
class UpReport:
    """What `up` did."""

    nats_url: str
    broker_pid: int
    packs: list[PackStart]
    seconds: float


@dataclass(frozen=True)
class ContainerInfo:
    """One container of the workspace, for `rumi ps`."""

    name: str
    role: str
    pack_id: str | None
    state: str
    health: str | None
    image: str
    addresses: dict[str, str]
    ports: list[str]
    # A Pack's last status on rumi.pack.<id>.status (ready, alive, stopping) and its age in seconds;
    # None when none was heard (or NATS did not answer).
    heartbeat: str | None = None
    heartbeat_age: float | None = None
    # Seconds of silence after which the Pack counts as unavailable (3 heartbeat intervals).
    heartbeat_stale_after: float | None = None
    # Docker's restart count, and the container's last abnormal end ("was OOM-killed at its 48 MiB
    # memory limit (last at ...); restarted 1 time"), None when there is none.
    restarts: int = 0
    incident: str | None = None

    @property
    def live(self) -> bool:
        """The Pack said ready or alive within its stale time."""
        return (
            self.heartbeat in ("ready", "alive")
            and self.heartbeat_age is not None
            and self.heartbeat_stale_after is not None
            and self.heartbeat_age <= self.heartbeat_stale_after
        )


@dataclass(frozen=True)
class NetworkInfo:
    """One network of the workspace, for `rumi ps`."""

    name: str
    role: str
    pack_id: str | None
    subnet: str
    bridge: str
    internal: bool
    guard: str  # "active", "missing: ...", "n/a"


@dataclass(frozen=True)
class RuntimeStatus:
    """Everything `rumi ps` shows."""

    workspace: str
    containers: list[ContainerInfo]
    networks: list[NetworkInfo]
    broker_pid: int | None
    nats_url: str | None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class ContainerStats:
    """Resource use of one container (one sample)."""

    name: str
    role: str
    pack_id: str | None
    memory_bytes: int
    memory_limit: int
    pids: int
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------- broker


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def running_broker_pid(ws: Workspace) -> int | None:
    """Pid of the broker `rumi up` started for this workspace, if it still runs (checked in /proc)."""
    try:
        text = broker_pid_file(ws).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not text.isdigit():
        return None
    pid = int(text)
    argv = _cmdline(pid)
    # Pids get reused: only a process running our broker command for this root is ours.
    if b"broker.cli" not in argv or BROKER_SERVE_COMMAND.encode() not in argv:
        return None
    if os.fsencode(str(ws.root)) not in argv:
        return None
    return pid


def _broker_argv(ws: Workspace, workers: int) -> list[str]:
    argv = [sys.executable, "-m", "broker.cli", BROKER_SERVE_COMMAND, "--root", str(ws.root)]
    return [*argv, "--workers", str(workers)]


def default_workers() -> int:
    """Broker processes under `rumi up`: one per core."""
    return max(1, os.cpu_count() or 1)


def start_broker(
    ws: Workspace, timeout: float = 30, progress: Progress = _quiet, workers: int | None = None
) -> int:
    """Start the broker detached (or find it running); wait until it serves; return its pid."""
    pid = running_broker_pid(ws)
    if pid is not None:
        progress(f"broker: running (pid {pid})")
        return pid
    log = broker_log_file(ws)
    log.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if log.stat().st_size > _LOG_KEEP_BYTES:
            os.replace(log, log.with_name(log.name + ".1"))
    offset = log.stat().st_size if log.exists() else 0
    env = dict(os.environ)
    # The broker package must import from anywhere: put its parent directory first on the path.
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            _broker_argv(ws, workers or default_workers()),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd="/",
            env=env,
            start_new_session=True,  # detached: a terminal's Ctrl-C does not reach it; `rumi down` does
            close_fds=True,
        )
    write_atomic(broker_pid_file(ws), f"{proc.pid}\n", mode=0o600, fsync=False)
    deadline = time.monotonic() + timeout
    while True:
        text = _read_from(log, offset)
        if _BROKER_READY in text:
            progress(f"broker: serving (pid {proc.pid}, log {log})")
            return proc.pid
        code = proc.poll()
        if code is not None:
            broker_pid_file(ws).unlink(missing_ok=True)
            raise RuntimeSetupError(
                f"the broker exited with code {code}: {_last_line(text) or 'no output'} (log {log})"
            )
        if time.monotonic() > deadline:
            _terminate(proc.pid, 5)
            broker_pid_file(ws).unlink(missing_ok=True)
            raise RuntimeSetupError(f"the broker did not start serving within {timeout:g} s (log {log})")
        time.sleep(0.1)


def stop_broker(ws: Workspace, timeout: float = 15) -> int | None:
    """Stop the broker `rumi up` started (SIGTERM, then SIGKILL); return its pid, or None if none ran."""
    pid = running_broker_pid(ws)
    if pid is not None:
        _terminate(pid, timeout)
    broker_pid_file(ws).unlink(missing_ok=True)
    return pid


def _terminate(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if not _alive(pid):
            return
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    # Our own child becomes a zombie until reaped: reap it, or /proc still shows it.
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


# ------------------------------------------------------------------------------ Pack status


class StatusListener:
    """Pack statuses heard as `cli` on rumi.pack.*.status, in a thread of its own.

    nats-py is asyncio and `up` is not: the listener runs its own event loop in a daemon thread.
    `start` also makes sure the RUMI_STATUS stream exists and reads the last status of `pack_ids`
    from it (`snapshot`), so a Pack that already runs counts as soon as its stored heartbeat is fresh.
    """

    def __init__(self, ws: Workspace, pack_ids: Sequence[str]) -> None:
        self.ws = ws
        self.pack_ids = sorted(set(pack_ids))
        self.snapshot: dict[str, HeardStatus] = {}
        self.changed = threading.Event()
        self.error: BaseException | None = None
        self._watch: StatusWatch | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_requested = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rumi-status", daemon=True)

    def start(self, *, wait: bool = True) -> None:
        """Connect and subscribe in the background; with `wait`, return once subscribed."""
        self._thread.start()
        if wait:
            self.wait_started()

    def wait_started(self, timeout: float = 20) -> None:
        """Block until the subscription is in place; RuntimeSetupError if it could not be made."""
        if not self._started.wait(timeout):
            raise RuntimeSetupError(f"could not subscribe to Pack status within {timeout:g} s")
        if self.error is not None:
            raise RuntimeSetupError(f"cannot hear Pack status: {self.error}")

    def last(self, pack_id: str) -> HeardStatus | None:
        """The Pack's latest status heard live since `start`."""
        watch = self._watch
        return watch.last.get(pack_id) if watch is not None else None

    def ready_at(self, pack_id: str) -> float | None:
        """When (monotonic) the Pack last said "ready", since `start`."""
        watch = self._watch
        return watch.ready_at.get(pack_id) if watch is not None else None

    def stop(self) -> None:
        """Close the connection and end the thread (bounded), also when it is still connecting."""
        self._stop_requested.set()
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        from broker.bus.server import StatusWatch, connect, ensure_status_stream, last_statuses

        # `stop` sets the flag, then reads these two; here they are set, then the flag is read.
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if self._stop_requested.is_set():
            self._started.set()
            return
        nc = None
        try:
            await ensure_status_stream(self.ws)
            nc = await connect(self.ws, "cli")
            self._watch = StatusWatch(on_status=lambda _: self.changed.set())
            await self._watch.start(nc)
            self.snapshot = await last_statuses(nc, self.pack_ids)
            self._started.set()
            await self._stop.wait()
        except Exception as exc:
            self.error = exc
        finally:
            self._started.set()
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()


def read_statuses(ws: Workspace, pack_ids: Sequence[str], timeout: float = 3) -> dict[str, HeardStatus]:
    """The last status RUMI_STATUS holds for each Pack; empty when NATS or the stream does not answer."""
    from broker.bus.server import connect, last_statuses

    if not pack_ids:
        return {}

    async def read() -> dict[str, HeardStatus]:
        nc = await connect(ws, "cli", initial_timeout=timeout, max_reconnect_attempts=0)
        try:
            return await last_statuses(nc, pack_ids, timeout=timeout)
        finally:
            await nc.close()

    try:
        return asyncio.run(asyncio.wait_for(read(), timeout * 2))
    except (TimeoutError, RumiError, OSError):
        return {}


class _UpTracker:
    """What `rumi up` says about its Packs: one line when a Pack settles, a summary every few seconds.

    ``pack default: created → started → ready (0.8 s)``; ``packs: 12 ready, 6 started, 2 created (3 s)``.
    Called from the starting threads and the waiting one: every line is written under a lock.
    """

    ORDER = ("pending", "already running", "created", "started", "ready", "failed")

    def __init__(self, progress: Progress, pack_ids: Sequence[str]) -> None:
        self._progress = progress
        self._lock = threading.Lock()
        self._states: dict[str, list[str]] = {p: [] for p in pack_ids}
        self._shown = ""
        self._shown_at = time.monotonic()

    def state(self, pack_id: str, state: str) -> None:
        with self._lock:
            self._states[pack_id].append(state)

    def states_of(self, pack_id: str) -> list[str]:
        with self._lock:
            return list(self._states[pack_id])

    def current(self, pack_id: str) -> str:
        with self._lock:
            states = self._states[pack_id]
            return states[-1] if states else "pending"

    def settle(self, pack_id: str, final: str, seconds: float, detail: str = "") -> None:
        with self._lock:
            self._states[pack_id].append(final)
            line = f"pack {pack_id}: {' → '.join(self._states[pack_id])} ({seconds:.1f} s)"
            self._progress(f"{line}: {detail}" if detail else line)

    def summary(self, elapsed: float) -> None:
        """A count per state, at most every 2 s, and only while more than one Pack is still moving."""
        now = time.monotonic()
        with self._lock:
            if now - self._shown_at < 2.0:
                return
            latest = [s[-1] if s else "pending" for s in self._states.values()]
            if sum(1 for s in latest if s not in ("ready", "failed")) < 2:
                return
            counts = {state: latest.count(state) for state in self.ORDER if latest.count(state)}
            text = ", ".join(f"{n} {state}" for state, n in counts.items())
            if text == self._shown and now - self._shown_at < 10.0:
                return
            self._shown, self._shown_at = text, now
            self._progress(f"packs: {text} ({elapsed:.0f} s)")


def _names(pack_ids: Sequence[str], shown: int = 10) -> str:
    head = ", ".join(pack_ids[:shown])
    return head if len(pack_ids) <= shown else f"{head} and {len(pack_ids) - shown} more"


# --------------------------------------------------------------------------------- runtime


class DockerRuntime:
    """The containers, networks, guard and broker of one workspace on one engine."""

    def __init__(
        self,
        ws: Workspace,
        client: Any | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        progress: Progress | None = None,
        heartbeat_interval: float | None = None,
    ) -> None:
        from broker.containers.images import image_tag

        image_tag("nats", prefix)  # validates the prefix
        self.ws = ws
        self.prefix = prefix
        self.tag = workspace_tag(ws)
        self.progress = progress or _quiet
        # Seconds between the Packs' status heartbeats (None: the SDK's default, 5 s).
        self.heartbeat_interval = heartbeat_interval
        self._client = client

    # -- engine

    @property
    def client(self) -> Any:
        """The Docker client (connected on first use)."""
        if self._client is None:
            self._client = docker_client()
        return self._client

    def engine_version(self) -> tuple[str, str]:
        """(engine version, API version)."""
        info = self.client.version()
        return str(info.get("Version", "?")), str(info.get("ApiVersion", "?"))

    # -- names

    @property
    def nats_container_name(self) -> str:
        """``<prefix>-nats`` (``rumi-nats`` by default)."""
        return f"{self.prefix}-nats"

    def pack_container_name(self, pack_id: str) -> str:
        """``<prefix>-pack-<id>``."""
        return f"{self.prefix}-pack-{pack_id}"

    @property
    def control_network_name(self) -> str:
        """NATS's own network."""
        return f"rumi-{self.tag}-control"

    def pack_network_name(self, pack_id: str) -> str:
        """A Pack's internal network."""
        return f"rumi-{self.tag}-pack-{pack_id}"

    def pack_creds_dir(self, pack_id: str) -> Path:
        """The directory mounted at /run/rumi in the Pack: its own seed and nothing else."""
        return self.ws.state / "packcreds" / pack_id

    def _filters(self, role: str | None = None, pack_id: str | None = None) -> dict[str, Any]:
        wanted = [f"{LABEL_MANAGED}=true", f"{LABEL_WORKSPACE}={self.tag}"]
        if role is not None:
            wanted.append(f"{LABEL_ROLE}={role}")
        if pack_id is not None:
            wanted.append(f"{LABEL_PACK}={pack_id}")
        return {"label": wanted}

    # -- images

    def ensure_images(self, pack_ids: Sequence[str], *, build: bool) -> dict[str, str]:
        """Tags of the NATS image and each Pack's image; built (or reused) when `build`."""
        from broker.containers.images import (
            build_base_image,
            build_nats_image,
            build_sandbox_image,
            image_tag,
        )
        from broker.containers.packimage import build_pack_image, pack_image_tag, stale_source_warning

        cfg = self.ws.load_config()
        tags: dict[str, str] = {}
        if build:
            self.progress("images: NATS, base, sandbox and Pack images (reused when unchanged)")
            tags["nats"] = build_nats_image(self.client, self.prefix, self.progress)
            build_base_image(self.client, self.prefix, self.progress, cfg.allow_pull)
            # The terminal handler runs commands in it: a Pack's first `ctx.terminal` must not wait for a build.
            build_sandbox_image(self.client, self.prefix, self.progress)
            for pack_id in pack_ids:
                tags[f"pack:{pack_id}"] = build_pack_image(
                    self.client, self.ws, pack_id, prefix=self.prefix, progress=self.progress
                )
            return tags
        tags["nats"] = image_tag("nats", self.prefix)
        for pack_id in pack_ids:
            tags[f"pack:{pack_id}"] = pack_image_tag(pack_id, self.prefix)
        missing = [t for t in tags.values() if not self.image_exists(t)]
        if missing:
            raise Missing(f"image {missing[0]} is missing: run `rumi build` (or `rumi up --build`)")
        for pack_id in pack_ids:  # --no-build: say so when a Pack's image predates its source
            if warning := stale_source_warning(self.client, self.ws, pack_id, tags[f"pack:{pack_id}"]):
                self.progress(warning)
        return tags

    def image_exists(self, tag: str) -> bool:
        import docker.errors

        try:
            self.client.images.get(tag)
        except docker.errors.ImageNotFound:
            return False
        return True

    # -- networks

    def pack_networks(self) -> dict[str, PackNetwork]:
        """This workspace's Pack networks, by pack id."""
        out: dict[str, PackNetwork] = {}
        for net in self.client.networks.list(filters=self._filters(ROLE_PACK_NETWORK)):
            info = self._pack_network_from(net)
            if info is not None:
                out[info.pack_id] = info
        return out

    def _pack_network_from(self, net: Any) -> PackNetwork | None:
        attrs = net.attrs
        pack_id = (attrs.get("Labels") or {}).get(LABEL_PACK)
        configs = (attrs.get("IPAM") or {}).get("Config") or []
        bridge = (attrs.get("Options") or {}).get("com.docker.network.bridge.name", "")
        if not pack_id or not configs:
            return None
        return PackNetwork(pack_id, str(attrs["Name"]), str(attrs["Id"]), bridge, str(configs[0]["Subnet"]))

    def ensure_control_network(self) -> Any:
        """NATS's network: a plain bridge (the host reaches NATS through the published port)."""
        name = self.control_network_name
        existing = self.client.networks.list(filters=self._filters(ROLE_CONTROL_NETWORK))
        if existing:
            return existing[0]
        options = {
            "com.docker.network.bridge.name": bridge_name(self.tag, "control"),
            # NATS never initiates a connection: nothing of it needs to leave this host.
            "com.docker.network.bridge.enable_ip_masquerade": "false",
        }
        return self._create_network(name, labels(self.tag, ROLE_CONTROL_NETWORK), options, internal=False)

    def ensure_pack_network(self, pack_id: str) -> PackNetwork:
        """The Pack's internal network (created with a free subnet from the pool when missing)."""
        return self.ensure_pack_networks([pack_id])[pack_id]

    def ensure_pack_networks(self, pack_ids: Sequence[str]) -> dict[str, PackNetwork]:
        """Every Pack network of the workspace, by pack id, after creating those `pack_ids` lack.

        One listing of the engine's networks, subnets chosen for all missing networks at once, then
        created concurrently (a subnet someone else took meanwhile is retried with the next free one).
        """
        return self._ensure_pack_networks(pack_ids)[0]

    def _ensure_pack_networks(self, pack_ids: Sequence[str]) -> tuple[dict[str, PackNetwork], list[str]]:
        networks: dict[str, PackNetwork] = {}
        for net in self.client.networks.list(filters=self._filters(ROLE_PACK_NETWORK)):
            info = self._pack_network_from(net)
            if info is not None and info.pack_id not in networks:
                networks[info.pack_id] = info
                if info.pack_id in pack_ids:
                    self._check_pack_network(net)
        missing = sorted(set(pack_ids) - set(networks))
        if not missing:
            return networks, []
        cfg = self.ws.load_config()
        used = [*_docker_subnets(self.client), *host_routes()]
        chosen: dict[str, ipaddress.IPv4Network] = {}
        for pack_id in missing:
            chosen[pack_id] = allocate_subnet(cfg.network_pool, cfg.network_prefix_length, used)
            used.append(chosen[pack_id])

        def create(pack_id: str) -> PackNetwork:
            bridge = bridge_name(self.tag, f"pack:{pack_id}")
            options = {
                "com.docker.network.bridge.name": bridge,
                "com.docker.network.bridge.enable_ip_masquerade": "false",
                # No host address on the Pack bridge: the container's default route leads nowhere.
                "com.docker.network.bridge.inhibit_ipv4": "true",
                "com.docker.network.bridge.enable_icc": "true",
            }
            net = self._create_network(
                self.pack_network_name(pack_id),
                labels(self.tag, ROLE_PACK_NETWORK, pack_id),
                options,
                internal=True,
                subnet=chosen[pack_id],
            )
            info = self._pack_network_from(net)
            if info is None:  # pragma: no cover - we just created it with these fields
                raise RuntimeSetupError(f"network {net.name} has no subnet")
            return info

        with ThreadPoolExecutor(max_workers=min(_PARALLEL, len(missing))) as pool:
            for info in pool.map(create, missing):
                networks[info.pack_id] = info
        return networks, missing

    def _check_pack_network(self, net: Any) -> None:
        attrs = net.attrs
        options = attrs.get("Options") or {}
        if not (
            attrs.get("Internal") is True
            and options.get("com.docker.network.bridge.inhibit_ipv4") == "true"
            and options.get("com.docker.network.bridge.enable_ip_masquerade") == "false"
        ):
            raise RuntimeSetupError(
                f"network {attrs.get('Name')} does not have Rumi's settings (internal, no host address):"
                " run `rumi down`, then `rumi up`"
            )

    def _create_network(
        self,
        name: str,
        net_labels: dict[str, str],
        options: dict[str, str],
        *,
        internal: bool,
        subnet: ipaddress.IPv4Network | None = None,
    ) -> Any:
        """Create a bridge network on `subnet` (else the pool's first free one); the inspected network."""
        import docker.errors
        from docker.types import IPAMConfig, IPAMPool

        cfg = self.ws.load_config()
        taken: list[ipaddress.IPv4Network] = []
        last_error = ""
        for attempt in range(_SUBNET_RETRIES):
            if subnet is None or attempt > 0:
                used = [*_docker_subnets(self.client), *host_routes(), *taken]
                subnet = allocate_subnet(cfg.network_pool, cfg.network_prefix_length, used)
            pool = IPAMPool(
                subnet=str(subnet),
                gateway=str(subnet[1]),
                # Reserved so IPAM never hands it out: the Pack's DNS upstream that nobody holds.
                aux_addresses={"rumi-dns-sink": str(subnet[-2])},
            )
            try:
                net = self.client.networks.create(
                    name,
                    driver="bridge",
                    internal=internal,
                    check_duplicate=True,
                    ipam=IPAMConfig(pool_configs=[pool]),
                    options=options,
                    labels=net_labels,
                    enable_ipv6=False,
                )
            except docker.errors.APIError as exc:
                last_error = _api_message(exc)
                if "overlap" in last_error.lower():
                    # Another process took it between our look and our create: try the next one.
                    taken.append(subnet)
                    continue
                raise RuntimeSetupError(f"cannot create network {name}: {last_error}") from None
            return net  # networks.create returns the inspected network
        raise RuntimeSetupError(f"cannot create network {name}: {last_error}")

    def install_guards(self, bridges: Sequence[str]) -> None:
        """The host guard on every bridge in `bridges`, batched (`guard.install_guards`)."""
        from broker.containers.guard import install_guards

        install_guards(bridges, self.tag)

    def remove_guards(self, bridges: Iterable[str] = ()) -> list[str]:
        """Remove every guard rule of this workspace; the bridges that had one, and those in `bridges`."""
        from broker.containers.guard import remove_guards

        return remove_guards(self.tag, bridges)

    # -- NATS

    def nats_host_port(self) -> int:
        """The host port NATS is published on (127.0.0.1 only)."""
        return self.ws.load_config().nats_port

    def _nats_container(self) -> Any | None:
        found = self.client.containers.list(all=True, filters=self._filters(ROLE_NATS))
        return found[0] if found else None

    def write_nats_config(self, pack_ids: Sequence[str]) -> bool:
        """Write the container's NATS config; True when it changed."""
        from broker.bus.config import config_dir, config_path, render_config, write_config

        cfg = self.ws.load_config()
        text = render_config(self.ws, cfg, pack_ids, port=NATS_CONTAINER_PORT, listen_host="0.0.0.0")
        try:
            old = config_path(self.ws).read_text(encoding="utf-8")
        except FileNotFoundError:
            old = ""
        if old != text:
            write_config(self.ws, cfg, pack_ids, NATS_CONTAINER_PORT, listen_host="0.0.0.0")
        # The server runs as an unprivileged uid: the directory must be listable, the file readable.
        os.chmod(config_dir(self.ws), 0o755)  # noqa: S103 - holds public keys only
        os.chmod(config_path(self.ws), 0o644)
        return old != text

    def prepare_jetstream_dir(self) -> Path:
        from broker.bus.config import jetstream_dir

        store = jetstream_dir(self.ws)
        store.mkdir(parents=True, exist_ok=True)
        # The container's nats-server is uid 65534; an embedded (root) server may have left files here.
        for dirpath, dirnames, filenames in os.walk(store):
            for name in [*dirnames, *filenames]:
                os.lchown(os.path.join(dirpath, name), NATS_UID, NATS_UID)
        os.chown(store, NATS_UID, NATS_UID)
        os.chmod(store, 0o700)
        return store

    def nats_settings(self, image: str, host_port: int) -> dict[str, Any]:
        """Docker SDK kwargs of the NATS container (no side effects; `ensure_nats` prepares the dirs)."""
        from broker.bus.config import config_dir, config_path, jetstream_dir

        conf_dir = str(config_dir(self.ws))
        store = str(jetstream_dir(self.ws))
        return {
            "image": image,
            "name": self.nats_container_name,
            "command": ["--config", str(config_path(self.ws))],
            "user": f"{NATS_UID}:{NATS_UID}",
            "labels": labels(self.tag, ROLE_NATS),
            "network": self.control_network_name,
            # The client port for the broker and CLI on this host only; the monitoring port is off.
            "ports": {f"{NATS_CONTAINER_PORT}/tcp": ("127.0.0.1", host_port)},
            # Mounted whole, at the host paths: the generated config works unchanged, and a reload
            # after an atomic rename reads the new file (a single-file mount would keep the old inode).
            "volumes": {
                conf_dir: {"bind": conf_dir, "mode": "ro"},
                store: {"bind": store, "mode": "rw"},
            },
            "read_only": True,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges:true"],
            "mem_limit": NATS_MEMORY,
            "memswap_limit": NATS_MEMORY,
            "cpu_shares": 1024,
            "pids_limit": 256,
            "ipc_mode": "private",
            # NATS sits on every Pack's network: its namespace must never route between them.
            "sysctls": {"net.ipv4.ip_forward": "0"},
            "restart_policy": {"Name": "on-failure", "MaximumRetryCount": 5},
            "log_config": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}},
            "stop_signal": "SIGTERM",
            "detach": True,
        }

    def ensure_nats(self, image: str, pack_ids: Sequence[str], networks: Sequence[PackNetwork]) -> str:
        """Start (or reload) the NATS container for `pack_ids`, attach it to `networks`; return the host URL."""
        import docker.errors

        from broker.bus.server import url_file

        host_port = self.nats_host_port()
        changed = self.write_nats_config(pack_ids)
        self.prepare_jetstream_dir()
        settings = self.nats_settings(image, host_port)
        settings["labels"] = {**settings["labels"], LABEL_CONFIG_HASH: self._settings_hash(settings)}
        container = self._nats_container()
        if container is not None and (
            container.labels.get(LABEL_CONFIG_HASH) != settings["labels"][LABEL_CONFIG_HASH]
            or container.status not in ("running", "created")
        ):
            self.progress(
                f"nats: replacing {container.name} ({container.status}, settings changed or stopped)"
            )
            container.remove(force=True)
            container = None
        if container is None:
            self._claim_name(self.nats_container_name)
            self.progress(f"nats: starting {self.nats_container_name} (127.0.0.1:{host_port})")
            container = self.client.containers.create(**settings)
            self._attach(container, networks)
            try:
                container.start()
            except docker.errors.APIError as exc:
                msg = _api_message(exc)
                container.remove(force=True)
                if "address already in use" in msg or "port is already allocated" in msg:
                    raise RuntimeSetupError(
                        f"cannot publish NATS on 127.0.0.1:{host_port} (in use): set another nats_port in docker/config.json"
                    ) from None
                raise RuntimeSetupError(f"cannot start {self.nats_container_name}: {msg}") from None
        else:
            self._attach(container, networks)
            if container.status == "created":
                container.start()
            elif changed:
                self.reload_nats(container)
        url = f"nats://127.0.0.1:{host_port}"
        self._await_nats(container, host_port)
        write_atomic(url_file(self.ws), url + "\n", mode=0o644, fsync=False)
        return url

    def _attach(self, container: Any, networks: Sequence[PackNetwork]) -> None:
        """Attach NATS to each of `networks` it is not on yet, at its fixed address (concurrently)."""
        import docker.errors

        container.reload()
        attached = set((container.attrs.get("NetworkSettings") or {}).get("Networks") or {})
        todo = [net for net in networks if net.name not in attached]

        def attach(net: PackNetwork) -> None:
            try:
                self.client.api.connect_container_to_network(container.id, net.id, ipv4_address=net.nats_ip)
            except docker.errors.APIError as exc:
                raise RuntimeSetupError(f"cannot attach NATS to {net.name}: {_api_message(exc)}") from None

        if todo:
            with ThreadPoolExecutor(max_workers=min(_PARALLEL, len(todo))) as pool:
                list(pool.map(attach, todo))

    def reload_nats(self, container: Any | None = None, timeout: float = 10) -> None:
        """SIGHUP the NATS container twice, each time awaiting its "Reloaded" log line.

        Twice: an account added by a reload answers "no responders" through its imports until a
        second, identical reload (nats-server 2.15.1).
        """
        container = container or self._nats_container()
        if container is None:
            raise RuntimeSetupError("the NATS container is not running: `rumi up` starts it")
        for _ in range(2):
            before = _count_lines(container, "Reloaded server configuration")
            failed_before = _count_lines(container, "Failed to reload")
            container.kill(signal="SIGHUP")
            deadline = time.monotonic() + timeout
            while True:
                if _count_lines(container, "Failed to reload") > failed_before:
                    raise RuntimeSetupError("nats-server rejected the new config: see `rumi logs --nats`")
                if _count_lines(container, "Reloaded server configuration") > before:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeSetupError(f"nats-server did not confirm the reload within {timeout:g} s")
                time.sleep(0.05)
        self.progress("nats: configuration reloaded")

    def _await_nats(self, container: Any, host_port: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not nats_answers("127.0.0.1", host_port):
            container.reload()
            if container.status in ("exited", "dead"):
                tail = container.logs(tail=5).decode("utf-8", "replace")
                raise RuntimeSetupError(f"{container.name} exited: {_last_line(tail) or 'no output'}")
            if time.monotonic() > deadline:
                raise RuntimeSetupError(f"NATS did not answer on 127.0.0.1:{host_port} within {timeout:g} s")
            time.sleep(0.1)

    # -- Packs

    def prepare_pack_files(self, pack_id: str) -> Path:
        """Copy the Pack's seed into its own credentials dir (0500/0400, its uid); make its sandbox."""
        from broker.bus.creds import pack_identity

        uid = pack_uid(pack_id)
        seed = pack_identity(self.ws, pack_id).seed_path.read_bytes()
        parent = self.pack_creds_dir(pack_id).parent
        parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(parent, 0o700)
        target_dir = self.pack_creds_dir(pack_id)
        target_dir.mkdir(exist_ok=True)
        target = target_dir / f"{pack_id}.nk"
        current = target.read_bytes() if target.is_file() and not target.is_symlink() else None
        if current != seed:
            write_atomic(target, seed, mode=0o400, fsync=False, owner=(uid, uid))
        os.chown(target, uid, uid)
        os.chmod(target, 0o400)
        os.chown(target_dir, uid, uid)
        os.chmod(target_dir, 0o500)
        sandbox = self.ws.pack_work_area(pack_id)
        sandbox.mkdir(parents=True, exist_ok=True)
        os.chown(sandbox, uid, uid)
        os.chmod(sandbox, 0o700)
        return target_dir

    def pack_settings(self, pack_id: str, image: str, net: PackNetwork, cfg: RumiConfig) -> dict[str, Any]:
        """The docker SDK kwargs for a Pack: `pack_container_settings` plus this runtime's names and DNS."""
        spec = pack_spec(
            self.ws,
            cfg,
            pack_id,
            image=image,
            network=net.name,
            nats_url=net.nats_url,
            creds_dir=self.pack_creds_dir(pack_id),
        )
        if self.heartbeat_interval is not None:
            spec = replace(spec, heartbeat_interval=self.heartbeat_interval)
        settings = pack_container_settings(spec)
        settings["name"] = self.pack_container_name(pack_id)
        # The embedded resolver's only upstream: a reserved address of the Pack's own subnet.
        settings.setdefault("dns", [net.dns_sink])
        settings.setdefault("dns_opt", list(DNS_OPTIONS))
        settings.setdefault("dns_search", ["invalid"])
        return settings

    def _claim_name(self, name: str) -> None:
        """Remove a container of ours with this name; refuse when someone else's holds it."""
        import docker.errors

        try:
            other = self.client.containers.get(name)
        except docker.errors.NotFound:
            return
        mine = other.labels.get(LABEL_WORKSPACE) == self.tag and other.labels.get(LABEL_MANAGED) == "true"
        if not mine:
            owner = other.labels.get(LABEL_WORKSPACE)
            whose = f"Rumi workspace {owner}" if owner else "something that is not this Rumi workspace"
            raise RuntimeSetupError(
                f"container name {name} is taken by {whose}: `rumi down` there, or use another --prefix"
            )
        other.remove(force=True)

    def start_pack(
        self,
        pack_id: str,
        image: str,
        net: PackNetwork,
        cfg: RumiConfig,
        *,
        current: Sequence[Any] | None = None,
        on_state: Callable[[str], None] | None = None,
        replacing: dict[str, Any] | None = None,
    ) -> tuple[Any, bool, float]:
        """Create and start the Pack's container unless an identical one runs; (container, created, t0).

        `current` is this Pack's containers as a sparse listing found them (listed here when None);
        `on_state` hears "already running", "created" and "started"; t0 is when the create began.

        An upgrade (a running container with other settings or another image) is not stopped here: the
        new container starts beside it as ``<name>-next`` and the old one goes into `replacing[pack_id]`
        for the caller to retire once the new one is ready (`start_packs`), or to keep if it fails.
        """
        import docker.errors

        say = on_state or _quiet
        settings = self.pack_settings(pack_id, image, net, cfg)
        image_id = self.client.images.get(image).id
        digest = self._settings_hash({**settings, "image_id": image_id, "seed": self._seed_digest(pack_id)})
        settings["labels"] = {**settings["labels"], LABEL_CONFIG_HASH: digest}
        if current is None:
            current = self.client.containers.list(
                all=True, sparse=True, filters=self._filters(ROLE_PACK, pack_id)
            )
        base = settings["name"]
        running = [c for c in current if c.status == "running"]
        same = next(
            (c for c in running if (c.attrs.get("Labels") or {}).get(LABEL_CONFIG_HASH) == digest), None
        )
        # Keep the one that serves: the identical one, else the old one under the usual name (else any).
        keep = same or next((c for c in running if _name_of(c) == base), running[0] if running else None)
        for container in current:
            if container is not keep:
                with contextlib.suppress(docker.errors.NotFound):
                    self.client.api.remove_container(container.id, force=True)
        if same is not None:
            say("already running")
            return same, False, time.monotonic()
        if keep is not None and replacing is not None:
            # The old container serves until the new one says "ready" (both in the Pack's queue group).
            settings["name"] = base + _NEXT_SUFFIX if _name_of(keep) != base + _NEXT_SUFFIX else base
            replacing[pack_id] = keep
            say("upgrading")
        elif keep is not None:
            self.client.api.remove_container(keep.id, force=True)
        self._claim_name(settings["name"])
        started = time.monotonic()
        try:
            container = self.client.containers.create(**settings)
            say("created")
            container.start()
            say("started")
        except docker.errors.APIError as exc:
            raise RuntimeSetupError(
                f"cannot start the container of Pack {pack_id}: {_api_message(exc)}"
            ) from None
        return container, True, started

    def retire(self, pack_id: str, old: Any, new: Any, listener: StatusListener | None = None) -> None:
        """The upgraded Pack's new container said "ready": stop the old one, give the new one the name.

        The old one's SDK stops taking calls and finishes those it took (up to its grace). Then, with
        `listener`, wait (at most one stale time) for a heartbeat from the new one, so that the last
        status `rumi ps` and `rumi call` read is its own, not the old one's "stopping".
        """
        import docker.errors

        base = self.pack_container_name(pack_id)
        with contextlib.suppress(docker.errors.NotFound):
            self.client.api.stop(old.id, timeout=_RETIRE_STOP_TIMEOUT)
        with contextlib.suppress(docker.errors.NotFound):
            self.client.api.remove_container(old.id, force=True)
        gone = time.monotonic()
        if _name_of(new) != base:
            self._claim_name(base)
            self.client.api.rename(new.id, base)
        if listener is None:
            return
        heard = listener.last(pack_id)
        limit = heard.stale_after() if heard is not None else stale_after()
        while time.monotonic() - gone < limit:
            heard = listener.last(pack_id)
            if heard is not None and heard.heard_at > gone and heard.state != "stopping":
                return
            time.sleep(0.1)
        self.progress(f"pack {pack_id}: no heartbeat from the new container since the old one stopped")

    def _seed_digest(self, pack_id: str) -> str:
        path = self.pack_creds_dir(pack_id) / f"{pack_id}.nk"
        return hashlib.sha256(path.read_bytes()).hexdigest()

    @staticmethod
    def _settings_hash(settings: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def start_packs(
        self,
        pack_ids: Sequence[str],
        tags: dict[str, str],
        networks: dict[str, PackNetwork],
        cfg: RumiConfig,
        listener: StatusListener,
        timeout: float,
    ) -> list[PackStart]:
        """Start the Packs concurrently and wait until each says "ready" on its status subject.

        A Pack whose container already runs with the same settings counts once its heartbeat is live.
        Containers that exit (or restart) before "ready" fail the wait at once, with their last log line;
        every other Pack is still waited for, so one broken Pack does not hide the state of the rest.

        An upgraded Pack (`start_pack`) keeps its old container serving until the new one is ready, then
        the old one is retired (`retire`). If the new one fails, it is removed and the old one stays.
        Any failure raises PackNotReady (exit 1) naming each Pack and why.
        """
        track = _UpTracker(self.progress, pack_ids)
        current: dict[str, list[Any]] = {}
        for container in self.client.containers.list(all=True, sparse=True, filters=self._filters(ROLE_PACK)):
            owner = (container.attrs.get("Labels") or {}).get(LABEL_PACK, "")
            current.setdefault(owner, []).append(container)
        began = time.monotonic()
        deadline = began + timeout
        launched: dict[str, tuple[Any, bool, float]] = {}
        replacing: dict[str, Any] = {}  # pack id -> its old container, serving until the new one is ready
        retiring: dict[Future[None], str] = {}
        failed: dict[str, str] = {}
        done: dict[str, PackStart] = {}
        pool = ThreadPoolExecutor(
            max_workers=min(_PARALLEL_STARTS, len(pack_ids)), thread_name_prefix="rumi-up"
        )
        try:
            futures = {
                pool.submit(
                    self.start_pack,
                    pack_id,
                    tags[f"pack:{pack_id}"],
                    networks[pack_id],
                    cfg,
                    current=current.get(pack_id, []),
                    on_state=functools.partial(track.state, pack_id),
                    replacing=replacing,
                ): pack_id
                for pack_id in pack_ids
            }
            next_check = began + 1.0
            while len(done) + len(failed) < len(pack_ids):
                listener.changed.clear()
                now = time.monotonic()
                for future in [f for f in futures if f.done()]:
                    pack_id = futures.pop(future)
                    try:
                        launched[pack_id] = future.result()
                    except Exception as exc:  # RuntimeSetupError, or the engine's own error
                        why = str(exc) if isinstance(exc, RumiError) else f"Docker: {_api_message(exc)}"
                        failed[pack_id] = why
                        track.settle(pack_id, "failed", now - began, why)
                for pack_id, (container, created, t0) in launched.items():
                    if pack_id in done or pack_id in failed:
                        continue
                    ready = self._ready_since(listener, pack_id, t0 if created else None, now)
                    if ready is not None:
                        done[pack_id] = PackStart(
                            pack_id,
                            self.pack_container_name(pack_id),
                            created,
                            ready,
                            (*track.states_of(pack_id), "ready"),
                        )
                        track.settle(pack_id, "ready", ready)
                        if pack_id in replacing:
                            retiring[
                                pool.submit(self.retire, pack_id, replacing[pack_id], container, listener)
                            ] = pack_id
                if now >= next_check:
                    next_check = now + 1.0
                    for pack_id, why in self._exited_packs(launched, set(done) | set(failed)).items():
                        failed[pack_id] = why
                        track.settle(pack_id, "failed", now - launched[pack_id][2], why)
                if len(done) + len(failed) == len(pack_ids):
                    break
                if now > deadline:
                    for pack_id in sorted(set(pack_ids) - set(done) - set(failed)):
                        state = track.current(pack_id)
                        tail = self._log_tail(launched[pack_id][0].id) if pack_id in launched else ""
                        failed[pack_id] = (
                            f"not ready within {timeout:g} s ({state}){': ' + tail if tail else ''}"
                        )
                        track.settle(pack_id, "failed", now - began, failed[pack_id])
                    break
                track.summary(now - began)
                listener.changed.wait(0.2)
            for retired, pack_id in retiring.items():
                try:
                    retired.result()
                except Exception as exc:
                    why = str(exc) if isinstance(exc, RumiError) else f"Docker: {_api_message(exc)}"
                    failed[pack_id] = f"ready, but the old container could not be replaced: {why}"
                    done.pop(pack_id, None)
                else:
                    self.progress(f"pack {pack_id}: upgraded, the previous container stopped")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for pack_id in sorted(set(failed) & set(replacing)):
                if pack_id not in retiring.values():
                    self._roll_back(pack_id, replacing[pack_id])
                    failed[pack_id] += "; rolled back: the previous container still serves"
        if failed:
            detail = "; ".join(f"{p}: {why}" for p, why in sorted(failed.items()))
            raise PackNotReady(
                f"{len(failed)} of {len(pack_ids)} Pack(s) did not become ready: {detail} (`rumi logs PACK`)"
            )
        return [done[p] for p in sorted(done)]

    def _roll_back(self, pack_id: str, old: Any) -> None:
        """Remove every container of the Pack but `old`, which keeps serving under its name."""
        import docker.errors

        for container in self.client.containers.list(
            all=True, sparse=True, filters=self._filters(ROLE_PACK, pack_id)
        ):
            if container.id != old.id:
                with contextlib.suppress(docker.errors.NotFound):
                    self.client.api.remove_container(container.id, force=True)

    @staticmethod
    def _ready_since(listener: StatusListener, pack_id: str, t0: float | None, now: float) -> float | None:
        """Seconds from t0 to the Pack's "ready" (a new container), or 0 when its heartbeat is live."""
        if t0 is not None:
            ready_at = listener.ready_at(pack_id)
            return ready_at - t0 if ready_at is not None and ready_at >= t0 else None
        last = listener.last(pack_id)
        if last is not None and last.live(now):
            return 0.0
        known = listener.snapshot.get(pack_id)
        if known is not None and known.live(now):
            return 0.0
        return None

    def _exited_packs(
        self, launched: dict[str, tuple[Any, bool, float]], settled: set[str]
    ) -> dict[str, str]:
        """Launched, unsettled Packs whose container exited, died or is restarting (one listing)."""
        ids = {c.id: p for p, (c, _, _) in launched.items() if p not in settled}
        if not ids:
            return {}
        filters = {**self._filters(ROLE_PACK), "status": ["exited", "dead", "restarting"]}
        out: dict[str, str] = {}
        for container in self.client.containers.list(all=True, sparse=True, filters=filters):
            pack_id = ids.get(container.id)
            if pack_id is not None:
                tail = self._log_tail(container.id)
                out[pack_id] = f"{container.attrs.get('Status') or container.status}: {tail or 'no output'}"
        return out

    def _log_tail(self, container_id: str) -> str:
        """The line of the container's log that says why it failed: the last one that is not part of a
        traceback's frames (a restarting container may be caught in the middle of printing one)."""
        import docker.errors

        try:
            raw = self.client.api.logs(container_id, tail=40)
        except docker.errors.APIError:
            return ""
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        lines = [ln for ln in text.splitlines() if ln.strip()]
        for line in reversed(lines):
            if not line[0].isspace() and not line.startswith("Traceback (most recent call last)"):
                return line.strip()[:300]
        return _last_line(text)

    # -- up / down

    def up(
        self,
        pack_ids: Sequence[str] | None = None,
        *,
        build: bool = True,
        with_broker: bool = True,
        health_timeout: float = 90,
        workers: int | None = None,
    ) -> UpReport:
        """Bring up NATS, the broker and the Packs (all of the workspace's when `pack_ids` is empty).

        Returns once every Pack said "ready" on its status subject (`health_timeout` bounds the wait).
        """
        cfg = self.ws.load_config()
        if cfg.nats_url:
            raise RuntimeSetupError(
                "docker/config.json sets nats_url, but `rumi up` runs its own NATS container: remove nats_url"
            )
        if os.geteuid() != 0:
            raise RuntimeSetupError(
                "`rumi up` needs root: it sets host firewall rules and owns Pack files by their uids"
            )
        if not self.ws.handlers.is_dir():
            raise RuntimeSetupError(f"no workspace at {self.ws.root}: run `rumi init` first (or pass --root)")
        with self._exclusive():
            return self._up(
                cfg,
                pack_ids,
                build=build,
                with_broker=with_broker,
                health_timeout=health_timeout,
                workers=workers,
            )

    def _up(
        self,
        cfg: RumiConfig,
        pack_ids: Sequence[str] | None,
        *,
        build: bool,
        with_broker: bool,
        health_timeout: float,
        workers: int | None = None,
    ) -> UpReport:
        from broker.core.manifest import load_manifest

        began = time.monotonic()
        self._refuse_embedded_server()
        wanted = sorted(set(pack_ids or self.ws.pack_ids()))
        if not wanted:
            raise RuntimeSetupError("no Packs to run: add one under ecosystem/<pack_id>/ with a pack.json")
        for pack_id in wanted:
            load_manifest(self.ws, pack_id)
        self.progress(f"workspace {self.ws.root} (tag {self.tag}), Packs: {_names(wanted)}")
        tags = self.ensure_images(wanted, build=build)
        self.ensure_control_network()
        networks, new = self._ensure_pack_networks(wanted)
        self.install_guards([networks[p].bridge for p in wanted])
        if len(wanted) == 1:
            net = networks[wanted[0]]
            self.progress(f"network {net.name}: {net.subnet} on {net.bridge}, guard active")
        else:
            self.progress(
                f"networks: {len(wanted)} Pack networks ({len(new)} new), guard active on each bridge"
            )
        # Every Pack with a network keeps its account: `up a` after `up b` must not cut b off.
        running = sorted(set(wanted) | set(networks))
        for pack_id in running:
            self.prepare_pack_files(pack_id)
        url = self.ensure_nats(tags["nats"], running, [networks[p] for p in running])
        write_atomic(
            _state_file(self.ws),
            json.dumps({"prefix": self.prefix, "nats_url": url}) + "\n",
            mode=0o600,
            fsync=False,
        )
        self.progress(f"nats: {url}")
        # Listening before any Pack starts: no "ready" can be missed.  A Pack needs only NATS to say
        # it is ready, so the broker starts meanwhile; `up` returns once both are done.
        listener = StatusListener(self.ws, wanted)
        listener.start(wait=False)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rumi-broker") as side:
            broker = (
                side.submit(start_broker, self.ws, progress=self.progress, workers=workers)
                if with_broker
                else None
            )
            try:
                listener.wait_started()
                packs = self.start_packs(wanted, tags, networks, cfg, listener, health_timeout)
            finally:
                listener.stop()
            broker_pid = broker.result() if broker is not None else 0
        return UpReport(url, broker_pid, packs, time.monotonic() - began)

    @contextlib.contextmanager
    def _exclusive(self, timeout: float = 300) -> Iterator[None]:
        """One `up` or `down` at a time per workspace (they would fight over names and subnets)."""
        self.ws.state.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.ws.state / "runtime.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RuntimeSetupError(
                            f"another `rumi up` or `rumi down` holds {self.ws.state / 'runtime.lock'}"
                        ) from None
                    time.sleep(0.2)
            yield
        finally:
            os.close(fd)

    def _refuse_embedded_server(self) -> None:
        from broker.bus.server import running_pid

        pid = running_pid(self.ws)
        if pid is not None:
            raise RuntimeSetupError(
                f"an embedded nats-server (pid {pid}) runs for this workspace (`rumi broker`): stop it first"
            )

    def down(self) -> list[str]:
        """Stop and remove everything of this workspace: broker, Packs, NATS, networks, guard rules."""
        if not self.ws.root.is_dir():
            return []  # a mistyped --root: create nothing there
        with self._exclusive():
            return self._down()

    def _down(self) -> list[str]:
        from broker.bus.server import url_file
        from broker.containers import guard as _guard

        removed: list[str] = []
        pid = stop_broker(self.ws)
        if pid is not None:
            removed.append(f"broker (pid {pid})")
        packs = self.client.containers.list(all=True, filters=self._filters(ROLE_PACK))
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda c: self._remove_container(c, removed), packs))
        for container in self.client.containers.list(all=True, filters=self._filters(ROLE_NATS)):
            self._remove_container(container, removed)
        bridges: set[str] = set()
        nets = self.client.networks.list(filters=self._filters())
        for net in nets:
            bridge = (net.attrs.get("Options") or {}).get("com.docker.network.bridge.name", "")
            if net.attrs.get("Labels", {}).get(LABEL_ROLE) == ROLE_PACK_NETWORK and _guard.BRIDGE_RE.match(
                bridge
            ):
                bridges.add(bridge)
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda n: self._remove_network(n, removed), nets))
        for bridge in self.remove_guards(bridges):
            removed.append(f"guard {bridge}")
        state = _state_file(self.ws)
        try:
            recorded = json.loads(state.read_text()).get("nats_url")
        except (FileNotFoundError, ValueError):
            recorded = None
        with contextlib.suppress(FileNotFoundError):
            if recorded and url_file(self.ws).read_text().strip() == recorded:
                url_file(self.ws).unlink()
        state.unlink(missing_ok=True)
        return removed

    def _remove_container(self, container: Any, removed: list[str]) -> None:
        import docker.errors

        with contextlib.suppress(docker.errors.NotFound):
            if container.status == "running":
                container.stop(timeout=10)
            container.remove(force=True)
            removed.append(f"container {container.name}")

    def _remove_network(self, net: Any, removed: list[str]) -> None:
        import docker.errors

        try:
            net.reload()
            for endpoint in list((net.attrs.get("Containers") or {}).keys()):
                with contextlib.suppress(docker.errors.APIError):
                    net.disconnect(endpoint, force=True)
            net.remove()
            removed.append(f"network {net.name}")
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            raise RuntimeSetupError(f"cannot remove network {net.name}: {_api_message(exc)}") from None

    # -- ps / stats / logs

    def status(self, *, heartbeats: bool = True) -> RuntimeStatus:
        """Containers (Packs with their last heartbeat), networks (with guard state), broker pid, NATS URL."""
        from broker.bus.server import url_file
        from broker.containers import guard as _guard

        listed = self.client.containers.list(all=True, filters=self._filters())
        pack_ids = sorted({c.labels[LABEL_PACK] for c in listed if c.labels.get(LABEL_ROLE) == ROLE_PACK})
        heard = read_statuses(self.ws, pack_ids) if heartbeats and pack_ids else {}
        now = time.monotonic()
        containers = []
        for c in listed:
            attrs = c.attrs
            state = attrs.get("State") or {}
            nets = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
            ports = []
            for port, binds in ((attrs.get("NetworkSettings") or {}).get("Ports") or {}).items():
                for b in binds or []:
                    ports.append(f"{b.get('HostIp')}:{b.get('HostPort')}->{port}")
            containers.append(
                ContainerInfo(
                    name=c.name,
                    role=c.labels.get(LABEL_ROLE, "?"),
                    pack_id=c.labels.get(LABEL_PACK),
                    state=str(state.get("Status", c.status)),
                    health=(state.get("Health") or {}).get("Status"),
                    image=str((attrs.get("Config") or {}).get("Image", "")),
                    addresses={k: str(v.get("IPAddress", "")) for k, v in nets.items()},
                    ports=sorted(ports),
                    **_heartbeat_fields(heard.get(c.labels.get(LABEL_PACK, "")), now),
                    restarts=int(attrs.get("RestartCount") or 0),
                    incident=_incident(attrs),
                )
            )
        networks = []
        for net in self.client.networks.list(filters=self._filters()):
            attrs = net.attrs
            role = (attrs.get("Labels") or {}).get(LABEL_ROLE, "?")
            bridge = (attrs.get("Options") or {}).get("com.docker.network.bridge.name", "")
            subnet = ((attrs.get("IPAM") or {}).get("Config") or [{}])[0].get("Subnet", "")
            guard = "n/a"
            if role == ROLE_PACK_NETWORK and _guard.BRIDGE_RE.match(bridge):
                try:
                    st = _guard.bridge_guard_status(bridge, self.tag)
                    guard = "active" if st.active else "missing: " + ", ".join(st.missing())
                except _guard.GuardError as exc:
                    guard = f"unknown ({exc})"
            networks.append(
                NetworkInfo(
                    name=str(attrs.get("Name")),
                    role=role,
                    pack_id=(attrs.get("Labels") or {}).get(LABEL_PACK),
                    subnet=str(subnet),
                    bridge=bridge,
                    internal=bool(attrs.get("Internal")),
                    guard=guard,
                )
            )
        try:
            url: str | None = url_file(self.ws).read_text().strip() or None
        except FileNotFoundError:
            url = None
        return RuntimeStatus(
            workspace=self.tag,
            containers=sorted(containers, key=lambda c: (c.role, c.name)),
            networks=sorted(networks, key=lambda n: (n.role, n.name)),
            broker_pid=running_broker_pid(self.ws),
            nats_url=url,
        )

    def stats(self) -> list[ContainerStats]:
        """One memory sample per running container of this workspace (Docker stats API, one-shot)."""
        containers = self.client.containers.list(filters=self._filters())

        def sample(c: Any) -> ContainerStats:
            raw = c.stats(stream=False, one_shot=True)
            mem = raw.get("memory_stats") or {}
            extra = mem.get("stats") or {}
            usage = int(mem.get("usage", 0))
            # What `docker stats` shows: page cache that can be dropped is not the container's.
            cache = int(extra.get("total_inactive_file", extra.get("inactive_file", 0)))
            return ContainerStats(
                name=c.name,
                role=c.labels.get(LABEL_ROLE, "?"),
                pack_id=c.labels.get(LABEL_PACK),
                memory_bytes=max(usage - cache, 0),
                memory_limit=int(mem.get("limit", 0)),
                pids=int((raw.get("pids_stats") or {}).get("current", 0)),
                extra={"rss": int(extra.get("total_rss", extra.get("anon", 0)))},
            )

        with ThreadPoolExecutor(max_workers=8) as pool:
            out = list(pool.map(sample, containers))
        return sorted(out, key=lambda s: (s.role, s.name))

    def container_for(self, pack_id: str | None = None, *, nats: bool = False) -> Any:
        """The Pack's (or the NATS) container; Missing (exit 3) when it does not exist."""
        if nats:
            found = self.client.containers.list(all=True, filters=self._filters(ROLE_NATS))
            what = "the NATS container"
        else:
            found = self.client.containers.list(all=True, filters=self._filters(ROLE_PACK, pack_id))
            what = f"Pack {pack_id!r}"
        if not found:
            raise Missing(f"{what} has no container in this workspace: `rumi up` starts it")
        return found[0]

    def logs(
        self, pack_id: str | None, *, nats: bool = False, follow: bool = False, tail: int | None = None
    ) -> Iterator[bytes]:
        """The container's log (stdout and stderr), optionally following it.

        Then, when the container ended abnormally (OOM kill, non-zero exit, restarts), one line from Rumi
        saying so: an OOM-killed process writes nothing of it to its own log.
        """
        container = self.container_for(pack_id, nats=nats)
        kwargs: dict[str, Any] = {"stdout": True, "stderr": True, "tail": tail if tail is not None else "all"}
        if follow:
            yield from container.logs(stream=True, follow=True, **kwargs)
        else:
            yield container.logs(**kwargs)
        try:
            container.reload()
        except Exception:  # removed meanwhile: nothing more to say
            return
        incident = _incident(container.attrs)
        if incident:
            yield f"rumi: container {container.name} {incident}\n".encode()


def _heartbeat_fields(heard: HeardStatus | None, now: float) -> dict[str, Any]:
    if heard is None:
        return {}
    return {
        "heartbeat": heard.state,
        "heartbeat_age": round(heard.age(now), 1),
        "heartbeat_stale_after": heard.stale_after(),
    }


def _name_of(container: Any) -> str:
    """A container's name, from a full or a sparse listing (which has ``Names``, not ``Name``)."""
    attrs = container.attrs
    name = attrs.get("Name") or next(iter(attrs.get("Names") or []), "")
    return str(name).lstrip("/")


def _api_message(exc: Exception) -> str:
    explanation = getattr(exc, "explanation", None)
    text = str(explanation or exc)
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _count_lines(container: Any, needle: str) -> int:
    text = container.logs(stdout=True, stderr=True).decode("utf-8", "replace")
    return len(re.findall(re.escape(needle), text))


def nats_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.settimeout(1.0)
            # docker-proxy accepts before the server is up: only the server's INFO greeting counts.
            return sock.recv(5) == b"INFO "
    except OSError:
        return False


def guard_status(ws: Workspace, client: Any | None = None) -> dict[str, BridgeGuard]:
    """The guard state of each of the workspace's Pack networks, by pack id (for `rumi doctor`)."""
    from broker.containers import guard as _guard

    networks = DockerRuntime(ws, client).pack_networks()
    tag = workspace_tag(ws)
    return {pack_id: _guard.bridge_guard_status(net.bridge, tag) for pack_id, net in networks.items()}
