"""Jobs that failed for good, kept after ARQ has let go of their result: the model, keyset pages and get, re-drive,
discard and retention. Kept in PostgreSQL, or without DATABASE_URL in a capped Redis store; one interface for both.

Workers write them (kubearq.worker.failures); the operator reads, re-drives and discards them.

Re-driving enqueues a copy under a new id derived from the old one (`redrive_id`: the row's redrive counter and
the failed job's enqueue time) first, and then writes the new id on the row, on condition that the counter has
not moved. If the process dies between the two steps, the job is on its queue and the row is unchanged. The next
re-drive derives the same id, which the enqueue refuses (ARQ refuses an id it holds, and `remember_ms` keeps
refusing it after the job is gone), and then writes it on the row. So nothing is lost and nothing runs twice.
The other order (row first) leaves a row that says it was re-driven when no job exists, if the process dies before
enqueueing.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Literal, cast

from pydantic import AwareDatetime, JsonValue, model_validator
from redis.asyncio import Redis

from kubearq.core.contract import ApiModel, Origin
from kubearq.core.queueing import NewJob, enqueue_many

REDRIVE_PREFIX = "kubearq:redrive:"  # kubearq:redrive:<counter>:<enqueued ms>:<failed job's id>
REDRIVE_REMEMBER_MS = 7 * 86_400_000  # a re-drive interrupted before it wrote its row may be retried this long
MAX_ERROR_LENGTH = 4000
MAX_PAGE = 1000
BATCH = 500  # rows per statement or script when re-driving, discarding, pruning
DEFAULT_REDIS_CAP = 1000
REDIS_ORDER_KEY = "kubearq:failed-jobs"  # sorted set: job id by failed_at in µs
REDIS_JOB_PREFIX = "kubearq:failed-job:"  # hash per job: record (JSON), enqueued, count, as, at
REDIS_CAP_KEY = "kubearq:failed-jobs:cap"  # the cap the workers keep to, for readers to show
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class FailureReason(StrEnum):
    """How a job failed for good."""

    FAILED = "Failed"  # its last try raised
    GAVE_UP = "GaveUp"  # it raised GiveUp: not retried
    OUT_OF_TRIES = "OutOfTries"  # its tries were spent before it could run again (its workers died mid-try)
    REFUSED = "Refused"  # ALLOWED_NAMESPACES excludes its origin
    UNDECODABLE = "Undecodable"  # not a kubearq job; its bytes are under `dead_letter_key`
    FUNCTION_NOT_SERVED = "FunctionNotServed"  # no worker on its queue serves its function


class TryError(ApiModel):
    """The error of one failed try."""

    job_try: int
    error: str
    at: datetime


# pydantic's mypy plugin gives the model's __init__ a **kwargs, which the field `kwargs` clashes with.
class FailedJob(ApiModel):  # type: ignore[no-redef]
    """A job that failed for good: what it was, each failed try, and where it went since (`redriven_as`)."""

    job_id: str
    function: str
    args: list[JsonValue] = []
    kwargs: dict[str, JsonValue] = {}
    queue: str
    reason: FailureReason
    error: str
    """The error that ended it: the last try's, or why it never ran."""
    tries: int
    """Tries it ran."""
    try_errors: list[TryError] = []
    origin: Origin | None = None
    """The resource it was enqueued for."""
    worker: str
    """The pod that failed it for good."""
    enqueued_at: datetime | None = None
    failed_at: datetime
    dead_letter_key: str | None = None
    """Where its raw bytes are kept, for a job that could not be decoded or was refused."""
    redrive_of: str | None = None
    """The failed job this one re-drove."""
    redrive_count: int = 0
    redriven_as: str | None = None
    """The id of the job re-driven from this one."""
    redriven_at: datetime | None = None

    @property
    def runnable(self) -> bool:
        """Whether re-driving it can run anything: an undecodable job has no function to run."""
        return self.reason is not FailureReason.UNDECODABLE


class FailedJobFilter(ApiModel):
    """Which failed jobs: every field given must match (case-insensitive substring for `error`)."""

    function: str | None = None
    queue: str | None = None
    namespace: str | None = None
    kind: str | None = None
    name: str | None = None
    error: str | None = None
    since: AwareDatetime | None = None
    """Failed at or after this time."""
    redriven: bool | None = None
    """True: only those re-driven; False: only those not yet re-driven."""

    def matches(self, job: FailedJob) -> bool:
        origin = job.origin
        return ((self.function is None or job.function == self.function)
                and (self.queue is None or job.queue == self.queue)
                and all(wanted is None or (origin is not None and getattr(origin, part) == wanted)
                        for part, wanted in (("namespace", self.namespace), ("kind", self.kind), ("name", self.name)))
                and (self.error is None or self.error.casefold() in job.error.casefold())
                and (self.since is None or job.failed_at >= self.since)
                and (self.redriven is None or (job.redriven_as is not None) == self.redriven))


