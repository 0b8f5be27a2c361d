"""Streamed HTTP responses: `ctx.http(..., stream=True)` and plain `http://` through the Pack's proxy.

Everything runs through a real nats-server and broker: the Pack asks with its own credentials, the
broker fetches from servers the test starts on 127.0.0.1 (granted as the IP literal `127.0.0.1`), and
the audit events are read back from the stream. The servers send their bodies slowly on purpose
(events 1 s apart), so a test can tell "as it arrives" from "all at the end".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import typing
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from broker.backends.egress import StreamLimits
from broker.core.workspace import Workspace
from pack_runtime import BrokerError, PermissionDenied
from tests.conftest import connected_pack, running_broker
from tests.test_proxy import client_env, proxy_stack
from tests.test_tunnel import network_events, wait_for_grant, write_network_grant

TOOL = "default:tool:fetcher"
PACK_COMPONENT = "default:pack:_"


class DripServer:
    """An HTTP/1.1 server on 127.0.0.1 that sends its body in pieces, with pauses in between.

    `/sse?n=5&gap=1` sends n server-sent events `gap` s apart (chunked, `text/event-stream`);
    `/close?n=3&gap=0.3` the same without chunked framing or a length (the body ends with the close);
    `/bytes?n=5000` n bytes at once (chunked); `/hang` headers, then nothing for 30 s.
    """

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[str] = []
        self.sent_at: list[float] = []  # when each piece of /sse went out (monotonic)
        self.finished = 0  # responses written to their end
        self._server: asyncio.Server | None = None
        self._stop = asyncio.Event()

    async def __aenter__(self) -> DripServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._stop.set()
        self._server.close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode()
            self.requests.append(target)
            parts = urllib.parse.urlsplit(target)
            query = dict(urllib.parse.parse_qsl(parts.query))
            n, gap = int(query.get("n", "5")), float(query.get("gap", "1"))
            if parts.path == "/sse":
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                for i in range(n):
                    if i:
                        await asyncio.sleep(gap)
                    event = f"data: event {i} secret-payload\n\n".encode()
                    writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                    await writer.drain()
                    self.sent_at.append(time.monotonic())
                writer.write(b"0\r\n\r\n")
            elif parts.path == "/close":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
                for i in range(n):
                    if i:
                        await asyncio.sleep(gap)
                    writer.write(f"part {i}\n".encode())
                    await writer.drain()
            elif parts.path == "/bytes":
                body = b"x" * n
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            elif parts.path == "/hang":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 30)
            await writer.drain()
            self.finished += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def grant(server: DripServer, **extra: Any) -> dict[str, Any]:
    return {"allowed_domains": ["127.0.0.1"], "allowed_ports": [server.port], **extra}


@asynccontextmanager
async def stack(ws: Workspace) -> AsyncIterator[tuple[Any, Any]]:
    async with running_broker(ws) as broker, connected_pack(ws) as pack:
        yield broker, pack


def sessions(events: list[dict[str, Any]], target: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(decision events, outcome events) of streamed fetches to `target`."""
    mine = [e for e in events if e["target"] == target]
    return [e for e in mine if e["phase"] == "decision"], [e for e in mine if e["phase"] == "outcome"]


