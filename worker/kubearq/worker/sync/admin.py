"""`kubearq connections add|list|get|disable`: the `connections` table without SQL, every input checked first."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from kubearq.worker.storage import Storage
from kubearq.worker.sync.credentials import check_reference
from kubearq.worker.sync.provider import ProviderError, load_providers
from kubearq.worker.sync.store import Connection, SyncStore


class AdminError(Exception):
    """A bad input or a missing connection, in one line; `code` is the exit code (2 usage, 3 not found)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@asynccontextmanager
async def _store(dsn: str) -> AsyncIterator[SyncStore]:
    """The workers' PostgreSQL, migrated as a starting worker would (so a fresh database just has no connections)."""
    async with Storage(dsn, connect_timeout=10) as storage:
        await storage.migrate()
        yield SyncStore(storage)


def parse_connection_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise AdminError(f"{text!r} is not a connection id (a UUID; `kubearq connections list` shows them)") from None


def check_new_connection(*, workspace: str, provider: str, config: str, credentials: str | None,
                         time_zone: str) -> tuple[uuid.UUID, dict[str, Any]]:
    """The workspace id and the config as JSON, once every input is known to be usable."""
    try:
        workspace_id = uuid.UUID(workspace)
    except ValueError:
        raise AdminError(f"--workspace {workspace!r} is not a UUID") from None
    providers = load_providers()
    cls = providers.get(provider)
    if cls is None:
        raise AdminError(f"--provider {provider!r} is not one of {', '.join(sorted(providers))}")
    try:
        parsed = json.loads(config)
    except ValueError as error:
        raise AdminError(f"--config is not JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise AdminError("--config must be a JSON object, e.g. '{\"accountId\": \"123\"}'")
    try:
        cls.parse_config(parsed)
    except ProviderError as error:
        raise AdminError(f"--config: {error.message}") from None
    if credentials is not None:
        try:
            check_reference(credentials)
        except ValueError as error:
            raise AdminError(f"--credentials {error}") from None
    try:
        ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise AdminError(f"--time-zone {time_zone!r} is not an IANA time zone, e.g. Europe/Berlin") from None
    return workspace_id, parsed


async def add(dsn: str, *, workspace: str, provider: str, name: str, config: str, credentials: str | None,
              time_zone: str) -> Connection:
    workspace_id, parsed = check_new_connection(workspace=workspace, provider=provider, config=config,
                                                credentials=credentials, time_zone=time_zone)
    async with _store(dsn) as store:
        return await store.add_connection(workspace_id=workspace_id, provider=provider,
                                          display_name=name, config=parsed, credentials_ref=credentials,
                                          time_zone=time_zone)


async def listed(dsn: str, *, all_connections: bool) -> list[Connection]:
    async with _store(dsn) as store:
        return await store.connections(active_only=not all_connections)


async def get(dsn: str, connection_id: str) -> Connection:
    cid = parse_connection_id(connection_id)
    async with _store(dsn) as store:
        found = await store.connection(cid)
    if found is None:
        raise AdminError(f"no connection {cid}", code=3)
    return found


async def disable(dsn: str, connection_id: str) -> None:
    cid = parse_connection_id(connection_id)
    async with _store(dsn) as store:
        if not await store.set_active(cid, False):
            raise AdminError(f"no connection {cid}", code=3)


def as_json(connection: Connection) -> Mapping[str, Any]:
    """A connection for `-o json` (camelCase, times in RFC 3339)."""
    record = asdict(connection)
    return {_camel(key): value.isoformat() if hasattr(value, "isoformat") else str(value) if isinstance(
        value, uuid.UUID) else value for key, value in record.items()}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def table(connections: list[Connection]) -> str:
    """`kubearq connections list`, as kubectl prints a table."""
    rows = [("ID", "NAME", "PROVIDER", "ACTIVE", "STATUS", "LAST SYNC", "ERROR")]
    for c in connections:
        last = c.last_sync_completed_at.strftime("%Y-%m-%dT%H:%M:%SZ") if c.last_sync_completed_at else "never"
        error = (c.last_sync_error or "")[:60]
        rows.append((str(c.id), c.display_name, c.provider, "yes" if c.active else "no", c.sync_status, last, error))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)
