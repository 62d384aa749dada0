"""The demo's story: start everything, scrape the local site under a rate limit while minute schedules tick (a
digest of the events, the sync of three ad-platform connections, compaction), SIGKILL the leading operator just
before a tick, watch the standby take the Lease and catch the tick up, then read the results back and stop
everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
from redis.asyncio import Redis

from kubearq.core.connections import create_redis
from kubearq.demo.adplatform import AdPlatform
from kubearq.demo.cluster import DemoCluster, connected_cluster
from kubearq.demo.display import View, connection_line, scrape_line, tick_enqueued_line, tick_outcome_line
from kubearq.demo.jobs import DIGEST_FUNCTION
from kubearq.demo.observe import LedgerEntry, LogFollower, counter_by_function, queue_view, read_ledger, scrape_metrics
from kubearq.demo.plan import (
    KILL_LEAD,
    SCRAPE_PAST_TICK,
    audit_sync,
    failover_tick,
    minute_boundaries,
    pages_per_minute,
    scrape_rate,
    ticks_due,
)
from kubearq.demo.processes import free_port
from kubearq.demo.resources import (
    COMPACTION_NAME,
    REALTIME_SYNC_NAME,
    SCHEDULE_NAME,
    SCRAPE_NAME,
    SYNC_SCHEDULE_NAMES,
    compaction_schedule,
    realtime_sync_schedule,
    scrape_request,
    sync_schedule,
)
from kubearq.demo.site import EventSite, SiteLayout
from kubearq.demo.stack import Stack
from kubearq.demo.state import (
    ConnectionView,
    DemoState,
    Failover,
    ReplicaView,
    ScrapeView,
    TickView,
    clock,
    parse_time,
)
from kubearq.demo.syncing import ADVERTISERS, SECRET_NAME, SyncTables, add_connections, write_tokens
from kubearq.operator.context import SCRAPE_REQUESTS, SYNC_SCHEDULES
from kubearq.operator.kube import LEASES, ApiError, KubeObject, is_transient
from kubearq.operator.scheduler import tick_job_id
from kubearq.operator.settings import OperatorSettings
from kubearq.worker.settings import WorkerSettings

POLL = 0.5
LEASE_NAME = "kubearq-operator"
LEASE_TIMINGS = {"LEASE_DURATION": "6", "LEASE_RENEW_DEADLINE": "4", "LEASE_RETRY_PERIOD": "1"}
LEASE_NOTE = ("Lease timings shortened for the demo: LEASE_DURATION=6 s, LEASE_RENEW_DEADLINE=4 s, "
              "LEASE_RETRY_PERIOD=1 s (defaults, as client-go: 15/10/2)")
OPERATORS = ("operator-a", "operator-b")
WORKERS = ("worker-1", "worker-2")
DATABASE = "kubearq"
API_PATIENCE = 15.0
"""Seconds of failing API reads (5xx, timeouts) the demo sits out before it gives up."""
SETTLED_AFTER = timedelta(seconds=3)
"""A tick older than this must have been enqueued and run before the demo may end."""
FINISHED = ("Succeeded", "Failed", "Aborted")
SYNC_POLL = 1.0
"""Seconds between reads of the sync tables."""


class DemoError(Exception):
    """Something did not work; the message says what, and where its log is."""


@dataclass(frozen=True)
class Profile:
    """Sizes and times of one way to run the demo."""

    layout: SiteLayout
    budget: float
    """Seconds from the start by which the failover's aftermath should be over (the demo then ends)."""
    timeout: float
    """Seconds after which the run fails: something is stuck."""
    earliest_kill: float
    """Seconds after the resources are created before the leader may be killed (replicas up, a leader elected)."""
    fallback_kill: float
    """When no minute boundary fits the budget: the kill, this long after the resources are created."""


FULL = Profile(SiteLayout(listing_pages=6, per_page=20), budget=95, timeout=170, earliest_kill=15, fallback_kill=25)
SHORT = Profile(SiteLayout(listing_pages=2, per_page=8), budget=40, timeout=90, earliest_kill=10, fallback_kill=10)


