"""Wire protocol: MessagePack via msgspec, versioned, strict. Shared by the SDK and the broker.

Every struct forbids unknown fields and decoders are built once.  The capability is not a field:
it is the subject's last token, which the NATS server (not the Pack) places in the broker's account.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

PROTOCOL_VERSION = 1
# Seconds between a Pack's heartbeats (`PackStatus` "alive"); readers call a Pack unavailable after
# STALE_AFTER_INTERVALS of them without one.
HEARTBEAT_INTERVAL = 5.0
STALE_AFTER_INTERVALS = 3

RequestId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
ComponentId = Annotated[str, msgspec.Meta(max_length=200)]


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A Pack asks the broker for one capability (the subject names which)."""

    v: int
    id: RequestId
    component_id: ComponentId
    args: dict[str, Any] = {}


class CallRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An admin invokes one of a Pack's tools on rumi.pack.<id>.call.<type>.<name>."""

    v: int
    id: RequestId
    args: dict[str, Any] = {}


class ErrorInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Why a request failed: a contract error code and a message safe to show."""

    code: str
    message: str


class Reply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Answer to a Request or a CallRequest."""

    v: int
    id: str
    success: bool
    data: Any = None
    error: ErrorInfo | None = None


StatusState = Literal["ready", "alive", "stopping"]


class PackStatus(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A Pack says how it is, on rumi.pack.<id>.status: "ready" once, then "alive" every `interval` s.

    Only its own account may publish that subject, so the subject names the Pack: readers take the
    Pack's identity from it, never from `pack_id` (a message whose `pack_id` differs is dropped).
    `ts` is the sender's clock (for logs only); readers time heartbeats by their own clock.
    """

    v: int
    pack_id: Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
    state: StatusState
    ts: float
    seq: Annotated[int, msgspec.Meta(ge=0)]
    interval: Annotated[float, msgspec.Meta(gt=0, le=3600)] = HEARTBEAT_INTERVAL


# The listing call: every Pack SDK answers `rumi.pack.<id>.call._rumi.tools` with a `ToolList`.
# `_rumi` can never be a component type (types start with a lowercase letter), so no tool shadows it.
LISTING_TYPE = "_rumi"
LISTING_NAME = "tools"
MAX_TOOLS = 512
# A caller that gives up (timeout, Ctrl-C) publishes the call's id here (`cancel_subject`); every
# instance hears it, the one running the call cancels the tool. `_rumi` is never a component type.
CANCEL_NAME = "cancel"


class ToolInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One tool of a Pack: its component id, the first line of its docstring, its arguments' JSON Schema."""

    component_id: ComponentId
    type: Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")]
    description: Annotated[str, msgspec.Meta(max_length=1000)] = ""
    args_schema: dict[str, Any] = {}


class ToolList(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The `data` of the listing call's reply."""

    pack_id: Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
    tools: Annotated[list[ToolInfo], msgspec.Meta(max_length=MAX_TOOLS)]


REQUEST_DECODER = msgspec.msgpack.Decoder(Request)
CALL_DECODER = msgspec.msgpack.Decoder(CallRequest)
REPLY_DECODER = msgspec.msgpack.Decoder(Reply)
STATUS_DECODER = msgspec.msgpack.Decoder(PackStatus)
ENCODER = msgspec.msgpack.Encoder()


def ok_reply(request_id: str, data: Any) -> bytes:
    """Encode a successful reply."""
    return ENCODER.encode(Reply(v=PROTOCOL_VERSION, id=request_id, success=True, data=data))


def error_reply(request_id: str, code: str, message: str) -> bytes:
    """Encode a failed reply."""
    return ENCODER.encode(
        Reply(v=PROTOCOL_VERSION, id=request_id, success=False, error=ErrorInfo(code=code, message=message))
    )


def request_subject(pack_id: str, capability: str) -> str:
    """Subject a Pack publishes a request on (the broker sees the same subject in its account)."""
    return f"rumi.pack.{pack_id}.req.{capability}"


def call_subject(pack_id: str, type_: str, name: str) -> str:
    """Subject of a tool call into a Pack."""
    return f"rumi.pack.{pack_id}.call.{type_}.{name}"


def listing_subject(pack_id: str) -> str:
    """Subject of the listing call a Pack SDK answers with its `ToolList`."""
    return call_subject(pack_id, LISTING_TYPE, LISTING_NAME)


def cancel_subject(pack_id: str) -> str:
    """Where a caller cancels a call it abandoned: ``rumi.pack.<id>.call._rumi.cancel``, `CallRequest` of its id."""
    return call_subject(pack_id, LISTING_TYPE, CANCEL_NAME)


def status_subject(pack_id: str) -> str:
    """Subject a Pack publishes its `PackStatus` on (ready, heartbeats, stopping)."""
    return f"rumi.pack.{pack_id}.status"
