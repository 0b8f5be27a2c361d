"""Audit space and lost outcomes: the stream's size limit and its alarm; `verify` reports decisions with no outcome."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from broker.audit.trail import AuditChain, audit_fields, utc_timestamp, verify_events
from broker.core.workspace import Workspace

from .conftest import connected_pack, running_broker


def event(chain: AuditChain, rid: str, phase: str, *, age: float, decision: str = "allow", **extra: Any) -> dict[str, Any]:
    ts = utc_timestamp(datetime.now(UTC) - timedelta(seconds=age))
    fields = audit_fields(
        request_id=rid, pack_id="p", component_id="p:tool:t", capability="file_write", target="/x",
        decision=decision, code="ok" if decision == "allow" else "permission_denied", duration_ms=1.0,
        phase=phase, extra=extra or None, ts=ts,
    )  # fmt: skip
    return chain.seal(fields)


def test_decisions_without_an_outcome_are_reported_once_old_enough() -> None:
    chain = AuditChain()
    events = [
        event(chain, "done", "decision", age=120),
        event(chain, "done", "outcome", age=119),
        event(chain, "lost", "decision", age=100),  # the broker died before its outcome
        event(chain, "tunnel", "decision", age=100, session=True),  # a session: outcome at close
        event(chain, "read", "complete", age=100),  # a read: one event, nothing to wait for
        event(chain, "refused", "decision", age=100, decision="deny"),
        event(chain, "fresh", "decision", age=1),  # may still be running
        event(chain, "again", "decision", age=90),  # an id reused by the Pack: matched in order
        event(chain, "again", "outcome", age=89),
        event(chain, "again", "decision", age=80),
    ]
    report = verify_events(events)
    assert report.ok
    missing = report.missing_outcomes(older_than=35)
    assert [(rid, chain_id == chain.chain_id) for chain_id, rid, _ in missing] == [("lost", True), ("again", True)]
    assert [rid for _, rid, _ in report.missing_outcomes(older_than=0)] == ["lost", "again", "fresh"]


@pytest.mark.anyio
async def test_the_stream_has_the_configured_size_and_the_broker_alarms_near_it(
    ws: Workspace, nats_server: object, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import broker.service.broker as service
    from broker.bus.server import connect, ensure_audit_stream

    cfg = json.loads(ws.config_file.read_text())
    cfg.update(audit_max_bytes=64 * 1024 * 1024, audit_alarm_ratio=0.000001)  # one event sets it off
    ws.config_file.write_text(json.dumps(cfg))
    await ensure_audit_stream(ws)  # an existing stream takes the new limit
    nc = await connect(ws, "admin")
    try:
        info = json.loads((await nc.request("$JS.API.STREAM.INFO.RUMI_AUDIT", b"", timeout=5)).data)
    finally:
        await nc.close()
    assert info["config"]["max_bytes"] == 64 * 1024 * 1024 and info["config"]["discard"] == "new"
    monkeypatch.setattr(service, "AUDIT_SPACE_POLL", 0.1)
    caplog.set_level(logging.WARNING, logger="rumi.broker")
    async with running_broker(ws) as broker, connected_pack(ws) as pack:
        await pack.context("default:tool:my_tool").env_read("RUMI_DEMO_GREETING")
        with anyio.fail_after(10):
            while not any("ALARM: the audit stream" in r.getMessage() for r in caplog.records):
                await anyio.sleep(0.05)
        used, limit = broker.audit_usage
        assert 0 < used < limit == 64 * 1024 * 1024
