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
//!   lane it writes (the same two-part lock, in the same order, as
//!   `PgOutbox`), so transactions enqueuing to one lane commit in the order
//!   they drew their sequences, and a lane's cursor never passes a row that
//!   commits later (see [`vextrus_core::outbox::lanes`]);
//! - `next_attempt_at` is `least(created_at, now())`, as `PgOutbox` sets it;
//! - all of it (duplicate check, locks, insert) is one statement;
//! - it does not notify inside the transaction: after committing, the
//!   caller wakes relays with a [`RelayWaker`] (one coalesced
//!   `pg_notify('vextrus_outbox', '')` from a background task, as
//!   [`PgOutbox`](crate::PgOutbox) does after its own commits). PostgreSQL
//!   holds a database-wide lock from a notifying transaction's pre-commit
//!   until its commit is flushed, so a `NOTIFY` in every enqueuing
//!   transaction would serialize their commits (no group commit). Relays
//!   also poll, so a wake-up that is lost (or never sent) only delays.
//!
//! The `Any` driver binds only plain types, so the batch is sent as one
//! JSON array (payloads in hex) and cast in SQL.

use std::collections::HashSet;

use chrono::SecondsFormat;
use sqlx::{AnyConnection, AnyPool};
use vextrus_core::outbox::{OutboxError, OutboxResult, validate_outbound};
use vextrus_core::transport::{MessageId, OutboundMessage};
use vextrus_core::unit_of_work::InboxRecord;

use crate::notifier::{CoalescingNotifier, pg_notify};
use crate::outbox::{LANE_LOCK_CLASS, OUTBOX_NOTIFY_CHANNEL, map_out};

/// Enqueues `messages` (in order) into `vextrus_outbox` through `conn`,
/// which must be inside a transaction the caller commits. Same checks as
/// [`OutboxStore::enqueue`](vextrus_core::outbox::OutboxStore::enqueue): a
/// message that fails validation is [`OutboxError::InvalidMessage`], an id
/// already stored (or twice in the batch) is
/// [`OutboxError::DuplicateMessage`], and in both cases nothing is written.
/// It sends no wake-up: after the commit, call [`RelayWaker::wake`] (relays
/// that are not woken find the messages at their next poll).
///
/// ```no_run
/// use sqlx::{AnyPool, Connection};
/// use vextrus_core::transport::OutboundMessage;
/// use vextrus_postgres::any::RelayWaker;
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// sqlx::any::install_default_drivers();
/// let pool = AnyPool::connect("postgres://postgres@127.0.0.1:5432/svc").await?;
/// let waker = RelayWaker::new(pool.clone());
/// let mut tx = pool.begin().await?;
/// // ... the service's own SQL on &mut *tx ...
/// let reply = OutboundMessage::new("replies", "saga-1", b"{}".to_vec());
/// vextrus_postgres::any::enqueue(&mut tx, &[reply]).await?;
/// tx.commit().await?;
/// waker.wake(); // relays LISTENing on vextrus_outbox wake shortly
/// # Ok(()) }
/// ```
pub async fn enqueue(conn: &mut AnyConnection, messages: &[OutboundMessage]) -> OutboxResult<()> {
    if messages.is_empty() {
        return Ok(());
    }
    let mut rows = Vec::with_capacity(messages.len());
    let mut seen = HashSet::with_capacity(messages.len());
    for (ord, m) in messages.iter().enumerate() {
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
        let headers = serde_json::to_value(&m.headers)
            .map_err(|e| OutboxError::InvalidMessage(format!("message {}: {e}", m.id)))?;
        rows.push(serde_json::json!({
            "ord": ord,
            "id": m.id.to_string(),
            "destination": m.destination,
            "partition_key": m.partition_key,
            "lane": vextrus_core::outbox::lane_of(&m.partition_key),
            "payload": hex(&m.payload),
            "headers": headers,
            // timestamptz keeps microseconds; sqlx's native encoding
            // truncates to them, and so does this format.
            "created_at": m.created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            "created_at_ns": nanos,
        }));
    }
    // One statement: the duplicate check (an index probe per message: a
    // plain join let the planner hash-join against a sequential scan of the
    // whole outbox on every enqueue), the advisory locks (only when no
    // id is taken) and the insert in batch order. Before, this was 3 + one
    // INSERT per message + a NOTIFY; the NOTIFY is now the caller's
    // RelayWaker's, after commit.
    let (taken, inserted, race): (Option<String>, i64, Option<String>) = sqlx::query_as(
        "WITH m AS MATERIALIZED (
             SELECT * FROM json_to_recordset($1::json) AS m(
                 ord int, id uuid, destination text, partition_key text, lane int, payload text,
                 headers json, created_at timestamptz, created_at_ns bigint)
         ),
         taken AS MATERIALIZED (
             SELECT m.id
               FROM m CROSS JOIN LATERAL (
                        SELECT 1 FROM vextrus_outbox o WHERE o.id = m.id LIMIT 1
                    ) AS hit
              ORDER BY m.ord LIMIT 1
         ),
         locks AS MATERIALIZED (
             SELECT count(*) AS n FROM (
                 SELECT pg_advisory_xact_lock($2, k)
                   FROM (SELECT DISTINCT lane AS k FROM m
                          WHERE NOT EXISTS (SELECT 1 FROM taken) ORDER BY 1) AS keys
             ) AS l
         ),
         ins AS (
             INSERT INTO vextrus_outbox
                 (id, destination, partition_key, payload, headers, created_at, created_at_ns,
                  next_attempt_at, lane)
             SELECT m.id, m.destination, m.partition_key, decode(m.payload, 'hex'), m.headers,
                    m.created_at, m.created_at_ns, LEAST(m.created_at, now()), m.lane
               FROM locks, m
              WHERE NOT EXISTS (SELECT 1 FROM taken)
              ORDER BY m.ord
             ON CONFLICT (id) DO NOTHING
             RETURNING id
         )
         SELECT (SELECT id::text FROM taken),
                (SELECT count(*) FROM ins),
                (SELECT CASE WHEN count(*) < $3 THEN json_agg(id)::text END FROM ins)",
    )
    .bind(serde_json::Value::from(rows).to_string())
    .bind(LANE_LOCK_CLASS)
    .bind(i64::try_from(messages.len()).unwrap_or(i64::MAX))
    .fetch_one(&mut *conn)
    .await
    .map_err(map_out)?;
    let parse = |id: &str| {
        id.parse::<MessageId>()
            .map_err(|e| OutboxError::InvalidMessage(format!("stored id {id}: {e}")))
    };
    if let Some(id) = taken {
        return Err(OutboxError::DuplicateMessage(parse(&id)?));
    }
    if usize::try_from(inserted).ok() != Some(messages.len()) {
        // An id was committed by a concurrent transaction after the check:
        // remove what this call inserted, so it writes nothing.
        let mine: Vec<String> = race
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| OutboxError::Backend(format!("inserted ids: {e}").into()))?
            .unwrap_or_default();
        sqlx::query(
            "DELETE FROM vextrus_outbox
              WHERE id IN (SELECT x::uuid FROM json_array_elements_text($1::json) AS x)",
        )
        .bind(serde_json::Value::from(mine.clone()).to_string())
        .execute(&mut *conn)
        .await
        .map_err(map_out)?;
        let id = messages
            .iter()
            .find(|m| !mine.contains(&m.id.to_string()))
            .map_or(messages[0].id, |m| m.id);
        return Err(OutboxError::DuplicateMessage(id));
    }
    Ok(())
}

