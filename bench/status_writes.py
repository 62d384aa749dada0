"""Status writes as the operator's ServiceAccount on a real kube-apiserver: sustained writes/s, 429s and tick lag
while API Priority and Fairness throttles, beside the same run unthrottled (the anchor) on the same server.

    KUBEBUILDER_ASSETS=/root/.cache/kubearq-k8s/bin .venv/bin/python -m bench.status_writes [--quick]
        [--schedules 1000] [--minutes 4] [--period 10] [--qps 100] [--shares 1]

One etcd + kube-apiserver (tests/controlplane.py) and one redis-server. The leader's loop (`main.lead`, the
scheduler and the status writer as shipped, STATUS_WRITE_QPS and STATUS_WRITE_BURST at their defaults unless
`--qps` says otherwise) runs logged in as a ServiceAccount holding only the operator's RBAC — never
system:masters, which API Priority and Fairness exempts. N SyncSchedules fire every minute; the operator's clock
jumps to just before the next minute every `--period` seconds, so each period demands N enqueues and N status
writes. Twice, each in a namespace of its own:

- unthrottled (the anchor): the server's default fairness config, where every ServiceAccount's requests share
  the `workload-low` priority level;
- throttled: a FlowSchema puts the ServiceAccount on a priority level of `--shares` nominal shares (1: 3 seats of
  the default 600) that neither borrows nor queues: a request beyond its seats is refused with 429 at once.

Printed per run, from the first tick until every status records the last one: status writes sent and landed per
second (sustained), 429s, statuses coalesced (replaced by a newer one before they were sent), the budget's lowest
rate, tick-to-enqueue lag (p50/p99/max) and how long after the last tick every status recorded it; then the
throttled/unthrottled ratios.
Issue 19's target: writes within the budget, slower (not harder) under 429s, tick lag unaffected, nothing lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, cast

import httpx
import kopf
from bench import report
from bench.report import Row, at_most, rate, ratio, seconds
from redis.asyncio import Redis

from kubearq.core.connections import create_redis
from kubearq.core.contract import function_registry_key
from kubearq.demo.services import RedisServer
from kubearq.operator import kube
from kubearq.operator.context import FIELD_MANAGER, SYNC_SCHEDULES, OperatorContext
from kubearq.operator.main import lead
from kubearq.operator.metrics import OperatorMetrics
from kubearq.operator.rbac import operator_rules
from kubearq.operator.schedules import reconcile_schedule
from kubearq.operator.settings import OperatorSettings
from kubearq.operator.store import ResourceStore, list_into
from kubearq.operator.writer import WriteBudget
from tests.controlplane import ControlPlane, assets_folder
from tests.kubernetes import project_crds

if TYPE_CHECKING:
    from bench.suite import Reporter, StepContext

T = 30.0  # seconds for one setup request
CRDS = kube.Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
NAMESPACES = kube.Resource("", "v1", "namespaces")
SERVICE_ACCOUNTS = kube.Resource("", "v1", "serviceaccounts")
CLUSTER_ROLES = kube.Resource("rbac.authorization.k8s.io", "v1", "clusterroles")
CLUSTER_ROLE_BINDINGS = kube.Resource("rbac.authorization.k8s.io", "v1", "clusterrolebindings")
FLOW_SCHEMAS = kube.Resource("flowcontrol.apiserver.k8s.io", "v1", "flowschemas")
PRIORITY_LEVELS = kube.Resource("flowcontrol.apiserver.k8s.io", "v1", "prioritylevelconfigurations")
PRIORITY_LEVEL_HEADER = "X-Kubernetes-PF-PriorityLevel-UID"
LEAD_IN = timedelta(seconds=2)  # the clock jumps to this long before a minute: the loop sleeps till the tick
FRESH_WITHIN = 120.0  # seconds after the last tick to wait for every status to record it
FRESH_POLL = 2.0  # seconds between LISTs of every schedule (a LIST of thousands costs the API server too)


class RecordingMetrics(OperatorMetrics):
    """The operator's metrics, also keeping every tick lag (the histogram's buckets are too coarse for p99)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lags: list[float] = []

    def observe_tick_lag(self, seconds: float) -> None:
        super().observe_tick_lag(seconds)
        self.lags.append(seconds)


@dataclasses.dataclass
class JumpingClock:
    """Real time plus an offset the bench moves forward a minute at a time."""

    offset: timedelta = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclasses.dataclass
