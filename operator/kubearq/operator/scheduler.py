"""SyncSchedule decisions, pure: which ticks are due, which policy applies, what the job id is, which asks (a
trigger, a backfill) are still to be handled and what a backfill enqueues.

Plus the one heap of next-fire times the leader drives for every schedule (not a task per object).
"""

from __future__ import annotations

import functools
import hashlib
import heapq
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Generic, TypeVar

from kubearq.core.contract import TICK_JOB_PREFIX
from kubearq.operator.actions import (
    BACKFILL_ANNOTATION,
    MAX_BACKFILL_TICKS,
    TRIGGER_ANNOTATION,
    ActionOutcome,
    BackfillAsk,
    BackfillRecord,
    TriggerRecord,
    ask_id_of,
    read_ask,
)
from kubearq.operator.cron import iter_ticks
from kubearq.operator.syncschedule import ConcurrencyPolicy, SyncScheduleStatus

MANUAL_JOB_PREFIX = "kubearq:manual:"  # a triggered run's job id: kubearq:manual:<schedule uid>:<ask id>

# A week of every-minute ticks is 10,080; more due ticks than this are all older than any deadline allows.
MAX_TICKS_KEPT = 20_000


def tick_job_id(schedule_uid: str, tick: datetime) -> str:
    """Deterministic: the same tick of the same schedule is one ARQ job, whoever enqueues it."""
    return f"{TICK_JOB_PREFIX}{schedule_uid}:{int(tick.timestamp())}"


def manual_job_id(schedule_uid: str, ask_id: str) -> str:
    """Deterministic per ask: the same trigger of the same schedule is one ARQ job, however often it is handled."""
    return f"{MANUAL_JOB_PREFIX}{schedule_uid}:{ask_id}"


def rfc3339_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def window_ticks(schedule: str, time_zone: str, start: datetime, end: datetime, limit: int) -> list[datetime]:
    """Ticks in [start, end), oldest first, at most `limit + 1` of them (one more than the limit says "too many")."""
    found: list[datetime] = []
    for tick in iter_ticks(schedule, time_zone, start - timedelta(microseconds=1)):
        if tick >= end or len(found) > limit:
            break
        found.append(tick)
    return found


@dataclass(frozen=True)
class BackfillPlan:
    """The ticks a backfill enqueues, or why it is refused."""

    ticks: list[datetime]
    refusal: str | None = None


def plan_backfill(schedule: str, time_zone: str, start: datetime, end: datetime, now: datetime,
                  limit: int = MAX_BACKFILL_TICKS) -> BackfillPlan:
    """Every tick in [start, end) that is not in the future, or a refusal saying what to change.

    The CLI checks with this before it asks and the leader again when it acts, so both say the same."""
    window = f"[{rfc3339_utc(start)}, {rfc3339_utc(end)})"
    if end <= start:
        return BackfillPlan([], f"the backfill window {window} is empty: its end (to) must be after its start (from)")
    if start > now:
        return BackfillPlan([], f"the backfill window {window} starts in the future: a backfill enqueues past ticks; "
                                "the schedule enqueues future ones itself")
    ticks = window_ticks(schedule, time_zone, start, min(end, now + timedelta(microseconds=1)), limit)
    if len(ticks) > limit:
        return BackfillPlan([], f"the backfill window {window} holds more than {limit} ticks of {schedule!r}; "
                                f"backfill at most {limit} at a time (split the window)")
    return BackfillPlan(ticks)


def jitter_offset(schedule_uid: str, jitter_seconds: int) -> int:
    """A delay in [0, jitter_seconds], stable per schedule (a leader change does not move the run)."""
    if jitter_seconds <= 0:
        return 0
    digest = int(hashlib.sha256(schedule_uid.encode()).hexdigest()[:12], 16)
    return digest % (jitter_seconds + 1)


@dataclass(frozen=True)
class TickPlan:
    """What to do about the ticks since the last one handled."""

    enqueue: list[datetime]
    """Due ticks to enqueue now, oldest first."""
    missed: int
    """Due ticks skipped for being too old (past `startingDeadlineSeconds`)."""
    last_handled: datetime | None
    """The newest due tick (enqueued or missed): the next `lastScheduleTime`; None if none was due."""
    next_tick: datetime
    """The first tick after `now`."""


def plan_ticks(
    schedule: str, time_zone: str, since: datetime, now: datetime, starting_deadline_seconds: int | None
) -> TickPlan:
    """Ticks in (since, now]: those within the deadline are enqueued once each, older ones missed.

    Without a deadline only the most recent due tick runs (CronJob's behaviour), the rest count as missed.
    """
    first, second = next_two_ticks(schedule, time_zone, since)
    if second > now:  # the usual case, a pass at or between ticks: at most one is due
        due: deque[datetime] = deque([first] if first <= now else [])
        walked, tick = len(due), second if first <= now else first
    else:
        # Only the most recent ticks can still be enqueued: keep a bounded window of them while counting all.
        due = deque(maxlen=MAX_TICKS_KEPT)
        ticks = iter_ticks(schedule, time_zone, since)
        tick = next(ticks)
        walked = 0
        while tick <= now:
            due.append(tick)
            walked += 1
            tick = next(ticks)
    if starting_deadline_seconds is None:
        enqueue = list(due)[-1:]
    else:
        oldest = now - timedelta(seconds=starting_deadline_seconds)
        enqueue = [moment for moment in due if moment >= oldest]
    return TickPlan(enqueue=enqueue, missed=walked - len(enqueue), last_handled=due[-1] if due else None,
                    next_tick=tick)