/// Wakes the outbox relays LISTENing on [`OUTBOX_NOTIFY_CHANNEL`] (in
/// every process) after commits that enqueued through [`enqueue`]: one
/// `pg_notify` from a background task on `pool`, shared by every wake-up
/// requested while one is in flight or within [`NOTIFY_COALESCE`](crate::NOTIFY_COALESCE) of the
/// last one (each `NOTIFY` is a committed transaction of its own, and
/// notifying transactions' commits serialize on PostgreSQL's notify lock).
/// A relay is woken within about one round trip plus [`NOTIFY_COALESCE`](crate::NOTIFY_COALESCE)
/// of the commit; relays also poll, so a failed `NOTIFY` only delays.
///
/// Clones share the background task. On a SQLite pool, call nothing: its
/// relays poll.
///
/// ```no_run
/// use sqlx::AnyPool;
/// use vextrus_postgres::any::RelayWaker;
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// sqlx::any::install_default_drivers();
/// let pool = AnyPool::connect("postgres://postgres@127.0.0.1:5432/svc").await?;
/// let waker = RelayWaker::new(pool);
/// // ... after each commit that enqueued:
/// waker.wake();
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RelayWaker {
    pool: AnyPool,
    notifier: CoalescingNotifier,
}

impl RelayWaker {
    /// A waker sending its `NOTIFY`s on `pool` (a PostgreSQL pool); its
    /// task starts with the first [`wake`](Self::wake).
    pub fn new(pool: AnyPool) -> Self {
        Self {
            pool,
            notifier: CoalescingNotifier::default(),
        }
    }

    /// Asks for a wake-up of the relays; returns at once. Must be called
    /// within a Tokio runtime.
    pub fn wake(&self) {
        self.notifier
            .request(|| pg_notify(self.pool.clone(), OUTBOX_NOTIFY_CHANNEL));
    }
}

/// Lower-case hex of `bytes` (payloads travel inside the statement's JSON).
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
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
    async fn rows_written_through_any_are_the_native_outboxs_rows_and_the_waker_wakes_relays() {
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
        // The enqueue itself notifies nobody (no NOTIFY in the transaction)...
        assert!(
            !wake.wait(Duration::from_millis(1500)).await,
            "the enqueuing transaction sent a NOTIFY"
        );
        // ... the waker does, after the commit; wake-ups asked for at once
        // share one NOTIFY.
        let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
        let waker = RelayWaker::new(pool.clone());
        for _ in 0..10 {
            waker.clone().wake();
        }
        assert!(
            wake.wait(Duration::from_secs(5)).await,
            "the waker's NOTIFY woke no relay"
        );
        pool.close().await;

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
