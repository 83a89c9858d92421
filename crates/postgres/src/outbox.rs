//! [`PgOutbox`]: the transactional outbox on PostgreSQL — enqueue (alone or
//! in a unit of work), claims with `FOR UPDATE SKIP LOCKED` and leases
//! judged by the database clock, per-key order, dead letters, retention,
//! and LISTEN/NOTIFY wake-ups for relay workers.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgListener, PgRow};
use sqlx::{PgConnection, Row};
use tokio::sync::watch;
use vextrus_core::outbox::{
    ClaimRequest, DeadLetterPolicy, DeadLetters, FailureOutcome, OutboxClaimer, OutboxError,
    OutboxMessage, OutboxResult, OutboxRetention, OutboxStatus, OutboxStatusReport, OutboxStore,
    PublishFailure, validate_outbound,
};
use vextrus_core::transport::{Headers, MessageId, OutboundMessage};
use vextrus_core::{EventStoreError, WakeUps};

use crate::error::map_sqlx;
use crate::migrate::Migration;
use crate::notifier::{CoalescingNotifier, pg_notify};
use crate::store::PgEventStore;

/// The LISTEN/NOTIFY channel the outbox notifies on after enqueues (and
/// replays), waking relay workers in every process.
pub const OUTBOX_NOTIFY_CHANNEL: &str = "vextrus_outbox";

/// The outbox and inbox schema (`migrations/0002_outbox_inbox.sql`),
/// version 2 of [`MIGRATIONS`](crate::MIGRATIONS): `vextrus migrate`,
/// [`PgEventStore::migrate`] and [`PgOutbox::migrate`] all apply it.
pub const OUTBOX_MIGRATION: Migration = Migration {
    version: 2,
    name: "outbox_inbox",
    sql: include_str!("../migrations/0002_outbox_inbox.sql"),
};

/// The first half of the two-part advisory lock an enqueuer takes per
/// partition key (the second half is `hashtext(partition_key)`).
pub(crate) const KEY_LOCK_CLASS: i32 = 0x7662_6f78; // "vbox"

/// Durations beyond this are clamped (a timestamp a century ahead is
/// "never" for a relay, and stays inside PostgreSQL's range).
const MAX_DELAY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The columns every row read selects, in the order [`decode_row`] reads them.
pub(crate) const ROW_COLUMNS: &str = "sequence, id, destination, partition_key, payload, \
     headers::text, created_at_ns, status, attempts, next_attempt_at, last_error, published_at";

/// The outbox ([`OutboxStore`], [`OutboxClaimer`], [`DeadLetters`],
/// [`OutboxRetention`]), the inbox ([`vextrus_core::inbox::InboxStore`]) and
/// the [`vextrus_core::unit_of_work::UnitOfWork`] on PostgreSQL, sharing a
/// [`PgEventStore`]'s pool.
///
/// # Enqueue
///
/// [`OutboxStore::enqueue`] writes a batch in its own transaction;
/// `UnitOfWork::enqueue_in_tx` writes it in the caller's open
/// `sqlx::Transaction`, so one commit covers events, messages, inbox
/// entries and the service's own SQL. Rows get a `sequence` from an
/// identity column. Each enqueue first takes a transaction-scoped advisory
/// lock per partition key (in a fixed order), so transactions enqueuing to
/// one key commit in the order they drew their sequences: a relay never sees
/// a key's later row before an earlier one. (Two transactions that each
/// enqueue several times, to the same keys in opposite orders, can
/// deadlock; PostgreSQL then aborts one with a transient error.)
///
/// After a commit the outbox sends `NOTIFY vextrus_outbox` from a
/// background task (one at a time, shared by concurrent commits); relay
/// workers LISTEN through [`OutboxClaimer::wake_ups`] and also poll.
///
/// # Claims
///
/// A claim is one transaction: it selects the keys' heads (a pending row
/// with no unfinished row of its key before it) that are due and not
/// leased to another worker, `FOR UPDATE SKIP LOCKED`, then leases each
/// locked head's run of due, free followers (`claimed_by`, `claimed_until
/// = now() + lease`). Whoever holds a key's head row lock holds the key, so
/// concurrent claimers never split a key; every time comparison uses the
/// database's `now()`. The rule is `vextrus_core::outbox::store`'s, and
/// matches the in-memory outbox exactly.
///
/// ```no_run
/// use std::time::Duration;
/// use vextrus_core::outbox::{ClaimRequest, DeadLetterPolicy, OutboxClaimer, OutboxStore};
/// use vextrus_core::transport::OutboundMessage;
/// use vextrus_postgres::{PgEventStore, PgOutbox};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let store = PgEventStore::connect("postgres://postgres@127.0.0.1:5432/test").await?;
/// let outbox = PgOutbox::new(store);
/// outbox.migrate().await?;
/// let m = OutboundMessage::new("orders", "order-1", b"{}".to_vec());
/// outbox.enqueue(&[m.clone()]).await?;
/// let claim = ClaimRequest {
///     worker: "relay-1".into(),
///     limit: 100,
///     lease: Duration::from_secs(30),
///     dead_letter_policy: DeadLetterPolicy::SkipKey,
/// };
/// let batch = outbox.claim(&claim).await?;
/// outbox.mark_published(&[m.id]).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PgOutbox {
    pub(crate) store: PgEventStore,
    wake: Arc<OnceLock<watch::Receiver<u64>>>,
    notifier: CoalescingNotifier,
}

