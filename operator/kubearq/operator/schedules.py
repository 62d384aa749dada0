"""The leader's SyncSchedule reconciler: from the object and Redis to enqueued ticks and a status.

Level-triggered: everything it needs is in the object (spec, `status.lastScheduleTime`, `status.runs`)
and in Redis (job states, served functions), so a new leader picks up exactly where the old one stopped,
and a tick enqueued twice is refused by its deterministic, remembered id. The asks on the object (a trigger,
a backfill: kubearq.operator.actions) are handled after the due ticks, once per ask id, which status records
(`lastTrigger`, `lastBackfill`); their jobs' ids are deterministic too, so a leader that dies between the enqueue
and the status write leaves nothing the next one would enqueue twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from kubearq.core.connections import TRANSIENT_ERRORS
from kubearq.core.contract import Origin, function_registry_key
from kubearq.core.queueing import JobOutcome, JobState, NewJob, abort_jobs, enqueue_many, remove_queued
from kubearq.operator.actions import (
    BACKFILL_ANNOTATION,
    TRIGGER_ANNOTATION,
    ActionOutcome,
    BackfillAsk,
    BackfillRecord,
    TriggerRecord,
    read_ask,
)
from kubearq.operator.conditions import Condition, ConditionStatus, set_condition
from kubearq.operator.context import API_TIMEOUT, SYNC_SCHEDULES, OperatorContext, rfc3339
from kubearq.operator.kube import ApiError, KubeObject, is_transient
from kubearq.operator.scheduler import (
    Action,
    PendingAsks,
    decide_policy,
    forbidden_trigger,
    jitter_offset,
    manual_job_id,
    parse_time,
    pending_asks,
    plan_backfill,
    plan_ticks,
    refusal,
    tick_job_id,
    tick_memory_ms,
)
from kubearq.operator.syncschedule import (
    MAX_ACTIVE,
    SYNC_SCHEDULE,
    ConcurrencyPolicy,
    RunOutcome,
    RunTrigger,
    ScheduleRun,
    SyncScheduleSpec,
    SyncScheduleStatus,
)
from kubearq.operator.tenancy import NOT_PERMITTED
from kubearq.operator.validation import InvalidSpecError, parse_spec

logger = logging.getLogger(__name__)

LEASE_DURATION_SECONDS = 15.0
RETRY_AFTER_FAILURE = timedelta(seconds=5)
FINISHED = {RunOutcome.SUCCEEDED, RunOutcome.FAILED, RunOutcome.ABORTED}
OUTCOMES = {
    JobState.QUEUED: RunOutcome.QUEUED, JobState.DEFERRED: RunOutcome.QUEUED, JobState.RUNNING: RunOutcome.RUNNING,
    JobState.SUCCEEDED: RunOutcome.SUCCEEDED, JobState.FAILED: RunOutcome.FAILED,
    JobState.ABORTED: RunOutcome.ABORTED,
}


def ready(status: ConditionStatus, reason: str, message: str, generation: int, now: datetime) -> Condition:
    return Condition(type="Ready", status=status, reason=reason, message=message, last_transition_time=now,
                     observed_generation=generation)


def update_runs(runs: Sequence[ScheduleRun], outcomes: Mapping[str, JobOutcome], now: datetime) -> list[ScheduleRun]:
    """Runs with their outcome read from ARQ; a run whose job and result are both gone stays as it was."""
    updated = []
    for run in runs:
        outcome = outcomes.get(run.job_id)
        if run.outcome in FINISHED or outcome is None or outcome.state == JobState.UNKNOWN:
            updated.append(run)
            continue
        state = OUTCOMES[outcome.state]
        finished = None
        if state in FINISHED:
            finished = datetime.fromtimestamp(outcome.finished_ms / 1000, now.tzinfo) if outcome.finished_ms else now
        updated.append(run.model_copy(update={"outcome": state, "finish_time": finished, "error": outcome.error}))
    return updated


def keep_history(runs: Sequence[ScheduleRun], successful: int, failed: int) -> list[ScheduleRun]:
    """Newest first: the newest MAX_ACTIVE active runs, and the newest finished ones within the limits.

    With `Allow` and no worker taking jobs, active runs pile up; only the newest are tracked in status
    (the object must stay small), the older ones stay on the queue untouched.
    """
    ordered = sorted(runs, key=lambda run: run.scheduled_time, reverse=True)
    kept, active, succeeded, unsuccessful = [], 0, 0, 0
    for run in ordered:
        if run.outcome not in FINISHED:
            active += 1
            if active > MAX_ACTIVE:
                continue
        elif run.outcome == RunOutcome.SUCCEEDED:
            succeeded += 1
            if succeeded > successful:
                continue
        elif run.outcome in FINISHED:
            unsuccessful += 1
            if unsuccessful > failed:
                continue
        kept.append(run)
    return kept


def parsed_spec(ctx: OperatorContext, uid: str, generation: int, raw: object) -> SyncScheduleSpec:
    """The validated spec, parsed once per generation (only a spec change moves the generation)."""
    key = (uid, generation)
    spec = ctx.spec_cache.get(key)
    if not isinstance(spec, SyncScheduleSpec):
        spec = parse_spec(SYNC_SCHEDULE, SyncScheduleSpec, raw)
        if len(ctx.spec_cache) > 100_000:
            ctx.spec_cache.clear()
        ctx.spec_cache[key] = spec
    return spec


async def served_functions(ctx: OperatorContext, queue: str) -> set[str]:
    """Functions workers published on `queue` recently; read at most once a second per queue, and one read
    in flight at a time (many schedules due on the same minute share one read)."""
    cached = ctx.served_cache.get(queue)
    failed = cached is not None and cached[1].done() and (cached[1].cancelled() or cached[1].exception() is not None)
    if cached is None or failed or time.monotonic() - cached[0] >= 1.0:
        reading = asyncio.ensure_future(_read_served(ctx, queue))
        reading.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved: no warning
        cached = ctx.served_cache[queue] = (time.monotonic(), reading)
    return await asyncio.shield(cached[1])


async def _read_served(ctx: OperatorContext, queue: str) -> set[str]:
    published = cast(dict[bytes, bytes], await ctx.redis.hgetall(function_registry_key(queue)))  # type: ignore[misc]
    fresh_after = time.time() - ctx.settings.function_freshness_seconds
    return {name.decode() for name, stamp in published.items() if float(stamp) >= fresh_after}


@dataclass(frozen=True)
class ArmedTick:
    """A schedule's next tick with its job built in advance, for the leader to fire the moment it is due
    (`fire_armed`), before the schedule's full pass; the pass then records the run without enqueueing."""

    uid: str
    generation: int
    tick: datetime
    queue: str
    job: NewJob
    remember_ms: int
    deadline_seconds: int | None

    def due(self, now: datetime) -> bool:
        """Due, and the only due tick: cron ticks are at least a minute apart, so under a minute late it is
        the tick `plan_ticks` would enqueue (later, or past the deadline, the full pass decides)."""
        late = (now - self.tick).total_seconds()
        return 0 <= late < min(60, self.deadline_seconds or 60)


