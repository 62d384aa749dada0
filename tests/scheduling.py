"""What the scheduler tests share: a clock the test moves, and Redis where a worker serves the function."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

import pytest
from arq.connections import ArqRedis

from kubearq.core.connections import create_redis
from kubearq.core.contract import function_registry_key


class Clock:
    """The operator's `now`, moved by the test."""

    def __init__(self, moment: datetime) -> None:
        self.moment = moment

    def __call__(self) -> datetime:
        return self.moment


@pytest.fixture
async def serving_redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    """A client of the test's Redis, where a worker on `arq:queue` has just published `sync_connections`."""
    client = create_redis(redis_url)
    await client.hset(function_registry_key("arq:queue"), "sync_connections", str(2**40))  # type: ignore[misc]
    yield client
    await client.aclose()
