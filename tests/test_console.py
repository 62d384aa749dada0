"""The dashboard (kubearq.operator.console) over HTTP, on real Redis and PostgreSQL, and, where a token must be
checked, on a real kube-apiserver: who may see and do what is decided by that user's own RBAC (TokenReview, then
SubjectAccessReview), forms need the session's CSRF token, and the failed-jobs page pages by keyset at 100,000 rows;
schedules show their next ticks as the leader will fire them (DST included), the workers page what real worker processes
publish with their heartbeats (a killed one shown gone), and a job's page the outcome of a re-drive."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from kubearq.commands.schedule import fire_times
from kubearq.core.connections import create_redis
from kubearq.core.contract import Origin as JobOrigin
from kubearq.core.contract import function_registry_key
from kubearq.core.failedjobs import encode_cursor
from kubearq.core.failedjobstores import PostgresFailedJobs
from kubearq.core.observability import PortInUseError
from kubearq.core.workers import WORKERS_KEY, WorkerBeat, decode, encode, list_workers, publish, worker_key
from kubearq.demo.services import RedisServer, free_port
from kubearq.operator import kube
from kubearq.operator.actions import TRIGGER_ANNOTATION, Ask, read_ask
from kubearq.operator.console.pages import (
    Key,
    fire_preview,
    notice,
    schedule_row,
    scrape_row,
    throughput_by_queue,
    worker_row,
)
from kubearq.operator.console.reviews import AnswerCache
from kubearq.operator.console.server import Console, ConsoleConfig, start_console
from kubearq.operator.console.session import COOKIE, Origin, csrf_token
from kubearq.operator.context import SCRAPE_REQUESTS, SYNC_SCHEDULES
from kubearq.operator.rbac import (
    dashboard_review_rules,
    dashboard_write_rules,
    lease_rules,
    operator_rules,
    operator_user_rules,
    viewer_rules,
)
from kubearq.operator.settings import OperatorSettings
from kubearq.worker.storage import Storage
from tests.failing_jobs import BROKEN_KEY
from tests.kubernetes import KubernetesUnderTest
from tests.operator_thread import operator_in_thread
from tests.test_failed_jobs import arq_result, enqueue, keeping_worker, kept_job
from tests.test_operator import eventually
from tests.test_runtime import running_worker, worker_process

T = 10.0
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Dashboard:
    console: Console
    objects: dict[Key, kube.KubeObject]
    url: str

    def client(self, **options: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=T, **options)


async def _dashboard(k8s: KubernetesUnderTest, redis: Redis, database_url: str | None = None,
                     objects: dict[Key, kube.KubeObject] | None = None) -> Console:
    objects = objects or {}
    return await start_console(k8s.api, redis, lambda: objects, ConsoleConfig(queues=lambda: {"arq:queue"}),
                               host="127.0.0.1", port=0, database_url=database_url, cache_seconds=0)


@pytest.fixture(autouse=True)
def _every_log_line_is_written(caplog: pytest.LogCaptureFixture) -> None:
    """Log records are made at every level here, so a bad one (a field clashing with LogRecord's) fails a test."""
    caplog.set_level(logging.DEBUG, logger="kubearq.operator.console")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def dashboard(k8s: KubernetesUnderTest, redis: Redis) -> AsyncIterator[Dashboard]:
    """The console as the operator serves it (its API client is the test's admin), over the test's objects."""
    objects: dict[Key, kube.KubeObject] = {}

    def observe(kind: str, body: kube.KubeObject) -> None:
        metadata = body.get("metadata", {})
        objects[(kind, str(metadata.get("namespace")), str(metadata.get("name")))] = body

    console = await start_console(k8s.api, redis, lambda: objects, ConsoleConfig(queues=lambda: {"arq:queue"}),
                                  host="127.0.0.1", port=0, cache_seconds=0, observe=observe)
    try:
        yield Dashboard(console, objects, f"http://127.0.0.1:{console.port}")
    finally:
        await console.stop()


async def _schedule(k8s: KubernetesUnderTest, dashboard: Dashboard, name: str = "nightly") -> kube.KubeObject:
    body = await k8s.api.create(SYNC_SCHEDULES, {
        "apiVersion": SYNC_SCHEDULES.api_version, "kind": "SyncSchedule", "metadata": {"name": name},
        "spec": {"schedule": "0 3 * * *", "job": {"function": "sync_connections"}}},
        namespace=k8s.namespace, timeout=T)
    dashboard.objects[("SyncSchedule", k8s.namespace, name)] = body
    return body


async def _log_in(client: httpx.AsyncClient, token: str) -> str:
    """Log a browser-like client in through the form (the cookie); the CSRF token its pages then carry."""
    answer = await client.post("/login", data={"token": token, "next": "/schedules"})
    assert answer.status_code == 303, answer.text
    page = await client.get("/schedules")
    found = CSRF.search(page.text)
    assert found, page.text
    return found.group(1)


# --- without a cluster's authentication -------------------------------------------------------------------------

async def test_without_a_token_every_page_sends_you_to_the_login_page(dashboard: Dashboard) -> None:
    async with dashboard.client() as client:
        answer = await client.get("/failed-jobs?function=x")
        login = await client.get(answer.headers["location"])
    location = urlsplit(answer.headers["location"])
    assert (answer.status_code, location.path, parse_qs(location.query)) == (
        303, "/login", {"next": ["/failed-jobs?function=x"]})
    assert login.status_code == 200
    assert 'name="token"' in login.text
    assert 'name="next" value="/failed-jobs?function=x"' in login.text
    assert login.headers["Content-Security-Policy"].startswith("default-src 'self'")


async def test_a_post_without_any_token_is_401_not_a_redirect(dashboard: Dashboard) -> None:
    async with dashboard.client() as client:
        answer = await client.post("/schedules/team-a/nightly/trigger", data={})
    assert answer.status_code == 401
    assert "log in first: this request carried no token" in answer.text


async def test_login_goes_on_only_to_a_path_of_this_site(dashboard: Dashboard) -> None:
    async with dashboard.client() as client:
        page = await client.get("/login", params={"next": "//evil.example/steal"})
    assert 'name="next" value="/schedules"' in page.text


def test_a_form_from_another_origin_is_told_apart_from_our_own() -> None:
    own = "http://127.0.0.1:8081"
    assert Origin("http://127.0.0.1:8081", None, "same-origin").cross_site(own) is None
    assert Origin(None, None, None).cross_site(own) is None  # then the CSRF token alone decides
    assert Origin("https://evil.example", None, None).cross_site(own) == (
        "it came from https://evil.example, not from the dashboard's own origin http://127.0.0.1:8081")
    assert Origin(None, "https://evil.example/page", None).cross_site(own) is not None
    assert Origin(None, None, "cross-site").cross_site(own) == (
        "the browser says this request came from a cross-site page (Sec-Fetch-Site)")


# --- on a real kube-apiserver: TokenReview and SubjectAccessReview ------------------------------------------------

@pytest.mark.cluster
async def test_a_bad_token_is_refused_with_401_and_a_message_saying_why(dashboard: Dashboard) -> None:
    async with dashboard.client() as client:
        form = await client.post("/login", data={"token": "eyJhbGciOiJSUzI1NiJ9.forged.token"})
        header = await client.get("/schedules", headers={"Authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.forged"})
    async with dashboard.client(cookies={COOKIE: "expired-or-revoked"}) as client:
        cookie = await client.get("/schedules")
    for answer in (form, header, cookie):
        assert answer.status_code == 401
        assert "the Kubernetes API did not accept this token" in answer.text
        assert "log in again with a new one (`kubectl create token NAME`)" in answer.text
    assert COOKIE not in form.cookies
    assert header.headers["WWW-Authenticate"] == 'Bearer realm="kubearq"'


@pytest.mark.cluster
async def test_a_viewer_sees_schedules_but_a_trigger_is_403_naming_the_verb_and_resource(
        k8s: KubernetesUnderTest, dashboard: Dashboard) -> None:
    await _schedule(k8s, dashboard)
    viewer = await k8s.login_as_service_account("viewer", viewer_rules())
    async with dashboard.client() as client:
        csrf = await _log_in(client, str(viewer.connection.token))
        page = await client.get("/schedules")
        answer = await client.post(f"/schedules/{k8s.namespace}/nightly/trigger", data={"csrf": csrf})
    refusal = (f'syncschedules.kubearq.dev "nightly" is forbidden: User "{viewer.username}" cannot trigger resource '
               f'"syncschedules" in API group "kubearq.dev" in the namespace "{k8s.namespace}"')
    assert page.status_code == 200
    assert f'id="schedule-{k8s.namespace}-nightly"' in page.text
    # the button is there but refused, and says why (for the namespace: the action asks again for the object)
    hint = refusal.replace(' "nightly"', "").replace('"', "&#34;")
    assert f'disabled title="{hint}" id="trigger-{k8s.namespace}-nightly"' in page.text
    assert answer.status_code == 403
    assert refusal in answer.text.replace("&#34;", '"')
    stored = await k8s.api.get(SYNC_SCHEDULES, "nightly", namespace=k8s.namespace, timeout=T)
    assert TRIGGER_ANNOTATION not in (stored["metadata"].get("annotations") or {})


@pytest.mark.cluster
async def test_an_operator_users_trigger_patches_the_annotation_the_leader_acts_on(
        k8s: KubernetesUnderTest, dashboard: Dashboard) -> None:
    await _schedule(k8s, dashboard)
    runner = await k8s.login_as_service_account("runner", operator_user_rules())
    async with dashboard.client() as client:
        csrf = await _log_in(client, str(runner.connection.token))
        answer = await client.post(f"/schedules/{k8s.namespace}/nightly/trigger", data={"csrf": csrf})
        shown = await client.get(answer.headers["location"])
    stored = await k8s.api.get(SYNC_SCHEDULES, "nightly", namespace=k8s.namespace, timeout=T)
    ask = read_ask(stored["metadata"].get("annotations"), TRIGGER_ANNOTATION)
    assert answer.status_code == 303
    assert isinstance(ask, Ask)
    assert ask.requested_by == runner.username
    assert datetime.now(UTC) - ask.requested_at < timedelta(minutes=1)
    assert f"Asked to trigger {k8s.namespace}/nightly now (request {ask.id})" in shown.text


@pytest.mark.cluster
async def test_an_operator_user_suspends_and_resumes_and_cancels(k8s: KubernetesUnderTest,
                                                                 dashboard: Dashboard) -> None:
    await _schedule(k8s, dashboard)
    scrape = await k8s.api.create(SCRAPE_REQUESTS, {
        "apiVersion": SCRAPE_REQUESTS.api_version, "kind": "ScrapeRequest", "metadata": {"name": "events"},
        "spec": {"urls": ["https://events.example/page/1"]}}, namespace=k8s.namespace, timeout=T)
    dashboard.objects[("ScrapeRequest", k8s.namespace, "events")] = scrape
    runner = await k8s.login_as_service_account("runner", operator_user_rules())
    async with dashboard.client() as client:
        csrf = await _log_in(client, str(runner.connection.token))
        await client.post(f"/schedules/{k8s.namespace}/nightly/suspend", data={"csrf": csrf})
        suspended = await k8s.api.get(SYNC_SCHEDULES, "nightly", namespace=k8s.namespace, timeout=T)
        page = await client.get("/schedules")
        await client.post(f"/schedules/{k8s.namespace}/nightly/resume", data={"csrf": csrf})
        resumed = await k8s.api.get(SYNC_SCHEDULES, "nightly", namespace=k8s.namespace, timeout=T)
        cancelled = await client.post(f"/scrapes/{k8s.namespace}/events/cancel", data={"csrf": csrf})
    stored = await k8s.api.get(SCRAPE_REQUESTS, "events", namespace=k8s.namespace, timeout=T)
    assert (suspended["spec"]["suspend"], resumed["spec"]["suspend"]) == (True, False)
    assert 'id="resume-' in page.text  # the page showed it suspended at once (the answer of the patch)
    assert cancelled.status_code == 303
    assert "kubearq.dev/cancel" in stored["metadata"]["annotations"]


@pytest.mark.cluster
async def test_a_form_without_the_csrf_token_or_from_another_site_is_refused_and_changes_nothing(
        k8s: KubernetesUnderTest, dashboard: Dashboard) -> None:
    await _schedule(k8s, dashboard)
    runner = await k8s.login_as_service_account("runner", operator_user_rules())
    path = f"/schedules/{k8s.namespace}/nightly/trigger"
    async with dashboard.client() as client:
        csrf = await _log_in(client, str(runner.connection.token))
        missing = await client.post(path, data={})
        wrong = await client.post(path, data={"csrf": csrf_token("another session's token")})
        elsewhere = await client.post(path, data={"csrf": csrf}, headers={"Origin": "https://evil.example"})
    assert [answer.status_code for answer in (missing, wrong, elsewhere)] == [403, 403, 403]
    assert "refused a form without this session&#39;s CSRF token" in missing.text
    assert "refused a form sent from another site: it came from https://evil.example" in elsewhere.text
    stored = await k8s.api.get(SYNC_SCHEDULES, "nightly", namespace=k8s.namespace, timeout=T)
    assert TRIGGER_ANNOTATION not in (stored["metadata"].get("annotations") or {})


@pytest.mark.cluster
async def test_a_bearer_header_needs_no_csrf_token_a_script_is_no_browser(k8s: KubernetesUnderTest,
                                                                          dashboard: Dashboard) -> None:
    await _schedule(k8s, dashboard)
    runner = await k8s.login_as_service_account("runner", operator_user_rules())
    async with dashboard.client(headers={"Authorization": f"Bearer {runner.connection.token}"}) as client:
        answer = await client.post(f"/schedules/{k8s.namespace}/nightly/suspend")
    assert answer.status_code == 303
    stored = await k8s.api.get(SYNC_SCHEDULES, "nightly", namespace=k8s.namespace, timeout=T)
    assert stored["spec"]["suspend"] is True


@pytest.mark.cluster
async def test_a_user_bound_in_another_namespace_sees_none_of_these(k8s: KubernetesUnderTest,
                                                                     dashboard: Dashboard) -> None:
    await _schedule(k8s, dashboard)
    outsider = await k8s.login_as_service_account("outsider", [
        {"apiGroups": ["kubearq.dev"], "resources": ["failedjobs"], "verbs": ["get"]}])
    async with dashboard.client(headers={"Authorization": f"Bearer {outsider.connection.token}"}) as client:
        answer = await client.get("/schedules")
        queues = await client.get("/queues")
        workers = await client.get("/workers")
    assert answer.status_code == 403
    assert (f'User "{outsider.username}" cannot list resource "syncschedules" in API group "kubearq.dev" '
            "at the cluster scope") in answer.text.replace("&#34;", '"')
    assert (queues.status_code, workers.status_code) == (403, 403)
    assert (f'User "{outsider.username}" cannot list resource "queues" in API group "kubearq.dev" at the cluster '
            "scope") in workers.text.replace("&#34;", '"')


# --- failed jobs at 100,000 rows ---------------------------------------------------------------------------------

ROWS = 100_000
NAIVE_DEEP_PAGE = "SELECT * FROM failed_jobs ORDER BY failed_at DESC, job_id DESC OFFSET 99950 LIMIT 51"


async def _fill_failed_jobs(database_url: str, namespace: str) -> None:
    async with Storage(database_url) as storage:
        await storage.migrate()
    connection = await asyncpg.connect(database_url)
    try:
        # One statement: 100,000 failures a second apart, over 10 functions; every 1000th of the test's namespace.
        await connection.execute("""
            INSERT INTO failed_jobs (job_id, function, queue, reason, error, tries, worker, failed_at,
                                     origin_namespace, origin_kind, origin_name, kwargs)
            SELECT 'job-' || lpad(n::text, 6, '0'), 'sync_' || (n % 10), 'arq:queue', 'Failed',
                   'ValueError: boom ' || n, 3, 'worker-0', now() - n * interval '1 second',
                   CASE WHEN n % 1000 = 0 THEN $1 ELSE 'elsewhere' END, 'SyncSchedule', 'nightly',
                   '{"mode": "realtime"}'
            FROM generate_series(1, $2) AS n""", namespace, ROWS)
        await connection.execute("ANALYZE failed_jobs")
    finally:
        await connection.close()


async def _timed(client: httpx.AsyncClient, path: str, params: dict[str, str]) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    answer = await client.get(path, params=params or None)
    return answer, (time.perf_counter() - started) * 1000


@pytest.mark.cluster
async def test_the_failed_jobs_page_pages_100k_rows_by_keyset(
        k8s: KubernetesUnderTest, redis: Redis, postgres_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    await _fill_failed_jobs(postgres_dsn, k8s.namespace)
    console = await _dashboard(k8s, redis, postgres_dsn)
    viewer = await k8s.login_as_service_account("viewer", viewer_rules())
    deep = encode_cursor(await _job(console, "job-099950"))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{console.port}", timeout=T, headers={
                "Authorization": f"Bearer {viewer.connection.token}"}) as client:
            await client.get("/failed-jobs")  # warm: the pool's first connection, the reviews
            first, first_ms = await _timed(client, "/failed-jobs", {})
            second_path = re.search(r'href="\?([^"]+)" id="next-page"', first.text)
            assert second_path is not None
            second, second_ms = await _timed(client, "/failed-jobs?" + second_path.group(1).replace("&amp;", "&"), {})
            by_function, function_ms = await _timed(client, "/failed-jobs", {"function": "sync_7"})
            deep_page, deep_ms = await _timed(client, "/failed-jobs", {"after": deep})
            by_error, error_ms = await _timed(client, "/failed-jobs", {"error": "boom 99999"})
        keyset_ms, offset_ms = await _deep_page_queries_ms(console, deep, postgres_dsn)
    finally:
        await console.stop()
    with capsys.disabled():
        print(f"\nfailed-jobs page at {ROWS} rows, over HTTP with a TokenReview and SubjectAccessReviews: "
              f"first {first_ms:.1f} ms, second {second_ms:.1f} ms, function filter {function_ms:.1f} ms, "
              f"deep (row 99,951) {deep_ms:.1f} ms, error text {error_ms:.1f} ms; "
              f"the deep page's query alone {keyset_ms:.1f} ms by keyset, {offset_ms:.1f} ms by OFFSET 99,950")
    assert all(answer.status_code == 200 for answer in (first, second, by_function, deep_page, by_error))
    assert _ids(first)[:2] == ["job-000001", "job-000002"]
    assert len(_ids(first)) == 50
    assert _ids(second)[0] == "job-000051"
    assert len(_ids(by_function)) == 50
    assert all(int(job_id.removeprefix("job-")) % 10 == 7 for job_id in _ids(by_function))  # sync_7's
    assert _ids(deep_page) == [f"job-{n:06d}" for n in range(99_951, 100_001)]
    assert _ids(by_error) == ["job-099999"]


