"""Choosing events to export (time window, Pack, decision) and mapping them to OCSF for SIEMs.

Two kinds of selection (`Selection`):

- **Chain-preserving** (JSON lines, no `--pack`/`--decision`): each chain's part of the file is one
  contiguous run, so the file verifies on its own. With `since`, a chain's run starts at its last
  signed checkpoint before its first event in the window (or at its seq 1 when it has none); with
  `until`, it goes on after the window up to the chain's next checkpoint (when there is one), so
  the run also ends on a signature.
- **Exact** (`--pack`, `--decision`, or OCSF): exactly the events whose ``ts`` is in the window and
  that match the filters. For reading and for SIEMs; such a file is not a whole chain.

OCSF: every event becomes one API Activity (class 6003) event of OCSF `OCSF_VERSION` with the
`security_control` profile; the table is in docs/audit.md ("Export for SIEMs").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from broker.audit.trail import CHECKPOINT_PHASE, DECISIONS

__all__ = [
    "FORMATS",
    "MAX_HELD",
    "OCSF_VERSION",
    "Selection",
    "parse_time",
    "to_ocsf",
]

FORMATS: Final = ("jsonl", "ocsf")
# Events held back at most while looking for a chain's checkpoint (a chain writes one per 1,000).
MAX_HELD: Final = 100_000
_TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_RELATIVE = re.compile(r"^(\d{1,9})([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """`--since`/`--until`: an RFC 3339 / ISO 8601 time (UTC when it names no zone), a date, or an
    age such as ``90s``, ``15m``, ``2h``, ``7d`` (that long before now). ValueError saying what is accepted."""
    value = text.strip()
    match = _RELATIVE.match(value)
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[unit]: amount})
    try:
        moment = datetime.fromisoformat(value[:-1] + "+00:00" if value[-1:] in "zZ" and value else value)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use e.g. 2026-11-28, 2026-11-28T10:00:00Z, or an age like 15m, 2h, 7d"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def event_time(event: Mapping[str, Any]) -> datetime | None:
    """The event's ``ts`` as a UTC datetime, or None when it has none that parses."""
    ts = event.get("ts")
    if not isinstance(ts, str):
        return None
    try:
        return datetime.strptime(ts, _TS_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        try:
            return parse_time(ts)
        except ValueError:
            return None


@dataclass
class _ChainState:
    held: list[dict[str, Any]] = field(default_factory=list)
    state: str = "before"  # before the window → "in" → "after" (until passed) → "done"


class Selection:
    """Feed events in stream order to `add`; it returns those to write now. `finish` returns the rest.

    `pack`, `decision` and `exact` make an exact selection; otherwise it preserves chains (module doc).
    """

    def __init__(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        pack: str | None = None,
        decision: str | None = None,
        exact: bool = False,
    ) -> None:
        if decision is not None and decision not in DECISIONS:
            raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
        if since is not None and until is not None and until <= since:
            raise ValueError("--until must be later than --since")
        self.since, self.until = since, until
        self.pack, self.decision = pack, decision
        self.exact = exact or pack is not None or decision is not None
        self._chains: dict[str, _ChainState] = {}
        self._held = 0

    def _in_window(self, when: datetime | None) -> bool:
        if when is None:
            return self.since is None and self.until is None
        return (self.since is None or when >= self.since) and (self.until is None or when < self.until)

    def add(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """The events to write now, given the next stored event."""
        if self.exact:
            if self.pack is not None and event.get("pack_id") != self.pack:
                return []
            if self.decision is not None and event.get("decision") != self.decision:
                return []
            return [event] if self._in_window(event_time(event)) else []
        if self.since is None and self.until is None:
            return [event]
        chain = event.get("chain")
        when = event_time(event)
        if not isinstance(chain, str) or when is None:
            # Not an event of any chain (malformed): written, so that `verify` reports it.
            return [event]
        st = self._chains.setdefault(chain, _ChainState())
        checkpoint = event.get("phase") == CHECKPOINT_PHASE
        if st.state == "before":
            if self.since is not None and when < self.since:
                if checkpoint:  # the latest checkpoint before the window: the run starts here
                    self._held -= len(st.held)
                    st.held = []
                self._hold(st, event, chain)
                return []
            if self.until is not None and when >= self.until:
                return self._after(st, event, chain)
            st.state = "in"
            out, st.held = [*st.held, event], []
            self._held -= len(out) - 1
            return out
        if st.state == "in":
            if self.until is None or when < self.until:
                return [event]
            st.state = "after"
            return self._after(st, event, chain)
        if st.state == "after":
            return self._after(st, event, chain)
        return []

    def _hold(self, st: _ChainState, event: dict[str, Any], chain: str) -> None:
        st.held.append(event)
        self._held += 1
        if self._held > MAX_HELD:
            raise ValueError(
                f"chain {chain} has no checkpoint in its last {MAX_HELD:,} events before --since, so the "
                "export cannot start at one; export without --since (or with --pack to get a filtered file)"
            )

    def _after(self, st: _ChainState, event: dict[str, Any], chain: str) -> list[dict[str, Any]]:
        if st.state == "before":
            # The chain has no event in the window at all: nothing of it is written.
            self._held -= len(st.held)
            st.held, st.state = [], "done"
            return []
        st.state = "after"
        self._hold(st, event, chain)
        if event.get("phase") != CHECKPOINT_PHASE:
            return []
        out, st.held, st.state = st.held, [], "done"
        self._held -= len(out)
        return out

    def finish(self) -> list[dict[str, Any]]:
        """What is left at the end of the stream: nothing (held events are outside the window)."""
        self._chains.clear()
        self._held = 0
        return []


# ----------------------------------------------------------------------------------------- OCSF

OCSF_VERSION: Final = "1.7.0"
OCSF_PROFILES: Final = ("security_control",)
API_ACTIVITY: Final = 6003
APPLICATION_ACTIVITY: Final = 6
# capability → (activity_id, activity_name); anything else is 99 "Other" named by its capability
_ACTIVITIES: Final = {"file_read": (2, "Read"), "env_read": (2, "Read"), "file_write": (3, "Update")}
# decision → (severity_id, severity, status_id, status, action_id, action, disposition_id, disposition)
_OUTCOMES: Final = {
    "allow": (1, "Informational", 1, "Success", 1, "Allowed", 1, "Allowed"),
    "error": (2, "Low", 2, "Failure", 1, "Allowed", 1, "Allowed"),
    "deny": (3, "Medium", 2, "Failure", 2, "Denied", 2, "Blocked"),
}
_UNKNOWN_OUTCOME: Final = (0, "Unknown", 0, "Unknown", 0, "Unknown", 0, "Unknown")


def _text(event: Mapping[str, Any], name: str) -> str:
    value = event.get(name)
    return value if isinstance(value, str) else ""


def to_ocsf(event: Mapping[str, Any]) -> dict[str, Any]:
    """One stored audit event as an OCSF API Activity event (docs/audit.md has the table).

    Everything OCSF has no place for (the chain fields, ``phase``, ``extra``) is kept in ``unmapped``,
    so a SIEM still holds what `rumi audit verify` needs. Raises ValueError for a malformed event.
    """
    when = event_time(event)
    if when is None or "_malformed" in event:
        raise ValueError(str(event.get("_malformed") or "the event has no valid ts"))
    capability = _text(event, "capability") or "unknown"
    pack_id = _text(event, "pack_id") or "unknown"
    decision = _text(event, "decision")
    code = _text(event, "code")
    message = _text(event, "message")
    activity_id, activity_name = _ACTIVITIES.get(capability, (99, capability))
    sev_id, severity, status_id, status, action_id, action, disp_id, disposition = _OUTCOMES.get(
        decision, _UNKNOWN_OUTCOME
    )
    actor: dict[str, Any] = {"app_name": pack_id}
    if _text(event, "component_id"):
        actor["app_uid"] = _text(event, "component_id")
    api: dict[str, Any] = {
        "operation": capability,
        "request": {"uid": _text(event, "request_id") or "unknown"},
        "service": {"name": "rumi-broker", "uid": _text(event, "chain") or "unknown"},
    }
    if code and code != "ok":
        api["response"] = {"error": code, **({"error_message": message} if message else {})}
    chain, seq = _text(event, "chain"), event.get("seq")
    metadata: dict[str, Any] = {
        "version": OCSF_VERSION,
        "product": {"name": "Rumi", "vendor_name": "Rumi", "uid": "rumi-broker"},
        "profiles": list(OCSF_PROFILES),
        "log_name": "RUMI_AUDIT",
        "original_time": _text(event, "ts"),
        "correlation_uid": _text(event, "request_id") or "unknown",
        "event_code": _text(event, "phase") or ("aggregate" if "count" in event else "event"),
    }
    if chain and isinstance(seq, int) and not isinstance(seq, bool):
        metadata["uid"] = f"{chain}.{seq}"
        metadata["sequence"] = seq
    duration = event.get("duration_ms")
    summary = f"{pack_id} {capability} {_text(event, 'target')}".rstrip() + f": {decision} ({code})"
    out: dict[str, Any] = {
        "class_uid": API_ACTIVITY,
        "class_name": "API Activity",
        "category_uid": APPLICATION_ACTIVITY,
        "category_name": "Application Activity",
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": API_ACTIVITY * 100 + activity_id,
        "type_name": f"API Activity: {activity_name if activity_id != 99 else 'Other'}",
        "time": int(when.timestamp() * 1000),
        "severity_id": sev_id,
        "severity": severity,
        "status_id": status_id,
        "status": status,
        "status_code": code or "unknown",
        "action_id": action_id,
        "action": action,
        "disposition_id": disp_id,
        "disposition": disposition,
        "message": message or summary,
        "actor": actor,
        "api": api,
        "src_endpoint": {"name": pack_id},
        "metadata": metadata,
        "unmapped": {
            k: event[k] for k in ("chain", "seq", "prev_hash", "hash", "phase", "extra", "v") if k in event
        },
    }
    if message:
        out["status_detail"] = message
    if isinstance(duration, int | float) and not isinstance(duration, bool):
        out["duration"] = round(duration)
    count = event.get("count")
    if isinstance(count, int) and not isinstance(count, bool):
        out["count"] = count
    if _text(event, "target"):
        out["resources"] = [{"name": _text(event, "target"), "type": capability}]
    return out
