"""Built-in handler network: the broker performs one HTTP(S) request, or carries a TCP tunnel, for the Pack.

Only hosts in the grant's `allowed_domains` (names, `*.suffix`, `*`, IP literals, CIDRs) are
reached, each on its own port (`api.example.com:443`, `[fd00::5]:8443`) or, for an entry without
one, on the ports in `allowed_ports`. The broker resolves names itself, refuses loopback, private,
link-local, metadata and other special addresses unless an IP/CIDR entry names them, and connects
to exactly the address it checked. Redirects are followed by hand and checked again at every hop.
A CIDR wider than /8 (/16 for IPv6), or one covering loopback, link-local, metadata addresses or
Rumi's own Docker address pool, needs `"allow_wide_networks": true`; a tunnel to a port other than
443 needs `"plaintext_tunnel": true` (plain `http://` is a fetch: the broker writes its Host header).
Fetches live in `broker.backends.egress`, tunnels in `broker.backends.tunnels`; see docs/network.md.
The open tunnels are closed by `shutdown()` when the broker stops (their outcome events are written).

Ops (`op`, default "fetch"):

- `fetch {method, url, headers = {}, body = b"", follow_redirects = True}` →
  `{"status": int, "headers": [[name, value], ...], "body": bytes}` (headers as received, in order,
  repeated names kept; the body as sent by the server, not decompressed).
- `fetch {..., stream: true}` → `{"status", "headers", "stream": id}`: the same request and rules, the
  body left at the server until `read {stream, max_bytes, wait}` → `{"data": bytes, "eof": bool,
  "closed": bool}` hands it over as it arrives (long-poll up to `wait` s); at the end of the body the
  stream closes itself, `close {stream}` ends it early. Bounded by `max_stream_bytes` (64 MiB),
  `max_stream_seconds` (600 s), `stream_idle_timeout` (60 s without a read) and `max_streams` (16 per
  Pack). Audited like a tunnel: the decision at `fetch`, one outcome event when the stream closes.
- `open {host, port}` → `{"tunnel": id}`: same grant and address rules as a fetch, and port 443 only
  unless the grant sets `plaintext_tunnel`; one resolution, then TCP to the vetted address. Audited like any request; its outcome event is written when the
  tunnel closes, with bytes each way, duration and reason.
- `send {tunnel, data, eof = False}` → `{"held": n, "closed": bool}`; `recv {tunnel, max_bytes, wait}`
  → `{"data": bytes, "eof": bool, "closed": bool}` (long-poll up to `wait` s; `closed`: the broker
  has closed the tunnel, no `close` needed); `close {tunnel}` → `{}`. These (and a stream's `read`
  and `close`) continue an audited `open` (or streamed `fetch`) and are not audited one by one
  (errors still are); the grant is checked on each.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec
from msgspec import UNSET, UnsetType

from broker.handler_api import HandlerContext, HandlerFailed, InvalidRequest

if TYPE_CHECKING:
    from broker.handler_api import egress as _egress
    from broker.handler_api import tunnels as _tunnel

# The back-ends are imported inside the functions that use them: loading this file (every `rumi grants`
# loads every handler file) must not load the egress and tunnel modules, asyncio or an HTTP client.

OPS = ("fetch", "open", "send", "recv", "read", "close")
CONTINUATIONS = frozenset({"send", "recv", "read", "close"})
# Which keys each op takes; any other key is a mistake worth a clear error.
_OP_FIELDS = {
    "fetch": frozenset({"op", "method", "url", "headers", "body", "follow_redirects", "stream"}),
    "open": frozenset({"op", "host", "port"}),
    "send": frozenset({"op", "tunnel", "data", "eof"}),
    "recv": frozenset({"op", "tunnel", "max_bytes", "wait"}),
    "read": frozenset({"op", "stream", "max_bytes", "wait"}),
    "close": frozenset({"op", "tunnel", "stream"}),  # exactly one of them
}
_REQUIRED = {
    "fetch": ("method", "url"),
    "open": ("host", "port"),
    "send": ("tunnel",),
    "recv": ("tunnel",),
    "read": ("stream",),
    "close": (),
}


class NetworkArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Request args of every op. UNSET marks a key the request did not give: each op takes only its own."""

    op: str = "fetch"
    method: str | UnsetType | None = UNSET
    url: str | UnsetType | None = UNSET
    headers: dict[str, str] | UnsetType = UNSET
    body: bytes | UnsetType = UNSET
    follow_redirects: bool | UnsetType = UNSET
    stream: bool | str | UnsetType | None = UNSET  # fetch: true to stream the body; read/close: its id
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
    stream: bool | str | None = None
    host: str | None = None
    port: int | None = None
    tunnel: str | None = None
    data: bytes = b""
    eof: bool = False
    max_bytes: int | None = None  # None: the back-end's chunk size (MAX_CHUNK_BYTES, STREAM_CHUNK_BYTES)
    wait: float = 0.0

    @classmethod
    def of(cls, args: NetworkArgs) -> _Call:
        return cls(**{name: getattr(args, name) for name in args.given() if name != "op"}, op=args.op)


