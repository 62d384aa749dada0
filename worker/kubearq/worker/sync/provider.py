"""What an ad platform is to the sync jobs: a small plugin interface, registered by entry point.

A provider validates a connection's credentials (no network), lists the account's entities (campaigns, ad
sets, ads) and fetches metric points for a time window, following the platform's paging itself. Every
request goes through `ApiClient` (`sync/http.py`): the worker's network policy (SSRF checks on every URL and
resolved address), bounded bodies, one deadline. Users add their own providers with an entry point in the
`kubearq.providers` group naming a `Provider` subclass.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from importlib import metadata
from types import UnionType
from typing import TYPE_CHECKING, ClassVar, Literal, Union, get_args, get_origin
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

if TYPE_CHECKING:
    from kubearq.worker.sync.http import ApiClient

ENTRY_POINT_GROUP = "kubearq.providers"
Level = Literal["campaign", "adset", "ad"]
Granularity = Literal["15m", "1h"]


class MetricKind(StrEnum):
    """How a metric rolls up from 15-minute snapshots into an hour."""

    COUNTER = "counter"  # summed (spend, impressions, clicks, conversions, revenue)
    GAUGE = "gauge"  # the last value (a budget, a frequency)


@dataclass(frozen=True)
class Credentials:
    """What the worker read from the connection's mounted secret: a bare token, or a JSON object."""

    token: str | None = None
    refresh_token: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_text(cls, text: str) -> Credentials:
        """`abc123` is a token; `{"access_token": ..., "refresh_token": ..., ...}` names them (`token` also works)."""
        text = text.strip()
        if not text.startswith("{"):
            return cls(token=text or None)
        try:
            data = json.loads(text)
        except ValueError:
            return cls(token=text)
        if not isinstance(data, dict):
            return cls()
        values = {str(key): str(value) for key, value in data.items() if isinstance(value, str | int)}
        token = values.pop("access_token", None) or values.pop("token", None)
        return cls(token=token or None, refresh_token=values.pop("refresh_token", None) or None, extra=values)


@dataclass(frozen=True)
class Entity:
    """A campaign, ad set or ad as the platform names it."""

    platform_id: str
    level: Level
    name: str
    status: str
    parent_id: str | None = None  # the campaign of an ad set, the ad set of an ad


@dataclass(frozen=True)
class MetricPoint:
    """One entity's metrics for one time bucket, `captured_at` its start (UTC, aligned to the granularity)."""

    platform_id: str
    captured_at: datetime
    metrics: Mapping[str, float]
    granularity: Granularity = "15m"


@dataclass(frozen=True)
class Window:
    """The time to fetch, [start, end) in UTC; `time_zone` is the account's, for APIs that take local dates."""

    start: datetime
    end: datetime
    time_zone: ZoneInfo


class ConfigModel(BaseModel):
    """Base of the models in a connection's `config` JSON: camelCase there (snake_case accepted), as `ApiModel`
    does for resources, but unknown fields are refused: a misspelt `allowPrivateNetwork` must not silently mean
    false, and no API server prunes this JSON before we read it."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, use_attribute_docstrings=True,
    )


class ProviderConfig(ConfigModel):
    """Base of the providers' `config_model`s: what every provider that talks HTTP takes."""

    allow_private_networks: bool = False
    """Let the provider reach private, loopback and cluster-internal addresses (an API inside the cluster)."""


