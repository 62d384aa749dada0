"""The scrape pipeline's jobs: `scrape_listing` fans a listing page's links out as `scrape_detail` jobs,
`scrape_detail` stores what a detail page holds in PostgreSQL.

Each job fetches one page (`PageJob`), under the request's rate limit, retry policy and fetch policy:
- A rate-limit wait is a `Defer` to the slot of the token reserved for the job: no try spent, no slot held. It
  is counted in `<kind>_deferred` while the job waits. A wait of at most `ratelimit.JOB_WAIT` (0.25 s) is slept
  through instead: a deferral would wake it later than that.
- A retryable fetch error with tries left is an `arq.worker.Retry` after the request's backoff; it spends a
  try, as a failure should. ARQ's own try limit is set above the CRD's maximum, so the request's
  `retry.maxTries` decides.
- The last failure, or one that retrying cannot fix (a refused URL, robots.txt, a 404, no Firecrawl credits),
  is data, not a crash: kept in PostgreSQL and in the request's failure list, counted, and the job ends.
- PostgreSQL being unreachable is not the page's fault: the job is deferred with a backoff, no try spent.

Counting is idempotent: a page's outcome is recorded once per job id (a job re-run after a crash, or a listing
enqueueing again, counts nothing twice), and enqueueing counts only ids that are new (`queueing.Tally`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from arq.worker import Retry
from redis.asyncio import Redis

from kubearq.core.contract import (
    CURRENT_ORIGIN,
    FAILURES_SHOWN,
    MAX_URL_LENGTH,
    SCRAPE_DETAIL,
    Backend,
    FetchPolicy,
    PageJob,
    PageKind,
    ResultsDeletion,
    RetryPolicy,
    deferred_key,
    failures_key,
    finished_key,
    job_id_for_page,
    progress_key,
    request_jobs_key,
)
from kubearq.core.observability import log_context
from kubearq.core.queueing import NewJob, Tally, enqueue_many
from kubearq.worker.net.http import Resolver
from kubearq.worker.net.policy import Endpoint, NetworkPolicy, redact_url
from kubearq.worker.ratelimit import JOB_WAIT, SharedRateLimiter, bucket_key
from kubearq.worker.runtime import Backoff, Defer, FinishScript, on_finish
from kubearq.worker.scrape.extract import extract_css, extract_json_ld, find_links
from kubearq.worker.scrape.fetch import (
    Fetcher,
    FetchError,
    FetchTimeoutError,
    HttpStatusError,
    Page,
    UnsafeUrlError,
    robots_refusal,
)
from kubearq.worker.scrape.firecrawl import FirecrawlClient, FirecrawlRateLimitedError
from kubearq.worker.scrape.robots import RobotsCache
from kubearq.worker.storage import RequestRef as StoredRequest
from kubearq.worker.storage import Storage, StorageUnavailableError

logger = logging.getLogger(__name__)

CONTEXT_KEY = "kubearq_scrape"
"""Where `on_startup` puts the `ScrapeResources` in ARQ's job context."""
MAX_TRIES = 25
"""ARQ's try limit for the scrape jobs: above the CRD's largest `retry.maxTries` (20), so the request decides."""
TIMEOUT_SECONDS = 3600 + 300
"""The runtime's per-try timeout, a backstop only: a fetch ends within the request's own (≤ 3600 s) timeout."""
MARKER_SECONDS = 7 * 86_400
"""Lifetime of the per-request bookkeeping keys, refreshed on every write; longer than any job lives."""
RETRY_AFTER_DEFAULT = 5.0
"""Seconds to wait on a Firecrawl 429 that names no Retry-After."""

Outcome = Literal["done", "failed"]


def outages_key(job_id: str) -> str:
    """Consecutive PostgreSQL outages a job met (its deferral backoff)."""
    return f"kubearq:outages:{job_id}"


# --- Pure decisions ------------------------------------------------------------------------------------------


