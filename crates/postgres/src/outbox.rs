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
    ClaimRequest, DeadLetterPolicy, DeadLetters, FailureOutcome, LaneLedger, LanePlan,
    OutboxClaimer, OutboxError, OutboxMessage, OutboxResult, OutboxRetention, OutboxStatus,
    OutboxStatusReport, OutboxStore, PublishFailure, lane_of, validate_outbound,
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

/// The first half of the two-part advisory lock an enqueuer takes per lane
/// (the second half is the lane, [`lane_of`] of the partition key). Not the
/// per-key class of releases before lanes ("vbox"), so the two never meet.
pub(crate) const LANE_LOCK_CLASS: i32 = 0x766c_616e; // "vlan"

/// The outbox lanes migration (`migrations/0006_outbox_lanes.sql`), version
/// 6 of [`MIGRATIONS`](crate::MIGRATIONS): the lane column, the lanes'
/// cursors and leases, and the log of cursor advances.
pub const OUTBOX_LANES_MIGRATION: Migration = Migration {
    version: 6,
    name: "outbox_lanes",
    sql: include_str!("../migrations/0006_outbox_lanes.sql"),
};

/// The outbox headers migration (`migrations/0007_outbox_headers_json.sql`),
/// version 7 of [`MIGRATIONS`](crate::MIGRATIONS): `vextrus_outbox.headers`
/// becomes `json` (kept as written), so a claim reads headers without
/// converting `jsonb` back to text.
pub const OUTBOX_HEADERS_MIGRATION: Migration = Migration {
    version: 7,
    name: "outbox_headers_json",
    sql: include_str!("../migrations/0007_outbox_headers_json.sql"),
};

/// How many lanes one claim leases at most: with several relay workers,
/// each pipelining a claim behind its publish, the lanes are shared out
/// instead of the first claim taking every lane with work.
const LANES_PER_CLAIM: i64 = 16;

/// Durations beyond this are clamped (a timestamp a century ahead is
/// "never" for a relay, and stays inside PostgreSQL's range).
const MAX_DELAY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The columns every row read selects, in the order [`decode_row`] reads
/// them, from [`ROW_FROM`] (`o`: the row, `l`: its lane): a lane row reads
/// as published, with its lane's confirmation time, once its lane's cursor
/// has passed it.
pub(crate) const ROW_COLUMNS: &str = "o.sequence, o.id, o.destination, o.partition_key, o.payload, \
     o.headers::text, o.created_at_ns, \
     CASE WHEN o.sequence <= l.cursor THEN 'published' ELSE o.status END, \
     o.attempts, o.next_attempt_at, o.last_error, \
     CASE WHEN o.sequence <= l.cursor THEN \
         (SELECT g.published_at FROM vextrus_outbox_lane_log g \
           WHERE g.lane = o.lane AND g.through >= o.sequence ORDER BY g.through LIMIT 1) \
     ELSE o.published_at END";

/// The `FROM` of every row read: the outbox and each lane row's lane.
pub(crate) const ROW_FROM: &str =
    "vextrus_outbox o LEFT JOIN vextrus_outbox_lanes l ON l.lane = o.lane";

/// Rows still to publish, over [`ROW_FROM`]: pending on the per-row path,
/// or in a lane past its cursor.
pub(crate) const ROW_PENDING: &str =
    "(o.status = 'pending' AND (o.lane IS NULL OR o.sequence > l.cursor))";

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
/// identity column and a lane ([`lane_of`] their partition key). Each
/// enqueue first takes a transaction-scoped advisory lock per lane (in a
/// fixed order), so transactions enqueuing to one lane commit in the order
/// they drew their sequences: a relay never sees a lane's later row before
/// an earlier one, so a lane's cursor never passes a row that commits
/// later. (Two transactions that each enqueue several times, to the same
/// lanes in opposite orders, can deadlock; PostgreSQL then aborts one with
/// a transient error.)
///
/// After a commit the outbox sends `NOTIFY vextrus_outbox` from a
/// background task (one at a time, shared by concurrent commits); relay
/// workers LISTEN through [`OutboxClaimer::wake_ups`] and also poll.
///
/// # Claims: lanes, and the per-row path
///
/// (The design: [`vextrus_core::outbox::lanes`].) A claim is one
/// transaction of two statements. The per-row statement serves rows with
/// no lane (written before migration 6, or that left their lane): it
/// selects the keys' heads (a pending row with no unfinished row of its key
/// before it) that are due and not leased to another worker, `FOR UPDATE
/// SKIP LOCKED`, then leases each locked head's run of due, free followers.
/// The lane statement takes up to 16 free lanes with rows past their
/// cursors (`FOR UPDATE SKIP LOCKED`, oldest first row first), returns
/// their rows in sequence order up to the batch size, moves off the lanes
/// the rows whose key has an earlier unfinished per-row row, and leases the
/// lanes. Settling a lane published whole is one `UPDATE` of its lane row
/// (its cursor) plus a log mark; nothing is written to the outbox rows.
/// Every time comparison uses the database's `now()`.
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
    lanes: Arc<LaneLedger>,
}

