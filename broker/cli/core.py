"""Core commands: init, broker, dev, call."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from broker.cli.common import (
    JsonOption,
    RootOption,
    fail,
    fail_error,
    print_json,
    run_async,
    serve_broker,
    workspace,
)
from broker.cli.top import MetricsOption, use_metrics
from broker.core.errors import EXIT_USAGE, RumiError
from broker.core.ids import parse_component_id


def init_cmd(
    root: RootOption = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite shipped files already present.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Create the workspace layout with the built-in handlers, scopes, config and the example Pack."""
    from broker.admin.init import init_workspace

    ws = workspace(root)
    try:
        written = init_workspace(ws, overwrite=force, progress=lambda m: typer.echo(f"  {m}", err=as_json))
    except RumiError as exc:
        fail_error(exc)
    if as_json:
        print_json({"root": str(ws.root), "written": [str(p) for p in written]})
        return
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
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Rumi's own debug logs (every request).")
    ] = False,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            max=64,
            help="Broker processes; each serves its own share of the Packs, with its own audit chain.",
        ),
    ] = 1,
    metrics: MetricsOption = None,
) -> None:
    """Run the broker in the foreground (starts the embedded nats-server when no nats_url is configured)."""
    ws = workspace(root)
    use_metrics(ws, metrics, workers=workers)
    serve_broker(ws, verbose=verbose, port=port, workers=workers)


def dev_cmd(
    pack_id: Annotated[str, typer.Argument(help="The Pack to run (a directory under ecosystem/).")],
    root: RootOption = None,
    reload: Annotated[
        bool,
        typer.Option(
            "--reload",
            help="Watch the Pack's *.py files: an edit that compiles is served on the next call; "
            "one with a syntax error is reported and the running version keeps serving.",
        ),
    ] = False,
    no_env: Annotated[
        bool,
        typer.Option(
            "--no-env",
            help="Run the Pack with Rumi's own interpreter instead of its cached environment "
            "(its requirements.txt is then not installed).",
        ),
    ] = False,
) -> None:
    """Run a Pack as a LOCAL PROCESS against the broker (for Pack authors). Nothing is isolated.

    It runs in a cached environment of its own (docker/.rumi/dev-envs/): its requirements.txt installed from wheels only.
    """
    from broker.admin.dev import prepare_local_pack, run_local_pack

    def progress(line: str) -> None:
        typer.echo(line, err=True)

    ws = workspace(root)
    try:
        pack = prepare_local_pack(ws, pack_id, own_env=not no_env, progress=progress)
    except RumiError as exc:
        fail_error(exc)
    typer.secho(
        f"rumi dev: running Pack '{pack_id}' as a local process — NOTHING IS ISOLATED "
        "(no container, your user's full access). Use `rumi up` to run it confined.",
        fg=typer.colors.YELLOW,
        err=True,
        bold=True,
    )
    raise typer.Exit(run_local_pack(pack, reload=reload, progress=progress))


def call_cmd(
    component: Annotated[str, typer.Argument(help="Component id: <pack_id>:<type>:<name>.")],
    json_args: Annotated[str, typer.Argument(help="Arguments as a JSON object.")] = "{}",
    root: RootOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the Pack's answer.")] = 60.0,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="Print each item the tool yields as it comes (one JSON line on stdout) and each "
            "progress update as a `progress:` line on stderr; --timeout is then the longest silence.",
        ),
    ] = False,
) -> None:
    """Invoke a Pack's tool and print its JSON result; non-zero exit on error."""
    import msgspec

    from broker.admin.calls import call_tool, progress_text, stream_tool

    try:
        pack_id, type_, name = parse_component_id(component)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    try:
        args = json.loads(json_args)
    except json.JSONDecodeError as exc:
        fail(
            f"JSON_ARGS is not valid JSON ({exc.msg} at position {exc.pos}); example: '{{\"x\": 1}}'",
            EXIT_USAGE,
        )
    if not isinstance(args, dict):
        fail("JSON_ARGS must be a JSON object, e.g. '{\"x\": 1}'", EXIT_USAGE)
    ws = workspace(root)
    if stream:

        def show(kind: str, item: object) -> None:
            if kind == "item":
                try:
                    typer.echo(msgspec.json.encode(item).decode())
                except (TypeError, ValueError, OverflowError):
                    typer.echo("error: the tool sent an item with no JSON form (skipped)", err=True)
            else:
                typer.echo(f"progress: {progress_text(item)}", err=True)

        run_async(lambda: stream_tool(ws, pack_id, type_, name, args, timeout, show))
        return
    data = run_async(lambda: call_tool(ws, pack_id, type_, name, args, timeout))
    typer.echo(msgspec.json.format(msgspec.json.encode(data), indent=2).decode())


def register(app: typer.Typer) -> None:
    """Add the core commands to the main app."""
    app.command("init")(init_cmd)
    app.command("broker")(broker_cmd)
    app.command("dev")(dev_cmd)
    app.command("call")(call_cmd)