def try_timeout(policy: RetryPolicy, job_try: int) -> float:
    """`timeoutSeconds` on the first try, doubled on each later one, at most `maxTimeoutSeconds`."""
    return float(min(policy.max_timeout_seconds, policy.timeout_seconds * (1 << min(30, max(0, job_try - 1)))))


def retry_delay(policy: RetryPolicy, job_try: int, retry_after: float | None = None,
                rng: random.Random | None = None) -> float:
    """Seconds before the next try after try `job_try` failed.

    `backoffSeconds` doubled per try, at most `maxBackoffSeconds`, less up to a fifth at random so that pages
    failing together do not retry together. A server's Retry-After is honoured up to `maxBackoffSeconds`.
    """
    ceiling = min(policy.max_backoff_seconds, policy.backoff_seconds * (1 << min(30, max(0, job_try - 1))))
    delay = ceiling * (rng or random).uniform(0.8, 1.0)
    if retry_after is not None:
        delay = max(delay, min(retry_after, float(policy.max_backoff_seconds)))
    return delay


def is_final(error: FetchError, job_try: int, policy: RetryPolicy) -> bool:
    """A failure is final when retrying cannot help or this was the request's last try."""
    return not error.retryable or job_try >= policy.max_tries


# --- Progress in Redis ----------------------------------------------------------------------------------------

# KEYS: deferred set, progress hash. ARGV: job id, the `<kind>_deferred` field, key lifetime (s).
_COUNT_DEFERRED = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
"""

# KEYS: finished hash, progress hash, failures list, the job's outage streak, the deferred set.
# ARGV: job id, outcome (done|failed), kind, failure JSON, failures kept, key lifetime (s).
# A page counts once; should a re-run end differently (failed, then done), the count moves. A page that
# waited is counted deferred until it ends here (not when it runs again: that was a round trip per page).
_FINISH = """
redis.call('DEL', KEYS[4])
if redis.call('SREM', KEYS[5], ARGV[1]) == 1 then redis.call('HINCRBY', KEYS[2], ARGV[3] .. '_deferred', -1) end
local previous = redis.call('HGET', KEYS[1], ARGV[1])
if previous == ARGV[2] then return 0 end
if previous then redis.call('HINCRBY', KEYS[2], ARGV[3] .. '_' .. previous, -1) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('HINCRBY', KEYS[2], ARGV[3] .. '_' .. ARGV[2], 1)
if ARGV[2] == 'failed' and redis.call('LLEN', KEYS[3]) < tonumber(ARGV[5]) then
  redis.call('RPUSH', KEYS[3], ARGV[4])
