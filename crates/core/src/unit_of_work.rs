//! The unit of work: one database transaction in which a command handler
//! appends events, enqueues outbox messages, records inbox entries and runs
//! its own writes. Commit makes all of them visible at once; dropping the
//! transaction (or a failed commit) leaves none of them.
//!
//! Everything takes `&mut Self::Transaction`. On SQL backends the
//! transaction is the driver's (for example `sqlx::Transaction<'static,
//! Postgres>`), so the service's own SQL runs on it directly; in memory it
//! is [`InMemoryUnitOfWorkTx`](crate::outbox::InMemoryUnitOfWorkTx), which
//! stages JSON documents.
//!
//! ```
//! use serde_json::json;
//! use vextrus_core::outbox::{InMemoryOutbox, OutboxStore};
//! use vextrus_core::transport::OutboundMessage;
//! use vextrus_core::unit_of_work::UnitOfWork;
//! use vextrus_core::{ExpectedVersion, NewEvent, StreamId};
//! use vextrus_kernel::EventMetadata;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let uow = InMemoryOutbox::new();
//! let stream = StreamId::new("order-1").unwrap();
//! let meta = EventMetadata::new();
//! let msg = OutboundMessage::cloud_events("orders", "order-1", "order.placed", 1, "svc", b"{}".to_vec(), &meta);
//!
//! let mut tx = uow.begin().await.unwrap();
//! uow.append_in_tx(&mut tx, &stream, ExpectedVersion::NoStream,
//!     &[NewEvent::new("order.placed", json!({}), meta)]).await.unwrap();
//! uow.enqueue_in_tx(&mut tx, &[msg.clone()]).await.unwrap();
//! tx.put("orders", "order-1", json!({"status": "placed"}));
//! uow.commit(tx).await.unwrap();
//!
//! assert_eq!(uow.event_store().len(), 1);
//! assert!(uow.get(msg.id).await.unwrap().is_some());
//! assert_eq!(uow.document("orders", "order-1"), Some(json!({"status": "placed"})));
//! # });
//! ```

use crate::outbox::OutboxResult;
use crate::transport::{MessageId, OutboundMessage};
use crate::types::{ExpectedVersion, NewEvent, StreamId};

/// Whether an inbox entry is new in this transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxRecord {
    /// First time this consumer sees the message: run the handler.
    New,
    /// Already processed (or dead-lettered) by this consumer: skip and ack.
    Duplicate,
}

/// One transaction over the event store, the outbox, the inbox and the
/// service's own data. Rollback is dropping the transaction.
pub trait UnitOfWork: Send + Sync {
    /// The open transaction. Dropping it without [`UnitOfWork::commit`]
    /// rolls everything back.
    type Transaction: Send;

    /// Begins a transaction.
    fn begin(&self) -> impl Future<Output = OutboxResult<Self::Transaction>> + Send;

    /// Commits everything done in `tx`, atomically. On error nothing of it
    /// is visible.
    fn commit(&self, tx: Self::Transaction) -> impl Future<Output = OutboxResult<()>> + Send;

    /// Appends events to a stream inside `tx`, with the event store's
    /// expected-version and validation rules. A conflict may be reported
    /// here or at commit.
    fn append_in_tx(
        &self,
        tx: &mut Self::Transaction,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> impl Future<Output = OutboxResult<()>> + Send;

    /// Enqueues outbox messages inside `tx`, in order (validated like
    /// [`crate::outbox::OutboxStore::enqueue`]). The relay sees them only
    /// after commit.
    fn enqueue_in_tx(
        &self,
        tx: &mut Self::Transaction,
        messages: &[OutboundMessage],
    ) -> impl Future<Output = OutboxResult<()>> + Send;

    /// Records that `consumer` processed message `id`, inside `tx`.
    /// [`InboxRecord::Duplicate`] if it already did (committed); a
    /// concurrent transaction recording the same pair makes one of the two
    /// commits fail with [`crate::outbox::OutboxError::DuplicateMessage`].
    fn record_inbox_in_tx(
        &self,
        tx: &mut Self::Transaction,
        consumer: &str,
        id: MessageId,
    ) -> impl Future<Output = OutboxResult<InboxRecord>> + Send;
}
