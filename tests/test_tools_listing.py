"""`rumi tools PACK`: the running Pack lists its tools and their argument schemas (the SDK's listing call).

* with a real nats-server: a Pack served by the SDK in a thread answers; `--json` and the text form;
  a Pack that is not running is exit 3; a bad id exit 2; a Pack that sends a forged list is refused;
* with Docker: a Pack in its hardened container answers the same call (no Pack code runs on the host).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.core.workspace import Workspace
from pack_runtime import Pack

from ._deploy import small_packs
from .conftest import say
from .test_readiness import PackInThread

TYPED_PACK = '''
import msgspec
from pack_runtime import Pack, ToolError

pack = Pack()


class Invoice(msgspec.Struct, forbid_unknown_fields=True):
    number: int
    customer: str


@pack.tool("invoice")
async def invoice(ctx, args: Invoice):
    """Make an invoice."""
    if args.number < 0:
        raise ToolError("negative", "number must not be negative")
    return {"number": args.number}


@pack.tool("echo", type="agent")
async def echo(ctx, args):
    return args


if __name__ == "__main__":
    pack.run()
'''


def _namespace() -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(compile(TYPED_PACK, "main.py", "exec"), namespace)  # the test's own Pack code, not a Pack's
    return namespace


def _served(ws: Workspace) -> Pack:
    from broker.bus.creds import pack_identity
    from broker.bus.server import nats_url

    pack: Pack = _namespace()["pack"]
    pack.pack_id = "default"
    pack.nats_url = nats_url(ws)
    pack.creds = str(pack_identity(ws, "default").seed_path)
    return pack


def _check_listing(listing: dict[str, Any], pack_id: str) -> None:
    assert listing["pack_id"] == pack_id
    tools = {t["component_id"]: t for t in listing["tools"]}
    assert sorted(tools) == [f"{pack_id}:agent:echo", f"{pack_id}:tool:invoice"]
    invoice = tools[f"{pack_id}:tool:invoice"]
    assert invoice["description"] == "Make an invoice."
    schema = invoice["args_schema"]["$defs"]["Invoice"]
    assert schema["required"] == ["customer", "number"] or schema["required"] == ["number", "customer"]
    assert schema["properties"] == {"number": {"type": "integer"}, "customer": {"type": "string"}}
    assert schema["additionalProperties"] is False
    assert tools[f"{pack_id}:agent:echo"]["args_schema"] == {"type": "object"}


def test_rumi_tools_lists_a_running_pack(ws: Workspace, nats_server: object) -> None:
    runner = CliRunner()
    root = str(ws.root)
    with PackInThread(_served(ws)):
        result = runner.invoke(app, ["tools", "default", "--root", root, "--json"])
        assert result.exit_code == 0, result.output
        _check_listing(json.loads(result.output), "default")
        text = runner.invoke(app, ["tools", "default", "--root", root])
        assert text.exit_code == 0, text.output
        lines = text.output.splitlines()
        assert "default:tool:invoice  Make an invoice." in lines and "default:agent:echo" in lines
        assert '      "type": "object"' in lines  # the schema, indented under its tool
    stopped = runner.invoke(app, ["tools", "default", "--root", root, "--timeout", "5"])
    assert stopped.exit_code == 3 and stopped.output.count("\n") == 1, stopped.output
    assert "stopping" in stopped.output or "not running" in stopped.output


def test_rumi_tools_usage_and_environment_errors(ws: Workspace, nats_server: object, tmp_path: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["tools", "Not.A.Pack", "--root", str(ws.root)])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "not a valid pack id" in bad.output
    absent = runner.invoke(app, ["tools", "other", "--root", str(ws.root), "--timeout", "5"])
    assert absent.exit_code == 3 and absent.output.count("\n") == 1
    assert "Pack 'other' is not running" in absent.output


def test_rumi_tools_without_nats_is_exit_3(tmp_path: Path) -> None:
    from broker.admin.init import init_workspace
    from broker.core.net import free_port

    ws = Workspace.at(tmp_path / "ws")
    init_workspace(ws)
    config = json.loads(ws.config_file.read_text())
    config["nats_url"] = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    ws.config_file.write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["tools", "default", "--root", str(ws.root)])
    assert result.exit_code == 3 and result.output.count("\n") == 1, result.output
    assert "cannot connect to NATS" in result.output


def test_a_forged_tool_list_is_refused(ws: Workspace, nats_server: object) -> None:
    """A hand-written Pack claiming another Pack's tools, or sending junk, gets no listing printed."""
    import asyncio

    from broker.admin.calls import list_tools
    from broker.bus.server import connect
    from broker.core.errors import HandlerFailed
    from pack_runtime._wire import CALL_DECODER, ok_reply

    answers = iter(
        [
            {"pack_id": "other", "tools": []},
            {"pack_id": "default", "tools": [{"component_id": "other:tool:x", "type": "tool", "name": "x"}]},
            {"pack_id": "default", "tools": "nope"},
        ]
    )

    async def body() -> None:
        nc = await connect(ws, "pack-default")

        async def respond(msg: Any) -> None:
            await msg.respond(ok_reply(CALL_DECODER.decode(msg.data).id, next(answers)))

        await nc.subscribe("rumi.pack.default.call._rumi.tools", cb=respond)
        await nc.flush()
        try:
            for expected in ("does not match its own id", "does not match its own id", "malformed tool list"):
                with pytest.raises(HandlerFailed, match=expected):
                    await list_tools(ws, "default", 10)
        finally:
            await nc.close()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_listing_reply_is_strict() -> None:
    from pack_runtime._wire import ToolList

    good = {"pack_id": "a", "tools": [{"component_id": "a:tool:x", "type": "tool", "name": "x"}]}
    assert msgspec.convert(good, ToolList).tools[0].args_schema == {}
    for bad in (
        {**good, "extra": 1},
        {"pack_id": "A", "tools": []},
        {"pack_id": "a", "tools": [{"component_id": "a:tool:x", "type": "_rumi", "name": "x"}]},
        {"pack_id": "a", "tools": [{}] * 513},
    ):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, ToolList)


# ---------------------------------------------------------------------------------------- Docker


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One typed Pack up under a fresh image prefix; removed afterwards, also on failure."""
    with small_packs(tmp_path_factory, "tl", {"typed": TYPED_PACK}, heartbeat_interval=1.0) as rt:
        yield rt


@pytest.mark.docker
def test_rumi_tools_asks_the_pack_in_its_container(deployment: Any, pytestconfig: pytest.Config) -> None:
    import time

    rt = deployment
    rt.up(["typed"], build=False, health_timeout=90)
    runner = CliRunner()
    root = str(rt.ws.root)
    started = time.monotonic()
    result = runner.invoke(app, ["tools", "typed", "--root", root, "--json"])
    took = time.monotonic() - started
    assert result.exit_code == 0, result.output
    _check_listing(json.loads(result.output), "typed")
    # The arguments the listing describes are the ones the Pack checks.
    call = runner.invoke(
        app, ["call", "typed:tool:invoice", '{"number": "x", "customer": "c"}', "--root", root]
    )
    assert call.exit_code == 2 and "at `$.number`" in call.output, call.output
    neg = runner.invoke(
        app, ["call", "typed:tool:invoice", '{"number": -1, "customer": "c"}', "--root", root]
    )
    assert (neg.exit_code, neg.output) == (4, "error: tool:negative: number must not be negative\n")
    say(pytestconfig, f"\nrumi tools (Pack in its container): {took * 1000:.0f} ms")
