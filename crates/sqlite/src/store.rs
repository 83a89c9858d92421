//! [`SqliteEventStore`]: every event-store trait on SQLite.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool, Transaction};
use tokio::sync::watch;
use vextrus_core::{
    AppendResult, CheckpointStore, DEFAULT_MAX_PAYLOAD_BYTES, EventAppender, EventFilter,
    EventReader, EventStoreError, EventStream, ExpectedVersion, GlobalPage, GlobalPosition,
    NewEvent, ProjectionBackend, ReadDirection, ReadStreamOptions, RecordedEvent, Result, Snapshot,
    SnapshotStore, StreamFilter, StreamId, SubscriptionSource, WakeUps, validate_batch,
};
use vextrus_kernel::EventMetadata;

/// Rows fetched per query when a stream is read.
const READ_PAGE: i64 = 1_000;
/// Rows per multi-row `INSERT` (8 parameters each, well under SQLite's limit).
const INSERT_CHUNK: usize = 1_000;
const EVENT_COLUMNS: &str = "stream_id, stream_version, position, event_type, schema_version, payload, metadata, recorded_at";

/// Maps a driver error to the store's error: busy/locked databases, I/O and
/// pool failures are [`EventStoreError::Unavailable`] (retryable), the rest
/// [`EventStoreError::Backend`]. Unique violations are turned into typed
/// conflicts where they can occur (in appends), never matched on text.
pub(crate) fn map_sqlx(err: sqlx::Error) -> EventStoreError {
    match &err {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => EventStoreError::unavailable(err),
        sqlx::Error::Database(db) => {
            // Primary result codes: 5 SQLITE_BUSY, 6 SQLITE_LOCKED, 10 SQLITE_IOERR,
            // 13 SQLITE_FULL, 14 SQLITE_CANTOPEN (extended codes keep them in the low byte).
            let primary = db
                .code()
                .and_then(|c| c.parse::<i32>().ok())
                .map(|c| c & 0xff);
            if matches!(primary, Some(5 | 6 | 10 | 13 | 14)) {
                EventStoreError::unavailable(err)
            } else {
                EventStoreError::backend(err)
            }
        }
        _ => EventStoreError::backend(err),
    }
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v)
        .map_err(|_| EventStoreError::backend(format!("{what} {v} does not fit SQLite's INTEGER")))
}

fn to_u64(v: i64) -> u64 {
    // Versions and positions are written from u64s that fit i64 and checked >= 1.
    u64::try_from(v).unwrap_or_default()
}

/// The SQLite event store.
///
/// Writes run in `BEGIN IMMEDIATE` transactions: SQLite has one writer at a
/// time, so the write lock taken at `BEGIN` makes an append's version check
/// and insert atomic (no lost update between reading the stream's version
/// and writing), and positions are handed out in commit order, which makes
/// the global log gap-free for readers: what a reader sees is always a
/// prefix of the log, so checkpointing the last position read never skips a
/// row that commits later. Waiting writers block up to the busy timeout
/// (5 s by default), then get [`EventStoreError::Unavailable`]. WAL mode
/// lets readers run alongside the writer.
///
/// Subscribers in this process are woken after each append through this
/// store (or a clone); appends by other processes are seen by polling.
///
/// ```
/// use futures::TryStreamExt;
/// use serde_json::json;
/// use vextrus_core::{EventAppender, EventReader, ExpectedVersion, NewEvent, ReadStreamOptions, StreamId};
/// use vextrus_kernel::EventMetadata;
/// use vextrus_sqlite::SqliteEventStore;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let store = SqliteEventStore::temporary().await.unwrap();
/// let s = StreamId::new("order-1").unwrap();
/// let e = NewEvent::new("order.placed", json!({"total": "10.00"}), EventMetadata::new());
/// let r = store.append_to_stream(&s, ExpectedVersion::NoStream, &[e]).await.unwrap();
/// assert_eq!(r.last_version, 1);
/// let read: Vec<_> = store.read_stream(&s, ReadStreamOptions::forwards()).try_collect().await.unwrap();
/// assert_eq!(read[0].payload, json!({"total": "10.00"}));
///
/// // The unit of work: append inside a transaction the caller owns.
/// let mut tx = store.begin().await.unwrap();
/// let e2 = NewEvent::new("order.paid", json!({}), EventMetadata::new());
/// store.append_in_tx(&mut tx, &s, ExpectedVersion::Exact(1), &[e2]).await.unwrap();
/// tx.commit().await.unwrap();
/// assert_eq!(store.stream_version(&s).await.unwrap(), Some(2));
/// # });
/// ```
#[derive(Clone)]
pub struct SqliteEventStore {
    pool: SqlitePool,
    max_payload: usize,
    commits: Arc<watch::Sender<u64>>,
    _temp: Option<Arc<tempfile::TempDir>>,
}

