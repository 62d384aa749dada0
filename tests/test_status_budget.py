"""Status writes within a QPS budget: coalesced per object (the newest wins), never in a tick's way, and slower,
not harder, when the API server throttles (429 / Retry-After).

The budget's arithmetic runs on an injected clock, the writer in looptime's fake time against an API that only
records; the leader's loop on the emulator and real Redis; and the writer as the operator's ServiceAccount on a
real kube-apiserver whose FlowSchema puts it on a priority level of a few seats, so the 429s are the server's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import httpx
import kopf
import pytest
from arq.connections import ArqRedis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from kubearq.operator import kube
from kubearq.operator.context import FIELD_MANAGER, SYNC_SCHEDULES, OperatorContext
from kubearq.operator.kube import ApiError, KubeApi, KubeObject, Resource
from kubearq.operator.main import lead
from kubearq.operator.metrics import OperatorMetrics
from kubearq.operator.rbac import operator_rules
from kubearq.operator.scheduler import tick_job_id
from kubearq.operator.schedules import ScheduleStep, reconcile_schedule
from kubearq.operator.scrapedecisions import Outcome
from kubearq.operator.settings import OperatorSettings
from kubearq.operator.store import ResourceStore
from kubearq.operator.syncschedule import SyncScheduleStatus
from kubearq.operator.writer import StatusWriter, WriteBudget
from tests.kubernetes import KubernetesUnderTest, eventually
from tests.polling import until
from tests.scheduling import Clock
from tests.test_scrapes import URLS, Operator, make_operator, uid_of

T0 = datetime(2026, 11, 24, 10, 0, 30, tzinfo=UTC)
Key = tuple[str, str, str]


class FakeClock:
    """Monotonic seconds, moved by the test."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


def count(metric: Any, kind: str = "SyncSchedule") -> float:
    return float(metric.labels(kind=kind)._value.get())


# --- The budget's arithmetic (an injected clock) ----------------------------------------------------------


def test_a_full_bucket_lets_a_burst_through_at_once_then_one_write_per_tick_of_the_rate() -> None:
    clock = FakeClock()
    budget = WriteBudget(10, 3, clock=clock)
    waits = [budget.claim(("SyncSchedule", "default", f"s{number}")) for number in range(6)]
    assert waits == pytest.approx([0, 0, 0, 0.1, 0.2, 0.3])


def test_a_reconciler_that_comes_back_when_told_gets_its_reserved_token() -> None:
    clock = FakeClock()
    budget = WriteBudget(10, 1, clock=clock)
    assert budget.claim("a") == 0
    assert budget.claim("b") == pytest.approx(0.1)
    clock.seconds = 0.05
    assert budget.claim("b") == pytest.approx(0.05)  # early: the same reservation, not a second one
    clock.seconds = 0.1
    assert budget.claim("b") == 0
    assert budget.claim("c") == pytest.approx(0.1)  # b's token was spent once


def test_a_429_with_retry_after_halves_the_rate_empties_the_bucket_and_pauses_every_write() -> None:
    clock = FakeClock()
    budget = WriteBudget(10, 10, clock=clock)
    assert budget.claim("a") == 0
    clock.seconds = 0.01
    assert budget.throttled(0.0, retry_after=2.0)
    assert budget.rate == 5
    assert budget.paused_for() == pytest.approx(2.0)
    assert budget.claim("b") == pytest.approx(2.0 + 1 / 5)  # nothing saved up for a burst at the pause's end
    assert budget.claim("c") == pytest.approx(2.0 + 2 / 5)


def test_a_moment_reserved_before_a_throttle_is_void_and_taken_anew_at_the_slower_rate() -> None:
    clock = FakeClock()
    budget = WriteBudget(10, 1, clock=clock)
    assert budget.claim("a") == 0
    assert budget.claim("b") == pytest.approx(0.1)
    budget.throttled(0.0, retry_after=1.0)
    assert budget.claim("b") == pytest.approx(1.0 + 1 / 5)


