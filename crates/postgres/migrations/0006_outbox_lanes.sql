-- vextrus outbox lanes, schema version 6 (see vextrus_core::outbox::lanes).
--
-- A row with a `lane` is in that lane: it stays 'pending' in its row and is
-- published exactly when its `sequence` is at or below its lane's `cursor`.
-- Enqueuers take a transaction-scoped advisory lock per lane before drawing
-- sequences, so a lane's rows commit in sequence order and a cursor never
-- passes a row that commits later. A row with no lane (every row written
-- before this migration, and every row that left its lane: a failure, a
-- diversion behind its key's retry) is on the per-row path, claimed and
-- settled row by row as before.
--
-- Applied inside a transaction holding the migrator's advisory lock;
-- written so that running it again is harmless.

ALTER TABLE vextrus_outbox ADD COLUMN IF NOT EXISTS lane integer;

CREATE TABLE IF NOT EXISTS vextrus_outbox_lanes (
    lane          integer PRIMARY KEY,
    cursor        bigint  NOT NULL DEFAULT 0,
    claimed_by    text,
    claimed_until timestamptz
);

INSERT INTO vextrus_outbox_lanes (lane)
SELECT l FROM generate_series(0, 63) AS l
ON CONFLICT (lane) DO NOTHING;

-- One mark per cursor advance: when a lane's rows up to `through` were
-- confirmed (a lane row's `published_at`, and retention).
CREATE TABLE IF NOT EXISTS vextrus_outbox_lane_log (
    lane         integer     NOT NULL,
    through      bigint      NOT NULL,
    published_at timestamptz NOT NULL,
    PRIMARY KEY (lane, through)
);

-- A lane's rows in order: what a claim reads past the cursor.
CREATE INDEX IF NOT EXISTS vextrus_outbox_lane_seq
    ON vextrus_outbox (lane, sequence) WHERE lane IS NOT NULL;

-- The per-row indexes hold per-row rows only (lane rows stay 'pending' in
-- their rows after they are published).
DROP INDEX IF EXISTS vextrus_outbox_unfinished;
CREATE INDEX vextrus_outbox_unfinished
    ON vextrus_outbox (partition_key, sequence)
    WHERE status <> 'published' AND lane IS NULL;

DROP INDEX IF EXISTS vextrus_outbox_pending;
CREATE INDEX vextrus_outbox_pending
    ON vextrus_outbox (sequence) WHERE status = 'pending' AND lane IS NULL;
