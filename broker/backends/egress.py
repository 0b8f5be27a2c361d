"""Broker-side HTTP(S) egress: one request for a Pack, to a granted host and port only.

The `network` handler (config/handlers/network.py) is a thin shell around `fetch`. The rules:

- A grant is typed once (Deno style): each `allowed_domains` entry becomes a `HostEntry`
  (`AnyHost`, `HostName`, `SubdomainsOf`, `Address`, `Network`), names lowercased, trailing dot
  removed, IDNA (UTS #46) to A-labels, IPv4-mapped IPv6 to IPv4. An entry may carry its own port
  (`api.example.com:443`, `[fd00::5]:8443`); one without takes the ports in `allowed_ports`. A
  request becomes a typed `Destination` the same way, so matching is plain comparison: one entry
  must cover both the host and the port.
- A CIDR wider than /8 (/16 for IPv6), or covering loopback, link-local or metadata addresses (or
  networks the caller reserves: Rumi's own Docker pool), is refused unless the grant sets
  `allow_wide_networks` (`wide_network_reason`). A tunnel (`EgressPolicy.check_tunnel`) goes to port
  443 only unless the grant sets `plaintext_tunnel`.
- The URL is parsed exactly once, by `httpx.URL` (the parser of the client that sends it); host and
  port for the check come from that object, and the same object is sent. Only `http`/`https`; user
  info, backslashes, control characters, odd ports and numeric hosts in non-dotted forms are refused.
- The broker resolves the name itself (an injectable `Resolver`), refuses loopback, private,
  link-local, CGNAT, multicast, reserved, documentation and cloud-metadata addresses (also when
  embedded in NAT64/6to4/IPv4-mapped forms) unless an IP or CIDR grant entry covers that exact
  address, and then connects to the address it checked: `PinnedBackend` is an httpcore network
  backend that dials only the vetted addresses of the one vetted origin, while the Host header, TLS
  SNI and certificate check use the original host name. There is no second DNS lookup to rebind.
  `PinnedBackend` and `PinnedTransport` live in `broker.backends.pinned`; this module imports it, and
  httpx, httpcore, ssl and asyncio, only inside the functions that parse a URL, send a request or run
  a stream, so typing a grant (every handler file is loaded at `rumi grants`) loads no HTTP client.
- Redirects are followed by hand, each hop checked again (scheme, grant, port, fresh resolution).
- No proxy variables, no cookie jar, no automatic decompression: the transport is called directly.
- `open_stream` is `fetch` with the final body left unread; `StreamTable` (one per event loop) then
  hands it to the Pack as it arrives (`read`), bounded per stream by `StreamLimits` (bytes, lifetime,
  idle time, streams per Pack) and re-checked against the current grant, and writes the request's
  outcome event once, when the stream closes (like a tunnel).

Errors are `broker.core.errors.RequestError` subclasses with messages safe to show the Pack::

    Denied          host, port, scheme or address not allowed (redirect hops included)
    InvalidRequest  malformed URL, method or header
    TooLarge        request or response body over its cap
    Timeout         the whole exchange took longer than `EgressLimits.timeout`
    HandlerFailed   the remote side failed: no DNS answer, connection or TLS failure, bad HTTP
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import ipaddress
import logging
import re
import secrets
import socket
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio

from broker.core.errors import (
    Denied,
    HandlerFailed,
    InvalidRequest,
    RateLimited,
    RequestError,
    Timeout,
    TooLarge,
    Unavailable,
)

if TYPE_CHECKING:  # imported where a request is sent: see the module docstring
    import asyncio
    import ssl

    import httpx
    from anyio.lowlevel import RunVar

    from broker.backends.pinned import PinnedBackend, PinnedTransport

__all__ = [
    "Address",
    "AnyHost",
    "Destination",
    "EgressLimits",
    "EgressPolicy",
    "EgressRequest",
    "EgressResponse",
    "HostEntry",
    "HostName",
    "IPAddress",
    "IPNetwork",
    "Network",
    "OpenedStream",
    "PinnedBackend",
    "PinnedTransport",
    "Resolver",
    "ResponseStream",
    "StreamLimits",
    "StreamTable",
    "SubdomainsOf",
    "destination_of",
    "fetch",
    "normalize_address",
    "normalize_host_name",
    "open_stream",
    "parse_destination",
    "parse_host_entry",
    "refusal_reason",
    "resolve",
    "resolve_system",
    "stream_table",
    "url_target",
    "wide_network_reason",
    "with_port",
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver: TypeAlias = Callable[[str, int], Awaitable[Sequence[str | IPAddress]] | Sequence[str | IPAddress]]
"""`resolve(host, port) -> addresses` (sync or async); the default is `resolve_system`."""

DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_URL_CHARS = 8192
MAX_HEADERS = 100
MAX_HEADER_BYTES = 64 * 1024
MAX_ADDRESSES_TRIED = 8
DNS_THREADS = 16
ALLOWED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Framing, routing and connection headers belong to the broker, never to the Pack (Host would pick
# another virtual host behind a granted address; Content-Length/Transfer-Encoding smuggle requests).
FORBIDDEN_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-connection",
        "expect",
        "http2-settings",
    }
)
# The only Pack headers that survive a redirect to another origin: no credentials or API keys.
CROSS_ORIGIN_SAFE_HEADERS = frozenset(
    {
        "accept",
        "accept-encoding",
        "accept-language",
        "cache-control",
        "content-language",
        "content-type",
        "pragma",
        "user-agent",
    }
)
DEFAULT_HEADERS = (("User-Agent", "rumi-broker"), ("Accept", "*/*"))

_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
# WHATWG "ends in a number": such a host is an IPv4 address in some notation, never a name.
_NUMERIC_LABEL_RE = re.compile(r"^(?:[0-9]+|0x[0-9a-f]*)$")
_SCHEME_AUTHORITY_RE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.\-]*:)?//([^/?#]*)")
_AUTHORITY_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\[\]:@]+)(?::([0-9]{1,5}))?$")


# --- addresses ------------------------------------------------------------------------------------


def _rules(pairs: Iterable[tuple[str, str]]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(net), why) for net, why in pairs)


_METADATA = "a cloud metadata address"
# Special-purpose blocks (IANA registries), most specific first so messages say the precise reason.
_V4_RULES = _rules(
    (
        ("169.254.169.254/32", _METADATA),  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
        ("169.254.170.2/32", _METADATA),  # AWS ECS task credentials
        ("100.100.100.200/32", _METADATA),  # Alibaba Cloud
        ("192.0.0.192/32", _METADATA),  # Oracle Cloud
        ("168.63.129.16/32", "a cloud platform address (Azure WireServer)"),  # public, but the host's own
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared address space (CGNAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved (IETF protocol assignments)"),
        ("192.0.2.0/24", "reserved for documentation"),
        ("192.88.99.0/24", "reserved (6to4 relay anycast)"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved for benchmarking"),
        ("198.51.100.0/24", "reserved for documentation"),
        ("203.0.113.0/24", "reserved for documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # includes 255.255.255.255
    )
)
_V6_RULES = _rules(
    (
        ("fd00:ec2::254/128", _METADATA),  # AWS IMDS over IPv6
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "reserved (IPv4-compatible)"),
        ("64:ff9b:1::/48", "reserved (local-use NAT64)"),
        ("100::/64", "reserved (discard-only)"),
        ("2001::/32", "a Teredo tunnel address"),
        ("2001::/23", "reserved (IETF protocol assignments)"),
        ("2001:db8::/32", "reserved for documentation"),
        ("3fff::/20", "reserved for documentation"),
        ("5f00::/16", "reserved (SRv6)"),
        ("fc00::/7", "private (unique local)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "private (site-local)"),
        ("ff00::/8", "multicast"),
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")


def normalize_address(address: IPAddress) -> IPAddress:
    """The address with an IPv4-mapped IPv6 form (`::ffff:a.b.c.d`) turned into IPv4."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def refusal_reason(address: IPAddress) -> str | None:
    """Why a name (or a wildcard) may never reach `address` ("loopback", "private", ...), else None."""
    address = normalize_address(address)
    rules = _V4_RULES if isinstance(address, ipaddress.IPv4Address) else _V6_RULES
    for network, why in rules:
        if address in network:
            return why
    if isinstance(address, ipaddress.IPv4Address):
        # Belt and braces: whatever Python's table knows as not globally reachable stays refused.
        return None if address.is_global else "reserved"
    embedded: ipaddress.IPv4Address | None = None
    kind = ""
    if address in _NAT64:
        embedded, kind = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), "NAT64"
    elif address.sixtofour is not None:
        embedded, kind = address.sixtofour, "6to4"
    if embedded is not None:
        inner = refusal_reason(embedded)
        return None if inner is None else f"{kind} of {embedded}, which is {inner}"
    if address not in _GLOBAL_UNICAST or not address.is_global:
        return "reserved"
    return None