impl std::fmt::Debug for SqliteEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteEventStore")
            .field("max_payload", &self.max_payload)
            .field("pool_size", &self.pool.size())
            .finish()
    }
}

impl SqliteEventStore {
    /// The busy timeout writers wait for the write lock before giving up.
    pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

    /// Connects to a database URL such as `sqlite:events.db?mode=rwc`, in WAL
    /// mode with `synchronous=FULL` (every commit is durable) and a 5 s busy
    /// timeout. Does not migrate: call [`SqliteEventStore::migrate`].
    ///
    /// A file that cannot be opened gives [`EventStoreError::Unavailable`].
    pub async fn connect(url: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| EventStoreError::InvalidEvent(format!("invalid SQLite URL: {e}")))?;
        Self::connect_with(Self::tune(options), 8).await
    }

    /// The options [`SqliteEventStore::connect`] adds to a URL's: WAL,
    /// `synchronous=FULL`, the busy timeout and foreign keys.
    pub fn tune(options: SqliteConnectOptions) -> SqliteConnectOptions {
        options
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Self::DEFAULT_BUSY_TIMEOUT)
            .foreign_keys(true)
    }

    /// Connects with explicit options and pool size (for other durability
    /// settings, e.g. `synchronous=NORMAL`).
    pub async fn connect_with(options: SqliteConnectOptions, max_connections: u32) -> Result<Self> {
        // No ping before each acquire (sqlx's default): a SQLite
        // connection is a file handle in this process that does not break
        // while idle, and the ping is a round trip to its worker thread.
        let pool = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(max_connections.max(2))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(map_sqlx)?;
        Ok(Self::from_pool(pool))
    }

    /// Wraps an existing pool (its connections should be in WAL mode with a
    /// busy timeout).
    pub fn from_pool(pool: SqlitePool) -> Self {
        let (tx, _) = watch::channel(0);
        Self {
            pool,
            max_payload: DEFAULT_MAX_PAYLOAD_BYTES,
            commits: Arc::new(tx),
            _temp: None,
        }
    }

    /// A migrated store in a fresh file inside a temporary directory, deleted
    /// when the last clone of the store is dropped. For tests and examples.
    pub async fn temporary() -> Result<Self> {
        let dir = tempfile::tempdir().map_err(EventStoreError::unavailable)?;
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("events.db"))
            .create_if_missing(true);
        let mut store = Self::connect_with(Self::tune(options), 8).await?;
        store._temp = Some(Arc::new(dir));
        store.migrate().await?;
        Ok(store)
    }

    /// Sets the largest payload accepted, in bytes of JSON text.
    pub fn with_max_payload_bytes(mut self, max: usize) -> Self {
        self.max_payload = max;
        self
    }

    /// The largest payload accepted, in bytes of JSON text.
    pub fn max_payload_bytes(&self) -> usize {
        self.max_payload
    }

    /// The connection pool (for a service's own queries).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Applies the versioned migrations not yet applied (see
    /// [`crate::migrate`]); returns how many it applied. Running it again is
    /// harmless.
    pub async fn migrate(&self) -> Result<usize> {
        crate::migrate::run(&self.pool).await
    }

    /// Begins a write transaction (`BEGIN IMMEDIATE`) for a unit of work:
    /// append with [`SqliteEventStore::append_in_tx`], write snapshots,
    /// checkpoints and the service's own rows, then commit.
    pub async fn begin(&self) -> Result<Transaction<'static, Sqlite>> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_sqlx)
    }

    /// Appends inside a transaction the caller owns (same contract as
    /// [`EventAppender::append_to_stream`]). Nothing is visible until the
    /// caller commits; dropping the transaction discards the append. Begin it
    /// with [`SqliteEventStore::begin`] (`BEGIN IMMEDIATE`): in a deferred
    /// transaction that read before another writer committed, SQLite refuses
    /// the write with `SQLITE_BUSY_SNAPSHOT` ([`EventStoreError::Unavailable`]).
    ///
    /// In-process subscribers are not woken by it; call
    /// [`SqliteEventStore::notify_committed`] after commit to wake them at once.
    pub async fn append_in_tx(
        &self,
        conn: &mut SqliteConnection,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendResult> {
        append_on(conn, self.max_payload, stream_id, expected, events).await
    }

    /// Wakes this process's subscribers (after a commit of
    /// [`SqliteEventStore::append_in_tx`]).
    pub fn notify_committed(&self) {
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Stores a snapshot inside the caller's transaction.
    pub async fn save_snapshot_in_tx(
        &self,
        conn: &mut SqliteConnection,
        snapshot: &Snapshot,
    ) -> Result<()> {
        let state = serde_json::to_string(&snapshot.state)?;
        sqlx::query(
            "INSERT INTO snapshots (stream_id, stream_version, snapshot_version, state)
             VALUES (?, ?, ?, ?)
             ON CONFLICT (stream_id) DO UPDATE SET
                 stream_version = excluded.stream_version,
                 snapshot_version = excluded.snapshot_version,
                 state = excluded.state,
                 taken_at = excluded.taken_at",
        )
        .bind(snapshot.stream_id.as_str())
        .bind(to_i64(snapshot.stream_version, "stream version")?)
        .bind(i64::from(snapshot.snapshot_version))
        .bind(state)
        .execute(conn)
        .await
        .map_err(map_sqlx)?;
        Ok(())
    }

    /// Stores (`Some`) or deletes (`None`) a checkpoint inside the caller's transaction.
    pub async fn save_checkpoint_in_tx(
        &self,
        conn: &mut SqliteConnection,
        name: &str,
        position: Option<GlobalPosition>,
    ) -> Result<()> {
        match position {
            Some(p) => {
                sqlx::query(
                    "INSERT INTO checkpoints (name, commit_key, position) VALUES (?, ?, ?)
                     ON CONFLICT (name) DO UPDATE SET
                         commit_key = excluded.commit_key,
                         position = excluded.position,
                         updated_at = excluded.updated_at",
                )
                .bind(name)
                .bind(to_i64(p.commit, "checkpoint")?)
                .bind(to_i64(p.position, "checkpoint")?)
                .execute(conn)
                .await
                .map_err(map_sqlx)?;
            }
            None => {
                sqlx::query("DELETE FROM checkpoints WHERE name = ?")
                    .bind(name)
                    .execute(conn)
                    .await
                    .map_err(map_sqlx)?;
            }
        }
        Ok(())
    }

    async fn load_checkpoint_on(
        conn: &mut SqliteConnection,
        name: &str,
    ) -> Result<Option<GlobalPosition>> {
        let row = sqlx::query("SELECT commit_key, position FROM checkpoints WHERE name = ?")
            .bind(name)
            .fetch_optional(conn)
            .await
            .map_err(map_sqlx)?;
        row.map(|r| {
            Ok(GlobalPosition::new(
                to_u64(r.try_get(0).map_err(map_sqlx)?),
                to_u64(r.try_get(1).map_err(map_sqlx)?),
            ))
        })
        .transpose()
    }

    async fn read_stream_page(
        &self,
        stream_id: &StreamId,
        direction: ReadDirection,
        from: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>> {
        let sql = match direction {
            ReadDirection::Forwards => format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = ? AND stream_version >= ? ORDER BY stream_version ASC LIMIT ?"
            ),
            ReadDirection::Backwards => format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = ? AND stream_version <= ? ORDER BY stream_version DESC LIMIT ?"
            ),
        };
        sqlx::query(&sql)
            .bind(stream_id.as_str())
            .bind(from)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx)?
            .iter()
            .map(decode_event)
            .collect()
    }
}

