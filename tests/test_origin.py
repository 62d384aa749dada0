"""Origins on a real Redis and worker: a job names the namespace and resource it was enqueued for, the running job
sees its own (`CURRENT_ORIGIN`), the jobs it enqueues carry it on, and a worker pool with ALLOWED_NAMESPACES
refuses a job from elsewhere (written straight into Redis) before it runs: failed, kept, not retried, counted."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis, RedisSettings
from arq.worker import func
from pydantic import ValidationError

from kubearq.client import Origin, create_pool
from kubearq.core.connections import create_redis
from kubearq.core.contract import (
    CURRENT_ORIGIN,
    ORIGIN_FIELD,
    SCRAPE_LISTING,
    SYNC_CONNECTION,
    PageJob,
    RateLimit,
    RequestRef,
    ScrapeSettings,
    deserialize,
    job_id_for_page,
    origin_of,
)
from kubearq.core.queueing import NewJob, enqueue_many
from kubearq.demo.adplatform import http_json_config
from kubearq.worker.admission import refusal
from kubearq.worker.builtins import builtin_jobs
from kubearq.worker.main import JobSet, WorkerService
from kubearq.worker.runtime import DEAD_LETTER_PREFIX
from kubearq.worker.scrape.jobs import NetworkHooks
from kubearq.worker.settings import WorkerSettings
from kubearq.worker.sync import jobs as sync
from kubearq.worker.sync.store import SyncStore
from tests.polling import until
from tests.test_runtime import FAST
from tests.websites import Reply, Website

TEAM_A = Origin(namespace="team-a", kind="SyncSchedule", name="nightly")
TEAM_B = Origin(namespace="team-b", kind="SyncSchedule", name="nightly")
TEAM_C = Origin(namespace="team-c", kind="ScrapeRequest", name="concerts")
POOL = ("this worker pool runs only jobs from the namespaces in ALLOWED_NAMESPACES (team-a, team-c)")
HOW_TO_NAME_ONE = ("the operator's jobs name theirs, an application's name one with "
                   "kubearq.client.create_pool(origin=...)")


# --- Job functions the test workers serve -----------------------------------------------------------------------

async def reports_origin(ctx: dict[str, Any], together: int = 1) -> dict[str, object] | None:
    """The origin this job sees, read once `together` jobs (this one included) have started: jobs running at once
    must each see their own."""
    await ctx["redis"].rpush("test:started", ctx["job_id"])
    await until(lambda: _started_at_least(ctx["redis"], together), what=f"{together} jobs running at once")
    origin = CURRENT_ORIGIN.get()
    return None if origin is None else origin.model_dump()


async def _started_at_least(redis: ArqRedis, count: int) -> bool:
    return int(await redis.llen("test:started")) >= count  # type: ignore[misc]


async def enqueues_child(ctx: dict[str, Any]) -> None:
    """Enqueues a `reports_origin` job the way an application's job would: ARQ's own `enqueue_job`."""
    await ctx["redis"].enqueue_job("reports_origin", _job_id=f"{ctx['job_id']}:child")


@asynccontextmanager
async def origin_worker(redis_url: str, **overrides: object) -> AsyncIterator[WorkerService]:
    """A worker serving this module's jobs; leaving the block drains it like SIGTERM."""
    settings = WorkerSettings.model_validate({"redis_url": redis_url, **FAST, **overrides})
    service = WorkerService(settings, JobSet(functions=[func(reports_origin), func(enqueues_child)]))
    await service.start()
    try:
        yield service
    finally:
        async with asyncio.timeout(30):
            await service.stop()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    client = create_redis(redis_url)
    yield client
    await client.aclose()


async def write_straight(redis: ArqRedis, job_id: str, function: str, origin: object = None,
                         **kwargs: object) -> bytes:
    """Put a job on arq:queue as someone writing to Redis directly would: JSON, ARQ's fields, any origin."""
    job: dict[str, object] = {"t": None, "f": function, "a": [], "k": kwargs, "et": int(time.time() * 1000)}
    if origin is not None:
        job[ORIGIN_FIELD] = origin.model_dump() if isinstance(origin, Origin) else origin
    payload = json.dumps(job).encode()
    await redis.set(f"arq:job:{job_id}", payload)
    await redis.zadd("arq:queue", {job_id: 1})
    return payload


async def result_of(redis: ArqRedis, job_id: str, within: float = 10) -> dict[str, Any]:
    """A finished job's ARQ result: `s` (succeeded), `r` (its value or error), `f`, `t`..."""
    await until(lambda: _exists(redis, f"arq:result:{job_id}"), within=within, what=f"the result of {job_id}")
    result: dict[str, Any] = json.loads(await redis.get(f"arq:result:{job_id}"))
    return result


async def _exists(redis: ArqRedis, key: str) -> bool:
    return bool(await redis.exists(key))


async def payload_origin(redis: ArqRedis, job_id: str) -> Origin | None:
    raw = await redis.get(f"arq:job:{job_id}")
    assert raw is not None, f"no job {job_id} in Redis"
    return origin_of(deserialize(raw))


# --- The setting -------------------------------------------------------------------------------------------------

