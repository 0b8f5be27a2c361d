"""One lane per Pack: a hostile Pack's flood does not reach another Pack, nor flood the audit stream.

The broker (`rumi broker`, embedded nats-server) and the flood run as processes of their own; the
victim Pack reads through the SDK from this process. Every loop is bounded in count and time, and
all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from broker.containers.settings import cpu_limits
from broker.core.net import free_port
from broker.core.workspace import Workspace

from .conftest import say

pytestmark = pytest.mark.anyio

VICTIM = "other"
ATTACKER = "default"
VICTIM_TOOL = "other:tool:t"
FLOOD_SECONDS = 6.0

FLOOD = textwrap.dedent(
    r"""
    import asyncio, json, os, sys, time
    import msgspec, nats

    url, seed, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    SUBJECT = "rumi.pack.default.req."
    stats = {"malformed": 0, "large": 0, "burst": 0}

    def request(i, args):
        return msgspec.msgpack.encode(
            {"v": 1, "id": f"f{i}", "component_id": "default:tool:my_tool", "args": args})

    async def connect():
        return await nats.connect(url, nkeys_seed=seed, max_reconnect_attempts=2)

    async def malformed(nc, end):
        i = 0
        while time.monotonic() < end and i < 200_000:
            # Capability tokens the broker must refuse (pattern), each a fresh one.
            await nc.publish(SUBJECT + f"Bad-{i}", b"\xc1", reply=nc.new_inbox())
            i += 1
            if i % 500 == 0:
                await nc.flush()
        stats["malformed"] = i

    async def large(nc, end):
        body = request(0, {"path": "/nope", "data": b"x" * (7 * 1024 * 1024 - 4096)})
        i = 0
        while time.monotonic() < end and i < 2_000:
            try:
                await nc.publish(SUBJECT + "file_write", body, reply=nc.new_inbox())
                i += 1
                if i % 4 == 0:
                    await nc.flush()
            except Exception:
                await asyncio.sleep(0.05)
        stats["large"] = i

    async def bursts(nc, end):
        i = 0
        while time.monotonic() < end and i < 100_000:
            futures = [nc.request(SUBJECT + "env_read", request(i + k, {"key": "HOME"}), timeout=2)
                       for k in range(300)]
            await asyncio.gather(*futures, return_exceptions=True)
            i += 300
        stats["burst"] = i

    async def main():
        end = time.monotonic() + seconds
        conns = [await connect() for _ in range(3)]
        await asyncio.gather(malformed(conns[0], end), large(conns[1], end), bursts(conns[2], end))
        for nc in conns:
            try:
                await nc.close()
            except Exception:
                pass
        print(json.dumps(stats), flush=True)

    asyncio.run(main())
    """
)


def grant_victim(ws: Workspace) -> None:
    ws.grant_file(VICTIM_TOOL).write_text(
        json.dumps(
            {
                "component_id": VICTIM_TOOL,
                "permissions": {"env_read": {"enabled": True, "allowed_keys": ["RUMI_DEMO_GREETING"]}},
            }
        )
    )


class BrokerProcess:
    """`rumi broker` with its embedded nats-server on a free port; stopped with SIGTERM."""

    def __init__(self, ws: Workspace) -> None:
        self.log = ws.root / "broker-test.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "broker", "--root", str(ws.root), "--port", str(free_port())],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while b"serving" not in self.log.read_bytes():
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the broker did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class PackCpuLimit:
    """A cgroup (v1 cpu controller) with the CFS quota and period a Pack container gets (`cpu_limits`).

    A Pack floods from inside its container, with its CPU limit: the flooding process gets the same
    limit here, so the test measures what a Pack can do to another, not what an unconfined host process
    can do to a 2-core machine.
    """

    ROOT = Path("/sys/fs/cgroup/cpu")

    def __init__(self, path: Path, period_us: int, quota_us: int) -> None:
        self.path = path
        self.period_ms, self.quota_ms = period_us // 1000, quota_us // 1000

    @classmethod
    def make(cls, cpus: float) -> PackCpuLimit | None:
        if not (cls.ROOT / "cpu.cfs_quota_us").exists() or not os.access(cls.ROOT, os.W_OK):
            return None
        path = cls.ROOT / f"rumi-test-flood-{os.getpid()}"
        try:
            path.mkdir(exist_ok=True)
            limits = cpu_limits(cpus)  # what `rumi up` gives a Pack container
            (path / "cpu.cfs_period_us").write_text(str(limits["cpu_period"]))
            (path / "cpu.cfs_quota_us").write_text(str(limits["cpu_quota"]))
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            return None
        return cls(path, limits["cpu_period"], limits["cpu_quota"])

    def join(self) -> None:
        """In the child, before exec: move this process into the cgroup."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


VICTIM_RATE = 100.0  # reads/s: under the victim's own token bucket (200/s), so its refusals are the flood's


