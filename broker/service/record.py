"""One request's record as it advances through the broker: what its audit events will say."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from broker.audit.trail import audit_fields

__all__ = ["RequestRecord", "peek_request_id"]


class _PeekId(msgspec.Struct):
    """Only the request id, leniently: to address a refusal made before the strict decode."""

    id: str = ""


_PEEK_DECODER = msgspec.msgpack.Decoder(_PeekId)
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def peek_request_id(data: bytes) -> str:
    """The request's id if it has a well-formed one, else ''. Never raises."""
    try:
        rid = _PEEK_DECODER.decode(data).id
    except Exception:
        return ""
    return rid if _ID_RE.match(rid) else ""


@dataclass
class RequestRecord:
    """What the audit event of one request says; filled in as the request advances."""

    request_id: str
    pack_id: str
    capability: str
    started: float = field(default_factory=time.perf_counter)
    component_id: str = ""
    target: str = ""
    decision: str = "allow"  # how it was answered (the `rumi_requests_total` labels)
    code: str = "ok"
    approval: dict[str, Any] | None = None  # ask mode: how an operator answered (broker/service/approvals.py)
    grant: str = ""  # the grant file that allowed it, when not the component's own (a Pack-wide `<pack>:*`)

    @property
    def reply_id(self) -> str:
        """The id to answer with: the Pack's own, or '' when it sent none we could read."""
        return "" if self.request_id.startswith("x-") else self.request_id

    def fields(
        self,
        decision: str,
        code: str,
        *,
        phase: str | None = None,
        message: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """This request's event fields (the chain adds its own), built and capped by the audit layer."""
        if self.approval:
            extra = {**(extra or {}), **self.approval}
        if self.grant:
            extra = {**(extra or {}), "grant": self.grant}
        return audit_fields(
            request_id=self.request_id,
            pack_id=self.pack_id,
            component_id=self.component_id,
            capability=self.capability,
            target=self.target,
            decision=decision,
            code=code,
            duration_ms=(time.perf_counter() - self.started) * 1000,
            phase=phase,
            message=message,
            extra=extra or None,
        )
