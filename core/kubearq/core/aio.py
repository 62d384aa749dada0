"""asyncio helpers both processes need: waits and stops that survive Python 3.11's cancellation traps.

On Python 3.11, asyncio.wait_for and asyncio.timeout can swallow a cancellation that arrives as they time
out (gh-86296); a loop that relies on them to stop then hangs at shutdown now and then. These helpers
neither cancel to time out nor depend on a cancellation being delivered.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger(__name__)


async def wait_or_timeout(event: asyncio.Event, seconds: float) -> None:
    """Wait until `event` is set or `seconds` pass, without cancelling anything (a timer sets a private event)."""
    woken = asyncio.Event()
    loop = asyncio.get_running_loop()
    timer = loop.call_later(seconds, woken.set)
    waiter = loop.create_task(event.wait())
    waiter.add_done_callback(lambda _: woken.set())
    try:
        await woken.wait()
    finally:
        timer.cancel()
        waiter.cancel()


async def stop_task(task: asyncio.Task[Any], seconds: float, what: str) -> None:
    """Cancel `task` and wait at most `seconds` for it (asyncio.wait neither cancels nor swallows)."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        logger.error("%s did not stop within %.0fs after cancellation; leaving it", what, seconds)
