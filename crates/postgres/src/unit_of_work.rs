//! The unit of work on PostgreSQL: one `sqlx::Transaction` in which a
//! command appends events, enqueues outbox messages, records inbox entries
//! and runs the service's own SQL.

use sqlx::{Postgres, Transaction};
use vextrus_core::outbox::{OutboxError, OutboxResult};
use vextrus_core::transport::{MessageId, OutboundMessage};
use vextrus_core::unit_of_work::{InboxRecord, UnitOfWork};
use vextrus_core::{ExpectedVersion, NewEvent, StreamId};

use crate::inbox::record_inbox_on;
use crate::outbox::{PgOutbox, check_batch, enqueue_on, map_out};
use crate::store::NotifyMode;

/// The transaction is the driver's own `sqlx::Transaction<'static,
/// Postgres>`: the service runs its SQL on it directly (`&mut *tx`), and
/// dropping it without [`UnitOfWork::commit`] rolls everything back.
/// Committing through [`UnitOfWork::commit`] also wakes relay workers and
/// event subscribers; a transaction committed by hand should be followed by
/// [`PgOutbox::notify_relays`] (else relays see it at their next poll).
///
/// ```no_run
/// use serde_json::json;
/// use vextrus_core::transport::OutboundMessage;
/// use vextrus_core::unit_of_work::UnitOfWork;
/// use vextrus_core::{ExpectedVersion, NewEvent, StreamId};
/// use vextrus_kernel::EventMetadata;
/// use vextrus_postgres::{PgEventStore, PgOutbox};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let uow = PgOutbox::new(PgEventStore::connect("postgres://postgres@127.0.0.1:5432/test").await?);
/// uow.migrate().await?;
/// let meta = EventMetadata::new();
/// let mut tx = uow.begin().await?;
/// uow.append_in_tx(&mut tx, &StreamId::new("order-1")?, ExpectedVersion::NoStream,
///     &[NewEvent::new("order.placed", json!({}), meta.clone())]).await?;
/// uow.enqueue_in_tx(&mut tx, &[OutboundMessage::cloud_events(
///     "orders", "order-1", "order.placed", 1, "svc", b"{}".to_vec(), &meta)]).await?;
/// sqlx::query("UPDATE stock SET reserved = reserved + 1 WHERE sku = 'A'")
///     .execute(&mut *tx).await?;
/// uow.commit(tx).await?; // all of it, or (on error or drop) none of it
/// # Ok(()) }
/// ```
impl UnitOfWork for PgOutbox {
    type Transaction = Transaction<'static, Postgres>;

    async fn begin(&self) -> OutboxResult<Self::Transaction> {
        self.pool().begin().await.map_err(map_out)
    }

    async fn commit(&self, tx: Self::Transaction) -> OutboxResult<()> {
        tx.commit().await.map_err(map_out)?;
        self.notify_relays();
        if self.store.config().notify == NotifyMode::AfterCommit {
            self.store.notify_subscribers();
        }
        Ok(())
    }

    async fn append_in_tx(
        &self,
        tx: &mut Self::Transaction,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> OutboxResult<()> {
        self.store
            .append_in_tx(tx, stream_id, expected, events)
            .await
            .map_err(OutboxError::from)?;
        Ok(())
    }

    async fn enqueue_in_tx(
        &self,
        tx: &mut Self::Transaction,
        messages: &[OutboundMessage],
    ) -> OutboxResult<()> {
        check_batch(messages)?;
        enqueue_on(tx, messages).await
    }

    async fn record_inbox_in_tx(
        &self,
        tx: &mut Self::Transaction,
        consumer: &str,
        id: MessageId,
    ) -> OutboxResult<InboxRecord> {
        record_inbox_on(tx, consumer, id).await
    }
}
