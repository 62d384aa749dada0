"""The dashboard's HTTP server (aiohttp, already the operator's probe server): log in, the views, the actions.

Every request is authenticated (TokenReview) and each view and action authorized (SubjectAccessReview) as the caller;
an authorized action is then carried out as the operator: a patch through the API server that the leader acts on
(kubearq.operator.actions), or a re-drive or discard in the failed-jobs store. Pages are rendered on the server
(jinja2, autoescaped); the one script refreshes the queue counts from one summary endpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import asyncpg
import httpx
import jinja2
from aiohttp import web
from redis.asyncio import Redis

from kubearq.core.connections import TRANSIENT_ERRORS
from kubearq.core.failedjobs import FailedJobStore
from kubearq.core.failedjobstores import PostgresFailedJobs, RedisFailedJobs, pool_connect
from kubearq.core.observability import serve
from kubearq.operator.console.failedjobs import FailedJobViews
from kubearq.operator.console.pages import Key
from kubearq.operator.console.reviews import ForbiddenError, NotAuthenticatedError, Permission, Reviews
from kubearq.operator.console.session import (
    COOKIE,
    COOKIE_SECONDS,
    CSRF_FIELD,
    SECURITY_HEADERS,
    Origin,
    Refused,
    Session,
    csrf_matches,
)
from kubearq.operator.console.views import ResourceViews
from kubearq.operator.kube import ApiError, KubeApi, KubeObject

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
STORE_TIMEOUT = 30.0  # one PostgreSQL statement of the failed-jobs store
MAX_FORM_BYTES = 256 * 1024
VIEWER_ROLE = "kubearq-viewer"
USER_ROLE = "kubearq-operator-user"


@dataclass
class ConsoleConfig:
    """What the console needs from the operator's settings."""

    queues: Callable[[], set[str]]
    """The queues to show (those the resources name, plus QUEUES)."""
    secure_cookie: bool | None = None
    viewer_role: str = VIEWER_ROLE
    user_role: str = USER_ROLE


