"""Reading the running system the way its user would: the resources' status and the Lease from the Kubernetes
API, the operators' and workers' /metrics, the operators' logs, the workers' ledger in Redis, PostgreSQL."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from kubearq.demo.jobs import LEDGER_KEY
from kubearq.demo.state import QueueView

ENQUEUED_LINE = re.compile(r"enqueued (?P<job>kubearq:tick:\S+) for the tick of")
REFUSED_LINE = re.compile(r"tick \S+ already enqueued \((?P<job>kubearq:tick:\S+)\): refused as a duplicate")
METRICS_TIMEOUT = 2.0


@dataclass
class LogFollower:
    """Reads what an operator's log gained since the last look: which tick jobs it enqueued (or had refused)."""

    path: Path
    offset: int = 0
    enqueued: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    _partial: str = ""

    def read(self) -> None:
        try:
            with self.path.open("rb") as log:
                log.seek(self.offset)
                chunk = log.read()
        except FileNotFoundError:
            return
        self.offset += len(chunk)
        text = self._partial + chunk.decode(errors="replace")
        lines = text.split("\n")
        self._partial = lines.pop()
        for line in lines:
            if (found := ENQUEUED_LINE.search(line)) is not None:
                self.enqueued.append(found["job"])
            elif (found := REFUSED_LINE.search(line)) is not None:
                self.refused.append(found["job"])


@dataclass(frozen=True)
class LedgerEntry:
    job_id: str
    worker: str
    events: int


async def read_ledger(redis: Redis) -> list[LedgerEntry]:
    """Every run of the demo's digest job, in the order they ran."""
    raw = cast(list[bytes], await redis.lrange(LEDGER_KEY, 0, -1))  # type: ignore[misc]
    entries = []
    for item in raw:
        entry = json.loads(item)
        entries.append(LedgerEntry(str(entry["job_id"]), str(entry["worker"]), int(entry["events"])))
    return entries


async def scrape_metrics(client: httpx.AsyncClient, url: str) -> dict[str, list[tuple[dict[str, str], float]]] | None:
    """A /metrics page as {sample name: [(labels, value)]}; None when it does not answer."""
    try:
        response = await client.get(url, timeout=METRICS_TIMEOUT)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def queue_view(samples: dict[str, list[tuple[dict[str, str], float]]], queue: str) -> QueueView:
    def gauge(name: str) -> int | None:
        values = [value for labels, value in samples.get(name, []) if labels.get("queue") == queue]
        return int(values[0]) if values else None

    return QueueView(queue, gauge("kubearq_queue_ready_jobs"), gauge("kubearq_queue_running_jobs"),
                     gauge("kubearq_queue_deferred_jobs"))


def counter_by_function(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> Counter[str]:
    totals: Counter[str] = Counter()
    for labels, value in samples.get(name, []):
        totals[labels.get("function", "")] += int(value)
    return totals


@dataclass(frozen=True)
class StoredResults:
    """What PostgreSQL holds for the ScrapeRequest."""

    items_by_type: Counter[str]
    failures: list[tuple[str, str, str, int]]
    """(url, page kind, error, tries), in the order they failed."""

    @property
    def items(self) -> int:
        return sum(self.items_by_type.values())


async def read_results(dsn: str, namespace: str, request: str) -> StoredResults:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await connection.fetch(
            "SELECT data->'@type' AS type FROM scrape_items WHERE namespace = $1 AND request_name = $2",
            namespace, request)
        failures = await connection.fetch(
            "SELECT url, page_kind, error, tries FROM scrape_failures WHERE namespace = $1 AND request_name = $2 "
            "ORDER BY failed_at, url", namespace, request)
    finally:
        await connection.close()
    return StoredResults(Counter(_type_name(row["type"]) for row in rows),
                         [(row["url"], row["page_kind"], row["error"], row["tries"]) for row in failures])


def _type_name(raw: str | None) -> str:
    """An item's type; of an `@type` list, the first (the most specific, as sites list them)."""
    value = json.loads(raw) if raw else "?"
    names: list[object] = value if isinstance(value, list) else [value]
    return str(names[0]) if names else "?"
