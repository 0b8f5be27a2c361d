"""Broker-side HTTP(S) egress: one request for a Pack, to a granted host and port only.

The `network` handler (config/handlers/network.py) is a thin shell around `fetch`. The rules:

- A grant is typed once (Deno style): each `allowed_domains` entry becomes a `HostEntry`
  (`AnyHost`, `HostName`, `SubdomainsOf`, `Address`, `Network`), names lowercased, trailing dot
  removed, IDNA (UTS #46) to A-labels, IPv4-mapped IPv6 to IPv4. A request becomes a typed
  `Destination` the same way, so matching is plain comparison.
- The URL is parsed exactly once, by `httpx.URL` (the parser of the client that sends it); host and
  port for the check come from that object, and the same object is sent. Only `http`/`https`; user
  info, backslashes, control characters, odd ports and numeric hosts in non-dotted forms are refused.
- The broker resolves the name itself (an injectable `Resolver`), refuses loopback, private,
  link-local, CGNAT, multicast, reserved, documentation and cloud-metadata addresses (also when
  embedded in NAT64/6to4/IPv4-mapped forms) unless an IP or CIDR grant entry covers that exact
  address, and then connects to the address it checked: `PinnedBackend` is an httpcore network
  backend that dials only the vetted addresses of the one vetted origin, while the Host header, TLS
  SNI and certificate check use the original host name. There is no second DNS lookup to rebind.
- Redirects are followed by hand, each hop checked again (scheme, grant, port, fresh resolution).
- No proxy variables, no cookie jar, no automatic decompression: the transport is called directly.

Errors are `broker.core.errors.RequestError` subclasses with messages safe to show the Pack::

    Denied          host, port, scheme or address not allowed (redirect hops included)
    InvalidRequest  malformed URL, method or header
    TooLarge        request or response body over its cap
    Timeout         the whole exchange took longer than `EgressLimits.timeout`
    HandlerFailed   the remote side failed: no DNS answer, connection or TLS failure, bad HTTP
"""

from __future__ import annotations

import errno
import functools
import inspect
import ipaddress
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import anyio
import certifi
import httpcore
import httpx
import idna
from anyio.lowlevel import RunVar

from broker.core.errors import Denied, HandlerFailed, InvalidRequest, RequestError, Timeout, TooLarge

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
    "Network",
    "PinnedBackend",
    "PinnedTransport",
    "Resolver",
    "SubdomainsOf",
    "destination_of",
    "fetch",
    "normalize_address",
    "normalize_host_name",
    "parse_destination",
    "parse_host_entry",
    "refusal_reason",
    "resolve",
    "resolve_system",
    "url_target",
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
_PORT_NUMBERS = frozenset(range(1, 65536))
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


@dataclass(frozen=True)
class AnyHost:
    """`*`: every name, and every IP literal whose address is not refused."""

    def __str__(self) -> str:
        return "*"


