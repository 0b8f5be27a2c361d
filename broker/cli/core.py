"""Core commands: init, broker, dev, call."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Annotated, Any

import msgspec
import typer

from broker.cli.common import RootOption, fail, run_async, serve_broker, workspace
from broker.core.errors import RumiError
from broker.core.ids import parse_component_id
from broker.core.manifest import load_manifest
from broker.core.workspace import Workspace


def register(app: typer.Typer) -> None:
    """Add the core commands to the main app."""

    @app.command("init")
    def init_cmd(
        root: RootOption = None,
        force: Annotated[
            bool, typer.Option("--force", help="Overwrite shipped files already present.")
        ] = False,
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

    @app.command("broker")
    def broker_cmd(
        root: RootOption = None,
        port: Annotated[
            int | None, typer.Option(help="Port of the embedded nats-server (default from config).")
        ] = None,
        verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every request.")] = False,
    ) -> None:
        """Run the broker in the foreground (starts the embedded nats-server when no nats_url is configured)."""
        serve_broker(workspace(root), verbose=verbose, port=port)

    @app.command("dev")
    def dev_cmd(
        pack_id: Annotated[str, typer.Argument(help="The Pack to run (a directory under ecosystem/).")],
        root: RootOption = None,
    ) -> None:
        """Run a Pack as a LOCAL PROCESS against the broker (for Pack authors). Nothing is isolated."""
        ws = workspace(root)
        try:
            manifest = load_manifest(ws, pack_id)
            env = dev_environment(ws, pack_id)
        except RumiError as exc:
            fail(str(exc))
        typer.secho(
            f"rumi dev: running Pack '{pack_id}' as a local process — NOTHING IS ISOLATED "
            "(no container, your user's full access). Use `rumi up` to run it confined.",
            fg=typer.colors.YELLOW,
            err=True,
            bold=True,
        )
        proc = subprocess.Popen([sys.executable, manifest.entrypoint], cwd=ws.pack_source(pack_id), env=env)

        def forward(signum: int, _frame: Any) -> None:
            proc.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        raise typer.Exit(proc.wait())

    @app.command("call")
    def call_cmd(
        component: Annotated[str, typer.Argument(help="Component id: <pack_id>:<type>:<name>.")],
        json_args: Annotated[str, typer.Argument(help="Arguments as a JSON object.")] = "{}",
        root: RootOption = None,
        timeout: Annotated[float, typer.Option(help="Seconds to wait for the Pack's answer.")] = 60.0,
    ) -> None:
        """Invoke a Pack's tool and print its JSON result; non-zero exit on error."""
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


def dev_environment(ws: Workspace, pack_id: str) -> dict[str, str]:
    """The same variables a Pack gets in its container, plus what a local Python needs."""
    from broker.bus.creds import pack_identity
    from broker.bus.server import nats_url, reload_running

    identity = pack_identity(ws, pack_id)
    if (ws.state / "docker.json").exists():
        # `rumi up` runs NATS in a container: its config (listen address, port) is the runtime's.
        from broker.containers.engine import DockerRuntime

        runtime = DockerRuntime(ws)
        if runtime.write_nats_config(ws.pack_ids()):
            runtime.reload_nats()
    else:
        reload_running(ws, ws.pack_ids())
    sandbox = ws.pack_sandbox(pack_id)
    sandbox.mkdir(parents=True, exist_ok=True)
    env = {
        "RUMI_PACK_ID": pack_id,
        "RUMI_NATS_URL": nats_url(ws),
        "RUMI_NATS_CREDS": str(identity.seed_path),
        "RUMI_SANDBOX": str(sandbox),
        "PYTHONUNBUFFERED": "1",
        **proxy_environment(f"127.0.0.1:{_free_port()}"),
    }
    for key in ("PATH", "LANG", "HOME", "VIRTUAL_ENV", "PYTHONPATH"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def proxy_environment(listen: str) -> dict[str, str]:
    """Variables that send unmodified HTTP clients through the SDK's proxy (and so the broker)."""
    url = f"http://{listen}"
    return {
        "RUMI_PROXY_LISTEN": listen,
        "HTTP_PROXY": url,
        "HTTPS_PROXY": url,
        "http_proxy": url,
        "https_proxy": url,
        "NO_PROXY": "",
        "no_proxy": "",
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def call_tool(
    ws: Workspace, pack_id: str, type_: str, name: str, args: dict[str, Any], timeout: float
) -> Any:
    """Send a CallRequest to a Pack's tool as the `cli` identity; return its data or raise RumiError."""
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from broker.bus.server import connect
    from broker.core.protocol import ENCODER, PROTOCOL_VERSION, REPLY_DECODER, CallRequest, call_subject
    from pack_runtime._context import new_request_id

    nc = await connect(ws, "cli", max_reconnect_attempts=0)
    try:
        request_id = new_request_id()
        payload = ENCODER.encode(CallRequest(v=PROTOCOL_VERSION, id=request_id, args=args))
        try:
            msg = await nc.request(call_subject(pack_id, type_, name), payload, timeout=timeout)
        except NoRespondersError:
            raise RumiError(
                f"Pack '{pack_id}' is not running: start it with `rumi dev {pack_id}` or `rumi up`"
            ) from None
        except NatsTimeout:
            raise RumiError(f"no answer from {pack_id}:{type_}:{name} within {timeout:g} s") from None
        try:
            reply = REPLY_DECODER.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            raise RumiError(f"malformed reply from the Pack: {exc}") from None
        if reply.id != request_id:
            raise RumiError("the Pack answered a different request")
        if not reply.success:
            err = reply.error
            raise RumiError(f"{err.code}: {err.message}" if err else "the tool failed")
        return reply.data
    finally:
        await nc.close()