impl PgOutbox {
    /// The outbox over `store`'s pool (and its event store, for units of work).
    pub fn new(store: PgEventStore) -> Self {
        Self {
            store,
            wake: Arc::new(OnceLock::new()),
            notifier: CoalescingNotifier::default(),
        }
    }

    /// The event store units of work append to.
    pub fn event_store(&self) -> &PgEventStore {
        &self.store
    }

    /// The pool (shared with the event store).
    pub fn pool(&self) -> &sqlx::PgPool {
        self.store.pool()
    }

    /// Applies every migration not yet applied — the event store's and
    /// [`OUTBOX_MIGRATION`], both in [`MIGRATIONS`](crate::MIGRATIONS) —
    /// under the migrator's advisory lock; applying them again is harmless.
    /// Returns how many migrations were applied.
    pub async fn migrate(&self) -> OutboxResult<usize> {
        Ok(self.store.migrate().await?)
    }

    /// Wakes relay workers LISTENing on [`OUTBOX_NOTIFY_CHANNEL`] (in every
    /// process): one `pg_notify` from a background task, shared with any
    /// other wake-up requested while one is in flight or within
    /// [`NOTIFY_COALESCE`](crate::NOTIFY_COALESCE) of the last one (each
    /// `NOTIFY` is a transaction of its own, and notifying transactions'
    /// commits serialize on PostgreSQL's notify lock). The outbox does this
    /// after its own commits; call it after committing a transaction of
    /// your own that enqueued with `enqueue_in_tx`. Without it relays still
    /// see the messages at their next poll. Must be called within a Tokio
    /// runtime.
    pub fn notify_relays(&self) {
        self.notifier
            .request(|| pg_notify(self.pool().clone(), OUTBOX_NOTIFY_CHANNEL));
    }

    /// Every outbox row (any status), in sequence order.
    pub async fn rows(&self) -> OutboxResult<Vec<OutboxMessage>> {
        let rows = sqlx::query(&format!(
            "SELECT {ROW_COLUMNS} FROM vextrus_outbox ORDER BY sequence"
        ))
        .fetch_all(self.pool())
        .await
        .map_err(map_out)?;
        rows.iter().map(decode_row).collect()
    }

    fn wake_receiver(&self) -> watch::Receiver<u64> {
        self.wake
            .get_or_init(|| {
                let (tx, rx) = watch::channel(0u64);
                tokio::spawn(listen(self.pool().clone(), tx));
                rx
            })
            .clone()
    }

    async fn exists(&self, id: MessageId) -> OutboxResult<bool> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM vextrus_outbox WHERE id = $1)")
            .bind(id.as_uuid())
            .fetch_one(self.pool())
            .await
            .map_err(map_out)
    }

    /// `NotFound` if no row has `id`, else `NotDead`.
    async fn not_dead_or_missing(&self, id: MessageId) -> OutboxError {
        match self.exists(id).await {
            Ok(true) => OutboxError::NotDead(id),
            Ok(false) => OutboxError::NotFound(id),
            Err(e) => e,
        }
    }
}

