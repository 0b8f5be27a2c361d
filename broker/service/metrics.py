"""Prometheus metrics of one broker process: what is counted, the recording calls, the /metrics server.

Each `Broker` owns a `BrokerMetrics` with a registry of its own (never prometheus_client's global one),
so several brokers can share one process (tests do). The request path pays one dict lookup, one
counter increment and one histogram observation per request: the labelled children are cached per
(pack, capability, decision, code). Values that already exist elsewhere (requests in flight per Pack,
open tunnels, audit events waiting for their ack, how full the audit stream is) are read when
`/metrics` is scraped, not recorded per request.

Labels carry Pack ids and capability names only, never paths, hosts or keys, and each comes from a
bounded set a Pack cannot grow: the pack label is the Pack of the server-stamped account
(`_unidentified` when there is none), the capability label is the name of a loaded handler (`_other`
for anything else a Pack sends).

With `rumi broker --workers N`, worker *i* serves its metrics on the base port + *i*; every worker
says which it is in `rumi_broker_info{worker, workers}`, so `rumi top` finds them all.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector

from broker.audit.trail import AuditWriter
from broker.core.errors import AuditError, RuntimeSetupError, WorkspaceError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from broker.core.workspace import RumiConfig
    from broker.policy.grants import Policy
    from broker.service.lanes import Lanes

__all__ = [
    "DEFAULT_LISTEN",
    "LISTEN_ENV",
    "OTHER_CAPABILITY",
    "UNIDENTIFIED_PACK",
    "BrokerMetrics",
    "Listen",
    "MeasuredAuditWriter",
    "MetricsServer",
    "configured_listen",
    "listen_from_env",
    "parse_listen",
    "ports_in_use",
]

log = logging.getLogger("rumi.broker.metrics")

LISTEN_ENV = "RUMI_METRICS_LISTEN"  # HOST:PORT or `off`; read by `rumi broker`, `rumi up`, `rumi top`
DEFAULT_LISTEN = "127.0.0.1:9464"  # `rumi up`'s default; `rumi broker` serves none unless asked
UNIDENTIFIED_PACK = "_unidentified"  # a request with no Pack account stamp (pack ids never start with _)
OTHER_CAPABILITY = "_other"  # a capability no loaded handler has

# Names, shared with `rumi top` (broker/admin/top.py), which reads them back.
REQUESTS = "rumi_requests"  # counter: exposed as rumi_requests_total
REQUEST_SECONDS = "rumi_request_duration_seconds"
RATE_LIMITED = "rumi_rate_limited_requests"
IN_FLIGHT = "rumi_requests_in_flight"
PACK_IN_FLIGHT = "rumi_pack_requests_in_flight"
AUDIT_SECONDS = "rumi_audit_write_duration_seconds"
AUDIT_FAILURES = "rumi_audit_write_failures"
AUDIT_PENDING = "rumi_audit_pending_acks"
AUDIT_STREAM_BYTES = "rumi_audit_stream_bytes"
AUDIT_STREAM_LIMIT = "rumi_audit_stream_limit_bytes"
TUNNELS = "rumi_tunnels_open"
POLICY_RELOADS = "rumi_policy_reloads"
POLICY_RELOAD_FAILURES = "rumi_policy_reload_failures"
POLICY_ERRORS = "rumi_policy_errors"
BROKER_INFO = "rumi_broker_info"
BROKER_SERVING = "rumi_broker_serving"

REQUEST_BUCKETS = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
AUDIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


# --- where to serve ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listen:
    """An address for `/metrics`: an IP literal (or `localhost`) and a TCP port."""

    host: str
    port: int

    def worker(self, index: int) -> Listen:
        """Worker `index`'s address: the base port + `index`."""
        return replace(self, port=self.port + index)

    @property
    def loopback(self) -> bool:
        return self.host == "localhost" or ipaddress.ip_address(self.host).is_loopback

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self}/metrics"


def parse_listen(text: str, *, workers: int = 1) -> Listen | None:
    """`HOST:PORT` (`[v6]:PORT` for IPv6) → Listen; `off` → None. ValueError says what is wrong.

    `workers` ports are needed (base port + worker index), so the last must still be a valid port.
    """
    value = text.strip()
    if value.lower() in ("off", "none", "no"):
        return None
    how = "expected HOST:PORT, e.g. 127.0.0.1:9464 or [::1]:9464, or 'off'"
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"metrics address {text!r} is not HOST:PORT; {how}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"metrics address {text!r}: an IPv6 address goes in brackets, e.g. [::1]:9464")
    if host != "localhost":
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            raise ValueError(f"metrics host {host!r} is not an IP address or 'localhost'; {how}") from None
    port = int(port_text)
    if not 1 <= port <= 65535 - (workers - 1):
        last = "" if workers == 1 else f" (with {workers} workers it needs ports up to PORT+{workers - 1})"
        raise ValueError(f"metrics port {port} is not one of 1-{65535 - (workers - 1)}{last}")
    return Listen(host, port)


