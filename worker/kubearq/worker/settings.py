"""Worker configuration from the environment (and CLI flags), validated once at start."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Self
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kubearq.core.connections import check_redis_url
from kubearq.core.contract import DEFAULT_QUEUE, NAMESPACE_NAME, check_http_url
from kubearq.core.observability import check_log_level


def check_database_url(url: str) -> str:
    scheme = urlsplit(url).scheme
    if scheme not in ("postgresql", "postgres"):
        raise ValueError("DATABASE_URL must be a postgresql:// URL, e.g. postgresql://user:password@db:5432/kubearq")
    return url




def check_namespace_list(names: str) -> str:
    """ALLOWED_NAMESPACES as one canonical comma-separated list; every entry a namespace name."""
    entries = [name.strip() for name in names.split(",") if name.strip()]
    for name in entries:
        if not NAMESPACE_NAME.match(name):
            raise ValueError(f"{name!r} is not a namespace name (lower-case letters, digits and '-', at most 63 "
                             "characters); ALLOWED_NAMESPACES takes names separated by commas, e.g. team-a,team-b")
    return ",".join(dict.fromkeys(entries))


class WorkerSettings(BaseSettings):
    """Everything `kubearq worker` can be told; environment names are the upper-case field names."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", frozen=True,
                                      env_ignore_empty=True,  # VAR= is unset, as a chart may render it
                                      use_attribute_docstrings=True)

    redis_url: Annotated[str, AfterValidator(check_redis_url)] = "redis://localhost:6379/0"
    """Redis to take jobs from; `rediss://` verifies the server's certificate and host name."""
    redis_ca_file: Path | None = None
    """CA bundle for `rediss://` (the system's trust store when unset)."""
    redis_tls_insecure: bool = False
    """Skip certificate and host-name verification for `rediss://` (never in production)."""
    database_url: Annotated[str, AfterValidator(check_database_url)] | None = Field(default=None, repr=False)
    """PostgreSQL for scrape results and sync tables; without it the built-in scrape and sync jobs are not served."""
    database_connect_timeout: Annotated[float, Field(gt=0, le=3600)] = 60.0
    """Seconds a starting worker waits for PostgreSQL before giving up (and the pod restarts)."""
    allow_newer_schema: bool = False
    """Start even though a newer kubearq migrated the database (for a deliberate rollback of the workers)."""
    firecrawl_secrets_dir: Path | None = None
    """Directory of Firecrawl API keys the chart mounts from Secrets: `<namespace>/<secret name>/<key>` is the
    key a ScrapeRequest in that namespace names in `firecrawl.apiKeySecretRef`."""
    firecrawl_api_key: SecretStr | None = Field(default=None, repr=False)
    """One Firecrawl API key for requests of every namespace, sent only to FIRECRAWL_API_URL."""
    firecrawl_api_url: Annotated[str, AfterValidator(check_http_url)] = "https://api.firecrawl.dev"
    """The Firecrawl API that FIRECRAWL_API_KEY belongs to."""
    sync_secrets_dir: Path | None = None
    """Directory of the sync connections' credentials the chart mounts from Secrets: a connection's
    `credentials_ref` `<secret name>/<key>` is the file read (a bare token, or JSON with access_token and
    refresh_token)."""
    sync_request_timeout: Annotated[float, Field(gt=0, le=600)] = 30.0
    """Seconds one request of a sync job to an ad platform may take (a hung platform fails the try)."""
    queue: Annotated[str, Field(min_length=1, max_length=128)] = DEFAULT_QUEUE
    """ARQ queue to serve."""
    allowed_namespaces: Annotated[str, AfterValidator(check_namespace_list)] = ""
    """Comma-separated namespaces whose jobs this worker runs (a job names the namespace and resource it was enqueued
    for); a job from another namespace, or naming none, fails at once without a retry. Unset: jobs from anywhere. A
    guard against mistakes and stray writers, not against whoever can write to Redis (an origin is what the job's
    writer says it is)."""
    max_jobs: Annotated[int, Field(ge=1, le=10_000)] = 16
    """Jobs run at once by this process."""
    job_timeout: Annotated[float, Field(gt=0, le=86_400)] = 300.0
    """Seconds a job may run (a function's own timeout wins)."""
    keep_result: Annotated[float, Field(ge=0, le=30 * 86_400)] = 3600.0
    """Seconds results are kept in Redis (the operator reads schedule outcomes from them)."""
    failed_jobs_retention_days: Annotated[float, Field(gt=0, le=3650)] = 14.0
    """Days a job that failed for good is kept (with each try's error, to re-drive or discard), long after
    KEEP_RESULT: in PostgreSQL, or without DATABASE_URL in Redis; older ones are pruned."""
    failed_jobs_redis_cap: Annotated[int, Field(ge=1, le=100_000)] = 1000
    """Without DATABASE_URL, failed jobs are kept in Redis: at most this many, the newest."""
    pod_name: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    """The worker's name in the failed jobs it keeps (the chart may set it from the downward API); default: the host
    name, which in Kubernetes is the pod's name."""
    max_tries: Annotated[int, Field(ge=1, le=100)] = 5
    """Tries per job before it fails for good (a function's own setting wins)."""
    poll_delay: Annotated[float, Field(gt=0, le=10)] = 0.05
    """Seconds between queue reads while idle; busy workers read again at once."""
    queue_read_limit: Annotated[int, Field(ge=1, le=100_000)] | None = None
    """Due job ids read per poll (default: max(1000, 20 * max_jobs)); running jobs sit at the queue's head,
    so a limit below replicas * max_jobs starves new replicas."""
    retry_backoff: Annotated[float, Field(gt=0, le=3600)] = 1.0
    """Seconds before the first retry of a failed job; doubled per try, with jitter."""
    retry_backoff_max: Annotated[float, Field(gt=0, le=86_400)] = 300.0
    """Longest wait between two tries."""
    shutdown_grace: Annotated[float, Field(ge=0, le=3600)] = 25.0
    """On SIGTERM, seconds running jobs may finish before they are put back on the queue."""
    heartbeat_interval: Annotated[float, Field(gt=0, le=60)] = 5.0
    """Seconds between refreshes of a running job's in-progress mark."""
    in_progress_ttl: Annotated[float, Field(gt=0, le=300)] = 20.0
    """Lifetime of an in-progress mark: an orphan of a killed worker runs again after at most this."""
    health_check_interval: Annotated[float, Field(gt=0, le=3600)] = 10.0
    """Seconds between health records in Redis (ARQ's `<queue>:health-check`)."""
    http_port: Annotated[int, Field(ge=0, le=65_535)] = 8080
    """Port of /metrics, /healthz and /readyz (0: a free port)."""
    http_host: str = "0.0.0.0"  # noqa: S104 - a pod serves probes and metrics on its own IP
    """Address the metrics and health server binds."""
    settings: Annotated[str, Field(pattern=r"^[\w.]+:[\w.]+$")] | None = None
    """Import path of the user's ARQ WorkerSettings (`module:Class`), whose functions are served too."""
    log_level: Annotated[str, AfterValidator(check_log_level)] = "INFO"
    """Python logging level: DEBUG, INFO, WARNING or ERROR."""
    log_format: Literal["json", "text"] = "json"
    """`json`: one JSON object per line, for log collectors; `text`: plain lines for a person at a terminal."""

    @model_validator(mode="after")
    def _timing_consistent(self) -> Self:
        if self.heartbeat_interval * 2 > self.in_progress_ttl:
            raise ValueError(
                f"HEARTBEAT_INTERVAL ({self.heartbeat_interval}) must be at most half of IN_PROGRESS_TTL "
                f"({self.in_progress_ttl}), or a slow heartbeat lets a running job be taken twice"
            )
        if self.retry_backoff_max < self.retry_backoff:
            raise ValueError("RETRY_BACKOFF_MAX must be at least RETRY_BACKOFF")
        return self

    @property
    def namespaces_allowed(self) -> frozenset[str]:
        """ALLOWED_NAMESPACES as a set; empty when every namespace is allowed."""
        return frozenset(self.allowed_namespaces.split(",")) - {""}

    @property
    def read_limit(self) -> int:
        return self.queue_read_limit or max(1000, 20 * self.max_jobs)
