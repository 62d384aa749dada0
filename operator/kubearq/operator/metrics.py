"""The operator's Prometheus metrics, and the task that keeps the per-queue gauges fresh.

Names follow Prometheus conventions (`kubearq_` prefix, base units, `_total` counters). Workers scale on
`kubearq_queue_busy_jobs` (ready + running), never on deferred jobs (design.md "Autoscaling").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kubearq.core.aio import wait_or_timeout
from kubearq.operator.queuestats import DEFAULT_MAX_CHECKED, QueueStats, label_safe, queue_stats

logger = logging.getLogger(__name__)

EnqueueSource = Literal["schedule", "scrape"]
QUEUE_LABELS = ("queue", "queue_label")
DEFAULT_REFRESH_INTERVAL_SECONDS = 10.0


@dataclass
class OperatorMetrics:
    """One registry per operator instance (no global registry: tests run several operators in one process)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        def queue_gauge(name: str, documentation: str) -> Gauge:
            return Gauge(name, documentation, QUEUE_LABELS, registry=self.registry)

        self.queue_ready = queue_gauge(
            "kubearq_queue_ready_jobs", "Jobs due that no worker has started (score <= now, no in-progress mark).")
        self.queue_running = queue_gauge(
            "kubearq_queue_running_jobs", "Jobs a worker is running (still in the queue, with an in-progress mark).")
        self.queue_deferred = queue_gauge(
            "kubearq_queue_deferred_jobs", "Jobs waiting for a later time (retry backoff, rate limit, _defer_by).")
        self.queue_busy = queue_gauge(
            "kubearq_queue_busy_jobs", "Ready plus running jobs: work that needs a worker slot; workers scale on it.")
        self.queue_oldest_ready_age = queue_gauge(
            "kubearq_queue_oldest_ready_job_age_seconds", "How long the oldest ready job has been due (0 when none).")
        self.enqueued = Counter(
            "kubearq_enqueued_jobs_total", "Jobs the operator enqueued.", ("source", "queue"), registry=self.registry)
        self.duplicate_enqueues = Counter(
            "kubearq_duplicate_enqueues_total", "Enqueues ARQ refused because it already held a job with that id.",
            ("source",), registry=self.registry)
        self.status_patches = Counter(
            "kubearq_status_patches_total", "Status subresource patches, by resource kind and result.",
            ("kind", "result"), registry=self.registry)
        self.status_writes_sent = Counter(
            "kubearq_status_writes_sent_total", "Status writes sent to the API server, each paid from the budget.",
            ("kind",), registry=self.registry)
        self.status_writes_coalesced = Counter(
            "kubearq_status_writes_coalesced_total",
            "Statuses never sent because a newer one of the same object replaced them (or the next pass will).",
            ("kind",), registry=self.registry)
        self.status_writes_throttled = Counter(
            "kubearq_status_writes_throttled_total",
            "Status writes the API server throttled (429 or Retry-After); each slows the writer down.",
            ("kind",), registry=self.registry)
        self.status_write_rate = Gauge(
            "kubearq_status_write_rate_qps",
            "Status writes a second the budget allows now: STATUS_WRITE_QPS, less while the API server throttles.",
            registry=self.registry)
        self.status_writes_pending = Gauge(
            "kubearq_status_writes_pending", "SyncSchedule statuses handed to the writer and not written yet.",
            registry=self.registry)
        self.errors = Counter(
            "kubearq_errors_total", "Errors the operator survived, by operation.", ("operation",),
            registry=self.registry)
        self.schedule_tick_lag = Histogram(
            "kubearq_schedule_tick_lag_seconds", "Delay from a schedule's tick time to its job being enqueued.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
            registry=self.registry)
        self.leader = Gauge(
            "kubearq_leader", "1 while this replica holds the leader Lease, else 0.", registry=self.registry)
        for source in ("schedule", "scrape"):
            # Present from the start, so rate() sees the first refusal instead of a series appearing at 1.
            self.duplicate_enqueues.labels(source=source)
        for kind in ("SyncSchedule", "ScrapeRequest"):
            for counter in (self.status_writes_sent, self.status_writes_coalesced, self.status_writes_throttled):
                counter.labels(kind=kind)
        self._published_queues: set[str] = set()

    def _queue_gauges(self) -> tuple[Gauge, ...]:
        return (self.queue_ready, self.queue_running, self.queue_deferred, self.queue_busy,
                self.queue_oldest_ready_age)

    def publish_queue_stats(self, stats: QueueStats) -> None:
        """Set the queue's gauges, labelled with its raw name and its label-safe form."""
        labels = (stats.queue, label_safe(stats.queue))
        self.queue_ready.labels(*labels).set(stats.ready)
        self.queue_running.labels(*labels).set(stats.running)
        self.queue_deferred.labels(*labels).set(stats.deferred)
        self.queue_busy.labels(*labels).set(stats.busy)
        self.queue_oldest_ready_age.labels(*labels).set(stats.oldest_ready_age_seconds)
        self._published_queues.add(stats.queue)

    def forget_queue(self, queue: str) -> None:
        """Drop the queue's gauges, so scrapers see no series (never a made-up 0) until it is read again."""
        if queue not in self._published_queues:
            return
        labels = (queue, label_safe(queue))
        for gauge in self._queue_gauges():
            gauge.remove(*labels)
        self._published_queues.discard(queue)

    @property
    def published_queues(self) -> frozenset[str]:
        """Queues whose gauges are in the registry now."""
        return frozenset(self._published_queues)

    def count_enqueued(self, source: EnqueueSource, queue: str, jobs: int = 1) -> None:
        self.enqueued.labels(source=source, queue=queue).inc(jobs)

    def count_duplicate_enqueue(self, source: EnqueueSource, jobs: int = 1) -> None:
        self.duplicate_enqueues.labels(source=source).inc(jobs)

    def count_status_patch(self, kind: str, result: str) -> None:
        self.status_patches.labels(kind=kind, result=result).inc()

    def count_status_write_sent(self, kind: str) -> None:
        self.status_writes_sent.labels(kind=kind).inc()

    def count_status_write_coalesced(self, kind: str) -> None:
        self.status_writes_coalesced.labels(kind=kind).inc()

    def count_status_write_throttled(self, kind: str) -> None:
        self.status_writes_throttled.labels(kind=kind).inc()

    def set_status_write_rate(self, qps: float) -> None:
        self.status_write_rate.set(qps)

    def set_status_writes_pending(self, steps: int) -> None:
        self.status_writes_pending.set(steps)

    def count_error(self, operation: str) -> None:
        self.errors.labels(operation=operation).inc()

    def observe_tick_lag(self, seconds: float) -> None:
        self.schedule_tick_lag.observe(max(0.0, seconds))

    def set_leader(self, leading: bool) -> None:
        self.leader.set(1 if leading else 0)