def test_answers_to_writes_sent_before_a_cut_do_not_cut_again() -> None:
    clock = FakeClock()
    budget = WriteBudget(64, 64, clock=clock)
    clock.seconds = 1.0
    cuts = [budget.throttled(0.5, retry_after=None) for _ in range(32)]  # 32 writes in flight, all refused
    assert cuts.count(True) == 1
    assert budget.rate == 32
    clock.seconds = 2.0
    assert budget.throttled(1.5, retry_after=None)  # sent at the halved rate, and refused again: cut again
    assert budget.rate == 16


def test_writes_that_land_grow_the_rate_back_to_the_budget_and_never_past_it() -> None:
    clock = FakeClock()
    budget = WriteBudget(100, 100, clock=clock)
    for _ in range(10):
        budget.throttled(clock.seconds, retry_after=None)
        clock.seconds += 0.001
    assert budget.rate == budget.min_qps == 1
    rates = []
    for _ in range(2000):
        budget.succeeded(clock.seconds)
        rates.append(budget.rate)
    assert rates[0] == pytest.approx(11)  # qps / RECOVERY_SECONDS per second of writes: +10 for the first at 1/s
    assert max(rates) == rates[-1] == 100


def test_the_rate_gauge_follows_the_budget() -> None:
    metrics = OperatorMetrics()
    clock = FakeClock()
    budget = WriteBudget(40, 10, clock=clock, on_rate=metrics.set_status_write_rate)
    assert metrics.status_write_rate._value.get() == 40
    budget.throttled(0.0, retry_after=None)
    assert metrics.status_write_rate._value.get() == 20


@settings(max_examples=200, deadline=None)
@given(qps=st.floats(0.5, 200), burst=st.integers(1, 50),
       steps=st.lists(st.tuples(st.floats(0, 2), st.integers(0, 4), st.sampled_from(["claim", "429", "ok"])),
                      min_size=1, max_size=80))
def test_no_window_ever_holds_more_writes_than_burst_plus_qps_times_its_length(
        qps: float, burst: int, steps: Sequence[tuple[float, int, str]]) -> None:
    clock = FakeClock()
    budget = WriteBudget(qps, burst, clock=clock)
    granted: list[float] = []  # when each token may be used: now, or the reservation's time
    for number, (advance, claims, event) in enumerate(steps):
        clock.seconds += advance
        for claim in range(claims):
            granted.append(clock.seconds + budget.claim((number, claim)))
        if event == "429":
            budget.throttled(clock.seconds, retry_after=advance or None)
        elif event == "ok":
            budget.succeeded(clock.seconds)
    granted.sort()
    for first in range(len(granted)):
        for last in range(first, len(granted)):
            assert last - first + 1 <= burst + qps * (granted[last] - granted[first]) + 1e-6


# --- Retry-After as the API says it --------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "details", "expected"), [
    ("3", None, 3.0),
    ("0.5", {"retryAfterSeconds": 9}, 0.5),  # the header first, as kopf and client-go read it
    (None, {"retryAfterSeconds": 2}, 2.0),  # the older way, in the Status object
    (None, None, None),
    ("soon", None, None),
])
def test_a_throttled_answer_says_how_long_to_wait(header: str | None, details: dict[str, int] | None,
                                                  expected: float | None) -> None:
    status: dict[str, object] = {"kind": "Status", "code": 429, "reason": "TooManyRequests",
                                 "message": "Too many requests, please try again later."}
    if details is not None:
        status["details"] = details
    response = httpx.Response(429, json=status, headers={"Retry-After": header} if header else {})
    error = kube._api_error(response)
    assert (error.code, error.retry_after) == (429, expected)
    assert kube.asks_to_slow_down(error)


def test_a_retry_after_may_be_an_http_date() -> None:
    now = datetime(2026, 12, 2, 15, 0, tzinfo=UTC).timestamp()
    assert kube.parse_retry_after("Wed, 02 Dec 2026 15:00:04 GMT", now=now) == 4.0
    assert kube.parse_retry_after("Wed, 02 Dec 2026 14:59:00 GMT", now=now) == 0.0  # past: at once


