"""`rumi check`: the broker's own decision, in-process, with the deciding rule and a verified fix.

The main test runs the demo's own tool (`ecosystem/default/main.py`, as `rumi demo` does) against a real
broker on a real nats-server, records every request it sends, and runs each one through `rumi check`:
the two must agree on every row of the demo table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from typer.testing import CliRunner

from broker.admin.demo import EXPECTED, grant_demo_network, start_local_service
from broker.cli import app
from broker.core.workspace import Workspace
from broker.policy.grants import Policy

from .conftest import REPO, running_broker, say

TOOL = "default:tool:my_tool"
runner = CliRunner()


def check(ws: Workspace, *args: str) -> tuple[int, dict[str, Any]]:
    """`rumi check ... --json` in-process: (exit code, the JSON verdict)."""
    done = runner.invoke(app, ["check", *args, "--root", str(ws.root), "--json"])
    assert done.exit_code in (0, 1), done.output
    return done.exit_code, json.loads(done.stdout)


def check_options(capability: str, args: dict[str, Any]) -> list[str]:
    """The `rumi check` options for a request's args (the inverse of the command's mapping)."""
    if capability in ("file_read", "file_write"):
        return ["--path", args["path"]]
    if capability == "env_read":
        return ["--key", args["key"]]
    if capability == "terminal":
        return ["--argv", shlex.join(args["argv"]), *(["--path", args["cwd"]] if "cwd" in args else [])]
    if capability == "network":
        assert args.get("method", "GET") == "GET" and args.get("op", "fetch") == "fetch", args
        return ["--url", args["url"]]
    raise AssertionError(f"the demo made a {capability} request this test does not map")


# ------------------------------------------------------------------------------ the demo table


class RecordingConnection:
    """A Pack's NATS connection that notes every request (capability, component, args, id) it sends,
    and, with `replies`, the reply's `data` by request id."""

    def __init__(
        self,
        nc: Any,
        sent: list[tuple[str, str, dict[str, Any], str]],
        replies: dict[str, Any] | None = None,
    ) -> None:
        self.nc = nc
        self.sent = sent
        self.replies = replies

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 0.5) -> Any:
        req = msgspec.msgpack.decode(payload)
        self.sent.append((subject.rsplit(".", 1)[1], req["component_id"], dict(req["args"]), req["id"]))
        msg = await self.nc.request(subject, payload, timeout=timeout)
        if self.replies is not None:
            self.replies[req["id"]] = msgspec.msgpack.decode(msg.data).get("data")
        return msg


