"""The sync tables on a real PostgreSQL: upserts that never duplicate, sync state, and compaction of 15-minute
snapshots into hourly ones (counters summed, gauges' last value; idempotent; nothing lost or doubled)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from kubearq.worker.storage import Storage
from kubearq.worker.sync.provider import Entity, MetricPoint
from kubearq.worker.sync.store import Connection, SyncStore, aligned, shorten

DAY = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture
async def store(postgres_dsn: str) -> AsyncIterator[SyncStore]:
    async with Storage(postgres_dsn, connect_timeout=30) as storage:
        await storage.migrate()
        yield SyncStore(storage)


async def add(store: SyncStore, name: str = "acme") -> Connection:
    return await store.add_connection(workspace_id=uuid.uuid4(), provider="http-json", display_name=name,
                                      config={"a": 1}, credentials_ref="ads/acme", time_zone="Europe/Berlin")


def quarter_hours(start: datetime, count: int, entity: str = "ad-1", **extra: float) -> list[MetricPoint]:
    return [MetricPoint(entity, start + timedelta(minutes=15 * n),
                        {"spend": n + 0.5, "impressions": 10 * n, "clicks": n, "conversions": 0, "revenue": 2 * n,
                         **{name: value + n for name, value in extra.items()}})
            for n in range(count)]


async def snapshots(db: asyncpg.Connection, granularity: str) -> list[asyncpg.Record]:
    query = "SELECT * FROM metric_snapshots WHERE granularity = $1 ORDER BY captured_at, platform_id"
    rows: list[asyncpg.Record] = await db.fetch(query, granularity)
    return rows


async def test_a_connection_starts_idle_with_no_syncs(store: SyncStore) -> None:
    connection = await add(store)

    assert (connection.sync_status, connection.total_syncs_attempted, connection.backfilled_at) == ("idle", 0, None)
    assert connection.config == {"a": 1}
    assert await store.connection(connection.id) == connection


async def test_sync_state_counts_attempts_once_per_sync_and_keeps_the_error(store: SyncStore) -> None:
    connection = await add(store)
    now = DAY + timedelta(hours=1)

    await store.start_sync(connection.id, now, first_try=True)
    await store.start_sync(connection.id, now, first_try=False)  # a retry of the same sync
    await store.fail_sync(connection.id, "x" * 600)
    failed = await store.connection(connection.id)
    await store.start_sync(connection.id, now, first_try=True)
    await store.finish_sync(connection.id, now + timedelta(minutes=1), backfilled=True)
    done = await store.connection(connection.id)

    assert failed is not None
    assert (failed.sync_status, failed.total_syncs_attempted, len(failed.last_sync_error or "")) == ("error", 1, 500)
    assert done is not None
    assert (done.sync_status, done.total_syncs_attempted, done.total_syncs_succeeded, done.last_sync_error) == (
        "idle", 2, 1, None)
    assert (done.last_sync_completed_at, done.backfilled_at) == (now + timedelta(minutes=1), now + timedelta(minutes=1))


async def test_unsyncable_connections_keep_their_reason_in_one_statement(store: SyncStore) -> None:
    first, second, other = await add(store, "a"), await add(store, "b"), await add(store, "c")

    await store.mark_unsyncable({first.id: "No token configured. Please reconnect.", second.id: "unknown provider"})

    found = {c.id: (c.sync_status, c.last_sync_error) for c in await store.connections(active_only=True)}
    assert found == {first.id: ("error", "No token configured. Please reconnect."),
                     second.id: ("error", "unknown provider"), other.id: ("idle", None)}


async def test_a_disabled_connection_is_not_listed_as_active(store: SyncStore) -> None:
    kept, disabled = await add(store, "a"), await add(store, "b")
    assert await store.set_active(disabled.id, False)
    assert [c.id for c in await store.connections(active_only=True)] == [kept.id]
    assert not await store.set_active(uuid.uuid4(), False)


async def test_entities_and_points_upsert_never_duplicate(store: SyncStore, db: asyncpg.Connection) -> None:
    connection = await add(store)
    entities = [Entity("c-1", "campaign", "Spring", "ACTIVE"), Entity("ad-1", "ad", "Banner", "ACTIVE", "s-1")]
    points = quarter_hours(DAY, 4)

    for _ in range(2):
        await store.store_entities(connection.id, entities, DAY)
        await store.store_points(connection.id, points)
    await store.store_entities(connection.id, [Entity("ad-1", "ad", "Banner", "PAUSED", "s-1")], DAY)
    corrected = MetricPoint("ad-1", DAY, {"spend": 99, "custom": 1.5})
    await store.store_points(connection.id, [corrected])

    assert await db.fetchval("SELECT count(*) FROM metric_snapshots") == 4
    assert await db.fetchval("SELECT status FROM entities WHERE platform_id = 'ad-1'") == "PAUSED"
    first = (await snapshots(db, "15m"))[0]
    assert (first["spend"], first["impressions"], first["extra"]) == (Decimal(99), 0, {"custom": 1.5})


async def test_points_are_stored_at_the_start_of_their_bucket() -> None:
    assert aligned(DAY + timedelta(minutes=22, seconds=5), "15m") == DAY + timedelta(minutes=15)
    assert aligned(DAY + timedelta(minutes=59), "1h") == DAY


async def test_a_backfill_day_and_its_resume_point_are_stored_together(store: SyncStore) -> None:
    connection = await add(store)

    await store.store_points(connection.id, quarter_hours(DAY, 96), backfill_next_day=date(2026, 3, 2))

    stored = await store.connection(connection.id)
    assert stored is not None
    assert stored.backfill_next_day == date(2026, 3, 2)


async def test_compaction_sums_counters_keeps_the_last_gauge_and_removes_the_quarter_hours(
        store: SyncStore, db: asyncpg.Connection) -> None:
    connection = await add(store)
    await store.store_points(connection.id, quarter_hours(DAY, 8, budget=100.0, views=1.0))

    moved, written = await store.compact(connection.id, DAY, DAY + timedelta(days=1), extra_counters=["views"])

    assert (moved, written) == (8, 2)
    assert await snapshots(db, "15m") == []
    hours = await snapshots(db, "1h")
    assert [(h["captured_at"], h["spend"], h["impressions"], h["clicks"], h["revenue"]) for h in hours] == [
        (DAY, Decimal("8.0"), 60, 6, 12), (DAY + timedelta(hours=1), Decimal("24.0"), 220, 22, 44)]
    assert [h["extra"] for h in hours] == [{"budget": 103.0, "views": 10}, {"budget": 107.0, "views": 26}]


async def test_compaction_twice_changes_nothing_the_second_time(store: SyncStore, db: asyncpg.Connection) -> None:
    connection = await add(store)
    await store.store_points(connection.id, quarter_hours(DAY, 8))
    await store.compact(connection.id, DAY, DAY + timedelta(days=1), [])
    before = await snapshots(db, "1h")

    again = await store.compact(connection.id, DAY, DAY + timedelta(days=1), [])

    assert again == (0, 0)
    assert [dict(row) for row in await snapshots(db, "1h")] == [dict(row) for row in before]


async def test_compaction_that_fails_midway_leaves_every_quarter_hour(store: SyncStore, db: asyncpg.Connection) -> None:
    connection = await add(store)
    await store.store_points(connection.id, quarter_hours(DAY, 8, views=1.0))
    await db.execute("ALTER TABLE metric_snapshots ADD CONSTRAINT no_big_hours "
                     "CHECK (granularity = '15m' OR spend < 20)")

    with pytest.raises(asyncpg.CheckViolationError):
        await store.compact(connection.id, DAY, DAY + timedelta(days=1), ["views"])

    assert len(await snapshots(db, "15m")) == 8  # the statement is one transaction: nothing moved
    assert await snapshots(db, "1h") == []


async def test_compaction_days_are_the_utc_days_with_old_quarter_hours(store: SyncStore) -> None:
    connection = await add(store)
    await store.store_points(connection.id, quarter_hours(DAY - timedelta(hours=1), 8))  # across midnight

    assert await store.compaction_days(connection.id, DAY + timedelta(hours=1)) == [DAY - timedelta(days=1), DAY]
    assert await store.compaction_days(connection.id, DAY - timedelta(hours=2)) == []


def test_errors_kept_are_one_line_of_at_most_500_characters() -> None:
    assert shorten("a\n  b") == "a b"
    assert len(shorten("y" * 1000)) == 500
