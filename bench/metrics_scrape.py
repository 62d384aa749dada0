"""`/metrics` with 100,000 queued jobs over 10 queues: what one refresh of the queue gauges costs, and one scrape.

    .venv/bin/python -m bench.metrics_scrape [--jobs 100000] [--queues 10] [--redis-url redis://...]

A real redis-server is filled with ARQ-shaped jobs (`arq:job:<id>` payloads and the queue's sorted set, as
`enqueue_many` writes them) in the three states the operator tells apart: running (the oldest, at the head, each
with an `arq:in-progress:<id>` mark), ready (due, unmarked) and deferred (a later score). The operator's own
`QueueStatsRefresher` refreshes the gauges of every queue once (what it does every QUEUE_STATS_INTERVAL), and its
`ProbeServer` answers one GET /metrics. Redis commands are counted with `INFO commandstats` before and after a
refresh: those the operator sends, and those Redis runs for it (inside the stats script). The same at a tenth of
the jobs shows whether the cost follows the jobs or the queues. Issue 19's target: < 200 ms, O(queues) commands.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass

import aiohttp
from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from kubearq.core.connections import create_redis
from kubearq.core.observability import ProbeServer
from kubearq.core.queueing import NewJob, enqueue_many
from kubearq.demo.services import RedisServer
from kubearq.operator.metrics import OperatorMetrics, QueueStatsRefresher
from kubearq.operator.queuestats import label_safe

TARGET_SECONDS = 0.2
RUNNING_PER_QUEUE = 64  # e.g. 4 worker pods x 16 slots
DEFERRED_SHARE = 0.2
REPEATS = 5
# What the counting itself costs: the INFO calls, and redis-py's connection health checks.
NOT_COUNTED = frozenset({"info", "ping"})
SENT = frozenset({"evalsha", "eval", "script|load"})


def queue_names(queues: int) -> list[str]:
    return [f"arq:queue:bench-{number}" for number in range(queues)]


@dataclass(frozen=True)
class QueueFill:
    """How one queue was filled."""

    running: int
    ready: int
    deferred: int


async def fill(redis: Redis, queues: list[str], jobs: int) -> dict[str, QueueFill]:
    """`jobs` spread evenly over `queues`: running at the head, then ready, then deferred jobs (Redis is flushed)."""
    await redis.flushall()
    now_ms = int(time.time() * 1000)
    per_queue = jobs // len(queues)
    deferred = int(per_queue * DEFERRED_SHARE)
    running = min(RUNNING_PER_QUEUE, per_queue - deferred)
    filled = {}
    for queue in queues:
        due = per_queue - deferred
        # Due jobs scored in the past in enqueue order (the oldest first, where workers take them), deferred ones
        # up to an hour ahead (retry backoff, rate-limit waits).
        batch = [NewJob(f"{queue}:{number}", "scrape_detail", {"page": {"url": f"https://events.example/{number}"}},
                        defer_until_ms=now_ms - 60_000 - (due - number) * 10 if number < due
                        else now_ms + 60_000 + number * 10)
                 for number in range(per_queue)]
        added = await enqueue_many(redis, queue, batch, now_ms=now_ms)
        if len(added) != per_queue:
            raise RuntimeError(f"{queue}: {len(added)} of {per_queue} jobs enqueued")
        async with redis.pipeline(transaction=False) as pipe:
            for number in range(running):
                pipe.set(in_progress_key_prefix + f"{queue}:{number}", b"1", px=3_600_000)
            await pipe.execute()
        filled[queue] = QueueFill(running=running, ready=due - running, deferred=deferred)
    return filled


async def command_counts(redis: Redis) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def _spent(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    spent = {name: calls - before.get(name, 0) for name, calls in after.items() if name not in NOT_COUNTED}
    return {name: calls for name, calls in sorted(spent.items()) if calls}


@dataclass(frozen=True)
class Commands:
    """Redis commands one refresh cost, by name (INFO commandstats counts those scripts run, too)."""

    by_name: dict[str, int]

    @property
    def sent(self) -> int:
        """What the operator sent: the stats script's EVALSHA per queue (and SCRIPT LOAD the first time)."""
        return sum(calls for name, calls in self.by_name.items() if name in SENT)

    @property
    def executed(self) -> int:
        """Everything Redis ran for the refresh, the script's own calls included."""
        return sum(self.by_name.values())