@dataclass(frozen=True)
class Event:
    reason: str
    message: str
    warning: bool = False


@dataclass(frozen=True)
class ScheduleStep:
    """What one pass over a schedule did (enqueues are done) and what is left to write and tell."""

    body: KubeObject
    previous: SyncScheduleStatus
    status: SyncScheduleStatus | None
    wake_at: datetime | None
    events: tuple[Event, ...] = ()
    """Posted after the status write (API calls are kept out of the enqueue pass)."""
    invalid_message: str | None = None
    armed: ArmedTick | None = None
    """The next tick, ready to fire."""

    async def write(self, ctx: OperatorContext) -> KubeObject | None:
        """Post the Events, write the status if it changed; returns the object as written, if it was."""
        for event in self.events:
            await ctx.post_event(self.body, event.reason, event.message, warning=event.warning)
        if self.status is None:
            return None
        written = await write_status(ctx, self.body, self.previous, self.status)
        if written is not None and self.invalid_message:
            await ctx.post_event(self.body, "InvalidSchedule", self.invalid_message, warning=True)
        return written


async def reconcile_schedule(ctx: OperatorContext, body: KubeObject) -> datetime | None:
    """Enqueue what is due, record it in status; returns when to look at this schedule again (None: on change)."""
    step = await advance_schedule(ctx, body)
    await step.write(ctx)
    return step.wake_at


