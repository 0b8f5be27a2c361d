"""No silent waits: a failure reaches the caller at once, with its reason, and nothing runs on unseen.

With a real nats-server and the Pack SDK serving in a thread, through `rumi call` as a user runs it:

* a result over the message limit is `too_large` at once, with its size and the limit;
* a call the caller abandons (its --timeout, Ctrl-C) is cancelled in the Pack;
* two instances of one Pack (an upgrade's swap) share its calls, each call runs once, and one stopping
  finishes its calls (or answers `unavailable` after its grace) while the other takes the next ones;
* `ctx.terminal(timeout=...)` over the broker's limit is refused naming the limit, not cut to ~27 s.

With Docker (one small Pack, 48 MiB memory limit): a Pack OOM-killed or crashing mid-call fails the
call within seconds with `unavailable` and the reason; `rumi ps` and `rumi logs` say it too.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from broker.admin.calls import call_tool
from broker.core.errors import Unavailable
from broker.core.workspace import Workspace
from pack_runtime import BrokerError, Pack
from tests._cli import RUMI

from ._deploy import small_packs
from .conftest import connected_pack, running_broker, say
from .test_readiness import PackInThread

REPO = Path(__file__).resolve().parents[1]
BIG = 10 * 1024 * 1024


def rumi(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RUMI, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


class Tools:
    """A Pack "default" whose tools report to the test (across threads) what ran and what was cancelled."""

    def __init__(self, ws: Workspace, name: str = "a", stop_grace: float = 8.0) -> None:
        from broker.bus.creds import pack_identity
        from broker.bus.server import nats_url

        self.name = name
        self.started = threading.Event()
        self.cancelled: list[float] = []
        self.served: list[str] = []
        self.pack = Pack("default", nats_url=nats_url(ws), creds=str(pack_identity(ws, "default").seed_path),
                         stop_grace=stop_grace)  # fmt: skip

        @self.pack.tool("big")
        async def big(ctx: Any, args: dict[str, Any]) -> bytes:
            return b"x" * BIG

        @self.pack.tool("wait")
        async def wait(ctx: Any, args: dict[str, Any]) -> str:
            self.served.append(self.name)
            self.started.set()
            try:
                await anyio.sleep(float(args.get("seconds", 60)))
            except anyio.get_cancelled_exc_class():
                self.cancelled.append(time.monotonic())
                raise
            return self.name

    def serve(self) -> PackInThread:
        return PackInThread(self.pack)


# ------------------------------------------------------------------------------ with a real NATS


def test_an_oversized_result_is_too_large_at_once(ws: Workspace, nats_server: object) -> None:
    with Tools(ws).serve():
        started = time.monotonic()
        done = rumi("call", "default:tool:big", "--root", str(ws.root), "--timeout", "60")
        took = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    line = one_line_error(done)
    found = re.search(r"too_large: the tool's result is (\d+) bytes, over the (\d+)-byte message limit", line)
    assert found is not None, line
    assert int(found[1]) > BIG and int(found[2]) < int(found[1])
    assert took < 15, took  # the CLI's start and the 10 MB result, not the 60 s timeout


def test_a_call_the_caller_abandons_is_cancelled_in_the_pack(
    ws: Workspace, nats_server: object, pytestconfig: pytest.Config
) -> None:
    tools = Tools(ws)
    with tools.serve():
        # Its --timeout passes: the call is cancelled in the Pack, and the error says so.
        called = time.monotonic()
        done = rumi("call", "default:tool:wait", "--root", str(ws.root), "--timeout", "2")
        gave_up = called + 2  # at the latest: the CLI's own start comes first
        assert done.returncode == 4, done.stderr
        assert (
            "no answer from default:tool:wait within 2 s; the call was cancelled in the Pack"
            in one_line_error(done)
        )
        deadline = time.monotonic() + 5
        while not tools.cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tools.cancelled, "the tool kept running after the caller gave up"
        after_timeout = tools.cancelled[0] - gave_up
        assert 0 < after_timeout < 4, after_timeout

        # Ctrl-C while the tool runs: the same.
        tools.started.clear()
        proc = subprocess.Popen([*RUMI, "call", "default:tool:wait", "--root", str(ws.root)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert tools.started.wait(30), "the call did not reach the tool"
            proc.send_signal(signal.SIGINT)
            interrupted = time.monotonic()
            _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 130, err
        assert "Traceback" not in err, err
        deadline = time.monotonic() + 5
        while len(tools.cancelled) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(tools.cancelled) == 2, "the tool kept running after Ctrl-C"
        after_sigint = tools.cancelled[1] - interrupted
        assert after_sigint < 3, after_sigint
    say(pytestconfig, f"\nabandoned call cancelled in the Pack {after_timeout:.2f} s after a timeout, "
                      f"{after_sigint:.2f} s after Ctrl-C")  # fmt: skip


def test_two_instances_share_calls_and_one_stops_without_dropping_any(
    ws: Workspace, nats_server: object
) -> None:
    from broker.bus.server import ensure_status_stream

    anyio.run(ensure_status_stream, ws)
    a, b = Tools(ws, "a"), Tools(ws, "b")
    with a.serve(), b.serve() as serving_b:

        async def calls(n: int) -> list[str]:
            async with anyio.create_task_group() as tg:
                out: list[str] = []

                async def one() -> None:
                    out.append(await call_tool(ws, "default", "tool", "wait", {"seconds": 0.2}, 30))

                for _ in range(n):
                    tg.start_soon(one)
            return out

        answers = anyio.run(calls, 20)
        # Each call ran once, on one instance, and both took some (a queue group, not a fan-out).
        assert len(answers) == 20 and len(a.served) + len(b.served) == 20, (a.served, b.served)
        assert a.served and b.served, (a.served, b.served)

        # b stops while it runs a call: it takes no new call, finishes that one, says "stopping";
        # the next calls go to a, although the last status heard is b's "stopping".
        async def stop_b_during_a_call() -> tuple[str, list[str]]:
            b.started.clear()
            b_served = len(b.served)
            async with anyio.create_task_group() as tg:
                got: list[str] = []

                async def slow() -> None:
                    got.append(await call_tool(ws, "default", "tool", "wait", {"seconds": 1.5}, 30))

                while len(b.served) == b_served:  # until one of them lands on b
                    tg.start_soon(slow)
                    await anyio.sleep(0.1)
                await anyio.to_thread.run_sync(serving_b.stop)
            after = [await call_tool(ws, "default", "tool", "wait", {"seconds": 0}, 30) for _ in range(5)]
            return "b" if "b" in got else "", after

        finished_on_b, after = anyio.run(stop_b_during_a_call)
        assert finished_on_b == "b"  # b's call finished during its grace, answered
        assert after == ["a"] * 5
    assert not a.cancelled and not b.cancelled


def test_a_stopping_pack_answers_the_calls_it_cannot_finish(ws: Workspace, nats_server: object) -> None:
    tools = Tools(ws, stop_grace=0.5)
    running = tools.serve().__enter__()

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, lambda: (tools.started.wait(20), running.stop()))
            started = time.monotonic()
            with pytest.raises(
                Unavailable, match=r"unavailable: the Pack stopped before the tool finished \(it had 0.5 s\)"
            ):
                await call_tool(ws, "default", "tool", "wait", {"seconds": 60}, 60)
            assert time.monotonic() - started < 10

    anyio.run(body)
    assert len(tools.cancelled) == 1


@pytest.mark.anyio
async def test_terminal_timeout_over_the_brokers_limit_is_refused_naming_it(
    ws: Workspace, nats_server: object
) -> None:
    async with running_broker(ws), connected_pack(ws) as pack:
        ctx = pack.context("default:tool:my_tool")
        with pytest.raises(BrokerError) as refused:
            await ctx.terminal(["true"], timeout=60)
    assert refused.value.code == "invalid_request"
    assert re.search(
        r"timeout 60 s is over the limit of 27 s .*request_timeout of 30 s", refused.value.message
    ), refused.value.message


def test_terminal_timeout_rule() -> None:
    from .conftest import load_handler

    terminal = load_handler("terminal")
    scope = terminal._ScopeConfig(timeout=30.0, max_timeout=300.0)
    assert terminal._timeout(None, scope, 30.0) == 27.0  # the scope's default, kept inside the limit
    assert terminal._timeout(20.0, scope, 30.0) == 20.0
    assert terminal._timeout(27.0, scope, 30.0) == 27.0
    assert terminal._timeout(200.0, scope, 600.0) == 200.0
    with pytest.raises(
        Exception, match=r"over the limit of 300 s for a command, set by the terminal scope's max_timeout"
    ):
        terminal._timeout(301.0, scope, 600.0)
    with pytest.raises(Exception, match=r"over the limit of 27 s"):
        terminal._timeout(27.5, scope, 30.0)


# ---------------------------------------------------------------------------------------- Docker

DYING_PACK = """
import os

