"""Per-Pack lanes through a real broker and nats-server: in-flight quota, refusal folding, tunnel recv."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import pytest

from broker.core.workspace import Workspace
from broker.service.lanes import Lanes, LaneSettings, stamped_account
from pack_runtime import BrokerError

from .conftest import connected_pack, running_broker
from .test_broker import audit_events, raw_request, set_broker_config
from .test_tunnel import PACK_COMPONENT, EchoServer

pytestmark = pytest.mark.anyio
TOOL = "default:tool:my_tool"
OTHER_TOOL = "other:tool:t"

SLOW = (
    "import time\n"
    "META = {'requires_scope': False, 'supports_modes': ['sandbox'], 'description': 'slow'}\n"
    "def execute(ctx, args):\n"
    "    time.sleep(float(args.get('seconds', 1.0)))\n"
    "    return {'success': True, 'data': 'done'}\n"
)


def grant(ws: Workspace, component: str, permissions: dict[str, Any]) -> None:
    path = ws.grant_file(component)
    doc = json.loads(path.read_text()) if path.exists() else {"component_id": component, "permissions": {}}
    doc["permissions"].update(permissions)
    path.write_text(json.dumps(doc))


def test_lanes_are_keyed_on_the_stamped_account() -> None:
    lanes = Lanes(LaneSettings(rate_per_second=1, burst=2, max_in_flight=1))
    a = lanes.lane(stamped_account({"Nats-Request-Info": json.dumps({"acc": "PACK_alpha"})}))
    assert a.pack_id == "alpha" and lanes.lane("PACK_alpha") is a
    # A subject token or message field cannot pick a lane: only the server's stamp can.
    assert stamped_account({"Nats-Request-Info": "not json"}) == "" and stamped_account(None) == ""
    assert lanes.lane("").pack_id == "" and lanes.lane("RUMI").pack_id == ""
    assert lanes.take_token(a) and lanes.take_token(a) and not lanes.take_token(a)
    assert lanes.take_token(lanes.lane("PACK_beta"))  # another Pack's bucket is its own
    assert [lanes.record_individually(a, now=100.0) for _ in range(11)][-2:] == [True, False]
    assert lanes.record_individually(a, now=101.5)  # a new second


async def test_a_pack_over_its_in_flight_quota_is_refused_at_once_and_others_are_served(
    ws: Workspace, nats_server: object
) -> None:
    set_broker_config(ws, max_in_flight_per_pack=2)
    (ws.handlers / "slow.py").write_text(SLOW)
    grant(ws, TOOL, {"slow": {"enabled": True}})
    grant(ws, OTHER_TOOL, {"slow": {"enabled": True}})
    results: dict[str, Any] = {}
    async with running_broker(ws), connected_pack(ws) as pack, connected_pack(ws, "other") as other:

        async def slow(i: int) -> None:
            try:
                results[f"default-{i}"] = await pack.context(TOOL).request("slow", {"seconds": 1.5})
            except BrokerError as exc:
                results[f"default-{i}"] = (exc.code, time.monotonic() - start)

        async with anyio.create_task_group() as tg:
            start = time.monotonic()
            tg.start_soon(slow, 0)
            tg.start_soon(slow, 1)
            await anyio.sleep(0.3)
            tg.start_soon(slow, 2)
            # The other Pack's lane is untouched by the first Pack's full quota.
            results["other"] = await other.context(OTHER_TOOL).request("slow", {"seconds": 0.1})
            results["other_at"] = time.monotonic() - start
    assert results["default-0"] == results["default-1"] == "done"
    code, when = results["default-2"]
    assert code == "rate_limited" and when < 1.0, results  # refused at once, not queued behind the slots
    assert results["other"] == "done" and results["other_at"] < 1.4, results


async def test_refusals_beyond_ten_a_second_are_folded_into_one_event(ws: Workspace, nats_server: object) -> None:
    async with running_broker(ws):
        for _ in range(40):
            reply = await raw_request(ws, "default", "file_read", b"\xc1")
            assert reply.error is not None and reply.error.code == "invalid_request"
        await anyio.sleep(1.6)  # the aggregate of this second is written when the window closes
    events = [e for e in await audit_events(ws, 11) if e["code"] == "invalid_request"]
    single = [e for e in events if "count" not in e]
    folded = [e for e in events if "count" in e]
    assert 1 <= len(single) <= 20, len(single)  # ten per second, one or two seconds
    assert folded and all(e["decision"] == "deny" and "phase" not in e for e in folded)
    assert len(single) + sum(e["count"] for e in folded) == 40  # every refusal is on record once


async def test_a_second_recv_on_one_tunnel_is_refused_not_queued() -> None:
    from broker.core.errors import RateLimited
    from tests._netns import load_network_handler, scope_defaults

    handler = load_network_handler()

    async def record_outcome(request_id: str, target: str, fields: dict[str, Any]) -> None:
        pass

    async with EchoServer() as echo:
        context = {
            "pack_id": "default",
            "component_id": PACK_COMPONENT,
            "request_id": "open-1",
            "grant": {**scope_defaults(), "enabled": True, "allowed_domains": ["127.0.0.1"],
                      "allowed_ports": [echo.port], "plaintext_tunnel": True},  # echo is not on 443
            "limits": {"timeout": 30},
            "record_outcome": record_outcome,
        }  # fmt: skip
        opened = await handler.execute(context, {"op": "open", "host": "127.0.0.1", "port": echo.port})
        tid = opened["data"]["tunnel"]
        async with anyio.create_task_group() as tg:
            waiting: dict[str, Any] = {}

            async def long_poll() -> None:
                waiting["first"] = await handler.execute(context, {"op": "recv", "tunnel": tid, "wait": 1.0})

            tg.start_soon(long_poll)
            await anyio.sleep(0.2)
            started = time.monotonic()
            with pytest.raises(RateLimited):
                await handler.execute(context, {"op": "recv", "tunnel": tid, "wait": 1.0})
            assert time.monotonic() - started < 0.5
        assert waiting["first"]["data"] == {"data": b"", "eof": False, "closed": False}
        await handler.execute(context, {"op": "close", "tunnel": tid})


async def test_small_reads_inline_and_large_reads_in_the_packs_threads(ws: Workspace, nats_server: object) -> None:
    import os

    area = ws.pack_work_area("default")
    area.mkdir(parents=True, exist_ok=True)
    small, large = os.urandom(1024), os.urandom(3 * 1024 * 1024)
    (area / "small.bin").write_bytes(small)
    (area / "large.bin").write_bytes(large)
    async with running_broker(ws) as broker, connected_pack(ws) as pack:
        ctx = pack.context(TOOL)
        assert await ctx.file_read(f"{area}/small.bin") == small
        lane = broker.lanes.lane("PACK_default")
        assert lane.threads.borrowed_tokens == 0 and lane.threads.total_tokens == 4
        async with anyio.create_task_group() as tg:
            got: list[bytes] = []

            async def read_large() -> None:
                got.append(await ctx.file_read(f"{area}/large.bin"))

            for _ in range(3):
                tg.start_soon(read_large)
        assert got == [large] * 3
