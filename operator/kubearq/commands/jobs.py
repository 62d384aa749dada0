"""`kubearq jobs get|failed|retry|discard`: a job by its id, and the jobs that failed for good, listed, re-driven and
discarded without redis-cli or SQL (kubearq.core.failedjobs).

`retry` and `discard` ask the operator (`--operator URL` or KUBEARQ_OPERATOR_URL: its dashboard port) as the caller,
with their own bearer token, and the operator does them only if the caller's Kubernetes RBAC grants `redrive` or
`discard` on `failedjobs.kubearq.dev` (kubearq.commands._operatorapi). `--direct` writes straight to Redis and
PostgreSQL instead, for cluster admins: RBAC is then not consulted. `get` and `failed` read directly, always.

Failed jobs are read where the workers keep them: in PostgreSQL with DATABASE_URL, else in Redis, the newest few
only, which the listing says. Reading (and `--direct`) needs REDIS_URL: live jobs are read there and re-driven jobs
go there. Exit codes: 0 ok, 1 failed (Redis, PostgreSQL or the operator unreachable), 2 bad usage or settings, 3 a
job not found, or forbidden (the operator's sentence says which verb on what).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

from arq.connections import ArqRedis
from arq.jobs import Job, JobResult
from redis.exceptions import RedisError

from kubearq.commands import Subcommands
from kubearq.commands._cluster import CommandError
from kubearq.core.connections import check_redis_url, create_redis
from kubearq.core.contract import DEFAULT_QUEUE, NAMESPACE_NAME, deserialize
from kubearq.core.failedjobs import (
    MAX_PAGE,
    FailedJob,
    FailedJobFilter,
    FailedJobStore,
    InvalidCursorError,
    Redrives,
    Selection,
    decode_cursor,
    redriven_from,
)
from kubearq.core.failedjobstores import PostgresFailedJobs, RedisFailedJobs, pool_connect
from kubearq.core.queueing import JobState, job_outcomes

OK, FAILED, USAGE, NOT_FOUND = 0, 1, 2, 3
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
ERROR_WIDTH = 60
_DURATION = re.compile(r"^(?P<amount>\d+)(?P<unit>[smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_FILTER_FLAGS = "--function, --queue, --resource, --error or --since"
OPERATOR_URL_ENV = "KUBEARQ_OPERATOR_URL"
NO_ROUTE = ("say where the {action} goes: --operator URL (or KUBEARQ_OPERATOR_URL), the operator's dashboard, e.g. "
            "http://localhost:8081 after `kubectl -n kubearq port-forward svc/kubearq-operator 8081`, which lets your "
            "Kubernetes RBAC decide; or --direct, straight to REDIS_URL and DATABASE_URL, for cluster admins (RBAC is "
            "then not consulted)")


class UserError(Exception):
    """Something the user gave that cannot work: the message says what would; `code` is the exit code."""

    def __init__(self, message: str, code: int = USAGE) -> None:
        super().__init__(message)
        self.code = code


# --- the command line -------------------------------------------------------------------------------------------


def register(commands: Subcommands) -> None:
    jobs = commands.add_parser(
        "jobs", help="show a job; list, re-drive or discard the jobs that failed for good",
        description="ARQ jobs by id, and the jobs that failed their last try (or gave up, or were refused), which "
                    "the workers keep with each try's error. REDIS_URL names the workers' Redis; DATABASE_URL their "
                    "PostgreSQL, where they keep failed jobs (without it: in Redis, the newest few only); `get` and "
                    "`failed` read them directly. `retry` and `discard` ask the operator as you (--operator), so that "
                    "your Kubernetes RBAC decides, or with --direct write to Redis and PostgreSQL themselves. "
                    "Exit codes: 0 ok, 1 failed, 2 bad usage, 3 not found or forbidden.")
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    get = actions.add_parser("get", help="one job: its state in Redis, and its record if it failed for good")
    get.add_argument("id", metavar="ID", help="the job's id")
    get.add_argument("--queue", default=DEFAULT_QUEUE, help=f"the queue it is on (default: {DEFAULT_QUEUE})")
    get.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml")
    failed = actions.add_parser("failed", help="the failed jobs, newest first, a page at a time")
    _add_filters(failed)
    failed.add_argument("--limit", type=int, default=50, help="jobs per page, 1 to 1000 (default: 50)")
    failed.add_argument("--after", metavar="CURSOR", help="the page after this one (the cursor a page ends with)")
    failed.add_argument("-o", "--output", choices=("table", "wide", "json", "yaml"), default="table")
    for action, verb in (("retry", "re-drive: run again with fresh tries under a new id linked to the old one"),
                         ("discard", "discard: forget them")):
        selecting = actions.add_parser(
            action, help=f"{verb.partition(':')[0]} failed jobs",
            description=f"{verb.capitalize()}. Give their ids, or --all-matching and filters (every failed job: "
                        "--all-matching --yes). Asked of the operator as you (--operator or KUBEARQ_OPERATOR_URL, "
                        "with your kubeconfig user's bearer token or --token): it acts only if your Kubernetes RBAC "
                        f"grants the verb {'redrive' if action == 'retry' else 'discard'} on failedjobs.kubearq.dev "
                        "in the namespace of each job's resource (cluster-wide for a job of no resource, and for "
                        "--all-matching without --resource). Or --direct.")
        selecting.add_argument("ids", nargs="*", metavar="ID", help="ids of failed jobs")
        selecting.add_argument("--all-matching", action="store_true",
                               help="every failed job the filters match, not the ids")
        selecting.add_argument("--yes", action="store_true",
                               help="with --all-matching and no filter: yes, every failed job")
        _add_filters(selecting)
        selecting.add_argument("--operator", metavar="URL",
                               help=f"the operator's dashboard (default: ${OPERATOR_URL_ENV}), e.g. "
                                    "http://localhost:8081 after `kubectl -n kubearq port-forward "
                                    "svc/kubearq-operator 8081`; it checks your token and your RBAC")
        selecting.add_argument("--token", help="the bearer token to send the operator (default: the kubeconfig "
                                               "user's; `kubectl create token NAME` issues one)")
        selecting.add_argument("--direct", action="store_true",
                               help="for cluster admins: write straight to the workers' Redis (REDIS_URL) and "
                                    "PostgreSQL (DATABASE_URL), not through the operator. Kubernetes RBAC is then "
                                    "not consulted: whoever has those URLs may")
    jobs.set_defaults(handler=run)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--function", help="only jobs of this function")
    parser.add_argument("--queue", help="only jobs of this queue")
    parser.add_argument("--resource", metavar="NAMESPACE[/KIND[/NAME]]",
                        help="only jobs enqueued for this resource, e.g. team-a/SyncSchedule/nightly, or any in a "
                             "namespace (team-a) or of a kind there (team-a/ScrapeRequest)")
    parser.add_argument("--error", metavar="TEXT", help="only jobs whose error contains TEXT (any case)")
    parser.add_argument("--since", metavar="TIME",
                        help="only jobs that failed at or after TIME: 2026-03-01T10:00:00Z, a date (2026-03-01; "
                             "UTC unless an offset is given), or a duration back from now (90m, 6h, 2d, 1w)")


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except (UserError, CommandError) as error:
        print(f"kubearq jobs {args.action}: {error}", file=sys.stderr)
        return error.code


# --- what the user asked for (pure) -----------------------------------------------------------------------------


def parse_since(text: str, now: datetime) -> datetime:
    """`--since`: an ISO time or date (UTC unless it names an offset), or a duration back from `now`."""
    duration = _DURATION.fullmatch(text.strip())
    if duration:
        return now - timedelta(**{_UNITS[duration["unit"]]: int(duration["amount"])})
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        try:
            moment = datetime.combine(date.fromisoformat(text.strip()), datetime.min.time())
        except ValueError:
            raise UserError(f"--since {text!r}: write a time (2026-03-01T10:00:00Z), a date (2026-03-01) or a "
                            "duration back from now (90m, 6h, 2d, 1w)") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def parse_resource(text: str) -> tuple[str, str | None, str | None]:
    """`--resource NAMESPACE[/KIND[/NAME]]` as (namespace, kind, name)."""
    parts = text.split("/")
    if not 1 <= len(parts) <= 3 or not all(parts) or not NAMESPACE_NAME.fullmatch(parts[0]):
        raise UserError(f"--resource {text!r}: write NAMESPACE, NAMESPACE/KIND or NAMESPACE/KIND/NAME, e.g. "
                        "team-a/SyncSchedule/nightly (NAMESPACE a namespace name)")
    padded: list[str | None] = [*parts, None, None]
    return parts[0], padded[1], padded[2]


def failed_job_filter(args: argparse.Namespace, now: datetime) -> FailedJobFilter | None:
    """The filter the flags give; None without any."""
    given = any(getattr(args, flag) is not None for flag in ("function", "queue", "resource", "error", "since"))
    if not given:
        return None
    namespace, kind, name = parse_resource(args.resource) if args.resource is not None else (None, None, None)
    return FailedJobFilter(function=args.function, queue=args.queue, namespace=namespace, kind=kind, name=name,
                           error=args.error, since=parse_since(args.since, now) if args.since is not None else None)


def selection(args: argparse.Namespace, now: datetime) -> Selection:
    """What `retry`/`discard` act on: the ids given, or with --all-matching every job the filters match (all of them
    only with --yes, so that a bare command never selects everything)."""
    where = failed_job_filter(args, now)
    if args.all_matching:
        if args.ids:
            raise UserError("give ids or --all-matching with filters, not both")
        if where is None and not args.yes:
            raise UserError(f"--all-matching without a filter selects every failed job; narrow it with "
                            f"{_FILTER_FLAGS}, or add --yes to mean every one")
        return Selection(where=where)
    if where is not None:
        raise UserError(f"{_FILTER_FLAGS} select with --all-matching: add it, or give ids alone")
    if not args.ids:
        raise UserError(f"give the ids of the failed jobs to {args.action}, or --all-matching with filters")
    return Selection.of(*args.ids)


def write_route(args: argparse.Namespace) -> str | None:
    """Where `retry`/`discard` go: the operator's URL (--operator, else KUBEARQ_OPERATOR_URL), or None with --direct
    (which, being explicit, wins over the variable)."""
    if args.direct:
        if args.operator is not None:
            raise UserError("give --operator or --direct, not both")
        if args.token is not None:
            raise UserError("--token is sent to the operator; --direct uses REDIS_URL and DATABASE_URL, no token")
        return None
    url = args.operator if args.operator is not None else os.environ.get(OPERATOR_URL_ENV) or None
    if url is None:
        raise UserError(NO_ROUTE.format(action=args.action))
    return str(url)


def check_cursor(cursor: str | None) -> None:
    if cursor is not None:
        try:
            decode_cursor(cursor)
        except InvalidCursorError as error:
            raise UserError(f"--after: {error}") from None


def _when(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime(TIME_FORMAT) if moment is not None else "-"


def _resource(job: FailedJob) -> str:
    origin = job.origin
    return f"{origin.namespace}/{origin.kind}/{origin.name}" if origin is not None else "-"


def _one_line(text: str, width: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def failed_table(jobs: Sequence[FailedJob], *, wide: bool = False) -> str:
    """The failed jobs as kubectl prints a table."""
    header = ["FAILED AT", "JOB ID", "FUNCTION", "QUEUE", "REASON", "TRIES", "RESOURCE", "ERROR", "RE-DRIVEN AS"]
    if wide:
        header += ["RE-DRIVE OF", "WORKER", "ENQUEUED AT"]
    rows = [header]
    for job in jobs:
        row = [_when(job.failed_at), job.job_id, job.function, job.queue, job.reason.value, str(job.tries),
               _resource(job), _one_line(job.error, 10_000 if wide else ERROR_WIDTH), job.redriven_as or "-"]
        if wide:
            row += [job.redrive_of or "-", job.worker, _when(job.enqueued_at)]
        rows.append(row)
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join("   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _printed(value: object, output: str) -> str:
    import yaml

    if output == "json":
        return json.dumps(value, indent=2, ensure_ascii=False)
    return str(yaml.safe_dump(value, sort_keys=False, allow_unicode=True, width=120)).rstrip()


# --- connections ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Connected:
    redis: ArqRedis
    store: FailedJobStore
    """Where the workers keep failed jobs."""


def _redacted(url: str) -> str:
    """`url` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@asynccontextmanager
