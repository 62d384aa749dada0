"""The leader's ScrapeRequest reconciler: on the API emulator and a real Redis, workers simulated by counters."""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import pytest
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from hypothesis import given
from hypothesis import strategies as st

from kubearq.core.connections import create_redis
from kubearq.core.contract import (
    DELETE_SCRAPE_RESULTS,
    SCRAPE_LISTING,
    PageJob,
    RequestRef,
    ScrapeSettings,
    check_http_url,
    deserialize,
    failures_key,
    job_id_for_page,
    progress_key,
    request_jobs_key,
)
from kubearq.core.queueing import NewJob, Tally, enqueue_many
from kubearq.operator import kube
from kubearq.operator.actions import CANCEL_ANNOTATION, Ask, annotation_patch
from kubearq.operator.conditions import ConditionStatus
from kubearq.operator.context import FINALIZER, SCRAPE_REQUESTS, OperatorContext
from kubearq.operator.leader import NotLeaderError
from kubearq.operator.metrics import OperatorMetrics
from kubearq.operator.scrapedecisions import (
    CONFIG_MAPS,
    Outcome,
    Progress,
    Reason,
    ReconcileResult,
    StatusPacer,
    UrlsUnavailableError,
    build_listing_jobs,
    build_status,
    decide_completion,
    decide_phase,
    decide_status_write,
    parse_url_list,
    succeeded_condition,
)
from kubearq.operator.scraperequest import PageCounts, Phase, ScrapeRequestStatus
from kubearq.operator.scrapes import CONFLICT_RETRY_SECONDS, reconcile_scrape_request
from kubearq.operator.settings import OperatorSettings
from tests.kubernetes import KubernetesUnderTest

T = 10.0
QUEUE = "arq:queue"
START = datetime.datetime(2025, 3, 1, 12, 0, tzinfo=datetime.UTC)
URLS = ["https://events.example/page/1", "https://events.example/page/2"]


# --- Pure decisions -------------------------------------------------------------------------------------


def test_url_list_skips_blank_lines_comments_and_duplicates() -> None:
    text = "# listing pages\nhttps://a.example/1\n\n  https://a.example/2  \n# done\nhttps://a.example/1\n"
    assert parse_url_list(text, "list") == ["https://a.example/1", "https://a.example/2"]


def test_url_list_names_the_bad_lines() -> None:
    text = "https://a.example/1\nftp://a.example/2\nhttps://a.example/3\nnot a url\n"
    with pytest.raises(UrlsUnavailableError) as caught:
        parse_url_list(text, "the list")
    assert str(caught.value) == (
        "the list has 2 invalid URL(s): line 2: 'ftp://a.example/2' is not an http(s) URL; use a URL like "
        "'https://example.com/events'; line 4: 'not a url' is not an http(s) URL; use a URL like "
        "'https://example.com/events'")


def test_url_list_with_only_comments_is_refused() -> None:
    with pytest.raises(UrlsUnavailableError, match=r"^the list lists no URLs \(one per line"):
        parse_url_list("# nothing yet\n\n", "the list")


@given(st.lists(st.text(alphabet="htps:/#ab.c \n", max_size=30), max_size=20))
def test_url_list_returns_only_unique_fetchable_urls_or_refuses(lines: list[str]) -> None:
    try:
        urls = parse_url_list("\n".join(lines), "list")
    except UrlsUnavailableError:
        return
    assert urls
    assert len(set(urls)) == len(urls)
    assert all(check_http_url(url) == url for url in urls)


def progress(listing: tuple[int, int, int], detail: tuple[int, int, int] = (0, 0, 0)) -> Progress:
    """Progress from (total, done, failed) per kind."""
    return Progress(listing=PageCounts(total=listing[0], done=listing[1], failed=listing[2]),
                    detail=PageCounts(total=detail[0], done=detail[1], failed=detail[2]), listing_enqueued=True)


