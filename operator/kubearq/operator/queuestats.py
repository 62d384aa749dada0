"""Per-queue statistics read from ARQ's Redis keys, and the label-safe form of a queue name.

ARQ keeps a queue as one sorted set of job ids scored by the time (ms) they may run. A running job keeps
its id there (with an `arq:in-progress:<id>` mark) until it finishes, and a deferred one (retry backoff,
rate-limit wait, `_defer_by`) has a future score, so `ZCARD` counts work no new worker could take
(design.md "Autoscaling"). We split the queue into ready, running and deferred instead.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

# Due ids checked for an in-progress mark per read. Running jobs sit at the head of the due range (workers
# read only the first `queue_read_limit` due ids), so this only has to exceed the total worker slots;
# beyond it the rest of the due jobs are counted as ready and `QueueStats.exact` is False. Measured on
# redis 7.0 with ARQ's 32-hex ids: ~0.4 µs per id, so ~4 ms per read at this bound, against ~40-60 ms for
# an unbounded walk of 100,000 due jobs (Lua scripts block the whole server while they run).
DEFAULT_MAX_CHECKED = 10_000
# Due ids fetched per ZRANGE inside the script: keeps the Lua table small; ranks make each page O(log N + page).
_PAGE = 500

# One round trip. Scores ≤ now are due: due ids are exactly ranks 0 … due-1 of the sorted set, so the walk
# pages by rank (ZRANGE), which unlike ZRANGEBYSCORE … LIMIT offset does not rescan the skipped head.
# `now` comes from the Redis server clock unless given, so every operator replica computes the same split.
# The script reads keys it was not given in KEYS (the in-progress marks): fine on a standalone Redis or a
# replica set, which is all ARQ supports; it would be refused by Redis Cluster.
_SCRIPT = """
local queue, prefix = KEYS[1], ARGV[2]
local max_checked, page = tonumber(ARGV[3]), tonumber(ARGV[4])
local now = ARGV[1]
if now == '' then
  local t = redis.call('TIME')
  now = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
end
local due = redis.call('ZCOUNT', queue, '-inf', now)
local deferred = redis.call('ZCOUNT', queue, '(' .. now, '+inf')
local checked, running, oldest_ready = 0, 0, ''
while checked < due and checked < max_checked do
  local stop = math.min(due, max_checked, checked + page) - 1
  -- ids only: formatting the scores of every id would double the cost of the walk
  local ids = redis.call('ZRANGE', queue, checked, stop)
  if #ids == 0 then break end
  local marks = {}
  for i = 1, #ids do
    if oldest_ready == '' then
      -- one id at a time only until the oldest ready job is found (running ones sit at the head)
      if redis.call('EXISTS', prefix .. ids[i]) == 1 then
        running = running + 1
      else
        oldest_ready = redis.call('ZSCORE', queue, ids[i])
      end
    else
      marks[#marks + 1] = prefix .. ids[i]
    end
  end
  if #marks > 0 then
    -- EXISTS with many keys returns how many exist: one call per page instead of one per id
    running = running + redis.call('EXISTS', unpack(marks))
  end
  checked = checked + #ids
end
if oldest_ready == '' and checked < due then
  -- every checked id runs: the first unchecked due id is the best guess for the oldest ready one
  oldest_ready = redis.call('ZRANGE', queue, checked, checked, 'WITHSCORES')[2] or ''
end
return {now, due, deferred, checked, running, oldest_ready}
"""


@dataclass(frozen=True, slots=True)
class QueueStats:
    """What a queue holds at `now_ms`, split the way autoscaling needs it.

    `busy` (ready + running, i.e. every due job) is exact always. When more than `max_checked` jobs are
    due, `exact` is False: due ids past the check limit are counted as ready, never as running.
    """

    queue: str
    ready: int
    running: int
    deferred: int
    oldest_ready_age_seconds: float
    now_ms: int
    exact: bool = True

    @property
    def busy(self) -> int:
        """Jobs that need a worker slot now (what workers scale on; deferred ones never count)."""
        return self.ready + self.running


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str | int):
        return str(value)
    raise TypeError(f"unexpected reply from the queue stats script: {value!r}")


def _integer(value: object) -> int:
    if isinstance(value, int):
        return value
    raise TypeError(f"unexpected reply from the queue stats script: {value!r}")


async def queue_stats(
    redis: Redis, queue: str, now_ms: int | None = None, *, max_checked: int = DEFAULT_MAX_CHECKED,
) -> QueueStats:
    """Read ready / running / deferred counts and the oldest ready job's age of `queue` in one round trip.

    `now_ms` defaults to the Redis server's clock (`TIME`), so every operator replica agrees.
    """
    if max_checked < 0:
        raise ValueError(f"max_checked must be >= 0, got {max_checked}")
    script = redis.register_script(_SCRIPT)
    reply = await script(
        keys=[queue], args=["" if now_ms is None else str(now_ms), in_progress_key_prefix, max_checked, _PAGE],
    )
    if not isinstance(reply, list) or len(reply) != 6:
        raise TypeError(f"unexpected reply from the queue stats script: {reply!r}")
    now_text, due, deferred, checked, running, oldest_text = reply
    now = int(_text(now_text))
    due_count, running_count = _integer(due), _integer(running)
    oldest = _text(oldest_text)
    age_ms = max(0.0, now - float(oldest)) if oldest else 0.0
    return QueueStats(
        queue=queue,
        ready=due_count - running_count,
        running=running_count,
        deferred=_integer(deferred),
        oldest_ready_age_seconds=age_ms / 1000,
        now_ms=now,
        exact=_integer(checked) >= due_count,
    )


# Kubernetes label values (and so HPA metric selectors): at most 63 characters, alphanumeric at both ends,
# `-`, `_` and `.` inside. https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/
LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
LABEL_VALUE_MAX = 63
# 40 bits: names that differ only in their invalid characters (`a:b`, `a/b`) are told apart by the hash
# alone; 100,000 such names collide with odds below 1 %.
_HASH_CHARS = 10
_INVALID_RUN = re.compile(r"[^-A-Za-z0-9_.]+")
_EDGE = "-_."


def label_safe(queue: str) -> str:
    """The queue name as a Kubernetes label value: unchanged when already valid, else sanitised + hash.

    A valid name (`default`, `scrape.high`) is returned as is. Any other is rewritten: each run of invalid
    characters becomes `-`, `-_.` are trimmed from both ends, the rest is cut to 52 characters (and trimmed
    again), and `-` plus the first 10 hex digits of the name's SHA-256 (UTF-8) is appended, so `arq:queue`
    and `arq/queue` stay apart: `arq:queue` → `arq-queue-1df91f41fe`. A name with nothing usable left (all
    non-ASCII) is the 10 hex digits alone. The chart computes the same value with sprig:
    `regexReplaceAll "[^-A-Za-z0-9_.]+" $q "-" | trimAll "-_." | trunc 52 | trimAll "-_."`, then
    `printf "%s-%s" $prefix (sha256sum $q | trunc 10)` (or the hash alone when the prefix is empty).
    """
    if len(queue) <= LABEL_VALUE_MAX and LABEL_VALUE.fullmatch(queue):
        return queue
    digest = hashlib.sha256(queue.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]
    prefix = _INVALID_RUN.sub("-", queue).strip(_EDGE)[: LABEL_VALUE_MAX - _HASH_CHARS - 1].strip(_EDGE)
    return f"{prefix}-{digest}" if prefix else digest
