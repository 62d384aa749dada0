"""The `http-json` provider: entities and metric points from any HTTP API that answers JSON, described by config.

A connection names two URLs (entities; metrics, with the window's bounds as `{start}`/`{end}`), the header that
carries the token, dotted paths to the lists and fields in each answer, how the answer pages (a cursor, page
numbers, or not at all), each metric's kind and the points' granularity. Example `config`:

    {"entitiesUrl": "https://ads.example.com/v1/entities",
     "metricsUrl": "https://ads.example.com/v1/stats?from={start}&to={end}",
     "authHeader": "X-Api-Key", "authScheme": null,
     "entities": {"items": "results", "parentId": "parent.id"},
     "metrics": {"items": "results", "entityId": "entity", "capturedAt": "bucket",
                 "values": {"spend": {"path": "cost.amount"}, "budget": {"path": "budget", "kind": "gauge"}}},
     "pagination": {"type": "cursor", "cursorPath": "next", "cursorParam": "cursor"},
     "granularity": "15m"}
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import ClassVar, Literal
from urllib.parse import quote

from pydantic import BaseModel, Field, field_validator, model_validator

from kubearq.worker.sync.http import ApiClient, ApiResponse, malformed, shown_url, status_error
from kubearq.worker.sync.provider import (
    ConfigModel,
    Credentials,
    CredentialsRejectedError,
    Entity,
    Granularity,
    Level,
    MetricKind,
    MetricPoint,
    Provider,
    ProviderConfig,
    ProviderError,
    Window,
)

MAX_PAGES = 10_000
"""A listing longer than this is a paging loop, not an account."""
BUCKETS: Mapping[str, timedelta] = {"15m": timedelta(minutes=15), "1h": timedelta(hours=1)}
LEVELS: Mapping[str, Level] = {"campaign": "campaign", "adset": "adset", "ad": "ad"}
WINDOW_PLACEHOLDERS = ("start", "end")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9-]+$")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


def lookup(data: object, path: str) -> object:
    """The value at a dotted path (`paging.next`, `items.0.id`; "" is `data` itself), or MISSING."""
    if not path:
        return data
    for part in path.split("."):
        if isinstance(data, Mapping) and part in data:
            data = data[part]
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return MISSING
    return data


def _check_template(url: str, allowed: tuple[str, ...]) -> str:
    """A URL template: only `allowed` placeholders, and an http(s) URL with a host once they are filled in."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(url)
                  if name is not None]
    except ValueError as error:
        raise ValueError(f"{url!r} is not a valid URL template ({error}; write a literal brace as {{{{ or }}}})") \
            from None
    known = " and ".join(f"{{{name}}}" for name in allowed)
    for name, spec, conversion in fields:
        if name not in allowed or spec or conversion:
            placeholder = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            takes = f"the placeholders are {known} (the window's bounds, ISO 8601 UTC)" if allowed else \
                "this URL takes no placeholders"
            raise ValueError(f"unknown placeholder {placeholder} in {url!r}; {takes}")
    filled = url.format_map({name: "2024-01-01T00:00:00Z" for name in allowed})
    scheme, _, rest = filled.partition("://")
    if scheme.lower() not in ("http", "https") or not rest or rest[0] in "/?#":
        raise ValueError(f"{url!r} is not an http(s) URL with a host; use a URL like 'https://ads.example.com/v1/stats'")
    return url


class EntityFields(ConfigModel):
    """Where an entities answer keeps its list, and each entity its fields (dotted paths)."""

    items: str = "data"
    """The list of entities in each answer ("" when the answer is the list)."""
    id: str = "id"
    name: str = "name"
    status: str = "status"
    level: str = "level"
    """The entity's level: `campaign`, `adset` or `ad`."""
    parent_id: str | None = "parentId"
    """The parent's id (an ad's ad set, an ad set's campaign); may be missing."""
    fixed_level: Level | None = None
    """Every listed entity is at this level (then `level` is not read)."""


