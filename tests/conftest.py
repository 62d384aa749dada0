"""Fixtures for real services (Redis, PostgreSQL) and the Kubernetes API emulator; helpers beside it."""

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import redis

from kubearq.demo.services import PostgresServer, RedisServer
from tests.kubernetes import add_options, control_plane, k8s, mark_kubernetes_tier, summary_line  # noqa: F401
from tests.scheduling import serving_redis  # noqa: F401


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A Redis server shared by the session."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session Redis, emptied (and restarted without AOF if a test changed it)."""
    if not redis_server.running or redis_server.aof:
        redis_server.restart(aof=False)
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster shared by the session."""
    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """Dsn of a fresh database on the session cluster, dropped after the test."""
    postgres_server.start()
    name = f"test_{uuid.uuid4().hex[:8]}"
    dsn = postgres_server.create_database(name)
    yield dsn
    postgres_server.start()
    postgres_server.drop_database(name)


@pytest.fixture
def redis_private() -> Iterator[RedisServer]:
    """A Redis server of the test's own, free to be stopped or killed."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def postgres_private() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of the test's own, free to be stopped or killed."""
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session", autouse=True)
def _no_implicit_event_loop() -> None:
    """Make sync tests find no event loop instead of creating one.

    looptime's plugin asks the event loop policy for the current loop before every test, sync ones too;
    on Python 3.11 the policy then creates a loop that nobody closes (a ResourceWarning at exit).
    Once a loop has been set explicitly (even to None) the policy raises instead, which looptime handles.
    """
    asyncio.set_event_loop(None)


@pytest.fixture
async def db(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test's database, for arranging and asserting on rows."""
    connection = await asyncpg.connect(postgres_dsn)
    await connection.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    yield connection
    await connection.close()


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mark_kubernetes_tier(items)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    terminalreporter.write_line(summary_line(config))
