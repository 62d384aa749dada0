"""ARQ's Worker with what a Kubernetes Deployment needs.

What ARQ alone does, and what changes here:
- It reads the queue every `poll_delay` only; here a worker that started jobs reads again at once and a
  freed slot wakes it, so no-op throughput is not capped at max_jobs / poll_delay.
- It retries only on `Retry`; here any exception (and a per-try timeout) retries with exponential
  backoff and jitter until the last try, whose error is kept as the result.
- A killed worker's job waits for its in-progress key (largest timeout + 10 s, 310 s by default); here
  a heartbeat keeps that key short-lived, so an orphan runs again within `in_progress_ttl`.
- On SIGTERM it cancels running jobs and charges them a try; here it stops taking jobs, lets running
  ones finish within the grace period and puts the rest back at once with the try refunded.
- A job it cannot decode is failed and deleted; here its raw bytes are kept under a dead-letter key.
- It runs any job it can decode; here, with ALLOWED_NAMESPACES, a job whose origin (the namespace and resource
  it was enqueued for) is not one of those namespaces is refused before it runs: failed, kept, not retried.
  The origin of the running job is `CURRENT_ORIGIN`, and the jobs it enqueues carry it on.
- A Redis outage ends its main loop; here the loop logs, counts and reconnects with backoff.
- A failed job's result is gone after keep_result; here every job that fails for good is kept with each try's
  error, to re-drive or discard (kubearq.worker.failures, kubearq.core.failedjobs).
- ARQ's health check says only that some worker of a queue is alive; here each heartbeat also publishes this
  worker's record (identity, functions, jobs in flight) for the dashboard (kubearq.core.workers).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from arq.jobs import Job
from arq.typing import StartupShutdown
from arq.worker import Function, Retry, Worker
from redis.commands.core import AsyncScript

from kubearq.core.aio import stop_task, wait_or_timeout
from kubearq.core.connections import TRANSIENT_ERRORS
from kubearq.core.contract import (
    CURRENT_ORIGIN,
    deserialize,
    function_registry_key,
    origin_of,
    serialize,
    undecodable_job,
)
from kubearq.core.failedjobs import FailureReason
from kubearq.core.observability import log_context
from kubearq.core.workers import WorkerBeat, publish, withdraw, worker_id_of
from kubearq.worker.admission import JobRefused, origin_fields, refusal, refused_result, stamp_current_origin
from kubearq.worker.failures import FORGET_TRIES, KEEP_FAILED, FailureKeeper, describe, try_errors_key, worker_identity
from kubearq.worker.metrics import WorkerMetrics
from kubearq.worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

# Claim up to ARGV[4] of the given ids: those not in progress, still on the queue and due (ARQ's rule).
_CLAIM = """
local queue, prefix, ttl, now, free = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local claimed = {}
for i = 5, #ARGV do
  if #claimed >= 2 * free then break end
  local id = ARGV[i]
  if redis.call('EXISTS', prefix .. id) == 0 then
    local score = redis.call('ZSCORE', queue, id)
    if score and tonumber(score) <= now then
      redis.call('PSETEX', prefix .. id, ttl, '1')
      claimed[#claimed + 1] = id
      claimed[#claimed + 1] = score
    end
  end
end
return claimed
"""

# ARQ's finish_job (a MULTI of up to six commands) as one script; the same keys, the same effects.
# KEYS: in-progress mark, result, retry count, job, abort set, queue.
# ARGV: job id, finish (1|0), result ('' for none), result lifetime ms ('' for none), score increment
# ('' for none), keep the in-progress mark this many ms ('' to delete it).
_FINISH_JOB = """
if ARGV[6] == '' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[6]) end
if ARGV[2] == '1' then
  if ARGV[3] ~= '' then
    if ARGV[4] == '' then redis.call('SET', KEYS[2], ARGV[3])
    else redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4]) end
  end
  redis.call('DEL', KEYS[3], KEYS[4])
  redis.call('ZREM', KEYS[5], ARGV[1])
  redis.call('ZREM', KEYS[6], ARGV[1])
elseif ARGV[5] ~= '' then
  redis.call('ZINCRBY', KEYS[6], ARGV[5], ARGV[1])
