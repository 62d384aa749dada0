"""URL and address safety decisions: what the fetcher refuses before it connects anywhere."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubearq.worker.net.policy import (
    NetworkPolicy,
    address_refusal,
    name_refusal,
    parse_host,
    parse_ipv4,
    redact_url,
)

FORBIDDEN_V4 = [
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF"),
    ("192.0.2.0/24", "documentation"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
]
FORBIDDEN_V6 = [
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard"),
    ("2001::/32", "Teredo"),
    ("2001:db8::/32", "documentation"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
    ("4000::/2", "reserved"),
]
PUBLIC_V4 = ["1.1.1.0/24", "8.0.0.0/8", "93.184.0.0/16", "151.101.0.0/16", "185.199.108.0/22", "52.0.0.0/11"]
PUBLIC_V6 = ["2606:4700::/32", "2a00:1450::/32", "2620:0:860::/46", "2400:cb00::/32"]


def addresses_in(network: IPv4Network | IPv6Network) -> st.SearchStrategy[IPv4Address | IPv6Address]:
    first = int(network.network_address)
    return st.integers(first, first + network.num_addresses - 1).map(
        lambda value: IPv4Address(value) if network.version == 4 else IPv6Address(value))


def forbidden_v4() -> st.SearchStrategy[tuple[IPv4Address, str]]:
    return st.sampled_from(FORBIDDEN_V4).flatmap(
        lambda case: addresses_in(IPv4Network(case[0])).map(lambda ip: (IPv4Address(ip), case[1])))


@given(forbidden_v4())
def test_every_address_of_a_forbidden_ipv4_network_is_refused(case: tuple[IPv4Address, str]) -> None:
    ip, keyword = case
    why = address_refusal(ip)
    assert why is not None
    # Specific addresses inside a range (metadata, broadcast) carry their own, more telling reason.
    assert keyword in why or "metadata" in why or "broadcast" in why or "WireServer" in why


@given(st.sampled_from(FORBIDDEN_V6).flatmap(
    lambda case: st.tuples(addresses_in(IPv6Network(case[0])), st.just(case[1]))))
def test_every_address_of_a_forbidden_ipv6_network_is_refused(case: tuple[IPv6Address, str]) -> None:
    ip, keyword = case
    why = address_refusal(ip)
    assert why is not None
    assert keyword in why or "metadata" in why or "IPv4-mapped" in why or "unspecified" in why or "loopback" in why


@given(st.sampled_from(PUBLIC_V4 + PUBLIC_V6).flatmap(
    lambda net: addresses_in(IPv4Network(net) if "." in net else IPv6Network(net))))
def test_addresses_of_public_networks_are_accepted(ip: IPv4Address | IPv6Address) -> None:
    assert address_refusal(ip) is None
    assert NetworkPolicy().check_address(str(ip), ip, 443) is None


@given(forbidden_v4(), st.sampled_from(["mapped", "nat64", "6to4"]))
def test_ipv6_forms_that_reach_a_forbidden_ipv4_address_are_refused(
    case: tuple[IPv4Address, str], form: str,
) -> None:
    v4, _ = case
    if form == "mapped":
        ip = IPv6Address((0xFFFF << 32) | int(v4))
    elif form == "nat64":
        ip = IPv6Address(int(IPv6Address("64:ff9b::")) | int(v4))
    else:
        ip = IPv6Address((0x2002 << 112) | (int(v4) << 80) | 1)
    why = address_refusal(ip)
    assert why is not None
    assert str(v4) in why
    assert f"{v4!s}, {address_refusal(v4)}" in why


@given(st.sampled_from(PUBLIC_V4).flatmap(lambda net: addresses_in(IPv4Network(net))))
def test_ipv6_forms_of_a_public_ipv4_address_are_accepted(v4: IPv4Address | IPv6Address) -> None:
    assert address_refusal(IPv6Address((0xFFFF << 32) | int(v4))) is None
    assert address_refusal(IPv6Address(int(IPv6Address("64:ff9b::")) | int(v4))) is None


def spellings(ip: IPv4Address) -> st.SearchStrategy[str]:
    """The ways inet_aton and WHATWG accept to write `ip`: 1 to 4 parts, each decimal, octal or hex."""
    value = int(ip)
    octets = list(ip.packed)

    def number(part: int) -> st.SearchStrategy[str]:
        spelled = [str(part), oct(part).replace("0o", "0"), hex(part), hex(part).upper().replace("X", "x")]
        return st.sampled_from(spelled)

    def split(parts: int) -> list[int]:
        return [*octets[: parts - 1], value & (2 ** (8 * (5 - parts)) - 1)]

    return st.integers(1, 4).flatmap(
        lambda parts: st.tuples(*[number(part) for part in split(parts)]).map(".".join))


@given(st.integers(0, 2**32 - 1).map(IPv4Address).flatmap(lambda ip: st.tuples(st.just(ip), spellings(ip))))
def test_every_ipv4_spelling_is_read_as_its_address_and_judged_by_it(case: tuple[IPv4Address, str]) -> None:
    ip, spelling = case
    assert parse_ipv4(spelling) == ip
    refusal = NetworkPolicy().check_url(f"http://{spelling}/")
    if address_refusal(ip) is not None:
        assert refusal is not None  # a forbidden address is refused however it is spelled
    elif refusal is not None:
        # Python's URL parser rejects some spellings browsers accept ('1.0.0.00'); refusing is the safe side.
        assert refusal.why.startswith("it is not a valid URL"), refusal


@pytest.mark.parametrize(("host", "address"), [
    ("2130706433", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("017700000001", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("0x7f.0.0.1", "127.0.0.1"),
    ("0", "0.0.0.0"),
    ("10.0.0.5.", "10.0.0.5"),
    ("0xA9FEA9FE", "169.254.169.254"),
])
def test_odd_ipv4_spellings_are_read_as_resolvers_read_them(host: str, address: str) -> None:
    assert parse_ipv4(host) == IPv4Address(address)


@pytest.mark.parametrize("host", ["1.2.3.4.5", "1.2.3.08", "256.1.1.1", "1.16777216", "example.09", "a.0x"])
def test_a_host_ending_in_a_number_that_is_not_an_address_is_invalid(host: str) -> None:
    with pytest.raises(ValueError, match="is not a valid IPv4 address"):
        parse_ipv4(host)


@pytest.mark.parametrize("host", ["example.com", "0x1g", "x1.y2", "www.example.co.uk"])
def test_names_are_not_addresses(host: str) -> None:
    assert parse_ipv4(host) is None


@pytest.mark.parametrize(("name", "keyword"), [
    ("localhost", "loopback"),
    ("api.localhost", "loopback"),
    ("kubernetes.default.svc", "cluster-internal"),
    ("redis.default.svc.cluster.local", "cluster-internal"),
    ("anything.cluster.local", "cluster-internal"),
    ("metadata.google.internal", "metadata"),
    ("ip-10-0-0-1.ec2.internal", "internal"),
    ("printer.local", "multicast-DNS"),
    ("router.home.arpa", "home-network"),
    ("redis", "single-label"),
])
def test_internal_names_are_refused(name: str, keyword: str) -> None:
    why = name_refusal(name)
    assert why is not None
    assert keyword in why


@given(st.from_regex(r"[a-z]([a-z0-9-]{0,18}[a-z0-9])?(\.[a-z]([a-z0-9-]{0,18}[a-z0-9])?){0,3}", fullmatch=True),
       st.sampled_from(["localhost", "svc", "svc.cluster.local", "cluster.local", "internal"]))
def test_any_name_under_an_internal_suffix_is_refused(prefix: str, suffix: str) -> None:
    refusal = NetworkPolicy().check_url(f"https://{prefix}.{suffix}/")
    assert refusal is not None
    assert refusal.overridable
    assert NetworkPolicy(allow_private_networks=True).check_url(f"https://{prefix}.{suffix}/") is None


@pytest.mark.parametrize("name", ["example.com", "events.example.org", "xn--bcher-kva.example", "my_host.example.net"])
def test_public_names_pass_the_name_check(name: str) -> None:
    assert name_refusal(name) is None
    assert NetworkPolicy().check_url(f"https://{name}/events") is None


def test_refusal_message_names_the_url_the_address_and_the_setting() -> None:
    refusal = NetworkPolicy().check_address("x.test", IPv4Address("10.0.0.5"), 80)
    assert refusal is not None
    assert refusal.message("http://x.test/") == (
        "refused http://x.test/: x.test resolves to 10.0.0.5, a private address; "
        "set fetch.allowPrivateNetworks: true to allow it"
    )


def test_refusal_of_a_redirect_names_where_it_came_from() -> None:
    refusal = NetworkPolicy().check_url("http://169.254.169.254/latest/meta-data/")
    assert refusal is not None
    assert refusal.message("http://169.254.169.254/latest/meta-data/", via="https://public.example/r") == (
        "refused http://169.254.169.254/latest/meta-data/ (redirected from https://public.example/r): "
        "169.254.169.254 is the cloud metadata address; set fetch.allowPrivateNetworks: true to allow it"
    )


def test_allow_private_networks_allows_private_addresses_and_names() -> None:
    policy = NetworkPolicy(allow_private_networks=True)
    assert policy.check_url("http://localhost:8080/") is None
    assert policy.check_url("http://10.0.0.5/") is None
    assert policy.check_address("redis.default.svc", IPv4Address("10.96.0.10"), 6379) is None


def test_allow_private_networks_does_not_allow_other_schemes_or_credentials() -> None:
    policy = NetworkPolicy(allow_private_networks=True)
    for url in ["file:///etc/passwd", "gopher://localhost/", "http://user:secret@localhost/"]:
        refusal = policy.check_url(url)
        assert refusal is not None
        assert not refusal.overridable


def test_extra_allowed_admits_exactly_the_listed_address_and_port() -> None:
    policy = NetworkPolicy(extra_allowed=frozenset({(IPv4Address("127.0.0.1"), 8080)}))
    assert policy.check_url("http://127.0.0.1:8080/") is None
    assert policy.check_url("http://127.0.0.1:8081/") is not None
    assert policy.check_url("http://127.0.0.2:8080/") is not None
    assert policy.check_url("http://localhost:8080/") is not None  # names are judged by name first


def test_credentials_are_refused_and_never_shown() -> None:
    refusal = NetworkPolicy().check_url("https://admin:hunter2@example.com/")
    assert refusal is not None
    message = refusal.message("https://admin:hunter2@example.com/")
    assert "hunter2" not in message
    assert message == (
        "refused https://***@example.com/: URLs with credentials (user:password@) are not fetched; remove them"
    )
    assert redact_url("https://example.com/a") == "https://example.com/a"


def test_ipv6_hosts_keep_their_zone_and_mapped_forms_readable() -> None:
    assert parse_host("[fe80::1%25eth0]") == IPv6Address("fe80::1%eth0")
    refusal = NetworkPolicy().check_url("http://[::ffff:10.0.0.1]/")
    assert refusal is not None
    assert refusal.why == "::ffff:10.0.0.1 is an IPv4-mapped form of 10.0.0.1, a private address"
