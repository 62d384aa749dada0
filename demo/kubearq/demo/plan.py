"""The demo's timeline and its verdicts, as pure functions: when to kill the leader, how fast to scrape, whether
every tick was enqueued and run exactly once, and whether every connection was synced.

Cron has minute granularity, so the failover is timed to a minute boundary: the leader is killed a few seconds
before it, the tick falls in the leaderless gap, and the standby, once it holds the Lease, enqueues it late
(within the schedule's startingDeadlineSeconds) — exactly once. The demo picks the latest boundary that
still fits its time budget, so that an earlier tick shows the first leader firing on time.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from kubearq.demo.state import clock

MINUTE = timedelta(minutes=1)
KILL_LEAD = timedelta(seconds=3)
"""The leader is SIGKILLed this long before the boundary: inside the gap a 6 s Lease leaves."""
SETTLE = timedelta(seconds=12)
"""From the boundary to the end of the demo: the takeover (about the Lease's 6 s), the late enqueue, the run
and its status."""
SCRAPE_PAST_TICK = timedelta(seconds=8)
"""The scrape is paced to end this long after the failover's tick: the new leader writes its last pages."""


def minute_boundaries(after: datetime, until: datetime) -> list[datetime]:
    """Whole minutes `t` with `after < t <= until`: the ticks of `* * * * *` in that span."""
    first = after.replace(second=0, microsecond=0) + MINUTE
    count = max(0, math.floor((until - first) / MINUTE) + 1)
    return [first + n * MINUTE for n in range(count)]


def ticks_due(created: datetime, now: datetime, seen: Iterable[datetime], *, settled: timedelta) -> list[datetime]:
    """The ticks of a `* * * * *` schedule created at `created` that count as due at `now`: those `settled` ago or
    more (they must have run), and the newer ones its status already lists."""
    listed = set(seen)
    return [tick for tick in minute_boundaries(created, now) if tick <= now - settled or tick in listed]


def failover_tick(earliest_kill: datetime, latest_end: datetime, *, lead: timedelta = KILL_LEAD,
                  settle: timedelta = SETTLE) -> datetime | None:
    """The latest minute boundary whose kill (`lead` before it) is no sooner than `earliest_kill` and whose
    aftermath (`settle` after it) ends by `latest_end`; None when no boundary fits."""
    fitting = [tick for tick in minute_boundaries(earliest_kill + lead - timedelta(microseconds=1), latest_end)
               if tick + settle <= latest_end]
    return fitting[-1] if fitting else None


def scrape_rate(pages: int, seconds: float, *, lowest: int = 30, highest: int = 600) -> int:
    """Requests per minute that fetch `pages` within about `seconds` (rounded up to tens), within [lowest, highest]."""
    wanted = pages * 60 / max(seconds, 1.0)
    return int(min(highest, max(lowest, math.ceil(wanted / 10) * 10)))


def pages_per_minute(samples: Sequence[tuple[float, int]], window: float = 10.0) -> float | None:
    """The rate of a growing count from `(time, count)` samples, over the last `window` seconds."""
    if len(samples) < 2:
        return None
    now, latest = samples[-1]
    older = [sample for sample in samples if sample[0] <= now - window] or [samples[0]]
    since, first = older[-1]
    return (latest - first) * 60 / (now - since) if now > since else None


@dataclass(frozen=True)
class TickAudit:
    """Every tick due, set against what was enqueued (the schedule's status) and what ran (the demo's ledger)."""

    expected: tuple[str, ...]
    enqueued: Mapping[str, int]
    ran: Mapping[str, int]
    lost: tuple[str, ...] = field(init=False)
    doubled: tuple[str, ...] = field(init=False)
    unexpected: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        want = set(self.expected)
        object.__setattr__(self, "lost", tuple(job for job in self.expected
                                                if self.enqueued.get(job, 0) == 0 or self.ran.get(job, 0) == 0))
        object.__setattr__(self, "doubled", tuple(sorted(
            job for job in {*self.enqueued, *self.ran} if self.enqueued.get(job, 0) > 1 or self.ran.get(job, 0) > 1)))
        object.__setattr__(self, "unexpected", tuple(sorted({*self.enqueued, *self.ran} - want)))

    @property
    def exact(self) -> bool:
        """Each tick due enqueued once and run once, and nothing else."""
        return not (self.lost or self.doubled or self.unexpected)

    def verdict(self) -> str:
        if self.exact and not self.expected:
            return "no tick fell due in this run (ticks come at minute boundaries)"
        if self.exact:
            return f"{len(self.expected)} tick(s) due, each enqueued once and run once: none doubled, none lost"
        parts = [f"{label}: {', '.join(jobs)}" for label, jobs in
                 (("lost", self.lost), ("doubled", self.doubled), ("unexpected", self.unexpected)) if jobs]
        return "ticks wrong — " + "; ".join(parts)


def audit_ticks(expected_ids: Iterable[str], enqueued_ids: Iterable[str], ran_ids: Iterable[str]) -> TickAudit:
    return TickAudit(tuple(expected_ids), Counter(enqueued_ids), Counter(ran_ids))


@dataclass(frozen=True)
class SyncAudit:
    """The connections (name: when last synced) set against the first tick of the realtime sync that fell due: each
    synced since, and no sync job failed (`failures` says which did, and how)."""

    first_tick: datetime | None
    last_synced: Mapping[str, datetime | None]
    failures: tuple[str, ...] = ()
    unsynced: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        first = self.first_tick
        object.__setattr__(self, "unsynced", () if first is None else tuple(
            name for name, synced in self.last_synced.items() if synced is None or synced < first))

    @property
    def ok(self) -> bool:
        return not (self.unsynced or self.failures)

    def verdict(self) -> str:
        if self.ok and self.first_tick is None:
            return "no tick of the sync fell due in this run (ticks come at minute boundaries): nothing synced yet"
        if self.ok and self.first_tick is not None:
            return (f"each of the {len(self.last_synced)} connections synced after the {clock(self.first_tick)} tick, "
                    "no sync job failed")
        parts = list(self.failures)
        if self.unsynced and self.first_tick is not None:
            parts.insert(0, f"not synced after the {clock(self.first_tick)} tick: {', '.join(self.unsynced)}")
        return "sync wrong — " + "; ".join(parts)


def audit_sync(first_tick: datetime | None, last_synced: Mapping[str, datetime | None],
               failures: Iterable[str] = ()) -> SyncAudit:
    return SyncAudit(first_tick, dict(last_synced), tuple(failures))
