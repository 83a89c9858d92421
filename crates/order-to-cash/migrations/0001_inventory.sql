-- Inventory: stock per SKU and reservations per (order, SKU).
-- Conservation: initial = on_hand + reserved + shipped, always.
CREATE TABLE inventory_stock (
    sku      TEXT   PRIMARY KEY,
    initial  BIGINT NOT NULL CHECK (initial >= 0),
    on_hand  BIGINT NOT NULL CHECK (on_hand >= 0),
    reserved BIGINT NOT NULL CHECK (reserved >= 0),
    shipped  BIGINT NOT NULL CHECK (shipped >= 0)
);

CREATE TABLE inventory_reservations (
    order_id TEXT   NOT NULL,
    sku      TEXT   NOT NULL REFERENCES inventory_stock (sku),
    quantity BIGINT NOT NULL CHECK (quantity > 0),
    state    TEXT   NOT NULL CHECK (state IN ('reserved', 'released', 'shipped')),
    PRIMARY KEY (order_id, sku)
);
