//! The saga store on PostgreSQL: instances, timelines, leases with fencing
//! tokens, durable timers on the database clock, and commands sent through
//! the transactional outbox.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{Connection, PgConnection, Row};
use uuid::Uuid;
use vextrus_core::outbox::{OutboxClaimer, OutboxError};
use vextrus_core::saga::{
    Claim, HistoryEntry, HistoryEvent, HistoryKind, Lease, LeaseUpdate, NewSaga, SagaCommand,
    SagaCommandOutbox, SagaCount, SagaError, SagaFilter, SagaId, SagaInstance, SagaProgress,
    SagaState, SagaStore, SagaTransition, Wake,
};
use vextrus_core::transport::MessageId;
use vextrus_kernel::{ErrorKind, HasErrorKind};

use crate::migrate::Migration;
use crate::outbox::{
    PgOutbox, ROW_COLUMNS, ROW_FROM, ROW_PENDING, check_batch, decode_row, enqueue_on, micros,
};

/// The saga tables (`migrations/0003_saga.sql`), version 3 of
/// [`MIGRATIONS`](crate::MIGRATIONS).
pub const SAGA_MIGRATION: Migration = Migration {
    version: 3,
    name: "saga",
    sql: include_str!("../migrations/0003_saga.sql"),
};

const INSTANCE_COLUMNS: &str = "id, saga_type, version, state, data::text, progress::text, \
     last_error, due_at, lease_owner, lease_expires_at, fencing_token, created_at, updated_at";

/// Sagas on PostgreSQL, sharing the database (and the outbox) of a
/// [`PgOutbox`].
///
/// - **One transaction per transition.** [`SagaStore::commit`] records the
///   reply's message id (`vextrus_saga_inbox`, so a redelivered reply writes
///   nothing), updates the instance only if the writer's fencing token is
///   current (`UPDATE … WHERE id = $1 AND fencing_token = $2`), appends the
///   timeline entries, and inserts each outgoing command into
///   `vextrus_outbox` as [`SagaCommand::to_outbound`] asking for replies on
///   `reply_to`; the outbox's relays publish them with its per-key order,
///   retries and dead letters. The inbox insert, the guarded update and the
///   multi-row history insert are one statement (data-modifying CTEs), so a
///   transition that sends commands or records a reply is `BEGIN`, that
///   statement, the outbox enqueue and `COMMIT`; one that does neither is a
///   single autocommit statement.
/// - **Replies without a claim of their own.**
///   [`SagaStore::commit_claiming`] folds the claim into that statement: the
///   update only matches if the token is still the one read and no live
///   lease is held, and it increments the token.
/// - **Clock.** Due times, lease expiries and history times are the
///   database's `now()`.
/// - **Claims.** [`SagaStore::claim_due`] takes due, unleased sagas with
///   `FOR UPDATE SKIP LOCKED`, so concurrent workers (in any process) never
///   get the same saga; every claim increments the fencing token.
///
/// ```no_run
/// use serde_json::json;
/// use vextrus_core::saga::{NewSaga, SagaId, SagaState, SagaStore};
/// use vextrus_postgres::{PgEventStore, PgOutbox, PgSagaStore};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let outbox = PgOutbox::new(PgEventStore::connect("postgres://postgres@127.0.0.1/test").await?);
/// outbox.migrate().await?; // event store, outbox/inbox and saga tables
/// let sagas = PgSagaStore::new(outbox, "saga.replies");
/// let id = SagaId::new();
/// sagas.create(NewSaga { id, saga_type: "order".into(), version: 1, data: json!({}), trace_context: None }).await?;
/// assert_eq!(sagas.load(id).await?.unwrap().state, SagaState::Running);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PgSagaStore {
    outbox: PgOutbox,
    reply_to: String,
}

