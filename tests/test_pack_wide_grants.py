"""Pack-wide grants: `docker/grants/<pack_id>:*.json` applies to every component of that Pack, the
proxy's `<pack_id>:pack:_` included; a component's own entry for a capability replaces it (never merged).

Decisions come from the broker's own Policy on a workspace made by `rumi init`, `rumi grants` from the
real CLI app, and one test sends real requests through a real broker on a real nats-server.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.core.errors import Denied
from broker.core.ids import is_pack_wide, pack_wide_id, parse_component_id
from broker.core.workspace import Workspace
from broker.policy.grants import Policy, effective_grants
from pack_runtime import PermissionDenied

from .conftest import connected_pack, running_broker

TOOL = "default:tool:my_tool"
PROXY = "default:pack:_"
WIDE = "default:*"
runner = CliRunner()


def write_grant(ws: Workspace, target: str, permissions: dict[str, Any]) -> None:
    ws.grant_file(target).write_text(json.dumps({"component_id": target, "permissions": permissions}))


def keys(policy: Policy, component: str) -> tuple[str, list[str]]:
    """The env_read decision of `component`: (the grant file it comes from, its keys)."""
    decision = policy.decide(component.partition(":")[0], component, "env_read")
    return decision.source, decision.grant["allowed_keys"]


IDS = [
    # (text, pack-wide accepted, parsed with pack_wide=True)
    ("default:*", True, ("default", "*", "*")),
    ("a-b:*", True, ("a-b", "*", "*")),
    ("default:tool:my_tool", False, ("default", "tool", "my_tool")),
    ("default:pack:_", False, ("default", "pack", "_")),
    ("*", False, None),
    ("default:**", False, None),
    ("default:*:x", False, None),
    ("Default:*", False, None),
    (":*", False, None),
    ("default:tool:*", False, None),
]


@pytest.mark.parametrize(("text", "wide", "parsed"), IDS)
def test_component_id_parsing_knows_the_pack_wide_form(text: str, wide: bool, parsed: Any) -> None:
    assert is_pack_wide(text) is wide
    if parsed is None:
        with pytest.raises(ValueError, match=r"must look like|must match"):
            parse_component_id(text, pack_wide=True)
    else:
        assert parse_component_id(text, pack_wide=True) == parsed
    if wide:  # a request names one component: the Pack-wide form is not one
        with pytest.raises(ValueError, match="must look like '<pack_id>:<type>:<name>'"):
            parse_component_id(text)
    assert pack_wide_id("default") == WIDE


def test_a_pack_wide_grant_covers_every_component_and_an_own_entry_replaces_it(ws: Workspace) -> None:
    write_grant(ws, WIDE, {"env_read": {"enabled": True, "allowed_keys": ["SHARED"]},
                           "file_read": {"enabled": True, "directories": [str(ws.pack_work_area("default"))]}})  # fmt: skip
    policy = Policy.for_workspace(ws)
    assert policy.errors == []
    # The proxy's component and a tool without a file of its own get the Pack-wide entry.
    assert keys(policy, PROXY) == (WIDE, ["SHARED"])
    assert keys(policy, "default:tool:new") == (WIDE, ["SHARED"])
    # The example tool's own env_read entry replaces it: its keys only, never merged with SHARED.
    assert keys(policy, TOOL) == (TOOL, ["RUMI_DEMO_GREETING"])
    # A capability the tool's own file does not name still comes from the Pack-wide file.
    assert policy.decide("default", TOOL, "file_read").source == TOOL  # it names file_read itself
    write_grant(ws, "default:tool:files", {"env_read": {"enabled": True, "allowed_keys": ["MINE"]}})
    policy.refresh()
    assert policy.decide("default", "default:tool:files", "file_read").source == WIDE
    # Another Pack is not covered.
    with pytest.raises(Denied, match="no grant for env_read on component other:pack:_"):
        policy.decide("other", "other:pack:_", "env_read")
    # An own entry switched off replaces the Pack-wide one too: denied.
    write_grant(ws, "default:tool:off", {"env_read": {"enabled": False, "allowed_keys": ["SHARED"]}})
    policy.refresh()
    with pytest.raises(Denied, match="no grant for env_read on component default:tool:off"):
        policy.decide("default", "default:tool:off", "env_read")
    # The GrantStore's entry lookup resolves the same way.
    assert policy.grants.entry(PROXY, "env_read") == {"enabled": True, "allowed_keys": ["SHARED"]}
    assert policy.grants.entry("default:tool:off", "env_read") is None


def test_a_request_cannot_name_the_pack_wide_target(ws: Workspace) -> None:
    write_grant(ws, WIDE, {"env_read": {"enabled": True, "allowed_keys": ["SHARED"]}})
    policy = Policy.for_workspace(ws)
    with pytest.raises(Denied, match="must look like '<pack_id>:<type>:<name>'"):
        policy.decide("default", WIDE, "env_read")
    # And another Pack's account cannot use this Pack's Pack-wide grant.
    with pytest.raises(Denied, match="does not belong to pack 'other'"):
        policy.decide("other", PROXY, "env_read")


def test_invalid_files_fail_closed(ws: Workspace) -> None:
    write_grant(ws, WIDE, {"env_read": {"enabled": True, "allowed_keys": ["SHARED"]}})
    write_grant(ws, "other:*", {"env_read": {"enabled": True, "allowed_keys": ["OTHER"]}})
    write_grant(ws, "default:tool:broken", {"env_read": {"enabled": "yes"}})
    policy = Policy.for_workspace(ws)
    # A component whose own file is invalid is denied everything, the Pack-wide entries included.
    with pytest.raises(Denied, match=r"its grant file is invalid"):
        policy.decide("default", "default:tool:broken", "env_read")
    assert keys(policy, PROXY) == (WIDE, ["SHARED"])
    # An invalid Pack-wide file denies every component of the Pack everything, own entries included.
    write_grant(ws, WIDE, {"env_read": {"enabled": True, "allowed_keys": "SHARED"}})
    policy.refresh()
    for component in (PROXY, TOOL):
        with pytest.raises(Denied, match=r"Pack-wide grant file is invalid: see `rumi grants default:\*`"):
            policy.decide("default", component, "env_read")
    assert keys(policy, "other:pack:_") == ("other:*", ["OTHER"])  # nothing else is affected
    assert [e for e in policy.errors if "default:*.json" in str(e)], policy.errors
    # A file named `<pack>:*.json` must say so inside.
    ws.grant_file(WIDE).write_text(json.dumps({"component_id": PROXY, "permissions": {}}))
    policy.refresh()
    assert any("does not match the file name" in str(e) for e in policy.errors)


def test_revocation_reaches_the_pack_wide_grant(ws: Workspace) -> None:
    policy = Policy.for_workspace(ws)
    with pytest.raises(Denied):
        policy.decide("default", PROXY, "env_read")
    write_grant(ws, WIDE, {"env_read": {"enabled": True, "allowed_keys": ["SHARED"]}})
    policy.refresh()
    assert keys(policy, PROXY) == (WIDE, ["SHARED"])
    ws.grant_file(WIDE).unlink()
    policy.refresh()
    with pytest.raises(Denied):
        policy.decide("default", PROXY, "env_read")


def test_effective_grants_name_their_source(ws: Workspace) -> None:
    write_grant(ws, WIDE, {"env_read": {"enabled": True, "allowed_keys": ["SHARED"]},
                           "network": {"enabled": True, "allowed_domains": ["api.example.com:443"]}})  # fmt: skip
    states = Policy.for_workspace(ws).grants.files()
    mine = {g.capability: g for g in effective_grants(states, TOOL)}
    assert (mine["env_read"].source, mine["env_read"].replaces) == (TOOL, WIDE)
    assert mine["network"].source == WIDE and mine["network"].written["allowed_domains"] == [
        "api.example.com:443"
    ]
    assert mine["file_read"].source == TOOL and mine["file_read"].replaces is None
    proxy = effective_grants(states, PROXY)
    assert [(g.capability, g.source) for g in proxy] == [("env_read", WIDE), ("network", WIDE)]


def test_rumi_grants_shows_each_components_effective_permissions(ws: Workspace) -> None:
    done = runner.invoke(app, ["grant", WIDE, "env_read", "--key", "SHARED", "--root", str(ws.root)])
    assert done.exit_code == 0, done.output
    assert ws.grant_file(WIDE).name == "default:*.json"
    done = runner.invoke(app, ["grants", "--root", str(ws.root)])
    assert done.exit_code == 0, done.output
    rows = [line.split()[:4] for line in done.stdout.splitlines()]
    assert rows[0] == ["COMPONENT", "PERMISSION", "STATUS", "FROM"]
    assert [WIDE, "env_read", "enabled", "own"] in rows
    assert [PROXY, "env_read", "enabled", WIDE] in rows  # the proxy's, with no file of its own
    assert [TOOL, "env_read", "enabled", "own,"] in rows  # "own, replaces default:*"
    assert "own, replaces default:*" in done.stdout
    done = runner.invoke(app, ["grants", PROXY, "--json", "--root", str(ws.root)])
    data = json.loads(done.stdout)
    assert data["grants"] == []  # no file of its own
    assert data["effective"] == [
        {"component_id": PROXY, "permission": "env_read", "enabled": True, "source": WIDE, "replaces": None,
         "settings": {"allowed_keys": ["SHARED"]}}
    ]  # fmt: skip
    # An invalid Pack-wide file: every component of the Pack shown denied.
    ws.grant_file(WIDE).write_text(json.dumps({"component_id": WIDE, "permissions": {"env_read": []}}))
    done = runner.invoke(app, ["grants", "--root", str(ws.root)])
    assert [PROXY, "-", "denied", WIDE] in [line.split()[:4] for line in done.stdout.splitlines()]
    assert "invalid (every component of the Pack denied)" in done.stdout


def _wait_for(policy_ws: Workspace, component: str) -> None:
    deadline = time.monotonic() + 5
    policy = Policy.for_workspace(policy_ws)
    while time.monotonic() < deadline:
        policy.refresh()
        try:
            policy.decide("default", component, "env_read")
            return
        except Denied:
            time.sleep(0.05)
    raise AssertionError("grant not loaded")


@pytest.mark.anyio
async def test_the_broker_allows_the_proxy_component_through_a_pack_wide_grant(
    ws: Workspace, nats_server: object
) -> None:
    secrets = ws.state / "secrets.env"
    secrets.write_text(secrets.read_text() + "SHARED=shared value\n")
    async with running_broker(ws), connected_pack(ws) as pack:
        outside = pack.context()  # requests outside a tool call, as the proxy makes them
        assert outside.component_id == PROXY
        with pytest.raises(PermissionDenied):
            await outside.env_read("SHARED")
        write_grant(ws, WIDE, {"env_read": {"enabled": True, "allowed_keys": ["SHARED"]}})
        await anyio.to_thread.run_sync(_wait_for, ws, PROXY)
        await anyio.sleep(0.5)  # the broker's own poll (0.2 s)
        assert await outside.env_read("SHARED") == "shared value"
        # The tool's own env_read entry replaces the Pack-wide one: SHARED stays denied to it.
        tool = pack.context(TOOL)
        with pytest.raises(PermissionDenied, match="key is not granted"):
            await tool.env_read("SHARED")
        assert await tool.env_read("RUMI_DEMO_GREETING") == "hello from the broker's secrets file"
        # Revoked: at once, without a restart.
        ws.grant_file(WIDE).unlink()
        await anyio.sleep(0.6)
        with pytest.raises(PermissionDenied, match="no grant for env_read on component default:pack:_"):
            await outside.env_read("SHARED")
    # The audit trail names the file that allowed each request: the Pack-wide one, not the component's.
    from .test_broker import audit_events

    events = [e for e in await audit_events(ws, 5) if e.get("phase") != "checkpoint"]
    allowed = [(e["component_id"], e.get("extra", {}).get("grant")) for e in events if e["decision"] == "allow"]
    assert allowed == [(PROXY, WIDE), (TOOL, None)], allowed


def test_the_grant_file_name_is_the_target(ws: Workspace) -> None:
    assert ws.grant_file(WIDE) == Path(ws.grants) / "default:*.json"


def test_a_pack_wide_file_is_checked_like_any_grant_file(ws: Workspace) -> None:
    own = str(ws.pack_work_area("default"))
    write_grant(ws, WIDE, {"file_read": {"enabled": True, "directories": [own]}})
    policy = Policy.for_workspace(ws)
    assert policy.errors == [] and policy.decide("default", PROXY, "file_read").grant["directories"] == [own]
    # Another Pack's work area, or the workspace's state, is refused: the whole file, so every component.
    for directory, why in (
        (str(ws.pack_work_area("other")), "another Pack's sandbox"),
        (str(ws.state), "is the protected workspace path"),
    ):
        write_grant(ws, WIDE, {"file_read": {"enabled": True, "directories": [directory]}})
        policy.refresh()
        assert any(why in str(e) and "default:*.json" in str(e) for e in policy.errors), policy.errors
        with pytest.raises(Denied):
            policy.decide("default", PROXY, "file_read")
