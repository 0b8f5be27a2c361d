"""The handler contract of docs/handlers.md, served through a real broker and nats-server.

The example handler and scope are read from the documentation itself, so the page cannot drift
from what works.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import broker.handler_api as api
from broker.core.workspace import Workspace
from pack_runtime import PermissionDenied

from .conftest import connected_pack, running_broker
from .test_broker import audit_events

pytestmark = pytest.mark.anyio
DOC = Path(__file__).resolve().parents[1] / "docs" / "handlers.md"
TOOL = "default:tool:my_tool"
OTHER = "default:tool:other"


def doc_block(language: str, must_contain: str) -> str:
    """The one fenced block of `language` in docs/handlers.md that contains `must_contain`."""
    blocks = re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)
    found = [b for b in blocks if must_contain in b]
    assert len(found) == 1, f"docs/handlers.md: expected one {language} block with {must_contain!r}"
    return found[0]


def install_example(ws: Workspace) -> None:
    (ws.handlers / "greeting.py").write_text(doc_block("python", "class GreetingArgs"))
    (ws.scopes / "greeting.json").write_text(doc_block("json", '"default_config"'))
    grant = json.loads(doc_block("json", '"permissions"'))
    assert grant["component_id"] == TOOL
    path = ws.grant_file(TOOL)
    current = json.loads(path.read_text()) if path.exists() else {"component_id": TOOL, "permissions": {}}
    current["permissions"].update(grant["permissions"])
    path.write_text(json.dumps(current))


def test_handler_api_exports_what_the_docs_name() -> None:
    assert sorted(api.__all__) == sorted(
        [
            "Denied", "HandlerContext", "HandlerFailed", "InvalidRequest", "Limits", "RateLimited",
            "RequestError", "Timeout", "TooLarge", "Unavailable", "check_beneath_grant", "egress", "files", "find_grant_root",
            "is_pack_id", "protected_set", "read_beneath", "read_beneath_async", "sandbox", "tunnels", "write_beneath",
        ]
    )  # fmt: skip
    for name in api.__all__:
        assert getattr(api, name) is not None


def test_context_is_frozen_and_its_grant_read_only() -> None:
    ctx = api.HandlerContext(pack_id="p", component_id="p:tool:t", request_id="r", grant={"names": ["a"]})
    with pytest.raises(AttributeError):
        ctx.pack_id = "q"  # type: ignore[misc]
    with pytest.raises(TypeError):
        ctx.grant["names"] = ["b"]  # type: ignore[index]
    ctx.audit["bytes"] = 3  # the one thing a handler adds to
    assert ctx.audit == {"bytes": 3}


async def test_documented_example_is_allowed_with_a_grant_and_denied_without(
    ws: Workspace, nats_server: object
) -> None:
    install_example(ws)
    async with running_broker(ws), connected_pack(ws) as pack:
        assert await pack.context(TOOL).request("greeting", {"name": "Ada"}) == "Hello, Ada!"
        with pytest.raises(PermissionDenied) as no_grant:
            await pack.context(OTHER).request("greeting", {"name": "Ada"})
        assert "no grant for greeting" in no_grant.value.message
        with pytest.raises(PermissionDenied) as by_authorize:
            await pack.context(TOOL).request("greeting", {"name": "Mallory"})
        assert "'Mallory' is not granted" in by_authorize.value.message
    events = await audit_events(ws, 4)
    by_target: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_target.setdefault(f"{event['component_id']} {event['target']}", []).append(event)
    allowed = by_target[f"{TOOL} Ada"]
    assert [(e["phase"], e["decision"]) for e in allowed] == [("decision", "allow"), ("outcome", "allow")]
    assert allowed[1]["extra"] == {"chars": len("Hello, Ada!")}
    # Refused before anything was recorded as allowed: exactly one event, deny.
    refused = by_target[f"{TOOL} Mallory"]
    assert [(e["phase"], e["decision"], e["code"]) for e in refused] == [("decision", "deny", "permission_denied")]
    other = [e for e in events if e["component_id"] == OTHER]
    assert [(e["decision"], e["code"]) for e in other] == [("deny", "permission_denied")]


async def test_shutdown_hooks_run_once_when_the_broker_stops(ws: Workspace, nats_server: object) -> None:
    marker = ws.root / "shutdown-calls"
    (ws.handlers / "session.py").write_text(
        "from pathlib import Path\n"
        "META = {'requires_scope': False, 'supports_modes': ['sandbox'], 'description': 'session'}\n"
        "def execute(ctx, args):\n"
        "    return {'success': True, 'data': None}\n"
        "async def shutdown():\n"
        f"    path = Path({str(marker)!r})\n"
        "    path.write_text(path.read_text() + 'x' if path.exists() else 'x')\n"
    )
    async with running_broker(ws):
        assert not marker.exists()
    assert marker.read_text() == "x"
