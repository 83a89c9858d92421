-- vextrus outbox headers as `json`, schema version 7.
--
-- The relay reads every claimed row's headers as text. Stored as `jsonb`,
-- each read converted the binary form back to text: for a claim of 4,096
-- rows with CloudEvents headers that was ~10 ms of the statement's ~40 ms.
-- `json` keeps the text as written, so reading it is a copy, and writing it
-- only validates it. The outbox never queries inside headers on its hot
-- paths (the saga store's operator query uses `->>`, which `json` has).
--
-- Rewrites the table once (an exclusive lock for its duration: the outbox
-- is small when the relays keep up, and retention removes published rows).
-- Applied inside a transaction holding the migrator's advisory lock;
-- harmless to run again (a `json` column is left as it is).

DO $$
BEGIN
    IF (SELECT data_type FROM information_schema.columns
         WHERE table_schema = current_schema()
           AND table_name = 'vextrus_outbox' AND column_name = 'headers') = 'jsonb' THEN
        ALTER TABLE vextrus_outbox ALTER COLUMN headers TYPE json USING headers::json;
    END IF;
END
$$;
