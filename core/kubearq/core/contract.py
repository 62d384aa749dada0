"""The job contract shared by the operator and the worker: job names, their argument models.

The operator enqueues what the worker runs through these names and models alone. The scrape settings
below are also the `ScrapeRequest` spec's sub-objects, so one model describes the resource field and the
job argument.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal, Self
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

DEFAULT_QUEUE = "arq:queue"

# Bounds that keep every object far below etcd's ~1.5 MB limit and every CEL rule inside the
# API server's cost budget (the server prices an unbounded string or list at its worst).
MAX_NAME_LENGTH = 253
MAX_URL_LENGTH = 2048
MAX_SELECTOR_LENGTH = 1024
MAX_FIELDS = 64

SCRAPE_LISTING = "scrape_listing"
SCRAPE_DETAIL = "scrape_detail"
SYNC_CONNECTIONS = "sync_connections"
SYNC_CONNECTION = "sync_connection"
COMPACT_SNAPSHOTS = "compact_snapshots"
BUILTIN_FUNCTIONS = (SCRAPE_LISTING, SCRAPE_DETAIL, SYNC_CONNECTIONS, SYNC_CONNECTION, COMPACT_SNAPSHOTS)
TICK_JOB_PREFIX = "kubearq:tick:"  # a SyncSchedule tick's job id: kubearq:tick:<schedule uid>:<unix seconds>


class ApiModel(BaseModel):
    """Base of every resource and job model: camelCase on the wire, snake_case in Python.

    Unknown fields are ignored, as the API server prunes them; a docstring becomes the schema's
    description.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        use_attribute_docstrings=True,
        frozen=True,
    )


def check_http_url(url: str) -> str:
    """Accept only absolute http(s) URLs with a host: what a fetcher can and may fetch."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r} is not an http(s) URL; use a URL like 'https://example.com/events'")
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host; use a URL like 'https://example.com/events'")
    return url


HttpUrl = Annotated[
    str,
    # The API server checks the scheme by pattern; Python checks it (and the host) with a clearer message.
    Field(min_length=1, max_length=MAX_URL_LENGTH, json_schema_extra={"pattern": r"^[Hh][Tt][Tt][Pp][Ss]?://"}),
    AfterValidator(check_http_url),
]


def check_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{pattern!r} is not a valid regular expression: {error}") from None
    return pattern


@functools.lru_cache(maxsize=4096)  # every page job of a request carries the same selectors
def check_css_selector(selector: str) -> str:
    """Refuse selectors the HTML parser cannot parse, so a typo fails at apply time, not per page."""
    from selectolax.lexbor import LexborHTMLParser, SelectolaxError

    try:
        LexborHTMLParser("<html></html>").css(selector)
    except SelectolaxError:
        raise ValueError(f"{selector!r} is not a valid CSS selector; e.g. 'a.event-link' or 'h1'") from None
    return selector


_ATTRIBUTE = re.compile(r"^(?P<selector>.+?)\s*@(?P<attribute>[A-Za-z_:][-A-Za-z0-9_:.]*)$")


def split_field_selector(spec: str) -> tuple[str, str | None]:
    """`'time @datetime'` → (`'time'`, `'datetime'`); a selector alone takes the element's text."""
    match = _ATTRIBUTE.match(spec)
    if match:
        return match["selector"], match["attribute"]
    return spec, None


def check_field_selector(spec: str) -> str:
    selector, _ = split_field_selector(spec)
    check_css_selector(selector)
    return spec


class Backend(StrEnum):
    """Who fetches the pages: the built-in HTTP client or the Firecrawl scrape API."""

    HTTP = "Http"
    FIRECRAWL = "Firecrawl"


class LinkDiscovery(ApiModel):
    """How detail-page links are found on a listing page."""

    selector: Annotated[str, Field(min_length=1, max_length=MAX_SELECTOR_LENGTH), AfterValidator(
        check_css_selector)] = "a[href]"
    """CSS selector of the link elements (their `href` is taken)."""
    pattern: Annotated[str, Field(min_length=1, max_length=MAX_SELECTOR_LENGTH), AfterValidator(
        check_regex)] | None = None
    """Regular expression a link's absolute URL must match (searched, not anchored)."""
    same_site: bool = True
    """Follow only links on the listing page's own host."""
    max_detail_pages: Annotated[int, Field(ge=0, le=100_000)] = 1000
    """At most this many detail pages for the whole request."""


