"""The broker against a real nats-server: allow/deny, identity, malformed input, audit, reload, resilience."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.core.workspace import Workspace
from pack_runtime import BrokerError, PermissionDenied

from .conftest import connected_pack, running_broker

pytestmark = pytest.mark.anyio
TOOL = "default:tool:my_tool"


async def audit_events(ws: Workspace, expect: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """All events in the stream once at least `expect` are there (read as the read-only audit user)."""
    from broker.audit.trail import read_events
    from broker.bus.server import connect

    nc = await connect(ws, "audit")
    try:
        deadline = time.monotonic() + timeout
        while True:
            events = [e async for e in read_events(nc, follow=False, pack=None, decision=None)]
            if len(events) >= expect or time.monotonic() > deadline:
                return events
            await anyio.sleep(0.1)
    finally:
        await nc.close()


async def raw_request(ws: Workspace, pack_id: str, capability: str, payload: bytes) -> Any:
    """Send bytes as a Pack with raw nats-py (its own credentials) and decode the reply."""
    from broker.bus.server import connect
    from pack_runtime._wire import REPLY_DECODER

    nc = await connect(ws, f"pack-{pack_id}", max_reconnect_attempts=0)
    try:
        msg = await nc.request(f"rumi.pack.{pack_id}.req.{capability}", payload, timeout=5)
        return REPLY_DECODER.decode(msg.data)
    finally:
        await nc.close()


async def test_allowed_and_denied_requests_are_answered_and_audited(
    ws: Workspace, nats_server: object
) -> None:
    sandbox = ws.pack_work_area("default")
    async with running_broker(ws) as broker, connected_pack(ws) as pack:
        ctx = pack.context(TOOL)
        await ctx.file_write(f"{sandbox}/a.txt", b"hello")
        assert await ctx.file_read(f"{sandbox}/a.txt") == b"hello"
        assert (sandbox / "a.txt").read_bytes() == b"hello"
        with pytest.raises(PermissionDenied):
            await ctx.file_read("/etc/passwd")
        with pytest.raises(PermissionDenied):
            await ctx.file_read(f"{sandbox}/../../.rumi/creds/broker.nk")
        assert await ctx.env_read("RUMI_DEMO_GREETING") == "hello from the broker's secrets file"
        with pytest.raises(PermissionDenied):
            await ctx.env_read("HOME")
        with pytest.raises(BrokerError) as unknown:
            await ctx.request("no_such_capability", {})
        assert unknown.value.code == "unknown_capability"
        # A component of another Pack, or an ungranted component of this one: denied.
        with pytest.raises(PermissionDenied):
            await pack.context("other:tool:x").file_read(f"{sandbox}/a.txt")
        with pytest.raises(PermissionDenied):
            await pack.context().file_read(f"{sandbox}/a.txt")
        chain = broker.chain_id
    events = await audit_events(ws, 11)
    # The broker stopped cleanly: its chain ends with a signed checkpoint covering every event before it.
    *events, last = events
    assert last.get("phase") == "checkpoint" and last["chain"] == chain
    assert last["seq"] == len(events) + 1 and last["extra"]["seq"] == len(events)
    by_request: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_request.setdefault(e["request_id"], []).append(e)
    per_request = [
        (group[0]["capability"], [(e.get("phase"), e["decision"], e["code"]) for e in group])
        for group in by_request.values()
    ]
    refused = [("decision", "deny", "permission_denied")]  # refused on its arguments: one event, deny
    assert per_request == [
        ("file_write", [("decision", "allow", "ok"), ("outcome", "allow", "ok")]),
        ("file_read", [("complete", "allow", "ok")]),  # a read: one event, stored before the data left
        ("file_read", refused),  # /etc/passwd is outside the grant
        ("file_read", refused),  # ../ climbs out of the grant
        ("env_read", [("complete", "allow", "ok")]),
        ("env_read", refused),  # HOME is not granted
        ("no_such_capability", [("decision", "deny", "unknown_capability")]),
        ("file_read", refused),
        ("file_read", refused),
    ]
    read = next(e for e in events if e["capability"] == "file_read" and e.get("phase") == "complete")
    assert read["extra"] == {"bytes": 5}
    assert all(e["chain"] == chain and e["pack_id"] == "default" for e in events)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    for e in events:
        assert "hello from the broker" not in json.dumps(e), "a secret value reached the audit stream"
    assert events[0]["target"] == f"{sandbox}/a.txt"


async def test_request_without_the_servers_account_stamp_is_denied(
    ws: Workspace, nats_server: object
) -> None:
    """Only requests that came through the Pack's account import count as that Pack's."""
    from broker.core.protocol import ENCODER, Request
    from broker.service.broker import Broker
    from broker.service.lanes import stamped_account

    broker = Broker(ws)

    class FakeMsg:
        subject = "rumi.pack.default.req.file_read"
        headers: dict[str, str] = {}
        data = ENCODER.encode(Request(v=1, id="abc", component_id=TOOL, args={"path": "/x"}))

    def check(msg: FakeMsg) -> None:
        # The lane comes from the server-stamped account, as in Broker._admit.
        broker._check_identity(msg, broker.lanes.lane(stamped_account(msg.headers)))  # type: ignore[arg-type]

    with pytest.raises(Exception) as exc:
        check(FakeMsg())
    assert getattr(exc.value, "code", "") == "permission_denied"
    FakeMsg.headers = {"Nats-Request-Info": json.dumps({"acc": "PACK_other"})}
    with pytest.raises(Exception):
        check(FakeMsg())
    FakeMsg.headers = {"Nats-Request-Info": json.dumps({"acc": "PACK_default"})}
    check(FakeMsg())


MALFORMED = [
    b"",
    b"\xc1",  # never-used msgpack byte
    b"garbage that is not msgpack",
    msgspec.msgpack.encode({"v": 1, "id": "a", "component_id": TOOL, "args": {}, "extra": 1}),
    msgspec.msgpack.encode({"v": 1, "id": "a" * 65, "component_id": TOOL}),
    msgspec.msgpack.encode({"v": "1", "id": "a", "component_id": TOOL}),
    msgspec.msgpack.encode({"v": 2, "id": "a", "component_id": TOOL}),
    msgspec.msgpack.encode({"v": 1, "id": "a", "component_id": TOOL, "args": {"path": 12}}),
    msgspec.msgpack.encode({"v": 2**63 - 1, "id": "a", "component_id": TOOL}),
    b"\xcf" + b"\xff" * 8,  # uint64 max
    b"\xa3\xff\xfe\xfd",  # str with invalid UTF-8
    b"\x91" * 100_000 + b"\xc0",  # 100k-deep nested arrays
    # A valid envelope whose args nest 200k levels deep (msgspec raises RecursionError).
    b"\x84"
    + b"".join(msgspec.msgpack.encode(x) for x in ("v", 1, "id", "a", "component_id", TOOL, "args"))
    + b"\x81\xa1x"
    + b"\x91" * 200_000
    + b"\xc0",
    b"\x81\xa1v" + b"\xd9\x05\xff\xfe\xfd\xfc\xfb",
]


def set_broker_config(ws: Workspace, **settings: Any) -> None:
    cfg = json.loads(ws.config_file.read_text())
    cfg["broker"].update(settings)
    ws.config_file.write_text(json.dumps(cfg))


async def test_malformed_messages_get_invalid_request_and_an_audit_event(
    ws: Workspace, nats_server: object
) -> None:
    set_broker_config(ws, refusals_per_second=100)  # each refusal its own event (folding: below)
    async with running_broker(ws):
        for payload in MALFORMED:
            reply = await raw_request(ws, "default", "file_read", payload)
            assert not reply.success
            assert reply.error is not None and reply.error.code == "invalid_request", (payload[:20], reply)
        # Still serving.
        async with connected_pack(ws) as pack:
            await pack.context(TOOL).file_write(f"{ws.pack_work_area('default')}/ok.txt", b"ok")
    events = await audit_events(ws, len(MALFORMED) + 1)
    assert [e["code"] for e in events[: len(MALFORMED)]] == ["invalid_request"] * len(MALFORMED)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    payload=st.one_of(
        st.binary(max_size=512),
        st.builds(
            msgspec.msgpack.encode,
            st.recursive(
                st.none()
                | st.booleans()
                | st.integers(min_value=-(2**63), max_value=2**64 - 1)
                | st.floats()
                | st.text(max_size=20)
                | st.binary(max_size=20),
                lambda children: (
                    st.lists(children, max_size=4)
                    | st.dictionaries(st.text(max_size=8), children, max_size=4)
                ),
                max_leaves=20,
            ),
        ),
    )
)
def test_fuzzed_payloads_never_crash_the_broker(fuzz_system: Workspace, payload: bytes) -> None:
    reply = anyio.run(raw_request, fuzz_system, "default", "file_read", payload)
    assert reply.v == 1
    if not reply.success:
        assert reply.error is not None
        assert reply.error.code in {"invalid_request", "permission_denied", "handler_error"}


@pytest.fixture(scope="module")
def fuzz_system(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One broker subprocess for all fuzz examples (hypothesis reruns the test body many times)."""
    from broker.admin.init import init_workspace

    from .conftest import free_port

    ws = Workspace.at(tmp_path_factory.mktemp("fuzz") / "ws")
    init_workspace(ws)
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "broker", "--root", str(ws.root), "--port", str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_line(proc, "serving")
        yield ws
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_line(proc: subprocess.Popen[bytes], needle: str, timeout: float = 20.0) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode(errors="replace")
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} not seen; output:\n{''.join(seen)}")


