"""The failed-jobs view: keyset pages of the store (kubearq.core.failedjobs), searched by id, function, queue,
resource or error text, and re-drive and discard, authorized per namespace of the jobs' resources."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from aiohttp import web

from kubearq.core.failedjobs import FailedJobFilter, InvalidCursorError, Selection
from kubearq.operator.console.pages import notice
from kubearq.operator.console.reviews import ForbiddenError, Permission
from kubearq.operator.console.session import Refused
from kubearq.operator.rbac import FAILED_JOBS

if TYPE_CHECKING:
    from kubearq.operator.console.server import Console
    from kubearq.operator.console.session import Session

logger = logging.getLogger(__name__)

PAGE_SIZE = 50
MAX_SELECTED = 1000
FILTER_FIELDS = ("id", "function", "queue", "namespace", "name", "error")


class FailedJobViews:
    """/failed-jobs, its re-drive and discard."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/failed-jobs", self._failed_jobs)
        router.add_post("/failed-jobs/{action:redrive|discard}", self._failed_jobs_action)

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


def _where(filters: Mapping[str, str]) -> FailedJobFilter | None:
    given = {name: filters[name] for name in ("function", "queue", "namespace", "name", "error") if filters.get(name)}
    return FailedJobFilter(**given) if given else None
