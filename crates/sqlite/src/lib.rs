//! # vextrus-sqlite
//!
//! The vextrus event store on SQLite, the embedded default: every trait of
//! `vextrus-core` ([`vextrus_core::EventAppender`], [`vextrus_core::EventReader`],
//! [`vextrus_core::SnapshotStore`], [`vextrus_core::CheckpointStore`],
//! [`vextrus_core::SubscriptionSource`], [`vextrus_core::ProjectionBackend`]) on
//! one SQLite file in WAL mode.
//!
//! - **Appends** run in `BEGIN IMMEDIATE` transactions, so writers take turns
//!   and the expected-version check and the insert are atomic. One append is
//!   one transaction with multi-row `INSERT`s.
//! - **The global log is gap-free**: SQLite has a single writer, and the
//!   write lock is held from `BEGIN IMMEDIATE` to `COMMIT`, so positions are
//!   assigned in commit order; a reader's snapshot is always a prefix of the
//!   log, and a reader that checkpoints the last position it saw never skips
//!   an event that commits later. (PostgreSQL needs the `(xid, position)`
//!   ordering for this; here commit order *is* position order, so
//!   [`vextrus_core::GlobalPosition`]'s `commit` equals its `position`.)
//! - **Unit of work**: [`SqliteEventStore::begin`] +
//!   [`SqliteEventStore::append_in_tx`] (and the snapshot and checkpoint
//!   `*_in_tx` methods) write inside a transaction the caller owns, next to
//!   the service's own SQL.
//! - **Projections** get the `BEGIN IMMEDIATE` transaction their checkpoint is
//!   stored in, and write their read model through it.
//! - **Subscriptions** poll (and are woken at once by appends made through
//!   the same store in this process).
//! - **Outbox and inbox**: [`SqliteOutbox`] implements every outbox trait
//!   of `vextrus-core` (claims with leases and per-key order in `BEGIN
//!   IMMEDIATE` transactions, judged by the database clock; dead letters,
//!   replay, discard, retention, status), the inbox store, and the unit of
//!   work ([`SqliteUnitOfWorkTx`]): events, outbox messages, inbox entries
//!   and the service's own SQL commit together or not at all.
//! - **Migrations** are versioned `.sql` files applied by
//!   [`SqliteEventStore::migrate`]; applying them twice is harmless.

pub mod any;
mod inbox;
pub mod migrate;
mod outbox;
pub mod saga;
mod store;
mod unit_of_work;

pub use outbox::{MAX_PER_KEY_IN_BATCH, OUTBOX_MIGRATION, SqliteOutbox};
pub use store::SqliteEventStore;
pub use unit_of_work::SqliteUnitOfWorkTx;
