"""The SyncSchedule resource: a cron that enqueues ARQ jobs, exactly once per tick."""

from __future__ import annotations

import json
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Self

from pydantic import AfterValidator, ConfigDict, Field, JsonValue, WithJsonSchema, model_validator

from kubearq.core.contract import DEFAULT_QUEUE, OPERATOR_ONLY_FUNCTIONS, OPERATOR_ONLY_MESSAGE, ApiModel
from kubearq.operator.actions import BackfillRecord, TriggerRecord
from kubearq.operator.conditions import Conditions
from kubearq.operator.cron import check_schedule, check_time_zone
from kubearq.operator.resources import PrinterColumn, ResourceKind

MAX_JOB_ARGUMENTS = 64
MAX_JOB_ARGUMENT_BYTES = 64 * 1024
MAX_RUNS_HISTORY = 100
MAX_ACTIVE = 100
STARTING_DEADLINE_MESSAGE = "startingDeadlineSeconds must be at least 10 when set"
JITTER_MESSAGE = "jitterSeconds must be less than startingDeadlineSeconds, or jittered ticks would count as missed"

JobArgs = Annotated[
    list[JsonValue],
    Field(max_length=MAX_JOB_ARGUMENTS),
    WithJsonSchema({
        "type": "array",
        "maxItems": MAX_JOB_ARGUMENTS,
        "items": {"x-kubernetes-preserve-unknown-fields": True},
    }),
]
JobKwargs = Annotated[
    dict[str, JsonValue],
    Field(max_length=MAX_JOB_ARGUMENTS),
    WithJsonSchema({
        "type": "object",
        "maxProperties": MAX_JOB_ARGUMENTS,
        "x-kubernetes-preserve-unknown-fields": True,
    }),
]


FUNCTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_function_name(name: str) -> str:
    if not FUNCTION_NAME.match(name):
        raise ValueError(
            f"{name!r} is not a worker function name; use the name the worker registers, e.g. 'sync_connections'"
        )
    if name in OPERATOR_ONLY_FUNCTIONS:
        raise ValueError(OPERATOR_ONLY_MESSAGE)
    return name


class ConcurrencyPolicy(StrEnum):
    """What to do when a tick comes while the previous run is still queued or running."""

    ALLOW = "Allow"
    FORBID = "Forbid"
    REPLACE = "Replace"


class RunOutcome(StrEnum):
    QUEUED = "Queued"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    ABORTED = "Aborted"


class RunTrigger(StrEnum):
    """What made a run: a tick of the schedule, a manual trigger, or a backfill of past ticks."""

    SCHEDULED = "Scheduled"
    MANUAL = "Manual"
    BACKFILL = "Backfill"


class JobTemplate(ApiModel):
    """The ARQ job enqueued on every tick."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": " && ".join(f"self.function != '{name}'" for name in OPERATOR_ONLY_FUNCTIONS),
         "message": OPERATOR_ONLY_MESSAGE},
    ]})

    function: Annotated[
        str,
        Field(min_length=1, max_length=128, json_schema_extra={"pattern": FUNCTION_NAME.pattern}),
        AfterValidator(check_function_name),
    ]
    """The name of a function your workers serve (registered in their `functions`)."""
    args: JobArgs = []
    """Positional arguments (any JSON values)."""
    # Named apart from its wire name: pydantic's mypy plugin reserves `kwargs` for the generated __init__.
    keyword_args: Annotated[JobKwargs, Field(alias="kwargs")] = {}
    """Keyword arguments (any JSON values)."""
    queue: Annotated[str, Field(min_length=1, max_length=128)] = DEFAULT_QUEUE
    """ARQ queue name the job is enqueued on."""
    timeout_seconds: Annotated[int, Field(ge=1, le=86_400)] | None = None
    """Per-job timeout; the worker's default when unset."""
    max_tries: Annotated[int, Field(ge=1, le=100)] | None = None
    """Tries before the job fails for good; the worker's default when unset."""
    keep_result_seconds: Annotated[int, Field(ge=0, le=30 * 86_400)] | None = None
    """How long a tick's job id stays refused after its enqueue (at least the operator's floor: lease duration
    plus catch-up window); how long ARQ keeps the result itself is the worker's KEEP_RESULT."""

    @model_validator(mode="after")
    def _arguments_fit(self) -> Self:
        size = len(json.dumps([self.args, self.keyword_args]))
        if size > MAX_JOB_ARGUMENT_BYTES:
            raise ValueError(
                f"args and kwargs take {size} bytes as JSON, at most {MAX_JOB_ARGUMENT_BYTES} fit; "
                "pass a reference (a key, a URL) instead of the data"
            )
        return self


