//! The unit of work on SQLite: events, outbox messages, inbox entries and
//! the service's own SQL in one `BEGIN IMMEDIATE` transaction.

use sqlx::SqliteConnection;
use vextrus_core::outbox::{OutboxError, OutboxResult, validate_outbound};
use vextrus_core::transport::{MessageId, OutboundMessage};
use vextrus_core::unit_of_work::{InboxRecord, UnitOfWork};
use vextrus_core::{ExpectedVersion, NewEvent, StreamId};
use vextrus_kernel::{ErrorKind, HasErrorKind};

use crate::outbox::{SqliteOutbox, WriteTx, db_err, db_now, enqueue_on};

/// An open unit-of-work transaction on [`SqliteOutbox`]: a `BEGIN
/// IMMEDIATE` transaction holding SQLite's write lock. Run the service's
/// own SQL on [`SqliteUnitOfWorkTx::conn`]; commit with
/// [`UnitOfWork::commit`]; dropping it rolls everything back.
///
/// SQLite has one writer, and this transaction holds the write lock until
/// it ends. So that a failed step does not keep every other writer waiting
/// until the caller drops it, an error from `append_in_tx`,
/// `enqueue_in_tx` or `record_inbox_in_tx` that reached the database
/// (anything but a validation error, which writes nothing) rolls the
/// transaction back at once; later steps and the commit then fail with
/// [`OutboxError::Backend`] (as a PostgreSQL transaction is aborted by a
/// failed statement).
///
/// ```
/// use serde_json::json;
/// use vextrus_core::outbox::OutboxStore;
/// use vextrus_core::transport::OutboundMessage;
/// use vextrus_core::unit_of_work::UnitOfWork;
/// use vextrus_core::{EventReader, ExpectedVersion, NewEvent, StreamId};
/// use vextrus_kernel::EventMetadata;
/// use vextrus_sqlite::SqliteOutbox;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let uow = SqliteOutbox::temporary().await.unwrap();
/// sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY, status TEXT NOT NULL)")
///     .execute(uow.pool()).await.unwrap();
/// let stream = StreamId::new("order-1").unwrap();
/// let meta = EventMetadata::new();
/// let msg = OutboundMessage::cloud_events("orders", "order-1", "order.placed", 1, "svc", b"{}".to_vec(), &meta);
///
/// let mut tx = uow.begin().await.unwrap();
/// uow.append_in_tx(&mut tx, &stream, ExpectedVersion::NoStream,
///     &[NewEvent::new("order.placed", json!({}), meta)]).await.unwrap();
/// uow.enqueue_in_tx(&mut tx, &[msg.clone()]).await.unwrap();
/// sqlx::query("INSERT INTO orders (id, status) VALUES ('order-1', 'placed')")
///     .execute(tx.conn().unwrap()).await.unwrap();
/// uow.commit(tx).await.unwrap();
///
/// assert_eq!(uow.event_store().stream_version(&stream).await.unwrap(), Some(1));
/// assert!(uow.get(msg.id).await.unwrap().is_some());
/// # });
/// ```
pub struct SqliteUnitOfWorkTx {
    tx: Option<WriteTx>,
    rolled_back: Option<String>,
    appended: bool,
    enqueued: bool,
}

impl std::fmt::Debug for SqliteUnitOfWorkTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteUnitOfWorkTx")
            .field("open", &self.tx.is_some())
            .field("rolled_back", &self.rolled_back)
            .field("appended", &self.appended)
            .field("enqueued", &self.enqueued)
            .finish()
    }
}

impl SqliteUnitOfWorkTx {
    /// The transaction's connection, for the service's own SQL
    /// (`.execute(tx.conn()?)`). [`OutboxError::Backend`] if an earlier
    /// step failed and rolled the transaction back.
    pub fn conn(&mut self) -> OutboxResult<&mut SqliteConnection> {
        match self.tx {
            Some(ref mut tx) => Ok(&mut **tx),
            None => Err(closed(self.rolled_back.as_deref())),
        }
    }

