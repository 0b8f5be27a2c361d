"""Built-in handler network: the broker performs one HTTP(S) request for the Pack.

Only hosts in the grant's `allowed_domains` (names, `*.suffix`, `*`, IP literals, CIDRs) and ports
in `allowed_ports` are reached. The broker resolves names itself, refuses loopback, private,
link-local, metadata and other special addresses unless an IP/CIDR entry names them, and connects
to exactly the address it checked. Redirects are followed by hand and checked again at every hop.
All of it lives in `broker._egress`; see docs/network.md.

Args: `{"method": str, "url": str, "headers": {str: str} = {}, "body": bytes = b""}`.
Data: `{"status": int, "headers": [[name, value], ...], "body": bytes}` (headers as received, in
order, repeated names kept; the body as sent by the server, not decompressed).
"""

from __future__ import annotations

from typing import Any

import msgspec

from broker import _egress
from broker._errors import Denied, HandlerFailed, InvalidRequest


class NetworkArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Request args."""

    method: str
    url: str
    headers: dict[str, str] = {}
    body: bytes = b""


class NetworkGrant(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Grant entry; the limits default to the scope's `default_config`."""

    enabled: bool = False
    allowed_domains: list[str] = []
    allowed_ports: list[int] = []
    max_request_bytes: int | None = None
    max_response_bytes: int | None = None
    timeout: float | None = None
    max_redirects: int | None = None

    def __post_init__(self) -> None:
        # Typing the entries here turns a bad entry into a grant-file error at load time.
        _egress.EgressPolicy.from_grant(self.allowed_domains, self.allowed_ports)
        _limits(msgspec.structs.asdict(self), {})


def _target(args: dict[str, Any]) -> str:
    return _egress.url_target(args.get("url"))


META: dict[str, Any] = {
    "requires_scope": True,
    "supports_modes": ["sandbox"],
    "description": "HTTP(S) request by the broker to a granted host and port; no private addresses "
                   "unless granted by IP/CIDR, no DNS rebinding, redirects checked.",
    "grant_schema": NetworkGrant,
    "args_schema": NetworkArgs,
    "target": _target,
}


def _limits(grant: dict[str, Any], limits: dict[str, Any]) -> _egress.EgressLimits:
    """Grant (over scope) values, else built-in defaults; never longer than the broker's own timeout."""
    base = _egress.EgressLimits()
    configured = grant.get("timeout")
    timeout = base.timeout if configured is None else float(configured)
    broker_timeout = limits.get("timeout")
    if isinstance(broker_timeout, int | float) and broker_timeout > 0:
        timeout = min(timeout, float(broker_timeout))

    def pick(key: str, default: int) -> int:
        value = grant.get(key)
        return default if value is None else int(value)

    return _egress.EgressLimits(
        max_request_bytes=pick("max_request_bytes", base.max_request_bytes),
        max_response_bytes=pick("max_response_bytes", base.max_response_bytes),
        timeout=timeout,
        max_redirects=pick("max_redirects", base.max_redirects),
    )


async def execute(context: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """Send the request if the grant allows it; return status, headers and body."""
    grant = context.get("grant") or {}
    if grant.get("enabled") is not True:
        raise Denied("network is not granted")
    try:
        call = msgspec.convert(args, NetworkArgs)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid arguments: {exc}") from None
    try:
        policy = _egress.EgressPolicy.from_grant(
            grant.get("allowed_domains") or [], grant.get("allowed_ports") or []
        )
        limits = _limits(grant, context.get("limits") or {})
    except (ValueError, TypeError):
        raise HandlerFailed("the network grant is invalid; ask the admin to fix it") from None
    audit = context.get("audit")
    response = await _egress.fetch(
        _egress.EgressRequest(method=call.method, url=call.url, headers=call.headers, body=call.body),
        policy,
        limits,
        # Test hooks only: the broker never puts these keys into a context.
        resolver=context.get("egress_resolver"),
        verify=context.get("egress_verify"),
        audit=audit if isinstance(audit, dict) else None,
    )
    return {
        "success": True,
        "data": {
            "status": response.status,
            "headers": [[name, value] for name, value in response.headers],
            "body": response.body,
        },
    }
