"""One request budget shared by every worker replica: a token bucket kept in Redis.

The seed's in-process limiter gave each replica the whole budget, so N replicas sent N times the
rate. Here every replica takes its tokens from one Redis hash through one atomic Lua script, and a
job that finds the bucket empty is told when the next token comes instead of waiting for it: it is
deferred in the ARQ queue to that time and holds no worker slot meanwhile.

Arithmetic is in whole numbers so the Lua script and the Python mirror below agree to the unit:
time in microseconds (Redis's TIME resolution), tokens in *drips*, 60 000 000 drips to a token. A
bucket refilling at `requests_per_minute` tokens a minute gains exactly `requests_per_minute` drips
a microsecond.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from redis.asyncio import Redis

from kubearq.core.contract import RateLimit

KEY_PREFIX = "kubearq:ratelimit"
DRIPS_PER_TOKEN = 60_000_000
"""Drips in one token: microseconds in a minute, so a rate per minute is a whole number of drips per µs."""
DEFAULT_EXPIRY_MARGIN = 10.0
"""Seconds an idle bucket outlives the moment it is full again (a missing bucket reads as full)."""

Clock = Callable[[], float]
"""Seconds since the epoch, like `time.time`."""


@dataclass(frozen=True)
class Bucket:
    """A bucket's stored state: its tokens (in drips) as of `refilled_us` (µs since the epoch)."""

    drips: int
    refilled_us: int


@dataclass(frozen=True)
class Take:
    """The outcome of one request for a token."""

    bucket: Bucket
    """The state after the request (unchanged, apart from refilling, when no token was taken)."""
    wait_us: int
    """0 when a token was taken; else microseconds until the next token, which was not taken."""

    @property
    def granted(self) -> bool:
        return self.wait_us == 0


def capacity_drips(burst: int) -> int:
    return burst * DRIPS_PER_TOKEN


def full_bucket(now_us: int, burst: int) -> Bucket:
    """The bucket a request sees when none is stored: idle long enough to be full."""
    return Bucket(drips=capacity_drips(burst), refilled_us=now_us)


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def refill(bucket: Bucket, now_us: int, requests_per_minute: int, burst: int) -> Bucket:
    """The bucket at `now_us`: `requests_per_minute` drips per µs since it was last refilled, capped at `burst`.

    A clock that went back (a failover to a replica whose clock lags) adds nothing and moves nothing back,
    so no time is credited twice.
    """
    capacity = capacity_drips(burst)
    elapsed_us = max(now_us - bucket.refilled_us, 0)
    # Compared before multiplying, as the script must: there elapsed * rate could pass 2**53,
    # beyond which doubles are no longer exact integers.
    if elapsed_us >= _ceil_div(capacity - bucket.drips, requests_per_minute):
        drips = capacity
    else:
        drips = bucket.drips + elapsed_us * requests_per_minute
    return Bucket(drips=drips, refilled_us=max(bucket.refilled_us, now_us))


def take(bucket: Bucket | None, now_us: int, requests_per_minute: int, burst: int) -> Take:
    """Take one token at `now_us` if the bucket holds one; else say how long until it does."""
    current = refill(bucket or full_bucket(now_us, burst), now_us, requests_per_minute, burst)
    if current.drips >= DRIPS_PER_TOKEN:
        return Take(Bucket(current.drips - DRIPS_PER_TOKEN, current.refilled_us), wait_us=0)
    next_token_us = current.refilled_us + _ceil_div(DRIPS_PER_TOKEN - current.drips, requests_per_minute)
    return Take(current, wait_us=next_token_us - now_us)


def expiry_ms(bucket: Bucket, requests_per_minute: int, burst: int, margin_ms: int) -> int:
    """How long a bucket must be kept: until it is full again (when it reads the same as a missing one) + margin."""
    full_in_us = _ceil_div(capacity_drips(burst) - bucket.drips, requests_per_minute)
    return _ceil_div(full_in_us, 1000) + margin_ms


# The same arithmetic as `take` and `expiry_ms` above, atomically on the stored hash.
# KEYS[1]  the bucket: a hash {drips, refilled_us}, expiring once it would be full again.
# ARGV     requests_per_minute, burst, expiry margin (ms), now (µs; empty = the server's clock).
# Returns  0 when a token was taken, else the µs until the next token (none taken).
#
# Time is Redis's own TIME, so replicas agree however their clocks drift. A script that reads TIME
# may write because Redis replicates a script by its effects, not by re-running it on replicas (the
# default since Redis 5, the only mode since 7). Only tests pass a "now".
# Lua numbers are doubles, exact for integers below 2**53: epoch µs are ~2**51, capacities at most
# 6e11 drips, and elapsed * rate is only computed when it stays below the capacity. ceil(a / b) is
# exact too for such a: the quotient's rounding error is far below 1 / b, its distance to an integer.
# Numbers are written with %.0f: Lua's tostring keeps 14 digits only.
_SCRIPT = """
local token = 60000000
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2]) * token
local margin_ms = tonumber(ARGV[3])
local now
if ARGV[4] and ARGV[4] ~= '' then
  now = tonumber(ARGV[4])
else
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end
local stored = redis.call('HMGET', KEYS[1], 'drips', 'refilled_us')
local drips, refilled = capacity, now
if stored[1] and stored[2] then
  drips, refilled = tonumber(stored[1]), tonumber(stored[2])
end
local elapsed = math.max(now - refilled, 0)
if elapsed >= math.ceil((capacity - drips) / rate) then
  drips = capacity
else
  drips = drips + elapsed * rate
end
refilled = math.max(refilled, now)
if drips < token then
  return refilled + math.ceil((token - drips) / rate) - now
end
drips = drips - token
redis.call('HSET', KEYS[1], 'drips', string.format('%.0f', drips), 'refilled_us', string.format('%.0f', refilled))
local full_in_ms = math.ceil(math.ceil((capacity - drips) / rate) / 1000)
redis.call('PEXPIRE', KEYS[1], string.format('%.0f', full_in_ms + margin_ms))
return 0
"""


def bucket_key(request_uid: str, host: str | None, per_host: bool) -> str:
    """The Redis key of a request's budget, or of its budget for one host when `per_host` is set."""
    if not per_host:
        return f"{KEY_PREFIX}:{request_uid}"
    if not host:
        raise ValueError(f"a per-host rate limit needs the target host (request {request_uid})")
    return f"{KEY_PREFIX}:{request_uid}:{host.lower().rstrip('.')}"


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
    ) -> None:
        self._clock = clock
        self._expiry_margin_ms = round(expiry_margin * 1000)
        # EVALSHA, and on NOSCRIPT (a restarted or failed-over Redis, SCRIPT FLUSH) load and retry.
        self._script = redis.register_script(_SCRIPT)

    async def acquire(self, key: str, limit: RateLimit) -> float:
        """Take a token now and return 0.0, or return the seconds until the next one without taking it.

        Never waits: a job that is refused is deferred to that time rather than holding a worker slot.
        """
        now_us = "" if self._clock is None else str(round(self._clock() * 1_000_000))
        wait_us = await self._script(
            keys=[key],
            args=[limit.requests_per_minute, limit.burst, self._expiry_margin_ms, now_us],
        )
        return int(wait_us) / 1_000_000