def _parse_ip(text: str) -> IPAddress | None:
    """An IP literal (IPv6 optionally in brackets), normalised; None if `text` is not one."""
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        address = ipaddress.ip_address(inner)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        return None  # zone ids name a local interface: never a destination
    return normalize_address(address)


# --- grant entries --------------------------------------------------------------------------------


def with_port(host: str, port: int | None) -> str:
    """`host` (a name, `*`, an IP or a CIDR) with `port` as an entry writes it: `[v6]:port`, `host:port`."""
    if port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class AnyHost:
    """`*`: every name, and every IP literal whose address is not refused."""

    port: int | None = None  # None: every port in allowed_ports (so for every entry type below)

    def __str__(self) -> str:
        return with_port("*", self.port)


@dataclass(frozen=True)
class HostName:
    """One exact host name, in lowercase A-labels without trailing dot."""

    name: str
    port: int | None = None

    def __str__(self) -> str:
        return with_port(self.name, self.port)


@dataclass(frozen=True)
class SubdomainsOf:
    """`*.suffix`: any name below `suffix`, at any depth, but not `suffix` itself."""

    suffix: str
    port: int | None = None

    def __str__(self) -> str:
        return with_port(f"*.{self.suffix}", self.port)


@dataclass(frozen=True)
class Address:
    """One IP address; the only way (with `Network`) to reach a refused address."""

    address: IPAddress
    port: int | None = None

    def __str__(self) -> str:
        return with_port(str(self.address), self.port)


@dataclass(frozen=True)
class Network:
    """A CIDR block; it covers IP-literal URLs and resolved addresses inside it."""

    network: IPNetwork
    port: int | None = None

    def __str__(self) -> str:
        return with_port(str(self.network), self.port)


HostEntry: TypeAlias = AnyHost | HostName | SubdomainsOf | Address | Network


def _check_name_syntax(name: str) -> str | None:
    """Why `name` (lowercase A-labels, no trailing dot) is not a usable host name, else None."""
    if not name:
        return "is empty"
    if len(name) > 253:
        return "is longer than 253 characters"
    labels = name.split(".")
    if any(not _LABEL_RE.match(label) for label in labels):
        return "is not a valid host name (letters, digits, '-', '_' and dots only)"
    if _NUMERIC_LABEL_RE.match(labels[-1]):
        return "looks like an IP address in a non-standard notation; write IPv4 as four decimal numbers"
    return None


def normalize_host_name(text: str) -> str:
    """`text` as lowercase A-labels without trailing dot (IDNA UTS #46); ValueError if it is no name."""
    name = text[:-1] if text.endswith(".") else text
    if name.isascii():
        name = name.lower()
    else:
        import idna  # only for non-ASCII names

        try:
            name = idna.encode(name, uts46=True, transitional=False).decode("ascii")
        except idna.IDNAError as exc:
            raise ValueError(f"host name {text!r} is not a valid internationalised name: {exc}") from None
    problem = _check_name_syntax(name)
    if problem is not None:
        raise ValueError(f"host name {text!r} {problem}")
    return name


def _entry_port(digits: str, text: str) -> int:
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 5 and 1 <= int(digits) <= 65535):
        raise ValueError(f"allowed_domains entry {text!r}: the port must be a number 1-65535")
    return int(digits)


def _split_entry_port(entry: str, text: str) -> tuple[str, int | None, bool]:
    """(host part, port or None, bracketed) of an entry: `[v6]:port`, `[v6]`, `host:port` or `host`.

    An IPv6 address or CIDR without brackets never carries a port (`::1:443` is an address).
    """
    if entry.startswith("["):
        close = entry.find("]")
        if close < 0:
            raise ValueError(f"allowed_domains entry {text!r} opens '[' without closing it")
        host, rest = entry[1:close], entry[close + 1 :]
        if ":" not in host:
            raise ValueError(f"allowed_domains entry {text!r}: brackets are for IPv6 only")
        if not rest:
            return host, None, True
        if not rest.startswith(":"):
            raise ValueError(f"allowed_domains entry {text!r}: write [IPv6]:port")
        return host, _entry_port(rest[1:], text), True
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, _entry_port(port, text), False
    return entry, None, False


