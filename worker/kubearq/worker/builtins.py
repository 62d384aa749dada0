"""The built-in jobs a `kubearq worker` serves besides the user's own."""

from __future__ import annotations

from kubearq.worker.main import JobSet
from kubearq.worker.settings import WorkerSettings


def builtin_jobs(settings: WorkerSettings) -> JobSet:
    """The scrape pipeline's jobs (they arrive with the scrape pipeline); none yet."""
    return JobSet()
