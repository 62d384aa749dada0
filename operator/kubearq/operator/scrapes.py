"""The leader's ScrapeRequest reconciler: from the object and Redis to enqueued listing pages and a status.

Level-triggered and idempotent (design.md "Leadership and kopf"): all it needs is in the object and in
Redis — the workers' progress counters, the first failures, the set of the request's job ids — so it may
run again for the same state at any time, on any leader. Job ids are deterministic and remembered (a second
enqueue is refused), and the status is computed from Redis, never counted here. The decisions are pure
`build_*`/`decide_*` functions; `reconcile_scrape_request` only reads, calls them, and writes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import cast

from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kubearq.core.contract import (
    FAILURES_SHOWN,
    PROGRESS_FIELDS,
    deferred_key,
    failures_key,
    finished_key,
    progress_key,
    request_jobs_key,
)
from kubearq.core.observability import log_context
from kubearq.core.queueing import (
    CHUNK,
    JobState,
    Tally,
    abort_jobs,
    enqueue_many,
    job_outcomes,
    remove_queued,
)
from kubearq.operator.conditions import ConditionStatus
from kubearq.operator.context import API_TIMEOUT, FINALIZER, SCRAPE_REQUESTS, OperatorContext
from kubearq.operator.kube import ApiError, ConflictError, KubeObject, NotFoundError, asks_to_slow_down
from kubearq.operator.resources import describe_validation_error
from kubearq.operator.scrapedecisions import (
    CLEANUP_POLL_SECONDS,
    CONFIG_MAPS,
    DELETION_RETRY_SECONDS,
    KIND,
    REDIS_RETRY_SECONDS,
    SUCCEEDED,
    URLS_FROM,
    URLS_RETRY_SECONDS,
    Outcome,
    Progress,
    Reason,
    ReconcileResult,
    ScrapeObject,
    StatusPacer,
    UrlsUnavailableError,
    build_cancel_refusal,
    build_cancelled_status,
    build_deletion_job,
    build_listing_jobs,
    build_problem_status,
    build_progress,
    build_scrape_settings,
    build_status,
    cancel_requested_by,
    decide_cancel_refusal,
    decide_cancel_sweep,
    decide_deletion,
    decide_start,
    decide_status_write,
    parse_failed_url,
    parse_url_list,
    pending_cancel,
    permission_condition,
    succeeded_condition,
    with_condition,
    with_permission,
)
from kubearq.operator.scraperequest import (
    MAX_FAILED_URLS_SHOWN,
    SCRAPE_REQUEST,
    DeletionPolicy,
    ScrapeRequestSpec,
    ScrapeRequestStatus,
)
from kubearq.operator.validation import InvalidSpecError, parse_spec

logger = logging.getLogger(__name__)

# --- Side effects (thin) ------------------------------------------------------------------------------


async def reconcile_scrape_request(ctx: OperatorContext, body: Mapping[str, object], *,
                                   pacer: StatusPacer) -> ReconcileResult:
    """Bring one ScrapeRequest a step closer to done: validate, hold the finalizer, enqueue, report, clean up.

    Call it on every change of the object and again at `wake_at`; `NotLeaderError` from
    `ctx.ensure_leader()` passes through, before anything is written.
    """
    obj = ScrapeObject.from_body(body)
    with log_context(namespace=obj.namespace, name=obj.name):
        try:
            return await _reconcile(ctx, cast(KubeObject, body), obj, pacer)
        except (RedisConnectionError, RedisTimeoutError) as error:
            ctx.metrics.count_error("scrape_redis")
            logger.warning("cannot reach Redis for ScrapeRequest %s/%s (%s: %s); trying again in %ss",
                           obj.namespace, obj.name, type(error).__name__, error, REDIS_RETRY_SECONDS)
            return ReconcileResult(Outcome.REDIS_UNAVAILABLE, wake_at=_after(ctx, REDIS_RETRY_SECONDS))


def scrape_request_reconciler() -> Callable[[OperatorContext, Mapping[str, object]], Awaitable[datetime | None]]:
    """`reconcile_scrape_request` as the leader's loop calls it (returning the wake time), with its own pacer."""
    pacer = StatusPacer()

    async def reconcile(ctx: OperatorContext, body: Mapping[str, object]) -> datetime | None:
        return (await reconcile_scrape_request(ctx, body, pacer=pacer)).wake_at

    return reconcile


