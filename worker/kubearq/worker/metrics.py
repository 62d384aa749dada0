"""The worker's Prometheus metrics (names follow Prometheus conventions: base units, `_total` counters)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class WorkerMetrics:
    """One registry per worker process (no global registry: tests run several workers in one process)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        def counter(name: str, documentation: str, labels: tuple[str, ...] = ("function",)) -> Counter:
            return Counter(name, documentation, labels, registry=self.registry)

        self.jobs_started = counter("kubearq_worker_jobs_started_total", "Job tries started.")
        self.jobs_succeeded = counter("kubearq_worker_jobs_succeeded_total", "Jobs that finished successfully.")
        self.jobs_failed = counter("kubearq_worker_jobs_failed_total", "Jobs that failed their last try.")
        self.jobs_retried = counter("kubearq_worker_jobs_retried_total", "Failed tries put back with a backoff.")
        self.jobs_deferred = counter(
            "kubearq_worker_jobs_deferred_total", "Tries put back without spending a try (e.g. rate limit).")
        self.jobs_requeued = counter(
            "kubearq_worker_jobs_requeued_total", "Running jobs put back on shutdown without spending a try.")
        self.errors = counter(
            "kubearq_worker_errors_total", "Errors the worker survived (Redis outages, heartbeat failures).",
            ("operation",))
        self.job_duration = Histogram(
            "kubearq_worker_job_duration_seconds", "Duration of one job try.", ("function",),
            buckets=(0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 15, 60, 300, 1800),
            registry=self.registry,
        )
        self.jobs_in_flight = Gauge(
            "kubearq_worker_jobs_in_flight", "Job tries running now.", ("function",), registry=self.registry)
