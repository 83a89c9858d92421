//! [`SqliteOutbox`]: the transactional outbox on SQLite, sharing the event
//! store's file, pool and transactions.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, Transaction};
use tokio::sync::watch;
use vextrus_core::WakeUps;
use vextrus_core::outbox::{
    ClaimRequest, DeadLetterPolicy, DeadLetters, FailureOutcome, OutboxClaimer, OutboxError,
    OutboxMessage, OutboxResult, OutboxRetention, OutboxStatus, OutboxStatusReport, OutboxStore,
    PublishFailure, validate_outbound,
};
use vextrus_core::transport::{Headers, MessageId, OutboundMessage};
use vextrus_kernel::{ErrorKind, HasErrorKind};

use crate::migrate::Migration;
use crate::store::{SqliteEventStore, map_sqlx};

/// The outbox and inbox migration, version 2 of
/// [`MIGRATIONS`](crate::migrate::MIGRATIONS): `vextrus migrate`,
/// [`SqliteEventStore::migrate`] and [`SqliteOutbox::migrate`] all apply it.
pub const OUTBOX_MIGRATION: Migration = Migration {
    version: 2,
    name: "outbox_inbox",
    sql: include_str!("../migrations/0002_outbox_inbox.sql"),
};

/// At most this many messages of one partition key in one claimed batch.
///
/// The relay publishes a batch in rounds (the r-th message of every key)
/// and settles each round with its own commit, so a batch holding 200
/// messages of one key costs 200 commits (each an fsync with
/// `synchronous=FULL`), while 200 messages over 25 keys cost 8. The claim
/// rule allows it: a key's followers *may* join their head's batch; the
/// rest come in the next batch, in order.
pub const MAX_PER_KEY_IN_BATCH: usize = 8;

/// Rows per multi-row `INSERT` (7 parameters each, well under SQLite's limit).
const INSERT_CHUNK: usize = 1_000;

const ROW_COLUMNS: &str = "sequence, id, destination, partition_key, payload, headers, created_at, \
     status, attempts, next_attempt_at, last_error, published_at, claimed_by, lease_until";

/// The outbox on SQLite: [`OutboxStore`], [`OutboxClaimer`],
/// [`DeadLetters`], [`OutboxRetention`], the
/// [`UnitOfWork`](vextrus_core::unit_of_work::UnitOfWork) (events, outbox,
/// inbox and the service's own SQL in one transaction; see
/// [`SqliteUnitOfWorkTx`](crate::SqliteUnitOfWorkTx)) and the
/// [`InboxStore`](vextrus_core::inbox::InboxStore), over one
/// [`SqliteEventStore`]'s file and pool.
///
/// - **Claims** run in `BEGIN IMMEDIATE` transactions: SQLite has one
///   writer, so selecting the claimable heads of partition keys and marking
///   them claimed is atomic, and relay workers in this process or others
///   sharing the file never hold one key at once. The rule is the
///   [`store`](vextrus_core::outbox::store) module's: a message is claimable
///   when it is the head of its key (no earlier unfinished message), due,
///   and not leased to another worker; the key's next pending, due messages
///   follow it in the same batch, at most [`MAX_PER_KEY_IN_BATCH`] of the
///   key per batch (so a batch spreads over keys).
/// - **Clock**: leases, backoff, `published_at`, retention and ages are
///   computed and compared with the database's clock (`julianday('now')`,
///   read inside the write transaction, millisecond precision), never with
///   a time a producer wrote. A freshly enqueued message is due at once
///   (its `next_attempt_at` reads back as its `created_at`).
/// - **Wake-ups**: enqueues, replays and unit-of-work commits through this
///   store (or a clone) wake this process's relay workers at once; other
///   processes sharing the file are seen by the relay's polling.
///
/// Clones share the pool and the wake-up channel.
///
/// ```
/// use std::time::Duration;
/// use vextrus_core::outbox::{ClaimRequest, DeadLetterPolicy, DeadLetters, OutboxClaimer, OutboxStore};
/// use vextrus_core::transport::OutboundMessage;
/// use vextrus_sqlite::SqliteOutbox;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let outbox = SqliteOutbox::temporary().await.unwrap();
/// let a1 = OutboundMessage::new("orders", "a", b"1".to_vec());
/// let a2 = OutboundMessage::new("orders", "a", b"2".to_vec());
/// outbox.enqueue(&[a1.clone(), a2.clone()]).await.unwrap();
///
/// let req = |w: &str| ClaimRequest { worker: w.into(), limit: 10, lease: Duration::from_secs(30), dead_letter_policy: DeadLetterPolicy::SkipKey };
/// let batch = outbox.claim(&req("w1")).await.unwrap();
/// assert_eq!(batch.iter().map(|m| m.id()).collect::<Vec<_>>(), vec![a1.id, a2.id]);
/// // Key "a" is held by w1: w2 gets nothing.
/// assert!(outbox.claim(&req("w2")).await.unwrap().is_empty());
/// outbox.mark_published(&[a1.id, a2.id]).await.unwrap();
/// assert_eq!(outbox.status().await.unwrap().published, 2);
/// # });
/// ```
#[derive(Clone)]
pub struct SqliteOutbox {
    events: SqliteEventStore,
    wake: Arc<watch::Sender<u64>>,
    turns: Arc<tokio::sync::Mutex<()>>,
}

