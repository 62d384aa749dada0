"""The ScrapeRequest reconciler's decisions, pure: what to enqueue, what the progress counters mean, what
the status and its conditions say, whether to write it now. `scrapes.py` reads, calls these, and writes."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import cast

from pydantic import ValidationError

from kubearq.core.contract import (
    DEFAULT_QUEUE,
    DELETE_SCRAPE_RESULTS,
    MAX_URL_LENGTH,
    PROGRESS_FIELDS,
    SCRAPE_LISTING,
    Origin,
    RequestRef,
    ResultsDeletion,
    ScrapeSettings,
    check_http_url,
    job_id_for_page,
)
from kubearq.core.queueing import (
    NewJob,
)
from kubearq.operator.actions import CANCEL_ANNOTATION, ActionOutcome, CancelRecord, ask_id_of, read_ask
from kubearq.operator.conditions import Condition, ConditionStatus, set_condition
from kubearq.operator.kube import Resource
from kubearq.operator.scraperequest import (
    MAX_FAILED_URLS_SHOWN,
    DeletionPolicy,
    FailedUrl,
    PageCounts,
    Phase,
    ScrapeRequestSpec,
    ScrapeRequestStatus,
)
from kubearq.operator.tenancy import NOT_PERMITTED, Verdict

KIND = "ScrapeRequest"
SUCCEEDED = "Succeeded"  # the condition type that is the truth (style.md); `phase` is derived from it
READY = "Ready"  # False (NotPermitted) while no QueuePolicy permits the request
CONFIG_MAPS = Resource("", "v1", "configmaps")
URLS_RETRY_SECONDS = 30.0  # a missing ConfigMap is looked for again this often
CLEANUP_POLL_SECONDS = 2.0  # while aborted jobs stop, or the results deletion job runs
DELETION_RETRY_SECONDS = 60.0  # after the results deletion job failed
REDIS_RETRY_SECONDS = 5.0
CANCEL_SWEEP_SECONDS = 60.0
"""After a cancellation, jobs that were running (and may still enqueue detail pages before they stop) are swept
off the queue for this long."""
URL_ERRORS_SHOWN = 3
URLS_FROM = "spec.urlsFrom.configMapKeyRef"


class Reason(StrEnum):
    """Reasons of the `Succeeded` condition."""

    SCRAPING = "Scraping"
    URLS_UNAVAILABLE = "UrlsUnavailable"
    INVALID_SPEC = "InvalidSpec"
    ALL_PAGES_SCRAPED = "AllPagesScraped"
    SOME_PAGES_FAILED = "SomePagesFailed"
    ALL_PAGES_FAILED = "AllPagesFailed"
    NOT_PERMITTED = NOT_PERMITTED  # waiting for a QueuePolicy; Ready says what is missing
    CANCELLED = "Cancelled"  # stopped by a `kubearq.dev/cancel` ask


class Outcome(StrEnum):
    """What one reconciliation did."""

    STARTED = "Started"  # listing pages enqueued
    RUNNING = "Running"  # progress folded into status (or paced)
    COMPLETED = "Completed"  # every page finished; nothing more to do
    INVALID_SPEC = "InvalidSpec"
    URLS_UNAVAILABLE = "UrlsUnavailable"
    NOT_PERMITTED = "NotPermitted"  # no QueuePolicy permits it: nothing enqueued
    CLEANING_UP = "CleaningUp"  # being deleted; the finalizer stays until its jobs stopped (and results went)
    FINALIZED = "Finalized"  # our finalizer removed
    IGNORED = "Ignored"  # being deleted without our finalizer: nothing of ours to clean
    CONFLICT = "Conflict"  # a write met a newer object: a call soon, with it, carries on
    GONE = "Gone"  # the object no longer exists
    REDIS_UNAVAILABLE = "RedisUnavailable"
    CANCELLED = "Cancelled"  # stopped on request: its queued jobs removed, its running ones aborted


@dataclass(frozen=True)
class ReconcileResult:
    outcome: Outcome
    wake_at: datetime | None = None
    """When to reconcile again even without a change (Redis changes are not watched); None: on a change only."""
    status_written: bool = False


@dataclass
class StatusPacer:
    """When each ScrapeRequest's status was last written (by uid): progress is coalesced to one patch per interval.

    In memory on purpose: a new leader starts empty, which costs at most one early patch per resource.
    """

    last_written: dict[str, datetime] = field(default_factory=dict)

    def seconds_since_write(self, uid: str, now: datetime) -> float | None:
        last = self.last_written.get(uid)
        return None if last is None else (now - last).total_seconds()

    def written(self, uid: str, now: datetime) -> None:
        self.last_written[uid] = now

    def forget(self, uid: str) -> None:
        self.last_written.pop(uid, None)


@dataclass(frozen=True)
class ScrapeObject:
    """The metadata of a ScrapeRequest that the reconciler acts on."""

    namespace: str
    name: str
    uid: str
    generation: int
    resource_version: str
    finalizers: tuple[str, ...]
    deleting: bool

    @classmethod
    def from_body(cls, body: Mapping[str, object]) -> ScrapeObject:
        metadata = cast(Mapping[str, object], body.get("metadata") or {})
        finalizers = metadata.get("finalizers") or []
        generation = metadata.get("generation")
        return cls(
            namespace=str(metadata.get("namespace") or ""), name=str(metadata.get("name") or ""),
            uid=str(metadata.get("uid") or ""), generation=generation if isinstance(generation, int) else 1,
            resource_version=str(metadata.get("resourceVersion") or ""),
            finalizers=tuple(str(f) for f in cast(list[object], finalizers)),
            deleting=bool(metadata.get("deletionTimestamp")),
        )

    @property
    def request(self) -> RequestRef:
        return RequestRef(uid=self.uid, namespace=self.namespace, name=self.name)


@dataclass(frozen=True)
class Progress:
    """What the workers counted in Redis for one request."""

    listing: PageCounts = field(default_factory=PageCounts)
    detail: PageCounts = field(default_factory=PageCounts)
    failed_urls: tuple[FailedUrl, ...] = ()
    listing_enqueued: bool = False  # the listing total exists: the listing pages were enqueued

    @property
    def finished(self) -> int:
        return self.listing.done + self.listing.failed + self.detail.done + self.detail.failed

    @property
    def total(self) -> int:
        return self.listing.total + self.detail.total


class UrlsUnavailableError(ValueError):
    """The listing-page URLs cannot be had (yet): the message says why, naming the field."""


# --- Decisions (pure) ---------------------------------------------------------------------------------


def parse_url_list(text: str, where: str) -> list[str]:
    """URLs one per line, blank lines and `#` comments ignored, duplicates dropped, each checked."""
    urls: list[str] = []
    seen: set[str] = set()
    errors: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        url = line.strip()
        if not url or url.startswith("#"):
            continue
        try:
            if len(url) > MAX_URL_LENGTH:
                raise ValueError(f"{url[:60]!r}... is longer than {MAX_URL_LENGTH} characters")
            check_http_url(url)
        except ValueError as error:
            errors.append(f"line {number}: {error}")
            continue
        if url not in seen:
            seen.add(url)
            urls.append(url)
    if errors:
        shown = "; ".join(errors[:URL_ERRORS_SHOWN])
        more = f"; and {len(errors) - URL_ERRORS_SHOWN} more" if len(errors) > URL_ERRORS_SHOWN else ""
        raise UrlsUnavailableError(f"{where} has {len(errors)} invalid URL(s): {shown}{more}")
    if not urls:
        raise UrlsUnavailableError(f"{where} lists no URLs (one per line; blank lines and # comments are ignored)")
    return urls


def build_scrape_settings(spec: ScrapeRequestSpec) -> ScrapeSettings:
    """The part of the spec every page job carries (the spec is ScrapeSettings plus where URLs come from)."""
    return ScrapeSettings.model_validate({name: getattr(spec, name) for name in ScrapeSettings.model_fields})


def request_origin(request: RequestRef) -> Origin:
    """What a ScrapeRequest's jobs carry as their origin (the worker pool may check it)."""
    return Origin(namespace=request.namespace, kind=KIND, name=request.name)


