"""Per-Pack NATS identity: credentials, the generated config, and what a Pack's credentials cannot do.

Every NATS test runs the real nats-server (embedded, generated config, nkey users) on a free port in a
tmp workspace with Packs `alpha` and `beta`.  A permission violation does not close the connection:
the client gets an asynchronous error and its request times out, so denials are observed through
error callbacks and short (0.5 s) timeouts, and "nothing arrived" through a flush plus a short pause.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from broker.bus.config import account_name, config_path, render_config, write_config
from broker.bus.creds import ensure_identity, pack_identity, pack_identity_name
from broker.bus.server import (
    EmbeddedServer,
    connect,
    ensure_audit_stream,
    nats_url,
    pid_file,
    reload_running,
    url_file,
)
from broker.core.errors import NatsSetupError
from broker.core.workspace import AccountLimits, RumiConfig, Workspace

from ._nats_fixtures import (
    Collector,
    Errors,
    RawClient,
    eventually,
    free_port,
    make_workspace,
    run,
    running_server,
    settle,
)

STREAM = "RUMI_AUDIT"
PACKS = ("alpha", "beta")


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return make_workspace(tmp_path / "ws", PACKS)


@pytest.fixture
def server(ws: Workspace) -> Any:
    with running_server(ws) as srv:
        yield srv


def request_info(headers: dict[str, str]) -> dict[str, Any]:
    return dict(json.loads(headers["Nats-Request-Info"]))


async def js_api(nc: Any, subject: str, body: bytes = b"") -> dict[str, Any] | None:
    """A JetStream API call; None when it got no answer (denied requests time out)."""
    try:
        msg = await nc.request(subject, body, timeout=0.5)
    except (NatsTimeout, NoRespondersError):
        return None
    return dict(json.loads(msg.data))


# ------------------------------------------------------------------------------------ credentials


def test_identity_seed_file_is_private_and_stable(ws: Workspace) -> None:
    ident = ensure_identity(ws, "broker")
    assert ident.public_key.startswith("U") and len(ident.public_key) == 56
    seed = ident.seed_path.read_bytes().strip()
    assert seed.startswith(b"SU")  # an nkey *user* seed
    assert stat.S_IMODE(ident.seed_path.stat().st_mode) == 0o400
    assert stat.S_IMODE(ident.seed_path.parent.stat().st_mode) == 0o700
    assert ident.seed_path == ws.state / "creds" / "broker.nk"
    again = ensure_identity(ws, "broker")
    assert again.public_key == ident.public_key
    assert ident.seed_path.read_bytes().strip() == seed
    assert not [p for p in ident.seed_path.parent.iterdir() if p.name.endswith(".tmp")]


def test_identities_are_distinct_and_names_checked(ws: Workspace) -> None:
    keys = {ensure_identity(ws, r).public_key for r in ("broker", "admin", "cli", "audit")}
    keys |= {pack_identity(ws, p).public_key for p in PACKS}
    assert len(keys) == 6
    assert pack_identity(ws, "alpha").name == pack_identity_name("alpha") == "pack-alpha"
    for bad in ("root", "../broker", "pack-", "pack-Alpha", "pack-a.b", "", "broker/x"):
        with pytest.raises(NatsSetupError):
            ensure_identity(ws, bad)
    with pytest.raises(NatsSetupError):
        pack_identity(ws, "a.b")


def test_corrupt_seed_is_reported_without_its_content(ws: Workspace) -> None:
    path = ensure_identity(ws, "cli").seed_path
    os.chmod(path, 0o600)
    path.write_text("SUNOTAREALSEEDBUTSECRETLOOKING\n")
    with pytest.raises(NatsSetupError) as err:
        ensure_identity(ws, "cli")
    assert "SECRET" not in str(err.value) and "delete it" in str(err.value)


# ------------------------------------------------------------------------------------------ config


def test_config_is_deterministic_and_valid(ws: Workspace) -> None:
    cfg = RumiConfig()
    packs = ["beta", "alpha", "my-pack", "alpha"]
    text = render_config(ws, cfg, packs, port=4999)
    assert text == render_config(ws, cfg, sorted(set(packs)), port=4999)
    assert '"PACK_my-pack"' in text and text.count('"PACK_alpha": {') == 1
    assert 'sync_interval: "always"' in text and "http_port: 0" in text
    assert str(ws.state / "jetstream") in text
    for name in ("broker", "admin", "cli", "audit", "pack-alpha", "pack-beta", "pack-my-pack"):
        ident = ensure_identity(ws, name)
        assert ident.public_key in text
        assert ident.seed_path.read_text().strip() not in text  # seeds never reach the config
    path = write_config(ws, cfg, packs, port=4999)
    assert path == config_path(ws) == ws.state / "nats" / "nats.conf"
    assert path.read_text() == text
    for pack_ids in (packs, []):  # no Packs at all is a valid config too
        path = write_config(ws, cfg, pack_ids, port=4999)
        check = subprocess.run(
            ["nats-server", "-t", "-c", str(path)], capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0, check.stderr + check.stdout


@pytest.mark.parametrize(
    "change",
    [
        {"nats_host": '127.0.0.1"\nlisten: 0.0.0.0:1'},
        {"nats_host": "bad host"},
        {"jetstream_sync": 'always"\nhttp_port: 8222'},
        {"jetstream_sync": "sometimes"},
        {"limits": AccountLimits(max_payload=0)},
        {"limits": AccountLimits(max_connections=-1)},
        {"nats_port": 70000},
    ],
)
def test_config_refuses_odd_values(ws: Workspace, change: dict[str, Any]) -> None:
    with pytest.raises(NatsSetupError):
        render_config(ws, RumiConfig(**change), PACKS)


@pytest.mark.parametrize("bad", ["Alpha", "a.b", "a b", 'a"', "a\nb", "", "x" * 33, "a>", "*"])
def test_config_refuses_bad_pack_ids(ws: Workspace, bad: str) -> None:
    with pytest.raises(NatsSetupError):
        render_config(ws, RumiConfig(), ["alpha", bad])
    with pytest.raises(NatsSetupError):
        account_name(bad)


def test_config_refuses_unsafe_store_dir(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / 'we"ird', PACKS)
    with pytest.raises(NatsSetupError):
        render_config(ws, RumiConfig(), PACKS)
    assert "/data/js" in render_config(ws, RumiConfig(), PACKS, store_dir="/data/js")


# ------------------------------------------------------------------------------- identity on the bus


def test_request_is_stamped_by_the_server(ws: Workspace, server: EmbeddedServer) -> None:
    async def body() -> None:
        broker = await connect(ws, "broker")
        responder = Collector(answer=b"ok")
        await broker.subscribe("rumi.pack.*.req.>", queue="rumi-broker", cb=responder.cb)
        await broker.flush()
        alpha = await connect(ws, "pack-alpha")
        reply = await alpha.request("rumi.pack.alpha.req.file_read", b"x", timeout=2)
        assert reply.data == b"ok"
        # A forged Nats-Request-Info header is replaced by the server's own.
        forged = json.dumps({"acc": "PACK_beta"})
        headers = {"Nats-Request-Info": forged}
        await alpha.request("rumi.pack.alpha.req.file_read", b"y", timeout=2, headers=headers)
        for subject, reply_to, headers, _ in responder.msgs:
            assert subject == "rumi.pack.alpha.req.file_read"
            assert reply_to.startswith("_R_.")
            assert request_info(headers)["acc"] == account_name("alpha") == "PACK_alpha"
        assert len(responder.msgs) == 2
        await alpha.close()
        await broker.close()

    run(body())


def test_duplicate_forged_headers_are_all_replaced(ws: Workspace, server: EmbeddedServer) -> None:
    """Raw protocol: two forged Nats-Request-Info headers; the broker must see exactly one, the server's."""
    broker = RawClient(server.port, ensure_identity(ws, "broker"))
    alpha = RawClient(server.port, pack_identity(ws, "alpha"))
    try:
        broker.sub("rumi.pack.*.req.>", 1)
        forged = b'Nats-Request-Info: {"acc":"PACK_beta"}\r\n'
        alpha.hpub("rumi.pack.alpha.req.x", "_INBOX.mine", b"NATS/1.0\r\n" + forged + forged + b"\r\n", b"hi")
        subject, reply, headers, data = broker.next_hmsg()
        assert (subject, data) == ("rumi.pack.alpha.req.x", b"hi")
        assert reply.startswith("_R_.")
        assert headers.count(b"Nats-Request-Info") == 1
        assert b'"acc":"PACK_alpha"' in headers and b"PACK_beta" not in headers
    finally:
        alpha.close()
        broker.close()