class Run:
    label: str
    seconds: float
    sent: float
    landed: float
    throttled: float
    coalesced: float
    level: str  # the priority level's seats and rejections, as the API server's /metrics tell them
    stale: int  # statuses still short of the last tick when the bench stopped waiting
    lowest_rate: float
    lags: list[float]
    fresh_after: float | None  # seconds after the last tick until every status recorded it; None: not within

    def per_second(self, value: float) -> float:
        return value / self.seconds if self.seconds else 0.0

    def lag(self, quantile: float) -> float:
        if not self.lags:
            return float("nan")
        ordered = sorted(self.lags)
        return ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]


def counted(metric: object, kind: str = "SyncSchedule", **labels: str) -> float:
    return float(metric.labels(kind=kind, **labels)._value.get())  # type: ignore[attr-defined]


async def install_crds(api: kube.KubeApi) -> None:
    for crd in project_crds():
        with contextlib.suppress(kube.ConflictError):
            await api.create(CRDS, crd, timeout=T)
    deadline = time.monotonic() + T
    for crd in project_crds():
        while True:
            current = await api.get(CRDS, crd["metadata"]["name"], timeout=T)
            conditions = cast(list[dict[str, object]], current.get("status", {}).get("conditions") or [])
            if any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"CRD {crd['metadata']['name']} not established within {T} s")
            await asyncio.sleep(0.1)


async def service_account_login(admin: kube.KubeApi, connection: kopf.ConnectionInfo, namespace: str,
                                name: str) -> kopf.ConnectionInfo:
    """A ServiceAccount bound to exactly the operator's rules, logged in with a token the API issued it."""
    role = f"{namespace}-{name}"
    await admin.create(SERVICE_ACCOUNTS, {"metadata": {"name": name}}, namespace=namespace, timeout=T)
    await admin.create(CLUSTER_ROLES, {"metadata": {"name": role}, "rules": operator_rules()}, timeout=T)
    await admin.create(CLUSTER_ROLE_BINDINGS, {
        "metadata": {"name": role},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]}, timeout=T)
    # The token subresource, addressed as a "plural" of the ServiceAccount's own path.
    token_request = kube.Resource("", "v1", f"serviceaccounts/{name}/token")
    issued = await admin.create(token_request, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                                "spec": {"expirationSeconds": 3600}}, namespace=namespace, timeout=T)
    token = str(issued["status"]["token"])
    return dataclasses.replace(connection, token=token, scheme="Bearer", username=None, password=None,
                               certificate_path=None, certificate_data=None, private_key_path=None,
                               private_key_data=None)


async def restrict(admin: kube.KubeApi, login: kopf.ConnectionInfo, namespace: str, name: str, shares: int) -> None:
    """Put the ServiceAccount on a priority level of `shares` shares that neither borrows nor queues; return once
    the API server classifies its requests there."""
    level_name = f"{namespace}-tiny"
    level = await admin.create(PRIORITY_LEVELS, {
        "apiVersion": PRIORITY_LEVELS.api_version, "kind": "PriorityLevelConfiguration",
        "metadata": {"name": level_name},
        "spec": {"type": "Limited", "limited": {
            "nominalConcurrencyShares": shares, "lendablePercent": 0, "borrowingLimitPercent": 0,
            "limitResponse": {"type": "Reject"}}}}, timeout=T)
    await admin.create(FLOW_SCHEMAS, {
        "apiVersion": FLOW_SCHEMAS.api_version, "kind": "FlowSchema", "metadata": {"name": level_name},
        "spec": {"priorityLevelConfiguration": {"name": level_name}, "matchingPrecedence": 500,
                 "distinguisherMethod": {"type": "ByUser"},
                 "rules": [{"subjects": [{"kind": "ServiceAccount", "serviceAccount": {
                     "namespace": namespace, "name": name}}],
                     "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"],
                                        "namespaces": ["*"], "clusterScope": True}]}]}}, timeout=T)
    uid = level["metadata"]["uid"]
    deadline = time.monotonic() + T
    async with httpx.AsyncClient(base_url=login.server, headers=login.as_http_headers(),
                                 verify=login.as_ssl_context(), timeout=T) as client:
        while time.monotonic() < deadline:
            response = await client.get(SYNC_SCHEDULES.path(namespace=namespace), params={"limit": "1"})
            if response.headers.get(PRIORITY_LEVEL_HEADER) == uid:
                return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the API server did not put {name} on priority level {level_name} within {T} s")


