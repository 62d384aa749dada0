"""The one way a provider talks HTTP: GET a JSON answer through the worker's network policy, in bounded time and size.

Every URL is checked before its request (`NetworkPolicy.check_url`) and every connection is made by
`safe_session`, which checks each address a name resolves to, exactly as for a scrape fetch: a connection's
config cannot point the worker at a service inside the cluster unless it sets `allowPrivateNetworks: true`.
Redirects are refused, not followed: the request carries the connection's token, and an API that moved is
fixed in the config. What the client decides for the provider: 429 is a `ThrottledError` (Retry-After), 5xx
and network failures are retryable, a 2xx that is not JSON is a malformed answer. Any other 4xx is handed to
the provider, which knows how its platform explains errors (Meta answers 400 with an error object).

Messages and logs never show a token: it travels in a header, and URLs are shown by `shown_url`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from types import TracebackType
from typing import Self
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp

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
from kubearq.worker.scrape.fetch import parse_retry_after
from kubearq.worker.sync.provider import ProviderError, ThrottledError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 30.0
"""One request: connecting, the answer's headers and its whole body."""
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
"""One answer (one page), decoded; an insights page of 500 rows is well under 1 MiB."""
DEFAULT_THROTTLE_SECONDS = 60.0
"""How long to wait after a 429 that does not say (no or unreadable Retry-After)."""
ALLOW_PRIVATE_FIX = "set allowPrivateNetworks: true in the connection's config to allow it"
USER_AGENT = "kubearq-sync (+https://kubearq.dev)"

# Query parameters whose values are secrets in the APIs we know (Meta's paging URLs carry `access_token`).
_SECRET_PARAMETERS = frozenset({
    "access_token", "refresh_token", "token", "api_key", "apikey", "key", "client_secret", "secret", "password",
    "signature", "sig", "appsecret_proof",
})


@dataclass(frozen=True)
class ApiResponse:
    """An answer the provider reads: a 2xx with its JSON, or a 4xx (other than 429) to explain."""

    url: str
    status: int
    headers: Mapping[str, str]
    data: object
    """The decoded JSON; None for an error status whose body is not JSON."""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def shown_url(self) -> str:
        return shown_url(self.url)


def shown_url(url: str) -> str:
    """The URL as messages and logs show it: user info and secret-looking query values replaced by `***`."""
    url = redact_url(url)
    parts = urlsplit(url)
    if not parts.query:
        return url
    pieces = parts.query.split("&")
    masked = [f"{piece.split('=', 1)[0]}=***" if piece.split("=", 1)[0].lower() in _SECRET_PARAMETERS else piece
              for piece in pieces]
    if masked == pieces:
        return url
    return urlunsplit(parts._replace(query="&".join(masked)))


def with_query(url: str, params: Mapping[str, str] | None) -> str:
    """`url` with `params` appended to its query, encoded (what is checked is exactly what is sent)."""
    if not params:
        return url
    parts = urlsplit(url)
    query = "&".join(part for part in (parts.query, urlencode(params)) if part)
    return urlunsplit(parts._replace(query=query))


def status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "(unknown status)"


def status_error(response: ApiResponse, detail: str | None = None) -> ProviderError:
    """The error for an answer the provider cannot use: `URL answered HTTP 404 Not Found (detail)`."""
    explained = f" ({detail})" if detail else ""
    return ProviderError(f"{response.shown_url} answered HTTP {response.status} {status_phrase(response.status)}"
                         f"{explained}", retryable=response.status in (408, 409) or response.status >= 500)


