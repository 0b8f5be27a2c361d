"""`rumi doctor`: the checks of workspace, policy, engine, images, NATS, broker, host guard and Packs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from broker.containers.engine import (
    DEFAULT_PREFIX,
    DockerRuntime,
    broker_log_file,
    guard_status,
    nats_answers,
    running_broker_pid,
)
from broker.core.errors import RumiError
from broker.core.workspace import Workspace


@dataclass(frozen=True)
class Check:
    """One line of `rumi doctor`."""

    status: str  # OK, FAIL
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        """`OK   name: detail` or `FAIL name: detail -> fix`."""
        text = f"{self.status:<4} {self.name}: {self.detail}"
        return f"{text} -> {self.fix}" if self.fix and self.status != "OK" else text

    def to_json(self) -> dict[str, Any]:
        """`{"status", "name", "detail", "fix"}` for `rumi doctor --json`."""
        return asdict(self)


@dataclass(frozen=True)
class BrokerProcess:
    """The workspace's running broker: detached by `rumi up`, or `rumi broker` in a terminal."""

    pid: int | None  # None: a foreground broker whose pid could not be read from /proc
    mode: str  # "detached" or "foreground"
    nats_pid: int | None = None  # the embedded nats-server of a foreground broker


def find_broker(ws: Workspace) -> BrokerProcess | None:
    """The running broker, from the same runtime files `rumi doctor` and `rumi ps` both read.

    Detached: docker/.rumi/broker.pid, checked in /proc.  Foreground: the embedded nats-server it
    owns (docker/.rumi/nats.pid, checked in /proc), whose parent process is the broker.
    """
    pid = running_broker_pid(ws)
    if pid is not None:
        return BrokerProcess(pid, "detached")
    nats_pid = _embedded_server_pid(ws)
    if nats_pid is None:
        return None
    return BrokerProcess(_parent_pid(nats_pid), "foreground", nats_pid)


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
    fields = stat.rpartition(")")[2].split()
    ppid = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
    return ppid if ppid > 1 else None


def run_doctor(ws: Workspace, *, prefix: str = DEFAULT_PREFIX, fix: bool = False) -> list[Check]:
    """Every check of `rumi doctor`, in order."""
    checks: list[Check] = []
    checks.extend(_check_policy(ws))
    try:
        rt = DockerRuntime(ws, prefix=prefix)
        major, api = rt.engine_version()
    except RumiError as exc:
        checks.append(Check("FAIL", "engine", str(exc)))
        checks.extend(_check_embedded(ws))
        return checks
    note = (
        " (before 26: internal networks' DNS is forwarded; Rumi points Pack DNS at a dead address)"
        if _engine_major(major) < 26
        else ""
    )
    checks.append(Check("OK", "engine", f"Docker {major}, API {api}{note}"))
    checks.extend(_check_images(rt))
    checks.extend(_check_nats(rt))
    checks.extend(_check_broker(ws))
    checks.extend(_check_guard(rt, fix))
    checks.extend(_check_packs(rt))
    return checks


def _engine_major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def _check_policy(ws: Workspace) -> list[Check]:
    from broker.policy.grants import Policy

    if not ws.handlers.is_dir():
        return [Check("FAIL", "workspace", f"no workspace at {ws.root}", "run `rumi init` (or pass --root)")]
    try:
        errors = Policy.for_workspace(ws).errors
    except RumiError as exc:
        return [Check("FAIL", "policy", str(exc), "fix the file named")]
    if not errors:
        return [Check("OK", "policy", "handlers, scopes and grants load without errors")]
    return [
        Check("FAIL", "policy", str(e), "fix or remove that file (its component stays denied)")
        for e in errors
    ]


def _check_images(rt: DockerRuntime) -> list[Check]:
    from broker.containers.images import image_tag
    from broker.containers.packimage import pack_image_tag

    wanted = [image_tag(k, rt.prefix) for k in ("nats", "base", "sandbox")]
    wanted += [pack_image_tag(p, rt.prefix) for p in rt.ws.pack_ids()]
    missing = [t for t in wanted if not rt.image_exists(t)]
    if missing:
        return [Check("FAIL", "images", f"missing {', '.join(missing)}", "run `rumi build`")]
    return [Check("OK", "images", f"{len(wanted)} present ({', '.join(wanted)})")]


