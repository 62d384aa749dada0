"""The sync family's jobs, driven by SyncSchedules: the fan-out `sync_connections(mode)`, one
`sync_connection(connection_id, mode)` per connection, and `compact_snapshots(older_than_hours)`.

- A job's time is its tick: a SyncSchedule's job id carries it (`kubearq:tick:<uid>:<seconds>`), and the fan-out
  hands it to each connection's job; a job enqueued by hand takes the minute it runs in. Windows, job ids and
  the rows written follow from the tick alone, so a repeated or overlapping run does the same work once.
- A provider's throttling defers the job (no try spent, no slot held); PostgreSQL down is waited out the same
  way; other retryable errors retry with backoff and, after the last try, are kept on the connection.
- Bad input (an unknown mode, connection or provider, missing credentials, a refused URL) fails at once with
  the reason, kept on the connection when there is one; other connections are never affected.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel

from kubearq.core.contract import CURRENT_ORIGIN, SYNC_CONNECTION, Origin, tick_of_job
from kubearq.core.queueing import NewJob, enqueue_many
from kubearq.worker.runtime import Backoff, Defer, GiveUp
from kubearq.worker.storage import StorageUnavailableError
from kubearq.worker.sync.credentials import SecretsDir
from kubearq.worker.sync.http import ApiClient
from kubearq.worker.sync.provider import (
    Credentials,
    MetricKind,
    MetricPoint,
    Provider,
    ProviderError,
    ThrottledError,
    Window,
)
from kubearq.worker.sync.store import Connection, FanOutRow, SyncStore

logger = logging.getLogger(__name__)

Mode = Literal["realtime", "attribution", "backfill"]
MODES: tuple[Mode, ...] = ("realtime", "attribution", "backfill")
CONTEXT_KEY = "kubearq.sync"
ATTRIBUTION_DAYS = 7
BACKFILL_DAYS = 90
MAX_TRIES = 5
TIMEOUT_SECONDS = 1800  # a backfill of 90 days; it resumes where it stopped if a try times out
POINTS_PER_WRITE = 5000
LATER_TRY = "; a later try may succeed"  # said of a retryable error; not once the tries are spent
COMPACTION_CONCURRENCY = 4  # connections compacted at once: PostgreSQL works each on a core of its own


@dataclass
class SyncResources:
    """What the sync jobs of one worker process share."""

    store: SyncStore
    providers: Mapping[str, type[Provider]]
    secrets: SecretsDir
    api: ApiClient  # every provider request, under the worker's network policy
    queue: str  # where the fan-out puts the connections' jobs: the queue this worker serves
    storage_backoff: Backoff
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    # Validated configs by (provider, config as stored): every tick's fan-out reads every connection, and its
    # configs hardly ever change (validating 10,000 took half a second, measured).
    configs: dict[tuple[str, str], BaseModel] = field(default_factory=dict)


class Unsyncable(Exception):  # noqa: N818 - a verdict on a connection, not a crash
    """A connection that cannot be synced as configured; the reason is kept on it."""


# --- Pure decisions ------------------------------------------------------------------------------------------


def check_mode(mode: object) -> Mode:
    if mode not in MODES:
        raise GiveUp(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
    return mode


def job_tick(ctx: Mapping[str, Any], given: str | None, now: datetime) -> datetime:
    """The tick a job works for: given by the fan-out, else read from a SyncSchedule's job id, else this minute."""
    if given:
        try:
            return datetime.fromisoformat(given).astimezone(UTC)
        except ValueError:
            raise GiveUp(f"tick {given!r} is not an ISO 8601 time") from None
    return tick_of_job(str(ctx.get("job_id", ""))) or now.replace(second=0, microsecond=0)


def sync_job_id(connection_id: uuid.UUID, mode: Mode, tick: datetime) -> str:
    """One job per (connection, mode, tick); one backfill per connection while its id is held, whatever the tick
    (a backfill outlasts several realtime ticks, each of which would otherwise start another)."""
    if mode == "backfill":
        return f"kubearq:sync:{connection_id}:backfill"
    return f"kubearq:sync:{connection_id}:{mode}:{int(tick.timestamp())}"


