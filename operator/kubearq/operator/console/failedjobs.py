"""The failed-jobs view: keyset pages of the store (kubearq.core.failedjobs), searched by id, function, queue,
resource or error text, and re-drive and discard, authorized per namespace of the jobs' resources.

Re-drive and discard are an API too, for scripts and `kubearq jobs retry|discard`: POST
/api/failed-jobs/{redrive|discard} with the caller's bearer token (never the cookie, so no CSRF token is needed), a
FailedJobsRequest as the body and a FailedJobsAnswer back in JSON; a refusal is a Kubernetes `Status`, worded as the
API server words it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlencode

import asyncpg
import httpx
from aiohttp import web
from pydantic import ConfigDict, ValidationError, model_validator

from kubearq.core.connections import TRANSIENT_ERRORS
from kubearq.core.contract import ApiModel
from kubearq.core.failedjobs import FailedJobFilter, InvalidCursorError, Selection
from kubearq.operator.console.pages import notice
from kubearq.operator.console.reviews import ForbiddenError, NotAuthenticatedError, Permission, User
from kubearq.operator.console.session import SECURITY_HEADERS, Refused
from kubearq.operator.kube import ApiError
from kubearq.operator.rbac import FAILED_JOBS
from kubearq.operator.resources import GROUP

if TYPE_CHECKING:
    from kubearq.operator.console.server import Console
    from kubearq.operator.console.session import Session

logger = logging.getLogger(__name__)

PAGE_SIZE = 50
MAX_SELECTED = 1000
FILTER_FIELDS = ("id", "function", "queue", "namespace", "name", "error")
API_PATH = "/api/failed-jobs/"
Action = Literal["redrive", "discard"]


class ApiFilter(FailedJobFilter):
    """A filter as the API takes it: an unknown field is refused, not ignored (a misspelt one would otherwise
    widen the selection, up to every failed job)."""

    model_config = ConfigDict(extra="forbid")


class FailedJobsRequest(ApiModel):
    """The body of POST /api/failed-jobs/{redrive|discard}: `jobIds`, or `where` (`{"where": {}}`: every one)."""

    model_config = ConfigDict(extra="forbid")

    job_ids: list[str] | None = None
    where: ApiFilter | None = None

    @model_validator(mode="after")
    def _one_way(self) -> FailedJobsRequest:
        if (self.job_ids is None) == (self.where is None):
            raise ValueError('give "jobIds" (a list of failed job ids) or "where" (a filter; {} for every failed '
                             "job), one of them")
        if self.job_ids is not None and not 1 <= len(self.job_ids) <= MAX_SELECTED:
            raise ValueError(f'"jobIds": give 1 to {MAX_SELECTED} ids (more: select them with "where")')
        return self

    def selection(self) -> Selection:
        if self.job_ids is not None:
            return Selection.of(*dict.fromkeys(self.job_ids))
        given = self.where.model_dump(exclude_none=True) if self.where is not None else {}
        return Selection(where=FailedJobFilter(**given) if given else None)


class FailedJobsAnswer(ApiModel):
    """What POST /api/failed-jobs/{redrive|discard} did, and as whom."""

    action: Action
    user: str
    """The caller, as TokenReview named them."""
    redriven: dict[str, str] = {}
    """Failed job id → its re-driven job's id: enqueued now (then in `enqueued`) or by an earlier re-drive."""
    enqueued: list[str] = []
    not_runnable: list[str] = []
    """Undecodable jobs: nothing to run."""
    discarded: list[str] = []
    """The ids discarded, when the request named ids."""
    discarded_count: int = 0
    not_found: list[str] = []
    """Ids named that no failed job has (re-driven and gone, discarded, never kept): nothing done to them."""


class ApiRefusal(Exception):  # noqa: N818 - not an error of ours: the Status a refused API request gets
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def api_status(code: int, reason: str, message: str, details: Mapping[str, str] | None = None) -> web.Response:
    """A refusal as the Kubernetes API server words one (a `Status`), so clients of both read it alike."""
    body: dict[str, object] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                               "message": message, "reason": reason, "code": code}
    if details:
        body["details"] = dict(details)
    headers = dict(SECURITY_HEADERS)
    if code == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="kubearq"'
    return web.json_response(body, status=code, headers=headers)