@pytest.mark.parametrize(("listing", "detail", "expected"), [
    ((0, 0, 0), (0, 0, 0), None),
    ((2, 1, 0), (0, 0, 0), None),
    ((2, 2, 0), (5, 4, 0), None),
    ((2, 2, 0), (5, 5, 0), (ConditionStatus.TRUE, Reason.ALL_PAGES_SCRAPED)),
    ((2, 2, 0), (0, 0, 0), (ConditionStatus.TRUE, Reason.ALL_PAGES_SCRAPED)),
    ((2, 1, 1), (5, 3, 2), (ConditionStatus.FALSE, Reason.SOME_PAGES_FAILED)),
    ((2, 0, 2), (0, 0, 0), (ConditionStatus.FALSE, Reason.ALL_PAGES_FAILED)),
])
def test_completion_needs_every_known_page_finished(
        listing: tuple[int, int, int], detail: tuple[int, int, int],
        expected: tuple[ConditionStatus, Reason] | None) -> None:
    decision = decide_completion(progress(listing, detail))
    assert (decision[:2] if decision else None) == expected


@given(st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 5)),
       st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 5)))
def test_complete_exactly_when_all_pages_of_a_started_request_finished(
        listing: tuple[int, int, int], detail: tuple[int, int, int]) -> None:
    finished = (listing[0] > 0 and listing[1] + listing[2] >= listing[0] and detail[1] + detail[2] >= detail[0])
    assert (decide_completion(progress(listing, detail)) is not None) == finished


@pytest.mark.parametrize(("status", "reason", "phase"), [
    (ConditionStatus.UNKNOWN, Reason.SCRAPING, Phase.RUNNING),
    (ConditionStatus.TRUE, Reason.ALL_PAGES_SCRAPED, Phase.SUCCEEDED),
    (ConditionStatus.FALSE, Reason.SOME_PAGES_FAILED, Phase.PARTIALLY_SUCCEEDED),
    (ConditionStatus.FALSE, Reason.ALL_PAGES_FAILED, Phase.FAILED),
    (ConditionStatus.FALSE, Reason.INVALID_SPEC, Phase.FAILED),
    (ConditionStatus.FALSE, Reason.URLS_UNAVAILABLE, Phase.PENDING),
])
def test_phase_is_derived_from_the_succeeded_condition(status: ConditionStatus, reason: Reason, phase: Phase) -> None:
    assert decide_phase(succeeded_condition(status, reason, "", 1, START)) == phase


def test_counts_alone_wait_for_the_interval_a_new_condition_does_not() -> None:
    started = build_status(ScrapeRequestStatus(), progress((2, 0, 0)), queue=QUEUE, generation=1, now=START)
    counted = build_status(started, progress((2, 1, 0)), queue=QUEUE, generation=1, now=START)
    finished = build_status(started, progress((2, 2, 0)), queue=QUEUE, generation=1, now=START)
    assert decide_status_write(started, started, seconds_since_write=0, interval=5) is None
    assert decide_status_write(started, counted, seconds_since_write=2, interval=5) == 3
    assert decide_status_write(started, counted, seconds_since_write=7, interval=5) == 0
    assert decide_status_write(started, counted, seconds_since_write=None, interval=5) == 0  # a new leader
    assert decide_status_write(started, finished, seconds_since_write=0, interval=5) == 0


def test_listing_jobs_carry_the_page_contract() -> None:
    request = RequestRef(uid="uid-1", namespace="ns", name="events")
    settings = ScrapeSettings(queue="scrapes", links={"selector": "a.event", "maxDetailPages": 5})
    [job] = build_listing_jobs(request, URLS[:1], settings)
    assert (job.job_id, job.function) == (job_id_for_page("uid-1", URLS[0]), SCRAPE_LISTING)
    assert job.kwargs["page"] == PageJob(request=request, url=URLS[0], settings=settings).model_dump(
        mode="json", by_alias=True)


# --- Against the API and Redis --------------------------------------------------------------------------


@dataclass
class Clock:
    moment: datetime.datetime = START

    def now(self) -> datetime.datetime:
        return self.moment

    def advance(self, seconds: float) -> None:
        self.moment += datetime.timedelta(seconds=seconds)


