"""`rumi audit verify` reports allowed decisions whose outcome was never recorded (a crash in between)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from broker.audit.trail import AuditChain, audit_fields, utc_timestamp, verify_events


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