def test_pack_cannot_speak_as_another_pack(ws: Workspace, server: EmbeddedServer) -> None:
    async def body() -> None:
        broker = await connect(ws, "broker")
        responder = Collector(answer=b"ok")
        await broker.subscribe("rumi.pack.*.req.>", queue="rumi-broker", cb=responder.cb)
        await broker.flush()
        errors = Errors()
        alpha = await connect(ws, "pack-alpha", error_cb=errors.cb)
        denied = ("rumi.pack.beta.req.file_read", "rumi.pack.beta.call.tool.x", "rumi.pack.alpha.call.t.x")
        for subject in denied:
            with pytest.raises((NatsTimeout, NoRespondersError)):
                await alpha.request(subject, b"", timeout=0.5)
            await errors.wait_for(f'publish to "{subject}"')
        # Ordering on one connection: once alpha's allowed request is answered, anything earlier arrived.
        assert (await alpha.request("rumi.pack.alpha.req.x", b"", timeout=2)).data == b"ok"
        await settle(broker.flush)
        assert responder.subjects() == ["rumi.pack.alpha.req.x"]
        assert alpha.is_connected  # a violation does not close the connection
        await alpha.close()
        await broker.close()

    run(body())


async def answered(nc: Any, subject: str, payload: bytes, within: float = 10.0) -> Any:
    """The reply to a request across an account import, allowing the server a moment to route a
    subscription just made (on a loaded machine the first request can still find "no responders")."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            return await nc.request(subject, payload, timeout=2)
        except NoRespondersError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


def test_pack_cannot_listen_to_others(ws: Workspace, server: EmbeddedServer) -> None:
    async def body() -> None:
        errors = Errors()
        alpha = await connect(ws, "pack-alpha", error_cb=errors.cb)
        spy = Collector()
        forbidden = [
            "rumi.pack.beta.call.>",
            "rumi.pack.beta.req.>",
            "rumi.pack.*.req.>",
            "rumi.pack.*.call.>",
            "rumi.audit.>",
            "$SYS.>",
            "$JS.>",
            ">",
        ]
        for subject in forbidden:
            await alpha.subscribe(subject, cb=spy.cb)
            await errors.wait_for(f'subscription to "{subject}"')
        # Traffic that would match: a call to beta's tool, a request from beta, an audit event.
        beta = await connect(ws, "pack-beta")
        beta_tool = Collector(answer=b"beta-result")
        await beta.subscribe("rumi.pack.beta.call.>", cb=beta_tool.cb)
        await beta.flush()
        cli = await connect(ws, "cli")
        assert (await answered(cli, "rumi.pack.beta.call.tool.t", b"args")).data == b"beta-result"
        broker = await connect(ws, "broker")
        await broker.subscribe("rumi.pack.*.req.>", queue="rumi-broker", cb=Collector(answer=b"ok").cb)
        await broker.flush()
        assert (await answered(beta, "rumi.pack.beta.req.x", b"secret")).data == b"ok"
        await broker.publish("rumi.audit.beta.x", b"{}")
        await settle(broker.flush, beta.flush, alpha.flush)
        assert spy.msgs == []
        for nc in (alpha, beta, cli, broker):
            await nc.close()

    run(body())


def test_pack_cannot_touch_audit_jetstream_or_sys(ws: Workspace, server: EmbeddedServer) -> None:
    async def body() -> None:
        await ensure_audit_stream(ws)
        errors = Errors()
        alpha = await connect(ws, "pack-alpha", error_cb=errors.cb)
        await alpha.publish("rumi.audit.alpha.file_read", b'{"decision":"allow"}')
        await errors.wait_for('publish to "rumi.audit.alpha.file_read"')
        denied = [
            f"$JS.API.STREAM.INFO.{STREAM}",
            f"$JS.API.STREAM.DELETE.{STREAM}",
            f"$JS.API.STREAM.PURGE.{STREAM}",
            "$JS.API.STREAM.CREATE.MINE",
            "$JS.API.INFO",
            "$SYS.REQ.SERVER.PING",
            "$SYS.REQ.USER.INFO",
            "$SYS.REQ.ACCOUNT.PACK_alpha.CONNZ",
        ]
        answers = await asyncio.gather(*(js_api(alpha, subject, b"{}") for subject in denied))
        assert answers == [None] * len(denied)
        for subject in denied:
            await errors.wait_for(f'publish to "{subject}"')
        admin = await connect(ws, "admin")
        info = await js_api(admin, f"$JS.API.STREAM.INFO.{STREAM}")
        assert info is not None and info["state"]["messages"] == 0
        await alpha.close()
        await admin.close()

    run(body())


def test_broker_reply_cannot_be_redirected(ws: Workspace, server: EmbeddedServer) -> None:
    """Alpha names someone else's address as the reply subject; the answer still goes only to alpha."""

    async def body() -> None:
        await ensure_audit_stream(ws)
        broker = await connect(ws, "broker")
        responder = Collector(answer=b"broker-answer")
        await broker.subscribe("rumi.pack.*.req.>", queue="rumi-broker", cb=responder.cb)
        await broker.flush()
        beta = await connect(ws, "pack-beta")
        beta_sees = Collector()
        await beta.subscribe("_INBOX.>", cb=beta_sees.cb)
        await beta.subscribe("rumi.pack.beta.call.>", cb=beta_sees.cb)
        audit = await connect(ws, "audit")
        audit_sees = Collector()
        await audit.subscribe("rumi.audit.>", cb=audit_sees.cb)
        await beta.flush()
        await audit.flush()
        alpha = await connect(ws, "pack-alpha")
        targets = [
            "_INBOX.beta-inbox",
            "rumi.pack.beta.call.tool.x",
            "rumi.pack.beta.req.file_read",
            "rumi.audit.beta.file_read",
            "rumi.pack.alpha.req.again",  # would loop the answer back in as a new request
            f"$JS.API.STREAM.DELETE.{STREAM}",
            "$SYS.REQ.SERVER.PING",
        ]
        for target in targets:
            await alpha.publish("rumi.pack.alpha.req.x", b"", reply=target)
        await alpha.flush()
        await eventually(lambda: len(responder.msgs) == len(targets))
        await settle(broker.flush, alpha.flush, pause=0.5)
        # The broker saw only alpha's requests, each with a server-made reply subject.
        assert responder.subjects() == ["rumi.pack.alpha.req.x"] * len(targets)
        for _, reply_to, headers, _ in responder.msgs:
            assert reply_to.startswith("_R_.")
            assert request_info(headers)["acc"] == "PACK_alpha"
        assert beta_sees.msgs == []
        assert audit_sees.msgs == []
        admin = await connect(ws, "admin")
        info = await js_api(admin, f"$JS.API.STREAM.INFO.{STREAM}")
        assert info is not None and info["state"]["messages"] == 0  # and the stream still exists
        for nc in (alpha, beta, audit, broker, admin):
            await nc.close()

    run(body())