@dataclass
class Operator:
    """The reconciler as the leader runs it, with what a test looks at."""

    k8s: KubernetesUnderTest
    redis: ArqRedis
    ctx: OperatorContext
    clock: Clock
    pacer: StatusPacer

    @property
    def namespace(self) -> str:
        return self.k8s.namespace

    async def create(self, name: str, **spec: object) -> kube.KubeObject:
        body = {"apiVersion": "kubearq.dev/v1alpha1", "kind": "ScrapeRequest", "metadata": {"name": name},
                "spec": spec}
        return await self.k8s.api.create(SCRAPE_REQUESTS, body, namespace=self.namespace, timeout=T)

    async def get(self, name: str) -> kube.KubeObject:
        return await self.k8s.api.get(SCRAPE_REQUESTS, name, namespace=self.namespace, timeout=T)

    async def reconcile(self, name: str) -> ReconcileResult:
        """Reconcile the object as the API holds it now."""
        return await reconcile_scrape_request(self.ctx, await self.get(name), pacer=self.pacer)

    async def status(self, name: str) -> Mapping[str, object]:
        return (await self.get(name)).get("status", {})

    async def delete(self, name: str) -> None:
        await self.k8s.api.delete(SCRAPE_REQUESTS, name, namespace=self.namespace, timeout=T)

    async def config_map(self, name: str, data: Mapping[str, str]) -> None:
        await self.k8s.api.create(CONFIG_MAPS, {"metadata": {"name": name}, "data": dict(data)},
                                  namespace=self.namespace, timeout=T)

    async def events(self) -> list[tuple[str, str, str]]:
        """(type, reason, message) of the Events in the namespace, in the order they were created."""
        events = await self.k8s.api.list(kube.EVENTS, namespace=self.namespace, timeout=T)
        items = sorted(events.items, key=lambda e: int(e["metadata"]["resourceVersion"]))
        return [(str(e.get("type")), str(e.get("reason")), str(e.get("message"))) for e in items]

    async def event_reasons(self) -> list[tuple[str, str]]:
        return [(kind, reason) for kind, reason, _ in await self.events()]

    async def count(self, uid: str, **fields: int) -> None:
        """What workers do: count pages into the request's progress hash."""
        for name, amount in fields.items():
            await self.redis.hincrby(progress_key(uid), name, amount)  # type: ignore[misc]

    def succeeded(self, status: Mapping[str, object]) -> Mapping[str, object]:
        conditions = status.get("conditions")
        assert isinstance(conditions, list)
        [condition] = [c for c in conditions if c["type"] == "Succeeded"]
        assert isinstance(condition, dict)
        return condition


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    client = create_redis(redis_url)
    yield client
    await client.aclose()


def make_operator(k8s: KubernetesUnderTest, redis: ArqRedis, *, status_interval: float = 0.001) -> Operator:
    clock = Clock()
    ctx = OperatorContext(api=k8s.api, redis=redis, metrics=OperatorMetrics(),
                          settings=OperatorSettings(status_interval=status_interval), ensure_leader=lambda: None,
                          now=clock.now)
    return Operator(k8s, redis, ctx, clock, StatusPacer())


@pytest.fixture
def operator(k8s: KubernetesUnderTest, redis: ArqRedis) -> Operator:
    return make_operator(k8s, redis)


def uid_of(body: kube.KubeObject) -> str:
    return body["metadata"]["uid"]


async def test_first_reconcile_adds_the_finalizer_and_enqueues_the_listing_pages(operator: Operator) -> None:
    uid = uid_of(await operator.create("events", urls=URLS, queue="scrapes", rateLimit={"requestsPerMinute": 30}))

    result = await operator.reconcile("events")

    body = await operator.get("events")
    assert result.outcome == Outcome.STARTED
    assert body["metadata"]["finalizers"] == [FINALIZER]
    assert await operator.redis.zcard("scrapes") == 2
    job = deserialize(await operator.redis.get(job_key_prefix + job_id_for_page(uid, URLS[0])))
    page = PageJob.model_validate(job["k"]["page"])  # type: ignore[index]
    assert (job["f"], page.url, page.request.uid, page.request.name) == (SCRAPE_LISTING, URLS[0], uid, "events")
    assert (page.settings.queue, page.settings.rate_limit.requests_per_minute) == ("scrapes", 30)
    assert await operator.redis.hget(progress_key(uid), "listing_total") == b"2"  # type: ignore[misc]
    assert await operator.redis.scard(request_jobs_key(uid)) == 2  # type: ignore[misc]
    status = body["status"]
    assert (status["phase"], status["progress"], status["startTime"], status["observedGeneration"]) == (
        "Running", "0/2", "2025-03-01T12:00:00Z", 1)
    assert status["listingPages"] == {"total": 2, "done": 0, "failed": 0, "deferred": 0}
    assert operator.succeeded(status)["status"] == "Unknown"
    assert await operator.events() == [("Normal", "Started", "2 listing pages enqueued on queue scrapes")]


