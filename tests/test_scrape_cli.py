"""`kubearq scrape list|get|cancel|failures` and `kubearq queue list|stats` as a user meets them, through the real
`main([...])` on the `k8s` API (the emulator, or a real kube-apiserver), a real Redis and a real PostgreSQL."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix

from kubearq.core.connections import create_redis
from kubearq.core.contract import function_registry_key, job_id_for_page
from kubearq.core.queueing import NewJob, enqueue_many
from kubearq.operator.actions import CANCEL_ANNOTATION
from kubearq.operator.context import SCRAPE_REQUESTS
from kubearq.operator.kube import KubeObject
from kubearq.operator.main import default_reconcilers
from kubearq.worker.storage import RequestRef as StoredRequest
from kubearq.worker.storage import Storage
from tests.kubernetes import KubernetesUnderTest
from tests.polling import until
from tests.test_operator import ShiftedClock, replicas
from tests.test_schedule_cli import Cli, holds, leading
from tests.test_schedule_cli import kubearq as kubearq  # the fixture

T = 10.0
URLS = ["https://events.example/page/1", "https://events.example/page/2"]


async def create(k8s: KubernetesUnderTest, name: str, **spec: object) -> KubeObject:
    body = {"apiVersion": SCRAPE_REQUESTS.api_version, "kind": "ScrapeRequest", "metadata": {"name": name},
            "spec": {"urls": URLS, **spec}}
    return await k8s.api.create(SCRAPE_REQUESTS, body, namespace=k8s.namespace, timeout=T)


async def fetch(k8s: KubernetesUnderTest, name: str) -> KubeObject:
    return await k8s.api.get(SCRAPE_REQUESTS, name, namespace=k8s.namespace, timeout=T)


async def set_status(k8s: KubernetesUnderTest, name: str, **status: object) -> None:
    await k8s.api.patch_status(SCRAPE_REQUESTS, name, status, namespace=k8s.namespace, timeout=T)


FAILED_URLS = [{"url": "https://events.example/e/1", "error": "HTTPStatusError: 500", "tries": 3},
               {"url": "https://events.example/e/2", "error": "TimeoutError: read timed out", "tries": 3}]


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    client = create_redis(redis_url)
    yield client
    await client.aclose()


# --- scrape list / get ------------------------------------------------------------------------------------------


async def test_list_and_get_show_phase_progress_and_failures(k8s: KubernetesUnderTest, kubearq: Cli) -> None:
    await create(k8s, "events")
    await set_status(k8s, "events", phase="Running", progress="5/12", failedPages=2,
                     listingPages={"total": 2, "done": 2, "failed": 0, "deferred": 0},
                     detailPages={"total": 10, "done": 3, "failed": 2, "deferred": 1}, failedUrls=FAILED_URLS)
    await create(k8s, "shoes", queue="scrapes")

    listed = await kubearq("scrape", "list", "-n", k8s.namespace)
    wide = await kubearq("scrape", "list", "-n", k8s.namespace, "-o", "wide")
    shown = await kubearq("scrape", "get", "events", "-n", k8s.namespace)

    assert (listed.code, listed.err) == (0, "")
    rows = [line.split() for line in listed.out.splitlines()]
    assert rows[0] == ["NAME", "PHASE", "PROGRESS", "FAILED", "AGE"]
    assert [row[:4] for row in rows[1:]] == [["events", "Running", "5/12", "2"], ["shoes", "Pending", "0/0", "0"]]
    assert wide.out.splitlines()[0].split()[5:] == ["QUEUE", "LISTING", "DETAIL", "STARTED", "COMPLETED"]
    assert "scrapes" in wide.out.splitlines()[2].split()
    assert shown.out.splitlines()[2:7] == [
        "Phase:         Running", "Source:        2 listing URL(s) on queue arq:queue", "Progress:      5/12",
        "Listing pages: 2/2 (0 failed)", "Detail pages:  3/10 (2 failed)"]
    assert shown.out.splitlines()[-3:] == [
        "Failed pages:  2 (the first 2; `kubearq scrape failures events` lists them all)",
        "  https://events.example/e/1: HTTPStatusError: 500",
        "  https://events.example/e/2: TimeoutError: read timed out"]


@pytest.mark.parametrize("action", ["get", "cancel", "failures"])
async def test_an_unknown_request_is_said_as_such_with_exit_code_3(k8s: KubernetesUnderTest, kubearq: Cli,
                                                                   action: str) -> None:
    said = await kubearq("scrape", action, "events", "-n", k8s.namespace)
    assert (said.code, said.out, said.err) == (
        3, "", f'kubearq scrape {action}: scraperequest "events" not found in namespace "{k8s.namespace}"\n')


# --- cancel -----------------------------------------------------------------------------------------------------


async def test_cancel_takes_the_pages_off_the_queue_and_keeps_what_was_stored(
        k8s: KubernetesUnderTest, kubearq: Cli, redis: ArqRedis) -> None:
    uid = str((await create(k8s, "events"))["metadata"]["uid"])
    async with leading(k8s, redis):
        await until(lambda: queued_at_least(redis, 2), what="the listing pages enqueued")
        await until(lambda: started(k8s, "events"), what="the request started")
        said = await kubearq("scrape", "cancel", "events", "-n", k8s.namespace)
        again = await kubearq("scrape", "cancel", "events", "-n", k8s.namespace)

    status: dict[str, Any] = dict((await fetch(k8s, "events"))["status"])
    ask_id = said.out.split("(ask ")[1].split(")")[0]
    assert (said.code, said.err) == (0, "")
    assert said.out == (f"scraperequest/events cancelled (ask {ask_id}): 2 queued job(s) removed, 0 running job(s) "
                        "aborted; the results stored so far are kept\n")
    assert (status["phase"], status["conditions"][-1]["reason"]) == ("Cancelled", "Cancelled")
    assert await redis.zcard("arq:queue") == 0
    assert not await redis.exists(f"arq:job:{job_id_for_page(uid, URLS[0])}")
    assert (again.code, again.err) == (
        1, "kubearq scrape cancel: refused: not cancelled: the request already finished (phase Cancelled); nothing "
           "to stop\n")


async def queued_at_least(redis: ArqRedis, count: int) -> bool:
    return int(await redis.zcard("arq:queue")) >= count


async def started(k8s: KubernetesUnderTest, name: str) -> bool:
    return bool(((await fetch(k8s, name)).get("status") or {}).get("startTime"))


@pytest.mark.timeout(120)
async def test_a_running_operator_cancels_a_request_asked_from_the_cli(
        k8s: KubernetesUnderTest, kubearq: Cli, redis_url: str, redis: ArqRedis) -> None:
    await create(k8s, "events")
    async with replicas(k8s, redis_url, ShiftedClock(), ("solo",), reconcilers=default_reconcilers()):
        await until(lambda: holds(k8s, "solo"), within=30, what="leadership")
        await until(lambda: started(k8s, "events"), within=30, what="the request started")
        said = await kubearq("scrape", "cancel", "events", "-n", k8s.namespace, "--timeout", "20")

    assert (said.code, said.err) == (0, "")
    assert (await fetch(k8s, "events"))["status"]["phase"] == "Cancelled"
    assert await redis.zcard("arq:queue") == 0


async def test_cancel_without_waiting_leaves_the_ask_on_the_object(k8s: KubernetesUnderTest, kubearq: Cli) -> None:
    await create(k8s, "events")

    said = await kubearq("scrape", "cancel", "events", "-n", k8s.namespace, "--no-wait")

    ask = json.loads((await fetch(k8s, "events"))["metadata"]["annotations"][CANCEL_ANNOTATION])
    assert (said.code, said.out) == (0, f"scraperequest/events: cancellation asked (ask {ask['id']})\n")


# --- failures ---------------------------------------------------------------------------------------------------


async def test_failures_without_a_database_are_the_ones_kept_in_status_and_it_says_so(
        k8s: KubernetesUnderTest, kubearq: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    await create(k8s, "events")
    await set_status(k8s, "events", failedPages=30, failedUrls=FAILED_URLS)

    said = await kubearq("scrape", "failures", "events", "-n", k8s.namespace)

    assert said.code == 0
    assert said.err == ("the first 2 of 30 failed pages, as kept in status; set DATABASE_URL (the workers' PostgreSQL) "
                        "for all of them\n")
    assert said.out.splitlines() == [
        "URL                          KIND     TRIES   ERROR",
        "https://events.example/e/1   <none>   3       HTTPStatusError: 500",
        "https://events.example/e/2   <none>   3       TimeoutError: read timed out",
    ]


async def test_failures_with_a_database_are_every_failed_page_with_its_reason(
        k8s: KubernetesUnderTest, kubearq: Cli, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    obj = await create(k8s, "events")
    request = StoredRequest(uid=str(obj["metadata"]["uid"]), namespace=k8s.namespace, name="events")
    async with Storage(postgres_dsn, connect_timeout=30) as storage:
        await storage.migrate()
        for number in range(25):  # more than status keeps
            await storage.record_failure(request, f"https://events.example/e/{number:02}", "detail",
                                         "HTTPStatusError: 404", 1)
        await storage.record_failure(request, URLS[0], "listing", "RobotsDisallowed: /page/ is disallowed", 1)
    monkeypatch.setenv("DATABASE_URL", postgres_dsn)

    said = await kubearq("scrape", "failures", "events", "-n", k8s.namespace, "-o", "json")
    table = await kubearq("scrape", "failures", "events", "-n", k8s.namespace, "--limit", "1")

    assert (said.code, said.err) == (0, "")
    assert (said.json["source"], len(said.json["failures"])) == ("PostgreSQL", 26)
    listing = [item for item in said.json["failures"] if item["kind"] == "listing"]
    assert [(item["url"], item["error"]) for item in listing] == [(URLS[0], "RobotsDisallowed: /page/ is disallowed")]
    assert table.out.splitlines() == ["URL                           KIND     TRIES   ERROR",
                                      "https://events.example/e/00   detail   1       HTTPStatusError: 404"]


async def test_failures_from_a_database_without_the_workers_schema_say_so(
        k8s: KubernetesUnderTest, kubearq: Cli, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    await create(k8s, "events")
    monkeypatch.setenv("DATABASE_URL", postgres_dsn)

    said = await kubearq("scrape", "failures", "events", "-n", k8s.namespace)

    assert (said.code, said.err) == (1, "kubearq scrape failures: DATABASE_URL has no scrape_failures table: is it the "
                                        "workers' database (their migrations create it)?\n")


# --- queue list / stats -----------------------------------------------------------------------------------------


async def fill_queues(redis: ArqRedis) -> None:
    """arq:queue: 2 ready (one of them a minute old), 1 running, 1 deferred an hour; scrapes: 1 ready."""
    now_ms = int(float((await redis.time())[0]) * 1000)
    jobs = [NewJob("ready-old", "report", {}, defer_until_ms=now_ms - 60_000),
            NewJob("running", "report", {}, defer_until_ms=now_ms - 120_000),
            NewJob("ready-new", "report", {}, defer_until_ms=now_ms - 1_000),
            NewJob("deferred", "report", {}, defer_until_ms=now_ms + 3_600_000)]
    await enqueue_many(redis, "arq:queue", jobs)
    await redis.set(in_progress_key_prefix + "running", b"1")
    await enqueue_many(redis, "scrapes", [NewJob("page", "scrape_listing", {}, defer_until_ms=now_ms - 5_000)])
    await redis.hset(function_registry_key("arq:queue"),  # type: ignore[misc]
                     mapping={"report": "1", "sync_connections": "1"})
    await redis.zadd("arq:abort", {"gone": 1})  # ARQ's own set of aborted ids: no queue


async def test_queue_list_shows_ready_running_and_deferred_per_queue(kubearq: Cli, redis: ArqRedis) -> None:
    await fill_queues(redis)

    said = await kubearq("queue", "list")
    wide = await kubearq("queue", "list", "-o", "wide")

    assert (said.code, said.err) == (0, "")
    rows = [line.split() for line in said.out.splitlines()]
    assert rows[0] == ["QUEUE", "READY", "RUNNING", "DEFERRED", "OLDEST", "READY"]
    assert [row[:4] for row in rows[1:]] == [["arq:queue", "2", "1", "1"], ["scrapes", "1", "0", "0"]]
    assert re.fullmatch(r"1m\ds", rows[1][4]), rows[1]  # the oldest ready job, not the running one
    assert wide.out.splitlines()[1].split()[-2:] == ["arq-queue-1df91f41fe", "report,sync_connections"]


async def test_queue_stats_of_one_queue(kubearq: Cli, redis: ArqRedis) -> None:
    await fill_queues(redis)

    said = await kubearq("queue", "stats")
    as_json = await kubearq("queue", "stats", "scrapes", "-o", "json")

    assert said.out.splitlines()[:4] == ["Queue:             arq:queue (label arq-queue-1df91f41fe)",
                                         "Ready:             2", "Running:           1", "Deferred:          1"]
    assert said.out.splitlines()[5] == "Functions served:  report, sync_connections"
    [scrapes] = as_json.json["queues"]
    assert {key: scrapes[key] for key in ("queue", "ready", "running", "deferred", "exact", "functions")} == {
        "queue": "scrapes", "ready": 1, "running": 0, "deferred": 0, "exact": True, "functions": []}
    assert 4 <= scrapes["oldestReadyAgeSeconds"] < 30


async def test_queue_commands_say_what_is_wrong_with_redis(kubearq: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    bad_scheme = await kubearq("queue", "list", "--redis-url", "http://localhost:6379")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    unreachable = await kubearq("queue", "stats")

    assert (bad_scheme.code, bad_scheme.err) == (
        2, "kubearq queue list: --redis-url / REDIS_URL: REDIS_URL must start with redis://, rediss:// (TLS) or "
           "unix://, not 'http://localhost:6379'\n")
    assert unreachable.code == 1
    assert unreachable.err.startswith(
        "kubearq queue stats: cannot read Redis at redis://127.0.0.1:1/0: ConnectionError")