async def _reconcile(ctx: OperatorContext, body: KubeObject, obj: ScrapeObject, pacer: StatusPacer
                     ) -> ReconcileResult:
    if obj.deleting:
        if FINALIZER not in obj.finalizers:
            return ReconcileResult(Outcome.IGNORED)
        return await _clean_up(ctx, body, obj, pacer)
    previous = _current_status(ctx, body, obj)
    annotations = body.get("metadata", {}).get("annotations")
    cancel_id = pending_cancel(annotations, previous)
    if cancel_id is not None:
        return await _cancel(ctx, body, obj, pacer, previous, cancel_id)
    if decide_cancel_sweep(previous, ctx.now()):
        return await _sweep_cancelled(ctx, body, obj)
    if previous.completion_time is not None:
        pacer.forget(obj.uid)
        return ReconcileResult(Outcome.COMPLETED)
    moment = ctx.now()
    now = moment.replace(microsecond=0)  # status times are RFC 3339 to the second

    try:
        spec = parse_spec(SCRAPE_REQUEST, ScrapeRequestSpec, body.get("spec") or {})
    except InvalidSpecError as error:
        message = str(error)
        desired = build_problem_status(previous, Reason.INVALID_SPEC, message, obj.generation, now)
        return await _report_problem(ctx, body, obj, pacer, previous, desired, Outcome.INVALID_SPEC, None)

    verdict = ctx.tenancy.scrape(obj.namespace, spec.queue, private_networks=spec.fetch.allow_private_networks,
                                 requests_per_minute=spec.rate_limit.requests_per_minute)
    permission = permission_condition(verdict, previous, obj.generation, now)
    if not verdict.allowed and previous.start_time is None:  # nothing enqueued yet: wait for a policy
        waiting = succeeded_condition(ConditionStatus.UNKNOWN, Reason.NOT_PERMITTED, verdict.message, obj.generation,
                                      now)
        desired = with_permission(with_condition(previous, waiting, obj.generation), permission)
        return await _report_problem(ctx, body, obj, pacer, previous, desired, Outcome.NOT_PERMITTED, None)

    if FINALIZER not in obj.finalizers:
        try:
            body = await _add_finalizer(ctx, obj)
        except ConflictError:
            logger.info("ScrapeRequest %s/%s changed before its finalizer was added; the newer version "
                        "carries on", obj.namespace, obj.name)
            return ReconcileResult(Outcome.CONFLICT, wake_at=_after(ctx, CONFLICT_RETRY_SECONDS))
        except NotFoundError:
            return ReconcileResult(Outcome.GONE)
        obj = ScrapeObject.from_body(body)

    progress = await _read_progress(ctx, obj)
    starting = decide_start(previous, progress)
    if starting:
        try:
            urls = await _resolve_urls(ctx, obj, spec)
        except UrlsUnavailableError as error:
            desired = build_problem_status(previous, Reason.URLS_UNAVAILABLE, str(error), obj.generation, now)
            return await _report_problem(ctx, body, obj, pacer, previous, desired, Outcome.URLS_UNAVAILABLE,
                                         _after(ctx, URLS_RETRY_SECONDS))
        await _enqueue_listing_pages(ctx, obj, spec, urls)
        progress = await _read_progress(ctx, obj)

    desired = with_permission(build_status(previous, progress, queue=spec.queue, generation=obj.generation, now=now),
                              permission)
    if permission is not None and previous.start_time is not None and permission not in previous.conditions:
        await ctx.post_event(body, permission.reason, permission.message, warning=not verdict.allowed)
    interval = ctx.settings.status_interval
    wait = decide_status_write(previous, desired, seconds_since_write=pacer.seconds_since_write(obj.uid, moment),
                               interval=interval)
    outcome = Outcome.STARTED if starting else Outcome.RUNNING
    if wait is None or wait > 0:
        return ReconcileResult(outcome, wake_at=moment + timedelta(seconds=wait or interval))
    written = await _write_status(ctx, obj, pacer, desired, moment)
    if written is not None:
        return written
    if previous.start_time is None:
        await ctx.post_event(body, "Started", f"{progress.listing.total} listing pages enqueued on queue {spec.queue}")
    final = next((c for c in desired.conditions if c.type == SUCCEEDED), None)
    if desired.completion_time is not None and final is not None:
        pacer.forget(obj.uid)
        await ctx.post_event(body, final.reason, final.message, warning=final.status != ConditionStatus.TRUE)
        return ReconcileResult(Outcome.COMPLETED, status_written=True)
    return ReconcileResult(outcome, wake_at=moment + timedelta(seconds=interval), status_written=True)