async def advance_schedule(ctx: OperatorContext, body: KubeObject, unwritten: SyncScheduleStatus | None = None,
                           fired: Mapping[str, datetime] | None = None) -> ScheduleStep:
    """Enqueue what is due and compute the new status, without writing it yet.

    The leader advances every due schedule first and writes their statuses after, so ten thousand
    schedules on the same minute are all enqueued before the first status write (the slow part) begins.
    Nothing stands before a tick's enqueue that need not: with `Allow`, the previous runs' outcomes and
    the served functions are read after it; `Forbid` and `Replace` read the outcomes first, as they decide.
    `unwritten` is a status computed earlier and not written yet: it is newer than the object's. `fired`:
    tick job ids `fire_armed` already handled, and when.
    """
    metadata = body.get("metadata", {})
    namespace, name = str(metadata.get("namespace")), str(metadata.get("name"))
    uid, generation = str(metadata.get("uid")), int(metadata.get("generation", 1))
    now = ctx.now()
    previous = unwritten or SyncScheduleStatus.model_validate(body.get("status") or {})
    try:
        spec = parsed_spec(ctx, uid, generation, body.get("spec"))
    except InvalidSpecError as error:
        message = str(error)
        asks = pending_asks(body.get("metadata", {}).get("annotations"), previous)
        refused = {field: refusal(kind, ask_id, f"the schedule is invalid: {message}", now, asks.requested_by)
                   for field, kind, ask_id in asks.due()}
        status = previous.model_copy(update={
            "observed_generation": generation, "next_schedule_time": None, **refused,
            "conditions": set_condition(previous.conditions, ready(
                ConditionStatus.FALSE, "InvalidSchedule", message, generation, now))})
        return ScheduleStep(body, previous, status, None, invalid_message=message)

    queue = spec.job.queue
    # A new schedule starts at its creation, as CronJob does; afterwards at the last tick handled.
    since = previous.last_schedule_time or parse_time(metadata.get("creationTimestamp")) or now
    plan = plan_ticks(spec.schedule, spec.time_zone, since, now, spec.starting_deadline_seconds)
    runs = list(previous.runs)
    pending = [run.job_id for run in runs if run.outcome not in FINISHED]
    asks = pending_asks(body.get("metadata", {}).get("annotations"), previous)
    outcomes_read = False
    deciding = (plan.enqueue and not spec.suspend) or asks.trigger_id is not None
    if pending and deciding and spec.concurrency_policy != ConcurrencyPolicy.ALLOW:
        try:
            runs = update_runs(runs, await ctx.outcomes.read(queue, pending), now)
            outcomes_read = True
        except TRANSIENT_ERRORS as error:
            ctx.metrics.count_error("read_redis")
            logger.warning("cannot read Redis for %s/%s: %s", namespace, name, error)
            return ScheduleStep(body, previous, None, now + RETRY_AFTER_FAILURE)

    skipped, missed, last_handled = previous.skipped_ticks, previous.missed_ticks, previous.last_schedule_time
    condition = ready(ConditionStatus.TRUE, "Scheduled", f"next tick at {rfc3339(plan.next_tick)}", generation, now)
    events: list[Event] = []
    retry_at: datetime | None = None
    verdict = ctx.tenancy.schedule(namespace, queue, spec.job.function)
    origin = Origin(namespace=namespace, kind="SyncSchedule", name=name)
    handled: dict[str, TriggerRecord | BackfillRecord] = {}
    if spec.suspend:
        condition = ready(ConditionStatus.FALSE, "Suspended", "spec.suspend is true: no new runs", generation, now)
    elif not verdict.allowed:
        # Its ticks pass unenqueued: once a policy permits it, it starts from the next tick, with no catch-up.
        condition = ready(ConditionStatus.FALSE, NOT_PERMITTED, verdict.message, generation, now)
        last_handled = plan.enqueue[-1] if plan.enqueue else last_handled
        was = next((old for old in previous.conditions if old.type == "Ready"), None)
        if was is None or (was.reason, was.message) != (NOT_PERMITTED, verdict.message):
            events.append(Event(NOT_PERMITTED, verdict.message, warning=True))
    else:
        missed += plan.missed
        for tick in plan.enqueue:
            active = [run.job_id for run in runs if run.outcome not in FINISHED]
            action = decide_policy(spec.concurrency_policy, active)
            if action == Action.SKIP:
                skipped += 1
                last_handled = tick
                events.append(Event("TickSkipped", f"tick {rfc3339(tick)} skipped: concurrencyPolicy Forbid "
                                                   f"and {len(active)} run(s) still active ({', '.join(active)})"))
                continue
            try:
                if action == Action.REPLACE:
                    ctx.ensure_leader()
                    await remove_queued(ctx.redis, queue, active)
                    await abort_jobs(ctx.redis, active)
                    runs = [run.model_copy(update={"outcome": RunOutcome.ABORTED, "finish_time": now,
                                                   "error": f"replaced by the run of {rfc3339(tick)}"})
                            if run.job_id in active else run for run in runs]
                fired_at = fired.get(tick_job_id(uid, tick)) if fired else None
                if fired_at is not None:  # enqueued (or refused) a moment ago by fire_armed
                    runs.append(ScheduleRun(job_id=tick_job_id(uid, tick), scheduled_time=tick,
                                            enqueued_time=fired_at, outcome=RunOutcome.QUEUED))
                else:
                    runs.append(await enqueue_tick(ctx, spec, uid, tick, now, origin=origin))
                last_handled = tick
            except TRANSIENT_ERRORS as error:
                ctx.metrics.count_error("enqueue")
                message = f"could not enqueue the tick of {rfc3339(tick)}: {type(error).__name__}: {error}"
                condition = ready(ConditionStatus.FALSE, "EnqueueFailed", message, generation, now)
                events.append(Event("EnqueueFailed", message, warning=True))
                retry_at = now + RETRY_AFTER_FAILURE
                break

    if not verdict.allowed:
        handled = {field: refusal(kind, ask_id, verdict.message, now, asks.requested_by)
                   for field, kind, ask_id in asks.due()}
    elif retry_at is None and asks.due():
        # Ticks first, then what was asked for; an ask met by a Redis failure stays unhandled and is retried.
        try:
            runs, handled, asked_events = await handle_asks(ctx, body, spec, asks, runs, now, origin)
            events += asked_events
        except TRANSIENT_ERRORS as error:
            ctx.metrics.count_error("enqueue")
            logger.warning("could not carry out what was asked of %s/%s: %s; trying again", namespace, name, error)
            retry_at = now + RETRY_AFTER_FAILURE

    # What is due is enqueued: now what became of the earlier runs, and whether a worker serves the function.
    served: set[str] | None = None
    try:
        if pending and not outcomes_read:
            runs = update_runs(runs, await ctx.outcomes.read(queue, pending), now)
        served = await served_functions(ctx, queue)
    except TRANSIENT_ERRORS as error:  # what was enqueued is still recorded; the rest waits for the next pass
        ctx.metrics.count_error("read_redis")
        logger.warning("cannot read Redis for %s/%s: %s", namespace, name, error)
        retry_at = retry_at or now + RETRY_AFTER_FAILURE
    if condition.reason == "Scheduled":
        if served is None:  # unknown: keep what the last pass found
            condition = next((old for old in previous.conditions if old.type == "Ready"), condition)
        elif spec.job.function not in served:
            condition = ready(
                ConditionStatus.FALSE, "FunctionUnknown",
                f"no worker on queue {queue!r} has published function {spec.job.function!r} in the last "
                f"{ctx.settings.function_freshness_seconds}s (a typo, or workers not running yet); ticks are "
                "enqueued anyway", generation, now)

    runs = keep_history(runs, spec.successful_runs_history_limit, spec.failed_runs_history_limit)
    active_ids = [run.job_id for run in runs if run.outcome not in FINISHED]
    status = previous.model_copy(update={
        "observed_generation": generation,
        "runs": runs, "active": active_ids, "active_count": len(active_ids),
        "skipped_ticks": skipped, "missed_ticks": missed, "last_schedule_time": last_handled,
        "next_schedule_time": None if spec.suspend or not verdict.allowed else plan.next_tick,
        "conditions": set_condition(previous.conditions, condition),
        **handled,
    })
    wake = [plan.next_tick] if not spec.suspend else []
    if active_ids:
        wake.append(now + timedelta(seconds=ctx.settings.status_interval))
    if retry_at:
        wake.append(retry_at)
    armed = None
    if not spec.suspend and verdict.allowed and spec.concurrency_policy == ConcurrencyPolicy.ALLOW:
        # (Forbid and Replace decide at the tick; a policy change makes the schedule dirty, so this never fires)
        job, remember = tick_job(ctx, spec, uid, plan.next_tick, origin=origin)
        armed = ArmedTick(uid, generation, plan.next_tick, queue, job, remember, spec.starting_deadline_seconds)
    return ScheduleStep(body, previous, status, min(wake) if wake else None, tuple(events), armed=armed)


