"""Ask mode against a real nats-server and broker: a request held for an operator is approved, denied,
or times out; each reads correctly in the audit (asked → verdict, with the approver) and verifies."""

from __future__ import annotations

import functools
import getpass
import json
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from typer.testing import CliRunner, Result

from broker.core.workspace import Workspace
from pack_runtime import BrokerError, PermissionDenied

from ._nats_fixtures import Collector, Errors, eventually, settle
from .conftest import connected_pack, running_broker
from .test_broker import audit_events, set_broker_config

pytestmark = pytest.mark.anyio
TOOL = "default:tool:my_tool"


def ask_mode(ws: Workspace, capability: str, **keys: Any) -> None:
    """Put COMPONENT's `capability` entry into ask mode (the seed grant file, edited as JSON)."""
    path = ws.grant_file(TOOL)
    doc = json.loads(path.read_text())
    doc["permissions"][capability].update({"mode": "ask", **keys})
    path.write_text(json.dumps(doc))


async def cli(*args: str) -> Result:
    """`rumi ARGS` in a worker thread (the broker keeps serving in this event loop)."""
    from broker.cli import app

    run = functools.partial(CliRunner().invoke, app, list(args))
    return await anyio.to_thread.run_sync(run)


async def held(ws: Workspace, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """`rumi pending --json` once it lists `count` asks."""
    deadline = time.monotonic() + timeout
    while True:
        out = await cli("pending", "--json", "--root", str(ws.root))
        assert out.exit_code == 0, out.output
        asks: list[dict[str, Any]] = json.loads(out.stdout)
        if len(asks) >= count or time.monotonic() > deadline:
            assert len(asks) == count, asks
            return asks
        await anyio.sleep(0.05)


async def trail_of(ws: Workspace, request_id: str, expect: int) -> list[dict[str, Any]]:
    """The events of one request, once `expect` of them are stored."""
    deadline = time.monotonic() + 5
    while True:
        mine = [e for e in await audit_events(ws, 1) if e.get("request_id") == request_id]
        if len(mine) >= expect or time.monotonic() > deadline:
            return mine
        await anyio.sleep(0.1)


async def verify_passes(ws: Workspace) -> None:
    out = await cli("audit", "verify", "--root", str(ws.root))
    assert out.exit_code == 0, out.output


def steps(events: list[dict[str, Any]]) -> list[tuple[str, str, str, str | None]]:
    return [(e["phase"], e["decision"], e["code"], (e.get("extra") or {}).get("approval")) for e in events]


# -- grant format ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ({"mode": "ask"}, None),
        ({"mode": "allow"}, None),
        ({"mode": "ask", "ask_timeout": 5}, None),
        ({"mode": "ask", "ask_timeout": 27.5}, None),
        (
            {"mode": "sometimes"},
            'mode must be "allow" or "ask", got \'sometimes\' - at `$.permissions.file_write.mode`',
        ),
        ({"mode": True}, 'mode must be "allow" or "ask"'),
        ({"mode": "ask", "ask_timeout": 28}, "ask_timeout must be seconds above 0 and below 28"),
        ({"mode": "ask", "ask_timeout": 30}, "request timeout minus 2 s"),
        ({"mode": "ask", "ask_timeout": 0}, "above 0"),
        ({"mode": "ask", "ask_timeout": -1}, "above 0"),
        ({"mode": "ask", "ask_timeout": "10"}, "got '10' - at `$.permissions.file_write.ask_timeout`"),
        ({"mode": "ask", "ask_timeout": True}, "ask_timeout must be seconds"),
    ],
)
def test_grant_mode_and_ask_timeout_are_checked_at_load(
    ws: Workspace, keys: dict[str, Any], problem: str | None
) -> None:
    from broker.policy.grants import GrantStore
    from broker.policy.plugins import HandlerRegistry

    ask_mode(ws, "file_write")
    path = ws.grant_file(TOOL)
    doc = json.loads(path.read_text())
    doc["permissions"]["file_write"] = {
        "enabled": True,
        "directories": [str(ws.pack_work_area("default"))],
        **keys,
    }
    path.write_text(json.dumps(doc))
    store = GrantStore(ws, HandlerRegistry(ws.handlers))
    (state,) = [s for s in store.files() if s.component_id == TOOL]
    if problem is None:
        assert state.usable, state.errors
        expected = {k: float(v) if k == "ask_timeout" else v for k, v in keys.items()}
        assert {k: state.grants["file_write"][k] for k in keys} == expected
        assert state.grants["file_read"].get("mode") is None  # other entries do not ask
    else:
        assert not state.usable  # the whole file is refused: that component is denied everything
        (error,) = state.errors
        assert problem in str(error) and "\n" not in str(error), str(error)
        assert str(error).startswith("docker/grants/default:tool:my_tool.json: ") or "grants" in str(error)


