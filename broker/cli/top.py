"""`rumi top` (a live view of the broker's metrics) and the `--metrics HOST:PORT` option of the broker commands."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated

import typer

from broker.cli.common import JsonOption, RootOption, fail, fail_error, print_json, workspace
from broker.core.errors import EXIT_FAILED, EXIT_USAGE, RumiError

if TYPE_CHECKING:
    from broker.core.workspace import Workspace
    from broker.service.metrics import Listen

# broker.service.metrics.LISTEN_ENV, spelt out so that registering the option imports nothing heavy.
LISTEN_ENV = "RUMI_METRICS_LISTEN"

MetricsOption = Annotated[
    str | None,
    typer.Option(
        "--metrics",
        envvar=LISTEN_ENV,
        metavar="HOST:PORT",
        help="Serve Prometheus metrics at http://HOST:PORT/metrics (worker i of --workers: PORT+i), or 'off'. "
        "Default: broker.metrics_listen of docker/config.json.",
    ),
]


def _resolve(
    ws: Workspace, value: str | None, *, workers: int, default: str | None
) -> tuple[Listen | None, bool]:
    """(address, explicit) from the option / RUMI_METRICS_LISTEN, else the config, else `default`."""
    from broker.service.metrics import configured_listen, parse_listen

    source = f"--metrics (or {LISTEN_ENV})"
    explicit = True
    if value is None:
        try:
            value = configured_listen(ws.load_config())
        except RumiError as exc:
            fail_error(exc)
        source = f"{ws.config_file}: broker.metrics_listen"
        if value is None:
            value, explicit = default, False
            if value is None:
                return None, False
    try:
        return parse_listen(value, workers=workers), explicit
    except ValueError as exc:
        fail(f"{source}: {exc}", EXIT_USAGE)


def use_metrics(ws: Workspace, value: str | None, *, workers: int, default: str | None = None) -> None:
    """Decide where the broker this command runs serves /metrics, and hand it over in RUMI_METRICS_LISTEN.

    A bad address exits 2. A port in use exits 4 when the address was asked for; the built-in default
    (`rumi up`'s 127.0.0.1:9464) is then skipped with a warning instead.
    """
    from broker.service.metrics import ports_in_use

    listen, explicit = _resolve(ws, value, workers=workers, default=default)
    if listen is not None:
        busy = ports_in_use(listen, workers)
        if busy and explicit:
            fail(
                f"cannot serve metrics on {busy[0]}: the address is in use; pass --metrics HOST:PORT with a free "
                "port (worker i uses PORT+i), or --metrics off",
                EXIT_FAILED,
            )
        if busy:
            typer.echo(f"warning: no metrics: {busy[0]} is in use (pass --metrics HOST:PORT)", err=True)
            listen = None
    os.environ[LISTEN_ENV] = str(listen) if listen is not None else "off"


def check_metrics(ws: Workspace, value: str | None, *, workers: int) -> None:
    """`rumi up --metrics`: check the address now (exit 2) and pass it to the broker `rumi up` starts."""
    if value is None:
        return
    listen, _ = _resolve(ws, value, workers=workers, default=None)
    os.environ[LISTEN_ENV] = str(listen) if listen is not None else "off"


def top_cmd(
    root: RootOption = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            "--metrics",
            envvar=LISTEN_ENV,
            metavar="HOST:PORT",
            help="The broker's metrics address (worker 0's; default: broker.metrics_listen, else 127.0.0.1:9464).",
        ),
    ] = None,
    interval: Annotated[
        float, typer.Option("--interval", min=0.2, max=60.0, help="Seconds between refreshes.")
    ] = 1.0,
    iterations: Annotated[
        int, typer.Option("--iterations", "-n", min=0, help="Stop after N refreshes (0: until Ctrl-C).")
    ] = 0,
    once: Annotated[bool, typer.Option("--once", help="One refresh, then exit (as --iterations 1).")] = False,
    as_json: JsonOption = False,
) -> None:
    """Live view of the broker: per Pack requests/s, denials/s, p50/p99 latency, in flight, rate-limited.

    Reads the broker's Prometheus metrics (every worker's); `--json` prints one snapshot taken over
    --interval seconds.
    """
    from broker.admin import top
    from broker.service.metrics import DEFAULT_LISTEN

    ws = workspace(root)
    listen, _ = _resolve(ws, metrics, workers=1, default=DEFAULT_LISTEN)
    if listen is None:
        fail("--metrics off: `rumi top` needs the broker's metrics address (HOST:PORT)", EXIT_USAGE)
    try:
        alarm = ws.load_config().audit_alarm_ratio
        if as_json:
            print_json(top.snapshot(listen, interval=interval, alarm_ratio=alarm))
            return
        top.run(listen, interval=interval, iterations=1 if once else iterations, alarm_ratio=alarm)
    except RumiError as exc:
        fail_error(exc)
    except KeyboardInterrupt:
        return


def register(app: typer.Typer) -> None:
    """Add `rumi top` to the main app."""
    app.command("top")(top_cmd)