impl PgSagaStore {
    /// A store over `outbox`'s database whose commands ask for replies on
    /// `reply_to`. Run [`PgOutbox::migrate`] (or `vextrus migrate`) first.
    pub fn new(outbox: PgOutbox, reply_to: impl Into<String>) -> Self {
        Self {
            outbox,
            reply_to: reply_to.into(),
        }
    }

    /// The outbox commands are queued in.
    pub fn outbox(&self) -> &PgOutbox {
        &self.outbox
    }

    /// Where participants are asked to reply.
    pub fn reply_to(&self) -> &str {
        &self.reply_to
    }

    fn pool(&self) -> &sqlx::PgPool {
        self.outbox.pool()
    }

    /// One transition: the inbox record, the guarded instance update and
    /// the timeline entries are ONE statement (data-modifying CTEs); with
    /// commands it runs in a transaction with the outbox insert, otherwise
    /// (no commands, no reply) it is a single autocommit statement.
    /// `claiming` (the instance as read): the saga's token must be
    /// `t.token - 1`, its `updated_at`, state and progress those read, and
    /// its lease free; the token becomes `t.token` (see
    /// [`SagaStore::commit_claiming`]).
    async fn write(
        &self,
        t: SagaTransition,
        claiming: Option<&SagaInstance>,
    ) -> Result<SagaInstance, SagaError> {
        let read_progress = claiming
            .map(|r| serde_json::to_string(&r.progress))
            .transpose()?;
        let messages = t
            .commands
            .iter()
            .map(|c| c.to_outbound(&self.reply_to))
            .collect::<Result<Vec<_>, _>>()?;
        check_batch(&messages).map_err(outbox_err)?;
        let events: Vec<String> = t
            .history
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<_, _>>()?;
        let (wake_kind, wake_after) = match t.wake {
            Wake::Now => ("now", 0),
            Wake::After(d) => ("after", micros(d)),
            Wake::Never => ("never", 0),
            Wake::Unchanged => ("unchanged", 0),
        };
        let lease_for = match t.lease {
            LeaseUpdate::Extend(d) => Some(micros(d)),
            LeaseUpdate::Release => None,
        };
        let query = sqlx::query(&WRITE_SQL)
            .bind(t.saga_id.0)
            .bind(token_param(t.token))
            .bind(t.state.as_str())
            .bind(serde_json::to_string(&t.data)?)
            .bind(serde_json::to_string(&t.progress)?)
            .bind(t.last_error.as_deref())
            .bind(wake_kind)
            .bind(wake_after)
            .bind(lease_for)
            .bind(&t.worker)
            .bind(i64::try_from(events.len()).unwrap_or(i64::MAX))
            .bind(&events)
            .bind(t.inbox_message_id)
            .bind(claiming.is_some())
            .bind(claiming.map(|r| r.updated_at))
            .bind(claiming.map(|r| r.state.as_str()))
            .bind(read_progress);

        // Without a transaction of its own, a statement that fails writes
        // nothing; an inbox record with no update can only happen inside
        // the transaction, which is then dropped (rolled back).
        let transactional = !messages.is_empty() || t.inbox_message_id.is_some();
        let mut conn = self.pool().acquire().await.map_err(map_err)?;
        if !transactional {
            let row = query.fetch_one(&mut *conn).await.map_err(map_err)?;
            return match decode_written(&row, &t)? {
                Some(instance) => Ok(instance),
                None => Err(write_refused(&mut conn, &t, claiming.is_some()).await),
            };
        }
        let mut tx = conn.begin().await.map_err(map_err)?;
        let row = query.fetch_one(&mut *tx).await.map_err(map_err)?;
        let Some(instance) = decode_written(&row, &t)? else {
            return Err(write_refused(&mut tx, &t, claiming.is_some()).await);
        };
        if !messages.is_empty() {
            enqueue_on(&mut tx, &messages).await.map_err(outbox_err)?;
        }
        tx.commit().await.map_err(map_err)?;
        if !messages.is_empty() {
            self.outbox.notify_relays();
        }
        Ok(instance)
    }
}

