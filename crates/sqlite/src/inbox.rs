//! The inbox on SQLite: [`InboxStore`] on [`SqliteOutbox`].
//!
//! The inbox key `(consumer, message id)` is recorded by
//! [`UnitOfWork::record_inbox_in_tx`](vextrus_core::unit_of_work::UnitOfWork::record_inbox_in_tx)
//! in the handler's own transaction (table `inbox`), so a redelivered
//! message finds it and has no second effect. Failed attempts are counted
//! in `inbox_failures`, in a transaction of their own, so the count
//! survives redeliveries and crashes; the attempt that reaches the maximum
//! stores an [`InboxDeadLetter`] in `inbox_dead_letters` and the inbox
//! entry in the same transaction.

use sqlx::Row;
use vextrus_core::inbox::{InboxDeadLetter, InboxFailure, InboxStore};
use vextrus_core::outbox::{OutboxError, OutboxResult};
use vextrus_core::transport::{Headers, InboundMessage, MessageId};
use vextrus_core::unit_of_work::InboxRecord;

use crate::outbox::{SqliteOutbox, db_err, db_now, from_nanos};
use crate::unit_of_work::record_on;

impl InboxStore for SqliteOutbox {
    async fn record_failure(
        &self,
        consumer: &str,
        message: &InboundMessage,
        error: &str,
        max_attempts: u32,
        dead_now: bool,
    ) -> OutboxResult<InboxFailure> {
        let id = message.id.to_string();
        let mut tx = self.begin_immediate().await?;
        let attempts: i64 = sqlx::query_scalar(
            "INSERT INTO inbox_failures (consumer, message_id, attempts, last_error)
             VALUES (?1, ?2, 1, ?3)
             ON CONFLICT (consumer, message_id) DO UPDATE SET
                 attempts = attempts + 1, last_error = excluded.last_error
             RETURNING attempts",
        )
        .bind(consumer)
        .bind(&id)
        .bind(error)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err)?;
        let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
        if !dead_now && attempts < max_attempts {
            tx.commit().await.map_err(db_err)?;
            return Ok(InboxFailure::Retry { attempts });
        }
        if record_on(&mut tx, consumer, message.id).await? == InboxRecord::New {
            let now = db_now(&mut tx).await?;
            let headers = serde_json::to_string(&message.headers)
                .map_err(|e| OutboxError::Backend(Box::new(e)))?;
            sqlx::query(
                "INSERT INTO inbox_dead_letters
                     (consumer, message_id, source, payload, headers, attempts, last_error, dead_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(consumer)
            .bind(&id)
            .bind(message.source.as_str())
            .bind(message.payload.as_slice())
            .bind(headers)
            .bind(i64::from(attempts))
            .bind(error)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)?;
        Ok(InboxFailure::Dead { attempts })
    }

    async fn is_processed(&self, consumer: &str, id: MessageId) -> OutboxResult<bool> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM inbox WHERE consumer = ? AND message_id = ?)",
        )
        .bind(consumer)
        .bind(id.to_string())
        .fetch_one(self.pool())
        .await
        .map_err(db_err)
    }

    async fn inbox_dead_letters(&self, consumer: &str) -> OutboxResult<Vec<InboxDeadLetter>> {
        let rows = sqlx::query(
            "SELECT message_id, source, payload, headers, attempts, last_error, dead_at
               FROM inbox_dead_letters WHERE consumer = ? ORDER BY seq",
        )
        .bind(consumer)
        .fetch_all(self.pool())
        .await
        .map_err(db_err)?;
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            OutboxError::Backend(format!("stored inbox dead letter {what} is invalid: {e}").into())
        };
        rows.iter()
            .map(|r| {
                let id: String = r.try_get(0).map_err(db_err)?;
                let headers: String = r.try_get(3).map_err(db_err)?;
                let attempts: i64 = r.try_get(4).map_err(db_err)?;
                Ok(InboxDeadLetter {
                    consumer: consumer.to_owned(),
                    message_id: id.parse().map_err(|e| bad("id", &e))?,
                    source: r.try_get(1).map_err(db_err)?,
                    payload: r.try_get(2).map_err(db_err)?,
                    headers: serde_json::from_str::<Headers>(&headers)
                        .map_err(|e| bad("headers", &e))?,
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                    last_error: r.try_get(5).map_err(db_err)?,
                    dead_at: from_nanos(r.try_get(6).map_err(db_err)?),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vextrus_core::unit_of_work::UnitOfWork;

    fn inbound() -> InboundMessage {
        let mut headers = Headers::new();
        headers.insert("ce_type".into(), "order.placed".into());
        InboundMessage {
            id: MessageId::new(),
            source: "orders".into(),
            partition_key: Some("o-1".into()),
            payload: b"{}".to_vec(),
            headers,
            delivery_attempt: 1,
        }
    }

    #[tokio::test]
    async fn failures_count_across_calls_then_dead_letter_once() {
        let s = SqliteOutbox::temporary().await.unwrap();
        let m = inbound();
        for n in 1..3 {
            assert_eq!(
                s.record_failure("c", &m, "boom", 3, false).await.unwrap(),
                InboxFailure::Retry { attempts: n }
            );
            assert!(!s.is_processed("c", m.id).await.unwrap());
        }
        assert_eq!(
            s.record_failure("c", &m, "boom 3", 3, false).await.unwrap(),
            InboxFailure::Dead { attempts: 3 }
        );
        assert!(s.is_processed("c", m.id).await.unwrap());
        // A late failure report (a redelivery racing the dead letter) does
        // not store a second dead letter.
        assert_eq!(
            s.record_failure("c", &m, "boom 4", 3, false).await.unwrap(),
            InboxFailure::Dead { attempts: 4 }
        );
        let dead = s.inbox_dead_letters("c").await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].message_id, m.id);
        assert_eq!(dead[0].attempts, 3);
        assert_eq!(dead[0].last_error, "boom 3");
        assert_eq!(dead[0].headers, m.headers);
        assert_eq!(dead[0].payload, m.payload);
        assert!(s.inbox_dead_letters("other").await.unwrap().is_empty());
        let mut tx = s.begin().await.unwrap();
        assert_eq!(
            s.record_inbox_in_tx(&mut tx, "c", m.id).await.unwrap(),
            InboxRecord::Duplicate
        );
    }

    #[tokio::test]
    async fn dead_now_dead_letters_at_the_first_failure() {
        let s = SqliteOutbox::temporary().await.unwrap();
        let m = inbound();
        assert_eq!(
            s.record_failure("c", &m, "malformed", 5, true)
                .await
                .unwrap(),
            InboxFailure::Dead { attempts: 1 }
        );
        assert_eq!(s.inbox_dead_letters("c").await.unwrap().len(), 1);
    }
}