async def level_figures(admin: kopf.ConnectionInfo, level: str) -> str:
    """The priority level's seat limit and its rejections by reason, from the API server's own metrics."""
    async with httpx.AsyncClient(base_url=admin.server, verify=admin.as_ssl_context(), timeout=T) as client:
        text = (await client.get("/metrics")).text
    seats, rejected = "?", []
    for line in text.splitlines():
        if f'priority_level="{level}"' not in line:
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith("apiserver_flowcontrol_nominal_limit_seats{"):
            seats = value
        elif name.startswith("apiserver_flowcontrol_rejected_requests_total{"):
            reason = name.split('reason="', 1)[1].split('"', 1)[0]
            rejected.append(f"{float(value):.0f} {reason}")
    return f"{level}: {seats} seats; rejected: {', '.join(rejected) or 'none'}"


async def create_schedules(admin: kube.KubeApi, namespace: str, count: int) -> None:
    gate = asyncio.Semaphore(16)

    async def one(number: int) -> None:
        async with gate:
            await admin.create(SYNC_SCHEDULES, {
                "apiVersion": SYNC_SCHEDULES.api_version, "kind": "SyncSchedule", "metadata": {"name": f"s{number}"},
                "spec": {"schedule": "* * * * *", "job": {"function": "sync_connections"}}},
                namespace=namespace, timeout=T)

    await asyncio.gather(*(one(number) for number in range(count)))


async def stale_statuses(admin: kube.KubeApi, namespace: str, tick: datetime) -> int:
    """Schedules whose status does not record `tick` or a later one yet (real minutes pass too meanwhile)."""
    wanted = tick.strftime("%Y-%m-%dT%H:%M:%SZ")
    listed = await admin.list(SYNC_SCHEDULES, namespace=namespace, chunk_size=500, timeout=T)
    return sum(str(item.get("status", {}).get("lastScheduleTime") or "") < wanted for item in listed.items)


@contextlib.asynccontextmanager
async def leading(ctx: OperatorContext, store: ResourceStore) -> AsyncIterator[None]:
    loop = asyncio.create_task(lead(ctx, store, {"SyncSchedule": reconcile_schedule}))
    try:
        yield
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


async def measure(label: str, admin: kube.KubeApi, connection: kopf.ConnectionInfo, redis: Redis, *,
                  schedules: int, minutes: int, period: float, qps: float | None, shares: int | None) -> Run:
    namespace = f"bench-{label}"
    await admin.create(NAMESPACES, {"metadata": {"name": namespace}}, timeout=T)
    sa_connection = await service_account_login(admin, connection, namespace, "kubearq-operator")
    await create_schedules(admin, namespace, schedules)
    await redis.flushdb()
    await redis.hset(function_registry_key("arq:queue"), "sync_connections", str(2**40))  # type: ignore[misc]
    defaults = OperatorSettings()
    settings = OperatorSettings(namespace=namespace, tenancy="open",
                                status_write_qps=qps if qps is not None else defaults.status_write_qps)
    rates: list[float] = []
    clock = JumpingClock()
    async with kube.KubeApi(sa_connection, field_manager=FIELD_MANAGER) as api:
        if shares is not None:
            await restrict(admin, sa_connection, namespace, "kubearq-operator", shares)
        metrics = RecordingMetrics()
        ctx = OperatorContext(api=api, redis=redis, metrics=metrics, ensure_leader=lambda: None, settings=settings,
                              now=clock)

        def on_rate(rate: float) -> None:
            rates.append(rate)
            metrics.set_status_write_rate(rate)

        ctx.status_budget = WriteBudget(settings.status_write_qps, settings.status_write_burst, on_rate=on_rate)
        store = ResourceStore()
        await list_into(api, store, [namespace])
        async with leading(ctx, store):
            # The first pass writes every schedule's first status; the ticks start once it is through.
            while metrics.status_writes_pending._value.get() > 0 or counted(metrics.status_writes_sent) == 0:
                await asyncio.sleep(0.2)
            # The first tick after that pass (a real minute may have gone by meanwhile); the clock only moves on.
            tick = (clock() + LEAD_IN + timedelta(seconds=1, minutes=1)).replace(second=0, microsecond=0)
            metrics.lags.clear()
            before = _counts(metrics)
            started = time.monotonic()
            for minute in range(minutes):
                clock.offset = tick - LEAD_IN - datetime.now(UTC)
                last_tick_at = time.monotonic() + LEAD_IN.total_seconds()  # real time of this minute's tick
                if minute < minutes - 1:
                    await asyncio.sleep(period)
                    tick += timedelta(minutes=1)
            # Until every status records the last tick: the work is done, and nothing was lost on the way.
            fresh_after: float | None = None
            while time.monotonic() - last_tick_at < FRESH_WITHIN:
                if not (stale := await stale_statuses(admin, namespace, tick)):
                    fresh_after = max(0.0, time.monotonic() - last_tick_at)
                    break
                await asyncio.sleep(FRESH_POLL)
            seconds = time.monotonic() - started
            sent, landed, throttled, coalesced = (after - first for after, first in zip(
                _counts(metrics), before, strict=True))
    stale_left = 0 if fresh_after is not None else stale
    level = await level_figures(connection, f"{namespace}-tiny" if shares is not None else "workload-low")
    return Run(label, seconds, sent, landed, throttled, coalesced, level, stale_left,
               min(rates) if rates else settings.status_write_qps, list(metrics.lags), fresh_after)


