"""Private, real Redis and PostgreSQL servers on loopback for tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import redis

LOOPBACK = "127.0.0.1"
REDIS_START_TIMEOUT = 10.0
POSTGRES_START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
_POLL_INTERVAL = 0.05
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

_live: set[_Service] = set()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


class ServiceError(RuntimeError):
    """A test service could not be started or stopped."""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie nobody reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def _children(pid: int) -> list[int]:
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


class _Service:
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
                    f"log tail:\n{_tail(self.log_path)}"
                )
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{self._name} on port {self._port} not ready after {self._timeout():.0f} s; "
                    f"log tail:\n{_tail(self.log_path)}"
                )
            time.sleep(_POLL_INTERVAL)

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


class RedisServer(_Service):
    """A private ``redis-server`` on 127.0.0.1, without persistence unless AOF is switched on."""

    _name = "redis"

    def __init__(self, *, port: int | None = None, aof: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceError("redis-server not found; install it: apt-get install redis-server")
        self._binary = binary
        self._aof = aof
        super().__init__(port, Path(tempfile.mkdtemp(prefix="kubearq-redis-")))

    @property
    def url(self) -> str:
        """Connection URL for database 0."""
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def aof(self) -> bool:
        """Whether the append-only file is on (fsync on every write)."""
        return self._aof

    def _command(self) -> list[str]:
        config = self._dir / "redis.conf"
        config.write_text(
            "\n".join(
                [
                    f"bind {LOOPBACK}",
                    f"port {self._port}",
                    "protected-mode no",
                    "daemonize no",
                    f'dir "{self._dir}"',
                    'logfile ""',
                    'save ""',
                    f"appendonly {'yes' if self._aof else 'no'}",
                    "appendfsync always",
                    "",
                ]
            )
        )
        return [self._binary, str(config)]

    def _timeout(self) -> float:
        return REDIS_START_TIMEOUT

    def _ready(self) -> bool:
        client = redis.Redis(host=LOOPBACK, port=self._port, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def restart(self, *, aof: bool | None = None) -> None:
        """Stop (if running) and start on the same port and data dir; ``aof`` switches AOF on/off."""
        self.stop()
        if aof is not None:
            self._aof = aof
        self.start()


def _find_pg_bin() -> Path:
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is not None:
        # Resolve symlinks such as /usr/local/bin/pg_ctl so sibling tools (psql, pg_isready) are found.
        return Path(pg_ctl).resolve().parent
    candidates = glob.glob("/usr/lib/postgresql/*/bin")
    if not candidates:
        raise ServiceError("PostgreSQL binaries not found; install them: apt-get install postgresql")
    versions = {int(v): path for path in candidates if (v := Path(path).parent.name).isdigit()}
    return Path(versions[max(versions)] if versions else sorted(candidates)[-1])


def _unprivileged_user() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return 65534, 65534
    return entry.pw_uid, entry.pw_gid


class PostgresServer(_Service):
    """A private PostgreSQL cluster (initdb) on 127.0.0.1, superuser ``postgres`` with trust auth."""

    _name = "postgres"

    def __init__(self, *, port: int | None = None, synchronous_commit: bool = True) -> None:
        self._bin = _find_pg_bin()
        self._synchronous_commit = synchronous_commit
        run_as: tuple[int, int] | None = None
        if os.geteuid() == 0:
            # initdb and postgres refuse to run as root: run them as nobody, in a dir it owns,
            # directly under /tmp (world-traversable) rather than a possibly private $TMPDIR.
            run_as = _unprivileged_user()
            directory = Path(tempfile.mkdtemp(prefix="kubearq-pg-", dir="/tmp"))
            os.chown(directory, *run_as)
        else:
            directory = Path(tempfile.mkdtemp(prefix="kubearq-pg-"))
        super().__init__(port, directory)
        self._run_as = run_as
        try:
            self._initdb()
        except BaseException:
            self.close()
            raise

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self._dir / "data"

    @property
    def socket_dir(self) -> Path:
        """Directory holding the server's unix socket."""
        return self._dir / "sock"

    def dsn(self, database: str = "postgres") -> str:
        """Connection string for ``database`` as superuser ``postgres``."""
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{database}"

    def _initdb(self) -> None:
        self.socket_dir.mkdir()
        if self._run_as is not None:
            os.chown(self.socket_dir, *self._run_as)
        result = subprocess.run(
            [
                str(self._bin / "initdb"),
                "--pgdata",
                str(self.data_dir),
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            cwd=self._dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
            user=self._run_as[0] if self._run_as else None,
            group=self._run_as[1] if self._run_as else None,
            extra_groups=[] if self._run_as else None,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise ServiceError(f"initdb failed with code {result.returncode}:\n{output}")

    def _command(self) -> list[str]:
        settings = {
            "listen_addresses": LOOPBACK,
            "port": str(self._port),
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "off",
            # Off would lose acknowledged commits when kill() hits before the WAL writer runs;
            # with fsync=off a commit costs one write() anyway.
            "synchronous_commit": "on" if self._synchronous_commit else "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "logging_collector": "off",
        }
        command = [str(self._bin / "postgres"), "-D", str(self.data_dir)]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        return command

    def _timeout(self) -> float:
        return POSTGRES_START_TIMEOUT

    def _ready(self) -> bool:
        result = subprocess.run(
            [
                str(self._bin / "pg_isready"),
                "-q",
                "-h",
                LOOPBACK,
                "-p",
                str(self._port),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-t",
                "2",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
        return result.returncode == 0

    def stop(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """Shut down like ``pg_ctl stop -m MODE`` and wait for the postmaster to exit."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._proc = None
            return
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        # Signal only the postmaster (as pg_ctl does); it shuts its children down before exiting.
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the postmaster and all its children: a crash; restart() runs crash recovery."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._proc = None
            return
        # Every postgres child calls setsid(), so killpg misses them; freeze the postmaster so it
        # cannot fork while we collect its children, then kill them all.
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGSTOP)
        children = _children(proc.pid)
        for pid in [proc.pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        self._proc = None
        # A restart fails while any old process still holds the shared memory segment.
        deadline = time.monotonic() + STOP_TIMEOUT
        while not all(_pid_gone(pid) for pid in children):
            if time.monotonic() > deadline:
                raise ServiceError(f"postgres children {children} survived SIGKILL")
            time.sleep(_POLL_INTERVAL)

    def restart(self) -> None:
        """Stop (fast) if running, then start again on the same port and data dir."""
        self.stop()
        self.start()

    def _psql(self, sql: str) -> None:
        result = subprocess.run(
            [str(self._bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.dsn(), "-c", sql],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise ServiceError(f"psql failed on {sql!r}:\n{output}")

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its dsn."""
        if not _DB_NAME.match(name):
            raise ValueError(f"unsafe database name {name!r}")
        self._psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, terminating its connections."""
        if not _DB_NAME.match(name):
            raise ValueError(f"unsafe database name {name!r}")
        self._psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@atexit.register
def _kill_leftovers() -> None:
    for service in list(_live):
        with contextlib.suppress(Exception):
            service.kill()
        with contextlib.suppress(Exception):
            service.close()


__all__ = [
    "PostgresServer",
    "RedisServer",
    "ServiceError",
    "free_port",
]