async def test_revocation_takes_effect_without_restart(ws: Workspace, nats_server: object) -> None:
    target = f"{ws.pack_work_area('default')}/r.txt"
    async with running_broker(ws), connected_pack(ws) as pack:
        ctx = pack.context(TOOL)
        await ctx.file_write(target, b"1")
        grant = ws.grant_file(TOOL)
        data = json.loads(grant.read_text())
        del data["permissions"]["file_write"]
        grant.write_text(json.dumps(data))
        t0 = time.monotonic()
        while True:
            try:
                await ctx.file_write(target, b"2")
            except PermissionDenied:
                break
            assert time.monotonic() - t0 < 3, "revocation did not take effect within 3 s"
            await anyio.sleep(0.05)
        print(f"revocation took effect after {time.monotonic() - t0:.3f} s")
        # And granting again works without restart.
        data["permissions"]["file_write"] = {
            "enabled": True,
            "directories": [str(ws.pack_work_area("default"))],
        }
        grant.write_text(json.dumps(data))
        t0 = time.monotonic()
        while True:
            try:
                await ctx.file_write(target, b"3")
                break
            except PermissionDenied:
                assert time.monotonic() - t0 < 3
                await anyio.sleep(0.05)
    assert Path(target).read_bytes() == b"3"


async def test_jetstream_unavailable_refuses_and_does_nothing(ws: Workspace, nats_server: object) -> None:
    """With the audit stream gone (core NATS still up), an allowed write is refused and not performed."""
    from broker.bus.server import connect

    target = Path(f"{ws.pack_work_area('default')}/never.txt")
    async with running_broker(ws) as broker, connected_pack(ws) as pack:
        admin = await connect(ws, "admin")
        try:
            # deny_delete/deny_purge protect messages; an admin can still delete the whole stream.
            await admin.request("$JS.API.STREAM.DELETE.RUMI_AUDIT", b"", timeout=5)
        finally:
            await admin.close()
        with pytest.raises(BrokerError) as exc:
            await pack.context(TOOL).file_write(str(target), b"x")
        assert exc.value.code == "unavailable"
        assert not target.exists()
        assert broker.in_flight == 0


