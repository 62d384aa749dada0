"""The page fetcher of the scrape pipeline: safe by default, capped in size and time.

Every hop of a fetch is checked before it is sent (scheme, credentials, internal names, literal
addresses; see `netsafety`), and every connection is made by `safehttp`'s session, which resolves the
host once, checks every address and connects to the checked addresses, so DNS rebinding cannot slip a
private address in between. Redirects are followed here, not by the HTTP client, so each hop's URL and
robots.txt are checked before its connection is made.

Redirects from https to http are followed, as browsers do: the fetch carries no credentials or cookies,
a user may list http URLs directly, and every hop is still checked. Proxies from the environment are
ignored: through a proxy, the address checked would not be the address reached.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from types import TracebackType
from typing import Self

import aiohttp
import httpx

from kubearq.core.contract import FetchPolicy
from kubearq.worker.net.http import (
    ACCEPT_ENCODING,
    AddressRefusedError,
    BodyTooLargeError,
    NameNotResolvedError,
    Resolver,
    SystemResolver,
    checked_target,
    is_certificate_error,
    read_capped,
    safe_session,
)
from kubearq.worker.net.policy import Endpoint, NetworkPolicy, Refusal, redact_url
from kubearq.worker.scrape.robots import (
    ROBOTS_MAX_BYTES,
    ROBOTS_MAX_REDIRECTS,
    RobotsCache,
    RobotsRules,
    origin_key,
    robots_url,
    rules_from_status,
    rules_unavailable,
    rules_unreachable,
)

logger = logging.getLogger(__name__)

PAGE_TYPES = frozenset({"text/html", "application/xhtml+xml"})
MAX_REDIRECTS = 10
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_ACCEPT = "text/html,application/xhtml+xml;q=0.9,*/*;q=0.5"


class FetchError(Exception):
    """A fetch failed; `message` is what the user sees in status and PostgreSQL."""

    def __init__(self, url: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.url = url
        self.message = message
        self.retryable = retryable


class UnsafeUrlError(FetchError):
    """The URL, a redirect target or a resolved address is not allowed by the network policy."""

    def __init__(self, url: str, refusal: Refusal, refused_url: str, via: str | None = None) -> None:
        super().__init__(url, refusal.message(refused_url, via=via), retryable=False)
        self.refusal = refusal
        self.refused_url = refused_url


class HostNotResolvedError(FetchError):
    """The URL's host name does not resolve: a network error, tried again (DNS can be down or not yet updated)."""

    def __init__(self, url: str, reason: str, failed_url: str) -> None:
        super().__init__(url, f"could not fetch {redact_url(url)}: {reason}; a later try may succeed", retryable=True)
        self.reason = reason
        self.failed_url = failed_url


class RobotsDisallowedError(FetchError):
    """robots.txt forbids the URL (retryable only when robots.txt itself was unreachable)."""


class ResponseTooLargeError(FetchError):
    """The response exceeds `fetch.maxResponseBytes`."""


class FetchTimeoutError(FetchError):
    """The whole fetch (robots.txt, redirects and body) took longer than the try's timeout."""


class TooManyRedirectsError(FetchError):
    """The redirect chain is too long or loops."""


class UnsupportedContentTypeError(FetchError):
    """The response is not of a content type the caller accepts."""


class HttpStatusError(FetchError):
    """The server answered with an error status; 429, 408 and 5xx are worth retrying."""

    def __init__(self, url: str, message: str, *, status: int, retry_after: float | None) -> None:
        super().__init__(url, message, retryable=status in (408, 429) or status >= 500)
        self.status = status
        self.retry_after = retry_after
        """Seconds the server asked us to wait (Retry-After), if it said."""


@dataclass(frozen=True)
class Page:
    """A fetched page, decoded."""

    url: str
    """The final URL, after redirects."""
    status: int
    headers: Mapping[str, str]
    text: str
    content_type: str
    """The media type, lower case, without parameters; empty when the server sent none."""
    encoding: str
    """The Python codec the body was decoded with."""
    elapsed: float
    """Seconds from the start of the fetch to the end of the body, redirects and robots.txt included."""


# --- Bodies: decoding -----------------------------------------------------------------------------


