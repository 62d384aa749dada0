"""Scrape pages/s: kubearq's pipeline against Scrapy crawling the same local site at the same concurrency.

    .venv/bin/pip install -e '.[bench]'   # Scrapy is a benchmark-only dependency
    .venv/bin/python -m bench.scrape_vs_scrapy [--listings 10] [--details 50] [--concurrency 16]

A local site (a process of its own, so neither scraper shares its GIL) serves listing pages linking to
detail pages with a schema.org Event each. kubearq: one worker process-worth of jobs (`WorkerService` with the built-in
jobs, max_jobs = concurrency, rate limit out of the way) into a private PostgreSQL and Redis. Scrapy: a
spider following the same links and parsing the same JSON-LD, CONCURRENT_REQUESTS = concurrency, in a
subprocess. Prints pages/s for both and the ratio (issue target: kubearq >= 1x Scrapy). kubearq does more
per page (safety checks, robots.txt, a shared rate limit, retries, one PostgreSQL upsert per page); Scrapy
keeps items in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import multiprocessing
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.events_site import serve_site

from kubearq.core.connections import create_redis
from kubearq.core.contract import (
    SCRAPE_LISTING,
    FetchPolicy,
    PageJob,
    RateLimit,
    RequestRef,
    RetryPolicy,
    ScrapeSettings,
    job_id_for_page,
    progress_key,
    request_jobs_key,
)
from kubearq.core.queueing import NewJob, Tally, enqueue_many
from kubearq.demo.services import PostgresServer, RedisServer, free_port
from kubearq.worker.builtins import builtin_jobs
from kubearq.worker.main import WorkerService
from kubearq.worker.scrape.jobs import NetworkHooks
from kubearq.worker.settings import WorkerSettings


async def run_kubearq(site: str, port: int, listings: int, concurrency: int, redis_url: str, dsn: str) -> float:
    settings = WorkerSettings(redis_url=redis_url, database_url=dsn, max_jobs=concurrency, http_port=0,
                              http_host="127.0.0.1", log_level="WARNING")
    # The site is on loopback, which kubearq refuses: allow exactly its address and port (the tests' hook).
    hooks = NetworkHooks(extra_allowed=frozenset({(ip_address("127.0.0.1"), port)}))
    service = WorkerService(settings, builtin_jobs(settings, hooks=hooks))
    redis = create_redis(redis_url)
    await redis.flushall()
    scrape = ScrapeSettings(rate_limit=RateLimit(requests_per_minute=100_000, burst=10_000),
                            retry=RetryPolicy(max_tries=2), fetch=FetchPolicy())
    request = RequestRef(uid="00000000-0000-4000-8000-000000000001", namespace="bench", name="bench")
    urls = [f"{site}/list/{page}" for page in range(listings)]
    jobs = [NewJob(job_id_for_page(request.uid, url), SCRAPE_LISTING,
                   {"page": PageJob(request=request, url=url, settings=scrape).model_dump(mode="json", by_alias=True)})
            for url in urls]
    await service.start()
    while "kubearq_scrape" not in service.worker.ctx:  # migrations done
        await asyncio.sleep(0.05)
    started = time.perf_counter()
    await enqueue_many(redis, "arq:queue", jobs,
                       tally=Tally(progress_key(request.uid), "listing_total", request_jobs_key(request.uid)))
    while True:
        raw: dict[bytes, bytes] = await redis.hgetall(progress_key(request.uid))  # type: ignore[misc]
        counts = {key.decode(): int(value) for key, value in raw.items()}
        total = counts.get("listing_total", 0) + counts.get("detail_total", 0)
        finished = sum(counts.get(f"{kind}_{state}", 0)
                       for kind in ("listing", "detail") for state in ("done", "failed"))
        if total and finished == total and counts.get("listing_done", 0) == listings:
            break
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - started
    await service.stop()
    await redis.aclose()
    return total / elapsed


SPIDER = textwrap.dedent('''
    import json, sys, time
    import scrapy
    from scrapy.crawler import CrawlerProcess

    site, listings, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    class Events(scrapy.Spider):
        name = "events"
        start_urls = [f"{site}/list/{page}" for page in range(listings)]
        def parse(self, response):
            for href in response.css("a.event::attr(href)").getall():
                yield response.follow(href, self.parse_event)
        def parse_event(self, response):
            for block in response.css('script[type="application/ld+json"]::text').getall():
                yield json.loads(block)

    process = CrawlerProcess(settings={
        "CONCURRENT_REQUESTS": concurrency, "CONCURRENT_REQUESTS_PER_DOMAIN": concurrency,
        "ROBOTSTXT_OBEY": True, "LOG_ENABLED": False, "TELNETCONSOLE_ENABLED": False,
        "DOWNLOAD_DELAY": 0, "AUTOTHROTTLE_ENABLED": False})
    crawler = process.create_crawler(Events)
    started = time.perf_counter()
    process.crawl(crawler)
    process.start()
    elapsed = time.perf_counter() - started
    pages = crawler.stats.get_value("response_received_count", 0) - 1  # robots.txt is not a page
    print(json.dumps({"pages": pages, "seconds": elapsed}))
''')


def run_scrapy(site: str, listings: int, concurrency: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(SPIDER)
    output = subprocess.run([sys.executable, script.name, site, str(listings), str(concurrency)],
                            capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(output.stdout.strip().splitlines()[-1])
    return float(result["pages"]) / float(result["seconds"])


async def wait_for_port(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise RuntimeError(f"the site did not come up on port {port}")


def scrapy_installed() -> bool:
    return importlib.util.find_spec("scrapy") is not None


@dataclass(frozen=True)
class ScrapeRun:
    """Pages/s of both scrapers on the same site; `scrapy` is None when Scrapy is not installed."""

    listings: int
    details: int
    concurrency: int
    kubearq: float
    scrapy: float | None

    @property
    def pages(self) -> int:
        return self.listings * (1 + self.details)


async def measure(listings: int, details: int, concurrency: int, redis_url: str, dsn: str) -> ScrapeRun:
    """Serve the site, run kubearq on it (Redis at `redis_url` is flushed; `dsn` an empty database), then Scrapy."""
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(target=serve_site, args=(port, listings, details),
                                                          daemon=True)
    server.start()
    site = f"http://127.0.0.1:{port}"
    try:
        await wait_for_port(port)
        ours = await run_kubearq(site, port, listings, concurrency, redis_url, dsn)
        theirs = await asyncio.to_thread(run_scrapy, site, listings, concurrency) if scrapy_installed() else None
    finally:
        server.kill()
        server.join()
    return ScrapeRun(listings, details, concurrency, ours, theirs)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listings", type=int, default=10)
    parser.add_argument("--details", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with RedisServer() as redis_server, PostgresServer() as postgres:
        result = await measure(args.listings, args.details, args.concurrency, redis_server.url,
                               postgres.create_database("bench"))
    print(f"site: {args.listings} listing + {args.listings * args.details} detail pages = {result.pages}, "
          f"concurrency {args.concurrency}")
    if result.scrapy is None:
        print(f"kubearq {result.kubearq:7.1f} pages/s   scrapy: not installed (pip install -e '.[bench]')")
    else:
        print(f"kubearq {result.kubearq:7.1f} pages/s   scrapy {result.scrapy:7.1f} pages/s   "
              f"ratio {result.kubearq / result.scrapy:.2f} (target >= 1)")


if __name__ == "__main__":
    asyncio.run(main())