class SyncScheduleSpec(ApiModel):
    """Enqueue `job` on every tick of `schedule` in `timeZone`."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "!has(self.startingDeadlineSeconds) || self.startingDeadlineSeconds >= 10",
         "message": STARTING_DEADLINE_MESSAGE},
        {"rule": "!has(self.startingDeadlineSeconds) || self.jitterSeconds < self.startingDeadlineSeconds",
         "message": JITTER_MESSAGE},
    ]})

    schedule: Annotated[str, Field(min_length=1, max_length=128), AfterValidator(check_schedule)]
    """Cron expression (5 fields) or a macro: `@yearly`, `@monthly`, `@weekly`, `@daily`, `@hourly`."""
    time_zone: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(check_time_zone)] = "UTC"
    """IANA time zone the schedule is read in, e.g. `Europe/Berlin`."""
    suspend: bool = False
    """Stop enqueueing new runs; runs already queued are not touched."""
    job: JobTemplate
    """The job enqueued on every tick."""
    concurrency_policy: ConcurrencyPolicy = ConcurrencyPolicy.ALLOW
    """Allow overlapping runs, Forbid (skip the tick while a run is queued or running) or Replace it."""
    starting_deadline_seconds: Annotated[int, Field(le=7 * 86_400)] | None = None
    """After downtime, missed ticks younger than this are enqueued once each; older ones are skipped."""
    jitter_seconds: Annotated[int, Field(ge=0, le=3600)] = 0
    """Delay each run by up to this many seconds (stable per schedule) to spread load."""
    successful_runs_history_limit: Annotated[int, Field(ge=0, le=MAX_RUNS_HISTORY)] = 3
    """Finished successful runs kept in status."""
    failed_runs_history_limit: Annotated[int, Field(ge=0, le=MAX_RUNS_HISTORY)] = 1
    """Failed or aborted runs kept in status."""

    @model_validator(mode="after")
    def _deadline_and_jitter(self) -> Self:
        deadline = self.starting_deadline_seconds
        if deadline is not None and deadline < 10:
            raise ValueError(STARTING_DEADLINE_MESSAGE)
        if deadline is not None and self.jitter_seconds >= deadline:
            raise ValueError(JITTER_MESSAGE)
        return self


class ScheduleRun(ApiModel):
    """One enqueued tick and what became of it."""

    job_id: Annotated[str, Field(min_length=1, max_length=256)]
    """The ARQ job id (derived from the schedule's uid and the tick time)."""
    scheduled_time: datetime
    """The tick this run belongs to."""
    enqueued_time: datetime | None = None
    """When the job was put on the queue."""
    outcome: RunOutcome = RunOutcome.QUEUED
    """Queued, Running, Succeeded, Failed or Aborted."""
    finish_time: datetime | None = None
    """When the job finished."""
    error: Annotated[str, Field(max_length=1024)] | None = None
    """The job's error, shortened."""
    trigger: RunTrigger = RunTrigger.SCHEDULED
    """Scheduled (a tick), Manual (`kubearq schedule trigger`) or Backfill (`kubearq schedule backfill`)."""


class SyncScheduleStatus(ApiModel):
    """Observed state of a SyncSchedule."""

    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The `metadata.generation` this status was computed from."""
    conditions: Conditions = []
    """`Ready` is True while the schedule is valid, not suspended and its function is served."""
    last_schedule_time: datetime | None = None
    """The last tick that was enqueued (or skipped by policy); a new leader resumes after it."""
    next_schedule_time: datetime | None = None
    """The next tick."""
    active: Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=MAX_ACTIVE)] = []
    """Ids of runs queued or running (the newest 100 are tracked)."""
    active_count: Annotated[int, Field(ge=0)] = 0
    """Number of tracked runs queued or running (the `Active` column)."""
    runs: Annotated[list[ScheduleRun], Field(max_length=2 * MAX_RUNS_HISTORY + MAX_ACTIVE)] = []
    """Recent runs, newest first, within the history limits."""
    skipped_ticks: Annotated[int, Field(ge=0)] = 0
    """Ticks skipped by `concurrencyPolicy: Forbid`."""
    missed_ticks: Annotated[int, Field(ge=0)] = 0
    """Ticks missed for longer than `startingDeadlineSeconds` (e.g. during downtime)."""
    last_trigger: TriggerRecord | None = None
    """The last `kubearq.dev/trigger` ask handled: its id (a repeat does nothing), outcome and job id."""
    last_backfill: BackfillRecord | None = None
    """The last `kubearq.dev/backfill` ask handled: its id (a repeat does nothing), window and counts."""


SYNC_SCHEDULE = ResourceKind(
    kind="SyncSchedule",
    plural="syncschedules",
    short_names=("ss", "syncsched"),
    description="A cron schedule that enqueues an ARQ job on every tick, exactly once, from one elected leader.",
    spec_model=SyncScheduleSpec,
    status_model=SyncScheduleStatus,
    printer_columns=(
        PrinterColumn("Schedule", "string", ".spec.schedule", "Cron expression"),
        PrinterColumn("Suspend", "boolean", ".spec.suspend", "Whether new runs are stopped"),
        PrinterColumn("Last Schedule", "date", ".status.lastScheduleTime", "Last tick enqueued"),
        # "date" columns print as an age, and a future time as <invalid>: show the next tick as text.
        PrinterColumn("Next", "string", ".status.nextScheduleTime", "Next tick (RFC 3339)"),
        PrinterColumn("Active", "integer", ".status.activeCount", "Runs queued or running"),
        PrinterColumn("Age", "date", ".metadata.creationTimestamp", "Time since creation"),
    ),
)