async def handle_asks(ctx: OperatorContext, body: KubeObject, spec: SyncScheduleSpec, asks: PendingAsks,
                      runs: list[ScheduleRun], now: datetime, origin: Origin
                      ) -> tuple[list[ScheduleRun], dict[str, TriggerRecord | BackfillRecord], list[Event]]:
    """Carry out a pending trigger and backfill: the runs with theirs added, the records for status, the Events."""
    uid = str(body.get("metadata", {}).get("uid"))
    handled: dict[str, TriggerRecord | BackfillRecord] = {}
    events: list[Event] = []
    if asks.trigger_id is not None:
        ask = read_ask(asks.annotations, TRIGGER_ANNOTATION)
        if isinstance(ask, str) or ask is None:
            handled["last_trigger"] = refusal(TriggerRecord, asks.trigger_id, ask or "", now, asks.requested_by)
            events.append(Event("TriggerRefused", ask or "", warning=True))
        else:
            runs, record = await trigger_run(ctx, spec, uid, ask.id, ask.requested_by, runs, now, origin)
            handled["last_trigger"] = record
            events.append(Event("Triggered" if record.outcome == ActionOutcome.DONE else "TriggerRefused",
                                record.message, warning=record.outcome != ActionOutcome.DONE))
    if asks.backfill_id is not None:
        backfill = read_ask(asks.annotations, BACKFILL_ANNOTATION, BackfillAsk)
        if isinstance(backfill, str) or backfill is None:
            handled["last_backfill"] = refusal(BackfillRecord, asks.backfill_id, backfill or "", now,
                                               asks.requested_by)
            events.append(Event("BackfillRefused", backfill or "", warning=True))
        else:
            runs, filled = await backfill_runs(ctx, spec, uid, backfill, runs, now, origin)
            handled["last_backfill"] = filled
            events.append(Event("Backfilled" if filled.outcome == ActionOutcome.DONE else "BackfillRefused",
                                filled.message, warning=filled.outcome != ActionOutcome.DONE))
    return runs, handled, events


