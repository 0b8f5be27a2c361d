"""The broker service: one request from the bus to a handler and back, audited.

For each message on ``rumi.pack.<pack_id>.req.<capability>``:

    identity (subject + server-stamped account) → rate → decode (strict) → scope → grant
    → args → audit decision event (acked before anything happens) → handler → outcome event → reply

Anything malformed, unknown, oversized, late or failing is answered with a typed error and
audited; the broker keeps serving.  Requests run in the broker's own task group behind a
capacity limit, never inside a nats-py callback, so a flood cannot block the read loop.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import re
import secrets
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from anyio.abc import TaskStatus

from broker.audit.trail import audit_fields
from broker.core import errors
from broker.core.context import HandlerContext, Limits
from broker.core.ids import CAPABILITY_RE, PACK_ID_RE
from broker.core.protocol import (
    BROKER_QUEUE,
    PROTOCOL_VERSION,
    REQUEST_DECODER,
    REQUEST_WILDCARD,
    error_reply,
    ok_reply,
)
from broker.core.workspace import RumiConfig, Workspace
from broker.service.ratelimit import TokenBuckets

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

    from broker.audit.trail import AuditWriter
    from broker.policy.grants import Decision, GrantStore, Policy
    from broker.policy.plugins import HandlerPlugin

log = logging.getLogger("rumi.broker")

MAX_TARGET = 256


def pack_account(pack_id: str) -> str:
    """Name of a Pack's NATS account (must match the config generator)."""
    from broker.bus.config import account_name

    return account_name(pack_id)


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


