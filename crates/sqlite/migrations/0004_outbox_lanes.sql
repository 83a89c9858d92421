-- Outbox lanes (see vextrus_core::outbox::lanes).
--
-- A row with a `lane` is in that lane: it stays 'pending' in its row and is
-- published exactly when its `sequence` is at or below its lane's `cursor`.
-- SQLite has one writer, so rows commit in sequence order and a cursor never
-- passes a row that commits later. A row with no lane (every row written
-- before this migration, and every row that left its lane: a failure, a
-- diversion behind its key's retry) is on the per-row path, claimed and
-- settled row by row as before.
--
-- Applied once, inside the migrator's BEGIN IMMEDIATE transaction (a
-- database migrated before is skipped by its recorded version); it keeps
-- every existing row, on the per-row path.

ALTER TABLE outbox ADD COLUMN lane INTEGER;

-- One row per lane (vextrus_core::outbox::OUTBOX_LANES = 64): the cursor
-- (highest sequence published) and the lease of the worker holding it.
CREATE TABLE outbox_lanes (
    lane        INTEGER PRIMARY KEY,
    cursor      INTEGER NOT NULL DEFAULT 0,
    claimed_by  TEXT,
    lease_until INTEGER
);

WITH RECURSIVE n(lane) AS (SELECT 0 UNION ALL SELECT lane + 1 FROM n WHERE lane < 63)
INSERT OR IGNORE INTO outbox_lanes (lane) SELECT lane FROM n;

-- One mark per cursor advance: when a lane's rows up to `through` were
-- confirmed (a lane row's `published_at`, and retention).
CREATE TABLE outbox_lane_log (
    lane         INTEGER NOT NULL,
    through      INTEGER NOT NULL,
    published_at INTEGER NOT NULL,
    PRIMARY KEY (lane, through)
) WITHOUT ROWID;

-- A lane's rows in order: what a claim reads past the cursor.
CREATE INDEX outbox_lane_seq ON outbox (lane, sequence) WHERE lane IS NOT NULL;

-- The per-row indexes hold per-row rows only (lane rows stay 'pending' in
-- their rows after they are published).
DROP INDEX outbox_status_key;
CREATE INDEX outbox_status_key ON outbox (status, partition_key, sequence)
    WHERE lane IS NULL;
DROP INDEX outbox_key_unfinished;
CREATE INDEX outbox_key_unfinished ON outbox (partition_key, sequence)
    WHERE lane IS NULL AND status <> 'published';
DROP INDEX outbox_published_at;
CREATE INDEX outbox_published_at ON outbox (published_at)
    WHERE lane IS NULL AND status = 'published';
