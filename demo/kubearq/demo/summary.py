"""The demo's closing summary, read back from PostgreSQL, the resources' status, the workers' /metrics and the
tick ledger; and the checks that make the demo fail when what it shows is not what happened."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from kubearq.core.contract import COMPACT_SNAPSHOTS, SYNC_CONNECTION, SYNC_CONNECTIONS
from kubearq.demo.observe import counter_by_function, read_results, scrape_metrics
from kubearq.demo.plan import audit_sync, audit_ticks, ticks_due
from kubearq.demo.resources import REALTIME_SYNC_NAME, SCRAPE_NAME
from kubearq.demo.scenario import SETTLED_AFTER, Demo, Running
from kubearq.demo.state import ConnectionView, TickView, clock
from kubearq.demo.syncing import ADVERTISERS, backfilled_quarter_hours
from kubearq.operator.scheduler import tick_job_id

FAILURES_LISTED = 10
SYNC_FUNCTIONS = (SYNC_CONNECTIONS, SYNC_CONNECTION, COMPACT_SNAPSHOTS)


@dataclass
class Summary:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def summarize(demo: Demo, running: Running) -> Summary:
    summary = Summary()
    lines, problems = summary.lines, summary.problems
    namespace = running.cluster.namespace
    results = await read_results(running.database_url, namespace, SCRAPE_NAME)
    expected = running.site.extractable
    types = ", ".join(f"{name} {count}" for name, count in sorted(results.items_by_type.items(),
                                                                   key=lambda item: (-item[1], item[0])))
    lines.append(f"Items extracted: {results.items} events stored in PostgreSQL (table scrape_items), of "
                 f"{len(expected)} extractable: {types}")
    if results.items != len(expected):
        problems.append(f"PostgreSQL holds {results.items} events, the site has {len(expected)} to extract")

    scrape = demo.state.scrape
    if scrape is not None:
        took = ""
        if scrape.start_time and scrape.completion_time:
            took = f" in {(scrape.completion_time - scrape.start_time).total_seconds():.0f} s"
        lines.append(f"ScrapeRequest {namespace}/{scrape.name}: {scrape.phase}{took}, {scrape.pages.total} pages "
                     f"({scrape.listing.total} listing, {scrape.detail.total} detail), {scrape.pages.failed} failed, "
                     f"rate limit {scrape.rate_limit}/min shared by the workers")
        if scrape.phase == "Failed":
            problems.append(f"ScrapeRequest {scrape.name} Failed")
    lines.append(f"Failed URLs ({len(results.failures)}, table scrape_failures):")
    for url, kind, error, tries in results.failures[:FAILURES_LISTED]:
        lines.append(f"  {url} ({kind} page, {_plural(tries, 'try', 'tries')}): {error}")
    failed_urls = {url for url, *_ in results.failures}
    wanted = {running.site.url(running.site.missing), running.site.url(running.site.disallowed)}
    if failed_urls != wanted:
        problems.append(f"failed URLs {sorted(failed_urls)}, expected {sorted(wanted)} (the 404 and robots.txt)")

    succeeded, failed, retried, deferred = Counter[str](), Counter[str](), 0, 0
    for process in demo.stack.of_role("worker"):
        samples = await scrape_metrics(demo.http, process.metrics_url) if process.running else None
        samples = samples or demo.worker_metrics.get(process.name)
        if samples is None:
            continue
        succeeded += counter_by_function(samples, "kubearq_worker_jobs_succeeded_total")
        failed += counter_by_function(samples, "kubearq_worker_jobs_failed_total")
        retried += sum(counter_by_function(samples, "kubearq_worker_jobs_retried_total").values())
        deferred += sum(counter_by_function(samples, "kubearq_worker_jobs_deferred_total").values())
    by_function = ", ".join(f"{name} {count}" for name, count in succeeded.most_common() if count)
    lines.append(f"Jobs run: {sum(succeeded.values())} ({by_function}); {_plural(retried, 'try', 'tries')} retried "
                 f"after an error, {_plural(deferred, 'deferral')} by the rate limit (no try spent)")

    # What was due when the demo stopped watching: what it waited for, not what fell due since.
    finished = datetime.fromtimestamp(demo.finished_at or time.time(), UTC)
    ticks = demo.state.ticks
    due = ticks_due(running.schedule_created, finished, [tick.scheduled for tick in ticks], settled=SETTLED_AFTER)
    audit = audit_ticks([tick_job_id(running.schedule_uid, tick) for tick in due], [tick.job_id for tick in ticks],
                        [entry.job_id for entry in demo.ledger])
    fired = "; ".join(
        f"{clock(tick.scheduled)} by {tick.enqueued_by or '?'} ({tick.lateness:+.1f} s), ran on {tick.ran_on}"
        if tick.lateness is not None else f"{clock(tick.scheduled)} {tick.outcome}" for tick in ticks)
    refused = sum(len(follower.refused) for follower in demo.followers.values())
    lines.append(f"Ticks fired: {len(ticks)}{' — ' + fired if fired else ''}")
    status = demo.schedule_status
    lines.append(f"  {audit.verdict()}; {refused} duplicate enqueue(s) refused by ARQ; status: "
                 f"{status.get('missedTicks', 0)} missed, {status.get('skippedTicks', 0)} skipped")
    if not audit.exact:
        problems.append(audit.verdict())
    if int(status.get("missedTicks") or 0):
        problems.append(f"SyncSchedule status counts {status.get('missedTicks')} missed tick(s)")

    await _summarize_sync(summary, demo, running, finished, succeeded, failed)

    failover = demo.state.failover
    if failover is not None and failover.seconds is not None:
        gap = ""
        took_over = failover.took_over_at or failover.killed_at
        in_gap = [tick for tick in ticks if failover.killed_at < tick.scheduled.timestamp() < took_over]
        if in_gap:
            gap = (f"; the {', '.join(clock(tick.scheduled) for tick in in_gap)} tick fell in the leaderless gap and "
                   f"{failover.new_leader} enqueued it late, once")
        lines.append(f"Failover: {failover.killed} SIGKILLed at {clock(failover.killed_at)}; {failover.new_leader} "
                     f"took the Lease {failover.seconds:.1f} s later (LEASE_DURATION 6 s, shortened from 15){gap}")
    else:
        problems.append("no failover happened")
    wall = (demo.finished_at or time.time()) - demo.state.started
    lines.append(f"Wall time: {wall:.0f} s")
    lines.append(f"Logs: {demo.folder}")
    return summary


async def _summarize_sync(summary: Summary, demo: Demo, running: Running, finished: datetime,
                          succeeded: Counter[str], failed: Counter[str]) -> None:
    """The sync family's lines: its ticks, the connections, the metric rows, its jobs; and its checks."""
    lines = summary.lines
    connections = await running.sync_tables.connections()
    failures = [f"{count} {name} job(s) failed (kubearq_worker_jobs_failed_total)"
                for name, count in failed.items() if name in SYNC_FUNCTIONS and count]
    fired = []
    for name in running.sync_schedules:
        runs = demo.state.sync_ticks.get(name, [])
        due = demo.sync_ticks_due(running, name, finished)
        schedule = running.sync_schedules[name]
        runs_audit = audit_ticks([tick_job_id(schedule.uid, tick) for tick in due], [run.job_id for run in runs],
                                 [run.job_id for run in runs if run.outcome == "Succeeded"])
        if not runs_audit.exact:
            failures.append(f"SyncSchedule {name}: {runs_audit.verdict()}")
        failures += [f"SyncSchedule {name}'s {clock(run.scheduled)} run {run.outcome}" for run in runs
                     if run.outcome in ("Failed", "Aborted")]
        fired.append(f"{name} {', '.join(_run(run) for run in runs) if runs else 'none'}")
    advertisers = {advertiser.name: advertiser for advertiser in ADVERTISERS}
    for connection in connections:
        backfilled = backfilled_quarter_hours([advertisers[connection.name]])
        if connection.status == "error":
            failures.append(f"connection {connection.name}: {connection.error}")
        elif connection.backfilled is not None and connection.quarter_hours < backfilled:
            failures.append(f"connection {connection.name} holds {connection.quarter_hours} quarter hours of metrics; "
                            f"its backfill stored {backfilled}")
    first = next(iter(demo.sync_ticks_due(running, REALTIME_SYNC_NAME, finished)), None)
    audit = audit_sync(first, {c.name: c.last_synced for c in connections}, failures)

    lines.append(f"Sync ticks fired: {'; '.join(fired)}")
    synced = [c for c in connections if c.last_synced is not None]
    listed = ", ".join(_connection(c) for c in connections)
    lines.append(f"Connections synced: {len(synced)} of {len(connections)} (table connections, `kubearq connections "
                 f"list`): {listed}")
    quarter_hours = sum(c.quarter_hours for c in connections)
    ads = sum(advertiser.ads for advertiser in ADVERTISERS)
    lines.append(f"Metric rows stored: {sum(c.rows for c in connections)} in metric_snapshots "
                 f"({sum(c.quarter_hour_rows for c in connections)} of 15 minutes, "
                 f"{sum(c.hourly_rows for c in connections)} hourly): {quarter_hours} quarter hours of {ads} ads")
    jobs = ", ".join(f"{name} {succeeded[name]}" for name in SYNC_FUNCTIONS if succeeded[name])
    lines.append(f"Sync jobs run: {sum(succeeded[name] for name in SYNC_FUNCTIONS)}{' (' + jobs + ')' if jobs else ''}"
                 f", {sum(failed[name] for name in SYNC_FUNCTIONS)} failed")
    lines.append(f"  {audit.verdict()}")
    if not audit.ok:
        summary.problems.append(audit.verdict())


def _run(run: TickView) -> str:
    late = f" {run.lateness:+.1f} s" if run.lateness is not None else ""
    return f"{clock(run.scheduled)} by {run.enqueued_by or '?'}{late} {run.outcome}"


def _connection(connection: ConnectionView) -> str:
    state = f", {connection.status}" if connection.status != "idle" else ""
    if connection.last_synced is None:
        return f"{connection.name} (never synced{state})"
    what = "its backfill" if connection.last_was_backfill else "realtime"
    return (f"{connection.name} ({_plural(connection.syncs, 'sync')}, the last at {clock(connection.last_synced)}: "
            f"{what}{state})")


def _plural(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else many or one + 's'}"
