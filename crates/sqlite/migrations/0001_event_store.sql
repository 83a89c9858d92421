-- The event store on SQLite.
--
-- `position` is the global log's order. SQLite has one writer at a time and
-- every append runs in a `BEGIN IMMEDIATE` transaction, so positions are
-- assigned in commit order: a reader's snapshot always holds a prefix of the
-- log, and a reader that checkpoints a position never skips a row that
-- commits later. AUTOINCREMENT keeps positions from ever being reused.
CREATE TABLE events (
    position       INTEGER PRIMARY KEY AUTOINCREMENT,
    stream_id      TEXT    NOT NULL,
    category       TEXT    NOT NULL,
    stream_version INTEGER NOT NULL CHECK (stream_version >= 1),
    event_id       TEXT    NOT NULL,
    event_type     TEXT    NOT NULL,
    schema_version INTEGER NOT NULL CHECK (schema_version >= 1),
    payload        TEXT    NOT NULL,
    metadata       TEXT    NOT NULL,
    recorded_at    TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    CONSTRAINT events_stream_version_unique UNIQUE (stream_id, stream_version),
    CONSTRAINT events_event_id_unique UNIQUE (event_id)
);

CREATE INDEX events_category_position ON events (category, position);

CREATE TABLE snapshots (
    stream_id        TEXT    PRIMARY KEY,
    stream_version   INTEGER NOT NULL,
    snapshot_version INTEGER NOT NULL,
    state            TEXT    NOT NULL,
    taken_at         TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) WITHOUT ROWID;

CREATE TABLE checkpoints (
    name       TEXT    PRIMARY KEY,
    commit_key INTEGER NOT NULL,
    position   INTEGER NOT NULL,
    updated_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) WITHOUT ROWID;
