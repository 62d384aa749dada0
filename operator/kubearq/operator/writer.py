"""The leader's status writes: within a QPS budget, off the scheduling path, the newest status per object.

Writing ten thousand statuses takes the API server (and httpx) seconds; if the leader's loop waited for
them, the next minute's ticks would wait too, and the wait grows minute after minute. So the loop hands
each schedule's step to this writer and goes on: at most CONCURRENCY writes are in flight, one at a time
per object, and a step handed in while an older one for the same object still waits replaces it (the
newest status is all that needs writing: a merge patch of the whole status). Until the write lands the
loop reads the pending status from here (`pending_status`), never the older one in the watch store, so
a tick already enqueued is never planned again.

Every status write — these and the ScrapeRequests' (`WriteBudget.claim`) — spends a token of one
`WriteBudget`. As the chart's ServiceAccount the operator is not exempt from API Priority and Fairness: its
requests land in the `workload-low` level with every other ServiceAccount's, and a flood of them is answered
429. A 429 or a Retry-After halves the budget's rate and pauses it, so the writer sends less, not the same
again harder; a write that met one waits for its turn again. Other passing failures (a timeout, a lost
connection, a 5xx) are tried again after a backoff, unless a newer step for the object was handed in
meanwhile: a retry never overwrites newer news.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Generic, TypeVar

from kubearq.operator.kube import KubeObject, asks_to_slow_down, is_transient
from kubearq.operator.leader import NotLeaderError

if TYPE_CHECKING:  # context.py holds the budget, so this module must not need it at import time
    from kubearq.operator.context import OperatorContext
    from kubearq.operator.schedules import ScheduleStep
    from kubearq.operator.syncschedule import SyncScheduleStatus

logger = logging.getLogger(__name__)
CONCURRENCY = 32  # status writes in flight; more only lengthens the API server's queue and the client's pool
RETRY_SECONDS = 1.0
"""The first retry of a failed write; doubled on each failure in a row, at most RETRY_MAX_SECONDS."""
RETRY_MAX_SECONDS = 30.0
RECOVERY_SECONDS = 10.0
"""After a 429, the rate grows back by qps / RECOVERY_SECONDS per second of writes that land (AIMD's additive
increase): from the floor to the full budget in about this long, unless the server throttles again."""
MAX_PAUSE_SECONDS = 60.0  # a Retry-After longer than this is read as this: status is worth writing eventually
WARN_EVERY_SECONDS = 60.0
RESERVATION_SECONDS = 60.0  # a token reserved for a reconciler that did not come back for it this long is dropped
WAIT_RESOLUTION = 1e-6  # seconds; shorter waits are rounding errors of the bucket's arithmetic
K = TypeVar("K", bound=Hashable)


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


class WriteBudget:
    """A token bucket of status writes whose rate halves when the API server throttles (AIMD).

    The bucket is client-go's (`flowcontrol.NewTokenBucketRateLimiter`, golang.org/x/time/rate): `qps` tokens a
    second, at most `burst` kept (scaled down with the rate), full at start, one per write. client-go keeps the
    rate fixed and retries a request that met Retry-After up to ten times; kopf retries each request on its own
    backoff. Neither sends less in total, so here a 429 or Retry-After cuts the rate in half (once per round:
    answers to writes sent before the last cut do not cut again), empties the bucket and pauses every write for
    the Retry-After; each write that lands adds back a little (`RECOVERY_SECONDS`). The same cut halves the
    window of writes `acquire` lets be in flight at once (`in_flight` at most), which grows back by one per
    window's worth of writes that land, as TCP's congestion window does: API Priority and Fairness limits seats
    (requests executing at once), not requests a second, so on a level of few seats the window is what keeps
    the writer from being refused. `claim` (a reconciler's write) takes a token but no place in the window.
    `clock` is monotonic seconds, the event loop's by default (looptime's fake time in tests).

    Kept as a schedule rather than a count (GCRA, the bucket's equivalent): `_next` is when the next write would
    go at the current rate, and a write may go up to the bucket's worth of intervals before it. Every write is
    given its moment in turn, so however the rate moves, no window of `w` seconds holds more than
    `burst + qps * w` of them.
    """

    def __init__(self, qps: float, burst: int, *, in_flight: int = CONCURRENCY,
                 clock: Callable[[], float] = _loop_time, on_rate: Callable[[float], None] | None = None) -> None:
        if not (qps > 0 and burst >= 1 and in_flight >= 1):
            raise ValueError(f"a write budget needs qps > 0, burst >= 1 and in_flight >= 1, got qps={qps}, "
                             f"burst={burst}, in_flight={in_flight}")
        self.qps = qps
        self.burst = burst
        self.max_in_flight = in_flight
        self._window = float(in_flight)  # writes `acquire` lets be in flight at once (AIMD, as TCP's window)
        self._in_flight = 0
        self._freed = asyncio.Event()
        self.min_qps = min(qps, 1.0)
        self.now = clock
        self._on_rate = on_rate
        self._rate = qps
        self._next = -math.inf  # the theoretical time of the next write (GCRA's TAT)
        self._paused_until = -math.inf
        self._last_cut = -math.inf
        self._last_warned = -math.inf
        self._throttles = 0  # answers that slowed the budget: a moment given out before one is void
        self._reserved: dict[Hashable, tuple[float, int]] = {}  # reconcilers' moments, by key, with _throttles
        self._gate = asyncio.Lock()  # waiters take their moments one at a time, in turn
        if on_rate is not None:
            on_rate(qps)

    @property
    def rate(self) -> float:
        """Writes a second now: `qps`, or less while the API server throttles."""
        return self._rate

    @property
    def window(self) -> int:
        """Writes `acquire` lets be in flight at once: `in_flight`, or fewer while the API server throttles."""
        return int(self._window)

    def paused_for(self) -> float:
        """Seconds until writes may go again after a Retry-After (0 when not paused)."""
        return max(0.0, self._paused_until - self.now())

    async def acquire(self) -> float:
        """Wait for a place in the window and a token, and take them; returns when, for `throttled`/`succeeded`
        of the write it pays for. `release()` when the write has its answer."""
        async with self._gate:
            while self._in_flight >= self.window:
                self._freed.clear()
                await self._freed.wait()
            while True:
                throttles, asked = self._throttles, self.now()
                moment = self._take(asked)
                if moment > asked:
                    await asyncio.sleep(moment - asked)
                if self._throttles == throttles:
                    self._in_flight += 1
                    return self.now()
                # Throttled while this waited: its moment was given at the old rate. Take a new one.

    def release(self) -> None:
        """A write `acquire` let go has its answer: its place in the window is free."""
        self._in_flight -= 1
        self._freed.set()

    def claim(self, key: Hashable) -> float:
        """For a caller that must not wait (a reconciler in the leader's loop): 0.0 when it may write now (its
        token taken), else the seconds until a moment reserved for `key`; call again then."""
        now = self.now()
        reserved = self._reserved.pop(key, None)
        # A moment reserved before a throttle was given at the old rate: void, take a new one.
        moment = reserved[0] if reserved is not None and reserved[1] == self._throttles else self._take(now)
        if moment <= now:
            return 0.0
        if len(self._reserved) > 256:
            self._reserved = {k: r for k, r in self._reserved.items() if r[0] > now - RESERVATION_SECONDS}
        self._reserved[key] = (moment, self._throttles)
        return moment - now

    def throttled(self, sent_at: float, retry_after: float | None, answer: str = "429") -> bool:
        """The write taken at `sent_at` met a 429 or Retry-After (`answer`): slow down. True if this cut the rate."""
        now = self.now()
        self._throttles += 1
        cut = sent_at >= self._last_cut
        if cut:
            self._set_rate(max(self.min_qps, self._rate / 2))
            self._window = max(1.0, self._window / 2)
            self._last_cut = now
            # Said once a minute at most: under steady throttling the rate is cut every few seconds.
            level = logging.WARNING if now - self._last_warned >= WARN_EVERY_SECONDS else logging.DEBUG
            if level == logging.WARNING:
                self._last_warned = now
            logger.log(level, "the API server throttles status writes (%s, Retry-After %s); writing at most "
                       "%.3g/s for now (STATUS_WRITE_QPS=%g)", answer.strip(),
                       "none" if retry_after is None else f"{retry_after:g} s", self._rate, self.qps)
        if retry_after is not None:
            self._paused_until = max(self._paused_until, now + min(retry_after, MAX_PAUSE_SECONDS))
        # The bucket empties: the first write after the pause waits a full interval, the next ones another each.
        resume = max(now, self._paused_until)
        self._next = max(self._next, resume + self._tolerance() + 1.0 / self._rate)
        return cut

    def succeeded(self, sent_at: float) -> None:
        """The write taken at `sent_at` landed: grow the rate back a little, if it was sent at the current one."""
        if sent_at < self._last_cut:
            return
        if self._rate < self.qps:
            self._set_rate(min(self.qps, self._rate + self.qps / RECOVERY_SECONDS / self._rate))
        if self._window < self.max_in_flight:
            self._window = min(float(self.max_in_flight), self._window + 1 / self._window)

    def _set_rate(self, rate: float) -> None:
        self._rate = rate
        if self._on_rate is not None:
            self._on_rate(rate)

    def _tolerance(self) -> float:
        """How far ahead of `_next` a write may go: the bucket (scaled with the rate) less the one it takes."""
        burst = max(1.0, self.burst * self._rate / self.qps)
        return (burst - 1.0) / self._rate

    def _take(self, now: float) -> float:
        """The moment the next write may go (`now` or later), given out: no later write may have it."""
        moment = max(now, self._next - self._tolerance(), self._paused_until)
        self._next = max(self._next, moment) + 1.0 / self._rate
        # A float's dust is no wait (and a fake clock may not move for it).
        return now if moment - now <= WAIT_RESOLUTION else moment


def _kind(key: object) -> str:
    return str(key[0]) if isinstance(key, tuple) and key else "unknown"


def _shown(key: object) -> str:
    return f"{key[0]} {key[1]}/{key[2]}" if isinstance(key, tuple) and len(key) == 3 else str(key)


def _sends_nothing(step: ScheduleStep) -> bool:
    return not step.events and (step.status is None or step.status == step.previous)


class StatusWriter(Generic[K]):
    def __init__(self, ctx: OperatorContext, on_written: Callable[[K, KubeObject], None],
                 concurrency: int = CONCURRENCY, retry_seconds: float = RETRY_SECONDS) -> None:
        self._ctx = ctx
        self._budget = ctx.status_budget
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
        self._ctx.metrics.set_status_writes_pending(0)

    def submit(self, key: K, step: ScheduleStep) -> None:
        self._submitted[key] = self._submitted.get(key, 0) + 1
        retrying = self._retrying.pop(key, None)
        if retrying is not None:
            retrying[1].cancel()  # this step is newer than the one waiting to be tried again
            self._ctx.metrics.count_status_write_coalesced(_kind(key))
        waiting = self._waiting.get(key)
        if waiting is not None:  # not written yet: one write of the newest status, all the Events
            step = dataclasses.replace(step, previous=waiting.previous, events=waiting.events + step.events,
                                       status=step.status if step.status is not None else waiting.status,
                                       invalid_message=step.invalid_message or waiting.invalid_message)
            self._ctx.metrics.count_status_write_coalesced(_kind(key))
        self._waiting[key] = step
        if waiting is None and key not in self._writing:
            self._keys.put_nowait(key)
        # else: the writer of `key` takes the newest step when its write returns
        self._ctx.metrics.set_status_writes_pending(len(self))

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
            waiting = self._waiting.get(key)
            if waiting is None:
                continue
            if _sends_nothing(waiting):
                del self._waiting[key]  # e.g. the status the object already holds: no request, no token
                continue
            # The token first, the step after: what is handed in while this waits replaces it.
            sent_at = await self._budget.acquire()
            step = self._waiting.pop(key, None)
            if step is None:
                self._budget.release()
                continue
            self._writing[key] = step
            submitted = self._submitted.get(key, 0)
            self._ctx.metrics.count_status_write_sent(_kind(key))
            try:
                written = await step.write(self._ctx)
                self._budget.succeeded(sent_at)
                self._failures.pop(key, None)
                if key not in self._waiting:
                    self._submitted.pop(key, None)  # nothing of this key is left to compare with
                if written is not None:
                    self._on_written(key, written)
            except NotLeaderError:
                pass  # leadership is gone: the elector stops the loop and this writer
            except Exception as error:
                self._ctx.metrics.count_error("write_status")
                if asks_to_slow_down(error):
                    self._slow_down(key, step, sent_at, error)
                elif not is_transient(error):
                    logger.exception("writing the status of %s failed", key)
                elif self._submitted.get(key, 0) == submitted:  # nothing newer to write instead
                    self._retry_later(key, step, submitted, error)
            finally:
                self._budget.release()
                del self._writing[key]
                if key in self._waiting:
                    # Newer news came meanwhile: written in its turn, behind every object already waiting (an
                    # object updated on every pass must not keep the writer to itself while the budget is short).
                    self._keys.put_nowait(key)
                self._ctx.metrics.set_status_writes_pending(len(self))

    def _slow_down(self, key: K, step: ScheduleStep, sent_at: float, error: Exception) -> None:
        """The API server throttled the write: the budget slows down, and the step waits for its next token."""
        self._ctx.metrics.count_status_write_throttled(_kind(key))
        self._budget.throttled(sent_at, getattr(error, "retry_after", None), str(error))
        # Put back for its next token, unless a newer step waits already (it is the newer status).
        if key not in self._waiting:
            # Its Events were posted before the status write: they are not posted twice.
            self._waiting[key] = dataclasses.replace(step, events=())

    def _retry_later(self, key: K, step: ScheduleStep, submitted: int, error: Exception) -> None:
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        delay = min(RETRY_MAX_SECONDS, self._retry_seconds * 2 ** (failures - 1))
        logger.warning("status of %s not written (%s); trying again in %g s", _shown(key),
                       str(error) or type(error).__name__, delay)
        # Its Events were posted before the status write: they are not posted twice.
        again = dataclasses.replace(step, events=())

        def resubmit() -> None:
            if self._retrying.pop(key, None) is not None and self._submitted.get(key, 0) == submitted:
                self.submit(key, again)

        self._retrying[key] = (again, asyncio.get_running_loop().call_later(delay, resubmit))
