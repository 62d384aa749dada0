"""The leader's loop: the store of watched objects, the status writer, and ticks that never wait for writes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from arq.connections import ArqRedis

from kubearq.core.contract import deserialize
from kubearq.core.queueing import NewJob
from kubearq.operator.context import SCRAPE_REQUESTS, SYNC_SCHEDULES, OperatorContext
from kubearq.operator.heldsteps import HOLD_SECONDS, HeldSubmits
from kubearq.operator.kube import ApiError, KubeApi, KubeObject, ObjectList, Resource
from kubearq.operator.main import lead
from kubearq.operator.metrics import OperatorMetrics
from kubearq.operator.scheduler import tick_job_id
from kubearq.operator.schedules import ArmedTick, ScheduleStep, advance_schedule, reconcile_schedule
from kubearq.operator.settings import OperatorSettings
from kubearq.operator.store import DELETED_KEPT, ResourceStore, list_into
from kubearq.operator.syncschedule import SyncScheduleStatus
from kubearq.operator.writer import StatusWriter
from tests.kubernetes import KubernetesUnderTest
from tests.polling import until
from tests.scheduling import Clock

T0 = datetime(2026, 11, 24, 10, 0, 30, tzinfo=UTC)
KEY = ("SyncSchedule", "default", "nightly")


def schedule(version: str, *, spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None,
             generation: int = 1, **metadata: Any) -> KubeObject:
    meta: dict[str, Any] = {"name": "nightly", "namespace": "default", "uid": "u-1", "resourceVersion": version,
                            "generation": generation, **metadata}
    return cast(KubeObject, {
        "apiVersion": "kubearq.dev/v1alpha1", "kind": "SyncSchedule", "metadata": meta,
        "spec": spec or {"schedule": "* * * * *", "job": {"function": "sync_connections"}}, "status": status or {}})


def test_a_new_object_and_a_spec_change_are_work() -> None:
    store = ResourceStore()
    store.observe("SyncSchedule", "ADDED", schedule("10"))
    assert store.dirty == {KEY}
    store.dirty.clear()
    store.observe("SyncSchedule", "MODIFIED", schedule("11", spec={"schedule": "0 * * * *", "job": {
        "function": "sync_connections"}}, generation=2))
    assert store.dirty == {KEY}
    store.dirty.clear()
    store.observe("SyncSchedule", "MODIFIED", schedule("12", generation=2, deletionTimestamp="2026-11-24T10:00:00Z"))
    assert store.dirty == {KEY}
    store.dirty.clear()
    store.observe("SyncSchedule", "DELETED", schedule("13"))
    assert store.dirty == {KEY}
    assert KEY not in store.objects


def test_a_status_change_alone_is_stored_but_is_not_work() -> None:
    store = ResourceStore()
    store.observe("SyncSchedule", "ADDED", schedule("10"))
    store.dirty.clear()
    store.changed.clear()
    store.observe("SyncSchedule", "MODIFIED", schedule("11", status={"activeCount": 1}))
    assert not store.dirty
    assert not store.changed.is_set()
    assert store.objects[KEY]["status"] == {"activeCount": 1}


def test_an_older_version_arriving_after_a_newer_one_is_ignored() -> None:
    """The leader stores a write's answer at once; the watch delivers earlier versions after it."""
    store = ResourceStore()
    store.observe("SyncSchedule", "MODIFIED", schedule("20", status={"activeCount": 2}))
    store.observe("SyncSchedule", "MODIFIED", schedule("19", status={"activeCount": 1}))
    store.observe("SyncSchedule", "MODIFIED", schedule("20", status={"activeCount": 2}))
    assert store.objects[KEY]["metadata"]["resourceVersion"] == "20"
    assert store.objects[KEY]["status"] == {"activeCount": 2}


def test_versions_that_are_not_numbers_are_taken_as_newer() -> None:
    store = ResourceStore()
    store.observe("SyncSchedule", "MODIFIED", schedule("20"))
    store.observe("SyncSchedule", "MODIFIED", schedule("abc", status={"activeCount": 1}))
    assert store.objects[KEY]["status"] == {"activeCount": 1}


