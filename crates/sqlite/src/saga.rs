//! [`SqliteSagaStore`]: the durable saga store on SQLite, sharing the
//! outbox's file, pool and write turns.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};
use uuid::Uuid;
use vextrus_core::outbox::{OutboxClaimer, OutboxError};
use vextrus_core::saga::{
    Claim, HistoryEntry, HistoryEvent, HistoryKind, Lease, LeaseUpdate, NewSaga, SAGA_ID_HEADER,
    SagaCommand, SagaCommandOutbox, SagaCount, SagaError, SagaFilter, SagaId, SagaInstance,
    SagaProgress, SagaState, SagaStore, SagaTransition, Wake,
};
use vextrus_core::transport::{Headers, MessageId, OutboundMessage};
use vextrus_kernel::{ErrorKind, HasErrorKind};

use crate::SqliteOutbox;
use crate::migrate::Migration;
use crate::outbox::{WriteTx, enqueue_on, from_nanos, nanos};
use crate::store::map_sqlx;

/// The saga migration, version 3 of [`MIGRATIONS`](crate::migrate::MIGRATIONS):
/// saga instances, their append-only history and the saga store's inbox
/// (`vextrus migrate`, [`SqliteEventStore::migrate`](crate::SqliteEventStore::migrate),
/// [`SqliteOutbox::migrate`] and [`SqliteSagaStore::migrate`] all apply it).
pub const SAGA_MIGRATION: Migration = Migration {
    version: 3,
    name: "saga",
    sql: include_str!("../migrations/0003_saga.sql"),
};

/// The database clock in nanoseconds since the Unix epoch (millisecond
/// precision), the outbox's expression. `'now'` is stable within one
/// statement, so every use in one statement reads the same instant.
const NOW: &str = "(CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER) * 1000000)";

/// The states a worker or an operator may still act on (the due index's).
const LIVE_STATES: &str = "state IN ('running', 'compensating', 'compensation_failed')";

const COLUMNS: &str = "id, saga_type, version, state, data, progress, last_error, due_at, \
     lease_owner, lease_until, fencing_token, created_at, updated_at, history_seq";

/// The durable saga store on SQLite: [`SagaStore`] and
/// [`SagaCommandOutbox`] over an [`SqliteOutbox`]'s database.
///
/// - **One transaction per transition**: [`commit`](SagaStore::commit)
///   takes the outbox's write turn (`BEGIN IMMEDIATE`), updates the instance
///   only if the writer's fencing token is current (a stale token writes
///   nothing: [`SagaError::Fenced`]), records the reply that caused the
///   transition (already recorded: nothing is written,
///   [`SagaError::DuplicateMessage`]), appends the history entries and
///   inserts each outgoing command into the outbox table as
///   [`SagaCommand::to_outbound`] with this store's `reply_to`, through the
///   outbox's own insert code. The crate's `OutboxRelay` publishes them with
///   the outbox's per-key order, retries and dead letters; this process's
///   relay workers are woken at commit.
/// - **Clock**: due times, leases, history times and ages are the
///   database's clock (`julianday('now')`, millisecond precision), read
///   inside the write transaction.
/// - **Claims**: SQLite has one writer, and a claim is one
///   `UPDATE … RETURNING` in a `BEGIN IMMEDIATE` transaction, so two
///   concurrent callers (in this process or another sharing the file) never
///   get one saga; every claim increments the fencing token. Due sagas are
///   found through a partial index on `due_at` of non-terminal sagas.
/// - **Cost** (SQL statements between `BEGIN IMMEDIATE` and `COMMIT`, one
///   transaction each): [`create`](SagaStore::create) 2 (instance and
///   `saga_started` inserts); [`claim`](SagaStore::claim) and
///   [`claim_due`](SagaStore::claim_due) 1 (`UPDATE … RETURNING`, plus one
///   `SELECT` only when a single claim fails, to name the holder);
///   [`commit`](SagaStore::commit) 1 to 5: the instance `UPDATE …
///   RETURNING` (fencing check, clock and history sequence in one
///   statement), the reply's inbox `INSERT` if the transition handles a
///   reply, one multi-row history `INSERT`, and for outgoing commands the
///   outbox's duplicate-id `SELECT` plus one multi-row outbox `INSERT`;
///   [`release`](SagaStore::release) 1. A worker's transition is therefore
///   2 transactions (claim, commit) and 2 to 6 statements; a remote step
///   (started with its command, finished by its reply) is 4 transactions
///   and about 9 statements, besides the relay's own.
///
/// Clones share the pool. Commands are outbox rows, so the saga tables need
/// the outbox's migration too; [`migrate`](Self::migrate) applies every
/// migration.
///
/// ```
/// use std::time::Duration;
/// use serde_json::json;
/// use vextrus_core::saga::{NewSaga, SagaId, SagaState, SagaStore};
/// use vextrus_sqlite::SqliteOutbox;
/// use vextrus_sqlite::saga::SqliteSagaStore;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let store = SqliteSagaStore::new(SqliteOutbox::temporary().await.unwrap(), "saga.replies");
/// store.migrate().await.unwrap();
/// let id = SagaId::new();
/// store.create(NewSaga { id, saga_type: "t".into(), version: 1, data: json!({}), trace_context: None }).await.unwrap();
///
/// let first = store.claim(id, "worker-a", Duration::from_secs(10)).await.unwrap();
/// // worker-a holds a live lease: worker-b cannot claim
/// assert!(store.claim(id, "worker-b", Duration::from_secs(10)).await.is_err());
/// store.release(id, first.token).await.unwrap();
/// let second = store.claim(id, "worker-b", Duration::from_secs(10)).await.unwrap();
/// assert_eq!(second.token, first.token + 1);
/// // worker-a's token is stale now
/// assert!(store.release(id, first.token).await.unwrap_err().is_fenced());
/// assert_eq!(store.load(id).await.unwrap().unwrap().state, SagaState::Running);
/// # });
/// ```
#[derive(Clone)]
pub struct SqliteSagaStore {
    outbox: SqliteOutbox,
    reply_to: Arc<str>,
}

