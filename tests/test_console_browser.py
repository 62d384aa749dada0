"""The dashboard in a real headless Chromium (Debian's `chromium` and `chromium-driver`, driven by selenium), on a real
kube-apiserver: a user pastes a token into the login form, sees the schedules, triggers one and is told so, and the
SyncSchedule carries the ask; a read-only user finds the button refused, saying why. Each view's screenshot is saved
in the test's folder (and the schedules one to docs/dashboard.png with KUBEARQ_SAVE_SCREENSHOTS=1)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from redis.asyncio import Redis

from kubearq.operator import kube
from kubearq.operator.actions import TRIGGER_ANNOTATION, Ask, read_ask
from kubearq.operator.console.pages import Key
from kubearq.operator.console.server import Console, ConsoleConfig, start_console
from kubearq.operator.context import SYNC_SCHEDULES
from kubearq.operator.rbac import operator_user_rules, viewer_rules
from tests.kubernetes import KubernetesUnderTest

T = 10.0
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT = Path(__file__).parent.parent / "docs" / "dashboard.png"
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs Chromium and its driver: `apt-get install -y chromium chromium-driver`"),
    pytest.mark.timeout(180),
]


@dataclass
class Served:
    console: Console
    url: str


@pytest.fixture
async def served(k8s: KubernetesUnderTest, redis_url: str) -> AsyncIterator[Served]:
    objects: dict[Key, kube.KubeObject] = {}

    def observe(kind: str, body: kube.KubeObject) -> None:
        metadata = body.get("metadata", {})
        objects[(kind, str(metadata.get("namespace")), str(metadata.get("name")))] = body

    for name, cron, function in (("realtime", "*/15 * * * *", "sync_connections"),
                                 ("attribution", "0 3 * * *", "sync_connections"),
                                 ("compaction", "0 1 * * *", "compact_snapshots")):
        created = await k8s.api.create(SYNC_SCHEDULES, {
            "apiVersion": SYNC_SCHEDULES.api_version, "kind": "SyncSchedule", "metadata": {"name": name},
            "spec": {"schedule": cron, "job": {"function": function}}}, namespace=k8s.namespace, timeout=T)
        observe("SyncSchedule", await _with_history(k8s, created))
    redis = Redis.from_url(redis_url)
    console = await start_console(k8s.api, redis, lambda: objects, ConsoleConfig(queues=lambda: {"arq:queue"}),
                                  host="127.0.0.1", port=0, cache_seconds=0, observe=observe)
    try:
        yield Served(console, f"http://127.0.0.1:{console.port}")
    finally:
        await console.stop()
        await redis.aclose()


async def _with_history(k8s: KubernetesUnderTest, body: kube.KubeObject) -> kube.KubeObject:
    """A status as the leader writes it, so the page (and its screenshot) shows runs."""
    now = datetime.now(UTC).replace(microsecond=0)
    runs = [{"jobId": f"{body['metadata']['uid']}:{n}", "scheduledTime": (now - timedelta(hours=n)).isoformat(),
             "enqueuedTime": (now - timedelta(hours=n)).isoformat(), "outcome": outcome,
             "finishTime": (now - timedelta(hours=n) + timedelta(seconds=40)).isoformat()}
            for n, outcome in ((1, "Succeeded"), (2, "Failed"), (3, "Succeeded"))]
    return await k8s.api.patch_status(SYNC_SCHEDULES, body["metadata"]["name"], {
        "lastScheduleTime": runs[0]["scheduledTime"], "nextScheduleTime": (now + timedelta(hours=1)).isoformat(),
        "runs": runs}, namespace=k8s.namespace, timeout=T)


def _browse(url: str, token: str, namespace: str, folder: Path, *, trigger: bool) -> dict[str, str]:
    """Log in through the form, then trigger `realtime` (or only read its button); what the page said."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1500,800", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    seen: dict[str, str] = {}
    try:
        wait = WebDriverWait(driver, T)
        driver.get(f"{url}/schedules")
        wait.until(expected_conditions.presence_of_element_located((By.ID, "token")))
        seen["login_url"] = driver.current_url
        driver.find_element(By.ID, "token").send_keys(token)
        driver.find_element(By.ID, "login").click()
        button = wait.until(expected_conditions.presence_of_element_located(
            (By.ID, f"trigger-{namespace}-realtime")))
        seen["who"] = driver.find_element(By.CSS_SELECTOR, ".who span").text
        driver.save_screenshot(str(folder / "schedules.png"))
        if trigger:
            button.click()
            notice = wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".notice")))
            seen["notice"] = notice.text
            driver.save_screenshot(str(folder / "schedules-triggered.png"))
        else:
            seen["disabled"] = str(not button.is_enabled())
            seen["why"] = button.get_attribute("title") or ""
        for view in ("scrapes", "queues", "failed-jobs"):
            driver.get(f"{url}/{view}")
            wait.until(expected_conditions.presence_of_element_located((By.TAG_NAME, "h1")))
            seen[view] = driver.find_element(By.TAG_NAME, "h1").text
            driver.save_screenshot(str(folder / f"{view}.png"))
    finally:
        driver.quit()
    return seen


async def test_a_user_logs_in_with_a_token_and_triggers_a_schedule(
        k8s: KubernetesUnderTest, served: Served, tmp_path: Path) -> None:
    runner = await k8s.login_as_service_account("runner", operator_user_rules())

    seen = await asyncio.to_thread(_browse, served.url, str(runner.connection.token), k8s.namespace, tmp_path,
                                   trigger=True)

    stored = await k8s.api.get(SYNC_SCHEDULES, "realtime", namespace=k8s.namespace, timeout=T)
    ask = read_ask(stored["metadata"].get("annotations"), TRIGGER_ANNOTATION)
    assert seen["login_url"].startswith(f"{served.url}/login?next=")
    assert seen["who"] == runner.username
    assert isinstance(ask, Ask)
    assert seen["notice"] == (f"Asked to trigger {k8s.namespace}/realtime now (request {ask.id}); "
                              "the leader enqueues it.")
    assert (seen["scrapes"], seen["queues"], seen["failed-jobs"]) == ("Scrape requests", "Queues", "Failed jobs")
    if os.environ.get("KUBEARQ_SAVE_SCREENSHOTS") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / "schedules.png", SCREENSHOT)


async def test_a_read_only_user_finds_the_trigger_button_refused_and_why(
        k8s: KubernetesUnderTest, served: Served, tmp_path: Path) -> None:
    viewer = await k8s.login_as_service_account("viewer", viewer_rules())

    seen = await asyncio.to_thread(_browse, served.url, str(viewer.connection.token), k8s.namespace, tmp_path,
                                   trigger=False)

    assert seen["disabled"] == "True"
    assert seen["why"] == (f'syncschedules.kubearq.dev is forbidden: User "{viewer.username}" cannot trigger '
                           f'resource "syncschedules" in API group "kubearq.dev" in the namespace "{k8s.namespace}"')
