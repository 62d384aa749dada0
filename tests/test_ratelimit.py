"""The shared rate limit: token-bucket arithmetic with reservations, the Redis script that applies it, and N
processes on one budget."""

from __future__ import annotations

import asyncio
import heapq
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest
import redis
from arq.connections import ArqRedis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError

from kubearq.core.connections import create_redis
from kubearq.core.contract import SCRAPE_DETAIL, SCRAPE_LISTING, RateLimit
from kubearq.demo.services import RedisServer
from kubearq.worker.main import WorkerService
from kubearq.worker.ratelimit import (
    DEFAULT_GRACE_US,
    DRIPS_PER_TOKEN,
    Bucket,
    SharedRateLimiter,
    Take,
    bucket_key,
    capacity_drips,
    expiry_ms,
    refill,
    reservations_key,
    take,
)
from tests.test_scrape import SETTINGS, ScrapeRun, event_page, listing_page, scrape_worker
from tests.websites import Reply, Website

NOW_US = 1_700_000_000_000_000
SOAK_SCRIPT = Path(__file__).with_name("ratelimit_soak.py")

rates = st.integers(min_value=1, max_value=100_000)
bursts = st.integers(min_value=1, max_value=10_000)
small_bursts = st.integers(min_value=1, max_value=20)
gaps_us = st.lists(st.integers(min_value=0, max_value=5_000_000), max_size=60)
# Rates and bursts at which jobs arriving bunched or tens of ms apart find the bucket empty.
contended_rates = st.one_of(st.integers(min_value=1, max_value=600), st.integers(min_value=1, max_value=6_000))
contended_bursts = st.one_of(st.integers(min_value=1, max_value=3), small_bursts)
graces_us = st.one_of(st.just(DEFAULT_GRACE_US), st.integers(min_value=0, max_value=10_000_000))


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


@st.composite
def buckets(draw: st.DrawFn, burst: int) -> Bucket:
    """Any state a bucket of this size can be stored in without reservations, last refilled at or before NOW_US."""
    drips = draw(st.integers(min_value=0, max_value=capacity_drips(burst)))
    return Bucket(drips=drips, refilled_us=NOW_US - draw(st.integers(min_value=0, max_value=10**10)))


def assert_within_budget(uses_us: list[int], requests_per_minute: int, burst: int) -> None:
    """Uses (µs, in order) never exceed burst + rate * window over any window, in whole drips:
    (last - first + 1) tokens <= burst tokens + (uses_us[last] - uses_us[first]) * rate."""
    # For every pair: (last - first) * token - (t_last - t_first) * rate <= (burst - 1) * token, i.e.
    # credit[last] - min(credit[:last + 1]) <= (burst - 1) * token, with credit[n] = n * token - t_n * rate.
    lowest = None
    for index, use_us in enumerate(uses_us):
        credit = index * DRIPS_PER_TOKEN - use_us * requests_per_minute
        lowest = credit if lowest is None else min(lowest, credit)
        assert credit - lowest <= (burst - 1) * DRIPS_PER_TOKEN, f"use {index} at {use_us} µs is over the budget"


def assert_level_in_bounds(bucket: Bucket, burst: int) -> None:
    assert 0 <= bucket.level <= capacity_drips(burst), bucket


def run_requests(gaps: list[int], requests_per_minute: int, burst: int) -> list[int]:
    """A new job asks for a token after each gap (µs); return the times at which one was granted."""
    bucket: Bucket | None = None
    now_us = NOW_US
    granted = []
    for number, gap in enumerate(gaps):
        now_us += gap
        outcome = take(bucket, now_us, requests_per_minute, burst, holder=f"job-{number}")
        bucket = outcome.bucket
        if outcome.granted:
            granted.append(now_us)
    return granted


ON_TIME = 0
NEVER = None
"""A refused job that never asks again (deleted, or its worker died): its reservation is dropped after the grace."""
wakings = st.one_of(
    st.just(ON_TIME),
    st.integers(min_value=1, max_value=10_000_000),  # late: a busy worker
    st.integers(min_value=-2_000_000, max_value=-1),  # early: clocks differ, or a deferral rounded down
    st.just(NEVER),
)


