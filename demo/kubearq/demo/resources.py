"""The demo's resources: `manifests/examples/` adapted to the local website, the local ad platform and a minute's
schedule."""

from __future__ import annotations

from collections.abc import Sequence

from kubearq.core.contract import COMPACT_SNAPSHOTS, SYNC_CONNECTIONS
from kubearq.demo.jobs import DIGEST_FUNCTION

API_VERSION = "kubearq.dev/v1alpha1"
SCRAPE_NAME = "city-events"
SCHEDULE_NAME = "events-digest"
REALTIME_SYNC_NAME = "sync-realtime"
COMPACTION_NAME = "compact-snapshots"
SYNC_SCHEDULE_NAMES = (REALTIME_SYNC_NAME, COMPACTION_NAME)
STARTING_DEADLINE_SECONDS = 30
"""A tick missed by up to this long (the failover gap) is still enqueued, late, by the new leader."""


def scrape_request(urls: Sequence[str], requests_per_minute: int) -> dict[str, object]:
    """`manifests/examples/scraperequest-events.yaml` on the local site: its listing pages, a rate limit sized to
    the demo's timeline, a shorter backoff, and private networks allowed (the site is on loopback)."""
    return {
        "apiVersion": API_VERSION, "kind": "ScrapeRequest", "metadata": {"name": SCRAPE_NAME},
        "spec": {
            "urls": list(urls),
            "links": {"selector": "a.event-card", "pattern": "/events/[0-9]+", "maxDetailPages": 500},
            "extract": {"jsonLd": {"types": ["Event"]}},
            "rateLimit": {"requestsPerMinute": requests_per_minute, "burst": 5},
            "retry": {"maxTries": 4, "backoffSeconds": 2},
            "fetch": {"allowPrivateNetworks": True},
        },
    }


def sync_schedule(namespace: str) -> dict[str, object]:
    """`manifests/examples/syncschedule-realtime.yaml` firing every minute (cron's finest step), without jitter,
    enqueueing the demo's digest of the scraped events instead of the ad-platform sync."""
    return {
        "apiVersion": API_VERSION, "kind": "SyncSchedule", "metadata": {"name": SCHEDULE_NAME},
        "spec": {
            "schedule": "* * * * *",
            "timeZone": "UTC",
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": STARTING_DEADLINE_SECONDS,
            "successfulRunsHistoryLimit": 10,
            "job": {"function": DIGEST_FUNCTION, "kwargs": {"namespace": namespace, "request": SCRAPE_NAME},
                    "timeoutSeconds": 30},
        },
    }


def realtime_sync_schedule() -> dict[str, object]:
    """`manifests/examples/syncschedule-realtime.yaml` firing every minute instead of every 15, without jitter, and
    with the digest's startingDeadlineSeconds: the failover's tick of the sync is caught up too."""
    return {
        "apiVersion": API_VERSION, "kind": "SyncSchedule", "metadata": {"name": REALTIME_SYNC_NAME},
        "spec": {
            "schedule": "* * * * *",
            "timeZone": "UTC",
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": STARTING_DEADLINE_SECONDS,
            "job": {"function": SYNC_CONNECTIONS, "kwargs": {"mode": "realtime"}, "timeoutSeconds": 600},
        },
    }


def compaction_schedule() -> dict[str, object]:
    """`manifests/examples/syncschedule-compaction.yaml` firing every minute instead of daily: the 15-minute
    snapshots the connections' backfills stored, older than a day, become hourly ones."""
    return {
        "apiVersion": API_VERSION, "kind": "SyncSchedule", "metadata": {"name": COMPACTION_NAME},
        "spec": {
            "schedule": "* * * * *",
            "timeZone": "UTC",
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": STARTING_DEADLINE_SECONDS,
            "job": {"function": COMPACT_SNAPSHOTS, "kwargs": {"older_than_hours": 24}, "timeoutSeconds": 1800,
                    "keepResultSeconds": 86400},
        },
    }
