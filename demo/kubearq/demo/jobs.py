"""The demo's own job, served beside the built-in ones (`kubearq worker --settings kubearq.demo.jobs:WorkerSettings`):
the function the demo's minute SyncSchedule enqueues.

Each run counts the events stored so far and appends one line to a ledger in Redis, so the demo can show that
every tick ran exactly once, and on which worker.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import asyncpg

DIGEST_FUNCTION = "digest_events"
LEDGER_KEY = "kubearq-demo:digests"
"""A Redis list: one JSON object per run of `digest_events` (job id, worker, events counted, when)."""


async def digest_events(ctx: dict[str, Any], namespace: str, request: str) -> dict[str, object]:
    """Count the events scraped so far for the ScrapeRequest `namespace/request` (a stand-in for a digest mail)."""
    connection = await asyncpg.connect(os.environ["DATABASE_URL"], timeout=10)
    try:
        events = int(await connection.fetchval(
            "SELECT count(*) FROM scrape_items WHERE namespace = $1 AND request_name = $2", namespace, request))
    finally:
        await connection.close()
    worker = os.environ.get("POD_NAME", "worker")
    entry = {"job_id": ctx["job_id"], "worker": worker, "events": events, "try": ctx["job_try"], "at": time.time()}
    await ctx["redis"].rpush(LEDGER_KEY, json.dumps(entry))
    return {"events": events, "worker": worker}


class WorkerSettings:
    """The demo's functions, as `arq` reads a WorkerSettings."""

    functions = [digest_events]