def test_cli_calls_pack_tools_only(ws: Workspace, server: EmbeddedServer) -> None:
    async def body() -> None:
        alpha = await connect(ws, "pack-alpha")
        tool = Collector(answer=b"result")
        await alpha.subscribe("rumi.pack.alpha.call.>", cb=tool.cb)
        await alpha.flush()
        errors = Errors()
        cli = await connect(ws, "cli", error_cb=errors.cb)
        reply = await cli.request("rumi.pack.alpha.call.tool.my_tool", b"args", timeout=2)
        assert reply.data == b"result"
        subject, reply_to, headers, _ = tool.msgs[0]
        assert subject == "rumi.pack.alpha.call.tool.my_tool" and reply_to.startswith("_R_.")
        assert request_info(headers)["acc"] == "RUMI"
        denied = ("rumi.pack.alpha.req.file_read", "rumi.audit.alpha.x", f"$JS.API.STREAM.INFO.{STREAM}")
        for subject in denied:
            await cli.publish(subject, b"")
            await errors.wait_for(f'publish to "{subject}"')
        with pytest.raises(NoRespondersError):
            await cli.request("rumi.pack.beta.call.tool.t", b"", timeout=0.5)  # beta is not running
        await alpha.close()
        await cli.close()

    run(body())


# ------------------------------------------------------------------------------------- audit stream