async def trigger_run(ctx: OperatorContext, spec: SyncScheduleSpec, uid: str, ask_id: str, requested_by: str | None,
                      runs: list[ScheduleRun], now: datetime, origin: Origin
                      ) -> tuple[list[ScheduleRun], TriggerRecord]:
    """One manual run now, under `concurrencyPolicy` as a tick would be: Forbid refuses it while a run is active,
    Replace aborts the active runs first. Its job id is derived from the ask's id, so handling it twice (a leader
    that died before writing status) enqueues it once."""
    active = [run.job_id for run in runs if run.outcome not in FINISHED]
    action = decide_policy(spec.concurrency_policy, active)
    if action == Action.SKIP:
        return runs, TriggerRecord(id=ask_id, outcome=ActionOutcome.REFUSED, message=forbidden_trigger(active),
                                   handled_time=now, requested_by=requested_by)
    queue = spec.job.queue
    job_id = manual_job_id(uid, ask_id)
    if action == Action.REPLACE:
        ctx.ensure_leader()
        await remove_queued(ctx.redis, queue, active)
        await abort_jobs(ctx.redis, active)
        runs = [run.model_copy(update={"outcome": RunOutcome.ABORTED, "finish_time": now,
                                       "error": f"replaced by the manual run {job_id}"})
                if run.job_id in active else run for run in runs]
    _, remember = tick_job(ctx, spec, uid, now, origin=origin)
    job = NewJob(job_id, spec.job.function, spec.job.keyword_args, args=spec.job.args, origin=origin)
    ctx.ensure_leader()
    added = await ctx.enqueuer.enqueue(queue, job, remember_ms=remember)
    if added:
        ctx.metrics.count_enqueued("schedule", queue)
    else:
        ctx.metrics.count_duplicate_enqueue("schedule")
    logger.info("triggered %s (ask %s)%s", job_id, ask_id, "" if added else ": enqueued before, refused as a duplicate")
    replaced = f", replacing {len(active)} active run(s)" if action == Action.REPLACE else ""
    run = ScheduleRun(job_id=job_id, scheduled_time=now, enqueued_time=now, trigger=RunTrigger.MANUAL)
    return [*runs, run], TriggerRecord(id=ask_id, outcome=ActionOutcome.DONE, handled_time=now, job_id=job_id,
                                       message=f"enqueued job {job_id} on queue {queue}{replaced}",
                                       requested_by=requested_by)


