"""What the demo shows: one snapshot of the whole system, read from the resources' status, the Lease, the
operators' /metrics, the website, the workers' ledger and the sync tables; and a timeline of what happened."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

ReplicaState = Literal["starting", "standby", "leader", "killed", "stopped"]


@dataclass(frozen=True)
class PageCounts:
    total: int = 0
    done: int = 0
    failed: int = 0
    deferred: int = 0

    @classmethod
    def of(cls, status: Any) -> PageCounts:
        counts = status if isinstance(status, dict) else {}
        return cls(*(int(counts.get(name) or 0) for name in ("total", "done", "failed", "deferred")))

    def __add__(self, other: PageCounts) -> PageCounts:
        return PageCounts(self.total + other.total, self.done + other.done, self.failed + other.failed,
                          self.deferred + other.deferred)

    @property
    def finished(self) -> int:
        return self.done + self.failed


@dataclass(frozen=True)
class FailedUrl:
    url: str
    error: str
    tries: int


@dataclass(frozen=True)
class ScrapeView:
    """A ScrapeRequest as its status says (what `kubectl get scraperequests` shows)."""

    name: str
    phase: str
    listing: PageCounts
    detail: PageCounts
    rate_limit: int
    failed_urls: tuple[FailedUrl, ...] = ()
    start_time: datetime | None = None
    completion_time: datetime | None = None
    condition: str = ""
    """The `Succeeded` condition: its status, reason and message."""

    @property
    def pages(self) -> PageCounts:
        return self.listing + self.detail

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "PartiallySucceeded", "Failed")

    @classmethod
    def of(cls, obj: Any, rate_limit: int) -> ScrapeView:
        status = obj.get("status") or {}
        failed = tuple(FailedUrl(str(entry.get("url")), str(entry.get("error")), int(entry.get("tries") or 0))
                       for entry in status.get("failedUrls") or [])
        succeeded = next((c for c in status.get("conditions") or [] if c.get("type") == "Succeeded"), None)
        condition = (f"Succeeded={succeeded.get('status')} {succeeded.get('reason')}: {succeeded.get('message')}"
                     if succeeded else "")
        return cls(str(obj["metadata"]["name"]), str(status.get("phase") or "Pending"),
                   PageCounts.of(status.get("listingPages")), PageCounts.of(status.get("detailPages")), rate_limit,
                   failed, parse_time(status.get("startTime")), parse_time(status.get("completionTime")), condition)


@dataclass(frozen=True)
class TickView:
    """One run of the SyncSchedule, from its status, with who enqueued it (the operators' logs) and where it
    ran (the workers' ledger)."""

    job_id: str
    scheduled: datetime
    enqueued: datetime | None
    outcome: str
    enqueued_by: str | None = None
    ran_on: str | None = None
    events_counted: int | None = None

    @property
    def lateness(self) -> float | None:
        return (self.enqueued - self.scheduled).total_seconds() if self.enqueued else None


@dataclass(frozen=True)
class ConnectionView:
    """A row of `connections` (what `kubearq connections list` shows) and its rows in `metric_snapshots`."""

    name: str
    provider: str
    time_zone: str
    status: str
    """`sync_status`: syncing, idle or error."""
    last_synced: datetime | None
    syncs: int
    """Syncs that succeeded."""
    backfilled: datetime | None
    error: str | None = None
    quarter_hour_rows: int = 0
    hourly_rows: int = 0

    @property
    def rows(self) -> int:
        return self.quarter_hour_rows + self.hourly_rows

    @property
    def quarter_hours(self) -> int:
        """The ads' quarter hours of metrics held, at either granularity: compaction rolls four into one hourly row."""
        return self.quarter_hour_rows + 4 * self.hourly_rows

    @property
    def last_was_backfill(self) -> bool:
        return self.last_synced is not None and self.backfilled == self.last_synced


@dataclass(frozen=True)
class QueueView:
    name: str = "arq:queue"
    ready: int | None = None
    running: int | None = None
    deferred: int | None = None


@dataclass
class ReplicaView:
    name: str
    role: Literal["operator", "worker"]
    state: ReplicaState
    pid: int | None
    jobs_done: int | None = None


@dataclass
class Failover:
    killed: str
    killed_at: float
    tick: datetime | None
    """The boundary the kill was timed to fall before, if it was."""
    new_leader: str | None = None
    took_over_at: float | None = None

    @property
    def seconds(self) -> float | None:
        return self.took_over_at - self.killed_at if self.took_over_at is not None else None


@dataclass
class DemoState:
    """The whole picture at one moment; the display draws it, the summary reads it."""

    started: float = field(default_factory=time.time)
    title: str = "kubearq demo"
    api: str = ""
    lease_note: str = ""
    stage: str = "starting"
    replicas: list[ReplicaView] = field(default_factory=list)
    holder: str = ""
    scrape: ScrapeView | None = None
    pages_per_minute: float | None = None
    ticks: list[TickView] = field(default_factory=list)
    next_tick: datetime | None = None
    queue: QueueView = field(default_factory=QueueView)
    failover: Failover | None = None
    connections: list[ConnectionView] = field(default_factory=list)
    sync_ticks: dict[str, list[TickView]] = field(default_factory=dict)
    """The sync SyncSchedules' runs, by schedule name."""
    planned_kill: datetime | None = None
    timeline: list[tuple[float, str]] = field(default_factory=list)

    @property
    def elapsed(self) -> float:
        return time.time() - self.started


def parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def clock(moment: float | datetime) -> str:
    """Local wall-clock time, to the second, as people read a log."""
    stamp = moment if isinstance(moment, datetime) else datetime.fromtimestamp(moment, UTC)
    return stamp.astimezone().strftime("%H:%M:%S")
