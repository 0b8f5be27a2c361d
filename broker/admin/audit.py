"""Reading the audit stream from the host: connection, tail, verify, export, reader credentials."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from broker.audit.checkpoint import (
    CHECKPOINT_SUBJECT,
    AuditKeys,
    InputCheck,
    Reference,
    compare_with_references,
    references,
    unsigned_tails,
    wanted_positions,
)
from broker.audit.export import Selection, to_ocsf
from broker.audit.trail import VerifyFailure, VerifyReport, canonical_json, load_events, read_stored
from broker.core.errors import AuditError
from broker.core.protocol import AUDIT_STREAM, AUDIT_SUBJECTS
from broker.core.workspace import Workspace

AUDIT_USER = "audit"


def audit_connection(ws: Workspace) -> contextlib.AbstractAsyncContextManager[Any]:
    """Connect as the read-only `audit` identity, or raise NatsSetupError saying what to do."""
    from broker.bus.server import command_connection

    return command_connection(ws, AUDIT_USER, name="rumi-audit-cli")


async def tail_events(
    nc: Any, *, pack: str | None, decision: str | None, limit: int | None, follow: bool
) -> AsyncGenerator[dict[str, Any], None]:
    """Stored events, oldest first (only the last `limit` matching ones when given), then, with
    `follow`, new ones as they are stored. Only `pack`'s and only `decision` ones when given."""

    def wanted(event: dict[str, Any]) -> bool:
        return decision is None or event.get("decision") == decision

    last_seq = 0
    recent: deque[dict[str, Any]] = deque(maxlen=limit)
    async with contextlib.aclosing(read_stored(nc, pack=pack)) as stored:
        async for seq, event in stored:
            last_seq = seq
            if wanted(event):
                if limit is None:
                    yield event
                else:
                    recent.append(event)
    for event in recent:
        yield event
    if not follow:
        return
    async with contextlib.aclosing(read_stored(nc, pack=pack, follow=True, start_seq=last_seq + 1)) as live:
        async for _, event in live:
            if wanted(event):
                yield event


# ----------------------------------------------------------------------------------- tail: requests

TAIL_MAX_OPEN = 10_000
"""Requests `RequestFolder` holds while waiting for their outcome; beyond, the oldest is shown as is."""
NO_OUTCOME = "no outcome recorded yet (still running, or the broker stopped before writing it)"
TUNNEL_OPEN = "still open: its outcome is written when it closes"


@dataclass
class RequestRow:
    """One request as `rumi audit tail` shows it: the final decision, the reason, its events' seqs.

    An action's row holds its decision event and its outcome event (decision and code are the
    outcome's); a read's its one `complete` event; a refusal its one `deny`; an aggregate its `count`.
    `pending` marks a row shown before its outcome arrived (`reason` says why).
    """

    ts: str
    pack_id: str
    component_id: str
    capability: str
    target: str
    decision: str
    code: str
    reason: str = ""
    duration_ms: float | None = None
    count: int | None = None
    request_id: str = ""
    seqs: list[int] = field(default_factory=list)
    phase: str = ""  # the first event's phase ("" for an aggregate)
    asked: bool = False  # an `ask` event (ask mode), waiting for the operator's verdict
    session: bool = False  # a tunnel's `open` (its outcome comes at close)
    done: bool = True
    pending: bool = False
    malformed: str = ""
    key: tuple[str, str, str] = ("", "", "")  # (chain, pack, request id): pairs the outcome
    _when: float | None = None

    @classmethod
    def of(cls, event: Mapping[str, Any]) -> RequestRow:
        extra = event.get("extra")
        count = event.get("count")
        duration = event.get("duration_ms")
        seq = event.get("seq")
        row = cls(
            ts=str(event.get("ts", "")),
            pack_id=str(event.get("pack_id", "")),
            component_id=str(event.get("component_id", "")),
            capability=str(event.get("capability", "")),
            target=str(event.get("target", "")),
            decision=str(event.get("decision", "")),
            code=str(event.get("code", "")),
            reason=str(event.get("message") or ""),
            duration_ms=float(duration) if isinstance(duration, int | float) else None,
            count=count if isinstance(count, int) and not isinstance(count, bool) else None,
            request_id=str(event.get("request_id", "")),
            seqs=[seq] if isinstance(seq, int) else [],
            phase=str(event.get("phase") or ""),
            session=isinstance(extra, Mapping) and extra.get("session") is True,
            key=(
                str(event.get("chain", "")),
                str(event.get("pack_id", "")),
                str(event.get("request_id", "")),
            ),
        )
        if "_malformed" in event:
            row.malformed = str(event["_malformed"])
            row.reason = f"malformed event: {row.malformed}"
        return row

    def take(self, later: Mapping[str, Any], *, done: bool = True) -> None:
        """Take a later event's decision, code, reason and duration (an outcome, or the decision that
        follows an `ask`)."""
        self.decision = str(later.get("decision", self.decision))
        self.code = str(later.get("code", self.code))
        self.reason = str(later.get("message") or "")
        duration = later.get("duration_ms")
        if isinstance(duration, int | float):
            self.duration_ms = float(duration)
        seq = later.get("seq")
        if isinstance(seq, int):
            self.seqs.append(seq)
        extra = later.get("extra")
        self.session = self.session or (isinstance(extra, Mapping) and extra.get("session") is True)
        self.asked = False
        self.done, self.pending = done, False

    def when(self) -> float | None:
        """The first event's time (seconds since the epoch), None when it has no valid `ts`."""
        if self._when is None and self.ts:
            try:
                self._when = datetime.fromisoformat(self.ts.replace("Z", "+00:00")).timestamp()
            except ValueError:
                return None
        return self._when

    def as_json(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "request_id": self.request_id,
            "pack_id": self.pack_id,
            "component_id": self.component_id,
            "capability": self.capability,
            "target": self.target,
            "decision": self.decision,
            "code": self.code,
            "reason": self.reason,
            "duration_ms": self.duration_ms,
            "count": self.count,
            "seqs": list(self.seqs),
            "pending": self.pending,
        }


