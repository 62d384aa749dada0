"""`kubearq jobs get|failed|retry|discard` as a user meets it, through the real `main([...])` on a real Redis and a
real PostgreSQL: what it prints, the exit codes a script can trust, and a clear message for every bad input.

`retry` and `discard` go through the operator's console (`--operator`), which lets the caller's own RBAC decide on a
real kube-apiserver (tests marked `cluster`; on the emulator they skip, it has no TokenReview), or with `--direct`
straight to Redis and PostgreSQL, as the tests before that section do."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from arq.connections import ArqRedis

from kubearq.cli import main
from kubearq.core.connections import create_redis
from kubearq.core.contract import Origin
from kubearq.core.failedjobs import FailedJobFilter, FailureReason, Selection, redrive_id
from kubearq.core.failedjobstores import PostgresFailedJobs, RedisFailedJobs
from kubearq.demo.services import free_port
from kubearq.operator import kube
from kubearq.operator.console.server import ConsoleConfig, start_console
from kubearq.operator.console.session import COOKIE
from kubearq.operator.rbac import operator_user_rules, viewer_rules
from kubearq.worker.storage import Storage
from tests.failing_jobs import BROKEN_KEY
from tests.kubernetes import KubernetesUnderTest
from tests.polling import until
from tests.test_failed_jobs import TEAM_A, enqueue, failed, ids, keeping_worker, kept_job

pytestmark = pytest.mark.usefixtures("redis_env")


@dataclass(frozen=True)
class Said:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    client = create_redis(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def redis_env(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.delenv("DATABASE_URL", raising=False)


@pytest.fixture
async def kept(postgres_dsn: str, redis: ArqRedis, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[
        PostgresFailedJobs]:
    """Failed jobs kept in PostgreSQL, which the CLI reads through DATABASE_URL."""
    monkeypatch.setenv("DATABASE_URL", postgres_dsn)
    async with Storage(postgres_dsn, connect_timeout=30) as storage:
        await storage.migrate()
        yield PostgresFailedJobs(storage.connection, redis)


Jobs = Callable[..., Awaitable[Said]]
"""The `capture` fixture: `await capture("failed", "-o", "json")` runs `kubearq jobs failed -o json`."""


@pytest.fixture
def capture(capsys: pytest.CaptureFixture[str]) -> Jobs:
    async def jobs(*args: str) -> Said:
        # In a thread of its own: `main` runs its own event loop, as it does from a shell.
        code = await asyncio.to_thread(main, ["jobs", *args])
        said = capsys.readouterr()
        return Said(code, said.out, said.err)

    return jobs


# --- failed -----------------------------------------------------------------------------------------------------


async def test_failed_lists_the_kept_jobs_newest_first_as_a_table(kept: PostgresFailedJobs, capture: Jobs) -> None:
    await kept.record([failed("report-1", minutes=1, origin=TEAM_A),
                       failed("report-2", minutes=2, function="fails_every_try", error="ValueError: boom\non try 3"),
                       failed("report-3", minutes=3, reason=FailureReason.GAVE_UP, error="GiveUp: " + "x" * 80)])
    await kept.redrive(Selection.of("report-1"))
    said = await capture("failed")

    redriven = redrive_id(failed("report-1", minutes=1), 1)
    assert (said.code, said.err) == (0, "")
    assert said.out.splitlines() == [
        "FAILED AT              JOB ID     FUNCTION          QUEUE       REASON   TRIES   RESOURCE"
        "                      ERROR" + " " * 58 + "RE-DRIVEN AS",
        "2026-03-01T10:03:00Z   report-3   flaky             arq:queue   GaveUp   3       -"
        "                             GiveUp: " + "x" * 51 + "…   -",
        "2026-03-01T10:02:00Z   report-2   fails_every_try   arq:queue   Failed   3       -"
        "                             ValueError: boom on try 3" + " " * 38 + "-",
        "2026-03-01T10:01:00Z   report-1   flaky             arq:queue   Failed   3       team-a/SyncSchedule/nightly"
        "   RuntimeError: the backend is broken" + " " * 28 + redriven,
    ]


@pytest.mark.parametrize(("flags", "expected"), [
    ((), ["d", "c", "b", "a"]),
    (("--function", "flaky"), ["d", "c", "a"]),
    (("--queue", "reports"), ["c"]),
    (("--resource", "team-a"), ["b", "a"]),
    (("--resource", "team-a/ScrapeRequest"), ["b"]),
    (("--resource", "team-b/SyncSchedule/nightly"), ["c"]),
    (("--error", "TIMEOUTERROR"), ["c"]),
    (("--since", "2026-03-01T10:03:00Z"), ["d", "c"]),
    (("--since", "2026-03-01T11:03:00+01:00"), ["d", "c"]),
    (("--since", "2026-03-02"), []),
    (("--function", "flaky", "--since", "2026-03-01T10:02:00Z"), ["d", "c"]),
])
async def test_failed_filters_by_function_queue_resource_error_and_since(
        kept: PostgresFailedJobs, capture: Jobs, flags: tuple[str, ...], expected: list[str]) -> None:
    await kept.record([
        failed("a", minutes=1, origin=TEAM_A),
        failed("b", minutes=2, function="fails_every_try", origin=Origin(namespace="team-a", kind="ScrapeRequest",
                                                                         name="concerts")),
        failed("c", minutes=3, queue="reports", origin=Origin(namespace="team-b", kind="SyncSchedule",
                                                              name="nightly"),
               error="TimeoutError: the try took longer than 30 s"),
        failed("d", minutes=4)])
    said = await capture("failed", *flags, "-o", "json")

    assert said.code == 0
    assert [item["jobId"] for item in said.json["items"]] == expected
    assert (said.json["keptIn"], said.json["notice"]) == ("PostgreSQL", None)


async def test_failed_since_a_duration_counts_back_from_now(kept: PostgresFailedJobs, capture: Jobs) -> None:
    now = datetime.now(UTC)
    await kept.record([failed("half-an-hour-ago", failed_at=now - timedelta(minutes=30)),
                       failed("two-hours-ago", failed_at=now - timedelta(hours=2))])

    assert (await capture("failed", "--since", "1h", "-o", "json")).json["items"][0]["jobId"] == "half-an-hour-ago"
    assert len((await capture("failed", "--since", "1h", "-o", "json")).json["items"]) == 1
    assert len((await capture("failed", "--since", "3h", "-o", "json")).json["items"]) == 2


async def test_failed_pages_through_with_the_cursor_it_prints(kept: PostgresFailedJobs, capture: Jobs) -> None:
    await kept.record([failed(f"job-{n}", minutes=n) for n in range(5)])
    first = await capture("failed", "--limit", "2")
    cursor = first.err.removeprefix("more: add --after ").strip()
    await kept.record([failed("newer", minutes=60)])  # does not shift the pages after the first
    second = await capture("failed", "--limit", "2", "--after", cursor, "-o", "json")
    third = await capture("failed", "--limit", "2", "--after", second.json["nextCursor"], "-o", "json")

    assert [line.split()[1] for line in first.out.splitlines()[1:]] == ["job-4", "job-3"]
    assert first.err == f"more: add --after {cursor}\n"
    assert [item["jobId"] for item in second.json["items"]] == ["job-2", "job-1"]
    assert ([item["jobId"] for item in third.json["items"]], third.json["nextCursor"]) == (["job-0"], None)


async def test_without_database_url_failed_says_they_are_kept_in_redis_with_a_cap(
        redis: ArqRedis, capture: Jobs) -> None:
    await RedisFailedJobs(redis, cap=5).record([failed("report-1")])  # as a worker without DATABASE_URL keeps it
    said = await capture("failed")
    as_json = await capture("failed", "-o", "json")

    notice = ("failed jobs are kept in Redis without DATABASE_URL, the newest 5 only; set DATABASE_URL (the workers' "
              "PostgreSQL) to keep them all")
    assert (said.code, said.err) == (0, f"note: {notice}\n")
    assert [line.split()[1] for line in said.out.splitlines()[1:]] == ["report-1"]
    assert (as_json.json["keptIn"], as_json.json["atMost"], as_json.json["notice"]) == ("Redis", 5, notice)


async def test_failed_with_nothing_kept_says_so(kept: PostgresFailedJobs, capture: Jobs) -> None:
    said = await capture("failed")
    filtered = await capture("failed", "--function", "flaky")

    assert (said.code, said.out, said.err) == (0, "", "no failed jobs\n")
    assert (filtered.code, filtered.out, filtered.err) == (0, "", "no failed jobs match\n")


# --- get --------------------------------------------------------------------------------------------------------


async def test_get_shows_a_job_that_failed_for_good_in_redis_and_as_kept(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, kept: PostgresFailedJobs, capture: Jobs) -> None:
    await enqueue(redis, "report-1", "fails_every_try", 1, origin=TEAM_A, three=3)
    async with keeping_worker(redis_url, postgres_dsn):
        await kept_job(kept, "report-1")
    said = await capture("get", "report-1", "-o", "json")

    assert said.code == 0
    job, record = said.json["job"], said.json["failed"]
    assert (job["state"], job["function"], job["args"], job["kwargs"], job["try"], job["error"]) == (
        "Failed", "fails_every_try", [1], {"three": 3}, 3, "ValueError: boom on try 3")
    assert (record["reason"], record["tries"], record["worker"], record["origin"]) == (
        "Failed", 3, "worker-a", {"namespace": "team-a", "kind": "SyncSchedule", "name": "nightly"})
    assert [(entry["jobTry"], entry["error"]) for entry in record["tryErrors"]] == [
        (n, f"ValueError: boom on try {n}") for n in (1, 2, 3)]


async def test_get_shows_the_result_of_a_job_that_succeeded(
        redis: ArqRedis, redis_url: str, capture: Jobs) -> None:
    await enqueue(redis, "report-ok", "flaky", report="weekly")
    async with keeping_worker(redis_url):
        await until_result(redis, "report-ok")
    said = await capture("get", "report-ok")

    assert said.code == 0
    assert said.out.splitlines()[:7] == ["id: report-ok", "job:", "  state: Succeeded", "  function: flaky",
                                         "  args: []", "  kwargs:", "    report: weekly"]
    assert "  result: weekly done" in said.out.splitlines()


async def until_result(redis: ArqRedis, job_id: str) -> None:
    async def finished() -> bool:
        return bool(await redis.exists(f"arq:result:{job_id}"))

    await until(finished, what=f"a result of {job_id}")


async def test_get_links_a_redriven_job_and_the_one_it_redrove(kept: PostgresFailedJobs, capture: Jobs) -> None:
    await kept.record([failed("report-1")])
    redriven = await capture("retry", "--direct", "report-1")
    new_id = redrive_id(failed("report-1"), 1)
    old = await capture("get", "report-1", "-o", "json")
    new = await capture("get", new_id, "-o", "json")

    assert (redriven.code, redriven.out) == (0, f"re-drove report-1 as {new_id}\n")
    assert old.json["failed"]["redrivenAs"] == new_id
    assert (new.json["redriveOf"], new.json["job"]["state"], new.json["job"]["kwargs"]) == (
        "report-1", "Queued", {"report": "report-1"})
    assert "failed" not in new.json


# --- retry and discard ------------------------------------------------------------------------------------------


async def test_retrying_twice_enqueues_one_job_and_says_so(
        kept: PostgresFailedJobs, redis: ArqRedis, capture: Jobs) -> None:
    await kept.record([failed("report-1")])
    first = await capture("retry", "--direct", "report-1")
    second = await capture("retry", "--direct", "report-1")

    new_id = redrive_id(failed("report-1"), 1)
    assert (first.code, first.out) == (0, f"re-drove report-1 as {new_id}\n")
    assert (second.code, second.out) == (0, f"report-1 was re-driven before, as {new_id}\n")
    assert await redis.zrange("arq:queue", 0, -1) == [new_id.encode()]


async def test_retrying_all_matching_redrives_the_filtered_set(
        kept: PostgresFailedJobs, redis: ArqRedis, capture: Jobs) -> None:
    await kept.record([failed("a", minutes=1), failed("b", minutes=2), failed("c", minutes=3, function="other")])
    await kept.redrive(Selection.of("a"))
    said = await capture("retry", "--direct", "--all-matching", "--function", "flaky")

    assert (said.code, said.out) == (0, "re-drove 1 failed job; 1 re-driven before, 0 undecodable\n")
    assert await ids(kept, FailedJobFilter(redriven=False)) == ["c"]
    assert await redis.zcard("arq:queue") == 2


async def test_a_redriven_job_that_fails_again_is_listed_with_its_link(
        redis: ArqRedis, redis_url: str, postgres_dsn: str, kept: PostgresFailedJobs, capture: Jobs) -> None:
    await redis.set(BROKEN_KEY, 1)
    await enqueue(redis, "report-1", "flaky", report="nightly")
    async with keeping_worker(redis_url, postgres_dsn):
        await kept_job(kept, "report-1")
        retried = await capture("retry", "--direct", "report-1")
        new_id = retried.out.split()[-1]
        await kept_job(kept, new_id)
    listed = await capture("failed", "-o", "wide")

    rows = [line.split() for line in listed.out.splitlines()[1:]]
    assert [(row[1], row[-4], row[-3]) for row in rows] == [(new_id, "-", "report-1"), ("report-1", new_id, "-")]


async def test_an_undecodable_job_cannot_be_retried(kept: PostgresFailedJobs, capture: Jobs) -> None:
    await kept.record([failed("evil", function="undecodable", reason=FailureReason.UNDECODABLE)])
    said = await capture("retry", "--direct", "evil")

    assert (said.code, said.out, said.err) == (1, "", "evil cannot be re-driven: it was not a job kubearq can decode "
                                                      "(`kubearq jobs get evil` says where its bytes are)\n")


async def test_discarding_by_id_and_all_matching(kept: PostgresFailedJobs, capture: Jobs) -> None:
    await kept.record([failed("a", minutes=1), failed("b", minutes=2, function="other"), failed("c", minutes=3),
                       failed("d", minutes=4)])
    by_id = await capture("discard", "--direct", "a")
    matching = await capture("discard", "--direct", "--all-matching", "--function", "other")
    everything = await capture("discard", "--direct", "--all-matching", "--yes")

    assert (by_id.code, by_id.out) == (0, "discarded a\n")
    assert (matching.code, matching.out) == (0, "discarded 1 failed job\n")
    assert (everything.code, everything.out) == (0, "discarded 2 failed jobs\n")
    assert await ids(kept) == []


async def test_discarding_some_unknown_ids_discards_the_others_and_exits_3(
        kept: PostgresFailedJobs, capture: Jobs) -> None:
    await kept.record([failed("a")])
    said = await capture("discard", "--direct", "a", "never-kept")

    assert (said.code, said.out, said.err) == (3, "discarded a\n",
                                               "kubearq jobs discard: no failed job 'never-kept' is kept\n")
    assert await ids(kept) == []


# --- bad input: a clear message, nothing changed ---------------------------------------------------------------

NO_FILTER = ("--all-matching without a filter selects every failed job; narrow it with --function, --queue, "
             "--resource, --error or --since, or add --yes to mean every one")


@pytest.mark.parametrize(("args", "code", "message"), [
    (("get", "nope"), 3, "kubearq jobs get: job 'nope' not found: Redis holds no such job or result (ARQ keeps a "
                         "result for KEEP_RESULT), and no failed job of that id is kept"),
    (("retry", "--direct", "nope"), 3, "kubearq jobs retry: no failed job 'nope' is kept"),
    (("discard", "--direct", "nope"), 3, "kubearq jobs discard: no failed job 'nope' is kept"),
    (("failed", "--since", "yesterday"), 2, "kubearq jobs failed: --since 'yesterday': write a time "
                                            "(2026-03-01T10:00:00Z), a date (2026-03-01) or a duration back from now "
                                            "(90m, 6h, 2d, 1w)"),
    (("failed", "--after", "bogus"), 2, "kubearq jobs failed: --after: 'bogus' is not a cursor a page of failed jobs "
                                        "returned (next_cursor)"),
    (("failed", "--resource", "Team A/SyncSchedule"), 2, "kubearq jobs failed: --resource 'Team A/SyncSchedule': "
                                                         "write NAMESPACE, NAMESPACE/KIND or NAMESPACE/KIND/NAME, e.g. "
                                                         "team-a/SyncSchedule/nightly (NAMESPACE a namespace name)"),
    (("failed", "--limit", "0"), 2, "kubearq jobs failed: --limit 0: give a number from 1 to 1000"),
    (("retry", "--direct", "--all-matching"), 2, f"kubearq jobs retry: {NO_FILTER}"),
    (("discard", "--direct", "--all-matching"), 2, f"kubearq jobs discard: {NO_FILTER}"),
    (("discard", "--direct", "a", "--all-matching", "--function", "flaky"), 2,
     "kubearq jobs discard: give ids or --all-matching with filters, not both"),
    (("discard", "--direct", "--function", "flaky"), 2, "kubearq jobs discard: --function, --queue, --resource, "
                                                        "--error or --since select with --all-matching: add it, or "
                                                        "give ids alone"),
    (("retry", "--direct"), 2, "kubearq jobs retry: give the ids of the failed jobs to retry, or --all-matching with "
                               "filters"),
])
async def test_bad_input_is_refused_with_a_clear_message_and_changes_nothing(
        redis: ArqRedis, capture: Jobs, args: tuple[str, ...], code: int, message: str) -> None:
    kept_in_redis = RedisFailedJobs(redis, cap=10)
    await kept_in_redis.record([failed("a")])
    said = await capture(*args)

    assert (said.code, said.out, said.err) == (code, "", message + "\n")
    assert await ids(kept_in_redis) == ["a"]
    job = await kept_in_redis.get("a")
    assert job is not None
    assert job.redriven_as is None
    assert await redis.zcard("arq:queue") == 0


async def test_without_redis_url_it_says_what_to_set(capture: Jobs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL")
    said = await capture("failed")

    assert (said.code, said.err) == (2, "kubearq jobs failed: set REDIS_URL to the workers' Redis "
                                        "(redis://host:6379/0)\n")


@pytest.mark.parametrize(("variable", "url", "message"), [
    ("REDIS_URL", "http://redis:6379", "REDIS_URL must start with redis://, rediss:// (TLS) or unix://, not "
                                       "'http://redis:6379'"),
    ("DATABASE_URL", "mysql://db/kubearq", "DATABASE_URL must be a postgresql:// URL, e.g. "
                                           "postgresql://user:password@db:5432/kubearq"),
])
async def test_a_url_of_the_wrong_kind_is_refused(capture: Jobs, monkeypatch: pytest.MonkeyPatch, variable: str,
                                                  url: str, message: str) -> None:
    monkeypatch.setenv(variable, url)
    said = await capture("failed")

    assert (said.code, said.err) == (2, f"kubearq jobs failed: {message}\n")


async def test_an_unreachable_redis_fails_naming_it_without_its_password(
        capture: Jobs, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("REDIS_URL", f"redis://:secret@127.0.0.1:{port}/0")
    said = await capture("failed")

    assert said.code == 1
    assert said.err.startswith(f"kubearq jobs failed: cannot reach Redis at redis://:***@127.0.0.1:{port}/0: ")
    assert "secret" not in said.err


async def test_an_unreachable_postgresql_fails_naming_it(capture: Jobs, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("DATABASE_URL", f"postgresql://kubearq:secret@127.0.0.1:{port}/kubearq")
    said = await capture("failed")

    assert said.code == 1
    assert said.err.startswith(
        f"kubearq jobs failed: cannot reach PostgreSQL at postgresql://kubearq:***@127.0.0.1:{port}/kubearq: ")
    assert "secret" not in said.err


async def test_a_database_no_worker_migrated_is_named(
        postgres_dsn: str, capture: Jobs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", postgres_dsn)
    said = await capture("failed")

    assert (said.code, said.out) == (1, "")
    assert said.err.endswith(" has no failed_jobs table: a worker of this kubearq version with this DATABASE_URL "
                             "creates it when it starts\n")


# --- retry and discard through the operator: the caller's RBAC decides ------------------------------------------

OPERATOR_URL = "KUBEARQ_OPERATOR_URL"
ROLE_BINDINGS = kube.Resource("rbac.authorization.k8s.io", "v1", "rolebindings")


@pytest.fixture
async def operator(k8s: KubernetesUnderTest, kept: PostgresFailedJobs, redis: ArqRedis,
                   postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """The operator's console (as `run_operator` serves it) over the kept failed jobs, on the test's API server; its
    URL. The CLI gets neither REDIS_URL nor DATABASE_URL: only the operator can act on the failed jobs."""
    console = await start_console(k8s.api, redis, dict, ConsoleConfig(queues=lambda: {"arq:queue"}),
                                  host="127.0.0.1", port=0, database_url=postgres_dsn, cache_seconds=0)
    for variable in ("REDIS_URL", "DATABASE_URL", OPERATOR_URL):
        monkeypatch.delenv(variable, raising=False)
    try:
        yield f"http://127.0.0.1:{console.port}"
    finally:
        await console.stop()


def forbidden(user: str, verb: str, namespace: str | None) -> str:
    """The API server's sentence for a verb RBAC does not grant on failedjobs.kubearq.dev."""
    where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    return (f'failedjobs.kubearq.dev is forbidden: User "{user}" cannot {verb} resource "failedjobs" in API group '
            f'"kubearq.dev" {where}')