end
return 1
"""


@dataclass(frozen=True)
class PageProgress:
    """The progress counters one page job moves."""

    redis: Redis
    request_uid: str
    kind: PageKind
    job_id: str

    async def deferred(self) -> None:
        """The job waits (for a token, Firecrawl or PostgreSQL) without spending a try; it counts as
        deferred until it finishes."""
        script = self.redis.register_script(_COUNT_DEFERRED)
        await script(keys=[deferred_key(self.request_uid), progress_key(self.request_uid)],
                     args=[self.job_id, f"{self.kind}_deferred", MARKER_SECONDS])

    def finished(self, outcome: Outcome, url: str = "", error: str = "", tries: int = 0) -> FinishScript:
        """The page's outcome, counted as its job completes (`on_finish`: in the same round trip)."""
        failure = json.dumps({"url": url, "error": error, "tries": tries}) if outcome == "failed" else ""
        return FinishScript(
            _FINISH,
            keys=[finished_key(self.request_uid), progress_key(self.request_uid), failures_key(self.request_uid),
                  outages_key(self.job_id), deferred_key(self.request_uid)],
            args=[self.job_id, outcome, self.kind, failure, FAILURES_SHOWN, MARKER_SECONDS],
        )

    async def storage_outages(self) -> int:
        """Count one more PostgreSQL outage for this job; returns how many in a row."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(outages_key(self.job_id))
            pipe.expire(outages_key(self.job_id), MARKER_SECONDS)
            count, _ = await pipe.execute()
        return int(count)


# --- What a worker process holds for the jobs ---------------------------------------------------------------


@dataclass(frozen=True)
class NetworkHooks:
    """Test hooks only, passed in code (`builtin_jobs(settings, hooks=...)`), never from the environment.

    `extra_allowed` admits the tests' own loopback servers by exact address and port; `resolver` answers names.
    """

    extra_allowed: frozenset[Endpoint] = frozenset()
    resolver: Resolver | None = None


@dataclass
class _PooledFetcher:
    fetcher: Fetcher
    users: int = 0


class Fetchers:
    """One `Fetcher` per fetch policy in use: pooled connections were checked under their policy and must not
    carry a request of a stricter one. Idle fetchers beyond `max_idle` are closed, least recently used first."""

    def __init__(self, robots: RobotsCache, hooks: NetworkHooks, *, max_idle: int = 16) -> None:
        self._robots = robots
        self._hooks = hooks
        self._max_idle = max_idle
        self._pool: dict[FetchPolicy, _PooledFetcher] = {}

    @contextlib.asynccontextmanager
    async def using(self, policy: FetchPolicy) -> AsyncIterator[Fetcher]:
        entry = self._pool.pop(policy, None)
        created = entry is None
        if entry is None:
            entry = _PooledFetcher(Fetcher(policy, robots_cache=self._robots, resolver=self._hooks.resolver,
                                           extra_allowed=self._hooks.extra_allowed))
        # In the pool before anything awaits, so that jobs of one policy never open two fetchers.
        self._pool[policy] = entry  # most recently used last
        entry.users += 1
        try:
            if created:
                await entry.fetcher.__aenter__()
            yield entry.fetcher
        finally:
            entry.users -= 1
            await self._close_idle()

    async def _close_idle(self) -> None:
        idle = [policy for policy, entry in self._pool.items() if entry.users == 0]
        for policy in idle[: max(0, len(idle) - self._max_idle)]:
            await self._pool.pop(policy).fetcher.__aexit__(None, None, None)

    async def aclose(self) -> None:
        pool, self._pool = self._pool, {}
        for entry in pool.values():
            await entry.fetcher.__aexit__(None, None, None)


@dataclass
class ScrapeResources:
    """Created once per worker process in `on_startup`, closed in `on_shutdown`."""

    storage: Storage
    fetchers: Fetchers
    firecrawl: FirecrawlClient
    limiter: SharedRateLimiter
    hooks: NetworkHooks = field(default_factory=NetworkHooks)
    storage_backoff: Backoff = field(default_factory=lambda: Backoff(base=1.0, cap=300.0))
    """Deferral while PostgreSQL is unreachable, growing with the job's consecutive outages (the worker's
    RETRY_BACKOFF and RETRY_BACKOFF_MAX: an outage is the worker's trouble, not the page's)."""
    rng: random.Random = field(default_factory=random.Random)

    async def aclose(self) -> None:
        async with AsyncExitStack() as stack:
            stack.push_async_callback(self.storage.close)
            stack.push_async_callback(self.firecrawl.aclose)
            stack.push_async_callback(self.fetchers.aclose)


# --- The jobs ------------------------------------------------------------------------------------------------


async def scrape_listing(ctx: dict[str, Any], page: dict[str, Any]) -> dict[str, object]:
    """Fetch a listing page and enqueue a `scrape_detail` job per new detail link (at most maxDetailPages)."""
    return await _run(ctx, page, "listing")


async def scrape_detail(ctx: dict[str, Any], page: dict[str, Any]) -> dict[str, object]:
    """Fetch a detail page and store its JSON-LD items or CSS fields in PostgreSQL."""
    return await _run(ctx, page, "detail")


async def _run(ctx: dict[str, Any], raw_page: dict[str, Any], kind: PageKind) -> dict[str, object]:
    job = PageJob.model_validate(raw_page)
    resources: ScrapeResources = ctx[CONTEXT_KEY]
    job_id, job_try = str(ctx["job_id"]), int(ctx["job_try"])
    request = job.request
    progress = PageProgress(ctx["redis"], request.uid, kind, job_id)
    with log_context(namespace=request.namespace, name=request.name, url=redact_url(job.url), page_kind=kind):
        defer: Defer
        try:
            fetched = await _fetch(resources, job, job_id, job_try)
            if kind == "listing":
                summary = await _fan_out(ctx["redis"], job, fetched)
            else:
                summary = await _store_items(resources.storage, job, fetched)
        except FirecrawlRateLimitedError as error:
            defer = Defer(error.retry_after if error.retry_after is not None else RETRY_AFTER_DEFAULT, error.message)
        except FetchError as error:
            return await _failed(ctx, resources, progress, job, kind, error, job_try)
        except StorageUnavailableError as error:
            defer = Defer(resources.storage_backoff.delay(await progress.storage_outages()), str(error))
        except Defer as waiting:
            defer = waiting
        except Exception as error:
            if job_try < MAX_TRIES:
                raise  # the runtime logs it and retries with its backoff
            # The last try ARQ allows: keep the page as failed, so the request can still finish.
            failure = FetchError(job.url, f"internal error after {job_try} tries: {type(error).__name__}: {error}",
                                 retryable=False)
            return await _failed(ctx, resources, progress, job, kind, failure, job_try)
        else:
            on_finish(ctx, progress.finished("done"))
            logger.info("scraped on try %d: %s", job_try, summary)
            return {"outcome": "done", **summary}
        await progress.deferred()
        raise defer


async def _fetch(resources: ScrapeResources, job: PageJob, job_id: str, job_try: int) -> Page:
    """Check the URL and robots.txt, take a rate-limit token (sleeping up to JOB_WAIT for it, else reserving one
    and deferring to its slot), then fetch with the request's backend."""
    settings = job.settings
    policy = settings.fetch
    timeout = try_timeout(settings.retry, job_try)
    refusal = NetworkPolicy(policy.allow_private_networks, resources.hooks.extra_allowed).check_url(job.url)
    if refusal is not None:
        raise UnsafeUrlError(job.url, refusal, job.url)
    api_key = None
    if settings.backend is Backend.FIRECRAWL:
        if settings.firecrawl is None:
            raise FetchError(job.url, "backend Firecrawl needs firecrawl.apiKeySecretRef", retryable=False)
        api_key = resources.firecrawl.keys.key_for(job.request.namespace, settings.firecrawl, job.url)
    async with resources.fetchers.using(policy) as fetcher:
        if policy.obey_robots_txt:
            await _check_robots(fetcher, job.url, policy.user_agent, timeout)
        key = bucket_key(job.request.uid, urlsplit(job.url).hostname, settings.rate_limit.per_host)
        wait = await resources.limiter.acquire(key, settings.rate_limit, holder=job_id, wait_within=JOB_WAIT)
        if wait > 0:
            raise Defer(wait, f"rate limit of {settings.rate_limit.requests_per_minute}/min, a token reserved")
        if settings.firecrawl is not None and api_key is not None:
            return await resources.firecrawl.scrape(settings.firecrawl, job.url, api_key=api_key, policy=policy,
                                                    timeout=timeout)
        return await fetcher.fetch(job.url, timeout=timeout)


