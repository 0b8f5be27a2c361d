"""`rumi build` (images, no registry needed) and `rumi compose` (docker/docker-compose.yml)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from broker.cli.common import RootOption, fail, fail_error, workspace
from broker.core.errors import EXIT_FAILED, RumiError

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from broker.core.workspace import Workspace

PrefixOption = Annotated[
    str,
    typer.Option(
        "--prefix",
        envvar="RUMI_IMAGE_PREFIX",
        help="Image name prefix: images are <prefix>-nats, <prefix>-base, ...",
    ),
]
PacksArgument = Annotated[
    list[str] | None, typer.Argument(help="Packs (directories under ecosystem/); default: all of them.")
]


def build_cmd(
    packs: PacksArgument = None,
    root: RootOption = None,
    prefix: PrefixOption = "rumi",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show every docker build step.")] = False,
) -> None:
    """Build the NATS, Python base, base, sandbox and Pack images (works with no registry)."""
    from broker.admin.build import build_images

    ws = workspace(root)
    try:
        build_images(
            ws,
            packs,
            prefix=prefix,
            verbose=verbose,
            echo=typer.echo,
            warn=lambda m: typer.echo(m, err=True),
        )
    except RumiError as exc:
        fail_error(exc)


def compose_cmd(
    packs: PacksArgument = None,
    root: RootOption = None,
    prefix: PrefixOption = "rumi",
) -> None:
    """(Re)write docker/docker-compose.yml and the build contexts it points at."""
    target = write_compose_files(workspace(root), packs, prefix=prefix, echo=typer.echo)
    typer.echo(f"wrote {target}")
    compose = "docker-compose -f docker/docker-compose.yml"
    build = "rumi build" if prefix == "rumi" else f"rumi build --prefix {prefix}"
    typer.echo(f"next: `{build}` (once), `{compose} build`, `{compose} up -d`, then `rumi broker`")


def write_compose_files(
    ws: Workspace, packs: list[str] | None, *, prefix: str, echo: Callable[[str], None]
) -> Path:
    """write_compose with one-line errors (the base's libc comes from the engine when one answers)."""
    from broker.admin.build import error_line
    from broker.containers.compose import write_compose

    try:
        return write_compose(ws, packs or None, prefix=prefix, progress=lambda m: echo(f"  {m}"))
    except RumiError as exc:
        fail(error_line(exc), exc.exit_code)
    except (ValueError, OSError) as exc:
        fail(error_line(exc), EXIT_FAILED)


def register(app: typer.Typer) -> None:
    """Add `build` and `compose` to the main app."""
    app.command("build")(build_cmd)
    app.command("compose")(compose_cmd)