# --- ctx.http(stream=True) -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_ctx_http_stream_yields_each_event_as_the_server_sends_it(
    ws: Workspace, nats_server: object
) -> None:
    async with DripServer() as server:
        write_network_grant(ws, TOOL, grant(server))
        async with stack(ws) as (broker, pack):
            ctx = pack.context(TOOL)
            began = time.monotonic()
            response = await ctx.http("GET", server.url("/sse?n=5&gap=1"), stream=True)
            head_at = time.monotonic() - began
            arrivals: list[tuple[float, bytes]] = []
            in_flight_while_waiting: list[int] = []
            async for chunk in response:
                arrivals.append((time.monotonic(), chunk))
                in_flight_while_waiting.append(broker.in_flight)
            events = await network_events(ws, 2)
    assert response.status == 200
    assert ("Content-Type", "text/event-stream") in response.headers
    body = b"".join(c for _, c in arrivals)
    assert body == b"".join(f"data: event {i} secret-payload\n\n".encode() for i in range(5))
    # Status and headers came before the first event was even due; every event came as it was sent.
    assert head_at < 1.0, head_at
    assert len(arrivals) == 5, [c for _, c in arrivals]
    for (got, _), sent in zip(arrivals, server.sent_at, strict=True):
        assert got - sent < 0.5, got - sent
    assert arrivals[-1][0] - arrivals[0][0] > 3.5  # spread over the 4 s the server took
    # Audited like a tunnel: one decision when it opened, one outcome when it closed, nothing per read.
    decisions, outcomes = sessions(events, f"127.0.0.1:{server.port}")
    assert len(decisions) == 1 and len(outcomes) == 1 and len(events) == 2, events
    assert decisions[0]["extra"] == {"session": True} and decisions[0]["component_id"] == TOOL
    assert outcomes[0]["request_id"] == decisions[0]["request_id"] and outcomes[0]["decision"] == "allow"
    extra = outcomes[0]["extra"]
    assert extra["reason"] == "eof" and extra["status"] == 200 and extra["method"] == "GET"
    assert extra["bytes_in"] == len(body) and extra["duration_ms"] > 3500 and extra["stream"]
    assert "secret-payload" not in json.dumps(events)


@pytest.mark.anyio
async def test_closing_early_ends_the_stream_and_the_connection(ws: Workspace, nats_server: object) -> None:
    async with DripServer() as server:
        write_network_grant(ws, TOOL, grant(server))
        async with stack(ws) as (_, pack):
            ctx = pack.context(TOOL)
            async with await ctx.http("GET", server.url("/sse?n=20&gap=0.2"), stream=True) as response:
                first = await response.__anext__()
            assert first.startswith(b"data: event 0")
            # The broker dropped the server's connection: the server's writes fail, it never finishes.
            await anyio.sleep(1.0)
            with pytest.raises(BrokerError) as gone:
                await ctx.request("network", {"op": "read", "stream": response._id})
            assert gone.value.code == "invalid_request" and "no such stream" in gone.value.message
            events = await network_events(ws, 3)
    assert server.finished == 0
    _, outcomes = sessions(events, f"127.0.0.1:{server.port}")
    assert [e["extra"]["reason"] for e in outcomes] == ["closed"]


def test_stream_limits_default_to_64_mib_and_10_minutes() -> None:
    limits = StreamLimits.from_grant({})
    assert (limits.max_bytes, limits.max_seconds) == (64 * 1024 * 1024, 600.0)
    assert (limits.idle_timeout, limits.max_streams) == (60.0, 16)
    assert StreamLimits.from_grant({"max_stream_bytes": 10, "max_stream_seconds": 2}).max_bytes == 10


@pytest.mark.anyio
async def test_each_stream_is_bounded_by_bytes_lifetime_idle_time_and_count(
    ws: Workspace, nats_server: object
) -> None:
    async with DripServer() as server:
        write_network_grant(
            ws,
            TOOL,
            grant(server, max_stream_bytes=4000, max_stream_seconds=2, stream_idle_timeout=1, max_streams=2),
        )
        async with stack(ws) as (_, pack):
            ctx = pack.context(TOOL)
            # Bytes: 5000 bytes from a server, 4000 allowed.
            big = await ctx.http("GET", server.url("/bytes?n=5000"), stream=True)
            with pytest.raises(BrokerError) as over:
                await big.read()
            assert over.value.code == "too_large" and "max_stream_bytes" in over.value.message
            # Count: two open at once, the third refused before any connection.
            first = await ctx.http("GET", server.url("/hang"), stream=True)
            second = await ctx.http("GET", server.url("/hang"), stream=True)
            connections = len(server.requests)
            with pytest.raises(PermissionDenied) as many:
                await ctx.http("GET", server.url("/hang"), stream=True)
            assert "max_streams" in many.value.message and len(server.requests) == connections
            # Lifetime: `first` is read all along, but its server never ends: closed at 2 s.
            # Idle: nobody reads `second`; it is closed after 1 s.
            failures: dict[str, BrokerError] = {}

            async def read_first() -> None:
                try:
                    await first.read()
                except BrokerError as exc:
                    failures["first"] = exc

            async with anyio.create_task_group() as tg:
                tg.start_soon(read_first)
                await anyio.sleep(1.8)
                with pytest.raises(BrokerError) as idle:
                    await second.read()
                assert "no such stream" in idle.value.message
            expired = failures["first"]
            assert expired.code == "timeout" and "max_stream_seconds" in expired.message
            events = await network_events(ws, 11)
    _, outcomes = sessions(events, f"127.0.0.1:{server.port}")
    closes = [e for e in outcomes if e["decision"] == "allow"]
    assert sorted(e["extra"]["reason"] for e in closes) == ["byte_cap", "idle", "max_seconds"]
    denied = [e for e in events if e["decision"] == "deny"]
    assert [e["code"] for e in denied] == ["permission_denied"]


