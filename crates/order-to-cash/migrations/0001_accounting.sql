-- Accounting: a double-entry journal. Every entry's lines balance per
-- currency (checked before insert); reversals point at what they reverse.
CREATE TABLE accounting_entries (
    entry_id  TEXT PRIMARY KEY,
    order_id  TEXT NOT NULL,
    kind      TEXT NOT NULL CHECK (kind IN ('invoice', 'settlement', 'reversal')),
    reverses  TEXT REFERENCES accounting_entries (entry_id),
    memo      TEXT NOT NULL
);

CREATE INDEX accounting_entries_order ON accounting_entries (order_id);
CREATE UNIQUE INDEX accounting_entries_one_reversal ON accounting_entries (reverses);

CREATE TABLE accounting_lines (
    entry_id     TEXT   NOT NULL REFERENCES accounting_entries (entry_id),
    line_no      BIGINT NOT NULL,
    account      TEXT   NOT NULL,
    currency     TEXT   NOT NULL,
    debit_minor  BIGINT NOT NULL CHECK (debit_minor >= 0),
    credit_minor BIGINT NOT NULL CHECK (credit_minor >= 0),
    PRIMARY KEY (entry_id, line_no)
);
