"""`rumi demo`: the example Pack end to end, and a table of what the broker allowed and denied."""

from __future__ import annotations

import http.server
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import IO, Any

import anyio

from broker.core.errors import RumiError
from broker.core.workspace import Workspace

TOOL = ("default", "tool", "my_tool")
SERVICE_BODY = b"hello from a granted local service\n"
# What each attempt of the example tool should come to (the demo fails when one does not).
EXPECTED = {
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
INDENT = "        "


class Demo:
    """One run of the demo, step by step: `prepare`, `start`, `call`, and always `stop` at the end.

    Progress lines go to `echo`, warnings to `warn`; failures raise RumiError.
    """

    def __init__(
        self,
        root: str | None,
        *,
        local: bool,
        prefix: str,
        echo: Callable[[str], None],
        warn: Callable[[str], None],
    ) -> None:
        self.ws = Workspace.at(root or tempfile.mkdtemp(prefix="rumi-demo-"))
        self.local = local
        self.prefix = prefix
        self.echo = echo
        self.warn = warn
        self.children: list[_Child] = []
        self.stop_hint = ""
        self.service: http.server.ThreadingHTTPServer | None = None
        self.port = 0

    def prepare(self) -> None:
        """Steps 1-2: the workspace (as `rumi init` makes it) and a granted local HTTP service."""
        from broker.admin.init import init_workspace

        self.echo(f"[1/6] workspace {self.ws.root} (rumi init)")
        init_workspace(self.ws)
        self.service = start_local_service()
        self.port = int(self.service.server_address[1])
        self.echo(f"[2/6] a local HTTP service on 127.0.0.1:{self.port}, granted with:")
        for line in grant_demo_network(self.ws, self.port):
            self.echo(f"{INDENT}{line}")

    def start(self) -> None:
        """Steps 3-4: NATS, the broker and the `default` Pack (local processes, or containers)."""
        self.stop_hint = self._start_local() if self.local else self._start_containers()

    def call(self) -> list[str]:
        """Steps 5-6: call the tool, show each attempt with its audit event, verify the hash chain.

        Returns what went differently from the demo's design (empty when everything matched).
        """
        from broker.audit.trail import verify_events

        self.echo("[5/6] rumi call default:tool:my_tool")
        result = anyio.run(_call_when_ready, self.ws, {"url": f"http://127.0.0.1:{self.port}/"}, 60.0)
        attempts = result["attempts"]
        time.sleep(0.3)
        events = anyio.run(_events, self.ws)  # the whole stream: the chain runs through every Pack
        shown = [e for e in events if e.get("pack_id") == "default"]
        self.echo("[6/6] what the Pack tried, what the broker decided, and the audit event of each:\n")
        sources = grant_sources(self.ws, shown)
        for line in table_lines(attempts, match_events(attempts, shown, sources)):
            self.echo(line)
        report = verify_events(events)
        self.echo(
            f"\naudit: {len(events)} events, hash chain {'verified' if report.ok else 'BROKEN: ' + str(report)}"
            f"  (more: rumi audit tail --root {self.ws.root})"
        )
        problems = expected_outcomes(attempts)
        if problems or not report.ok:
            return problems or ["audit chain broken"]
        return []

    def stop(self, *, keep: bool) -> None:
        """Stop what the demo started (or, with `keep`, say how to); always stop the local service."""
        if keep:
            self.echo(f"\nLeft running. Stop with: {self.stop_hint}")
        else:
            self.echo(f"\nStopping (in your own runs: {self.stop_hint})")
            if not self.local:
                self._stop_containers()
            for child in reversed(self.children):
                child.stop()
        if self.service is not None:
            self.service.shutdown()

    def _start_local(self) -> str:
        from broker.core.net import free_port

        port = free_port()
        rumi = [sys.executable, "-m", "broker.cli"]
        self.echo(f"[3/6] the broker with an embedded nats-server on 127.0.0.1:{port}")
        broker = _Child([*rumi, "broker", "--root", str(self.ws.root), "--port", str(port)], "the broker")
        self.children.append(broker)
        broker.wait_for("serving", 30)
        self._ensure_sandbox_image()
        self.echo("[4/6] the `default` Pack as a LOCAL PROCESS (rumi dev: nothing is isolated)")
        self.children.append(
            _Child([*rumi, "dev", "default", "--root", str(self.ws.root)], "the default Pack")
        )
        return "Ctrl-C in the terminals of `rumi broker` and `rumi dev`"

    def _ensure_sandbox_image(self) -> None:
        """The terminal capability runs commands in the sandbox image, also when the Pack runs locally."""
        from broker.containers.images import build_sandbox_image, image_tag
        from broker.core.docker_client import docker_client

        try:
            client = docker_client()
            client.ping()
        except Exception:
            self.echo(f"{INDENT}no Docker engine: the terminal rows will fail (run scripts/ensure-docker.sh)")
            return
        try:
            scope = json.loads((self.ws.scopes / "terminal.json").read_text())
            image = str(scope["default_config"]["image"])
        except (OSError, ValueError, KeyError, TypeError):
            return  # a broken scope is reported by the broker itself
        prefix = image.rsplit("-sandbox:", 1)[0] if image.endswith("-sandbox:latest") else None
        if prefix is None or image != image_tag("sandbox", prefix):
            return  # a custom sandbox image: the admin builds it
        self.echo(
            f"{INDENT}sandbox image for the terminal capability: {image} (built offline, reused when built)"
        )
        build_sandbox_image(client, prefix, progress=lambda m: self.echo(f"{INDENT}{m}"))

    def _start_containers(self) -> str:
        from broker.containers.engine import DockerRuntime
        from broker.core.net import free_port

        cfg = json.loads(self.ws.config_file.read_text())
        cfg["nats_port"] = free_port()  # never collide with a NATS already on 4222
        self.ws.config_file.write_text(json.dumps(cfg, indent=2) + "\n")
        self.echo(
            "[3/6] rumi build + rumi up: images (offline, reused when built), NATS, broker, Pack container"
        )
        runtime = DockerRuntime(self.ws, prefix=self.prefix, progress=lambda m: self.echo(f"{INDENT}{m}"))
        report = runtime.up(["default"], build=True)
        for start in report.packs:
            self.echo(f"[4/6] {start.container} healthy after {start.seconds_to_healthy:.1f} s")
        return f"rumi down --root {self.ws.root}"

    def _stop_containers(self) -> None:
        from broker.containers.engine import DockerRuntime

        try:
            DockerRuntime(self.ws, prefix=self.prefix).down()
        except RumiError as exc:
            self.warn(f"warning: rumi down failed: {exc}")


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


def grant_demo_network(ws: Workspace, port: int) -> list[str]:
    """Grant the local service (an IP-literal grant: the only way to reach loopback) to the tool, and
    Pack-wide (`default:*`) for every other component: unmodified libraries go through the proxy as
    `default:pack:_`, which has no grant file of its own. The tool's own entry replaces the Pack-wide one."""
    commands = []
    for component in ("default:tool:my_tool", "default:*"):
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
        shown = f"'{component}'" if "*" in component else component  # quoted for the shell
        commands.append(f"rumi grant {shown} network --domain 127.0.0.1 --port {port}")
    return commands


async def _call_when_ready(ws: Workspace, args: dict[str, Any], timeout: float) -> Any:
    from broker.admin.calls import call_tool

    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call_tool(ws, *TOOL, args, timeout=60)
        except RumiError as exc:
            if "not running" not in str(exc) or time.monotonic() > deadline:
                raise
            await anyio.sleep(0.2)


async def _events(ws: Workspace) -> list[dict[str, Any]]:
    """Every stored event, of every Pack and the broker's own checkpoints (`_broker`): a broker's hash
    chain runs through all of them, so only the whole stream verifies (one Pack's events alone show
    a gap wherever a checkpoint was written between them). Filter to one Pack only to show it."""
    from broker.audit.trail import read_events
    from broker.bus.server import connect

    nc = await connect(ws, "audit", max_reconnect_attempts=0)
    try:
        return [e async for e in read_events(nc, follow=False, pack=None, decision=None)]
    finally:
        await nc.close()


def grant_sources(ws: Workspace, events: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(component, capability) of each allowed event → the grant file the broker's policy allows it
    through now (the component id, or `<pack_id>:*` for a Pack-wide grant)."""
    from broker.policy.grants import Policy

    policy = Policy.for_workspace(ws)
    found: dict[tuple[str, str], str] = {}
    for e in events:
        key = (str(e.get("component_id", "")), str(e.get("capability", "")))
        if e.get("decision") != "allow" or key in found or not key[0]:
            continue
        try:
            found[key] = policy.decide(str(e.get("pack_id", "")), *key).source
        except RumiError:
            continue  # revoked since: nothing to show
    return found


def match_events(
    attempts: list[dict[str, Any]],
    events: list[dict[str, Any]],
    sources: dict[tuple[str, str], str] | None = None,
) -> list[str]:
    """Pair each attempt with its audit event(s), grouped by request (the tool makes one after another).

    A request's first event is its decision (or, for a read, the one `complete` event); an outcome
    may be stored after the next request's decision, so events are grouped by request id, not by order.
    A request made by another component than the tool names it, and, from `sources` (`grant_sources`),
    a Pack-wide grant it was allowed through: `(default:pack:_ via default:*)`.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        if e.get("phase") in ("decision", "complete", "outcome") and e["component_id"]:
            groups.setdefault(e["request_id"], []).append(e)
    ordered = [g for g in groups.values() if g[0].get("phase") in ("decision", "complete")]
    rows = []
    for i in range(len(attempts)):
        if i >= len(ordered):
            rows.append("(missing)")
            continue
        group = ordered[i]
        text = " → ".join(f"#{e['seq']} {e['decision']}/{e['code']}" for e in group)
        component, capability = group[0]["component_id"], group[0]["capability"]
        source = (sources or {}).get((component, capability), component)
        via = f" via {source}" if source != component and group[-1]["decision"] == "allow" else ""
        if component != "default:tool:my_tool" or via:
            text += f" ({component}{via})"
        rows.append(text)
    return rows


def table_lines(attempts: list[dict[str, Any]], audit: list[str]) -> list[str]:
    """The demo's table: one row per attempt, with the audit event(s) `match_events` paired with it."""
    header = ("attempt", "capability", "result", "code", "audit event")
    rows = [
        (a["attempt"], a["capability"], a["outcome"], a["code"], audit[i]) for i, a in enumerate(attempts)
    ]
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    return [
        "  ".join(str(v).ljust(widths[c]) for c, v in enumerate(r)).rstrip()
        for r in [header, tuple("-" * w for w in widths), *rows]
    ]


def expected_outcomes(attempts: list[dict[str, Any]]) -> list[str]:
    """What went differently from the demo's design (empty when everything matched)."""
    got = {a["attempt"]: a["outcome"] for a in attempts}
    return [f"{k}: expected {v}, got {got.get(k)}" for k, v in EXPECTED.items() if got.get(k) != v]
