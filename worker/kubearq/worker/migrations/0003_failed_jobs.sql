-- Jobs that failed for good, kept after ARQ has let go of their results (kubearq.core.failedjobs): one row per job
-- id, with the error of each failed try. Pages are read newest first by keyset on (failed_at, job_id); every filter
-- leads an index that ends in (failed_at, job_id), so a page, even deep in the list, is a short index range scan.
-- job_id is compared bytewise (COLLATE "C"), so the order is the same as that of the Redis store used without
-- PostgreSQL, and cheaper to compare.

CREATE TABLE failed_jobs (
    job_id           text COLLATE "C" PRIMARY KEY,
    function         text        NOT NULL,
    args             jsonb       NOT NULL DEFAULT '[]',
    kwargs           jsonb       NOT NULL DEFAULT '{}',
    queue            text        NOT NULL,
    reason           text        NOT NULL CHECK (reason IN ('Failed', 'GaveUp', 'OutOfTries', 'Refused', 'Undecodable',
                                                            'FunctionNotServed')),
    error            text        NOT NULL,
    tries            integer     NOT NULL CHECK (tries >= 0),
    -- [{"job_try": 1, "error": "ValueError: boom", "at": "2026-03-01T10:00:00+00:00"}, ...]
    try_errors       jsonb       NOT NULL DEFAULT '[]',
    -- The resource the job was enqueued for (kubearq.core.contract.Origin), if any.
    origin_namespace text,
    origin_kind      text,
    origin_name      text,
    worker           text        NOT NULL,
    enqueued_at      timestamptz,
    failed_at        timestamptz NOT NULL,
    dead_letter_key  text,
    -- Re-driving: the job this one re-drove; how often this row was re-driven, and the job id it last became.
    redrive_of       text,
    redrive_count    integer     NOT NULL DEFAULT 0,
    redriven_as      text,
    redriven_at      timestamptz
);

CREATE INDEX failed_jobs_by_time ON failed_jobs (failed_at, job_id);
CREATE INDEX failed_jobs_by_function ON failed_jobs (function, failed_at, job_id);
CREATE INDEX failed_jobs_by_queue ON failed_jobs (queue, failed_at, job_id);
CREATE INDEX failed_jobs_by_origin ON failed_jobs (origin_namespace, origin_kind, origin_name, failed_at, job_id);

-- Searching by error text (ILIKE '%text%') uses a trigram index where pg_trgm can be had: it ships with PostgreSQL
-- and is a trusted extension (PostgreSQL 13+), but a managed server may refuse it. Without it a search walks the
-- time index, which finds a common error at once and a rare one in a scan of the table.
DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS pg_trgm;
EXCEPTION WHEN insufficient_privilege OR undefined_file OR feature_not_supported OR undefined_object THEN
    RAISE NOTICE 'pg_trgm is not available (%): failed jobs are searched by error text without an index', SQLERRM;
END
$$;

DO $$
DECLARE
    trgm_schema name;
BEGIN
    SELECT n.nspname INTO trgm_schema
    FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'pg_trgm';
    IF trgm_schema IS NOT NULL THEN
        EXECUTE format('CREATE INDEX failed_jobs_by_error ON failed_jobs USING gin (error %I.gin_trgm_ops)',
                       trgm_schema);
    END IF;
END
$$;
