"""A local ad platform for the demo and the sync tests: accounts with campaigns, ad sets and ads, and metrics
for every 15 minutes of any window, the same for the same (account, ad, time) whenever asked.

It speaks what the `http-json` provider reads: `GET /v1/accounts/<account>/entities` and
`GET /v1/accounts/<account>/metrics?start=...&end=...` (ISO 8601 UTC), a Bearer token per account, cursor paging
(`meta.next`), 429 with Retry-After when throttling. Knobs per account make it fail, throttle, hang or answer
garbage, so a test can break one connection and watch the others carry on.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Self

from aiohttp import web

QUARTER = timedelta(minutes=15)
ENTITIES_PAGE = 50
METRICS_PAGE = 500
COUNTERS = ("spend", "impressions", "clicks", "conversions", "revenue", "video_views")
GAUGES = ("daily_budget",)


@dataclass
class Account:
    """One advertiser: a campaign with `ad_sets` ad sets of `ads_per_set` ads each."""

    name: str
    token: str
    ad_sets: int = 1
    ads_per_set: int = 2
    fail: bool = False  # every request answers 503
    throttle: int = 0  # the next this many requests answer 429
    hang: bool = False  # requests never answer
    garbage: bool = False  # answers are not JSON
    delay: float = 0.0  # seconds before each metrics answer (a slow platform)

    def entities(self) -> list[dict[str, object]]:
        found: list[dict[str, object]] = [{"id": f"{self.name}-c1", "level": "campaign", "name": f"{self.name} spring",
                                           "status": "ACTIVE", "parentId": None}]
        for s in range(1, self.ad_sets + 1):
            found.append({"id": f"{self.name}-s{s}", "level": "adset", "name": f"set {s}", "status": "ACTIVE",
                          "parentId": f"{self.name}-c1"})
            found += [{"id": f"{self.name}-s{s}-a{a}", "level": "ad", "name": f"ad {s}.{a}", "status": "ACTIVE",
                       "parentId": f"{self.name}-s{s}"} for a in range(1, self.ads_per_set + 1)]
        return found

    def ads(self) -> list[str]:
        return [str(entity["id"]) for entity in self.entities() if entity["level"] == "ad"]


def metrics_of(account: str, ad: str, at: datetime) -> dict[str, float]:
    """What the platform says of an ad's quarter hour starting `at`: counters, and the budget (a gauge)."""
    seed = zlib.crc32(f"{account}/{ad}/{int(at.timestamp())}".encode())
    return {"spend": seed % 500 / 100, "impressions": seed % 1000, "clicks": seed % 37, "conversions": seed % 3,
            "revenue": seed % 900 / 100, "video_views": seed % 50, "daily_budget": 100 + at.hour}


def quarter_hours(start: datetime, end: datetime) -> list[datetime]:
    """The quarter hours that start in [start, end)."""
    first = datetime.fromtimestamp(-(-int(start.timestamp()) // 900) * 900, UTC)
    moments = []
    while first < end:
        moments.append(first)
        first += QUARTER
    return moments


def http_json_config(base_url: str, account: str) -> dict[str, Any]:
    """The `config` of a connection to one account of this platform, for the `http-json` provider."""
    return {
        "entitiesUrl": f"{base_url}/v1/accounts/{account}/entities",
        "metricsUrl": f"{base_url}/v1/accounts/{account}/metrics?start={{start}}&end={{end}}",
        "pagination": {"type": "cursor", "cursorPath": "meta.next", "cursorParam": "cursor"},
        "metrics": {"values": {name: {"path": name, "kind": "counter"} for name in COUNTERS}
                    | {name: {"path": name, "kind": "gauge"} for name in GAUGES}},
        "allowPrivateNetworks": True,  # the platform listens on loopback
    }


@dataclass
class AdPlatform:
    """The server: `async with AdPlatform({...}) as platform:`, then `platform.base_url`."""

    accounts: Mapping[str, Account]
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[str] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_get("/v1/accounts/{account}/entities", self._entities)
        app.router.add_get("/v1/accounts/{account}/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _account(self, request: web.Request) -> Account | web.StreamResponse:
        self.requests.append(request.path_qs)
        account = self.accounts.get(request.match_info["account"])
        if account is None:
            return web.json_response({"error": {"message": "no such account"}}, status=404)
        if request.headers.get("Authorization") != f"Bearer {account.token}":
            return web.json_response({"error": {"message": "token expired"}}, status=401)
        if account.hang:
            await asyncio.Event().wait()
        if account.throttle > 0:
            account.throttle -= 1
            return web.json_response({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "1"})
        if account.fail:
            return web.json_response({"error": {"message": "upstream unavailable"}}, status=503)
        if account.garbage:
            return web.Response(text="<html>maintenance</html>", content_type="text/html")
        return account

    async def _entities(self, request: web.Request) -> web.StreamResponse:
        account = await self._account(request)
        if not isinstance(account, Account):
            return account
        return _page(request, account.entities(), ENTITIES_PAGE)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        account = await self._account(request)
        if not isinstance(account, Account):
            return account
        if account.delay:
            await asyncio.sleep(account.delay)
        try:
            start = datetime.fromisoformat(request.query["start"])
            end = datetime.fromisoformat(request.query["end"])
        except (KeyError, ValueError):
            return web.json_response({"error": {"message": "start and end must be ISO 8601 times"}}, status=400)
        points = [{"entityId": ad, "capturedAt": at.strftime("%Y-%m-%dT%H:%M:%SZ"), **metrics_of(account.name, ad, at)}
                  for at in quarter_hours(start, end) for ad in account.ads()]
        return _page(request, points, METRICS_PAGE)


def _page(request: web.Request, items: list[dict[str, object]], size: int) -> web.StreamResponse:
    offset = int(request.query.get("cursor") or 0)
    following = str(offset + size) if offset + size < len(items) else None
    return web.json_response({"data": items[offset:offset + size], "meta": {"next": following}})
