"""The sync family's PostgreSQL side: connections and their sync state, entities, metric snapshots and their
compaction. Every write is an upsert or a guarded update, so a job that runs again changes nothing twice."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from kubearq.worker.storage import Storage
from kubearq.worker.sync.provider import Entity, MetricPoint

STANDARD_METRICS = ("spend", "impressions", "clicks", "conversions", "revenue")  # typed columns, all counters
MAX_ERROR_LENGTH = 500
GRANULARITY_SECONDS = {"15m": 900, "1h": 3600}


@dataclass(frozen=True)
class Connection:
    """One row of `connections`."""

    id: uuid.UUID
    workspace_id: uuid.UUID
    provider: str
    display_name: str
    config: Mapping[str, Any]
    credentials_ref: str | None
    time_zone: str
    active: bool
    sync_status: str
    last_sync_attempted_at: datetime | None
    last_sync_completed_at: datetime | None
    last_sync_error: str | None
    total_syncs_attempted: int
    total_syncs_succeeded: int
    backfilled_at: datetime | None
    backfill_next_day: date | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Connection:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class FanOutRow:
    """What the fan-out needs of an active connection; the config as stored (parsed only when it changed)."""

    id: uuid.UUID
    provider: str
    config_text: str
    credentials_ref: str | None
    time_zone: str
    backfilled_at: datetime | None


def shorten(error: str) -> str:
    """An error as kept on a connection: one line, at most 500 characters."""
    text = " ".join(error.split())
    return text if len(text) <= MAX_ERROR_LENGTH else text[: MAX_ERROR_LENGTH - 1] + "…"


def aligned(moment: datetime, granularity: str) -> datetime:
    """The start of the bucket `moment` falls in (UTC)."""
    seconds = GRANULARITY_SECONDS[granularity]
    stamp = int(moment.timestamp()) // seconds * seconds
    return datetime.fromtimestamp(stamp, UTC)


class SyncStore:
    """The queries of the sync jobs and of `kubearq connections`, on the worker's `Storage`."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    # --- connections --------------------------------------------------------------------------------------

    async def add_connection(self, *, workspace_id: uuid.UUID, provider: str, display_name: str,
                             config: Mapping[str, Any], credentials_ref: str | None, time_zone: str) -> Connection:
        async with self.storage.connection("add_connection") as connection:
            row = await connection.fetchrow(
                """INSERT INTO connections (workspace_id, provider, display_name, config, credentials_ref, time_zone)
                   VALUES ($1, $2, $3, $4, $5, $6) RETURNING *""",
                workspace_id, provider, display_name, dict(config), credentials_ref, time_zone)
        assert row is not None
        return Connection.from_row(row)

    async def connection(self, connection_id: uuid.UUID) -> Connection | None:
        async with self.storage.connection("read_connection") as connection:
            row = await connection.fetchrow("SELECT * FROM connections WHERE id = $1", connection_id)
        return None if row is None else Connection.from_row(row)

    async def connections(self, *, active_only: bool) -> list[Connection]:
        async with self.storage.connection("list_connections") as connection:
            rows = await connection.fetch(
                "SELECT * FROM connections WHERE active OR NOT $1 ORDER BY created_at, id", active_only)
        return [Connection.from_row(row) for row in rows]

    async def fan_out_rows(self) -> list[FanOutRow]:
        async with self.storage.connection("list_connections") as connection:
            rows = await connection.fetch(
                """SELECT id, provider, config::text AS config_text, credentials_ref, time_zone, backfilled_at
                   FROM connections WHERE active ORDER BY created_at, id""")
        return [FanOutRow(*row) for row in rows]

    async def set_active(self, connection_id: uuid.UUID, active: bool) -> bool:
        async with self.storage.connection("set_active") as connection:
            status: str = await connection.execute("UPDATE connections SET active = $2 WHERE id = $1",
                                                   connection_id, active)
        return status.endswith(" 1")

    async def mark_unsyncable(self, reasons: Mapping[uuid.UUID, str]) -> None:
        """Keep why each connection was not synced (e.g. "No token configured. Please reconnect."), in one statement."""
        if not reasons:
            return
        async with self.storage.connection("mark_unsyncable") as connection:
            await connection.execute(
                """UPDATE connections AS c SET sync_status = 'error', last_sync_error = r.error
                   FROM unnest($1::uuid[], $2::text[]) AS r (id, error) WHERE c.id = r.id""",
                list(reasons), [shorten(reason) for reason in reasons.values()])

    async def start_sync(self, connection_id: uuid.UUID, now: datetime, *, first_try: bool) -> None:
        """`syncing`; a sync's first try counts an attempt (its retries do not)."""
        async with self.storage.connection("start_sync") as connection:
            await connection.execute(
                """UPDATE connections SET sync_status = 'syncing', last_sync_attempted_at = $2,
                          total_syncs_attempted = total_syncs_attempted + $3::int
                   WHERE id = $1""", connection_id, now, 1 if first_try else 0)

    async def finish_sync(self, connection_id: uuid.UUID, now: datetime, *, backfilled: bool = False) -> None:
        async with self.storage.connection("finish_sync") as connection:
            await connection.execute(
                """UPDATE connections SET sync_status = 'idle', last_sync_completed_at = $2, last_sync_error = NULL,
                          total_syncs_succeeded = total_syncs_succeeded + 1,
                          backfilled_at = CASE WHEN $3 THEN $2 ELSE backfilled_at END,
                          backfill_next_day = CASE WHEN $3 THEN NULL ELSE backfill_next_day END
                   WHERE id = $1""", connection_id, now, backfilled)

    async def fail_sync(self, connection_id: uuid.UUID, error: str) -> None:
        async with self.storage.connection("fail_sync") as connection:
            await connection.execute(
                "UPDATE connections SET sync_status = 'error', last_sync_error = $2 WHERE id = $1",
                connection_id, shorten(error))

    # --- entities and snapshots ---------------------------------------------------------------------------

    async def store_entities(self, connection_id: uuid.UUID, entities: Sequence[Entity], now: datetime) -> int:
        """Upsert the entities' state (name, status, parent) before their metrics."""
        if not entities:
            return 0
        async with self.storage.connection("store_entities") as connection:
            await connection.execute(
                """INSERT INTO entities (connection_id, platform_id, level, parent_platform_id, name, status,
                                         updated_at)
                   SELECT $1, *, $7 FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
                   ON CONFLICT (connection_id, platform_id) DO UPDATE SET level = EXCLUDED.level,
                       parent_platform_id = EXCLUDED.parent_platform_id, name = EXCLUDED.name,
                       status = EXCLUDED.status, updated_at = EXCLUDED.updated_at
                   WHERE (entities.level, entities.parent_platform_id, entities.name, entities.status)
                         IS DISTINCT FROM
                         (EXCLUDED.level, EXCLUDED.parent_platform_id, EXCLUDED.name, EXCLUDED.status)""",
                connection_id, [e.platform_id for e in entities], [e.level for e in entities],
                [e.parent_id for e in entities], [e.name for e in entities], [e.status for e in entities], now)
        return len(entities)

    async def store_points(self, connection_id: uuid.UUID, points: Sequence[MetricPoint], *,
                           backfill_next_day: date | None = None) -> int:
        """Upsert snapshots (a re-run replaces, never duplicates); with `backfill_next_day`, move the backfill's
        resume point in the same transaction, so a killed backfill continues after the last day it stored."""
        rows = _snapshot_columns(points)
        async with self.storage.connection("store_points") as connection, connection.transaction():
            if rows[0]:
                await connection.execute(
                    """INSERT INTO metric_snapshots (connection_id, granularity, captured_at, platform_id, spend,
                                                     impressions, clicks, conversions, revenue, extra)
                       SELECT $1, * FROM unnest($2::text[], $3::timestamptz[], $4::text[], $5::numeric[],
                                                $6::bigint[], $7::bigint[], $8::numeric[], $9::numeric[], $10::jsonb[])
                       ON CONFLICT (connection_id, granularity, captured_at, platform_id) DO UPDATE SET
                           spend = EXCLUDED.spend, impressions = EXCLUDED.impressions, clicks = EXCLUDED.clicks,
                           conversions = EXCLUDED.conversions, revenue = EXCLUDED.revenue, extra = EXCLUDED.extra,
                           synced_at = now()""",
                    connection_id, *rows)
            if backfill_next_day is not None:
                await connection.execute("UPDATE connections SET backfill_next_day = $2 WHERE id = $1",
                                         connection_id, backfill_next_day)
        return len(points)

    # --- compaction ---------------------------------------------------------------------------------------

    async def compaction_days(self, connection_id: uuid.UUID, before: datetime) -> list[datetime]:
        """The UTC days that hold 15-minute snapshots older than `before` (each day's midnight)."""
        async with self.storage.connection("compaction_days") as connection:
            rows = await connection.fetch(_COMPACTION_DAYS, connection_id, before)
        return [row["day"] for row in rows]

    async def compact(self, connection_id: uuid.UUID, start: datetime, end: datetime,
                      extra_counters: Sequence[str]) -> tuple[int, int]:
        """Roll the 15-minute snapshots in [start, end) up into hourly ones and remove them, in one statement
        (one transaction): a crash loses and doubles nothing, a second run finds nothing. Returns (15-minute rows
        removed, hourly rows written)."""
        async with self.storage.connection("compact") as connection:
            row = await connection.fetchrow(_COMPACT, connection_id, start, end, list(extra_counters))
        assert row is not None
        return int(row["moved"]), int(row["written"])

    async def compact_connection(self, connection_id: uuid.UUID, before: datetime,
                                 extra_counters: Sequence[str]) -> tuple[int, int, int]:
        """Compact every UTC day of one connection older than `before`, a statement (a transaction) per day, on
        one pooled connection. Returns (connection-days, 15-minute rows removed, hourly rows written)."""
        counters = list(extra_counters)
        days = moved = written = 0
        async with self.storage.connection("compact") as connection:
            found = await connection.fetch(_COMPACTION_DAYS, connection_id, before)
            statement = await connection.prepare(_COMPACT)
            for day in (row["day"] for row in found):
                row = await statement.fetchrow(connection_id, day, min(day + timedelta(days=1), before), counters)
                assert row is not None
                days, moved, written = days + 1, moved + int(row["moved"]), written + int(row["written"])
        return days, moved, written


