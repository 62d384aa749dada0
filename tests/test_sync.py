"""The sync jobs on a real worker, PostgreSQL and Redis, pulling from a local ad platform (kubearq.demo.adplatform):
the fan-out, the three modes, compaction, and every bad input or fault kept on its own connection."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from arq.connections import ArqRedis

from kubearq.core.connections import create_redis
from kubearq.demo.adplatform import Account, AdPlatform, http_json_config, metrics_of, quarter_hours
from kubearq.demo.services import PostgresServer
from kubearq.worker.builtins import builtin_jobs
from kubearq.worker.main import WorkerService
from kubearq.worker.scrape.jobs import NetworkHooks
from kubearq.worker.settings import WorkerSettings
from kubearq.worker.storage import Storage
from kubearq.worker.sync.jobs import backfill_days, sync_job_id, sync_window
from kubearq.worker.sync.store import Connection, SyncStore
from tests.crd_rules import REPO
from tests.polling import until

TICK = datetime(2026, 3, 10, 10, 15, tzinfo=UTC)
WORKSPACE = uuid.UUID("00000000-0000-4000-8000-000000000001")
FAST = {"poll_delay": 0.01, "retry_backoff": 0.05, "retry_backoff_max": 0.1, "heartbeat_interval": 0.5,
        "in_progress_ttl": 2.0, "http_port": 0, "http_host": "127.0.0.1", "sync_request_timeout": 2.0}


def tick_id(moment: datetime, schedule: str = "realtime") -> str:
    """The id a SyncSchedule gives its tick's job (`kubearq:tick:<uid>:<seconds>`)."""
    return f"kubearq:tick:{schedule}:{int(moment.timestamp())}"


@pytest.fixture
def accounts() -> dict[str, Account]:
    return {"acme": Account("acme", "acme-token"), "globex": Account("globex", "globex-token", ad_sets=2)}


@pytest.fixture
async def platform(accounts: dict[str, Account]) -> AsyncIterator[AdPlatform]:
    async with AdPlatform(accounts) as server:
        yield server


@pytest.fixture
def secrets(tmp_path: Path, accounts: dict[str, Account]) -> Path:
    folder = tmp_path / "secrets"
    for account in accounts.values():
        (folder / "ads").mkdir(parents=True, exist_ok=True)
        (folder / "ads" / account.name).write_text(account.token)
    return folder


@pytest.fixture
async def store(postgres_dsn: str) -> AsyncIterator[SyncStore]:
    async with Storage(postgres_dsn, connect_timeout=30) as storage:
        await storage.migrate()
        yield SyncStore(storage)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    client = create_redis(redis_url)
    yield client
    await client.aclose()


async def connect(store: SyncStore, platform: AdPlatform, account: str, *, backfilled: bool = True,
                  credentials: str | None = None, **config: Any) -> Connection:
    """A connection to one account of the platform (already backfilled, unless said otherwise)."""
    added = await store.add_connection(
        workspace_id=WORKSPACE, provider="http-json", display_name=account, time_zone="UTC",
        config={**http_json_config(platform.base_url, account), **config},
        credentials_ref=credentials if credentials is not None else f"ads/{account}")
    if backfilled:
        async with store.storage.connection("test") as connection:
            await connection.execute("UPDATE connections SET backfilled_at = $2 WHERE id = $1", added.id, TICK)
    return added


@asynccontextmanager
async def sync_worker(redis_url: str, postgres_dsn: str, secrets: Path, **overrides: object
                      ) -> AsyncIterator[WorkerService]:
    settings = WorkerSettings.model_validate({"redis_url": redis_url, "database_url": postgres_dsn,
                                              "sync_secrets_dir": str(secrets), **FAST, **overrides})
    service = WorkerService(settings, builtin_jobs(settings, hooks=NetworkHooks()))
    await service.start()
    try:
        yield service
    finally:
        async with asyncio.timeout(30):
            await service.stop()


