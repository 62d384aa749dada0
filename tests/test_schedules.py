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
from hypothesis import given, settings
from hypothesis import strategies as st

from kubearq.operator.actions import BACKFILL_ANNOTATION, TRIGGER_ANNOTATION, Ask, BackfillAsk, annotation_patch
from kubearq.operator.context import SYNC_SCHEDULES, OperatorContext, rfc3339
from kubearq.operator.cron import iter_ticks
from kubearq.operator.kube import EVENTS, KubeObject
from kubearq.operator.leader import NotLeaderError
from kubearq.operator.metrics import OperatorMetrics
from kubearq.operator.scheduler import manual_job_id, plan_backfill, tick_job_id
from kubearq.operator.schedules import advance_schedule, keep_history, reconcile_schedule
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


# --- Asks: trigger and backfill (kubearq.operator.actions) ------------------------------------------------------


async def ask(k8s: KubernetesUnderTest, name: str, annotation: str, value: Ask) -> None:
    await k8s.api.patch(SYNC_SCHEDULES, name, annotation_patch(annotation, value), namespace=k8s.namespace, timeout=10)


def trigger_ask(ask_id: str = "20261124T100030-0000beef") -> Ask:
    return Ask(id=ask_id, requested_at=T0, requested_by="alice")


def backfill_ask(start: datetime, end: datetime, ask_id: str = "20261124T100030-0000f111") -> BackfillAsk:
    return BackfillAsk(id=ask_id, requested_at=T0, start=start, end=end)


async def event_reasons(k8s: KubernetesUnderTest) -> list[tuple[str, str, str]]:
    events = await k8s.api.list(EVENTS, namespace=k8s.namespace, timeout=10)
    return [(str(e.get("type")), str(e.get("reason")), str(e.get("message"))) for e in events.items]


