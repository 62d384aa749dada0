"""A simulated day of the seed's metric-sync system: the three example SyncSchedules (every 15 minutes realtime,
03:00 attribution, 01:00 compaction) fired by the operator's reconciler on a clock the test moves, run by a real
worker into a real PostgreSQL from a local ad platform. 96 realtime ticks, one attribution, one compaction."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from arq.connections import ArqRedis

from kubearq.core.connections import create_redis
from kubearq.core.contract import function_registry_key
from kubearq.demo.adplatform import Account, AdPlatform, metrics_of, quarter_hours
from kubearq.operator.context import SYNC_SCHEDULES, OperatorContext, rfc3339
from kubearq.operator.metrics import OperatorMetrics
from kubearq.operator.schedules import reconcile_schedule
from kubearq.operator.settings import OperatorSettings
from kubearq.worker.storage import Storage
from kubearq.worker.sync.store import SyncStore
from tests.crd_rules import REPO
from tests.kubernetes import KubernetesUnderTest
from tests.polling import until
from tests.scheduling import Clock
from tests.test_sync import FAST, connect, state, sync_worker

DAY = datetime(2026, 3, 10, tzinfo=UTC)
EXAMPLES = {name: yaml.safe_load((REPO / "manifests" / "examples" / f"syncschedule-{name}.yaml").read_text())
            for name in ("realtime", "attribution", "compaction")}
FAILING_TICK = DAY + timedelta(hours=12)


@pytest.fixture
def accounts() -> dict[str, Account]:
    return {"acme": Account("acme", "acme-token"), "globex": Account("globex", "globex-token", ad_sets=2),
            "initech": Account("initech", "initech-token", ads_per_set=1)}


@pytest.fixture
async def platform(accounts: dict[str, Account]) -> AsyncIterator[AdPlatform]:
    async with AdPlatform(accounts) as server:
        yield server


@pytest.fixture
def secrets(tmp_path: Path, accounts: dict[str, Account]) -> Path:
    folder = tmp_path / "secrets" / "ads"
    folder.mkdir(parents=True)
    for account in accounts.values():
        (folder / account.name).write_text(account.token)
    return folder.parent


async def schedules(k8s: KubernetesUnderTest) -> list[str]:
    """The example SyncSchedules as they are (jitter aside: it defers jobs in real time), their last tick just
    before the day, so the day's ticks are due as the clock moves."""
    names = []
    for example in EXAMPLES.values():
        body = copy.deepcopy(example)
        body["spec"]["jitterSeconds"] = 0
        await k8s.api.create(SYNC_SCHEDULES, body, namespace=k8s.namespace, timeout=10)
        name = body["metadata"]["name"]
        await k8s.api.patch_status(SYNC_SCHEDULES, name, {"lastScheduleTime": rfc3339(DAY - timedelta(minutes=15))},
                                   namespace=k8s.namespace, timeout=10)
        names.append(name)
    return names


async def drained(redis: ArqRedis) -> bool:
    return bool(await redis.zcard("arq:queue") == 0)


async def served(redis: ArqRedis) -> bool:
    return bool(await redis.hexists(function_registry_key("arq:queue"), "sync_connections"))  # type: ignore[misc]


