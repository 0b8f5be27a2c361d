"""Shared CLI bits: the --root option, one-line errors, running async work."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, NoReturn, TypeVar

import anyio
import typer

from broker.core.errors import RumiError
from broker.core.workspace import Workspace

T = TypeVar("T")

RootOption = Annotated[
    str | None,
    typer.Option("--root", envvar="RUMI_ROOT", help="Workspace root (default: current directory)."),
]


def workspace(root: str | None) -> Workspace:
    """The workspace at --root / RUMI_ROOT / the current directory."""
    return Workspace.at(root)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line to stderr and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    """Run async work from a command; RumiError becomes a one-line error."""
    try:
        return anyio.run(fn)
    except RumiError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        sys.exit(130)


def serve_broker(
    ws: Workspace, *, verbose: bool, embedded: bool | None = None, port: int | None = None, workers: int = 1
) -> None:
    """Run the broker in this process until SIGTERM (`rumi broker`, and `rumi up`'s detached broker)."""
    import logging

    from broker.service.broker import run_broker

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if not ws.handlers.is_dir():
        fail(f"no workspace at {ws.root}: run `rumi init` first (or pass --root)")
    run_async(lambda: run_broker(ws, embedded=embedded, port=port, workers=workers))
