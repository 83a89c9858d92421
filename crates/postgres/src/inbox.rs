//! The inbox on PostgreSQL: `(consumer, message id)` rows written in the
//! handler's transaction, failure counts and dead letters.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use vextrus_core::inbox::{InboxDeadLetter, InboxFailure, InboxStore};
use vextrus_core::outbox::{OutboxError, OutboxResult};
use vextrus_core::transport::{Headers, InboundMessage, MessageId};
use vextrus_core::unit_of_work::InboxRecord;

use crate::outbox::{PgOutbox, map_out};

/// Records `(consumer, id)` on `conn` (inside the caller's transaction):
/// [`InboxRecord::Duplicate`] if it is already there. A concurrent
/// transaction recording the same pair makes this wait for it: if it
/// commits, this is a duplicate; if it rolls back, this is new.
pub(crate) async fn record_inbox_on(
    conn: &mut PgConnection,
    consumer: &str,
    id: MessageId,
) -> OutboxResult<InboxRecord> {
    let n = sqlx::query(
        "INSERT INTO vextrus_inbox (consumer, message_id) VALUES ($1, $2)
         ON CONFLICT (consumer, message_id) DO NOTHING",
    )
    .bind(consumer)
    .bind(id.as_uuid())
    .execute(&mut *conn)
    .await
    .map_err(map_out)?
    .rows_affected();
    Ok(if n == 1 {
        InboxRecord::New
    } else {
        InboxRecord::Duplicate
    })
}

/// The inbox: [`InboxStore`] on [`PgOutbox`]. Entries live in
/// `vextrus_inbox` (written by `UnitOfWork::record_inbox_in_tx` in the
/// handler's transaction), failed attempts in `vextrus_inbox_failures`, dead
/// letters in `vextrus_inbox_dead`.
///
/// ```no_run
/// use vextrus_core::inbox::InboxStore;
/// use vextrus_core::transport::MessageId;
/// use vextrus_core::unit_of_work::{InboxRecord, UnitOfWork};
/// use vextrus_postgres::{PgEventStore, PgOutbox};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let inbox = PgOutbox::new(PgEventStore::connect("postgres://postgres@127.0.0.1:5432/test").await?);
/// inbox.migrate().await?;
/// let id = MessageId::new();
/// let mut tx = inbox.begin().await?;
/// assert_eq!(inbox.record_inbox_in_tx(&mut tx, "billing", id).await?, InboxRecord::New);
/// // ... the handler's own SQL on &mut *tx ...
/// inbox.commit(tx).await?;
/// assert!(inbox.is_processed("billing", id).await?);
/// # Ok(()) }
/// ```
impl InboxStore for PgOutbox {
    async fn record_failure(
        &self,
        consumer: &str,
        message: &InboundMessage,
        error: &str,
        max_attempts: u32,
        dead_now: bool,
    ) -> OutboxResult<InboxFailure> {
        let mut tx = self.pool().begin().await.map_err(map_out)?;
        let attempts: i32 = sqlx::query_scalar(
            "INSERT INTO vextrus_inbox_failures (consumer, message_id, attempts, last_error)
             VALUES ($1, $2, 1, $3)
             ON CONFLICT (consumer, message_id) DO UPDATE
                SET attempts = vextrus_inbox_failures.attempts + 1,
                    last_error = EXCLUDED.last_error,
                    failed_at = now()
             RETURNING attempts",
        )
        .bind(consumer)
        .bind(message.id.as_uuid())
        .bind(error)
        .fetch_one(&mut *tx)
        .await
        .map_err(map_out)?;
        let attempts = u32::try_from(attempts).unwrap_or(0);
        if !dead_now && attempts < max_attempts {
            tx.commit().await.map_err(map_out)?;
            return Ok(InboxFailure::Retry { attempts });
        }
        if record_inbox_on(&mut tx, consumer, message.id).await? == InboxRecord::New {
            let headers = serde_json::to_string(&message.headers)
                .map_err(|e| OutboxError::Backend(Box::new(e)))?;
            sqlx::query(
                "INSERT INTO vextrus_inbox_dead
                     (consumer, message_id, source, payload, headers, attempts, last_error)
                 VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7)
                 ON CONFLICT (consumer, message_id) DO NOTHING",
            )
            .bind(consumer)
            .bind(message.id.as_uuid())
            .bind(&message.source)
            .bind(&message.payload)
            .bind(headers)
            .bind(i32::try_from(attempts).unwrap_or(i32::MAX))
            .bind(error)
            .execute(&mut *tx)
            .await
            .map_err(map_out)?;
        }
        tx.commit().await.map_err(map_out)?;
        Ok(InboxFailure::Dead { attempts })
    }

    async fn is_processed(&self, consumer: &str, id: MessageId) -> OutboxResult<bool> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM vextrus_inbox WHERE consumer = $1 AND message_id = $2)",
        )
        .bind(consumer)
        .bind(id.as_uuid())
        .fetch_one(self.pool())
        .await
        .map_err(map_out)
    }

    async fn inbox_dead_letters(&self, consumer: &str) -> OutboxResult<Vec<InboxDeadLetter>> {
        type DeadRow = (
            uuid::Uuid,
            String,
            Vec<u8>,
            String,
            i32,
            String,
            DateTime<Utc>,
        );
        let rows: Vec<DeadRow> = sqlx::query_as(
            "SELECT message_id, source, payload, headers::text, attempts, last_error, dead_at
               FROM vextrus_inbox_dead WHERE consumer = $1 ORDER BY seq",
        )
        .bind(consumer)
        .fetch_all(self.pool())
        .await
        .map_err(map_out)?;
        rows.into_iter()
            .map(
                |(id, source, payload, headers, attempts, last_error, dead_at)| {
                    let headers: Headers = serde_json::from_str(&headers)
                        .map_err(|e| OutboxError::Backend(Box::new(e)))?;
                    Ok(InboxDeadLetter {
                        consumer: consumer.to_owned(),
                        message_id: MessageId::from(id),
                        source,
                        payload,
                        headers,
                        attempts: u32::try_from(attempts).unwrap_or(0),
                        last_error,
                        dead_at,
                    })
                },
            )
            .collect()
    }
}