class Broker:
    """Serves Pack requests from NATS; stateless apart from its audit chain, so N can share a queue group."""

    def __init__(self, ws: Workspace, cfg: RumiConfig | None = None) -> None:
        self.ws = ws
        self.cfg = cfg or ws.load_config()
        s = self.cfg.broker
        self.limiter = anyio.CapacityLimiter(s.max_in_flight)
        self.buckets = TokenBuckets(s.rate_per_second, s.burst)
        self.in_flight = 0
        self.served = 0
        self._nc: Client | None = None
        self._policy: Policy | None = None
        self._grants: GrantStore | None = None
        self._audit: AuditWriter | None = None
        self._aggregator: Any = None
        self._max_reply = 1024 * 1024
        self.stopping = anyio.Event()

    @property
    def chain_id(self) -> str:
        assert self._audit is not None
        return str(self._audit.chain.chain_id)

    # -- lifecycle -------------------------------------------------------------------------
    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, subscribe in the queue group and serve until cancelled or `stop()`; then drain."""
        from broker.audit.trail import AuditChain, AuditWriter, RateLimitAggregator
        from broker.bus.server import connect
        from broker.policy.grants import GrantStore, Policy
        from broker.policy.plugins import HandlerRegistry

        registry = HandlerRegistry(self.ws.handlers)
        for err in registry.errors:
            log.error("%s", err)
        grants = GrantStore(self.ws, registry)
        for gerr in grants.errors:
            log.error("%s", gerr)
        self._policy = Policy(self.ws, registry, grants)
        self._grants = grants
        nc = await connect(self.ws, "broker", name="rumi-broker")
        self._nc = nc
        self._max_reply = int(getattr(nc, "max_payload", 0) or 1024 * 1024)
        self._audit = AuditWriter(nc.jetstream(), AuditChain())
        self._aggregator = RateLimitAggregator(self._audit)
        sub = await nc.subscribe(REQUEST_WILDCARD, queue=BROKER_QUEUE, pending_msgs_limit=65536)
        log.info("broker %s serving %s", self.chain_id, REQUEST_WILDCARD)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(functools.partial(grants.watch, interval=self.cfg.broker.grant_poll_interval))
                tg.start_soon(self._aggregator.run)
                async with anyio.create_task_group() as requests:
                    task_status.started()
                    tg.start_soon(self._stop_reading, sub, requests)
                    async for msg in sub.messages:
                        requests.start_soon(self._handle, msg)
                # All in-flight requests are done (drained): handlers end their open sessions
                # (a tunnel's outcome event is written now, not lost), then stop the helpers.
                with anyio.move_on_after(5, shield=True):
                    await self._shutdown_handlers()
                await self._aggregator.flush()
                tg.cancel_scope.cancel()
        finally:
            with anyio.move_on_after(5, shield=True):
                if not nc.is_closed:
                    await nc.drain()

    async def _stop_reading(self, sub: Any, requests: anyio.abc.TaskGroup) -> None:
        await self.stopping.wait()
        # Stop taking new requests; in-flight ones finish (bounded by the handler timeout).
        with anyio.move_on_after(2, shield=True):
            await sub.unsubscribe()
        with anyio.move_on_after(self.cfg.broker.request_timeout + 5):
            while self.in_flight:
                await anyio.sleep(0.02)
        requests.cancel_scope.cancel()

    def stop(self) -> None:
        """Stop taking requests, drain in-flight ones, then return from `serve`."""
        self.stopping.set()

    async def _shutdown_handlers(self) -> None:
        """Call each loaded handler's `shutdown` hook once; a failing hook is logged, the rest still run."""
        assert self._policy is not None
        for name, plugin in sorted(self._policy.registry.plugins.items()):
            if plugin.shutdown is None:
                continue
            try:
                result = plugin.shutdown()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                log.error("shutdown hook of handler %s failed: %s", name, type(exc).__name__)

    # -- one request -----------------------------------------------------------------------
    async def _handle(self, msg: Msg) -> None:
        self.in_flight += 1
        try:
            reply = await self._process(msg)
            if msg.reply:
                try:
                    await msg.respond(reply)
                except Exception as exc:
                    log.warning("could not send a reply: %s", exc)
        finally:
            self.in_flight -= 1
            self.served += 1

    async def _process(self, msg: Msg) -> bytes:
        parts = msg.subject.split(".")
        pack_id = parts[2] if len(parts) == 5 else ""
        capability = parts[4] if len(parts) == 5 else ""
        rec = RequestRecord(
            request_id=peek_request_id(msg.data) or "x-" + secrets.token_hex(12),
            pack_id=pack_id,
            capability=capability,
        )
        try:
            self._check_identity(msg, pack_id, capability)
            if not self.buckets.take(pack_id):
                await self._aggregator.add(rec.fields("deny", "rate_limited"))
                return error_reply(rec.reply_id, "rate_limited", "too many requests; slow down")
            if self.limiter.available_tokens < 1:
                raise errors.Unavailable("broker is at capacity; retry shortly")
            async with self.limiter:
                return await self._decide_and_run(msg, rec)
        except errors.RequestError as exc:
            return await self._refuse(rec, exc)
        except Exception:
            # Fail closed on our own bugs too: deny, audit, keep serving.
            log.exception("unexpected broker error")
            return await self._refuse(rec, errors.Unavailable("internal broker error"))

    def _check_identity(self, msg: Msg, pack_id: str, capability: str) -> None:
        if not PACK_ID_RE.match(pack_id):
            raise errors.InvalidRequest("malformed request subject")
        if not CAPABILITY_RE.match(capability):
            raise errors.UnknownCapability("malformed capability name")
        # The server stamps the requester's account on imported service requests; a request
        # that did not come through that Pack's account import is not that Pack's.
        info = (msg.headers or {}).get("Nats-Request-Info", "")
        try:
            account = json.loads(info).get("acc", "") if info else ""
        except (ValueError, AttributeError):
            account = ""
        if account != pack_account(pack_id):
            raise errors.Denied("request did not come from this Pack's account")

    async def _decide_and_run(self, msg: Msg, rec: RequestRecord) -> bytes:
        """decode → decide → validate args → authorize → decision event → handler → outcome → reply."""
        assert self._policy is not None
        req = self._decode(msg, rec)
        decision = self._policy.decide(rec.pack_id, req.component_id, rec.capability)
        plugin = decision.plugin
        raw = dict(req.args)
        args = self._validated_args(plugin, raw)
        rec.target = self._target(plugin, raw)
        if plugin.authorize is not None:
            plugin.authorize(decision.grant, args)  # pure: raises Denied before anything is recorded
        # A continuation (e.g. data on a tunnel) belongs to a session whose opening request was
        # audited; the grant is still checked above on every one, so revocation ends it.
        continuation = plugin.continuation is not None and bool(plugin.continuation(raw))
        if not continuation and not await self._record_decision(rec):
            return error_reply(rec.request_id, "unavailable", "audit log unavailable; request refused")
        context = self._context(rec, decision)
        return await self._run_handler(plugin, context, args, rec)

    def _decode(self, msg: Msg, rec: RequestRecord) -> Any:
        if len(msg.data) > self.cfg.limits.max_payload:
            raise errors.TooLarge("request is larger than the payload limit")
        try:
            req = REQUEST_DECODER.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise errors.InvalidRequest(f"malformed request: {exc}") from None
        except (UnicodeDecodeError, ValueError, RecursionError, OverflowError, TypeError):
            raise errors.InvalidRequest("malformed request: not valid MessagePack") from None
        rec.request_id = req.id
        rec.component_id = req.component_id
        if req.v != PROTOCOL_VERSION:
            raise errors.InvalidRequest(
                f"unsupported protocol version {req.v}; this broker speaks {PROTOCOL_VERSION}"
            )
        return req

    @staticmethod
    def _validated_args(plugin: HandlerPlugin, raw: Mapping[str, Any]) -> Any:
        try:
            return plugin.convert_args(raw)
        except msgspec.ValidationError as exc:
            raise errors.InvalidRequest(f"invalid arguments: {exc}") from None

    @staticmethod
    def _target(plugin: HandlerPlugin, raw: dict[str, Any]) -> str:
        try:
            return str(plugin.target(raw))[:MAX_TARGET]
        except Exception:
            return ""

    async def _record_decision(self, rec: RequestRecord) -> bool:
        """Write-ahead: the allow decision is stored before anything happens. False if it could not be."""
        assert self._audit is not None
        try:
            await self._audit.record(rec.fields("allow", "ok", phase="decision"), msg_id=rec.request_id)
        except errors.AuditError:
            log.error("audit unavailable: refusing %s %s", rec.pack_id, rec.capability)
            return False
        return True

    def _context(self, rec: RequestRecord, decision: Decision) -> HandlerContext:
        async def record_outcome(request_id: str, target: str, fields: dict[str, Any]) -> None:
            """Let a handler complete a session's audit later (tunnel closed, idle timeout)."""
            later = RequestRecord(request_id=request_id, pack_id=rec.pack_id, capability=rec.capability)
            later.component_id, later.target = rec.component_id, target
            await self._outcome(later, None, fields)

        def current_grant() -> Mapping[str, Any] | None:
            # Long-lived sessions re-check their grant: revocation ends them, not only new requests.
            try:
                return self._policy_decide(rec.pack_id, rec.component_id, rec.capability).grant
            except errors.RequestError:
                return None

        return HandlerContext(
            pack_id=rec.pack_id,
            component_id=rec.component_id,
            request_id=rec.request_id,
            grant=decision.grant,
            limits=Limits(timeout=self.cfg.broker.request_timeout, max_reply_bytes=self._max_reply - 1024),
            protected=decision.protected,
            workspace_root=self.ws.root,
            record_outcome=record_outcome,
            current_grant=current_grant,
        )

    async def _run_handler(
        self, plugin: HandlerPlugin, context: HandlerContext, args: Any, rec: RequestRecord
    ) -> bytes:
        try:
            with anyio.fail_after(self.cfg.broker.request_timeout):
                result = await self._execute(plugin, context, args)
            data = result.get("data") if isinstance(result, dict) else None
            if not isinstance(result, dict) or result.get("success") is not True:
                raise errors.HandlerFailed("handler returned no success")
        except TimeoutError:
            await self._outcome(rec, errors.Timeout("handler did not finish in time"), context.audit)
            return error_reply(rec.request_id, "timeout", "handler did not finish in time")
        except errors.RequestError as exc:
            await self._outcome(rec, exc, context.audit)
            return error_reply(rec.request_id, exc.code, exc.message)
        except Exception as exc:
            log.warning("handler %s failed: %s", rec.capability, type(exc).__name__)
            safe = errors.HandlerFailed("handler failed")
            await self._outcome(rec, safe, context.audit)
            return error_reply(rec.request_id, safe.code, safe.message)
        if context.audit:
            await self._outcome(rec, None, context.audit)
        payload = ok_reply(rec.request_id, data)
        if len(payload) > self._max_reply:
            # The server would drop an oversized reply and the Pack would only see a timeout.
            return error_reply(
                rec.request_id, "too_large", "the result is larger than the NATS payload limit"
            )
        return payload

    def _policy_decide(self, pack_id: str, component_id: str, capability: str) -> Decision:
        assert self._policy is not None
        return self._policy.decide(pack_id, component_id, capability)

    async def _execute(self, plugin: HandlerPlugin, context: HandlerContext, args: Any) -> Any:
        if plugin.is_async:
            return await plugin.execute(context, args)
        # Blocking handlers (file I/O, Docker) run off the event loop.
        return await anyio.to_thread.run_sync(plugin.execute, context, args, abandon_on_cancel=True)

    async def _outcome(
        self, rec: RequestRecord, exc: errors.RequestError | None, extra: dict[str, Any]
    ) -> None:
        assert self._audit is not None
        # A handler that refuses (path outside the grant, key not granted) denied the request.
        decision = "allow" if exc is None else "deny" if exc.code == "permission_denied" else "error"
        fields = rec.fields(
            decision,
            exc.code if exc else "ok",
            phase="outcome",
            message=exc.message if exc else None,
            extra=dict(extra) or None,
        )
        try:
            await self._audit.record(fields, msg_id=f"{rec.request_id}.outcome")
        except errors.AuditError:
            log.error("could not store the outcome event of request %s", rec.request_id)

    async def _refuse(self, rec: RequestRecord, exc: errors.RequestError) -> bytes:
        assert self._audit is not None
        try:
            await self._audit.record(
                rec.fields("deny", exc.code, phase="decision", message=exc.message), msg_id=rec.request_id
            )
        except errors.AuditError:
            log.error("audit unavailable while refusing request %s", rec.request_id)
        return error_reply(rec.reply_id, exc.code, exc.message)


async def run_broker(ws: Workspace, *, embedded: bool | None = None, port: int | None = None) -> None:
    """`rumi broker`: start the embedded nats-server when no URL is configured, serve until SIGTERM."""
    from broker.bus.server import EmbeddedServer, ensure_audit_stream

    cfg = ws.load_config()
    server: EmbeddedServer | None = None
    if embedded if embedded is not None else cfg.nats_url is None:
        server = EmbeddedServer(ws, cfg, port=port)
        server.start()
        log.info("embedded nats-server on %s", server.url)
    try:
        await ensure_audit_stream(ws)
        broker = Broker(ws, cfg)
        async with anyio.create_task_group() as tg:
            await tg.start(broker.serve)
            print(f"rumi broker: serving (chain {broker.chain_id}); Ctrl-C or SIGTERM stops", flush=True)
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    print("rumi broker: draining in-flight requests…", flush=True)
                    broker.stop()
                    break
    finally:
        if server is not None:
            server.stop()
