"""Redis connections for both roles: ARQ's client, with TLS verified and transient errors retried."""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

from arq.connections import ArqRedis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kubearq.core.contract import DEFAULT_QUEUE, deserialize, serialize

# Errors after which a command is retried on a fresh connection (a Redis restart or failover).
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def check_redis_url(url: str) -> str:
    """REDIS_URL as the client can use it: `redis://`, `rediss://` (TLS) or `unix://`."""
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"REDIS_URL must start with redis://, rediss:// (TLS) or unix://, not {url!r}")
    return url


def create_redis(
    url: str,
    *,
    ca_file: str | None = None,
    tls_insecure: bool = False,
    queue: str = DEFAULT_QUEUE,
    retries: int = 2,
) -> ArqRedis:
    """An ArqRedis client for `redis://`, `rediss://` or `unix://` URLs.

    ARQ's own `RedisSettings.from_dsn` turns off host-name checking for `rediss://`; here certificate and
    host name are verified unless `tls_insecure` says otherwise.
    """
    parts = urlsplit(url)
    # redis-py applies this retry twice over (each command, and each connect inside it), so a dead server
    # costs (retries + 1)^2 attempts before the caller hears of it: keep both small; callers back off.
    retry = Retry(EqualJitterBackoff(cap=0.25, base=0.02), retries)
    common: dict[str, Any] = {
        "job_serializer": serialize,
        "job_deserializer": deserialize,
        "default_queue_name": queue,
        "retry": retry,
        "retry_on_error": list(TRANSIENT_ERRORS),
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
        "health_check_interval": 15,
    }
    if parts.scheme == "unix":
        database = int(parse_qs(parts.query).get("db", ["0"])[0])
        return ArqRedis(unix_socket_path=parts.path, db=database, **common)
    database = int(parts.path.lstrip("/") or 0) if parts.path not in ("", "/") else 0
    tls: dict[str, Any] = {}
    if parts.scheme == "rediss":
        tls = {
            "ssl": True,
            "ssl_cert_reqs": ssl.CERT_NONE if tls_insecure else ssl.CERT_REQUIRED,
            "ssl_check_hostname": not tls_insecure,
            "ssl_ca_certs": ca_file,
        }
    return ArqRedis(
        host=parts.hostname or "localhost",
        port=parts.port or 6379,
        db=database,
        username=parts.username,
        password=parts.password,
        **tls,
        **common,
    )
