"""Test a Pack's tools in-process against a fake broker: no NATS, no Docker, no containers.

```python
from pack_runtime.testing import FakeBroker

from main import pack


def test_summary_reads_the_granted_file() -> None:
    broker = FakeBroker(
        pack_id="notes",
        grants={"file_read": {"directories": ["/data"]}},   # what `rumi grant ... --dir /data` allows
        files={"/data/a.txt": b"hello"},
    )
    assert broker.call_sync(pack, "summary", {"name": "a.txt"}) == {"chars": 5}
    assert [(r.capability, r.code) for r in broker.requests] == [("file_read", "ok")]
```

The tool runs exactly as in its container: its arguments are encoded and checked against its declared
type, its `ctx` sends real protocol messages, and its result or error comes back as a caller sees it
(`CallFailed` with `.code`, e.g. ``tool:not_found``, ``invalid_request``, ``handler_error``).

The fake broker decides with the same rules as the real one, for the built-in capabilities:

- ``file_read`` / ``file_write``: the path is absolute and beneath a granted directory by components,
  with no ``..`` climbing above it; a write names a file; ``max_bytes`` (7 MiB) caps the size. Files
  live in memory (`files`); a write into a missing directory fails with ``no such file`` unless
  ``parents=True``, which creates the directories inside the grant.
- ``env_read``: only keys listed exactly in ``allowed_keys``; values from `env`.
- ``network`` (``ctx.http``): http/https only; hosts in ``allowed_domains`` (names, ``*.suffix``,
  ``*``, IP literals, CIDRs), each on its own port (``api.example.com:443``, ``[fd00::5]:8443``) or,
  without one, on the ports in ``allowed_ports``; loopback, private, link-local and metadata addresses
  only through an IP/CIDR entry; a CIDR wider than /8 (/16 for IPv6) or covering loopback,
  link-local or metadata addresses makes the grant invalid unless it sets ``allow_wide_networks``.
  Names are not resolved: answers come from `http`. `authorize` also checks a tunnel's ``open
  {host, port}`` (port 443 only unless ``plaintext_tunnel``); the fake itself runs no tunnels.
- ``terminal``: ``cwd`` beneath a granted directory; no shell or interpreter unless ``shell: true``;
  results come from `terminal`.
- Any other capability answers through `handlers` and needs a grant entry like the others.

A grant entry counts as enabled unless it says ``"enabled": False``. `grants` apply to every component
of the Pack, like a Pack-wide grant file (``<pack_id>:*``); `component_grants` gives one component its
own entries, and for a capability a component's own entry replaces the Pack-wide one (never merged),
as in the broker. `authorize` is the pure check alone; the Rumi test suite runs it side by side
with the broker's own handlers on a table of cases, so the two agree.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import anyio
import msgspec

from ._errors import BrokerError, PermissionDenied
from ._pack import Pack
from ._wire import (
    ENCODER,
    LISTING_NAME,
    LISTING_TYPE,
    PROTOCOL_VERSION,
    REPLY_DECODER,
    REQUEST_DECODER,
    CallRequest,
    ToolList,
    error_reply,
    ok_reply,
)

__all__ = [
    "CallFailed",
    "FakeBroker",
    "RecordedRequest",
    "authorize",
]

DEFAULT_MAX_BYTES = 7 * 1024 * 1024  # the file scopes' default_config
MAX_PAYLOAD = 8 * 1024 * 1024  # a Pack account's NATS payload limit
MAX_RECORDED = 10_000

Responder: TypeAlias = Callable[..., Any]


class CallFailed(Exception):
    """The tool call failed as a caller (`rumi call`) would see it: a code and a message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class RecordedRequest:
    """One request the tool made: who asked, for what, and the broker's answer (`code` ``ok`` if allowed)."""

    component_id: str
    capability: str
    args: dict[str, Any]
    code: str
    message: str = ""

    @property
    def allowed(self) -> bool:
        return self.code == "ok"


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _deny(message: str) -> _Refused:
    return _Refused("permission_denied", message)


def _invalid(message: str) -> _Refused:
    return _Refused("invalid_request", message)


def _failed(message: str) -> _Refused:
    return _Refused("handler_error", message)


# --- argument shapes of the built-in capabilities (as the handlers' args_schema) --------------------


class _FileReadArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    path: str


class _FileWriteArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    path: str
    data: bytes
    parents: bool = False


class _EnvReadArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    key: str


