"""Jobs that fail for good are kept (kubearq.core.failedjobs, kubearq.worker.failures): on a real Redis and a real
PostgreSQL, written by a real worker; re-driven, discarded, pruned, filtered and paged through either store."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from arq.connections import ArqRedis

from kubearq.core.connections import create_redis
from kubearq.core.contract import Origin, deserialize
from kubearq.core.failedjobs import (
    FailedJob,
    FailedJobFilter,
    FailedJobStore,
    FailureReason,
    InvalidCursorError,
    Keeping,
    Selection,
    TryError,
    redrive_id,
    redriven_from,
)
from kubearq.core.failedjobstores import PostgresFailedJobs, RedisFailedJobs
from kubearq.core.queueing import NewJob, enqueue_many
from kubearq.demo.services import PostgresServer
from kubearq.worker.failures import FailureKeeper, pending_key, prune_gate_key, try_errors_key
from kubearq.worker.main import WorkerService, load_user_jobs
from kubearq.worker.metrics import WorkerMetrics
from kubearq.worker.runtime import DEAD_LETTER_PREFIX
from kubearq.worker.settings import WorkerSettings
from kubearq.worker.storage import Storage
from tests.failing_jobs import BROKEN_KEY
from tests.polling import until
from tests.test_runtime import FAST

TEAM_A = Origin(namespace="team-a", kind="SyncSchedule", name="nightly")
T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
PICKLED = b"\x80\x04\x95\x1a\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94."


# --- services ---------------------------------------------------------------------------------------------------


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    client = create_redis(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def storage(postgres_dsn: str) -> AsyncIterator[Storage]:
    """The test's database, migrated as a worker migrates it."""
    async with Storage(postgres_dsn, connect_timeout=30) as storage:
        await storage.migrate()
        yield storage


@pytest.fixture
def kept(storage: Storage, redis: ArqRedis) -> PostgresFailedJobs:
    """The failed jobs a worker with DATABASE_URL keeps, read as the CLI reads them."""
    return PostgresFailedJobs(storage.connection, redis)


@pytest.fixture(params=["PostgreSQL", "Redis"])
async def store(request: pytest.FixtureRequest, redis: ArqRedis,
                postgres_server: PostgresServer) -> AsyncIterator[FailedJobStore]:
    """Either store: the behaviour is the same whether DATABASE_URL is set or not."""
    if request.param == "Redis":
        yield RedisFailedJobs(redis, cap=100)
        return
    postgres_server.start()
    name = f"test_{uuid.uuid4().hex[:8]}"
    dsn = postgres_server.create_database(name)
    try:
        async with Storage(dsn, connect_timeout=30) as storage:
            await storage.migrate()
            yield PostgresFailedJobs(storage.connection, redis)
    finally:
        postgres_server.drop_database(name)


@asynccontextmanager
async def keeping_worker(redis_url: str, database_url: str | None = None,
                         **overrides: object) -> AsyncIterator[WorkerService]:
    """A worker serving tests.failing_jobs, 3 tries per job; leaving the block drains it."""
    settings = WorkerSettings.model_validate({"redis_url": redis_url, "database_url": database_url, **FAST,
                                              "max_tries": 3, "pod_name": "worker-a", **overrides})
    service = WorkerService(settings, load_user_jobs("tests.failing_jobs:WorkerSettings"))
    await service.start()
    try:
        yield service
    finally:
        async with asyncio.timeout(30):
            await service.stop()


async def enqueue(redis: ArqRedis, job_id: str, function: str, *args: object, origin: Origin | None = None,
                  queue: str = "arq:queue", **kwargs: object) -> None:
    assert await enqueue_many(redis, queue, [NewJob(job_id, function, kwargs, args, origin=origin)]) == [job_id]


async def kept_job(store: FailedJobStore, job_id: str, within: float = 20.0) -> FailedJob:
    """The kept record of `job_id`, once the worker has stored it."""
    found: list[FailedJob] = []

    async def stored() -> bool:
        job = await store.get(job_id)
        found[:] = [job] if job is not None else []
        return bool(found)

    await until(stored, within=within, what=f"{job_id} kept as failed")
    return found[0]