def local_midnight(day: date, zone: ZoneInfo) -> datetime:
    """The first instant of `day` in `zone`, in UTC (a DST day is 23 or 25 hours long)."""
    return datetime.combine(day, time(), zone).astimezone(UTC)


def sync_window(mode: Mode, tick: datetime, zone: ZoneInfo) -> Window:
    """realtime: today so far, in the account's time zone; attribution: the 7 days before today."""
    today = tick.astimezone(zone).date()
    if mode == "realtime":
        return Window(local_midnight(today, zone), tick, zone)
    return Window(local_midnight(today - timedelta(days=ATTRIBUTION_DAYS), zone), local_midnight(today, zone), zone)


def backfill_days(tick: datetime, zone: ZoneInfo, resume_at: date | None) -> list[date]:
    """The days a backfill still has to fetch: 90 before today, from where a killed one stopped."""
    today = tick.astimezone(zone).date()
    first = today - timedelta(days=BACKFILL_DAYS)
    if resume_at is not None:
        first = max(first, resume_at)
    return [first + timedelta(days=offset) for offset in range((today - first).days)]


def connection_zone(connection: Connection | FanOutRow) -> ZoneInfo:
    try:
        return ZoneInfo(connection.time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise Unsyncable(f"time zone {connection.time_zone!r} is not an IANA time zone (e.g. Europe/Berlin)") from None


def provider_of(connection: Connection | FanOutRow, resources: SyncResources) -> tuple[type[Provider], BaseModel]:
    cls = resources.providers.get(connection.provider)
    if cls is None:
        raise Unsyncable(f"unknown provider {connection.provider!r}: this worker has "
                         f"{', '.join(sorted(resources.providers))} (install the package that provides it)")
    if isinstance(connection, Connection):
        return cls, _parsed(cls, connection.config)
    key = (connection.provider, connection.config_text)
    config = resources.configs.get(key)
    if config is None:
        if len(resources.configs) > 100_000:
            resources.configs.clear()
        config = resources.configs[key] = _parsed(cls, json.loads(connection.config_text))
    return cls, config


def _parsed(cls: type[Provider], config: Mapping[str, object]) -> BaseModel:
    try:
        return cls.parse_config(config)
    except ProviderError as error:
        raise Unsyncable(error.message) from None


def credentials_of(connection: Connection | FanOutRow, cls: type[Provider], config: BaseModel,
                   resources: SyncResources) -> Credentials:
    credentials, why = resources.secrets.credentials(connection.credentials_ref)
    if credentials is None:
        raise Unsyncable(why)
    refused = cls.check_credentials(credentials, config)
    if refused is not None:
        raise Unsyncable(refused)
    return credentials


@dataclass(frozen=True)
class FanOut:
    jobs: list[NewJob]
    unsyncable: dict[uuid.UUID, str]


def plan_fan_out(connections: Sequence[FanOutRow], mode: Mode, tick: datetime, resources: SyncResources,
                 origin: Origin | None = None) -> FanOut:
    """A job for every connection that can be synced (a new one is backfilled first), the reason for the others;
    each job carries `origin`, the fan-out's own."""
    jobs, unsyncable = [], {}
    for connection in connections:
        try:
            cls, config = provider_of(connection, resources)
            connection_zone(connection)
            credentials_of(connection, cls, config, resources)
        except Unsyncable as reason:
            unsyncable[connection.id] = str(reason)
            continue
        chosen: Mode = "backfill" if mode == "realtime" and connection.backfilled_at is None else mode
        jobs.append(NewJob(sync_job_id(connection.id, chosen, tick), SYNC_CONNECTION,
                           {"connection_id": str(connection.id), "mode": chosen, "tick": tick.isoformat()},
                           origin=origin))
    return FanOut(jobs, unsyncable)


# --- Jobs ----------------------------------------------------------------------------------------------------


async def sync_connections(ctx: dict[str, Any], mode: str = "realtime") -> dict[str, object]:
    """Enqueue a sync of every active connection, in one round trip; returns what was enqueued and skipped."""
    resources: SyncResources = ctx[CONTEXT_KEY]
    chosen = check_mode(mode)
    tick = job_tick(ctx, None, resources.now())
    try:
        connections = await resources.store.fan_out_rows()
        plan = plan_fan_out(connections, chosen, tick, resources, CURRENT_ORIGIN.get())
        await resources.store.mark_unsyncable(plan.unsyncable)
    except StorageUnavailableError as error:
        raise Defer(resources.storage_backoff.delay(int(ctx.get("job_try", 1))), str(error)) from None
    added = await enqueue_many(ctx["redis"], resources.queue, plan.jobs)
    skipped = collections.Counter(reason.split(" (", 1)[0] for reason in plan.unsyncable.values())
    logger.info("%s: enqueued %d connection syncs (%d already), skipped %d", chosen, len(added),
                len(plan.jobs) - len(added), len(plan.unsyncable))
    return {"mode": chosen, "tick": tick.isoformat(), "enqueued": len(added), "alreadyEnqueued": len(plan.jobs) -
            len(added), "skipped": dict(skipped), "backfills": sum(1 for job in plan.jobs if job.kwargs["mode"] ==
                                                                     "backfill")}


async def sync_connection(ctx: dict[str, Any], connection_id: str, mode: str = "realtime",
                          tick: str | None = None) -> dict[str, object]:
    """Sync one connection: entities first, then metrics of the mode's window (a backfill day by day)."""
    resources: SyncResources = ctx[CONTEXT_KEY]
    job_try = int(ctx.get("job_try", 1))
    chosen = check_mode(mode)
    moment = job_tick(ctx, tick, resources.now())
    try:
        cid = uuid.UUID(connection_id)
    except (ValueError, TypeError, AttributeError):
        raise GiveUp(f"{connection_id!r} is not a connection id (a UUID; `kubearq connections list` shows them)") \
            from None
    try:
        return await _sync(resources, cid, chosen, moment, job_try)
    except StorageUnavailableError as error:
        raise Defer(resources.storage_backoff.delay(job_try), str(error)) from None


async def _sync(resources: SyncResources, cid: uuid.UUID, mode: Mode, tick: datetime,
                job_try: int) -> dict[str, object]:
    store = resources.store
    connection = await store.connection(cid)
    if connection is None:
        raise GiveUp(f"no connection {cid}: it was deleted, or never added (`kubearq connections list`)")
    if not connection.active:
        return {"connection": str(cid), "mode": mode, "skipped": "the connection is disabled"}
    try:
        cls, config = provider_of(connection, resources)
        zone = connection_zone(connection)
        credentials = credentials_of(connection, cls, config, resources)
    except Unsyncable as reason:
        await store.fail_sync(cid, str(reason))
        raise GiveUp(str(reason)) from None
    await store.start_sync(cid, resources.now(), first_try=job_try == 1)
    try:
        provider = cls(config, credentials, resources.api)
        done = await _fetch_and_store(provider, store, connection, mode, tick, zone)
    except ThrottledError as throttled:
        raise Defer(throttled.retry_after or 60.0, throttled.message) from None
    except ProviderError as error:
        if not error.retryable:
            await store.fail_sync(cid, error.message)
            raise GiveUp(error.message) from None
        if job_try >= MAX_TRIES:
            await store.fail_sync(cid, f"after {MAX_TRIES} tries: {error.message.removesuffix(LATER_TRY)}")
        raise
    except StorageUnavailableError:
        raise
    except Exception as error:  # a bug of ours or of a provider: kept on the connection after the last try
        if job_try >= MAX_TRIES:
            await store.fail_sync(cid, f"internal error: {type(error).__name__}: {error}")
        raise
    await store.finish_sync(cid, resources.now(), backfilled=mode == "backfill")
    return {"connection": str(cid), "mode": mode, "tick": tick.isoformat(), **done}


async def _fetch_and_store(provider: Provider, store: SyncStore, connection: Connection, mode: Mode,
                           tick: datetime, zone: ZoneInfo) -> dict[str, int]:
    entities = [entity async for entity in provider.entities()]
    await store.store_entities(connection.id, entities, tick)
    if mode != "backfill":
        points = await _store_window(provider, store, connection.id, sync_window(mode, tick, zone))
        return {"entities": len(entities), "points": points}
    days = backfill_days(tick, zone, connection.backfill_next_day)
    points = 0
    for day in days:  # day by day, the resume point moving with each day's rows
        window = Window(local_midnight(day, zone), local_midnight(day + timedelta(days=1), zone), zone)
        points += await _store_window(provider, store, connection.id, window, finished_day=day)
    return {"entities": len(entities), "points": points, "days": len(days)}


async def _store_window(provider: Provider, store: SyncStore, connection_id: uuid.UUID, window: Window,
                        finished_day: date | None = None) -> int:
    """Fetch a window's points and store them in chunks; the last chunk moves a backfill's resume point."""
    total, chunk = 0, []
    async for point in _in_window(provider.metrics(window), window):
        chunk.append(point)
        if len(chunk) >= POINTS_PER_WRITE:
            total += await store.store_points(connection_id, chunk)
            chunk = []
    next_day = None if finished_day is None else finished_day + timedelta(days=1)
    total += await store.store_points(connection_id, chunk, backfill_next_day=next_day)
    return total


async def _in_window(points: AsyncIterator[MetricPoint], window: Window) -> AsyncIterator[MetricPoint]:
    async for point in points:
        if window.start <= point.captured_at < window.end:
            yield point


async def compact_snapshots(ctx: dict[str, Any], older_than_hours: float = 24) -> dict[str, object]:
    """Roll 15-minute snapshots older than this into hourly ones, one transaction per connection-day; a few
    connections at once (each on its own PostgreSQL connection of the pool)."""
    resources: SyncResources = ctx[CONTEXT_KEY]
    if not 1 <= float(older_than_hours) <= 24 * 365:
        raise GiveUp(f"older_than_hours must be between 1 and 8760, not {older_than_hours!r}")
    tick = job_tick(ctx, None, resources.now())
    before = (tick - timedelta(hours=float(older_than_hours))).replace(minute=0, second=0, microsecond=0)
    skipped: dict[str, str] = {}
    totals = [0, 0, 0]  # connection-days, rows removed, hourly rows written
    gate = asyncio.Semaphore(COMPACTION_CONCURRENCY)

    async def compact(connection: Connection) -> None:
        try:
            counters = extra_counters(connection, resources)
        except Unsyncable as reason:
            skipped[str(connection.id)] = str(reason)
            return
        async with gate:
            done = await resources.store.compact_connection(connection.id, before, counters)
        for index, amount in enumerate(done):
            totals[index] += amount

    try:
        async with asyncio.TaskGroup() as group:
            for connection in await resources.store.connections(active_only=False):
                group.create_task(compact(connection))
    except* StorageUnavailableError as outage:  # what is compacted stays so; the rerun does the rest
        raise Defer(resources.storage_backoff.delay(int(ctx.get("job_try", 1))), str(outage.exceptions[0])) \
            from None
    days, moved, written = totals
    logger.info("compacted %d 15-minute snapshots of %d connection-days into %d hourly ones", moved, days, written)
    return {"before": before.isoformat(), "connectionDays": days, "rowsCompacted": moved, "hourlyRows": written,
            "skipped": skipped}


def extra_counters(connection: Connection, resources: SyncResources) -> list[str]:
    """The connection's metrics beyond the typed columns that are counters (the others are gauges)."""
    cls, config = provider_of(connection, resources)
    kinds = cls.metric_kinds_of(config)
    return sorted(name for name, kind in kinds.items() if kind == MetricKind.COUNTER)
