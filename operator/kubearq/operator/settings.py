"""Operator configuration from the environment, validated once at start."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Self
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kubearq.core.connections import check_redis_url
from kubearq.core.observability import check_log_level


def check_postgresql_url(url: str) -> str:
    if urlsplit(url).scheme not in ("postgresql", "postgres"):
        raise ValueError("DASHBOARD_DATABASE_URL must be a postgresql:// URL, e.g. postgresql://user:password@db/kubearq")
    return url


class OperatorSettings(BaseSettings):
    """Everything `kubearq operator` can be told; environment names are the upper-case field names."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", frozen=True,
                                      env_ignore_empty=True,  # VAR= is unset, as a chart may render it
                                      use_attribute_docstrings=True)

    redis_url: Annotated[str, AfterValidator(check_redis_url)] = "redis://localhost:6379/0"
    """Redis the jobs are enqueued on (the workers' Redis); `rediss://` verifies the certificate and host name."""
    redis_ca_file: Path | None = None
    """CA bundle for `rediss://` (the system's trust store when unset)."""
    redis_tls_insecure: bool = False
    """Skip certificate and host-name verification for `rediss://` (never in production)."""
    namespace: Annotated[str, Field(max_length=4096)] = ""
    """Watch only these namespaces, comma-separated (default: all namespaces)."""
    lease_name: str = "kubearq-operator"
    """Name of the coordination.k8s.io Lease the replicas elect a leader on."""
    lease_namespace: str | None = None
    """Namespace of the Lease (default: POD_NAMESPACE, else `default`)."""
    lease_duration: Annotated[int, Field(ge=2, le=3600)] = 15
    """Seconds a standby waits after it last saw the Lease renewed before it takes over (client-go's 15)."""
    lease_renew_deadline: Annotated[float, Field(gt=0, le=3600)] = 10.0
    """Seconds the leader keeps trying to renew before it stops leading (client-go's 10)."""
    lease_retry_period: Annotated[float, Field(gt=0, le=600)] = 2.0
    """Seconds between renewals, and between a standby's looks at the Lease (client-go's 2)."""
    tenancy: Literal["open", "namespaced", "policy"] = "namespaced"
    """What a namespace without a QueuePolicy may enqueue: `namespaced` only queues `<namespace>:*` (and, for
    ScrapeRequests, the built-in scrape queue), `policy` nothing, `open` everything (a cluster of one team)."""
    status_interval: Annotated[float, Field(gt=0, le=3600)] = 5.0
    """At most one status patch per resource per this many seconds (progress is coalesced)."""
    status_write_qps: Annotated[float, Field(gt=0, le=10_000)] = 100.0
    """Status writes a second at most, SyncSchedules and ScrapeRequests together; what waits is coalesced (the
    newest status of each object wins) and no tick waits for it. As a ServiceAccount the operator's requests
    share API Priority and Fairness's `workload-low` level, which keeps 25 of a default API server's 600 seats
    even when it lends the rest (245 nominal): at ~25 ms a patch, 100/s holds ~2.5 of them. Raise it together
    with a FlowSchema of the operator's own. A 429 or Retry-After halves the rate for a while."""
    status_write_burst: Annotated[int, Field(ge=1, le=10_000)] = 200
    """Status writes sent at once after a quiet spell: the size of the token bucket, as client-go's Burst."""
    queues: Annotated[str, Field(max_length=4096)] = ""
    """Comma-separated queues to export metrics for besides those the resources name."""
    queue_stats_interval: Annotated[float, Field(gt=0, le=3600)] = 10.0
    """Seconds between refreshes of the per-queue metrics."""
    tick_memory_seconds: Annotated[int, Field(ge=60, le=30 * 86_400)] = 3600
    """How long an enqueued tick's id is remembered (refused again) at least; raised to cover the
    lease duration plus the schedule's catch-up window."""
    function_freshness_seconds: Annotated[int, Field(ge=10, le=86_400)] = 120
    """A function counts as served when a worker published it this recently."""
    http_host: str = "0.0.0.0"  # noqa: S104 - a pod serves probes and metrics on its own IP
    """Address the metrics and health server binds."""
    http_port: Annotated[int, Field(ge=0, le=65_535)] = 8080
    """Port of /metrics, /healthz and /readyz (0: a free port)."""
    log_level: Annotated[str, AfterValidator(check_log_level)] = "INFO"
    """Python logging level: DEBUG, INFO, WARNING or ERROR."""
    log_format: Literal["json", "text"] = "json"
    """`json`: one JSON object per line, for log collectors; `text`: plain lines for a person at a terminal."""
    dashboard_enabled: bool = False
    """Serve the web dashboard (kubearq.operator.console) on DASHBOARD_PORT; every user logs in with a Kubernetes bearer
    token and each view and action is authorized by that user's own RBAC (TokenReview, then SubjectAccessReview)."""
    dashboard_host: str = "0.0.0.0"  # noqa: S104 - reached through the operator's Service or a port-forward
    """Address the dashboard binds."""
    dashboard_port: Annotated[int, Field(ge=0, le=65_535)] = 8081
    """Port of the dashboard (0: a free port); not HTTP_PORT's: probes and metrics stay unauthenticated there."""
    dashboard_database_url: Annotated[str, AfterValidator(check_postgresql_url)] | None = Field(default=None,
                                                                                              repr=False)
    """PostgreSQL the workers keep failed jobs in (their DATABASE_URL), for the dashboard's failed-jobs view; unset:
    the capped Redis store the workers keep them in without DATABASE_URL."""
    dashboard_secure_cookie: bool | None = None
    """Mark the login cookie `Secure` (sent over HTTPS only); unset: when the request came over HTTPS, as the
    `X-Forwarded-Proto` of a TLS-terminating proxy says too."""
    dashboard_auth_cache_seconds: Annotated[float, Field(ge=0, le=300)] = 10.0
    """How long a token's TokenReview and each SubjectAccessReview answer are reused (0: ask every time); a revoked
    token or RoleBinding takes effect within this long."""

    @model_validator(mode="after")
    def _lease_timings_nest(self) -> Self:
        if not self.lease_duration > self.lease_renew_deadline > self.lease_retry_period * 1.2:
            raise ValueError(
                f"LEASE_DURATION ({self.lease_duration}) > LEASE_RENEW_DEADLINE ({self.lease_renew_deadline}) > "
                f"1.2 x LEASE_RETRY_PERIOD ({self.lease_retry_period}) must hold: the leader gives up before a "
                "standby may take over, and renews several times before it gives up")
        return self

    @property
    def watched_namespaces(self) -> list[str]:
        """The namespaces watched, in the order given; empty: all of them."""
        names = [name.strip() for name in self.namespace.split(",") if name.strip()]
        return list(dict.fromkeys(names))

    @property
    def extra_queues(self) -> set[str]:
        return {queue.strip() for queue in self.queues.split(",") if queue.strip()}
