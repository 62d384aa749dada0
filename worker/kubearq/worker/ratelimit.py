"""One request budget shared by every worker replica: a token bucket kept in Redis.

The seed's in-process limiter gave each replica the whole budget, so N replicas sent N times the
rate. Here every replica takes its tokens from one Redis hash through one atomic Lua script. A job
that finds no free token *reserves* the next one instead of waiting for it: it is deferred in the
ARQ queue to that token's time (its slot), holds no worker slot meanwhile, and on waking claims its
reservation, taking no other token. The n-th job in line is told about n / rate, so waiters wake one
at a time, in the order they asked. (Telling every waiter "the next token" made them all wake
together, one win and the rest defer again: deferrals grew with the waiters squared.)

The budget holds at the moment a token is *used* (taken free, or a reservation claimed), however
late or early jobs wake: over any window, uses <= burst + rate * window. What holds it is the
bucket's *level*, its free tokens plus those kept for reservations: it fills at the rate up to the
burst, never goes below zero, and every use takes a token from it. A reservation takes its token in
advance (the free tokens go below zero by those promised and not yet come); its claim is granted
once its slot has come and the level holds a token. A job that wakes late leaves its token in the
bucket meanwhile, and the bucket does not fill past its burst, so the waiter after it may find its
own token not there yet: it keeps its reservation and is told when the level will hold one. A job
that wakes before its slot is told the rest of its wait. A reservation not claimed within
`reservation_grace` after its slot (its job was deleted, or woke far too late) is dropped and its
token freed for anyone; its job, if it comes, asks afresh. The bucket and its reservations expire
together once the bucket would read as a missing one: full, no reservation left.

A deferral wakes a job some tens of ms late, and at a small burst that makes the next waiter late in
turn, so `acquire` may sleep through short waits itself (`wait_within`; scrape jobs allow `JOB_WAIT`).

Arithmetic is in whole numbers so the Lua script and the Python mirror below agree to the unit:
time in microseconds (Redis's TIME resolution), tokens in *drips*, 60 000 000 drips to a token. A
bucket refilling at `requests_per_minute` tokens a minute gains exactly `requests_per_minute` drips
a microsecond.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from redis.asyncio import Redis

from kubearq.core.contract import RateLimit

KEY_PREFIX = "kubearq:ratelimit"
RESERVATIONS_PREFIX = "kubearq:ratelimit-reservations"
"""A bucket's reservations live under their own prefix: a suffix on the bucket key could be a host's name."""
DRIPS_PER_TOKEN = 60_000_000
"""Drips in one token: microseconds in a minute, so a rate per minute is a whole number of drips per µs."""
DEFAULT_EXPIRY_MARGIN = 10.0
"""Seconds a bucket outlives the moment it reads as a missing one: full, with no reservation left."""
DEFAULT_RESERVATION_GRACE = 60.0
"""Seconds a reservation is kept after its slot for its job to claim it (a busy worker wakes jobs late)."""
DEFAULT_GRACE_US = round(DEFAULT_RESERVATION_GRACE * 1_000_000)
JOB_WAIT = 0.25
"""Seconds of rate-limit waits a scrape job sleeps through rather than be deferred: a deferral wakes it some tens
of ms late (ARQ's poll delay, the job's own start), and at a small burst a late claim makes the next waiter
late in turn, to be deferred again. Longer waits are deferred: the job holds no worker slot meanwhile."""

Clock = Callable[[], float]
"""Seconds since the epoch, like `time.time`."""


@dataclass(frozen=True)
class Bucket:
    """A bucket's stored state as of `refilled_us` (µs since the epoch).

    `drips` are the free tokens: below zero by the tokens promised to reservations and not yet come.
    `reservations` are the slots (µs) of the tokens reserved and not yet claimed, by job id.
    """

    drips: int
    refilled_us: int
    reservations: Mapping[str, int] = field(default_factory=dict)

    @property
    def level(self) -> int:
        """The drips in the bucket, free or kept for a reservation: from 0 to the capacity; a use takes a token."""
        return self.drips + len(self.reservations) * DRIPS_PER_TOKEN


@dataclass(frozen=True)
class Take:
    """The outcome of one request for a token."""

    bucket: Bucket
    """The state after the request."""
    wait_us: int
    """0 when a token was granted (taken free, or the holder's reservation claimed); else microseconds until the
    holder's reserved slot, when it should ask again."""

    @property
    def granted(self) -> bool:
        return self.wait_us == 0


def capacity_drips(burst: int) -> int:
    return burst * DRIPS_PER_TOKEN


def room_drips(bucket: Bucket, burst: int) -> int:
    """The most free drips the bucket may hold: its capacity less the tokens kept for reservations."""
    return capacity_drips(burst) - len(bucket.reservations) * DRIPS_PER_TOKEN


def full_bucket(now_us: int, burst: int) -> Bucket:
    """The bucket a request sees when none is stored: idle long enough to be full, no reservation left."""
    return Bucket(drips=capacity_drips(burst), refilled_us=now_us)


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def refill(bucket: Bucket, now_us: int, requests_per_minute: int, burst: int) -> Bucket:
    """The bucket at `now_us`: `requests_per_minute` drips per µs since it was last refilled, its level up to the
    capacity (free drips up to the room).

    A clock that went back (a failover to a replica whose clock lags) adds nothing and moves nothing back,
    so no time is credited twice.
    """
    room = room_drips(bucket, burst)
    elapsed_us = max(now_us - bucket.refilled_us, 0)
    # Compared before multiplying, as the script must: there elapsed * rate could pass 2**53,
    # beyond which doubles are no longer exact integers.
    if elapsed_us >= _ceil_div(room - bucket.drips, requests_per_minute):
        drips = room
    else:
        drips = bucket.drips + elapsed_us * requests_per_minute
    return Bucket(drips=drips, refilled_us=max(bucket.refilled_us, now_us), reservations=bucket.reservations)


def take(bucket: Bucket | None, now_us: int, requests_per_minute: int, burst: int, *, holder: str,
         grace_us: int = DEFAULT_GRACE_US) -> Take:
    """`holder` asks for a token at `now_us`: claim its reservation once its slot has come and the bucket holds a
    token, take a free token, or reserve the next one and be told its slot."""
    current = refill(bucket or full_bucket(now_us, burst), now_us, requests_per_minute, burst)
    # Dropped reservations free their tokens: the level stays, less of it is promised.
    reservations = {job: slot for job, slot in current.reservations.items() if slot > now_us - grace_us}
    drips = current.drips + (len(current.reservations) - len(reservations)) * DRIPS_PER_TOKEN
    refilled_us = current.refilled_us
    level = drips + len(reservations) * DRIPS_PER_TOKEN
    slot_us = reservations.get(holder)
    if slot_us is not None and slot_us > now_us:  # woken early (deferred to a rounded time, or clocks differ)
        return Take(Bucket(drips, refilled_us, reservations), wait_us=slot_us - now_us)
    if slot_us is not None:
        if level >= DRIPS_PER_TOKEN:
            del reservations[holder]
            return Take(Bucket(drips, refilled_us, reservations), wait_us=0)
        # Its token is not there yet (a job ahead claimed late, or took it first): keep the place until it is.
        slot_us = refilled_us + _ceil_div(DRIPS_PER_TOKEN - level, requests_per_minute)
    elif drips >= DRIPS_PER_TOKEN:
        return Take(Bucket(drips - DRIPS_PER_TOKEN, refilled_us, reservations), wait_us=0)
    else:
        drips -= DRIPS_PER_TOKEN
        slot_us = refilled_us + _ceil_div(-drips, requests_per_minute)
    reservations[holder] = slot_us
    return Take(Bucket(drips, refilled_us, reservations), wait_us=slot_us - now_us)


def expiry_ms(bucket: Bucket, now_us: int, requests_per_minute: int, burst: int, *, margin_ms: int,
              grace_us: int = DEFAULT_GRACE_US) -> int:
    """How long a bucket and its reservations must be kept, from `now_us`: until it reads the same as a missing
    one (full, its last reservation's grace over), plus the margin. Both keys expire together."""
    keep_us = bucket.refilled_us - now_us + _ceil_div(room_drips(bucket, burst) - bucket.drips, requests_per_minute)
    if bucket.reservations:
        keep_us = max(keep_us, max(bucket.reservations.values()) + grace_us - now_us)
    return _ceil_div(keep_us, 1000) + margin_ms


# The same arithmetic as `take` and `expiry_ms` above, atomically.
# KEYS[1]  the bucket: a hash {drips, refilled_us}.
# KEYS[2]  its reservations: a sorted set of job ids scored by slot (µs). Both expire when the bucket would
#          read as a missing one.
# ARGV     requests_per_minute, burst, expiry margin (ms), reservation grace (µs), holder (job id),
#          now (µs; empty = the server's clock).
# Returns  0 when a token was granted, else the µs until the holder's reserved slot.
#
# Time is Redis's own TIME, so replicas agree however their clocks drift. A script that reads TIME
# may write because Redis replicates a script by its effects, not by re-running it on replicas (the
# default since Redis 5, the only mode since 7). Only tests pass a "now".
# Lua numbers are doubles, exact for integers below 2**53 (~9e15): epoch µs and slots are ~2**51,
# capacities at most 6e11 drips, debts at most 6e7 drips per reservation (a million waiters: 6e13),
# and elapsed * rate is only computed when it stays below room - drips. ceil(a / b) is exact too for
# such a, negative ones included: the quotient's rounding error is far below 1 / b, its distance to an
# integer. Numbers are written with %.0f: Lua's tostring keeps 14 digits only.
_SCRIPT = """
local token = 60000000
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2]) * token
local margin_ms = tonumber(ARGV[3])
local grace = tonumber(ARGV[4])
local holder = ARGV[5]
local now
if ARGV[6] ~= '' then
  now = tonumber(ARGV[6])
else
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end
local stored = redis.call('HMGET', KEYS[1], 'drips', 'refilled_us')
local drips, refilled = capacity, now
if stored[1] and stored[2] then
  drips, refilled = tonumber(stored[1]), tonumber(stored[2])
end
local held = redis.call('ZCARD', KEYS[2])
local room = capacity - held * token
local elapsed = math.max(now - refilled, 0)
if elapsed >= math.ceil((room - drips) / rate) then
  drips = room
else
  drips = drips + elapsed * rate
end
refilled = math.max(refilled, now)
local dropped = redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('%.0f', now - grace))
held = held - dropped
drips = drips + dropped * token
local level = drips + held * token
local wait = 0
local slot = redis.call('ZSCORE', KEYS[2], holder)
if slot and tonumber(slot) > now then
  wait = tonumber(slot) - now
elseif slot then
  if level >= token then
    redis.call('ZREM', KEYS[2], holder)
    held = held - 1
  else
    slot = refilled + math.ceil((token - level) / rate)
    wait = slot - now
    redis.call('ZADD', KEYS[2], string.format('%.0f', slot), holder)
  end
elseif drips >= token then
  drips = drips - token
else
  drips = drips - token
  held = held + 1
  slot = refilled + math.ceil(-drips / rate)
  wait = slot - now
  redis.call('ZADD', KEYS[2], string.format('%.0f', slot), holder)
end
redis.call('HSET', KEYS[1], 'drips', string.format('%.0f', drips), 'refilled_us', string.format('%.0f', refilled))
local keep = refilled - now + math.ceil((capacity - held * token - drips) / rate)
if held > 0 then
  local latest = tonumber(redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')[2])
  keep = math.max(keep, latest + grace - now)
  redis.call('PEXPIRE', KEYS[2], string.format('%.0f', math.ceil(keep / 1000) + margin_ms))
end
redis.call('PEXPIRE', KEYS[1], string.format('%.0f', math.ceil(keep / 1000) + margin_ms))
return wait
"""


def bucket_key(request_uid: str, host: str | None, per_host: bool) -> str:
    """The Redis key of a request's budget, or of its budget for one host when `per_host` is set."""
    if not per_host:
        return f"{KEY_PREFIX}:{request_uid}"
    if not host:
        raise ValueError(f"a per-host rate limit needs the target host (request {request_uid})")
    return f"{KEY_PREFIX}:{request_uid}:{host.lower().rstrip('.')}"


def reservations_key(bucket: str) -> str:
    """The Redis key of a bucket's reservations."""
    if not bucket.startswith(f"{KEY_PREFIX}:"):
        raise ValueError(f"not a rate-limit bucket key: {bucket!r}")
    return RESERVATIONS_PREFIX + bucket.removeprefix(KEY_PREFIX)


class SharedRateLimiter:
    """Token buckets in Redis shared by every process that uses the same key.

    `clock` is for tests only: by default the script reads Redis's clock, the one all replicas share.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        clock: Clock | None = None,
        expiry_margin: float = DEFAULT_EXPIRY_MARGIN,
        reservation_grace: float = DEFAULT_RESERVATION_GRACE,
    ) -> None:
        self._clock = clock
        self._expiry_margin_ms = round(expiry_margin * 1000)
        self._reservation_grace_us = round(reservation_grace * 1_000_000)
        # EVALSHA, and on NOSCRIPT (a restarted or failed-over Redis, SCRIPT FLUSH) load and retry.
        self._script = redis.register_script(_SCRIPT)

    async def acquire(self, key: str, limit: RateLimit, *, holder: str, wait_within: float = 0.0) -> float:
        """Return 0.0 when `holder` (a job id) may go now; else the seconds until its reserved slot, when it should
        ask again as the same holder to claim the token kept for it.

        Waits here only while the waits told add up to at most `wait_within` seconds (by default never): a job
        that is refused a longer wait is deferred to its slot rather than holding a worker slot.
        """
        deadline = time.monotonic() + wait_within
        while True:
            wait = await self._ask(key, limit, holder)
            if wait == 0.0 or time.monotonic() + wait > deadline:
                return wait
            await asyncio.sleep(wait)

    async def _ask(self, key: str, limit: RateLimit, holder: str) -> float:
        now_us = "" if self._clock is None else str(round(self._clock() * 1_000_000))
        wait_us = await self._script(
            keys=[key, reservations_key(key)],
            args=[limit.requests_per_minute, limit.burst, self._expiry_margin_ms, self._reservation_grace_us,
                  holder, now_us],
        )
        return int(wait_us) / 1_000_000
