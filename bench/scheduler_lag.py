"""Scheduler lag: N SyncSchedules firing every minute, from each tick to its job's enqueue, in steady state.

    .venv/bin/python -m bench.scheduler_lag [--schedules 10000] [--minutes 3]

The whole operator (`run_operator`: Lease election, kopf watching every object, the leader's loop,
probes, queue metrics) runs in this process on the real clock, against the API emulator in another
process (a real API server would not share the operator's CPU either), a private redis-server and a
`kubearq worker` taking the jobs (so every minute the leader also reads the previous runs' outcomes and
writes them to status, as in production). Creating the objects is not timed.

Each lag is read back from Redis, not from the operator: the enqueue time ARQ's payload carries minus
the tick. Prints, per minute, lag p50/p99/max (issue target: p99 <= 1 s at 10,000 schedules) and how
many statuses recorded the tick 50 s after it; the operator's peak memory (this process: operator + the
small bench client; the emulator and worker are children and not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parent.parent
LOG = Path(tempfile.gettempdir()) / "kubearq-bench-scheduler-lag.log"
sys.path.insert(0, str(REPO))

import kopf

from kubearq.core.connections import create_redis
from kubearq.core.contract import deserialize
from kubearq.core.observability import configure_logging
from kubearq.demo.emulator import running_emulator
from kubearq.demo.services import RedisServer, free_port
from kubearq.operator.context import SYNC_SCHEDULES
from kubearq.operator.kube import KubeApi
from kubearq.operator.main import quiet_kopf_watch_finalization, run_operator, tune_gc
from kubearq.operator.settings import OperatorSettings
from tests.kubernetes import project_crds


def serve_emulator(pipe: multiprocessing.connection.Connection) -> None:
    """The API emulator alone in a child process; sends its URL, serves until killed."""

    async def serve() -> None:
        async with running_emulator() as (emulator, base_url):
            for crd in project_crds():
                emulator.register_crd(crd)
            pipe.send(base_url)
            await asyncio.Event().wait()

    asyncio.run(serve())


async def create_schedules(api: KubeApi, count: int) -> list[str]:
    gate = asyncio.Semaphore(32)

    async def one(number: int) -> str:
        body = {"apiVersion": "kubearq.dev/v1alpha1", "kind": "SyncSchedule", "metadata": {"name": f"s{number}"},
                "spec": {"schedule": "* * * * *", "job": {"function": "noop"}}}
        async with gate:
            created = await api.create(SYNC_SCHEDULES, body, namespace="default", timeout=60)
        return str(created["metadata"]["uid"])

    return list(await asyncio.gather(*(one(number) for number in range(count))))


async def enqueue_lags(redis: Any, uids: list[str], tick: int) -> list[float]:
    """Seconds from `tick` to each schedule's enqueue, from the job (or, once run, its result) in Redis."""
    lags = []
    for start in range(0, len(uids), 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for uid in uids[start : start + 1000]:
                pipe.get(f"arq:job:kubearq:tick:{uid}:{tick}")
                pipe.get(f"arq:result:kubearq:tick:{uid}:{tick}")
            replies = await pipe.execute()
        for job, result in zip(replies[::2], replies[1::2], strict=True):
            raw = result or job
            if raw is not None:
                lags.append(int(cast(int, deserialize(raw)["et"])) / 1000 - tick)
    return sorted(lags)


async def statuses_at(api: KubeApi, tick: int) -> int:
    """How many schedules record `tick` as their last schedule time."""
    listing = await api.list(SYNC_SCHEDULES, namespace="default", timeout=120)
    stamp = datetime.fromtimestamp(tick, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return sum(1 for item in listing.items if (item.get("status") or {}).get("lastScheduleTime") == stamp)


def quantile(values: list[float], q: float) -> float:
    return values[max(0, int(len(values) * q) - 1)]


async def main(schedules: int, minutes: int, pipe: multiprocessing.connection.Connection,
               start_before_tick: float | None = None) -> None:
    base_url = pipe.recv()
    with RedisServer() as server:
        api = KubeApi(kopf.ConnectionInfo(server=base_url))
        redis = create_redis(server.url)
        print(f"creating {schedules} SyncSchedules (not timed)...", flush=True)
        started = time.perf_counter()
        uids = await create_schedules(api, schedules)
        print(f"  created in {time.perf_counter() - started:.1f}s", flush=True)
        env = {**os.environ, "REDIS_URL": server.url, "HTTP_PORT": str(free_port()), "HTTP_HOST": "127.0.0.1",
               "LOG_LEVEL": "WARNING", "MAX_JOBS": "64", "PYTHONPATH": str(REPO)}
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kubearq.cli", "worker", "--settings", "tests.worker_jobs:WorkerSettings",
            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        settings = OperatorSettings(redis_url=server.url, http_host="127.0.0.1", http_port=free_port(),
                                    log_level="WARNING")
        if start_before_tick is not None:  # a cold start this many seconds before a tick
            boundary = (int(time.time()) // 60 + 1) * 60
            if boundary - time.time() < start_before_tick:
                boundary += 60
            await asyncio.sleep(boundary - start_before_tick - time.time())
        stop = asyncio.Event()
        asyncio.get_running_loop().set_exception_handler(quiet_kopf_watch_finalization)  # as `kubearq operator`
        operator = asyncio.create_task(run_operator(settings, kopf.ConnectionInfo(server=base_url), stop=stop,
                                                    identity="bench"))
        try:
            launched = time.time()
            print("operator started: first pass over every schedule, then the minutes", flush=True)
            first = int(launched) // 60 * 60 + 60
            for minute in range(minutes + 1):
                tick = first + 60 * minute
                while time.time() < tick + 50:  # the next tick's jobs are all in by then, unless lag > 50 s
                    await asyncio.sleep(1)
                    if operator.done():
                        operator.result()
                lags = await enqueue_lags(redis, uids, tick)
                written = await statuses_at(api, tick)
                label = (f"first tick, {tick - launched:.0f} s after a cold start"
                         if minute == 0 else f"minute {minute}")
                if not lags:
                    print(f"{label}: no job enqueued for the tick", flush=True)
                    continue
                print(f"{label}: {len(lags)}/{schedules} enqueued, lag p50 {quantile(lags, 0.5):.2f}s "
                      f"p99 {quantile(lags, 0.99):.2f}s max {lags[-1]:.2f}s; statuses recording it after 50 s: "
                      f"{written}/{schedules}", flush=True)
        finally:
            stop.set()
            await asyncio.gather(operator, return_exceptions=True)
            worker.terminate()
            await worker.wait()
            await redis.aclose()
            await api.aclose()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"operator log: {LOG}")
    print(f"peak memory of the operator process (operator + bench client): {peak_mib:.0f} MiB; target p99 <= 1 s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=10_000)
    parser.add_argument("--minutes", type=int, default=3, help="steady-state minutes after the first tick")
    parser.add_argument("--start-before-tick", type=float, default=None, metavar="SECONDS",
                        help="start the operator this long before a minute's tick (a cold start just before one)")
    arguments = parser.parse_args()
    receiving, sending = multiprocessing.Pipe(duplex=False)
    emulator = multiprocessing.get_context("spawn").Process(target=serve_emulator, args=(sending,), daemon=True)
    emulator.start()
    tune_gc()  # as `kubearq operator` does
    configure_logging("INFO")  # as `kubearq operator` does by default; its lines go to a file
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(LOG.open("a"))
    try:
        asyncio.run(main(arguments.schedules, arguments.minutes, receiving, arguments.start_before_tick))
    finally:
        emulator.kill()