def build_listing_jobs(request: RequestRef, urls: Sequence[str], settings: ScrapeSettings) -> list[NewJob]:
    """One `scrape_listing` job per (already validated) URL, with the deterministic id that makes a second
    enqueue a no-op. Each `page` is what `PageJob(...).model_dump(mode="json", by_alias=True)` gives, with the
    request and settings dumped once and shared: per-job model dumps were 40% of starting 10,000 pages."""
    request_json = request.model_dump(mode="json", by_alias=True)
    settings_json = settings.model_dump(mode="json", by_alias=True)
    origin = request_origin(request)
    return [
        NewJob(job_id_for_page(request.uid, url), SCRAPE_LISTING,
               {"page": {"request": request_json, "url": url, "settings": settings_json}}, origin=origin)
        for url in urls
    ]


def build_deletion_job(request: RequestRef) -> NewJob:
    """The `delete_scrape_results` job of a request; one id per request, so it is enqueued once at a time."""
    deletion = ResultsDeletion(request=request).model_dump(mode="json", by_alias=True)
    return NewJob(f"kubearq:delete-results:{request.uid}", DELETE_SCRAPE_RESULTS, {"deletion": deletion},
                  origin=request_origin(request))


def parse_failed_url(raw: bytes | str) -> FailedUrl | None:
    """A failure the workers pushed (`{"url", "error", "tries"}`); None when it cannot be read."""
    try:
        entry = json.loads(raw)
        if not isinstance(entry, dict):
            return None
        tries = entry.get("tries", 0)
        return FailedUrl(url=str(entry["url"])[:MAX_URL_LENGTH], error=str(entry.get("error", ""))[:1024],
                         tries=tries if isinstance(tries, int) and tries >= 0 else 0)
    except (ValueError, KeyError, ValidationError):
        return None