def test_a_scope_cannot_default_ask_mode(ws: Workspace) -> None:
    from broker.core.errors import ScopeError
    from broker.policy.grants import load_scope_source

    data = json.dumps({"version": "1.0", "description": "x", "default_config": {"mode": "ask"}}).encode()
    with pytest.raises(ScopeError, match=r"`mode` may only be set in a grant"):
        load_scope_source(ws.scopes / "file_write.json", data)


# -- who may list and answer ------------------------------------------------------------------------


async def test_only_the_admin_identity_may_list_answer_or_hear_asks(
    ws: Workspace, nats_server: object
) -> None:
    from broker.bus.server import connect

    listener = await connect(ws, "broker")
    heard = Collector(answer=b"{}")
    await listener.subscribe("rumi.admin.approve.abcdef.*", cb=heard.cb)
    await listener.subscribe("rumi.admin.pending", cb=heard.cb)
    await listener.flush()
    try:
        for name in ("pack-default", "cli", "audit"):
            errs = Errors()
            nc = await connect(ws, name, error_cb=errs.cb)
            await nc.publish("rumi.admin.approve.abcdef.1", b'{"v":1,"answer":"approve"}')
            await errs.wait_for('publish to "rumi.admin.approve.abcdef.1"')
            await nc.publish("rumi.admin.pending", b"")
            await errs.wait_for('publish to "rumi.admin.pending"')
            await nc.subscribe("rumi.admin.asks")
            await errs.wait_for('subscription to "rumi.admin.asks"')
            await settle(nc.flush, listener.flush)
            assert heard.msgs == [], name  # nothing reached the broker
            await nc.close()
        admin = await connect(ws, "admin")
        await admin.request("rumi.admin.approve.abcdef.1", b"{}", timeout=2)
        await admin.request("rumi.admin.pending", b"", timeout=2)
        assert heard.subjects() == ["rumi.admin.approve.abcdef.1", "rumi.admin.pending"]
        await admin.close()
    finally:
        await listener.close()


# -- approved, denied, timed out ----------------------------------------------------------------------


async def test_an_approved_ask_runs_and_the_audit_names_the_approver(
    ws: Workspace, nats_server: object
) -> None:
    ask_mode(ws, "file_write")
    target = ws.pack_work_area("default") / "approved.txt"
    done: dict[str, Any] = {}
    async with running_broker(ws), connected_pack(ws) as pack:

        async def write() -> None:
            await pack.context(TOOL).file_write(str(target), b"approved")
            done["at"] = time.monotonic()

        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            (ask,) = await held(ws, 1)
            assert (ask["pack_id"], ask["component_id"], ask["capability"], ask["target"]) == (
                "default", TOOL, "file_write", str(target),
            )  # fmt: skip
            await anyio.sleep(0.2)
            assert not target.exists() and "at" not in done  # held: nothing has happened
            answered = time.monotonic()
            out = await cli("approve", ask["id"], "--root", str(ws.root))
            assert out.exit_code == 0, out.output
            assert out.stdout.startswith(f"approved {ask['id']}: {TOOL} file_write {target}")
        assert target.read_bytes() == b"approved"
        assert done["at"] >= answered
        out = await cli("pending", "--json", "--root", str(ws.root))
        assert json.loads(out.stdout) == []  # settled asks leave the list
    events = await trail_of(ws, ask["request_id"], 3)
    assert steps(events) == [
        ("ask", "deny", "approval_pending", None),
        ("decision", "allow", "ok", "approved"),
        ("outcome", "allow", "ok", "approved"),
    ]
    assert events[0]["extra"] == {"approval_id": ask["id"], "ask_timeout": 20.0}
    who = {k: events[1]["extra"][k] for k in ("approval_id", "approver", "claimed_os_user")}
    assert who == {"approval_id": ask["id"], "approver": "admin", "claimed_os_user": getpass.getuser()}
    await verify_passes(ws)


