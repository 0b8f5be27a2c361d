"""The broker service: one request from the bus to a handler and back, audited.

For each message on ``rumi.pack.<pack_id>.req.<capability>``:

    identity (subject + server-stamped account) → rate → decode (strict) → scope → grant
    → args → audit decision event (acked before anything happens) → handler → outcome event → reply

Anything malformed, unknown, oversized, late or failing is answered with a typed error and
audited; the broker keeps serving.  Requests run in the broker's own task group behind a
capacity limit, never inside a nats-py callback, so a flood cannot block the read loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import json
import logging
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from anyio.abc import TaskStatus

from broker.core import errors
from broker.core.context import HandlerContext, Limits
from broker.core.ids import CAPABILITY_RE, PACK_ID_RE
from broker.core.protocol import (
    AUDIT_STREAM,
    BROKER_QUEUE,
    PROTOCOL_VERSION,
    REQUEST_DECODER,
    REQUEST_WILDCARD,
    error_reply,
    ok_reply,
)
from broker.core.workspace import RumiConfig, Workspace
from broker.service.approvals import ApprovalDesk
from broker.service.lanes import Lanes, LaneSettings, PackLane, stamped_account
from broker.service.metrics import BrokerMetrics, Listen, MeasuredAuditWriter, MetricsServer, listen_from_env
from broker.service.record import RequestRecord, peek_request_id

if TYPE_CHECKING:
    from nats.aio.client import Client

    from broker.audit.trail import AuditWriter
    from broker.bus.wire import WireConnection, WireMsg
    from broker.policy.grants import Decision, GrantStore, Policy
    from broker.policy.plugins import HandlerPlugin

log = logging.getLogger("rumi.broker")

MAX_TARGET = 256
# Each Pack's requests arrive on a connection of their own (see PackReader); these bound what one
# subscription buffers in the broker before it drops that Pack's excess.
PENDING_MSGS_LIMIT = 65_536
PENDING_BYTES_LIMIT = 128 * 1024 * 1024
PACK_POLL_INTERVAL = 1.0  # how often the broker looks for added or removed Packs
AUDIT_SPACE_POLL = 10.0  # how often the broker checks how full the audit stream is

Admit = Callable[["WireMsg", anyio.abc.TaskGroup], Coroutine[Any, Any, bool]]


class PackReader:
    """One Pack's requests, on a NATS connection of their own.

    The server buffers a bounded amount per connection and drops a connection that falls behind
    ("slow consumer"). With one shared connection a single flooding Pack made the server drop the
    broker for everyone; with one per Pack, only the flooding Pack's own connection can fall behind.

    A Pack whose requests are refused faster than `flood_refusals` per second is flooding: its
    subscription is paused (the server then answers its requests "no responders" by itself, at no
    cost to the broker) for one second, doubling while the flood goes on, up to `MAX_PAUSE`.
    """

    MAX_PAUSE = 8.0
    ADMIT_RUN = 16  # admitted requests read in one turn of the event loop, at most

    def __init__(self, ws: Workspace, pack_id: str, nc: WireConnection, flood_refusals: int) -> None:
        self.ws = ws
        self.pack_id = pack_id
        self.nc = nc
        self.sub: Any = None
        self.flood_refusals = flood_refusals
        self.pauses = 0
        self._stopped = False

    @classmethod
    async def open(
        cls, ws: Workspace, pack_id: str, requests: anyio.abc.TaskGroup, admit: Admit, flood_refusals: int
    ) -> PackReader:
        from broker.bus.server import wire_connect

        nc = await wire_connect(ws, "broker", name=f"rumi-broker-{pack_id}")
        reader = cls(ws, pack_id, nc, flood_refusals)
        await reader._subscribe()
        requests.start_soon(reader._read, requests, admit)
        return reader

    async def _subscribe(self) -> None:
        self.sub = await self.nc.subscribe(
            f"rumi.pack.{self.pack_id}.req.*",
            queue=BROKER_QUEUE,
            pending_msgs_limit=PENDING_MSGS_LIMIT,
            pending_bytes_limit=PENDING_BYTES_LIMIT,
        )

    async def _read(self, requests: anyio.abc.TaskGroup, admit: Admit) -> None:
        pause = 1.0
        while not self._stopped:
            window, refused = time.monotonic(), 0
            flooding = False
            # Never inside a nats-py callback. After each refusal, and after every `ADMIT_RUN` admitted
            # requests, a turn for everyone else: a Pack with a deep backlog cannot keep the event loop
            # from the other Packs' readers and requests (what it can admit at once is bounded by its
            # in-flight quota; past that, each message is a refusal and yields).
            admitted = 0
            async for msg in self.sub.messages:
                if await admit(msg, requests):
                    admitted += 1
                    if admitted < self.ADMIT_RUN:
                        continue
                else:
                    now = time.monotonic()
                    if now - window >= 1.0:
                        window, refused = now, 0
                    refused += 1
                    if refused > self.flood_refusals:
                        flooding = True
                        break
                admitted = 0
                await asyncio.sleep(0)
            if not flooding or self._stopped:
                return
            self.pauses += 1
            log.warning(
                "pack %s is flooding the broker: its requests go unanswered for %.0f s", self.pack_id, pause
            )
            await self.unsubscribe()
            await anyio.sleep(pause)
            pause = min(pause * 2, self.MAX_PAUSE) if refused > self.flood_refusals else 1.0
            if self._stopped:
                return
            await self._subscribe()

    async def unsubscribe(self) -> None:
        with contextlib.suppress(Exception):
            await self.sub.unsubscribe()

    async def stop(self) -> None:
        """Stop taking this Pack's requests (the broker is draining)."""
        self._stopped = True
        await self.unsubscribe()

    async def close(self) -> None:
        await self.stop()
        with contextlib.suppress(Exception):
            await self.nc.close()


