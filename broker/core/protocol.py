"""Wire protocol as the broker sees it: the shared structs plus broker-only subjects.

The structs live in `pack_runtime._wire` (the SDK must never import `broker`); the broker
decodes with the same strict decoders.
"""

from __future__ import annotations

from pack_runtime._wire import (
    CALL_DECODER,
    ENCODER,
    PROTOCOL_VERSION,
    REPLY_DECODER,
    REQUEST_DECODER,
    CallRequest,
    ErrorInfo,
    Reply,
    Request,
    call_subject,
    error_reply,
    ok_reply,
    request_subject,
)

__all__ = [
    "AUDIT_STREAM",
    "AUDIT_SUBJECTS",
    "BROKER_QUEUE",
    "CALL_DECODER",
    "ENCODER",
    "PROTOCOL_VERSION",
    "REPLY_DECODER",
    "REQUEST_DECODER",
    "REQUEST_WILDCARD",
    "CallRequest",
    "ErrorInfo",
    "Reply",
    "Request",
    "audit_subject",
    "call_subject",
    "error_reply",
    "ok_reply",
    "request_subject",
]


def audit_subject(pack_id: str, capability: str) -> str:
    """Subject an audit event is published on (kept by the RUMI_AUDIT stream)."""
    return f"rumi.audit.{pack_id}.{capability}"


REQUEST_WILDCARD = "rumi.pack.*.req.*"
AUDIT_STREAM = "RUMI_AUDIT"
AUDIT_SUBJECTS = "rumi.audit.>"
BROKER_QUEUE = "rumi-broker"