async def connected(action: str) -> AsyncIterator[Connected]:
    """Redis, and PostgreSQL if DATABASE_URL is set, checked to answer before anything is read or written."""
    import asyncpg  # here: the other subcommands of `kubearq` need not load it

    url = os.environ.get("REDIS_URL")
    if not url:
        raise UserError("set REDIS_URL to the workers' Redis (redis://host:6379/0)")
    try:
        check_redis_url(url)
    except ValueError as error:
        raise UserError(str(error)) from None
    dsn = os.environ.get("DATABASE_URL") or None
    if dsn is not None and urlsplit(dsn).scheme not in ("postgresql", "postgres"):
        raise UserError("DATABASE_URL must be a postgresql:// URL, e.g. postgresql://user:password@db:5432/kubearq")
    redis = create_redis(url, retries=0)
    pool = None
    try:
        try:
            await redis.ping()
        except (RedisError, OSError) as error:
            raise UserError(f"cannot reach Redis at {_redacted(url)}: {error}", FAILED) from None
        if dsn is None:
            try:
                yield Connected(redis, RedisFailedJobs(redis))
            except (RedisError, OSError) as error:
                raise UserError(f"lost Redis at {_redacted(url)} on the way: {error}", FAILED) from None
            return
        server = _redacted(dsn)
        try:
            pool = await asyncpg.create_pool(dsn, min_size=0, max_size=2, timeout=10, command_timeout=60,
                                             server_settings={"application_name": f"kubearq-jobs-{action}"})
            async with pool.acquire() as connection:
                table = await connection.fetchval("SELECT to_regclass('failed_jobs')")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            raise UserError(f"cannot reach PostgreSQL at {server}: {type(error).__name__}: {error}", FAILED) from None
        if table is None:
            raise UserError(f"PostgreSQL at {server} has no failed_jobs table: a worker of this kubearq version with "
                            "this DATABASE_URL creates it when it starts", FAILED)
        try:
            yield Connected(redis, PostgresFailedJobs(pool_connect(pool), redis))
        except (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            lost = f"Redis at {_redacted(url)}" if isinstance(error, RedisError) else f"PostgreSQL at {server}"
            raise UserError(f"lost {lost} on the way: {type(error).__name__}: {error}", FAILED) from None
    finally:
        if pool is not None:
            await pool.close()
        await redis.aclose()


# --- the subcommands --------------------------------------------------------------------------------------------


async def _run(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    if args.action == "failed":
        where = failed_job_filter(args, now)
        if not 1 <= args.limit <= MAX_PAGE:
            raise UserError(f"--limit {args.limit}: give a number from 1 to {MAX_PAGE}")
        check_cursor(args.after)
        async with connected(args.action) as services:
            return await list_failed(services, where, args)
    if args.action in ("retry", "discard"):
        chosen = selection(args, now)
        url = write_route(args)
        if url is not None:
            return await through_operator(args.action, chosen, url, args.token)
        async with connected(args.action) as services:
            return await (retry(services, chosen) if args.action == "retry" else discard(services, chosen))
    async with connected(args.action) as services:
        return await get(services, args.id, args.queue, args.output)


async def list_failed(services: Connected, where: FailedJobFilter | None, args: argparse.Namespace) -> int:
    page = await services.store.page(where, after=args.after, limit=args.limit)
    notice = page.keeping.notice
    if args.output in ("json", "yaml"):
        print(_printed({"items": [job.model_dump(mode="json", by_alias=True) for job in page.jobs],
                        "nextCursor": page.next_cursor, "keptIn": page.keeping.store, "atMost": page.keeping.at_most,
                        "notice": notice}, args.output))
        return OK
    if notice is not None:
        print(f"note: {notice}", file=sys.stderr)
    if not page.jobs:
        print("no failed jobs" + (" match" if where is not None or args.after else ""), file=sys.stderr)
        return OK
    print(failed_table(page.jobs, wide=args.output == "wide"))
    if page.next_cursor is not None:
        print(f"more: add --after {page.next_cursor}", file=sys.stderr)
    return OK


async def get(services: Connected, job_id: str, queue: str, output: str) -> int:
    live = await live_job(services.redis, job_id, queue)
    kept = await services.store.get(job_id)
    if live is None and kept is None:
        raise UserError(f"job {job_id!r} not found: Redis holds no such job or result (ARQ keeps a result for "
                        "KEEP_RESULT), and no failed job of that id is kept", NOT_FOUND)
    shown: dict[str, object] = {"id": job_id}
    redrive_of = redriven_from(job_id)
    if redrive_of is not None:
        shown["redriveOf"] = redrive_of
    if live is not None:
        shown["job"] = live
    if kept is not None:
        shown["failed"] = kept.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"job_id"})
    print(_printed(shown, output))
    return OK