def pack_worker(pack_id: str, workers: int) -> int:
    """Which of `workers` broker processes serves `pack_id`: a stable hash, so a Pack's lane (its
    bucket, quota, threads, tunnels) lives in exactly one process and per-Pack bounds are not
    multiplied by the number of workers."""
    if workers <= 1:
        return 0
    return int(hashlib.sha256(pack_id.encode()).hexdigest()[:8], 16) % workers


class Broker:
    """Serves Pack requests from NATS; stateless apart from its audit chain, so N can share a queue group."""

    def __init__(
        self, ws: Workspace, cfg: RumiConfig | None = None, *, worker: int = 0, workers: int = 1
    ) -> None:
        if not 0 <= worker < workers:
            raise ValueError(f"worker {worker} is not one of 0..{workers - 1}")
        self.ws = ws
        self.cfg = cfg or ws.load_config()
        self.worker, self.workers = worker, workers
        s = self.cfg.broker
        self.lanes = Lanes(
            LaneSettings(
                rate_per_second=s.rate_per_second,
                burst=s.burst,
                max_in_flight=s.max_in_flight_per_pack,
                threads=s.threads_per_pack,
                individual_refusals=s.refusals_per_second,
            )
        )
        self.in_flight = 0
        self.served = 0
        self._nc: Client | None = None
        self._policy: Policy | None = None
        self._grants: GrantStore | None = None
        self._audit: AuditWriter | None = None
        self._aggregator: Any = None
        self._background: anyio.abc.TaskGroup | None = None
        self._readers: dict[str, PackReader] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.audit_usage: tuple[int, int] | None = None  # (bytes stored, limit), from the stream
        self._max_reply = 1024 * 1024
        self.stopping = anyio.Event()
        self.metrics = BrokerMetrics(worker=worker, workers=workers)
        self.metrics.observe(self)
        self.approvals = ApprovalDesk()

    @property
    def chain_id(self) -> str:
        assert self._audit is not None
        return str(self._audit.chain.chain_id)

    # -- lifecycle -------------------------------------------------------------------------
    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, subscribe in the queue group and serve until cancelled or `stop()`; then drain."""
        from broker.audit.checkpoint import Checkpointer
        from broker.audit.trail import RefusalAggregator
        from broker.bus.server import connect, wire_connect
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
        checkpoints = Checkpointer.open(self.ws, worker=self.worker)  # this worker's signing key, chain
        nc = await connect(self.ws, "broker", name="rumi-broker")
        self._nc = nc
        self._max_reply = int(getattr(nc, "max_payload", 0) or 1024 * 1024)
        # The audit writer's publishes and acks go over a lean connection of their own (broker.bus.wire).
        try:
            audit_conn = await wire_connect(self.ws, "broker", name="rumi-broker-audit")
        except BaseException:
            await nc.close()
            raise
        self._audit = MeasuredAuditWriter(audit_conn, checkpoints.chain, metrics=self.metrics)
        self._aggregator = RefusalAggregator(self._audit)
        try:
            async with anyio.create_task_group() as tg:
                self._background = tg
                # The grant store's watch loop, counted (rumi_policy_reloads_total).
                await tg.start(
                    functools.partial(
                        self.metrics.watch_policy,
                        self._policy,
                        interval=self.cfg.broker.grant_poll_interval,
                        rescan=self.cfg.broker.grant_rescan_interval,
                    )
                )
                self.metrics.count_tunnels()
                tg.start_soon(self._aggregator.run)
                await tg.start(self.approvals.serve, nc, self._audit, self.stopping)
                tg.start_soon(checkpoints.run, self._audit)
                tg.start_soon(self._watch_audit_space, nc)
                async with anyio.create_task_group() as requests:
                    await self._sync_pack_readers(requests)
                    log.info("broker %s serving %s", self.chain_id, REQUEST_WILDCARD)
                    task_status.started()
                    tg.start_soon(self._watch_packs, requests)
                    await self.stopping.wait()
                    await self._stop_reading(requests)
                # All in-flight requests are done (drained): handlers end their open sessions
                # (a tunnel's outcome event is written now, not lost), then stop the helpers.
                with anyio.move_on_after(5, shield=True):
                    await self._shutdown_handlers()
                    await self._aggregator.flush()
                    await self._audit.drain()
                    await checkpoints.final(self._audit)  # the chain ends signed
                    await self._audit.drain()
                tg.cancel_scope.cancel()
        finally:
            self._background = None
            with anyio.move_on_after(5, shield=True):
                await self._audit.close()
                await audit_conn.close()
                for reader in list(self._readers.values()):
                    await reader.close()
                if not nc.is_closed:
                    await nc.drain()

    # -- one connection per Pack ---------------------------------------------------------------
    async def _sync_pack_readers(self, requests: anyio.abc.TaskGroup) -> None:
        """A reader (connection + subscription) for each Pack of the workspace; none for removed ones."""
        wanted = {p for p in self.ws.pack_ids() if pack_worker(p, self.workers) == self.worker}
        for pack_id in sorted(wanted - set(self._readers)):
            try:
                self._readers[pack_id] = await PackReader.open(
                    self.ws, pack_id, requests, self._admit, self.cfg.broker.flood_refusals_per_second
                )
            except Exception as exc:
                log.error("cannot serve pack %s yet: %s", pack_id, exc)
        for pack_id in sorted(set(self._readers) - wanted):
            await self._readers.pop(pack_id).close()

    async def _watch_audit_space(self, nc: Client) -> None:
        """Log an alarm while the audit stream is over `audit_alarm_ratio` of its size limit."""
        alarmed = False
        while True:
            try:
                msg = await nc.request(f"$JS.API.STREAM.INFO.{AUDIT_STREAM}", b"", timeout=5)
                info = json.loads(msg.data)
                used = int(info["state"]["bytes"])
                limit = int(info["config"].get("max_bytes", -1))
            except Exception as exc:
                log.debug("audit stream info unavailable: %s", type(exc).__name__)
            else:
                if limit <= 0:
                    limit = self.cfg.audit_max_bytes
                self.audit_usage = (used, limit)
                over = used >= self.cfg.audit_alarm_ratio * limit
                if over and not alarmed:
                    log.warning(
                        "ALARM: the audit stream %s holds %d of %d bytes (%.0f%%); when it is full every "
                        "request is refused: export and archive it, then raise audit_max_bytes",
                        AUDIT_STREAM, used, limit, 100 * used / limit,
                    )  # fmt: skip
                elif alarmed and not over:
                    log.info(
                        "audit stream %s back under %.0f%% of its limit",
                        AUDIT_STREAM,
                        100 * self.cfg.audit_alarm_ratio,
                    )
                alarmed = over
            await anyio.sleep(AUDIT_SPACE_POLL)

    async def _watch_packs(self, requests: anyio.abc.TaskGroup) -> None:
        while not self.stopping.is_set():
            await anyio.sleep(PACK_POLL_INTERVAL)
            try:
                await self._sync_pack_readers(requests)
            except Exception:
                log.exception("pack readers: resync failed; trying again")

    async def _stop_reading(self, requests: anyio.abc.TaskGroup) -> None:
        # Stop taking new requests; in-flight ones finish (bounded by the handler timeout).
        with anyio.move_on_after(2, shield=True):
            for reader in list(self._readers.values()):
                await reader.stop()
        with anyio.move_on_after(self.cfg.broker.request_timeout + 5):
            while self.in_flight:
                await anyio.sleep(0.02)
        for task in list(self._tasks):
            task.cancel()
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
    async def _admit(self, msg: WireMsg, requests: anyio.abc.TaskGroup) -> bool:
        """Run inline by the Pack's reader: the lane's bounds first, an over-limit request refused at once.

        The lane is the server-stamped account's. A refusal here costs a token check and a reply; an
        admitted request becomes a task of the broker's own group and holds one of its Pack's slots.
        """
        lane = self.lanes.lane(stamped_account(msg.headers))
        parts = msg.subject.split(".")
        rec = RequestRecord(
            request_id=peek_request_id(msg.data) or "x-" + secrets.token_hex(12),
            pack_id=lane.pack_id or (parts[2] if len(parts) == 5 else ""),
            capability=parts[4] if len(parts) == 5 else "",
        )
        self.served += 1
        if not self.lanes.take_token(lane):
            await self._respond(msg, await self._throttle(lane, rec, "too many requests; slow down"))
            return False
        if not self.lanes.has_room(lane):
            message = "too many requests in flight for this Pack; slow down"
            await self._respond(msg, await self._throttle(lane, rec, message))
            return False
        lane.in_flight += 1
        self.in_flight += 1
        # A plain asyncio task (no task-group bookkeeping per request); `_stop_reading` ends stragglers.
        task = asyncio.get_running_loop().create_task(self._serve(msg, lane, rec))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _serve(self, msg: WireMsg, lane: PackLane, rec: RequestRecord) -> None:
        try:
            reply = await self._process(msg, lane, rec)
        finally:
            lane.in_flight -= 1
            self.in_flight -= 1
        await self._respond(msg, reply)
        self.metrics.request(lane.pack_id, rec.capability, rec.decision, rec.code, rec.started)

    @staticmethod
    async def _respond(msg: WireMsg, reply: bytes) -> None:
        if msg.reply:
            try:
                await msg.respond(reply)
            except Exception as exc:
                log.warning("could not send a reply: %s", exc)

    async def _throttle(self, lane: PackLane, rec: RequestRecord, message: str) -> bytes:
        # Never waits: counted into the Pack's aggregate event for this second.
        self.metrics.throttled(lane.pack_id, rec.capability)
        await self._aggregator.add(rec.fields("deny", "rate_limited"), key=lane.account)
        return error_reply(rec.reply_id, "rate_limited", message)

    async def _process(self, msg: WireMsg, lane: PackLane, rec: RequestRecord) -> bytes:
        try:
            self._check_identity(msg, lane)
            return await self._decide_and_run(msg, lane, rec)
        except errors.RequestError as exc:
            return await self._refuse(lane, rec, exc)
        except Exception:
            # Fail closed on our own bugs too: deny, audit, keep serving.
            log.exception("unexpected broker error")
            return await self._refuse(lane, rec, errors.Unavailable("internal broker error"))

    @staticmethod
    def _check_identity(msg: WireMsg, lane: PackLane) -> None:
        parts = msg.subject.split(".")
        pack_id = parts[2] if len(parts) == 5 else ""
        capability = parts[4] if len(parts) == 5 else ""
        if not PACK_ID_RE.match(pack_id):
            raise errors.InvalidRequest("malformed request subject")
        if not CAPABILITY_RE.match(capability):
            raise errors.UnknownCapability("malformed capability name")
        # The server stamps the requester's account on imported service requests; a request
        # that did not come through that Pack's account import is not that Pack's.
        if lane.pack_id != pack_id:
            raise errors.Denied("request did not come from this Pack's account")

    async def _decide_and_run(self, msg: WireMsg, lane: PackLane, rec: RequestRecord) -> bytes:
        """decode → decide → validate args → authorize → decision event → handler → outcome → reply."""
        assert self._policy is not None
        req = self._decode(msg, rec)
        decision = self._policy.decide(rec.pack_id, req.component_id, rec.capability)
        if decision.source and decision.source != req.component_id:
            rec.grant = decision.source  # the audit trail says which file allowed it
        plugin = decision.plugin
        raw = dict(req.args)
        args = plugin.convert_args(raw)
        rec.target = self._target(plugin, raw)
        if plugin.authorize is not None:
            plugin.authorize(decision.grant, args)  # pure: raises Denied before anything is recorded
        # A continuation (e.g. data on a tunnel) belongs to a session whose opening request was
        # audited; the grant is still checked above on every one, so revocation ends it.
        if plugin.continuation is not None and plugin.continuation(raw):
            return await self._continue_session(plugin, decision, args, lane, rec)
        if decision.grant.get("mode") == "ask":  # held for an operator (broker/service/approvals.py)
            if (refusal := await self.approvals.hold(rec, decision.grant)) is not None:
                return refusal  # denied by the operator, or nobody answered in time
            decision = self._decide_again(rec, plugin, args)
        if plugin.side_effect_free:
            return await self._read(plugin, decision, args, lane, rec)
        session = plugin.opens_session is not None and bool(plugin.opens_session(raw))
        if not await self._record_decision(rec, session=session):
            rec.decision, rec.code = "error", "unavailable"
            return error_reply(rec.request_id, "unavailable", "audit log unavailable; request refused")
        context = self._context(rec, decision, lane)
        data, exc = await self._run_handler(plugin, context, args, lane, rec)
        reply, exc = self._reply(rec, data, exc)
        if exc is not None or not session:
            # The reply waits only for the decision; the outcome follows it into the stream.
            self._outcome_later(rec, exc, context.audit)
        return reply

    async def _read(
        self, plugin: HandlerPlugin, decision: Decision, args: Any, lane: PackLane, rec: RequestRecord
    ) -> bytes:
        """A side-effect-free request: run it, then one event holding decision and outcome.

        The event is acknowledged before the reply releases any data: nothing leaves unrecorded.
        """
        assert self._audit is not None
        context = self._context(rec, decision, lane)
        data, exc = await self._run_handler(plugin, context, args, lane, rec)
        reply, exc = self._reply(rec, data, exc)
        try:
            await self._audit.record(
                self._outcome_fields(rec, exc, context.audit, "complete"), msg_id=rec.request_id
            )
        except errors.AuditError:
            log.error("audit unavailable: withholding the result of %s %s", rec.pack_id, rec.capability)
            rec.decision, rec.code = "error", "unavailable"
            return error_reply(rec.request_id, "unavailable", "audit log unavailable; request refused")
        return reply

    async def _continue_session(
        self, plugin: HandlerPlugin, decision: Decision, args: Any, lane: PackLane, rec: RequestRecord
    ) -> bytes:
        context = self._context(rec, decision, lane)
        data, exc = await self._run_handler(plugin, context, args, lane, rec)
        reply, exc = self._reply(rec, data, exc)
        if exc is not None:
            self._outcome_later(rec, exc, context.audit)  # a failed continuation is on record
        return reply

    def _decode(self, msg: WireMsg, rec: RequestRecord) -> Any:
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
    def _target(plugin: HandlerPlugin, raw: dict[str, Any]) -> str:
        try:
            return str(plugin.target(raw))[:MAX_TARGET]
        except Exception:
            return ""

    async def _record_decision(self, rec: RequestRecord, *, session: bool = False) -> bool:
        """Write-ahead: the allow decision is stored before anything happens. False if it could not be."""
        assert self._audit is not None
        fields = rec.fields("allow", "ok", phase="decision", extra={"session": True} if session else None)
        try:
            await self._audit.record(fields, msg_id=rec.request_id)
        except errors.AuditError:
            log.error("audit unavailable: refusing %s %s", rec.pack_id, rec.capability)
            return False
        return True

    def _context(self, rec: RequestRecord, decision: Decision, lane: PackLane) -> HandlerContext:
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
            run_blocking=lane.run_blocking,
        )

    async def _run_handler(
        self, plugin: HandlerPlugin, context: HandlerContext, args: Any, lane: PackLane, rec: RequestRecord
    ) -> tuple[Any, errors.RequestError | None]:
        """(data, None) on success, (None, the refusal or a safe error) otherwise."""
        try:
            async with asyncio.timeout(self.cfg.broker.request_timeout):
                result = await self._execute(plugin, context, args, lane)
            if not isinstance(result, dict) or result.get("success") is not True:
                raise errors.HandlerFailed("handler returned no success")
        except TimeoutError:
            return None, errors.Timeout("handler did not finish in time")
        except errors.RequestError as exc:
            return None, exc
        except Exception as exc:
            log.warning("handler %s failed: %s", rec.capability, type(exc).__name__)
            return None, errors.HandlerFailed("handler failed")
        return result.get("data"), None

    def _reply(
        self, rec: RequestRecord, data: Any, exc: errors.RequestError | None
    ) -> tuple[bytes, errors.RequestError | None]:
        """The reply bytes, and the error it carries (an oversized result becomes `too_large`)."""
        if exc is None:
            payload = ok_reply(rec.request_id, data)
            if len(payload) <= self._max_reply:
                return payload, None
            # The server would drop an oversized reply and the Pack would only see a timeout.
            exc = errors.TooLarge("the result is larger than the NATS payload limit")
        rec.decision, rec.code = "deny" if exc.code == "permission_denied" else "error", exc.code
        return error_reply(rec.request_id, exc.code, exc.message), exc

    def _decide_again(self, rec: RequestRecord, plugin: HandlerPlugin, args: Any) -> Decision:
        """After an approved ask: the grant as it is now (revoked or narrowed while it waited: refused)."""
        decision = self._policy_decide(rec.pack_id, rec.component_id, rec.capability)
        if decision.plugin is not plugin:
            raise errors.Denied("the handler changed while the request waited; send it again")
        if plugin.authorize is not None:
            plugin.authorize(decision.grant, args)
        return decision

    def _policy_decide(self, pack_id: str, component_id: str, capability: str) -> Decision:
        assert self._policy is not None
        return self._policy.decide(pack_id, component_id, capability)

    async def _execute(
        self, plugin: HandlerPlugin, context: HandlerContext, args: Any, lane: PackLane
    ) -> Any:
        if plugin.is_async:
            return await plugin.execute(context, args)
        # Blocking handlers (file I/O, Docker) run off the event loop, in the Pack's own threads.
        return await anyio.to_thread.run_sync(
            plugin.execute, context, args, abandon_on_cancel=True, limiter=lane.threads
        )

    @staticmethod
    def _outcome_fields(
        rec: RequestRecord, exc: errors.RequestError | None, extra: dict[str, Any], phase: str
    ) -> dict[str, Any]:
        # A handler that refuses (path outside the grant, key not granted) denied the request.
        decision = "allow" if exc is None else "deny" if exc.code == "permission_denied" else "error"
        return rec.fields(
            decision,
            exc.code if exc else "ok",
            phase=phase,
            message=exc.message if exc else None,
            extra=dict(extra) or None,
        )

    async def _outcome(
        self, rec: RequestRecord, exc: errors.RequestError | None, extra: dict[str, Any]
    ) -> None:
        assert self._audit is not None
        fields = self._outcome_fields(rec, exc, extra, "outcome")
        try:
            await self._audit.record(fields, msg_id=f"{rec.request_id}.outcome")
        except errors.AuditError:
            log.error("could not store the outcome event of request %s", rec.request_id)

    def _outcome_later(
        self, rec: RequestRecord, exc: errors.RequestError | None, extra: dict[str, Any]
    ) -> None:
        """Queue the outcome event without holding the reply (no task per event); the writer stores it,
        logs a failure, and is drained before the broker stops."""
        assert self._audit is not None
        fields = self._outcome_fields(rec, exc, dict(extra), "outcome")
        self._audit.queue_later(fields, msg_id=f"{rec.request_id}.outcome")

    async def _refuse(self, lane: PackLane, rec: RequestRecord, exc: errors.RequestError) -> bytes:
        """One `deny` event for a refused request, or, past the Pack's refusals per second, its aggregate."""
        assert self._audit is not None
        rec.decision, rec.code = "deny", exc.code
        fields = rec.fields("deny", exc.code, phase="decision", message=exc.message)
        if not self.lanes.record_individually(lane):
            await self._aggregator.add(fields, key=lane.account)
            return error_reply(rec.reply_id, exc.code, exc.message)
        try:
            await self._audit.record(fields, msg_id=rec.request_id)
        except errors.AuditError:
            log.error("audit unavailable while refusing request %s", rec.request_id)
        return error_reply(rec.reply_id, exc.code, exc.message)


