"""`kubearq schedule list|get|trigger|suspend|resume|preview|backfill` as a user meets it, through the real
`main([...])` on the `k8s` API (the emulator, or a real kube-apiserver) and a real Redis, with the operator's
leader acting on what the CLI asks: what it prints, the exit codes, and a clear message for every bad input."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml
from arq.connections import ArqRedis

from kubearq.cli import main
from kubearq.commands._cluster import refusal
from kubearq.operator.actions import TRIGGER_ANNOTATION, Ask, annotation_patch
from kubearq.operator.context import SCRAPE_REQUESTS, SYNC_SCHEDULES, OperatorContext
from kubearq.operator.kube import ApiError, KubeObject, Resource
from kubearq.operator.main import default_reconcilers
from kubearq.operator.metrics import OperatorMetrics
from kubearq.operator.rbac import operator_user_rules
from kubearq.operator.scheduler import manual_job_id, tick_job_id
from kubearq.operator.schedules import reconcile_schedule
from kubearq.operator.scrapedecisions import StatusPacer
from kubearq.operator.scrapes import reconcile_scrape_request
from kubearq.operator.settings import OperatorSettings
from kubearq.operator.store import passing
from tests.crd_rules import REPO
from tests.kubernetes import KubernetesUnderTest
from tests.polling import until
from tests.test_operator import ShiftedClock, lease_holder, replicas

T = 10.0


@dataclass(frozen=True)
class Said:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)


Cli = Callable[..., Coroutine[Any, Any, Said]]
"""The `kubearq` fixture: `await kubearq("schedule", "list")` runs `kubearq schedule list`."""


@pytest.fixture
def kubearq(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, k8s: KubernetesUnderTest,
            redis_url: str) -> Cli:
    """The CLI logged in as the test's admin through KUBECONFIG, in the test's namespace, on the test's Redis."""
    monkeypatch.setenv("KUBECONFIG", str(k8s.kubeconfig))
    monkeypatch.setenv("REDIS_URL", redis_url)

    async def run(*args: str) -> Said:
        # In a thread of its own: `main` runs its own event loop, as it does from a shell.
        code = await asyncio.to_thread(main, list(args))
        said = capsys.readouterr()
        return Said(code, said.out, said.err)

    return run


async def cli_without_cluster(capsys: pytest.CaptureFixture[str], *args: str) -> Said:
    code = await asyncio.to_thread(main, list(args))
    said = capsys.readouterr()
    return Said(code, said.out, said.err)


def with_kind(kind: str, resource: Resource, obj: KubeObject) -> KubeObject:
    """A listed item as the watch delivers it (list items carry no apiVersion and kind)."""
    return {"apiVersion": resource.api_version, "kind": kind, **obj}


@contextlib.asynccontextmanager
async def leading(k8s: KubernetesUnderTest, redis: ArqRedis) -> AsyncIterator[OperatorContext]:
    """The leader's reconcilers, in a loop over the namespace's objects on the real clock (what `lead` does, minus
    the Lease and kopf, which tests/test_operator.py covers): it acts on what the CLI asks while the CLI waits."""
    ctx = OperatorContext(api=k8s.api, redis=redis, metrics=OperatorMetrics(), ensure_leader=lambda: None,
                          settings=OperatorSettings(status_interval=0.2))
    pacer = StatusPacer()

    async def loop() -> None:
        while True:
            try:
                for obj in (await k8s.api.list(SYNC_SCHEDULES, namespace=k8s.namespace, timeout=T)).items:
                    await reconcile_schedule(ctx, with_kind("SyncSchedule", SYNC_SCHEDULES, obj))
                for obj in (await k8s.api.list(SCRAPE_REQUESTS, namespace=k8s.namespace, timeout=T)).items:
                    await reconcile_scrape_request(ctx, with_kind("ScrapeRequest", SCRAPE_REQUESTS, obj), pacer=pacer)
            except Exception as error:  # e.g. 429 while a fresh CRD's storage initializes: the leader retries too
                if not passing(error):
                    raise
            await asyncio.sleep(0.05)

    task = asyncio.create_task(loop())
    try:
        yield ctx
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # an error the loop met is raised here


