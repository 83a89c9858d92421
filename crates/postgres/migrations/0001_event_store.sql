-- vextrus event store, schema version 1.
--
-- Applied by `PgEventStore::migrate()` inside a transaction that holds an
-- advisory lock, and written so that running it again is harmless.

-- One row per stream: its current version. Appends take this row's lock, so
-- concurrent appends to one stream serialize and the version check is exact.
CREATE TABLE IF NOT EXISTS vextrus_streams (
    stream_id text PRIMARY KEY,
    version   bigint NOT NULL CHECK (version >= 1)
);

-- The global log. `position` is a sequence number taken at insert time;
-- `transaction_id` is the appending transaction's id. Transactions commit in
-- an order that the sequence does not follow, so readers order and
-- checkpoint by (transaction_id, position) and only read rows whose
-- transaction id is below the oldest still-running transaction
-- (pg_snapshot_xmin): such rows can no longer be joined by earlier ones.
CREATE TABLE IF NOT EXISTS vextrus_events (
    position       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id xid8        NOT NULL DEFAULT pg_current_xact_id(),
    stream_id      text        NOT NULL,
    stream_version bigint      NOT NULL CHECK (stream_version >= 1),
    event_id       uuid        NOT NULL,
    event_type     text        NOT NULL,
    schema_version integer     NOT NULL CHECK (schema_version >= 1),
    payload        jsonb       NOT NULL,
    metadata       jsonb       NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT vextrus_events_event_id_key UNIQUE (event_id),
    CONSTRAINT vextrus_events_stream_version_key UNIQUE (stream_id, stream_version)
);

CREATE INDEX IF NOT EXISTS vextrus_events_commit_order
    ON vextrus_events (transaction_id, position);

-- The latest snapshot of each stream.
CREATE TABLE IF NOT EXISTS vextrus_snapshots (
    stream_id        text PRIMARY KEY,
    stream_version   bigint      NOT NULL CHECK (stream_version >= 1),
    snapshot_version integer     NOT NULL,
    state            jsonb       NOT NULL,
    taken_at         timestamptz NOT NULL DEFAULT now()
);