class MetricField(ConfigModel):
    """One metric of a point: where its value is, and how it rolls up into an hour."""

    path: str
    kind: MetricKind = MetricKind.COUNTER


class MetricFields(ConfigModel):
    """Where a metrics answer keeps its list, and each point its entity, time and values (dotted paths)."""

    items: str = "data"
    """The list of points in each answer ("" when the answer is the list)."""
    entity_id: str = "entityId"
    captured_at: str = "capturedAt"
    """The start of the point's bucket: ISO 8601 (UTC when it has no offset) or epoch seconds."""
    values: dict[str, MetricField]
    """Metric name → where its value is and its kind; a value that is missing or null is left out of the point."""

    @field_validator("values")
    @classmethod
    def _some_metric(cls, values: dict[str, MetricField]) -> dict[str, MetricField]:
        if not values:
            raise ValueError('name at least one metric, like {"spend": {"path": "cost"}}')
        return values


class Pagination(ConfigModel):
    """How an answer says there is more: `none`, `cursor` (a cursor in the answer, sent back as a query parameter)
    or `page` (page numbers as a query parameter, until a page is empty or short)."""

    type: Literal["none", "cursor", "page"] = "none"
    cursor_path: str | None = None
    """cursor: where the next page's cursor is in the answer; missing, null or "" on the last page."""
    cursor_param: str | None = None
    """cursor: the query parameter that sends the cursor back."""
    page_param: str = "page"
    first_page: int = 1
    size_param: str | None = None
    """page: the query parameter that asks for `pageSize` items; with it, a short page is the last one."""
    page_size: int = Field(default=100, ge=1, le=10_000)

    @model_validator(mode="after")
    def _cursor_fields(self) -> Pagination:
        if self.type == "cursor" and not (self.cursor_path and self.cursor_param):
            raise ValueError("type cursor needs cursorPath (where the next cursor is in the answer) and cursorParam "
                             "(the query parameter that sends it back)")
        return self


class HttpJsonConfig(ProviderConfig):
    """A connection's `config` for the http-json provider."""

    entities_url: str
    """Lists the account's campaigns, ad sets and ads (no placeholders)."""
    metrics_url: str
    """Lists the metric points of a window: `{start}` and `{end}` become its bounds (ISO 8601 UTC, `...Z`)."""
    auth_header: str = "Authorization"
    """The request header that carries the token."""
    auth_scheme: str | None = "Bearer"
    """Written before the token (`Bearer abc`); null or "" sends the bare token."""
    entities: EntityFields = EntityFields()
    metrics: MetricFields
    pagination: Pagination = Pagination()
    granularity: Granularity = "15m"
    """The bucket of every point the API returns."""
    require_refresh_token: bool = False
    """The credentials must hold a refresh token (the platform's access tokens are short-lived)."""
    platform_name: str | None = None
    """Named in what the user reads: "Missing refresh token. Please reconnect Google Ads."."""

    @field_validator("auth_header")
    @classmethod
    def _header_name(cls, name: str) -> str:
        if not _HEADER_NAME.match(name):
            raise ValueError(f"{name!r} is not an HTTP header name; use letters, digits and '-', like "
                             "'Authorization' or 'X-Api-Key'")
        return name

    @field_validator("entities_url")
    @classmethod
    def _entities_template(cls, url: str) -> str:
        return _check_template(url, ())

    @field_validator("metrics_url")
    @classmethod
    def _metrics_template(cls, url: str) -> str:
        return _check_template(url, WINDOW_PLACEHOLDERS)