    /// Whether the transaction is still open (no step has failed).
    pub fn is_open(&self) -> bool {
        self.tx.is_some()
    }

    fn closed(&self) -> OutboxError {
        closed(self.rolled_back.as_deref())
    }

    /// Rolls back after a failed step unless the error wrote nothing.
    async fn fail(&mut self, err: OutboxError) -> OutboxError {
        if err.kind() != ErrorKind::Validation
            && let Some(tx) = self.tx.take()
        {
            self.rolled_back = Some(err.to_string());
            if let Err(e) = tx.rollback().await {
                tracing::warn!(error = %e, "rollback of a failed unit of work failed; the connection is dropped");
            }
        }
        err
    }
}

fn closed(reason: Option<&str>) -> OutboxError {
    OutboxError::Backend(
        format!(
            "the unit of work was rolled back after an earlier error: {}",
            reason.unwrap_or("already finished")
        )
        .into(),
    )
}

impl UnitOfWork for SqliteOutbox {
    type Transaction = SqliteUnitOfWorkTx;

    async fn begin(&self) -> OutboxResult<SqliteUnitOfWorkTx> {
        Ok(SqliteUnitOfWorkTx {
            tx: Some(self.begin_immediate().await?),
            rolled_back: None,
            appended: false,
            enqueued: false,
        })
    }

    async fn commit(&self, mut tx: SqliteUnitOfWorkTx) -> OutboxResult<()> {
        let Some(inner) = tx.tx.take() else {
            return Err(tx.closed());
        };
        inner.commit().await.map_err(db_err)?;
        if tx.appended {
            self.event_store().notify_committed();
        }
        if tx.enqueued {
            self.notify();
        }
        Ok(())
    }