async def test_reconciling_again_enqueues_nothing_twice(operator: Operator) -> None:
    stale = await operator.create("events", urls=URLS)  # the object before anything was written
    uid = uid_of(stale)
    await operator.reconcile("events")

    again = [await operator.reconcile("events") for _ in range(3)]
    replayed = await reconcile_scrape_request(operator.ctx, stale, pacer=StatusPacer())  # a lagging cache

    assert [result.outcome for result in again] == [Outcome.RUNNING] * 3
    assert replayed.outcome == Outcome.CONFLICT  # enqueued again, refused as duplicates; then a stale write
    # and it looks again soon: the newer object differs only in the status it wrote, which wakes nothing
    assert replayed.wake_at == operator.ctx.now() + datetime.timedelta(seconds=CONFLICT_RETRY_SECONDS)
    assert await operator.redis.zcard(QUEUE) == 2
    assert await operator.redis.hget(progress_key(uid), "listing_total") == b"2"  # type: ignore[misc]
    assert (await operator.status("events"))["startTime"] == "2025-03-01T12:00:00Z"
    assert len(await operator.events()) == 1


async def test_a_missing_config_map_is_reported_then_used_once_it_exists(operator: Operator) -> None:
    await operator.create("events", urlsFrom={"configMapKeyRef": {"name": "pages", "key": "urls"}})

    result = await operator.reconcile("events")

    status = await operator.status("events")
    message = f'spec.urlsFrom.configMapKeyRef: ConfigMap "pages" not found in namespace "{operator.namespace}"'
    assert (result.outcome, result.wake_at) == (Outcome.URLS_UNAVAILABLE, START + datetime.timedelta(seconds=30))
    assert status["phase"] == "Pending"
    assert {key: operator.succeeded(status)[key] for key in ("status", "reason", "message")} == {
        "status": "False", "reason": "UrlsUnavailable", "message": message}
    assert await operator.redis.dbsize() == 0
    assert (await operator.reconcile("events")).status_written is False  # reported once
    assert await operator.events() == [("Warning", "UrlsUnavailable", message)]

    await operator.config_map("pages", {"urls": "\n".join(URLS)})
    assert (await operator.reconcile("events")).outcome == Outcome.STARTED
    status = await operator.status("events")
    assert (status["phase"], operator.succeeded(status)["reason"]) == ("Running", "Scraping")


async def test_a_config_map_without_the_key_or_with_bad_urls_is_reported(operator: Operator) -> None:
    await operator.config_map("pages", {"other": URLS[0], "bad": "https://a.example/\nmailto:me@example.com\n"})
    await operator.create("nokey", urlsFrom={"configMapKeyRef": {"name": "pages", "key": "urls"}})
    await operator.create("badurl", urlsFrom={"configMapKeyRef": {"name": "pages", "key": "bad"}})

    await operator.reconcile("nokey")
    await operator.reconcile("badurl")

    assert operator.succeeded(await operator.status("nokey"))["message"] == (
        'spec.urlsFrom.configMapKeyRef: ConfigMap "pages" has no key "urls" (its keys: bad, other)')
    assert operator.succeeded(await operator.status("badurl"))["message"] == (
        'spec.urlsFrom.configMapKeyRef: ConfigMap "pages" key "bad" has 1 invalid URL(s): line 2: '
        "'mailto:me@example.com' is not an http(s) URL; use a URL like 'https://example.com/events'")