async def create(k8s: KubernetesUnderTest, name: str, **spec: object) -> KubeObject:
    body = {"apiVersion": SYNC_SCHEDULES.api_version, "kind": "SyncSchedule", "metadata": {"name": name},
            "spec": {"schedule": "0 3 * * *", "job": {"function": "sync_connections"}, **spec}}
    return await k8s.api.create(SYNC_SCHEDULES, body, namespace=k8s.namespace, timeout=T)


async def fetch(k8s: KubernetesUnderTest, name: str) -> KubeObject:
    return await k8s.api.get(SYNC_SCHEDULES, name, namespace=k8s.namespace, timeout=T)


async def queued(redis: ArqRedis, queue: str = "arq:queue") -> list[str]:
    return sorted(job_id.decode() for job_id in await redis.zrange(queue, 0, -1))


# --- preview: the operator's own scheduling code, no cluster ------------------------------------------------------


async def test_preview_of_a_cron_expression_prints_its_fire_times_across_spring_forward(
        capsys: pytest.CaptureFixture[str]) -> None:
    said = await cli_without_cluster(capsys, "schedule", "preview", "30 2 * * *", "--tz", "America/New_York",
                                     "--from", "2026-03-06", "-n", "4")

    assert (said.code, said.err) == (0, "")
    assert said.out.splitlines() == [
        "next 4 fire times of 30 2 * * * in America/New_York after 2026-03-06T05:00:00Z:",
        "#   TIME (America/New_York)     UTC                    NOTE",
        "1   2026-03-06T02:30:00-05:00   2026-03-06T07:30:00Z",
        "2   2026-03-07T02:30:00-05:00   2026-03-07T07:30:00Z",
        "3   2026-03-08T03:00:00-04:00   2026-03-08T07:00:00Z   UTC offset now -04:00 (EDT)",  # 02:30 did not exist
        "4   2026-03-09T02:30:00-04:00   2026-03-09T06:30:00Z",
    ]


async def test_preview_fires_a_fixed_time_once_and_an_hourly_schedule_twice_in_the_repeated_hour(
        capsys: pytest.CaptureFixture[str]) -> None:
    fixed = await cli_without_cluster(capsys, "schedule", "preview", "30 1 * * *", "--tz", "America/New_York",
                                      "--from", "2026-11-01T00:00", "-n", "2", "-o", "json")
    hourly = await cli_without_cluster(capsys, "schedule", "preview", "30 * * * *", "--tz", "America/New_York",
                                       "--from", "2026-11-01T00:00", "-n", "3", "-o", "json")

    assert [tick["utc"] for tick in fixed.json["fireTimes"]] == ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"]
    assert [tick["local"] for tick in hourly.json["fireTimes"]] == [
        "2026-11-01T00:30:00-04:00", "2026-11-01T01:30:00-04:00", "2026-11-01T01:30:00-05:00"]
    assert hourly.json["from"] == "2026-11-01T04:00:00Z"


@pytest.mark.parametrize(("args", "message"), [
    (("61 * * * *",), "'61 * * * *' is not a valid cron expression (bad minute); e.g. '*/15 * * * *' (every 15 "
                      "minutes), '0 3 * * *' (daily 03:00) or '@daily'"),
    (("0 3 * *",), "'0 3 * *' has 4 fields, cron needs 5 (minute hour day-of-month month day-of-week); e.g. "
                   "'*/15 * * * *' (every 15 minutes), '0 3 * * *' (daily 03:00) or '@daily'"),
    (("@sometimes",), "'@sometimes' is not a known macro; use one of @yearly, @annually, @monthly, @weekly, @daily, "
                      "@midnight, @hourly or 5 fields, e.g. '*/15 * * * *' (every 15 minutes), '0 3 * * *' (daily "
                      "03:00) or '@daily'"),
    (("@daily", "--tz", "Mars/Olympus"), "--tz 'Mars/Olympus': 'Mars/Olympus' is not an IANA time zone; use a name "
                                         "like 'UTC', 'Europe/Berlin' or 'America/New_York'"),
    (("@daily", "--from", "yesterday"), "--from 'yesterday' is not a time; write ISO 8601, e.g. 2026-11-24T03:00:00Z, "
                                        "2026-11-24T03:00:00+01:00, 2026-11-24T03:00 (in the schedule's time zone) "
                                        "or 2026-11-24, or now"),
    (("@daily", "-n", "0"), "-n/--count 0: give between 1 and 1000 fire times"),
])
async def test_preview_says_what_is_wrong_with_its_input(capsys: pytest.CaptureFixture[str], args: tuple[str, ...],
                                                         message: str) -> None:
    said = await cli_without_cluster(capsys, "schedule", "preview", *args)
    assert (said.code, said.out, said.err) == (2, "", f"kubearq schedule preview: {message}\n")