class _NetworkArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Every op's keys; UNSET marks a key the request did not give (each op takes only its own)."""

    op: str = "fetch"
    method: str | msgspec.UnsetType | None = msgspec.UNSET
    url: str | msgspec.UnsetType | None = msgspec.UNSET
    headers: dict[str, str] | msgspec.UnsetType = msgspec.UNSET
    body: bytes | msgspec.UnsetType = msgspec.UNSET
    follow_redirects: bool | msgspec.UnsetType = msgspec.UNSET
    stream: bool | str | msgspec.UnsetType | None = msgspec.UNSET
    host: str | msgspec.UnsetType | None = msgspec.UNSET
    port: int | msgspec.UnsetType | None = msgspec.UNSET
    tunnel: str | msgspec.UnsetType | None = msgspec.UNSET
    data: bytes | msgspec.UnsetType = msgspec.UNSET
    eof: bool | msgspec.UnsetType = msgspec.UNSET
    max_bytes: int | msgspec.UnsetType = msgspec.UNSET
    wait: float | msgspec.UnsetType = msgspec.UNSET

    def given(self) -> list[str]:
        return [name for name in self.__struct_fields__ if getattr(self, name) is not msgspec.UNSET]

    def value(self, name: str, default: Any = None) -> Any:
        found = getattr(self, name)
        return default if found is msgspec.UNSET or found is None else found


_NETWORK_OPS = ("fetch", "open", "send", "recv", "read", "close")
_NETWORK_OP_FIELDS = {
    "fetch": frozenset({"op", "method", "url", "headers", "body", "follow_redirects", "stream"}),
    "open": frozenset({"op", "host", "port"}),
    "send": frozenset({"op", "tunnel", "data", "eof"}),
    "recv": frozenset({"op", "tunnel", "max_bytes", "wait"}),
    "read": frozenset({"op", "stream", "max_bytes", "wait"}),
    "close": frozenset({"op", "tunnel", "stream"}),
}
_NETWORK_REQUIRED = {
    "fetch": ("method", "url"),
    "open": ("host", "port"),
    "send": ("tunnel",),
    "recv": ("tunnel",),
    "read": ("stream",),
    "close": (),
}


class _TerminalArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    argv: list[str]
    cwd: str | None = None
    timeout: float | None = None
    stdin: bytes | None = None


_ARGS: dict[str, type[msgspec.Struct]] = {
    "file_read": _FileReadArgs,
    "file_write": _FileWriteArgs,
    "env_read": _EnvReadArgs,
    "network": _NetworkArgs,
    "terminal": _TerminalArgs,
}


def _convert(capability: str, args: Mapping[str, Any]) -> Any:
    schema = _ARGS.get(capability)
    if schema is None:
        return dict(args)
    try:
        return msgspec.convert(dict(args), schema)
    except msgspec.ValidationError as exc:
        raise _invalid(str(exc)) from None


# --- files ------------------------------------------------------------------------------------------


def _components(path: str) -> list[str]:
    return [c for c in path.split("/") if c]


def _grant_root(path: object, directories: list[str]) -> tuple[str, str]:
    """The granted directory holding `path` by components (the longest), and the rest of the path."""
    if not isinstance(path, str) or not path:
        raise _invalid("path must be a non-empty string")
    if "\0" in path:
        raise _invalid("path contains a NUL byte")
    if not path.startswith("/"):
        raise _invalid("path must be absolute (start with /)")
    want = _components(path)
    best: tuple[str, int] | None = None
    for directory in directories:
        if not isinstance(directory, str) or not directory.startswith("/") or "\0" in directory:
            continue
        have = _components(directory)
        if any(c in (".", "..") for c in have):
            continue  # an ambiguous grant never matches
        if want[: len(have)] == have and (best is None or len(have) > best[1]):
            best = (directory, len(have))
    if best is None:
        raise _deny("path is outside the granted directories")
    return best[0], "/".join(want[best[1] :]) or "."


def _check_path(path: object, directories: object, *, for_write: bool = False) -> None:
    granted = [d for d in directories if isinstance(d, str)] if isinstance(directories, list) else []
    if not granted:
        raise _deny("no directories are granted")
    if for_write and isinstance(path, str) and path.endswith("/"):
        raise _invalid("path must name a file, not end with /")
    _, rest = _grant_root(path, granted)
    last = (_components(rest) or ["."])[-1]
    if for_write and last in (".", ".."):
        raise _invalid("path must end with a file name")
    depth = 0
    for part in _components(rest):
        if part == "..":
            depth -= 1
            if depth < 0:
                raise _deny("path escapes the granted directory")
        elif part != ".":
            depth += 1


def _check_env(key: str, allowed: object) -> None:
    if not key or not isinstance(allowed, list) or key not in allowed:
        raise _deny("key is not granted")