def listen_from_env() -> Listen | None:
    """The address in RUMI_METRICS_LISTEN (what `--metrics` sets for the broker it runs), or None."""
    value = os.environ.get(LISTEN_ENV, "").strip()
    if not value:
        return None
    try:
        return parse_listen(value)
    except ValueError as exc:
        raise WorkspaceError(f"{LISTEN_ENV}: {exc}") from None


def configured_listen(cfg: RumiConfig) -> str | None:
    """`broker.metrics_listen` of docker/config.json, if set."""
    value = getattr(cfg.broker, "metrics_listen", None)
    return value if isinstance(value, str) and value.strip() else None


def ports_in_use(listen: Listen, count: int = 1) -> list[Listen]:
    """Which of the `count` addresses from `listen` on cannot be bound right now."""
    busy = []
    for i in range(count):
        address = listen.worker(i)
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((address.host, address.port))
            except OSError:
                busy.append(address)
    return busy


class MetricsServer:
    """`/metrics` of one registry over HTTP, in a daemon thread (prometheus_client's WSGI server)."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread, listen: Listen) -> None:
        self._httpd, self._thread, self.listen = httpd, thread, listen

    @classmethod
    def start(cls, listen: Listen, registry: CollectorRegistry) -> MetricsServer:
        """Serve now; RuntimeSetupError (one line, what to do) if the address cannot be bound."""
        from prometheus_client import start_http_server

        try:
            httpd, thread = start_http_server(listen.port, listen.host, registry=registry)
        except OSError as exc:
            raise RuntimeSetupError(
                f"cannot serve metrics on {listen}: {exc.strerror or exc}; choose another address with "
                "--metrics HOST:PORT (or metrics_listen in docker/config.json), or --metrics off"
            ) from None
        if not listen.loopback:
            log.warning("metrics on %s are reachable from other hosts (pack ids and request counts)", listen)
        log.info("metrics on %s", listen.url)
        return cls(httpd, thread, listen)

    def stop(self) -> None:
        """Stop serving and free the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=2)


# --- what is counted -------------------------------------------------------------------------------


class Observed(Protocol):
    """What the scrape-time collector reads from the broker (plain attributes, no locks needed)."""

    in_flight: int
    audit_usage: tuple[int, int] | None
    stopping: anyio.Event

    @property
    def lanes(self) -> Lanes: ...


class _ScrapeTime:
    """Gauges computed when `/metrics` is scraped, from values the broker keeps anyway."""

    def __init__(self, owner: BrokerMetrics) -> None:
        self._owner = owner

    def describe(self) -> list[Metric]:
        return []  # values change shape (one per Pack): nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        broker = self._owner.broker
        if broker is None:
            return
        per_pack = GaugeMetricFamily(
            PACK_IN_FLIGHT, "Requests of one Pack being served now.", labels=["pack"]
        )
        counts: dict[str, int] = {}
        for pack, in_flight in broker.lanes.in_flight_by_pack():
            label = pack or UNIDENTIFIED_PACK
            counts[label] = counts.get(label, 0) + in_flight
        for label, count in sorted(counts.items()):
            per_pack.add_metric([label], count)
        yield per_pack
        yield GaugeMetricFamily(IN_FLIGHT, "Requests being served now, all Packs.", value=broker.in_flight)
        usage = broker.audit_usage
        if usage is not None:
            yield GaugeMetricFamily(AUDIT_STREAM_BYTES, "Bytes stored in the audit stream.", value=usage[0])
            yield GaugeMetricFamily(
                AUDIT_STREAM_LIMIT,
                "Size limit of the audit stream (full: requests are refused).",
                value=usage[1],
            )
        serving = self._owner.serving and not broker.stopping.is_set()
        yield GaugeMetricFamily(BROKER_SERVING, "1 while this broker takes requests.", value=float(serving))


Children = tuple[Any, Any]  # (counter child, histogram child)


