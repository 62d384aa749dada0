"""The dashboard in a real headless Chromium (Debian's `chromium` and `chromium-driver`, driven by selenium), on a real
kube-apiserver, as a user meets it: log in by pasting a token; trigger a schedule and watch its run appear, enqueued by
the real operator's leader and run by a real worker; re-drive a failed job and watch its new job succeed; and, as a
read-only user, find every button refused, saying why.

A screenshot of each view is saved in the test's folder (so every run keeps them), and, with
KUBEARQ_SAVE_SCREENSHOTS=1, as docs/dashboard-<view>.png (docs/dashboard.png, the README's, is the schedules view)."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from kubearq.core.connections import create_redis
from kubearq.core.contract import Origin
from kubearq.core.failedjobs import redrive_id
from kubearq.core.failedjobstores import PostgresFailedJobs
from kubearq.demo.services import free_port
from kubearq.operator import kube
from kubearq.operator.actions import TRIGGER_ANNOTATION, Ask, read_ask
from kubearq.operator.console.pages import Key
from kubearq.operator.console.server import Console, ConsoleConfig, start_console
from kubearq.operator.context import SCRAPE_REQUESTS, SYNC_SCHEDULES
from kubearq.operator.rbac import operator_user_rules, viewer_rules
from kubearq.operator.scheduler import manual_job_id
from kubearq.operator.settings import OperatorSettings
from kubearq.worker.storage import Storage
from tests.failing_jobs import BROKEN_KEY
from tests.kubernetes import KubernetesUnderTest
from tests.operator_thread import operator_in_thread
from tests.test_failed_jobs import arq_result, enqueue, keeping_worker, kept_job
from tests.test_operator import eventually
from tests.test_runtime import running_worker

T = 10.0
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
DOCS = Path(__file__).parent.parent / "docs"
README_SCREENSHOT = DOCS / "dashboard.png"
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs Chromium and its driver: `apt-get install -y chromium chromium-driver`"),
    pytest.mark.timeout(180),
]


# --- the browser -------------------------------------------------------------------------------------------------

class Browser:
    """One headless Chromium, driven from a thread (`await asyncio.to_thread(browser.open, "/queues")`): selenium is
    synchronous, and the test's event loop must keep serving the dashboard meanwhile."""

    def __init__(self, folder: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1500,900", "--no-first-run", "--disable-extensions"):
            options.add_argument(argument)
        self.driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
        self.folder = folder
        self.url = ""

    def log_in(self, url: str, token: str, path: str = "/schedules") -> str:
        """Open `path`, be sent to the login form, paste `token`; the URL the form was shown at."""
        from selenium.webdriver.common.by import By

        self.url = url
        self.driver.get(f"{url}{path}")
        self.wait_for("#token")
        login_url = str(self.driver.current_url)
        self.driver.find_element(By.ID, "token").send_keys(token)
        self.driver.find_element(By.ID, "login").click()
        self.wait_for("h1")
        return login_url

    def open(self, path: str) -> str:
        """Go to `path`; its heading."""
        self.driver.get(f"{self.url}{path}")
        return self.text("h1")

    def wait_for(self, css: str, within: float = T) -> Any:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, within).until(
            expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css)))

    def reload_until(self, css: str, holds: Callable[[str], bool], within: float, what: str) -> str:
        """Reload the page, as a user would, until the text of `css` holds; that text."""
        from selenium.common.exceptions import NoSuchElementException
        from selenium.webdriver.common.by import By

        deadline = time.monotonic() + within
        while True:
            try:
                text = str(self.driver.find_element(By.CSS_SELECTOR, css).text)
            except NoSuchElementException:
                text = ""
            if holds(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not show within {within}s (last: {text!r})")
            time.sleep(0.5)
            self.driver.refresh()

    def refreshed(self, css: str, stale: str, within: float = T) -> str:
        """Write `stale` into `css` and wait, without reloading, for the page's own refresh to overwrite it."""
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver.execute_script("document.querySelector(arguments[0]).textContent = arguments[1]", css, stale)
        WebDriverWait(self.driver, within, poll_frequency=0.2).until(lambda _: self.text(css) != stale)
        return self.text(css)

    def text(self, css: str) -> str:
        return str(self.wait_for(css).text)

    def attribute(self, css: str, name: str) -> str:
        return str(self.wait_for(css).get_attribute(name) or "")

    def enabled(self, css: str) -> bool:
        return bool(self.wait_for(css).is_enabled())

    def click(self, css: str) -> None:
        self.wait_for(css).click()

    def screenshot(self, view: str) -> Path:
        """The page as it is, into the test's folder; with KUBEARQ_SAVE_SCREENSHOTS=1 also docs/dashboard-<view>.png."""
        saved = self.folder / f"{view}.png"
        height = int(self.driver.execute_script("return document.documentElement.scrollHeight"))
        # the whole page, not its first screen (the window's height counts the browser's own bars)
        self.driver.set_window_size(1500, max(900, min(height + 200, 3000)))
        self.driver.save_screenshot(str(saved))
        if os.environ.get("KUBEARQ_SAVE_SCREENSHOTS") == "1":
            DOCS.mkdir(exist_ok=True)
            shutil.copyfile(saved, DOCS / f"dashboard-{view}.png")
        return saved

    def quit(self) -> None:
        self.driver.quit()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    chromium = Browser(tmp_path)
    try:
        yield chromium
    finally:
        chromium.quit()


async def do(step: Callable[..., Any], *args: Any) -> Any:
    """A browser step, off the event loop."""
    return await asyncio.to_thread(step, *args)


# --- what the dashboard shows ---------------------------------------------------------------------------------

SCHEDULES = (("realtime", "*/15 * * * *", "Europe/Berlin"), ("attribution", "0 3 * * *", "America/New_York"),
             ("compaction", "0 1 * * 0", "UTC"))


async def _schedules(k8s: KubernetesUnderTest, function: str) -> dict[str, kube.KubeObject]:
    """Three SyncSchedules with a few runs in their status, as the leader writes it (the pages show a history)."""
    created = {}
    for name, cron, zone in SCHEDULES:
        body = await k8s.api.create(SYNC_SCHEDULES, {
            "apiVersion": SYNC_SCHEDULES.api_version, "kind": "SyncSchedule", "metadata": {"name": name},
            "spec": {"schedule": cron, "timeZone": zone, "job": {"function": function}}},
            namespace=k8s.namespace, timeout=T)
        created[name] = await _with_history(k8s, body)
    return created


async def _with_history(k8s: KubernetesUnderTest, body: kube.KubeObject) -> kube.KubeObject:
    now = datetime.now(UTC).replace(microsecond=0)
    runs = [{"jobId": f"{body['metadata']['uid']}:{n}", "scheduledTime": (now - timedelta(hours=n)).isoformat(),
             "enqueuedTime": (now - timedelta(hours=n)).isoformat(), "outcome": outcome,
             "finishTime": (now - timedelta(hours=n) + timedelta(seconds=40)).isoformat()}
            for n, outcome in ((1, "Succeeded"), (2, "Failed"), (3, "Succeeded"))]
    return await k8s.api.patch_status(SYNC_SCHEDULES, body["metadata"]["name"], {
        "lastScheduleTime": runs[0]["scheduledTime"], "nextScheduleTime": (now + timedelta(hours=1)).isoformat(),
        "runs": runs}, namespace=k8s.namespace, timeout=T)


async def _scrape_request(k8s: KubernetesUnderTest) -> kube.KubeObject:
    """A ScrapeRequest part of the way through, as the leader reports it."""
    body = await k8s.api.create(SCRAPE_REQUESTS, {
        "apiVersion": SCRAPE_REQUESTS.api_version, "kind": "ScrapeRequest", "metadata": {"name": "city-events"},
        "spec": {"urls": ["https://events.example/city/page/1", "https://events.example/city/page/2"]}},
        namespace=k8s.namespace, timeout=T)
    started = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=4)
    return await k8s.api.patch_status(SCRAPE_REQUESTS, body["metadata"]["name"], {
        "phase": "Running", "startTime": started.isoformat(), "progress": "25/42", "failedPages": 2,
        "listingPages": {"total": 2, "done": 2}, "detailPages": {"total": 40, "done": 21, "failed": 2, "deferred": 3},
        "failedUrls": [{"url": "https://events.example/city/event/17", "error": "HTTP 503 after 5 tries", "tries": 5},
                       {"url": "https://events.example/city/event/23", "error": "TimeoutError: read timed out",
                        "tries": 5}]}, namespace=k8s.namespace, timeout=T)