@dataclass
class QueueStatsRefresher:
    """Refreshes every watched queue's gauges every `interval_seconds` in one background task.

    `queues` is asked for the current set on every pass (the operator derives it from its indexes of
    SyncSchedules and ScrapeRequests plus the configured worker queues); queues that left the set lose
    their series. A queue that cannot be read loses its series too and counts an error
    (`kubearq_errors_total{operation="queue_stats"}`): an absent metric leaves the HPA where it is, while a
    0 would scale workers down (design.md: a missing metric never scales to 0).
    """

    redis: Redis
    metrics: OperatorMetrics
    queues: Callable[[], Iterable[str]]
    interval_seconds: float = DEFAULT_REFRESH_INTERVAL_SECONDS
    # A read that hangs (a partitioned Redis answers nothing) must not keep old values published.
    read_timeout_seconds: float = 5.0
    max_checked: int = DEFAULT_MAX_CHECKED
    _task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.interval_seconds <= 0:
            raise ValueError(f"queue stats refresh interval must be > 0 seconds, got {self.interval_seconds}")
        if self.read_timeout_seconds <= 0:
            raise ValueError(f"queue stats read timeout must be > 0 seconds, got {self.read_timeout_seconds}")

    async def refresh(self) -> None:
        """Read every watched queue once and publish (or drop) its gauges."""
        wanted = sorted(set(self.queues()))
        for position, queue in enumerate(wanted):
            try:
                async with asyncio.timeout(self.read_timeout_seconds):
                    stats = await queue_stats(self.redis, queue, max_checked=self.max_checked)
            except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as error:
                # Redis is unreachable for every queue: drop them all now rather than wait out a timeout each.
                logger.warning("cannot reach Redis to read queue stats (%s: %s); dropping the gauges of %d queues",
                               type(error).__name__, error, len(wanted) - position)
                self.metrics.count_error("queue_stats")
                for unread in wanted[position:]:
                    self.metrics.forget_queue(unread)
                break
            except RedisError as error:
                # This queue only, e.g. WRONGTYPE when the name holds some other kind of key.
                logger.warning("cannot read stats of queue %r (%s: %s); dropping its gauges",
                               queue, type(error).__name__, error, extra={"queue": queue})
                self.metrics.count_error("queue_stats")
                self.metrics.forget_queue(queue)
            else:
                self.metrics.publish_queue_stats(stats)
        for queue in self.metrics.published_queues - set(wanted):
            self.metrics.forget_queue(queue)

    async def run(self) -> None:
        """Refresh until `stop()`; the gauges are dropped when it ends, so none outlive the refresher."""
        try:
            while not self._stopping.is_set():
                await self.refresh()
                # Not asyncio.wait_for: its inner task, cancelled by kopf's stop (kopf cancels every task
                # begun after it started that still runs 5 s into its stop), crashed this loop.
                await wait_or_timeout(self._stopping, self.interval_seconds)
        finally:
            for queue in self.metrics.published_queues:
                self.metrics.forget_queue(queue)

    def start(self) -> asyncio.Task[None]:
        """Run the refresher in a background task (one per operator)."""
        if self._task is not None and not self._task.done():
            raise RuntimeError("queue stats refresher already running")
        self._stopping.clear()
        self._task = asyncio.create_task(self.run(), name="kubearq-queue-stats")
        return self._task

    @property
    def alive(self) -> bool:
        """True while the background task runs (a liveness check for the probe server)."""
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Stop the task and wait for it; re-raises whatever crashed it."""
        self._stopping.set()
        if self._task is not None:
            task, self._task = self._task, None
            await task
