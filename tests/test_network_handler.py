"""The shipped network handler end to end, inside a loopback-only network namespace.

Each test runs one scenario function below in a fresh namespace (`_netns.run_in_netns`): test servers
listen on 127.0.0.1 and on PUBLIC_TEST_ADDRESS (which exists only on that namespace's lo), names are
answered by a scripted resolver, and the handler is loaded from config/handlers/network.py by path and
called with a hand-built context. Nothing can leave the machine even if the handler is wrong.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests._netns import (
    PUBLIC_TEST_ADDRESS,
    Listener,
    ScriptedResolver,
    TestServer,
    call_network,
    load_network_handler,
    make_pki,
    run_in_netns,
)

HERE = Path(__file__).resolve()
PUB = PUBLIC_TEST_ADDRESS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Test CA and a server certificate for granted.test, 127.0.0.1 and PUBLIC_TEST_ADDRESS."""
    return make_pki(tmp_path_factory.mktemp("pki"), ["granted.test"], ["127.0.0.1", PUB])


def get(url: str, **extra: Any) -> dict[str, Any]:
    return {"method": "GET", "url": url, **extra}


# --- scenarios (run inside the namespace) ---------------------------------------------------------

async def scenario_ip_literal(payload: dict[str, Any]) -> dict[str, Any]:
    plain = TestServer("127.0.0.1")
    tls = TestServer("127.0.0.1", pki=payload["pki"])
    grant = {"allowed_domains": ["127.0.0.1"], "allowed_ports": [plain.port, tls.port]}
    out: dict[str, Any] = {"ports": [plain.port, tls.port]}
    out["http"] = await call_network(grant, get(plain.url("/ok")))
    out["https"] = await call_network(grant, get(tls.url("/ok")), verify=payload["pki"]["ca"])
    out["post"] = await call_network(grant, {
        "method": "post", "url": plain.url("/echo?q=1"), "body": b"payload-bytes",
        "headers": {"Authorization": "Bearer s3cret", "Content-Type": "text/plain", "X-Custom": "yes"},
    })
    out["head"] = await call_network(grant, {"method": "HEAD", "url": plain.url("/ok")})
    out["mapped"] = await call_network(grant, get(f"http://[::ffff:127.0.0.1]:{plain.port}/ok"))
    out["other_loopback"] = await call_network(grant, get(f"http://127.0.0.2:{plain.port}/ok"))
    out["cidr"] = await call_network({"allowed_domains": ["127.0.0.0/8"], "allowed_ports": [plain.port],
                                      "allow_wide_networks": True},
                                     get(f"http://127.0.0.2:{plain.port}/ok"))
    out["requests"] = plain.requests
    plain.close()
    tls.close()
    return out


async def scenario_name_never_reaches_refused(payload: dict[str, Any]) -> dict[str, Any]:
    server = TestServer("127.0.0.1")
    answers = {
        "loop.test": ["127.0.0.1"], "loop6.test": ["::1"], "meta.test": ["169.254.169.254"],
        "private.test": ["10.0.0.1"], "mapped.test": ["::ffff:127.0.0.1"], "nat64.test": ["64:ff9b::7f00:1"],
        "mixed.test": [PUB, "127.0.0.1"], "cgnat.test": ["100.64.0.1"], "ula.test": ["fd00::1"],
        "sixtofour.test": ["2002:7f00:1::1"], "zero.test": ["0.0.0.0"],
    }
    resolver = ScriptedResolver({k: [v] for k, v in answers.items()})
    out: dict[str, Any] = {}
    for grant_entries in (["{name}"], ["*.test"], ["*"]):
        for name in answers:
            grant = {"allowed_domains": [g.format(name=name) for g in grant_entries],
                     "allowed_ports": [server.port]}
            key = f"{grant_entries[0]}|{name}"
            out[key] = await call_network(grant, get(server.url(host=name)), resolver=resolver)
    out["connections"] = server.connections
    # The same name is fine once its address is granted explicitly (IP entry next to the name).
    out["granted_ip"] = await call_network(
        {"allowed_domains": ["loop.test", "127.0.0.1"], "allowed_ports": [server.port]},
        get(server.url(host="loop.test")), resolver=resolver)
    server.close()
    return out


