"""`rumi audit tail`: one row per request with its final decision and a REASON; `--wide` full targets;
`--phases` every event.

The folding (`RequestFolder`) is checked on a table of event sequences; the command on the events a real
broker wrote to a real JetStream stream for a real Pack's requests (an action, a read, refusals).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from typer.testing import CliRunner

from broker.admin.audit import NO_OUTCOME, TUNNEL_OPEN, RequestFolder, RequestRow
from broker.audit.trail import AuditChain, audit_fields, utc_timestamp
from broker.core.workspace import Workspace
from pack_runtime import PermissionDenied

from .conftest import connected_pack, running_broker

T0 = datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)


class Events:
    """Sealed events of one chain, each `at` seconds after T0."""

    def __init__(self) -> None:
        self.chain = AuditChain()

    def __call__(
        self, rid: str, phase: str | None, at: float, decision: str = "allow", code: str = "ok", **more: Any
    ) -> dict[str, Any]:
        fields = audit_fields(
            request_id=rid, pack_id="p", component_id="p:tool:t", capability=more.pop("capability", "file_write"),
            target=more.pop("target", f"/x/{rid}"), decision=decision, code=code, duration_ms=more.pop("ms", 1.0),
            phase=None if phase == "checkpoint" else phase, count=more.pop("count", None),
            message=more.pop("message", None), extra=more or None, ts=utc_timestamp(T0 + timedelta(seconds=at)),
        )  # fmt: skip
        if phase == "checkpoint":  # the broker writes these itself, never through audit_fields
            fields.update(phase="checkpoint", pack_id="_broker", capability="checkpoint", component_id="")
        return self.chain.seal(fields)


def fold(events: list[dict[str, Any]], *, horizon: float = 35.0, max_open: int = 10_000) -> list[RequestRow]:
    folder = RequestFolder(horizon=horizon, max_open=max_open)
    rows = [row for e in events for row in folder.add(e)]
    return rows + folder.flush()


def summary(rows: list[RequestRow]) -> list[tuple[str, str, str, str, int]]:
    return [(r.request_id, r.decision, r.code, r.reason, len(r.seqs)) for r in rows]


def test_each_kind_of_request_is_one_row_with_its_final_decision() -> None:
    e = Events()
    rows = fold([
        e("act", "decision", 0),
        e("read", "complete", 1, capability="file_read"),  # one event: decision and outcome at once
        e("act", "outcome", 2, ms=12.5),  # stored after the next request's event
        e("late", "decision", 3),
        e("late", "outcome", 4, decision="deny", code="permission_denied", message="path escapes the grant"),
        e("refused", "decision", 5, decision="deny", code="permission_denied", message="no grant for x"),
        e("flood", None, 6, decision="deny", code="rate_limited", count=250),
        e("failed", "decision", 7),
        e("failed", "outcome", 8, decision="error", code="handler_error", message="no such file"),
    ])  # fmt: skip
    assert summary(rows) == [
        ("act", "allow", "ok", "", 2),
        ("read", "allow", "ok", "", 1),
        ("late", "deny", "permission_denied", "path escapes the grant", 2),  # the outcome's decision
        ("refused", "deny", "permission_denied", "no grant for x", 1),
        ("flood", "deny", "rate_limited", "", 1),
        ("failed", "error", "handler_error", "no such file", 2),
    ]
    assert rows[0].duration_ms == 12.5 and rows[4].count == 250
    assert not any(r.pending for r in rows)


def test_rows_keep_the_order_requests_started_in() -> None:
    e = Events()
    folder = RequestFolder()
    assert folder.add(e("a", "decision", 0)) == []  # held: its outcome is still to come
    assert folder.add(e("b", "decision", 1, decision="deny", code="permission_denied")) == []  # behind a
    shown = folder.add(e("a", "outcome", 2))
    assert [r.request_id for r in shown] == ["a", "b"]


def test_a_request_without_its_outcome_is_shown_once_the_request_timeout_has_passed() -> None:
    e = Events()
    folder = RequestFolder(horizon=35)
    assert folder.add(e("lost", "decision", 0)) == []
    assert folder.add(e("next", "complete", 10)) == []  # held behind `lost`: 10 s is within the horizon
    shown = folder.add(e("later", "complete", 40))
    assert [(r.request_id, r.pending, r.reason) for r in shown] == [
        ("lost", True, NO_OUTCOME),
        ("next", False, ""),
        ("later", False, ""),
    ]
    # Its outcome after all: a row of its own.
    (row,) = folder.add(e("lost", "outcome", 50))
    assert (row.request_id, row.phase, row.pending) == ("lost", "outcome", False)


def test_tunnels_and_reused_request_ids() -> None:
    e = Events()
    rows = fold([
        e("t", "decision", 0, capability="network", session=True),
        e("t", "outcome", 10, capability="network"),  # closed within the horizon: one row
        e("long", "decision", 20, capability="network", session=True),
        e("x", "decision", 21),
        e("x", "decision", 22),  # a Pack reused its request id: paired first in, first out
        e("x", "outcome", 23, decision="error", code="handler_error"),
        e("x", "outcome", 24),
        e("after", "complete", 100),  # the long tunnel is still open
        e("long", "outcome", 3000, capability="network"),
    ])  # fmt: skip
    assert [(r.request_id, r.decision, r.pending, r.reason, len(r.seqs)) for r in rows] == [
        ("t", "allow", False, "", 2),
        ("long", "allow", True, TUNNEL_OPEN, 1),
        ("x", "error", False, "", 2),
        ("x", "allow", False, "", 2),
        ("after", "allow", False, "", 1),
        ("long", "allow", False, "", 1),  # its close, a row of its own
    ]


def test_checkpoints_are_no_requests_but_move_time_on() -> None:
    e = Events()
    folder = RequestFolder(horizon=35)
    assert folder.add(e("lost", "decision", 0)) == []
    checkpoint = e("checkpoint", "checkpoint", 60)
    assert [(r.request_id, r.pending) for r in folder.add(checkpoint)] == [("lost", True)]
    assert folder.flush() == []


def test_an_asked_request_is_one_row_with_the_operators_verdict() -> None:
    e = Events()
    waiting = "waiting up to 20 s for an operator (rumi approve/deny b-1)"
    rows = fold([
        e("yes", "ask", 0, decision="deny", code="approval_pending", message=waiting),
        e("no", "ask", 1, decision="deny", code="approval_pending", message=waiting),
        e("yes", "decision", 2, approval="approved"),
        e("no", "decision", 3, decision="deny", code="permission_denied", message="the operator denied it"),
        e("yes", "outcome", 4),
        e("read", "ask", 5, decision="deny", code="approval_pending", message=waiting),
        e("read", "complete", 6, capability="env_read"),
        e("unanswered", "ask", 7, decision="deny", code="approval_pending", message=waiting),
    ])  # fmt: skip
    assert summary(rows) == [
        ("yes", "allow", "ok", "", 3),
        ("no", "deny", "permission_denied", "the operator denied it", 2),
        ("read", "allow", "ok", "", 2),
        ("unanswered", "deny", "approval_pending", waiting, 1),
    ]
    assert rows[-1].pending and not any(r.pending for r in rows[:-1])


def test_held_rows_are_bounded() -> None:
    e = Events()
    folder = RequestFolder(max_open=3)
    shown = [r for i in range(5) for r in folder.add(e(f"r{i}", "decision", 0))]
    assert [(r.request_id, r.pending) for r in shown] == [("r0", True), ("r1", True)]
    assert len(folder.flush()) == 3


# --- the command, on a real broker's events -----------------------------------------------------------


def tail(ws: Workspace, *args: str) -> tuple[int, str]:
    from broker.cli.audit import audit_app

    done = CliRunner().invoke(audit_app, ["tail", *args, "--root", str(ws.root)])
    assert "Traceback" not in done.output, done.output
    return done.exit_code, done.stdout


@pytest.fixture
def requests_made(ws: Workspace, nats_server: object) -> Workspace:
    """A real Pack's requests through a real broker: a write (decision and outcome), a read (one
    complete event), a refusal on its arguments, and a write the handler refuses late (a deep path)."""
    sandbox = ws.pack_work_area("default")
    deep = sandbox / ("d" * 50) / "a.txt"

    async def run() -> None:
        async with running_broker(ws), connected_pack(ws) as pack:
            ctx = pack.context("default:tool:my_tool")
            await ctx.file_write(f"{sandbox}/note.txt", b"hi")
            assert await ctx.env_read("RUMI_DEMO_GREETING")
            with pytest.raises(PermissionDenied):
                await ctx.file_read("/etc/passwd")
            with pytest.raises(Exception):
                await ctx.file_write(str(deep), b"x")  # its directory does not exist: the handler fails
            await anyio.sleep(0.5)  # outcome events follow their replies

    anyio.run(run)
    return ws


def test_tail_prints_one_row_per_request(requests_made: Workspace) -> None:
    ws = requests_made
    code, out = tail(ws, "--json")
    stored = [json.loads(line) for line in out.splitlines()]
    # --json: the stored events, every phase (the broker signs a checkpoint as it stops: no request).
    events = [e for e in stored if e.get("phase") != "checkpoint"]
    assert code == 0 and len(events) == 6 and [e["phase"] for e in events].count("outcome") == 2
    checkpoints = len(stored) - len(events)

    code, out = tail(ws)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["TS", "PACK", "COMPONENT", "CAPABILITY", "TARGET", "DECISION", "CODE", "MS",
                                "REASON"]  # fmt: skip
    rows = lines[1:]
    assert len(rows) == 4, out
    assert "file_write" in rows[0] and "  allow  " in rows[0] and "note.txt" in rows[0]
    assert "env_read" in rows[1] and "RUMI_DEMO_GREETING" in rows[1] and "  allow  " in rows[1]
    assert (
        "file_read" in rows[2]
        and "  deny  " in rows[2]
        and "path is outside the granted directories" in rows[2]
    )
    # The late failure: one row, the outcome's decision and reason; its long target is cut…
    assert "file_write" in rows[3] and "  error  " in rows[3] and "handler_error" in rows[3]
    deep = f"{ws.pack_work_area('default')}/{'d' * 50}/a.txt"
    assert "…" + deep[-39:] in rows[3] and deep not in rows[3]  # its end: the file
    # …and shown whole with --wide.
    code, wide = tail(ws, "--wide")
    assert code == 0 and deep in wide.splitlines()[4]

    code, out = tail(ws, "--decision", "error")
    assert code == 0 and len(out.splitlines()) == 2 and "handler_error" in out
    code, out = tail(ws, "--decision", "allow")
    assert len(out.splitlines()) == 3  # the write and the read; the failed write's final decision is error
    code, out = tail(ws, "--limit", "1")
    assert len(out.splitlines()) == 2 and "handler_error" in out

    # --phases: every event on its own row, an outcome's decision marked *.
    code, out = tail(ws, "--phases")
    rows = out.splitlines()[1:]
    assert code == 0 and len(rows) == 6 + checkpoints
    assert sum("allow*" in r or "error*" in r for r in rows) == 2