async def runs(redis: ArqRedis) -> list[str]:
    """`job_id:try` of every run of a tests.failing_jobs function, in order."""
    return [run.decode() for run in await redis.lrange("test:runs", 0, -1)]  # type: ignore[misc]


async def arq_result(redis: ArqRedis, job_id: str, within: float = 20.0) -> dict[str, Any]:
    async def finished() -> bool:
        return bool(await redis.exists(f"arq:result:{job_id}"))

    await until(finished, within=within, what=f"a result of {job_id}")
    return deserialize(await redis.get(f"arq:result:{job_id}"))


def failed(job_id: str, *, minutes: float = 0, function: str = "flaky", queue: str = "arq:queue",
           error: str = "RuntimeError: the backend is broken", origin: Origin | None = None,
           reason: FailureReason = FailureReason.FAILED, failed_at: datetime | None = None,
           enqueued_at: datetime | None = None, kwargs: dict[str, Any] | None = None) -> FailedJob:
    """A failure as a worker records it: `minutes` after T0 (or at `failed_at`)."""
    at = failed_at or T0 + timedelta(minutes=minutes)
    return FailedJob(job_id=job_id, function=function, args=[], kwargs={"report": job_id} if kwargs is None else kwargs,
                     queue=queue, reason=reason, error=error, tries=3, origin=origin, worker="worker-a",
                     enqueued_at=enqueued_at or at - timedelta(minutes=1), failed_at=at)


async def ids(store: FailedJobStore, where: FailedJobFilter | None = None) -> list[str]:
    return [job.job_id for job in (await store.page(where, limit=1000)).jobs]


async def payload(redis: ArqRedis, job_id: str) -> dict[str, Any]:
    """ARQ's payload of a queued job."""
    raw = await redis.get(f"arq:job:{job_id}")
    assert raw is not None, f"{job_id} is not queued"
    return deserialize(raw)


# --- what a worker keeps ----------------------------------------------------------------------------------------


async def test_a_job_failing_its_last_try_is_kept_with_what_it_was_and_each_tries_error(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, kept: PostgresFailedJobs, db: asyncpg.Connection) -> None:
    before = datetime.now(UTC)
    await enqueue(redis, "report-1", "fails_every_try", 1, "two", origin=TEAM_A, three=3)
    async with keeping_worker(redis_url, postgres_dsn):
        job = await kept_job(kept, "report-1")
    after = datetime.now(UTC)

    assert (job.function, job.args, job.kwargs, job.queue) == ("fails_every_try", [1, "two"], {"three": 3},
                                                                 "arq:queue")
    assert (job.reason, job.tries, job.error) == (FailureReason.FAILED, 3, "ValueError: boom on try 3")
    assert [(entry.job_try, entry.error) for entry in job.try_errors] == [
        (1, "ValueError: boom on try 1"), (2, "ValueError: boom on try 2"), (3, "ValueError: boom on try 3")]
    times = [entry.at for entry in job.try_errors]
    assert before <= times[0] <= times[1] <= times[2] == job.failed_at <= after
    assert (job.origin, job.worker) == (TEAM_A, "worker-a")
    assert job.enqueued_at is not None
    assert before - timedelta(seconds=1) <= job.enqueued_at <= times[0]
    row = await db.fetchrow("SELECT * FROM failed_jobs WHERE job_id = 'report-1'")
    assert row is not None
    assert (row["function"], row["args"], row["kwargs"], row["tries"], row["origin_namespace"], row["origin_kind"],
            row["origin_name"], row["worker"]) == ("fails_every_try", [1, "two"], {"three": 3}, 3, "team-a",
                                                   "SyncSchedule", "nightly", "worker-a")
    assert [entry["error"] for entry in row["try_errors"]] == [f"ValueError: boom on try {n}" for n in (1, 2, 3)]
    # Nothing is left waiting in Redis: the try errors and the pending record are gone.
    assert await redis.exists(try_errors_key("report-1")) == 0
    assert await redis.hlen(pending_key(postgres_dsn)) == 0  # type: ignore[misc]


