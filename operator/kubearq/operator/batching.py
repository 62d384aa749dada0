"""Enqueues that arrive together leave together: one script call per queue for many schedules' ticks.

The leader advances many schedules concurrently when they are due on the same minute; each would pay a
Redis round trip (and redis-py's per-command overhead) for its one job. Callers hand their job to the
batcher and await its verdict; the batcher flushes everything gathered in the same loop iteration as
one `enqueue_many` per (queue, remember) pair.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field

from redis.asyncio import Redis

from kubearq.worker.queueing import NewJob, enqueue_many

BatchKey = tuple[str, int]  # (queue, remember_ms)


@dataclass
class EnqueueBatcher:
    redis: Redis
    _pending: dict[BatchKey, list[tuple[NewJob, asyncio.Future[bool]]]] = field(
        default_factory=lambda: defaultdict(list))
    _flush_scheduled: bool = False

    async def enqueue(self, queue: str, job: NewJob, *, remember_ms: int) -> bool:
        """Enqueue `job` with others due now; True if it was new, False if its id was refused."""
        verdict: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending[(queue, remember_ms)].append((job, verdict))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._flush()))
        return await verdict

    async def _flush(self) -> None:
        batches, self._pending = self._pending, defaultdict(list)
        self._flush_scheduled = False
        for (queue, remember_ms), entries in batches.items():
            try:
                added = set(await enqueue_many(self.redis, queue, [job for job, _ in entries],
                                               remember_ms=remember_ms))
            except BaseException as error:  # every waiter hears of it, each handles it as its own failure
                for _, verdict in entries:
                    if not verdict.done():
                        verdict.set_exception(error)
                continue
            for job, verdict in entries:
                if not verdict.done():
                    verdict.set_result(job.job_id in added)
