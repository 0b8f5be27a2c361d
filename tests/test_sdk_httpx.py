"""`pack_runtime.BrokerTransport`: an httpx client whose requests the broker performs (`ctx.http`).

A real nats-server and broker; the Pack connects with its own credentials; the target is an HTTP
server the test starts on 127.0.0.1, granted to `default:tool:my_tool` as the IP literal `127.0.0.1`
plus its port (an IP-literal entry is the only way to reach loopback).
"""

from __future__ import annotations

import json

import httpx
import pytest

from broker.core.workspace import Workspace
from pack_runtime import BrokerTransport
from pack_runtime._httpx import BrokerTransportError
from tests._netns import Listener, TestServer
from tests.conftest import connected_pack, running_broker
from tests.test_tunnel import network_events, write_network_grant

pytestmark = pytest.mark.anyio
TOOL = "default:tool:my_tool"


async def test_broker_transport_end_to_end(ws: Workspace, nats_server: object) -> None:
    server, closed = TestServer("127.0.0.1"), Listener("127.0.0.1")
    try:
        write_network_grant(ws, TOOL, {"allowed_domains": ["127.0.0.1"], "allowed_ports": [server.port]})
        async with running_broker(ws), connected_pack(ws) as pack:
            client = httpx.AsyncClient(transport=BrokerTransport(pack.context(TOOL)))
            async with client:
                ok = await client.get(server.url("/ok"))
                posted = await client.post(server.url("/echo?q=1"), content=b"payload",
                                           headers={"Authorization": "Bearer s3cret", "X-Multi": "a"})
                redirected = await client.get(server.url("/redirect?to=/ok"))
                missing = await client.get(server.url("/nope"))
                with pytest.raises(BrokerTransportError) as port_refused:
                    await client.get(f"http://127.0.0.1:{closed.port}/")
                with pytest.raises(httpx.TransportError) as loopback:
                    await client.get(f"http://127.0.0.2:{server.port}/ok")
                with pytest.raises(BrokerTransportError) as too_big:
                    await client.get(server.url(f"/big?n={8 * 1024 * 1024}"))
            # Another component of the Pack has no network grant.
            async with httpx.AsyncClient(transport=BrokerTransport(pack.context())) as other:
                with pytest.raises(BrokerTransportError) as ungranted:
                    await other.get(server.url("/ok"))
        events = await network_events(ws, 15)
    finally:
        server.close()
        closed.close()
    assert ok.status_code == 200 and ok.text == "hello"
    assert ok.headers.get_list("set-cookie") == ["a=1", "b=2"]
    echo = posted.json()
    assert echo["method"] == "POST" and echo["body"] == "payload"
    sent = {k.lower(): v for k, v in echo["headers"]}
    assert sent["authorization"] == "Bearer s3cret" and sent["x-multi"] == "a"
    assert sent["host"] == f"127.0.0.1:{server.port}"
    assert redirected.status_code == 200 and redirected.text == "hello"  # the broker followed it, checked
    assert missing.status_code == 404
    assert port_refused.value.code == "permission_denied"
    assert "not granted" in str(port_refused.value)
    assert isinstance(loopback.value, BrokerTransportError) and loopback.value.code == "permission_denied"
    assert "loopback" in str(loopback.value)
    assert too_big.value.code == "too_large"
    assert ungranted.value.code == "permission_denied"
    assert closed.connections == 0
    # One decision and one outcome per request; safe fields only.
    fetched = [e for e in events if e["component_id"] == TOOL]
    assert len([e for e in fetched if e["phase"] == "decision"]) == 7
    first = [e for e in fetched if e["request_id"] == fetched[0]["request_id"]]
    assert [e["phase"] for e in first] == ["decision", "outcome"]
    assert first[1]["extra"] == {"method": "GET", "final_target": f"127.0.0.1:{server.port}", "redirects": 0,
                                 "bytes_out": 0, "status": 200, "bytes_in": 5}
    assert all(e["target"].startswith("127.0.0.") for e in fetched)
    text = json.dumps(events)
    assert "s3cret" not in text and "payload" not in text and "/echo" not in text
    denied = [e for e in events if e["component_id"] == "default:pack:_"]
    assert [(e["decision"], e["code"]) for e in denied] == [("deny", "permission_denied")]