/// Listens on [`OUTBOX_NOTIFY_CHANNEL`] and bumps `tx` on every
/// notification, and after every reconnect (one may have been missed).
/// Ends when every receiver is gone.
async fn listen(pool: sqlx::PgPool, tx: watch::Sender<u64>) {
    let bump = |tx: &watch::Sender<u64>| tx.send_modify(|v| *v = v.wrapping_add(1));
    while !tx.is_closed() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(err) => {
                tracing::warn!(error = %err, "vextrus: outbox LISTEN connection failed; relays poll");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(err) = listener.listen(OUTBOX_NOTIFY_CHANNEL).await {
            tracing::warn!(error = %err, "vextrus: outbox LISTEN failed; relays poll");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        bump(&tx);
        loop {
            if tx.is_closed() {
                return;
            }
            match tokio::time::timeout(Duration::from_secs(1), listener.try_recv()).await {
                Err(_idle) => {}
                Ok(Ok(Some(_))) | Ok(Ok(None)) => bump(&tx),
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "vextrus: outbox LISTEN connection lost");
                    bump(&tx);
                    break;
                }
            }
        }
    }
}

/// Maps a driver error: unreachable, busy or restarting databases (and
/// deadlocks, serialization failures) are [`OutboxError::Unavailable`];
/// everything else is [`OutboxError::Backend`].
pub(crate) fn map_out(err: sqlx::Error) -> OutboxError {
    match map_sqlx(err) {
        EventStoreError::Unavailable(e) => OutboxError::Unavailable(e),
        EventStoreError::Backend(e) => OutboxError::Backend(e),
        other => OutboxError::EventStore(other),
    }
}

/// A duration as microseconds, clamped to [`MAX_DELAY`].
pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.min(MAX_DELAY).as_micros()).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Decodes a row selected with [`ROW_COLUMNS`].
pub(crate) fn decode_row(row: &PgRow) -> OutboxResult<OutboxMessage> {
    let get = |e: sqlx::Error| OutboxError::Backend(Box::new(e));
    let headers: String = row.try_get(5).map_err(get)?;
    let headers: Headers = serde_json::from_str(&headers)
        .map_err(|e| OutboxError::Backend(format!("stored headers: {e}").into()))?;
    let status: String = row.try_get(7).map_err(get)?;
    let status = OutboxStatus::parse(&status)
        .ok_or_else(|| OutboxError::Backend(format!("unknown outbox status {status:?}").into()))?;
    let attempts: i32 = row.try_get(8).map_err(get)?;
    let id: uuid::Uuid = row.try_get(1).map_err(get)?;
    Ok(OutboxMessage {
        message: OutboundMessage {
            id: MessageId::from(id),
            destination: row.try_get(2).map_err(get)?,
            partition_key: row.try_get(3).map_err(get)?,
            payload: row.try_get(4).map_err(get)?,
            headers,
            created_at: DateTime::from_timestamp_nanos(row.try_get(6).map_err(get)?),
        },
        sequence: to_u64(row.try_get(0).map_err(get)?),
        attempts: u32::try_from(attempts).unwrap_or(0),
        next_attempt_at: row.try_get(9).map_err(get)?,
        last_error: row.try_get(10).map_err(get)?,
        status,
        published_at: row.try_get(11).map_err(get)?,
    })
}

/// Validates `messages` and rejects ids repeated within the batch.
pub(crate) fn check_batch(messages: &[OutboundMessage]) -> OutboxResult<()> {
    let mut seen = std::collections::HashSet::with_capacity(messages.len());
    for m in messages {
        validate_outbound(m)?;
        if !seen.insert(m.id) {
            return Err(OutboxError::DuplicateMessage(m.id));
        }
    }
    Ok(())
}

