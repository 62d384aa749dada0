"""Everything the demo starts, started and stopped by pid, with every log in one folder.

Redis and PostgreSQL are `kubearq.demo.services` servers; the operators and workers are the real
`kubearq operator` / `kubearq worker` as child processes (`python -m kubearq.cli`), each in a session of its
own so that a Ctrl-C at the terminal reaches the demo alone, which then stops them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from kubearq.demo.processes import Service, tail
from kubearq.demo.services import PostgresServer, RedisServer

Role = Literal["operator", "worker"]
S = TypeVar("S", bound=Service)
STOP_GRACE = 15.0
"""Seconds a process may take to stop on SIGTERM before it is killed."""


class StackError(RuntimeError):
    """A part of the demo could not be started, or stopped when it should not have."""


@dataclass
class DemoProcess:
    """One `kubearq operator` or `kubearq worker` process."""

    name: str
    role: Role
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    http_port: int
    popen: subprocess.Popen[bytes] | None = None
    killed: bool = False
    """SIGKILLed on purpose (the failover): its exit is expected."""
    started_at: float = 0.0

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def exit_code(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/metrics"

    def start(self, cwd: Path) -> None:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(self.argv, env=self.env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self.killed = False
        self.started_at = time.time()

    def kill(self) -> None:
        """SIGKILL, as a node dying would: no clean-up, the Lease is not released."""
        if self.popen is not None and self.popen.poll() is None:
            self.killed = True
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait()

    def log_tail(self, lines: int = 15) -> str:
        return tail(self.log_path, lines)


@dataclass
class Stack:
    """The demo's processes and servers; `stop()` ends each of them by its pid."""

    folder: Path
    """Every log, the kubeconfig, and the processes' working directory."""
    processes: dict[str, DemoProcess] = field(default_factory=dict)
    redis: RedisServer | None = None
    postgres: PostgresServer | None = None

    def log(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    async def start_servers(self) -> tuple[RedisServer, PostgresServer]:
        """Redis and PostgreSQL, started side by side (each in a thread: they wait for their server)."""
        redis_started, postgres_started = await asyncio.gather(
            _start_in_thread(RedisServer), _start_in_thread(PostgresServer), return_exceptions=True)
        if isinstance(redis_started, RedisServer):
            self.redis = redis_started
        if isinstance(postgres_started, PostgresServer):
            self.postgres = postgres_started
        for name, outcome in (("Redis", redis_started), ("PostgreSQL", postgres_started)):
            if isinstance(outcome, BaseException):
                raise StackError(f"{name} did not start: {outcome}") from outcome
        assert self.redis is not None
        assert self.postgres is not None
        return self.redis, self.postgres

    def add(self, name: str, role: Role, args: Sequence[str], env: Mapping[str, str], http_port: int) -> DemoProcess:
        argv = [sys.executable, "-m", "kubearq.cli", role, *args]
        process = DemoProcess(name, role, argv, dict(env), self.log(name), http_port)
        self.processes[name] = process
        return process

    def start(self, process: DemoProcess) -> None:
        process.start(self.folder)

    def of_role(self, role: Role) -> list[DemoProcess]:
        return [process for process in self.processes.values() if process.role == role]

    def check_alive(self) -> None:
        """Raise if a process ended that nobody killed: the demo cannot go on without it."""
        for process in self.processes.values():
            if process.popen is not None and not process.killed and process.exit_code is not None:
                raise StackError(f"{process.name} exited with code {process.exit_code}; its log "
                                 f"({process.log_path}) ends:\n{process.log_tail()}")

    async def stop_processes(self) -> None:
        """SIGTERM every process (operators release the Lease, workers drain) and wait for each; SIGKILL one that
        outlives STOP_GRACE."""
        running = [process for process in self.processes.values() if process.running]
        for process in running:
            assert process.popen is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.popen.pid, signal.SIGTERM)
        await asyncio.gather(*(asyncio.to_thread(_reap, process) for process in running))

    async def stop_servers(self) -> None:
        """Stop PostgreSQL and Redis, keeping their logs in the folder."""
        for service, name in ((self.postgres, "postgres"), (self.redis, "redis")):
            if service is not None:
                await asyncio.to_thread(self._close_service, service, name)
        self.postgres = self.redis = None

    def _close_service(self, service: Service, name: str) -> None:
        service.stop()
        # close() removes the server's own folder; its log is worth keeping beside the others.
        with contextlib.suppress(OSError):
            shutil.copyfile(service.log_path, self.log(name))
        service.close()

    def copy_service_logs(self) -> None:
        """Copy the servers' logs into the folder now (they live in the servers' own folders until stopped)."""
        for service, name in ((self.postgres, "postgres"), (self.redis, "redis")):
            if service is not None:
                with contextlib.suppress(OSError):
                    shutil.copyfile(service.log_path, self.log(name))


def _reap(process: DemoProcess) -> None:
    assert process.popen is not None
    try:
        process.popen.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.popen.pid, signal.SIGKILL)
        process.popen.wait()


async def _start_in_thread(factory: Callable[[], S]) -> S:
    """Create and start a server in a thread. Cancelled meanwhile, it waits for the thread and closes what it
    started, so a Ctrl-C during start-up leaves no server behind."""

    def create() -> S:
        service = factory()
        try:
            service.start()
        except BaseException:
            service.close()
            raise
        return service

    starting = asyncio.ensure_future(asyncio.to_thread(create))
    try:
        return await asyncio.shield(starting)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            (await starting).close()
        raise
