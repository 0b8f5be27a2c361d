"""`Pack`: registers tools and serves tool calls from the bus."""

from __future__ import annotations

import inspect
import logging
import math
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from anyio.abc import TaskStatus

from ._context import Context
from ._errors import BrokerError
from ._wire import (
    CALL_DECODER,
    ENCODER,
    HEARTBEAT_INTERVAL,
    PROTOCOL_VERSION,
    PackStatus,
    StatusState,
    error_reply,
    ok_reply,
    status_subject,
)

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

log = logging.getLogger("pack_runtime")

Tool = Callable[[Context, dict[str, Any]], Awaitable[Any]]
_PACK_ID_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


class Pack:
    """A Pack's tools and its connection to the broker.

    Identity and connection come from the environment (``RUMI_PACK_ID``, ``RUMI_NATS_URL``,
    ``RUMI_NATS_CREDS``, ``RUMI_HEARTBEAT_INTERVAL``); arguments override them, for tests.

    While serving, it publishes a `PackStatus` on ``rumi.pack.<id>.status``: ``ready`` once it takes
    calls, ``alive`` every `heartbeat_interval` seconds, ``stopping`` when it stops.
    """

    def __init__(
        self,
        pack_id: str | None = None,
        *,
        nats_url: str | None = None,
        creds: str | None = None,
        request_timeout: float = 30.0,
        heartbeat_interval: float | None = None,
    ) -> None:
        self.pack_id = pack_id or os.environ.get("RUMI_PACK_ID", "")
        self.nats_url = nats_url or os.environ.get("RUMI_NATS_URL", "")
        self.creds = creds or os.environ.get("RUMI_NATS_CREDS", "")
        self.request_timeout = request_timeout
        self.heartbeat_interval = _heartbeat_interval(heartbeat_interval)
        self._tools: dict[tuple[str, str], Tool] = {}
        self._nc: Client | None = None
        self._status_seq = 0
        self.ready = anyio.Event()

    def tool(self, name: str, *, type: str = "tool") -> Callable[[Tool], Tool]:
        """Register an async function as the tool ``<pack_id>:<type>:<name>``."""
        if not _NAME_RE.match(name):
            raise ValueError(f"tool name {name!r} must match {_NAME_RE.pattern}")

        def register(fn: Tool) -> Tool:
            if not inspect.iscoroutinefunction(fn):
                raise TypeError(f"tool {name!r} must be an async function")
            self._tools[(type, name)] = fn
            return fn

        return register

    @property
    def tools(self) -> list[str]:
        """Component ids of the registered tools."""
        return [f"{self.pack_id}:{t}:{n}" for (t, n) in sorted(self._tools)]

    def context(self, component_id: str | None = None) -> Context:
        """A context for requests outside a tool call (component ``<pack_id>:pack:_``)."""
        if self._nc is None:
            raise BrokerError("unavailable", "the Pack is not connected; call connect() or run() first")
        return Context(self._nc, self.pack_id, component_id or f"{self.pack_id}:pack:_", self.request_timeout)

    async def connect(self) -> Client:
        """Connect to NATS with this Pack's credentials."""
        import nats

        if not _PACK_ID_RE.match(self.pack_id):
            raise BrokerError("invalid_request", "RUMI_PACK_ID is missing or not a valid pack id")
        if not self.nats_url:
            raise BrokerError("unavailable", "RUMI_NATS_URL is not set")
        if not self.creds or not Path(self.creds).is_file():
            raise BrokerError("unavailable", "RUMI_NATS_CREDS does not name a readable credentials file")
        self._nc = await nats.connect(
            self.nats_url,
            nkeys_seed=self.creds,
            name=f"pack-{self.pack_id}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            allow_reconnect=True,
            error_cb=_log_error,
        )
        return self._nc

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve tool calls until cancelled; in-flight calls finish (bounded) before closing."""
        nc = self._nc or await self.connect()
        sub = await nc.subscribe(f"rumi.pack.{self.pack_id}.call.>")
        ready_file = os.environ.get("RUMI_READY_FILE")
        try:
            async with anyio.create_task_group() as tg:
                proxy_listen = os.environ.get("RUMI_PROXY_LISTEN")
                if proxy_listen:
                    # Unmodified HTTP clients (HTTPS_PROXY) reach the network through the broker.
                    from ._proxy import serve_proxy

                    await tg.start(serve_proxy, self.context(), proxy_listen)
                if ready_file:
                    Path(ready_file).write_text("ready\n")
                # The call subscription is in place (the server handles this connection in order):
                # whoever hears "ready" may call at once.
                await self._publish_status(nc, "ready", flush=True)
                tg.start_soon(self._heartbeat, nc, ready_file)
                self.ready.set()
                task_status.started()
                try:
                    async for msg in sub.messages:
                        tg.start_soon(self._serve_call, nc, msg)
                finally:
                    with anyio.move_on_after(2, shield=True):
                        await self._publish_status(nc, "stopping", flush=True)
                        await sub.unsubscribe()
        finally:
            with anyio.move_on_after(5, shield=True):
                await nc.drain()
            self._nc = None

    async def _heartbeat(self, nc: Client, ready_file: str | None) -> None:
        """Every `heartbeat_interval` s: "alive" on the status subject, and a fresh ready file's mtime."""
        while True:
            await anyio.sleep(self.heartbeat_interval)
            await self._publish_status(nc, "alive")
            if ready_file:
                # The container's healthcheck looks at this file's age: a stuck event loop turns it stale.
                try:
                    os.utime(ready_file)
                except OSError:
                    log.warning("cannot touch the ready file %s", ready_file)

    async def _publish_status(self, nc: Client, state: StatusState, *, flush: bool = False) -> None:
        status = PackStatus(
            v=PROTOCOL_VERSION,
            pack_id=self.pack_id,
            state=state,
            ts=time.time(),
            seq=self._status_seq,
            interval=self.heartbeat_interval,
        )
        self._status_seq += 1
        try:
            await nc.publish(status_subject(self.pack_id), ENCODER.encode(status))
            if flush:
                await nc.flush(timeout=2)
        except Exception as exc:  # disconnected or closed: the next heartbeat tries again
            log.warning("could not publish status %s: %s", state, exc)

    async def _serve_call(self, nc: Client, msg: Msg) -> None:
        parts = msg.subject.split(".")
        request_id = ""
        try:
            # rumi.pack.<id>.call.<type>.<name>
            if len(parts) != 6 or parts[2] != self.pack_id:
                raise BrokerError("invalid_request", "malformed call subject")
            call = CALL_DECODER.decode(msg.data)
            request_id = call.id
            if call.v != PROTOCOL_VERSION:
                raise BrokerError("invalid_request", f"unsupported protocol version {call.v}")
            tool = self._tools.get((parts[4], parts[5]))
            if tool is None:
                raise BrokerError("unknown_capability", f"this Pack has no tool {parts[4]}:{parts[5]}")
            ctx = Context(nc, self.pack_id, f"{self.pack_id}:{parts[4]}:{parts[5]}", self.request_timeout)
            result = await tool(ctx, dict(call.args))
            payload = ok_reply(request_id, result)
        except BrokerError as exc:
            payload = error_reply(request_id, exc.code, exc.message)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            payload = error_reply(request_id, "invalid_request", f"malformed call: {exc}")
        except Exception as exc:
            log.exception("tool failed")
            payload = error_reply(request_id, "handler_error", f"tool failed: {type(exc).__name__}")
        if msg.reply:
            try:
                await msg.respond(payload)
            except Exception:
                log.exception("could not send the reply")

    def run(self) -> None:
        """Connect and serve until SIGTERM or SIGINT; exits cleanly."""
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

        async def main() -> None:
            async with anyio.create_task_group() as tg:
                await tg.start(self.serve)
                log.info("pack %s serving %s", self.pack_id, ", ".join(self.tools) or "no tools")
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("pack %s stopping (signal %d)", self.pack_id, signum)
                        tg.cancel_scope.cancel()
                        break

        try:
            anyio.run(main)
        except BrokerError as exc:
            raise SystemExit(f"rumi pack: {exc}") from None


def _heartbeat_interval(value: float | None) -> float:
    """The argument, else RUMI_HEARTBEAT_INTERVAL, else the default; kept within 0.1 s .. 1 h."""
    if value is None:
        try:
            value = float(os.environ.get("RUMI_HEARTBEAT_INTERVAL") or HEARTBEAT_INTERVAL)
        except ValueError:
            value = HEARTBEAT_INTERVAL
    if not math.isfinite(value):
        return HEARTBEAT_INTERVAL
    return min(max(value, 0.1), 3600.0)


async def _log_error(exc: Exception) -> None:
    log.warning("nats: %s", exc)