async def test_ten_thousand_urls_from_a_config_map_are_all_enqueued(operator: Operator) -> None:
    urls = [f"https://events.example/listing/{n}" for n in range(10_000)]
    await operator.config_map("pages", {"urls": "# ten thousand listing pages\n" + "\n".join(urls) + "\n"})
    uid = uid_of(await operator.create("big", urlsFrom={"configMapKeyRef": {"name": "pages", "key": "urls"}}))

    started = time.perf_counter()
    result = await operator.reconcile("big")
    print(f"10,000-URL ScrapeRequest started (ConfigMap read, enqueued, status written) in "
          f"{time.perf_counter() - started:.3f}s")

    assert result.outcome == Outcome.STARTED
    assert await operator.redis.zcard(QUEUE) == 10_000
    assert await operator.redis.scard(request_jobs_key(uid)) == 10_000  # type: ignore[misc]
    assert await operator.redis.exists(job_key_prefix + job_id_for_page(uid, urls[-1]))
    status = await operator.status("big")
    assert (status["progress"], status["listingPages"]["total"]) == ("0/10000", 10_000)  # type: ignore[index]
    assert operator.ctx.metrics.enqueued.labels(source="scrape", queue=QUEUE)._value.get() == 10_000


async def test_an_invalid_spec_fails_with_the_validation_message(operator: Operator) -> None:
    await operator.create("events", urls=URLS, links={"selector": "a[["})  # the API server accepts any string

    result = await operator.reconcile("events")
    again = await operator.reconcile("events")

    body = await operator.get("events")
    message = "spec.links.selector: 'a[[' is not a valid CSS selector; e.g. 'a.event-link' or 'h1'"
    assert (result.outcome, again.status_written) == (Outcome.INVALID_SPEC, False)
    assert (body["status"]["phase"], body["status"]["observedGeneration"]) == ("Failed", 1)
    assert {key: operator.succeeded(body["status"])[key] for key in ("status", "reason", "message")} == {
        "status": "False", "reason": "InvalidSpec", "message": message}
    assert "finalizers" not in body["metadata"]
    assert await operator.redis.dbsize() == 0
    assert await operator.events() == [("Warning", "InvalidSpec", message)]


async def test_progress_and_failures_are_folded_into_status(operator: Operator) -> None:
    uid = uid_of(await operator.create("events", urls=URLS))
    await operator.reconcile("events")
    await operator.count(uid, listing_done=1, detail_total=4, detail_done=1, detail_failed=1, detail_deferred=1)
    failure = {"url": "https://events.example/e/9", "error": "HTTPStatusError: 500", "tries": 3}
    await operator.redis.rpush(failures_key(uid), json.dumps(failure))  # type: ignore[misc]
    operator.clock.advance(1)

    result = await operator.reconcile("events")

    status = await operator.status("events")
    assert (result.outcome, result.status_written) == (Outcome.RUNNING, True)
    assert status["listingPages"] == {"total": 2, "done": 1, "failed": 0, "deferred": 0}
    assert status["detailPages"] == {"total": 4, "done": 1, "failed": 1, "deferred": 1}
    assert (status["progress"], status["failedPages"], status["phase"]) == ("3/6", 1, "Running")
    assert status["failedUrls"] == [failure]


async def test_progress_is_written_at_most_once_per_status_interval(k8s: KubernetesUnderTest, redis: ArqRedis) -> None:
    operator = make_operator(k8s, redis, status_interval=60)
    uid = uid_of(await operator.create("events", urls=URLS))
    await operator.reconcile("events")
    written = (await operator.get("events"))["metadata"]["resourceVersion"]

    await operator.count(uid, listing_done=1)
    operator.clock.advance(20)
    paced = await operator.reconcile("events")

    assert (paced.status_written, paced.wake_at) == (False, START + datetime.timedelta(seconds=60))
    assert (await operator.get("events"))["metadata"]["resourceVersion"] == written
    operator.clock.advance(40)
    assert (await operator.reconcile("events")).status_written
    assert (await operator.status("events"))["progress"] == "1/2"
    assert operator.ctx.metrics.status_patches.labels(kind="ScrapeRequest", result="ok")._value.get() == 2


