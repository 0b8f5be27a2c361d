"""Container runtime value types, and the one function that turns policy into container settings.

Policy never imports Docker: this module only builds plain settings.  `pack_container_settings`
starts from "drop every capability" and is the single place where a Pack's confinement is decided;
the Docker runtime (`broker.containers.engine`) and the Compose generator (`broker.containers.compose`) both
consume it, so `rumi up` and `docker-compose up` produce the same hardening.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.core.labels import labels, workspace_tag
from broker.core.pack_env import READY_FILE, pack_environment
from broker.core.workspace import RumiConfig, Workspace

CREDS_MOUNT = "/run/rumi"
PACK_UID_BASE = 20000
NATS_CONTAINER_PORT = 4222
PROXY_LISTEN = "127.0.0.1:3128"
# Docker's healthcheck (docker-bench 5.26) is a backstop, not the readiness signal: `rumi up`, `ps`,
# `doctor` and `call` use the Pack's own status heartbeats.  Every probe is an exec (dockerd,
# containerd, the shim, runc, a Python): ~70 ms of CPU here, so probing 20 Packs every 60 s would keep
# 2.3 % of a core busy on probes alone, 100 Packs 12 %.  Every 5 minutes: 0.5 % and 2.3 %.  Engines
# before 25 have no start_interval: Docker shows "starting" until the first probe, an interval later.
HEALTHCHECK_INTERVAL_S = 300
# The SDK touches the ready file with every heartbeat (5 s): older than this, the Pack's loop is stuck.
READY_FILE_MAX_AGE_S = 30
_S = 1_000_000_000  # nanoseconds, as the Docker API counts
# A Pack's CPU limit is `cpus` cores on average, enforced by CFS once per period.  Over Docker's
# default 100 ms period (`--cpus`) a 0.5-CPU Pack may run 50 ms, then waits: its start-up (Python, the
# SDK, the NATS handshake: ~140 ms of CPU) was throttled ~90 ms on every cold start.  A period long
# enough for a quota of STARTUP_CPU_US lets the start-up run in one go; the average stays `cpus`.
STARTUP_CPU_US = 250_000
_CPU_PERIOD_US = (100_000, 1_000_000)  # Docker's default period, and the kernel's longest


def healthcheck_test(max_age: int = READY_FILE_MAX_AGE_S) -> list[str]:
    """Exec form (the base image has no shell): a Python without site that stats the ready file."""
    code = (
        f"import os,time;p={READY_FILE!r};"
        f"raise SystemExit(not os.path.exists(p) or time.time()-os.stat(p).st_mtime>{max_age:d})"
    )
    return ["CMD", "python3", "-I", "-S", "-c", code]


def cpu_limits(cpus: float) -> dict[str, int]:
    """`cpu_period` and `cpu_quota` (µs) for `cpus` cores on average; the period fits the start-up.

    0.5 CPU: 250 ms in every 500 ms.  From 2.5 CPUs on: Docker's own 100 ms period.
    """
    low, high = _CPU_PERIOD_US
    period = min(high, max(low, round(STARTUP_CPU_US / cpus)))
    return {"cpu_period": period, "cpu_quota": max(1_000, round(cpus * period))}


def pack_uid(pack_id: str) -> int:
    """A distinct non-root uid per Pack (stable), so one Pack's files are not another's."""
    return PACK_UID_BASE + int(hashlib.sha256(pack_id.encode()).hexdigest()[:6], 16) % 30000


@dataclass(frozen=True)
class PackSpec:
    """Everything needed to run one Pack container."""

    pack_id: str
    image: str
    network: str
    nats_url: str
    work_area: Path
    creds_dir: Path
    workspace: str
    memory_limit: str = "128m"
    cpus: float = 0.5
    pids_limit: int = 128
    tmpfs_size: str = "16m"
    extra_env: dict[str, str] = field(default_factory=dict)
    heartbeat_interval: float | None = None  # None: the SDK's default (5 s)

    @property
    def uid(self) -> int:
        return pack_uid(self.pack_id)

    @property
    def container_name(self) -> str:
        return f"rumi-pack-{self.pack_id}"

    @property
    def creds_file(self) -> str:
        return f"{CREDS_MOUNT}/{self.pack_id}.nk"


def pack_spec(
    ws: Workspace, cfg: RumiConfig, pack_id: str, *, image: str, network: str, nats_url: str, creds_dir: Path
) -> PackSpec:
    """A PackSpec with limits from docker/config.json (per-Pack settings override the defaults)."""
    own = cfg.packs.get(pack_id)
    return PackSpec(
        pack_id=pack_id,
        image=image,
        network=network,
        nats_url=nats_url,
        work_area=ws.pack_work_area(pack_id),
        creds_dir=creds_dir,
        workspace=workspace_tag(ws),
        memory_limit=(own.memory_limit if own and own.memory_limit else cfg.memory_limit),
        cpus=(own.cpus if own and own.cpus else cfg.cpus),
        pids_limit=cfg.pids_limit,
    )


def pack_container_settings(spec: PackSpec) -> dict[str, Any]:
    """Keyword arguments for docker SDK `containers.create` for one Pack.

    Every capability dropped, no new privileges, read-only root, non-root uid, a sized tmpfs,
    memory (no extra swap), CPU and pids limits, only the Pack's own sandbox and credentials
    mounted, only its own internal network, and a rare exec-form healthcheck that fails when the SDK
    stopped touching its ready file (readiness itself is the SDK's "ready" on its status subject).
    Restart policy is `on-failure:5` (docker-bench 5.14): a crashing Pack does not loop forever;
    after an engine restart `rumi up` brings Packs back.
    """
    env = {
        **pack_environment(
            spec.pack_id,
            nats_url=spec.nats_url,
            creds_file=spec.creds_file,
            work_area=spec.work_area,
            proxy_listen=PROXY_LISTEN,
            container=True,
            heartbeat_interval=spec.heartbeat_interval,
        ),
        **spec.extra_env,
    }
    return {
        "image": spec.image,
        "name": spec.container_name,
        "user": f"{spec.uid}:{spec.uid}",
        "environment": env,
        "labels": labels(spec.workspace, "pack", spec.pack_id),
        "network": spec.network,
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "tmpfs": {"/tmp": f"rw,noexec,nosuid,nodev,size={spec.tmpfs_size},mode=1777"},
        "mem_limit": spec.memory_limit,
        "memswap_limit": spec.memory_limit,
        **cpu_limits(spec.cpus),
        "cpu_shares": 512,
        "pids_limit": spec.pids_limit,
        "volumes": {
            str(spec.work_area): {"bind": str(spec.work_area), "mode": "rw"},
            str(spec.creds_dir): {"bind": CREDS_MOUNT, "mode": "ro"},
        },
        "healthcheck": {
            "test": healthcheck_test(max(READY_FILE_MAX_AGE_S, int(3 * (spec.heartbeat_interval or 0)) + 5)),
            "interval": HEALTHCHECK_INTERVAL_S * _S,
            "timeout": 10 * _S,
            "retries": 3,
            "start_period": 10 * _S,
        },
        "restart_policy": {"Name": "on-failure", "MaximumRetryCount": 5},
        "ipc_mode": "private",
        "init": False,
        "stop_signal": "SIGTERM",
        "log_config": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}},
        "detach": True,
    }
