//! # vextrus-postgres
//!
//! The vextrus event store on PostgreSQL (13 or later): [`PgEventStore`]
//! implements every capability trait of `vextrus-core` and runs the
//! conformance suite of `vextrus-testkit`.
//!
//! ## Schema
//!
//! Versioned SQL files under `migrations/`, applied by
//! [`PgEventStore::migrate`] (also `vextrus migrate --database-url ...`):
//! `vextrus_events` (the global log; a stream's version is its last
//! event's), `vextrus_snapshots`, `vextrus_checkpoints`, and the function
//! `vextrus_append_outcome` that explains an append which wrote nothing.
//!
//! ## Appends: one round trip
//!
//! An append is one plain statement. Its CTE reads the stream's current
//! version from the events' own unique `(stream_id, stream_version)` index
//! (`max(stream_version)`), and it inserts the first event at the next
//! version only when that version is the one expected, with `ON CONFLICT DO
//! NOTHING`; a batch's other events follow (from arrays, with `unnest`) only
//! if the first went in. Two appends racing at one version both read n; one
//! inserts n + 1, the other's insert meets that row, waits for the winner's
//! transaction and writes nothing, so versions stay contiguous without a
//! second row per stream. A pooled single event at an exact expectation n
//! (the usual command-handler append) probes version n by key instead of
//! reading the maximum and inserts n + 1 with a plain `INSERT` (cheaper
//! than `ON CONFLICT` on the server); the race's loser gets a unique
//! violation that ends only its own autocommit statement and is handled as
//! "nothing written". Only when nothing was written does a function
//! (`vextrus_append_outcome`) tell a typed conflict (with the actual
//! version) from an idempotent re-append or a partial duplicate; an `Any`
//! or `StreamExists` append that merely lost a race tries again. Every path
//! (pooled single events and batches, [`PgEventStore::append_in_tx`])
//! follows this one rule. A unique violation (SQLSTATE 23505) becomes a
//! typed error, never a string match.
//!
//! ## The global log never skips an event
//!
//! A `bigint` identity hands out positions at insert time, but transactions
//! commit in another order: a transaction holding position 7 may commit
//! after one holding 8. A reader that checkpointed 8 would never see 7. So
//! every row stores its transaction's id (`xid8`); readers order and
//! checkpoint by `(transaction id, position)` ([`vextrus_core::GlobalPosition`]
//! `{ commit, position }`) and read only rows whose transaction id is below
//! a horizon: the oldest transaction still running in the reading
//! statement's snapshot (`pg_snapshot_xip(pg_current_snapshot())`), leaving
//! out transactions that `pg_stat_activity` shows running in another
//! database (transaction ids are cluster-wide, but only this database's
//! transactions can write its log; one that cannot be placed counts as this
//! database's). Every transaction below that horizon has finished, and every
//! transaction that can still commit has a larger id than anything read.
//!
//! The cost: while a transaction of this database that started before an
//! event's is open, readers of the global log wait for it (appends and
//! stream reads do not). A rolled-back transaction stops holding readers the
//! moment it rolls back. The contract that bounds the wait:
//! **a transaction that appends must finish within
//! [`PgStoreConfig::max_append_transaction`] of its start** (default 5 s).
//! When a reader finds the horizon held by a transaction of this database
//! that has written to `vextrus_events` (it holds the table's
//! `RowExclusiveLock`) and started longer ago than that, it ends the
//! holder's session (`pg_terminate_backend`), whatever pool or client it
//! belongs to and whether it is idle or running statements: the holder's
//! client gets an error and its transaction rolls back, so nothing it wrote
//! ever appears and nothing is skipped. A subscriber is thus stalled at most
//! the bound plus one poll (BENCHMARKS.md reports the stall measured). The
//! reading role must be allowed to signal the holder (the same role, a
//! superuser, or `pg_signal_backend`). In addition
//! [`PgStoreConfig::idle_in_transaction_timeout`] makes the server itself
//! end a session of the store's own pool that sits idle inside a
//! transaction. A transaction that holds a transaction id but never wrote
//! to the log (a projection's or another table's writer) is not ended — it
//! could still be serving its purpose — and holds readers until it ends or
//! the server's own settings (`idle_in_transaction_session_timeout`,
//! `statement_timeout`, `transaction_timeout` on 17+) end it; keep such
//! transactions short.
//!
//! ## Appends: single events
//!
//! A single-event pooled append (without [`NotifyMode::InTransaction`]) is
//! one plain statement instead of the function: a CTE checks and bumps the
//! stream row, the `INSERT` takes its version. Only when it writes nothing
//! (the stream is not at the expected version) does the function run, to
//! classify the outcome.

//! ## Subscriptions and projections
//!
//! After a pooled append commits, the store sends `NOTIFY vextrus_events`
//! from a background task, one at a time, so that concurrent appends share
//! it ([`NotifyMode`]: notifying inside each append's own transaction would
//! serialize every appender's commit);
//! [`vextrus_core::SubscriptionSource::wake_ups`] LISTENs and wakes
//! subscribers, which also poll at their own interval. The projection
//! transaction is a plain `sqlx::Transaction<'static, Postgres>`: a handler
//! writes its read model with SQL through it and the checkpoint commits with
//! it.

pub mod any;
mod error;
mod inbox;
mod migrate;
mod notifier;
mod outbox;
mod projection;
mod saga;
mod store;
mod unit_of_work;

pub use migrate::{MIGRATIONS, Migration};
pub use outbox::{
    OUTBOX_HEADERS_MIGRATION, OUTBOX_LANES_MIGRATION, OUTBOX_MIGRATION, OUTBOX_NOTIFY_CHANNEL,
    PgOutbox,
};
pub use saga::{PgSagaStore, SAGA_MIGRATION};
pub use store::{
    NOTIFY_CHANNEL, NOTIFY_COALESCE, NotifyMode, PgEventStore, PgStoreConfig, ping_idle_connections,
};
