//! Each participant's own SQL store: one connection pool per participant,
//! portable SQL that runs unchanged on SQLite (the embedded default) and
//! PostgreSQL, the participants' migrator, and the idempotency-key table.
//!
//! The SQL is written once: `$1`-style parameters (SQLite accepts them too),
//! `BIGINT` minor units and `TEXT` codes, `INSERT ... ON CONFLICT DO
//! NOTHING` for claims, and sums wrapped in `CAST(... AS BIGINT)` so both
//! backends return the same type. Every participant's tables carry its name
//! as a prefix, so all of them can share one PostgreSQL database, while on
//! SQLite each participant gets a file of its own (so their writers never
//! wait for each other).

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyConnection, AnyPool, Executor, Row, Transaction};

use crate::error::{Error, Result};

/// Which database a [`Database`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Backend {
    /// A SQLite file (WAL mode, writers serialized with `BEGIN IMMEDIATE`).
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// How durable SQLite commits are (ignored on PostgreSQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Durability {
    /// `synchronous=FULL`: every commit is fsynced before it returns;
    /// survives power loss.
    #[default]
    Full,
    /// `synchronous=NORMAL` in WAL mode: commits survive a process crash
    /// (kill -9) but the last ones may be lost on power loss. Much faster.
    Normal,
}

/// One participant's store: a connection pool over SQLite or PostgreSQL.
///
/// ```
/// use vextrus_order_to_cash::{Backend, Database};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let db = Database::temporary().await.unwrap();
/// assert_eq!(db.backend(), Backend::Sqlite);
/// let mut tx = db.begin().await.unwrap();
/// sqlx::query("CREATE TABLE t (x BIGINT)").execute(&mut *tx).await.unwrap();
/// tx.commit().await.unwrap();
/// # });
/// ```
#[derive(Clone)]
pub struct Database {
    pool: AnyPool,
    backend: Backend,
    url: String,
    durability: Durability,
    writer: Arc<tokio::sync::Mutex<()>>,
    _temp: Option<Arc<tempfile::TempDir>>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("backend", &self.backend)
            .field("pool_size", &self.pool.size())
            .finish()
    }
}

impl Database {
    /// How long a SQLite writer waits for the write lock before it fails
    /// with a (transient) busy error.
    pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