async def test_a_job_that_gives_up_is_kept_after_its_one_try(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, kept: PostgresFailedJobs) -> None:
    await enqueue(redis, "revoked", "gives_up")
    async with keeping_worker(redis_url, postgres_dsn):
        job = await kept_job(kept, "revoked")

    assert (job.reason, job.tries, job.error) == (FailureReason.GAVE_UP, 1, "GiveUp: the token was revoked")
    assert [(entry.job_try, entry.error) for entry in job.try_errors] == [(1, "GiveUp: the token was revoked")]
    assert await runs(redis) == ["revoked:1"]


async def test_a_job_refused_by_allowed_namespaces_is_kept_with_where_its_bytes_are(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, kept: PostgresFailedJobs) -> None:
    team_b = Origin(namespace="team-b", kind="SyncSchedule", name="nightly")
    await enqueue(redis, "foreign", "flaky", origin=team_b, report="r")
    async with keeping_worker(redis_url, postgres_dsn, allowed_namespaces="team-a"):
        job = await kept_job(kept, "foreign")

    assert (job.reason, job.function, job.kwargs, job.origin, job.tries) == (
        FailureReason.REFUSED, "flaky", {"report": "r"}, team_b, 0)
    assert "team-b" in job.error
    assert "ALLOWED_NAMESPACES" in job.error
    assert job.dead_letter_key == DEAD_LETTER_PREFIX + "foreign"
    assert await redis.get(DEAD_LETTER_PREFIX + "foreign") is not None
    assert await runs(redis) == []


async def test_an_undecodable_job_is_kept_and_redriving_it_runs_nothing(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, kept: PostgresFailedJobs) -> None:
    await redis.set("arq:job:evil", PICKLED)
    await redis.zadd("arq:queue", {"evil": 1})
    async with keeping_worker(redis_url, postgres_dsn):
        job = await kept_job(kept, "evil")
    redrives = await kept.redrive(Selection.of("evil"))

    assert (job.reason, job.function, job.tries, job.origin) == (FailureReason.UNDECODABLE, "undecodable", 0, None)
    assert "pickled" in job.error
    assert job.dead_letter_key == DEAD_LETTER_PREFIX + "evil"
    assert await redis.get(job.dead_letter_key) == PICKLED
    assert (redrives.not_runnable, redrives.enqueued) == (["evil"], [])


async def test_a_job_whose_tries_ran_out_while_its_workers_died_is_kept_with_the_tries_it_had(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, kept: PostgresFailedJobs) -> None:
    await enqueue(redis, "orphan", "fails_every_try")
    # As if it failed once, then its workers were killed mid-try until ARQ's count (our 3 tries + 1) ran out.
    await redis.set("arq:retry:orphan", 4)
    await redis.hset(try_errors_key("orphan"), "1", TryError(job_try=1, error="ValueError: boom on try 1",  # type: ignore[misc]
                                                              at=T0).model_dump_json())
    async with keeping_worker(redis_url, postgres_dsn):
        job = await kept_job(kept, "orphan")

    assert (job.reason, job.error, job.tries) == (FailureReason.OUT_OF_TRIES, "JobExecutionFailed: max 4 retries "
                                                                               "exceeded", 4)
    assert [(entry.job_try, entry.error) for entry in job.try_errors] == [(1, "ValueError: boom on try 1")]
    assert await runs(redis) == []


async def test_a_job_no_worker_serves_is_kept(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, kept: PostgresFailedJobs) -> None:
    await enqueue(redis, "typo", "fails_evry_try", 1)
    async with keeping_worker(redis_url, postgres_dsn):
        job = await kept_job(kept, "typo")

    assert (job.reason, job.function, job.args, job.tries) == (FailureReason.FUNCTION_NOT_SERVED, "fails_evry_try",
                                                              [1], 0)
    assert job.error == "JobExecutionFailed: function 'fails_evry_try' not found"