def test_audit_stream_is_append_only_for_the_broker(ws: Workspace, server: EmbeddedServer) -> None:
    async def body() -> None:
        await ensure_audit_stream(ws)
        await ensure_audit_stream(ws)  # idempotent
        errors = Errors()
        broker = await connect(ws, "broker", error_cb=errors.cb)
        js = broker.jetstream()
        ack = await js.publish("rumi.audit.alpha.file_read", b'{"n":1}', headers={"Nats-Msg-Id": "r1"})
        assert (ack.stream, ack.seq) == (STREAM, 1)
        dup = await js.publish("rumi.audit.alpha.file_read", b'{"n":1}', headers={"Nats-Msg-Id": "r1"})
        assert dup.duplicate and dup.seq == 1
        info = await js_api(broker, f"$JS.API.STREAM.INFO.{STREAM}")
        assert info is not None and info["config"]["deny_delete"] and info["config"]["deny_purge"]
        cfg = info["config"]
        assert (cfg["storage"], cfg["discard"], cfg["retention"]) == ("file", "new", "limits")
        assert cfg["max_age"] == 0 and cfg["duplicate_window"] == 120 * 10**9
        shrunk = json.dumps({**cfg, "max_msgs": 1}).encode()
        denied = [
            (f"$JS.API.STREAM.DELETE.{STREAM}", b""),
            (f"$JS.API.STREAM.PURGE.{STREAM}", b""),
            (f"$JS.API.STREAM.UPDATE.{STREAM}", shrunk),
            (f"$JS.API.STREAM.MSG.DELETE.{STREAM}", b'{"seq":1}'),
            (f"$JS.API.STREAM.CREATE.{STREAM}", shrunk),
            (f"$JS.API.CONSUMER.CREATE.{STREAM}", b"{}"),
            ("$JS.API.STREAM.CREATE.OTHER", b'{"name":"OTHER","subjects":["rumi.pack.>"]}'),
        ]
        answers = await asyncio.gather(*(js_api(broker, subject, body) for subject, body in denied))
        assert answers == [None] * len(denied)
        for subject, _ in denied:
            await errors.wait_for(f'publish to "{subject}"')
        admin = await connect(ws, "admin")
        after = await js_api(admin, f"$JS.API.STREAM.INFO.{STREAM}")
        assert after is not None and after["state"]["messages"] == 1 and after["config"]["max_msgs"] == -1
        await broker.close()
        await admin.close()

    run(body())


