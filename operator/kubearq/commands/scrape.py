"""`kubearq scrape list|get|cancel|failures NAME`: ScrapeRequests, their progress and what failed.

`cancel` patches the `kubearq.dev/cancel` annotation, which the operator's leader acts on once (its pages not yet
fetched leave the queue, what was stored stays), so the caller's own RBAC decides: it needs patch on scraperequests.
`failures` reads every failed page from PostgreSQL with DATABASE_URL, else the first ones kept in status.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, cast

from kubearq.commands import Subcommands
from kubearq.commands._cluster import (
    API_TIMEOUT,
    FAILED,
    OK,
    Cluster,
    CommandError,
    add_output,
    add_scope,
    add_wait,
    age,
    answer,
    call,
    condition,
    connect,
    dump,
    listed,
    namespaced,
    no_answer,
    now_utc,
    run,
    shown,
    table,
)
from kubearq.operator.actions import CANCEL_ANNOTATION, Ask, annotation_patch, new_ask_id
from kubearq.operator.kube import KubeObject, Resource
from kubearq.operator.resources import GROUP, VERSION

SCRAPE_REQUESTS = Resource(GROUP, VERSION, "scraperequests")
KIND = "ScrapeRequest"
FAILURES_QUERY = """
SELECT url, page_kind, error, tries, failed_at FROM scrape_failures
WHERE request_uid = $1 ORDER BY failed_at, url LIMIT $2
"""


def register(commands: Subcommands) -> None:
    group = commands.add_parser(
        "scrape", help="list, inspect or cancel ScrapeRequests, and list their failed pages",
        description="ScrapeRequests of the cluster of KUBECONFIG. cancel is asked of the operator through the API "
                    "server (your RBAC needs patch on scraperequests). Exit codes: 0 ok, 1 failed or refused, "
                    "2 bad usage, 3 not found or forbidden.")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="the requests, their phase and progress")
    add_scope(listing, all_namespaces=True)
    add_output(listing)
    show = actions.add_parser("get", help="one request: phase, page counts, first failures")
    show.add_argument("name", metavar="NAME")
    add_scope(show)
    add_output(show, wide=False)
    cancel = actions.add_parser(
        "cancel", help="stop a request: pages not yet fetched leave the queue, stored results stay")
    cancel.add_argument("name", metavar="NAME")
    add_scope(cancel)
    add_wait(cancel, "the operator to stop it")
    failures = actions.add_parser(
        "failures", help="the failed pages of a request and why they failed",
        description="Every page that failed its last try, with its error: from PostgreSQL when DATABASE_URL is set "
                    "(the workers' database), else the first ones kept in the request's status.")
    failures.add_argument("name", metavar="NAME")
    failures.add_argument("--limit", type=int, default=1000, help="at most this many (default: 1000)")
    add_scope(failures)
    add_output(failures, wide=False)
    group.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    return run(f"scrape {args.action}", lambda: ACTIONS[args.action](args))


async def get_request(cluster: Cluster, name: str) -> KubeObject:
    return await call(cluster, lambda: cluster.api.get(SCRAPE_REQUESTS, name, namespace=cluster.namespace,
                                               timeout=API_TIMEOUT),
                      verb="get", resource=SCRAPE_REQUESTS, kind=KIND, name=name)


def pages(counts: object) -> str:
    counted = cast(Mapping[str, Any], counts or {})
    return f"{counted.get('done', 0)}/{counted.get('total', 0)} ({counted.get('failed', 0)} failed)"


async def list_requests(args: argparse.Namespace) -> int:
    cluster = await connect(args)
    async with cluster.api:
        items = await listed(cluster, SCRAPE_REQUESTS, KIND)
    if args.output in ("json", "yaml"):
        print(dump({"apiVersion": "v1", "kind": "List", "items": items}, args.output))
        return OK
    now = now_utc()
    header = ["NAME", "PHASE", "PROGRESS", "FAILED", "AGE"]
    if args.output == "wide":
        header += ["QUEUE", "LISTING", "DETAIL", "STARTED", "COMPLETED"]
    rows = []
    for obj in items:
        status = cast(Mapping[str, Any], obj.get("status") or {})
        row = [obj.get("metadata", {}).get("name", ""), str(status.get("phase") or "Pending"),
               str(status.get("progress") or "0/0"), str(status.get("failedPages", 0)),
               age(obj.get("metadata", {}).get("creationTimestamp"), now)]
        if args.output == "wide":
            row += [str((obj.get("spec") or {}).get("queue") or "arq:queue"), pages(status.get("listingPages")),
                    pages(status.get("detailPages")), shown(status.get("startTime")),
                    shown(status.get("completionTime"))]
        rows.append((obj, row))
    if not rows:
        print("No scraperequests found" + (f" in namespace {cluster.namespace}." if cluster.namespace else "."))
        return OK
    print(table(*namespaced(cluster, header, rows)))
    return OK


def describe(obj: KubeObject, now: datetime) -> str:
    metadata, status = obj.get("metadata", {}), cast(Mapping[str, Any], obj.get("status") or {})
    spec = cast(Mapping[str, Any], obj.get("spec") or {})
    succeeded = condition(obj, "Succeeded")
    urls = spec.get("urls")
    source = f"{len(urls)} listing URL(s)" if isinstance(urls, list) else "urlsFrom a ConfigMap"
    lines = [
        f"Name:          {metadata.get('name')}",
        f"Namespace:     {metadata.get('namespace')}",
        f"Phase:         {status.get('phase') or 'Pending'}"
        + (f" ({succeeded.get('reason')}: {succeeded.get('message')})" if succeeded else ""),
        f"Source:        {source} on queue {spec.get('queue') or 'arq:queue'}",
        f"Progress:      {status.get('progress') or '0/0'}",
        f"Listing pages: {pages(status.get('listingPages'))}",
        f"Detail pages:  {pages(status.get('detailPages'))}",
        f"Started:       {shown(status.get('startTime'))}",
        f"Completed:     {shown(status.get('completionTime'))}",
        f"Age:           {age(metadata.get('creationTimestamp'), now)}",
    ]
    cancellation = cast(Mapping[str, Any], status.get("lastCancel") or {})
    if cancellation:
        lines.append(f"Cancellation:  {cancellation.get('id')} {cancellation.get('outcome')}: "
                     f"{cancellation.get('message')}")
    failures = cast(list[Mapping[str, Any]], status.get("failedUrls") or [])
    if failures:
        lines.append(f"Failed pages:  {status.get('failedPages', len(failures))} (the first {len(failures)}; "
                     f"`kubearq scrape failures {metadata.get('name')}` lists them all)")
        lines += [f"  {item.get('url')}: {item.get('error')}" for item in failures[:5]]
    return "\n".join(lines)


async def get(args: argparse.Namespace) -> int:
    cluster = await connect(args)
    async with cluster.api:
        obj = await get_request(cluster, args.name)
    print(dump(dict(obj), args.output) if args.output else describe(obj, now_utc()))
    return OK


async def cancel(args: argparse.Namespace) -> int:
    cluster = await connect(args)
    async with cluster.api:
        await get_request(cluster, args.name)  # 404 before 403: a typo is said as such
        ask = Ask(id=new_ask_id(), requested_at=now_utc())
        patch = annotation_patch(CANCEL_ANNOTATION, ask)
        await call(cluster, lambda: cluster.api.patch(SCRAPE_REQUESTS, args.name, patch, namespace=cluster.namespace,
                                                      timeout=API_TIMEOUT),
                   verb="patch", resource=SCRAPE_REQUESTS, kind=KIND, name=args.name)
        if args.no_wait:
            print(f"scraperequest/{args.name}: cancellation asked (ask {ask.id})")
            return OK
        record = await answer(lambda: get_request(cluster, args.name), field="lastCancel",
                              annotation=CANCEL_ANNOTATION, ask_id=ask.id, within=args.timeout,
                              shown_by=f"kubearq scrape get {args.name}")
    if record is None:
        raise no_answer(ask.id, args.timeout)
    if record.get("outcome") != "Done":
        raise CommandError(f"refused: {record.get('message')}", FAILED)
    print(f"scraperequest/{args.name} {record.get('message')}")
    return OK


async def stored_failures(dsn: str, request_uid: str, limit: int) -> list[dict[str, Any]]:
    """Every failed page of the request kept in PostgreSQL (the workers' `scrape_failures` table)."""
    import asyncpg

    try:
        connection = await asyncpg.connect(dsn, timeout=API_TIMEOUT)
    except (OSError, asyncpg.PostgresError, TimeoutError) as error:
        raise CommandError(f"cannot read the failed pages from PostgreSQL (DATABASE_URL): {type(error).__name__}: "
                           f"{error}", FAILED) from None
    try:
        rows = await connection.fetch(FAILURES_QUERY, uuid.UUID(request_uid), limit)
    except asyncpg.UndefinedTableError:
        raise CommandError("DATABASE_URL has no scrape_failures table: is it the workers' database (their "
                           "migrations create it)?", FAILED) from None
    finally:
        await connection.close()
    return [{"url": row["url"], "kind": row["page_kind"], "error": row["error"], "tries": row["tries"],
             "failedAt": row["failed_at"].isoformat()} for row in rows]


async def failures(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise CommandError(f"--limit {args.limit}: give at least 1", 2)
    cluster = await connect(args)
    async with cluster.api:
        obj = await get_request(cluster, args.name)
    status = cast(Mapping[str, Any], obj.get("status") or {})
    dsn = os.environ.get("DATABASE_URL")
    total = int(status.get("failedPages", 0))
    if dsn:
        found = await stored_failures(dsn, str(obj.get("metadata", {}).get("uid")), args.limit)
        source = "PostgreSQL"
    else:
        found = [{"url": item.get("url"), "kind": None, "error": item.get("error"), "tries": item.get("tries"),
                  "failedAt": None} for item in cast(list[Mapping[str, Any]], status.get("failedUrls") or [])]
        found = found[: args.limit]
        source = "status"
        if total > len(found):
            print(f"the first {len(found)} of {total} failed pages, as kept in status; set DATABASE_URL (the "
                  "workers' PostgreSQL) for all of them", file=sys.stderr)
    if args.output:
        print(dump({"name": args.name, "failedPages": total, "source": source, "failures": found}, args.output))
        return OK
    if not found:
        print(f"scraperequest/{args.name} has no failed pages")
        return OK
    rows = [[str(item["url"]), shown(item["kind"]), shown(item["tries"]), str(item["error"])[:120]]
            for item in found]
    print(table(["URL", "KIND", "TRIES", "ERROR"], rows))
    return OK


ACTIONS = {"list": list_requests, "get": get, "cancel": cancel, "failures": failures}