async def scenario_pinned_tls(payload: dict[str, Any]) -> dict[str, Any]:
    pki = payload["pki"]
    server = TestServer(PUB, pki=pki)
    resolver = ScriptedResolver(fallback=lambda _host: [PUB])
    grant = {"allowed_domains": ["granted.test", "other.test"], "allowed_ports": [server.port]}
    out: dict[str, Any] = {}

    async def fetch(host: str, verify: str | None = pki["ca"]) -> dict[str, Any]:
        args = get(server.url("/echo", host=host))
        return await call_network(grant, args, resolver=resolver, verify=verify)

    out["ok"] = await fetch("granted.test")
    out["sni_ok"] = list(server.sni)
    out["case_dot"] = await fetch("GRANTED.Test.")
    out["sni_all"] = list(server.sni)
    out["wrong_name"] = await fetch("other.test")
    out["default_ca"] = await fetch("granted.test", verify=None)
    out["requests"] = len(server.requests)
    server.close()
    return out


async def scenario_rebinding(payload: dict[str, Any]) -> dict[str, Any]:
    public = TestServer(PUB)
    trap = Listener("127.0.0.1", public.port)  # same port: only the address differs
    resolver = ScriptedResolver({
        "rebind.test": [[PUB], ["127.0.0.1"]],
        "rebind-first.test": [["127.0.0.1"], [PUB]],
        "hop.test": [[PUB], ["127.0.0.1"]],
    })
    grant = {"allowed_domains": ["*.test"], "allowed_ports": [public.port]}
    out: dict[str, Any] = {}

    async def fetch(host: str, path: str = "/ok") -> dict[str, Any]:
        return await call_network(grant, get(public.url(path, host=host)), resolver=resolver)

    out["public_first"] = await fetch("rebind.test")
    out["refused_first"] = await fetch("rebind-first.test")
    out["public_connections_after_refused"] = public.connections
    # A redirect back to the same name resolves again; that second answer is checked too.
    out["hop"] = await fetch("hop.test", "/redirect?to=/ok")
    out["calls"] = resolver.calls
    out["public_connections"] = public.connections
    out["trap_connections"] = trap.connections
    trap.close()
    public.close()
    return out


async def scenario_redirects(payload: dict[str, Any]) -> dict[str, Any]:
    a = TestServer("127.0.0.1")
    b = TestServer(PUB, a.port)
    other_port = Listener("127.0.0.1")
    resolver = ScriptedResolver({"granted.test": [["127.0.0.5"]]})  # loopback, but not the granted IP
    grant = {"allowed_domains": ["127.0.0.1", PUB, "granted.test"], "allowed_ports": [a.port, 80]}

    async def via(to: str, **extra: Any) -> dict[str, Any]:
        from urllib.parse import quote
        status = extra.pop("status", 302)
        url = a.url(f"/redirect?status={status}&to={quote(to, safe='')}")
        return await call_network(extra.pop("grant", grant), {"method": "GET", "url": url, **extra},
                                  resolver=resolver)

    out: dict[str, Any] = {}
    out["other_port"] = await via(f"http://127.0.0.1:{other_port.port}/")
    out["metadata"] = await via("http://169.254.169.254/latest/meta-data/")
    out["not_granted"] = await via(f"http://notgranted.test:{a.port}/ok")
    out["name_to_loopback"] = await via(f"http://granted.test:{a.port}/ok")
    out["ftp"] = await via("ftp://127.0.0.1/")
    out["file"] = await via("file:///etc/passwd")
    out["gopher"] = await via(f"gopher://127.0.0.1:{a.port}/")
    out["userinfo"] = await via(f"http://user@127.0.0.1:{a.port}/ok")
    out["backslash"] = await via(f"http://127.0.0.1:{a.port}\\@169.254.169.254/")
    out["relative"] = await via("/ok")
    out["loop"] = await call_network(grant, get(a.url("/loop")))
    out["no_follow"] = await via("/ok", grant={**grant, "max_redirects": 0})
    for status in (301, 302, 303, 307, 308):
        out[f"post_{status}"] = await call_network(grant, {
            "method": "POST", "url": a.url(f"/redirect?status={status}&to=/echo"), "body": b"data",
            "headers": {"Content-Type": "text/plain"}})
    secrets = {"Authorization": "Bearer s3cret", "X-Api-Key": "k3y", "Cookie": "sid=1",
               "Accept": "text/plain"}
    out["cross_origin"] = await call_network(grant, {
        "method": "GET", "url": a.url(f"/redirect?to=http://{PUB}:{a.port}/echo"), "headers": secrets})
    out["same_origin"] = await call_network(grant, {
        "method": "GET", "url": a.url("/redirect?to=/echo"), "headers": secrets})
    out["other_port_connections"] = other_port.connections
    out["resolver_calls"] = resolver.calls
    for s in (a, b):
        s.close()
    other_port.close()
    return out


