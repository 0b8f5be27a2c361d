"""Shared CLI bits: the --root and --json options, one-line errors with their exit codes, logging,
running async work.

Every `broker/cli` module is imported for `rumi --help`, so none imports anything heavier than typer
at module level: admin use-cases, docker, nats, asyncio, anyio, audit and policy are imported inside
the command that needs them (tests/test_cli.py checks `python -X importtime -c 'import broker.cli'`).
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from broker.core.errors import EXIT_DENIED, EXIT_USAGE, RumiError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from broker.core.workspace import Workspace

T = TypeVar("T")

RootOption = Annotated[
    str | None,
    typer.Option("--root", envvar="RUMI_ROOT", help="Workspace root (default: current directory)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (one document on stdout).")]

# Loggers of Rumi itself (module names under broker/, and the rumi.* names of the service).
RUMI_LOGGERS = ("broker", "rumi")
# Libraries whose debug output is noise in a broker log: they stay at WARNING even with -v.
QUIET_LOGGERS = ("urllib3", "docker", "httpx", "httpcore", "nats", "asyncio", "hpack")


def workspace(root: str | None) -> Workspace:
    """The workspace at --root / RUMI_ROOT / the current directory."""
    from broker.core.workspace import Workspace

    return Workspace.at(root)


def fail(message: str, code: int = EXIT_DENIED) -> NoReturn:
    """Print one line to stderr and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def fail_error(exc: RumiError) -> NoReturn:
    """A RumiError as one line on stderr, exiting with its class's exit code (docs/cli.md)."""
    fail(str(exc), exc.exit_code)


def print_json(data: Any) -> None:
    """One indented JSON document on stdout."""
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def setup_logging(verbose: bool) -> None:
    """INFO from Rumi's loggers (DEBUG with -v); the HTTP and NATS libraries only say WARNING and up."""
    import logging

    verbose = verbose or _verbose[0]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in RUMI_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    """Run async work from a command; RumiError becomes a one-line error with its exit code."""
    import anyio

    try:
        return anyio.run(fn)
    except RumiError as exc:
        fail_error(exc)
    except KeyboardInterrupt:
        sys.exit(130)


def serve_broker(
    ws: Workspace, *, verbose: bool, embedded: bool | None = None, port: int | None = None, workers: int = 1
) -> None:
    """Run the broker in this process until SIGTERM (`rumi broker`, and `rumi up`'s detached broker)."""
    from broker.service.broker import run_broker

    setup_logging(verbose)
    if not ws.handlers.is_dir():
        fail(f"no workspace at {ws.root}: run `rumi init` first (or pass --root)", EXIT_USAGE)
    run_async(lambda: run_broker(ws, embedded=embedded, port=port, workers=workers))


_verbose = [False]


def enable_verbose() -> None:
    """`rumi -v`: Rumi's debug logs for the rest of this process."""
    _verbose[0] = True
    setup_logging(True)


def verbose_enabled() -> bool:
    """Whether `rumi -v` was given."""
    return _verbose[0]