@pytest.mark.anyio
async def test_revoking_the_grant_closes_an_open_stream(ws: Workspace, nats_server: object) -> None:
    async with DripServer() as server:
        write_network_grant(ws, TOOL, grant(server))
        async with stack(ws) as (broker, pack):
            ctx = pack.context(TOOL)
            response = await ctx.http("GET", server.url("/sse?n=30&gap=0.3"), stream=True)
            assert (await response.__anext__()).startswith(b"data: event 0")
            write_network_grant(ws, TOOL, None)
            await wait_for_grant(broker, TOOL, lambda g: g is None)
            with pytest.raises(PermissionDenied):
                async for _ in response:
                    pass
            events = await network_events(
                ws,
                3,
                timeout=8,
                until=lambda es: any(e["phase"] == "outcome" and e["decision"] == "allow" for e in es),
            )
    _, outcomes = sessions(events, f"127.0.0.1:{server.port}")
    closes = [e for e in outcomes if e["decision"] == "allow"]
    assert len(closes) == 1 and closes[0]["extra"]["reason"] in ("revoked", "idle")
    assert server.finished == 0


@pytest.mark.anyio
async def test_a_stream_belongs_to_the_component_that_opened_it(ws: Workspace, nats_server: object) -> None:
    async with DripServer() as server:
        write_network_grant(ws, TOOL, grant(server))
        for other in ("other:pack:_", "default:tool:other"):
            write_network_grant(ws, other, grant(server))
        async with running_broker(ws), connected_pack(ws) as pack_, connected_pack(ws, "other") as other_:
            pack, other_pack = typing.cast(Any, pack_), typing.cast(Any, other_)
            response = await pack.context(TOOL).http("GET", server.url("/sse?n=3&gap=0.2"), stream=True)
            for ctx in (other_pack.context(), pack.context("default:tool:other")):
                with pytest.raises(BrokerError) as stolen:
                    await ctx.request("network", {"op": "read", "stream": response._id})
                assert stolen.value.code == "invalid_request" and "no such stream" in stolen.value.message
            assert (await response.read()).count(b"data: event") == 3


@pytest.mark.anyio
async def test_read_and_close_take_their_own_keys(ws: Workspace, nats_server: object) -> None:
    async with DripServer() as server:
        write_network_grant(ws, TOOL, grant(server))
        async with stack(ws) as (_, pack):
            ctx = pack.context(TOOL)
            bad = [
                ({"op": "read"}, "needs `stream`"),
                ({"op": "read", "stream": True}, "needs `stream`"),
                ({"op": "close"}, "exactly one of `tunnel` or `stream`"),
                ({"op": "close", "stream": "a" * 20, "tunnel": "b" * 20}, "exactly one"),
                (
                    {"op": "fetch", "method": "GET", "url": server.url("/bytes"), "stream": "yes"},
                    "true or false",
                ),
                ({"op": "read", "stream": "a" * 20, "host": "x"}, "does not take `host`"),
            ]
            for args, message in bad:
                with pytest.raises(BrokerError) as refused:
                    await ctx.request("network", args)
                assert refused.value.code == "invalid_request" and message in refused.value.message, args


