"""SyncSchedule reconciliation against the API emulator and a real Redis, on a controlled clock."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from arq.connections import ArqRedis

from kubearq.operator.context import SYNC_SCHEDULES, OperatorContext, rfc3339
from kubearq.operator.kube import EVENTS, KubeObject
from kubearq.operator.leader import NotLeaderError
from kubearq.operator.metrics import OperatorMetrics
from kubearq.operator.scheduler import tick_job_id
from kubearq.operator.schedules import keep_history, reconcile_schedule
from kubearq.operator.settings import OperatorSettings
from kubearq.operator.syncschedule import ScheduleRun
from kubearq.operator.validation import check_files
from tests.kubernetes import KubernetesUnderTest
from tests.scheduling import Clock

T0 = datetime(2026, 11, 24, 10, 0, 30, tzinfo=UTC)


@pytest.fixture
def redis(serving_redis: ArqRedis) -> ArqRedis:
    return serving_redis


def context(k8s: KubernetesUnderTest, redis: ArqRedis, clock: Clock, *, leader: bool = True) -> OperatorContext:
    def fence() -> None:
        if not leader:
            raise NotLeaderError("not the leader")

    return OperatorContext(api=k8s.api, redis=redis, metrics=OperatorMetrics(), ensure_leader=fence,
                           settings=OperatorSettings(status_interval=1.0), now=clock)


async def create(k8s: KubernetesUnderTest, name: str, spec: dict[str, Any],
                 status: dict[str, Any] | None = None) -> KubeObject:
    body = {"apiVersion": "kubearq.dev/v1alpha1", "kind": "SyncSchedule", "metadata": {"name": name},
            "spec": {"job": {"function": "sync_connections", "kwargs": {"mode": "realtime"}}, **spec}}
    created = await k8s.api.create(SYNC_SCHEDULES, body, namespace=k8s.namespace, timeout=10)
    if status is not None:
        created = await k8s.api.patch_status(SYNC_SCHEDULES, name, status, namespace=k8s.namespace, timeout=10)
    return created


async def fetch(k8s: KubernetesUnderTest, name: str) -> KubeObject:
    return await k8s.api.get(SYNC_SCHEDULES, name, namespace=k8s.namespace, timeout=10)


async def reconcile(ctx: OperatorContext, k8s: KubernetesUnderTest, name: str) -> KubeObject:
    await reconcile_schedule(ctx, await fetch(k8s, name))
    return await fetch(k8s, name)


def status_of(obj: KubeObject) -> dict[str, Any]:
    return cast(dict[str, Any], obj.get("status", {}))


def created_at(obj: KubeObject) -> datetime:
    return datetime.fromisoformat(str(obj["metadata"]["creationTimestamp"]).replace("Z", "+00:00"))


async def queued_ids(redis: ArqRedis) -> list[str]:
    return [job_id.decode() for job_id in await redis.zrange("arq:queue", 0, -1)]


async def test_a_due_tick_is_enqueued_once_and_recorded_in_status(k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    obj = await create(k8s, "every-minute", {"schedule": "* * * * *"})
    clock = Clock(created_at(obj).replace(second=0, microsecond=0) + timedelta(minutes=1, seconds=2))
    ctx = context(k8s, redis, clock)
    after = await reconcile(ctx, k8s, "every-minute")
    tick = clock.moment.replace(second=0)
    job_id = tick_job_id(str(obj["metadata"]["uid"]), tick)
    assert await queued_ids(redis) == [job_id]
    stored = json.loads(await redis.get(f"arq:job:{job_id}"))
    assert (stored["f"], stored["k"]) == ("sync_connections", {"mode": "realtime"})
    status = status_of(after)
    assert status["lastScheduleTime"] == rfc3339(tick)
    assert status["nextScheduleTime"] == rfc3339(tick + timedelta(minutes=1))
    assert (status["active"], status["activeCount"]) == ([job_id], 1)
    assert status["runs"][0]["outcome"] == "Queued"
    assert [c["reason"] for c in status["conditions"]] == ["Scheduled"]
    await reconcile(ctx, k8s, "every-minute")  # the same moment again: nothing new
    assert await queued_ids(redis) == [job_id]


async def test_two_leaders_at_once_enqueue_each_tick_once(k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    obj = await create(k8s, "contended", {"schedule": "* * * * *"})
    clock = Clock(created_at(obj).replace(second=0, microsecond=0) + timedelta(minutes=1, seconds=1))
    first, second = context(k8s, redis, clock), context(k8s, redis, clock)
    await asyncio.gather(reconcile_schedule(first, obj), reconcile_schedule(second, obj))
    assert len(await queued_ids(redis)) == 1
    duplicates = sum(ctx.metrics.duplicate_enqueues.labels(source="schedule")._value.get() for ctx in (first, second))
    assert duplicates == 1


async def test_a_new_leader_resumes_after_the_last_schedule_time(k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    obj = await create(k8s, "failover", {"schedule": "* * * * *"})
    start = created_at(obj).replace(second=0, microsecond=0)
    clock = Clock(start + timedelta(minutes=1, seconds=1))
    await reconcile(context(k8s, redis, clock), k8s, "failover")
    clock.moment += timedelta(minutes=1)
    await reconcile(context(k8s, redis, clock), k8s, "failover")  # a fresh context: no memory but the status
    ticks = [start + timedelta(minutes=minutes) for minutes in (1, 2)]
    assert await queued_ids(redis) == [tick_job_id(str(obj["metadata"]["uid"]), tick) for tick in ticks]


async def test_forbid_skips_tick_while_previous_run_active(k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    obj = await create(k8s, "forbid", {"schedule": "* * * * *", "concurrencyPolicy": "Forbid"})
    start = created_at(obj).replace(second=0, microsecond=0)
    clock = Clock(start + timedelta(minutes=1, seconds=1))
    ctx = context(k8s, redis, clock)
    await reconcile(ctx, k8s, "forbid")
    clock.moment += timedelta(minutes=1)
    after = await reconcile(ctx, k8s, "forbid")
    assert len(await queued_ids(redis)) == 1
    assert status_of(after)["skippedTicks"] == 1
    assert status_of(after)["lastScheduleTime"] == rfc3339(start + timedelta(minutes=2))
    events = await k8s.api.list(EVENTS, namespace=k8s.namespace, timeout=10)
    assert any(cast(dict[str, Any], event)["reason"] == "TickSkipped" for event in events.items)


async def test_replace_aborts_the_active_run_and_enqueues_the_new_tick(
    k8s: KubernetesUnderTest, redis: ArqRedis
) -> None:
    obj = await create(k8s, "replace", {"schedule": "* * * * *", "concurrencyPolicy": "Replace"})
    start = created_at(obj).replace(second=0, microsecond=0)
    clock = Clock(start + timedelta(minutes=1, seconds=1))
    ctx = context(k8s, redis, clock)
    await reconcile(ctx, k8s, "replace")
    clock.moment += timedelta(minutes=1)
    after = await reconcile(ctx, k8s, "replace")
    uid = str(obj["metadata"]["uid"])
    assert await queued_ids(redis) == [tick_job_id(uid, start + timedelta(minutes=2))]
    outcomes = {run["jobId"]: run["outcome"] for run in status_of(after)["runs"]}
    assert outcomes[tick_job_id(uid, start + timedelta(minutes=1))] == "Aborted"


async def test_allow_lets_runs_overlap(k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    obj = await create(k8s, "allow", {"schedule": "* * * * *"})
    clock = Clock(created_at(obj).replace(second=0, microsecond=0) + timedelta(minutes=1, seconds=1))
    ctx = context(k8s, redis, clock)
    await reconcile(ctx, k8s, "allow")
    clock.moment += timedelta(minutes=1)
    after = await reconcile(ctx, k8s, "allow")
    assert status_of(after)["activeCount"] == 2


async def test_catch_up_enqueues_ticks_within_the_deadline_and_counts_the_rest(
    k8s: KubernetesUnderTest, redis: ArqRedis
) -> None:
    last = T0.replace(second=0)
    obj = await create(k8s, "catch-up", {"schedule": "* * * * *", "startingDeadlineSeconds": 300},
                       {"lastScheduleTime": rfc3339(last)})
    clock = Clock(last + timedelta(minutes=10, seconds=5))  # ten ticks missed during downtime
    after = await reconcile(context(k8s, redis, clock), k8s, "catch-up")
    uid = str(obj["metadata"]["uid"])
    expected = [tick_job_id(uid, last + timedelta(minutes=minutes)) for minutes in range(6, 11)]
    assert sorted(await queued_ids(redis)) == sorted(expected)
    assert (status_of(after)["missedTicks"], status_of(after)["lastScheduleTime"]) == (
        5, rfc3339(last + timedelta(minutes=10)))


async def test_without_a_deadline_only_the_latest_missed_tick_runs(k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    last = T0.replace(second=0)
    await create(k8s, "no-deadline", {"schedule": "* * * * *"}, {"lastScheduleTime": rfc3339(last)})
    after = await reconcile(context(k8s, redis, Clock(last + timedelta(minutes=10, seconds=5))), k8s, "no-deadline")
    assert len(await queued_ids(redis)) == 1
    assert status_of(after)["missedTicks"] == 9


async def test_suspend_stops_new_runs_and_resume_catches_up_within_the_deadline(
    k8s: KubernetesUnderTest, redis: ArqRedis
) -> None:
    last = T0.replace(second=0)
    await create(k8s, "paused", {"schedule": "* * * * *", "suspend": True, "startingDeadlineSeconds": 120},
                 {"lastScheduleTime": rfc3339(last)})
    clock = Clock(last + timedelta(minutes=3, seconds=1))
    ctx = context(k8s, redis, clock)
    suspended = await reconcile(ctx, k8s, "paused")
    assert await queued_ids(redis) == []
    assert status_of(suspended)["conditions"][0]["reason"] == "Suspended"
    assert status_of(suspended).get("nextScheduleTime") is None
    await k8s.api.patch(SYNC_SCHEDULES, "paused", {"spec": {"suspend": False}}, namespace=k8s.namespace, timeout=10)
    resumed = await reconcile(ctx, k8s, "paused")
    assert len(await queued_ids(redis)) == 2  # minutes 2 and 3 are within the 120 s deadline
    assert status_of(resumed)["conditions"][0]["reason"] == "Scheduled"


async def test_spring_forward_tick_in_the_gap_fires_once_at_the_end_of_the_gap(
    k8s: KubernetesUnderTest, redis: ArqRedis
) -> None:
    last = datetime(2026, 3, 7, 7, 30, tzinfo=UTC)  # 02:30 EST the day before
    obj = await create(k8s, "dst", {"schedule": "30 2 * * *", "timeZone": "America/New_York",
                                    "startingDeadlineSeconds": 3600}, {"lastScheduleTime": rfc3339(last)})
    clock = Clock(datetime(2026, 3, 8, 7, 0, 5, tzinfo=UTC))  # 03:00:05 EDT: 02:30 did not exist today
    await reconcile(context(k8s, redis, clock), k8s, "dst")
    assert await queued_ids(redis) == [tick_job_id(str(obj["metadata"]["uid"]), datetime(2026, 3, 8, 7, 0, tzinfo=UTC))]
    clock.moment = datetime(2026, 3, 8, 7, 45, tzinfo=UTC)
    await reconcile(context(k8s, redis, clock), k8s, "dst")
    assert len(await queued_ids(redis)) == 1  # not again within the day


async def test_fall_back_tick_in_the_repeated_hour_fires_once(k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    last = datetime(2026, 10, 31, 5, 30, tzinfo=UTC)  # 01:30 EDT the day before
    await create(k8s, "fallback", {"schedule": "30 1 * * *", "timeZone": "America/New_York",
                                   "startingDeadlineSeconds": 3600}, {"lastScheduleTime": rfc3339(last)})
    clock = Clock(datetime(2026, 11, 1, 5, 30, 5, tzinfo=UTC))  # 01:30 EDT
    for _ in range(4):  # through the second 01:30 (EST, 06:30 UTC) and beyond
        await reconcile(context(k8s, redis, clock), k8s, "fallback")
        clock.moment += timedelta(minutes=30)
    assert len(await queued_ids(redis)) == 1


async def test_outcomes_are_read_from_arq_results(k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    obj = await create(k8s, "outcome", {"schedule": "* * * * *", "failedRunsHistoryLimit": 2})
    clock = Clock(created_at(obj).replace(second=0, microsecond=0) + timedelta(minutes=1, seconds=1))
    ctx = context(k8s, redis, clock)
    first = await reconcile(ctx, k8s, "outcome")
    job_id = status_of(first)["active"][0]
    finished = int(clock.moment.timestamp() * 1000) + 500
    result = {"s": False, "r": {"error": "KeyError: 'acct'"}, "ft": finished}
    await redis.set(f"arq:result:{job_id}", json.dumps(result))
    await redis.zrem("arq:queue", job_id)
    after = await reconcile(ctx, k8s, "outcome")
    run = status_of(after)["runs"][0]
    assert (run["outcome"], run["error"], status_of(after)["activeCount"]) == ("Failed", "KeyError: 'acct'", 0)


async def test_invalid_schedule_gets_a_condition_not_a_crash(k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    await create(k8s, "typo", {"schedule": "61 * * * *"})
    after = await reconcile(context(k8s, redis, Clock(T0)), k8s, "typo")
    condition = status_of(after)["conditions"][0]
    assert (condition["status"], condition["reason"]) == ("False", "InvalidSchedule")
    assert condition["message"].startswith("spec.schedule: '61 * * * *' is not a valid cron expression (bad minute)")
    assert await queued_ids(redis) == []


async def test_the_operator_says_of_a_stored_schedule_what_kubearq_validate_says_of_the_file(
        k8s: KubernetesUnderTest, redis: ArqRedis, tmp_path: Path) -> None:
    obj = await create(k8s, "typo", {"schedule": "0 3 * *", "timeZone": "Mars/Olympus"})
    after = await reconcile(context(k8s, redis, Clock(T0)), k8s, "typo")
    manifest = tmp_path / "typo.yaml"
    manifest.write_text(yaml.safe_dump({key: obj[key] for key in ("apiVersion", "kind", "spec")}
                                       | {"metadata": {"name": "typo"}}))
    [checked] = check_files([manifest]).documents
    assert status_of(after)["conditions"][0]["message"] == "; ".join(str(problem) for problem in checked.problems)
    assert len(checked.problems) == 2  # the cron expression and the time zone, both at once


async def test_a_function_no_worker_serves_is_reported(k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    obj = await create(k8s, "unserved", {"schedule": "* * * * *", "job": {"function": "sync_conections"}})
    clock = Clock(created_at(obj).replace(second=0, microsecond=0) + timedelta(minutes=1, seconds=1))
    after = await reconcile(context(k8s, redis, clock), k8s, "unserved")
    condition = status_of(after)["conditions"][0]
    assert (condition["status"], condition["reason"]) == ("False", "FunctionUnknown")
    assert "'sync_conections'" in condition["message"]


async def test_a_replica_that_is_not_the_leader_writes_nothing(k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    obj = await create(k8s, "standby", {"schedule": "* * * * *"})
    clock = Clock(created_at(obj).replace(second=0, microsecond=0) + timedelta(minutes=1, seconds=1))
    with pytest.raises(NotLeaderError):
        await reconcile_schedule(context(k8s, redis, clock, leader=False), obj)
    assert await queued_ids(redis) == []
    assert (await fetch(k8s, "standby")).get("status", {}).get("runs", []) == []


def test_only_the_newest_hundred_active_runs_are_tracked() -> None:
    runs = [ScheduleRun(job_id=f"j{n}", scheduled_time=T0 + timedelta(minutes=n)) for n in range(150)]
    kept = keep_history(runs, successful=3, failed=1)
    assert [run.job_id for run in kept] == [f"j{n}" for n in range(149, 49, -1)]