fn decode_event(row: &SqliteRow) -> Result<RecordedEvent> {
    let get_s = |i: usize| row.try_get::<String, _>(i).map_err(map_sqlx);
    let get_i = |i: usize| row.try_get::<i64, _>(i).map_err(map_sqlx);
    let stream_id = StreamId::new(get_s(0)?)
        .map_err(|e| EventStoreError::backend(format!("stored stream id is invalid: {e}")))?;
    let position = to_u64(get_i(2)?);
    let metadata: EventMetadata = serde_json::from_str(&get_s(6)?)?;
    let recorded_at = DateTime::parse_from_rfc3339(&get_s(7)?)
        .map_err(|e| EventStoreError::backend(format!("stored recorded_at is invalid: {e}")))?
        .with_timezone(&Utc);
    Ok(RecordedEvent {
        stream_id,
        stream_version: to_u64(get_i(1)?),
        position: GlobalPosition::new(position, position),
        event_type: get_s(3)?,
        schema_version: u32::try_from(get_i(4)?).unwrap_or(u32::MAX),
        payload: serde_json::from_str(&get_s(5)?)?,
        metadata,
        recorded_at,
    })
}

fn push_filter(qb: &mut QueryBuilder<'_, Sqlite>, filter: &EventFilter) {
    match &filter.streams {
        StreamFilter::All => {}
        StreamFilter::Category(c) => {
            qb.push(" AND category = ").push_bind(c.clone());
        }
        StreamFilter::Prefix(p) => {
            let chars = i64::try_from(p.chars().count()).unwrap_or(i64::MAX);
            qb.push(" AND substr(stream_id, 1, ")
                .push_bind(chars)
                .push(") = ")
                .push_bind(p.clone());
        }
    }
    if !filter.event_types.is_empty() {
        let types = serde_json::Value::from(filter.event_types.clone()).to_string();
        qb.push(" AND event_type IN (SELECT value FROM json_each(")
            .push_bind(types)
            .push("))");
    }
}

