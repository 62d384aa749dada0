"""`kubearq schedule list|get|trigger|suspend|resume|preview|backfill`: SyncSchedules without kubectl or redis-cli.

Writes go through the API server, so the caller's own RBAC decides: `trigger` and `backfill` patch an annotation
the operator's leader acts on once (kubearq.operator.actions), `suspend` and `resume` patch `spec.suspend`. Fire
times come from the operator's own scheduling code (DST included); `preview "<cron>"` needs no cluster.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import Any, cast

from kubearq.commands import Subcommands
from kubearq.commands._cluster import (
    API_TIMEOUT,
    FAILED,
    OK,
    USAGE,
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
    rfc3339,
    run,
    shown,
    table,
)
from kubearq.operator.actions import (
    BACKFILL_ANNOTATION,
    TRIGGER_ANNOTATION,
    Ask,
    BackfillAsk,
    annotation_patch,
    new_ask_id,
    suspend_patch,
)
from kubearq.operator.cron import check_schedule, load_time_zone
from kubearq.operator.cron import fire_times as cron_fire_times
from kubearq.operator.kube import KubeObject, Resource
from kubearq.operator.resources import GROUP, VERSION
from kubearq.operator.scheduler import manual_job_id, plan_backfill, tick_job_id

SYNC_SCHEDULES = Resource(GROUP, VERSION, "syncschedules")
KIND = "SyncSchedule"
MAX_PREVIEW = 1000
TIME_FORMATS = ("2026-11-24T03:00:00Z, 2026-11-24T03:00:00+01:00, 2026-11-24T03:00 (in the schedule's time zone) "
                "or 2026-11-24")


def register(commands: Subcommands) -> None:
    group = commands.add_parser(
        "schedule", help="list, inspect, trigger, suspend, resume, preview or backfill SyncSchedules",
        description="SyncSchedules of the cluster of KUBECONFIG. Writes are asked of the operator through the API "
                    "server, so your Kubernetes RBAC decides: trigger and backfill need patch on syncschedules, "
                    "as do suspend and resume. Exit codes: 0 ok, 1 failed or refused, 2 bad usage, "
                    "3 not found or forbidden.")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="the schedules, their last and next tick")
    add_scope(listing, all_namespaces=True)
    add_output(listing)
    show = actions.add_parser("get", help="one schedule: its state, recent runs and the asks it handled")
    show.add_argument("name", metavar="NAME")
    add_scope(show)
    add_output(show, wide=False)
    trigger = actions.add_parser(
        "trigger", help="enqueue one run now, honouring concurrencyPolicy (recorded as Manual)",
        description="Ask the operator to enqueue one run now, as `kubectl create job --from=cronjob/NAME` does: "
                    "concurrencyPolicy Forbid refuses it while a run is active, Replace aborts the active run.")
    trigger.add_argument("name", metavar="NAME")
    add_scope(trigger)
    add_wait(trigger, "the run to be enqueued")
    for action, text in (("suspend", "stop new runs (spec.suspend: true)"), ("resume", "start them again")):
        toggle = actions.add_parser(action, help=text)
        toggle.add_argument("name", metavar="NAME")
        add_scope(toggle)
    preview = actions.add_parser(
        "preview", help="the next fire times of a cron expression or of a schedule (DST included)",
        description="Print the next fire times, computed by the operator's own code: across DST a tick inside the "
                    "skipped hour fires once at its end, one inside the repeated hour once (Debian cron's rules). "
                    'SCHEDULE is a cron expression ("*/15 * * * *", "@daily"; no cluster needed) or the name of a '
                    "SyncSchedule. -n is the count here; the namespace is --namespace.")
    preview.add_argument("schedule", metavar="SCHEDULE", help='a cron expression, e.g. "0 3 * * *", or a NAME')
    preview.add_argument("--tz", help="the IANA time zone of a cron expression (default: UTC)")
    preview.add_argument("--from", dest="start", metavar="TIME", help=f"from this time (default: now); {TIME_FORMATS}")
    preview.add_argument("-n", "--count", type=int, default=10, help="how many fire times (default: 10)")
    add_scope(preview, short=False)
    add_output(preview, wide=False)
    backfill = actions.add_parser(
        "backfill", help="enqueue each tick of a past window once (a repeat enqueues nothing)",
        description="Ask the operator to enqueue every tick in [--from, --to) with the schedule's own job ids: a "
                    "tick enqueued before (by the schedule or an earlier backfill, while its id is remembered) is "
                    f"not enqueued again. At most 1000 ticks at a time. Times: {TIME_FORMATS}.")
    backfill.add_argument("name", metavar="NAME")
    backfill.add_argument("--from", dest="start", required=True, metavar="TIME", help="the first tick's earliest time")
    backfill.add_argument("--to", dest="end", required=True, metavar="TIME", help="the window's end (exclusive)")
    add_scope(backfill)
    add_wait(backfill, "the ticks to be enqueued")
    group.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    return run(f"schedule {args.action}", lambda: ACTIONS[args.action](args))


# --- preview (no cluster for a cron expression) ---------------------------------------------------------------


def is_expression(text: str) -> bool:
    """A cron expression has fields or is a macro; a Kubernetes name has neither spaces nor `@`."""
    return text.startswith("@") or len(text.split()) > 1


def parse_time(text: str, flag: str, zone_name: str, now: datetime) -> datetime:
    """An ISO 8601 time, a date (midnight), or `now`; without an offset it is read in `zone_name`."""
    if text.strip().lower() == "now":
        return now
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        try:
            moment = datetime.combine(date.fromisoformat(text.strip()), datetime.min.time())
        except ValueError:
            raise CommandError(f"{flag} {text!r} is not a time; write ISO 8601, e.g. {TIME_FORMATS}, or now",
                               USAGE) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=load_time_zone(zone_name))
    return moment.astimezone(UTC)


def fire_times(expression: str, zone_name: str, start: datetime, count: int) -> list[dict[str, str]]:
    """The next `count` ticks after `start`, each with its local time, UTC time and a note when the UTC offset
    changes (a DST transition between it and the tick before)."""
    return [{"local": tick.isoformat(), "utc": rfc3339(tick), "note": note}
            for tick, note in cron_fire_times(expression, zone_name, start, count)]


async def preview(args: argparse.Namespace) -> int:
    if not 1 <= args.count <= MAX_PREVIEW:
        raise CommandError(f"-n/--count {args.count}: give between 1 and {MAX_PREVIEW} fire times", USAGE)
    if is_expression(args.schedule):
        expression, zone_name = args.schedule, args.tz or "UTC"
        try:
            check_schedule(expression)
        except ValueError as error:
            raise CommandError(str(error), USAGE) from None
        source = expression
    else:
        if args.tz is not None:
            raise CommandError(f"--tz is for a cron expression; the schedule {args.schedule!r} has its own timeZone",
                               USAGE)
        cluster = await connect(args)
        async with cluster.api:
            obj = await get_schedule(cluster, args.schedule)
        spec = cast(Mapping[str, Any], obj.get("spec") or {})
        expression, zone_name = str(spec.get("schedule", "")), str(spec.get("timeZone") or "UTC")
        try:
            check_schedule(expression)
        except ValueError as error:
            raise CommandError(f"syncschedule {args.schedule!r} has an invalid spec.schedule: {error}",
                               FAILED) from None
        source = f"{args.schedule} ({expression})"
    try:
        load_time_zone(zone_name)
    except ValueError as error:
        raise CommandError(f"--tz {zone_name!r}: {error}", USAGE) from None
    start = parse_time(args.start, "--from", zone_name, now_utc()) if args.start else now_utc()
    times = fire_times(expression, zone_name, start, args.count)
    if args.output:
        print(dump({"schedule": expression, "timeZone": zone_name, "from": rfc3339(start), "fireTimes": times},
                   args.output))
        return OK
    rows = [[str(number), item["local"], item["utc"], item["note"]] for number, item in enumerate(times, start=1)]
    print(f"next {len(times)} fire times of {source} in {zone_name} after {rfc3339(start)}:")
    print(table(["#", f"TIME ({zone_name})", "UTC", "NOTE"], rows))
    return OK


# --- reading -----------------------------------------------------------------------------------------------------


async def get_schedule(cluster: Cluster, name: str) -> KubeObject:
    return await call(cluster, lambda: cluster.api.get(SYNC_SCHEDULES, name, namespace=cluster.namespace,
                                                       timeout=API_TIMEOUT),
                      verb="get", resource=SYNC_SCHEDULES, kind=KIND, name=name)


def ready_text(obj: Mapping[str, Any]) -> str:
    ready = condition(obj, "Ready")
    return "<unknown>" if ready is None else f"{ready.get('status')} ({ready.get('reason')})"


async def list_schedules(args: argparse.Namespace) -> int:
    cluster = await connect(args)
    async with cluster.api:
        items = await listed(cluster, SYNC_SCHEDULES, KIND)
    if args.output in ("json", "yaml"):
        print(dump({"apiVersion": "v1", "kind": "List", "items": items}, args.output))
        return OK
    now = now_utc()
    header = ["NAME", "SCHEDULE", "TIMEZONE", "SUSPEND", "ACTIVE", "LAST SCHEDULE", "NEXT", "READY"]
    if args.output == "wide":
        header += ["POLICY", "FUNCTION", "QUEUE", "LAST TRIGGER"]
    rows = []
    for obj in items:
        spec = cast(Mapping[str, Any], obj.get("spec") or {})
        status = cast(Mapping[str, Any], obj.get("status") or {})
        row = [obj.get("metadata", {}).get("name", ""), str(spec.get("schedule", "")),
               str(spec.get("timeZone") or "UTC"), str(bool(spec.get("suspend"))).lower(),
               str(status.get("activeCount", 0)), age(status.get("lastScheduleTime"), now),
               shown(status.get("nextScheduleTime")), ready_text(obj)]
        if args.output == "wide":
            job = cast(Mapping[str, Any], spec.get("job") or {})
            last = cast(Mapping[str, Any], status.get("lastTrigger") or {})
            row += [str(spec.get("concurrencyPolicy") or "Allow"), str(job.get("function", "")),
                    str(job.get("queue") or "arq:queue"),
                    f"{last.get('outcome')} {age(last.get('handledTime'), now)} ago" if last else "<none>"]
        rows.append((obj, row))
    if not rows:
        print("No syncschedules found" + (f" in namespace {cluster.namespace}." if cluster.namespace else "."))
        return OK
    print(table(*namespaced(cluster, header, rows)))
    return OK


def describe(obj: KubeObject, now: datetime) -> str:
    metadata, spec = obj.get("metadata", {}), cast(Mapping[str, Any], obj.get("spec") or {})
    status = cast(Mapping[str, Any], obj.get("status") or {})
    job = cast(Mapping[str, Any], spec.get("job") or {})
    ready = condition(obj, "Ready")
    lines = [
        f"Name:           {metadata.get('name')}",
        f"Namespace:      {metadata.get('namespace')}",
        f"Schedule:       {spec.get('schedule')} ({spec.get('timeZone') or 'UTC'})",
        f"Suspend:        {str(bool(spec.get('suspend'))).lower()}",
        f"Concurrency:    {spec.get('concurrencyPolicy') or 'Allow'}",
        f"Job:            {job.get('function')} on {job.get('queue') or 'arq:queue'}",
        f"Ready:          {ready_text(obj)}" + (f": {ready.get('message')}" if ready and ready.get("message") else ""),
        f"Last schedule:  {shown(status.get('lastScheduleTime'))}",
        f"Next schedule:  {shown(status.get('nextScheduleTime'))}",
        f"Active:         {status.get('activeCount', 0)}",
        f"Skipped ticks:  {status.get('skippedTicks', 0)}   Missed ticks: {status.get('missedTicks', 0)}",
    ]
    for label, field in (("Last trigger:", "lastTrigger"), ("Last backfill:", "lastBackfill")):
        record = cast(Mapping[str, Any], status.get(field) or {})
        if record:
            lines.append(f"{label:<16}{record.get('id')} {record.get('outcome')} "
                         f"{age(record.get('handledTime'), now)} ago: {record.get('message')}")
    runs = cast(list[Mapping[str, Any]], status.get("runs") or [])
    lines.append("Runs:" + ("           <none>" if not runs else ""))
    if runs:
        rows = [[str(run.get("jobId")), str(run.get("trigger") or "Scheduled"), shown(run.get("scheduledTime")),
                 str(run.get("outcome")), shown(run.get("finishTime")), shown(run.get("error"))[:60]] for run in runs]
        body = table(["JOB ID", "TRIGGER", "SCHEDULED", "OUTCOME", "FINISHED", "ERROR"], rows)
        lines += [f"  {line}" for line in body.splitlines()]
    return "\n".join(lines)


async def get(args: argparse.Namespace) -> int:
    cluster = await connect(args)
    async with cluster.api:
        obj = await get_schedule(cluster, args.name)
    print(dump(dict(obj), args.output) if args.output else describe(obj, now_utc()))
    return OK


# --- writing -----------------------------------------------------------------------------------------------------


async def patch(cluster: Cluster, name: str, body: dict[str, Any]) -> KubeObject:
    """A merge patch of the schedule (the caller needs `patch` on syncschedules)."""
    return await call(cluster, lambda: cluster.api.patch(SYNC_SCHEDULES, name, body, namespace=cluster.namespace,
                                                 timeout=API_TIMEOUT),
                      verb="patch", resource=SYNC_SCHEDULES, kind=KIND, name=name)


async def toggle(args: argparse.Namespace) -> int:
    suspended = args.action == "suspend"
    cluster = await connect(args)
    async with cluster.api:
        await get_schedule(cluster, args.name)  # 404 before 403: a typo is said as such
        await patch(cluster, args.name, suspend_patch(suspended))
    print(f"syncschedule/{args.name} {'suspended: no new runs' if suspended else 'resumed'}")
    return OK


async def trigger(args: argparse.Namespace) -> int:
    cluster = await connect(args)
    async with cluster.api:
        await get_schedule(cluster, args.name)
        ask = Ask(id=new_ask_id(), requested_at=now_utc())
        obj = await patch(cluster, args.name, annotation_patch(TRIGGER_ANNOTATION, ask))
        job_id = manual_job_id(str(obj.get("metadata", {}).get("uid")), ask.id)
        if args.no_wait:
            print(f"syncschedule/{args.name}: trigger asked (ask {ask.id}); the operator enqueues job {job_id}")
            return OK
        record = await answer(lambda: get_schedule(cluster, args.name), field="lastTrigger",
                              annotation=TRIGGER_ANNOTATION, ask_id=ask.id, within=args.timeout,
                              shown_by=f"kubearq schedule get {args.name}")
    if record is None:
        raise no_answer(ask.id, args.timeout)
    if record.get("outcome") != "Done":
        raise CommandError(f"refused: {record.get('message')}", FAILED)
    print(f"syncschedule/{args.name} triggered: job {record.get('jobId')} enqueued")
    return OK


async def backfill(args: argparse.Namespace) -> int:
    cluster = await connect(args)
    async with cluster.api:
        obj = await get_schedule(cluster, args.name)
        spec = cast(Mapping[str, Any], obj.get("spec") or {})
        expression, zone_name = str(spec.get("schedule", "")), str(spec.get("timeZone") or "UTC")
        try:
            check_schedule(expression)
            load_time_zone(zone_name)
        except ValueError as error:
            raise CommandError(f"syncschedule {args.name!r} has an invalid spec: {error}", FAILED) from None
        now = now_utc()
        start = parse_time(args.start, "--from", zone_name, now)
        end = parse_time(args.end, "--to", zone_name, now)
        if end <= start:
            raise CommandError(f"--to {rfc3339(end)} is not after --from {rfc3339(start)}: the window [from, to) "
                               "would hold no tick", USAGE)
        plan = plan_backfill(expression, zone_name, start, end, now)
        if plan.refusal is not None:
            raise CommandError(plan.refusal, USAGE)
        ask = BackfillAsk(id=new_ask_id(), requested_at=now, start=start, end=end)
        patched = await patch(cluster, args.name, annotation_patch(BACKFILL_ANNOTATION, ask))
        uid = str(patched.get("metadata", {}).get("uid"))
        job_ids = [tick_job_id(uid, tick) for tick in plan.ticks]
        if args.no_wait:
            print(f"syncschedule/{args.name}: backfill of {len(job_ids)} tick(s) asked (ask {ask.id}); job ids:")
            print("\n".join(job_ids))
            return OK
        record = await answer(lambda: get_schedule(cluster, args.name), field="lastBackfill",
                              annotation=BACKFILL_ANNOTATION, ask_id=ask.id, within=args.timeout,
                              shown_by=f"kubearq schedule get {args.name}")
    if record is None:
        raise no_answer(ask.id, args.timeout)
    if record.get("outcome") != "Done":
        raise CommandError(f"refused: {record.get('message')}", FAILED)
    print(f"syncschedule/{args.name} backfilled: {record.get('message')}")
    if job_ids:
        print("\n".join(job_ids))
    return OK


ACTIONS = {"list": list_schedules, "get": get, "trigger": trigger, "suspend": toggle, "resume": toggle,
           "preview": preview, "backfill": backfill}
