"""The broker's lean NATS connection (broker/bus/wire.py): against a real nats-server, and its parser
fed every possible split of a byte stream."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nkeys
import pytest

from broker.bus.creds import ensure_identity, pack_identity
from broker.bus.server import EmbeddedServer, nats_url, wire_connect
from broker.bus.wire import WireConnection, WireError, WireMsg, parse_headers
from broker.core.errors import NatsSetupError
from broker.core.net import free_port
from broker.core.workspace import Workspace

pytestmark = pytest.mark.anyio

SUBJECT = "rumi.pack.default.req.env_read"


@asynccontextmanager
async def pack_connection(ws: Workspace) -> AsyncIterator[Any]:
    """A nats-py connection with Pack `default`'s own credentials (its requests come through its import)."""
    import nats

    nc = await nats.connect(nats_url(ws), nkeys_seed=str(pack_identity(ws, "default").seed_path))
    try:
        yield nc
    finally:
        await nc.close()


async def _served(conn: WireConnection, seen: list[WireMsg], answer: bytes = b"pong") -> Any:
    def on_msg(msg: WireMsg) -> None:
        seen.append(msg)
        conn.publish_nowait(msg.reply, answer + b":" + msg.data)

    return await conn.subscribe("rumi.pack.default.req.*", queue="rumi-broker", cb=on_msg)


async def test_request_reply_with_the_server_stamped_account(ws: Workspace, nats_server: object) -> None:
    conn = await wire_connect(ws, "broker", name="test-wire")
    try:
        seen: list[WireMsg] = []
        await _served(conn, seen)
        async with pack_connection(ws) as nc:
            reply = await nc.request(SUBJECT, b"hello", timeout=5)
        assert reply.data == b"pong:hello"
        (msg,) = seen
        assert msg.subject == SUBJECT and msg.data == b"hello"
        # The Pack's request came through its account's import: the server stamped the account.
        assert msg.headers is not None and '"acc":"PACK_default"' in msg.headers["Nats-Request-Info"].replace(
            " ", ""
        )
    finally:
        await conn.close()


async def test_queued_messages_large_payloads_and_the_pending_limit(
    ws: Workspace, nats_server: object, caplog: pytest.LogCaptureFixture
) -> None:
    conn = await wire_connect(ws, "broker", name="test-wire")
    try:
        sub = await conn.subscribe("rumi.pack.default.req.*", queue="rumi-broker", pending_msgs_limit=3)
        big = secrets.token_bytes(900_000)  # arrives in many reads: joined once, intact
        async with pack_connection(ws) as nc:
            await nc.publish(SUBJECT, big)
            for i in range(5):
                await nc.publish(SUBJECT, str(i).encode())
            await nc.flush()
        async with asyncio.timeout(5):  # all six delivered: three queued, the rest dropped
            while sub.pending + sub.dropped < 6:
                await asyncio.sleep(0.01)
        assert sub.pending == 3 and sub.dropped == 3
        dropped_lines = [r.getMessage() for r in caplog.records if "dropped so far" in r.getMessage()]
        assert len(dropped_lines) == 1 and "more than 3 messages" in dropped_lines[0]  # said once, not per drop  # past the limit of 3: dropped, counted, never buffered
        got: list[bytes] = []
        async with asyncio.timeout(5):
            async for msg in sub.messages:
                got.append(msg.data)
                if len(got) == 3:
                    break
        assert got[0] == big and got[1:] == [b"0", b"1"]
    finally:
        await conn.close()


async def test_wrong_credentials_fail_in_one_line(ws: Workspace, nats_server: object, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger.nk"
    stranger.write_bytes(nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER))
    with pytest.raises(WireError, match="rejected the credentials"):
        await WireConnection.open(nats_url(ws), stranger, name="stranger", connect_timeout=5)