@pytest.mark.parametrize(("counts", "phase", "condition", "event_type"), [
    ({"listing_done": 2, "detail_total": 3, "detail_done": 3}, "Succeeded", ("True", "AllPagesScraped"), "Normal"),
    ({"listing_done": 2, "detail_total": 3, "detail_done": 2, "detail_failed": 1}, "PartiallySucceeded",
     ("False", "SomePagesFailed"), "Warning"),
    ({"listing_failed": 2}, "Failed", ("False", "AllPagesFailed"), "Warning"),
])
async def test_completion_sets_the_final_condition_phase_and_time(
        k8s: KubernetesUnderTest, redis: ArqRedis, counts: dict[str, int], phase: str,
        condition: tuple[str, str], event_type: str) -> None:
    operator = make_operator(k8s, redis, status_interval=60)  # completion is not paced
    uid = uid_of(await operator.create("events", urls=URLS))
    await operator.reconcile("events")
    await operator.count(uid, **counts)
    operator.clock.advance(1)

    result = await operator.reconcile("events")

    body = await operator.get("events")
    status = body["status"]
    succeeded = operator.succeeded(status)
    assert (result.outcome, result.wake_at) == (Outcome.COMPLETED, None)
    assert (status["phase"], (succeeded["status"], succeeded["reason"])) == (phase, condition)
    assert status["completionTime"] == "2025-03-01T12:00:01Z"
    assert await operator.event_reasons() == [("Normal", "Started"), (event_type, condition[1])]
    await operator.count(uid, detail_total=5)  # a late count changes nothing once complete
    assert (await operator.reconcile("events")).outcome == Outcome.COMPLETED
    assert (await operator.get("events"))["metadata"]["resourceVersion"] == body["metadata"]["resourceVersion"]


async def test_deletion_with_retain_stops_the_jobs_then_releases_the_object(operator: Operator) -> None:
    uid = uid_of(await operator.create("events", urls=URLS))
    await operator.reconcile("events")
    running, queued = job_id_for_page(uid, URLS[0]), job_id_for_page(uid, URLS[1])
    await operator.redis.set(in_progress_key_prefix + running, b"1")  # a worker runs the first listing page
    detail = NewJob("detail-1", "scrape_detail", {})  # which has found a detail page already
    await enqueue_many(operator.redis, QUEUE, [detail], tally=Tally(progress_key(uid), "detail_total",
                                                                     request_jobs_key(uid)))
    await operator.delete("events")

    stopping = await operator.reconcile("events")

    assert stopping.outcome == Outcome.CLEANING_UP
    assert (await operator.get("events"))["metadata"]["finalizers"] == [FINALIZER]
    assert await operator.redis.zrange(QUEUE, 0, -1) == []
    assert not await operator.redis.exists(job_key_prefix + queued, job_key_prefix + "detail-1")
    assert await operator.redis.zrange("arq:abort", 0, -1) == [running.encode()]

    await operator.redis.delete(in_progress_key_prefix + running)  # the aborted job stopped
    finalized = await operator.reconcile("events")

    assert finalized.outcome == Outcome.FINALIZED
    with pytest.raises(kube.NotFoundError):
        await operator.get("events")
    assert not await operator.redis.exists(progress_key(uid), failures_key(uid), request_jobs_key(uid))


async def test_deletion_with_delete_holds_the_finalizer_until_the_results_are_deleted(operator: Operator) -> None:
    uid = uid_of(await operator.create("events", urls=URLS, deletionPolicy="Delete"))
    await operator.reconcile("events")
    await operator.delete("events")

    first, second = await operator.reconcile("events"), await operator.reconcile("events")

    assert (first.outcome, second.outcome) == (Outcome.CLEANING_UP, Outcome.CLEANING_UP)
    [job_id] = [job_id.decode() for job_id in await operator.redis.zrange(QUEUE, 0, -1)]
    job = deserialize(await operator.redis.get(job_key_prefix + job_id))
    assert (job["f"], job["k"]) == (DELETE_SCRAPE_RESULTS, {
        "deletion": {"request": {"uid": uid, "namespace": operator.namespace, "name": "events"}}})
    assert (await operator.get("events"))["metadata"]["finalizers"] == [FINALIZER]

    await finish(operator.redis, job_id, success=False, result={"error": "StorageUnavailableError: down"})
    assert (await operator.reconcile("events")).outcome == Outcome.CLEANING_UP
    assert ("Warning", "ResultsNotDeleted") in await operator.event_reasons()

    await finish(operator.redis, job_id, success=True, result={"items": 3, "failures": 1})
    assert (await operator.reconcile("events")).outcome == Outcome.FINALIZED
    with pytest.raises(kube.NotFoundError):
        await operator.get("events")