def test_an_object_listed_before_its_deletion_and_seen_after_it_does_not_come_back() -> None:
    store = ResourceStore()
    store.observe("SyncSchedule", "ADDED", schedule("10"))
    store.observe("SyncSchedule", "DELETED", schedule("12"))  # on the watch
    store.observe("SyncSchedule", "ADDED", schedule("10"))  # from a list taken before the deletion
    assert KEY not in store.objects


def test_the_late_deletion_of_an_earlier_object_of_the_same_name_leaves_the_new_one() -> None:
    store = ResourceStore()
    store.observe("SyncSchedule", "ADDED", schedule("30", uid="u-2"))
    store.observe("SyncSchedule", "DELETED", schedule("12", uid="u-1"))
    assert store.objects[KEY]["metadata"]["uid"] == "u-2"


def test_deleted_uids_kept_are_bounded() -> None:
    store = ResourceStore()
    for number in range(DELETED_KEPT + 5):
        store.observe("SyncSchedule", "DELETED", schedule(str(number), uid=f"u-{number}"))
    assert len(store.deleted) == DELETED_KEPT
    assert "u-0" not in store.deleted
    assert f"u-{DELETED_KEPT + 4}" in store.deleted


class FailingListApi(KubeApi):
    """The emulator's API, whose first `failures` lists fail with `error`."""

    failures = 0
    error = ApiError(503, "ServiceUnavailable", "etcd is busy")

    async def list(self, resource: Resource, **options: Any) -> ObjectList:
        if self.failures:
            self.failures -= 1
            raise self.error
        return await super().list(resource, **options)


async def listed_through(k8s: KubernetesUnderTest, failures: int, error: ApiError | None = None) -> ResourceStore:
    """A store filled by `list_into` through an API whose first `failures` lists fail (with `error`)."""
    api = FailingListApi(k8s.connection)
    api.failures = failures
    if error is not None:
        api.error = error
    store = ResourceStore(listed=asyncio.Event())
    try:
        await list_into(api, store, [k8s.namespace], retry_seconds=0.01)
    finally:
        await api.aclose()
    return store