async def test_a_trigger_enqueues_one_manual_run_once(k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    obj = await create(k8s, "yearly", {"schedule": "0 0 1 1 *"})
    ctx = context(k8s, redis, Clock(T0))
    await ask(k8s, "yearly", TRIGGER_ANNOTATION, trigger_ask())

    after = await reconcile(ctx, k8s, "yearly")
    again = await reconcile(ctx, k8s, "yearly")

    job_id = manual_job_id(str(obj["metadata"]["uid"]), "20261124T100030-0000beef")
    assert await queued_ids(redis) == [job_id]
    stored = json.loads(await redis.get(f"arq:job:{job_id}"))
    assert (stored["f"], stored["k"]) == ("sync_connections", {"mode": "realtime"})
    assert status_of(after)["lastTrigger"] == {
        "id": "20261124T100030-0000beef", "outcome": "Done", "handledTime": rfc3339(T0), "requestedBy": "alice",
        "jobId": job_id, "message": f"enqueued job {job_id} on queue arq:queue"}
    [run] = status_of(after)["runs"]
    assert (run["jobId"], run["trigger"], run["outcome"]) == (job_id, "Manual", "Queued")
    assert status_of(again) == status_of(after)
    assert ("Normal", "Triggered", f"enqueued job {job_id} on queue arq:queue") in await event_reasons(k8s)


async def test_a_trigger_with_forbid_is_refused_while_a_run_is_active(k8s: KubernetesUnderTest,
                                                                      redis: ArqRedis) -> None:
    obj = await create(k8s, "forbid", {"schedule": "* * * * *", "concurrencyPolicy": "Forbid"})
    clock = Clock(created_at(obj).replace(second=0, microsecond=0) + timedelta(minutes=1, seconds=1))
    ctx = context(k8s, redis, clock)
    await reconcile(ctx, k8s, "forbid")  # the tick's run is queued
    await ask(k8s, "forbid", TRIGGER_ANNOTATION, trigger_ask())

    after = await reconcile(ctx, k8s, "forbid")

    tick = tick_job_id(str(obj["metadata"]["uid"]), clock.moment.replace(second=0))
    message = (f"not triggered: concurrencyPolicy is Forbid and 1 run(s) are still queued or running ({tick}); "
               "trigger again once they finish")
    assert await queued_ids(redis) == [tick]
    assert {key: status_of(after)["lastTrigger"][key] for key in ("outcome", "message")} == {
        "outcome": "Refused", "message": message}
    assert ("Warning", "TriggerRefused", message) in await event_reasons(k8s)


async def test_a_trigger_with_replace_aborts_the_active_run(k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    obj = await create(k8s, "replace", {"schedule": "* * * * *", "concurrencyPolicy": "Replace"})
    clock = Clock(created_at(obj).replace(second=0, microsecond=0) + timedelta(minutes=1, seconds=1))
    ctx = context(k8s, redis, clock)
    await reconcile(ctx, k8s, "replace")
    await ask(k8s, "replace", TRIGGER_ANNOTATION, trigger_ask())

    after = await reconcile(ctx, k8s, "replace")

    uid = str(obj["metadata"]["uid"])
    manual = manual_job_id(uid, "20261124T100030-0000beef")
    assert await queued_ids(redis) == [manual]
    outcomes = {run["jobId"]: (run["trigger"], run["outcome"]) for run in status_of(after)["runs"]}
    assert outcomes == {tick_job_id(uid, clock.moment.replace(second=0)): ("Scheduled", "Aborted"),
                        manual: ("Manual", "Queued")}


async def test_a_trigger_a_dead_leader_enqueued_but_never_recorded_is_enqueued_once(
        k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    obj = await create(k8s, "yearly", {"schedule": "0 0 1 1 *"})
    await ask(k8s, "yearly", TRIGGER_ANNOTATION, trigger_ask())
    await advance_schedule(context(k8s, redis, Clock(T0)), await fetch(k8s, "yearly"))  # enqueued, not written

    after = await reconcile(context(k8s, redis, Clock(T0 + timedelta(seconds=5))), k8s, "yearly")

    job_id = manual_job_id(str(obj["metadata"]["uid"]), "20261124T100030-0000beef")
    assert await queued_ids(redis) == [job_id]
    assert (status_of(after)["lastTrigger"]["outcome"], len(status_of(after)["runs"])) == ("Done", 1)


async def test_a_trigger_of_a_suspended_schedule_runs_as_kubectl_create_job_from_does(
        k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    await create(k8s, "paused", {"schedule": "* * * * *", "suspend": True})
    await ask(k8s, "paused", TRIGGER_ANNOTATION, trigger_ask())

    after = await reconcile(context(k8s, redis, Clock(T0)), k8s, "paused")

    assert len(await queued_ids(redis)) == 1
    assert status_of(after)["lastTrigger"]["outcome"] == "Done"
    assert status_of(after)["conditions"][0]["reason"] == "Suspended"


async def test_an_unreadable_ask_is_refused_once_with_what_is_wrong(k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    await create(k8s, "yearly", {"schedule": "0 0 1 1 *"})
    await k8s.api.patch(SYNC_SCHEDULES, "yearly", {"metadata": {"annotations": {TRIGGER_ANNOTATION: "now please"}}},
                        namespace=k8s.namespace, timeout=10)
    ctx = context(k8s, redis, Clock(T0))

    after = await reconcile(ctx, k8s, "yearly")
    await reconcile(ctx, k8s, "yearly")

    record = status_of(after)["lastTrigger"]
    assert record["outcome"] == "Refused"
    assert record["id"].startswith("unreadable-")
    assert record["message"].startswith("annotation kubearq.dev/trigger is not a valid request (value: Invalid JSON")
    assert await queued_ids(redis) == []
    assert [reason for _, reason, _ in await event_reasons(k8s)] == ["TriggerRefused"]


async def test_a_backfill_enqueues_each_past_tick_of_the_window_once(k8s: KubernetesUnderTest,
                                                                     redis: ArqRedis) -> None:
    obj = await create(k8s, "quarterly", {"schedule": "*/15 * * * *", "suspend": True})
    start, end = datetime(2026, 11, 23, 9, 0, tzinfo=UTC), datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    ctx = context(k8s, redis, Clock(T0))
    await ask(k8s, "quarterly", BACKFILL_ANNOTATION, backfill_ask(start, end))

    first = await reconcile(ctx, k8s, "quarterly")
    await ask(k8s, "quarterly", BACKFILL_ANNOTATION, backfill_ask(start - timedelta(minutes=30), end, "again"))
    second = await reconcile(ctx, k8s, "quarterly")

    uid = str(obj["metadata"]["uid"])
    ticks = [start + timedelta(minutes=minutes) for minutes in (0, 15, 30, 45)]
    earlier = [start - timedelta(minutes=minutes) for minutes in (30, 15)]
    assert sorted(await queued_ids(redis)) == sorted(tick_job_id(uid, tick) for tick in [*earlier, *ticks])
    record = status_of(first)["lastBackfill"]
    assert (record["outcome"], record["ticks"], record["enqueued"], record["from"], record["to"]) == (
        "Done", 4, 4, rfc3339(start), rfc3339(end))
    assert record["message"] == "4 of the 4 tick(s) in [2026-11-23T09:00:00Z, 2026-11-23T10:00:00Z) enqueued on " \
                                "queue arq:queue"
    assert {run["trigger"] for run in status_of(first)["runs"]} == {"Backfill"}
    repeat = status_of(second)["lastBackfill"]
    assert (repeat["ticks"], repeat["enqueued"]) == (6, 2)
    assert repeat["message"].endswith("; 4 enqueued before")


async def test_a_backfill_over_a_tick_the_schedule_enqueued_does_not_enqueue_it_again(
        k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    obj = await create(k8s, "minutely", {"schedule": "* * * * *"})
    tick = created_at(obj).replace(second=0, microsecond=0) + timedelta(minutes=1)
    ctx = context(k8s, redis, Clock(tick + timedelta(seconds=1)))
    await reconcile(ctx, k8s, "minutely")  # the schedule's own tick
    await ask(k8s, "minutely", BACKFILL_ANNOTATION, backfill_ask(tick - timedelta(minutes=2), tick + timedelta(
        minutes=1)))

    after = await reconcile(ctx, k8s, "minutely")

    assert len(await queued_ids(redis)) == 3
    record = status_of(after)["lastBackfill"]
    assert (record["ticks"], record["enqueued"]) == (3, 2)


async def test_a_backfill_of_more_than_a_thousand_ticks_is_refused(k8s: KubernetesUnderTest,
                                                                   redis: ArqRedis) -> None:
    await create(k8s, "minutely", {"schedule": "* * * * *", "suspend": True})
    start = datetime(2026, 11, 20, tzinfo=UTC)
    await ask(k8s, "minutely", BACKFILL_ANNOTATION, backfill_ask(start, start + timedelta(days=1)))

    after = await reconcile(context(k8s, redis, Clock(T0)), k8s, "minutely")

    assert status_of(after)["lastBackfill"]["message"] == (
        "the backfill window [2026-11-20T00:00:00Z, 2026-11-21T00:00:00Z) holds more than 1000 ticks of "
        "'* * * * *'; backfill at most 1000 at a time (split the window)")
    assert status_of(after)["lastBackfill"]["outcome"] == "Refused"
    assert await queued_ids(redis) == []


def test_a_backfill_window_across_spring_forward_fires_the_skipped_tick_once() -> None:
    plan = plan_backfill("30 2 * * *", "America/New_York", datetime(2026, 3, 7, 5, tzinfo=UTC),
                         datetime(2026, 3, 10, 5, tzinfo=UTC), T0)
    assert plan.ticks == [datetime(2026, 3, 7, 7, 30, tzinfo=UTC), datetime(2026, 3, 8, 7, 0, tzinfo=UTC),
                          datetime(2026, 3, 9, 6, 30, tzinfo=UTC)]


def test_a_backfill_leaves_future_ticks_to_the_schedule() -> None:
    plan = plan_backfill("0 * * * *", "UTC", T0 - timedelta(hours=2), T0 + timedelta(hours=2), T0)
    assert plan.ticks == [T0.replace(minute=0, second=0) - timedelta(hours=hours) for hours in (1, 0)]
    assert plan_backfill("0 * * * *", "UTC", T0 + timedelta(hours=1), T0 + timedelta(hours=2), T0).refusal == (
        "the backfill window [2026-11-24T11:00:30Z, 2026-11-24T12:00:30Z) starts in the future: a backfill "
        "enqueues past ticks; the schedule enqueues future ones itself")


@settings(max_examples=50, deadline=None)
@given(schedule=st.sampled_from(["*/7 * * * *", "30 2 * * *", "0 */5 * * 1-5", "@hourly"]),
       zone=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York"]),
       start_minutes=st.integers(0, 400 * 24 * 60), length_minutes=st.integers(1, 5 * 24 * 60))
def test_a_backfill_plans_each_tick_of_its_window_once_in_order(schedule: str, zone: str, start_minutes: int,
                                                                length_minutes: int) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=start_minutes)
    end = start + timedelta(minutes=length_minutes)
    plan = plan_backfill(schedule, zone, start, end, now=datetime(2028, 1, 1, tzinfo=UTC))
    if plan.refusal is not None:
        assert "holds more than 1000 ticks" in plan.refusal
        return
    assert all(start <= tick < end for tick in plan.ticks)
    assert plan.ticks == sorted(set(plan.ticks))
    before = next(iter_ticks(schedule, zone, start - timedelta(days=40)))  # any tick in the window is found
    expected = [tick for tick in iter_until(schedule, zone, before - timedelta(minutes=1), end) if tick >= start]
    assert plan.ticks == expected


def iter_until(schedule: str, zone: str, after: datetime, end: datetime) -> list[datetime]:
    found: list[datetime] = []
    for tick in iter_ticks(schedule, zone, after):
        if tick >= end:
            return found
        found.append(tick)
    return found