# --- network ----------------------------------------------------------------------------------------

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

# Special-purpose blocks a name or `*` never reaches (the broker's table, reasons left out).
_V4_REFUSED = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "169.254.169.254/32", "169.254.170.2/32", "100.100.100.200/32", "192.0.0.192/32",
        "168.63.129.16/32", "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8",
        "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24",
        "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4",
        "240.0.0.0/4",
    )
)  # fmt: skip
_V6_REFUSED = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "fd00:ec2::254/128", "::/128", "::1/128", "::/96", "64:ff9b:1::/48", "100::/64", "2001::/32",
        "2001::/23", "2001:db8::/32", "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10", "fec0::/10",
        "ff00::/8",
    )
)  # fmt: skip
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_ALLOWED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC_LABEL_RE = re.compile(r"^(?:[0-9]+|0x[0-9a-f]*)$")
_SCHEME_AUTHORITY_RE = re.compile(r"^(?:([A-Za-z][A-Za-z0-9+.\-]*):)?//([^/?#]*)")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_AUTHORITY_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\[\]:@]+)(?::([0-9]{1,5}))?$")
_MAX_URL_CHARS = 8192


def _normalize(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _refused(address: IPAddress) -> bool:
    """True when a name or `*` may never reach `address` (loopback, private, metadata, reserved...)."""
    address = _normalize(address)
    if isinstance(address, ipaddress.IPv4Address):
        return any(address in n for n in _V4_REFUSED) or not address.is_global
    if any(address in n for n in _V6_REFUSED):
        return True
    embedded: ipaddress.IPv4Address | None = None
    if address in _NAT64:
        embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    elif address.sixtofour is not None:
        embedded = address.sixtofour
    if embedded is not None:
        return _refused(embedded)
    return address not in _GLOBAL_UNICAST or not address.is_global


def _parse_ip(text: str) -> IPAddress | None:
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        address = ipaddress.ip_address(inner)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        return None
    return _normalize(address)


def _name_problem(name: str) -> str | None:
    if not name:
        return "is empty"
    if len(name) > 253:
        return "is longer than 253 characters"
    labels = name.split(".")
    if any(not _LABEL_RE.match(label) for label in labels):
        return "is not a valid host name"
    if _NUMERIC_LABEL_RE.match(labels[-1]):
        return "looks like an IP address in a non-standard notation"
    return None


def _host_name(text: str) -> str:
    name = text[:-1] if text.endswith(".") else text
    if name.isascii():
        name = name.lower()
    else:
        try:
            name = name.encode("idna").decode("ascii")  # IDNA 2003 here; the broker uses UTS #46
        except UnicodeError:
            raise ValueError(f"host name {text!r} is not a valid internationalised name") from None
    problem = _name_problem(name)
    if problem is not None:
        raise ValueError(f"host name {text!r} {problem}")
    return name


@dataclass(frozen=True)
class _HostEntry:
    kind: str  # "any", "name", "suffix", "network" (an IP literal is a one-address network)
    name: str = ""
    network: IPNetwork | None = None
    port: int | None = None  # None: every port in allowed_ports


def _entry_port(digits: str, text: str) -> int:
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 5 and 1 <= int(digits) <= 65535):
        raise ValueError(f"allowed_domains entry {text!r}: the port must be a number 1-65535")
    return int(digits)


def _split_entry_port(entry: str, text: str) -> tuple[str, int | None, bool]:
    """(host, port or None, bracketed): `[v6]:port`, `[v6]`, `host:port` or `host` (a bare IPv6
    address or CIDR never carries a port)."""
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
        host, _, digits = entry.partition(":")
        return host, _entry_port(digits, text), False
    return entry, None, False


def _host_entry(text: str) -> _HostEntry:
    entry = text.strip()
    if not entry:
        raise ValueError("an allowed_domains entry is empty")
    if "://" in entry:
        raise ValueError(f"allowed_domains entry {text!r} is a URL")
    host, port, bracketed = _split_entry_port(entry, text)
    if host == "*":
        return _HostEntry("any", port=port)
    if "/" in host:
        net = ipaddress.ip_network(host, strict=False)
        if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
            mapped = net.network_address.ipv4_mapped
            if mapped is not None:
                v4 = ipaddress.IPv4Network((int(mapped), net.prefixlen - 96))
                return _HostEntry("network", network=v4, port=port)
        return _HostEntry("network", network=net, port=port)
    address = _parse_ip(host)
    if address is not None:
        return _HostEntry("network", network=ipaddress.ip_network(address), port=port)
    if bracketed or host.count(":") > 1:
        raise ValueError(f"allowed_domains entry {text!r} is not a valid IPv6 address")
    if host.startswith("*."):
        return _HostEntry("suffix", name=_host_name(host[2:]), port=port)
    if "*" in host:
        raise ValueError(f"allowed_domains entry {text!r} is not a host name")
    return _HostEntry("name", name=_host_name(host), port=port)


