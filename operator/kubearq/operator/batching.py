"""Redis calls that arrive together leave together: one round trip per queue for many schedules.

When ten thousand schedules are due on the same minute the leader advances them all at once; each
would pay a Redis round trip (and redis-py's per-command overhead) for its one job, and another to read
its previous run's outcome. Callers hand their request to a coalescer and await their own answer; the
coalescer sends everything gathered in the same event-loop iteration as one call per key (a queue).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

from redis.asyncio import Redis

from kubearq.core.queueing import JobOutcome, NewJob, enqueue_many, job_outcomes

K = TypeVar("K", bound=Hashable)
Q = TypeVar("Q")
A = TypeVar("A")


class Coalescer(Generic[K, Q, A]):
    """Requests (Q) gathered per key (K) within one loop iteration, answered (A) by one `call` per key."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._pending: dict[K, list[tuple[Q, asyncio.Future[A]]]] = defaultdict(list)
        self._flush_scheduled = False

    async def ask(self, key: K, request: Q) -> A:
        answer: asyncio.Future[A] = asyncio.get_running_loop().create_future()
        self._pending[key].append((request, answer))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._flush()))
        return await answer

    async def call(self, key: K, requests: Sequence[Q]) -> list[A]:
        """Answer every request of one key, in order."""
        raise NotImplementedError

    async def _flush(self) -> None:
        batches, self._pending = self._pending, defaultdict(list)
        self._flush_scheduled = False
        for key, entries in batches.items():
            try:
                answers = await self.call(key, [request for request, _ in entries])
            except BaseException as error:  # every waiter hears of it, each handles it as its own failure
                for _, answer in entries:
                    if not answer.done():
                        answer.set_exception(error)
                continue
            for (_, answer), value in zip(entries, answers, strict=True):
                if not answer.done():
                    answer.set_result(value)


class EnqueueBatcher(Coalescer[tuple[str, int], NewJob, bool]):
    """Jobs for the same (queue, remember_ms) go in one `enqueue_many`; each caller learns if its was new."""

    async def enqueue(self, queue: str, job: NewJob, *, remember_ms: int) -> bool:
        """Enqueue `job` with others due now; True if it was new, False if its id was refused."""
        return await self.ask((queue, remember_ms), job)

    async def call(self, key: tuple[str, int], requests: Sequence[NewJob]) -> list[bool]:
        queue, remember_ms = key
        added = set(await enqueue_many(self.redis, queue, requests, remember_ms=remember_ms))
        return [job.job_id in added for job in requests]


class OutcomeReader(Coalescer[str, tuple[str, ...], dict[str, JobOutcome]]):
    """Many callers' job ids on one queue read in one pipelined `job_outcomes`."""

    async def read(self, queue: str, job_ids: Sequence[str]) -> dict[str, JobOutcome]:
        return await self.ask(queue, tuple(job_ids)) if job_ids else {}

    async def call(self, key: str, requests: Sequence[tuple[str, ...]]) -> list[dict[str, JobOutcome]]:
        wanted = list(dict.fromkeys(job_id for job_ids in requests for job_id in job_ids))
        outcomes = await job_outcomes(self.redis, key, wanted)
        return [{job_id: outcomes[job_id] for job_id in job_ids} for job_ids in requests]
