"""Local stand-ins for the providers' APIs: aiohttp servers on loopback speaking the documented formats.

`MetaApi` answers like Meta's Marketing API (Graph API error objects, cursor paging with `paging.next` URLs that
carry `access_token` the way Meta writes them, the `x-business-use-case-usage` header); `JsonApi` is a plain
JSON API for the http-json provider (cursor, page-number or no paging; 401 for a bad token; 429 with
Retry-After). Both are configured per test: data, page size, the first N requests throttled or failing, an
expired token, a malformed body, a server that hangs. Every request is logged.

They listen on 127.0.0.1 (a free port), itself a private address: an `ApiClient` reaches them only through
`extra_allowed` (see `client_for`) or a config with `allowPrivateNetworks: true`.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from ipaddress import IPv4Address
from typing import Literal, Self
from urllib.parse import urlencode

from aiohttp import web

from kubearq.worker.net.policy import Endpoint
from kubearq.worker.sync.http import ApiClient

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MALFORMED_BODY = "<html><body>Service temporarily unavailable</body></html>"


@dataclass(frozen=True)
class Seen:
    """One request as the server received it."""

    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]


class ApiServer:
    """An aiohttp application on a loopback port; the knobs every stand-in shares."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.port = 0
        self.hang = False
        """Answer nothing until the server stops (a server that accepted the request and went silent)."""
        self.malformed = False
        """Answer 200 with an HTML page instead of JSON."""
        self.fail_first = 0
        """Answer this many requests with `fail_status` (a server error) before answering normally."""
        self.fail_status = 503
        self.throttle_first = 0
        """Throttle this many requests (after any failures), the way the platform signals it."""
        self._runner: web.AppRunner | None = None
        self._released = asyncio.Event()

    @property
    def endpoint(self) -> Endpoint:
        return IPv4Address("127.0.0.1"), self.port

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        app = web.Application(middlewares=[self._knobs])
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._released.set()  # a hanging handler returns, so that cleanup does not wait for it
        if self._runner is not None:
            await self._runner.cleanup()

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def throttled(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    @web.middleware
    async def _knobs(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append(Seen(request.path, dict(request.query), dict(request.headers)))
        if self.hang:
            await self._released.wait()
            return web.Response(status=504)
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.json_response({"error": "try again"}, status=self.fail_status)
        if self.throttle_first > 0:
            self.throttle_first -= 1
            return self.throttled(request)
        if self.malformed:
            return web.Response(text=MALFORMED_BODY, content_type="text/html")
        return await handler(request)


def client_for(*servers: ApiServer, timeout: float = 5.0, now: Callable[[], datetime] | None = None) -> ApiClient:
    """An ApiClient that may reach exactly these servers (by address and port), nothing else private."""
    allowed = frozenset(server.endpoint for server in servers)
    if now is None:
        return ApiClient(timeout=timeout, extra_allowed=allowed)
    return ApiClient(timeout=timeout, extra_allowed=allowed, now=now)


def _cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode()


def _offset(cursor: str | None) -> int:
    if not cursor:
        return 0
    return int(base64.urlsafe_b64decode(cursor.encode()).decode().removeprefix("offset:"))


# --- Meta's Marketing API ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetaThrottle:
    """How Meta says "too many calls": a Graph API error object, and the Business Use Case header if any."""

    code: int
    subcode: int | None = None
    message: str = "User request limit reached"
    status: int = 400
    regain_minutes: int | None = None
    """`estimated_time_to_regain_access` in `x-business-use-case-usage` (None: no header)."""


def buc_header(minutes: int, kind: str = "ads_insights") -> str:
    """`x-business-use-case-usage` as the Graph API rate-limiting page shows it."""
    return json.dumps({"1234567890": [{
        "type": kind, "call_count": 100 if minutes else 28, "total_cputime": 25, "total_time": 25,
        "estimated_time_to_regain_access": minutes, "ads_api_access_tier": "standard_access",
    }]})


@dataclass
class MetaApi(ApiServer):
    """Graph API `/v21.0/act_{id}/campaigns|adsets|ads|insights` for one ad account."""

    account_id: str = "1234567890"
    version: str = "v21.0"
    campaigns: list[dict[str, object]] = field(default_factory=list)
    adsets: list[dict[str, object]] = field(default_factory=list)
    ads: list[dict[str, object]] = field(default_factory=list)
    insights: dict[date, list[dict[str, object]]] = field(default_factory=dict)
    """Rows by local date, without date_start/date_stop (added as Meta adds them)."""
    page_size: int = 25
    """The most rows per page, whatever `limit` asks."""
    tokens: frozenset[str] = frozenset({"meta-token"})
    expired_tokens: frozenset[str] = frozenset()
    throttle: MetaThrottle = MetaThrottle(17, 2446079)
    success_regain_minutes: int | None = None
    """Send `x-business-use-case-usage` with this estimate on successful answers too."""
    next_origin: str | None = None
    """Write `paging.next` URLs on this origin instead of the server's own."""

    def __post_init__(self) -> None:
        super().__init__()

    @property
    def base_url(self) -> str:
        return f"{self.origin}/{self.version}"

    def routes(self, app: web.Application) -> None:
        app.router.add_get(f"/{self.version}/act_{{account}}/{{edge}}", self._edge)

    def throttled(self, request: web.Request) -> web.StreamResponse:
        throttle = self.throttle
        headers = {} if throttle.regain_minutes is None else {
            "x-business-use-case-usage": buc_header(throttle.regain_minutes)}
        error: dict[str, object] = {"message": throttle.message, "type": "OAuthException", "code": throttle.code,
                                    "fbtrace_id": "AbCdEfGh"}
        if throttle.subcode is not None:
            error["error_subcode"] = throttle.subcode
        return web.json_response({"error": error}, status=throttle.status, headers=headers)

    async def _edge(self, request: web.Request) -> web.StreamResponse:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ") or request.query.get("access_token")
        if token in self.expired_tokens:
            return _graph_error(400, 190, "Error validating access token: Session has expired on Tuesday, "
                                          "05-Mar-24 04:00:00 PST.", subcode=463)
        if token not in self.tokens:
            return _graph_error(400, 190, "Invalid OAuth access token - Cannot parse access token")
        if request.match_info["account"] != self.account_id:
            return _graph_error(400, 100, "Unsupported get request.", kind="GraphMethodException")
        edge = request.match_info["edge"]
        if edge == "insights":
            rows = self._insight_rows(request)
        elif edge in ("campaigns", "adsets", "ads"):
            fields = request.query.get("fields", "id").split(",")
            rows = [{key: value for key, value in row.items() if key in fields or key == "id"}
                    for row in getattr(self, edge)]
        else:
            return _graph_error(400, 100, f"Tried accessing nonexisting field ({edge})")
        return self._page(request, rows, token or "")

    def _insight_rows(self, request: web.Request) -> list[dict[str, object]]:
        window = json.loads(request.query["time_range"])
        day, until = date.fromisoformat(window["since"]), date.fromisoformat(window["until"])
        rows: list[dict[str, object]] = []
        while day <= until:
            rows += [{**row, "date_start": day.isoformat(), "date_stop": day.isoformat()}
                     for row in self.insights.get(day, [])]
            day += timedelta(days=1)
        return rows

    def _page(self, request: web.Request, rows: Sequence[dict[str, object]], token: str) -> web.StreamResponse:
        start = _offset(request.query.get("after"))
        size = min(int(request.query.get("limit", "25")), self.page_size)
        page = list(rows[start:start + size])
        answer: dict[str, object] = {"data": page}
        paging: dict[str, object] = {"cursors": {"before": _cursor(start), "after": _cursor(start + len(page))}}
        if start + size < len(rows):
            # Meta writes the token into the next URL when it came as a parameter; we always do (worst case).
            query = {key: value for key, value in request.query.items() if key not in ("after", "access_token")}
            query |= {"access_token": token, "after": _cursor(start + size)}
            paging["next"] = f"{self.next_origin or self.origin}{request.path}?{urlencode(query)}"
        answer["paging"] = paging
        headers = {} if self.success_regain_minutes is None else {
            "x-business-use-case-usage": buc_header(self.success_regain_minutes)}
        return web.json_response(answer, headers=headers)


def _graph_error(status: int, code: int, message: str, *, subcode: int | None = None,
                 kind: str = "OAuthException") -> web.Response:
    error: dict[str, object] = {"message": message, "type": kind, "code": code, "fbtrace_id": "AbCdEfGh"}
    if subcode is not None:
        error["error_subcode"] = subcode
    return web.json_response({"error": error}, status=status)


def insight_row(ad_id: str, hour: int, *, spend: str = "1.50", impressions: str = "100", clicks: str = "4",
                actions: list[dict[str, str]] | None = None,
                action_values: list[dict[str, str]] | None = None) -> dict[str, object]:
    """A row of `/insights?level=ad&breakdowns=hourly_stats_aggregated_by_advertiser_time_zone`, as Meta writes it."""
    row: dict[str, object] = {
        "ad_id": ad_id, "spend": spend, "impressions": impressions, "clicks": clicks,
        "hourly_stats_aggregated_by_advertiser_time_zone": f"{hour:02d}:00:00 - {hour:02d}:59:59",
    }
    if actions is not None:
        row["actions"] = actions
    if action_values is not None:
        row["action_values"] = action_values
    return row


# --- A plain JSON API (http-json) -------------------------------------------------------------------------------


@dataclass
class JsonApi(ApiServer):
    """`/v1/entities` and `/v1/metrics` of an ad platform with a JSON API of its own."""

    entities: list[dict[str, object]] = field(default_factory=list)
    points: list[dict[str, object]] = field(default_factory=list)
    paging: Literal["none", "cursor", "page"] = "none"
    page_size: int = 2
    """Items per page; with page paging a `per_page` parameter overrides it."""
    auth_header: str = "Authorization"
    auth_value: str = "Bearer json-token"
    retry_after: str | None = "7"
    """The Retry-After of a throttled answer (None: no header)."""
    redirect_to: str | None = None
    """Answer every request with a 302 to this URL."""

    def __post_init__(self) -> None:
        super().__init__()

    def url(self, path: str) -> str:
        return f"{self.origin}{path}"

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/entities", self._entities)
        app.router.add_get("/v1/metrics", self._metrics)

    def throttled(self, request: web.Request) -> web.StreamResponse:
        headers = {} if self.retry_after is None else {"Retry-After": self.retry_after}
        return web.json_response({"error": "rate limit exceeded"}, status=429, headers=headers)

    async def _entities(self, request: web.Request) -> web.StreamResponse:
        return self._listing(request, self.entities)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        return self._listing(request, self.points)

    def _listing(self, request: web.Request, items: Sequence[dict[str, object]]) -> web.StreamResponse:
        if self.redirect_to is not None:
            raise web.HTTPFound(self.redirect_to)
        if request.headers.get(self.auth_header) != self.auth_value:
            return web.json_response({"error": {"message": "token expired"}}, status=401)
        if self.paging == "none":
            return web.json_response({"data": list(items)})
        if self.paging == "page":
            size = int(request.query.get("per_page", self.page_size))
            number = int(request.query.get("page", "1"))
            return web.json_response({"data": list(items[(number - 1) * size:number * size])})
        start = _offset(request.query.get("cursor"))
        following = _cursor(start + self.page_size) if start + self.page_size < len(items) else None
        return web.json_response({"data": list(items[start:start + self.page_size]), "meta": {"next": following}})
