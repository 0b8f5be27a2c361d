"""Wire protocol as the broker sees it: the shared structs plus broker-only subjects.

The structs live in `pack_runtime._wire` (the SDK must never import `broker`); the broker
decodes with the same strict decoders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgspec

from pack_runtime._wire import (
    CALL_DECODER,
    ENCODER,
    HEARTBEAT_INTERVAL,
    PROTOCOL_VERSION,
    REPLY_DECODER,
    REQUEST_DECODER,
    STALE_AFTER_INTERVALS,
    STATUS_DECODER,
    CallRequest,
    ErrorInfo,
    PackStatus,
    Reply,
    Request,
    call_subject,
    error_reply,
    ok_reply,
    request_subject,
    status_subject,
)

__all__ = [
    "AUDIT_STREAM",
    "AUDIT_SUBJECTS",
    "BROKER_QUEUE",
    "CALL_DECODER",
    "ENCODER",
    "HEARTBEAT_INTERVAL",
    "PROTOCOL_VERSION",
    "REPLY_DECODER",
    "REQUEST_DECODER",
    "REQUEST_WILDCARD",
    "STALE_AFTER_INTERVALS",
    "STATUS_DECODER",
    "STATUS_STREAM",
    "STATUS_WILDCARD",
    "CallRequest",
    "ErrorInfo",
    "HeardStatus",
    "PackStatus",
    "Reply",
    "Request",
    "audit_subject",
    "call_subject",
    "decode_status",
    "error_reply",
    "ok_reply",
    "request_subject",
    "stale_after",
    "status_subject",
]


def audit_subject(pack_id: str, capability: str) -> str:
    """Subject an audit event is published on (kept by the RUMI_AUDIT stream)."""
    return f"rumi.audit.{pack_id}.{capability}"


REQUEST_WILDCARD = "rumi.pack.*.req.*"
AUDIT_STREAM = "RUMI_AUDIT"
AUDIT_SUBJECTS = "rumi.audit.>"
BROKER_QUEUE = "rumi-broker"

# Every Pack's status subject, as the trusted users in RUMI see them (imported from each Pack account).
STATUS_WILDCARD = "rumi.pack.*.status"
# In-memory JetStream stream in RUMI keeping the last status of each Pack (`rumi ps`, `rumi call`).
STATUS_STREAM = "RUMI_STATUS"
# Heartbeat intervals readers accept from a Pack: a Pack cannot make itself look alive for hours.
_MIN_INTERVAL, _MAX_INTERVAL = 0.1, 60.0


@dataclass(frozen=True)
class HeardStatus:
    """A Pack's status as a reader heard it: the Pack from the subject, the time from the reader's clock."""

    pack_id: str
    state: str
    seq: int
    interval: float
    heard_at: float  # time.monotonic() of this reader when the status was current

    def age(self, now: float) -> float:
        """Seconds since the status was current (`now` is time.monotonic())."""
        return max(now - self.heard_at, 0.0)

    def stale_after(self) -> float:
        """Seconds after which a silent Pack counts as unavailable."""
        return stale_after(self.interval)

    def live(self, now: float) -> bool:
        """Ready or alive, and heard from within `stale_after()`."""
        return self.state in ("ready", "alive") and self.age(now) <= self.stale_after()


def stale_after(interval: float = HEARTBEAT_INTERVAL) -> float:
    """STALE_AFTER_INTERVALS heartbeat intervals (the interval kept within 0.1 .. 60 s)."""
    if not math.isfinite(interval):
        interval = HEARTBEAT_INTERVAL
    return STALE_AFTER_INTERVALS * min(max(interval, _MIN_INTERVAL), _MAX_INTERVAL)


def decode_status(subject: str, data: bytes, heard_at: float) -> HeardStatus | None:
    """The status on `subject` (rumi.pack.<id>.status), or None when the subject or payload is not one.

    The Pack is the subject's `<id>`: only that Pack's account can publish there.  A payload naming
    another Pack, of another version, or malformed, is dropped.
    """
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != ["rumi", "pack"] or parts[3] != "status":
        return None
    pack_id = parts[2]
    try:
        status = STATUS_DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return None
    if status.v != PROTOCOL_VERSION or status.pack_id != pack_id:
        return None
    return HeardStatus(pack_id, status.state, status.seq, status.interval, heard_at)
