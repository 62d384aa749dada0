"""Keeping every job that fails for good, with the error of each of its tries (kubearq.core.failedjobs).

- The error of each failed try goes into a small Redis hash per job (`try_errors_key`). The hash expires when ARQ's
  own try counter does. A job that then succeeds drops the hash in the round trip of its completion.
- A final failure is written, as a record, into the Redis hash of failures waiting to be stored (`pending_key`).
  A job that ran writes it in the same round trip as ARQ's completion (`on_finish`). A job that fails without
  running writes it before ARQ removes the job. If the worker dies in between, the job runs or fails again and
  writes the same record: records are keyed by job id, and the store makes a second write a no-op.
- A background task moves the records into the store in batches (PostgreSQL with DATABASE_URL, else the capped
  Redis store). It deletes a record only if nobody changed it since it was read. While PostgreSQL is down the
  records wait in Redis, and this worker or any other writes them once it is back. Closing, it stores what is
  waiting in one last round (unless PostgreSQL is down then).
- The same task prunes the jobs older than FAILED_JOBS_RETENTION_DAYS in batches. Only one worker does it per
  `prune_interval`: the one that sets a Redis key with that lifetime.
- Worker pools sharing a Redis may keep failed jobs in different places (one with DATABASE_URL, one without, or
  two databases): the pending hash and the pruning key are per place, so each record goes where its worker's
  settings say and each place is pruned.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import socket
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from urllib.parse import urlsplit

from arq.connections import ArqRedis
from pydantic import ValidationError

from kubearq.core.aio import stop_task, wait_or_timeout
from kubearq.core.connections import TRANSIENT_ERRORS
from kubearq.core.contract import CURRENT_ORIGIN, Origin, deserialize, origin_of
from kubearq.core.failedjobs import FailedJob, FailedJobStore, FailureReason, TryError, clean_error, redriven_from
from kubearq.core.failedjobstores import PostgresFailedJobs, RedisFailedJobs
from kubearq.worker.metrics import WorkerMetrics
from kubearq.worker.settings import WorkerSettings
from kubearq.worker.storage import Backoff, Storage, StorageError, StorageUnavailableError

logger = logging.getLogger(__name__)

TRY_ERRORS_PREFIX = "kubearq:try-errors:"
TRY_ERRORS_SECONDS = 88_400  # the lifetime of ARQ's try counter (arq:retry:<id>): after it the try count is gone too
PENDING_PREFIX = "kubearq:failed-jobs:pending:"
PRUNE_GATE_PREFIX = "kubearq:failed-jobs:pruning:"
FLUSH_BATCH = 500
FLUSH_INTERVAL = 2.0  # also picks up what other workers left (one that died before storing its records)
PRUNE_INTERVAL = 600.0
DATABASE_CONNECT_TIMEOUT = 5.0  # per attempt of the background task; it tries again with backoff

# On completion: KEYS pending hash, the job's try errors; ARGV job id, record.
KEEP_FAILED = "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) redis.call('DEL', KEYS[2])"
FORGET_TRIES = "redis.call('DEL', KEYS[1])"
# KEYS pending hash; ARGV pairs of job id, record as read: delete each that is still what was read.
_STORED = """
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then redis.call('HDEL', KEYS[1], ARGV[i]) end
end
"""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_OUTAGES: tuple[type[Exception], ...] = (StorageUnavailableError, *TRANSIENT_ERRORS)
_RETRIED: tuple[type[Exception], ...] = (StorageError, *TRANSIENT_ERRORS)


def try_errors_key(job_id: str) -> str:
    """Hash: try number → the try's error (a `TryError` as JSON), for a job that may still fail for good."""
    return TRY_ERRORS_PREFIX + job_id