@dataclass
class Jobs:
    """Jobs asking one bucket for a token, each asking again (as the same holder) when it wakes after a refusal."""

    requests_per_minute: int
    burst: int
    grace_us: int
    bucket: Bucket | None = None
    uses_us: list[int] = field(default_factory=list)
    refusals: dict[str, int] = field(default_factory=dict)
    rewaits_us: list[int] = field(default_factory=list)
    """The waits told to jobs refused again, after waking."""

    def run(self, arrivals_us: list[int], waking: st.SearchStrategy[int | None], data: st.DataObject,
            max_asks: int = 400) -> None:
        """Every job asks first at its arrival; on a refusal it wakes `waking` µs after the wait it was told."""
        queue = [(at_us, f"job-{number}") for number, at_us in enumerate(arrivals_us)]
        heapq.heapify(queue)
        for _ in range(max_asks):
            if not queue:
                return
            now_us, holder = heapq.heappop(queue)
            outcome = self.ask(now_us, holder)
            if outcome.granted:
                self.uses_us.append(now_us)
                continue
            if holder in self.refusals:
                self.rewaits_us.append(outcome.wait_us)
            self.refusals[holder] = self.refusals.get(holder, 0) + 1
            late_us = data.draw(waking, label=f"{holder} wakes, after refusal {self.refusals[holder]}")
            if late_us is not NEVER:
                heapq.heappush(queue, (max(now_us, now_us + outcome.wait_us + late_us), holder))

    def ask(self, now_us: int, holder: str) -> Take:
        outcome = take(self.bucket, now_us, self.requests_per_minute, self.burst, holder=holder,
                       grace_us=self.grace_us)
        assert_level_in_bounds(outcome.bucket, self.burst)
        self.bucket = outcome.bucket
        return outcome


def arrivals(max_jobs: int = 40) -> st.SearchStrategy[list[int]]:
    """Times (µs) at which jobs first ask: bunched (a listing's fan-out), spread, or both."""
    gap = st.one_of(st.just(0), st.integers(min_value=0, max_value=20_000),
                    st.integers(min_value=0, max_value=3_000_000))
    return st.lists(gap, min_size=1, max_size=max_jobs).map(
        lambda gaps: [NOW_US + sum(gaps[:n + 1]) for n in range(len(gaps))])


# --- The arithmetic (pure) -----------------------------------------------------------------------


@given(gaps=gaps_us, requests_per_minute=st.integers(min_value=1, max_value=6_000), burst=small_bursts)
def test_grants_never_exceed_burst_plus_rate_times_elapsed(gaps: list[int], requests_per_minute: int,
                                                           burst: int) -> None:
    # Each refused job reserves a token and never claims it: reservations pile up and are dropped.
    granted = run_requests(gaps, requests_per_minute, burst)

    assert_within_budget(granted, requests_per_minute, burst)


@given(requests_per_minute=contended_rates, burst=contended_bursts, grace_us=graces_us, arrivals_us=arrivals(),
       data=st.data())
def test_uses_never_exceed_the_budget_however_jobs_wake(requests_per_minute: int, burst: int, grace_us: int,
                                                         arrivals_us: list[int], data: st.DataObject) -> None:
    # On time, late (past the grace too), early, or never: a mix of every way a deferred job comes back.
    jobs = Jobs(requests_per_minute, burst, grace_us)

    jobs.run(arrivals_us, wakings, data)

    assert_within_budget(jobs.uses_us, requests_per_minute, burst)


@given(requests_per_minute=contended_rates, burst=contended_bursts, grace_us=graces_us, arrivals_us=arrivals(),
       data=st.data())
