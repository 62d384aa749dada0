"""The worker runtime against a real Redis: retries, deferral, drain on SIGTERM, crash recovery."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus

from kubearq.core.connections import create_redis
from kubearq.core.contract import deserialize, function_registry_key
from kubearq.core.workers import WorkerBeat, list_workers
from kubearq.demo.services import RedisServer, free_port
from kubearq.worker.main import JobSet, WorkerService, load_user_jobs
from kubearq.worker.runtime import DEAD_LETTER_PREFIX
from kubearq.worker.settings import WorkerSettings
from tests.crd_rules import REPO
from tests.kubernetes import eventually
from tests.polling import until

FAST = {"poll_delay": 0.01, "retry_backoff": 0.02, "retry_backoff_max": 0.05, "heartbeat_interval": 0.5,
        "in_progress_ttl": 2.0, "http_port": 0, "http_host": "127.0.0.1", "health_check_interval": 1.0}


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    client = create_redis(redis_url)
    yield client
    await client.aclose()


@asynccontextmanager
async def running_worker(redis_url: str, **overrides: object) -> AsyncIterator[WorkerService]:
    """A worker serving tests.worker_jobs in this process; leaving the block drains it like SIGTERM."""
    settings = WorkerSettings.model_validate({"redis_url": redis_url, **FAST, **overrides})
    service = WorkerService(settings, load_user_jobs("tests.worker_jobs:WorkerSettings"))
    await service.start()
    try:
        yield service
    finally:
        try:
            async with asyncio.timeout(30):
                await service.stop()
        except TimeoutError:
            raise AssertionError(f"the worker did not stop within 30s:\n{await_chains()}") from None


def await_chains() -> str:
    """Where every task waits (a hung shutdown's diagnosis)."""
    lines = []
    for task in asyncio.all_tasks():
        lines.append(f"{task.get_name()}:")
        awaited: Any = task.get_coro()
        while awaited is not None:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
            if frame is not None:
                lines.append(f"    {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
    return "\n".join(lines)


async def _true(value: bool) -> bool:
    return value


async def events(redis: ArqRedis) -> list[dict[str, Any]]:
    raw_events: list[bytes] = await redis.lrange("test:events", 0, -1)  # type: ignore[misc]
    return [json.loads(raw) for raw in raw_events]


async def test_jobs_and_results_are_json_not_pickle(redis: ArqRedis, redis_url: str) -> None:
    job = await redis.enqueue_job("echo", 1, "two", three=3, _job_id="json-1")
    assert job is not None
    assert deserialize(await redis.get("arq:job:json-1"))["f"] == "echo"
    async with running_worker(redis_url):
        assert await job.result(timeout=10) == {"args": [1, "two"], "kwargs": {"three": 3}}
    stored = json.loads(await redis.get("arq:result:json-1"))
    assert (stored["s"], stored["r"]) == (True, {"args": [1, "two"], "kwargs": {"three": 3}})


async def test_undecodable_job_fails_with_a_clear_error_and_is_kept(redis: ArqRedis, redis_url: str) -> None:
    pickled = b"\x80\x04\x95\x1a\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94."
    await redis.set("arq:job:evil", pickled)
    await redis.zadd("arq:queue", {"evil": 1})
    async with running_worker(redis_url):
        await until(lambda: _exists(redis, "arq:result:evil"), what="failure result")
    result = json.loads(await redis.get("arq:result:evil"))
    assert result["s"] is False
    assert result["r"]["error"] == "DeserializationError: unable to deserialize job"
    assert await redis.get(DEAD_LETTER_PREFIX + "evil") == pickled
    assert await redis.zscore("arq:queue", "evil") is None


async def _exists(redis: ArqRedis, key: str) -> bool:
    return bool(await redis.exists(key))


async def test_any_exception_retries_with_backoff_then_keeps_the_last_error(redis: ArqRedis, redis_url: str) -> None:
    job = await redis.enqueue_job("always_fails", _job_id="fails")
    assert job is not None
    async with running_worker(redis_url, max_tries=3):
        info = await _result_info(job)
    assert (info.success, info.job_try) == (False, 3)
    assert info.result == {"error": "ValueError: boom", "type": "ValueError"}
    assert [event["try"] for event in await events(redis)] == [1, 2, 3]


async def _result_info(job: Job, within: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    async with asyncio.timeout(within + 5):
        while (info := await job.result_info()) is None:
            assert asyncio.get_running_loop().time() < deadline, "no result"
            await asyncio.sleep(0.02)
    return info


async def test_a_timed_out_try_is_retried_with_a_longer_timeout(redis: ArqRedis, redis_url: str) -> None:
    job = await redis.enqueue_job("slow_first_try", 5.0, _job_id="slow")
    assert job is not None
    async with running_worker(redis_url, job_timeout=0.3, max_tries=2):
        info = await _result_info(job)
    assert (info.success, info.result, info.job_try) == (True, "done", 2)


async def test_deferral_spends_no_try_and_holds_no_slot(redis: ArqRedis, redis_url: str) -> None:
    job = await redis.enqueue_job("deferred_three_times", _job_id="deferred")
    assert job is not None
    async with running_worker(redis_url, max_tries=1, max_jobs=1) as service:
        info = await _result_info(job)
    assert (info.success, info.result) == (True, "done")
    assert [event["try"] for event in await events(redis)] == [1, 1, 1, 1]
    assert service.metrics.jobs_deferred.labels("deferred_three_times")._value.get() == 3


async def test_a_finish_script_runs_once_with_the_completion_not_on_retries_or_deferrals(
        redis: ArqRedis, redis_url: str) -> None:
    job = await redis.enqueue_job("counted_on_finish", 2, 2, _job_id="counted")
    assert job is not None
    async with running_worker(redis_url, max_tries=5, keep_result=60):
        info = await _result_info(job)
    assert (info.success, info.result, info.job_try) == (True, "done", 3)  # deferrals spend no try
    assert len(await events(redis)) == 5
    assert await redis.get("test:finished") == b"1"
    # The rest of the completion is ARQ's, as its finish_job does it.
    assert 0 < await redis.pttl("arq:result:counted") <= 60_000
    for key in ("arq:job:counted", "arq:retry:counted", "arq:in-progress:counted"):
        assert not await redis.exists(key), key
    assert await redis.zscore("arq:queue", "counted") is None


async def test_a_finish_script_runs_when_the_last_try_fails(redis: ArqRedis, redis_url: str) -> None:
    job = await redis.enqueue_job("counted_on_finish", 5, 0, _job_id="counted-fails")
    assert job is not None
    async with running_worker(redis_url, max_tries=2):
        info = await _result_info(job)
    assert (info.success, info.job_try) == (False, 2)
    assert await redis.get("test:finished") == b"1"


async def test_sigterm_lets_a_running_job_finish_within_the_grace_period(redis: ArqRedis, redis_url: str) -> None:
    job = await redis.enqueue_job("sleep_then_record", 0.5, _job_id="short")
    assert job is not None
    async with running_worker(redis_url, shutdown_grace=10):
        await until(lambda: _has_event(redis, "started"), what="job start")
    # Leaving the block drained the worker: the job finished instead of being cut off.
    assert [event["event"] for event in await events(redis)] == ["started", "finished"]
    assert (await _result_info(job)).result == "slept"


async def _has_event(redis: ArqRedis, name: str, count: int = 1) -> bool:
    return sum(event["event"] == name for event in await events(redis)) >= count  # type: ignore[no-any-return]


async def test_sigterm_puts_back_unfinished_jobs_at_once_without_spending_a_try(
    redis: ArqRedis, redis_url: str
) -> None:
    job = await redis.enqueue_job("sleep_then_record", 60, _job_id="long")
    assert job is not None
    async with running_worker(redis_url, shutdown_grace=0.2) as service:
        await until(lambda: _has_event(redis, "started"), what="job start")
    assert await job.status() == JobStatus.queued
    assert not await redis.exists("arq:in-progress:long")
    assert int(await redis.get("arq:retry:long") or 0) == 0
    assert service.metrics.jobs_requeued.labels("sleep_then_record")._value.get() == 1
    await redis.delete("test:events")
    async with running_worker(redis_url, shutdown_grace=0.2):  # the next worker runs it as its first try, at once
        await until(lambda: _has_event(redis, "started"), within=2, what="restart of the job")
    assert next(event["try"] for event in await events(redis)) == 1


async def test_workers_publish_the_functions_they_serve(redis: ArqRedis, redis_url: str) -> None:
    async with running_worker(redis_url, queue="arq:custom"):
        key = function_registry_key("arq:custom")
        await until(lambda: _exists(redis, key), what="function registry")
        names: list[bytes] = await redis.hkeys(key)  # type: ignore[misc]
        served = {name.decode() for name in names}
    assert {"noop", "echo", "always_fails"} <= served


async def test_metrics_and_probes_are_served(redis: ArqRedis, redis_url: str) -> None:
    job = await redis.enqueue_job("noop", _job_id="metered")
    assert job is not None
    async with running_worker(redis_url) as service:
        await job.result(timeout=10)
        port = service.probes.port
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            metrics = (await client.get("/metrics")).text
            ready = await client.get("/readyz")
            alive = await client.get("/healthz")
    assert 'kubearq_worker_jobs_succeeded_total{function="noop"} 1.0' in metrics
    assert (ready.status_code, alive.status_code) == (200, 200)


async def test_a_missed_heartbeat_is_not_a_warning_while_the_worker_holds_no_job(
        redis_private: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    async with running_worker(redis_private.url) as service:
        redis_private.kill()
        await until(lambda: _true(service.metrics.errors.labels("heartbeat")._value.get() >= 2), within=15,
                    what="two failed heartbeats")
        redis_private.restart()
        await until(lambda: _true(service.worker.redis_available), within=15, what="Redis back")
    assert [record.getMessage() for record in caplog.records if "heartbeat failed" in record.getMessage()
            and record.levelno >= logging.WARNING] == []


async def test_redis_restart_mid_run_loses_no_job(redis_private: RedisServer) -> None:
    redis_private.restart(aof=True)
    client = create_redis(redis_private.url)
    try:
        async with running_worker(redis_private.url) as service:
            first = await client.enqueue_job("echo", "before", _job_id="before")
            assert first is not None
            assert await first.result(timeout=10) == {"args": ["before"], "kwargs": {}}
            redis_private.kill()
            await until(lambda: _true(not service.worker.redis_available), what="outage noticed")
            redis_private.restart(aof=True)
            second = await client.enqueue_job("echo", "after", _job_id="after")
            assert second is not None
            assert await second.result(timeout=15) == {"args": ["after"], "kwargs": {}}
        assert service.metrics.errors.labels("poll")._value.get() >= 1
    finally:
        await client.aclose()


@contextmanager
def worker_process(redis_url: str, log: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """`kubearq worker` as a real process (its log in a file: an unread pipe would block it when full),
    killed on leaving the block if the test did not end it."""
    env = {**os.environ, "REDIS_URL": redis_url, "HTTP_PORT": str(free_port()), "HTTP_HOST": "127.0.0.1",
           "HEARTBEAT_INTERVAL": "1", "IN_PROGRESS_TTL": "3", "POLL_DELAY": "0.01", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "kubearq.cli", "worker", "--settings", "tests.worker_jobs:WorkerSettings", *extra]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=env, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


async def test_a_killed_workers_job_runs_again_within_the_in_progress_ttl(
    redis: ArqRedis, redis_url: str, tmp_path: Path
) -> None:
    job = await redis.enqueue_job("sleep_then_record", 2.0, _job_id="orphan")
    assert job is not None
    with worker_process(redis_url, tmp_path / "worker.log") as doomed:
        await until(lambda: _has_event(redis, "started"), within=30, what="job start in the subprocess")
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=10)
    killed_at = asyncio.get_running_loop().time()
    async with running_worker(redis_url):
        await until(lambda: _has_event(redis, "started", count=2), within=10, what="re-run of the orphan")
        rerun_after = asyncio.get_running_loop().time() - killed_at
        assert (await _result_info(job)).result == "slept"
    assert rerun_after <= 3 + 2  # the in-progress mark's lifetime, plus polling slack


async def test_sigterm_to_the_worker_process_drains_and_exits_cleanly(
    redis: ArqRedis, redis_url: str, tmp_path: Path
) -> None:
    job = await redis.enqueue_job("sleep_then_record", 0.5, _job_id="graceful")
    assert job is not None
    with worker_process(redis_url, tmp_path / "worker.log") as process:
        await until(lambda: _has_event(redis, "started"), within=30, what="job start in the subprocess")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, (tmp_path / "worker.log").read_text()
    assert (await _result_info(job)).result == "slept"


def test_user_settings_must_name_functions() -> None:
    with pytest.raises(ValueError, match=r"--settings tests.worker_jobs:Missing: tests.worker_jobs has no attribute"):
        load_user_jobs("tests.worker_jobs:Missing")
    with pytest.raises(ValueError, match=r"cannot import 'no_such_module'"):
        load_user_jobs("no_such_module:WorkerSettings")


def test_function_name_clash_is_refused() -> None:
    jobs = load_user_jobs("tests.worker_jobs:WorkerSettings")
    names = ", ".join(sorted(function.name for function in jobs.functions))
    with pytest.raises(ValueError, match=f"^{re.escape(f'function names served twice: {names}; rename yours')}$"):
        jobs.merge(JobSet(functions=jobs.functions))


async def test_two_workers_claiming_from_one_queue_run_each_job_exactly_once(redis: ArqRedis, redis_url: str) -> None:
    """Jobs are claimed in batches by a script (not ARQ's WATCH/MULTI per job): the rule must still hold."""
    for number in range(300):
        await redis.enqueue_job("echo", number, _job_id=f"once-{number}")
    async with running_worker(redis_url, max_jobs=8) as first, running_worker(redis_url, max_jobs=8) as second:
        await until(lambda: _finished_count(redis, 300), within=30, what="300 jobs finished")
    ran = [event["job_id"] for event in await events(redis) if event["event"] == "ran"]
    assert sorted(ran) == sorted(f"once-{number}" for number in range(300))  # each once, none lost
    started = [service.metrics.jobs_started.labels("echo")._value.get() for service in (first, second)]
    assert sum(started) == 300
    assert min(started) > 0  # both took part


async def _finished_count(redis: ArqRedis, count: int) -> bool:
    return len([key async for key in redis.scan_iter("arq:result:once-*")]) >= count


async def test_a_claim_skips_jobs_in_progress_elsewhere_not_yet_due_and_beyond_free_slots(
        redis: ArqRedis, redis_url: str) -> None:
    async with running_worker(redis_url, max_jobs=2) as service:
        worker = service.worker
        worker.allow_pick_jobs = False  # this test starts jobs by hand
        await until(lambda: _true(not worker.tasks), what="an idle worker")
        now_ms = int(time.time() * 1000)
        await redis.zadd("arq:queue", {"held": now_ms - 10, "later": now_ms + 60_000, "a": now_ms - 5,
                                       "b": now_ms - 4, "c": now_ms - 3})
        for job_id in ("held", "later", "a", "b", "c"):
            await redis.set(f"arq:job:{job_id}", b'{"t": 1, "f": "noop", "a": [], "k": {}, "et": 0}')
        await redis.set("arq:in-progress:held", b"1", px=60_000)  # another worker runs it
        await worker.start_jobs([b"held", b"later", b"a", b"b", b"c"])
        assert sorted(worker.tasks) == ["a", "b"]  # two free slots: the first two it may take
        assert await redis.exists("arq:in-progress:a", "arq:in-progress:b") == 2
        assert not await redis.exists("arq:in-progress:c", "arq:in-progress:later")
        await asyncio.gather(*worker.tasks.values())


async def test_each_heartbeat_publishes_the_jobs_finished_and_the_rate_since_the_one_before(
        redis: ArqRedis, redis_url: str) -> None:
    # What the dashboard's Done / min shows: the jobs a worker finished over its last heartbeat interval.
    for number in range(12):
        await redis.enqueue_job("noop", _job_id=f"rate-{number}")
    seen: list[WorkerBeat] = []

    async def beat_with(finished: int, *, rate: bool) -> WorkerBeat | None:
        beats = (await list_workers(redis)).beats
        seen.extend(beats)
        return next((beat for beat in beats if beat.finished == finished and (beat.per_minute > 0) == rate), None)

    async with running_worker(redis_url):  # a heartbeat every 0.5 s
        first = await eventually(lambda: beat_with(12, rate=True))  # the heartbeat counting the 12 jobs, and a rate
        idle = await eventually(lambda: beat_with(12, rate=False))  # one after them, idle
    assert first is not None
    assert idle is not None
    # the first heartbeat to count all 12 finished at least the last of them within its 0.5 s interval
    assert first.per_minute >= 60 / 0.5
    assert idle.per_minute == 0.0
    assert all(beat.finished <= 12 for beat in seen)
