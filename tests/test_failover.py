"""Leaders killed mid-action, two leaders at once: every tick enqueued exactly once, checked on a ledger."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from arq.connections import ArqRedis

from kubearq.core.connections import create_redis
from kubearq.operator.context import SYNC_SCHEDULES, OperatorContext
from kubearq.operator.kube import ApiError, KubeApi, KubeObject, Resource
from kubearq.operator.metrics import OperatorMetrics
from kubearq.operator.scheduler import tick_job_id
from kubearq.operator.schedules import reconcile_schedule
from kubearq.operator.settings import OperatorSettings
from tests.kubernetes import KubernetesUnderTest


class DiesBeforeStatus:
    """An API whose status writes fail: a leader killed after enqueueing, before recording it."""

    def __init__(self, api: KubeApi) -> None:
        self._api = api

    async def patch_status(self, resource: Resource, name: str, status: Mapping[str, object], **_: Any) -> KubeObject:
        raise ApiError(503, "ServiceUnavailable", "the leader died before its status write")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._api, name)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    client = create_redis(redis_url)
    yield client
    await client.aclose()


async def run_failovers(k8s: KubernetesUnderTest, redis: ArqRedis, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    body = {"apiVersion": "kubearq.dev/v1alpha1", "kind": "SyncSchedule", "metadata": {"name": "ledger"},
            "spec": {"schedule": "* * * * *", "startingDeadlineSeconds": 3600,
                     "job": {"function": "sync_connections"}}}
    created = await k8s.api.create(SYNC_SCHEDULES, body, namespace=k8s.namespace, timeout=10)
    uid = str(created["metadata"]["uid"])
    start = datetime.fromisoformat(str(created["metadata"]["creationTimestamp"]).replace("Z", "+00:00"))
    moment = [start]
    replicas = [OperatorContext(api=k8s.api, redis=redis, metrics=OperatorMetrics(), ensure_leader=lambda: None,
                                settings=OperatorSettings(), now=lambda: moment[0]) for _ in range(3)]
    dying = [OperatorContext(api=DiesBeforeStatus(k8s.api), redis=redis, metrics=OperatorMetrics(),  # type: ignore[arg-type]
                             ensure_leader=lambda: None, settings=OperatorSettings(), now=lambda: moment[0])
             for _ in range(3)]
    for _ in range(rounds):
        moment[0] += timedelta(seconds=rng.randint(10, 150))
        current = await k8s.api.get(SYNC_SCHEDULES, "ledger", namespace=k8s.namespace, timeout=10)
        fate = rng.random()
        if fate < 0.4:
            with contextlib.suppress(ApiError):  # killed mid-action: whatever it was doing ends there
                await reconcile_schedule(rng.choice(dying), current)
        elif fate < 0.6:
            first, second = rng.sample(replicas, 2)  # two leaders at once (a partition)
            await asyncio.gather(reconcile_schedule(first, current), reconcile_schedule(second, current))
        else:
            await reconcile_schedule(rng.choice(replicas), current)
    final = await k8s.api.get(SYNC_SCHEDULES, "ledger", namespace=k8s.namespace, timeout=10)
    await reconcile_schedule(replicas[0], final)  # a healthy leader at the end

    first_tick = start.replace(second=0, microsecond=0) + timedelta(minutes=1)
    last_tick = moment[0].replace(second=0, microsecond=0)
    expected = {tick_job_id(uid, first_tick + timedelta(minutes=n))
                for n in range(int((last_tick - first_tick).total_seconds() // 60) + 1)}
    queued = {job_id.decode() for job_id in await redis.zrange("arq:queue", 0, -1)}
    assert queued == expected, f"missed {sorted(expected - queued)[:5]}, unexpected {sorted(queued - expected)[:5]}"
    enqueued = sum(ctx.metrics.enqueued.labels(source="schedule", queue="arq:queue")._value.get()
                   for ctx in (*replicas, *dying))
    assert enqueued == len(expected)  # every enqueue that went through was a new tick


async def test_twenty_leader_kills_enqueue_every_tick_exactly_once(k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    await run_failovers(k8s, redis, rounds=20, seed=20)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_soak_five_hundred_leader_kills(k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    await run_failovers(k8s, redis, rounds=500, seed=500)


def test_ticks_are_utc_whole_minutes() -> None:
    assert tick_job_id("u", datetime(2026, 1, 1, 0, 1, tzinfo=UTC)) == "kubearq:tick:u:1767225660"