impl PgOutbox {
    /// The outbox over `store`'s pool (and its event store, for units of work).
    pub fn new(store: PgEventStore) -> Self {
        Self {
            store,
            lanes: Arc::new(LaneLedger::default()),
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

    /// Pending messages under a live lease (judged by the database clock):
    /// per-row claims, plus the rows past the cursor of a leased lane (a
    /// relay worker holds them, publishing or about to). `vextrus outbox
    /// status` reports it as "leased (in flight)".
    ///
    /// ```no_run
    /// # async fn demo(outbox: vextrus_postgres::PgOutbox) -> Result<(), Box<dyn std::error::Error>> {
    /// println!("{} messages in flight", outbox.leased().await?);
    /// # Ok(()) }
    /// ```
    pub async fn leased(&self) -> OutboxResult<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM vextrus_outbox
                      WHERE lane IS NULL AND status = 'pending' AND claimed_by IS NOT NULL
                        AND claimed_until > now())
                  + (SELECT count(*) FROM vextrus_outbox_lanes l
                       JOIN vextrus_outbox o ON o.lane = l.lane AND o.sequence > l.cursor
                      WHERE l.claimed_by IS NOT NULL AND l.claimed_until > now())",
        )
        .fetch_one(self.pool())
        .await
        .map_err(map_out)?;
        Ok(to_u64(n))
    }

    /// Every outbox row (any status), in sequence order (a lane row at or
    /// below its lane's cursor reads as published).
    pub async fn rows(&self) -> OutboxResult<Vec<OutboxMessage>> {
        let rows = sqlx::query(&format!(
            "SELECT {ROW_COLUMNS} FROM {ROW_FROM} ORDER BY o.sequence"
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
    decode_row_at(row, 0)
}

/// Decodes [`ROW_COLUMNS`] starting at column `at`.
fn decode_row_at(row: &PgRow, at: usize) -> OutboxResult<OutboxMessage> {
    let get = |e: sqlx::Error| OutboxError::Backend(Box::new(e));
    // Read in place (no copy of the text before parsing it).
    let headers: &str = row.try_get(at + 5).map_err(get)?;
    let headers: Headers = serde_json::from_str(headers)
        .map_err(|e| OutboxError::Backend(format!("stored headers: {e}").into()))?;
    let status: &str = row.try_get(at + 7).map_err(get)?;
    let status = OutboxStatus::parse(status)
        .ok_or_else(|| OutboxError::Backend(format!("unknown outbox status {status:?}").into()))?;
    let attempts: i32 = row.try_get(at + 8).map_err(get)?;
    let id: uuid::Uuid = row.try_get(at + 1).map_err(get)?;
    Ok(OutboxMessage {
        message: OutboundMessage {
            id: MessageId::from(id),
            destination: row.try_get(at + 2).map_err(get)?,
            partition_key: row.try_get(at + 3).map_err(get)?,
            payload: row.try_get(at + 4).map_err(get)?,
            headers,
            created_at: DateTime::from_timestamp_nanos(row.try_get(at + 6).map_err(get)?),
        },
        sequence: to_u64(row.try_get(at).map_err(get)?),
        attempts: u32::try_from(attempts).unwrap_or(0),
        next_attempt_at: row.try_get(at + 9).map_err(get)?,
        last_error: row.try_get(at + 10).map_err(get)?,
        status,
        published_at: row.try_get(at + 11).map_err(get)?,
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
/// which must be inside a transaction: takes the lanes' advisory locks
/// (held to the commit), then inserts in order, each row in its key's lane. If an id is already stored, removes what it
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
    let mut lanes = Vec::with_capacity(n);
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
        lanes.push(lane_of(&m.partition_key));
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
                   FROM (SELECT DISTINCT lane AS k
                           FROM unnest($9::int[]) AS lane ORDER BY 1) AS lanes
             ) AS l
         )
         INSERT INTO vextrus_outbox
             (id, destination, partition_key, payload, headers, created_at, created_at_ns,
              next_attempt_at, lane)
         SELECT m.id, m.destination, m.partition_key, m.payload, m.headers::json,
                m.created_at, m.created_at_ns, LEAST(m.created_at, now()), m.lane
           FROM locks,
                unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::text[],
                       $6::timestamptz[], $8::bigint[], $9::int[])
                WITH ORDINALITY AS m(id, destination, partition_key, payload, headers,
                                     created_at, created_at_ns, lane, ord)
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
    .bind(LANE_LOCK_CLASS)
    .bind(&nanos)
    .bind(&lanes)
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
            "SELECT {ROW_COLUMNS} FROM {ROW_FROM} WHERE o.id = $1"
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
        let mut out = claim_per_row(&mut tx, req, block, limit).await?;
        let room = limit - i64::try_from(out.len()).unwrap_or(limit);
        let lane_rows = if room > 0 {
            claim_lanes(&mut tx, req, block, room).await?
        } else {
            Vec::new()
        };
        tx.commit().await.map_err(map_out)?;
        self.lanes.record(
            &req.worker,
            lane_rows
                .iter()
                .map(|(lane, m)| (*lane, m.sequence, m.id())),
        );
        out.extend(lane_rows.into_iter().map(|(_, m)| m));
        out.sort_unstable_by_key(|m| m.sequence);
        Ok(out)
    }

    async fn mark_published(&self, ids: &[MessageId]) -> OutboxResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let plan = self.lanes.plan(None, ids, &[], &[]);
        self.write_plan(None, &plan, &[]).await.map(drop)
    }

    async fn mark_failed(
        &self,
        id: MessageId,
        failure: &PublishFailure,
    ) -> OutboxResult<FailureOutcome> {
        let plan = self.lanes.plan(None, &[], &[id], &[]);
        let failed = [(id, failure.clone())];
        let rows = self.write_plan(None, &plan, &failed).await?;
        Ok(self.outcomes(&failed, &rows).await?.remove(0))
    }

    async fn release(&self, worker: &str, ids: &[MessageId]) -> OutboxResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let plan = self.lanes.plan(Some(worker), &[], &[], ids);
        self.write_plan(Some(worker), &plan, &[]).await.map(drop)
    }

    /// One statement (so one transaction and one round trip) for the whole
    /// batch: lanes settled whole advance their cursors; the rest is
    /// written row by row — published rows past a cursor, each failure (as
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
        let fail_ids: Vec<MessageId> = failed.iter().map(|(id, _)| *id).collect();
        let plan = self
            .lanes
            .plan(Some(worker), published, &fail_ids, released);
        let rows = self.write_plan(Some(worker), &plan, failed).await?;
        self.outcomes(failed, &rows).await
    }

    async fn wake_ups(&self) -> OutboxResult<WakeUps> {
        Ok(WakeUps::from_watch(self.wake_receiver()))
    }
}