async def test_a_job_that_succeeds_on_a_later_try_leaves_nothing(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, kept: PostgresFailedJobs) -> None:
    await enqueue(redis, "flaky-once", "fails_once")
    async with keeping_worker(redis_url, postgres_dsn):
        result = await arq_result(redis, "flaky-once")
    # The worker stored whatever was waiting before it stopped.

    assert (result["s"], result["t"]) == (True, 2)
    assert (await kept.page()).jobs == []
    assert await redis.keys("kubearq:try-errors:*") == []
    assert await redis.hlen(pending_key(postgres_dsn)) == 0  # type: ignore[misc]


async def test_a_redriven_job_runs_with_fresh_tries_under_a_new_id_linked_both_ways(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, kept: PostgresFailedJobs) -> None:
    await redis.set(BROKEN_KEY, 1)
    await enqueue(redis, "nightly-report", "flaky", origin=TEAM_A, report="nightly")
    async with keeping_worker(redis_url, postgres_dsn):
        await kept_job(kept, "nightly-report")
        redrives = await kept.redrive(Selection.of("nightly-report"))
        new_id = redrives.new_job_ids["nightly-report"]
        again = await kept_job(kept, new_id)  # still broken: it fails all its tries again
    old = await kept.get("nightly-report")

    assert redrives.enqueued == [new_id]
    assert redriven_from(new_id) == "nightly-report"
    assert old is not None
    assert (old.redriven_as, old.redrive_count) == (new_id, 1)
    assert (again.redrive_of, again.tries, again.origin, again.kwargs) == ("nightly-report", 3, TEAM_A,
                                                                           {"report": "nightly"})
    assert await runs(redis) == [f"{job_id}:{n}" for job_id in ("nightly-report", new_id) for n in (1, 2, 3)]


async def test_a_redriven_job_succeeds_once_its_cause_is_fixed(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, kept: PostgresFailedJobs) -> None:
    await redis.set(BROKEN_KEY, 1)
    await enqueue(redis, "nightly-report", "flaky", report="nightly")
    async with keeping_worker(redis_url, postgres_dsn):
        await kept_job(kept, "nightly-report")
        await redis.delete(BROKEN_KEY)
        new_id = (await kept.redrive(Selection.of("nightly-report"))).new_job_ids["nightly-report"]
        result = await arq_result(redis, new_id)

    assert (result["s"], result["r"], result["t"]) == (True, "nightly done", 1)
    assert (await runs(redis))[-1] == f"{new_id}:1"
    assert await ids(kept) == ["nightly-report"]  # the re-drive succeeded: no new failure


async def test_without_database_url_the_newest_failed_jobs_are_kept_in_redis_up_to_the_cap(
        redis: ArqRedis, redis_url: str) -> None:
    now = int(datetime.now(UTC).timestamp() * 1000)
    # One job at a time, in queue order: each fails after the one before.
    await enqueue_many(redis, "arq:queue", [NewJob(f"given-up-{n}", "gives_up", {}, defer_until_ms=now - 1000 + n)
                                            for n in range(1, 6)])
    store = RedisFailedJobs(redis)  # a reader: the cap is the workers'
    async with keeping_worker(redis_url, failed_jobs_redis_cap=3, max_jobs=1):
        async def newest_three() -> bool:
            return await ids(store) == ["given-up-5", "given-up-4", "given-up-3"]

        await until(newest_three, within=20, what="the three newest failures kept")
    keeping = await store.keeping()

    assert keeping == Keeping("Redis", 3)
    assert keeping.notice == ("failed jobs are kept in Redis without DATABASE_URL, the newest 3 only; set "
                              "DATABASE_URL (the workers' PostgreSQL) to keep them all")
    assert await redis.zcard("kubearq:failed-jobs") == 3
    assert sorted(key.decode() for key in await redis.keys("kubearq:failed-job:*")) == [
        f"kubearq:failed-job:given-up-{n}" for n in (3, 4, 5)]
    assert Keeping("PostgreSQL").notice is None