class BrokerMetrics:
    """The metrics of one broker process, and the calls that record them."""

    def __init__(self, *, worker: int = 0, workers: int = 1) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            REQUESTS, "Requests answered, by Pack, capability, decision (allow/deny/error) and code.",
            ["pack", "capability", "decision", "code"], registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            REQUEST_SECONDS, "Time from receipt to reply of admitted requests, by Pack and capability.",
            ["pack", "capability"], buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.rate_limited = Counter(
            RATE_LIMITED, "Requests refused rate_limited (over the Pack's rate or in-flight quota).",
            ["pack"], registry=r,
        )  # fmt: skip
        self.audit_seconds = Histogram(
            AUDIT_SECONDS, "Time to store one audit event (until JetStream acknowledged it).",
            buckets=AUDIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.audit_failures = Counter(
            AUDIT_FAILURES, "Audit events that could not be stored (requests were refused).", registry=r
        )
        self.audit_pending = Gauge(
            AUDIT_PENDING, "Audit events sent, waiting for JetStream's ack.", registry=r
        )
        self.tunnels = Gauge(TUNNELS, "Open network tunnels (HTTPS proxy CONNECTs).", registry=r)
        self.policy_reloads = Counter(
            POLICY_RELOADS, "Times changed handler, scope or grant files were loaded.", registry=r
        )
        self.policy_reload_failures = Counter(
            POLICY_RELOAD_FAILURES, "Reloads that failed (the previous policy stayed).", registry=r
        )
        self.policy_errors = Gauge(
            POLICY_ERRORS, "Handler, scope and grant files refused at the last load.", registry=r
        )
        info = Gauge(BROKER_INFO, "This broker process: its worker index of how many.", ["worker", "workers"],
                     registry=r)  # fmt: skip
        info.labels(str(worker), str(workers)).set(1)
        ProcessCollector(registry=r)
        self.broker: Observed | None = None
        self.serving = False
        self._registry_plugins: Callable[[], Mapping[str, Any]] = dict
        self._children: dict[tuple[str, str, str, str], Children] = {}
        self._labelled: dict[tuple[str, str, str, str], Children] = {}
        self._throttled: dict[tuple[str, str], Children] = {}
        self._throttled_labelled: dict[tuple[str, str], Children] = {}
        r.register(_ScrapeTime(self))

    def observe(self, broker: Observed) -> None:
        """Read `broker`'s in-flight counts and audit stream usage at each scrape."""
        self.broker = broker

    # -- per request (the hot path) ------------------------------------------------------------
    def _capability(self, capability: str) -> str:
        return capability if capability in self._registry_plugins() else OTHER_CAPABILITY

    def request(self, pack: str, capability: str, decision: str, code: str, started: float) -> None:
        """One admitted request answered, `started` its `time.perf_counter()` at receipt."""
        key = (pack, capability, decision, code)
        children = self._children.get(key)
        if children is None:
            children = self._children_for(key)
        children[0].inc()
        children[1].observe(time.perf_counter() - started)

    def _children_for(self, key: tuple[str, str, str, str]) -> Children:
        pack, capability, decision, code = key
        label = (pack or UNIDENTIFIED_PACK, self._capability(capability), decision, code)
        children = self._labelled.get(label)
        if children is None:
            children = (self.requests.labels(*label), self.request_seconds.labels(*label[:2]))
            self._labelled[label] = children
        if label[1] != OTHER_CAPABILITY:
            self._children[key] = children  # bounded: loaded capabilities only, never what a Pack made up
        return children

    def throttled(self, pack: str, capability: str) -> None:
        """One request refused `rate_limited` before it was admitted (not timed: it never ran)."""
        children = self._throttled.get((pack, capability))
        if children is None:
            label = (pack or UNIDENTIFIED_PACK, self._capability(capability))
            children = self._throttled_labelled.get(label)
            if children is None:
                children = (
                    self.requests.labels(*label, "deny", "rate_limited"),
                    self.rate_limited.labels(label[0]),
                )
                self._throttled_labelled[label] = children
            if label[1] != OTHER_CAPABILITY:
                self._throttled[(pack, capability)] = children
        children[0].inc()
        children[1].inc()

    # -- the serving broker's helpers ------------------------------------------------------------
    def count_tunnels(self) -> None:
        """Report the running event loop's open tunnels (call from the broker's loop)."""
        from broker.backends.tunnels import tunnel_table

        table = tunnel_table()
        self.tunnels.set_function(lambda: len(table))

    async def watch_policy(
        self,
        policy: Policy,
        *,
        interval: float,
        rescan: float | None = None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """`GrantStore.watch` (changed handler, scope and grant files), counting reloads and failures.

        From now on the capability label is a loaded handler's name or `_other`.
        """
        registry = policy.registry
        self._registry_plugins = lambda: registry.plugins
        self.policy_errors.set(len(policy.errors))

        def refreshed(changed: bool | None) -> None:
            if changed is None:
                self.policy_reload_failures.inc()
            elif changed:
                self.policy_reloads.inc()
                self.policy_errors.set(len(policy.errors))

        self.serving = True  # for as long as the broker's serve() runs this loop
        try:
            await policy.grants.watch(
                interval=interval, rescan=rescan, on_refresh=refreshed, task_status=task_status
            )
        finally:
            self.serving = False


class MeasuredAuditWriter(AuditWriter):
    """An `AuditWriter` whose writes are timed and whose failures and pending acks are counted."""

    def __init__(self, js: Any, *args: Any, metrics: BrokerMetrics, **kwargs: Any) -> None:
        super().__init__(js, *args, **kwargs)
        self._metrics = metrics
        metrics.audit_pending.set_function(lambda: self.pending)  # queued, sent, or waiting for a retry

    async def record(self, fields: dict[str, Any], *, msg_id: str) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            return await super().record(fields, msg_id=msg_id)
        except AuditError:
            self._metrics.audit_failures.inc()
            raise
        finally:
            self._metrics.audit_seconds.observe(time.perf_counter() - started)