    /// Connects to `sqlite:path?mode=rwc` or `postgres://...`, with
    /// [`Durability::Full`].
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, Durability::Full, 8).await
    }

    /// Connects with a SQLite durability and a pool size. SQLite
    /// connections are put in WAL mode with a busy timeout and foreign keys.
    pub async fn connect_with(
        url: &str,
        durability: Durability,
        max_connections: u32,
    ) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(Error::invalid(
                "database url",
                format!("expected sqlite:... or postgres://..., got {url:?}"),
            ));
        };
        let options = AnyConnectOptions::from_str(url)
            .map_err(|e| Error::invalid("database url", e.to_string()))?;
        let mut pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(30));
        // The vextrus stores' acquire check: no ping per acquire (a round
        // trip each); on PostgreSQL a connection idle for the stores'
        // default threshold is pinged first, a SQLite connection never (it
        // does not break idle).
        pool = match backend {
            Backend::Postgres => vextrus_postgres::ping_idle_connections(
                pool,
                vextrus_postgres::PgStoreConfig::default().ping_idle_after,
            ),
            Backend::Sqlite => pool.test_before_acquire(false),
        };
        if backend == Backend::Sqlite {
            let synchronous = match durability {
                Durability::Full => "PRAGMA synchronous = FULL",
                Durability::Normal => "PRAGMA synchronous = NORMAL",
            };
            pool = pool.after_connect(move |conn, _meta| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute(synchronous).await?;
                    conn.execute("PRAGMA busy_timeout = 10000").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    Ok(())
                })
            });
        }
        let pool = pool
            .connect_with(options)
            .await
            .map_err(Error::db("database"))?;
        Ok(Self {
            pool,
            backend,
            url: url.to_owned(),
            durability,
            writer: Arc::new(tokio::sync::Mutex::new(())),
            _temp: None,
        })
    }

    /// A SQLite file at `path` (created if missing).
    pub async fn sqlite_file(path: &Path, durability: Durability) -> Result<Self> {
        let url = format!("sqlite:{}?mode=rwc", path.display());
        Self::connect_with(&url, durability, 4).await
    }

    /// A fresh SQLite file in a temporary directory, deleted when the last
    /// clone is dropped. For tests and examples.
    pub async fn temporary() -> Result<Self> {
        let dir = tempfile::tempdir().map_err(|e| Error::Database {
            participant: "database",
            source: sqlx::Error::Io(e),
        })?;
        let mut db =
            Self::sqlite_file(&dir.path().join("participant.db"), Durability::Normal).await?;
        db._temp = Some(Arc::new(dir));
        Ok(db)
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The URL it was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The durability it was opened with (SQLite's `synchronous`).
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// The pool (for reads and a service's own queries).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// On SQLite, waits for this process's turn to write and returns the
    /// guard to hold until commit; `None` on PostgreSQL (row locks suffice).
    ///
    /// SQLite has one writer per file anyway; queueing this process's
    /// writers here, instead of letting them spin in SQLite's busy handler,
    /// keeps latency low under load. Other processes still meet the busy
    /// timeout.
    pub async fn write_turn(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        match self.backend {
            Backend::Sqlite => Some(self.writer.clone().lock_owned().await),
            Backend::Postgres => None,
        }
    }

    /// Begins a write transaction: `BEGIN IMMEDIATE` on SQLite (the write
    /// lock is taken at once, so a transaction that reads and then writes
    /// never fails with a stale snapshot), `BEGIN` on PostgreSQL.
    pub async fn begin(&self) -> Result<Transaction<'static, Any>> {
        let statement = match self.backend {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "BEGIN",
        };
        self.pool
            .begin_with(statement)
            .await
            .map_err(Error::db("database"))
    }
}

/// One versioned migration of a participant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// Its version (applied in ascending order).
    pub version: i64,
    /// A short name.
    pub name: &'static str,
    /// The SQL (portable: runs on SQLite and PostgreSQL).
    pub sql: &'static str,
}

/// The table every participant keeps its idempotency keys in (created by
/// each participant's first migration if missing).
const SHARED: &str = include_str!("../migrations/0000_shared.sql");

