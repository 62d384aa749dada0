"""Whole operator replicas against the API emulator and a real Redis: one leader, each tick once."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import httpx
import kopf
import pytest
from arq.connections import ArqRedis

from kubearq.core.connections import create_redis
from kubearq.demo.services import free_port
from kubearq.operator.context import SYNC_SCHEDULES
from kubearq.operator.kube import LEASES
from kubearq.operator.main import KopfStoppedError, Reconciler, quiet_kopf_watch_finalization, run_operator
from kubearq.operator.schedules import reconcile_schedule
from kubearq.operator.settings import OperatorSettings
from tests.crd_rules import REPO
from tests.kubernetes import KubernetesUnderTest
from tests.polling import until


@dataclass
class ShiftedClock:
    """Real time plus an offset a test can move forward (the operator polls the clock at least once a second)."""

    offset: timedelta = field(default_factory=timedelta)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass
class Replica:
    name: str
    port: int
    stop: threading.Event
    thread: threading.Thread
    failures: list[BaseException]


@asynccontextmanager
async def replicas(k8s: KubernetesUnderTest, redis_url: str, clock: Callable[[], datetime],
                   names: tuple[str, ...], queue_stats_interval: float = 1.0,
                   connection: kopf.ConnectionInfo | None = None,
                   reconcilers: Mapping[str, Reconciler] | None = None,
                   tenancy: str = "open") -> AsyncIterator[dict[str, Replica]]:
    """Operator replicas, each in a thread with its own loop (kopf cancels foreign tasks in its loop); logged
    in as the test's admin unless given a `connection`; reconciling schedules unless given `reconcilers`;
    TENANCY open unless given (the tests of tenancy say otherwise)."""
    login = connection or k8s.connection
    reconciling = reconcilers or {"SyncSchedule": reconcile_schedule}
    running: dict[str, Replica] = {}
    for name in names:
        port = free_port()
        settings = OperatorSettings(redis_url=redis_url, namespace=k8s.namespace, lease_namespace=k8s.namespace,
                                    status_interval=0.5, http_host="127.0.0.1", http_port=port,
                                    queue_stats_interval=queue_stats_interval, tenancy=tenancy)
        stop_flag, failures = threading.Event(), list[BaseException]()

        def main(settings: OperatorSettings = settings, stop_flag: threading.Event = stop_flag,
                 failures: list[BaseException] = failures, name: str = name) -> None:
            async def serve() -> None:
                stop = asyncio.Event()
                watcher = asyncio.create_task(asyncio.to_thread(stop_flag.wait))
                watcher.add_done_callback(lambda _: stop.set())
                await run_operator(settings, login, stop=stop, now=clock, identity=name, reconcilers=reconciling)

            try:
                asyncio.run(serve())
            except BaseException as error:
                failures.append(error)

        thread = threading.Thread(target=main, name=f"operator-{name}")
        running[name] = Replica(name, port, stop_flag, thread, failures)
        thread.start()
    try:
        yield running
    finally:
        for replica in running.values():
            replica.stop.set()
        for replica in running.values():
            await asyncio.to_thread(replica.thread.join, 60)
            assert not replica.thread.is_alive(), f"operator {replica.name} did not stop"
            if replica.failures:
                raise replica.failures[0]


async def eventually(probe: Callable[[], Any], within: float = 20.0, what: str = "condition") -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await probe()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} did not happen within {within}s (last: {value!r})")
        await asyncio.sleep(0.1)


async def lease_holder(k8s: KubernetesUnderTest) -> str:
    try:
        lease = await k8s.api.get(LEASES, "kubearq-operator", namespace=k8s.namespace, timeout=5)
    except Exception:
        return ""
    return str((lease.get("spec") or {}).get("holderIdentity") or "")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    client = create_redis(redis_url)
    yield client
    await client.aclose()


@pytest.mark.timeout(180)
async def test_two_replicas_elect_one_leader_which_enqueues_each_tick_once_across_a_failover(
    k8s: KubernetesUnderTest, redis_url: str, redis: ArqRedis
) -> None:
    k8s.require_emulator()
    clock = ShiftedClock()
    body = {"apiVersion": "kubearq.dev/v1alpha1", "kind": "SyncSchedule", "metadata": {"name": "minutely"},
            "spec": {"schedule": "* * * * *", "job": {"function": "sync_connections"}}}
    created = await k8s.api.create(SYNC_SCHEDULES, body, namespace=k8s.namespace, timeout=10)
    start = datetime.fromisoformat(str(created["metadata"]["creationTimestamp"]).replace("Z", "+00:00"))
    first_tick = start.replace(second=0, microsecond=0) + timedelta(minutes=1)
    async with replicas(k8s, redis_url, clock, ("alpha", "beta")) as running:
        leader = await eventually(lambda: lease_holder(k8s), what="a leader")
        clock.offset = first_tick - datetime.now(UTC) + timedelta(seconds=1)
        await eventually(lambda: redis.zcard("arq:queue"), what="the first tick's enqueue")
        status = await eventually(lambda: _status_with(k8s, "lastScheduleTime"), what="lastScheduleTime")
        assert status["activeCount"] == 1
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"http://127.0.0.1:{running[leader].port}/metrics")).text
            other = "beta" if leader == "alpha" else "alpha"
            ready = await client.get(f"http://127.0.0.1:{running[leader].port}/readyz")
            standby_ready = await client.get(f"http://127.0.0.1:{running[other].port}/readyz")
        assert (ready.status_code, standby_ready.status_code) == (200, 200)  # standbys are ready too
        assert "kubearq_leader 1.0" in metrics
        assert 'kubearq_enqueued_jobs_total{queue="arq:queue",source="schedule"} 1.0' in metrics

        running[leader].stop.set()  # SIGTERM: the leader releases the Lease
        standby = "beta" if leader == "alpha" else "alpha"
        await eventually(lambda: _holder_is(k8s, standby), within=10, what="the hand-over")
        clock.offset += timedelta(minutes=1)
        await eventually(lambda: _queued_at_least(redis, 2), what="the second tick's enqueue")
        clock.offset += timedelta(seconds=3)
        await asyncio.sleep(2)  # the new leader keeps reconciling; nothing may be enqueued twice
        assert await redis.zcard("arq:queue") == 2


async def test_an_operator_whose_queue_stats_wait_over_5_s_stops_cleanly(
        k8s: KubernetesUnderTest, redis_url: str) -> None:
    # kopf, stopping, cancels every task created after it started and still running 5 s later. The queue
    # stats refresher waited out its interval (10 s by default) in such a task from its second round on:
    # cancelled, it crashed, and run_operator's shutdown with it (Redis and the API client left open).
    k8s.require_emulator()
    interval = OperatorSettings().queue_stats_interval
    async with replicas(k8s, redis_url, ShiftedClock(), ("solo",), queue_stats_interval=interval):
        await eventually(lambda: _holder_is(k8s, "solo"), what="leadership")
        await asyncio.sleep(interval + 1)  # into the refresher's second wait, begun after kopf started
    # replicas() re-raises whatever the replica's run_operator raised


async def _status_with(k8s: KubernetesUnderTest, field_name: str) -> dict[str, Any] | None:
    obj = await k8s.api.get(SYNC_SCHEDULES, "minutely", namespace=k8s.namespace, timeout=5)
    status: dict[str, Any] = dict(obj.get("status") or {})
    return status if status.get(field_name) else None


async def _holder_is(k8s: KubernetesUnderTest, identity: str) -> bool:
    return await lease_holder(k8s) == identity


async def _queued_at_least(redis: ArqRedis, count: int) -> bool:
    return bool(await redis.zcard("arq:queue") >= count)


async def test_kopfs_watch_stream_closed_at_exit_is_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    from kopf._cogs.clients.watching import infinite_watch  # the generator kopf leaves suspended at exit

    async def infinite_watch_of_our_own() -> AsyncGenerator[int, None]:
        yield 1

    loop = asyncio.get_running_loop()
    kopfs = cast(AsyncGenerator[object, None],  # typed as an AsyncIterator by kopf; an async generator it is
                 infinite_watch(settings=kopf.OperatorSettings(), resource=None, namespace=None))  # type: ignore[arg-type]
    ours = infinite_watch_of_our_own()
    try:
        for asyncgen in (kopfs, ours):
            quiet_kopf_watch_finalization(loop, {
                "message": f"an error occurred during closing of asynchronous generator {asyncgen!r}",
                "exception": RuntimeError("generator didn't stop after athrow()"), "asyncgen": asyncgen})
    finally:
        await kopfs.aclose()
        await ours.aclose()
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1
    assert errors[0].startswith(f"an error occurred during closing of asynchronous generator {ours!r}")


async def test_sigterm_to_the_operator_process_releases_the_lease_and_exits(
        k8s: KubernetesUnderTest, redis_url: str) -> None:
    # kopf, started in the main thread, takes SIGTERM for itself: the process stopped kopf alone and kept
    # the Lease (and leading) until it was killed.
    env = {**os.environ, "KUBECONFIG": str(k8s.kubeconfig), "REDIS_URL": redis_url, "NAMESPACE": k8s.namespace,
           "LEASE_NAMESPACE": k8s.namespace, "POD_NAME": "solo", "HTTP_HOST": "127.0.0.1",
           "HTTP_PORT": str(free_port()), "LOG_LEVEL": "INFO"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kubearq.cli", "operator", env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await eventually(lambda: _holder_is(k8s, "solo"), what="leadership")
        await asyncio.sleep(0.5)  # kopf is up and watching: its signal handlers are installed by now
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            output, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, output.decode()[-3000:]
    assert await lease_holder(k8s) == ""
    assert b"stopping: releasing the Lease" in output
    assert output.rstrip().endswith(b'"message": "kubearq operator stopped"}')


async def test_kopf_stopping_on_its_own_stops_the_replica_with_an_error(
        k8s: KubernetesUnderTest, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def kopf_that_gives_up(**_: object) -> None:
        await asyncio.sleep(0.5)
        raise RuntimeError("the watch failed for good")

    monkeypatch.setattr(kopf, "operator", kopf_that_gives_up)
    settings = OperatorSettings(redis_url=redis_url, namespace=k8s.namespace, lease_namespace=k8s.namespace,
                                http_host="127.0.0.1", http_port=free_port())
    async with asyncio.timeout(30):
        with pytest.raises(KopfStoppedError, match=r"^kopf stopped watching: the watch failed for good$"):
            await run_operator(settings, k8s.connection, stop=asyncio.Event(), identity="solo",
                               reconcilers={"SyncSchedule": reconcile_schedule})
    assert await lease_holder(k8s) == ""  # released on the way out


async def test_an_operator_whose_http_port_is_taken_says_so_in_one_line(k8s: KubernetesUnderTest,
                                                                         redis_url: str) -> None:
    port = free_port()
    env = {**os.environ, "KUBECONFIG": str(k8s.kubeconfig), "REDIS_URL": redis_url, "NAMESPACE": k8s.namespace,
           "LEASE_NAMESPACE": k8s.namespace, "POD_NAME": "solo", "HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(port),
           "LOG_FORMAT": "text"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kubearq.cli", "operator", env=env, cwd=REPO,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        async with asyncio.timeout(30):
            output, _ = await process.communicate()
    text = output.decode()
    assert process.returncode == 2, text
    assert [line.split(" ERROR ", 1)[1] for line in text.splitlines() if " ERROR " in line] == [
        f"kubearq.cli: kubearq operator: HTTP_PORT {port} is already in use on 127.0.0.1 (another kubearq operator "
        "or worker on this host?): set HTTP_PORT to a free port, or 0 for any free port"]
    assert "Traceback" not in text


async def test_a_standby_that_stops_does_not_say_it_releases_the_lease(
        k8s: KubernetesUnderTest, redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    await k8s.api.create(LEASES, {"metadata": {"name": "kubearq-operator"}, "spec": {
        "holderIdentity": "another", "leaseDurationSeconds": 3600, "renewTime": now, "acquireTime": now}},
        namespace=k8s.namespace, timeout=5)
    caplog.set_level(logging.INFO)
    async with replicas(k8s, redis_url, ShiftedClock(), ("standby",)) as running:
        await eventually(lambda: _ready(running["standby"].port), what="the standby ready (campaigning)")
    messages = [record.getMessage() for record in caplog.records if record.name == "kubearq.operator.main"]
    assert "stopping (a standby; the Lease is held by another)" in messages
    assert "stopping: releasing the Lease" not in messages
    assert await lease_holder(k8s) == "another"


async def _ready(port: int) -> bool:
    async with httpx.AsyncClient() as client:
        try:
            return (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
        except httpx.TransportError:
            return False


async def test_a_replica_stops_without_kopf_waiting_on_a_kept_alive_metrics_connection(
        k8s: KubernetesUnderTest, redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Prometheus keeps its connection to /metrics open between scrapes; its handler task was one kopf counted
    as its own and waited 5 s for at every stop (found by the demo: the leader took 5 s to stop)."""
    caplog.set_level(logging.DEBUG, logger="kopf._core.reactor.running")
    async with replicas(k8s, redis_url, lambda: datetime.now(UTC), ("solo",)) as running:
        await until(lambda: _holds(k8s, "solo"), what="leadership")
        async with httpx.AsyncClient() as client:  # one connection, kept alive
            for _ in range(2):
                assert (await client.get(f"http://127.0.0.1:{running['solo'].port}/metrics")).status_code == 200
            running["solo"].stop.set()
            await asyncio.to_thread(running["solo"].thread.join, 30)
    hung = [record.getMessage() for record in caplog.records if record.getMessage().startswith("Hung tasks")]
    assert hung == ["Hung tasks stopping is skipped: no tasks given."]


async def _holds(k8s: KubernetesUnderTest, identity: str) -> bool:
    return await lease_holder(k8s) == identity