class NetworkGrant(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Grant entry; the limits default to the scope's `default_config`."""

    enabled: bool = False
    allowed_domains: list[str] = []
    allowed_ports: list[int] = []
    allow_wide_networks: bool = False
    plaintext_tunnel: bool = False
    max_request_bytes: int | None = None
    max_response_bytes: int | None = None
    timeout: float | None = None
    max_redirects: int | None = None
    tunnel_idle_timeout: float | None = None
    max_tunnels: int | None = None
    max_tunnel_bytes: int | None = None
    max_tunnel_seconds: float | None = None
    max_stream_bytes: int | None = None
    max_stream_seconds: float | None = None
    stream_idle_timeout: float | None = None
    max_streams: int | None = None

    def __post_init__(self) -> None:
        from broker.handler_api import egress as _egress
        from broker.handler_api import tunnels as _tunnel

        # Typing the entries here turns a bad entry (or a wide CIDR without the flag) into a grant-file
        # error at load time. The policy layer adds the workspace's own Docker address pool to the check.
        _egress.EgressPolicy.from_grant(
            self.allowed_domains, self.allowed_ports, allow_wide_networks=self.allow_wide_networks
        )
        grant = msgspec.structs.asdict(self)
        _limits(grant, None)
        _tunnel.TunnelLimits.from_grant(grant)
        _egress.StreamLimits.from_grant(grant)


def _target(args: dict[str, Any]) -> str:
    from broker.handler_api import egress as _egress
    from broker.handler_api import tunnels as _tunnel

    op = args.get("op", "fetch")
    if op == "fetch":
        return _egress.url_target(args.get("url"))
    if op == "open":
        return _tunnel.open_target(args.get("host"), args.get("port"))
    stream = args.get("stream")
    if op in ("read", "close") and stream is not None:
        return (
            f"stream {stream}" if isinstance(stream, str) and _egress.STREAM_ID_RE.match(stream) else "stream"
        )
    tunnel = args.get("tunnel")
    if isinstance(tunnel, str) and _tunnel.TUNNEL_ID_RE.match(tunnel):
        return f"tunnel {tunnel}"
    return "tunnel"


def _continuation(args: dict[str, Any]) -> bool:
    # Data on an open tunnel: the `open` was audited; the broker still checks the grant every time.
    return args.get("op") in CONTINUATIONS


def _opens_session(args: dict[str, Any]) -> bool:
    # A tunnel, or a streamed fetch: the outcome event is written when it closes.
    return args.get("op") == "open" or (args.get("op", "fetch") == "fetch" and args.get("stream") is True)


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
    # `open` starts a tunnel, a `fetch` with `stream: true` a stream: the outcome event is written
    # when it closes.
    "opens_session": _opens_session,
}


def _limits(grant: Mapping[str, Any], broker_timeout: float | None) -> _egress.EgressLimits:
    """Grant (over scope) values, else built-in defaults; never longer than the broker's own timeout."""
    from broker.handler_api import egress as _egress

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
def _typed(
    domains: tuple[str, ...], ports: tuple[int, ...], wide: bool, plaintext: bool
) -> _egress.EgressPolicy:
    from broker.handler_api import egress as _egress

    # Tunnel ops re-check the grant on every chunk: type it once per distinct grant.
    return _egress.EgressPolicy.from_grant(
        domains, ports, allow_wide_networks=wide, plaintext_tunnel=plaintext
    )


def _policy(grant: Mapping[str, Any]) -> _egress.EgressPolicy:
    """The grant's typed policy; ValueError/TypeError when it is invalid."""
    return _typed(
        tuple(grant.get("allowed_domains") or ()),
        tuple(grant.get("allowed_ports") or ()),
        grant.get("allow_wide_networks") is True,
        grant.get("plaintext_tunnel") is True,
    )


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
    if args.op == "fetch" and call.stream is not None and not isinstance(call.stream, bool):
        raise InvalidRequest("`stream` of a fetch is true or false")
    if args.op == "read" and not isinstance(call.stream, str):
        raise InvalidRequest("op 'read' needs `stream`: the id a streamed fetch returned")
    if args.op == "close" and (call.tunnel is None) == (call.stream is None):
        raise InvalidRequest("op 'close' needs exactly one of `tunnel` or `stream`")
    if args.op == "close" and call.stream is not None and not isinstance(call.stream, str):
        raise InvalidRequest("`stream` of a close is the id a streamed fetch returned")
    return call