class RequestFolder:
    """Folds audit events, in stream order, into one `RequestRow` per request, in the order requests
    started (the first event's order).

    Checkpoint events are no requests and get no row. An `allow` decision waits for its outcome event,
    and an `ask` (ask mode) for the decision that follows it, then for that one's outcome (same chain,
    pack and request id; a Pack may reuse an id, so same-key requests pair first in, first out). A
    waiting row holds back the rows after it,
    at most until an event `horizon` seconds later than it arrives (the request timeout and a margin:
    a tunnel still open then, or a request whose outcome was lost, is shown with `pending`; a tunnel's
    later outcome becomes a row of its own) and at most `max_open` rows.
    """

    def __init__(self, *, horizon: float = 35.0, max_open: int = TAIL_MAX_OPEN) -> None:
        self.horizon = horizon
        self.max_open = max_open
        self._order: deque[RequestRow] = deque()
        self._open: dict[tuple[str, str, str], deque[RequestRow]] = {}

    def add(self, event: Mapping[str, Any]) -> list[RequestRow]:
        """Take one event; return the rows it completes (and those they held back), oldest first."""
        row = RequestRow.of(event)
        if row.phase == "checkpoint":  # a broker's signed checkpoint, not a request (`--phases` shows it)
            return self._ready(row.when())
        waiting = self._open.get(row.key, deque())
        allowed = row.decision == "allow" and not row.malformed
        decided = next((r for r in waiting if not r.asked), None)
        asked = next((r for r in waiting if r.asked), None)
        if row.phase == "outcome" and decided is not None:
            decided.take(event)
            self._release(decided)
        elif row.phase in ("decision", "complete") and asked is not None:
            asked.take(event, done=not (row.phase == "decision" and allowed))
            if asked.done:
                self._release(asked)
        elif (row.phase == "decision" and allowed) or (row.phase == "ask" and not row.malformed):
            row.done, row.asked = False, row.phase == "ask"
            self._open.setdefault(row.key, deque()).append(row)
            self._order.append(row)
        else:  # final in itself (an outcome whose decision was shown already, or not read, too)
            self._order.append(row)
        return self._ready(row.when())

    def _release(self, row: RequestRow) -> None:
        """`row` waits for nothing more: drop it from its key's waiting rows."""
        left = deque(r for r in self._open.get(row.key, ()) if r is not row)
        if left:
            self._open[row.key] = left
        else:
            self._open.pop(row.key, None)

    def flush(self) -> list[RequestRow]:
        """Every row still held, oldest first (those without an outcome marked `pending`)."""
        rows = []
        while self._order:
            rows.append(self._pop(give_up=True))
        return rows

    def _ready(self, now: float | None) -> list[RequestRow]:
        rows = []
        while self._order:
            head = self._order[0]
            if head.done:
                rows.append(self._pop())
                continue
            started = head.when()
            stale = now is not None and started is not None and now - started > self.horizon
            if not stale and len(self._order) <= self.max_open:
                break
            rows.append(self._pop(give_up=True))
        return rows

    def _pop(self, *, give_up: bool = False) -> RequestRow:
        row = self._order.popleft()
        if not row.done and give_up:
            self._release(row)
            row.done, row.pending = True, True
            if not row.asked:  # an ask keeps its own message (waiting for an operator)
                row.reason = TUNNEL_OPEN if row.session else NO_OUTCOME
        return row


