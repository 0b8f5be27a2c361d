"""The in-container HTTP(S) proxy: unmodified `requests`, `urllib` and `httpx` through the broker.

Each test runs a real nats-server and broker, a Pack connected with its own credentials and the
proxy (`pack_runtime._proxy`) in the test's event loop; the clients run as subprocesses with only
`HTTPS_PROXY`/`HTTP_PROXY` pointing at the proxy and the test CA in `SSL_CERT_FILE` /
`REQUESTS_CA_BUNDLE`. Targets are servers the test starts on 127.0.0.1 (granted as `127.0.0.1`);
host names, SNI for names and refused addresses run inside a loopback-only network namespace.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from broker.core.workspace import Workspace
from pack_runtime._proxy import ProxyServer, parse_listen
from tests._netns import PUBLIC_TEST_ADDRESS, Listener, ScriptedResolver, TestServer, make_pki, run_in_netns
from tests.conftest import connected_pack, free_port, running_broker
from tests.test_tunnel import EchoServer, network_events, wait_for_grant, write_network_grant

HERE = Path(__file__).resolve()
PACK_COMPONENT = "default:pack:_"

CLIENTS = r'''
import json, sys
urls = json.loads(sys.argv[1])
out = {}
for lib in ("requests", "urllib", "httpx"):
    for key, url in urls.items():
        try:
            if lib == "requests":
                import requests
                r = requests.get(url, timeout=20)
                res = {"status": r.status_code, "body": r.text}
            elif lib == "urllib":
                import urllib.error, urllib.request
                try:
                    with urllib.request.urlopen(url, timeout=20) as r:
                        res = {"status": r.status, "body": r.read().decode()}
                except urllib.error.HTTPError as exc:
                    res = {"status": exc.code, "body": exc.read().decode()}
            else:
                import httpx
                r = httpx.get(url, timeout=20)
                res = {"status": r.status_code, "body": r.text}
        except Exception as exc:
            res = {"error": type(exc).__name__, "detail": repr(exc)[:600]}
        out[f"{lib} {key}"] = res
print(json.dumps(out))
'''


def client_env(proxy_port: int, ca: str | None) -> dict[str, str]:
    """The environment the container runtime gives a Pack (plus the test CA)."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    proxy = f"http://127.0.0.1:{proxy_port}"
    env.update({"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "https_proxy": proxy,
                "NO_PROXY": "", "no_proxy": ""})
    if ca is not None:
        env.update({"SSL_CERT_FILE": ca, "REQUESTS_CA_BUNDLE": ca})
    return env


