"""Status conditions as Kubernetes API conventions define them (metav1.Condition)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import Field

from kubearq.core.contract import ApiModel


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(ApiModel):
    """One aspect of the resource's observed state."""

    type: Annotated[str, Field(min_length=1, max_length=316, pattern=r"^[A-Za-z][A-Za-z0-9_.-]*$")]
    """Condition type in CamelCase, e.g. `Ready` or `Succeeded`."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")]
    """Machine-readable reason in CamelCase, e.g. `InvalidSchedule`."""
    message: Annotated[str, Field(max_length=32_768)] = ""
    """Human-readable details."""
    last_transition_time: datetime
    """When the status last changed."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The `metadata.generation` this condition was computed from."""


Conditions = Annotated[
    list[Condition],
    Field(
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    ),
]


def set_condition(conditions: list[Condition], new: Condition) -> list[Condition]:
    """Put `new` in place of the condition of its type, keeping the transition time if status is unchanged."""
    for index, condition in enumerate(conditions):
        if condition.type == new.type:
            if condition.status == new.status:
                new = new.model_copy(update={"last_transition_time": condition.last_transition_time})
            return [*conditions[:index], new, *conditions[index + 1 :]]
    return [*conditions, new]
