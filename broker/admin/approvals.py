"""`rumi pending`, `rumi approve`, `rumi deny`: requests held in ask mode, listed and answered over NATS
as the `admin` identity (docs/ask-mode.md).

Every broker answers `rumi.admin.pending` with what it holds (a scatter-gather: several broker
workers may each hold some); an answer goes to the one broker an approval id names, on
`rumi.admin.approve.<broker>.<n>`. The OS user running the command is sent along as a claim; the
broker records it as `claimed_os_user` beside the NATS identity it knows from the connection.
"""

from __future__ import annotations

import contextlib
import getpass
import re
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec

from broker.bus.config import APPROVALS_NOTICES, APPROVALS_PENDING
from broker.core.errors import EXIT_DENIED, EXIT_USAGE, NatsSetupError, RumiError
from broker.core.workspace import Workspace
from broker.service.approvals import (
    APPROVAL_VERSION,
    Answer,
    AnswerReply,
    Notice,
    PendingAsk,
    PendingList,
    answer_subject,
)

ADMIN_USER = "admin"
ANSWER_TIMEOUT = 5.0  # seconds the broker holding an ask has to confirm an answer
LIST_TIMEOUT = 2.0  # seconds to wait for the first broker's list
LIST_QUIET = 0.3  # then: more lists (other workers) until this long passes without one

_PENDING_DECODER = msgspec.json.Decoder(PendingList)
_REPLY_DECODER = msgspec.json.Decoder(AnswerReply)
_NOTICE_DECODER = msgspec.json.Decoder(Notice)
_ENCODER = msgspec.json.Encoder()
_NOT_OS_USER = re.compile(r"[^A-Za-z0-9._@-]")


class ApprovalError(RumiError):
    """An answer was not taken (no such ask, a malformed id, the broker failed): says why."""


class NotPending(ApprovalError):
    """No broker holds that ask (answered already, timed out, or never asked)."""

    exit_code = EXIT_DENIED


class BadApprovalId(ApprovalError):
    """The approval id is malformed."""

    exit_code = EXIT_USAGE


def admin_connection(ws: Workspace) -> contextlib.AbstractAsyncContextManager[Any]:
    """Connect as the `admin` identity, or raise NatsSetupError (exit 3) saying what to do."""
    from broker.bus.server import command_connection

    return command_connection(ws, ADMIN_USER, name="rumi-approvals-cli", start="`rumi broker` (or `rumi up`)")


def os_user() -> str:
    """The OS user running this command, as the broker accepts it (a claim, recorded as such)."""
    try:
        name = getpass.getuser()
    except Exception:  # no USER/LOGNAME and no passwd entry
        return "unknown"
    return _NOT_OS_USER.sub("_", name)[:64] or "unknown"


async def pending_asks(
    nc: Any, *, timeout: float = LIST_TIMEOUT, quiet: float = LIST_QUIET
) -> list[PendingAsk]:
    """Every ask the running brokers hold, oldest first.

    Raises NatsSetupError (exit 3) when no broker serves asks (nobody listens) or none answers.
    """
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.api import Header

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    lists: list[PendingList] = []
    try:
        await nc.publish(APPROVALS_PENDING, b"", reply=inbox)
        wait = timeout
        while True:
            try:
                msg = await sub.next_msg(timeout=wait)
            except NatsTimeout:  # no (further) broker answered
                break
            if msg.headers and msg.headers.get(Header.STATUS) == "503":
                break  # "no responders": no broker is subscribed
            try:
                lists.append(_PENDING_DECODER.decode(msg.data))
            except (msgspec.DecodeError, msgspec.ValidationError):
                raise ApprovalError("a broker answered the pending list with something unreadable") from None
            wait = quiet
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    if not lists:
        raise NatsSetupError("no broker is serving: start `rumi broker` (or `rumi up`) first")
    asks = [ask for listing in lists for ask in listing.asks]
    return sorted(asks, key=lambda a: (a.asked_at, a.id))


async def follow_pending(nc: Any) -> AsyncIterator[Notice]:
    """The asks held now (as `asked` notices), then every notice as brokers publish it, until cancelled."""
    sub = await nc.subscribe(APPROVALS_NOTICES, pending_msgs_limit=4096)
    try:
        await nc.flush()
        shown = set()
        for ask in await pending_asks(nc):
            shown.add(ask.id)
            yield Notice(APPROVAL_VERSION, "asked", ask)
        async for msg in sub.messages:
            try:
                notice = _NOTICE_DECODER.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if notice.event == "asked" and notice.ask.id in shown:
                continue  # listed above already
            shown.discard(notice.ask.id)
            yield notice
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await sub.unsubscribe()


async def answer(nc: Any, approval_id: str, *, approve: bool, claimed_user: str | None = None) -> PendingAsk:
    """Approve or deny the ask `approval_id`; return what it was. Raises BadApprovalId (exit 2),
    NotPending (exit 1), NatsSetupError (exit 3) or ApprovalError (exit 4, the broker did not answer)."""
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    try:
        subject = answer_subject(approval_id)
    except ValueError as exc:
        raise BadApprovalId(str(exc)) from None
    payload = _ENCODER.encode(
        Answer(APPROVAL_VERSION, "approve" if approve else "deny", claimed_user or os_user())
    )
    try:
        msg = await nc.request(subject, payload, timeout=ANSWER_TIMEOUT)
    except NoRespondersError:
        raise NotPending(
            f"no running broker holds {approval_id} (its broker stopped or restarted; the request was denied)"
        ) from None
    except NatsTimeout:
        raise ApprovalError(
            f"the broker holding {approval_id} did not confirm within {ANSWER_TIMEOUT:g} s"
        ) from None
    try:
        reply = _REPLY_DECODER.decode(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise ApprovalError("the broker's confirmation is unreadable") from None
    if not reply.ok or reply.ask is None:
        raise NotPending(reply.message)
    return reply.ask


def remember(ws: Workspace, ask: PendingAsk) -> bool:
    """`--remember`: the ask's grant entry becomes a plain allow. False when it no longer asks."""
    from broker.admin.grants import remember_allow

    return remember_allow(ws, ask.component_id, ask.capability)
