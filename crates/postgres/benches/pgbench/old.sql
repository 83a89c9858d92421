-- The previous single-event statement (schema version 1's version row), ExpectedVersion::Any.
WITH v AS (INSERT INTO old_streams AS s (stream_id, version) VALUES ('old-' || :client_id, 1)
           ON CONFLICT (stream_id) DO UPDATE SET version = s.version + 1 RETURNING s.version)
INSERT INTO old_events (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
SELECT 'old-' || :client_id, v.version, gen_random_uuid(), 'order.placed', 1,
       '{"order_id": "o-1", "customer": "c-42", "lines": [{"sku": "sku-1", "qty": 2, "price": "19.90"}], "total": "39.80"}',
       '{"event_id": "0190a0f0-0000-7000-8000-000000000000", "correlation_id": "0190a0f0-0000-7000-8000-000000000001", "tenant_id": "t-1", "actor": "u-1"}'
FROM v
RETURNING position, transaction_id::text::bigint, stream_version;
