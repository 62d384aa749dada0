"""The leader's status writes, off the scheduling path: a few writers drain the newest status per object.

Writing ten thousand statuses takes the API server (and httpx) seconds; if the leader's loop waited for
them, the next minute's ticks would wait too, and the wait grows minute after minute. So the loop hands
each schedule's step to this writer and goes on: at most CONCURRENCY writes are in flight, one at a time
per object, and a step handed in while an older one for the same object still waits replaces it (the
newest status is all that needs writing: a merge patch of the whole status). Until the write lands the
loop reads the pending status from here (`pending_status`), never the older one in the watch store, so
a tick already enqueued is never planned again.

A write that fails for a passing reason (a timeout, a lost connection, 429, a 5xx) is tried again after a
backoff, unless a newer step for the object was handed in meanwhile: a retry never overwrites newer news.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from kubearq.operator.context import OperatorContext
from kubearq.operator.kube import KubeObject, is_transient
from kubearq.operator.leader import NotLeaderError
from kubearq.operator.schedules import ScheduleStep
from kubearq.operator.syncschedule import SyncScheduleStatus

logger = logging.getLogger(__name__)
CONCURRENCY = 32  # status writes in flight; more only lengthens the API server's queue and the client's pool
RETRY_SECONDS = 1.0
"""The first retry of a failed write; doubled on each failure in a row, at most RETRY_MAX_SECONDS."""
RETRY_MAX_SECONDS = 30.0
K = TypeVar("K", bound=Hashable)


class StatusWriter(Generic[K]):
    def __init__(self, ctx: OperatorContext, on_written: Callable[[K, KubeObject], None],
                 concurrency: int = CONCURRENCY, retry_seconds: float = RETRY_SECONDS) -> None:
        self._ctx = ctx
        self._on_written = on_written
        self._waiting: dict[K, ScheduleStep] = {}
        self._writing: dict[K, ScheduleStep] = {}
        self._keys: asyncio.Queue[K] = asyncio.Queue()
        self._concurrency = concurrency
        self._tasks: list[asyncio.Task[None]] = []
        self._retry_seconds = retry_seconds
        self._submitted: dict[K, int] = {}  # steps handed in per key: a retry goes only if none came since
        self._failures: dict[K, int] = {}  # failed writes in a row per key (its backoff)
        self._retrying: dict[K, tuple[ScheduleStep, asyncio.TimerHandle]] = {}

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._drain(), name=f"kubearq-status-writer-{number}")
                       for number in range(self._concurrency)]

    async def stop(self) -> None:
        """Stop writing; what was not written yet is dropped (the next leader computes it again)."""
        for _, handle in self._retrying.values():
            handle.cancel()
        self._retrying.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def submit(self, key: K, step: ScheduleStep) -> None:
        self._submitted[key] = self._submitted.get(key, 0) + 1
        retrying = self._retrying.pop(key, None)
        if retrying is not None:
            retrying[1].cancel()  # this step is newer than the one waiting to be tried again
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
        if step is None and key in self._retrying:
            step = self._retrying[key][0]
        return step.status if step is not None else None

    def __len__(self) -> int:
        """Steps not written yet: waiting, being written or waiting to be tried again."""
        return len(self._waiting) + len(self._writing) + len(self._retrying)

    async def _drain(self) -> None:
        while True:
            key = await self._keys.get()
            while key in self._waiting:
                step = self._writing[key] = self._waiting.pop(key)
                submitted = self._submitted.get(key, 0)
                try:
                    written = await step.write(self._ctx)
                    self._failures.pop(key, None)
                    if key not in self._waiting:
                        self._submitted.pop(key, None)  # nothing of this key is left to compare with
                    if written is not None:
                        self._on_written(key, written)
                except NotLeaderError:
                    pass  # leadership is gone: the elector stops the loop and this writer
                except Exception as error:
                    self._ctx.metrics.count_error("write_status")
                    if not is_transient(error):
                        logger.exception("writing the status of %s failed", key)
                    elif self._submitted.get(key, 0) == submitted:  # nothing newer to write instead
                        self._retry_later(key, step, submitted, error)
                finally:
                    del self._writing[key]

    def _retry_later(self, key: K, step: ScheduleStep, submitted: int, error: Exception) -> None:
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        delay = min(RETRY_MAX_SECONDS, self._retry_seconds * 2 ** (failures - 1))
        shown = f"{key[0]} {key[1]}/{key[2]}" if isinstance(key, tuple) and len(key) == 3 else str(key)
        logger.warning("status of %s not written (%s); trying again in %g s", shown,
                       str(error) or type(error).__name__, delay)
        # Its Events were posted before the status write: they are not posted twice.
        again = dataclasses.replace(step, events=())

        def resubmit() -> None:
            if self._retrying.pop(key, None) is not None and self._submitted.get(key, 0) == submitted:
                self.submit(key, again)

        self._retrying[key] = (again, asyncio.get_running_loop().call_later(delay, resubmit))
