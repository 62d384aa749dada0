"""The sync family at size: compaction of 1 million 15-minute snapshots against a plain INSERT ... SELECT ... GROUP BY
doing the same roll-up in the same run, and the fan-out of 10,000 connections (time to enqueue every sync).

Compaction: kubearq rolls each connection-day up in one statement that also removes the quarter hours (one
transaction per connection-day, the crash-safe way); the anchor is one statement over the whole table that only
inserts the hourly rows. Target: ratio (anchor time / kubearq time) >= 0.8. Fan-out: target < 1 s.

    .venv/bin/python -m bench.sync [--rows 1000000] [--connections 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from kubearq.core.connections import create_redis
from kubearq.demo.services import PostgresServer, RedisServer
from kubearq.worker.runtime import Backoff
from kubearq.worker.storage import Storage
from kubearq.worker.sync.credentials import SecretsDir
from kubearq.worker.sync.http import ApiClient
from kubearq.worker.sync.jobs import CONTEXT_KEY, SyncResources, compact_snapshots, sync_connections
from kubearq.worker.sync.provider import load_providers
from kubearq.worker.sync.store import SyncStore

COMPACTION_TARGET = 0.8
FAN_OUT_TARGET_SECONDS = 1.0
START = datetime(2026, 1, 1, tzinfo=UTC)
ADS_PER_CONNECTION = 5
CONFIG = {"entitiesUrl": "https://ads.example/e", "metricsUrl": "https://ads.example/m?s={start}&e={end}",
          "metrics": {"values": {"spend": {"path": "spend"}}}}

ANCHOR = """
INSERT INTO anchor_hourly (connection_id, granularity, captured_at, platform_id, spend, impressions, clicks,
                           conversions, revenue, extra)
SELECT connection_id, '1h', date_trunc('hour', captured_at, 'UTC'), platform_id, sum(spend), sum(impressions),
       sum(clicks), sum(conversions), sum(revenue), '{}'::jsonb
FROM metric_snapshots WHERE granularity = '15m' GROUP BY 1, 3, 4
"""


async def fill(connection: asyncpg.Connection, store: SyncStore, rows: int) -> list[uuid.UUID]:
    connections = max(1, rows // (ADS_PER_CONNECTION * 96 * 20))  # 20 days of quarter hours each
    quarters = rows // (connections * ADS_PER_CONNECTION)
    ids = [(await store.add_connection(workspace_id=uuid.uuid4(), provider="http-json", display_name=f"c{n}",
                                       config=CONFIG, credentials_ref="ads/token", time_zone="UTC")).id
           for n in range(connections)]
    await connection.execute(
        """INSERT INTO metric_snapshots (connection_id, granularity, captured_at, platform_id, spend, impressions,
                                         clicks, conversions, revenue)
           SELECT c, '15m', $2::timestamptz + q * interval '15 minutes', 'ad-' || a, (q % 97) / 10.0, q % 1000,
                  q % 37, q % 3, (q % 89) / 10.0
           FROM unnest($1::uuid[]) AS c, generate_series(0, $3 - 1) AS q, generate_series(1, $4) AS a
           ORDER BY c, q, a""",  # as syncs write them: one connection's window at a time
        ids, START, quarters, ADS_PER_CONNECTION)
    await connection.execute("ANALYZE metric_snapshots")
    return ids


@dataclass(frozen=True)
class Compaction:
    """Seconds kubearq's `compact_snapshots` and the plain anchor statement took over the same `rows`."""

    rows: int
    connections: int
    connection_days: int
    hourly_rows: int
    kubearq_s: float
    anchor_s: float

    @property
    def ratio(self) -> float:
        return self.anchor_s / self.kubearq_s


@dataclass(frozen=True)
class FanOut:
    """Seconds `sync_connections` took to enqueue one sync per connection: first tick after start, and the next."""

    connections: int
    cold_s: float
    warm_s: float


