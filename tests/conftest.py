"""Shared fixtures: a temporary workspace, a real embedded nats-server, a running broker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from broker.admin.init import init_workspace
from broker.core.net import free_port
from broker.core.workspace import Workspace
from tests._handlers import load_handler
from tests._skip import skip_unless_ci

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO.parent / "shared" / "corpora"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    """A fresh workspace made by `rumi init`, with a second Pack `other`."""
    workspace = Workspace.at(tmp_path / "ws")
    init_workspace(workspace)
    other = workspace.ecosystem / "other"
    other.mkdir()
    (other / "pack.json").write_text('{"id": "other", "version": "0.1.0"}')
    (other / "main.py").write_text("print('other')\n")
    return workspace


@pytest.fixture
def nats_server(ws: Workspace) -> Iterator[object]:
    """A real nats-server with this workspace's generated config and the audit stream."""
    from broker.bus.server import EmbeddedServer, ensure_audit_stream

    server = EmbeddedServer(ws, ws.load_config(), port=free_port())
    server.start()
    try:
        anyio.run(ensure_audit_stream, ws)
        yield server
    finally:
        server.stop()


@asynccontextmanager
async def running_broker(ws: Workspace) -> AsyncIterator[object]:
    """A Broker serving in this event loop; stopped (drained) on exit."""
    from broker.service.broker import Broker

    broker = Broker(ws)
    async with anyio.create_task_group() as tg:
        await tg.start(broker.serve)
        try:
            yield broker
        finally:
            broker.stop()


@asynccontextmanager
async def connected_pack(ws: Workspace, pack_id: str = "default") -> AsyncIterator[object]:
    """A Pack SDK object connected with that Pack's own credentials."""
    from broker.bus.creds import pack_identity
    from broker.bus.server import nats_url
    from pack_runtime import Pack

    pack = Pack(
        pack_id, nats_url=nats_url(ws), creds=str(pack_identity(ws, pack_id).seed_path), request_timeout=5
    )
    nc = await pack.connect()
    try:
        yield pack
    finally:
        await nc.close()


def docker_engine(timeout: int = 60) -> Any:
    """A Docker client, or skip (fail when CI=true) with what to do."""
    from broker.core.docker_client import docker_client
    from broker.core.errors import EngineUnavailable

    try:
        return docker_client(timeout)
    except EngineUnavailable as exc:
        skip_unless_ci(str(exc))


def say(pytestconfig: pytest.Config, text: str) -> None:
    """Print past pytest's capture: measurements belong in the CI log."""
    capman = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print(text, flush=True)


__all__ = ["load_handler"]
