"""The leader's schedule status steps on their way to the status writer, held while it works through a long pass.

See `HeldSubmits`: kubearq.operator.main hands each pass's steps to one, and releases them when the pass is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from kubearq.operator.schedules import ScheduleStep
from kubearq.operator.store import Key
from kubearq.operator.syncschedule import SyncScheduleStatus
from kubearq.operator.writer import StatusWriter

HOLD_SECONDS = 10.0
"""The longest the status writes of a long pass are held back for it (see HeldSubmits)."""


class StepSink(Protocol):
    """Where reconcile_all hands the steps to write: the status writer, or a hold before it."""

    def submit(self, key: Key, step: ScheduleStep) -> None: ...

    def pending_status(self, key: Key) -> SyncScheduleStatus | None: ...


class HeldSubmits:
    """Steps for the status writer, held while the leader works through a backlog of passes, at most HOLD_SECONDS.

    The writer's requests cost the operator's CPU too (a few ms each, in the HTTP client): started after each
    chunk of a long pass, they slowed the rest of the pass, and the ticks of schedules not yet armed waited
    longer (10,000 schedules, cold start: p99 17.8 s instead of ~1 s). Held, they start when the pass is done;
    a backlog that never empties (more schedules than one minute's passes can take) releases them anyway, or
    they would pile up unwritten (100,000 schedules: 2.5 GiB and not one status written)."""

    def __init__(self, writer: StatusWriter[Key], clock: Callable[[], float] = time.monotonic) -> None:
        self.writer = writer
        self._clock = clock
        self._held: list[tuple[Key, ScheduleStep]] = []
        self._statuses: dict[Key, SyncScheduleStatus] = {}  # the newest status held per object
        self._since = 0.0

    def submit(self, key: Key, step: ScheduleStep) -> None:
        if not self._held:
            self._since = self._clock()
        self._held.append((key, step))
        if step.status is not None:
            self._statuses[key] = step.status

    def pending_status(self, key: Key) -> SyncScheduleStatus | None:
        held = self._statuses.get(key)
        return held if held is not None else self.writer.pending_status(key)

    def release_if_overdue(self) -> None:
        if self._held and self._clock() - self._since >= HOLD_SECONDS:
            self.release()

    def release(self) -> None:
        """Hand every held step to the writer, in the order they came (it keeps the newest per object)."""
        held, self._held, self._statuses = self._held, [], {}
        for key, step in held:
            self.writer.submit(key, step)
