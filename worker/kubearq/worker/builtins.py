"""The built-in jobs a `kubearq worker` serves besides the user's own."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from typing import Any

from arq.worker import func

from kubearq.core.contract import (
    COMPACT_SNAPSHOTS,
    DELETE_SCRAPE_RESULTS,
    SCRAPE_DETAIL,
    SCRAPE_LISTING,
    SYNC_CONNECTION,
    SYNC_CONNECTIONS,
)
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
from kubearq.worker.sync import jobs as sync
from kubearq.worker.sync.credentials import SecretsDir
from kubearq.worker.sync.http import ApiClient
from kubearq.worker.sync.provider import load_providers
from kubearq.worker.sync.store import SyncStore

logger = logging.getLogger(__name__)


def builtin_jobs(settings: WorkerSettings, *, hooks: NetworkHooks | None = None) -> JobSet:
    """The scrape pipeline's and the sync family's jobs, with the PostgreSQL, fetchers, HTTP client and rate limiter
    they share per process.

    Without DATABASE_URL they are left out, so a worker serving only its user's functions needs no PostgreSQL.
    `hooks` is for tests only (their loopback websites); production passes nothing.
    """
    if settings.database_url is None:
        logger.info("DATABASE_URL is not set: not serving the built-in scrape and sync jobs (they store into "
                    "PostgreSQL)")
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
            api = ApiClient(timeout=settings.sync_request_timeout, resolver=network.resolver,
                            extra_allowed=network.extra_allowed)
            stack.push_async_callback(api.aclose)
            ctx[sync.CONTEXT_KEY] = sync.SyncResources(
                store=SyncStore(storage), providers=load_providers(), secrets=SecretsDir(settings.sync_secrets_dir),
                api=api, queue=settings.queue,
                storage_backoff=Backoff(settings.retry_backoff, settings.retry_backoff_max))
            stack.pop_all()  # started: the resources are closed on shutdown

    async def stop(ctx: dict[Any, Any]) -> None:
        resources: ScrapeResources | None = ctx.pop(CONTEXT_KEY, None)
        if resources is not None:
            await resources.aclose()  # the storage too, which the sync jobs share
        synced: sync.SyncResources | None = ctx.pop(sync.CONTEXT_KEY, None)
        if synced is not None:
            await synced.api.aclose()

    return JobSet(
        functions=[
            func(scrape_listing, name=SCRAPE_LISTING, max_tries=MAX_TRIES, timeout=TIMEOUT_SECONDS),
            func(scrape_detail, name=SCRAPE_DETAIL, max_tries=MAX_TRIES, timeout=TIMEOUT_SECONDS),
            func(delete_scrape_results, name=DELETE_SCRAPE_RESULTS),
            func(sync.sync_connections, name=SYNC_CONNECTIONS, max_tries=sync.MAX_TRIES),
            func(sync.sync_connection, name=SYNC_CONNECTION, max_tries=sync.MAX_TRIES, timeout=sync.TIMEOUT_SECONDS),
            func(sync.compact_snapshots, name=COMPACT_SNAPSHOTS, max_tries=sync.MAX_TRIES,
                 timeout=sync.TIMEOUT_SECONDS),
        ],
        on_startup=[start],
        on_shutdown=[stop],
    )
