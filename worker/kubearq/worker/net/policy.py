"""Which URLs, names and addresses the fetcher may connect to: pure decisions, no I/O.

Everything that is not a public internet destination is refused unless the ScrapeRequest sets
`fetch.allowPrivateNetworks: true`: a scraper that fetches user-supplied URLs inside a cluster is
otherwise a proxy into the cluster (SSRF). The fetcher applies `NetworkPolicy.check_url` to every URL
before its request and `NetworkPolicy.check_address` to every address a name resolves to, before
connecting to exactly that address.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import TypeAlias
from urllib.parse import unquote

import httpx

IPAddress: TypeAlias = IPv4Address | IPv6Address
Endpoint: TypeAlias = tuple[IPAddress, int]

ALLOW_PRIVATE_HINT = "set fetch.allowPrivateNetworks: true to allow it"

_V4: tuple[tuple[IPv4Network, str], ...] = tuple((IPv4Network(net), why) for net, why in (
    # Specific addresses first, so the message names the most telling reason.
    ("169.254.169.254/32", "the cloud metadata address"),
    ("100.100.100.200/32", "the Alibaba Cloud metadata address"),
    ("168.63.129.16/32", "the Azure platform (WireServer) address"),
    ("255.255.255.255/32", "the broadcast address"),
    ("0.0.0.0/8", "an unspecified ('this network') address"),
    ("10.0.0.0/8", "a private address"),
    ("100.64.0.0/10", "a carrier-grade NAT (shared) address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address"),
    ("172.16.0.0/12", "a private address"),
    ("192.0.0.0/24", "an IETF protocol assignment address"),
    ("192.0.2.0/24", "a documentation address"),
    ("192.88.99.0/24", "a 6to4 relay anycast address"),
    ("192.168.0.0/16", "a private address"),
    ("198.18.0.0/15", "a benchmarking address"),
    ("198.51.100.0/24", "a documentation address"),
    ("203.0.113.0/24", "a documentation address"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),
))

_V6: tuple[tuple[IPv6Network, str], ...] = tuple((IPv6Network(net), why) for net, why in (
    ("fd00:ec2::254/128", "the AWS metadata address"),
    ("::/128", "an unspecified address"),
    ("::1/128", "a loopback address"),
    # RFC 4291 deprecated IPv4-compatible addresses; no stack routes them any more.
    ("::/96", "a deprecated IPv4-compatible address"),
    # RFC 8215: reserved for NAT64 inside one operator's network, whatever v4 it embeds.
    ("64:ff9b:1::/48", "a local-use NAT64 address"),
    ("100::/64", "a discard-only address"),
    # Teredo hides the client's v4 address (XOR-ed) and the relay's; no website is served from one.
    ("2001::/32", "a Teredo tunnel address"),
    ("2001:db8::/32", "a documentation address"),
    ("2001::/23", "an IETF protocol assignment address"),
    ("3fff::/20", "a documentation address"),
    ("fc00::/7", "a unique-local address"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address"),
    ("ff00::/8", "a multicast address"),
))
_GLOBAL_UNICAST = IPv6Network("2000::/3")
_HEX = frozenset("0123456789abcdefABCDEF")
_NAT64 = IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = IPv6Network("2002::/16")

_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")
_INTERNAL_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("metadata.google.internal", "the cloud metadata name"),
    ("localhost", "a loopback name"),
    ("svc", "a Kubernetes cluster-internal name"),
    ("cluster.local", "a Kubernetes cluster-internal name"),
    ("internal", "an internal name"),
    ("local", "a multicast-DNS (link-local) name"),
    ("home.arpa", "a home-network name"),
)


def address_refusal(ip: IPAddress) -> str | None:
    """Why `ip` is not a public internet address ("a private address"), or None if it is one."""
    if isinstance(ip, IPv4Address):
        return next((why for net, why in _V4 if ip in net), None)
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        form, v4 = embedded
        inner = address_refusal(v4)
        return None if inner is None else f"{form} of {v4}, {inner}"
    for net, why in _V6:
        if ip in net:
            return why
    if ip not in _GLOBAL_UNICAST:
        return "a reserved address (outside global unicast 2000::/3)"
    return None


def _embedded_ipv4(ip: IPv6Address) -> tuple[str, IPv4Address] | None:
    """The IPv4 address that traffic to `ip` reaches, for the forms that translate to IPv4."""
    if ip.ipv4_mapped is not None:
        return "an IPv4-mapped form", ip.ipv4_mapped
    if ip in _NAT64:
        return "a NAT64 form", IPv4Address(int(ip) & 0xFFFF_FFFF)
    if ip in _SIX_TO_FOUR and ip.sixtofour is not None:
        return "a 6to4 form", ip.sixtofour
    return None


def name_refusal(name: str) -> str | None:
    """Why a host name points inside the cluster or the machine, or None for an ordinary public name."""
    for suffix, why in _INTERNAL_SUFFIXES:
        if name == suffix or name.endswith("." + suffix):
            return why
    if "." not in name:
        # A pod resolves "redis" through its search path to redis.<namespace>.svc.cluster.local.
        return "a single-label name, which the cluster's DNS search path resolves to an internal service"
    return None


def parse_ipv4(host: str) -> IPv4Address | None:
    """The IPv4 address of a numeric host in any spelling resolvers accept, None for a name.

    WHATWG URL host parsing and inet_aton(3) both read `2130706433`, `0x7f.1`, `017700000001` and
    `127.1` as 127.0.0.1; so does getaddrinfo. A host whose last label is a number is an address:
    it parses as one or it is invalid (ValueError), it is never handed to a resolver as a name.
    """
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    if not _is_number(parts[-1]):
        return None
    numbers = [_ipv4_number(part) for part in parts]
    if len(parts) > 4 or None in numbers:
        raise ValueError(f"{host} is not a valid IPv4 address")
    values = [number for number in numbers if number is not None]
    if any(value > 255 for value in values[:-1]) or values[-1] >= 256 ** (5 - len(values)):
        raise ValueError(f"{host} is not a valid IPv4 address (a part is out of range)")
    address = values[-1]
    for index, value in enumerate(values[:-1]):
        address += value * 256 ** (3 - index)
    return IPv4Address(address)


def _is_number(label: str) -> bool:
    """WHATWG's "ends in a number": decimal digits, or 0x and hex digits."""
    if label.isascii() and label.isdigit():
        return True
    return label[:2].lower() == "0x" and all(char in _HEX for char in label[2:])


