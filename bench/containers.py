"""Pack containers: cold start, `rumi up` of many Packs, idle CPU and memory, image sizes.

    python bench/containers.py [--prefix rumi] [--runs 5] [--packs 20] [--many 100] [--idle 20]

Needs root and a Docker engine (bash scripts/ensure-docker.sh). Everything runs in a temporary workspace
(its own workspace tag: every container and network it makes carries that label, and `rumi down` removes
them by it) with small Packs (`benchNNN`: one `echo` tool, no requirements). Images are built (or reused)
first and never inside a measured time. Then, each figure with its own clock:

1. cold start: NATS and the broker run, the image is built, the Pack's container is removed; then
   `rumi up bench000 --no-build` (a subprocess, as a user types it, its bytecode cached) until a call
   of its tool answers: p50 over --runs runs. Also the same through `DockerRuntime.up` in this process
   (no CLI start-up) and the Pack's own create → "ready" time.
2. `rumi up` of --packs Packs from nothing (no NATS, no broker, no network): the subprocess alone, and
   until every Pack answered a call.
3. idle: host CPU from /proc/stat over --idle seconds and over 60 s with those Packs up (after they
   settled), against the same window measured before any of this workspace ran, and the CPU this
   workspace's containers, their shims and the broker used; with --long also over one healthcheck
   interval (its probes included); memory per Pack container.
4. `rumi up` of --many Packs from nothing, until every Pack answered; memory.

Every wait is bounded; the workspace is brought down (`rumi down`) on every exit. The bench's Pack
images are removed at the end; the shared images of the prefix stay for reuse (--remove-images drops
them too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.admin.init import init_workspace
from broker.bus.server import connect
from broker.containers import images as _images
from broker.containers.engine import DockerRuntime
from broker.containers.packimage import build_pack_image, pack_image_tag
from broker.containers.settings import HEALTHCHECK_INTERVAL_S
from broker.core.docker_client import docker_client
from broker.core.net import free_port
from broker.core.protocol import ENCODER, PROTOCOL_VERSION, REPLY_DECODER, CallRequest, call_subject
from broker.core.workspace import Workspace

MB = 1_000_000
SMALL_PACK = '''"""A small Pack for the bench: one tool that answers at once."""

from pack_runtime import Pack

pack = Pack()


@pack.tool("echo")
async def echo(ctx, args):
    return args


if __name__ == "__main__":
    pack.run()
'''


def say(text: str) -> None:
    print(text, flush=True)


def pack_ids(count: int, start: int = 0) -> list[str]:
    return [f"bench{i:03d}" for i in range(start, start + count)]


def add_small_packs(ws: Workspace, ids: Sequence[str]) -> None:
    for pack_id in ids:
        src = ws.pack_source(pack_id)
        src.mkdir(parents=True, exist_ok=True)
        (src / "pack.json").write_text(json.dumps({"id": pack_id, "version": "0.1.0"}))
        (src / "main.py").write_text(SMALL_PACK)


def build_images(client: Any, ws: Workspace, prefix: str, ids: Sequence[str]) -> float:
    started = time.monotonic()
    _images.build_nats_image(client, prefix)
    _images.build_base_image(client, prefix)
    _images.build_sandbox_image(client, prefix)
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda p: build_pack_image(client, ws, p, prefix=prefix), ids))
    return time.monotonic() - started


async def call_all(ws: Workspace, ids: Sequence[str], timeout: float) -> float:
    """Call every Pack's echo tool until each answered (bounded by `timeout`); seconds it took."""
    started = time.monotonic()
    nc = await connect(ws, "cli", max_reconnect_attempts=0)
    try:

        async def one(pack_id: str) -> None:
            deadline = started + timeout
            attempt = 0
            while True:
                attempt += 1
                payload = ENCODER.encode(CallRequest(v=PROTOCOL_VERSION, id=f"b{attempt}", args={"n": attempt}))
                try:
                    msg = await nc.request(call_subject(pack_id, "tool", "echo"), payload, timeout=2)
                    reply = REPLY_DECODER.decode(msg.data)
                    if reply.success and reply.data == {"n": attempt}:
                        return
                except Exception:  # no responders yet, or a timeout: try again until the deadline
                    pass
                if time.monotonic() > deadline or attempt > 1000:
                    raise RuntimeError(f"{pack_id} did not answer within {timeout:g} s")
                await asyncio.sleep(0.05)

        await asyncio.gather(*(one(p) for p in ids))
    finally:
        await nc.close()
    return time.monotonic() - started