async def compaction(dsn: str, rows: int) -> Compaction:
    async with Storage(dsn, connect_timeout=30, command_timeout=3600) as storage:
        await storage.migrate()
        store = SyncStore(storage)
        connection = await asyncpg.connect(dsn)
        try:
            ids = await fill(connection, store, rows)
            total = await connection.fetchval("SELECT count(*) FROM metric_snapshots")
            await connection.execute("CREATE TABLE anchor_hourly (LIKE metric_snapshots INCLUDING ALL)")
            started = time.perf_counter()
            await connection.execute(ANCHOR)
            anchor = time.perf_counter() - started
            anchor_rows = await connection.fetchval("SELECT count(*) FROM anchor_hourly")
            await connection.execute("CHECKPOINT")
            resources = SyncResources(store=store, providers=load_providers(), secrets=SecretsDir(None),
                                      api=ApiClient(), queue="arq:queue", storage_backoff=Backoff(0.1, 1),
                                      now=lambda: START + timedelta(days=400))
            started = time.perf_counter()
            result = await compact_snapshots({CONTEXT_KEY: resources, "job_id": "compact", "job_try": 1})
            ours = time.perf_counter() - started
            moved, written, days = (int(result[key]) for key in ("rowsCompacted", "hourlyRows",  # type: ignore[call-overload]
                                                                  "connectionDays"))
            differing = await connection.fetchval(
                """SELECT count(*) FROM anchor_hourly a FULL JOIN (SELECT * FROM metric_snapshots
                   WHERE granularity = '1h') k USING (connection_id, captured_at, platform_id)
                   WHERE a.spend IS DISTINCT FROM k.spend OR a.impressions IS DISTINCT FROM k.impressions""")
        finally:
            await connection.close()
    if moved != total or written != anchor_rows or differing:
        raise RuntimeError(f"compaction moved {moved} of {total}, wrote {written} hours (anchor {anchor_rows}), "
                           f"{differing} hourly rows differ from the anchor's")
    return Compaction(rows=total, connections=len(ids), connection_days=days, hourly_rows=written, kubearq_s=ours,
                      anchor_s=anchor)


def show_compaction(result: Compaction) -> None:
    total, ours, anchor, ratio = result.rows, result.kubearq_s, result.anchor_s, result.ratio
    print(f"compaction of {total:,} 15-minute snapshots ({result.connections} connections, "
          f"{result.connection_days} connection-days) into {result.hourly_rows:,} hourly rows")
    print(f"  kubearq compact_snapshots (a transaction per connection-day, removing the quarter hours): {ours:.2f}s  "
          f"({total / ours:,.0f} rows/s)")
    print(f"  plain INSERT ... SELECT ... GROUP BY (one statement, nothing removed):    {anchor:.2f}s  "
          f"({total / anchor:,.0f} rows/s)")
    print(f"  ratio: {ratio:.2f}x (target >= {COMPACTION_TARGET}: {'met' if ratio >= COMPACTION_TARGET else 'MISSED'})")


async def fan_out(dsn: str, redis_url: str, count: int) -> FanOut:
    folder = Path(tempfile.mkdtemp(prefix="kubearq-bench-secrets-"))
    (folder / "ads").mkdir()
    (folder / "ads" / "token").write_text("bench-token")
    redis = create_redis(redis_url)
    async with Storage(dsn, connect_timeout=30) as storage, ApiClient() as api:
        await storage.migrate()
        store = SyncStore(storage)
        async with storage.connection("bench") as connection:
            await connection.execute(
                """INSERT INTO connections (workspace_id, provider, display_name, config, credentials_ref,
                                            backfilled_at)
                   SELECT gen_random_uuid(), 'http-json', 'c' || n, $1::jsonb, 'ads/token', now()
                   FROM generate_series(1, $2) AS n""", CONFIG, count)
        resources = SyncResources(store=store, providers=load_providers(), secrets=SecretsDir(folder), api=api,
                                  queue="arq:queue", storage_backoff=Backoff(0.1, 1))
        timings = []
        for tick in (1767225600, 1767226500):  # a cold fan-out (the worker just started), then the next tick's
            await redis.flushdb()
            ctx = {CONTEXT_KEY: resources, "redis": redis, "job_id": f"kubearq:tick:bench:{tick}", "job_try": 1}
            started = time.perf_counter()
            result = await sync_connections(ctx, mode="realtime")
            timings.append(time.perf_counter() - started)
            queued = await redis.zcard("arq:queue")
            if result["enqueued"] != count or queued != count:
                raise RuntimeError(f"fan-out enqueued {result['enqueued']} ({queued} queued) of {count}")
    await redis.aclose()
    cold, warm = timings
    return FanOut(count, cold, warm)


def show_fan_out(result: FanOut) -> None:
    warm = result.warm_s
    print(f"fan-out of {result.connections:,} connections (list, check each one's credentials file, enqueue in one "
          "round trip):")
    print(f"  first tick after start: {result.cold_s:.3f}s; every later tick (configs validated once): {warm:.3f}s "
          f"(target < {FAN_OUT_TARGET_SECONDS:g}s: {'met' if warm < FAN_OUT_TARGET_SECONDS else 'MISSED'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--connections", type=int, default=10_000)
    options = parser.parse_args()
    with PostgresServer(synchronous_commit=False) as postgres, RedisServer() as redis:
        compacted = asyncio.run(compaction(postgres.create_database("compaction"), options.rows))
        show_compaction(compacted)
        fanned = asyncio.run(fan_out(postgres.create_database("fanout"), redis.url, options.connections))
        show_fan_out(fanned)
    raise SystemExit(0 if compacted.ratio >= COMPACTION_TARGET and fanned.warm_s < FAN_OUT_TARGET_SECONDS else 1)


if __name__ == "__main__":
    main()