def test_dropped_reservations_never_let_uses_exceed_the_budget(requests_per_minute: int, burst: int,
                                                               grace_us: int, arrivals_us: list[int],
                                                               data: st.DataObject) -> None:
    # Most refused jobs never come back; those that do come far past their grace or on time.
    abandoning = st.one_of(st.just(NEVER), st.just(ON_TIME), st.integers(min_value=grace_us, max_value=3 * grace_us))
    jobs = Jobs(requests_per_minute, burst, grace_us)

    jobs.run(arrivals_us, abandoning, data)

    assert_within_budget(jobs.uses_us, requests_per_minute, burst)


@given(requests_per_minute=contended_rates, burst=st.integers(min_value=2, max_value=20), arrivals_us=arrivals(),
       data=st.data())
def test_waiters_waking_at_their_slot_are_each_refused_once_at_most(requests_per_minute: int, burst: int,
                                                                    arrivals_us: list[int],
                                                                    data: st.DataObject) -> None:
    # The point of reserving: a job deferred to its slot finds its token there, so it is deferred once.
    jobs = Jobs(requests_per_minute, burst, DEFAULT_GRACE_US)

    jobs.run(arrivals_us, st.just(ON_TIME), data)

    assert len(jobs.uses_us) == len(arrivals_us)
    assert all(refusals == 1 for refusals in jobs.refusals.values())


@given(requests_per_minute=st.one_of(contended_rates, rates), arrivals_us=arrivals(), data=st.data())
def test_waiters_of_a_one_token_bucket_waking_at_their_slot_may_be_refused_again_by_microseconds(
    requests_per_minute: int, arrivals_us: list[int], data: st.DataObject,
) -> None:
    # A bucket holding at most one token cannot keep the fraction of a µs by which a token came early (see
    # test_bucket_of_one_token_grants_one_per_interval_rounded_up_to_the_microsecond), so a slot told in advance
    # can be early by up to a µs per waiter ahead. Far below ARQ's millisecond scheduling; a job waits it out.
    jobs = Jobs(requests_per_minute, 1, DEFAULT_GRACE_US)

    jobs.run(arrivals_us, st.just(ON_TIME), data)

    assert len(jobs.uses_us) == len(arrivals_us)
    assert all(refusals <= 2 for refusals in jobs.refusals.values())
    assert all(1 <= wait_us < len(arrivals_us) for wait_us in jobs.rewaits_us)


@given(requests_per_minute=rates, burst=small_bursts, data=st.data())
def test_waiters_slots_are_one_interval_apart_in_the_order_they_asked(requests_per_minute: int, burst: int,
                                                                      data: st.DataObject) -> None:
    bucket: Bucket | None = data.draw(buckets(burst))
    now_us = NOW_US
    slots_us: list[int] = []
    # Jobs keep coming until the first waiter's slot (after it, waiters also claim).
    for number in range(data.draw(st.integers(min_value=1, max_value=60))):
        now_us += data.draw(st.integers(min_value=0, max_value=ceil_div(DRIPS_PER_TOKEN, requests_per_minute)))
        if slots_us and now_us >= slots_us[0]:
            break
        outcome = take(bucket, now_us, requests_per_minute, burst, holder=f"job-{number}")
        bucket = outcome.bucket
        if not outcome.granted:
            slots_us.append(now_us + outcome.wait_us)

    for waiter, slot_us in enumerate(slots_us):
        apart_us = ceil_div(waiter * DRIPS_PER_TOKEN, requests_per_minute)  # the waiters ahead, rounded up
        assert apart_us - 1 <= slot_us - slots_us[0] <= apart_us


