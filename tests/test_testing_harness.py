"""`pack_runtime.testing`: tools run in-process against a fake broker (no NATS, no Docker).

* The fake's grant check agrees with the broker's own handlers (`authorize` of config/handlers/*.py,
  loaded as the broker loads them) on a table of cases, allowed and refused, for files, env, network
  and terminal: the boundary that matters, since the SDK may not import the broker. (Tunnels, the
  in-container proxy's `open`, are not part of the fake: its `network` is `ctx.http`'s fetch.)
* The harness: grants enforced, requests recorded, files in memory, `parents=True`, typed arguments,
  the listing call, errors as a caller sees them, and the SDK's request as it goes on the wire.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from broker.core.errors import RequestError
from pack_runtime import BrokerError, Pack, PermissionDenied, ToolError
from pack_runtime.testing import CallFailed, FakeBroker, authorize

from ._handlers import load_handler

MIB7 = 7 * 1024 * 1024
FILES = {"directories": ["/data", "/srv/out/"], "max_bytes": MIB7}
ENV = {"allowed_keys": ["API_KEY", "OTHER"]}
NET = {"allowed_domains": ["api.example.com", "*.cdn.example.org", "10.1.2.3", "192.168.0.0/16", "2001:db8::/32",
                           "::ffff:172.16.0.0/108", "bücher.example"],
       "allowed_ports": [443, 80]}  # fmt: skip
ANY_NET = {"allowed_domains": ["*"], "allowed_ports": [443, 80, 8080]}
PORTED = {"allowed_domains": ["api.example.com:443", "10.0.0.5:8080", "[fd00::5]:8443", "docs.example.com",
                              "*.cdn.example.org:8443", "10.9.8.0/24:8080"],
          "allowed_ports": [443]}  # fmt: skip
WIDE = {"allow_wide_networks": True, "allowed_ports": [80]}
TERM = {"directories": ["/work", "/data/sub/"], "shell": False}
TERM_SHELL = {**TERM, "shell": True}

CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    # files: beneath a granted directory by components, no climbing out, absolute, a file name to write
    ("file_read", FILES, {"path": "/data/a.txt"}),
    ("file_read", FILES, {"path": "/data"}),
    ("file_read", FILES, {"path": "/data/sub/../b.txt"}),
    ("file_read", FILES, {"path": "/data/../etc/passwd"}),
    ("file_read", FILES, {"path": "/data/sub/../../etc/passwd"}),
    ("file_read", FILES, {"path": "/data/./x/./../y"}),
    ("file_read", FILES, {"path": "/data2/a.txt"}),
    ("file_read", FILES, {"path": "/dat"}),
    ("file_read", FILES, {"path": "/etc/passwd"}),
    ("file_read", FILES, {"path": "data/a.txt"}),
    ("file_read", FILES, {"path": ""}),
    ("file_read", FILES, {"path": "/data/a\0b"}),
    ("file_read", FILES, {"path": "//data//a.txt"}),
    ("file_read", FILES, {"path": "/srv/out/x"}),
    ("file_read", FILES, {"path": "/srv/outside"}),
    ("file_read", FILES, {"path": 3}),
    ("file_read", FILES, {"path": "/data/a", "extra": 1}),
    ("file_read", {"directories": []}, {"path": "/data/a.txt"}),
    ("file_read", {"directories": ["/data/../etc"]}, {"path": "/data/../etc/passwd"}),
    ("file_write", FILES, {"path": "/data/a.txt", "data": b"x"}),
    ("file_write", FILES, {"path": "/data/new/deep/a.txt", "data": b"x"}),
    ("file_write", FILES, {"path": "/data/", "data": b"x"}),
    ("file_write", FILES, {"path": "/data", "data": b"x"}),
    ("file_write", FILES, {"path": "/data/sub/..", "data": b"x"}),
    ("file_write", FILES, {"path": "/data/sub/.", "data": b"x"}),
    ("file_write", FILES, {"path": "/data/../x", "data": b"x"}),
    ("file_write", FILES, {"path": "/elsewhere/a", "data": b"x"}),
    ("file_write", {**FILES, "max_bytes": 3}, {"path": "/data/a", "data": b"1234"}),
    ("file_write", {**FILES, "max_bytes": 3}, {"path": "/etc/a", "data": b"1234"}),
    ("file_write", FILES, {"path": "/data/a", "data": "text, not bytes"}),
    # env: exact key names only
    ("env_read", ENV, {"key": "API_KEY"}),
    ("env_read", ENV, {"key": "api_key"}),
    ("env_read", ENV, {"key": "API_KEY "}),
    ("env_read", ENV, {"key": "HOME"}),
    ("env_read", ENV, {"key": ""}),
    ("env_read", {"allowed_keys": ["*"]}, {"key": "HOME"}),
    ("env_read", {}, {"key": "API_KEY"}),
    # network: names, wildcards, IPs and CIDRs, ports, schemes, special addresses
    ("network", NET, {"method": "GET", "url": "https://api.example.com/v1"}),
    ("network", NET, {"method": "GET", "url": "https://API.Example.COM./v1"}),
    ("network", NET, {"method": "GET", "url": "http://api.example.com:80/"}),
    ("network", NET, {"method": "GET", "url": "https://api.example.com:8443/"}),
    ("network", NET, {"method": "GET", "url": "https://example.com/"}),
    ("network", NET, {"method": "GET", "url": "https://evil-api.example.com/"}),
    ("network", NET, {"method": "GET", "url": "https://a.cdn.example.org/x"}),
    ("network", NET, {"method": "GET", "url": "https://a.b.cdn.example.org/x"}),
    ("network", NET, {"method": "GET", "url": "https://cdn.example.org/x"}),
    ("network", NET, {"method": "GET", "url": "https://10.1.2.3/"}),
    ("network", NET, {"method": "GET", "url": "https://10.1.2.4/"}),
    ("network", NET, {"method": "GET", "url": "https://192.168.7.7/"}),
    ("network", NET, {"method": "GET", "url": "https://172.16.5.5/"}),
    ("network", NET, {"method": "GET", "url": "https://[::ffff:172.16.5.5]/"}),
    ("network", NET, {"method": "GET", "url": "https://[2001:db8::1]/"}),
    ("network", NET, {"method": "GET", "url": "https://xn--bcher-kva.example/"}),
    ("network", NET, {"method": "GET", "url": "ftp://api.example.com/"}),
    ("network", NET, {"method": "GET", "url": "https://user@api.example.com/"}),
    ("network", NET, {"method": "GET", "url": "https://api.example.com\\@evil.com/"}),
    ("network", NET, {"method": "GET", "url": "https://api.example.com /"}),
    ("network", NET, {"method": "GET", "url": "api.example.com/v1"}),
    ("network", NET, {"method": "GET", "url": "https://api.example.com:0/"}),
    ("network", NET, {"method": "GET", "url": "https://api.example.com:99999/"}),
    ("network", NET, {"method": "GET"}),
    ("network", ANY_NET, {"method": "GET", "url": "https://anything.example.net/"}),
    ("network", ANY_NET, {"method": "GET", "url": "http://127.0.0.1:8080/"}),
    ("network", ANY_NET, {"method": "GET", "url": "http://169.254.169.254/latest/meta-data/"}),
    ("network", ANY_NET, {"method": "GET", "url": "http://[::1]/"}),
    ("network", ANY_NET, {"method": "GET", "url": "http://[fe80::1]/"}),
    ("network", ANY_NET, {"method": "GET", "url": "http://[64:ff9b::a00:1]/"}),
    ("network", ANY_NET, {"method": "GET", "url": "http://[2002:a00:1::]/"}),
    ("network", ANY_NET, {"method": "GET", "url": "http://[2606:4700::1111]/"}),
    ("network", ANY_NET, {"method": "GET", "url": "http://8.8.8.8/"}),
    ("network", ANY_NET, {"method": "GET", "url": "http://100.64.0.1/"}),
    ("network", ANY_NET, {"method": "GET", "url": "http://0x7f.1/"}),
    ("network", ANY_NET, {"method": "GET", "url": "http://127.1/"}),
    ("network", ANY_NET, {"method": "GET", "url": "http://localhost:8080/"}),
    ("network", {"allowed_domains": ["127.0.0.1"], "allowed_ports": [8080]}, {"method": "GET", "url": "http://127.0.0.1:8080/"}),
    ("network", {"allowed_domains": ["localhost"], "allowed_ports": [8080]}, {"method": "GET", "url": "http://localhost:8080/"}),
    ("network", {"allowed_domains": [], "allowed_ports": []}, {"method": "GET", "url": "https://api.example.com/"}),
    # network: entries with their own port cover that port only, whatever allowed_ports says
    ("network", PORTED, {"method": "GET", "url": "https://api.example.com/"}),
    ("network", PORTED, {"method": "GET", "url": "https://api.example.com:8080/"}),
    ("network", PORTED, {"method": "GET", "url": "http://10.0.0.5:8080/"}),
    ("network", PORTED, {"method": "GET", "url": "https://10.0.0.5/"}),
    ("network", PORTED, {"method": "GET", "url": "https://[fd00::5]:8443/"}),
    ("network", PORTED, {"method": "GET", "url": "https://[fd00::5]/"}),
    ("network", PORTED, {"method": "GET", "url": "https://docs.example.com/"}),
    ("network", PORTED, {"method": "GET", "url": "https://docs.example.com:8080/"}),
    ("network", PORTED, {"method": "GET", "url": "https://a.cdn.example.org:8443/"}),
    ("network", PORTED, {"method": "GET", "url": "https://a.cdn.example.org/"}),
    ("network", PORTED, {"method": "GET", "url": "http://10.9.8.7:8080/"}),
    ("network", PORTED, {"method": "GET", "url": "http://10.9.9.9:8080/"}),
    ("network", PORTED, {"method": "GET", "url": "http://127.0.0.1:8080/"}),
    ("network", {"allowed_domains": ["*:443"], "allowed_ports": [80]}, {"method": "GET", "url": "https://any.example.net/"}),
    ("network", {"allowed_domains": ["*:443"], "allowed_ports": [80]}, {"method": "GET", "url": "http://any.example.net/"}),
    ("network", {"allowed_domains": ["*:443"]}, {"method": "GET", "url": "https://127.0.0.1/"}),
    # network: a grant the broker would refuse (bad port, bad bracket, not a port number) fails, never allows
    ("network", {"allowed_domains": ["example.com:0"]}, {"method": "GET", "url": "https://example.com/"}),
    ("network", {"allowed_domains": ["example.com:99999"]}, {"method": "GET", "url": "https://example.com/"}),
    ("network", {"allowed_domains": ["[fd00::5"]}, {"method": "GET", "url": "https://example.com/"}),
    ("network", {"allowed_domains": ["[example.com]:443"]}, {"method": "GET", "url": "https://example.com/"}),
    ("network", {"allowed_domains": ["example.com"], "allowed_ports": ["443"]}, {"method": "GET", "url": "https://example.com/"}),
    ("network", {"allowed_domains": ["example.com"], "allowed_ports": [0]}, {"method": "GET", "url": "https://example.com/"}),
    # network: wide or special CIDRs only with allow_wide_networks
    ("network", {"allowed_domains": ["0.0.0.0/0"], "allowed_ports": [80]}, {"method": "GET", "url": "http://8.8.8.8/"}),
    ("network", {**WIDE, "allowed_domains": ["0.0.0.0/0"]}, {"method": "GET", "url": "http://8.8.8.8/"}),
    ("network", {"allowed_domains": ["127.0.0.0/8"], "allowed_ports": [80]}, {"method": "GET", "url": "http://127.0.0.2/"}),
    ("network", {**WIDE, "allowed_domains": ["127.0.0.0/8"]}, {"method": "GET", "url": "http://127.0.0.2/"}),
    ("network", {"allowed_domains": ["169.254.0.0/24"], "allowed_ports": [80]}, {"method": "GET", "url": "http://169.254.0.1/"}),
    ("network", {"allowed_domains": ["10.0.0.0/8"], "allowed_ports": [80]}, {"method": "GET", "url": "http://10.20.30.40/"}),
    ("network", {"allowed_domains": ["10.0.0.0/7"], "allowed_ports": [80]}, {"method": "GET", "url": "http://10.20.30.40/"}),
    ("network", {"allowed_domains": ["0.0.0.0"], "allowed_ports": [80]}, {"method": "GET", "url": "http://0.0.0.0/"}),
    ("network", {"allowed_domains": ["::/0"], "allowed_ports": [80]}, {"method": "GET", "url": "http://[2606:4700::1111]/"}),
    ("network", {**WIDE, "allowed_domains": ["::/0"]}, {"method": "GET", "url": "http://[2606:4700::1111]/"}),
    ("network", {"allowed_domains": ["2002::/16"], "allowed_ports": [80]}, {"method": "GET", "url": "http://[2002:808:808::]/"}),
    ("network", {"allowed_domains": ["fd00::/16"], "allowed_ports": [80]}, {"method": "GET", "url": "http://[fd00::9]/"}),
    ("network", {"allowed_domains": ["::ffff:127.0.0.0/104"], "allowed_ports": [80]}, {"method": "GET", "url": "http://127.0.0.2/"}),
    ("network", {"allowed_domains": ["169.254.169.254"], "allowed_ports": [80]}, {"method": "GET", "url": "http://169.254.169.254/"}),
    # network: tunnels (`open`, the proxy's CONNECT) reach port 443 only unless plaintext_tunnel
    ("network", NET, {"op": "open", "host": "api.example.com", "port": 443}),
    ("network", NET, {"op": "open", "host": "api.example.com", "port": 80}),
    ("network", {**NET, "plaintext_tunnel": True}, {"op": "open", "host": "api.example.com", "port": 80}),
    ("network", NET, {"op": "open", "host": "example.com", "port": 443}),
    ("network", NET, {"op": "open", "host": "10.1.2.3", "port": 443}),
    ("network", PORTED, {"op": "open", "host": "10.0.0.5", "port": 8080}),
    ("network", {**PORTED, "plaintext_tunnel": True}, {"op": "open", "host": "10.0.0.5", "port": 8080}),
    ("network", NET, {"op": "open", "host": "2001:db8::1", "port": 443}),
    ("network", NET, {"op": "open", "host": "api.example.com:443", "port": 443}),
    ("network", NET, {"op": "open", "host": "api.example.com", "port": 0}),
    ("network", NET, {"op": "open", "host": "api.example.com"}),
    ("network", NET, {"op": "open", "host": "api.example.com", "port": 443, "url": "https://x/"}),
    ("network", NET, {"op": "fetch", "method": "GET", "url": "https://api.example.com/", "host": "x"}),
    ("network", NET, {"op": "send", "tunnel": "t1", "data": b"x"}),
    ("network", NET, {"op": "bogus"}),
    # terminal: cwd beneath a grant, no shell without `shell: true`
    ("terminal", TERM, {"argv": ["ls", "-la"], "cwd": "/work"}),
    ("terminal", TERM, {"argv": ["ls"]}),
    ("terminal", TERM, {"argv": ["ls"], "cwd": "/data/sub/x"}),
    ("terminal", TERM, {"argv": ["ls"], "cwd": "/data"}),
    ("terminal", TERM, {"argv": ["ls"], "cwd": "/work/../etc"}),
    ("terminal", TERM, {"argv": ["ls"], "cwd": "work"}),
    ("terminal", TERM, {"argv": ["sh", "-c", "id"], "cwd": "/work"}),
    ("terminal", TERM, {"argv": ["/usr/bin/python3", "x.py"], "cwd": "/work"}),
    ("terminal", TERM, {"argv": ["env", "FOO=1", "bash"], "cwd": "/work"}),
    ("terminal", TERM_SHELL, {"argv": ["sh", "-c", "id"], "cwd": "/work"}),
    ("terminal", TERM, {"argv": [""], "cwd": "/work"}),
    ("terminal", TERM, {"argv": []}),
    ("terminal", {"directories": []}, {"argv": ["ls"]}),
]  # fmt: skip


def broker_outcome(capability: str, grant: dict[str, Any], args: dict[str, Any]) -> str:
    handler = load_handler(capability)
    try:
        converted = handler.plugin.convert_args(args)
        if handler.plugin.authorize is not None:
            handler.plugin.authorize(grant, converted)
    except RequestError as exc:
        return exc.code
    return "ok"


def fake_outcome(capability: str, grant: dict[str, Any], args: dict[str, Any]) -> str:
    try:
        authorize(capability, grant, args)
    except BrokerError as exc:
        return exc.code
    return "ok"


@pytest.mark.parametrize(("capability", "grant", "args"), CASES)
def test_fake_broker_decides_like_the_broker(
    capability: str, grant: dict[str, Any], args: dict[str, Any]
) -> None:
    expected = broker_outcome(capability, {**grant, "enabled": True}, args)
    assert fake_outcome(capability, {**grant, "enabled": True}, args) == expected


def test_the_table_covers_allowed_and_refused_for_every_capability() -> None:
    seen: dict[str, set[str]] = {}
    for capability, grant, args in CASES:
        seen.setdefault(capability, set()).add(broker_outcome(capability, {**grant, "enabled": True}, args))
    for capability in ("file_read", "file_write", "env_read", "network", "terminal"):
        assert {"ok", "permission_denied"} <= seen[capability], (capability, seen[capability])
    assert "invalid_request" in seen["file_read"] and "too_large" in seen["file_write"]


# ------------------------------------------------------------------------------------- the harness


class Note(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    text: str = ""


def notes_pack() -> Pack:
    pack = Pack()  # no id, no NATS: as a Pack's main.py is imported by its tests

    @pack.tool("save")
    async def save(ctx: Any, args: Note) -> dict[str, Any]:
        """Save a note under /notes/<name>."""
        if not args.name:
            raise ToolError("empty_name", "name must not be empty")
        return await ctx.file_write(f"/notes/{args.name}", args.text, parents=True)

    @pack.tool("load")
    async def load(ctx: Any, args: Note) -> str:
        return (await ctx.file_read(f"/notes/{args.name}")).decode()

    @pack.tool("probe")
    async def probe(ctx: Any, args: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for label, make in (
            ("key", lambda: ctx.env_read("API_KEY")),
            ("home", lambda: ctx.env_read("HOME")),
            ("api", lambda: ctx.http("GET", "https://api.example.com/v1")),
            ("meta", lambda: ctx.http("GET", "http://169.254.169.254/")),
            ("ls", lambda: ctx.terminal(["ls"], cwd="/notes")),
            ("custom", lambda: ctx.request("my_handler", {"x": 1})),
            ("missing", lambda: ctx.request("no_such_handler", {})),
        ):
            try:
                out[label] = await make()
            except PermissionDenied as exc:
                out[label] = f"denied: {exc.message}"
            except BrokerError as exc:
                out[label] = f"{exc.code}: {exc.message}"
        return out

    return pack


def test_harness_runs_a_tool_with_grants_and_records_requests() -> None:
    pack = notes_pack()
    broker = FakeBroker(pack_id="notes", grants={"file_write": {"directories": ["/notes"]},
                                                  "file_read": {"directories": ["/notes"]}})  # fmt: skip
    assert broker.call_sync(pack, "save", {"name": "a.txt", "text": "hi"}) == {"bytes_written": 2}
    assert broker.files == {"/notes/a.txt": b"hi"}
    assert broker.call_sync(pack, "load", {"name": "a.txt"}) == "hi"
    assert [(r.component_id, r.capability, r.code) for r in broker.requests] == [
        ("notes:tool:save", "file_write", "ok"),
        ("notes:tool:load", "file_read", "ok"),
    ]
    # What the SDK put on the wire: parents only when asked (a plain write stays valid for any broker).
    assert broker.requests[0].args == {"path": "/notes/a.txt", "data": b"hi", "parents": True}
    assert pack.pack_id == ""  # the harness lent its id for the call only


def test_a_components_own_entry_replaces_the_pack_wide_one() -> None:
    pack = Pack()

    @pack.tool("a")
    async def a(ctx: Any, args: dict[str, Any]) -> Any:
        return await ctx.file_read("/data/x.txt")

    @pack.tool("b")
    async def b(ctx: Any, args: dict[str, Any]) -> Any:
        return await ctx.file_read("/data/x.txt")

    @pack.tool("c")
    async def c(ctx: Any, args: dict[str, Any]) -> Any:
        return await ctx.file_read("/data/x.txt")

    broker = FakeBroker(
        grants={"file_read": {"directories": ["/data"]}},  # Pack-wide, as `<pack_id>:*`
        component_grants={
            "pack:tool:b": {"file_read": {"directories": ["/other"]}},  # replaces, never merged
            "pack:tool:c": {"file_read": {"enabled": False}},  # switched off for this one component
        },
        files={"/data/x.txt": b"x"},
    )
    assert broker.call_sync(pack, "a") == b"x"
    for name, message in (("b", "path is outside the granted directories"), ("c", "no grant for file_read")):
        with pytest.raises(CallFailed) as failed:
            broker.call_sync(pack, name)
        assert failed.value.code == "permission_denied" and message in failed.value.message, name
    assert [(r.component_id, r.code) for r in broker.requests] == [
        ("pack:tool:a", "ok"),
        ("pack:tool:b", "permission_denied"),
        ("pack:tool:c", "permission_denied"),
    ]


def test_parents_creates_directories_inside_the_grant_only() -> None:
    pack = Pack()

    @pack.tool("write")
    async def write(ctx: Any, args: dict[str, Any]) -> Any:
        return await ctx.file_write(args["path"], b"x", parents=bool(args.get("parents")))

    broker = FakeBroker(grants={"file_write": {"directories": ["/out"]}})
    with pytest.raises(CallFailed) as failed:
        broker.call_sync(pack, "write", {"path": "/out/a/b/c.txt"})
    assert (failed.value.code, failed.value.message) == ("handler_error", "no such file")
    assert broker.call_sync(pack, "write", {"path": "/out/a/b/c.txt", "parents": True}) == {
        "bytes_written": 1
    }
    assert broker.directories == {"/out/a", "/out/a/b"} and "/out/a/b/c.txt" in broker.files
    assert broker.call_sync(pack, "write", {"path": "/out/a/d.txt"}) == {"bytes_written": 1}  # exists now
    with pytest.raises(CallFailed) as failed:
        broker.call_sync(pack, "write", {"path": "/elsewhere/x/y", "parents": True})
    assert failed.value.code == "permission_denied"
    with pytest.raises(CallFailed) as failed:
        broker.call_sync(pack, "write", {"path": "/out/a/b/c.txt/z", "parents": True})
    assert failed.value.message == "a component of the path is not a directory"
    assert "/elsewhere/x" not in broker.directories


def test_harness_enforces_every_capability() -> None:
    calls: list[tuple[Any, ...]] = []

    def terminal(argv: list[str], cwd: str, stdin: bytes | None) -> dict[str, Any]:
        calls.append((argv, cwd))
        return {"exit_code": 0, "stdout": b"a.txt\n"}

    broker = FakeBroker(
        pack_id="notes",
        grants={
            "env_read": {"allowed_keys": ["API_KEY"]},
            "network": {"allowed_domains": ["*"], "allowed_ports": [443, 80]},
            "terminal": {"directories": ["/notes"]},
            "my_handler": {"enabled": True},
        },
        env={"API_KEY": "k-123", "HOME": "/root"},
        http={"GET https://api.example.com/v1": {"status": 201, "headers": {"x": "1"}, "body": "ok"}},
        terminal=terminal,
        handlers={"my_handler": lambda grant, args: {"got": args["x"]}},
    )
    out = broker.call_sync(notes_pack(), "probe", {})
    assert out["key"] == "k-123"
    assert out["home"] == "denied: key is not granted"
    assert out["api"] == {"status": 201, "headers": [["x", "1"]], "body": b"ok"}
    assert out["meta"].startswith("denied: address 169.254.169.254")  # `*` never reaches metadata
    assert out["ls"]["stdout"] == b"a.txt\n" and calls == [(["ls"], "/notes")]
    assert out["custom"] == {"got": 1}
    assert out["missing"] == "unknown_capability: unknown capability 'no_such_handler'"
    codes = {r.capability: r.code for r in broker.requests}
    assert codes["network"] == "permission_denied" and codes["terminal"] == "ok"


def test_no_grant_denies_and_disabled_entries_do_not_count() -> None:
    broker = FakeBroker(
        grants={"env_read": {"enabled": False, "allowed_keys": ["API_KEY"]}}, env={"API_KEY": "v"}
    )
    out = broker.call_sync(notes_pack(), "probe", {})
    assert out["key"].startswith("denied: no grant for env_read on component pack:tool:probe")
    assert out["api"].startswith("denied: no grant for network")
    assert all(not r.allowed for r in broker.requests)


def test_errors_come_back_as_the_caller_sees_them() -> None:
    pack = notes_pack()
    broker = FakeBroker(grants={"file_read": {"directories": ["/notes"]}})
    with pytest.raises(CallFailed) as failed:
        broker.call_sync(pack, "save", {"name": ""})
    assert (failed.value.code, failed.value.message) == ("tool:empty_name", "name must not be empty")
    with pytest.raises(CallFailed) as failed:
        broker.call_sync(pack, "save", {"text": "no name"})
    assert failed.value.code == "invalid_request" and "`name`" in failed.value.message
    assert broker.requests == []  # refused before the tool ran
    with pytest.raises(CallFailed) as failed:
        broker.call_sync(pack, "load", {"name": "missing.txt"})
    assert (failed.value.code, failed.value.message) == (
        "handler_error",
        "no such file",
    )  # the tool let it through
    with pytest.raises(CallFailed) as failed:
        broker.call_sync(pack, "save", {"name": "x"})  # no file_write grant
    assert failed.value.code == "permission_denied"


@pytest.mark.anyio
async def test_listing_gives_each_tool_with_its_schema() -> None:
    listing = await FakeBroker(pack_id="notes").list_tools(notes_pack())
    tools = {t.name: t for t in listing.tools}
    assert listing.pack_id == "notes" and sorted(tools) == ["load", "probe", "save"]
    assert tools["save"].component_id == "notes:tool:save"
    assert tools["save"].description == "Save a note under /notes/<name>."
    note = tools["save"].args_schema["$defs"]["Note"]
    assert note["required"] == ["name"] and note["properties"]["text"] == {"type": "string", "default": ""}
    assert tools["probe"].args_schema == {"type": "object"}