end
"""
ON_FINISH = "kubearq_on_finish"
"""Where the job context holds `OnFinish`: see `on_finish`."""

DEAD_LETTER_PREFIX = "kubearq:dead-letter:"
DEAD_LETTER_SECONDS = 7 * 86_400
FUNCTION_REGISTRY_SECONDS = 120
# A retry key must not go below zero when a try is refunded twice (e.g. deferred, then requeued).
REFUND_TRY = "local n = tonumber(redis.call('GET', KEYS[1]) or '0') if n > 0 then redis.call('DECR', KEYS[1]) end"
JobCoroutine = Callable[..., Awaitable[object]]


class Defer(Exception):  # noqa: N818 - an instruction, not an error
    """Raised by a job: run it again after `seconds`, without spending a try or holding a slot meanwhile.

    For waits that are not failures: a rate limit's next token, a backend asking to come back later.
    """

    def __init__(self, seconds: float, reason: str) -> None:
        super().__init__(f"deferred {seconds:.3f}s: {reason}")
        self.seconds = max(0.0, seconds)
        self.reason = reason


class GiveUp(Exception):  # noqa: N818 - an instruction, not an error
    """Raised by a job: fail for good now, without the tries left (retrying cannot help: bad input, a revoked
    token). The job's ARQ result keeps `reason`; the job has recorded whatever the user needs to see."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with equal jitter: try n waits between half and all of base·2ⁿ⁻¹ (capped)."""

    base: float
    cap: float

    def delay(self, job_try: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.cap, self.base * (1 << min(30, max(0, job_try - 1))))
        uniform = rng.uniform if rng else random.uniform
        return ceiling / 2 + uniform(0, ceiling / 2)


@dataclass(frozen=True)
class FinishScript:
    """A Lua script to run in the same round trip as the job's completion."""

    script: str
    keys: Sequence[str]
    args: Sequence[str | int | float]


OnFinish = dict[str, list[FinishScript]]


def on_finish(ctx: dict[str, Any], script: FinishScript) -> None:
    """Run `script` when this job completes (returns or fails for good), in one round trip with ARQ's own
    completion; dropped if the job retries, is deferred or is cancelled.

    Scripts are sent before the completion: if the worker dies between the two, the job runs again, so a
    script must be idempotent per job id. Only a KubearqWorker runs them (RuntimeError elsewhere).
    """
    pending: OnFinish | None = ctx.get(ON_FINISH)
    if pending is None:
        raise RuntimeError("on_finish needs the kubearq worker's job context")
    pending.setdefault(str(ctx["job_id"]), []).append(script)


def per_try_timeout(base: float, job_try: int) -> float:
    """Each retry gets twice the time of the try before, up to four times the base."""
    return base * min(4, 1 << min(2, max(0, job_try - 1)))


async def refund_try(redis: ArqRedis, job_id: str) -> None:
    """Undo ARQ's try count for a run that was not a real try (a deferral, a shutdown)."""
    await redis.eval(REFUND_TRY, 1, retry_key_prefix + job_id)  # type: ignore[misc]