def test_audit_identity_reads_but_never_writes(ws: Workspace, server: EmbeddedServer) -> None:
    async def body() -> None:
        await ensure_audit_stream(ws)
        broker = await connect(ws, "broker")
        await broker.jetstream().publish("rumi.audit.alpha.x", b'{"n":1}', headers={"Nats-Msg-Id": "a1"})
        errors = Errors()
        audit = await connect(ws, "audit", error_cb=errors.cb)
        js = audit.jetstream()
        ordered = await js.subscribe("rumi.audit.>", ordered_consumer=True)
        assert (await ordered.next_msg(timeout=2)).data == b'{"n":1}'
        pull = await js.pull_subscribe("rumi.audit.>", durable="reader", stream=STREAM)
        msgs = await pull.fetch(1, timeout=2)
        assert msgs[0].data == b'{"n":1}'
        await msgs[0].ack()
        assert (await js.get_msg(STREAM, 1)).data == b'{"n":1}'
        await audit.publish("rumi.audit.alpha.x", b"forged")
        await errors.wait_for('publish to "rumi.audit.alpha.x"')
        denied = (f"$JS.API.STREAM.DELETE.{STREAM}", f"$JS.API.STREAM.PURGE.{STREAM}", "$JS.API.INFO")
        assert await asyncio.gather(*(js_api(audit, s, b"{}") for s in denied)) == [None] * 3
        info = await js_api(audit, f"$JS.API.STREAM.INFO.{STREAM}")
        assert info is not None and info["state"]["messages"] == 1  # the ack deleted nothing
        for nc in (audit, broker):
            await nc.close()

    run(body())


def test_audit_reader_cannot_snoop_or_steer_deliveries(ws: Workspace, server: EmbeddedServer) -> None:
    """The trusted users share RUMI, so each has its own inboxes; and a push consumer the audit user
    creates delivers nothing into the broker's request subjects or a Pack's calls.

    Measured on 2.15.1: JetStream starts pushing only when a subscription on the literal deliver
    subject exists in RUMI.  The broker subscribes with a wildcard and a Pack's call subscription lives
    in its own account, so neither activates such a consumer.  (A consumer aimed at a literal inbox
    does deliver: inbox names are random and, with per-user prefixes, unseen by the audit user.)
    """

    async def body() -> None:
        await ensure_audit_stream(ws)
        broker = await connect(ws, "broker")
        to_broker = Collector()
        await broker.subscribe("rumi.pack.*.req.>", queue="rumi-broker", cb=to_broker.cb)
        await broker.subscribe("rumi.pack.*.req.>", cb=to_broker.cb)
        await broker.jetstream().publish("rumi.audit.alpha.x", b'{"n":1}', headers={"Nats-Msg-Id": "s1"})
        alpha = await connect(ws, "pack-alpha")
        to_alpha = Collector(answer=b"tool-result")
        await alpha.subscribe("rumi.pack.alpha.call.>", cb=to_alpha.cb)
        alpha2 = await connect(ws, "pack-alpha")
        literal = Collector()  # a literal subscription too (in alpha's own account)
        await alpha2.subscribe("rumi.pack.alpha.call.tool.x", cb=literal.cb)
        await alpha2.flush()
        await alpha.flush()
        errors = Errors()
        audit = await connect(ws, "audit", error_cb=errors.cb)
        for other in ("_INBOX.>", "_INBOX.cli.>", "_INBOX.broker.>"):
            await audit.subscribe(other)
            await errors.wait_for(f'subscription to "{other}"')
        to_audit = Collector()
        await audit.subscribe("_INBOX.audit.fixed", cb=to_audit.cb)
        await audit.flush()
        targets = ["rumi.pack.beta.req.file_read", "rumi.pack.alpha.call.tool.x", "_INBOX.audit.fixed"]
        for i, deliver in enumerate(targets):
            config = {"name": f"c{i}", "deliver_subject": deliver, "ack_policy": "none"}
            request = json.dumps({"stream_name": STREAM, "config": config}).encode()
            created = await js_api(audit, f"$JS.API.CONSUMER.CREATE.{STREAM}.c{i}", request)
            assert created is not None and "error" not in created
        await eventually(lambda: len(to_audit.msgs) == 1)  # the control: its own inbox works
        cli = await connect(ws, "cli")
        assert (await cli.request("rumi.pack.alpha.call.tool.x", b"", timeout=2)).data == b"tool-result"
        await settle(broker.flush, alpha.flush, audit.flush, pause=0.5)
        assert to_broker.msgs == []
        # Only the cli's call; no audit event was pushed in as a "call".
        assert [m[3] for m in to_alpha.msgs] == [b""] and [m[3] for m in literal.msgs] == [b""]
        assert to_audit.subjects() == ["rumi.audit.alpha.x"]
        for nc in (broker, alpha, alpha2, audit, cli):
            await nc.close()

    run(body())