class JsonLdExtraction(ApiModel):
    """Extract schema.org JSON-LD items of these types (subtypes included: MusicEvent is an Event)."""

    types: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z][A-Za-z0-9]*$")]],
        Field(min_length=1, max_length=16),
    ] = ["Event"]
    """schema.org type names, e.g. `Event`, `Product`."""


class CssExtraction(ApiModel):
    """Extract one item per page: each field is a CSS selector, `selector @attr` for an attribute."""

    fields: Annotated[
        dict[
            Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")],
            Annotated[str, Field(min_length=1, max_length=MAX_SELECTOR_LENGTH), AfterValidator(
                check_field_selector)],
        ],
        Field(min_length=1, max_length=MAX_FIELDS),
    ]
    """Field name → CSS selector, e.g. `title: h1`, `start: time @datetime`."""


class Extraction(ApiModel):
    """What is extracted from a detail page: JSON-LD (the default) or CSS fields, not both."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [{
        "rule": "!(has(self.jsonLd) && has(self.css))",
        "message": "set one of jsonLd and css, not both",
    }]})

    json_ld: JsonLdExtraction | None = None
    """schema.org JSON-LD extraction (used when `css` is not set)."""
    css: CssExtraction | None = None
    """CSS selector extraction."""

    @model_validator(mode="after")
    def _one_mode(self) -> Self:
        if self.json_ld is not None and self.css is not None:
            raise ValueError("set one of jsonLd and css, not both")
        return self

    @property
    def effective_json_ld(self) -> JsonLdExtraction | None:
        """The JSON-LD settings in force: the default `Event` when neither mode is set."""
        if self.css is not None:
            return None
        return self.json_ld or JsonLdExtraction()


class RateLimit(ApiModel):
    """One request budget shared by every worker replica (a token bucket kept in Redis)."""

    requests_per_minute: Annotated[int, Field(ge=1, le=100_000)] = 60
    """Sustained rate across all workers."""
    burst: Annotated[int, Field(ge=1, le=10_000)] = 1
    """Requests that may go at once after a quiet spell (the bucket's size)."""
    per_host: bool = False
    """Keep a separate budget per target host instead of one per request."""


class RetryPolicy(ApiModel):
    """Tries per page, exponential backoff between them, and a per-try timeout that grows."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "self.maxBackoffSeconds >= self.backoffSeconds",
         "message": "maxBackoffSeconds must be at least backoffSeconds"},
        {"rule": "self.maxTimeoutSeconds >= self.timeoutSeconds",
         "message": "maxTimeoutSeconds must be at least timeoutSeconds"},
    ]})

    max_tries: Annotated[int, Field(ge=1, le=20)] = 3
    """Tries per page, the first included."""
    backoff_seconds: Annotated[int, Field(ge=1, le=3600)] = 5
    """Wait before the second try; doubled on each later one (with jitter)."""
    max_backoff_seconds: Annotated[int, Field(ge=1, le=86_400)] = 300
    """Longest wait between two tries."""
    timeout_seconds: Annotated[int, Field(ge=1, le=600)] = 30
    """Time allowed to the first try; doubled on each retry."""
    max_timeout_seconds: Annotated[int, Field(ge=1, le=3600)] = 120
    """Longest time allowed to one try."""

    @model_validator(mode="after")
    def _bounds_ordered(self) -> Self:
        if self.max_backoff_seconds < self.backoff_seconds:
            raise ValueError("maxBackoffSeconds must be at least backoffSeconds")
        if self.max_timeout_seconds < self.timeout_seconds:
            raise ValueError("maxTimeoutSeconds must be at least timeoutSeconds")
        return self


class FetchPolicy(ApiModel):
    """How pages are fetched: politeness and the limits that protect the cluster and the worker."""

    obey_robots_txt: bool = True
    """Skip URLs that the site's robots.txt disallows for our user agent."""
    allow_private_networks: bool = False
    """Allow private, loopback, link-local and cloud-metadata addresses (off: refused, on every hop)."""
    max_response_bytes: Annotated[int, Field(ge=1024, le=100 * 1024 * 1024)] = 5 * 1024 * 1024
    """Larger responses are cut off and the page fails."""
    user_agent: Annotated[str, Field(min_length=1, max_length=256)] = "kubearq (+https://kubearq.dev)"
    """User-Agent header, also the name robots.txt rules are matched against."""


class SecretKeyRef(ApiModel):
    """A key of a Secret in the resource's namespace."""

    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]
    """The Secret's name."""
    key: Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)] = "apiKey"
    """The key inside the Secret."""