# Blocks a CIDR entry may cover only under `allow_wide_networks` (the broker's table, reasons left out).
_SENSITIVE_V4 = tuple(
    ipaddress.IPv4Network(n)
    for n in ("0.0.0.0/32", "127.0.0.0/8", "169.254.0.0/16", "100.100.100.200/32", "192.0.0.192/32",
              "168.63.129.16/32")
)  # fmt: skip


def _embeddings(v4: ipaddress.IPv4Network) -> list[ipaddress.IPv6Network]:
    """IPv4-mapped, NAT64 and 6to4 forms of an IPv4 block."""
    base = int(v4.network_address)
    return [
        ipaddress.IPv6Network(((0xFFFF << 32) | base, 96 + v4.prefixlen)),
        ipaddress.IPv6Network((int(_NAT64.network_address) | base, 96 + v4.prefixlen)),
        ipaddress.IPv6Network(((0x2002 << 112) | (base << 80), 16 + v4.prefixlen)),
    ]


_SENSITIVE_V6 = (
    *(ipaddress.IPv6Network(n) for n in ("::/128", "::1/128", "fe80::/10", "fd00:ec2::254/128")),
    *(embedded for net in _SENSITIVE_V4 for embedded in _embeddings(net)),
)
_WIDEST_PREFIX = {4: 8, 6: 16}


def _is_wide(entry: _HostEntry) -> bool:
    """True when the entry needs `allow_wide_networks`: a block wider than /8 (/16), or one covering
    loopback, link-local or metadata addresses; a single address only when it is unspecified."""
    network = entry.network
    if network is None:
        return False
    if network.num_addresses == 1:
        return network.network_address.is_unspecified
    if network.prefixlen < _WIDEST_PREFIX[network.version]:
        return True
    sensitive: tuple[IPNetwork, ...] = _SENSITIVE_V4 if network.version == 4 else _SENSITIVE_V6
    return any(network.overlaps(s) for s in sensitive if s.version == network.version)


@dataclass(frozen=True)
class _Destination:
    scheme: str
    host: str
    address: IPAddress | None
    port: int


def _destination(url: object) -> _Destination:
    if not isinstance(url, str):
        raise _invalid("url must be a string")
    if len(url) > _MAX_URL_CHARS:
        raise _invalid(f"URL is longer than {_MAX_URL_CHARS} characters")
    if "\\" in url:
        raise _invalid("URL contains a backslash")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise _invalid("URL contains a space or control character")
    m = _SCHEME_AUTHORITY_RE.match(url)
    scheme_match = _SCHEME_RE.match(url)
    scheme = (scheme_match.group(1) if scheme_match else "").lower()
    if not scheme:
        raise _invalid("URL must be absolute and start with http:// or https://")
    if scheme not in _DEFAULT_PORTS:
        raise _deny(f"scheme {scheme!r} is not allowed; only http and https")
    authority = m.group(2) if m else ""
    if "@" in authority:
        raise _invalid("URLs with user info (user@host) are not accepted")
    parts = _AUTHORITY_RE.match(authority)
    if not authority or parts is None:
        raise _invalid("URL has no host, or its host or port is malformed")
    raw_host, raw_port = parts.group(1), parts.group(2)
    address: IPAddress | None = None
    if ":" in raw_host:
        address = _parse_ip(raw_host)
        if address is None:
            raise _invalid("URL host is not a valid IPv6 address")
        host = str(address)
    elif re.fullmatch(r"[0-9.]+", raw_host):
        try:
            address = ipaddress.IPv4Address(raw_host)
        except ValueError:
            raise _invalid(f"URL host {raw_host!r} is not a valid IPv4 address") from None
        host = str(address)
    else:
        try:
            host = _host_name(raw_host)
        except ValueError as exc:
            raise _invalid(f"URL {exc}") from None
    port = int(raw_port) if raw_port else _DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise _invalid(f"URL port {port} is out of range 1-65535")
    return _Destination(scheme, host, address, port)


_TLS_TUNNEL_PORT = 443
_TUNNEL_HOST_RE = re.compile(r"^[A-Za-z0-9._-]{1,253}$")
_TUNNEL_V6_HOST_RE = re.compile(r"^\[?[0-9A-Fa-f:.]{2,45}\]?$")