async def live_job(redis: ArqRedis, job_id: str, queue: str) -> dict[str, object] | None:
    """What Redis holds of a job: ARQ's payload or result, and its state; None if nothing."""
    info = await Job(job_id, redis, _queue_name=queue, _deserializer=deserialize).info()
    if info is None:
        return None
    outcome = (await job_outcomes(redis, queue, [job_id]))[job_id]
    state = outcome.state.value
    if outcome.state is JobState.UNKNOWN:  # its payload is there, but not on this queue
        state = f"Queued on another queue than {queue} (give --queue)"
    shown: dict[str, object] = {"state": state, "function": info.function, "args": list(info.args),
                                "kwargs": dict(info.kwargs), "try": info.job_try,
                                "enqueuedAt": _when(info.enqueue_time)}
    if isinstance(info, JobResult):
        shown["queue"] = info.queue_name
        shown["startedAt"], shown["finishedAt"] = _when(info.start_time), _when(info.finish_time)
        if info.success:
            shown["result"] = info.result
        else:
            shown["error"] = outcome.error
    else:
        shown["queue"] = queue
    return shown


@dataclass(frozen=True)
class Report:
    """What `retry` or `discard` says: lines for stdout, lines for stderr, and the exit code."""

    out: list[str]
    err: list[str]
    code: int

    def say(self) -> int:
        for line in self.out:
            print(line)
        for line in self.err:
            print(line, file=sys.stderr)
        return self.code


