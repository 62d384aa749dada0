"""The built-in jobs a `kubearq worker` serves besides the user's own."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from typing import Any

from arq.worker import func

from kubearq.core.contract import DELETE_SCRAPE_RESULTS, SCRAPE_DETAIL, SCRAPE_LISTING
from kubearq.worker.main import JobSet
from kubearq.worker.ratelimit import SharedRateLimiter
from kubearq.worker.runtime import Backoff
from kubearq.worker.scrape.firecrawl import FirecrawlClient, FirecrawlKeys
from kubearq.worker.scrape.jobs import (
    CONTEXT_KEY,
    MAX_TRIES,
    TIMEOUT_SECONDS,
    Fetchers,
    NetworkHooks,
    ScrapeResources,
    delete_scrape_results,
    scrape_detail,
    scrape_listing,
)
from kubearq.worker.scrape.robots import RobotsCache
from kubearq.worker.settings import WorkerSettings
from kubearq.worker.storage import Storage

logger = logging.getLogger(__name__)


def builtin_jobs(settings: WorkerSettings, *, hooks: NetworkHooks | None = None) -> JobSet:
    """The scrape pipeline's jobs, with the PostgreSQL, fetchers and rate limiter they share per process.

    Without DATABASE_URL they are left out, so a worker serving only its user's functions needs no PostgreSQL.
    `hooks` is for tests only (their loopback websites); production passes nothing.
    """
    if settings.database_url is None:
        logger.info("DATABASE_URL is not set: not serving the built-in %s and %s jobs (they store into PostgreSQL)",
                    SCRAPE_LISTING, SCRAPE_DETAIL)
        return JobSet()
    database_url = settings.database_url
    network = hooks or NetworkHooks()

    async def start(ctx: dict[Any, Any]) -> None:
        async with AsyncExitStack() as stack:
            storage = Storage(database_url, connect_timeout=settings.database_connect_timeout)
            await storage.connect()
            stack.push_async_callback(storage.close)
            await storage.migrate(allow_newer_schema=settings.allow_newer_schema)
            keys = FirecrawlKeys(settings.firecrawl_secrets_dir, settings.firecrawl_api_key, settings.firecrawl_api_url)
            ctx[CONTEXT_KEY] = ScrapeResources(
                storage=storage,
                fetchers=Fetchers(RobotsCache(), network),
                firecrawl=FirecrawlClient(keys, resolver=network.resolver, extra_allowed=network.extra_allowed),
                limiter=SharedRateLimiter(ctx["redis"]),
                hooks=network,
                storage_backoff=Backoff(settings.retry_backoff, settings.retry_backoff_max),
            )
            stack.pop_all()  # started: the resources are closed on shutdown

    async def stop(ctx: dict[Any, Any]) -> None:
        resources: ScrapeResources | None = ctx.pop(CONTEXT_KEY, None)
        if resources is not None:
            await resources.aclose()

    return JobSet(
        functions=[
            func(scrape_listing, name=SCRAPE_LISTING, max_tries=MAX_TRIES, timeout=TIMEOUT_SECONDS),
            func(scrape_detail, name=SCRAPE_DETAIL, max_tries=MAX_TRIES, timeout=TIMEOUT_SECONDS),
            func(delete_scrape_results, name=DELETE_SCRAPE_RESULTS),
        ],
        on_startup=[start],
        on_shutdown=[stop],
    )