/// The append itself, on a connection inside a write transaction: one
/// statement reads the stream's version and which of the batch's ids are
/// already stored, one multi-row `INSERT` per 1,000 events writes.
async fn append_on(
    conn: &mut SqliteConnection,
    max_payload: usize,
    stream_id: &StreamId,
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<AppendResult> {
    validate_batch(events, max_payload)?;
    let ids: Vec<String> = events.iter().map(|e| e.event_id.to_string()).collect();
    let row = sqlx::query(
        "SELECT (SELECT MAX(stream_version) FROM events WHERE stream_id = ?1),
                (SELECT json_group_array(json_array(event_id, stream_id, stream_version, position))
                   FROM events WHERE event_id IN (SELECT value FROM json_each(?2)))",
    )
    .bind(stream_id.as_str())
    .bind(serde_json::Value::from(ids.clone()).to_string())
    .fetch_one(&mut *conn)
    .await
    .map_err(map_sqlx)?;
    let current: Option<i64> = row.try_get(0).map_err(map_sqlx)?;
    let current = current.map(to_u64);
    let stored: String = row.try_get(1).map_err(map_sqlx)?;
    let stored: Vec<(String, String, i64, i64)> = serde_json::from_str(&stored)?;
    if !stored.is_empty() {
        return reappend(stream_id, expected, current, events, &ids, &stored);
    }
    if !expected.matches(current) {
        return Err(EventStoreError::WrongExpectedVersion {
            stream_id: stream_id.clone(),
            expected,
            actual: current,
        });
    }

    let base = current.unwrap_or(0);
    let category = stream_id.category();
    let mut first_position = None;
    let mut last_position = 0;
    for (chunk_no, chunk) in events.chunks(INSERT_CHUNK).enumerate() {
        let mut rows = Vec::with_capacity(chunk.len());
        for (i, e) in chunk.iter().enumerate() {
            let version = base + (chunk_no * INSERT_CHUNK + i) as u64 + 1;
            rows.push((
                to_i64(version, "version")?,
                serde_json::to_string(&e.payload)?,
                serde_json::to_string(&e.metadata)?,
                e,
            ));
        }
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO events (stream_id, category, stream_version, event_id, event_type, schema_version, payload, metadata) ",
        );
        let ids = &ids[chunk_no * INSERT_CHUNK..];
        qb.push_values(
            rows.into_iter().zip(ids),
            |mut b, ((version, payload, metadata, e), id)| {
                b.push_bind(stream_id.as_str())
                    .push_bind(category)
                    .push_bind(version)
                    .push_bind(id.as_str())
                    .push_bind(e.event_type.as_str())
                    .push_bind(i64::from(e.schema_version))
                    .push_bind(payload)
                    .push_bind(metadata);
            },
        );
        match qb.build().execute(&mut *conn).await {
            Ok(done) => {
                // Under the write lock, one multi-row INSERT into an
                // AUTOINCREMENT table takes consecutive positions.
                last_position = to_u64(done.last_insert_rowid());
                first_position.get_or_insert(last_position + 1 - chunk.len() as u64);
            }
            Err(e) if is_unique_violation(&e) => {
                // Only reachable when the caller's transaction lost a race it
                // could not see; report it as the typed conflict it is.
                let actual: Option<i64> = sqlx::query_scalar(
                    "SELECT MAX(stream_version) FROM events WHERE stream_id = ?",
                )
                .bind(stream_id.as_str())
                .fetch_one(&mut *conn)
                .await
                .map_err(map_sqlx)?;
                return Err(EventStoreError::WrongExpectedVersion {
                    stream_id: stream_id.clone(),
                    expected,
                    actual: actual.map(to_u64),
                });
            }
            Err(e) => return Err(map_sqlx(e)),
        }
    }
    let p0 = first_position.unwrap_or(last_position);
    Ok(AppendResult {
        first_version: base + 1,
        last_version: base + events.len() as u64,
        first_position: GlobalPosition::new(p0, p0),
        last_position: GlobalPosition::new(last_position, last_position),
    })
}