def retry_report(redrives: Redrives, *, by_ids: bool) -> Report:
    """What a re-drive did, by id (or in counts, for all matching), whether it ran here or in the operator."""
    enqueued = set(redrives.enqueued)
    if not by_ids:
        before = len(redrives.new_job_ids) - len(enqueued)
        return Report([f"re-drove {len(enqueued)} failed job{'s' if len(enqueued) != 1 else ''}; {before} re-driven "
                       f"before, {len(redrives.not_runnable)} undecodable"], [], OK)
    out = [f"re-drove {old} as {new}" if new in enqueued else f"{old} was re-driven before, as {new}"
           for old, new in redrives.new_job_ids.items()]
    err = [f"{old} cannot be re-driven: it was not a job kubearq can decode (`kubearq jobs get {old}` says where its "
           "bytes are)" for old in redrives.not_runnable]
    err += [f"kubearq jobs retry: no failed job {old!r} is kept" for old in redrives.not_found]
    return Report(out, err, NOT_FOUND if redrives.not_found else FAILED if redrives.not_runnable else OK)


def discard_report(discarded: Sequence[str], removed: int, missing: Sequence[str], *, by_ids: bool) -> Report:
    """What a discard did: the ids found and discarded (`removed` of them went; fewer: another discard was quicker),
    and those not found; for all matching, how many went."""
    if not by_ids:
        return Report([f"discarded {removed} failed job{'s' if removed != 1 else ''}"], [], OK)
    return Report([f"discarded {job_id}" for job_id in discarded],
                  [f"kubearq jobs discard: no failed job {job_id!r} is kept" for job_id in missing],
                  NOT_FOUND if missing or removed < len(discarded) else OK)


