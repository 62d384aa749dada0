"""Waiting for a condition in tests: poll it with a deadline (never sleep a fixed time and hope)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def until(probe: Callable[[], Awaitable[bool]], within: float = 10.0, what: str = "condition") -> None:
    """Poll until `probe()` holds; fail after `within` seconds, naming what did not happen."""
    deadline = asyncio.get_running_loop().time() + within
    while not await probe():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} did not happen within {within}s")
        await asyncio.sleep(0.02)