async def test_a_denied_ask_is_an_ordinary_deny_for_the_pack(ws: Workspace, nats_server: object) -> None:
    ask_mode(ws, "file_write")
    target = ws.pack_work_area("default") / "denied.txt"
    refused: dict[str, Any] = {}
    async with running_broker(ws), connected_pack(ws) as pack:

        async def write() -> None:
            with pytest.raises(PermissionDenied) as exc:
                await pack.context(TOOL).file_write(str(target), b"no")
            refused["code"], refused["message"] = exc.value.code, str(exc.value)

        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            (ask,) = await held(ws, 1)
            out = await cli("deny", ask["id"], "--root", str(ws.root))
            assert out.exit_code == 0, out.output
            assert out.stdout.startswith(f"denied {ask['id']}")
            # A second answer finds nothing waiting: the first one counted.
            again = await cli("approve", ask["id"], "--root", str(ws.root))
            assert again.exit_code == 1 and again.output.count("\n") == 1, again.output
            assert "no request" in again.output and "Traceback" not in again.output
    assert refused["code"] == "permission_denied" and "operator denied" in refused["message"]
    assert not target.exists()
    events = await trail_of(ws, ask["request_id"], 2)
    await anyio.sleep(0.3)
    events = await trail_of(ws, ask["request_id"], 2)
    assert steps(events) == [  # exactly one deny after the ask, and nothing ran
        ("ask", "deny", "approval_pending", None),
        ("decision", "deny", "permission_denied", "denied"),
    ]
    assert events[1]["extra"]["approver"] == "admin"
    assert events[1]["extra"]["claimed_os_user"] == getpass.getuser()
    await verify_passes(ws)


async def test_an_unanswered_ask_is_denied_at_its_timeout(ws: Workspace, nats_server: object) -> None:
    ask_mode(ws, "file_write", ask_timeout=0.6)
    target = ws.pack_work_area("default") / "late.txt"
    async with running_broker(ws), connected_pack(ws) as pack:
        start = time.monotonic()
        with pytest.raises(PermissionDenied) as exc:
            await pack.context(TOOL).file_write(str(target), b"late")
        waited = time.monotonic() - start
        out = await cli("pending", "--json", "--root", str(ws.root))
        assert json.loads(out.stdout) == []
    assert 0.6 <= waited < 2.0, waited  # a deny at the ask_timeout, not the SDK's timeout
    assert exc.value.code == "permission_denied" and "no operator answered within 0.6 s" in str(exc.value)
    assert not target.exists()
    request_id = next(e["request_id"] for e in await audit_events(ws, 1) if e.get("phase") == "ask")
    events = await trail_of(ws, request_id, 2)
    assert steps(events) == [
        ("ask", "deny", "approval_pending", None),
        ("decision", "deny", "permission_denied", "timed_out"),
    ]
    assert "approver" not in events[1]["extra"]  # nobody answered
    await verify_passes(ws)


async def test_a_grant_revoked_while_waiting_wins_over_the_approval(
    ws: Workspace, nats_server: object
) -> None:
    ask_mode(ws, "file_write", ask_timeout=10)
    target = ws.pack_work_area("default") / "revoked.txt"
    refused: list[str] = []
    async with running_broker(ws), connected_pack(ws) as pack:

        async def write() -> None:
            with pytest.raises(PermissionDenied) as exc:
                await pack.context(TOOL).file_write(str(target), b"no")
            refused.append(str(exc.value))

        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            (ask,) = await held(ws, 1)
            out = await cli("revoke", TOOL, "file_write", "--root", str(ws.root))
            assert out.exit_code == 0, out.output
            await anyio.sleep(0.6)  # the broker's grant watcher sees the revocation
            out = await cli("approve", ask["id"], "--root", str(ws.root))
            assert out.exit_code == 0, out.output
    assert not target.exists() and "no grant for file_write" in refused[0], refused
    events = await trail_of(ws, ask["request_id"], 2)
    assert steps(events) == [
        ("ask", "deny", "approval_pending", None),
        ("decision", "deny", "permission_denied", "approved"),  # approved, then refused: no grant left
    ]
    await verify_passes(ws)