async def scenario_limits(payload: dict[str, Any]) -> dict[str, Any]:
    server = TestServer("127.0.0.1")
    grant = {"allowed_domains": ["127.0.0.1"], "allowed_ports": [server.port],
             "max_response_bytes": 1000, "max_request_bytes": 100, "timeout": 0.5}
    out: dict[str, Any] = {}
    out["exact"] = await call_network(grant, get(server.url("/big?n=1000")))
    out["declared"] = await call_network(grant, get(server.url("/big?n=1001")))
    out["chunked"] = await call_network(grant, get(server.url("/big?n=50000&chunked=1")))
    before = server.connections
    out["request_body"] = await call_network(grant, {"method": "POST", "url": server.url("/echo"),
                                                     "body": b"x" * 101})
    out["request_body_connections"] = server.connections - before
    out["slow"] = await call_network(grant, get(server.url("/slow?s=3")))
    out["broker_timeout"] = await call_network({**grant, "timeout": 30}, get(server.url("/slow?s=3")),
                                               broker_timeout=0.5)
    server.close()
    return out


async def scenario_refusals(payload: dict[str, Any]) -> dict[str, Any]:
    server = TestServer("127.0.0.1")
    grant = {"allowed_domains": ["127.0.0.1"], "allowed_ports": [server.port]}
    url = server.url("/ok")
    cases: dict[str, Any] = {
        "port": ({**grant, "allowed_ports": [server.port + 1 if server.port < 65535 else 1]}, get(url)),
        "ftp": (grant, get(f"ftp://127.0.0.1:{server.port}/")),
        "file": (grant, get("file:///etc/passwd")),
        "gopher": (grant, get(f"gopher://127.0.0.1:{server.port}/_x")),
        "no_scheme": (grant, get(f"127.0.0.1:{server.port}/ok")),
        "method": (grant, {"method": "CONNECT", "url": url}),
        "host_header": (grant, get(url, headers={"Host": "evil.test"})),
        "crlf_header": (grant, get(url, headers={"X-A": "a\r\nX-Injected: 1"})),
        "bad_header_name": (grant, get(url, headers={"X A": "1"})),
        "transfer_encoding": (grant, get(url, headers={"Transfer-Encoding": "chunked"})),
        "not_enabled": ({**grant, "enabled": False}, get(url)),
        "unknown_arg": (grant, {**get(url), "follow": True}),
        "bad_body_type": (grant, {**get(url), "body": 5}),
        "empty_grant": ({"allowed_domains": [], "allowed_ports": []}, get(url)),
    }
    out: dict[str, Any] = {}
    for name, (g, args) in cases.items():
        out[name] = await call_network(g, args)
    # The default resolver (getaddrinfo; /etc/hosts here) is checked like any other.
    out["system_resolver"] = await call_network({"allowed_domains": ["localhost"], "allowed_ports": [server.port]},
                                                get(server.url(host="localhost")))
    out["no_answer"] = await call_network({"allowed_domains": ["gone.test"], "allowed_ports": [server.port]},
                                          get(server.url(host="gone.test")), resolver=ScriptedResolver())
    out["connections"] = server.connections
    server.close()
    return out


async def scenario_proxy_env(payload: dict[str, Any]) -> dict[str, Any]:
    server = TestServer("127.0.0.1")
    proxy = Listener("127.0.0.1")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        os.environ[var] = f"http://127.0.0.1:{proxy.port}"
    out = {"result": await call_network({"allowed_domains": ["127.0.0.1"], "allowed_ports": [server.port]},
                                        get(server.url("/ok")))}
    out["proxy_connections"] = proxy.connections
    out["server_connections"] = server.connections
    server.close()
    proxy.close()
    return out


# --- tests ----------------------------------------------------------------------------------------