async def result_of(redis: ArqRedis, job_id: str, within: float = 30) -> dict[str, Any]:
    """The ARQ result of a job once it finished: `s` (succeeded) and `r` (its value or error)."""
    await until(lambda: _exists(redis, f"arq:result:{job_id}"), within=within, what=f"the result of {job_id}")
    result: dict[str, Any] = json.loads(await redis.get(f"arq:result:{job_id}"))
    return result


async def _exists(redis: ArqRedis, key: str) -> bool:
    return bool(await redis.exists(key))


async def fan_out(redis: ArqRedis, mode: str, moment: datetime = TICK) -> str:
    job_id = tick_id(moment, mode)
    job = await redis.enqueue_job("sync_connections", mode=mode, _job_id=job_id)
    assert job is not None
    return job_id


async def state(store: SyncStore, connection: Connection) -> Connection:
    found = await store.connection(connection.id)
    assert found is not None
    return found


async def rows(db: asyncpg.Connection, connection: Connection, granularity: str = "15m") -> list[asyncpg.Record]:
    query = ("SELECT * FROM metric_snapshots WHERE connection_id = $1 AND granularity = $2 "
             "ORDER BY captured_at, platform_id")
    found: list[asyncpg.Record] = await db.fetch(query, connection.id, granularity)
    return found


def expected_rows(account: Account, moments: Sequence[datetime]) -> list[tuple[datetime, str, Decimal, int]]:
    return [(at, ad, Decimal(str(metrics_of(account.name, ad, at)["spend"])), int(metrics_of(account.name, ad, at)[
        "impressions"])) for at in moments for ad in sorted(account.ads())]


def shown(found: Sequence[asyncpg.Record]) -> list[tuple[datetime, str, Decimal, int]]:
    return [(row["captured_at"], row["platform_id"], row["spend"], row["impressions"]) for row in found]


# --- Pure decisions ----------------------------------------------------------------------------------------


def test_windows_are_in_the_accounts_time_zone() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    today = sync_window("realtime", TICK, berlin)
    week = sync_window("attribution", TICK, berlin)
    assert (today.start, today.end) == (datetime(2026, 3, 9, 23, tzinfo=UTC), TICK)
    assert (week.start, week.end) == (datetime(2026, 3, 2, 23, tzinfo=UTC), datetime(2026, 3, 9, 23, tzinfo=UTC))


def test_a_backfill_covers_the_90_days_before_today_and_resumes_where_it_stopped() -> None:
    days = backfill_days(TICK, ZoneInfo("UTC"), None)
    assert (len(days), days[0], days[-1]) == (90, date(2025, 12, 10), date(2026, 3, 9))
    assert backfill_days(TICK, ZoneInfo("UTC"), date(2026, 3, 8)) == [date(2026, 3, 8), date(2026, 3, 9)]
    assert backfill_days(TICK, ZoneInfo("UTC"), date(2026, 3, 10)) == []


def test_job_ids_are_one_per_connection_mode_and_tick_and_one_backfill_per_connection() -> None:
    connection = uuid.UUID(int=7)
    assert sync_job_id(connection, "realtime", TICK) == f"kubearq:sync:{connection}:realtime:{int(TICK.timestamp())}"
    later = TICK + timedelta(minutes=15)
    assert sync_job_id(connection, "backfill", TICK) == sync_job_id(connection, "backfill", later)


# --- The fan-out and the modes -------------------------------------------------------------------------------


