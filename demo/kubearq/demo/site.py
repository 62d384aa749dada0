"""The demo's local event website: a city calendar whose listing pages link detail pages carrying schema.org
JSON-LD Events, published in the shapes found in the wild.

Every page is generated from the event's number, so the site is the same on every run (dates follow the day it
runs, so the events are upcoming). Detail pages rotate through JSON-LD shapes: one plain object, an `@graph`
beside a WebPage and a BreadcrumbList, a top-level array beside the Organization, an `@type` list, two blocks on
one page, with schema.org subtypes (MusicEvent, TheaterEvent, …) that an `Event` extraction must find. Three
pages misbehave on purpose: one linked event is gone (404), one is disallowed by robots.txt, and one answers 503
to its first request (retried, then stored).
"""

from __future__ import annotations

import html
import json
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Self

from aiohttp import web

SITE_NAME = "Riverside Live"
FIRST_EVENT = 1001
USER_AGENT_RULES = "User-agent: *"
SHAPES = ("object", "graph", "array", "type-list", "two-blocks")
KINDS = (
    ("MusicEvent", "concert"), ("TheaterEvent", "play"), ("SportsEvent", "match"), ("ComedyEvent", "stand-up"),
    ("ExhibitionEvent", "exhibition"), ("Festival", "festival"), ("FoodEvent", "tasting"), ("DanceEvent", "dance"),
    ("LiteraryEvent", "reading"), ("ScreeningEvent", "screening"), ("ChildrensEvent", "family"), ("Event", "meetup"),
)
TITLES = {
    "MusicEvent": ("The Harbour Lights", "Nadia Okafor Trio", "Velvet Static", "Ada & the Lanterns", "Copper Sky"),
    "TheaterEvent": ("The Glass Orchard", "A Winter Ledger", "Hamlet, Abridged", "Small Hours", "The Ferryman's Son"),
    "SportsEvent": ("Riverside Rovers v Eastport", "City Half Marathon", "Women's Cup Semi-final", "Rowing Regatta",
                    "Basketball Derby"),
    "ComedyEvent": ("Late Laughs", "Open Mic Mayhem", "Sam Reyes: Unfiltered", "Improv Night", "Punchline Social"),
    "ExhibitionEvent": ("Maps of the Delta", "Light & Iron", "New Ceramics", "The River Archive", "Paper Cities"),
    "Festival": ("Street Food Weekend", "Lantern Festival", "Folk on the Quay", "Night Market", "Summer Jazz Days"),
    "FoodEvent": ("Natural Wine Tasting", "Cheese & Cider", "Dumpling Workshop", "Harvest Supper", "Coffee Cupping"),
    "DanceEvent": ("Salsa Under the Bridge", "Contemporary Double Bill", "Ceilidh", "Tango Milonga", "Swing Night"),
    "LiteraryEvent": ("Poetry at Dusk", "Crime Writers Panel", "Book Launch: Tidewater", "Zine Fair", "Story Slam"),
    "ScreeningEvent": ("Silent Film + Live Score", "Documentary Night", "Cult Classics", "Short Film Showcase",
                       "Animation Matinee"),
    "ChildrensEvent": ("Puppet Parade", "Science Saturday", "Storytime Pirates", "Junior Art Club", "Family Disco"),
    "Event": ("Makers Meetup", "Startup Breakfast", "Repair Café", "Language Exchange", "Neighbourhood Quiz"),
}
VENUES = (
    ("The Blue Room", "14 Quay Street"), ("Riverside Arena", "1 Stadium Way"), ("Old Custom House", "3 Harbour Row"),
    ("Corn Exchange", "22 Market Square"), ("Warehouse 9", "9 Dock Road"), ("St Anne's Hall", "40 Chapel Lane"),
    ("Northbank Library", "5 Library Walk"), ("Electric Picture House", "61 High Street"),
)
LOCALITY, REGION, COUNTRY, POSTCODE = "Riverside", "Westshire", "GB", "RV1 4QT"