# -- remember, quota, follow, stop, errors ------------------------------------------------------------


async def test_approve_remember_turns_the_ask_into_a_plain_allow(ws: Workspace, nats_server: object) -> None:
    ask_mode(ws, "file_write", ask_timeout=10)
    sandbox = ws.pack_work_area("default")
    async with running_broker(ws), connected_pack(ws) as pack:
        ctx = pack.context(TOOL)
        async with anyio.create_task_group() as tg:
            tg.start_soon(ctx.file_write, str(sandbox / "one.txt"), b"1")
            (ask,) = await held(ws, 1)
            out = await cli("approve", ask["id"], "--remember", "--root", str(ws.root), "--json")
            assert out.exit_code == 0, out.output
        assert json.loads(out.stdout)["remembered"] is True
        entry = json.loads(ws.grant_file(TOOL).read_text())["permissions"]["file_write"]
        assert "mode" not in entry and "ask_timeout" not in entry and entry["enabled"] is True
        await anyio.sleep(0.6)  # the broker's grant watcher picks the change up
        with anyio.fail_after(3):
            await ctx.file_write(str(sandbox / "two.txt"), b"2")  # runs without an operator
    assert (sandbox / "two.txt").read_bytes() == b"2"
    asks = [e for e in await audit_events(ws, 4) if e.get("phase") == "ask"]
    assert len(asks) == 1  # only the first request was held


async def test_remember_edits_the_pack_wide_grant_an_ask_came_from(
    ws: Workspace, nats_server: object
) -> None:
    # The proxy's component has no grant file of its own: the Pack-wide `default:*` entry asks.
    sandbox = ws.pack_work_area("default")
    wide = ws.grant_file("default:*")
    entry = {"enabled": True, "directories": [str(sandbox)], "mode": "ask", "ask_timeout": 10}
    wide.write_text(json.dumps({"component_id": "default:*", "permissions": {"file_write": entry}}))
    own = ws.grant_file("default:pack:_")
    tool_before = ws.grant_file(TOOL).read_bytes()
    async with running_broker(ws), connected_pack(ws) as pack:
        ctx = pack.context()  # default:pack:_
        async with anyio.create_task_group() as tg:
            tg.start_soon(ctx.file_write, str(sandbox / "one.txt"), b"1")
            (ask,) = await held(ws, 1)
            assert ask["component_id"] == "default:pack:_"
            out = await cli("approve", ask["id"], "--remember", "--root", str(ws.root), "--json")
            assert out.exit_code == 0, out.output
        assert json.loads(out.stdout)["remembered"] is True
        written = json.loads(wide.read_text())["permissions"]["file_write"]
        assert written == {"enabled": True, "directories": [str(sandbox)]}  # a plain allow, nothing else
        assert not own.exists(), "remember wrote a grant file the Pack-wide entry does not come from"
        assert ws.grant_file(TOOL).read_bytes() == tool_before
        await anyio.sleep(0.6)  # the broker's grant watcher picks the change up
        with anyio.fail_after(3):
            await ctx.file_write(str(sandbox / "two.txt"), b"2")  # runs without an operator
    assert (sandbox / "two.txt").read_bytes() == b"2"
    asks = [e for e in await audit_events(ws, 4) if e.get("phase") == "ask"]
    assert len(asks) == 1  # only the first request was held


def test_remember_edits_only_the_entry_that_decides(ws: Workspace) -> None:
    from broker.admin.grants import remember_allow

    sandbox = str(ws.pack_work_area("default"))
    wide = ws.grant_file("default:*")
    asking = {"enabled": True, "directories": [sandbox], "mode": "ask"}
    wide.write_text(json.dumps({"component_id": "default:*", "permissions": {"file_write": asking}}))
    before = wide.read_bytes()
    # The tool's own file_write entry (a plain allow) replaces the Pack-wide one: nothing asks for it.
    assert remember_allow(ws, TOOL, "file_write") is False
    assert wide.read_bytes() == before
    # No entry for the capability anywhere: nothing to remember, nothing written.
    assert remember_allow(ws, "default:pack:_", "env_read") is False
    assert not ws.grant_file("default:pack:_").exists() and wide.read_bytes() == before
    # For a component without an entry of its own, the Pack-wide entry is the one that asks.
    assert remember_allow(ws, "default:tool:other", "file_write") is True
    assert json.loads(wide.read_text())["permissions"]["file_write"] == {
        "enabled": True,
        "directories": [sandbox],
    }
    assert not ws.grant_file("default:tool:other").exists()


