"""Autoscaling on real parts: Prometheus scraping two real `kubearq operator` processes (one leading) over a
real Redis with jobs ready, running and deferred on two queues, queried with the chart's own prometheus-adapter
rule and KEDA query. Each pool gets exactly its queue's ready + running jobs, deferred jobs add nothing, the
two replicas are never counted twice, and a stopped operator gives no value, never a 0."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from kubearq.demo.processes import LOOPBACK, free_port, tail
from kubearq.operator.queuestats import label_safe
from tests.chart import NAMESPACE, by_kind, named, render
from tests.kubernetes import KubernetesUnderTest
from tests.prometheus import PrometheusServer, Sample, Target

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 30.0
POOLS = [
    {"name": "default", "queue": "arq:queue", "maxJobs": 4, "autoscaling": {"minReplicas": 1, "maxReplicas": 5}},
    {"name": "scrape", "queue": "scrape", "maxJobs": 16, "autoscaling": {"minReplicas": 2, "maxReplicas": 10}},
]
QUEUES = {pool["name"]: str(pool["queue"]) for pool in POOLS}
pytestmark = pytest.mark.timeout(180)


@dataclass(frozen=True)
class PoolScaling:
    """What the chart tells the autoscaler about one pool: the query it evaluates, target and bounds."""

    query: str
    target: float
    min_replicas: int
    max_replicas: int

    def desired_replicas(self, value: float | None, current: int) -> int:
        """The HPA's algorithm for an AverageValue target: ceil(value / target) within the bounds; without a
        value the HPA does not scale (it keeps `current`)."""
        if value is None:
            return current
        return min(self.max_replicas, max(self.min_replicas, math.ceil(value / self.target)))


def adapter_scaling() -> dict[str, PoolScaling]:
    """Each pool's External-metric query as prometheus-adapter builds it from the chart's rule and the HPA:
    `<<.Series>>` the metric, `<<.LabelMatchers>>` the HPA's selector plus the namespace of the HPA (the
    rule's namespace override)."""
    objects = render({"workers": POOLS})
    rule = yaml.safe_load(named(objects, "ConfigMap", "kubearq-prometheus-adapter")["data"]["config.yaml"])[
        "externalRules"][0]
    (namespace_label,) = rule["resources"]["overrides"]
    scaling = {}
    for hpa in by_kind(objects, "HorizontalPodAutoscaler"):
        (metric,) = hpa["spec"]["metrics"]
        assert metric["external"]["metric"]["name"] == rule["name"]["as"]
        selector = metric["external"]["metric"]["selector"]["matchLabels"]
        matchers = [f'{label}="{value}"' for label, value in selector.items()]
        matchers.append(f'{namespace_label}="{hpa["metadata"]["namespace"]}"')
        query = rule["metricsQuery"].replace("<<.Series>>", rule["name"]["as"]).replace(
            "<<.LabelMatchers>>", ",".join(matchers))
        assert "<<" not in query
        pool = hpa["metadata"]["labels"]["kubearq.dev/pool"]
        scaling[pool] = PoolScaling(query, float(metric["external"]["target"]["averageValue"]),
                                    hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"])
    return scaling


def keda_scaling() -> dict[str, PoolScaling]:
    """Each pool's ScaledObject query, threshold and bounds, as KEDA evaluates them."""
    scaling = {}
    for scaled in by_kind(render({"autoscaling": {"provider": "keda"}, "workers": POOLS}), "ScaledObject"):
        (trigger,) = scaled["spec"]["triggers"]
        assert (trigger["type"], trigger["metadata"]["ignoreNullValues"]) == ("prometheus", "false")
        pool = scaled["metadata"]["labels"]["kubearq.dev/pool"]
        scaling[pool] = PoolScaling(trigger["metadata"]["query"], float(trigger["metadata"]["threshold"]),
                                    scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"])
    return scaling


async def load_queue(redis: Redis, queue: str, *, ready: int, running: int, deferred: int) -> None:
    """Put the queue in exactly this state, in ARQ's key layout: job ids in the sorted set `queue` scored by
    the ms they may run at, a running one marked `arq:in-progress:<id>`."""
    now_ms = int(time.time() * 1000)
    ids = {f"{queue}-{state}-{number}": (now_ms - 60_000 if state != "deferred" else now_ms + 3_600_000)
           for state, count in (("running", running), ("ready", ready), ("deferred", deferred))
           for number in range(count)}
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(queue)
        if ids:
            pipe.zadd(queue, ids)
        for number in range(running):
            pipe.set(f"{in_progress_key_prefix}{queue}-running-{number}", b"1", px=3_600_000)
        await pipe.execute()


@dataclass
class OperatorProcess:
    name: str
    port: int
    log: Path
    process: asyncio.subprocess.Process | None = None

    async def stop(self) -> None:
        """SIGTERM, as the kubelet sends it: the replica releases the Lease and exits."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(20):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@asynccontextmanager
async def operators(k8s: KubernetesUnderTest, redis_url: str, folder: Path,
                    ports: dict[str, int]) -> AsyncIterator[list[OperatorProcess]]:
    """Real `kubearq operator` processes (POD_NAME → HTTP port), exporting both pools' queues and refreshing
    their gauges every second."""
    started = [OperatorProcess(name, port, folder / f"{name}.log") for name, port in ports.items()]
    try:
        for replica in started:
            env = {**os.environ, "KUBECONFIG": str(k8s.kubeconfig), "REDIS_URL": redis_url,
                   "NAMESPACE": k8s.namespace, "LEASE_NAMESPACE": k8s.namespace, "POD_NAME": replica.name,
                   "HTTP_HOST": LOOPBACK, "HTTP_PORT": str(replica.port), "QUEUES": ",".join(QUEUES.values()),
                   "QUEUE_STATS_INTERVAL": "1", "LOG_LEVEL": "WARNING"}
            with replica.log.open("wb") as log:
                replica.process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "kubearq.cli", "operator", env=env, cwd=REPO,
                    stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT)
        yield started
    finally:
        await asyncio.gather(*(replica.stop() for replica in started))


async def eventually(probe: Callable[[], Awaitable[bool]], what: str, logs: Sequence[Path] = ()) -> None:
    """Poll `probe` until it holds; fail after DEADLINE naming what did not happen, with the operators' logs."""
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while not await probe():
        if asyncio.get_running_loop().time() > deadline:
            details = "\n".join(f"--- {log.name}:\n{tail(log)}" for log in logs)
            raise AssertionError(f"{what} did not happen within {DEADLINE}s\n{details}")
        await asyncio.sleep(0.1)


@pytest.fixture
async def prometheus_ports() -> AsyncIterator[tuple[PrometheusServer, dict[str, int]]]:
    ports = {"op-a": free_port(), "op-b": free_port()}
    server = PrometheusServer([Target(f"{LOOPBACK}:{port}", {"namespace": NAMESPACE, "pod": name})
                               for name, port in ports.items()])
    try:
        await asyncio.to_thread(server.start)
        yield server, ports
    finally:
        await asyncio.to_thread(server.close)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def values(samples: list[Sample]) -> list[float]:
    return [sample.value for sample in samples]


async def test_each_pool_scales_on_exactly_its_queues_ready_plus_running_jobs_through_prometheus(
        k8s: KubernetesUnderTest, redis_url: str, redis: Redis,
        prometheus_ports: tuple[PrometheusServer, dict[str, int]], tmp_path: Path) -> None:
    prometheus, ports = prometheus_ports
    adapter, keda = adapter_scaling(), keda_scaling()
    assert set(adapter) == set(keda) == set(QUEUES)

    async def query(expression: str) -> list[Sample]:
        return await asyncio.to_thread(prometheus.query, expression)

    async def both_give(loads: dict[str, float]) -> bool:
        for pool, busy in loads.items():
            for scaling in (adapter[pool], keda[pool]):
                if values(await query(scaling.query)) != [busy]:
                    return False
        return True

    def giving(loads: dict[str, float]) -> Callable[[], Awaitable[bool]]:
        return lambda: both_give(loads)

    await load_queue(redis, QUEUES["default"], ready=3, running=2, deferred=4)
    await load_queue(redis, QUEUES["scrape"], ready=20, running=1, deferred=50)
    async with operators(k8s, redis_url, tmp_path, ports) as replicas:
        logs = [replica.log for replica in replicas]

        async def one_leader_two_exporting() -> bool:
            leaders = await query("sum(kubearq_leader)")
            exporting = await query("count by (queue_label) (kubearq_queue_busy_jobs)")
            return values(leaders) == [1] and sorted(values(exporting)) == [2, 2]

        await eventually(one_leader_two_exporting, "two exporting operators, one of them leading", logs)
        await eventually(giving({"default": 5, "scrape": 21}), "each pool's ready + running", logs)

        # each pool's query selects one series: its own queue's, by the label-safe name the operator publishes
        for pool, scaling in adapter.items():
            (sample,) = await query(scaling.query)
            assert sample.labels == {"queue_label": label_safe(QUEUES[pool])}
        assert [sample.labels for sample in await query(keda["scrape"].query)] == [{}]

        # deferred jobs (backoff, rate-limit waits) are there, and add nothing
        await load_queue(redis, QUEUES["default"], ready=3, running=2, deferred=34)
        deferred = f'max(kubearq_queue_deferred_jobs{{queue_label="{label_safe(QUEUES["default"])}"}})'

        async def deferred_seen() -> bool:
            return values(await query(deferred)) == [34]

        await eventually(deferred_seen, "34 deferred jobs exported", logs)
        assert await both_give({"default": 5, "scrape": 21})

        # the HPA's decisions for a table of loads (ready, running) per pool
        table = [
            ({"default": (0, 0), "scrape": (0, 0)}, {"default": 1, "scrape": 2}),
            ({"default": (3, 1), "scrape": (30, 3)}, {"default": 1, "scrape": 3}),
            ({"default": (4, 1), "scrape": (40, 8)}, {"default": 2, "scrape": 3}),
            ({"default": (36, 4), "scrape": (380, 20)}, {"default": 5, "scrape": 10}),
        ]
        for loads, expected in table:
            for pool, (ready, running) in loads.items():
                await load_queue(redis, QUEUES[pool], ready=ready, running=running, deferred=7)
            busy = {pool: float(ready + running) for pool, (ready, running) in loads.items()}
            await eventually(giving(busy), f"loads {busy}", logs)
            for scalings in (adapter, keda):
                decided = {pool: scalings[pool].desired_replicas(values(await query(scalings[pool].query))[0],
                                                                 current=3) for pool in loads}
                assert decided == expected, loads

        # one replica stopped: the other still exports the same value (max over replicas, never a sum or 0)
        await load_queue(redis, QUEUES["default"], ready=6, running=1, deferred=2)
        await eventually(giving({"default": 7}), "the new load", logs)
        await replicas[0].stop()

        async def target_down(address: str) -> bool:
            return (await asyncio.to_thread(prometheus.targets_up)).get(address) == "down"

        await eventually(lambda: target_down(f"{LOOPBACK}:{ports['op-a']}"), "op-a's scrape failing", logs)
        assert await both_give({"default": 7})

        # both stopped: no value at all, so the HPA keeps its replicas (a 0 would scale a busy pool down)
        await replicas[1].stop()
        seen: list[list[float]] = []

        async def no_value() -> bool:
            found = [values(await query(scaling.query)) for scaling in (adapter["default"], keda["default"])]
            seen.extend(found)
            return found == [[], []]

        await eventually(no_value, "the busy series gone once no operator is scraped", logs)
        assert all(found in ([7.0], []) for found in seen), seen
        assert adapter["default"].desired_replicas(None, current=4) == 4
