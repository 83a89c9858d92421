-- The store's single-event statement (schema version 5), ExpectedVersion::Any.
WITH cur AS (SELECT coalesce(max(e.stream_version), 0) AS v FROM vextrus_events e WHERE e.stream_id = 'new-' || :client_id)
INSERT INTO vextrus_events (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
SELECT 'new-' || :client_id, cur.v + 1, gen_random_uuid(), 'order.placed', 1,
       '{"order_id": "o-1", "customer": "c-42", "lines": [{"sku": "sku-1", "qty": 2, "price": "19.90"}], "total": "39.80"}',
       '{"event_id": "0190a0f0-0000-7000-8000-000000000000", "correlation_id": "0190a0f0-0000-7000-8000-000000000001", "tenant_id": "t-1", "actor": "u-1"}'
FROM cur WHERE CASE WHEN -1 = -1 THEN true ELSE cur.v = -1 END
ON CONFLICT DO NOTHING
RETURNING position, transaction_id::text::bigint, stream_version;
