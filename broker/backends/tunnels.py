"""Broker-side TCP tunnels for a Pack's HTTPS proxy: CONNECT carried over NATS.

The `network` handler's `open` op vets a host and port exactly like a fetch (grant, one resolution,
address rules) and connects to the vetted address; `send`, `recv` and `close` then move bytes on
that connection. A tunnel goes to port 443 only, unless the grant sets `plaintext_tunnel`
(`EgressPolicy.check_tunnel`): on 443 its first bytes must be TLS naming the host, while on any
other port a Pack could write plaintext with whatever `Host:` header it likes to a granted address.
Everything about a tunnel lives here:

- `TunnelTable`: the open tunnels of one event loop, keyed by (pack_id, tunnel id), so a Pack can
  never name another Pack's tunnel. It bounds tunnels per Pack, bytes and lifetime per tunnel, closes
  idle ones, and completes each tunnel's audit record exactly once, when it closes.
- `check_first_flight`: the first bytes a Pack sends are held until they are known to be either a TLS
  ClientHello whose server name (SNI) is the tunnel's host, or (on a port other than 443, which
  only a `plaintext_tunnel` grant opens) not TLS.
- `parse_client_hello`: a strict reader of TLS records carrying a ClientHello (fragments included).

Errors are `broker.core.errors.RequestError` subclasses with messages safe to show the Pack::

    Denied          SNI differs from the host, no SNI for a name, not TLS on 443, ECH, grant narrowed,
                    a port other than 443 without `plaintext_tunnel`
    InvalidRequest  bad host or port, no such tunnel (closed, never opened, another Pack's)
    TooLarge        a chunk or the tunnel's byte cap exceeded
    HandlerFailed   the remote side refused, failed or stalled
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from broker.backends.egress import (
    MAX_ADDRESSES_TRIED,
    TLS_TUNNEL_PORT,
    Destination,
    EgressPolicy,
    IPAddress,
    parse_destination,
)
from broker.core.errors import Denied, HandlerFailed, InvalidRequest, RateLimited, RequestError, TooLarge

__all__ = [
    "MAX_CHUNK_BYTES",
    "MAX_FIRST_FLIGHT_BYTES",
    "MAX_WAIT_SECONDS",
    "ClientHello",
    "FirstFlight",
    "FirstFlightRefused",
    "MalformedClientHello",
    "OutcomeRecorder",
    "Tunnel",
    "TunnelLimits",
    "TunnelTable",
    "check_first_flight",
    "open_target",
    "parse_client_hello",
    "tunnel_destination",
    "tunnel_table",
]

log = logging.getLogger("rumi.broker.tunnel")

MAX_CHUNK_BYTES = 1024 * 1024  # one send or recv; well under the 8 MiB NATS payload
MAX_WAIT_SECONDS = 20.0  # longest recv long-poll
MAX_FIRST_FLIGHT_BYTES = 64 * 1024  # bytes held while waiting for a complete ClientHello
READ_AHEAD_LIMIT = 512 * 1024  # asyncio pauses reading the remote side at 2x this
DRAIN_TIMEOUT = 20.0
REAP_INTERVAL = 0.5
GRANT_RECHECK_INTERVAL = 1.0
TUNNEL_ID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9._-]{1,253}$")
_V6_HOST_RE = re.compile(r"^\[?[0-9A-Fa-f:.]{2,45}\]?$")

OutcomeRecorder: TypeAlias = Callable[[str, str, dict[str, Any]], Awaitable[None]]
"""`record_outcome(open_request_id, target, fields)` from the broker's handler context."""


# --- TLS ClientHello ------------------------------------------------------------------------------

_TLS_HANDSHAKE = 0x16
_HANDSHAKE_CLIENT_HELLO = 0x01
_EXT_SERVER_NAME = 0x0000
# Encrypted ClientHello (RFC 9xxx draft-ietf-tls-esni, 0xfe0d) and the older ESNI draft (0xffce):
# the real server name would be hidden from the check, so a tunnel refuses them.
_EXT_HIDDEN_NAME = frozenset({0xFE0D, 0xFFCE})
_MAX_RECORD = 2**14 + 256


class MalformedClientHello(ValueError):
    """The bytes start like TLS but are no well-formed ClientHello; the message says where."""


@dataclass(frozen=True)
class ClientHello:
    """What the check needs from a ClientHello: its server name (normalised) and whether it hides one."""

    server_name: str | None  # lowercase, no trailing dot; None when the hello carries no SNI
    hides_server_name: bool  # offers ECH/ESNI
    length: int  # bytes of records the hello occupied


