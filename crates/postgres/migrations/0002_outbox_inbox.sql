-- vextrus outbox and inbox, schema version 2.
--
-- Applied by `PgOutbox::migrate()` (after the event store's migrations)
-- inside a transaction that holds the migrator's advisory lock, and written
-- so that running it again is harmless.

-- The outbox. `sequence` is the enqueue order; enqueuers take a
-- transaction-scoped advisory lock per partition key, so one key's rows
-- commit in sequence order and a relay never sees a later row of a key
-- before an earlier one. `claimed_by`/`claimed_until` are a relay worker's
-- lease, judged by the database clock (now()).
CREATE TABLE IF NOT EXISTS vextrus_outbox (
    sequence        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id              uuid        NOT NULL,
    destination     text        NOT NULL,
    partition_key   text        NOT NULL,
    payload         bytea       NOT NULL,
    headers         jsonb       NOT NULL,
    created_at      timestamptz NOT NULL,
    -- created_at exactly (Unix nanoseconds): timestamptz keeps microseconds.
    created_at_ns   bigint      NOT NULL,
    status          text        NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'published', 'dead')),
    attempts        integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL,
    last_error      text,
    claimed_by      text,
    claimed_until   timestamptz,
    published_at    timestamptz,
    CONSTRAINT vextrus_outbox_id_key UNIQUE (id)
);

-- Each key's unfinished rows in order: the per-key head rule of a claim.
CREATE INDEX IF NOT EXISTS vextrus_outbox_unfinished
    ON vextrus_outbox (partition_key, sequence) WHERE status <> 'published';

-- Pending rows in order: where a claim looks for heads.
CREATE INDEX IF NOT EXISTS vextrus_outbox_pending
    ON vextrus_outbox (sequence) WHERE status = 'pending';

-- Published rows by confirmation time: retention.
CREATE INDEX IF NOT EXISTS vextrus_outbox_published
    ON vextrus_outbox (published_at) WHERE status = 'published';

-- The inbox: one row per (consumer, message) processed or dead-lettered,
-- written in the same transaction as the handler's effects.
CREATE TABLE IF NOT EXISTS vextrus_inbox (
    consumer     text        NOT NULL,
    message_id   uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- Failed attempts of a consumer on a message, kept across redeliveries.
CREATE TABLE IF NOT EXISTS vextrus_inbox_failures (
    consumer   text        NOT NULL,
    message_id uuid        NOT NULL,
    attempts   integer     NOT NULL CHECK (attempts >= 1),
    last_error text        NOT NULL,
    failed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- Messages a consumer gave up on.
CREATE TABLE IF NOT EXISTS vextrus_inbox_dead (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer   text        NOT NULL,
    message_id uuid        NOT NULL,
    source     text        NOT NULL,
    payload    bytea       NOT NULL,
    headers    jsonb       NOT NULL,
    attempts   integer     NOT NULL,
    last_error text        NOT NULL,
    dead_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT vextrus_inbox_dead_key UNIQUE (consumer, message_id)
);