async def victim_reads(ws: Workspace, *, count: int | None = None, until: float | None = None) -> dict[str, Any]:
    """Sequential granted env_reads of the victim Pack, at most VICTIM_RATE a second: latencies (s), failures."""
    from broker.bus.creds import pack_identity
    from broker.bus.server import nats_url
    from pack_runtime import Pack

    pack = Pack(VICTIM, nats_url=nats_url(ws), creds=str(pack_identity(ws, VICTIM).seed_path), request_timeout=10)
    nc = await pack.connect()
    latencies: list[float] = []
    failures: list[str] = []
    try:
        ctx = pack.context(VICTIM_TOOL)
        i = 0
        while i < 20_000:
            if count is not None and i >= count:
                break
            if until is not None and time.monotonic() >= until:
                break
            start = time.perf_counter()
            try:
                await ctx.env_read("RUMI_DEMO_GREETING")
                latencies.append(time.perf_counter() - start)
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
            i += 1
            await anyio.sleep(max(0.0, start + 1 / VICTIM_RATE - time.perf_counter()))
    finally:
        await nc.close()
    return {"latencies": latencies, "failures": failures}


async def events_by_pack(ws: Workspace) -> dict[str, int]:
    from broker.audit.trail import read_events
    from broker.bus.server import connect

    nc = await connect(ws, "audit")
    try:
        counts: dict[str, int] = {}
        async for e in read_events(nc, follow=False, pack=None, decision=None):
            counts[e["pack_id"]] = counts.get(e["pack_id"], 0) + 1
        return counts
    finally:
        await nc.close()


async def test_a_flooding_pack_does_not_reach_another_pack(ws: Workspace, pytestconfig: pytest.Config) -> None:
    from broker.bus.creds import pack_identity
    from broker.bus.server import nats_url

    grant_victim(ws)
    broker = BrokerProcess(ws)
    try:
        quiet = await victim_reads(ws, count=300)
        assert not quiet["failures"], quiet["failures"][:3]
        before = await events_by_pack(ws)
        seed = str(pack_identity(ws, ATTACKER).seed_path)
        cpus = ws.load_config().cpus
        limit = PackCpuLimit.make(cpus)
        flood = subprocess.Popen(
            [sys.executable, "-c", FLOOD, nats_url(ws), seed, str(FLOOD_SECONDS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=limit.join if limit else None,
        )
        try:
            await anyio.sleep(0.5)  # the flood is under way
            loud = await victim_reads(ws, until=time.monotonic() + FLOOD_SECONDS - 1.0)
            out, err = flood.communicate(timeout=60)
        finally:
            if flood.poll() is None:
                flood.kill()
                flood.wait(5)
            if limit:
                limit.remove()
        assert flood.returncode == 0, err[-2000:]
        sent = json.loads(out.strip().splitlines()[-1])
        await anyio.sleep(2.5)  # aggregates of the last windows are written
        after = await events_by_pack(ws)
        broker_alive = broker.proc.poll() is None
    finally:
        broker.stop()
    log = broker.log.read_text()
    quiet_p50 = statistics.median(quiet["latencies"])
    loud_p50 = statistics.median(loud["latencies"]) if loud["latencies"] else float("inf")
    growth = after.get(ATTACKER, 0) - before.get(ATTACKER, 0)
    say(
        pytestconfig,
        f"\nfairness: flood sent {sent}; victim {len(loud['latencies'])} reads, {len(loud['failures'])} failures, "
        f"p50 {loud_p50 * 1000:.2f} ms vs quiet {quiet_p50 * 1000:.2f} ms ({loud_p50 / quiet_p50:.2f}x), "
        f"max {max(loud['latencies'] or [0]) * 1000:.0f} ms; "
        f"attacker's audit events {growth} in {FLOOD_SECONDS:.0f} s ({growth / FLOOD_SECONDS:.1f}/s); "
        + (
            f"the flooding process had a Pack's CPU limit ({cpus:g} CPU: {limit.quota_ms} ms per {limit.period_ms} ms)"
            if limit
            else "the flooding process ran WITHOUT a CPU limit (no writable cgroup v1 cpu controller)"
        ),
    )
    assert broker_alive, log[-3000:]
    assert "slow consumer" not in log.lower(), log[-3000:]
    assert sum(sent.values()) > 1000, sent  # the flood really ran
    assert not loud["failures"], loud["failures"][:5]
    assert len(loud["latencies"]) >= 20
    assert growth <= 50 * FLOOD_SECONDS, growth
    # No read of the other Pack waited anything like a timeout (before per-Pack lanes one was lost to
    # its 30 s timeout). The p50 ratio is printed, not asserted (a speed figure; its target is 2x, see
    # BENCHMARKS.md): with the flood confined to a Pack's CPU limit it measured 1.5-2.4x on this shared
    # 2-core machine, 2.8-7.9x when the flooding process was an unconfined host process taking a core.
    assert max(loud["latencies"]) < 2.0, max(loud["latencies"])
