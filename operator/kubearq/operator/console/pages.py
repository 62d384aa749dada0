"""What each page shows, computed from the objects the operator holds: pure functions, no I/O."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import quote

from kubearq.core.workers import WorkerBeat
from kubearq.operator.actions import CANCEL_ANNOTATION, TRIGGER_ANNOTATION, Ask, read_ask
from kubearq.operator.cron import check_schedule, fire_times
from kubearq.operator.kube import KubeObject
from kubearq.operator.scheduler import jitter_offset

MAX_ROWS = 500  # a page of schedules or scrapes; a namespace or a name search narrows the rest
PREVIEW_TICKS = 5
Key = tuple[str, str, str]  # (kind, namespace, name), as kubearq.operator.store keeps them


def listed(objects: Mapping[Key, KubeObject], kind: str, namespaces: set[str] | None, search: str = "",
           limit: int = MAX_ROWS) -> tuple[list[KubeObject], bool]:
    """The objects of `kind` in `namespaces` (None: all) whose name contains `search`, by namespace and name; and
    whether more matched than `limit`."""
    needle = search.strip().casefold()
    keys = sorted(key for key in objects if key[0] == kind and (namespaces is None or key[1] in namespaces)
                  and needle in key[2].casefold())
    return [objects[key] for key in keys[:limit]], len(keys) > limit


def namespaces_of(objects: Iterable[Key], kind: str) -> list[str]:
    return sorted({namespace for object_kind, namespace, _ in objects if object_kind == kind})


def object_path(prefix: str, body: KubeObject) -> str:
    metadata = body.get("metadata", {})
    return f"{prefix}/{quote(str(metadata.get('namespace')), safe='')}/{quote(str(metadata.get('name')), safe='')}"


def _ask(body: KubeObject, annotation: str) -> Ask | None:
    ask = read_ask(body.get("metadata", {}).get("annotations"), annotation)
    return ask if isinstance(ask, Ask) else None


def _asked(ask: Ask | None) -> dict[str, str | None]:
    """The last ask an annotation holds (a trigger or a cancel), as the page shows it."""
    if ask is None:
        return {"asked": None, "asked_at": ""}
    return {"asked": ask.id, "asked_at": ask.requested_at.replace(microsecond=0).isoformat()}


def utc_text(value: object) -> str:
    """A time the leader wrote (RFC 3339, in any offset) as one page shows them all: UTC to the second; "" for none,
    and as written if it is not a time."""
    if not value:
        return ""
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if moment.tzinfo is None:
        return str(value)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def fire_preview(schedule: str, time_zone: str, now: datetime, count: int = PREVIEW_TICKS) -> list[dict[str, str]]:
    """The next `count` ticks after `now`, by the cron code the leader fires them with (DST included): each in the
    schedule's time zone and in UTC, with a note where the UTC offset differs from the tick before (or from now's,
    for the first). ValueError for a schedule or time zone the leader would refuse, saying why."""
    check_schedule(schedule)
    return [{"local": tick.strftime("%Y-%m-%d %H:%M %Z"), "utc": tick.astimezone(UTC).isoformat(), "note": note}
            for tick, note in fire_times(schedule, time_zone, now, count)]


def schedule_row(body: KubeObject, now: datetime) -> dict[str, Any]:
    """One SyncSchedule as the schedules page shows it (status as the leader last wrote it; the preview from `now`)."""
    metadata = body.get("metadata", {})
    spec = cast(dict[str, Any], body.get("spec") or {})
    status = cast(dict[str, Any], body.get("status") or {})
    runs = sorted(cast(list[dict[str, Any]], status.get("runs") or []),
                  key=lambda run: utc_text(run.get("scheduledTime")), reverse=True)  # offsets differ: by UTC
    ask = _ask(body, TRIGGER_ANNOTATION)
    schedule, time_zone = str(spec.get("schedule", "")), str(spec.get("timeZone") or "UTC")
    try:
        preview, preview_error = fire_preview(schedule, time_zone, now), ""
    except ValueError as error:
        preview, preview_error = [], str(error)
    jitter = int(spec.get("jitterSeconds") or 0)
    last_trigger = cast(dict[str, Any], status.get("lastTrigger") or {})
    return {
        "namespace": metadata.get("namespace", ""), "name": metadata.get("name", ""),
        "path": object_path("/schedules", body),
        "schedule": schedule, "time_zone": time_zone, "preview": preview, "preview_error": preview_error,
        "jitter": jitter_offset(str(metadata.get("uid", "")), jitter) if jitter else 0, "jitter_max": jitter,
        "last_trigger": {"id": str(last_trigger.get("id", "")), "outcome": str(last_trigger.get("outcome", "")),
                         "message": str(last_trigger.get("message", "")),
                         "job_id": str(last_trigger.get("jobId") or "")} if last_trigger else None,
        "suspended": bool(spec.get("suspend")), "function": (spec.get("job") or {}).get("function", ""),
        "last": utc_text(status.get("lastScheduleTime")), "next": utc_text(status.get("nextScheduleTime")),
        "active": status.get("activeCount", len(status.get("active") or [])),
        "skipped": status.get("skippedTicks", status.get("skipped", 0)) or 0,
        "missed": status.get("missedTicks", status.get("missed", 0)) or 0,
        "runs": [{"job_id": run.get("jobId", ""), "outcome": run.get("outcome", ""), "error": run.get("error"),
                  "trigger": run.get("trigger"), "scheduled": utc_text(run.get("scheduledTime"))}
                 for run in runs[:5]],
        **_asked(ask),
    }


def worker_row(beat: WorkerBeat, now: float) -> dict[str, Any]:
    """One worker as the workers page shows it: gone once its heartbeat is a few intervals old."""
    gone = beat.gone(now)
    return {
        "id": beat.worker_id, "identity": beat.identity, "instance": beat.instance, "queue": beat.queue,
        "functions": sorted(beat.functions), "in_flight": beat.in_flight, "max_jobs": beat.max_jobs,
        "running": list(beat.running), "interval": beat.interval, "finished": beat.finished,
        "per_minute": f"{beat.per_minute:.0f}" if not gone else "-",
        "state": "gone" if gone else "draining" if beat.draining else "serving",
        "heartbeat": datetime.fromtimestamp(beat.beat_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "heard": f"{duration(beat.age(now))} ago", "up": duration(max(0.0, beat.beat_at - beat.started_at)),
    }


def live_workers_by_queue(beats: Iterable[WorkerBeat], now: float) -> dict[str, int]:
    """Per queue, the workers not gone."""
    counts: dict[str, int] = {}
    for beat in beats:
        if not beat.gone(now):
            counts[beat.queue] = counts.get(beat.queue, 0) + 1
    return counts


def throughput_by_queue(beats: Iterable[WorkerBeat], now: float) -> dict[str, float]:
    """Per queue, the jobs its workers not gone finished a minute, over each one's last heartbeat interval."""
    rates: dict[str, float] = {}
    for beat in beats:
        if not beat.gone(now):
            rates[beat.queue] = rates.get(beat.queue, 0.0) + beat.per_minute
    return rates