/// The statement of [`PgSagaStore::write`]: `$13` the reply's message id
/// (recorded first; if it was already there nothing else is written),
/// `$14` whether the write claims the saga.
static WRITE_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH ins AS (
             INSERT INTO vextrus_saga_inbox (message_id, saga_id)
             SELECT $13::uuid, $1 WHERE $13::uuid IS NOT NULL
             ON CONFLICT (message_id) DO NOTHING
             RETURNING 1
         ), u AS (
             UPDATE vextrus_sagas
                SET state = $3, data = $4::jsonb, progress = $5::jsonb, last_error = $6,
                    updated_at = now(),
                    due_at = CASE $7 WHEN 'now' THEN now()
                                     WHEN 'after' THEN now() + $8 * interval '1 microsecond'
                                     WHEN 'never' THEN NULL
                                     ELSE due_at END,
                    lease_owner = CASE WHEN $9::bigint IS NULL THEN NULL ELSE $10 END,
                    lease_expires_at = CASE WHEN $9::bigint IS NULL THEN NULL
                                            ELSE now() + $9 * interval '1 microsecond' END,
                    history_seq = history_seq + $11,
                    fencing_token = $2
              WHERE id = $1
                AND ($13::uuid IS NULL OR EXISTS (SELECT 1 FROM ins))
                AND CASE WHEN $14::boolean
                         THEN fencing_token = $2 - 1
                              AND (lease_expires_at IS NULL OR lease_expires_at <= now())
                              AND updated_at = $15 AND state = $16 AND progress = $17::jsonb
                         ELSE fencing_token = $2 END
             RETURNING *
         ), h AS (
             INSERT INTO vextrus_saga_history (saga_id, seq, at, worker, event)
             SELECT u.id, u.history_seq - $11 + e.ord, now(), $10, e.event::jsonb
               FROM u, unnest($12::text[]) WITH ORDINALITY AS e(event, ord)
         )
         SELECT {INSTANCE_COLUMNS}, (SELECT count(*) FROM ins) AS recorded
           FROM (SELECT 1) AS one LEFT JOIN u ON true"
    )
});

/// The instance a write returned, or `None` if it wrote nothing. Fails with
/// [`SagaError::DuplicateMessage`] if the transition's reply was recorded
/// before.
fn decode_written(row: &PgRow, t: &SagaTransition) -> Result<Option<SagaInstance>, SagaError> {
    let recorded: i64 = row.try_get(13).map_err(map_err)?;
    if let Some(m) = t.inbox_message_id
        && recorded == 0
    {
        return Err(SagaError::DuplicateMessage(m));
    }
    let id: Option<Uuid> = row.try_get(0).map_err(map_err)?;
    match id {
        Some(_) => decode_instance(row).map(Some),
        None => Ok(None),
    }
}

/// Why a write matched no row: the saga is missing, the token is stale, or
/// (claiming) a live lease is held.
async fn write_refused(conn: &mut PgConnection, t: &SagaTransition, claiming: bool) -> SagaError {
    if !claiming {
        return fenced_or_missing(conn, t.saga_id, t.token).await;
    }
    let current: Result<Option<(i64, Option<String>)>, _> =
        sqlx::query_as("SELECT fencing_token, lease_owner FROM vextrus_sagas WHERE id = $1")
            .bind(t.saga_id.0)
            .fetch_optional(&mut *conn)
            .await;
    match current {
        Ok(Some((current, owner))) => {
            let current = u64::try_from(current).unwrap_or(0);
            if current + 1 == t.token && owner.is_some() {
                SagaError::Leased {
                    saga_id: t.saga_id,
                    owner: owner.unwrap_or_default(),
                }
            } else {
                SagaError::Fenced {
                    saga_id: t.saga_id,
                    token: t.token.saturating_sub(1),
                    current,
                }
            }
        }
        Ok(None) => SagaError::NotFound(t.saga_id),
        Err(e) => map_err(e),
    }
}

