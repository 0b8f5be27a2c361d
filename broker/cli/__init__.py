"""`rumi`: the admin CLI. One module per command group, assembled here."""

from __future__ import annotations

import sys

import typer

from broker.core.errors import RumiError

app = typer.Typer(
    name="rumi",
    help="Rumi: run untrusted AI Packs in locked-down containers behind a permission broker.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
        sys.exit(2)
