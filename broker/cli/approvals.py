"""`rumi pending`, `rumi approve`, `rumi deny`: answer requests held in ask mode (docs/ask-mode.md).

The work is `broker.admin.approvals`; these commands parse options and print. Exit codes: 0 ok,
1 no such request waiting, 2 a malformed id or a grant file that cannot be edited, 3 no NATS or no
broker, 4 the broker did not confirm.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from broker.cli.common import JsonOption, RootOption, print_json, run_async, workspace

if TYPE_CHECKING:
    from broker.service.approvals import Notice, PendingAsk

__all__ = ["approve_cmd", "deny_cmd", "pending_cmd", "register"]

IdArg = Annotated[str, typer.Argument(help="The approval id `rumi pending` shows, e.g. 3f9a1c-7.")]
_WIDTHS = [12, 8, 12, 28, 12]


def shown(text: str) -> str:
    """`text` safe for a terminal: a Pack chose parts of it, so control and format characters (escape
    sequences, carriage returns, bidi overrides) are written as escapes and cannot disguise a request."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _seconds_left(ask: PendingAsk) -> str:
    from datetime import UTC, datetime

    try:
        expires = datetime.strptime(ask.expires_at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return "?"
    return f"{max(0.0, expires.timestamp() - time.time()):.0f}s"


def _row(ask: PendingAsk, event: str | None = None) -> str:
    cells = [ask.id, _seconds_left(ask), shown(ask.pack_id), shown(ask.component_id), shown(ask.capability)]
    line = "  ".join(c.ljust(w) for c, w in zip(cells, _WIDTHS, strict=True)) + "  " + shown(ask.target)
    return line if event is None else f"{event.upper():<10}{line}"


_HEADER = "  ".join(
    h.ljust(w) for h, w in zip(["ID", "LEFT", "PACK", "COMPONENT", "CAPABILITY"], _WIDTHS, strict=True)
)


def _notice_line(notice: Notice) -> str:
    who = (
        f"  by {notice.approver} (os user {shown(notice.claimed_os_user) or '?'}, claimed)"
        if notice.approver
        else ""
    )
    return _row(notice.ask, notice.event) + who


def pending_cmd(
    root: RootOption = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new asks and their answers until Ctrl-C.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """List requests waiting for an operator's answer (grant entries with "mode": "ask").

    Answer one with `rumi approve ID` or `rumi deny ID`; nobody answering denies it after its
    ask_timeout. With --json: one document (with --follow: one JSON object per line, as notices).
    """
    import msgspec

    from broker.admin.approvals import admin_connection, follow_pending, pending_asks

    ws = workspace(root)

    async def body() -> None:
        async with admin_connection(ws) as nc:
            if not follow:
                asks = await pending_asks(nc)
                if as_json:
                    print_json(msgspec.to_builtins(asks))
                elif not asks:
                    typer.echo("nothing is waiting for an answer")
                else:
                    typer.echo(_HEADER + "  TARGET")
                    for ask in asks:
                        typer.echo(_row(ask))
                return
            async for notice in follow_pending(nc):
                if as_json:
                    typer.echo(json.dumps(msgspec.to_builtins(notice), sort_keys=True))
                else:
                    typer.echo(_notice_line(notice))

    try:
        run_async(body)
    except KeyboardInterrupt:
        return


def _answer(approval_id: str, *, approve: bool, remember: bool, root: str | None, as_json: bool) -> None:
    from broker.admin.approvals import admin_connection, answer
    from broker.admin.approvals import remember as remember_grant
    from broker.cli.common import fail
    from broker.core.errors import RumiError

    ws = workspace(root)

    async def body() -> PendingAsk:
        async with admin_connection(ws) as nc:
            return await answer(nc, approval_id, approve=approve)

    ask = run_async(body)
    verb = "approved" if approve else "denied"
    result: dict[str, Any] = {"id": ask.id, "answer": verb, "request": _ask_dict(ask)}
    if remember:
        try:
            result["remembered"] = remember_grant(ws, ask)
        except RumiError as exc:
            fail(f"{verb} {ask.id}, but the grant was not changed: {exc}", exc.exit_code)
    if as_json:
        print_json(result)
        return
    typer.echo(
        f"{verb} {ask.id}: {shown(ask.component_id)} {shown(ask.capability)} {shown(ask.target)}".rstrip()
    )
    if remember:
        if result["remembered"]:
            typer.echo(f"remembered: {shown(ask.component_id)} {ask.capability} no longer asks (plain allow)")
        else:
            typer.echo(
                f"nothing to remember: the {ask.capability} entry of {shown(ask.component_id)} no longer asks"
            )


def _ask_dict(ask: PendingAsk) -> dict[str, Any]:
    import msgspec

    data: dict[str, Any] = msgspec.to_builtins(ask)
    return data


def approve_cmd(
    approval_id: IdArg,
    remember: Annotated[
        bool,
        typer.Option(
            "--remember", help="Also turn that grant entry's ask into a plain allow (no more asks)."
        ),
    ] = False,
    root: RootOption = None,
    as_json: JsonOption = False,
) -> None:
    """Approve a held request: it runs now, and the audit names you (the admin identity) as approver."""
    _answer(approval_id, approve=True, remember=remember, root=root, as_json=as_json)


def deny_cmd(approval_id: IdArg, root: RootOption = None, as_json: JsonOption = False) -> None:
    """Deny a held request: the Pack gets permission_denied, and the audit names you as who denied it."""
    _answer(approval_id, approve=False, remember=False, root=root, as_json=as_json)


def register(app: typer.Typer) -> None:
    """Add `rumi pending`, `rumi approve` and `rumi deny` to the main app."""
    app.command("pending")(pending_cmd)
    app.command("approve")(approve_cmd)
    app.command("deny")(deny_cmd)
