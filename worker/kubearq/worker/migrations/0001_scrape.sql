-- Scrape results: the items extracted from detail pages, and every URL that finally failed.
-- Keys lead with request_uid, so per-request counts, listings and deletes use the primary keys;
-- the (namespace, request_name) indexes serve users who query by the resource's name (a uid
-- changes when a ScrapeRequest is deleted and created again).

CREATE TABLE scrape_items (
    request_uid  uuid        NOT NULL,
    url          text        NOT NULL,
    namespace    text        NOT NULL,
    request_name text        NOT NULL,
    -- Position of the item on its page in extraction order: a re-scraped page replaces its items.
    item_index   integer     NOT NULL CHECK (item_index >= 0),
    item_type    text        NOT NULL,
    data         jsonb       NOT NULL,
    scraped_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (request_uid, url, item_index)
);

CREATE INDEX scrape_items_by_request_name ON scrape_items (namespace, request_name);

CREATE TABLE scrape_failures (
    request_uid  uuid        NOT NULL,
    url          text        NOT NULL,
    namespace    text        NOT NULL,
    request_name text        NOT NULL,
    page_kind    text        NOT NULL CHECK (page_kind IN ('listing', 'detail')),
    error        text        NOT NULL,
    tries        integer     NOT NULL CHECK (tries >= 1),
    failed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (request_uid, url)
);

-- The first failures of a request, in the order they happened.
CREATE INDEX scrape_failures_by_request_time ON scrape_failures (request_uid, failed_at, url);
CREATE INDEX scrape_failures_by_request_name ON scrape_failures (namespace, request_name);