class HttpJsonProvider(Provider):
    """Pulls entities and metric points from the HTTP JSON API that the connection's config describes."""

    name: ClassVar[str] = "http-json"
    config_model: ClassVar[type[BaseModel]] = HttpJsonConfig
    config: HttpJsonConfig

    def __init__(self, config: BaseModel, credentials: Credentials, api: ApiClient) -> None:
        if not isinstance(config, HttpJsonConfig):
            raise TypeError(f"{type(self).__name__} takes an HttpJsonConfig, not {type(config).__name__}")
        super().__init__(config, credentials, api)

    @classmethod
    def check_credentials(cls, credentials: Credentials, config: BaseModel) -> str | None:
        if not isinstance(config, HttpJsonConfig):
            raise TypeError(f"{cls.__name__} takes an HttpJsonConfig, not {type(config).__name__}")
        reconnect = f"Please reconnect {config.platform_name}." if config.platform_name else "Please reconnect."
        if not credentials.token:
            return f"No token configured. {reconnect}"
        if config.require_refresh_token and not credentials.refresh_token:
            return f"Missing refresh token. {reconnect}"
        return None

    @classmethod
    def metric_kinds_of(cls, config: BaseModel) -> Mapping[str, MetricKind]:
        if not isinstance(config, HttpJsonConfig):
            raise TypeError(f"{cls.__name__} takes an HttpJsonConfig, not {type(config).__name__}")
        return {name: field.kind for name, field in config.metrics.values.items()}

    async def entities(self) -> AsyncIterator[Entity]:
        fields = self.config.entities
        async for response, items in self._pages(self.config.entities_url, fields.items, "entities.items"):
            for index, item in enumerate(items):
                yield self._entity(response, f"{fields.items or 'the answer'}[{index}]", item)

    async def metrics(self, window: Window) -> AsyncIterator[MetricPoint]:
        bounds = {name: quote(moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), safe=":")
                  for name, moment in zip(WINDOW_PLACEHOLDERS, (window.start, window.end), strict=True)}
        url = self.config.metrics_url.format_map(bounds)
        fields = self.config.metrics
        async for response, items in self._pages(url, fields.items, "metrics.items"):
            for index, item in enumerate(items):
                point = self._point(response, f"{fields.items or 'the answer'}[{index}]", item)
                if window.start <= point.captured_at < window.end:  # each bucket in exactly one window
                    yield point

    def _entity(self, response: ApiResponse, where: str, item: object) -> Entity:
        fields = self.config.entities
        platform_id = _text(response, where, item, fields.id, "entities.id", number_ok=True)
        named = fields.fixed_level or _text(response, where, item, fields.level, "entities.level")
        level = LEVELS.get(named)
        if level is None:
            raise malformed(response.url, f"{where} has level {named!r}, not campaign, adset or ad (entities.level; "
                                          "set entities.fixedLevel when the list holds one level)")
        parent = MISSING if fields.parent_id is None else lookup(item, fields.parent_id)
        return Entity(
            platform_id=platform_id, level=level,
            name=_text(response, where, item, fields.name, "entities.name", optional=True),
            status=_text(response, where, item, fields.status, "entities.status", optional=True),
            parent_id=str(parent) if isinstance(parent, str | int) and not isinstance(parent, bool) else None,
        )

    def _point(self, response: ApiResponse, where: str, item: object) -> MetricPoint:
        fields = self.config.metrics
        granularity = self.config.granularity
        captured_at = _moment(response, where, lookup(item, fields.captured_at), fields.captured_at)
        if captured_at != _bucket_start(captured_at, BUCKETS[granularity]):
            raise malformed(response.url, f"{where} {fields.captured_at} {captured_at:%Y-%m-%dT%H:%M:%SZ} is not the "
                                          f"start of a {granularity} bucket (granularity is {granularity})")
        values: dict[str, float] = {}
        for name, field in fields.values.items():
            value = lookup(item, field.path)
            if value is MISSING or value is None:
                continue
            number = _number(value)
            if number is None:
                raise malformed(response.url, f"{where} {field.path} is {value!r}, not a number "
                                              f"(metrics.values.{name}.path)")
            values[name] = number
        return MetricPoint(
            platform_id=_text(response, where, item, fields.entity_id, "metrics.entityId", number_ok=True),
            captured_at=captured_at, metrics=values, granularity=granularity,
        )

    async def _pages(self, url: str, items_path: str, setting: str) -> AsyncIterator[tuple[ApiResponse, list[object]]]:
        """Each answer of a listing with its items, following the configured pagination to the last page."""
        paging = self.config.pagination
        params: dict[str, str] = {}
        page = paging.first_page
        previous_cursor: str | None = None
        for _ in range(MAX_PAGES):
            if paging.type == "page":
                params = {paging.page_param: str(page)}
                if paging.size_param:
                    params[paging.size_param] = str(paging.page_size)
            response = await self._get(url, params)
            items = lookup(response.data, items_path)
            if not isinstance(items, list):
                found = "nothing" if items is MISSING else f"a {type(items).__name__}"
                raise malformed(response.url, f"expected a list at {items_path or 'the top'} ({setting}), "
                                              f"found {found}")
            yield response, items
            if paging.type == "none":
                return
            if paging.type == "page":
                if not items or (paging.size_param and len(items) < paging.page_size):
                    return
                page += 1
                continue
            cursor_path = paging.cursor_path or ""  # both set for type cursor (checked by the config)
            cursor = lookup(response.data, cursor_path)
            if cursor is MISSING or cursor is None or cursor == "":
                return
            if not isinstance(cursor, str | int) or isinstance(cursor, bool):
                raise malformed(response.url, f"the cursor at {cursor_path} is {cursor!r}, not a string "
                                              "(pagination.cursorPath)")
            if str(cursor) == previous_cursor:
                raise malformed(response.url, f"the cursor at {cursor_path} repeats the previous page's "
                                              f"({previous_cursor!r}); stopped rather than loop")
            previous_cursor = str(cursor)
            params = {paging.cursor_param or "": previous_cursor}
        raise ProviderError(f"gave up listing {shown_url(url)} after {MAX_PAGES} pages: the API keeps saying there "
                            "is more", retryable=False)

    async def _get(self, url: str, params: Mapping[str, str]) -> ApiResponse:
        token = self.credentials.token or ""
        scheme = self.config.auth_scheme
        response = await self.api.get_json(
            url, params=params, headers={self.config.auth_header: f"{scheme} {token}" if scheme else token},
            allow_private_networks=self.config.allow_private_networks,
        )
        if response.ok:
            return response
        reconnect = f"Please reconnect {self.config.platform_name}." if self.config.platform_name else \
            "Please reconnect."
        if response.status == 401:
            raise CredentialsRejectedError(
                f"{response.shown_url} rejected the token (HTTP 401 Unauthorized). {reconnect}")
        raise status_error(response, _explanation(response.data))


