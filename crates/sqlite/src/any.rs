//! The outbox and the inbox written through an [`sqlx::AnyConnection`].
//!
//! A service whose own SQL runs on sqlx's `Any` driver (portable SQL that
//! runs on SQLite and PostgreSQL alike, such as the order-to-cash
//! participants) cannot use [`SqliteUnitOfWorkTx`](crate::SqliteUnitOfWorkTx),
//! whose transaction is a `sqlx::Transaction<Sqlite>`. These two functions
//! write the same rows as [`SqliteOutbox`](crate::SqliteOutbox)'s enqueue and
//! inbox record (the `outbox` and `inbox` tables of migrations 2 and 4, ids
//! as hyphenated UUID text, times as nanoseconds since the Unix epoch in
//! INTEGER columns, each message in the lane of its partition key) on an
//! `AnyConnection` inside the caller's transaction, so the service's SQL,
//! its outgoing messages and its inbox entry commit together. A [`SqliteOutbox`](crate::SqliteOutbox) over the same file
//! relays the messages.
//!
//! The caller's transaction should be a write transaction (`BEGIN
//! IMMEDIATE`): the inbox check and the outbox insert then hold SQLite's
//! write lock until commit, as the native unit of work does.

use std::collections::HashSet;

use sqlx::AnyConnection;
use vextrus_core::outbox::{OutboxError, OutboxResult, lane_of, validate_outbound};
use vextrus_core::transport::{MessageId, OutboundMessage};
use vextrus_core::unit_of_work::InboxRecord;

use crate::outbox::db_err;

