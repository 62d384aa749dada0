"""The worker's PostgreSQL adapter, against real PostgreSQL: migrations, idempotent writes, outages."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import pytest

from kubearq.demo.services import PostgresServer
from kubearq.worker.storage import (
    Backoff,
    DeletedRows,
    Migration,
    RequestRef,
    SchemaTooNewError,
    Storage,
    StorageConfigError,
    StorageUnavailableError,
    describe_server,
    encode_json,
    load_migrations,
)

REQUEST = RequestRef(uid=uuid.UUID("6f1c2a9e-0000-4000-8000-000000000001"), namespace="shows", name="concerts")
OTHER = RequestRef(uid=uuid.UUID("6f1c2a9e-0000-4000-8000-000000000002"), namespace="shows", name="theatre")
PAGE = "https://example.com/events/42"
EVENTS = [
    {"@type": "MusicEvent", "name": "Night one", "startDate": "2025-05-01T20:00"},
    {"@type": "MusicEvent", "name": "Night two", "startDate": "2025-05-02T20:00"},
]
MIGRATIONS = load_migrations()
SHIPPED = [migration.version for migration in MIGRATIONS]
NEXT = SHIPPED[-1] + 1  # a migration of the tests' own, after those kubearq ships


def server_of(dsn: str) -> str:
    parts = urlsplit(dsn)
    return f"{parts.hostname}:{parts.port}"


@pytest.fixture
async def storage(postgres_dsn: str) -> AsyncIterator[Storage]:
    async with Storage(postgres_dsn, connect_timeout=30) as storage:
        await storage.migrate()
        yield storage


async def item_rows(db: asyncpg.Connection, request: RequestRef = REQUEST) -> list[tuple[object, ...]]:
    rows = await db.fetch(
        """
        SELECT url, namespace, request_name, item_index, item_type, data FROM scrape_items
        WHERE request_uid = $1 ORDER BY url, item_index
        """,
        request.uid,
    )
    return [tuple(row) for row in rows]


async def failure_rows(db: asyncpg.Connection, request: RequestRef = REQUEST) -> list[tuple[object, ...]]:
    rows = await db.fetch(
        "SELECT url, page_kind, error, tries FROM scrape_failures WHERE request_uid = $1 ORDER BY url",
        request.uid,
    )
    return [tuple(row) for row in rows]


# --- pure parts ----------------------------------------------------------------------------------------


def test_the_package_ships_migration_0001() -> None:
    assert [(migration.version, migration.name) for migration in MIGRATIONS][:1] == [(1, "0001_scrape")]
    assert "CREATE TABLE scrape_items" in MIGRATIONS[0].sql


def test_backoff_grows_exponentially_with_jitter_up_to_its_maximum() -> None:
    backoff = Backoff(initial=0.1, maximum=5.0)
    rng = random.Random(7)
    for attempt, step in [(0, 0.1), (1, 0.2), (3, 0.8), (6, 5.0), (10_000, 5.0)]:
        delays = [backoff.delay(attempt, rng) for _ in range(200)]
        assert step / 2 <= min(delays) < max(delays) <= step


def test_server_description_never_holds_user_or_password() -> None:
    assert describe_server("postgresql://kubearq:s3cr%40t@db.example:6543/results") == "db.example:6543"
    assert describe_server("postgresql://kubearq:s3cret@db/results") == "db:5432"
    assert describe_server("postgresql://[::1]:6543/results") == "[::1]:6543"
    assert describe_server("postgresql:///results?host=/run/postgresql&port=5433") == "/run/postgresql:5433"


def test_json_nul_characters_become_replacement_characters() -> None:
    assert json.loads(encode_json({"na\x00me": ["a\x00b", 1]})) == {"na\ufffdme": ["a\ufffdb", 1]}
    assert encode_json({"path": "C:\\u0000"}) == '{"path": "C:\\\\u0000"}'


def test_json_refuses_nan() -> None:
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        encode_json({"price": float("nan")})


# --- migrations ----------------------------------------------------------------------------------------


async def test_migrate_applies_each_version_once_and_rerunning_is_a_noop(
    postgres_dsn: str, db: asyncpg.Connection
) -> None:
    async with Storage(postgres_dsn, connect_timeout=30) as storage:
        assert await storage.migrate() == [1, 2, 3]
        first = await db.fetch("SELECT version, name, applied_at FROM kubearq_schema_migrations ORDER BY version")
        assert await storage.migrate() == []
    again = await db.fetch("SELECT version, name, applied_at FROM kubearq_schema_migrations ORDER BY version")
    assert [tuple(row)[:2] for row in first] == [(1, "0001_scrape"), (2, "0002_sync"), (3, "0003_failed_jobs")]
    assert again == first
    tables = await db.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")
    assert [row["tablename"] for row in tables] == ["connections", "entities", "failed_jobs",
                                                    "kubearq_schema_migrations", "metric_snapshots",
                                                    "scrape_failures", "scrape_items"]


async def test_concurrent_workers_apply_each_migration_exactly_once(postgres_dsn: str, db: asyncpg.Connection) -> None:
    # A slow second migration keeps the race window open: without the lock the others would run it too
    # and fail on the existing table or the version's primary key.
    slow = Migration(NEXT, f"{NEXT:04d}_slow", "SELECT pg_sleep(0.3); CREATE TABLE slow_marker (id integer)")
    storages = [Storage(postgres_dsn, connect_timeout=30) for _ in range(4)]
    try:
        await asyncio.gather(*(storage.connect() for storage in storages))
        results = await asyncio.gather(*(storage.migrate([*MIGRATIONS, slow]) for storage in storages))
    finally:
        await asyncio.gather(*(storage.close() for storage in storages))
    assert sorted(results) == [[], [], [], [*SHIPPED, NEXT]]
    rows = await db.fetch("SELECT version, name FROM kubearq_schema_migrations ORDER BY version")
    assert [tuple(row) for row in rows] == [*((m.version, m.name) for m in MIGRATIONS), (NEXT, f"{NEXT:04d}_slow")]


async def test_a_new_migration_file_is_applied_alone_on_the_next_start(
    storage: Storage, db: asyncpg.Connection
) -> None:
    budgets = Migration(NEXT, f"{NEXT:04d}_budgets", "CREATE TABLE budgets (id uuid PRIMARY KEY)")
    assert await storage.migrate([*MIGRATIONS, budgets]) == [NEXT]
    assert await db.fetchval("SELECT to_regclass('budgets')::text") == "budgets"


async def test_a_failing_migration_is_rolled_back_and_not_recorded(storage: Storage, db: asyncpg.Connection) -> None:
    broken = Migration(NEXT, f"{NEXT:04d}_broken",
                       "CREATE TABLE half_done (id integer); SELECT no_such_column FROM half_done")
    with pytest.raises(asyncpg.UndefinedColumnError) as raised:
        await storage.migrate([*MIGRATIONS, broken])
    assert raised.value.__notes__ == [f"while applying migration {NEXT:04d}_broken to PostgreSQL at {storage.server}"]
    assert await db.fetchval("SELECT to_regclass('half_done')") is None
    assert await db.fetchval("SELECT max(version) FROM kubearq_schema_migrations") == SHIPPED[-1]


async def test_a_database_at_a_newer_schema_version_refuses_to_start(
    storage: Storage, db: asyncpg.Connection, postgres_dsn: str
) -> None:
    await db.execute("INSERT INTO kubearq_schema_migrations (version, name) VALUES ($1, 'from_the_future')", NEXT)
    with pytest.raises(SchemaTooNewError) as raised:
        await storage.migrate()
    assert str(raised.value) == (
        f"the database at {server_of(postgres_dsn)} has schema version {NEXT} (from_the_future), newer than the "
        f"newest this kubearq knows ({SHIPPED[-1]}): a newer kubearq migrated it; run that version or newer, "
        "or set allow_newer_schema to run this one anyway (e.g. for a rollback)"
    )


async def test_allow_newer_schema_runs_against_a_newer_database(storage: Storage, db: asyncpg.Connection) -> None:
    await db.execute("INSERT INTO kubearq_schema_migrations (version, name) VALUES ($1, 'from_the_future')", NEXT)
    assert await storage.migrate(allow_newer_schema=True) == []
    await storage.store_page_items(REQUEST, PAGE, EVENTS, "Event")
    assert await storage.count_items(REQUEST.uid) == 2


# --- items ---------------------------------------------------------------------------------------------


async def test_storing_the_same_page_twice_yields_the_same_rows(storage: Storage, db: asyncpg.Connection) -> None:
    await storage.store_page_items(REQUEST, PAGE, EVENTS, "Event")
    first = await item_rows(db)
    await storage.store_page_items(REQUEST, PAGE, EVENTS, "Event")
    assert (
        await item_rows(db)
        == first
        == [
            (PAGE, "shows", "concerts", 0, "Event", EVENTS[0]),
            (PAGE, "shows", "concerts", 1, "Event", EVENTS[1]),
        ]
    )


async def test_a_page_rescraped_with_fewer_items_leaves_no_stale_rows(storage: Storage, db: asyncpg.Connection) -> None:
    other_page = "https://example.com/events/43"
    await storage.store_page_items(REQUEST, PAGE, EVENTS, "Event")
    await storage.store_page_items(REQUEST, other_page, EVENTS, "Event")
    changed = {"@type": "MusicEvent", "name": "Night one (moved)"}
    await storage.store_page_items(REQUEST, PAGE, [changed], "Event")
    assert await item_rows(db) == [
        (PAGE, "shows", "concerts", 0, "Event", changed),
        (other_page, "shows", "concerts", 0, "Event", EVENTS[0]),
        (other_page, "shows", "concerts", 1, "Event", EVENTS[1]),
    ]


async def test_a_page_rescraped_with_no_items_keeps_none(storage: Storage, db: asyncpg.Connection) -> None:
    await storage.store_page_items(REQUEST, PAGE, EVENTS, "Event")
    await storage.store_page_items(REQUEST, PAGE, [], "Event")
    assert await item_rows(db) == []
    assert await storage.count_items(REQUEST.uid) == 0


async def test_unicode_and_a_one_megabyte_item_round_trip(storage: Storage, db: asyncpg.Connection) -> None:
    unicode = {"name": "Björk — 東京 🎵", "quote": 'say "hi"\\n', "nested": {"ключ": [1, 2.5, None, True]}}
    large = {"name": "big", "description": "x" * 1_000_000}
    await storage.store_page_items(REQUEST, PAGE, [unicode, large], "Event")
    assert [row[5] for row in await item_rows(db)] == [unicode, large]


async def test_count_items_counts_one_request_only(storage: Storage) -> None:
    await storage.store_page_items(REQUEST, PAGE, EVENTS, "Event")
    await storage.store_page_items(OTHER, PAGE, EVENTS[:1], "Event")
    assert (await storage.count_items(REQUEST.uid), await storage.count_items(OTHER.uid)) == (2, 1)


# --- failures and deletion -----------------------------------------------------------------------------


async def test_a_failure_is_recorded_and_a_repeat_updates_error_and_tries(
    storage: Storage, db: asyncpg.Connection
) -> None:
    await storage.record_failure(REQUEST, PAGE, "detail", "HTTP 503", 3)
    await storage.record_failure(REQUEST, PAGE, "detail", "timed out after 30 s", 5)
    assert await failure_rows(db) == [(PAGE, "detail", "timed out after 30 s", 5)]


async def test_failures_lists_the_first_ones_in_order(storage: Storage) -> None:
    for number in range(5):
        await storage.record_failure(REQUEST, f"{PAGE}/{number}", "listing", f"HTTP 50{number}", 1)
    failures = await storage.failures(REQUEST.uid, limit=3)
    assert [(f.url, f.page_kind, f.error, f.tries) for f in failures] == [
        (f"{PAGE}/{number}", "listing", f"HTTP 50{number}", 1) for number in range(3)
    ]
    assert failures[0].failed_at <= failures[1].failed_at <= failures[2].failed_at


async def test_a_long_error_is_truncated(storage: Storage, db: asyncpg.Connection) -> None:
    await storage.record_failure(REQUEST, PAGE, "detail", "E" * 10_000 + "\x00", 2)
    [(_, _, error, _)] = await failure_rows(db)
    assert error == "E" * 3999 + "…"


async def test_a_later_success_clears_the_failure(storage: Storage, db: asyncpg.Connection) -> None:
    await storage.record_failure(REQUEST, PAGE, "detail", "HTTP 503", 3)
    await storage.record_failure(OTHER, PAGE, "detail", "HTTP 503", 3)
    await storage.store_page_items(REQUEST, PAGE, EVENTS, "Event")
    assert await failure_rows(db) == []
    assert await failure_rows(db, OTHER) == [(PAGE, "detail", "HTTP 503", 3)]


async def test_delete_request_removes_that_request_only(storage: Storage, db: asyncpg.Connection) -> None:
    for request in (REQUEST, OTHER):
        await storage.store_page_items(request, PAGE, EVENTS, "Event")
        await storage.record_failure(request, f"{PAGE}/broken", "detail", "HTTP 404", 1)
    assert await storage.delete_request(REQUEST.uid) == DeletedRows(items=2, failures=1)
    assert await storage.delete_request(REQUEST.uid) == DeletedRows(items=0, failures=0)
    assert (await item_rows(db), await failure_rows(db)) == ([], [])
    assert len(await item_rows(db, OTHER)) == 2
    assert len(await failure_rows(db, OTHER)) == 1


# --- outages -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outage", ["stop", "kill"])
async def test_a_server_outage_raises_unavailable_and_the_same_storage_recovers(
    postgres_private: PostgresServer, outage: str
) -> None:
    dsn = postgres_private.dsn().replace("postgres@", "postgres:s3cret@")  # trust auth ignores it
    outages: list[tuple[str, str]] = []
    async with Storage(
        dsn, connect_timeout=30, on_unavailable=lambda op, e: outages.append((op, type(e).__name__))
    ) as (storage):
        await storage.migrate()
        await storage.store_page_items(REQUEST, PAGE, EVENTS, "Event")

        await asyncio.to_thread(getattr(postgres_private, outage))
        with pytest.raises(StorageUnavailableError) as raised:
            await storage.store_page_items(REQUEST, PAGE, EVENTS[:1], "Event")
        assert type(raised.value) is StorageUnavailableError
        message = str(raised.value)
        assert message.startswith(
            f"PostgreSQL at 127.0.0.1:{postgres_private.port} is unavailable (store_page_items): "
        )
        assert "s3cret" not in message
        assert [operation for operation, _ in outages] == ["store_page_items"]

        await asyncio.to_thread(postgres_private.start)
        assert await storage.count_items(REQUEST.uid) == 2  # the failed write changed nothing
        await storage.store_page_items(REQUEST, PAGE, EVENTS[:1], "Event")
        assert await storage.count_items(REQUEST.uid) == 1


async def test_a_connection_lost_mid_transaction_raises_unavailable_and_writes_nothing(
    storage: Storage, db: asyncpg.Connection
) -> None:
    await storage.store_page_items(REQUEST, PAGE, EVENTS, "Event")
    async with db.transaction():
        # Hold the page's rows so the store blocks inside its transaction, then cut its connection.
        await db.execute("LOCK TABLE scrape_failures IN ACCESS EXCLUSIVE MODE")
        store = asyncio.create_task(storage.store_page_items(REQUEST, PAGE, EVENTS[:1], "Event"))
        deadline = asyncio.get_running_loop().time() + 10
        while not (pid := await db.fetchval(WAITING_FOR_LOCK, "kubearq-worker")):
            assert asyncio.get_running_loop().time() < deadline, "the store never waited for the lock"
            await asyncio.sleep(0.02)
        assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises(StorageUnavailableError, match=r"unavailable \(store_page_items\): "):
            await store
    assert await item_rows(db) == [
        (PAGE, "shows", "concerts", 0, "Event", EVENTS[0]),
        (PAGE, "shows", "concerts", 1, "Event", EVENTS[1]),
    ]
    await storage.store_page_items(REQUEST, PAGE, EVENTS[:1], "Event")
    assert await storage.count_items(REQUEST.uid) == 1


WAITING_FOR_LOCK = """
    SELECT pid FROM pg_stat_activity
    WHERE application_name = $1 AND wait_event_type = 'Lock' AND datname = current_database()