@dataclass(frozen=True)
class SiteLayout:
    """How big the site is: listing pages of `per_page` event cards each."""

    listing_pages: int
    per_page: int

    @property
    def events(self) -> int:
        return self.listing_pages * self.per_page


@dataclass(frozen=True)
class Event:
    """One event of the calendar, all derived from its number."""

    number: int
    kind: str
    title: str
    venue: str
    street: str
    start: datetime
    price: int
    shape: str

    @classmethod
    def numbered(cls, number: int, first_day: date) -> Self:
        index = number - FIRST_EVENT
        kind = KINDS[index % len(KINDS)][0]
        titles = TITLES[kind]
        venue, street = VENUES[(index * 5) % len(VENUES)]
        day = first_day + timedelta(days=1 + index // 3)
        start = datetime.combine(day, time(18 + index % 4, 30 if index % 2 else 0), tzinfo=UTC)
        return cls(number, kind, titles[(index // len(KINDS)) % len(titles)], venue, street, start,
                   price=0 if index % 7 == 3 else 8 + (index * 3) % 30, shape=SHAPES[index % len(SHAPES)])

    @property
    def slug(self) -> str:
        words = "".join(c if c.isalnum() else " " for c in self.title.lower()).split()
        return f"{self.number}-{'-'.join(words)}"

    @property
    def path(self) -> str:
        return f"/events/{self.slug}"

    @property
    def label(self) -> str:
        return dict(KINDS)[self.kind]

    def json_ld(self, url: str) -> dict[str, object]:
        """The event as schema.org JSON-LD (without `@context`; each shape adds it where it belongs)."""
        offer: dict[str, object] = {
            "@type": "Offer", "url": url, "price": f"{self.price}.00", "priceCurrency": "GBP",
            "availability": "https://schema.org/InStock", "validFrom": (self.start - timedelta(days=30)).isoformat()}
        event: dict[str, object] = {
            "@type": self.kind,
            "name": self.title,
            "startDate": self.start.isoformat(),
            "endDate": (self.start + timedelta(hours=2, minutes=30)).isoformat(),
            "eventStatus": "https://schema.org/EventScheduled",
            "eventAttendanceMode": "https://schema.org/OfflineEventAttendanceMode",
            "location": {"@type": "Place", "name": self.venue, "address": {
                "@type": "PostalAddress", "streetAddress": self.street, "addressLocality": LOCALITY,
                "addressRegion": REGION, "postalCode": POSTCODE, "addressCountry": COUNTRY}},
            "image": [f"{url}/poster-1x1.jpg", f"{url}/poster-16x9.jpg"],
            "description": self.description,
            "offers": offer if self.price else {**offer, "price": "0", "name": "Free entry"},
            "organizer": {"@type": "Organization", "name": SITE_NAME, "url": url.split("/events/")[0]},
            "url": url,
        }
        if self.kind == "MusicEvent":
            event["performer"] = {"@type": "MusicGroup", "name": self.title}
        if self.kind == "SportsEvent" and " v " in self.title:
            home, away = self.title.split(" v ")
            event["homeTeam"] = {"@type": "SportsTeam", "name": home}
            event["awayTeam"] = {"@type": "SportsTeam", "name": away}
        return event

    @property
    def description(self) -> str:
        return (f"{self.title}: a {self.label} at {self.venue}, {LOCALITY}. Doors open 30 minutes before the start; "
                "step-free access and a hearing loop are available.")


class EventSite:
    """The website, served on a free loopback port: `async with EventSite(layout) as site:`."""

    def __init__(self, layout: SiteLayout, *, today: date | None = None, host: str = "127.0.0.1") -> None:
        self.layout = layout
        self.host = host
        self.port = 0
        self.requests: Counter[str] = Counter()
        """Requests served, by kind: listing, detail, robots, missing, other."""
        first_day = today or datetime.now(UTC).date()
        self.events = [Event.numbered(FIRST_EVENT + i, first_day) for i in range(layout.events)]
        # The misbehaving pages, spread over the listing pages (the first listing page holds all three when small).
        self.missing = self.events[min(3, len(self.events) - 1)]
        self.disallowed = self.events[min(6, len(self.events) - 1)]
        self.flaky = self.events[min(9, len(self.events) - 1)]
        self._by_path = {event.path: event for event in self.events}
        self._flaky_served = False
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def listing_urls(self) -> list[str]:
        return [f"{self.base_url}/calendar?page={page}" for page in range(1, self.layout.listing_pages + 1)]

    @property
    def extractable(self) -> list[Event]:
        """The events a scrape can store: every linked one but the missing and the disallowed page."""
        return [event for event in self.events if event not in (self.missing, self.disallowed)]

    def url(self, event: Event) -> str:
        return f"{self.base_url}{event.path}"

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_get("/", self._home)
        app.router.add_get("/robots.txt", self._robots)
        app.router.add_get("/calendar", self._listing)
        app.router.add_get("/events/{slug}", self._detail)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # Pages.

    async def _home(self, request: web.Request) -> web.Response:
        self.requests["other"] += 1
        raise web.HTTPFound("/calendar?page=1")

    async def _robots(self, request: web.Request) -> web.Response:
        self.requests["robots"] += 1
        text = (f"# {SITE_NAME}: members' previews are not for crawlers.\n{USER_AGENT_RULES}\n"
                f"Disallow: /account/\nDisallow: {self.disallowed.path}\n\nSitemap: {self.base_url}/sitemap.xml\n")
        return web.Response(text=text, content_type="text/plain")

    async def _listing(self, request: web.Request) -> web.Response:
        try:
            page = int(request.query.get("page", "1"))
        except ValueError:
            page = 0
        if not 1 <= page <= self.layout.listing_pages:
            self.requests["missing"] += 1
            return _page_not_found()
        self.requests["listing"] += 1
        per_page = self.layout.per_page
        shown = self.events[(page - 1) * per_page: page * per_page]
        return web.Response(text=self._listing_html(page, shown), content_type="text/html", charset="utf-8")

    async def _detail(self, request: web.Request) -> web.Response:
        event = self._by_path.get(request.path)
        if event is None or event is self.missing:
            self.requests["missing"] += 1
            return _page_not_found()
        if event is self.flaky and not self._flaky_served:
            self._flaky_served = True
            self.requests["unavailable"] += 1
            return web.Response(status=503, text="Service temporarily unavailable", headers={"Retry-After": "1"})
        self.requests["detail"] += 1
        return web.Response(text=self._detail_html(event), content_type="text/html", charset="utf-8")

    def _listing_html(self, page: int, events: list[Event]) -> str:
        cards = "\n".join(_card(event) for event in events)
        pages = self.layout.listing_pages
        newer = f'<a rel="prev" href="/calendar?page={page - 1}">&larr; Earlier</a>' if page > 1 else ""
        older = f'<a rel="next" href="/calendar?page={page + 1}">Later &rarr;</a>' if page < pages else ""
        return _document(
            f"What's on in {LOCALITY} — page {page} of {pages}",
            f"""<section class="listing">
  <h1>What's on in {LOCALITY}</h1>
  <p class="lede">Concerts, theatre, sport and family days across the city. Page {page} of {pages}.</p>
  <form class="filters" action="/calendar"><label>Search <input name="q"></label><button>Go</button></form>
  <div class="cards">
{cards}
  </div>
  <nav class="pagination">{newer} <span>Page {page}</span> {older}</nav>
</section>""")

    def _detail_html(self, event: Event) -> str:
        url = self.url(event)
        blocks = "\n".join(f'<script type="application/ld+json">\n{json.dumps(block, indent=2)}\n</script>'
                           for block in _json_ld_blocks(event, url, self.base_url))
        price = f"&pound;{event.price}" if event.price else "Free"
        day = event.start.strftime("%A %d %B %Y, %H:%M")
        return _document(
            f"{event.title} — {event.venue} | {SITE_NAME}",
            f"""<article class="event">
  <nav class="breadcrumbs"><a href="/">Home</a> / <a href="/calendar?page=1">What's on</a> / {_e(event.title)}</nav>
  <h1>{_e(event.title)}</h1>
  <p class="when"><time datetime="{event.start.isoformat()}">{day}</time></p>
  <p class="where">{_e(event.venue)}, {_e(event.street)}, {LOCALITY}</p>
  <p class="price">{price}</p>
  <div class="body"><p>{_e(event.description)}</p>
  <p>Tickets are limited to six per booking. Latecomers are admitted at a suitable break.</p></div>
  <a class="book" href="/account/book?event={event.number}">Book now</a>
</article>""",
            head=blocks)


def _json_ld_blocks(event: Event, url: str, base: str) -> list[object]:
    """The page's JSON-LD blocks, in the event's shape."""
    context = "https://schema.org"
    item = event.json_ld(url)
    organisation = {"@type": "Organization", "@id": f"{base}/#org", "name": SITE_NAME, "url": base,
                    "logo": f"{base}/logo.png"}
    breadcrumbs = {"@type": "BreadcrumbList", "itemListElement": [
        {"@type": "ListItem", "position": 1, "name": "What's on", "item": f"{base}/calendar?page=1"},
        {"@type": "ListItem", "position": 2, "name": event.title, "item": url}]}
    if event.shape == "graph":
        page = {"@type": "WebPage", "@id": url, "name": event.title, "isPartOf": {"@id": f"{base}/#website"}}
        return [{"@context": context, "@graph": [page, {**item, "@id": f"{url}#event"}, breadcrumbs]}]
    if event.shape == "array":
        return [[{"@context": context, **organisation}, {"@context": context, **item}]]
    if event.shape == "type-list":
        kinds = [event.kind, "Event"] if event.kind != "Event" else ["SocialEvent", "Event"]
        return [{"@context": context, **item, "@type": kinds}]
    if event.shape == "two-blocks":
        return [{"@context": context, **breadcrumbs}, {"@context": "http://schema.org", **item}]
    return [{"@context": context, **item}]


def _card(event: Event) -> str:
    day = event.start.strftime("%a %d %b, %H:%M")
    return f"""    <article class="card card--{event.label}">
      <a class="event-card" href="{event.path}">
        <img src="{event.path}/thumb.jpg" alt="" loading="lazy" width="320" height="180">
        <h2>{_e(event.title)}</h2>
      </a>
      <p><time datetime="{event.start.isoformat()}">{day}</time> &middot; {_e(event.venue)}</p>
      <a class="venue" href="/venues/{event.venue.lower().replace(' ', '-')}">Venue info</a>
    </article>"""


def _document(title: str, main: str, head: str = "") -> str:
    return f"""<!DOCTYPE html>
<html lang="en-GB">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<meta property="og:site_name" content="{SITE_NAME}">
<link rel="stylesheet" href="/static/site.css">
{head}
</head>
<body>
<header class="masthead"><a class="logo" href="/">{SITE_NAME}</a>
  <nav><a href="/calendar?page=1">What's on</a> <a href="/venues/">Venues</a> <a href="/account/">My tickets</a>
  <a href="https://social.example/@riversidelive" rel="me">Follow us</a></nav>
</header>
<main>
{main}
</main>
<footer><p>&copy; {SITE_NAME}. <a href="/about">About</a> <a href="/privacy">Privacy</a></p></footer>
</body>
</html>
"""


def _page_not_found() -> web.Response:
    body = _document(f"Page not found | {SITE_NAME}",
                     "<h1>Sorry, this event is no longer listed</h1><p>It may have been cancelled or moved.</p>")
    return web.Response(status=404, text=body, content_type="text/html", charset="utf-8")


def _e(text: str) -> str:
    return html.escape(text, quote=True)