@dataclass
class Served:
    console: Console
    url: str


@asynccontextmanager
async def serving(k8s: KubernetesUnderTest, redis: Redis, objects: dict[Key, kube.KubeObject],
                  database_url: str | None = None) -> AsyncIterator[Served]:
    """The console over `objects` (what the operator's watch would hold), its API client the test's admin."""

    def observe(kind: str, body: kube.KubeObject) -> None:
        metadata = body.get("metadata", {})
        objects[(kind, str(metadata.get("namespace")), str(metadata.get("name")))] = body

    console = await start_console(k8s.api, redis, lambda: objects, ConsoleConfig(queues=lambda: {"arq:queue"}),
                                  host="127.0.0.1", port=0, cache_seconds=0, observe=observe,
                                  database_url=database_url)
    try:
        yield Served(console, f"http://127.0.0.1:{console.port}")
    finally:
        await console.stop()


@asynccontextmanager
async def operator_serving_the_dashboard(k8s: KubernetesUnderTest, redis_url: str) -> AsyncIterator[str]:
    """The real operator (`run_operator`: its watch, its leader, its dashboard) in a thread of its own (kopf cancels
    foreign tasks in its loop); the dashboard's URL."""
    port = free_port()
    settings = OperatorSettings(redis_url=redis_url, namespace=k8s.namespace, lease_namespace=k8s.namespace,
                                http_host="127.0.0.1", http_port=free_port(), tenancy="open", status_interval=0.5,
                                dashboard_enabled=True, dashboard_host="127.0.0.1", dashboard_port=port,
                                dashboard_auth_cache_seconds=0)
    async with operator_in_thread(settings, k8s.connection):
        yield f"http://127.0.0.1:{port}"