def test_the_kubearq_command_previews_without_a_cluster() -> None:
    env = {key: value for key, value in os.environ.items() if key != "KUBECONFIG"}
    result = subprocess.run([sys.executable, "-m", "kubearq.cli", "schedule", "preview", "@hourly", "--from",
                             "2026-01-01T00:00:00Z", "-n", "2"], cwd=REPO, capture_output=True, text=True,
                            timeout=60, env={**env, "KUBECONFIG": "/nonexistent/kubeconfig"})
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines()[2:] == ["1   2026-01-01T01:00:00+00:00   2026-01-01T01:00:00Z",
                                              "2   2026-01-01T02:00:00+00:00   2026-01-01T02:00:00Z"]


async def test_preview_of_a_schedule_reads_its_expression_and_time_zone(
        k8s: KubernetesUnderTest, kubearq: Cli) -> None:
    await create(k8s, "berlin", schedule="0 3 * * *", timeZone="Europe/Berlin")

    said = await kubearq("schedule", "preview", "berlin", "--namespace", k8s.namespace, "--from",
                         "2026-03-28T12:00:00Z", "-n", "2")
    with_tz = await kubearq("schedule", "preview", "berlin", "--namespace", k8s.namespace, "--tz", "UTC")

    assert said.out.splitlines() == [
        "next 2 fire times of berlin (0 3 * * *) in Europe/Berlin after 2026-03-28T12:00:00Z:",
        "#   TIME (Europe/Berlin)        UTC                    NOTE",
        "1   2026-03-29T03:00:00+02:00   2026-03-29T01:00:00Z   UTC offset now +02:00 (CEST)",
        "2   2026-03-30T03:00:00+02:00   2026-03-30T01:00:00Z",
    ]
    assert (with_tz.code, with_tz.err) == (2, "kubearq schedule preview: --tz is for a cron expression; the "
                                              "schedule 'berlin' has its own timeZone\n")


# --- list and get ---------------------------------------------------------------------------------------------