def test_ip_literal_grant_reaches_local_http_and_https(pki: dict[str, str]) -> None:
    out = run_in_netns(HERE, "scenario_ip_literal", {"pki": pki})
    http_port = out["ports"][0]
    ok = out["http"]
    assert ok["ok"] and ok["status"] == 200 and ok["body"] == "hello"
    assert ["Set-Cookie", "a=1"] in ok["headers"] and ["Set-Cookie", "b=2"] in ok["headers"]
    assert ok["audit"] == {"method": "GET", "final_target": f"127.0.0.1:{http_port}", "redirects": 0,
                           "bytes_out": 0, "status": 200, "bytes_in": 5}
    assert out["https"]["ok"] and out["https"]["body"] == "hello"
    post = out["post"]
    assert post["ok"] and post["audit"]["bytes_out"] == len(b"payload-bytes")
    seen = out["requests"][1]
    assert seen["method"] == "POST" and seen["path"] == "/echo?q=1" and seen["body"] == "payload-bytes"
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["host"] == f"127.0.0.1:{http_port}"
    assert headers["authorization"] == "Bearer s3cret" and headers["x-custom"] == "yes"
    assert "Authorization" not in repr(post["audit"]) and "s3cret" not in repr(post["audit"])
    assert out["head"]["ok"] and out["head"]["body"] == ""
    assert out["mapped"]["ok"], out["mapped"]
    assert out["other_loopback"]["code"] == "permission_denied"
    assert "loopback" in out["other_loopback"]["message"]
    # Granted by CIDR; nothing listens on 127.0.0.2, so the kernel refuses the connection.
    assert out["cidr"]["code"] == "handler_error" and "refused" in out["cidr"]["message"]


def test_name_grants_never_reach_refused_addresses() -> None:
    out = run_in_netns(HERE, "scenario_name_never_reaches_refused")
    assert out.pop("connections") == 0
    assert out.pop("granted_ip")["ok"]
    for case, result in out.items():
        assert result["code"] == "permission_denied", (case, result)
        assert "grant it as an IP/CIDR entry" in result["message"], (case, result)


def test_name_grant_connects_to_checked_address_with_sni_and_certificate(pki: dict[str, str]) -> None:
    out = run_in_netns(HERE, "scenario_pinned_tls", {"pki": pki})
    assert out["ok"]["ok"], out["ok"]
    assert out["sni_ok"] == ["granted.test"]
    port = out["ok"]["audit"]["final_target"].split(":")[1]
    assert ["Host", f"granted.test:{port}"] in json.loads(out["ok"]["body"])["headers"]
    assert out["case_dot"]["ok"] and out["sni_all"] == ["granted.test", "granted.test"]
    assert out["case_dot"]["audit"]["final_target"].startswith("granted.test:")
    # Same address, a name the certificate does not cover: the certificate is checked against the name.
    assert out["wrong_name"]["code"] == "handler_error" and "did not verify" in out["wrong_name"]["message"]
    # Without the test CA the default trust store refuses the test certificate.
    assert out["default_ca"]["code"] == "handler_error" and "did not verify" in out["default_ca"]["message"]
    assert out["requests"] == 2


def test_dns_rebinding_is_impossible() -> None:
    out = run_in_netns(HERE, "scenario_rebinding")
    assert out["public_first"]["ok"] and out["public_first"]["body"] == "hello"
    assert out["refused_first"]["code"] == "permission_denied"
    assert out["public_connections_after_refused"] == 1
    assert out["hop"]["code"] == "permission_denied" and "127.0.0.1" in out["hop"]["message"]
    # One resolution per hop: rebind.test once, rebind-first.test once, hop.test twice (two hops).
    assert out["calls"] == ["rebind.test", "rebind-first.test", "hop.test", "hop.test"]
    assert out["trap_connections"] == 0
    assert out["public_connections"] == 2