fn map_err(err: sqlx::Error) -> SagaError {
    match crate::error::map_sqlx(err) {
        e if e.kind() == ErrorKind::Transient => SagaError::unavailable(e),
        e => SagaError::backend(e),
    }
}

fn outbox_err(err: OutboxError) -> SagaError {
    match err.kind() {
        ErrorKind::Transient => SagaError::unavailable(err),
        ErrorKind::Validation => SagaError::InvalidMessage(err.to_string()),
        _ => SagaError::backend(err),
    }
}

fn decode_instance(row: &PgRow) -> Result<SagaInstance, SagaError> {
    let data: String = row.try_get(4).map_err(map_err)?;
    let progress: String = row.try_get(5).map_err(map_err)?;
    let state: String = row.try_get(3).map_err(map_err)?;
    let version: i32 = row.try_get(2).map_err(map_err)?;
    let token: i64 = row.try_get(10).map_err(map_err)?;
    let owner: Option<String> = row.try_get(8).map_err(map_err)?;
    let expires: Option<DateTime<Utc>> = row.try_get(9).map_err(map_err)?;
    Ok(SagaInstance {
        id: SagaId(row.try_get(0).map_err(map_err)?),
        saga_type: row.try_get(1).map_err(map_err)?,
        version: u32::try_from(version).unwrap_or(0),
        state: state
            .parse::<SagaState>()
            .map_err(|e| SagaError::backend(format!("stored saga state: {e}")))?,
        data: serde_json::from_str::<Value>(&data)?,
        progress: serde_json::from_str::<SagaProgress>(&progress)?,
        due_at: row.try_get(7).map_err(map_err)?,
        lease: owner
            .zip(expires)
            .map(|(owner, expires_at)| Lease { owner, expires_at }),
        fencing_token: u64::try_from(token).unwrap_or(0),
        last_error: row.try_get(6).map_err(map_err)?,
        created_at: row.try_get(11).map_err(map_err)?,
        updated_at: row.try_get(12).map_err(map_err)?,
    })
}

