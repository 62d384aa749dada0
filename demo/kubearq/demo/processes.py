"""One server process of a test's own: started on a free loopback port, waited for, stopped by pid, cleaned up."""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

LOOPBACK = "127.0.0.1"
STOP_TIMEOUT = 30.0
POLL_INTERVAL = 0.05

_live: set[Service] = set()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


class ServiceError(RuntimeError):
    """A test service could not be started or stopped."""


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie nobody reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def children(pid: int) -> list[int]:
    """Pids whose parent is ``pid``, from /proc."""
    found = []
    for stat_path in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat_path).read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat_path.split("/")[2]))
    return found


class Service:
    """Shared process handling: one child process, a temp dir, its log, atexit cleanup."""

    _name = "service"

    def __init__(self, port: int | None, directory: Path) -> None:
        self._port = port if port is not None else free_port()
        self._port_chosen = port is None
        self._dir = directory
        self._proc: subprocess.Popen[bytes] | None = None
        self._run_as: tuple[int, int] | None = None
        self._started = False
        self._closed = False
        _live.add(self)

    @property
    def host(self) -> str:
        """Address the server listens on."""
        return LOOPBACK

    @property
    def port(self) -> int:
        """TCP port, fixed for the server's life (restarts keep it)."""
        return self._port

    @property
    def directory(self) -> Path:
        """Temp dir holding the server's data and log; removed by close()."""
        return self._dir

    @property
    def log_path(self) -> Path:
        """The server's stdout/stderr log."""
        return self._dir / f"{self._name}.log"

    @property
    def pid(self) -> int | None:
        """Pid of the running server process, None when stopped."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _timeout(self) -> float:
        raise NotImplementedError

    def _spawn(self) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                start_new_session=True,
                user=self._run_as[0] if self._run_as else None,
                group=self._run_as[1] if self._run_as else None,
                extra_groups=[] if self._run_as else None,
            )

    def start(self) -> None:
        """Start the server and wait until it answers; no-op when it already runs."""
        if self._closed:
            raise ServiceError(f"{self._name} server was closed")
        if self.running:
            return
        for attempt in range(3):
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn()
            try:
                self._wait_ready()
            except ServiceError:
                self.kill()
                # free_port() races with other processes: on the first start only, take another port.
                log = self.log_path.read_bytes()[log_offset:].decode(errors="replace")
                port_taken = "Address already in use" in log
                if self._started or not self._port_chosen or attempt == 2 or not port_taken:
                    raise
                self._port = free_port()
            else:
                self._started = True
                return

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._timeout()
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise ServiceError(
                    f"{self._name} exited with code {self._proc.returncode} during start; "
                    f"log tail:\n{tail(self.log_path)}"
                )
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{self._name} on port {self._port} not ready after {self._timeout():.0f} s; "
                    f"log tail:\n{tail(self.log_path)}"
                )
            time.sleep(POLL_INTERVAL)

    def _terminate(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the server's process group and reap it; SIGKILL if it lingers."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the server: simulates a crash (unsynced state is lost)."""
        self._terminate(signal.SIGKILL)

    def close(self) -> None:
        """Kill the server if it runs and remove the temp dir; safe to call repeatedly."""
        if self._closed:
            return
        try:
            if self.running:
                self.stop()
        finally:
            self.kill()
            self._closed = True
            _live.discard(self)
            shutil.rmtree(self._dir, ignore_errors=True)

    def stop(self) -> None:
        """Stop the server gracefully and wait for it to exit."""
        self._terminate(signal.SIGTERM)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@atexit.register
def _kill_leftovers() -> None:
    for service in list(_live):
        with contextlib.suppress(Exception):
            service.kill()
        with contextlib.suppress(Exception):
            service.close()