async def test_held_asks_use_their_packs_in_flight_slots_and_no_thread(
    ws: Workspace, nats_server: object
) -> None:
    set_broker_config(ws, max_in_flight_per_pack=3, threads_per_pack=1)
    ask_mode(ws, "file_write", ask_timeout=10)
    sandbox = ws.pack_work_area("default")
    (sandbox / "r.txt").write_bytes(b"read")
    async with running_broker(ws) as broker, connected_pack(ws) as pack, connected_pack(ws, "other") as other:
        ctx = pack.context(TOOL)
        denied: list[str] = []

        async def write(i: int) -> None:
            try:
                await ctx.file_write(str(sandbox / f"{i}.txt"), b"x")
            except PermissionDenied as exc:
                denied.append(exc.code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(write, 1)
            tg.start_soon(write, 2)
            await held(ws, 2)
            # Two asks wait, the Pack's one handler thread is free: a read runs at once.
            with anyio.fail_after(2):
                assert await ctx.file_read(str(sandbox / "r.txt")) == b"read"
            tg.start_soon(write, 3)
            asks = await held(ws, 3)
            # Its quota (3) is held by its own asks: the next request is refused at once, not queued.
            start = time.monotonic()
            with pytest.raises(BrokerError) as exc:
                await ctx.file_read(str(sandbox / "r.txt"))
            assert exc.value.code == "rate_limited" and time.monotonic() - start < 1.0
            # Another Pack's lane is untouched.
            with pytest.raises(PermissionDenied):
                await other.context("other:tool:t").file_read("/etc/hostname")
            assert broker.approvals.held == 3  # type: ignore[attr-defined]
            for ask in asks:
                out = await cli("deny", ask["id"], "--root", str(ws.root))
                assert out.exit_code == 0, out.output
    assert denied == ["permission_denied"] * 3


async def test_pending_follow_shows_asks_then_their_answers(ws: Workspace, nats_server: object) -> None:
    from broker.admin.approvals import admin_connection, answer, follow_pending

    ask_mode(ws, "file_write", ask_timeout=10)
    path = str(ws.pack_work_area("default") / "f.txt")
    seen: list[tuple[str, str, str]] = []
    refused: list[str] = []
    async with running_broker(ws), connected_pack(ws) as pack, admin_connection(ws) as nc:

        async def write() -> None:
            with pytest.raises(PermissionDenied) as exc:
                await pack.context(TOOL).file_write(path, b"f")
            refused.append(exc.value.code)

        async def follow() -> None:
            async for notice in follow_pending(nc):
                seen.append((notice.event, notice.ask.target, notice.approver))
                if notice.event == "asked":
                    await answer(nc, notice.ask.id, approve=False, claimed_user="ops")
                else:
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            with anyio.fail_after(5):
                await follow()
    assert refused == ["permission_denied"]
    assert seen == [("asked", path, ""), ("denied", path, "admin")]


async def test_rumi_pending_follow_prints_each_ask_and_answer(ws: Workspace, nats_server: object) -> None:
    import subprocess
    import sys

    ask_mode(ws, "file_write", ask_timeout=10)
    path = str(ws.pack_work_area("default") / "g.txt")
    argv = [sys.executable, "-m", "broker.cli", "pending", "--follow", "--json", "--root", str(ws.root)]
    lines: list[dict[str, Any]] = []
    refused: list[str] = []
    async with running_broker(ws), connected_pack(ws) as pack:

        async def write() -> None:
            # Whenever the follower starts, it shows this ask: listed first, or as a live notice.
            with pytest.raises(PermissionDenied) as exc:
                await pack.context(TOOL).file_write(path, b"g")
            refused.append(exc.value.code)

        async def follow(stdout: Any) -> None:
            buffered = b""
            async for chunk in stdout:
                buffered += chunk
                *done, buffered = buffered.split(b"\n")
                for line in done:
                    lines.append(json.loads(line))
                    if lines[-1]["event"] == "asked":
                        out = await cli("deny", lines[-1]["ask"]["id"], "--root", str(ws.root))
                        assert out.exit_code == 0, out.output
                if len(lines) >= 2:
                    return

        async with await anyio.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            try:
                with anyio.fail_after(20):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(write)
                        await follow(proc.stdout)
            finally:
                proc.terminate()
                await proc.wait()
    assert refused == ["permission_denied"]
    assert [(n["event"], n["ask"]["target"], n["approver"]) for n in lines] == [
        ("asked", path, ""),
        ("denied", path, "admin"),
    ]


async def test_a_stopping_broker_denies_what_it_holds(ws: Workspace, nats_server: object) -> None:
    ask_mode(ws, "file_write", ask_timeout=20)
    refused: list[tuple[str, float]] = []
    async with connected_pack(ws) as pack, running_broker(ws) as broker, anyio.create_task_group() as tg:

        async def stop_when_held() -> None:
            await eventually(lambda: broker.approvals.held == 1, timeout=5)  # type: ignore[attr-defined]
            broker.stop()  # type: ignore[attr-defined]

        tg.start_soon(stop_when_held)
        start = time.monotonic()
        try:
            await pack.context(TOOL).file_write(str(ws.pack_work_area("default") / "s.txt"), b"s")
        except PermissionDenied as denied:
            refused.append((str(denied), time.monotonic() - start))
    ((message, waited),) = refused
    assert "the broker is stopping" in message and waited < 5, refused
    events = await audit_events(ws, 2)
    verdicts = [e for e in events if e.get("phase") == "decision"]
    assert [(v["decision"], v["extra"]["approval"]) for v in verdicts] == [("deny", "cancelled")]


async def test_answer_errors_are_one_line_with_their_exit_code(ws: Workspace, nats_server: object) -> None:
    root = str(ws.root)
    out = await cli("pending", "--root", root)
    assert out.exit_code == 3 and "no broker is serving" in out.output  # NATS up, no broker
    async with running_broker(ws) as broker:
        instance = broker.approvals.instance  # type: ignore[attr-defined]
        cases = [
            (["approve", "nonsense"], 2, "must look like 3f9a1c-7"),
            (["deny", "abcdef-1"], 1, "no running broker holds abcdef-1"),
            (["approve", f"{instance}-99"], 1, f"no request {instance}-99 is waiting"),
        ]
        for argv, code, text in cases:
            out = await cli(*argv, "--root", root)
            assert out.exit_code == code, (argv, out.output)
            assert text in out.output and out.output.count("\n") == 1 and "Traceback" not in out.output
        out = await cli("pending", "--root", root)
        assert out.exit_code == 0 and out.stdout == "nothing is waiting for an answer\n"


def test_pending_rows_escape_what_a_pack_chose(tmp_path: Path) -> None:
    from broker.cli.approvals import _row
    from broker.service.approvals import PendingAsk

    ask = PendingAsk(
        id="abcdef-1", request_id="r", pack_id="default", component_id=TOOL, capability="file_write",
        target="/ok\x1b[2K\r/etc/shadow\u202e", asked_at="2026-01-01T00:00:00.000000Z",
        expires_at="2026-01-01T00:00:20.000000Z", ask_timeout=20.0,
    )  # fmt: skip
    row = _row(ask)
    assert "\x1b" not in row and "\r" not in row and "\u202e" not in row
    assert row.endswith("/ok\\x1b[2K\\r/etc/shadow\\u202e")


def test_no_nats_is_exit_3(ws: Workspace) -> None:
    from broker.cli import app

    cfg = json.loads(ws.config_file.read_text())
    cfg["nats_url"] = "nats://127.0.0.1:1"
    ws.config_file.write_text(json.dumps(cfg))
    for argv in (["pending"], ["approve", "abcdef-1"], ["deny", "abcdef-1"]):
        out = CliRunner().invoke(app, [*argv, "--root", str(ws.root)])
        assert out.exit_code == 3 and "cannot reach NATS" in out.output, out.output
