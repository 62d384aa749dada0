"""Bulk enqueue keeps ARQ's rules (a held id is refused) and ARQ runs what it enqueued."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from arq.connections import ArqRedis

from kubearq.core.connections import create_redis
from kubearq.core.queueing import JobState, NewJob, Tally, abort_jobs, enqueue_many, job_outcomes, remove_queued
from tests.polling import until
from tests.test_runtime import running_worker


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    client = create_redis(redis_url)
    yield client
    await client.aclose()


async def test_bulk_enqueue_adds_each_new_id_once(redis: ArqRedis) -> None:
    jobs = [NewJob(f"page-{n}", "echo", {"n": n}) for n in range(1200)]
    assert len(await enqueue_many(redis, "arq:queue", jobs)) == 1200
    again = await enqueue_many(redis, "arq:queue", [*jobs[:10], NewJob("page-new", "echo", {})])
    assert again == ["page-new"]
    assert await redis.zcard("arq:queue") == 1201


async def test_an_id_whose_result_is_kept_is_refused(redis: ArqRedis) -> None:
    await redis.set("arq:result:done-tick", b"{}")
    assert await enqueue_many(redis, "arq:queue", [NewJob("done-tick", "echo", {})]) == []


async def test_arq_runs_bulk_enqueued_jobs_with_their_arguments(redis: ArqRedis, redis_url: str) -> None:
    await enqueue_many(redis, "arq:queue", [NewJob("bulk-1", "echo", {"k": "v"}, args=(1, 2))])
    async with running_worker(redis_url):
        await until(lambda: _state_is(redis, "bulk-1", JobState.SUCCEEDED), what="bulk job result")
    result = json.loads(await redis.get("arq:result:bulk-1"))
    assert result["r"] == {"args": [1, 2], "kwargs": {"k": "v"}}


async def _state_is(redis: ArqRedis, job_id: str, state: JobState) -> bool:
    return (await job_outcomes(redis, "arq:queue", [job_id]))[job_id].state == state


async def test_outcomes_tell_queued_deferred_running_failed_and_unknown(redis: ArqRedis) -> None:
    now = 1_800_000_000_000
    await enqueue_many(redis, "arq:queue", [
        NewJob("queued", "echo", {}), NewJob("later", "echo", {}, defer_until_ms=now + 60_000),
        NewJob("running", "echo", {})], now_ms=now)
    await redis.set("arq:in-progress:running", b"1")
    await redis.set("arq:result:failed", json.dumps({"s": False, "r": {"error": "ValueError: boom"}, "ft": now}))
    outcomes = await job_outcomes(redis, "arq:queue", ["queued", "later", "running", "failed", "gone"], now_ms=now)
    assert {job_id: outcome.state for job_id, outcome in outcomes.items()} == {
        "queued": JobState.QUEUED, "later": JobState.DEFERRED, "running": JobState.RUNNING,
        "failed": JobState.FAILED, "gone": JobState.UNKNOWN}
    assert outcomes["failed"].error == "ValueError: boom"


async def test_removing_queued_jobs_and_aborting(redis: ArqRedis) -> None:
    await enqueue_many(redis, "arq:queue", [NewJob(f"r-{n}", "echo", {}) for n in range(3)])
    assert await remove_queued(redis, "arq:queue", ["r-0", "r-1", "missing"]) == 2
    assert not await redis.exists("arq:job:r-0")
    await abort_jobs(redis, ["r-2"])
    assert await redis.zscore("arq:abort", "r-2") is not None


async def test_tally_counts_caps_and_remembers_ids(redis: ArqRedis) -> None:
    tally = Tally("progress:r1", "detail_total", "jobs:r1", cap=5)
    first = await enqueue_many(redis, "arq:queue", [NewJob(f"d-{n}", "echo", {}) for n in range(3)], tally=tally)
    second = await enqueue_many(redis, "arq:queue", [NewJob(f"d-{n}", "echo", {}) for n in range(10)], tally=tally)
    assert (first, second) == (["d-0", "d-1", "d-2"], ["d-3", "d-4"])
    assert await redis.hget("progress:r1", "detail_total") == b"5"  # type: ignore[misc]
    await redis.delete("arq:job:d-0")  # finished, result expired: still never enqueued twice
    tally_uncapped = Tally("progress:r1", "detail_total", "jobs:r1")
    assert await enqueue_many(redis, "arq:queue", [NewJob("d-0", "echo", {})], tally=tally_uncapped) == []
    assert await redis.scard("jobs:r1") == 5  # type: ignore[misc]


async def test_a_remembered_id_stays_refused_after_its_job_and_result_are_gone(redis: ArqRedis) -> None:
    tick = [NewJob("kubearq:tick:u1:1764000000", "echo", {})]
    assert await enqueue_many(redis, "arq:queue", tick, remember_ms=60_000) == ["kubearq:tick:u1:1764000000"]
    await redis.delete("arq:job:kubearq:tick:u1:1764000000")
    await redis.zrem("arq:queue", "kubearq:tick:u1:1764000000")
    assert await enqueue_many(redis, "arq:queue", tick, remember_ms=60_000) == []
    assert 0 < await redis.pttl("kubearq:enqueued:kubearq:tick:u1:1764000000") <= 60_000
