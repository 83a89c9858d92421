-- Shared by every participant's store: the migrator's record and the
-- idempotency keys (key -> fingerprint of the request -> stored reply).
-- Created if missing, so participants can share one PostgreSQL database.
CREATE TABLE IF NOT EXISTS o2c_migrations (
    participant TEXT   NOT NULL,
    version     BIGINT NOT NULL,
    name        TEXT   NOT NULL,
    checksum    TEXT   NOT NULL,
    PRIMARY KEY (participant, version)
);

CREATE TABLE IF NOT EXISTS o2c_idempotency (
    participant TEXT NOT NULL,
    idem_key    TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    reply       TEXT,
    PRIMARY KEY (participant, idem_key)
);