/// A stable 64-bit FNV-1a hash of some text, as 16 hex digits.
pub(crate) fn fnv1a_hex(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Applies `participant`'s migrations not yet applied, in one transaction;
/// returns how many it applied. A migration changed after it was applied is
/// an error, not silently skipped.
pub(crate) async fn migrate(
    db: &Database,
    participant: &'static str,
    migrations: &[Migration],
) -> Result<usize> {
    let err = Error::db(participant);
    let mut tx = db.begin().await?;
    if db.backend() == Backend::Postgres {
        // Participants sharing one database migrate one at a time.
        tx.execute("SELECT pg_advisory_xact_lock(7260937718)")
            .await
            .map_err(Error::db(participant))?;
    }
    tx.execute(SHARED).await.map_err(Error::db(participant))?;
    let applied: Vec<(i64, String)> = sqlx::query(
        "SELECT version, checksum FROM o2c_migrations WHERE participant = $1 ORDER BY version",
    )
    .bind(participant)
    .fetch_all(&mut *tx)
    .await
    .map_err(Error::db(participant))?
    .into_iter()
    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
    .collect::<std::result::Result<_, sqlx::Error>>()
    .map_err(Error::db(participant))?;
    let mut count = 0;
    for m in migrations {
        let sum = fnv1a_hex(m.sql);
        if let Some((_, stored)) = applied.iter().find(|(v, _)| *v == m.version) {
            if *stored != sum {
                return Err(Error::Corrupt {
                    participant,
                    reason: format!(
                        "migration {} ({}) was changed after it was applied",
                        m.version, m.name
                    ),
                });
            }
            continue;
        }
        tx.execute(m.sql).await.map_err(Error::db(participant))?;
        sqlx::query(
            "INSERT INTO o2c_migrations (participant, version, name, checksum) VALUES ($1, $2, $3, $4)",
        )
        .bind(participant)
        .bind(m.version)
        .bind(m.name)
        .bind(&sum)
        .execute(&mut *tx)
        .await
        .map_err(Error::db(participant))?;
        count += 1;
    }
    tx.commit().await.map_err(err)?;
    Ok(count)
}

/// An idempotency key: the same key always gets the same reply and has at
/// most one effect. The saga orchestrator derives one per (saga, step,
/// action) with [`IdempotencyKey::for_step`].
///
/// ```
/// use vextrus_order_to_cash::IdempotencyKey;
///
/// let key = IdempotencyKey::for_step("saga-7", "reserve_inventory", "action");
/// assert_eq!(key.as_str(), "saga-7/reserve_inventory/action");
/// assert!(IdempotencyKey::new("").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The longest key accepted, in bytes.
    pub const MAX_LEN: usize = 255;

    /// Validates a key: 1 to 255 bytes, no control characters.
    pub fn new(key: impl Into<String>) -> Result<Self> {
        let key = key.into();
        if key.is_empty() {
            return Err(Error::invalid("idempotency key", "empty"));
        }
        if key.len() > Self::MAX_LEN {
            return Err(Error::invalid(
                "idempotency key",
                format!("{} bytes, at most {} allowed", key.len(), Self::MAX_LEN),
            ));
        }
        if key.chars().any(char::is_control) {
            return Err(Error::invalid(
                "idempotency key",
                "holds a control character",
            ));
        }
        Ok(Self(key))
    }

    /// The key of one action (or compensation) of one saga step:
    /// `"{saga}/{step}/{action}"`. Parts are cut so the key stays valid.
    pub fn for_step(saga: &str, step: &str, action: &str) -> Self {
        let mut key = format!("{saga}/{step}/{action}");
        key.retain(|c| !c.is_control());
        if key.is_empty() {
            key.push('-');
        }
        while key.len() > Self::MAX_LEN {
            key.pop();
        }
        Self(key)
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for IdempotencyKey {
    type Error = Error;
    fn try_from(value: String) -> Result<Self> {
        Self::new(value)
    }
}

impl From<IdempotencyKey> for String {
    fn from(value: IdempotencyKey) -> Self {
        value.0
    }
}

/// Claims `key` for a request with this fingerprint inside `conn`'s
/// transaction. `None`: the key is new and now held by this transaction
/// (its reply must be stored with [`store_reply`] before commit). `Some`:
/// the key was used before for the same request; its stored reply.
///
/// The claim is an atomic `INSERT ... ON CONFLICT DO NOTHING`, so two
/// concurrent requests with one key never both run: on PostgreSQL the second
/// insert waits for the first transaction and then sees its row; on SQLite
/// writers are serialized by `BEGIN IMMEDIATE`.
pub(crate) async fn claim<C, R>(
    conn: &mut AnyConnection,
    participant: &'static str,
    key: &IdempotencyKey,
    command: &C,
) -> Result<Option<R>>
where
    C: Serialize,
    R: DeserializeOwned,
{
    let body = serde_json::to_string(command).map_err(|e| Error::Corrupt {
        participant,
        reason: format!("command not serializable: {e}"),
    })?;
    let fingerprint = fnv1a_hex(&body);
    let inserted = sqlx::query(
        "INSERT INTO o2c_idempotency (participant, idem_key, fingerprint, reply) VALUES ($1, $2, $3, NULL)
         ON CONFLICT (participant, idem_key) DO NOTHING",
    )
    .bind(participant)
    .bind(key.as_str())
    .bind(&fingerprint)
    .execute(&mut *conn)
    .await
    .map_err(Error::db(participant))?
    .rows_affected();
    if inserted == 1 {
        return Ok(None);
    }
    let row = sqlx::query(
        "SELECT fingerprint, reply FROM o2c_idempotency WHERE participant = $1 AND idem_key = $2",
    )
    .bind(participant)
    .bind(key.as_str())
    .fetch_one(&mut *conn)
    .await
    .map_err(Error::db(participant))?;
    let stored: String = row.try_get(0).map_err(Error::db(participant))?;
    if stored == FENCED {
        return Err(Error::Fenced {
            participant,
            key: key.as_str().to_owned(),
        });
    }
    if stored != fingerprint {
        return Err(Error::KeyReused {
            participant,
            key: key.as_str().to_owned(),
        });
    }
    let reply: Option<String> = row.try_get(1).map_err(Error::db(participant))?;
    let reply = reply.ok_or_else(|| Error::Corrupt {
        participant,
        reason: format!("key {key} is committed without a reply"),
    })?;
    serde_json::from_str(&reply)
        .map(Some)
        .map_err(|e| Error::Corrupt {
            participant,
            reason: format!("stored reply for {key} does not decode: {e}"),
        })
}

/// The fingerprint of an action key that its step's compensation claimed
/// first ([`fence`]); no command's fingerprint (16 hex digits) equals it.
pub(crate) const FENCED: &str = "fenced-by-compensation";

/// Claims `action_key` for the compensation running in this transaction,
/// unless the action claimed it first: `true` if the action is now fenced
/// (it had not run, and [`claim`] refuses it from now on with
/// [`Error::Fenced`]), `false` if it ran (or was fenced before).
///
/// Runs before the compensation's effect. On PostgreSQL the insert waits for
/// a concurrent, uncommitted claim of the same key; if that action commits,
/// the compensation's later statements see its effect and undo it, and if
/// this fence commits first, the action's claim finds it.
pub(crate) async fn fence(
    conn: &mut AnyConnection,
    participant: &'static str,
    action_key: &str,
) -> Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO o2c_idempotency (participant, idem_key, fingerprint, reply) VALUES ($1, $2, $3, NULL)
         ON CONFLICT (participant, idem_key) DO NOTHING",
    )
    .bind(participant)
    .bind(action_key)
    .bind(FENCED)
    .execute(&mut *conn)
    .await
    .map_err(Error::db(participant))?
    .rows_affected();
    Ok(inserted == 1)
}