@given(requests_per_minute=rates, burst=st.integers(min_value=2, max_value=20), data=st.data())
def test_idle_bucket_grants_burst_at_once_then_one_token_per_interval(requests_per_minute: int, burst: int,
                                                                      data: st.DataObject) -> None:
    before = data.draw(buckets(burst))
    idle_until = before.refilled_us + ceil_div(capacity_drips(burst), requests_per_minute)
    earliest = max(idle_until, NOW_US)
    now_us = data.draw(st.integers(min_value=earliest, max_value=earliest + 10**9))
    bucket: Bucket | None = before

    for number in range(burst):
        outcome = take(bucket, now_us, requests_per_minute, burst, holder=f"burst-{number}")
        assert outcome.granted
        bucket = outcome.bucket
    token_times = []
    at_us = now_us
    for number in range(5):
        # Each waiter asks when the one before it went, and again at the slot it was told.
        outcome = take(bucket, at_us, requests_per_minute, burst, holder=f"waiter-{number}")
        assert not outcome.granted
        at_us += outcome.wait_us
        outcome = take(outcome.bucket, at_us, requests_per_minute, burst, holder=f"waiter-{number}")
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
    for number in range(6):
        outcome = take(bucket, at_us, requests_per_minute, burst=1, holder=f"job-{number}")
        if not outcome.granted:
            at_us += outcome.wait_us
            outcome = take(outcome.bucket, at_us, requests_per_minute, burst=1, holder=f"job-{number}")
        assert outcome.granted
        bucket = outcome.bucket
        token_times.append(at_us)

    assert token_times == [NOW_US + n * interval_us for n in range(6)]


@given(requests_per_minute=rates, burst=bursts, data=st.data())
def test_refusal_reserves_the_next_token_for_its_holder_until_the_slot_it_tells(requests_per_minute: int,
                                                                                burst: int,
                                                                                data: st.DataObject) -> None:
    bucket = data.draw(buckets(burst))
    now_us = NOW_US + data.draw(st.integers(min_value=0, max_value=100))

    refused = take(bucket, now_us, requests_per_minute, burst, holder="job-a")

    if refused.granted:
        return
    slot_us = now_us + refused.wait_us
    current = refill(bucket, now_us, requests_per_minute, burst)
    assert refused.wait_us >= 1
    # The token is taken in advance: the level is the same, one token less of it free.
    assert refused.bucket == Bucket(current.drips - DRIPS_PER_TOKEN, current.refilled_us, {"job-a": slot_us})
    # The slot is the first µs at which the bucket holds that token.
    assert refill(refused.bucket, slot_us - 1, requests_per_minute, burst).level < DRIPS_PER_TOKEN
    assert refill(refused.bucket, slot_us, requests_per_minute, burst).level >= DRIPS_PER_TOKEN
    # Asking early keeps the place; at the slot the token is the holder's, not another job's.
    early = take(refused.bucket, slot_us - 1, requests_per_minute, burst, holder="job-a")
    assert (early.wait_us, early.bucket.reservations) == (1, {"job-a": slot_us})
    assert not take(refused.bucket, slot_us, requests_per_minute, burst, holder="job-b").granted
    claimed = take(refused.bucket, slot_us, requests_per_minute, burst, holder="job-a")
    assert claimed.granted
    assert claimed.bucket.reservations == {}


def test_waiter_after_a_late_claim_keeps_its_place_and_is_told_when_the_token_comes() -> None:
    second_us = 1_000_000
    limit = (60, 1)  # a token a second, at most one in the bucket
    first = take(None, NOW_US, *limit, holder="listing")
    a = take(first.bucket, NOW_US, *limit, holder="job-a")
    b = take(a.bucket, NOW_US, *limit, holder="job-b")
    assert (a.wait_us, b.wait_us) == (second_us, 2 * second_us)

    late = take(b.bucket, NOW_US + 1_900_000, *limit, holder="job-a")  # 0.9 s late
    assert late.granted
    # Its token came at 1 s and sat in the full bucket until 1.9 s: the next comes at 2.9 s, not 2 s.
    refused = take(late.bucket, NOW_US + 2 * second_us, *limit, holder="job-b")
    assert refused.wait_us == 900_000
    assert refused.bucket.reservations == {"job-b": NOW_US + 2_900_000}
    assert take(refused.bucket, NOW_US + 2_900_000, *limit, holder="job-b").granted


