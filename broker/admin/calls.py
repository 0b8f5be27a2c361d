"""Calling a Pack's tool from the host as the `cli` identity (`rumi call`, `rumi demo`)."""

from __future__ import annotations

from typing import Any

from broker.core.errors import RumiError
from broker.core.workspace import Workspace


async def call_tool(
    ws: Workspace, pack_id: str, type_: str, name: str, args: dict[str, Any], timeout: float
) -> Any:
    """Send a CallRequest to a Pack's tool as the `cli` identity; return its data or raise RumiError."""
    import msgspec
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from broker.bus.server import connect
    from broker.core.protocol import ENCODER, PROTOCOL_VERSION, REPLY_DECODER, CallRequest, call_subject
    from pack_runtime._context import new_request_id

    nc = await connect(ws, "cli", max_reconnect_attempts=0)
    try:
        request_id = new_request_id()
        payload = ENCODER.encode(CallRequest(v=PROTOCOL_VERSION, id=request_id, args=args))
        try:
            msg = await nc.request(call_subject(pack_id, type_, name), payload, timeout=timeout)
        except NoRespondersError:
            raise RumiError(
                f"Pack '{pack_id}' is not running: start it with `rumi dev {pack_id}` or `rumi up`"
            ) from None
        except NatsTimeout:
            raise RumiError(f"no answer from {pack_id}:{type_}:{name} within {timeout:g} s") from None
        try:
            reply = REPLY_DECODER.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            raise RumiError(f"malformed reply from the Pack: {exc}") from None
        if reply.id != request_id:
            raise RumiError("the Pack answered a different request")
        if not reply.success:
            err = reply.error
            raise RumiError(f"{err.code}: {err.message}" if err else "the tool failed")
        return reply.data
    finally:
        await nc.close()
