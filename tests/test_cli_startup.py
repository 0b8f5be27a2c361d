"""`rumi grants` starts without the HTTP client, asyncio, pydantic or the Docker SDK (issue 10, bench/cli.py).

`rumi grants` loads every handler file to check each grant as the broker does. The handler files reach
the back-ends through `broker.handler_api`, which imports `egress`, `tunnels` and `sandbox` on first
use; `broker.backends.egress` imports httpx, httpcore, ssl and asyncio (and `broker.backends.pinned`,
the transport) only inside the functions that send a request. These tests run the real command under
`python -X importtime` and read which modules it loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from broker.admin.init import init_workspace
from broker.core.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
TOOL = "default:tool:my_tool"  # the example component `rumi init` grants
# What sending a request needs, and what nothing in `rumi grants` should pay for.
HTTP_STACK = ("httpx", "httpcore", "h11", "certifi", "broker.backends.pinned")
# pydantic: typer 0.29 imports it to coerce every command parameter (60-90 ms); pyproject.toml keeps
# typer below 0.29 for that reason, and this fails if a typer that does so comes back.
NEVER_AT_GRANTS = (*HTTP_STACK, "docker", "ssl", "asyncio", "pydantic")


def loaded_modules(code: str | None = None, *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run `python -X importtime` on `code` (or `-m broker.cli *args`); its result and every module it imported."""
    argv = [sys.executable, "-X", "importtime", *(["-c", code] if code is not None else ["-m", "broker.cli"])]
    done = subprocess.run(
        [*argv, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "TERM": "dumb", "COLUMNS": "200"},
        timeout=60,
    )
    modules = {
        line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")
    }
    return done, modules


def present(modules: set[str], tops: tuple[str, ...]) -> list[str]:
    """The modules in `modules` that are one of `tops` or inside one of them."""
    return sorted(m for m in modules if any(m == t or m.startswith(t + ".") for t in tops))


def grants_json(ws: Workspace) -> tuple[dict[str, Any], set[str]]:
    done, modules = loaded_modules(None, "grants", "--root", str(ws.root), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout), modules


def set_permission(ws: Workspace, capability: str, entry: dict[str, Any]) -> None:
    path = ws.grant_file(TOOL)
    data = json.loads(path.read_text())
    data["permissions"][capability] = {"enabled": True, **entry}
    path.write_text(json.dumps(data))


def the_grant(report: dict[str, Any]) -> dict[str, Any]:
    grants: list[dict[str, Any]] = [g for g in report["grants"] if g["component_id"] == TOOL]
    assert len(grants) == 1, report
    return grants[0]


def test_grants_of_a_new_workspace_load_no_http_client_asyncio_or_docker(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path / "ws")
    init_workspace(ws)
    report, modules = grants_json(ws)
    grant = the_grant(report)
    # The handlers really were loaded and the grant checked with them (terminal, file_* and env_read).
    assert grant["valid"] is True, grant["errors"]
    assert {"env_read", "file_read", "file_write", "terminal"} <= set(grant["permissions"])
    assert {"broker.handler_api", "broker.policy.plugins"} <= modules
    heavy = present(modules, NEVER_AT_GRANTS)
    assert not heavy, f"`rumi grants` loads {heavy}"
    # The grant check of these four needs no network or sandbox back-end at all.
    assert not present(
        modules, ("broker.backends.egress", "broker.backends.tunnels", "broker.backends.terminal")
    )


def test_a_network_grant_is_checked_without_the_http_client(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path / "ws")
    init_workspace(ws)
    set_permission(
        ws, "network", {"allowed_domains": ["api.example.com", "10.1.2.0/24"], "allowed_ports": [443]}
    )
    report, modules = grants_json(ws)
    grant = the_grant(report)
    assert grant["valid"] is True, grant["errors"]
    assert grant["permissions"]["network"]["allowed_domains"] == ["api.example.com", "10.1.2.0/24"]
    assert "broker.backends.egress" in modules  # the entries were typed by the egress policy
    heavy = present(modules, (*HTTP_STACK, "docker"))  # tunnels imports asyncio (and so ssl)
    assert not heavy, f"`rumi grants` with a network grant loads {heavy}"

    # The same check still refuses what the broker refuses: a CIDR wider than /8 without the flag.
    set_permission(ws, "network", {"allowed_domains": ["10.0.0.0/4"], "allowed_ports": [443]})
    report, modules = grants_json(ws)
    grant = the_grant(report)
    assert grant["valid"] is False
    assert any("'10.0.0.0/4' is wider than /8" in e for e in grant["errors"]), grant["errors"]
    assert not present(modules, HTTP_STACK)


def test_egress_loads_the_http_stack_only_to_parse_or_send() -> None:
    code = """
import sys
import broker.backends.egress as egress
policy = egress.EgressPolicy.from_grant(["api.example.com"], [443])
limits = egress.StreamLimits.from_grant({"max_streams": 2})
before = sorted(m for m in ("httpx", "httpcore", "ssl", "asyncio", "certifi", "broker.backends.pinned")
                if m in sys.modules)
dest = egress.parse_destination("https://API.example.com/x")
policy.check_destination(dest)
import httpx
from broker.backends import pinned
print(before, type(dest.url) is httpx.URL, dest.target,
      egress.PinnedBackend is pinned.PinnedBackend, egress.PinnedTransport is pinned.PinnedTransport)
"""
    done, _ = loaded_modules(code)
    assert done.returncode == 0, done.stderr[-2000:]
    # Typing a grant loads none of them; parsing a URL uses httpx.URL (the client's own parser);
    # the transport classes are still reachable as egress attributes.
    assert done.stdout.split() == ["[]", "True", "api.example.com:443", "True", "True"]


def test_handler_api_backends_are_the_modules_on_first_use() -> None:
    code = """
import sys
import broker.handler_api as api
before = sorted(m for m in ("broker.backends.egress", "broker.backends.tunnels", "broker.backends.terminal")
                if m in sys.modules)
from broker.backends import egress, terminal, tunnels
print(before, api.egress is egress, api.tunnels is tunnels, api.sandbox is terminal)
try:
    api.no_such_backend
except AttributeError as exc:
    print("AttributeError", exc)
"""
    done, _ = loaded_modules(code)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "[] True True True"
    assert lines[1] == "AttributeError module 'broker.handler_api' has no attribute 'no_such_backend'"
