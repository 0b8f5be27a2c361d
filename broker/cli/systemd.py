"""`rumi systemd-unit`: write the systemd unit that runs `rumi broker` for this workspace."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from broker.cli.common import JsonOption, RootOption, fail_error, print_json, workspace
from broker.core.errors import RumiError

SYSTEM_UNITS = Path("/etc/systemd/system")


def systemd_unit_cmd(
    root: RootOption = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write the unit here (a file ending in .service, or a directory: rumi-broker.service in it). "
            "Default: print it.",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", min=1, max=64, help="Broker processes (default: one per core, as `rumi up`)."
        ),
    ] = None,
    rumi: Annotated[
        Path | None,
        typer.Option("--rumi", help="Absolute path of the `rumi` to run (default: this installation's)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Write a systemd unit that runs the broker for this workspace (restarted on failure, hardened)."""
    from broker.admin.systemd import broker_unit, write_unit

    ws = workspace(root)
    try:
        unit = broker_unit(ws, workers=workers, rumi=rumi)
        path = write_unit(unit, output) if output is not None else None
    except RumiError as exc:
        fail_error(exc)  # a usage error: the message names the option to change
    if as_json:
        report = {"path": str(path) if path else None, "exec_start": unit.exec_start, "unit": unit.text}
        print_json(report)
    elif path is None:
        typer.echo(unit.text, nl=False)
    else:
        typer.echo(f"wrote {path}")
        enable = f"systemctl daemon-reload && systemctl enable --now {path.name}"
        if path.parent == SYSTEM_UNITS:
            typer.echo(f"next: {enable}")
        else:
            typer.echo(f"next: install it as {SYSTEM_UNITS / path.name}, then `{enable}`")


def register(app: typer.Typer) -> None:
    """Add `systemd-unit` to the main app."""
    app.command("systemd-unit")(systemd_unit_cmd)
