"""The demo's ad-platform sync: three advertisers on the local ad platform (`kubearq.demo.adplatform`), a connection
to each added as `kubearq connections add` adds it (their tokens in a SYNC_SECRETS_DIR of the demo's own), and what
PostgreSQL holds of each, read through the workers' own storage and sync store."""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from kubearq.demo.adplatform import Account, http_json_config
from kubearq.demo.state import ConnectionView
from kubearq.worker.storage import Storage
from kubearq.worker.sync import admin
from kubearq.worker.sync.jobs import BACKFILL_DAYS
from kubearq.worker.sync.store import Connection, SyncStore

WORKSPACE = "00000000-0000-4000-8000-0000000000de"
"""The one workspace of the demo's connections."""
PROVIDER = "http-json"
SECRET_NAME = "ad-tokens"  # noqa: S105 - the Secret's name, not a token
"""The Secret the tokens would be in on a cluster: its keys are files under SYNC_SECRETS_DIR/ad-tokens/."""
QUARTER_HOURS_A_DAY = 96
ROWS_BY_CONNECTION = "SELECT connection_id, granularity, count(*) AS count FROM metric_snapshots GROUP BY 1, 2"


@dataclass(frozen=True)
class Advertiser:
    """An account on the ad platform (a campaign of `ad_sets` ad sets of `ads_per_set` ads) and its time zone."""

    name: str
    time_zone: str
    ad_sets: int
    ads_per_set: int

    @property
    def ads(self) -> int:
        return self.ad_sets * self.ads_per_set

    def account(self, token: str) -> Account:
        return Account(self.name, token, ad_sets=self.ad_sets, ads_per_set=self.ads_per_set)


ADVERTISERS = (
    Advertiser("acme", "UTC", ad_sets=1, ads_per_set=2),
    Advertiser("globex", "Asia/Tokyo", ad_sets=2, ads_per_set=2),
    Advertiser("initech", "America/Phoenix", ad_sets=1, ads_per_set=1),
)
"""Time zones of whole hours without daylight saving: each backfilled day is 96 quarter hours of every ad, and
every hour that compaction rolls up is whole."""


def backfilled_quarter_hours(advertisers: Sequence[Advertiser]) -> int:
    """What the connections' first syncs (their backfills: the 90 days before today) store: a row per ad and quarter
    hour."""
    return sum(advertiser.ads for advertiser in advertisers) * BACKFILL_DAYS * QUARTER_HOURS_A_DAY


def write_tokens(folder: Path, advertisers: Sequence[Advertiser]) -> dict[str, str]:
    """A new token per advertiser, as the keys of the Secret `ad-tokens` mounted at `folder` (SYNC_SECRETS_DIR)."""
    secret = folder / SECRET_NAME
    secret.mkdir(mode=0o700, parents=True, exist_ok=True)
    tokens = {}
    for advertiser in advertisers:
        tokens[advertiser.name] = secrets.token_urlsafe(16)
        key = secret / advertiser.name
        key.write_text(tokens[advertiser.name])
        key.chmod(0o600)
    return tokens


def connection_options(advertiser: Advertiser, platform_url: str) -> dict[str, str]:
    """`kubearq connections add`'s options for the advertiser's account, by their argument names."""
    return {"workspace": WORKSPACE, "provider": PROVIDER, "name": advertiser.name,
            "config": json.dumps(http_json_config(platform_url, advertiser.name)),
            "credentials": f"{SECRET_NAME}/{advertiser.name}", "time_zone": advertiser.time_zone}


async def add_connections(dsn: str, platform_url: str, advertisers: Sequence[Advertiser]) -> list[Connection]:
    """A connection to each advertiser's account, by the code of `kubearq connections add` (which migrates the
    database first, as a starting worker would)."""
    return [await admin.add(dsn, **connection_options(advertiser, platform_url)) for advertiser in advertisers]


class SyncTables:
    """The connections and their metric rows, read as the workers read them: `async with SyncTables(dsn) as t:`."""

    def __init__(self, dsn: str) -> None:
        self.storage = Storage(dsn, connect_timeout=10, max_connections=2)

    async def __aenter__(self) -> Self:
        await self.storage.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.storage.close()

    async def connections(self) -> list[ConnectionView]:
        """Every connection, in the order they were added, with its rows in `metric_snapshots` by granularity."""
        found = await SyncStore(self.storage).connections(active_only=False)
        async with self.storage.connection("demo_count_snapshots") as connection:
            rows = await connection.fetch(ROWS_BY_CONNECTION)
        counts = {(row["connection_id"], row["granularity"]): int(row["count"]) for row in rows}
        return [ConnectionView(c.display_name, c.provider, c.time_zone, c.sync_status, c.last_sync_completed_at,
                               c.total_syncs_succeeded, c.backfilled_at, c.last_sync_error,
                               counts.get((c.id, "15m"), 0), counts.get((c.id, "1h"), 0)) for c in found]