async def run_broker(
    ws: Workspace,
    *,
    embedded: bool | None = None,
    port: int | None = None,
    workers: int = 1,
    metrics: Listen | None = None,
) -> None:
    """`rumi broker`: start the embedded nats-server when no URL is configured, serve until SIGTERM.

    With `workers` > 1, N broker processes serve, each with its own audit chain and its own share of
    the Packs (`pack_worker`); this process supervises them (a worker that dies is started again).
    `metrics` (default: RUMI_METRICS_LISTEN, which `--metrics` sets) is where `/metrics` is served;
    worker i serves it on the port + i.
    """
    from broker.bus.server import EmbeddedServer, ensure_audit_stream

    cfg = ws.load_config()
    listen = metrics if metrics is not None else listen_from_env()
    server: EmbeddedServer | None = None
    metrics_server: MetricsServer | None = None
    if embedded if embedded is not None else cfg.nats_url is None:
        server = EmbeddedServer(ws, cfg, port=port)
        server.start()
        log.info("embedded nats-server on %s", server.url)
    try:
        await ensure_audit_stream(ws)
        if workers > 1:
            await _supervise_workers(ws, workers, listen)
            return
        broker = Broker(ws, cfg)
        metrics_server = MetricsServer.start(listen, broker.metrics.registry) if listen else None
        # The signal receiver is in place before "serving" is printed: a SIGTERM sent as soon as the
        # line appears drains the broker (and stops its nats-server) instead of killing it outright.
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as tg:
                await tg.start(broker.serve)
                print(f"rumi broker: serving (chain {broker.chain_id}); Ctrl-C or SIGTERM stops", flush=True)
                async for _ in signals:
                    print("rumi broker: draining in-flight requests…", flush=True)
                    broker.stop()
                    break
    finally:
        if metrics_server is not None:
            metrics_server.stop()
        if server is not None:
            server.stop()