def test_existing_unsafe_stream_is_refused(ws: Workspace, server: EmbeddedServer) -> None:
    async def body() -> None:
        admin = await connect(ws, "admin")
        await admin.jetstream().add_stream(name=STREAM, subjects=["rumi.audit.>"], max_age=3600)
        await admin.close()
        with pytest.raises(NatsSetupError, match="unsafe settings"):
            await ensure_audit_stream(ws)

    run(body())


# ------------------------------------------------------------------------------------------ limits


def test_account_limits_are_enforced(ws: Workspace) -> None:
    cfg = RumiConfig(limits=AccountLimits(max_payload=4096, max_connections=2, max_subscriptions=3))

    async def body(srv: EmbeddedServer) -> None:
        broker = await connect(ws, "broker")
        await broker.subscribe("rumi.pack.*.req.>", cb=Collector(answer=b"ok").cb)
        await broker.flush()
        first = await connect(ws, "pack-alpha", max_reconnect_attempts=0)
        second = await connect(ws, "pack-alpha", max_reconnect_attempts=0)
        with pytest.raises(NatsSetupError, match="maximum account active connections"):
            await connect(ws, "pack-alpha", max_reconnect_attempts=0)
        # Beta's account is separate: alpha's full house does not lock beta out.
        beta = await connect(ws, "pack-beta")
        # Payload: at the limit passes, above it the server drops the connection.
        assert (await first.request("rumi.pack.alpha.req.x", b"x" * 4000, timeout=2)).data == b"ok"
        with pytest.raises((NatsTimeout, NoRespondersError)):
            await first.request("rumi.pack.alpha.req.x", b"x" * 5000, timeout=0.5)
        await eventually(lambda: not first.is_connected)
        # Subscriptions: the account-wide cap (3) disconnects the client that exceeds it.
        for i in range(4):
            await second.subscribe(f"_INBOX.s{i}")
        await eventually(lambda: not second.is_connected)
        log = (ws.state / "nats.log").read_text()
        assert "maximum payload exceeded: 5000 vs 4096" in log
        assert "maximum subscriptions exceeded" in log
        for nc in (first, second, beta, broker):
            await nc.close()

    with running_server(ws, cfg) as srv:
        run(body(srv))


# -------------------------------------------------------------------------------- running server


