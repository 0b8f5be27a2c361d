"""broker.backends.egress: grant entries, URL parsing, address classification, pinning, the SSRF corpus.

Table tests need no network. The corpus test sends everything through the shipped handler inside a
loopback-only network namespace (`_netns`), with `allowed_domains: ["*"]` and every port granted.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from pathlib import Path
from typing import Any

import httpcore
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.backends import egress as _egress
from broker.backends.egress import (
    Address,
    AnyHost,
    EgressPolicy,
    HostName,
    Network,
    PinnedBackend,
    SubdomainsOf,
    parse_destination,
    parse_host_entry,
    refusal_reason,
)
from broker.core.errors import Denied, HandlerFailed, InvalidRequest, RequestError
from tests._netns import CORPORA, Listener, ScriptedResolver, call_network, run_in_netns

HERE = Path(__file__).resolve()
ip = ipaddress.ip_address


def test_all_names_exist() -> None:
    assert sorted(_egress.__all__) == _egress.__all__
    for name in _egress.__all__:
        assert hasattr(_egress, name), name


# --- grant entries --------------------------------------------------------------------------------

ENTRY_TABLE: list[tuple[str, Any]] = [
    ("*", AnyHost()),
    ("example.com", HostName("example.com")),
    ("Example.COM.", HostName("example.com")),
    ("  api.example.com ", HostName("api.example.com")),
    ("*.Example.com.", SubdomainsOf("example.com")),
    ("bücher.example", HostName("xn--bcher-kva.example")),
    ("BÜCHER.example", HostName("xn--bcher-kva.example")),
    ("xn--bcher-kva.example", HostName("xn--bcher-kva.example")),
    ("\uff45xample.com", HostName("example.com")),  # UTS 46 maps fullwidth letters
    ("_service.example.com", HostName("_service.example.com")),
    ("localhost", HostName("localhost")),
    ("127.0.0.1", Address(ip("127.0.0.1"))),
    ("::1", Address(ip("::1"))),
    ("[::1]", Address(ip("::1"))),
    ("::ffff:127.0.0.1", Address(ip("127.0.0.1"))),
    ("[::ffff:7f00:1]", Address(ip("127.0.0.1"))),
    ("10.0.0.0/8", Network(ipaddress.ip_network("10.0.0.0/8"))),
    ("10.1.2.3/8", Network(ipaddress.ip_network("10.0.0.0/8"))),
    ("fd00::/8", Network(ipaddress.ip_network("fd00::/8"))),
    ("::ffff:10.0.0.0/104", Network(ipaddress.ip_network("10.0.0.0/8"))),
    ("169.254.169.254/32", Network(ipaddress.ip_network("169.254.169.254/32"))),
    # An entry may carry its own port (then allowed_ports does not apply to it).
    ("api.example.com:443", HostName("api.example.com", 443)),
    ("API.Example.com.:8443", HostName("api.example.com", 8443)),
    ("*.example.com:443", SubdomainsOf("example.com", 443)),
    ("*:443", AnyHost(443)),
    ("10.0.0.5:8080", Address(ip("10.0.0.5"), 8080)),
    ("[::1]:443", Address(ip("::1"), 443)),
    ("[fd00::5]:8443", Address(ip("fd00::5"), 8443)),
    ("[::ffff:127.0.0.1]:80", Address(ip("127.0.0.1"), 80)),
    ("10.0.0.0/24:8080", Network(ipaddress.ip_network("10.0.0.0/24"), 8080)),
    ("[fd00::/64]:8443", Network(ipaddress.ip_network("fd00::/64"), 8443)),
    ("::1:443", Address(ip("::1:443"))),  # an IPv6 address without brackets never carries a port
]

BAD_ENTRIES = [
    "", "   ", "a.*.com", "*example.com", "**.example.com", "*.", "example.com:0", "example.com:65536",
    "example.com:+443", "example.com:", "example.com:443:80", ":443", "[1.2.3.4]:80", "[::1]x", "[::1",
    "[::1]:", "fd00::/8:443", "a:b:c", "example.com:\uff14\uff14\uff13",
    "https://example.com", "example.com/path", "10.0.0.0/33", "0x7f.1", "2130706433", "127.1", "1.2.3",
    "example.0x10", "exa mple.com", "-example.com", "example-.com", "a..b", ".example.com", "fe80::1%eth0",
    "x" * 64 + ".com", "*.*.example.com",
]


@pytest.mark.parametrize(("text", "expected"), ENTRY_TABLE)
def test_grant_entries_are_normalised_once(text: str, expected: Any) -> None:
    entry = parse_host_entry(text)
    assert entry == expected
    assert parse_host_entry(str(entry)) == entry  # an entry prints as it is written


@pytest.mark.parametrize("text", BAD_ENTRIES)
def test_bad_grant_entries_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_entry(text)


def test_bad_ports_are_refused() -> None:
    for ports in ([0], [65536], [-1], [True], ["443"]):
        with pytest.raises(ValueError):
            EgressPolicy.from_grant([], ports)  # type: ignore[list-item]


# --- matching (no resolution) ---------------------------------------------------------------------

MATCH_TABLE: list[tuple[list[str], str, bool]] = [
    (["example.com"], "https://example.com/", True),
    (["example.com"], "https://EXAMPLE.com./", True),
    (["Example.com."], "https://example.com/", True),
    (["example.com"], "https://www.example.com/", False),
    (["example.com"], "https://example.com.evil.com/", False),
    (["example.com"], "https://evilexample.com/", False),
    (["*.example.com"], "https://a.example.com/", True),
    (["*.example.com"], "https://a.b.c.example.com/", True),
    (["*.example.com"], "https://example.com/", False),  # the wildcard is for subdomains only
    (["*.example.com"], "https://badexample.com/", False),
    (["*.example.com"], "https://example.com.evil.com/", False),
    (["bücher.example"], "https://BÜCHER.example/", True),
    (["bücher.example"], "https://xn--bcher-kva.example/", True),
    (["granted.com"], "https://gr\u0430nted.com/", False),  # Cyrillic a: another name
    (["*"], "https://anything.test/", True),
    (["*"], "https://1.1.1.1/", True),
    (["*"], "https://127.0.0.1/", False),  # a wildcard never reaches a refused address
    (["*"], "https://[::1]/", False),
    (["*"], "http://[::ffff:127.0.0.1]/", False),
    (["*"], "http://[::ffff:a9fe:a9fe]/", False),
    (["*"], "http://[64:ff9b::a9fe:a9fe]/", False),
    (["*"], "https://169.254.169.254/", False),
    (["*.example.com"], "https://1.1.1.1/", False),
    (["1.1.1.1"], "https://1.1.1.1/", True),
    (["1.1.1.0/24"], "https://1.1.1.7/", True),
    (["1.1.1.0/24"], "https://1.1.2.7/", False),
    (["127.0.0.1"], "https://127.0.0.1/", True),
    (["127.0.0.1"], "https://[::ffff:127.0.0.1]/", True),
    (["::ffff:127.0.0.1"], "https://127.0.0.1/", True),
    (["127.0.0.0/8"], "https://127.9.9.9/", True),
    (["::ffff:127.0.0.0/104"], "https://127.9.9.9/", True),
    (["127.0.0.1"], "https://127.0.0.2/", False),
    (["::1"], "https://[0:0::1]/", True),
    (["10.0.0.0/8"], "https://[::ffff:10.1.2.3]/", True),
    (["example.com"], "https://example.com:443/", True),
    # Entries with a port: that port only, whatever allowed_ports (here [443]) says.
    (["example.com:8443"], "https://example.com:8443/", True),
    (["example.com:8443"], "https://example.com/", False),
    (["example.com:8443", "other.com"], "https://other.com:8443/", False),
    (["*.example.com:80"], "http://a.example.com/", True),
    (["*.example.com:80"], "https://a.example.com/", False),
    (["*:80"], "http://anything.test/", True),
    (["*:80"], "https://anything.test/", False),
    (["*:80"], "http://127.0.0.1/", False),
    (["127.0.0.1:8080"], "http://127.0.0.1:8080/", True),
    (["127.0.0.1:8080"], "https://127.0.0.1/", False),
    (["127.0.0.1:8080", "api.example.com"], "https://127.0.0.1/", False),  # the cross product is gone
    (["127.0.0.1:8080", "api.example.com"], "https://api.example.com:8080/", False),
    (["127.0.0.1:8080", "api.example.com"], "https://api.example.com/", True),
    (["[::1]:8443"], "https://[::1]:8443/", True),
    (["[::1]:8443"], "https://[::1]/", False),
    (["10.0.0.0/24:8080"], "http://10.0.0.9:8080/", True),
    (["10.0.0.0/24:8080"], "https://10.0.0.9/", False),
    (["[fd00::/64]:8443"], "https://[fd00::9]:8443/", True),
    (["[fd00::/64]:8443"], "https://[fd00::9]/", False),
]


@pytest.mark.parametrize(("entries", "url", "allowed"), MATCH_TABLE)
def test_grant_matching(entries: list[str], url: str, allowed: bool) -> None:
    # Matching alone: the load-time rule on wide CIDRs is tested below.
    policy = EgressPolicy.from_grant(entries, [443], allow_wide_networks=True)
    dest = parse_destination(url)
    if allowed:
        policy.check_destination(dest)
    else:
        with pytest.raises(Denied):
            policy.check_destination(dest)


@pytest.mark.parametrize(("url", "port", "allowed"), [
    ("http://example.com/", 80, True), ("http://example.com:80/", 80, True),
    ("https://example.com/", 80, False), ("https://example.com/", 443, True),
    ("http://example.com:8080/", 80, False), ("http://example.com:8080/", 8080, True),
])
def test_ports_must_be_granted_explicitly(url: str, port: int, allowed: bool) -> None:
    policy = EgressPolicy.from_grant(["example.com"], [port])
    if allowed:
        policy.check_destination(parse_destination(url))
    else:
        with pytest.raises(Denied, match="port"):
            policy.check_destination(parse_destination(url))


def test_a_port_refusal_names_the_entry_that_would_allow_it() -> None:
    policy = EgressPolicy.from_grant(["example.com", "10.0.0.5:8080", "[fd00::5]:8443"], [443])
    cases = [
        ("https://example.com:8080/", "port 8080 is not granted for example.com .*example.com:8080"),
        ("https://10.0.0.5/", "port 443 is not granted for 10.0.0.5 .*10.0.0.5:443"),
        ("https://[fd00::5]/", r"port 443 is not granted for fd00::5 .*\[fd00::5\]:443"),
    ]
    for url, message in cases:
        with pytest.raises(Denied, match=message):
            policy.check_destination(parse_destination(url))


# (entry, why it needs allow_wide_networks, or None when it does not)
WIDE_TABLE: list[tuple[str, str | None]] = [
    ("0.0.0.0/0", "wider than /8"),
    ("::/0", "wider than /16"),
    ("8.0.0.0/7", "wider than /8"),
    ("2000::/3", "wider than /16"),
    ("fd00::/8", "wider than /16"),
    ("127.0.0.0/8", "loopback"),
    ("127.0.0.0/30:80", "loopback"),
    ("::ffff:127.0.0.0/104", "loopback"),
    ("0.0.0.0/8", "unspecified"),
    ("0.0.0.0", "unspecified"),
    ("[::]:80", "unspecified"),
    ("169.254.0.0/16", "link-local and cloud metadata"),
    ("169.254.169.0/24", "metadata"),
    ("100.64.0.0/10", "metadata"),  # CGNAT holds Alibaba's 100.100.100.200
    ("168.63.0.0/16", "Azure"),
    ("fe80::/64", "link-local"),
    ("[fd00:ec2::/64]:80", "metadata"),
    ("64:ff9b::7f00:0/120", "loopback addresses, embedded in IPv6"),  # NAT64 of 127.0.0.0/24
    ("2002:7f00::/24", "loopback addresses, embedded in IPv6"),  # 6to4 of 127/8
    ("10.0.0.0/8", None),  # private, but nothing special at this layer (Rumi's pool: the policy's check)
    ("192.168.0.0/16", None),
    ("1.0.0.0/8", None),
    ("fd12:3456::/32", None),
    ("127.0.0.1", None),  # one address is named on purpose
    ("127.0.0.1/32", None),
    ("169.254.169.254", None),
    ("[::1]:8080", None),
    ("api.example.com", None),
    ("*", None),
]


@pytest.mark.parametrize(("text", "why"), WIDE_TABLE)
def test_wide_networks_need_allow_wide_networks(text: str, why: str | None) -> None:
    assert (_egress.wide_network_reason(parse_host_entry(text)) is None) == (why is None)
    EgressPolicy.from_grant([text], [443], allow_wide_networks=True)  # the flag allows every one
    if why is None:
        EgressPolicy.from_grant([text], [443])
        return
    with pytest.raises(ValueError) as info:
        EgressPolicy.from_grant(["api.example.com", text], [443])
    message = str(info.value)
    assert why in message and '"allow_wide_networks": true' in message and "\n" not in message


def test_reserved_networks_are_wide_too() -> None:
    pool = ipaddress.ip_network("10.213.0.0/16")
    for text in ("10.0.0.0/8", "10.213.5.0/24", "10.213.0.0/16:4222"):
        with pytest.raises(ValueError, match=re.escape("Docker address pool 10.213.0.0/16")):
            EgressPolicy.from_grant([text], [443], reserved=[pool])
    EgressPolicy.from_grant(["10.214.0.0/16", "10.213.0.7"], [443], reserved=[pool])


def test_tunnels_reach_port_443_only_unless_plaintext_is_granted() -> None:
    entries = ["granted.test", "granted.test:8443", "127.0.0.1:9000"]
    tls_only = EgressPolicy.from_grant(entries, [443])
    plaintext = EgressPolicy.from_grant(entries, [443], plaintext_tunnel=True)
    tls_only.check_tunnel(parse_destination("https://granted.test:443/"))
    for url in ("https://granted.test:8443/", "https://127.0.0.1:9000/"):
        dest = parse_destination(url)
        tls_only.check_destination(dest)  # granted for a fetch ...
        with pytest.raises(Denied, match='"plaintext_tunnel": true'):
            tls_only.check_tunnel(dest)  # ... but no tunnel without the flag
        plaintext.check_tunnel(dest)
    with pytest.raises(Denied, match="port 80 is not granted"):
        plaintext.check_tunnel(parse_destination("http://granted.test/"))  # the flag grants no port


def test_a_resolved_address_needs_an_entry_for_the_requested_port() -> None:
    dest = parse_destination("https://db.internal:5432/")
    other_port = EgressPolicy.from_grant(["db.internal:5432", "10.1.2.3"], [443])
    with pytest.raises(Denied, match=re.escape("granted on other ports only; add 10.1.2.3:5432")):
        other_port.check_addresses(dest, [ip("10.1.2.3")])
    same_port = EgressPolicy.from_grant(["db.internal:5432", "10.1.2.3:5432"], [])
    assert same_port.check_addresses(dest, [ip("10.1.2.3")]) == (ip("10.1.2.3"),)
    assert same_port.covers_address(ip("10.1.2.3"), 5432) and not same_port.covers_address(ip("10.1.2.3"), 443)


# --- URL parsing ----------------------------------------------------------------------------------

DEST_TABLE: list[tuple[str, str]] = [
    ("http://granted.com/", "granted.com:80"),
    ("https://Granted.COM./x?y#z", "granted.com:443"),
    ("HTTPS://granted.com:8443", "granted.com:8443"),
    ("http://müller.de/", "xn--mller-kva.de:80"),
    ("http://[::1]:8080/", "[::1]:8080"),
    ("http://[::ffff:127.0.0.1]/", "127.0.0.1:80"),
    ("http://127.0.0.1:80/", "127.0.0.1:80"),
    ("http://evil.com#@granted.com", "evil.com:80"),  # the fragment is not the host
    ("http://evil.com?@granted.com", "evil.com:80"),
]

# (url, error class): each refused before any lookup or connection.
BAD_URLS: list[tuple[str, type[RequestError]]] = [
    ("http://granted.com\\@evil.com/", InvalidRequest),
    ("http://granted.com:80@evil.com", InvalidRequest),
    ("http://user:pass@granted.com/", InvalidRequest),
    ("http://@granted.com/", InvalidRequest),
    ("http://0x7f.1/", InvalidRequest),
    ("http://0x7f000001/", InvalidRequest),
    ("http://2130706433/", InvalidRequest),
    ("http://017700000001/", InvalidRequest),
    ("http://127.1/", InvalidRequest),
    ("http://127.0.0.01/", InvalidRequest),
    ("http://example.com.127.0.0.1/", InvalidRequest),
    ("http://①②⑦.⓪.⓪.⓪/", InvalidRequest),
    ("http://\uff47ranted.com/", InvalidRequest),
    ("http://127.0.0.1%00example.com/", InvalidRequest),
    ("http://a%2eb/", InvalidRequest),
    ("http://a b/", InvalidRequest),
    ("http://granted.com\t/", InvalidRequest),
    ("http://granted.com/\r\nX: y", InvalidRequest),
    ("http://granted.com:+80/", InvalidRequest),
    ("http://granted.com:8_0/", InvalidRequest),
    ("http://granted.com:080x/", InvalidRequest),
    ("http://granted.com:99999/", InvalidRequest),
    ("http://granted.com:0/", InvalidRequest),
    ("http://granted.com:/", InvalidRequest),
    ("http://[fe80::1%25eth0]/", InvalidRequest),
    ("http:///path", InvalidRequest),
    ("//granted.com/", InvalidRequest),
    ("granted.com", InvalidRequest),
    ("http://a..b/", InvalidRequest),
    ("ftp://granted.com/", Denied),
    ("file:///etc/passwd", Denied),
    ("gopher://granted.com:70/_x", Denied),
    ("dict://127.0.0.1:11111/", Denied),
    ("ws://granted.com/", Denied),
]


@pytest.mark.parametrize(("url", "target"), DEST_TABLE)
def test_destination_comes_from_the_one_parse(url: str, target: str) -> None:
    dest = parse_destination(url)
    assert dest.target == target
    assert _egress.url_target(url) == target
    # What is sent is the same object the check looked at (host normalised, never re-parsed).
    assert dest.connect_host == dest.url.raw_host.decode()


@pytest.mark.parametrize(("url", "error"), BAD_URLS)
def test_suspicious_urls_are_refused(url: str, error: type[RequestError]) -> None:
    with pytest.raises(error):
        parse_destination(url)
    assert _egress.url_target(url) == "invalid URL"


# --- address classification -----------------------------------------------------------------------

REFUSED = [
    ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"), ("0.0.0.0", "unspecified"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.1.1", "link-local"), ("169.254.169.254", "metadata"), ("169.254.170.2", "metadata"),
    ("100.100.100.200", "metadata"), ("192.0.0.192", "metadata"), ("168.63.129.16", "Azure"),
    ("100.64.0.1", "CGNAT"), ("100.127.255.255", "CGNAT"), ("224.0.0.1", "multicast"),
    ("239.1.1.1", "multicast"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("198.18.0.1", "benchmarking"),
    ("192.0.2.1", "documentation"), ("198.51.100.1", "documentation"), ("203.0.113.10", "documentation"),
    ("192.88.99.1", "6to4"), ("192.0.0.8", "IETF"),
    ("::1", "loopback"), ("::", "unspecified"), ("fe80::1", "link-local"), ("fd00::1", "unique local"),
    ("fc00::1", "unique local"), ("fec0::1", "site-local"), ("ff02::1", "multicast"),
    ("fd00:ec2::254", "metadata"), ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "metadata"),
    ("::7f00:1", "IPv4-compatible"), ("64:ff9b::7f00:1", "NAT64 of 127.0.0.1"),
    ("64:ff9b::a9fe:a9fe", "NAT64 of 169.254.169.254"), ("64:ff9b:1::1", "local-use NAT64"),
    ("2002:7f00:1::1", "6to4 of 127.0.0.1"), ("2002:a9fe:a9fe::", "6to4 of 169.254.169.254"),
    ("2001::1", "Teredo"), ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation"), ("100::1", "discard"), ("5f00::1", "SRv6"), ("4000::1", "reserved"),
    ("::2", "IPv4-compatible"),
]
PUBLIC = ["1.1.1.1", "8.8.8.8", "93.184.216.34", "1.2.3.4", "2606:4700:4700::1111", "2a00:1450:4001::1",
          "64:ff9b::808:808", "2002:808:808::1", "::ffff:1.1.1.1", "172.32.0.1", "100.128.0.1", "192.169.0.1"]


@pytest.mark.parametrize(("address", "why"), REFUSED)
def test_refused_addresses(address: str, why: str) -> None:
    reason = refusal_reason(ip(address))
    assert reason is not None and why in reason


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses(address: str) -> None:
    assert refusal_reason(ip(address)) is None


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_embedded_ipv4_is_judged_like_ipv4(value: int) -> None:
    v4 = ipaddress.IPv4Address(value)
    refused = refusal_reason(v4) is not None
    assert (refusal_reason(ipaddress.IPv6Address((0xFFFF << 32) | value)) is not None) == refused
    assert (refusal_reason(ipaddress.IPv6Address((0x64FF9B << 96) | value)) is not None) == refused
    assert (refusal_reason(ipaddress.IPv6Address((0x2002 << 112) | (value << 80))) is not None) == refused
    if refused:
        assert not EgressPolicy.from_grant(["*"], [80]).covers_address(v4)


def test_address_check_after_resolution() -> None:
    dest = parse_destination("https://api.example.com/")
    names_only = EgressPolicy.from_grant(["api.example.com", "*"], [443])
    assert names_only.check_addresses(dest, [ip("1.1.1.1"), ip("2606:4700::1")])
    for bad in (["10.0.0.1"], ["1.1.1.1", "127.0.0.1"], ["::ffff:169.254.169.254"], ["fd00::5"]):
        with pytest.raises(Denied, match="grant it as an IP/CIDR entry"):
            names_only.check_addresses(dest, [ip(a) for a in bad])
    with pytest.raises(HandlerFailed, match="did not resolve"):
        names_only.check_addresses(dest, [])
    with_cidr = EgressPolicy.from_grant(["api.example.com", "10.0.0.0/8"], [443])
    assert with_cidr.check_addresses(dest, [ip("10.9.9.9")])
    with pytest.raises(Denied):
        with_cidr.check_addresses(dest, [ip("10.9.9.9"), ip("192.168.0.1")])


# --- the pinned backend ---------------------------------------------------------------------------

@pytest.mark.anyio
async def test_pinned_backend_refuses_unvetted_origins() -> None:
    listener = Listener("127.0.0.1")
    try:
        backend = PinnedBackend("pinned.test", listener.port, [ip("127.0.0.1")])
        for host, port in (("other.test", listener.port), ("127.0.0.1", listener.port), ("pinned.test", 1)):
            with pytest.raises(httpcore.ConnectError, match="not vetted"):
                await backend.connect_tcp(host, port)
        with pytest.raises(httpcore.ConnectError):
            await backend.connect_unix_socket("/run/docker.sock")
        assert backend.dialed == []
        stream = await backend.connect_tcp("pinned.test", listener.port, timeout=5)
        await stream.aclose()
        assert backend.dialed == [ip("127.0.0.1")]
    finally:
        listener.close()


# --- corpus ---------------------------------------------------------------------------------------

def _corpus_variants(line: str) -> set[str]:
    """A payload as written, URL-decoded (once and twice), and with backslashes as slashes."""
    once = urllib.parse.unquote(line)
    return {line, once, urllib.parse.unquote(once), line.replace("\\", "/"), once.replace("\\", "/")}


async def scenario_corpus(payload: dict[str, Any]) -> dict[str, Any]:
    listeners = [Listener("127.0.0.1", p) for p in (80, 443, 22, 25, 3128, 11211, 11111, 8080)]
    try:
        listeners.append(Listener("::1", 80))
    except OSError:
        pass  # IPv6 switched off on this machine: nothing to trap there

    def answer(host: str) -> list[str]:
        # Any name gets a refused address or a documentation address that exists nowhere here.
        return ["127.0.0.1"] if sum(host.encode()) % 2 else ["203.0.113.10"]

    resolver = ScriptedResolver(fallback=answer)
    grant = {"allowed_domains": ["*"], "allowed_ports": list(range(1, 65536))}
    outcomes: dict[str, list[str]] = {}
    succeeded: list[str] = []
    for url in payload["urls"]:
        result = await call_network(grant, {"method": "GET", "url": url}, resolver=resolver)
        if result["ok"]:
            succeeded.append(url)
        else:
            outcomes.setdefault(result["code"], []).append(url)
    return {
        "succeeded": succeeded,
        "outcomes": outcomes,
        "connections": sum(x.connections for x in listeners),
        "resolved": len(resolver.calls),
    }


def test_ssrf_corpus_is_refused_even_with_everything_granted() -> None:
    folder = CORPORA / "ssrf"
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if not files:
        print(f"skipping: no SSRF corpus at {folder}")
        pytest.skip(f"SSRF corpus not found at {folder}")
    lines = {line.strip() for f in files for line in f.read_text(encoding="utf-8").splitlines()}
    urls = sorted({v for line in lines if line for v in _corpus_variants(line)})
    out = run_in_netns(HERE, "scenario_corpus", {"urls": urls}, timeout=300)
    assert out["succeeded"] == []
    assert out["connections"] == 0
    unexpected = {code: urls for code, urls in out["outcomes"].items()
                  if code not in ("permission_denied", "invalid_request")}
    assert unexpected == {}, unexpected
    assert sum(len(v) for v in out["outcomes"].values()) == len(urls) >= 800