/// A `BEGIN IMMEDIATE` transaction taken in turn: writers of one
/// [`SqliteOutbox`] (and its clones) queue on a fair lock before `BEGIN`,
/// so a steady stream of claims cannot starve an enqueue past the busy
/// timeout (SQLite's own busy wait is a sleep-and-retry race, not a queue).
/// Writers in other processes still meet at SQLite's lock.
pub(crate) struct WriteTx {
    tx: Transaction<'static, Sqlite>,
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

impl WriteTx {
    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }

    pub(crate) async fn rollback(self) -> Result<(), sqlx::Error> {
        self.tx.rollback().await
    }
}

impl std::ops::Deref for WriteTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.tx
    }
}

impl std::fmt::Debug for SqliteOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteOutbox")
            .field("events", &self.events)
            .finish()
    }
}

impl SqliteOutbox {
    /// The outbox over `events`' database (does not migrate: call
    /// [`SqliteOutbox::migrate`]).
    pub fn new(events: SqliteEventStore) -> Self {
        let (wake, _) = watch::channel(0);
        Self {
            events,
            wake: Arc::new(wake),
            turns: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// A migrated outbox over a fresh temporary event store (deleted when the
    /// last clone is dropped). For tests and examples.
    pub async fn temporary() -> OutboxResult<Self> {
        let outbox = Self::new(SqliteEventStore::temporary().await?);
        outbox.migrate().await?;
        Ok(outbox)
    }

    /// Applies every migration not yet applied — the event store's and
    /// [`OUTBOX_MIGRATION`], both in [`MIGRATIONS`](crate::migrate::MIGRATIONS) —
    /// and returns how many it applied. Running it again is harmless; two
    /// processes migrating at once take turns (`BEGIN IMMEDIATE`).
    pub async fn migrate(&self) -> OutboxResult<usize> {
        Ok(self.events.migrate().await?)
    }

    /// The event store units of work append to.
    pub fn event_store(&self) -> &SqliteEventStore {
        &self.events
    }

    /// The connection pool (shared with the event store).
    pub fn pool(&self) -> &sqlx::SqlitePool {
        self.events.pool()
    }

    /// Wakes this process's relay workers (after a commit that enqueued).
    pub(crate) fn notify(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Begins a write transaction in turn (see [`WriteTx`]). Waiting for
    /// the turn longer than the busy timeout is [`OutboxError::Unavailable`].
    pub(crate) async fn begin_immediate(&self) -> OutboxResult<WriteTx> {
        let turn = tokio::time::timeout(
            SqliteEventStore::DEFAULT_BUSY_TIMEOUT,
            self.turns.clone().lock_owned(),
        )
        .await
        .map_err(|_| {
            OutboxError::Unavailable(
                "timed out waiting for the SQLite write lock (a unit of work held open?)".into(),
            )
        })?;
        let tx = self
            .pool()
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_err)?;
        Ok(WriteTx { tx, _turn: turn })
    }

    /// Every outbox row (any status), in sequence order.
    pub async fn rows(&self) -> OutboxResult<Vec<OutboxMessage>> {
        let sql = format!("SELECT {ROW_COLUMNS} FROM outbox ORDER BY sequence");
        sqlx::query(&sql)
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?
            .iter()
            .map(|r| decode_row(r).map(|d| d.msg))
            .collect()
    }
}

/// Inserts `messages` (validated, ids not yet stored, no id twice) on a
/// connection inside a write transaction, in order.
pub(crate) async fn enqueue_on(
    conn: &mut SqliteConnection,
    messages: &[OutboundMessage],
) -> OutboxResult<()> {
    if messages.is_empty() {
        return Ok(());
    }
    let mut rows = Vec::with_capacity(messages.len());
    for m in messages {
        validate_outbound(m)?;
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
    let stored: HashSet<String> = stored.into_iter().collect();
    let mut seen = HashSet::new();
    for m in messages {
        if stored.contains(&m.id.to_string()) || !seen.insert(m.id) {
            return Err(OutboxError::DuplicateMessage(m.id));
        }
    }
    for chunk in rows.chunks(INSERT_CHUNK) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO outbox (id, destination, partition_key, payload, headers, created_at) ",
        );
        qb.push_values(chunk, |mut b, (m, created, headers)| {
            b.push_bind(m.id.to_string())
                .push_bind(m.destination.as_str())
                .push_bind(m.partition_key.as_str())
                .push_bind(m.payload.as_slice())
                .push_bind(headers.as_str())
                .push_bind(*created);
        });
        qb.build().execute(&mut *conn).await.map_err(db_err)?;
    }
    Ok(())
}

/// Maps a driver error: busy/locked databases, I/O and pool failures are
/// [`OutboxError::Unavailable`] (retryable), the rest [`OutboxError::Backend`].
pub(crate) fn db_err(err: sqlx::Error) -> OutboxError {
    let e = map_sqlx(err);
    if e.kind() == ErrorKind::Transient {
        OutboxError::Unavailable(Box::new(e))
    } else {
        OutboxError::Backend(Box::new(e))
    }
}

/// The database clock as an SQL expression: nanoseconds since the Unix
/// epoch, millisecond precision (what [`db_now`] reads).
const NOW_NS: &str =
    "(CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000000)";

/// The database clock, in nanoseconds since the Unix epoch (millisecond
/// precision).
pub(crate) async fn db_now(conn: &mut SqliteConnection) -> OutboxResult<i64> {
    let ms: i64 = sqlx::query_scalar(
        "SELECT CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)",
    )
    .fetch_one(conn)
    .await
    .map_err(db_err)?;
    Ok(ms.saturating_mul(1_000_000))
}

/// A duration in nanoseconds, saturating.
pub(crate) fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

pub(crate) fn from_nanos(ns: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(ns)
}

/// JSON array text of ids, for `json_each`.
pub(crate) fn id_list(ids: &[MessageId]) -> String {
    serde_json::Value::from(ids.iter().map(ToString::to_string).collect::<Vec<_>>()).to_string()
}

fn backend(what: &str, e: impl std::fmt::Display) -> OutboxError {
    OutboxError::Backend(format!("stored outbox {what} is invalid: {e}").into())
}

struct Decoded {
    msg: OutboxMessage,
    claimed_by: Option<String>,
    lease_until: Option<i64>,
    /// `next_attempt_at` as stored (NULL: due since enqueued).
    next_attempt: Option<i64>,
}

fn decode_row(row: &SqliteRow) -> OutboxResult<Decoded> {
    let id: String = row.try_get("id").map_err(db_err)?;
    let id: MessageId = id.parse().map_err(|e| backend("id", e))?;
    let headers: String = row.try_get("headers").map_err(db_err)?;
    let headers: Headers = serde_json::from_str(&headers).map_err(|e| backend("headers", e))?;
    let status: String = row.try_get("status").map_err(db_err)?;
    let status = OutboxStatus::parse(&status).ok_or_else(|| backend("status", &status))?;
    let created_at = from_nanos(row.try_get("created_at").map_err(db_err)?);
    let next_attempt: Option<i64> = row.try_get("next_attempt_at").map_err(db_err)?;
    let published: Option<i64> = row.try_get("published_at").map_err(db_err)?;
    let sequence: i64 = row.try_get("sequence").map_err(db_err)?;
    let attempts: i64 = row.try_get("attempts").map_err(db_err)?;
    let message = OutboundMessage {
        id,
        destination: row.try_get("destination").map_err(db_err)?,
        partition_key: row.try_get("partition_key").map_err(db_err)?,
        payload: row.try_get("payload").map_err(db_err)?,
        headers,
        created_at,
    };
    Ok(Decoded {
        msg: OutboxMessage {
            message,
            sequence: u64::try_from(sequence).unwrap_or_default(),
            attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
            next_attempt_at: next_attempt.map_or(created_at, from_nanos),
            last_error: row.try_get("last_error").map_err(db_err)?,
            status,
            published_at: published.map(from_nanos),
        },
        claimed_by: row.try_get("claimed_by").map_err(db_err)?,
        lease_until: row.try_get("lease_until").map_err(db_err)?,
        next_attempt,
    })
}

impl OutboxStore for SqliteOutbox {
    async fn enqueue(&self, messages: &[OutboundMessage]) -> OutboxResult<()> {
        for m in messages {
            validate_outbound(m)?;
        }
        let mut tx = self.begin_immediate().await?;
        enqueue_on(&mut tx, messages).await?;
        tx.commit().await.map_err(db_err)?;
        self.notify();
        Ok(())
    }