/// Inserts `messages` (already checked with [`check_batch`]) on `conn`,
/// which must be inside a transaction: takes the per-key advisory locks,
/// then inserts in order. If an id is already stored, removes what it
/// inserted and fails with [`OutboxError::DuplicateMessage`], leaving the
/// transaction usable and unchanged.
pub(crate) async fn enqueue_on(
    conn: &mut PgConnection,
    messages: &[OutboundMessage],
) -> OutboxResult<()> {
    if messages.is_empty() {
        return Ok(());
    }
    let n = messages.len();
    let (mut ids, mut dests, mut keys, mut payloads, mut headers, mut created, mut nanos) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for m in messages {
        ids.push(m.id.as_uuid());
        dests.push(m.destination.as_str());
        keys.push(m.partition_key.as_str());
        payloads.push(m.payload.as_slice());
        headers.push(
            serde_json::to_string(&m.headers)
                .map_err(|e| OutboxError::InvalidMessage(format!("message {}: {e}", m.id)))?,
        );
        created.push(m.created_at);
        nanos.push(m.created_at.timestamp_nanos_opt().ok_or_else(|| {
            OutboxError::InvalidMessage(format!(
                "message {}: created_at {} is out of range",
                m.id, m.created_at
            ))
        })?);
    }
    let inserted: Vec<uuid::Uuid> = sqlx::query_scalar(
        "WITH locks AS MATERIALIZED (
             SELECT count(*) AS n FROM (
                 SELECT pg_advisory_xact_lock($7, k)
                   FROM (SELECT DISTINCT hashtext(key) AS k
                           FROM unnest($3::text[]) AS key ORDER BY 1) AS keys
             ) AS l
         )
         INSERT INTO vextrus_outbox
             (id, destination, partition_key, payload, headers, created_at, created_at_ns,
              next_attempt_at)
         SELECT m.id, m.destination, m.partition_key, m.payload, m.headers::jsonb,
                m.created_at, m.created_at_ns, LEAST(m.created_at, now())
           FROM locks,
                unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::text[],
                       $6::timestamptz[], $8::bigint[])
                WITH ORDINALITY AS m(id, destination, partition_key, payload, headers,
                                     created_at, created_at_ns, ord)
          ORDER BY m.ord
         ON CONFLICT (id) DO NOTHING
         RETURNING id",
    )
    .bind(&ids)
    .bind(&dests)
    .bind(&keys)
    .bind(&payloads)
    .bind(&headers)
    .bind(&created)
    .bind(KEY_LOCK_CLASS)
    .bind(&nanos)
    .fetch_all(&mut *conn)
    .await
    .map_err(map_out)?;
    if inserted.len() == n {
        return Ok(());
    }
    let taken = messages
        .iter()
        .find(|m| !inserted.contains(&m.id.as_uuid()))
        .map_or_else(|| messages[0].id, |m| m.id);
    sqlx::query("DELETE FROM vextrus_outbox WHERE id = ANY($1)")
        .bind(&inserted)
        .execute(&mut *conn)
        .await
        .map_err(map_out)?;
    Err(OutboxError::DuplicateMessage(taken))
}

impl OutboxStore for PgOutbox {
    async fn enqueue(&self, messages: &[OutboundMessage]) -> OutboxResult<()> {
        check_batch(messages)?;
        if messages.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool().begin().await.map_err(map_out)?;
        enqueue_on(&mut tx, messages).await?;
        tx.commit().await.map_err(map_out)?;
        self.notify_relays();
        Ok(())
    }

    async fn get(&self, id: MessageId) -> OutboxResult<Option<OutboxMessage>> {
        let row = sqlx::query(&format!(
            "SELECT {ROW_COLUMNS} FROM vextrus_outbox WHERE id = $1"
        ))
        .bind(id.as_uuid())
        .fetch_optional(self.pool())
        .await
        .map_err(map_out)?;
        row.as_ref().map(decode_row).transpose()
    }
}