async def _bound_in_namespace(k8s: KubernetesUnderTest, name: str) -> tuple[str, str]:
    """A ServiceAccount bound to the operator-user role in the test's namespace only: its user name and a token."""
    role = f"{k8s.namespace}-{name}"
    await k8s.api.create(kube.Resource("", "v1", "serviceaccounts"), {"metadata": {"name": name}},
                         namespace=k8s.namespace, timeout=10)
    await k8s.create_cluster_object(kube.Resource("rbac.authorization.k8s.io", "v1", "clusterroles"), {
        "metadata": {"name": role}, "rules": list(operator_user_rules())})
    await k8s.api.create(ROLE_BINDINGS, {
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": k8s.namespace}]},
        namespace=k8s.namespace, timeout=10)
    async with k8s.http_client(timeout=10) as client:
        issued = await client.post(f"/api/v1/namespaces/{k8s.namespace}/serviceaccounts/{name}/token", json={
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}})
    issued.raise_for_status()
    return f"system:serviceaccount:{k8s.namespace}:{name}", str(issued.json()["status"]["token"])


@pytest.mark.cluster
async def test_an_operator_user_retries_through_the_operator_and_twice_is_one_new_job(
        k8s: KubernetesUnderTest, operator: str, kept: PostgresFailedJobs, redis: ArqRedis, capture: Jobs,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await kept.record([failed("report-1", origin=TEAM_A)])
    runner = await k8s.login_as_service_account("runner", operator_user_rules())
    monkeypatch.setenv("KUBECONFIG", str(runner.kubeconfig))
    first = await capture("retry", "report-1", "--operator", operator)
    monkeypatch.setenv(OPERATOR_URL, operator)
    second = await capture("retry", "report-1")

    new_id = redrive_id(failed("report-1", origin=TEAM_A), 1)
    assert (first.code, first.out, first.err) == (0, f"re-drove report-1 as {new_id}\n", "")
    assert (second.code, second.out, second.err) == (0, f"report-1 was re-driven before, as {new_id}\n", "")
    assert await redis.zrange("arq:queue", 0, -1) == [new_id.encode()]
    job = await kept.get("report-1")
    assert job is not None
    assert job.redriven_as == new_id


@pytest.mark.cluster
async def test_an_operator_user_discards_through_the_operator_and_an_unknown_id_exits_3(
        k8s: KubernetesUnderTest, operator: str, kept: PostgresFailedJobs, capture: Jobs,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await kept.record([failed("a", minutes=1), failed("b", minutes=2, function="other"), failed("c", minutes=3)])
    runner = await k8s.login_as_service_account("runner", operator_user_rules())
    monkeypatch.setenv("KUBECONFIG", str(runner.kubeconfig))
    by_id = await capture("discard", "a", "never-kept", "--operator", operator)
    matching = await capture("discard", "--all-matching", "--function", "other", "--operator", operator)

    assert (by_id.code, by_id.out, by_id.err) == (3, "discarded a\n",
                                                  "kubearq jobs discard: no failed job 'never-kept' is kept\n")
    assert (matching.code, matching.out, matching.err) == (0, "discarded 1 failed job\n", "")
    assert await ids(kept) == ["c"]


@pytest.mark.cluster
async def test_a_viewer_is_refused_with_the_api_servers_sentence_and_nothing_changes(
        k8s: KubernetesUnderTest, operator: str, kept: PostgresFailedJobs, redis: ArqRedis, capture: Jobs,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await kept.record([failed("report-1", origin=TEAM_A), failed("report-2")])
    viewer = await k8s.login_as_service_account("viewer", viewer_rules())
    monkeypatch.setenv("KUBECONFIG", str(viewer.kubeconfig))
    retried = await capture("retry", "report-1", "--operator", operator)
    discarded = await capture("discard", "report-1", "report-2", "--operator", operator)
    everything = await capture("retry", "--all-matching", "--yes", "--operator", operator)

    assert (retried.code, retried.out, retried.err) == (
        3, "", f"kubearq jobs retry: {forbidden(viewer.username, 'redrive', 'team-a')}\n")
    # report-2 is of no resource: a cluster-wide grant is asked first, and refused; nothing is discarded
    assert (discarded.code, discarded.out, discarded.err) == (
        3, "", f"kubearq jobs discard: {forbidden(viewer.username, 'discard', None)}\n")
    assert (everything.code, everything.out, everything.err) == (
        3, "", f"kubearq jobs retry: {forbidden(viewer.username, 'redrive', None)}; to retry one namespace's failed "
               "jobs, add --resource NAMESPACE\n")
    assert await ids(kept) == ["report-2", "report-1"]
    assert all(job.redriven_as is None for job in await kept.get_many(["report-1", "report-2"]))
    assert await redis.zcard("arq:queue") == 0


@pytest.mark.cluster
async def test_a_team_bound_in_its_namespace_retries_only_its_own(
        k8s: KubernetesUnderTest, operator: str, kept: PostgresFailedJobs, redis: ArqRedis, capture: Jobs) -> None:
    ours = Origin(namespace=k8s.namespace, kind="SyncSchedule", name="nightly")
    await kept.record([failed("ours-1", minutes=1, origin=ours), failed("ours-2", minutes=2, origin=ours),
                       failed("theirs", minutes=3, origin=TEAM_A)])
    user, token = await _bound_in_namespace(k8s, "team")
    mixed = await capture("retry", "ours-1", "theirs", "--operator", operator, "--token", token)
    everywhere = await capture("retry", "--all-matching", "--function", "flaky", "--operator", operator,
                               "--token", token)
    queued_after_refusals = await redis.zcard("arq:queue")
    own = await capture("retry", "--all-matching", "--resource", k8s.namespace, "--operator", operator,
                        "--token", token)

    assert (mixed.code, mixed.out, mixed.err) == (
        3, "", f"kubearq jobs retry: {forbidden(user, 'redrive', 'team-a')}\n")
    assert (everywhere.code, everywhere.err) == (
        3, f"kubearq jobs retry: {forbidden(user, 'redrive', None)}; to retry one namespace's failed jobs, add "
           "--resource NAMESPACE\n")
    assert queued_after_refusals == 0
    assert (own.code, own.out, own.err) == (0, "re-drove 2 failed jobs; 0 re-driven before, 0 undecodable\n", "")
    assert await ids(kept, FailedJobFilter(redriven=False)) == ["theirs"]


@pytest.mark.cluster
async def test_a_forged_token_is_refused_with_the_operators_reason(
        k8s: KubernetesUnderTest, operator: str, kept: PostgresFailedJobs, capture: Jobs) -> None:
    await kept.record([failed("report-1")])
    said = await capture("retry", "report-1", "--operator", operator, "--token", "eyJhbGciOiJSUzI1NiJ9.forged.token")

    assert (said.code, said.out, said.err) == (
        3, "", f"kubearq jobs retry: the operator at {operator} did not accept your token: the Kubernetes API did not "
               "accept this token (invalid bearer token): it may have expired, been revoked or be for another cluster; "
               "log in again with a new one (`kubectl create token NAME`)\n")
    job = await kept.get("report-1")
    assert job is not None
    assert job.redriven_as is None


@pytest.mark.cluster
async def test_the_api_refuses_as_the_api_server_does_in_a_status(
        k8s: KubernetesUnderTest, operator: str, kept: PostgresFailedJobs) -> None:
    await kept.record([failed("report-1")])
    viewer = await k8s.login_as_service_account("viewer", viewer_rules())
    runner = await k8s.login_as_service_account("runner", operator_user_rules())
    async with httpx.AsyncClient(base_url=operator, timeout=10) as client:
        anonymous = await client.post("/api/failed-jobs/redrive", json={"jobIds": ["report-1"]},
                                      headers={"Cookie": f"{COOKIE}={runner.connection.token}"})  # not read
        refused = await client.post("/api/failed-jobs/redrive", json={"jobIds": ["report-1"]},
                                    headers={"Authorization": f"Bearer {viewer.connection.token}"})
        misspelt = await client.post("/api/failed-jobs/discard", json={"where": {"fnction": "flaky"}},
                                     headers={"Authorization": f"Bearer {runner.connection.token}"})
        empty = await client.post("/api/failed-jobs/discard", json={},
                                  headers={"Authorization": f"Bearer {runner.connection.token}"})

    assert (anonymous.status_code, anonymous.headers["WWW-Authenticate"]) == (401, 'Bearer realm="kubearq"')
    assert anonymous.json() == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Unauthorized",
        "code": 401, "message": "send your Kubernetes bearer token as `Authorization: Bearer <token>` (`kubectl "
                                "create token NAME` issues one)"}
    assert refused.status_code == 403
    assert refused.json() == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Forbidden", "code": 403,
        "message": forbidden(viewer.username, "redrive", None), "details": {"group": "kubearq.dev",
                                                                           "kind": "failedjobs"}}
    assert (misspelt.status_code, misspelt.json()["message"]) == (
        400, "not a FailedJobsRequest: where.fnction: Extra inputs are not permitted")
    assert (empty.status_code, empty.json()["message"]) == (
        400, 'not a FailedJobsRequest: the body: Value error, give "jobIds" (a list of failed job ids) or "where" (a '
             "filter; {} for every failed job), one of them")
    assert await ids(kept) == ["report-1"]


# --- which way a write goes: a clear message when it cannot go either ------------------------------------------

NO_ROUTE = ("say where the {action} goes: --operator URL (or KUBEARQ_OPERATOR_URL), the operator's dashboard, e.g. "
            "http://localhost:8081 after `kubectl -n kubearq port-forward svc/kubearq-operator 8081`, which lets your "
            "Kubernetes RBAC decide; or --direct, straight to REDIS_URL and DATABASE_URL, for cluster admins (RBAC is "
            "then not consulted)")


@pytest.mark.parametrize(("args", "message"), [
    (("retry", "a"), NO_ROUTE.format(action="retry")),
    (("discard", "--all-matching", "--function", "flaky"), NO_ROUTE.format(action="discard")),
    (("retry", "a", "--direct", "--operator", "http://127.0.0.1:8081"), "give --operator or --direct, not both"),
    (("retry", "a", "--direct", "--token", "abc"),
     "--token is sent to the operator; --direct uses REDIS_URL and DATABASE_URL, no token"),
    (("retry", "a", "--operator", "localhost:8081"),
     "--operator 'localhost:8081': give the URL of the operator's dashboard port, e.g. http://localhost:8081 after "
     "`kubectl -n kubearq port-forward svc/kubearq-operator 8081`, or its https:// address"),
])
async def test_a_write_with_nowhere_to_go_exits_2_naming_both_ways(
        redis: ArqRedis, capture: Jobs, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...], message: str) -> None:
    monkeypatch.delenv(OPERATOR_URL, raising=False)
    kept_in_redis = RedisFailedJobs(redis, cap=10)
    await kept_in_redis.record([failed("a")])
    said = await capture(*args)

    assert (said.code, said.out, said.err) == (2, "", f"kubearq jobs {args[0]}: {message}\n")
    assert await ids(kept_in_redis) == ["a"]
    assert await redis.zcard("arq:queue") == 0


