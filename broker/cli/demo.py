"""`rumi demo`: images, NATS, the broker and the example Pack in containers; one tool call that tries
every capability; a table of what was allowed and denied, each with its audit event."""

from __future__ import annotations

import http.server
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Annotated, Any

import anyio
import typer

from broker.cli.common import fail
from broker.core.errors import RumiError
from broker.core.workspace import Workspace

TOOL = ("default", "tool", "my_tool")
SERVICE_BODY = b"hello from a granted local service\n"


class _Child:
    """A child process whose output is collected by a thread (so it never blocks on a full pipe)."""

    def __init__(self, argv: list[str], label: str) -> None:
        self.label = label
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        assert self.proc.stdout is not None
        threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True).start()

    def _pump(self, stream: IO[bytes]) -> None:
        for raw in stream:
            self.lines.append(raw.decode(errors="replace").rstrip())

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(needle in line for line in self.lines):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = "\n  ".join(self.lines[-15:])
        raise RumiError(f"{self.label} did not become ready; its output:\n  {tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class _Service(http.server.BaseHTTPRequestHandler):
    """The granted local service the Pack reaches through the broker."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(SERVICE_BODY)))
        self.end_headers()
        self.wfile.write(SERVICE_BODY)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def start_local_service() -> http.server.ThreadingHTTPServer:
    """An HTTP server on this machine's loopback only, on a free port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Service)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def grant_demo_network(ws: Workspace, port: int) -> list[str]:
    """Grant the local service (an IP-literal grant: the only way to reach loopback) to the tool and to
    the Pack's own component, which unmodified libraries use through the proxy."""
    commands = []
    for component in ("default:tool:my_tool", "default:pack:_"):
        path = ws.grant_file(component)
        doc = (
            json.loads(path.read_text()) if path.exists() else {"component_id": component, "permissions": {}}
        )
        doc["permissions"]["network"] = {
            "enabled": True,
            "allowed_domains": ["127.0.0.1"],
            "allowed_ports": [port],
        }
        path.write_text(json.dumps(doc, indent=2) + "\n")
        commands.append(f"rumi grant {component} network --domain 127.0.0.1 --port {port}")
    return commands


async def _call_when_ready(ws: Workspace, args: dict[str, Any], timeout: float) -> Any:
    from broker.cli.core import call_tool

    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call_tool(ws, *TOOL, args, timeout=60)
        except RumiError as exc:
            if "not running" not in str(exc) or time.monotonic() > deadline:
                raise
            await anyio.sleep(0.2)


async def _events(ws: Workspace) -> list[dict[str, Any]]:
    from broker.audit.trail import read_events
    from broker.bus.server import connect

    nc = await connect(ws, "audit", max_reconnect_attempts=0)
    try:
        return [e async for e in read_events(nc, follow=False, pack="default", decision=None)]
    finally:
        await nc.close()


def match_events(attempts: list[dict[str, Any]], events: list[dict[str, Any]]) -> list[str]:
    """Pair each attempt with its audit event(s): the tool makes its requests one after another."""
    decisions = [e for e in events if e.get("phase", "decision") == "decision" and e["component_id"]]
    outcomes = {e["request_id"]: e for e in events if e.get("phase") == "outcome"}
    rows = []
    for i in range(len(attempts)):
        if i >= len(decisions):
            rows.append("(missing)")
            continue
        d = decisions[i]
        text = f"#{d['seq']} {d['decision']}/{d['code']}"
        o = outcomes.get(d["request_id"])
        if o is not None:
            text += f" → #{o['seq']} {o['decision']}/{o['code']}"
        if d["component_id"] != "default:tool:my_tool":
            text += f" ({d['component_id']})"
        rows.append(text)
    return rows


def print_table(attempts: list[dict[str, Any]], audit: list[str]) -> None:
    header = ("attempt", "capability", "result", "code", "audit event")
    rows = [
        (a["attempt"], a["capability"], a["outcome"], a["code"], audit[i]) for i, a in enumerate(attempts)
    ]
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        typer.echo("  ".join(str(v).ljust(widths[c]) for c, v in enumerate(r)).rstrip())


def expected_outcomes(attempts: list[dict[str, Any]]) -> list[str]:
    """What went differently from the demo's design (empty when everything matched)."""
    want = {
        "write a file in its sandbox": "allowed",
        "read it back": "allowed",
        "read /etc/passwd": "denied",
        "escape with ../ to the broker's credentials": "denied",
        "read the granted key RUMI_DEMO_GREETING": "allowed",
        "read an ungranted key HOME": "denied",
        "run `ls` in its sandbox": "allowed",
        "run a shell (not granted)": "denied",
        "GET the granted local service (SDK)": "allowed",
        "GET it with unmodified `requests`": "allowed",
        "GET the cloud metadata address": "denied",
    }
    got = {a["attempt"]: a["outcome"] for a in attempts}
    return [f"{k}: expected {v}, got {got.get(k)}" for k, v in want.items() if got.get(k) != v]


def register(app: typer.Typer) -> None:
    """Add `rumi demo`."""

    @app.command("demo")
    def demo_cmd(
        root: Annotated[
            str | None, typer.Option("--root", help="Workspace to use (default: a new temporary one).")
        ] = None,
        local: Annotated[
            bool,
            typer.Option(
                "--local", help="Run the Pack as a local process instead (no Docker, NOT isolated)."
            ),
        ] = False,
        keep: Annotated[bool, typer.Option("--keep", help="Leave everything running at the end.")] = False,
        prefix: Annotated[
            str, typer.Option("--prefix", envvar="RUMI_IMAGE_PREFIX", help="Image name prefix.")
        ] = "rumi",
    ) -> None:
        """Build, start NATS, the broker and the `default` Pack; call its tool; show what was allowed and denied."""
        from broker.admin.init import init_workspace

        ws = Workspace.at(root or tempfile.mkdtemp(prefix="rumi-demo-"))
        typer.echo(f"[1/6] workspace {ws.root} (rumi init)")
        init_workspace(ws)
        service = start_local_service()
        port = service.server_address[1]
        typer.echo(f"[2/6] a local HTTP service on 127.0.0.1:{port}, granted with:")
        for line in grant_demo_network(ws, int(port)):
            typer.echo(f"        {line}")
        children: list[_Child] = []
        stop_hint = ""
        try:
            if local:
                stop_hint = _start_local(ws, children)
            else:
                stop_hint = _start_containers(ws, prefix)
            typer.echo("[5/6] rumi call default:tool:my_tool")
            result = anyio.run(_call_when_ready, ws, {"url": f"http://127.0.0.1:{port}/"}, 60.0)
            attempts = result["attempts"]
            time.sleep(0.3)
            events = anyio.run(_events, ws)
            typer.echo("[6/6] what the Pack tried, what the broker decided, and the audit event of each:\n")
            print_table(attempts, match_events(attempts, events))
            from broker.audit.trail import verify_events

            report = verify_events(events)
            typer.echo(
                f"\naudit: {len(events)} events, hash chain {'verified' if report.ok else 'BROKEN: ' + str(report)}"
                f"  (more: rumi audit tail --root {ws.root})"
            )
            problems = expected_outcomes(attempts)
            if problems or not report.ok:
                fail("the demo did not go as designed: " + "; ".join(problems or ["audit chain broken"]))
        except RumiError as exc:
            fail(str(exc))
        finally:
            if keep:
                typer.echo(f"\nLeft running. Stop with: {stop_hint}")
            else:
                typer.echo(f"\nStopping (in your own runs: {stop_hint})")
                if not local:
                    _stop_containers(ws, prefix)
                for child in reversed(children):
                    child.stop()
            service.shutdown()


def _start_local(ws: Workspace, children: list[_Child]) -> str:
    port = _free_port()
    rumi = [sys.executable, "-m", "broker.cli"]
    typer.echo(f"[3/6] the broker with an embedded nats-server on 127.0.0.1:{port}")
    broker = _Child([*rumi, "broker", "--root", str(ws.root), "--port", str(port)], "the broker")
    children.append(broker)
    broker.wait_for("serving", 30)
    _ensure_sandbox_image(ws)
    typer.echo("[4/6] the `default` Pack as a LOCAL PROCESS (rumi dev: nothing is isolated)")
    children.append(_Child([*rumi, "dev", "default", "--root", str(ws.root)], "the default Pack"))
    return "Ctrl-C in the terminals of `rumi broker` and `rumi dev`"


def _ensure_sandbox_image(ws: Workspace) -> None:
    """The terminal capability runs commands in the sandbox image, also when the Pack runs locally."""
    from broker.containers.engine import docker_client
    from broker.containers.images import build_sandbox_image, image_tag

    try:
        client = docker_client()
        client.ping()
    except Exception:
        typer.echo("        no Docker engine: the terminal rows will fail (run scripts/ensure-docker.sh)")
        return
    try:
        image = str(json.loads((ws.scopes / "terminal.json").read_text())["default_config"]["image"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # a broken scope is reported by the broker itself
    prefix = image.rsplit("-sandbox:", 1)[0] if image.endswith("-sandbox:latest") else None
    if prefix is None or image != image_tag("sandbox", prefix):
        return  # a custom sandbox image: the admin builds it
    typer.echo(f"        sandbox image for the terminal capability: {image} (built offline, reused when built)")
    build_sandbox_image(client, prefix, progress=lambda m: typer.echo(f"        {m}"))


def _start_containers(ws: Workspace, prefix: str) -> str:
    from broker.containers.engine import DockerRuntime

    cfg = json.loads(ws.config_file.read_text())
    cfg["nats_port"] = _free_port()  # never collide with a NATS already on 4222
    ws.config_file.write_text(json.dumps(cfg, indent=2) + "\n")
    typer.echo(
        "[3/6] rumi build + rumi up: images (offline, reused when built), NATS, broker, Pack container"
    )
    runtime = DockerRuntime(ws, prefix=prefix, progress=lambda m: typer.echo(f"        {m}"))
    report = runtime.up(["default"], build=True)
    for start in report.packs:
        typer.echo(f"[4/6] {start.container} healthy after {start.seconds_to_healthy:.1f} s")
    return f"rumi down --root {ws.root}"


def _stop_containers(ws: Workspace, prefix: str) -> None:
    from broker.containers.engine import DockerRuntime

    try:
        DockerRuntime(ws, prefix=prefix).down()
    except RumiError as exc:
        typer.echo(f"warning: rumi down failed: {exc}", err=True)
