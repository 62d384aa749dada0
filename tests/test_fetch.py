"""The page fetcher against websites the tests serve on loopback: SSRF refusals, caps, decoding, statuses.

The sites and the resolver are tests/websites.py's: everything but their own address is judged exactly as
in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from ipaddress import IPv4Address, ip_address
from pathlib import Path

import pytest
from aiohttp import web

from kubearq.core.contract import FetchPolicy
from kubearq.worker.net.http import AddressRefusedError, CheckingResolver, checked_target
from kubearq.worker.net.policy import NetworkPolicy
from kubearq.worker.scrape.fetch import (
    Fetcher,
    FetchError,
    FetchTimeoutError,
    HttpStatusError,
    ResponseTooLargeError,
    TooManyRedirectsError,
    UnsafeUrlError,
    UnsupportedContentTypeError,
    decode_text,
    parse_retry_after,
)
from tests.websites import HTML, FakeResolver, Reply, Website, fetcher_for

HINT = "set fetch.allowPrivateNetworks: true to allow it"


@pytest.fixture
async def site() -> AsyncIterator[Website]:
    async with Website() as website:
        yield website


# --- The SSRF corpus: every URL or redirect chain here is refused ----------------------------------------

# `start` is fetched: a URL, or a path on the test site (`{site}` = http://public.test:PORT).
# `routes` are the site's redirects (path → Location). `expected` is the exact message, or key words.
RESOLVER = {
    "public.test": ["127.0.0.1"],
    "private.test": ["10.0.0.5"],
    "mixed.test": ["127.0.0.1", "10.0.0.7"],
    "v6private.test": ["fd12:3456::1"],
    "metadata.test": ["169.254.169.254"],
    "mapped.test": ["::ffff:192.168.0.1"],
}
CORPUS: list[tuple[str, str, dict[str, str], type[FetchError], str | tuple[str, ...]]] = [
    ("rfc1918-10", "http://10.0.0.5/", {}, UnsafeUrlError,
     f"refused http://10.0.0.5/: 10.0.0.5 is a private address; {HINT}"),
    ("rfc1918-172", "http://172.16.3.4/", {}, UnsafeUrlError, ("172.16.3.4 is a private address",)),
    ("rfc1918-192", "http://192.168.1.1:8080/admin", {}, UnsafeUrlError, ("192.168.1.1 is a private address",)),
    ("loopback", "http://127.0.0.1/", {}, UnsafeUrlError,
     f"refused http://127.0.0.1/: 127.0.0.1 is a loopback address; {HINT}"),
    ("metadata", "http://169.254.169.254/latest/meta-data/", {}, UnsafeUrlError,
     f"refused http://169.254.169.254/latest/meta-data/: 169.254.169.254 is the cloud metadata address; {HINT}"),
    ("link-local", "http://169.254.10.1/", {}, UnsafeUrlError, ("a link-local address",)),
    ("cgnat", "http://100.64.0.1/", {}, UnsafeUrlError, ("carrier-grade NAT",)),
    ("alibaba-metadata", "http://100.100.100.200/latest/meta-data/", {}, UnsafeUrlError, ("Alibaba Cloud metadata",)),
    ("unspecified", "http://0.0.0.0:8080/", {}, UnsafeUrlError, ("0.0.0.0 is an unspecified",)),
    ("multicast", "http://224.0.0.1/", {}, UnsafeUrlError, ("a multicast address",)),
    ("broadcast", "http://255.255.255.255/", {}, UnsafeUrlError, ("the broadcast address",)),
    ("reserved", "http://240.0.0.1/", {}, UnsafeUrlError, ("a reserved address",)),
    ("decimal", "http://2130706433/", {}, UnsafeUrlError,
     f"refused http://2130706433/: 2130706433 is 127.0.0.1, a loopback address; {HINT}"),
    ("hex-short", "http://0x7f.1/", {}, UnsafeUrlError,
     f"refused http://0x7f.1/: 0x7f.1 is 127.0.0.1, a loopback address; {HINT}"),
    ("octal", "http://017700000001/", {}, UnsafeUrlError, ("017700000001 is 127.0.0.1, a loopback address",)),
    ("short-dotted", "http://127.1/", {}, UnsafeUrlError, ("127.1 is 127.0.0.1, a loopback address",)),
    ("hex-metadata", "http://0xA9FEA9FE/", {}, UnsafeUrlError, ("0xa9fea9fe is 169.254.169.254, the cloud metadata",)),
    ("zero", "http://0/", {}, UnsafeUrlError, ("0 is 0.0.0.0",)),
    ("trailing-dot", "http://127.0.0.1./", {}, UnsafeUrlError, ("is 127.0.0.1, a loopback address",)),
    ("bad-octal", "http://10.0.0.08/", {}, UnsafeUrlError, ("not a valid",)),
    ("v6-loopback", "http://[::1]/", {}, UnsafeUrlError, ("::1 is a loopback address",)),
    ("v6-unspecified", "http://[::]/", {}, UnsafeUrlError, (":: is an unspecified address",)),
    ("v4-mapped", "http://[::ffff:10.0.0.1]/", {}, UnsafeUrlError,
     "refused http://[::ffff:10.0.0.1]/: ::ffff:10.0.0.1 is an IPv4-mapped form of 10.0.0.1, a private address; "
     + HINT),
    ("v4-mapped-metadata", "http://[::ffff:a9fe:a9fe]/", {}, UnsafeUrlError,
     ("IPv4-mapped form of 169.254.169.254, the cloud metadata address",)),
    ("v4-compatible", "http://[::10.0.0.1]/", {}, UnsafeUrlError, ("deprecated IPv4-compatible",)),
    ("nat64", "http://[64:ff9b::a00:1]/", {}, UnsafeUrlError,
     f"refused http://[64:ff9b::a00:1]/: 64:ff9b::a00:1 is a NAT64 form of 10.0.0.1, a private address; {HINT}"),
    ("nat64-local", "http://[64:ff9b:1::a9fe:a9fe]/", {}, UnsafeUrlError, ("local-use NAT64",)),
    ("6to4", "http://[2002:7f00:1::1]/", {}, UnsafeUrlError, ("6to4 form of 127.0.0.1, a loopback address",)),
    ("teredo", "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", {}, UnsafeUrlError, ("Teredo",)),
    ("v6-link-local-zone", "http://[fe80::1%25eth0]/", {}, UnsafeUrlError, ("fe80::1%eth0 is a link-local address",)),
    ("unique-local", "http://[fd00::1]/", {}, UnsafeUrlError, ("a unique-local address",)),
    ("aws-v6-metadata", "http://[fd00:ec2::254]/latest/meta-data/", {}, UnsafeUrlError, ("the AWS metadata address",)),
    ("v6-multicast", "http://[ff02::1]/", {}, UnsafeUrlError, ("a multicast address",)),
    ("localhost", "http://localhost/", {}, UnsafeUrlError,
     f"refused http://localhost/: localhost is a loopback name; {HINT}"),
    ("sub-localhost", "http://app.localhost/", {}, UnsafeUrlError, ("app.localhost is a loopback name",)),
    ("svc", "http://kubernetes.default.svc/api", {}, UnsafeUrlError, ("a Kubernetes cluster-internal name",)),
    ("cluster-local", "http://redis.default.svc.cluster.local:6379/", {}, UnsafeUrlError, ("cluster-internal",)),
    ("gcp-metadata", "http://metadata.google.internal/computeMetadata/v1/", {}, UnsafeUrlError,
     ("metadata.google.internal is the cloud metadata name",)),
    ("internal", "http://db.corp.internal/", {}, UnsafeUrlError, ("an internal name",)),
    ("single-label", "http://redis/", {}, UnsafeUrlError, ("redis is a single-label name",)),
    ("resolves-private", "http://private.test:{port}/", {}, UnsafeUrlError,
     f"refused http://private.test:{{port}}/: private.test resolves to 10.0.0.5, a private address; {HINT}"),
    ("resolves-public-and-private", "http://mixed.test:{port}/", {}, UnsafeUrlError,
     ("mixed.test resolves to 10.0.0.7, a private address",)),
    ("resolves-v6-private", "http://v6private.test/", {}, UnsafeUrlError,
     ("v6private.test resolves to fd12:3456::1, a unique-local address",)),
    ("resolves-metadata", "http://metadata.test/", {}, UnsafeUrlError,
     ("resolves to 169.254.169.254, the cloud metadata",)),
    ("resolves-mapped", "http://mapped.test/", {}, UnsafeUrlError, ("IPv4-mapped form of 192.168.0.1",)),
    ("file", "file:///etc/passwd", {}, UnsafeUrlError,
     "refused file:///etc/passwd: only http and https URLs can be fetched"),
    ("gopher", "gopher://public.test:70/_GET", {}, UnsafeUrlError, ("only http and https",)),
    ("ftp", "ftp://public.test/", {}, UnsafeUrlError, ("only http and https",)),
    ("credentials", "http://user:secret@public.test/", {}, UnsafeUrlError,
     ("refused http://***@public.test/", "credentials")),
    ("to-metadata", "{site}/r", {"/r": "http://169.254.169.254/latest/meta-data/"}, UnsafeUrlError,
     "refused http://169.254.169.254/latest/meta-data/ (redirected from http://public.test:{port}/r): "
     f"169.254.169.254 is the cloud metadata address; {HINT}"),
    ("to-localhost-same-port", "{site}/r", {"/r": "http://localhost:{port}/secret"}, UnsafeUrlError,
     f"refused http://localhost:{{port}}/secret (redirected from http://public.test:{{port}}/r): "
     f"localhost is a loopback name; {HINT}"),
    ("to-loopback-literal", "{site}/r", {"/r": "http://127.0.0.1:1/"}, UnsafeUrlError, ("127.0.0.1 is a loopback",)),
    ("to-file", "{site}/r", {"/r": "file:///etc/passwd"}, UnsafeUrlError,
     "refused file:///etc/passwd (redirected from http://public.test:{port}/r): "
     "only http and https URLs can be fetched"),
    ("to-gopher", "{site}/r", {"/r": "gopher://127.0.0.1:6379/_FLUSHALL"}, UnsafeUrlError, ("only http and https",)),
    ("to-scheme-relative-private", "{site}/r", {"/r": "//10.0.0.5/x"}, UnsafeUrlError,
     ("10.0.0.5 is a private address",)),
    ("to-name-resolving-private", "{site}/r", {"/r": "http://private.test/"}, UnsafeUrlError,
     ("(redirected from http://public.test:{port}/r)", "private.test resolves to 10.0.0.5")),
    ("to-mapped-loopback", "{site}/r", {"/r": "http://[::ffff:127.0.0.1]:{port}/"}, UnsafeUrlError,
     ("IPv4-mapped form of 127.0.0.1",)),
    ("two-hops-to-metadata", "{site}/a", {"/a": "/b", "/b": "http://0xa9.0xfe.0xa9.0xfe/"}, UnsafeUrlError,
     ("(redirected from http://public.test:{port}/b)", "is 169.254.169.254, the cloud metadata address")),
    ("redirect-loop", "{site}/a", {"/a": "/b", "/b": "/a"}, TooManyRedirectsError,
     "gave up on http://public.test:{port}/a: redirect loop (http://public.test:{port}/a → "
     "http://public.test:{port}/b → http://public.test:{port}/a)"),
    ("too-many-hops", "{site}/hop0", {f"/hop{i}": f"/hop{i + 1}" for i in range(12)}, TooManyRedirectsError,
     "gave up on http://public.test:{port}/hop0 after 10 redirects (the last one to http://public.test:{port}/hop11)"),
]


@pytest.mark.parametrize(("start", "routes", "error", "expected"), [case[1:] for case in CORPUS],
                         ids=[case[0] for case in CORPUS])
async def test_ssrf_corpus_is_refused_with_a_clear_error(
    site: Website, start: str, routes: dict[str, str], error: type[FetchError], expected: str | tuple[str, ...],
) -> None:
    def fill(text: str) -> str:
        return text.replace("{site}", site.url("")).replace("{port}", str(site.port))

    for path, location in routes.items():
        site.routes[path] = Reply(302, headers={"Location": fill(location)}, body=b"")
    url = fill(start)

    async with fetcher_for(site, resolver=FakeResolver(RESOLVER)) as fetcher:
        with pytest.raises(error) as raised:
            await fetcher.fetch(url, timeout=10)

    assert not raised.value.retryable
    assert raised.value.url == url
    if isinstance(expected, str):
        assert raised.value.message == fill(expected)
    else:
        for words in expected:
            assert fill(words) in raised.value.message
    # Nothing but the redirecting pages ever reached the test site.
    assert set(site.paths) <= set(routes)


def test_ssrf_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 30


async def test_a_name_resolving_to_a_public_and_a_private_address_reaches_nobody(site: Website) -> None:
    site.routes["/"] = Reply()
    resolver = FakeResolver({"mixed.test": ["127.0.0.1", "10.0.0.7"]})
    async with fetcher_for(site, resolver=resolver) as fetcher:
        with pytest.raises(UnsafeUrlError):
            await fetcher.fetch(site.url("/", name="mixed.test"), timeout=10)
    assert site.requests == []


# --- DNS rebinding: the connection goes to the address that was checked ------------------------------


@pytest.fixture
async def twin_sites() -> AsyncIterator[tuple[Website, Website]]:
    """A public site on 127.0.0.1:P and a private one on 127.0.0.2:P (same port, another address)."""
    for _ in range(5):
        async with AsyncExitStack() as stack:
            public = await stack.enter_async_context(Website("127.0.0.1"))
            try:
                private = await stack.enter_async_context(Website("127.0.0.2", public.port))
            except OSError:
                continue  # that port is taken on 127.0.0.2; take another pair
            public.routes["/"] = Reply(body=b"<p>public</p>")
            private.routes["/"] = Reply(body=b"<p>private</p>")
            yield public, private
            return
    pytest.fail("found no port free on both 127.0.0.1 and 127.0.0.2")


async def test_connection_goes_to_the_checked_address_not_a_second_lookup(
    twin_sites: tuple[Website, Website],
) -> None:
    public, private = twin_sites
    # A rebinding resolver: the checked answer is public, any later answer private.
    resolver = FakeResolver({"rebind.test": [["127.0.0.1"], ["127.0.0.2"]]})
    async with fetcher_for(public, resolver=resolver) as fetcher:
        page = await fetcher.fetch(public.url("/", name="rebind.test"), timeout=10)
    assert page.text == "<p>public</p>"
    assert resolver.calls == ["rebind.test"]
    assert public.paths == ["/"]
    assert private.requests == []


async def test_rebinding_to_a_private_address_on_a_new_connection_is_refused(
    twin_sites: tuple[Website, Website],
) -> None:
    public, private = twin_sites
    resolver = FakeResolver({"rebind.test": [["127.0.0.1"], ["127.0.0.2"]]})
    async with fetcher_for(public, resolver=resolver) as fetcher:
        await fetcher.fetch(public.url("/", name="rebind.test"), timeout=10)
        with pytest.raises(UnsafeUrlError) as raised:
            await fetcher.fetch(public.url("/", name="rebind.test"), timeout=10)
    assert "rebind.test resolves to 127.0.0.2, a loopback address" in raised.value.message
    assert public.paths == ["/"]
    assert private.requests == []


# --- Allowed fetches ------------------------------------------------------------------------------------


async def test_fetches_a_page_from_an_allowed_site(site: Website) -> None:
    site.routes["/events"] = Reply(body=b"<h1>Events</h1>")
    async with fetcher_for(site) as fetcher:
        page = await fetcher.fetch(site.url("/events"), timeout=10)
    assert (page.url, page.status, page.text, page.content_type, page.encoding) == (
        site.url("/events"), 200, "<h1>Events</h1>", "text/html", "utf-8")
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.elapsed > 0


async def test_sends_the_policy_user_agent_and_no_cookies_from_earlier_fetches(site: Website) -> None:
    site.routes["/"] = Reply(headers={**HTML, "Set-Cookie": "session=abc; Path=/"})
    async with fetcher_for(site, policy=FetchPolicy(obey_robots_txt=False, user_agent="eventbot/2.0")) as fetcher:
        await fetcher.fetch(site.url("/"), timeout=10)
        await fetcher.fetch(site.url("/"), timeout=10)
    assert [headers["user-agent"] for _, headers in site.requests] == ["eventbot/2.0", "eventbot/2.0"]
    assert all("cookie" not in headers for _, headers in site.requests)


async def test_redirects_are_followed_to_the_final_url(site: Website) -> None:
    site.routes["/old"] = Reply(301, headers={"Location": "/new#top"}, body=b"")
    site.routes["/new"] = Reply(body=b"new")
    async with fetcher_for(site) as fetcher:
        page = await fetcher.fetch(site.url("/old"), timeout=10)
    assert page.url == site.url("/new#top")
    assert page.text == "new"
    assert site.paths == ["/old", "/new"]


async def test_allow_private_networks_lets_loopback_through(site: Website) -> None:
    site.routes["/"] = Reply(body=b"inside")
    policy = FetchPolicy(obey_robots_txt=False, allow_private_networks=True)
    # No test hooks: the real resolver and no extra allowed endpoints.
    async with Fetcher(policy) as fetcher:
        by_address = await fetcher.fetch(f"http://127.0.0.1:{site.port}/", timeout=10)
        by_name = await fetcher.fetch(f"http://localhost:{site.port}/", timeout=10)
    assert by_address.text == by_name.text == "inside"


async def test_without_allow_private_networks_the_same_loopback_url_is_refused(site: Website) -> None:
    async with Fetcher(FetchPolicy(obey_robots_txt=False)) as fetcher:
        with pytest.raises(UnsafeUrlError) as raised:
            await fetcher.fetch(f"http://127.0.0.1:{site.port}/", timeout=10)
    assert raised.value.message == (
        f"refused http://127.0.0.1:{site.port}/: 127.0.0.1 is a loopback address; {HINT}")
    assert site.requests == []


async def test_an_https_to_http_redirect_is_followed(
    site: Website, tls_site: Website, certificate: tuple[Path, Path],
) -> None:
    tls_site.routes["/"] = Reply(302, headers={"Location": site.url("/plain")}, body=b"")
    site.routes["/plain"] = Reply(body=b"plain")
    async with fetcher_for(site, tls_site, ssl_context=client_context(certificate)) as fetcher:
        page = await fetcher.fetch(tls_site.url("/"), timeout=10)
    assert page.url == site.url("/plain")


# --- TLS: the certificate is checked for the URL's host while the connection goes to the address --------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run([
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=public.test",
        "-addext", "subjectAltName=DNS:public.test",
    ], check=True, capture_output=True)
    return key, cert


@pytest.fixture
async def tls_site(certificate: tuple[Path, Path]) -> AsyncIterator[Website]:
    key, cert = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async with Website(tls=context) as website:
        yield website


def client_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    """A client context that trusts the test certificate only."""
    return ssl.create_default_context(cafile=certificate[1])


async def test_https_checks_the_certificate_of_the_url_host(tls_site: Website, certificate: tuple[Path, Path]) -> None:
    tls_site.routes["/"] = Reply(body=b"secure")
    resolver = FakeResolver({"public.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    async with fetcher_for(tls_site, resolver=resolver, ssl_context=client_context(certificate)) as fetcher:
        page = await fetcher.fetch(tls_site.url("/"), timeout=10)
        with pytest.raises(FetchError) as raised:
            await fetcher.fetch(tls_site.url("/", name="other.test"), timeout=10)
    assert page.text == "secure"
    assert tls_site.requests[0][1]["host"] == f"public.test:{tls_site.port}"
    assert "certificate" in raised.value.message.lower()
    assert not raised.value.retryable


# --- Caps: size and time --------------------------------------------------------------------------------


async def test_a_declared_length_over_the_cap_fails_before_the_body_is_read(site: Website) -> None:
    site.routes["/big"] = Reply(body=b"x" * 5000)
    async with fetcher_for(site, policy=FetchPolicy(obey_robots_txt=False, max_response_bytes=1024)) as fetcher:
        with pytest.raises(ResponseTooLargeError) as raised:
            await fetcher.fetch(site.url("/big"), timeout=10)
    assert raised.value.message == (
        f"stopped reading {site.url('/big')}: it declares 5000 bytes, over fetch.maxResponseBytes (1024); "
        "raise fetch.maxResponseBytes to fetch it")
    assert not raised.value.retryable


async def test_an_undeclared_body_over_the_cap_stops_at_the_cap(site: Website) -> None:
    site.routes["/stream"] = Reply(body=b"y" * 50_000, chunked=True)
    async with fetcher_for(site, policy=FetchPolicy(obey_robots_txt=False, max_response_bytes=4096)) as fetcher:
        with pytest.raises(ResponseTooLargeError, match="more than 4096 bytes arrived"):
            await fetcher.fetch(site.url("/stream"), timeout=10)


async def test_a_gzip_bomb_stops_at_the_cap(site: Website) -> None:
    bomb = gzip.compress(b"\0" * 20_000_000)
    site.routes["/bomb"] = Reply(headers={**HTML, "Content-Encoding": "gzip"}, body=bomb)
    async with fetcher_for(site, policy=FetchPolicy(obey_robots_txt=False, max_response_bytes=1 << 20)) as fetcher:
        with pytest.raises(ResponseTooLargeError):
            await fetcher.fetch(site.url("/bomb"), timeout=10)
    assert len(bomb) < 1 << 20  # small on the wire: only the decoded size can catch it


async def test_gzip_and_deflate_bodies_are_decoded(site: Website) -> None:
    import zlib

    site.routes["/gz"] = Reply(headers={**HTML, "Content-Encoding": "gzip"}, body=gzip.compress(b"zipped"))
    site.routes["/deflate"] = Reply(headers={**HTML, "Content-Encoding": "deflate"}, body=zlib.compress(b"deflated"))
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    site.routes["/raw"] = Reply(headers={**HTML, "Content-Encoding": "deflate"},
                                body=raw.compress(b"raw") + raw.flush())
    async with fetcher_for(site) as fetcher:
        texts = [(await fetcher.fetch(site.url(p), timeout=10)).text for p in ("/gz", "/deflate", "/raw")]
    assert texts == ["zipped", "deflated", "raw"]
    assert site.requests[0][1]["accept-encoding"] == "gzip, deflate"


async def test_the_timeout_covers_the_whole_fetch_not_each_read(site: Website) -> None:
    # Each byte arrives well within any per-read timeout; the whole body would take 40 s.
    site.routes["/slow"] = Reply(body=b"z" * 2000, trickle_seconds=0.02)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with fetcher_for(site) as fetcher:
        with pytest.raises(FetchTimeoutError) as raised:
            await fetcher.fetch(site.url("/slow"), timeout=0.5)
    assert loop.time() - started < 5
    assert raised.value.retryable
    assert raised.value.message.startswith(f"gave up on {site.url('/slow')} after 0.5 s: ")


# --- Content types and decoding -------------------------------------------------------------------------


async def test_a_non_html_page_is_refused_unless_the_caller_accepts_it(site: Website) -> None:
    site.routes["/doc.pdf"] = Reply(headers={"Content-Type": "application/pdf"}, body=b"%PDF-1.7")
    async with fetcher_for(site) as fetcher:
        with pytest.raises(UnsupportedContentTypeError) as raised:
            await fetcher.fetch(site.url("/doc.pdf"), timeout=10)
        page = await fetcher.fetch(site.url("/doc.pdf"), timeout=10, accept=None)
    assert raised.value.message == (
        f"refused {site.url('/doc.pdf')}: its content type is application/pdf, "
        "not one of application/xhtml+xml, text/html")
    assert page.content_type == "application/pdf"


async def test_a_windows_1252_page_is_decoded_by_its_header(site: Website) -> None:
    text = "Café “Zürich” — 5 €"
    site.routes["/"] = Reply(headers={"Content-Type": "text/html; charset=windows-1252"}, body=text.encode("cp1252"))
    async with fetcher_for(site) as fetcher:
        page = await fetcher.fetch(site.url("/"), timeout=10)
    assert page.text == text
    assert page.encoding == "cp1252"


async def test_a_shift_jis_page_is_decoded_by_its_meta_charset(site: Website) -> None:
    html = '<html><head><meta charset="Shift_JIS"><title>東京のイベント</title></head><body>コンサート①</body></html>'
    site.routes["/"] = Reply(headers={"Content-Type": "text/html"}, body=html.encode("cp932"))
    async with fetcher_for(site) as fetcher:
        page = await fetcher.fetch(site.url("/"), timeout=10)
    assert page.text == html
    assert page.encoding == "cp932"


@pytest.mark.parametrize(("body", "content_type", "text", "encoding"), [
    # WHATWG: iso-8859-1 means windows-1252, so 0x93/0x94 are curly quotes, not C1 controls.
    (b"\x93quoted\x94", "text/html; charset=ISO-8859-1", "“quoted”", "cp1252"),
    (b'<meta http-equiv="Content-Type" content="text/html; charset=euc-jp">\xc6\xfc\xcb\xdc',
     "text/html", '<meta http-equiv="Content-Type" content="text/html; charset=euc-jp">日本', "euc_jp"),
    (b"\xef\xbb\xbfBOM wins", "text/html; charset=windows-1252", "BOM wins", "utf-8"),
    (b"\xff\xfeh\x00i\x00", None, "hi", "utf-16-le"),
    (b'<meta charset="utf-16"><p>caf\xc3\xa9', "text/html", '<meta charset="utf-16"><p>café', "utf-8"),
    (b"caf\xc3\xa9", None, "café", "utf-8"),
    (b"bad \xff byte", "text/html; charset=no-such-charset", "bad \ufffd byte", "utf-8"),
])
def test_bodies_are_decoded_as_a_browser_would(
    body: bytes, content_type: str | None, text: str, encoding: str,
) -> None:
    assert decode_text(body, content_type) == (text, encoding)


# --- Statuses and connection failures ------------------------------------------------------------------


async def test_a_404_is_not_retried(site: Website) -> None:
    async with fetcher_for(site) as fetcher:
        with pytest.raises(HttpStatusError) as raised:
            await fetcher.fetch(site.url("/missing"), timeout=10)
    assert (raised.value.status, raised.value.retryable, raised.value.retry_after) == (404, False, None)
    assert raised.value.message == f"{site.url('/missing')} answered HTTP 404 Not Found"


async def test_a_503_is_retried(site: Website) -> None:
    site.routes["/"] = Reply(503, body=b"down")
    async with fetcher_for(site) as fetcher:
        with pytest.raises(HttpStatusError) as raised:
            await fetcher.fetch(site.url("/"), timeout=10)
    assert raised.value.retryable


async def test_a_429_carries_its_retry_after_seconds(site: Website) -> None:
    site.routes["/"] = Reply(429, headers={**HTML, "Retry-After": "120"}, body=b"slow down")
    async with fetcher_for(site) as fetcher:
        with pytest.raises(HttpStatusError) as raised:
            await fetcher.fetch(site.url("/"), timeout=10)
    assert (raised.value.status, raised.value.retryable, raised.value.retry_after) == (429, True, 120.0)
    assert raised.value.message == f"{site.url('/')} answered HTTP 429 Too Many Requests; retry after 120 s"


async def test_a_429_with_an_http_date_is_read_against_the_clock(site: Website) -> None:
    site.routes["/"] = Reply(429, headers={**HTML, "Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}, body=b"")
    now: Callable[[], datetime] = lambda: datetime(2026, 10, 21, 7, 27, 30, tzinfo=UTC)  # noqa: E731
    async with fetcher_for(site, now=now) as fetcher:
        with pytest.raises(HttpStatusError) as raised:
            await fetcher.fetch(site.url("/"), timeout=10)
    assert raised.value.retry_after == 30.0


@pytest.mark.parametrize(("value", "seconds"), [
    ("0", 0.0), ("3600", 3600.0), ("Wed, 21 Oct 2026 07:27:00 GMT", 0.0), ("soon", None), ("-5", None),
])
def test_retry_after_values(value: str, seconds: float | None) -> None:
    assert parse_retry_after(value, datetime(2026, 10, 21, 7, 27, 30, tzinfo=UTC)) == seconds


async def test_a_refused_connection_is_a_retryable_error(site: Website) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    async with Fetcher(FetchPolicy(obey_robots_txt=False), resolver=FakeResolver({"public.test": ["127.0.0.1"]}),
                       extra_allowed=frozenset({(IPv4Address("127.0.0.1"), port)})) as fetcher:
        with pytest.raises(FetchError) as raised:
            await fetcher.fetch(f"http://public.test:{port}/", timeout=10)
    assert raised.value.retryable
    assert raised.value.message.startswith(f"could not fetch http://public.test:{port}/: ")


@pytest.mark.parametrize("obey_robots_txt", [False, True])
async def test_a_name_that_does_not_resolve_says_so_and_is_retried_as_a_network_error(
        site: Website, obey_robots_txt: bool) -> None:
    # With robots.txt obeyed this failed as "its robots.txt is unreachable": the site's name does not resolve.
    async with fetcher_for(site, policy=FetchPolicy(obey_robots_txt=obey_robots_txt)) as fetcher:
        with pytest.raises(FetchError) as raised:
            await fetcher.fetch("http://nowhere.test/page", timeout=10)
    assert raised.value.retryable
    assert raised.value.message == (
        "could not fetch http://nowhere.test/page: nowhere.test does not resolve (Name or service not known); "
        "a later try may succeed")
    assert fetcher.cached_robots_rules("http://nowhere.test/page") is None  # nothing learnt about the site


@contextlib.asynccontextmanager
async def keep_alive_site(keepalive_seconds: float = 75.0) -> AsyncIterator[tuple[int, list[int]]]:
    """A site that keeps connections open between requests; yields its port and each request's client port."""
    peers: list[int] = []

    async def page(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername")[1] if request.transport else -1)
        return web.Response(text="<html><body>ok</body></html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/{number}", page)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=keepalive_seconds)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1], peers
    finally:
        await runner.cleanup()