def test_reservation_unclaimed_past_its_grace_is_dropped_and_its_token_freed() -> None:
    limit = (60, 1)
    grace_us = 5_000_000
    first = take(None, NOW_US, *limit, holder="listing", grace_us=grace_us)
    abandoned = take(first.bucket, NOW_US, *limit, holder="job-a", grace_us=grace_us)  # slot at 1 s
    assert not abandoned.granted

    # Until the grace is over the token waits for job-a: another job reserves the one after.
    kept = take(abandoned.bucket, NOW_US + 5_999_999, *limit, holder="job-b", grace_us=grace_us)
    assert kept.wait_us == 1_000_000
    # Then it is anyone's: job-a's reservation and its 5 s of refill unused are gone, its token is there.
    freed = take(abandoned.bucket, NOW_US + 6_000_000, *limit, holder="job-b", grace_us=grace_us)
    assert freed.granted
    assert freed.bucket == Bucket(drips=0, refilled_us=NOW_US + 6_000_000, reservations={})
    # A job that comes after its reservation was dropped asks afresh.
    again = take(freed.bucket, NOW_US + 6_000_000, *limit, holder="job-a", grace_us=grace_us)
    assert again.bucket.reservations == {"job-a": NOW_US + 7_000_000}


@given(requests_per_minute=contended_rates, burst=contended_bursts, grace_us=graces_us,
       arrivals_us=arrivals(max_jobs=20), data=st.data())
def test_bucket_left_alone_until_it_expires_reads_as_a_missing_one(requests_per_minute: int, burst: int,
                                                                   grace_us: int, arrivals_us: list[int],
                                                                   data: st.DataObject) -> None:
    # What makes the keys' expiry safe: the script reads a missing bucket as a full one with no reservation.
    jobs = Jobs(requests_per_minute, burst, grace_us)
    jobs.run(arrivals_us, wakings, data, max_asks=data.draw(st.integers(min_value=1, max_value=60)))  # waiters left
    assert jobs.bucket is not None
    last_us = max(arrivals_us[-1], jobs.bucket.refilled_us)
    expires_us = last_us + 1000 * expiry_ms(jobs.bucket, last_us, requests_per_minute, burst, margin_ms=0,
                                            grace_us=grace_us)
    later_us = data.draw(st.integers(min_value=expires_us, max_value=expires_us + 10**8))

    for holder in [*jobs.bucket.reservations, "job-new"]:
        assert take(jobs.bucket, later_us, requests_per_minute, burst, holder=holder, grace_us=grace_us) == take(
            None, later_us, requests_per_minute, burst, holder=holder, grace_us=grace_us)


@given(requests_per_minute=rates, burst=bursts, data=st.data())
def test_bucket_never_holds_more_than_burst_nor_less_than_nothing(requests_per_minute: int, burst: int,
                                                                 data: st.DataObject) -> None:
    bucket = data.draw(buckets(burst))
    later_us = NOW_US + data.draw(st.integers(min_value=0, max_value=10**12))

    refilled = refill(bucket, later_us, requests_per_minute, burst)

    assert bucket.drips <= refilled.drips <= capacity_drips(burst)
    assert_level_in_bounds(take(bucket, later_us, requests_per_minute, burst, holder="job-a").bucket, burst)


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


def test_reservations_key_is_beside_the_bucket_key_under_its_own_prefix() -> None:
    uid = "0b6f2c1e-5a7d-4a51-9d0e-2f6d0c9b8a11"

    assert (reservations_key(bucket_key(uid, "events.example", per_host=True))
            == f"kubearq:ratelimit-reservations:{uid}:events.example")
    with pytest.raises(ValueError, match="not a rate-limit bucket key"):
        reservations_key("arq:queue")


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
    slots = await client.zrange(reservations_key(key), 0, -1, withscores=True)
    return Bucket(drips=int(drips), refilled_us=int(refilled_us),
                  reservations={job.decode(): int(slot) for job, slot in slots})


limits = st.tuples(st.one_of(st.integers(min_value=1, max_value=600), rates), st.integers(min_value=1, max_value=5))


@dataclass(frozen=True)
class AsTold:
    """A step that comes at the slot its holder was told, or a µs either side: the boundary of every rule."""

    offset_us: int