def build_progress(counters: Sequence[bytes | str | None], failed_urls: Sequence[FailedUrl]) -> Progress:
    """Progress from the values of PROGRESS_FIELDS (in order) and the failures read."""
    values = dict(zip(PROGRESS_FIELDS, counters, strict=True))

    def count(name: str) -> int:
        value = values.get(name)
        return max(0, int(value)) if value is not None else 0

    def counts(kind: str) -> PageCounts:
        return PageCounts(total=count(f"{kind}_total"), done=count(f"{kind}_done"),
                          failed=count(f"{kind}_failed"), deferred=count(f"{kind}_deferred"))

    return Progress(listing=counts("listing"), detail=counts("detail"),
                    failed_urls=tuple(failed_urls[:MAX_FAILED_URLS_SHOWN]),
                    listing_enqueued=values.get("listing_total") is not None)


def decide_start(previous: ScrapeRequestStatus, progress: Progress) -> bool:
    """Enqueue (again) unless both the status and Redis say the listing pages were enqueued.

    The status's startTime is written only after every chunk went in, so a leader that died mid-enqueue
    leaves no startTime and the next one enqueues again (what went in before is refused as a duplicate);
    a Redis that lost the request's keys gets the listing pages again too.
    """
    return previous.start_time is None or not progress.listing_enqueued


def decide_completion(progress: Progress) -> tuple[ConditionStatus, Reason, str] | None:
    """The final `Succeeded` condition once every known page finished, else None.

    Workers count a listing page's detail pages (the detail total) before counting the listing page done,
    so a finished listing never leaves detail pages uncounted.
    """
    listing, detail = progress.listing, progress.detail
    if listing.total == 0 or listing.done + listing.failed < listing.total:
        return None
    if detail.done + detail.failed < detail.total:
        return None
    done, failed, total = listing.done + detail.done, listing.failed + detail.failed, progress.total
    pages = f"{listing.total} listing and {detail.total} detail pages"
    if failed == 0:
        return ConditionStatus.TRUE, Reason.ALL_PAGES_SCRAPED, f"all {pages} scraped"
    if done == 0:
        return ConditionStatus.FALSE, Reason.ALL_PAGES_FAILED, f"all {pages} failed; see status.failedUrls"
    return (ConditionStatus.FALSE, Reason.SOME_PAGES_FAILED,
            f"{failed} of {total} pages failed ({pages}); see status.failedUrls")