async def _cancel(ctx: OperatorContext, body: KubeObject, obj: ScrapeObject, pacer: StatusPacer,
                  previous: ScrapeRequestStatus, ask_id: str) -> ReconcileResult:
    """A `kubearq.dev/cancel` ask: take the request's jobs off the queue, abort the running ones, record it as
    Cancelled (what was stored stays). Handled once per ask id; a finished request refuses it."""
    annotations = body.get("metadata", {}).get("annotations")
    requested_by = cancel_requested_by(annotations)
    now = ctx.now().replace(microsecond=0)
    refusal = decide_cancel_refusal(annotations, previous)
    if refusal is not None:
        written = await _write_status(ctx, obj, pacer, build_cancel_refusal(previous, ask_id, refusal, requested_by,
                                                                           now), now)
        if written is not None:
            return written
        await ctx.post_event(body, "CancelRefused", refusal, warning=True)
        return ReconcileResult(Outcome.COMPLETED if previous.completion_time else Outcome.RUNNING,
                               wake_at=None if previous.completion_time else _after(ctx, ctx.settings.status_interval),
                               status_written=True)
    queue, _ = decide_deletion(body.get("spec"))
    removed, running = await _stop_jobs(ctx, obj, queue)
    progress = await _read_progress(ctx, obj)
    desired = build_cancelled_status(previous, progress, ask_id=ask_id, requested_by=requested_by, removed=removed,
                                     aborted=len(running), generation=obj.generation, now=now)
    written = await _write_status(ctx, obj, pacer, desired, now)
    if written is not None:
        return written
    pacer.forget(obj.uid)
    condition = next(c for c in desired.conditions if c.type == SUCCEEDED)
    await ctx.post_event(body, "Cancelled", condition.message)
    logger.info("ScrapeRequest %s/%s cancelled: %d queued jobs removed, %d running jobs aborted",
                obj.namespace, obj.name, removed, len(running))
    wake = _after(ctx, CLEANUP_POLL_SECONDS) if running else None
    return ReconcileResult(Outcome.CANCELLED, wake_at=wake, status_written=True)


async def _sweep_cancelled(ctx: OperatorContext, body: KubeObject, obj: ScrapeObject) -> ReconcileResult:
    """A cancelled request whose running jobs were aborted: detail pages they enqueued before stopping are taken
    off the queue too, until none runs (or CANCEL_SWEEP_SECONDS have passed)."""
    queue, _ = decide_deletion(body.get("spec"))
    removed, running = await _stop_jobs(ctx, obj, queue)
    if removed:
        logger.info("ScrapeRequest %s/%s cancelled: %d more queued jobs removed", obj.namespace, obj.name, removed)
    if running:
        return ReconcileResult(Outcome.CANCELLED, wake_at=_after(ctx, CLEANUP_POLL_SECONDS))
    return ReconcileResult(Outcome.COMPLETED)


async def _stop_jobs(ctx: OperatorContext, obj: ScrapeObject, queue: str) -> tuple[int, list[str]]:
    """Take the request's jobs off the queue and abort the running ones: (jobs removed before they ran, running)."""
    members = cast(set[bytes], await ctx.redis.smembers(request_jobs_key(obj.uid)))  # type: ignore[misc]
    job_ids = sorted(member.decode() for member in members)
    if not job_ids:
        return 0, []
    ctx.ensure_leader()
    removed = await remove_queued(ctx.redis, queue, job_ids)
    outcomes = await job_outcomes(ctx.redis, queue, job_ids)
    running = [job_id for job_id, outcome in outcomes.items() if outcome.state == JobState.RUNNING]
    if running:
        await abort_jobs(ctx.redis, running)
    # Removed first, so that none can start in between; ARQ keeps a running job's id on the queue, so the count
    # of ids taken off it includes the running ones.
    return max(0, removed - len(running)), running