async def test_a_realtime_tick_syncs_today_of_every_connection_once(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, store: SyncStore, db: asyncpg.Connection,
        platform: AdPlatform, accounts: dict[str, Account], secrets: Path) -> None:
    acme, globex = await connect(store, platform, "acme"), await connect(store, platform, "globex")
    async with sync_worker(redis_url, postgres_dsn, secrets):
        first = await result_of(redis, await fan_out(redis, "realtime"))
        children = [sync_job_id(c.id, "realtime", TICK) for c in (acme, globex)]
        outcomes = [await result_of(redis, job_id) for job_id in children]
        again = await redis.enqueue_job("sync_connections", mode="realtime", _job_id=tick_id(TICK, "again"))
        assert again is not None
        repeated = await result_of(redis, tick_id(TICK, "again"))

    today = quarter_hours(datetime(2026, 3, 10, tzinfo=UTC), TICK)  # 41 quarter hours before 10:15
    assert first["r"] == {"mode": "realtime", "tick": TICK.isoformat(), "enqueued": 2, "alreadyEnqueued": 0,
                          "skipped": {}, "backfills": 0}
    assert [o["r"]["points"] for o in outcomes] == [41 * 2, 41 * 4]
    assert repeated["r"]["alreadyEnqueued"] == 2  # the same tick: nothing synced twice
    assert shown(await rows(db, acme)) == expected_rows(accounts["acme"], today)
    assert len(await rows(db, globex)) == 41 * 4
    synced = await state(store, acme)
    assert (synced.sync_status, synced.total_syncs_attempted, synced.total_syncs_succeeded) == ("idle", 1, 1)
    assert await db.fetchval("SELECT count(*) FROM entities WHERE connection_id = $1", acme.id) == 4


async def test_a_new_connection_gets_its_90_day_backfill_first(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, store: SyncStore, db: asyncpg.Connection,
        platform: AdPlatform, accounts: dict[str, Account], secrets: Path) -> None:
    new = await connect(store, platform, "acme", backfilled=False)
    async with sync_worker(redis_url, postgres_dsn, secrets):
        fanned = await result_of(redis, await fan_out(redis, "realtime"))
        backfill = await result_of(redis, sync_job_id(new.id, "backfill", TICK), within=60)

    assert (fanned["r"]["enqueued"], fanned["r"]["backfills"]) == (1, 1)
    assert (backfill["s"], backfill["r"]["days"], backfill["r"]["points"]) == (True, 90, 90 * 96 * 2)
    done = await state(store, new)
    assert (done.backfilled_at is not None, done.backfill_next_day, done.sync_status) == (True, None, "idle")
    assert await db.fetchval("SELECT count(*) FROM metric_snapshots WHERE connection_id = $1", new.id) == 90 * 96 * 2


async def test_attribution_refetches_the_last_7_days_replacing_what_the_platform_corrected(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, store: SyncStore, db: asyncpg.Connection,
        platform: AdPlatform, secrets: Path) -> None:
    acme = await connect(store, platform, "acme")
    stale = datetime(2026, 3, 5, 12, tzinfo=UTC)
    async with store.storage.connection("test") as connection:
        await connection.execute("INSERT INTO metric_snapshots (connection_id, granularity, captured_at, platform_id, "
                                 "spend) VALUES ($1, '15m', $2, 'acme-s1-a1', 999)", acme.id, stale)
    async with sync_worker(redis_url, postgres_dsn, secrets):
        await result_of(redis, await fan_out(redis, "attribution"))
        outcome = await result_of(redis, sync_job_id(acme.id, "attribution", TICK))

    assert outcome["r"]["points"] == 7 * 96 * 2
    corrected = await db.fetchval("SELECT spend FROM metric_snapshots WHERE connection_id = $1 AND captured_at = $2 "
                                  "AND platform_id = 'acme-s1-a1'", acme.id, stale)
    assert corrected == Decimal(str(metrics_of("acme", "acme-s1-a1", stale)["spend"]))
    assert len(await rows(db, acme)) == 7 * 96 * 2  # replaced, never doubled