/// Why a guarded write matched no row: the saga is missing, or `token` is
/// stale.
async fn fenced_or_missing(conn: &mut PgConnection, id: SagaId, token: u64) -> SagaError {
    let current: Result<Option<i64>, _> =
        sqlx::query_scalar("SELECT fencing_token FROM vextrus_sagas WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&mut *conn)
            .await;
    match current {
        Ok(Some(current)) => SagaError::Fenced {
            saga_id: id,
            token,
            current: u64::try_from(current).unwrap_or(0),
        },
        Ok(None) => SagaError::NotFound(id),
        Err(e) => map_err(e),
    }
}

fn token_param(token: u64) -> i64 {
    i64::try_from(token).unwrap_or(i64::MAX)
}

impl SagaStore for PgSagaStore {
    async fn now(&self) -> Result<DateTime<Utc>, SagaError> {
        sqlx::query_scalar("SELECT now()")
            .fetch_one(self.pool())
            .await
            .map_err(map_err)
    }

    async fn create(&self, new: NewSaga) -> Result<SagaInstance, SagaError> {
        let progress = serde_json::to_string(&new.initial_progress())?;
        let started = serde_json::to_string(&HistoryEvent::saga(HistoryKind::SagaStarted))?;
        let row = sqlx::query(&format!(
            "WITH s AS (
                 INSERT INTO vextrus_sagas
                     (id, saga_type, version, state, data, progress, due_at, history_seq)
                 VALUES ($1, $2, $3, 'running', $4::jsonb, $5::jsonb, now(), 1)
                 ON CONFLICT (id) DO NOTHING
                 RETURNING *
             ), h AS (
                 INSERT INTO vextrus_saga_history (saga_id, seq, at, worker, event)
                 SELECT id, 1, created_at, NULL, $6::jsonb FROM s
             )
             SELECT {INSTANCE_COLUMNS} FROM s"
        ))
        .bind(new.id.0)
        .bind(&new.saga_type)
        .bind(i32::try_from(new.version).unwrap_or(i32::MAX))
        .bind(serde_json::to_string(&new.data)?)
        .bind(progress)
        .bind(started)
        .fetch_optional(self.pool())
        .await
        .map_err(map_err)?;
        match row {
            Some(row) => decode_instance(&row),
            None => Err(SagaError::AlreadyExists(new.id)),
        }
    }

    async fn load(&self, id: SagaId) -> Result<Option<SagaInstance>, SagaError> {
        sqlx::query(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM vextrus_sagas WHERE id = $1"
        ))
        .bind(id.0)
        .fetch_optional(self.pool())
        .await
        .map_err(map_err)?
        .as_ref()
        .map(decode_instance)
        .transpose()
    }

    async fn history(&self, id: SagaId) -> Result<Vec<HistoryEntry>, SagaError> {
        let rows = sqlx::query(
            "SELECT seq, at, worker, event::text FROM vextrus_saga_history
              WHERE saga_id = $1 ORDER BY seq",
        )
        .bind(id.0)
        .fetch_all(self.pool())
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|r| {
                let seq: i64 = r.try_get(0).map_err(map_err)?;
                let event: String = r.try_get(3).map_err(map_err)?;
                Ok(HistoryEntry {
                    seq: u64::try_from(seq).unwrap_or(0),
                    at: r.try_get(1).map_err(map_err)?,
                    worker: r.try_get(2).map_err(map_err)?,
                    event: serde_json::from_str(&event)?,
                })
            })
            .collect()
    }

    async fn count_by_state(&self) -> Result<Vec<SagaCount>, SagaError> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT saga_type, state, count(*) FROM vextrus_sagas
              GROUP BY saga_type, state ORDER BY saga_type, state",
        )
        .fetch_all(self.pool())
        .await
        .map_err(map_err)?;
        rows.into_iter()
            .map(|(saga_type, state, count)| SagaCount::from_row(saga_type, &state, count))
            .collect()
    }

    async fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaInstance>, SagaError> {
        let states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
        let older = filter.older_than.map(micros);
        let newer = filter.newer_than.map(micros);
        let rows = sqlx::query(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM vextrus_sagas
              WHERE ($1::text IS NULL OR saga_type = $1)
                AND (cardinality($2::text[]) = 0 OR state = ANY($2))
                AND ($3::bigint IS NULL OR created_at <= now() - $3 * interval '1 microsecond')
                AND ($4::bigint IS NULL OR created_at >= now() - $4 * interval '1 microsecond')
              ORDER BY created_at, id
              LIMIT $5"
        ))
        .bind(filter.saga_type.as_deref())
        .bind(&states)
        .bind(older)
        .bind(newer)
        .bind(i64::try_from(filter.limit).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await
        .map_err(map_err)?;
        rows.iter().map(decode_instance).collect()
    }

    async fn claim_due(
        &self,
        worker: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Claim>, SagaError> {
        let rows = sqlx::query(&format!(
            "WITH due AS (
                 SELECT id FROM vextrus_sagas
                  WHERE due_at IS NOT NULL
                    AND state NOT IN ('completed', 'compensated', 'failed')
                    AND due_at <= now()
                    AND (lease_expires_at IS NULL OR lease_expires_at <= now())
                  ORDER BY due_at
                  LIMIT $3
                  FOR UPDATE SKIP LOCKED
             ), claimed AS (
                 UPDATE vextrus_sagas s
                    SET fencing_token = s.fencing_token + 1,
                        lease_owner = $1,
                        lease_expires_at = now() + $2 * interval '1 microsecond'
                   FROM due WHERE s.id = due.id
                 RETURNING s.*
             )
             SELECT {INSTANCE_COLUMNS} FROM claimed ORDER BY due_at"
        ))
        .bind(worker)
        .bind(micros(lease))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|r| {
                let instance = decode_instance(r)?;
                Ok(Claim {
                    token: instance.fencing_token,
                    instance,
                })
            })
            .collect()
    }

    async fn claim(&self, id: SagaId, worker: &str, lease: Duration) -> Result<Claim, SagaError> {
        let row = sqlx::query(&format!(
            "UPDATE vextrus_sagas
                SET fencing_token = fencing_token + 1,
                    lease_owner = $2,
                    lease_expires_at = now() + $3 * interval '1 microsecond'
              WHERE id = $1 AND (lease_expires_at IS NULL OR lease_expires_at <= now())
             RETURNING {INSTANCE_COLUMNS}"
        ))
        .bind(id.0)
        .bind(worker)
        .bind(micros(lease))
        .fetch_optional(self.pool())
        .await
        .map_err(map_err)?;
        if let Some(row) = row {
            let instance = decode_instance(&row)?;
            return Ok(Claim {
                token: instance.fencing_token,
                instance,
            });
        }
        let owner: Option<Option<String>> =
            sqlx::query_scalar("SELECT lease_owner FROM vextrus_sagas WHERE id = $1")
                .bind(id.0)
                .fetch_optional(self.pool())
                .await
                .map_err(map_err)?;
        match owner {
            None => Err(SagaError::NotFound(id)),
            Some(owner) => Err(SagaError::Leased {
                saga_id: id,
                owner: owner.unwrap_or_default(),
            }),
        }
    }

    async fn commit(&self, t: SagaTransition) -> Result<SagaInstance, SagaError> {
        self.write(t, None).await
    }

    async fn commit_claiming(
        &self,
        t: SagaTransition,
        read: &SagaInstance,
        _lease: Duration,
    ) -> Result<SagaInstance, SagaError> {
        self.write(t, Some(read)).await
    }

    async fn release(&self, id: SagaId, token: u64) -> Result<(), SagaError> {
        let mut conn = self.pool().acquire().await.map_err(map_err)?;
        let done = sqlx::query(
            "UPDATE vextrus_sagas SET lease_owner = NULL, lease_expires_at = NULL
              WHERE id = $1 AND fencing_token = $2",
        )
        .bind(id.0)
        .bind(token_param(token))
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
        if done.rows_affected() == 0 {
            return Err(fenced_or_missing(&mut conn, id, token).await);
        }
        Ok(())
    }

    async fn message_handled(&self, message_id: Uuid) -> Result<bool, SagaError> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM vextrus_saga_inbox WHERE message_id = $1)")
            .bind(message_id)
            .fetch_one(self.pool())
            .await
            .map_err(map_err)
    }
}

/// The saga commands among the outbox's pending rows, oldest first;
/// `mark_sent` marks them published there (what a relay does after the
/// broker's ack).
impl SagaCommandOutbox for PgSagaStore {
    async fn pending_commands(&self, limit: usize) -> Result<Vec<SagaCommand>, SagaError> {
        let rows = sqlx::query(&format!(
            "SELECT {ROW_COLUMNS} FROM {ROW_FROM}
              WHERE {ROW_PENDING} AND o.headers->>'saga_id' IS NOT NULL
              ORDER BY o.sequence
              LIMIT $1"
        ))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|r| {
                let row = decode_row(r).map_err(outbox_err)?;
                SagaCommand::from_outbound(&row.message)
            })
            .collect()
    }

    async fn mark_sent(&self, message_ids: &[Uuid]) -> Result<(), SagaError> {
        let ids: Vec<MessageId> = message_ids.iter().map(|u| MessageId(*u)).collect();
        self.outbox.mark_published(&ids).await.map_err(outbox_err)
    }
}