def parse_host_entry(text: str) -> HostEntry:
    """One `allowed_domains` entry as a typed, normalised `HostEntry`; ValueError says what is wrong.

    Any entry may carry one port (`api.example.com:443`, `*.example.com:8443`, `10.0.0.5:8080`,
    `10.0.0.0/24:8080`, `[fd00::5]:8443`, `[fd00::/64]:8443`, `*:443`): it then matches that port
    only, whatever `allowed_ports` says. Without a port it matches every port in `allowed_ports`.
    """
    entry = text.strip()
    if not entry:
        raise ValueError("an allowed_domains entry is empty")
    if "://" in entry:
        raise ValueError(f"allowed_domains entry {text!r} is a URL; give only the host name (and :port)")
    host, port, bracketed = _split_entry_port(entry, text)
    if host == "*":
        return AnyHost(port)
    if "/" in host:
        try:
            net = ipaddress.ip_network(host, strict=False)
        except ValueError:
            hint = "; write an IPv6 CIDR with a port as [fd00::/64]:443" if host.count(":") > 1 else ""
            raise ValueError(f"allowed_domains entry {text!r} is not a valid CIDR block{hint}") from None
        if (
            isinstance(net, ipaddress.IPv6Network)
            and net.prefixlen >= 96
            and net.network_address.ipv4_mapped is not None
        ):
            mapped = net.network_address.ipv4_mapped
            return Network(ipaddress.IPv4Network((int(mapped), net.prefixlen - 96)), port)
        return Network(net, port)
    address = _parse_ip(host)
    if address is not None:
        return Address(address, port)
    if bracketed or host.count(":") > 1:
        raise ValueError(
            f"allowed_domains entry {text!r} is not a valid IPv6 address (zone ids are not accepted)"
        )
    if host.startswith("*."):
        return SubdomainsOf(normalize_host_name(host[2:]), port)
    if "*" in host:
        raise ValueError(f"allowed_domains entry {text!r}: a wildcard may only be a leading '*.'")
    return HostName(normalize_host_name(host), port)


# --- networks that need `allow_wide_networks` -----------------------------------------------------


def _embeddings(v4: ipaddress.IPv4Network) -> list[ipaddress.IPv6Network]:
    """The IPv6 forms that carry an IPv4 block: IPv4-mapped, NAT64 (64:ff9b::/96) and 6to4 (2002::/16)."""
    base = int(v4.network_address)
    return [
        ipaddress.IPv6Network(((0xFFFF << 32) | base, 96 + v4.prefixlen)),
        ipaddress.IPv6Network((int(_NAT64.network_address) | base, 96 + v4.prefixlen)),
        ipaddress.IPv6Network(((0x2002 << 112) | (base << 80), 16 + v4.prefixlen)),
    ]


_UNSPECIFIED = "the unspecified address, which reaches this host's loopback"
_SENSITIVE_V4 = _rules(
    (
        ("0.0.0.0/32", _UNSPECIFIED),
        ("127.0.0.0/8", "loopback addresses"),
        ("169.254.0.0/16", "link-local and cloud metadata addresses"),
        ("100.100.100.200/32", _METADATA),
        ("192.0.0.192/32", _METADATA),
        ("168.63.129.16/32", "a cloud platform address (Azure WireServer)"),
    )
)
_SENSITIVE_V6: tuple[tuple[IPNetwork, str], ...] = (
    *_rules(
        (
            ("::/128", _UNSPECIFIED),
            ("::1/128", "loopback addresses"),
            ("fe80::/10", "link-local addresses"),
            ("fd00:ec2::254/128", _METADATA),
        )
    ),
    *(
        (embedded, f"{why}, embedded in IPv6")
        for net, why in _SENSITIVE_V4
        if isinstance(net, ipaddress.IPv4Network)
        for embedded in _embeddings(net)
    ),
)
WIDEST_PREFIX = {4: 8, 6: 16}
"""Shortest prefix length a CIDR entry may have without `allow_wide_networks`."""


def wide_network_reason(entry: HostEntry, reserved: Iterable[IPNetwork] = ()) -> str | None:
    """Why `entry` may be granted only with `"allow_wide_networks": true`, else None.

    A CIDR block (of more than one address) needs it when it is wider than /8 (IPv4) or /16 (IPv6)
    or overlaps loopback, link-local or cloud-metadata addresses (also in IPv4-mapped, NAT64 and
    6to4 forms) or one of the `reserved` networks (the caller's: Rumi's own Docker address pool).
    A single address is named on purpose and needs it only when it is the unspecified address
    (`0.0.0.0`, `::`), which reaches loopback.
    """
    if isinstance(entry, Address):
        network: IPNetwork = ipaddress.ip_network(entry.address)
    elif isinstance(entry, Network):
        network = entry.network
    else:
        return None
    if network.num_addresses == 1:
        unspecified = network.network_address.is_unspecified
        return f"is {_UNSPECIFIED}" if unspecified else None
    if network.prefixlen < WIDEST_PREFIX[network.version]:
        return f"is wider than /{WIDEST_PREFIX[network.version]}"
    for sensitive, why in _SENSITIVE_V4 if network.version == 4 else _SENSITIVE_V6:
        if network.overlaps(sensitive):
            return f"covers {why} ({sensitive})"
    for pool in reserved:
        if pool.version == network.version and network.overlaps(pool):
            return f"overlaps Rumi's own Docker address pool {pool}"
    return None


# --- the request's destination --------------------------------------------------------------------


