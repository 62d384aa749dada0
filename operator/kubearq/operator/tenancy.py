"""Whether a namespace may have the leader enqueue what a SyncSchedule or ScrapeRequest asks for: pure decisions
over the QueuePolicies and the namespaces' labels, checked before every enqueue.

RBAC says who may create a SyncSchedule; these say what it may run. A policy grants the namespaces it selects
the queues and functions it lists (and, for ScrapeRequests, what they may ask for); a request is permitted when
one policy grants all of it. Without a policy for a namespace, `TENANCY` decides: `namespaced` (the default)
lets it target only queues named for it (`<namespace>:*`) and, for ScrapeRequests, the built-in scrape queue;
`policy` lets it do nothing; `open` lets every namespace do everything (one team's cluster). Built-in jobs only
the operator enqueues (`delete_scrape_results`) are never permitted to a schedule.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from pydantic import ValidationError

from kubearq.core.contract import DEFAULT_QUEUE, OPERATOR_ONLY_FUNCTIONS, OPERATOR_ONLY_MESSAGE
from kubearq.operator.conditions import Condition, ConditionStatus, set_condition
from kubearq.operator.queuepolicy import LabelRequirement, NamespaceSelector, QueuePolicySpec, QueuePolicyStatus
from kubearq.operator.resources import describe_validation_error

logger = logging.getLogger(__name__)

NOT_PERMITTED = "NotPermitted"
STAYS = "nothing of it is enqueued (jobs it queued before stay queued)"


class TenancyMode(StrEnum):
    OPEN = "open"
    NAMESPACED = "namespaced"
    POLICY = "policy"


@dataclass(frozen=True)
class Policy:
    """A QueuePolicy as the leader applies it."""

    name: str
    spec: QueuePolicySpec


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    message: str = ""  # why not, naming the rule missing


ALLOWED = Verdict(True)


def selects(selector: NamespaceSelector, namespace: str, labels: Mapping[str, str]) -> bool:
    """Whether a policy's `namespaces` takes this namespace (listed by name, or its labels match)."""
    if namespace in selector.names:
        return True
    if selector.match_labels is None and selector.match_expressions is None:
        return False
    return (all(labels.get(key) == value for key, value in (selector.match_labels or {}).items())
            and all(_meets(requirement, labels) for requirement in selector.match_expressions or []))


def _meets(requirement: LabelRequirement, labels: Mapping[str, str]) -> bool:
    value = labels.get(requirement.key)
    match requirement.operator:
        case "In":
            return value in requirement.values
        case "NotIn":
            return value not in requirement.values
        case "Exists":
            return value is not None
    return value is None  # DoesNotExist


def matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def own_queues(namespace: str) -> str:
    return f"{namespace}:*"


def granting(policies: Sequence[Policy], namespace: str, labels: Mapping[str, str]) -> list[Policy]:
    return [policy for policy in policies if selects(policy.spec.namespaces, namespace, labels)]


def decide_schedule(namespace: str, labels: Mapping[str, str], queue: str, function: str,
                    policies: Sequence[Policy], mode: TenancyMode) -> Verdict:
    """May a SyncSchedule of `namespace` enqueue `function` on `queue`?"""
    if function in OPERATOR_ONLY_FUNCTIONS:
        return Verdict(False, f"{OPERATOR_ONLY_MESSAGE}; {STAYS}")
    if mode == TenancyMode.OPEN:
        return ALLOWED
    mine = granting(policies, namespace, labels)
    if any(matches(queue, p.spec.queues) and matches(function, p.spec.functions) for p in mine):
        return ALLOWED
    if not mine and mode == TenancyMode.NAMESPACED and fnmatch.fnmatchcase(queue, own_queues(namespace)):
        return ALLOWED
    what = f"namespace {namespace} may not enqueue {function} on queue {queue}"
    return Verdict(False, f"{what}: {_missing(mine, namespace, mode)}; {STAYS}")


def decide_scrape(namespace: str, labels: Mapping[str, str], queue: str, *, private_networks: bool,
                  requests_per_minute: int, policies: Sequence[Policy], mode: TenancyMode) -> Verdict:
    """May a ScrapeRequest of `namespace` run on `queue` with these settings?"""
    if mode == TenancyMode.OPEN:
        return ALLOWED
    mine = granting(policies, namespace, labels)
    if not mine:
        default_queue = queue == DEFAULT_QUEUE or fnmatch.fnmatchcase(queue, own_queues(namespace))
        if mode == TenancyMode.NAMESPACED and default_queue and not private_networks:
            return ALLOWED
        if mode == TenancyMode.NAMESPACED and default_queue:
            return Verdict(False, f"namespace {namespace} may not set fetch.allowPrivateNetworks: no QueuePolicy "
                                  f"grants namespace {namespace} (without one, private networks are refused); {STAYS}")
        return Verdict(False, f"namespace {namespace} may not scrape on queue {queue}: "
                              f"{_missing(mine, namespace, mode, scrape=True)}; {STAYS}")
    on_queue = [p for p in mine if p.spec.scrape_requests is not None and matches(queue, p.spec.queues)]
    if not on_queue:
        return Verdict(False, f"namespace {namespace} may not scrape on queue {queue}: "
                              f"{_missing(mine, namespace, mode, scrape=True)}; {STAYS}")
    for policy in on_queue:
        grant = policy.spec.scrape_requests
        assert grant is not None
        if (not private_networks or grant.allow_private_networks) and (
                grant.max_requests_per_minute is None or requests_per_minute <= grant.max_requests_per_minute):
            return ALLOWED
    names = ", ".join(p.name for p in on_queue)
    if private_networks and not any(p.spec.scrape_requests and p.spec.scrape_requests.allow_private_networks
                                    for p in on_queue):
        return Verdict(False, f"namespace {namespace} may not set fetch.allowPrivateNetworks: QueuePolicy {names} "
                              f"does not allow it (scrapeRequests.allowPrivateNetworks); {STAYS}")
    most = max((p.spec.scrape_requests.max_requests_per_minute or 0) for p in on_queue if p.spec.scrape_requests)
    return Verdict(False, f"namespace {namespace} may not ask for {requests_per_minute} requests per minute: "
                          f"QueuePolicy {names} allows at most {most} (scrapeRequests.maxRequestsPerMinute); {STAYS}")