@dataclass(frozen=True)
class _NetworkGrant:
    """A grant's host entries and ports, typed once; `invalid` when the broker would refuse the grant."""

    entries: tuple[_HostEntry, ...]
    ports: frozenset[int]
    plaintext_tunnel: bool

    @classmethod
    def of(cls, grant: Mapping[str, Any]) -> _NetworkGrant:
        domains = grant.get("allowed_domains") or []
        ports = grant.get("allowed_ports") or []
        try:
            if not isinstance(domains, list) or not isinstance(ports, list):
                raise ValueError("allowed_domains and allowed_ports are lists")
            entries = tuple(_host_entry(d) for d in domains)
            if any(type(p) is not int or not 1 <= p <= 65535 for p in ports):
                raise ValueError("a port is not a number 1-65535")
            if grant.get("allow_wide_networks") is not True and any(_is_wide(e) for e in entries):
                raise ValueError("a wide network without allow_wide_networks")
        except (ValueError, TypeError, AttributeError):
            raise _failed("the network grant is invalid; ask the admin to fix it") from None
        return cls(entries, frozenset(ports), grant.get("plaintext_tunnel") is True)

    def _port_ok(self, entry: _HostEntry, port: int) -> bool:
        return port in self.ports if entry.port is None else port == entry.port

    def check(self, dest: _Destination) -> None:
        """Refuse unless one entry covers the destination's host *and* its port."""
        if dest.address is not None:
            address = dest.address
            matched = [
                e for e in self.entries
                if e.network is not None and e.network.version == address.version and address in e.network
            ]  # fmt: skip
            if not _refused(address):
                matched += [e for e in self.entries if e.kind == "any"]
            elif not matched:
                raise _deny(f"address {dest.host} is not reachable by name; grant it as an IP/CIDR entry")
        else:
            matched = [
                e for e in self.entries
                if e.kind == "any"
                or (e.kind == "name" and e.name == dest.host)
                or (e.kind == "suffix" and dest.host.endswith("." + e.name))
            ]  # fmt: skip
        if not matched:
            raise _deny(f"host {dest.host} is not granted (allowed_domains)")
        if not any(self._port_ok(e, dest.port) for e in matched):
            raise _deny(
                f"port {dest.port} is not granted for {dest.host} (allowed_ports, or a host:port entry)"
            )

    def check_tunnel(self, host: object, port: object) -> None:
        """`open {host, port}`: the same check, and a port other than 443 only under plaintext_tunnel."""
        if type(port) is not int or not 1 <= port <= 65535:
            raise _invalid("port must be an integer 1-65535")
        if not isinstance(host, str) or not host:
            raise _invalid("host must be a non-empty string")
        if _TUNNEL_HOST_RE.match(host):
            authority = host
        elif _TUNNEL_V6_HOST_RE.match(host):
            authority = host if host.startswith("[") else f"[{host}]"
        else:
            raise _invalid("host must be a host name or an IP address (no scheme, port, path or user info)")
        dest = _destination(f"https://{authority}:{port}/")
        self.check(dest)
        if dest.port != _TLS_TUNNEL_PORT and not self.plaintext_tunnel:
            raise _deny(f"tunnels to port {dest.port} are not granted: only port 443 unless plaintext_tunnel")


def _check_network_fields(args: _NetworkArgs) -> None:
    """Each op's own keys, as the network handler checks them."""
    if args.op not in _NETWORK_OP_FIELDS:
        raise _invalid(f"op {args.op[:20]!r} is not one of {', '.join(_NETWORK_OPS)}")
    extra = sorted(k for k in args.given() if k not in _NETWORK_OP_FIELDS[args.op])
    if extra:
        raise _invalid(f"op {args.op!r} does not take `{extra[0]}`")
    missing = [k for k in _NETWORK_REQUIRED[args.op] if args.value(k) is None]
    if missing:
        raise _invalid(f"op {args.op!r} needs `{missing[0]}`")
    stream = args.value("stream")
    if args.op == "fetch" and stream is not None and not isinstance(stream, bool):
        raise _invalid("`stream` of a fetch is true or false")
    if args.op == "read" and not isinstance(stream, str):
        raise _invalid("op 'read' needs `stream`: the id a streamed fetch returned")
    if args.op == "close" and (args.value("tunnel") is None) == (stream is None):
        raise _invalid("op 'close' needs exactly one of `tunnel` or `stream`")
    if args.op == "close" and stream is not None and not isinstance(stream, str):
        raise _invalid("`stream` of a close is the id a streamed fetch returned")


