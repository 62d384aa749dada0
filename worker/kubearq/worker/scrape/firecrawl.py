"""The Firecrawl backend: pages fetched through Firecrawl's scrape API (`POST /v1/scrape`), and its API keys.

A worker cannot read Kubernetes Secrets, so the key named by `firecrawl.apiKeySecretRef` comes from files the
chart mounts, or from one key for every request (see `FirecrawlKeys`). The API is reached like any page:
through the network policy of the request (a Firecrawl inside the cluster needs
`fetch.allowPrivateNetworks: true`), so a ScrapeRequest cannot point the worker at an internal service.
The page's own URL is checked as the fetcher checks it (Firecrawl resolves it, we cannot), and robots.txt is
still read by the worker itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp
from pydantic import SecretStr

from kubearq.core.contract import FetchPolicy, FirecrawlBackend
from kubearq.worker.net.http import (
    ACCEPT_ENCODING,
    AddressRefusedError,
    BodyTooLargeError,
    NameNotResolvedError,
    Resolver,
    SystemResolver,
    checked_target,
    read_capped,
    safe_session,
)
from kubearq.worker.net.policy import Endpoint, NetworkPolicy, redact_url
from kubearq.worker.scrape.fetch import (
    FetchError,
    FetchTimeoutError,
    HttpStatusError,
    Page,
    ResponseTooLargeError,
    UnsafeUrlError,
    parse_retry_after,
)

logger = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.firecrawl.dev"
# The JSON around the page is small next to the page, but JSON escaping can double the HTML's size.
_ENVELOPE_FACTOR = 2
_ENVELOPE_SLACK = 64 * 1024
# Secret names are DNS subdomains and keys a restricted alphabet (Kubernetes' own rules): checked again
# here because they become a file path.
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")


class FirecrawlRateLimitedError(FetchError):
    """Firecrawl answered 429: our account's rate limit, not the page's fault. Come back after `retry_after`."""

    def __init__(self, url: str, message: str, retry_after: float | None) -> None:
        super().__init__(url, message, retryable=True)
        self.retry_after = retry_after


class FirecrawlCreditsExhaustedError(FetchError):
    """Firecrawl answered 402: the account has no credits left. Trying again does not help."""


class FirecrawlKeyMissingError(FetchError):
    """The worker has no API key for the request's `firecrawl.apiKeySecretRef`."""


@dataclass(frozen=True)
class FirecrawlKeys:
    """Where a worker finds the API key of a request's `firecrawl.apiKeySecretRef`.

    1. `secrets_dir/<namespace>/<secret name>/<key>`: the chart mounts each Secret a namespace may use there
       (FIRECRAWL_SECRETS_DIR); a request only ever gets a key mounted for its own namespace.
    2. `default_key` (FIRECRAWL_API_KEY), one key for every namespace, sent only to `default_url`
       (FIRECRAWL_API_URL): otherwise any ScrapeRequest could send it to a Firecrawl URL of its choosing.

    Files are read on every use, so a rotated Secret (kubelet updates mounted Secrets) takes effect at once.
    """

    secrets_dir: Path | None = None
    default_key: SecretStr | None = None
    default_url: str = DEFAULT_API_URL

    def key_for(self, namespace: str, backend: FirecrawlBackend, page_url: str) -> str:
        ref = backend.api_key_secret_ref
        if self.secrets_dir is not None and _SECRET_NAME.match(namespace) and _SECRET_NAME.match(ref.name) \
                and _SECRET_KEY.match(ref.key) and ref.key not in (".", ".."):
            path = self.secrets_dir / namespace / ref.name / ref.key
            try:
                key = path.read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                key = ""
            except OSError as error:
                logger.warning("cannot read the Firecrawl key file %s: %s", path, error)
                key = ""
            if key:
                return key
        if self.default_key is not None and _same_api(backend.url, self.default_url):
            return self.default_key.get_secret_value()
        where = f"{self.secrets_dir}/{namespace}/{ref.name}/{ref.key}" if self.secrets_dir else (
            "FIRECRAWL_SECRETS_DIR/<namespace>/<secret>/<key>")
        raise FirecrawlKeyMissingError(page_url, (
            f"backend Firecrawl: this worker has no API key for Secret {ref.name!r} key {ref.key!r} of namespace "
            f"{namespace!r}; mount that Secret key into the workers at {where}, or (for {self.default_url} only) "
            "set FIRECRAWL_API_KEY"
        ), retryable=False)


def _same_api(url: str, other: str) -> bool:
    return url.rstrip("/").lower() == other.rstrip("/").lower()


def _utc_now() -> datetime:
    return datetime.now(UTC)


