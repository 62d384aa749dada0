-- The sync family: ad-platform connections, their entities, and metric snapshots every 15 minutes (rolled up
-- into hourly ones by compact_snapshots). Secrets never live here: `credentials_ref` names a key the workers
-- read from their mounted secrets directory (SYNC_SECRETS_DIR/<secret name>/<key>).

CREATE TABLE connections (
    id                     uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id           uuid        NOT NULL,
    provider               text        NOT NULL,
    display_name           text        NOT NULL,
    config                 jsonb       NOT NULL DEFAULT '{}',
    credentials_ref        text,
    time_zone              text        NOT NULL DEFAULT 'UTC',
    active                 boolean     NOT NULL DEFAULT true,
    sync_status            text        NOT NULL DEFAULT 'idle' CHECK (sync_status IN ('syncing', 'idle', 'error')),
    last_sync_attempted_at timestamptz,
    last_sync_completed_at timestamptz,
    last_sync_error        text        CHECK (char_length(last_sync_error) <= 500),
    total_syncs_attempted  integer     NOT NULL DEFAULT 0,
    total_syncs_succeeded  integer     NOT NULL DEFAULT 0,
    -- A new connection is backfilled first; `backfill_next_day` is where a killed backfill resumes.
    backfilled_at          timestamptz,
    backfill_next_day      date,
    created_at             timestamptz NOT NULL DEFAULT now()
);

-- The fan-out reads the active connections of every workspace.
CREATE INDEX connections_active ON connections (created_at, id) WHERE active;

CREATE TABLE entities (
    connection_id      uuid        NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    platform_id        text        NOT NULL,
    level              text        NOT NULL CHECK (level IN ('campaign', 'adset', 'ad')),
    parent_platform_id text,
    name               text        NOT NULL,
    status             text        NOT NULL,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (connection_id, platform_id)
);

-- The standard metrics are typed columns (all counters: summed when 15-minute rows become an hour); a
-- provider's other metrics go in `extra`, rolled up by the kind the provider declares for each.
-- The key leads with (connection, granularity, time): a re-run upserts the same row, and compaction reads
-- one connection-day of 15-minute rows as one range of the primary key. No foreign key to connections: its
-- check on every inserted row cost compaction a fifth of its time (measured); kubearq disables connections,
-- it never deletes them.
CREATE TABLE metric_snapshots (
    connection_id uuid        NOT NULL,
    granularity   text        NOT NULL CHECK (granularity IN ('15m', '1h')),
    captured_at   timestamptz NOT NULL,
    platform_id   text        NOT NULL,
    spend         numeric     NOT NULL DEFAULT 0,
    impressions   bigint      NOT NULL DEFAULT 0,
    clicks        bigint      NOT NULL DEFAULT 0,
    conversions   numeric     NOT NULL DEFAULT 0,
    revenue       numeric     NOT NULL DEFAULT 0,
    extra         jsonb       NOT NULL DEFAULT '{}',
    synced_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (connection_id, granularity, captured_at, platform_id)
);

-- `extra` of several 15-minute rows as one hour: counters summed, the others' last value.
CREATE FUNCTION kubearq_roll_up_extra(extras jsonb[], counters text[]) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(jsonb_object_agg(key, value), '{}'::jsonb) FROM (
        SELECT key, CASE WHEN key = ANY (counters) THEN to_jsonb(sum((value #>> '{}')::numeric))
                         ELSE (array_agg(value ORDER BY position DESC))[1] END AS value
        FROM unnest(extras) WITH ORDINALITY AS rows (extra, position), jsonb_each(extra)
        GROUP BY key
    ) AS rolled
$$;