_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
_CHARSET_PARAMETER = re.compile(r"""charset\s*=\s*["']?([^"';\s]+)""", re.IGNORECASE)
_META_CHARSET = re.compile(rb"""<meta\s[^>]*?charset\s*=\s*["']?\s*([a-zA-Z0-9_.:-]+)""", re.IGNORECASE)
# WHATWG's Encoding Standard: what browsers decode a label as; Python's codec of the same name differs.
_WHATWG_CODECS = {
    **dict.fromkeys(("iso-8859-1", "iso8859-1", "latin1", "latin-1", "l1", "ascii", "us-ascii"), "cp1252"),
    **dict.fromkeys(("shift_jis", "shift-jis", "sjis", "x-sjis", "ms_kanji", "csshiftjis", "windows-31j"), "cp932"),
    **dict.fromkeys(("gb2312", "gbk", "x-gbk", "csgb2312"), "gb18030"),
    **dict.fromkeys(("euc-kr", "ks_c_5601-1987", "windows-949"), "cp949"),
    **dict.fromkeys(("big5", "big5-hkscs", "x-x-big5"), "big5hkscs"),
    **dict.fromkeys(("tis-620", "iso-8859-11"), "cp874"),
    **dict.fromkeys(("iso-8859-9", "latin5"), "cp1254"),
}
# The first bytes searched for <meta charset>; WHATWG says 1024, real pages put it later.
_META_WINDOW = 4096


def codec_for(label: str) -> str | None:
    """The Python codec for a charset label as browsers read it, or None for an unknown label."""
    label = label.strip().strip("\"'").lower()
    if label in ("utf-7", "x-user-defined"):
        return None
    try:
        return codecs.lookup(_WHATWG_CODECS.get(label, label)).name
    except LookupError:
        return None


def decode_text(body: bytes, content_type: str | None) -> tuple[str, str]:
    """Decode a body as a browser would: BOM, then the Content-Type charset, then <meta>, else UTF-8."""
    for bom, bom_codec in _BOMS:
        if body.startswith(bom):
            return body[len(bom):].decode(bom_codec, errors="replace"), bom_codec
    codec: str | None = None
    if content_type and (declared := _CHARSET_PARAMETER.search(content_type)):
        codec = codec_for(declared.group(1))
    if codec is None and (meta := _META_CHARSET.search(body[:_META_WINDOW])):
        codec = codec_for(meta.group(1).decode("ascii"))
        # A page whose <meta> is readable as ASCII is not UTF-16, whatever it claims (WHATWG).
        if codec is not None and codec.startswith("utf-16"):
            codec = "utf-8"
    chosen = codec or "utf-8"
    return body.decode(chosen, errors="replace"), chosen