class FirecrawlBackend(ApiModel):
    """The Firecrawl scrape API."""

    api_key_secret_ref: SecretKeyRef
    """Secret key holding the Firecrawl API key."""
    url: HttpUrl = "https://api.firecrawl.dev"
    """Base URL of the Firecrawl API (self-hosted instances differ)."""


class ScrapeSettings(ApiModel):
    """Everything a scrape job needs from its ScrapeRequest's spec, passed along with every job.

    The ScrapeRequest's spec is this model plus where the URLs come from (see the operator's
    scraperequest.py), so the resource's fields and the job's argument cannot drift apart.
    """

    links: LinkDiscovery = LinkDiscovery()
    """How detail links are found on a listing page."""
    extract: Extraction = Extraction(json_ld=JsonLdExtraction())
    """What is extracted from each detail page."""
    backend: Backend = Backend.HTTP
    """Http (the built-in fetcher) or Firecrawl."""
    firecrawl: FirecrawlBackend | None = None
    """Firecrawl settings; required when `backend` is Firecrawl."""
    rate_limit: RateLimit = RateLimit()
    """Request budget shared by every worker."""
    retry: RetryPolicy = RetryPolicy()
    """Tries, backoff and timeouts per page."""
    fetch: FetchPolicy = FetchPolicy()
    """robots.txt, network safety and response limits."""
    queue: Annotated[str, Field(min_length=1, max_length=128)] = DEFAULT_QUEUE
    """ARQ queue the scrape jobs go on."""


class RequestRef(ApiModel):
    """Which ScrapeRequest a job works for."""

    uid: Annotated[str, Field(min_length=1, max_length=64)]
    namespace: Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]
    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]


class PageJob(ApiModel):
    """The one keyword argument (`page`) of `scrape_listing` and `scrape_detail`."""

    request: RequestRef
    url: HttpUrl
    settings: ScrapeSettings


DELETE_SCRAPE_RESULTS = "delete_scrape_results"
# Built-in jobs only the operator may enqueue (destructive, or driven by a resource's lifecycle): no SyncSchedule
# and no QueuePolicy can name them.
OPERATOR_ONLY_FUNCTIONS = (DELETE_SCRAPE_RESULTS,)
OPERATOR_ONLY_MESSAGE = ("delete_scrape_results is enqueued by the operator alone (when a ScrapeRequest with "
                         "deletionPolicy: Delete is deleted), never by a schedule")


class ResultsDeletion(ApiModel):
    """The one keyword argument (`deletion`) of `delete_scrape_results`: whose stored results and failures go.

    The operator enqueues it when a ScrapeRequest with `deletionPolicy: Delete` is deleted, and removes
    its finalizer once the job's result says it succeeded; the job must be idempotent (it may run again).
    """

    request: RequestRef


# --- Origin: who enqueued a job -----------------------------------------------------------------------------
# Every job the operator enqueues carries the resource it comes from (field "o" of ARQ's payload, which ARQ
# ignores), and the jobs a job enqueues carry it on; a worker pool with ALLOWED_NAMESPACES refuses the others.


NAMESPACE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # an RFC 1123 label, as Kubernetes wants


class Origin(ApiModel):
    """The resource a job was enqueued for: `{"namespace": "team-a", "kind": "SyncSchedule", "name": "nightly"}`."""

    namespace: Annotated[str, Field(max_length=MAX_NAME_LENGTH)]
    kind: Annotated[str, Field(max_length=64)]
    name: Annotated[str, Field(max_length=MAX_NAME_LENGTH)]

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


ORIGIN_FIELD = "o"
CURRENT_ORIGIN: contextvars.ContextVar[Origin | None] = contextvars.ContextVar("kubearq_origin", default=None)
"""The origin of the job running in this task (set by the worker as it decodes the job)."""


def origin_of(payload: dict[str, object]) -> Origin | None:
    """The origin a decoded job payload carries, if any (a malformed one counts as none)."""
    found = payload.get(ORIGIN_FIELD)
    if not isinstance(found, dict):
        return None
    try:
        return Origin.model_validate(found)
    except ValueError:
        return None