def decide_phase(condition: Condition | None) -> Phase:
    """The phase shown, derived from the `Succeeded` condition."""
    if condition is None:
        return Phase.PENDING
    if condition.status == ConditionStatus.TRUE:
        return Phase.SUCCEEDED
    if condition.status == ConditionStatus.UNKNOWN:
        return Phase.RUNNING if condition.reason == Reason.SCRAPING else Phase.PENDING
    if condition.reason == Reason.SOME_PAGES_FAILED:
        return Phase.PARTIALLY_SUCCEEDED
    if condition.reason == Reason.CANCELLED:
        return Phase.CANCELLED
    if condition.reason == Reason.URLS_UNAVAILABLE:
        return Phase.PENDING  # tried again: the ConfigMap may appear
    return Phase.FAILED


def succeeded_condition(status: ConditionStatus, reason: Reason, message: str, generation: int,
                        now: datetime) -> Condition:
    return Condition(type=SUCCEEDED, status=status, reason=reason, message=message, last_transition_time=now,
                     observed_generation=generation)


def with_condition(previous: ScrapeRequestStatus, condition: Condition, generation: int,
                    **changes: object) -> ScrapeRequestStatus:
    conditions = set_condition(previous.conditions, condition)
    return previous.model_copy(update={"observed_generation": generation, "conditions": conditions,
                                       "phase": decide_phase(condition), **changes})


def permission_condition(verdict: Verdict, previous: ScrapeRequestStatus, generation: int,
                         now: datetime) -> Condition | None:
    """`Ready`: False while no QueuePolicy permits the request; True once one does after it was refused; None
    (no such condition) for a request that was never refused."""
    if not verdict.allowed:
        return Condition(type=READY, status=ConditionStatus.FALSE, reason=NOT_PERMITTED, message=verdict.message,
                         last_transition_time=now, observed_generation=generation)
    if any(c.type == READY and c.status == ConditionStatus.FALSE for c in previous.conditions):
        return Condition(type=READY, status=ConditionStatus.TRUE, reason="Permitted",
                         message="a QueuePolicy permits this request now", last_transition_time=now,
                         observed_generation=generation)
    return None


def with_permission(status: ScrapeRequestStatus, condition: Condition | None) -> ScrapeRequestStatus:
    if condition is None:
        return status
    return status.model_copy(update={"conditions": set_condition(status.conditions, condition)})


def build_problem_status(previous: ScrapeRequestStatus, reason: Reason, message: str, generation: int,
                         now: datetime) -> ScrapeRequestStatus:
    """The status of a request that cannot run: an invalid spec, or URLs that cannot be read."""
    return with_condition(previous, succeeded_condition(ConditionStatus.FALSE, reason, message, generation, now),
                           generation)


def build_status(previous: ScrapeRequestStatus, progress: Progress, *, queue: str, generation: int,
                 now: datetime) -> ScrapeRequestStatus:
    """The status the progress in Redis calls for: counts, failures, and the condition (final once complete)."""
    completion = decide_completion(progress)
    if completion is None:
        condition = succeeded_condition(
            ConditionStatus.UNKNOWN, Reason.SCRAPING,
            f"{progress.listing.total} listing pages enqueued on queue {queue}", generation, now)
    else:
        condition = succeeded_condition(*completion, generation, now)
    return with_condition(
        previous, condition, generation,
        listing_pages=progress.listing, detail_pages=progress.detail,
        progress=f"{progress.finished}/{progress.total}",
        failed_pages=progress.listing.failed + progress.detail.failed,
        failed_urls=list(progress.failed_urls),
        start_time=previous.start_time or now,
        completion_time=previous.completion_time or (now if completion is not None else None),
    )


