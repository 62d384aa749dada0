"""Re-run delay after a worker SIGKILL: how long a killed `kubearq worker`'s job waits before another worker runs it.

    .venv/bin/python -m bench.rerun_delay [--in-progress-ttl 20] [--heartbeat-interval 5]

kubearq: two `kubearq worker` processes on a private redis-server; the one that starts a long job is SIGKILLed
and the delay runs until the job starts again on the other (each start records its pid and time in Redis). The
worker's heartbeat keeps a running job's in-progress mark `IN_PROGRESS_TTL` long, so the delay is at most that.

ARQ: a bare ARQ worker with its defaults marks a job in progress for its largest timeout + 10 s (310 s), and
no worker takes the job again until that mark expires. Not waited for: the same kill, then the mark's remaining
lifetime is read with PTTL. That is the least a bare ARQ orphan waits (plus up to a poll delay, 0.5 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import in_progress_key_prefix
from arq.worker import Worker, func
from bench.rerun_jobs import STARTS, bare_arq_worker, hold

from kubearq.core.connections import create_redis
from kubearq.demo.services import RedisServer, free_port
from kubearq.worker.settings import WorkerSettings as KubearqSettings

REPO = Path(__file__).resolve().parent.parent
JOB_ID = "orphan"
JOB_SECONDS = 3600.0
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class Start:
    pid: int
    at: float


async def starts(redis: ArqRedis) -> list[Start]:
    raw: list[bytes] = await redis.lrange(STARTS, 0, -1)  # type: ignore[misc]
    return [Start(int(entry["pid"]), float(entry["at"])) for entry in map(json.loads, raw)]


async def wait_for_starts(redis: ArqRedis, count: int, within: float, what: str,
                          alive: Callable[[], bool] = lambda: True) -> list[Start]:
    deadline = time.monotonic() + within
    while len(found := await starts(redis)) < count:
        if time.monotonic() > deadline or not alive():
            raise RuntimeError(f"{what} did not happen within {within:.0f} s" if alive() else
                               f"{what} did not happen: the worker exited")
        await asyncio.sleep(0.02)
    return found


@dataclass(frozen=True)
class Rerun:
    """Seconds from the SIGKILL to the job's start on the other worker, under the worker's in-progress TTL."""

    delay_s: float
    in_progress_ttl_s: float
    heartbeat_interval_s: float
    mark_left_s: float  # the in-progress mark's remaining lifetime right after the kill


@contextmanager
def worker_process(redis_url: str, port: int, log: Path,
                   env_extra: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """`kubearq worker` serving `hold`, its output in a file; killed on leaving the block if still running."""
    env = {**os.environ, "REDIS_URL": redis_url, "HTTP_PORT": str(port), "HTTP_HOST": "127.0.0.1",
           "LOG_LEVEL": "WARNING", "SHUTDOWN_GRACE": "0", "PYTHONPATH": str(REPO), **env_extra}
    command = [sys.executable, "-m", "kubearq.cli", "worker", "--settings", "bench.rerun_jobs:WorkerSettings"]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=env, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


async def wait_ready(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    async with aiohttp.ClientSession() as http:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"kubearq worker exited with {process.returncode}; see {log}")
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"kubearq worker not ready within {START_TIMEOUT:.0f} s; see {log}")
            await asyncio.sleep(0.05)


async def kubearq_rerun(redis_url: str, in_progress_ttl: float | None = None,
                        heartbeat_interval: float | None = None, *,
                        quiet: Awaitable[object] | None = None) -> Rerun:
    """Kill the `kubearq worker` running the job; time until the other worker starts it (Redis is flushed).

    With `quiet`, the job is enqueued once it is done too (the workers start meanwhile; nothing else runs while
    the delay is measured).
    """
    env = {name: str(value) for name, value in (("IN_PROGRESS_TTL", in_progress_ttl),
                                                ("HEARTBEAT_INTERVAL", heartbeat_interval)) if value is not None}
    defaults = KubearqSettings()
    ttl = in_progress_ttl or defaults.in_progress_ttl
    heartbeat = heartbeat_interval or defaults.heartbeat_interval
    logs = Path(tempfile.mkdtemp(prefix="kubearq-bench-rerun-"))
    redis = create_redis(redis_url)
    await redis.flushdb()
    ports = free_port(), free_port()
    try:
        with worker_process(redis_url, ports[0], logs / "a.log", env) as first, \
                worker_process(redis_url, ports[1], logs / "b.log", env) as second:
            await asyncio.gather(wait_ready(ports[0], first, logs / "a.log"),
                                 wait_ready(ports[1], second, logs / "b.log"))
            if quiet is not None:
                await quiet
            await redis.enqueue_job("hold", JOB_SECONDS, _job_id=JOB_ID)
            [started] = await wait_for_starts(redis, 1, START_TIMEOUT, "the job's first start",
                                              lambda: first.poll() is None and second.poll() is None)
            doomed, survivor = (first, second) if started.pid == first.pid else (second, first)
            if started.pid not in (first.pid, second.pid):
                raise RuntimeError(f"the job started in pid {started.pid}, neither worker")
            killed_at = time.time()
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(timeout=10)
            mark_left_ms = await redis.pttl(in_progress_key_prefix + JOB_ID)
            again = (await wait_for_starts(redis, 2, ttl + 30, "the job's re-run",
                                           lambda: survivor.poll() is None))[1]
            if again.pid != survivor.pid:
                raise RuntimeError(f"the job ran again in pid {again.pid}, not the surviving worker {survivor.pid}")
            survivor.send_signal(signal.SIGTERM)  # SHUTDOWN_GRACE 0: puts the job back and exits
            await asyncio.to_thread(survivor.wait, 30)
        await redis.flushdb()
    finally:
        await redis.aclose()
    return Rerun(again.at - killed_at, ttl, heartbeat, max(0, mark_left_ms) / 1000)


@dataclass(frozen=True)
class ArqExpiry:
    """The in-progress mark a bare ARQ worker set for its job, read right after the worker was SIGKILLed."""

    mark_left_s: float
    timeout_s: float  # what ARQ set: the largest function timeout + 10 s


async def arq_in_progress_expiry(redis_url: str) -> ArqExpiry:
    """Start a bare ARQ worker, SIGKILL it while it runs the job, read the mark's PTTL (Redis db flushed)."""
    redis = await create_pool(RedisSettings.from_dsn(redis_url))  # ARQ's own client and serializer
    await redis.flushdb()
    process = multiprocessing.get_context("spawn").Process(target=bare_arq_worker, args=(redis_url,), daemon=True)
    process.start()
    try:
        await redis.enqueue_job("hold", JOB_SECONDS, _job_id=JOB_ID)
        await wait_for_starts(redis, 1, START_TIMEOUT, "the bare ARQ worker's start of the job", process.is_alive)
        process.kill()
        await asyncio.to_thread(process.join, 10)
        mark_left_ms = await redis.pttl(in_progress_key_prefix + JOB_ID)
        if mark_left_ms < 0:
            raise RuntimeError(f"no in-progress mark after the kill (PTTL {mark_left_ms})")
        await redis.flushdb()
    finally:
        if process.is_alive():
            process.kill()
        await redis.aclose()
    # What ARQ's Worker computes (arq/worker.py): max(function timeouts, default job_timeout) + 10 s.
    timeout_s = Worker(functions=[func(hold, name="hold")], handle_signals=False).in_progress_timeout_s
    return ArqExpiry(mark_left_ms / 1000, float(timeout_s))


