"""Jobs that failed for good, kept after ARQ has let go of their result: the model, keyset pages and get, re-drive,
discard and retention, and the interface (`FailedJobStore`) of the two stores in kubearq.core.failedjobstores:
PostgreSQL, or without DATABASE_URL a capped set in Redis.

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
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Literal

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
    enqueued = to_micros(job.enqueued_at) // 1000 if job.enqueued_at else 0
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


def to_micros(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


def from_micros(micros: int) -> datetime:
    return _EPOCH + micros * _MICROSECOND


def encode_cursor(job: FailedJob) -> str:
    return base64.urlsafe_b64encode(f"{to_micros(job.failed_at)}:{job.job_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[int, str]:
    """(failed_at in µs, job id) of the last job of the previous page."""
    try:
        micros, _, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition(":")
        return int(micros), job_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidCursorError(f"{cursor!r} is not a cursor a page of failed jobs returned (next_cursor)") from None


def check_limit(limit: int) -> None:
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