def describe(error: BaseException, timeout: float | None = None) -> str:
    """`Type: message`; a bare timeout says how long the try was allowed."""
    if isinstance(error, TimeoutError) and not str(error) and timeout is not None:
        return f"TimeoutError: the try took longer than {timeout:g} s"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def keeping_place(database_url: str | None) -> str:
    """Where a worker keeps failed jobs, as a key suffix: `redis`, or `pg:` and a digest of the database's host, port
    and name (not the URL: it may hold a password)."""
    if database_url is None:
        return "redis"
    parts = urlsplit(database_url)
    database = parts.path.lstrip("/") or parts.username or ""
    where = f"{parts.hostname or ''}:{parts.port or 5432}/{database}"
    return "pg:" + hashlib.sha256(where.encode()).hexdigest()[:16]


def pending_key(database_url: str | None) -> str:
    """Hash: job id → the record (a `FailedJob` as JSON) of a job failed for good, waiting to be stored."""
    return PENDING_PREFIX + keeping_place(database_url)


def prune_gate_key(database_url: str | None) -> str:
    """Set (NX, with the prune interval as its lifetime) by the worker that prunes that place now."""
    return PRUNE_GATE_PREFIX + keeping_place(database_url)


def worker_identity(settings: WorkerSettings) -> str:
    return settings.pod_name or socket.gethostname()


def enqueue_time(milliseconds: int | float | None) -> datetime | None:
    """The enqueue time of ARQ's payload (`et`, ms) as kept: the same instant whichever path reads it."""
    return _EPOCH + timedelta(milliseconds=round(milliseconds)) if milliseconds else None


def unrun_failure(result_data: bytes | None) -> tuple[FailureReason, str, int] | None:
    """Why ARQ failed a decodable job without running it, its error and the tries it ran, from ARQ's result;
    None for an abort (the user's decision, not a failure)."""
    if result_data is None:  # ARQ could not serialize its result
        return FailureReason.FAILED, "the job failed and ARQ could not serialize why", 0
    result = deserialize(result_data)
    value = result.get("r")
    kind = value.get("type") if isinstance(value, dict) else None
    error = str(value.get("error")) if isinstance(value, dict) and "error" in value else str(value)
    job_try = result.get("t")
    ran = max(0, job_try - 1) if isinstance(job_try, int) else 0
    if kind == "CancelledError":
        return None
    if "retries exceeded" in error:
        return FailureReason.OUT_OF_TRIES, error, ran
    if "not found" in error:
        return FailureReason.FUNCTION_NOT_SERVED, error, ran
    return FailureReason.FAILED, error, ran