async def test_custom_handlers_sync_async_and_failing(ws: Workspace, nats_server: object) -> None:
    (ws.handlers / "echo_async.py").write_text(
        "META = {'requires_scope': False, 'supports_modes': ['sandbox'], 'description': 'echo'}\n"
        "async def execute(context, args):\n"
        "    return {'success': True, 'data': {'args': args, 'pack': context.pack_id}}\n"
    )
    (ws.handlers / "echo_sync.py").write_text(
        "META = {'requires_scope': False, 'supports_modes': ['sandbox'], 'description': 'echo'}\n"
        "def execute(context, args):\n"
        "    return {'success': True, 'data': context.component_id}\n"
    )
    (ws.handlers / "boom.py").write_text(
        "META = {'requires_scope': False, 'supports_modes': ['sandbox'], 'description': 'fails'}\n"
        "def execute(context, args):\n"
        "    raise RuntimeError('secret path /root/.ssh/id_rsa leaked?')\n"
    )
    (ws.handlers / "broken.py").write_text("META = 'not a dict'\ndef execute(c, a): pass\n")
    grant = ws.grant_file(TOOL)
    data = json.loads(grant.read_text())
    for name in ("echo_async", "echo_sync", "boom", "broken"):
        data["permissions"][name] = {"enabled": True}
    data["permissions"]["broken"] = {"enabled": True}
    grant.write_text(json.dumps(data))
    # broken.py is refused at load; the grant file names a handler that is not installed.
    del data["permissions"]["broken"]
    grant.write_text(json.dumps(data))
    async with running_broker(ws), connected_pack(ws) as pack:
        ctx = pack.context(TOOL)
        assert await ctx.request("echo_async", {"x": 1}) == {"args": {"x": 1}, "pack": "default"}
        assert await ctx.request("echo_sync") == TOOL
        with pytest.raises(BrokerError) as exc:
            await ctx.request("boom")
        assert exc.value.code == "handler_error" and "/root" not in exc.value.message
        with pytest.raises(BrokerError) as exc:
            await ctx.request("broken")
        assert exc.value.code == "unknown_capability"
        # requires_scope: False does not mean "no grant".
        with pytest.raises(PermissionDenied):
            await pack.context("default:tool:other").request("echo_sync")


