"""The providers against local servers that speak their APIs: paging, throttling, tokens, malformed answers,
timeouts, the network policy, config and credential checks, and Meta's local hours across DST."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from kubearq.worker.sync.http import ApiClient, shown_url, with_query
from kubearq.worker.sync.provider import (
    Credentials,
    CredentialsRejectedError,
    Entity,
    MetricKind,
    MetricPoint,
    Provider,
    ProviderError,
    ThrottledError,
    Window,
    load_providers,
)
from kubearq.worker.sync.providers.http_json import HttpJsonProvider
from kubearq.worker.sync.providers.meta_ads import MetaAdsProvider, local_days, regain_access_seconds
from tests.provider_apis import MALFORMED_BODY, JsonApi, MetaApi, MetaThrottle, buc_header, client_for, insight_row
from tests.websites import FakeResolver

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
NOT_JSON = "the body is not JSON (Expecting value: line 1 column 1 (char 0))"


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def local_day(day: date, zone: ZoneInfo, days: int = 1) -> Window:
    """The window of `days` local days from `day`, as the sync jobs build it."""
    start = datetime(day.year, day.month, day.day, tzinfo=zone)
    end = datetime.combine(day + timedelta(days=days), datetime.min.time(), tzinfo=zone)
    return Window(start.astimezone(UTC), end.astimezone(UTC), zone)


async def listed(provider: Provider) -> list[Entity]:
    return [entity async for entity in provider.entities()]


async def fetched(provider: Provider, window: Window) -> list[MetricPoint]:
    return [point async for point in provider.metrics(window)]


async def list_into(seen: list[Entity], provider: Provider) -> None:
    """List entities into `seen`, so that a test sees what came before an error."""
    async for entity in provider.entities():
        seen.append(entity)


@pytest.fixture
async def client() -> AsyncIterator[ApiClient]:
    async with ApiClient(timeout=5.0) as api:
        yield api


# --- http-json -----------------------------------------------------------------------------------------------

ENTITIES: list[dict[str, object]] = [
    {"id": "c1", "name": "Spring sale", "level": "campaign", "status": "active"},
    {"id": "s1", "name": "Germany", "level": "adset", "status": "active", "parentId": "c1"},
    {"id": "a1", "name": "Video", "level": "ad", "status": "paused", "parentId": "s1"},
    {"id": 42, "name": "Carousel", "level": "ad", "status": "active", "parentId": "s1"},
    {"id": "a3", "name": "Still", "level": "ad", "status": "archived", "parentId": "s1"},
]


def http_json(api: JsonApi, client: ApiClient, credential: str = "json-token", **config: object) -> HttpJsonProvider:
    settings = HttpJsonProvider.parse_config({
        "entitiesUrl": api.url("/v1/entities"),
        "metricsUrl": api.url("/v1/metrics?from={start}&to={end}"),
        "metrics": {"entityId": "ad", "capturedAt": "at", "values": {
            "spend": {"path": "cost.amount"}, "clicks": {"path": "clicks"},
            "budget": {"path": "budget", "kind": "gauge"},
        }},
        **config,
    })
    return HttpJsonProvider(settings, Credentials(token=credential), client)


@pytest.fixture
async def json_api() -> AsyncIterator[JsonApi]:
    async with JsonApi(entities=ENTITIES) as api:
        yield api


async def test_http_json_lists_entities_across_cursor_pages(json_api: JsonApi) -> None:
    json_api.paging = "cursor"
    async with client_for(json_api) as client:
        provider = http_json(json_api, client, pagination={
            "type": "cursor", "cursorPath": "meta.next", "cursorParam": "cursor"})
        entities = await listed(provider)

    assert entities == [
        Entity("c1", "campaign", "Spring sale", "active"),
        Entity("s1", "adset", "Germany", "active", parent_id="c1"),
        Entity("a1", "ad", "Video", "paused", parent_id="s1"),
        Entity("42", "ad", "Carousel", "active", parent_id="s1"),
        Entity("a3", "ad", "Still", "archived", parent_id="s1"),
    ]
    assert [seen.query.get("cursor") is not None for seen in json_api.requests] == [False, True, True]


async def test_http_json_fetches_points_across_numbered_pages_and_keeps_those_in_the_window(json_api: JsonApi) -> None:
    json_api.paging = "page"
    json_api.points = [
        {"ad": "a1", "at": "2024-03-10T00:00:00Z", "cost": {"amount": "1.25"}, "clicks": 3, "budget": 50},
        {"ad": "a1", "at": "2024-03-10T00:15:00+00:00", "cost": {"amount": 0.5}, "clicks": None, "budget": 50},
        {"ad": 42, "at": 1710029700, "cost": {"amount": 2}, "clicks": 1},  # epoch seconds: 00:15 UTC
        {"ad": "a1", "at": "2024-03-09T23:45:00Z", "cost": {"amount": 9}, "clicks": 9},  # before the window
        {"ad": "a1", "at": "2024-03-10T01:00:00", "cost": {"amount": 9}, "clicks": 9},  # at its end (no offset: UTC)
    ]
    window = Window(utc(2024, 3, 10, 0, 0), utc(2024, 3, 10, 1, 0), BERLIN)
    async with client_for(json_api) as client:
        provider = http_json(json_api, client, pagination={"type": "page", "sizeParam": "per_page", "pageSize": 2})
        points = await fetched(provider, window)

    assert points == [
        MetricPoint("a1", utc(2024, 3, 10, 0, 0), {"spend": 1.25, "clicks": 3.0, "budget": 50.0}),
        MetricPoint("a1", utc(2024, 3, 10, 0, 15), {"spend": 0.5, "budget": 50.0}),
        MetricPoint("42", utc(2024, 3, 10, 0, 15), {"spend": 2.0, "clicks": 1.0}),
    ]
    assert [(seen.query["page"], seen.query["per_page"]) for seen in json_api.requests] == [
        ("1", "2"), ("2", "2"), ("3", "2")]
    assert json_api.requests[0].query["from"] == "2024-03-10T00:00:00Z"
    assert json_api.requests[0].query["to"] == "2024-03-10T01:00:00Z"


async def test_http_json_points_take_the_configured_granularity_and_kinds(json_api: JsonApi) -> None:
    json_api.points = [{"ad": "a1", "at": "2024-03-10T05:00:00Z", "cost": {"amount": 4}, "clicks": 2}]
    async with client_for(json_api) as client:
        provider = http_json(json_api, client, granularity="1h")
        points = await fetched(provider, Window(utc(2024, 3, 10), utc(2024, 3, 11), BERLIN))

    assert points == [MetricPoint("a1", utc(2024, 3, 10, 5), {"spend": 4.0, "clicks": 2.0}, granularity="1h")]
    assert provider.metric_kinds() == {"spend": MetricKind.COUNTER, "clicks": MetricKind.COUNTER,
                                       "budget": MetricKind.GAUGE}
    assert HttpJsonProvider.metric_kinds_of(provider.config) == provider.metric_kinds()


async def test_http_json_sends_the_token_in_the_configured_header(json_api: JsonApi) -> None:
    json_api.auth_header, json_api.auth_value = "X-Api-Key", "json-token"
    async with client_for(json_api) as client:
        entities = await listed(http_json(json_api, client, authHeader="X-Api-Key", authScheme=None))

    assert len(entities) == 5
    assert json_api.requests[0].headers["X-Api-Key"] == "json-token"
    assert "Authorization" not in json_api.requests[0].headers


@pytest.mark.parametrize(("retry_after", "expected"), [
    ("7", 7.0), ("Sun, 10 Mar 2024 12:00:30 GMT", 30.0), (None, 60.0)])
async def test_http_json_429_is_throttled_for_what_retry_after_says(
    json_api: JsonApi, retry_after: str | None, expected: float,
) -> None:
    json_api.throttle_first, json_api.retry_after = 1, retry_after
    async with client_for(json_api, now=lambda: utc(2024, 3, 10, 12, 0, 0)) as client:
        with pytest.raises(ThrottledError) as caught:
            await listed(http_json(json_api, client))

    assert caught.value.retry_after == expected
    assert caught.value.retryable
    assert caught.value.message == (f"{json_api.url('/v1/entities')} is rate limiting us (HTTP 429 Too Many Requests); "
                                    f"retry after {expected:g} s")


async def test_http_json_rejected_token_asks_to_reconnect(json_api: JsonApi) -> None:
    async with client_for(json_api) as client:
        with pytest.raises(CredentialsRejectedError) as caught:
            await listed(http_json(json_api, client, credential="expired", platformName="Acme Ads"))

    assert caught.value.message == (f"{json_api.url('/v1/entities')} rejected the token (HTTP 401 Unauthorized). "
                                    "Please reconnect Acme Ads.")
    assert not caught.value.retryable


async def test_http_json_answer_that_is_not_json_is_malformed(json_api: JsonApi) -> None:
    json_api.malformed = True
    async with client_for(json_api) as client:
        with pytest.raises(ProviderError) as caught:
            await listed(http_json(json_api, client))

    assert caught.value.message == f"malformed answer from {json_api.url('/v1/entities')}: {NOT_JSON}"
    assert not caught.value.retryable
    assert MALFORMED_BODY not in caught.value.message


@pytest.mark.parametrize(("point", "expected"), [
    ({"ad": "a1", "cost": {"amount": 1}}, "data[0] has no 'at' (metrics.capturedAt)"),
    ({"ad": "a1", "at": "noon"},
     "data[0] has 'noon' at 'at', not an ISO 8601 time or epoch seconds (metrics.capturedAt)"),
    ({"ad": "a1", "at": "2024-03-10T00:07:00Z"},
     "data[0] at 2024-03-10T00:07:00Z is not the start of a 15m bucket (granularity is 15m)"),
    ({"ad": "a1", "at": "2024-03-10T00:00:00Z", "cost": {"amount": "a lot"}},
     "data[0] cost.amount is 'a lot', not a number (metrics.values.spend.path)"),
    ({"at": "2024-03-10T00:00:00Z"}, "data[0] has no 'ad' (metrics.entityId)"),
])
async def test_http_json_point_without_what_the_config_names_is_malformed(
    json_api: JsonApi, point: dict[str, object], expected: str,
) -> None:
    json_api.points = [point]
    async with client_for(json_api) as client:
        with pytest.raises(ProviderError) as caught:
            await fetched(http_json(json_api, client), Window(utc(2024, 3, 10), utc(2024, 3, 11), BERLIN))

    url = json_api.url("/v1/metrics?from=2024-03-10T00:00:00Z&to=2024-03-11T00:00:00Z")
    assert caught.value.message == f"malformed answer from {url}: {expected}"


async def test_http_json_entity_at_an_unknown_level_is_malformed(json_api: JsonApi) -> None:
    json_api.entities = [{"id": "g1", "name": "Group", "level": "group"}]
    async with client_for(json_api) as client:
        with pytest.raises(ProviderError) as caught:
            await listed(http_json(json_api, client))

    assert caught.value.message == (
        f"malformed answer from {json_api.url('/v1/entities')}: data[0] has level 'group', not campaign, adset or ad "
        "(entities.level; set entities.fixedLevel when the list holds one level)")


async def test_http_json_fixed_level_applies_to_every_listed_entity(json_api: JsonApi) -> None:
    json_api.entities = [{"id": "a9", "name": "Banner"}]  # no level, no status, no parent
    async with client_for(json_api) as client:
        entities = await listed(http_json(json_api, client, entities={"fixedLevel": "ad"}))

    assert entities == [Entity("a9", "ad", "Banner", "")]


async def test_http_json_list_missing_from_the_answer_is_malformed(json_api: JsonApi) -> None:
    async with client_for(json_api) as client:
        with pytest.raises(ProviderError) as caught:
            await listed(http_json(json_api, client, entities={"items": "results"}))

    assert caught.value.message == (f"malformed answer from {json_api.url('/v1/entities')}: expected a list at "
                                    "results (entities.items), found nothing")


async def test_hanging_server_hits_the_per_request_timeout(json_api: JsonApi) -> None:
    json_api.hang = True
    async with client_for(json_api, timeout=0.3) as client:
        with pytest.raises(ProviderError) as caught:
            await listed(http_json(json_api, client))

    assert caught.value.retryable
    assert caught.value.message == (f"gave up on {json_api.url('/v1/entities')} after 0.3 s without a complete answer; "
                                    "a later try may succeed")


async def test_server_error_is_retryable(json_api: JsonApi) -> None:
    json_api.fail_first = 1
    async with client_for(json_api) as client:
        with pytest.raises(ProviderError) as caught:
            await listed(http_json(json_api, client))

    assert caught.value.retryable
    assert caught.value.message == (f"{json_api.url('/v1/entities')} answered HTTP 503 Service Unavailable; "
                                    "a later try may succeed")


async def test_redirect_is_refused_not_followed(json_api: JsonApi) -> None:
    json_api.redirect_to = json_api.url("/v2/entities")
    async with client_for(json_api) as client:
        with pytest.raises(ProviderError) as caught:
            await listed(http_json(json_api, client))

    assert not caught.value.retryable
    assert caught.value.message == (
        f"{json_api.url('/v1/entities')} answered HTTP 302 Found, a redirect to {json_api.url('/v2/entities')}; API "
        "requests do not follow redirects (the token would go along): put the final URL in the connection's config")
    assert [seen.path for seen in json_api.requests] == ["/v1/entities"]


# --- The network policy --------------------------------------------------------------------------------------


async def test_provider_url_at_a_private_address_is_refused(client: ApiClient) -> None:
    provider = HttpJsonProvider(HttpJsonProvider.parse_config({
        "entitiesUrl": "http://10.0.0.1/v1/entities", "metricsUrl": "http://10.0.0.1/v1/metrics",
        "metrics": {"values": {"spend": {"path": "spend"}}},
    }), Credentials(token="json-token"), client)

    with pytest.raises(ProviderError) as caught:
        await listed(provider)

    assert not caught.value.retryable
    assert caught.value.message == ("refused http://10.0.0.1/v1/entities: 10.0.0.1 is a private address; set "
                                    "allowPrivateNetworks: true in the connection's config to allow it")


async def test_name_resolving_to_a_private_address_reaches_no_server(json_api: JsonApi) -> None:
    resolver = FakeResolver({"ads.example.com": ["127.0.0.1"]})
    async with ApiClient(resolver=resolver) as client:  # the server listens there, but is not allowed
        provider = HttpJsonProvider(HttpJsonProvider.parse_config({
            "entitiesUrl": f"http://ads.example.com:{json_api.port}/v1/entities",
            "metricsUrl": f"http://ads.example.com:{json_api.port}/v1/metrics",
            "metrics": {"values": {"spend": {"path": "spend"}}},
        }), Credentials(token="json-token"), client)
        with pytest.raises(ProviderError) as caught:
            await listed(provider)

    assert caught.value.message == (
        f"refused http://ads.example.com:{json_api.port}/v1/entities: ads.example.com resolves to 127.0.0.1, a "
        "loopback address; set allowPrivateNetworks: true in the connection's config to allow it")
    assert resolver.calls == ["ads.example.com"]
    assert json_api.requests == []


async def test_allow_private_networks_lets_a_connection_reach_an_api_in_the_cluster(
    json_api: JsonApi, client: ApiClient,
) -> None:
    entities = await listed(http_json(json_api, client, allowPrivateNetworks=True))

    assert len(entities) == 5


# --- Credentials and config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("provider", "config", "secret", "expected"), [
    (HttpJsonProvider, {}, "", "No token configured. Please reconnect."),
    (HttpJsonProvider, {}, "abc123", None),
    (HttpJsonProvider, {"requireRefreshToken": True}, '{"access_token": "abc"}',
     "Missing refresh token. Please reconnect."),
    (HttpJsonProvider, {"requireRefreshToken": True, "platformName": "Google Ads"}, '{"access_token": "abc"}',
     "Missing refresh token. Please reconnect Google Ads."),
    (HttpJsonProvider, {"requireRefreshToken": True}, '{"access_token": "abc", "refresh_token": "def"}', None),
    (HttpJsonProvider, {"platformName": "Google Ads"}, '{"refresh_token": "def"}',
     "No token configured. Please reconnect Google Ads."),
    (MetaAdsProvider, {}, "", "No token configured. Please reconnect Meta Ads."),
    (MetaAdsProvider, {}, "EAAB-long-lived", None),
])
def test_check_credentials_says_what_the_user_must_do(
    provider: type[Provider], config: dict[str, object], secret: str, expected: str | None,
) -> None:
    base: dict[str, object] = {"adAccountId": "1"} if provider is MetaAdsProvider else {
        "entitiesUrl": "https://ads.example.com/e", "metricsUrl": "https://ads.example.com/m",
        "metrics": {"values": {"spend": {"path": "spend"}}}}

    refused = provider.check_credentials(Credentials.from_text(secret), provider.parse_config(base | config))

    assert refused == expected


HTTP_JSON_BASE: dict[str, object] = {
    "entitiesUrl": "https://ads.example.com/e", "metricsUrl": "https://ads.example.com/m?from={start}",
    "metrics": {"values": {"spend": {"path": "spend"}}},
}


@pytest.mark.parametrize(("provider", "config", "expected"), [
    (HttpJsonProvider, {}, "config.entitiesUrl: Field required; config.metricsUrl: Field required; "
                           "config.metrics: Field required"),
    (HttpJsonProvider, HTTP_JSON_BASE | {"metricsUrl": "https://ads.example.com/m?since={since}"},
     "config.metricsUrl: unknown placeholder {since} in 'https://ads.example.com/m?since={since}'; the placeholders "
     "are {start} and {end} (the window's bounds, ISO 8601 UTC)"),
    (HttpJsonProvider, HTTP_JSON_BASE | {"entitiesUrl": "https://ads.example.com/e?from={start}"},
     "config.entitiesUrl: unknown placeholder {start} in 'https://ads.example.com/e?from={start}'; this URL takes no "
     "placeholders"),
    (HttpJsonProvider, HTTP_JSON_BASE | {"entitiesUrl": "ftp://ads.example.com/e"},
     "config.entitiesUrl: 'ftp://ads.example.com/e' is not an http(s) URL with a host; use a URL like "
     "'https://ads.example.com/v1/stats'"),
    (HttpJsonProvider, HTTP_JSON_BASE | {"pagination": {"type": "cursor", "cursorPath": "next"}},
     "config.pagination: type cursor needs cursorPath (where the next cursor is in the answer) and cursorParam "
     "(the query parameter that sends it back)"),
    (HttpJsonProvider, HTTP_JSON_BASE | {"pagination": {"type": "offset"}},
     "config.pagination.type: Input should be 'none', 'cursor' or 'page'"),
    (HttpJsonProvider, HTTP_JSON_BASE | {"metrics": {"values": {"spend": {"pth": "spend", "kind": "sum"}}}},
     "config.metrics.values.spend.path: Field required; config.metrics.values.spend.kind: Input should be 'counter' "
     "or 'gauge'; config.metrics.values.spend.pth: unknown field (known: path, kind)"),
    (HttpJsonProvider, HTTP_JSON_BASE | {"granularity": "5m"}, "config.granularity: Input should be '15m' or '1h'"),
    (HttpJsonProvider, HTTP_JSON_BASE | {"authHeader": "Api Key:"},
     "config.authHeader: 'Api Key:' is not an HTTP header name; use letters, digits and '-', like 'Authorization' or "
     "'X-Api-Key'"),
    (HttpJsonProvider, HTTP_JSON_BASE | {"metrics": {"values": {}}},
     'config.metrics.values: name at least one metric, like {"spend": {"path": "cost"}}'),
    (HttpJsonProvider, HTTP_JSON_BASE | {"allowPrivateNetwork": True},
     "config.allowPrivateNetwork: unknown field (known: allowPrivateNetworks, entitiesUrl, metricsUrl, authHeader, "
     "authScheme, entities, metrics, pagination, granularity, requireRefreshToken, platformName)"),
    (MetaAdsProvider, {}, "config.adAccountId: Field required"),
    (MetaAdsProvider, {"adAccountId": "act_12x"},
     "config.adAccountId: 'act_12x' is not an ad account id; use its digits, like '1234567890' (act_1234567890 works "
     "too)"),
    (MetaAdsProvider, {"adAccountId": "1", "baseUrl": "graph.facebook.com/v21.0"},
     "config.baseUrl: 'graph.facebook.com/v21.0' is not an http(s) URL with a host (and no query); use the Graph "
     "API's address with its version, like 'https://graph.facebook.com/v21.0'"),
    (MetaAdsProvider, {"adAccountId": "1", "pageSize": 0},
     "config.pageSize: Input should be greater than or equal to 1"),
])
def test_invalid_config_names_the_field_and_what_would_be_valid(
    provider: type[Provider], config: dict[str, object], expected: str,
) -> None:
    with pytest.raises(ProviderError) as caught:
        provider.parse_config(config)

    assert caught.value.message == f"invalid {provider.name} connection config: {expected}"
    assert not caught.value.retryable


def test_meta_config_takes_the_account_with_or_without_act_and_snake_case_names() -> None:
    assert MetaAdsProvider.parse_config({"adAccountId": "act_123"}) == MetaAdsProvider.parse_config(
        {"ad_account_id": 123})


def test_the_built_in_providers_are_registered() -> None:
    providers = load_providers()

    assert providers["http-json"] is HttpJsonProvider
    assert providers["meta-ads"] is MetaAdsProvider


# --- meta-ads ------------------------------------------------------------------------------------------------

ACCOUNT = "act_1234567890"


def meta_ads(api: MetaApi, client: ApiClient, credential: str = "meta-token", **config: object) -> MetaAdsProvider:
    settings = MetaAdsProvider.parse_config({"adAccountId": api.account_id, "baseUrl": api.base_url, **config})
    return MetaAdsProvider(settings, Credentials(token=credential), client)


@pytest.fixture
async def meta() -> AsyncIterator[MetaApi]:
    async with MetaApi(
        page_size=2,
        campaigns=[{"id": f"c{n}", "name": f"Campaign {n}", "effective_status": "ACTIVE"} for n in (1, 2, 3)],
        adsets=[{"id": "s1", "name": "DE", "effective_status": "ACTIVE", "campaign_id": "c1"},
                {"id": "s2", "name": "FR", "effective_status": "CAMPAIGN_PAUSED", "campaign_id": "c2"}],
        ads=[{"id": f"a{n}", "name": f"Ad {n}", "effective_status": "ACTIVE", "adset_id": "s1"} for n in (1, 2, 3)],
    ) as api:
        yield api


async def test_meta_lists_campaigns_adsets_and_ads_across_pages(meta: MetaApi) -> None:
    async with client_for(meta) as client:
        entities = await listed(meta_ads(meta, client))

    assert entities == [
        Entity("c1", "campaign", "Campaign 1", "ACTIVE"),
        Entity("c2", "campaign", "Campaign 2", "ACTIVE"),
        Entity("c3", "campaign", "Campaign 3", "ACTIVE"),
        Entity("s1", "adset", "DE", "ACTIVE", parent_id="c1"),
        Entity("s2", "adset", "FR", "CAMPAIGN_PAUSED", parent_id="c2"),
        Entity("a1", "ad", "Ad 1", "ACTIVE", parent_id="s1"),
        Entity("a2", "ad", "Ad 2", "ACTIVE", parent_id="s1"),
        Entity("a3", "ad", "Ad 3", "ACTIVE", parent_id="s1"),
    ]
    assert [seen.path.rsplit("/", 1)[1] for seen in meta.requests] == [
        "campaigns", "campaigns", "adsets", "ads", "ads"]
    assert meta.requests[2].query["fields"] == "id,name,effective_status,campaign_id"
    # paging.next carried the token; it was not sent back in a URL, only in the header
    assert all("access_token" not in seen.query for seen in meta.requests)
    assert all(seen.headers["Authorization"] == "Bearer meta-token" for seen in meta.requests)


async def test_meta_insights_ask_for_hourly_ad_rows_of_each_local_day(meta: MetaApi) -> None:
    async with client_for(meta) as client:
        await fetched(meta_ads(meta, client), local_day(date(2024, 6, 3), NEW_YORK, days=2))

    assert [dict(seen.query) for seen in meta.requests] == [{
        "level": "ad", "fields": "ad_id,spend,impressions,clicks,actions,action_values", "time_increment": "1",
        "time_range": json.dumps({"since": day, "until": day}, separators=(",", ":")),
        "breakdowns": "hourly_stats_aggregated_by_advertiser_time_zone", "limit": "500",
    } for day in ("2024-06-03", "2024-06-04")]


async def test_meta_points_are_utc_hours_with_conversions_and_revenue_summed_over_action_types(meta: MetaApi) -> None:
    meta.insights[date(2024, 6, 3)] = [
        insight_row("a1", 0, spend="1.50", impressions="100", clicks="4",
                    actions=[{"action_type": "purchase", "value": "2"}, {"action_type": "lead", "value": "1"},
                             {"action_type": "link_click", "value": "4"}],
                    action_values=[{"action_type": "purchase", "value": "59.90"}]),
        insight_row("a1", 13, spend="0.25"),  # no actions: Meta leaves the field out
        insight_row("a2", 23, spend="3", impressions="0", clicks="0"),
    ]
    async with client_for(meta) as client:
        points = await fetched(meta_ads(meta, client, conversionActionTypes=["purchase", "lead"]),
                               local_day(date(2024, 6, 3), NEW_YORK))

    zero = {"conversions": 0.0, "revenue": 0.0}
    assert points == [
        MetricPoint("a1", utc(2024, 6, 3, 4), {"spend": 1.5, "impressions": 100.0, "clicks": 4.0, "conversions": 3.0,
                                               "revenue": 59.9}, granularity="1h"),
        MetricPoint("a1", utc(2024, 6, 3, 17), {"spend": 0.25, "impressions": 100.0, "clicks": 4.0, **zero},
                    granularity="1h"),
        MetricPoint("a2", utc(2024, 6, 4, 3), {"spend": 3.0, "impressions": 0.0, "clicks": 0.0, **zero},
                    granularity="1h"),
    ]
    assert MetaAdsProvider.metric_kinds_of(meta_ads(meta, client).config) == dict.fromkeys(
        ("spend", "impressions", "clicks", "conversions", "revenue"), MetricKind.COUNTER)


async def test_meta_local_hours_on_the_day_clocks_spring_forward(meta: MetaApi) -> None:
    # Europe/Berlin, 2024-03-31: 02:00 CET becomes 03:00 CEST, the day has 23 hours. A row for the hour that did
    # not happen (02) lands on the same UTC hour as 03 and is added to it, not written twice.
    meta.insights[date(2024, 3, 31)] = [insight_row("a1", hour, spend="1", impressions="10", clicks="1")
                                        for hour in (0, 1, 2, 3, 23)]
    async with client_for(meta) as client:
        points = await fetched(meta_ads(meta, client), local_day(date(2024, 3, 31), BERLIN))

    assert [(point.captured_at, point.metrics["spend"]) for point in points] == [
        (utc(2024, 3, 30, 23), 1.0), (utc(2024, 3, 31, 0), 1.0), (utc(2024, 3, 31, 1), 2.0),
        (utc(2024, 3, 31, 21), 1.0)]


async def test_meta_local_hours_on_the_day_clocks_fall_back(meta: MetaApi) -> None:
    # Europe/Berlin, 2024-10-27: 03:00 CEST becomes 02:00 CET, the day has 25 hours. Meta's one "02" row is
    # the first 02:00 (CEST); the repeated hour has no row of its own.
    meta.insights[date(2024, 10, 27)] = [insight_row("a1", hour) for hour in (1, 2, 3)]
    async with client_for(meta) as client:
        points = await fetched(meta_ads(meta, client), local_day(date(2024, 10, 27), BERLIN))

    assert [point.captured_at for point in points] == [utc(2024, 10, 26, 23), utc(2024, 10, 27, 0),
                                                       utc(2024, 10, 27, 2)]


@pytest.mark.parametrize(("throttle", "retry_after", "said"), [
    (MetaThrottle(4, 1504022, "Application request limit reached"), 300.0,
     "error 4/1504022: Application request limit reached"),
    (MetaThrottle(17, 2446079, "User request limit reached"), 300.0, "error 17/2446079: User request limit reached"),
    (MetaThrottle(32, None, "Page request limit reached"), 300.0, "error 32: Page request limit reached"),
    (MetaThrottle(613, 1487742, "There have been too many calls from this ad-account. Please wait a bit and try "
                                "again."), 300.0,
     "error 613/1487742: There have been too many calls from this ad-account. Please wait a bit and try again."),
    (MetaThrottle(80000, 2446079, "There have been too many calls from this ad-account.", regain_minutes=12), 720.0,
     "error 80000/2446079: There have been too many calls from this ad-account."),
    (MetaThrottle(80014, None, "Too many calls.", status=403, regain_minutes=3), 180.0, "error 80014: Too many calls."),
    (MetaThrottle(100, None, "Calls to this api have exceeded the rate limit.", regain_minutes=2), 120.0,
     "error 100: Calls to this api have exceeded the rate limit."),
])
async def test_meta_rate_limits_become_throttled_errors(
    meta: MetaApi, throttle: MetaThrottle, retry_after: float, said: str,
) -> None:
    meta.throttle, meta.throttle_first = throttle, 1
    async with client_for(meta) as client:
        with pytest.raises(ThrottledError) as caught:
            await listed(meta_ads(meta, client))

    assert caught.value.retry_after == retry_after
    assert caught.value.message == f"Meta is rate limiting ad account {ACCOUNT} ({said}); retry after {retry_after:g} s"


async def test_meta_usage_header_on_a_good_page_defers_the_next_request(meta: MetaApi) -> None:
    meta.success_regain_minutes = 2
    seen: list[Entity] = []
    async with client_for(meta, now=lambda: utc(2024, 6, 3, 12)) as client:
        with pytest.raises(ThrottledError) as caught:
            await list_into(seen, meta_ads(meta, client))

    assert [entity.platform_id for entity in seen] == ["c1", "c2"]  # the page that came is kept
    assert len(meta.requests) == 1
    assert caught.value.retry_after == 120.0
    assert caught.value.message == (f"Meta is rate limiting ad account {ACCOUNT} (x-business-use-case-usage: access "
                                    "returns in 2 min); retry after 120 s")


async def test_meta_expired_token_is_rejected_with_a_reconnect_message(meta: MetaApi) -> None:
    meta.expired_tokens = frozenset({"old-token"})
    async with client_for(meta) as client:
        with pytest.raises(CredentialsRejectedError) as caught:
            await listed(meta_ads(meta, client, credential="old-token"))

    assert not caught.value.retryable
    assert caught.value.message == (
        "Meta rejected the access token (error 190/463: Error validating access token: Session has expired on "
        "Tuesday, 05-Mar-24 04:00:00 PST.). Please reconnect Meta Ads.")


async def test_meta_paging_next_on_another_origin_is_refused(meta: MetaApi) -> None:
    async with JsonApi() as elsewhere:
        meta.next_origin = elsewhere.origin
        seen: list[Entity] = []
        async with client_for(meta, elsewhere) as client:
            with pytest.raises(ProviderError) as caught:
                await list_into(seen, meta_ads(meta, client))

    assert caught.value.message == (
        f"refused to follow paging.next to {elsewhere.origin}/v21.0/{ACCOUNT}/campaigns: it is not on {meta.origin}, "
        "the configured baseUrl's origin, and the access token must not be sent anywhere else")
    assert not caught.value.retryable
    assert "meta-token" not in caught.value.message
    assert elsewhere.requests == []
    assert len(seen) == 2


async def test_meta_answer_that_is_not_json_is_malformed(meta: MetaApi) -> None:
    meta.malformed = True
    async with client_for(meta) as client:
        with pytest.raises(ProviderError) as caught:
            await listed(meta_ads(meta, client))

    assert not caught.value.retryable
    assert caught.value.message == (f"malformed answer from {meta.base_url}/{ACCOUNT}/campaigns?fields=id%2Cname"
                                    f"%2Ceffective_status&limit=500: {NOT_JSON}")


async def test_meta_row_without_an_hour_is_malformed(meta: MetaApi) -> None:
    meta.insights[date(2024, 6, 3)] = [{"ad_id": "a1", "spend": "1"}]
    async with client_for(meta) as client:
        with pytest.raises(ProviderError) as caught:
            await fetched(meta_ads(meta, client), local_day(date(2024, 6, 3), NEW_YORK))

    assert caught.value.message.endswith(": data[0] has hourly_stats_aggregated_by_advertiser_time_zone None, not an "
                                         "hour like '13:00:00 - 13:59:59'")


# --- The pure parts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "shown"), [
    ("https://graph.facebook.com/v21.0/act_1/ads?limit=2&access_token=EAAB&after=x",
     "https://graph.facebook.com/v21.0/act_1/ads?limit=2&access_token=***&after=x"),
    ("https://user:secret@ads.example.com/e?api_key=k", "https://***@ads.example.com/e?api_key=***"),
    ("https://ads.example.com/e?from=2024", "https://ads.example.com/e?from=2024"),
])
def test_urls_are_shown_without_secrets(url: str, shown: str) -> None:
    assert shown_url(url) == shown


def test_query_parameters_are_appended_encoded() -> None:
    assert with_query("https://a.example/x?y=1", {"time_range": '{"since":"2024-06-03"}'}) == (
        "https://a.example/x?y=1&time_range=%7B%22since%22%3A%222024-06-03%22%7D")


@pytest.mark.parametrize(("header", "seconds"), [
    (buc_header(12), 720.0), (buc_header(0), 0.0), ("not json", 0.0), ('["a list"]', 0.0),
    (json.dumps({"1": [{"estimated_time_to_regain_access": 1}], "2": [{"estimated_time_to_regain_access": 5}]}), 300.0),
])
def test_the_business_use_case_header_says_when_access_returns(header: str, seconds: float) -> None:
    assert regain_access_seconds({"x-business-use-case-usage": header}) == seconds


def test_a_window_covers_the_local_days_it_touches() -> None:
    window = Window(utc(2024, 3, 30, 23), utc(2024, 4, 1, 22), BERLIN)  # Berlin midnight to midnight, two days

    assert local_days(window) == [date(2024, 3, 31), date(2024, 4, 1)]