async def run_clients(proxy_port: int, urls: dict[str, str], ca: str | None) -> dict[str, Any]:
    proc = await anyio.run_process([sys.executable, "-c", CLIENTS, json.dumps(urls)],
                                   env=client_env(proxy_port, ca), check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@asynccontextmanager
async def proxy_stack(ws: Workspace, broker_out: list[Any] | None = None) -> AsyncIterator[int]:
    """Broker + the `default` Pack + its proxy on a free loopback port; yields the proxy port."""
    async with running_broker(ws) as broker, connected_pack(ws) as pack:
        if broker_out is not None:
            broker_out.append(broker)
        server = ProxyServer(pack.context())
        _, port = await server.start("127.0.0.1", 0)
        try:
            yield port
        finally:
            await server.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_pki(tmp_path_factory.mktemp("pki"), ["granted.test"], ["127.0.0.1", PUBLIC_TEST_ADDRESS])


def raw_connect(proxy_port: int, target: str, timeout: float = 10) -> tuple[socket.socket, bytes]:
    """Send `CONNECT target` and return the socket and the proxy's answer head."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, head


def tls_through(proxy_port: int, target: str, server_hostname: str | None, ca: str) -> str:
    """CONNECT, then a TLS handshake with the given SNI; 'ok' or the error class."""
    sock, head = raw_connect(proxy_port, target)
    if not head.startswith(b"HTTP/1.1 200"):
        sock.close()
        return "connect: " + head.split(b"\r\n")[0].decode()
    ctx = ssl.create_default_context(cafile=ca)
    if server_hostname is None:
        ctx.check_hostname = False
    try:
        with ctx.wrap_socket(sock, server_hostname=server_hostname) as tls:
            tls.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return "ok " + tls.recv(4096).split(b"\r\n")[0].decode()
    except (ssl.SSLError, OSError) as exc:
        return type(exc).__name__
    finally:
        sock.close()


# --- unmodified clients ---------------------------------------------------------------------------

@pytest.mark.anyio
async def test_unmodified_clients_reach_granted_servers_end_to_end(
    ws: Workspace, nats_server: object, pki: dict[str, str]
) -> None:
    tls, plain = TestServer("127.0.0.1", pki=pki), TestServer("127.0.0.1")
    try:
        write_network_grant(ws, PACK_COMPONENT, {"allowed_domains": ["127.0.0.1"],
                                                 "allowed_ports": [tls.port, plain.port], "plaintext_tunnel": True})
        async with proxy_stack(ws) as proxy_port:
            out = await run_clients(proxy_port, {"https": tls.url("/ok"), "http": plain.url("/ok")}, pki["ca"])
            events = await network_events(ws, 12)
    finally:
        tls.close()
        plain.close()
    for key, result in out.items():
        assert result.get("status") == 200 and result.get("body") == "hello", (key, result)
    # TLS ran end to end: the server completed three handshakes (IP literal: no SNI), clients verified it.
    assert len(tls.requests) == 3 and tls.sni == [None, None, None]
    assert [r["path"] for r in plain.requests] == ["/ok"] * 3
    opens = [e for e in events if e["target"] == f"127.0.0.1:{tls.port}"]
    decisions = [e for e in opens if e["phase"] == "decision"]
    outcomes = [e for e in opens if e["phase"] == "outcome"]
    assert len(decisions) == 3 and len(outcomes) == 3, opens
    assert {e["request_id"] for e in decisions} == {e["request_id"] for e in outcomes}
    for e in outcomes:
        assert e["component_id"] == PACK_COMPONENT and e["decision"] == "allow"
        assert e["extra"]["bytes_up"] > 0 and e["extra"]["bytes_down"] > 0
        assert e["extra"]["reason"] in ("eof", "closed")
    fetches = [e for e in events if e["target"] == f"127.0.0.1:{plain.port}"]
    assert len(fetches) == 6 and all(e["decision"] == "allow" for e in fetches)
    assert len(events) == 12  # no per-chunk events
    text = json.dumps(events)
    assert "hello" not in text and "Set-Cookie" not in text and "User-Agent" not in text


@pytest.mark.anyio
async def test_ungranted_port_is_403_and_the_denial_is_audited(
    ws: Workspace, nats_server: object, pki: dict[str, str]
) -> None:
    granted, refused = TestServer("127.0.0.1", pki=pki), Listener("127.0.0.1")
    try:
        write_network_grant(ws, PACK_COMPONENT, {"allowed_domains": ["127.0.0.1"], "allowed_ports": [granted.port]})
        async with proxy_stack(ws) as proxy_port:
            urls = {"https": f"https://127.0.0.1:{refused.port}/ok", "http": f"http://127.0.0.1:{refused.port}/ok"}
            out = await run_clients(proxy_port, urls, pki["ca"])
            events = await network_events(ws, 6)
    finally:
        granted.close()
        refused.close()
    for lib in ("requests", "urllib", "httpx"):
        https, http = out[f"{lib} https"], out[f"{lib} http"]
        assert "error" in https and "403" in https["detail"], (lib, https)
        assert http.get("status") == 403 and "permission_denied" in http["body"], (lib, http)
        assert f"port {refused.port} is not granted" in http["body"]
    assert refused.connections == 0
    # Refused on its arguments (the port is not granted): one event per request, decision deny.
    denials = [e for e in events if e["phase"] == "decision"]
    assert len(denials) == 6 and len(events) == 6, events
    assert len({e["request_id"] for e in denials}) == 6
    assert all(e["decision"] == "deny" and e["code"] == "permission_denied" for e in denials)
    assert {e["target"] for e in denials} == {f"127.0.0.1:{refused.port}"}


@pytest.mark.anyio
async def test_sni_mismatch_is_refused_and_the_server_sees_no_handshake(
    ws: Workspace, nats_server: object, pki: dict[str, str]
) -> None:
    tls = TestServer("127.0.0.1", pki=pki)
    try:
        write_network_grant(ws, PACK_COMPONENT, {"allowed_domains": ["127.0.0.1"], "allowed_ports": [tls.port],
                                                 "plaintext_tunnel": True})
        async with proxy_stack(ws) as proxy_port:
            target = f"127.0.0.1:{tls.port}"
            mismatch = await anyio.to_thread.run_sync(tls_through, proxy_port, target, "granted.test", pki["ca"])
            ip_ok = await anyio.to_thread.run_sync(tls_through, proxy_port, target, None, pki["ca"])
            events = await network_events(ws, 5)
        await anyio.sleep(0.3)
    finally:
        tls.close()
    assert mismatch != "ok" and not mismatch.startswith("connect"), mismatch
    assert ip_ok == "ok HTTP/1.1 200 OK"
    assert tls.sni == [None] and len(tls.requests) == 1  # only the IP-literal handshake reached it
    closes = sorted(e["extra"]["reason"] for e in events if e["phase"] == "outcome" and e["decision"] == "allow")
    assert closes[-1] == "sni_mismatch" and len(closes) == 2
    refusal = [e for e in events if e["phase"] == "outcome" and e["decision"] == "deny"]
    assert [e["code"] for e in refusal] == ["permission_denied"]


@pytest.mark.anyio
async def test_revocation_ends_a_proxied_tunnel(ws: Workspace, nats_server: object) -> None:
    async with EchoServer() as echo:
        write_network_grant(ws, PACK_COMPONENT, {"allowed_domains": ["127.0.0.1"], "allowed_ports": [echo.port],
                                                 "plaintext_tunnel": True, "tunnel_idle_timeout": 1.5})
        brokers: list[Any] = []
        async with proxy_stack(ws, brokers) as proxy_port:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
            writer.write(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\n\r\n".encode())
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
            write_network_grant(ws, PACK_COMPONENT, None)
            await wait_for_grant(brokers[0], PACK_COMPONENT, lambda g: g is None)
            writer.write(b"after revocation")
            # The next op is refused; the proxy ends the client's connection.
            with anyio.fail_after(10):
                rest = await reader.read()
            assert rest == b""
            writer.close()
            events = await network_events(ws, 3, timeout=8, until=lambda es: any(
                e["phase"] == "outcome" and e["decision"] == "allow" for e in es))
    assert bytes(echo.received) == b"ping"
    closes = [e for e in events if e["phase"] == "outcome" and e["decision"] == "allow"]
    assert len(closes) == 1 and closes[0]["extra"]["reason"] in ("revoked", "idle")
    assert any(e["decision"] == "deny" and e["code"] == "permission_denied" for e in events)


# --- plain HTTP and the proxy's own parsing -------------------------------------------------------

async def exchange(proxy_port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    writer.write(raw)
    await writer.drain()
    with anyio.fail_after(10):
        data = await reader.read()
    writer.close()
    return data


@pytest.mark.anyio
async def test_plain_http_forwarding_and_bad_requests(ws: Workspace, nats_server: object) -> None:
    plain = TestServer("127.0.0.1")
    try:
        write_network_grant(ws, PACK_COMPONENT, {"allowed_domains": ["127.0.0.1"], "allowed_ports": [plain.port]})
        async with proxy_stack(ws) as port:
            base = f"http://127.0.0.1:{plain.port}"
            chunked = await exchange(port, (
                f"POST {base}/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                "Proxy-Connection: keep-alive\r\nX-Test: 1\r\nX-Test: 2\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            ).encode())
            redirect = await exchange(port, f"GET {base}/redirect?to=/ok HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = await exchange(port, f"HEAD {base}/ok HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            bad = {
                "origin_form": await exchange(port, b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"),
                "no_port": await exchange(port, b"CONNECT 127.0.0.1 HTTP/1.1\r\n\r\n"),
                "garbage": await exchange(port, b"\x16\x03\x01 hello\r\n\r\n"),
                "https_absolute": await exchange(port, f"GET https://127.0.0.1:{plain.port}/ HTTP/1.1\r\n\r\n".encode()),
                "bad_length": await exchange(port, f"POST {base}/echo HTTP/1.1\r\nContent-Length: x\r\n\r\n".encode()),
            }
    finally:
        plain.close()
    status, _, body = chunked.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200 OK")
    echo = json.loads(body)
    assert echo["method"] == "POST" and echo["body"] == "hello world"
    sent = {k.lower(): v for k, v in echo["headers"]}
    assert sent["x-test"] == "1, 2" and "proxy-connection" not in sent and "transfer-encoding" not in sent
    # Redirects go back to the client (which follows them through the proxy, checked again).
    assert redirect.startswith(b"HTTP/1.1 302 Found") and b"\r\nLocation: /ok\r\n" in redirect
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: 5\r\n" in head and head.endswith(b"\r\n\r\n")
    for case, answer in bad.items():
        assert answer.startswith(b"HTTP/1.1 400 Bad Request"), (case, answer)
        assert b"X-Rumi-Error: invalid_request" in answer, case


@pytest.mark.anyio
async def test_plaintext_goes_through_fetch_and_a_plaintext_tunnel_needs_its_grant(
    ws: Workspace, nats_server: object
) -> None:
    plain = TestServer("127.0.0.1")
    try:
        write_network_grant(ws, PACK_COMPONENT, {"allowed_domains": ["127.0.0.1"], "allowed_ports": [plain.port]})
        async with proxy_stack(ws) as port:
            # Plain http:// is a fetch: the broker writes the Host header, whatever the client wrote.
            fetched = await exchange(port, (
                f"GET http://127.0.0.1:{plain.port}/echo HTTP/1.1\r\nHost: internal.admin.test\r\n\r\n"
            ).encode())
            # A tunnel there could carry any Host header: not without plaintext_tunnel.
            tunnel = await exchange(port, f"CONNECT 127.0.0.1:{plain.port} HTTP/1.1\r\n\r\n".encode())
            events = await network_events(ws, 3)
    finally:
        plain.close()
    status, _, body = fetched.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200 OK"), fetched
    hosts = [v for k, v in json.loads(body)["headers"] if k.lower() == "host"]
    assert hosts == [f"127.0.0.1:{plain.port}"]
    assert tunnel.startswith(b"HTTP/1.1 403 Forbidden") and b"X-Rumi-Error: permission_denied" in tunnel
    assert b'"plaintext_tunnel": true' in tunnel
    assert len(plain.requests) == 1  # the tunnel never connected
    refused = [e for e in events if e["decision"] == "deny"]
    assert len(refused) == 1 and refused[0]["phase"] == "decision"  # one event for the refused CONNECT


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:3128", ("127.0.0.1", 3128)),
    ("localhost:3128", ("127.0.0.1", 3128)),
    ("[::1]:8080", ("::1", 8080)),
    ("127.0.0.5:0", ("127.0.0.5", 0)),
])
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["0.0.0.0:3128", "10.0.0.1:3128", "example.com:3128", "127.0.0.1", "127.0.0.1:x",
                                  ":3128", "127.0.0.1:70000", "[::]:3128"])
def test_parse_listen_refuses_non_loopback_or_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(text)


@pytest.mark.anyio
async def test_pack_serve_starts_the_proxy_when_rumi_proxy_listen_is_set(
    ws: Workspace, nats_server: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker.bus.creds import pack_identity
    from broker.bus.server import nats_url
    from pack_runtime import Pack

    plain = TestServer("127.0.0.1")
    port = free_port()
    monkeypatch.setenv("RUMI_PROXY_LISTEN", f"127.0.0.1:{port}")
    try:
        write_network_grant(ws, PACK_COMPONENT, {"allowed_domains": ["127.0.0.1"], "allowed_ports": [plain.port]})
        pack = Pack("default", nats_url=nats_url(ws), creds=str(pack_identity(ws, "default").seed_path),
                    request_timeout=5)
        async with running_broker(ws), anyio.create_task_group() as tg:
            await tg.start(pack.serve)
            answer = await exchange(port, f"GET {plain.url('/ok')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            tg.cancel_scope.cancel()
    finally:
        plain.close()
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"hello")


# --- names, SNI and refused addresses, inside a namespace -----------------------------------------

async def scenario_names_through_the_proxy(payload: dict[str, Any]) -> dict[str, Any]:
    """Whole stack in the namespace: nats-server, broker, Pack, proxy; names from a scripted resolver."""
    import tempfile

    import broker.backends.egress as egress
    from broker.admin.init import init_workspace
    from broker.bus.server import EmbeddedServer, ensure_audit_stream

    pki = payload["pki"]
    server = TestServer(PUBLIC_TEST_ADDRESS, pki=pki)
    trap = Listener("127.0.0.1", server.port)
    resolver = ScriptedResolver({"granted.test": [[PUBLIC_TEST_ADDRESS]], "other.test": [[PUBLIC_TEST_ADDRESS]],
                                 "loop.test": [["127.0.0.1"]]})
    egress.resolve_system = resolver  # type: ignore[assignment]  # the broker's resolver, in this child only
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.at(Path(tmp) / "ws")
        init_workspace(ws)
        write_network_grant(ws, PACK_COMPONENT, {"allowed_domains": ["granted.test", "loop.test"],
                                                 "allowed_ports": [server.port], "plaintext_tunnel": True})
        nats = EmbeddedServer(ws, ws.load_config(), port=free_port())
        nats.start()
        try:
            await ensure_audit_stream(ws)
            async with proxy_stack(ws) as proxy_port:
                target = f"granted.test:{server.port}"
                out["clients"] = await run_clients(proxy_port, {"name": f"https://{target}/ok"}, pki["ca"])
                out["sni_after_clients"] = list(server.sni)
                out["other_sni"] = await anyio.to_thread.run_sync(tls_through, proxy_port, target, "other.test",
                                                                  pki["ca"])
                out["no_sni"] = await anyio.to_thread.run_sync(tls_through, proxy_port, target, None, pki["ca"])
                out["loop"] = await anyio.to_thread.run_sync(tls_through, proxy_port, f"loop.test:{server.port}",
                                                             "loop.test", pki["ca"])
                out["not_granted"] = await anyio.to_thread.run_sync(
                    tls_through, proxy_port, f"other.test:{server.port}", "other.test", pki["ca"])
                events = await network_events(ws, 12)
                out["reasons"] = sorted(e["extra"]["reason"] for e in events
                                        if e["phase"] == "outcome" and e["decision"] == "allow")
                out["errors"] = sorted(e["code"] for e in events if e["phase"] == "outcome" and e["decision"] in ("deny", "error"))
                out["refused_on_arguments"] = sorted(e["code"] for e in events
                                                     if e["phase"] == "decision" and e["decision"] == "deny")
            await anyio.sleep(0.3)
        finally:
            nats.stop()
    out["sni_final"] = list(server.sni)
    out["requests"] = len(server.requests)
    out["trap_connections"] = trap.connections
    out["resolver_calls"] = resolver.calls
    trap.close()
    server.close()
    return out


def test_names_sni_and_refused_addresses_through_the_proxy(pki: dict[str, str]) -> None:
    out = run_in_netns(HERE, "scenario_names_through_the_proxy", {"pki": pki}, timeout=180)
    for key, result in out["clients"].items():
        assert result.get("status") == 200 and result.get("body") == "hello", (key, result)
    # The server saw each client's SNI: TLS ran end to end with the name.
    assert out["sni_after_clients"] == ["granted.test"] * 3
    assert out["other_sni"] not in ("ok", "") and not out["other_sni"].startswith("connect")
    assert out["no_sni"] not in ("ok", "") and not out["no_sni"].startswith("connect")
    assert out["loop"] == "connect: HTTP/1.1 403 Forbidden"  # a name never reaches loopback
    assert out["not_granted"] == "connect: HTTP/1.1 403 Forbidden"
    assert out["sni_final"] == ["granted.test"] * 3 and out["requests"] == 3
    assert out["trap_connections"] == 0
    assert out["reasons"].count("sni_mismatch") == 1 and out["reasons"].count("sni_missing") == 1
    # Refused after resolving (loopback) or at the TLS check: outcome events. The name that is not
    # granted at all is refused on its arguments: one decision event, deny.
    assert out["errors"] == ["permission_denied"] * 3
    assert out["refused_on_arguments"] == ["permission_denied"]
    assert "other.test" not in out["resolver_calls"]  # refused by the grant before any lookup


# --- measurements ---------------------------------------------------------------------------------

DOWNLOAD = r'''
import json, sys, time, httpx
url, proxy, ca, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
out = {}
for name, kwargs in (("direct", {}), ("tunnel", {"proxy": proxy})):
    best = None
    with httpx.Client(verify=ca, trust_env=False, timeout=60, **kwargs) as client:
        for _ in range(rounds):
            t = time.perf_counter()
            body = client.get(url).content
            dt = time.perf_counter() - t
            assert len(body) == 5 * 1024 * 1024, len(body)
            best = dt if best is None else min(best, dt)
    out[name] = best
print(json.dumps(out))
'''


@pytest.mark.anyio
async def test_measure_5mb_download_and_tunnel_open_latency(
    ws: Workspace, nats_server: object, pki: dict[str, str]
) -> None:
    """Not a timing assertion: checks a 5 MiB body arrives intact and prints throughput and latency."""
    tls = TestServer("127.0.0.1", pki=pki)
    try:
        write_network_grant(ws, PACK_COMPONENT, {"allowed_domains": ["127.0.0.1"], "allowed_ports": [tls.port],
                                                 "plaintext_tunnel": True})
        async with proxy_stack(ws) as proxy_port:
            url = tls.url(f"/big?n={5 * 1024 * 1024}")
            proc = await anyio.run_process(
                [sys.executable, "-c", DOWNLOAD, url, f"http://127.0.0.1:{proxy_port}", pki["ca"], "3"],
                check=False)
            assert proc.returncode == 0, proc.stderr.decode()[-3000:]
            seconds = json.loads(proc.stdout)

            def open_latencies() -> list[float]:
                times = []
                for _ in range(20):
                    t = time.perf_counter()
                    sock, head = raw_connect(proxy_port, f"127.0.0.1:{tls.port}")
                    times.append(time.perf_counter() - t)
                    assert head.startswith(b"HTTP/1.1 200")
                    sock.close()
                return times

            latencies = await anyio.to_thread.run_sync(open_latencies)
    finally:
        tls.close()
    mb = 5 * 1024 * 1024 / 1e6
    print(f"\n5 MiB over TLS: direct {seconds['direct'] * 1000:.0f} ms ({mb / seconds['direct']:.0f} MB/s), "
          f"through the tunnel {seconds['tunnel'] * 1000:.0f} ms ({mb / seconds['tunnel']:.0f} MB/s); "
          f"CONNECT→200 p50 {statistics.median(latencies) * 1000:.1f} ms, "
          f"max {max(latencies) * 1000:.1f} ms over {len(latencies)}")
