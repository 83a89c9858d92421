-- Shipping: one shipment per order.
CREATE TABLE shipping_shipments (
    order_id    TEXT PRIMARY KEY,
    shipment_id TEXT NOT NULL UNIQUE,
    items       TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('created', 'cancelled'))
);
