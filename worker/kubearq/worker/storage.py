"""The worker's one adapter to PostgreSQL: a connection pool, versioned migrations, the scrape queries.

An outage is never fatal: `Storage.connect` retries with backoff until the caller's deadline, and a
query that loses its connection raises `StorageUnavailableError`, which the job runtime retries.
Every write is one transaction and idempotent, so a job retried after an outage cannot corrupt anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import logging
import random
import re
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Literal, Self, cast
from urllib.parse import parse_qs, urlsplit

import asyncpg
from pydantic import BaseModel, ConfigDict

logger = logging.getLogger(__name__)

MIGRATIONS_PACKAGE = "kubearq.worker.migrations"
# pg_advisory_lock key shared by every kubearq worker: the ASCII bytes of "kubearq".
MIGRATION_LOCK_KEY = 0x6B756265617271
MAX_ERROR_LENGTH = 4000
# One connection attempt may take this long; `Storage.connect` retries within its own deadline.
CONNECT_ATTEMPT_TIMEOUT = 10.0

PageKind = Literal["listing", "detail"]
UnavailableHook = Callable[[str, BaseException], None]
"""Called with the operation and the error each time PostgreSQL cannot be reached (count it in a metric)."""

_MIGRATION_FILE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")

# Errors that mean "PostgreSQL cannot be reached or is going away", not "this query is wrong":
# socket errors and timeouts, SQLSTATE class 08 (connection exception), 53 (insufficient resources,
# e.g. too many connections) and 57 (operator intervention: shutdown, starting up, cancelled).
_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.OperatorInterventionError,
)
# Errors a connection attempt cannot outlive by waiting: a wrong DATABASE_URL, credentials or database.
_CONFIGURATION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.ClientConfigurationError,
    ValueError,
)


class StorageError(Exception):
    """Base of the errors this module raises on purpose."""


class StorageUnavailableError(StorageError):
    """PostgreSQL could not be reached; nothing was written. Retry the job later."""

    def __init__(self, server: str, operation: str, error: BaseException) -> None:
        detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        super().__init__(f"PostgreSQL at {server} is unavailable ({operation}): {detail}")
        self.server = server
        self.operation = operation


class StorageConfigError(StorageError):
    """DATABASE_URL points at something that will not accept us: bad URL, credentials or database."""


class SchemaTooNewError(StorageError):
    """The database was migrated by a newer kubearq than this one."""


class RequestRef(BaseModel):
    """The ScrapeRequest a row belongs to: its uid (the key) and its namespace/name (for people)."""

    model_config = ConfigDict(frozen=True)

    uid: uuid.UUID
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class ScrapeFailure:
    """A URL that finally failed, with its last error."""

    url: str
    page_kind: PageKind
    error: str
    tries: int
    failed_at: datetime


@dataclass(frozen=True, slots=True)
class DeletedRows:
    """How many rows `Storage.delete_request` removed."""

    items: int
    failures: int


@dataclass(frozen=True, slots=True)
class Migration:
    """One versioned SQL file, applied in its own transaction."""

    version: int
    name: str
    sql: str


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with "equal jitter": half the step fixed, half random, so retries never spin."""

    initial: float = 0.1
    maximum: float = 5.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        step = min(self.maximum, self.initial * 2.0 ** min(attempt, 60))
        return step / 2 + rng.uniform(0, step / 2)


