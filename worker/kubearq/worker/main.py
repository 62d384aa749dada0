"""`kubearq worker`: build the worker from settings, serve probes and metrics, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from arq.typing import StartupShutdown
from arq.worker import Function, func

from kubearq.core.aio import stop_task
from kubearq.core.connections import create_redis
from kubearq.core.observability import ProbeServer
from kubearq.worker.metrics import WorkerMetrics
from kubearq.worker.runtime import KubearqWorker
from kubearq.worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

BuiltinsFactory = Callable[[WorkerSettings], "JobSet"]


@dataclass
class JobSet:
    """Functions to serve and what they need set up in the job context."""

    functions: list[Function] = field(default_factory=list)
    on_startup: list[StartupShutdown] = field(default_factory=list)
    on_shutdown: list[StartupShutdown] = field(default_factory=list)
    ctx: dict[str, Any] = field(default_factory=dict)

    def merge(self, other: JobSet) -> JobSet:
        names = {function.name for function in self.functions}
        clashes = names & {function.name for function in other.functions}
        if clashes:
            raise ValueError(f"function names served twice: {', '.join(sorted(clashes))}; rename yours")
        return JobSet(
            [*self.functions, *other.functions],
            [*self.on_startup, *other.on_startup],
            [*self.on_shutdown, *other.on_shutdown],
            {**self.ctx, **other.ctx},
        )


def load_user_jobs(path: str) -> JobSet:
    """Read `module:WorkerSettings` the way `arq module.WorkerSettings` does: functions and hooks."""
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--settings {path}: cannot import {module_name!r}: {error}") from None
    target: object = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"--settings {path}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    def get(key: str) -> Any:
        return target.get(key) if isinstance(target, dict) else getattr(target, key, None)

    functions = get("functions") or []
    if not isinstance(functions, list | tuple) or not functions:
        raise ValueError(f"--settings {path}: `functions` must be a non-empty list of coroutine functions")
    hooks = {name: get(name) for name in ("on_startup", "on_shutdown")}
    return JobSet(
        functions=[func(cast(Any, function)) for function in functions],
        on_startup=[hooks["on_startup"]] if hooks["on_startup"] else [],
        on_shutdown=[hooks["on_shutdown"]] if hooks["on_shutdown"] else [],
    )


def _chain(hooks: Sequence[StartupShutdown]) -> StartupShutdown | None:
    if not hooks:
        return None

    async def run_all(ctx: dict[Any, Any]) -> None:
        for hook in hooks:
            await hook(ctx)

    return run_all


class WorkerService:
    """One worker with its Redis client and probe server: `start()`, then `stop()` drains and closes."""

    def __init__(self, settings: WorkerSettings, jobs: JobSet) -> None:
        if not jobs.functions:
            raise ValueError("no functions to serve: set DATABASE_URL to serve the built-in scrape jobs, or give "
                             "--settings module:WorkerSettings")
        self.settings = settings
        self.redis = create_redis(
            settings.redis_url, ca_file=str(settings.redis_ca_file) if settings.redis_ca_file else None,
            tls_insecure=settings.redis_tls_insecure, queue=settings.queue)
        self.metrics = WorkerMetrics()
        self.worker = KubearqWorker(
            settings, jobs.functions, redis=self.redis, metrics=self.metrics, ctx=dict(jobs.ctx),
            on_startup=_chain(jobs.on_startup), on_shutdown=_chain(jobs.on_shutdown),
        )
        self.probes = ProbeServer(
            self.metrics.registry, ready_checks={"redis": self._redis_answers}, live_checks={"poll": self._polling})
        self.running: asyncio.Task[None] | None = None

    async def _redis_answers(self) -> bool:
        return bool(await self.redis.ping())

    async def _polling(self) -> bool:
        return self.worker.redis_available

    async def start(self) -> None:
        port = await self.probes.start(self.settings.http_host, self.settings.http_port)
        logger.info("probes and metrics on port %d", port)
        self.running = asyncio.create_task(self.worker.async_run(), name="kubearq-worker")

    async def stop(self) -> list[str]:
        """Drain (finish or put back running jobs), then close everything; returns the ids put back."""
        try:
            put_back = await self.worker.drain(self.settings.shutdown_grace)
        finally:
            logger.debug("stopping the poll loop")
            if self.running is not None:
                await stop_task(self.running, 10, "the poll loop")
            logger.debug("closing the worker")
            await self.worker.close()
            logger.debug("stopping the probe server")
            await self.probes.stop()
            logger.debug("stopped")
        return put_back


async def serve(settings: WorkerSettings, jobs: JobSet, *, stop: asyncio.Event) -> None:
    """Run until `stop` is set (or the worker fails), then drain."""
    service = WorkerService(settings, jobs)
    await service.start()
    assert service.running is not None
    stopped = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({service.running, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if service.running in done:
            service.running.result()  # the worker ended on its own: surface why
    finally:
        stopped.cancel()
        await service.stop()


def run(settings: WorkerSettings, builtins: BuiltinsFactory | None = None) -> None:
    """Process entry point: SIGTERM/SIGINT start the drain."""

    async def main() -> None:
        jobs = builtins(settings) if builtins else JobSet()
        if settings.settings:
            jobs = jobs.merge(load_user_jobs(settings.settings))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, jobs, stop=stop)

    asyncio.run(main())