def authorize(grant: Mapping[str, Any], args: NetworkArgs) -> None:
    """Refuse on the arguments alone: each op's own keys; for fetch and open, an entry covering host and
    port; for open, a port other than 443 only under `plaintext_tunnel`.

    Names are not resolved here (no I/O): the addresses a name resolves to are checked when the
    request is made, and such a late refusal is the request's outcome event.
    """
    from broker.handler_api import egress as _egress
    from broker.handler_api import tunnels as _tunnel

    call = _check_fields(args)
    if call.op not in ("fetch", "open"):
        return  # a continuation: its tunnel's grant is checked on every op in execute
    try:
        policy = _policy(grant)
    except (ValueError, TypeError):
        raise HandlerFailed("the network grant is invalid; ask the admin to fix it") from None
    if call.op == "fetch":
        policy.check_destination(_egress.parse_destination(call.url or ""))
    else:
        policy.check_tunnel(_tunnel.tunnel_destination(call.host, call.port))


async def shutdown() -> None:
    """The broker is stopping: close every open tunnel and stream (each writes its outcome event)."""
    from broker.handler_api import egress as _egress
    from broker.handler_api import tunnels as _tunnel

    await _tunnel.tunnel_table().close_all("broker_stopping")
    await _egress.stream_table().close_all("broker_stopping")


async def execute(ctx: HandlerContext, args: NetworkArgs) -> dict[str, Any]:
    """Run one op if the grant allows it."""
    from broker.handler_api import egress as _egress
    from broker.handler_api import tunnels as _tunnel

    call = _check_fields(args)
    grant = ctx.grant
    try:
        policy = _policy(grant)
        limits = _limits(grant, ctx.limits.timeout)
        tunnel_limits = _tunnel.TunnelLimits.from_grant(dict(grant))
        stream_limits = _egress.StreamLimits.from_grant(dict(grant))
    except (ValueError, TypeError):
        raise HandlerFailed("the network grant is invalid; ask the admin to fix it") from None
    if call.op == "fetch" and call.stream is True:
        return await _open_stream(ctx, call, policy, limits, stream_limits)
    if call.op == "fetch":
        return await _fetch(ctx, call, policy, limits)
    if call.op == "read" or (call.op == "close" and call.stream is not None):
        return await _continue_stream(ctx, call, policy, limits)
    if call.op == "open":
        return await _open(ctx, call, policy, tunnel_limits)
    return await _continue(ctx, call, policy, limits)


async def _fetch(
    ctx: HandlerContext, call: _Call, policy: _egress.EgressPolicy, limits: _egress.EgressLimits
) -> dict[str, Any]:
    from broker.handler_api import egress as _egress

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


async def _open_stream(
    ctx: HandlerContext,
    call: _Call,
    policy: _egress.EgressPolicy,
    limits: _egress.EgressLimits,
    stream_limits: _egress.StreamLimits,
) -> dict[str, Any]:
    from broker.handler_api import egress as _egress

    assert call.method is not None and call.url is not None
    if ctx.record_outcome is None:
        raise HandlerFailed("this broker cannot audit streams; upgrade it")
    if not call.follow_redirects:
        limits = dataclasses.replace(limits, max_redirects=0)
    request = _egress.EgressRequest(method=call.method, url=call.url, headers=call.headers, body=call.body)

    async def start() -> Any:
        return await _egress.open_stream(
            request,
            policy,
            limits,
            # One wait for body bytes: a server may be silent between events for as long as the
            # stream may live (the reaper ends it at max_stream_seconds, or when the Pack stops reading).
            read_timeout=stream_limits.max_seconds + 5.0,
            resolver=ctx.resolver,
            verify=ctx.tls_verify,
            audit=ctx.audit,
        )

    stream, response = await _egress.stream_table().open(
        pack_id=ctx.pack_id,
        component_id=ctx.component_id,
        request_id=ctx.request_id,
        target=_egress.url_target(call.url),
        limits=stream_limits,
        record_outcome=ctx.record_outcome,
        notes=ctx.audit,
        start=start,
        still_granted=_still_granted(ctx, _recheck_stream),
    )
    # The outcome event of this request is written once, when the stream closes.
    return {
        "success": True,
        "data": {
            "status": response.status,
            "headers": [[name, value] for name, value in response.headers],
            "stream": stream.stream_id,
        },
    }