def _check_nats(rt: DockerRuntime) -> list[Check]:
    from broker.bus.server import nats_url

    try:
        container = rt.container_for(nats=True)
    except RumiError:
        container = None
    if container is None:
        embedded = _check_embedded(rt.ws)
        if embedded and embedded[0].status == "OK":
            return embedded
        return [Check("FAIL", "nats", "the NATS container is not running", "run `rumi up`")]
    if container.status != "running":
        return [
            Check(
                "FAIL",
                "nats",
                f"{container.name} is {container.status}",
                "run `rumi up` (`rumi logs --nats`)",
            )
        ]
    try:
        url = nats_url(rt.ws)
    except RumiError as exc:
        return [Check("FAIL", "nats", str(exc), "run `rumi up`")]
    host, _, port = url.removeprefix("nats://").rpartition(":")
    if not port.isdigit() or not nats_answers(host.strip("[]"), int(port)):
        return [Check("FAIL", "nats", f"{container.name} runs but {url} does not answer", "run `rumi up`")]
    return [Check("OK", "nats", f"{container.name} running, {url} answers")]


def _check_embedded(ws: Workspace) -> list[Check]:
    pid = _embedded_server_pid(ws)
    if pid is None:
        return []
    return [
        Check("OK", "nats", f"embedded nats-server (pid {pid}) of `rumi broker`; nothing is containerised")
    ]


def _check_broker(ws: Workspace) -> list[Check]:
    found = find_broker(ws)
    if found is None:
        return [Check("FAIL", "broker", "not running", "run `rumi up`")]
    if found.mode == "detached":
        return [Check("OK", "broker", f"running (pid {found.pid}, log {broker_log_file(ws)})")]
    where = f"pid {found.pid}" if found.pid is not None else "pid unknown"
    return [
        Check(
            "OK",
            "broker",
            f"`rumi broker` runs in the foreground ({where}, embedded nats-server pid {found.nats_pid})",
        )
    ]


def _check_guard(rt: DockerRuntime, fix: bool) -> list[Check]:
    from broker.containers.guard import install_guard

    try:
        statuses = guard_status(rt.ws, rt.client)
    except RumiError as exc:
        return [Check("FAIL", "guard", str(exc), "run as root with iptables installed")]
    if not statuses:
        return [Check("OK", "guard", "no Pack networks (nothing to guard)")]
    out = []
    for pack_id, status in sorted(statuses.items()):
        if not status.active and fix:
            try:
                status = install_guard(status.bridge, rt.tag)
            except RumiError as exc:
                out.append(Check("FAIL", f"guard {pack_id}", str(exc), "run as root"))
                continue
            if status.active:
                out.append(Check("OK", f"guard {pack_id}", f"{status.bridge}: installed now"))
                continue
        if status.active:
            out.append(
                Check("OK", f"guard {pack_id}", f"{status.bridge}: INPUT dropped (IPv4, IPv6), IPv6 off")
            )
        else:
            out.append(
                Check(
                    "FAIL",
                    f"guard {pack_id}",
                    f"{status.bridge}: missing {', '.join(status.missing())}",
                    "run `rumi doctor --fix`",
                )
            )
    return out


def _check_packs(rt: DockerRuntime) -> list[Check]:
    """Each Pack: its container runs, its heartbeat (rumi.pack.<id>.status) is fresh, Docker's check passes."""
    status = rt.status()
    packs = [c for c in status.containers if c.role == "pack"]
    out = []
    for c in packs:
        # The heartbeat decides: Docker's check runs every 5 minutes ("starting" that long after a
        # start, "unhealthy" after a pause until its next probe), and tests what the heartbeat does.
        if c.state == "running" and c.live:
            out.append(
                Check(
                    "OK",
                    f"pack {c.pack_id}",
                    f"{c.name} {c.heartbeat}, last heartbeat {c.heartbeat_age:.1f} s ago, health {c.health or '-'}",
                )
            )
            continue
        if c.heartbeat is None:
            heard = "no status heard"
        elif c.heartbeat == "stopping":
            heard = f"said stopping {c.heartbeat_age:.0f} s ago"
        else:
            heard = f"no heartbeat for {c.heartbeat_age:.0f} s"
        out.append(
            Check(
                "FAIL",
                f"pack {c.pack_id}",
                f"{c.name} {c.state}, {heard}, health {c.health or '-'}",
                f"see `rumi logs {c.pack_id}`, then `rumi up`",
            )
        )
    for n in status.networks:
        if n.role == "pack-network" and not n.internal:
            out.append(
                Check("FAIL", f"network {n.name}", "is not internal", "run `rumi down` then `rumi up`")
            )
    return out


def _embedded_server_pid(ws: Workspace) -> int | None:
    """The pid of this workspace's embedded nats-server (`rumi broker`), when one runs."""
    from broker.bus.server import running_pid

    return running_pid(ws)
