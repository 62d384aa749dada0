"""`kubearq operator`: kopf watches, one elected leader reconciles, every replica serves probes and metrics.

kopf's change handlers, timers and daemons keep per-object state in annotations and add finalizers from
every replica, and kopf's peering pauses standbys for 60 s; so kopf is used here only for what is
stateless and the same in every replica: login, and `on.event` spies on the few QueuePolicies and
Namespaces. The SyncSchedules and ScrapeRequests, of which there are many, come into the in-memory store
(warm in standbys) through a lean informer of our own (store.follow): kopf handles every event in a
per-object worker with state of its own, a cost that grows with the objects (bench/scheduler_lag.py).
The leader — elected on a Lease, see leader.py — reconciles every object on gaining the Lease, then on
every change and at each object's next due time, from one heap.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

import kopf

from kubearq.core.aio import stop_task, wait_or_timeout
from kubearq.core.connections import create_redis
from kubearq.core.observability import ProbeServer
from kubearq.operator.access import WatchAccess
from kubearq.operator.console.server import Console, ConsoleConfig, start_console
from kubearq.operator.context import API_TIMEOUT, QUEUE_POLICIES, OperatorContext, utc_now
from kubearq.operator.heldsteps import HeldSubmits, StepSink
from kubearq.operator.kube import ApiError, KubeApi, KubeObject, Resource
from kubearq.operator.leader import LeaderElectionConfig, LeaderElector, NotLeaderError
from kubearq.operator.metrics import OperatorMetrics, QueueStatsRefresher
from kubearq.operator.resources import GROUP, VERSION
from kubearq.operator.scheduler import FireHeap
from kubearq.operator.schedules import ArmedTick, ScheduleStep, advance_schedule, fire_armed, reconcile_schedule
from kubearq.operator.scrapes import scrape_request_reconciler
from kubearq.operator.settings import OperatorSettings
from kubearq.operator.store import PLURALS, TENANCY_RESOURCES, Key, ResourceStore, follow, passing
from kubearq.operator.tenancy import TenancyMode, TenancyState, policy_status
from kubearq.operator.writer import StatusWriter

logger = logging.getLogger(__name__)

Reconciler = Callable[[OperatorContext, KubeObject], Awaitable[datetime | None]]
"""Reconciles one object; returns when to look at it again (None: only when it changes)."""
LONGEST_SLEEP = timedelta(seconds=1)
CONCURRENCY = 64  # objects reconciled at once: Redis and the API server take the rest as a pipeline
T = TypeVar("T")  # the loop re-reads the clock at least this often (clock jumps, tests)


PASS_CHUNK = 250
"""Objects reconciled per turn of the leader's loop; the rest wait for the next turn, after the ticks due by
then have fired. One gather over 100,000 schedules held the loop for tens of seconds: ticks armed for that
minute waited behind it, and so did the Lease renewals (renew deadline missed, leadership lost) and the
watch. With 2,000 a turn the Lease was still lost at 100,000 (each step of its HTTP request waits a turn)."""
LISTED_WAIT = timedelta(seconds=30)
"""How long a new leader waits for the start-up listing before its first pass (it goes on without it)."""


def default_reconcilers() -> dict[str, Reconciler]:
    return {"SyncSchedule": reconcile_schedule, "ScrapeRequest": scrape_request_reconciler()}


async def lead(ctx: OperatorContext, store: ResourceStore, reconcilers: Mapping[str, Reconciler]) -> None:
    """The leader's loop: reconcile everything once, then what changed and what is due."""
    heap: FireHeap[Key] = FireHeap()
    armed: dict[Key, ArmedTick] = {}
    # The first pass over a half-listed store would leave the rest to come in one by one.
    await wait_or_timeout(store.listed, LISTED_WAIT.total_seconds())
    writer: StatusWriter[Key] = StatusWriter(ctx, on_written=lambda key, body: store.observe(key[0], "MODIFIED", body))
    writer.start()
    held = HeldSubmits(writer)
    store.dirty.update(store.objects)
    logger.info("leading: reconciling %d objects", len(store.objects))
    backlog: set[Key] = set()  # changed or due, not reconciled yet: PASS_CHUNK at a time
    fired: dict[Key, tuple[str, datetime]] = {}  # ticks fire_armed handled, for their schedules' passes
    try:
        while True:
            now = ctx.now()
            due = heap.pop_due(now)
            backlog |= store.dirty
            store.dirty.clear()
            store.changed.clear()
            # Ticks first: the jobs of every schedule due now were built on its last pass; enqueue them all
            # before any schedule's pass (reading outcomes, planning, status) begins.
            firing = [(key, armed.pop(key)) for key in due if key in armed and key not in backlog
                      and armed[key].due(now) and _unchanged(armed[key], store.objects.get(key))]
            if firing:
                handled = await fire_armed(ctx, [tick for _, tick in firing])
                fired.update((key, (tick.job.job_id, handled[tick.job.job_id]))
                             for key, tick in firing if tick.job.job_id in handled)
            backlog.update(due)
            keys = set(itertools.islice(backlog, PASS_CHUNK)) if len(backlog) > PASS_CHUNK else set(backlog)
            backlog -= keys
            present = [key for key in sorted(keys) if key in store.objects]
            for key in keys.difference(present):
                heap.remove(key)
                armed.pop(key, None)
                fired.pop(key, None)
            handled_now = dict(fired.pop(key) for key in present if key in fired)
            wakes = await reconcile_all(ctx, [(key, store.objects[key]) for key in present], reconcilers, held,
                                        handled_now, armed)
            for key, wake in zip(present, wakes, strict=True):
                if wake is None:
                    heap.remove(key)
                else:
                    heap.schedule(key, wake)
            await report_policies(ctx, store)
            if store.dirty or backlog:
                held.release_if_overdue()
                continue
            held.release()
            next_time = heap.next_time()
            delay = min(LONGEST_SLEEP, (next_time - ctx.now()) if next_time else LONGEST_SLEEP)
            await wait_or_timeout(store.changed, max(0.0, delay.total_seconds()))
    finally:
        await writer.stop()