async def _job(console: Console, job_id: str) -> Any:
    job = await console.failed_jobs.get(job_id)
    assert job is not None
    return job


async def _deep_page_queries_ms(console: Console, cursor: str, database_url: str) -> tuple[float, float]:
    """The same deep page read by the store (keyset) and by a naive OFFSET, best of three each."""
    keyset, offset = [], []
    connection = await asyncpg.connect(database_url)
    try:
        for _ in range(3):
            started = time.perf_counter()
            await console.failed_jobs.page(after=cursor, limit=50)
            keyset.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            await connection.fetch(NAIVE_DEEP_PAGE)
            offset.append((time.perf_counter() - started) * 1000)
    finally:
        await connection.close()
    return min(keyset), min(offset)


def _ids(answer: httpx.Response) -> list[str]:
    return re.findall(r'<tr id="job-([^"]+)">', answer.text)


@pytest.mark.cluster
async def test_redrive_is_the_callers_to_decide_per_namespace(
        k8s: KubernetesUnderTest, redis: Redis, postgres_dsn: str) -> None:
    await _fill_failed_jobs(postgres_dsn, k8s.namespace)
    console = await _dashboard(k8s, redis, postgres_dsn)
    viewer = await k8s.login_as_service_account("viewer", viewer_rules())
    runner = await k8s.login_as_service_account("runner", operator_user_rules())
    url = f"http://127.0.0.1:{console.port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=T, headers={
                "Authorization": f"Bearer {viewer.connection.token}"}) as client:
            refused = await client.post("/failed-jobs/redrive", data={"job_id": "job-001000"})
        async with httpx.AsyncClient(base_url=url, timeout=T, headers={
                "Authorization": f"Bearer {runner.connection.token}"}) as client:
            done = await client.post("/failed-jobs/redrive", data={"job_id": "job-001000"})
            again = await client.post("/failed-jobs/redrive", data={"job_id": "job-001000"})
            gone = await client.post("/failed-jobs/discard", data={"job_id": "no-such-job"})
        kept = await console.failed_jobs.get("job-001000")
    finally:
        await console.stop()
    assert refused.status_code == 403
    assert (f'failedjobs.kubearq.dev is forbidden: User "{viewer.username}" cannot redrive resource "failedjobs" '
            f'in API group "kubearq.dev" in the namespace "{k8s.namespace}"') in refused.text.replace("&#34;", '"')
    assert (done.status_code, again.status_code) == (303, 303)
    assert "redriven=1&enqueued=1" in done.headers["location"]
    assert "redriven=1&enqueued=0" in again.headers["location"]  # idempotent: twice is one new job
    assert kept is not None
    assert kept.redriven_as is not None
    assert await redis.zcard("arq:queue") == 1
    assert gone.status_code == 404
    assert "no failed job no-such-job is kept" in gone.text


