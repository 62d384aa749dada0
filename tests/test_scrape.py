"""The scrape pipeline end to end: a worker with the built-in jobs, real Redis and PostgreSQL, and websites
(and a fake Firecrawl API) served by the tests on loopback.

The sites listen on 127.0.0.1; the worker admits exactly their address and port through the test-only
`NetworkHooks` passed in code. Every other address is judged as in production.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from arq.connections import ArqRedis
from arq.jobs import Job
from pydantic import SecretStr

from kubearq.core.connections import create_redis
from kubearq.core.contract import (
    SCRAPE_DETAIL,
    SCRAPE_LISTING,
    Backend,
    CssExtraction,
    Extraction,
    FetchPolicy,
    FirecrawlBackend,
    LinkDiscovery,
    PageJob,
    RateLimit,
    RequestRef,
    RetryPolicy,
    ScrapeSettings,
    SecretKeyRef,
    deserialize,
    failures_key,
    job_id_for_page,
    progress_key,
    request_jobs_key,
)
from kubearq.core.queueing import NewJob, Tally, enqueue_many
from kubearq.demo.services import PostgresServer, RedisServer, free_port
from kubearq.worker.builtins import builtin_jobs
from kubearq.worker.main import JobSet, WorkerService
from kubearq.worker.net.policy import IPAddress
from kubearq.worker.scrape.fetch import FetchError
from kubearq.worker.scrape.firecrawl import FirecrawlKeyMissingError, FirecrawlKeys
from kubearq.worker.scrape.jobs import CONTEXT_KEY, NetworkHooks, is_final, retry_delay, try_timeout
from kubearq.worker.settings import WorkerSettings
from tests import polling
from tests.crd_rules import REPO
from tests.websites import Reply, Website

FAST = {"poll_delay": 0.01, "retry_backoff": 0.05, "retry_backoff_max": 0.2, "heartbeat_interval": 0.5,
        "in_progress_ttl": 2.0, "http_port": 0, "http_host": "127.0.0.1", "health_check_interval": 1.0}
# No waiting on the rate limit unless a test asks for it; retries after about a second (the CRD's minimum).
UNLIMITED = RateLimit(requests_per_minute=100_000, burst=1000)
QUICK_RETRY = RetryPolicy(max_tries=4, backoff_seconds=1, max_backoff_seconds=1, timeout_seconds=5)
SETTINGS = ScrapeSettings(rate_limit=UNLIMITED, retry=QUICK_RETRY)
HINT = "set fetch.allowPrivateNetworks: true to allow it"


# --- Helpers ---------------------------------------------------------------------------------------------------

# Scrape runs start a worker that migrates PostgreSQL first: give every wait a little more time.
until = functools.partial(polling.until, within=15.0)


def event_page(number: int) -> bytes:
    event = {"@context": "https://schema.org", "@type": "MusicEvent", "name": f"Show {number}",
             "startDate": f"2025-06-{number:02d}T20:00"}
    return (f'<html><head><script type="application/ld+json">{json.dumps(event)}</script></head><body>'
            f'<h1> Show {number} </h1><time datetime="2025-06-{number:02d}">June {number}</time>'
            "</body></html>").encode()


def listing_page(*links: str) -> bytes:
    return ("<html><body>" + "".join(f'<a href="{link}">{link}</a>' for link in links) + "</body></html>").encode()


@dataclass
class ScrapeRun:
    """One ScrapeRequest as the operator starts it: its listing jobs enqueued with a tally on listing_total."""

    redis: ArqRedis
    settings: ScrapeSettings = SETTINGS
    request: RequestRef = field(default_factory=lambda: RequestRef(
        uid=str(uuid.uuid4()), namespace="shows", name="concerts"))
    deferred_seen: int = 0

    @property
    def uid(self) -> str:
        return self.request.uid

    def job(self, function: str, url: str) -> NewJob:
        page = PageJob(request=self.request, url=url, settings=self.settings).model_dump(mode="json", by_alias=True)
        return NewJob(job_id_for_page(self.uid, url), function, {"page": page})

    async def start(self, *urls: str) -> None:
        tally = Tally(progress_key(self.uid), "listing_total", request_jobs_key(self.uid))
        await enqueue_many(self.redis, self.settings.queue, [self.job(SCRAPE_LISTING, url) for url in urls],
                           tally=tally)

    async def start_details(self, *urls: str) -> None:
        tally = Tally(progress_key(self.uid), "detail_total", request_jobs_key(self.uid))
        await enqueue_many(self.redis, self.settings.queue, [self.job(SCRAPE_DETAIL, url) for url in urls],
                           tally=tally)

    async def progress(self) -> dict[str, int]:
        raw: dict[bytes, bytes] = await self.redis.hgetall(progress_key(self.uid))  # type: ignore[misc]
        counts = {key.decode(): int(value) for key, value in raw.items()}
        self.deferred_seen = max(self.deferred_seen, counts.get("listing_deferred", 0) + counts.get(
            "detail_deferred", 0))
        return counts

    async def finished(self, within: float = 20.0) -> dict[str, int]:
        """The counters once every known page is done or failed."""
        async def all_finished() -> bool:
            counts = await self.progress()
            return all(counts.get(f"{kind}_total", 0) == counts.get(f"{kind}_done", 0) + counts.get(
                f"{kind}_failed", 0) for kind in ("listing", "detail")) and bool(
                counts.get("listing_total", 0) + counts.get("detail_total", 0))
        await until(all_finished, within=within, what="the request's end")
        return {key: value for key, value in (await self.progress()).items() if value}

    async def failures(self) -> list[dict[str, Any]]:
        raw: list[bytes] = await self.redis.lrange(failures_key(self.uid), 0, -1)  # type: ignore[misc]
        return [json.loads(entry) for entry in raw]

    async def job_try(self, url: str) -> int:
        job = Job(job_id_for_page(self.uid, url), self.redis, _deserializer=deserialize)
        info = await job.result_info()
        assert info is not None, f"no result for {url}"
        return int(info.job_try)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    client = create_redis(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def site() -> AsyncIterator[Website]:
    async with Website() as website:
        yield website


@asynccontextmanager
async def scrape_worker(
    redis_url: str, database_url: str, *allowed: Website | FakeFirecrawl, **overrides: object,
) -> AsyncIterator[WorkerService]:
    """A worker serving the built-in jobs in this process; leaving the block drains it like SIGTERM."""
    settings = WorkerSettings.model_validate({"redis_url": redis_url, "database_url": database_url,
                                              **FAST, **overrides})
    jobs: JobSet = builtin_jobs(settings, hooks=NetworkHooks(extra_allowed=frozenset(a.endpoint for a in allowed)))
    service = WorkerService(settings, jobs)
    await service.start()
    try:
        yield service
    finally:
        async with asyncio.timeout(30):
            await service.stop()


async def item_rows(db: asyncpg.Connection, run: ScrapeRun) -> list[tuple[Any, ...]]:
    rows = await db.fetch("SELECT url, item_type, data FROM scrape_items WHERE request_uid = $1 ORDER BY url, "
                          "item_index", uuid.UUID(run.uid))
    return [tuple(row) for row in rows]


async def failure_rows(db: asyncpg.Connection, run: ScrapeRun) -> list[tuple[Any, ...]]:
    rows = await db.fetch("SELECT url, page_kind, error, tries FROM scrape_failures WHERE request_uid = $1 "
                          "ORDER BY url", uuid.UUID(run.uid))
    return [tuple(row) for row in rows]


def shows(rows: list[tuple[Any, ...]]) -> list[str]:
    return [row[2]["name"] for row in rows]


# --- Pure decisions --------------------------------------------------------------------------------------------


def test_each_try_gets_twice_the_time_of_the_last_up_to_the_maximum() -> None:
    policy = RetryPolicy(timeout_seconds=10, max_timeout_seconds=35)
    assert [try_timeout(policy, job_try) for job_try in (1, 2, 3, 4, 20)] == [10, 20, 35, 35, 35]


def test_backoff_doubles_per_try_within_a_fifth_below_and_honours_retry_after_up_to_the_maximum() -> None:
    policy = RetryPolicy(backoff_seconds=5, max_backoff_seconds=300)
    rng = random.Random(7)
    for job_try, ceiling in ((1, 5), (2, 10), (3, 20), (7, 300), (20, 300)):
        assert 0.8 * ceiling <= retry_delay(policy, job_try, rng=rng) <= ceiling
    assert retry_delay(policy, 1, retry_after=60, rng=rng) == 60
    assert retry_delay(policy, 1, retry_after=86_400, rng=rng) == 300


def test_only_a_retryable_error_with_tries_left_is_retried() -> None:
    policy = RetryPolicy(max_tries=3)
    flaky, broken = FetchError("u", "m", retryable=True), FetchError("u", "m", retryable=False)
    assert [is_final(flaky, job_try, policy) for job_try in (1, 2, 3)] == [False, False, True]
    assert is_final(broken, 1, policy)


def test_without_database_url_the_built_in_jobs_are_not_served(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "kubearq.worker.builtins")
    assert builtin_jobs(WorkerSettings(database_url=None)).functions == []
    assert "DATABASE_URL is not set: not serving the built-in scrape and sync jobs" in caplog.text
    served = builtin_jobs(WorkerSettings(database_url="postgresql://kubearq@db/kubearq")).functions
    assert [function.name for function in served] == [SCRAPE_LISTING, SCRAPE_DETAIL, "delete_scrape_results",
                                                      "sync_connections", "sync_connection", "compact_snapshots"]


@pytest.mark.parametrize(("namespace", "name", "key"), [
    ("shows", "../../etc", "passwd"), ("shows", "firecrawl", ".."), ("..", "shows", "firecrawl"),
])
def test_a_firecrawl_key_is_read_only_from_its_namespaces_directory(
    tmp_path: Path, namespace: str, name: str, key: str,
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root")  # what "../../etc" would reach from keys/shows/
    keys = FirecrawlKeys(tmp_path / "keys", SecretStr("fc-default"), "https://api.firecrawl.dev")
    backend = FirecrawlBackend(api_key_secret_ref=SecretKeyRef(name=name, key=key), url="https://other.example")
    with pytest.raises(FirecrawlKeyMissingError, match="this worker has no API key for Secret"):
        keys.key_for(namespace, backend, LISTING)


# --- The pipeline ----------------------------------------------------------------------------------------------


async def test_listings_fan_out_to_details_whose_events_are_stored_once_each(
    redis: ArqRedis, redis_url: str, postgres_dsn: str, db: asyncpg.Connection, site: Website,
) -> None:
    site.routes["/list/1"] = Reply(body=listing_page("/events/1", "/events/2", "/events/3", "/events/4"))
    site.routes["/list/2"] = Reply(body=listing_page("/events/4", "/events/5"))
    for number in range(1, 6):
        site.routes[f"/events/{number}"] = Reply(body=event_page(number))
    run = ScrapeRun(redis)
    async with scrape_worker(redis_url, postgres_dsn, site):
        await run.start(site.url("/list/1", "127.0.0.1"), site.url("/list/2", "127.0.0.1"))
        progress = await run.finished()
    assert progress == {"listing_total": 2, "listing_done": 2, "detail_total": 5, "detail_done": 5}
    rows = await item_rows(db, run)
    assert shows(rows) == [f"Show {number}" for number in range(1, 6)]
    assert rows[0][:2] == (site.url("/events/1", "127.0.0.1"), "Event")
    assert rows[0][2] == {"@context": "https://schema.org", "@type": "MusicEvent", "name": "Show 1",
                          "startDate": "2025-06-01T20:00"}
    assert site.paths.count("/events/4") == 1


async def test_css_extraction_stores_one_item_of_fields_per_page(
    redis: ArqRedis, redis_url: str, postgres_dsn: str, db: asyncpg.Connection, site: Website,
) -> None:
    site.routes["/list"] = Reply(body=listing_page("/events/1", "/events/2"))
    for number in (1, 2):
        site.routes[f"/events/{number}"] = Reply(body=event_page(number))
    css = Extraction(css=CssExtraction(fields={"title": "h1", "day": "time @datetime", "venue": ".venue"}))
    run = ScrapeRun(redis, SETTINGS.model_copy(update={"extract": css}))
    async with scrape_worker(redis_url, postgres_dsn, site):
        await run.start(site.url("/list", "127.0.0.1"))
        await run.finished()
    assert await item_rows(db, run) == [
        (site.url("/events/1", "127.0.0.1"), "css", {"title": "Show 1", "day": "2025-06-01", "venue": None}),
        (site.url("/events/2", "127.0.0.1"), "css", {"title": "Show 2", "day": "2025-06-02", "venue": None}),
    ]


async def test_max_detail_pages_caps_the_details_of_the_whole_request(
    redis: ArqRedis, redis_url: str, postgres_dsn: str, db: asyncpg.Connection, site: Website,
) -> None:
    site.routes["/list/1"] = Reply(body=listing_page("/events/1", "/events/2"))
    site.routes["/list/2"] = Reply(body=listing_page("/events/3", "/events/4", "/events/5"))
    for number in range(1, 6):
        site.routes[f"/events/{number}"] = Reply(body=event_page(number))
    run = ScrapeRun(redis, SETTINGS.model_copy(update={"links": LinkDiscovery(max_detail_pages=3)}))
    async with scrape_worker(redis_url, postgres_dsn, site):
        await run.start(site.url("/list/1", "127.0.0.1"), site.url("/list/2", "127.0.0.1"))
        progress = await run.finished()
    assert progress == {"listing_total": 2, "listing_done": 2, "detail_total": 3, "detail_done": 3}
    assert len(await item_rows(db, run)) == 3
    assert len([path for path in site.paths if path.startswith("/events/")]) == 3


async def test_a_flaky_page_is_retried_until_it_answers_and_a_missing_one_fails_at_once(
    redis: ArqRedis, redis_url: str, postgres_dsn: str, db: asyncpg.Connection, site: Website,
) -> None:
    site.routes["/list"] = Reply(body=listing_page("/events/1", "/events/2"))
    site.routes["/events/1"] = [Reply(500, body=b"oops"), Reply(500, body=b"oops"), Reply(500, body=b"oops"),
                                Reply(body=event_page(1))]
    run = ScrapeRun(redis)
    missing = site.url("/events/2", "127.0.0.1")
    async with scrape_worker(redis_url, postgres_dsn, site):
        await run.start(site.url("/list", "127.0.0.1"))
        progress = await run.finished()
    assert progress == {"listing_total": 1, "listing_done": 1, "detail_total": 2, "detail_done": 1, "detail_failed": 1}
    assert shows(await item_rows(db, run)) == ["Show 1"]
    assert await run.job_try(site.url("/events/1", "127.0.0.1")) == 4
    error = f"{missing} answered HTTP 404 Not Found"
    assert await failure_rows(db, run) == [(missing, "detail", error, 1)]
    assert await run.failures() == [{"url": missing, "error": error, "tries": 1}]
    assert site.paths.count("/events/2") == 1


async def test_the_last_try_of_a_failing_page_is_recorded_with_the_try_count(
    redis: ArqRedis, redis_url: str, postgres_dsn: str, db: asyncpg.Connection, site: Website,
) -> None:
    site.routes["/events/1"] = Reply(503, body=b"down")
    run = ScrapeRun(redis, SETTINGS.model_copy(update={"retry": QUICK_RETRY.model_copy(update={"max_tries": 2})}))
    page = site.url("/events/1", "127.0.0.1")
    async with scrape_worker(redis_url, postgres_dsn, site):
        await run.start_details(page)
        assert await run.finished() == {"detail_total": 1, "detail_failed": 1}
    assert await failure_rows(db, run) == [(page, "detail", f"{page} answered HTTP 503 Service Unavailable", 2)]


async def test_the_shared_rate_limit_defers_pages_without_spending_tries(
    redis: ArqRedis, redis_url: str, postgres_dsn: str, db: asyncpg.Connection, site: Website,
) -> None:
    details = [f"/events/{number}" for number in range(1, 6)]
    site.routes["/list"] = Reply(body=listing_page(*details))
    for number in range(1, 6):
        site.routes[f"/events/{number}"] = Reply(body=event_page(number))
    run = ScrapeRun(redis, SETTINGS.model_copy(update={"rate_limit": RateLimit(requests_per_minute=120, burst=1)}))
    async with scrape_worker(redis_url, postgres_dsn, site) as service:
        started = asyncio.get_running_loop().time()
        await run.start(site.url("/list", "127.0.0.1"))
        progress = await run.finished()
        elapsed = asyncio.get_running_loop().time() - started
    assert progress == {"listing_total": 1, "listing_done": 1, "detail_total": 5, "detail_done": 5}
    assert elapsed >= 5 * 60 / 120  # six pages, one token every half second after the first
    assert [await run.job_try(site.url(path, "127.0.0.1")) for path in details] == [1] * 5
    assert service.metrics.jobs_deferred.labels(SCRAPE_DETAIL)._value.get() >= 4
    assert run.deferred_seen >= 1
    assert len(await item_rows(db, run)) == 5


async def test_links_to_private_and_metadata_addresses_fail_unfetched(
    redis: ArqRedis, redis_url: str, postgres_dsn: str, db: asyncpg.Connection, site: Website,
) -> None:
    async with Website() as internal:
        internal.routes["/secret"] = Reply(body=event_page(9))
        metadata, private = "http://169.254.169.254/latest/meta-data/", internal.url("/secret", "127.0.0.1")
        site.routes["/list"] = Reply(body=listing_page(metadata, private))
        run = ScrapeRun(redis, SETTINGS.model_copy(update={"links": LinkDiscovery(same_site=False)}))
        async with scrape_worker(redis_url, postgres_dsn, site):
            await run.start(site.url("/list", "127.0.0.1"))
            assert await run.finished() == {"listing_total": 1, "listing_done": 1, "detail_total": 2,
                                            "detail_failed": 2}
        assert internal.requests == []
    assert await failure_rows(db, run) == sorted([
        (metadata, "detail", f"refused {metadata}: 169.254.169.254 is the cloud metadata address; {HINT}", 1),
        (private, "detail", f"refused {private}: 127.0.0.1 is a loopback address; {HINT}", 1),
    ])


async def test_pages_robots_txt_disallows_fail_unfetched(
    redis: ArqRedis, redis_url: str, postgres_dsn: str, db: asyncpg.Connection, site: Website,
) -> None:
    site.routes["/robots.txt"] = Reply(headers={"Content-Type": "text/plain"},
                                       body=b"User-agent: *\nDisallow: /private/\n")
    site.routes["/list"] = Reply(body=listing_page("/events/1", "/private/2"))
    site.routes["/events/1"] = Reply(body=event_page(1))
    run = ScrapeRun(redis)
    hidden = site.url("/private/2", "127.0.0.1")
    async with scrape_worker(redis_url, postgres_dsn, site):
        await run.start(site.url("/list", "127.0.0.1"))
        assert await run.finished() == {"listing_total": 1, "listing_done": 1, "detail_total": 2, "detail_done": 1,
                                        "detail_failed": 1}
    robots = site.url("/robots.txt", "127.0.0.1")
    error = (f"skipped {hidden}: {robots} disallows it for user agent 'kubearq (+https://kubearq.dev)'; "
             "set fetch.obeyRobotsTxt: false to fetch it anyway")
    assert await failure_rows(db, run) == [(hidden, "detail", error, 1)]
    assert "/private/2" not in site.paths


# --- Firecrawl -------------------------------------------------------------------------------------------------


class FakeFirecrawl:
    """Firecrawl's scrape API as its docs describe it: `POST /v1/scrape`, answers queued per target URL."""

    def __init__(self) -> None:
        self.answers: dict[str, list[web.Response]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> tuple[IPAddress, int]:
        return ip_address("127.0.0.1"), self.port

    def page(self, target: str, html: bytes, status: int = 200) -> None:
        data = {"rawHtml": html.decode(), "metadata": {"sourceURL": target, "url": target, "statusCode": status}}
        self.reply(target, 200, {"success": True, "data": data})

    def reply(self, target: str, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.answers.setdefault(target, []).append(web.json_response(body, status=status, headers=headers))

    async def _scrape(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append((request.headers.get("Authorization", ""), body))
        queue = self.answers.get(body["url"])
        if not queue:
            return web.json_response({"success": False, "error": "no such page"}, status=500)
        return queue.pop(0) if len(queue) > 1 else queue[0]

    async def __aenter__(self) -> FakeFirecrawl:
        app = web.Application()
        app.router.add_post("/v1/scrape", self._scrape)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def firecrawl() -> AsyncIterator[FakeFirecrawl]:
    async with FakeFirecrawl() as api:
        yield api


def firecrawl_settings(api: FakeFirecrawl) -> ScrapeSettings:
    backend = FirecrawlBackend(api_key_secret_ref=SecretKeyRef(name="firecrawl"), url=api.url)
    return SETTINGS.model_copy(update={"backend": Backend.FIRECRAWL, "firecrawl": backend,
                                       "fetch": FetchPolicy(obey_robots_txt=False)})


LISTING = "https://events.example/list"


async def test_firecrawl_fetches_pages_with_the_namespaces_key(
    redis: ArqRedis, redis_url: str, postgres_dsn: str, db: asyncpg.Connection, firecrawl: FakeFirecrawl,
    tmp_path: Path,
) -> None:
    (tmp_path / "shows" / "firecrawl").mkdir(parents=True)
    (tmp_path / "shows" / "firecrawl" / "apiKey").write_text("fc-shows\n")
    firecrawl.page(LISTING, listing_page("/e/1", "/e/2"))
    firecrawl.page("https://events.example/e/1", event_page(1))
    firecrawl.page("https://events.example/e/2", event_page(2))
    run = ScrapeRun(redis, firecrawl_settings(firecrawl))
    async with scrape_worker(redis_url, postgres_dsn, firecrawl, firecrawl_secrets_dir=str(tmp_path)):
        await run.start(LISTING)
        assert await run.finished() == {"listing_total": 1, "listing_done": 1, "detail_total": 2, "detail_done": 2}
    assert shows(await item_rows(db, run)) == ["Show 1", "Show 2"]
    authorization, body = firecrawl.calls[0]
    assert authorization == "Bearer fc-shows"
    assert (body["url"], body["formats"]) == (LISTING, ["rawHtml"])


async def test_firecrawl_rate_limiting_defers_without_spending_a_try(
    redis: ArqRedis, redis_url: str, postgres_dsn: str, firecrawl: FakeFirecrawl,
) -> None:
    firecrawl.reply(LISTING, 429, {"success": False, "error": "Rate limit exceeded"}, {"Retry-After": "1"})
    firecrawl.page(LISTING, listing_page())
    run = ScrapeRun(redis, firecrawl_settings(firecrawl))
    async with scrape_worker(redis_url, postgres_dsn, firecrawl, firecrawl_api_key="fc-all",
                             firecrawl_api_url=firecrawl.url) as service:
        started = asyncio.get_running_loop().time()
        await run.start(LISTING)
        assert await run.finished() == {"listing_total": 1, "listing_done": 1}
        elapsed = asyncio.get_running_loop().time() - started
    assert await run.job_try(LISTING) == 1
    assert elapsed >= 1
    assert [authorization for authorization, _ in firecrawl.calls] == ["Bearer fc-all"] * 2
    assert service.metrics.jobs_deferred.labels(SCRAPE_LISTING)._value.get() == 1


async def test_firecrawl_out_of_credits_fails_the_page_with_a_clear_message(
    redis: ArqRedis, redis_url: str, postgres_dsn: str, db: asyncpg.Connection, firecrawl: FakeFirecrawl,
) -> None:
    firecrawl.reply(LISTING, 402, {"success": False, "error": "Insufficient credits to perform this request."})
    run = ScrapeRun(redis, firecrawl_settings(firecrawl))
    async with scrape_worker(redis_url, postgres_dsn, firecrawl, firecrawl_api_key="fc-all",
                             firecrawl_api_url=firecrawl.url):
        await run.start(LISTING)
        assert await run.finished() == {"listing_total": 1, "listing_failed": 1}
    error = (f"Firecrawl at {firecrawl.url} refused to scrape {LISTING}: HTTP 402 Payment Required, the account is "
             "out of credits (Insufficient credits to perform this request.); add credits to the Firecrawl account, "
             "then scrape again")
    assert await failure_rows(db, run) == [(LISTING, "listing", error, 1)]
    assert len(firecrawl.calls) == 1


async def test_the_default_firecrawl_key_is_never_sent_to_another_url(
    redis: ArqRedis, redis_url: str, postgres_dsn: str, db: asyncpg.Connection, firecrawl: FakeFirecrawl,
) -> None:
    run = ScrapeRun(redis, firecrawl_settings(firecrawl))
    async with scrape_worker(redis_url, postgres_dsn, firecrawl, firecrawl_api_key="fc-all"):
        await run.start(LISTING)
        assert await run.finished() == {"listing_total": 1, "listing_failed": 1}
    [(_, _, error, _)] = await failure_rows(db, run)
    assert error.startswith("backend Firecrawl: this worker has no API key for Secret 'firecrawl' key 'apiKey' "
                            "of namespace 'shows'")
    assert firecrawl.calls == []


# --- Crashes and outages ---------------------------------------------------------------------------------------


def scrape_worker_process(redis_url: str, database_url: str, log: Path) -> subprocess.Popen[bytes]:
    """`kubearq worker` as a real process, serving the built-in jobs (its log in a file)."""
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url, "HTTP_PORT": str(free_port()),
           "HTTP_HOST": "127.0.0.1", "HEARTBEAT_INTERVAL": "1", "IN_PROGRESS_TTL": "3", "POLL_DELAY": "0.01",
           "PYTHONPATH": str(REPO)}
    with log.open("wb") as sink:
        return subprocess.Popen([sys.executable, "-m", "kubearq.cli", "worker"], env=env, cwd=REPO, stdout=sink,
                                stderr=subprocess.STDOUT)


async def test_a_page_of_a_killed_worker_is_scraped_again_and_stored_once(
    redis: ArqRedis, redis_url: str, postgres_dsn: str, db: asyncpg.Connection, site: Website, tmp_path: Path,
) -> None:
    released = asyncio.Event()
    site.routes["/events/1"] = [Reply(body=event_page(1), hold=released), Reply(body=event_page(1))]
    # A real process cannot take the test hook: this request allows private networks (127.0.0.1) itself.
    run = ScrapeRun(redis, SETTINGS.model_copy(update={"fetch": FetchPolicy(allow_private_networks=True)}))
    page = site.url("/events/1", "127.0.0.1")
    await run.start_details(page)
    doomed = scrape_worker_process(redis_url, postgres_dsn, tmp_path / "worker.log")
    try:
        await until(lambda: _true("/events/1" in site.paths), within=30, what="the fetch in the subprocess")
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=10)
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait(timeout=10)
        released.set()
    killed_at = asyncio.get_running_loop().time()
    async with scrape_worker(redis_url, postgres_dsn, site):
        assert await run.finished() == {"detail_total": 1, "detail_done": 1}
        rerun_after = asyncio.get_running_loop().time() - killed_at
    assert rerun_after <= 3 + 3  # the in-progress mark's lifetime, plus slack
    assert shows(await item_rows(db, run)) == ["Show 1"]
    assert site.paths.count("/events/1") == 2


async def _true(value: bool) -> bool:
    return value


POSTGRES_OUTAGE_SECONDS = 20  # the outage: jobs must neither give up nor spend their tries meanwhile


async def test_detail_pages_wait_out_a_postgresql_outage_and_lose_nothing(
    redis: ArqRedis, redis_url: str, postgres_private: PostgresServer, site: Website,
) -> None:
    site.routes["/list"] = Reply(body=listing_page(*(f"/events/{number}" for number in range(1, 4))))
    for number in range(1, 4):
        site.routes[f"/events/{number}"] = Reply(body=event_page(number))
    run = ScrapeRun(redis)
    async with scrape_worker(redis_url, postgres_private.dsn(), site, retry_backoff=0.2,
                             retry_backoff_max=2.0) as service:
        await until(lambda: _true(CONTEXT_KEY in service.worker.ctx), what="the worker's start (migrations)")
        await asyncio.to_thread(postgres_private.stop)

        async def restart_later() -> None:
            await asyncio.sleep(POSTGRES_OUTAGE_SECONDS)  # the outage's length: an action, not a wait
            await asyncio.to_thread(postgres_private.start)

        restart = asyncio.create_task(restart_later())
        await run.start(site.url("/list", "127.0.0.1"))
        await until(lambda: _deferred(run), what="a detail page deferred by the outage")
        assert not restart.done()
        assert await run.finished(within=POSTGRES_OUTAGE_SECONDS + 30) == {
            "listing_total": 1, "listing_done": 1, "detail_total": 3, "detail_done": 3}
        await restart
    connection = await asyncpg.connect(postgres_private.dsn())
    try:
        count = await connection.fetchval("SELECT count(*) FROM scrape_items WHERE request_uid = $1",
                                          uuid.UUID(run.uid))
    finally:
        await connection.close()
    assert count == 3


async def _deferred(run: ScrapeRun) -> bool:
    return (await run.progress()).get("detail_deferred", 0) > 0


async def test_delete_scrape_results_removes_only_that_requests_rows(postgres_dsn: str) -> None:
    from types import SimpleNamespace

    from kubearq.core.contract import RequestRef as ContractRequestRef
    from kubearq.core.contract import ResultsDeletion
    from kubearq.worker.scrape.jobs import CONTEXT_KEY, delete_scrape_results
    from kubearq.worker.storage import RequestRef as StoredRequestRef
    from kubearq.worker.storage import Storage

    gone, kept = str(uuid.uuid4()), str(uuid.uuid4())
    async with Storage(postgres_dsn, connect_timeout=30) as storage:
        await storage.migrate()
        for uid in (gone, kept):
            await storage.store_page_items(StoredRequestRef(uid=uid, namespace="ns", name=uid[:8]),
                                           "https://example.com/e/1", [{"name": "gig"}], "Event")
        deletion = ResultsDeletion(request=ContractRequestRef(uid=gone, namespace="ns", name="doomed"))
        ctx = {CONTEXT_KEY: SimpleNamespace(storage=storage)}
        result = await delete_scrape_results(ctx, deletion.model_dump(mode="json", by_alias=True))
        again = await delete_scrape_results(ctx, deletion.model_dump(mode="json", by_alias=True))
        remaining = (await storage.count_items(uuid.UUID(gone)), await storage.count_items(uuid.UUID(kept)))
    assert (result, again, remaining) == ({"items": 1, "failures": 0}, {"items": 0, "failures": 0}, (0, 1))


async def test_a_redis_restart_mid_run_with_aof_loses_no_page(
    redis_private: RedisServer, postgres_dsn: str, site: Website,
) -> None:
    redis_private.restart(aof=True)
    held = asyncio.Event()
    site.routes["/list"] = Reply(body=listing_page(*(f"/events/{number}" for number in range(1, 7))))
    for number in range(1, 7):
        site.routes[f"/events/{number}"] = Reply(body=event_page(number), hold=held if number > 3 else None)
    client = create_redis(redis_private.url)
    run = ScrapeRun(client)
    try:
        async with scrape_worker(redis_private.url, postgres_dsn, site) as service:
            await until(lambda: _true(CONTEXT_KEY in service.worker.ctx), what="the worker's start (migrations)")
            await run.start(site.url("/list", "127.0.0.1"))
            await until(lambda: _progress_at_least(run, "detail_done", 3), what="the first three pages")
            redis_private.kill()  # pages 4-6 are being fetched right now
            await until(lambda: _true(not service.worker.redis_available), what="the outage noticed")
            redis_private.restart(aof=True)
            held.set()
            counts = await run.finished(within=60)
        assert (counts["detail_total"], counts["detail_done"], counts.get("detail_failed", 0)) == (6, 6, 0)
        connection = await asyncpg.connect(postgres_dsn)
        try:
            stored = await connection.fetchval(
                "SELECT count(DISTINCT url) FROM scrape_items WHERE request_uid = $1", uuid.UUID(run.uid))
        finally:
            await connection.close()
        assert stored == 6
    finally:
        await client.aclose()


async def _progress_at_least(run: ScrapeRun, field_name: str, count: int) -> bool:
    return (await run.progress()).get(field_name, 0) >= count