async def backfill_runs(ctx: OperatorContext, spec: SyncScheduleSpec, uid: str, ask: BackfillAsk,
                        runs: list[ScheduleRun], now: datetime, origin: Origin
                        ) -> tuple[list[ScheduleRun], BackfillRecord]:
    """Every past tick of the window with the scheduler's own job ids: a tick enqueued before (by the schedule or
    an earlier backfill, while its id is remembered) is refused, so a repeat or an overlap enqueues nothing twice.
    `concurrencyPolicy` governs the schedule's own ticks, not these: they are enqueued at once."""
    plan = plan_backfill(spec.schedule, spec.time_zone, ask.start, ask.end, now)
    base = {"id": ask.id, "handled_time": now, "requested_by": ask.requested_by, "start": ask.start, "end": ask.end}
    if plan.refusal is not None:
        return runs, BackfillRecord(**base, outcome=ActionOutcome.REFUSED, message=plan.refusal)
    queue = spec.job.queue
    jobs = {tick: tick_job(ctx, spec, uid, tick, origin=origin) for tick in plan.ticks}
    remember = next(iter(jobs.values()))[1] if jobs else 0
    ctx.ensure_leader()
    added = set(await enqueue_many(ctx.redis, queue, [job for job, _ in jobs.values()], remember_ms=remember))
    if added:
        ctx.metrics.count_enqueued("schedule", queue, len(added))
    if duplicates := len(jobs) - len(added):
        ctx.metrics.count_duplicate_enqueue("schedule", duplicates)
    new_runs = [ScheduleRun(job_id=job.job_id, scheduled_time=tick, enqueued_time=now, trigger=RunTrigger.BACKFILL)
                for tick, (job, _) in jobs.items() if job.job_id in added]
    window = f"[{rfc3339(ask.start)}, {rfc3339(ask.end)})"
    message = (f"{len(added)} of the {len(jobs)} tick(s) in {window} enqueued on queue {queue}"
               + (f"; {duplicates} enqueued before" if duplicates else ""))
    logger.info("backfill %s: %s", ask.id, message)
    return [*runs, *new_runs], BackfillRecord(**base, outcome=ActionOutcome.DONE, message=message,
                                              ticks=len(jobs), enqueued=len(added))