def test_allowed_namespaces_is_a_comma_separated_list_of_namespace_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOWED_NAMESPACES", " team-a, team-c,,team-a ")
    settings = WorkerSettings()
    assert settings.allowed_namespaces == "team-a,team-c"
    assert settings.namespaces_allowed == frozenset({"team-a", "team-c"})


def test_unset_allowed_namespaces_lets_every_job_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOWED_NAMESPACES", "")
    allowed = WorkerSettings().namespaces_allowed
    assert allowed == frozenset()
    assert refusal({"f": "echo"}, allowed) is None
    assert refusal({"f": "echo", ORIGIN_FIELD: TEAM_B.model_dump()}, allowed) is None


def test_a_name_that_is_no_namespace_is_refused_at_start_naming_the_setting() -> None:
    with pytest.raises(ValidationError) as refused:
        WorkerSettings(allowed_namespaces="team-a,Team_B")
    assert refused.value.errors()[0]["msg"] == (
        "Value error, 'Team_B' is not a namespace name (lower-case letters, digits and '-', at most 63 characters); "
        "ALLOWED_NAMESPACES takes names separated by commas, e.g. team-a,team-b")


# --- Refused and allowed jobs on a real worker ------------------------------------------------------------------

REFUSED = [
    pytest.param(None, f"it names no origin (the namespace and resource it was enqueued for), and {POOL}; "
                       f"{HOW_TO_NAME_ONE}", id="no-origin"),
    pytest.param(TEAM_B, f"it comes from SyncSchedule team-b/nightly, and {POOL}", id="another-namespace"),
    pytest.param("team-a", f"its origin is malformed (not {{namespace, kind, name}}), and {POOL}; {HOW_TO_NAME_ONE}",
                 id="malformed-origin"),
]


@pytest.mark.parametrize(("origin", "reason"), REFUSED)
async def test_a_job_written_into_redis_from_outside_the_allowed_namespaces_is_refused_unrun_and_unretried(
        redis: ArqRedis, redis_url: str, caplog: pytest.LogCaptureFixture, origin: object, reason: str) -> None:
    payload = await write_straight(redis, "stray", "reports_origin", origin)
    caplog.set_level(logging.INFO)
    async with origin_worker(redis_url, allowed_namespaces="team-a,team-c") as worker:
        result = await result_of(redis, "stray")
        failed = worker.metrics.jobs_failed.labels("reports_origin")._value.get()

    about_it = [(record.levelname, record.getMessage()) for record in caplog.records
                if "job stray" in record.getMessage()]
    assert about_it == [("WARNING", f"job stray (reports_origin) refused: {reason}; kept as {DEAD_LETTER_PREFIX}stray")]
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
    assert (result["s"], result["f"], result["t"]) == (False, "reports_origin", 1)
    assert result["r"] == {"error": f"JobRefused: {reason}", "type": "JobRefused"}
    assert failed == 1
    assert await redis.llen("test:started") == 0  # type: ignore[misc]
    assert await redis.zscore("arq:queue", "stray") is None  # not put back for another try
    assert not await redis.exists("arq:job:stray", "arq:retry:stray", "arq:in-progress:stray")
    assert await redis.get(DEAD_LETTER_PREFIX + "stray") == payload


async def test_a_job_from_an_allowed_namespace_runs_and_sees_its_origin(redis: ArqRedis, redis_url: str) -> None:
    await write_straight(redis, "allowed", "reports_origin", TEAM_C)
    async with origin_worker(redis_url, allowed_namespaces="team-a,team-c") as worker:
        result = await result_of(redis, "allowed")
        succeeded = worker.metrics.jobs_succeeded.labels("reports_origin")._value.get()
    assert (result["s"], result["r"]) == (True, TEAM_C.model_dump())
    assert succeeded == 1


async def test_jobs_running_at_once_each_see_their_own_origin(redis: ArqRedis, redis_url: str) -> None:
    # Set in ARQ's run_job task as the job is decoded; the function runs in a task created from it, inside
    # ARQ's wait_for and the supervisor's asyncio.timeout, while another job's task holds another origin.
    await write_straight(redis, "from-team-a", "reports_origin", TEAM_A, together=2)
    await write_straight(redis, "from-nowhere", "reports_origin", together=2)
    async with origin_worker(redis_url):
        from_team_a, from_nowhere = await result_of(redis, "from-team-a"), await result_of(redis, "from-nowhere")
    assert (from_team_a["s"], from_team_a["r"]) == (True, TEAM_A.model_dump())
    assert (from_nowhere["s"], from_nowhere["r"]) == (True, None)  # no ALLOWED_NAMESPACES: no origin needed


async def test_a_job_enqueued_by_a_job_carries_its_origin_on(redis: ArqRedis, redis_url: str) -> None:
    await write_straight(redis, "parent", "enqueues_child", TEAM_A)
    async with origin_worker(redis_url, allowed_namespaces="team-a") as worker:
        child = await result_of(redis, "parent:child")
        refused = worker.metrics.jobs_failed.labels("reports_origin")._value.get()
    assert (child["s"], child["r"]) == (True, TEAM_A.model_dump())
    assert refused == 0