def _still_granted(ctx: HandlerContext, recheck: Callable[[Any, Any], None]) -> Any:
    """A periodic revocation check of an open session (tunnel or stream), when the broker offers
    `current_grant()`: the session is still granted while `recheck(policy, session)` raises nothing
    for the current grant's policy."""
    current_grant = ctx.current_grant
    if current_grant is None:
        return None

    def check(session: Any) -> bool:
        try:
            grant = current_grant()
            if not isinstance(grant, Mapping) or grant.get("enabled") is not True:
                return False
            recheck(_policy(grant), session)
        except Exception:
            return False
        return True

    return check


def _recheck_stream(policy: Any, stream: Any) -> None:
    policy.check_destination(stream.dest)
    if stream.address is not None:
        policy.check_addresses(stream.dest, (stream.address,))


def _recheck_tunnel(policy: Any, tunnel: Any) -> None:
    policy.check_tunnel(tunnel.dest)
    policy.check_addresses(tunnel.dest, (tunnel.address,))


def _chunk(ctx: HandlerContext, call: _Call, cap: int, max_wait: float, timeout: float) -> tuple[int, float]:
    """How many bytes one read of a session may return and how long it may wait for them."""
    if call.max_bytes is not None and call.max_bytes < 1:
        raise InvalidRequest("max_bytes must be at least 1")
    max_bytes = min(call.max_bytes or cap, cap)
    reply_cap = ctx.limits.max_reply_bytes
    if reply_cap > 0:
        max_bytes = min(max_bytes, max(1, reply_cap - 256))  # data plus the reply's few fields
    # Answer well inside the broker's own deadline, so a long-poll never turns into a timeout.
    return max_bytes, max(0.0, min(call.wait, max_wait, timeout - 2.0))


async def _continue_stream(
    ctx: HandlerContext, call: _Call, policy: _egress.EgressPolicy, limits: _egress.EgressLimits
) -> dict[str, Any]:
    from broker.handler_api import egress as _egress

    table = _egress.stream_table()
    stream = table.get(ctx.pack_id, ctx.component_id, call.stream)
    # The grant may have been narrowed since the fetch: the same check, on the current grant.
    await table.check_granted(stream, policy)
    if call.op == "close":
        await table.close(stream, "closed")
        return {"success": True, "data": {}}
    max_bytes, wait = _chunk(ctx, call, _egress.STREAM_CHUNK_BYTES, _egress.STREAM_MAX_WAIT, limits.timeout)
    return {"success": True, "data": await table.read(stream, max_bytes, wait)}


async def _open(
    ctx: HandlerContext, call: _Call, policy: _egress.EgressPolicy, limits: _tunnel.TunnelLimits
) -> dict[str, Any]:
    from broker.handler_api import egress as _egress
    from broker.handler_api import tunnels as _tunnel

    dest = _tunnel.tunnel_destination(call.host, call.port)
    policy.check_tunnel(dest)
    resolver = ctx.resolver or _egress.resolve_system  # looked up now: tests patch it
    addresses = policy.check_addresses(dest, await _egress.resolve(resolver, dest))
    if ctx.record_outcome is None:
        raise HandlerFailed("this broker cannot audit tunnels; upgrade it")
    table = _tunnel.tunnel_table()
    tunnel = await table.open(
        pack_id=ctx.pack_id,
        component_id=ctx.component_id,
        request_id=ctx.request_id,
        dest=dest,
        addresses=addresses,
        limits=limits,
        record_outcome=ctx.record_outcome,
        still_granted=_still_granted(ctx, _recheck_tunnel),
    )
    # No `audit` fields here: the outcome event of this request is written once, at close.
    return {"success": True, "data": {"tunnel": tunnel.tunnel_id}}


async def _continue(
    ctx: HandlerContext, call: _Call, policy: _egress.EgressPolicy, limits: _egress.EgressLimits
) -> dict[str, Any]:
    from broker.handler_api import tunnels as _tunnel

    table = _tunnel.tunnel_table()
    tunnel = table.get(ctx.pack_id, ctx.component_id, call.tunnel)
    # The grant may have been narrowed since `open`: the same check, on the current grant.
    await table.check_granted(tunnel, policy)
    if call.op == "send":
        return {"success": True, "data": await table.send(tunnel, call.data, eof=call.eof)}
    if call.op == "recv":
        max_bytes, wait = _chunk(ctx, call, _tunnel.MAX_CHUNK_BYTES, _tunnel.MAX_WAIT_SECONDS, limits.timeout)
        return {"success": True, "data": await table.recv(tunnel, max_bytes, wait)}
    await table.close(tunnel, "closed")
    return {"success": True, "data": {}}
