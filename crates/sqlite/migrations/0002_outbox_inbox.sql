-- The transactional outbox and the inbox on SQLite.
--
-- Times are INTEGER nanoseconds since the Unix epoch. `created_at` is the
-- message's own (written by the producer); every time the store judges
-- (`next_attempt_at`, `lease_until`, `published_at`, `dead_at`) is written
-- from the database clock (`julianday('now')`, read inside the write
-- transaction) and only ever compared with it. A NULL `next_attempt_at`
-- means "due since it was enqueued".
--
-- `sequence` is the enqueue order: every enqueue runs in a `BEGIN IMMEDIATE`
-- transaction (one writer at a time), and AUTOINCREMENT never reuses a value,
-- so a partition key's messages are published in `sequence` order.
CREATE TABLE outbox (
    sequence        INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT    NOT NULL,
    destination     TEXT    NOT NULL,
    partition_key   TEXT    NOT NULL,
    payload         BLOB    NOT NULL,
    headers         TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    status          TEXT    NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'published', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at INTEGER,
    last_error      TEXT,
    claimed_by      TEXT,
    lease_until     INTEGER,
    published_at    INTEGER,
    CONSTRAINT outbox_id_unique UNIQUE (id)
);

-- Heads of keys: MIN(sequence) per key among pending (or pending and dead) rows.
CREATE INDEX outbox_status_key ON outbox (status, partition_key, sequence);
-- A key's unfinished messages in order (the followers of a claimed head).
CREATE INDEX outbox_key_unfinished ON outbox (partition_key, sequence)
    WHERE status <> 'published';
-- Retention.
CREATE INDEX outbox_published_at ON outbox (published_at)
    WHERE status = 'published';

-- (consumer, message id) pairs processed or dead-lettered: the inbox key.
CREATE TABLE inbox (
    consumer     TEXT    NOT NULL,
    message_id   TEXT    NOT NULL,
    processed_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, message_id)
) WITHOUT ROWID;

-- Failed attempts per (consumer, message id), kept across redeliveries and crashes.
CREATE TABLE inbox_failures (
    consumer   TEXT    NOT NULL,
    message_id TEXT    NOT NULL,
    attempts   INTEGER NOT NULL,
    last_error TEXT    NOT NULL,
    PRIMARY KEY (consumer, message_id)
) WITHOUT ROWID;

-- Messages a consumer gave up on, oldest first.
CREATE TABLE inbox_dead_letters (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    consumer   TEXT    NOT NULL,
    message_id TEXT    NOT NULL,
    source     TEXT    NOT NULL,
    payload    BLOB    NOT NULL,
    headers    TEXT    NOT NULL,
    attempts   INTEGER NOT NULL,
    last_error TEXT    NOT NULL,
    dead_at    INTEGER NOT NULL,
    CONSTRAINT inbox_dead_letters_unique UNIQUE (consumer, message_id)
);
