"""What each page shows, computed from the objects the operator holds: pure functions, no I/O."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, cast
from urllib.parse import quote

from kubearq.operator.actions import CANCEL_ANNOTATION, TRIGGER_ANNOTATION, Ask, read_ask
from kubearq.operator.kube import KubeObject

MAX_ROWS = 500  # a page of schedules or scrapes; a namespace or a name search narrows the rest
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


def schedule_row(body: KubeObject) -> dict[str, Any]:
    """One SyncSchedule as the schedules page shows it (status as the leader last wrote it)."""
    metadata = body.get("metadata", {})
    spec = cast(dict[str, Any], body.get("spec") or {})
    status = cast(dict[str, Any], body.get("status") or {})
    runs = sorted(cast(list[dict[str, Any]], status.get("runs") or []),
                  key=lambda run: str(run.get("scheduledTime") or ""), reverse=True)
    ask = _ask(body, TRIGGER_ANNOTATION)
    return {
        "namespace": metadata.get("namespace", ""), "name": metadata.get("name", ""),
        "path": object_path("/schedules", body),
        "schedule": spec.get("schedule", ""), "time_zone": spec.get("timeZone", "UTC"),
        "suspended": bool(spec.get("suspend")), "function": (spec.get("job") or {}).get("function", ""),
        "last": status.get("lastScheduleTime"), "next": status.get("nextScheduleTime"),
        "active": status.get("activeCount", len(status.get("active") or [])),
        "skipped": status.get("skippedTicks", status.get("skipped", 0)) or 0,
        "missed": status.get("missedTicks", status.get("missed", 0)) or 0,
        "runs": [{"job_id": run.get("jobId", ""), "outcome": run.get("outcome", ""), "error": run.get("error"),
                  "trigger": run.get("trigger"), "scheduled": str(run.get("scheduledTime") or "")}
                 for run in runs[:5]],
        **_asked(ask),
    }


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