/// A failed row as the settle statement returns it: id, status, attempts,
/// next attempt.
type FailedRow = (uuid::Uuid, String, i32, DateTime<Utc>);

impl PgOutbox {
    /// Writes a [`LanePlan`] in one statement (see [`OutboxClaimer::settle`]):
    ///
    /// - `held`: the lanes the plan acts on that are still leased to the
    ///   worker named for them, locked (`FOR UPDATE`) so a claim taking an
    ///   expired lease over waits or is waited for;
    /// - per-row published, failed and released rows as before lanes; a
    ///   lane row nobody in this process holds is settled on its own row
    ///   (leaving its lane, unless its lane's cursor already passed it)
    ///   only through the worker-less `mark_published`/`mark_failed`: a
    ///   worker's settle never touches a lane it does not hold (its lease
    ///   ran out, and another worker took the lane over);
    /// - lane rows published past a cursor and lane failures, only where
    ///   `held` has their lane;
    /// - the lanes' advances (cursor, end of lease) and a log mark per
    ///   cursor that moved.
    ///
    /// `failed` carries the failures of `plan`'s failed ids. If the
    /// statement fails, the plan's lanes are forgotten (their leases run
    /// out and they are claimed again from their cursors).
    async fn write_plan(
        &self,
        worker: Option<&str>,
        plan: &LanePlan,
        failed: &[(MessageId, PublishFailure)],
    ) -> OutboxResult<Vec<FailedRow>> {
        if plan.is_empty() {
            return Ok(Vec::new());
        }
        let uuids = |ids: &[MessageId]| ids.iter().map(MessageId::as_uuid).collect::<Vec<_>>();
        // Failures: per-row ids (no guard), then lane rows (guard = lane, worker).
        let mut f_ids = Vec::new();
        let mut f_lanes: Vec<Option<i32>> = Vec::new();
        let mut f_workers: Vec<Option<&str>> = Vec::new();
        let failure_of = |id: MessageId| failed.iter().find(|(f, _)| *f == id).map(|(_, f)| f);
        let mut f_errors = Vec::new();
        let mut f_dead = Vec::new();
        let mut f_max = Vec::new();
        let mut f_retry = Vec::new();
        let guarded = plan
            .lane_failed
            .iter()
            .map(|r| (r.id, Some(r.lane), Some(r.worker.as_str())));
        for (id, lane, w) in plan
            .per_row_failed
            .iter()
            .map(|id| (*id, None, None))
            .chain(guarded)
        {
            let Some(f) = failure_of(id) else { continue };
            f_ids.push(id.as_uuid());
            f_lanes.push(lane);
            f_workers.push(w);
            f_errors.push(f.error.as_str());
            f_dead.push(f.dead_now);
            f_max.push(i64::from(f.max_attempts));
            f_retry.push(micros(f.retry_in) as f64);
        }
        // Every lane the plan relies on, with the worker that must hold it.
        let mut g_lanes = Vec::new();
        let mut g_workers = Vec::new();
        for (lane, w) in plan
            .lane_published
            .iter()
            .chain(&plan.lane_failed)
            .map(|r| (r.lane, r.worker.as_str()))
            .chain(plan.advances.iter().map(|a| (a.lane, a.worker.as_str())))
        {
            if !g_lanes
                .iter()
                .zip(&g_workers)
                .any(|(l, x)| *l == lane && *x == w)
            {
                g_lanes.push(lane);
                g_workers.push(w);
            }
        }
        let lp_ids: Vec<uuid::Uuid> = plan.lane_published.iter().map(|r| r.id.as_uuid()).collect();
        let lp_lanes: Vec<i32> = plan.lane_published.iter().map(|r| r.lane).collect();
        let lp_workers: Vec<&str> = plan
            .lane_published
            .iter()
            .map(|r| r.worker.as_str())
            .collect();
        let a_lanes: Vec<i32> = plan.advances.iter().map(|a| a.lane).collect();
        let a_workers: Vec<&str> = plan.advances.iter().map(|a| a.worker.as_str()).collect();
        let a_cursors: Vec<Option<i64>> = plan
            .advances
            .iter()
            .map(|a| a.cursor.map(|c| i64::try_from(c).unwrap_or(i64::MAX)))
            .collect();
        let result: Result<Vec<FailedRow>, sqlx::Error> = sqlx::query_as(
            "WITH held AS MATERIALIZED (
                 SELECT l.lane, l.claimed_by, l.cursor
                   FROM vextrus_outbox_lanes l
                   JOIN unnest($1::int[], $2::text[]) AS g(lane, worker)
                     ON l.lane = g.lane AND l.claimed_by = g.worker
                    FOR UPDATE OF l
             ),
             published AS (
                 UPDATE vextrus_outbox o
                    SET status = 'published', published_at = now(),
                        claimed_by = NULL, claimed_until = NULL, lane = NULL
                  WHERE o.id = ANY($3) AND o.status = 'pending'
                    AND (o.lane IS NULL
                         OR ($19 AND o.sequence > (SELECT c2.cursor FROM vextrus_outbox_lanes c2
                                                    WHERE c2.lane = o.lane)))
             ),
             lane_published AS (
                 UPDATE vextrus_outbox o
                    SET status = 'published', published_at = now(), lane = NULL
                   FROM unnest($4::uuid[], $5::int[], $6::text[]) AS r(id, lane, worker)
                   JOIN held h ON h.lane = r.lane AND h.claimed_by = r.worker
                  WHERE o.id = r.id AND o.lane = r.lane AND o.sequence > h.cursor
             ),
             f AS (
                 SELECT * FROM unnest($7::uuid[], $8::int[], $9::text[], $10::text[],
                                      $11::bool[], $12::bigint[], $13::float8[])
                          AS f(id, guard_lane, guard_worker, error, dead_now, max_attempts,
                               retry_in)
             ),
             failed AS (
                 UPDATE vextrus_outbox o
                    SET attempts = o.attempts + 1,
                        last_error = f.error,
                        claimed_by = NULL, claimed_until = NULL, lane = NULL,
                        status = CASE WHEN f.dead_now OR o.attempts + 1 >= f.max_attempts
                                      THEN 'dead' ELSE 'pending' END,
                        next_attempt_at = CASE WHEN f.dead_now OR o.attempts + 1 >= f.max_attempts
                                               THEN o.next_attempt_at
                                               ELSE now() + make_interval(secs => f.retry_in / 1e6)
                                          END
                   FROM f
                   LEFT JOIN held h ON h.lane = f.guard_lane AND h.claimed_by = f.guard_worker
                  WHERE o.id = f.id AND o.status = 'pending'
                    AND CASE WHEN f.guard_lane IS NULL
                             THEN o.lane IS NULL
                                  OR ($19 AND o.sequence > (SELECT c.cursor
                                                              FROM vextrus_outbox_lanes c
                                                             WHERE c.lane = o.lane))
                             ELSE h.lane IS NOT NULL AND o.lane = f.guard_lane
                                  AND o.sequence > h.cursor
                        END
                  RETURNING o.id, o.status, o.attempts, o.next_attempt_at
             ),
             released AS (
                 UPDATE vextrus_outbox SET claimed_by = NULL, claimed_until = NULL
                  WHERE id = ANY($14) AND claimed_by = $15 AND lane IS NULL
             ),
             adv AS (
                 SELECT a.lane, a.cursor, h.cursor AS old
                   FROM unnest($16::int[], $17::text[], $18::bigint[]) AS a(lane, worker, cursor)
                   JOIN held h ON h.lane = a.lane AND h.claimed_by = a.worker
             ),
             advanced AS (
                 UPDATE vextrus_outbox_lanes l
                    SET cursor = GREATEST(l.cursor, COALESCE(a.cursor, l.cursor)),
                        claimed_by = NULL, claimed_until = NULL
                   FROM adv a
                  WHERE l.lane = a.lane
             ),
             marks AS (
                 INSERT INTO vextrus_outbox_lane_log (lane, through, published_at)
                 SELECT lane, cursor, now() FROM adv WHERE cursor > old
                 ON CONFLICT (lane, through) DO NOTHING
             )
             SELECT id, status, attempts, next_attempt_at FROM failed",
        )
        .bind(&g_lanes)
        .bind(&g_workers)
        .bind(uuids(&plan.per_row_published))
        .bind(&lp_ids)
        .bind(&lp_lanes)
        .bind(&lp_workers)
        .bind(&f_ids)
        .bind(&f_lanes)
        .bind(&f_workers)
        .bind(&f_errors)
        .bind(&f_dead)
        .bind(&f_max)
        .bind(&f_retry)
        .bind(uuids(&plan.per_row_released))
        .bind(worker.unwrap_or(""))
        .bind(&a_lanes)
        .bind(&a_workers)
        .bind(&a_cursors)
        .bind(worker.is_none())
        .fetch_all(self.pool())
        .await;
        result.map_err(|e| {
            for (lane, w) in g_lanes.iter().zip(&g_workers) {
                self.lanes.forget(w, *lane);
            }
            map_out(e)
        })
    }

    /// Each failure's outcome, in the order of `failed`, from the rows the
    /// settle statement returned.
    async fn outcomes(
        &self,
        failed: &[(MessageId, PublishFailure)],
        rows: &[FailedRow],
    ) -> OutboxResult<Vec<FailureOutcome>> {
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
}