async def tail_requests(
    nc: Any,
    *,
    pack: str | None,
    decision: str | None,
    limit: int | None,
    follow: bool,
    horizon: float = 35.0,
) -> AsyncGenerator[RequestRow, None]:
    """`tail_events` folded into one row per request (`RequestFolder`): the stored requests, oldest
    first (only the last `limit` rows when given), then with `follow` new ones as they complete. Only
    `pack`'s, and only rows whose final decision is `decision`, when given."""

    def wanted(row: RequestRow) -> bool:
        return decision is None or row.decision == decision

    folder = RequestFolder(horizon=horizon)
    recent: deque[RequestRow] = deque(maxlen=limit)
    last_seq = 0
    async with contextlib.aclosing(read_stored(nc, pack=pack)) as stored:
        async for seq, event in stored:
            last_seq = seq
            for row in folder.add(event):
                if not wanted(row):
                    continue
                if limit is None:
                    yield row
                else:
                    recent.append(row)
    if not follow:
        for row in folder.flush():
            if wanted(row):
                if limit is None:
                    yield row
                else:
                    recent.append(row)
    for row in recent:
        yield row
    if not follow:
        return
    async with contextlib.aclosing(read_stored(nc, pack=pack, follow=True, start_seq=last_seq + 1)) as live:
        async for _, event in live:
            for row in folder.add(event):
                if wanted(row):
                    yield row


# ----------------------------------------------------------------------------------------- verify


@dataclass
class Verification:
    """What `rumi audit verify` found: the chains, the first failure, and what is not covered."""

    source: str
    report: VerifyReport
    failure: VerifyFailure | None = None
    reference: str | None = None  # where the checkpoints compared against came from
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def unsigned(self) -> dict[str, int]:
        """Per chain, events after its last signed checkpoint (cut from the end, they leave no trace)."""
        return unsigned_tails(self.report)

    def as_json(self, missing_outcomes: Iterable[tuple[str, str, str]] = ()) -> dict[str, Any]:
        report, failure, unsigned = self.report, self.failure, self.unsigned
        return {
            "ok": self.ok,
            "source": self.source,
            "reference": self.reference,
            "events": report.events,
            "failure": None
            if failure is None
            else {
                "event": failure.index + 1,
                "chain": failure.chain,
                "seq": failure.seq,
                "reason": failure.reason,
                "detail": failure.detail,
                "message": str(failure),
            },
            "chains": {
                chain: {
                    "first_seq": report.starts.get(chain, 1),
                    "last_seq": seq,
                    "last_hash": head,
                    "last_checkpoint_seq": report.checkpoints[chain][0]
                    if chain in report.checkpoints
                    else None,
                    "unsigned_events": unsigned.get(chain, 0),
                }
                for chain, (seq, head) in sorted(report.heads.items())
            },
            "missing_outcomes": [{"chain": c, "request_id": r, "ts": t} for c, r, t in missing_outcomes],
            "notes": self.notes,
        }


def load_keys(ws: Workspace, keys_file: Path | None = None) -> AuditKeys:
    """The public checkpoint keys: `keys_file`, or the workspace's docker/.rumi/audit-keys.json
    (AuditError when it is not a keys file)."""
    return AuditKeys.load(keys_file if keys_file is not None else ws.audit_keys_file)


def file_references(path: Path, keys: AuditKeys) -> tuple[dict[str, Reference], list[str]]:
    """Each chain's latest valid checkpoint in a JSON lines file (a later export, or saved checkpoint
    lines); OSError / UnicodeDecodeError when it cannot be read."""
    with path.open(encoding="utf-8") as f:
        return references(load_events(f), keys)


async def stream_references(ws: Workspace, keys: AuditKeys) -> tuple[dict[str, Reference], list[str]]:
    """Each chain's latest valid checkpoint in the stream (reads only the checkpoint subject)."""
    async with audit_connection(ws) as nc:
        async with contextlib.aclosing(read_stored(nc, subject=CHECKPOINT_SUBJECT)) as stored:
            return references([event async for _, event in stored], keys)


def _finish(
    check: InputCheck,
    source: str,
    refs: Mapping[str, Reference] | None,
    reference: str | None,
    notes: Iterable[str],
) -> Verification:
    report = check.report
    failure = report.failure
    if failure is None and refs is not None:
        failure = compare_with_references(check, refs, source)
    result = Verification(source, report, failure, reference, list(notes))
    if failure is None:
        for chain, count in sorted(result.unsigned.items()):
            if chain not in report.checkpoints:
                result.notes.append(
                    f"chain {chain} has no signed checkpoint: its {count} event(s) are only hash-chained"
                )
            elif count:
                result.notes.append(
                    f"chain {chain}: the last {count} event(s), after its checkpoint at seq "
                    f"{report.checkpoints[chain][0]}, are not covered by a signature yet"
                )
        if refs is not None:
            result.notes.append(
                f"compared with the latest checkpoints of {len(refs)} chain(s) in {reference}"
            )
    return result


