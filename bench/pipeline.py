"""Request pipeline benchmark: echo, write-ahead floor and broker paths, measured in one run.

    python bench/pipeline.py [--n 2000] [--seconds 5] [--ladder 1,2,4,8,16,32,64]
                             [--sustain 10] [--workers N] [--sync always] [--out-dir bench/results]

One embedded nats-server (the workspace's generated config: JetStream, sync_interval as in
docker/config.json, `always` by default) serves every path in the run:

* echo      -- a bare nats-py responder in its own process, answering the `cli` identity on a Pack's
               call subject (through the Pack account's import), as bench/roundtrip.py does;
* floor     -- the same responder, but it first publishes one record to a JetStream stream with the
               audit stream's settings and waits for the ack: the floor for "decide, record, reply";
* js_alone  -- one JetStream publish + ack from the benchmark process (latency only);
* file_read / env_read / denied -- the broker (`python -m broker.cli broker --root <ws>`, its own
               process) through the Pack SDK: file_read of a granted 1 KiB file, env_read of the
               granted key, env_read of a key that is not granted.

For every path: p50/p99 at c=1 (`--n` sequential requests) and a closed-loop throughput ladder
(`--seconds` per point, at most `--max-per-point` requests), with CPU per request of the answering
process (broker, or the responder), of nats-server and of this client, read from /proc/<pid>/stat
(utime+stime) before and after each point.  Then `--sustain S` seconds of mixed traffic (file_read,
env_read, file_write, denied) at the highest rate the broker held, followed by an audit-stream census
(events per request id and phase, per kind) and `rumi audit verify`.

Writes <out-dir>/pipeline-<date>.json and, when matplotlib is importable, the .png (bench/plot.py).
Everything runs in a temporary workspace on 127.0.0.1; every child process is stopped by pid.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import importlib.util
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from broker.admin.init import init_workspace  # noqa: E402
from broker.bus.creds import ensure_identity, pack_identity  # noqa: E402
from broker.bus.server import EmbeddedServer, connect  # noqa: E402
from broker.core.workspace import Workspace  # noqa: E402
from pack_runtime import BrokerError, Pack, PermissionDenied  # noqa: E402

PACK_ID = "default"
COMPONENT = "default:tool:my_tool"  # granted by `rumi init`: its work area for files, one env key
GRANTED_KEY = "RUMI_DEMO_GREETING"  # written to docker/.rumi/secrets.env by `rumi init`
DENIED_KEY = "BENCH_KEY_NOT_GRANTED"
ECHO_SUBJECT = f"rumi.pack.{PACK_ID}.call.tool.bench_echo"
FLOOR_SUBJECT = f"rumi.pack.{PACK_ID}.call.tool.bench_floor"
# A stream of our own, so the audit chains stay the broker's alone.  The `cli` identity may publish
# `rumi.pack.*.call.>` and receive `_INBOX.cli.>` (the acks); "benchfloor" is no Pack.
FLOOR_STREAM = "BENCH_FLOOR"
FLOOR_STREAM_SUBJECT = "rumi.pack.benchfloor.call.>"
RECORD_BYTES = 480  # about the size of one canonical-JSON audit event
ECHO_PAYLOAD = b"x" * 64
FILE_BYTES = 1024
WRITE_DATA = b"w" * FILE_BYTES
PATHS = ("echo", "floor", "file_read", "env_read", "denied", "file_read_packs")
BROKER_PATHS = ("file_read", "env_read", "denied", "file_read_packs")
SUSTAIN_KINDS = ("file_read", "env_read", "file_write", "denied")
LABELS = {
    "echo": "bare nats-py echo (cli -> Pack import -> responder)",
    "floor": "floor: echo + JetStream publish+ack",
    "js_alone": "JetStream publish + ack alone",
    "file_read": "broker file_read 1 KiB (granted)",
    "env_read": "broker env_read (granted key)",
    "denied": "broker env_read, key not granted",
    "file_read_packs": "broker file_read 1 KiB, spread over --packs Packs",
}
CLK_TCK = os.sysconf("SC_CLK_TCK")

RESPONDER = textwrap.dedent("""
    import asyncio, os, sys, nats
    async def main():
        url, pack_seed, cli_seed, echo_subj, floor_subj, js_subj, size = sys.argv[1:8]
        nc = await nats.connect(url, nkeys_seed=pack_seed, name="bench-responder")
        cli = await nats.connect(url, nkeys_seed=cli_seed, inbox_prefix="_INBOX.cli", name="bench-floor-js")
        js = cli.jetstream()
        record = b"r" * int(size)
        tag = f"floor-{os.getpid()}-"
        counter = [0]
        tasks = set()
        async def echo(msg):
            await msg.respond(msg.data)
        async def floor_one(msg):
            counter[0] += 1
            try:
                await js.publish(js_subj, record, timeout=10, headers={"Nats-Msg-Id": tag + str(counter[0])})
            except Exception as exc:
                await msg.respond(b"ERR " + type(exc).__name__.encode())
                return
            await msg.respond(msg.data)
        async def floor(msg):
            task = asyncio.create_task(floor_one(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await nc.subscribe(echo_subj, cb=echo)
        await nc.subscribe(floor_subj, cb=floor)
        await nc.flush()
        await cli.flush()
        print("ready", flush=True)
        await asyncio.Event().wait()
    asyncio.run(main())
""")


def log(text: str) -> None:
    """Progress goes to stderr; the tables go to stdout."""
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# statistics and CPU counters


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (as bench/roundtrip.py)."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def summary(lat: list[float]) -> dict[str, Any]:
    if not lat:
        return {"n": 0}
    return {
        "n": len(lat),
        "p50_ms": round(statistics.median(lat), 4),
        "p90_ms": round(pct(lat, 90), 4),
        "p99_ms": round(pct(lat, 99), 4),
        "mean_ms": round(statistics.fmean(lat), 4),
        "min_ms": round(min(lat), 4),
        "max_ms": round(max(lat), 4),
    }


def _stat_fields(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after "(comm)": index 0 is field 3 (state); ppid = field 4, utime/stime = 14/15,
    # starttime = 22.
    return data[data.rindex(")") + 2 :].split()


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def descendants(root: int) -> list[int]:
    """`root` and every live process below it (by ppid), from /proc."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children[int(fields[1])].append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19] if fields else None


class CpuProbe:
    """utime+stime (clock ticks) of a process tree, per pid, so processes that come and go count once."""

    def __init__(self, root: int | None, *, tree: bool = False, exclude_comm: tuple[str, ...] = ()) -> None:
        self.root = root
        self.tree = tree
        self.exclude_comm = exclude_comm
        self.seen: dict[int, str | None] = {}  # pid -> start time: what we may stop later

    def read(self) -> dict[int, int]:
        if self.root is None:
            return {}
        pids = descendants(self.root) if self.tree else [self.root]
        out = {}
        for pid in pids:
            if pid != self.root and _comm(pid) in self.exclude_comm:
                continue
            fields = _stat_fields(pid)
            if fields is not None:
                out[pid] = int(fields[11]) + int(fields[12])
                self.seen.setdefault(pid, fields[19])
        return out

    @staticmethod
    def seconds(before: dict[int, int], after: dict[int, int]) -> float:
        return sum(t - before.get(pid, 0) for pid, t in after.items()) / CLK_TCK


# --------------------------------------------------------------------------------------------------
# measurement loops


def error_code(exc: BaseException) -> str:
    if isinstance(exc, BrokerError):
        return exc.code
    return type(exc).__name__


async def sequential(fn: Callable[[], Awaitable[None]], n: int, budget: float) -> tuple[list[float], Counter]:
    """`n` requests one after another (stops early after `budget` seconds)."""
    lat: list[float] = []
    errs: Counter[str] = Counter()
    deadline = time.perf_counter() + budget
    for _ in range(n):
        t = time.perf_counter()
        try:
            await fn()
        except Exception as exc:
            errs[error_code(exc)] += 1
        else:
            lat.append((time.perf_counter() - t) * 1000)
        if time.perf_counter() > deadline:
            break
    return lat, errs


async def closed_loop(
    fn: Callable[[], Awaitable[None]], width: int, seconds: float, max_requests: int
) -> tuple[list[float], Counter, float, int]:
    """`width` workers, each sending its next request when the last one is answered, for `seconds`
    (or until `max_requests` have been started).  Returns latencies, errors, elapsed s, started."""
    lat: list[float] = []
    errs: Counter[str] = Counter()
    started = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def worker() -> None:
        nonlocal started
        while started < max_requests:
            t = time.perf_counter()
            if t >= deadline:
                return
            started += 1
            try:
                await fn()
            except Exception as exc:
                errs[error_code(exc)] += 1
                continue
            lat.append((time.perf_counter() - t) * 1000)

    async with anyio.create_task_group() as tg:
        for _ in range(width):
            tg.start_soon(worker)
    return lat, errs, time.perf_counter() - t0, started


# --------------------------------------------------------------------------------------------------
# processes


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    probe: CpuProbe = field(init=False)

    def __post_init__(self) -> None:
        self.probe = CpuProbe(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self, timeout: float) -> None:
        """SIGTERM (the broker drains), then SIGKILL; only this pid, which we started."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"  {self.name} (pid {self.proc.pid}) did not stop in {timeout:g} s: SIGKILL")
                self.proc.kill()
                self.proc.wait(10)


def spawn(name: str, argv: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> Child:
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,  # Ctrl-C reaches us; we stop the children in order
        )
    return Child(name, proc, log_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def broker_supports_workers(env: dict[str, str]) -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "broker.cli", "broker", "--help"],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "200", "NO_COLOR": "1"},
        cwd=REPO,
        timeout=60,
    )
    return "--workers" in out.stdout + out.stderr


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain").splitlines() if line.strip()]
    return {"head": git("rev-parse", "HEAD"), "changed_files": changed}


def tool_version(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# --------------------------------------------------------------------------------------------------
# the run


@dataclass
class Env:
    ws: Workspace
    broker: Child
    responder: Child
    server_pid: int
    args: argparse.Namespace
    broker_probe: CpuProbe
    ids: dict[str, str] = field(default_factory=dict)  # request id -> sustain kind


_ID_SINK: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("bench_id_sink", default=None)


def capture_request_ids() -> bool:
    """Wrap the SDK's id generator so a sustain request's id is known (to match its audit events)."""
    try:
        import pack_runtime._context as sdk_context
    except ImportError:
        return False
    original = getattr(sdk_context, "new_request_id", None)
    if original is None:
        return False

    def new_request_id() -> str:
        rid = original()
        sink = _ID_SINK.get()
        if sink is not None:
            sink.append(rid)
        return str(rid)

    sdk_context.new_request_id = new_request_id
    return True


async def js_api(nc: Any, subject: str, payload: bytes = b"") -> dict[str, Any]:
    msg = await nc.request(subject, payload, timeout=10)
    return dict(json.loads(msg.data))


async def create_floor_stream(ws: Workspace) -> dict[str, Any]:
    """BENCH_FLOOR: the audit stream's own settings (read from the server), our name and subject."""
    admin = await connect(ws, "admin")
    try:
        info = await js_api(admin, "$JS.API.STREAM.INFO.RUMI_AUDIT")
        config = dict(info.get("config") or {})
        if not config:
            raise SystemExit(f"cannot read the RUMI_AUDIT stream's config: {info.get('error')}")
        for key in ("metadata", "sealed", "mirror", "sources", "consumer_limits"):
            config.pop(key, None)
        config.update(name=FLOOR_STREAM, subjects=[FLOOR_STREAM_SUBJECT], description="bench floor")
        created = await js_api(admin, f"$JS.API.STREAM.CREATE.{FLOOR_STREAM}", json.dumps(config).encode())
        if "error" in created:
            raise SystemExit(f"cannot create {FLOOR_STREAM}: {created['error']}")
        return config
    finally:
        await admin.close()


async def audit_stream_state(nc: Any) -> dict[str, Any]:
    info = await js_api(nc, "$JS.API.STREAM.INFO.RUMI_AUDIT")
    return dict(info.get("state") or {})


async def wait_broker(pack: Pack, broker: Child, timeout: float) -> None:
    """Until an allowed env_read is answered (the readiness line may change; an answer will not)."""
    ctx = pack.context(COMPONENT)
    saved = ctx.timeout
    ctx.timeout = 1.0
    deadline = time.monotonic() + timeout
    last = ""
    try:
        while time.monotonic() < deadline:
            if not broker.alive():
                raise SystemExit(f"the broker exited with code {broker.proc.returncode}:\n{broker.tail()}")
            try:
                await ctx.env_read(GRANTED_KEY)
                return
            except BrokerError as exc:
                last = f"{exc.code}: {exc}"
                if exc.code not in ("unavailable", "timeout"):
                    return  # it answered: serving (the sanity checks report what it answered)
            await anyio.sleep(0.1)
    finally:
        ctx.timeout = saved
    raise SystemExit(f"the broker did not answer within {timeout:g} s ({last}):\n{broker.tail()}")


async def measure(env: Env) -> dict[str, Any]:
    a = env.args
    ws = env.ws
    cli = await connect(ws, "cli")
    pack = Pack(
        PACK_ID, nats_url=a.url, creds=str(pack_identity(ws, PACK_ID).seed_path), request_timeout=a.timeout
    )
    pack_nc = await pack.connect()
    try:
        await wait_broker(pack, env.broker, 60)
        ctx = pack.context(COMPONENT)
        sandbox = ws.pack_work_area(PACK_ID)
        read_path = str(sandbox / "bench-1k.bin")
        js = cli.jetstream()
        alone_ids = itertools.count()

        async def echo() -> None:
            await cli.request(ECHO_SUBJECT, ECHO_PAYLOAD, timeout=a.timeout)

        async def floor() -> None:
            msg = await cli.request(FLOOR_SUBJECT, ECHO_PAYLOAD, timeout=a.timeout)
            if msg.data.startswith(b"ERR "):
                raise RuntimeError(msg.data.decode(errors="replace"))

        record = b"r" * RECORD_BYTES

        async def js_alone() -> None:
            await js.publish(
                "rumi.pack.benchfloor.call.alone",
                record,
                timeout=a.timeout,
                headers={"Nats-Msg-Id": f"alone-{next(alone_ids)}"},
            )

        async def file_read() -> None:
            data = await ctx.file_read(read_path)
            if len(data) != FILE_BYTES:
                raise RuntimeError("short read")

        async def env_read() -> None:
            await ctx.env_read(GRANTED_KEY)

        async def denied() -> None:
            try:
                await ctx.env_read(DENIED_KEY)
            except PermissionDenied:
                return
            raise RuntimeError("not denied")

        # --packs N: N Packs (default + bench1..), each with its own connection and lane; requests go
        # round-robin over them, so `--workers` can spread them (a Pack's lane lives in one worker).
        extra = [f"bench{i}" for i in range(1, a.packs)]
        extra_ncs = []
        targets = [(ctx, read_path)]
        for pid in extra:
            other = Pack(
                pid, nats_url=a.url, creds=str(pack_identity(ws, pid).seed_path), request_timeout=a.timeout
            )
            extra_ncs.append(await other.connect())
            await wait_broker(other, env.broker, 60)
            targets.append(
                (other.context(f"{pid}:tool:my_tool"), str(ws.pack_work_area(pid) / "bench-1k.bin"))
            )
        turn = itertools.count()

        async def file_read_packs() -> None:
            octx, opath = targets[next(turn) % len(targets)]
            data = await octx.file_read(opath)
            if len(data) != FILE_BYTES:
                raise RuntimeError("short read")

        write_seq = itertools.count()

        async def file_write() -> None:
            await ctx.file_write(str(sandbox / f"bench-w{next(write_seq) % 16}.bin"), WRITE_DATA)

        fns: dict[str, Callable[[], Awaitable[None]]] = {
            "echo": echo,
            "floor": floor,
            "js_alone": js_alone,
            "file_read": file_read,
            "env_read": env_read,
            "denied": denied,
            "file_read_packs": file_read_packs,
            "file_write": file_write,
        }
        # Sanity: each path does what it says before anything is timed.  The tree is being changed:
        # a path that fails is reported and skipped, the others are still measured.
        broken: dict[str, str] = {}
        for name in ("echo", "floor", "js_alone", "file_read", "env_read", "denied", "file_write"):
            try:
                await fns[name]()
            except Exception as exc:
                broken[name] = f"{error_code(exc)}: {exc}"
                print(f"path {name} fails before measuring ({broken[name]}): skipped")

        self_probe = CpuProbe(os.getpid())
        server_probe = CpuProbe(env.server_pid)
        results: dict[str, Any] = {"paths": {}}
        measured = ["echo", "js_alone", "floor", "file_read", "env_read", "denied"]
        if a.packs > 1:
            measured.append("file_read_packs")
        for name in measured:
            fn = fns[name]
            if name in broken:
                results["paths"][name] = {"label": LABELS[name], "skipped": broken[name]}
                continue
            answering = env.broker_probe if name in BROKER_PATHS else env.responder.probe
            if name == "js_alone":
                answering = CpuProbe(None)
            log(f"[{name}] warm-up, then {a.n} sequential requests")
            await sequential(fn, min(200, max(20, a.n // 10)), 10)
            lat, errs = await sequential(fn, a.n, max(30.0, a.n * 0.05))
            entry: dict[str, Any] = {"label": LABELS[name], "c1": {**summary(lat), "errors": dict(errs)}}
            if name != "js_alone":
                entry["ladder"] = []
                for width in a.ladder:
                    before = (answering.read(), server_probe.read(), self_probe.read())
                    with anyio.fail_after(a.seconds + a.timeout + 30):
                        plat, perrs, elapsed, started = await closed_loop(
                            fn, width, a.seconds, a.max_per_point
                        )
                    await anyio.sleep(0.25)  # trailing work (events written after the reply) counts too
                    after = (answering.read(), server_probe.read(), self_probe.read())
                    done = len(plat)
                    cpu = [CpuProbe.seconds(b, x) for b, x in zip(before, after, strict=True)]
                    point = {
                        "c": width,
                        "ok": done,
                        "started": started,
                        "errors": dict(perrs),
                        "seconds": round(elapsed, 3),
                        "rps": round(done / elapsed, 1) if elapsed > 0 else 0.0,
                        **{k: v for k, v in summary(plat).items() if k in ("p50_ms", "p99_ms")},
                        "cpu_us_per_req": {
                            "answering": round(cpu[0] / done * 1e6, 1) if done else None,
                            "nats_server": round(cpu[1] / done * 1e6, 1) if done else None,
                            "client": round(cpu[2] / done * 1e6, 1) if done else None,
                        },
                        "cpu_seconds": {"answering": cpu[0], "nats_server": cpu[1], "client": cpu[2]},
                    }
                    entry["ladder"].append(point)
                    log(
                        f"[{name}] c={width:<3} {point['rps']:>8.0f} req/s  p50 {point.get('p50_ms', 0):.3f} ms"
                        f"  answering CPU {point['cpu_us_per_req']['answering']} us/req"
                        + (f"  errors {dict(perrs)}" if perrs else "")
                    )
            results["paths"][name] = entry
        if a.sustain > 0:
            kinds = [k for k in SUSTAIN_KINDS if k not in broken]
            try:
                results["sustain"] = await sustain(env, fns, kinds, results, server_probe, self_probe)
            except Exception as exc:  # keep the ladder's results: the JSON is still written
                log(f"[sustain] failed: {type(exc).__name__}: {exc}")
                results["sustain"] = {"error": f"{type(exc).__name__}: {exc}"}
        return results
    finally:
        for extra_nc in locals().get("extra_ncs", []):
            await extra_nc.close()
        await pack_nc.close()
        await cli.close()


def best_broker_point(results: dict[str, Any]) -> tuple[float, int, str]:
    best = (0.0, 32, "")
    for name in ("file_read", "env_read"):
        for point in results["paths"].get(name, {}).get("ladder", []):
            # "Held": answered without refusals (at most 1% errors).
            if point["rps"] > best[0] and sum(point["errors"].values()) <= 0.01 * point["ok"]:
                best = (point["rps"], point["c"], name)
    return best


async def sustain(
    env: Env,
    fns: dict[str, Callable[[], Awaitable[None]]],
    kinds: list[str],
    results: dict[str, Any],
    server_probe: CpuProbe,
    self_probe: CpuProbe,
) -> dict[str, Any]:
    a = env.args
    peak, peak_c, peak_path = best_broker_point(results)
    rate = a.sustain_rate or peak or 500.0
    cap = a.sustain_concurrency or peak_c
    log(f"[sustain] {a.sustain:g} s of mixed traffic at {rate:.0f} req/s, at most {cap} in flight")
    audit = await connect(env.ws, "audit")
    try:
        first_seq = int((await audit_stream_state(audit)).get("last_seq", 0)) + 1
        sent: Counter[str] = Counter()
        ok: Counter[str] = Counter()
        errs: dict[str, Counter[str]] = defaultdict(Counter)
        lat: dict[str, list[float]] = defaultdict(list)
        per_second: Counter[int] = Counter()
        ids = env.ids
        sem = anyio.Semaphore(cap)
        t0 = time.perf_counter()
        end = t0 + a.sustain

        async def one(kind: str) -> None:
            sink: list[str] = []
            _ID_SINK.set(sink)
            t = time.perf_counter()
            try:
                await fns[kind]()
                ok[kind] += 1
                lat[kind].append((time.perf_counter() - t) * 1000)
            except Exception as exc:
                errs[kind][error_code(exc)] += 1
            finally:
                sem.release()
                per_second[int(time.perf_counter() - t0)] += 1
                for rid in sink:
                    ids[rid] = kind

        before = (env.broker_probe.read(), server_probe.read(), self_probe.read())
        with anyio.fail_after(a.sustain + a.timeout + 30):
            async with anyio.create_task_group() as tg:
                for i in itertools.count():
                    due = t0 + i / rate
                    if due >= end:
                        break
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await anyio.sleep(delay)
                    await sem.acquire()
                    if time.perf_counter() >= end:
                        sem.release()
                        break
                    kind = kinds[i % len(kinds)]
                    sent[kind] += 1
                    tg.start_soon(one, kind)
        elapsed = time.perf_counter() - t0
        # Let the event count settle (events may be written after the reply), at most 15 s.
        last, stable_since, settle_deadline = -1, time.monotonic(), time.monotonic() + 15
        while time.monotonic() < settle_deadline:
            now = int((await audit_stream_state(audit)).get("last_seq", 0))
            if now != last:
                last, stable_since = now, time.monotonic()
            elif time.monotonic() - stable_since >= 1.0:
                break
            await anyio.sleep(0.2)
        after = (env.broker_probe.read(), server_probe.read(), self_probe.read())
        total_ok = sum(ok.values())
        cpu = [CpuProbe.seconds(b, x) for b, x in zip(before, after, strict=True)]
        seconds = [per_second[s] for s in range(int(a.sustain))]
        log(f"[sustain] reading audit events from stream seq {first_seq}")
        events = await read_window(audit, first_seq)
    finally:
        await audit.close()

    census = audit_census(events, ids, sent, kinds)
    out: dict[str, Any] = {
        "seconds": a.sustain,
        "target_rps": round(rate, 1),
        "target_from": f"{peak_path} peak at c={peak_c}" if not a.sustain_rate else "--sustain-rate",
        "max_in_flight": cap,
        "elapsed_s": round(elapsed, 3),
        "achieved_rps": round(total_ok / elapsed, 1),
        "completed_per_second": {"min": min(seconds, default=0), "max": max(seconds, default=0)},
        "held": total_ok / elapsed >= 0.95 * rate,
        "kinds": {
            kind: {
                "sent": sent[kind],
                "ok": ok[kind],
                "errors": dict(errs[kind]),
                **{k: v for k, v in summary(lat[kind]).items() if k in ("p50_ms", "p99_ms")},
            }
            for kind in kinds
        },
        "cpu_us_per_req": {
            "broker": round(cpu[0] / total_ok * 1e6, 1) if total_ok else None,
            "nats_server": round(cpu[1] / total_ok * 1e6, 1) if total_ok else None,
            "client": round(cpu[2] / total_ok * 1e6, 1) if total_ok else None,
        },
        "audit": census,
        "first_stream_seq": first_seq,
    }
    out["verify"] = run_verify(env)
    return out


async def read_window(audit: Any, first_seq: int) -> list[dict[str, Any]]:
    """Events from stream sequence `first_seq` on (read_events, as tests/test_broker.py does)."""
    from broker.audit import trail

    events: list[dict[str, Any]] = []
    with anyio.fail_after(300):
        try:
            gen = trail.read_events(audit, follow=False, pack=None, decision=None, start_seq=first_seq)
            async with contextlib.aclosing(gen) as stream:
                async for event in stream:
                    events.append(event)
        except TypeError:
            # No start_seq: read everything; the census keeps only events of known request ids.
            gen = trail.read_events(audit, follow=False, pack=None, decision=None)
            async with contextlib.aclosing(gen) as stream:
                async for event in stream:
                    events.append(event)
    return events


def audit_census(
    events: list[dict[str, Any]], ids: dict[str, str], sent: Counter[str], kinds_sent: list[str]
) -> dict[str, Any]:
    """Generic: events per request id and phase, per kind; requests with 0, 1, 2, >2 events."""
    per_request: dict[str, Counter[str]] = defaultdict(Counter)
    detail: dict[str, Counter[str]] = defaultdict(Counter)  # kind -> "phase decision/code" -> events
    covered: Counter[str] = Counter()  # kind -> events weighted by `count` (an aggregate stands for N)
    unattributed: Counter[str] = Counter()
    unattributed_weighted: Counter[str] = Counter()  # the same, weighted by `count`
    for event in events:
        rid = str(event.get("request_id", ""))
        phase = str(event.get("phase") or "-")
        if rid in ids:
            per_request[rid][phase] += 1
            detail[ids[rid]][f"{phase} {event.get('decision')}/{event.get('code')}"] += 1
            count = event.get("count")
            covered[ids[rid]] += count if isinstance(count, int) and count > 0 else 1
        else:
            # e.g. a checkpoint, or an aggregate whose first refusal came before the window began
            # (it still counts the refusals of the window folded into it)
            key = f"{event.get('capability', '?')}/{phase}/{event.get('code', '?')}"
            unattributed[key] += 1
            count = event.get("count")
            unattributed_weighted[key] += count if isinstance(count, int) and count > 0 else 1
    kinds: dict[str, Any] = {}
    for kind in kinds_sent:
        rids = [rid for rid, k in ids.items() if k == kind]
        phases: Counter[str] = Counter()
        hist: Counter[int] = Counter()
        shapes: Counter[str] = Counter()
        for rid in rids:
            c = per_request.get(rid, Counter())
            phases.update(c)
            hist[sum(c.values())] += 1
            shapes[" + ".join(f"{p}x{n}" for p, n in sorted(c.items())) or "none"] += 1
        kinds[kind] = {
            "sent": sent[kind],
            "ids_known": len(rids),
            "events": sum(phases.values()),
            "events_by_phase": dict(phases),
            "events_by_phase_decision_code": dict(detail[kind]),
            "events_count_weighted": covered[kind],
            "requests_by_event_count": {str(k): v for k, v in sorted(hist.items())},
            "requests_0_events": hist.get(0, 0),
            "requests_over_2_events": sum(v for k, v in hist.items() if k > 2),
            "shapes": dict(shapes.most_common(5)),
        }
    return {
        "events_read": len(events),
        "ids_captured": bool(ids),
        "kinds": kinds,
        "unattributed": dict(unattributed.most_common(10)),
        "unattributed_total": sum(unattributed.values()),
        "unattributed_count_weighted": dict(unattributed_weighted.most_common(10)),
    }


def run_verify(env: Env) -> dict[str, Any]:
    """`rumi audit verify --root <ws>` (reads the whole stream, checks every chain)."""
    log("[sustain] rumi audit verify")
    t = time.perf_counter()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "broker.cli", "audit", "verify", "--root", str(env.ws.root)],
            capture_output=True,
            text=True,
            env=child_env(),
            cwd=env.ws.root,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        return {"exit_code": None, "ok": False, "output": "timed out after 600 s"}
    text = (out.stdout + out.stderr).strip()
    return {
        "command": "rumi audit verify --root <ws>",
        "exit_code": out.returncode,
        "ok": out.returncode == 0,
        "output": text[:2000],
        "seconds": round(time.perf_counter() - t, 1),
    }


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("RUMI_ROOT", None)
    return env


# --------------------------------------------------------------------------------------------------
# report


def ratios(paths: dict[str, Any]) -> dict[str, Any]:
    def p50(name: str) -> float | None:
        return paths.get(name, {}).get("c1", {}).get("p50_ms")

    def rps(name: str, c: int) -> float | None:
        for point in paths.get(name, {}).get("ladder", []):
            if point["c"] == c:
                return float(point["rps"])
        return None

    def div(x: float | None, y: float | None) -> float | None:
        return round(x / y, 2) if x and y else None

    out = {
        "file_read_p50_over_echo_p50": div(p50("file_read"), p50("echo")),
        "env_read_p50_over_echo_p50": div(p50("env_read"), p50("echo")),
        "denied_p50_over_echo_p50": div(p50("denied"), p50("echo")),
        "floor_p50_over_echo_p50": div(p50("floor"), p50("echo")),
        "file_read_p50_over_floor_p50": div(p50("file_read"), p50("floor")),
        "env_read_p50_over_floor_p50": div(p50("env_read"), p50("floor")),
    }
    for name in ("file_read", "env_read", "denied", "floor", "file_read_packs"):
        out[f"{name}_rps_c32_over_echo_rps_c32"] = div(rps(name, 32), rps("echo", 32))
    return out


def fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def print_report(res: dict[str, Any]) -> None:
    meta = res["meta"]
    paths = res["paths"]
    print()
    print(
        f"Rumi request pipeline benchmark  {meta['date']}  git {meta['git']['head'][:12]}"
        + (f" (+{len(meta['git']['changed_files'])} changed files)" if meta["git"]["changed_files"] else "")
    )
    print(f"command: {meta['command']}")
    print(
        f"{meta['machine']['cpus']} CPUs, {meta['nats_server']}, nats-py {meta['nats_py']}, "
        f"jetstream sync_interval: {meta['jetstream_sync']}, broker workers: {meta['workers']}"
    )
    settings = meta.get("broker_settings") or {}
    print(
        "broker settings: "
        + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())
        + " (rate_per_second and burst raised by the benchmark"
        + (f"; set: {', '.join(meta['broker_set'])}" if meta.get("broker_set") else "")
        + ")"
    )
    load = meta["machine"]
    print(
        "load average (1/5/15 min) at start "
        + "/".join(f"{x:.2f}" for x in load["loadavg_at_start"])
        + ", at end "
        + "/".join(f"{x:.2f}" for x in load["loadavg_at_end"])
    )
    print()
    print(f"Latency at c=1 ({res['params']['n']} sequential requests per path)")
    print(f"  {'path':52} {'p50 ms':>8} {'p99 ms':>8} {'x echo':>7}  errors")
    echo50 = paths.get("echo", {}).get("c1", {}).get("p50_ms")
    for name in ("echo", "js_alone", "floor", "file_read", "env_read", "denied", "file_read_packs"):
        entry = paths.get(name, {})
        if not entry:
            continue
        if "skipped" in entry:
            print(f"  {LABELS[name]:52} skipped: {entry['skipped']}")
            continue
        c1 = entry.get("c1", {})
        ratio = c1.get("p50_ms") / echo50 if echo50 and c1.get("p50_ms") else None
        print(
            f"  {LABELS[name]:52} {fmt(c1.get('p50_ms')):>8} {fmt(c1.get('p99_ms')):>8} "
            f"{fmt(ratio, '.2f'):>7}  {c1.get('errors') or ''}"
        )
    ladder = res["params"]["ladder"]
    head = "".join(f"{'c=' + str(c):>8}" for c in ladder)
    print()
    print(f"Throughput, req/s (closed loop, {res['params']['seconds']:g} s per point)")
    print(f"  {'path':12}{head}")
    for name in PATHS:
        pts = {p["c"]: p for p in paths.get(name, {}).get("ladder", [])}
        if pts:
            print(f"  {name:12}" + "".join(f"{fmt(pts.get(c, {}).get('rps'), '.0f'):>8}" for c in ladder))
    print()
    print("p50 latency at each concurrency, ms")
    print(f"  {'path':12}{head}")
    for name in PATHS:
        pts = {p["c"]: p for p in paths.get(name, {}).get("ladder", [])}
        if pts:
            print(f"  {name:12}" + "".join(f"{fmt(pts.get(c, {}).get('p50_ms'), '.2f'):>8}" for c in ladder))
    print()
    print("CPU per request, us (utime+stime from /proc/<pid>/stat over each throughput point)")
    print(f"  {'path / process':26}{head}")
    for name in PATHS:
        pts = {p["c"]: p for p in paths.get(name, {}).get("ladder", [])}
        if not pts:
            continue
        who = "broker" if name in BROKER_PATHS else "responder"
        for proc, key in ((who, "answering"), ("nats-server", "nats_server"), ("client", "client")):
            row = "".join(
                f"{fmt(pts.get(c, {}).get('cpu_us_per_req', {}).get(key), '.0f'):>8}" for c in ladder
            )
            print(f"  {name + ' / ' + proc:26}{row}")
    errors = {
        f"{name} c={p['c']}": p["errors"]
        for name in PATHS
        for p in paths.get(name, {}).get("ladder", [])
        if p["errors"]
    }
    if errors:
        print(f"  errors during the ladder: {errors}")
    print()
    print("Ratios against the echo of this run")
    for key, value in res["ratios"].items():
        print(f"  {key:40} {fmt(value, '.2f')}")
    if "sustain" in res:
        print_sustain(res["sustain"])
    print()


def print_sustain(s: dict[str, Any]) -> None:
    print()
    if "error" in s:
        print(f"Sustained mixed traffic: failed: {s['error']}")
        return
    print(
        f"Sustained mixed traffic: {s['seconds']:g} s, target {s['target_rps']:.0f} req/s ({s['target_from']}), "
        f"at most {s['max_in_flight']} in flight"
    )
    print(
        f"  achieved {s['achieved_rps']:.0f} req/s, {100 * s['achieved_rps'] / s['target_rps']:.0f}% of the target"
        f" ({'held' if s['held'] else 'not held'}: held means >= 95%);"
        f" completions per second min {s['completed_per_second']['min']}, max {s['completed_per_second']['max']};"
        f" broker CPU {fmt(s['cpu_us_per_req']['broker'], '.0f')} us/req,"
        f" nats-server {fmt(s['cpu_us_per_req']['nats_server'], '.0f')} us/req"
    )
    audit = s["audit"]
    print(
        f"  {'kind':11} {'sent':>6} {'ok':>6} {'p50 ms':>7} {'p99 ms':>7} {'events':>7} {'x count':>7}"
        f" {'0 ev':>6} {'>2 ev':>6}"
    )
    for kind, k in s["kinds"].items():
        c = audit["kinds"][kind]
        print(
            f"  {kind:11} {k['sent']:>6} {k['ok']:>6} {fmt(k.get('p50_ms'), '.2f'):>7} {fmt(k.get('p99_ms'), '.2f'):>7}"
            f" {c['events']:>7} {c['events_count_weighted']:>7} {c['requests_0_events']:>6}"
            f" {c['requests_over_2_events']:>6}"
        )
    print("  per kind: events by phase decision/code | requests by number of events | reply errors")
    for kind, k in s["kinds"].items():
        c = audit["kinds"][kind]
        print(
            f"  {kind:11} {c['events_by_phase_decision_code']} | {c['requests_by_event_count']}"
            f" | {k['errors'] or 'none'}"
        )
    print(
        "  ('x count': events weighted by their `count` field, so an aggregated event stands for the"
        " requests it folds; '0 ev' / '>2 ev': requests whose own id has no event / more than 2)"
    )
    if not audit["ids_captured"]:
        print("  (request ids could not be captured from the SDK: per-request counts are not available)")
    print(
        f"  events read from the stream window: {audit['events_read']};"
        f" not matching a sustain request: {audit['unattributed_total']} {audit['unattributed'] or ''}"
        f" (weighted by count: {audit.get('unattributed_count_weighted') or '-'})"
    )
    v = s["verify"]
    first = v["output"].splitlines()[0] if v["output"] else ""
    print(
        f"  rumi audit verify: {'chain verifies' if v['ok'] else 'FAILED'} (exit {v['exit_code']}): {first}"
    )


def write_outputs(res: dict[str, Any], out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    png_path = out_dir / f"{stem}.png"
    json_path.write_text(json.dumps(res, indent=2, sort_keys=False) + "\n")
    print(f"JSON: {json_path}")
    spec = importlib.util.spec_from_file_location("rumi_bench_plot", Path(__file__).with_name("plot.py"))
    assert spec is not None and spec.loader is not None
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    message = plot.plot_results(res, png_path)
    print(message)


# --------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="sequential requests per c=1 latency point (2000)")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per throughput point (5)")
    ap.add_argument("--ladder", default="1,2,4,8,16,32,64", help="concurrency levels (1,2,4,8,16,32,64)")
    ap.add_argument("--max-per-point", type=int, default=200_000, help="request cap per throughput point")
    ap.add_argument(
        "--sustain", type=float, default=10.0, help="seconds of mixed traffic + audit check; 0 skips (10)"
    )
    ap.add_argument("--sustain-rate", type=float, default=0.0, help="target req/s (default: broker peak)")
    ap.add_argument(
        "--sustain-concurrency", type=int, default=0, help="max in flight (default: c of the peak)"
    )
    ap.add_argument("--workers", type=int, default=0, help="pass --workers N to `rumi broker` if it has it")
    ap.add_argument(
        "--packs",
        type=int,
        default=1,
        help="also measure file_read spread round-robin over N Packs (default 1: not measured)",
    )
    ap.add_argument("--sync", default="always", help="JetStream sync_interval (default: always, as shipped)")
    ap.add_argument(
        "--broker-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set docker/config.json broker.KEY (JSON value), e.g. max_in_flight_per_pack=64; repeatable",
    )
    ap.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, s (10)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--stem", default="", help="output file name without extension (pipeline-<date>)")
    ap.add_argument("--keep-workspace", action="store_true", help="do not delete the temporary workspace")
    a = ap.parse_args()
    a.ladder = sorted({int(c) for c in a.ladder.split(",") if c.strip()})
    if not a.ladder or min(a.ladder) < 1 or max(a.ladder) > 200:
        ap.error("--ladder: concurrency levels between 1 and 200")
    if a.n < 1 or a.seconds <= 0 or a.sustain < 0:
        ap.error("--n, --seconds must be positive, --sustain not negative")
    return a


def prepare_workspace(root: Path, a: argparse.Namespace, port: int) -> Workspace:
    ws = Workspace.at(root)
    init_workspace(ws)
    cfg = json.loads(ws.config_file.read_text())
    cfg["nats_url"] = f"nats://127.0.0.1:{port}"
    cfg["nats_host"] = "127.0.0.1"
    cfg["nats_port"] = port
    cfg["jetstream_sync"] = a.sync
    # No rate limit in the way: the ladder measures the pipeline, not the token bucket.
    cfg.setdefault("broker", {}).update(rate_per_second=1_000_000.0, burst=1_000_000)
    for setting in a.broker_set:
        key, _, value = setting.partition("=")
        try:
            cfg["broker"][key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            cfg["broker"][key.strip()] = value
    ws.config_file.write_text(json.dumps(cfg, indent=2) + "\n")
    (ws.pack_work_area(PACK_ID) / "bench-1k.bin").write_bytes(os.urandom(FILE_BYTES))
    for role in ("cli", "admin", "audit", "broker"):
        ensure_identity(ws, role)
    pack_identity(ws, PACK_ID)
    grant = ws.grant_file(COMPONENT).read_text()
    for i in range(1, a.packs):
        pid = f"bench{i}"
        src = ws.ecosystem / PACK_ID
        dst = ws.ecosystem / pid
        shutil.copytree(src, dst)
        manifest = json.loads((dst / "pack.json").read_text())
        manifest["id"] = pid
        manifest.pop("permissions", None)
        (dst / "pack.json").write_text(json.dumps(manifest, indent=2) + "\n")
        area = ws.pack_work_area(pid)
        area.mkdir(parents=True, exist_ok=True)
        (area / "bench-1k.bin").write_bytes(os.urandom(FILE_BYTES))
        text = grant.replace(COMPONENT, f"{pid}:tool:my_tool").replace(
            str(ws.pack_work_area(PACK_ID)), str(area)
        )
        ws.grant_file(f"{pid}:tool:my_tool").write_text(text)
        pack_identity(ws, pid)
    return ws


def main() -> int:
    a = parse_args()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even if started with SIGINT ignored
    if shutil.which("nats-server") is None:
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env_vars = child_env()
    tmp = Path(tempfile.mkdtemp(prefix="rumi-bench-pipeline-"))
    server: EmbeddedServer | None = None
    children: list[Child] = []
    broker_probe = CpuProbe(None)
    started = datetime.now(UTC)
    load_at_start = list(os.getloadavg())
    try:
        port = free_port()
        ws = prepare_workspace(tmp / "ws", a, port)
        a.url = f"nats://127.0.0.1:{port}"
        cfg = ws.load_config()
        server = EmbeddedServer(ws, cfg, port=port)
        server.start()
        assert server.pid is not None
        log(
            f"nats-server pid {server.pid} on {a.url} (sync_interval {cfg.jetstream_sync}); workspace {ws.root}"
        )

        broker_argv = [sys.executable, "-m", "broker.cli", "broker", "--root", str(ws.root)]
        workers = "not requested"
        if a.workers:
            if broker_supports_workers(env_vars):
                broker_argv += ["--workers", str(a.workers)]
                workers = str(a.workers)
            else:
                workers = "not supported"
                print(
                    f"--workers {a.workers}: `rumi broker --help` has no --workers option in this tree; skipped"
                )
        broker = spawn("broker", broker_argv, tmp / "broker.log", env_vars, ws.root)
        children.append(broker)
        broker_probe = CpuProbe(broker.proc.pid, tree=True, exclude_comm=("nats-server",))
        log(f"broker pid {broker.proc.pid}: {' '.join(broker_argv[1:])}")

        floor_config = anyio.run(create_floor_stream_when_ready, ws, broker)
        responder = spawn(
            "responder",
            [
                sys.executable,
                "-c",
                RESPONDER,
                a.url,
                str(pack_identity(ws, PACK_ID).seed_path),
                str(ensure_identity(ws, "cli").seed_path),
                ECHO_SUBJECT,
                FLOOR_SUBJECT,
                "rumi.pack.benchfloor.call.floor",
                str(RECORD_BYTES),
            ],
            tmp / "responder.log",
            env_vars,
            tmp,
        )
        children.append(responder)
        deadline = time.monotonic() + 20
        while "ready" not in responder.tail():
            if not responder.alive() or time.monotonic() > deadline:
                raise SystemExit(f"the echo responder did not start:\n{responder.tail()}")
            time.sleep(0.05)
        log(f"responder pid {responder.proc.pid}")

        ids_ok = capture_request_ids()
        env = Env(ws, broker, responder, server.pid, a, broker_probe)
        res = anyio.run(measure, env)
        res["paths"] = {
            name: res["paths"][name] for name in (*PATHS[:1], "js_alone", *PATHS[1:]) if name in res["paths"]
        }
        res["ratios"] = ratios(res["paths"])
        res["meta"] = {
            "date": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": " ".join(["python", "bench/pipeline.py", *sys.argv[1:]]),
            "git": git_state(),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "clk_tck": CLK_TCK,
                "loadavg_at_start": load_at_start,
                "loadavg_at_end": list(os.getloadavg()),
            },
            "nats_server": tool_version(["nats-server", "--version"]),
            "nats_py": _version("nats-py"),
            "jetstream_sync": cfg.jetstream_sync,
            "broker_settings": broker_settings(cfg),
            "broker_set": a.broker_set,
            "workers": workers,
            "broker_command": "python -m broker.cli broker --root <tmp ws>"
            + (f" --workers {a.workers}" if workers == str(a.workers) else ""),
            "broker_pids_seen": sorted(broker_probe.seen),
            "floor_stream": {
                k: floor_config.get(k) for k in ("storage", "retention", "discard", "duplicate_window")
            },
            "record_bytes": RECORD_BYTES,
            "request_ids_captured": ids_ok,
        }
        res["params"] = {
            "n": a.n,
            "seconds": a.seconds,
            "ladder": a.ladder,
            "max_per_point": a.max_per_point,
            "sustain": a.sustain,
            "timeout": a.timeout,
        }
        res = {k: res[k] for k in ("meta", "params", "paths", "ratios", "sustain") if k in res}
        print_report(res)
        stem = a.stem or f"pipeline-{started.strftime('%Y-%m-%d-%H%M%S')}"
        write_outputs(res, a.out_dir, stem)
        return 0
    except KeyboardInterrupt:
        log("interrupted: stopping the child processes")
        return 130
    finally:
        for child in reversed(children):  # responder first, then the broker (it drains)
            with contextlib.suppress(Exception):
                child.stop(30 if child.name == "broker" else 5)
        # Anything the broker started (e.g. workers) and left behind: only pids we saw, same start time.
        for pid, st in broker_probe.seen.items():
            if broker_probe.root is not None and pid != broker_probe.root and st and start_time(pid) == st:
                log(f"  stopping leftover broker process {pid}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop()
        if a.keep_workspace:
            log(f"workspace kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


async def create_floor_stream_when_ready(ws: Workspace, broker: Child) -> dict[str, Any]:
    """Wait until the broker created RUMI_AUDIT (it does so on start), then copy its settings."""
    audit = await connect(ws, "audit")
    try:
        deadline = time.monotonic() + 60
        while True:
            info = await js_api(audit, "$JS.API.STREAM.INFO.RUMI_AUDIT")
            if "config" in info:
                break
            if not broker.alive():
                raise SystemExit(f"the broker exited with code {broker.proc.returncode}:\n{broker.tail()}")
            if time.monotonic() > deadline:
                raise SystemExit(f"RUMI_AUDIT was not created within 60 s:\n{broker.tail()}")
            await anyio.sleep(0.1)
    finally:
        await audit.close()
    return await create_floor_stream(ws)


def broker_settings(cfg: Any) -> dict[str, Any]:
    """The broker settings the run used, defaults included (whatever fields this tree has)."""
    import msgspec

    try:
        return dict(msgspec.to_builtins(cfg.broker))
    except (AttributeError, TypeError):
        return {}


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