impl OutboxClaimer for PgOutbox {
    async fn claim(&self, req: &ClaimRequest) -> OutboxResult<Vec<OutboxMessage>> {
        if req.limit == 0 {
            return Ok(Vec::new());
        }
        let block = req.dead_letter_policy == DeadLetterPolicy::BlockKey;
        let limit = i64::try_from(req.limit).unwrap_or(i64::MAX);
        let mut tx = self.pool().begin().await.map_err(map_out)?;
        // The claim's estimated cost grows with the backlog and crosses
        // `jit_above_cost` long before its work does: JIT compiling it took
        // seconds per claim (20k pending rows: 3.4 s, of which 2.8 s JIT),
        // for a statement that runs in milliseconds.
        sqlx::query("SET LOCAL jit = off")
            .execute(&mut *tx)
            .await
            .map_err(map_out)?;
        // The heads: each key's first unfinished row, if it is pending, due
        // and free. Holding a head's row lock holds its key. The first rows
        // come from a skip scan over the (partition_key, sequence) index:
        // one descent per key with unfinished rows, whatever the backlog.
        let heads: Vec<(i64, String)> = sqlx::query_as(
            "WITH RECURSIVE firsts AS (
                 (SELECT p.partition_key, p.sequence
                    FROM vextrus_outbox p
                   WHERE p.status <> 'published' AND (p.status = 'pending' OR $2)
                   ORDER BY p.partition_key, p.sequence
                   LIMIT 1)
                 UNION ALL
                 SELECT n.partition_key, n.sequence
                   FROM firsts f
                  CROSS JOIN LATERAL (
                      SELECT p.partition_key, p.sequence
                        FROM vextrus_outbox p
                       WHERE p.status <> 'published' AND (p.status = 'pending' OR $2)
                         AND p.partition_key > f.partition_key
                       ORDER BY p.partition_key, p.sequence
                       LIMIT 1
                  ) AS n
             )
             SELECT o.sequence, o.partition_key
               FROM firsts f
               JOIN vextrus_outbox o ON o.sequence = f.sequence
              WHERE o.status = 'pending'
                AND o.next_attempt_at <= now()
                AND (o.claimed_until IS NULL OR o.claimed_until <= now() OR o.claimed_by = $1)
              ORDER BY o.sequence
              LIMIT $3
              FOR UPDATE OF o SKIP LOCKED",
        )
        .bind(&req.worker)
        .bind(block)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_out)?;
        if heads.is_empty() {
            tx.commit().await.map_err(map_out)?;
            return Ok(Vec::new());
        }
        let (seqs, keys): (Vec<i64>, Vec<String>) = heads.into_iter().unzip();
        let fair = req.limit.div_ceil(keys.len());
        let per_key = limit.min(i64::try_from(fair.saturating_mul(2).max(64)).unwrap_or(i64::MAX));
        // Each locked head's run of claimable rows, up to the first row
        // that is not (not due, leased to another worker, or a dead letter
        // under BlockKey); dead letters under SkipKey are stepped over. A
        // key contributes at most `per_key` rows (twice its fair share of
        // the batch, at least 64): reading every key's whole run (up to
        // `limit` rows each) read the whole backlog on every claim. The
        // batch is the runs' first rows in sequence order, so it spreads
        // over the keys (a key's rows are published one after another, the
        // keys at once) instead of holding a few keys' long runs.
        let rows = sqlx::query(&format!(
            "WITH heads AS (
                 SELECT * FROM unnest($1::bigint[], $2::text[]) AS h(seq, key)
             ),
             cand AS (
                 SELECT c.sequence, c.partition_key, c.ok
                   FROM heads h
                   CROSS JOIN LATERAL (
                       SELECT o.sequence, o.partition_key,
                              (o.status = 'pending' AND o.next_attempt_at <= now()
                               AND (o.claimed_until IS NULL OR o.claimed_until <= now()
                                    OR o.claimed_by = $3)) AS ok
                         FROM vextrus_outbox o
                        WHERE o.partition_key = h.key
                          AND o.sequence >= h.seq
                          AND o.status <> 'published'
                          AND (o.status = 'pending' OR $4)
                        ORDER BY o.sequence
                        LIMIT $7
                   ) AS c
             ),
             first_bad AS (
                 SELECT partition_key, min(sequence) AS bad
                   FROM cand WHERE NOT ok GROUP BY partition_key
             ),
             picked AS (
                 SELECT c.sequence
                   FROM cand c LEFT JOIN first_bad f USING (partition_key)
                  WHERE c.ok AND (f.bad IS NULL OR c.sequence < f.bad)
                  ORDER BY c.sequence
                  LIMIT $5
             )
             UPDATE vextrus_outbox o
                SET claimed_by = $3,
                    claimed_until = now() + make_interval(secs => $6::float8 / 1e6)
              WHERE o.sequence = ANY (ARRAY(SELECT sequence FROM picked))
                AND o.status = 'pending'
              RETURNING {cols}",
            cols = ROW_COLUMNS
                .split(", ")
                .map(|c| format!("o.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .bind(&seqs)
        .bind(&keys)
        .bind(&req.worker)
        .bind(block)
        .bind(limit)
        .bind(micros(req.lease) as f64)
        .bind(per_key)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_out)?;
        tx.commit().await.map_err(map_out)?;
        let mut out = rows
            .iter()
            .map(decode_row)
            .collect::<OutboxResult<Vec<_>>>()?;
        out.sort_unstable_by_key(|m| m.sequence);
        Ok(out)
    }

    async fn mark_published(&self, ids: &[MessageId]) -> OutboxResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<uuid::Uuid> = ids.iter().map(MessageId::as_uuid).collect();
        sqlx::query(
            "UPDATE vextrus_outbox
                SET status = 'published', published_at = now(),
                    claimed_by = NULL, claimed_until = NULL
              WHERE id = ANY($1) AND status = 'pending'",
        )
        .bind(&ids)
        .execute(self.pool())
        .await
        .map_err(map_out)?;
        Ok(())
    }

    async fn mark_failed(
        &self,
        id: MessageId,
        failure: &PublishFailure,
    ) -> OutboxResult<FailureOutcome> {
        let row: Option<(String, i32, DateTime<Utc>)> = sqlx::query_as(
            "UPDATE vextrus_outbox
                SET attempts = attempts + 1,
                    last_error = $2,
                    claimed_by = NULL, claimed_until = NULL,
                    status = CASE WHEN $3 OR attempts + 1 >= $4 THEN 'dead' ELSE 'pending' END,
                    next_attempt_at = CASE WHEN $3 OR attempts + 1 >= $4 THEN next_attempt_at
                        ELSE now() + make_interval(secs => $5::float8 / 1e6) END
              WHERE id = $1 AND status = 'pending'
              RETURNING status, attempts, next_attempt_at",
        )
        .bind(id.as_uuid())
        .bind(&failure.error)
        .bind(failure.dead_now)
        .bind(i64::from(failure.max_attempts))
        .bind(micros(failure.retry_in) as f64)
        .fetch_optional(self.pool())
        .await
        .map_err(map_out)?;
        match row {
            None if self.exists(id).await? => Ok(FailureOutcome::Settled),
            None => Err(OutboxError::NotFound(id)),
            Some((status, attempts, next_attempt_at)) => {
                let attempts = u32::try_from(attempts).unwrap_or(0);
                if status == OutboxStatus::Dead.as_str() {
                    Ok(FailureOutcome::Dead { attempts })
                } else {
                    Ok(FailureOutcome::Retrying {
                        attempts,
                        next_attempt_at,
                    })
                }
            }
        }
    }

    async fn release(&self, worker: &str, ids: &[MessageId]) -> OutboxResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<uuid::Uuid> = ids.iter().map(MessageId::as_uuid).collect();
        sqlx::query(
            "UPDATE vextrus_outbox SET claimed_by = NULL, claimed_until = NULL
              WHERE id = ANY($2) AND claimed_by = $1",
        )
        .bind(worker)
        .bind(&ids)
        .execute(self.pool())
        .await
        .map_err(map_out)?;
        Ok(())
    }

    /// One statement (so one transaction and one round trip) for the whole
    /// batch: the published rows, each failure (as
    /// [`mark_failed`](OutboxClaimer::mark_failed)) and the releases, on
    /// disjoint rows. A failed id that matched no pending row is looked up
    /// afterwards: [`FailureOutcome::Settled`] if it exists, else
    /// [`OutboxError::NotFound`].
    async fn settle(
        &self,
        worker: &str,
        published: &[MessageId],
        failed: &[(MessageId, PublishFailure)],
        released: &[MessageId],
    ) -> OutboxResult<Vec<FailureOutcome>> {
        if published.is_empty() && failed.is_empty() && released.is_empty() {
            return Ok(Vec::new());
        }
        let uuids = |ids: &[MessageId]| ids.iter().map(MessageId::as_uuid).collect::<Vec<_>>();
        let fail_ids: Vec<uuid::Uuid> = failed.iter().map(|(id, _)| id.as_uuid()).collect();
        let errors: Vec<&str> = failed.iter().map(|(_, f)| f.error.as_str()).collect();
        let dead_now: Vec<bool> = failed.iter().map(|(_, f)| f.dead_now).collect();
        let max_attempts: Vec<i64> = failed
            .iter()
            .map(|(_, f)| i64::from(f.max_attempts))
            .collect();
        let retry_in: Vec<f64> = failed
            .iter()
            .map(|(_, f)| micros(f.retry_in) as f64)
            .collect();
        let rows: Vec<(uuid::Uuid, String, i32, DateTime<Utc>)> = sqlx::query_as(
            "WITH published AS (
                 UPDATE vextrus_outbox
                    SET status = 'published', published_at = now(),
                        claimed_by = NULL, claimed_until = NULL
                  WHERE id = ANY($1) AND status = 'pending'
             ),
             f AS (
                 SELECT * FROM unnest($2::uuid[], $3::text[], $4::bool[], $5::bigint[],
                                      $6::float8[]) AS f(id, error, dead_now, max_attempts, retry_in)
             ),
             failed AS (
                 UPDATE vextrus_outbox o
                    SET attempts = o.attempts + 1,
                        last_error = f.error,
                        claimed_by = NULL, claimed_until = NULL,
                        status = CASE WHEN f.dead_now OR o.attempts + 1 >= f.max_attempts
                                      THEN 'dead' ELSE 'pending' END,
                        next_attempt_at = CASE WHEN f.dead_now OR o.attempts + 1 >= f.max_attempts
                                               THEN o.next_attempt_at
                                               ELSE now() + make_interval(secs => f.retry_in / 1e6)
                                          END
                   FROM f
                  WHERE o.id = f.id AND o.status = 'pending'
                  RETURNING o.id, o.status, o.attempts, o.next_attempt_at
             ),
             released AS (
                 UPDATE vextrus_outbox SET claimed_by = NULL, claimed_until = NULL
                  WHERE id = ANY($8) AND claimed_by = $7
             )
             SELECT id, status, attempts, next_attempt_at FROM failed",
        )
        .bind(uuids(published))
        .bind(&fail_ids)
        .bind(&errors)
        .bind(&dead_now)
        .bind(&max_attempts)
        .bind(&retry_in)
        .bind(worker)
        .bind(uuids(released))
        .fetch_all(self.pool())
        .await
        .map_err(map_out)?;
        let mut outcomes = Vec::with_capacity(failed.len());
        for (id, _) in failed {
            let outcome = match rows.iter().find(|r| r.0 == id.as_uuid()) {
                None if self.exists(*id).await? => FailureOutcome::Settled,
                None => return Err(OutboxError::NotFound(*id)),
                Some((_, status, attempts, next_attempt_at)) => {
                    let attempts = u32::try_from(*attempts).unwrap_or(0);
                    if status == OutboxStatus::Dead.as_str() {
                        FailureOutcome::Dead { attempts }
                    } else {
                        FailureOutcome::Retrying {
                            attempts,
                            next_attempt_at: *next_attempt_at,
                        }
                    }
                }
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    async fn wake_ups(&self) -> OutboxResult<WakeUps> {
        Ok(WakeUps::from_watch(self.wake_receiver()))
    }
}

impl DeadLetters for PgOutbox {
    async fn status(&self) -> OutboxResult<OutboxStatusReport> {
        let (pending, dead, published, age): (i64, i64, i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'pending'),
                    count(*) FILTER (WHERE status = 'dead'),
                    count(*) FILTER (WHERE status = 'published'),
                    EXTRACT(EPOCH FROM now() - min(created_at)
                                     FILTER (WHERE status = 'pending'))::float8
               FROM vextrus_outbox",
        )
        .fetch_one(self.pool())
        .await
        .map_err(map_out)?;
        Ok(OutboxStatusReport {
            pending: to_u64(pending),
            oldest_pending_age: age
                .map(|s| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(MAX_DELAY)),
            dead: to_u64(dead),
            published: to_u64(published),
        })
    }

    async fn dead_letters(&self, limit: usize) -> OutboxResult<Vec<OutboxMessage>> {
        let rows = sqlx::query(&format!(
            "SELECT {ROW_COLUMNS} FROM vextrus_outbox WHERE status = 'dead' \
             ORDER BY sequence LIMIT $1"
        ))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await
        .map_err(map_out)?;
        rows.iter().map(decode_row).collect()
    }

    async fn replay(&self, id: MessageId) -> OutboxResult<()> {
        let done = sqlx::query(
            "UPDATE vextrus_outbox
                SET status = 'pending', attempts = 0, next_attempt_at = now(),
                    claimed_by = NULL, claimed_until = NULL
              WHERE id = $1 AND status = 'dead'",
        )
        .bind(id.as_uuid())
        .execute(self.pool())
        .await
        .map_err(map_out)?
        .rows_affected();
        if done == 0 {
            return Err(self.not_dead_or_missing(id).await);
        }
        self.notify_relays();
        Ok(())
    }

    async fn replay_all(&self) -> OutboxResult<u64> {
        let n = sqlx::query(
            "UPDATE vextrus_outbox
                SET status = 'pending', attempts = 0, next_attempt_at = now(),
                    claimed_by = NULL, claimed_until = NULL
              WHERE status = 'dead'",
        )
        .execute(self.pool())
        .await
        .map_err(map_out)?
        .rows_affected();
        if n > 0 {
            self.notify_relays();
        }
        Ok(n)
    }

    async fn discard(&self, id: MessageId) -> OutboxResult<()> {
        let done = sqlx::query("DELETE FROM vextrus_outbox WHERE id = $1 AND status = 'dead'")
            .bind(id.as_uuid())
            .execute(self.pool())
            .await
            .map_err(map_out)?
            .rows_affected();
        if done == 0 {
            return Err(self.not_dead_or_missing(id).await);
        }
        self.notify_relays();
        Ok(())
    }
}

