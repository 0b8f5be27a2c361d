"""Tamper-evident audit log: events, hash chains, the JetStream writer, and readers.

Every event is one JSON object stored as one message of the JetStream stream ``RUMI_AUDIT`` on subject
``rumi.audit.<pack_id>.<capability>``.  Each broker instance keeps its own chain (``chain`` id, ``seq``
1, 2, 3…); every event carries the hash of its chain predecessor in ``prev_hash`` and its own ``hash``:

    hash = sha256(canonical_json(event without "hash")).hexdigest()
    canonical_json(e) = json.dumps(e, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                   allow_nan=False).encode("utf-8")

The message payload is ``canonical_json(event)`` (``hash`` included), so any client can re-check it.
Write-ahead: the broker records (and waits for the JetStream ack of) an allowed request's ``decision``
event before the handler runs; see docs/audit.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, Final

import msgspec

from broker.core.errors import AuditError, ChainBroken
from broker.core.ids import is_pack_id
from broker.core.protocol import AUDIT_STREAM, AUDIT_SUBJECTS, audit_subject

__all__ = [
    "AUDIT_VERSION",
    "CHECKPOINT_PHASE",
    "DECISIONS",
    "ZERO_HASH",
    "AuditChain",
    "AuditWriter",
    "ChainVerifier",
    "RateLimitAggregator",
    "RefusalAggregator",
    "VerifyFailure",
    "VerifyReport",
    "audit_fields",
    "canonical_json",
    "event_hash",
    "export_events",
    "load_events",
    "read_events",
    "read_stored",
    "utc_timestamp",
    "verify_events",
    "verify_stream",
]

log = logging.getLogger(__name__)

AUDIT_VERSION: Final = 1
ZERO_HASH: Final = "0" * 64
DECISIONS: Final = ("allow", "deny", "error")
# `ask`: a request held for an operator's answer (ask mode); its `decision` event follows it.
PHASES: Final = ("decision", "outcome", "complete", "ask")
# A broker's signed checkpoint (broker/audit/checkpoint.py): written by the broker itself, never via
# `audit_fields`, so no request can produce one.
CHECKPOINT_PHASE: Final = "checkpoint"
# Fields the chain owns; callers never set them.
CHAIN_FIELDS: Final = ("chain", "seq", "prev_hash", "hash")
REQUIRED_FIELDS: Final = (
    "v", "ts", "request_id", "pack_id", "component_id", "capability", "target",
    "decision", "code", "duration_ms", *CHAIN_FIELDS,
)  # fmt: skip
# Keep events small and free of bulk data: a handler's extra fields are scalars, strings are capped.
MAX_TEXT: Final = 512
MAX_EXTRA_KEYS: Final = 16
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")


# ----------------------------------------------------------------------------------------- events


_SORTED_JSON = msgspec.json.Encoder(order="sorted")
# Where msgspec and json.dumps format a float differently (exponent notation: 1e-07 vs 1e-7).
_PLAIN_FLOAT_MIN, _PLAIN_FLOAT_MAX = 1e-4, 1e16


def _plain(value: Any) -> bool:
    """True if `value` is a float both encoders write alike (NaN and infinities are not)."""
    return bool(value == 0.0 or _PLAIN_FLOAT_MIN <= abs(value) < _PLAIN_FLOAT_MAX)


def _fast_encodable(event: Mapping[str, Any]) -> bool:
    for value in event.values():
        kind = type(value)
        if kind is float:
            if not _plain(value):
                return False
        elif kind is dict:
            for inner in value.values():
                if type(inner) is float:
                    if not _plain(inner):
                        return False
                elif type(inner) in (dict, list):
                    return False
        elif kind is list or kind is tuple:
            return False
    return True


def canonical_json(event: Mapping[str, Any]) -> bytes:
    """The exact bytes an event is hashed (and stored) as: sorted keys, no spaces, UTF-8, no NaN.

    Defined as ``json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    allow_nan=False).encode()``. Events of the usual shape (flat, scalars, `extra` one level deep)
    are encoded by msgspec, which writes exactly these bytes for them (tests/test_audit.py checks it);
    anything else goes through `json.dumps` itself.
    """
    if _fast_encodable(event):
        try:
            return _SORTED_JSON.encode(event)
        except (TypeError, ValueError, OverflowError):
            pass
    return json.dumps(
        dict(event), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def event_hash(event: Mapping[str, Any]) -> str:
    """SHA-256 hex of the event's canonical JSON without its ``hash`` field."""
    body = {k: v for k, v in event.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


_second: list[Any] = [-1, ""]  # the last whole second formatted, and its text


def utc_timestamp(when: datetime | None = None) -> str:
    """RFC 3339 UTC with microseconds, e.g. ``2026-11-28T10:00:00.123456Z``."""
    if when is not None:
        return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    now = time.time_ns() // 1000
    seconds, micros = divmod(now, 1_000_000)
    if seconds != _second[0]:
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second[0] = seconds
    return f"{_second[1]}.{micros:06d}Z"


def _cap(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _safe_extra(extra: Mapping[str, Any]) -> dict[str, Any]:
    # Only scalars reach the log: a handler cannot smuggle content in a nested structure.
    out: dict[str, Any] = {}
    for key in sorted(extra)[:MAX_EXTRA_KEYS]:
        value = extra[key]
        if isinstance(value, bool | int | None):
            out[_cap(str(key))] = value
        elif isinstance(value, float):
            out[_cap(str(key))] = value if value == value and abs(value) != float("inf") else None
        elif isinstance(value, str):
            out[_cap(str(key))] = _cap(value)
    return out


def audit_fields(
    *,
    request_id: str,
    pack_id: str,
    component_id: str,
    capability: str,
    target: str,
    decision: str,
    code: str,
    duration_ms: float,
    phase: str | None = None,
    count: int | None = None,
    extra: Mapping[str, Any] | None = None,
    message: str | None = None,
    ts: str | None = None,
) -> dict[str, Any]:
    """Build the caller's part of an event (everything but the chain fields), capped and typed.

    ``target`` is what was acted on (path, key name, domain:port, argv[0]) — never a secret or content.
    """
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
    if phase is not None and phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    duration = float(duration_ms)
    if duration != duration or duration in (float("inf"), float("-inf")):
        duration = 0.0
    fields: dict[str, Any] = {
        "v": AUDIT_VERSION,
        "ts": ts or utc_timestamp(),
        "request_id": _cap(str(request_id)),
        "pack_id": _cap(str(pack_id)),
        "component_id": _cap(str(component_id)),
        "capability": _cap(str(capability)),
        "target": _cap(str(target)),
        "decision": decision,
        "code": _cap(str(code)),
        "duration_ms": round(duration, 3),
    }
    if phase is not None:
        fields["phase"] = phase
    if count is not None:
        fields["count"] = int(count)
    if extra:
        fields["extra"] = _safe_extra(extra)
    if message is not None:
        fields["message"] = _cap(str(message))
    return fields


def _new_chain_id() -> str:
    return f"b-{secrets.token_hex(6)}"


class AuditChain:
    """One broker instance's hash chain; `seal` must be called in the order events are published."""

    def __init__(self, chain_id: str | None = None) -> None:
        self.chain_id = chain_id or _new_chain_id()
        self.seq = 0
        self.last_hash = ZERO_HASH

    def seal(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Return a copy of `fields` with ``chain``, ``seq``, ``prev_hash`` and ``hash`` set (synchronous)."""
        event = {k: v for k, v in fields.items() if k not in CHAIN_FIELDS}
        if isinstance(event.get("extra"), Mapping):
            event["extra"] = _safe_extra(event["extra"])  # handler-supplied: scalars only, capped
        event.setdefault("v", AUDIT_VERSION)
        event.setdefault("ts", utc_timestamp())
        event["chain"] = self.chain_id
        event["seq"] = self.seq + 1
        event["prev_hash"] = self.last_hash
        try:
            digest = event_hash(event)
        except (TypeError, ValueError) as exc:
            # Raised before the chain advances, so a bad event leaves no hole.
            raise AuditError(f"audit event is not JSON-serialisable: {exc}") from None
        event["hash"] = digest
        self.seq += 1
        self.last_hash = digest
        return event

    def rotate(self) -> None:
        """Start a fresh chain (new id, seq 1) so later events do not hang off one that was never stored."""
        self.chain_id = _new_chain_id()
        self.seq = 0
        self.last_hash = ZERO_HASH


# ----------------------------------------------------------------------------------------- writer


def _subject_token(value: Any) -> str:
    # Subject tokens must not contain dots or wildcards; odd values still land in the stream.
    text = str(value)
    return text if _TOKEN_RE.match(text) else "_invalid"


class _AckReply(msgspec.Struct):
    """A JetStream publish acknowledgement (or its error), leniently: only what the writer checks."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_ACK_DECODER = msgspec.json.Decoder(_AckReply)


class _Waiter:
    """One sealed event on its way into the stream: sent (at most twice), then acked or failed."""

    __slots__ = ("caller", "deadline", "event", "msg_id", "payload", "retried", "subject")

    def __init__(
        self,
        subject: str,
        payload: bytes,
        msg_id: str,
        event: dict[str, Any],
        caller: asyncio.Future[dict[str, Any]] | None,
        deadline: float,
    ) -> None:
        self.subject = subject
        self.payload = payload
        self.msg_id = msg_id
        self.event = event
        self.caller = caller
        self.deadline = deadline
        self.retried = False


class AuditWriter:
    """Seals events and stores them in JetStream: group commit by one writer task, one ack subscription.

    `record` queues its fields for the writer task and waits for that event's acknowledgement. The
    writer takes every event that concurrent requests queued meanwhile, seals them in order (stream
    order = chain order), publishes them back to back (they leave in one socket write), and resolves
    each waiter as its ack arrives on the writer's own reply subscription. One deadline sweep serves
    all waiters: no task and no timer per event. `record_later` queues an event nobody waits for (an
    outcome written after the reply); `drain` waits until everything queued is stored or failed.

    Failure: an event without an ack within `timeout`, or refused, is sent once more with the same
    ``Nats-Msg-Id`` after `retry_delay` (JetStream drops the copy if the first was stored after all).
    If that fails too, its waiter gets `AuditError` (an unawaited event is logged) and the chain
    rotates, so later events do not hang off an event that may never have been stored.
    """

    def __init__(
        self,
        js: Any,
        chain: AuditChain,
        timeout: float = 2.0,
        retry_delay: float = 0.05,
        max_pending: int = 8192,
    ) -> None:
        # A JetStream context (its connection is used) or a connection (nats-py or broker.bus.wire).
        self._nc = getattr(js, "_nc", js)
        self._publish_nowait = getattr(self._nc, "publish_nowait", None)
        self._flush_now = getattr(self._nc, "flush_now", None)
        self.chain = chain
        self.timeout = timeout
        self.retry_delay = retry_delay
        self.max_pending = max_pending
        self._queue: list[tuple[dict[str, Any], str, asyncio.Future[dict[str, Any]] | None]] = []
        self._retries: list[tuple[float, _Waiter]] = []
        self._inflight: dict[str, _Waiter] = {}
        self._wake: asyncio.Event | None = None
        self._room: asyncio.Event | None = None
        self._prefix = ""
        self._sub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._start_lock: asyncio.Lock | None = None
        self._next = 0
        self._closed = False
        self.batches = 0  # publish rounds (a round sends every event queued at that moment)
        self.stored = 0  # events acknowledged

    @staticmethod
    def stored_msg_id(msg_id: str, event: Mapping[str, Any]) -> str:
        """The ``Nats-Msg-Id`` an event is published with: the caller's id plus ``|<chain>.<seq>``.

        The suffix makes it unique per event: request ids are chosen by Packs, so a Pack that reused one
        would otherwise have JetStream drop its next audit event as a duplicate (an unaudited action and
        a hole in the chain).  A retry of the same event keeps the same id, so it is still stored once.
        """
        return f"{msg_id}|{event['chain']}.{event['seq']}"

    @property
    def pending(self) -> int:
        """Events queued, sent or waiting for a retry, and not yet acknowledged or failed."""
        return len(self._queue) + len(self._inflight) + len(self._retries)

    async def record(self, fields: dict[str, Any], *, msg_id: str) -> dict[str, Any]:
        """Seal `fields` into the chain, store it, and return the event once JetStream has acked it.

        Published with ``Nats-Msg-Id`` = `stored_msg_id(msg_id, event)`. Raises `AuditError` when the
        event could not be stored (after one retry), or when `max_pending` events are already waiting
        and none is acknowledged within `timeout`.
        """
        await self._ensure_started()
        if self.pending >= self.max_pending:
            await self._wait_for_room()
        caller: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((fields, msg_id, caller))
        self._wake.set()  # type: ignore[union-attr]
        return await caller

    def queue_later(self, fields: dict[str, Any], *, msg_id: str) -> None:
        """Queue an event nobody waits for (an outcome written after the reply); a failure is logged.

        Never waits; `drain` waits for it. Call it from the event loop.
        """
        self._queue.append((fields, msg_id, None))
        if self._task is not None and not self._task.done() and self._wake is not None:
            self._wake.set()
        else:
            self._starting = asyncio.get_running_loop().create_task(self._start_and_kick())

    async def _start_and_kick(self) -> None:
        try:
            await self._ensure_started()
        except Exception as exc:
            # No writer (its connection is gone, or it was closed): what is queued fails, logged.
            self._fail_all(AuditError(f"the audit writer cannot start: {_describe(exc)}"))
            return
        assert self._wake is not None
        self._wake.set()

    async def drain(self, timeout: float = 5.0) -> bool:
        """Wait until nothing is queued or waiting for an ack; False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not self.pending

    async def close(self) -> None:
        """Stop the writer task and its reply subscription; whatever is still pending fails, and so does
        anything recorded later."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._fail_all(AuditError("the audit writer stopped before the event was stored"))

    # -- the writer task ----------------------------------------------------------------------------
    async def _ensure_started(self) -> None:
        if self._task is not None and not self._task.done():
            return
        if self._closed:
            raise AuditError("the audit writer is closed")
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._task is not None and not self._task.done():
                return
            if self._sub is None:
                prefix = self._nc.new_inbox() + "."
                # A connection that calls plain callbacks as it parses (broker.bus.wire) gets the
                # ack handler itself; nats-py gets a coroutine around it.
                inline = getattr(self._nc, "delivers_inline", False)
                self._sub = await self._nc.subscribe(prefix + "*", cb=self._ack if inline else self._on_ack)
                self._prefix = prefix
            self._wake = asyncio.Event()
            self._room = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="rumi-audit-writer")

    async def _wait_for_room(self) -> None:
        assert self._room is not None
        deadline = time.monotonic() + self.timeout
        while self.pending >= self.max_pending:
            self._room.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AuditError(
                    f"{self.pending} audit events are waiting for acknowledgement; event refused"
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._room.wait()

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        sweep = max(0.01, min(self.timeout / 4, 0.25))
        next_sweep = loop.time() + sweep
        tick: asyncio.TimerHandle | None = None
        while True:
            if not self._queue:
                self._wake.clear()
                if (self._inflight or self._retries) and (tick is None or tick.cancelled()):
                    # One timer for every waiter: it wakes the writer to expire late acks and retry.
                    tick = loop.call_later(sweep, self._wake.set)
                await self._wake.wait()
            if self._queue:
                batch, self._queue = self._queue, []
                await self._publish(batch)
                # One turn for the requests that woke meanwhile: they queue theirs, the next round is bigger.
                await asyncio.sleep(0)
            now = loop.time()
            if now >= next_sweep:
                next_sweep = now + sweep
                if tick is not None:
                    tick.cancel()
                    tick = None
                if self._inflight or self._retries:
                    await self._sweep(time.monotonic())

    async def _publish(
        self, batch: list[tuple[dict[str, Any], str, asyncio.Future[dict[str, Any]] | None]]
    ) -> None:
        self.batches += 1
        deadline = time.monotonic() + self.timeout
        for fields, msg_id, caller in batch:
            if caller is not None and caller.done():  # its request was cancelled before it was sealed
                continue
            subject = audit_subject(
                _subject_token(fields.get("pack_id")), _subject_token(fields.get("capability"))
            )
            try:
                event = self.chain.seal(fields)
            except AuditError as exc:
                _settle(caller, exc)
                continue
            payload = canonical_json(event)
            await self._send(
                _Waiter(subject, payload, self.stored_msg_id(msg_id, event), event, caller, deadline)
            )
        if self._flush_now is not None:
            self._flush_now()  # the batch leaves now, not after everything else this turn of the loop runs

    async def _send(self, waiter: _Waiter) -> None:
        self._next += 1
        token = str(self._next)
        self._inflight[token] = waiter
        headers = {"Nats-Msg-Id": waiter.msg_id, "Nats-Expected-Stream": AUDIT_STREAM}
        try:
            if self._publish_nowait is not None:  # broker.bus.wire: queued for this turn's one write
                self._publish_nowait(waiter.subject, waiter.payload, self._prefix + token, headers)
            else:
                await self._nc.publish(
                    waiter.subject, waiter.payload, reply=self._prefix + token, headers=headers
                )
        except Exception as exc:
            self._inflight.pop(token, None)
            self._failed(waiter, exc)

    async def _on_ack(self, msg: Any) -> None:
        self._ack(msg)

    def _ack(self, msg: Any) -> None:
        waiter = self._inflight.pop(msg.subject[len(self._prefix) :], None)
        if waiter is None:
            return  # late: it was already retried or failed
        problem = _ack_problem(msg, retry=waiter.retried)
        if problem is not None:
            self._failed(waiter, problem)
            return
        self.stored += 1
        if waiter.caller is not None and not waiter.caller.done():
            waiter.caller.set_result(waiter.event)
        self._made_room()

    async def _sweep(self, now: float) -> None:
        for token in [t for t, w in self._inflight.items() if w.deadline <= now]:
            self._failed(self._inflight.pop(token), TimeoutError())
        if self._retries:
            due = [w for at, w in self._retries if at <= now]
            self._retries = [(at, w) for at, w in self._retries if at > now]
            for waiter in due:
                waiter.deadline = now + self.timeout
                await self._send(waiter)

    def _failed(self, waiter: _Waiter, exc: BaseException) -> None:
        if not waiter.retried:
            waiter.retried = True
            self._retries.append((time.monotonic() + self.retry_delay, waiter))
            if self._wake is not None:
                self._wake.set()
            return
        if self.chain.chain_id == waiter.event["chain"]:
            self.chain.rotate()
        _settle(
            waiter.caller,
            AuditError(f"audit event {waiter.msg_id} not stored in {AUDIT_STREAM}: {_describe(exc)}"),
        )
        self._made_room()

    def _made_room(self) -> None:
        if self._room is not None and self.pending < self.max_pending:
            self._room.set()

    def _fail_all(self, exc: AuditError) -> None:
        for _fields, _msg_id, caller in self._queue:
            _settle(caller, exc)
        for waiter in [*self._inflight.values(), *(w for _at, w in self._retries)]:
            _settle(waiter.caller, exc)
        self._queue, self._retries = [], []
        self._inflight.clear()


def _settle(caller: asyncio.Future[dict[str, Any]] | None, exc: BaseException) -> None:
    """Fail a waiting `record`; an event nobody waits for (`record_later`) is logged instead."""
    if caller is None:
        log.error("%s", exc)
    elif not caller.done():
        caller.set_exception(exc)


def _ack_problem(msg: Any, *, retry: bool) -> BaseException | None:
    """None for the ack of a stored event (on a retry, also of one stored before); else the problem."""
    status = (msg.headers or {}).get("Status")
    if status:
        if status == "503":
            return AuditError("no JetStream stream answers (is JetStream on and the stream created?)")
        return AuditError(f"JetStream answered status {status}")
    try:
        ack = _ACK_DECODER.decode(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return AuditError("JetStream sent an unreadable acknowledgement")
    if ack.error is not None:
        return AuditError(f"JetStream refused the event: {ack.error.get('description', ack.error)}")
    if ack.stream != AUDIT_STREAM:
        return AuditError(f"audit event landed in stream {ack.stream!r}, not {AUDIT_STREAM}")
    if ack.duplicate and not retry:
        # Ids are unique per event: a duplicate on the first send means someone else used it.
        return AuditError("JetStream already holds a message with this id")
    return None


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "no acknowledgement in time"
    if isinstance(exc, AuditError):
        return str(exc)
    name = type(exc).__name__
    if name == "NoStreamResponseError":
        return "no JetStream stream answers (is JetStream on and the stream created?)"
    description = getattr(exc, "description", None)
    return f"{name}: {description}" if description else f"{name}: {exc}".rstrip(": ")


@dataclass
class _RefusalBucket:
    first: dict[str, Any]
    count: int
    started: float
    codes: dict[str, int] = field(default_factory=dict)


class RefusalAggregator:
    """Folds refusals into one event per Pack per window, with a `count`.

    Used for every `rate_limited` refusal, and for any refusal beyond a Pack's individually audited
    ones in a second. Keyed by the Pack's lane (its server-stamped account), never by subject tokens:
    the capability is the last subject token, which a Pack may vary at will, so keying on it would let
    a flood escape the folding. The first refusal of a window names the event's component, capability
    and target; the event's `code` is the window's most frequent one, and `extra.codes` lists them all
    when they differ.

    The broker awaits `add` for each refusal (it never blocks); `run` flushes closed windows until cancelled.
    """

    def __init__(self, writer: AuditWriter, window: float = 1.0) -> None:
        self._writer = writer
        self.window = window
        self._buckets: dict[str, _RefusalBucket] = {}
        self._opened = asyncio.Event()  # a first bucket since the last flush: `run` wakes up

    async def add(self, fields: dict[str, Any], *, key: str | None = None) -> None:
        """Count one refusal (the first of a window supplies the event's fields); never waits."""
        bucket_key = str(fields.get("pack_id")) if key is None else key
        code = str(fields.get("code"))
        bucket = self._buckets.get(bucket_key)
        if bucket is None:
            bucket = self._buckets[bucket_key] = _RefusalBucket(
                first=dict(fields), count=0, started=time.monotonic()
            )
            self._opened.set()
        bucket.count += 1
        bucket.codes[code] = bucket.codes.get(code, 0) + 1

    @property
    def pending(self) -> int:
        """Refusals counted but not yet written."""
        return sum(b.count for b in self._buckets.values())

    async def flush(self, *, older_than: float | None = None) -> list[dict[str, Any]]:
        """Write one event per bucket (only buckets at least `older_than` seconds old, if given)."""
        now = time.monotonic()
        due = [k for k, b in self._buckets.items() if older_than is None or now - b.started >= older_than]
        events = []
        for key in due:
            bucket = self._buckets.pop(key)
            fields = dict(bucket.first)
            fields["decision"] = "deny"
            fields["code"] = max(sorted(bucket.codes), key=lambda c: bucket.codes[c])
            fields["count"] = bucket.count
            fields.pop("phase", None)  # an aggregate is neither a decision nor an outcome of one request
            fields.pop("message", None)
            if len(bucket.codes) > 1:
                summary = ",".join(f"{c}={n}" for c, n in sorted(bucket.codes.items()))
                fields["extra"] = {**fields.get("extra", {}), "codes": summary}
            try:
                events.append(await self._writer.record(fields, msg_id=str(fields.get("request_id"))))
            except AuditError as exc:
                # The refusals were already answered; losing their tally must not stop the broker.
                log.warning("%s (%d refusals)", exc, bucket.count)
        return events

    async def run(self) -> None:
        """Flush windows as they close, until cancelled (call `flush()` once more on shutdown).

        Asleep while nothing is counted (an idle broker has no timer here), then every quarter window.
        """
        while True:
            if not self._buckets:
                self._opened.clear()
                await self._opened.wait()
            await asyncio.sleep(self.window / 4)
            await self.flush(older_than=self.window)


class RateLimitAggregator(RefusalAggregator):
    """A RefusalAggregator for `rate_limited` refusals only: every refusal it counts has that code."""

    async def add(self, fields: dict[str, Any], *, key: str | None = None) -> None:
        await super().add({**fields, "code": "rate_limited"}, key=key)


# ----------------------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class VerifyFailure:
    """The first event that does not verify."""

    index: int
    chain: str | None
    seq: int | None
    reason: str
    detail: str

    def __str__(self) -> str:
        where = f"event #{self.index + 1} (chain {self.chain}, seq {self.seq})"
        return f"{where}: {self.reason}: {self.detail}"


@dataclass
class VerifyReport:
    """Outcome of checking events in the order given."""

    events: int = 0
    heads: dict[str, tuple[int, str]] = field(default_factory=dict)
    failure: VerifyFailure | None = None
    # (chain, request_id) -> timestamps of allow decisions still waiting for their outcome event
    open_decisions: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    # chain -> seq of its first event read: 1, or a signed checkpoint the input starts at (an anchor)
    starts: dict[str, int] = field(default_factory=dict)
    # chain -> (seq, ts) of its last signed checkpoint read (only when checkpoints are checked)
    checkpoints: dict[str, tuple[int, str]] = field(default_factory=dict)

    def missing_outcomes(
        self, *, older_than: float, now: datetime | None = None
    ) -> list[tuple[str, str, str]]:
        """(chain, request_id, ts) of allowed decisions older than `older_than` seconds with no outcome.

        A request that acts writes its decision, then its outcome; a broker that stopped in between
        (a crash, kill -9) leaves the decision alone. Sessions (tunnels) are left out: their outcome
        comes when they close. Reads have one `complete` event and never appear here.
        """
        limit = (now or datetime.now(UTC)).timestamp() - older_than
        found = []
        for (chain, request_id), stamps in self.open_decisions.items():
            for ts in stamps:
                try:
                    when = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
                except ValueError:
                    when = 0.0
                if when <= limit:
                    found.append((chain, request_id, ts))
        return sorted(found, key=lambda item: item[2])

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def chains(self) -> int:
        return len(self.heads)

    def raise_for_failure(self) -> None:
        """Raise `ChainBroken` naming the first bad event."""
        if self.failure is not None:
            raise ChainBroken(str(self.failure))


class ChainVerifier:
    """Checks events one at a time, per chain: hash recomputes, seq follows, prev_hash links.

    After the first failure it keeps reading only to classify it (a missing seq found later means
    "reordered"; never found means "missing (gap)").
    """

    def __init__(self, checkpoints: Callable[[dict[str, Any]], str | None] | None = None) -> None:
        """With `checkpoints` (a check returning a problem or None, e.g. `AuditKeys.check`), every
        ``phase: "checkpoint"`` event must pass it, and a chain may start at such an event instead of
        seq 1 (an export made with ``--since``): its signature vouches for everything before it."""
        self.report = VerifyReport()
        self._checkpoints = checkpoints
        self._index = 0
        # While a gap is unresolved: (chain, expected seq) to look for in the rest of the input.
        self._looking_for: tuple[str, int] | None = None

    def add(self, event: Any) -> None:
        """Feed the next event."""
        index = self._index
        self._index += 1
        if self.report.failure is not None:
            self._classify_later(event)
            return
        self.report.events += 1
        problem = self._check(event)
        if problem is not None:
            chain, seq, reason, detail = problem
            self.report.failure = VerifyFailure(index, chain, seq, reason, detail)
            return
        self._track_outcome(event)

    def _track_outcome(self, event: dict[str, Any]) -> None:
        key = (str(event.get("chain")), str(event.get("request_id")))
        phase = event.get("phase")
        if phase == "decision" and event.get("decision") == "allow":
            extra = event.get("extra")
            if not (isinstance(extra, dict) and extra.get("session") is True):
                self.report.open_decisions.setdefault(key, []).append(str(event.get("ts")))
        elif phase == "outcome":
            waiting = self.report.open_decisions.get(key)
            if waiting:
                waiting.pop(0)
                if not waiting:
                    del self.report.open_decisions[key]

    def _fail_malformed(self, event: Any, detail: str) -> tuple[str | None, int | None, str, str]:
        chain = event.get("chain") if isinstance(event, dict) else None
        seq = event.get("seq") if isinstance(event, dict) else None
        return (
            chain if isinstance(chain, str) else None,
            seq if isinstance(seq, int) else None,
            "malformed",
            detail,
        )

    def _check(self, event: Any) -> tuple[str | None, int | None, str, str] | None:
        if not isinstance(event, dict):
            return self._fail_malformed(event, "not a JSON object")
        if "_malformed" in event:
            return self._fail_malformed(event, str(event["_malformed"]))
        missing = [name for name in REQUIRED_FIELDS if name not in event]
        if missing:
            return self._fail_malformed(event, f"missing field(s) {', '.join(missing)}")
        chain, seq, prev, digest = event["chain"], event["seq"], event["prev_hash"], event["hash"]
        if not isinstance(chain, str) or isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            return self._fail_malformed(event, "chain must be a string and seq a positive integer")
        if not isinstance(prev, str) or not isinstance(digest, str) or not _HEX64_RE.match(digest):
            return self._fail_malformed(event, "hash and prev_hash must be 64 lowercase hex digits")
        try:
            recomputed = event_hash(event)
        except (TypeError, ValueError) as exc:
            return self._fail_malformed(event, f"cannot hash: {exc}")
        if recomputed != digest:
            return chain, seq, "changed", "its content does not match its hash"
        head = self.report.heads.get(chain)
        signed = self._checkpoints is not None and event.get("phase") == CHECKPOINT_PHASE
        if signed:
            assert self._checkpoints is not None
            problem = self._checkpoints(event)
            if problem is not None:
                return chain, seq, "bad checkpoint", problem
            if head is None and seq > 1:
                self.report.heads[chain] = (seq, digest)
                self.report.starts[chain] = seq
                self.report.checkpoints[chain] = (seq, str(event.get("ts")))
                return None
        expected_seq, expected_prev = (1, ZERO_HASH) if head is None else (head[0] + 1, head[1])
        if seq != expected_seq:
            if seq > expected_seq:
                # Provisional: becomes "reordered" if the expected event shows up later.
                self._looking_for = (chain, expected_seq)
                return chain, seq, "missing (gap)", f"expected seq {expected_seq}, found {seq}"
            if head is not None and seq == head[0] and digest == head[1]:
                return chain, seq, "duplicate", "the same event appears twice"
            return chain, seq, "reordered", f"seq {seq} comes after seq {expected_seq - 1}"
        if prev != expected_prev:
            if seq == 1:
                return chain, seq, "bad first event", "the first event of a chain must have prev_hash 0…0"
            return chain, seq, "changed", f"prev_hash does not match the hash of seq {seq - 1}"
        self.report.heads[chain] = (seq, digest)
        self.report.starts.setdefault(chain, seq)
        if signed:
            self.report.checkpoints[chain] = (seq, str(event.get("ts")))
        return None

    def _classify_later(self, event: Any) -> None:
        if self._looking_for is None or not isinstance(event, dict):
            return
        chain, seq = self._looking_for
        if event.get("chain") == chain and event.get("seq") == seq and self.report.failure is not None:
            found = self._index  # 1-based position of the event just read
            old = self.report.failure
            self.report.failure = VerifyFailure(
                old.index, old.chain, old.seq, "reordered",
                f"expected seq {seq}, found {old.seq}; seq {seq} appears later, at event #{found}",
            )  # fmt: skip
            self._looking_for = None


def verify_events(events: Iterable[Any]) -> VerifyReport:
    """Check `events` in the given order; the report names the first bad event, if any."""
    verifier = ChainVerifier()
    for event in events:
        verifier.add(event)
    return verifier.report


# ----------------------------------------------------------------------------------------- files


def export_events(events: Iterable[Mapping[str, Any]], out: IO[str]) -> int:
    """Write events as JSON lines (each line the event's canonical JSON); return how many."""
    count = 0
    for event in events:
        out.write(canonical_json(event).decode("utf-8"))
        out.write("\n")
        count += 1
    return count


def load_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Parse JSON lines (blank lines skipped); a bad line yields a ``_malformed`` marker (fails verify)."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            yield {"_malformed": f"line {number} is not JSON ({exc.args[0] if exc.args else exc})"}
            continue
        yield value if isinstance(value, dict) else {"_malformed": f"line {number} is not a JSON object"}


# ----------------------------------------------------------------------------------------- reading

_NS: Final = 1_000_000_000


def _status(msg: Any) -> str | None:
    headers = getattr(msg, "headers", None)
    if headers and not msg.data:
        status = headers.get("Status")
        return str(status) if status is not None else None
    return None


def _decode_event(data: bytes, stream_seq: int) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {"_malformed": f"stream message {stream_seq} is not JSON"}
    return (
        value if isinstance(value, dict) else {"_malformed": f"stream message {stream_seq} is not an object"}
    )


class _StreamReader:
    """An ephemeral pull consumer on RUMI_AUDIT read in stream order (ack none, memory only).

    Needs only: publish ``$JS.API.CONSUMER.CREATE.RUMI_AUDIT.>`` and
    ``$JS.API.CONSUMER.MSG.NEXT.RUMI_AUDIT.>``, subscribe ``_INBOX.audit.>``: the read-only ``audit`` identity.
    """

    def __init__(self, nc: Any, filter_subject: str, batch: int, timeout: float) -> None:
        self._nc = nc
        self._filter = filter_subject
        self._batch = batch
        self._timeout = timeout
        self.name = ""
        self.last_stream_seq = 0
        self._last_consumer_seq = 0

    async def create(self) -> int:
        """Create the consumer starting after `last_stream_seq`; return how many events it has pending."""
        import nats.errors

        self.name = f"rumi_audit_{secrets.token_hex(8)}"
        self._last_consumer_seq = 0
        config: dict[str, Any] = {
            "name": self.name,
            "ack_policy": "none",
            "filter_subject": self._filter,
            "mem_storage": True,
            "num_replicas": 1,
            "inactive_threshold": 30 * _NS,
            "replay_policy": "instant",
        }
        if self.last_stream_seq:
            config["deliver_policy"] = "by_start_sequence"
            config["opt_start_seq"] = self.last_stream_seq + 1
        else:
            config["deliver_policy"] = "all"
        request = json.dumps({"stream_name": AUDIT_STREAM, "config": config}).encode()
        subject = f"$JS.API.CONSUMER.CREATE.{AUDIT_STREAM}.{self.name}.{self._filter}"
        try:
            reply = await self._nc.request(subject, request, timeout=self._timeout)
        except nats.errors.NoRespondersError:
            raise AuditError("JetStream is not enabled on this NATS server") from None
        except nats.errors.TimeoutError:
            raise AuditError(
                f"no answer creating a reader on {AUDIT_STREAM} (JetStream down, or no permission)"
            ) from None
        except Exception as exc:
            raise AuditError(f"cannot reach NATS to read {AUDIT_STREAM} ({_describe(exc)})") from None
        answer = json.loads(reply.data)
        error = answer.get("error")
        if error:
            if error.get("err_code") == 10059:
                raise AuditError(
                    f"stream {AUDIT_STREAM} does not exist: start `rumi broker` once to create it"
                )
            raise AuditError(f"cannot read {AUDIT_STREAM}: {error.get('description', error)}")
        return int(answer.get("num_pending", 0))

    async def pull(self, *, wait: bool) -> AsyncGenerator[Any, None]:
        """One pull request; yields stored messages until the batch ends (status message or full)."""
        request: dict[str, Any] = {"batch": self._batch}
        if wait:
            # Long poll; heartbeats every second prove the server is still there.
            request["expires"] = int(5 * _NS)
            request["idle_heartbeat"] = int(1 * _NS)
            deadline = 8.0
        else:
            request["no_wait"] = True
            deadline = self._timeout
        try:
            inbox = self._nc.new_inbox()
            sub = await self._nc.subscribe(inbox)
            await self._nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{AUDIT_STREAM}.{self.name}",
                json.dumps(request).encode(),
                reply=inbox,
            )
        except Exception as exc:
            raise AuditError(
                f"lost the connection to NATS while reading {AUDIT_STREAM} ({_describe(exc)})"
            ) from None
        try:
            received = 0
            while received < self._batch:
                try:
                    msg = await sub.next_msg(timeout=deadline)
                except Exception as exc:
                    if type(exc).__name__ == "TimeoutError":
                        raise AuditError(
                            f"no answer reading {AUDIT_STREAM} (is NATS still running?)"
                        ) from None
                    raise AuditError(
                        f"lost the connection to NATS while reading {AUDIT_STREAM} ({_describe(exc)})"
                    ) from None
                status = _status(msg)
                if status == "100":
                    continue  # idle heartbeat: the server is alive, keep waiting
                if status is not None:
                    if status in ("404", "408"):
                        return  # no messages now / request expired: batch over
                    description = msg.headers.get("Description", "")
                    raise _ConsumerGone(f"{status} {description}".strip())
                meta = msg.metadata
                if meta.sequence.consumer != self._last_consumer_seq + 1:
                    raise _ConsumerGone("messages were skipped")
                self._last_consumer_seq = meta.sequence.consumer
                self.last_stream_seq = meta.sequence.stream
                received += 1
                yield msg
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


class _ConsumerGone(Exception):
    """The server dropped our consumer (or skipped messages): make a new one where we stopped."""


async def read_stored(
    nc: Any,
    *,
    follow: bool = False,
    pack: str | None = None,
    start_seq: int = 1,
    batch: int = 256,
    timeout: float = 5.0,
    subject: str | None = None,
) -> AsyncGenerator[tuple[int, dict[str, Any]], None]:
    """Yield ``(stream sequence, event)`` in stream order from `start_seq` (all Packs, or one `pack`,
    or only the events on `subject`, e.g. the brokers' checkpoints).

    Without `follow` it stops once it has caught up with the stream; with `follow` it then waits for
    new events until cancelled.  Works with the read-only ``audit`` NATS identity.
    """
    if pack is not None and not is_pack_id(pack):
        raise AuditError(f"pack id {pack!r} is not valid (expected ^[a-z][a-z0-9_-]{{0,31}}$)")
    filter_subject = subject or (f"rumi.audit.{pack}.>" if pack else AUDIT_SUBJECTS)
    reader = _StreamReader(nc, filter_subject, batch, timeout)
    reader.last_stream_seq = max(0, start_seq - 1)
    remaining = await reader.create()
    caught_up = remaining == 0
    resets = 0
    while follow or not caught_up:
        try:
            # Until caught up, pull what is there (no_wait); after that, long-poll for new events.
            async with contextlib.aclosing(reader.pull(wait=caught_up)) as messages:
                got = 0
                async for msg in messages:
                    resets = 0
                    got += 1
                    yield reader.last_stream_seq, _decode_event(msg.data, reader.last_stream_seq)
                    if msg.metadata.num_pending == 0:
                        caught_up = True
                if not caught_up and got < batch:
                    caught_up = True  # 404 "no messages": nothing more is stored
        except _ConsumerGone as exc:
            resets += 1
            if resets > 3:
                raise AuditError(f"reading {AUDIT_STREAM} keeps failing: {exc}") from None
            await reader.create()


async def read_events(
    nc: Any,
    *,
    follow: bool = False,
    pack: str | None = None,
    decision: str | None = None,
    start_seq: int = 1,
) -> AsyncGenerator[dict[str, Any], None]:
    """Yield stored events in stream order, optionally one `pack` and one `decision` (see `read_stored`)."""
    if decision is not None and decision not in DECISIONS:
        raise AuditError(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
    async with contextlib.aclosing(read_stored(nc, follow=follow, pack=pack, start_seq=start_seq)) as stored:
        async for _, event in stored:
            if decision is None or event.get("decision") == decision:
                yield event


async def verify_stream(nc: Any) -> VerifyReport:
    """Verify every chain in RUMI_AUDIT, in stream order."""
    verifier = ChainVerifier()
    async with contextlib.aclosing(read_events(nc)) as events:
        async for event in events:
            verifier.add(event)
    return verifier.report
