"""The `meta-ads` provider: an ad account's campaigns, ad sets, ads and hourly insights from Meta's Marketing API.

As documented publicly (developers.facebook.com, Marketing API):
- entities: `GET /act_{id}/campaigns|adsets|ads?fields=id,name,effective_status[,campaign_id|adset_id]`;
- metrics: `GET /act_{id}/insights?level=ad&time_range={"since","until"}&time_increment=1
  &breakdowns=hourly_stats_aggregated_by_advertiser_time_zone`, one local day per request sequence: the
  dates are the account's, and each row's hour (`"13:00:00 - 13:59:59"`) is a local hour, converted to UTC;
- paging: cursor based, `paging.next` is the next page's URL (absent on the last page);
- errors: `{"error": {"message", "type", "code", "error_subcode", "fbtrace_id"}}` (Graph API "Handling
  Errors"); 190 is an expired or revoked token; 4, 17, 32, 613 and 80000-80014 are rate limits, and the
  `x-business-use-case-usage` header says when access returns (`estimated_time_to_regain_access`, minutes).

The token travels in the `Authorization: Bearer` header, which the Graph API accepts, never in a URL; a
`paging.next` URL is followed only on the configured base URL's origin, without the `access_token` Meta may
have written into it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import ClassVar
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import BaseModel, Field, field_validator

from kubearq.worker.sync.http import ApiClient, ApiResponse, malformed, shown_url, status_error
from kubearq.worker.sync.provider import (
    Credentials,
    CredentialsRejectedError,
    Entity,
    Level,
    MetricKind,
    MetricPoint,
    Provider,
    ProviderConfig,
    ProviderError,
    ThrottledError,
    Window,
)

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://graph.facebook.com/v21.0"
HOURLY_BREAKDOWN = "hourly_stats_aggregated_by_advertiser_time_zone"
INSIGHTS_FIELDS = ("ad_id", "spend", "impressions", "clicks", "actions", "action_values")
METRICS = ("spend", "impressions", "clicks", "conversions", "revenue")
# Graph API error codes 4 (app), 17 (user), 32 (page), 613 (custom) and the Business Use Case range.
THROTTLE_CODES = frozenset({4, 17, 32, 613, *range(80000, 80015)})
TEMPORARY_CODES = frozenset({1, 2})  # "unknown" and "service": a temporary problem, wait and retry
PERMISSION_CODES = frozenset({10, *range(200, 300)})
REJECTED_TOKEN_CODES = frozenset({102, 190})
DEFAULT_THROTTLE_SECONDS = 300.0
"""The wait after a rate limit that does not say how long: Business Use Case quotas are per rolling hour."""
MAX_PAGES = 10_000
RECONNECT = "Please reconnect Meta Ads."
EDGES: tuple[tuple[str, Level, str | None], ...] = (
    ("campaigns", "campaign", None), ("adsets", "adset", "campaign_id"), ("ads", "ad", "adset_id"),
)
_HOUR = re.compile(r"^(\d\d):00:00 - \1:59:59$")


class MetaAdsConfig(ProviderConfig):
    """A connection's `config` for the meta-ads provider."""

    ad_account_id: str
    """The ad account's id: its digits (`act_` before them is accepted)."""
    base_url: str = DEFAULT_BASE_URL
    """The Graph API, with its version; tokens are sent here only."""
    page_size: int = Field(default=500, ge=1, le=5000)
    """Rows asked for per page (`limit`)."""
    conversion_action_types: tuple[str, ...] = ("purchase",)
    """`actions` of these types are summed into `conversions`; list types that do not count the same event twice
    (`purchase` already includes `offsite_conversion.fb_pixel_purchase`)."""
    revenue_action_types: tuple[str, ...] = ("purchase",)
    """`action_values` of these types are summed into `revenue`."""

    @field_validator("ad_account_id", mode="before")
    @classmethod
    def _account_digits(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            return value  # pydantic says what type it wanted
        digits = value.strip().removeprefix("act_")
        if not (digits.isascii() and digits.isdigit()):
            raise ValueError(f"{value!r} is not an ad account id; use its digits, like '1234567890' "
                             "(act_1234567890 works too)")
        return digits

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError(f"{url!r} is not an http(s) URL with a host (and no query); use the Graph API's "
                             f"address with its version, like {DEFAULT_BASE_URL!r}")
        return url.rstrip("/")


class MetaAdsProvider(Provider):
    """An ad account on Meta (Facebook, Instagram): entities at three levels, hourly points per ad."""

    name: ClassVar[str] = "meta-ads"
    config_model: ClassVar[type[BaseModel]] = MetaAdsConfig
    config: MetaAdsConfig

    def __init__(self, config: BaseModel, credentials: Credentials, api: ApiClient) -> None:
        if not isinstance(config, MetaAdsConfig):
            raise TypeError(f"{type(self).__name__} takes a MetaAdsConfig, not {type(config).__name__}")
        super().__init__(config, credentials, api)
        self._blocked_until: datetime | None = None

    @classmethod
    def check_credentials(cls, credentials: Credentials, config: BaseModel) -> str | None:
        return None if credentials.token else f"No token configured. {RECONNECT}"

    @classmethod
    def metric_kinds_of(cls, config: BaseModel) -> Mapping[str, MetricKind]:
        return dict.fromkeys(METRICS, MetricKind.COUNTER)

    @property
    def account(self) -> str:
        return f"act_{self.config.ad_account_id}"

    async def entities(self) -> AsyncIterator[Entity]:
        for edge, level, parent_field in EDGES:
            fields = ["id", "name", "effective_status", *([parent_field] if parent_field else [])]
            params = {"fields": ",".join(fields), "limit": str(self.config.page_size)}
            async for response, rows in self._pages(f"{self.config.base_url}/{self.account}/{edge}", params):
                for index, row in enumerate(rows):
                    yield _entity(response, f"data[{index}]", row, level, parent_field)

    async def metrics(self, window: Window) -> AsyncIterator[MetricPoint]:
        """Hourly points per ad, a local day at a time: that day's rows are merged before they are yielded, because
        on the day clocks spring forward two local hours can name one UTC hour."""
        url = f"{self.config.base_url}/{self.account}/insights"
        for day in local_days(window):
            params = {
                "level": "ad", "fields": ",".join(INSIGHTS_FIELDS), "time_increment": "1",
                "time_range": json.dumps({"since": day.isoformat(), "until": day.isoformat()}, separators=(",", ":")),
                "breakdowns": HOURLY_BREAKDOWN, "limit": str(self.config.page_size),
            }
            points: dict[tuple[str, datetime], dict[str, float]] = {}
            async for response, rows in self._pages(url, params):
                for index, row in enumerate(rows):
                    ad_id, captured_at, values = self._row(response, f"data[{index}]", row, window)
                    merged = points.setdefault((ad_id, captured_at), dict.fromkeys(METRICS, 0.0))
                    for metric, value in values.items():
                        merged[metric] += value
            for (ad_id, captured_at), values in sorted(points.items()):
                if window.start <= captured_at < window.end:  # each hour in exactly one window
                    yield MetricPoint(platform_id=ad_id, captured_at=captured_at, metrics=values, granularity="1h")

    def _row(self, response: ApiResponse, where: str, row: object, window: Window,
             ) -> tuple[str, datetime, dict[str, float]]:
        if not isinstance(row, Mapping):
            raise malformed(response.url, f"{where} is {row!r}, not an object")
        ad_id = _identifier(response, where, row, "ad_id")
        try:
            day = date.fromisoformat(str(row.get("date_start")))
        except ValueError:
            raise malformed(response.url, f"{where} has date_start {row.get('date_start')!r}, not a date") from None
        hour = _HOUR.match(str(row.get(HOURLY_BREAKDOWN)))
        if hour is None or int(hour.group(1)) > 23:
            raise malformed(response.url, f"{where} has {HOURLY_BREAKDOWN} {row.get(HOURLY_BREAKDOWN)!r}, not an hour "
                                          "like '13:00:00 - 13:59:59'")
        # fold=0: the first of a repeated hour (clocks going back) and, for an hour that does not exist (clocks
        # going forward), the offset before the change, so it lands on the same UTC hour as the next one.
        captured_at = datetime.combine(day, time(int(hour.group(1))), tzinfo=window.time_zone).astimezone(UTC)
        values = {metric: _number(response, where, row, metric) for metric in ("spend", "impressions", "clicks")}
        values["conversions"] = _sum_actions(response, where, row, "actions", self.config.conversion_action_types)
        values["revenue"] = _sum_actions(response, where, row, "action_values", self.config.revenue_action_types)
        return ad_id, captured_at, values

    async def _pages(self, url: str, params: Mapping[str, str]) -> AsyncIterator[tuple[ApiResponse, list[object]]]:
        """Each page of an edge with its `data` rows, following `paging.next` on the base URL's origin only."""
        current, query = url, dict(params)
        seen = {url}
        for _ in range(MAX_PAGES):
            response = await self._get(current, query)
            data = response.data
            rows = data.get("data") if isinstance(data, Mapping) else None
            if not isinstance(rows, list):
                raise malformed(response.url, "no data list in the answer")
            yield response, rows
            paging = data.get("paging") if isinstance(data, Mapping) else None
            following = paging.get("next") if isinstance(paging, Mapping) else None
            if following is None or following == "":
                return
            if not isinstance(following, str):
                raise malformed(response.url, f"paging.next is {following!r}, not a URL")
            if not same_origin(following, self.config.base_url):
                # Named without its query: that is where Meta's paging URLs carry the token, and a message is
                # kept to 500 characters.
                elsewhere = urlunsplit(urlsplit(shown_url(following))._replace(query="", fragment=""))
                raise ProviderError(
                    f"refused to follow paging.next to {elsewhere}: it is not on {origin(self.config.base_url)}, the "
                    "configured baseUrl's origin, and the access token must not be sent anywhere else",
                    retryable=False)
            following = without_parameter(following, "access_token")  # the header carries it
            if following in seen:
                raise malformed(response.url, f"paging.next leads back to {shown_url(following)}; stopped rather "
                                              "than loop")
            seen.add(following)
            current, query = following, {}
        raise ProviderError(f"gave up listing {shown_url(url)} after {MAX_PAGES} pages: Meta keeps saying there is "
                            "more", retryable=False)

    async def _get(self, url: str, params: Mapping[str, str]) -> ApiResponse:
        """One request, unless Meta already said the account is blocked; Meta's error object becomes our error."""
        now = self.api.now()
        if self._blocked_until is not None and now < self._blocked_until:
            wait = (self._blocked_until - now).total_seconds()
            raise ThrottledError(f"Meta is rate limiting ad account {self.account} (x-business-use-case-usage: "
                                 f"access returns in {wait / 60:g} min); retry after {wait:g} s", retry_after=wait)
        response = await self.api.get_json(
            url, params=params, headers={"Authorization": f"Bearer {self.credentials.token or ''}"},
            allow_private_networks=self.config.allow_private_networks,
        )
        regained_in = regain_access_seconds(response.headers)
        if regained_in:
            self._blocked_until = now + timedelta(seconds=regained_in)
        error = response.data.get("error") if isinstance(response.data, Mapping) else None
        if response.ok and error is None:
            return response
        if not isinstance(error, Mapping):
            raise status_error(response)
        raise self._error(error, regained_in)

    def _error(self, error: Mapping[str, object], regained_in: float) -> ProviderError:
        code, subcode = _code(error.get("code")), _code(error.get("error_subcode"))
        label = f"error {code}" + (f"/{subcode}" if subcode is not None else "")
        said = str(error.get("message") or "no message")[:300]
        if code in THROTTLE_CODES or regained_in:
            wait = regained_in or DEFAULT_THROTTLE_SECONDS
            return ThrottledError(f"Meta is rate limiting ad account {self.account} ({label}: {said}); "
                                  f"retry after {wait:g} s", retry_after=wait)
        if code in REJECTED_TOKEN_CODES:
            return CredentialsRejectedError(f"Meta rejected the access token ({label}: {said}). {RECONNECT}")
        if code in TEMPORARY_CODES:
            return ProviderError(f"Meta could not answer for ad account {self.account} ({label}: {said}); a later "
                                 "try may succeed", retryable=True)
        if code in PERMISSION_CODES:
            return ProviderError(f"Meta refused ad account {self.account} to this token ({label}: {said}); reconnect "
                                 "as a user who may read the account's ads (ads_read)", retryable=False)
        return ProviderError(f"Meta refused a request for ad account {self.account} ({label}: {said})",
                             retryable=False)


def local_days(window: Window) -> list[date]:
    """The account's local dates that the window [start, end) touches, in order."""
    if window.end <= window.start:
        return []
    first = window.start.astimezone(window.time_zone).date()
    last = (window.end - timedelta(microseconds=1)).astimezone(window.time_zone).date()
    return [first + timedelta(days=offset) for offset in range((last - first).days + 1)]


def regain_access_seconds(headers: Mapping[str, str]) -> float:
    """The longest `estimated_time_to_regain_access` (minutes) in `x-business-use-case-usage`, in seconds; 0 if none.

    The header is `{"<business id>": [{"type": "ads_insights", "call_count": 100, ...,
    "estimated_time_to_regain_access": 12}], ...}` (Graph API "Rate Limits", Business Use Case headers).
    """
    raw = headers.get("x-business-use-case-usage")
    if not raw:
        return 0.0
    try:
        usage = json.loads(raw)
    except ValueError:
        logger.warning("unreadable x-business-use-case-usage header from Meta: %.200s", raw)
        return 0.0
    minutes = [entry.get("estimated_time_to_regain_access") for entries in
               (usage.values() if isinstance(usage, dict) else ()) if isinstance(entries, list)
               for entry in entries if isinstance(entry, dict)]
    return max((float(value) for value in minutes if isinstance(value, int | float) and value > 0), default=0.0) * 60


def origin(url: str) -> str:
    """`https://graph.facebook.com` (the port when it is not the scheme's default)."""
    scheme, host, port = _origin_parts(url)
    default = {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{host}" + ("" if port == default else f":{port}")


def same_origin(url: str, base_url: str) -> bool:
    try:
        return _origin_parts(url) == _origin_parts(base_url)
    except ValueError:  # an out-of-range port
        return False


def _origin_parts(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(scheme)


def without_parameter(url: str, name: str) -> str:
    """`url` without query parameter `name`."""
    parts = urlsplit(url)
    kept = [piece for piece in parts.query.split("&") if piece and unquote(piece.split("=", 1)[0]) != name]
    return urlunsplit(parts._replace(query="&".join(kept)))


def _entity(response: ApiResponse, where: str, row: object, level: Level, parent_field: str | None) -> Entity:
    if not isinstance(row, Mapping):
        raise malformed(response.url, f"{where} is {row!r}, not an object")
    parent = None if parent_field is None else _identifier(response, where, row, parent_field)
    return Entity(platform_id=_identifier(response, where, row, "id"), level=level, name=str(row.get("name") or ""),
                  status=str(row.get("effective_status") or ""), parent_id=parent)


def _identifier(response: ApiResponse, where: str, row: Mapping[str, object], key: str) -> str:
    value = row.get(key)
    if (isinstance(value, str) and value) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    raise malformed(response.url, f"{where} has no {key}" if value is None else f"{where} has {key} {value!r}")


def _number(response: ApiResponse, where: str, row: Mapping[str, object], key: str) -> float:
    """Meta writes numbers as strings ("5339.5"); a field left out is zero (Meta omits empty metrics)."""
    value = row.get(key)
    if value is None:
        return 0.0
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            return number
    raise malformed(response.url, f"{where} has {key} {value!r}, not a number")


def _sum_actions(response: ApiResponse, where: str, row: Mapping[str, object], key: str, types: Sequence[str],
                 ) -> float:
    """The sum of an `actions`-style list (`[{"action_type": "purchase", "value": "2"}]`) over `types`."""
    actions = row.get(key)
    if actions is None:
        return 0.0
    if not isinstance(actions, list):
        raise malformed(response.url, f"{where} has {key} {actions!r}, not a list")
    total = 0.0
    for index, action in enumerate(actions):
        if not isinstance(action, Mapping):
            raise malformed(response.url, f"{where}.{key}[{index}] is {action!r}, not an object")
        if action.get("action_type") in types:
            total += _number(response, f"{where}.{key}[{index}]", action, "value")
    return total


def _code(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return None
