"""The scrape benchmark's local website: listing pages linking detail pages that each hold a schema.org Event.

A module of its own, importing only aiohttp: it is served from a spawned child process, which imports it afresh
(the scrapers' modules would cost that child a second of CPU for nothing).
"""

from __future__ import annotations

import json

from aiohttp import web


def serve_site(port: int, listings: int, details: int) -> None:
    """The local website, alone in a child process: it must not share a GIL with either scraper."""

    async def listing(request: web.Request) -> web.Response:
        page = int(request.match_info["page"])
        links = "".join(f'<a class="event" href="/events/{page}-{n}">event {n}</a>' for n in range(details))
        return web.Response(text=f"<html><body>{links}</body></html>", content_type="text/html")

    async def detail(request: web.Request) -> web.Response:
        event = {"@context": "https://schema.org", "@type": "MusicEvent", "name": request.match_info["id"],
                 "startDate": "2026-06-01T20:00"}
        script = f'<script type="application/ld+json">{json.dumps(event)}</script>'
        body = f"<html><head>{script}</head><body>x</body></html>"
        return web.Response(text=body, content_type="text/html")

    async def robots(_: web.Request) -> web.Response:
        return web.Response(text="User-agent: *\nAllow: /\n")

    app = web.Application()
    app.router.add_get("/list/{page}", listing)
    app.router.add_get("/events/{id}", detail)
    app.router.add_get("/robots.txt", robots)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)