"""


async def test_connect_waits_for_a_server_that_starts_later(postgres_private: PostgresServer) -> None:
    await asyncio.to_thread(postgres_private.stop)
    outages: list[str] = []

    async def start_in_two_seconds() -> None:
        await asyncio.sleep(2)  # the outage's length, an action: not a wait for a condition
        await asyncio.to_thread(postgres_private.start)

    starter = asyncio.create_task(start_in_two_seconds())
    loop = asyncio.get_running_loop()
    began = loop.time()
    storage = Storage(postgres_private.dsn(), connect_timeout=30, on_unavailable=lambda op, e: outages.append(op))
    try:
        await storage.connect()
        assert await storage.migrate() == SHIPPED
    finally:
        await storage.close()
        await starter
    assert 2 <= loop.time() - began < 30
    assert len(outages) >= 2
    assert set(outages) == {"connect"}


async def test_connect_gives_up_at_its_deadline(postgres_private: PostgresServer) -> None:
    await asyncio.to_thread(postgres_private.stop)
    storage = Storage(postgres_private.dsn(), connect_timeout=0.5)
    with pytest.raises(StorageUnavailableError) as raised:
        await storage.connect()
    assert str(raised.value).startswith(
        f"PostgreSQL at 127.0.0.1:{postgres_private.port} is unavailable (connect: gave up after "
    )


async def test_a_missing_database_fails_at_once_with_the_setting_named(postgres_dsn: str) -> None:
    dsn = postgres_dsn.rsplit("/", 1)[0] + "/no_such_database"
    storage = Storage(dsn, connect_timeout=30)
    with pytest.raises(StorageConfigError) as raised:
        await storage.connect()
    assert str(raised.value) == (
        f"DATABASE_URL: PostgreSQL at {server_of(dsn)} refused the connection: "
        'InvalidCatalogNameError: database "no_such_database" does not exist'
    )


async def test_using_storage_before_connecting_is_a_bug_said_clearly(postgres_dsn: str) -> None:
    with pytest.raises(RuntimeError, match="Storage is not connected"):
        await Storage(postgres_dsn).count_items(REQUEST.uid)
