"""The two stores of kept failed jobs: PostgreSQL (the workers' DATABASE_URL) and, without it, a capped set in Redis.

The model, the filters, keyset cursors and the re-drive rules both follow are in kubearq.core.failedjobs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any, cast

from redis.asyncio import Redis

from kubearq.core.contract import Origin
from kubearq.core.failedjobs import (
    BATCH,
    DEFAULT_REDIS_CAP,
    REDIS_CAP_KEY,
    REDIS_JOB_PREFIX,
    REDIS_ORDER_KEY,
    FailedJob,
    FailedJobFilter,
    FailedJobStore,
    FailureReason,
    Keeping,
    Page,
    check_limit,
    clean_error,
    decode_cursor,
    encode_cursor,
    from_micros,
    json_text,
    to_micros,
)

# --- PostgreSQL -------------------------------------------------------------------------------------------------

Connect = Callable[[str], AbstractAsyncContextManager[Any]]
"""A pooled asyncpg connection for a named operation: `kubearq.worker.storage.Storage.connection`, or
`pool_connect(pool)` for a bare asyncpg pool."""

_COLUMNS = ("job_id, function, args::text AS args, kwargs::text AS kwargs, queue, reason, error, tries, "
            "try_errors::text AS try_errors, origin_namespace, origin_kind, origin_name, worker, enqueued_at, "
            "failed_at, dead_letter_key, redrive_of, redrive_count, redriven_as, redriven_at")
# A record written twice (a re-run after a crash, a second flush) changes nothing; a later failure of the same job
# id (enqueued again) replaces the row, keeping its redrive counter, so that its own re-drive gets a new id.
_UPSERT = """
INSERT INTO failed_jobs AS kept (job_id, function, args, kwargs, queue, reason, error, tries, try_errors,
                                 origin_namespace, origin_kind, origin_name, worker, enqueued_at, failed_at,
                                 dead_letter_key, redrive_of)
VALUES ($1, $2, $3::text::jsonb, $4::text::jsonb, $5, $6, $7, $8, $9::text::jsonb, $10, $11, $12, $13, $14, $15,
        $16, $17)
ON CONFLICT (job_id) DO UPDATE SET
    function = EXCLUDED.function, args = EXCLUDED.args, kwargs = EXCLUDED.kwargs, queue = EXCLUDED.queue,
    reason = EXCLUDED.reason, error = EXCLUDED.error, tries = EXCLUDED.tries, try_errors = EXCLUDED.try_errors,
    origin_namespace = EXCLUDED.origin_namespace, origin_kind = EXCLUDED.origin_kind,
    origin_name = EXCLUDED.origin_name, worker = EXCLUDED.worker, enqueued_at = EXCLUDED.enqueued_at,
    failed_at = EXCLUDED.failed_at, dead_letter_key = EXCLUDED.dead_letter_key, redrive_of = EXCLUDED.redrive_of,
    redriven_as = NULL, redriven_at = NULL
