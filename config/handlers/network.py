"""Built-in handler network: the broker performs one HTTP(S) request, or carries a TCP tunnel, for the Pack.

Only hosts in the grant's `allowed_domains` (names, `*.suffix`, `*`, IP literals, CIDRs) and ports
in `allowed_ports` are reached. The broker resolves names itself, refuses loopback, private,
link-local, metadata and other special addresses unless an IP/CIDR entry names them, and connects
to exactly the address it checked. Redirects are followed by hand and checked again at every hop.
Fetches live in `broker.backends.egress`, tunnels in `broker.backends.tunnels`; see docs/network.md.
The open tunnels are closed by `shutdown()` when the broker stops (their outcome events are written).

Ops (`op`, default "fetch"):

- `fetch {method, url, headers = {}, body = b"", follow_redirects = True}` →
  `{"status": int, "headers": [[name, value], ...], "body": bytes}` (headers as received, in order,
  repeated names kept; the body as sent by the server, not decompressed).
- `open {host, port}` → `{"tunnel": id}`: same grant and address rules as a fetch; one resolution,
  then TCP to the vetted address. Audited like any request; its outcome event is written when the
  tunnel closes, with bytes each way, duration and reason.
- `send {tunnel, data, eof = False}` → `{"held": n, "closed": bool}`; `recv {tunnel, max_bytes, wait}`
  → `{"data": bytes, "eof": bool, "closed": bool}` (long-poll up to `wait` s; `closed`: the broker
  has closed the tunnel, no `close` needed); `close {tunnel}` → `{}`. These continue
  an audited `open` and are not audited one by one (errors still are); the grant is checked on each.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from broker.handler_api import HandlerContext, HandlerFailed, InvalidRequest
from broker.handler_api import egress as _egress
from broker.handler_api import tunnels as _tunnel

OPS = ("fetch", "open", "send", "recv", "close")
CONTINUATIONS = frozenset({"send", "recv", "close"})
# Which keys each op takes; any other key is a mistake worth a clear error.
_OP_FIELDS = {
    "fetch": frozenset({"op", "method", "url", "headers", "body", "follow_redirects"}),
    "open": frozenset({"op", "host", "port"}),
    "send": frozenset({"op", "tunnel", "data", "eof"}),
    "recv": frozenset({"op", "tunnel", "max_bytes", "wait"}),
    "close": frozenset({"op", "tunnel"}),
}
_REQUIRED = {"fetch": ("method", "url"), "open": ("host", "port"), "send": ("tunnel",),
             "recv": ("tunnel",), "close": ("tunnel",)}


class NetworkArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Request args of every op. UNSET marks a key the request did not give: each op takes only its own."""

    op: str = "fetch"
    method: str | UnsetType | None = UNSET
    url: str | UnsetType | None = UNSET
    headers: dict[str, str] | UnsetType = UNSET
    body: bytes | UnsetType = UNSET
    follow_redirects: bool | UnsetType = UNSET
    host: str | UnsetType | None = UNSET
    port: int | UnsetType | None = UNSET
    tunnel: str | UnsetType | None = UNSET
    data: bytes | UnsetType = UNSET
    eof: bool | UnsetType = UNSET
    max_bytes: int | UnsetType = UNSET
    wait: float | UnsetType = UNSET

    def given(self) -> list[str]:
        """The keys this request gave (in declaration order)."""
        return [name for name in self.__struct_fields__ if getattr(self, name) is not UNSET]


@dataclasses.dataclass(frozen=True)
class _Call:
    """One op's arguments with the defaults filled in."""

    op: str
    method: str | None = None
    url: str | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    body: bytes = b""
    follow_redirects: bool = True
    host: str | None = None
    port: int | None = None
    tunnel: str | None = None
    data: bytes = b""
    eof: bool = False
    max_bytes: int = _tunnel.MAX_CHUNK_BYTES
    wait: float = 0.0

    @classmethod
    def of(cls, args: NetworkArgs) -> _Call:
        return cls(**{name: getattr(args, name) for name in args.given() if name != "op"}, op=args.op)