async def serve_worker(ws: Workspace, worker: int, workers: int, metrics: Listen | None = None) -> None:
    """One worker process of `run_broker(workers=N)`: serve this worker's Packs until SIGTERM.

    `metrics` is this worker's own `/metrics` address; if it cannot be bound the worker serves anyway.
    """
    broker = Broker(ws, worker=worker, workers=workers)
    metrics_server: MetricsServer | None = None
    if metrics is not None:
        try:
            metrics_server = MetricsServer.start(metrics, broker.metrics.registry)
        except errors.RuntimeSetupError as exc:
            log.error("worker %d serves without metrics: %s", worker, exc)
    try:
        await _serve_until_signal(broker, worker, workers)
    finally:
        if metrics_server is not None:
            metrics_server.stop()


async def _serve_until_signal(broker: Broker, worker: int, workers: int) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            await tg.start(broker.serve)
            print(f"worker {worker}/{workers}: serving (chain {broker.chain_id})", flush=True)
            async for _ in signals:
                broker.stop()
                break


WORKER_RESTART_DELAY = 1.0


async def _supervise_workers(ws: Workspace, workers: int, metrics: Listen | None = None) -> None:
    """Start `workers` worker processes, restart one that exits, stop them all on SIGTERM/SIGINT.

    Their output is relayed to ours; "serving" is announced once every worker serves.
    """
    import sys

    serving: set[int] = set()
    announced = anyio.Event()
    stopping = anyio.Event()
    procs: dict[int, anyio.abc.Process] = {}

    async def run(i: int) -> None:
        argv = [sys.executable, "-m", "broker.service.worker", str(ws.root), str(i), str(workers)]
        if metrics is not None:
            argv.append(str(metrics.worker(i)))
        while not stopping.is_set():
            async with await anyio.open_process(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            ) as proc:
                procs[i] = proc
                assert proc.stdout is not None
                buffered = b""
                async for chunk in proc.stdout:
                    buffered += chunk
                    *lines, buffered = buffered.split(b"\n")
                    for line in lines:
                        sys.stdout.buffer.write(line + b"\n")
                        if b": serving (chain" in line:
                            serving.add(i)
                    sys.stdout.flush()
                    if len(serving) == workers and not announced.is_set():
                        announced.set()
                        print(
                            f"rumi broker: serving with {workers} workers; Ctrl-C or SIGTERM stops",
                            flush=True,
                        )
                code = await proc.wait()
            serving.discard(i)
            if stopping.is_set():
                return
            log.error("broker worker %d exited with %s; starting it again", i, code)
            await anyio.sleep(WORKER_RESTART_DELAY)

    async with anyio.create_task_group() as tg:
        for i in range(workers):
            tg.start_soon(run, i)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                print("rumi broker: draining in-flight requests…", flush=True)
                break
        stopping.set()
        with anyio.CancelScope(shield=True):
            for proc in procs.values():
                if proc.returncode is None:
                    proc.terminate()
            with anyio.move_on_after(40):
                for proc in procs.values():
                    await proc.wait()
            for proc in procs.values():
                if proc.returncode is None:
                    proc.kill()