def _u16(data: bytes | bytearray, at: int) -> int:
    return (data[at] << 8) | data[at + 1]


def _server_name(ext: bytes | bytearray) -> str:
    """The one host_name of a server_name extension body; MalformedClientHello if not exactly one."""
    if len(ext) < 2 or _u16(ext, 0) != len(ext) - 2:
        raise MalformedClientHello("server_name extension has a wrong length")
    at, names = 2, []
    while at < len(ext):
        if at + 3 > len(ext):
            raise MalformedClientHello("server_name entry is truncated")
        kind, size = ext[at], _u16(ext, at + 1)
        raw = bytes(ext[at + 3 : at + 3 + size])
        if kind != 0 or len(raw) != size or size == 0:
            raise MalformedClientHello("server_name entry is not one non-empty host_name")
        names.append(raw)
        at += 3 + size
    if len(names) != 1:
        raise MalformedClientHello("server_name extension must carry exactly one host name")
    try:
        text = names[0].decode("ascii")
    except UnicodeDecodeError:
        raise MalformedClientHello("server name is not ASCII (IDNs travel as xn-- labels)") from None
    if not _HOST_RE.match(text):
        raise MalformedClientHello("server name has characters a host name cannot have")
    text = text.lower()
    return text[:-1] if text.endswith(".") else text


def _parse_hello_body(body: bytes | bytearray) -> tuple[str | None, bool]:
    at = 2 + 32  # legacy_version, random
    if len(body) < at + 1:
        raise MalformedClientHello("ClientHello is truncated")
    at += 1 + body[at]  # session id
    if len(body) < at + 2:
        raise MalformedClientHello("ClientHello is truncated")
    suites = _u16(body, at)
    if suites == 0 or suites % 2:
        raise MalformedClientHello("ClientHello cipher suites are malformed")
    at += 2 + suites
    if len(body) < at + 1:
        raise MalformedClientHello("ClientHello is truncated")
    at += 1 + body[at]  # compression methods
    if at == len(body):
        return None, False  # no extensions at all: no SNI
    if len(body) < at + 2 or _u16(body, at) != len(body) - at - 2:
        raise MalformedClientHello("ClientHello extensions have a wrong length")
    at += 2
    seen: set[int] = set()
    name: str | None = None
    hidden = False
    while at < len(body):
        if at + 4 > len(body):
            raise MalformedClientHello("ClientHello extension is truncated")
        kind, size = _u16(body, at), _u16(body, at + 2)
        ext = body[at + 4 : at + 4 + size]
        if len(ext) != size:
            raise MalformedClientHello("ClientHello extension is truncated")
        if kind in seen:
            raise MalformedClientHello(f"ClientHello repeats extension {kind}")
        seen.add(kind)
        if kind == _EXT_SERVER_NAME:
            name = _server_name(ext)
        elif kind in _EXT_HIDDEN_NAME:
            hidden = True
        at += 4 + size
    return name, hidden


def parse_client_hello(data: bytes | bytearray) -> ClientHello | None:
    """The ClientHello at the start of `data` (TLS records, possibly fragmented), or None if incomplete.

    Raises `MalformedClientHello` when the bytes cannot be the start of a TLS ClientHello: a record
    that is not a handshake record, a wrong record version or length, another handshake message, a
    repeated extension, a server_name that is not exactly one ASCII host name.
    """
    at = 0
    handshake = bytearray()
    while True:
        if len(data) - at < 5:
            return None
        if data[at] != _TLS_HANDSHAKE:
            raise MalformedClientHello("a TLS record before the ClientHello is not a handshake record")
        if data[at + 1] != 3 or data[at + 2] > 4:
            raise MalformedClientHello("TLS record version is not 3.x")
        size = _u16(data, at + 3)
        if size == 0 or size > _MAX_RECORD:
            raise MalformedClientHello("TLS record length is out of range")
        if len(data) - at - 5 < size:
            _hello_length(handshake + data[at + 5 :])  # refuse a bad header before waiting for more
            return None
        handshake += data[at + 5 : at + 5 + size]
        at += 5 + size
        length = _hello_length(handshake)
        if length is not None and len(handshake) >= 4 + length:
            name, hidden = _parse_hello_body(handshake[4 : 4 + length])
            return ClientHello(server_name=name, hides_server_name=hidden, length=at)


