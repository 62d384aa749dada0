"""The ARQ adapter shared by the operator and the worker: put jobs on a queue in bulk, read their state.

ARQ's `enqueue_job` costs a WATCH/MULTI round trip per job. Here one Lua script enqueues a chunk of jobs
atomically, keeping ARQ's own rule (a job id already held as a job or a result is refused) so that a
deterministic id makes a second enqueue of the same tick or page a no-op, and ARQ workers run the jobs
exactly as if `enqueue_job` had put them there. The script names ARQ's keys itself (not through KEYS):
fine on standalone and replicated Redis, which is all ARQ supports.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from redis.asyncio import Redis

from kubearq.core.contract import Origin, deserialize, job_serializer

CHUNK = 500  # jobs per script call: long scripts block Redis for every other client
DEFAULT_EXPIRES_MS = 86_400_000  # ARQ's expires_extra_ms: a job not started within a day expires

_ENQUEUE = """
local queue, counter, members = KEYS[1], KEYS[2], KEYS[3]
local expires, now, field, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local remember = tonumber(ARGV[5])
local count = 0
if counter ~= '' then count = tonumber(redis.call('HGET', counter, field) or '0') end
local added = {}
for i = 6, #ARGV, 3 do
  local id, score, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if cap >= 0 and count >= cap then break end
  if redis.call('EXISTS', 'arq:job:' .. id, 'arq:result:' .. id) == 0
     and (members == '' or redis.call('SISMEMBER', members, id) == 0)
     and (remember == 0 or redis.call('EXISTS', 'kubearq:enqueued:' .. id) == 0) then
    -- as ARQ: a deferred job expires a day after it was due, not a day after it was enqueued
    redis.call('PSETEX', 'arq:job:' .. id, expires + math.max(0, tonumber(score) - now), payload)
    redis.call('ZADD', queue, score, id)
    if members ~= '' then redis.call('SADD', members, id) end
    if remember > 0 then redis.call('SET', 'kubearq:enqueued:' .. id, '1', 'PX', remember) end
    count = count + 1
    added[#added + 1] = id
  end
end
if counter ~= '' and #added > 0 then redis.call('HINCRBY', counter, field, #added) end
return added
"""


@dataclass(frozen=True)
class NewJob:
    """A job to enqueue: its id decides whether it is new."""

    job_id: str
    function: str
    kwargs: Mapping[str, object]
    args: Sequence[object] = ()
    defer_until_ms: int | None = None
    origin: Origin | None = None  # the resource it is enqueued for (the worker pool may check it)


@dataclass(frozen=True)
class Tally:
    """Count what is added in `hash_key[field]`, stop at `cap`, remember the ids in the set `members_key`.

    Kept in the same script as the enqueue, so totals are exact and a cap (e.g. maxDetailPages) holds
    across workers enqueueing at once; a remembered id is never enqueued again (even after it finished
    and its result expired), and is what a deletion aborts.
    """

    hash_key: str
    field: str
    members_key: str
    cap: int | None = None


async def enqueue_many(
    redis: Redis, queue: str, jobs: Sequence[NewJob], *, expires_ms: int = DEFAULT_EXPIRES_MS,
    now_ms: int | None = None, tally: Tally | None = None, remember_ms: int = 0,
) -> list[str]:
    """Enqueue jobs whose ids are new; returns the ids added (duplicates are left out, not errors).

    With `remember_ms`, an id stays refused that long after it was enqueued, whatever became of the job
    and however briefly workers keep its result (exactly one run per schedule tick across failovers).
    """
    script = redis.register_script(_ENQUEUE)
    added: list[str] = []
    for start in range(0, len(jobs), CHUNK):
        now = now_ms if now_ms is not None else int(time.time() * 1000)  # per chunk: each job's enqueue time
        argv: list[bytes | str | int] = [
            expires_ms, now, tally.field if tally else "", -1 if tally is None or tally.cap is None else tally.cap,
            remember_ms]
        for job in jobs[start : start + CHUNK]:
            payload = serialize_job(job.function, tuple(job.args), dict(job.kwargs), None, now,
                                    serializer=job_serializer(job.origin))
            argv += [job.job_id, job.defer_until_ms or now, payload]
        keys = [queue, tally.hash_key if tally else "", tally.members_key if tally else ""]
        result = cast(list[bytes], await script(keys=keys, args=argv))
        added += [job_id.decode() for job_id in result]
    return added


class JobState(StrEnum):
    QUEUED = "Queued"
    DEFERRED = "Deferred"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    ABORTED = "Aborted"
    UNKNOWN = "Unknown"  # neither queued nor a result: expired, or its result is no longer kept


@dataclass(frozen=True)
class JobOutcome:
    state: JobState
    error: str | None = None
    finished_ms: int | None = None


async def job_outcomes(redis: Redis, queue: str, job_ids: Sequence[str], *, now_ms: int | None = None
                       ) -> dict[str, JobOutcome]:
    """The state of each job, read in pipelined round trips (CHUNK jobs each)."""
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    replies: list[Any] = []
    for start in range(0, len(job_ids), CHUNK):
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids[start : start + CHUNK]:
                pipe.get(result_key_prefix + job_id)
                pipe.exists(in_progress_key_prefix + job_id)
                pipe.zscore(queue, job_id)
                pipe.exists(job_key_prefix + job_id)
            replies += await pipe.execute()
    outcomes = {}
    for index, job_id in enumerate(job_ids):
        raw_result, running, score, queued = replies[4 * index : 4 * index + 4]
        outcomes[job_id] = _outcome(raw_result, bool(running), score, bool(queued), now)
    return outcomes


def _outcome(raw_result: bytes | None, running: bool, score: float | None, queued: bool, now: int) -> JobOutcome:
    if raw_result is not None:
        try:
            result = deserialize(raw_result)
        except ValueError as undecodable:
            return JobOutcome(JobState.FAILED, f"unreadable result: {undecodable}")
        finished = result.get("ft")
        finished_ms = finished if isinstance(finished, int) else None
        if result.get("s") is True:
            return JobOutcome(JobState.SUCCEEDED, finished_ms=finished_ms)
        value = result.get("r")
        error = str(value.get("error")) if isinstance(value, dict) and "error" in value else str(value)
        state = JobState.ABORTED if "CancelledError" in error else JobState.FAILED
        return JobOutcome(state, error[:1024], finished_ms)
    if running:
        return JobOutcome(JobState.RUNNING)
    if score is not None and queued:
        return JobOutcome(JobState.DEFERRED if score > now else JobState.QUEUED)
    return JobOutcome(JobState.UNKNOWN)


async def abort_jobs(redis: Redis, job_ids: Sequence[str]) -> None:
    """Ask workers to cancel these jobs (ARQ's abort: the `arq:abort` sorted set, read by every worker)."""
    if job_ids:
        now = int(time.time() * 1000)
        await redis.zadd("arq:abort", dict.fromkeys(job_ids, now))


async def remove_queued(redis: Redis, queue: str, job_ids: Sequence[str]) -> int:
    """Take jobs that have not started off the queue (their job keys go too); returns how many were queued."""
    removed = 0
    for start in range(0, len(job_ids), CHUNK):
        chunk = job_ids[start : start + CHUNK]
        async with redis.pipeline(transaction=True) as pipe:
            pipe.zrem(queue, *chunk)
            pipe.delete(*(job_key_prefix + job_id for job_id in chunk))
            count, _ = await pipe.execute()
        removed += int(count)
    return removed
