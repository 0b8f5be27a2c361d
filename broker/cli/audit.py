"""`rumi audit`: read, verify and export the audit stream; show how outside tools can read it."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from broker.cli.common import RootOption, fail, run_async, workspace
from broker.core.errors import AuditError, NatsSetupError
from broker.core.ids import is_pack_id

if TYPE_CHECKING:
    from broker.audit.trail import VerifyReport

T = TypeVar("T")

audit_app = typer.Typer(
    name="audit",
    help="Read, verify and export the audit stream.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Decision = Annotated[
    str | None,
    typer.Option("--decision", help="Only events with this decision: allow, deny or error."),
]


_WIDTHS = [27, 16, 28, 12, 40, 8, 22]


def _row(event: dict[str, Any]) -> str:
    if "_malformed" in event:
        return f"!! malformed: {event['_malformed']}"
    code = str(event.get("code", ""))
    if event.get("count"):
        code += f" x{event['count']}"
    decision = str(event.get("decision", ""))
    if event.get("phase") == "outcome":
        decision += "*"  # the outcome of an earlier decision event
    duration = event.get("duration_ms")
    ms = f"{duration:.1f}" if isinstance(duration, int | float) else ""
    cells = [
        str(event.get("ts", ""))[:27],
        str(event.get("pack_id", ""))[:16],
        str(event.get("component_id", ""))[:28],
        str(event.get("capability", ""))[:12],
        str(event.get("target", ""))[:40],
        decision[:8],
        code[:22],
    ]
    return "  ".join(c.ljust(w) for c, w in zip(cells, _WIDTHS, strict=True)) + f"  {ms:>8}"


_HEADER = (
    "  ".join(
        h.ljust(w)
        for h, w in zip(
            ["TS", "PACK", "COMPONENT", "CAPABILITY", "TARGET", "DECISION", "CODE"],
            _WIDTHS,
            strict=True,
        )
    )
    + f"  {'MS':>8}"
)


def _run_to_pipe(fn: Callable[[], Awaitable[T]]) -> T:
    """`run_async` for commands that print a lot: a closed pipe (`| head`) ends them quietly."""
    try:
        return run_async(fn)
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None


def _check_pack(pack: str | None) -> None:
    if pack is not None and not is_pack_id(pack):
        fail(f"--pack {pack!r} is not a pack id (a lowercase letter, then [a-z0-9_-], at most 32)")


def _emit(event: dict[str, Any], as_json: bool) -> None:
    from broker.audit.trail import canonical_json

    typer.echo(canonical_json(event).decode("utf-8") if as_json else _row(event))


@audit_app.command("tail")
def tail_cmd(
    root: RootOption = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events until Ctrl-C.")
    ] = False,
    pack: Annotated[str | None, typer.Option("--pack", help="Only this Pack's events.")] = None,
    decision: Decision = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines (the stored events).")] = False,
    limit: Annotated[
        int | None,
        typer.Option("--limit", "-n", min=1, help="Only the last N matching events already stored."),
    ] = None,
) -> None:
    """Print audit events (oldest first); with --follow, keep printing new ones."""
    from broker.admin.audit import audit_connection, tail_events
    from broker.audit.trail import DECISIONS

    if decision is not None and decision not in DECISIONS:
        fail(f"--decision must be allow, deny or error (got {decision!r})")
    _check_pack(pack)
    ws = workspace(root)

    async def body() -> None:
        async with audit_connection(ws) as nc:
            if not as_json:
                typer.echo(_HEADER)
            events = tail_events(nc, pack=pack, decision=decision, limit=limit, follow=follow)
            async with contextlib.aclosing(events) as each:
                async for event in each:
                    _emit(event, as_json)

    _run_to_pipe(body)


def _print_report(report: VerifyReport, source: str, *, request_timeout: float = 30.0) -> None:
    if report.failure is not None:
        typer.echo(f"FAILED ({source}): {report.failure}", err=False)
        raise typer.Exit(1)
    typer.echo(f"OK: {report.events} events in {report.chains} chains verified ({source})")
    for chain, (seq, head) in sorted(report.heads.items()):
        typer.echo(f"  chain {chain}: {seq} events, last hash {head}")
    missing = report.missing_outcomes(older_than=request_timeout + 5)
    if missing:
        chain, request_id, ts = missing[0]
        typer.echo(
            f"  no outcome recorded for {len(missing)} allowed request(s) older than the request timeout "
            f"(first: {request_id} in chain {chain} at {ts}): the broker stopped before writing them; "
            "the actions may or may not have happened (docs/audit.md, 'Crashes')"
        )


@audit_app.command("verify")
def verify_cmd(
    root: RootOption = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="Verify an exported JSON lines file instead of the stream.")
    ] = None,
) -> None:
    """Check every hash chain (stream order, or file order); exit 1 naming the first bad event."""
    from broker.admin.audit import verify_file, verify_stream
    from broker.core.protocol import AUDIT_STREAM

    if file is not None:
        try:
            report = verify_file(file)
        except OSError as exc:
            fail(f"{file}: cannot read ({exc.strerror})")
        except UnicodeDecodeError:
            fail(f"{file}: not UTF-8 text; expected JSON lines from `rumi audit export`")
        _print_report(report, str(file))
        return
    ws = workspace(root)
    timeout = ws.load_config().broker.request_timeout
    _print_report(run_async(lambda: verify_stream(ws)), f"stream {AUDIT_STREAM}", request_timeout=timeout)


@audit_app.command("export")
def export_cmd(
    root: RootOption = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file (default: standard output).")
    ] = None,
    pack: Annotated[
        str | None, typer.Option("--pack", help="Only this Pack's events (verify needs all).")
    ] = None,
) -> None:
    """Write the audit stream as JSON lines (one stored event per line), oldest first."""
    from broker.admin.audit import export_events, export_file

    _check_pack(pack)
    ws = workspace(root)
    if output is None:
        count = _run_to_pipe(lambda: export_events(ws, sys.stdout, pack=pack))
    else:
        try:
            with export_file(output) as out:
                count = run_async(lambda: export_events(ws, out, pack=pack))
        except OSError as exc:
            fail(f"{output}: cannot write ({exc.strerror})")
    typer.echo(f"exported {count} events" + (f" to {output}" if output else ""), err=True)


@audit_app.command("creds")
def creds_cmd(
    root: RootOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Show the NATS URL, stream and read-only credentials for outside audit readers (any NATS client)."""
    from broker.admin.audit import reader_credentials

    try:
        info = reader_credentials(workspace(root))
    except (NatsSetupError, AuditError) as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"NATS URL:     {info['url']}")
    typer.echo(f"stream:       {info['stream']} (subjects {info['subjects']}, one JSON event per message)")
    typer.echo(
        f"credentials:  {info['seed_file']}  (nkey seed of the read-only `audit` user; keep it private)"
    )
    typer.echo(
        f"inbox prefix: {info['inbox_prefix']}  (clients must use it: the audit user may only receive there)"
    )
    typer.echo(f"example:      {info['example']}")
    typer.echo(
        "The `audit` user may only create consumers on the stream and read them: it cannot publish, "
        "delete or change anything."
    )
