"""One worker-like process of the rate-limit soak test (tests/test_ratelimit.py starts several).

It takes tokens from one bucket as fast as the bucket allows, the way deferred jobs would: on a refusal
it sleeps the wait the limiter returned (until its reserved slot), then asks again, as the same holder.
Protocol, all under the run's key prefix: RPUSH `<run>:ready` once connected; BLPOP `<run>:go` for the end
time (epoch seconds); at the end RPUSH every grant's time (epoch seconds) to `<run>:grants`.

    python tests/ratelimit_soak.py REDIS_URL RUN BUCKET_KEY REQUESTS_PER_MINUTE BURST
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from redis.asyncio import Redis

from kubearq.core.contract import RateLimit
from kubearq.worker.ratelimit import SharedRateLimiter

START_TIMEOUT = 60
LONGEST_SLEEP = 0.5
"""Seconds: ask again at least this often, as a deferred job's retry would."""


async def soak(redis_url: str, run: str, key: str, limit: RateLimit) -> None:
    client = Redis.from_url(redis_url)
    try:
        limiter = SharedRateLimiter(client)
        await client.rpush(f"{run}:ready", os.getpid())
        go = await client.blpop([f"{run}:go"], timeout=START_TIMEOUT)
        if go is None:
            raise SystemExit(f"no go signal within {START_TIMEOUT} s")
        end = float(go[1])
        grants: list[float] = []
        while time.time() < end:
            wait = await limiter.acquire(key, limit, holder=f"{run}:{os.getpid()}")
            if wait == 0.0:
                grants.append(time.time())
            else:
                await asyncio.sleep(min(wait, LONGEST_SLEEP, max(end - time.time(), 0.0)))
        if grants:
            await client.rpush(f"{run}:grants", *(f"{grant:.6f}" for grant in grants))
    finally:
        await client.aclose()


def main() -> None:
    redis_url, run, key, requests_per_minute, burst = sys.argv[1:]
    limit = RateLimit(requests_per_minute=int(requests_per_minute), burst=int(burst))
    asyncio.run(soak(redis_url, run, key, limit))


if __name__ == "__main__":
    main()
