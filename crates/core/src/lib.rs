//! # vextrus-core
//!
//! The event store's traits and types, one trait per capability
//! ([`EventAppender`], [`EventReader`], [`SnapshotStore`], [`CheckpointStore`],
//! [`SubscriptionSource`], [`ProjectionBackend`]), and the [`Projection`]
//! contract. Backends live in their own crates (`vextrus-sqlite`,
//! `vextrus-postgres`); every backend runs the conformance suite in
//! `vextrus-testkit`.

pub mod error;
pub mod inbox;
pub mod memory;
pub mod outbox;
pub mod projection;
pub mod repository;
pub mod saga;
pub mod store;
pub mod subscription;
pub mod transport;
pub mod types;
pub mod unit_of_work;
pub mod upcast;

pub use error::{BoxError, EventStoreError, Result};
pub use memory::{InMemoryEventStore, InMemoryTransaction};
pub use projection::{BatchReport, Projection, ProjectionLag, ProjectionRunner};
pub use repository::{EventSourcedRepository, SnapshotPolicy};
pub use store::{
    CheckpointStore, DEFAULT_MAX_PAYLOAD_BYTES, EventAppender, EventReader, EventStream,
    ProjectionBackend, SnapshotStore, SubscriptionSource, WakeUps,
};
pub use subscription::{Subscription, SubscriptionOptions, read_log};
pub use types::{
    AppendResult, EventFilter, ExpectedVersion, GlobalPage, GlobalPosition, NewEvent,
    ReadDirection, ReadStreamOptions, RecordedEvent, Snapshot, StreamFilter, StreamId,
    validate_batch,
};
pub use upcast::{UpcasterRegistry, Upcasting};