async def test_compaction_rolls_quarter_hours_older_than_a_day_into_hours(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, store: SyncStore, db: asyncpg.Connection,
        platform: AdPlatform, secrets: Path) -> None:
    acme = await connect(store, platform, "acme")
    async with sync_worker(redis_url, postgres_dsn, secrets):
        await result_of(redis, await fan_out(redis, "attribution"))  # 7 days of quarter hours
        await result_of(redis, sync_job_id(acme.id, "attribution", TICK))
        job = await redis.enqueue_job("compact_snapshots", older_than_hours=24, _job_id=tick_id(TICK, "compact"))
        assert job is not None
        compacted = await result_of(redis, tick_id(TICK, "compact"))
        again = await redis.enqueue_job("compact_snapshots", _job_id=tick_id(TICK, "compact-again"))
        assert again is not None
        second = await result_of(redis, tick_id(TICK, "compact-again"))

    # older than a day: before 2026-03-09 10:00 (the tick's hour a day earlier); the 14 hours after it stay
    kept = 14 * 4 * 2
    assert compacted["r"]["rowsCompacted"] == 7 * 96 * 2 - kept
    assert (compacted["r"]["hourlyRows"], compacted["r"]["connectionDays"]) == ((7 * 96 * 2 - kept) // 4, 7)
    assert len(await rows(db, acme)) == kept
    assert second["r"]["rowsCompacted"] == 0
    hour = datetime(2026, 3, 4, 13, tzinfo=UTC)
    [rolled] = [row for row in await rows(db, acme, "1h") if row["captured_at"] == hour
                and row["platform_id"] == "acme-s1-a1"]
    quarters = [metrics_of("acme", "acme-s1-a1", hour + timedelta(minutes=15 * n)) for n in range(4)]
    assert rolled["impressions"] == sum(int(q["impressions"]) for q in quarters)
    assert rolled["spend"] == sum(Decimal(str(q["spend"])) for q in quarters)
    assert rolled["extra"] == {"video_views": sum(q["video_views"] for q in quarters), "daily_budget": 113}


# --- Bad input and faults, each kept on its own connection ------------------------------------------------


async def test_connections_that_cannot_be_synced_keep_why_and_the_others_are_synced(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, store: SyncStore, platform: AdPlatform,
        secrets: Path) -> None:
    fine = await connect(store, platform, "acme")
    no_key = await connect(store, platform, "globex", credentials="ads/nobody")
    no_provider = await store.add_connection(workspace_id=WORKSPACE, provider="tiktok-ads", display_name="t",
                                             config={}, credentials_ref="ads/acme", time_zone="UTC")
    private = await connect(store, platform, "acme", allowPrivateNetworks=False)
    async with sync_worker(redis_url, postgres_dsn, secrets):
        fanned = await result_of(redis, await fan_out(redis, "realtime"))
        await result_of(redis, sync_job_id(fine.id, "realtime", TICK))
        refused = await result_of(redis, sync_job_id(private.id, "realtime", TICK))

    assert fanned["r"]["enqueued"] == 2
    assert fanned["r"]["skipped"] == {"No token configured. Please reconnect.": 1,
                                      "unknown provider 'tiktok-ads': this worker has http-json, meta-ads": 1}
    assert (await state(store, no_key)).last_sync_error == (
        "No token configured. Please reconnect. (the workers have no key ads/nobody in SYNC_SECRETS_DIR)")
    assert (await state(store, no_provider)).last_sync_error == (
        "unknown provider 'tiktok-ads': this worker has http-json, meta-ads (install the package that provides it)")
    kept = (await state(store, private)).last_sync_error or ""
    assert kept.startswith(f"refused {platform.base_url}/v1/accounts/acme/entities: 127.0.0.1 is a loopback address")
    assert kept.endswith("set allowPrivateNetworks: true in the connection's config to allow it")
    assert refused["s"] is False
    assert (await state(store, fine)).sync_status == "idle"


async def test_an_expired_token_marks_only_its_connection_error(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, store: SyncStore, platform: AdPlatform,
        accounts: dict[str, Account], secrets: Path) -> None:
    acme, globex = await connect(store, platform, "acme"), await connect(store, platform, "globex")
    accounts["acme"].token = "rotated-by-the-platform"
    async with sync_worker(redis_url, postgres_dsn, secrets):
        await result_of(redis, await fan_out(redis, "realtime"))
        failed = await result_of(redis, sync_job_id(acme.id, "realtime", TICK))
        await result_of(redis, sync_job_id(globex.id, "realtime", TICK))

    assert (failed["s"], (await state(store, acme)).sync_status) == (False, "error")
    assert (await state(store, acme)).last_sync_error == (
        f"{platform.base_url}/v1/accounts/acme/entities rejected the token (HTTP 401 Unauthorized). Please reconnect.")
    assert (await state(store, globex)).sync_status == "idle"


async def test_a_throttled_platform_defers_the_sync_without_spending_a_try(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, store: SyncStore, platform: AdPlatform,
        accounts: dict[str, Account], secrets: Path) -> None:
    acme = await connect(store, platform, "acme")
    accounts["acme"].throttle = 2
    async with sync_worker(redis_url, postgres_dsn, secrets) as worker:
        await result_of(redis, await fan_out(redis, "realtime"))
        outcome = await result_of(redis, sync_job_id(acme.id, "realtime", TICK))
        deferred = worker.metrics.jobs_deferred.labels("sync_connection")._value.get()

    assert (outcome["s"], outcome["t"]) == (True, 1)  # try 1: the deferrals were refunded
    assert deferred == 2


async def test_a_malformed_answer_is_kept_on_the_connection(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, store: SyncStore, platform: AdPlatform,
        accounts: dict[str, Account], secrets: Path) -> None:
    acme = await connect(store, platform, "acme")
    accounts["acme"].garbage = True
    async with sync_worker(redis_url, postgres_dsn, secrets):
        await result_of(redis, await fan_out(redis, "realtime"))
        await result_of(redis, sync_job_id(acme.id, "realtime", TICK))

    assert (await state(store, acme)).last_sync_error == (
        f"malformed answer from {platform.base_url}/v1/accounts/acme/entities: the body is not JSON (Expecting "
        "value: line 1 column 1 (char 0))")


async def test_a_platform_that_hangs_times_out_is_retried_and_its_error_kept_after_the_last_try(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, store: SyncStore, platform: AdPlatform,
        accounts: dict[str, Account], secrets: Path) -> None:
    acme = await connect(store, platform, "acme")
    accounts["acme"].hang = True
    async with sync_worker(redis_url, postgres_dsn, secrets, sync_request_timeout=0.3):
        await result_of(redis, await fan_out(redis, "realtime"))
        failed = await result_of(redis, sync_job_id(acme.id, "realtime", TICK), within=60)

    assert (failed["s"], failed["t"]) == (False, 5)
    kept = await state(store, acme)
    assert (kept.sync_status, kept.total_syncs_attempted) == ("error", 1)
    assert kept.last_sync_error == (f"after 5 tries: gave up on {platform.base_url}/v1/accounts/acme/entities "
                                    "after 0.3 s without a complete answer")


async def test_bad_job_arguments_fail_at_once_with_the_reason(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, store: SyncStore, platform: AdPlatform,
        secrets: Path) -> None:
    acme = await connect(store, platform, "acme")
    jobs: dict[str, tuple[str, dict[str, Any]]] = {
            "weekly": ("sync_connections", {"mode": "weekly"}),
            "weekly-one": ("sync_connection", {"connection_id": str(acme.id), "mode": "weekly"}),
            "nobody": ("sync_connection", {"connection_id": str(uuid.UUID(int=1)), "mode": "realtime"}),
            "not-an-id": ("sync_connection", {"connection_id": "acme", "mode": "realtime"})}
    for job_id, (function, kwargs) in jobs.items():
        assert await redis.enqueue_job(function, _job_id=job_id, **kwargs) is not None
    async with sync_worker(redis_url, postgres_dsn, secrets):
        results = {job_id: await result_of(redis, job_id) for job_id in jobs}

    assert {job_id: (r["s"], r["t"], r["r"]["error"]) for job_id, r in results.items()} == {
        "weekly": (False, 1, "GiveUp: unknown mode 'weekly': one of realtime, attribution, backfill"),
        "weekly-one": (False, 1, "GiveUp: unknown mode 'weekly': one of realtime, attribution, backfill"),
        "nobody": (False, 1, f"GiveUp: no connection {uuid.UUID(int=1)}: it was deleted, or never added "
                             "(`kubearq connections list`)"),
        "not-an-id": (False, 1, "GiveUp: 'acme' is not a connection id (a UUID; `kubearq connections list` shows "
                                "them)"),
    }
    assert (await state(store, acme)).sync_status == "idle"


async def _backfilled_to(store: SyncStore, connection: Connection, day: date) -> bool:
    found = await store.connection(connection.id)
    return found is not None and found.backfill_next_day is not None and found.backfill_next_day >= day


def worker_process(redis_url: str, postgres_dsn: str, secrets: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": postgres_dsn, "SYNC_SECRETS_DIR": str(secrets),
           "HTTP_PORT": "0", "HTTP_HOST": "127.0.0.1", "HEARTBEAT_INTERVAL": "1", "IN_PROGRESS_TTL": "3",
           "POLL_DELAY": "0.01"}
    with log.open("wb") as sink:
        return subprocess.Popen([sys.executable, "-m", "kubearq.cli", "worker"], env=env, cwd=REPO, stdout=sink,
                                stderr=subprocess.STDOUT)


@pytest.mark.timeout(180)
async def test_a_worker_killed_mid_backfill_resumes_where_it_stopped_and_stores_every_day_once(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, store: SyncStore, db: asyncpg.Connection,
        platform: AdPlatform, accounts: dict[str, Account], secrets: Path, tmp_path: Path) -> None:
    new = await connect(store, platform, "acme", backfilled=False)
    accounts["acme"].delay = 0.05
    job_id = sync_job_id(new.id, "backfill", TICK)
    await redis.enqueue_job("sync_connection", connection_id=str(new.id), mode="backfill", tick=TICK.isoformat(),
                            _job_id=job_id)
    doomed = worker_process(redis_url, postgres_dsn, secrets, tmp_path / "worker.log")
    try:
        await until(lambda: _backfilled_to(store, new, date(2026, 1, 1)), within=60, what="a third of the backfill")
        doomed.kill()
        doomed.wait(timeout=10)
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait(timeout=10)
    stopped_at = (await state(store, new)).backfill_next_day
    before_resume = len([path for path in platform.requests if "/metrics" in path])
    async with sync_worker(redis_url, postgres_dsn, secrets, in_progress_ttl=3.0, heartbeat_interval=1.0):
        outcome = await result_of(redis, job_id, within=90)

    assert stopped_at is not None
    assert outcome["s"] is True
    assert outcome["r"]["days"] == (date(2026, 3, 10) - stopped_at).days  # it went on from where it stopped
    fetched = [path for path in platform.requests if "/metrics" in path]
    assert len(fetched) - before_resume == outcome["r"]["days"]
    assert await db.fetchval("SELECT count(*) FROM metric_snapshots WHERE connection_id = $1", new.id) == 90 * 96 * 2
    assert (await state(store, new)).backfilled_at is not None


@pytest.mark.timeout(180)
async def test_postgresql_down_20_s_mid_backfill_is_waited_out_and_nothing_is_lost(
        redis: ArqRedis, redis_url: str, postgres_private: PostgresServer, platform: AdPlatform,
        accounts: dict[str, Account], secrets: Path) -> None:
    dsn = postgres_private.create_database("sync")
    async with Storage(dsn, connect_timeout=30) as storage:
        await storage.migrate()
        store = SyncStore(storage)
        new = await connect(store, platform, "acme", backfilled=False)
    accounts["acme"].delay = 0.05
    job_id = sync_job_id(new.id, "backfill", TICK)
    await redis.enqueue_job("sync_connection", connection_id=str(new.id), mode="backfill", tick=TICK.isoformat(),
                            _job_id=job_id)
    async with sync_worker(redis_url, dsn, secrets) as worker:
        async with Storage(dsn, connect_timeout=30) as watching:
            await until(lambda: _backfilled_to(SyncStore(watching), new, date(2026, 1, 1)), within=60,
                        what="a third of the backfill")
        postgres_private.stop()
        await asyncio.sleep(20)  # the outage itself: the job meanwhile defers itself, spending no try
        postgres_private.start()
        outcome = await result_of(redis, job_id, within=90)
        deferred = worker.metrics.jobs_deferred.labels("sync_connection")._value.get()

    assert (outcome["s"], outcome["t"]) == (True, 1)
    assert deferred >= 1
    check = await asyncpg.connect(dsn)
    try:
        assert await check.fetchval("SELECT count(*) FROM metric_snapshots") == 90 * 96 * 2
        assert await check.fetchval("SELECT sync_status FROM connections") == "idle"
    finally:
        await check.close()
