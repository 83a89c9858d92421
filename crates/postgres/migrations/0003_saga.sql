-- Durable saga instances, their append-only timelines and the replies they
-- took (the orchestrator's inbox). Every time (due_at, lease expiry,
-- history, created/updated) is the database's now(); outgoing commands go to
-- vextrus_outbox in the same transaction as the transition that sends them.
CREATE TABLE IF NOT EXISTS vextrus_sagas (
    id               uuid        PRIMARY KEY,
    saga_type        text        NOT NULL,
    version          integer     NOT NULL CHECK (version >= 1),
    state            text        NOT NULL
                     CHECK (state IN ('running', 'compensating', 'completed', 'compensated',
                                      'compensation_failed', 'failed')),
    data             jsonb       NOT NULL,
    -- SagaProgress as the orchestrator wrote it (cursor, completed steps,
    -- compensations, the call in flight, the trace context).
    progress         jsonb       NOT NULL,
    last_error       text,
    due_at           timestamptz,
    lease_owner      text,
    lease_expires_at timestamptz,
    fencing_token    bigint      NOT NULL DEFAULT 0,
    -- The last history sequence number written.
    history_seq      bigint      NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- What workers poll: non-terminal sagas by due time.
CREATE INDEX IF NOT EXISTS vextrus_sagas_due ON vextrus_sagas (due_at)
    WHERE due_at IS NOT NULL AND state NOT IN ('completed', 'compensated', 'failed');
-- `vextrus saga list`: oldest first, by type.
CREATE INDEX IF NOT EXISTS vextrus_sagas_created ON vextrus_sagas (created_at, id);
CREATE INDEX IF NOT EXISTS vextrus_sagas_type_state ON vextrus_sagas (saga_type, state);

CREATE TABLE IF NOT EXISTS vextrus_saga_history (
    saga_id uuid        NOT NULL REFERENCES vextrus_sagas (id),
    seq     bigint      NOT NULL,
    at      timestamptz NOT NULL DEFAULT now(),
    worker  text,
    event   jsonb       NOT NULL,
    PRIMARY KEY (saga_id, seq)
);

CREATE TABLE IF NOT EXISTS vextrus_saga_inbox (
    message_id uuid        PRIMARY KEY,
    saga_id    uuid        NOT NULL,
    handled_at timestamptz NOT NULL DEFAULT now()
);