async def verify_stream(
    ws: Workspace,
    keys: AuditKeys,
    refs: Mapping[str, Reference] | None = None,
    reference: str | None = None,
    notes: Iterable[str] = (),
) -> Verification:
    """Check every hash chain and checkpoint signature in the stream, in stream order (and, with
    `refs`, that the stream still reaches each of those checkpoints)."""
    check = InputCheck(keys, wanted_positions(refs or {}))
    async with audit_connection(ws) as nc:
        async with contextlib.aclosing(read_stored(nc)) as stored:
            async for _, event in stored:
                check.add(event)
    return _finish(check, f"stream {AUDIT_STREAM}", refs, reference, notes)


def verify_file(
    path: Path,
    keys: AuditKeys,
    refs: Mapping[str, Reference] | None = None,
    reference: str | None = None,
    notes: Iterable[str] = (),
) -> Verification:
    """Check every hash chain and checkpoint signature in an exported JSON lines file, in file order
    (and, with `refs`, that it reaches each of those checkpoints). OSError or UnicodeDecodeError when
    it cannot be read as text."""
    check = InputCheck(keys, wanted_positions(refs or {}))
    with path.open(encoding="utf-8") as f:
        for event in load_events(f):
            check.add(event)
    return _finish(check, str(path), refs, reference, notes)


# ----------------------------------------------------------------------------------------- export


@dataclass
class ExportCount:
    """How many events an export wrote, and how many malformed ones an OCSF export left out."""

    written: int = 0
    skipped: int = 0


async def export_events(
    ws: Workspace,
    out: IO[str],
    *,
    pack: str | None = None,
    decision: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    fmt: str = "jsonl",
) -> ExportCount:
    """Write the stored events that match to `out`, one JSON object per line, oldest first.

    ``jsonl``: the stored canonical JSON; without `pack`/`decision` each chain's run begins and ends
    at a checkpoint (see `broker.audit.export.Selection`), so the file verifies on its own. ``ocsf``:
    OCSF API Activity events, exactly the window. AuditError for a selection that cannot be made.
    """
    ocsf = fmt == "ocsf"
    try:
        selection = Selection(since=since, until=until, pack=pack, decision=decision, exact=ocsf)
    except ValueError as exc:
        raise AuditError(str(exc)) from None
    count = ExportCount()

    def write(events: list[dict[str, Any]]) -> None:
        for event in events:
            if ocsf:
                try:
                    line = canonical_json(to_ocsf(event))
                except ValueError:
                    count.skipped += 1
                    continue
            else:
                line = canonical_json(event)
            out.write(line.decode("utf-8") + "\n")
            count.written += 1

    async with audit_connection(ws) as nc:
        async with contextlib.aclosing(read_stored(nc, pack=pack)) as stored:
            async for _, event in stored:
                try:
                    chosen = selection.add(event)
                except ValueError as exc:
                    raise AuditError(str(exc)) from None
                write(chosen)
    write(selection.finish())
    return count


@contextlib.contextmanager
def export_file(output: Path) -> Iterator[IO[str]]:
    """A text file beside `output` that replaces it only when the block succeeds: no half-written
    export under the real name."""
    tmp = output.with_name(f".{output.name}.partial")
    try:
        with tmp.open("w", encoding="utf-8") as out:
            yield out
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)


def reader_credentials(ws: Workspace) -> dict[str, Any]:
    """The NATS URL, stream, subjects, user, seed file and inbox prefix an outside audit reader needs,
    with an example `nats` command (NatsSetupError or AuditError when they cannot be had)."""
    from broker.bus.config import inbox_prefix
    from broker.bus.creds import ensure_identity
    from broker.bus.server import nats_url

    url = nats_url(ws)
    seed = ensure_identity(ws, AUDIT_USER).seed_path
    inbox = inbox_prefix(AUDIT_USER)
    return {
        "url": url,
        "stream": AUDIT_STREAM,
        "subjects": AUDIT_SUBJECTS,
        "user": AUDIT_USER,
        "seed_file": str(seed),
        "inbox_prefix": inbox,
        "example": f"nats --server {url} --nkey {seed} --inbox-prefix {inbox} stream view {AUDIT_STREAM}",
    }
