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
-- transaction id is below the oldest still-running transaction of this
-- database (vextrus_log_horizon()): such rows can no longer be joined by
-- earlier ones.
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

-- The global log's read horizon: every row whose transaction id is below it
-- is final (its transaction committed and is visible, or rolled back), and
-- every transaction that can still add rows has an id at or above it.
--
-- It is the oldest transaction still running in the statement's snapshot,
-- ignoring transactions that pg_stat_activity shows running in *another*
-- database (they cannot write this database's log; transaction ids are
-- cluster-wide, so without this a long transaction anywhere on the server
-- would hold every reader back). A running transaction that cannot be
-- placed (it finished between the snapshot and the look-up, or is a
-- prepared transaction) counts as this database's, so the horizon only ever
-- errs towards waiting; `unplaced` says so, and readers then ask again.
-- STABLE, so it sees the caller's snapshot.
--
-- PL/pgSQL (its plans are cached per session) reading
-- pg_stat_get_activity() directly; it returns at once when no transaction
-- is running.
CREATE OR REPLACE FUNCTION vextrus_log_horizon(OUT horizon xid8, OUT unplaced boolean)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    snap       pg_snapshot := pg_current_snapshot();
    db         oid;
    v_xid      xid8;
    v_unplaced boolean;
BEGIN
    horizon := pg_snapshot_xmax(snap);
    unplaced := false;
    IF pg_snapshot_xmin(snap) = horizon THEN
        RETURN; -- nothing running
    END IF;
    SELECT d.oid INTO db FROM pg_database d WHERE d.datname = current_database();
    SELECT x.xid, a.backend_xid IS NULL
      INTO v_xid, v_unplaced
      FROM pg_snapshot_xip(snap) AS x(xid)
      LEFT JOIN (SELECT s.backend_xid, s.datid
                   FROM pg_stat_get_activity(NULL) AS s
                  WHERE s.backend_xid IS NOT NULL) AS a
        ON a.backend_xid = xid(x.xid)
     WHERE NOT (a.backend_xid IS NOT NULL AND a.datid IS NOT NULL
                AND a.datid <> 0 AND a.datid <> db)
     ORDER BY x.xid
     LIMIT 1;
    IF FOUND THEN
        horizon := v_xid;
        unplaced := v_unplaced;
    END IF;
END;
$$;

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

-- Classifies a batch some of whose event ids are already stored (the same
-- rules as the in-memory backend):
-- - the first id is stored in another stream: partial duplicate (outcome 3);
-- - it is stored in this stream, but an exact expectation (p_expected >= 0,
--   or -2 = no stream = 0) would put the batch elsewhere: wrong expected
--   version (outcome 1, with the stream's current version);
-- - every id is stored at consecutive versions from there: idempotent
--   re-append (outcome 2, with the original result);
-- - otherwise: partial duplicate with the first id out of place.
CREATE OR REPLACE FUNCTION vextrus_classify_duplicate(
    p_stream_id text,
    p_expected  bigint,
    p_event_ids uuid[]
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
LANGUAGE plpgsql STABLE AS $$
DECLARE
    n       bigint := cardinality(p_event_ids);
    v_exact bigint := CASE WHEN p_expected >= 0 THEN p_expected
                           WHEN p_expected = -2 THEN 0 END;
    f       record;
    l       record;
    v_bad   uuid;
BEGIN
    SELECT e.stream_id AS sid, e.stream_version AS ver, e.position AS pos,
           e.transaction_id::text::bigint AS c
      INTO f
      FROM vextrus_events e WHERE e.event_id = p_event_ids[1];
    IF NOT FOUND THEN
        SELECT b.id INTO v_bad
          FROM unnest(p_event_ids) WITH ORDINALITY AS b(id, ord)
         WHERE EXISTS (SELECT 1 FROM vextrus_events e WHERE e.event_id = b.id)
         ORDER BY b.ord LIMIT 1;
        RETURN QUERY SELECT 3::smallint, NULL::bigint, NULL::bigint, NULL::bigint,
                            NULL::bigint, NULL::bigint, v_bad;
        RETURN;
    END IF;
    IF f.sid <> p_stream_id THEN
        RETURN QUERY SELECT 3::smallint, NULL::bigint, NULL::bigint, NULL::bigint,
                            NULL::bigint, NULL::bigint, p_event_ids[1];
        RETURN;
    END IF;
    IF v_exact IS NOT NULL AND f.ver <> v_exact + 1 THEN
        RETURN QUERY SELECT 1::smallint,
                            (SELECT s.version FROM vextrus_streams s WHERE s.stream_id = p_stream_id),
                            NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint, NULL::uuid;
        RETURN;
    END IF;
    SELECT b.id INTO v_bad
      FROM unnest(p_event_ids) WITH ORDINALITY AS b(id, ord)
      LEFT JOIN vextrus_events e
        ON e.stream_id = p_stream_id AND e.stream_version = f.ver + b.ord - 1
     WHERE e.event_id IS DISTINCT FROM b.id
     ORDER BY b.ord LIMIT 1;
    IF FOUND THEN
        RETURN QUERY SELECT 3::smallint, NULL::bigint, NULL::bigint, NULL::bigint,
                            NULL::bigint, NULL::bigint, v_bad;
        RETURN;
    END IF;
    SELECT e.stream_version AS ver, e.position AS pos, e.transaction_id::text::bigint AS c
      INTO l
      FROM vextrus_events e
     WHERE e.stream_id = p_stream_id AND e.stream_version = f.ver + n - 1;
    RETURN QUERY SELECT 2::smallint, l.ver, f.pos, f.c, l.pos, l.c, NULL::uuid;
END;
$$;

-- Appends a batch to a stream in one statement (one round trip):
-- idempotency check (optional, see p_check_ids), optimistic-concurrency
-- check on the stream row, the stream row update and the multi-row insert.
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
    p_notify          boolean,
    p_check_ids       boolean
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
    -- Callers that cannot retry (an append inside the caller's transaction,
    -- which a unique violation would abort) check for stored ids first; a
    -- pooled append skips the check and, on the unique violation of
    -- event_id, calls again with the check.
    IF p_check_ids
       AND EXISTS (SELECT 1 FROM vextrus_events e WHERE e.event_id = ANY (p_event_ids)) THEN
        RETURN QUERY SELECT * FROM vextrus_classify_duplicate(p_stream_id, p_expected, p_event_ids);
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
            RETURN QUERY SELECT * FROM vextrus_classify_duplicate(p_stream_id, p_expected, p_event_ids);
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