def malformed(url: str, what: str) -> ProviderError:
    """A 2xx answer that does not say what the provider expects: retrying would get the same answer."""
    return ProviderError(f"malformed answer from {shown_url(url)}: {what}", retryable=False)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class ApiClient:
    """GETs JSON for the providers; an async context manager owning one HTTP session per network policy.

    One session serves one policy because its pooled connections were checked under that policy (as the
    scrape fetcher does). `resolver` and `extra_allowed` are the test hooks; `now` is the clock that
    Retry-After dates are read against.
    """

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        resolver: Resolver | None = None,
        extra_allowed: frozenset[Endpoint] = frozenset(),
        ssl_context: ssl.SSLContext | None = None,
        now: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.timeout = timeout
        self.max_body_bytes = max_body_bytes
        self.now = now
        self._resolver = resolver
        self._extra_allowed = extra_allowed
        self._ssl_context = ssl_context
        self._sessions: dict[bool, tuple[aiohttp.ClientSession, NetworkPolicy]] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        sessions, self._sessions = self._sessions, {}
        for session, _ in sessions.values():
            await session.close()

    def _session(self, allow_private_networks: bool) -> tuple[aiohttp.ClientSession, NetworkPolicy]:
        found = self._sessions.get(allow_private_networks)
        if found is None:  # made on first use: a session needs the running loop
            network = NetworkPolicy(allow_private_networks, self._extra_allowed)
            resolver = self._resolver or SystemResolver(use_search_domains=allow_private_networks)
            found = self._sessions[allow_private_networks] = (
                safe_session(network, resolver, self._ssl_context), network)
        return found

    async def get_json(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        allow_private_networks: bool = False,
    ) -> ApiResponse:
        """GET `url` (with `params` added to its query) and decode the JSON answer.

        Returns 2xx answers and 4xx ones other than 429 (`data` None when such a body is not JSON). Raises
        `ThrottledError` for 429, a retryable `ProviderError` for 5xx, network failures and the timeout, and a
        non-retryable one for a refused URL, a redirect, an oversized body or a 2xx that is not JSON.
        """
        target = with_query(url, params)
        session, network = self._session(allow_private_networks)
        refusal = network.check_url(target)
        if refusal is not None:
            raise _refused(target, refusal)
        sent = {"Accept": "application/json", "Accept-Encoding": ACCEPT_ENCODING, "User-Agent": USER_AGENT,
                **(headers or {})}
        shown = shown_url(target)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                response = await session.get(checked_target(network, target), headers=sent, allow_redirects=False)
                try:
                    if 300 <= response.status < 400:
                        raise _redirected(shown, response)
                    raw = await read_capped(response, self.max_body_bytes, truncate=False)
                finally:
                    response.release()
        except AddressRefusedError as error:
            raise _refused(target, error.refusal) from None
        except NameNotResolvedError as error:
            raise ProviderError(f"could not reach {shown}: {error}; a later try may succeed", retryable=True) from None
        except BodyTooLargeError as error:
            raise ProviderError(f"stopped reading {shown}: {error}, over the limit of {self.max_body_bytes} bytes "
                                "for one answer; ask for smaller pages", retryable=False) from None
        except TimeoutError:
            raise ProviderError(f"gave up on {shown} after {self.timeout:g} s without a complete answer; "
                                "a later try may succeed", retryable=True) from None
        except ValueError as error:  # an unknown Content-Encoding or a corrupt compressed body
            raise ProviderError(f"could not read {shown}: {error}", retryable=False) from None
        except (aiohttp.ClientError, OSError) as error:
            raise ProviderError(f"could not reach {shown}: {error or type(error).__name__}",
                                retryable=not is_certificate_error(error)) from None
        logger.debug("GET %s: HTTP %d in %.3f s", shown, response.status, time.monotonic() - started,
                     extra={"url": shown, "status": response.status})
        return self._answer(target, response.status, response.headers, raw)

    def _answer(self, url: str, status: int, headers: Mapping[str, str], raw: bytes) -> ApiResponse:
        shown = shown_url(url)
        retry_after_header = headers.get("Retry-After")
        retry_after = None if retry_after_header is None else parse_retry_after(retry_after_header, self.now())
        if status == 429:
            wait = DEFAULT_THROTTLE_SECONDS if retry_after is None else retry_after
            raise ThrottledError(f"{shown} is rate limiting us (HTTP 429 Too Many Requests); retry after {wait:g} s",
                                 retry_after=wait)
        if status >= 500:
            raise ProviderError(f"{shown} answered HTTP {status} {status_phrase(status)}; a later try may succeed",
                                retryable=True, retry_after=retry_after)
        try:
            data: object = json.loads(raw)
        except ValueError as error:  # UnicodeDecodeError is one too
            if 200 <= status < 300:
                raise malformed(url, f"the body is not JSON ({error})") from None
            data = None
        return ApiResponse(url=url, status=status, headers=headers, data=data)


def _refused(url: str, refusal: Refusal) -> ProviderError:
    """`refused URL: WHY; FIX`: what the network policy said, and the config field that would change it."""
    fix = f"; {ALLOW_PRIVATE_FIX}" if refusal.overridable else ""
    return ProviderError(f"refused {shown_url(url)}: {refusal.why}{fix}", retryable=False)


def _redirected(shown: str, response: aiohttp.ClientResponse) -> ProviderError:
    location = response.headers.get("Location")
    where = f" to {shown_url(location)}" if location else ""
    return ProviderError(
        f"{shown} answered HTTP {response.status} {status_phrase(response.status)}, a redirect{where}; "
        "API requests do not follow redirects (the token would go along): put the final URL in the connection's "
        "config", retryable=False)