def load_demo_tool(ws: Workspace) -> Any:
    """The demo Pack's code as `rumi init` wrote it into the workspace (what `rumi demo` runs)."""
    path = ws.pack_source("default") / "main.py"
    spec = importlib.util.spec_from_file_location("rumi_demo_pack_main", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def run_demo_tool(
    ws: Workspace,
    module: Any,
    url: str,
    sent: list[tuple[str, str, dict[str, Any], str]],
    replies: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The demo tool's one call, through a real broker; its `requests` row through the SDK's own proxy."""
    from broker.bus.creds import pack_identity
    from broker.bus.server import nats_url
    from pack_runtime import Context, Pack
    from pack_runtime._proxy import serve_proxy

    pack = Pack("default", nats_url=nats_url(ws), creds=str(pack_identity(ws, "default").seed_path))
    nc = await pack.connect()
    conn = RecordingConnection(nc, sent, replies)
    try:
        async with running_broker(ws), anyio.create_task_group() as tg:
            proxy_ctx = Context(conn, "default", "default:pack:_", 30)
            host, port = await tg.start(serve_proxy, proxy_ctx, "127.0.0.1:0")
            os.environ["HTTP_PROXY"] = os.environ["http_proxy"] = f"http://{host}:{port}"
            result = await module.my_tool(Context(conn, "default", TOOL, 30), {"url": url})
            tg.cancel_scope.cancel()
    finally:
        await nc.close()
    attempts: list[dict[str, Any]] = result["attempts"]
    return attempts


async def audit_events(ws: Workspace) -> list[dict[str, Any]]:
    from broker.audit.trail import read_events
    from broker.bus.server import connect

    nc = await connect(ws, "audit")
    try:
        return [e async for e in read_events(nc)]
    finally:
        await nc.close()


def docker_available() -> bool:
    from broker.core.docker_client import docker_client

    try:
        docker_client(10).ping()
    except Exception:
        return False
    return True


@pytest.fixture
def proxy_env(monkeypatch: pytest.MonkeyPatch, ws: Workspace) -> Iterator[None]:
    """The demo Pack's environment: its sandbox path; the proxy variables are set once it listens."""
    monkeypatch.setenv("RUMI_SANDBOX", str(ws.pack_work_area("default")))
    monkeypatch.setenv("RUMI_PACK_ID", "default")
    for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    yield
    for name in ("HTTP_PROXY", "http_proxy"):
        os.environ.pop(name, None)


def test_check_agrees_with_the_broker_on_every_demo_row(
    ws: Workspace, nats_server: object, proxy_env: None, pytestconfig: pytest.Config
) -> None:
    service = start_local_service()
    try:
        port = int(service.server_address[1])
        grant_demo_network(ws, port)  # as `rumi demo` grants it
        module = load_demo_tool(ws)
        sent: list[tuple[str, str, dict[str, Any], str]] = []
        replies: dict[str, Any] = {}
        attempts = anyio.run(run_demo_tool, ws, module, f"http://127.0.0.1:{port}/", sent, replies)
    finally:
        service.shutdown()
    time.sleep(0.3)  # outcome events follow their replies
    events = anyio.run(audit_events, ws)
    recorded = {e["request_id"] for e in events}

    # The demo's table, as the demo itself expects it.
    assert [a["attempt"] for a in attempts] == list(EXPECTED)
    engine = docker_available()
    for a in attempts:
        if a["capability"] != "terminal" or engine:  # `ls` runs in a sandbox container
            assert a["outcome"] == EXPECTED[a["attempt"]], a
    # A streamed fetch (the proxy's, for unmodified `requests`) is followed by `read`s of its body: the
    # handler's own `continuation` marks them; the broker checks the grant on each but audits only the
    # fetch that opened the stream. Every other request is one attempt of the demo.
    registry = Policy.for_workspace(ws).registry

    def continues(capability: str, args: dict[str, Any]) -> bool:
        plugin = registry.get(capability)
        return plugin is not None and plugin.continuation is not None and bool(plugin.continuation(args))

    decided = [s for s in sent if not continues(s[0], s[2])]
    continued = [s for s in sent if continues(s[0], s[2])]
    assert len(decided) == len(attempts), "each attempt of the demo makes exactly one audited request"
    opened = {
        replies[rid]["stream"]: component
        for capability, component, args, rid in decided
        if capability == "network" and args.get("stream") is True and replies.get(rid)
    }
    assert continued, "the proxy's streamed fetch was read back"
    for capability, component, args, request_id in continued:
        assert opened.get(args.get("stream")) == component, ("a read of no stream this Pack opened", args)
        assert request_id not in recorded, "a stream's read is not audited one by one"

    first_event: dict[str, dict[str, Any]] = {}
    for e in events:
        first_event.setdefault(e["request_id"], e)
    rows = []
    for attempt, (capability, component, args, request_id) in zip(attempts, decided, strict=True):
        assert attempt["capability"] == capability
        broker = first_event[request_id]  # the broker's decision (or, for a read, its one event)
        assert broker["component_id"] == component and broker["capability"] == capability
        code, verdict = check(ws, component, capability, *check_options(capability, args))
        file_name = Path(verdict["grant_file"]).name
        rows.append((attempt["attempt"], broker["decision"], verdict["decision"], verdict["rule"], file_name))
        assert verdict["decision"] == broker["decision"], (attempt, broker, verdict)
        assert code == (0 if broker["decision"] == "allow" else 1)
        assert verdict["target"] == broker["target"], "check names the target as the audit event does"
        # The file that decides: the tool's own; the proxy's `default:pack:_` has none, the demo's
        # Pack-wide grant `default:*` allows it.
        deciding = ws.grant_file(TOOL if component == TOOL else "default:*")
        assert (verdict["grant_file"], verdict["grant_file_exists"]) == (str(deciding), True), verdict
        if broker["decision"] == "deny":
            assert verdict["code"] == broker["code"] and verdict["reason"] == broker.get("message")
            # The Pack was told that same short reason, naming no granted or workspace path.
            assert attempt["detail"] == verdict["reason"] and str(ws.root) not in attempt["detail"]
    assert any(c == "default:pack:_" for _, c, _, _ in decided), "no demo row went through the proxy"
    # rumi check wrote nothing to the stream.
    assert len(anyio.run(audit_events, ws)) == len(events)
    width = max(len(r[0]) for r in rows)
    rule_width = max(len(r[3]) for r in rows)
    header = (
        "\ndemo row" + " " * (width - 8) + "  broker  check  " + "rule".ljust(rule_width) + "  grant file"
    )
    say(pytestconfig, header)
    for label, broker_decision, check_decision, rule, file_name in rows:
        say(
            pytestconfig,
            f"{label:<{width}}  {broker_decision:<6}  {check_decision:<5}  {rule:<{rule_width}}  {file_name}",
        )


# ------------------------------------------------------------------------------ rules and fixes


def test_each_refusal_names_its_rule_and_a_fix_that_rumi_grant_makes_work(ws: Workspace) -> None:
    sandbox = ws.pack_work_area("default")
    grant_demo_network(ws, 8080)
    denied = [
        (["file_read", "--path", "/etc/passwd"], "path_outside_directories", ["--dir", "/etc"]),
        (["env_read", "--key", "HOME"], "key_not_granted", ["--key", "HOME"]),
        (["terminal", "--argv", "sh -c id", "--path", str(sandbox)], "shell_not_granted", ["--shell"]),
        (
            ["network", "--url", "http://169.254.169.254/latest/meta-data/"],
            "address_not_granted",
            ["--domain", "169.254.169.254", "--port", "80"],
        ),
        (
            ["network", "--url", "https://api.example.com/v1"],
            "host_not_granted",
            ["--domain", "api.example.com"],
        ),
        (
            ["network", "--url", "http://127.0.0.1:9/"],
            "port_not_granted",
            ["--domain", "127.0.0.1", "--port", "9"],
        ),
    ]
    for args, rule, options in denied:
        code, verdict = check(ws, TOOL, *args)
        assert (code, verdict["decision"], verdict["rule"]) == (1, "deny", rule), verdict
        assert verdict["grant_file"] == str(ws.grant_file(TOOL))
        fix = verdict["fix"]
        assert fix["verified"] is True, fix
        argv = fix["argv"]
        assert argv[:4] == ["rumi", "grant", TOOL, args[0]] and argv[-2:] == ["--root", str(ws.root)]
        assert all(o in argv for o in options), (options, argv)
        # The suggestion is a real `rumi grant` command line: run it, and the same check now passes.
        done = runner.invoke(app, argv[1:])
        assert done.exit_code == 0, done.output
        code, verdict = check(ws, TOOL, *args)
        assert (code, verdict["decision"], verdict["rule"]) == (0, "allow", "allowed"), verdict


def test_allow_names_the_granted_directory_key_or_entry(ws: Workspace) -> None:
    sandbox = ws.pack_work_area("default")
    grant_demo_network(ws, 8080)
    cases = [
        (["file_write", "--path", f"{sandbox}/out/a.txt"], f"beneath the granted directory {sandbox}"),
        (["env_read", "--key", "RUMI_DEMO_GREETING"], "RUMI_DEMO_GREETING is listed in allowed_keys"),
        (["terminal", "--argv", "ls -la"], f"runs in the granted directory {sandbox}; ls is not a shell"),
        (["network", "--url", "http://127.0.0.1:8080/x"], "entry '127.0.0.1' and port 8080 by allowed_ports"),
    ]
    for args, words in cases:
        code, verdict = check(ws, TOOL, *args)
        assert (code, verdict["rule"], verdict["fix"]) == (0, "allowed", None), verdict
        assert words in verdict["detail"], verdict["detail"]


def test_refusals_before_the_handler_name_the_grant_file_rule(ws: Workspace) -> None:
    sandbox = ws.pack_work_area("default")
    # No grant file at all: the fix creates one, with the directory the request needs.
    code, verdict = check(ws, "default:tool:other", "file_read", "--path", f"{sandbox}/a.txt")
    assert (code, verdict["rule"]) == (1, "no_grant_file")
    assert verdict["fix"]["argv"][2:6] == ["default:tool:other", "file_read", "--dir", str(sandbox)]
    assert verdict["fix"]["verified"] is True
    # The file grants other things only.
    code, verdict = check(ws, TOOL, "network", "--url", "https://api.example.com/")
    assert (code, verdict["rule"]) == (1, "not_granted")
    assert "it grants: env_read, file_read, file_write, terminal" in verdict["detail"]
    assert verdict["fix"]["argv"][4:8] == ["--domain", "api.example.com", "--port", "443"]
    # An entry switched off.
    doc = json.loads(ws.grant_file(TOOL).read_text())
    doc["permissions"]["env_read"]["enabled"] = False
    ws.grant_file(TOOL).write_text(json.dumps(doc))
    code, verdict = check(ws, TOOL, "env_read", "--key", "RUMI_DEMO_GREETING")
    assert (code, verdict["rule"]) == (1, "disabled")
    assert verdict["fix"]["verified"] is True
    # An invalid file denies everything; only fixing the file helps.
    doc["permissions"]["file_read"]["directories"] = ["relative/dir"]
    ws.grant_file(TOOL).write_text(json.dumps(doc))
    code, verdict = check(ws, TOOL, "file_read", "--path", f"{sandbox}/a.txt")
    assert (code, verdict["rule"], verdict["fix"]["argv"]) == (1, "grant_file_invalid", None)
    assert "is invalid, so the component is denied everything" in verdict["detail"]
    assert "fix the grant file first" in verdict["fix"]["note"]
    # No scope installed: no grant helps.
    (ws.scopes / "env_read.json").unlink()
    code, verdict = check(ws, "default:tool:x", "env_read", "--key", "K")
    assert (code, verdict["rule"], verdict["fix"]["argv"]) == (1, "scope_missing", None)
    assert "env_read.json" in verdict["fix"]["note"]


def write_pack_wide(ws: Workspace, permissions: dict[str, Any]) -> Path:
    """The `default` Pack's Pack-wide grant file `default:*.json`, for every component of the Pack."""
    path = ws.grant_file("default:*")
    path.write_text(json.dumps({"component_id": "default:*", "permissions": permissions}))
    return path


def test_a_pack_wide_grant_decides_and_is_the_grant_file_named(ws: Workspace) -> None:
    own = ws.grant_file(TOOL)
    assert "network" not in json.loads(own.read_text())["permissions"]
    wide = write_pack_wide(
        ws,
        {
            "network": {"enabled": True, "allowed_domains": ["127.0.0.1"], "allowed_ports": [8080]},
            "env_read": {"enabled": True, "allowed_keys": ["HOME"]},
        },
    )
    # The tool has no network entry of its own: the Pack-wide one allows it, and check names that file.
    code, verdict = check(ws, TOOL, "network", "--url", "http://127.0.0.1:8080/x")
    assert (code, verdict["rule"]) == (0, "allowed"), verdict
    assert (verdict["grant_file"], verdict["grant_file_exists"]) == (str(wide), True)
    assert verdict["detail"].endswith(f"by allowed_ports ({wide})"), verdict["detail"]
    # The proxy's component has no grant file at all: the Pack-wide one is still the deciding file.
    code, verdict = check(ws, "default:pack:_", "network", "--url", "http://127.0.0.1:8080/x")
    assert (code, verdict["grant_file"], verdict["grant_file_exists"]) == (0, str(wide), True), verdict
    # The tool's own env_read entry replaces the Pack-wide one (never merged): its own file decides.
    code, verdict = check(ws, TOOL, "env_read", "--key", "HOME")
    assert (code, verdict["rule"], verdict["grant_file"]) == (1, "key_not_granted", str(own)), verdict

    # A refusal by the Pack-wide entry names it; the fix writes the tool's own entry and says that
    # it replaces the Pack-wide one; run, the tool's own file decides.
    code, verdict = check(ws, TOOL, "network", "--url", "http://127.0.0.1:9/")
    assert (code, verdict["rule"], verdict["grant_file"]) == (1, "port_not_granted", str(wide)), verdict
    assert "default:*.json" in verdict["detail"]
    fix = verdict["fix"]
    assert fix["verified"] is True and fix["argv"][:4] == ["rumi", "grant", TOOL, "network"], fix
    assert "replaces the Pack-wide default:* entry" in fix["note"]
    done = runner.invoke(app, fix["argv"][1:])
    assert done.exit_code == 0, done.output
    code, verdict = check(ws, TOOL, "network", "--url", "http://127.0.0.1:9/")
    assert (code, verdict["grant_file"]) == (0, str(own)), verdict

    # A disabled Pack-wide entry: the rule names that file.
    write_pack_wide(ws, {"network": {"enabled": False}})
    code, verdict = check(ws, "default:pack:_", "network", "--url", "http://127.0.0.1:8080/")
    assert (code, verdict["rule"], verdict["grant_file"]) == (1, "disabled", str(wide)), verdict
    assert "default:*.json is not" in verdict["detail"]

    # No entry in either file: the component's own (absent) file, and what the Pack-wide one grants.
    code, verdict = check(ws, "default:pack:_", "env_read", "--key", "HOME")
    assert (code, verdict["rule"]) == (1, "no_grant_file"), verdict
    assert (verdict["grant_file"], verdict["grant_file_exists"]) == (
        str(ws.grant_file("default:pack:_")),
        False,
    )
    assert "nor has the Pack-wide" in verdict["detail"] and "(it grants: network)" in verdict["detail"]

    # An invalid Pack-wide file denies every component of the Pack: that file is named, and the fix too.
    write_pack_wide(ws, {"file_read": {"enabled": True, "directories": ["relative/dir"]}})
    code, verdict = check(ws, TOOL, "env_read", "--key", "RUMI_DEMO_GREETING")
    assert (code, verdict["rule"], verdict["grant_file"]) == (1, "grant_file_invalid", str(wide)), verdict
    assert "every component of the Pack is denied everything" in verdict["detail"]
    assert verdict["fix"]["argv"] is None and "rumi revoke 'default:*'" in verdict["fix"]["note"]


def test_no_grant_can_reach_protected_state_and_the_fix_says_so(ws: Workspace) -> None:
    sandbox = ws.pack_work_area("default")
    code, verdict = check(ws, TOOL, "file_read", "--path", f"{sandbox}/../../.rumi/creds/broker.nk")
    assert (code, verdict["rule"]) == (1, "path_escapes")
    assert verdict["fix"]["argv"] is None
    assert "protected workspace path" in verdict["fix"]["note"] and str(ws.state) in verdict["fix"]["note"]
    code, verdict = check(ws, TOOL, "file_write", "--path", str(ws.grants / "x.json"))
    assert (code, verdict["rule"], verdict["fix"]["argv"]) == (1, "path_outside_directories", None)
    assert "protected workspace path" in verdict["fix"]["note"]
    # Another Pack's sandbox is never grantable either.
    other = ws.pack_work_area("other")
    code, verdict = check(ws, TOOL, "file_read", "--path", f"{other}/secret.txt")
    assert verdict["fix"]["argv"] is None and "another Pack's sandbox" in verdict["fix"]["note"]


def test_text_output_names_rule_grant_file_and_fix(ws: Workspace) -> None:
    done = runner.invoke(app, ["check", TOOL, "file_read", "--path", "/etc/passwd", "--root", str(ws.root)])
    assert done.exit_code == 1
    lines = done.stdout.splitlines()
    assert lines[0] == f"deny: {TOOL} file_read /etc/passwd"
    text = done.stdout
    assert "rule:       path_outside_directories: /etc/passwd is outside the granted directories" in text
    assert "reason:     path is outside the granted directories (permission_denied" in text
    assert f"grant file: {ws.grant_file(TOOL)}\n" in text  # absolute: the workspace is not below the cwd
    assert f"fix:        rumi grant {TOOL} file_read --dir /etc --root {ws.root}" in text


# ------------------------------------------------------------------------------ no side effect


CUSTOM_HANDLER = """
import msgspec
from pathlib import Path

class Args(msgspec.Struct, forbid_unknown_fields=True):
    path: str

META = {"requires_scope": False, "supports_modes": ["sandbox"], "description": "marks", "args_schema": Args,
        "target": "path"}

def authorize(grant, args):
    pass

def execute(context, args):
    Path(args.path).write_text("the handler ran")
    return {"success": True, "data": None}
"""


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


def test_check_runs_no_handler_and_changes_nothing(ws: Workspace, tmp_path: Path) -> None:
    (ws.handlers / "marker.py").write_text(CUSTOM_HANDLER)
    doc = json.loads(ws.grant_file(TOOL).read_text())
    doc["permissions"]["marker"] = {"enabled": True}
    ws.grant_file(TOOL).write_text(json.dumps(doc))
    marker = tmp_path / "marker.txt"
    sandbox = ws.pack_work_area("default")
    before = _tree(ws.root)
    code, verdict = check(ws, TOOL, "marker", "--path", str(marker))
    assert (code, verdict["decision"]) == (0, "allow")
    assert "its authorize() accepted the arguments" in verdict["detail"]
    code, _ = check(ws, TOOL, "file_write", "--path", f"{sandbox}/new.txt")
    assert code == 0
    assert not marker.exists(), "rumi check ran the handler"
    assert not (sandbox / "new.txt").exists()
    assert _tree(ws.root) == before, "rumi check changed the workspace"


# ------------------------------------------------------------------------------ usage errors


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([TOOL, "no_such", "--path", "/x"], "unknown capability 'no_such' (installed: env_read, file_read"),
        ([TOOL, "network", "--key", "K"], "network takes no --key (it takes --url)"),
        ([TOOL, "env_read", "--path", "/x"], "env_read takes no --path (it takes --key)"),
        ([TOOL, "env_read"], "env_read needs --key to check a request"),
        ([TOOL, "terminal", "--argv", "'unclosed"], '--argv "\'unclosed" cannot be split into words'),
        (["not-a-component", "file_read", "--path", "/x"], "must look like '<pack_id>:<type>:<name>'"),
    ],
)
def test_a_check_that_makes_no_sense_is_one_line_and_exit_2(
    ws: Workspace, args: list[str], says: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", "check", *args, "--root", str(ws.root)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and says in done.stderr, done.stderr


def test_no_workspace_is_a_usage_error(tmp_path: Path) -> None:
    done = runner.invoke(app, ["check", TOOL, "file_read", "--path", "/x", "--root", str(tmp_path)])
    assert done.exit_code == 2
    assert "run `rumi init` first" in done.output


def test_an_ask_entry_is_allowed_and_says_an_operator_must_answer(ws: Workspace) -> None:
    grant = json.loads(ws.grant_file(TOOL).read_text())
    grant["permissions"]["env_read"].update({"mode": "ask", "ask_timeout": 7})
    ws.grant_file(TOOL).write_text(json.dumps(grant))
    code, verdict = check(ws, TOOL, "env_read", "--key", "RUMI_DEMO_GREETING")
    assert (code, verdict["rule"]) == (0, "allowed"), verdict
    assert any("this entry asks" in n and "after 7 s" in n for n in verdict["notes"]), verdict["notes"]
    # Without "mode": "ask" there is no such note.
    grant["permissions"]["env_read"].pop("mode")
    grant["permissions"]["env_read"].pop("ask_timeout")
    ws.grant_file(TOOL).write_text(json.dumps(grant))
    code, verdict = check(ws, TOOL, "env_read", "--key", "RUMI_DEMO_GREETING")
    assert code == 0 and not any("asks" in n for n in verdict["notes"]), verdict["notes"]
