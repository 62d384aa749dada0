"""Starting a 10,000-page ScrapeRequest: kubearq's bulk enqueue against ARQ's own `enqueue_job` in a loop.

Both put the same 10,000 `scrape_listing` jobs (same ids, same JSON payloads, built inside the timing) on a
private redis-server; kubearq also tallies the listing total and remembers every id, as the operator does.
Target: bulk at least 5x faster.

    .venv/bin/python -m bench.bulk_enqueue [--pages 10000] [--rounds 3] [--redis-url redis://...]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

from arq.connections import ArqRedis

from kubearq.core.connections import create_redis
from kubearq.core.contract import RequestRef, ScrapeSettings, progress_key, request_jobs_key
from kubearq.core.queueing import Tally, enqueue_many
from kubearq.demo.services import RedisServer
from kubearq.operator.scrapedecisions import build_listing_jobs

TARGET_RATIO = 5.0
QUEUE = "arq:queue"
REQUEST = RequestRef(uid="0f6f5f8e-1c1e-4a53-9d0e-bench0000001", namespace="bench", name="listing-pages")


def listing_urls(pages: int) -> list[str]:
    return [f"https://events.example/listing/{n}" for n in range(pages)]


async def bulk(redis: ArqRedis, urls: list[str]) -> int:
    jobs = build_listing_jobs(REQUEST, urls, ScrapeSettings())
    tally = Tally(progress_key(REQUEST.uid), "listing_total", request_jobs_key(REQUEST.uid))
    return len(await enqueue_many(redis, QUEUE, jobs, tally=tally))


async def arq_loop(redis: ArqRedis, urls: list[str]) -> int:
    jobs = build_listing_jobs(REQUEST, urls, ScrapeSettings())
    added = 0
    for job in jobs:
        if await redis.enqueue_job(job.function, _job_id=job.job_id, _queue_name=QUEUE, page=job.kwargs["page"]):
            added += 1
    return added


async def timed(redis: ArqRedis, enqueue: Callable[[ArqRedis, list[str]], Awaitable[int]], urls: list[str]) -> float:
    await redis.flushdb()
    started = time.perf_counter()
    added = await enqueue(redis, urls)
    elapsed = time.perf_counter() - started
    queued = await redis.zcard(QUEUE)
    if added != len(urls) or queued != len(urls):
        raise RuntimeError(f"{enqueue.__name__}: {added} added, {queued} queued, {len(urls)} expected")
    return elapsed


async def measure(redis_url: str, pages: int, rounds: int) -> float:
    urls = listing_urls(pages)
    redis = create_redis(redis_url)
    try:
        bulk_times, loop_times = [], []
        for _ in range(rounds):
            bulk_times.append(await timed(redis, bulk, urls))
            loop_times.append(await timed(redis, arq_loop, urls))
        await redis.flushdb()
    finally:
        await redis.aclose()
    bulk_s, loop_s = statistics.median(bulk_times), statistics.median(loop_times)
    ratio = loop_s / bulk_s
    print(f"{pages} listing jobs, median of {rounds} rounds")
    print(f"  kubearq enqueue_many (bulk, tallied): {bulk_s:.3f}s  ({pages / bulk_s:,.0f} jobs/s)")
    print(f"  ARQ enqueue_job in a loop:            {loop_s:.3f}s  ({pages / loop_s:,.0f} jobs/s)")
    print(f"  ratio: {ratio:.1f}x (target >= {TARGET_RATIO:.0f}x: {'met' if ratio >= TARGET_RATIO else 'MISSED'})")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pages", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url", help="use this Redis (it is flushed!) instead of a private redis-server")
    options = parser.parse_args()
    if options.redis_url:
        ratio = asyncio.run(measure(options.redis_url, options.pages, options.rounds))
    else:
        with RedisServer() as server:
            ratio = asyncio.run(measure(server.url, options.pages, options.rounds))
    raise SystemExit(0 if ratio >= TARGET_RATIO else 1)


if __name__ == "__main__":
    main()