def decide_status_write(previous: ScrapeRequestStatus, desired: ScrapeRequestStatus, *,
                        seconds_since_write: float | None, interval: float) -> float | None:
    """None: nothing changed; 0: write now; otherwise the seconds to wait first.

    Counts alone are paced to one write per interval; a new condition, phase, start or completion
    (what `kubectl wait` and the printer columns react to) is written at once.
    """
    if desired == previous:
        return None
    shown = ("observed_generation", "conditions", "phase", "start_time", "completion_time")
    if any(getattr(desired, name) != getattr(previous, name) for name in shown) or seconds_since_write is None:
        return 0.0
    return max(0.0, interval - seconds_since_write)


def decide_deletion(spec: object) -> tuple[str, DeletionPolicy]:
    """The queue and deletion policy of a request being deleted (read leniently: its spec may be invalid)."""
    raw = cast(Mapping[str, object], spec) if isinstance(spec, Mapping) else {}
    queue = raw.get("queue")
    policy = DeletionPolicy.DELETE if raw.get("deletionPolicy") == DeletionPolicy.DELETE else DeletionPolicy.RETAIN
    return (queue if isinstance(queue, str) and queue else DEFAULT_QUEUE), policy




def pending_cancel(annotations: Mapping[str, str] | None, previous: ScrapeRequestStatus) -> str | None:
    """The id of a cancel ask the status does not record as handled yet, else None."""
    ask_id = ask_id_of(annotations, CANCEL_ANNOTATION)
    if ask_id is None or (previous.last_cancel is not None and previous.last_cancel.id == ask_id):
        return None
    return ask_id


def cancel_requested_by(annotations: Mapping[str, str] | None) -> str | None:
    ask = read_ask(annotations, CANCEL_ANNOTATION)
    return ask.requested_by if ask is not None and not isinstance(ask, str) else None


def decide_cancel_refusal(annotations: Mapping[str, str] | None, previous: ScrapeRequestStatus) -> str | None:
    """Why a cancel ask is refused (unreadable, or the request already finished), or None to carry it out."""
    ask = read_ask(annotations, CANCEL_ANNOTATION)
    if isinstance(ask, str):
        return ask
    if previous.completion_time is not None:
        return f"not cancelled: the request already finished (phase {previous.phase}); nothing to stop"
    return None


def build_cancel_refusal(previous: ScrapeRequestStatus, ask_id: str, message: str, requested_by: str | None,
                         now: datetime) -> ScrapeRequestStatus:
    record = CancelRecord(id=ask_id, outcome=ActionOutcome.REFUSED, message=message[:1024], handled_time=now,
                          requested_by=requested_by)
    return previous.model_copy(update={"last_cancel": record})


def build_cancelled_status(previous: ScrapeRequestStatus, progress: Progress, *, ask_id: str,
                           requested_by: str | None, removed: int, aborted: int, generation: int,
                           now: datetime) -> ScrapeRequestStatus:
    """Cancelled: the counts as the workers left them, `Succeeded` False with reason Cancelled, finished now."""
    message = (f"cancelled (ask {ask_id}): {removed} queued job(s) removed, {aborted} running job(s) aborted; "
               "the results stored so far are kept")
    record = CancelRecord(id=ask_id, outcome=ActionOutcome.DONE, message=message, handled_time=now,
                          requested_by=requested_by, removed=removed, aborted=aborted)
    condition = succeeded_condition(ConditionStatus.FALSE, Reason.CANCELLED, message, generation, now)
    changes: dict[str, object] = {"last_cancel": record, "completion_time": now}
    if progress.listing_enqueued:
        changes |= {"listing_pages": progress.listing, "detail_pages": progress.detail,
                    "progress": f"{progress.finished}/{progress.total}",
                    "failed_pages": progress.listing.failed + progress.detail.failed,
                    "failed_urls": list(progress.failed_urls)}
    return with_condition(previous, condition, generation, **changes)


def decide_cancel_sweep(previous: ScrapeRequestStatus, now: datetime) -> bool:
    """Whether a cancelled request's jobs are to be swept off the queue again (see CANCEL_SWEEP_SECONDS)."""
    record = previous.last_cancel
    return (previous.phase == Phase.CANCELLED and record is not None and record.outcome == ActionOutcome.DONE
            and record.aborted > 0 and (now - record.handled_time).total_seconds() < CANCEL_SWEEP_SECONDS)