def test_only_429_or_a_retry_after_asks_to_slow_down() -> None:
    assert not kube.asks_to_slow_down(ApiError(503, "ServiceUnavailable", "etcd is busy"))
    assert kube.asks_to_slow_down(ApiError(503, "ServiceUnavailable", "shutting down", retry_after=1))
    assert not kube.asks_to_slow_down(TimeoutError())


# --- The writer, in looptime's fake time ----------------------------------------------------------------------


class RecordingApi(KubeApi):
    """An API that writes nothing anywhere: it records each status write (loop time, name, lastScheduleTime)
    and answers the next ones with the errors in `refusals`."""

    def __init__(self) -> None:  # no HTTP client: nothing leaves the process
        self.writes: list[tuple[float, str, str | None]] = []
        self.refusals: list[Exception] = []

    async def aclose(self) -> None:
        pass

    async def patch_status(self, resource: Resource, name: str, status: Mapping[str, object], *,
                           namespace: str | None = None, resource_version: str | None = None,
                           timeout: float) -> KubeObject:  # noqa: ASYNC109
        await asyncio.sleep(0.005)  # a write takes a while: the writer must not count on it being instant
        if self.refusals:
            raise self.refusals.pop(0)
        last = status.get("lastScheduleTime")
        self.writes.append((asyncio.get_running_loop().time(), name, str(last) if last else None))
        return cast(KubeObject, {"metadata": {"name": name, "namespace": namespace}, "status": dict(status)})


def recording_context(api: KubeApi, qps: float, burst: int) -> OperatorContext:
    return OperatorContext(api=api, redis=cast(Redis, None), metrics=OperatorMetrics(), ensure_leader=lambda: None,
                           settings=OperatorSettings(status_write_qps=qps, status_write_burst=burst))


def step(name: str, minute: int) -> ScheduleStep:
    """A schedule's step whose status records the tick of 10:<minute>."""
    body = cast(KubeObject, {"metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}"}})
    tick = datetime(2026, 11, 24, 10, minute, tzinfo=UTC)
    return ScheduleStep(body=body, previous=SyncScheduleStatus(), status=SyncScheduleStatus(last_schedule_time=tick),
                        wake_at=None)


def key(name: str) -> Key:
    return ("SyncSchedule", "default", name)


@contextlib.asynccontextmanager
async def writing(ctx: OperatorContext) -> AsyncIterator[StatusWriter[Key]]:
    writer: StatusWriter[Key] = StatusWriter(ctx, on_written=lambda _, __: None)
    writer.start()
    try:
        yield writer
    finally:
        await writer.stop()


async def drained(writer: StatusWriter[Key]) -> bool:
    return len(writer) == 0


@pytest.mark.looptime
async def test_updates_of_one_object_within_a_window_are_one_write_of_the_newest_status() -> None:
    api = RecordingApi()
    ctx = recording_context(api, qps=1, burst=1)
    ctx.status_budget.claim("someone else")  # the one token of this second is spent
    async with writing(ctx) as writer:
        for minute in range(1, 11):  # ten statuses inside the second before the next token
            writer.submit(key("nightly"), step("nightly", minute))
            await asyncio.sleep(0.05)
        await until(lambda: drained(writer), within=5, what="the write")
    assert [(name, last) for _, name, last in api.writes] == [("nightly", "2026-11-24T10:10:00Z")]
    assert api.writes[0][0] == pytest.approx(1.0, abs=0.01)  # at the next token, not before
    assert (count(ctx.metrics.status_writes_sent), count(ctx.metrics.status_writes_coalesced)) == (1, 9)


@pytest.mark.looptime
async def test_the_writer_never_writes_faster_than_its_budget() -> None:
    api = RecordingApi()
    ctx = recording_context(api, qps=5, burst=5)
    async with writing(ctx) as writer:
        for number in range(50):
            writer.submit(key(f"s{number}"), step(f"s{number}", 1))
        await until(lambda: drained(writer), within=30, what="every write")
    moments = sorted(moment for moment, _, _ in api.writes)
    assert len(moments) == 50
    for first in range(len(moments)):
        for last in range(first, len(moments)):
            assert last - first + 1 <= 5 + 5 * (moments[last] - moments[first]) + 1e-6
    assert moments[-1] == pytest.approx(45 / 5, abs=0.1)  # the burst at once, then 5 a second