# --- served by the operator, on exactly its RBAC -------------------------------------------------------------------

@pytest.mark.cluster
async def test_the_operator_serves_the_dashboard_on_exactly_its_rbac(k8s: KubernetesUnderTest, redis_url: str,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    await k8s.api.create(SYNC_SCHEDULES, {
        "apiVersion": SYNC_SCHEDULES.api_version, "kind": "SyncSchedule", "metadata": {"name": "nightly"},
        "spec": {"schedule": "0 3 * * *", "job": {"function": "sync_connections"}}},
        namespace=k8s.namespace, timeout=T)
    operator = await k8s.login_as_service_account("kubearq-operator", [
        *operator_rules(), *lease_rules(OperatorSettings().lease_name), *dashboard_review_rules(),
        *dashboard_write_rules()])
    runner = await k8s.login_as_service_account("runner", operator_user_rules())
    port = free_port()
    settings = OperatorSettings(redis_url=redis_url, namespace=k8s.namespace, lease_namespace=k8s.namespace,
                                http_host="127.0.0.1", http_port=free_port(), tenancy="open",
                                dashboard_enabled=True, dashboard_host="127.0.0.1", dashboard_port=port)
    async with (operator_in_thread(settings, operator.connection),
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=T, headers={
                    "Authorization": f"Bearer {runner.connection.token}"}) as client):
        page = await eventually(lambda: _listed(client, f'id="schedule-{k8s.namespace}-nightly"'),
                                what="the schedule on the dashboard", within=30)
        triggered = await client.post(f"/schedules/{k8s.namespace}/nightly/trigger")
    stored = await k8s.api.get(SYNC_SCHEDULES, "nightly", namespace=k8s.namespace, timeout=T)
    assert 'id="trigger-' in page
    assert triggered.status_code == 303
    assert isinstance(read_ask(stored["metadata"].get("annotations"), TRIGGER_ANNOTATION), Ask)
    refused = [record.getMessage() for record in caplog.records
               # a port such as 40337 holds "403" too: whole numbers only
               if record.levelno >= logging.ERROR or re.search(r"\b403\b|Forbidden", record.getMessage())]
    assert refused == []