def dechunk(data: bytes) -> bytes:
    """The body of a chunked message; AssertionError unless it is complete (ends with the 0 chunk)."""
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert data == b"\r\n", data
            return out
        out, data = out + data[:size], data[size + 2 :]


# --- plain http:// through the Pack's proxy --------------------------------------------------------

SSE_CLIENT = r"""
import json, sys, time
url, lib = sys.argv[1], sys.argv[2]
began = time.monotonic()
got = []
if lib == "httpx":
    import httpx
    with httpx.stream("GET", url, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                got.append([round(time.monotonic() - began, 3), line])
elif lib == "requests":
    import requests
    with requests.get(url, stream=True, timeout=30) as r:
        for line in r.iter_lines(chunk_size=1):
            if line.startswith(b"data:"):
                got.append([round(time.monotonic() - began, 3), line.decode()])
else:
    import urllib.request
    with urllib.request.urlopen(url, timeout=30) as r:
        for line in r:
            if line.startswith(b"data:"):
                got.append([round(time.monotonic() - began, 3), line.decode().strip()])
print(json.dumps(got))
"""


@pytest.mark.anyio
async def test_plain_http_sse_through_the_proxy_arrives_as_it_is_sent(
    ws: Workspace, nats_server: object
) -> None:
    """5 events 1 s apart: an unmodified client gets the first in under 1.5 s, not all at 5 s."""
    async with DripServer() as server:
        write_network_grant(ws, PACK_COMPONENT, grant(server))
        async with proxy_stack(ws) as proxy_port:
            results: dict[str, list[list[Any]]] = {}
            for lib in ("httpx", "requests", "urllib"):
                proc = await anyio.run_process(
                    [sys.executable, "-c", SSE_CLIENT, server.url("/sse?n=5&gap=1"), lib],
                    env=client_env(proxy_port, None),
                    check=False,
                )
                assert proc.returncode == 0, proc.stderr.decode()[-3000:]
                results[lib] = json.loads(proc.stdout)
            events = await network_events(ws, 6)
    for lib, got in results.items():
        assert [line for _, line in got] == [f"data: event {i} secret-payload" for i in range(5)], lib
        times = [t for t, _ in got]
        print(f"\n{lib} through the proxy: events at {times} s")
        assert times[0] < 1.5, (lib, times)
        assert times[-1] - times[0] > 3.5, (lib, times)  # spread out, as the server sent them
    decisions, outcomes = sessions(events, f"127.0.0.1:{server.port}")
    assert len(decisions) == 3 and len(outcomes) == 3 and len(events) == 6, events
    assert all(e["extra"]["reason"] == "eof" for e in outcomes)


@pytest.mark.anyio
async def test_proxy_keeps_lengths_chunks_unknown_lengths_and_serves_http_1_0(
    ws: Workspace, nats_server: object
) -> None:
    async def exchange(port: int, raw: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        with anyio.fail_after(15):
            data = await reader.read()
        writer.close()
        return data

    async with DripServer() as server:
        write_network_grant(ws, PACK_COMPONENT, grant(server))
        async with proxy_stack(ws) as port:
            chunked = await exchange(
                port, f"GET {server.url('/close?n=3&gap=0.2')} HTTP/1.1\r\n\r\n".encode()
            )
            old = await exchange(port, f"GET {server.url('/close?n=3&gap=0.2')} HTTP/1.0\r\n\r\n".encode())
            head = await exchange(port, f"HEAD {server.url('/close?n=3')} HTTP/1.1\r\n\r\n".encode())
    status, _, body = chunked.partition(b"\r\n\r\n")
    assert b"\r\nTransfer-Encoding: chunked\r\n" in status and b"Content-Length" not in status
    assert dechunk(body) == b"part 0\npart 1\npart 2\n"
    status, _, body = old.partition(b"\r\n\r\n")
    assert (
        b"chunked" not in status and b"Content-Length" not in status and body == b"part 0\npart 1\npart 2\n"
    )
    assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
