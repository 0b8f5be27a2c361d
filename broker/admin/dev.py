"""`rumi dev`: a Pack as a local process with its own credentials and environment (nothing isolated)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.core.workspace import Workspace

# What a local Python needs from the caller's environment (a container sets its own).
HOST_PASSTHROUGH = ("PATH", "LANG", "HOME", "VIRTUAL_ENV", "PYTHONPATH")


@dataclass(frozen=True)
class LocalPack:
    """How to start one Pack as a local process."""

    argv: list[str]
    cwd: Path
    env: dict[str, str]


def prepare_local_pack(ws: Workspace, pack_id: str) -> LocalPack:
    """The Pack's manifest, credentials, work area and environment; RumiError when it cannot run."""
    from broker.core.manifest import load_manifest

    manifest = load_manifest(ws, pack_id)
    env = dev_environment(ws, pack_id)
    return LocalPack([sys.executable, manifest.entrypoint], ws.pack_source(pack_id), env)


def run_local_pack(pack: LocalPack) -> int:
    """Run the Pack in the foreground, forwarding SIGTERM and SIGINT to it; its exit code."""
    proc = subprocess.Popen(pack.argv, cwd=pack.cwd, env=pack.env)

    def forward(signum: int, _frame: Any) -> None:
        proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return proc.wait()


def dev_environment(ws: Workspace, pack_id: str) -> dict[str, str]:
    """The same variables a Pack gets in its container, plus what a local Python needs.

    Makes the Pack's identity known to the running NATS server (embedded or container) and creates
    its work area first.
    """
    from broker.bus.creds import pack_identity
    from broker.bus.server import nats_url, reload_running
    from broker.core.net import free_port
    from broker.core.pack_env import pack_environment

    identity = pack_identity(ws, pack_id)
    if (ws.state / "docker.json").exists():
        # `rumi up` runs NATS in a container: its config (listen address, port) is the runtime's.
        from broker.containers.engine import DockerRuntime

        runtime = DockerRuntime(ws)
        if runtime.write_nats_config(ws.pack_ids()):
            runtime.reload_nats()
    else:
        reload_running(ws, ws.pack_ids())
    work_area = ws.pack_work_area(pack_id)
    work_area.mkdir(parents=True, exist_ok=True)
    env = pack_environment(
        pack_id,
        nats_url=nats_url(ws),
        creds_file=str(identity.seed_path),
        work_area=work_area,
        proxy_listen=f"127.0.0.1:{free_port()}",
    )
    for key in HOST_PASSTHROUGH:
        if key in os.environ:
            env[key] = os.environ[key]
    return env
