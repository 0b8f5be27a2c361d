"""Reading the audit stream from the host: connection, tail, verify, export, reader credentials."""

from __future__ import annotations

import contextlib
import socket
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from broker.audit.trail import ChainVerifier, VerifyReport, canonical_json, load_events, read_stored
from broker.core.errors import NatsSetupError
from broker.core.protocol import AUDIT_STREAM, AUDIT_SUBJECTS
from broker.core.workspace import Workspace

AUDIT_USER = "audit"


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
async def audit_connection(ws: Workspace) -> AsyncIterator[Any]:
    """Connect as the read-only `audit` identity, or raise NatsSetupError saying what to do."""
    from broker.bus.server import connect, nats_url

    url = nats_url(ws)
    if not _reachable(url):
        raise NatsSetupError(f"cannot reach NATS at {url}: start `rumi broker` first")
    nc = await connect(
        ws,
        AUDIT_USER,
        allow_reconnect=False,
        max_reconnect_attempts=0,
        error_cb=_quiet,
        name="rumi-audit-cli",
    )
    try:
        yield nc
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


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


async def verify_stream(ws: Workspace) -> VerifyReport:
    """Check every hash chain in the stream, in stream order."""
    verifier = ChainVerifier()
    async with audit_connection(ws) as nc:
        async with contextlib.aclosing(read_stored(nc)) as stored:
            async for _, event in stored:
                verifier.add(event)
    return verifier.report


def verify_file(path: Path) -> VerifyReport:
    """Check every hash chain in an exported JSON lines file, in file order (OSError or
    UnicodeDecodeError when it cannot be read as text)."""
    with path.open(encoding="utf-8") as f:
        verifier = ChainVerifier()
        for event in load_events(f):
            verifier.add(event)
    return verifier.report


async def export_events(ws: Workspace, out: IO[str], *, pack: str | None) -> int:
    """Write the stored events (only `pack`'s when given) to `out` as JSON lines; how many."""
    count = 0
    async with audit_connection(ws) as nc:
        async with contextlib.aclosing(read_stored(nc, pack=pack)) as stored:
            async for _, event in stored:
                out.write(canonical_json(event).decode("utf-8") + "\n")
                count += 1
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