-- Named checkpoints of subscribers and projections: a global position
-- (transaction id, position).
CREATE TABLE IF NOT EXISTS vextrus_checkpoints (
    name       text PRIMARY KEY,
    commit_id  bigint      NOT NULL,
    position   bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Which of a batch's event ids are already stored, and whether the batch is
-- an exact re-append: all ids stored in `p_stream_id` at consecutive versions
-- in batch order. Outcome 2 = idempotent re-append (with the original
-- result), 3 = partial duplicate (with the first offending id).
CREATE OR REPLACE FUNCTION vextrus_classify_duplicate(p_stream_id text, p_event_ids uuid[])
RETURNS TABLE (
    outcome           smallint,
    stream_version    bigint,
    first_position    bigint,
    first_commit      bigint,
    last_position     bigint,
    last_commit       bigint,
    conflict_event_id uuid
)
LANGUAGE sql STABLE AS $$
    WITH batch AS (
        SELECT b.id, b.ord
        FROM unnest(p_event_ids) WITH ORDINALITY AS b(id, ord)
    ), stored AS (
        SELECT b.ord, b.id, e.stream_id, e.stream_version, e.position, e.transaction_id
        FROM batch b
        LEFT JOIN vextrus_events e ON e.event_id = b.id
    ), first AS (
        SELECT * FROM stored WHERE ord = 1
    ), verdict AS (
        SELECT
            (SELECT f.stream_id = p_stream_id FROM first f)
            AND bool_and(s.stream_id IS NOT DISTINCT FROM p_stream_id
                         AND s.stream_version = (SELECT f.stream_version FROM first f) + s.ord - 1)
                AS exact
        FROM stored s
    )
    SELECT
        2::smallint,
        (SELECT max(s.stream_version) FROM stored s),
        (SELECT s.position FROM stored s WHERE s.ord = 1),
        (SELECT s.transaction_id::text::bigint FROM stored s WHERE s.ord = 1),
        (SELECT s.position FROM stored s ORDER BY s.ord DESC LIMIT 1),
        (SELECT s.transaction_id::text::bigint FROM stored s ORDER BY s.ord DESC LIMIT 1),
        NULL::uuid
    FROM verdict v WHERE v.exact
    UNION ALL
    SELECT
        3::smallint, NULL, NULL, NULL, NULL, NULL,
        (SELECT s.id FROM stored s WHERE s.stream_id IS NOT NULL ORDER BY s.ord LIMIT 1)
    FROM verdict v WHERE v.exact IS NOT TRUE
$$;

-- Appends a batch to a stream in one statement (one round trip):
-- idempotency check, optimistic-concurrency check on the stream row, the
-- stream row update and the multi-row insert.
--
-- p_expected: >= 1 exact version; 0 or -2 no stream; -1 any; -3 stream exists.
-- Outcomes: 0 appended, 1 wrong expected version (stream_version = actual
-- version or NULL for no stream), 2 idempotent re-append, 3 partial duplicate.
CREATE OR REPLACE FUNCTION vextrus_append(
    p_stream_id       text,
    p_expected        bigint,
    p_event_ids       uuid[],
    p_event_types     text[],
    p_schema_versions integer[],
    p_payloads        jsonb[],
    p_metadata        jsonb[],
    p_notify          boolean
)
RETURNS TABLE (
    outcome           smallint,
    stream_version    bigint,
    first_position    bigint,
    first_commit      bigint,
    last_position     bigint,
    last_commit       bigint,
    conflict_event_id uuid
)
LANGUAGE plpgsql AS $$
DECLARE
    n      bigint := cardinality(p_event_ids);
    v_new  bigint;
    v_first bigint;
    v_last  bigint;
    v_commit bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM vextrus_events e WHERE e.event_id = ANY (p_event_ids)) THEN
        RETURN QUERY SELECT * FROM vextrus_classify_duplicate(p_stream_id, p_event_ids);
        RETURN;
    END IF;

    IF p_expected = -1 THEN
        INSERT INTO vextrus_streams AS s (stream_id, version) VALUES (p_stream_id, n)
        ON CONFLICT (stream_id) DO UPDATE SET version = s.version + n
        RETURNING s.version INTO v_new;
    ELSIF p_expected = 0 OR p_expected = -2 THEN
        INSERT INTO vextrus_streams AS s (stream_id, version) VALUES (p_stream_id, n)
        ON CONFLICT (stream_id) DO NOTHING
        RETURNING s.version INTO v_new;
    ELSIF p_expected = -3 THEN
        UPDATE vextrus_streams AS s SET version = s.version + n
        WHERE s.stream_id = p_stream_id
        RETURNING s.version INTO v_new;
    ELSE
        UPDATE vextrus_streams AS s SET version = s.version + n
        WHERE s.stream_id = p_stream_id AND s.version = p_expected
        RETURNING s.version INTO v_new;
    END IF;

    IF v_new IS NULL THEN
        -- A concurrent append of this very batch may have committed while we
        -- waited for the stream row: that is a re-append, not a conflict.
        IF EXISTS (SELECT 1 FROM vextrus_events e WHERE e.event_id = ANY (p_event_ids)) THEN
            RETURN QUERY SELECT * FROM vextrus_classify_duplicate(p_stream_id, p_event_ids);
            RETURN;
        END IF;
        RETURN QUERY
            SELECT 1::smallint,
                   (SELECT s.version FROM vextrus_streams s WHERE s.stream_id = p_stream_id),
                   NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint, NULL::uuid;
        RETURN;
    END IF;

    WITH ins AS (
        INSERT INTO vextrus_events
            (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
        SELECT p_stream_id, v_new - n + b.ord, b.id, b.t, b.sv, b.p, b.m
        FROM unnest(p_event_ids, p_event_types, p_schema_versions, p_payloads, p_metadata)
             WITH ORDINALITY AS b(id, t, sv, p, m, ord)
        ORDER BY b.ord
        RETURNING position
    )
    SELECT min(ins.position), max(ins.position) INTO v_first, v_last FROM ins;

    IF p_notify THEN
        PERFORM pg_notify('vextrus_events', '');
    END IF;

    v_commit := pg_current_xact_id()::text::bigint;
    RETURN QUERY SELECT 0::smallint, v_new, v_first, v_commit, v_last, v_commit, NULL::uuid;
END;
$$;