# --- An application's jobs ---------------------------------------------------------------------------------------

async def test_create_pool_with_an_origin_stamps_every_job_and_a_guarded_pool_runs_them(
        redis: ArqRedis, redis_url: str) -> None:
    shop = Origin(namespace="team-a", kind="Deployment", name="shop")
    by_url = await create_pool(redis_url, origin=shop)
    by_settings = await create_pool(RedisSettings.from_dsn(redis_url), origin=shop)
    plain = await create_pool(redis_url)
    try:
        await by_url.enqueue_job("reports_origin", _job_id="by-url")
        await by_settings.enqueue_job("reports_origin", _job_id="by-settings")
        await plain.enqueue_job("reports_origin", _job_id="plain")
    finally:
        for pool in (by_url, by_settings, plain):
            await pool.aclose()
    stamped = [await payload_origin(redis, job_id) for job_id in ("by-url", "by-settings", "plain")]
    async with origin_worker(redis_url, allowed_namespaces="team-a"):
        ran = [(await result_of(redis, job_id))["r"] for job_id in ("by-url", "by-settings")]
    assert stamped == [shop, shop, None]
    assert ran == [shop.model_dump(), shop.model_dump()]


# --- The built-in jobs that enqueue jobs ------------------------------------------------------------------------

async def test_a_listings_detail_pages_carry_the_listings_origin(
        redis: ArqRedis, redis_url: str, postgres_dsn: str) -> None:
    origin = Origin(namespace="shows", kind="ScrapeRequest", name="concerts")
    request = RequestRef(uid=str(uuid.uuid4()), namespace="shows", name="concerts")
    # The detail pages go to a queue no worker serves, so that they stay there to be read.
    settings = ScrapeSettings(rate_limit=RateLimit(requests_per_minute=100_000, burst=1000), queue="test:details")
    async with Website() as site:
        site.routes["/list"] = Reply(body=b'<html><body><a href="/events/1">1</a><a href="/events/2">2</a></body>'
                                          b"</html>")
        listing_url = site.url("/list", "127.0.0.1")
        page = PageJob(request=request, url=listing_url, settings=settings).model_dump(mode="json", by_alias=True)
        listing = job_id_for_page(request.uid, listing_url)
        await enqueue_many(redis, "arq:queue", [NewJob(listing, SCRAPE_LISTING, {"page": page}, origin=origin)])
        worker_settings = WorkerSettings.model_validate({"redis_url": redis_url, "database_url": postgres_dsn, **FAST,
                                                         "allowed_namespaces": "shows"})
        service = WorkerService(worker_settings, builtin_jobs(
            worker_settings, hooks=NetworkHooks(extra_allowed=frozenset({site.endpoint}))))
        await service.start()
        try:
            result = await result_of(redis, listing, within=30)  # the worker migrates PostgreSQL first
        finally:
            async with asyncio.timeout(30):
                await service.stop()
    details = [job_id.decode() for job_id in await redis.zrange("test:details", 0, -1)]
    assert (result["s"], result["r"]["enqueued"]) == (True, 2)
    assert sorted(details) == sorted(job_id_for_page(request.uid, site.url(f"/events/{n}", "127.0.0.1"))
                                     for n in (1, 2))
    assert [await payload_origin(redis, job_id) for job_id in details] == [origin, origin]


async def test_the_fan_out_gives_each_connection_sync_the_fan_outs_origin(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, tmp_path: Path) -> None:
    (tmp_path / "ads").mkdir()
    for account in ("acme", "globex"):
        (tmp_path / "ads" / account).write_text(f"{account}-token")
    settings = WorkerSettings.model_validate({"redis_url": redis_url, "database_url": postgres_dsn,
                                              "sync_secrets_dir": str(tmp_path)})
    jobs = builtin_jobs(settings)
    ctx: dict[str, Any] = {"redis": redis, "job_id": "kubearq:tick:nightly:1773137700", "job_try": 1}
    await jobs.on_startup[0](ctx)
    try:
        store: SyncStore = ctx[sync.CONTEXT_KEY].store
        for account in ("acme", "globex"):
            await store.add_connection(
                workspace_id=uuid.uuid4(), provider="http-json", display_name=account, time_zone="UTC",
                config=http_json_config("http://127.0.0.1:9", account), credentials_ref=f"ads/{account}")
        running = CURRENT_ORIGIN.set(TEAM_A)  # as the worker sets it for the fan-out job it runs
        try:
            summary = await sync.sync_connections(ctx, "realtime")
        finally:
            CURRENT_ORIGIN.reset(running)
    finally:
        await jobs.on_shutdown[0](ctx)
    children = [job_id.decode() for job_id in await redis.zrange("arq:queue", 0, -1)]
    functions = [deserialize(await redis.get(f"arq:job:{job_id}"))["f"] for job_id in children]
    assert summary["enqueued"] == 2
    assert functions == [SYNC_CONNECTION, SYNC_CONNECTION]
    assert [await payload_origin(redis, job_id) for job_id in children] == [TEAM_A, TEAM_A]
