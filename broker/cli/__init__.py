"""`rumi`: the admin CLI. One module per command group, assembled here.

Exit codes (docs/cli.md): 0 ok, 1 denied or a check failed, 2 usage error, 3 environment missing
(no engine, no NATS), 4 the broker or a tool failed; a RumiError carries its own (`exit_code`).
Importing this package stays cheap (no docker, nats, asyncio, audit or policy): see broker/cli/common.py.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from broker.cli.common import enable_verbose, verbose_enabled
from broker.core.errors import EXIT_FAILED, RumiError

# The name `pip` knows Rumi by (the command stays `rumi`; the PyPI name `rumi` is another project).
DISTRIBUTION = "rumi-broker"

app = typer.Typer(
    name="rumi",
    help="Rumi: run untrusted AI Packs in locked-down containers behind a permission broker.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def version() -> str:
    """The installed distribution's version."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown (run from a source tree: `pip install .` installs it)"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"rumi {version()}")
        raise typer.Exit()


@app.callback()
def _options(
    _version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Rumi's own debug logs (not the HTTP and NATS libraries')."),
    ] = False,
) -> None:
    if verbose:
        enable_verbose()


def _assemble() -> None:
    from broker.cli import core as _core

    _core.register(app)
    try:
        from broker.cli import grants as _grants
    except ImportError:  # pragma: no cover - during bootstrap only
        pass
    else:
        _grants.register(app)
    try:
        from broker.cli.audit import audit_app
    except ImportError:  # pragma: no cover
        pass
    else:
        app.add_typer(audit_app, name="audit", help="Read, verify and export the audit stream.")
    from broker.cli import build as _build
    from broker.cli import demo as _demo

    _build.register(app)
    _demo.register(app)
    __import__("broker.cli.systemd", fromlist=["register"]).register(app)
    __import__("broker.cli.top", fromlist=["register"]).register(app)
    __import__("broker.cli.author", fromlist=["register"]).register(app)
    __import__("broker.cli.approvals", fromlist=["register"]).register(app)
    __import__("broker.cli.check", fromlist=["register"]).register(app)
    __import__("broker.cli.review", fromlist=["register"]).register(app)
    try:
        from broker.cli import containers as _runtime
    except ImportError:  # pragma: no cover
        pass
    else:
        _runtime.register(app)


_assemble()


def main() -> None:
    """Entry point: no traceback ever reaches the user."""
    try:
        app()
    except RumiError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # a bug of ours: one line (the traceback with -v), never a secret-bearing dump
        if verbose_enabled():
            import traceback

            traceback.print_exc()
        typer.echo(f"error: unexpected {type(exc).__name__} (run with -v for the traceback)", err=True)
        sys.exit(EXIT_FAILED)
