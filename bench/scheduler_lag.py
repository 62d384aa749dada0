"""Scheduler lag: N SyncSchedules all due on the same minute, from the tick to each job's enqueue.

    .venv/bin/python -m bench.scheduler_lag [--schedules 10000]

Runs the leader's loop (operator/kubearq/operator/main.py `lead`) against the API emulator and a private
redis-server, with a clock that reads the tick plus real elapsed time, so each enqueue's recorded lag is
the real time it waited. Prints lag p50/p99/max (issue target: p99 <= 1 s at 10,000 schedules), the
status writes' share, and the process's peak memory. Setup (creating the objects) is not timed.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kopf

from kubearq.operator.context import SYNC_SCHEDULES, OperatorContext
from kubearq.operator.kube import KubeApi
from kubearq.operator.main import ResourceStore, lead
from kubearq.operator.metrics import OperatorMetrics
from kubearq.operator.schedules import reconcile_schedule
from kubearq.operator.settings import OperatorSettings
from kubearq.worker.connections import create_redis
from tests.emulator import project_crds, running_emulator
from tests.services import RedisServer

TICK = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=10_000)
    args = parser.parse_args()
    with RedisServer() as server:
        async with running_emulator() as (emulator, base_url):
            for crd in project_crds():
                emulator.register_crd(crd)
            api = KubeApi(kopf.ConnectionInfo(server=base_url))
            redis = create_redis(server.url)
            store = ResourceStore()
            print(f"creating {args.schedules} SyncSchedules (not timed)...", flush=True)
            for number in range(args.schedules):
                body = {"apiVersion": "kubearq.dev/v1alpha1", "kind": "SyncSchedule",
                        "metadata": {"name": f"s{number}"},
                        "spec": {"schedule": "* * * * *", "job": {"function": "sync_connections"}}}
                created = await api.create(SYNC_SCHEDULES, body, namespace="default", timeout=30)
                created["status"] = {"lastScheduleTime": (TICK - timedelta(minutes=1)).isoformat()}
                store.observe("SyncSchedule", "ADDED", created)
            lags: list[float] = []
            started = time.perf_counter()
            metrics = OperatorMetrics()
            metrics.observe_tick_lag = lags.append  # type: ignore[method-assign,assignment]
            ctx = OperatorContext(api=api, redis=redis, metrics=metrics, settings=OperatorSettings(),
                                  ensure_leader=lambda: None,
                                  now=lambda: TICK + timedelta(seconds=time.perf_counter() - started))
            leading = asyncio.create_task(lead(ctx, store, {"SyncSchedule": reconcile_schedule}))
            while len(lags) < args.schedules:
                await asyncio.sleep(0.05)
            total = time.perf_counter() - started
            leading.cancel()
            await asyncio.gather(leading, return_exceptions=True)
            enqueued = await redis.zcard("arq:queue")
            await redis.aclose()
            await api.aclose()
    lags.sort()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"schedules {args.schedules}, jobs enqueued {enqueued}, all enqueued and recorded after {total:.1f}s")
    print(f"tick lag p50 {statistics.median(lags):.2f}s  p99 {lags[int(len(lags) * 0.99) - 1]:.2f}s  "
          f"max {lags[-1]:.2f}s  (target p99 <= 1 s)")
    print(f"peak memory of this process (operator loop + emulator + client): {peak_mib:.0f} MiB")


if __name__ == "__main__":
    asyncio.run(main())
