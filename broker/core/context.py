"""What a handler is told about the request it serves: `HandlerContext`, built once by the service.

Handler files see it through `broker.handler_api`. It is frozen: a handler cannot change who asked,
what was granted or the limits; the only thing it adds to is `audit` (safe extras for the outcome
event, such as bytes or an HTTP status).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from broker.core.protected import ProtectedSet

__all__ = ["HandlerContext", "Limits", "OutcomeRecorder"]

OutcomeRecorder = Callable[[str, str, dict[str, Any]], Awaitable[None]]
"""`record_outcome(request_id, target, fields)`: writes a session's outcome event later (a tunnel's close)."""

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class Limits:
    """The broker's own bounds on one request."""

    timeout: float = 30.0
    """Seconds the broker gives the handler before it answers `timeout`."""
    max_reply_bytes: int = 0
    """The largest reply the bus carries (0: unknown); a bigger result is answered `too_large`."""


@dataclass(frozen=True)
class HandlerContext:
    """One request as the broker authenticated and authorised it.

    `grant` is the component's grant entry for this capability merged over the scope's
    `default_config`, read-only. `protected` is the set of workspace paths no grant may reach.
    """

    pack_id: str
    component_id: str
    request_id: str
    grant: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    limits: Limits = field(default_factory=Limits)
    protected: ProtectedSet | None = None
    workspace_root: Path | None = None
    audit: dict[str, Any] = field(default_factory=dict)
    """Safe extras for this request's outcome event (sizes, status codes); never secrets or content."""
    record_outcome: OutcomeRecorder | None = None
    """Set for handlers that open sessions: write the session's outcome event when it ends."""
    current_grant: Callable[[], Mapping[str, Any] | None] | None = None
    """The grant entry as it is now (None when revoked): long-lived sessions re-check it."""
    run_blocking: Callable[..., Awaitable[Any]] | None = None
    """`await ctx.run_blocking(fn, *args)`: run a blocking call in this Pack's share of handler threads."""
    resolver: Any = None
    """Tests only: a name resolver for the network back-end. The broker leaves it None."""
    tls_verify: Any = None
    """Tests only: the TLS verification setting for the network back-end. The broker leaves it None."""

    def __post_init__(self) -> None:
        if not isinstance(self.grant, MappingProxyType):
            object.__setattr__(self, "grant", MappingProxyType(dict(self.grant)))
