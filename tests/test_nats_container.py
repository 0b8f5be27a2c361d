"""The `rumi-nats` image under testcontainers: the broker on the host and a Pack talk through it.

Ryuk (testcontainers' reaper) is disabled: its image cannot be pulled here. Cleanup is ours: the
container carries Rumi's labels and is stopped and removed by the fixture.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from broker.core.workspace import Workspace
from tests._skip import skip_unless_ci

from .conftest import connected_pack, docker_engine, free_port, running_broker

os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"

pytestmark = pytest.mark.docker


@pytest.fixture
def nats_container(ws: Workspace) -> Iterator[Any]:
    """rumi-nats started by testcontainers with the runtime's own container settings."""
    from testcontainers.core.container import DockerContainer

    from broker.containers.engine import DockerRuntime
    from broker.containers.images import build_nats_image

    if os.geteuid() != 0:
        skip_unless_ci("the JetStream directory must be chowned to the image's uid: needs root")
    client = docker_engine()
    image = build_nats_image(client, "rumi")
    runtime = DockerRuntime(ws, client=client)
    runtime.write_nats_config(ws.pack_ids())
    runtime.prepare_jetstream_dir()
    host_port = free_port()
    settings = runtime.nats_settings(image, host_port)
    for key in ("image", "detach", "network"):  # testcontainers passes these itself; default bridge here
        settings.pop(key)
    settings.pop("name")
    command = settings.pop("command")
    ports, volumes = settings.pop("ports"), settings.pop("volumes")
    container = (
        DockerContainer(image, name=f"rumi-tc-nats-{secrets.token_hex(4)}")
        .with_command(command)
        .with_kwargs(**settings)
    )
    container.ports = ports  # bound to 127.0.0.1 only, as the runtime does
    container.volumes = volumes
    container.start()
    try:
        (ws.state / "nats.url").write_text(f"nats://127.0.0.1:{host_port}\n")
        deadline = time.monotonic() + 20
        import socket

        while True:
            try:
                with socket.create_connection(("127.0.0.1", host_port), timeout=1) as s:
                    if s.recv(4).startswith(b"INFO"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, container.get_wrapped_container().logs()[-2000:]
            time.sleep(0.2)
        yield container
    finally:
        container.stop()


@pytest.mark.anyio
async def test_broker_and_pack_through_the_rumi_nats_container(ws: Workspace, nats_container: Any) -> None:
    from broker.audit.trail import read_events
    from broker.bus.server import connect, ensure_audit_stream

    await ensure_audit_stream(ws)
    wrapped = nats_container.get_wrapped_container()
    wrapped.reload()
    bindings = wrapped.attrs["HostConfig"]["PortBindings"]["4222/tcp"]
    assert all(b["HostIp"] == "127.0.0.1" for b in bindings)
    assert wrapped.attrs["HostConfig"]["ReadonlyRootfs"] is True
    sandbox = ws.pack_work_area("default")
    async with running_broker(ws), connected_pack(ws) as pack:
        ctx = pack.context("default:tool:my_tool")
        await ctx.file_write(f"{sandbox}/tc.txt", b"through rumi-nats")
        assert await ctx.file_read(f"{sandbox}/tc.txt") == b"through rumi-nats"
    nc = await connect(ws, "audit")
    try:
        events = [e async for e in read_events(nc, follow=False, pack="default", decision=None)]
    finally:
        await nc.close()
    # An action's first event is its decision; a read has one event, `complete` (docs/protocol.md).
    firsts = [e["capability"] for e in events if e.get("phase") in ("decision", "complete")]
    assert firsts == ["file_write", "file_read"]