async def test_pools_sharing_a_redis_keep_their_failed_jobs_each_where_its_settings_say(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, kept: PostgresFailedJobs) -> None:
    in_redis = RedisFailedJobs(redis)
    await enqueue(redis, "for-postgresql", "gives_up", queue="with-database")
    await enqueue(redis, "for-redis", "gives_up", queue="without-database")
    async with keeping_worker(redis_url, postgres_dsn, queue="with-database"), \
            keeping_worker(redis_url, queue="without-database"):
        await kept_job(kept, "for-postgresql")
        await kept_job(in_redis, "for-redis")

    assert await ids(kept) == ["for-postgresql"]
    assert await ids(in_redis) == ["for-redis"]
    assert pending_key(postgres_dsn) != pending_key(None)
    assert prune_gate_key(postgres_dsn) != prune_gate_key(None)


async def test_failed_jobs_wait_in_redis_while_postgresql_is_down_and_are_stored_once_it_is_back(
        redis: ArqRedis, redis_url: str, postgres_private: PostgresServer) -> None:
    dsn = postgres_private.create_database("kept")
    async with Storage(dsn, connect_timeout=30) as storage:
        await storage.migrate()
        kept = PostgresFailedJobs(storage.connection, redis)
        async with keeping_worker(redis_url, dsn):
            await enqueue(redis, "before-outage", "gives_up")
            await kept_job(kept, "before-outage")  # the worker has migrated and stores
            postgres_private.stop()
            await enqueue(redis, "during-outage", "gives_up")

            async def waiting() -> bool:
                return bool(await redis.hexists(pending_key(dsn), "during-outage"))  # type: ignore[misc]

            await until(waiting, what="the failure waiting in Redis")
            postgres_private.start()
            job = await kept_job(kept, "during-outage", within=30)

        assert (job.reason, job.error) == (FailureReason.GAVE_UP, "GiveUp: the token was revoked")
        assert await redis.hlen(pending_key(dsn)) == 0  # type: ignore[misc]


# --- retention --------------------------------------------------------------------------------------------------


async def test_retention_prunes_the_jobs_kept_longer_than_it(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, kept: PostgresFailedJobs) -> None:
    now = datetime.now(UTC)
    await kept.record([failed("eight-days-old", failed_at=now - timedelta(days=8)),
                       failed("six-days-old", failed_at=now - timedelta(days=6))])
    async with keeping_worker(redis_url, postgres_dsn, failed_jobs_retention_days=7):
        async def pruned() -> bool:
            return await ids(kept) == ["six-days-old"]

        await until(pruned, what="the job older than the retention pruned")

    assert await redis.get(prune_gate_key(postgres_dsn)) == b"worker-a"


async def test_one_worker_prunes_per_interval(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, kept: PostgresFailedJobs) -> None:
    old = datetime.now(UTC) - timedelta(days=30)
    settings = WorkerSettings(redis_url=redis_url, database_url=postgres_dsn, pod_name="worker-b")
    keeper = FailureKeeper(settings, redis, WorkerMetrics(), prune_interval=600)
    keeper.store = kept  # its own pool opens only in its background task
    await kept.record([failed("first", failed_at=old)])
    first = await keeper.prune()
    await kept.record([failed("second", failed_at=old)])
    second = await keeper.prune()

    assert (first, second) == (1, 0)
    assert await ids(kept) == ["second"]
    assert 0 < await redis.pttl(prune_gate_key(postgres_dsn)) <= 600_000


async def test_prune_removes_only_what_failed_before_the_time(store: FailedJobStore) -> None:
    await store.record([failed(f"job-{n}", minutes=n) for n in range(5)])

    assert await store.prune(T0 + timedelta(minutes=2)) == 2
    assert await ids(store) == ["job-4", "job-3", "job-2"]


