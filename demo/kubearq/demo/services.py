"""Private, real Redis and PostgreSQL servers on loopback for the tests (fixtures in tests/conftest.py) and the demo."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Literal

import redis

from kubearq.demo.processes import (
    LOOPBACK,
    POLL_INTERVAL,
    STOP_TIMEOUT,
    Service,
    ServiceError,
    children,
    free_port,
    pid_gone,
)

REDIS_START_TIMEOUT = 10.0
POSTGRES_START_TIMEOUT = 30.0
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class RedisServer(Service):
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


class PostgresServer(Service):
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
        orphans = children(proc.pid)
        for pid in [proc.pid, *orphans]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        self._proc = None
        # A restart fails while any old process still holds the shared memory segment.
        deadline = time.monotonic() + STOP_TIMEOUT
        while not all(pid_gone(pid) for pid in orphans):
            if time.monotonic() > deadline:
                raise ServiceError(f"postgres children {orphans} survived SIGKILL")
            time.sleep(POLL_INTERVAL)

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


__all__ = [
    "PostgresServer",
    "RedisServer",
    "ServiceError",
    "free_port",
]