def media_type(content_type: str | None) -> str:
    """`text/html; charset=utf-8` → `text/html`."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_retry_after(value: str, now: datetime) -> float | None:
    """Retry-After as seconds from `now`: delay-seconds or an HTTP-date; None when unreadable."""
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


# --- The fetcher ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Response:
    url: str
    status: int
    headers: Mapping[str, str]
    body: bytes


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Fetcher:
    """Fetches pages under one `FetchPolicy`; an async context manager owning one HTTP client.

    One fetcher serves one policy because its pooled connections were checked under that policy: a
    connection opened under `allowPrivateNetworks: true` must never carry a stricter request.
    `resolver` and `extra_allowed` are the test hooks; `robots_cache` is shared by a worker's fetchers.
    """

    def __init__(
        self,
        policy: FetchPolicy,
        *,
        robots_cache: RobotsCache | None = None,
        resolver: Resolver | None = None,
        extra_allowed: frozenset[Endpoint] = frozenset(),
        ssl_context: ssl.SSLContext | None = None,
        now: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.policy = policy
        self._network = NetworkPolicy(policy.allow_private_networks, extra_allowed)
        self._robots = RobotsCache() if robots_cache is None else robots_cache
        self._now = now
        self._resolver = resolver or SystemResolver(use_search_domains=policy.allow_private_networks)
        self._ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None  # made on first use: it needs the running loop
        self._headers = {"User-Agent": policy.user_agent, "Accept-Encoding": ACCEPT_ENCODING, "Accept": _ACCEPT}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def fetch(
        self,
        url: str,
        *,
        # Not the caller's asyncio.timeout: the fetch turns its own deadline into a FetchTimeoutError
        # that names the URL, and the deadline covers robots.txt and every redirect.
        timeout: float,  # noqa: ASYNC109
        accept: frozenset[str] | None = PAGE_TYPES,
        max_redirects: int = MAX_REDIRECTS,
    ) -> Page:
        """Fetch a page and decode it, within `timeout` seconds for everything.

        `accept` lists the media types taken (None: any); a response without Content-Type is taken too.
        Raises a `FetchError` subclass whose message names the URL and the reason.
        """
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                response = await self._follow(
                    url, max_redirects=max_redirects, obey_robots=self.policy.obey_robots_txt, accept=accept,
                    max_bytes=self.policy.max_response_bytes, truncate=False,
                )
        except TimeoutError:
            raise FetchTimeoutError(url, (
                f"gave up on {redact_url(url)} after {timeout:g} s: the fetch (robots.txt, redirects and body) "
                "took longer than this try's timeout; the next try gets longer (retry.timeoutSeconds)"
            ), retryable=True) from None
        if not 200 <= response.status < 300:
            raise self._status_error(url, response)
        content_type = response.headers.get("content-type")
        text, encoding = decode_text(response.body, content_type)
        return Page(
            url=response.url, status=response.status, headers=response.headers, text=text,
            content_type=media_type(content_type), encoding=encoding, elapsed=time.monotonic() - started,
        )

    async def robots_rules(self, url: str) -> RobotsRules:
        """The robots.txt rules governing `url`, from the cache or fetched (no deadline of its own)."""
        return await self._robots.get(origin_key(url), lambda: self._load_robots(url))

    def cached_robots_rules(self, url: str) -> RobotsRules | None:
        """The cached rules for `url`'s origin, if fresh (no fetch, no await)."""
        return self._robots.cached(origin_key(url))

    async def _follow(
        self, requested: str, *, max_redirects: int, obey_robots: bool, accept: frozenset[str] | None,
        max_bytes: int, truncate: bool,
    ) -> _Response:
        """GET `requested`, following redirects; each hop checked before it is sent. Body read on 2xx only."""
        current, previous = requested, None
        seen: list[str] = []  # normalized on the first redirect: most fetches have none
        for hop in range(max_redirects + 1):
            refusal = self._network.check_url(current)
            if refusal is not None:
                raise UnsafeUrlError(requested, refusal, current, via=previous)
            if obey_robots:
                await self._check_robots(requested, current, previous)
            response = await self._send(requested, current, previous)
            try:
                location = response.headers.get("Location")
                if response.status in _REDIRECTS and location:
                    try:
                        # An absolute Location is kept as sent, so a refusal quotes what the server said.
                        absolute = bool(httpx.URL(location).scheme)
                        target = location if absolute else str(httpx.URL(current).join(location))
                    except httpx.InvalidURL as error:
                        raise FetchError(requested, (
                            f"{redact_url(current)} redirected to an invalid URL {location!r} ({error})"
                        ), retryable=False) from None
                    seen = seen or [_without_fragment(requested)]
                    if _without_fragment(target) in seen:
                        chain = " → ".join(redact_url(u) for u in [*seen, target])
                        raise TooManyRedirectsError(requested, f"gave up on {redact_url(requested)}: "
                                                    f"redirect loop ({chain})", retryable=False)
                    if hop == max_redirects:
                        raise TooManyRedirectsError(requested, (
                            f"gave up on {redact_url(requested)} after {max_redirects} redirects "
                            f"(the last one to {redact_url(target)})"
                        ), retryable=False)
                    seen.append(_without_fragment(target))
                    current, previous = target, current
                    continue
                body = b""
                if 200 <= response.status < 300:
                    self._check_content_type(requested, current, response, accept)
                    body = await self._read_body(requested, current, response, max_bytes, truncate=truncate)
                return _Response(current, response.status, response.headers, body)
            finally:
                response.release()  # back to the pool if the body was read to its end, else closed
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    async def _send(self, requested: str, url: str, previous: str | None) -> aiohttp.ClientResponse:
        """Send one GET, turning connection-level failures into `FetchError`s that name the URL."""
        if self._session is None:
            self._session = safe_session(self._network, self._resolver, self._ssl_context)
        try:
            return await self._session.get(checked_target(self._network, url), headers=self._headers,
                                           allow_redirects=False)
        except AddressRefusedError as error:
            raise UnsafeUrlError(requested, error.refusal, url, via=previous) from None
        except NameNotResolvedError as error:
            raise HostNotResolvedError(requested, str(error), url) from None
        except (aiohttp.ClientError, OSError) as error:
            raise FetchError(requested, f"could not fetch {redact_url(url)}: {error or type(error).__name__}",
                             retryable=not is_certificate_error(error)) from None

    def _check_content_type(
        self, requested: str, url: str, response: aiohttp.ClientResponse, accept: frozenset[str] | None,
    ) -> None:
        kind = media_type(response.headers.get("Content-Type"))
        if accept is None or not kind or kind in accept:
            return
        raise UnsupportedContentTypeError(requested, (
            f"refused {redact_url(url)}: its content type is {kind}, not one of {', '.join(sorted(accept))}"
        ), retryable=False)

    async def _read_body(
        self, requested: str, url: str, response: aiohttp.ClientResponse, max_bytes: int, *, truncate: bool,
    ) -> bytes:
        """Read at most `max_bytes` (on the wire and decoded); beyond it fail, or cut off when `truncate`."""
        try:
            return await read_capped(response, max_bytes, truncate=truncate)
        except BodyTooLargeError as error:
            raise self._too_large(requested, url, str(error)) from None
        except ValueError as error:
            raise FetchError(requested, f"could not read {redact_url(url)}: {error}", retryable=False) from None
        except (aiohttp.ClientError, OSError) as error:
            raise FetchError(requested, f"could not read {redact_url(url)}: {error or type(error).__name__}",
                             retryable=True) from None

    def _too_large(self, requested: str, url: str, detail: str) -> ResponseTooLargeError:
        limit = self.policy.max_response_bytes
        return ResponseTooLargeError(requested, (
            f"stopped reading {redact_url(url)}: {detail}, over fetch.maxResponseBytes ({limit}); "
            "raise fetch.maxResponseBytes to fetch it"
        ), retryable=False)

    def _status_error(self, requested: str, response: _Response) -> HttpStatusError:
        retry_after_header = response.headers.get("retry-after")
        retry_after = None if retry_after_header is None else parse_retry_after(retry_after_header, self._now())
        try:
            phrase = HTTPStatus(response.status).phrase
        except ValueError:
            phrase = "(unknown status)"
        message = f"{redact_url(response.url)} answered HTTP {response.status} {phrase}"
        if response.status in _REDIRECTS or response.status == 300:
            message += " without a Location to follow"
        if retry_after is not None:
            message += f"; retry after {retry_after:g} s"
        return HttpStatusError(requested, message, status=response.status, retry_after=retry_after)

    async def _check_robots(self, requested: str, url: str, previous: str | None) -> None:
        rules = await self._robots.get(origin_key(url), lambda: self._load_robots(url, requested, previous))
        refused = robots_refusal(rules, url, self.policy.user_agent, requested=requested)
        if refused is not None:
            raise refused

    async def _load_robots(self, url: str, requested: str | None = None, previous: str | None = None) -> RobotsRules:
        """Fetch robots.txt for `url` through the same checks as pages and decide what it means."""
        source = robots_url(url)
        try:
            response = await self._follow(
                source, max_redirects=ROBOTS_MAX_REDIRECTS, obey_robots=False, accept=None,
                max_bytes=ROBOTS_MAX_BYTES, truncate=True,
            )
        except UnsafeUrlError as error:
            if error.refused_url == source:
                # The site itself is refused: say so about the page, and cache nothing.
                raise UnsafeUrlError(requested or url, error.refusal, url, via=previous) from None
            # robots.txt redirects somewhere we may not go: there is no usable file.
            rules = rules_unavailable(source, error.message)
        except TooManyRedirectsError as error:
            rules = rules_unavailable(source, error.message)
        except HostNotResolvedError as error:
            if error.failed_url != source:
                rules = rules_unreachable(source, error.message)  # a redirect of robots.txt went astray
            else:  # the site's own name does not resolve: say so about the page, and cache nothing
                raise HostNotResolvedError(requested or url, error.reason, url) from None
        except FetchError as error:
            rules = rules_unreachable(source, error.message)
        else:
            return rules_from_status(response.url, response.status, response.body)
        logger.info("robots.txt %s: %s, so %s", source, rules.detail, rules.verdict.value,
                    extra={"url": source, "robots_verdict": rules.verdict.value})
        return rules


def robots_refusal(rules: RobotsRules, url: str, user_agent: str, *, requested: str | None = None,
                   ) -> RobotsDisallowedError | None:
    """Why robots.txt refuses `url` (reached on the way to `requested`, if a redirect led there), or None."""
    if rules.allows(url, user_agent):
        return None
    if rules.temporary:
        return RobotsDisallowedError(requested or url, (
            f"skipped {redact_url(url)}: its robots.txt is unreachable ({rules.source}), which RFC 9309 "
            "says to treat as disallowing everything; a later try may succeed"
        ), retryable=True)
    return RobotsDisallowedError(requested or url, (
        f"skipped {redact_url(url)}: {rules.url} disallows it for user agent "
        f"{user_agent!r}; set fetch.obeyRobotsTxt: false to fetch it anyway"
    ), retryable=False)


def _without_fragment(url: str) -> str:
    """The URL as compared when looking for redirect loops."""
    try:
        return str(httpx.URL(url).copy_with(fragment=None))
    except httpx.InvalidURL:
        return url