async def test_two_brokers_in_a_queue_group_keep_separate_chains(ws: Workspace, nats_server: object) -> None:
    from broker.audit.trail import verify_events

    # 60 writes at once over two brokers: the queue group may hand one of them more than the default
    # 32-per-Pack quota, which is not what this test is about.
    cfg = json.loads(ws.config_file.read_text())
    cfg["broker"]["max_in_flight_per_pack"] = 64
    ws.config_file.write_text(json.dumps(cfg))
    async with running_broker(ws) as b1, running_broker(ws) as b2, connected_pack(ws) as pack:
        ctx = pack.context(TOOL)
        path = f"{ws.pack_work_area('default')}/q.txt"
        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(ctx.file_write, path, str(i).encode())
        assert b1.served + b2.served == 60
        assert b1.served > 0 and b2.served > 0, (b1.served, b2.served)
        assert b1.chain_id != b2.chain_id
    events = await audit_events(ws, 60)
    report = verify_events(events)
    assert report.ok, report
    assert {e["chain"] for e in events} == {b1.chain_id, b2.chain_id}


async def test_broker_reconnects_after_nats_restart(ws: Workspace, nats_server: Any) -> None:
    path = f"{ws.pack_work_area('default')}/re.txt"
    async with running_broker(ws), connected_pack(ws) as pack:
        ctx = pack.context(TOOL)
        await ctx.file_write(path, b"before")
        nats_server.stop()
        nats_server.start()
        deadline = time.monotonic() + 15
        while True:
            try:
                await ctx.file_write(path, b"after")
                break
            except BrokerError:
                assert time.monotonic() < deadline, "broker did not serve again after the NATS restart"
                await anyio.sleep(0.2)
    assert Path(path).read_bytes() == b"after"


async def test_rate_limit_denies_and_aggregates(ws: Workspace, nats_server: object) -> None:
    cfg = json.loads(ws.config_file.read_text())
    cfg["broker"]["rate_per_second"] = 1.0
    cfg["broker"]["burst"] = 3
    ws.config_file.write_text(json.dumps(cfg))
    codes = []
    async with running_broker(ws), connected_pack(ws) as pack:
        ctx = pack.context(TOOL)
        for _ in range(10):
            try:
                await ctx.env_read("RUMI_DEMO_GREETING")
                codes.append("ok")
            except BrokerError as exc:
                codes.append(exc.code)
    assert codes[:3] == ["ok"] * 3
    assert codes.count("rate_limited") >= 6
    events = await audit_events(ws, 4)
    limited = [e for e in events if e["code"] == "rate_limited"]
    assert limited and sum(e.get("count", 1) for e in limited) == codes.count("rate_limited")
    assert len(limited) < codes.count("rate_limited")


def test_sigterm_drains_in_flight_requests(ws: Workspace) -> None:
    from .conftest import free_port

    (ws.handlers / "slow.py").write_text(
        "import time\n"
        "META = {'requires_scope': False, 'supports_modes': ['sandbox'], 'description': 'slow'}\n"
        "def execute(context, args):\n"
        "    time.sleep(1.5)\n"
        "    return {'success': True, 'data': 'done'}\n"
    )
    data = json.loads(ws.grant_file(TOOL).read_text())
    data["permissions"]["slow"] = {"enabled": True}
    ws.grant_file(TOOL).write_text(json.dumps(data))
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "broker", "--root", str(ws.root), "--port", str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_line(proc, "serving")

        async def slow_call() -> Any:
            async with connected_pack(ws) as pack:
                async with anyio.create_task_group() as tg:
                    result: list[Any] = []

                    async def go() -> None:
                        result.append(await pack.context(TOOL).request("slow"))

                    tg.start_soon(go)
                    await anyio.sleep(0.5)
                    proc.send_signal(signal.SIGTERM)
                return result[0]

        assert anyio.run(slow_call) == "done"
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