async def report_policies(ctx: OperatorContext, store: ResourceStore) -> None:
    """Write `Ready` on the QueuePolicies that changed: applied, or ignored and why. A failed write is tried
    again on a later pass (the decisions never wait for it)."""
    if store.tenancy is None:
        return
    for name in sorted(store.policies_to_report):
        store.policies_to_report.discard(name)
        body = store.policies.get(name)
        status = None if body is None else policy_status(body, store.tenancy.problems.get(name), ctx.now())
        if status is None:
            continue
        try:
            written = await ctx.api.patch_status(QUEUE_POLICIES, name, status, timeout=API_TIMEOUT)
        except ApiError as error:
            if error.code != 404:  # 404: deleted meanwhile
                logger.warning("writing the status of QueuePolicy %s failed: %s; trying again later", name, error)
                store.policies_to_report.add(name)
            continue
        except Exception as error:
            if not passing(error):
                raise
            logger.warning("writing the status of QueuePolicy %s failed: %s; trying again later", name, error)
            store.policies_to_report.add(name)
            continue
        store.observe("QueuePolicy", "MODIFIED", {"apiVersion": QUEUE_POLICIES.api_version, "kind": "QueuePolicy",
                                                  **written})


def _unchanged(armed: ArmedTick, body: KubeObject | None) -> bool:
    metadata = (body or {}).get("metadata", {})
    return metadata.get("uid") == armed.uid and int(metadata.get("generation", 1)) == armed.generation