async def _listed(client: httpx.AsyncClient, wanted: str) -> str | None:
    try:
        answer = await client.get("/schedules")
    except httpx.TransportError:
        return None  # not serving yet
    return answer.text if answer.status_code == 200 and wanted in answer.text else None


@pytest.mark.cluster
async def test_bad_input_gets_a_clear_message_and_changes_nothing(k8s: KubernetesUnderTest, redis: Redis) -> None:
    console = await _dashboard(k8s, redis, f"postgresql://postgres@127.0.0.1:{free_port()}/gone")
    runner = await k8s.login_as_service_account("runner", operator_user_rules())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{console.port}", timeout=T, headers={
                "Authorization": f"Bearer {runner.connection.token}"}) as client:
            unknown = await client.post(f"/schedules/{k8s.namespace}/ghost/trigger")
            cursor = await client.get("/failed-jobs", params={"after": "not-a-cursor"})
            outage = await client.get("/failed-jobs")
            header = await client.get("/schedules", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    finally:
        await console.stop()
    assert (unknown.status_code, cursor.status_code, outage.status_code, header.status_code) == (404, 400, 503, 401)
    assert f"there is no SyncSchedule ghost in namespace {k8s.namespace}" in unknown.text
    assert "is not a cursor a page of failed jobs returned" in cursor.text
    assert "Redis or PostgreSQL (where queues and failed jobs are kept) did not answer" in outage.text
    assert "the Authorization header must be `Bearer &lt;token&gt;`" in header.text


ROLE_BINDINGS = kube.Resource("rbac.authorization.k8s.io", "v1", "rolebindings")


async def _bound_in_namespace(k8s: KubernetesUnderTest, name: str, rules: list[Any]) -> tuple[str, str]:
    """A ServiceAccount given `rules` by a RoleBinding in the test's namespace only, as a team is; (user, token)."""
    role = f"{k8s.namespace}-{name}"
    await k8s.api.create(kube.Resource("", "v1", "serviceaccounts"), {"metadata": {"name": name}},
                         namespace=k8s.namespace, timeout=T)
    await k8s.create_cluster_object(kube.Resource("rbac.authorization.k8s.io", "v1", "clusterroles"),
                                    {"metadata": {"name": role}, "rules": rules})
    await k8s.api.create(ROLE_BINDINGS, {
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": k8s.namespace}]},
        namespace=k8s.namespace, timeout=T)
    async with k8s.http_client(timeout=T) as client:
        issued = await client.post(f"/api/v1/namespaces/{k8s.namespace}/serviceaccounts/{name}/token", json={
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}})
    issued.raise_for_status()
    return f"system:serviceaccount:{k8s.namespace}:{name}", str(issued.json()["status"]["token"])


@pytest.mark.cluster
async def test_a_team_bound_in_its_namespace_sees_and_redrives_only_its_own(
        k8s: KubernetesUnderTest, redis: Redis, postgres_dsn: str) -> None:
    await _fill_failed_jobs(postgres_dsn, k8s.namespace)  # every 1000th job is of the test's namespace
    console = await _dashboard(k8s, redis, postgres_dsn, objects={
        ("SyncSchedule", namespace, "nightly"): {"metadata": {"namespace": namespace, "name": "nightly"}}
        for namespace in (k8s.namespace, "elsewhere")})
    user, token = await _bound_in_namespace(k8s, "team", operator_user_rules())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{console.port}", timeout=T, headers={
                "Authorization": f"Bearer {token}"}) as client:
            everything = await client.get("/failed-jobs")
            own = await client.get("/failed-jobs", params={"namespace": k8s.namespace})
            schedules = await client.get("/schedules")
            theirs = await client.post("/failed-jobs/redrive", data={"job_id": ["job-001000", "job-000001"]})
            mine = await client.post("/failed-jobs/redrive", data={"job_id": "job-001000"})
    finally:
        await console.stop()
    assert everything.status_code == 403
    assert "to see one namespace&#39;s, search with Namespace set to it" in everything.text
    assert own.status_code == 200
    assert _ids(own)[:2] == ["job-001000", "job-002000"]
    assert f'id="schedule-{k8s.namespace}-nightly"' in schedules.text
    assert 'id="schedule-elsewhere-nightly"' not in schedules.text
    assert theirs.status_code == 403  # one of them is another namespace's: nothing is re-driven
    assert (f'User "{user}" cannot redrive resource "failedjobs" in API group "kubearq.dev" in the namespace '
            '"elsewhere"') in theirs.text.replace("&#34;", '"')
    assert mine.status_code == 303
    assert "redriven=1&enqueued=1" in mine.headers["location"]  # the refused request had re-driven nothing
    assert await redis.zcard("arq:queue") == 1


