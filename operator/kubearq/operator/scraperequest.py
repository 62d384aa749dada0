"""The ScrapeRequest resource: listing pages → detail pages → PostgreSQL, under one shared rate limit."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Self

from pydantic import ConfigDict, Field, field_validator, model_validator

from kubearq.core.contract import (
    MAX_NAME_LENGTH,
    MAX_URL_LENGTH,
    ApiModel,
    Backend,
    HttpUrl,
    ScrapeSettings,
)
from kubearq.operator.actions import CancelRecord
from kubearq.operator.conditions import Conditions
from kubearq.operator.resources import PrinterColumn, ResourceKind

# 300 URLs of at most 2 KiB keep the list under 600 KiB, far below etcd's ~1.5 MB object limit;
# longer lists go in a ConfigMap (`urlsFrom`).
MAX_INLINE_URLS = 300
MAX_FAILED_URLS_SHOWN = 20
ONE_SOURCE_MESSAGE = "set exactly one of urls and urlsFrom"
FIRECRAWL_MESSAGE = "backend Firecrawl needs firecrawl.apiKeySecretRef, the Secret key holding the API key"
FROZEN_SPEC_MESSAGE = (
    "only spec.deletionPolicy can change once a ScrapeRequest exists: its pages were enqueued with the spec "
    "it was created with; delete it and create a new one to scrape with another spec"
)
FROZEN_SPEC_FIELDS = ("links", "extract", "backend", "firecrawl", "rateLimit", "retry", "fetch", "queue", "urls",
                      "urlsFrom")
"""Every spec field but deletionPolicy: queued jobs carry the spec in their payload, so an edit would be
silently ignored (or half applied, to pages enqueued later); the API server refuses it instead."""


def _unchanged(field: str) -> str:
    # A transition rule on the field itself would not see it added or removed: compare presence too.
    return f"(has(self.{field}) == has(oldSelf.{field}) && (!has(self.{field}) || self.{field} == oldSelf.{field}))"


class DeletionPolicy(StrEnum):
    """What happens to the stored results when the ScrapeRequest is deleted."""

    RETAIN = "Retain"
    DELETE = "Delete"


class Phase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    PARTIALLY_SUCCEEDED = "PartiallySucceeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


class ConfigMapKeyRef(ApiModel):
    """A key of a ConfigMap in the resource's namespace."""

    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]
    """The ConfigMap's name."""
    key: Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]
    """The key whose value lists the URLs, one per line (blank lines and `#` comments ignored)."""


class UrlSource(ApiModel):
    """Where a list too long for the resource itself is kept."""

    config_map_key_ref: ConfigMapKeyRef
    """ConfigMap key holding the listing-page URLs."""