def keep_alive_fetcher(port: int) -> Fetcher:
    return Fetcher(FetchPolicy(obey_robots_txt=False), resolver=FakeResolver({"public.test": ["127.0.0.1"]}),
                   extra_allowed=frozenset({(IPv4Address("127.0.0.1"), port)}))


async def test_pages_of_one_site_reuse_kept_alive_connections() -> None:
    async with keep_alive_site() as (port, peers), keep_alive_fetcher(port) as fetcher:
        for number in range(5):
            assert (await fetcher.fetch(f"http://public.test:{port}/{number}", timeout=5)).text.endswith("</html>")
        assert len(set(peers)) == 1  # one connection, five requests
        await asyncio.gather(*(fetcher.fetch(f"http://public.test:{port}/{number}", timeout=5)
                               for number in range(4)))
        assert len(set(peers)) <= 4
        assert len(peers) == 9


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async with keep_alive_site(keepalive_seconds=0.2) as (port, peers), keep_alive_fetcher(port) as fetcher:
        await fetcher.fetch(f"http://public.test:{port}/1", timeout=5)
        await asyncio.sleep(0.6)  # past the server's keep-alive timeout: it closes the idle connection
        assert (await fetcher.fetch(f"http://public.test:{port}/2", timeout=5)).status == 200
        assert len(set(peers)) == 2