WHERE kept.redriven_as IS NULL OR kept.enqueued_at IS DISTINCT FROM EXCLUDED.enqueued_at
"""


def pool_connect(pool: Any) -> Connect:
    """`Connect` for a bare asyncpg pool (no outage handling of its own)."""
    def connect(operation: str) -> AbstractAsyncContextManager[Any]:
        return cast(AbstractAsyncContextManager[Any], pool.acquire())
    return connect


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def sql_filter(where: FailedJobFilter | None, after: str | None = None) -> tuple[str, list[object]]:
    """The WHERE clause (or '') and its parameters. Each filter leads an index with (failed_at, job_id) behind it,
    so that a page is a short index range scan, never an OFFSET."""
    clauses: list[str] = []
    params: list[object] = []

    def param(value: object) -> str:
        params.append(value)
        return f"${len(params)}"

    if where is not None:
        for column, wanted in (("function", where.function), ("queue", where.queue),
                               ("origin_namespace", where.namespace), ("origin_kind", where.kind),
                               ("origin_name", where.name)):
            if wanted is not None:
                clauses.append(f"{column} = {param(wanted)}")
        if where.error is not None:
            clauses.append(f"error ILIKE {param(_like(where.error))}")
        if where.since is not None:
            clauses.append(f"failed_at >= {param(where.since)}")
        if where.redriven is not None:
            clauses.append("redriven_as IS NOT NULL" if where.redriven else "redriven_as IS NULL")
    if after is not None:
        micros, job_id = decode_cursor(after)
        clauses.append(f"(failed_at, job_id) < ({param(from_micros(micros))}, {param(job_id)})")
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _job_of_row(row: Mapping[str, Any]) -> FailedJob:
    namespace, kind, name = row["origin_namespace"], row["origin_kind"], row["origin_name"]
    return FailedJob(
        job_id=row["job_id"], function=row["function"], args=json.loads(row["args"]),
        kwargs=json.loads(row["kwargs"]), queue=row["queue"], reason=FailureReason(row["reason"]),
        error=row["error"], tries=row["tries"], try_errors=json.loads(row["try_errors"]),
        origin=Origin(namespace=namespace, kind=kind, name=name) if namespace is not None else None,
        worker=row["worker"], enqueued_at=row["enqueued_at"], failed_at=row["failed_at"],
        dead_letter_key=row["dead_letter_key"], redrive_of=row["redrive_of"], redrive_count=row["redrive_count"],
        redriven_as=row["redriven_as"], redriven_at=row["redriven_at"])


def _text(value: str | None) -> str | None:
    """Text as PostgreSQL keeps it: it refuses NUL, which a job written by hand may carry in its function name or
    origin; one such record would otherwise fail every later flush of the batch it is in."""
    return value.replace("\x00", "\ufffd") if value is not None else None


def _row_of_job(job: FailedJob) -> tuple[object, ...]:
    origin = job.origin
    return (_text(job.job_id), _text(job.function), json_text(job.args), json_text(job.kwargs), _text(job.queue),
            job.reason.value, clean_error(job.error), job.tries,
            json_text([{**item.model_dump(mode="json"), "error": clean_error(item.error)} for item in job.try_errors]),
            _text(origin.namespace) if origin else None, _text(origin.kind) if origin else None,
            _text(origin.name) if origin else None, _text(job.worker), job.enqueued_at, job.failed_at,
            _text(job.dead_letter_key), _text(job.redrive_of))


class PostgresFailedJobs(FailedJobStore):
    """Failed jobs in the `failed_jobs` table (worker migration 0003), all of them, for the retention."""

    def __init__(self, connect: Connect, redis: Redis) -> None:
        super().__init__(redis)
        self._connect = connect

    async def record(self, jobs: Sequence[FailedJob]) -> None:
        if not jobs:
            return
        async with self._connect("record_failed_jobs") as connection:
            await connection.executemany(_UPSERT, [_row_of_job(job) for job in jobs])

    async def get(self, job_id: str) -> FailedJob | None:
        found = await self._fetch([job_id])
        return found[0] if found else None

    async def page(self, where: FailedJobFilter | None = None, *, after: str | None = None, limit: int = 50) -> Page:
        check_limit(limit)
        clause, params = sql_filter(where, after)
        # Only constants and numbered placeholders go into the text; every value is a parameter.
        query = (f"SELECT {_COLUMNS} FROM failed_jobs{clause} ORDER BY failed_at DESC, job_id DESC "  # noqa: S608
                 f"LIMIT {limit + 1}")
        async with self._connect("page_failed_jobs") as connection:
            rows = await connection.fetch(query, *params)
        jobs = [_job_of_row(row) for row in rows[:limit]]
        return Page(jobs, encode_cursor(jobs[-1]) if len(rows) > limit else None, Keeping("PostgreSQL"))

    async def prune(self, before: datetime, *, batches: int = 20) -> int:
        removed = 0
        async with self._connect("prune_failed_jobs") as connection:
            for _ in range(batches):
                # Oldest first along the time index: each batch is a short range scan and a short transaction.
                status = await connection.execute(
                    """DELETE FROM failed_jobs WHERE job_id IN (
                           SELECT job_id FROM failed_jobs WHERE failed_at < $1 ORDER BY failed_at LIMIT $2)""",
                    before, BATCH)
                count = int(status.rpartition(" ")[2])
                removed += count
                if count < BATCH:
                    break
        return removed

    async def keeping(self) -> Keeping:
        return Keeping("PostgreSQL")

    async def _fetch(self, job_ids: Sequence[str]) -> list[FailedJob]:
        async with self._connect("get_failed_jobs") as connection:
            rows = await connection.fetch(f"SELECT {_COLUMNS} FROM failed_jobs WHERE job_id = ANY($1::text[])",  # noqa: S608
                                          list(job_ids))
        by_id = {row["job_id"]: _job_of_row(row) for row in rows}
        return [by_id[job_id] for job_id in job_ids if job_id in by_id]

    async def _delete(self, job_ids: Sequence[str]) -> int:
        async with self._connect("discard_failed_jobs") as connection:
            status = await connection.execute("DELETE FROM failed_jobs WHERE job_id = ANY($1::text[])", list(job_ids))
        return int(status.rpartition(" ")[2])

    async def _mark_redriven(self, marks: Sequence[tuple[FailedJob, str]]) -> None:
        async with self._connect("mark_redriven") as connection:
            await connection.execute(
                """UPDATE failed_jobs AS kept SET redrive_count = kept.redrive_count + 1, redriven_as = mark.new_id,
                                                  redriven_at = now()
                   FROM unnest($1::text[], $2::int[], $3::text[]) AS mark(job_id, redrive_count, new_id)
                   WHERE kept.job_id = mark.job_id AND kept.redrive_count = mark.redrive_count
                         AND kept.redriven_as IS NULL""",
                [job.job_id for job, _ in marks], [job.redrive_count for job, _ in marks],
                [new_id for _, new_id in marks])


# --- Redis (without DATABASE_URL) -------------------------------------------------------------------------------

# KEYS: the order set, the cap key. ARGV: cap, then per job: id, failed_at µs, record JSON, enqueued (µs or '').
# The same rule as the PostgreSQL upsert; then only the newest `cap` are kept. Per-job keys are named in the script
# (not in KEYS), as kubearq.core.queueing's scripts do: fine on standalone and replicated Redis.
_RECORD = """
local order, cap = KEYS[1], tonumber(ARGV[1])
for i = 2, #ARGV, 4 do
  local id, score, record, enqueued = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local key = '""" + REDIS_JOB_PREFIX + """' .. id
  local kept_enqueued = redis.call('HGET', key, 'enqueued')
  local redriven = redis.call('HGET', key, 'as')
  if not (kept_enqueued == enqueued and redriven and redriven ~= '') then
    redis.call('HSET', key, 'record', record, 'enqueued', enqueued, 'as', '', 'at', '')
    redis.call('HSETNX', key, 'count', '0')
    redis.call('ZADD', order, score, id)
  end
