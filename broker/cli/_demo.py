"""`rumi demo`: a workspace, the broker, the example Pack, one tool call, the audit trail."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Annotated, Any

import anyio
import typer

from .._errors import RumiError
from .._workspace import Workspace
from ._common import fail

TOOL = ("default", "tool", "my_tool")


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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _call_when_ready(ws: Workspace, timeout: float) -> Any:
    from ._core import call_tool

    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call_tool(ws, *TOOL, {}, timeout=30)
        except RumiError as exc:
            if "not running" not in str(exc) or time.monotonic() > deadline:
                raise
            await anyio.sleep(0.2)


async def _events(ws: Workspace) -> list[dict[str, Any]]:
    from .._audit import read_events
    from .._natsserver import connect

    nc = await connect(ws, "audit", max_reconnect_attempts=0)
    try:
        return [e async for e in read_events(nc, follow=False, pack="default", decision=None)]
    finally:
        await nc.close()


def match_events(attempts: list[dict[str, Any]], events: list[dict[str, Any]]) -> list[str]:
    """Pair each attempt with its audit event(s); the tool makes its requests one after another."""
    decisions = [e for e in events if e.get("phase", "decision") == "decision" and e["component_id"]]
    outcomes = {e["request_id"]: e for e in events if e.get("phase") == "outcome"}
    rows = []
    for i, _ in enumerate(attempts):
        if i >= len(decisions):
            rows.append("(missing)")
            continue
        d = decisions[i]
        text = f"#{d['seq']} {d['decision']}/{d['code']}"
        o = outcomes.get(d["request_id"])
        if o is not None:
            text += f" → #{o['seq']} {o['decision']}/{o['code']}"
        rows.append(text)
    return rows


def print_table(attempts: list[dict[str, Any]], audit: list[str]) -> None:
    header = ("attempt", "capability", "result", "code", "audit event")
    rows = [
        (
            a["attempt"],
            a["capability"],
            "not installed" if a["code"] == "unknown_capability" else a["outcome"],
            a["code"],
            audit[i],
        )
        for i, a in enumerate(attempts)
    ]
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        typer.echo("  ".join(str(v).ljust(widths[c]) for c, v in enumerate(r)).rstrip())


def register(app: typer.Typer) -> None:
    """Add `rumi demo`."""

    @app.command("demo")
    def demo_cmd(
        root: Annotated[
            str | None, typer.Option("--root", help="Workspace to use (default: a new temporary one).")
        ] = None,
        local: Annotated[
            bool, typer.Option("--local", help="Run the Pack as a local process (no Docker).")
        ] = True,
        keep: Annotated[
            bool, typer.Option("--keep", help="Leave the broker and Pack running at the end.")
        ] = False,
    ) -> None:
        """Start NATS, the broker and the `default` Pack; call its tool; show allowed and denied attempts with their audit events."""
        from .._init import init_workspace

        ws = Workspace.at(root or tempfile.mkdtemp(prefix="rumi-demo-"))
        typer.echo(f"[1/5] workspace {ws.root}")
        init_workspace(ws)
        port = _free_port()
        rumi = [sys.executable, "-m", "broker.cli"]
        children: list[_Child] = []
        try:
            typer.echo(f"[2/5] starting the broker and the embedded nats-server on 127.0.0.1:{port}")
            broker = _Child([*rumi, "broker", "--root", str(ws.root), "--port", str(port)], "the broker")
            children.append(broker)
            broker.wait_for("serving", 30)
            typer.echo(
                "[3/5] starting the `default` Pack (local process: NOT isolated; containers come with `rumi up`)"
            )
            children.append(_Child([*rumi, "dev", "default", "--root", str(ws.root)], "the default Pack"))
            typer.echo("[4/5] rumi call default:tool:my_tool")
            result = anyio.run(_call_when_ready, ws, 30.0)
            attempts = result["attempts"]
            time.sleep(0.2)
            events = anyio.run(_events, ws)
            typer.echo("[5/5] what the Pack tried, what the broker decided, and the audit event of each:\n")
            print_table(attempts, match_events(attempts, events))
            from .._audit import verify_events

            report = verify_events(events)
            typer.echo(
                f"\naudit chain: {'verified' if report.ok else 'BROKEN: ' + str(report)} "
                f"({len(events)} events)"
            )
            if keep:
                typer.echo(f"\nLeft running. Stop with: kill {' '.join(str(c.proc.pid) for c in children)}")
                children.clear()
            else:
                typer.echo(
                    "\nStopping the Pack and the broker (in your own runs: Ctrl-C in their terminals, "
                    "or `rumi down` for containers)."
                )
        except RumiError as exc:
            fail(str(exc))
        finally:
            for child in reversed(children):
                child.stop()