def duration(seconds: float) -> str:
    """`42 s`, `5 min`, `3 h 20 min`, `2 d 4 h`: how long a worker has been up, or since its heartbeat."""
    whole = int(seconds)
    if whole < 120:
        return f"{whole} s"
    minutes, hours, days = whole // 60, whole // 3600, whole // 86_400
    if hours < 2:
        return f"{minutes} min"
    if days < 2:
        return f"{hours} h {minutes % 60} min"
    return f"{days} d {hours % 24} h"


def scrape_row(body: KubeObject) -> dict[str, Any]:
    """One ScrapeRequest as the scrapes page shows it."""
    metadata = body.get("metadata", {})
    status = cast(dict[str, Any], body.get("status") or {})
    listing = cast(dict[str, int], status.get("listingPages") or {})
    detail = cast(dict[str, int], status.get("detailPages") or {})
    total = int(listing.get("total", 0)) + int(detail.get("total", 0))
    finished = sum(int(pages.get(state, 0)) for pages in (listing, detail) for state in ("done", "failed"))
    phase = str(status.get("phase") or "Pending")
    ask = _ask(body, CANCEL_ANNOTATION)
    return {
        "namespace": metadata.get("namespace", ""), "name": metadata.get("name", ""),
        "path": object_path("/scrapes", body), "phase": phase, "listing": listing, "detail": detail,
        "total": total, "finished": finished,
        "finished_all": phase in ("Succeeded", "PartiallySucceeded", "Failed", "Cancelled"),
        "started": status.get("startTime"), "completed": status.get("completionTime"),
        "failed_urls": status.get("failedUrls") or [],
        **_asked(ask),
    }


_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_ASK_ID = re.compile(r"[0-9T]{15}-[0-9a-f]{8}")


def notice(query: Mapping[str, str]) -> str | None:
    """The result of the action that redirected here (its query), in our words: from the URL only names, ids and
    numbers that look like what we put there (a crafted link cannot make the page say something else)."""
    done = query.get("done")
    names = [query.get(part, "") for part in ("ns", "name")]
    if done in ("trigger", "suspend", "resume", "cancel") and not all(_NAME.fullmatch(name) for name in names):
        return None
    if done in ("trigger", "cancel") and not _ASK_ID.fullmatch(query.get("ask", "")):
        return None
    what = "/".join(names)
    if done == "trigger":
        return f"Asked to trigger {what} now (request {query.get('ask', '')}); the leader enqueues it."
    if done in ("suspend", "resume"):
        return f"{what} {'suspended' if done == 'suspend' else 'resumed'}."
    if done == "cancel":
        return f"Asked to cancel {what} (request {query.get('ask', '')}); the leader stops it."
    if done == "redrive":
        return (f"Re-drove {_number(query.get('redriven'))} failed jobs ({_number(query.get('enqueued'))} enqueued "
                f"now, {_number(query.get('not_runnable'))} not runnable).")
    if done == "discard":
        return f"Discarded {_number(query.get('discarded'))} failed jobs."
    return None


def _number(text: str | None) -> int:
    return int(text) if text and text.isdigit() else 0
