"""Tenancy: a namespace may have the leader enqueue only what a QueuePolicy (or the default) grants it. The
decisions, then the reconcilers on the emulator and a real Redis, then whole replicas watching policy changes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from arq.connections import ArqRedis

from kubearq.core.connections import create_redis
from kubearq.core.contract import deserialize, origin_of
from kubearq.operator import kube
from kubearq.operator.context import NAMESPACES, QUEUE_POLICIES, SCRAPE_REQUESTS, SYNC_SCHEDULES
from kubearq.operator.queuepolicy import QueuePolicySpec
from kubearq.operator.schedules import reconcile_schedule
from kubearq.operator.scrapedecisions import StatusPacer
from kubearq.operator.scrapes import reconcile_scrape_request
from kubearq.operator.store import ResourceStore
from kubearq.operator.tenancy import (
    Policy,
    TenancyMode,
    TenancyState,
    decide_schedule,
    decide_scrape,
    policy_status,
)
from tests.kubernetes import KubernetesUnderTest
from tests.polling import until
from tests.scheduling import Clock
from tests.test_operator import ShiftedClock, lease_holder, replicas
from tests.test_schedules import context, create, created_at, queued_ids, status_of

T = 10.0
STAYS = "nothing of it is enqueued (jobs it queued before stay queued)"


def policy(name: str, **spec: Any) -> Policy:
    return Policy(name, QueuePolicySpec.model_validate(spec))


TEAM_A = policy("team-a", namespaces={"names": ["team-a"]}, queues=["team-a:*", "reports"],
                functions=["report_*"])
BY_LABEL = policy("analytics", namespaces={"matchLabels": {"tier": "analytics"},
                                           "matchExpressions": [{"key": "env", "operator": "NotIn",
                                                                 "values": ["dev"]}]},
                  queues=["arq:queue"], functions=["sync_connections"],
                  scrapeRequests={"maxRequestsPerMinute": 600})


# --- Decisions ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("namespace", "labels", "queue", "function", "allowed"), [
    ("team-a", {}, "team-a:reports", "report_daily", True),
    ("team-a", {}, "reports", "report_weekly", True),
    ("team-a", {}, "reports", "sync_connections", False),  # a queue granted, not this function on it
    ("team-b", {"tier": "analytics"}, "arq:queue", "sync_connections", True),  # selected by label
    ("team-b", {"tier": "analytics", "env": "dev"}, "arq:queue", "sync_connections", False),  # NotIn dev
    ("team-c", {}, "team-c:jobs", "anything", True),  # no policy: its own queues (namespaced)
    ("team-c", {}, "arq:queue", "sync_connections", False),
])
def test_a_schedule_is_permitted_when_one_policy_grants_its_queue_and_function(
        namespace: str, labels: dict[str, str], queue: str, function: str, allowed: bool) -> None:
    assert decide_schedule(namespace, labels, queue, function, [TEAM_A, BY_LABEL],
                           TenancyMode.NAMESPACED).allowed is allowed


def test_two_policies_do_not_combine_into_a_grant_neither_gives() -> None:
    queue_only = policy("q", namespaces={"names": ["team-a"]}, queues=["shared"], functions=["harmless"])
    function_only = policy("f", namespaces={"names": ["team-a"]}, queues=["team-a:*"], functions=["wipe_all"])
    assert not decide_schedule("team-a", {}, "shared", "wipe_all", [queue_only, function_only],
                               TenancyMode.NAMESPACED).allowed


def test_refusals_name_the_rule_missing() -> None:
    granted = decide_schedule("team-a", {}, "arq:queue", "sync_connections", [TEAM_A], TenancyMode.NAMESPACED)
    ungranted = decide_schedule("team-c", {}, "arq:queue", "sync_connections", [TEAM_A], TenancyMode.NAMESPACED)
    strict = decide_schedule("team-c", {}, "team-c:jobs", "f", [], TenancyMode.POLICY)
    assert granted.message == ("namespace team-a may not enqueue sync_connections on queue arq:queue: QueuePolicy "
                               f"team-a grants queues team-a:*, reports and functions report_*; {STAYS}")
    assert ungranted.message == ("namespace team-c may not enqueue sync_connections on queue arq:queue: no "
                                 "QueuePolicy grants namespace team-c (without one, a namespace may use only queues "
                                 f"team-c:*); {STAYS}")
    assert strict.message == ("namespace team-c may not enqueue f on queue team-c:jobs: no QueuePolicy grants "
                              "namespace team-c (TENANCY=policy: without one, a namespace may enqueue nothing); "
                              f"{STAYS}")


def test_built_in_destructive_jobs_are_never_permitted_to_a_schedule() -> None:
    everything = policy("all", namespaces={"names": ["team-a"]}, queues=["*"], functions=["*"])
    for mode in TenancyMode:
        verdict = decide_schedule("team-a", {}, "arq:queue", "delete_scrape_results", [everything], mode)
        assert (verdict.allowed, verdict.message.split(";")[0]) == (
            False, "delete_scrape_results is enqueued by the operator alone (when a ScrapeRequest with deletionPolicy:"
                   " Delete is deleted), never by a schedule")


def test_open_tenancy_permits_everything_else() -> None:
    assert decide_schedule("team-c", {}, "arq:queue", "sync_connections", [], TenancyMode.OPEN).allowed


@pytest.mark.parametrize(("labels", "queue", "private", "rpm", "message"), [
    ({"tier": "analytics"}, "arq:queue", False, 600, None),
    ({"tier": "analytics"}, "arq:queue", True, 60, "namespace team-b may not set fetch.allowPrivateNetworks: "
                                                   "QueuePolicy analytics does not allow it "
                                                   f"(scrapeRequests.allowPrivateNetworks); {STAYS}"),
    ({"tier": "analytics"}, "arq:queue", False, 6000, "namespace team-b may not ask for 6000 requests per minute: "
                                                      "QueuePolicy analytics allows at most 600 "
                                                      f"(scrapeRequests.maxRequestsPerMinute); {STAYS}"),
    ({}, "arq:queue", False, 6000, None),  # no policy: the built-in scrape queue, any rate
    ({}, "team-b:scrapes", False, 60, None),
    ({}, "arq:queue", True, 60, "namespace team-b may not set fetch.allowPrivateNetworks: no QueuePolicy grants "
                                f"namespace team-b (without one, private networks are refused); {STAYS}"),
])
def test_a_scrape_request_is_permitted_within_its_policy(labels: dict[str, str], queue: str, private: bool,
                                                         rpm: int, message: str | None) -> None:
    verdict = decide_scrape("team-b", labels, queue, private_networks=private, requests_per_minute=rpm,
                            policies=[BY_LABEL], mode=TenancyMode.NAMESPACED)
    assert verdict.message == (message or "")
    assert verdict.allowed is (message is None)


def test_a_policy_without_scrape_requests_grants_no_scraping() -> None:
    verdict = decide_scrape("team-a", {}, "team-a:x", private_networks=False, requests_per_minute=60,
                            policies=[TEAM_A], mode=TenancyMode.NAMESPACED)
    assert verdict.message == ("namespace team-a may not scrape on queue team-a:x: QueuePolicy team-a grants queues "
                               f"team-a:*, reports and functions report_* (no scrapeRequests); {STAYS}")


# --- The reconcilers ---------------------------------------------------------------------------------------


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    client = create_redis(redis_url)
    yield client
    await client.aclose()


def tenancy_for(namespace: str, *policies: Policy) -> TenancyState:
    return TenancyState(TenancyMode.NAMESPACED, {p.name: p for p in policies}, {namespace: {}})


async def test_a_schedule_outside_policy_gets_not_permitted_and_an_event_and_nothing_is_enqueued(
        k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    obj = await create(k8s, "sync", {"schedule": "* * * * *"})
    clock = Clock(created_at(obj).replace(second=0, microsecond=0) + timedelta(minutes=1, seconds=2))
    ctx = context(k8s, redis, clock)
    ctx.tenancy = tenancy_for(k8s.namespace)

    for _ in range(2):
        await reconcile_schedule(ctx, await k8s.api.get(SYNC_SCHEDULES, "sync", namespace=k8s.namespace, timeout=T))
    after = await k8s.api.get(SYNC_SCHEDULES, "sync", namespace=k8s.namespace, timeout=T)

    [ready] = [c for c in status_of(after)["conditions"] if c["type"] == "Ready"]
    expected = (f"namespace {k8s.namespace} may not enqueue sync_connections on queue arq:queue: no QueuePolicy "
                f"grants namespace {k8s.namespace} (without one, a namespace may use only queues {k8s.namespace}:*);"
                f" {STAYS}")
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", "NotPermitted", expected)
    assert await queued_ids(redis) == []
    events = await k8s.api.list(kube.EVENTS, namespace=k8s.namespace, timeout=T)
    found = [cast(dict[str, Any], event) for event in events.items]
    assert [(e["reason"], e["type"], e["message"]) for e in found] == [("NotPermitted", "Warning", expected)]


async def test_a_policy_granted_later_enqueues_from_the_next_tick_and_revoked_stops(
        k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    obj = await create(k8s, "sync", {"schedule": "* * * * *", "startingDeadlineSeconds": 3600})
    first = created_at(obj).replace(second=0, microsecond=0) + timedelta(minutes=1)
    clock = Clock(first + timedelta(seconds=2))
    ctx = context(k8s, redis, clock)
    ctx.tenancy = tenancy_for(k8s.namespace)
    grant = policy("grant", namespaces={"names": [k8s.namespace]}, queues=["arq:queue"],
                   functions=["sync_connections"])

    async def reconcile() -> dict[str, Any]:
        await reconcile_schedule(ctx, await k8s.api.get(SYNC_SCHEDULES, "sync", namespace=k8s.namespace, timeout=T))
        return status_of(await k8s.api.get(SYNC_SCHEDULES, "sync", namespace=k8s.namespace, timeout=T))

    refused = await reconcile()
    ctx.tenancy.policies["grant"] = grant
    clock.moment = first + timedelta(minutes=1, seconds=2)
    granted = await reconcile()
    queued_after_grant = await queued_ids(redis)
    del ctx.tenancy.policies["grant"]
    clock.moment = first + timedelta(minutes=2, seconds=2)
    revoked = await reconcile()

    assert refused["conditions"][0]["reason"] == "NotPermitted"
    assert granted["conditions"][0]["reason"] in ("Scheduled", "FunctionUnknown")
    # the tick refused while there was no policy is not caught up: it starts from the next tick
    assert [run["scheduledTime"] for run in granted["runs"]] == [
        (first + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")]
    assert len(queued_after_grant) == 1
    assert revoked["conditions"][0]["reason"] == "NotPermitted"
    assert await queued_ids(redis) == queued_after_grant  # the run queued before stays; no new one


async def test_the_jobs_of_a_schedule_carry_it_as_their_origin(k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    obj = await create(k8s, "sync", {"schedule": "* * * * *"})
    ctx = context(k8s, redis, Clock(created_at(obj).replace(second=0, microsecond=0) + timedelta(minutes=1, seconds=2)))
    await reconcile_schedule(ctx, await k8s.api.get(SYNC_SCHEDULES, "sync", namespace=k8s.namespace, timeout=T))
    [job_id] = await queued_ids(redis)
    origin = origin_of(deserialize(await redis.get(f"arq:job:{job_id}")))
    assert origin is not None
    assert (origin.namespace, origin.kind, origin.name) == (k8s.namespace, "SyncSchedule", "sync")


async def test_a_scrape_request_outside_policy_waits_unenqueued_then_starts_once_permitted(
        k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    await k8s.api.create(SCRAPE_REQUESTS, {
        "apiVersion": SCRAPE_REQUESTS.api_version, "kind": "ScrapeRequest", "metadata": {"name": "events"},
        "spec": {"urls": ["https://events.example/"], "fetch": {"allowPrivateNetworks": True}}},
        namespace=k8s.namespace, timeout=T)
    ctx = context(k8s, redis, Clock(datetime(2026, 3, 1, tzinfo=UTC)))
    ctx.tenancy = tenancy_for(k8s.namespace)
    pacer = StatusPacer()

    async def reconcile() -> dict[str, Any]:
        body = await k8s.api.get(SCRAPE_REQUESTS, "events", namespace=k8s.namespace, timeout=T)
        await reconcile_scrape_request(ctx, body, pacer=pacer)
        return status_of(await k8s.api.get(SCRAPE_REQUESTS, "events", namespace=k8s.namespace, timeout=T))

    waiting = await reconcile()
    queued_while_refused = await redis.zcard("arq:queue")
    ctx.tenancy.policies["scrapers"] = policy(
        "scrapers", namespaces={"names": [k8s.namespace]}, queues=["arq:queue"],
        scrapeRequests={"allowPrivateNetworks": True})
    started = await reconcile()

    conditions = {c["type"]: (c["status"], c["reason"]) for c in waiting["conditions"]}
    assert conditions == {"Ready": ("False", "NotPermitted"), "Succeeded": ("Unknown", "NotPermitted")}
    assert (waiting["phase"], queued_while_refused) == ("Pending", 0)
    assert {c["type"]: (c["status"], c["reason"]) for c in started["conditions"]} == {
        "Ready": ("True", "Permitted"), "Succeeded": ("Unknown", "Scraping")}
    assert started["phase"] == "Running"
    assert await redis.zcard("arq:queue") == 1


# --- The watch: a change takes effect at once, both ways ------------------------------------------------


def schedule_body(namespace: str, name: str) -> kube.KubeObject:
    return {"apiVersion": "kubearq.dev/v1alpha1", "kind": "SyncSchedule",
            "metadata": {"namespace": namespace, "name": name, "uid": f"uid-{name}", "resourceVersion": "1",
                         "generation": 1}, "spec": {"schedule": "@daily", "job": {"function": "f"}}}


def test_a_policy_shows_whether_it_is_applied_and_is_written_once() -> None:
    now = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    body: dict[str, Any] = {"metadata": {"name": "p", "generation": 3}, "spec": {}}
    applied = policy_status(body, None, now)
    assert applied == {"observedGeneration": 3, "conditions": [{
        "type": "Ready", "status": "True", "reason": "Applied", "lastTransitionTime": "2026-12-02T10:00:00Z",
        "message": "the leader checks every SyncSchedule and ScrapeRequest against it", "observedGeneration": 3}]}
    assert policy_status({**body, "status": applied}, None, now + timedelta(minutes=5)) is None
    ignored = policy_status({**body, "status": applied}, "spec.queues: Field required", now + timedelta(minutes=5))
    assert ignored is not None
    assert ignored["conditions"] == [{
        "type": "Ready", "status": "False", "reason": "Invalid", "lastTransitionTime": "2026-12-02T10:05:00Z",
        "message": "ignored: spec.queues: Field required", "observedGeneration": 3}]


def test_a_policy_the_model_refuses_is_ignored_and_says_why() -> None:
    state = TenancyState(TenancyMode.NAMESPACED, {}, {})
    state.observe_policy("p", {"namespaces": {"names": ["team-a"]}})
    assert (state.policies, state.problems) == ({}, {"p": "spec.queues: Field required"})
    state.observe_policy("p", {"namespaces": {"names": ["team-a"]}, "queues": ["q"]})
    assert (list(state.policies), state.problems) == (["p"], {})


def test_a_policy_change_makes_every_object_dirty_and_a_relabelled_namespace_its_own() -> None:
    store = ResourceStore(tenancy=TenancyState(TenancyMode.NAMESPACED, {}, {}))
    for namespace, name in (("team-a", "one"), ("team-b", "two")):
        store.observe("SyncSchedule", "ADDED", schedule_body(namespace, name))
    store.observe("Namespace", "ADDED", {"metadata": {"name": "team-a", "labels": {"tier": "x"}}})
    store.dirty.clear()
    store.observe("QueuePolicy", "ADDED", {"metadata": {"name": "p"}, "spec": {
        "namespaces": {"names": ["team-a"]}, "queues": ["q"]}})
    after_policy = set(store.dirty)
    store.dirty.clear()
    store.observe("Namespace", "MODIFIED", {"metadata": {"name": "team-a", "labels": {"tier": "y"}}})
    after_relabel = set(store.dirty)
    store.dirty.clear()
    store.observe("Namespace", "MODIFIED", {"metadata": {"name": "team-a", "labels": {"tier": "y"}}})

    assert after_policy == {("SyncSchedule", "team-a", "one"), ("SyncSchedule", "team-b", "two")}
    assert after_relabel == {("SyncSchedule", "team-a", "one")}
    assert store.dirty == set()  # the same labels again: nothing to redo
    assert store.tenancy is not None
    assert list(store.tenancy.policies) == ["p"]


@pytest.mark.timeout(120)
async def test_whole_replicas_follow_a_label_selector_as_the_namespace_is_relabelled(
        k8s: KubernetesUnderTest, redis_url: str, serving_redis: ArqRedis) -> None:
    obj = await create(k8s, "sync", {"schedule": "* * * * *", "startingDeadlineSeconds": 30})
    await k8s.create_cluster_object(QUEUE_POLICIES, {
        "apiVersion": QUEUE_POLICIES.api_version, "kind": "QueuePolicy", "metadata": {"name": f"{k8s.namespace}-sel"},
        "spec": {"namespaces": {"matchLabels": {"kubearq-test/syncs": "allowed"}}, "queues": ["arq:queue"],
                 "functions": ["sync_*"]}})
    clock = ShiftedClock()
    tick = created_at(obj).replace(second=0, microsecond=0) + timedelta(minutes=1)
    async with replicas(k8s, redis_url, clock, ("solo",), tenancy="namespaced"):
        await until(lambda: _holder_is(k8s, "solo"), what="leadership")
        await until(lambda: _ready_reason(k8s, "NotPermitted"), what="the schedule refused")
        await until(lambda: _policy_ready(k8s, f"{k8s.namespace}-sel"), what="the policy's Ready=True Applied")
        await k8s.api.patch(NAMESPACES, k8s.namespace, {"metadata": {"labels": {"kubearq-test/syncs": "allowed"}}},
                            timeout=T)
        clock.offset = tick + timedelta(seconds=1) - datetime.now(UTC)
        await until(lambda: _queued(serving_redis, 1), within=20, what="the tick once the namespace is selected")
        await k8s.api.patch(NAMESPACES, k8s.namespace, {"metadata": {"labels": {"kubearq-test/syncs": None}}},
                            timeout=T)
        await until(lambda: _ready_reason(k8s, "NotPermitted"), what="the schedule refused again")
        clock.offset += timedelta(minutes=1)
        await until(lambda: _ready_reason(k8s, "NotPermitted"), what="still refused at the next tick")
    assert await serving_redis.zcard("arq:queue") == 1


async def _policy_ready(k8s: KubernetesUnderTest, name: str) -> bool:
    status = status_of(await k8s.api.get(QUEUE_POLICIES, name, timeout=T))
    return status.get("observedGeneration") == 1 and any(
        (c["type"], c["status"], c["reason"]) == ("Ready", "True", "Applied") for c in status.get("conditions", []))


async def _holder_is(k8s: KubernetesUnderTest, identity: str) -> bool:
    return await lease_holder(k8s) == identity


async def _ready_reason(k8s: KubernetesUnderTest, reason: str) -> bool:
    obj = await k8s.api.get(SYNC_SCHEDULES, "sync", namespace=k8s.namespace, timeout=T)
    return any(c.get("type") == "Ready" and c.get("reason") == reason for c in status_of(obj).get("conditions", []))


async def _queued(redis: ArqRedis, count: int) -> bool:
    return bool(await redis.zcard("arq:queue") >= count)