@dataclass(frozen=True)
class Destination:
    """A checked-syntax URL and what the policy looks at: scheme, normalised host, IP, port."""

    url: httpx.URL
    scheme: str
    host: str  # lowercase A-label name, or the IP address text (IPv4 for mapped IPv6)
    address: IPAddress | None  # set when the URL's host is an IP literal
    port: int

    @property
    def origin(self) -> tuple[str, str, int]:
        """(scheme, host, port): redirects to another origin lose the Pack's credentials."""
        return (self.scheme, self.host, self.port)

    @property
    def target(self) -> str:
        """`host:port` as audited (`[v6]:port` for IPv6)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def connect_host(self) -> str:
        """The host string httpcore will hand to the network backend for this URL."""
        return self.url.raw_host.decode("ascii")


def _check_text(text: str) -> None:
    """Refuse URL text a parser could read in more than one way, before any parser sees it."""
    if len(text) > MAX_URL_CHARS:
        raise InvalidRequest(f"URL is longer than {MAX_URL_CHARS} characters")
    if "\\" in text:
        raise InvalidRequest("URL contains a backslash; write '/' or percent-encode it")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in text):
        raise InvalidRequest("URL contains a space or control character; percent-encode it")
    m = _SCHEME_AUTHORITY_RE.match(text)
    if m is None:
        return
    authority = m.group(1)
    if not authority:
        return  # no host at all: `destination_of` refuses it by scheme or as hostless
    if "@" in authority:
        raise InvalidRequest("URLs with user info (user@host) are not accepted; send credentials in a header")
    if not _AUTHORITY_RE.match(authority):
        raise InvalidRequest("URL host or port is malformed (port must be 1-5 decimal digits)")


def destination_of(url: httpx.URL) -> Destination:
    """The `Destination` of an already parsed URL (a redirect target); syntax refusals raise."""
    scheme = url.scheme
    if not scheme:
        raise InvalidRequest("URL must be absolute and start with http:// or https://")
    if scheme not in DEFAULT_PORTS:
        raise Denied(f"scheme {scheme!r} is not allowed; only http and https")
    if url.userinfo:
        raise InvalidRequest("URLs with user info (user@host) are not accepted; send credentials in a header")
    raw_host = url.raw_host.decode("ascii", errors="replace")
    if not raw_host:
        raise InvalidRequest("URL has no host")
    address: IPAddress | None = None
    if ":" in raw_host:
        address = _parse_ip(raw_host)
        if address is None:
            raise InvalidRequest("URL host is not a valid IPv6 address (zone ids are not accepted)")
        host = str(address)
    elif re.fullmatch(r"[0-9.]+", raw_host):
        try:
            address = ipaddress.IPv4Address(raw_host)
        except ValueError:
            raise InvalidRequest(
                f"URL host {raw_host!r} is not a valid IPv4 address; write four decimal numbers"
            ) from None
        host = str(address)
    else:
        host = raw_host[:-1] if raw_host.endswith(".") else raw_host
        host = host.lower()
        problem = _check_name_syntax(host)
        if problem is not None:
            raise InvalidRequest(f"URL host {raw_host!r} {problem}")
        if host != raw_host:
            url = url.copy_with(host=host)  # one spelling for DNS, Host header, SNI and certificate
    port = url.port if url.port is not None else DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise InvalidRequest(f"URL port {port} is out of range 1-65535")
    return Destination(url=url, scheme=scheme, host=host, address=address, port=port)


def parse_destination(text: str) -> Destination:
    """Parse `text` once with `httpx.URL` and return its `Destination`; bad input raises."""
    if not isinstance(text, str):
        raise InvalidRequest("url must be a string")
    _check_text(text)
    import httpx  # the client's own parser (the same object is sent)

    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise InvalidRequest(f"URL is not valid: {exc}") from None
    return destination_of(url)


def url_target(text: object) -> str:
    """`host:port` of a request URL for the audit record (never the path or query); never raises."""
    try:
        return parse_destination(text).target if isinstance(text, str) else "invalid URL"
    except RequestError:
        return "invalid URL"


# --- policy ---------------------------------------------------------------------------------------

TLS_TUNNEL_PORT = 443
"""The one port a tunnel may reach without `plaintext_tunnel` (its first bytes must be TLS there)."""


@dataclass(frozen=True)
class EgressPolicy:
    """The typed form of one network grant: host entries (each with its own port or none) and ports."""

    hosts: tuple[HostEntry, ...]
    ports: frozenset[int]
    plaintext_tunnel: bool = False

    @classmethod
    def from_grant(
        cls,
        allowed_domains: Iterable[str],
        allowed_ports: Iterable[int],
        *,
        allow_wide_networks: bool = False,
        plaintext_tunnel: bool = False,
        reserved: Iterable[IPNetwork] = (),
    ) -> EgressPolicy:
        """Build from the grant's lists; ValueError names the first bad entry.

        Without `allow_wide_networks`, a CIDR that `wide_network_reason` names is a bad entry.
        """
        texts = tuple(allowed_domains)
        hosts = tuple(parse_host_entry(d) for d in texts)
        ports = frozenset(allowed_ports)
        # Whole-set checks keep a grant of all 65535 ports cheap; bool and float are not port numbers.
        if set(map(type, ports)) - {int} or (ports and not (min(ports) >= 1 and max(ports) <= 65535)):
            bad = next(p for p in ports if type(p) is not int or not 1 <= p <= 65535)
            raise ValueError(f"allowed_ports entry {bad!r} is not a port number 1-65535")
        if not allow_wide_networks:
            pools = tuple(reserved)
            for text, entry in zip(texts, hosts, strict=True):
                why = wide_network_reason(entry, pools)
                if why is not None:
                    raise ValueError(
                        f"allowed_domains entry {text.strip()!r} {why}; name the exact addresses, or set "
                        '"allow_wide_networks": true in the grant to allow it'
                    )
        return cls(hosts=hosts, ports=ports, plaintext_tunnel=plaintext_tunnel)

    def _port_ok(self, entry: HostEntry, port: int) -> bool:
        return port in self.ports if entry.port is None else port == entry.port

    def _covering(self, address: IPAddress) -> list[HostEntry]:
        """The IP and CIDR entries naming `address` (names and wildcards never do)."""
        found: list[HostEntry] = []
        for entry in self.hosts:
            if isinstance(entry, Address) and entry.address == address:
                found.append(entry)
            elif (
                isinstance(entry, Network)
                and entry.network.version == address.version
                and address in entry.network
            ):
                found.append(entry)
        return found

    def covers_address(self, address: IPAddress, port: int | None = None) -> bool:
        """True if an IP or CIDR entry names `address` (on `port`, when given)."""
        covering = self._covering(normalize_address(address))
        return any(port is None or self._port_ok(e, port) for e in covering)

    def _names(self, name: str) -> list[HostEntry]:
        found: list[HostEntry] = []
        for entry in self.hosts:
            if (
                isinstance(entry, AnyHost)
                or (isinstance(entry, HostName) and entry.name == name)
                or (isinstance(entry, SubdomainsOf) and name.endswith("." + entry.suffix))
            ):
                found.append(entry)
        return found

    def check_destination(self, dest: Destination) -> None:
        """Raise `Denied` unless one entry covers the destination's host *and* its port."""
        if dest.address is not None:
            matched = self._covering(dest.address)
            why = refusal_reason(dest.address)
            if why is None:
                matched += [e for e in self.hosts if isinstance(e, AnyHost)]
            elif not matched:
                raise Denied(f"address {dest.host} is {why}; grant it as an IP/CIDR entry to allow")
        else:
            matched = self._names(dest.host)
        if not matched:
            raise Denied(f"host {dest.host} is not granted (allowed_domains)")
        if not any(self._port_ok(e, dest.port) for e in matched):
            raise Denied(
                f"port {dest.port} is not granted for {dest.host} "
                f"(allowed_ports, or an allowed_domains entry {with_port(dest.host, dest.port)})"
            )

    def check_tunnel(self, dest: Destination) -> None:
        """`check_destination` for a tunnel, and: a port other than 443 needs `plaintext_tunnel`.

        On 443 the first bytes must be a TLS ClientHello naming the host (`tunnels.check_first_flight`);
        anywhere else a Pack could send plaintext with any `Host:` header through a granted address.
        """
        self.check_destination(dest)
        if dest.port != TLS_TUNNEL_PORT and not self.plaintext_tunnel:
            raise Denied(
                f"tunnels to port {dest.port} are not granted: only port {TLS_TUNNEL_PORT} (TLS) unless the "
                'grant sets "plaintext_tunnel": true (plain http:// through the proxy needs no tunnel)'
            )

    def check_addresses(self, dest: Destination, addresses: Sequence[IPAddress]) -> tuple[IPAddress, ...]:
        """The addresses to dial for `dest`; `Denied` if any answer is refused and not covered (on its port)."""
        if not addresses:
            raise HandlerFailed(f"host {dest.host} did not resolve to any address")
        for address in addresses:
            why = refusal_reason(address)
            if why is not None and not self.covers_address(address, dest.port):
                if self.covers_address(address):
                    raise Denied(
                        f"address {address} of host {dest.host} is {why} and granted on other ports only; "
                        f"add {with_port(str(normalize_address(address)), dest.port)} to allow"
                    )
                raise Denied(
                    f"address {address} of host {dest.host} is {why}; grant it as an IP/CIDR entry to allow"
                )
        return tuple(addresses)