/// Some of the batch's ids are stored (`stored`: id, stream, version,
/// position): an idempotent re-append if the whole batch is stored at
/// consecutive versions of this stream, else a typed error.
fn reappend(
    stream_id: &StreamId,
    expected: ExpectedVersion,
    current: Option<u64>,
    events: &[NewEvent],
    ids: &[String],
    stored: &[(String, String, i64, i64)],
) -> Result<AppendResult> {
    let find = |id: &str| stored.iter().find(|(sid, ..)| sid == id);
    let partial = |i: usize| EventStoreError::PartialDuplicate {
        stream_id: stream_id.clone(),
        event_id: events[i].event_id,
    };
    let Some((_, first_stream, v0, p0)) = find(&ids[0]) else {
        let i = ids.iter().position(|id| find(id).is_some()).unwrap_or(0);
        return Err(partial(i));
    };
    if first_stream != stream_id.as_str() {
        return Err(partial(0));
    }
    let v0 = to_u64(*v0);
    if let Some(n) = expected.exact()
        && v0 != n + 1
    {
        return Err(EventStoreError::WrongExpectedVersion {
            stream_id: stream_id.clone(),
            expected,
            actual: current,
        });
    }
    let mut last = to_u64(*p0);
    for (i, id) in ids.iter().enumerate() {
        match find(id) {
            Some((_, s, v, p)) if s == stream_id.as_str() && to_u64(*v) == v0 + i as u64 => {
                last = to_u64(*p);
            }
            _ => return Err(partial(i)),
        }
    }
    let p0 = to_u64(*p0);
    Ok(AppendResult {
        first_version: v0,
        last_version: v0 + events.len() as u64 - 1,
        first_position: GlobalPosition::new(p0, p0),
        last_position: GlobalPosition::new(last, last),
    })
}