def _counts(metrics: OperatorMetrics) -> tuple[float, float, float, float]:
    return (counted(metrics.status_writes_sent), _landed(metrics), counted(metrics.status_writes_throttled),
            counted(metrics.status_writes_coalesced))


def _landed(metrics: OperatorMetrics) -> float:
    return float(metrics.status_patches.labels(kind="SyncSchedule", result="ok")._value.get())


def show(runs: list[Run], *, schedules: int, minutes: int, period: float, qps: float) -> None:
    print(f"{schedules} SyncSchedules firing every minute, {minutes} minutes compressed to {period:g} s each "
          f"(demand {schedules / period:.0f} status writes/s), STATUS_WRITE_QPS={qps:g}, as a ServiceAccount")
    width = max(len(run.label) for run in runs)
    print(f"  {'':<{width}}  sent/s  landed/s  429s  coalesced  lowest rate  ticks  lag p50  lag p99  lag max  "
          "all fresh after the last tick")
    for run in runs:
        fresh = (f"{run.fresh_after:.1f} s" if run.fresh_after is not None
                 else f"not within {FRESH_WITHIN:g} s ({run.stale} short)")
        print(f"  {run.label:<{width}}  {run.per_second(run.sent):6.1f}  {run.per_second(run.landed):8.1f}  "
              f"{run.throttled:4.0f}  {run.coalesced:9.0f}  {run.lowest_rate:9.1f}/s  {len(run.lags):5d}  "
              f"{run.lag(0.5):6.3f}s  {run.lag(0.99):6.3f}s  {max(run.lags, default=float('nan')):6.3f}s  {fresh}")
    for run in runs:
        print(f"  {run.label}: {run.level}")
    if len(runs) == 2:
        anchor, throttled = runs
        print(f"ratios throttled/unthrottled: writes landed/s "
              f"{_ratio(throttled.per_second(throttled.landed), anchor.per_second(anchor.landed))}, "
              f"tick lag p99 {_ratio(throttled.lag(0.99), anchor.lag(0.99))}, "
              f"429s {throttled.throttled:.0f} vs {anchor.throttled:.0f}; "
              f"requests per landed write {_ratio(throttled.sent, throttled.landed)} "
              f"(unthrottled {_ratio(anchor.sent, anchor.landed)})")


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator else "n/a"


async def measure_both(redis_url: str, *, schedules: int, minutes: int, period: float, qps: float | None,
                       shares: int) -> tuple[str, list[Run]]:
    """Both runs on one control plane of their own; the API server's version and the runs, anchor first."""
    assets = assets_folder()
    if assets is None:
        raise SystemExit(f"no kube-apiserver: set KUBEBUILDER_ASSETS (here: {os.environ.get('KUBEBUILDER_ASSETS')}) "
                         "to a folder with etcd and kube-apiserver, e.g. /root/.cache/kubearq-k8s/bin")
    with ControlPlane(Path(assets)) as plane:
        pki = plane.pki
        connection = kopf.ConnectionInfo(server=plane.server, ca_path=str(pki.ca_cert),
                                         certificate_path=str(pki.admin_cert),
                                         private_key_path=str(pki.key_of(pki.admin_cert)))
        redis = create_redis(redis_url)
        try:
            async with kube.KubeApi(connection) as admin:
                await install_crds(admin)
                runs = [await measure(label, admin, connection, redis, schedules=schedules, minutes=minutes,
                                      period=period, qps=qps, shares=level)
                        for label, level in (("unthrottled", None), ("throttled", shares))]
        finally:
            await redis.aclose()
        return plane.version, runs


