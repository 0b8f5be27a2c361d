"""JetStream atomic batch publish vs pipelined single publishes, fsynced, in one run.

    python bench/jsbatch.py [--events 6000] [--sizes 4,8,16,32] [--sync always]

Issue 8 asked whether JetStream's batch publishing (ADR-50: `Nats-Batch-Id`, `Nats-Batch-Sequence`,
`Nats-Batch-Commit`, `allow_atomic` on the stream, nats-server 2.12+; nats-py has no client for it) would
let the audit writer commit more events per second than pipelined single publishes. This starts its
own nats-server (the one on PATH) with JetStream `sync_interval` as given, on a free 127.0.0.1 port
and a temporary store, creates one stream with `allow_atomic`, and publishes 480-byte events:

- `single, c=N`: N publishes in flight, each with its `Nats-Msg-Id` and its own ack (what the broker's
  `AuditWriter` does: pipelined, one ack per event).
- `atomic batch of B`: batches of B events, one at a time (and `--in-flight` at a time), only the commit
  message asks for an ack, which covers the whole batch.

Prints events/s and the mean time a waiter waits (per batch, or per single publish). Nothing but the
server it started is touched; the server is stopped and its store deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nats

EVENT = b"x" * 480


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def measure(url: str, events: int, sizes: list[int], in_flight: list[int], single_c: list[int]) -> None:
    nc = await nats.connect(url)
    config = {
        "name": "BENCH_BATCH",
        "subjects": ["bench.batch.>"],
        "storage": "file",
        "allow_atomic": True,
        "discard": "new",
        "duplicate_window": 120_000_000_000,
    }
    created = json.loads(
        (await nc.request("$JS.API.STREAM.CREATE.BENCH_BATCH", json.dumps(config).encode(), 5)).data
    )
    if "error" in created:
        raise SystemExit(f"stream not created: {created['error']}")
    inbox = nc.new_inbox()
    waiters: dict[str, asyncio.Future[bytes]] = {}

    async def on_ack(msg: nats.aio.msg.Msg) -> None:
        fut = waiters.pop(msg.subject, None)
        if fut is not None and not fut.done():
            fut.set_result(msg.data)

    await nc.subscribe(inbox + ".*", cb=on_ack)
    loop = asyncio.get_running_loop()
    counter = 0

    def waiter() -> tuple[str, asyncio.Future[bytes]]:
        nonlocal counter
        counter += 1
        key = f"{inbox}.{counter}"
        waiters[key] = fut = loop.create_future()
        return key, fut

    def check(ack: bytes) -> None:
        if b'"error"' in ack:
            raise SystemExit(f"publish refused: {ack.decode()}")

    async def single(c: int) -> tuple[float, float]:
        gate = asyncio.Semaphore(c)
        waits: list[float] = []

        async def one() -> None:
            async with gate:
                key, fut = waiter()
                started = time.perf_counter()
                await nc.publish(
                    "bench.batch.single", EVENT, reply=key, headers={"Nats-Msg-Id": uuid.uuid4().hex}
                )
                check(await asyncio.wait_for(fut, 10))
                waits.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(events)))
        return events / (time.perf_counter() - started), sum(waits) / len(waits)

    async def batches(size: int, k: int) -> tuple[float, float]:
        gate = asyncio.Semaphore(k)
        waits: list[float] = []

        async def one() -> None:
            async with gate:
                batch_id = uuid.uuid4().hex
                key, fut = waiter()
                started = time.perf_counter()
                for seq in range(1, size + 1):
                    headers = {
                        "Nats-Batch-Id": batch_id,
                        "Nats-Batch-Sequence": str(seq),
                        "Nats-Msg-Id": uuid.uuid4().hex,
                    }
                    if seq == size:
                        headers["Nats-Batch-Commit"] = "1"
                    await nc.publish(
                        "bench.batch.atomic", EVENT, reply=key if seq == size else "", headers=headers
                    )
                check(await asyncio.wait_for(fut, 10))
                waits.append(time.perf_counter() - started)

        n = max(1, events // size)
        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return n * size / (time.perf_counter() - started), sum(waits) / len(waits)

    print(f"{'mode':<34} {'events/s':>9} {'mean wait':>10}")
    for c in single_c:
        rate, wait = await single(c)
        print(f"{f'single publishes, c={c}':<34} {rate:9.0f} {wait * 1000:8.2f} ms", flush=True)
    for size in sizes:
        for k in in_flight:
            rate, wait = await batches(size, k)
            print(
                f"{f'atomic batch of {size}, {k} in flight':<34} {rate:9.0f} {wait * 1000:8.2f} ms",
                flush=True,
            )
    info = json.loads((await nc.request("$JS.API.STREAM.INFO.BENCH_BATCH", b"", 5)).data)
    print(f"stream holds {info['state']['messages']} events")
    await nc.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=6000, help="events per mode (6000)")
    ap.add_argument(
        "--sizes", default="4,8,16,32", help="atomic batch sizes (4,8,16,32; the server's cap is 1000)"
    )
    ap.add_argument("--in-flight", default="1,4", help="atomic batches in flight at once (1,4)")
    ap.add_argument("--single", default="1,32", help="single-publish concurrencies (1,32)")
    ap.add_argument("--sync", default="always", help="JetStream sync_interval (always, as Rumi ships)")
    a = ap.parse_args()
    server = shutil.which("nats-server")
    if server is None:
        print("nats-server not on PATH: run `bash scripts/bootstrap.sh` and use .venv/bin", file=sys.stderr)
        return 3
    version = subprocess.run([server, "--version"], capture_output=True, text=True).stdout.strip()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="rumi-bench-jsbatch-") as tmp:
        port = free_port()
        conf = Path(tmp) / "server.conf"
        conf.write_text(
            f'listen: 127.0.0.1:{port}\njetstream {{ store_dir: "{tmp}/js", sync_interval: {a.sync} }}\n'
        )
        proc = subprocess.Popen(
            [server, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit("nats-server did not start") from None
                    time.sleep(0.05)
            print(f"{version}, sync_interval {a.sync}, {a.events} events of {len(EVENT)} bytes per mode")
            asyncio.run(
                measure(
                    f"nats://127.0.0.1:{port}", a.events, ints(a.sizes), ints(a.in_flight), ints(a.single)
                )
            )
        finally:
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