impl EventAppender for SqliteEventStore {
    async fn append_to_stream(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendResult> {
        let span = vextrus_telemetry::spans::event_append(stream_id, events.len());
        let started = std::time::Instant::now();
        let result = async {
            // Validate before taking the write lock.
            validate_batch(events, self.max_payload)?;
            let mut tx = self.begin().await?;
            let result = append_on(&mut tx, self.max_payload, stream_id, expected, events).await?;
            tx.commit().await.map_err(map_sqlx)?;
            self.notify_committed();
            Ok(result)
        }
        .instrument(span)
        .await;
        vextrus_telemetry::record::event_append(
            events.len() as u64,
            started.elapsed(),
            vextrus_telemetry::Outcome::of(&result),
        );
        result
    }
}

impl EventReader for SqliteEventStore {
    fn read_stream<'a>(
        &'a self,
        stream_id: &'a StreamId,
        options: ReadStreamOptions,
    ) -> EventStream<'a> {
        struct Cursor {
            next: i64,
            remaining: u64,
            done: bool,
        }
        let start = match (options.direction, options.from_version) {
            (ReadDirection::Forwards, v) => v.map_or(1, |v| i64::try_from(v).unwrap_or(i64::MAX)),
            (ReadDirection::Backwards, v) => {
                v.map_or(i64::MAX, |v| i64::try_from(v).unwrap_or(i64::MAX))
            }
        };
        let cursor = Cursor {
            next: start,
            remaining: options.limit.unwrap_or(u64::MAX),
            done: false,
        };
        futures::stream::try_unfold(cursor, move |mut c| async move {
            if c.done || c.remaining == 0 {
                return Ok::<_, EventStoreError>(None);
            }
            let page = READ_PAGE.min(i64::try_from(c.remaining).unwrap_or(i64::MAX));
            let events = self
                .read_stream_page(stream_id, options.direction, c.next, page)
                .await?;
            c.remaining = c.remaining.saturating_sub(events.len() as u64);
            c.done = (events.len() as i64) < page;
            if let Some(last) = events.last() {
                let v = i64::try_from(last.stream_version).unwrap_or(i64::MAX);
                c.next = match options.direction {
                    ReadDirection::Forwards => v.saturating_add(1),
                    ReadDirection::Backwards => v - 1,
                };
            }
            if events.is_empty() {
                return Ok(None);
            }
            Ok(Some((futures::stream::iter(events.into_iter().map(Ok)), c)))
        })
        .try_flatten()
        .boxed()
    }

    async fn read_all(
        &self,
        from: GlobalPosition,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<GlobalPage> {
        let from_pos = to_i64(from.position, "position")?;
        let limit_i = i64::try_from(limit).unwrap_or(i64::MAX);
        // One read transaction: the page and the log's end come from one snapshot.
        let mut tx = self.pool.begin().await.map_err(map_sqlx)?;
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE position > "
        ));
        qb.push_bind(from_pos);
        push_filter(&mut qb, filter);
        qb.push(" ORDER BY position ASC LIMIT ").push_bind(limit_i);
        let events = qb
            .build()
            .fetch_all(&mut *tx)
            .await
            .map_err(map_sqlx)?
            .iter()
            .map(decode_event)
            .collect::<Result<Vec<_>>>()?;
        let scanned_to = if events.len() < limit {
            // Every committed row is in this snapshot and commit order is
            // position order, so the whole log up to its end has been seen.
            let end: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM events")
                .fetch_one(&mut *tx)
                .await
                .map_err(map_sqlx)?;
            let end = to_u64(end);
            from.max(GlobalPosition::new(end, end))
        } else {
            events.last().map_or(from, |e| e.position)
        };
        tx.rollback().await.map_err(map_sqlx)?;
        Ok(GlobalPage { events, scanned_to })
    }

    async fn stream_version(&self, stream_id: &StreamId) -> Result<Option<u64>> {
        let v: Option<i64> =
            sqlx::query_scalar("SELECT MAX(stream_version) FROM events WHERE stream_id = ?")
                .bind(stream_id.as_str())
                .fetch_one(&self.pool)
                .await
                .map_err(map_sqlx)?;
        Ok(v.map(to_u64))
    }

    async fn count_after(&self, from: GlobalPosition, filter: &EventFilter) -> Result<u64> {
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT COUNT(*) FROM events WHERE position > ");
        qb.push_bind(to_i64(from.position, "position")?);
        push_filter(&mut qb, filter);
        let n: i64 = qb
            .build_query_scalar()
            .fetch_one(&self.pool)
            .await
            .map_err(map_sqlx)?;
        Ok(to_u64(n))
    }
}

