"""Tunnels of the `network` capability: the ClientHello check, and open/send/recv/close through a real broker.

Parser and rule tables run in-process. Everything that connects goes through a real nats-server and
broker to TCP/TLS servers the test starts on 127.0.0.1 (granted as the IP literal `127.0.0.1`); name
resolution and refused addresses are exercised inside a loopback-only network namespace.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.backends.tunnels import (
    ClientHello,
    FirstFlight,
    MalformedClientHello,
    check_first_flight,
    parse_client_hello,
    tunnel_destination,
)
from broker.core.errors import Denied, InvalidRequest
from broker.core.workspace import Workspace
from pack_runtime import BrokerError, PermissionDenied
from tests._netns import PUBLIC_TEST_ADDRESS, Listener, ScriptedResolver, TestServer, make_pki, run_in_netns
from tests.conftest import connected_pack, running_broker

HERE = Path(__file__).resolve()
PACK_COMPONENT = "default:pack:_"


# --- ClientHello builders -------------------------------------------------------------------------

def real_client_hello(server_hostname: str | None) -> bytes:
    """The first flight Python's own TLS client sends (one or more records)."""
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def sni_ext(*names: bytes, kind: int = 0) -> tuple[int, bytes]:
    entries = b"".join(bytes([kind]) + struct.pack("!H", len(n)) + n for n in names)
    return 0, struct.pack("!H", len(entries)) + entries


def hello_message(extensions: list[tuple[int, bytes]] | None, msg_type: int = 1) -> bytes:
    """A ClientHello handshake message with the given extensions (None: no extensions block)."""
    body = b"\x03\x03" + b"\x11" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    if extensions is not None:
        exts = b"".join(struct.pack("!HH", t, len(d)) + d for t, d in extensions)
        body += struct.pack("!H", len(exts)) + exts
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def records(handshake: bytes, size: int = 2**14, version: bytes = b"\x03\x01", kind: int = 0x16) -> bytes:
    """`handshake` split into TLS records of at most `size` bytes."""
    out = b""
    for i in range(0, len(handshake), size):
        part = handshake[i:i + size]
        out += bytes([kind]) + version + struct.pack("!H", len(part)) + part
    return out


def hello(*names: bytes) -> bytes:
    return records(hello_message([sni_ext(*names)] if names else []))


# --- parser and rule tables -----------------------------------------------------------------------

@pytest.mark.parametrize(("name", "expected"), [
    ("granted.test", "granted.test"),
    ("api.example.com", "api.example.com"),
    (None, None),
])
def test_parses_pythons_own_client_hello(name: str | None, expected: str | None) -> None:
    data = real_client_hello(name)
    parsed = parse_client_hello(data)
    assert parsed is not None and parsed.server_name == expected and not parsed.hides_server_name
    assert parsed.length == len(data)


