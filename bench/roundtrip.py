"""Round trip through the broker vs a raw nats-py request/reply echo, measured in one run.

    python bench/roundtrip.py [--n 2000] [--concurrency 32]

Both paths go through the same nats-server and the same per-Pack account import.  The raw echo is
a nats-py responder (in its own process) answering the `cli` identity on a Pack's call subject;
the broker path is a Pack's `ctx.env_read` (decode, scope, grant, handler, audit event acked by
JetStream with sync_interval: always, reply), with the broker in its own process.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.admin.init import init_workspace
from broker.bus.creds import pack_identity
from broker.bus.server import connect, nats_url
from broker.core.workspace import Workspace
from pack_runtime import Pack

ECHO = textwrap.dedent("""
    import asyncio, sys, nats
    async def main():
        nc = await nats.connect(sys.argv[1], nkeys_seed=sys.argv[2])
        async def cb(msg):
            await msg.respond(msg.data)
        await nc.subscribe("rumi.pack.default.call.tool.echo", cb=cb)
        print("ready", flush=True)
        await asyncio.Event().wait()
    asyncio.run(main())
""")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


async def sequential(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


async def concurrent(fn, n: int, width: int) -> float:
    sem = anyio.Semaphore(width)
    t = time.perf_counter()

    async def one() -> None:
        async with sem:
            await fn()

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return n / (time.perf_counter() - t)


async def run(ws: Workspace, n: int, width: int) -> None:
    cli = await connect(ws, "cli")
    payload = b"x" * 64

    async def raw() -> None:
        await cli.request("rumi.pack.default.call.tool.echo", payload, timeout=5)

    pack = Pack("default", nats_url=nats_url(ws), creds=str(pack_identity(ws, "default").seed_path))
    nc = await pack.connect()
    ctx = pack.context("default:tool:my_tool")

    async def brokered() -> None:
        await ctx.env_read("RUMI_DEMO_GREETING")

    async def denied() -> None:
        try:
            await pack.context("default:tool:nothing").env_read("RUMI_DEMO_GREETING")
        except Exception:
            pass

    for fn in (raw, brokered):  # warm up
        await sequential(fn, 50)
    rows = []
    for name, fn in (
        ("raw nats-py echo", raw),
        ("broker env_read (allow)", brokered),
        ("broker env_read (deny)", denied),
    ):
        lat = await sequential(fn, n)
        rps = await concurrent(fn, n, width)
        rows.append((name, statistics.median(lat), pct(lat, 99), rps))
    print(f"\n{'path':28} {'p50 ms':>8} {'p99 ms':>8} {'req/s @' + str(width):>12}")
    for name, p50, p99, rps in rows:
        print(f"{name:28} {p50:8.3f} {p99:8.3f} {rps:12.0f}")
    print(f"\nbroker/raw p50 ratio: {rows[1][1] / rows[0][1]:.1f}x  (n={n}, one run, same server)")
    await nc.close()
    await cli.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--sync", default="always", help="JetStream sync_interval (default: always, as shipped)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.at(Path(tmp) / "ws")
        init_workspace(ws)
        cfg = ws.config_file.read_text().replace('"rate_per_second": 200.0', '"rate_per_second": 1000000.0')
        cfg = cfg.replace('"jetstream_sync": "always"', f'"jetstream_sync": "{a.sync}"')
        ws.config_file.write_text(cfg.replace('"burst": 400', '"burst": 1000000'))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        broker = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "broker", "--root", str(ws.root), "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        echo = None
        try:
            assert broker.stdout is not None
            for line in broker.stdout:
                if b"serving" in line:
                    break
            echo = subprocess.Popen(
                [sys.executable, "-c", ECHO, nats_url(ws), str(pack_identity(ws, "default").seed_path)],
                stdout=subprocess.PIPE,
            )
            assert echo.stdout is not None
            echo.stdout.readline()
            anyio.run(run, ws, a.n, a.concurrency)
        finally:
            for p in (echo, broker):
                if p is not None:
                    p.terminate()
                    p.wait(timeout=20)


if __name__ == "__main__":
    main()