@functools.lru_cache(maxsize=256)  # one per origin: a fan-out of 10,000 jobs dumps its origin once
def job_serializer(origin: Origin | None) -> Callable[[dict[str, object]], bytes]:
    """ARQ's `job_serializer` that stamps `origin` into each job it serializes."""
    if origin is None:
        return serialize
    stamp = origin.model_dump()
    return lambda job: serialize({**job, ORIGIN_FIELD: stamp})


# --- Wire format -------------------------------------------------------------------------------------
# Jobs and results are JSON, never pickle: whoever can write to Redis must not be able to run code in a
# worker (ARQ's default serializer is pickle). The operator reads results with the same codec.


def _encode_extra(value: object) -> object:
    if isinstance(value, BaseException):
        return {"error": f"{type(value).__name__}: {value}", "type": type(value).__name__}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    return repr(value)


def serialize(value: object) -> bytes:
    """ARQ `job_serializer`: JSON; exceptions (failed results) become `{"error": "Type: message"}`."""
    return json.dumps(value, default=_encode_extra, separators=(",", ":")).encode()


def deserialize(data: bytes) -> dict[str, object]:
    """ARQ `job_deserializer`; anything but a JSON object is refused (ARQ then fails the job)."""
    decoded = json.loads(data)
    if not isinstance(decoded, dict):
        raise ValueError(f"an ARQ job or result must be a JSON object, got {type(decoded).__name__}")
    return decoded


JOB_FIELDS = ("f", "a", "k", "t", "et")  # ARQ's job payload: function, args, kwargs, try, enqueue time (ms)
FIX_CLIENT = "enqueue with kubearq.client.create_pool (ARQ's ArqRedis, speaking kubearq's JSON)"


def undecodable_job(data: bytes) -> str | None:
    """Why a job payload is not one a kubearq worker can run, saying what to do instead; None if it is."""
    if data[:1] == b"\x80":  # pickle's PROTO opcode: ARQ's default serializer
        return ("it looks like a pickled ARQ job (a plain arq.create_pool pickles); kubearq workers take JSON "
                f"jobs only, never pickle: {FIX_CLIENT}")
    try:
        decoded = deserialize(data)
    except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"it is not JSON ({error}): {FIX_CLIENT}"
    missing = [name for name in JOB_FIELDS if name not in decoded]
    if missing:
        return f"it is JSON but not an ARQ job (no {', '.join(missing)}): {FIX_CLIENT}"
    return None


def tick_of_job(job_id: str) -> datetime | None:
    """The tick a SyncSchedule's job was enqueued for, read from its deterministic id; None for other jobs."""
    if not job_id.startswith(TICK_JOB_PREFIX):
        return None
    seconds = job_id.rpartition(":")[2]
    return datetime.fromtimestamp(int(seconds), UTC) if seconds.isdigit() else None


def job_id_for_page(request_uid: str, url: str) -> str:
    """Deterministic id: the same URL of one request is enqueued (and scraped) once."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:32]
    return f"kubearq:scrape:{request_uid}:{digest}"


def function_registry_key(queue: str) -> str:
    """Redis hash where workers publish the functions they serve on a queue (field: function name)."""
    return f"kubearq:functions:{queue}"


# --- Scrape progress -----------------------------------------------------------------------------------
# Workers count into Redis; the operator folds the counts into the ScrapeRequest's status.

PageKind = Literal["listing", "detail"]
PROGRESS_FIELDS = tuple(f"{kind}_{state}" for kind in ("listing", "detail")
                        for state in ("total", "done", "failed", "deferred"))
FAILURES_SHOWN = 20


def progress_key(request_uid: str) -> str:
    """Hash of counters `<listing|detail>_<total|done|failed|deferred>` for one ScrapeRequest."""
    return f"kubearq:progress:{request_uid}"


def failures_key(request_uid: str) -> str:
    """List of the first failed pages (JSON `{"url", "error", "tries"}`), at most FAILURES_SHOWN kept."""
    return f"kubearq:failures:{request_uid}"


def finished_key(request_uid: str) -> str:
    """Hash job id → outcome (`done`/`failed`) of every page counted, so a re-run counts nothing twice."""
    return f"kubearq:finished:{request_uid}"


def deferred_key(request_uid: str) -> str:
    """Set of the job ids counted in `<kind>_deferred` right now."""
    return f"kubearq:deferred:{request_uid}"


def request_jobs_key(request_uid: str) -> str:
    """Set of every job id enqueued for one ScrapeRequest (what deleting it aborts)."""
    return f"kubearq:jobs:{request_uid}"