class Selection(ApiModel):
    """The failed jobs to re-drive or discard: these ids, or every one matching a filter (`Selection()`: all)."""

    job_ids: tuple[str, ...] | None = None
    where: FailedJobFilter | None = None

    @model_validator(mode="after")
    def _one_way(self) -> Selection:
        if self.job_ids is not None and self.where is not None:
            raise ValueError("select failed jobs by job_ids or by a filter (where), not both")
        return self

    @classmethod
    def of(cls, *job_ids: str) -> Selection:
        return cls(job_ids=job_ids)


@dataclass(frozen=True)
class Keeping:
    """Where failed jobs are kept, and how many at most."""

    store: Literal["PostgreSQL", "Redis"]
    at_most: int | None = None

    @property
    def notice(self) -> str | None:
        """What a user should know about this store (for the CLI and dashboard to show), if anything."""
        if self.store == "Redis":
            return (f"failed jobs are kept in Redis without DATABASE_URL, the newest {self.at_most} only; set "
                    "DATABASE_URL (the workers' PostgreSQL) to keep them all")
        return None


@dataclass(frozen=True)
class Page:
    """Failed jobs, newest first, and the cursor of the next page (None on the last)."""

    jobs: list[FailedJob]
    next_cursor: str | None
    keeping: Keeping


@dataclass(frozen=True)
class Redrives:
    """What a re-drive did."""

    new_job_ids: dict[str, str] = field(default_factory=dict)
    """Failed job id → id of its re-driven job (enqueued now or by an earlier re-drive)."""
    enqueued: list[str] = field(default_factory=list)
    """Ids of the jobs this call put on a queue."""
    not_runnable: list[str] = field(default_factory=list)
    """Undecodable jobs: nothing to run (their bytes are under their dead_letter_key)."""
    not_found: list[str] = field(default_factory=list)


class InvalidCursorError(ValueError):
    """A cursor `page` did not return."""


def redrive_id(job: FailedJob, count: int) -> str:
    """The id of the `count`th re-drive of `job`. It is the same on every call, so a re-drive repeated after a crash
    is refused, and it differs for a later failure of the same job id (a new enqueue time)."""
    enqueued = _micros(job.enqueued_at) // 1000 if job.enqueued_at else 0
    return f"{REDRIVE_PREFIX}{count}:{enqueued}:{job.job_id}"


def redriven_from(job_id: str) -> str | None:
    """The failed job whose re-drive `job_id` is; None if it is not a re-drive."""
    if not job_id.startswith(REDRIVE_PREFIX):
        return None
    parts = job_id[len(REDRIVE_PREFIX):].split(":", 2)
    return parts[2] if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit() else None


def clean_error(error: str) -> str:
    """An error as kept: no NUL (PostgreSQL text refuses it), at most MAX_ERROR_LENGTH characters."""
    error = error.replace("\x00", "\ufffd")
    return error if len(error) <= MAX_ERROR_LENGTH else error[: MAX_ERROR_LENGTH - 1] + "…"


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


def _from_micros(micros: int) -> datetime:
    return _EPOCH + micros * _MICROSECOND


def encode_cursor(job: FailedJob) -> str:
    return base64.urlsafe_b64encode(f"{_micros(job.failed_at)}:{job.job_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[int, str]:
    """(failed_at in µs, job id) of the last job of the previous page."""
    try:
        micros, _, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition(":")
        return int(micros), job_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidCursorError(f"{cursor!r} is not a cursor a page of failed jobs returned (next_cursor)") from None


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}, not {limit}")