# After a write met a newer object, look again soon: the newer object may differ only in a status the leader
# wrote itself, which the watch brings but does not count as work, so no change would wake it (found by the
# demo on a real API server: a ScrapeRequest's progress froze at 0/2 until a failover).
CONFLICT_RETRY_SECONDS = 1.0


def _after(ctx: OperatorContext, seconds: float) -> datetime:
    return ctx.now() + timedelta(seconds=seconds)


def _current_status(ctx: OperatorContext, body: KubeObject, obj: ScrapeObject) -> ScrapeRequestStatus:
    try:
        return ScrapeRequestStatus.model_validate(body.get("status") or {})
    except ValidationError as error:
        # Only we write status; an unreadable one is rewritten from Redis rather than stopping the request.
        ctx.metrics.count_error("read_status")
        logger.warning("status of ScrapeRequest %s/%s is unreadable, rebuilding it: %s",
                       obj.namespace, obj.name, describe_validation_error(error, "status"))
        return ScrapeRequestStatus()


async def _report_problem(ctx: OperatorContext, body: KubeObject, obj: ScrapeObject, pacer: StatusPacer,
                          previous: ScrapeRequestStatus, desired: ScrapeRequestStatus, outcome: Outcome,
                          wake_at: datetime | None) -> ReconcileResult:
    """Write the problem's condition once and say it in a Warning Event (only when the status changed)."""
    if desired == previous:
        return ReconcileResult(outcome, wake_at=wake_at)
    written = await _write_status(ctx, obj, pacer, desired, ctx.now())
    if written is not None:
        return written
    condition = next(c for c in desired.conditions if c.type == SUCCEEDED)
    await ctx.post_event(body, condition.reason, condition.message, warning=True)
    return ReconcileResult(outcome, wake_at=wake_at, status_written=True)


async def _write_status(ctx: OperatorContext, obj: ScrapeObject, pacer: StatusPacer, status: ScrapeRequestStatus,
                        now: datetime) -> ReconcileResult | None:
    """Patch the status subresource at the object's resourceVersion; None when written, else what happened.

    Within the status write budget, without waiting for it (the leader's loop must not): when no token is free
    the write is left to the pass it wakes for, which computes the status afresh from Redis (the newest wins).
    """
    budget = ctx.status_budget
    wait = budget.claim((KIND, obj.namespace, obj.name))
    if wait > 0:
        ctx.metrics.count_status_write_coalesced(KIND)
        return ReconcileResult(Outcome.RUNNING, wake_at=_after(ctx, wait))
    document = status.model_dump(mode="json", by_alias=True)  # None clears a field in a merge patch
    ctx.ensure_leader()
    sent_at = budget.now()
    ctx.metrics.count_status_write_sent(KIND)
    try:
        await ctx.api.patch_status(SCRAPE_REQUESTS, obj.name, document, namespace=obj.namespace,
                                   resource_version=obj.resource_version, timeout=API_TIMEOUT)
    except ConflictError:
        # Computed from a stale object: the newer one is on its way to the leader, which reconciles it.
        ctx.metrics.count_status_patch(KIND, "conflict")
        logger.info("status of ScrapeRequest %s/%s not written: the object changed since resourceVersion %s",
                    obj.namespace, obj.name, obj.resource_version)
        return ReconcileResult(Outcome.CONFLICT, wake_at=_after(ctx, CONFLICT_RETRY_SECONDS))
    except NotFoundError:
        ctx.metrics.count_status_patch(KIND, "conflict")
        return ReconcileResult(Outcome.GONE)
    except ApiError as error:
        ctx.metrics.count_status_patch(KIND, "error")
        if not asks_to_slow_down(error):
            raise
        # Throttled (API Priority and Fairness): every status write slows down; this one waits for a later pass.
        ctx.metrics.count_status_write_throttled(KIND)
        budget.throttled(sent_at, error.retry_after, str(error))
        return ReconcileResult(Outcome.RUNNING, wake_at=_after(ctx, max(budget.paused_for(), CONFLICT_RETRY_SECONDS)))
    budget.succeeded(sent_at)
    ctx.metrics.count_status_patch(KIND, "ok")
    pacer.written(obj.uid, now)
    return None


