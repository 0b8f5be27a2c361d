"""`rumi top`: a live view of the broker, read from its Prometheus metrics (HTTP GET of /metrics).

Only what the broker publishes is read, never its private state: the first address answers with
`rumi_broker_info{worker, workers}`, and with N workers the others are the next N-1 ports. Each
refresh scrapes every worker and compares with the previous scrape: requests and denials per second,
p50/p99 latency (from the histogram buckets of the interval, as Prometheus' `histogram_quantile`
does), requests in flight and rate-limited requests per Pack, plus the broker's and the audit
writer's status. `snapshot()` is the same as a JSON-ready dict (`rumi top --json`).
"""

from __future__ import annotations

import math
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from broker.core.errors import EXIT_ENVIRONMENT, RumiError
from broker.service import metrics as m

__all__ = ["MetricsUnreachable", "Reading", "compute", "parse", "quantile", "run", "scrape_all", "snapshot"]

MAX_SCRAPE_BYTES = 32 * 1024 * 1024
SCRAPE_TIMEOUT = 2.0


class MetricsUnreachable(RumiError):
    """No broker answers on the metrics address."""

    exit_code = EXIT_ENVIRONMENT


@dataclass
class Reading:
    """One scrape of one broker process, reduced to what `rumi top` shows."""

    requests: dict[tuple[str, str], float] = field(default_factory=dict)  # (pack, decision) → count
    rate_limited: dict[str, float] = field(default_factory=dict)  # pack → count
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)  # pack → le → cumulative count
    in_flight: dict[str, float] = field(default_factory=dict)  # pack → now
    audit_buckets: dict[float, float] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)  # unlabelled samples by name
    worker: int = 0
    workers: int = 1