# --- What aiohttp connects to is what was checked ------------------------------------------------------------


@pytest.mark.parametrize(("url", "address"), [
    ("http://127.0.0.1/", "127.0.0.1"), ("http://[::1]:8080/", "::1"), ("http://10.1.2.3/x", "10.1.2.3"),
    ("http://[::ffff:169.254.169.254]/", "::ffff:169.254.169.254"),
])
def test_an_address_in_the_url_is_checked_as_aiohttp_parses_it(url: str, address: str) -> None:
    # aiohttp connects to an address literal without asking the resolver: this is the check it passes.
    with pytest.raises(AddressRefusedError) as raised:
        checked_target(NetworkPolicy(), url)
    assert raised.value.refusal.overridable
    allowed = checked_target(NetworkPolicy(allow_private_networks=True), url)
    assert ip_address(allowed.raw_host or "") == ip_address(address)


def test_a_name_in_the_url_is_left_to_the_checking_resolver() -> None:
    assert checked_target(NetworkPolicy(), "http://public.test:8080/a?b=1").raw_host == "public.test"


async def test_the_resolver_refuses_internal_names_and_private_answers() -> None:
    resolver = CheckingResolver(NetworkPolicy(), FakeResolver({"redis.default.svc": ["10.0.0.9"],
                                                               "shop.test": ["93.184.216.34"],
                                                               "inner.test": ["10.0.0.9"]}))
    with pytest.raises(AddressRefusedError, match=r"redis\.default\.svc is "):
        await resolver.resolve("redis.default.svc", 80)
    with pytest.raises(AddressRefusedError, match=r"inner\.test resolves to 10\.0\.0\.9, a private address"):
        await resolver.resolve("inner.test", 80)
    assert await resolver.resolve("shop.test", 443) == [
        {"hostname": "shop.test", "host": "93.184.216.34", "port": 443, "family": socket.AF_INET, "proto": 0,
         "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV}]


async def test_a_page_with_headers_longer_than_8_kib_is_fetched(site: Website) -> None:
    site.routes["/"] = Reply(headers={**HTML, "Set-Cookie": "big=" + "x" * 20_000})
    async with fetcher_for(site) as fetcher:
        assert (await fetcher.fetch(site.url("/"), timeout=10)).status == 200
