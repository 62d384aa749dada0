"""Scheduler lag: N SyncSchedules firing every minute, from each tick to its job's enqueue, in steady state.

    .venv/bin/python -m bench.scheduler_lag [--schedules 10000] [--minutes 3]

The whole operator (`run_operator`: Lease election, the informer watching every object, the leader's loop,
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
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parent.parent
LOG = Path(tempfile.gettempdir()) / "kubearq-bench-scheduler-lag.log"
# A queue named for the schedules' namespace: what the operator's default TENANCY (`namespaced`) lets a
# namespace without a QueuePolicy enqueue on.
QUEUE = "default:bench"
sys.path.insert(0, str(REPO))

import aiohttp
import kopf

from kubearq.core.connections import create_redis
from kubearq.core.contract import deserialize
from kubearq.core.observability import configure_logging
from kubearq.demo.emulator import running_emulator
from kubearq.demo.services import RedisServer, free_port
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


async def create_schedules(base_url: str, count: int, created: list[str]) -> None:
    """Create `count` schedules, appending each uid to `created` as it comes (a time limit keeps what it has).

    Plain aiohttp POSTs rather than KubeApi: a fifth of the client CPU per object (measured: 1 ms vs 5.9 ms), which
    matters at 100,000 on two cores; the emulator's own ~6 ms per object is then the bound.
    """
    url = f"{base_url}/apis/kubearq.dev/v1alpha1/namespaces/default/syncschedules"
    gate = asyncio.Semaphore(32)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32),
                                     timeout=aiohttp.ClientTimeout(total=60)) as http:

        async def one(number: int) -> None:
            body = {"apiVersion": "kubearq.dev/v1alpha1", "kind": "SyncSchedule", "metadata": {"name": f"s{number}"},
                    "spec": {"schedule": "* * * * *", "job": {"function": "noop", "queue": QUEUE}}}
            async with gate, http.post(url, json=body) as response:
                if response.status >= 300:
                    raise RuntimeError(f"creating SyncSchedule s{number}: {response.status} {await response.text()}")
                made = await response.json()
            created.append(str(made["metadata"]["uid"]))

        await asyncio.gather(*(one(number) for number in range(count)))


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


async def statuses_at(base_url: str, tick: int) -> int:
    """How many schedules record `tick` as their last schedule time.

    Read a page at a time and counted, not listed whole: 100,000 objects held at once by the bench client
    would count in the operator process's peak memory (it is the same process)."""
    url = f"{base_url}/apis/kubearq.dev/v1alpha1/namespaces/default/syncschedules"
    stamp = datetime.fromtimestamp(tick, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    recorded, params = 0, {"limit": "500"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        while True:
            async with http.get(url, params=params) as response:
                response.raise_for_status()
                page = await response.json()
            recorded += sum(1 for item in page["items"] if (item.get("status") or {}).get("lastScheduleTime") == stamp)
            if not page["metadata"].get("continue"):
                return recorded
            params["continue"] = page["metadata"]["continue"]


def quantile(values: list[float], q: float) -> float:
    return values[max(0, int(len(values) * q) - 1)]


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (the kernel's high-water mark)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class TickLag:
    """One tick: how many of its jobs were enqueued `read_after_s` after it, and how late (None: none enqueued)."""

    label: str
    tick: int
    schedules: int
    enqueued: int
    p50_s: float | None
    p99_s: float | None
    max_s: float | None
    statuses: int | None  # statuses recording the tick when read (None: not read, the time limit came first)
    read_after_s: float
    peak_rss_mib: float

    def line(self) -> str:
        if self.p50_s is None or self.p99_s is None or self.max_s is None:
            return f"{self.label}: no job enqueued for the tick {self.read_after_s:.0f} s after it"
        statuses = (f"statuses recording it after {self.read_after_s:.0f} s: {self.statuses}/{self.schedules}"
                    if self.statuses is not None else "statuses not read")
        return (f"{self.label}: {self.enqueued}/{self.schedules} enqueued, lag p50 {self.p50_s:.2f}s "
                f"p99 {self.p99_s:.2f}s max {self.max_s:.2f}s; {statuses}")


@dataclass(frozen=True)
class LagRun:
    """What one run measured; `cut_short` says what the time limit interrupted (None: it ran to the end)."""

    schedules: int
    created: int
    create_s: float
    ticks: list[TickLag]
    peak_rss_mib: float
    cut_short: str | None = None
    operator_log: OperatorLog | None = None


@dataclass(frozen=True)
class OperatorLog:
    """What the operator's log says went wrong during a run (a lag figure alone does not say why)."""

    warnings: int
    lease_losses: int
    failed_listings: int

    def describe(self) -> str:
        if not self.warnings:
            return "operator log: no warnings"
        return (f"operator log: {self.warnings} warnings, the Lease lost {self.lease_losses} times, "
                f"{self.failed_listings} failed start-up listings")


def read_operator_log(offset: int) -> OperatorLog:
    """Count the warnings and errors the operator logged to LOG after `offset`."""
    warnings = lease_losses = failed_listings = 0
    with LOG.open("rb") as log:
        log.seek(offset)
        for line in log:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            message = str(entry.get("message", ""))
            if entry.get("level") in ("WARNING", "ERROR", "CRITICAL"):
                warnings += 1
            lease_losses += "stopped leading" in message and "released" not in message
            failed_listings += "listing the resources failed" in message
    return OperatorLog(warnings, lease_losses, failed_listings)


async def measure(schedules: int, minutes: int, base_url: str, *, start_before_tick: float | None = None,
                  redis_url: str | None = None, deadline: float | None = None,
                  on_tick: Callable[[TickLag], None] = lambda tick: None,
                  on_progress: Callable[[str], None] = lambda text: None) -> LagRun:
    """Create the schedules on the API at `base_url`, run the operator and read each tick's lags.

    `redis_url` is flushed first (default: a private redis-server). At `deadline` (a `time.time()`) it stops
    where it is: a tick being waited for is read at once, creation keeps what it has.
    """
    with contextlib.ExitStack() as services:
        if redis_url is None:
            redis_url = services.enter_context(RedisServer()).url
        return await _measure(schedules, minutes, base_url, redis_url, start_before_tick, deadline, on_tick,
                              on_progress)


async def _measure(schedules: int, minutes: int, base_url: str, redis_url: str, start_before_tick: float | None,
                   deadline: float | None, on_tick: Callable[[TickLag], None],
                   on_progress: Callable[[str], None]) -> LagRun:
    redis = create_redis(redis_url)
    await redis.flushall()
    on_progress(f"creating {schedules} SyncSchedules (not timed)...")
    started = time.perf_counter()
    uids: list[str] = []
    creating = asyncio.create_task(create_schedules(base_url, schedules, uids))
    try:
        await asyncio.wait_for(creating, None if deadline is None else max(0.0, deadline - time.time()))
    except TimeoutError:
        create_s = time.perf_counter() - started
        await redis.aclose()
        return LagRun(schedules, len(uids), create_s, [], peak_rss_mib(),
                      f"the time limit came after {len(uids):,}/{schedules:,} schedules were created "
                      f"({create_s:.0f} s): no tick measured")
    create_s = time.perf_counter() - started
    on_progress(f"  created in {create_s:.1f}s")
    env = {**os.environ, "REDIS_URL": redis_url, "HTTP_PORT": str(free_port()), "HTTP_HOST": "127.0.0.1",
           "LOG_LEVEL": "WARNING", "MAX_JOBS": "64", "QUEUE": QUEUE, "PYTHONPATH": str(REPO)}
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubearq.cli", "worker", "--settings", "tests.worker_jobs:WorkerSettings",
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    settings = OperatorSettings(redis_url=redis_url, http_host="127.0.0.1", http_port=free_port(),
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
    ticks: list[TickLag] = []
    cut_short = None
    try:
        launched = time.time()
        on_progress("operator started: first pass over every schedule, then the minutes")
        first = int(launched) // 60 * 60 + 60
        for minute in range(minutes + 1):
            tick = first + 60 * minute
            label = f"first tick, {tick - launched:.0f} s after a cold start" if minute == 0 else f"minute {minute}"
            while time.time() < tick + 50:  # the next tick's jobs are all in by then, unless lag > 50 s
                if deadline is not None and time.time() >= deadline:
                    cut_short = f"the time limit came {time.time() - tick:.0f} s after the tick of {label}"
                    break
                await asyncio.sleep(1)
                if operator.done():
                    operator.result()
            read_after = time.time() - tick
            if read_after < 0:  # cut before the tick itself
                break
            lags = await enqueue_lags(redis, uids, tick)
            written = await statuses_at(base_url, tick) if cut_short is None else None
            measured = TickLag(label, tick, schedules, len(lags), quantile(lags, 0.5) if lags else None,
                               quantile(lags, 0.99) if lags else None, lags[-1] if lags else None, written,
                               read_after, peak_rss_mib())
            ticks.append(measured)
            on_tick(measured)
            if cut_short is not None:
                break
    finally:
        stop.set()
        await asyncio.gather(operator, return_exceptions=True)
        worker.terminate()
        await worker.wait()
        await redis.aclose()
    return LagRun(schedules, len(uids), create_s, ticks, peak_rss_mib(), cut_short)


def run(schedules: int, minutes: int, *, start_before_tick: float | None = None, redis_url: str | None = None,
        deadline: float | None = None, on_tick: Callable[[TickLag], None] = lambda tick: None,
        on_progress: Callable[[str], None] = lambda text: None) -> LagRun:
    """The emulator in a child process, the operator here (its GC tuned and logs to LOG as `kubearq operator`)."""
    receiving, sending = multiprocessing.Pipe(duplex=False)
    emulator = multiprocessing.get_context("spawn").Process(target=serve_emulator, args=(sending,), daemon=True)
    emulator.start()
    tune_gc()  # as `kubearq operator` does
    configure_logging("INFO")  # as `kubearq operator` does by default; its lines go to a file
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(LOG.open("a"))
    offset = LOG.stat().st_size
    try:
        base_url = receiving.recv()
        outcome = asyncio.run(measure(schedules, minutes, base_url, start_before_tick=start_before_tick,
                                      redis_url=redis_url, deadline=deadline, on_tick=on_tick,
                                      on_progress=on_progress))
        handler.flush()
        return dataclasses.replace(outcome, operator_log=read_operator_log(offset))
    finally:
        emulator.kill()
        emulator.join()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=10_000)
    parser.add_argument("--minutes", type=int, default=3, help="steady-state minutes after the first tick")
    parser.add_argument("--start-before-tick", type=float, default=None, metavar="SECONDS",
                        help="start the operator this long before a minute's tick (a cold start just before one)")
    arguments = parser.parse_args()
    outcome = run(arguments.schedules, arguments.minutes, start_before_tick=arguments.start_before_tick,
                  on_tick=lambda tick: print(tick.line(), flush=True),
                  on_progress=lambda text: print(text, flush=True))
    if outcome.operator_log is not None:
        print(outcome.operator_log.describe())
    print(f"operator log: {LOG}")
    print(f"peak memory of the operator process (operator + bench client): {outcome.peak_rss_mib:.0f} MiB; "
          "target p99 <= 1 s")
