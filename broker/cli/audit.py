"""`rumi audit`: read, verify and export the audit stream; show how outside tools can read it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import IO, Annotated, Any, TypeVar
from urllib.parse import urlsplit

import typer

from broker.audit.trail import (
    DECISIONS,
    ChainVerifier,
    VerifyReport,
    canonical_json,
    load_events,
    read_stored,
)
from broker.cli.common import RootOption, fail, run_async, workspace
from broker.core.errors import AuditError, NatsSetupError
from broker.core.ids import is_pack_id
from broker.core.protocol import AUDIT_STREAM, AUDIT_SUBJECTS
from broker.core.workspace import Workspace

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


async def _quiet(_: Exception) -> None:
    # nats-py would log connection errors with tracebacks; the command reports one line instead.
    return None


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), timeout=1):
            return True
    except OSError:
        return False


@contextlib.asynccontextmanager
async def _audit_connection(ws: Workspace) -> AsyncIterator[Any]:
    """Connect as the read-only `audit` identity, or fail with one line saying what to do."""
    from broker.bus.server import connect, nats_url

    url = nats_url(ws)
    if not _reachable(url):
        raise NatsSetupError(f"cannot reach NATS at {url}: start `rumi broker` first")
    nc = await connect(
        ws, "audit", allow_reconnect=False, max_reconnect_attempts=0, error_cb=_quiet, name="rumi-audit-cli"
    )
    try:
        yield nc
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


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
    if decision is not None and decision not in DECISIONS:
        fail(f"--decision must be allow, deny or error (got {decision!r})")
    _check_pack(pack)
    ws = workspace(root)

    def wanted(event: dict[str, Any]) -> bool:
        return decision is None or event.get("decision") == decision

    async def body() -> None:
        async with _audit_connection(ws) as nc:
            if not as_json:
                typer.echo(_HEADER)
            # Stored events first (only the last `limit` when asked), then, with --follow, new ones.
            last_seq = 0
            recent: deque[dict[str, Any]] = deque(maxlen=limit)
            async with contextlib.aclosing(read_stored(nc, pack=pack)) as stored:
                async for seq, event in stored:
                    last_seq = seq
                    if wanted(event):
                        if limit is None:
                            _emit(event, as_json)
                        else:
                            recent.append(event)
            for event in recent:
                _emit(event, as_json)
            if not follow:
                return
            async with contextlib.aclosing(
                read_stored(nc, pack=pack, follow=True, start_seq=last_seq + 1)
            ) as live:
                async for _, event in live:
                    if wanted(event):
                        _emit(event, as_json)

    _run_to_pipe(body)


def _print_report(report: VerifyReport, source: str) -> None:
    if report.failure is not None:
        typer.echo(f"FAILED ({source}): {report.failure}", err=False)
        raise typer.Exit(1)
    typer.echo(f"OK: {report.events} events in {report.chains} chains verified ({source})")
    for chain, (seq, head) in sorted(report.heads.items()):
        typer.echo(f"  chain {chain}: {seq} events, last hash {head}")


@audit_app.command("verify")
def verify_cmd(
    root: RootOption = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="Verify an exported JSON lines file instead of the stream.")
    ] = None,
) -> None:
    """Check every hash chain (stream order, or file order); exit 1 naming the first bad event."""
    if file is not None:
        try:
            with file.open(encoding="utf-8") as f:
                verifier = ChainVerifier()
                for event in load_events(f):
                    verifier.add(event)
        except OSError as exc:
            fail(f"{file}: cannot read ({exc.strerror})")
        except UnicodeDecodeError:
            fail(f"{file}: not UTF-8 text; expected JSON lines from `rumi audit export`")
        _print_report(verifier.report, str(file))
        return
    ws = workspace(root)

    async def body() -> VerifyReport:
        verifier = ChainVerifier()
        async with _audit_connection(ws) as nc:
            async with contextlib.aclosing(read_stored(nc)) as stored:
                async for _, event in stored:
                    verifier.add(event)
        return verifier.report

    _print_report(run_async(body), f"stream {AUDIT_STREAM}")


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
    _check_pack(pack)
    ws = workspace(root)

    async def body(out: IO[str]) -> int:
        count = 0
        async with _audit_connection(ws) as nc:
            async with contextlib.aclosing(read_stored(nc, pack=pack)) as stored:
                async for _, event in stored:
                    out.write(canonical_json(event).decode("utf-8") + "\n")
                    count += 1
        return count

    if output is None:
        count = _run_to_pipe(lambda: body(sys.stdout))
    else:
        tmp = output.with_name(f".{output.name}.partial")
        try:
            with tmp.open("w", encoding="utf-8") as out:
                count = run_async(lambda: body(out))
            tmp.replace(output)  # no half-written export under the real name
        except OSError as exc:
            fail(f"{output}: cannot write ({exc.strerror})")
        finally:
            tmp.unlink(missing_ok=True)
    typer.echo(f"exported {count} events" + (f" to {output}" if output else ""), err=True)


@audit_app.command("creds")
def creds_cmd(
    root: RootOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Show the NATS URL, stream and read-only credentials for outside audit readers (any NATS client)."""
    from broker.bus.creds import ensure_identity
    from broker.bus.server import nats_url

    ws = workspace(root)
    try:
        url = nats_url(ws)
        seed = ensure_identity(ws, "audit").seed_path
    except (NatsSetupError, AuditError) as exc:
        fail(str(exc))
    from broker.bus.config import inbox_prefix

    inbox = inbox_prefix("audit")
    example = f"nats --server {url} --nkey {seed} --inbox-prefix {inbox} stream view {AUDIT_STREAM}"
    if as_json:
        info = {
            "url": url,
            "stream": AUDIT_STREAM,
            "subjects": AUDIT_SUBJECTS,
            "user": "audit",
            "seed_file": str(seed),
            "inbox_prefix": inbox,
            "example": example,
        }
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"NATS URL:     {url}")
    typer.echo(f"stream:       {AUDIT_STREAM} (subjects {AUDIT_SUBJECTS}, one JSON event per message)")
    typer.echo(f"credentials:  {seed}  (nkey seed of the read-only `audit` user; keep it private)")
    typer.echo(f"inbox prefix: {inbox}  (clients must use it: the audit user may only receive there)")
    typer.echo(f"example:      {example}")
    typer.echo(
        "The `audit` user may only create consumers on the stream and read them: it cannot publish, "
        "delete or change anything."
    )
