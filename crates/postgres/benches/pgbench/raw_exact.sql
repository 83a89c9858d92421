-- Raw baseline for the exact-expectation scripts: one autocommit single-row
-- INSERT at the client's next version (:v, starting at -D v=0), same row shape.
INSERT INTO raw_events (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
VALUES ('rx-' || :run || '-' || :client_id, :v + 1, gen_random_uuid(), 'order.placed', 1,
        '{"order_id": "o-1", "customer": "c-42", "lines": [{"sku": "sku-1", "qty": 2, "price": "19.90"}], "total": "39.80"}',
        '{"event_id": "0190a0f0-0000-7000-8000-000000000000", "correlation_id": "0190a0f0-0000-7000-8000-000000000001", "tenant_id": "t-1", "actor": "u-1"}');
\set v :v + 1