impl std::fmt::Debug for SqliteSagaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteSagaStore")
            .field("outbox", &self.outbox)
            .field("reply_to", &self.reply_to)
            .finish()
    }
}

/// A driver error: busy/locked databases, I/O and pool failures may pass
/// ([`SagaError::Unavailable`]), the rest is [`SagaError::Backend`].
fn sql_err(err: sqlx::Error) -> SagaError {
    let e = map_sqlx(err);
    if e.kind() == ErrorKind::Transient {
        SagaError::unavailable(e)
    } else {
        SagaError::backend(e)
    }
}

/// An outbox failure met while writing a transition.
fn outbox_err(err: OutboxError) -> SagaError {
    match err {
        OutboxError::InvalidMessage(m) => SagaError::InvalidMessage(m),
        e if e.kind() == ErrorKind::Transient => SagaError::unavailable(e),
        e => SagaError::backend(e),
    }
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> SagaError {
    SagaError::backend(format!("stored saga {what} is invalid: {e}"))
}

fn to_i64(v: u64, what: &str) -> Result<i64, SagaError> {
    i64::try_from(v).map_err(|_| SagaError::backend(format!("{what} {v} does not fit an INTEGER")))
}

/// A decoded instance row and its last history sequence number.
fn decode(row: &SqliteRow) -> Result<(SagaInstance, i64), SagaError> {
    let id: String = row.try_get("id").map_err(sql_err)?;
    let id: SagaId = id.parse().map_err(|e| corrupt("id", e))?;
    let state: String = row.try_get("state").map_err(sql_err)?;
    let state: SagaState = state.parse().map_err(|e| corrupt("state", e))?;
    let data: String = row.try_get("data").map_err(sql_err)?;
    let progress: String = row.try_get("progress").map_err(sql_err)?;
    let progress: SagaProgress =
        serde_json::from_str(&progress).map_err(|e| corrupt("progress", e))?;
    let version: i64 = row.try_get("version").map_err(sql_err)?;
    let token: i64 = row.try_get("fencing_token").map_err(sql_err)?;
    let due_at: Option<i64> = row.try_get("due_at").map_err(sql_err)?;
    let owner: Option<String> = row.try_get("lease_owner").map_err(sql_err)?;
    let until: Option<i64> = row.try_get("lease_until").map_err(sql_err)?;
    let created: i64 = row.try_get("created_at").map_err(sql_err)?;
    let updated: i64 = row.try_get("updated_at").map_err(sql_err)?;
    let history_seq: i64 = row.try_get("history_seq").map_err(sql_err)?;
    let instance = SagaInstance {
        id,
        saga_type: row.try_get("saga_type").map_err(sql_err)?,
        version: u32::try_from(version).map_err(|e| corrupt("version", e))?,
        state,
        data: serde_json::from_str(&data).map_err(|e| corrupt("data", e))?,
        progress,
        due_at: due_at.map(from_nanos),
        lease: match (owner, until) {
            (Some(owner), Some(until)) => Some(Lease {
                owner,
                expires_at: from_nanos(until),
            }),
            _ => None,
        },
        fencing_token: u64::try_from(token).map_err(|e| corrupt("fencing token", e))?,
        last_error: row.try_get("last_error").map_err(sql_err)?,
        created_at: from_nanos(created),
        updated_at: from_nanos(updated),
    };
    Ok((instance, history_seq))
}

/// Claims in due order (`RETURNING` gives no order).
fn sorted_claims(rows: &[SqliteRow]) -> Result<Vec<Claim>, SagaError> {
    let mut claims = rows
        .iter()
        .map(|r| {
            decode(r).map(|(instance, _)| Claim {
                token: instance.fencing_token,
                instance,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    claims.sort_by_key(|c| (c.instance.due_at, c.instance.created_at, c.instance.id));
    Ok(claims)
}

/// Appends `events` as entries `first_seq..` of `saga`'s history, in one statement.
async fn append_history(
    conn: &mut SqliteConnection,
    saga: SagaId,
    first_seq: i64,
    at: i64,
    worker: Option<&str>,
    events: &[HistoryEvent],
) -> Result<(), SagaError> {
    if events.is_empty() {
        return Ok(());
    }
    let encoded = events
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<Vec<_>, _>>()?;
    let saga = saga.to_string();
    let mut qb =
        QueryBuilder::<Sqlite>::new("INSERT INTO saga_history (saga_id, seq, at, worker, event) ");
    qb.push_values(encoded.iter().enumerate(), |mut b, (i, event)| {
        b.push_bind(saga.as_str())
            .push_bind(first_seq.saturating_add(i64::try_from(i).unwrap_or(i64::MAX)))
            .push_bind(at)
            .push_bind(worker)
            .push_bind(event.as_str());
    });
    qb.build().execute(&mut *conn).await.map_err(sql_err)?;
    Ok(())
}

/// The current fencing token of `id`, for the error of a write that matched
/// nothing: [`SagaError::NotFound`] or [`SagaError::Fenced`].
async fn fenced_or_missing(
    conn: &mut SqliteConnection,
    id: SagaId,
    token: u64,
) -> Result<SagaError, SagaError> {
    let current: Option<i64> =
        sqlx::query_scalar("SELECT fencing_token FROM saga_instances WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&mut *conn)
            .await
            .map_err(sql_err)?;
    Ok(match current {
        None => SagaError::NotFound(id),
        Some(current) => SagaError::Fenced {
            saga_id: id,
            token,
            current: u64::try_from(current).unwrap_or_default(),
        },
    })
}

/// The claim of due sagas: one `UPDATE … RETURNING` over the due index,
/// read in `(due_at, seq)` order, which the index gives without sorting, so
/// the `LIMIT` stops the scan early. Binds: worker, lease nanoseconds, limit.
fn claim_due_sql() -> String {
    format!(
        "WITH clock AS (SELECT {NOW} AS now)
         UPDATE saga_instances
            SET fencing_token = fencing_token + 1,
                lease_owner = ?1,
                lease_until = (SELECT now FROM clock) + ?2
          WHERE seq IN (
                SELECT seq FROM saga_instances
                 WHERE {LIVE_STATES} AND due_at IS NOT NULL
                   AND due_at <= (SELECT now FROM clock)
                   AND (lease_until IS NULL OR lease_until <= (SELECT now FROM clock))
                 ORDER BY due_at, seq
                 LIMIT ?3)
          RETURNING {COLUMNS}"
    )
}

impl SqliteSagaStore {
    /// The saga store over `outbox`'s database; commands ask for their
    /// replies on `reply_to`. Does not migrate: call
    /// [`migrate`](Self::migrate).
    pub fn new(outbox: SqliteOutbox, reply_to: impl Into<String>) -> Self {
        Self {
            outbox,
            reply_to: Arc::from(reply_to.into()),
        }
    }

    /// Applies every migration not yet applied (event store, outbox and
    /// inbox, saga: all of [`MIGRATIONS`](crate::migrate::MIGRATIONS)) and
    /// returns how many it applied. Running it again is harmless.
    pub async fn migrate(&self) -> Result<usize, SagaError> {
        self.outbox.migrate().await.map_err(outbox_err)
    }

    /// The outbox the commands go to (relay it with the crate's relay).
    pub fn outbox(&self) -> &SqliteOutbox {
        &self.outbox
    }

    /// The destination commands ask replies to be sent to.
    pub fn reply_to(&self) -> &str {
        &self.reply_to
    }

    async fn begin(&self) -> Result<WriteTx, SagaError> {
        self.outbox.begin_immediate().await.map_err(outbox_err)
    }

    fn pool(&self) -> &sqlx::SqlitePool {
        self.outbox.pool()
    }

    /// The states of the sagas among `ids` that exist, in one read (no
    /// write lock), in no particular order: how a caller watching many
    /// sagas (the demo's order placer) learns which finished without one
    /// [`load`](SagaStore::load) each.
    ///
    /// ```
    /// use serde_json::json;
    /// use vextrus_core::saga::{NewSaga, SagaId, SagaState, SagaStore};
    /// use vextrus_sqlite::SqliteOutbox;
    /// use vextrus_sqlite::saga::SqliteSagaStore;
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let store = SqliteSagaStore::new(SqliteOutbox::temporary().await.unwrap(), "saga.replies");
    /// store.migrate().await.unwrap();
    /// let (a, missing) = (SagaId::new(), SagaId::new());
    /// store.create(NewSaga { id: a, saga_type: "t".into(), version: 1, data: json!({}), trace_context: None }).await.unwrap();
    /// assert_eq!(store.states_of(&[a, missing]).await.unwrap(), vec![(a, SagaState::Running)]);
    /// # });
    /// ```
    pub async fn states_of(&self, ids: &[SagaId]) -> Result<Vec<(SagaId, SagaState)>, SagaError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let list = serde_json::Value::from(ids.iter().map(ToString::to_string).collect::<Vec<_>>())
            .to_string();
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, state FROM saga_instances WHERE id IN (SELECT value FROM json_each(?))",
        )
        .bind(list)
        .fetch_all(self.pool())
        .await
        .map_err(sql_err)?;
        rows.into_iter()
            .map(|(id, state)| {
                Ok((
                    id.parse().map_err(|e| corrupt("id", e))?,
                    state.parse().map_err(|e| corrupt("state", e))?,
                ))
            })
            .collect()
    }
}

impl SagaStore for SqliteSagaStore {
    async fn now(&self) -> Result<DateTime<Utc>, SagaError> {
        let ns: i64 = sqlx::query_scalar(&format!("SELECT {NOW}"))
            .fetch_one(self.pool())
            .await
            .map_err(sql_err)?;
        Ok(from_nanos(ns))
    }

    async fn create(&self, new: NewSaga) -> Result<SagaInstance, SagaError> {
        let progress = serde_json::to_string(&new.initial_progress())?;
        let data = serde_json::to_string(&new.data)?;
        let started = serde_json::to_string(&HistoryEvent::saga(HistoryKind::SagaStarted))?;
        let mut tx = self.begin().await?;
        let row = sqlx::query(&format!(
            "INSERT INTO saga_instances
                 (id, saga_type, version, state, data, progress, due_at, created_at, updated_at)
             SELECT ?1, ?2, ?3, 'running', ?4, ?5, now, now, now FROM (SELECT {NOW} AS now) WHERE true
             ON CONFLICT (id) DO NOTHING
             RETURNING {COLUMNS}"
        ))
        .bind(new.id.to_string())
        .bind(new.saga_type.as_str())
        .bind(i64::from(new.version))
        .bind(data)
        .bind(progress)
        .fetch_optional(&mut *tx)
        .await
        .map_err(sql_err)?;
        let Some(row) = row else {
            return Err(SagaError::AlreadyExists(new.id));
        };
        let (instance, _) = decode(&row)?;
        sqlx::query(
            "INSERT INTO saga_history (saga_id, seq, at, worker, event) VALUES (?, 1, ?, NULL, ?)",
        )
        .bind(new.id.to_string())
        .bind(
            instance
                .created_at
                .timestamp_nanos_opt()
                .unwrap_or_default(),
        )
        .bind(started)
        .execute(&mut *tx)
        .await
        .map_err(sql_err)?;
        tx.commit().await.map_err(sql_err)?;
        Ok(instance)
    }

    async fn load(&self, id: SagaId) -> Result<Option<SagaInstance>, SagaError> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM saga_instances WHERE id = ?"
        ))
        .bind(id.to_string())
        .fetch_optional(self.pool())
        .await
        .map_err(sql_err)?
        .map(|r| decode(&r).map(|(i, _)| i))
        .transpose()
    }

    async fn history(&self, id: SagaId) -> Result<Vec<HistoryEntry>, SagaError> {
        sqlx::query(
            "SELECT seq, at, worker, event FROM saga_history WHERE saga_id = ? ORDER BY seq",
        )
        .bind(id.to_string())
        .fetch_all(self.pool())
        .await
        .map_err(sql_err)?
        .iter()
        .map(|r| {
            let seq: i64 = r.try_get("seq").map_err(sql_err)?;
            let at: i64 = r.try_get("at").map_err(sql_err)?;
            let event: String = r.try_get("event").map_err(sql_err)?;
            Ok(HistoryEntry {
                seq: u64::try_from(seq).map_err(|e| corrupt("history seq", e))?,
                at: from_nanos(at),
                worker: r.try_get("worker").map_err(sql_err)?,
                event: serde_json::from_str(&event).map_err(|e| corrupt("history event", e))?,
            })
        })
        .collect()
    }

    async fn count_by_state(&self) -> Result<Vec<SagaCount>, SagaError> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT saga_type, state, count(*) FROM saga_instances
              GROUP BY saga_type, state ORDER BY saga_type, state",
        )
        .fetch_all(self.pool())
        .await
        .map_err(sql_err)?;
        rows.into_iter()
            .map(|(saga_type, state, count)| SagaCount::from_row(saga_type, &state, count))
            .collect()
    }

    async fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaInstance>, SagaError> {
        if filter.limit == 0 {
            return Ok(Vec::new());
        }
        let states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
        let sql = format!(
            "SELECT {COLUMNS} FROM saga_instances, (SELECT {NOW} AS now)
              WHERE (?1 IS NULL OR saga_type = ?1)
                AND (?2 = 0 OR state IN (SELECT value FROM json_each(?3)))
                AND (?4 IS NULL OR created_at <= now - ?4)
                AND (?5 IS NULL OR created_at >= now - ?5)
              ORDER BY created_at, seq
              LIMIT ?6"
        );
        sqlx::query(&sql)
            .bind(filter.saga_type.as_deref())
            .bind(i64::from(!states.is_empty()))
            .bind(serde_json::Value::from(states).to_string())
            .bind(filter.older_than.map(nanos))
            .bind(filter.newer_than.map(nanos))
            .bind(i64::try_from(filter.limit).unwrap_or(i64::MAX))
            .fetch_all(self.pool())
            .await
            .map_err(sql_err)?
            .iter()
            .map(|r| decode(r).map(|(i, _)| i))
            .collect()
    }

    async fn claim_due(
        &self,
        worker: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Claim>, SagaError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // A read first (WAL readers never wait for the writer): idle workers
        // polling every few milliseconds must not queue for the one write
        // turn that transitions, the relay and the reply inbox need.
        let probe = format!(
            "WITH clock AS (SELECT {NOW} AS now)
             SELECT EXISTS (
                 SELECT 1 FROM saga_instances
                  WHERE {LIVE_STATES} AND due_at IS NOT NULL
                    AND due_at <= (SELECT now FROM clock)
                    AND (lease_until IS NULL OR lease_until <= (SELECT now FROM clock)))"
        );
        let any_due: bool = sqlx::query_scalar(&probe)
            .fetch_one(self.pool())
            .await
            .map_err(sql_err)?;
        if !any_due {
            return Ok(Vec::new());
        }
        let mut tx = self.begin().await?;
        let sql = claim_due_sql();
        let rows = sqlx::query(&sql)
            .bind(worker)
            .bind(nanos(lease))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(sql_err)?;
        let claims = sorted_claims(&rows)?;
        tx.commit().await.map_err(sql_err)?;
        Ok(claims)
    }

    async fn claim(&self, id: SagaId, worker: &str, lease: Duration) -> Result<Claim, SagaError> {
        let mut tx = self.begin().await?;
        let sql = format!(
            "WITH clock AS (SELECT {NOW} AS now)
             UPDATE saga_instances
                SET fencing_token = fencing_token + 1,
                    lease_owner = ?2,
                    lease_until = (SELECT now FROM clock) + ?3
              WHERE id = ?1
                AND (lease_until IS NULL OR lease_until <= (SELECT now FROM clock))
              RETURNING {COLUMNS}"
        );
        let rows = sqlx::query(&sql)
            .bind(id.to_string())
            .bind(worker)
            .bind(nanos(lease))
            .fetch_all(&mut *tx)
            .await
            .map_err(sql_err)?;
        if let Some(claim) = sorted_claims(&rows)?.pop() {
            tx.commit().await.map_err(sql_err)?;
            return Ok(claim);
        }
        let owner: Option<Option<String>> =
            sqlx::query_scalar("SELECT lease_owner FROM saga_instances WHERE id = ?")
                .bind(id.to_string())
                .fetch_optional(&mut *tx)
                .await
                .map_err(sql_err)?;
        tx.rollback().await.map_err(sql_err)?;
        Err(match owner {
            None => SagaError::NotFound(id),
            Some(owner) => SagaError::Leased {
                saga_id: id,
                owner: owner.unwrap_or_default(),
            },
        })
    }

    async fn commit(&self, t: SagaTransition) -> Result<SagaInstance, SagaError> {
        let data = serde_json::to_string(&t.data)?;
        let progress = serde_json::to_string(&t.progress)?;
        let messages = t
            .commands
            .iter()
            .map(|c| c.to_outbound(&self.reply_to))
            .collect::<Result<Vec<OutboundMessage>, _>>()?;
        let token = to_i64(t.token, "fencing token")?;
        let added = i64::try_from(t.history.len()).unwrap_or(i64::MAX);
        let due = match t.wake {
            Wake::Now => "now".to_owned(),
            Wake::After(d) => format!("now + {}", nanos(d)),
            Wake::Never => "NULL".to_owned(),
            Wake::Unchanged => "due_at".to_owned(),
        };
        let (lease_owner, lease_until) = match t.lease {
            LeaseUpdate::Extend(d) => ("?6", format!("now + {}", nanos(d))),
            LeaseUpdate::Release => ("NULL", "NULL".to_owned()),
        };
        let sql = format!(
            "WITH clock AS (SELECT {NOW} AS now)
             UPDATE saga_instances
                SET state = ?3, data = ?4, progress = ?5, last_error = ?7,
                    due_at = {due},
                    lease_owner = {lease_owner}, lease_until = {lease_until},
                    updated_at = now,
                    history_seq = history_seq + ?8
               FROM clock
              WHERE id = ?1 AND fencing_token = ?2
              RETURNING {COLUMNS}"
        );

        let mut tx = self.begin().await?;
        let row = sqlx::query(&sql)
            .bind(t.saga_id.to_string())
            .bind(token)
            .bind(t.state.as_str())
            .bind(data)
            .bind(progress)
            .bind(t.worker.as_str())
            .bind(t.last_error.as_deref())
            .bind(added)
            .fetch_optional(&mut *tx)
            .await
            .map_err(sql_err)?;
        let Some(row) = row else {
            let err = fenced_or_missing(&mut tx, t.saga_id, t.token).await?;
            tx.rollback().await.map_err(sql_err)?;
            return Err(err);
        };
        let (instance, last_seq) = decode(&row)?;
        let now = instance
            .updated_at
            .timestamp_nanos_opt()
            .unwrap_or_default();
        if let Some(m) = t.inbox_message_id {
            let recorded = sqlx::query(
                "INSERT INTO saga_inbox (message_id, saga_id, handled_at) VALUES (?, ?, ?)
                 ON CONFLICT (message_id) DO NOTHING",
            )
            .bind(m.to_string())
            .bind(t.saga_id.to_string())
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(sql_err)?
            .rows_affected();
            if recorded == 0 {
                tx.rollback().await.map_err(sql_err)?;
                return Err(SagaError::DuplicateMessage(m));
            }
        }
        append_history(
            &mut tx,
            t.saga_id,
            last_seq - added + 1,
            now,
            Some(&t.worker),
            &t.history,
        )
        .await?;
        enqueue_on(&mut tx, &messages).await.map_err(outbox_err)?;
        tx.commit().await.map_err(sql_err)?;
        if !messages.is_empty() {
            self.outbox.notify();
        }
        Ok(instance)
    }

    async fn release(&self, id: SagaId, token: u64) -> Result<(), SagaError> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE saga_instances SET lease_owner = NULL, lease_until = NULL
              WHERE id = ? AND fencing_token = ?",
        )
        .bind(id.to_string())
        .bind(to_i64(token, "fencing token")?)
        .execute(&mut *tx)
        .await
        .map_err(sql_err)?
        .rows_affected();
        if done == 0 {
            let err = fenced_or_missing(&mut tx, id, token).await?;
            tx.rollback().await.map_err(sql_err)?;
            return Err(err);
        }
        tx.commit().await.map_err(sql_err)
    }

    async fn message_handled(&self, message_id: Uuid) -> Result<bool, SagaError> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM saga_inbox WHERE message_id = ?)")
            .bind(message_id.to_string())
            .fetch_one(self.pool())
            .await
            .map_err(sql_err)
    }
}