async def test_list_shows_each_schedule_and_get_shows_one(k8s: KubernetesUnderTest, kubearq: Cli) -> None:
    await create(k8s, "nightly", schedule="0 3 * * *", timeZone="Europe/Berlin", concurrencyPolicy="Forbid")
    await create(k8s, "realtime", schedule="*/15 * * * *", suspend=True)

    listed = await kubearq("schedule", "list", "-n", k8s.namespace)
    wide = await kubearq("schedule", "list", "-n", k8s.namespace, "-o", "wide")
    everywhere = await kubearq("schedule", "list", "-A", "-o", "json")
    everywhere_table = await kubearq("schedule", "list", "-A")
    shown = await kubearq("schedule", "get", "nightly", "-n", k8s.namespace)
    as_yaml = await kubearq("schedule", "get", "nightly", "-n", k8s.namespace, "-o", "yaml")

    assert (listed.code, listed.err) == (0, "")
    assert [line.split() for line in listed.out.splitlines()] == [
        ["NAME", "SCHEDULE", "TIMEZONE", "SUSPEND", "ACTIVE", "LAST", "SCHEDULE", "NEXT", "READY"],
        ["nightly", "0", "3", "*", "*", "*", "Europe/Berlin", "false", "0", "<none>", "<none>", "<unknown>"],
        ["realtime", "*/15", "*", "*", "*", "*", "UTC", "true", "0", "<none>", "<none>", "<unknown>"],
    ]
    assert wide.out.splitlines()[0].split()[-5:] == ["POLICY", "FUNCTION", "QUEUE", "LAST", "TRIGGER"]
    assert wide.out.splitlines()[1].split()[-4:] == ["Forbid", "sync_connections", "arq:queue", "<none>"]
    assert {(item["metadata"]["namespace"], item["metadata"]["name"]) for item in everywhere.json["items"]} >= {
        (k8s.namespace, "nightly"), (k8s.namespace, "realtime")}
    assert everywhere_table.out.splitlines()[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert [k8s.namespace, "nightly"] in [line.split()[:2] for line in everywhere_table.out.splitlines()]
    assert shown.out.splitlines()[:6] == [
        "Name:           nightly", f"Namespace:      {k8s.namespace}", "Schedule:       0 3 * * * (Europe/Berlin)",
        "Suspend:        false", "Concurrency:    Forbid", "Job:            sync_connections on arq:queue"]
    assert yaml.safe_load(as_yaml.out)["spec"]["schedule"] == "0 3 * * *"


@pytest.mark.parametrize("action", ["get", "trigger", "suspend", "resume", "preview"])
async def test_an_unknown_schedule_is_said_as_such_with_exit_code_3(k8s: KubernetesUnderTest, kubearq: Cli,
                                                                    action: str) -> None:
    said = await kubearq("schedule", action, "nightly", "--namespace", k8s.namespace)
    assert (said.code, said.out, said.err) == (
        3, "", f'kubearq schedule {action}: syncschedule "nightly" not found in namespace "{k8s.namespace}"\n')


def test_a_403_is_a_sentence_naming_the_verb_and_the_resource() -> None:
    error = ApiError(403, "Forbidden", 'syncschedules.kubearq.dev "nightly" is forbidden: User '
                     '"system:serviceaccount:team-a:viewer" cannot patch resource "syncschedules" in API group '
                     '"kubearq.dev" in the namespace "team-a"')
    said = refusal(error, verb="patch", resource=SYNC_SCHEDULES, kind="SyncSchedule", name="nightly",
                   namespace="team-a", server="https://k8s.example")
    assert (said.code, str(said)) == (3, "forbidden: system:serviceaccount:team-a:viewer may not patch syncschedules "
                                         "in namespace team-a; this needs the RBAC verb patch on "
                                         "syncschedules.kubearq.dev (ask your cluster admin for it)")


# --- trigger ----------------------------------------------------------------------------------------------------


async def test_trigger_waits_for_the_leader_and_prints_the_job_id(
        k8s: KubernetesUnderTest, kubearq: Cli, serving_redis: ArqRedis) -> None:
    obj = await create(k8s, "nightly")
    async with leading(k8s, serving_redis):
        said = await kubearq("schedule", "trigger", "nightly", "-n", k8s.namespace)
        again = await kubearq("schedule", "trigger", "nightly", "-n", k8s.namespace)

    status: dict[str, Any] = dict((await fetch(k8s, "nightly"))["status"])
    job_id = manual_job_id(str(obj["metadata"]["uid"]), str(status["lastTrigger"]["id"]))
    assert (said.code, said.err) == (0, "")
    assert said.out.startswith("syncschedule/nightly triggered: job kubearq:manual:")
    assert (again.code, len(await queued(serving_redis))) == (0, 2)  # each trigger is a run of its own
    assert job_id in await queued(serving_redis)
    assert {run["trigger"] for run in status["runs"]} == {"Manual"}


async def test_trigger_refused_by_concurrency_policy_says_why_and_exits_1(
        k8s: KubernetesUnderTest, kubearq: Cli, serving_redis: ArqRedis) -> None:
    await create(k8s, "nightly", concurrencyPolicy="Forbid")
    async with leading(k8s, serving_redis):
        first = await kubearq("schedule", "trigger", "nightly", "-n", k8s.namespace)
        refused = await kubearq("schedule", "trigger", "nightly", "-n", k8s.namespace)

    [active] = await queued(serving_redis)
    assert first.code == 0
    assert (refused.code, refused.out, refused.err) == (
        1, "", f"kubearq schedule trigger: refused: not triggered: concurrencyPolicy is Forbid and 1 run(s) are still "
               f"queued or running ({active}); trigger again once they finish\n")


async def test_trigger_without_waiting_names_the_job_the_operator_will_enqueue(
        k8s: KubernetesUnderTest, kubearq: Cli, serving_redis: ArqRedis) -> None:
    obj = await create(k8s, "nightly")

    said = await kubearq("schedule", "trigger", "nightly", "-n", k8s.namespace, "--no-wait")
    async with leading(k8s, serving_redis):
        await until_recorded(k8s, "nightly", "lastTrigger")

    ask = json.loads((await fetch(k8s, "nightly"))["metadata"]["annotations"][TRIGGER_ANNOTATION])
    job_id = manual_job_id(str(obj["metadata"]["uid"]), ask["id"])
    assert (said.code, said.out) == (
        0, f"syncschedule/nightly: trigger asked (ask {ask['id']}); the operator enqueues job {job_id}\n")
    assert await queued(serving_redis) == [job_id]


async def until_recorded(k8s: KubernetesUnderTest, name: str, field: str) -> Mapping[str, Any]:
    async with asyncio.timeout(T):
        while True:
            record = ((await fetch(k8s, name)).get("status") or {}).get(field)
            if record:
                return record  # type: ignore[return-value]
            await asyncio.sleep(0.05)


async def test_trigger_with_no_operator_running_says_so_after_the_timeout(
        k8s: KubernetesUnderTest, kubearq: Cli) -> None:
    await create(k8s, "nightly")

    said = await kubearq("schedule", "trigger", "nightly", "-n", k8s.namespace, "--timeout", "0.5")

    ask = json.loads((await fetch(k8s, "nightly"))["metadata"]["annotations"][TRIGGER_ANNOTATION])
    assert (said.code, said.out, said.err) == (
        1, "", f"kubearq schedule trigger: asked (ask {ask['id']}), but the operator recorded no answer within 0.5 s: "
               "is it running, and does a replica hold its Lease? Its leader acts on the ask when it comes\n")


async def test_a_trigger_replaced_by_another_before_the_operator_answered_says_so(
        k8s: KubernetesUnderTest, kubearq: Cli) -> None:
    await create(k8s, "nightly")
    waiting = asyncio.create_task(kubearq("schedule", "trigger", "nightly", "-n", k8s.namespace, "--timeout", "20"))
    await until(lambda: asked(k8s, "nightly"), what="the CLI's ask on the object")
    ours = json.loads((await fetch(k8s, "nightly"))["metadata"]["annotations"][TRIGGER_ANNOTATION])["id"]
    other = Ask(id="20261124T100000-00dashb0", requested_at=datetime.now(UTC), requested_by="dashboard-user")
    await k8s.api.patch(SYNC_SCHEDULES, "nightly", annotation_patch(TRIGGER_ANNOTATION, other),
                        namespace=k8s.namespace, timeout=T)

    said = await waiting

    assert (said.code, said.out, said.err) == (
        1, "", f"kubearq schedule trigger: another request (ask 20261124T100000-00dashb0) replaced this one (ask "
               f"{ours}) on the kubearq.dev/trigger annotation before the operator answered; `kubearq schedule get "
               "nightly` shows what it did\n")


async def asked(k8s: KubernetesUnderTest, name: str) -> bool:
    return TRIGGER_ANNOTATION in ((await fetch(k8s, name))["metadata"].get("annotations") or {})


# --- suspend and resume -----------------------------------------------------------------------------------------


async def test_suspend_and_resume_set_spec_suspend(k8s: KubernetesUnderTest, kubearq: Cli) -> None:
    await create(k8s, "nightly")

    suspended = await kubearq("schedule", "suspend", "nightly", "-n", k8s.namespace)
    after_suspend = (await fetch(k8s, "nightly"))["spec"]["suspend"]
    resumed = await kubearq("schedule", "resume", "nightly", "-n", k8s.namespace)

    assert (suspended.code, suspended.out) == (0, "syncschedule/nightly suspended: no new runs\n")
    assert (resumed.code, resumed.out) == (0, "syncschedule/nightly resumed\n")
    assert (after_suspend, (await fetch(k8s, "nightly"))["spec"]["suspend"]) == (True, False)


# --- backfill ---------------------------------------------------------------------------------------------------


async def test_backfill_enqueues_each_tick_of_the_window_once_and_a_repeat_enqueues_nothing(
        k8s: KubernetesUnderTest, kubearq: Cli, serving_redis: ArqRedis) -> None:
    obj = await create(k8s, "quarterly", schedule="*/15 * * * *", suspend=True)
    window = ("--from", "2026-11-23T09:00:00Z", "--to", "2026-11-23T10:00:00Z")
    async with leading(k8s, serving_redis):
        first = await kubearq("schedule", "backfill", "quarterly", "-n", k8s.namespace, *window)
        repeat = await kubearq("schedule", "backfill", "quarterly", "-n", k8s.namespace, *window)

    uid = str(obj["metadata"]["uid"])
    ticks = [datetime(2026, 11, 23, 9, minute, tzinfo=UTC) for minute in (0, 15, 30, 45)]
    job_ids = [tick_job_id(uid, tick) for tick in ticks]
    assert (first.code, first.err) == (0, "")
    assert first.out.splitlines() == [
        "syncschedule/quarterly backfilled: 4 of the 4 tick(s) in [2026-11-23T09:00:00Z, 2026-11-23T10:00:00Z) "
        "enqueued on queue arq:queue", *job_ids]
    assert repeat.out.splitlines()[0] == (
        "syncschedule/quarterly backfilled: 0 of the 4 tick(s) in [2026-11-23T09:00:00Z, 2026-11-23T10:00:00Z) "
        "enqueued on queue arq:queue; 4 enqueued before")
    assert await queued(serving_redis) == sorted(job_ids)


async def test_backfill_reads_times_without_an_offset_in_the_schedules_time_zone(
        k8s: KubernetesUnderTest, kubearq: Cli, serving_redis: ArqRedis) -> None:
    obj = await create(k8s, "berlin", schedule="0 3 * * *", timeZone="Europe/Berlin", suspend=True)

    said = await kubearq("schedule", "backfill", "berlin", "-n", k8s.namespace, "--from", "2026-11-20",
                         "--to", "2026-11-22", "--no-wait")

    uid = str(obj["metadata"]["uid"])
    assert said.out.splitlines()[1:] == [tick_job_id(uid, datetime(2026, 11, day, 2, tzinfo=UTC)) for day in (20, 21)]


@pytest.mark.parametrize(("window", "message"), [
    (("--from", "2026-11-23T10:00:00Z", "--to", "2026-11-23T09:00:00Z"),
     "--to 2026-11-23T09:00:00Z is not after --from 2026-11-23T10:00:00Z: the window [from, to) would hold no tick"),
    (("--from", "2026-11-20T00:00:00Z", "--to", "2026-11-21T00:00:00Z"),
     "the backfill window [2026-11-20T00:00:00Z, 2026-11-21T00:00:00Z) holds more than 1000 ticks of '* * * * *'; "
     "backfill at most 1000 at a time (split the window)"),
    (("--from", "2999-01-01T00:00:00Z", "--to", "2999-01-02T00:00:00Z"),
     "the backfill window [2999-01-01T00:00:00Z, 2999-01-02T00:00:00Z) starts in the future: a backfill enqueues past "
     "ticks; the schedule enqueues future ones itself"),
    (("--from", "last tuesday", "--to", "now"),
     "--from 'last tuesday' is not a time; write ISO 8601, e.g. 2026-11-24T03:00:00Z, 2026-11-24T03:00:00+01:00, "
     "2026-11-24T03:00 (in the schedule's time zone) or 2026-11-24, or now"),
])
async def test_backfill_refuses_a_window_it_cannot_do_and_asks_nothing(
        k8s: KubernetesUnderTest, kubearq: Cli, window: tuple[str, ...], message: str) -> None:
    await create(k8s, "minutely", schedule="* * * * *")

    said = await kubearq("schedule", "backfill", "minutely", "-n", k8s.namespace, *window)

    assert (said.code, said.out, said.err) == (2, "", f"kubearq schedule backfill: {message}\n")
    assert "annotations" not in (await fetch(k8s, "minutely"))["metadata"]


# --- the whole way: a running operator, RBAC on a real API server -------------------------------------------------


@pytest.mark.timeout(120)
async def test_a_running_operator_acts_on_a_trigger_asked_from_the_cli(
        k8s: KubernetesUnderTest, kubearq: Cli, redis_url: str, serving_redis: ArqRedis) -> None:
    obj = await create(k8s, "nightly")
    async with replicas(k8s, redis_url, ShiftedClock(), ("solo",), reconcilers=default_reconcilers()):
        await until(lambda: holds(k8s, "solo"), within=30, what="leadership")
        said = await kubearq("schedule", "trigger", "nightly", "-n", k8s.namespace, "--timeout", "20")

    ask_id = str((await fetch(k8s, "nightly"))["status"]["lastTrigger"]["id"])  # type: ignore[index]
    job_id = manual_job_id(str(obj["metadata"]["uid"]), ask_id)
    assert (said.code, said.out, said.err) == (0, f"syncschedule/nightly triggered: job {job_id} enqueued\n", "")
    assert await queued(serving_redis) == [job_id]


async def holds(k8s: KubernetesUnderTest, identity: str) -> bool:
    return await lease_holder(k8s) == identity


@pytest.mark.cluster
async def test_a_user_who_may_only_read_cannot_trigger_and_nothing_changes(
        k8s: KubernetesUnderTest, kubearq: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    await create(k8s, "nightly")
    viewer = await k8s.login_as_service_account("viewer", [
        {"apiGroups": ["kubearq.dev"], "resources": ["syncschedules"], "verbs": ["get", "list"]}])
    monkeypatch.setenv("KUBECONFIG", str(viewer.kubeconfig))
    before = await fetch(k8s, "nightly")

    listed = await kubearq("schedule", "list", "-n", k8s.namespace)
    refused = await kubearq("schedule", "trigger", "nightly", "-n", k8s.namespace)
    suspend = await kubearq("schedule", "suspend", "nightly", "-n", k8s.namespace)

    assert (listed.code, listed.out.splitlines()[1].split()[0]) == (0, "nightly")
    expected = (f"forbidden: {viewer.username} may not patch syncschedules in namespace {k8s.namespace}; this needs "
                "the RBAC verb patch on syncschedules.kubearq.dev (ask your cluster admin for it)")
    assert (refused.code, refused.out, refused.err) == (3, "", f"kubearq schedule trigger: {expected}\n")
    assert (suspend.code, suspend.err) == (3, f"kubearq schedule suspend: {expected}\n")
    after = await fetch(k8s, "nightly")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


@pytest.mark.cluster
async def test_the_chart_operator_user_role_may_trigger_from_the_cli(
        k8s: KubernetesUnderTest, kubearq: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    await create(k8s, "nightly")
    runner = await k8s.login_as_service_account("runner", operator_user_rules())
    monkeypatch.setenv("KUBECONFIG", str(runner.kubeconfig))

    asked = await kubearq("schedule", "trigger", "nightly", "-n", k8s.namespace, "--no-wait")

    assert asked.code == 0, asked.err
    annotations = (await fetch(k8s, "nightly"))["metadata"]["annotations"]
    assert TRIGGER_ANNOTATION in annotations