@pytest.mark.looptime
async def test_a_429_with_retry_after_halves_the_rate_and_every_write_waits_it_out() -> None:
    api = RecordingApi()
    ctx = recording_context(api, qps=4, burst=1)
    api.refusals = [ApiError(429, "TooManyRequests", "Too many requests, please try again later.", retry_after=3)]
    async with writing(ctx) as writer:
        writer.submit(key("a"), step("a", 1))  # refused: the rate halves and writing pauses for 3 s
        await until(lambda: holds(count(ctx.metrics.status_writes_throttled) == 1), within=1, what="the 429")
        assert ctx.status_budget.rate == 2
        assert ctx.metrics.status_write_rate._value.get() == 2
        writer.submit(key("b"), step("b", 1))
        writer.submit(key("c"), step("c", 1))
        await until(lambda: drained(writer), within=30, what="every write")
    written = {name: moment for moment, name, _ in api.writes}
    assert sorted(written) == ["a", "b", "c"]  # nothing lost: the refused write is sent again
    assert min(written.values()) >= 3.0 + 0.5 - 0.01  # nothing before the Retry-After, nor in a burst at its end
    assert sorted(written.values())[1] - sorted(written.values())[0] >= 1 / 2 - 0.01  # at the halved rate
    assert (count(ctx.metrics.status_writes_sent), count(ctx.metrics.status_writes_throttled)) == (4, 1)


@pytest.mark.looptime
async def test_a_newer_status_handed_in_while_a_throttled_one_waits_replaces_it() -> None:
    api = RecordingApi()
    ctx = recording_context(api, qps=4, burst=1)
    api.refusals = [ApiError(429, "TooManyRequests", "Too many requests", retry_after=2)]
    async with writing(ctx) as writer:
        writer.submit(key("a"), step("a", 1))
        await until(lambda: holds(count(ctx.metrics.status_writes_throttled) == 1), within=1, what="the 429")
        writer.submit(key("a"), step("a", 2))
        await until(lambda: drained(writer), within=30, what="the write")
    assert [(name, last) for _, name, last in api.writes] == [("a", "2026-11-24T10:02:00Z")]


@pytest.mark.looptime
async def test_an_object_updated_on_every_pass_waits_its_turn_behind_the_others() -> None:
    api = RecordingApi()
    ctx = recording_context(api, qps=2, burst=1)
    writer: StatusWriter[Key] = StatusWriter(ctx, on_written=lambda _, __: None, concurrency=1)
    writer.start()
    try:
        writer.submit(key("hot"), step("hot", 1))
        for name in ("cold-1", "cold-2", "cold-3"):
            writer.submit(key(name), step(name, 1))
        for minute in range(2, 30):  # a newer status of `hot` every 0.1 s, for 2.8 s
            await asyncio.sleep(0.1)
            writer.submit(key("hot"), step("hot", minute))
        await until(lambda: drained(writer), within=30, what="every write")
    finally:
        await writer.stop()
    names = [name for _, name, _ in api.writes]
    assert names[:5] == ["hot", "cold-1", "cold-2", "cold-3", "hot"]  # one write each, in turn
    assert set(names[5:]) == {"hot"}  # then only `hot` has news, one write per token
    assert len(names) < 1 + 3 + 28  # 28 updates of `hot` coalesced into a few writes
    assert api.writes[-1][2] == "2026-11-24T10:29:00Z"  # the newest last


@pytest.mark.looptime
async def test_a_429_halves_the_writes_let_in_flight_at_once_too() -> None:
    """API Priority and Fairness counts seats (requests executing at once), not requests a second."""
    budget = WriteBudget(1000, 1000, in_flight=4)
    sent = [await budget.acquire() for _ in range(4)]
    waiting = asyncio.create_task(budget.acquire())
    await asyncio.sleep(1)
    assert not waiting.done()  # four in flight: the window is full
    budget.throttled(sent[0], retry_after=None)
    assert budget.window == 2
    budget.release()
    budget.release()
    await asyncio.sleep(1)
    assert not waiting.done()  # two in flight still fill the halved window
    budget.release()
    await asyncio.sleep(1)
    assert waiting.done()
    await waiting


