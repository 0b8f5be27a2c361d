"""`rumi explain REQUEST_ID`: a request's audit events, read back from a real broker's stream, explained."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from typer.testing import CliRunner

from broker.cli import app
from broker.core.workspace import Workspace
from pack_runtime import BrokerError

from .conftest import REPO, running_broker
from .test_check import RecordingConnection

TOOL = "default:tool:my_tool"
SECRET = "hello from the broker's secrets file"
runner = CliRunner()

Sent = list[tuple[str, str, dict[str, Any], str]]
Calls = list[tuple[str, str, dict[str, Any]]]


async def send(ws: Workspace, calls: Calls) -> Sent:
    """Each (component, capability, args) as the `default` Pack, through a real broker; what was sent."""
    from broker.bus.creds import pack_identity
    from broker.bus.server import nats_url
    from pack_runtime import Context, Pack

    sent: Sent = []
    pack = Pack("default", nats_url=nats_url(ws), creds=str(pack_identity(ws, "default").seed_path))
    nc = await pack.connect()
    conn = RecordingConnection(nc, sent)
    try:
        async with running_broker(ws):
            for component, capability, args in calls:
                try:
                    await Context(conn, "default", component, 10).request(capability, args)
                except BrokerError:
                    pass
    finally:
        await nc.close()
    time.sleep(0.3)  # outcome events follow their replies
    return sent


def explain(ws: Workspace, request_id: str) -> tuple[int, dict[str, Any]]:
    done = runner.invoke(app, ["explain", request_id, "--root", str(ws.root), "--json"])
    assert done.exit_code == 0, done.output
    assert SECRET not in done.output
    return done.exit_code, json.loads(done.stdout)


def rumi(ws: Workspace, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args, "--root", str(ws.root)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def test_explain_a_denial_names_reason_rule_grant_file_and_fix(ws: Workspace, nats_server: object) -> None:
    sandbox = ws.pack_work_area("default")
    sent = anyio.run(send, ws, [(TOOL, "file_read", {"path": "/etc/passwd"})])
    request_id = sent[0][3]

    done = runner.invoke(app, ["explain", request_id, "--root", str(ws.root)])
    assert done.exit_code == 0, done.output
    lines = done.stdout.splitlines()
    assert lines[0] == f"request {request_id}: deny (permission_denied)"
    text = done.stdout
    assert "  reason:     path is outside the granted directories\n" in text
    assert (
        f"  rule:       path_outside_directories: /etc/passwd is outside the granted directories: {sandbox}"
        in text
    )
    assert "  capability: file_read\n" in text and "  target:     /etc/passwd\n" in text
    assert f"  component:  {TOOL} (pack default)\n" in text
    assert f"  grant file: {ws.grant_file(TOOL)} (unchanged since the request)\n" in text
    assert f"  fix:        rumi grant {TOOL} file_read --dir /etc --root {ws.root}\n" in text
    assert "  now:        denied with the current grants (path_outside_directories)" in text
    assert any(ln.startswith("  event:      #") and "decision deny/permission_denied" in ln for ln in lines)

    _, out = explain(ws, request_id)
    assert (out["decision"], out["code"], out["rule"]) == (
        "deny",
        "permission_denied",
        "path_outside_directories",
    )
    assert out["message"] == "path is outside the granted directories"
    assert out["component_id"] == TOOL and out["capability"] == "file_read" and out["target"] == "/etc/passwd"
    assert out["grant_file"] == str(ws.grant_file(TOOL)) and out["grants_changed_since"] is False
    assert out["fix"]["verified"] is True and out["fix"]["argv"][4:6] == ["--dir", "/etc"]
    assert [e["phase"] for e in out["events"]] == ["decision"]


def test_explain_allowed_requests_lists_every_phase(ws: Workspace, nats_server: object) -> None:
    sandbox = ws.pack_work_area("default")
    calls: Calls = [
        (TOOL, "file_write", {"path": f"{sandbox}/a.txt", "data": b"hi"}),
        (TOOL, "env_read", {"key": "RUMI_DEMO_GREETING"}),
        (TOOL, "file_read", {"path": f"{sandbox}/missing.txt"}),
    ]
    sent = anyio.run(send, ws, calls)
    write, read_key, read_missing = (s[3] for s in sent)

    _, out = explain(ws, write)
    assert (out["decision"], out["rule"], out["fix"]) == ("allow", "allowed", None)
    assert [(e["phase"], e["decision"]) for e in out["events"]] == [
        ("decision", "allow"),
        ("outcome", "allow"),
    ]
    assert f"beneath the granted directory {sandbox}" in out["detail"]

    _, out = explain(ws, read_key)
    assert (out["decision"], out["rule"]) == ("allow", "allowed")
    assert [e["phase"] for e in out["events"]] == ["complete"]
    assert out["detail"].startswith("key RUMI_DEMO_GREETING is listed in allowed_keys")

    # Allowed by policy; the handler failed when it ran: no grant helps.
    _, out = explain(ws, read_missing)
    assert (out["decision"], out["code"], out["rule"]) == ("error", "handler_error", "handler_failed")
    assert out["message"] == "no such file"


def test_explain_a_refusal_before_the_arguments_were_read(ws: Workspace, nats_server: object) -> None:
    sent = anyio.run(send, ws, [("default:tool:other", "file_read", {"path": "/etc/hostname"})])
    _, out = explain(ws, sent[0][3])
    assert (out["decision"], out["rule"], out["target"]) == ("deny", "no_grant", "")
    assert out["message"].startswith("no grant for file_read on component default:tool:other")
    assert out["now"]["rule"] == "no_grant_file"
    assert out["fix"]["argv"][:6] == ["rumi", "grant", "default:tool:other", "file_read", "--dir", "DIR"]
    assert out["fix"]["verified"] is False
    assert any("records no target" in n for n in out["notes"])


def test_explain_says_when_the_grants_changed_since(ws: Workspace, nats_server: object) -> None:
    sent = anyio.run(send, ws, [(TOOL, "env_read", {"key": "HOME"})])
    request_id = sent[0][3]
    _, out = explain(ws, request_id)
    assert (out["rule"], out["fix"]["argv"][4:6]) == ("key_not_granted", ["--key", "HOME"])
    time.sleep(0.01)
    granted = runner.invoke(app, ["grant", TOOL, "env_read", "--key", "HOME", "--root", str(ws.root)])
    assert granted.exit_code == 0, granted.output
    _, out = explain(ws, request_id)
    assert out["decision"] == "deny" and out["rule"] == "key_not_granted"  # what was decided then
    assert out["grants_changed_since"] is True and out["now"]["decision"] == "allow"
    assert out["fix"] == {
        "argv": None,
        "command": None,
        "verified": False,
        "note": "none needed now: the current grants allow it",
    }
    assert "it would be allowed now: the grant file changed since" in out["notes"]


def test_explain_names_the_pack_wide_grant_file_that_decided(ws: Workspace, nats_server: object) -> None:
    wide = ws.grant_file("default:*")
    doc = {
        "component_id": "default:*",
        "permissions": {"env_read": {"enabled": True, "allowed_keys": ["HOME"]}},
    }
    wide.write_text(json.dumps(doc))
    sent = anyio.run(send, ws, [("default:pack:_", "env_read", {"key": "HOME"})])
    _, out = explain(ws, sent[0][3])
    assert (out["decision"], out["rule"], out["component_id"]) == ("allow", "allowed", "default:pack:_")
    # The proxy's component has no grant file of its own: the Pack-wide one allowed it.
    assert (out["grant_file"], out["grants_changed_since"]) == (str(wide), False)
    assert out["detail"] == f"key HOME is listed in allowed_keys ({wide})"
    assert not any("there is no grant file now" in n for n in out["notes"])
    # A change to the Pack-wide file since the request counts as a change of the grants.
    time.sleep(0.01)
    doc["permissions"]["env_read"]["enabled"] = False
    wide.write_text(json.dumps(doc))
    _, out = explain(ws, sent[0][3])
    assert (out["grant_file"], out["grants_changed_since"]) == (str(wide), True)
    assert out["now"]["rule"] == "disabled"
    assert "it would be denied now: the grant file changed since" in out["notes"]


def test_a_refusal_folded_into_an_aggregate(ws: Workspace, nats_server: object) -> None:
    cfg = json.loads(ws.config_file.read_text())
    cfg["broker"]["refusals_per_second"] = 1
    ws.config_file.write_text(json.dumps(cfg))
    sent = anyio.run(send, ws, [(TOOL, "env_read", {"key": "HOME"})] * 20)
    from .test_check import audit_events

    events = anyio.run(audit_events, ws)
    aggregates = [e for e in events if "count" in e and "phase" not in e]
    assert aggregates, "no refusal was folded into an aggregate event"
    first = aggregates[0]
    _, out = explain(ws, first["request_id"])
    assert out["aggregate_count"] == first["count"] >= 2
    assert (out["decision"], out["code"]) == ("deny", "permission_denied")
    assert any("found only as the first refusal of an aggregate event" in n for n in out["notes"])
    # A folded refusal other than the first keeps no id of its own.
    recorded = {e["request_id"] for e in events}
    folded = next(s[3] for s in sent if s[3] not in recorded)
    done = rumi(ws, "explain", folded)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert f"request {folded} not found in the audit stream" in done.stderr
    assert "recorded only in an aggregate event that carries the first request's id" in done.stderr


def test_not_found_is_one_line_and_exit_1(ws: Workspace, nats_server: object) -> None:
    anyio.run(send, ws, [(TOOL, "env_read", {"key": "RUMI_DEMO_GREETING"})])
    done = rumi(ws, "explain", "no-such-request")
    assert done.returncode == 1 and done.stdout == ""
    # The request's event and the broker's closing checkpoint; no aggregate to mention.
    assert done.stderr == "error: request no-such-request not found in the audit stream (2 events read)\n"
    done = rumi(ws, "explain", "no-such-request", "--pack", "other")
    assert done.returncode == 1 and "(0 events of pack other read)" in done.stderr


def test_usage_errors_exit_2_and_no_nats_exits_3(ws: Workspace, tmp_path: Path) -> None:
    done = rumi(ws, "explain", "not an id")
    assert done.returncode == 2 and "is not one" in done.stderr and done.stderr.count("\n") == 1
    done = rumi(ws, "explain", "abc", "--pack", "Bad.Pack")
    assert done.returncode == 2 and "--pack 'Bad.Pack' is not a pack id" in done.stderr
    done = rumi(ws, "explain", "abc")  # no nats-server runs for this workspace
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith("error: no NATS server") and done.stderr.count("\n") == 1


def test_check_and_explain_take_json() -> None:
    for command in ("check", "explain"):
        done = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert done.exit_code == 0 and "--json" in done.stdout, command