@pytest.mark.timeout(300)
async def test_a_day_of_syncs_stores_every_snapshot_once_and_rolls_old_ones_into_hours(
        k8s: KubernetesUnderTest, redis_url: str, postgres_dsn: str, db: asyncpg.Connection,
        platform: AdPlatform, accounts: dict[str, Account], secrets: Path) -> None:
    async with Storage(postgres_dsn, connect_timeout=30) as storage:
        await storage.migrate()
        store = SyncStore(storage)
        acme = await connect(store, platform, "acme", backfilled=False)  # new: backfilled at the first tick
        globex, initech = await connect(store, platform, "globex"), await connect(store, platform, "initech")
        names = await schedules(k8s)
        redis = create_redis(redis_url)
        clock = Clock(DAY)
        ctx = OperatorContext(api=k8s.api, redis=redis, metrics=OperatorMetrics(), ensure_leader=lambda: None,
                              settings=OperatorSettings(status_interval=1.0), now=clock)
        failing: dict[str, Any] = {}
        try:
            async with sync_worker(redis_url, postgres_dsn, secrets, **FAST):
                await until(lambda: served(redis), what="the worker publishing its functions")
                for step in range(96):
                    tick = DAY + timedelta(minutes=15 * step)
                    accounts["globex"].fail = tick == FAILING_TICK
                    clock.moment = tick + timedelta(seconds=1)
                    for name in names:
                        await reconcile_schedule(ctx, await k8s.api.get(SYNC_SCHEDULES, name,
                                                                        namespace=k8s.namespace, timeout=10))
                    await until(lambda: drained(redis), within=60, what=f"the jobs of {rfc3339(tick)}")
                    if tick == FAILING_TICK:
                        failing = {c.display_name: (c.sync_status, c.last_sync_error)
                                   for c in await store.connections(active_only=True)}
            final = {name: (await k8s.api.get(SYNC_SCHEDULES, name, namespace=k8s.namespace, timeout=10))["status"]
                     for name in names}
            states = {c.display_name: c for c in [await state(store, c) for c in (acme, globex, initech)]}
        finally:
            await redis.aclose()

    assert final["sync-realtime"]["lastScheduleTime"] == rfc3339(DAY + timedelta(hours=23, minutes=45))
    assert final["sync-attribution"]["lastScheduleTime"] == rfc3339(DAY + timedelta(hours=3))
    assert final["compact-snapshots"]["lastScheduleTime"] == rfc3339(DAY + timedelta(hours=1))
    assert await db.fetchval("SELECT count(*) FROM entities") == 4 + 7 + 3

    # one provider failing for one connection: only that one is `error`, and the next tick recovers it
    assert failing["globex"][0] == "error"
    assert failing["globex"][1] == (f"after 5 tries: {platform.base_url}/v1/accounts/globex/entities answered HTTP "
                                    "503 Service Unavailable")
    assert (failing["acme"], failing["initech"]) == (("idle", None), ("idle", None))
    assert {name: (c.sync_status, c.total_syncs_attempted, c.total_syncs_succeeded) for name, c in states.items()} == {
        "acme": ("idle", 97, 97), "globex": ("idle", 97, 96), "initech": ("idle", 97, 97)}  # 96 ticks + attribution

    # every quarter hour of the day so far, once, as the platform reported it
    today = quarter_hours(DAY, DAY + timedelta(hours=23, minutes=45))
    for connection, account in ((globex, accounts["globex"]), (initech, accounts["initech"])):
        found = await db.fetch("SELECT captured_at, platform_id, spend, clicks FROM metric_snapshots WHERE "
                               "connection_id = $1 AND granularity = '15m' AND captured_at >= $2 "
                               "ORDER BY captured_at, platform_id", connection.id, DAY)
        reported = [(at, ad, metrics_of(account.name, ad, at)) for at in today for ad in sorted(account.ads())]
        assert [tuple(row) for row in found] == [(at, ad, Decimal(repr(values["spend"])), values["clicks"])
                                                 for at, ad, values in reported]

    # the backfill's days older than a day at 01:00 became hours: counters summed, the gauge's last value
    hours = await db.fetch("SELECT captured_at, platform_id, impressions, spend, extra FROM metric_snapshots WHERE "
                           "connection_id = $1 AND granularity = '1h' ORDER BY captured_at, platform_id", acme.id)
    assert len(hours) == (89 * 24 + 1) * 2  # 12-10 00:00 .. 03-09 00:59: 89 days and an hour, two ads
    for row in hours[::97]:
        quarters = [metrics_of("acme", row["platform_id"], row["captured_at"] + timedelta(minutes=15 * n))
                    for n in range(4)]
        assert row["impressions"] == sum(int(q["impressions"]) for q in quarters)
        assert row["spend"] == sum(Decimal(repr(q["spend"])) for q in quarters)
        assert row["extra"] == {"video_views": sum(int(q["video_views"]) for q in quarters),
                                "daily_budget": quarters[-1]["daily_budget"]}
    # and the attribution's re-fetch at 03:00 wrote the 7 days before today as quarter hours again
    assert await db.fetchval("SELECT count(*) FROM metric_snapshots WHERE connection_id = $1 AND granularity = '15m' "
                             "AND captured_at < $2", acme.id, DAY - timedelta(hours=23)) == (6 * 96 + 4) * 2
