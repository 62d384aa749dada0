"""Tests of the real-service helpers in kubearq.demo.services (Redis and PostgreSQL of a test or demo of its own)."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from kubearq.demo.services import PostgresServer, RedisServer

_seen_databases: set[str] = set()


@asynccontextmanager
async def _redis(url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def _pg(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


def _uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(field) for field in line.split()[1:]]
    raise AssertionError(f"no Uid line for pid {pid}")


async def test_redis_answers_ping_at_url(redis_url: str) -> None:
    async with _redis(redis_url) as client:
        assert await client.ping()


async def test_redis_write_acknowledged_with_aof_survives_kill(redis_private: RedisServer) -> None:
    redis_private.kill()
    redis_private.restart(aof=True)
    assert redis_private.aof
    async with _redis(redis_private.url) as client:
        await client.set("durable", "yes")
    redis_private.kill()
    redis_private.restart(aof=True)
    async with _redis(redis_private.url) as client:
        assert await client.get("durable") == b"yes"


async def test_redis_without_aof_comes_back_empty_after_kill(redis_private: RedisServer) -> None:
    async with _redis(redis_private.url) as client:
        await client.set("volatile", "yes")
    redis_private.kill()
    redis_private.restart()
    assert not redis_private.aof
    async with _redis(redis_private.url) as client:
        assert await client.dbsize() == 0


def test_redis_stop_closes_the_port(redis_private: RedisServer) -> None:
    redis_private.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((redis_private.host, redis_private.port), timeout=5).close()


def test_redis_close_leaves_no_process_and_no_temp_dir() -> None:
    server = RedisServer()
    server.start()
    pid, directory = server.pid, server.directory
    assert pid is not None
    assert directory.is_dir()
    server.close()
    server.close()
    assert not Path(f"/proc/{pid}").exists()
    assert not directory.exists()


async def test_postgres_dsn_connects_and_can_create_a_table(postgres_dsn: str) -> None:
    async with _pg(postgres_dsn) as conn:
        await conn.execute("CREATE TABLE jobs (id int PRIMARY KEY)")
        await conn.execute("INSERT INTO jobs VALUES (1)")
        assert await conn.fetchval("SELECT count(*) FROM jobs") == 1


@pytest.mark.parametrize("which", ["first", "second"])
async def test_postgres_each_test_gets_its_own_empty_database(postgres_dsn: str, which: str) -> None:
    assert postgres_dsn not in _seen_databases
    _seen_databases.add(postgres_dsn)
    async with _pg(postgres_dsn) as conn:
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        assert tables == []
        await conn.execute(f"CREATE TABLE marker_{which} (id int)")


async def test_postgres_kill_then_restart_recovers_committed_rows(postgres_private: PostgresServer) -> None:
    conn = await asyncpg.connect(postgres_private.dsn())
    await conn.execute("CREATE TABLE jobs (id int PRIMARY KEY)")
    await conn.execute("INSERT INTO jobs SELECT generate_series(1, 100)")
    old_pid = postgres_private.pid
    # The connection stays open across the crash: its backend must not block the restart.
    postgres_private.kill()
    assert not postgres_private.running
    conn.terminate()
    postgres_private.restart()
    assert postgres_private.pid != old_pid
    async with _pg(postgres_private.dsn()) as conn:
        assert await conn.fetchval("SELECT count(*) FROM jobs") == 100


async def test_postgres_stop_refuses_connections_and_start_brings_it_back(
    postgres_private: PostgresServer,
) -> None:
    postgres_private.stop()
    with pytest.raises(OSError):  # noqa: PT011 - asyncpg surfaces the refused connect as plain OSError
        await asyncpg.connect(postgres_private.dsn(), timeout=5)
    postgres_private.start()
    async with _pg(postgres_private.dsn()) as conn:
        assert await conn.fetchval("SELECT 1") == 1


def test_postgres_runs_as_unprivileged_user_even_when_we_are_root(postgres_server: PostgresServer) -> None:
    pid = postgres_server.pid
    assert pid is not None
    uids = _uids(pid)
    if os.geteuid() == 0:
        assert all(uid != 0 for uid in uids)
    else:
        assert set(uids) == {os.geteuid()}


def test_postgres_close_leaves_no_process_and_no_temp_dir() -> None:
    server = PostgresServer()
    server.start()
    pid, directory = server.pid, server.directory
    assert pid is not None
    server.close()
    server.close()
    assert not Path(f"/proc/{pid}").exists()
    assert not directory.exists()