_COMPACTION_DAYS = """
SELECT DISTINCT date_bin('1 day', captured_at, '2000-01-01 00:00+00') AS day FROM metric_snapshots
WHERE connection_id = $1 AND granularity = '15m' AND captured_at < $2 ORDER BY day
"""
_COMPACT = """
WITH moved AS (
    DELETE FROM metric_snapshots
    WHERE connection_id = $1 AND granularity = '15m' AND captured_at >= $2 AND captured_at < $3
    RETURNING platform_id, captured_at, spend, impressions, clicks, conversions, revenue, extra
), hourly AS (
    -- date_bin: plain arithmetic on the instant (date_trunc with a time zone looks the zone up per row)
    SELECT platform_id, date_bin('1 hour', captured_at, '2000-01-01 00:00+00') AS hour, sum(spend) AS spend,
           sum(impressions) AS impressions, sum(clicks) AS clicks, sum(conversions) AS conversions,
           sum(revenue) AS revenue,
           CASE WHEN bool_or(extra <> '{}') THEN kubearq_roll_up_extra(array_agg(extra ORDER BY captured_at), $4)
                ELSE '{}'::jsonb END AS extra
    FROM moved GROUP BY 1, 2
), written AS (
    INSERT INTO metric_snapshots (connection_id, granularity, captured_at, platform_id, spend, impressions, clicks,
                                  conversions, revenue, extra)
    SELECT $1, '1h', hour, platform_id, spend, impressions, clicks, conversions, revenue, extra FROM hourly
    ON CONFLICT (connection_id, granularity, captured_at, platform_id) DO UPDATE SET
        spend = EXCLUDED.spend, impressions = EXCLUDED.impressions, clicks = EXCLUDED.clicks,
        conversions = EXCLUDED.conversions, revenue = EXCLUDED.revenue, extra = EXCLUDED.extra, synced_at = now()
    RETURNING 1
)
SELECT (SELECT count(*) FROM moved) AS moved, (SELECT count(*) FROM written) AS written
"""


def _snapshot_columns(points: Sequence[MetricPoint]) -> tuple[list[Any], ...]:
    columns: tuple[list[Any], ...] = ([], [], [], [], [], [], [], [], [])
    for point in points:
        metrics = dict(point.metrics)
        values = [metrics.pop(name, 0) for name in STANDARD_METRICS]
        for column, value in zip(columns, (point.granularity, aligned(point.captured_at, point.granularity),
                                           point.platform_id, _exact(values[0]), int(values[1]), int(values[2]),
                                           _exact(values[3]), _exact(values[4]), metrics), strict=True):
            column.append(value)
    return columns


def _exact(value: float) -> Decimal:
    """A metric as the platform wrote it (0.58, not the binary float's 0.57999999999999996...)."""
    return Decimal(repr(float(value)))