def _json_safe(value: object) -> object:
    """`value` without what JSON in PostgreSQL refuses: NUL in strings, NaN and infinities (kept as strings)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(_json_safe(key)): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def json_text(value: object) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:
        text = "\\u0000"  # take the slow path
    if "\\u0000" in text:
        text = json.dumps(_json_safe(value), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text


class FailedJobStore(ABC):
    """Failed jobs kept somewhere; re-driven onto Redis queues through `redis`."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    @abstractmethod
    async def record(self, jobs: Sequence[FailedJob]) -> None:
        """Keep these failures, replacing an earlier record of a job id unless it is the same failure already
        re-driven (the same id and enqueue time): writing a record twice changes nothing."""

    @abstractmethod
    async def get(self, job_id: str) -> FailedJob | None: ...

    async def get_many(self, job_ids: Sequence[str]) -> list[FailedJob]:
        """The kept jobs among `job_ids`, in that order; an id not kept is left out."""
        ids = list(dict.fromkeys(job_ids))
        found: list[FailedJob] = []
        for start in range(0, len(ids), BATCH):
            found += await self._fetch(ids[start: start + BATCH])
        return found

    @abstractmethod
    async def page(self, where: FailedJobFilter | None = None, *, after: str | None = None, limit: int = 50) -> Page:
        """Failed jobs matching `where`, newest first (ties by job id), after the cursor of an earlier page."""

    @abstractmethod
    async def prune(self, before: datetime, *, batches: int = 20) -> int:
        """Remove up to `batches` batches of the jobs that failed before `before`; return how many went."""

    @abstractmethod
    async def keeping(self) -> Keeping: ...

    @abstractmethod
    async def _fetch(self, job_ids: Sequence[str]) -> list[FailedJob]: ...

    @abstractmethod
    async def _delete(self, job_ids: Sequence[str]) -> int: ...

    @abstractmethod
    async def _mark_redriven(self, marks: Sequence[tuple[FailedJob, str]]) -> None:
        """Write each new id on its row, bumping its redrive counter, where the counter is still the job's."""

    async def _selected(self, selection: Selection) -> AsyncIterator[tuple[list[FailedJob], list[str]]]:
        """The selected jobs in batches, and the selected ids not found."""
        if selection.job_ids is not None:
            ids = list(dict.fromkeys(selection.job_ids))
            for start in range(0, len(ids), BATCH):
                chunk = ids[start: start + BATCH]
                found = await self._fetch(chunk)
                known = {job.job_id for job in found}
                yield found, [job_id for job_id in chunk if job_id not in known]
            return
        cursor: str | None = None
        while True:
            page = await self.page(selection.where, after=cursor, limit=BATCH)
            if page.jobs:
                yield page.jobs, []
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def redrive(self, selection: Selection) -> Redrives:
        """Run the selected jobs again with fresh tries, each under a new id linked to its old one; a job already
        re-driven is not re-driven again (its earlier re-drive is reported)."""
        result = Redrives()
        async for jobs, missing in self._selected(selection):
            result.not_found.extend(missing)
            fresh: dict[str, list[tuple[FailedJob, str]]] = {}
            for job in jobs:
                if job.redriven_as is not None:
                    result.new_job_ids[job.job_id] = job.redriven_as
                elif not job.runnable:
                    result.not_runnable.append(job.job_id)
                else:
                    fresh.setdefault(job.queue, []).append((job, redrive_id(job, job.redrive_count + 1)))
            for queue, marks in fresh.items():
                # First the enqueue, then the row: see the module's docstring.
                new_jobs = [NewJob(new_id, job.function, job.kwargs, job.args, origin=job.origin)
                            for job, new_id in marks]
                result.enqueued.extend(await enqueue_many(self.redis, queue, new_jobs,
                                                          remember_ms=REDRIVE_REMEMBER_MS))
                await self._mark_redriven(marks)
                result.new_job_ids.update((job.job_id, new_id) for job, new_id in marks)
        return result

    async def discard(self, selection: Selection) -> int:
        """Remove the selected jobs; return how many went."""
        removed = 0
        if selection.job_ids is not None:
            ids = list(dict.fromkeys(selection.job_ids))
            for start in range(0, len(ids), BATCH):
                removed += await self._delete(ids[start: start + BATCH])
            return removed
        while True:  # always the first page: what was removed is no longer on it
            page = await self.page(selection.where, limit=BATCH)
            if not page.jobs:
                return removed
            removed += await self._delete([job.job_id for job in page.jobs])


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
        clauses.append(f"(failed_at, job_id) < ({param(_from_micros(micros))}, {param(job_id)})")
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
        _check_limit(limit)
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
            argv += [job.job_id, str(_micros(job.failed_at)), json_text(state),
                     str(_micros(job.enqueued_at)) if job.enqueued_at else ""]
        await self.redis.eval(_RECORD, 2, REDIS_ORDER_KEY, REDIS_CAP_KEY, *argv)  # type: ignore[misc]

    async def get(self, job_id: str) -> FailedJob | None:
        found = await self._fetch([job_id])
        return found[0] if found else None

    async def page(self, where: FailedJobFilter | None = None, *, after: str | None = None, limit: int = 50) -> Page:
        _check_limit(limit)
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
            old: list[bytes] = await self.redis.zrangebyscore(REDIS_ORDER_KEY, "-inf", f"({_micros(before)}",
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
                "redriven_at": _from_micros(int(redriven_at)) if redriven_at else None}))
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
        argv = [str(_micros(datetime.now(UTC)))]
        for job, new_id in marks:
            argv += [job.job_id, str(job.redrive_count), new_id]
        await self.redis.eval(_MARK, 0, *argv)  # type: ignore[misc]
