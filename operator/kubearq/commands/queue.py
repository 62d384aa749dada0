"""`kubearq queue list|stats`: what the ARQ queues hold, read from Redis the way the operator's metrics read it.

Ready jobs wait for a worker slot, running ones hold one, deferred ones (retry backoff, rate-limit waits,
`_defer_by`) are not due yet; `ZCARD` lumps the three together (kubearq.operator.queuestats).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from kubearq.commands import Subcommands
from kubearq.commands._cluster import FAILED, OK, USAGE, CommandError, dump, duration, run, table
from kubearq.core.connections import check_redis_url, create_redis
from kubearq.core.contract import DEFAULT_QUEUE, function_registry_key
from kubearq.operator.queuestats import QueueStats, label_safe, queue_stats

REGISTRY_PREFIX = function_registry_key("")
NOT_QUEUES = ("arq:abort",)  # ARQ's own sorted set of aborted job ids


def register(commands: Subcommands) -> None:
    group = commands.add_parser(
        "queue", help="ready, running and deferred jobs of the ARQ queues (from Redis)",
        description="The ARQ queues in Redis (REDIS_URL, or --redis-url): ready jobs wait for a worker slot, "
                    "running ones hold one, deferred ones are not due yet (retry backoff, rate limit, _defer_by). "
                    "Exit codes: 0 ok, 1 Redis unreachable, 2 bad usage.")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every queue in Redis, with its counts")
    stats = actions.add_parser("stats", help="one queue in full (default: arq:queue)")
    stats.add_argument("queues", nargs="*", metavar="QUEUE", help=f"queue names (default: {DEFAULT_QUEUE})")
    for parser in (listing, stats):
        parser.add_argument("--redis-url", help="Redis (default: $REDIS_URL, else redis://localhost:6379/0)")
        parser.add_argument("-o", "--output", choices=("wide", "json", "yaml"),
                            help="a table (default), or wide, json, yaml")
    group.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    return run(f"queue {args.action}", lambda: show(args))


async def found_queues(redis: Redis) -> list[str]:
    """Sorted sets that look like ARQ queues, and every queue a worker publishes its functions on."""
    names: set[str] = set()
    async for key in redis.scan_iter(count=1000, _type="zset"):
        name = key.decode() if isinstance(key, bytes) else str(key)
        if name not in NOT_QUEUES and not name.startswith("kubearq:"):
            names.add(name)
    async for key in redis.scan_iter(match=f"{REGISTRY_PREFIX}*", count=1000):
        name = key.decode() if isinstance(key, bytes) else str(key)
        names.add(name.removeprefix(REGISTRY_PREFIX))
    return sorted(names)


def as_json(stats: QueueStats, functions: list[str]) -> dict[str, object]:
    return {"queue": stats.queue, "label": label_safe(stats.queue), "ready": stats.ready, "running": stats.running,
            "deferred": stats.deferred, "oldestReadyAgeSeconds": round(stats.oldest_ready_age_seconds, 3),
            "exact": stats.exact, "functions": functions}


async def show(args: argparse.Namespace) -> int:
    url = args.redis_url or os.environ.get("REDIS_URL") or "redis://localhost:6379/0"
    try:
        check_redis_url(url)
    except ValueError as error:
        raise CommandError(f"--redis-url / REDIS_URL: {error}", USAGE) from None
    redis = create_redis(url)
    try:
        queues = await found_queues(redis) if args.action == "list" else (args.queues or [DEFAULT_QUEUE])
        read = []
        for queue in queues:
            published = cast(Mapping[bytes, bytes],
                             await redis.hgetall(function_registry_key(queue)))  # type: ignore[misc]
            read.append((await queue_stats(redis, queue), sorted(name.decode() for name in published)))
    except (RedisError, OSError) as error:
        raise CommandError(f"cannot read Redis at {url}: {type(error).__name__}: {error}", FAILED) from None
    finally:
        await redis.aclose()
    if args.output in ("json", "yaml"):
        print(dump({"queues": [as_json(stats, functions) for stats, functions in read]}, args.output))
        return OK
    if not read:
        print("No queues in Redis (no sorted set of jobs, and no worker has published its functions)")
        return OK
    if args.action == "stats":
        blocks = []
        for stats, functions in read:
            blocks.append("\n".join([
                f"Queue:             {stats.queue} (label {label_safe(stats.queue)})",
                f"Ready:             {stats.ready}{'' if stats.exact else ' (at least; running checked in part)'}",
                f"Running:           {stats.running}",
                f"Deferred:          {stats.deferred}",
                f"Oldest ready age:  {duration(stats.oldest_ready_age_seconds) if stats.ready else '<none>'}",
                f"Functions served:  {', '.join(functions) or '<none published>'}",
            ]))
        print("\n\n".join(blocks))
        return OK
    header = ["QUEUE", "READY", "RUNNING", "DEFERRED", "OLDEST READY"]
    if args.output == "wide":
        header += ["LABEL", "FUNCTIONS"]
    rows = []
    for stats, functions in read:
        row = [stats.queue, str(stats.ready), str(stats.running), str(stats.deferred),
               duration(stats.oldest_ready_age_seconds) if stats.ready else "<none>"]
        if args.output == "wide":
            row += [label_safe(stats.queue), ",".join(functions) or "<none>"]
        rows.append(row)
    print(table(header, rows))
    return OK