async def test_direct_wins_over_the_operator_url_in_the_environment(
        redis: ArqRedis, capture: Jobs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OPERATOR_URL, f"http://127.0.0.1:{free_port()}")
    await RedisFailedJobs(redis, cap=10).record([failed("a")])
    said = await capture("discard", "a", "--direct")

    assert (said.code, said.out, said.err) == (0, "discarded a\n", "")


async def test_a_kubeconfig_user_with_a_client_certificate_is_told_to_give_a_token(
        capture: Jobs, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "admin",
        "clusters": [{"name": "local", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "admin", "user": {"client-certificate-data": "Y2VydA==", "client-key-data": "a2V5"}}],
        "contexts": [{"name": "admin", "context": {"cluster": "local", "user": "admin"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(config))
    said = await capture("retry", "a", "--operator", f"http://127.0.0.1:{free_port()}")

    assert (said.code, said.out, said.err) == (
        3, "", "kubearq jobs retry: your kubeconfig user logs in with a client certificate, which only the API server "
               "itself can check; the operator checks a bearer token (TokenReview): give one with --token "
               "\"$(kubectl create token NAME -n NAMESPACE)\" (a ServiceAccount's) or your identity provider's\n")


async def test_an_unreachable_operator_fails_naming_it(capture: Jobs) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    said = await capture("retry", "a", "--operator", url, "--token", "abc")

    assert (said.code, said.out) == (1, "")
    assert said.err.startswith(f"kubearq jobs retry: cannot reach the operator at {url}: ConnectError: ")
    assert said.err.endswith(" (is the dashboard enabled, and `kubectl -n kubearq port-forward svc/kubearq-operator "
                             "8081` running?)\n")