@dataclass(frozen=True)
class Scrape:
    jobs: int
    queues: int
    refresh_s: list[float]  # the first one loads the stats script
    get_s: list[float]
    body_bytes: int
    commands: Commands  # of the last refresh (the script already loaded)

    @property
    def refresh_median_s(self) -> float:
        return statistics.median(self.refresh_s[1:] or self.refresh_s)

    @property
    def get_median_s(self) -> float:
        return statistics.median(self.get_s)


def _check(metrics: OperatorMetrics, filled: dict[str, QueueFill]) -> None:
    """The gauges must say what was put in Redis, or the timing measured the wrong thing."""
    for queue, expected in filled.items():
        labels = {"queue": queue, "queue_label": label_safe(queue)}
        published = tuple(metrics.registry.get_sample_value(f"kubearq_queue_{state}_jobs", labels)
                          for state in ("running", "ready", "deferred"))
        if published != (expected.running, expected.ready, expected.deferred):
            raise RuntimeError(f"{queue}: gauges say running/ready/deferred {published}, Redis holds {expected}")


async def measure(redis_url: str, jobs: int, queues: int = 10) -> Scrape:
    """Fill Redis at `redis_url` (flushed!) and time the operator's refreshes and scrapes of its gauges."""
    names = queue_names(queues)
    redis = create_redis(redis_url)  # as the operator connects
    counting = Redis.from_url(redis_url)
    metrics = OperatorMetrics()
    refresher = QueueStatsRefresher(redis, metrics, queues=lambda: names)
    probes = ProbeServer(metrics.registry)
    try:
        filled = await fill(counting, names, jobs)
        await counting.script_flush()  # the first refresh loads the stats script, as a new operator's does
        port = await probes.start("127.0.0.1", 0)
        refresh_s, get_s = [], []
        body = b""
        commands = Commands({})
        async with aiohttp.ClientSession() as http:
            for _ in range(REPEATS):
                before = await command_counts(counting)
                started = time.perf_counter()
                await refresher.refresh()
                refresh_s.append(time.perf_counter() - started)
                commands = Commands(_spent(before, await command_counts(counting)))
                started = time.perf_counter()
                async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                    response.raise_for_status()
                    body = await response.read()
                get_s.append(time.perf_counter() - started)
        _check(metrics, filled)
        await counting.flushall()
    finally:
        await probes.stop()
        await redis.aclose()
        await counting.aclose()
    return Scrape(jobs, queues, refresh_s, get_s, len(body), commands)


def show(result: Scrape) -> None:
    print(f"{result.jobs:,} jobs over {result.queues} queues ({RUNNING_PER_QUEUE} running per queue, "
          f"{DEFERRED_SHARE:.0%} deferred), median of {REPEATS}:")
    verdict = "met" if result.get_median_s < TARGET_SECONDS else "MISSED"
    print(f"  refresh of the queue gauges: {result.refresh_median_s * 1000:.1f} ms (first, loading the script: "
          f"{result.refresh_s[0] * 1000:.1f} ms); GET /metrics: {result.get_median_s * 1000:.2f} ms, "
          f"{result.body_bytes:,} bytes")
    print(f"  GET /metrics < {TARGET_SECONDS * 1000:.0f} ms: {verdict}")
    print(f"  Redis commands per refresh: {result.commands.sent} sent, {result.commands.executed} run by Redis "
          f"({', '.join(f'{name} {calls}' for name, calls in result.commands.by_name.items())})")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--queues", type=int, default=10)
    parser.add_argument("--redis-url", help="use this Redis (it is flushed!) instead of a private redis-server")
    options = parser.parse_args()
    if options.redis_url:
        results = [await measure(options.redis_url, jobs, options.queues) for jobs in (options.jobs // 10,
                                                                                          options.jobs)]
    else:
        with RedisServer() as server:
            results = [await measure(server.url, jobs, options.queues) for jobs in (options.jobs // 10, options.jobs)]
    for result in results:
        show(result)


if __name__ == "__main__":
    asyncio.run(main())