async def finish(redis: ArqRedis, job_id: str, *, success: bool, result: object) -> None:
    """What an ARQ worker leaves when a job ends: no job in the queue, a result."""
    await redis.zrem(QUEUE, job_id)
    await redis.delete(job_key_prefix + job_id)
    await redis.set(result_key_prefix + job_id, json.dumps({"s": success, "r": result, "ft": 1}))


async def test_a_replica_that_is_not_the_leader_writes_nothing(operator: Operator) -> None:
    await operator.create("events", urls=URLS)
    before = await operator.get("events")

    def not_leader() -> None:
        raise NotLeaderError("the Lease is held by operator-1")

    operator.ctx.ensure_leader = not_leader
    with pytest.raises(NotLeaderError):
        await operator.reconcile("events")

    assert await operator.get("events") == before
    assert await operator.redis.dbsize() == 0


async def test_a_replica_that_is_not_the_leader_leaves_a_deleted_request_alone(operator: Operator) -> None:
    uid = uid_of(await operator.create("events", urls=URLS))
    await operator.reconcile("events")
    await operator.delete("events")
    before = await operator.get("events")

    def not_leader() -> None:
        raise NotLeaderError("the Lease is held by operator-1")

    operator.ctx.ensure_leader = not_leader
    with pytest.raises(NotLeaderError):
        await operator.reconcile("events")

    assert await operator.get("events") == before
    assert await operator.redis.zcard(QUEUE) == 2
    assert await operator.redis.exists(progress_key(uid), request_jobs_key(uid)) == 2


async def test_a_stale_object_gets_no_finalizer_and_nothing_enqueued(operator: Operator) -> None:
    stale = await operator.create("events", urls=URLS)
    await operator.k8s.api.patch(SCRAPE_REQUESTS, "events", {"metadata": {"labels": {"team": "data"}}},
                                 namespace=operator.namespace, timeout=T)

    result = await reconcile_scrape_request(operator.ctx, stale, pacer=operator.pacer)

    assert (result.outcome, result.wake_at) == (
        Outcome.CONFLICT, operator.ctx.now() + datetime.timedelta(seconds=CONFLICT_RETRY_SECONDS))
    assert "finalizers" not in (await operator.get("events"))["metadata"]
    assert await operator.redis.dbsize() == 0


async def test_the_finalizer_removal_never_clobbers_a_concurrent_change(operator: Operator) -> None:
    await operator.create("events", urls=URLS)
    await operator.reconcile("events")
    await set_finalizers(operator, [FINALIZER, "example.com/hold"])
    await operator.delete("events")
    stale = await operator.get("events")
    await set_finalizers(operator, [FINALIZER])  # the other controller lets go meanwhile

    stale_result = await reconcile_scrape_request(operator.ctx, stale, pacer=operator.pacer)

    assert stale_result.outcome == Outcome.CONFLICT  # it would have put example.com/hold back
    assert (await operator.get("events"))["metadata"]["finalizers"] == [FINALIZER]
    assert (await operator.reconcile("events")).outcome == Outcome.FINALIZED
    with pytest.raises(kube.NotFoundError):
        await operator.get("events")


async def set_finalizers(operator: Operator, finalizers: list[str]) -> None:
    await operator.k8s.api.patch(SCRAPE_REQUESTS, "events", {"metadata": {"finalizers": finalizers}},
                                 namespace=operator.namespace, timeout=T)


# --- Cancellation (the `kubearq.dev/cancel` ask) ---------------------------------------------------------------


async def ask_cancel(operator: Operator, name: str, ask_id: str = "20250301T120000-0000c0de") -> None:
    ask = Ask(id=ask_id, requested_at=START, requested_by="alice")
    await operator.k8s.api.patch(SCRAPE_REQUESTS, name, annotation_patch(CANCEL_ANNOTATION, ask),
                                 namespace=operator.namespace, timeout=T)


