"""Failed jobs at 100,000 kept: a page of the listing (the first, one filtered by function, one deep in the list,
one by error text, one by resource) through keyset pages on the indexes, against a naive `OFFSET` scan of the same
page; then re-driving a tenth of them, and re-driving them again (a no-op).

    .venv/bin/python -m bench.failed_jobs [--jobs 100000]

A real PostgreSQL (migrated as a worker migrates it) and a real Redis (where re-driven jobs go). Each query is
timed as the CLI and the dashboard run it, `PostgresFailedJobs.page`, the median of REPEATS after one warm-up.
Issue 16's target: < 100 ms for each page at 100,000 jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from kubearq.core.connections import create_redis
from kubearq.core.contract import Origin
from kubearq.core.failedjobs import FailedJob, FailedJobFilter, FailureReason, Selection, TryError, encode_cursor
from kubearq.core.failedjobstores import PostgresFailedJobs
from kubearq.demo.services import PostgresServer, RedisServer
from kubearq.worker.storage import Storage

TARGET_SECONDS = 0.1
REPEATS = 5
PAGE = 50
FUNCTIONS = [f"function_{n}" for n in range(10)]
ERRORS = ["TimeoutError: the try took longer than 30 s", "ConnectionError: the backend reset the connection",
          "ValueError: the report has no rows", "KeyError: 'account_id'"]
START = datetime(2026, 3, 1, tzinfo=UTC)


def failure(number: int) -> FailedJob:
    """The `number`th failure: ten functions, twenty namespaces, four errors (one in a thousand rare), a week."""
    at = START + timedelta(seconds=number * 6)
    error = "RuntimeError: a rare failure" if number % 1000 == 7 else ERRORS[number % len(ERRORS)]
    return FailedJob(
        job_id=f"job-{number:07}", function=FUNCTIONS[number % len(FUNCTIONS)], args=[number],
        kwargs={"account": f"acct-{number % 500}"}, queue="arq:queue", reason=FailureReason.FAILED, error=error,
        tries=3, try_errors=[TryError(job_try=n, error=error, at=at - timedelta(seconds=3 - n)) for n in (1, 2, 3)],
        origin=Origin(namespace=f"team-{number % 20}", kind="SyncSchedule", name=f"schedule-{number % 100}"),
        worker="worker-0", enqueued_at=at - timedelta(seconds=10), failed_at=at)


async def timed(step: Callable[[], Awaitable[object]]) -> float:
    """The median seconds of REPEATS runs, after one warm-up."""
    await step()
    seconds = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        await step()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


async def run(jobs: int) -> None:
    with PostgresServer() as postgres, RedisServer() as redis_server:
        dsn = postgres.create_database("bench_failed_jobs")
        redis = create_redis(redis_server.url)
        async with Storage(dsn, connect_timeout=30) as storage:
            await storage.migrate()
            store = PostgresFailedJobs(storage.connection, redis)
            started = time.perf_counter()
            for start in range(0, jobs, 5000):
                await store.record([failure(n) for n in range(start, min(jobs, start + 5000))])
            async with storage.connection("bench") as connection:
                await connection.execute("ANALYZE failed_jobs")
            print(f"recorded {jobs:,} failed jobs in {time.perf_counter() - started:.1f} s")

            deep = int(jobs * 0.9)  # the page after the 90,000th newest
            newest_first = jobs - 1 - deep
            cursor = encode_cursor(failure(newest_first))

            newest = failure(newest_first)
            async with storage.connection("bench") as connection:
                # The same page for OFFSET: as many rows of function_3 come before it as are at least as new.
                deep_in_function = await connection.fetchval(
                    "SELECT count(*) FROM failed_jobs WHERE function = 'function_3' "
                    "AND (failed_at, job_id) >= ($1, $2)",
                    newest.failed_at, newest.job_id)

            async def offset_scan(offset: int = deep, where: str = "", *params: object) -> None:
                async with storage.connection("bench") as connection:
                    await connection.fetch(
                        f"SELECT * FROM failed_jobs {where} ORDER BY failed_at DESC, job_id DESC "  # noqa: S608
                        f"OFFSET {offset} LIMIT {PAGE}", *params)

            cases: list[tuple[str, Callable[[], Awaitable[object]], Callable[[], Awaitable[object]] | None]] = [
                ("first page", lambda: store.page(limit=PAGE), None),
                ("filter by function", lambda: store.page(FailedJobFilter(function="function_3"), limit=PAGE), None),
                (f"page after the {deep:,}th", lambda: store.page(after=cursor, limit=PAGE), lambda: offset_scan()),
                ("by function, deep", lambda: store.page(FailedJobFilter(function="function_3"), after=cursor,
                                                         limit=PAGE),
                 lambda: offset_scan(deep_in_function, "WHERE function = $1", "function_3")),
                ("by resource", lambda: store.page(FailedJobFilter(namespace="team-7", kind="SyncSchedule",
                                                                   name="schedule-47"), limit=PAGE), None),
                ("error text, common", lambda: store.page(FailedJobFilter(error="timeout"), limit=PAGE), None),
                ("error text, rare", lambda: store.page(FailedJobFilter(error="rare failure"), limit=PAGE), None),
            ]
            print(f"| page of {PAGE} at {jobs:,} failed jobs | keyset (ms) | OFFSET scan (ms) | ratio | "
                  f"< {TARGET_SECONDS * 1000:.0f} ms |")
            print("|---|---|---|---|---|")
            for name, keyset, naive in cases:
                seconds = await timed(keyset)
                if naive is None:
                    print(f"| {name} | {seconds * 1000:.1f} | | | {'yes' if seconds < TARGET_SECONDS else 'NO'} |")
                    continue
                naive_seconds = await timed(naive)
                print(f"| {name} | {seconds * 1000:.1f} | {naive_seconds * 1000:.1f} | "
                      f"{naive_seconds / seconds:.1f}x | {'yes' if seconds < TARGET_SECONDS else 'NO'} |")

            one_function = Selection(where=FailedJobFilter(function="function_5"))
            started = time.perf_counter()
            redrives = await store.redrive(one_function)
            first = time.perf_counter() - started
            started = time.perf_counter()
            again = await store.redrive(one_function)
            second = time.perf_counter() - started
            print(f"re-drove {len(redrives.enqueued):,} jobs in {first:.2f} s "
                  f"({len(redrives.enqueued) / first:,.0f}/s); again: {len(again.enqueued)} enqueued in {second:.2f} s")
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=100_000)
    asyncio.run(run(parser.parse_args().jobs))


if __name__ == "__main__":
    main()