def _check_network(args: _NetworkArgs, grant: Mapping[str, Any]) -> None:
    _check_network_fields(args)
    if args.op not in ("fetch", "open"):
        return  # a continuation: checked against its tunnel's grant by the broker
    typed = _NetworkGrant.of(grant)
    if args.op == "fetch":
        typed.check(_destination(args.value("url", "")))
    else:
        typed.check_tunnel(args.value("host"), args.value("port"))


# --- terminal ---------------------------------------------------------------------------------------

_SHELLS = frozenset(
    {"sh", "bash", "rbash", "dash", "ash", "zsh", "ksh", "ksh93", "mksh", "pdksh", "oksh", "yash", "posh",
     "csh", "tcsh", "fish", "elvish", "nu", "xonsh", "pwsh", "busybox", "toybox",
     "python", "python3", "python3.11", "python3.12", "python3.13", "perl", "ruby", "php", "node",
     "nodejs", "lua", "tclsh", "wish", "awk", "gawk", "mawk", "nawk", "expect"}
)  # fmt: skip
_WRAPPERS = frozenset(
    {"env", "nice", "nohup", "timeout", "stdbuf", "setsid", "xargs", "time", "ionice", "taskset", "chrt",
     "flock", "sudo", "su", "doas", "runuser", "unshare", "nsenter", "chroot", "watch", "script",
     "numactl", "setpriv", "setarch", "linux32", "linux64", "prlimit", "sg", "strace", "ltrace",
     "command", "exec", "builtin", "eval"}
)  # fmt: skip
_MAX_ARGV_CHARS = 256 * 1024


def _check_terminal(args: _TerminalArgs, grant: Mapping[str, Any]) -> str:
    argv = list(args.argv)
    if not argv or not argv[0]:
        raise _invalid("argv[0] must be a non-empty program name")
    if any("\0" in a for a in argv):
        raise _invalid("argv contains a NUL character")
    if sum(len(a) for a in argv) > _MAX_ARGV_CHARS:
        raise _invalid(f"argv is longer than {_MAX_ARGV_CHARS} characters in total")
    if grant.get("shell") is not True:
        first = posixpath.basename(argv[0])
        if first in _SHELLS or (
            first in _WRAPPERS and any(posixpath.basename(a) in _SHELLS for a in argv[1:])
        ):
            raise _deny(f"{first!r} is or runs a shell or interpreter and this grant has no `shell: true`")
    dirs = grant.get("directories")
    if not isinstance(dirs, list) or not dirs or not all(isinstance(d, str) for d in dirs):
        raise _deny("no directories are granted to terminal")
    directories = ["/" + "/".join(_components(d)) for d in dirs]
    cwd = args.cwd
    if cwd is None:
        return directories[0]
    if "\0" in cwd:
        raise _invalid("cwd contains a NUL character")
    if not cwd.startswith("/"):
        raise _invalid("cwd must be absolute (start with /)")
    if any(c in (".", "..") for c in cwd.split("/")):
        raise _invalid("cwd must not contain . or .. components")
    _grant_root(cwd, directories)
    return "/" + "/".join(_components(cwd))


# --- the pure check ---------------------------------------------------------------------------------


def _authorize(capability: str, grant: Mapping[str, Any], args: Any) -> None:
    if isinstance(args, _FileReadArgs):
        _check_path(args.path, grant.get("directories") or [])
    elif isinstance(args, _FileWriteArgs):
        max_bytes = int(grant.get("max_bytes", DEFAULT_MAX_BYTES))
        if len(args.data) > max_bytes:
            raise _Refused("too_large", f"data is larger than {max_bytes} bytes")
        _check_path(args.path, grant.get("directories") or [], for_write=True)
    elif isinstance(args, _EnvReadArgs):
        _check_env(args.key, grant.get("allowed_keys") or [])
    elif isinstance(args, _NetworkArgs):
        _check_network(args, grant)
    elif isinstance(args, _TerminalArgs):
        _check_terminal(args, grant)


def authorize(capability: str, grant: Mapping[str, Any], args: Mapping[str, Any]) -> None:
    """Raise BrokerError (PermissionDenied for a refusal) unless `grant` allows this request.

    The pure part of the broker's decision for a built-in capability, on the arguments alone: what
    its handler's `authorize` refuses, this refuses with the same code. `grant` is the entry merged
    over the scope's defaults (``enabled`` is not looked at here).
    """
    try:
        _authorize(capability, grant, _convert(capability, args))
    except _Refused as exc:
        if exc.code == "permission_denied":
            raise PermissionDenied(exc.message) from None
        raise BrokerError(exc.code, exc.message) from None


# --- the fake broker --------------------------------------------------------------------------------


class _Msg:
    def __init__(self, data: bytes) -> None:
        self.data = data


