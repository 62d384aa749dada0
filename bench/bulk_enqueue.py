"""Starting a 10,000-page ScrapeRequest: kubearq's bulk enqueue against ARQ's own `enqueue_job` in a loop.

Both put the same 10,000 `scrape_listing` jobs (same ids, same JSON payloads, built inside the timing) on a
private redis-server; kubearq also tallies the listing total and remembers every id, as the operator does.
Target: bulk at least 5x faster than the loop. Also shown: ARQ's `enqueue_job` for all jobs at once with
`asyncio.gather`, and the ceiling, `redis-benchmark` sending bare ZADDs pipelined (Debian's redis-tools).

    .venv/bin/python -m bench.bulk_enqueue [--pages 10000] [--rounds 3] [--redis-url redis://...]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import shutil
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from arq.connections import ArqRedis

from kubearq.core.connections import create_redis
from kubearq.core.contract import RequestRef, ScrapeSettings, progress_key, request_jobs_key
from kubearq.core.queueing import CHUNK, Tally, enqueue_many
from kubearq.demo.services import RedisServer
from kubearq.operator.scrapedecisions import build_listing_jobs

TARGET_RATIO = 5.0
QUEUE = "arq:queue"
CEILING_KEY = "bench:zadd-ceiling"
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


async def arq_gathered(redis: ArqRedis, urls: list[str]) -> int:
    """ARQ's `enqueue_job` for every job at once (`asyncio.gather`), as an application in a hurry would."""
    jobs = build_listing_jobs(REQUEST, urls, ScrapeSettings())
    added = await asyncio.gather(*(redis.enqueue_job(job.function, _job_id=job.job_id, _queue_name=QUEUE,
                                                     page=job.kwargs["page"]) for job in jobs))
    return sum(1 for job in added if job is not None)


async def timed(redis: ArqRedis, enqueue: Callable[[ArqRedis, list[str]], Awaitable[int]], urls: list[str]) -> float:
    await redis.flushdb()
    started = time.perf_counter()
    added = await enqueue(redis, urls)
    elapsed = time.perf_counter() - started
    queued = await redis.zcard(QUEUE)
    if added != len(urls) or queued != len(urls):
        raise RuntimeError(f"{enqueue.__name__}: {added} added, {queued} queued, {len(urls)} expected")
    return elapsed


def zadd_ceiling(redis_url: str, requests: int) -> float | None:
    """ZADDs/s `redis-benchmark` gets from one client in pipelines of CHUNK (None when it is not installed).

    Bare ZADDs of random members, no payload and no duplicate check: an upper bound for any enqueue.
    """
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return None
    parts = urlsplit(redis_url)
    output = subprocess.run(
        [binary, "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379), "-c", "1", "-P", str(CHUNK),
         "-n", str(requests), "-r", "1000000000", "--csv", "ZADD", CEILING_KEY, "__rand_int__",
         "member:__rand_int__"], capture_output=True, text=True, timeout=120, check=True).stdout
    rows = list(csv.DictReader(io.StringIO(output)))
    if not rows:
        raise RuntimeError(f"redis-benchmark printed no result: {output!r}")
    return float(rows[-1]["rps"])


@dataclass(frozen=True)
class BulkEnqueue:
    """Medians of the rounds, in seconds for `pages` jobs; `zadd_ceiling` in ZADDs/s (None: no redis-benchmark)."""

    pages: int
    rounds: int
    bulk_s: float
    loop_s: float
    gathered_s: float
    zadd_ceiling: float | None

    @property
    def ratio(self) -> float:
        return self.loop_s / self.bulk_s


async def measure(redis_url: str, pages: int, rounds: int) -> BulkEnqueue:
    urls = listing_urls(pages)
    redis = create_redis(redis_url)
    try:
        bulk_times, loop_times, gathered_times = [], [], []
        for _ in range(rounds):
            bulk_times.append(await timed(redis, bulk, urls))
            loop_times.append(await timed(redis, arq_loop, urls))
            gathered_times.append(await timed(redis, arq_gathered, urls))
        await redis.flushdb()
        ceiling = zadd_ceiling(redis_url, max(10 * pages, 10_000))
        await redis.flushdb()
    finally:
        await redis.aclose()
    return BulkEnqueue(pages, rounds, statistics.median(bulk_times), statistics.median(loop_times),
                       statistics.median(gathered_times), ceiling)


def show(result: BulkEnqueue) -> None:
    pages, bulk_s, ratio = result.pages, result.bulk_s, result.ratio
    print(f"{pages} listing jobs, median of {result.rounds} rounds")
    print(f"  kubearq enqueue_many (bulk, tallied): {bulk_s:.3f}s  ({pages / bulk_s:,.0f} jobs/s)")
    print(f"  ARQ enqueue_job in a loop:            {result.loop_s:.3f}s  ({pages / result.loop_s:,.0f} jobs/s)")
    print(f"  ARQ enqueue_job, asyncio.gather:      {result.gathered_s:.3f}s  "
          f"({pages / result.gathered_s:,.0f} jobs/s)")
    if result.zadd_ceiling is None:
        print("  ceiling: redis-benchmark is not installed (Debian: apt-get install redis-tools)")
    else:
        print(f"  ceiling, redis-benchmark ZADD pipelined by {CHUNK}: {result.zadd_ceiling:,.0f} ZADDs/s "
              f"(kubearq: {pages / bulk_s / result.zadd_ceiling:.2f} of it)")
    print(f"  ratio: {ratio:.1f}x (target >= {TARGET_RATIO:.0f}x: {'met' if ratio >= TARGET_RATIO else 'MISSED'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pages", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url", help="use this Redis (it is flushed!) instead of a private redis-server")
    options = parser.parse_args()
    if options.redis_url:
        result = asyncio.run(measure(options.redis_url, options.pages, options.rounds))
    else:
        with RedisServer() as server:
            result = asyncio.run(measure(server.url, options.pages, options.rounds))
    show(result)
    raise SystemExit(0 if result.ratio >= TARGET_RATIO else 1)


if __name__ == "__main__":
    main()
