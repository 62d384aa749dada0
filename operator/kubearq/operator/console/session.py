"""How a browser stays logged in, and why a form post can be trusted: the token in an HttpOnly, SameSite=Strict
cookie, and a CSRF token derived from it that only the dashboard's own pages carry.

The CSRF token is a digest of the bearer token, so every operator replica behind the Service computes the same one
without a shared secret, and a page that leaks it leaks nothing that logs in. A request that brings its own
`Authorization: Bearer` header (a script, curl) needs none: browsers never add that header by themselves.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from kubearq.operator.console.reviews import User

COOKIE = "kubearq-token"
COOKIE_SECONDS = 12 * 3600  # the cookie's own life; the token's expiry, checked by TokenReview, may come sooner
CSRF_FIELD = "csrf"
_CSRF_CONTEXT = b"kubearq-console-csrf\x00"


def csrf_token(bearer_token: str) -> str:
    """The CSRF token of a session: the same for a token on every replica, and no use for logging in."""
    digest = hashlib.sha256(_CSRF_CONTEXT + bearer_token.encode()).digest()
    return base64.urlsafe_b64encode(digest[:24]).decode()


def csrf_matches(bearer_token: str, sent: str | None) -> bool:
    return sent is not None and hmac.compare_digest(csrf_token(bearer_token), sent)


@dataclass(frozen=True)
class Origin:
    """What a browser told about where a request came from (`Origin`, else `Referer`; `Sec-Fetch-Site`)."""

    origin: str | None
    referer: str | None
    fetch_site: str | None

    def cross_site(self, own: str) -> str | None:
        """Why the request does not come from a page of `own` (scheme://host[:port]); None if nothing says it does
        not. Browsers send `Origin` on every POST, so the CSRF token decides when it is absent (old clients)."""
        if self.fetch_site is not None and self.fetch_site not in ("same-origin", "none"):
            return f"the browser says this request came from a {self.fetch_site} page (Sec-Fetch-Site)"
        sent = self.origin if self.origin not in (None, "null") else None
        if sent is None and self.referer:
            parts = urlsplit(self.referer)
            sent = f"{parts.scheme}://{parts.netloc}"
        if self.origin == "null":
            return "the browser sent Origin: null (a sandboxed or privacy-sensitive context)"
        if sent is not None and sent.rstrip("/").lower() != own.rstrip("/").lower():
            return f"it came from {sent}, not from the dashboard's own origin {own}"
        return None


@dataclass(frozen=True)
class Session:
    """A request's caller: who, with which token, and whether it came in the cookie (then forms need CSRF)."""

    user: User
    token: str
    from_cookie: bool

    @property
    def csrf(self) -> str:
        return csrf_token(self.token)


class Refused(Exception):  # noqa: N818 - not an error of ours: the response a refused request gets
    """Raised with the response a refused request gets (a login page, a 401, a 403)."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__(response)
        self.response = response


# No script but our own file, no frames, no form posts elsewhere; nothing kept by caches or sent on as Referer.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin", "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}