gaps = st.one_of(
    st.builds(AsTold, st.sampled_from([-1, 0, 0, 1])),
    st.integers(min_value=0, max_value=2_000),
    st.integers(min_value=0, max_value=3_000_000),
    st.integers(min_value=-2_000_000, max_value=0),  # a failover to a Redis whose clock lags
)
HOLDERS = 4
steps = st.tuples(gaps, st.integers(min_value=0, max_value=2), st.integers(min_value=0, max_value=HOLDERS - 1))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limits=st.lists(limits, min_size=3, max_size=3), grace_us=st.sampled_from([0, 1_500_000, DEFAULT_GRACE_US]),
       steps=st.lists(steps, min_size=1, max_size=60))
async def test_script_and_pure_arithmetic_agree(client: Redis, limits: list[tuple[int, int]], grace_us: int,
                                               steps: list[tuple[int | AsTold, int, int]]) -> None:
    clock = FakeClock()
    margin_ms = 10_000
    limiter = SharedRateLimiter(client, clock=clock, expiry_margin=margin_ms / 1000,
                                reservation_grace=grace_us / 1_000_000)
    key = bucket_key(uuid.uuid4().hex, None, per_host=False)
    expected: Bucket | None = None
    told_us: dict[str, int] = {}

    # A few jobs ask in turn, again when told or not; the limit may change between requests, as when a user
    # edits the ScrapeRequest.
    for gap, limit_index, job in steps:
        holder = f"job-{job}"
        requests_per_minute, burst = limits[limit_index]
        if isinstance(gap, AsTold):
            clock.now_us = told_us.get(holder, clock.now_us) + gap.offset_us
        else:
            clock.now_us += gap
        outcome = take(expected, clock.now_us, requests_per_minute, burst, holder=holder, grace_us=grace_us)
        expected = outcome.bucket
        if not outcome.granted:
            told_us[holder] = clock.now_us + outcome.wait_us

        wait = await limiter.acquire(key, RateLimit(requests_per_minute=requests_per_minute, burst=burst),
                                     holder=holder)

        assert wait == outcome.wait_us / 1_000_000
        assert await stored_bucket(client, key) == expected
        keep_ms = expiry_ms(expected, clock.now_us, requests_per_minute, burst, margin_ms=margin_ms,
                            grace_us=grace_us)
        assert keep_ms - 1_000 < await client.pttl(key) <= keep_ms
        if expected.reservations:
            assert keep_ms - 1_000 < await client.pttl(reservations_key(key)) <= keep_ms
        else:
            assert not await client.exists(reservations_key(key))


async def test_fresh_bucket_grants_burst_then_tells_each_waiter_its_own_slot(client: Redis) -> None:
    limiter = SharedRateLimiter(client)
    limit = RateLimit(requests_per_minute=60, burst=3)
    key = bucket_key("request-1", None, per_host=False)

    waits = [await limiter.acquire(key, limit, holder=f"job-{number}") for number in range(5)]

    assert waits[:3] == [0.0, 0.0, 0.0]
    assert 0.9 < waits[3] <= 1.0
    assert 1.9 < waits[4] <= 2.0
    assert await client.zrange(reservations_key(key), 0, -1) == [b"job-3", b"job-4"]


async def test_acquire_waits_out_a_wait_within_its_allowance_and_claims_the_token(client: Redis) -> None:
    limiter = SharedRateLimiter(client)
    limit = RateLimit(requests_per_minute=600, burst=1)  # a token every 100 ms
    key = bucket_key("request-1", None, per_host=False)
    assert await limiter.acquire(key, limit, holder="job-1") == 0.0

    started = time.monotonic()
    wait = await limiter.acquire(key, limit, holder="job-2", wait_within=0.25)

    assert wait == 0.0
    assert 0.09 < time.monotonic() - started < 0.25
    assert not await client.exists(reservations_key(key))


async def test_acquire_returns_a_wait_beyond_its_allowance_at_once(client: Redis) -> None:
    limiter = SharedRateLimiter(client)
    limit = RateLimit(requests_per_minute=60, burst=1)
    key = bucket_key("request-1", None, per_host=False)
    assert await limiter.acquire(key, limit, holder="job-1") == 0.0

    started = time.monotonic()
    wait = await limiter.acquire(key, limit, holder="job-2", wait_within=0.25)

    assert 0.9 < wait <= 1.0
    assert time.monotonic() - started < 0.2
    assert await client.zrange(reservations_key(key), 0, -1) == [b"job-2"]


