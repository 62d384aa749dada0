"""Enqueueing from application code: the documented client and `kubearq enqueue` put jobs a real worker runs;
a job pickled by a plain ARQ client gets one WARNING line naming the fix, is counted, and is kept."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator

import pytest
import redis.exceptions
from arq import create_pool as arq_create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.jobs import JobStatus

from kubearq.client import create_pool
from kubearq.demo.services import free_port
from kubearq.worker.runtime import DEAD_LETTER_PREFIX
from tests.crd_rules import REPO
from tests.polling import until
from tests.test_runtime import running_worker

PICKLED_HINT = ("it looks like a pickled ARQ job (a plain arq.create_pool pickles); kubearq workers take JSON jobs "
                "only, never pickle: enqueue with kubearq.client.create_pool (ARQ's ArqRedis, speaking kubearq's "
                "JSON)")


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[ArqRedis]:
    redis = await create_pool(redis_url)
    yield redis
    await redis.aclose()


async def test_a_job_from_the_documented_client_runs_on_a_real_worker(client: ArqRedis, redis_url: str) -> None:
    job = await client.enqueue_job("echo", 1, "two", three=3, _job_id="from-the-app")
    assert job is not None
    assert await job.status() == JobStatus.queued
    async with running_worker(redis_url):
        assert await job.result(timeout=10) == {"args": [1, "two"], "kwargs": {"three": 3}}
    assert await job.status() == JobStatus.complete


async def test_the_client_takes_arqs_redis_settings_and_a_queue(redis_url: str) -> None:
    redis = await create_pool(RedisSettings.from_dsn(redis_url), queue="arq:other")
    try:
        job = await redis.enqueue_job("echo", _defer_by=60)
        assert job is not None
        assert await redis.zcard("arq:other") == 1
        assert await job.status() == JobStatus.deferred
    finally:
        await redis.aclose()


async def test_a_client_of_a_redis_that_does_not_answer_fails_at_once() -> None:
    with pytest.raises(redis.exceptions.ConnectionError):
        await create_pool(f"redis://127.0.0.1:{free_port()}/0")


async def test_a_pickled_job_gets_one_warning_naming_the_client_is_counted_and_kept(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    plain = await arq_create_pool(RedisSettings.from_dsn(redis_url))  # ARQ's default: pickle
    try:
        await plain.enqueue_job("echo", _job_id="pickled")
    finally:
        await plain.aclose()
    caplog.set_level(logging.INFO)
    async with running_worker(redis_url) as worker:
        await until(lambda: _exists(worker.redis, "arq:result:pickled"), what="the failure")
        failed = worker.metrics.jobs_failed.labels("undecodable")._value.get()
        kept = await worker.redis.get(DEAD_LETTER_PREFIX + "pickled")
    about_it = [(record.levelname, record.getMessage()) for record in caplog.records
                if "pickled" in record.getMessage()]
    assert about_it == [("WARNING", f"job pickled cannot be run: {PICKLED_HINT}; kept as {DEAD_LETTER_PREFIX}pickled")]
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
    assert failed == 1
    assert kept is not None
    assert kept[:1] == b"\x80"


async def test_json_that_is_not_an_arq_job_says_what_is_missing(redis_url: str, caplog: pytest.LogCaptureFixture,
                                                                client: ArqRedis) -> None:
    await client.set("arq:job:odd", json.dumps({"function": "echo"}))
    await client.zadd("arq:queue", {"odd": 1})
    async with running_worker(redis_url) as worker:
        await until(lambda: _exists(worker.redis, "arq:result:odd"), what="the failure")
    assert [record.getMessage() for record in caplog.records if "job odd" in record.getMessage()] == [
        "job odd cannot be run: it is JSON but not an ARQ job (no f, a, k, t, et): enqueue with "
        f"kubearq.client.create_pool (ARQ's ArqRedis, speaking kubearq's JSON); kept as {DEAD_LETTER_PREFIX}odd"]


async def _exists(redis: ArqRedis, key: str) -> bool:
    return bool(await redis.exists(key))


async def kubearq(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubearq.cli", *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_kubearq_enqueue_puts_a_job_a_real_worker_runs(redis_url: str, client: ArqRedis) -> None:
    code, out, err = await kubearq("enqueue", "echo", "1", "two", '{"x": [1]}', "--kwarg", "mode=realtime",
                                   "--kwarg", "limit=3", "--job-id", "from-the-cli", "--redis-url", redis_url)

    assert (code, out) == (0, "enqueued echo as job from-the-cli on arq:queue\n")
    assert err == ("warning: no worker on arq:queue serves echo now (workers publish what they serve); the job "
                   "waits until one does\n")
    job = (await client.queued_jobs())[0]
    assert (job.function, list(job.args)) == ("echo", [1, "two", {"x": [1]}])
    assert job.kwargs == {"mode": "realtime", "limit": 3}
    async with running_worker(redis_url):
        await until(lambda: _exists(client, "arq:result:from-the-cli"), what="the job's result")
    assert await _result_of(client, "from-the-cli") == {
        "args": [1, "two", {"x": [1]}], "kwargs": {"mode": "realtime", "limit": 3}}


async def _result_of(client: ArqRedis, job_id: str) -> object:
    raw = await client.get(f"arq:result:{job_id}")
    return None if raw is None else json.loads(raw)["r"]


async def test_kubearq_enqueue_waits_for_the_result_and_prints_it(redis_url: str) -> None:
    async with running_worker(redis_url):
        code, out, err = await kubearq("enqueue", "echo", "hello", "--wait", "20", "--redis-url", redis_url)
    assert (code, err) == (0, "")
    assert out.splitlines()[1:] == ['{"args": ["hello"], "kwargs": {}}']


async def test_kubearq_enqueue_refuses_a_second_job_with_one_id(redis_url: str) -> None:
    first = await kubearq("enqueue", "echo", "--job-id", "once", "--redis-url", redis_url)
    second = await kubearq("enqueue", "echo", "--job-id", "once", "--redis-url", redis_url)
    assert first[0] == 0
    assert (second[0], second[2]) == (1, "kubearq enqueue: not enqueued: a job with id 'once' is already queued, "
                                         "running or has a result\n")


async def test_kubearq_enqueue_says_what_is_wrong_with_its_input(redis_url: str) -> None:
    bad_kwarg = await kubearq("enqueue", "echo", "--kwarg", "no-equals", "--redis-url", redis_url)
    port = free_port()
    no_redis = await kubearq("enqueue", "echo", "--redis-url", f"redis://127.0.0.1:{port}/0")
    bad_url = await kubearq("enqueue", "echo", "--redis-url", "http://x")
    assert (bad_kwarg[0], bad_kwarg[2]) == (
        2, "kubearq enqueue: --kwarg 'no-equals': write NAME=VALUE, NAME a Python identifier\n")
    assert no_redis[0] == 1
    assert no_redis[2].startswith(f"kubearq enqueue: cannot reach Redis at redis://127.0.0.1:{port}/0: ")
    assert (bad_url[0], bad_url[2]) == (2, "kubearq enqueue: --redis-url: REDIS_URL must start with redis://, "
                                           "rediss:// (TLS) or unix://, not 'http://x'\n")


async def test_kubearq_enqueue_names_an_origin_a_guarded_pool_runs(redis_url: str) -> None:
    async with running_worker(redis_url, allowed_namespaces="team-a"):
        code, out, err = await kubearq("enqueue", "echo", "hi", "--origin", "team-a/Report/weekly", "--wait", "20",
                                       "--redis-url", redis_url)
    assert (code, err) == (0, "")
    assert out.splitlines()[1:] == ['{"args": ["hi"], "kwargs": {}}']


async def test_kubearq_enqueue_says_how_to_write_an_origin(redis_url: str) -> None:
    for bad in ("team-a/Report", "Team_A/Report/weekly", "team-a//weekly"):
        assert await kubearq("enqueue", "echo", "--origin", bad, "--redis-url", redis_url) == (
            2, "", f"kubearq enqueue: --origin {bad!r}: write NAMESPACE/KIND/NAME, e.g. team-a/Report/weekly "
                   "(NAMESPACE a namespace name)\n")
