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
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, Final

from broker.core.errors import AuditError, ChainBroken
from broker.core.ids import is_pack_id
from broker.core.protocol import AUDIT_STREAM, AUDIT_SUBJECTS, audit_subject

__all__ = [
    "AUDIT_VERSION",
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
PHASES: Final = ("decision", "outcome", "complete")
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


def canonical_json(event: Mapping[str, Any]) -> bytes:
    """The exact bytes an event is hashed (and stored) as: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(
        dict(event), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def event_hash(event: Mapping[str, Any]) -> str:
    """SHA-256 hex of the event's canonical JSON without its ``hash`` field."""
    body = {k: v for k, v in event.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def utc_timestamp(when: datetime | None = None) -> str:
    """RFC 3339 UTC with microseconds, e.g. ``2026-11-28T10:00:00.123456Z``."""
    moment = when.astimezone(UTC) if when is not None else datetime.now(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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


class AuditWriter:
    """Seals events and stores them in JetStream, each `record` awaiting its own ack (pipelined)."""

    def __init__(self, js: Any, chain: AuditChain, timeout: float = 2.0, retry_delay: float = 0.05) -> None:
        self._js = js
        self.chain = chain
        self.timeout = timeout
        self.retry_delay = retry_delay
        # Sealing and handing the bytes to the client happen under one lock, so stream order = chain order.
        self._send_lock = asyncio.Lock()

    @staticmethod
    def stored_msg_id(msg_id: str, event: Mapping[str, Any]) -> str:
        """The ``Nats-Msg-Id`` an event is published with: the caller's id plus ``|<chain>.<seq>``.

        The suffix makes it unique per event: request ids are chosen by Packs, so a Pack that reused one
        would otherwise have JetStream drop its next audit event as a duplicate (an unaudited action and
        a hole in the chain).  A retry of the same event keeps the same id, so it is still stored once.
        """
        return f"{msg_id}|{event['chain']}.{event['seq']}"

    async def _send(self, subject: str, payload: bytes, msg_id: str) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = await self._js.publish_async(
            subject,
            payload,
            wait_stall=self.timeout,
            stream=AUDIT_STREAM,
            headers={"Nats-Msg-Id": msg_id},
        )
        return future

    async def _await_ack(self, future: asyncio.Future[Any], *, retry: bool) -> None:
        ack = await asyncio.wait_for(future, self.timeout)
        if getattr(ack, "stream", AUDIT_STREAM) != AUDIT_STREAM:
            raise AuditError(f"audit event landed in stream {ack.stream!r}, not {AUDIT_STREAM}")
        if getattr(ack, "duplicate", False) and not retry:
            # Ids are unique per event: a duplicate on the first send means someone else used it.
            raise AuditError("JetStream already holds a message with this id")

    async def record(self, fields: dict[str, Any], *, msg_id: str) -> dict[str, Any]:
        """Seal `fields` into the chain, publish, and return the event once JetStream has acked it.

        Published with ``Nats-Msg-Id`` = `stored_msg_id(msg_id, event)`.  On failure or timeout it
        retries once with the same id (if the first send was stored after all, JetStream drops the
        copy), then rotates the chain and raises `AuditError`.
        """
        subject = audit_subject(
            _subject_token(fields.get("pack_id")), _subject_token(fields.get("capability"))
        )
        first_error: BaseException | None = None
        async with self._send_lock:
            event = self.chain.seal(fields)
            payload = canonical_json(event)
            msg_id = self.stored_msg_id(msg_id, event)
            try:
                future = await self._send(subject, payload, msg_id)
            except Exception as exc:
                first_error = exc
        if first_error is None:
            try:
                await self._await_ack(future, retry=False)
                return event
            except Exception as exc:
                first_error = exc
        await asyncio.sleep(self.retry_delay)
        try:
            await self._await_ack(await self._send(subject, payload, msg_id), retry=True)
            return event
        except Exception as exc:
            if self.chain.chain_id == event["chain"]:
                self.chain.rotate()
            raise AuditError(
                f"audit event {msg_id} not stored in {AUDIT_STREAM}: "
                f"{_describe(exc) or _describe(first_error)}"
            ) from None


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "no acknowledgement in time"
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

    async def add(self, fields: dict[str, Any], *, key: str | None = None) -> None:
        """Count one refusal (the first of a window supplies the event's fields); never waits."""
        bucket_key = str(fields.get("pack_id")) if key is None else key
        code = str(fields.get("code"))
        bucket = self._buckets.get(bucket_key)
        if bucket is None:
            bucket = self._buckets[bucket_key] = _RefusalBucket(
                first=dict(fields), count=0, started=time.monotonic()
            )
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
        """Flush windows as they close, until cancelled (call `flush()` once more on shutdown)."""
        while True:
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

    def __init__(self) -> None:
        self.report = VerifyReport()
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
) -> AsyncGenerator[tuple[int, dict[str, Any]], None]:
    """Yield ``(stream sequence, event)`` in stream order from `start_seq` (all Packs, or one `pack`).

    Without `follow` it stops once it has caught up with the stream; with `follow` it then waits for
    new events until cancelled.  Works with the read-only ``audit`` NATS identity.
    """
    if pack is not None and not is_pack_id(pack):
        raise AuditError(f"pack id {pack!r} is not valid (expected ^[a-z][a-z0-9_-]{{0,31}}$)")
    reader = _StreamReader(nc, f"rumi.audit.{pack}.>" if pack else AUDIT_SUBJECTS, batch, timeout)
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
