"""Authoring commands: `rumi new PACK` (a Pack from the templates), `rumi tools PACK` (its tools and schemas)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from broker.cli.common import JsonOption, RootOption, fail, fail_error, print_json, run_async, workspace
from broker.core.errors import EXIT_USAGE, RumiError
from broker.core.ids import PACK_ID_RE

__all__ = ["new_cmd", "register", "tools_cmd"]

PackArg = Annotated[str, typer.Argument(help="Pack id: a lowercase letter, then [a-z0-9_-], at most 32.")]


def new_cmd(pack_id: PackArg, root: RootOption = None, as_json: JsonOption = False) -> None:
    """Create a Pack in ecosystem/PACK: pack.json, main.py with one tool, requirements.txt, test_main.py."""
    from broker.admin.scaffold import new_pack

    ws = workspace(root)
    try:
        files = new_pack(ws, pack_id)
    except RumiError as exc:
        fail_error(exc)
    if as_json:
        print_json(
            {"pack_id": pack_id, "directory": str(ws.pack_source(pack_id)), "files": [str(f) for f in files]}
        )
        return
    where = ws.pack_source(pack_id)
    typer.echo(f"Created {where}/ ({', '.join(f.name for f in files)}).")
    typer.echo("Next:")
    typer.echo(f"  pytest {where}                 # its tests: no NATS, no Docker")
    typer.echo(
        f"  rumi dev {pack_id}                        # run it locally (rumi broker in another terminal)"
    )
    typer.echo(f"  rumi tools {pack_id}                      # its tools and their argument schemas")
    typer.echo(f'  rumi call {pack_id}:tool:greet \'{{"name": "Ada"}}\'')


def tools_cmd(
    pack_id: PackArg,
    root: RootOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the Pack's answer.")] = 10.0,
    as_json: JsonOption = False,
) -> None:
    """List a running Pack's tools with the JSON Schema of their arguments (the Pack answers; nothing runs here)."""
    if not PACK_ID_RE.match(pack_id):
        fail(f"{pack_id[:40]!r} is not a valid pack id ({PACK_ID_RE.pattern})", EXIT_USAGE)
    from broker.admin.calls import list_tools
    from pack_runtime._errors import cap_message

    ws = workspace(root)
    listing = run_async(lambda: list_tools(ws, pack_id, timeout))
    tools: list[dict[str, Any]] = [
        {
            "component_id": t.component_id,
            "type": t.type,
            "name": t.name,
            "description": t.description,
            "args_schema": t.args_schema,
        }
        for t in listing.tools
    ]
    if as_json:
        print_json({"pack_id": listing.pack_id, "tools": tools})
        return
    if not tools:
        typer.echo(f"Pack {pack_id} has no tools.")
        return
    for tool in tools:
        # Text a Pack sent: no control character reaches the terminal (the schema is ASCII JSON).
        description = cap_message(tool["description"], 200)
        typer.echo(f"{tool['component_id']}" + (f"  {description}" if description else ""))
        schema = json.dumps(tool["args_schema"], indent=2, sort_keys=True)
        typer.echo("\n".join(f"    {line}" for line in schema.splitlines()))


def register(app: typer.Typer) -> None:
    """Add `new` and `tools` to the main app."""
    app.command("new")(new_cmd)
    app.command("tools")(tools_cmd)
