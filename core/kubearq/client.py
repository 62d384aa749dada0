"""Enqueue kubearq jobs from your application, with ARQ's own client.

kubearq workers take jobs as JSON, never pickle (ARQ's default): whoever can write to Redis must not be able to
run code in a worker. `create_pool` is `arq.create_pool` with kubearq's serializer, and returns ARQ's `ArqRedis`,
so `enqueue_job`, `Job.status()`, `Job.result()`, `_job_id`, `_defer_by` and `_queue_name` work as in ARQ:

    from kubearq.client import create_pool

    redis = await create_pool("redis://redis:6379/0")
    job = await redis.enqueue_job("sync_connections", mode="realtime", _queue_name="arq:queue")
    print(await job.result(timeout=60))

Arguments and results must be JSON values (dicts, lists, strings, numbers, booleans, None).

A worker pool with ALLOWED_NAMESPACES runs only jobs that name an origin in one of those namespaces; give your
application's jobs one with `create_pool(..., origin=Origin(namespace="team-a", kind="Deployment", name="shop"))`.
An origin is a declaration, not an authentication: whoever can write to Redis can write any origin, so
ALLOWED_NAMESPACES guards against mistakes and stray writers, not against an attacker with access to Redis (keep
that out with Redis' own ACLs and network policy).
"""

from __future__ import annotations

import os

from arq import create_pool as arq_create_pool
from arq.connections import ArqRedis, RedisSettings

from kubearq.core.connections import create_redis
from kubearq.core.contract import DEFAULT_QUEUE, Origin, deserialize, job_serializer, serialize

__all__ = ["DEFAULT_QUEUE", "Origin", "create_pool", "default_redis_url", "deserialize", "serialize"]


def default_redis_url() -> str:
    """`$REDIS_URL`, else the workers' default `redis://localhost:6379/0`."""
    return os.environ.get("REDIS_URL") or "redis://localhost:6379/0"


async def create_pool(redis: str | RedisSettings | None = None, *, queue: str = DEFAULT_QUEUE,
                      ca_file: str | None = None, tls_insecure: bool = False, origin: Origin | None = None) -> ArqRedis:
    """ARQ's client for kubearq workers: a Redis URL (`redis://`, `rediss://` with the certificate and host name
    verified against `ca_file` or the system's CAs, `unix://`; default `$REDIS_URL`) or ARQ's `RedisSettings`.
    `queue` is where `enqueue_job` puts jobs unless given `_queue_name`; every job names `origin`, if given, as
    the namespace and resource it is enqueued for (what ALLOWED_NAMESPACES checks: a declaration, not a proof).
    Raises redis' ConnectionError if Redis does not answer."""
    if isinstance(redis, RedisSettings):
        return await arq_create_pool(redis, job_serializer=job_serializer(origin), job_deserializer=deserialize,
                                     default_queue_name=queue)
    pool = create_redis(redis or default_redis_url(), ca_file=ca_file, tls_insecure=tls_insecure, queue=queue)
    pool.job_serializer = job_serializer(origin)
    try:
        await pool.ping()
    except BaseException:
        await pool.aclose()
        raise
    return pool
