"""What every reconciler is handed: the API, Redis, metrics, settings, the clock, the leader fence and the
status write budget."""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.asyncio import Redis

from kubearq.operator.batching import EnqueueBatcher, OutcomeReader
from kubearq.operator.kube import EVENTS, KubeApi, KubeObject, Resource, asks_to_slow_down
from kubearq.operator.metrics import OperatorMetrics
from kubearq.operator.resources import GROUP, VERSION
from kubearq.operator.settings import OperatorSettings
from kubearq.operator.tenancy import TenancyState
from kubearq.operator.writer import WriteBudget

logger = logging.getLogger(__name__)
SYNC_SCHEDULES = Resource(GROUP, VERSION, "syncschedules")
SCRAPE_REQUESTS = Resource(GROUP, VERSION, "scraperequests")
QUEUE_POLICIES = Resource(GROUP, VERSION, "queuepolicies")
NAMESPACES = Resource("", "v1", "namespaces")
FINALIZER = "kubearq.dev/cleanup"
FIELD_MANAGER = "kubearq-operator"
API_TIMEOUT = 10.0


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class OperatorContext:
    api: KubeApi
    redis: Redis
    metrics: OperatorMetrics
    settings: OperatorSettings
    ensure_leader: Callable[[], None]
    """Raises unless this replica leads right now: called right before every write."""
    now: Callable[[], datetime.datetime] = field(default=utc_now)
    served_cache: dict[str, tuple[float, asyncio.Future[set[str]]]] = field(default_factory=dict)
    """Functions served per queue, with when they were read (see schedules.served_functions)."""
    spec_cache: dict[tuple[str, int], object] = field(default_factory=dict)
    """Validated specs by (uid, generation)."""
    tenancy: TenancyState = field(default_factory=TenancyState.open)
    """What each namespace may enqueue (QueuePolicies); open when none is watched (unit tests, TENANCY=open)."""
    enqueuer: EnqueueBatcher = field(init=False)
    """Enqueues of many schedules due together, one script call per queue."""
    outcomes: OutcomeReader = field(init=False)
    """Run outcomes of many schedules, one pipeline per queue."""
    status_budget: WriteBudget = field(init=False)
    """Every status write spends a token (STATUS_WRITE_QPS, STATUS_WRITE_BURST); a 429 slows it down."""

    def __post_init__(self) -> None:
        self.enqueuer = EnqueueBatcher(self.redis)
        self.outcomes = OutcomeReader(self.redis)
        self.status_budget = WriteBudget(self.settings.status_write_qps, self.settings.status_write_burst,
                                         on_rate=self.metrics.set_status_write_rate)

    async def post_event(self, obj: KubeObject, reason: str, message: str, *, warning: bool = False) -> None:
        """A Kubernetes Event on the resource (what `kubectl describe` shows)."""
        metadata = obj.get("metadata", {})
        namespace = str(metadata.get("namespace", "default"))
        moment = rfc3339(self.now())
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{metadata.get('name', 'kubearq')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": metadata.get("name"),
                "namespace": namespace, "uid": metadata.get("uid"),
                "resourceVersion": metadata.get("resourceVersion"),
            },
            "reason": reason, "message": message[:1024], "type": "Warning" if warning else "Normal",
            "firstTimestamp": moment, "lastTimestamp": moment, "count": 1,
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
        }
        sent_at = self.status_budget.now()
        try:
            await self.api.create(EVENTS, event, namespace=namespace, timeout=API_TIMEOUT)
        except Exception as error:  # an Event is a courtesy: never let it break reconciliation
            self.metrics.count_error("post_event")
            if asks_to_slow_down(error):  # the same ServiceAccount's flow: the status writes slow down too
                self.status_budget.throttled(sent_at, getattr(error, "retry_after", None), str(error))
            logger.warning("could not post event %s on %s/%s: %s", reason, namespace,
                                                metadata.get("name"), error)
