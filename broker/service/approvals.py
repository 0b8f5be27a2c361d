"""Ask mode: requests held until an operator approves or denies them (docs/ask-mode.md).

A grant entry with ``"mode": "ask"`` makes the broker hold each request it would allow, after every
other check passed and before anything is recorded as allowed::

    decide → args → authorize → hold (this module) → decision event → handler → outcome event

- A held request keeps the one in-flight slot of its Pack it was admitted with (a Pack's asks count
  against its own quota, nobody else's) and waits on an event: no thread, and the handler's time
  limit has not started yet. At most ``ask_timeout`` seconds (default 20, below the SDK's request
  timeout minus 2 s, checked when the grant loads): then it is denied, so the Pack sees a deny,
  never a timeout.
- First an ``ask`` event is stored (``decision: deny``, ``code: approval_pending``: nothing is allowed
  while it waits), then a notice is published on ``rumi.admin.asks``.
- Answers come on ``rumi.admin.approve.<broker>.<n>``, which the NATS config lets only the ``admin``
  identity publish: the broker records that identity as the approver (``approver: "admin"``; the
  server authenticated it, no message field says so) beside the OS user the CLI claims
  (``claimed_os_user``, recorded as claimed). ``rumi.admin.pending`` lists what each broker holds.
- Approved: the request goes on; its events carry ``approval: approved`` and the approver.
  Denied, timed out, or the broker stopping: exactly one ``deny`` decision event
  (``permission_denied``, ``approval``: ``denied`` | ``timed_out`` | ``cancelled``); the Pack gets
  an ordinary ``permission_denied``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import anyio
import msgspec
from anyio.abc import TaskStatus

from broker.audit.trail import utc_timestamp
from broker.bus.config import APPROVALS_ANSWER, APPROVALS_NOTICES, APPROVALS_PENDING
from broker.core import errors
from broker.core.protocol import error_reply
from broker.policy.grants import DEFAULT_ASK_TIMEOUT
from broker.service.record import RequestRecord

if TYPE_CHECKING:
    from nats.aio.client import Client

    from broker.audit.trail import AuditWriter

__all__ = [
    "APPROVAL_VERSION",
    "APPROVER",
    "DEFAULT_ASK_TIMEOUT",
    "PENDING_CODE",
    "Answer",
    "AnswerReply",
    "ApprovalDesk",
    "Notice",
    "PendingAsk",
    "PendingList",
    "answer_subject",
    "check_approval_id",
]

log = logging.getLogger("rumi.approvals")

APPROVAL_VERSION = 1
PENDING_CODE = "approval_pending"  # the `code` of an `ask` event
# Only this identity may publish answers (broker/bus/config.py): who answered is known from the
# connection's credentials, not from anything the message says.
APPROVER = "admin"
MAX_LISTED = 1000  # asks in one reply to `rumi.admin.pending` (each Pack holds at most its in-flight quota)
_ID_RE = re.compile(r"^([0-9a-f]{6})-([1-9][0-9]{0,8})$")
_OS_USER_RE = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")

Verdict = Literal["approved", "denied", "timed_out", "cancelled"]


class PendingAsk(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One held request as the operator sees it: who asks for what, and until when.

    `target` is the audit event's target (path, key name, host:port, argv[0]): never a secret or content.
    """

    id: str
    request_id: str
    pack_id: str
    component_id: str
    capability: str
    target: str
    asked_at: str  # RFC 3339 UTC
    expires_at: str
    ask_timeout: float