class ScrapeRequestSpec(ScrapeSettings):
    """Scrape the listing pages, follow their detail links, store what the detail pages hold."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [
        {"rule": "has(self.urls) != has(self.urlsFrom)", "message": ONE_SOURCE_MESSAGE},
        {"rule": "self.backend != 'Firecrawl' || has(self.firecrawl)", "message": FIRECRAWL_MESSAGE},
        {"rule": " && ".join(_unchanged(field) for field in FROZEN_SPEC_FIELDS), "message": FROZEN_SPEC_MESSAGE},
    ]})

    urls: Annotated[
        list[HttpUrl],
        Field(min_length=1, json_schema_extra={"x-kubernetes-list-type": "set", "maxItems": MAX_INLINE_URLS}),
    ] | None = None
    """Listing-page URLs (http or https), at most 300; use `urlsFrom` for longer lists."""
    urls_from: UrlSource | None = None
    """A ConfigMap key with the listing-page URLs, one per line."""
    deletion_policy: DeletionPolicy = DeletionPolicy.RETAIN
    """Retain the stored results when the resource is deleted, or Delete them. The one field that can change
    after creation; the API server refuses edits of the others."""

    @field_validator("urls", mode="before")
    @classmethod
    def _urls_fit(cls, urls: object) -> object:
        # Checked before the items so a 10,000-URL list gets one message, not 10,000.
        if isinstance(urls, list):
            if len(urls) > MAX_INLINE_URLS:
                raise ValueError(
                    f"{len(urls)} URLs given, at most {MAX_INLINE_URLS} fit in the resource; "
                    "put the list in a ConfigMap and use urlsFrom"
                )
            seen: set[object] = set()
            for url in urls:
                if url in seen:
                    raise ValueError(f"{url!r} is listed twice")
                if isinstance(url, str) and len(url) <= MAX_URL_LENGTH:
                    seen.add(url)
        return urls

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Self:
        if (self.urls is None) == (self.urls_from is None):
            raise ValueError(ONE_SOURCE_MESSAGE)
        if self.backend == Backend.FIRECRAWL and self.firecrawl is None:
            raise ValueError(FIRECRAWL_MESSAGE)
        return self


class PageCounts(ApiModel):
    """Pages of one kind by state."""

    total: Annotated[int, Field(ge=0)] = 0
    """Pages known (enqueued)."""
    done: Annotated[int, Field(ge=0)] = 0
    """Pages fetched and processed."""
    failed: Annotated[int, Field(ge=0)] = 0
    """Pages that failed every try."""
    deferred: Annotated[int, Field(ge=0)] = 0
    """Pages that had to wait (rate limit, retry backoff, an outage) and have not finished yet."""


class FailedUrl(ApiModel):
    """A page that failed every try."""

    url: Annotated[str, Field(max_length=MAX_URL_LENGTH)]
    """The page's URL."""
    error: Annotated[str, Field(max_length=1024)]
    """The last try's error, shortened."""
    tries: Annotated[int, Field(ge=0)] = 0
    """Tries spent."""


class ScrapeRequestStatus(ApiModel):
    """Observed state of a ScrapeRequest."""

    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The `metadata.generation` this status was computed from."""
    conditions: Conditions = []
    """`Succeeded` is the truth; `phase` is derived from it."""
    phase: Phase = Phase.PENDING
    """Pending, Running, Succeeded, PartiallySucceeded, Failed or Cancelled."""
    listing_pages: PageCounts = PageCounts()
    """Listing pages by state."""
    detail_pages: PageCounts = PageCounts()
    """Detail pages by state."""
    progress: Annotated[str, Field(max_length=64)] = ""
    """Finished pages of all known pages, e.g. `37/120` (the `Progress` column)."""
    failed_pages: Annotated[int, Field(ge=0)] = 0
    """Listing and detail pages that failed every try (the `Failed` column)."""
    start_time: datetime | None = None
    """When the first jobs were enqueued."""
    completion_time: datetime | None = None
    """When the last page finished."""
    failed_urls: Annotated[list[FailedUrl], Field(max_length=MAX_FAILED_URLS_SHOWN)] = []
    """The first failed pages; all of them are kept in PostgreSQL."""
    last_cancel: CancelRecord | None = None
    """The last `kubearq.dev/cancel` ask handled: its id (a repeat does nothing), outcome and what was stopped."""


SCRAPE_REQUEST = ResourceKind(
    kind="ScrapeRequest",
    plural="scraperequests",
    short_names=("sr", "scrapereq"),
    description="Listing pages to scrape, their detail pages to extract into PostgreSQL, under one shared rate limit.",
    spec_model=ScrapeRequestSpec,
    status_model=ScrapeRequestStatus,
    printer_columns=(
        PrinterColumn("Phase", "string", ".status.phase",
                      "Pending, Running, Succeeded, PartiallySucceeded, Failed, Cancelled"),
        PrinterColumn("Progress", "string", ".status.progress", "Finished pages of all known pages"),
        PrinterColumn("Failed", "integer", ".status.failedPages", "Pages that failed every try"),
        PrinterColumn("Age", "date", ".metadata.creationTimestamp", "Time since creation"),
    ),
)