@pytest.mark.cluster
async def test_the_queues_page_splits_ready_running_and_deferred_and_names_the_functions_served(
        k8s: KubernetesUnderTest, dashboard: Dashboard, redis: Redis) -> None:
    now_ms = int(time.time() * 1000)
    await redis.zadd("arq:queue", {"ready-1": now_ms - 5000, "ready-2": now_ms - 1000, "later": now_ms + 600_000})
    await redis.hset(function_registry_key("arq:queue"), mapping={"sync_connections": str(time.time())})  # type: ignore[misc]
    viewer = await k8s.login_as_service_account("viewer", viewer_rules())
    async with dashboard.client(headers={"Authorization": f"Bearer {viewer.connection.token}"}) as client:
        page = await client.get("/queues")
        summary = await client.get("/summary.json")
    row = page.text.split('<tr data-queue="arq:queue">')[1].split("</tr>")[0]
    assert re.findall(r'data-field="(\w+)">([^<]+)<', row)[:3] == [("ready", "2"), ("running", "0"),
                                                                   ("deferred", "1")]
    assert "<code>sync_connections</code>" in row
    stats = summary.json()["queues"][0]
    assert (stats["queue"], stats["ready"], stats["running"], stats["deferred"]) == ("arq:queue", 2, 0, 1)
    assert stats["oldest_ready_age_seconds"] >= 5


