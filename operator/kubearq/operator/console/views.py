"""The views of the two kinds and of the queues: schedules (trigger, suspend, resume), scrape requests (cancel), queue
statistics, the workers serving them and one job's state; each authorized as the caller, each action carried out as
the operator (kubearq.operator.actions)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, cast
from urllib.parse import urlencode

from aiohttp import web
from arq.constants import job_key_prefix

from kubearq.core.contract import deserialize, function_registry_key, origin_of
from kubearq.core.failedjobs import redriven_from
from kubearq.core.observability import log_context
from kubearq.core.queueing import JobOutcome, JobState, job_outcomes
from kubearq.core.workers import GONE_AFTER_BEATS, list_workers
from kubearq.operator.actions import (
    CANCEL_ANNOTATION,
    TRIGGER_ANNOTATION,
    Ask,
    annotation_patch,
    new_ask_id,
    suspend_patch,
)
from kubearq.operator.console.pages import (
    listed,
    live_workers_by_queue,
    namespaces_of,
    notice,
    schedule_row,
    scrape_row,
    throughput_by_queue,
    worker_row,
)
from kubearq.operator.console.reviews import ForbiddenError, Permission
from kubearq.operator.console.session import SECURITY_HEADERS, Refused
from kubearq.operator.kube import KubeObject, NotFoundError, Resource
from kubearq.operator.queuestats import QueueStats, queue_stats
from kubearq.operator.rbac import FAILED_JOBS, QUEUES
from kubearq.operator.resources import GROUP, VERSION

if TYPE_CHECKING:
    from kubearq.operator.console.server import Console
    from kubearq.operator.console.session import Session

logger = logging.getLogger(__name__)
SYNC_SCHEDULES = Resource(GROUP, VERSION, "syncschedules")
SCRAPE_REQUESTS = Resource(GROUP, VERSION, "scraperequests")
API_TIMEOUT = 10.0
MAX_JOB_ID = 512


class ResourceViews:
    """/schedules, /scrapes, /queues and their actions."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/schedules", self._schedules)
        router.add_post("/schedules/{namespace}/{name}/{action:trigger|suspend|resume}", self._schedule_action)
        router.add_get("/scrapes", self._scrapes)
        router.add_post("/scrapes/{namespace}/{name}/cancel", self._cancel)
        router.add_get("/queues", self._queues)
        router.add_get("/summary.json", self._summary)
        router.add_get("/workers", self._workers)
        router.add_get("/job", self._job)

    async def visible_namespaces(self, session: Session, resource: str, kind: str) -> set[str] | None:
        """The namespaces whose `resource` the caller may list (None: all); ForbiddenError if none."""
        everywhere = Permission("list", resource)
        if (await self.console.reviews.allowed(session.user, everywhere))[0]:
            return None
        candidates = namespaces_of(self.console.objects(), kind)
        answers = await self.console.reviews.allowed_all(
            session.user, [Permission("list", resource, namespace) for namespace in candidates])
        allowed = {permission.namespace for permission, yes in answers.items() if yes}
        if not allowed:
            raise ForbiddenError(session.user, everywhere)
        return allowed

    async def _listing(self, request: web.Request, session: Session, resource: str,
                       kind: str) -> tuple[list[KubeObject], bool, list[str], str, str]:
        allowed = await self.visible_namespaces(session, resource, kind)
        namespace = request.query.get("namespace", "")
        search = request.query.get("q", "")
        choices = sorted(allowed) if allowed is not None else namespaces_of(self.console.objects(), kind)
        scope = allowed
        if namespace:
            if allowed is not None and namespace not in allowed:
                raise ForbiddenError(session.user, Permission("list", resource, namespace))
            scope = {namespace}
        objects, truncated = listed(self.console.objects(), kind, scope, search)
        return objects, truncated, choices, namespace, search

    async def _schedules(self, request: web.Request) -> web.Response:
        session = await self.console.session(request)
        objects, truncated, choices, namespace, search = await self._listing(request, session, "syncschedules",
                                                                             "SyncSchedule")
        now = datetime.now(UTC)
        rows = [schedule_row(body, now) for body in objects]
        rights = await self.console.buttons(session, "syncschedules", ("trigger", "suspend"),
                                            {row["namespace"] for row in rows})
        for row in rows:
            for verb in ("trigger", "suspend"):
                row[f"can_{verb}"], row[f"why_not_{verb}"] = rights[(verb, row["namespace"])]
        return self.console.render("schedules.html", user=session.user, csrf=session.csrf, active="/schedules",
                                   rows=rows, truncated=truncated, namespaces=choices, namespace=namespace,
                                   q=search, notice=notice(request.query))

    async def _scrapes(self, request: web.Request) -> web.Response:
        session = await self.console.session(request)
        objects, truncated, choices, namespace, search = await self._listing(request, session, "scraperequests",
                                                                             "ScrapeRequest")
        rows = [scrape_row(body) for body in objects]
        rights = await self.console.buttons(session, "scraperequests", ("cancel",), {row["namespace"] for row in rows})
        for row in rows:
            row["can_cancel"], row["why_not_cancel"] = rights[("cancel", row["namespace"])]
        return self.console.render("scrapes.html", user=session.user, csrf=session.csrf, active="/scrapes",
                                   rows=rows, truncated=truncated, namespaces=choices, namespace=namespace,
                                   q=search, notice=notice(request.query))

    def _ask(self, session: Session) -> Ask:
        now = datetime.now(UTC)
        return Ask(id=new_ask_id(now), requested_at=now, requested_by=session.user.name[:256])

    async def _patch(self, resource: Resource, kind: str, namespace: str, name: str,
                     patch: Mapping[str, object], session: Session) -> None:
        try:
            written = await self.console.api.patch(resource, name, patch, namespace=namespace, timeout=API_TIMEOUT)
        except NotFoundError:
            raise Refused(self.console.error_page(
                404, "Not Found", f"there is no {kind} {name} in namespace {namespace}", session)) from None
        if self.console.observe is not None:  # the page shows it at once, not when the watch brings it
            self.console.observe(kind, {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, **written})

    async def _schedule_action(self, request: web.Request) -> web.StreamResponse:
        session = await self.console.session(request)
        await self.console.form(request, session)
        namespace, name, action = (request.match_info[part] for part in ("namespace", "name", "action"))
        verb = "trigger" if action == "trigger" else "suspend"
        await self.console.reviews.require(session.user, Permission(verb, "syncschedules", namespace, name))
        if action == "trigger":
            ask = self._ask(session)
            patch = annotation_patch(TRIGGER_ANNOTATION, ask)
            done = {"done": "trigger", "ask": ask.id}
        else:
            patch = suspend_patch(action == "suspend")
            done = {"done": action}
        await self._patch(SYNC_SCHEDULES, "SyncSchedule", namespace, name, patch, session)
        with log_context(namespace=namespace, name=name):
            logger.info("dashboard: %s asked to %s SyncSchedule %s/%s", session.user.name, action, namespace, name)
        raise web.HTTPSeeOther("/schedules?" + urlencode({**done, "ns": namespace, "name": name}))

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        session = await self.console.session(request)
        await self.console.form(request, session)
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        await self.console.reviews.require(session.user, Permission("cancel", "scraperequests", namespace, name))
        ask = self._ask(session)
        await self._patch(SCRAPE_REQUESTS, "ScrapeRequest", namespace, name, annotation_patch(CANCEL_ANNOTATION, ask),
                          session)
        with log_context(namespace=namespace, name=name):
            logger.info("dashboard: %s asked to cancel ScrapeRequest %s/%s", session.user.name, namespace, name)
        raise web.HTTPSeeOther("/scrapes?" + urlencode({"done": "cancel", "ask": ask.id, "ns": namespace,
                                                         "name": name}))

    async def queue_table(self, session: Session) -> list[QueueStats]:
        await self.console.reviews.require(session.user, Permission("list", QUEUES))
        names = sorted(self.console.config.queues())
        return list(await asyncio.gather(*(queue_stats(self.console.redis, name) for name in names)))

    async def served_functions(self, queues: list[str]) -> dict[str, list[tuple[str, float]]]:
        """Per queue, the functions workers publish that they serve, and seconds since a worker last said so."""
        async with self.console.redis.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.hgetall(function_registry_key(queue))
            replies = cast(list[dict[bytes, bytes]], await pipe.execute())
        now = time.time()
        return {queue: sorted((name.decode(), max(0.0, now - float(stamp))) for name, stamp in reply.items())
                for queue, reply in zip(queues, replies, strict=True)}

    async def _queues(self, request: web.Request) -> web.Response:
        session = await self.console.session(request)
        stats = await self.queue_table(session)
        beats, now = (await list_workers(self.console.redis)).beats, time.time()
        return self.console.render("queues.html", user=session.user, csrf=session.csrf, active="/queues",
                                   queues=stats, served=await self.served_functions([item.queue for item in stats]),
                                   workers=live_workers_by_queue(beats, now),
                                   throughput=throughput_by_queue(beats, now))

    async def _workers(self, request: web.Request) -> web.Response:
        """Every worker whose record has not expired, as the queues are: for whoever may list `queues`."""
        session = await self.console.session(request)
        await self.console.reviews.require(session.user, Permission("list", QUEUES))
        workers = await list_workers(self.console.redis)
        now = time.time()
        rows = sorted((worker_row(beat, now) for beat in workers.beats),
                      key=lambda row: (row["queue"], row["identity"], row["instance"]))
        return self.console.render("workers.html", user=session.user, csrf=session.csrf, active="/workers",
                                   rows=rows, truncated=workers.truncated, unreadable=workers.unreadable,
                                   gone_after=GONE_AFTER_BEATS)

    async def _job(self, request: web.Request) -> web.Response:
        """One job's state (queued, running, succeeded, ...), e.g. a re-drive's: for whoever may get the failed jobs
        of its namespace (its origin's, or its re-drive source's; cluster-wide for a job of no resource)."""
        session = await self.console.session(request)
        job_id = request.query.get("id", "").strip()
        if not job_id or len(job_id) > MAX_JOB_ID:
            raise web.HTTPBadRequest(text=f"give the job's id (at most {MAX_JOB_ID} characters): /job?id=<job id>")
        kept = await self.console.failed_jobs.get(job_id)
        source_id = redriven_from(job_id)
        source = await self.console.failed_jobs.get(source_id) if source_id else None
        raw = await self.console.redis.get(job_key_prefix + job_id)
        payload = _payload(raw)
        record = kept or source
        origin = (origin_of(payload) if payload else None) or (record.origin if record else None)
        await self.console.reviews.require(session.user, Permission("get", FAILED_JOBS,
                                                                    origin.namespace if origin else ""))
        known = sorted(self.console.config.queues())
        asked = request.query.get("queue", "")  # only a queue the operator knows: no probing of other keys
        queues = [record.queue] if record else [asked] if asked in known else known
        outcome = await self._outcome(job_id, queues)
        if outcome.state is JobState.UNKNOWN and record is None and raw is None:
            raise Refused(self.console.error_page(
                404, "Not Found", f"no job {job_id} is known: not queued, no result kept (results are kept for "
                "KEEP_RESULT, an hour by default) and not a failed job", session, back="/failed-jobs"))
        function = str(payload.get("f", "")) if payload else (record.function if record else "")
        return self.console.render(
            "job.html", user=session.user, csrf=session.csrf, active="/failed-jobs", job_id=job_id,
            state=outcome.state.value, error=outcome.error,
            finished=_when_ms(outcome.finished_ms), function=function, queue=queues[0] if len(queues) == 1 else "",
            origin=origin, kept=kept, source_id=source_id if source else None)

    async def _outcome(self, job_id: str, queues: list[str]) -> JobOutcome:
        """The job's state on the first of `queues` that knows it (a result is found on any)."""
        outcome = JobOutcome(JobState.UNKNOWN)
        for queue in queues:
            outcome = (await job_outcomes(self.console.redis, queue, [job_id]))[job_id]
            if outcome.state is not JobState.UNKNOWN:
                break
        return outcome

    async def _summary(self, request: web.Request) -> web.Response:
        """What the queues and workers pages refresh themselves from: one request, whatever the number of jobs."""
        session = await self.console.session(request)
        stats = await self.queue_table(session)
        now = time.time()
        beats = (await list_workers(self.console.redis)).beats
        workers = [{field: row[field] for field in ("id", "queue", "state", "in_flight", "max_jobs", "heard",
                                                    "per_minute")}
                   for row in (worker_row(beat, now) for beat in beats)]
        throughput = throughput_by_queue(beats, now)
        queues = [{**asdict(item), "per_minute": round(throughput.get(item.queue, 0.0))} for item in stats]
        return web.json_response({"queues": queues, "workers": workers}, headers=SECURITY_HEADERS)



def _payload(raw: bytes | None) -> dict[str, object] | None:
    """ARQ's job payload, if it is one this kubearq can read (a page shows what it can, not an error)."""
    if raw is None:
        return None
    try:
        return deserialize(raw)
    except ValueError:
        logger.debug("dashboard: a job payload that is not JSON", exc_info=True)
        return None


def _when_ms(milliseconds: int | None) -> str:
    if milliseconds is None:
        return ""
    return datetime.fromtimestamp(milliseconds / 1000, UTC).replace(microsecond=0).isoformat()