def rumi(root: Path, prefix: str, *args: str, timeout: float = 300) -> tuple[float, str]:
    """Run the CLI as a user would; (wall seconds, output). Raises with the output on failure.

    With its bytecode cached, as an installed `rumi` has it (in a directory of the bench's own, so the
    tree gets no __pycache__), even where PYTHONDONTWRITEBYTECODE is set.
    """
    argv = [sys.executable, "-m", "broker.cli", *args, "--root", str(root)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update({"RUMI_IMAGE_PREFIX": prefix, "PYTHONPYCACHEPREFIX": str(root.parent / "pycache")})
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return seconds, done.stdout


def cpu_busy(seconds: float) -> float:
    """Host CPU busy over `seconds`, in % of one core (all cores summed), from /proc/stat."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields[:8]), fields[3] + fields[4]  # total without guest, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    cores = os.cpu_count() or 1
    return 100.0 * cores * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def rumi_cpu_seconds(runtime: DockerRuntime) -> float:
    """CPU seconds used so far by this workspace: its containers' cgroups (healthcheck probes run
    there), their containerd shims with reaped children (runc), and the broker process."""
    from broker.containers.engine import running_broker_pid

    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    ids = [c.id for c in runtime.client.containers.list(filters=runtime._filters())]
    for cid in ids:
        for base in ("/sys/fs/cgroup/cpuacct/docker", "/sys/fs/cgroup/cpu,cpuacct/docker"):
            usage = Path(base, cid, "cpuacct.usage")
            if usage.exists():
                total += int(usage.read_text()) / 1e9
                break
    wanted = {cid.encode() for cid in ids}
    pids = [pid for pid in (running_broker_pid(runtime.ws),) if pid]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"containerd-shim-runc-v2") and wanted & set(argv):
            pids.append(int(proc.name))
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15]) / ticks  # utime stime cutime cstime
    return total


def cpu_both(runtime: DockerRuntime, seconds: float) -> tuple[float, float]:
    """(host CPU busy, CPU used by this workspace), each in % of one core over `seconds`."""
    before = rumi_cpu_seconds(runtime)
    host = cpu_busy(seconds)
    return host, 100.0 * (rumi_cpu_seconds(runtime) - before) / seconds


def pct(values: Sequence[float]) -> str:
    ordered = sorted(values)
    return f"p50 {statistics.median(ordered):.2f} s, min {ordered[0]:.2f} s, max {ordered[-1]:.2f} s"


def pack_memory(runtime: DockerRuntime) -> tuple[list[float], float]:
    stats = runtime.stats()
    packs = [s.memory_bytes / MB for s in stats if s.role == "pack"]
    nats = sum(s.memory_bytes / MB for s in stats if s.role == "nats")
    return packs, nats


def measure_cold_start(ws: Workspace, prefix: str, runs: int, out: Callable[[str], None]) -> dict[str, Any]:
    pack = "bench000"
    runtime = DockerRuntime(ws, prefix=prefix)
    rumi(ws.root, prefix, "up", pack, "--no-build")  # NATS, broker and the Pack: the state before each run
    rumi(ws.root, prefix, "ps")  # the CLI's bytecode is cached now
    cli_runs: list[float] = []
    up_only: list[float] = []
    inproc: list[float] = []
    ready: list[float] = []
    for i in range(runs * 2):
        runtime.client.containers.get(runtime.pack_container_name(pack)).remove(force=True)
        if i % 2 == 0:
            seconds, output = rumi(ws.root, prefix, "up", pack, "--no-build", timeout=120)
            answered = asyncio.run(call_all(ws, [pack], 30))
            cli_runs.append(seconds + answered)
            up_only.append(seconds)
            if i == 0:
                out("   first run's output:\n" + "\n".join("     " + ln for ln in output.splitlines()))
        else:
            started = time.monotonic()
            report = runtime.up([pack], build=False, health_timeout=60)
            asyncio.run(call_all(ws, [pack], 30))
            inproc.append(time.monotonic() - started)
            ready.append(report.packs[0].seconds_to_ready)
    return {"cli": cli_runs, "cli_up": up_only, "inproc": inproc, "ready": ready}


def measure_up(
    ws: Workspace, prefix: str, ids: Sequence[str], out: Callable[[str], None], timeout: float
) -> dict[str, Any]:
    seconds, output = rumi(ws.root, prefix, "up", *ids, "--no-build", "--timeout", str(timeout), timeout=timeout + 60)
    answered = asyncio.run(call_all(ws, ids, 60))
    lines = output.splitlines()
    out("   output (first and last lines):\n" + "\n".join("     " + ln for ln in [*lines[:6], "…", *lines[-4:]]))
    return {"up": seconds, "answering": seconds + answered}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--prefix", default="rumi")
    ap.add_argument("--runs", type=int, default=5, help="cold-start runs (each way)")
    ap.add_argument("--packs", type=int, default=20, help="Packs in the `rumi up` + idle run")
    ap.add_argument("--many", type=int, default=100, help="Packs in the large `rumi up` run (0: skip)")
    ap.add_argument("--idle", type=float, default=20.0, help="seconds of /proc/stat sampling")
    ap.add_argument("--settle", type=float, default=15.0, help="seconds to let Packs settle before sampling")
    ap.add_argument(
        "--long",
        action="store_true",
        help="also sample idle CPU over one whole healthcheck interval (5 min), probes included",
    )
    ap.add_argument("--remove-images", action="store_true", help="also remove the prefix's shared images")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/containers.py needs root (`rumi up` sets host firewall rules)")
    runs, packs, many = max(1, min(a.runs, 50)), max(1, min(a.packs, 200)), max(0, min(a.many, 500))
    client = docker_client(300)
    all_ids = pack_ids(max(packs, many, 1))
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rumi-bench-") as tmp:
        ws = Workspace.at(Path(tmp) / "ws")
        init_workspace(ws)
        config = json.loads(ws.config_file.read_text())
        config["nats_port"] = free_port()
        ws.config_file.write_text(json.dumps(config))
        add_small_packs(ws, all_ids)
        runtime = DockerRuntime(ws, prefix=a.prefix)
        try:
            say(f"building (or reusing) images under prefix {a.prefix} for {len(all_ids)} Packs (not timed)…")
            results["build_s"] = build_images(client, ws, a.prefix, all_ids)
            say(f"   {results['build_s']:.1f} s")
            say(f"0. baseline: host CPU over {a.idle:g} s before anything of this workspace runs")
            results["cpu_before"] = cpu_busy(a.idle)
            say(f"   {results['cpu_before']:.2f} % of one core")

            say(f"1. cold start of one Pack, {runs} runs each way (NATS and broker running, image built)")
            results["cold"] = measure_cold_start(ws, a.prefix, runs, say)
            rumi(ws.root, a.prefix, "down")

            ids = all_ids[:packs]
            say(f"2. `rumi up` of {packs} Packs from nothing (images built)")
            results["up"] = measure_up(ws, a.prefix, ids, say, timeout=120)
            say(f"   up {results['up']['up']:.1f} s, all answering {results['up']['answering']:.1f} s")
            say(f"3. idle: {a.settle:g} s to settle, then host CPU over {a.idle:g} s and over 60 s")
            time.sleep(a.settle)
            results["cpu_idle"], results["rumi_idle"] = cpu_both(runtime, a.idle)
            results["cpu_idle_60"], results["rumi_idle_60"] = cpu_both(runtime, 60.0)
            say(
                f"   host {results['cpu_idle']:.2f} % over {a.idle:g} s, {results['cpu_idle_60']:.2f} % over 60 s;"
                f" this workspace {results['rumi_idle']:.2f} %, {results['rumi_idle_60']:.2f} %"
            )
            if a.long:
                window = HEALTHCHECK_INTERVAL_S + 5.0
                results["cpu_idle_long"], results["rumi_idle_long"] = cpu_both(runtime, window)
                say(
                    f"   over {window:g} s: host {results['cpu_idle_long']:.2f} %, "
                    f"this workspace {results['rumi_idle_long']:.2f} %"
                )
            mem, nats_mem = pack_memory(runtime)
            results["mem"], results["nats_mem"] = mem, nats_mem
            rumi(ws.root, a.prefix, "down")

            if many:
                say(f"4. `rumi up` of {many} Packs from nothing (images built)")
                results["many"] = measure_up(ws, a.prefix, all_ids[:many], say, timeout=240)
                mem_many, nats_many = pack_memory(runtime)
                results["many_mem"], results["many_nats"] = mem_many, nats_many
                say(f"   up {results['many']['up']:.1f} s, all answering {results['many']['answering']:.1f} s")
                time.sleep(a.settle)
                results["many_cpu_idle"], results["many_rumi_idle"] = cpu_both(runtime, a.idle)
        finally:
            try:  # before --remove-images takes them away
                results["sizes"] = _images.image_sizes(client, a.prefix)
            except Exception as exc:  # the cleanup below still runs
                say(f"could not read image sizes: {exc}")
            try:
                rumi(ws.root, a.prefix, "down", timeout=600)
            finally:
                for pack_id in all_ids:
                    try:
                        client.images.remove(pack_image_tag(pack_id, a.prefix), noprune=False)
                    except Exception as exc:  # already gone, or still in use: say so, go on
                        if "No such image" not in str(exc):
                            say(f"could not remove {pack_image_tag(pack_id, a.prefix)}: {exc}")
                if a.remove_images:
                    _images.remove_images(client, a.prefix)
    report(results, packs, many, a)


def report(r: dict[str, Any], packs: int, many: int, a: argparse.Namespace) -> None:
    cold = r["cold"]
    say("")
    say("images: " + ", ".join(f"{k} {v / MB:.1f} MB" for k, v in r.get("sizes", {}).items()))
    say(f"cold start, `rumi up PACK` (CLI process) → call answered: {pct(cold['cli'])}")
    say(f"   the CLI process alone: {pct(cold['cli_up'])}")
    say(f"cold start, DockerRuntime.up([PACK]) in process → call answered: {pct(cold['inproc'])}")
    say(f"   container create → SDK 'ready': {pct(cold['ready'])}")
    say(f"rumi up of {packs} Packs from nothing: {r['up']['up']:.1f} s; all answering after {r['up']['answering']:.1f} s")
    say(
        f"host CPU, {packs} idle Packs up: {r['cpu_idle']:.2f} % of one core over {a.idle:g} s, "
        f"{r['cpu_idle_60']:.2f} % over 60 s (before anything ran: {r['cpu_before']:.2f} %); used by "
        f"this workspace (containers, shims, broker): {r['rumi_idle']:.2f} % and {r['rumi_idle_60']:.2f} %"
    )
    if "cpu_idle_long" in r:
        say(
            f"   over one whole healthcheck interval ({HEALTHCHECK_INTERVAL_S} s, probes included): host "
            f"{r['cpu_idle_long']:.2f} %, this workspace {r['rumi_idle_long']:.2f} %"
        )
    mem = r["mem"]
    say(
        f"idle memory per Pack container: p50 {statistics.median(mem):.1f} MB, max {max(mem):.1f} MB; "
        f"{len(mem)} Packs {sum(mem):.0f} MB (+ NATS {r['nats_mem']:.1f} MB)"
    )
    if many:
        mm = r["many_mem"]
        say(
            f"rumi up of {many} Packs from nothing: {r['many']['up']:.1f} s; all answering after "
            f"{r['many']['answering']:.1f} s; memory {sum(mm):.0f} MB (p50 {statistics.median(mm):.1f} MB "
            f"per Pack, NATS {r['many_nats']:.1f} MB); idle CPU host {r['many_cpu_idle']:.2f} %, "
            f"this workspace {r['many_rumi_idle']:.2f} % of one core"
        )


if __name__ == "__main__":
    main()