# --- the review cache ------------------------------------------------------------------------------------------

async def test_a_review_answer_is_reused_for_its_seconds_and_concurrent_misses_ask_once() -> None:
    now = [100.0]
    asked: list[str] = []
    cache: AnswerCache[str] = AnswerCache(10.0, clock=lambda: now[0])

    async def ask() -> str:
        asked.append("ask")
        await asyncio.sleep(0)
        return f"answer {len(asked)}"

    together = await asyncio.gather(*(cache.get("key", ask) for _ in range(5)))
    now[0] += 9.9
    reused = await cache.get("key", ask)
    now[0] += 0.2
    fresh = await cache.get("key", ask)
    assert (together, reused, fresh, len(asked)) == (["answer 1"] * 5, "answer 1", "answer 2", 2)


# --- what the pages show ----------------------------------------------------------------------------------------

def test_a_crafted_link_cannot_make_the_page_say_something_else() -> None:
    assert notice({"done": "trigger", "ns": "team-a", "name": "nightly", "ask": "20261202T101500-0a1b2c3d"}) == (
        "Asked to trigger team-a/nightly now (request 20261202T101500-0a1b2c3d); the leader enqueues it.")
    assert notice({"done": "trigger", "ns": "team-a", "name": "Your account is locked, call…",
                   "ask": "20261202T101500-0a1b2c3d"}) is None
    assert notice({"done": "discard", "discarded": "all of them"}) == "Discarded 0 failed jobs."
    assert notice({"done": "<script>"}) is None


def test_a_scrape_row_counts_finished_pages_of_both_kinds() -> None:
    row = scrape_row({"metadata": {"namespace": "team-a", "name": "events"}, "status": {
        "phase": "Running", "listingPages": {"total": 2, "done": 2},
        "detailPages": {"total": 8, "done": 3, "failed": 1}}})
    assert (row["finished"], row["total"], row["finished_all"], row["path"]) == (6, 10, False, "/scrapes/team-a/events")


# --- schedules: when they fire next, and the ticks they did not run -------------------------------------------------

def test_the_preview_is_the_operators_own_ticks_in_the_schedules_zone_with_the_dst_change_marked() -> None:
    before_spring_forward = datetime(2026, 3, 27, 12, 0, tzinfo=UTC)

    preview = fire_preview("30 2 * * *", "Europe/Berlin", before_spring_forward)

    assert [(tick["local"], tick["note"]) for tick in preview] == [
        ("2026-03-28 02:30 CET", ""),
        ("2026-03-29 03:00 CEST", "UTC offset now +02:00 (CEST)"),  # 02:30 does not exist that night: once, at 03:00
        ("2026-03-30 02:30 CEST", ""), ("2026-03-31 02:30 CEST", ""), ("2026-04-01 02:30 CEST", "")]
    # the same ticks `kubearq schedule preview` prints
    cli = fire_times("30 2 * * *", "Europe/Berlin", before_spring_forward, 5)
    assert [datetime.fromisoformat(tick["utc"]) for tick in preview] == [
        datetime.fromisoformat(tick["utc"].replace("Z", "+00:00")) for tick in cli]
    assert [tick["note"] for tick in preview] == [tick["note"] for tick in cli]


def test_a_schedule_the_leader_would_refuse_shows_why_instead_of_a_preview() -> None:
    row = schedule_row({"metadata": {"namespace": "team-a", "name": "typo"},
                        "spec": {"schedule": "0 25 * * *", "timeZone": "Europe/Berlin"}}, datetime.now(UTC))
    zone = schedule_row({"metadata": {"namespace": "team-a", "name": "zone"},
                         "spec": {"schedule": "0 3 * * *", "timeZone": "Mars/Olympus"}}, datetime.now(UTC))
    assert (row["preview"], row["preview_error"]) == ([], "'0 25 * * *' is not a valid cron expression (bad hour); "
                                                          "e.g. '*/15 * * * *' (every 15 minutes), '0 3 * * *' "
                                                          "(daily 03:00) or '@daily'")
    assert zone["preview_error"].startswith("'Mars/Olympus' is not an IANA time zone")


