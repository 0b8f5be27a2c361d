"""Streamed tool calls: an async-generator tool, `ctx.progress`, and `rumi call --stream`.

The first test does what an author does: a Pack's `main.py` with a generator tool, run by `rumi dev`
against a real nats-server, called with the real `rumi call` as a process, its output read line by line
as it comes. The others run the Pack SDK in the test's own event loop (so the test can see what the
tool did) and call it as the `cli` identity through the same nats-server.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import subprocess
import threading
import time
import typing
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from broker.admin.calls import call_tool, stream_tool
from broker.core.errors import RumiError
from broker.core.workspace import Workspace
from pack_runtime import Context, Pack
from pack_runtime._pack import StreamLimits, pull_subject
from tests._cli import RUMI
from tests.conftest import connected_pack

REPO = Path(__file__).resolve().parents[1]

STREAMER = '''
import anyio
from pack_runtime import Context, Pack, ToolError

pack = Pack()


@pack.tool("count")
async def count(ctx: Context, args: dict):
    """Count to n, one number every `gap` seconds, saying how far it got."""
    n, gap = int(args.get("n", 3)), float(args.get("gap", 0.7))
    for i in range(n):
        await ctx.progress(f"counting {i + 1} of {n}")
        await anyio.sleep(gap)
        yield {"i": i}
    if args.get("fail"):
        raise ToolError("boom", "counted too far")


@pack.tool("plain")
async def plain(ctx: Context, args: dict):
    """An ordinary tool."""
    await ctx.progress({"step": 1})
    return {"ok": True}


if __name__ == "__main__":
    pack.run()
'''


@pytest.fixture
def streamer_ws(ws: Workspace) -> Workspace:
    """The workspace with a Pack `streamer` (made before the nats-server starts, so it knows the Pack)."""
    src = ws.ecosystem / "streamer"
    src.mkdir()
    (src / "pack.json").write_text('{"id": "streamer", "version": "0.1.0"}')
    (src / "main.py").write_text(STREAMER)
    return ws


class Lines:
    """A process's stdout and stderr, line by line, each with the time it arrived."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.out: list[tuple[float, str]] = []
        self.err: list[tuple[float, str]] = []
        assert proc.stdout is not None and proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._read, args=(proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream: Any, into: list[tuple[float, str]]) -> None:
        for line in iter(stream.readline, b""):
            into.append((time.monotonic(), line.decode().rstrip("\n")))

    def wait(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return code


def rumi_call(ws: Workspace, *args: str) -> Lines:
    return Lines(
        subprocess.Popen(
            [*RUMI, "call", *args, "--root", str(ws.root)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    )


@pytest.fixture
def dev_streamer(streamer_ws: Workspace, nats_server: object) -> Iterator[Workspace]:
    """`rumi dev streamer`: the author's Pack as a local process against the test's nats-server."""
    proc = subprocess.Popen(
        [*RUMI, "dev", "streamer", "--root", str(streamer_ws.root)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        fd, seen, deadline = proc.stdout.fileno(), b"", time.monotonic() + 60
        while b"pack streamer serving" not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, seen.decode()[-2000:]
            if select.select([fd], [], [], 0.2)[0]:
                seen += os.read(fd, 65536)
        threading.Thread(target=lambda: all(iter(lambda: os.read(fd, 65536), b"")), daemon=True).start()
        yield streamer_ws
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_rumi_call_stream_prints_each_item_and_progress_line_as_it_comes(dev_streamer: Workspace) -> None:
    ws = dev_streamer
    began = time.monotonic()
    streamed = rumi_call(ws, "streamer:tool:count", '{"n": 4, "gap": 0.7}', "--stream", "--timeout", "10")
    assert streamed.wait() == 0, streamed.err
    items = [(t - began, json.loads(line)) for t, line in streamed.out]
    progress = [(t - began, line) for t, line in streamed.err]
    assert [item for _, item in items] == [{"i": i} for i in range(4)]
    assert [line for _, line in progress] == [f"progress: counting {i} of 4" for i in range(1, 5)]
    # Each item was printed when the tool yielded it: 0.7 s apart, not all at the end.
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(items)]
    assert all(0.4 < gap < 1.5 for gap in gaps), gaps
    # The progress line for item i came before item i, and before the tool's pause was over.
    for (p_at, _), (i_at, _) in zip(progress, items, strict=True):
        assert p_at < i_at - 0.3, (progress, items)
    print(f"\nrumi call --stream: items at {[round(t, 2) for t, _ in items]} s (command start = 0)")

    # Without --stream, the generator's items come as one list; a plain tool's progress goes nowhere.
    whole = rumi_call(ws, "streamer:tool:count", '{"n": 3, "gap": 0}')
    assert whole.wait() == 0, whole.err
    assert json.loads("\n".join(line for _, line in whole.out)) == [{"i": 0}, {"i": 1}, {"i": 2}]
    plain = rumi_call(ws, "streamer:tool:plain")
    assert plain.wait() == 0 and json.loads("\n".join(line for _, line in plain.out)) == {"ok": True}
    assert plain.err == []
    # A plain tool streamed: its one result is the one item; a progress dict is one line of JSON.
    one = rumi_call(ws, "streamer:tool:plain", "--stream")
    assert one.wait() == 0, one.err
    assert [line for _, line in one.out] == ['{"ok":true}']
    assert [line for _, line in one.err] == ['progress: {"step":1}']

    # A tool that fails after yielding: its items, then its error, exit 4.
    failed = rumi_call(ws, "streamer:tool:count", '{"n": 2, "gap": 0.1, "fail": true}', "--stream")
    assert failed.wait() == 4
    assert [line for _, line in failed.out] == ['{"i":0}', '{"i":1}']
    assert failed.err[-1][1] == "error: tool:boom: counted too far"
    assert not any("Traceback" in line for _, line in failed.err)


# --- the SDK in this event loop ---------------------------------------------------------------------


@asynccontextmanager
async def serving(
    ws: Workspace, limits: StreamLimits | None = None, *, instances: int = 1
) -> AsyncIterator[tuple[list[Pack], dict[str, Any]]]:
    """`instances` copies of the `default` Pack with streaming tools, serving; `seen` records what they did."""
    seen: dict[str, Any] = {"closed": [], "served_by": []}
    async with connected_pack(ws) as first:
        packs: list[Pack] = [typing.cast(Pack, first)]
        extra = [connected_pack(ws) for _ in range(instances - 1)]
        for cm in extra:
            packs.append(typing.cast(Pack, await cm.__aenter__()))
        try:
            for index, pack in enumerate(packs):
                pack.stop_grace = 1.0
                if limits is not None:
                    pack.stream_limits = limits
                _register(pack, index, seen)
            async with anyio.create_task_group() as tg:
                for pack in packs:
                    await tg.start(pack.serve)
                yield packs, seen
                tg.cancel_scope.cancel()
        finally:
            for cm in extra:
                await cm.__aexit__(None, None, None)


def _register(pack: Pack, index: int, seen: dict[str, Any]) -> None:
    @pack.tool("forever")
    async def forever(ctx: Context, args: dict[str, Any]) -> AsyncIterator[Any]:
        """Yield `size` bytes of text every `gap` s until cancelled."""
        try:
            i = 0
            while True:
                yield "x" * int(args.get("size", 10))
                i += 1
                await anyio.sleep(float(args.get("gap", 0.1)))
        finally:
            seen["closed"].append(args.get("tag"))

    @pack.tool("few")
    async def few(ctx: Context, args: dict[str, Any]) -> AsyncIterator[Any]:
        """Three items, tagged with the instance that ran them."""
        seen["served_by"].append(index)
        for i in range(3):
            await anyio.sleep(0.05)
            yield [args.get("tag"), i]


async def wait_until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_ctrl_c_on_rumi_call_stream_cancels_the_tool(ws: Workspace, nats_server: object) -> None:
    async with serving(ws) as (_, seen):
        proc = await anyio.open_process(
            [
                *RUMI,
                "call",
                "default:tool:forever",
                '{"tag": "interrupted"}',
                "--stream",
                "--root",
                str(ws.root),
            ],
            cwd=REPO,
        )
        assert proc.stdout is not None
        with anyio.fail_after(30):
            first = await proc.stdout.receive()
        assert first.startswith(b'"xxxxxxxxxx"')
        proc.send_signal(signal.SIGINT)
        with anyio.fail_after(15):
            code = await proc.wait()
        await wait_until(lambda: "interrupted" in seen["closed"])
    assert code == 130


@pytest.mark.anyio
async def test_streams_are_bounded_in_bytes_time_idleness_and_number(
    ws: Workspace, nats_server: object
) -> None:
    from broker.bus.server import connect
    from broker.core.protocol import ENCODER, PROTOCOL_VERSION, REPLY_DECODER, CallRequest, call_subject

    limits = StreamLimits(max_bytes=2000, max_seconds=1.5, idle_seconds=1.0, max_streams=2)
    async with serving(ws, limits) as (_, seen):
        got: list[Any] = []

        def on(kind: str, data: Any) -> None:
            got.append(data)

        # Bytes, on the Pack's side: 500-byte items, 2000 bytes allowed.
        with pytest.raises(RumiError) as big:
            await stream_tool(ws, "default", "tool", "forever", {"size": 500, "gap": 0, "tag": "big"}, 10, on)
        assert "too_large" in str(big.value) and len(got) == 3
        # Bytes, on the caller's side: it stops reading an untrusted Pack, and cancels the call.
        with pytest.raises(RumiError) as mine:
            await stream_tool(
                ws,
                "default",
                "tool",
                "forever",
                {"size": 100, "gap": 0.05, "tag": "capped"},
                10,
                on,
                max_bytes=600,
            )
        assert "passed 600 bytes" in str(mine.value)
        # Time: the tool outlives max_seconds.
        with pytest.raises(RumiError) as slow:
            await stream_tool(ws, "default", "tool", "forever", {"gap": 0.2, "tag": "slow"}, 10, on)
        assert str(slow.value).startswith("timeout: the streamed call ran longer than 1.5 s")
        await wait_until(lambda: {"big", "capped", "slow"} <= set(seen["closed"]))

        # Idleness and number: two opened and never pulled; a third is refused; both end after 1 s.
        nc = await connect(ws, "cli")
        try:

            async def open_stream(tag: str) -> Any:
                body = {"type": "tool", "name": "forever", "args": {"tag": tag, "gap": 0.05}}
                payload = ENCODER.encode(CallRequest(v=PROTOCOL_VERSION, id=f"open-{tag}", args=body))
                msg = await nc.request(call_subject("default", "_rumi", "stream"), payload, timeout=5)
                return REPLY_DECODER.decode(msg.data)

            opened = [await open_stream("idle-1"), await open_stream("idle-2")]
            assert all(r.success for r in opened)
            third = await open_stream("idle-3")
            assert not third.success and third.error is not None and third.error.code == "rate_limited"
            await wait_until(lambda: {"idle-1", "idle-2"} <= set(seen["closed"]), timeout=6)
            pull = CallRequest(
                v=PROTOCOL_VERSION, id="late", args={"stream": opened[0].data["stream"], "wait": 0}
            )
            late = REPLY_DECODER.decode(
                (
                    await nc.request(
                        pull_subject("default", opened[0].data["pull"]), ENCODER.encode(pull), timeout=5
                    )
                ).data
            )
            assert (
                not late.success and late.error is not None and "no such streamed call" in late.error.message
            )
        finally:
            await nc.close()
        # With the slots free again, a stream runs to its end.
        assert await call_tool(ws, "default", "tool", "few", {"tag": "after"}, 10) == [
            ["after", i] for i in range(3)
        ]


@pytest.mark.anyio
async def test_pulls_reach_the_instance_running_the_call(ws: Workspace, nats_server: object) -> None:
    """Two instances share the calls (queue group, as during an upgrade); each stream's pulls find its own."""
    async with serving(ws, instances=2) as (_, seen):
        results: dict[str, list[Any]] = {}

        async def one(tag: str) -> None:
            items: list[Any] = []
            await stream_tool(ws, "default", "tool", "few", {"tag": tag}, 10, lambda _k, d: items.append(d))
            results[tag] = items

        async with anyio.create_task_group() as tg:
            for n in range(8):
                tg.start_soon(one, f"call-{n}")
    assert results == {f"call-{n}": [[f"call-{n}", i] for i in range(3)] for n in range(8)}
    assert set(seen["served_by"]) == {0, 1}  # both instances ran some


def test_a_tool_must_be_async() -> None:
    pack = Pack("p")
    with pytest.raises(TypeError, match="async function"):
        pack.tool("sync")(lambda ctx, args: None)  # type: ignore[type-var]

    @pack.tool("gen")
    async def gen(ctx: Context, args: dict[str, Any]) -> AsyncIterator[int]:
        yield 1

    assert pack.tools == ["p:tool:gen"]


@pytest.mark.anyio
async def test_progress_checks_what_it_is_given() -> None:
    ctx = Context(None, "p", "p:tool:t", 1.0)  # type: ignore[arg-type]  # no caller watching: no I/O
    await ctx.progress("fine")
    await ctx.progress({"done": 1, "of": 2})
    with pytest.raises(TypeError):
        await ctx.progress(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await ctx.progress({"blob": "x" * 20000})
