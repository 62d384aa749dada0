"""robots.txt (RFC 9309): what each answer means, the per-origin cache, and the fetcher obeying it."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from kubearq.core.contract import FetchPolicy
from kubearq.worker.scrape.fetch import RobotsDisallowedError, UnsafeUrlError
from kubearq.worker.scrape.robots import (
    ROBOTS_MAX_BYTES,
    RobotsCache,
    RobotsRules,
    RobotsVerdict,
    origin_key,
    product_token,
    robots_url,
    rules_from_status,
    rules_unreachable,
)
from tests.websites import FakeResolver, Reply, Website, fetcher_for

ROBOTS = b"""\
User-agent: kubearq
Disallow: /private
Allow: /private/open

User-agent: *
Disallow: /
"""
OBEY = FetchPolicy()
TEXT = {"Content-Type": "text/plain"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- Decisions -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("user_agent", "token"), [
    ("kubearq (+https://kubearq.dev)", "kubearq"),
    ("EventBot/1.0", "eventbot"),
    ("my_crawler/2 (contact@example.com)", "my_crawler"),
])
def test_product_token_is_the_leading_name_of_the_user_agent(user_agent: str, token: str) -> None:
    assert product_token(user_agent) == token


def test_robots_url_and_cache_key_are_per_scheme_host_and_port() -> None:
    assert robots_url("https://Example.com/events?page=2#top") == "https://example.com/robots.txt"
    assert robots_url("http://example.com:8080/a") == "http://example.com:8080/robots.txt"
    assert origin_key("https://Example.com/a") == ("https", "example.com", 443)
    assert origin_key("http://example.com/a") == ("http", "example.com", 80)
    assert origin_key("http://example.com:8080/a") == ("http", "example.com", 8080)


def test_a_fetched_robots_txt_decides_by_the_group_of_our_product_token() -> None:
    rules = rules_from_status("http://x.test/robots.txt", 200, ROBOTS)
    assert rules.allows("http://x.test/events", OBEY.user_agent)
    assert not rules.allows("http://x.test/private/list", OBEY.user_agent)
    assert rules.allows("http://x.test/private/open/1", OBEY.user_agent)
    assert not rules.allows("http://x.test/events", "OtherBot/1.0")


def test_a_byte_order_mark_does_not_hide_the_first_group() -> None:
    rules = rules_from_status("http://x.test/robots.txt", 200, b"\xef\xbb\xbfUser-agent: *\nDisallow: /no\n")
    assert not rules.allows("http://x.test/no", OBEY.user_agent)


@pytest.mark.parametrize(("status", "verdict"), [
    (200, RobotsVerdict.RULES),
    (401, RobotsVerdict.ALLOW_ALL),  # RFC 9309 2.3.1.3: 4xx, 401 and 403 included, is "unavailable"
    (403, RobotsVerdict.ALLOW_ALL),
    (404, RobotsVerdict.ALLOW_ALL),
    (410, RobotsVerdict.ALLOW_ALL),
    (429, RobotsVerdict.DISALLOW_ALL),
    (500, RobotsVerdict.DISALLOW_ALL),  # 2.3.1.4: "unreachable", complete disallow
    (503, RobotsVerdict.DISALLOW_ALL),
])
def test_each_status_means_what_rfc_9309_says(status: int, verdict: RobotsVerdict) -> None:
    rules = rules_from_status("http://x.test/robots.txt", status, b"User-agent: *\nDisallow: /\n")
    assert rules.verdict is verdict
    assert rules.temporary == (verdict is RobotsVerdict.DISALLOW_ALL)


async def test_cache_loads_once_then_again_after_the_ttl() -> None:
    clock = FakeClock()
    cache = RobotsCache(ttl=3600, clock=clock)
    loads: list[str] = []

    async def load() -> RobotsRules:
        loads.append("x")
        return rules_from_status("http://x.test/robots.txt", 404, b"")

    await cache.get(("http", "x.test", 80), load)
    clock.now += 3599
    await cache.get(("http", "x.test", 80), load)
    assert len(loads) == 1
    clock.now += 1
    await cache.get(("http", "x.test", 80), load)
    assert len(loads) == 2


async def test_an_unreachable_robots_txt_is_looked_at_again_sooner() -> None:
    clock = FakeClock()
    cache = RobotsCache(ttl=86_400, unreachable_ttl=60, clock=clock)
    await cache.get(("http", "x.test", 80), _returning(rules_unreachable("http://x.test/robots.txt", "timed out")))
    clock.now += 60
    assert cache.cached(("http", "x.test", 80)) is None


async def test_concurrent_fetches_of_one_site_load_its_robots_txt_once() -> None:
    cache = RobotsCache()
    started, release = asyncio.Event(), asyncio.Event()
    loads: list[str] = []

    async def load() -> RobotsRules:
        loads.append("x")
        started.set()
        await release.wait()
        return rules_from_status("http://x.test/robots.txt", 404, b"")

    first = asyncio.create_task(cache.get(("http", "x.test", 80), load))
    second = asyncio.create_task(cache.get(("http", "x.test", 80), load))
    await started.wait()  # the first load is under way; the second get is queued behind it
    assert not second.done()
    release.set()
    assert await first is await second
    assert loads == ["x"]


async def test_the_cache_keeps_at_most_max_entries() -> None:
    cache = RobotsCache(max_entries=2)
    for host in ("a.test", "b.test", "c.test"):
        await cache.get(("http", host, 80), _returning(rules_from_status(f"http://{host}/robots.txt", 404, b"")))
    assert cache.cached(("http", "a.test", 80)) is None
    assert cache.cached(("http", "c.test", 80)) is not None


def _returning(rules: RobotsRules) -> Callable[[], Awaitable[RobotsRules]]:
    async def load() -> RobotsRules:
        return rules
    return load


# --- The fetcher obeying robots.txt ----------------------------------------------------------------------


@pytest.fixture
async def site() -> AsyncIterator[Website]:
    async with Website() as website:
        website.routes["/events"] = Reply(body=b"events")
        website.routes["/private/list"] = Reply(body=b"private")
        yield website


async def test_a_disallowed_page_is_skipped_and_never_requested(site: Website) -> None:
    site.routes["/robots.txt"] = Reply(headers=TEXT, body=ROBOTS)
    async with fetcher_for(site, policy=OBEY) as fetcher:
        with pytest.raises(RobotsDisallowedError) as raised:
            await fetcher.fetch(site.url("/private/list"), timeout=10)
    assert raised.value.message == (
        f"skipped {site.url('/private/list')}: {site.url('/robots.txt')} disallows it for user agent "
        "'kubearq (+https://kubearq.dev)'; set fetch.obeyRobotsTxt: false to fetch it anyway")
    assert not raised.value.retryable
    assert site.paths == ["/robots.txt"]


async def test_an_allowed_page_is_fetched_and_robots_txt_is_fetched_once(site: Website) -> None:
    site.routes["/robots.txt"] = Reply(headers=TEXT, body=ROBOTS)
    async with fetcher_for(site, policy=OBEY) as fetcher:
        await fetcher.fetch(site.url("/events"), timeout=10)
        await fetcher.fetch(site.url("/events"), timeout=10)
        with pytest.raises(RobotsDisallowedError):
            await fetcher.fetch(site.url("/private/list"), timeout=10)
    assert site.paths == ["/robots.txt", "/events", "/events"]


async def test_fetchers_sharing_a_cache_share_robots_txt(site: Website) -> None:
    site.routes["/robots.txt"] = Reply(headers=TEXT, body=ROBOTS)
    cache = RobotsCache()
    for _ in range(2):
        async with fetcher_for(site, policy=OBEY, robots_cache=cache) as fetcher:
            await fetcher.fetch(site.url("/events"), timeout=10)
    assert site.paths.count("/robots.txt") == 1


async def test_the_rules_of_a_site_can_be_asked_before_fetching(site: Website) -> None:
    site.routes["/robots.txt"] = Reply(headers=TEXT, body=ROBOTS)
    async with fetcher_for(site, policy=OBEY) as fetcher:
        rules = await fetcher.robots_rules(site.url("/private/list"))
    assert not rules.allows(site.url("/private/list"), OBEY.user_agent)
    assert rules.allows(site.url("/events"), OBEY.user_agent)
    assert site.paths == ["/robots.txt"]


async def test_robots_txt_is_matched_on_the_policys_product_token(site: Website) -> None:
    site.routes["/robots.txt"] = Reply(headers=TEXT, body=ROBOTS)
    other_bot = FetchPolicy(user_agent="OtherBot/1.0")
    async with fetcher_for(site, policy=other_bot) as fetcher:
        with pytest.raises(RobotsDisallowedError, match=re.escape("for user agent 'OtherBot/1.0'")):
            await fetcher.fetch(site.url("/events"), timeout=10)


async def test_a_missing_robots_txt_allows_everything(site: Website) -> None:
    async with fetcher_for(site, policy=OBEY) as fetcher:
        page = await fetcher.fetch(site.url("/private/list"), timeout=10)
    assert page.text == "private"
    assert site.paths == ["/robots.txt", "/private/list"]


async def test_a_forbidden_robots_txt_allows_everything(site: Website) -> None:
    site.routes["/robots.txt"] = Reply(403, headers=TEXT, body=b"User-agent: *\nDisallow: /\n")
    async with fetcher_for(site, policy=OBEY) as fetcher:
        assert (await fetcher.fetch(site.url("/events"), timeout=10)).text == "events"


async def test_a_failing_robots_txt_disallows_everything_for_now(site: Website) -> None:
    site.routes["/robots.txt"] = Reply(500, headers=TEXT, body=b"oops")
    async with fetcher_for(site, policy=OBEY) as fetcher:
        with pytest.raises(RobotsDisallowedError) as raised:
            await fetcher.fetch(site.url("/events"), timeout=10)
    assert raised.value.retryable
    assert raised.value.message == (
        f"skipped {site.url('/events')}: its robots.txt is unreachable ({site.url('/robots.txt')} (HTTP 500)), "
        "which RFC 9309 says to treat as disallowing everything; a later try may succeed")
    assert site.paths == ["/robots.txt"]


async def test_an_unreachable_robots_txt_disallows_everything(site: Website) -> None:
    site.routes["/robots.txt"] = Reply(drop=True)
    async with fetcher_for(site, policy=OBEY) as fetcher:
        with pytest.raises(RobotsDisallowedError) as raised:
            await fetcher.fetch(site.url("/events"), timeout=10)
    assert raised.value.retryable
    assert "its robots.txt is unreachable" in raised.value.message
    # A GET the server hung up on is sent once more (RFC 9112 9.3.1, as aiohttp does); the page never is.
    assert site.paths == ["/robots.txt", "/robots.txt"]


async def test_robots_txt_redirects_are_followed(site: Website) -> None:
    site.routes["/robots.txt"] = Reply(301, headers={"Location": "/robots/real.txt"}, body=b"")
    site.routes["/robots/real.txt"] = Reply(headers=TEXT, body=ROBOTS)
    async with fetcher_for(site, policy=OBEY) as fetcher:
        with pytest.raises(RobotsDisallowedError, match=re.escape("/robots/real.txt disallows it")):
            await fetcher.fetch(site.url("/private/list"), timeout=10)


async def test_more_than_five_robots_redirects_mean_no_robots_txt(site: Website) -> None:
    site.routes["/robots.txt"] = Reply(302, headers={"Location": "/r1"}, body=b"")
    for hop in range(1, 7):
        site.routes[f"/r{hop}"] = Reply(302, headers={"Location": f"/r{hop + 1}"}, body=b"")
    async with fetcher_for(site, policy=OBEY) as fetcher:
        page = await fetcher.fetch(site.url("/private/list"), timeout=10)
    assert page.text == "private"
    assert site.paths == ["/robots.txt", "/r1", "/r2", "/r3", "/r4", "/r5", "/private/list"]


async def test_a_huge_robots_txt_is_read_up_to_500_kib(site: Website) -> None:
    padding = b"# " + b"x" * 1000 + b"\n"
    body = b"User-agent: *\nDisallow: /private\n" + padding * (ROBOTS_MAX_BYTES // len(padding) + 100)
    body += b"Disallow: /events\n"  # past the limit: ignored, as RFC 9309 2.5 allows
    site.routes["/robots.txt"] = Reply(headers=TEXT, body=body)
    async with fetcher_for(site, policy=FetchPolicy(max_response_bytes=1024)) as fetcher:
        assert (await fetcher.fetch(site.url("/events"), timeout=10)).text == "events"
        with pytest.raises(RobotsDisallowedError):
            await fetcher.fetch(site.url("/private/list"), timeout=10)


async def test_every_redirect_hop_is_checked_against_its_own_sites_robots_txt(site: Website) -> None:
    async with Website() as other:
        other.routes["/robots.txt"] = Reply(headers=TEXT, body=b"User-agent: *\nDisallow: /\n")
        site.routes["/go"] = Reply(302, headers={"Location": other.url("/page", name="other.test")}, body=b"")
        resolver = FakeResolver({"public.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
        async with fetcher_for(site, other, policy=OBEY, resolver=resolver) as fetcher:
            with pytest.raises(RobotsDisallowedError, match=r"skipped http://other\.test:\d+/page"):
                await fetcher.fetch(site.url("/go"), timeout=10)
        assert other.paths == ["/robots.txt"]


async def test_a_site_refused_by_the_network_policy_is_reported_as_such_not_as_robots(site: Website) -> None:
    resolver = FakeResolver({"private.test": ["10.0.0.5"]})
    cache = RobotsCache()
    async with fetcher_for(site, policy=OBEY, resolver=resolver, robots_cache=cache) as fetcher:
        with pytest.raises(UnsafeUrlError) as raised:
            await fetcher.fetch("http://private.test/events", timeout=10)
    assert raised.value.message.startswith(
        "refused http://private.test/events: private.test resolves to 10.0.0.5, a private address")
    assert cache.cached(("http", "private.test", 80)) is None
