"""The leader's status writes, off the scheduling path: a few writers drain the newest status per object.

Writing ten thousand statuses takes the API server (and httpx) seconds; if the leader's loop waited for
them, the next minute's ticks would wait too, and the wait grows minute after minute. So the loop hands
each schedule's step to this writer and goes on: at most CONCURRENCY writes are in flight, one at a time
per object, and a step handed in while an older one for the same object still waits replaces it (the
newest status is all that needs writing: a merge patch of the whole status). Until the write lands the
loop reads the pending status from here (`pending_status`), never the older one in the watch store, so
a tick already enqueued is never planned again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from kubearq.operator.context import OperatorContext
from kubearq.operator.kube import KubeObject
from kubearq.operator.leader import NotLeaderError
from kubearq.operator.schedules import ScheduleStep
from kubearq.operator.syncschedule import SyncScheduleStatus

logger = logging.getLogger(__name__)
CONCURRENCY = 32  # status writes in flight; more only lengthens the API server's queue and the client's pool
K = TypeVar("K", bound=Hashable)


class StatusWriter(Generic[K]):
    def __init__(self, ctx: OperatorContext, on_written: Callable[[K, KubeObject], None],
                 concurrency: int = CONCURRENCY) -> None:
        self._ctx = ctx
        self._on_written = on_written
        self._waiting: dict[K, ScheduleStep] = {}
        self._writing: dict[K, ScheduleStep] = {}
        self._keys: asyncio.Queue[K] = asyncio.Queue()
        self._concurrency = concurrency
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._drain(), name=f"kubearq-status-writer-{number}")
                       for number in range(self._concurrency)]

    async def stop(self) -> None:
        """Stop writing; what was not written yet is dropped (the next leader computes it again)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def submit(self, key: K, step: ScheduleStep) -> None:
        waiting = self._waiting.get(key)
        if waiting is not None:  # not written yet: one write of the newest status, all the Events
            step = dataclasses.replace(step, previous=waiting.previous, events=waiting.events + step.events,
                                       status=step.status if step.status is not None else waiting.status,
                                       invalid_message=step.invalid_message or waiting.invalid_message)
        self._waiting[key] = step
        if waiting is None and key not in self._writing:
            self._keys.put_nowait(key)
        # else: the writer of `key` takes the newest step when its write returns

    def pending_status(self, key: K) -> SyncScheduleStatus | None:
        """The newest status handed in for `key` and not yet seen written, if any."""
        step = self._waiting.get(key) or self._writing.get(key)
        return step.status if step is not None else None

    def __len__(self) -> int:
        return len(self._waiting) + len(self._writing)

    async def _drain(self) -> None:
        while True:
            key = await self._keys.get()
            while key in self._waiting:
                step = self._writing[key] = self._waiting.pop(key)
                try:
                    written = await step.write(self._ctx)
                    if written is not None:
                        self._on_written(key, written)
                except NotLeaderError:
                    pass  # leadership is gone: the elector stops the loop and this writer
                except Exception:
                    self._ctx.metrics.count_error("write_status")
                    logger.exception("writing the status of %s failed", key)
                finally:
                    del self._writing[key]