async def _check_robots(
    fetcher: Fetcher, url: str, user_agent: str, timeout: float,  # noqa: ASYNC109 - becomes a FetchTimeoutError
) -> None:
    rules = fetcher.cached_robots_rules(url)  # the common case: no deadline to arm for a cache hit
    try:
        if rules is None:
            async with asyncio.timeout(timeout):
                rules = await fetcher.robots_rules(url)
    except TimeoutError:
        raise FetchTimeoutError(url, (
            f"gave up on {redact_url(url)} after {timeout:g} s: its robots.txt did not arrive within this try's "
            "timeout; the next try gets longer (retry.timeoutSeconds)"
        ), retryable=True) from None
    refused = robots_refusal(rules, url, user_agent)
    if refused is not None:
        raise refused


async def _fan_out(redis: Redis, job: PageJob, listing: Page) -> dict[str, object]:
    """Enqueue the detail pages linked from a listing page; the id makes a page found twice one job, and each
    carries the listing's origin (a worker pool with ALLOWED_NAMESPACES runs them as it ran the listing)."""
    discovery = job.settings.links
    links = [link for link in find_links(listing.text, listing.url, discovery) if len(link) <= MAX_URL_LENGTH]
    links = links[: discovery.max_detail_pages]
    request = job.request.model_dump(mode="json", by_alias=True)
    settings = job.settings.model_dump(mode="json", by_alias=True)
    uid = job.request.uid
    origin = CURRENT_ORIGIN.get()
    jobs = [NewJob(job_id_for_page(uid, link), SCRAPE_DETAIL, {"page": {"request": request, "url": link,
                                                                       "settings": settings}}, origin=origin)
            for link in links]
    tally = Tally(progress_key(uid), "detail_total", request_jobs_key(uid), cap=discovery.max_detail_pages)
    added = await enqueue_many(redis, job.settings.queue, jobs, tally=tally)
    return {"links": len(links), "enqueued": len(added)}