def _ipv4_number(part: str) -> int | None:
    radix = 10
    if part[:2].lower() == "0x":
        part, radix = part[2:], 16
    elif len(part) > 1 and part.startswith("0"):
        part, radix = part[1:], 8
    if part == "":
        return 0 if radix != 10 else None
    try:
        return int(part, radix) if part.isascii() and part.isalnum() else None
    except ValueError:
        return None


def parse_host(host: str) -> IPAddress | str:
    """A URL's host as an address (any literal spelling, IPv6 zone ids too) or as a lower-case name.

    Raises ValueError for a host that is neither a valid address nor a valid DNS name.
    """
    host = host.lower()
    if ":" in host:
        return ip_address(unquote(host.strip("[]")))
    v4 = parse_ipv4(host)
    if v4 is not None:
        return v4
    name = host.removesuffix(".")
    if not _NAME.match(name) or len(name) > 253:
        raise ValueError(f"{host} is not a valid host name")
    return name


@dataclass(frozen=True)
class Refusal:
    """Why a URL or an address was refused, and whether `fetch.allowPrivateNetworks` would allow it."""

    why: str
    overridable: bool

    def message(self, url: str, *, via: str | None = None) -> str:
        """`refused URL (redirected from VIA): WHY; HINT` — what the user reads in status."""
        redirected = f" (redirected from {redact_url(via)})" if via else ""
        hint = f"; {ALLOW_PRIVATE_HINT}" if self.overridable else ""
        return f"refused {redact_url(url)}{redirected}: {self.why}{hint}"


@dataclass(frozen=True)
class NetworkPolicy:
    """The destinations a fetch may reach.

    `extra_allowed` exists for tests: exact (address, port) pairs of the test's own loopback servers,
    so they can stand in for public sites without switching the safety off. Production passes nothing.
    """

    allow_private_networks: bool = False
    extra_allowed: frozenset[Endpoint] = frozenset()

    def check_url(self, url: str) -> Refusal | None:
        """Refuse a URL on its own: scheme, credentials, host spelling, internal names, literal addresses."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as error:
            return Refusal(f"it is not a valid URL ({error})", overridable=False)
        if parsed.scheme not in ("http", "https"):
            return Refusal("only http and https URLs can be fetched", overridable=False)
        if parsed.userinfo:
            # Credentials would end up in logs, status and PostgreSQL, and `public@10.0.0.1`
            # tricks readers about the host; no page we scrape needs them.
            return Refusal("URLs with credentials (user:password@) are not fetched; remove them", overridable=False)
        raw_host = parsed.raw_host.decode("ascii")
        if not raw_host:
            return Refusal("it has no host", overridable=False)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        if not 0 < port < 65536:
            return Refusal(f"port {port} is out of range", overridable=False)
        try:
            host = parse_host(raw_host)
        except ValueError as error:
            return Refusal(str(error), overridable=False)
        if isinstance(host, str):
            why = name_refusal(host)
            if why is None or self.allow_private_networks:
                return None
            return Refusal(f"{host} is {why}", overridable=True)
        return self.check_address(raw_host, host, port)

    def check_address(self, host: str, ip: IPAddress, port: int) -> Refusal | None:
        """Refuse connecting to `ip` (what `host` is or resolves to) unless it is public or allowed."""
        if self.allow_private_networks or (ip, port) in self.extra_allowed:
            return None
        why = address_refusal(ip)
        if why is None:
            return None
        shown = unquote(host.lower().strip("[]"))
        if shown == str(ip) or _same_address(shown, ip):
            return Refusal(f"{shown} is {why}", overridable=True)
        if isinstance(parse_host(host), str):
            return Refusal(f"{shown.removesuffix('.')} resolves to {ip}, {why}", overridable=True)
        return Refusal(f"{shown} is {ip}, {why}", overridable=True)


def _same_address(text: str, ip: IPAddress) -> bool:
    """True when `text` is a standard spelling of `ip` (`::ffff:10.0.0.1` for `::ffff:a00:1`)."""
    try:
        return ip_address(text) == ip
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """The URL as shown to users: credentials, if any, replaced by `***`."""
    if "@" not in url:  # no user info without one (called for every page's log context)
        return url
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return url
    if parsed.userinfo:
        return str(parsed.copy_with(userinfo=b"***"))
    return url
