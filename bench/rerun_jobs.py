"""The re-run benchmark's job, for a `kubearq worker` and for a bare ARQ worker in a spawned child process.

A module of its own, importing only ARQ: both kinds of worker import it afresh.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from arq.connections import RedisSettings
from arq.worker import Worker, func

STARTS = "bench:rerun:starts"


async def hold(ctx: dict[str, Any], seconds: float) -> str:
    """Record which process started the job and when, then run long enough to be killed."""
    start = {"pid": os.getpid(), "at": time.time(), "try": ctx["job_try"]}
    await ctx["redis"].rpush(STARTS, json.dumps(start))
    await asyncio.sleep(seconds)
    return "held"


class WorkerSettings:
    """For `kubearq worker --settings bench.rerun_jobs:WorkerSettings`."""

    functions = [func(hold, name="hold")]


def bare_arq_worker(redis_url: str) -> None:
    """A bare ARQ worker with ARQ's defaults (pickle, job_timeout 300 s, ...), alone in a child process."""
    Worker(functions=[func(hold, name="hold")], redis_settings=RedisSettings.from_dsn(redis_url)).run()
