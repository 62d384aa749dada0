"""Who serves the queues: each worker publishes, with every heartbeat, one small record of itself (its identity,
queue, functions, jobs in flight) that the dashboard lists; a worker whose heartbeats stopped shows as gone until its
record expires a few intervals later.

Listing reads a sorted set of worker ids (scored by their last heartbeat), never a SCAN: the cost grows with the
workers, not with the jobs or any other key in Redis.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

logger = logging.getLogger(__name__)

WORKER_KEY_PREFIX = "kubearq:worker:"
"""A hash per worker process: `kubearq:worker:<identity>:<instance>`."""
WORKERS_KEY = "kubearq:workers"
"""A sorted set of the worker ids, scored by the unix time of their last heartbeat."""
GONE_AFTER_BEATS = 3
"""A worker whose last heartbeat is older than this many of its intervals is gone (killed, hung, cut off)."""
KEPT_FOR_BEATS = 12
"""A worker's record expires this many heartbeat intervals after its last one (so a gone one shows for a while)."""
MAX_INTERVAL = 60.0  # the longest HEARTBEAT_INTERVAL (kubearq.worker.settings)
MAX_LISTED = 500
RUNNING_SHOWN = 10  # job ids of the jobs in flight a record names


@dataclass(frozen=True)
class WorkerBeat:
    """One worker process as its last heartbeat described it."""

    identity: str
    """The pod's name (POD_NAME, else the host name): what failed jobs record as their worker."""
    instance: str
    """This process, apart from others of the same identity (a restarted container, two workers on one host)."""
    queue: str
    functions: tuple[str, ...]
    in_flight: int
    max_jobs: int
    running: tuple[str, ...]
    """Ids of some of the jobs in flight (at most RUNNING_SHOWN)."""
    draining: bool
    """Shutting down: taking no new jobs, letting the running ones finish."""
    beat_at: float
    """Unix time of the heartbeat (the worker's clock)."""
    interval: float
    """Seconds between its heartbeats."""
    started_at: float
    finished: int = 0
    """Jobs it finished since it started (succeeded, or failed for good)."""
    per_minute: float = 0.0
    """Jobs it finished a minute over its last heartbeat interval: its throughput now."""

    @property
    def worker_id(self) -> str:
        return worker_id_of(self.identity, self.instance)

    def age(self, now: float) -> float:
        """Seconds since the heartbeat (0 for a clock a little ahead of ours)."""
        return max(0.0, now - self.beat_at)

    def gone(self, now: float) -> bool:
        return self.age(now) > GONE_AFTER_BEATS * self.interval


def worker_id_of(identity: str, instance: str) -> str:
    return f"{identity}:{instance}"


def worker_key(worker_id: str) -> str:
    return WORKER_KEY_PREFIX + worker_id


def record_seconds(interval: float) -> int:
    """How long a record outlives its last heartbeat."""
    return max(1, round(KEPT_FOR_BEATS * interval))


def encode(beat: WorkerBeat) -> dict[str, str]:
    """The hash fields of a heartbeat."""
    return {
        "identity": beat.identity, "instance": beat.instance, "queue": beat.queue,
        "functions": json.dumps(list(beat.functions)), "in_flight": str(beat.in_flight),
        "max_jobs": str(beat.max_jobs), "running": json.dumps(list(beat.running[:RUNNING_SHOWN])),
        "draining": "1" if beat.draining else "0", "beat_at": repr(beat.beat_at), "interval": repr(beat.interval),
        "started_at": repr(beat.started_at), "finished": str(beat.finished), "per_minute": repr(beat.per_minute),
    }


def decode(fields: Mapping[bytes, bytes] | Mapping[str, str]) -> WorkerBeat:
    """A heartbeat from its hash fields; ValueError (naming the field) if one is missing or not what `encode`
    writes."""
    text = {(key.decode() if isinstance(key, bytes) else key): (value.decode() if isinstance(value, bytes) else value)
            for key, value in fields.items()}

    def field(name: str) -> str:
        if name not in text:
            raise ValueError(f"no field {name!r}")
        return text[name]

    def names(name: str) -> tuple[str, ...]:
        try:
            value: Any = json.loads(field(name))
        except json.JSONDecodeError:
            raise ValueError(f"field {name!r} is not JSON") from None
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"field {name!r} is not a list of names")
        return tuple(cast(list[str], value))

    try:
        return WorkerBeat(
            identity=field("identity"), instance=field("instance"), queue=field("queue"),
            functions=names("functions"), in_flight=int(field("in_flight")), max_jobs=int(field("max_jobs")),
            running=names("running"), draining=field("draining") == "1", beat_at=float(field("beat_at")),
            interval=float(field("interval")), started_at=float(field("started_at")),
            finished=int(field("finished")), per_minute=float(field("per_minute")))
    except ValueError as error:
        raise ValueError(f"a worker record not written by this kubearq: {error}") from None


def publish(pipe: Pipeline, beat: WorkerBeat) -> None:
    """Queue on `pipe` (the heartbeat's own round trip) the writes of one heartbeat: the record, its lifetime, and
    the worker's place in the set; ids whose heartbeats stopped longer ago than any record lives leave the set."""
    key = worker_key(beat.worker_id)
    pipe.hset(key, mapping=encode(beat))
    pipe.expire(key, record_seconds(beat.interval))
    pipe.zadd(WORKERS_KEY, {beat.worker_id: beat.beat_at})
    pipe.zremrangebyscore(WORKERS_KEY, "-inf", beat.beat_at - record_seconds(MAX_INTERVAL))
    pipe.expire(WORKERS_KEY, record_seconds(MAX_INTERVAL))


def withdraw(pipe: Pipeline, worker_id: str) -> None:
    """Queue the removal of a worker that stops cleanly: it is not gone, it is no more."""
    pipe.delete(worker_key(worker_id))
    pipe.zrem(WORKERS_KEY, worker_id)


@dataclass(frozen=True)
class Workers:
    """The workers listed: the most recently heard-from first, at most `limit` of them."""

    beats: list[WorkerBeat]
    truncated: bool
    unreadable: list[str]
    """Ids whose record this kubearq could not read (written by another version)."""


async def list_workers(redis: Redis, limit: int = MAX_LISTED) -> Workers:
    """The workers whose record has not expired: two round trips, whatever else Redis holds."""
    ids = [raw.decode() for raw in cast(list[bytes], await redis.zrevrange(WORKERS_KEY, 0, limit))]
    shown = ids[:limit]
    async with redis.pipeline(transaction=False) as pipe:
        for worker_id in shown:
            pipe.hgetall(worker_key(worker_id))
        records = cast(Sequence[dict[bytes, bytes]], await pipe.execute()) if shown else []
    beats, unreadable = [], []
    for worker_id, fields in zip(shown, records, strict=True):
        if not fields:
            continue  # expired: it stopped beating a while ago (a later heartbeat of another worker prunes the id)
        try:
            beats.append(decode(fields))
        except ValueError as error:
            logger.warning("worker %s: %s", worker_id, error)
            unreadable.append(worker_id)
    return Workers(beats, len(ids) > limit, unreadable)