@dataclass(frozen=True)
class ScheduleRef:
    uid: str
    created: datetime


@dataclass
class Running:
    """Handles to what the demo started, for the summary and `--keep-running`."""

    cluster: DemoCluster
    site: EventSite
    ad_platform: AdPlatform
    sync_tables: SyncTables
    secrets_dir: Path
    """The workers' SYNC_SECRETS_DIR: the connections' tokens."""
    redis_url: str
    database_url: str
    schedule_uid: str = ""
    schedule_created: datetime = field(default_factory=lambda: datetime.now(UTC))
    sync_schedules: dict[str, ScheduleRef] = field(default_factory=dict)
    """The sync family's SyncSchedules, by name."""
    rate_limit: int = 0


class Demo:
    def __init__(self, view: View, *, short: bool, logs: Path | None = None) -> None:
        self.view = view
        self.profile = SHORT if short else FULL
        self.folder = logs or Path(tempfile.mkdtemp(prefix="kubearq-demo-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stack = Stack(self.folder)
        self.state = DemoState(title="kubearq demo" + (" (short)" if short else ""), lease_note=LEASE_NOTE)
        self.running: Running | None = None
        self.redis: Redis | None = None
        self.http = httpx.AsyncClient()
        self.followers: dict[str, LogFollower] = {}
        self.ledger: list[LedgerEntry] = []
        self.worker_metrics: dict[str, dict[str, list[tuple[dict[str, str], float]]]] = {}
        self._site_samples: list[tuple[float, int]] = []
        self._leader_since: float | None = None
        self._kill_at: float | None = None
        self._kill_tick: datetime | None = None
        self._replanned = False
        self._seen_ticks: dict[str, str] = {}
        self._told_twice = False
        self._api_failures = 0
        self.schedule_status: dict[str, Any] = {}
        """The SyncSchedule's status as last read."""
        self.sync_status: dict[str, dict[str, Any]] = {}
        """The sync SyncSchedules' status as last read, by name."""
        self._last_sync_poll = 0.0
        self._told_synced: dict[str, tuple[datetime | None, str | None]] = {}
        self._last_phase = ""
        self._last_worker_poll = 0.0
        self._serving: set[str] = set()
        """Operators whose /metrics answered on the last look (up, leading or standing by)."""
        self.finished_at: float | None = None
        self.stopping = False
        """Set once the demo is stopping what it started (a Ctrl-C then must not interrupt that)."""

    # The story.

    async def run(self, body: Callable[[Running], Awaitable[None]]) -> None:
        """Start everything, run `body` (the scenario, then maybe a wait), stop everything — whatever happens."""
        async with contextlib.AsyncExitStack() as stack:
            try:
                await self._start(stack)
                assert self.running is not None
                await body(self.running)
            finally:
                self.stopping = True

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        """Start each part, registering how to stop it: in reverse order, whatever fails."""
        stack.push_async_callback(self.stack.stop_servers)  # last: nothing needs them any more
        stack.push_async_callback(self.http.aclose)
        self.emit("starting Redis, PostgreSQL, the event website, the ad platform and the Kubernetes API")
        servers = asyncio.ensure_future(self.stack.start_servers())
        try:
            site = await stack.enter_async_context(EventSite(self.profile.layout))
            secrets_dir = Path(tempfile.mkdtemp(prefix="kubearq-demo-secrets-"))
            stack.callback(shutil.rmtree, secrets_dir, ignore_errors=True)
            tokens = write_tokens(secrets_dir, ADVERTISERS)
            accounts = {advertiser.name: advertiser.account(tokens[advertiser.name]) for advertiser in ADVERTISERS}
            platform = await stack.enter_async_context(AdPlatform(accounts))
            cluster = await stack.enter_async_context(connected_cluster(self.folder))
            redis_server, postgres = await servers
        except BaseException:
            with contextlib.suppress(BaseException):
                await servers  # started or failed: stop_servers() closes what was started
            raise
        database_url = await asyncio.to_thread(postgres.create_database, DATABASE)
        self.redis = create_redis(redis_server.url)
        stack.push_async_callback(self.redis.aclose)
        self.emit(f"Redis {redis_server.url}, PostgreSQL {postgres.dsn(DATABASE)}, event website {site.base_url}, "
                  f"ad platform {platform.base_url}")
        await add_connections(database_url, platform.base_url, ADVERTISERS)
        sync_tables = await stack.enter_async_context(SyncTables(database_url))
        first = ADVERTISERS[0]
        added = ", ".join(f"{a.name} ({a.time_zone}, {a.ads} ad{'s' if a.ads != 1 else ''})" for a in ADVERTISERS)
        self.emit(f"{len(ADVERTISERS)} connections added to the ad platform's accounts, as `kubearq connections add "
                  f"--provider http-json --name {first.name} --credentials {SECRET_NAME}/{first.name} --config "
                  f"'{{…}}'` does: {added}; their tokens in SYNC_SECRETS_DIR {secrets_dir}")
        self.running = Running(cluster, site, platform, sync_tables, secrets_dir, redis_server.url, database_url)
        self.state.api = cluster.description
        self.emit(f"Kubernetes API: {cluster.description}")
        stack.push_async_callback(self.stack.stop_processes)  # before the API goes: operators release the Lease
        await cluster.install_crds()
        await cluster.create_namespace()
        self.emit("CRDs applied (SyncSchedule, ScrapeRequest); namespace " + cluster.namespace)
        self._start_processes(self.running)
        stack.push_async_callback(self._clean_up_cluster)  # first: the leader removes the finalizer
        await self._create_resources(self.running)

    async def scenario(self, running: Running) -> None:
        """Watch until the scrape is done, the failover is over and every tick due has run."""
        self.state.stage = "running"
        deadline = self.state.started + self.profile.timeout
        while True:
            await self.observe(running)
            self.stack.check_alive()
            self._drive_failover()
            if self._done(running):
                break
            if time.time() > deadline:
                raise DemoError(f"not finished after {self.profile.timeout:.0f} s: {self._waiting_for(running)}")
            self.view.update(self.state)
            await asyncio.sleep(POLL)
        self.finished_at = time.time()
        self.state.stage = "done"
        self.view.update(self.state)

    async def keep_watching(self, running: Running) -> None:
        """After the summary (`--keep-running`): go on reporting ticks and leader changes until stopped."""
        while True:
            await self.observe(running)
            self.stack.check_alive()
            await asyncio.sleep(POLL * 2)

    # Start-up.

    def _start_processes(self, running: Running) -> None:
        inherited = {name: value for name, value in os.environ.items()
                     if name.lower() not in OperatorSettings.model_fields | WorkerSettings.model_fields}
        for name in OPERATORS:
            port = free_port()
            env = {**inherited, **LEASE_TIMINGS, "KUBECONFIG": str(running.cluster.kubeconfig),
                   "REDIS_URL": running.redis_url, "NAMESPACE": running.cluster.namespace,
                   "LEASE_NAMESPACE": running.cluster.namespace, "LEASE_NAME": LEASE_NAME, "POD_NAME": name,
                   "HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(port), "STATUS_INTERVAL": "1",
                   "QUEUE_STATS_INTERVAL": "1", "LOG_FORMAT": "text",
                   # One team's cluster: the demo's namespace may use the shared queue without a QueuePolicy.
                   "TENANCY": "open"}
            self.stack.start(self.stack.add(name, "operator", [], env, port))
            self.followers[name] = LogFollower(self.stack.log(name))
        for name in WORKERS:
            port = free_port()
            env = {**inherited, "REDIS_URL": running.redis_url, "DATABASE_URL": running.database_url,
                   "POD_NAME": name, "HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(port),
                   "SETTINGS": "kubearq.demo.jobs:WorkerSettings", "SHUTDOWN_GRACE": "5", "LOG_FORMAT": "text",
                   "SYNC_SECRETS_DIR": str(running.secrets_dir)}
            self.stack.start(self.stack.add(name, "worker", [], env, port))
        self.state.replicas = [ReplicaView(p.name, p.role, "starting", p.pid) for p in self.stack.processes.values()]
        self.emit(f"started {len(OPERATORS)} operator replicas and {len(WORKERS)} workers "
                  "(`kubearq operator`, `kubearq worker` processes)")

    async def _create_resources(self, running: Running) -> None:
        cluster = running.cluster
        schedule = await cluster.create(SYNC_SCHEDULES, sync_schedule(cluster.namespace))
        running.schedule_uid = str(schedule["metadata"]["uid"])
        created = parse_time(schedule["metadata"].get("creationTimestamp")) or datetime.now(UTC)
        running.schedule_created = created
        self.emit(f"SyncSchedule {SCHEDULE_NAME}: `* * * * *` enqueues {DIGEST_FUNCTION}, startingDeadlineSeconds 30")
        for body in (realtime_sync_schedule(), compaction_schedule()):
            made = await cluster.create(SYNC_SCHEDULES, body)
            running.sync_schedules[str(made["metadata"]["name"])] = ScheduleRef(
                str(made["metadata"]["uid"]),
                parse_time(made["metadata"].get("creationTimestamp")) or datetime.now(UTC))
        self.emit(f"SyncSchedules {REALTIME_SYNC_NAME} and {COMPACTION_NAME}: `* * * * *` enqueue sync_connections "
                  "realtime (a new connection gets its 90-day backfill first) and compact_snapshots (15-minute rows "
                  "older than a day into hourly ones)")
        self._plan(created + timedelta(seconds=self.profile.earliest_kill),
                   created + timedelta(seconds=self.profile.fallback_kill))
        pages = self.profile.layout.listing_pages + self.profile.layout.events
        scrape_until = (self._kill_tick + SCRAPE_PAST_TICK) if self._kill_tick else created + timedelta(
            seconds=self.profile.fallback_kill + 12)
        running.rate_limit = scrape_rate(pages, (scrape_until - created).total_seconds() - 4)
        await cluster.create(SCRAPE_REQUESTS, scrape_request(running.site.listing_urls, running.rate_limit))
        self.emit(f"ScrapeRequest {SCRAPE_NAME}: {len(running.site.listing_urls)} listing pages of the local site, "
                  f"rate limit {running.rate_limit}/min shared by both workers (sized so that the scrape spans the "
                  "failover)")

    def _plan(self, earliest_kill: datetime, fallback: datetime) -> None:
        """When to kill the leader: just before the latest minute boundary that fits the budget, else at
        `fallback` (mid-scrape)."""
        start = datetime.fromtimestamp(self.state.started, UTC)
        tick = failover_tick(earliest_kill, start + timedelta(seconds=self.profile.budget))
        self._kill_tick = tick
        kill = (tick - KILL_LEAD) if tick else max(earliest_kill, fallback)
        self._kill_at = kill.timestamp()
        self.state.planned_kill = kill
        if tick:
            self.emit(f"plan: SIGKILL the leader at {clock(kill)}, {KILL_LEAD.seconds} s before the {clock(tick)} "
                      "tick, so that it falls while no replica leads")
        else:
            self.emit(f"plan: SIGKILL the leader at {clock(kill)}, mid-scrape (no minute boundary fits this run)")

    # Watching.

    async def observe(self, running: Running) -> None:
        """Read everything once and update the state, telling what changed."""
        cluster = running.cluster
        try:
            scrape, schedule, lease, *synced = await asyncio.gather(
                cluster.get(SCRAPE_REQUESTS, SCRAPE_NAME), cluster.get(SYNC_SCHEDULES, SCHEDULE_NAME),
                cluster.get(LEASES, LEASE_NAME), *(cluster.get(SYNC_SCHEDULES, name) for name in SYNC_SCHEDULE_NAMES))
        except (ApiError, httpx.TransportError, TimeoutError) as error:
            if not is_transient(error):
                raise
            self._api_failures += 1  # a real cluster's hiccup: look again, unless it lasts
            if self._api_failures * POLL > API_PATIENCE:
                raise DemoError(f"the Kubernetes API ({cluster.server}) failed for {API_PATIENCE:.0f} s: "
                                f"{type(error).__name__}: {error}") from error
            return
        self._api_failures = 0
        for follower in self.followers.values():
            follower.read()
        assert self.redis is not None
        self.ledger = await read_ledger(self.redis)
        await self._observe_metrics()
        self._observe_lease(lease)
        if scrape is not None:
            self._observe_scrape(ScrapeView.of(scrape, running.rate_limit))
        if schedule is not None:
            self._observe_schedule(schedule)
        for name, sync in zip(SYNC_SCHEDULE_NAMES, synced, strict=True):
            if sync is not None:
                self._observe_sync_schedule(name, sync)
        if time.time() - self._last_sync_poll >= SYNC_POLL:
            self._last_sync_poll = time.time()
            self._observe_connections(await running.sync_tables.connections())
        served = sum(count for kind, count in running.site.requests.items() if kind != "robots")
        now = time.time()
        self._site_samples = [*self._site_samples[-100:], (now, served)]
        self.state.pages_per_minute = pages_per_minute(self._site_samples)

    def _observe_lease(self, lease: KubeObject | None) -> None:
        spec = (lease or {}).get("spec") or {}
        holder = str(spec.get("holderIdentity") or "")
        if holder != self.state.holder:
            if holder in OPERATORS:
                failover = self.state.failover
                if failover is not None and failover.new_leader is None and holder != failover.killed:
                    acquired = parse_time(spec.get("acquireTime"))
                    failover.new_leader = holder
                    failover.took_over_at = acquired.timestamp() if acquired else time.time()
                    self.emit(f"{holder} took the Lease {failover.seconds:.1f} s after {failover.killed} was killed "
                              "(a standby waits LEASE_DURATION after the last renewal it saw)")
                    self._restart(failover.killed)
                else:
                    self.emit(f"{holder} took the Lease: it leads (enqueues, writes status); the other stays hot")
                if self._leader_since is None:
                    self._leader_since = time.time()
            elif not holder:
                self.emit("the Lease is free")
            self.state.holder = holder
        for replica in self.state.replicas:
            process = self.stack.processes[replica.name]
            replica.pid = process.pid
            if process.killed:
                replica.state = "killed"
            elif not process.running:
                replica.state = "stopped"
            elif replica.role == "operator":
                replica.state = "leader" if holder == replica.name else (
                    "standby" if replica.name in self._serving else "starting")
            else:
                replica.state = "standby" if replica.name in self.worker_metrics else "starting"

    async def _observe_metrics(self) -> None:
        operators = [p for p in self.stack.of_role("operator") if p.running]
        answers = await asyncio.gather(*(scrape_metrics(self.http, p.metrics_url) for p in operators))
        self._serving = {process.name for process, samples in zip(operators, answers, strict=True) if samples}
        # The leader's figures, else a standby's: every replica refreshes the queue metrics.
        answered = sorted(zip(operators, answers, strict=True), key=lambda pair: pair[0].name != self.state.holder)
        for _, samples in answered:
            view = queue_view(samples, "arq:queue") if samples else None
            if view is not None and view.ready is not None:
                self.state.queue = view
                break
        if time.time() - self._last_worker_poll >= 2.0:
            self._last_worker_poll = time.time()
            for process in self.stack.of_role("worker"):
                if process.running and (samples := await scrape_metrics(self.http, process.metrics_url)) is not None:
                    self.worker_metrics[process.name] = samples
            for replica in self.state.replicas:
                if replica.name in self.worker_metrics:
                    done = counter_by_function(self.worker_metrics[replica.name],
                                               "kubearq_worker_jobs_succeeded_total")
                    replica.jobs_done = sum(done.values())

    def _observe_scrape(self, scrape: ScrapeView) -> None:
        self.state.scrape = scrape
        if scrape.phase != self._last_phase:
            self._last_phase = scrape.phase
            self.emit(scrape_line(scrape, self.state.pages_per_minute))

    def _runs(self, status: dict[str, Any]) -> list[TickView]:
        """A SyncSchedule's runs, from its status, with who enqueued each and (the digest's) where it ran."""
        enqueued_by = {job: name for name, follower in self.followers.items() for job in follower.enqueued}
        ran = {entry.job_id: entry for entry in self.ledger}
        ticks = []
        for run in status.get("runs") or []:
            job = str(run.get("jobId"))
            scheduled = parse_time(run.get("scheduledTime"))
            if scheduled is None:
                continue
            entry = ran.get(job)
            ticks.append(TickView(job, scheduled, parse_time(run.get("enqueuedTime")), str(run.get("outcome")),
                                  enqueued_by.get(job), entry.worker if entry else None,
                                  entry.events if entry else None))
        ticks.sort(key=lambda tick: tick.scheduled)
        return ticks

    def _observe_schedule(self, schedule: KubeObject) -> None:
        status = cast(dict[str, Any], schedule.get("status") or {})
        self.schedule_status = status
        self.state.next_tick = parse_time(status.get("nextScheduleTime"))
        ticks = self._runs(status)
        self.state.ticks = ticks
        for tick in ticks:
            told = self._seen_ticks.get(tick.job_id)
            if told is None:
                self.emit(tick_enqueued_line(tick))
            if told != tick.outcome:
                self._seen_ticks[tick.job_id] = tick.outcome
                if tick.outcome in ("Succeeded", "Failed", "Aborted"):
                    self.emit(tick_outcome_line(tick))
        if len({tick.job_id for tick in ticks}) != len(ticks) and not self._told_twice:
            self._told_twice = True  # a doubled tick: the audit at the end fails the demo, this says when
            self.emit(f"SyncSchedule {SCHEDULE_NAME}'s status lists a run twice: {[t.job_id for t in ticks]}")

    def _observe_sync_schedule(self, name: str, schedule: KubeObject) -> None:
        status = cast(dict[str, Any], schedule.get("status") or {})
        self.sync_status[name] = status
        runs = self._runs(status)
        self.state.sync_ticks[name] = runs
        for tick in runs:
            told = self._seen_ticks.get(tick.job_id)
            if told is None:
                self.emit(f"{name}: {tick_enqueued_line(tick)}")
            if told != tick.outcome:
                self._seen_ticks[tick.job_id] = tick.outcome
                if tick.outcome in ("Failed", "Aborted"):  # a success shows in the connections
                    self.emit(f"{name}: {tick_outcome_line(tick)}")

    def _observe_connections(self, connections: list[ConnectionView]) -> None:
        self.state.connections = connections
        for connection in connections:
            now = (connection.last_synced, connection.error)
            if self._told_synced.get(connection.name, (None, None)) != now:
                self._told_synced[connection.name] = now
                self.emit(connection_line(connection))

    # The failover.

    def _drive_failover(self) -> None:
        if self.state.failover is not None or self._kill_at is None:
            return
        leader = self.stack.processes.get(self.state.holder)
        if leader is None or not leader.running or self._leader_since is None:
            return
        if not self._replanned and self._leader_since > self._kill_at - 2:
            # Elected too late for the plan: take the next boundary that still fits, if any.
            self._replanned = True
            elected = datetime.fromtimestamp(self._leader_since, UTC)
            self._plan(elected + timedelta(seconds=3), elected + timedelta(seconds=3))
        if time.time() < self._kill_at:
            return
        leader.kill()
        self.state.failover = Failover(leader.name, time.time(), self._kill_tick)
        self.state.stage = "failover"
        when = (f"{(self._kill_tick - datetime.now(UTC)).total_seconds():.1f} s before the {clock(self._kill_tick)} "
                "tick") if self._kill_tick else "mid-scrape"
        self.emit(f"SIGKILL {leader.name} (the leader, pid {leader.pid}), {when}: the Lease stays taken until it "
                  "expires")

    def _restart(self, name: str) -> None:
        """Start the killed replica again, as Kubernetes restarts a pod: it rejoins as a standby."""
        process = self.stack.processes[name]
        self.stack.start(process)
        self.emit(f"{name} restarted (as Kubernetes would restart its pod): it rejoins as a standby")

    def _done(self, running: Running) -> bool:
        return not self._waiting_for(running)

    def _waiting_for(self, running: Running) -> str:
        failover = self.state.failover
        if failover is None:
            return "the leader's SIGKILL"
        if failover.new_leader is None:
            return "the standby to take the Lease"
        scrape = self.state.scrape
        if scrape is None or not scrape.finished:
            where = f" (phase {scrape.phase}{'; ' + scrape.condition if scrape.condition else ''})" if scrape else ""
            return f"the ScrapeRequest {SCRAPE_NAME} to finish{where}"
        unsettled = [tick for tick in self.due_ticks(running, settled=True)
                     if tick_job_id(running.schedule_uid, tick) not in self._succeeded()]
        if unsettled:
            return "the tick(s) of " + ", ".join(clock(tick) for tick in unsettled) + " to be enqueued and run"
        return self._sync_waiting_for(running)

    def _sync_waiting_for(self, running: Running) -> str:
        now = datetime.now(UTC)
        for name in running.sync_schedules:
            runs = {tick.scheduled: tick for tick in self.state.sync_ticks.get(name, [])}
            unfinished = [tick for tick in self.sync_ticks_due(running, name, now)
                          if tick not in runs or runs[tick].outcome not in FINISHED]
            if unfinished:
                return (f"the tick(s) of {', '.join(clock(tick) for tick in unfinished)} of SyncSchedule {name} to be "
                        "enqueued and run")
        if len(self.state.connections) < len(ADVERTISERS):
            return "the connections to be read from PostgreSQL"
        first = next(iter(self.sync_ticks_due(running, REALTIME_SYNC_NAME, now)), None)
        # A connection whose sync failed for good is not waited for: the summary says so.
        audit = audit_sync(first, {c.name: c.last_synced for c in self.state.connections if c.status != "error"})
        if audit.unsynced and first is not None:
            return f"the connection(s) {', '.join(audit.unsynced)} to be synced after the {clock(first)} tick"
        return ""

    def sync_ticks_due(self, running: Running, name: str, now: datetime) -> list[datetime]:
        """The ticks of a sync SyncSchedule that count as due at `now`: settled, or already in its status."""
        schedule = running.sync_schedules.get(name)
        if schedule is None:
            return []
        listed = [tick.scheduled for tick in self.state.sync_ticks.get(name, [])]
        return ticks_due(schedule.created, now, listed, settled=SETTLED_AFTER)

    def due_ticks(self, running: Running, *, settled: bool) -> list[datetime]:
        until = datetime.now(UTC) - (SETTLED_AFTER if settled else timedelta(0))
        return minute_boundaries(running.schedule_created, until)

    def _succeeded(self) -> set[str]:
        ran = {entry.job_id for entry in self.ledger}
        return {tick.job_id for tick in self.state.ticks if tick.outcome == "Succeeded" and tick.job_id in ran}

    # Stopping.

    async def _clean_up_cluster(self) -> None:
        if self.running is not None and not self.running.cluster.emulated:
            with contextlib.suppress(ApiError, TimeoutError, OSError):
                await self.running.cluster.clean_up([("ScrapeRequest", SCRAPE_NAME), ("SyncSchedule", SCHEDULE_NAME),
                                                     *(("SyncSchedule", name) for name in SYNC_SCHEDULE_NAMES)])

    def emit(self, text: str) -> None:
        moment = time.time()
        self.state.timeline.append((moment, text))
        self.view.event(self.state, moment, text)


__all__ = ["FULL", "SHORT", "Demo", "DemoError", "Running", "ScheduleRef"]