def _response(value: Any) -> dict[str, Any]:
    if isinstance(value, bytes | str):
        body = value.encode() if isinstance(value, str) else value
        return {"status": 200, "headers": [], "body": body}
    if isinstance(value, Mapping):
        headers = value.get("headers", [])
        if isinstance(headers, Mapping):
            headers = [[k, v] for k, v in headers.items()]
        body = value.get("body", b"")
        return {
            "status": int(value.get("status", 200)),
            "headers": [list(h) for h in headers],
            "body": body.encode() if isinstance(body, str) else bytes(body),
        }
    raise TypeError(f"a fake HTTP response is bytes, str or a dict, not {type(value).__name__}")


@dataclass
class FakeBroker:
    """A broker in memory: enforces `grants`, answers from `files`, `env`, `http`, `terminal`, `handlers`.

    - `grants`: capability → grant entry (as in a grant file's ``permissions``), for every component
      (a Pack-wide grant, ``<pack_id>:*``).
    - `component_grants`: component id → capability → grant entry, one component's own grant file; its
      entry for a capability (even a disabled one) replaces the Pack-wide entry.
    - `files`: absolute path → bytes; writes land here too.
    - `env`: key → value for ``env_read``.
    - `http`: ``"URL"`` or ``"METHOD URL"`` → bytes, str or ``{"status", "headers", "body"}``; or a
      function ``(method, url, headers, body)`` returning one of those.
    - `terminal`: a function ``(argv, cwd, stdin)`` returning ``{"exit_code", "stdout", "stderr"}``.
    - `handlers`: capability → function ``(grant, args)`` returning the data, for workspace handlers.

    `requests` records every request the tools made, allowed or not.
    """

    grants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    component_grants: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    http: Mapping[str, Any] | Responder | None = None
    terminal: Responder | None = None
    handlers: Mapping[str, Responder] = field(default_factory=dict)
    pack_id: str = "pack"
    max_payload: int = MAX_PAYLOAD
    requests: list[RecordedRequest] = field(default_factory=list)
    directories: set[str] = field(default_factory=set)

    # -- calling tools

    async def call(
        self, pack: Pack, name: str, args: Mapping[str, Any] | None = None, *, type: str = "tool"
    ) -> Any:
        """Call the tool `type`:`name` of `pack` as `rumi call` would; its data, or CallFailed."""
        data = ENCODER.encode(CallRequest(v=PROTOCOL_VERSION, id="test-call", args=dict(args or {})))
        restore = pack.pack_id
        pack.pack_id = restore or self.pack_id
        try:
            answer = await pack.answer_call(self, type, name, data)
        finally:
            pack.pack_id = restore
        reply = REPLY_DECODER.decode(answer)
        if not reply.success:
            err = reply.error
            raise CallFailed(err.code, err.message) if err else CallFailed("handler_error", "no error given")
        return reply.data

    def call_sync(
        self, pack: Pack, name: str, args: Mapping[str, Any] | None = None, *, type: str = "tool"
    ) -> Any:
        """`call` from synchronous code (a plain pytest test)."""
        return anyio.run(lambda: self.call(pack, name, args, type=type))

    async def list_tools(self, pack: Pack) -> ToolList:
        """What `rumi tools` would show for `pack`: its tools and their argument schemas."""
        tools = await self.call(pack, LISTING_NAME, type=LISTING_TYPE)
        return msgspec.convert(tools, ToolList)

    # -- the Connection a Context talks to

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 0.5) -> _Msg:
        """Answer one request from a tool's Context, as the broker would."""
        parts = subject.split(".")
        request_id = ""
        try:
            req = REQUEST_DECODER.decode(payload)
            request_id = req.id
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return _Msg(error_reply("", "invalid_request", f"malformed request: {exc}"))
        if len(parts) != 5 or parts[:2] != ["rumi", "pack"] or parts[3] != "req":
            return _Msg(error_reply(request_id, "invalid_request", "malformed request subject"))
        pack_id, capability = parts[2], parts[4]
        args = dict(req.args)
        try:
            if req.v != PROTOCOL_VERSION:
                raise _invalid(f"unsupported protocol version {req.v}")
            data = await self._decide_and_run(pack_id, req.component_id, capability, args)
        except _Refused as exc:
            self._record(req.component_id, capability, args, exc.code, exc.message)
            return _Msg(error_reply(request_id, exc.code, exc.message))
        except BrokerError as exc:
            self._record(req.component_id, capability, args, exc.code, exc.message)
            return _Msg(error_reply(request_id, exc.code, exc.message))
        self._record(req.component_id, capability, args, "ok")
        return _Msg(ok_reply(request_id, data))

    def _record(
        self, component_id: str, capability: str, args: dict[str, Any], code: str, message: str = ""
    ) -> None:
        if len(self.requests) < MAX_RECORDED:
            self.requests.append(RecordedRequest(component_id, capability, args, code, message))

    async def _decide_and_run(
        self, pack_id: str, component_id: str, capability: str, raw: dict[str, Any]
    ) -> Any:
        if capability not in _ARGS and capability not in self.handlers:
            raise _Refused("unknown_capability", f"unknown capability {capability!r}")
        if component_id.split(":")[0] != pack_id or component_id.count(":") != 2:
            raise _deny(f"component {component_id!r} does not belong to pack {pack_id!r}")
        own = self.component_grants.get(component_id, {})
        entry = own[capability] if capability in own else self.grants.get(capability)
        if entry is None or entry.get("enabled", True) is not True:
            raise _deny(f"no grant for {capability} on component {component_id}")
        grant: dict[str, Any] = dict(entry)
        if capability in ("file_read", "file_write"):
            grant.setdefault("max_bytes", DEFAULT_MAX_BYTES)
        args = _convert(capability, raw)
        _authorize(capability, grant, args)
        if isinstance(args, _FileReadArgs):
            return self._read(args.path, grant)
        if isinstance(args, _FileWriteArgs):
            return {"bytes_written": self._write(args, grant)}
        if isinstance(args, _EnvReadArgs):
            if args.key not in self.env:
                raise _failed("key is not set")
            return self.env[args.key]
        if isinstance(args, _NetworkArgs):
            return self._fetch(args)
        if isinstance(args, _TerminalArgs):
            return self._terminal(args, grant)
        return self.handlers[capability](grant, args)

    # -- files in memory

    def _known_directory(self, path: str, grant: Mapping[str, Any]) -> bool:
        roots = {"/" + "/".join(_components(d)) for d in grant.get("directories") or [] if isinstance(d, str)}
        if path in roots or path in self.directories:
            return True
        prefix = path.rstrip("/") + "/"
        return any(f.startswith(prefix) for f in self.files)

    def _read(self, path: str, grant: Mapping[str, Any]) -> bytes:
        real = posixpath.normpath(path)
        if real in self.files:
            data = self.files[real]
            if len(data) > int(grant["max_bytes"]):
                raise _Refused("too_large", f"file is larger than {grant['max_bytes']} bytes")
            return data
        if self._known_directory(real, grant):
            raise _failed("path is a directory")
        raise _failed("no such file")

    def _write(self, args: _FileWriteArgs, grant: Mapping[str, Any]) -> int:
        real = posixpath.normpath(args.path)
        if self._known_directory(real, grant):
            raise _failed("path is a directory")
        parent = posixpath.dirname(real)
        if not self._known_directory(parent, grant):
            if not args.parents:
                raise _failed("no such file")
            root, _ = _grant_root(real, list(grant.get("directories") or []))
            below = parent
            while below != root.rstrip("/") and below not in ("/", ""):
                if below in self.files:
                    raise _failed("a component of the path is not a directory")
                self.directories.add(below)
                below = posixpath.dirname(below)
        self.files[real] = bytes(args.data)
        return len(args.data)

    # -- network and terminal

    def _fetch(self, args: _NetworkArgs) -> dict[str, Any]:
        if args.op != "fetch" or args.value("stream") is True:
            raise _invalid(f"op {args.op[:20]!r}: the fake broker runs no tunnels or streams (use ctx.http)")
        method = str(args.value("method", "")).upper()
        if method not in _ALLOWED_METHODS:
            raise _invalid(f"method {args.value('method')!r} is not allowed")
        url = str(args.value("url", ""))
        if callable(self.http):
            return _response(self.http(method, url, dict(args.value("headers", {})), args.value("body", b"")))
        table = self.http or {}
        for key in (f"{method} {url}", url):
            if key in table:
                return _response(table[key])
        raise _failed(f"the fake broker has no response for {method} {url} (pass http={{...}})")

    def _terminal(self, args: _TerminalArgs, grant: Mapping[str, Any]) -> dict[str, Any]:
        cwd = _check_terminal(args, grant)
        if self.terminal is None:
            raise _failed("the fake broker runs no commands (pass terminal=...)")
        result = dict(self.terminal(list(args.argv), cwd, args.stdin))
        return {
            "exit_code": int(result.get("exit_code", 0)),
            "stdout": bytes(result.get("stdout", b"")),
            "stderr": bytes(result.get("stderr", b"")),
            "timed_out": bool(result.get("timed_out", False)),
            "truncated": False,
        }