def load_migrations(package: str = MIGRATIONS_PACKAGE) -> tuple[Migration, ...]:
    """The migrations shipped in ``package`` (files named ``NNNN_name.sql``), ordered by version."""
    migrations: dict[int, Migration] = {}
    for entry in importlib.resources.files(package).iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match is None:
            if entry.name.endswith(".sql"):
                raise ValueError(f"migration file {entry.name!r} is not named like '0002_connections.sql'")
            continue
        version = int(match["version"])
        if version in migrations:
            raise ValueError(f"two migrations have version {version}: {migrations[version].name!r}, {entry.name!r}")
        migrations[version] = Migration(version, entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8"))
    return tuple(migrations[version] for version in sorted(migrations))


def describe_server(dsn: str) -> str:
    """``host:port`` of a DSN, for messages: never its user or password."""
    parts = urlsplit(dsn)
    location = parts.netloc.rpartition("@")[2]
    if not location:
        query = parse_qs(parts.query)
        location = query.get("host", ["localhost"])[0]
        if "port" in query:
            location += f":{query['port'][0]}"
    if "," not in location and not location.rpartition("]")[2].count(":"):
        location += ":5432"
    return location


def _without_nul(value: object) -> object:
    """``value`` with NUL characters replaced by U+FFFD: jsonb and text refuse NUL, scraped pages hold some."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, Mapping):
        return {_without_nul(key): _without_nul(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nul(item) for item in value]
    return value


def encode_json(value: object) -> str:
    """JSON text for a jsonb parameter; NaN and Infinity are refused, since jsonb has no spelling for them."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    # json.dumps escapes NUL as \u0000 (a literal backslash is "\\"), so this test is exact enough
    # to skip the slow path for every page without NUL.
    if "\\u0000" in text:
        text = json.dumps(_without_nul(value), ensure_ascii=False, allow_nan=False)
    return text


def _clean_error(error: str) -> str:
    error = error.replace("\x00", "\ufffd")
    if len(error) > MAX_ERROR_LENGTH:
        error = error[: MAX_ERROR_LENGTH - 1] + "…"
    return error


def _caused_by_outage(error: BaseException) -> bool:
    """Whether ``error`` or an error it was raised while handling means PostgreSQL is unreachable."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, _UNAVAILABLE_ERRORS):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _connection_lost(connection: asyncpg.Connection) -> bool:
    """Whether a pooled connection has closed under us."""
    try:
        return cast(bool, connection.is_closed())
    except asyncpg.InterfaceError:
        # The pool detaches a proxy from its connection as soon as the connection closes.
        return True


async def _init_connection(connection: asyncpg.Connection) -> None:
    await connection.set_type_codec("jsonb", encoder=encode_json, decoder=json.loads, schema="pg_catalog")


def _rows_affected(status: str) -> int:
    """The row count of a command status such as ``DELETE 3``."""
    return int(status.rpartition(" ")[2])


class Storage:
    """A pool of PostgreSQL connections and the queries the jobs need.

    ``async with Storage(dsn, connect_timeout=60) as storage: await storage.migrate()``.
    """

    def __init__(
        self,
        dsn: str,
        *,
        connect_timeout: float = 60.0,
        command_timeout: float = 60.0,
        max_connections: int = 10,
        backoff: Backoff = Backoff(),
        on_unavailable: UnavailableHook | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._max_connections = max_connections
        self._backoff = backoff
        self._on_unavailable = on_unavailable
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not secrets
        self._pool: asyncpg.Pool | None = None
        self.server = describe_server(dsn)
        """``host:port`` of the server, for messages."""

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the pool and wait until PostgreSQL answers, retrying until ``connect_timeout`` has passed.

        Raises `StorageUnavailableError` when the deadline passes and `StorageConfigError` at once
        when waiting cannot help (a malformed URL, wrong credentials, a missing database).
        """
        if self._pool is None:
            # min_size=0: the pool opens connections on demand and replaces closed ones when acquired,
            # so it needs no rebuilding after an outage (and creating it cannot fail for one).
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=0,
                max_size=self._max_connections,
                command_timeout=self._command_timeout,
                timeout=CONNECT_ATTEMPT_TIMEOUT,
                init=_init_connection,
                server_settings={"application_name": "kubearq-worker"},
            )
        try:
            await self._wait_until_reachable()
        except BaseException:
            # Not close(): a pool of half-open connections may not close quickly, and nothing is in flight.
            pool, self._pool = self._pool, None
            pool.terminate()
            raise

    async def _wait_until_reachable(self) -> None:
        assert self._pool is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connect_timeout
        attempt = 0
        while True:
            try:
                async with self._pool.acquire(timeout=max(0.0, deadline - loop.time())) as connection:
                    await connection.fetchval("SELECT 1")
            except _CONFIGURATION_ERRORS as error:
                raise StorageConfigError(
                    f"DATABASE_URL: PostgreSQL at {self.server} refused the connection: {type(error).__name__}: {error}"
                ) from error
            except _UNAVAILABLE_ERRORS as error:
                self._count_unavailable("connect", error)
                delay = self._backoff.delay(attempt, self._rng)
                attempt += 1
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise StorageUnavailableError(
                        self.server, f"connect: gave up after {attempt} attempts in {self._connect_timeout:g} s", error
                    ) from error
                logger.warning(
                    "PostgreSQL at %s is unreachable (attempt %d: %s: %s); retrying in %.2f s",
                    self.server,
                    attempt,
                    type(error).__name__,
                    error,
                    min(delay, remaining),
                )
                await asyncio.sleep(min(delay, remaining))
            else:
                if attempt:
                    logger.info("PostgreSQL at %s is reachable after %d failed attempts", self.server, attempt)
                return

    async def close(self) -> None:
        """Close every connection; safe to call repeatedly."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def migrate(
        self,
        migrations: Sequence[Migration] | None = None,
        *,
        allow_newer_schema: bool = False,
        timeout: float = 600.0,  # noqa: ASYNC109 - bounds the wait for the lock and each migration
    ) -> list[int]:
        """Apply the migrations this database lacks, under an advisory lock; return the versions applied.

        Several workers may start at once: one applies, the others wait for the lock and find nothing
        left to do. A database already at a version newer than ``migrations`` knows raises
        `SchemaTooNewError`, unless ``allow_newer_schema`` (for a deliberate rollback of the worker).
        """
        known = tuple(migrations) if migrations is not None else load_migrations()
        applied_now: list[int] = []
        async with self.connection("migrate") as connection:
            await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY, timeout=timeout)
            try:
                await connection.execute(
                    """
                    CREATE TABLE IF NOT EXISTS kubearq_schema_migrations (
                        version    integer     PRIMARY KEY,
                        name       text        NOT NULL,
                        applied_at timestamptz NOT NULL DEFAULT now()
                    )
                    """
                )
                rows = await connection.fetch("SELECT version, name FROM kubearq_schema_migrations ORDER BY version")
                applied = {cast(int, row["version"]): cast(str, row["name"]) for row in rows}
                self._check_not_newer(applied, known, allow_newer_schema)
                for migration in known:
                    if migration.version in applied:
                        continue
                    try:
                        async with connection.transaction():
                            await connection.execute(migration.sql, timeout=timeout)
                            await connection.execute(
                                "INSERT INTO kubearq_schema_migrations (version, name) VALUES ($1, $2)",
                                migration.version,
                                migration.name,
                            )
                    except asyncpg.PostgresError as error:
                        error.add_note(f"while applying migration {migration.name} to PostgreSQL at {self.server}")
                        raise
                    logger.info("Applied migration %s to PostgreSQL at %s", migration.name, self.server)
                    applied_now.append(migration.version)
            finally:
                if not connection.is_closed():
                    await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        return applied_now

    def _check_not_newer(self, applied: Mapping[int, str], known: Sequence[Migration], allow: bool) -> None:
        newest_known = max((migration.version for migration in known), default=0)
        unknown = sorted(version for version in applied if version > newest_known)
        if not unknown:
            return
        newest = unknown[-1]
        message = (
            f"the database at {self.server} has schema version {newest} ({applied[newest]}), newer than the "
            f"newest this kubearq knows ({newest_known}): a newer kubearq migrated it; run that version or newer, "
            f"or set allow_newer_schema to run this one anyway (e.g. for a rollback)"
        )
        if not allow:
            raise SchemaTooNewError(message)
        logger.warning("Running against a newer schema as allowed: %s", message)

    async def store_page_items(
        self,
        request: RequestRef,
        url: str,
        items: Sequence[Mapping[str, object]],
        item_type: str,
    ) -> None:
        """Make ``items`` the stored items of page ``url``, replacing any from an earlier run; clear its failure."""
        # One statement (one round trip, atomic on its own) instead of BEGIN, three statements and COMMIT,
        # which were a fifth of a scraped page's CPU. The deletes read a count of the upserted rows first
        # (an InitPlan), so the upsert runs to its end before them: rows are locked in item order, then the
        # stale ones, as the earlier transaction did; concurrent runs of a page cannot deadlock.
        async with self.connection("store_page_items") as connection:
            await connection.execute(
                """
                WITH upserted AS (
                    INSERT INTO scrape_items
                        (request_uid, url, namespace, request_name, item_index, item_type, data, scraped_at)
                    SELECT $1, $2, $3, $4, position - 1, $5, item, now()
                    FROM jsonb_array_elements($6::jsonb) WITH ORDINALITY AS page(item, position)
                    ORDER BY position
                    ON CONFLICT (request_uid, url, item_index) DO UPDATE SET
                        namespace = EXCLUDED.namespace,
                        request_name = EXCLUDED.request_name,
                        item_type = EXCLUDED.item_type,
                        data = EXCLUDED.data,
                        scraped_at = EXCLUDED.scraped_at
                    RETURNING item_index
                ), stored AS (
                    SELECT count(*) AS items FROM upserted
                ), stale AS (
                    DELETE FROM scrape_items
                    WHERE request_uid = $1 AND url = $2 AND item_index >= (SELECT items FROM stored)
                    RETURNING 1
                )
                DELETE FROM scrape_failures
                WHERE request_uid = $1 AND url = $2 AND (SELECT items FROM stored) >= 0
                """,
                request.uid,
                url,
                request.namespace,
                request.name,
                item_type,
                [dict(item) for item in items],
            )

    async def record_failure(self, request: RequestRef, url: str, page_kind: PageKind, error: str, tries: int) -> None:
        """Keep ``url`` as finally failed with its last error and try count (replacing an earlier record)."""
        async with self.connection("record_failure") as connection:
            await connection.execute(
                """
                INSERT INTO scrape_failures
                    (request_uid, url, namespace, request_name, page_kind, error, tries, failed_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, now())
                ON CONFLICT (request_uid, url) DO UPDATE SET
                    namespace = EXCLUDED.namespace,
                    request_name = EXCLUDED.request_name,
                    page_kind = EXCLUDED.page_kind,
                    error = EXCLUDED.error,
                    tries = EXCLUDED.tries,
                    failed_at = EXCLUDED.failed_at
                """,
                request.uid,
                url,
                request.namespace,
                request.name,
                page_kind,
                _clean_error(error),
                tries,
            )

    async def count_items(self, request_uid: uuid.UUID) -> int:
        """How many items the request has stored."""
        async with self.connection("count_items") as connection:
            count = await connection.fetchval("SELECT count(*) FROM scrape_items WHERE request_uid = $1", request_uid)
        return cast(int, count)

    async def failures(self, request_uid: uuid.UUID, limit: int) -> list[ScrapeFailure]:
        """The request's first ``limit`` failed URLs, oldest first."""
        async with self.connection("failures") as connection:
            rows = await connection.fetch(
                """
                SELECT url, page_kind, error, tries, failed_at FROM scrape_failures
                WHERE request_uid = $1 ORDER BY failed_at, url LIMIT $2
                """,
                request_uid,
                limit,
            )
        return [
            ScrapeFailure(
                url=cast(str, row["url"]),
                page_kind=cast(PageKind, row["page_kind"]),
                error=cast(str, row["error"]),
                tries=cast(int, row["tries"]),
                failed_at=cast(datetime, row["failed_at"]),
            )
            for row in rows
        ]

    async def delete_request(self, request_uid: uuid.UUID) -> DeletedRows:
        """Remove every item and failure of a request (``deletionPolicy: Delete``)."""
        async with self.connection("delete_request") as connection, connection.transaction():
            items = await connection.execute("DELETE FROM scrape_items WHERE request_uid = $1", request_uid)
            failures = await connection.execute("DELETE FROM scrape_failures WHERE request_uid = $1", request_uid)
        return DeletedRows(items=_rows_affected(items), failures=_rows_affected(failures))

    @contextlib.asynccontextmanager
    async def connection(self, operation: str) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; losing PostgreSQL on the way becomes `StorageUnavailableError`."""
        if self._pool is None:
            raise RuntimeError("Storage is not connected: use it as `async with Storage(...)` or call connect()")
        try:
            async with self._pool.acquire() as connection:
                try:
                    yield connection
                except (asyncpg.InterfaceError, asyncpg.InternalClientError) as error:
                    # A transaction's rollback on a connection that just died raises InterfaceError
                    # ("connection is closed") in place of the connection error, which becomes its context;
                    # a server SIGKILLed mid-query can leave asyncpg's protocol mid-operation, and the next
                    # query raises InternalClientError ("cannot switch to state 12; another operation (2) is
                    # in progress": seen once in the full suite's outage test).
                    if _connection_lost(connection) or _caused_by_outage(error):
                        raise self._unavailable(operation, error) from error
                    raise
        except _UNAVAILABLE_ERRORS as error:
            raise self._unavailable(operation, error) from error

    def _unavailable(self, operation: str, error: BaseException) -> StorageUnavailableError:
        self._count_unavailable(operation, error)
        return StorageUnavailableError(self.server, operation, error)

    def _count_unavailable(self, operation: str, error: BaseException) -> None:
        if self._on_unavailable is not None:
            self._on_unavailable(operation, error)


__all__ = [
    "Backoff",
    "DeletedRows",
    "Migration",
    "PageKind",
    "RequestRef",
    "SchemaTooNewError",
    "ScrapeFailure",
    "Storage",
    "StorageConfigError",
    "StorageError",
    "StorageUnavailableError",
    "describe_server",
    "encode_json",
    "load_migrations",
]
