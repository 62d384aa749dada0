"""Imperative actions on the custom resources, asked for by annotation and carried out by the leader.

`kubearq schedule trigger|backfill`, `kubearq scrape cancel` and the dashboard all ask the same way: they patch
an annotation onto the object, which needs only `patch` on that resource in the caller's own RBAC (the dashboard
checks the caller's rights with a SubjectAccessReview first and patches as the operator). The value is a JSON
object with a request `id` unique per ask; the leader acts on an id once, records it in the object's status, and
leaves the annotation in place (removing it would be a second write, and a repeated id is a no-op anyway).
Suspending and resuming a schedule are plain spec changes (`spec.suspend`), as for a CronJob.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, TypeVar, overload

from pydantic import AwareDatetime, Field, ValidationError, WithJsonSchema

from kubearq.core.contract import ApiModel

TRIGGER_ANNOTATION = "kubearq.dev/trigger"
"""On a SyncSchedule: enqueue one run now, honouring `concurrencyPolicy`, recorded as a manual run."""
BACKFILL_ANNOTATION = "kubearq.dev/backfill"
"""On a SyncSchedule: enqueue each tick of a past window once (deterministic job ids: a repeat does nothing)."""
CANCEL_ANNOTATION = "kubearq.dev/cancel"
"""On a ScrapeRequest: stop it; pages not yet fetched are taken off the queue, what was stored stays."""
ACTION_ANNOTATIONS = (TRIGGER_ANNOTATION, BACKFILL_ANNOTATION, CANCEL_ANNOTATION)
MAX_BACKFILL_TICKS = 1000
"""A backfill enqueues at most this many ticks at once; a longer window is refused (split it)."""


class Ask(ApiModel):
    """What an action annotation holds."""

    id: str = Field(min_length=1, max_length=64)
    """Unique per ask: the leader acts on each id once."""
    requested_at: AwareDatetime
    """When it was asked for."""
    requested_by: str | None = Field(default=None, max_length=256)
    """Who asked (the dashboard's authenticated user, or the CLI's user when known)."""


class BackfillAsk(Ask):
    """A backfill window: every tick in [from, to) is enqueued once."""

    start: AwareDatetime = Field(alias="from")
    end: AwareDatetime = Field(alias="to")


A = TypeVar("A", bound=Ask)


def new_ask_id(now: datetime | None = None) -> str:
    """A request id: the time it was asked plus randomness, so ids sort by time and never collide."""
    moment = now or datetime.now(UTC)
    return f"{moment.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"


def annotation_patch(annotation: str, ask: Ask) -> dict[str, Any]:
    """The merge patch that asks for an action."""
    value = json.dumps(ask.model_dump(mode="json", by_alias=True, exclude_none=True), separators=(",", ":"))
    return {"metadata": {"annotations": {annotation: value}}}


def suspend_patch(suspended: bool) -> dict[str, Any]:
    """The merge patch that suspends (or resumes) a SyncSchedule."""
    return {"spec": {"suspend": suspended}}


@overload
def read_ask(annotations: Mapping[str, str] | None, annotation: str) -> Ask | str | None: ...
@overload
def read_ask(annotations: Mapping[str, str] | None, annotation: str, model: type[A]) -> A | str | None: ...
def read_ask(annotations: Mapping[str, str] | None, annotation: str, model: type[Ask] = Ask) -> Ask | str | None:
    """The ask an object's annotation holds, None when there is none, or a message saying why it is unreadable."""
    raw = (annotations or {}).get(annotation)
    if raw is None:
        return None
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(part) for part in item['loc']) or 'value'}: {item['msg']}"
                             for item in error.errors())
        return (f"annotation {annotation} is not a valid request ({problems}); write JSON like "
                f'{{"id": "...", "requestedAt": "2026-01-01T00:00:00Z"}}')


def unreadable_ask_id(raw: str) -> str:
    """The id an unreadable ask is recorded under (it has none of its own): the same text, the same id, so
    it is refused once."""
    return f"unreadable-{hashlib.sha256(raw.encode()).hexdigest()[:16]}"


def ask_id_of(annotations: Mapping[str, str] | None, annotation: str, model: type[Ask] = Ask) -> str | None:
    """The id an ask is handled under: its own, or for an unreadable one `unreadable_ask_id`; None without one."""
    raw = (annotations or {}).get(annotation)
    if raw is None:
        return None
    ask = read_ask(annotations, annotation, model)
    return ask.id if isinstance(ask, Ask) else unreadable_ask_id(raw)


class ActionOutcome(StrEnum):
    """What the leader made of an ask."""

    DONE = "Done"
    REFUSED = "Refused"


class ActionRecord(ApiModel):
    """An ask the leader handled: it acts on each id once, and a repeated id finds it here and does nothing."""

    id: Annotated[str, Field(min_length=1, max_length=64)]
    """The ask's id (from the annotation)."""
    # Inline, not a $ref: two record kinds sharing the enum's list came out of the CRD generator as a YAML alias.
    outcome: Annotated[ActionOutcome, WithJsonSchema({"type": "string", "enum": [o.value for o in ActionOutcome]})]
    """Done, or Refused (the message says why)."""
    message: Annotated[str, Field(max_length=1024)] = ""
    """What was done, or why not."""
    handled_time: datetime
    """When the leader handled it."""
    requested_by: Annotated[str, Field(max_length=256)] | None = None
    """Who asked, as the ask said."""


class TriggerRecord(ActionRecord):
    """A manual run asked for with `kubearq.dev/trigger`."""

    job_id: Annotated[str, Field(max_length=256)] | None = None
    """The run's ARQ job id (deterministic per ask id), when one was enqueued."""


class BackfillRecord(ActionRecord):
    """A backfill asked for with `kubearq.dev/backfill`."""

    start: datetime | None = Field(default=None, alias="from")
    """The window's start (inclusive)."""
    end: datetime | None = Field(default=None, alias="to")
    """The window's end (exclusive)."""
    ticks: Annotated[int, Field(ge=0)] = 0
    """Ticks of the schedule in the window."""
    enqueued: Annotated[int, Field(ge=0)] = 0
    """Of them, enqueued now; the others were enqueued before (by the schedule or an earlier backfill)."""


class CancelRecord(ActionRecord):
    """A cancellation asked for with `kubearq.dev/cancel`."""

    removed: Annotated[int, Field(ge=0)] = 0
    """Jobs taken off the queue before they ran."""
    aborted: Annotated[int, Field(ge=0)] = 0
    """Running jobs asked to stop."""
