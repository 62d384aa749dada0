"""The views of the two kinds and of the queues: schedules (trigger, suspend, resume), scrape requests (cancel) and
queue statistics; each authorized as the caller, each action carried out as the operator (kubearq.operator.actions)."""

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

from kubearq.core.contract import function_registry_key
from kubearq.core.observability import log_context
from kubearq.operator.actions import (
    CANCEL_ANNOTATION,
    TRIGGER_ANNOTATION,
    Ask,
    annotation_patch,
    new_ask_id,
    suspend_patch,
)
from kubearq.operator.console.pages import listed, namespaces_of, notice, schedule_row, scrape_row
from kubearq.operator.console.reviews import ForbiddenError, Permission
from kubearq.operator.console.session import SECURITY_HEADERS, Refused
from kubearq.operator.kube import KubeObject, NotFoundError, Resource
from kubearq.operator.queuestats import QueueStats, queue_stats
from kubearq.operator.rbac import QUEUES
from kubearq.operator.resources import GROUP, VERSION

if TYPE_CHECKING:
    from kubearq.operator.console.server import Console
    from kubearq.operator.console.session import Session

logger = logging.getLogger(__name__)
SYNC_SCHEDULES = Resource(GROUP, VERSION, "syncschedules")
SCRAPE_REQUESTS = Resource(GROUP, VERSION, "scraperequests")
API_TIMEOUT = 10.0


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
        rows = [schedule_row(body) for body in objects]
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
        return self.console.render("queues.html", user=session.user, csrf=session.csrf, active="/queues",
                                   queues=stats, served=await self.served_functions([item.queue for item in stats]))

    async def _summary(self, request: web.Request) -> web.Response:
        session = await self.console.session(request)
        stats = await self.queue_table(session)
        return web.json_response({"queues": [asdict(item) for item in stats]}, headers=SECURITY_HEADERS)

