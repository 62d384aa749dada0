"""Job functions for worker tests, importable by a `kubearq worker --settings tests.worker_jobs:WorkerSettings`
subprocess. Each records what happened in Redis, so a test can assert on it across processes."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from kubearq.worker.runtime import Defer, FinishScript, on_finish


async def record(ctx: dict[str, Any], event: str, **fields: object) -> None:
    entry = {"event": event, "job_id": ctx["job_id"], "try": ctx["job_try"], "at": time.time(), **fields}
    await ctx["redis"].rpush("test:events", json.dumps(entry))


async def noop(ctx: dict[str, Any]) -> None:
    return None


async def echo(ctx: dict[str, Any], *args: object, **kwargs: object) -> dict[str, object]:
    await record(ctx, "ran")
    return {"args": list(args), "kwargs": kwargs}


async def sleep_then_record(ctx: dict[str, Any], seconds: float) -> str:
    await record(ctx, "started")
    await asyncio.sleep(seconds)
    await record(ctx, "finished")
    return "slept"


async def always_fails(ctx: dict[str, Any]) -> None:
    await record(ctx, "tried")
    raise ValueError("boom")


async def slow_first_try(ctx: dict[str, Any], first_try_seconds: float) -> str:
    await record(ctx, "started")
    if ctx["job_try"] == 1:
        await asyncio.sleep(first_try_seconds)
    return "done"


async def deferred_three_times(ctx: dict[str, Any]) -> str:
    runs = await ctx["redis"].incr(f"test:runs:{ctx['job_id']}")
    await record(ctx, "ran", runs=runs)
    if runs <= 3:
        raise Defer(0.05, "waiting for a token")
    return "done"


async def counted_on_finish(ctx: dict[str, Any], failures: int, deferrals: int) -> str:
    """Asks for `test:finished` to be counted as it completes; defers, then fails, before it succeeds."""
    runs = await ctx["redis"].incr(f"test:runs:{ctx['job_id']}")
    await record(ctx, "ran", runs=runs)
    on_finish(ctx, FinishScript("redis.call('INCR', KEYS[1])", keys=["test:finished"], args=[]))
    if runs <= deferrals:
        raise Defer(0.05, "waiting")
    if runs <= deferrals + failures:
        raise ValueError("not yet")
    return "done"


class WorkerSettings:
    functions = [noop, echo, sleep_then_record, always_fails, slow_first_try, deferred_three_times,
                 counted_on_finish]
