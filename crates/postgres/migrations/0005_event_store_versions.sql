-- vextrus event store, schema version 5: a stream's version is read from
-- its events, not kept in a row of its own.
--
-- Until now every append checked and bumped the stream's row in
-- `vextrus_streams` (a second heap row written and locked per append). Now
-- the events' own unique key `(stream_id, stream_version)` does that work:
-- an append reads the stream's current version as
-- `max(stream_version)` (one backward step of that index), inserts its
-- first event at the next version only when that version is the one
-- expected, with `ON CONFLICT DO NOTHING`, and inserts the rest of its
-- batch only if the first event went in. Two appends racing at one version
-- both read n; one inserts n + 1, the other's insert meets that row (it
-- waits for the winner's transaction to end) and writes nothing. Versions
-- stay contiguous because an event only ever goes in at max + 1.
--
-- Every append path (the single-event statement, batches, appends inside a
-- caller's transaction) uses this rule; `vextrus_streams` and the function
-- `vextrus_append` (which used it) are dropped, so that a process still
-- running the old code fails loudly instead of appending by the old rule.
-- The stream table only ever mirrored max(stream_version) of each stream,
-- so nothing is lost. Applying this twice is harmless.

DROP FUNCTION IF EXISTS vextrus_append(text, bigint, uuid[], text[], integer[], jsonb[], jsonb[], boolean, boolean);
DROP TABLE IF EXISTS vextrus_streams;

-- Classifies a batch some of whose event ids are already stored (the same
-- rules as the in-memory backend; as in schema version 1, but the stream's
-- version comes from its events):
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
                            (SELECT max(e.stream_version) FROM vextrus_events e
                              WHERE e.stream_id = p_stream_id),
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

-- Why an append wrote nothing (called only then, off the hot path):
-- - one of the batch's ids is stored: as vextrus_classify_duplicate
--   (outcome 1 conflict, 2 idempotent re-append, 3 partial duplicate);
-- - otherwise the stream's current version (NULL: no stream) does not meet
--   the expectation: outcome 1, wrong expected version;
-- - or it does (the append lost a race to another one that has committed
--   since its snapshot, e.g. two `any` appends): outcome 4, try again.
--
-- p_expected: >= 1 exact version; 0 or -2 no stream; -1 any; -3 stream exists.
CREATE OR REPLACE FUNCTION vextrus_append_outcome(
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
    v_cur bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM vextrus_events e WHERE e.event_id = ANY (p_event_ids)) THEN
        RETURN QUERY SELECT * FROM vextrus_classify_duplicate(p_stream_id, p_expected, p_event_ids);
        RETURN;
    END IF;
    SELECT max(e.stream_version) INTO v_cur FROM vextrus_events e WHERE e.stream_id = p_stream_id;
    IF p_expected = -1
       OR (p_expected = -3 AND v_cur IS NOT NULL)
       OR ((p_expected = 0 OR p_expected = -2) AND v_cur IS NULL)
       OR (p_expected >= 1 AND v_cur = p_expected) THEN
        RETURN QUERY SELECT 4::smallint, v_cur, NULL::bigint, NULL::bigint,
                            NULL::bigint, NULL::bigint, NULL::uuid;
        RETURN;
    END IF;
    RETURN QUERY SELECT 1::smallint, v_cur, NULL::bigint, NULL::bigint,
                        NULL::bigint, NULL::bigint, NULL::uuid;
END;
$$;