@pytest.mark.cluster
async def test_the_schedules_page_shows_the_next_five_ticks_and_the_skipped_and_missed_counts(
        k8s: KubernetesUnderTest, dashboard: Dashboard) -> None:
    every_other_month: kube.KubeObject = {"metadata": {"namespace": k8s.namespace, "name": "bimonthly", "uid": "u-1"},
                         "spec": {"schedule": "0 12 1 */2 *", "timeZone": "Europe/Berlin", "jitterSeconds": 600,
                                  "job": {"function": "sync_connections"}},
                         "status": {"skippedTicks": 2, "missedTicks": 3}}
    dashboard.objects[("SyncSchedule", k8s.namespace, "bimonthly")] = every_other_month
    viewer = await k8s.login_as_service_account("viewer", viewer_rules())
    async with dashboard.client(headers={"Authorization": f"Bearer {viewer.connection.token}"}) as client:
        page = await client.get("/schedules")
    expected = fire_preview("0 12 1 */2 *", "Europe/Berlin", datetime.now(UTC))
    row = page.text.split(f'<tr id="schedule-{k8s.namespace}-bimonthly">')[1].split("</tr>")[0]
    shown = re.findall(r'<li><time datetime="([^"]+)"[^>]*>([^<]+)</time>(?: <span class="tag dst">([^<]+)</span>)?',
                       row)
    assert shown == [(tick["utc"], tick["local"], tick["note"]) for tick in expected]
    # six ticks a year, three in summer time: any five of them cross a change of the UTC offset
    assert any(tick["note"] for tick in expected)
    assert re.findall(r'data-field="(skipped|missed)">(\d+) ', row) == [("skipped", "2"), ("missed", "3")]
    assert "jitter up to 600 s" in row


# --- workers -----------------------------------------------------------------------------------------------------

def _beat(identity: str = "worker-a", *, beat_at: float, interval: float = 5.0) -> WorkerBeat:
    return WorkerBeat(identity=identity, instance="0a1b2c3d", queue="arq:queue", functions=("echo", "noop"),
                      in_flight=1, max_jobs=16, running=("job-1",), draining=False, beat_at=beat_at,
                      interval=interval, started_at=beat_at - 60)


def test_a_worker_record_reads_back_as_written_and_is_gone_after_three_of_its_intervals() -> None:
    beat = _beat(beat_at=1000.0)
    assert decode({key.encode(): value.encode() for key, value in encode(beat).items()}) == beat
    assert (beat.gone(1015.0), beat.gone(1015.1)) == (False, True)
    with pytest.raises(ValueError, match=r"^a worker record not written by this kubearq: no field 'queue'$"):
        decode({key: value for key, value in encode(beat).items() if key != "queue"})


def test_a_queues_throughput_is_what_its_live_workers_finished_a_minute() -> None:
    live = [dataclasses.replace(_beat(identity, beat_at=1000.0), per_minute=rate)
            for identity, rate in (("worker-a", 120.0), ("worker-b", 30.0))]
    gone = dataclasses.replace(_beat("worker-c", beat_at=900.0), per_minute=500.0)  # its last word, long ago
    other = dataclasses.replace(_beat("worker-d", beat_at=1000.0), queue="reports", per_minute=6.0)
    assert throughput_by_queue([*live, gone, other], now=1001.0) == {"arq:queue": 150.0, "reports": 6.0}
    assert worker_row(gone, 1001.0)["per_minute"] == "-"
    assert worker_row(live[0], 1001.0)["per_minute"] == "120"


async def test_listing_workers_reads_the_set_of_worker_ids_never_the_keyspace(redis_private: RedisServer) -> None:
    redis = create_redis(redis_private.url)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for number in range(20_000):  # jobs and results: what a busy Redis holds
                pipe.set(f"arq:job:job-{number}", "{}")
            now = time.time()
            for identity in ("worker-a", "worker-b", "worker-c"):
                publish(pipe, _beat(identity, beat_at=now))
            await pipe.execute()
        await redis.config_resetstat()
        workers = await list_workers(redis)
        calls = {name.removeprefix("cmdstat_"): stats["calls"]
                 for name, stats in (await redis.info("commandstats")).items()}
    finally:
        await redis.aclose()
    assert sorted(beat.identity for beat in workers.beats) == ["worker-a", "worker-b", "worker-c"]
    assert {name: count for name, count in calls.items() if name not in ("config|resetstat",)} == {
        "zrevrange": 1, "hgetall": 3}


@pytest.mark.cluster
async def test_the_workers_page_shows_what_each_serves_and_runs_and_a_killed_one_as_gone(
        k8s: KubernetesUnderTest, dashboard: Dashboard, redis: Redis, redis_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "worker-doomed")
    viewer = await k8s.login_as_service_account("viewer", viewer_rules())
    async with dashboard.client(headers={"Authorization": f"Bearer {viewer.connection.token}"}) as client:
        with worker_process(redis_url, tmp_path / "worker.log") as doomed:  # heartbeats every second
            arq = create_redis(redis_url)
            try:
                await arq.enqueue_job("sleep_then_record", 60.0, _job_id="long-report")
            finally:
                await arq.aclose()
            serving = await eventually(lambda: _worker_row(client, "worker-doomed", "1 / 16"), within=30,
                                       what="the worker running its job on the page")
            queues = await client.get("/queues")
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(timeout=10)
        killed_at = time.monotonic()
        gone = await eventually(lambda: _worker_row(client, "worker-doomed", 'data-state="gone"'), within=15,
                                what="the killed worker shown as gone")
        gone_after = time.monotonic() - killed_at
        summary = (await client.get("/summary.json")).json()  # what the open page refreshes itself from
    assert 'data-state="serving"' in serving
    assert "<code>arq:queue</code>" in serving
    assert all(f"<code>{name}</code>" in serving for name in ("sleep_then_record", "echo", "always_fails"))
    assert '<a href="/job?id=long-report&amp;queue=arq%3Aqueue"><code>long-report</code></a>' in serving
    assert "every 1 s" in serving
    assert re.search(r'data-field="workers"><a href="/workers">1</a>', queues.text)
    assert re.search(r'<td data-field="per-minute">\d+</td>', queues.text)
    assert gone_after < 3 * 1 + 3  # three missed heartbeats, and the slack of a second's poll
    assert "1 / 16" in gone  # as it last said
    assert [(worker["queue"], worker["state"], worker["in_flight"]) for worker in summary["workers"]] == [
        ("arq:queue", "gone", 1)]