# --- re-drive ---------------------------------------------------------------------------------------------------


async def test_redriving_one_enqueues_a_copy_under_a_new_id_and_links_it(
        store: FailedJobStore, redis: ArqRedis) -> None:
    job = failed("report-1", origin=TEAM_A)
    await store.record([job, failed("report-2")])
    redrives = await store.redrive(Selection.of("report-1"))
    new_id = redrive_id(job, 1)
    old = await store.get("report-1")

    assert (redrives.new_job_ids, redrives.enqueued) == ({"report-1": new_id}, [new_id])
    assert new_id == f"kubearq:redrive:1:{int((T0 - timedelta(minutes=1)).timestamp() * 1000)}:report-1"
    queued = await payload(redis, new_id)
    assert (queued["f"], queued["a"], queued["k"], queued["o"]) == ("flaky", [], {"report": "report-1"},
                                                                    TEAM_A.model_dump())
    assert await redis.zscore("arq:queue", new_id) is not None
    assert old is not None
    assert (old.redriven_as, old.redrive_count) == (new_id, 1)
    assert old.redriven_at is not None
    assert await ids(store, FailedJobFilter(redriven=False)) == ["report-2"]


async def test_redriving_a_filtered_set_enqueues_each_on_its_own_queue(store: FailedJobStore, redis: ArqRedis) -> None:
    await store.record([failed("a", minutes=1), failed("b", minutes=2, function="fails_every_try"),
                        failed("c", minutes=3, queue="reports")])
    redrives = await store.redrive(Selection(where=FailedJobFilter(function="flaky")))

    assert sorted(redrives.new_job_ids) == ["a", "c"]
    assert await redis.zrange("arq:queue", 0, -1) == [redrives.new_job_ids["a"].encode()]
    assert await redis.zrange("reports", 0, -1) == [redrives.new_job_ids["c"].encode()]
    assert await ids(store, FailedJobFilter(redriven=False)) == ["b"]


async def test_redriving_all_skips_what_cannot_run_and_reports_earlier_redrives(store: FailedJobStore) -> None:
    await store.record([failed("a", minutes=1), failed("b", minutes=2),
                        failed("pickled", minutes=3, function="undecodable", reason=FailureReason.UNDECODABLE)])
    earlier = await store.redrive(Selection.of("a"))
    redrives = await store.redrive(Selection())

    assert redrives.new_job_ids == {"a": earlier.new_job_ids["a"], "b": redrive_id(failed("b", minutes=2), 1)}
    assert (redrives.enqueued, redrives.not_runnable) == ([redrive_id(failed("b", minutes=2), 1)], ["pickled"])


async def test_redriving_twice_is_one_new_job(store: FailedJobStore, redis: ArqRedis) -> None:
    await store.record([failed("report-1")])
    first = await store.redrive(Selection.of("report-1"))
    second = await store.redrive(Selection.of("report-1", "gone"))

    assert second.new_job_ids == first.new_job_ids
    assert (second.enqueued, second.not_found) == ([], ["gone"])
    assert await redis.zcard("arq:queue") == 1


async def test_concurrent_redrives_enqueue_one_job(store: FailedJobStore, redis: ArqRedis) -> None:
    await store.record([failed("report-1")])
    redrives = await asyncio.gather(*(store.redrive(Selection.of("report-1")) for _ in range(4)))

    assert sorted(len(redrive.enqueued) for redrive in redrives) == [0, 0, 0, 1]
    assert {redrive.new_job_ids["report-1"] for redrive in redrives} == {redrive_id(failed("report-1"), 1)}
    assert await redis.zcard("arq:queue") == 1


class CrashError(Exception):
    """The process died here."""