async def _store_items(storage: Storage, job: PageJob, detail: Page) -> dict[str, object]:
    """Extract the page's items and make them its stored items (an idempotent upsert)."""
    extraction = job.settings.extract
    json_ld = extraction.effective_json_ld
    items: Sequence[Mapping[str, object]]
    if json_ld is not None:
        result = extract_json_ld(detail.text, json_ld.types)
        for skipped in result.skipped:
            logger.warning("skipped JSON-LD block %d, not JSON: %s", skipped.index, skipped.error)
        items, item_type = result.items, ",".join(json_ld.types)
    else:
        assert extraction.css is not None
        items, item_type = [dict(extract_css(detail.text, extraction.css.fields))], "css"
    await storage.store_page_items(_stored(job), job.url, items, item_type)
    return {"items": len(items)}


async def _failed(ctx: dict[str, Any], resources: ScrapeResources, progress: PageProgress, job: PageJob,
                  kind: PageKind, error: FetchError, job_try: int) -> dict[str, object]:
    """Retry (raising `Retry`) while the request allows; else record the failure and end the job normally."""
    policy = job.settings.retry
    if not is_final(error, job_try, policy):
        retry_after = error.retry_after if isinstance(error, HttpStatusError) else None
        delay = retry_delay(policy, job_try, retry_after, resources.rng)
        logger.warning("try %d of %d failed, retrying in %.2fs: %s", job_try, policy.max_tries, delay, error.message)
        raise Retry(defer=delay)
    logger.warning("failed for good on try %d of %d: %s", job_try, policy.max_tries, error.message)
    try:
        await resources.storage.record_failure(_stored(job), job.url, kind, error.message, job_try)
    except StorageUnavailableError as outage:
        await progress.deferred()
        raise Defer(resources.storage_backoff.delay(await progress.storage_outages()), str(outage)) from None
    on_finish(ctx, progress.finished("failed", job.url, error.message, job_try))
    return {"outcome": "failed", "error": error.message, "tries": job_try}


def _stored(job: PageJob) -> StoredRequest:
    return StoredRequest(uid=uuid.UUID(job.request.uid), namespace=job.request.namespace, name=job.request.name)


async def delete_scrape_results(ctx: dict[str, Any], deletion: dict[str, Any]) -> dict[str, object]:
    """Remove a deleted ScrapeRequest's stored items and failures (`deletionPolicy: Delete`); idempotent."""
    request = ResultsDeletion.model_validate(deletion).request
    resources: ScrapeResources = ctx[CONTEXT_KEY]
    with log_context(namespace=request.namespace, name=request.name):
        deleted = await resources.storage.delete_request(uuid.UUID(request.uid))
        logger.info("deleted %d items and %d failures of the request", deleted.items, deleted.failures)
    return {"items": deleted.items, "failures": deleted.failures}