class FailedJobViews:
    """/failed-jobs, its re-drive and discard."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/failed-jobs", self._failed_jobs)
        router.add_post("/failed-jobs/{action:redrive|discard}", self._failed_jobs_action)
        router.add_post(API_PATH + "{action:redrive|discard}", self._api_action)

    async def failed_jobs_scope(self, session: Session, verb: str, namespace: str) -> None:
        """May the caller `verb` failed jobs in `namespace` ("": of every namespace and of none)?"""
        await self.console.reviews.require(session.user, Permission(verb, FAILED_JOBS, namespace))

    async def _failed_jobs(self, request: web.Request) -> web.Response:
        session = await self.console.session(request)
        filters = {name: request.query.get(name, "").strip() for name in FILTER_FIELDS}
        everywhere = Permission("list", FAILED_JOBS, filters["namespace"])
        allowed, reason = await self.console.reviews.allowed(session.user, everywhere)
        if not allowed:
            hint = "" if filters["namespace"] else "to see one namespace's, search with Namespace set to it"
            raise ForbiddenError(session.user, everywhere, "; ".join(part for part in (reason, hint) if part))
        after = request.query.get("after") or None
        started = time.perf_counter()
        if filters["id"]:
            job = await self.console.failed_jobs.get(filters["id"])
            if job is not None and filters["namespace"] and (job.origin is None or
                                                             job.origin.namespace != filters["namespace"]):
                job = None
            jobs, next_cursor = ([job] if job else []), None
            keeping = await self.console.failed_jobs.keeping()
        else:
            try:
                page = await self.console.failed_jobs.page(_where(filters), after=after, limit=PAGE_SIZE)
            except InvalidCursorError as error:
                raise web.HTTPBadRequest(text=str(error)) from None
            jobs, next_cursor, keeping = page.jobs, page.next_cursor, page.keeping
        logger.debug("dashboard: a page of %d failed jobs in %.1f ms", len(jobs), (time.perf_counter() - started) * 1e3)
        rights = await self.console.buttons(session, FAILED_JOBS, ("redrive", "discard"), {filters["namespace"]})
        query = {name: value for name, value in filters.items() if value}
        return self.console.render(
            "failed_jobs.html", user=session.user, csrf=session.csrf, active="/failed-jobs", jobs=jobs,
            filters=filters, after=after, keeping_notice=keeping.notice, notice=notice(request.query),
            next_query=urlencode({**query, "after": next_cursor}) if next_cursor else None,
            first_query=urlencode(query),
            can={verb: rights[(verb, filters["namespace"])][0] for verb in ("redrive", "discard")},
            why_not={verb: rights[(verb, filters["namespace"])][1] for verb in ("redrive", "discard")})

    async def _failed_jobs_action(self, request: web.Request) -> web.StreamResponse:
        session = await self.console.session(request)
        fields = await self.console.form(request, session)
        verb = request.match_info["action"]
        filters = {name: (fields.get(f"where_{name}") or [""])[0].strip() for name in FILTER_FIELDS}
        back = {name: value for name, value in filters.items() if value}
        if (fields.get("all") or [""])[0] == "1" and not filters["id"]:
            # Every job matching the filter: authorized for its namespace (or, without one, for all).
            await self.failed_jobs_scope(session, verb, filters["namespace"])
            selection = Selection(where=_where(filters))
        else:
            ids = list(dict.fromkeys(fields.get("job_id") or ([filters["id"]] if filters["id"] else [])))
            if not ids:
                raise web.HTTPBadRequest(text="select the failed jobs to " + verb + " (none was selected)")
            if len(ids) > MAX_SELECTED:
                raise web.HTTPBadRequest(text=f"at most {MAX_SELECTED} jobs at once; use “all matching” instead")
            jobs = await asyncio.gather(*(self.console.failed_jobs.get(job_id) for job_id in ids))
            missing = [job_id for job_id, job in zip(ids, jobs, strict=True) if job is None]
            if missing:
                raise Refused(self.console.error_page(
                    404, "Not Found", "no failed job " + ", ".join(missing) + " is kept (re-driven and gone, or "
                    "discarded meanwhile): nothing changed", session, back="/failed-jobs"))
            # A job of no resource is everybody's: only a cluster-wide grant covers it.
            for namespace in sorted({job.origin.namespace if job and job.origin else "" for job in jobs}):
                await self.failed_jobs_scope(session, verb, namespace)
            selection = Selection.of(*ids)
        if verb == "redrive":
            result = await self.console.failed_jobs.redrive(selection)
            outcome = {"redriven": str(len(result.new_job_ids)), "enqueued": str(len(result.enqueued)),
                       "not_runnable": str(len(result.not_runnable))}
        else:
            outcome = {"discarded": str(await self.console.failed_jobs.discard(selection))}
        logger.info("dashboard: %s asked to %s failed jobs (%s): %s", session.user.name, verb,
                    "all matching" if selection.where else f"{len(selection.job_ids or ())} selected", outcome)
        raise web.HTTPSeeOther("/failed-jobs?" + urlencode({**back, "done": verb, **outcome}))

    # --- the JSON API ---------------------------------------------------------------------------------------------

    async def _api_action(self, request: web.Request) -> web.Response:
        verb: Action = "redrive" if request.match_info["action"] == "redrive" else "discard"
        try:
            user = await self._api_caller(request)
            asked = await _api_request(request)
            answer = await self._act(user, verb, asked.selection())
        except ApiRefusal as refusal:
            return api_status(refusal.code, refusal.reason, refusal.message)
        except ForbiddenError as error:
            logger.info("dashboard API: %s may not %s these failed jobs: %s", error.user.name, verb, error)
            return api_status(403, "Forbidden", str(error), {"group": GROUP, "kind": FAILED_JOBS})
        except ApiError as error:
            self.console._count("dashboard_api")
            logger.warning("dashboard API: the Kubernetes API refused a review for %s: %s", request.path, error)
            # The operator's own request was refused (its RBAC, say): not the caller's to fix, so never a 401/403.
            return api_status(502, "InternalError", "the Kubernetes API refused the operator's TokenReview or "
                              f"SubjectAccessReview: {error}")
        except (TimeoutError, httpx.TransportError) as error:
            self.console._count("dashboard_api")
            logger.warning("dashboard API: the Kubernetes API did not answer for %s: %r", request.path, error)
            return api_status(503, "ServiceUnavailable", "the Kubernetes API did not answer in time (it checks every "
                              "token and permission): try again in a moment")
        except (*TRANSIENT_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            self.console._count("dashboard_store")
            logger.warning("dashboard API: %s failed: Redis or PostgreSQL: %r", request.path, error)
            return api_status(503, "ServiceUnavailable", "Redis or PostgreSQL (where queues and failed jobs are kept) "
                              f"did not answer: {type(error).__name__}: {error}; try again in a moment")
        logger.info("dashboard API: %s asked to %s failed jobs (%s): %d re-driven, %d enqueued, %d discarded, %d not "
                    "found", user.name, verb, "by id" if asked.job_ids is not None else "all matching",
                    len(answer.redriven), len(answer.enqueued), answer.discarded_count, len(answer.not_found))
        return web.json_response(answer.model_dump(mode="json", by_alias=True), headers=SECURITY_HEADERS)

    async def _api_caller(self, request: web.Request) -> User:
        """The caller of `Authorization: Bearer`; a cookie is not read here, so a browser cannot be made to ask."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiRefusal(401, "Unauthorized", "send your Kubernetes bearer token as `Authorization: Bearer "
                                                  "<token>` (`kubectl create token NAME` issues one)")
        try:
            return await self.console.reviews.authenticate(token.strip())
        except NotAuthenticatedError as error:
            raise ApiRefusal(401, "Unauthorized", str(error)) from None

    async def _act(self, user: User, verb: Action, selection: Selection) -> FailedJobsAnswer:
        """Authorize, then re-drive or discard. Ids are authorized per namespace of their jobs' resources (a job of no
        resource only cluster-wide), a filter for its namespace (none: cluster-wide); any refusal changes nothing."""
        store = self.console.failed_jobs
        found: list[str] = []
        if selection.job_ids is None:
            namespace = selection.where.namespace if selection.where is not None else None
            await self.console.reviews.require(user, Permission(verb, FAILED_JOBS, namespace or ""))
        else:
            jobs = await store.get_many(selection.job_ids)
            for namespace in sorted({job.origin.namespace if job.origin else "" for job in jobs}):
                await self.console.reviews.require(user, Permission(verb, FAILED_JOBS, namespace))
            found = [job.job_id for job in jobs]
        if verb == "redrive":
            redrives = await store.redrive(selection)
            return FailedJobsAnswer(action=verb, user=user.name, redriven=redrives.new_job_ids,
                                    enqueued=redrives.enqueued, not_runnable=redrives.not_runnable,
                                    not_found=redrives.not_found)
        if selection.job_ids is None:
            return FailedJobsAnswer(action=verb, user=user.name, discarded_count=await store.discard(selection))
        removed = await store.discard(Selection.of(*found)) if found else 0
        kept = set(found)
        return FailedJobsAnswer(action=verb, user=user.name, discarded=found, discarded_count=removed,
                                not_found=[job_id for job_id in selection.job_ids if job_id not in kept])


async def _api_request(request: web.Request) -> FailedJobsRequest:
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiRefusal(413, "RequestEntityTooLarge", f"the body is larger than {request.client_max_size} bytes: "
                                                       f"select at most {MAX_SELECTED} ids, or by a filter") from None
    try:
        document = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiRefusal(400, "BadRequest", f"the body is not JSON: {error}") from None
    try:
        return FailedJobsRequest.model_validate(document)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(part) for part in problem['loc']) or 'the body'}: {problem['msg']}"
                             for problem in error.errors(include_url=False))
        raise ApiRefusal(400, "BadRequest", f"not a FailedJobsRequest: {problems}") from None


def _where(filters: Mapping[str, str]) -> FailedJobFilter | None:
    given = {name: filters[name] for name in ("function", "queue", "namespace", "name", "error") if filters.get(name)}
    return FailedJobFilter(**given) if given else None