@pytest.mark.parametrize("size", [1, 2, 5, 64, 300])
def test_fragmented_records_and_partial_delivery(size: int) -> None:
    data = records(real_client_hello("granted.test")[5:], size=size)  # re-fragment the handshake
    for cut in range(0, len(data), max(1, len(data) // 7)):
        assert parse_client_hello(data[:cut]) is None  # incomplete: hold and wait
        assert check_first_flight(data[:cut], "granted.test", False, 443) is FirstFlight.NEED_MORE
    assert parse_client_hello(data) == ClientHello("granted.test", False, len(data))
    assert check_first_flight(data, "granted.test", False, 443) is FirstFlight.FORWARD


@pytest.mark.parametrize(("data", "host", "is_ip", "port", "verdict"), [
    (hello(b"granted.test"), "granted.test", False, 443, "forward"),
    (hello(b"GRANTED.Test."), "granted.test", False, 443, "forward"),  # case and trailing dot
    (hello(b"other.test"), "granted.test", False, 443, "sni_mismatch"),
    (hello(b"granted.test.evil"), "granted.test", False, 8443, "sni_mismatch"),
    (hello(b"sub.granted.test"), "granted.test", False, 443, "sni_mismatch"),
    (hello(), "granted.test", False, 443, "sni_missing"),  # a name must be named
    (records(hello_message(None)), "granted.test", False, 443, "sni_missing"),
    (hello(), "127.0.0.1", True, 443, "forward"),  # IP-literal CONNECT: no SNI is normal
    (hello(b"granted.test"), "127.0.0.1", True, 443, "sni_mismatch"),  # ...but no other name
    (hello(b"127.0.0.1"), "127.0.0.1", True, 443, "forward"),  # not valid SNI, but names the same host
    (hello(b"127.0.0.1"), "granted.test", False, 443, "sni_mismatch"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "granted.test", False, 443, "not_tls"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "granted.test", False, 80, "forward"),  # plain protocols elsewhere
    (b"\x80\x2e\x01\x03\x01", "granted.test", False, 443, "not_tls"),  # SSLv2-style hello
    (records(hello_message([sni_ext(b"granted.test"), (0xFE0D, b"\x00" * 8)])), "granted.test", False, 443,
     "sni_hidden"),  # ECH would hide the real name
    (records(hello_message([sni_ext(b"granted.test"), (0xFFCE, b"\x00")])), "granted.test", False, 443,
     "sni_hidden"),
    (records(hello_message([sni_ext(b"granted.test"), sni_ext(b"other.test")])), "granted.test", False, 443,
     "bad_client_hello"),  # repeated extension
    (hello(b"granted.test", b"other.test"), "granted.test", False, 443, "bad_client_hello"),  # two names
    (records(hello_message([sni_ext(b"granted.test", kind=1)])), "granted.test", False, 443,
     "bad_client_hello"),
    (records(hello_message([sni_ext("grä.test".encode())])), "xn--gr-via.test", False, 443,
     "bad_client_hello"),  # not ASCII
    (records(hello_message([sni_ext(b"a b.test")])), "granted.test", False, 443, "bad_client_hello"),
    (records(hello_message([sni_ext(b"granted.test")], msg_type=2)), "granted.test", False, 443,
     "bad_client_hello"),  # a ServerHello
    (records(hello_message([sni_ext(b"granted.test")]), version=b"\x02\x00"), "granted.test", False, 443,
     "bad_client_hello"),
    (b"\x16\x03\x01\x00\x00", "granted.test", False, 443, "bad_client_hello"),  # empty record
    (records(hello_message([sni_ext(b"granted.test")]))[:15], "granted.test", False, 443, "need_more"),
    (records(hello_message([sni_ext(b"granted.test")]))[:5] + b"\x02\x00\x00\x10", "granted.test", False, 443,
     "bad_client_hello"),  # refused from a partial record already
    (b"\x16\x03\x03\x00\x04\x01\x00\x00\x64" + b"\x17\x03\x03\x00\x01\x00", "granted.test", False, 443,
     "bad_client_hello"),  # a record of another type inside the hello
    (b"\x16\x03\x03\x00\x05\x01\x00\x00\x01\x00", "granted.test", False, 443, "bad_client_hello"),  # truncated
])
def test_first_flight_rules(data: bytes, host: str, is_ip: bool, port: int, verdict: str) -> None:
    try:
        got = check_first_flight(data, host, is_ip, port).value
    except Denied as exc:
        got = exc.reason  # type: ignore[attr-defined]
    assert got == verdict


def test_incomplete_hello_is_refused_at_eof_or_when_too_large() -> None:
    data = real_client_hello("granted.test")
    assert check_first_flight(data[:20], "granted.test", False, 443) is FirstFlight.NEED_MORE
    with pytest.raises(Denied):
        check_first_flight(data[:20], "granted.test", False, 443, final=True)
    assert check_first_flight(b"", "granted.test", False, 443, final=True) is FirstFlight.FORWARD
    # A hello that claims to be huge is refused from its header alone.
    huge = b"\x16\x03\x01\x40\x00" + b"\x01\xff\xff\xff" + b"\x00" * 100
    with pytest.raises(Denied):
        check_first_flight(huge, "granted.test", False, 443)
    # Records that never complete a hello stop at the cap.
    many = records(b"\x01\x00\xf0\x00" + b"\x00" * 70000, size=1000)
    with pytest.raises(Denied):
        check_first_flight(many, "granted.test", False, 443)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_parser_never_crashes_on_arbitrary_tls_looking_bytes(tail: bytes) -> None:
    for data in (b"\x16\x03\x01" + tail, records(b"\x01" + tail, size=64)):
        try:
            result = parse_client_hello(data)
        except MalformedClientHello:
            continue
        assert result is None or isinstance(result, ClientHello)


@pytest.mark.parametrize(("host", "port", "target"), [
    ("granted.test", 443, "granted.test:443"),
    ("GRANTED.Test.", 443, "granted.test:443"),
    ("127.0.0.1", 8080, "127.0.0.1:8080"),
    ("::1", 80, "[::1]:80"),
    ("[::1]", 80, "[::1]:80"),
    ("::ffff:127.0.0.1", 80, "127.0.0.1:80"),
])
def test_tunnel_destination_normalises(host: str, port: int, target: str) -> None:
    assert tunnel_destination(host, port).target == target


@pytest.mark.parametrize(("host", "port"), [
    ("a/b", 443), ("user@host", 443), ("host:80", 443), ("", 443), ("0x7f.1", 443), ("127.1", 443),
    ("fe80::1%eth0", 443), ("a b", 443), ("host", 0), ("host", 65536), ("host", True), ("host", "443"),
    (5, 443), ("http://host", 443), ("-" * 300, 443),
])
def test_tunnel_destination_refuses(host: Any, port: Any) -> None:
    with pytest.raises(InvalidRequest):
        tunnel_destination(host, port)


# --- through a real broker ------------------------------------------------------------------------

def write_network_grant(ws: Workspace, component: str, entry: dict[str, Any] | None) -> None:
    """Set (or with None remove) the component's network grant entry."""
    path = ws.grant_file(component)
    data = json.loads(path.read_text()) if path.exists() else {"component_id": component, "permissions": {}}
    if entry is None:
        data["permissions"].pop("network", None)
    else:
        data["permissions"]["network"] = {"enabled": True, **entry}
    path.write_text(json.dumps(data))


async def network_events(ws: Workspace, expect: int, timeout: float = 6.0,
                         until: Callable[[list[dict[str, Any]]], bool] | None = None) -> list[dict[str, Any]]:
    """The stream's `network` events once at least `expect` are there and `until(events)` holds."""
    from broker.audit.trail import read_events
    from broker.bus.server import connect

    nc = await connect(ws, "audit")
    try:
        deadline = time.monotonic() + timeout
        while True:
            events = [e async for e in read_events(nc, follow=False, pack=None, decision=None)
                      if e["capability"] == "network"]
            done = len(events) >= expect and (until is None or until(events))
            if done or time.monotonic() > deadline:
                return events
            await anyio.sleep(0.1)
    finally:
        await nc.close()


class EchoServer:
    """An asyncio TCP server on 127.0.0.1 that echoes and closes its side when the client sends EOF."""

    def __init__(self) -> None:
        self.connections = 0
        self.received = bytearray()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> EchoServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await reader.read(65536):
                self.received += data
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@asynccontextmanager
async def broker_and_pack(ws: Workspace, pack_id: str = "default") -> AsyncIterator[Any]:
    async with running_broker(ws) as broker, connected_pack(ws, pack_id) as pack:
        yield broker, pack


async def wait_for_grant(broker: Any, component: str, check: Callable[[dict[str, Any] | None], bool],
                         timeout: float = 10.0) -> None:
    """Wait until the broker's policy (it polls grant files every 0.2 s) shows a grant `check` accepts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            grant: dict[str, Any] | None = broker._policy.decide(component.split(":")[0], component, "network").grant
        except Denied:
            grant = None
        if check(grant):
            return
        assert time.monotonic() < deadline, "the broker did not pick up the grant change"
        await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_tunnel_echo_one_decision_and_one_outcome(ws: Workspace, nats_server: object) -> None:
    async with EchoServer() as echo:
        write_network_grant(ws, PACK_COMPONENT, {"allowed_domains": ["127.0.0.1"], "allowed_ports": [echo.port],
                                                 "plaintext_tunnel": True})
        async with broker_and_pack(ws) as (_, pack):
            ctx = pack.context()
            opened = await ctx.request("network", {"op": "open", "host": "127.0.0.1", "port": echo.port})
            tid = opened["tunnel"]
            for i in range(5):
                chunk = f"chunk-{i}-secret-body".encode()
                assert await ctx.request("network", {"op": "send", "tunnel": tid, "data": chunk}) == {"held": 0, "closed": False}
                got = b""
                while len(got) < len(chunk):
                    r = await ctx.request("network", {"op": "recv", "tunnel": tid, "max_bytes": 4096, "wait": 2})
                    assert r["eof"] is False
                    got += r["data"]
                assert got == chunk
            # Nothing waiting: a long-poll returns empty, not an error.
            assert await ctx.request("network", {"op": "recv", "tunnel": tid, "wait": 0.2}) == {"data": b"", "eof": False, "closed": False}
            assert await ctx.request("network", {"op": "close", "tunnel": tid}) == {}
            with pytest.raises(BrokerError) as gone:
                await ctx.request("network", {"op": "recv", "tunnel": tid})
            assert gone.value.code == "invalid_request" and "no such tunnel" in gone.value.message
        events = await network_events(ws, 3)
    assert echo.connections == 1
    sent = sum(len(f"chunk-{i}-secret-body") for i in range(5))
    decision, outcome, late = events[0], events[1], events[2]
    assert decision["phase"] == "decision" and decision["decision"] == "allow"
    assert decision["target"] == f"127.0.0.1:{echo.port}" and decision["component_id"] == PACK_COMPONENT
    assert outcome["phase"] == "outcome" and outcome["request_id"] == decision["request_id"]
    assert outcome["target"] == f"127.0.0.1:{echo.port}" and outcome["decision"] == "allow"
    extra = outcome["extra"]
    assert extra["tunnel"] == tid and extra["reason"] == "closed"
    assert extra["bytes_up"] == sent and extra["bytes_down"] == sent and extra["duration_ms"] > 0
    # The only other event is the error of the recv on the closed tunnel: no per-chunk events.
    assert late["decision"] == "error" and late["code"] == "invalid_request" and late["target"] == f"tunnel {tid}"
    assert len(events) == 3
    assert "secret-body" not in json.dumps(events)


@pytest.mark.anyio
async def test_eof_both_ways_closes_the_tunnel_by_itself(ws: Workspace, nats_server: object) -> None:
    async with EchoServer() as echo:
        write_network_grant(ws, PACK_COMPONENT, {"allowed_domains": ["127.0.0.1"], "allowed_ports": [echo.port],
                                                 "plaintext_tunnel": True})
        async with broker_and_pack(ws) as (_, pack):
            ctx = pack.context()
            tid = (await ctx.request("network", {"op": "open", "host": "127.0.0.1", "port": echo.port}))["tunnel"]
            await ctx.request("network", {"op": "send", "tunnel": tid, "data": b"bye", "eof": True})
            with pytest.raises(BrokerError):  # the sending side is shut
                await ctx.request("network", {"op": "send", "tunnel": tid, "data": b"more"})
            got, eof = b"", False
            for _ in range(20):
                r = await ctx.request("network", {"op": "recv", "tunnel": tid, "wait": 2})
                got, eof = got + r["data"], r["eof"]
                if eof:
                    break
            assert (got, eof) == (b"bye", True)
            with pytest.raises(BrokerError) as gone:
                await ctx.request("network", {"op": "close", "tunnel": tid})
            assert "no such tunnel" in gone.value.message
        events = await network_events(ws, 2)
    closes = [e for e in events if e["phase"] == "outcome" and e["decision"] == "allow"]
    assert len(closes) == 1 and closes[0]["extra"]["reason"] == "eof"
    assert closes[0]["extra"]["bytes_up"] == 3 and closes[0]["extra"]["bytes_down"] == 3


@pytest.mark.anyio
async def test_a_pack_cannot_use_another_packs_tunnel(ws: Workspace, nats_server: object) -> None:
    async with EchoServer() as echo:
        grant = {"allowed_domains": ["127.0.0.1"], "allowed_ports": [echo.port], "plaintext_tunnel": True}
        for component in (PACK_COMPONENT, "other:pack:_", "default:tool:my_tool"):
            write_network_grant(ws, component, grant)
        async with running_broker(ws), connected_pack(ws) as pack, connected_pack(ws, "other") as other:
            ctx = pack.context()
            tid = (await ctx.request("network", {"op": "open", "host": "127.0.0.1", "port": echo.port}))["tunnel"]
            for op in ({"op": "send", "data": b"x"}, {"op": "recv", "wait": 0}, {"op": "close"}):
                with pytest.raises(BrokerError) as theirs:
                    await other.context().request("network", {**op, "tunnel": tid})
                assert theirs.value.code == "invalid_request" and "no such tunnel" in theirs.value.message
                # Another component of the same Pack has its own tunnels too.
                with pytest.raises(BrokerError):
                    await pack.context("default:tool:my_tool").request("network", {**op, "tunnel": tid})
            # The owner's tunnel is untouched.
            await ctx.request("network", {"op": "send", "tunnel": tid, "data": b"still mine"})
            r = await ctx.request("network", {"op": "recv", "tunnel": tid, "wait": 2})
            assert r["data"] == b"still mine"
            await ctx.request("network", {"op": "close", "tunnel": tid})
    assert echo.received == b"still mine"


@pytest.mark.anyio
async def test_narrowed_grant_closes_the_tunnel_at_its_next_op(ws: Workspace, nats_server: object) -> None:
    async with EchoServer() as echo:
        write_network_grant(ws, PACK_COMPONENT, {"allowed_domains": ["127.0.0.1"], "allowed_ports": [echo.port],
                                                 "plaintext_tunnel": True})
        async with broker_and_pack(ws) as (broker, pack):
            ctx = pack.context()
            tid = (await ctx.request("network", {"op": "open", "host": "127.0.0.1", "port": echo.port}))["tunnel"]
            await ctx.request("network", {"op": "send", "tunnel": tid, "data": b"before"})
            other_port = echo.port + 1 if echo.port < 65535 else 1
            write_network_grant(ws, PACK_COMPONENT, {"allowed_domains": ["127.0.0.1"], "allowed_ports": [other_port],
                                                     "plaintext_tunnel": True})
            await wait_for_grant(broker, PACK_COMPONENT, lambda g: g is not None and g["allowed_ports"] == [other_port])
            with pytest.raises(PermissionDenied) as denied:
                await ctx.request("network", {"op": "send", "tunnel": tid, "data": b"after"})
            assert "no longer covers" in denied.value.message
            with pytest.raises(BrokerError) as gone:
                await ctx.request("network", {"op": "recv", "tunnel": tid})
            assert "no such tunnel" in gone.value.message
        events = await network_events(ws, 4)
    closes = [e for e in events if e["phase"] == "outcome" and e["decision"] == "allow"]
    assert [e["extra"]["reason"] for e in closes] == ["revoked"]
    assert echo.received == b"before"


@pytest.mark.anyio
async def test_revoked_grant_fails_the_next_op_and_the_tunnel_closes(ws: Workspace, nats_server: object) -> None:
    async with EchoServer() as echo:
        write_network_grant(ws, PACK_COMPONENT, {"allowed_domains": ["127.0.0.1"], "allowed_ports": [echo.port],
                                                 "plaintext_tunnel": True, "tunnel_idle_timeout": 1.5})
        async with broker_and_pack(ws) as (broker, pack):
            ctx = pack.context()
            tid = (await ctx.request("network", {"op": "open", "host": "127.0.0.1", "port": echo.port}))["tunnel"]
            await ctx.request("network", {"op": "send", "tunnel": tid, "data": b"before"})
            write_network_grant(ws, PACK_COMPONENT, None)  # `rumi revoke default:pack:_ network`
            await wait_for_grant(broker, PACK_COMPONENT, lambda g: g is None)
            for op in ({"op": "send", "data": b"after"}, {"op": "recv"}, {"op": "close"}):
                with pytest.raises(PermissionDenied):
                    await ctx.request("network", {**op, "tunnel": tid})
            # The broker refuses every op itself; the tunnel's socket is closed by the revocation
            # re-check (when the broker offers one) or at the latest by the idle timeout.
            events = await network_events(ws, 5, timeout=8)
    closes = [e for e in events if e["phase"] == "outcome" and e["decision"] == "allow"]
    assert len(closes) == 1 and closes[0]["extra"]["reason"] in ("revoked", "idle")
    denials = [e for e in events if e["decision"] == "deny"]
    assert [e["code"] for e in denials] == ["permission_denied"] * 3
    assert echo.received == b"before"


@pytest.mark.anyio
async def test_caps_on_tunnels_bytes_and_idle_time(ws: Workspace, nats_server: object) -> None:
    async with EchoServer() as echo:
        write_network_grant(ws, PACK_COMPONENT, {
            "allowed_domains": ["127.0.0.1"], "allowed_ports": [echo.port], "plaintext_tunnel": True,
            "max_tunnels": 2, "max_tunnel_bytes": 20, "tunnel_idle_timeout": 1.0,
        })
        async with broker_and_pack(ws) as (_, pack):
            ctx = pack.context()
            open_args = {"op": "open", "host": "127.0.0.1", "port": echo.port}
            first = (await ctx.request("network", open_args))["tunnel"]
            second = (await ctx.request("network", open_args))["tunnel"]
            with pytest.raises(PermissionDenied) as many:
                await ctx.request("network", open_args)
            assert "max_tunnels" in many.value.message
            await ctx.request("network", {"op": "close", "tunnel": second})
            third = (await ctx.request("network", open_args))["tunnel"]
            # 8 up + 8 down = 16 of 20 bytes; 5 more would pass the cap.
            await ctx.request("network", {"op": "send", "tunnel": first, "data": b"12345678"})
            assert (await ctx.request("network", {"op": "recv", "tunnel": first, "wait": 2}))["data"] == b"12345678"
            with pytest.raises(BrokerError) as cap:
                await ctx.request("network", {"op": "send", "tunnel": first, "data": b"12345"})
            assert cap.value.code == "too_large"
            # The third tunnel idles out.
            deadline = time.monotonic() + 5
            while True:
                try:
                    await ctx.request("network", {"op": "recv", "tunnel": third, "wait": 0.3})
                except BrokerError as exc:
                    assert "no such tunnel" in exc.message
                    break
                assert time.monotonic() < deadline, "idle tunnel was not closed"
        events = await network_events(ws, 10)
    reasons = sorted(e["extra"]["reason"] for e in events if e["phase"] == "outcome" and e["decision"] == "allow")
    assert reasons == ["byte_cap", "closed", "idle"]


@pytest.mark.anyio
async def test_a_tunnel_to_another_port_than_443_needs_plaintext_tunnel(ws: Workspace, nats_server: object) -> None:
    async with EchoServer() as echo:
        write_network_grant(ws, PACK_COMPONENT, {"allowed_domains": ["127.0.0.1"], "allowed_ports": [echo.port]})
        async with broker_and_pack(ws) as (broker, pack):
            ctx = pack.context()
            with pytest.raises(PermissionDenied) as refused:
                await ctx.request("network", {"op": "open", "host": "127.0.0.1", "port": echo.port})
            assert '"plaintext_tunnel": true' in refused.value.message
            refusals = await network_events(ws, 1)
            # A fetch to the same host and port stays granted (plain http: the broker writes Host).
            with pytest.raises(BrokerError) as fetched:
                await ctx.request("network", {"method": "GET", "url": f"http://127.0.0.1:{echo.port}/"})
            assert fetched.value.code != "permission_denied"
            # Granted: it opens; the flag taken away again closes it at its next op.
            write_network_grant(ws, PACK_COMPONENT, {"allowed_domains": ["127.0.0.1"], "allowed_ports": [echo.port],
                                                     "plaintext_tunnel": True})
            await wait_for_grant(broker, PACK_COMPONENT, lambda g: g is not None and g["plaintext_tunnel"] is True)
            tid = (await ctx.request("network", {"op": "open", "host": "127.0.0.1", "port": echo.port}))["tunnel"]
            await ctx.request("network", {"op": "send", "tunnel": tid, "data": b"plain"})
            write_network_grant(ws, PACK_COMPONENT, {"allowed_domains": ["127.0.0.1"], "allowed_ports": [echo.port]})
            await wait_for_grant(broker, PACK_COMPONENT, lambda g: g is not None and g["plaintext_tunnel"] is False)
            with pytest.raises(PermissionDenied) as narrowed:
                await ctx.request("network", {"op": "send", "tunnel": tid, "data": b"more"})
            assert "no longer covers" in narrowed.value.message
        events = await network_events(ws, 6)
    # The refusal is exactly one event: the decision, a deny (nothing was connected).
    assert len(refusals) == 1 and refusals[0]["decision"] == "deny" and refusals[0]["phase"] == "decision"
    assert refusals[0]["code"] == "permission_denied" and refusals[0]["target"] == f"127.0.0.1:{echo.port}"
    assert echo.connections == 2  # the fetch, and the granted tunnel
    assert echo.received.endswith(b"plain")
    closes = [e for e in events if e["phase"] == "outcome" and e["decision"] == "allow" and "extra" in e
              and "tunnel" in (e["extra"] or {})]
    assert [e["extra"]["reason"] for e in closes] == ["revoked"]


@pytest.mark.anyio
async def test_invalid_op_combinations(ws: Workspace, nats_server: object) -> None:
    write_network_grant(ws, PACK_COMPONENT, {"allowed_domains": ["127.0.0.1"], "allowed_ports": [9]})
    async with broker_and_pack(ws) as (_, pack):
        ctx = pack.context()
        cases = [
            {"op": "open", "host": "127.0.0.1", "port": 9, "url": "http://127.0.0.1:9/"},
            {"op": "bogus"},
            {"op": "send"},
            {"op": "open", "host": "127.0.0.1"},
            {"op": "fetch", "url": "http://127.0.0.1:9/"},
            {"op": "recv", "tunnel": "x" * 20, "wait": 0},
            {"op": "open", "host": "127.0.0.1:9", "port": 9},
            {"op": "send", "tunnel": "x" * 20, "data": "text, not bytes"},
        ]
        for args in cases:
            with pytest.raises(BrokerError) as bad:
                await ctx.request("network", args)
            assert bad.value.code == "invalid_request", (args, bad.value)
        with pytest.raises(PermissionDenied):  # ungranted port: refused before any connection
            await ctx.request("network", {"op": "open", "host": "127.0.0.1", "port": 10})


@pytest.mark.anyio
async def test_sni_mismatch_is_refused_before_the_server_sees_a_handshake(
    ws: Workspace, nats_server: object, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki", ["granted.test"], ["127.0.0.1"])
    server = TestServer("127.0.0.1", pki=pki)
    try:
        write_network_grant(ws, PACK_COMPONENT, {"allowed_domains": ["127.0.0.1"], "allowed_ports": [server.port],
                                                 "plaintext_tunnel": True})
        async with broker_and_pack(ws) as (_, pack):
            ctx = pack.context()
            tid = (await ctx.request("network", {"op": "open", "host": "127.0.0.1", "port": server.port}))["tunnel"]
            flight = real_client_hello("evil.test")
            # Fragmented delivery: the first part is held, the rest decides.
            assert (await ctx.request("network", {"op": "send", "tunnel": tid, "data": flight[:7]}))["held"] == 7
            with pytest.raises(PermissionDenied) as refused:
                await ctx.request("network", {"op": "send", "tunnel": tid, "data": flight[7:]})
            assert "evil.test does not match the tunnel host 127.0.0.1" in refused.value.message
            with pytest.raises(BrokerError):
                await ctx.request("network", {"op": "recv", "tunnel": tid})
        events = await network_events(ws, 4)
        await anyio.sleep(0.3)
        assert server.sni == [] and server.requests == []
    finally:
        server.close()
    closes = [e for e in events if e["phase"] == "outcome" and e["decision"] == "allow"]
    assert len(closes) == 1 and closes[0]["extra"]["reason"] == "sni_mismatch"
    assert closes[0]["extra"]["bytes_up"] == 0
    errors = [e for e in events if e["decision"] == "deny" and e["phase"] == "outcome"]
    assert errors[0]["code"] == "permission_denied"


# --- names and refused addresses, inside a namespace ----------------------------------------------

async def scenario_open_by_name(payload: dict[str, Any]) -> dict[str, Any]:
    """The handler called directly (hand-built context, scripted resolver), no broker needed."""
    import broker.backends.tunnels as tunnels
    from broker.core.errors import RequestError
    from tests._netns import load_network_handler, scope_defaults

    handler = load_network_handler()
    public = TestServer(PUBLIC_TEST_ADDRESS)
    trap = Listener("127.0.0.1", public.port)
    resolver = ScriptedResolver({
        "granted.test": [[PUBLIC_TEST_ADDRESS]], "loop.test": [["127.0.0.1"]],
        "meta.test": [["169.254.169.254"]], "rebind.test": [[PUBLIC_TEST_ADDRESS], ["127.0.0.1"]],
    })
    recorded: list[list[Any]] = []

    async def record_outcome(request_id: str, target: str, fields: dict[str, Any]) -> None:
        recorded.append([request_id, target, fields["reason"], fields["bytes_up"], fields["bytes_down"]])

    async def call(args: dict[str, Any], grant: dict[str, Any] | None = None) -> dict[str, Any]:
        context = {
            "pack_id": "p", "component_id": "p:pack:_", "request_id": f"r-{len(recorded)}-{args.get('op')}",
            "grant": {**scope_defaults(), "enabled": True, "allowed_domains": ["*.test"],
                      "allowed_ports": [public.port], "plaintext_tunnel": True, **(grant or {})},
            "limits": {"timeout": 30}, "audit": {}, "egress_resolver": resolver, "record_outcome": record_outcome,
        }
        try:
            return {"ok": True, "data": (await handler.execute(context, args))["data"]}
        except RequestError as exc:
            return {"ok": False, "code": exc.code, "message": exc.message}

    out: dict[str, Any] = {}
    for name in ("loop.test", "meta.test", "granted.test", "rebind.test"):
        out[name] = await call({"op": "open", "host": name, "port": public.port})
    out["port"] = await call({"op": "open", "host": "granted.test", "port": public.port + 1})
    out["no_plaintext"] = await call({"op": "open", "host": "granted.test", "port": public.port},
                                     {"plaintext_tunnel": False})
    out["metadata_literal"] = await call({"op": "open", "host": "169.254.169.254", "port": public.port},
                                         {"allowed_domains": ["*"]})
    tid = out["granted.test"]["data"]["tunnel"]
    request = f"GET /ok HTTP/1.1\r\nHost: granted.test:{public.port}\r\nConnection: close\r\n\r\n".encode()
    out["send"] = await call({"op": "send", "tunnel": tid, "data": request, "eof": False})
    body = b""
    for _ in range(50):
        r = await call({"op": "recv", "tunnel": tid, "wait": 2})
        body += r["data"]["data"]
        if r["data"]["eof"]:
            break
    out["response"] = body.decode("latin-1")
    out["close"] = await call({"op": "close", "tunnel": tid})
    rebind = out["rebind.test"]["data"]["tunnel"]
    await call({"op": "close", "tunnel": rebind})
    out["recorded"] = recorded
    out["resolver_calls"] = resolver.calls
    out["trap_connections"] = trap.connections
    out["public_connections"] = public.connections
    out["open_tunnels"] = len(tunnels.tunnel_table())
    trap.close()
    public.close()
    return out


def test_open_by_name_uses_one_vetted_resolution() -> None:
    out = run_in_netns(HERE, "scenario_open_by_name")
    for refused in ("loop.test", "meta.test", "metadata_literal"):
        assert out[refused]["code"] == "permission_denied", out[refused]
    assert "loopback" in out["loop.test"]["message"] and "metadata" in out["meta.test"]["message"]
    assert out["port"]["code"] == "permission_denied" and "port" in out["port"]["message"]
    # Not port 443 and no plaintext_tunnel: refused on the arguments, before any resolution.
    assert out["no_plaintext"]["code"] == "permission_denied"
    assert '"plaintext_tunnel": true' in out["no_plaintext"]["message"]
    assert out["granted.test"]["ok"] and out["send"]["ok"]
    assert out["response"].startswith("HTTP/1.1 200") and out["response"].endswith("hello")
    # rebind.test answered the public address first: the tunnel went there, and never asked again.
    assert out["rebind.test"]["ok"]
    assert out["resolver_calls"] == ["loop.test", "meta.test", "granted.test", "rebind.test"]
    assert out["trap_connections"] == 0 and out["public_connections"] == 2
    assert [(r[1].split(":")[0], r[2]) for r in out["recorded"]] == [("granted.test", "closed"),
                                                                      ("rebind.test", "closed")]
    assert out["recorded"][0][3] > 0 and out["recorded"][0][4] > 0  # bytes up and down
    assert out["open_tunnels"] == 0


@pytest.mark.anyio
async def test_revocation_recheck_hook_closes_an_idle_tunnel() -> None:
    """With a broker that offers `current_grant()`, a revoked tunnel closes without waiting for an op."""
    from broker.core.errors import RequestError
    from tests._netns import load_network_handler, scope_defaults

    handler = load_network_handler()
    recorded: list[tuple[str, str]] = []
    granted = {"enabled": True}

    async def record_outcome(request_id: str, target: str, fields: dict[str, Any]) -> None:
        recorded.append((request_id, fields["reason"]))

    async with EchoServer() as echo:
        grant = {**scope_defaults(), "enabled": True, "allowed_domains": ["127.0.0.1"],
                 "allowed_ports": [echo.port], "plaintext_tunnel": True}

        def current_grant() -> dict[str, Any]:
            if not granted["enabled"]:
                raise Denied("component default:pack:_ has no grant for network")
            return grant

        context = {"pack_id": "default", "component_id": PACK_COMPONENT, "request_id": "open-1", "grant": grant,
                   "limits": {"timeout": 30}, "audit": {}, "record_outcome": record_outcome,
                   "current_grant": current_grant}
        opened = await handler.execute(context, {"op": "open", "host": "127.0.0.1", "port": echo.port})
        tid = opened["data"]["tunnel"]
        await anyio.sleep(1.6)
        assert recorded == []  # still granted: the re-check keeps it open
        granted["enabled"] = False
        with anyio.fail_after(5):
            while not recorded:
                await anyio.sleep(0.05)
        assert recorded == [("open-1", "revoked")]
        with pytest.raises(RequestError) as gone:
            await handler.execute({**context, "request_id": "r-2"}, {"op": "recv", "tunnel": tid})
        assert "no such tunnel" in gone.value.message
