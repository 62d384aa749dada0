"""Job functions for the failed-jobs tests (`tests.failing_jobs:WorkerSettings`): each run is recorded in Redis
(`test:runs`, a list of `job_id:try`), so a test can count how often a job ran and under which ids."""

from __future__ import annotations

from typing import Any

from kubearq.worker.runtime import GiveUp

BROKEN_KEY = "test:broken"  # while it exists, `flaky` fails


async def _ran(ctx: dict[str, Any]) -> None:
    await ctx["redis"].rpush("test:runs", f"{ctx['job_id']}:{ctx['job_try']}")


async def fails_every_try(ctx: dict[str, Any], *args: object, **kwargs: object) -> None:
    await _ran(ctx)
    raise ValueError(f"boom on try {ctx['job_try']}")


async def fails_once(ctx: dict[str, Any]) -> str:
    await _ran(ctx)
    if ctx["job_try"] == 1:
        raise ConnectionError("first try lost its connection")
    return "done"


async def gives_up(ctx: dict[str, Any]) -> None:
    await _ran(ctx)
    raise GiveUp("the token was revoked")


async def flaky(ctx: dict[str, Any], report: str) -> str:
    """Fails while BROKEN_KEY exists, else succeeds."""
    await _ran(ctx)
    if await ctx["redis"].exists(BROKEN_KEY):
        raise RuntimeError(f"{report}: the backend is broken")
    return f"{report} done"


class WorkerSettings:
    functions = [fails_every_try, fails_once, gives_up, flaky]