async def test_the_start_up_listing_puts_every_object_in_the_store_through_api_failures(
        k8s: KubernetesUnderTest, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("a", "b", "c"):
        await k8s.api.create(SYNC_SCHEDULES, {
            "apiVersion": "kubearq.dev/v1alpha1", "kind": "SyncSchedule", "metadata": {"name": name},
            "spec": {"schedule": "@daily", "job": {"function": "sync_connections"}}}, namespace=k8s.namespace,
            timeout=10)
    await k8s.api.create(SCRAPE_REQUESTS, {
        "apiVersion": "kubearq.dev/v1alpha1", "kind": "ScrapeRequest", "metadata": {"name": "events"},
        "spec": {"urls": ["https://example.com/"]}}, namespace=k8s.namespace, timeout=10)
    store = await listed_through(k8s, failures=2)
    assert store.listed.is_set()
    assert sorted(store.objects) == [("ScrapeRequest", k8s.namespace, "events"),
                                     *(("SyncSchedule", k8s.namespace, name) for name in ("a", "b", "c"))]
    assert store.dirty == set(store.objects)
    assert {(body["apiVersion"], body["kind"]) for body in store.objects.values()} == {
        ("kubearq.dev/v1alpha1", "ScrapeRequest"), ("kubearq.dev/v1alpha1", "SyncSchedule")}
    assert [record.levelname for record in caplog.records if "listing the resources failed" in record.getMessage()
            ] == ["WARNING", "WARNING"]


def test_namespace_setting_names_the_watched_namespaces_comma_separated() -> None:
    assert OperatorSettings(namespace=" team-a, team-b ,team-a,").watched_namespaces == ["team-a", "team-b"]
    assert OperatorSettings().watched_namespaces == []  # all of them


async def test_the_start_up_listing_takes_every_watched_namespace_and_no_other(k8s: KubernetesUnderTest) -> None:
    namespaces = Resource("", "v1", "namespaces")
    others = [f"{k8s.namespace}-{suffix}" for suffix in ("b", "c")]
    for namespace in others:
        await k8s.api.create(namespaces, {"metadata": {"name": namespace}}, timeout=10)
    try:
        for namespace in (k8s.namespace, *others):
            await k8s.api.create(SYNC_SCHEDULES, {
                "apiVersion": "kubearq.dev/v1alpha1", "kind": "SyncSchedule", "metadata": {"name": "daily"},
                "spec": {"schedule": "@daily", "job": {"function": "sync_connections"}}}, namespace=namespace,
                timeout=10)
        store = ResourceStore(listed=asyncio.Event())
        await list_into(k8s.api, store, [k8s.namespace, others[0]])
    finally:
        for namespace in others:
            await k8s.api.delete(namespaces, namespace, timeout=10)
    assert sorted(store.objects) == [("SyncSchedule", k8s.namespace, "daily"), ("SyncSchedule", others[0], "daily")]


async def test_a_listing_the_rbac_forbids_says_so_in_one_error_line_and_is_retried(
        k8s: KubernetesUnderTest, caplog: pytest.LogCaptureFixture) -> None:
    store = await listed_through(k8s, failures=1,
                                 error=ApiError(403, "Forbidden", 'cannot list resource "syncschedules"'))
    assert store.listed.is_set()
    [record] = [record for record in caplog.records if record.levelname == "ERROR"]
    assert record.getMessage() == ('listing the resources failed (403 Forbidden: cannot list resource '
                                   '"syncschedules"); trying again in 0.01 s')
    assert record.exc_info is None


async def test_a_new_leader_waits_for_the_start_up_listing_before_its_first_pass(
        k8s: KubernetesUnderTest, redis: ArqRedis, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kubearq.operator.main")
    ctx = context(k8s.api, redis, Clock(T0))
    store = ResourceStore(listed=asyncio.Event())
    async with leading(ctx, store):
        await asyncio.sleep(0.3)
        store.observe("SyncSchedule", "ADDED", await create(k8s))  # listed while the leader waits
        store.listed.set()
        await until(lambda: holds("leading: reconciling 1 objects" in caplog.text), what="the first pass")


class SlowStatusApi(KubeApi):
    """The emulator's API, with every status write taking `delay` seconds and counted; the next writes
    fail with the errors in `failures`, one each."""

    delay = 0.0
    status_writes = 0
    failures: list[Exception]

    async def patch_status(self, resource: Resource, name: str, status: Mapping[str, object], *,
                           namespace: str | None = None, resource_version: str | None = None,
                           timeout: float) -> KubeObject:  # noqa: ASYNC109
        self.status_writes += 1
        await asyncio.sleep(self.delay)
        if getattr(self, "failures", None):
            raise self.failures.pop(0)
        return await super().patch_status(resource, name, status, namespace=namespace,
                                          resource_version=resource_version, timeout=timeout)


async def holds(value: object) -> bool:
    return bool(value)


@contextlib.asynccontextmanager
async def leading(ctx: OperatorContext, store: ResourceStore) -> AsyncIterator[None]:
    """The leader's loop over `store`, running until the block ends."""
    loop = asyncio.create_task(lead(ctx, store, {"SyncSchedule": reconcile_schedule}))
    try:
        yield
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


async def enqueued(redis: ArqRedis, uid: str, tick: datetime) -> bool:
    return bool(await redis.exists(f"arq:job:{tick_job_id(uid, tick)}"))


@pytest.fixture
def redis(serving_redis: ArqRedis) -> ArqRedis:
    return serving_redis


@pytest.fixture
async def slow_api(k8s: KubernetesUnderTest) -> AsyncIterator[SlowStatusApi]:
    api = SlowStatusApi(k8s.connection)
    yield api
    await api.aclose()


def context(api: KubeApi, redis: ArqRedis, clock: Clock) -> OperatorContext:
    return OperatorContext(api=api, redis=redis, metrics=OperatorMetrics(), ensure_leader=lambda: None,
                           settings=OperatorSettings(status_interval=1.0), now=clock)


async def create(k8s: KubernetesUnderTest) -> KubeObject:
    body = {"apiVersion": "kubearq.dev/v1alpha1", "kind": "SyncSchedule", "metadata": {"name": "nightly"},
            "spec": {"schedule": "* * * * *", "job": {"function": "sync_connections"}},
            }
    await k8s.api.create(SYNC_SCHEDULES, body, namespace=k8s.namespace, timeout=10)
    return await k8s.api.patch_status(SYNC_SCHEDULES, "nightly", {"lastScheduleTime": "2026-11-24T10:00:00Z"},
                                      namespace=k8s.namespace, timeout=10)


WriterKey = tuple[str, str, str]


@contextlib.asynccontextmanager
async def writing(ctx: OperatorContext, on_written: Callable[[WriterKey, KubeObject], None] = lambda _, __: None,
                  retry_seconds: float = 1.0) -> AsyncIterator[StatusWriter[WriterKey]]:
    """A started status writer, stopped when the block ends."""
    writer: StatusWriter[WriterKey] = StatusWriter(ctx, on_written, retry_seconds=retry_seconds)
    writer.start()
    try:
        yield writer
    finally:
        await writer.stop()


async def nightly_status(k8s: KubernetesUnderTest) -> dict[str, Any]:
    """The status of the test's schedule as stored, with its runs' ticks under `ticks`."""
    status = dict((await k8s.api.get(SYNC_SCHEDULES, "nightly", namespace=k8s.namespace, timeout=10))["status"])
    status["ticks"] = [run["scheduledTime"] for run in cast(list[dict[str, str]], status.get("runs", []))]
    return status


async def test_the_writer_writes_the_newest_status_once_and_stores_the_answer(
        k8s: KubernetesUnderTest, slow_api: SlowStatusApi, redis: ArqRedis) -> None:
    clock = Clock(T0 + timedelta(seconds=30))
    ctx = context(slow_api, redis, clock)
    body = await create(k8s)
    key = ("SyncSchedule", k8s.namespace, "nightly")
    stored: list[KubeObject] = []
    slow_api.delay = 0.5
    async with writing(ctx, lambda _, written: stored.append(written)) as writer:
        first = await advance_schedule(ctx, body)  # the 10:01 tick
        writer.submit(key, first)
        await until(lambda: holds(slow_api.status_writes == 1), what="the first write started")
        clock.moment += timedelta(minutes=1)
        second = await advance_schedule(ctx, body, writer.pending_status(key))  # the 10:02 tick, from the pending
        writer.submit(key, second)
        clock.moment += timedelta(minutes=1)
        third = await advance_schedule(ctx, body, writer.pending_status(key))  # 10:03, replaces the waiting 10:02
        writer.submit(key, third)
        await until(lambda: holds(len(writer) == 0), what="every write done")
    assert slow_api.status_writes == 2
    status = await nightly_status(k8s)
    assert status["lastScheduleTime"] == "2026-11-24T10:03:00Z"
    assert status.pop("ticks") == ["2026-11-24T10:03:00Z", "2026-11-24T10:02:00Z", "2026-11-24T10:01:00Z"]
    assert stored[-1]["status"] == status
    assert ctx.metrics.duplicate_enqueues.labels(source="schedule")._value.get() == 0


async def test_a_write_that_fails_for_a_passing_reason_is_tried_again_and_lands(
        k8s: KubernetesUnderTest, slow_api: SlowStatusApi, redis: ArqRedis, caplog: pytest.LogCaptureFixture) -> None:
    ctx = context(slow_api, redis, Clock(T0 + timedelta(seconds=30)))
    body = await create(k8s)
    key = ("SyncSchedule", k8s.namespace, "nightly")
    slow_api.failures = [TimeoutError(), ApiError(503, "ServiceUnavailable", "etcd is busy")]
    async with writing(ctx, retry_seconds=0.05) as writer:
        writer.submit(key, await advance_schedule(ctx, body))  # the 10:01 tick
        await until(lambda: holds(len(writer) == 0), what="the write landed")
    assert slow_api.status_writes == 3
    assert (await nightly_status(k8s))["lastScheduleTime"] == "2026-11-24T10:01:00Z"
    retries = [record for record in caplog.records if "trying again" in record.getMessage()]
    assert [record.levelname for record in retries] == ["WARNING", "WARNING"]
    assert [record.getMessage() for record in retries] == [
        f"status of SyncSchedule {k8s.namespace}/nightly not written (TimeoutError); trying again in 0.05 s",
        f"status of SyncSchedule {k8s.namespace}/nightly not written (503 ServiceUnavailable: etcd is busy); "
        "trying again in 0.1 s"]
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


async def test_a_retry_never_overwrites_a_newer_status(
        k8s: KubernetesUnderTest, slow_api: SlowStatusApi, redis: ArqRedis) -> None:
    clock = Clock(T0 + timedelta(seconds=30))
    ctx = context(slow_api, redis, clock)
    body = await create(k8s)
    key = ("SyncSchedule", k8s.namespace, "nightly")
    slow_api.failures = [TimeoutError()]
    async with writing(ctx, retry_seconds=0.3) as writer:
        first = await advance_schedule(ctx, body)  # the 10:01 tick; its write times out
        writer.submit(key, first)
        await until(lambda: holds(slow_api.status_writes == 1 and len(writer._writing) == 0), what="the failure")
        assert writer.pending_status(key) == first.status  # the loop still plans from it while it waits
        clock.moment += timedelta(minutes=1)
        second = await advance_schedule(ctx, body, writer.pending_status(key))  # 10:02, planned from the pending
        writer.submit(key, second)
        await until(lambda: holds(len(writer) == 0), what="the newer write")
        await asyncio.sleep(0.5)  # past the cancelled retry's time
    assert slow_api.status_writes == 2
    status = await nightly_status(k8s)
    assert (status["lastScheduleTime"], status["ticks"]) == (
        "2026-11-24T10:02:00Z", ["2026-11-24T10:02:00Z", "2026-11-24T10:01:00Z"])


async def test_a_tick_is_enqueued_on_time_while_the_last_ticks_status_is_still_being_written(
        k8s: KubernetesUnderTest, slow_api: SlowStatusApi, redis: ArqRedis) -> None:
    clock = Clock(T0)
    ctx = context(slow_api, redis, clock)
    store = ResourceStore()
    store.observe("SyncSchedule", "ADDED", await create(k8s))
    uid = store.objects[("SyncSchedule", k8s.namespace, "nightly")]["metadata"]["uid"]
    async with leading(ctx, store):
        await until(lambda: holds(slow_api.status_writes == 1), what="the first pass's status write")
        slow_api.delay = 5.0  # the API server is slow from now on
        clock.moment = datetime(2026, 11, 24, 10, 1, tzinfo=UTC)
        await until(lambda: enqueued(redis, uid, clock.moment), within=3, what="10:01")
        clock.moment = datetime(2026, 11, 24, 10, 2, tzinfo=UTC)
        started = time.monotonic()
        await until(lambda: enqueued(redis, uid, clock.moment), within=3, what="10:02")
        assert time.monotonic() - started < 2.5  # the loop wakes at least once a second; the write takes 5 s
        assert ctx.metrics.duplicate_enqueues.labels(source="schedule")._value.get() == 0
        await until(lambda: holds(store.objects[("SyncSchedule", k8s.namespace, "nightly")]["status"].get(
            "lastScheduleTime") == "2026-11-24T10:02:00Z"), within=15, what="the status write of 10:02")


def armed_tick(tick: datetime, deadline: int | None = None) -> ArmedTick:
    return ArmedTick("u-1", 1, tick, "arq:queue", NewJob(tick_job_id("u-1", tick), "sync_connections", {}), 60_000,
                     deadline)


def test_an_armed_tick_fires_only_while_it_is_the_one_due_tick() -> None:
    tick = datetime(2026, 11, 24, 10, 1, tzinfo=UTC)
    assert not armed_tick(tick).due(tick - timedelta(milliseconds=1))
    assert armed_tick(tick).due(tick)
    assert armed_tick(tick).due(tick + timedelta(seconds=59))
    assert not armed_tick(tick).due(tick + timedelta(seconds=60))  # a later tick may be due: the full pass decides
    assert not armed_tick(tick, deadline=10).due(tick + timedelta(seconds=10))  # missed: the full pass counts it


async def test_only_allow_schedules_are_armed(k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    ctx = context(k8s.api, redis, Clock(T0 + timedelta(seconds=30)))
    body = await create(k8s)
    allow = await advance_schedule(ctx, body)
    assert allow.armed is not None
    assert allow.armed.tick == datetime(2026, 11, 24, 10, 2, tzinfo=UTC)
    assert allow.armed.job.job_id == tick_job_id(str(body["metadata"]["uid"]), allow.armed.tick)
    changes: list[dict[str, Any]] = [{"concurrencyPolicy": "Forbid"}, {"concurrencyPolicy": "Replace"},
                                     {"suspend": True}]
    for generation, change in enumerate(changes, start=2):
        metadata = cast(dict[str, Any], body["metadata"])
        edited = cast(KubeObject, {**body, "metadata": {**metadata, "generation": generation},
                                   "spec": {**body["spec"], **change}})
        assert (await advance_schedule(ctx, edited)).armed is None, change


async def test_a_spec_change_after_arming_enqueues_the_new_job_not_the_armed_one(
        k8s: KubernetesUnderTest, slow_api: SlowStatusApi, redis: ArqRedis) -> None:
    clock = Clock(T0)
    ctx = context(slow_api, redis, clock)
    store = ResourceStore()
    store.observe("SyncSchedule", "ADDED", await create(k8s))
    key = ("SyncSchedule", k8s.namespace, "nightly")
    async with leading(ctx, store):
        await until(lambda: holds(slow_api.status_writes == 1), what="the first pass (arms 10:01)")
        changed = await k8s.api.patch(SYNC_SCHEDULES, "nightly", {"spec": {"job": {"function": "compact"}}},
                                      namespace=k8s.namespace, timeout=10)
        clock.moment = datetime(2026, 11, 24, 10, 1, tzinfo=UTC)  # the change is seen as the tick comes
        store.observe("SyncSchedule", "MODIFIED", changed)
        uid = str(changed["metadata"]["uid"])
        await until(lambda: enqueued(redis, uid, clock.moment), within=3, what="10:01")
    payload = deserialize(cast(bytes, await redis.get(f"arq:job:{tick_job_id(uid, clock.moment)}")))
    assert payload["f"] == "compact"
    assert key in store.objects


async def create_named(k8s: KubernetesUnderTest, name: str) -> KubeObject:
    """A schedule every minute whose last tick handled was 10:00, as `create` makes `nightly`."""
    body = {"apiVersion": "kubearq.dev/v1alpha1", "kind": "SyncSchedule", "metadata": {"name": name},
            "spec": {"schedule": "* * * * *", "job": {"function": "sync_connections"}}}
    await k8s.api.create(SYNC_SCHEDULES, body, namespace=k8s.namespace, timeout=10)
    return await k8s.api.patch_status(SYNC_SCHEDULES, name, {"lastScheduleTime": "2026-11-24T10:00:00Z"},
                                      namespace=k8s.namespace, timeout=10)


async def armed_pair(k8s: KubernetesUnderTest, slow_api: SlowStatusApi, redis: ArqRedis
                     ) -> tuple[Clock, OperatorContext, ResourceStore, KubeObject, KubeObject]:
    """`nightly` and a `control` schedule, both to be armed for 10:01 by the leader's first pass."""
    clock = Clock(T0)
    store = ResourceStore()
    nightly, control = await create_named(k8s, "nightly"), await create_named(k8s, "control")
    store.observe("SyncSchedule", "ADDED", nightly)
    store.observe("SyncSchedule", "ADDED", control)
    return clock, context(slow_api, redis, clock), store, nightly, control


async def test_a_schedule_deleted_between_its_arming_and_its_tick_enqueues_nothing(
        k8s: KubernetesUnderTest, slow_api: SlowStatusApi, redis: ArqRedis) -> None:
    clock, ctx, store, nightly, control = await armed_pair(k8s, slow_api, redis)
    tick = datetime(2026, 11, 24, 10, 1, tzinfo=UTC)
    async with leading(ctx, store):
        await until(lambda: holds(slow_api.status_writes == 2), what="the first pass (arms 10:01)")
        await k8s.api.delete(SYNC_SCHEDULES, "nightly", namespace=k8s.namespace, timeout=10)
        store.observe("SyncSchedule", "DELETED", nightly)  # seen as the tick comes
        clock.moment = tick
        await until(lambda: enqueued(redis, str(control["metadata"]["uid"]), tick), within=3, what="control's 10:01")
    assert not await enqueued(redis, str(nightly["metadata"]["uid"]), tick)
    assert ("SyncSchedule", k8s.namespace, "nightly") not in store.objects


async def test_a_schedule_suspended_between_its_arming_and_its_tick_enqueues_nothing(
        k8s: KubernetesUnderTest, slow_api: SlowStatusApi, redis: ArqRedis) -> None:
    clock, ctx, store, nightly, control = await armed_pair(k8s, slow_api, redis)
    tick = datetime(2026, 11, 24, 10, 1, tzinfo=UTC)
    async with leading(ctx, store):
        await until(lambda: holds(slow_api.status_writes == 2), what="the first pass (arms 10:01)")
        suspended = await k8s.api.patch(SYNC_SCHEDULES, "nightly", {"spec": {"suspend": True}},
                                        namespace=k8s.namespace, timeout=10)
        store.observe("SyncSchedule", "MODIFIED", suspended)
        clock.moment = tick
        await until(lambda: enqueued(redis, str(control["metadata"]["uid"]), tick), within=3, what="control's 10:01")
        await until(lambda: holds(ready_reasons(store.objects[("SyncSchedule", k8s.namespace, "nightly")])
                                  == ["Suspended"]), what="nightly's pass after the edit")
    assert not await enqueued(redis, str(nightly["metadata"]["uid"]), tick)


def ready_reasons(body: KubeObject) -> list[str]:
    conditions = cast(list[dict[str, str]], body.get("status", {}).get("conditions", []))
    return [condition["reason"] for condition in conditions if condition["type"] == "Ready"]


async def test_a_pass_over_more_objects_than_a_chunk_arms_and_fires_each_tick_once(
        k8s: KubernetesUnderTest, slow_api: SlowStatusApi, redis: ArqRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kubearq.operator.main.PASS_CHUNK", 1)  # one object per turn of the loop
    clock = Clock(T0)
    store = ResourceStore()
    names = ["a", "b", "c"]
    bodies = [await create_named(k8s, name) for name in names]
    for body in bodies:
        store.observe("SyncSchedule", "ADDED", body)
    tick = datetime(2026, 11, 24, 10, 1, tzinfo=UTC)
    ctx = context(slow_api, redis, clock)
    async with leading(ctx, store):
        await until(lambda: holds(slow_api.status_writes == 3), what="the first pass, a turn each")
        clock.moment = tick
        uids = [str(body["metadata"]["uid"]) for body in bodies]
        await until(lambda: all_enqueued(redis, uids, tick), within=3, what="10:01 of every schedule")
        await until(lambda: holds(all(store.objects[("SyncSchedule", k8s.namespace, name)]["status"].get(
            "lastScheduleTime") == "2026-11-24T10:01:00Z" for name in names)), what="every status records 10:01")
    assert ctx.metrics.duplicate_enqueues.labels(source="schedule")._value.get() == 0


async def all_enqueued(redis: ArqRedis, uids: list[str], tick: datetime) -> bool:
    return all([await enqueued(redis, uid, tick) for uid in uids])


class RecordingWriter:
    """Stands in for the status writer: records what is handed in."""

    def __init__(self) -> None:
        self.submitted: list[tuple[WriterKey, ScheduleStep]] = []

    def submit(self, key: WriterKey, step: ScheduleStep) -> None:
        self.submitted.append((key, step))

    def pending_status(self, key: WriterKey) -> SyncScheduleStatus | None:
        return None


def step_with(last_schedule_time: datetime) -> ScheduleStep:
    return ScheduleStep(schedule("10"), SyncScheduleStatus(), SyncScheduleStatus(last_schedule_time=last_schedule_time),
                        None)


def test_status_steps_are_held_during_a_pass_and_handed_to_the_writer_after_it_in_order() -> None:
    writer = RecordingWriter()
    held = HeldSubmits(cast(StatusWriter[WriterKey], writer), clock=lambda: 0.0)
    first, second = step_with(T0), step_with(T0 + timedelta(minutes=1))
    held.submit(KEY, first)
    held.submit(KEY, second)
    assert writer.submitted == []
    assert held.pending_status(KEY) == second.status  # the next pass plans from the held status
    held.release()
    assert writer.submitted == [(KEY, first), (KEY, second)]
    assert held.pending_status(KEY) is None


def test_status_steps_held_through_a_backlog_that_does_not_empty_go_out_after_the_hold_time() -> None:
    writer = RecordingWriter()
    now = [0.0]
    held = HeldSubmits(cast(StatusWriter[WriterKey], writer), clock=lambda: now[0])
    held.submit(KEY, step_with(T0))
    now[0] = HOLD_SECONDS - 0.1
    held.release_if_overdue()
    assert writer.submitted == []
    now[0] = HOLD_SECONDS
    held.release_if_overdue()
    assert len(writer.submitted) == 1