    async fn get(&self, id: MessageId) -> OutboxResult<Option<OutboxMessage>> {
        let sql = format!("SELECT {ROW_COLUMNS} FROM outbox WHERE id = ?");
        sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(self.pool())
            .await
            .map_err(db_err)?
            .map(|r| decode_row(&r).map(|d| d.msg))
            .transpose()
    }
}

impl OutboxClaimer for SqliteOutbox {
    async fn claim(&self, req: &ClaimRequest) -> OutboxResult<Vec<OutboxMessage>> {
        if req.limit == 0 {
            return Ok(Vec::new());
        }
        let limit = req.limit;
        // A read first (WAL readers never wait for the writer): an idle
        // relay polling every few milliseconds must not take the write lock
        // that enqueues and other writers of the file need. It over-reports
        // (a due, free message that is not its key's head), never
        // under-reports, so the claim below still decides.
        let probe = format!(
            "WITH clock AS (SELECT {NOW_NS} AS now)
             SELECT EXISTS (
                 SELECT 1 FROM outbox
                  WHERE status = 'pending'
                    AND (next_attempt_at IS NULL OR next_attempt_at <= (SELECT now FROM clock))
                    AND (claimed_by IS NULL OR lease_until <= (SELECT now FROM clock)
                         OR claimed_by = ?1))"
        );
        let any_claimable: bool = sqlx::query_scalar(&probe)
            .bind(req.worker.as_str())
            .fetch_one(self.pool())
            .await
            .map_err(db_err)?;
        if !any_claimable {
            return Ok(Vec::new());
        }
        let mut tx = self.begin_immediate().await?;
        let now = db_now(&mut tx).await?;
        let lease_until = now.saturating_add(nanos(req.lease));
        let unfinished = match req.dead_letter_policy {
            DeadLetterPolicy::SkipKey => "status = 'pending'",
            DeadLetterPolicy::BlockKey => "status IN ('pending', 'dead')",
        };
        // The heads of keys (first unfinished message) that are claimable
        // now, oldest first: each one gives at least one message.
        let heads_sql = format!(
            "SELECT o.partition_key, o.sequence
               FROM outbox o
               JOIN (SELECT partition_key, MIN(sequence) AS seq FROM outbox
                      WHERE {unfinished} GROUP BY partition_key) h
                 ON o.sequence = h.seq
              WHERE o.status = 'pending'
                AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= ?1)
                AND (o.claimed_by IS NULL OR o.lease_until <= ?1 OR o.claimed_by = ?2)
              ORDER BY o.sequence
              LIMIT ?3"
        );
        let heads: Vec<(String, i64)> = sqlx::query_as(&heads_sql)
            .bind(now)
            .bind(req.worker.as_str())
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
        let followers_sql = format!(
            "SELECT {ROW_COLUMNS} FROM outbox
              WHERE partition_key = ? AND sequence >= ? AND status <> 'published'
              ORDER BY sequence LIMIT ?"
        );
        let free = |d: &Decoded| {
            d.claimed_by.is_none()
                || d.lease_until.is_none_or(|until| until <= now)
                || d.claimed_by.as_deref() == Some(req.worker.as_str())
        };
        let mut picked: Vec<OutboxMessage> = Vec::new();
        for (key, head) in heads {
            if picked.len() >= limit {
                break;
            }
            let mut from = head;
            let key_limit = picked.len() + MAX_PER_KEY_IN_BATCH.min(limit - picked.len());
            'key: loop {
                let page = key_limit - picked.len() + 1;
                let rows = sqlx::query(&followers_sql)
                    .bind(key.as_str())
                    .bind(from)
                    .bind(i64::try_from(page).unwrap_or(i64::MAX))
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db_err)?;
                let n = rows.len();
                for row in &rows {
                    let d = decode_row(row)?;
                    from = i64::try_from(d.msg.sequence)
                        .unwrap_or(i64::MAX)
                        .saturating_add(1);
                    match d.msg.status {
                        OutboxStatus::Dead
                            if req.dead_letter_policy == DeadLetterPolicy::SkipKey =>
                        {
                            continue;
                        }
                        OutboxStatus::Pending => {}
                        _ => break 'key,
                    }
                    let due = d.next_attempt.is_none_or(|t| t <= now);
                    if !free(&d) || !due || picked.len() >= key_limit {
                        break 'key;
                    }
                    picked.push(d.msg);
                }
                if n < page {
                    break;
                }
            }
        }
        if picked.is_empty() {
            tx.rollback().await.map_err(db_err)?;
            return Ok(picked);
        }
        picked.sort_unstable_by_key(|m| m.sequence);
        let ids: Vec<MessageId> = picked.iter().map(OutboxMessage::id).collect();
        sqlx::query(
            "UPDATE outbox SET claimed_by = ?, lease_until = ?
              WHERE id IN (SELECT value FROM json_each(?))",
        )
        .bind(req.worker.as_str())
        .bind(lease_until)
        .bind(id_list(&ids))
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(picked)
    }

    async fn mark_published(&self, ids: &[MessageId]) -> OutboxResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_immediate().await?;
        let now = db_now(&mut tx).await?;
        sqlx::query(
            "UPDATE outbox
                SET status = 'published', published_at = ?, claimed_by = NULL, lease_until = NULL
              WHERE status = 'pending' AND id IN (SELECT value FROM json_each(?))",
        )
        .bind(now)
        .bind(id_list(ids))
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)
    }

    async fn mark_failed(
        &self,
        id: MessageId,
        failure: &PublishFailure,
    ) -> OutboxResult<FailureOutcome> {
        let mut tx = self.begin_immediate().await?;
        let now = db_now(&mut tx).await?;
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT status, attempts FROM outbox WHERE id = ?")
                .bind(id.to_string())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        let Some((status, attempts)) = row else {
            return Err(OutboxError::NotFound(id));
        };
        if status != OutboxStatus::Pending.as_str() {
            return Ok(FailureOutcome::Settled);
        }
        let attempts = u32::try_from(attempts)
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        let dead = failure.dead_now || attempts >= failure.max_attempts;
        let next = now.saturating_add(nanos(failure.retry_in));
        sqlx::query(
            "UPDATE outbox
                SET attempts = ?, last_error = ?, claimed_by = NULL, lease_until = NULL,
                    status = CASE WHEN ? THEN 'dead' ELSE 'pending' END,
                    next_attempt_at = CASE WHEN ? THEN next_attempt_at ELSE ? END
              WHERE id = ?",
        )
        .bind(i64::from(attempts))
        .bind(failure.error.as_str())
        .bind(dead)
        .bind(dead)
        .bind(next)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(if dead {
            FailureOutcome::Dead { attempts }
        } else {
            FailureOutcome::Retrying {
                attempts,
                next_attempt_at: from_nanos(next),
            }
        })
    }

    async fn release(&self, worker: &str, ids: &[MessageId]) -> OutboxResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_immediate().await?;
        sqlx::query(
            "UPDATE outbox SET claimed_by = NULL, lease_until = NULL
              WHERE claimed_by = ? AND id IN (SELECT value FROM json_each(?))",
        )
        .bind(worker)
        .bind(id_list(ids))
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)
    }

    async fn wake_ups(&self) -> OutboxResult<WakeUps> {
        Ok(WakeUps::from_watch(self.wake.subscribe()))
    }
}