@dataclass(frozen=True)
class HostName:
    """One exact host name, in lowercase A-labels without trailing dot."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class SubdomainsOf:
    """`*.suffix`: any name below `suffix`, at any depth, but not `suffix` itself."""

    suffix: str

    def __str__(self) -> str:
        return f"*.{self.suffix}"


@dataclass(frozen=True)
class Address:
    """One IP address; the only way (with `Network`) to reach a refused address."""

    address: IPAddress

    def __str__(self) -> str:
        return str(self.address)


@dataclass(frozen=True)
class Network:
    """A CIDR block; it covers IP-literal URLs and resolved addresses inside it."""

    network: IPNetwork

    def __str__(self) -> str:
        return str(self.network)


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
        try:
            name = idna.encode(name, uts46=True, transitional=False).decode("ascii")
        except idna.IDNAError as exc:
            raise ValueError(f"host name {text!r} is not a valid internationalised name: {exc}") from None
    problem = _check_name_syntax(name)
    if problem is not None:
        raise ValueError(f"host name {text!r} {problem}")
    return name


def parse_host_entry(text: str) -> HostEntry:
    """One `allowed_domains` entry as a typed, normalised `HostEntry`; ValueError says what is wrong."""
    entry = text.strip()
    if not entry:
        raise ValueError("an allowed_domains entry is empty")
    if entry == "*":
        return AnyHost()
    if "://" in entry:
        raise ValueError(f"allowed_domains entry {text!r} is a URL; give only the host name")
    if "/" in entry:
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"allowed_domains entry {text!r} is not a valid CIDR block") from None
        if (
            isinstance(net, ipaddress.IPv6Network)
            and net.prefixlen >= 96
            and net.network_address.ipv4_mapped is not None
        ):
            mapped = net.network_address.ipv4_mapped
            return Network(ipaddress.IPv4Network((int(mapped), net.prefixlen - 96)))
        return Network(net)
    address = _parse_ip(entry)
    if address is not None:
        return Address(address)
    if entry.startswith("*."):
        return SubdomainsOf(normalize_host_name(entry[2:]))
    if "*" in entry:
        raise ValueError(f"allowed_domains entry {text!r}: a wildcard may only be a leading '*.'")
    if ":" in entry:
        raise ValueError(f"allowed_domains entry {text!r} has a port; ports go in allowed_ports")
    return HostName(normalize_host_name(entry))


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


@dataclass(frozen=True)
class EgressPolicy:
    """The typed form of one network grant: host entries and ports, both normalised."""

    hosts: tuple[HostEntry, ...]
    ports: frozenset[int]

    @classmethod
    def from_grant(cls, allowed_domains: Iterable[str], allowed_ports: Iterable[int]) -> EgressPolicy:
        """Build from the grant's lists; ValueError names the first bad entry."""
        hosts = tuple(parse_host_entry(d) for d in allowed_domains)
        ports = frozenset(allowed_ports)
        # Set operations keep a grant of all 65535 ports cheap; bool and float are not port numbers.
        if set(map(type, ports)) - {int} or not ports <= _PORT_NUMBERS:
            bad = next(p for p in ports if type(p) is not int or p not in _PORT_NUMBERS)
            raise ValueError(f"allowed_ports entry {bad!r} is not a port number 1-65535")
        return cls(hosts=hosts, ports=ports)

    def covers_address(self, address: IPAddress) -> bool:
        """True if an IP or CIDR entry names `address` (names and wildcards never do)."""
        address = normalize_address(address)
        for entry in self.hosts:
            if isinstance(entry, Address) and entry.address == address:
                return True
            if (
                isinstance(entry, Network)
                and entry.network.version == address.version
                and address in entry.network
            ):
                return True
        return False

    def _allows_name(self, name: str) -> bool:
        for entry in self.hosts:
            if isinstance(entry, AnyHost):
                return True
            if isinstance(entry, HostName) and entry.name == name:
                return True
            if isinstance(entry, SubdomainsOf) and name.endswith("." + entry.suffix):
                return True
        return False

    def check_destination(self, dest: Destination) -> None:
        """Raise `Denied` unless the grant covers the destination's host and port."""
        if dest.address is not None:
            if not self.covers_address(dest.address):
                why = refusal_reason(dest.address)
                if why is not None:
                    raise Denied(f"address {dest.host} is {why}; grant it as an IP/CIDR entry to allow")
                if not any(isinstance(e, AnyHost) for e in self.hosts):
                    raise Denied(f"host {dest.host} is not granted (allowed_domains)")
        elif not self._allows_name(dest.host):
            raise Denied(f"host {dest.host} is not granted (allowed_domains)")
        if dest.port not in self.ports:
            raise Denied(f"port {dest.port} is not granted (allowed_ports)")

    def check_addresses(self, dest: Destination, addresses: Sequence[IPAddress]) -> tuple[IPAddress, ...]:
        """The addresses to dial for `dest`; `Denied` if any answer is refused and not covered."""
        if not addresses:
            raise HandlerFailed(f"host {dest.host} did not resolve to any address")
        for address in addresses:
            why = refusal_reason(address)
            if why is not None and not self.covers_address(address):
                raise Denied(
                    f"address {address} of host {dest.host} is {why}; grant it as an IP/CIDR entry to allow"
                )
        return tuple(addresses)


# --- resolution -----------------------------------------------------------------------------------

# Lookups get their own worker threads: slow DNS must not starve the broker's other blocking work.
_DNS_LIMITER: RunVar[anyio.CapacityLimiter] = RunVar("rumi_egress_dns_limiter")