def tick_job(ctx: OperatorContext, spec: SyncScheduleSpec, uid: str, tick: datetime, *,
             origin: Origin | None = None) -> tuple[NewJob, int]:
    """One tick's job (deferred by the schedule's jitter, carrying the schedule as its origin) and how long its id
    stays refused."""
    run_at = tick + timedelta(seconds=jitter_offset(uid, spec.jitter_seconds))
    job = NewJob(tick_job_id(uid, tick), spec.job.function, spec.job.keyword_args, args=spec.job.args,
                 defer_until_ms=int(run_at.timestamp() * 1000), origin=origin)
    remember = tick_memory_ms(max(ctx.settings.tick_memory_seconds, spec.job.keep_result_seconds or 0),
                              LEASE_DURATION_SECONDS, spec.starting_deadline_seconds)
    return job, remember


def count_enqueue(ctx: OperatorContext, queue: str, job_id: str, tick: datetime, added: bool) -> None:
    if added:
        ctx.metrics.count_enqueued("schedule", queue)
        ctx.metrics.observe_tick_lag((ctx.now() - tick).total_seconds())  # from the tick to this enqueue
        logger.info("enqueued %s for the tick of %s", job_id, rfc3339(tick))
    else:
        ctx.metrics.count_duplicate_enqueue("schedule")
        logger.info("tick %s already enqueued (%s): refused as a duplicate", rfc3339(tick), job_id)


async def enqueue_tick(ctx: OperatorContext, spec: SyncScheduleSpec, uid: str, tick: datetime,
                       now: datetime, *, origin: Origin | None = None) -> ScheduleRun:
    """Enqueue one tick's job; a second enqueue of it is refused."""
    job, remember = tick_job(ctx, spec, uid, tick, origin=origin)
    ctx.ensure_leader()  # the fence: a replica that lost the Lease writes nothing
    count_enqueue(ctx, spec.job.queue, job.job_id, tick,
                  await ctx.enqueuer.enqueue(spec.job.queue, job, remember_ms=remember))
    return ScheduleRun(job_id=job.job_id, scheduled_time=tick, enqueued_time=now, outcome=RunOutcome.QUEUED)


async def fire_armed(ctx: OperatorContext, armed: Sequence[ArmedTick]) -> dict[str, datetime]:
    """Enqueue armed ticks, one script call per queue; returns when each tick's job id was handled (new
    or refused as already enqueued). A tick whose enqueue failed is left out: its full pass retries it."""
    groups: dict[tuple[str, int], list[ArmedTick]] = {}
    for tick in armed:
        groups.setdefault((tick.queue, tick.remember_ms), []).append(tick)
    fired: dict[str, datetime] = {}
    for (queue, remember), ticks in groups.items():
        ctx.ensure_leader()
        try:
            verdicts = await ctx.enqueuer.call((queue, remember), [tick.job for tick in ticks])  # no waiting to batch
        except TRANSIENT_ERRORS as error:
            ctx.metrics.count_error("enqueue")
            logger.warning("could not enqueue %d ticks on %s: %s; their passes retry", len(ticks), queue, error)
            continue
        moment = ctx.now()
        for tick, added in zip(ticks, verdicts, strict=True):
            count_enqueue(ctx, queue, tick.job.job_id, tick.tick, added)
            fired[tick.job.job_id] = moment
    return fired


async def write_status(ctx: OperatorContext, body: KubeObject, previous: SyncScheduleStatus,
                       status: SyncScheduleStatus) -> KubeObject | None:
    """Patch status through the subresource when it changed; returns the object as written, if it was."""
    if status == previous:
        return None
    metadata = body.get("metadata", {})
    document = status.model_dump(mode="json", by_alias=True)  # None values clear fields in a merge patch
    ctx.ensure_leader()
    try:
        written = await ctx.api.patch_status(SYNC_SCHEDULES, str(metadata.get("name")), document,
                                             namespace=str(metadata.get("namespace")), timeout=API_TIMEOUT)
    except ApiError as error:
        ctx.metrics.count_status_patch("SyncSchedule", "conflict" if error.code == 409 else "error")
        if is_transient(error):
            raise  # the status writer tries again
        logger.warning("status of %s/%s not written: %s", metadata.get("namespace"), metadata.get("name"), error)
        return None
    ctx.metrics.count_status_patch("SyncSchedule", "ok")
    return written