class Console:
    """The dashboard application: `app()` for aiohttp, `start()`/`stop()` to serve it on a port."""

    def __init__(self, api: KubeApi, reviews: Reviews, objects: Callable[[], Mapping[Key, KubeObject]],
                 redis: Redis, failed_jobs: FailedJobStore, config: ConsoleConfig,
                 observe: Callable[[str, KubeObject], None] | None = None,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.api = api
        self.reviews = reviews
        self.objects = objects
        self.redis = redis
        self.failed_jobs = failed_jobs
        self.config = config
        self.observe = observe
        self._on_error = on_error
        self.templates = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                            undefined=jinja2.StrictUndefined)
        self._runner: web.AppRunner | None = None
        self._closers: list[Callable[[], Awaitable[object]]] = []
        self.port = 0

    # --- serving -------------------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=MAX_FORM_BYTES)
        app.router.add_get("/", self._home)
        app.router.add_get("/login", self._login_page)
        app.router.add_post("/login", self._login)
        app.router.add_post("/logout", self._logout)
        ResourceViews(self).add_routes(app.router)
        FailedJobViews(self).add_routes(app.router)
        app.router.add_static("/static", HERE / "static", append_version=False)
        return app

    async def start(self, host: str, port: int) -> int:
        self._runner, self.port = await serve(
            self.app(), host, port, in_use=f"DASHBOARD_PORT {port} is already in use on {host}: set DASHBOARD_PORT "
                                           "to a free port (not HTTP_PORT's), or 0 for any free port")
        logger.info("dashboard serving on %s:%d", host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for close in reversed(self._closers):
            await close()
        self._closers.clear()

    # --- rendering and errors ----------------------------------------------------------------------------------

    def render(self, template: str, code: int = 200, **context: Any) -> web.Response:
        context.setdefault("user", None)
        context.setdefault("notice", None)
        context.setdefault("active", "")
        body = self.templates.get_template(template).render(**context)
        return web.Response(text=body, status=code, content_type="text/html", headers=SECURITY_HEADERS)

    def error_page(self, status: int, title: str, message: str, session: Session | None = None,
                   back: str = "/") -> web.Response:
        response = self.render("error.html", status, status=status, title=title, message=message, back=back,
                               user=session.user if session else None, csrf=session.csrf if session else "")
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="kubearq"'
        return response

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            response = await handler(request)
        except ForbiddenError as error:
            referer = urlsplit(request.headers.get("Referer", ""))
            back = _local(referer.path + (f"?{referer.query}" if referer.query else ""), default="/")
            return self.error_page(403, "Forbidden", str(error), back=back)
        except Refused as refused:
            if isinstance(refused.response, web.HTTPException):
                raise refused.response from None
            return refused.response
        except web.HTTPException as error:
            if error.status >= 400:
                return self.error_page(error.status, error.reason, error.text or error.reason)
            for name, value in SECURITY_HEADERS.items():
                error.headers.setdefault(name, value)
            raise
        except ApiError as error:
            self._count("dashboard_api")
            logger.warning("dashboard: the Kubernetes API refused %s %s: %s", request.method, request.path, error)
            return self.error_page(502 if error.code >= 500 else error.code, "Kubernetes API error", str(error))
        except (TimeoutError, httpx.TransportError) as error:
            self._count("dashboard_api")
            logger.warning("dashboard: the Kubernetes API did not answer %s %s: %r", request.method, request.path,
                           error)
            return self.error_page(503, "Service Unavailable", "the Kubernetes API did not answer in time (it checks "
                                   "every token and permission): try again in a moment")
        except (*TRANSIENT_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            self._count("dashboard_store")
            logger.warning("dashboard: %s %s failed: Redis or PostgreSQL: %r", request.method, request.path, error)
            return self.error_page(503, "Service Unavailable", "Redis or PostgreSQL (where queues and failed jobs are "
                                   f"kept) did not answer: {type(error).__name__}: {error}; try again in a moment")
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    def _count(self, operation: str) -> None:
        if self._on_error is not None:
            self._on_error(operation)

    # --- who is asking -------------------------------------------------------------------------------------------

    async def session(self, request: web.Request) -> Session:
        """The caller, from `Authorization: Bearer` or the cookie; unauthenticated callers get the login page."""
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Refused(self.error_page(401, "Unauthorized",
                                               "the Authorization header must be `Bearer <token>`"))
            try:
                return Session(await self.reviews.authenticate(token.strip()), token.strip(), from_cookie=False)
            except NotAuthenticatedError as error:
                raise Refused(self.error_page(401, "Unauthorized", str(error))) from None
        cookie = request.cookies.get(COOKIE)
        if not cookie:
            if request.method == "GET":
                target = request.path_qs if request.path != "/" else "/schedules"
                raise Refused(web.HTTPSeeOther("/login?" + urlencode({"next": target})))
            raise Refused(self.error_page(401, "Unauthorized", "log in first: this request carried no token"))
        try:
            return Session(await self.reviews.authenticate(cookie), cookie, from_cookie=True)
        except NotAuthenticatedError as error:
            response = self.login_page(str(error), request.path_qs, status=401)
            response.del_cookie(COOKIE, path="/")
            raise Refused(response) from None

    def own_origin(self, request: web.Request) -> str:
        scheme = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip()
        host = request.headers.get("X-Forwarded-Host", request.host).split(",")[0].strip()
        return f"{scheme}://{host}"

    def check_origin(self, request: web.Request) -> None:
        origin = Origin(request.headers.get("Origin"), request.headers.get("Referer"),
                        request.headers.get("Sec-Fetch-Site"))
        why = origin.cross_site(self.own_origin(request))
        if why:
            raise Refused(self.error_page(403, "Forbidden", f"refused a form sent from another site: {why}"))

    async def form(self, request: web.Request, session: Session | None) -> dict[str, list[str]]:
        """The posted form, after the same-origin and CSRF checks (for a cookie session)."""
        body = await request.read()
        fields: dict[str, list[str]] = {}
        for name, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
            fields.setdefault(name, []).append(value)
        if session is None or session.from_cookie:
            self.check_origin(request)
        if session is not None and session.from_cookie and \
                not csrf_matches(session.token, next(iter(fields.get(CSRF_FIELD) or []), None)):
            raise Refused(self.error_page(
                403, "Forbidden", "refused a form without this session's CSRF token: it did not come from a page of "
                "this dashboard (reload the page and try again)", session))
        return fields

    # --- log in and out ------------------------------------------------------------------------------------------

    def login_page(self, error: str | None = None, next_path: str = "/schedules", status: int = 200) -> web.Response:
        return self.render("login.html", status, error=error, next=_local(next_path),
                           viewer_role=self.config.viewer_role, user_role=self.config.user_role)

    async def _login_page(self, request: web.Request) -> web.Response:
        return self.login_page(next_path=request.query.get("next", "/schedules"))

    async def _login(self, request: web.Request) -> web.StreamResponse:
        fields = await self.form(request, None)
        token = (fields.get("token") or [""])[0].strip()
        next_path = _local((fields.get("next") or ["/schedules"])[0])
        try:
            user = await self.reviews.authenticate(token)
        except NotAuthenticatedError as error:
            return self.login_page(str(error), next_path, status=401)
        logger.info("dashboard: %s logged in", user.name)
        redirect = web.HTTPSeeOther(next_path)
        secure = self.config.secure_cookie
        if secure is None:
            secure = self.own_origin(request).startswith("https:")
        redirect.set_cookie(COOKIE, token, max_age=COOKIE_SECONDS, path="/", httponly=True, samesite="Strict",
                            secure=secure)
        raise redirect

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        session = await self.session(request)
        await self.form(request, session)
        redirect = web.HTTPSeeOther("/login")
        redirect.del_cookie(COOKIE, path="/")
        raise redirect

    async def _home(self, request: web.Request) -> web.StreamResponse:
        await self.session(request)
        raise web.HTTPSeeOther("/schedules")

    # --- shared by the views ----------------------------------------------------------------------------------

    async def buttons(self, session: Session, resource: str, verbs: tuple[str, ...],
                      namespaces: set[str]) -> dict[tuple[str, str], tuple[bool, str]]:
        """Per (verb, namespace): may the caller, and if not, the refusal the disabled button shows. A hint only: the
        action itself asks again, for the one object (RBAC may name objects)."""
        wanted = [Permission(verb, resource, namespace) for verb in verbs for namespace in sorted(namespaces)]
        answers = await self.reviews.allowed_all(session.user, wanted)
        return {(permission.verb, permission.namespace): (allowed, "" if allowed else permission.refusal(session.user))
                for permission, allowed in answers.items()}


def _local(path: str, default: str = "/schedules") -> str:
    """A path of this site only (never `//evil.example` or `https://…`): where to go after logging in, or back."""
    return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else default


async def start_console(api: KubeApi, redis: Redis, objects: Callable[[], Mapping[Key, KubeObject]],
                        config: ConsoleConfig, *, host: str, port: int, database_url: str | None = None,
                        cache_seconds: float = 10.0, observe: Callable[[str, KubeObject], None] | None = None,
                        on_error: Callable[[str], None] | None = None) -> Console:
    """Serve the dashboard on `host:port` (stop it with `Console.stop()`). Failed jobs are read from PostgreSQL at
    `database_url` (a small pool, opened on the first request: the operator starts while PostgreSQL is away), else
    from the workers' Redis store."""
    closers: list[Callable[[], Awaitable[object]]] = []
    store: FailedJobStore
    if database_url:
        pool = await asyncpg.create_pool(database_url, min_size=0, max_size=4, command_timeout=STORE_TIMEOUT)
        closers.append(pool.close)
        store = PostgresFailedJobs(pool_connect(pool), redis)
    else:
        store = RedisFailedJobs(redis)
    console = Console(api, Reviews(api, cache_seconds=cache_seconds), objects, redis, store, config,
                      observe=observe, on_error=on_error)
    console._closers.extend(closers)
    try:
        await console.start(host, port)
    except BaseException:
        await console.stop()
        raise
    return console