impl DeadLetters for SqliteOutbox {
    async fn status(&self) -> OutboxResult<OutboxStatusReport> {
        // One read transaction: the counts and the clock come from one snapshot.
        let mut tx = self.pool().begin().await.map_err(db_err)?;
        let now = db_now(&mut tx).await?;
        let (pending, oldest, dead, published): (i64, Option<i64>, i64, i64) = sqlx::query_as(
            "SELECT COALESCE(SUM(status = 'pending'), 0),
                    MIN(CASE WHEN status = 'pending' THEN created_at END),
                    COALESCE(SUM(status = 'dead'), 0),
                    COALESCE(SUM(status = 'published'), 0)
               FROM outbox",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.rollback().await.map_err(db_err)?;
        let count = |n: i64| u64::try_from(n).unwrap_or_default();
        Ok(OutboxStatusReport {
            pending: count(pending),
            oldest_pending_age: oldest.map(|o| {
                Duration::from_nanos(u64::try_from(now.saturating_sub(o)).unwrap_or_default())
            }),
            dead: count(dead),
            published: count(published),
        })
    }

    async fn dead_letters(&self, limit: usize) -> OutboxResult<Vec<OutboxMessage>> {
        let sql = format!(
            "SELECT {ROW_COLUMNS} FROM outbox WHERE status = 'dead' ORDER BY sequence LIMIT ?"
        );
        sqlx::query(&sql)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(self.pool())
            .await
            .map_err(db_err)?
            .iter()
            .map(|r| decode_row(r).map(|d| d.msg))
            .collect()
    }

    async fn replay(&self, id: MessageId) -> OutboxResult<()> {
        let mut tx = self.begin_immediate().await?;
        dead_only(&mut tx, id).await?;
        let now = db_now(&mut tx).await?;
        sqlx::query(
            "UPDATE outbox
                SET status = 'pending', attempts = 0, next_attempt_at = ?,
                    claimed_by = NULL, lease_until = NULL
              WHERE id = ?",
        )
        .bind(now)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        self.notify();
        Ok(())
    }

    async fn replay_all(&self) -> OutboxResult<u64> {
        let mut tx = self.begin_immediate().await?;
        let now = db_now(&mut tx).await?;
        let done = sqlx::query(
            "UPDATE outbox
                SET status = 'pending', attempts = 0, next_attempt_at = ?,
                    claimed_by = NULL, lease_until = NULL
              WHERE status = 'dead'",
        )
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        if done.rows_affected() > 0 {
            self.notify();
        }
        Ok(done.rows_affected())
    }

    async fn discard(&self, id: MessageId) -> OutboxResult<()> {
        let mut tx = self.begin_immediate().await?;
        dead_only(&mut tx, id).await?;
        sqlx::query("DELETE FROM outbox WHERE id = ?")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        // A key blocked by this dead letter may flow again.
        self.notify();
        Ok(())
    }
}

/// [`OutboxError::NotFound`] or [`OutboxError::NotDead`] unless `id` is a
/// dead letter.
async fn dead_only(conn: &mut SqliteConnection, id: MessageId) -> OutboxResult<()> {
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM outbox WHERE id = ?")
        .bind(id.to_string())
        .fetch_optional(conn)
        .await
        .map_err(db_err)?;
    match status.as_deref() {
        None => Err(OutboxError::NotFound(id)),
        Some(s) if s == OutboxStatus::Dead.as_str() => Ok(()),
        Some(_) => Err(OutboxError::NotDead(id)),
    }
}

impl OutboxRetention for SqliteOutbox {
    async fn purge_published(&self, older_than: Duration) -> OutboxResult<u64> {
        let mut tx = self.begin_immediate().await?;
        let now = db_now(&mut tx).await?;
        let cutoff = now.saturating_sub(nanos(older_than));
        let done =
            sqlx::query("DELETE FROM outbox WHERE status = 'published' AND published_at <= ?")
                .bind(cutoff)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn migrate_twice_is_harmless_and_records_version_2() {
        let outbox = SqliteOutbox::temporary().await.unwrap();
        assert_eq!(outbox.migrate().await.unwrap(), 0);
        let v: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM vextrus_migrations WHERE version = 2")
                .fetch_one(outbox.pool())
                .await
                .unwrap();
        assert_eq!(v, 1);
    }

    #[tokio::test]
    async fn database_clock_is_close_to_the_process_clock() {
        let outbox = SqliteOutbox::temporary().await.unwrap();
        let mut conn = outbox.pool().acquire().await.unwrap();
        let now = from_nanos(db_now(&mut conn).await.unwrap());
        let skew = (Utc::now() - now).num_milliseconds().abs();
        assert!(skew < 1_000, "skew {skew} ms");
    }

    #[tokio::test]
    async fn fresh_message_reads_back_due_at_its_created_at() {
        let outbox = SqliteOutbox::temporary().await.unwrap();
        let mut m = OutboundMessage::new("orders", "k", b"x".to_vec());
        m.headers
            .insert("content-type".into(), "application/json".into());
        outbox.enqueue(std::slice::from_ref(&m)).await.unwrap();
        let row = outbox.get(m.id).await.unwrap().unwrap();
        assert_eq!(row.message, m);
        assert_eq!(row.next_attempt_at, m.created_at);
        assert_eq!(row.sequence, 1);
        assert_eq!(outbox.rows().await.unwrap(), vec![row]);
    }

    #[tokio::test]
    async fn a_message_from_a_fast_producer_clock_is_due_at_once() {
        // The store judges only times it wrote with its own clock: a
        // producer clock an hour ahead does not hold the message back.
        let outbox = SqliteOutbox::temporary().await.unwrap();
        let mut m = OutboundMessage::new("orders", "k", b"x".to_vec());
        m.created_at += chrono::Duration::hours(1);
        outbox.enqueue(std::slice::from_ref(&m)).await.unwrap();
        let req = ClaimRequest {
            worker: "w".into(),
            limit: 10,
            lease: Duration::from_secs(30),
            dead_letter_policy: DeadLetterPolicy::SkipKey,
        };
        let claimed = outbox.claim(&req).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].id(), m.id);
    }