class NetworkGrant(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Grant entry; the limits default to the scope's `default_config`."""

    enabled: bool = False
    allowed_domains: list[str] = []
    allowed_ports: list[int] = []
    max_request_bytes: int | None = None
    max_response_bytes: int | None = None
    timeout: float | None = None
    max_redirects: int | None = None
    tunnel_idle_timeout: float | None = None
    max_tunnels: int | None = None
    max_tunnel_bytes: int | None = None
    max_tunnel_seconds: float | None = None

    def __post_init__(self) -> None:
        # Typing the entries here turns a bad entry into a grant-file error at load time.
        _egress.EgressPolicy.from_grant(self.allowed_domains, self.allowed_ports)
        grant = msgspec.structs.asdict(self)
        _limits(grant, None)
        _tunnel.TunnelLimits.from_grant(grant)


def _target(args: dict[str, Any]) -> str:
    op = args.get("op", "fetch")
    if op == "fetch":
        return _egress.url_target(args.get("url"))
    if op == "open":
        return _tunnel.open_target(args.get("host"), args.get("port"))
    tunnel = args.get("tunnel")
    if isinstance(tunnel, str) and _tunnel.TUNNEL_ID_RE.match(tunnel):
        return f"tunnel {tunnel}"
    return "tunnel"


def _continuation(args: dict[str, Any]) -> bool:
    # Data on an open tunnel: the `open` was audited; the broker still checks the grant every time.
    return args.get("op") in CONTINUATIONS


def _opens_session(args: dict[str, Any]) -> bool:
    return args.get("op") == "open"


META: dict[str, Any] = {
    "requires_scope": True,
    "supports_modes": ["sandbox"],
    "description": "HTTP(S) request or TCP tunnel by the broker to a granted host and port; no private "
                   "addresses unless granted by IP/CIDR, no DNS rebinding, redirects checked, TLS "
                   "server name checked on tunnels.",
    "grant_schema": NetworkGrant,
    "args_schema": NetworkArgs,
    "target": _target,
    "continuation": _continuation,
    # `open` starts a tunnel: its outcome event is written when the tunnel closes.
    "opens_session": _opens_session,
}


def _limits(grant: Mapping[str, Any], broker_timeout: float | None) -> _egress.EgressLimits:
    """Grant (over scope) values, else built-in defaults; never longer than the broker's own timeout."""
    base = _egress.EgressLimits()
    configured = grant.get("timeout")
    timeout = base.timeout if configured is None else float(configured)
    if broker_timeout is not None and broker_timeout > 0:
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


@functools.lru_cache(maxsize=256)
def _policy(domains: tuple[str, ...], ports: tuple[int, ...]) -> _egress.EgressPolicy:
    # Tunnel ops re-check the grant on every chunk: type it once per distinct grant.
    return _egress.EgressPolicy.from_grant(domains, ports)


def _check_fields(args: NetworkArgs) -> _Call:
    if args.op not in _OP_FIELDS:
        raise InvalidRequest(f"op {args.op[:20]!r} is not one of {', '.join(OPS)}")
    extra = sorted(k for k in args.given() if k not in _OP_FIELDS[args.op])
    if extra:
        raise InvalidRequest(f"op {args.op!r} does not take `{extra[0]}`")
    call = _Call.of(args)
    missing = [k for k in _REQUIRED[args.op] if getattr(call, k) is None]
    if missing:
        raise InvalidRequest(f"op {args.op!r} needs `{missing[0]}`")
    return call


def authorize(grant: Mapping[str, Any], args: NetworkArgs) -> None:
    """Refuse on the arguments alone: each op's own keys; for fetch and open, host and port in the grant.

    Names are not resolved here (no I/O): the addresses a name resolves to are checked when the
    request is made, and such a late refusal is the request's outcome event.
    """
    call = _check_fields(args)
    if call.op not in ("fetch", "open"):
        return  # a continuation: its tunnel's grant is checked on every op in execute
    try:
        policy = _policy(tuple(grant.get("allowed_domains") or ()), tuple(grant.get("allowed_ports") or ()))
    except (ValueError, TypeError):
        raise HandlerFailed("the network grant is invalid; ask the admin to fix it") from None
    if call.op == "fetch":
        policy.check_destination(_egress.parse_destination(call.url or ""))
    else:
        policy.check_destination(_tunnel.tunnel_destination(call.host, call.port))


async def shutdown() -> None:
    """The broker is stopping: close every open tunnel (each writes its outcome event)."""
    await _tunnel.tunnel_table().close_all("broker_stopping")


async def execute(ctx: HandlerContext, args: NetworkArgs) -> dict[str, Any]:
    """Run one op if the grant allows it."""
    call = _check_fields(args)
    grant = ctx.grant
    try:
        policy = _policy(tuple(grant.get("allowed_domains") or ()), tuple(grant.get("allowed_ports") or ()))
        limits = _limits(grant, ctx.limits.timeout)
        tunnel_limits = _tunnel.TunnelLimits.from_grant(dict(grant))
    except (ValueError, TypeError):
        raise HandlerFailed("the network grant is invalid; ask the admin to fix it") from None
    if call.op == "fetch":
        return await _fetch(ctx, call, policy, limits)
    if call.op == "open":
        return await _open(ctx, call, policy, tunnel_limits)
    return await _continue(ctx, call, policy, limits)


async def _fetch(ctx: HandlerContext, call: _Call, policy: _egress.EgressPolicy,
                 limits: _egress.EgressLimits) -> dict[str, Any]:
    assert call.method is not None and call.url is not None
    if not call.follow_redirects:
        limits = dataclasses.replace(limits, max_redirects=0)  # the caller (a proxy client) follows them
    response = await _egress.fetch(
        _egress.EgressRequest(method=call.method, url=call.url, headers=call.headers, body=call.body),
        policy,
        limits,
        # Test hooks only: the broker leaves them None.
        resolver=ctx.resolver,
        verify=ctx.tls_verify,
        audit=ctx.audit,
    )
    return {
        "success": True,
        "data": {
            "status": response.status,
            "headers": [[name, value] for name, value in response.headers],
            "body": response.body,
        },
    }


async def _open(ctx: HandlerContext, call: _Call, policy: _egress.EgressPolicy,
                limits: _tunnel.TunnelLimits) -> dict[str, Any]:
    dest = _tunnel.tunnel_destination(call.host, call.port)
    policy.check_destination(dest)
    resolver = ctx.resolver or _egress.resolve_system  # looked up now: tests patch it
    addresses = policy.check_addresses(dest, await _egress.resolve(resolver, dest))
    if ctx.record_outcome is None:
        raise HandlerFailed("this broker cannot audit tunnels; upgrade it")
    table = _tunnel.tunnel_table()
    tunnel = await table.open(
        pack_id=ctx.pack_id, component_id=ctx.component_id,
        request_id=ctx.request_id, dest=dest, addresses=addresses, limits=limits,
        record_outcome=ctx.record_outcome, still_granted=_still_granted(ctx),
    )
    # No `audit` fields here: the outcome event of this request is written once, at close.
    return {"success": True, "data": {"tunnel": tunnel.tunnel_id}}


def _still_granted(ctx: HandlerContext) -> Any:
    """A periodic revocation check, when the broker offers `current_grant()` (None once revoked)."""
    current_grant = ctx.current_grant
    if current_grant is None:
        return None

    def check(tunnel: Any) -> bool:
        try:
            grant = current_grant()
            if not isinstance(grant, Mapping) or grant.get("enabled") is not True:
                return False
            policy = _policy(tuple(grant.get("allowed_domains") or ()), tuple(grant.get("allowed_ports") or ()))
            policy.check_destination(tunnel.dest)
            policy.check_addresses(tunnel.dest, (tunnel.address,))
        except Exception:
            return False
        return True

    return check


async def _continue(ctx: HandlerContext, call: _Call, policy: _egress.EgressPolicy,
                    limits: _egress.EgressLimits) -> dict[str, Any]:
    table = _tunnel.tunnel_table()
    tunnel = table.get(ctx.pack_id, ctx.component_id, call.tunnel)
    # The grant may have been narrowed since `open`: the same check, on the current grant.
    await table.check_granted(tunnel, policy)
    if call.op == "send":
        return {"success": True, "data": await table.send(tunnel, call.data, eof=call.eof)}
    if call.op == "recv":
        if call.max_bytes < 1:
            raise InvalidRequest("max_bytes must be at least 1")
        max_bytes = call.max_bytes
        reply_cap = ctx.limits.max_reply_bytes
        if reply_cap > 0:
            max_bytes = min(max_bytes, max(1, reply_cap - 256))  # data plus the reply's few fields
        # Answer well inside the broker's own deadline, so a long-poll never turns into a timeout.
        wait = max(0.0, min(call.wait, _tunnel.MAX_WAIT_SECONDS, limits.timeout - 2.0))
        return {"success": True, "data": await table.recv(tunnel, max_bytes, wait)}
    await table.close(tunnel, "closed")
    return {"success": True, "data": {}}