class ProviderError(Exception):
    """The platform refused or failed; `message` is kept on the connection (shortened to 500 characters)."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after


class CredentialsRejectedError(ProviderError):
    """The platform says the token is expired or revoked: retrying will not help, the user must reconnect."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class ThrottledError(ProviderError):
    """429, or the platform's own rate-limit signal: try again after `retry_after` seconds (no try spent)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, retryable=True, retry_after=retry_after)


class Provider:
    """Base of the providers: `config_model` validates the connection's `config` (the worker builds the provider
    with `cls(cls.parse_config(config), credentials, api)`); subclasses implement `metric_kinds_of`, `entities`
    and `metrics`, and `check_credentials` when they need more than a token."""

    name: ClassVar[str]
    config_model: ClassVar[type[BaseModel]]

    def __init__(self, config: BaseModel, credentials: Credentials, api: ApiClient) -> None:
        self.config = config
        self.credentials = credentials
        self.api = api

    @classmethod
    def metric_kinds_of(cls, config: BaseModel) -> Mapping[str, MetricKind]:
        """Every metric a connection with this `config` returns, and how it rolls up (compaction sums counters,
        keeps gauges' last). A classmethod: compaction needs it without credentials or a client."""
        raise NotImplementedError

    def metric_kinds(self) -> Mapping[str, MetricKind]:
        """`metric_kinds_of` this provider's config."""
        return self.metric_kinds_of(self.config)

    @classmethod
    def parse_config(cls, config: Mapping[str, object]) -> BaseModel:
        """The connection's `config` JSON validated by `config_model`; a `ProviderError` (not retryable) naming each
        bad field (`config.metricsUrl: Field required`) when it is not valid."""
        try:
            return cls.config_model.model_validate(config)
        except ValidationError as error:
            message = describe_config_error(error, cls.config_model)
            raise ProviderError(f"invalid {cls.name} connection config: {message}", retryable=False) from None

    @classmethod
    def check_credentials(cls, credentials: Credentials, config: BaseModel) -> str | None:
        """Why these credentials cannot be used, in words for the user ("No token configured. Please reconnect."),
        or None. No network: it decides whether a connection is synced at all. `config` is the validated config:
        what a provider requires can depend on it (http-json's `requireRefreshToken`)."""
        return None if credentials.token else "No token configured. Please reconnect."

    def entities(self) -> AsyncIterator[Entity]:
        """Every campaign, ad set and ad of the account (every page)."""
        raise NotImplementedError

    def metrics(self, window: Window) -> AsyncIterator[MetricPoint]:
        """Every entity's metric points in the window (every page)."""
        raise NotImplementedError


def describe_config_error(error: ValidationError, model: type[BaseModel], prefix: str = "config") -> str:
    """One line a user can act on: `config.metricsUrl: Field required; config.pageSise: unknown field (known: ...)`.

    Locations use the JSON (camelCase) names and pydantic's "Value error, " prefix is dropped, as the operator's
    `describe_validation_error` does for resource specs (the worker may not import the operator). A misspelt
    field is the commonest mistake in a hand-written config, so its message lists the fields that are known there.
    """
    lines = []
    for item in error.errors():
        location = ".".join([prefix, *(f"[{part}]" if isinstance(part, int) else str(part) for part in item["loc"])])
        location = location.replace(".[", "[")
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
            parent = _model_at(model, item["loc"][:-1])
            if parent is not None:
                message += f" (known: {', '.join(f.alias or n for n, f in parent.model_fields.items())})"
        lines.append(f"{location}: {message}")
    return "; ".join(lines)


def _model_at(annotation: object, path: Sequence[int | str]) -> type[BaseModel] | None:
    """The pydantic model a validation error location points into, following fields, list items and dict values."""
    for part in path:
        annotation = _inner(annotation, part)
    annotation = _inner(annotation, None)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _inner(annotation: object, part: int | str | None) -> object:
    """The annotation one step inside `annotation`: a model's field `part`, a container's item, an Optional's type."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if part is None:
            return annotation
        fields = annotation.model_fields
        return next((f.annotation for n, f in fields.items() if part in (n, f.alias)), None)
    arguments = [argument for argument in get_args(annotation) if argument is not type(None)]
    if get_origin(annotation) in (UnionType, Union) and len(arguments) == 1:
        return _inner(arguments[0], part)
    if part is None or not arguments:
        return annotation
    return arguments[-1]  # list[X] → X, dict[str, X] → X


def load_providers() -> dict[str, type[Provider]]:
    """The built-in providers and those installed under the `kubearq.providers` entry point group."""
    from kubearq.worker.sync.providers.http_json import HttpJsonProvider
    from kubearq.worker.sync.providers.meta_ads import MetaAdsProvider

    found: dict[str, type[Provider]] = {HttpJsonProvider.name: HttpJsonProvider, MetaAdsProvider.name: MetaAdsProvider}
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        provider = entry.load()
        if not (isinstance(provider, type) and issubclass(provider, Provider)):
            raise TypeError(f"entry point {entry.name} = {entry.value} ({ENTRY_POINT_GROUP}) is not a "
                            "kubearq.worker.sync.provider.Provider subclass")
        found[entry.name] = provider
    return found