class FailureKeeper:
    """One worker's part: note failed tries, record final failures, store and prune them in the background."""

    def __init__(self, settings: WorkerSettings, redis: ArqRedis, metrics: WorkerMetrics, *,
                 flush_interval: float = FLUSH_INTERVAL, prune_interval: float = PRUNE_INTERVAL) -> None:
        self._redis = redis
        self._metrics = metrics
        self._queue = settings.queue
        self._worker = worker_identity(settings)
        self._retention = timedelta(days=settings.failed_jobs_retention_days)
        self._allow_newer_schema = settings.allow_newer_schema
        self._flush_interval = flush_interval
        self._prune_interval = prune_interval
        self._storage: Storage | None = None
        self.store: FailedJobStore
        if settings.database_url is not None:
            self._storage = Storage(settings.database_url, connect_timeout=DATABASE_CONNECT_TIMEOUT, max_connections=2)
            self.store = PostgresFailedJobs(self._storage.connection, redis)
        else:
            self.store = RedisFailedJobs(redis, settings.failed_jobs_redis_cap)
        self._migrated = self._storage is None
        self.pending_key = pending_key(settings.database_url)
        self._prune_gate_key = prune_gate_key(settings.database_url)
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random()  # noqa: S311 - jitter, not secrets

    # --- in the job's task -------------------------------------------------------------------------------

    async def note_try(self, ctx: Mapping[str, Any], error: str) -> None:
        """Keep the error of a try that will be retried."""
        job_id, job_try = str(ctx["job_id"]), int(ctx["job_try"])
        entry = TryError(job_try=job_try, error=clean_error(error), at=datetime.now(UTC))
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hset(try_errors_key(job_id), str(job_try), entry.model_dump_json())
                pipe.expire(try_errors_key(job_id), TRY_ERRORS_SECONDS)
                await pipe.execute()
        except TRANSIENT_ERRORS as lost:
            self._metrics.errors.labels("failed_jobs").inc()
            logger.warning("could not keep the error of try %d (Redis: %s); its record will lack it", job_try, lost)

    async def final_failure(self, ctx: Mapping[str, Any], function: str, args: Sequence[object],
                            kwargs: Mapping[str, object], reason: FailureReason, error: str
                            ) -> tuple[list[str], list[str]]:
        """KEYS and ARGV for KEEP_FAILED, which keeps this job as failed for good: run it with ARQ's completion."""
        job_id, job_try = str(ctx["job_id"]), int(ctx["job_try"])
        now = datetime.now(UTC)
        enqueued = ctx.get("enqueue_time")
        record = FailedJob(
            job_id=job_id, function=function, args=cast(Any, list(args)), kwargs=cast(Any, dict(kwargs)),
            queue=self._queue, reason=reason, error=clean_error(error), tries=job_try,
            try_errors=[*await self._earlier_tries(job_id, job_try),
                        TryError(job_try=job_try, error=clean_error(error), at=now)],
            origin=CURRENT_ORIGIN.get(), worker=self._worker,
            enqueued_at=enqueue_time(enqueued.timestamp() * 1000) if isinstance(enqueued, datetime) else None,
            failed_at=now, redrive_of=redriven_from(job_id))
        return [self.pending_key, try_errors_key(job_id)], [job_id, record.model_dump_json()]

    # --- in the worker's finish_failed_job -----------------------------------------------------------------

    async def keep_unrun(self, job_id: str, job: Mapping[str, object] | None, result_data: bytes | None, *,
                         reason: FailureReason | None = None, error: str | None = None,
                         dead_letter_key: str | None = None) -> None:
        """Keep a job ARQ fails without running it: `reason` and `error` when the worker knows them (refused,
        undecodable), else read from ARQ's result (out of tries, function not served; an abort is not kept)."""
        known = unrun_failure(result_data)
        if known is None and reason is None:
            return
        read_reason, read_error, ran = known or (FailureReason.FAILED, "", 0)
        payload = job or {}
        args, kwargs = payload.get("a"), payload.get("k")
        enqueued = payload.get("et")
        origin: Origin | None = origin_of(dict(payload)) if job is not None else None
        record = FailedJob(
            job_id=job_id, function=str(payload.get("f", "undecodable")),
            args=cast(Any, args if isinstance(args, list) else []),
            kwargs=cast(Any, kwargs if isinstance(kwargs, dict) else {}), queue=self._queue,
            reason=reason or read_reason, error=clean_error(error or read_error), tries=ran,
            try_errors=await self._earlier_tries(job_id, ran + 1), origin=origin, worker=self._worker,
            enqueued_at=enqueue_time(enqueued) if isinstance(enqueued, int | float) else None,
            failed_at=datetime.now(UTC), dead_letter_key=dead_letter_key, redrive_of=redriven_from(job_id))
        await self._redis.eval(KEEP_FAILED, 2, self.pending_key, try_errors_key(job_id),  # type: ignore[misc]
                               job_id, record.model_dump_json())
        self.wake()

    async def _earlier_tries(self, job_id: str, before: int) -> list[TryError]:
        try:
            noted: dict[bytes, bytes] = await self._redis.hgetall(try_errors_key(job_id))  # type: ignore[misc]
        except TRANSIENT_ERRORS as lost:
            self._metrics.errors.labels("failed_jobs").inc()
            logger.warning("could not read the errors of the earlier tries (Redis: %s); the record lacks them", lost)
            return []
        tries = []
        for number, entry in noted.items():
            try:
                tries.append(TryError.model_validate_json(entry))
            except ValidationError as unreadable:  # written by this module: a bug, but not worth the job's own error
                self._metrics.errors.labels("failed_jobs").inc()
                logger.error("unreadable error of try %s of %s: %r (%s)", number.decode(), job_id, entry, unreadable)
        return sorted((entry for entry in tries if entry.job_try < before), key=lambda entry: entry.job_try)

    # --- in the background -------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="kubearq-failed-jobs")

    def wake(self) -> None:
        """A record is waiting: store it now rather than at the next interval."""
        self._wake.set()

    async def run(self) -> None:
        """Until `close`, and one last round then: store the records waiting in Redis, prune now and then; wait out
        outages with backoff."""
        backoff = Backoff(0.5, 10.0)
        attempt = 0
        next_prune = 0.0
        while True:
            self._wake.clear()
            try:
                await self._connected()
                await self.flush()
                if time.monotonic() >= next_prune:
                    await self.prune()
                    next_prune = time.monotonic() + self._prune_interval
            except Exception as error:  # this task must outlive every round: each error is logged and counted
                self._metrics.errors.labels("failed_jobs").inc()
                if self._closing.is_set():
                    logger.warning("failed jobs left waiting in Redis (%s) at shutdown, for any worker to store: "
                                   "%s: %s", self.pending_key, type(error).__name__, error)
                    return
                delay = backoff.delay(attempt, self._rng)
                attempt += 1
                if isinstance(error, _OUTAGES):
                    logger.warning("failed jobs wait in Redis (%s) to be stored: %s: %s; trying again in %.1fs",
                                   self.pending_key, type(error).__name__, error, delay)
                elif isinstance(error, _RETRIED):  # a wrong DATABASE_URL, a schema too new: an operator may fix it
                    logger.error("failed jobs wait in Redis (%s) to be stored: %s: %s; trying again in %.1fs",
                                 self.pending_key, type(error).__name__, error, delay)
                else:  # a bug (ours): with its traceback, but the records stay in Redis and are tried again
                    logger.exception("failed jobs wait in Redis (%s): storing them failed; trying again in %.1fs",
                                     self.pending_key, delay)
                await wait_or_timeout(self._closing, delay)  # not woken by new records: an outage is waited out
                if self._closing.is_set():  # in an outage: no last round, the records stay for any worker
                    return
                continue
            attempt = 0
            if self._closing.is_set():
                return
            await wait_or_timeout(self._wake, self._flush_interval)

    async def _connected(self) -> None:
        if self._migrated or self._storage is None:
            return
        await self._storage.connect()
        await self._storage.migrate(allow_newer_schema=self._allow_newer_schema)
        self._migrated = True

    async def flush(self) -> int:
        """Store every record waiting in Redis; return how many were stored."""
        stored, cursor = 0, 0
        while True:
            cursor, entries = await self._redis.hscan(self.pending_key, cursor, count=FLUSH_BATCH)
            if entries:
                jobs = []
                for job_id, record in entries.items():
                    try:
                        jobs.append(FailedJob.model_validate_json(record))
                    except ValidationError as unreadable:  # a bug: say so and drop it, or it blocks every later one
                        self._metrics.errors.labels("failed_jobs").inc()
                        logger.error("dropping the unreadable failed-job record of %s: %r (%s)", job_id.decode(),
                                     record[:2000], unreadable)
                await self.store.record(jobs)
                read = [part for pair in entries.items() for part in pair]
                await self._redis.eval(_STORED, 1, self.pending_key, *read)  # type: ignore[misc]
                stored += len(jobs)
            if int(cursor) == 0:
                return stored

    async def prune(self) -> int:
        """Remove the jobs kept longer than the retention, if no other worker did in this interval."""
        gate = await self._redis.set(self._prune_gate_key, self._worker, nx=True,
                                     px=int(self._prune_interval * 1000))
        if not gate:
            return 0
        removed = await self.store.prune(datetime.now(UTC) - self._retention)
        if removed:
            logger.info("pruned %d failed jobs kept longer than %g days", removed, self._retention / timedelta(days=1))
        return removed

    async def close(self) -> None:
        """Stop the background task (letting a round finish, briefly) and close the PostgreSQL pool."""
        self._closing.set()
        self._wake.set()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=5)
            await stop_task(self._task, 10, "keeping failed jobs")
        if self._storage is not None:
            await self._storage.close()