async def holds(value: object) -> bool:
    return bool(value)


# --- ScrapeRequests: reconcilers claim a token and never wait for one (the emulator and real Redis) ----------------


class RefusingApi(KubeApi):
    """The test's API, answering the next status writes with the errors in `refusals`."""

    refusals: list[Exception]

    async def patch_status(self, resource: Resource, name: str, status: Mapping[str, object], *,
                           namespace: str | None = None, resource_version: str | None = None,
                           timeout: float) -> KubeObject:  # noqa: ASYNC109
        if getattr(self, "refusals", None):
            raise self.refusals.pop(0)
        return await super().patch_status(resource, name, status, namespace=namespace,
                                          resource_version=resource_version, timeout=timeout)


@pytest.fixture
def budget_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def scrapes(k8s: KubernetesUnderTest, serving_redis: ArqRedis, budget_clock: FakeClock
                  ) -> AsyncIterator[Operator]:
    """The ScrapeRequest reconciler on a budget of one write a second, on `budget_clock`."""
    operator = make_operator(k8s, serving_redis)
    operator.ctx.api = RefusingApi(k8s.connection)
    operator.ctx.status_budget = WriteBudget(1, 1, clock=budget_clock)
    yield operator
    await operator.ctx.api.aclose()


def pages(status: Mapping[str, object], kind: str, field: str) -> object:
    return cast(Mapping[str, object], status[kind])[field]


async def test_a_scrape_status_without_a_token_is_left_to_the_pass_its_token_is_due_for(
        scrapes: Operator, budget_clock: FakeClock) -> None:
    uid = uid_of(await scrapes.create("events", urls=URLS))
    await scrapes.reconcile("events")  # started: finalizer, listing pages, the first status (the one token)
    await scrapes.count(uid, listing_done=1)
    scrapes.clock.advance(1)

    deferred = await scrapes.reconcile("events")

    assert (deferred.outcome, deferred.status_written) == (Outcome.RUNNING, False)
    assert deferred.wake_at == scrapes.clock.now() + timedelta(seconds=1)  # the next token's time
    assert pages(await scrapes.status("events"), "listingPages", "done") == 0
    assert count(scrapes.ctx.metrics.status_writes_coalesced, "ScrapeRequest") == 1
    await scrapes.count(uid, listing_done=1)
    budget_clock.seconds = 1.0
    scrapes.clock.advance(1)

    written = await scrapes.reconcile("events")

    assert written.status_written
    assert pages(await scrapes.status("events"), "listingPages", "done") == 2  # computed afresh: the newest
    assert count(scrapes.ctx.metrics.status_writes_sent, "ScrapeRequest") == 2


async def test_a_throttled_scrape_status_slows_every_write_and_comes_back_after_the_retry_after(
        scrapes: Operator, budget_clock: FakeClock) -> None:
    scrapes.ctx.status_budget = WriteBudget(8, 8, clock=budget_clock)
    cast(RefusingApi, scrapes.ctx.api).refusals = [
        ApiError(429, "TooManyRequests", "Too many requests, please try again later.", retry_after=2)]
    await scrapes.create("events", urls=URLS)

    result = await scrapes.reconcile("events")

    assert (result.outcome, result.status_written) == (Outcome.RUNNING, False)
    assert result.wake_at == scrapes.clock.now() + timedelta(seconds=2)
    assert (scrapes.ctx.status_budget.rate, scrapes.ctx.status_budget.paused_for()) == (4, 2)
    assert count(scrapes.ctx.metrics.status_writes_throttled, "ScrapeRequest") == 1
    budget_clock.seconds = 2.0 + 1 / 4
    assert (await scrapes.reconcile("events")).status_written  # nothing lost: the next pass writes it
    assert pages(await scrapes.status("events"), "listingPages", "total") == 2


