"""`rumi demo`: images, NATS, the broker and the example Pack in containers; one tool call that tries
every capability; a table of what was allowed and denied, each with its audit event."""

from __future__ import annotations

from typing import Annotated

import typer

from broker.cli.common import fail, fail_error
from broker.core.errors import RumiError


def demo_cmd(
    root: Annotated[
        str | None, typer.Option("--root", help="Workspace to use (default: a new temporary one).")
    ] = None,
    local: Annotated[
        bool,
        typer.Option("--local", help="Run the Pack as a local process instead (no Docker, NOT isolated)."),
    ] = False,
    keep: Annotated[bool, typer.Option("--keep", help="Leave everything running at the end.")] = False,
    prefix: Annotated[
        str, typer.Option("--prefix", envvar="RUMI_IMAGE_PREFIX", help="Image name prefix.")
    ] = "rumi",
) -> None:
    """Build, start NATS, the broker and the `default` Pack; call its tool; show what was allowed and denied."""
    from broker.admin.demo import Demo

    demo = Demo(root, local=local, prefix=prefix, echo=typer.echo, warn=lambda m: typer.echo(m, err=True))
    demo.prepare()
    try:
        demo.start()
        problems = demo.call()
        if problems:
            fail("the demo did not go as designed: " + "; ".join(problems))
    except RumiError as exc:
        fail_error(exc)
    finally:
        demo.stop(keep=keep)


def register(app: typer.Typer) -> None:
    """Add `rumi demo`."""
    app.command("demo")(demo_cmd)