def _missing(mine: Sequence[Policy], namespace: str, mode: TenancyMode, *, scrape: bool = False) -> str:
    if not mine:
        default = ("without one, a namespace may use only queues " + own_queues(namespace)
                   + (f" and {DEFAULT_QUEUE}" if scrape else "")) if mode == TenancyMode.NAMESPACED else \
            "TENANCY=policy: without one, a namespace may enqueue nothing"
        return f"no QueuePolicy grants namespace {namespace} ({default})"
    described = "; ".join(f"QueuePolicy {p.name} grants queues {', '.join(p.spec.queues)} and functions "
                          f"{', '.join(p.spec.functions)}" + ("" if p.spec.scrape_requests or not scrape
                                                               else " (no scrapeRequests)") for p in mine)
    return described


@dataclass
class TenancyState:
    """The policies and namespace labels the leader decides with, kept current by the watch."""

    mode: TenancyMode
    policies: dict[str, Policy]
    labels: dict[str, dict[str, str]]
    problems: dict[str, str] = field(default_factory=dict)
    """Why a QueuePolicy the API server took is ignored (its model refuses it), by name."""

    @classmethod
    def open(cls) -> TenancyState:
        return cls(TenancyMode.OPEN, {}, {})

    def schedule(self, namespace: str, queue: str, function: str) -> Verdict:
        return decide_schedule(namespace, self.labels.get(namespace, {}), queue, function,
                               sorted(self.policies.values(), key=lambda p: p.name), self.mode)

    def scrape(self, namespace: str, queue: str, *, private_networks: bool, requests_per_minute: int) -> Verdict:
        return decide_scrape(namespace, self.labels.get(namespace, {}), queue, private_networks=private_networks,
                             requests_per_minute=requests_per_minute,
                             policies=sorted(self.policies.values(), key=lambda p: p.name), mode=self.mode)

    def observe_policy(self, name: str, spec: object | None) -> None:
        """A QueuePolicy as watched (None: deleted; one the API server took but the model refuses is ignored)."""
        self.problems.pop(name, None)
        if spec is None:
            self.policies.pop(name, None)
            return
        try:
            self.policies[name] = Policy(name, QueuePolicySpec.model_validate(spec))
        except ValueError as error:
            self.problems[name] = describe_validation_error(error) if isinstance(error, ValidationError) \
                else str(error)
            logger.error("QueuePolicy %s is ignored: %s", name, self.problems[name])
            self.policies.pop(name, None)

    def observe_namespace(self, name: str, labels: Mapping[str, str] | None) -> bool:
        """A namespace's labels as watched (None: deleted); whether they changed."""
        before = self.labels.get(name)
        if labels is None:
            self.labels.pop(name, None)
        else:
            self.labels[name] = dict(labels)
        return before != self.labels.get(name)


APPLIED = "Applied"
INVALID = "Invalid"


def policy_status(body: Mapping[str, object], problem: str | None, now: datetime) -> dict[str, object] | None:
    """The status a QueuePolicy should show (`Ready`: applied, or ignored and why), or None if it shows it."""
    metadata = body.get("metadata")
    generation = metadata.get("generation") if isinstance(metadata, Mapping) else None
    try:
        current = QueuePolicyStatus.model_validate(body.get("status") or {})
    except ValueError:
        current = QueuePolicyStatus()
    observed = generation if isinstance(generation, int) else None
    ready = Condition(
        type="Ready", status=ConditionStatus.TRUE if problem is None else ConditionStatus.FALSE,
        reason=APPLIED if problem is None else INVALID,
        message="the leader checks every SyncSchedule and ScrapeRequest against it" if problem is None
        else f"ignored: {problem}",
        last_transition_time=now, observed_generation=observed)
    wanted = QueuePolicyStatus(observed_generation=observed, conditions=set_condition(current.conditions, ready))
    if wanted == current:
        return None
    return wanted.model_dump(mode="json", by_alias=True, exclude_none=True)