impl SnapshotStore for SqliteEventStore {
    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        let mut conn = self.pool.acquire().await.map_err(map_sqlx)?;
        self.save_snapshot_in_tx(&mut conn, snapshot).await
    }

    async fn load_snapshot(&self, stream_id: &StreamId) -> Result<Option<Snapshot>> {
        let row = sqlx::query(
            "SELECT stream_version, snapshot_version, state FROM snapshots WHERE stream_id = ?",
        )
        .bind(stream_id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_sqlx)?;
        let Some(row) = row else { return Ok(None) };
        let state: String = row.try_get(2).map_err(map_sqlx)?;
        Ok(Some(Snapshot {
            stream_id: stream_id.clone(),
            stream_version: to_u64(row.try_get(0).map_err(map_sqlx)?),
            snapshot_version: u32::try_from(row.try_get::<i64, _>(1).map_err(map_sqlx)?)
                .unwrap_or(u32::MAX),
            state: serde_json::from_str(&state)?,
        }))
    }
}

impl CheckpointStore for SqliteEventStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<GlobalPosition>> {
        let mut conn = self.pool.acquire().await.map_err(map_sqlx)?;
        Self::load_checkpoint_on(&mut conn, name).await
    }

    async fn save_checkpoint(&self, name: &str, position: GlobalPosition) -> Result<()> {
        let mut conn = self.pool.acquire().await.map_err(map_sqlx)?;
        self.save_checkpoint_in_tx(&mut conn, name, Some(position))
            .await
    }

    async fn delete_checkpoint(&self, name: &str) -> Result<()> {
        let mut conn = self.pool.acquire().await.map_err(map_sqlx)?;
        self.save_checkpoint_in_tx(&mut conn, name, None).await
    }
}

impl SubscriptionSource for SqliteEventStore {
    async fn wake_ups(&self) -> Result<WakeUps> {
        Ok(WakeUps::from_watch(self.commits.subscribe()))
    }
}

impl ProjectionBackend for SqliteEventStore {
    /// A `BEGIN IMMEDIATE` transaction: the handler writes its read model
    /// with plain SQL through it (`.execute(&mut **tx)`).
    type Transaction = Transaction<'static, Sqlite>;

    async fn begin_projection(
        &self,
        name: &str,
    ) -> Result<(Self::Transaction, Option<GlobalPosition>)> {
        // The write lock taken at BEGIN IMMEDIATE also serializes two runners
        // of one projection.
        let mut tx = self.begin().await?;
        let checkpoint = Self::load_checkpoint_on(&mut tx, name).await?;
        Ok((tx, checkpoint))
    }

    async fn commit_projection(
        &self,
        mut tx: Self::Transaction,
        name: &str,
        checkpoint: Option<GlobalPosition>,
    ) -> Result<()> {
        self.save_checkpoint_in_tx(&mut tx, name, checkpoint)
            .await?;
        tx.commit().await.map_err(map_sqlx)
    }
}

/// Compile-time guard: the store's futures stay `Send`, so they can be
/// spawned on a multi-threaded runtime (sqlx executors in some positions
/// break this through a higher-ranked lifetime error).
#[cfg(test)]
mod send_checks {
    use super::*;
    fn assert_send<T: Send>(_: T) {}
    #[allow(dead_code)]
    fn futures_are_send(s: SqliteEventStore) {
        assert_send(crate::migrate::run(&s.pool));
        assert_send(SqliteEventStore::connect("x"));
        assert_send(s.begin());
        assert_send(SqliteEventStore::temporary());
    }
}