async def reconcile_all(ctx: OperatorContext, due: Sequence[tuple[Key, KubeObject]],
                        reconcilers: Mapping[str, Reconciler], writer: StepSink | None = None,
                        fired: Mapping[str, datetime] | None = None,
                        armed: dict[Key, ArmedTick] | None = None) -> list[datetime | None]:
    """Reconcile many objects; SyncSchedules in two phases: all enqueues at once (Redis calls only, coalesced
    per queue), then the status writes and Events, handed to `writer` (or, without one, written here
    CONCURRENCY at a time); so the tick lag of the last of many schedules due together is not the sum
    of the API calls before it, nor of those still being written from the last minute. `fired`: ticks
    enqueued just before (see `fire_armed`); `armed` receives each schedule's next tick, ready to fire."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def bounded(coroutine: Awaitable[T]) -> T:
        async with gate:
            return await coroutine

    steps: dict[Key, ScheduleStep] = {}
    if reconcilers.get("SyncSchedule") is reconcile_schedule:
        schedules = [(key, body) for key, body in due if key[0] == "SyncSchedule"]
        advanced = await asyncio.gather(*(
            guarded(ctx, key, advance_schedule(ctx, body, writer.pending_status(key) if writer else None, fired))
            for key, body in schedules))
        steps = {key: step for (key, _), step in zip(schedules, advanced, strict=True) if step is not None}
        if armed is not None:
            for key, _ in schedules:
                step = steps.get(key)
                if step is not None and step.armed is not None:
                    armed[key] = step.armed
                else:
                    armed.pop(key, None)
        if writer is not None:
            for key, step in steps.items():
                writer.submit(key, step)
        else:
            await asyncio.gather(*(bounded(guarded(ctx, key, step.write(ctx))) for key, step in steps.items()))

    async def one(key: Key, body: KubeObject) -> datetime | None:
        if key in steps:
            return steps[key].wake_at
        if key[0] == "SyncSchedule" and reconcilers.get("SyncSchedule") is reconcile_schedule:
            return ctx.now() + timedelta(seconds=ctx.settings.status_interval)  # its advance failed: retry
        return await reconcile_one(ctx, key, body, reconcilers)

    return list(await asyncio.gather(*(bounded(one(key, body)) for key, body in due)))


async def guarded(ctx: OperatorContext, key: Key, coroutine: Awaitable[T]) -> T | None:
    """Run one object's step; an error we did not foresee is logged and counted, never fatal to the rest."""
    kind, namespace, name = key
    try:
        return await coroutine
    except NotLeaderError:
        raise
    except Exception as error:
        ctx.metrics.count_error(f"reconcile_{kind}")
        if passing(error):
            logger.warning("reconciling %s %s/%s failed: %s; retrying", kind, namespace, name, error)
        else:
            logger.exception("reconciling %s %s/%s failed; retrying", kind, namespace, name)
        return None


async def reconcile_one(ctx: OperatorContext, key: Key, body: KubeObject,
                        reconcilers: Mapping[str, Reconciler]) -> datetime | None:
    """One object; an error we did not foresee is logged, counted and retried later, never fatal."""
    kind, namespace, name = key
    reconcile = reconcilers.get(kind)
    if reconcile is None:
        return None
    try:
        return await reconcile(ctx, body)
    except NotLeaderError:
        raise  # leadership is gone: the elector cancels this loop
    except Exception as error:
        ctx.metrics.count_error(f"reconcile_{kind}")
        if passing(error):
            logger.warning("reconciling %s %s/%s failed: %s; retrying", kind, namespace, name, error)
        else:
            logger.exception("reconciling %s %s/%s failed; retrying", kind, namespace, name)
    return ctx.now() + timedelta(seconds=ctx.settings.status_interval)


def build_registry(store: ResourceStore, connection: kopf.ConnectionInfo) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    def spy_on(kind: str) -> Callable[..., Awaitable[None]]:
        async def spy(*, event: kopf.RawEvent, **_: Any) -> None:  # async: kopf runs sync handlers in threads
            store.observe(kind, event.get("type"), cast(KubeObject, event.get("object") or {}))

        return spy

    # The SyncSchedules and ScrapeRequests are the informer's (store.follow), not kopf's.
    if store.tenancy is not None:
        for kind, resource in TENANCY_RESOURCES.items():
            kopf.on.event(resource.group, resource.version, resource.plural, registry=registry)(spy_on(kind))

    @kopf.on.login(registry=registry)
    def login(**_: object) -> kopf.ConnectionInfo:
        return connection

    return registry


def kopf_settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    # A stalled watch stream otherwise goes silent (style.md): the server ends each stream, the client
    # gives up a little later and kopf resumes the watch.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 60
    settings.posting.level = logging.WARNING  # Kubernetes Events from kopf itself: warnings and errors only
    # kopf would list and watch every CRD and, watching named namespaces, the namespaces themselves: cluster-wide
    # reads the operator needs for nothing (its RBAC grants neither, so each was a 403 retried as an ERROR).
    # Disabled, it finds the two resources once by discovery and takes the namespaces as given.
    settings.scanning.disabled = True
    return settings


class KopfStoppedError(RuntimeError):
    """kopf stopped watching on its own: the replica stops too, so that Kubernetes restarts it."""