async def _add_finalizer(ctx: OperatorContext, obj: ScrapeObject) -> KubeObject:
    """Our finalizer, added at the object's resourceVersion (409 if it changed meanwhile)."""
    ctx.ensure_leader()
    return await ctx.api.patch(SCRAPE_REQUESTS, obj.name, {"metadata": {"finalizers": [*obj.finalizers, FINALIZER]}},
                               namespace=obj.namespace, resource_version=obj.resource_version, timeout=API_TIMEOUT)


async def _read_progress(ctx: OperatorContext, obj: ScrapeObject) -> Progress:
    async with ctx.redis.pipeline(transaction=False) as pipe:
        pipe.hmget(progress_key(obj.uid), list(PROGRESS_FIELDS))
        pipe.lrange(failures_key(obj.uid), 0, min(FAILURES_SHOWN, MAX_FAILED_URLS_SHOWN) - 1)
        counters, raw_failures = await pipe.execute()
    failed_urls = []
    for raw in raw_failures:
        failed = parse_failed_url(raw)
        if failed is None:
            ctx.metrics.count_error("read_failures")
            logger.warning("unreadable failure entry of ScrapeRequest %s/%s in %s: %.200r",
                           obj.namespace, obj.name, failures_key(obj.uid), raw)
        else:
            failed_urls.append(failed)
    return build_progress(counters, failed_urls)


async def _resolve_urls(ctx: OperatorContext, obj: ScrapeObject, spec: ScrapeRequestSpec) -> list[str]:
    if spec.urls is not None:
        return list(spec.urls)
    assert spec.urls_from is not None  # the spec's model requires exactly one of urls and urlsFrom
    ref = spec.urls_from.config_map_key_ref
    try:
        config_map = await ctx.api.get(CONFIG_MAPS, ref.name, namespace=obj.namespace, timeout=API_TIMEOUT)
    except NotFoundError:
        raise UrlsUnavailableError(
            f'{URLS_FROM}: ConfigMap "{ref.name}" not found in namespace "{obj.namespace}"') from None
    except ApiError as error:
        ctx.metrics.count_error("read_configmap")
        raise UrlsUnavailableError(f'{URLS_FROM}: cannot read ConfigMap "{ref.name}": {error}') from None
    data = cast(Mapping[str, object], config_map).get("data")
    text = cast(Mapping[str, object], data).get(ref.key) if isinstance(data, Mapping) else None
    if not isinstance(text, str):
        keys = ", ".join(sorted(cast(Mapping[str, object], data))) if isinstance(data, Mapping) and data else "none"
        raise UrlsUnavailableError(
            f'{URLS_FROM}: ConfigMap "{ref.name}" has no key "{ref.key}" (its keys: {keys})')
    return parse_url_list(text, f'{URLS_FROM}: ConfigMap "{ref.name}" key "{ref.key}"')


async def _enqueue_listing_pages(ctx: OperatorContext, obj: ScrapeObject, spec: ScrapeRequestSpec,
                                 urls: Sequence[str]) -> None:
    """Every listing page in bulk (a few round trips per thousand jobs), counted into the listing total."""
    jobs = build_listing_jobs(obj.request, urls, build_scrape_settings(spec))
    tally = Tally(progress_key(obj.uid), "listing_total", request_jobs_key(obj.uid))
    added = 0
    for start in range(0, len(jobs), CHUNK):
        ctx.ensure_leader()  # the fence, before every chunk: a replica that lost the Lease stops at once
        added += len(await enqueue_many(ctx.redis, spec.queue, jobs[start : start + CHUNK], tally=tally))
    if added:
        ctx.metrics.count_enqueued("scrape", spec.queue, added)
    if duplicates := len(jobs) - added:
        ctx.metrics.count_duplicate_enqueue("scrape", duplicates)
    logger.info("enqueued %d listing pages of ScrapeRequest %s/%s on %s (%d already enqueued)",
                added, obj.namespace, obj.name, spec.queue, duplicates)