async def test_a_redrive_interrupted_between_enqueue_and_row_update_is_finished_by_the_next(
        store: FailedJobStore, redis: ArqRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    await store.record([failed("report-1")])

    async def die(marks: Sequence[tuple[FailedJob, str]]) -> None:
        raise CrashError

    monkeypatch.setattr(store, "_mark_redriven", die)
    with pytest.raises(CrashError):
        await store.redrive(Selection.of("report-1"))
    monkeypatch.undo()
    new_id = redrive_id(failed("report-1"), 1)
    interrupted = await store.get("report-1")
    # Meanwhile a worker ran the re-driven job and its result expired: nothing of it is left on ARQ's keys.
    assert await redis.zrem("arq:queue", new_id) == 1
    await redis.delete(f"arq:job:{new_id}")
    redrives = await store.redrive(Selection.of("report-1"))
    finished = await store.get("report-1")

    assert interrupted is not None
    assert interrupted.redriven_as is None
    assert (redrives.new_job_ids, redrives.enqueued) == ({"report-1": new_id}, [])
    assert finished is not None
    assert (finished.redriven_as, finished.redrive_count) == (new_id, 1)
    assert await redis.zcard("arq:queue") == 0  # not enqueued a second time


async def test_a_later_failure_of_the_same_job_id_replaces_it_and_is_redriven_anew(store: FailedJobStore) -> None:
    first = failed("nightly", minutes=1)
    await store.record([first])
    earlier = await store.redrive(Selection.of("nightly"))
    await store.record([first])  # the same record again (a flush repeated after a crash): changes nothing
    replayed = await store.get("nightly")
    later = failed("nightly", minutes=10, error="RuntimeError: broken again")
    await store.record([later])
    replaced = await store.get("nightly")
    redrives = await store.redrive(Selection.of("nightly"))

    assert replayed is not None
    assert replayed.redriven_as == earlier.new_job_ids["nightly"]
    assert replaced is not None
    assert (replaced.error, replaced.redriven_as, replaced.redrive_count) == (
        "RuntimeError: broken again", None, 1)
    assert redrives.enqueued == [redrive_id(later, 2)] != [earlier.new_job_ids["nightly"]]


# --- discard ----------------------------------------------------------------------------------------------------


async def test_discarding_by_id_removes_those_found(store: FailedJobStore) -> None:
    await store.record([failed("a", minutes=1), failed("b", minutes=2)])

    assert await store.discard(Selection.of("a", "never-kept")) == 1
    assert await ids(store) == ["b"]
    assert await store.get("a") is None


async def test_discarding_a_filtered_set_keeps_the_others(store: FailedJobStore) -> None:
    await store.record([failed(f"flaky-{n}", minutes=n) for n in range(7)]
                       + [failed("other", minutes=3, function="fails_every_try")])

    assert await store.discard(Selection(where=FailedJobFilter(function="flaky"))) == 7
    assert await ids(store) == ["other"]


# --- filters and pages ------------------------------------------------------------------------------------------

TEAM_A_SCRAPE = Origin(namespace="team-a", kind="ScrapeRequest", name="concerts")
TEAM_B = Origin(namespace="team-b", kind="SyncSchedule", name="nightly")
VARIED = [
    failed("a", minutes=1, origin=TEAM_A),
    failed("b", minutes=2, function="fails_every_try", origin=TEAM_A_SCRAPE, error="ValueError: boom on try 3"),
    failed("c", minutes=3, queue="reports", origin=TEAM_B, error="TimeoutError: the try took longer than 30 s"),
    failed("d", minutes=4, error="KeyError: '100%_done'"),
]


@pytest.mark.parametrize(("where", "expected"), [
    (FailedJobFilter(), ["d", "c", "b", "a"]),
    (FailedJobFilter(function="flaky"), ["d", "c", "a"]),
    (FailedJobFilter(queue="reports"), ["c"]),
    (FailedJobFilter(namespace="team-a"), ["b", "a"]),
    (FailedJobFilter(namespace="team-a", kind="SyncSchedule", name="nightly"), ["a"]),
    (FailedJobFilter(kind="SyncSchedule", name="nightly"), ["c", "a"]),
    (FailedJobFilter(error="BACKEND IS"), ["a"]),
    (FailedJobFilter(error="%_"), ["d"]),  # LIKE's wildcards are matched as text
    (FailedJobFilter(error="boom"), ["b"]),
    (FailedJobFilter(since=T0 + timedelta(minutes=3)), ["d", "c"]),
    (FailedJobFilter(function="flaky", since=T0 + timedelta(minutes=2)), ["d", "c"]),
    (FailedJobFilter(function="no_such_function"), []),
], ids=["all", "function", "queue", "namespace", "resource", "kind-and-name", "error-any-case", "error-wildcards",
        "error", "since", "function-and-since", "nothing"])
async def test_filters_select_what_matches(store: FailedJobStore, where: FailedJobFilter,
                                           expected: list[str]) -> None:
    await store.record(VARIED)

    assert await ids(store, where) == expected


async def test_pages_are_newest_first_and_stable_across_inserts(store: FailedJobStore) -> None:
    # Two failed in the same microsecond: ordered by job id, as the cursor is.
    await store.record([failed(f"job-{n}", minutes=n) for n in range(6)] + [failed("job-3b", minutes=3)])
    first = await store.page(limit=3)
    await store.record([failed("newer", minutes=60), failed("job-3a", minutes=3), failed("job-3c", minutes=3)])
    assert first.next_cursor is not None
    second = await store.page(after=first.next_cursor, limit=3)
    assert second.next_cursor is not None
    third = await store.page(after=second.next_cursor, limit=3)

    assert [job.job_id for job in first.jobs] == ["job-5", "job-4", "job-3b"]
    # job-3c sorts before the cursor's job-3b and is not shown; job-3a sorts after it and is.
    assert [job.job_id for job in second.jobs] == ["job-3a", "job-3", "job-2"]
    assert ([job.job_id for job in third.jobs], third.next_cursor) == (["job-1", "job-0"], None)


async def test_a_filtered_page_deep_in_the_list_continues_where_the_last_ended(store: FailedJobStore) -> None:
    await store.record([failed(f"job-{n:02}", minutes=n, function="flaky" if n % 3 else "other")
                        for n in range(30)])
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = await store.page(FailedJobFilter(function="other"), after=cursor, limit=4)
        seen += [job.job_id for job in page.jobs]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor

    assert seen == [f"job-{n:02}" for n in range(27, -1, -3)]


async def test_a_cursor_that_no_page_returned_is_refused(store: FailedJobStore) -> None:
    with pytest.raises(InvalidCursorError) as refused:
        await store.page(after="not-a-cursor")

    assert str(refused.value) == "'not-a-cursor' is not a cursor a page of failed jobs returned (next_cursor)"


async def test_a_page_is_at_most_a_thousand(store: FailedJobStore) -> None:
    with pytest.raises(ValueError, match=r"^limit must be between 1 and 1000, not 1001$"):
        await store.page(limit=1001)


async def test_the_store_says_where_failed_jobs_are_kept(store: FailedJobStore) -> None:
    keeping = await store.keeping()
    page = await store.page()

    assert page.keeping == keeping
    assert keeping == (Keeping("Redis", 100) if isinstance(store, RedisFailedJobs) else Keeping("PostgreSQL"))


async def test_text_postgresql_refuses_is_kept_with_a_replacement(kept: PostgresFailedJobs) -> None:
    # A job written by hand may carry NUL or NaN, which PostgreSQL's text and jsonb refuse: one such record must not
    # stop the flush of every record after it.
    odd = failed("odd", function="nul\x00name", error="NUL \x00 here",
                 kwargs={"text": "nul\x00", "ratio": float("nan"), "nested": [{"deep": "\x00"}]})
    await kept.record([odd])
    job = await kept.get("odd")

    assert job is not None
    assert (job.function, job.error) == ("nul\ufffdname", "NUL \ufffd here")
    assert job.kwargs == {"text": "nul\ufffd", "ratio": "nan", "nested": [{"deep": "\ufffd"}]}