# --- Ticks never wait for the budget (the leader's loop, on the emulator and real Redis) ------------------------


SCHEDULES = 10


async def create_schedules(k8s: KubernetesUnderTest, count: int) -> list[KubeObject]:
    created = []
    for number in range(count):
        await k8s.api.create(SYNC_SCHEDULES, {
            "apiVersion": SYNC_SCHEDULES.api_version, "kind": "SyncSchedule", "metadata": {"name": f"s{number}"},
            "spec": {"schedule": "* * * * *", "job": {"function": "sync_connections"}}},
            namespace=k8s.namespace, timeout=10)
        created.append(await k8s.api.patch_status(
            SYNC_SCHEDULES, f"s{number}", {"lastScheduleTime": "2026-11-24T10:00:00Z"}, namespace=k8s.namespace,
            timeout=10))
    return created


async def test_ticks_are_enqueued_on_time_while_their_statuses_wait_for_the_budget(
        k8s: KubernetesUnderTest, serving_redis: ArqRedis) -> None:
    clock = Clock(T0)
    ctx = OperatorContext(api=k8s.api, redis=serving_redis, metrics=OperatorMetrics(), ensure_leader=lambda: None,
                          settings=OperatorSettings(status_interval=1.0, status_write_qps=2, status_write_burst=1),
                          now=clock)
    store = ResourceStore()
    for body in await create_schedules(k8s, SCHEDULES):
        store.observe("SyncSchedule", "ADDED", body)
    uids = [body["metadata"]["uid"] for body in store.objects.values()]
    loop = asyncio.create_task(lead(ctx, store, {"SyncSchedule": reconcile_schedule}))
    try:
        await until(lambda: holds(count(ctx.metrics.status_writes_sent) >= 1), what="the first pass's first write")
        clock.moment = datetime(2026, 11, 24, 10, 1, tzinfo=UTC)
        started = asyncio.get_running_loop().time()
        await until(lambda: all_enqueued(serving_redis, uids, clock.moment), within=5, what="every 10:01 tick")
        assert asyncio.get_running_loop().time() - started < 2.0  # the loop wakes once a second at least
        assert ctx.metrics.status_writes_pending._value.get() > 0  # ...while most statuses still wait their turn
        assert count(ctx.metrics.status_writes_sent) < SCHEDULES
        await eventually(lambda: every_status_records(k8s, "2026-11-24T10:01:00Z"), within=30)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    # The 10:00:30 statuses still waiting at 10:01 were replaced by the 10:01 ones: fewer writes than steps.
    assert count(ctx.metrics.status_writes_coalesced) > 0
    assert count(ctx.metrics.status_writes_sent) < 2 * SCHEDULES
    assert ctx.metrics.duplicate_enqueues.labels(source="schedule")._value.get() == 0


async def all_enqueued(redis: ArqRedis, uids: Sequence[str], tick: datetime) -> bool:
    return all([await redis.exists(f"arq:job:{tick_job_id(uid, tick)}") for uid in uids])


async def every_status_records(k8s: KubernetesUnderTest, tick: str) -> bool:
    listed = await k8s.api.list(SYNC_SCHEDULES, namespace=k8s.namespace, timeout=10)
    return all(item.get("status", {}).get("lastScheduleTime") == tick for item in listed.items)


# --- On a real kube-apiserver, as the operator's ServiceAccount, on a priority level of a few seats -------------

FLOW_SCHEMAS = Resource("flowcontrol.apiserver.k8s.io", "v1", "flowschemas")
PRIORITY_LEVELS = Resource("flowcontrol.apiserver.k8s.io", "v1", "prioritylevelconfigurations")
PRIORITY_LEVEL_HEADER = "X-Kubernetes-PF-PriorityLevel-UID"


