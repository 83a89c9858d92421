//! [`SqliteOutbox`]: the transactional outbox on SQLite, sharing the event
//! store's file, pool and transactions.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, Transaction};
use tokio::sync::watch;
use vextrus_core::WakeUps;
use vextrus_core::outbox::{
    ClaimRequest, DeadLetterPolicy, DeadLetters, FailureOutcome, LaneLedger, LanePlan,
    OutboxClaimer, OutboxError, OutboxMessage, OutboxResult, OutboxRetention, OutboxStatus,
    OutboxStatusReport, OutboxStore, PublishFailure, lane_of, validate_outbound,
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

/// At most this many messages of one partition key in one claimed batch,
/// on the per-row path (a lane hands out a prefix of its rows, whatever
/// their keys).
///
/// The relay publishes a batch in rounds (the r-th message of every key)
/// and settles each round with its own commit, so a batch holding 200
/// messages of one key costs 200 commits (each an fsync with
/// `synchronous=FULL`), while 200 messages over 25 keys cost 8. The claim
/// rule allows it: a key's followers *may* join their head's batch; the
/// rest come in the next batch, in order.
pub const MAX_PER_KEY_IN_BATCH: usize = 8;

/// At most this many lanes hand rows to one claim (the free lanes with the
/// oldest rows past their cursors).
const MAX_LANES_PER_CLAIM: usize = 16;

/// Rows per multi-row `INSERT` (7 parameters each, well under SQLite's limit).
const INSERT_CHUNK: usize = 1_000;

/// The columns of a row as stored (the per-row path, and lane rows as a
/// claim returns them: pending).
const ROW_COLUMNS: &str = "sequence, id, destination, partition_key, payload, headers, created_at, \
     status, attempts, next_attempt_at, last_error, published_at, claimed_by, lease_until";

/// A row as readers see it, from `outbox o LEFT JOIN outbox_lanes c`: a
/// lane row at or below its lane's cursor is published, at the time of the
/// first lane mark that covers it.
const READ_SELECT: &str = "SELECT o.sequence, o.id, o.destination, o.partition_key, o.payload, \
     o.headers, o.created_at, \
     CASE WHEN o.sequence <= c.cursor THEN 'published' ELSE o.status END AS status, \
     o.attempts, o.next_attempt_at, o.last_error, \
     CASE WHEN o.sequence <= c.cursor THEN \
         (SELECT g.published_at FROM outbox_lane_log g \
           WHERE g.lane = o.lane AND g.through >= o.sequence ORDER BY g.through LIMIT 1) \
     ELSE o.published_at END AS published_at, \
     o.claimed_by, o.lease_until \
     FROM outbox o LEFT JOIN outbox_lanes c ON c.lane = o.lane";

/// The outbox on SQLite: [`OutboxStore`], [`OutboxClaimer`],
/// [`DeadLetters`], [`OutboxRetention`], the
/// [`UnitOfWork`](vextrus_core::unit_of_work::UnitOfWork) (events, outbox,
/// inbox and the service's own SQL in one transaction; see
/// [`SqliteUnitOfWorkTx`](crate::SqliteUnitOfWorkTx)) and the
/// [`InboxStore`](vextrus_core::inbox::InboxStore), over one
/// [`SqliteEventStore`]'s file and pool.
///
/// - **Lanes** ([`lanes`](vextrus_core::outbox::lanes)): an enqueued
///   message goes into the lane of its partition key
///   ([`lane_of`](vextrus_core::outbox::lane_of), 64 lanes) and stays
///   `pending` in its row; each lane has a cursor, and a lane row is
///   published exactly when its sequence is at or below its lane's cursor.
///   A claim leases whole lanes (the free ones with the oldest rows past
///   their cursors, at most 16) and returns a prefix
///   of each lane's rows; a settle that publishes a lane's claimed rows
///   moves its cursor in one write (and logs when, for `published_at` and
///   retention) instead of writing every row. SQLite has one writer, so
///   rows commit in sequence order and a cursor never passes a row that
///   commits later. Which rows each worker claimed in a lane is kept in
///   this process ([`LaneLedger`], shared by clones); another process's
///   late settle, or a crash, just lets the lease run out and the lane is
///   claimed again from its cursor.
/// - **Per-row path**: a row that leaves its lane — it failed (attempts,
///   backoff, dead letter), it was published on its own, or its key has an
///   earlier unfinished row off the lanes (a retry, a replayed or blocking
///   dead letter), and every row written before the lanes existed — is
///   claimed and settled row by row, as before: a claim takes these first.
/// - **Claims** run in `BEGIN IMMEDIATE` transactions: SQLite has one
///   writer, so selecting the claimable heads of partition keys and marking
///   them claimed is atomic, and relay workers in this process or others
///   sharing the file never hold one key at once. The rule is the
///   [`store`](vextrus_core::outbox::store) module's: a message is claimable
///   when it is the head of its key (no earlier unfinished message, on or
///   off the lanes), due, and not leased to another worker; on the per-row
///   path the key's next pending, due messages follow it in the same batch,
///   at most [`MAX_PER_KEY_IN_BATCH`] of the key per batch (so a batch
///   spreads over keys).
/// - **Clock**: leases, backoff, `published_at`, retention and ages are
///   computed and compared with the database's clock (`julianday('now')`,
///   read inside the write transaction, millisecond precision), never with
///   a time a producer wrote. A freshly enqueued message is due at once
///   (its `next_attempt_at` reads back as its `created_at`).
/// - **Wake-ups**: enqueues, replays and unit-of-work commits through this
///   store (or a clone) wake this process's relay workers at once; other
///   processes sharing the file are seen by the relay's polling.
///
/// Clones share the pool, the wake-up channel and the lane ledger.
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
    lanes: Arc<LaneLedger>,
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
            lanes: Arc::new(LaneLedger::default()),
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

    /// Pending messages under a live lease (a relay worker is publishing
    /// them), by the database clock: per-row messages claimed by a worker,
    /// and the rows past the cursor of every leased lane (a lane's claim
    /// covers its rows from the cursor; rows enqueued into a leased lane
    /// after the claim count too, until the lane is settled).
    ///
    /// ```
    /// use std::time::Duration;
    /// use vextrus_core::outbox::{ClaimRequest, DeadLetterPolicy, OutboxClaimer, OutboxStore};
    /// use vextrus_core::transport::OutboundMessage;
    /// use vextrus_sqlite::SqliteOutbox;
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let outbox = SqliteOutbox::temporary().await.unwrap();
    /// outbox.enqueue(&[OutboundMessage::new("orders", "a", b"1".to_vec())]).await.unwrap();
    /// assert_eq!(outbox.leased().await.unwrap(), 0);
    /// let req = ClaimRequest { worker: "w".into(), limit: 10, lease: Duration::from_secs(30), dead_letter_policy: DeadLetterPolicy::SkipKey };
    /// let batch = outbox.claim(&req).await.unwrap();
    /// assert_eq!(outbox.leased().await.unwrap(), 1);
    /// outbox.release("w", &[batch[0].id()]).await.unwrap();
    /// assert_eq!(outbox.leased().await.unwrap(), 0);
    /// # });
    /// ```
    pub async fn leased(&self) -> OutboxResult<u64> {
        let sql = format!(
            "WITH clock AS (SELECT {NOW_NS} AS now)
             SELECT (SELECT COUNT(*) FROM outbox
                      WHERE lane IS NULL AND status = 'pending' AND claimed_by IS NOT NULL
                        AND lease_until > (SELECT now FROM clock))
                  + (SELECT COUNT(*) FROM outbox_lanes c JOIN outbox o
                         ON o.lane = c.lane AND o.sequence > c.cursor
                      WHERE c.claimed_by IS NOT NULL AND c.lease_until > (SELECT now FROM clock))"
        );
        let n: i64 = sqlx::query_scalar(&sql)
            .fetch_one(self.pool())
            .await
            .map_err(db_err)?;
        Ok(u64::try_from(n).unwrap_or_default())
    }

    /// Every outbox row (any status), in sequence order (a lane row at or
    /// below its lane's cursor reads as published).
    pub async fn rows(&self) -> OutboxResult<Vec<OutboxMessage>> {
        let sql = format!("{READ_SELECT} ORDER BY o.sequence");
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
/// connection inside a write transaction, in order, each in the lane of its
/// partition key (one writer: the rows commit in sequence order).
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
            "INSERT INTO outbox (id, destination, partition_key, payload, headers, created_at, lane) ",
        );
        qb.push_values(chunk, |mut b, (m, created, headers)| {
            b.push_bind(m.id.to_string())
                .push_bind(m.destination.as_str())
                .push_bind(m.partition_key.as_str())
                .push_bind(m.payload.as_slice())
                .push_bind(headers.as_str())
                .push_bind(*created)
                .push_bind(lane_of(&m.partition_key));
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
    // Text columns are read in place (no copy before parsing them).
    let id: &str = row.try_get("id").map_err(db_err)?;
    let id: MessageId = id.parse().map_err(|e| backend("id", e))?;
    let headers: &str = row.try_get("headers").map_err(db_err)?;
    let headers: Headers = serde_json::from_str(headers).map_err(|e| backend("headers", e))?;
    let status: &str = row.try_get("status").map_err(db_err)?;
    let status = OutboxStatus::parse(status).ok_or_else(|| backend("status", status))?;
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
        let sql = format!("{READ_SELECT} WHERE o.id = ?");
        sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(self.pool())
            .await
            .map_err(db_err)?
            .map(|r| decode_row(&r).map(|d| d.msg))
            .transpose()
    }
}

impl SqliteOutbox {
    /// Settles ids as one transaction (see [`LaneLedger::plan`]): per-row
    /// ids row by row, lane rows by their lane's cursor. `worker` is `None`
    /// for [`OutboxClaimer::mark_published`] and
    /// [`OutboxClaimer::mark_failed`] (whichever worker claimed a lane row).
    /// Returns the failures' outcomes in the order of `failed`.
    async fn settle_rows(
        &self,
        worker: Option<&str>,
        published: &[MessageId],
        failed: &[(MessageId, &PublishFailure)],
        released: &[MessageId],
    ) -> OutboxResult<Vec<FailureOutcome>> {
        if published.is_empty() && failed.is_empty() && released.is_empty() {
            return Ok(Vec::new());
        }
        let failed_ids: Vec<MessageId> = failed.iter().map(|(id, _)| *id).collect();
        let plan = self.lanes.plan(worker, published, &failed_ids, released);
        let applied = self.apply_plan(worker, &plan, failed).await;
        if applied.is_err() {
            // Nothing was written: these lanes' leases run out and they are
            // claimed again from their cursors.
            let lanes = plan
                .lane_published
                .iter()
                .chain(&plan.lane_failed)
                .map(|r| (r.worker.as_str(), r.lane))
                .chain(plan.advances.iter().map(|a| (a.worker.as_str(), a.lane)));
            for (w, lane) in lanes {
                self.lanes.forget(w, lane);
            }
        }
        applied
    }

    async fn apply_plan(
        &self,
        worker: Option<&str>,
        plan: &LanePlan,
        failed: &[(MessageId, &PublishFailure)],
    ) -> OutboxResult<Vec<FailureOutcome>> {
        let mut tx = self.begin_immediate().await?;
        let now = db_now(&mut tx).await?;
        // Per-row published ids; a lane row among them that no worker of
        // this process holds (never claimed here) is published on its own
        // row and leaves its lane, unless its cursor already covers it. A
        // lane row another worker holds (this one's lease ran out and the
        // lane was claimed again) is left to that worker.
        let own: Vec<MessageId> = plan
            .per_row_published
            .iter()
            .copied()
            .filter(|id| !self.lanes.holds(*id))
            .collect();
        if !own.is_empty() {
            sqlx::query(
                "UPDATE outbox
                    SET status = 'published', published_at = ?1, claimed_by = NULL,
                        lease_until = NULL, lane = NULL
                  WHERE status = 'pending' AND id IN (SELECT value FROM json_each(?2))
                    AND (lane IS NULL
                         OR sequence > (SELECT c.cursor FROM outbox_lanes c
                                         WHERE c.lane = outbox.lane))",
            )
            .bind(now)
            .bind(id_list(&own))
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        // Lane rows published past their lane's new cursor (or in a lane
        // not settled yet): on their own rows, while the worker still holds
        // the lane.
        let mut by_worker: HashMap<&str, Vec<MessageId>> = HashMap::new();
        for row in &plan.lane_published {
            by_worker
                .entry(row.worker.as_str())
                .or_default()
                .push(row.id);
        }
        for (w, ids) in by_worker {
            sqlx::query(
                "UPDATE outbox
                    SET status = 'published', published_at = ?1, lane = NULL
                  WHERE id IN (SELECT value FROM json_each(?2))
                    AND status = 'pending'
                    AND EXISTS (SELECT 1 FROM outbox_lanes c
                                 WHERE c.lane = outbox.lane AND c.claimed_by = ?3
                                   AND outbox.sequence > c.cursor)",
            )
            .bind(now)
            .bind(id_list(&ids))
            .bind(w)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        // Failures, in the order given.
        let mut lane_failed: HashMap<MessageId, &str> = plan
            .lane_failed
            .iter()
            .map(|r| (r.id, r.worker.as_str()))
            .collect();
        let mut outcomes = Vec::with_capacity(failed.len());
        for (id, failure) in failed {
            let holder = lane_failed.remove(id);
            let row: Option<FailedRow> = sqlx::query_as(
                "SELECT o.status, o.attempts, o.lane, o.sequence, c.cursor, c.claimed_by
                   FROM outbox o LEFT JOIN outbox_lanes c ON c.lane = o.lane
                  WHERE o.id = ?",
            )
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err)?;
            let Some((status, attempts, lane, sequence, cursor, claimed_by)) = row else {
                return Err(OutboxError::NotFound(*id));
            };
            let pending = status == OutboxStatus::Pending.as_str();
            let in_lane = lane.is_some() && cursor.is_some_and(|c| sequence > c);
            let eligible = match holder {
                // A lane row of this claim: only while the worker holds the lane.
                Some(w) => pending && in_lane && claimed_by.as_deref() == Some(w),
                // A per-row row, or a lane row claimed by no worker of this
                // process (never claimed here): on its own row.
                None => pending && (lane.is_none() || (in_lane && !self.lanes.holds(*id))),
            };
            outcomes.push(if eligible {
                record_failure(&mut tx, *id, attempts, failure, now).await?
            } else {
                FailureOutcome::Settled
            });
        }
        if let Some(w) = worker
            && !plan.per_row_released.is_empty()
        {
            sqlx::query(
                "UPDATE outbox SET claimed_by = NULL, lease_until = NULL
                  WHERE claimed_by = ? AND lane IS NULL
                    AND id IN (SELECT value FROM json_each(?))",
            )
            .bind(w)
            .bind(id_list(&plan.per_row_released))
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        // Lanes fully settled: the cursor moves (and the move is logged),
        // the lease ends — if the worker still holds the lane.
        for adv in &plan.advances {
            let cursor: Option<i64> = sqlx::query_scalar(
                "SELECT cursor FROM outbox_lanes WHERE lane = ? AND claimed_by = ?",
            )
            .bind(adv.lane)
            .bind(adv.worker.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_err)?;
            let Some(cursor) = cursor else {
                continue;
            };
            let moved = adv
                .cursor
                .map(|c| i64::try_from(c).unwrap_or(i64::MAX))
                .filter(|c| *c > cursor);
            sqlx::query(
                "UPDATE outbox_lanes SET cursor = ?, claimed_by = NULL, lease_until = NULL
                  WHERE lane = ?",
            )
            .bind(moved.unwrap_or(cursor))
            .bind(adv.lane)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
            if let Some(through) = moved {
                sqlx::query(
                    "INSERT INTO outbox_lane_log (lane, through, published_at) VALUES (?, ?, ?)",
                )
                .bind(adv.lane)
                .bind(through)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            }
        }
        tx.commit().await.map_err(db_err)?;
        Ok(outcomes)
    }
}

/// A row a failure is reported for: status, attempts, lane, sequence, and
/// its lane's cursor and holder.
type FailedRow = (String, i64, Option<i32>, i64, Option<i64>, Option<String>);

/// Records one failed attempt of a pending row: attempts + 1, the error,
/// and a retry at `now + retry_in` or a dead letter; the claim ends and the
/// row leaves its lane (for the per-row path).
async fn record_failure(
    conn: &mut SqliteConnection,
    id: MessageId,
    attempts: i64,
    failure: &PublishFailure,
    now: i64,
) -> OutboxResult<FailureOutcome> {
    let attempts = u32::try_from(attempts)
        .unwrap_or(u32::MAX)
        .saturating_add(1);
    let dead = failure.dead_now || attempts >= failure.max_attempts;
    let next = now.saturating_add(nanos(failure.retry_in));
    sqlx::query(
        "UPDATE outbox
            SET attempts = ?, last_error = ?, claimed_by = NULL, lease_until = NULL, lane = NULL,
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
    .execute(conn)
    .await
    .map_err(db_err)?;
    Ok(if dead {
        FailureOutcome::Dead { attempts }
    } else {
        FailureOutcome::Retrying {
            attempts,
            next_attempt_at: from_nanos(next),
        }
    })
}

/// Each lane's cursor.
async fn lane_cursors(conn: &mut SqliteConnection) -> OutboxResult<HashMap<i32, i64>> {
    let rows: Vec<(i32, i64)> = sqlx::query_as("SELECT lane, cursor FROM outbox_lanes")
        .fetch_all(conn)
        .await
        .map_err(db_err)?;
    Ok(rows.into_iter().collect())
}

/// The first row of `key` still in its lane (past the cursor) with a
/// sequence after `after` and before `before`: the key's per-row rows after
/// it wait until it is published.
async fn first_in_lane(
    conn: &mut SqliteConnection,
    cursors: &HashMap<i32, i64>,
    key: &str,
    after: i64,
    before: i64,
) -> OutboxResult<Option<i64>> {
    let lane = lane_of(key);
    let from = after.max(cursors.get(&lane).copied().unwrap_or(0));
    if from.saturating_add(1) >= before {
        return Ok(None);
    }
    sqlx::query_scalar(
        "SELECT sequence FROM outbox
          WHERE lane = ? AND sequence > ? AND sequence < ? AND partition_key = ?
          ORDER BY sequence LIMIT 1",
    )
    .bind(lane)
    .bind(from)
    .bind(before)
    .bind(key)
    .fetch_optional(conn)
    .await
    .map_err(db_err)
}

/// The "unfinished" condition of a claim's dead-letter policy, on a row's
/// `status`.
fn unfinished(policy: DeadLetterPolicy) -> &'static str {
    match policy {
        DeadLetterPolicy::SkipKey => "status = 'pending'",
        DeadLetterPolicy::BlockKey => "status IN ('pending', 'dead')",
    }
}

/// The per-row half of a claim: heads of keys off the lanes and their
/// followers (not yet marked claimed), at most `limit`.
async fn claim_per_row(
    conn: &mut SqliteConnection,
    req: &ClaimRequest,
    now: i64,
    limit: usize,
) -> OutboxResult<Vec<OutboxMessage>> {
    let unfinished = unfinished(req.dead_letter_policy);
    // The heads of keys (first unfinished message) that are claimable
    // now, oldest first: each one gives at least one message.
    let heads_sql = format!(
        "SELECT o.partition_key, o.sequence
           FROM outbox o
           JOIN (SELECT partition_key, MIN(sequence) AS seq FROM outbox
                  WHERE lane IS NULL AND {unfinished} GROUP BY partition_key) h
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
        .fetch_all(&mut *conn)
        .await
        .map_err(db_err)?;
    let mut picked: Vec<OutboxMessage> = Vec::new();
    if heads.is_empty() {
        return Ok(picked);
    }
    let cursors = lane_cursors(&mut *conn).await?;
    let followers_sql = format!(
        "SELECT {ROW_COLUMNS} FROM outbox
          WHERE partition_key = ? AND sequence >= ? AND lane IS NULL AND status <> 'published'
          ORDER BY sequence LIMIT ?"
    );
    let free = |d: &Decoded| {
        d.claimed_by.is_none()
            || d.lease_until.is_none_or(|until| until <= now)
            || d.claimed_by.as_deref() == Some(req.worker.as_str())
    };
    for (key, head) in heads {
        if picked.len() >= limit {
            break;
        }
        // A key's row still in its lane before the head goes first.
        if first_in_lane(&mut *conn, &cursors, &key, 0, head)
            .await?
            .is_some()
        {
            continue;
        }
        let start = picked.len();
        let mut from = head;
        let key_limit = picked.len() + MAX_PER_KEY_IN_BATCH.min(limit - picked.len());
        'key: loop {
            let page = key_limit - picked.len() + 1;
            let rows = sqlx::query(&followers_sql)
                .bind(key.as_str())
                .bind(from)
                .bind(i64::try_from(page).unwrap_or(i64::MAX))
                .fetch_all(&mut *conn)
                .await
                .map_err(db_err)?;
            let n = rows.len();
            for row in &rows {
                let d = decode_row(row)?;
                from = i64::try_from(d.msg.sequence)
                    .unwrap_or(i64::MAX)
                    .saturating_add(1);
                match d.msg.status {
                    OutboxStatus::Dead if req.dead_letter_policy == DeadLetterPolicy::SkipKey => {
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
        // Followers behind a row of the key still in its lane wait too.
        if let Some(last) = picked.last().filter(|_| picked.len() > start + 1) {
            let last = i64::try_from(last.sequence).unwrap_or(i64::MAX);
            if let Some(block) = first_in_lane(&mut *conn, &cursors, &key, head, last).await? {
                let keep = picked[start..]
                    .iter()
                    .take_while(|m| i64::try_from(m.sequence).unwrap_or(i64::MAX) < block)
                    .count();
                picked.truncate(start + keep);
            }
        }
    }
    Ok(picked)
}

/// The lane half of a claim: the free lanes with the oldest rows past their
/// cursors (at most [`MAX_LANES_PER_CLAIM`]), the oldest `limit` of their
/// rows (a prefix of each lane). Rows whose key has an earlier unfinished
/// row off the lanes leave their lane (and are not returned); the lanes
/// that return rows are leased to the worker, and a lane whose rows all
/// left moves its cursor past them. Returns `(lane, sequence)` per returned
/// row, in sequence order: the rows themselves are read after the commit
/// ([`read_lane_rows`]), so the write lock is held only for this.
async fn claim_lanes(
    conn: &mut SqliteConnection,
    req: &ClaimRequest,
    now: i64,
    lease_until: i64,
    limit: usize,
) -> OutboxResult<Vec<(i32, i64)>> {
    let free: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT lane, cursor FROM (
             SELECT c.lane, c.cursor,
                    (SELECT o.sequence FROM outbox o
                      WHERE o.lane = c.lane AND o.sequence > c.cursor
                      ORDER BY o.sequence LIMIT 1) AS head
               FROM outbox_lanes c
              WHERE c.claimed_by IS NULL OR c.lease_until IS NULL OR c.lease_until <= ?1)
          WHERE head IS NOT NULL
          ORDER BY head
          LIMIT ?2",
    )
    .bind(now)
    .bind(i64::try_from(MAX_LANES_PER_CLAIM).unwrap_or(i64::MAX))
    .fetch_all(&mut *conn)
    .await
    .map_err(db_err)?;
    if free.is_empty() {
        return Ok(Vec::new());
    }
    // Each lane's first `limit` sequences (from the index alone), and of
    // those the oldest `limit`: a prefix of each lane. One statement.
    let page = i64::try_from(limit).unwrap_or(i64::MAX);
    let per_lane = vec![
        "SELECT * FROM (SELECT sequence FROM outbox WHERE lane = ? AND sequence > ? \
         ORDER BY sequence LIMIT ?)";
        free.len()
    ];
    let picks_sql = format!(
        "SELECT lane, sequence, partition_key FROM outbox
          WHERE sequence IN (SELECT sequence FROM ({}) ORDER BY sequence LIMIT ?)
          ORDER BY sequence",
        per_lane.join(" UNION ALL ")
    );
    let mut query = sqlx::query_as::<_, (i32, i64, String)>(&picks_sql);
    for (lane, cursor) in &free {
        query = query.bind(*lane).bind(*cursor).bind(page);
    }
    let picks = query
        .bind(page)
        .fetch_all(&mut *conn)
        .await
        .map_err(db_err)?;
    // Keys with an earlier unfinished row off the lanes: their rows after
    // it leave the lane for the key's per-row queue.
    let keys: Vec<&str> = picks
        .iter()
        .map(|(_, _, key)| key.as_str())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let blockers_sql = format!(
        "SELECT partition_key, MIN(sequence) FROM outbox
          WHERE lane IS NULL AND status <> 'published' AND {}
            AND partition_key IN (SELECT value FROM json_each(?))
          GROUP BY partition_key",
        unfinished(req.dead_letter_policy)
    );
    let blockers: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(&blockers_sql)
        .bind(serde_json::Value::from(keys).to_string())
        .fetch_all(&mut *conn)
        .await
        .map_err(db_err)?
        .into_iter()
        .collect();
    let mut kept: Vec<(i32, i64)> = Vec::with_capacity(picks.len());
    let mut diverted: Vec<(i32, i64)> = Vec::new();
    for (lane, seq, key) in picks {
        if blockers.get(&key).is_some_and(|u| seq > *u) {
            diverted.push((lane, seq));
        } else {
            kept.push((lane, seq));
        }
    }
    if !diverted.is_empty() {
        let seqs: Vec<i64> = diverted.iter().map(|(_, seq)| *seq).collect();
        sqlx::query(
            "UPDATE outbox SET lane = NULL WHERE sequence IN (SELECT value FROM json_each(?))",
        )
        .bind(serde_json::Value::from(seqs).to_string())
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
        // A lane whose rows all left: its cursor moves past them.
        let mut emptied: HashMap<i32, i64> = HashMap::new();
        for (lane, seq) in &diverted {
            if !kept.iter().any(|(l, _)| l == lane) {
                let through = emptied.entry(*lane).or_default();
                *through = (*through).max(*seq);
            }
        }
        for (lane, through) in emptied {
            sqlx::query("UPDATE outbox_lanes SET cursor = max(cursor, ?) WHERE lane = ?")
                .bind(through)
                .bind(lane)
                .execute(&mut *conn)
                .await
                .map_err(db_err)?;
        }
    }
    if !kept.is_empty() {
        let lanes: HashSet<i32> = kept.iter().map(|(lane, _)| *lane).collect();
        sqlx::query(
            "UPDATE outbox_lanes SET claimed_by = ?, lease_until = ?
              WHERE lane IN (SELECT value FROM json_each(?))",
        )
        .bind(req.worker.as_str())
        .bind(lease_until)
        .bind(serde_json::Value::from(lanes.into_iter().collect::<Vec<_>>()).to_string())
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    }
    Ok(kept)
}

/// Reads the rows a lane claim returned, after its commit (a WAL read: no
/// lock). The lanes are leased to the claiming worker, so their rows past
/// the cursor do not change meanwhile; a row that left its lane since (an
/// out-of-band settle by another process) is not returned, and the
/// lane's cursor may pass it harmlessly.
async fn read_lane_rows(
    pool: &sqlx::SqlitePool,
    picks: &[(i32, i64)],
) -> OutboxResult<Vec<(i32, OutboxMessage)>> {
    let seqs: Vec<i64> = picks.iter().map(|(_, seq)| *seq).collect();
    let sql = format!(
        "SELECT {ROW_COLUMNS}, lane FROM outbox
          WHERE sequence IN (SELECT value FROM json_each(?)) AND lane IS NOT NULL
          ORDER BY sequence"
    );
    let mut rows = Vec::with_capacity(seqs.len());
    for row in sqlx::query(&sql)
        .bind(serde_json::Value::from(seqs).to_string())
        .fetch_all(pool)
        .await
        .map_err(db_err)?
    {
        let lane: i32 = row.try_get("lane").map_err(db_err)?;
        rows.push((lane, decode_row(&row)?.msg));
    }
    Ok(rows)
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
        // (a due, free message that is not its key's head; a lane row that
        // will leave its lane), never under-reports, so the claim below
        // still decides.
        let probe = format!(
            "WITH clock AS (SELECT {NOW_NS} AS now)
             SELECT EXISTS (
                 SELECT 1 FROM outbox
                  WHERE status = 'pending' AND lane IS NULL
                    AND (next_attempt_at IS NULL OR next_attempt_at <= (SELECT now FROM clock))
                    AND (claimed_by IS NULL OR lease_until <= (SELECT now FROM clock)
                         OR claimed_by = ?1))
                 OR EXISTS (
                 SELECT 1 FROM outbox_lanes c
                  WHERE (c.claimed_by IS NULL OR c.lease_until IS NULL
                         OR c.lease_until <= (SELECT now FROM clock))
                    AND EXISTS (SELECT 1 FROM outbox o
                                 WHERE o.lane = c.lane AND o.sequence > c.cursor))"
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
        let mut picked = claim_per_row(&mut tx, req, now, limit).await?;
        if !picked.is_empty() {
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
        }
        let lane_picks = if picked.len() < limit {
            claim_lanes(&mut tx, req, now, lease_until, limit - picked.len()).await?
        } else {
            Vec::new()
        };
        tx.commit().await.map_err(db_err)?;
        if !lane_picks.is_empty() {
            // Should this read fail, the lanes' leases run out and they are
            // claimed again from their cursors.
            let lane_rows = read_lane_rows(self.pool(), &lane_picks).await?;
            self.lanes.record(
                &req.worker,
                lane_rows
                    .iter()
                    .map(|(lane, m)| (*lane, m.sequence, m.id())),
            );
            picked.extend(lane_rows.into_iter().map(|(_, m)| m));
        }
        picked.sort_unstable_by_key(|m| m.sequence);
        Ok(picked)
    }

    async fn mark_published(&self, ids: &[MessageId]) -> OutboxResult<()> {
        self.settle_rows(None, ids, &[], &[]).await.map(drop)
    }

    async fn mark_failed(
        &self,
        id: MessageId,
        failure: &PublishFailure,
    ) -> OutboxResult<FailureOutcome> {
        let mut outcomes = self.settle_rows(None, &[], &[(id, failure)], &[]).await?;
        Ok(outcomes.pop().unwrap_or(FailureOutcome::Settled))
    }

    async fn release(&self, worker: &str, ids: &[MessageId]) -> OutboxResult<()> {
        self.settle_rows(Some(worker), &[], &[], ids)
            .await
            .map(drop)
    }

    async fn settle(
        &self,
        worker: &str,
        published: &[MessageId],
        failed: &[(MessageId, PublishFailure)],
        released: &[MessageId],
    ) -> OutboxResult<Vec<FailureOutcome>> {
        let failed: Vec<(MessageId, &PublishFailure)> =
            failed.iter().map(|(id, f)| (*id, f)).collect();
        self.settle_rows(Some(worker), published, &failed, released)
            .await
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
        // A lane row is published at or below its lane's cursor, pending
        // past it.
        let (pending, oldest, dead, published): (i64, Option<i64>, i64, i64) = sqlx::query_as(
            "SELECT COALESCE(SUM(o.status = 'pending' AND NOT COALESCE(o.sequence <= c.cursor, 0)), 0),
                    MIN(CASE WHEN o.status = 'pending' AND NOT COALESCE(o.sequence <= c.cursor, 0)
                             THEN o.created_at END),
                    COALESCE(SUM(o.status = 'dead'), 0),
                    COALESCE(SUM(o.status = 'published' OR COALESCE(o.sequence <= c.cursor, 0)), 0)
               FROM outbox o LEFT JOIN outbox_lanes c ON c.lane = o.lane",
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
        // Dead rows are never in a lane.
        let sql = format!("{READ_SELECT} WHERE o.status = 'dead' ORDER BY o.sequence LIMIT ?");
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
        let mut deleted = sqlx::query(
            "DELETE FROM outbox WHERE lane IS NULL AND status = 'published' AND published_at <= ?",
        )
        .bind(cutoff)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?
        .rows_affected();
        // Lane rows: those covered by a lane mark older than the cut-off
        // (per lane, the latest such mark), then those marks.
        let confirmed: Vec<(i32, i64)> = sqlx::query_as(
            "SELECT lane, MAX(through) FROM outbox_lane_log WHERE published_at <= ? GROUP BY lane",
        )
        .bind(cutoff)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
        for (lane, through) in confirmed {
            deleted += sqlx::query("DELETE FROM outbox WHERE lane = ? AND sequence <= ?")
                .bind(lane)
                .bind(through)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?
                .rows_affected();
        }
        sqlx::query("DELETE FROM outbox_lane_log WHERE published_at <= ?")
            .bind(cutoff)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rows_written_before_the_lanes_migration_are_published_first_per_row() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}?mode=rwc", dir.path().join("old.db").display());
        let store = SqliteEventStore::connect(&url).await.unwrap();
        assert_eq!(
            crate::migrate::run_through(store.pool(), 3).await.unwrap(),
            3
        );
        // Pending rows as the outbox wrote them before migration 4.
        let (a1, a2, b1) = (
            OutboundMessage::new("orders", "a", b"a1".to_vec()),
            OutboundMessage::new("orders", "a", b"a2".to_vec()),
            OutboundMessage::new("orders", "b", b"b1".to_vec()),
        );
        for m in [&a1, &a2, &b1] {
            sqlx::query(
                "INSERT INTO outbox (id, destination, partition_key, payload, headers, created_at)
                 VALUES (?, ?, ?, ?, '{}', ?)",
            )
            .bind(m.id.to_string())
            .bind(m.destination.as_str())
            .bind(m.partition_key.as_str())
            .bind(m.payload.as_slice())
            .bind(m.created_at.timestamp_nanos_opt().unwrap())
            .execute(store.pool())
            .await
            .unwrap();
        }
        let outbox = SqliteOutbox::new(store);
        assert_eq!(outbox.migrate().await.unwrap(), 1, "the lanes migration");
        assert_eq!(outbox.migrate().await.unwrap(), 0, "applied once");
        let lanes: Vec<Option<i32>> = sqlx::query_scalar("SELECT lane FROM outbox")
            .fetch_all(outbox.pool())
            .await
            .unwrap();
        assert_eq!(lanes, vec![None; 3], "the old rows are on the per-row path");
        assert_eq!(outbox.status().await.unwrap().pending, 3);
        // New rows of the same keys (and a new key) go into lanes.
        let (a3, b2, c1) = (
            OutboundMessage::new("orders", "a", b"a3".to_vec()),
            OutboundMessage::new("orders", "b", b"b2".to_vec()),
            OutboundMessage::new("orders", "c", b"c1".to_vec()),
        );
        outbox
            .enqueue(&[a3.clone(), b2.clone(), c1.clone()])
            .await
            .unwrap();
        let req = |worker: &str, limit| ClaimRequest {
            worker: worker.into(),
            limit,
            lease: Duration::from_secs(30),
            dead_letter_policy: DeadLetterPolicy::SkipKey,
        };
        let ids = |rows: &[OutboxMessage]| rows.iter().map(OutboxMessage::id).collect::<Vec<_>>();
        // w1 holds a's first old row; w2 gets b's old row and c's new one:
        // a3 and b2 leave their lanes to wait behind their keys' old rows.
        let first = outbox.claim(&req("w1", 1)).await.unwrap();
        assert_eq!(ids(&first), vec![a1.id]);
        let second = outbox.claim(&req("w2", 100)).await.unwrap();
        assert_eq!(ids(&second), vec![b1.id, c1.id]);
        outbox.mark_published(&ids(&first)).await.unwrap();
        outbox.settle("w2", &ids(&second), &[], &[]).await.unwrap();
        let third = outbox.claim(&req("w3", 100)).await.unwrap();
        assert_eq!(ids(&third), vec![a2.id, a3.id, b2.id]);
        outbox.settle("w3", &ids(&third), &[], &[]).await.unwrap();
        let st = outbox.status().await.unwrap();
        assert_eq!((st.pending, st.published, st.dead), (0, 6, 0));
        for m in [&a1, &a2, &b1, &a3, &b2, &c1] {
            let row = outbox.get(m.id).await.unwrap().unwrap();
            assert_eq!(row.status, OutboxStatus::Published, "{}", m.id);
            assert!(row.published_at.is_some());
        }
        assert!(outbox.claim(&req("w1", 100)).await.unwrap().is_empty());
    }

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
