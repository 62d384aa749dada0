"""The QueuePolicy resource (cluster-scoped): which namespaces may make the leader enqueue which functions on which
queues, and what their ScrapeRequests may ask for. A cluster admin writes them; see `tenancy.py` for the rules."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from kubearq.core.contract import ApiModel
from kubearq.operator.conditions import Conditions
from kubearq.operator.resources import PrinterColumn, ResourceKind

MAX_PATTERNS = 64
MAX_NAMESPACES = 256
# A glob: letters, digits and ARQ's usual separators, `*` for any run of characters, `?` for one.
GLOB = re.compile(r"^[A-Za-z0-9_.:*?/-]+$")
LABEL_KEY = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
             r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def check_glob(pattern: str) -> str:
    if not GLOB.match(pattern):
        raise ValueError(f"{pattern!r} is not a name or glob: letters, digits, '_', '.', ':', '/', '-', with * "
                         "for any characters and ? for one")
    return pattern


Glob = Annotated[str, Field(min_length=1, max_length=253, json_schema_extra={"pattern": GLOB.pattern}),
                 AfterValidator(check_glob)]
VALUES_MESSAGE = "In and NotIn need values; Exists and DoesNotExist take none"
SELECTOR_MESSAGE = "name the namespaces (names) or select them by label (matchLabels, matchExpressions)"
Name = Annotated[str, Field(min_length=1, max_length=63)]
LabelValue = Annotated[str, Field(max_length=63)]


class LabelRequirement(ApiModel):
    """One `matchExpressions` entry of a label selector, as Kubernetes writes them."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
         "message": VALUES_MESSAGE},
    ]})

    key: Annotated[str, Field(min_length=1, max_length=317, json_schema_extra={"pattern": LABEL_KEY})]
    """The label's key."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """In, NotIn, Exists or DoesNotExist."""
    values: Annotated[list[LabelValue], Field(max_length=64)] = []
    """The values for In and NotIn."""

    @model_validator(mode="after")
    def _values_match_operator(self) -> LabelRequirement:
        if (self.operator in ("In", "NotIn")) != bool(self.values):
            raise ValueError(VALUES_MESSAGE)
        return self


class NamespaceSelector(ApiModel):
    """Which namespaces a policy grants: listed by name, or chosen by their labels (either or both)."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "(has(self.names) && size(self.names) > 0) || has(self.matchLabels) || has(self.matchExpressions)",
         "message": SELECTOR_MESSAGE},
    ]})

    names: Annotated[list[Name], Field(max_length=MAX_NAMESPACES)] = []
    """Namespaces by name."""
    match_labels: Annotated[dict[str, LabelValue], Field(max_length=64)] | None = None
    """Namespaces whose labels include all of these."""
    match_expressions: Annotated[list[LabelRequirement], Field(max_length=16)] | None = None
    """Namespaces whose labels meet every one of these."""

    @model_validator(mode="after")
    def _selects_something(self) -> NamespaceSelector:
        if not self.names and self.match_labels is None and self.match_expressions is None:
            raise ValueError(SELECTOR_MESSAGE)
        return self


class ScrapeGrant(ApiModel):
    """What the granted namespaces' ScrapeRequests may ask for (no `scrapeRequests`: they may not scrape)."""

    allow_private_networks: bool = False
    """Whether they may set `fetch.allowPrivateNetworks: true` (reach private, loopback, metadata addresses)."""
    max_requests_per_minute: Annotated[int, Field(ge=1, le=100_000)] | None = None
    """The highest `rateLimit.requestsPerMinute` they may ask for (unset: any)."""


class QueuePolicySpec(ApiModel):
    """Grant the namespaces the right to have the leader enqueue `functions` on `queues`."""

    namespaces: NamespaceSelector
    """The namespaces granted."""
    queues: Annotated[list[Glob], Field(min_length=1, max_length=MAX_PATTERNS)]
    """Queues they may target, names or globs (`team-a:*`)."""
    functions: Annotated[list[Glob], Field(min_length=1, max_length=MAX_PATTERNS)] = ["*"]
    """Functions their SyncSchedules may name, names or globs (default: any; built-in destructive jobs never)."""
    scrape_requests: ScrapeGrant | None = None
    """Whether (and with what limits) their ScrapeRequests may run on those queues."""


class QueuePolicyStatus(ApiModel):
    """Observed state of a QueuePolicy."""

    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The `metadata.generation` this status was computed from."""
    conditions: Conditions = []
    """`Ready` is True once the leader applies the policy."""


QUEUE_POLICY = ResourceKind(
    kind="QueuePolicy",
    plural="queuepolicies",
    short_names=("qp",),
    description="Which namespaces may enqueue which functions on which queues (cluster-scoped, for cluster admins).",
    spec_model=QueuePolicySpec,
    status_model=QueuePolicyStatus,
    printer_columns=(
        PrinterColumn("Namespaces", "string", ".spec.namespaces.names", "Namespaces granted by name"),
        PrinterColumn("Queues", "string", ".spec.queues", "Queues they may target"),
        PrinterColumn("Functions", "string", ".spec.functions", "Functions they may name"),
        PrinterColumn("Age", "date", ".metadata.creationTimestamp", "Time since creation"),
    ),
    scope="Cluster",
)
