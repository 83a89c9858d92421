//! The outbox and the inbox written through an [`sqlx::AnyConnection`].
//!
//! A service whose own SQL runs on sqlx's `Any` driver (portable SQL that
//! runs on SQLite and PostgreSQL alike, such as the order-to-cash
//! participants) cannot use [`PgOutbox`](crate::PgOutbox)'s unit of work,
//! whose transaction is a `sqlx::Transaction<Postgres>`. These two functions
//! write the same rows as [`PgOutbox`](crate::PgOutbox)'s enqueue and inbox
//! record on an `AnyConnection` inside the caller's transaction, so the
//! service's SQL, its outgoing messages and its inbox entry commit together:
//!
//! - each enqueue first takes the transaction-scoped advisory lock of every
//!   partition key it writes (the same two-part lock, in the same order, as
//!   `PgOutbox`), so transactions enqueuing to one key commit in the order
//!   they drew their sequences, and a relay never sees a key's later row
//!   before an earlier one;
//! - `next_attempt_at` is `least(created_at, now())`, as `PgOutbox` sets it;
//! - it queues `pg_notify('vextrus_outbox', '')` in the transaction, which
//!   PostgreSQL delivers at commit (and drops on rollback), waking relays
//!   LISTENing in every process.
//!
//! The `Any` driver binds only plain types, so ids, headers and times are
//! sent as text and cast in SQL.

use std::collections::HashSet;

use chrono::SecondsFormat;
use sqlx::AnyConnection;
use vextrus_core::outbox::{OutboxError, OutboxResult, validate_outbound};
use vextrus_core::transport::{MessageId, OutboundMessage};
use vextrus_core::unit_of_work::InboxRecord;

use crate::outbox::{KEY_LOCK_CLASS, OUTBOX_NOTIFY_CHANNEL, map_out};

/// Enqueues `messages` (in order) into `vextrus_outbox` through `conn`,
/// which must be inside a transaction the caller commits. Same checks as
/// [`OutboxStore::enqueue`](vextrus_core::outbox::OutboxStore::enqueue): a
/// message that fails validation is [`OutboxError::InvalidMessage`], an id
/// already stored (or twice in the batch) is
/// [`OutboxError::DuplicateMessage`], and in both cases nothing is written.
///
/// ```no_run
/// use sqlx::{AnyConnection, Connection};
/// use vextrus_core::transport::OutboundMessage;
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// sqlx::any::install_default_drivers();
/// let mut conn = AnyConnection::connect("postgres://postgres@127.0.0.1:5432/svc").await?;
/// let mut tx = conn.begin().await?;
/// // ... the service's own SQL on &mut *tx ...
/// let reply = OutboundMessage::new("replies", "saga-1", b"{}".to_vec());
/// vextrus_postgres::any::enqueue(&mut tx, &[reply]).await?;
/// tx.commit().await?; // relays LISTENing on vextrus_outbox wake now
/// # Ok(()) }
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
        let nanos = m.created_at.timestamp_nanos_opt().ok_or_else(|| {
            OutboxError::InvalidMessage(format!(
                "message {}: created_at {} is out of range",
                m.id, m.created_at
            ))
        })?;
        let headers = serde_json::to_string(&m.headers)
            .map_err(|e| OutboxError::InvalidMessage(format!("message {}: {e}", m.id)))?;
        // timestamptz keeps microseconds; sqlx's native encoding truncates
        // to them, and so does this format.
        let created = m.created_at.to_rfc3339_opts(SecondsFormat::Micros, true);
        rows.push((m, nanos, headers, created));
    }
    let ids: Vec<String> = messages.iter().map(|m| m.id.to_string()).collect();
    let stored: Option<String> = sqlx::query_scalar(
        "SELECT id::text FROM vextrus_outbox \
          WHERE id IN (SELECT x::uuid FROM json_array_elements_text($1::json) AS x) LIMIT 1",
    )
    .bind(serde_json::Value::from(ids).to_string())
    .fetch_optional(&mut *conn)
    .await
    .map_err(map_out)?;
    if let Some(id) = stored {
        let id = id
            .parse::<MessageId>()
            .map_err(|e| OutboxError::InvalidMessage(format!("stored id {id}: {e}")))?;
        return Err(OutboxError::DuplicateMessage(id));
    }
    let keys: Vec<&str> = messages.iter().map(|m| m.partition_key.as_str()).collect();
    sqlx::query(
        "SELECT count(*) FROM (
             SELECT pg_advisory_xact_lock($1, k)
               FROM (SELECT DISTINCT hashtext(key) AS k
                       FROM json_array_elements_text($2::json) AS key ORDER BY 1) AS keys
         ) AS l",
    )
    .bind(KEY_LOCK_CLASS)
    .bind(serde_json::Value::from(keys).to_string())
    .execute(&mut *conn)
    .await
    .map_err(map_out)?;
    for (m, nanos, headers, created) in rows {
        let inserted = sqlx::query(
            "INSERT INTO vextrus_outbox
                 (id, destination, partition_key, payload, headers, created_at, created_at_ns,
                  next_attempt_at)
             VALUES ($1::uuid, $2, $3, $4, $5::jsonb, $6::timestamptz, $7,
                     LEAST($6::timestamptz, now()))
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(m.id.to_string())
        .bind(m.destination.clone())
        .bind(m.partition_key.clone())
        .bind(m.payload.clone())
        .bind(headers)
        .bind(created)
        .bind(nanos)
        .execute(&mut *conn)
        .await
        .map_err(map_out)?
        .rows_affected();
        if inserted != 1 {
            // Committed by a concurrent transaction since the check above.
            return Err(OutboxError::DuplicateMessage(m.id));
        }
    }
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(OUTBOX_NOTIFY_CHANNEL)
        .execute(&mut *conn)
        .await
        .map_err(map_out)?;
    Ok(())
}