/// The saga commands among the outbox's pending rows (those carrying the
/// `saga_id` header), oldest first; `mark_sent` marks them published there.
impl SagaCommandOutbox for SqliteSagaStore {
    async fn pending_commands(&self, limit: usize) -> Result<Vec<SagaCommand>, SagaError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "SELECT id, destination, partition_key, payload, headers, created_at FROM outbox
              WHERE status = 'pending' AND json_extract(headers, ?1) IS NOT NULL
              ORDER BY sequence
              LIMIT ?2",
        )
        .bind(format!("$.{SAGA_ID_HEADER}"))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await
        .map_err(sql_err)?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get("id").map_err(sql_err)?;
                let headers: String = r.try_get("headers").map_err(sql_err)?;
                let created: i64 = r.try_get("created_at").map_err(sql_err)?;
                let message = OutboundMessage {
                    id: id
                        .parse::<MessageId>()
                        .map_err(|e| corrupt("outbox id", e))?,
                    destination: r.try_get("destination").map_err(sql_err)?,
                    partition_key: r.try_get("partition_key").map_err(sql_err)?,
                    payload: r.try_get("payload").map_err(sql_err)?,
                    headers: serde_json::from_str::<Headers>(&headers)
                        .map_err(|e| corrupt("outbox headers", e))?,
                    created_at: from_nanos(created),
                };
                SagaCommand::from_outbound(&message)
            })
            .collect()
    }

    async fn mark_sent(&self, message_ids: &[Uuid]) -> Result<(), SagaError> {
        let ids: Vec<MessageId> = message_ids.iter().map(|u| MessageId(*u)).collect();
        self.outbox.mark_published(&ids).await.map_err(outbox_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn due_claims_read_the_due_index_in_order_without_sorting() {
        let outbox = SqliteOutbox::temporary().await.unwrap();
        let plan: Vec<String> = sqlx::query(&format!("EXPLAIN QUERY PLAN {}", claim_due_sql()))
            .bind("w")
            .bind(1_i64)
            .bind(10_i64)
            .fetch_all(outbox.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>("detail"))
            .collect();
        let text = plan.join("\n");
        assert!(text.contains("USING INDEX saga_instances_due"), "{text}");
        assert!(!text.contains("TEMP B-TREE"), "{text}");
    }
}