def test_redirects_are_checked_at_every_hop() -> None:
    out = run_in_netns(HERE, "scenario_redirects")
    for case in ("other_port", "metadata", "not_granted", "name_to_loopback", "ftp", "file", "gopher",
                 "userinfo", "backslash"):
        assert out[case]["code"] == "permission_denied", (case, out[case])
    for case in ("other_port", "metadata", "not_granted", "name_to_loopback"):
        assert out[case]["message"].startswith("redirect from 127.0.0.1:"), out[case]
    assert "port" in out["other_port"]["message"]
    assert "metadata" in out["metadata"]["message"]
    assert "127.0.0.5 of host granted.test is loopback" in out["name_to_loopback"]["message"]
    assert out["other_port_connections"] == 0
    assert out["resolver_calls"] == ["granted.test"]  # notgranted.test was never even resolved
    assert out["relative"]["ok"] and out["relative"]["body"] == "hello"
    assert out["relative"]["audit"]["redirects"] == 1
    assert out["loop"]["code"] == "handler_error" and "redirects" in out["loop"]["message"]
    assert out["no_follow"]["ok"] and out["no_follow"]["status"] == 302
    assert ["Location", "/ok"] in out["no_follow"]["headers"]
    for status, method, body in ((301, "GET", ""), (302, "GET", ""), (303, "GET", ""),
                                 (307, "POST", "data"), (308, "POST", "data")):
        echo = json.loads(out[f"post_{status}"]["body"])
        assert (echo["method"], echo["body"]) == (method, body), status
    cross = {k.lower(): v for k, v in json.loads(out["cross_origin"]["body"])["headers"]}
    assert "authorization" not in cross and "x-api-key" not in cross and "cookie" not in cross
    assert cross["accept"] == "text/plain" and cross["host"].startswith(PUB)
    same = {k.lower(): v for k, v in json.loads(out["same_origin"]["body"])["headers"]}
    assert same["authorization"] == "Bearer s3cret" and same["x-api-key"] == "k3y"


def test_size_caps_and_timeouts() -> None:
    out = run_in_netns(HERE, "scenario_limits")
    assert out["exact"]["ok"] and len(out["exact"]["body"]) == 1000
    assert out["declared"]["code"] == "too_large"
    assert out["chunked"]["code"] == "too_large"
    assert out["request_body"]["code"] == "too_large" and out["request_body_connections"] == 0
    assert out["slow"]["code"] == "timeout"
    assert out["broker_timeout"]["code"] == "timeout"


def test_refusals_of_ports_schemes_and_bad_input() -> None:
    out = run_in_netns(HERE, "scenario_refusals")
    assert out.pop("connections") == 0
    expected = {
        "port": "permission_denied", "ftp": "permission_denied", "file": "permission_denied",
        "gopher": "permission_denied", "no_scheme": "invalid_request", "method": "invalid_request",
        "host_header": "invalid_request", "crlf_header": "invalid_request",
        "bad_header_name": "invalid_request", "transfer_encoding": "invalid_request",
        "not_enabled": "permission_denied", "unknown_arg": "invalid_request",
        "bad_body_type": "invalid_request", "empty_grant": "permission_denied",
        "system_resolver": "permission_denied", "no_answer": "handler_error",
    }
    assert {k: v["code"] for k, v in out.items()} == expected
    assert "loopback" in out["system_resolver"]["message"]
    assert out["no_answer"]["message"] == "host gone.test did not resolve"


def test_proxy_variables_in_the_broker_environment_do_not_apply() -> None:
    out = run_in_netns(HERE, "scenario_proxy_env")
    assert out["result"]["ok"]
    assert out["proxy_connections"] == 0 and out["server_connections"] == 1


def test_handler_meta_and_target() -> None:
    handler = load_network_handler()
    target = handler.META["target"]
    assert target({"url": "https://API.Example.com./v1?key=SECRET"}) == "api.example.com:443"
    assert target({"url": "http://[::1]:8080/"}) == "[::1]:8080"
    assert target({"url": "http://user:pw@example.com/"}) == "invalid URL"
    assert target({"url": 5}) == "invalid URL"
    assert handler.META["requires_scope"] is True


def test_grant_schema_refuses_bad_entries() -> None:
    import msgspec

    schema = load_network_handler().META["grant_schema"]
    good = msgspec.convert({"enabled": True, "allowed_domains": ["*.Example.com", "10.0.0.0/8", "*",
                                                                 "example.com:443", "[fd00::5]:8443"],
                            "allowed_ports": [443]}, schema)
    assert good.enabled
    wide = msgspec.convert({"enabled": True, "allowed_domains": ["0.0.0.0/0", "127.0.0.0/8"],
                            "allow_wide_networks": True}, schema)
    assert wide.allow_wide_networks
    # A ported entry is valid (`example.com:443`); port 0 and a wide CIDR without the flag are not.
    for bad in ({"allowed_domains": ["a.*.com"]}, {"allowed_domains": ["example.com:0"]},
                {"allowed_domains": ["0.0.0.0/0"]}, {"allowed_domains": ["127.0.0.0/8"]},
                {"allowed_ports": [0]}, {"allowed_ports": [70000]}, {"allowed_domains": ["0x7f.1"]},
                {"allowed_domains": ["https://example.com"]}, {"timeout": -1}, {"unknown": 1}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({"enabled": True, **bad}, schema)