async def retry(services: Connected, chosen: Selection) -> int:
    return retry_report(await services.store.redrive(chosen), by_ids=chosen.job_ids is not None).say()


async def discard(services: Connected, chosen: Selection) -> int:
    if chosen.job_ids is None:
        return discard_report([], await services.store.discard(chosen), [], by_ids=False).say()
    found = [job.job_id for job in await services.store.get_many(chosen.job_ids)]
    removed = await services.store.discard(Selection.of(*found)) if found else 0
    missing = [job_id for job_id in dict.fromkeys(chosen.job_ids) if job_id not in found]
    return discard_report(found, removed, missing, by_ids=True).say()


async def through_operator(action: str, chosen: Selection, url: str, token: str | None) -> int:
    """`retry`/`discard` asked of the operator as the caller; it answers what it did, or why the caller may not."""
    # Here: `get` and `failed` need not load the console's modules (aiohttp).
    from kubearq.commands._operatorapi import ask, caller_token, operator_url, sends_token_in_clear
    from kubearq.operator.console.failedjobs import MAX_SELECTED, ApiFilter, FailedJobsRequest

    url = operator_url(url)
    if chosen.job_ids is not None and len(set(chosen.job_ids)) > MAX_SELECTED:
        raise UserError(f"at most {MAX_SELECTED} ids at once through the operator: select more with --all-matching "
                        f"and {_FILTER_FLAGS}")
    bearer = caller_token(token)
    if sends_token_in_clear(url):
        print(f"note: sending your bearer token unencrypted to {url}: prefer https://, or a port-forward to "
              "localhost", file=sys.stderr)
    if chosen.job_ids is not None:
        asked = FailedJobsRequest(job_ids=list(dict.fromkeys(chosen.job_ids)))
    else:
        where = chosen.where.model_dump(exclude_none=True) if chosen.where is not None else {}
        asked = FailedJobsRequest(where=ApiFilter(**where))
    try:
        answer = await ask(url, bearer, "redrive" if action == "retry" else "discard", asked)
    except CommandError as error:
        if error.code == NOT_FOUND and chosen.job_ids is None and "at the cluster scope" in str(error):
            raise CommandError(f"{error}; to {action} one namespace's failed jobs, add --resource NAMESPACE",
                               error.code) from None
        raise
    by_ids = chosen.job_ids is not None
    if action == "retry":
        return retry_report(Redrives(new_job_ids=answer.redriven, enqueued=answer.enqueued,
                                     not_runnable=answer.not_runnable, not_found=answer.not_found),
                            by_ids=by_ids).say()
    return discard_report(answer.discarded, answer.discarded_count, answer.not_found, by_ids=by_ids).say()