# --- resolution -----------------------------------------------------------------------------------


# Lookups get their own worker threads: slow DNS must not starve the broker's other blocking work.
@functools.cache
def _dns_limiter() -> RunVar[anyio.CapacityLimiter]:
    """The one run variable holding each event loop's DNS limiter."""
    from anyio.lowlevel import RunVar

    return RunVar("rumi_egress_dns_limiter")


async def resolve_system(host: str, port: int) -> list[IPAddress]:
    """The addresses of `host` from the system resolver (`getaddrinfo`, in a worker thread)."""
    lookup = functools.partial(
        socket.getaddrinfo, host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    limiter_var = _dns_limiter()
    try:
        limiter = limiter_var.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(DNS_THREADS)
        limiter_var.set(limiter)
    infos = await anyio.to_thread.run_sync(lookup, abandon_on_cancel=True, limiter=limiter)
    found: list[IPAddress] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            found.append(ipaddress.ip_address(str(sockaddr[0])))
    return found


async def resolve(resolver: Resolver, dest: Destination) -> list[IPAddress]:
    """One resolution of `dest.host`, normalised and de-duplicated; an IP literal is its own answer."""
    if dest.address is not None:
        return [dest.address]
    try:
        answer = resolver(dest.host, dest.port)
        if inspect.isawaitable(answer):
            answer = await answer
        items = list(answer)
    except (OSError, UnicodeError, ValueError):
        raise HandlerFailed(f"host {dest.host} did not resolve") from None
    addresses: list[IPAddress] = []
    for item in items:
        address: IPAddress | None
        if isinstance(item, ipaddress.IPv4Address | ipaddress.IPv6Address):
            address = item
        else:
            address = _parse_ip(str(item))
        if address is None:
            raise HandlerFailed(f"resolver gave an invalid address for host {dest.host}")
        address = normalize_address(address)
        if address not in addresses:
            addresses.append(address)
    return addresses


# --- transport ------------------------------------------------------------------------------------


# --- the exchange ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EgressLimits:
    """Caps for one request (the scope's `default_config`, overridable per grant)."""

    max_request_bytes: int = 10 * 1024 * 1024
    max_response_bytes: int = 10 * 1024 * 1024
    timeout: float = 30.0
    max_redirects: int = 5

    def __post_init__(self) -> None:
        if self.max_request_bytes < 0 or self.max_response_bytes < 0 or self.max_redirects < 0:
            raise ValueError("network limits must not be negative")
        if not self.timeout > 0:
            raise ValueError("network timeout must be positive")


@dataclass(frozen=True)
class EgressRequest:
    """What the Pack asked for."""

    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class EgressResponse:
    """The final response (after redirects), its body read in full under the cap."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    target: str
    redirects: int


def _check_method(method: object) -> str:
    if not isinstance(method, str) or method.upper() not in ALLOWED_METHODS:
        allowed = ", ".join(sorted(ALLOWED_METHODS))
        raise InvalidRequest(f"method {str(method)[:20]!r} is not supported; use one of {allowed}")
    return method.upper()


def _check_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The Pack's headers as (name, value) pairs, with broker defaults for those it did not set."""
    if len(headers) > MAX_HEADERS:
        raise InvalidRequest(f"more than {MAX_HEADERS} headers")
    pairs: list[tuple[str, str]] = []
    size = 0
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str) or not _TOKEN_RE.match(name):
            raise InvalidRequest(f"header name {str(name)[:40]!r} is not a valid HTTP token")
        if name.lower() in FORBIDDEN_HEADERS:
            raise InvalidRequest(f"header {name!r} is set by the broker and may not be given")
        if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value):
            raise InvalidRequest(f"header {name!r} has a control character in its value")
        size += len(name) + len(value.encode("utf-8")) + 4
        pairs.append((name, value))
    if size > MAX_HEADER_BYTES:
        raise TooLarge(f"request headers are larger than {MAX_HEADER_BYTES} bytes")
    given = {name.lower() for name, _ in pairs}
    pairs.extend((n, v) for n, v in DEFAULT_HEADERS if n.lower() not in given)
    return pairs


@dataclass
class _OpenBody:
    """A final response whose body is still unread: the caller owns (and must close) both."""

    response: httpx.Response
    transport: PinnedTransport
    address: IPAddress | None  # the vetted address the connection went to
    dest: Destination


@dataclass
class _Hop:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    location: str | None
    sent: int
    opened: _OpenBody | None = None


def _connect_failure(dest: Destination, exc: BaseException) -> HandlerFailed:
    """A one-line reason from the exception chain (httpcore and anyio each wrap the OS error)."""
    import ssl

    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(c, ssl.SSLCertVerificationError) for c in chain):
        why = f"TLS certificate of {dest.host} did not verify"
    elif any(isinstance(c, ssl.SSLError) for c in chain):
        why = "TLS handshake failed"
    elif any(
        isinstance(c, ConnectionRefusedError) or getattr(c, "errno", None) == errno.ECONNREFUSED
        for c in chain
    ):
        why = "connection refused"
    else:
        why = "host unreachable"
    return HandlerFailed(f"could not connect to {dest.target}: {why}")