    async fn append_in_tx(
        &self,
        tx: &mut SqliteUnitOfWorkTx,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> OutboxResult<()> {
        let result = self
            .event_store()
            .append_in_tx(tx.conn()?, stream_id, expected, events)
            .await
            .map_err(OutboxError::from);
        match result {
            Ok(_) => {
                tx.appended = true;
                Ok(())
            }
            Err(e) => Err(tx.fail(e).await),
        }
    }

    async fn enqueue_in_tx(
        &self,
        tx: &mut SqliteUnitOfWorkTx,
        messages: &[OutboundMessage],
    ) -> OutboxResult<()> {
        for m in messages {
            validate_outbound(m)?;
        }
        let result = enqueue_on(tx.conn()?, messages).await;
        match result {
            Ok(()) => {
                tx.enqueued |= !messages.is_empty();
                Ok(())
            }
            Err(e) => Err(tx.fail(e).await),
        }
    }

    async fn record_inbox_in_tx(
        &self,
        tx: &mut SqliteUnitOfWorkTx,
        consumer: &str,
        id: MessageId,
    ) -> OutboxResult<InboxRecord> {
        let result = record_on(tx.conn()?, consumer, id).await;
        match result {
            Ok(r) => Ok(r),
            Err(e) => Err(tx.fail(e).await),
        }
    }
}

/// Inserts the inbox entry unless present. The write lock is held from
/// `BEGIN IMMEDIATE`, so no concurrent transaction can record the same
/// pair between this check and the commit.
pub(crate) async fn record_on(
    conn: &mut SqliteConnection,
    consumer: &str,
    id: MessageId,
) -> OutboxResult<InboxRecord> {
    let now = db_now(&mut *conn).await?;
    let done = sqlx::query(
        "INSERT INTO inbox (consumer, message_id, processed_at) VALUES (?, ?, ?)
         ON CONFLICT (consumer, message_id) DO NOTHING",
    )
    .bind(consumer)
    .bind(id.to_string())
    .bind(now)
    .execute(conn)
    .await
    .map_err(db_err)?;
    Ok(if done.rows_affected() == 1 {
        InboxRecord::New
    } else {
        InboxRecord::Duplicate
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vextrus_core::outbox::OutboxStore;
    use vextrus_core::{EventAppender, EventReader};
    use vextrus_kernel::EventMetadata;

    #[tokio::test]
    async fn a_failed_step_releases_the_write_lock_at_once() {
        let s = SqliteOutbox::temporary().await.unwrap();
        let stream = StreamId::new("order-1").unwrap();
        let ev = || NewEvent::new("order.placed", json!({}), EventMetadata::new());
        s.event_store()
            .append_to_stream(&stream, ExpectedVersion::NoStream, &[ev()])
            .await
            .unwrap();
        let mut tx = s.begin().await.unwrap();
        let err = s
            .append_in_tx(&mut tx, &stream, ExpectedVersion::NoStream, &[ev()])
            .await
            .unwrap_err();
        assert!(matches!(err, OutboxError::EventStore(ref e) if e.is_conflict()));
        assert!(!tx.is_open());
        // Another writer gets the lock while `tx` is still alive.
        let m = OutboundMessage::new("orders", "k", b"x".to_vec());
        tokio::time::timeout(
            std::time::Duration::from_secs(2),
            s.enqueue(std::slice::from_ref(&m)),
        )
        .await
        .expect("not blocked")
        .unwrap();
        assert!(tx.conn().is_err());
        assert!(matches!(
            s.enqueue_in_tx(
                &mut tx,
                &[OutboundMessage::new("orders", "k", b"y".to_vec())]
            )
            .await,
            Err(OutboxError::Backend(_))
        ));
        assert!(matches!(s.commit(tx).await, Err(OutboxError::Backend(_))));
        assert_eq!(
            s.event_store().stream_version(&stream).await.unwrap(),
            Some(1)
        );
    }

    #[tokio::test]
    async fn a_validation_error_keeps_the_transaction_open() {
        let s = SqliteOutbox::temporary().await.unwrap();
        let mut tx = s.begin().await.unwrap();
        let ok = OutboundMessage::new("orders", "k", b"x".to_vec());
        s.enqueue_in_tx(&mut tx, std::slice::from_ref(&ok))
            .await
            .unwrap();
        let mut bad = OutboundMessage::new("orders", "k", b"y".to_vec());
        bad.destination.clear();
        assert!(matches!(
            s.enqueue_in_tx(&mut tx, &[bad]).await,
            Err(OutboxError::InvalidMessage(_))
        ));
        assert!(tx.is_open());
        s.commit(tx).await.unwrap();
        assert!(s.get(ok.id).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn duplicate_outbox_id_in_tx_is_typed_and_rolls_back() {
        let s = SqliteOutbox::temporary().await.unwrap();
        let m = OutboundMessage::new("orders", "k", b"x".to_vec());
        s.enqueue(std::slice::from_ref(&m)).await.unwrap();
        let mut tx = s.begin().await.unwrap();
        let other = OutboundMessage::new("orders", "k", b"y".to_vec());
        s.enqueue_in_tx(&mut tx, std::slice::from_ref(&other))
            .await
            .unwrap();
        let err = s
            .enqueue_in_tx(&mut tx, std::slice::from_ref(&m))
            .await
            .unwrap_err();
        assert!(matches!(err, OutboxError::DuplicateMessage(id) if id == m.id));
        drop(tx);
        assert!(s.get(other.id).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn the_same_inbox_entry_twice_in_one_tx_is_a_duplicate() {
        let s = SqliteOutbox::temporary().await.unwrap();
        let id = MessageId::new();
        let mut tx = s.begin().await.unwrap();
        assert_eq!(
            s.record_inbox_in_tx(&mut tx, "c", id).await.unwrap(),
            InboxRecord::New
        );
        assert_eq!(
            s.record_inbox_in_tx(&mut tx, "c", id).await.unwrap(),
            InboxRecord::Duplicate
        );
        s.commit(tx).await.unwrap();
    }
}