def test_add_and_remove_pack_on_running_server(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", PACKS)

    async def body(srv: EmbeddedServer) -> None:
        pid = srv.pid
        broker = await connect(ws, "broker")
        responder = Collector(answer=b"ok")
        await broker.subscribe("rumi.pack.*.req.>", queue="rumi-broker", cb=responder.cb)
        await broker.flush()
        alpha = await connect(ws, "pack-alpha")
        beta_down = Collector()

        async def beta_disconnected() -> None:
            beta_down.msgs.append(("down", "", {}, b""))

        beta = await connect(ws, "pack-beta", disconnected_cb=beta_disconnected, max_reconnect_attempts=1)
        with pytest.raises(NatsSetupError, match="rejected the credentials"):
            await connect(ws, "pack-gamma")
        make_workspace(ws.root, ["gamma"])
        srv.sync_packs(ws.pack_ids())
        assert srv.pid == pid  # reloaded, not restarted
        gamma = await connect(ws, "pack-gamma")
        assert (await gamma.request("rumi.pack.gamma.req.file_read", b"", timeout=2)).data == b"ok"
        subject, reply_to, headers, _ = responder.msgs[-1]
        assert subject == "rumi.pack.gamma.req.file_read" and reply_to.startswith("_R_.")
        assert request_info(headers)["acc"] == "PACK_gamma"
        # Existing connections kept working through the reloads.
        assert (await alpha.request("rumi.pack.alpha.req.x", b"", timeout=2)).data == b"ok"
        # Removing a Pack cuts its connection off.
        srv.sync_packs(["alpha", "gamma"])
        await eventually(lambda: bool(beta_down.msgs), timeout=5)
        with pytest.raises(NatsSetupError):
            await connect(ws, "pack-beta")
        for nc in (alpha, beta, gamma, broker):
            await nc.close()

    with running_server(ws) as srv:
        run(body(srv))


def test_reload_running_uses_the_pidfile(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", PACKS)

    async def body(srv: EmbeddedServer) -> None:
        broker = await connect(ws, "broker")
        await broker.subscribe("rumi.pack.*.req.>", cb=Collector(answer=b"ok").cb)
        await broker.flush()
        make_workspace(ws.root, ["gamma"])
        # As `rumi dev` does from another process: pidfile, /proc check, rewrite, SIGHUP.
        assert reload_running(ws, ws.pack_ids()) is True
        gamma = await connect(ws, "pack-gamma")
        assert (await gamma.request("rumi.pack.gamma.req.x", b"", timeout=2)).data == b"ok"
        await gamma.close()
        await broker.close()

    with running_server(ws) as srv:
        assert pid_file(ws).read_text().strip() == str(srv.pid)
        assert url_file(ws).read_text().strip() == srv.url == f"nats://127.0.0.1:{srv.port}"
        assert nats_url(ws) == srv.url
        run(body(srv))
    assert not pid_file(ws).exists() and not url_file(ws).exists()


def test_reload_running_never_signals_a_stranger(ws: Workspace) -> None:
    got: list[int] = []
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: got.append(signum))
    try:
        ws.state.mkdir(parents=True, exist_ok=True)
        pid_file(ws).write_text(f"{os.getpid()}\n")  # a live pid that is not a nats-server
        assert reload_running(ws, PACKS) is False
        pid_file(ws).write_text("not-a-pid\n")
        assert reload_running(ws, PACKS) is False
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert got == []
    assert config_path(ws).is_file()  # the config is still written for the next start


def test_nats_url_sources(ws: Workspace) -> None:
    with pytest.raises(NatsSetupError, match="rumi broker"):
        nats_url(ws)
    ws.config_file.write_text(json.dumps({"nats_url": "nats://127.0.0.1:4333"}))
    assert nats_url(ws) == "nats://127.0.0.1:4333"


def test_start_refuses_busy_port_and_second_server(ws: Workspace) -> None:
    port = free_port()
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with pytest.raises(NatsSetupError, match="cannot listen"):
            EmbeddedServer(ws, ws.load_config(), port=port).start()
    with running_server(ws) as srv:
        with pytest.raises(NatsSetupError, match=f"pid {srv.pid}"):
            EmbeddedServer(ws, ws.load_config(), port=free_port()).start()


def test_connect_fails_fast_without_server(ws: Workspace) -> None:
    ws.config_file.write_text(json.dumps({"nats_url": f"nats://127.0.0.1:{free_port()}"}))

    async def body() -> None:
        with pytest.raises(NatsSetupError, match="cannot connect"):
            await connect(ws, "cli", initial_timeout=1)

    run(body())


def test_raw_nats_py_with_pack_seed(ws: Workspace, server: EmbeddedServer) -> None:
    """What a Pack's own code would do: plain nats.connect with its seed file, no Rumi helpers."""

    async def body() -> None:
        errors = Errors()
        nc = await nats.connect(
            server.url, nkeys_seed=str(pack_identity(ws, "alpha").seed_path), error_cb=errors.cb,
            allow_reconnect=False,
        )  # fmt: skip
        await nc.publish("rumi.pack.beta.req.file_read", b"")
        await errors.wait_for('publish to "rumi.pack.beta.req.file_read"')
        await nc.close()

    run(body())


# ------------------------------------------------------------------------------------ Pack status


def _status(pack_id: str, state: str = "alive", seq: int = 1) -> bytes:
    from broker.core.protocol import ENCODER, PackStatus

    return ENCODER.encode(PackStatus(v=1, pack_id=pack_id, state=state, ts=0.0, seq=seq))  # type: ignore[arg-type]


def test_status_config_exports_only_the_packs_own_subject(ws: Workspace) -> None:
    text = render_config(ws, RumiConfig(), PACKS)
    # Each Pack account exports its own status subject as a stream, to RUMI alone; RUMI imports it
    # from that account alone; the Pack may publish that one subject and nothing of another Pack's.
    for pack_id in PACKS:
        assert f'{{stream: "rumi.pack.{pack_id}.status", accounts: ["RUMI"]}}' in text
        assert f'{{stream: {{account: "PACK_{pack_id}", subject: "rumi.pack.{pack_id}.status"}}}}' in text
    assert text.count('stream: "rumi.pack.') == len(PACKS)
    assert '"rumi.pack.*.status"' in text and '"rumi.pack.>' not in text


def test_pack_status_reaches_broker_cli_and_admin_only(ws: Workspace, server: EmbeddedServer) -> None:
    async def body() -> None:
        listeners = {}
        for role in ("broker", "cli", "admin"):
            nc = await connect(ws, role)
            seen = Collector()
            await nc.subscribe("rumi.pack.*.status", cb=seen.cb)
            await nc.flush()
            listeners[role] = (nc, seen)
        errors = {name: Errors() for name in ("audit", "pack-alpha", "pack-beta")}
        spies = {}
        for name, errs in errors.items():
            nc = await connect(ws, name, error_cb=errs.cb)
            spy = Collector()
            subject = "rumi.pack.*.status" if name == "audit" else f"rumi.pack.{name.removeprefix('pack-')}.status"
            await nc.subscribe(subject, cb=spy.cb)
            await errs.wait_for(f'subscription to "{subject}"')
            await nc.subscribe("rumi.pack.alpha.status", cb=spy.cb)
            spies[name] = (nc, spy)
        alpha = spies["pack-alpha"][0]
        await alpha.publish("rumi.pack.alpha.status", _status("alpha"))
        await alpha.flush()
        for role, (_, seen) in listeners.items():
            await eventually(lambda seen=seen: len(seen.msgs) == 1)
            subject, _, _, data = seen.msgs[0]
            assert (subject, data) == ("rumi.pack.alpha.status", _status("alpha")), role
        await settle(*(nc.flush for nc, _ in spies.values()))
        # Neither the audit reader nor any Pack (not even alpha, about itself) hears a status.
        assert {name: spy.msgs for name, (_, spy) in spies.items()} == {n: [] for n in spies}
        for nc, _ in [*listeners.values(), *spies.values()]:
            await nc.close()

    run(body())


def test_pack_cannot_publish_another_packs_status(ws: Workspace, server: EmbeddedServer) -> None:
    from broker.core.protocol import decode_status

    async def body() -> None:
        cli = await connect(ws, "cli")
        seen = Collector()
        await cli.subscribe("rumi.pack.*.status", cb=seen.cb)
        await cli.flush()
        errors = Errors()
        alpha = await connect(ws, "pack-alpha", error_cb=errors.cb)
        for subject in ("rumi.pack.beta.status", "rumi.pack.*.status", "rumi.pack.alpha.status.x",
                        "rumi.pack.alpha.req.status"):
            await alpha.publish(subject, _status("beta"))
            if subject != "rumi.pack.alpha.req.status":  # that one is alpha's own request space
                await errors.wait_for(f'publish to "{subject}"')
        # Raw protocol too: with headers and a reply subject, the server still refuses it.
        raw = RawClient(server.port, pack_identity(ws, "alpha"))
        try:
            with pytest.raises(AssertionError, match=r'Permissions Violation for Publish to "rumi\.pack\.beta\.status"'):
                raw.hpub("rumi.pack.beta.status", "_INBOX.x", b"NATS/1.0\r\nX: y\r\n\r\n", _status("beta"))
        finally:
            raw.close()
        # Alpha may say anything on its own subject; a payload naming beta is still alpha's, and dropped.
        await alpha.publish("rumi.pack.alpha.status", _status("beta", seq=7))
        await alpha.publish("rumi.pack.alpha.status", _status("alpha", seq=8))
        await alpha.flush()
        await eventually(lambda: len(seen.msgs) == 2)
        await settle(cli.flush, alpha.flush)
        assert seen.subjects() == ["rumi.pack.alpha.status", "rumi.pack.alpha.status"]
        heard = [decode_status(subject, data, 0.0) for subject, _, _, data in seen.msgs]
        assert heard[0] is None  # names another Pack: not a status of anyone
        assert heard[1] is not None and (heard[1].pack_id, heard[1].seq) == ("alpha", 8)
        assert alpha.is_connected
        await alpha.close()
        await cli.close()

    run(body())


def test_status_stream_keeps_the_last_status_for_cli_only(ws: Workspace, server: EmbeddedServer) -> None:
    from broker.bus.server import ensure_status_stream, last_statuses

    async def body() -> None:
        await ensure_audit_stream(ws)
        await ensure_status_stream(ws)
        await ensure_status_stream(ws)  # idempotent
        alpha = await connect(ws, "pack-alpha")
        for seq in range(3):
            await alpha.publish("rumi.pack.alpha.status", _status("alpha", seq=seq))
        await alpha.publish("rumi.pack.alpha.status", b"x" * 2000)  # over the stream's message size
        await alpha.flush()
        cli = await connect(ws, "cli")
        heard: dict[str, Any] = {}
        for _ in range(50):
            heard = await last_statuses(cli, ["alpha", "beta"])
            if heard.get("alpha") is not None and heard["alpha"].seq == 2:
                break
            await asyncio.sleep(0.05)
        assert set(heard) == {"alpha"} and heard["alpha"].seq == 2 and heard["alpha"].state == "alive"
        admin = await connect(ws, "admin")
        info = await js_api(admin, "$JS.API.STREAM.INFO.RUMI_STATUS")
        assert info is not None and info["state"]["messages"] == 1  # one per Pack: the last
        assert info["config"]["storage"] == "memory" and info["config"]["max_msgs_per_subject"] == 1
        # The cli reads this stream only: not the audit stream, and it changes nothing.
        errors = Errors()
        cli2 = await connect(ws, "cli", error_cb=errors.cb)
        for subject in ("$JS.API.STREAM.MSG.GET.RUMI_AUDIT", "$JS.API.STREAM.PURGE.RUMI_STATUS",
                        "$JS.API.STREAM.DELETE.RUMI_STATUS", "$JS.API.STREAM.INFO.RUMI_STATUS"):
            assert await js_api(cli2, subject, b"{}") is None
            await errors.wait_for(f'publish to "{subject}"')
        audit_errors = Errors()
        audit = await connect(ws, "audit", error_cb=audit_errors.cb)
        assert await js_api(audit, "$JS.API.STREAM.MSG.GET.RUMI_STATUS", b'{"seq":1}') is None
        assert await last_statuses(audit, ["alpha"], timeout=0.5) == {}
        for nc in (alpha, cli, cli2, admin, audit):
            await nc.close()

    run(body())
