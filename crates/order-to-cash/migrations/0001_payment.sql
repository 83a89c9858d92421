-- Payment: one payment per order, amounts in minor units of its currency.
CREATE TABLE payment_payments (
    order_id        TEXT   PRIMARY KEY,
    payment_id      TEXT   NOT NULL UNIQUE,
    currency        TEXT   NOT NULL,
    amount_minor    BIGINT NOT NULL CHECK (amount_minor > 0),
    state           TEXT   NOT NULL CHECK (state IN ('authorized', 'voided', 'captured', 'refunded', 'settled')),
    captured_minor  BIGINT NOT NULL DEFAULT 0,
    refunded_minor  BIGINT NOT NULL DEFAULT 0,
    settled_minor   BIGINT NOT NULL DEFAULT 0
);

-- Declined authorizations are kept too, for the report.
CREATE TABLE payment_declines (
    order_id TEXT PRIMARY KEY,
    reason   TEXT NOT NULL
);