@dataclass
class KopfWatch:
    """kopf watching both resources into the store; if it stops before the replica does, it sets `stop`."""

    task: asyncio.Task[None]
    flag: asyncio.Event
    ended_first: list[BaseException | None] = field(default_factory=list)
    """What kopf ended with (None: it just exited), when it ended before the replica's stop."""

    @classmethod
    def start(cls, store: ResourceStore, connection: kopf.ConnectionInfo, settings: OperatorSettings, *,
              ready: asyncio.Event, stop: asyncio.Event) -> KopfWatch:
        flag = asyncio.Event()
        task = asyncio.create_task(kopf.operator(
            registry=build_registry(store, connection), settings=kopf_settings(), standalone=True,
            clusterwide=not settings.watched_namespaces, namespaces=settings.watched_namespaces,
            stop_flag=flag, ready_flag=ready,
        ), name="kubearq-kopf")
        watch = cls(task, flag)

        def ended(task: asyncio.Task[None]) -> None:
            if stop.is_set():
                return
            error = None if task.cancelled() else task.exception()
            watch.ended_first.append(error)
            logger.error("kopf stopped watching (%s); stopping this replica", error or "it exited")
            stop.set()

        task.add_done_callback(ended)
        return watch

    async def stop(self) -> None:
        self.flag.set()
        await asyncio.wait({self.task}, timeout=30)
        if not self.task.done():  # cancelled here, its watch streams close before the loop does
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


async def run_operator(settings: OperatorSettings, connection: kopf.ConnectionInfo, *,
                       stop: asyncio.Event, ready: asyncio.Event | None = None,
                       now: Callable[[], datetime] = utc_now, identity: str | None = None,
                       reconcilers: Mapping[str, Reconciler] | None = None, handle_signals: bool = False) -> None:
    """Everything one operator replica does, until `stop` is set (or SIGTERM/SIGINT, with `handle_signals`).

    Raises KopfStoppedError if kopf stopped before `stop` was set: without its watch the store goes stale.
    """
    # kopf logs "Handler ... succeeded." at INFO for every watch event the spies see: a line per object per
    # status write. Its warnings and errors still come through.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    metrics = OperatorMetrics()
    mode = TenancyMode(settings.tenancy)
    tenancy = None if mode == TenancyMode.OPEN else TenancyState(mode, {}, {})
    store = ResourceStore(listed=asyncio.Event(), tenancy=tenancy)
    redis = create_redis(settings.redis_url, ca_file=str(settings.redis_ca_file) if settings.redis_ca_file else None,
                         tls_insecure=settings.redis_tls_insecure)
    api = KubeApi(connection, field_manager="kubearq-operator")
    listing = asyncio.create_task(follow(api, store, settings.watched_namespaces), name="kubearq-informer")

    def informer_ended(task: asyncio.Task[None]) -> None:
        if not stop.is_set() and not task.cancelled():  # it retries every failure: an end is a bug
            logger.error("the informer stopped watching (%s); stopping this replica", task.exception())
            stop.set()

    listing.add_done_callback(informer_ended)
    overrides = {"lease_namespace": settings.lease_namespace, "identity": identity}
    election = LeaderElectionConfig(lease_name=settings.lease_name, lease_duration=settings.lease_duration,
                                    renew_deadline=settings.lease_renew_deadline,
                                    retry_period=settings.lease_retry_period,
                                    **{key: value for key, value in overrides.items() if value})
    elector = LeaderElector(api, election, leader_gauge=metrics.leader,
                            lease_errors=metrics.errors.labels(operation="lease"))
    ctx = OperatorContext(api=api, redis=redis, metrics=metrics, settings=settings,
                          ensure_leader=elector.ensure_leader, now=now, tenancy=tenancy or TenancyState.open())
    refresher = QueueStatsRefresher(redis, metrics, queues=lambda: store.queues() | settings.extra_queues,
                                    interval_seconds=settings.queue_stats_interval)

    async def redis_answers() -> bool:
        return bool(await redis.ping())

    async def refresher_alive() -> bool:
        return refresher.alive

    watching_ready = ready if ready is not None else asyncio.Event()

    async def api_watched() -> bool:
        return watching_ready.is_set()  # kopf sets it once it has logged in and started watching

    access = WatchAccess(api, [Resource(GROUP, VERSION, plural) for plural in PLURALS.values()],
                         settings.watched_namespaces)

    async def objects_listed() -> bool:
        return store.listed.is_set()  # a standby that takes over has them all at hand

    # Ready means connected to Redis and the API; leadership is not required (standbys are ready too).
    probes = ProbeServer(metrics.registry, ready_checks={"redis": redis_answers, "kubernetes-api": api_watched,
                                                             "objects-listed": objects_listed,
                                                             "kubernetes-access": access.allowed},
                         live_checks={"queue-metrics": refresher_alive})
    console: Console | None = None
    try:
        await probes.start(settings.http_host, settings.http_port)
        if settings.dashboard_enabled:
            console = await start_console(
                api, redis, lambda: store.objects,
                ConsoleConfig(queues=lambda: store.queues() | settings.extra_queues,
                              secure_cookie=settings.dashboard_secure_cookie),
                host=settings.dashboard_host, port=settings.dashboard_port,
                database_url=settings.dashboard_database_url, cache_seconds=settings.dashboard_auth_cache_seconds,
                observe=lambda kind, body: store.observe(kind, "MODIFIED", body),
                on_error=lambda operation: metrics.errors.labels(operation=operation).inc())
    except BaseException:  # e.g. HTTP_PORT or DASHBOARD_PORT taken: nothing else has started yet but the listing
        await probes.stop()
        listing.cancel()
        await asyncio.gather(listing, return_exceptions=True)
        await api.aclose()
        await redis.aclose()
        raise
    refresher.start()
    checking_access = asyncio.create_task(access.run(), name="kubearq-access")
    chosen = reconcilers if reconcilers is not None else default_reconcilers()
    electing = asyncio.create_task(elector.run(lambda: lead(ctx, store, chosen)), name="kubearq-election")
    watch = KopfWatch.start(store, connection, settings, ready=watching_ready, stop=stop)
    reclaiming: asyncio.Task[None] | None = None
    if handle_signals:
        catch_signals(stop)
        # kopf, in the main thread, takes SIGTERM and SIGINT for itself once started: it then stopped alone,
        # cancelling the leader's work, while this replica kept the Lease. Take them back once it is up.
        reclaiming = asyncio.create_task(_after(watching_ready, lambda: catch_signals(stop)),
                                         name="kubearq-signals")

    async def release_lease() -> None:
        if elector.is_leader:
            logger.info("stopping: releasing the Lease")
        else:
            logger.info("stopping (a standby; the Lease is held by %s)", elector.lease_holder or "nobody")
        await elector.release()
        await asyncio.wait({electing}, timeout=10)

    # Every step runs, in reverse order, whatever an earlier one raised (the first error is re-raised).
    async with contextlib.AsyncExitStack() as stopping:
        stopping.push_async_callback(redis.aclose)
        stopping.push_async_callback(api.aclose)
        stopping.push_async_callback(refresher.stop)
        stopping.push_async_callback(stop_task, checking_access, 5, "the LIST access check")
        stopping.push_async_callback(watch.stop)
        # Before kopf stops: kopf waits 5 s for every task begun after it started, and a kept-alive /metrics
        # connection (Prometheus keeps one) has its handler task waiting for the next request.
        stopping.push_async_callback(probes.stop)
        if console is not None:
            stopping.push_async_callback(console.stop)
        stopping.push_async_callback(stop_task, listing, 10, "the informer")
        stopping.push_async_callback(release_lease)
        if reclaiming is not None:
            stopping.push_async_callback(stop_task, reclaiming, 10, "the signal handlers' setup")
        await stop.wait()
    if watch.ended_first:
        raise KopfStoppedError(f"kopf stopped watching: {watch.ended_first[0] or 'it exited'}")