async def _read_capped(response: httpx.Response, cap: int, dest: Destination) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > cap:
        raise TooLarge(f"response from {dest.target} is larger than {cap} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.aiter_raw():
        total += len(chunk)
        if total > cap:
            raise TooLarge(f"response from {dest.target} is larger than {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _exchange(
    dest: Destination,
    addresses: Sequence[IPAddress],
    method: str,
    headers: list[tuple[str, str]],
    body: bytes,
    follow: bool,
    ssl_context: ssl.SSLContext,
    limits: EgressLimits,
    keep_open: float | None = None,
) -> _Hop:
    """One request/response on a fresh pinned connection; the body is read unless it is a redirect.

    With `keep_open` (the longest wait for one read of the body, in seconds), a final response is
    returned unread in `_Hop.opened`, and the caller owns its connection.
    """
    import httpcore
    import httpx

    from broker.backends.pinned import PinnedBackend, PinnedTransport

    backend = PinnedBackend(dest.connect_host, dest.port, tuple(addresses)[:MAX_ADDRESSES_TRIED])
    timeout = {
        "connect": limits.timeout,
        "read": limits.timeout if keep_open is None else keep_open,
        "write": limits.timeout,
        "pool": limits.timeout,
    }
    raw_headers = [(n.encode("ascii"), v.encode("utf-8")) for n, v in headers]
    request = httpx.Request(
        method, dest.url, headers=raw_headers, content=body or None, extensions={"timeout": timeout}
    )
    transport = PinnedTransport(backend, ssl_context)
    owned = True  # False once the open response (and so the transport) is handed to the caller
    try:
        try:
            response = await transport.handle_async_request(request)
        except httpcore.ConnectError as exc:
            raise _connect_failure(dest, exc) from None
        try:
            raw = list(response.headers.raw)
            location = next((v for k, v in raw if k.lower() == b"location"), None)
            if follow and response.status_code in REDIRECT_STATUSES and location is not None:
                try:
                    text = location.decode("utf-8")
                except UnicodeDecodeError:
                    text = location.decode("latin-1")
                return _Hop(response.status_code, raw, b"", text, len(body))
            if keep_open is not None:
                address = backend.dialed[-1] if backend.dialed else None
                owned = False
                opened = _OpenBody(response, transport, address, dest)
                return _Hop(response.status_code, raw, b"", None, len(body), opened)
            data = b"" if method == "HEAD" else await _read_capped(response, limits.max_response_bytes, dest)
            return _Hop(response.status_code, raw, data, None, len(body))
        finally:
            if owned:
                await response.aclose()
    finally:
        if owned:
            await transport.aclose()


def _redirect_method(status: int, method: str) -> str:
    if status == 303 and method != "HEAD":
        return "GET"
    if status in (301, 302) and method == "POST":
        return "GET"
    return method


def _next_destination(dest: Destination, location: str) -> Destination:
    """The redirect target, with every syntax refusal turned into `Denied` (the server chose it)."""
    import httpx

    try:
        _check_text(location)
        return destination_of(dest.url.join(location))
    except RequestError as exc:
        raise Denied(f"redirect from {dest.target} refused: {exc.message}") from None
    except (httpx.InvalidURL, ValueError, TypeError):
        raise Denied(f"redirect from {dest.target} refused: the Location is not a valid URL") from None


async def fetch(
    request: EgressRequest,
    policy: EgressPolicy,
    limits: EgressLimits,
    *,
    resolver: Resolver | None = None,
    verify: ssl.SSLContext | str | None = None,
    audit: dict[str, Any] | None = None,
) -> EgressResponse:
    """Perform `request` under `policy` and `limits`, following redirects by hand.

    `resolver` and `verify` (an `ssl.SSLContext` or a CA file path) exist for tests; the defaults are
    the system resolver and certifi's CA bundle. `audit` receives safe fields as they become known:
    method, final_target, redirects, status, bytes_out, bytes_in (never headers, URLs or bodies).
    """
    response, _ = await _perform(request, policy, limits, resolver, verify, audit, keep_open=None)
    return response


async def open_stream(
    request: EgressRequest,
    policy: EgressPolicy,
    limits: EgressLimits,
    *,
    read_timeout: float,
    resolver: Resolver | None = None,
    verify: ssl.SSLContext | str | None = None,
    audit: dict[str, Any] | None = None,
) -> OpenedStream:
    """`fetch`, except that the final response's body is left unread: status and headers now, the
    body later through `StreamTable` (every rule of `fetch` applies; `max_response_bytes` does not,
    the stream's own `StreamLimits.max_bytes` does). `read_timeout` bounds one wait for body bytes.
    """
    response, opened = await _perform(
        request, policy, limits, resolver, verify, audit, keep_open=read_timeout
    )
    assert opened is not None
    return OpenedStream(response=response, body=opened)


async def _perform(
    request: EgressRequest,
    policy: EgressPolicy,
    limits: EgressLimits,
    resolver: Resolver | None,
    verify: ssl.SSLContext | str | None,
    audit: dict[str, Any] | None,
    *,
    keep_open: float | None,
) -> tuple[EgressResponse, _OpenBody | None]:
    notes: dict[str, Any] = audit if audit is not None else {}
    method = _check_method(request.method)
    notes["method"] = method
    headers = _check_headers(request.headers)
    body = bytes(request.body)
    if len(body) > limits.max_request_bytes:
        raise TooLarge(f"request body is larger than {limits.max_request_bytes} bytes")
    dest = parse_destination(request.url)
    import httpcore

    from broker.backends.pinned import ssl_context as make_ssl_context

    resolver_fn: Resolver = resolver if resolver is not None else resolve_system
    ssl_context = make_ssl_context(verify)
    sent = 0
    came_from: str | None = None
    try:
        with anyio.fail_after(limits.timeout):
            for hop in range(limits.max_redirects + 1):
                notes["final_target"] = dest.target
                notes["redirects"] = hop
                try:
                    policy.check_destination(dest)
                    addresses = policy.check_addresses(dest, await resolve(resolver_fn, dest))
                except Denied as exc:
                    if came_from is None:
                        raise
                    raise Denied(f"redirect from {came_from} refused: {exc.message}") from None
                follow = limits.max_redirects > 0
                result = await _exchange(
                    dest, addresses, method, headers, body, follow, ssl_context, limits, keep_open
                )
                sent += result.sent
                notes["bytes_out"] = sent
                notes["status"] = result.status
                if result.location is None:
                    if result.opened is None:
                        notes["bytes_in"] = len(result.body)
                    response = EgressResponse(
                        status=result.status,
                        headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in result.headers],
                        body=result.body,
                        target=dest.target,
                        redirects=hop,
                    )
                    return response, result.opened
                if hop == limits.max_redirects:
                    break
                nxt = _next_destination(dest, result.location)
                new_method = _redirect_method(result.status, method)
                if new_method != method:
                    method, body = new_method, b""
                    headers = [(n, v) for n, v in headers if not n.lower().startswith("content-")]
                if nxt.origin != dest.origin:
                    headers = [(n, v) for n, v in headers if n.lower() in CROSS_ORIGIN_SAFE_HEADERS]
                came_from, dest = dest.target, nxt
    except TimeoutError:
        raise Timeout(f"request to {dest.target} took longer than {limits.timeout:g} s") from None
    except httpcore.TimeoutException:
        raise Timeout(f"request to {dest.target} took longer than {limits.timeout:g} s") from None
    except httpcore.ConnectError as exc:
        raise _connect_failure(dest, exc) from None
    except httpcore.LocalProtocolError:
        raise InvalidRequest("the request is not valid HTTP (check method and headers)") from None
    except httpcore.ProtocolError:
        raise HandlerFailed(f"{dest.target} sent an invalid HTTP response") from None
    except httpcore.NetworkError:
        raise HandlerFailed(f"connection to {dest.target} failed during the exchange") from None
    raise HandlerFailed(f"more than {limits.max_redirects} redirects, last from {dest.target}")


# --- streamed responses ---------------------------------------------------------------------------

STREAM_CHUNK_BYTES = 1024 * 1024  # one `read`; well under the 8 MiB NATS payload
STREAM_READ_AHEAD = 1024 * 1024  # body bytes the broker holds per stream before it stops reading
STREAM_MAX_WAIT = 20.0  # longest `read` long-poll
STREAM_REAP_INTERVAL = 0.5
STREAM_GRANT_RECHECK = 1.0
STREAM_ID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_CLOSE_TIMEOUT = 2.0

