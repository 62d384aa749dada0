"""Queue statistics for autoscaling: the split of an ARQ queue, label-safe names, and what /metrics shows."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import pytest
from arq.connections import ArqRedis
from arq.constants import default_queue_name, in_progress_key_prefix
from arq.worker import Retry, Worker, func
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from redis.asyncio import Redis

from kubearq.demo.services import RedisServer
from kubearq.operator.metrics import OperatorMetrics, QueueStatsRefresher
from kubearq.operator.queuestats import LABEL_VALUE, QueueStats, label_safe, queue_stats

QUEUE = default_queue_name
QUEUE_LABEL = "arq-queue-1df91f41fe"
DEADLINE_SECONDS = 10.0
QUEUE_GAUGES = (
    "kubearq_queue_busy_jobs",
    "kubearq_queue_deferred_jobs",
    "kubearq_queue_oldest_ready_job_age_seconds",
    "kubearq_queue_ready_jobs",
    "kubearq_queue_running_jobs",
)


@pytest.fixture
async def arq_redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    client = ArqRedis.from_url(redis_url)
    yield client
    await client.aclose()


def whole_second_ms(offset_ms: int = 0) -> int:
    """Wall-clock ms rounded down to a second (exact through ARQ's datetime → ms conversion), plus an offset."""
    return int(time.time()) * 1000 + offset_ms


def at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


async def enqueue_due(arq_redis: ArqRedis, job_id: str | None = None) -> None:
    """Enqueue a job due a second ago.

    Not due "now": ARQ rounds the enqueue time to the ms where Redis's TIME is read to the ms below, so a
    job enqueued in the same ms as the read is still (for under a ms) in the future.
    """
    await arq_redis.enqueue_job("work", _job_id=job_id, _defer_until=at(whole_second_ms(-1_000)))


def scraped(metrics: OperatorMetrics) -> list[str]:
    """The sample lines a Prometheus scrape of the operator would read."""
    return [line for line in generate_latest(metrics.registry).decode().splitlines() if not line.startswith("#")]


def queue_samples(metrics: OperatorMetrics, queue: str = QUEUE) -> dict[str, str]:
    """The queue gauges published for `queue`, by metric name (labels checked on the way)."""
    pattern = re.compile(r'^(kubearq_queue_\w+)\{queue="(.*)",queue_label="(.*)"\} (\S+)$')
    samples = {}
    for line in scraped(metrics):
        found = pattern.match(line)
        if found and found[2] == queue:
            assert found[3] == label_safe(queue)
            samples[found[1]] = found[4]
    return samples


async def poll(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait until `check()` is true, failing after DEADLINE_SECONDS."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# --- Reading the queue -------------------------------------------------------------------------------


async def test_stats_split_ready_running_and_deferred(arq_redis: ArqRedis) -> None:
    now_ms = whole_second_ms()
    ready_scores = [now_ms - 60_000, now_ms - 30_000, now_ms - 20_000, now_ms - 10_000, now_ms]
    for number, score in enumerate(ready_scores):
        await arq_redis.enqueue_job("work", _job_id=f"due-{number}", _defer_until=at(score))
    for number in range(3):
        await arq_redis.enqueue_job("work", _job_id=f"later-{number}", _defer_by=60)
    # The two oldest are running, as a worker marks them (the ids stay in the queue).
    await arq_redis.set(in_progress_key_prefix + "due-0", b"1")
    await arq_redis.set(in_progress_key_prefix + "due-1", b"1")

    stats = await queue_stats(arq_redis, QUEUE, now_ms=now_ms)

    assert stats == QueueStats(
        queue=QUEUE, ready=3, running=2, deferred=3, oldest_ready_age_seconds=20.0, now_ms=now_ms, exact=True)
    assert stats.busy == 5


async def test_empty_queue_has_no_jobs_and_no_age(arq_redis: ArqRedis) -> None:
    stats = await queue_stats(arq_redis, QUEUE, now_ms=whole_second_ms())

    assert (stats.ready, stats.running, stats.deferred, stats.oldest_ready_age_seconds) == (0, 0, 0, 0.0)


async def test_stats_use_the_redis_clock_when_no_time_is_given(arq_redis: ArqRedis) -> None:
    before_s, before_us = await arq_redis.time()
    stats = await queue_stats(arq_redis, QUEUE)
    after_s, after_us = await arq_redis.time()

    assert before_s * 1000 + before_us // 1000 <= stats.now_ms <= after_s * 1000 + after_us // 1000


async def test_past_the_check_limit_due_jobs_count_as_ready_and_busy_stays_exact(arq_redis: ArqRedis) -> None:
    now_ms = whole_second_ms()
    for number in range(6):
        await arq_redis.enqueue_job("work", _job_id=f"due-{number}", _defer_until=at(now_ms - 60_000 + number * 1000))
    for number in (0, 1, 5):
        await arq_redis.set(in_progress_key_prefix + f"due-{number}", b"1")

    stats = await queue_stats(arq_redis, QUEUE, now_ms=now_ms, max_checked=3)

    assert (stats.busy, stats.running, stats.ready, stats.exact) == (6, 2, 4, False)
    assert stats.oldest_ready_age_seconds == 58.0


async def test_when_every_checked_job_runs_the_first_unchecked_gives_the_age(arq_redis: ArqRedis) -> None:
    now_ms = whole_second_ms()
    for number in range(4):
        await arq_redis.enqueue_job("work", _job_id=f"due-{number}", _defer_until=at(now_ms - 40_000 + number * 1000))
    for number in (0, 1):
        await arq_redis.set(in_progress_key_prefix + f"due-{number}", b"1")

    stats = await queue_stats(arq_redis, QUEUE, now_ms=now_ms, max_checked=2)

    assert (stats.running, stats.ready, stats.oldest_ready_age_seconds) == (2, 2, 38.0)


async def test_running_counts_the_jobs_a_real_arq_worker_runs(arq_redis: ArqRedis) -> None:
    release = asyncio.Event()

    async def hold(ctx: dict[str, object]) -> None:
        await release.wait()

    for number in range(3):
        await arq_redis.enqueue_job("hold", _job_id=f"hold-{number}")
    worker = Worker(functions=[func(hold, name="hold")], redis_pool=arq_redis, max_jobs=2, poll_delay=0.02,
                    handle_signals=False, job_timeout=DEADLINE_SECONDS * 2, keep_result=0)
    run = asyncio.create_task(worker.async_run())
    try:
        async def two_running() -> bool:
            return (await queue_stats(arq_redis, QUEUE)).running == 2

        await poll(two_running, "the worker to start two jobs")
        stats = await queue_stats(arq_redis, QUEUE)
        assert (stats.ready, stats.running, stats.deferred, stats.busy) == (1, 2, 0, 3)

        release.set()

        async def drained() -> bool:
            return (await queue_stats(arq_redis, QUEUE)).busy == 0

        await poll(drained, "the worker to finish every job")
    finally:
        release.set()
        # Not worker.close(): it calls the redis client's deprecated close(); we close the client ourselves.
        worker.handle_sig(signal.SIGUSR1)
        with pytest.raises(asyncio.CancelledError):
            await run


async def test_backlog_waiting_for_a_backoff_or_rate_limit_adds_no_busy_jobs(arq_redis: ArqRedis) -> None:
    async def flaky(ctx: dict[str, object]) -> None:
        raise Retry(defer=120)

    for number in range(2):
        await arq_redis.enqueue_job("flaky", _job_id=f"flaky-{number}")
    for number in range(3):  # put back by the rate limiter until the budget refills
        await arq_redis.enqueue_job("scrape", _job_id=f"waiting-{number}", _defer_by=30)
    worker = Worker(functions=[func(flaky, name="flaky")], redis_pool=arq_redis, poll_delay=0.02,
                    handle_signals=False, keep_result=0)
    run = asyncio.create_task(worker.async_run())
    try:
        async def retried() -> bool:
            return worker.jobs_retried == 2

        await poll(retried, "both jobs to be retried with a backoff")
    finally:
        worker.handle_sig(signal.SIGUSR1)
        with pytest.raises(asyncio.CancelledError):
            await run
    metrics = OperatorMetrics()

    metrics.publish_queue_stats(await queue_stats(arq_redis, QUEUE))

    assert await arq_redis.zcard(QUEUE) == 5  # what a ZCARD-based scaler would scale on
    samples = queue_samples(metrics)
    assert (samples["kubearq_queue_busy_jobs"], samples["kubearq_queue_deferred_jobs"]) == ("0.0", "5.0")
    assert samples["kubearq_queue_ready_jobs"] == samples["kubearq_queue_running_jobs"] == "0.0"


# --- What a scraper reads ----------------------------------------------------------------------------


async def test_refresh_publishes_every_gauge_with_raw_and_label_safe_queue_names(arq_redis: ArqRedis) -> None:
    await arq_redis.enqueue_job("work", _job_id="due-0", _defer_until=at(whole_second_ms(-5_000)))
    await enqueue_due(arq_redis, "due-1")
    await arq_redis.enqueue_job("work", _job_id="later-0", _defer_by=60)
    await arq_redis.set(in_progress_key_prefix + "due-0", b"1")
    metrics = OperatorMetrics()
    refresher = QueueStatsRefresher(arq_redis, metrics, queues=lambda: [QUEUE])

    await refresher.refresh()

    lines = [line for line in scraped(metrics) if line.startswith("kubearq_queue_")]
    labels = f'{{queue="{QUEUE}",queue_label="{QUEUE_LABEL}"}}'
    assert [line.rpartition(" ")[0] for line in lines] == [f"{name}{labels}" for name in (
        "kubearq_queue_ready_jobs", "kubearq_queue_running_jobs", "kubearq_queue_deferred_jobs",
        "kubearq_queue_busy_jobs", "kubearq_queue_oldest_ready_job_age_seconds")]
    samples = queue_samples(metrics)
    assert [samples[name] for name in ("kubearq_queue_ready_jobs", "kubearq_queue_running_jobs",
                                       "kubearq_queue_deferred_jobs", "kubearq_queue_busy_jobs")] == [
        "1.0", "1.0", "1.0", "2.0"]
    assert 0 <= float(samples["kubearq_queue_oldest_ready_job_age_seconds"]) < DEADLINE_SECONDS


async def test_unreachable_redis_drops_the_queue_gauges_and_counts_the_error(redis_private: RedisServer) -> None:
    client = Redis.from_url(redis_private.url, socket_connect_timeout=2, socket_timeout=2)
    metrics = OperatorMetrics()
    refresher = QueueStatsRefresher(client, metrics, queues=lambda: [QUEUE, "arq:maintenance"])
    try:
        await refresher.refresh()
        assert sorted(queue_samples(metrics)) == sorted(queue_samples(metrics, "arq:maintenance")) == sorted(
            QUEUE_GAUGES)
        redis_private.stop()

        await refresher.refresh()

        assert queue_samples(metrics) == queue_samples(metrics, "arq:maintenance") == {}
        assert 'kubearq_errors_total{operation="queue_stats"} 1.0' in scraped(metrics)
        redis_private.start()

        await refresher.refresh()

        assert sorted(queue_samples(metrics)) == sorted(queue_samples(metrics, "arq:maintenance")) == sorted(
            QUEUE_GAUGES)
        assert 'kubearq_errors_total{operation="queue_stats"} 1.0' in scraped(metrics)
    finally:
        await client.aclose()


async def test_redis_that_never_answers_drops_the_gauges_after_the_read_timeout() -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()  # until the client gives up and disconnects
        finally:
            writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = Redis(host="127.0.0.1", port=port)
    metrics = OperatorMetrics()
    metrics.publish_queue_stats(QueueStats(QUEUE, ready=4, running=1, deferred=0, oldest_ready_age_seconds=3.0,
                                           now_ms=whole_second_ms()))
    refresher = QueueStatsRefresher(client, metrics, queues=lambda: [QUEUE], read_timeout_seconds=0.2)
    try:
        await refresher.refresh()

        assert queue_samples(metrics) == {}
        assert 'kubearq_errors_total{operation="queue_stats"} 1.0' in scraped(metrics)
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


async def test_a_queue_that_cannot_be_read_does_not_hide_the_others(arq_redis: ArqRedis) -> None:
    await arq_redis.set("not:a:queue", b"a string, so ZCOUNT fails with WRONGTYPE")
    await enqueue_due(arq_redis)
    metrics = OperatorMetrics()
    refresher = QueueStatsRefresher(arq_redis, metrics, queues=lambda: [QUEUE, "not:a:queue"])

    await refresher.refresh()

    assert queue_samples(metrics, "not:a:queue") == {}
    assert queue_samples(metrics)["kubearq_queue_busy_jobs"] == "1.0"
    assert 'kubearq_errors_total{operation="queue_stats"} 1.0' in scraped(metrics)


async def test_a_queue_no_longer_watched_loses_its_series(arq_redis: ArqRedis) -> None:
    watched = {QUEUE, "arq:maintenance"}
    metrics = OperatorMetrics()
    refresher = QueueStatsRefresher(arq_redis, metrics, queues=lambda: watched)
    await refresher.refresh()
    watched.discard("arq:maintenance")

    await refresher.refresh()

    assert queue_samples(metrics, "arq:maintenance") == {}
    assert sorted(queue_samples(metrics)) == sorted(QUEUE_GAUGES)


async def test_background_refresher_keeps_gauges_fresh_and_drops_them_when_stopped(arq_redis: ArqRedis) -> None:
    metrics = OperatorMetrics()
    refresher = QueueStatsRefresher(arq_redis, metrics, queues=lambda: [QUEUE], interval_seconds=0.02)
    refresher.start()
    try:
        assert refresher.alive
        await enqueue_due(arq_redis)

        async def one_busy_job() -> bool:
            return queue_samples(metrics).get("kubearq_queue_busy_jobs") == "1.0"

        await poll(one_busy_job, "the refresher to publish the enqueued job")
    finally:
        await refresher.stop()

    assert not refresher.alive
    assert queue_samples(metrics) == {}


def test_operator_counters_and_leader_gauge_as_scraped() -> None:
    metrics = OperatorMetrics()

    metrics.count_enqueued("schedule", QUEUE)
    metrics.count_enqueued("scrape", QUEUE, jobs=40)
    metrics.count_duplicate_enqueue("schedule")
    metrics.count_status_patch("SyncSchedule", "success")
    metrics.count_error("enqueue")
    metrics.observe_tick_lag(0.3)
    metrics.set_leader(True)

    lines = scraped(metrics)
    for expected in (
        f'kubearq_enqueued_jobs_total{{queue="{QUEUE}",source="schedule"}} 1.0',
        f'kubearq_enqueued_jobs_total{{queue="{QUEUE}",source="scrape"}} 40.0',
        'kubearq_duplicate_enqueues_total{source="schedule"} 1.0',
        'kubearq_duplicate_enqueues_total{source="scrape"} 0.0',
        'kubearq_status_patches_total{kind="SyncSchedule",result="success"} 1.0',
        'kubearq_errors_total{operation="enqueue"} 1.0',
        'kubearq_schedule_tick_lag_seconds_bucket{le="0.25"} 0.0',
        'kubearq_schedule_tick_lag_seconds_bucket{le="0.5"} 1.0',
        "kubearq_schedule_tick_lag_seconds_count 1.0",
        "kubearq_leader 1.0",
    ):
        assert expected in lines


def test_each_operator_has_its_own_registry() -> None:
    first, second = OperatorMetrics(), OperatorMetrics()

    first.set_leader(True)

    assert "kubearq_leader 1.0" in scraped(first)
    assert "kubearq_leader 0.0" in scraped(second)


# --- Label-safe queue names --------------------------------------------------------------------------


@pytest.mark.parametrize(("queue", "label"), [
    ("default", "default"),
    ("scrape.high_priority", "scrape.high_priority"),
    ("arq:queue", QUEUE_LABEL),
    ("arq:maintenance", "arq-maintenance-3c3a8b6fa6"),
    ("a" * 63, "a" * 63),
    ("a" * 64, "a" * 52 + "-ffe054fe7a"),
    ("q:" + "x" * 100, "q-" + "x" * 50 + "-00e0d37199"),
    ("日本語", "77710aedc7"),
    ("キュー:jobs", "jobs-dff25f5146"),
    ("-edge-", "edge-8074bfeac1"),
])
def test_label_safe_examples(queue: str, label: str) -> None:
    assert label_safe(queue) == label


def test_names_differing_only_in_invalid_characters_stay_apart() -> None:
    invalid = [chr(code) for code in range(0x100, 0x100 + 320)]
    names = [f"q{first}{second}x" for first in invalid for second in invalid]  # all sanitise to `q-x`

    labels = {label_safe(name) for name in names}

    assert len(labels) == len(names) == 102_400


@given(st.text(max_size=200))
def test_label_safe_is_always_a_valid_label_value(queue: str) -> None:
    label = label_safe(queue)

    assert len(label) <= 63
    assert LABEL_VALUE.fullmatch(label)
    assert label_safe(queue) == label


@given(st.lists(st.text(max_size=80), min_size=2, max_size=200, unique=True))
def test_distinct_queues_get_distinct_labels(queues: list[str]) -> None:
    assert len({label_safe(queue) for queue in queues}) == len(queues)