@functools.lru_cache(maxsize=4096)
def next_two_ticks(schedule: str, time_zone: str, since: datetime) -> tuple[datetime, datetime]:
    """The two ticks after `since`. Schedules that share an expression and their last tick (every schedule on
    `* * * * *`, most on `0 * * * *`) share the answer: parsing the expression for each of 100,000 schedules
    every minute was a third of the leader's pass (measured, bench/scheduler_lag.py)."""
    ticks = iter_ticks(schedule, time_zone, since)
    return next(ticks), next(ticks)


class Action(StrEnum):
    ENQUEUE = "Enqueue"
    SKIP = "Skip"
    REPLACE = "Replace"


def decide_policy(policy: ConcurrencyPolicy, active_runs: Sequence[str]) -> Action:
    """CronJob's concurrencyPolicy: Allow runs overlap, Forbid skips the tick, Replace aborts the old run."""
    if not active_runs or policy == ConcurrencyPolicy.ALLOW:
        return Action.ENQUEUE
    return Action.SKIP if policy == ConcurrencyPolicy.FORBID else Action.REPLACE


def tick_memory_ms(floor_seconds: int, lease_duration_seconds: float, starting_deadline_seconds: int | None) -> int:
    """How long an enqueued tick's id stays refused: beyond any failover plus the catch-up window."""
    window = lease_duration_seconds + (starting_deadline_seconds or 60) + 60
    return int(max(floor_seconds, window) * 1000)


def parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


Key = TypeVar("Key", bound=Hashable)


@dataclass
class FireHeap(Generic[Key]):
    """Next fire time per key, earliest first; updating or removing a key is O(log n) (stale entries skipped)."""

    _heap: list[tuple[datetime, int, Key]] = field(default_factory=list)
    _current: dict[Key, tuple[datetime, int]] = field(default_factory=dict)
    _counter: int = 0

    def schedule(self, key: Key, when: datetime) -> None:
        self._counter += 1
        self._current[key] = (when, self._counter)
        heapq.heappush(self._heap, (when, self._counter, key))

    def remove(self, key: Key) -> None:
        self._current.pop(key, None)

    def pop_due(self, now: datetime) -> list[Key]:
        due: list[Key] = []
        while self._heap and self._heap[0][0] <= now:
            when, counter, key = heapq.heappop(self._heap)
            if self._current.get(key) == (when, counter):
                del self._current[key]
                due.append(key)
        return due

    def next_time(self) -> datetime | None:
        while self._heap:
            when, counter, key = self._heap[0]
            if self._current.get(key) == (when, counter):
                return when
            heapq.heappop(self._heap)
        return None

    def __len__(self) -> int:
        return len(self._current)


@dataclass(frozen=True)
class PendingAsks:
    """The trigger and backfill asks on a schedule that its status does not record as handled yet."""

    annotations: Mapping[str, str]
    trigger_id: str | None
    backfill_id: str | None

    def due(self) -> list[tuple[str, type[TriggerRecord | BackfillRecord], str]]:
        """(status field, record kind, ask id) of each ask to handle."""
        found: list[tuple[str, type[TriggerRecord | BackfillRecord], str]] = []
        if self.trigger_id is not None:
            found.append(("last_trigger", TriggerRecord, self.trigger_id))
        if self.backfill_id is not None:
            found.append(("last_backfill", BackfillRecord, self.backfill_id))
        return found

    def requested_by(self, ask_id: str) -> str | None:
        for annotation, model in ((TRIGGER_ANNOTATION, None), (BACKFILL_ANNOTATION, BackfillAsk)):
            ask = read_ask(self.annotations, annotation, model) if model else read_ask(self.annotations, annotation)
            if not isinstance(ask, str) and ask is not None and ask.id == ask_id:
                return ask.requested_by
        return None


def pending_asks(annotations: Mapping[str, str] | None, status: SyncScheduleStatus) -> PendingAsks:
    """The asks on the object that its status does not record as handled (a handled id is never acted on again)."""
    annotations = dict(annotations or {})
    trigger = ask_id_of(annotations, TRIGGER_ANNOTATION)
    backfill = ask_id_of(annotations, BACKFILL_ANNOTATION, BackfillAsk)
    return PendingAsks(
        annotations,
        trigger if trigger is not None and (status.last_trigger is None or status.last_trigger.id != trigger) else None,
        backfill if backfill is not None and (
            status.last_backfill is None or status.last_backfill.id != backfill) else None)


def forbidden_trigger(active: Sequence[str]) -> str:
    """Why `concurrencyPolicy: Forbid` refuses a trigger."""
    shown = ", ".join(active[:5]) + (", ..." if len(active) > 5 else "")
    return (f"not triggered: concurrencyPolicy is Forbid and {len(active)} run(s) are still queued or running "
            f"({shown}); trigger again once they finish")[:1024]


def refusal(kind: type[TriggerRecord | BackfillRecord], ask_id: str, message: str, now: datetime,
            requested_by: Callable[[str], str | None]) -> TriggerRecord | BackfillRecord:
    return kind(id=ask_id, outcome=ActionOutcome.REFUSED, message=message[:1024], handled_time=now,
                requested_by=requested_by(ask_id))
