"""`rumi top`: the live view read from the broker's /metrics, against `rumi broker --workers 2`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import anyio
import pytest

from broker.admin.top import Reading, Scrape, compute, parse, quantile
from broker.core.net import free_port
from broker.core.workspace import Workspace
from broker.service.broker import pack_worker
from broker.service.metrics import Listen
from pack_runtime import BrokerError, PermissionDenied

from .test_fairness import grant_victim
from .test_metrics import free_ports

BASE = Listen("127.0.0.1", 9464)


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, {}, None),
        (0.5, {0.1: 0.0, float("inf"): 0.0}, None),
        (0.5, {0.001: 10.0, 0.01: 10.0, float("inf"): 10.0}, 0.0005),  # all in the first bucket
        (0.5, {0.001: 0.0, 0.01: 10.0, float("inf"): 10.0}, 0.0055),  # interpolated within (1 ms, 10 ms]
        (0.99, {0.001: 50.0, 0.01: 100.0, float("inf"): 100.0}, 0.0098200),
        (0.99, {0.001: 50.0, 0.01: 50.0, float("inf"): 100.0}, 0.01),  # beyond the last bound: that bound
    ],
)
def test_quantiles_from_buckets(q: float, buckets: dict[float, float], expected: float | None) -> None:
    got = quantile(q, buckets)
    assert got == expected if expected is None else got == pytest.approx(expected)


def exposition(
    requests: dict[tuple[str, str, str], int], buckets: dict[str, list[tuple[str, int]]], **extra: float
) -> str:
    lines = ['rumi_broker_info{worker="0",workers="1"} 1.0', "rumi_broker_serving 1.0"]
    for (pack, decision, code), n in requests.items():
        lines.append(
            f'rumi_requests_total{{pack="{pack}",capability="file_read",decision="{decision}",code="{code}"}} {n}'
        )
    for pack, bs in buckets.items():
        for le, n in bs:
            lines.append(
                f'rumi_request_duration_seconds_bucket{{pack="{pack}",capability="file_read",le="{le}"}} {n}'
            )
    lines += [f"{name} {v}" for name, v in extra.items()]
    return "\n".join(lines) + "\n"


def scrape_of(text: str | None, taken: float) -> Scrape:
    reading: Reading | None = parse(text) if text is not None else None
    return Scrape(BASE, [reading], ["" if text else "refused"], taken)


def test_rates_latencies_and_audit_status_between_two_scrapes() -> None:
    first = exposition(
        {("a", "allow", "ok"): 10, ("a", "deny", "permission_denied"): 2},
        {"a": [("0.001", 5), ("0.01", 12), ("+Inf", 12)]},
        rumi_audit_write_failures_total=0, rumi_audit_stream_bytes=10, rumi_audit_stream_limit_bytes=100,
    )  # fmt: skip
    second = exposition(
        {("a", "allow", "ok"): 30, ("a", "deny", "permission_denied"): 6, ("b", "deny", "rate_limited"): 4},
        {"a": [("0.001", 5), ("0.01", 36), ("+Inf", 36)]},
        rumi_audit_write_failures_total=0, rumi_audit_stream_bytes=90, rumi_audit_stream_limit_bytes=100,
    )  # fmt: skip
    snap = compute(scrape_of(first, 100.0), scrape_of(second, 102.0))
    a, b = snap["packs"]
    assert a["pack"] == "a" and a["requests_per_second"] == 12.0 and a["denials_per_second"] == 2.0
    # All 24 new requests took (1 ms, 10 ms]: p50 is interpolated in that bucket.
    assert a["p50_ms"] == pytest.approx(5.5) and a["p99_ms"] == pytest.approx(9.91)
    assert a["requests_total"] == 36 and a["denials_total"] == 6
    # A Pack first seen in this scrape: its series started from 0 since the last one.
    assert b["pack"] == "b" and b["requests_per_second"] == 2.0 and b["denials_total"] == 4
    assert snap["audit"]["status"] == "alarm" and snap["audit"]["stream_used_ratio"] == 0.9
    assert snap["broker"]["serving"] and snap["broker"]["workers_up"] == 1
    failing = second.replace("rumi_audit_write_failures_total 0", "rumi_audit_write_failures_total 3")
    assert compute(scrape_of(first, 100.0), scrape_of(failing, 101.0))["audit"]["status"] == "failing"
    down = compute(scrape_of(first, 100.0), scrape_of(None, 101.0))
    assert down["audit"]["status"] == "unknown" and down["broker"]["endpoints"][0]["error"] == "refused"
    # A restarted broker (counters went down) counts from zero, never negative.
    restarted = compute(scrape_of(second, 100.0), scrape_of(first, 101.0))
    assert restarted["packs"][0]["requests_per_second"] == 12.0


class Broker:
    """`rumi broker --workers 2 --metrics 127.0.0.1:P` with its embedded nats-server; SIGTERM on exit."""

    def __init__(self, ws: Workspace, metrics: Listen) -> None:
        self.log = ws.root / "top-broker.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "broker", "--root", str(ws.root), "--port", str(free_port()),
             "--workers", "2", "--metrics", str(metrics)],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def wait_serving(self) -> None:
        deadline = time.monotonic() + 40
        while "serving with 2 workers" not in self.log.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-2000:]
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(45)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


@pytest.fixture
def two_workers(ws: Workspace) -> Iterator[Listen]:
    grant_victim(ws)  # other:tool:t may read RUMI_DEMO_GREETING
    base = Listen("127.0.0.1", free_ports(2))
    broker = Broker(ws, base)
    try:
        broker.wait_serving()
        yield base
    finally:
        broker.stop()
    assert broker.proc.returncode == 0, broker.log.read_text()[-2000:]


async def requests(ws: Workspace) -> None:
    """As `default`: one allowed and one denied read; as `other`: one allowed read."""
    from broker.bus.creds import pack_identity
    from broker.bus.server import nats_url
    from pack_runtime import Pack

    for pack_id, component in (("default", "default:tool:my_tool"), ("other", "other:tool:t")):
        pack = Pack(
            pack_id, nats_url=nats_url(ws), creds=str(pack_identity(ws, pack_id).seed_path), request_timeout=5
        )
        nc = await pack.connect()
        try:
            assert await pack.context(component).env_read("RUMI_DEMO_GREETING")
            if pack_id == "default":
                with pytest.raises(PermissionDenied):
                    await pack.context(component).file_read("/etc/passwd")
        except BrokerError as exc:  # pragma: no cover - says which request failed
            raise AssertionError(f"{pack_id}: {exc.code}") from None
        finally:
            await nc.close()


def rumi(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker.cli", *args], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_top_reads_every_worker(ws: Workspace, two_workers: Listen) -> None:
    assert pack_worker("default", 2) != pack_worker("other", 2)  # the two Packs live in different workers
    anyio.run(requests, ws)
    out = rumi("top", "--root", str(ws.root), "--metrics", str(two_workers), "--json", "--interval", "0.5")
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    assert snap["broker"]["workers"] == 2 and snap["broker"]["workers_up"] == 2 and snap["broker"]["serving"]
    assert [e["address"] for e in snap["broker"]["endpoints"]] == [
        str(two_workers),
        str(two_workers.worker(1)),
    ]
    packs = {p["pack"]: p for p in snap["packs"]}
    assert packs["default"]["requests_total"] == 2 and packs["default"]["denials_total"] == 1
    assert packs["other"]["requests_total"] == 1 and packs["other"]["denials_total"] == 0
    assert snap["audit"]["status"] == "ok" and snap["audit"]["write_failures_total"] == 0
    # The live view, three refreshes, in a pipe (no terminal): three dashboards, no error.
    started = time.monotonic()
    live = rumi("top", "--root", str(ws.root), "--metrics", str(two_workers), "--iterations", "3")
    assert live.returncode == 0, live.stderr
    assert time.monotonic() - started >= 3.0
    assert live.stdout.count("PACK") == 3 and live.stdout.count("2/2 worker(s) up") == 3
    assert "default" in live.stdout and "other" in live.stdout and not live.stderr


def test_top_without_a_broker_says_what_to_do(ws: Workspace) -> None:
    port = free_port()
    out = rumi("top", "--root", str(ws.root), "--metrics", f"127.0.0.1:{port}", "--once")
    assert out.returncode == 3, out
    assert (
        out.stderr.count("\n") == 1 and f"no broker metrics at http://127.0.0.1:{port}/metrics" in out.stderr
    )
    assert "rumi up" in out.stderr


@pytest.mark.parametrize("bad", ["nope", "127.0.0.1:0", "off"])
def test_top_refuses_a_bad_address_in_one_line(ws: Workspace, bad: str) -> None:
    out = rumi("top", "--root", str(ws.root), "--metrics", bad, "--once")
    assert out.returncode == 2, out
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ") and "Traceback" not in out.stderr