async def test_an_unusable_seed_file_fails_in_one_line(
    ws: Workspace, nats_server: object, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.nk"
    garbage.write_bytes(b"SUAnot-a-seed")
    with pytest.raises(WireError, match=r"cannot use the seed file .*garbage\.nk") as info:
        await WireConnection.open(nats_url(ws), garbage, name="garbage", connect_timeout=5)
    assert "not-a-seed" not in str(info.value)  # never the seed's content


async def test_unreachable_server_is_a_setup_error(ws: Workspace) -> None:
    # No nats_server fixture: nothing listens on the configured URL.
    config = ws.docker / "config.json"
    config.write_text(
        json.dumps({**json.loads(config.read_text()), "nats_url": f"nats://127.0.0.1:{free_port()}"})
    )
    with pytest.raises(
        NatsSetupError, match=r"cannot connect to NATS at nats://127\.0\.0\.1:\d+ as broker: cannot reach"
    ):
        await wire_connect(ws, "broker", name="test-wire")


async def test_header_values_cannot_inject_lines_and_size_is_capped(
    ws: Workspace, nats_server: object
) -> None:
    conn = await wire_connect(ws, "broker", name="test-wire")
    try:
        with pytest.raises(WireError, match="over the server's limit"):
            conn.publish_nowait("rumi.audit.x.y", b"x" * (conn.max_payload + 1))
        with pytest.raises(WireError, match="invalid subject"):
            conn.publish_nowait("two words", b"x")
        with pytest.raises(WireError, match="invalid header name"):
            conn.publish_nowait("rumi.audit.x.y", b"x", headers={"A: B": "c"})

        def answer(msg: WireMsg) -> None:
            conn.publish_nowait(
                msg.reply, b"body", headers={"Nats-Msg-Id": "a\r\nNats-Expected-Stream: OTHER"}
            )

        await conn.subscribe("rumi.pack.default.req.*", queue="rumi-broker", cb=answer)
        async with pack_connection(ws) as nc:
            reply = await nc.request(SUBJECT, b"", timeout=5)
        assert reply.headers == {"Nats-Msg-Id": "aNats-Expected-Stream: OTHER"}  # one header: CR/LF dropped
        assert reply.data == b"body"
    finally:
        await conn.close()


async def test_reconnects_and_subscribes_again(ws: Workspace, nats_server: EmbeddedServer) -> None:
    conn = await wire_connect(ws, "broker", name="test-wire")
    try:
        seen: list[WireMsg] = []
        await _served(conn, seen)
        nats_server.stop()
        async with asyncio.timeout(5):
            while conn.is_connected:
                await asyncio.sleep(0.02)
        with pytest.raises(WireError, match="not connected"):
            conn.publish_nowait("rumi.audit.x.y", b"lost")  # never buffered for later
        nats_server.start()
        async with asyncio.timeout(15):
            while not conn.is_connected:
                await asyncio.sleep(0.05)
        assert conn.reconnects == 1
        async with pack_connection(ws) as nc:
            reply = await nc.request(SUBJECT, b"again", timeout=5)
        assert reply.data == b"pong:again"
    finally:
        await conn.close()


async def test_parser_handles_every_split_of_the_stream() -> None:
    block = b"NATS/1.0\r\nNats-Request-Info: {}\r\n\r\n"
    status = b"NATS/1.0 503\r\n\r\n"
    stream = (
        b"INFO {}\r\n+OK\r\nMSG a.b 1 12\r\nhello\r\nworld\r\nPING\r\n"
        b"HMSG c.d 2 _INBOX.x %d %d\r\n%sbody\r\n"
        b"HMSG e 1 %d %d\r\n%s\r\nMSG a.b 1 0\r\n\r\n"
    ) % (len(block), len(block) + 4, block, len(status), len(status), status)
    expected = [
        ("a.b", "", b"hello\r\nworld", None),
        ("c.d", "_INBOX.x", b"body", {"Nats-Request-Info": "{}"}),
        ("e", "", b"", {"Status": "503"}),
        ("a.b", "", b"", None),
    ]
    for split in [*range(1, len(stream)), 3, 7]:
        got: list[tuple[str, str, bytes, Any]] = []
        conn = WireConnection("nats://127.0.0.1:1", None, name="parser")
        conn._handshake = asyncio.get_running_loop().create_future()
        conn._hello_sent = True  # the INFO in the stream is a later one

        def on(msg: WireMsg, got: list[tuple[str, str, bytes, Any]] = got) -> None:
            got.append((msg.subject, msg.reply, bytes(msg.data), msg.headers))

        for sid in (1, 2):
            conn._subs[sid] = conn_sub = _sub(conn, sid, on)
            assert conn_sub.sid == sid
        chunks = [stream[i : i + split] for i in range(0, len(stream), split)]
        for chunk in chunks:
            conn.data_received(chunk)
        assert got == expected, split
        assert conn._out == [b"PONG\r\n"]  # the server's PING answered once
        conn._out.clear()
        if conn._flush_handle is not None:
            conn._flush_handle.cancel()


def _sub(conn: WireConnection, sid: int, cb: Any) -> Any:
    from broker.bus.wire import WireSubscription

    return WireSubscription(conn, sid, "x", "", cb, 10, 1 << 20)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"NATS/1.0\r\nA: 1\r\nA: 2\r\n\r\n", {"A": "2"}),
        (b"NATS/1.0 404 No Messages\r\n\r\n", {"Status": "404", "Description": "No Messages"}),
        (b"NATS/1.0\r\nbad name: x\r\n\xff: y\r\nok:  v \r\n\r\n", {"ok": "v"}),
        (b"HTTP/1.1\r\nA: 1\r\n\r\n", {}),
    ],
)
def test_parse_headers_as_nats_py_does(raw: bytes, expected: dict[str, str]) -> None:
    assert parse_headers(raw) == expected