StreamOutcome: TypeAlias = Callable[[str, str, dict[str, Any]], Awaitable[None]]
"""`record_outcome(open_request_id, target, fields)` from the broker's handler context."""

log = logging.getLogger("rumi.broker.stream")


@dataclass(frozen=True)
class StreamLimits:
    """Caps for streamed responses (grant keys, else these defaults)."""

    max_bytes: int = 64 * 1024 * 1024  # `max_stream_bytes`: body bytes of one stream
    max_seconds: float = 600.0  # `max_stream_seconds`: lifetime of one stream
    idle_timeout: float = 60.0  # `stream_idle_timeout`: the Pack did not read for this long
    max_streams: int = 16  # `max_streams`: open streams per Pack

    def __post_init__(self) -> None:
        if not (self.max_seconds > 0 and self.idle_timeout > 0):
            raise ValueError("stream timeouts must be positive")
        if self.max_bytes < 0 or self.max_streams < 0:
            raise ValueError("stream limits must not be negative")

    @classmethod
    def from_grant(cls, grant: Mapping[str, Any]) -> StreamLimits:
        """Grant (over scope) values, else the built-in defaults above."""
        base = cls()

        def pick(key: str, default: float) -> Any:
            value = grant.get(key)
            return default if value is None else value

        return cls(
            max_bytes=int(pick("max_stream_bytes", base.max_bytes)),
            max_seconds=float(pick("max_stream_seconds", base.max_seconds)),
            idle_timeout=float(pick("stream_idle_timeout", base.idle_timeout)),
            max_streams=int(pick("max_streams", base.max_streams)),
        )


@dataclass(frozen=True)
class OpenedStream:
    """What `open_stream` returns: the final response's status and headers, its body still unread."""

    response: EgressResponse  # body is b""
    body: _OpenBody


@dataclass(eq=False)
class ResponseStream:
    """One streamed response body, owned by one component of one Pack; see `StreamTable`."""

    stream_id: str
    pack_id: str
    component_id: str
    request_id: str  # the audited `fetch`; its outcome event is written at close
    target: str  # that request's audited target: host:port of its first URL
    dest: Destination  # the final hop
    address: IPAddress | None
    limits: StreamLimits
    body: _OpenBody
    record_outcome: StreamOutcome
    notes: dict[str, Any]  # the fetch's audit fields (method, final_target, redirects, status, bytes_out)
    opened: float
    last_active: float
    data_ready: asyncio.Event  # set when the pump added data or the stream ended
    room: asyncio.Event  # set when the Pack took data (the pump may read ahead again)
    read_lock: asyncio.Lock  # one `read` at a time
    still_granted: Callable[[ResponseStream], bool] | None = None
    buffer: bytearray = field(default_factory=bytearray)
    received: int = 0  # body bytes read from the server
    delivered: int = 0  # body bytes handed to the Pack
    eof: bool = False
    failure: str | None = None  # "upstream_error" or "upstream_timeout"
    over_cap: bool = False
    closed: bool = False
    reason: str = ""
    last_grant_check: float = 0.0
    pump: asyncio.Task[None] | None = None