def other_database(redis_url: str, database: int) -> str:
    """The same server, another database number (the bare ARQ worker's keys stay apart from kubearq's)."""
    parts = urlsplit(redis_url)
    return urlunsplit(parts._replace(path=f"/{database}"))


@dataclass(frozen=True)
class RerunDelay:
    kubearq: Rerun
    arq: ArqExpiry

    @property
    def ratio(self) -> float:
        return self.arq.mark_left_s / self.kubearq.delay_s


async def measure(redis_url: str, in_progress_ttl: float | None = None,
                  heartbeat_interval: float | None = None) -> RerunDelay:
    """Bare ARQ in database 1 of the same server, kubearq in the URL's own; kubearq's workers start while the bare
    ARQ worker runs, and its job waits until that is over."""
    anchor = asyncio.create_task(arq_in_progress_expiry(other_database(redis_url, 1)))
    try:
        ours = await kubearq_rerun(redis_url, in_progress_ttl, heartbeat_interval, quiet=anchor)
    finally:
        if not anchor.done():
            anchor.cancel()
        await asyncio.gather(anchor, return_exceptions=True)
    return RerunDelay(ours, anchor.result())


def show(result: RerunDelay) -> None:
    ours, anchor = result.kubearq, result.arq
    print(f"kubearq worker (IN_PROGRESS_TTL {ours.in_progress_ttl_s:g} s, heartbeat {ours.heartbeat_interval_s:g} s): "
          f"the killed worker's job started again on the other {ours.delay_s:.2f} s after the SIGKILL "
          f"(its in-progress mark had {ours.mark_left_s:.1f} s left)")
    print(f"bare ARQ (defaults): in-progress mark set for {anchor.timeout_s:g} s; {anchor.mark_left_s:.1f} s left "
          "after the SIGKILL (read with PTTL, not waited for): the least its orphan waits")
    print(f"ratio: {result.ratio:.1f}x sooner")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--in-progress-ttl", type=float, default=None, help="default: the worker's (20 s)")
    parser.add_argument("--heartbeat-interval", type=float, default=None, help="default: the worker's (5 s)")
    options = parser.parse_args()
    with RedisServer() as server:
        show(await measure(server.url, options.in_progress_ttl, options.heartbeat_interval))


if __name__ == "__main__":
    asyncio.run(main())