impl OutboxRetention for PgOutbox {
    async fn purge_published(&self, older_than: Duration) -> OutboxResult<u64> {
        Ok(sqlx::query(
            "DELETE FROM vextrus_outbox
              WHERE status = 'published'
                AND published_at <= now() - make_interval(secs => $1::float8 / 1e6)",
        )
        .bind(micros(older_than) as f64)
        .execute(self.pool())
        .await
        .map_err(map_out)?
        .rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use vextrus_kernel::{ErrorKind, HasErrorKind};

    use super::*;

    #[test]
    fn delays_are_clamped() {
        assert_eq!(micros(Duration::from_millis(3)), 3_000);
        assert_eq!(micros(Duration::MAX), micros(MAX_DELAY));
    }

    #[test]
    fn batches_are_checked() {
        let m = OutboundMessage::new("orders", "a", b"1".to_vec());
        assert!(matches!(
            check_batch(&[m.clone(), m.clone()]),
            Err(OutboxError::DuplicateMessage(id)) if id == m.id
        ));
        let mut bad = OutboundMessage::new("orders", "a", b"1".to_vec());
        bad.partition_key.clear();
        assert!(matches!(
            check_batch(&[bad]),
            Err(OutboxError::InvalidMessage(_))
        ));
        assert!(check_batch(&[m]).is_ok());
    }

    #[test]
    fn driver_errors_map_to_transient_or_fatal() {
        assert_eq!(
            map_out(sqlx::Error::PoolTimedOut).kind(),
            ErrorKind::Transient
        );
        assert_eq!(map_out(sqlx::Error::RowNotFound).kind(), ErrorKind::Fatal);
    }
}
