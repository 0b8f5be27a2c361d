"""`rumi explain REQUEST_ID`: what the broker decided on one request, why, and what would allow it now.

The request's events are read from the audit stream as the read-only `audit` identity (every phase:
`decision`, `outcome`, `complete`, and a flood aggregate whose first request it was). The rule is named
from the recorded code and message (`broker.admin.check.rule_of`); the fix is `rumi check` run now,
against the current grants, with the arguments the event records (`target`: a path, a key name,
`host:port` or `argv[0]`), so it may differ from what the grants said at the time, and says so. The
grant file named is the one that decides now (`rumi check`'s: the component's own, or its Pack's
`<pack_id>:*`); "changed since" looks at both, as either can change the decision.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.admin.check import (
    CheckUsageError,
    Fix,
    Verdict,
    args_from_target,
    check_request,
    load_policy,
    rule_of,
)
from broker.core.errors import EXIT_DENIED, RumiError
from broker.core.ids import pack_wide_id, parse_component_id
from broker.core.workspace import Workspace

__all__ = ["Explanation", "RequestNotFound", "explain_request", "find_request_events"]

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class RequestNotFound(RumiError):
    """No audit event carries the request id."""

    exit_code = EXIT_DENIED


@dataclass(frozen=True)
class Found:
    """The events of one request, and what the search read."""

    events: list[dict[str, Any]]  # in stream order: decision, outcome / complete; or one aggregate
    scanned: int
    aggregates: int  # aggregate refusal events seen (each names only its first request)


async def find_request_events(ws: Workspace, request_id: str, *, pack: str | None = None) -> Found:
    """Every stored event whose `request_id` is `request_id` (one Pack's only, when `pack` is given).

    NatsSetupError (no NATS), AuditError (no stream, reading failed), CheckUsageError (a bad id).
    """
    from broker.admin.audit import audit_connection
    from broker.audit.trail import read_stored

    if not REQUEST_ID_RE.match(request_id):
        raise CheckUsageError(
            f"request id {request_id!r} is not one (1-64 characters of A-Z a-z 0-9 _ . -): copy it "
            "from `rumi audit tail`"
        )
    events: list[dict[str, Any]] = []
    scanned = aggregates = 0
    async with audit_connection(ws) as nc:
        async with contextlib.aclosing(read_stored(nc, pack=pack)) as stored:
            async for seq, event in stored:
                scanned += 1
                if "count" in event and "phase" not in event:
                    aggregates += 1
                if event.get("request_id") == request_id:
                    events.append({**event, "_stream_seq": seq})
    return Found(events, scanned, aggregates)


@dataclass(frozen=True)
class Explanation:
    """One request as recorded, the rule that decided it, and how it would fare now."""

    request_id: str
    pack_id: str
    component_id: str
    capability: str
    target: str
    decision: str  # the broker's decision: allow / deny / error (the first event's)
    code: str
    message: str  # the reason the Pack was given ("" when allowed)
    outcome: str  # allow / deny / error after the handler ran ("" when nothing ran or it is the decision)
    rule: str
    detail: str
    events: list[dict[str, Any]]
    aggregate_count: int | None  # found only as the first request of an aggregate of that many refusals
    now: Verdict | None  # `rumi check` now, with the arguments the event records
    grant_file: str
    grants_changed_since: bool | None  # the grant file's mtime is later than the request (None: unknown)
    fix: Fix | None = None
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "pack_id": self.pack_id,
            "component_id": self.component_id,
            "capability": self.capability,
            "target": self.target,
            "decision": self.decision,
            "code": self.code,
            "message": self.message,
            "outcome": self.outcome or None,
            "rule": self.rule,
            "detail": self.detail,
            "aggregate_count": self.aggregate_count,
            "grant_file": self.grant_file,
            "grants_changed_since": self.grants_changed_since,
            "now": None if self.now is None else self.now.as_json(),
            "fix": None if self.fix is None else self.fix.as_json(),
            "events": [
                {k: e.get(k) for k in ("chain", "seq", "ts", "phase", "decision", "code", "message", "count")}
                for e in self.events
            ],
            "notes": self.notes,
        }


def _when(event: dict[str, Any]) -> datetime | None:
    try:
        return datetime.strptime(str(event.get("ts")), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def _refusing(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The event that says how the request ended: its outcome, else its one decision/complete event."""
    for phase in ("outcome", "complete", "decision"):
        for event in events:
            if event.get("phase") == phase:
                return event
    return events[0]


def explain_request(
    ws: Workspace, request_id: str, found: Found, *, pack: str | None = None, root_hint: str | None = None
) -> Explanation:
    """Explain the request from its events; RequestNotFound when there are none."""
    events = [e for e in found.events if "_malformed" not in e]
    if not events:
        where = f" of pack {pack}" if pack else ""
        folded = (
            f"; a refusal at flood rate is recorded only in an aggregate event that carries the first "
            f"request's id ({found.aggregates} such event(s) read)"
            if found.aggregates
            else ""
        )
        raise RequestNotFound(
            f"request {request_id} not found in the audit stream ({found.scanned} events{where} read){folded}"
        )
    first = events[0]
    final = _refusing(events)
    aggregate = next((e for e in events if "count" in e and "phase" not in e), None)
    decision = str(first.get("decision", ""))
    code = str(final.get("code", ""))
    message = str(final.get("message", "")) if final.get("decision") != "allow" else ""
    outcome = ""
    if final is not first:
        outcome = str(final.get("decision", ""))
    recorded_rule = "allowed" if final.get("decision") == "allow" else rule_of(code, message)
    component = str(first.get("component_id", ""))
    capability = str(first.get("capability", ""))
    target = str(first.get("target", ""))
    notes: list[str] = []
    if aggregate is not None:
        notes.append(
            f"found only as the first refusal of an aggregate event: {aggregate.get('count')} refusals of "
            f"pack {aggregate.get('pack_id')} in one window, most often {aggregate.get('code')}; folded "
            "refusals keep no message and the others' ids are not recorded"
        )
    if decision == "allow" and final.get("decision") == "deny":
        notes.append("the policy allowed it; the handler refused it when it ran (a check only it makes)")
    now, grant_file, changed = _now(ws, component, capability, target, first, root_hint, notes)
    detail = message or ("allowed" if recorded_rule == "allowed" else code)
    if now is not None and now.rule == recorded_rule:
        detail = now.detail
    fix = _fix(recorded_rule, decision, message, now)
    return Explanation(
        request_id=request_id,
        pack_id=str(first.get("pack_id", "")),
        component_id=component,
        capability=capability,
        target=target,
        decision=decision,
        code=code,
        message=message,
        outcome=outcome,
        rule=recorded_rule,
        detail=detail,
        events=events,
        aggregate_count=int(aggregate["count"]) if aggregate is not None else None,
        now=now,
        grant_file=grant_file,
        grants_changed_since=changed,
        fix=fix,
        notes=notes,
    )


def _fix(rule: str, decision: str, message: str, now: Verdict | None) -> Fix | None:
    """What would let the request through now (None: nothing to say)."""
    if rule == "rate_limited":
        return Fix(
            None,
            "no grant helps: the Pack sent more requests than its rate allows (broker.rate_per_second "
            "and broker.burst in docker/config.json)",
        )
    if now is None:
        return None
    if not now.allowed:
        return now.fix
    if decision == "allow" and rule != "allowed":
        return Fix(
            None, f"no grant helps: the policy allowed it and the handler refused it when it ran ({message})"
        )
    if rule != "allowed":
        return Fix(None, "none needed now: the current grants allow it")
    return None


def _changed_since(when: datetime | None, files: list[Path]) -> bool | None:
    """Whether any of the grant files that can decide was written after `when` (None: unknown, when
    the request's time is not recorded or none of the files exists: one may have been removed)."""
    mtimes = []
    for path in files:
        with contextlib.suppress(OSError):
            mtimes.append(datetime.fromtimestamp(path.stat().st_mtime, UTC))
    if when is None or not mtimes:
        return None
    return any(m > when for m in mtimes)


def _now(
    ws: Workspace,
    component: str,
    capability: str,
    target: str,
    first: dict[str, Any],
    root_hint: str | None,
    notes: list[str],
) -> tuple[Verdict | None, str, bool | None]:
    """`rumi check` now on what the event records; the deciding grant file (the component's own, or its
    Pack's `<pack_id>:*` one); whether the component's own or the Pack-wide file changed since."""
    try:
        pack_id = parse_component_id(component)[0]
    except ValueError:
        notes.append(
            "the request names no valid component (refused before it was read): nothing to check now"
        )
        return None, "", None
    grant_file = ws.grant_file(component)
    changed = _changed_since(_when(first), [grant_file, ws.grant_file(pack_wide_id(pack_id))])
    if changed is None and not grant_file.exists():
        notes.append("there is no grant file now (it may have been removed since)")
    try:
        policy = load_policy(ws)
        plugin = policy.registry.get(capability)
        if plugin is None:
            notes.append(f"no handler {capability!r} is installed now: nothing to check now")
            return None, str(grant_file), changed
        args = args_from_target(plugin, target)
        if args is None:
            notes.append(
                "the event records no target to rebuild the arguments from (refused before they were read): "
                "only scope and grant are checked now"
            )
        else:
            notes.append(
                f"checked now with the arguments the event records ({target}); the rest are defaults"
            )
        verdict = check_request(ws, component, capability, args, policy=policy, root_hint=root_hint)
    except CheckUsageError as exc:
        notes.append(f"cannot check it now: {exc}")
        return None, str(grant_file), changed
    grant_file = verdict.grant_file  # the one that decides now: the component's own, or `<pack_id>:*`
    recorded = str(first.get("decision", ""))
    if recorded in ("allow", "deny") and verdict.decision != recorded and first.get("code") != "rate_limited":
        why = "the grant file changed since" if changed else "the grants, scopes or handlers differ now"
        notes.append(f"it would be {'allowed' if verdict.allowed else 'denied'} now: {why}")
    return verdict, str(grant_file), changed