async def test_bucket_is_timed_by_the_redis_server_clock(client: Redis) -> None:
    limiter = SharedRateLimiter(client)
    key = bucket_key("request-1", None, per_host=False)

    await limiter.acquire(key, RateLimit(requests_per_minute=60, burst=5), holder="job-1")

    seconds, microseconds = await client.time()
    stored = await stored_bucket(client, key)
    assert stored is not None
    assert 0 <= seconds * 1_000_000 + microseconds - stored.refilled_us < 1_000_000
    assert stored.drips == 4 * DRIPS_PER_TOKEN


async def test_bucket_expires_once_it_would_be_full_again(client: Redis) -> None:
    limiter = SharedRateLimiter(client, expiry_margin=0.5)
    slow = bucket_key("slow-request", None, per_host=False)
    fast = bucket_key("fast-request", None, per_host=False)

    await limiter.acquire(slow, RateLimit(requests_per_minute=60, burst=10), holder="job-1")
    await limiter.acquire(fast, RateLimit(requests_per_minute=6_000, burst=1), holder="job-1")

    # One token of ten spent at 1/s: full after 1 s. One of one at 100/s: full after 10 ms.
    assert 1_000 < await client.pttl(slow) <= 1_000 + 500
    assert 0 < await client.pttl(fast) <= 10 + 500
    deadline = time.monotonic() + 5
    while await client.exists(fast):
        assert time.monotonic() < deadline, f"{fast} did not expire"
        await asyncio.sleep(0.02)


async def test_reservation_keeps_the_bucket_until_its_grace_is_over_then_both_expire(client: Redis) -> None:
    limiter = SharedRateLimiter(client, expiry_margin=0.1, reservation_grace=0.3)
    limit = RateLimit(requests_per_minute=6_000, burst=1)
    key = bucket_key("request-1", None, per_host=False)
    await limiter.acquire(key, limit, holder="job-1")

    await limiter.acquire(key, limit, holder="job-2")  # reserves the token due in 10 ms, never claims it

    # Full again in 10 ms, but the reservation is kept until 10 ms + 300 ms: both keys until then + 100 ms.
    for stored in (key, reservations_key(key)):
        assert 300 < await client.pttl(stored) <= 10 + 300 + 100
    deadline = time.monotonic() + 5
    while await client.exists(key, reservations_key(key)):
        assert time.monotonic() < deadline, f"{key} and its reservations did not expire"
        await asyncio.sleep(0.02)


async def test_script_sets_the_expiry_the_arithmetic_asks_for(client: Redis) -> None:
    clock = FakeClock()
    limiter = SharedRateLimiter(client, clock=clock, expiry_margin=2.0)
    limit = RateLimit(requests_per_minute=7, burst=3)
    key = bucket_key("request-1", None, per_host=False)
    await limiter.acquire(key, limit, holder="job-1")

    before_ms = await server_time_ms(client)
    await limiter.acquire(key, limit, holder="job-2")
    after_ms = await server_time_ms(client)

    stored = await stored_bucket(client, key)
    assert stored is not None
    # Two tokens short at 7/min: full in 17.142857 s, kept for 17.143 s + the 2 s margin.
    assert expiry_ms(stored, clock.now_us, limit.requests_per_minute, limit.burst, margin_ms=2_000) == 19_143
    expires_at_ms = await cast(Awaitable[int], client.pexpiretime(key))
    assert before_ms <= expires_at_ms - 19_143 <= after_ms