from pack_runtime import Pack

pack = Pack()


@pack.tool("echo")
async def echo(ctx, args):
    return args


@pack.tool("hog")
async def hog(ctx, args):
    held = []
    while True:
        held.append(b"\\1" * (4 << 20))


@pack.tool("crash")
async def crash(ctx, args):
    os._exit(3)


if __name__ == "__main__":
    pack.run()
"""


@pytest.fixture(scope="module")
def dying(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Pack "dies" (48 MiB memory limit, default 5 s heartbeats) up under a fresh prefix; removed afterwards."""
    with small_packs(
        tmp_path_factory,
        "nsw",
        {"dies": DYING_PACK},
        config={"packs": {"dies": {"memory_limit": "48m"}}},
        up={"with_broker": False, "health_timeout": 90},
    ) as rt:
        yield rt


def _wait_until_answering(rt: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if anyio.run(call_tool, rt.ws, "dies", "tool", "echo", {"ok": 1}, 10) == {"ok": 1}:
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


@pytest.mark.docker
def test_a_pack_killed_mid_call_fails_the_call_at_once(dying: Any, pytestconfig: pytest.Config) -> None:
    root = str(dying.ws.root)
    _wait_until_answering(dying)
    started = time.monotonic()
    done = rumi("call", "dies:tool:hog", "--root", root, "--timeout", "60")
    oom_took = time.monotonic() - started
    assert done.returncode == 3, done.stderr
    line = one_line_error(done)
    assert (
        "unavailable: Pack dies's container was OOM-killed at its 48 MiB memory limit while the call ran"
        in line
    )
    # The CLI's start, the allocation, the event: not the 60 s timeout, nor 15 s of missed heartbeats.
    assert oom_took < 10, oom_took

    # `rumi ps` and `rumi logs` say it (Docker restarts the Pack: on-failure).
    ps = rumi("ps", "--root", root, "--json")
    assert ps.returncode == 0, ps.stderr
    row = next(c for c in json.loads(ps.stdout)["containers"] if c["pack_id"] == "dies")
    assert "was OOM-killed at its 48 MiB memory limit" in row["incident"], row
    text = rumi("ps", "--root", root)
    assert "was OOM-killed" in text.stdout, text.stdout
    logs = rumi("logs", "dies", "--root", root)
    assert logs.returncode == 0, logs.stderr
    last = logs.stdout.strip().splitlines()[-1]
    assert re.match(r"rumi: container \S+-pack-dies was OOM-killed at its 48 MiB memory limit", last), last

    # A crash (exit 3) mid-call: the same, with the exit code.
    _wait_until_answering(dying)
    started = time.monotonic()
    done = rumi("call", "dies:tool:crash", "--root", root, "--timeout", "60")
    crash_took = time.monotonic() - started
    assert done.returncode == 3, done.stderr
    assert "container exited with code 3 while the call ran" in one_line_error(done)
    assert crash_took < 10, crash_took
    say(
        pytestconfig,
        f"\nPack OOM-killed mid-call: `rumi call` failed after {oom_took:.1f} s; crashed: {crash_took:.1f} s",
    )