/// Enqueues `messages` (in order) into the `outbox` table through `conn`,
/// which must be inside a transaction the caller commits. Same checks as
/// [`OutboxStore::enqueue`](vextrus_core::outbox::OutboxStore::enqueue): a
/// message that fails validation is [`OutboxError::InvalidMessage`], an id
/// already stored (or twice in the batch) is
/// [`OutboxError::DuplicateMessage`], and in both cases nothing is written.
///
/// ```
/// use sqlx::{Connection, AnyConnection};
/// use vextrus_core::transport::OutboundMessage;
/// use vextrus_sqlite::{SqliteEventStore, SqliteOutbox};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("svc.db");
/// let store = SqliteEventStore::connect(&format!("sqlite:{}?mode=rwc", path.display())).await.unwrap();
/// store.migrate().await.unwrap();
///
/// sqlx::any::install_default_drivers();
/// let mut conn = AnyConnection::connect(&format!("sqlite:{}", path.display())).await.unwrap();
/// let mut tx = conn.begin().await.unwrap();
/// let m = OutboundMessage::new("replies", "saga-1", b"{}".to_vec());
/// vextrus_sqlite::any::enqueue(&mut tx, &[m.clone()]).await.unwrap();
/// tx.commit().await.unwrap();
///
/// let rows = SqliteOutbox::new(store).rows().await.unwrap();
/// assert_eq!(rows[0].message.id, m.id);
/// # });
/// ```
pub async fn enqueue(conn: &mut AnyConnection, messages: &[OutboundMessage]) -> OutboxResult<()> {
    if messages.is_empty() {
        return Ok(());
    }
    let mut rows = Vec::with_capacity(messages.len());
    let mut seen = HashSet::with_capacity(messages.len());
    for m in messages {
        validate_outbound(m)?;
        if !seen.insert(m.id) {
            return Err(OutboxError::DuplicateMessage(m.id));
        }
        let created = m.created_at.timestamp_nanos_opt().ok_or_else(|| {
            OutboxError::InvalidMessage(format!(
                "message {}: created_at {} is out of range",
                m.id, m.created_at
            ))
        })?;
        let headers = serde_json::to_string(&m.headers)
            .map_err(|e| OutboxError::InvalidMessage(format!("message {}: {e}", m.id)))?;
        rows.push((m, created, headers));
    }
    let ids: Vec<String> = messages.iter().map(|m| m.id.to_string()).collect();
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT id FROM outbox WHERE id IN (SELECT value FROM json_each(?))")
            .bind(serde_json::Value::from(ids).to_string())
            .fetch_all(&mut *conn)
            .await
            .map_err(db_err)?;
    if let Some(id) = stored.first() {
        let id = id
            .parse::<MessageId>()
            .map_err(|e| OutboxError::InvalidMessage(format!("stored id {id}: {e}")))?;
        return Err(OutboxError::DuplicateMessage(id));
    }
    for (m, created, headers) in rows {
        sqlx::query(
            "INSERT INTO outbox (id, destination, partition_key, payload, headers, created_at, lane) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(m.id.to_string())
        .bind(m.destination.clone())
        .bind(m.partition_key.clone())
        .bind(m.payload.clone())
        .bind(headers)
        .bind(created)
        .bind(lane_of(&m.partition_key))
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    }
    Ok(())
}

/// Records that `consumer` processed message `id`, through `conn` inside
/// the caller's transaction: [`InboxRecord::New`] the first time,
/// [`InboxRecord::Duplicate`] if it was recorded before (a redelivery: the
/// caller applies nothing). Same row as the native unit of work's
/// `record_inbox_in_tx` (`processed_at` from the database clock).
///
/// ```
/// use sqlx::{Connection, AnyConnection};
/// use vextrus_core::transport::MessageId;
/// use vextrus_core::unit_of_work::InboxRecord;
/// use vextrus_sqlite::SqliteEventStore;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("svc.db");
/// let store = SqliteEventStore::connect(&format!("sqlite:{}?mode=rwc", path.display())).await.unwrap();
/// store.migrate().await.unwrap();
/// sqlx::any::install_default_drivers();
/// let mut conn = AnyConnection::connect(&format!("sqlite:{}", path.display())).await.unwrap();
/// let id = MessageId::new();
/// let first = vextrus_sqlite::any::record_inbox(&mut conn, "billing", id).await.unwrap();
/// let again = vextrus_sqlite::any::record_inbox(&mut conn, "billing", id).await.unwrap();
/// assert_eq!((first, again), (InboxRecord::New, InboxRecord::Duplicate));
/// # });
/// ```
pub async fn record_inbox(
    conn: &mut AnyConnection,
    consumer: &str,
    id: MessageId,
) -> OutboxResult<InboxRecord> {
    let done = sqlx::query(
        "INSERT INTO inbox (consumer, message_id, processed_at) \
         VALUES (?, ?, CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000000) \
         ON CONFLICT (consumer, message_id) DO NOTHING",
    )
    .bind(consumer.to_owned())
    .bind(id.to_string())
    .execute(&mut *conn)
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
    use sqlx::Connection;
    use std::time::Duration;
    use vextrus_core::inbox::InboxStore;
    use vextrus_core::outbox::{ClaimRequest, DeadLetterPolicy, OutboxClaimer, OutboxStore};

    use crate::{SqliteEventStore, SqliteOutbox};

    async fn setup() -> (tempfile::TempDir, SqliteOutbox, AnyConnection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.db");
        let store = SqliteEventStore::connect(&format!("sqlite:{}?mode=rwc", path.display()))
            .await
            .unwrap();
        let outbox = SqliteOutbox::new(store);
        outbox.migrate().await.unwrap();
        sqlx::any::install_default_drivers();
        let conn = AnyConnection::connect(&format!("sqlite:{}", path.display()))
            .await
            .unwrap();
        (dir, outbox, conn)
    }

    fn claim() -> ClaimRequest {
        ClaimRequest {
            worker: "w".into(),
            limit: 100,
            lease: Duration::from_secs(30),
            dead_letter_policy: DeadLetterPolicy::SkipKey,
        }
    }

    #[tokio::test]
    async fn rows_written_through_any_are_the_native_outboxs_rows() {
        let (_dir, outbox, mut conn) = setup().await;
        let native = OutboundMessage::new("d", "k", b"first".to_vec());
        outbox.enqueue(std::slice::from_ref(&native)).await.unwrap();
        let mut a = OutboundMessage::new("d", "k", b"second".to_vec());
        a.headers.insert("h".into(), "v".into());
        let b = OutboundMessage::new("e", "other", vec![0, 159, 255]);
        let mut tx = conn.begin().await.unwrap();
        enqueue(&mut tx, &[a.clone(), b.clone()]).await.unwrap();
        tx.commit().await.unwrap();

        let rows = outbox.rows().await.unwrap();
        let got: Vec<_> = rows.iter().map(|r| r.message.clone()).collect();
        assert_eq!(got, vec![native.clone(), a.clone(), b.clone()]);
        // Per-key order holds across both writers: key "k" yields its head only.
        let batch = outbox.claim(&claim()).await.unwrap();
        let ids: Vec<_> = batch.iter().map(|m| m.message.id).collect();
        assert!(ids.contains(&native.id) && ids.contains(&b.id), "{ids:?}");
        let pos = |id| ids.iter().position(|x| *x == id);
        if let Some(pa) = pos(a.id) {
            assert!(pos(native.id).unwrap() < pa);
        }
    }

    #[tokio::test]
    async fn duplicates_and_invalid_messages_write_nothing() {
        let (_dir, outbox, mut conn) = setup().await;
        let a = OutboundMessage::new("d", "k", b"a".to_vec());
        let mut tx = conn.begin().await.unwrap();
        enqueue(&mut tx, std::slice::from_ref(&a)).await.unwrap();
        tx.commit().await.unwrap();

        let fresh = OutboundMessage::new("d", "k", b"b".to_vec());
        let mut tx = conn.begin().await.unwrap();
        let err = enqueue(&mut tx, &[fresh.clone(), a.clone()])
            .await
            .unwrap_err();
        assert!(matches!(err, OutboxError::DuplicateMessage(id) if id == a.id));
        let err = enqueue(&mut tx, &[fresh.clone(), fresh.clone()])
            .await
            .unwrap_err();
        assert!(matches!(err, OutboxError::DuplicateMessage(id) if id == fresh.id));
        let bad = OutboundMessage::new("", "k", b"x".to_vec());
        let err = enqueue(&mut tx, &[fresh.clone(), bad]).await.unwrap_err();
        assert!(matches!(err, OutboxError::InvalidMessage(_)), "{err}");
        tx.commit().await.unwrap();
        assert_eq!(outbox.rows().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn inbox_entries_are_the_native_inboxs_and_roll_back_with_the_transaction() {
        let (_dir, outbox, mut conn) = setup().await;
        let (kept, dropped) = (MessageId::new(), MessageId::new());
        let mut tx = conn.begin().await.unwrap();
        assert_eq!(
            record_inbox(&mut tx, "c", kept).await.unwrap(),
            InboxRecord::New
        );
        tx.commit().await.unwrap();
        let mut tx = conn.begin().await.unwrap();
        assert_eq!(
            record_inbox(&mut tx, "c", dropped).await.unwrap(),
            InboxRecord::New
        );
        assert_eq!(
            record_inbox(&mut tx, "c", kept).await.unwrap(),
            InboxRecord::Duplicate
        );
        tx.rollback().await.unwrap();
        assert!(outbox.is_processed("c", kept).await.unwrap());
        assert!(!outbox.is_processed("c", dropped).await.unwrap());
        assert!(!outbox.is_processed("other", kept).await.unwrap());
        let at: i64 = sqlx::query_scalar("SELECT processed_at FROM inbox")
            .fetch_one(outbox.pool())
            .await
            .unwrap();
        let now = chrono::Utc::now().timestamp_nanos_opt().unwrap();
        assert!((now - at).abs() < 60_000_000_000, "{at} vs {now}");
    }
}