# --- a user triggers a schedule and sees its run -------------------------------------------------------------

async def test_a_user_triggers_a_schedule_and_sees_the_run_the_leader_enqueued_succeed(
        k8s: KubernetesUnderTest, redis_url: str, browser: Browser) -> None:
    schedules = await _schedules(k8s, "echo")  # tests.worker_jobs serves it
    runner = await k8s.login_as_service_account("runner", operator_user_rules())
    row = f"#schedule-{k8s.namespace}-realtime"
    async with operator_serving_the_dashboard(k8s, redis_url) as url, \
            running_worker(redis_url, pod_name="worker-7f9c4"):
        await eventually(lambda: _serving(url), within=30, what="the operator's dashboard")
        login_url = await do(browser.log_in, url, str(runner.connection.token))
        await do(browser.reload_until, f"#trigger-{k8s.namespace}-realtime", bool, 30,
                 "the schedule (from the operator's watch)")
        who = await do(browser.text, ".who span")
        await do(browser.click, f"#trigger-{k8s.namespace}-realtime")
        notice = await do(browser.text, ".notice")
        run = await do(browser.reload_until, f"{row} .run.succeeded[title^='kubearq:manual:']", bool, 60,
                       "the triggered run, succeeded")
        handled = await do(browser.text, f"{row} .last-trigger")
        run_title = await do(browser.attribute, f"{row} .run.succeeded[title^='kubearq:manual:']", "title")
        await do(browser.screenshot, "schedules")

    stored = await k8s.api.get(SYNC_SCHEDULES, "realtime", namespace=k8s.namespace, timeout=T)
    ask = read_ask(stored["metadata"].get("annotations"), TRIGGER_ANNOTATION)
    assert isinstance(ask, Ask)
    job_id = manual_job_id(str(schedules["realtime"]["metadata"]["uid"]), ask.id)
    assert login_url.startswith(f"{url}/login?next=")
    assert who == runner.username
    assert notice == f"Asked to trigger {k8s.namespace}/realtime now (request {ask.id}); the leader enqueues it."
    assert run.startswith("Succeeded (Manual) ")
    assert run_title == job_id
    assert handled == f"last trigger: Done, enqueued job {job_id} on queue arq:queue"
    assert stored["status"]["lastTrigger"]["id"] == ask.id  # type: ignore[index]
    if os.environ.get("KUBEARQ_SAVE_SCREENSHOTS") == "1":
        shutil.copyfile(browser.folder / "schedules.png", README_SCREENSHOT)


async def _serving(url: str) -> bool:
    import httpx

    try:
        async with httpx.AsyncClient(base_url=url, timeout=T) as client:
            return (await client.get("/login")).status_code == 200
    except httpx.TransportError:
        return False


# --- a user re-drives a failed job and sees it succeed -------------------------------------------------------