async def _clean_up(ctx: OperatorContext, body: KubeObject, obj: ScrapeObject, pacer: StatusPacer
                    ) -> ReconcileResult:
    """Stop the request's jobs, drop its keys, delete its results if asked; then let the object go."""
    queue, policy = decide_deletion(body.get("spec"))
    members = cast(set[bytes], await ctx.redis.smembers(request_jobs_key(obj.uid)))  # type: ignore[misc]
    job_ids = sorted(member.decode() for member in members)
    if job_ids:
        ctx.ensure_leader()
        removed = await remove_queued(ctx.redis, queue, job_ids)
        # Once off the queue (job keys gone) no job of the request can start; only running ones remain.
        # Abort just those: every worker reads the whole `arq:abort` set on every poll.
        outcomes = await job_outcomes(ctx.redis, queue, job_ids)
        running = [job_id for job_id, outcome in outcomes.items() if outcome.state == JobState.RUNNING]
        if running:
            await abort_jobs(ctx.redis, running)
            logger.info("ScrapeRequest %s/%s deleted: %d queued jobs removed, %d running jobs aborted; "
                        "waiting for them to stop", obj.namespace, obj.name, removed, len(running))
            # A listing page may still enqueue detail pages before it stops: the next pass removes them.
            return ReconcileResult(Outcome.CLEANING_UP, wake_at=_after(ctx, CLEANUP_POLL_SECONDS))
    ctx.ensure_leader()
    await ctx.redis.delete(progress_key(obj.uid), failures_key(obj.uid), request_jobs_key(obj.uid),
                           finished_key(obj.uid), deferred_key(obj.uid))
    if policy == DeletionPolicy.DELETE:
        waiting = await _delete_results(ctx, body, obj, queue)
        if waiting is not None:
            return ReconcileResult(Outcome.CLEANING_UP, wake_at=_after(ctx, waiting))
    return await _remove_finalizer(ctx, obj, pacer)


async def _delete_results(ctx: OperatorContext, body: KubeObject, obj: ScrapeObject, queue: str) -> float | None:
    """Have a worker delete the stored results (the operator never talks to PostgreSQL).

    None once the job succeeded; otherwise seconds to wait. A failed job's kept result holds its id, so the
    job is enqueued again once ARQ lets that result expire.
    """
    job = build_deletion_job(obj.request)
    outcome = (await job_outcomes(ctx.redis, queue, [job.job_id]))[job.job_id]
    if outcome.state == JobState.SUCCEEDED:
        return None
    if outcome.state == JobState.UNKNOWN:
        ctx.ensure_leader()
        if await enqueue_many(ctx.redis, queue, [job]):
            ctx.metrics.count_enqueued("scrape", queue)
            await ctx.post_event(body, "DeletingResults", "deletionPolicy is Delete: the stored results are being "
                                 f"deleted (job {job.job_id} on queue {queue}); the finalizer stays until they are")
        return CLEANUP_POLL_SECONDS
    if outcome.state in (JobState.FAILED, JobState.ABORTED):
        ctx.metrics.count_error("delete_scrape_results")
        message = (f"deleting the stored results failed ({outcome.error}); it is tried again when the job's "
                   f"result expires; the finalizer {FINALIZER} stays until then")
        logger.warning("ScrapeRequest %s/%s: %s", obj.namespace, obj.name, message)
        await ctx.post_event(body, "ResultsNotDeleted", message, warning=True)
        return DELETION_RETRY_SECONDS
    return CLEANUP_POLL_SECONDS


async def _remove_finalizer(ctx: OperatorContext, obj: ScrapeObject, pacer: StatusPacer) -> ReconcileResult:
    """Our finalizer removed at the object's resourceVersion, so a concurrent change is never clobbered."""
    remaining = [finalizer for finalizer in obj.finalizers if finalizer != FINALIZER]
    ctx.ensure_leader()
    try:
        await ctx.api.patch(SCRAPE_REQUESTS, obj.name, {"metadata": {"finalizers": remaining}},
                            namespace=obj.namespace, resource_version=obj.resource_version, timeout=API_TIMEOUT)
    except ConflictError:
        logger.info("ScrapeRequest %s/%s changed before its finalizer was removed; the newer version carries on",
                    obj.namespace, obj.name)
        return ReconcileResult(Outcome.CONFLICT, wake_at=_after(ctx, CONFLICT_RETRY_SECONDS))
    except NotFoundError:
        return ReconcileResult(Outcome.GONE)
    pacer.forget(obj.uid)
    logger.info("ScrapeRequest %s/%s cleaned up; finalizer removed", obj.namespace, obj.name)
    return ReconcileResult(Outcome.FINALIZED)