/// The per-row part of a claim, in the caller's transaction: rows with no
/// lane (written before lanes, or that left their lane), by the per-key
/// head rule of [`vextrus_core::outbox::store`], leased row by row.
async fn claim_per_row(
    tx: &mut PgConnection,
    req: &ClaimRequest,
    block: bool,
    limit: i64,
) -> OutboxResult<Vec<OutboxMessage>> {
    // The heads: each key's first unfinished row, if it is pending, due
    // and free. Holding a head's row lock holds its key. The first rows
    // come from a skip scan over the (partition_key, sequence) index: one
    // descent per key with unfinished per-row rows, whatever the backlog.
    let heads: Vec<(i64, String)> = sqlx::query_as(
        "WITH RECURSIVE firsts AS (
             (SELECT p.partition_key, p.sequence
                FROM vextrus_outbox p
               WHERE p.status <> 'published' AND p.lane IS NULL
                 AND (p.status = 'pending' OR $2)
               ORDER BY p.partition_key, p.sequence
               LIMIT 1)
             UNION ALL
             SELECT n.partition_key, n.sequence
               FROM firsts f
              CROSS JOIN LATERAL (
                  SELECT p.partition_key, p.sequence
                    FROM vextrus_outbox p
                   WHERE p.status <> 'published' AND p.lane IS NULL
                     AND (p.status = 'pending' OR $2)
                     AND p.partition_key > f.partition_key
                   ORDER BY p.partition_key, p.sequence
                   LIMIT 1
              ) AS n
         )
         SELECT o.sequence, o.partition_key
           FROM firsts f
           JOIN vextrus_outbox o ON o.sequence = f.sequence
          WHERE o.status = 'pending' AND o.lane IS NULL
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
        return Ok(Vec::new());
    }
    let (seqs, keys): (Vec<i64>, Vec<String>) = heads.into_iter().unzip();
    let fair = req.limit.div_ceil(keys.len());
    let per_key = limit.min(i64::try_from(fair.saturating_mul(2).max(64)).unwrap_or(i64::MAX));
    // Each locked head's run of claimable rows, up to the first row that
    // is not (not due, leased to another worker, or a dead letter under
    // BlockKey); dead letters under SkipKey are stepped over. A key
    // contributes at most `per_key` rows (twice its fair share of the
    // batch, at least 64). The batch is the runs' first rows in sequence
    // order, so it spreads over the keys.
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
                      AND o.status <> 'published' AND o.lane IS NULL
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
            AND o.status = 'pending' AND o.lane IS NULL
          RETURNING {RETURNED}"
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
    rows.iter().map(decode_row).collect()
}