async def test_a_user_redrives_a_failed_job_and_sees_its_new_job_succeed(
        k8s: KubernetesUnderTest, redis_url: str, postgres_dsn: str, browser: Browser) -> None:
    async with Storage(postgres_dsn) as storage:
        await storage.migrate()
    redis = create_redis(redis_url)
    origin = Origin(namespace=k8s.namespace, kind="SyncSchedule", name="attribution")
    await redis.set(BROKEN_KEY, 1)  # `flaky` fails until the test deletes it: the cause, then fixed
    await enqueue(redis, "nightly-report", "flaky", origin=origin, report="nightly")
    await enqueue(redis, "weekly-export", "fails_every_try", origin=origin)
    await enqueue(redis, "ads-import", "gives_up")
    runner = await k8s.login_as_service_account("runner", operator_user_rules())
    try:
        async with serving(k8s, redis, {}, postgres_dsn) as served, keeping_worker(redis_url, postgres_dsn):
            store = served.console.failed_jobs
            assert isinstance(store, PostgresFailedJobs)
            for job_id in ("nightly-report", "weekly-export", "ads-import"):
                await kept_job(store, job_id)
            await redis.delete(BROKEN_KEY)
            await do(browser.log_in, served.url, str(runner.connection.token), "/failed-jobs")
            await do(browser.click, "input[value='nightly-report']")
            await do(browser.click, "#redrive-selected")
            notice = await do(browser.text, ".notice")
            redriven_as = await do(browser.text, "#job-nightly-report a.redriven-as")
            await do(browser.screenshot, "failed-jobs")
            await do(browser.click, "#job-nightly-report a.redriven-as")
            state = await do(browser.reload_until, "#job-state", lambda text: text == "Succeeded", 30,
                             "the re-driven job, succeeded")
            source = await do(browser.text, "#redrive-source")
            await do(browser.screenshot, "job")
            result = await arq_result(redis, redriven_as)
            old = await store.get("nightly-report")
    finally:
        await redis.aclose()

    assert notice == "Re-drove 1 failed jobs (1 enqueued now, 0 not runnable)."
    assert old is not None
    assert redriven_as == old.redriven_as == redrive_id(old, 1)
    assert (state, source) == ("Succeeded", "nightly-report")
    assert (result["s"], result["r"]) == (True, "nightly done")


# --- a read-only user finds every button refused -------------------------------------------------------------

async def test_a_read_only_user_sees_every_view_and_finds_the_buttons_refused_and_why(
        k8s: KubernetesUnderTest, redis_url: str, browser: Browser) -> None:
    objects: dict[Key, kube.KubeObject] = {}
    for body in (await _schedules(k8s, "sync_connections")).values():
        objects[("SyncSchedule", k8s.namespace, body["metadata"]["name"])] = body
    objects[("ScrapeRequest", k8s.namespace, "city-events")] = await _scrape_request(k8s)
    viewer = await k8s.login_as_service_account("viewer", viewer_rules())
    redis = create_redis(redis_url)
    try:
        # Work for a worker of two slots: two jobs running, three waiting for a slot, one deferred for ten minutes.
        for number in range(5):
            await redis.enqueue_job("sleep_then_record", 60.0, _job_id=f"report-{number}")
        await redis.enqueue_job("echo", "later", _job_id="retry-later", _defer_by=600)
        async with serving(k8s, redis, objects) as served, \
                running_worker(redis_url, pod_name="worker-7f9c4", max_jobs=2, shutdown_grace=0.2):
            await do(browser.log_in, served.url, str(viewer.connection.token))
            trigger = f"#trigger-{k8s.namespace}-realtime"
            schedules = (await do(browser.enabled, trigger), await do(browser.attribute, trigger, "title"))
            await do(browser.open, "/scrapes")
            cancel = f"#cancel-{k8s.namespace}-city-events"
            scrapes = (await do(browser.enabled, cancel), await do(browser.attribute, cancel, "title"))
            await do(browser.screenshot, "scrapes")
            await do(browser.open, "/workers")
            in_flight = await do(browser.reload_until, "tr[data-state='serving'] [data-field='in-flight']",
                                 lambda text: text.startswith("2 / 2"), 15, "the worker running two jobs")
            await do(browser.screenshot, "workers")
            live_state = await do(browser.refreshed, "tr[data-worker] [data-field='state']", "stale")
            await do(browser.open, "/queues")
            counts = [await do(browser.text, f"tr[data-queue='arq:queue'] [data-field='{field}']")
                      for field in ("ready", "running", "deferred", "workers")]
            await do(browser.screenshot, "queues")
            live_workers = await do(browser.refreshed, "tr[data-queue='arq:queue'] [data-field='workers'] a", "?")
            await do(browser.open, "/failed-jobs")
            redrive = "button[title*='cannot redrive']"
            failed_jobs = (await do(browser.enabled, redrive), await do(browser.attribute, redrive, "title"))
    finally:
        await redis.aclose()

    refusal = ('{resource}.kubearq.dev is forbidden: User "' + viewer.username + '" cannot {verb} resource '
               '"{resource}" in API group "kubearq.dev" {where}')
    assert schedules == (False, refusal.format(resource="syncschedules", verb="trigger",
                                               where=f'in the namespace "{k8s.namespace}"'))
    assert scrapes == (False, refusal.format(resource="scraperequests", verb="cancel",
                                             where=f'in the namespace "{k8s.namespace}"'))
    assert failed_jobs == (False, refusal.format(resource="failedjobs", verb="redrive", where="at the cluster scope"))
    assert in_flight.startswith("2 / 2")
    assert counts == ["3", "2", "1", "1"]
    assert (live_state, live_workers) == ("serving", "1")  # both pages refresh themselves from /summary.json
