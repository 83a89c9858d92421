-- The saga store on SQLite: instances, their append-only timelines, and the
-- replies already handled.
--
-- Times are INTEGER nanoseconds since the Unix epoch, always written from the
-- database clock (`julianday('now')`, millisecond precision, read inside the
-- write transaction), as the outbox's. Outgoing commands are rows of the
-- outbox table (migration 2), written in the transition's transaction.

CREATE TABLE saga_instances (
    -- Creation order: ties of `created_at` (same millisecond) are broken by it.
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT    NOT NULL,
    saga_type     TEXT    NOT NULL,
    version       INTEGER NOT NULL CHECK (version >= 0),
    state         TEXT    NOT NULL
                  CHECK (state IN ('running', 'compensating', 'completed',
                                   'compensated', 'compensation_failed', 'failed')),
    data          TEXT    NOT NULL,
    progress      TEXT    NOT NULL,
    last_error    TEXT,
    -- NULL: nothing scheduled.
    due_at        INTEGER,
    lease_owner   TEXT,
    lease_until   INTEGER,
    fencing_token INTEGER NOT NULL DEFAULT 0 CHECK (fencing_token >= 0),
    -- The last history entry's seq (the next transition appends after it).
    history_seq   INTEGER NOT NULL DEFAULT 1,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    CONSTRAINT saga_instances_id_unique UNIQUE (id)
);

-- Due timers of sagas a worker may still act on (the claim's scan).
CREATE INDEX saga_instances_due ON saga_instances (due_at)
    WHERE state IN ('running', 'compensating', 'compensation_failed')
      AND due_at IS NOT NULL;
-- Operator listings, oldest first.
CREATE INDEX saga_instances_created ON saga_instances (created_at, seq);

-- Each saga's timeline: appended to, never changed.
CREATE TABLE saga_history (
    saga_id TEXT    NOT NULL,
    seq     INTEGER NOT NULL CHECK (seq >= 1),
    at      INTEGER NOT NULL,
    worker  TEXT,
    event   TEXT    NOT NULL,
    PRIMARY KEY (saga_id, seq)
) WITHOUT ROWID;

CREATE TRIGGER saga_history_no_update BEFORE UPDATE ON saga_history
BEGIN
    SELECT RAISE(ABORT, 'saga history is append-only');
END;

CREATE TRIGGER saga_history_no_delete BEFORE DELETE ON saga_history
BEGIN
    SELECT RAISE(ABORT, 'saga history is append-only');
END;

-- Reply messages already handled by a transition (the saga store's inbox).
CREATE TABLE saga_inbox (
    message_id TEXT    NOT NULL PRIMARY KEY,
    saga_id    TEXT    NOT NULL,
    handled_at INTEGER NOT NULL
) WITHOUT ROWID;
