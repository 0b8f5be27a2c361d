"""`rumi broker --workers N`: Packs partitioned across worker processes, per-Pack bounds not multiplied."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import anyio
import pytest

from broker.core.net import free_port
from broker.core.workspace import Workspace
from broker.service.broker import pack_worker
from pack_runtime import BrokerError

from .test_broker import set_broker_config
from .test_fairness import grant_victim

pytestmark = pytest.mark.anyio


def test_packs_are_partitioned_stably() -> None:
    ids = [f"p{i}" for i in range(200)]
    assert all(pack_worker(p, 1) == 0 for p in ids)
    spread = [pack_worker(p, 3) for p in ids]
    assert spread == [pack_worker(p, 3) for p in ids]  # stable
    assert set(spread) == {0, 1, 2} and min(spread.count(w) for w in range(3)) > 30


async def reads(ws: Workspace, pack_id: str, component: str, key: str, n: int) -> list[str]:
    from broker.bus.creds import pack_identity
    from broker.bus.server import nats_url
    from pack_runtime import Pack

    pack = Pack(pack_id, nats_url=nats_url(ws), creds=str(pack_identity(ws, pack_id).seed_path), request_timeout=5)
    nc = await pack.connect()
    codes = []
    try:
        for _ in range(n):
            try:
                await pack.context(component).env_read(key)
                codes.append("ok")
            except BrokerError as exc:
                codes.append(exc.code)
    finally:
        await nc.close()
    return codes


async def test_two_workers_serve_all_packs_each_in_one_chain(ws: Workspace) -> None:
    set_broker_config(ws, rate_per_second=1.0, burst=3)
    grant_victim(ws)  # other:tool:t may read RUMI_DEMO_GREETING
    log = ws.root / "workers.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "broker", "--root", str(ws.root), "--port", str(free_port()),
         "--workers", "2"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while log.read_text().count(": serving (chain") < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            await anyio.sleep(0.1)
        default = await reads(ws, "default", "default:tool:my_tool", "RUMI_DEMO_GREETING", 8)
        other = await reads(ws, "other", "other:tool:t", "RUMI_DEMO_GREETING", 8)
        await anyio.sleep(1.5)
        from broker.audit.trail import read_events
        from broker.bus.server import connect

        nc = await connect(ws, "audit")
        try:
            events = [e async for e in read_events(nc, follow=False, pack=None, decision=None)]
        finally:
            await nc.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(45)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    # The per-Pack bucket (burst 3) is not multiplied by the two workers: each Pack lives in one.
    for codes in (default, other):
        assert codes[:3] == ["ok"] * 3 and codes.count("ok") <= 4 and "rate_limited" in codes, codes
    chains = {p: {e["chain"] for e in events if e["pack_id"] == p} for p in ("default", "other")}
    assert all(len(c) == 1 for c in chains.values()), chains
    if pack_worker("default", 2) != pack_worker("other", 2):
        assert chains["default"] != chains["other"]
    assert proc.returncode == 0, log.read_text()[-2000:]
    assert "exited with" not in log.read_text()  # no worker died


def test_worker_entry_point_says_how_to_call_it() -> None:
    out = subprocess.run([sys.executable, "-m", "broker.service.worker"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage: python -m broker.service.worker ROOT INDEX COUNT" in out.stderr
