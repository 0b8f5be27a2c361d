"""Calling a Pack's tool from the host as the `cli` identity (`rumi call`, `rumi demo`).

A call fails fast with `unavailable` when the Pack's heartbeat stopped: before sending, when the last
status RUMI_STATUS holds for it is older than `stale_after` (3 heartbeat intervals) or says
"stopping"; while waiting, when no heartbeat arrives within that time of the last one.  A Pack never
heard (no status stream, e.g. under `rumi broker` before any heartbeat) gets that time from the start
of the call.  A Pack that answers but whose heartbeats stopped is not waited for until the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from broker.core.errors import RumiError, Unavailable
from broker.core.protocol import HeardStatus, stale_after
from broker.core.workspace import Workspace


async def call_tool(
    ws: Workspace, pack_id: str, type_: str, name: str, args: dict[str, Any], timeout: float
) -> Any:
    """Send a CallRequest to a Pack's tool as the `cli` identity; return its data or raise RumiError."""
    import msgspec
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from broker.bus.server import StatusWatch, connect, last_statuses
    from broker.core.protocol import ENCODER, PROTOCOL_VERSION, REPLY_DECODER, CallRequest, call_subject
    from pack_runtime._context import new_request_id

    nc = await connect(ws, "cli", max_reconnect_attempts=0)
    try:
        began = time.monotonic()
        watch = StatusWatch()
        await watch.start(nc, pack_id)
        stored = (await last_statuses(nc, [pack_id], timeout=min(timeout, 2.0))).get(pack_id)
        _check_heartbeat(pack_id, watch.last.get(pack_id) or stored, began)
        request_id = new_request_id()
        payload = ENCODER.encode(CallRequest(v=PROTOCOL_VERSION, id=request_id, args=args))
        request = asyncio.ensure_future(
            nc.request(call_subject(pack_id, type_, name), payload, timeout=timeout)
        )
        try:
            while not request.done():
                heard = watch.last.get(pack_id) or stored
                _check_heartbeat(pack_id, heard, began)
                until = (heard.heard_at + heard.stale_after()) if heard else began + stale_after()
                watch.changed.clear()
                changed = asyncio.ensure_future(watch.changed.wait())
                try:
                    await asyncio.wait(
                        {request, changed},
                        timeout=max(until - time.monotonic(), 0.0) + 0.05,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    changed.cancel()
            msg = request.result()
        except NoRespondersError:
            raise RumiError(
                f"Pack '{pack_id}' is not running: start it with `rumi dev {pack_id}` or `rumi up`"
            ) from None
        except NatsTimeout:
            raise RumiError(f"no answer from {pack_id}:{type_}:{name} within {timeout:g} s") from None
        finally:
            if not request.done():
                request.cancel()
                with contextlib.suppress(BaseException):
                    await request
        await watch.stop()
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


def _check_heartbeat(pack_id: str, heard: HeardStatus | None, began: float) -> None:
    """Raise Unavailable when the Pack said "stopping" or has been silent for longer than its stale time."""
    now = time.monotonic()
    if heard is None:
        silent, limit = now - began, stale_after()
    else:
        if heard.state == "stopping":
            raise Unavailable(f"unavailable: Pack {pack_id} is stopping (`rumi logs {pack_id}`)")
        silent, limit = heard.age(now), heard.stale_after()
    if silent > limit:
        raise Unavailable(
            f"unavailable: Pack {pack_id} sent no heartbeat for {silent:.0f} s (`rumi logs {pack_id}`)"
        )
