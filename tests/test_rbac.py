"""The operator's RBAC is enough, not just small: on a real kube-apiserver, logged in as a ServiceAccount
holding only `kubearq.operator.rbac`'s rules (tenancy's too: it watches QueuePolicies and namespaces), it leads,
fires a tick a QueuePolicy permits, writes status and releases a deleted ScrapeRequest through its finalizer,
with no 403 and no error anywhere in its log."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from arq.connections import ArqRedis

from kubearq.operator import kube
from kubearq.operator.context import FINALIZER, QUEUE_POLICIES, SCRAPE_REQUESTS, SYNC_SCHEDULES
from kubearq.operator.main import default_reconcilers
from kubearq.operator.rbac import lease_rules, operator_rules, tenancy_rules
from kubearq.operator.settings import OperatorSettings
from tests.kubernetes import KubernetesUnderTest
from tests.test_operator import ShiftedClock, eventually, lease_holder, replicas

T = 10.0
pytestmark = pytest.mark.cluster


async def test_the_operator_runs_on_exactly_its_rbac_without_a_403(
        k8s: KubernetesUnderTest, redis_url: str, serving_redis: ArqRedis, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    login = await k8s.login_as_service_account(
        "kubearq-operator", [*operator_rules(), *tenancy_rules(), *lease_rules(OperatorSettings().lease_name)])
    await k8s.create_cluster_object(QUEUE_POLICIES, {  # TENANCY=namespaced, the default: the namespace needs one
        "apiVersion": QUEUE_POLICIES.api_version, "kind": "QueuePolicy", "metadata": {"name": f"{k8s.namespace}"},
        "spec": {"namespaces": {"names": [k8s.namespace]}, "queues": ["arq:queue"], "functions": ["sync_connections"],
                 "scrapeRequests": {}}})
    schedule = await k8s.api.create(SYNC_SCHEDULES, {
        "apiVersion": SYNC_SCHEDULES.api_version, "kind": "SyncSchedule", "metadata": {"name": "minutely"},
        "spec": {"schedule": "* * * * *", "job": {"function": "sync_connections"}}}, namespace=k8s.namespace, timeout=T)
    await k8s.api.create(kube.Resource("", "v1", "configmaps"), {
        "metadata": {"name": "pages"}, "data": {"urls": "https://events.example/page/1\n"}},
        namespace=k8s.namespace, timeout=T)
    await k8s.api.create(SCRAPE_REQUESTS, {
        "apiVersion": SCRAPE_REQUESTS.api_version, "kind": "ScrapeRequest", "metadata": {"name": "events"},
        "spec": {"urlsFrom": {"configMapKeyRef": {"name": "pages", "key": "urls"}}}}, namespace=k8s.namespace,
        timeout=T)
    created = datetime.fromisoformat(str(schedule["metadata"]["creationTimestamp"]))
    clock = ShiftedClock()

    async with replicas(k8s, redis_url, clock, ("solo",), connection=login.connection,
                        reconcilers=default_reconcilers(), tenancy="namespaced"):
        await eventually(lambda: _holder_is(k8s, "solo"), what="leadership")
        scrape = await eventually(lambda: _scrape_started(k8s), what="the ScrapeRequest's finalizer and status")
        clock.offset = created.replace(second=0) + timedelta(minutes=1, seconds=1) - datetime.now(UTC)
        status = await eventually(lambda: _scheduled(k8s), what="the tick recorded in status")
        queued = await serving_redis.zcard("arq:queue")  # the tick's job and the listing page
        await k8s.api.delete(SCRAPE_REQUESTS, "events", namespace=k8s.namespace, timeout=T)
        await eventually(lambda: _gone(k8s), what="the ScrapeRequest released by the finalizer")

    assert scrape["status"]["listingPages"]["total"] == 1
    assert status["activeCount"] == 1
    assert (queued, await serving_redis.zcard("arq:queue")) == (2, 1)  # the deletion aborted the listing page
    refused = [record.getMessage() for record in caplog.records
               # a port such as 40337 holds "403" too: whole numbers only
               if record.levelno >= logging.ERROR or re.search(r"\b403\b|Forbidden", record.getMessage())]
    assert refused == []


async def _holder_is(k8s: KubernetesUnderTest, identity: str) -> bool:
    return await lease_holder(k8s) == identity


async def _scrape_started(k8s: KubernetesUnderTest) -> kube.KubeObject | None:
    obj = await k8s.api.get(SCRAPE_REQUESTS, "events", namespace=k8s.namespace, timeout=T)
    started = FINALIZER in obj["metadata"].get("finalizers", []) and obj.get("status", {}).get("startTime")
    return obj if started else None


async def _scheduled(k8s: KubernetesUnderTest) -> dict[str, object] | None:
    obj = await k8s.api.get(SYNC_SCHEDULES, "minutely", namespace=k8s.namespace, timeout=T)
    status = dict(obj.get("status") or {})
    return status if status.get("lastScheduleTime") else None


async def _gone(k8s: KubernetesUnderTest) -> bool:
    try:
        await k8s.api.get(SCRAPE_REQUESTS, "events", namespace=k8s.namespace, timeout=T)
    except kube.NotFoundError:
        return True
    return False


async def test_an_operator_that_may_not_list_what_it_watches_is_not_ready_and_says_why(
        k8s: KubernetesUnderTest, redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    rules = [rule for rule in operator_rules() if "list" not in rule.get("verbs", [])]
    rules.append({"apiGroups": ["kubearq.dev"], "resources": ["syncschedules"], "verbs": ["get", "list", "watch"]})
    login = await k8s.login_as_service_account("half-blind", [*rules, *lease_rules(OperatorSettings().lease_name)])

    async with replicas(k8s, redis_url, ShiftedClock(), ("blind",), connection=login.connection) as running:
        answer = await eventually(lambda: _readyz(running["blind"].port), what="a readiness answer")
        assert answer == (503, "failing: objects-listed, kubernetes-access\n")
    refusals = [record.getMessage() for record in caplog.records if record.name == "kubearq.operator.access"]
    assert refusals[0].startswith(f"cannot list scraperequests in namespace {k8s.namespace} (403 Forbidden: "
                                  f'scraperequests.kubearq.dev is forbidden: User "{login.username}" cannot list')
    assert refusals[0].endswith("kopf cannot watch them either, so this replica is not ready until it can")
    assert len(refusals) == 1  # said once, not on every round


async def _readyz(port: int) -> tuple[int, str] | None:
    async with httpx.AsyncClient() as client:
        try:
            response = await client.get(f"http://127.0.0.1:{port}/readyz")
        except httpx.TransportError:
            return None
    return None if "kubernetes-access" not in response.text else (response.status_code, response.text)
