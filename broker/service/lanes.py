"""One lane per Pack: whatever one Pack can consume in the broker, another Pack does not feel.

A lane is keyed on the account the NATS server stamped on the request (`Nats-Request-Info`), never on
a subject token or a message field a Pack controls: a Pack that sends to malformed subjects, or names
another Pack in them, still spends its own lane. Each lane holds:

- a token bucket, taken before any decode, audit or work;
- an in-flight quota: a Pack over it is answered `rate_limited` at once, it never waits in a queue;
- its own share of handler threads (blocking handlers run in these, not in a shared pool);
- a refusal budget: beyond `individual_refusals` refusals per second, refusals are folded into one
  aggregate audit event per Pack per second with a count.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from broker.core.ids import pack_of_account
from broker.service.ratelimit import TokenBuckets

__all__ = ["LaneSettings", "Lanes", "PackLane", "stamped_account"]


_ACCOUNTS: dict[str, str] = {}  # header value -> account: a connection's header repeats verbatim
_ACCOUNTS_MAX = 4096


def stamped_account(headers: dict[str, str] | None) -> str:
    """The requester's account from the server-stamped `Nats-Request-Info` header, or ''."""
    info = (headers or {}).get("Nats-Request-Info", "")
    if not info:
        return ""
    account = _ACCOUNTS.get(info)
    if account is not None:
        return account
    try:
        parsed = json.loads(info).get("acc", "")
    except (ValueError, AttributeError):
        return ""
    account = parsed if isinstance(parsed, str) else ""
    if len(_ACCOUNTS) >= _ACCOUNTS_MAX:
        _ACCOUNTS.clear()
    _ACCOUNTS[info] = account
    return account


@dataclass(frozen=True)
class LaneSettings:
    """The per-Pack bounds (from docker/config.json `broker`)."""

    rate_per_second: float = 200.0
    burst: int = 400
    max_in_flight: int = 32
    threads: int = 4
    individual_refusals: int = 10


@dataclass
class PackLane:
    """One account's share of the broker."""

    account: str
    pack_id: str  # from the account name; '' when the account is not a Pack's
    threads: anyio.CapacityLimiter
    in_flight: int = 0
    # `await run_blocking(fn, *args)`: fn in this lane's threads (handed to handlers, made once per lane)
    run_blocking: Callable[..., Awaitable[Any]] = field(init=False)
    refusal_window: float = 0.0
    refusals_in_window: int = 0

    def __post_init__(self) -> None:
        self.run_blocking = functools.partial(anyio.to_thread.run_sync, limiter=self.threads)


class Lanes:
    """The lanes of one broker process; `lane(account)` makes one on first use."""

    def __init__(self, settings: LaneSettings) -> None:
        self.settings = settings
        self._buckets = TokenBuckets(settings.rate_per_second, settings.burst)
        self._lanes: dict[str, PackLane] = {}

    def lane(self, account: str) -> PackLane:
        """The lane of `account` (server-stamped; '' for requests that carry no stamp)."""
        lane = self._lanes.get(account)
        if lane is None:
            lane = PackLane(
                account=account,
                pack_id=pack_of_account(account),
                threads=anyio.CapacityLimiter(self.settings.threads),
            )
            self._lanes[account] = lane
        return lane

    def in_flight_by_pack(self) -> list[tuple[str, int]]:
        """(pack id, requests in flight) of each lane; callable from another thread (`/metrics`)."""
        return [(lane.pack_id, lane.in_flight) for lane in list(self._lanes.values())]

    def take_token(self, lane: PackLane) -> bool:
        """One request's token from the lane's bucket; False when the Pack is over its rate."""
        return self._buckets.take(lane.account)

    def has_room(self, lane: PackLane) -> bool:
        """Whether the lane may start one more request now."""
        return lane.in_flight < self.settings.max_in_flight

    def record_individually(self, lane: PackLane, now: float | None = None) -> bool:
        """Count one refusal; True while the lane is within its individual refusals this second."""
        t = time.monotonic() if now is None else now
        if t - lane.refusal_window >= 1.0:
            lane.refusal_window = t
            lane.refusals_in_window = 0
        lane.refusals_in_window += 1
        return lane.refusals_in_window <= self.settings.individual_refusals