async def test_per_host_budgets_are_separate(client: Redis) -> None:
    limiter = SharedRateLimiter(client)
    limit = RateLimit(requests_per_minute=1, burst=1, per_host=True)
    first_host = bucket_key("request-1", "a.example", limit.per_host)
    second_host = bucket_key("request-1", "b.example", limit.per_host)

    assert await limiter.acquire(first_host, limit, holder="job-1") == 0.0
    assert await limiter.acquire(second_host, limit, holder="job-2") == 0.0
    assert await limiter.acquire(first_host, limit, holder="job-3") > 0.0
    assert sorted(await client.keys("kubearq:ratelimit*")) == [
        b"kubearq:ratelimit-reservations:request-1:a.example",
        b"kubearq:ratelimit:request-1:a.example",
        b"kubearq:ratelimit:request-1:b.example",
    ]


async def test_one_budget_per_request_covers_all_its_hosts(client: Redis) -> None:
    limiter = SharedRateLimiter(client)
    limit = RateLimit(requests_per_minute=1, burst=1, per_host=False)

    assert await limiter.acquire(bucket_key("request-1", "a.example", limit.per_host), limit, holder="job-1") == 0.0
    assert await limiter.acquire(bucket_key("request-1", "b.example", limit.per_host), limit, holder="job-2") > 0.0
    assert await limiter.acquire(bucket_key("request-2", "a.example", limit.per_host), limit, holder="job-3") == 0.0


async def test_limiter_keeps_working_after_redis_restarts(redis_private: RedisServer) -> None:
    redis_private.restart(aof=True)  # the budget survives the restart, so a refusal proves the script ran
    # As a worker's client is set up: a connection the restart closed is replaced, the command retried once.
    client = Redis.from_url(redis_private.url, retry=Retry(NoBackoff(), 1), retry_on_error=[ConnectionError])
    try:
        limiter = SharedRateLimiter(client)
        limit = RateLimit(requests_per_minute=1, burst=1)
        key = bucket_key("request-1", None, per_host=False)
        assert await limiter.acquire(key, limit, holder="job-1") == 0.0

        redis_private.restart()

        assert (await client.info("memory"))["number_of_cached_scripts"] == 0
        assert 55.0 < await limiter.acquire(key, limit, holder="job-2") <= 60.0
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


# --- A scrape under the limit, end to end -----------------------------------------------------------------


@pytest.fixture
async def arq_redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    client = create_redis(redis_url)
    yield client
    await client.aclose()


def deferrals(service: WorkerService) -> int:
    return sum(int(service.metrics.registry.get_sample_value(
        "kubearq_worker_jobs_deferred_total", {"function": function}) or 0) for function in (SCRAPE_LISTING,
                                                                                             SCRAPE_DETAIL))


@pytest.mark.parametrize("burst", [1, 5])
async def test_pages_waiting_for_a_token_are_deferred_about_once_each(
    arq_redis: ArqRedis, redis_url: str, postgres_dsn: str, burst: int,
) -> None:
    details = [f"/events/{number}" for number in range(1, 31)]
    limit = RateLimit(requests_per_minute=900, burst=burst)
    async with Website() as site:
        site.routes["/list"] = Reply(body=listing_page(*details))
        for number, path in enumerate(details, start=1):
            site.routes[path] = Reply(body=event_page(number))
        run = ScrapeRun(arq_redis, SETTINGS.model_copy(update={"rate_limit": limit}))
        async with (scrape_worker(redis_url, postgres_dsn, site) as first,
                    scrape_worker(redis_url, postgres_dsn, site) as second):
            await run.start(site.url("/list", "127.0.0.1"))
            progress = await run.finished(within=60)
            deferred = deferrals(first) + deferrals(second)

    pages = 1 + len(details)
    print(f"\n{pages} pages at {limit.requests_per_minute}/min, burst {burst}, two workers: {deferred} deferrals")
    assert progress == {"listing_total": 1, "listing_done": 1, "detail_total": len(details),
                        "detail_done": len(details)}
    # About one deferral per waiting page (27 at burst 1, 22-24 at burst 5 on a quiet machine; 66 at burst 1 in
    # the full suite on two busy cores, where jobs wake later). Telling every waiter the next token made them a
    # herd: 334-465 for these 31 pages. The bound keeps the two apart without timing the machine.
    assert deferred <= 4 * pages
