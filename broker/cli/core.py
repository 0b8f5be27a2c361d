"""Core commands: init, broker, dev, call."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from broker.cli.common import RootOption, fail, run_async, serve_broker, workspace
from broker.core.errors import RumiError
from broker.core.ids import parse_component_id


def init_cmd(
    root: RootOption = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite shipped files already present.")] = False,
) -> None:
    """Create the workspace layout with the built-in handlers, scopes, config and the example Pack."""
    from broker.admin.init import init_workspace

    ws = workspace(root)
    written = init_workspace(ws, overwrite=force, progress=lambda m: typer.echo(f"  {m}"))
    typer.echo(f"Workspace ready at {ws.root} ({len(written)} files written).")
    typer.echo(
        "Next: `rumi broker` in one terminal, `rumi dev default` in another, then "
        "`rumi call default:tool:my_tool`."
    )


def broker_cmd(
    root: RootOption = None,
    port: Annotated[
        int | None, typer.Option(help="Port of the embedded nats-server (default from config).")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every request.")] = False,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            max=64,
            help="Broker processes; each serves its own share of the Packs, with its own audit chain.",
        ),
    ] = 1,
) -> None:
    """Run the broker in the foreground (starts the embedded nats-server when no nats_url is configured)."""
    serve_broker(workspace(root), verbose=verbose, port=port, workers=workers)


def dev_cmd(
    pack_id: Annotated[str, typer.Argument(help="The Pack to run (a directory under ecosystem/).")],
    root: RootOption = None,
) -> None:
    """Run a Pack as a LOCAL PROCESS against the broker (for Pack authors). Nothing is isolated."""
    from broker.admin.dev import prepare_local_pack, run_local_pack

    ws = workspace(root)
    try:
        pack = prepare_local_pack(ws, pack_id)
    except RumiError as exc:
        fail(str(exc))
    typer.secho(
        f"rumi dev: running Pack '{pack_id}' as a local process — NOTHING IS ISOLATED "
        "(no container, your user's full access). Use `rumi up` to run it confined.",
        fg=typer.colors.YELLOW,
        err=True,
        bold=True,
    )
    raise typer.Exit(run_local_pack(pack))


def call_cmd(
    component: Annotated[str, typer.Argument(help="Component id: <pack_id>:<type>:<name>.")],
    json_args: Annotated[str, typer.Argument(help="Arguments as a JSON object.")] = "{}",
    root: RootOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the Pack's answer.")] = 60.0,
) -> None:
    """Invoke a Pack's tool and print its JSON result; non-zero exit on error."""
    import msgspec

    from broker.admin.calls import call_tool

    try:
        pack_id, type_, name = parse_component_id(component)
    except ValueError as exc:
        fail(str(exc))
    try:
        args = json.loads(json_args)
    except json.JSONDecodeError as exc:
        fail(f"JSON_ARGS is not valid JSON ({exc.msg} at position {exc.pos}); example: '{{\"x\": 1}}'")
    if not isinstance(args, dict):
        fail("JSON_ARGS must be a JSON object, e.g. '{\"x\": 1}'")
    ws = workspace(root)
    data = run_async(lambda: call_tool(ws, pack_id, type_, name, args, timeout))
    typer.echo(msgspec.json.format(msgspec.json.encode(data), indent=2).decode())


def register(app: typer.Typer) -> None:
    """Add the core commands to the main app."""
    app.command("init")(init_cmd)
    app.command("broker")(broker_cmd)
    app.command("dev")(dev_cmd)
    app.command("call")(call_cmd)