    #[tokio::test]
    async fn claim_walks_past_dead_letters_across_pages() {
        // Key "a": pending, dead, dead, pending; SkipKey with limit 2: the
        // followers query pages past the two dead letters to the fourth.
        let outbox = SqliteOutbox::temporary().await.unwrap();
        let msgs: Vec<_> = (0..4)
            .map(|i| OutboundMessage::new("orders", "a", vec![i]))
            .collect();
        outbox.enqueue(&msgs).await.unwrap();
        let mut req = ClaimRequest {
            worker: "w".into(),
            limit: 4,
            lease: Duration::from_secs(30),
            dead_letter_policy: DeadLetterPolicy::SkipKey,
        };
        assert_eq!(outbox.claim(&req).await.unwrap().len(), 4);
        let dead = PublishFailure {
            error: "no".into(),
            retry_in: Duration::ZERO,
            max_attempts: 1,
            dead_now: true,
        };
        outbox.mark_failed(msgs[1].id, &dead).await.unwrap();
        outbox.mark_failed(msgs[2].id, &dead).await.unwrap();
        outbox
            .release("w", &[msgs[0].id, msgs[3].id])
            .await
            .unwrap();
        req.limit = 2;
        let c = outbox.claim(&req).await.unwrap();
        assert_eq!(
            c.iter().map(|m| m.id()).collect::<Vec<_>>(),
            vec![msgs[0].id, msgs[3].id]
        );
        req.worker = "other".into();
        assert!(outbox.claim(&req).await.unwrap().is_empty(), "key held");
        // BlockKey stops at the first dead letter.
        outbox
            .release("w", &[msgs[0].id, msgs[3].id])
            .await
            .unwrap();
        req.dead_letter_policy = DeadLetterPolicy::BlockKey;
        let c = outbox.claim(&req).await.unwrap();
        assert_eq!(
            c.iter().map(|m| m.id()).collect::<Vec<_>>(),
            vec![msgs[0].id]
        );
    }
}