async def resolve_system(host: str, port: int) -> list[IPAddress]:
    """The addresses of `host` from the system resolver (`getaddrinfo`, in a worker thread)."""
    lookup = functools.partial(
        socket.getaddrinfo, host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    try:
        limiter = _DNS_LIMITER.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(DNS_THREADS)
        _DNS_LIMITER.set(limiter)
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


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """A network backend that dials only the vetted addresses of one vetted (host, port).

    httpcore asks it for `connect_tcp(host, port)` with the URL's own host; it answers by connecting to
    the addresses checked for that host, in order, and refuses any other host, port or a Unix socket.
    TLS then runs over that stream with `server_hostname` = the URL's host (SNI and certificate).
    """

    def __init__(
        self,
        host: str,
        port: int,
        addresses: Sequence[IPAddress],
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._addresses = tuple(addresses)[:MAX_ADDRESSES_TRIED]
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()
        self.dialed: list[IPAddress] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Connect to the first vetted address that answers; anything unvetted is refused."""
        if host != self._host or port != self._port or not self._addresses:
            raise httpcore.ConnectError("refused: this origin was not vetted")
        failure: Exception | None = None
        for address in self._addresses:
            self.dialed.append(address)
            try:
                return await self._inner.connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        """Never: a URL cannot name a Unix socket here."""
        raise httpcore.ConnectError("refused: Unix sockets are not reachable")

    async def sleep(self, seconds: float) -> None:
        """Delegate to the wrapped backend."""
        await self._inner.sleep(seconds)


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        if hasattr(self._stream, "aclose"):
            await self._stream.aclose()


class PinnedTransport(httpx.AsyncBaseTransport):
    """An httpx transport over an httpcore pool that uses a `PinnedBackend` (HTTP/1.1, no retries).

    httpcore exceptions are not translated to httpx ones: `fetch` maps them to contract errors.
    Only the `timeout` extension passes through (no `sni_hostname` override can reach the pool).
    """

    def __init__(self, backend: PinnedBackend, ssl_context: ssl.SSLContext) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            http1=True,
            http2=False,
            retries=0,
            max_connections=1,
            network_backend=backend,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send `request` through the pinned pool; the response body stays unread."""
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions={k: v for k, v in request.extensions.items() if k == "timeout"},
        )
        response = await self._pool.handle_async_request(core_request)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        """Close every connection of the pool."""
        await self._pool.aclose()


@functools.lru_cache(maxsize=1)
def _default_ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certifi.where())


def _ssl_context(verify: ssl.SSLContext | str | None) -> ssl.SSLContext:
    if verify is None:
        return _default_ssl_context()
    if isinstance(verify, ssl.SSLContext):
        return verify
    return ssl.create_default_context(cafile=verify)


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
class _Hop:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    location: str | None
    sent: int


def _connect_failure(dest: Destination, exc: BaseException) -> HandlerFailed:
    """A one-line reason from the exception chain (httpcore and anyio each wrap the OS error)."""
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
) -> _Hop:
    """One request/response on a fresh pinned connection; the body is read unless it is a redirect."""
    backend = PinnedBackend(dest.connect_host, dest.port, addresses)
    timeout = {
        "connect": limits.timeout,
        "read": limits.timeout,
        "write": limits.timeout,
        "pool": limits.timeout,
    }
    raw_headers = [(n.encode("ascii"), v.encode("utf-8")) for n, v in headers]
    request = httpx.Request(
        method, dest.url, headers=raw_headers, content=body or None, extensions={"timeout": timeout}
    )
    async with PinnedTransport(backend, ssl_context) as transport:
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
            data = b"" if method == "HEAD" else await _read_capped(response, limits.max_response_bytes, dest)
            return _Hop(response.status_code, raw, data, None, len(body))
        finally:
            await response.aclose()


def _redirect_method(status: int, method: str) -> str:
    if status == 303 and method != "HEAD":
        return "GET"
    if status in (301, 302) and method == "POST":
        return "GET"
    return method


def _next_destination(dest: Destination, location: str) -> Destination:
    """The redirect target, with every syntax refusal turned into `Denied` (the server chose it)."""
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
    notes: dict[str, Any] = audit if audit is not None else {}
    method = _check_method(request.method)
    notes["method"] = method
    headers = _check_headers(request.headers)
    body = bytes(request.body)
    if len(body) > limits.max_request_bytes:
        raise TooLarge(f"request body is larger than {limits.max_request_bytes} bytes")
    dest = parse_destination(request.url)
    resolver_fn: Resolver = resolver if resolver is not None else resolve_system
    ssl_context = _ssl_context(verify)
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
                result = await _exchange(dest, addresses, method, headers, body, follow, ssl_context, limits)
                sent += result.sent
                notes["bytes_out"] = sent
                notes["status"] = result.status
                if result.location is None:
                    notes["bytes_in"] = len(result.body)
                    return EgressResponse(
                        status=result.status,
                        headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in result.headers],
                        body=result.body,
                        target=dest.target,
                        redirects=hop,
                    )
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