class StreamTable:
    """The open response streams of one event loop. Use `stream_table()`.

    Keyed by (pack_id, stream id), so a Pack can never name another Pack's stream; bound to the
    component that opened it. Bounds open streams per Pack, body bytes and lifetime per stream, closes
    streams the Pack stopped reading, and completes each stream's audit record exactly once, at close.
    A pump task per stream reads the body ahead (at most `STREAM_READ_AHEAD` bytes) as it arrives;
    `read` hands over what is there, or waits for it.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, reap_interval: float = STREAM_REAP_INTERVAL
    ) -> None:
        self._clock = clock
        self._reap_interval = reap_interval
        self._streams: dict[tuple[str, str], ResponseStream] = {}
        self._opening: dict[str, int] = {}
        self._reaper: asyncio.Task[None] | None = None

    # -- lookup ----------------------------------------------------------------------------------
    def open_count(self, pack_id: str) -> int:
        """Streams of `pack_id` that are open (or being opened)."""
        return sum(1 for p, _ in self._streams if p == pack_id) + self._opening.get(pack_id, 0)

    def get(self, pack_id: str, component_id: str, stream_id: object) -> ResponseStream:
        """The caller's own open stream; InvalidRequest for anything else (never says whose it is)."""
        stream = self._streams.get((pack_id, stream_id)) if isinstance(stream_id, str) else None
        if stream is None or stream.closed or stream.component_id != component_id:
            raise InvalidRequest("no such stream (closed, timed out or never opened); fetch again")
        return stream

    def __len__(self) -> int:
        return len(self._streams)

    # -- open ------------------------------------------------------------------------------------
    async def open(
        self,
        *,
        pack_id: str,
        component_id: str,
        request_id: str,
        target: str,
        limits: StreamLimits,
        record_outcome: StreamOutcome,
        notes: dict[str, Any],
        start: Callable[[], Awaitable[OpenedStream]],
        still_granted: Callable[[ResponseStream], bool] | None = None,
    ) -> tuple[ResponseStream, EgressResponse]:
        """Refuse past `max_streams`, else `start()` the request and register its body as a stream."""
        import asyncio

        if self.open_count(pack_id) >= limits.max_streams:
            raise Denied(
                f"this Pack already has {limits.max_streams} open streams (max_streams); "
                "read one to its end or close it first"
            )
        self._opening[pack_id] = self._opening.get(pack_id, 0) + 1
        try:
            opened = await start()
        finally:
            self._opening[pack_id] -= 1
            if not self._opening[pack_id]:
                del self._opening[pack_id]
        now = self._clock()
        stream = ResponseStream(
            stream_id=secrets.token_urlsafe(18),
            pack_id=pack_id,
            component_id=component_id,
            request_id=request_id,
            target=target,
            dest=opened.body.dest,
            address=opened.body.address,
            limits=limits,
            body=opened.body,
            record_outcome=record_outcome,
            notes=notes,
            opened=now,
            last_active=now,
            data_ready=asyncio.Event(),
            room=asyncio.Event(),
            read_lock=asyncio.Lock(),
            still_granted=still_granted,
            last_grant_check=now,
        )
        self._streams[(pack_id, stream.stream_id)] = stream
        loop = asyncio.get_running_loop()
        stream.pump = loop.create_task(self._pump(stream), name="rumi-stream-pump")
        if self._reaper is None or self._reaper.done():
            self._reaper = loop.create_task(self._reap(), name="rumi-stream-reaper")
        return stream, opened.response

    async def _pump(self, stream: ResponseStream) -> None:
        """Read the body as it arrives, at most `STREAM_READ_AHEAD` bytes ahead of the Pack."""
        import httpcore

        cap = stream.limits.max_bytes
        try:
            async for chunk in stream.body.response.aiter_raw():
                if stream.received + len(chunk) > cap:
                    stream.over_cap = True
                    return
                stream.buffer += chunk
                stream.received += len(chunk)
                stream.data_ready.set()
                while len(stream.buffer) >= STREAM_READ_AHEAD and not stream.closed:
                    stream.room.clear()
                    await stream.room.wait()
            stream.eof = True
        except httpcore.TimeoutException:
            stream.failure = "upstream_timeout"
        except Exception:  # the connection broke, or the server sent invalid HTTP
            stream.failure = "upstream_error"
        finally:
            stream.data_ready.set()

    # -- data ------------------------------------------------------------------------------------
    async def read(self, stream: ResponseStream, max_bytes: int, wait: float) -> dict[str, Any]:
        """Up to `max_bytes` of the body, waiting at most `wait` s for the first byte.

        One `read` at a time per stream: a second while one waits is refused at once, never queued
        (each waiting read holds one of its Pack's in-flight slots). At the end of the body the
        stream closes itself (`eof` and `closed` true): no `close` is needed.
        """
        import asyncio

        if stream.read_lock.locked():
            raise RateLimited("another read is already waiting on this stream")
        async with stream.read_lock:
            self._check_open(stream)
            stream.last_active = self._clock()
            if not stream.buffer and not self._ended(stream) and wait > 0:
                stream.data_ready.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stream.data_ready.wait(), wait)
            stream.last_active = self._clock()
            if stream.closed:  # closed while this read waited (revoked, expired, stopping)
                raise self._closed_error(stream)
            if stream.buffer:
                data = bytes(stream.buffer[:max_bytes])
                del stream.buffer[:max_bytes]
                stream.delivered += len(data)
                stream.room.set()
                done = stream.eof and not stream.buffer and not stream.closed
                if done:
                    await self.close(stream, "eof")
                return {"data": data, "eof": done, "closed": done}
            if stream.eof:
                await self.close(stream, "eof")
                return {"data": b"", "eof": True, "closed": True}
            if stream.over_cap:
                await self.close(stream, "byte_cap")
                raise TooLarge(
                    f"the response from {stream.dest.target} is larger than the stream's cap of "
                    f"{stream.limits.max_bytes} bytes (max_stream_bytes); closed"
                )
            if stream.failure is not None:
                await self.close(stream, stream.failure)
                raise self._closed_error(stream)
            return {"data": b"", "eof": False, "closed": False}

    @staticmethod
    def _ended(stream: ResponseStream) -> bool:
        return stream.eof or stream.over_cap or stream.failure is not None or stream.closed

    @staticmethod
    def _closed_error(stream: ResponseStream) -> RequestError:
        target = stream.dest.target
        if stream.reason == "revoked":
            return Denied(f"the grant no longer covers {target}; stream closed")
        if stream.reason == "max_seconds":
            return Timeout(
                f"the stream reached its limit of {stream.limits.max_seconds:g} s (max_stream_seconds)"
            )
        if stream.reason == "upstream_timeout":
            return Timeout(f"{target} sent nothing for too long; stream closed")
        if stream.reason == "upstream_error":
            return HandlerFailed(f"the connection to {target} failed during the response; stream closed")
        if stream.reason == "broker_stopping":
            return Unavailable("the broker is stopping; stream closed")
        return InvalidRequest("no such stream (closed, timed out or never opened); fetch again")

    # -- close -----------------------------------------------------------------------------------
    async def close(self, stream: ResponseStream, reason: str) -> None:
        """Close once: drop the connection and complete the `fetch` request's audit record."""
        import asyncio

        if stream.closed:
            return
        stream.closed = True
        stream.reason = reason
        self._streams.pop((stream.pack_id, stream.stream_id), None)
        stream.data_ready.set()  # wake a waiting read now
        stream.room.set()
        pump = stream.pump
        if pump is not None and not pump.done() and pump is not asyncio.current_task():
            pump.cancel()
            await asyncio.wait({pump}, timeout=_CLOSE_TIMEOUT)
        # A broken connection is gone either way.
        with contextlib.suppress(Exception), anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            await stream.body.response.aclose()
            await stream.body.transport.aclose()
        fields = {
            **stream.notes,
            "stream": stream.stream_id,
            "bytes_in": stream.delivered,
            "duration_ms": round((self._clock() - stream.opened) * 1000, 3),
            "reason": reason,
        }
        if stream.address is not None:
            fields["address"] = str(stream.address)
        try:
            await stream.record_outcome(stream.request_id, stream.target, fields)
        except Exception:
            log.exception("could not record the close of stream %s", stream.stream_id)

    async def close_all(self, reason: str = "broker_stopping") -> None:
        """Close every stream (broker shutdown)."""
        for stream in list(self._streams.values()):
            await self.close(stream, reason)

    def _check_open(self, stream: ResponseStream) -> None:
        if stream.closed:
            raise InvalidRequest("no such stream (closed, timed out or never opened); fetch again")

    async def check_granted(self, stream: ResponseStream, policy: EgressPolicy) -> None:
        """Close the stream and raise Denied if the current grant no longer covers its destination."""
        try:
            policy.check_destination(stream.dest)
            if stream.address is not None:
                policy.check_addresses(stream.dest, (stream.address,))
        except RequestError:
            await self.close(stream, "revoked")
            raise Denied(f"the grant no longer covers {stream.dest.target}; stream closed") from None

    async def _reap(self) -> None:
        """Close idle, expired and (when the broker can tell) revoked streams; ends when none are left."""
        import asyncio

        while self._streams:
            await asyncio.sleep(self._reap_interval)
            now = self._clock()
            for stream in list(self._streams.values()):
                try:
                    reason = self._expired(stream, now)
                    if reason is not None:
                        await self.close(stream, reason)
                except Exception:
                    log.exception("stream reaper failed on stream %s", stream.stream_id)

    def _expired(self, stream: ResponseStream, now: float) -> str | None:
        if now - stream.opened >= stream.limits.max_seconds:
            return "max_seconds"
        if not stream.read_lock.locked() and now - stream.last_active >= stream.limits.idle_timeout:
            return "idle"
        if stream.still_granted is not None and now - stream.last_grant_check >= STREAM_GRANT_RECHECK:
            stream.last_grant_check = now
            if not stream.still_granted(stream):
                return "revoked"
        return None


# One table per event loop: connections belong to a loop, and tests run several loops in one process.
_STREAM_TABLES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, StreamTable] = (
    weakref.WeakKeyDictionary()
)


def stream_table() -> StreamTable:
    """The running event loop's stream table (created on first use); survives handler reloads."""
    import asyncio

    loop = asyncio.get_running_loop()
    table = _STREAM_TABLES.get(loop)
    if table is None:
        table = _STREAM_TABLES[loop] = StreamTable()
    return table


def __getattr__(name: str) -> Any:
    """`PinnedBackend` and `PinnedTransport` from `broker.backends.pinned`, imported on first use."""
    if name in ("PinnedBackend", "PinnedTransport"):
        from broker.backends import pinned

        return getattr(pinned, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
