"""`rumi audit`: read, verify and export the audit stream; show how outside tools can read it.

Exit codes: 0 ok, 1 verify found a problem, 2 usage error (a bad option, file or keys file),
3 no NATS to read from, 4 reading failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from broker.cli.common import JsonOption, RootOption, fail, print_json, run_async, workspace
from broker.core.errors import EXIT_DENIED, EXIT_USAGE, AuditError, NatsSetupError
from broker.core.ids import is_pack_id

if TYPE_CHECKING:
    from datetime import datetime

    from broker.admin.audit import Verification
    from broker.audit.checkpoint import Reference

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
        fail(
            f"--pack {pack!r} is not a pack id (a lowercase letter, then [a-z0-9_-], at most 32)", EXIT_USAGE
        )


def _check_decision(decision: str | None) -> None:
    if decision is not None and decision not in ("allow", "deny", "error"):
        fail(f"--decision must be allow, deny or error (got {decision!r})", EXIT_USAGE)


def _emit(event: dict[str, Any], as_json: bool) -> None:
    from broker.audit.trail import canonical_json

    typer.echo(canonical_json(event).decode("utf-8") if as_json else _row(event))


_REQUEST_WIDTHS = [27, 16, 28, 12, 40, 8, 22]  # TS PACK COMPONENT CAPABILITY TARGET DECISION CODE
_REASON_CHARS = 80


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _cut_start(text: str, width: int) -> str:
    """A target cut at its start: the end of a path (the file) or of host:port is what tells."""
    return text if len(text) <= width else "…" + text[len(text) - width + 1 :]


def _request_cells(row: Any, wide: bool) -> list[str]:
    """One request's cells: TS, PACK, COMPONENT, CAPABILITY, TARGET, DECISION, CODE, MS, REASON."""
    code = row.code + (f" x{row.count}" if row.count else "")
    decision = row.decision + ("…" if row.pending else "")  # shown before its outcome: see REASON
    ms = f"{row.duration_ms:.1f}" if row.duration_ms is not None else ""
    reason = row.reason if wide else _cut(row.reason, _REASON_CHARS)
    cells = [row.ts, row.pack_id, row.component_id, row.capability, row.target, decision, code]
    if not wide:
        cells = [
            (_cut_start if i == 4 else _cut)(c, w)
            for i, (c, w) in enumerate(zip(cells, _REQUEST_WIDTHS, strict=True))
        ]
    return [*cells, ms, reason]


def _print_requests(rows: list[Any], *, wide: bool) -> None:
    """The rows as a table; with `wide` nothing is cut and the columns fit the longest cell."""
    header = ["TS", "PACK", "COMPONENT", "CAPABILITY", "TARGET", "DECISION", "CODE", "MS", "REASON"]
    table = [_request_cells(r, wide) for r in rows]
    widths = list(_REQUEST_WIDTHS)
    if wide:
        widths = [max([len(header[i]), *(len(c[i]) for c in table)]) for i in range(len(widths))]
    for cells in [header, *table]:
        left = "  ".join(c.ljust(w) for c, w in zip(cells[:7], widths, strict=True))
        typer.echo(f"{left}  {cells[7]:>8}  {cells[8]}".rstrip())


@audit_app.command("tail")
def tail_cmd(
    root: RootOption = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new requests until Ctrl-C.")
    ] = False,
    pack: Annotated[str | None, typer.Option("--pack", help="Only this Pack's requests.")] = None,
    decision: Annotated[
        str | None,
        typer.Option("--decision", help="Only requests whose final decision is this: allow, deny or error."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON lines: the stored events, every phase.")
    ] = False,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit", "-n", min=1, help="Only the last N matching requests (events with --phases) stored."
        ),
    ] = None,
    wide: Annotated[bool, typer.Option("--wide", help="Full targets and reasons, nothing cut.")] = False,
    phases: Annotated[
        bool,
        typer.Option("--phases", help="Every event on its own row (an action's decision and outcome apart)."),
    ] = False,
) -> None:
    """Print one row per request (oldest first): its final decision, code and REASON; with --follow,
    keep printing new ones. --phases prints every event instead; --json the stored events."""
    from broker.admin.audit import audit_connection, tail_events, tail_requests
    from broker.core.errors import WorkspaceError

    _check_decision(decision)
    _check_pack(pack)
    ws = workspace(root)
    try:
        horizon = ws.load_config().broker.request_timeout + 5.0
    except WorkspaceError:
        horizon = 35.0  # the default request timeout and the margin `rumi audit verify` uses

    async def body() -> None:
        async with audit_connection(ws) as nc:
            if as_json or phases:
                if not as_json:
                    typer.echo(_HEADER)
                events = tail_events(nc, pack=pack, decision=decision, limit=limit, follow=follow)
                async with contextlib.aclosing(events) as each:
                    async for event in each:
                        _emit(event, as_json)
                return
            requests = tail_requests(
                nc, pack=pack, decision=decision, limit=limit, follow=follow, horizon=horizon
            )
            if not follow:  # all at once: a --wide table fits its columns to the longest cell
                async with contextlib.aclosing(requests) as each:
                    _print_requests([row async for row in each], wide=wide)
                return
            _print_requests([], wide=False)  # the header
            async with contextlib.aclosing(requests) as each:
                async for row in each:
                    cells = _request_cells(row, wide)
                    left = "  ".join(c.ljust(w) for c, w in zip(cells[:7], _REQUEST_WIDTHS, strict=True))
                    typer.echo(f"{left}  {cells[7]:>8}  {cells[8]}".rstrip())

    _run_to_pipe(body)