class FirecrawlClient:
    """Calls Firecrawl's scrape API; one HTTP client per network policy, as the fetcher does.

    `resolver` and `extra_allowed` are the same test hooks as the fetcher's.
    """

    def __init__(
        self,
        keys: FirecrawlKeys,
        *,
        resolver: Resolver | None = None,
        extra_allowed: frozenset[Endpoint] = frozenset(),
        ssl_context: ssl.SSLContext | None = None,
        now: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.keys = keys
        self._resolver = resolver
        self._extra_allowed = extra_allowed
        self._ssl_context = ssl_context
        self._now = now
        self._sessions: dict[bool, aiohttp.ClientSession] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            await session.close()

    def _session(self, allow_private: bool) -> tuple[aiohttp.ClientSession, NetworkPolicy]:
        network = NetworkPolicy(allow_private, self._extra_allowed)
        session = self._sessions.get(allow_private)
        if session is None:
            resolver = self._resolver or SystemResolver(use_search_domains=allow_private)
            session = self._sessions[allow_private] = safe_session(network, resolver, self._ssl_context)
        return session, network

    async def scrape(
        self, backend: FirecrawlBackend, url: str, *, api_key: str, policy: FetchPolicy,
        timeout: float,  # noqa: ASYNC109 - the try's deadline, turned into a FetchTimeoutError naming the URL
    ) -> Page:
        """The page's raw HTML as Firecrawl fetched it (`api_key` from `keys.key_for`). Raises `FetchError`s,
        as the fetcher does."""
        endpoint = backend.url.rstrip("/") + "/v1/scrape"
        session, network = self._session(policy.allow_private_networks)
        refusal = network.check_url(endpoint)
        if refusal is not None:
            raise UnsafeUrlError(url, refusal, endpoint)
        # rawHtml, not html: Firecrawl's html format is cleaned of <script> elements, JSON-LD included.
        # Firecrawl gets a little less time than we wait, so that its own timeout error reaches us.
        body = {"url": url, "formats": ["rawHtml"], "timeout": max(1000, int(timeout * 900))}
        started = time.monotonic()
        cap = policy.max_response_bytes * _ENVELOPE_FACTOR + _ENVELOPE_SLACK
        headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json",
                   "Accept-Encoding": ACCEPT_ENCODING}
        try:
            async with asyncio.timeout(timeout):
                response = await session.post(checked_target(network, endpoint), json=body, headers=headers,
                                              allow_redirects=False)
                try:
                    raw = await read_capped(response, cap, truncate=False)
                finally:
                    response.release()
        except AddressRefusedError as error:
            raise UnsafeUrlError(url, error.refusal, endpoint) from None
        except BodyTooLargeError:
            raise _too_large(url, policy) from None
        except TimeoutError:
            raise FetchTimeoutError(url, (
                f"gave up on {redact_url(url)} after {timeout:g} s: Firecrawl at {backend.url} did not answer within "
                "this try's timeout; the next try gets longer (retry.timeoutSeconds)"
            ), retryable=True) from None
        except (aiohttp.ClientError, NameNotResolvedError, ValueError, OSError) as error:
            raise FetchError(url, (
                f"could not reach Firecrawl at {backend.url} for {redact_url(url)}: {error or type(error).__name__}"
            ), retryable=True) from None
        return self._page(backend, url, response, raw, policy, time.monotonic() - started)

    def _page(
        self, backend: FirecrawlBackend, url: str, response: aiohttp.ClientResponse, raw: bytes, policy: FetchPolicy,
        elapsed: float,
    ) -> Page:
        status = response.status
        answer = _json_object(raw)
        reason = str(answer.get("error") or answer.get("message") or _phrase(status))
        shown = redact_url(url)
        if status == 402:
            raise FirecrawlCreditsExhaustedError(url, (
                f"Firecrawl at {backend.url} refused to scrape {shown}: HTTP 402 Payment Required, the account is "
                f"out of credits ({reason}); add credits to the Firecrawl account, then scrape again"
            ), retryable=False)
        if status == 429:
            header = response.headers.get("retry-after")
            retry_after = None if header is None else parse_retry_after(header, self._now())
            wait = f"; retry after {retry_after:g} s" if retry_after is not None else ""
            raise FirecrawlRateLimitedError(
                url, f"Firecrawl at {backend.url} is rate limiting us (HTTP 429: {reason}){wait}", retry_after)
        if status in (401, 403):
            ref = backend.api_key_secret_ref
            raise FetchError(url, (
                f"Firecrawl at {backend.url} refused the API key from Secret {ref.name!r} key {ref.key!r} "
                f"(HTTP {status}: {reason}); check that the key is valid"
            ), retryable=False)
        if not 200 <= status < 300:
            raise FetchError(url, f"Firecrawl at {backend.url} could not scrape {shown}: HTTP {status} ({reason})",
                             retryable=status in (408, 409) or status >= 500)
        data = answer.get("data")
        if answer.get("success") is not True or not isinstance(data, dict):
            raise FetchError(url, f"Firecrawl at {backend.url} could not scrape {shown}: {reason}", retryable=True)
        metadata = data.get("metadata")
        if not isinstance(metadata, dict):
            metadata = {}
        target_status = metadata.get("statusCode")
        if isinstance(target_status, int) and not 200 <= target_status < 300:
            message = f"{shown} answered HTTP {target_status} {_phrase(target_status)} (fetched by Firecrawl)"
            raise HttpStatusError(url, message, status=target_status, retry_after=None)
        html = data.get("rawHtml", data.get("html"))
        if not isinstance(html, str):
            raise FetchError(url, f"Firecrawl at {backend.url} returned no HTML for {shown}", retryable=True)
        if len(html.encode()) > policy.max_response_bytes:
            raise _too_large(url, policy)
        final = metadata.get("url") or metadata.get("sourceURL") or url
        return Page(
            url=final if isinstance(final, str) else url, status=target_status if isinstance(target_status, int)
            else 200, headers=response.headers, text=html, content_type="text/html", encoding="utf-8", elapsed=elapsed,
        )


def _too_large(url: str, policy: FetchPolicy) -> ResponseTooLargeError:
    return ResponseTooLargeError(url, (
        f"stopped reading {redact_url(url)} from Firecrawl: over fetch.maxResponseBytes ({policy.max_response_bytes}); "
        "raise fetch.maxResponseBytes to fetch it"
    ), retryable=False)


def _json_object(raw: bytes) -> dict[str, object]:
    try:
        decoded = json.loads(raw)
    except ValueError:
        return {}
    return decoded if isinstance(decoded, dict) else {}


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "(unknown status)"
