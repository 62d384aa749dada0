"""What both processes share for being watched: JSON logs with context, and the /metrics + probes server.

One log format and one probe server for both roles of the image.
"""

from __future__ import annotations

import contextvars
import errno
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import prometheus_client
from aiohttp import web
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

# Fields every log line carries where they apply (style.md: namespace/name and the job id).
LOG_CONTEXT: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "kubearq_log_context", default=None)


@contextmanager
def log_context(**fields: str) -> Iterator[None]:
    """Add fields (e.g. `job_id`, `namespace`, `name`) to every log line written inside the block."""
    token = LOG_CONTEXT.set({**(LOG_CONTEXT.get() or {}), **fields})
    try:
        yield
    finally:
        LOG_CONTEXT.reset(token)


# A LogRecord's own attributes (`name` is the logger's name) are never overwritten by context fields:
# those get an `object_` prefix (`name` of a resource becomes `object_name`).
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (LOG_CONTEXT.get() or {}).items():
            setattr(record, f"object_{key}" if key in _RECORD_ATTRIBUTES else key, value)
        return True


LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def check_log_level(level: str) -> str:
    """LOG_LEVEL, upper-cased: DEBUG, INFO, WARNING or ERROR."""
    if level.upper() not in LOG_LEVELS:
        raise ValueError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    return level.upper()


def configure_logging(level: str = "INFO", log_format: str = "json") -> None:
    """One formatter on the root logger (a JSON object per line, or plain text for a person at a terminal);
    ARQ's and kopf's loggers propagate into it."""
    handler = logging.StreamHandler()
    if log_format == "text":
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(JsonFormatter(
            "{asctime}{levelname}{name}{message}", style="{",
            # kopf's per-object records carry its OperatorSettings (not serializable: every such line failed to
            # format) and a skip flag; the object reference itself is worth keeping, as `object`.
            reserved_attrs=[*RESERVED_ATTRS, "settings", "k8s_skip"],
            rename_fields={"levelname": "level", "asctime": "time", "k8s_ref": "object"},
        ))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if level.upper() in logging.getLevelNamesMapping() else "INFO")
    # httpx logs every request at INFO: a line per status write, Lease renewal and fetched page.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    for name in ("arq", "arq.worker", "arq.jobs", "arq.connections"):
        # ARQ configures its own handlers only through its CLI's dictConfig; make sure none are left over.
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


class PortInUseError(ValueError):
    """HTTP_PORT is taken on this host: one line naming the setting, not an OSError traceback."""


async def serve(app: web.Application, host: str, port: int, *, in_use: str) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (no access log, no signal handlers: the caller owns them); the runner and the bound
    port (useful with port 0). A port already taken raises PortInUseError(`in_use`), nothing left running."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        if error.errno != errno.EADDRINUSE:
            raise
        raise PortInUseError(in_use) from None
    sockets = getattr(site._server, "sockets", None) or []
    return runner, sockets[0].getsockname()[1] if sockets else port


Check = Callable[[], Awaitable[bool]]


@dataclass
class ProbeServer:
    """Serves /metrics (Prometheus text format), /healthz (alive) and /readyz (dependencies reachable)."""

    registry: prometheus_client.CollectorRegistry
    ready_checks: Mapping[str, Check] = field(default_factory=dict)
    live_checks: Mapping[str, Check] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    port: int = 0

    async def _metrics(self, _: web.Request) -> web.Response:
        body = prometheus_client.generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def _run_checks(self, checks: Mapping[str, Check]) -> web.Response:
        failed = []
        for name, check in checks.items():
            try:
                healthy = await check()
            except Exception as error:  # a probe reports, it never crashes the server
                logging.getLogger(__name__).warning("check %s failed: %s", name, error)
                healthy = False
            if not healthy:
                failed.append(name)
        if failed:
            return web.Response(status=503, text=f"failing: {', '.join(failed)}\n")
        return web.Response(text="ok\n")

    async def _healthz(self, _: web.Request) -> web.Response:
        return await self._run_checks(self.live_checks)

    async def _readyz(self, _: web.Request) -> web.Response:
        return await self._run_checks(self.ready_checks)

    async def start(self, host: str, port: int) -> int:
        """Start serving; returns the bound port (useful with port 0)."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner, self.port = await serve(
            app, host, port,
            in_use=f"HTTP_PORT {port} is already in use on {host} (another kubearq operator or worker on this host?): "
                   "set HTTP_PORT to a free port, or 0 for any free port")
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