def _print_verification(result: Verification, *, as_json: bool, request_timeout: float = 30.0) -> None:
    missing = result.report.missing_outcomes(older_than=request_timeout + 5) if result.ok else []
    if as_json:
        print_json(result.as_json(missing))
        if not result.ok:
            raise typer.Exit(EXIT_DENIED)
        return
    if result.failure is not None:
        typer.echo(f"FAILED ({result.source}): {result.failure}")
        raise typer.Exit(EXIT_DENIED)
    report = result.report
    typer.echo(f"OK: {report.events} events in {report.chains} chains verified ({result.source})")
    for chain, (seq, head) in sorted(report.heads.items()):
        line = f"  chain {chain}: seq {report.starts.get(chain, 1)}-{seq}, last hash {head}"
        if chain in report.checkpoints:
            line += f"; signed up to its checkpoint at seq {report.checkpoints[chain][0]}"
        typer.echo(line)
    for note in result.notes:
        typer.echo(f"  note: {note}")
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
    against_stream: Annotated[
        bool,
        typer.Option(
            "--against-stream",
            help="With --file: also check that the file reaches each chain's latest checkpoint in the stream.",
        ),
    ] = False,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            help="Also check against the checkpoints in this JSON lines file (a later export, or saved "
            "checkpoint lines): a cut end or a checkpoint that does not match fails.",
        ),
    ] = None,
    keys: Annotated[
        Path | None,
        typer.Option("--keys", help="Public checkpoint keys (default: docker/.rumi/audit-keys.json)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Check every hash chain and checkpoint signature (stream order, or file order); exit 1 naming
    the first bad event, or the checkpoint a cut file no longer reaches."""
    from broker.admin.audit import file_references, load_keys, stream_references, verify_file, verify_stream
    from broker.core.errors import WorkspaceError
    from broker.core.protocol import AUDIT_STREAM

    if against_stream and file is None:
        fail("--against-stream compares an exported file with the stream: add --file F", EXIT_USAGE)
    if against_stream and checkpoint is not None:
        fail("give either --against-stream or --checkpoint FILE, not both", EXIT_USAGE)
    ws = workspace(root)
    try:
        public = load_keys(ws, keys)
    except AuditError as exc:
        fail(str(exc), EXIT_USAGE)
    refs: dict[str, Reference] | None = None
    reference: str | None = None
    notes: list[str] = []
    if checkpoint is not None:
        try:
            refs, notes = file_references(checkpoint, public)
        except OSError as exc:
            fail(f"{checkpoint}: cannot read ({exc.strerror})", EXIT_USAGE)
        except UnicodeDecodeError:
            fail(f"{checkpoint}: not UTF-8 text; expected JSON lines from `rumi audit export`", EXIT_USAGE)
        if not refs:
            fail(
                f"{checkpoint}: no valid checkpoint event in it" + (f" ({notes[0]})" if notes else ""),
                EXIT_USAGE,
            )
        reference = str(checkpoint)
    if file is None:
        try:
            timeout = ws.load_config().broker.request_timeout
        except WorkspaceError as exc:
            fail(str(exc), EXIT_USAGE)
        result = run_async(lambda: verify_stream(ws, public, refs, reference, notes))
        _print_verification(result, as_json=as_json, request_timeout=timeout)
        return
    if against_stream:
        refs, notes = run_async(lambda: stream_references(ws, public))
        reference = f"stream {AUDIT_STREAM}"
    try:
        result = verify_file(file, public, refs, reference, notes)
    except OSError as exc:
        fail(f"{file}: cannot read ({exc.strerror})", EXIT_USAGE)
    except UnicodeDecodeError:
        fail(f"{file}: not UTF-8 text; expected JSON lines from `rumi audit export`", EXIT_USAGE)
    _print_verification(result, as_json=as_json)


def _time_option(name: str, value: str | None) -> datetime | None:
    from broker.audit.export import parse_time

    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        fail(f"{name} {exc}", EXIT_USAGE)


@audit_app.command("export")
def export_cmd(
    root: RootOption = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file (default: standard output).")
    ] = None,
    pack: Annotated[
        str | None, typer.Option("--pack", help="Only this Pack's events (such a file does not verify).")
    ] = None,
    decision: Decision = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Events from this time on (2026-11-28T10:00:00Z, 2026-11-28, or an age: 15m, 2h, 7d); "
            "JSON lines start each chain at a checkpoint before it.",
        ),
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="Events before this time (same forms as --since).")
    ] = None,
    fmt: Annotated[
        str,
        typer.Option("--format", help="jsonl (the stored events) or ocsf (OCSF API Activity, for SIEMs)."),
    ] = "jsonl",
) -> None:
    """Write audit events as JSON lines (one per line), oldest first: the stored events, or OCSF."""
    from broker.admin.audit import export_events, export_file
    from broker.audit.export import FORMATS

    _check_pack(pack)
    _check_decision(decision)
    if fmt not in FORMATS:
        fail(f"--format must be {' or '.join(FORMATS)} (got {fmt!r})", EXIT_USAGE)
    start, end = _time_option("--since", since), _time_option("--until", until)
    if start is not None and end is not None and end <= start:
        fail("--until must be later than --since", EXIT_USAGE)
    ws = workspace(root)

    def run(out: Any) -> Any:
        return export_events(ws, out, pack=pack, decision=decision, since=start, until=end, fmt=fmt)

    if output is None:
        count = _run_to_pipe(lambda: run(sys.stdout))
    else:
        try:
            with export_file(output) as out:
                count = run_async(lambda: run(out))
        except OSError as exc:
            fail(f"{output}: cannot write ({exc.strerror})", EXIT_USAGE)
    skipped = (
        f"; {count.skipped} malformed event(s) left out (see `rumi audit verify`)" if count.skipped else ""
    )
    typer.echo(f"exported {count.written} events" + (f" to {output}" if output else "") + skipped, err=True)


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
        fail(str(exc), exc.exit_code)
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