def rows(runs: list[Run], *, schedules: int, qps: float) -> list[Row]:
    """The report's rows: throttled beside unthrottled (the anchor)."""
    anchor, throttled = runs
    what = f"status writes as a ServiceAccount, {schedules:,} schedules a minute"
    within_budget = max(anchor.per_second(anchor.sent), throttled.per_second(throttled.sent)) <= qps
    fresh = throttled.fresh_after if throttled.fresh_after is not None else math.inf
    return [
        Row(f"{what}: writes landed/s while APF throttles",
            f"{rate(throttled.per_second(throttled.landed), '/s')}, {throttled.throttled:.0f} 429s, lowest rate "
            f"{throttled.lowest_rate:.1f}/s", f"unthrottled: {rate(anchor.per_second(anchor.landed), '/s')}, "
            f"{anchor.throttled:.0f} 429s",
            ratio(throttled.per_second(throttled.landed) / anchor.per_second(anchor.landed)) if anchor.landed else "",
            f"<= STATUS_WRITE_QPS ({qps:g}/s), slower under 429s", "met" if within_budget else "missed",
            f"{throttled.sent / throttled.landed:.2f} requests per landed write; {throttled.coalesced:.0f} statuses "
            "replaced by newer ones before they were sent" if throttled.landed else ""),
        Row(f"{what}: tick lag p99 while APF throttles", seconds(throttled.lag(0.99)),
            f"unthrottled: {seconds(anchor.lag(0.99))}",
            ratio(anchor.lag(0.99) / throttled.lag(0.99)) if throttled.lag(0.99) > 0 else "", "<= 1 s (issue 19)",
            at_most(throttled.lag(0.99), 1.0), f"{len(throttled.lags)} ticks; max {seconds(max(throttled.lags))}"
            if throttled.lags else "no tick measured"),
        Row(f"{what}: every status records the last tick",
            seconds(fresh) if fresh < math.inf else f"{throttled.stale} short after {FRESH_WITHIN:g} s",
            f"unthrottled: {seconds(anchor.fresh_after) if anchor.fresh_after is not None else 'not all'}",
            ratio(anchor.fresh_after / fresh) if anchor.fresh_after and fresh < math.inf else "",
            "nothing lost, within 60 s", at_most(fresh, 60.0), "after the last tick, throttled all the while"),
    ]


def step(schedules: int, minutes: int, period: float) -> Callable[[StepContext, Reporter], None]:
    """This benchmark as a step of `python -m bench` (bench/suite.py)."""
    def run(context: StepContext, out: Reporter) -> None:
        qps = OperatorSettings().status_write_qps
        _, runs = asyncio.run(measure_both(context.redis_url, schedules=schedules, minutes=minutes, period=period,
                                           qps=None, shares=1))
        out.rows(rows(runs, schedules=schedules, qps=qps))

    return run


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes: 200 schedules, 3 minutes of 4 s")
    parser.add_argument("--schedules", type=int, default=None)
    parser.add_argument("--minutes", type=int, default=None)
    parser.add_argument("--period", type=float, default=None, help="real seconds per compressed minute")
    parser.add_argument("--qps", type=float, default=None, help="STATUS_WRITE_QPS (default: the setting's default)")
    parser.add_argument("--shares", type=int, default=1, help="nominal shares of the throttled run's level")
    options = parser.parse_args()
    schedules = options.schedules or (200 if options.quick else 1000)
    minutes = options.minutes or (3 if options.quick else 4)
    period = options.period or (4.0 if options.quick else 10.0)
    qps = options.qps or OperatorSettings().status_write_qps
    with RedisServer() as redis_server:
        version, runs = await measure_both(redis_server.url, schedules=schedules, minutes=minutes, period=period,
                                           qps=options.qps, shares=options.shares)
    print(f"kube-apiserver {version}")
    show(runs, schedules=schedules, minutes=minutes, period=period, qps=qps)
    print(report.markdown_table(rows(runs, schedules=schedules, qps=qps)))


if __name__ == "__main__":
    asyncio.run(main())
