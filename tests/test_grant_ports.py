"""Network grants: entries with their own ports, `rumi grant` never widening through the cross product,
wide CIDRs needing `allow_wide_networks`, tunnels off port 443 needing `plaintext_tunnel` — all through
the shipped network handler, the grant loader and the CLI."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from broker.cli.grants import register
from broker.core.errors import Denied, ScopeError
from broker.core.workspace import Workspace
from broker.policy.grants import Policy, load_scope_source

COMPONENT = "default:pack:_"
runner = CliRunner()


def cli(ws: Workspace, *args: str) -> tuple[int, str, str]:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    result = runner.invoke(app, [*args, "--root", str(ws.root)])
    assert "Traceback" not in result.output
    return result.exit_code, result.stdout, result.stderr


def network_entry(ws: Workspace, component: str = COMPONENT) -> dict[str, Any]:
    entry: dict[str, Any] = json.loads(ws.grant_file(component).read_text())["permissions"]["network"]
    return entry


def write_network(ws: Workspace, entry: dict[str, Any], component: str = COMPONENT) -> None:
    doc = {"component_id": component, "permissions": {"network": {"enabled": True, **entry}}}
    ws.grant_file(component).write_text(json.dumps(doc))


def allowed(policy: Policy, args: dict[str, Any], component: str = COMPONENT) -> bool:
    """The broker's own decision and the handler's `authorize`, as run before the decision event."""
    try:
        decision = policy.decide(component.split(":")[0], component, "network")
        plugin = decision.plugin
        assert plugin.authorize is not None
        plugin.authorize(decision.grant, plugin.convert_args(args))
    except Denied:
        return False
    return True


def fetch(host: str, port: int) -> dict[str, Any]:
    return {"method": "GET", "url": f"https://{host}:{port}/"}


def tunnel(host: str, port: int) -> dict[str, Any]:
    return {"op": "open", "host": host, "port": port}


# --- entries with their own ports -----------------------------------------------------------------


def test_entries_with_ports_grant_exactly_those_pairs(ws: Workspace) -> None:
    write_network(
        ws,
        {
            "allowed_domains": ["api.openai.com:443", "10.0.0.5:8080", "[fd00::5]:8443", "docs.example.com"],
            "allowed_ports": [443],
        },
    )
    policy = Policy.for_workspace(ws)
    assert policy.errors == []
    assert allowed(policy, fetch("api.openai.com", 443))
    assert not allowed(policy, fetch("api.openai.com", 8080))
    assert allowed(policy, fetch("10.0.0.5", 8080))
    assert not allowed(policy, fetch("10.0.0.5", 443))  # allowed_ports does not apply to a ported entry
    assert allowed(policy, fetch("[fd00::5]", 8443))
    assert not allowed(policy, fetch("[fd00::5]", 443))
    assert allowed(policy, fetch("docs.example.com", 443))  # no port: the seed's meaning
    assert not allowed(policy, fetch("docs.example.com", 8080))


# --- `rumi grant` does not widen --------------------------------------------------------------------


def test_rumi_grant_writes_host_port_entries_instead_of_widening(ws: Workspace) -> None:
    code, _, _ = cli(ws, "grant", COMPONENT, "network", "--domain", "api.example.com", "--port", "443")
    assert code == 0
    code, out, _ = cli(ws, "grant", COMPONENT, "network", "--domain", "127.0.0.1", "--port", "8080")
    assert code == 0
    entry = network_entry(ws)
    assert entry["allowed_domains"] == ["api.example.com", "127.0.0.1:8080"]
    assert entry["allowed_ports"] == [443]
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1
    assert "wrote 127.0.0.1:8080 as host:port entries" in notes[0]
    assert "api.example.com:8080" in notes[0] and "127.0.0.1:443" in notes[0]
    policy = Policy.for_workspace(ws)
    assert allowed(policy, fetch("api.example.com", 443)) and allowed(policy, fetch("127.0.0.1", 8080))
    assert not allowed(policy, fetch("api.example.com", 8080))
    assert not allowed(policy, fetch("127.0.0.1", 443))
    # IPv6 literals get brackets; --json carries the notice.
    code, out, _ = cli(ws, "grant", COMPONENT, "network", "--domain", "fd00::7", "--port", "9000", "--json")
    assert code == 0 and "[fd00::7]:9000" in json.loads(out)["notice"]
    assert network_entry(ws)["allowed_domains"][-1] == "[fd00::7]:9000"


@pytest.mark.parametrize(
    ("first", "then", "domains", "ports"),
    [
        # A port alone widens every host without a port: that is what was asked.
        (["--domain", "a.test", "--port", "443"], ["--port", "8443"], ["a.test"], [443, 8443]),
        # A host alone takes the ports there are.
        (["--domain", "a.test", "--port", "443"], ["--domain", "b.test"], ["a.test", "b.test"], [443]),
        # The same ports again: nothing new is granted to anyone.
        (
            ["--domain", "a.test", "--port", "443"],
            ["--domain", "b.test", "--port", "443"],
            ["a.test", "b.test"],
            [443],
        ),
        # Only ported entries so far: the new host and port cannot widen them.
        (["--domain", "a.test:443"], ["--domain", "b.test", "--port", "80"], ["a.test:443", "b.test"], [80]),
    ],
)
def test_rumi_grant_merges_lists_when_nothing_widens(
    ws: Workspace, first: list[str], then: list[str], domains: list[str], ports: list[int]
) -> None:
    assert cli(ws, "grant", COMPONENT, "network", *first)[0] == 0
    code, out, _ = cli(ws, "grant", COMPONENT, "network", *then)
    assert code == 0 and "note:" not in out
    entry = network_entry(ws)
    assert (entry["allowed_domains"], entry.get("allowed_ports", [])) == (domains, ports)


# --- wide networks ----------------------------------------------------------------------------------

WIDE = [
    ("0.0.0.0/0", "wider than /8"),
    ("::/0", "wider than /16"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "metadata"),
    ("fe80::/64", "link-local"),
    ("10.0.0.0/8", "Docker address pool 10.213.0.0/16"),
    ("10.213.7.0/24:80", "Docker address pool 10.213.0.0/16"),
    ("[::ffff:10.213.0.0/112]:80", "Docker address pool 10.213.0.0/16"),
]


@pytest.mark.parametrize(("cidr", "why"), WIDE)
def test_a_wide_cidr_in_a_grant_file_is_refused_at_load(ws: Workspace, cidr: str, why: str) -> None:
    write_network(ws, {"allowed_domains": ["api.example.com", cidr], "allowed_ports": [443]})
    policy = Policy.for_workspace(ws)
    errors = [str(e) for e in policy.errors]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert why in errors[0] and '"allow_wide_networks": true' in errors[0]
    assert f"{COMPONENT}.json" in errors[0] and "$.permissions.network" in errors[0]
    with pytest.raises(Denied, match="grant file is invalid"):
        policy.decide("default", COMPONENT, "network")
    write_network(
        ws,
        {"allowed_domains": ["api.example.com", cidr], "allowed_ports": [443], "allow_wide_networks": True},
    )
    policy = Policy.for_workspace(ws)
    assert policy.errors == []
    assert policy.decide("default", COMPONENT, "network").grant["allow_wide_networks"] is True


def test_rumi_grant_refuses_a_wide_cidr_and_says_how_to_allow_it(ws: Workspace) -> None:
    code, out, err = cli(ws, "grant", COMPONENT, "network", "--domain", "0.0.0.0/0", "--port", "443")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "wider than /8" in err and "--allow-wide-networks" in err
    assert not ws.grant_file(COMPONENT).exists()  # nothing written
    code, _, _ = cli(
        ws, "grant", COMPONENT, "network", "--domain", "0.0.0.0/0", "--port", "443", "--allow-wide-networks"
    )
    assert code == 0 and network_entry(ws)["allow_wide_networks"] is True
    policy = Policy.for_workspace(ws)
    # The flag is the admin's explicit word: the CIDR then reaches everything it covers, loopback too.
    assert allowed(policy, fetch("1.1.1.1", 443)) and allowed(policy, fetch("127.0.0.1", 443))


def test_the_pool_is_read_from_the_workspace_config_and_rechecked_when_it_changes(ws: Workspace) -> None:
    write_network(ws, {"allowed_domains": ["10.60.0.0/16"], "allowed_ports": [443]})
    policy = Policy.for_workspace(ws)
    assert policy.errors == []
    config = json.loads(ws.config_file.read_text()) if ws.config_file.exists() else {}
    ws.config_file.write_text(json.dumps({**config, "network_pool": "10.60.0.0/20"}))
    stamp = time.time() + 5  # a new mtime even on a coarse clock
    os.utime(ws.config_file, (stamp, stamp))
    assert policy.refresh()
    errors = [str(e) for e in policy.errors]
    assert len(errors) == 1 and "Docker address pool 10.60.0.0/20" in errors[0]


def test_grant_only_keys_cannot_come_from_a_scope(ws: Workspace) -> None:
    for key in ("allow_wide_networks", "plaintext_tunnel"):
        doc = {"version": "1.0", "description": "net", "default_config": {key: True}}
        with pytest.raises(ScopeError, match=f"`{key}` may only be set in a grant"):
            load_scope_source(ws.scopes / "network.json", json.dumps(doc).encode())


# --- plaintext tunnels ------------------------------------------------------------------------------


def test_a_tunnel_off_port_443_needs_plaintext_tunnel_and_authorize_says_so(ws: Workspace) -> None:
    assert (
        cli(
            ws,
            "grant",
            COMPONENT,
            "network",
            "--domain",
            "api.example.com",
            "--port",
            "443",
            "--port",
            "8080",
        )[0]
        == 0
    )
    policy = Policy.for_workspace(ws)
    assert allowed(policy, tunnel("api.example.com", 443))
    assert allowed(policy, fetch("api.example.com", 8080))  # a fetch: the broker writes Host
    decision = policy.decide("default", COMPONENT, "network")
    with pytest.raises(Denied, match='"plaintext_tunnel": true'):
        decision.plugin.authorize(
            decision.grant, decision.plugin.convert_args(tunnel("api.example.com", 8080))
        )
    assert cli(ws, "grant", COMPONENT, "network", "--plaintext-tunnel")[0] == 0
    assert network_entry(ws)["plaintext_tunnel"] is True
    policy = Policy.for_workspace(ws)
    assert allowed(policy, tunnel("api.example.com", 8080))
    assert not allowed(policy, tunnel("api.example.com", 9090))  # the flag grants no port