def supervised(function: Function, settings: WorkerSettings, metrics: WorkerMetrics, backoff: Backoff,
               failures: FailureKeeper) -> Function:
    """Wrap a job function with retries, per-try timeouts, deferral, metrics and log context; `failures` keeps each
    failed try's error and the jobs that fail for good."""
    base_timeout = function.timeout_s or settings.job_timeout
    max_tries = function.max_tries or settings.max_tries
    name = function.name

    # Metric children looked up once, not on every try (labels() is a dict lookup under a lock).
    started_total, in_flight = metrics.jobs_started.labels(name), metrics.jobs_in_flight.labels(name)
    succeeded, failed = metrics.jobs_succeeded.labels(name), metrics.jobs_failed.labels(name)
    retried, deferred = metrics.jobs_retried.labels(name), metrics.jobs_deferred.labels(name)
    duration = metrics.job_duration.labels(name)

    async def run(ctx: dict[str, Any], *args: object, **kwargs: object) -> object:
        job_id, job_try = str(ctx["job_id"]), int(ctx["job_try"])

        async def keep(reason: FailureReason, error: str) -> None:  # as failed for good, when ARQ completes the job
            on_finish(ctx, FinishScript(KEEP_FAILED, *await failures.final_failure(ctx, name, args, kwargs, reason,
                                                                                   error)))

        with log_context(job_id=job_id, function=name, **origin_fields(CURRENT_ORIGIN.get())):
            started_total.inc()
            in_flight.inc()
            started = time.monotonic()
            try:
                async with asyncio.timeout(per_try_timeout(base_timeout, job_try)):
                    result = await function.coroutine(ctx, *args, **kwargs)
            except Defer as defer:
                await refund_try(ctx["redis"], job_id)
                deferred.inc()
                logger.info("deferred by %.3fs: %s", defer.seconds, defer.reason)
                raise Retry(defer=defer.seconds) from None
            except Retry as retry:
                retried.inc()
                await failures.note_try(ctx, f"Retry: asked for by the job ({retry})")
                raise
            except GiveUp as give_up:
                failed.inc()
                logger.error("failed on try %d of %d, not retried: %s", job_try, max_tries, give_up.reason)
                await keep(FailureReason.GAVE_UP, f"GiveUp: {give_up.reason}")
                raise
            except asyncio.CancelledError:
                raise  # shutdown or abort: counted by the worker, which knows which it was
            except Exception as error:
                timeout = per_try_timeout(base_timeout, job_try)
                if job_try >= max_tries:
                    failed.inc()
                    logger.error("failed on try %d of %d: %s: %s", job_try, max_tries, type(error).__name__, error)
                    await keep(FailureReason.FAILED, describe(error, timeout))
                    raise
                await failures.note_try(ctx, describe(error, timeout))
                delay = backoff.delay(job_try)
                retried.inc()
                logger.warning("try %d of %d failed, retrying in %.2fs: %s: %s",
                               job_try, max_tries, delay, type(error).__name__, error)
                raise Retry(defer=delay) from error
            else:
                succeeded.inc()
                if job_try > 1:  # its failed tries' errors are kept no longer
                    on_finish(ctx, FinishScript(FORGET_TRIES, [try_errors_key(job_id)], []))
                return result
            finally:
                duration.observe(time.monotonic() - started)
                in_flight.dec()

    return Function(
        name=name,
        coroutine=cast(Any, run),
        # ARQ's own timeout only backs ours up: the per-try timeout above fires first and is retried.
        timeout_s=per_try_timeout(base_timeout, max_tries) + 10,
        keep_result_s=function.keep_result_s,
        keep_result_forever=function.keep_result_forever,
        # One more than ours: our last try raises its error, ARQ must not refuse that try beforehand.
        max_tries=max_tries + 1,
    )