end
local excess = redis.call('ZCARD', order) - cap
if excess > 0 then
  for _, id in ipairs(redis.call('ZRANGE', order, 0, excess - 1)) do
    redis.call('DEL', '""" + REDIS_JOB_PREFIX + """' .. id)
  end
  redis.call('ZREMRANGEBYRANK', order, 0, excess - 1)
end
redis.call('SET', KEYS[2], cap)
"""
# ARGV: now µs, then per job: id, its redrive counter as read, the new id.
_MARK = """
for i = 2, #ARGV, 3 do
  local key = '""" + REDIS_JOB_PREFIX + """' .. ARGV[i]
  local redriven = redis.call('HGET', key, 'as')
  if redis.call('HGET', key, 'count') == ARGV[i + 1] and (redriven == '' or not redriven) then
    redis.call('HSET', key, 'count', tonumber(ARGV[i + 1]) + 1, 'as', ARGV[i + 2], 'at', ARGV[1])
  end
end
"""


class RedisFailedJobs(FailedJobStore):
    """Failed jobs in Redis, the newest `cap` of them: for workers without DATABASE_URL. Pages are filtered here,
    over at most `cap` jobs. A reader may leave `cap` unset: it shows the cap the workers keep to."""

    def __init__(self, redis: Redis, cap: int | None = None) -> None:
        super().__init__(redis)
        self._cap = cap

    async def record(self, jobs: Sequence[FailedJob]) -> None:
        if not jobs:
            return
        argv = [str(self._cap or DEFAULT_REDIS_CAP)]
        for job in jobs:
            state = job.model_dump(mode="json", exclude={"redrive_count", "redriven_as", "redriven_at"})
            argv += [job.job_id, str(to_micros(job.failed_at)), json_text(state),
                     str(to_micros(job.enqueued_at)) if job.enqueued_at else ""]
        await self.redis.eval(_RECORD, 2, REDIS_ORDER_KEY, REDIS_CAP_KEY, *argv)  # type: ignore[misc]

    async def get(self, job_id: str) -> FailedJob | None:
        found = await self._fetch([job_id])
        return found[0] if found else None

    async def page(self, where: FailedJobFilter | None = None, *, after: str | None = None, limit: int = 50) -> Page:
        check_limit(limit)
        # Equal scores are ordered by member, so the reverse range is (failed_at, job_id) descending, as in SQL.
        if after is None:
            ranked: list[tuple[bytes, float]] = await self.redis.zrevrange(REDIS_ORDER_KEY, 0, -1, withscores=True)
        else:
            micros, last_id = decode_cursor(after)
            ranked = await self.redis.zrevrangebyscore(REDIS_ORDER_KEY, micros, "-inf", withscores=True)
            ranked = [(member, score) for member, score in ranked
                      if int(score) < micros or member.decode() < last_id]
        matched: list[FailedJob] = []
        for start in range(0, len(ranked), 200):
            ids = [member.decode() for member, _ in ranked[start: start + 200]]
            matched += [job for job in await self._fetch(ids) if where is None or where.matches(job)]
            if len(matched) > limit:
                break
        jobs = matched[:limit]
        return Page(jobs, encode_cursor(jobs[-1]) if len(matched) > limit else None, await self.keeping())

    async def prune(self, before: datetime, *, batches: int = 20) -> int:
        removed = 0
        for _ in range(batches):
            old: list[bytes] = await self.redis.zrangebyscore(REDIS_ORDER_KEY, "-inf", f"({to_micros(before)}",
                                                              start=0, num=BATCH)
            if not old:
                break
            removed += await self._delete([member.decode() for member in old])
        return removed

    async def keeping(self) -> Keeping:
        cap = self._cap
        if cap is None:
            stored = await self.redis.get(REDIS_CAP_KEY)
            cap = int(stored) if stored is not None else DEFAULT_REDIS_CAP
        return Keeping("Redis", cap)

    async def _fetch(self, job_ids: Sequence[str]) -> list[FailedJob]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(REDIS_JOB_PREFIX + job_id)
            replies: list[dict[bytes, bytes]] = await pipe.execute()
        jobs = []
        for reply in replies:
            if b"record" not in reply:
                continue  # removed meanwhile
            redriven_as, redriven_at = reply.get(b"as", b"").decode(), reply.get(b"at", b"").decode()
            jobs.append(FailedJob.model_validate({
                **json.loads(reply[b"record"]), "redrive_count": int(reply.get(b"count", b"0")),
                "redriven_as": redriven_as or None,
                "redriven_at": from_micros(int(redriven_at)) if redriven_at else None}))
        return jobs

    async def _delete(self, job_ids: Sequence[str]) -> int:
        if not job_ids:
            return 0
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(REDIS_ORDER_KEY, *job_ids)
            pipe.delete(*(REDIS_JOB_PREFIX + job_id for job_id in job_ids))
            removed, _ = await pipe.execute()
        return int(removed)

    async def _mark_redriven(self, marks: Sequence[tuple[FailedJob, str]]) -> None:
        argv = [str(to_micros(datetime.now(UTC)))]
        for job, new_id in marks:
            argv += [job.job_id, str(job.redrive_count), new_id]
        await self.redis.eval(_MARK, 0, *argv)  # type: ignore[misc]
