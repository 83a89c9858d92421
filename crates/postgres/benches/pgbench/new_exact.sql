-- The store's single-event statement (schema version 5) as the Rust bench
-- drives it: ExpectedVersion::Exact(:v), the client's last version, kept in
-- :v by \gset from RETURNING (pgbench variables persist per client).
WITH cur AS (SELECT coalesce(max(e.stream_version), 0) AS v FROM vextrus_events e WHERE e.stream_id = 'nx-' || :run || '-' || :client_id)
INSERT INTO vextrus_events (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
SELECT 'nx-' || :run || '-' || :client_id, cur.v + 1, gen_random_uuid(), 'order.placed', 1,
       '{"order_id": "o-1", "customer": "c-42", "lines": [{"sku": "sku-1", "qty": 2, "price": "19.90"}], "total": "39.80"}',
       '{"event_id": "0190a0f0-0000-7000-8000-000000000000", "correlation_id": "0190a0f0-0000-7000-8000-000000000001", "tenant_id": "t-1", "actor": "u-1"}'
FROM cur WHERE CASE WHEN :v = -1 THEN true WHEN :v = -3 THEN cur.v > 0 ELSE cur.v = :v END
ON CONFLICT DO NOTHING
RETURNING position, transaction_id::text::bigint, stream_version AS v \gset