/// The columns of a row being claimed (still pending, not yet published),
/// in [`decode_row`]'s order, from `o`.
const RETURNED: &str = "o.sequence, o.id, o.destination, o.partition_key, o.payload, \
     o.headers::text AS headers, o.created_at_ns, o.status, o.attempts, o.next_attempt_at, \
     o.last_error, o.published_at";

/// The lane part of a claim, in the caller's transaction (see
/// [`vextrus_core::outbox::lanes`]): up to [`LANES_PER_CLAIM`] free lanes
/// with rows past their cursors, oldest first row first, locked `FOR
/// UPDATE SKIP LOCKED`; their rows past the cursors in sequence order (a
/// prefix of each lane, at most its fair share of `limit`) up to `limit`.
/// The query plans matter here (measured at 20k pending rows, 50 keys,
/// batch 1024): each lane's first row is found by a row comparison on the
/// `(lane, sequence)` index, because `lane = $1 ORDER BY sequence LIMIT 1`
/// was planned as a primary-key scan that read the whole outbox for every
/// empty lane (150 ms per claim); reading a full batch from every lane
/// before cutting it read 10k rows for 1k; the rows are carried through
/// the statement instead of joined back (a hash join over the whole
/// outbox). Together: 110-240 ms down to 13-21 ms per claim. A row whose key has an earlier
/// unfinished per-row row (a retry, or under `BlockKey` a dead letter)
/// leaves its lane (still pending, due now) and is not returned. Lanes that
/// return rows are leased to the worker; a lane whose rows all left it
/// moves its cursor past them. Returns `(lane, row)` pairs.
async fn claim_lanes(
    tx: &mut PgConnection,
    req: &ClaimRequest,
    block: bool,
    limit: i64,
) -> OutboxResult<Vec<(i32, OutboxMessage)>> {
    // First lock the free lanes, in a statement of its own. The rows are
    // read by the next statement, whose snapshot is taken after the locks:
    // a lane whose settle committed while this claim waited is locked in
    // its new version (cursor moved, lease ended), and reading its rows in
    // the same statement would see them as they were before that settle
    // (a failed row still in the lane, its key not yet blocked), so a
    // retried row was published again from the lane, out of order (the
    // conformance test of per-key order caught it).
    let lanes: Vec<i32> = sqlx::query_scalar(
        "SELECT l.lane
           FROM vextrus_outbox_lanes l
          CROSS JOIN LATERAL (
              SELECT o.lane AS head_lane, o.sequence AS head FROM vextrus_outbox o
               WHERE (o.lane, o.sequence) > (l.lane, l.cursor) AND o.lane IS NOT NULL
               ORDER BY o.lane, o.sequence LIMIT 1
          ) AS h
          WHERE h.head_lane = l.lane
            AND (l.claimed_by IS NULL OR l.claimed_until <= now())
          ORDER BY h.head
          LIMIT $1
            FOR UPDATE OF l SKIP LOCKED",
    )
    .bind(LANES_PER_CLAIM)
    .fetch_all(&mut *tx)
    .await
    .map_err(map_out)?;
    if lanes.is_empty() {
        return Ok(Vec::new());
    }
    // The lane logic runs on narrow rows (lane, sequence, key): the
    // materialized CTEs stay in memory and their sort is small. Only the
    // rows handed out are read whole, by primary key, in sequence order.
    // (Carrying payload and headers through the CTEs spilled them to temp
    // files: for 4,096 rows the statement ran ~70 ms on the server, ~40 ms
    // this way, ~30 ms with headers stored as `json`; EXPLAIN ANALYZE.)
    let rows = sqlx::query(&format!(
        "WITH free AS MATERIALIZED (
             SELECT l.lane, l.cursor FROM vextrus_outbox_lanes l WHERE l.lane = ANY($4)
         ),
         cand AS MATERIALIZED (
             SELECT f.lane, c.sequence, c.partition_key
               FROM free f
              CROSS JOIN LATERAL (
                  SELECT o.sequence, o.partition_key
                    FROM vextrus_outbox o
                   WHERE o.lane = f.lane AND o.sequence > f.cursor
                   ORDER BY o.lane, o.sequence
                   LIMIT (SELECT ceil($3::float8 / greatest(count(*), 1))::bigint FROM free)
              ) AS c
              ORDER BY c.sequence
              LIMIT $3
         ),
         blocks AS MATERIALIZED (
             SELECT k.partition_key, b.seq
               FROM (SELECT DISTINCT partition_key FROM cand) AS k
              CROSS JOIN LATERAL (
                  SELECT min(u.sequence) AS seq FROM vextrus_outbox u
                   WHERE u.partition_key = k.partition_key
                     AND u.status <> 'published' AND u.lane IS NULL
                     AND (u.status = 'pending' OR $2)
              ) AS b
              WHERE b.seq IS NOT NULL
         ),
         marked AS MATERIALIZED (
             SELECT c.lane, c.sequence, (b.seq IS NOT NULL AND c.sequence > b.seq) AS held
               FROM cand c LEFT JOIN blocks b USING (partition_key)
         ),
         diverted AS (
             UPDATE vextrus_outbox o
                SET lane = NULL, next_attempt_at = LEAST(o.next_attempt_at, now())
              WHERE o.sequence = ANY (ARRAY(SELECT sequence FROM marked WHERE held))
         ),
         leased AS (
             UPDATE vextrus_outbox_lanes l
                SET claimed_by = CASE WHEN s.leased THEN $1 END,
                    claimed_until = CASE WHEN s.leased
                        THEN now() + make_interval(secs => $5::float8 / 1e6) END,
                    cursor = CASE WHEN s.leased THEN l.cursor ELSE s.through END
               FROM (SELECT lane, max(sequence) AS through, bool_or(NOT held) AS leased
                       FROM marked GROUP BY lane) AS s
              WHERE l.lane = s.lane
         )
         SELECT m.lane, {RETURNED}
           FROM (SELECT lane, sequence FROM marked WHERE NOT held ORDER BY sequence) AS m
          CROSS JOIN LATERAL (
              SELECT * FROM vextrus_outbox o WHERE o.sequence = m.sequence
          ) AS o
          ORDER BY m.sequence"
    ))
    .bind(&req.worker)
    .bind(block)
    .bind(limit)
    .bind(&lanes)
    .bind(micros(req.lease) as f64)
    .fetch_all(&mut *tx)
    .await
    .map_err(map_out)?;
    rows.iter()
        .map(|row| {
            let lane: i32 = row
                .try_get(0)
                .map_err(|e| OutboxError::Backend(Box::new(e)))?;
            Ok((lane, decode_row_at(row, 1)?))
        })
        .collect()
}