async def test_protocol_garbage_drops_the_connection(ws: Workspace, nats_server: object) -> None:
    conn = await wire_connect(ws, "broker", name="test-wire")
    try:
        conn.data_received(b"WHAT is this\r\n")
        assert "protocol error" in conn.last_error
        async with asyncio.timeout(5):
            while conn.is_connected:
                await asyncio.sleep(0.02)
        async with asyncio.timeout(15):  # and it comes back by itself
            while not conn.is_connected:
                await asyncio.sleep(0.05)
    finally:
        await conn.close()


def test_identity_files_are_used(ws: Workspace) -> None:
    # The lean connection signs with the same seed files nats-py uses.
    assert ensure_identity(ws, "broker").seed_path.exists()
    assert pack_identity(ws, "default").seed_path.exists()


async def test_a_server_that_stops_answering_pings_is_left(
    ws: Workspace, nats_server: EmbeddedServer
) -> None:
    conn = await WireConnection.open(
        nats_url(ws), ensure_identity(ws, "broker").seed_path, name="test-wire", ping_interval=0.25
    )
    try:
        async with asyncio.timeout(2):  # PINGs answered: still connected after many intervals
            await asyncio.sleep(1.0)
        assert conn.is_connected and conn.reconnects == 0
        os.kill(nats_server.pid, signal.SIGSTOP)  # the server hangs: its socket stays open
        try:
            async with asyncio.timeout(5):
                while conn.is_connected:
                    await asyncio.sleep(0.02)
            assert "stopped answering PINGs" in conn.last_error
        finally:
            os.kill(nats_server.pid, signal.SIGCONT)
        async with asyncio.timeout(15):
            while not conn.is_connected:
                await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def test_flush_now_writes_at_once(ws: Workspace, nats_server: object) -> None:
    # The audit writer's batch leaves when it is published, not after the rest of the loop's turn.
    conn = await wire_connect(ws, "broker", name="test-wire")
    try:
        conn.publish_nowait("rumi.audit.default.env_read", b"{}")
        assert conn._out and conn._flush_handle is not None  # queued for the end of this turn
        conn.flush_now()
        assert not conn._out and conn._flush_handle is None
        await conn.flush()  # and the server took it: a PING after it is answered
    finally:
        await conn.close()
