"""robots.txt (RFC 9309): what a fetch of it means, and a per-origin cache of the rules.

The fetcher fetches robots.txt through its own safe path and hands the outcome here:
`rules_from_status` decides what a status means, `RobotsCache` keeps the rules per
(scheme, host, port) for a bounded time.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum

import httpx
from protego import Protego

# RFC 9309 2.5: crawlers must parse at least 500 KiB; what follows may be ignored.
ROBOTS_MAX_BYTES = 500 * 1024
# RFC 9309 2.3.1.2: follow at least five consecutive redirects.
ROBOTS_MAX_REDIRECTS = 5
# RFC 9309 2.4: a cached robots.txt should not be used for more than 24 hours.
ROBOTS_TTL_SECONDS = 24 * 3600
# An unreachable robots.txt means "disallow everything" (RFC 9309 2.3.1.4); look again soon, not in a day.
ROBOTS_UNREACHABLE_TTL_SECONDS = 300

OriginKey = tuple[str, str, int]

_PRODUCT_TOKEN = re.compile(r"^[A-Za-z_-]+")


class RobotsVerdict(Enum):
    """How robots.txt decides for a site."""

    RULES = "rules"
    """The file was fetched: its groups decide."""
    ALLOW_ALL = "allow all"
    """The file is unavailable (4xx, too many redirects): everything is allowed."""
    DISALLOW_ALL = "disallow all"
    """The file is unreachable (5xx, 429, network error): nothing is allowed, for now."""


@dataclass(frozen=True)
class RobotsRules:
    """The rules of one origin, with where they came from (for error messages)."""

    verdict: RobotsVerdict
    url: str
    """The robots.txt URL these rules come from (the last one, after redirects)."""
    detail: str
    """How it was answered: `HTTP 404`, or why it could not be fetched."""
    parser: Protego | None = field(default=None, compare=False)

    @property
    def source(self) -> str:
        """e.g. `http://example.com/robots.txt (HTTP 503)`, for messages."""
        return f"{self.url} ({self.detail})"

    def allows(self, url: str, user_agent: str) -> bool:
        """May `user_agent` (its product token is matched against the groups) fetch `url`?"""
        if self.verdict is RobotsVerdict.DISALLOW_ALL:
            return False
        if self.parser is None:
            return True
        return self.parser.can_fetch(url, product_token(user_agent))

    @property
    def temporary(self) -> bool:
        """True when the verdict comes from a failure that may pass (the page is worth retrying)."""
        return self.verdict is RobotsVerdict.DISALLOW_ALL


def product_token(user_agent: str) -> str:
    """The product token robots.txt groups are matched against: `kubearq (+https://…)` → `kubearq`.

    RFC 9309 2.2.1: a token of letters, underscores and hyphens, matched case-insensitively.
    """
    match = _PRODUCT_TOKEN.match(user_agent.strip())
    return match.group(0).lower() if match else user_agent.strip().lower()


def origin_key(url: str) -> OriginKey:
    """The cache key of a URL's robots.txt: (scheme, host, port) with the default port filled in."""
    parsed = httpx.URL(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return parsed.scheme, parsed.raw_host.decode("ascii").lower(), port


def robots_url(url: str) -> str:
    """The robots.txt that governs `url`."""
    parsed = httpx.URL(url)
    return str(parsed.copy_with(path="/robots.txt", query=None, fragment=None))


def rules_from_status(source_url: str, status: int, body: bytes) -> RobotsRules:
    """What the final response to a robots.txt request means (RFC 9309 2.3.1)."""
    detail = f"HTTP {status}"
    if 200 <= status < 300:
        text = body[:ROBOTS_MAX_BYTES].decode("utf-8", errors="replace").removeprefix("\ufeff")
        return RobotsRules(RobotsVerdict.RULES, source_url, detail, Protego.parse(text))
    if status == 429:
        # "Slow down" is not "there is no robots.txt": treated like a server error, as Google does.
        return RobotsRules(RobotsVerdict.DISALLOW_ALL, source_url, detail)
    if 400 <= status < 500:
        return RobotsRules(RobotsVerdict.ALLOW_ALL, source_url, detail)
    # 5xx, and 1xx/3xx left over when redirects ran out of a Location: the server is not answering sanely.
    return RobotsRules(RobotsVerdict.DISALLOW_ALL, source_url, detail)


def rules_unreachable(source_url: str, reason: str) -> RobotsRules:
    """robots.txt could not be fetched at all: complete disallow (RFC 9309 2.3.1.4)."""
    return RobotsRules(RobotsVerdict.DISALLOW_ALL, source_url, reason)


def rules_unavailable(source_url: str, reason: str) -> RobotsRules:
    """robots.txt does not exist in a usable form (e.g. too many redirects): allow all (RFC 9309 2.3.1.3)."""
    return RobotsRules(RobotsVerdict.ALLOW_ALL, source_url, reason)


@dataclass
class _Entry:
    rules: RobotsRules
    expires: float


class RobotsCache:
    """robots.txt rules per origin, kept in this process's memory for at most `ttl` seconds.

    One load per origin at a time: concurrent fetches of one site wait for the first one's robots.txt
    instead of all requesting it. Shared by the fetchers of one worker; `clock` is injectable for tests.
    """

    def __init__(
        self,
        *,
        ttl: float = ROBOTS_TTL_SECONDS,
        unreachable_ttl: float = ROBOTS_UNREACHABLE_TTL_SECONDS,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._unreachable_ttl = unreachable_ttl
        self._max_entries = max_entries
        self._clock = clock
        self._entries: dict[OriginKey, _Entry] = {}
        self._loading: dict[OriginKey, asyncio.Lock] = {}

    def cached(self, key: OriginKey) -> RobotsRules | None:
        """The unexpired rules of an origin, if any."""
        entry = self._entries.get(key)
        if entry is None or entry.expires <= self._clock():
            return None
        return entry.rules

    async def get(self, key: OriginKey, load: Callable[[], Awaitable[RobotsRules]]) -> RobotsRules:
        """The rules of an origin: cached, or loaded once by `load` and cached."""
        rules = self.cached(key)
        if rules is not None:
            return rules
        lock = self._loading.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                rules = self.cached(key)
                if rules is None:
                    rules = await load()
                    self._store(key, rules)
                return rules
        finally:
            if not lock.locked() and self._loading.get(key) is lock:
                del self._loading[key]

    def _store(self, key: OriginKey, rules: RobotsRules) -> None:
        ttl = self._unreachable_ttl if rules.temporary else self._ttl
        self._entries.pop(key, None)
        self._entries[key] = _Entry(rules, self._clock() + ttl)
        while len(self._entries) > self._max_entries:
            # Oldest stored first: dicts keep insertion order.
            del self._entries[next(iter(self._entries))]