/// Stores the reply of the command that claimed `key` (same transaction).
pub(crate) async fn store_reply<R: Serialize>(
    conn: &mut AnyConnection,
    participant: &'static str,
    key: &IdempotencyKey,
    reply: &R,
) -> Result<()> {
    let body = serde_json::to_string(reply).map_err(|e| Error::Corrupt {
        participant,
        reason: format!("reply not serializable: {e}"),
    })?;
    sqlx::query("UPDATE o2c_idempotency SET reply = $1 WHERE participant = $2 AND idem_key = $3")
        .bind(body)
        .bind(participant)
        .bind(key.as_str())
        .execute(&mut *conn)
        .await
        .map_err(Error::db(participant))?;
    Ok(())
}

/// How many idempotency keys `participant` holds (for tests and reports);
/// fences ([`fence`]) are not counted: no command ran under them.
pub(crate) async fn key_count(db: &Database, participant: &'static str) -> Result<i64> {
    sqlx::query(
        "SELECT CAST(COUNT(*) AS BIGINT) FROM o2c_idempotency WHERE participant = $1 AND fingerprint <> $2",
    )
    .bind(participant)
    .bind(FENCED)
        .fetch_one(db.pool())
        .await
        .and_then(|r| r.try_get(0))
        .map_err(Error::db(participant))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated_and_step_keys_stay_valid() {
        assert!(IdempotencyKey::new("a\nb").is_err());
        assert!(IdempotencyKey::new("x".repeat(256)).is_err());
        let long = IdempotencyKey::for_step(&"s".repeat(300), "step", "action");
        assert_eq!(long.as_str().len(), IdempotencyKey::MAX_LEN);
        let json = serde_json::to_string(&IdempotencyKey::new("k-1").unwrap()).unwrap();
        assert_eq!(json, "\"k-1\"");
        assert!(serde_json::from_str::<IdempotencyKey>("\"\"").is_err());
    }

    #[test]
    fn fingerprints_are_stable() {
        assert_eq!(fnv1a_hex("a"), fnv1a_hex("a"));
        assert_ne!(fnv1a_hex("a"), fnv1a_hex("b"));
        assert_eq!(fnv1a_hex("").len(), 16);
    }
}