/// Records that `consumer` processed message `id`, through `conn` inside
/// the caller's transaction: [`InboxRecord::New`] the first time,
/// [`InboxRecord::Duplicate`] if it was recorded before (a redelivery: the
/// caller applies nothing). Same row as `PgOutbox`'s `record_inbox_in_tx`
/// in `vextrus_inbox`; a concurrent transaction recording the same entry
/// waits for this one and then sees a duplicate.
///
/// ```no_run
/// use sqlx::{AnyConnection, Connection};
/// use vextrus_core::transport::MessageId;
/// use vextrus_core::unit_of_work::InboxRecord;
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// sqlx::any::install_default_drivers();
/// let mut conn = AnyConnection::connect("postgres://postgres@127.0.0.1:5432/svc").await?;
/// let mut tx = conn.begin().await?;
/// if vextrus_postgres::any::record_inbox(&mut tx, "billing", MessageId::new()).await?
///     == InboxRecord::New
/// {
///     // ... apply the message's effects on &mut *tx ...
/// }
/// tx.commit().await?;
/// # Ok(()) }
/// ```
pub async fn record_inbox(
    conn: &mut AnyConnection,
    consumer: &str,
    id: MessageId,
) -> OutboxResult<InboxRecord> {
    let n = sqlx::query(
        "INSERT INTO vextrus_inbox (consumer, message_id) VALUES ($1, $2::uuid)
         ON CONFLICT (consumer, message_id) DO NOTHING",
    )
    .bind(consumer.to_owned())
    .bind(id.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::{Connection, PgConnection};
    use std::time::Duration;
    use vextrus_core::WakeUps;
    use vextrus_core::inbox::InboxStore;
    use vextrus_core::outbox::{ClaimRequest, DeadLetterPolicy, OutboxClaimer, OutboxStore};

    use crate::{PgEventStore, PgOutbox};

    fn admin_url() -> String {
        std::env::var("VEXTRUS_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
    }

    /// A fresh database on the real server, dropped at the end of the test.
    struct Db {
        name: String,
        url: String,
    }

    impl Db {
        async fn create() -> Db {
            let admin = admin_url();
            let name = format!("vextrus_t_{}", uuid::Uuid::now_v7().simple());
            let mut conn = PgConnection::connect(&admin)
                .await
                .unwrap_or_else(|e| panic!("PostgreSQL is required at {admin}: {e}"));
            sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE \"{name}\"").as_str())
                .await
                .unwrap();
            let (base, _) = admin.rsplit_once('/').unwrap();
            let url = format!("{base}/{name}");
            Db { name, url }
        }

        async fn drop_db(self) {
            let mut conn = PgConnection::connect(&admin_url()).await.unwrap();
            sqlx::Executor::execute(
                &mut conn,
                format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name).as_str(),
            )
            .await
            .unwrap();
        }
    }

    async fn setup(db: &Db) -> (PgOutbox, AnyConnection) {
        let outbox = PgOutbox::new(PgEventStore::connect(&db.url).await.unwrap());
        outbox.migrate().await.unwrap();
        sqlx::any::install_default_drivers();
        let conn = AnyConnection::connect(&db.url).await.unwrap();
        (outbox, conn)
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
    async fn rows_written_through_any_are_the_native_outboxs_rows_and_wake_relays() {
        let db = Db::create().await;
        let (outbox, mut conn) = setup(&db).await;
        let mut wake: WakeUps = outbox.wake_ups().await.unwrap();
        // The listener's first bump (on connect) is consumed here.
        wake.wait(Duration::from_secs(2)).await;

        let native = OutboundMessage::new("d", "k", b"first".to_vec());
        outbox.enqueue(std::slice::from_ref(&native)).await.unwrap();
        wake.wait(Duration::from_secs(2)).await;
        let mut a = OutboundMessage::new("d", "k", b"second".to_vec());
        a.headers.insert("h".into(), "v".into());
        let b = OutboundMessage::new("e", "other", vec![0, 159, 255]);
        let mut tx = conn.begin().await.unwrap();
        enqueue(&mut tx, &[a.clone(), b.clone()]).await.unwrap();
        tx.commit().await.unwrap();
        let started = std::time::Instant::now();
        wake.wait(Duration::from_secs(5)).await;
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "the commit's NOTIFY woke no relay"
        );

        let rows = outbox.rows().await.unwrap();
        let got: Vec<_> = rows.iter().map(|r| r.message.clone()).collect();
        assert_eq!(got, vec![native.clone(), a.clone(), b.clone()]);
        assert!(rows.iter().all(|r| r.next_attempt_at <= chrono::Utc::now()));
        let batch = outbox.claim(&claim()).await.unwrap();
        let ids: Vec<_> = batch.iter().map(|m| m.message.id).collect();
        assert!(ids.contains(&native.id) && ids.contains(&b.id), "{ids:?}");
        if let Some(pa) = ids.iter().position(|x| *x == a.id) {
            assert!(ids.iter().position(|x| *x == native.id).unwrap() < pa);
        }
        drop(conn);
        db.drop_db().await;
    }

    #[tokio::test]
    async fn duplicates_and_invalid_messages_write_nothing_and_rollback_drops_all() {
        let db = Db::create().await;
        let (outbox, mut conn) = setup(&db).await;
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

        let mut tx = conn.begin().await.unwrap();
        enqueue(&mut tx, std::slice::from_ref(&fresh))
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(outbox.rows().await.unwrap().len(), 1);
        drop(conn);
        db.drop_db().await;
    }

    #[tokio::test]
    async fn inbox_entries_are_the_native_inboxs_and_roll_back_with_the_transaction() {
        let db = Db::create().await;
        let (outbox, mut conn) = setup(&db).await;
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
        drop(conn);
        db.drop_db().await;
    }
}