def parse(text: str) -> Reading:
    """Read the exposition text of one broker process."""
    from prometheus_client.parser import text_string_to_metric_families

    r = Reading()
    requests: defaultdict[tuple[str, str], float] = defaultdict(float)
    buckets: defaultdict[str, defaultdict[float, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name, labels, value = s.name, s.labels, float(s.value)
            if name == f"{m.REQUESTS}_total":
                requests[(labels.get("pack", ""), labels.get("decision", ""))] += value
            elif name == f"{m.REQUEST_SECONDS}_bucket":
                buckets[labels.get("pack", "")][float(labels["le"])] += value
            elif name == f"{m.RATE_LIMITED}_total":
                r.rate_limited[labels.get("pack", "")] = value
            elif name == m.PACK_IN_FLIGHT:
                r.in_flight[labels.get("pack", "")] = value
            elif name == f"{m.AUDIT_SECONDS}_bucket":
                r.audit_buckets[float(labels["le"])] = value
            elif name == m.BROKER_INFO:
                r.worker, r.workers = int(labels.get("worker", "0")), max(1, int(labels.get("workers", "1")))
            elif not labels:
                r.values[name] = value
    r.requests = dict(requests)
    r.buckets = {pack: dict(b) for pack, b in buckets.items()}
    return r


def fetch(listen: m.Listen, timeout: float = SCRAPE_TIMEOUT) -> str:
    """GET /metrics of `listen`; OSError (URLError included) when nothing answers."""
    with urllib.request.urlopen(listen.url, timeout=timeout) as resp:  # noqa: S310 (http:// only: Listen.url)
        data: bytes = resp.read(MAX_SCRAPE_BYTES + 1)
    if len(data) > MAX_SCRAPE_BYTES:
        raise OSError(f"{listen.url} answered more than {MAX_SCRAPE_BYTES} bytes")
    return data.decode("utf-8", errors="replace")


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    return getattr(reason, "strerror", None) or str(reason) or type(exc).__name__


@dataclass
class Scrape:
    """Every worker's reading (None where it did not answer), taken at `taken` (monotonic)."""

    base: m.Listen
    readings: list[Reading | None]
    errors: list[str]
    taken: float


def scrape_all(
    base: m.Listen, workers: int | None = None, fetcher: Callable[[m.Listen], str] = fetch
) -> Scrape:
    """Scrape worker 0 at `base`, then the other workers it announces (or `workers` if it is down).

    MetricsUnreachable if nothing answers at `base` and the number of workers is not known yet.
    """
    taken = time.monotonic()
    readings: list[Reading | None] = []
    errors: list[str] = []
    try:
        first: Reading | None = parse(fetcher(base))
        errors.append("")
    except (OSError, ValueError) as exc:
        if workers is None:
            raise MetricsUnreachable(
                f"no broker metrics at {base.url} ({_why(exc)}): start the broker with `rumi up` (serves "
                f"{m.DEFAULT_LISTEN}) or `rumi broker --metrics HOST:PORT`, or pass --metrics HOST:PORT"
            ) from None
        first = None
        errors.append(_why(exc))
    readings.append(first)
    count = first.workers if first is not None else workers or 1
    for i in range(1, count):
        try:
            readings.append(parse(fetcher(base.worker(i))))
            errors.append("")
        except (OSError, ValueError) as exc:
            readings.append(None)
            errors.append(_why(exc))
    return Scrape(base, readings, errors, taken)


# --- arithmetic --------------------------------------------------------------------------------------


def _delta(now: float, before: float | None) -> float:
    """A counter's increase; a counter that went down was reset (a worker restarted)."""
    if before is None:
        return 0.0
    return now if now < before else now - before


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile of cumulative `buckets` (le → count), interpolated like `histogram_quantile`."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower  # in the +Inf bucket: the highest finite bound is all we know
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def _bucket_delta(now: dict[float, float], before: dict[float, float] | None) -> dict[float, float]:
    if before is None:
        return {}
    reset = any(now.get(le, 0.0) < before.get(le, 0.0) for le in now)
    return dict(now) if reset else {le: now[le] - before.get(le, 0.0) for le in now}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def compute(prev: Scrape, cur: Scrape, *, alarm_ratio: float = 0.8) -> dict[str, Any]:
    """What changed between two scrapes, per Pack and for the broker and the audit writer."""
    dt = max(cur.taken - prev.taken, 1e-6)
    packs: dict[str, dict[str, Any]] = {}
    latency: defaultdict[str, defaultdict[float, float]] = defaultdict(lambda: defaultdict(float))
    audit_latency: defaultdict[float, float] = defaultdict(float)
    totals: defaultdict[str, float] = defaultdict(float)
    rates: defaultdict[str, float] = defaultdict(float)
    endpoints = []

    def pack(p: str) -> dict[str, Any]:
        return packs.setdefault(p, defaultdict(float))

    for i, reading in enumerate(cur.readings):
        before = prev.readings[i] if i < len(prev.readings) else None
        endpoints.append(
            {
                "address": str(cur.base.worker(i)),
                "worker": i,
                "up": reading is not None,
                "serving": bool(reading and reading.values.get(m.BROKER_SERVING)),
                "error": cur.errors[i] or None,
            }
        )
        if reading is None:
            continue
        for (p, decision), count in reading.requests.items():
            was = before.requests.get((p, decision), 0.0) if before else None
            row = pack(p)
            row["requests_total"] += count
            row["requests"] += _delta(count, was)
            if decision == "deny":
                row["denials_total"] += count
                row["denials"] += _delta(count, was)
        for p, count in reading.rate_limited.items():
            row = pack(p)
            row["rate_limited_total"] += count
            row["rate_limited"] += _delta(count, before.rate_limited.get(p, 0.0) if before else None)
        for p, now in reading.in_flight.items():
            pack(p)["in_flight"] += now
        for p, b in reading.buckets.items():
            for le, count in _bucket_delta(b, before.buckets.get(p, {}) if before else None).items():
                latency[p][le] += count
        for le, count in _bucket_delta(
            reading.audit_buckets, before.audit_buckets if before else None
        ).items():
            audit_latency[le] += count
        for name in (m.IN_FLIGHT, f"{m.TUNNELS}", m.POLICY_ERRORS, m.AUDIT_PENDING, m.AUDIT_STREAM_BYTES,
                     m.AUDIT_STREAM_LIMIT, f"{m.POLICY_RELOADS}_total", f"{m.POLICY_RELOAD_FAILURES}_total",
                     f"{m.AUDIT_FAILURES}_total"):  # fmt: skip
            totals[name] += reading.values.get(name, 0.0)
        for name in (f"{m.AUDIT_FAILURES}_total", "process_cpu_seconds_total"):
            rates[name] += _delta(reading.values.get(name, 0.0), before.values.get(name) if before else None)

    rows = []
    for p in sorted(packs):
        row = packs[p]
        rows.append(
            {
                "pack": p,
                "requests_per_second": round(row["requests"] / dt, 3),
                "denials_per_second": round(row["denials"] / dt, 3),
                "p50_ms": _ms(quantile(0.5, latency.get(p, {}))),
                "p99_ms": _ms(quantile(0.99, latency.get(p, {}))),
                "in_flight": int(row["in_flight"]),
                "rate_limited_per_second": round(row["rate_limited"] / dt, 3),
                "requests_total": int(row["requests_total"]),
                "denials_total": int(row["denials_total"]),
                "rate_limited_total": int(row["rate_limited_total"]),
            }
        )
    up = [e for e in endpoints if e["up"]]
    limit = totals[m.AUDIT_STREAM_LIMIT]
    used = totals[m.AUDIT_STREAM_BYTES] / limit if limit > 0 else None
    failures = rates[f"{m.AUDIT_FAILURES}_total"]
    if not up:
        status = "unknown"
    elif failures > 0:
        status = "failing"
    elif used is not None and used >= alarm_ratio:
        status = "alarm"
    else:
        status = "ok"
    return {
        "interval_seconds": round(dt, 3),
        "broker": {
            "endpoints": endpoints,
            "workers": len(endpoints),
            "workers_up": len(up),
            "serving": bool(up) and all(e["serving"] for e in endpoints),
            "in_flight": int(totals[m.IN_FLIGHT]),
            "tunnels_open": int(totals[m.TUNNELS]),
            "policy_errors": int(totals[m.POLICY_ERRORS]),
            "policy_reloads_total": int(totals[f"{m.POLICY_RELOADS}_total"]),
            "policy_reload_failures_total": int(totals[f"{m.POLICY_RELOAD_FAILURES}_total"]),
            "cpu_percent": round(100 * rates["process_cpu_seconds_total"] / dt, 1),
        },
        "audit": {
            "status": status,
            "pending_acks": int(totals[m.AUDIT_PENDING]),
            "write_failures_per_second": round(failures / dt, 3),
            "write_failures_total": int(totals[f"{m.AUDIT_FAILURES}_total"]),
            "write_p50_ms": _ms(quantile(0.5, audit_latency)),
            "write_p99_ms": _ms(quantile(0.99, audit_latency)),
            "stream_used_ratio": None if used is None else round(used, 4),
        },
        "packs": rows,
    }


# --- the command -------------------------------------------------------------------------------------


def snapshot(base: m.Listen, *, interval: float = 1.0, alarm_ratio: float = 0.8) -> dict[str, Any]:
    """Two scrapes `interval` seconds apart, compared (`rumi top --json`)."""
    first = scrape_all(base)
    time.sleep(interval)
    return compute(first, scrape_all(base, len(first.readings)), alarm_ratio=alarm_ratio)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(snap: dict[str, Any]) -> Any:
    """The dashboard for one snapshot, as a rich renderable."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    b, a = snap["broker"], snap["audit"]
    down = [f"{e['address']} ({e['error']})" for e in b["endpoints"] if not e["up"]]
    state = "serving" if b["serving"] else "DOWN" if not b["workers_up"] else "NOT SERVING"
    broker_line = Text(
        f"broker: {state}, {b['workers_up']}/{b['workers']} worker(s) up, {b['in_flight']} in flight, "
        f"{b['tunnels_open']} tunnel(s), CPU {b['cpu_percent']:.0f}%, policy: {b['policy_errors']} error(s), "
        f"{b['policy_reloads_total']} reload(s)" + (f"; down: {', '.join(down)}" if down else ""),
        style="bold red" if state != "serving" else "",
    )
    used = a["stream_used_ratio"]
    audit_line = Text(
        f"audit:  {a['status'].upper()}, {a['pending_acks']} waiting for ack, write p50 "
        f"{_fmt(a['write_p50_ms'], 2)} ms p99 {_fmt(a['write_p99_ms'], 2)} ms, "
        f"{a['write_failures_total']} failed write(s), stream "
        + ("?" if used is None else f"{100 * used:.1f}%")
        + " full",
        style="" if a["status"] == "ok" else "bold red",
    )
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("PACK", "REQ/S", "DENY/S", "P50 MS", "P99 MS", "IN FLIGHT", "RATE-LIMITED/S", "TOTAL"):
        table.add_column(column, justify="left" if column == "PACK" else "right")
    for row in snap["packs"]:
        table.add_row(
            row["pack"],
            _fmt(row["requests_per_second"]),
            _fmt(row["denials_per_second"]),
            _fmt(row["p50_ms"], 2),
            _fmt(row["p99_ms"], 2),
            str(row["in_flight"]),
            _fmt(row["rate_limited_per_second"]),
            str(row["requests_total"]),
        )
    note = Text(f"every {snap['interval_seconds']:.1f} s; Ctrl-C stops", style="dim")
    return Group(broker_line, audit_line, Text(""), table if snap["packs"] else Text("no requests yet"), note)


def run(
    base: m.Listen,
    *,
    interval: float = 1.0,
    iterations: int = 0,
    alarm_ratio: float = 0.8,
    console: Any = None,
) -> int:
    """Refresh the dashboard every `interval` s, `iterations` times (0: until interrupted).

    Live (redrawn in place) on a terminal; otherwise one dashboard per refresh. Returns the refreshes done.
    """
    from rich.console import Console
    from rich.live import Live

    # Not a terminal (a pipe, a log): wide enough that a dashboard line is one line.
    out = console or Console(width=None if sys.stdout.isatty() else 160)
    prev = scrape_all(base)
    done = 0

    def frames() -> Iterable[Any]:
        nonlocal prev, done
        while not iterations or done < iterations:
            time.sleep(interval)
            cur = scrape_all(base, len(prev.readings))
            yield render(compute(prev, cur, alarm_ratio=alarm_ratio))
            prev, done = cur, done + 1

    if out.is_terminal:
        with Live(console=out, auto_refresh=False, transient=False) as live:
            for frame in frames():
                live.update(frame, refresh=True)
    else:
        for frame in frames():
            out.print(frame)
            out.print()
    return done