impl DeadLetters for PgOutbox {
    async fn status(&self) -> OutboxResult<OutboxStatusReport> {
        let (pending, dead, published, age): (i64, i64, i64, Option<f64>) =
            sqlx::query_as(&format!(
                "SELECT count(*) FILTER (WHERE {ROW_PENDING}),
                        count(*) FILTER (WHERE o.status = 'dead'),
                        count(*) FILTER (WHERE o.status = 'published' OR o.sequence <= l.cursor),
                        EXTRACT(EPOCH FROM now() - min(o.created_at)
                                         FILTER (WHERE {ROW_PENDING}))::float8
                   FROM {ROW_FROM}"
            ))
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
            "SELECT {ROW_COLUMNS} FROM {ROW_FROM} WHERE o.status = 'dead' \
             ORDER BY o.sequence LIMIT $1"
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
    /// Per-row published rows confirmed before the cutoff, and lane rows
    /// whose lane's cursor passed them before it (by the lanes' log marks,
    /// which go with them).
    async fn purge_published(&self, older_than: Duration) -> OutboxResult<u64> {
        let n: i64 = sqlx::query_scalar(
            "WITH old AS MATERIALIZED (
                 SELECT lane, max(through) AS through FROM vextrus_outbox_lane_log
                  WHERE published_at <= now() - make_interval(secs => $1::float8 / 1e6)
                  GROUP BY lane
             ),
             lane_rows AS (
                 DELETE FROM vextrus_outbox o USING old
                  WHERE o.lane = old.lane AND o.sequence <= old.through
                 RETURNING 1
             ),
             marks AS (
                 DELETE FROM vextrus_outbox_lane_log g USING old
                  WHERE g.lane = old.lane AND g.through <= old.through
             ),
             row_rows AS (
                 DELETE FROM vextrus_outbox
                  WHERE status = 'published' AND lane IS NULL
                    AND published_at <= now() - make_interval(secs => $1::float8 / 1e6)
                 RETURNING 1
             )
             SELECT (SELECT count(*) FROM lane_rows) + (SELECT count(*) FROM row_rows)",
        )
        .bind(micros(older_than) as f64)
        .fetch_one(self.pool())
        .await
        .map_err(map_out)?;
        Ok(to_u64(n))
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