def _text(response: ApiResponse, where: str, item: object, path: str, setting: str, *, number_ok: bool = False,
          optional: bool = False) -> str:
    """The text at `path` (an integer too, for ids); an optional one missing or null is ""."""
    value = lookup(item, path)
    if isinstance(value, str) or (number_ok and isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    if optional and (value is MISSING or value is None):
        return ""
    if value is MISSING:
        raise malformed(response.url, f"{where} has no {path!r} ({setting})")
    raise malformed(response.url, f"{where} has {value!r} at {path!r}, not text ({setting})")


def _number(value: object) -> float | None:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _moment(response: ApiResponse, where: str, value: object, path: str) -> datetime:
    """A point's time: ISO 8601 (no offset means UTC) or epoch seconds, in UTC."""
    moment: datetime | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        moment = datetime.fromtimestamp(value, UTC)
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            moment = None
    if moment is None and value is MISSING:
        raise malformed(response.url, f"{where} has no {path!r} (metrics.capturedAt)")
    if moment is None:
        raise malformed(response.url, f"{where} has {value!r} at {path!r}, not an ISO 8601 time or epoch seconds "
                                      "(metrics.capturedAt)")
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _bucket_start(moment: datetime, bucket: timedelta) -> datetime:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + (moment - epoch) // bucket * bucket


def _explanation(data: object) -> str | None:
    """What an error body says, when it says it in one of the usual places (`error.message`, `error`, `message`)."""
    for path in ("error.message", "error", "message", "detail"):
        value = lookup(data, path)
        if isinstance(value, str) and value:
            return value[:200]
    return None