def catch_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set `stop` (the Lease is released, then everything stops)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def _after(event: asyncio.Event, then: Callable[[], None]) -> None:
    await event.wait()
    then()


def tune_gc() -> None:
    """Full collections of the cyclic GC walk every object the process holds (10,000 watched objects are
    millions): measured 0.3-0.4 s each, several per pass over 10,000 schedules, doubling the pass. Larger
    thresholds make them ~100x rarer; reference counting still frees everything without cycles at once."""
    gc.set_threshold(50_000, 20, 20)


def quiet_kopf_watch_finalization(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's exception handler: kopf leaves its watch generators suspended when it stops, and the
    loop's own shutdown then closes them with "an error occurred during closing of asynchronous generator
    infinite_watch" (RuntimeError: generator didn't stop after athrow()), an ERROR traceback on every clean
    exit. That one is logged at DEBUG; everything else goes to asyncio's default handler."""
    asyncgen = context.get("asyncgen")
    if getattr(asyncgen, "__qualname__", None) == "infinite_watch" and \
            getattr(getattr(asyncgen, "ag_code", None), "co_filename", "").endswith("kopf/_cogs/clients/watching.py"):
        logger.debug("kopf's watch stream closed at exit: %s", context.get("exception"))
        return
    loop.default_exception_handler(context)


def run(settings: OperatorSettings, connection: kopf.ConnectionInfo) -> None:
    """Process entry point: SIGTERM/SIGINT release the Lease and stop."""
    tune_gc()

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(quiet_kopf_watch_finalization)
        await run_operator(settings, connection, stop=asyncio.Event(), handle_signals=True)

    asyncio.run(main())