class PendingList(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One broker's answer to `rumi.admin.pending` (every broker answers; `more` were left out)."""

    v: int
    broker: str
    asks: list[PendingAsk] = []
    more: int = 0


class Answer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The operator's answer to one ask, on `rumi.admin.approve.<broker>.<n>`."""

    v: int
    answer: Literal["approve", "deny"]
    os_user: str = ""  # claimed by the CLI; recorded as `claimed_os_user`


class AnswerReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The broker's reply to an `Answer`: taken (with the ask it settled) or why not."""

    v: int
    ok: bool
    message: str
    ask: PendingAsk | None = None


class Notice(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Published on `rumi.admin.asks` when an ask is made (`asked`) and when it is settled."""

    v: int
    event: Literal["asked", "approved", "denied", "timed_out", "cancelled"]
    ask: PendingAsk
    approver: str = ""
    claimed_os_user: str = ""


_ANSWER_DECODER = msgspec.json.Decoder(Answer)
_ENCODER = msgspec.json.Encoder()


def check_approval_id(approval_id: str) -> tuple[str, str]:
    """(broker instance, number) of an approval id like `3f9a1c-7`; ValueError saying the form."""
    m = _ID_RE.match(approval_id)
    if m is None:
        raise ValueError(f"approval id {approval_id!r} must look like 3f9a1c-7 (as `rumi pending` shows it)")
    return m.group(1), m.group(2)


def answer_subject(approval_id: str) -> str:
    """The subject answering `approval_id` (only its broker listens there)."""
    instance, number = check_approval_id(approval_id)
    return f"{APPROVALS_ANSWER}.{instance}.{number}"


@dataclass
class _Held:
    ask: PendingAsk
    settled: anyio.Event = field(default_factory=anyio.Event)
    verdict: Verdict | None = None
    claimed_os_user: str = ""


class ApprovalDesk:
    """The requests one broker holds for an operator, the answers to them, and their audit events."""

    def __init__(self, instance: str | None = None) -> None:
        self.instance = instance or secrets.token_hex(3)  # names this broker in approval ids
        self._seq = 0
        self._held: dict[str, _Held] = {}
        self._nc: Client | None = None
        self._audit: AuditWriter | None = None
        self._closed = False

    @property
    def held(self) -> int:
        """How many requests wait for an answer now."""
        return len(self._held)

    def listing(self) -> PendingList:
        """What this broker holds, oldest first."""
        asks = sorted((h.ask for h in self._held.values()), key=lambda a: a.asked_at)
        return PendingList(APPROVAL_VERSION, self.instance, asks[:MAX_LISTED], max(0, len(asks) - MAX_LISTED))

    # -- serving -----------------------------------------------------------------------------------
    async def serve(
        self,
        nc: Client,
        audit: AuditWriter,
        stopping: anyio.Event,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Answer `rumi.admin.pending` and this broker's `rumi.admin.approve.<instance>.*` until
        `stopping`; then deny whatever is still held (a stopping broker answers nothing later)."""
        self._nc, self._audit = nc, audit
        listing = await nc.subscribe(APPROVALS_PENDING, pending_msgs_limit=256)
        answers = await nc.subscribe(f"{APPROVALS_ANSWER}.{self.instance}.*", pending_msgs_limit=1024)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._serve_listing, listing)
                tg.start_soon(self._serve_answers, answers)
                task_status.started()
                await stopping.wait()
                self.close()
                tg.cancel_scope.cancel()
        finally:
            self.close()
            with anyio.move_on_after(2, shield=True):
                for sub in (listing, answers):
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()

    def close(self) -> None:
        """Refuse new asks and deny the held ones (`approval: cancelled`)."""
        self._closed = True
        for held in list(self._held.values()):
            self._settle(held, "cancelled")

    async def _serve_listing(self, sub: Any) -> None:
        # Our own task, not a nats-py callback; the admin identity is the only one that may ask.
        async for msg in sub.messages:
            await _respond(msg, _ENCODER.encode(self.listing()))

    async def _serve_answers(self, sub: Any) -> None:
        async for msg in sub.messages:
            reply = self.take_answer(msg.subject, msg.data)
            await _respond(msg, _ENCODER.encode(reply))

    def take_answer(self, subject: str, data: bytes) -> AnswerReply:
        """Settle the ask `subject` names with the answer in `data`; the first answer wins."""
        instance, _, number = subject.removeprefix(f"{APPROVALS_ANSWER}.").partition(".")
        approval_id = f"{instance}-{number}"
        try:
            answer = _ANSWER_DECODER.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return AnswerReply(APPROVAL_VERSION, False, f"malformed answer: {exc}")
        if answer.v != APPROVAL_VERSION:
            return AnswerReply(
                APPROVAL_VERSION, False, f"answer version {answer.v} unsupported; this broker speaks 1"
            )
        if answer.os_user and not _OS_USER_RE.match(answer.os_user):
            return AnswerReply(APPROVAL_VERSION, False, "os_user must match [A-Za-z0-9._@-]{1,64}")
        held = self._held.get(approval_id)
        if held is None or held.verdict is not None:
            return AnswerReply(
                APPROVAL_VERSION,
                False,
                f"no request {approval_id} is waiting (answered already, timed out, or never asked)",
            )
        self._settle(held, "approved" if answer.answer == "approve" else "denied", answer.os_user)
        return AnswerReply(APPROVAL_VERSION, True, f"{held.verdict} request {approval_id}", held.ask)

    def _settle(self, held: _Held, verdict: Verdict, claimed_os_user: str = "") -> None:
        if held.verdict is None:
            held.verdict, held.claimed_os_user = verdict, claimed_os_user
            held.settled.set()

    # -- one request ---------------------------------------------------------------------------------
    async def hold(self, rec: RequestRecord, grant: Mapping[str, Any]) -> bytes | None:
        """None when `rec` may go on (its grant does not ask, or an operator approved); otherwise the
        reply refusing it, its `deny` event stored. The wait takes no thread and no handler time."""
        if grant.get("mode") != "ask":
            return None
        timeout = float(grant.get("ask_timeout", DEFAULT_ASK_TIMEOUT))
        if self._closed or self._nc is None or self._audit is None:
            message = "no operator can be asked now (the broker is not serving asks); denied"
            return await self._deny(rec, None, "cancelled", message)
        self._seq += 1
        approval_id = f"{self.instance}-{self._seq}"
        now = time.time()
        ask = PendingAsk(
            id=approval_id,
            request_id=rec.request_id,
            pack_id=rec.pack_id,
            component_id=rec.component_id,
            capability=rec.capability,
            target=rec.target,
            asked_at=utc_timestamp(datetime.fromtimestamp(now, UTC)),
            expires_at=utc_timestamp(datetime.fromtimestamp(now + timeout, UTC)),
            ask_timeout=timeout,
        )
        asked = rec.fields(
            "deny",
            PENDING_CODE,
            phase="ask",
            message=f"waiting up to {timeout:g} s for an operator (rumi approve/deny {approval_id})",
            extra={"approval_id": approval_id, "ask_timeout": timeout},
        )
        try:
            await self._audit.record(asked, msg_id=f"{rec.request_id}.ask")
        except errors.AuditError:
            log.error("audit unavailable: refusing to hold %s %s", rec.pack_id, rec.capability)
            rec.decision, rec.code = "error", "unavailable"
            return error_reply(rec.request_id, "unavailable", "audit log unavailable; request refused")
        held = self._held[approval_id] = _Held(ask)
        try:
            await self._notify(Notice(APPROVAL_VERSION, "asked", ask))
            with anyio.move_on_after(timeout):
                await held.settled.wait()
        finally:
            self._held.pop(approval_id, None)
        verdict = held.verdict or "timed_out"
        if verdict == "approved":
            rec.approval = {
                "approval": "approved",
                "approval_id": approval_id,
                "approver": APPROVER,
                "claimed_os_user": held.claimed_os_user,
            }
            await self._notify(Notice(APPROVAL_VERSION, "approved", ask, APPROVER, held.claimed_os_user))
            return None
        message = {
            "denied": "an operator denied this request",
            "timed_out": f"no operator answered within {timeout:g} s; denied",
            "cancelled": "the broker is stopping; denied",
        }[verdict]
        return await self._deny(rec, held, verdict, message)

    async def _deny(self, rec: RequestRecord, held: _Held | None, verdict: Verdict, message: str) -> bytes:
        """Exactly one `deny` decision event, always written on its own (never folded into an aggregate:
        the Pack's in-flight quota already bounds how many asks end at once)."""
        rec.approval = {"approval": verdict}
        if held is not None:
            rec.approval["approval_id"] = held.ask.id
            if verdict == "denied":
                rec.approval |= {"approver": APPROVER, "claimed_os_user": held.claimed_os_user}
        rec.decision, rec.code = "deny", "permission_denied"
        fields = rec.fields("deny", "permission_denied", phase="decision", message=message)
        if self._audit is not None:
            try:
                await self._audit.record(fields, msg_id=rec.request_id)
            except errors.AuditError:
                log.error("audit unavailable while denying held request %s", rec.request_id)
        if held is not None:
            approver = APPROVER if verdict == "denied" else ""
            await self._notify(Notice(APPROVAL_VERSION, verdict, held.ask, approver, held.claimed_os_user))
        return error_reply(rec.request_id, "permission_denied", message)

    async def _notify(self, notice: Notice) -> None:
        if self._nc is None:
            return
        try:
            await self._nc.publish(APPROVALS_NOTICES, _ENCODER.encode(notice))
        except Exception as exc:  # a notice is a convenience; the audit event is the record
            log.warning("could not publish an ask notice: %s", type(exc).__name__)


async def _respond(msg: Any, payload: bytes) -> None:
    if msg.reply:
        try:
            await msg.respond(payload)
        except Exception as exc:
            log.warning("could not answer %s: %s", msg.subject, type(exc).__name__)
