-- A variant (not the store's): Exact(:v) checked with an EXISTS probe of
-- version :v instead of max(), and a plain INSERT (no ON CONFLICT; a
-- conflict would be a unique violation for the client to classify).
INSERT INTO vextrus_events (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
SELECT 'px-' || :run || '-' || :client_id, :v + 1, gen_random_uuid(), 'order.placed', 1,
       '{"order_id": "o-1", "customer": "c-42", "lines": [{"sku": "sku-1", "qty": 2, "price": "19.90"}], "total": "39.80"}',
       '{"event_id": "0190a0f0-0000-7000-8000-000000000000", "correlation_id": "0190a0f0-0000-7000-8000-000000000001", "tenant_id": "t-1", "actor": "u-1"}'
WHERE :v = 0 OR EXISTS (SELECT 1 FROM vextrus_events e
                        WHERE e.stream_id = 'px-' || :run || '-' || :client_id AND e.stream_version = :v)
RETURNING position, transaction_id::text::bigint, stream_version AS v \gset