class QuietUndecodableJobs(logging.Filter):
    """Drops ARQ's ERROR traceback for a job it cannot decode or refuses: `finish_failed_job` says in one WARNING
    line what the job looks like and how to enqueue it right (ARQ's traceback only shows a UnicodeDecodeError)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "deserializing job %s failed"


class KubearqWorker(Worker):
    """An ARQ worker that drains on shutdown, heals after crashes and keeps polling through outages."""

    def __init__(
        self,
        settings: WorkerSettings,
        functions: Sequence[Function],
        *,
        redis: ArqRedis,
        metrics: WorkerMetrics,
        ctx: dict[str, Any] | None = None,
        on_startup: StartupShutdown | None = None,
        on_shutdown: StartupShutdown | None = None,
    ) -> None:
        backoff = Backoff(settings.retry_backoff, settings.retry_backoff_max)
        self._namespaces_allowed = settings.namespaces_allowed
        self.failures = FailureKeeper(settings, redis, metrics)
        super().__init__(
            [supervised(function, settings, metrics, backoff, self.failures) for function in functions],
            queue_name=settings.queue,
            redis_pool=redis,
            handle_signals=False,  # the caller owns signals and calls drain()
            max_jobs=settings.max_jobs,
            job_timeout=settings.job_timeout,
            keep_result=settings.keep_result,
            poll_delay=settings.poll_delay,
            queue_read_limit=settings.read_limit,
            max_tries=settings.max_tries + 1,
            health_check_interval=settings.health_check_interval,
            job_serializer=serialize,
            job_deserializer=self._decode_job,
            retry_jobs=True,
            allow_abort_jobs=True,
            ctx=ctx,
            on_startup=on_startup,
            on_shutdown=on_shutdown,
            log_results=False,
        )
        self.settings = settings
        self.metrics = metrics
        # ARQ's ArqRedis serializes in the caller's task, so this reads the origin of the job that enqueues.
        redis.job_serializer = stamp_current_origin
        arq_logger = logging.getLogger("arq.worker")
        if not any(isinstance(existing, QuietUndecodableJobs) for existing in arq_logger.filters):
            arq_logger.addFilter(QuietUndecodableJobs())
        # Heartbeats refresh the mark; a dead worker's mark expires after this, not after the job timeout.
        self.in_progress_timeout_s = settings.in_progress_ttl
        self._slot_freed = asyncio.Event()
        self._started_last_poll = 0
        self._draining: set[str] = set()
        self._claim: AsyncScript | None = None
        self._last_abort_check = 0.0
        self._stopping = False
        self._closing = asyncio.Event()
        self._heartbeat: asyncio.Task[None] | None = None
        self._on_finish: OnFinish = {}
        self.ctx[ON_FINISH] = self._on_finish
        self.redis_available = True
        self.identity = worker_identity(settings)
        self.instance = secrets.token_hex(4)  # two processes of one identity are two workers
        self.started_at = time.time()
        self._last_beat = (self.started_at, 0)  # (time, jobs finished) at the last heartbeat: its throughput

    # --- decoding -------------------------------------------------------------------------------------

    def _decode_job(self, data: bytes) -> dict[str, object]:
        """ARQ's `job_deserializer`, called in the job's own task right before its function: notes the job's origin
        as `CURRENT_ORIGIN` (the function's task, created next, copies this context) and refuses a job that
        ALLOWED_NAMESPACES excludes (ARQ then fails it through `finish_failed_job`, which says why)."""
        job = deserialize(data)
        CURRENT_ORIGIN.set(origin_of(job))
        refused = refusal(job, self._namespaces_allowed)
        if refused is not None:
            raise JobRefused(refused)
        return job

    # --- polling -------------------------------------------------------------------------------------

    async def main(self) -> None:
        self.ctx["redis"] = self.pool
        self.failures.start()
        if self.on_startup:
            await self.on_startup(self.ctx)
        logger.info("serving %d functions on %s: %s", len(self.functions), self.queue_name, ", ".join(self.functions))
        if self._namespaces_allowed:
            logger.info("running only jobs from the namespaces %s (ALLOWED_NAMESPACES)",
                        ", ".join(sorted(self._namespaces_allowed)))
        # The heartbeat outlives the poll loop: jobs finishing during a drain keep their marks fresh.
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="kubearq-heartbeat")
        outage_backoff = Backoff(0.1, 5.0)
        failures = 0
        while not self._stopping:
            try:
                await self._poll_iteration()
            except TRANSIENT_ERRORS as error:
                failures += 1
                self.redis_available = False
                self.metrics.errors.labels("poll").inc()
                delay = outage_backoff.delay(failures)
                logger.warning("Redis unavailable (%s: %s); polling again in %.2fs",
                               type(error).__name__, error, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            self.redis_available = True
            if self._started_last_poll and self.job_counter < self.max_jobs:
                await asyncio.sleep(0)  # work is waiting: read again at once
            else:
                await self._idle()

    async def _idle(self) -> None:
        """Wait for a freed slot or the poll delay, whichever comes first."""
        self._slot_freed.clear()
        await wait_or_timeout(self._slot_freed, self.poll_delay_s)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        # ARQ claims each due id with WATCH, EXISTS, ZSCORE and MULTI/EXEC — four round trips per job, one
        # job after the other: starting jobs capped a worker at a few hundred a second whatever max_jobs.
        # One script claims as many as there are free slots, under the same rule (not in progress, still
        # queued, due), and marks them in progress exactly as ARQ does.
        candidates = [job_id for job_id in (raw.decode() for raw in job_ids) if job_id not in self.tasks]
        free = self.max_jobs - self.job_counter
        self._started_last_poll = 0
        if not candidates or free <= 0:
            return
        if self._claim is None:  # registered once: the worker polls continuously while busy
            self._claim = self.pool.register_script(_CLAIM)
        reply = cast(list[bytes], await self._claim(
            keys=[self.queue_name],
            args=[in_progress_key_prefix, int(self.in_progress_timeout_s * 1000), int(time.time() * 1000), free,
                  *candidates]))
        for job_id_b, score in zip(reply[::2], reply[1::2], strict=True):
            job_id = job_id_b.decode()
            await self.sem.acquire()  # free: slots and the semaphore move together
            self.job_counter += 1
            task = self.loop.create_task(self.run_job(job_id, int(float(score))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task
        self._started_last_poll = len(reply) // 2

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._slot_freed.set()

    async def _cancel_aborted_jobs(self) -> None:
        # ARQ checks for aborts on every poll; a busy worker polls continuously, so check twice a second.
        now = time.monotonic()
        if now - self._last_abort_check >= 0.5:
            self._last_abort_check = now
            await super()._cancel_aborted_jobs()

    # --- crash recovery --------------------------------------------------------------------------------

    def beat(self, now: float) -> WorkerBeat:
        """This worker as its heartbeat at `now` publishes it (kubearq.core.workers), its throughput measured since
        the heartbeat before."""
        finished = self.jobs_complete + self.jobs_failed
        since, finished_then = self._last_beat
        per_minute = (finished - finished_then) * 60 / (now - since) if now > since else 0.0
        self._last_beat = (now, finished)
        return WorkerBeat(
            identity=self.identity, instance=self.instance, queue=self.queue_name, functions=tuple(self.functions),
            in_flight=self.job_counter, max_jobs=self.max_jobs,
            running=tuple(job_id for job_id, task in self.tasks.items() if not task.done()),
            draining=self._stopping, beat_at=now, interval=self.settings.heartbeat_interval,
            started_at=self.started_at, finished=finished, per_minute=max(0.0, per_minute))

    async def _heartbeat_loop(self) -> None:
        registry = function_registry_key(self.queue_name)
        while not self._closing.is_set():
            try:
                async with self.pool.pipeline(transaction=False) as pipe:
                    ttl_ms = int(self.in_progress_timeout_s * 1000)
                    for job_id in list(self.tasks):
                        pipe.pexpire(in_progress_key_prefix + job_id, ttl_ms)
                    now = time.time()
                    pipe.hset(registry, mapping=dict.fromkeys(self.functions, int(now)))
                    pipe.expire(registry, FUNCTION_REGISTRY_SECONDS)
                    publish(pipe, self.beat(now))
                    await pipe.execute()
            except TRANSIENT_ERRORS as error:
                self.metrics.errors.labels("heartbeat").inc()
                if self.tasks:  # holding no job, a missed heartbeat costs nothing (the outage is logged apart)
                    logger.warning("heartbeat failed (%s: %s); in-progress marks may expire",
                                   type(error).__name__, error)
                else:
                    logger.debug("heartbeat failed (%s: %s)", type(error).__name__, error)
            await wait_or_timeout(self._closing, self.settings.heartbeat_interval)

    # --- completion -----------------------------------------------------------------------------------

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        # ARQ's completion as one script instead of a MULTI of six commands, with the scripts the job asked
        # for (`on_finish`) in the same round trip: a scrape page's progress cost a round trip of its own.
        scripts = self._on_finish.pop(job_id, [])
        expire = None if keep_result_forever or result_timeout_s is None else max(1, round(result_timeout_s * 1000))
        keys = [in_progress_key_prefix + job_id, result_key_prefix + job_id, retry_key_prefix + job_id,
                job_key_prefix + job_id, abort_jobs_ss, self.queue_name]
        args = [job_id, int(finish), result_data or b"", "" if expire is None else expire, incr_score or "",
                "" if keep_in_progress is None else max(1, round(keep_in_progress * 1000))]
        async with self.pool.pipeline(transaction=False) as pipe:
            for extra in scripts if finish else ():
                pipe.execute_command("EVAL", extra.script, len(extra.keys), *extra.keys, *extra.args)
            pipe.execute_command("EVAL", _FINISH_JOB, len(keys), *keys, *args)
            replies = await pipe.execute(raise_on_error=False)
        errors = [reply for reply in replies if isinstance(reply, Exception)]
        if errors:
            raise errors[-1]
        if any(extra.script == KEEP_FAILED for extra in scripts):
            self.failures.wake()

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        # ARQ calls this for a job that failed without running: undecodable, refused, expired, its function not
        # served, aborted before it started, out of tries. The supervisor never saw it: count it here.
        self._on_finish.pop(job_id, None)
        raw = await self.pool.get(job_key_prefix + job_id)
        function = "unknown"
        job: dict[str, object] | None = None
        reason, error = None, None
        if raw is not None:
            problem = undecodable_job(raw)
            if problem is None:
                job = deserialize(raw)
                function = str(job["f"])
                # The decoder refuses before anything else can fail the job: a refusable job was refused.
                refused = refusal(job, self._namespaces_allowed)
                if refused is not None:
                    await self.pool.set(DEAD_LETTER_PREFIX + job_id, raw, ex=DEAD_LETTER_SECONDS)
                    with log_context(job_id=job_id, function=function, **origin_fields(origin_of(job))):
                        logger.warning("job %s (%s) refused: %s; kept as %s%s", job_id, function, refused,
                                       DEAD_LETTER_PREFIX, job_id)
                    result_data = refused_result(result_data, job, refused)
                    reason, error = FailureReason.REFUSED, refused
            else:
                function = "undecodable"
                await self.pool.set(DEAD_LETTER_PREFIX + job_id, raw, ex=DEAD_LETTER_SECONDS)
                logger.warning("job %s cannot be run: %s; kept as %s%s", job_id, problem, DEAD_LETTER_PREFIX, job_id)
                reason, error = FailureReason.UNDECODABLE, problem
        self.metrics.jobs_failed.labels(function).inc()
        if raw is not None:  # an expired job left nothing to keep; kept before ARQ removes it (a crash: kept again)
            await self.failures.keep_unrun(job_id, job, result_data, reason=reason, error=error,
                                           dead_letter_key=DEAD_LETTER_PREFIX + job_id if reason else None)
        await super().finish_failed_job(job_id, result_data)

    # --- shutdown --------------------------------------------------------------------------------------

    async def drain(self, grace: float) -> list[str]:
        """Stop taking jobs, let running ones finish within `grace` s, put the rest back; returns their ids."""
        self.allow_pick_jobs = False
        self._stopping = True
        self._slot_freed.set()
        running = [task for task in self.tasks.values() if not task.done()]
        logger.info("draining: %d jobs running, %.1fs grace", len(running), grace)
        if running:
            await asyncio.wait(running, timeout=grace)
        unfinished = [job_id for job_id, task in self.tasks.items() if not task.done()]
        logger.debug("drain: %d jobs to put back", len(unfinished))
        for job_id in unfinished:
            self.tasks[job_id].cancel()
        await asyncio.gather(*(self.tasks[job_id] for job_id in unfinished), return_exceptions=True)
        # ARQ deleted their in-progress marks (so any worker may take them now) but counted a try each.
        for job_id in unfinished:
            await refund_try(self.pool, job_id)
            function = await self._function_of(job_id)
            self.metrics.jobs_requeued.labels(function).inc()
            logger.info("put back %s (%s) without spending a try", job_id, function)
        return unfinished

    async def close(self) -> None:
        """ARQ's close, with redis-py 5's `aclose` (ARQ calls the deprecated `close`)."""
        self._stopping = True
        self._closing.set()
        for task in self.tasks.values():
            task.cancel()
        if self._heartbeat is not None:
            await stop_task(self._heartbeat, 10, "the heartbeat")
        await self.failures.close()
        if self.main_task is not None:
            self.main_task.cancel()
        if not self._pool:
            return
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        logger.debug("removing the health-check key and this worker's record")
        try:
            async with self.pool.pipeline(transaction=False) as pipe:
                pipe.delete(self.health_check_key)
                withdraw(pipe, worker_id_of(self.identity, self.instance))
                await pipe.execute()
        except TRANSIENT_ERRORS as error:
            self.metrics.errors.labels("close").inc()
            logger.warning("could not remove the health-check key and this worker's record on close: %s", error)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        logger.debug("closing the Redis pool")
        await self.pool.aclose(close_connection_pool=True)
        self._pool = None

    async def _function_of(self, job_id: str) -> str:
        info = await Job(job_id, self.pool, _queue_name=self.queue_name, _deserializer=deserialize).info()
        return info.function if info else "<unknown>"
