"""The shared rate limit: token-bucket arithmetic, the Redis script that applies it, and N processes on one budget."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError

from kubearq.core.contract import RateLimit
from kubearq.demo.services import RedisServer
from kubearq.worker.ratelimit import (
    DRIPS_PER_TOKEN,
    Bucket,
    SharedRateLimiter,
    bucket_key,
    capacity_drips,
    expiry_ms,
    refill,
    take,
)

NOW_US = 1_700_000_000_000_000
SOAK_SCRIPT = Path(__file__).with_name("ratelimit_soak.py")

rates = st.integers(min_value=1, max_value=100_000)
bursts = st.integers(min_value=1, max_value=10_000)
small_bursts = st.integers(min_value=1, max_value=20)
gaps_us = st.lists(st.integers(min_value=0, max_value=5_000_000), max_size=60)


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


@st.composite
def buckets(draw: st.DrawFn, burst: int) -> Bucket:
    """Any state a bucket of this size can be stored in, last refilled at or before NOW_US."""
    drips = draw(st.integers(min_value=0, max_value=capacity_drips(burst)))
    return Bucket(drips=drips, refilled_us=NOW_US - draw(st.integers(min_value=0, max_value=10**10)))


def run_requests(gaps: list[int], requests_per_minute: int, burst: int) -> list[int]:
    """Ask for a token after each gap (µs); return the times at which one was granted."""
    bucket: Bucket | None = None
    now_us = NOW_US
    granted = []
    for gap in gaps:
        now_us += gap
        outcome = take(bucket, now_us, requests_per_minute, burst)
        bucket = outcome.bucket
        if outcome.granted:
            granted.append(now_us)
    return granted


# --- The arithmetic (pure) -----------------------------------------------------------------------


@given(gaps=gaps_us, requests_per_minute=st.integers(min_value=1, max_value=6_000), burst=small_bursts)
def test_grants_never_exceed_burst_plus_rate_times_elapsed(gaps: list[int], requests_per_minute: int,
                                                           burst: int) -> None:
    granted = run_requests(gaps, requests_per_minute, burst)

    for first in range(len(granted)):
        for last in range(first, len(granted)):
            grants = last - first + 1
            elapsed_us = granted[last] - granted[first]
            # grants <= burst + rate/min * elapsed, in whole drips
            assert grants * DRIPS_PER_TOKEN <= burst * DRIPS_PER_TOKEN + elapsed_us * requests_per_minute


@given(requests_per_minute=rates, burst=st.integers(min_value=2, max_value=20), data=st.data())
def test_idle_bucket_grants_burst_at_once_then_one_token_per_interval(requests_per_minute: int, burst: int,
                                                                      data: st.DataObject) -> None:
    before = data.draw(buckets(burst))
    idle_until = before.refilled_us + ceil_div(capacity_drips(burst), requests_per_minute)
    earliest = max(idle_until, NOW_US)
    now_us = data.draw(st.integers(min_value=earliest, max_value=earliest + 10**9))
    bucket: Bucket | None = before

    for _ in range(burst):
        outcome = take(bucket, now_us, requests_per_minute, burst)
        assert outcome.granted
        bucket = outcome.bucket
    token_times = []
    at_us = now_us
    for _ in range(5):
        outcome = take(bucket, at_us, requests_per_minute, burst)
        assert not outcome.granted
        at_us += outcome.wait_us
        outcome = take(outcome.bucket, at_us, requests_per_minute, burst)
        assert outcome.granted
        bucket = outcome.bucket
        token_times.append(at_us)

    assert token_times == [now_us + ceil_div(n * DRIPS_PER_TOKEN, requests_per_minute) for n in range(1, 6)]


@given(requests_per_minute=rates)
def test_bucket_of_one_token_grants_one_per_interval_rounded_up_to_the_microsecond(requests_per_minute: int) -> None:
    # A bucket holding at most one token cannot keep the fraction of a µs by which a token comes early.
    interval_us = ceil_div(DRIPS_PER_TOKEN, requests_per_minute)
    bucket: Bucket | None = None
    at_us = NOW_US
    token_times = []
    for _ in range(6):
        outcome = take(bucket, at_us, requests_per_minute, burst=1)
        if not outcome.granted:
            at_us += outcome.wait_us
            outcome = take(outcome.bucket, at_us, requests_per_minute, burst=1)
        assert outcome.granted
        bucket = outcome.bucket
        token_times.append(at_us)

    assert token_times == [NOW_US + n * interval_us for n in range(6)]


@given(requests_per_minute=rates, burst=bursts, data=st.data())
def test_refusal_tells_the_exact_time_of_the_next_token_and_takes_none(requests_per_minute: int, burst: int,
                                                                      data: st.DataObject) -> None:
    bucket = data.draw(buckets(burst))
    now_us = NOW_US + data.draw(st.integers(min_value=0, max_value=100))

    refused = take(bucket, now_us, requests_per_minute, burst)

    if refused.granted:
        return
    assert refused.bucket == refill(bucket, now_us, requests_per_minute, burst)
    assert refused.wait_us >= 1
    assert not take(refused.bucket, now_us + refused.wait_us - 1, requests_per_minute, burst).granted
    assert take(refused.bucket, now_us + refused.wait_us, requests_per_minute, burst).granted


@given(requests_per_minute=rates, burst=bursts, data=st.data())
def test_bucket_never_holds_more_than_burst_nor_less_than_nothing(requests_per_minute: int, burst: int,
                                                                 data: st.DataObject) -> None:
    bucket = data.draw(buckets(burst))
    later_us = NOW_US + data.draw(st.integers(min_value=0, max_value=10**12))

    refilled = refill(bucket, later_us, requests_per_minute, burst)

    assert bucket.drips <= refilled.drips <= capacity_drips(burst)
    assert take(bucket, later_us, requests_per_minute, burst).bucket.drips >= 0


@given(requests_per_minute=rates, burst=bursts, data=st.data())
def test_clock_going_back_adds_no_tokens(requests_per_minute: int, burst: int, data: st.DataObject) -> None:
    bucket = data.draw(buckets(burst))
    earlier_us = bucket.refilled_us - data.draw(st.integers(min_value=1, max_value=10**7))

    assert refill(bucket, earlier_us, requests_per_minute, burst) == bucket


def test_bucket_key_is_one_per_request_or_one_per_request_and_host() -> None:
    uid = "0b6f2c1e-5a7d-4a51-9d0e-2f6d0c9b8a11"

    assert bucket_key(uid, "events.example", per_host=False) == f"kubearq:ratelimit:{uid}"
    assert bucket_key(uid, "Events.Example.", per_host=True) == f"kubearq:ratelimit:{uid}:events.example"
    with pytest.raises(ValueError, match="per-host rate limit needs the target host"):
        bucket_key(uid, None, per_host=True)


# --- The script on a real Redis ------------------------------------------------------------------


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@dataclass
class FakeClock:
    now_us: int = NOW_US

    def __call__(self) -> float:
        return self.now_us / 1_000_000


async def server_time_ms(client: Redis) -> int:
    seconds, microseconds = await client.time()
    return int(seconds) * 1000 + int(microseconds) // 1000


async def stored_bucket(client: Redis, key: str) -> Bucket | None:
    # redis-py types hash commands as sync-or-async; on the asyncio client they are awaitable.
    drips, refilled_us = await cast(Awaitable[list[bytes | None]], client.hmget(key, ["drips", "refilled_us"]))
    if drips is None or refilled_us is None:
        return None
    return Bucket(drips=int(drips), refilled_us=int(refilled_us))


limits = st.tuples(st.one_of(st.integers(min_value=1, max_value=600), rates), st.integers(min_value=1, max_value=5))
AS_TOLD = None
"""A step that comes exactly when the last refusal said the next token would: the boundary of every rule."""
gaps = st.one_of(
    st.just(AS_TOLD),
    st.integers(min_value=0, max_value=2_000),
    st.integers(min_value=0, max_value=3_000_000),
    st.integers(min_value=-2_000_000, max_value=0),  # a failover to a Redis whose clock lags
)
steps = st.tuples(gaps, st.integers(min_value=0, max_value=2))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limits=st.lists(limits, min_size=3, max_size=3), steps=st.lists(steps, max_size=40))
async def test_script_and_pure_arithmetic_agree(client: Redis, limits: list[tuple[int, int]],
                                               steps: list[tuple[int | None, int]]) -> None:
    clock = FakeClock()
    limiter = SharedRateLimiter(client, clock=clock)
    key = bucket_key(uuid.uuid4().hex, None, per_host=False)
    expected: Bucket | None = None
    last_wait_us = 0

    # The limit may change between requests, as when a user edits the ScrapeRequest.
    for gap, limit_index in steps:
        requests_per_minute, burst = limits[limit_index]
        clock.now_us += last_wait_us if gap is AS_TOLD else gap
        outcome = take(expected, clock.now_us, requests_per_minute, burst)
        if outcome.granted:
            expected = outcome.bucket
        last_wait_us = outcome.wait_us

        wait = await limiter.acquire(key, RateLimit(requests_per_minute=requests_per_minute, burst=burst))

        assert wait == outcome.wait_us / 1_000_000
        assert await stored_bucket(client, key) == expected


async def test_fresh_bucket_grants_burst_then_says_when_the_next_token_comes(client: Redis) -> None:
    limiter = SharedRateLimiter(client)
    limit = RateLimit(requests_per_minute=60, burst=3)
    key = bucket_key("request-1", None, per_host=False)

    waits = [await limiter.acquire(key, limit) for _ in range(4)]

    assert waits[:3] == [0.0, 0.0, 0.0]
    assert 0.9 < waits[3] <= 1.0


async def test_bucket_is_timed_by_the_redis_server_clock(client: Redis) -> None:
    limiter = SharedRateLimiter(client)
    key = bucket_key("request-1", None, per_host=False)

    await limiter.acquire(key, RateLimit(requests_per_minute=60, burst=5))

    seconds, microseconds = await client.time()
    stored = await stored_bucket(client, key)
    assert stored is not None
    assert 0 <= seconds * 1_000_000 + microseconds - stored.refilled_us < 1_000_000
    assert stored.drips == 4 * DRIPS_PER_TOKEN


async def test_bucket_expires_once_it_would_be_full_again(client: Redis) -> None:
    limiter = SharedRateLimiter(client, expiry_margin=0.5)
    slow = bucket_key("slow-request", None, per_host=False)
    fast = bucket_key("fast-request", None, per_host=False)

    await limiter.acquire(slow, RateLimit(requests_per_minute=60, burst=10))
    await limiter.acquire(fast, RateLimit(requests_per_minute=6_000, burst=1))

    # One token of ten spent at 1/s: full after 1 s. One of one at 100/s: full after 10 ms.
    assert 1_000 < await client.pttl(slow) <= 1_000 + 500
    assert 0 < await client.pttl(fast) <= 10 + 500
    deadline = time.monotonic() + 5
    while await client.exists(fast):
        assert time.monotonic() < deadline, f"{fast} did not expire"
        await asyncio.sleep(0.02)


async def test_script_sets_the_expiry_the_arithmetic_asks_for(client: Redis) -> None:
    clock = FakeClock()
    limiter = SharedRateLimiter(client, clock=clock, expiry_margin=2.0)
    limit = RateLimit(requests_per_minute=7, burst=3)
    key = bucket_key("request-1", None, per_host=False)
    await limiter.acquire(key, limit)

    before_ms = await server_time_ms(client)
    await limiter.acquire(key, limit)
    after_ms = await server_time_ms(client)

    stored = await stored_bucket(client, key)
    assert stored is not None
    # Two tokens short at 7/min: full in 17.142857 s, kept for 17.143 s + the 2 s margin.
    assert expiry_ms(stored, limit.requests_per_minute, limit.burst, 2_000) == 19_143
    expires_at_ms = await cast(Awaitable[int], client.pexpiretime(key))
    assert before_ms <= expires_at_ms - 19_143 <= after_ms


async def test_per_host_budgets_are_separate(client: Redis) -> None:
    limiter = SharedRateLimiter(client)
    limit = RateLimit(requests_per_minute=1, burst=1, per_host=True)
    first_host = bucket_key("request-1", "a.example", limit.per_host)
    second_host = bucket_key("request-1", "b.example", limit.per_host)

    assert await limiter.acquire(first_host, limit) == 0.0
    assert await limiter.acquire(second_host, limit) == 0.0
    assert await limiter.acquire(first_host, limit) > 0.0
    assert sorted(await client.keys("kubearq:ratelimit:*")) == [
        b"kubearq:ratelimit:request-1:a.example",
        b"kubearq:ratelimit:request-1:b.example",
    ]


async def test_one_budget_per_request_covers_all_its_hosts(client: Redis) -> None:
    limiter = SharedRateLimiter(client)
    limit = RateLimit(requests_per_minute=1, burst=1, per_host=False)

    assert await limiter.acquire(bucket_key("request-1", "a.example", limit.per_host), limit) == 0.0
    assert await limiter.acquire(bucket_key("request-1", "b.example", limit.per_host), limit) > 0.0
    assert await limiter.acquire(bucket_key("request-2", "a.example", limit.per_host), limit) == 0.0


async def test_limiter_keeps_working_after_redis_restarts(redis_private: RedisServer) -> None:
    redis_private.restart(aof=True)  # the budget survives the restart, so a refusal proves the script ran
    # As a worker's client is set up: a connection the restart closed is replaced, the command retried once.
    client = Redis.from_url(redis_private.url, retry=Retry(NoBackoff(), 1), retry_on_error=[ConnectionError])
    try:
        limiter = SharedRateLimiter(client)
        limit = RateLimit(requests_per_minute=1, burst=1)
        key = bucket_key("request-1", None, per_host=False)
        assert await limiter.acquire(key, limit) == 0.0

        redis_private.restart()

        assert (await client.info("memory"))["number_of_cached_scripts"] == 0
        assert 55.0 < await limiter.acquire(key, limit) <= 60.0
        assert (await client.info("memory"))["number_of_cached_scripts"] == 1
    finally:
        await client.aclose()


# --- Several processes, one budget ---------------------------------------------------------------


@dataclass(frozen=True)
class SoakResult:
    grants: int
    """Grants in [t0, t0 + window], t0 being the first grant."""
    window: float
    budget: float
    """Grants one shared budget allows in the window: burst + rate * window."""
    bursts: int
    """Grants the full buckets gave at once at the start: one burst per bucket."""

    @property
    def ratio(self) -> float:
        return self.grants / self.budget

    @property
    def sustained_per_minute(self) -> float:
        """The rate after the initial burst(s)."""
        return (self.grants - self.bursts) / self.window * 60


def grants_in_window(grant_times: list[float], window: float) -> int:
    """Grants in [t0, t0 + window], t0 being the first grant."""
    start = min(grant_times)
    return sum(1 for grant in grant_times if start <= grant <= start + window)


@pytest.fixture
def sync_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def soak(sync_client: redis.Redis, redis_url: str, *, shared: bool, processes: int, requests_per_minute: int,
         burst: int, window: float) -> SoakResult:
    """Run `processes` worker-like processes taking tokens for `window` seconds and count their grants."""
    run = f"soak-{uuid.uuid4().hex[:8]}"
    keys = [bucket_key(run if shared else f"{run}-{index}", None, per_host=False) for index in range(processes)]
    workers = [
        subprocess.Popen([sys.executable, str(SOAK_SCRIPT), redis_url, run, key, str(requests_per_minute),
                          str(burst)])
        for key in keys
    ]
    try:
        deadline = time.monotonic() + 60
        while cast(int, sync_client.llen(f"{run}:ready")) < processes:
            assert time.monotonic() < deadline, "soak processes did not start"
            assert all(worker.poll() is None for worker in workers), "a soak process exited early"
            time.sleep(0.05)
        # Run past the window, so that it is covered whatever the first grant's delay.
        end = time.time() + window + 1
        sync_client.rpush(f"{run}:go", *[f"{end:.6f}"] * processes)
        for worker in workers:
            assert worker.wait(timeout=window + 60) == 0
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    grant_times = [float(grant) for grant in cast(list[bytes], sync_client.lrange(f"{run}:grants", 0, -1))]
    grants = grants_in_window(grant_times, window)
    result = SoakResult(grants=grants, window=window, budget=burst + requests_per_minute / 60 * window,
                        bursts=burst * (1 if shared else processes))
    label = "one shared bucket" if shared else "a bucket per process"
    print(
        f"\n{processes} processes, {label}, budget {requests_per_minute}/min + burst {burst}:"
        f" {grants} grants in {window:g} s (budget {result.budget:g}, ratio {result.ratio:.3f});"
        f" after the initial burst {result.sustained_per_minute:.0f}/min",
    )
    return result


def test_processes_share_one_budget(sync_client: redis.Redis, redis_url: str) -> None:
    result = soak(sync_client, redis_url, shared=True, processes=4, requests_per_minute=1200, burst=20, window=15)

    assert abs(result.ratio - 1) <= 0.02


def test_a_budget_per_process_multiplies_the_rate(sync_client: redis.Redis, redis_url: str) -> None:
    result = soak(sync_client, redis_url, shared=False, processes=4, requests_per_minute=1200, burst=20, window=15)

    assert abs(result.ratio - 4) <= 4 * 0.02


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_processes_share_one_budget_for_two_minutes(sync_client: redis.Redis, redis_url: str) -> None:
    result = soak(sync_client, redis_url, shared=True, processes=4, requests_per_minute=120, burst=10, window=120)

    assert abs(result.ratio - 1) <= 0.02


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_budget_per_process_multiplies_the_rate_for_two_minutes(sync_client: redis.Redis, redis_url: str) -> None:
    result = soak(sync_client, redis_url, shared=False, processes=4, requests_per_minute=120, burst=10, window=120)

    assert abs(result.ratio - 4) <= 4 * 0.02