def _hello_length(handshake: bytes | bytearray) -> int | None:
    """The ClientHello body length from the handshake header (None until 4 bytes are there)."""
    if len(handshake) < 4:
        return None
    if handshake[0] != _HANDSHAKE_CLIENT_HELLO:
        raise MalformedClientHello("the first handshake message is not a ClientHello")
    length = (handshake[1] << 16) | _u16(handshake, 2)
    if length > MAX_FIRST_FLIGHT_BYTES:
        raise MalformedClientHello("ClientHello is larger than the tunnel accepts")
    return length


class FirstFlight(enum.Enum):
    """Verdict on the bytes a Pack sent first on a tunnel."""

    NEED_MORE = "need_more"  # hold them; a ClientHello is still incomplete
    FORWARD = "forward"  # forward them and stop inspecting


class FirstFlightRefused(Denied):
    """`check_first_flight` refused; `reason` is the audit word for it."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_first_flight(
    data: bytes | bytearray, host: str, host_is_ip: bool, port: int, *, final: bool = False
) -> FirstFlight:
    """Decide on a tunnel's first bytes; raise `Denied` (a `FirstFlightRefused`) to refuse them.

    Rules: bytes starting with 0x16 (a TLS handshake record) must be a well-formed ClientHello; its
    SNI must equal the tunnel host (case-insensitive, trailing dot ignored); a hello without SNI is
    allowed only when the host is an IP literal; a hello offering ECH/ESNI is refused. On port 443
    the first bytes must be TLS. Other bytes on other ports pass (plain protocols: such a tunnel
    opens only under a `plaintext_tunnel` grant). `final` means no
    more bytes will come (the Pack sent EOF), so an incomplete hello is refused.
    """
    if not data:
        return FirstFlight.FORWARD if final else FirstFlight.NEED_MORE
    if data[0] != _TLS_HANDSHAKE:
        if port == TLS_TUNNEL_PORT:
            raise FirstFlightRefused(
                f"port {TLS_TUNNEL_PORT} tunnels carry TLS only; the first bytes were not a TLS ClientHello",
                "not_tls",
            )
        return FirstFlight.FORWARD
    try:
        hello = parse_client_hello(data)
    except MalformedClientHello as exc:
        raise FirstFlightRefused(f"refused: {exc}", "bad_client_hello") from None
    if hello is None:
        if final or len(data) >= MAX_FIRST_FLIGHT_BYTES:
            raise FirstFlightRefused(
                "refused: the TLS ClientHello is incomplete or too large", "bad_client_hello"
            )
        return FirstFlight.NEED_MORE
    if hello.hides_server_name:
        raise FirstFlightRefused(
            "refused: the ClientHello offers encrypted ClientHello (ECH), which would hide the server name",
            "sni_hidden",
        )
    if hello.server_name is None:
        if host_is_ip:
            return FirstFlight.FORWARD
        raise FirstFlightRefused(
            f"refused: the TLS ClientHello names no server (SNI); a tunnel to {host} must send SNI {host}",
            "sni_missing",
        )
    if hello.server_name != host:
        raise FirstFlightRefused(
            f"refused: TLS server name {hello.server_name[:100]} does not match the tunnel host {host}",
            "sni_mismatch",
        )
    return FirstFlight.FORWARD


# --- destinations ---------------------------------------------------------------------------------


def tunnel_destination(host: object, port: object) -> Destination:
    """The typed destination of `open {host, port}` (same normalisation as a fetch URL); bad input raises."""
    if type(port) is not int or not 1 <= port <= 65535:
        raise InvalidRequest("port must be an integer 1-65535")
    if not isinstance(host, str) or not host:
        raise InvalidRequest("host must be a non-empty string")
    if _HOST_RE.match(host):
        authority = host
    elif _V6_HOST_RE.match(host):
        authority = host if host.startswith("[") else f"[{host}]"
    else:
        raise InvalidRequest("host must be a host name or an IP address (no scheme, port, path or user info)")
    # One parser for tunnels and fetches: the same refusals (numeric names, zone ids, ...) apply.
    return parse_destination(f"https://{authority}:{port}/")


def open_target(host: object, port: object) -> str:
    """`host:port` of an `open` request for the audit record; never raises."""
    try:
        return tunnel_destination(host, port).target
    except RequestError:
        return "invalid host"


# --- limits ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TunnelLimits:
    """Caps for tunnels (the scope's `default_config`, overridable per grant)."""

    idle_timeout: float = 60.0  # no byte moved either way for this long: closed
    max_tunnels: int = 8  # open at once per Pack
    max_bytes: int = 1024 * 1024 * 1024  # per tunnel, both directions together
    max_seconds: float = 3600.0  # lifetime of one tunnel
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not (self.idle_timeout > 0 and self.max_seconds > 0 and self.connect_timeout > 0):
            raise ValueError("tunnel timeouts must be positive")
        if self.max_tunnels < 0 or self.max_bytes < 0:
            raise ValueError("tunnel limits must not be negative")

    @classmethod
    def from_grant(cls, grant: Mapping[str, Any]) -> TunnelLimits:
        """Grant (over scope) values, else the built-in defaults above."""
        base = cls()

        def pick(key: str, default: float) -> Any:
            value = grant.get(key)
            return default if value is None else value

        return cls(
            idle_timeout=float(pick("tunnel_idle_timeout", base.idle_timeout)),
            max_tunnels=int(pick("max_tunnels", base.max_tunnels)),
            max_bytes=int(pick("max_tunnel_bytes", base.max_bytes)),
            max_seconds=float(pick("max_tunnel_seconds", base.max_seconds)),
            connect_timeout=min(float(pick("timeout", base.connect_timeout)), base.connect_timeout),
        )


# --- tunnels --------------------------------------------------------------------------------------


@dataclass(eq=False)
class Tunnel:
    """One open TCP connection to a vetted address, owned by one component of one Pack."""

    tunnel_id: str
    pack_id: str
    component_id: str
    request_id: str  # the audited `open` request; its outcome event is written at close
    dest: Destination
    address: IPAddress
    limits: TunnelLimits
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    record_outcome: OutcomeRecorder
    opened: float
    last_active: float
    still_granted: Callable[[Tunnel], bool] | None = None  # periodic re-check, when the broker offers one
    bytes_up: int = 0
    bytes_down: int = 0
    inspecting: bool = True  # first bytes not yet vetted (SNI rule)
    held: bytearray = field(default_factory=bytearray)
    eof_up: bool = False  # the Pack sent EOF
    eof_down: bool = False  # the remote EOF was handed to the Pack
    closed: bool = False
    reason: str = ""
    last_grant_check: float = 0.0
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    recv_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def host_is_ip(self) -> bool:
        """True when the tunnel was opened to an IP literal (then a ClientHello may omit SNI)."""
        return self.dest.address is not None

    @property
    def bytes_left(self) -> int:
        """Bytes the tunnel may still carry (both directions together)."""
        return self.limits.max_bytes - self.bytes_up - self.bytes_down - len(self.held)


class TunnelTable:
    """The open tunnels of one event loop; see the module docstring. Use `tunnel_table()`."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, reap_interval: float = REAP_INTERVAL
    ) -> None:
        self._clock = clock
        self._reap_interval = reap_interval
        self._tunnels: dict[tuple[str, str], Tunnel] = {}
        self._opening: dict[str, int] = {}
        self._reaper: asyncio.Task[None] | None = None

    # -- lookup ----------------------------------------------------------------------------------
    def open_count(self, pack_id: str) -> int:
        """Tunnels of `pack_id` that are open (or being opened)."""
        return sum(1 for p, _ in self._tunnels if p == pack_id) + self._opening.get(pack_id, 0)

    def get(self, pack_id: str, component_id: str, tunnel_id: object) -> Tunnel:
        """The caller's own open tunnel; InvalidRequest for anything else (never says whose it is)."""
        tunnel = self._tunnels.get((pack_id, tunnel_id)) if isinstance(tunnel_id, str) else None
        if tunnel is None or tunnel.closed or tunnel.component_id != component_id:
            raise InvalidRequest("no such tunnel (closed, timed out or never opened); open a new one")
        return tunnel

    def __len__(self) -> int:
        return len(self._tunnels)

    # -- open ------------------------------------------------------------------------------------
    async def open(
        self,
        *,
        pack_id: str,
        component_id: str,
        request_id: str,
        dest: Destination,
        addresses: Sequence[IPAddress],
        limits: TunnelLimits,
        record_outcome: OutcomeRecorder,
        still_granted: Callable[[Tunnel], bool] | None = None,
    ) -> Tunnel:
        """Connect to the first vetted address that answers and register the tunnel."""
        if self.open_count(pack_id) >= limits.max_tunnels:
            raise Denied(
                f"this Pack already has {limits.max_tunnels} open tunnels (max_tunnels); close one first"
            )
        self._opening[pack_id] = self._opening.get(pack_id, 0) + 1
        try:
            reader, writer, address = await _connect(dest, addresses, limits.connect_timeout)
        finally:
            self._opening[pack_id] -= 1
            if not self._opening[pack_id]:
                del self._opening[pack_id]
        now = self._clock()
        tunnel = Tunnel(
            tunnel_id=secrets.token_urlsafe(18),
            pack_id=pack_id,
            component_id=component_id,
            request_id=request_id,
            dest=dest,
            address=address,
            limits=limits,
            reader=reader,
            writer=writer,
            record_outcome=record_outcome,
            opened=now,
            last_active=now,
            still_granted=still_granted,
            last_grant_check=now,
        )
        self._tunnels[(pack_id, tunnel.tunnel_id)] = tunnel
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="rumi-tunnel-reaper")
        return tunnel

    # -- data ------------------------------------------------------------------------------------
    async def send(self, tunnel: Tunnel, data: bytes, *, eof: bool = False) -> dict[str, Any]:
        """Write `data` (held until the first bytes are vetted); `eof` shuts the sending side."""
        if len(data) > MAX_CHUNK_BYTES:
            raise TooLarge(f"send at most {MAX_CHUNK_BYTES} bytes at a time")
        async with tunnel.send_lock:
            self._check_open(tunnel)
            if tunnel.eof_up:
                raise InvalidRequest("this tunnel's sending side is already shut (eof was sent)")
            if len(data) > tunnel.bytes_left:
                await self.close(tunnel, "byte_cap", abort=True)
                raise TooLarge(f"the tunnel reached its cap of {tunnel.limits.max_bytes} bytes; closed")
            if data:
                tunnel.last_active = self._clock()
            if tunnel.inspecting:
                tunnel.held += data
                try:
                    verdict = check_first_flight(
                        tunnel.held, tunnel.dest.host, tunnel.host_is_ip, tunnel.dest.port, final=eof
                    )
                except FirstFlightRefused as exc:
                    tunnel.held.clear()
                    await self.close(tunnel, exc.reason, abort=True)
                    raise Denied(f"{exc.message}; tunnel closed") from None
                if verdict is FirstFlight.NEED_MORE:
                    return {"held": len(tunnel.held), "closed": False}
                data = bytes(tunnel.held)
                tunnel.held.clear()
                tunnel.inspecting = False
            try:
                if data:
                    tunnel.writer.write(data)
                    await asyncio.wait_for(tunnel.writer.drain(), DRAIN_TIMEOUT)
                    tunnel.bytes_up += len(data)
                if eof:
                    tunnel.eof_up = True
                    if tunnel.writer.can_write_eof():
                        tunnel.writer.write_eof()
            except TimeoutError:
                await self.close(tunnel, "upstream_stalled", abort=True)
                raise HandlerFailed(f"{tunnel.dest.target} stopped reading; tunnel closed") from None
            except (ConnectionError, OSError, RuntimeError):
                await self.close(tunnel, "upstream_error", abort=True)
                raise HandlerFailed(f"the connection to {tunnel.dest.target} failed; tunnel closed") from None
            if tunnel.eof_up and tunnel.eof_down:
                await self.close(tunnel, "eof")
            return {"held": 0, "closed": tunnel.closed}

    async def recv(self, tunnel: Tunnel, max_bytes: int, wait: float) -> dict[str, Any]:
        """Up to `max_bytes` the remote side sent, waiting at most `wait` s for the first byte.

        One `recv` at a time per tunnel: a second while one waits is refused at once, never queued
        (each waiting recv holds one of its Pack's in-flight slots).
        """
        if tunnel.recv_lock.locked():
            raise RateLimited("another recv is already waiting on this tunnel")
        async with tunnel.recv_lock:
            self._check_open(tunnel)
            if tunnel.eof_down:
                return {"data": b"", "eof": True, "closed": False}
            limit = min(max_bytes, MAX_CHUNK_BYTES, tunnel.bytes_left)
            if limit <= 0:
                await self.close(tunnel, "byte_cap", abort=True)
                raise TooLarge(f"the tunnel reached its cap of {tunnel.limits.max_bytes} bytes; closed")
            try:
                # A zero timeout would cancel the read before it looks at the buffer.
                data = await asyncio.wait_for(tunnel.reader.read(limit), max(wait, 0.01))
            except TimeoutError:
                return {"data": b"", "eof": False, "closed": False}
            except (ConnectionError, OSError):
                data = b""
            if data:
                tunnel.bytes_down += len(data)
                tunnel.last_active = self._clock()
                # Closed meanwhile (idle, revoked, close op): hand over what was read, then the end.
                return {"data": data, "eof": tunnel.closed, "closed": tunnel.closed}
            tunnel.eof_down = True
            if tunnel.eof_up and not tunnel.closed:
                await self.close(tunnel, "eof")
            return {"data": b"", "eof": True, "closed": tunnel.closed}

    # -- close -----------------------------------------------------------------------------------
    async def close(self, tunnel: Tunnel, reason: str, *, abort: bool = False) -> None:
        """Close once: drop the connection and complete the `open` request's audit record."""
        if tunnel.closed:
            return
        tunnel.closed = True
        tunnel.reason = reason
        self._tunnels.pop((tunnel.pack_id, tunnel.tunnel_id), None)
        transport = tunnel.writer.transport
        if abort:
            transport.abort()
        else:
            transport.close()
        tunnel.reader.feed_eof()  # wake a long-polling recv now
        fields = {
            "tunnel": tunnel.tunnel_id,
            "bytes_up": tunnel.bytes_up,
            "bytes_down": tunnel.bytes_down,
            "duration_ms": round((self._clock() - tunnel.opened) * 1000, 3),
            "reason": reason,
            "address": str(tunnel.address),
        }
        try:
            await tunnel.record_outcome(tunnel.request_id, tunnel.dest.target, fields)
        except Exception:
            log.exception("could not record the close of tunnel %s", tunnel.tunnel_id)

    async def close_all(self, reason: str = "broker_stopping") -> None:
        """Close every tunnel (broker shutdown)."""
        for tunnel in list(self._tunnels.values()):
            await self.close(tunnel, reason, abort=True)

    def _check_open(self, tunnel: Tunnel) -> None:
        if tunnel.closed:
            raise InvalidRequest("no such tunnel (closed, timed out or never opened); open a new one")

    async def check_granted(self, tunnel: Tunnel, policy: EgressPolicy) -> None:
        """Close the tunnel and raise Denied if the current grant no longer covers its destination
        (host, port, address, and the plaintext rule for a port other than 443)."""
        try:
            policy.check_tunnel(tunnel.dest)
            policy.check_addresses(tunnel.dest, (tunnel.address,))
        except RequestError:
            await self.close(tunnel, "revoked", abort=True)
            raise Denied(f"the grant no longer covers {tunnel.dest.target}; tunnel closed") from None

    async def _reap(self) -> None:
        """Close idle, expired and (when the broker can tell) revoked tunnels; ends when none are left."""
        while self._tunnels:
            await asyncio.sleep(self._reap_interval)
            now = self._clock()
            for tunnel in list(self._tunnels.values()):
                try:
                    reason = self._expired(tunnel, now)
                    if reason is not None:
                        await self.close(tunnel, reason, abort=True)
                except Exception:
                    log.exception("tunnel reaper failed on tunnel %s", tunnel.tunnel_id)

    def _expired(self, tunnel: Tunnel, now: float) -> str | None:
        if now - tunnel.last_active >= tunnel.limits.idle_timeout:
            return "idle"
        if now - tunnel.opened >= tunnel.limits.max_seconds:
            return "max_seconds"
        if tunnel.still_granted is not None and now - tunnel.last_grant_check >= GRANT_RECHECK_INTERVAL:
            tunnel.last_grant_check = now
            if not tunnel.still_granted(tunnel):
                return "revoked"
        return None


async def _connect(
    dest: Destination, addresses: Sequence[IPAddress], timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, IPAddress]:
    """TCP to the first vetted address that answers; never a name, never a second lookup."""
    why = "host unreachable"
    for address in tuple(addresses)[:MAX_ADDRESSES_TRIED]:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(str(address), dest.port, limit=READ_AHEAD_LIMIT), timeout
            )
        except TimeoutError:
            why = "no answer in time"
            continue
        except ConnectionRefusedError:
            why = "connection refused"
            continue
        except OSError:
            why = "host unreachable"
            continue
        return reader, writer, address
    raise HandlerFailed(f"could not connect to {dest.target}: {why}")


# One table per event loop: sockets belong to a loop, and tests run several loops in one process.
_TABLES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TunnelTable] = weakref.WeakKeyDictionary()


def tunnel_table() -> TunnelTable:
    """The running event loop's table (created on first use); survives handler reloads."""
    loop = asyncio.get_running_loop()
    table = _TABLES.get(loop)
    if table is None:
        table = _TABLES[loop] = TunnelTable()
    return table
