"""Prometheus metrics of the broker: scraped over HTTP from a real broker on a real nats-server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.core.net import free_port
from broker.core.workspace import Workspace
from broker.service.metrics import (
    OTHER_CAPABILITY,
    BrokerMetrics,
    Listen,
    MetricsServer,
    parse_listen,
    ports_in_use,
)
from pack_runtime import BrokerError, PermissionDenied

from .conftest import connected_pack, running_broker
from .test_broker import set_broker_config

TOOL = "default:tool:my_tool"
REPO = Path(__file__).resolve().parents[1]


def scrape(listen: Listen) -> str:
    with urllib.request.urlopen(listen.url, timeout=5) as resp:
        return str(resp.read().decode())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) → value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


def free_ports(count: int) -> int:
    """A base port with `count` consecutive free ports."""
    for _ in range(50):
        base = free_port()
        if base + count < 65536 and not ports_in_use(Listen("127.0.0.1", base), count):
            return base
    raise AssertionError("no run of free ports")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", Listen("127.0.0.1", 9464)),
        ("localhost:1", Listen("localhost", 1)),
        ("[::1]:9464", Listen("::1", 9464)),
        (" 0.0.0.0:65535 ", Listen("0.0.0.0", 65535)),
        ("off", None),
        ("OFF", None),
    ],
)
def test_metrics_addresses_are_parsed(text: str, expected: Listen | None) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "workers", "says"),
    [
        ("9464", 1, "is not HOST:PORT"),
        ("127.0.0.1:", 1, "is not HOST:PORT"),
        ("127.0.0.1:http", 1, "is not HOST:PORT"),
        ("example.com:9464", 1, "is not an IP address"),
        ("127.0.0.1:0", 1, "is not one of 1-65535"),
        ("127.0.0.1:70000", 1, "is not one of 1-65535"),
        ("127.0.0.1:65535", 2, "needs ports up to PORT+1"),
        ("::1:9464", 1, "goes in brackets"),
        ("[nope]:9464", 1, "is not an IP address"),
    ],
)
def test_bad_metrics_addresses_say_what_is_wrong(text: str, workers: int, says: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_listen(text, workers=workers)
    assert says in str(exc.value) and "\n" not in str(exc.value)


def test_listen_addresses_per_worker_and_url() -> None:
    base = Listen("::1", 9464)
    assert str(base.worker(2)) == "[::1]:9466" and base.worker(2).url == "http://[::1]:9466/metrics"
    assert base.loopback and not Listen("0.0.0.0", 1).loopback


def test_recording_is_cheap_and_bounded_by_loaded_capabilities(pytestconfig: pytest.Config) -> None:
    """The per-request cost stays in microseconds, and made-up capability names create no series."""
    from .conftest import say

    metrics = BrokerMetrics()
    metrics._registry_plugins = lambda: {"file_read": None}  # what watch_policy sets from the registry
    started = time.perf_counter()
    n = 50_000
    t0 = time.process_time()
    for _ in range(n):
        metrics.request("default", "file_read", "allow", "ok", started)
    per_call = (time.process_time() - t0) / n
    say(pytestconfig, f"metrics: {per_call * 1e6:.2f} µs CPU per recorded request")
    assert per_call < 50e-6
    for i in range(2000):
        metrics.request("default", f"made_up_{i}", "deny", "unknown_capability", started)
        metrics.throttled("default", f"made_up_{i}")
    assert len(metrics._children) == 1 and len(metrics._labelled) == 2 and not metrics._throttled
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    assert "made_up" not in text
    assert value(text, "rumi_requests_total", pack="default", capability="file_read", decision="allow",
                 code="ok") == n  # fmt: skip
    assert value(text, "rumi_requests_total", pack="default", capability=OTHER_CAPABILITY, decision="deny",
                 code="unknown_capability") == 2000  # fmt: skip
    assert value(text, "rumi_rate_limited_requests_total", pack="default") == 2000


@pytest.mark.anyio
async def test_a_denied_request_is_counted_on_metrics(ws: Workspace, nats_server: object) -> None:
    listen = Listen("127.0.0.1", free_port())
    sandbox = ws.pack_work_area("default")
    async with running_broker(ws) as broker, connected_pack(ws) as pack:
        server = MetricsServer.start(listen, broker.metrics.registry)  # type: ignore[attr-defined]
        try:
            before = await anyio.to_thread.run_sync(scrape, listen)
            assert value(before, "rumi_broker_serving") == 1
            assert value(before, "rumi_broker_info", worker="0", workers="1") == 1
            assert not [k for k in samples(before) if k[0] == "rumi_requests_total"]
            ctx = pack.context(TOOL)
            await ctx.file_write(f"{sandbox}/a.txt", b"hello")
            with pytest.raises(PermissionDenied):
                await ctx.file_read("/etc/passwd")
            with pytest.raises(BrokerError):
                await ctx.request("no_such_capability_xyz", {})
            text = await anyio.to_thread.run_sync(scrape, listen)
        finally:
            await anyio.to_thread.run_sync(server.stop)
    # The denied request, by Pack, capability, decision and code:
    assert value(text, "rumi_requests_total", pack="default", capability="file_read", decision="deny",
                 code="permission_denied") == 1  # fmt: skip
    assert value(text, "rumi_requests_total", pack="default", capability="file_write", decision="allow",
                 code="ok") == 1  # fmt: skip
    assert value(text, "rumi_requests_total", pack="default", capability=OTHER_CAPABILITY, decision="deny",
                 code="unknown_capability") == 1  # fmt: skip
    assert value(text, "rumi_request_duration_seconds_count", pack="default", capability="file_read") == 1
    # Decision and outcome of the write, the refusals: each audit event was timed.
    assert (value(text, "rumi_audit_write_duration_seconds_count") or 0) >= 3
    assert value(text, "rumi_audit_write_failures_total") == 0
    assert value(text, "rumi_audit_pending_acks") is not None
    assert value(text, "rumi_pack_requests_in_flight", pack="default") == 0
    assert value(text, "rumi_requests_in_flight") == 0
    assert value(text, "rumi_tunnels_open") == 0
    # Nothing but pack ids and capability names in labels: no paths, no made-up names.
    assert str(sandbox) not in text and "/etc/passwd" not in text and "no_such_capability_xyz" not in text
    # Stopped: the port is free again.
    assert not ports_in_use(listen)


@pytest.mark.anyio
async def test_rate_limited_requests_are_counted_per_pack(ws: Workspace, nats_server: object) -> None:
    set_broker_config(ws, rate_per_second=0.5, burst=2)
    async with running_broker(ws) as broker, connected_pack(ws) as pack:
        codes = []
        for _ in range(6):
            try:
                await pack.context(TOOL).env_read("RUMI_DEMO_GREETING")
                codes.append("ok")
            except BrokerError as exc:
                codes.append(exc.code)
        from prometheus_client import generate_latest

        text = generate_latest(broker.metrics.registry).decode()  # type: ignore[attr-defined]
    limited = codes.count("rate_limited")
    assert limited >= 3, codes
    assert value(text, "rumi_rate_limited_requests_total", pack="default") == limited
    assert value(text, "rumi_requests_total", pack="default", capability="env_read", decision="deny",
                 code="rate_limited") == limited  # fmt: skip
    # Throttled requests never ran: only the admitted ones are timed.
    assert (
        value(text, "rumi_request_duration_seconds_count", pack="default", capability="env_read")
        == 6 - limited
    )


@pytest.mark.anyio
async def test_audit_unavailable_is_counted(ws: Workspace, nats_server: object) -> None:
    from broker.bus.server import connect

    async with running_broker(ws) as broker, connected_pack(ws) as pack:
        admin = await connect(ws, "admin")
        try:
            await admin.request("$JS.API.STREAM.DELETE.RUMI_AUDIT", b"", timeout=5)
        finally:
            await admin.close()
        with pytest.raises(BrokerError) as exc:
            await pack.context(TOOL).file_write(f"{ws.pack_work_area('default')}/x", b"x")
        assert exc.value.code == "unavailable"
        from prometheus_client import generate_latest

        text = generate_latest(broker.metrics.registry).decode()  # type: ignore[attr-defined]
    assert (value(text, "rumi_audit_write_failures_total") or 0) >= 1
    assert value(text, "rumi_requests_total", pack="default", capability="file_write", decision="error",
                 code="unavailable") == 1  # fmt: skip


@pytest.mark.anyio
async def test_policy_reloads_and_errors_are_counted(ws: Workspace, nats_server: object) -> None:
    from prometheus_client import generate_latest

    async with running_broker(ws) as broker:
        registry = broker.metrics.registry  # type: ignore[attr-defined]
        text = generate_latest(registry).decode()
        assert value(text, "rumi_policy_errors") == 0
        reloads = value(text, "rumi_policy_reloads_total") or 0
        (ws.grants / "broken.json").write_text("{ not json")
        deadline = time.monotonic() + 10
        while value(text, "rumi_policy_errors") == 0 and time.monotonic() < deadline:
            await anyio.sleep(0.1)
            text = generate_latest(registry).decode()
    assert value(text, "rumi_policy_errors") == 1
    assert (value(text, "rumi_policy_reloads_total") or 0) > reloads
    assert value(text, "rumi_policy_reload_failures_total") == 0


def rumi(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker.cli", *args], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_broker_refuses_a_bad_metrics_address_in_one_line(ws: Workspace) -> None:
    out = rumi("broker", "--root", str(ws.root), "--metrics", "example.com:9464")
    assert out.returncode == 2, out
    assert out.stderr.count("\n") == 1 and "metrics host 'example.com' is not an IP address" in out.stderr
    assert "Traceback" not in out.stderr


def test_broker_refuses_a_metrics_port_in_use_in_one_line(ws: Workspace) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = rumi("broker", "--root", str(ws.root), "--metrics", f"127.0.0.1:{port}")
    assert out.returncode == 4, out
    assert out.stderr.count("\n") == 1 and f"cannot serve metrics on 127.0.0.1:{port}" in out.stderr
    assert "--metrics off" in out.stderr


def test_the_worker_entry_point_checks_its_metrics_address() -> None:
    out = subprocess.run([sys.executable, "-m", "broker.service.worker", "/nonexistent", "0", "1", "nope"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2 and "is not HOST:PORT" in out.stderr


@pytest.mark.anyio
async def test_requests_in_flight_are_shown_per_pack(ws: Workspace, nats_server: object) -> None:
    from prometheus_client import generate_latest

    (ws.handlers / "slow.py").write_text(
        "import anyio\n"
        "META = {'requires_scope': False, 'supports_modes': ['sandbox'], 'description': 'slow'}\n"
        "async def execute(context, args):\n"
        "    await anyio.sleep(1.0)\n"
        "    return {'success': True, 'data': None}\n"
    )
    grant = ws.grant_file(TOOL)
    data = json.loads(grant.read_text())
    data["permissions"]["slow"] = {"enabled": True}
    grant.write_text(json.dumps(data))
    async with running_broker(ws) as broker, connected_pack(ws) as pack:
        registry = broker.metrics.registry  # type: ignore[attr-defined]
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(pack.context(TOOL).request, "slow")
            await anyio.sleep(0.5)
            during = generate_latest(registry).decode()
        after = generate_latest(registry).decode()
    assert value(during, "rumi_pack_requests_in_flight", pack="default") == 3
    assert value(during, "rumi_requests_in_flight") == 3
    assert value(after, "rumi_pack_requests_in_flight", pack="default") == 0
    assert (value(after, "rumi_request_duration_seconds_bucket", pack="default", capability="slow", le="0.5")
            == 0)  # fmt: skip
    assert (
        value(after, "rumi_request_duration_seconds_bucket", pack="default", capability="slow", le="2.5") == 3
    )


@pytest.mark.anyio
async def test_open_tunnels_are_read_from_the_event_loops_tunnel_table() -> None:
    from prometheus_client import generate_latest

    from broker.backends.tunnels import tunnel_table

    metrics = BrokerMetrics()
    metrics.count_tunnels()
    assert value(generate_latest(metrics.registry).decode(), "rumi_tunnels_open") == 0
    table = tunnel_table()
    table._tunnels[("default", "t" * 16)] = object()  # type: ignore[assignment]  # as TunnelTable.open adds one
    try:
        assert value(generate_latest(metrics.registry).decode(), "rumi_tunnels_open") == 1
    finally:
        table._tunnels.clear()