async def tiny_priority_level(k8s: KubernetesUnderTest, service_account: str, *, shares: int = 1) -> str:
    """A priority level of `shares` nominal shares (1: ceil(600 x 1/246) = 3 seats on a default server), that
    neither borrows nor queues, and a FlowSchema that puts `service_account` on it ahead of `service-accounts`
    (precedence 9000, `workload-low`); returns the level's uid, which the API server names in every answer."""
    name = f"{k8s.namespace}-tiny"
    level = await k8s.create_cluster_object(PRIORITY_LEVELS, {
        "apiVersion": PRIORITY_LEVELS.api_version, "kind": "PriorityLevelConfiguration", "metadata": {"name": name},
        "spec": {"type": "Limited", "limited": {
            "nominalConcurrencyShares": shares, "lendablePercent": 0, "borrowingLimitPercent": 0,
            "limitResponse": {"type": "Reject"}}}})
    await k8s.create_cluster_object(FLOW_SCHEMAS, {
        "apiVersion": FLOW_SCHEMAS.api_version, "kind": "FlowSchema", "metadata": {"name": name},
        "spec": {"priorityLevelConfiguration": {"name": name}, "matchingPrecedence": 500,
                 "distinguisherMethod": {"type": "ByUser"},
                 "rules": [{"subjects": [{"kind": "ServiceAccount", "serviceAccount": {
                     "namespace": k8s.namespace, "name": service_account}}],
                     "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"],
                                        "namespaces": ["*"], "clusterScope": True}]}]}})
    return str(level["metadata"]["uid"])


async def classified_on(k8s: KubernetesUnderTest, connection: kopf.ConnectionInfo, level_uid: str) -> bool:
    """The API server's fairness config has caught up: the ServiceAccount's requests land on the level."""
    async with k8s.http_client(connection=connection, timeout=10) as client:
        response = await client.get(SYNC_SCHEDULES.path(namespace=k8s.namespace), params={"limit": "1"})
    return bool(response.headers.get(PRIORITY_LEVEL_HEADER) == level_uid)


@pytest.mark.cluster
async def test_as_a_throttled_service_account_the_writer_slows_down_and_every_status_lands(
        k8s: KubernetesUnderTest, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    login = await k8s.login_as_service_account("kubearq-operator", operator_rules())
    level = await tiny_priority_level(k8s, login.name)
    await eventually(lambda: classified_on(k8s, login.connection, level), within=30)
    names = [f"s{number}" for number in range(40)]
    for name in names:
        await k8s.api.create(SYNC_SCHEDULES, {
            "apiVersion": SYNC_SCHEDULES.api_version, "kind": "SyncSchedule", "metadata": {"name": name},
            "spec": {"schedule": "* * * * *", "job": {"function": "sync_connections"}}},
            namespace=k8s.namespace, timeout=10)
    rates: list[float] = []
    async with KubeApi(login.connection, field_manager=FIELD_MANAGER) as api:
        ctx = OperatorContext(api=api, redis=cast(Redis, None), metrics=OperatorMetrics(), ensure_leader=lambda: None,
                              settings=OperatorSettings(status_write_qps=1000, status_write_burst=1000))
        ctx.status_budget = WriteBudget(1000, 1000, on_rate=rates.append)  # far more than 3 seats take
        async with writing(ctx) as writer:
            for minute in range(1, 4):  # three rounds of statuses for every schedule, the last one the newest
                for name in names:
                    writer.submit(("SyncSchedule", k8s.namespace, name),
                                  ScheduleStep(body=cast(KubeObject, {"metadata": {"name": name,
                                                                                   "namespace": k8s.namespace}}),
                                               previous=SyncScheduleStatus(), status=SyncScheduleStatus(
                                                   last_schedule_time=datetime(2026, 11, 24, 10, minute, tzinfo=UTC)),
                                               wake_at=None))
                await asyncio.sleep(0.2)
            await until(lambda: drained(writer), within=90, what="every status written")
    throttled = count(ctx.metrics.status_writes_throttled)
    assert throttled > 0  # the API server's own 429s
    assert min(rates) <= 1000 / 2  # and the writer slowed down for them: its rate halved at least once
    assert await every_status_records(k8s, "2026-11-24T10:03:00Z")  # nothing lost: the newest of each landed
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    # Fewer requests than a retry per refusal would have sent, and no write per update that was replaced.
    assert count(ctx.metrics.status_writes_sent) <= 3 * len(names) + throttled