async def test_cancel_removes_queued_jobs_aborts_running_ones_and_keeps_what_was_counted(operator: Operator) -> None:
    uid = uid_of(await operator.create("events", urls=URLS))
    await operator.reconcile("events")
    running, queued = job_id_for_page(uid, URLS[0]), job_id_for_page(uid, URLS[1])
    await operator.redis.set(in_progress_key_prefix + running, b"1")  # a worker runs the first listing page
    await operator.count(uid, detail_total=1, detail_done=1)  # and stored one detail page already
    await ask_cancel(operator, "events")
    operator.clock.advance(1)

    result = await operator.reconcile("events")

    status = await operator.status("events")
    message = ("cancelled (ask 20250301T120000-0000c0de): 1 queued job(s) removed, 1 running job(s) aborted; "
               "the results stored so far are kept")
    assert (result.outcome, result.wake_at) == (Outcome.CANCELLED, START + datetime.timedelta(seconds=3))
    assert (status["phase"], status["completionTime"], status["progress"]) == ("Cancelled", "2025-03-01T12:00:01Z",
                                                                             "1/3")
    assert {key: operator.succeeded(status)[key] for key in ("status", "reason", "message")} == {
        "status": "False", "reason": "Cancelled", "message": message}
    assert status["lastCancel"] == {"id": "20250301T120000-0000c0de", "outcome": "Done", "message": message,
                                      "handledTime": "2025-03-01T12:00:01Z", "requestedBy": "alice", "removed": 1,
                                      "aborted": 1}
    assert await operator.redis.zrange(QUEUE, 0, -1) == []
    assert not await operator.redis.exists(job_key_prefix + queued)
    assert await operator.redis.zrange("arq:abort", 0, -1) == [running.encode()]
    assert await operator.redis.hget(progress_key(uid), "detail_done") == b"1"  # type: ignore[misc]
    assert ("Normal", "Cancelled", message) in await operator.events()


async def test_a_detail_page_enqueued_by_an_aborted_job_is_swept_off_the_queue(operator: Operator) -> None:
    uid = uid_of(await operator.create("events", urls=URLS))
    await operator.reconcile("events")
    running = job_id_for_page(uid, URLS[0])
    await operator.redis.set(in_progress_key_prefix + running, b"1")
    await ask_cancel(operator, "events")
    await operator.reconcile("events")
    detail = NewJob("detail-late", "scrape_detail", {})  # enqueued by the listing page before it stopped
    await enqueue_many(operator.redis, QUEUE, [detail], tally=Tally(progress_key(uid), "detail_total",
                                                                     request_jobs_key(uid)))
    await operator.redis.delete(in_progress_key_prefix + running)  # the aborted job stopped
    operator.clock.advance(2)

    swept = await operator.reconcile("events")

    assert (swept.outcome, swept.wake_at) == (Outcome.COMPLETED, None)
    assert not await operator.redis.exists(job_key_prefix + "detail-late")
    assert (await operator.status("events"))["phase"] == "Cancelled"


async def test_a_repeated_cancel_does_nothing_and_a_finished_request_refuses_one(operator: Operator) -> None:
    uid = uid_of(await operator.create("events", urls=URLS))
    await operator.reconcile("events")
    await operator.count(uid, listing_done=2)
    operator.clock.advance(1)
    await operator.reconcile("events")  # all pages done: Succeeded
    await ask_cancel(operator, "events", "late-ask")

    refused = await operator.reconcile("events")
    written = (await operator.get("events"))["metadata"]["resourceVersion"]
    again = await operator.reconcile("events")

    status = await operator.status("events")
    assert (refused.outcome, again.outcome) == (Outcome.COMPLETED, Outcome.COMPLETED)
    assert status["phase"] == "Succeeded"
    assert status["lastCancel"]["outcome"] == "Refused"  # type: ignore[index]
    assert status["lastCancel"]["message"] == (  # type: ignore[index]
        "not cancelled: the request already finished (phase Succeeded); nothing to stop")
    assert (await operator.get("events"))["metadata"]["resourceVersion"] == written


async def test_a_request_cancelled_before_it_started_enqueues_nothing(operator: Operator) -> None:
    await operator.create("events", urlsFrom={"configMapKeyRef": {"name": "pages", "key": "urls"}})
    await operator.reconcile("events")  # the ConfigMap is missing: Pending
    await ask_cancel(operator, "events")
    await operator.reconcile("events")
    await operator.config_map("pages", {"urls": "\n".join(URLS)})

    result = await operator.reconcile("events")

    assert result.outcome == Outcome.COMPLETED
    assert (await operator.status("events"))["phase"] == "Cancelled"
    assert await operator.redis.zcard(QUEUE) == 0