@pytest.mark.cluster
async def test_a_worker_that_stops_cleanly_leaves_the_workers_page(
        k8s: KubernetesUnderTest, dashboard: Dashboard, redis: Redis, redis_url: str) -> None:
    viewer = await k8s.login_as_service_account("viewer", viewer_rules())
    async with dashboard.client(headers={"Authorization": f"Bearer {viewer.connection.token}"}) as client:
        async with running_worker(redis_url, pod_name="worker-a") as service:
            listed = await eventually(lambda: _worker_row(client, "worker-a", 'data-state="serving"'),
                                      what="the worker on the page")
            worker_id = f"worker-a:{service.worker.instance}"
        page = await client.get("/workers")
    assert 'data-state="serving"' in listed
    assert "worker-a" not in page.text
    assert "No worker has sent a heartbeat lately." in page.text
    assert (await redis.exists(worker_key(worker_id)), await redis.zscore(WORKERS_KEY, worker_id)) == (0, None)


async def _worker_row(client: httpx.AsyncClient, identity: str, wanted: str) -> str | None:
    """The row of the worker `identity` on /workers, once it holds `wanted`."""
    page = await client.get("/workers")
    assert page.status_code == 200, page.text
    found = re.search(rf'<tr id="worker-{re.escape(identity)}:[0-9a-f]+".*?</tr>', page.text, re.DOTALL)
    return found.group(0) if found and wanted in found.group(0) else None


# --- a job's page: a re-drive's outcome ----------------------------------------------------------------------------

@pytest.mark.cluster
async def test_a_redriven_jobs_page_shows_it_succeed_for_whoever_may_see_its_namespaces_failed_jobs(
        k8s: KubernetesUnderTest, redis: Redis, redis_url: str, postgres_dsn: str) -> None:
    origin = JobOrigin(namespace=k8s.namespace, kind="SyncSchedule", name="nightly")
    async with Storage(postgres_dsn) as storage:
        await storage.migrate()
    arq = create_redis(redis_url)
    await arq.set(BROKEN_KEY, 1)
    await enqueue(arq, "nightly-report", "flaky", origin=origin, report="nightly")
    console = await _dashboard(k8s, redis, postgres_dsn)
    _, token = await _bound_in_namespace(k8s, "team", operator_user_rules())
    everywhere = await k8s.login_as_service_account("viewer", viewer_rules())
    outsider, outsider_token = await _bound_in_namespace(k8s, "outsider", [
        {"apiGroups": ["kubearq.dev"], "resources": ["syncschedules"], "verbs": ["get", "list"]}])
    url = f"http://127.0.0.1:{console.port}"
    try:
        async with keeping_worker(redis_url, postgres_dsn), \
                httpx.AsyncClient(base_url=url, timeout=T, headers={"Authorization": f"Bearer {token}"}) as client:
            assert isinstance(console.failed_jobs, PostgresFailedJobs)
            await kept_job(console.failed_jobs, "nightly-report")
            await arq.delete(BROKEN_KEY)  # the cause is fixed
            redriven = await client.post("/failed-jobs/redrive", data={"job_id": "nightly-report"})
            assert redriven.status_code == 303, redriven.text
            listing = await client.get("/failed-jobs", params={"namespace": k8s.namespace})
            link = re.search(r'<a href="(/job\?id=[^"]+)" class="redriven-as">', listing.text)
            assert link, listing.text
            new_id = parse_qs(urlsplit(link.group(1).replace("&amp;", "&")).query)["id"][0]
            await arq_result(arq, new_id)
            page = await client.get(link.group(1).replace("&amp;", "&"))
            unknown = await client.get("/job", params={"id": "no-such-job"})
        async with httpx.AsyncClient(base_url=url, timeout=T,
                                     headers={"Authorization": f"Bearer {outsider_token}"}) as client:
            refused = await client.get("/job", params={"id": new_id})
        async with httpx.AsyncClient(base_url=url, timeout=T, headers={
                "Authorization": f"Bearer {everywhere.connection.token}"}) as client:
            not_known = await client.get("/job", params={"id": "no-such-job"})
    finally:
        await console.stop()
        await arq.aclose()
    assert re.search(r'id="job-state">Succeeded<', page.text)
    assert '<a href="/failed-jobs?id=nightly-report" id="redrive-source"><code>nightly-report</code></a>' in page.text
    assert f"SyncSchedule {k8s.namespace}/nightly" in page.text
    assert unknown.status_code == 403  # a job of no known namespace is for cluster-wide eyes only
    assert refused.status_code == 403
    assert (f'User "{outsider}" cannot get resource "failedjobs" in API group "kubearq.dev" in the namespace '
            f'"{k8s.namespace}"') in refused.text.replace("&#34;", '"')
    assert not_known.status_code == 404
    assert "no job no-such-job is known: not queued, no result kept" in not_known.text


async def test_a_dashboard_port_already_taken_is_one_line_naming_the_setting(
        k8s: KubernetesUnderTest, redis: Redis, dashboard: Dashboard) -> None:
    taken = dashboard.console.port
    with pytest.raises(PortInUseError) as refused:
        await start_console(k8s.api, redis, dict, ConsoleConfig(queues=lambda: {"arq:queue"}), host="127.0.0.1",
                            port=taken, cache_seconds=0)
    assert str(refused.value) == (f"DASHBOARD_PORT {taken} is already in use on 127.0.0.1: set DASHBOARD_PORT to a "
                                  "free port (not HTTP_PORT's), or 0 for any free port")
