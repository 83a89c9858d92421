//! [`PgEventStore`]: appends, stream reads and the gap-free global log.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt, stream};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};
use tokio::sync::watch;
use uuid::Uuid;
use vextrus_core::{
    AppendResult, DEFAULT_MAX_PAYLOAD_BYTES, EventFilter, EventReader, EventStoreError,
    EventStream, ExpectedVersion, GlobalPage, GlobalPosition, NewEvent, ReadDirection,
    ReadStreamOptions, RecordedEvent, Result, StreamFilter, StreamId, validate_batch,
};
use vextrus_kernel::{EventId, EventMetadata};

use crate::error::{EVENT_ID_KEY, map_sqlx, unique_violation};
use crate::notifier::{CoalescingNotifier, pg_notify};

/// The LISTEN/NOTIFY channel appends notify on.
pub const NOTIFY_CHANNEL: &str = "vextrus_events";

/// The shortest interval between two wake-ups that
/// [`NotifyMode::AfterCommit`] (and [`PgEventStore::notify_subscribers`])
/// send: appends committing within it share one `NOTIFY`, which is a
/// transaction of its own.
pub const NOTIFY_COALESCE: Duration = Duration::from_millis(5);

/// How appends wake subscribers that LISTEN on [`NOTIFY_CHANNEL`].
///
/// Subscribers also poll, so every mode is correct; the modes differ in
/// wake-up latency and in what they cost appenders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NotifyMode {
    /// After a pooled append commits, the store sends one `pg_notify` from a
    /// background task; appends that commit while one is in flight share
    /// the next. PostgreSQL serializes the commits of transactions that
    /// notified (they hold a database-wide lock until their commit is
    /// flushed), so notifying inside every append would serialize all
    /// appenders; this keeps appends concurrent and wakes subscribers
    /// within about one commit plus [`NOTIFY_COALESCE`] (the background
    /// task sends at most one wake-up per that interval). Appends through
    /// [`PgEventStore::append_in_tx`] do not notify: call
    /// [`PgEventStore::notify_subscribers`] after committing.
    AfterCommit,
    /// Every append (pooled or in a caller's transaction) notifies inside
    /// its own transaction, so the wake-up is delivered exactly at commit.
    /// Concurrent appenders' commits serialize (see BENCHMARKS.md).
    InTransaction,
    /// No notifications: subscribers poll.
    Off,
}

/// How a [`PgEventStore`] behaves.
///
/// ```
/// use std::time::Duration;
/// use vextrus_postgres::{NotifyMode, PgStoreConfig};
///
/// let config = PgStoreConfig::default()
///     .max_payload_bytes(64 * 1024)
///     .notify(NotifyMode::Off)
///     .idle_in_transaction_timeout(Some(Duration::from_secs(2)))
///     .max_append_transaction(Some(Duration::from_secs(2)));
/// assert_eq!(config.max_payload_bytes, 64 * 1024);
/// assert_eq!(config.notify, NotifyMode::Off);
/// assert_eq!(config.max_append_transaction, Some(Duration::from_secs(2)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgStoreConfig {
    /// The largest payload accepted, in bytes of JSON text (default 1 MiB).
    pub max_payload_bytes: usize,
    /// How appends wake LISTENing subscribers (default
    /// [`NotifyMode::AfterCommit`]).
    pub notify: NotifyMode,
    /// How many events one round trip of a stream read fetches (default 2000).
    pub read_page_size: usize,
    /// The bound on how long a transaction on this store's pool may sit idle
    /// while open (`idle_in_transaction_session_timeout`), set on every
    /// connection [`PgEventStore::connect_with`] opens (default 5 s). Readers
    /// of the global log wait for every transaction older than the events
    /// they read; this bounds how long an abandoned appender (a unit of work
    /// that appended and then stalled) can hold them back: the server ends
    /// its session and rolls it back. `None` leaves the server's setting.
    pub idle_in_transaction_timeout: Option<Duration>,
    /// The bound on an appending transaction (default 5 s): a transaction
    /// that has written to the event log must commit or roll back within
    /// this long of its start (`BEGIN`). Readers of the global log wait for
    /// every transaction older than the events they read; when a reader of
    /// this store finds the log's horizon held by an appending transaction
    /// (one holding a write lock on `vextrus_events`) of this database that
    /// started longer ago than this, it ends that transaction's session
    /// (`pg_terminate_backend`) — on any pool or client, idle or busy — so
    /// it rolls back: nothing it wrote becomes visible, its client gets an
    /// error, and subscribers move on. A subscriber is therefore stalled no
    /// longer than this bound plus one poll. The reading role must be
    /// allowed to signal the holder (the same role, a superuser or a member
    /// of `pg_signal_backend`); otherwise the holder is left alone.
    /// Transactions that hold a transaction id but did not write to the log
    /// are not ended (see the crate docs). `None`: no bound.
    pub max_append_transaction: Option<Duration>,
    /// Pool size used by [`PgEventStore::connect_with`] (default 32).
    pub max_connections: u32,
    /// When a connection of a pool built by [`PgEventStore::connect_with`]
    /// is checked before it is handed out (default 1 s): one that sat idle
    /// in the pool at least this long is pinged first (a round trip; a dead
    /// one is replaced), one used more recently is handed out as it is.
    /// sqlx pings on every acquire by default, which is a quarter of the
    /// round trips of a workload of short transactions (a relay's claims
    /// and settles, a saga's transitions); a connection that fails while in
    /// use is closed by sqlx and never returns to the pool, so only one that
    /// broke while idle for less than this long reaches a caller, as an
    /// ordinary I/O error of its statement. `None`: ping on every acquire.
    pub ping_idle_after: Option<Duration>,
}

impl Default for PgStoreConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            notify: NotifyMode::AfterCommit,
            read_page_size: 2000,
            idle_in_transaction_timeout: Some(Duration::from_secs(5)),
            max_append_transaction: Some(Duration::from_secs(5)),
            max_connections: 32,
            ping_idle_after: Some(Duration::from_secs(1)),
        }
    }
}

impl PgStoreConfig {
    /// Sets the largest accepted payload, in bytes.
    pub fn max_payload_bytes(mut self, max: usize) -> Self {
        self.max_payload_bytes = max;
        self
    }

    /// Sets how appends wake subscribers.
    pub fn notify(mut self, mode: NotifyMode) -> Self {
        self.notify = mode;
        self
    }

    /// Sets the page size of stream reads (at least 1).
    pub fn read_page_size(mut self, size: usize) -> Self {
        self.read_page_size = size.max(1);
        self
    }

    /// Sets the idle-in-transaction bound of the store's own connections.
    pub fn idle_in_transaction_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_in_transaction_timeout = timeout;
        self
    }

    /// Sets when a pooled connection is pinged before use (see
    /// [`PgStoreConfig::ping_idle_after`]).
    pub fn ping_idle_after(mut self, idle: Option<Duration>) -> Self {
        self.ping_idle_after = idle;
        self
    }

    /// Sets the bound on an appending transaction (see
    /// [`PgStoreConfig::max_append_transaction`]).
    pub fn max_append_transaction(mut self, bound: Option<Duration>) -> Self {
        self.max_append_transaction = bound;
        self
    }

    /// Sets the pool size used by [`PgEventStore::connect_with`].
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }
}

/// `options` with the acquire check of [`PgStoreConfig::ping_idle_after`]:
/// with `Some(idle)`, a connection is pinged before it is handed out only
/// when it sat in the pool at least `idle` (a failed ping closes it and the
/// pool opens another); with `None`, sqlx's ping on every acquire. For pools
/// built outside [`PgEventStore::connect_with`] that should behave the same
/// (a benchmark's raw baseline, a service's own `PgPool` or `AnyPool` on
/// PostgreSQL).
///
/// ```
/// use std::time::Duration;
/// use sqlx::postgres::PgPoolOptions;
/// use vextrus_postgres::ping_idle_connections;
///
/// let options = ping_idle_connections(PgPoolOptions::new(), Some(Duration::from_secs(1)))
///     .max_connections(8);
/// assert!(!options.get_test_before_acquire());
/// assert!(ping_idle_connections(PgPoolOptions::new(), None).get_test_before_acquire());
/// ```
pub fn ping_idle_connections<DB: sqlx::Database>(
    options: sqlx::pool::PoolOptions<DB>,
    idle: Option<Duration>,
) -> sqlx::pool::PoolOptions<DB> {
    let Some(idle) = idle else {
        return options.test_before_acquire(true);
    };
    options
        .test_before_acquire(false)
        .before_acquire(move |conn, meta| {
            Box::pin(async move {
                if meta.idle_for < idle {
                    return Ok(true);
                }
                // A dead connection is dropped; the pool opens another.
                Ok(sqlx::Connection::ping(conn).await.is_ok())
            })
        })
}

/// The event store on PostgreSQL.
///
/// Implements every capability trait of `vextrus-core`
/// ([`vextrus_core::EventAppender`], [`EventReader`],
/// [`vextrus_core::SnapshotStore`], [`vextrus_core::CheckpointStore`],
/// [`vextrus_core::SubscriptionSource`], [`vextrus_core::ProjectionBackend`])
/// over a [`PgPool`], and appends inside a caller's open transaction with
/// [`PgEventStore::append_in_tx`] (for a unit of work).
///
/// The global log is ordered by `(transaction id, position)` and a read only
/// returns rows of transactions older than the oldest one still running, so
/// a transaction that took a lower position but commits later is never
/// skipped (see the crate docs).
///
/// ```no_run
/// use serde_json::json;
/// use vextrus_core::{EventAppender, EventReader, ExpectedVersion, NewEvent, StreamId};
/// use vextrus_kernel::EventMetadata;
/// use vextrus_postgres::PgEventStore;
///
/// # async fn demo() -> vextrus_core::Result<()> {
/// let store = PgEventStore::connect("postgres://postgres@127.0.0.1:5432/test").await?;
/// store.migrate().await?;
/// let order = StreamId::new("order-42")?;
/// let placed = NewEvent::new("order.placed", json!({"total": "10.00"}), EventMetadata::new());
/// let r = store.append_to_stream(&order, ExpectedVersion::NoStream, &[placed]).await?;
/// assert_eq!(r.last_version, 1);
/// assert_eq!(store.stream_version(&order).await?, Some(1));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PgEventStore {
    pub(crate) pool: PgPool,
    pub(crate) config: Arc<PgStoreConfig>,
    pub(crate) wake: Arc<OnceLock<watch::Receiver<u64>>>,
    notifier: CoalescingNotifier,
}

/// The columns every event read selects, in the order [`decode_event`] reads them.
const EVENT_COLUMNS: &str = "e.position, e.transaction_id::text::bigint, e.stream_id, \
     e.stream_version, e.event_type, e.schema_version, e.payload, e.metadata::text, e.recorded_at";

impl PgEventStore {
    /// A store over an existing pool, with the default configuration.
    pub fn new(pool: PgPool) -> Self {
        Self::with_config(pool, PgStoreConfig::default())
    }

    /// A store over an existing pool. (The pool's connections keep their own
    /// settings; [`PgStoreConfig::idle_in_transaction_timeout`] applies only
    /// to pools built by [`PgEventStore::connect_with`].)
    pub fn with_config(pool: PgPool, config: PgStoreConfig) -> Self {
        Self {
            pool,
            config: Arc::new(config),
            wake: Arc::new(OnceLock::new()),
            notifier: CoalescingNotifier::default(),
        }
    }

    /// Connects to `url` with the default configuration. An unreachable
    /// database gives [`EventStoreError::Unavailable`].
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, PgStoreConfig::default()).await
    }

    /// Connects to `url`, building a pool as `config` says.
    pub async fn connect_with(url: &str, config: PgStoreConfig) -> Result<Self> {
        let mut options: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
            EventStoreError::backend(format!("invalid database URL: {e}"))
        })?;
        if let Some(t) = config.idle_in_transaction_timeout {
            options = options.options([(
                "idle_in_transaction_session_timeout",
                t.as_millis().max(1).to_string(),
            )]);
        }
        let pool = ping_idle_connections(PgPoolOptions::new(), config.ping_idle_after)
            .max_connections(config.max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(map_sqlx)?;
        Ok(Self::with_config(pool, config))
    }

    /// The pool the store uses (for a unit of work's own SQL).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The store's configuration.
    pub fn config(&self) -> &PgStoreConfig {
        &self.config
    }

    /// Applies the store's migrations (versioned SQL files under
    /// `migrations/`); applying them again is harmless, and two processes
    /// migrating at once take turns. Returns how many were applied.
    pub async fn migrate(&self) -> Result<usize> {
        crate::migrate::run(&self.pool).await
    }

    /// Appends inside the caller's open transaction, for a unit of work that
    /// also writes outbox messages, inbox entries or its own rows. Nothing is
    /// visible to others until the caller commits; the caller's rollback
    /// undoes the append.
    ///
    /// Same contract as [`vextrus_core::EventAppender::append_to_stream`],
    /// and the same rule as a pooled append (see the crate docs): the
    /// expected version is checked against the events' own
    /// `(stream_id, stream_version)` key. A version conflict or an
    /// idempotent re-append leaves `tx` usable. A race in which another
    /// transaction stores one of a multi-event batch's later event ids at the
    /// same moment aborts `tx` (the unique violation) and gives
    /// [`EventStoreError::PartialDuplicate`]. With
    /// [`NotifyMode::InTransaction`] the append also notifies inside `tx`.
    pub async fn append_in_tx(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendResult> {
        let args = AppendArgs::new(events, self.config.max_payload_bytes)?;
        self.append_on(tx, stream_id, expected, &args, true).await
    }

    /// Appends on a pooled connection: one statement, its own transaction.
    pub(crate) async fn append_pooled(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendResult> {
        let args = AppendArgs::new(events, self.config.max_payload_bytes)?;
        let mut conn = self.pool.acquire().await.map_err(map_sqlx)?;
        let result = self
            .append_on(&mut conn, stream_id, expected, &args, false)
            .await?;
        drop(conn);
        if self.config.notify == NotifyMode::AfterCommit {
            self.notify_subscribers();
        }
        Ok(result)
    }

    /// The append rule, shared by every path: insert the batch at the
    /// stream's current version + 1 if that version is the expected one
    /// (the events' unique `(stream_id, stream_version)` key settles a race);
    /// when nothing was written, ask why (a conflict, an idempotent
    /// re-append, a partial duplicate, or a lost race that another try may
    /// win). `in_tx`: `conn` is inside a transaction that a failed statement
    /// would abort, so a batch checks for stored ids first.
    async fn append_on(
        &self,
        conn: &mut PgConnection,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        args: &AppendArgs,
        in_tx: bool,
    ) -> Result<AppendResult> {
        let code = expected_code(expected);
        let notify = self.config.notify == NotifyMode::InTransaction;
        let mut lost = 0u32;
        loop {
            let inserted =
                if args.ids.len() == 1 && !in_tx && !notify && (0..i64::MAX).contains(&code) {
                    insert_single_exact(&mut *conn, stream_id, expected, args).await
                } else if args.ids.len() == 1 {
                    insert_single(&mut *conn, stream_id, expected, args, notify).await
                } else {
                    insert_batch(&mut *conn, stream_id, expected, args, in_tx, notify).await
                };
            match inserted {
                Ok(Some(r)) => return Ok(r),
                // Nothing written: classified below.
                Ok(None) => {}
                // A later id of the batch was stored by a transaction that
                // has committed by now. Pooled: the statement alone failed,
                // classify. In a caller's transaction: it is aborted.
                Err(AppendFailure::EventIdTaken | AppendFailure::VersionTaken) if !in_tx => {}
                Err(AppendFailure::VersionTaken) => {
                    return Err(EventStoreError::WrongExpectedVersion {
                        stream_id: stream_id.clone(),
                        expected,
                        actual: None,
                    });
                }
                Err(AppendFailure::EventIdTaken) => {
                    return Err(EventStoreError::PartialDuplicate {
                        stream_id: stream_id.clone(),
                        event_id: args.first_id,
                    });
                }
                Err(AppendFailure::Store(e)) => return Err(e),
            }
            match append_outcome(&mut *conn, stream_id, expected, code, args).await? {
                Some(r) => return Ok(r),
                None => {
                    // Lost a race that the expectation still allows (two
                    // `Any` appends took the same version): try again, after
                    // the first few losses with a short random pause so that
                    // one writer cannot starve behind a stream of winners.
                    lost += 1;
                    if lost >= MAX_LOST_RACES {
                        return Err(EventStoreError::unavailable(format!(
                            "append to {stream_id} lost {lost} races for the stream's next \
                             version to concurrent appends"
                        )));
                    }
                    if lost > 2 {
                        let cap = u64::from(lost.min(20)) * 500;
                        let us = std::hash::BuildHasher::hash_one(
                            &std::collections::hash_map::RandomState::new(),
                            lost,
                        ) % cap;
                        tokio::time::sleep(Duration::from_micros(us)).await;
                    }
                }
            }
        }
    }

    /// Wakes subscribers LISTENing on [`NOTIFY_CHANNEL`] (in every process):
    /// sends one `pg_notify` from a background task, sharing it with any
    /// other wake-up requested while one is in flight or within
    /// [`NOTIFY_COALESCE`] of the last one. Pooled appends do this
    /// themselves under [`NotifyMode::AfterCommit`]; call it after
    /// committing a transaction that appended with
    /// [`PgEventStore::append_in_tx`]. Without it subscribers still see the
    /// events at their next poll. Must be called within a Tokio runtime.
    pub fn notify_subscribers(&self) {
        self.notifier
            .request(|| pg_notify(self.pool.clone(), NOTIFY_CHANNEL));
    }

    /// One page of a stream read.
    async fn read_stream_page(
        &self,
        stream_id: &StreamId,
        direction: ReadDirection,
        from: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>> {
        let sql = match direction {
            ReadDirection::Forwards => {
                "SELECT e.position, e.transaction_id::text::bigint, e.stream_id, \
                 e.stream_version, e.event_type, e.schema_version, e.payload, e.metadata::text, \
                 e.recorded_at FROM vextrus_events e \
                 WHERE e.stream_id = $1 AND e.stream_version >= $2 \
                 ORDER BY e.stream_version ASC LIMIT $3"
            }
            ReadDirection::Backwards => {
                "SELECT e.position, e.transaction_id::text::bigint, e.stream_id, \
                 e.stream_version, e.event_type, e.schema_version, e.payload, e.metadata::text, \
                 e.recorded_at FROM vextrus_events e \
                 WHERE e.stream_id = $1 AND e.stream_version <= $2 \
                 ORDER BY e.stream_version DESC LIMIT $3"
            }
        };
        let rows = sqlx::query(sql)
            .bind(stream_id.as_str())
            .bind(from)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx)?;
        rows.iter().map(decode_event).collect()
    }

    /// Reads a global-log page (see [`EventReader::read_all`]).
    ///
    /// When the horizon was held by a transaction that could not be placed
    /// in a database (it most likely finished between the statement's
    /// snapshot and the look-up) and the page is not full, asks again a few
    /// times, so that a reader does not see a momentary, spurious end of the
    /// log.
    async fn read_all_impl(
        &self,
        from: GlobalPosition,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<GlobalPage> {
        let mut attempt = 0;
        loop {
            let (page, horizon) = self.read_all_once(from, filter, limit).await?;
            attempt += 1;
            if let (Some(bound), Some(held)) = (self.config.max_append_transaction, horizon.held)
                && page.events.len() < limit
                && held > bound
                && self.end_overdue_appender(horizon.xid, bound).await?
            {
                // The holder's session is ending: read again once it has
                // gone, and wake every subscriber.
                return self
                    .read_after_ending(from, filter, limit, horizon.xid)
                    .await;
            }
            if !horizon.unplaced || page.events.len() == limit || attempt >= HORIZON_RETRIES {
                return Ok(page);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Ends the session of the transaction `xid` if it holds the global
    /// log's horizon, belongs to this database, has written to the log and
    /// started longer than `bound` ago. True if it was signalled.
    async fn end_overdue_appender(&self, xid: u64, bound: Duration) -> Result<bool> {
        let ended: Option<(i32, bool)> = sqlx::query_as(
            "SELECT a.pid, pg_terminate_backend(a.pid) \
             FROM pg_stat_get_activity(NULL) a \
             WHERE a.backend_xid = xid($1::bigint::text::xid8) \
               AND a.datid = (SELECT d.oid FROM pg_database d \
                              WHERE d.datname = current_database()) \
               AND a.xact_start < clock_timestamp() - make_interval(secs => $2) \
               AND EXISTS (SELECT 1 FROM pg_locks l \
                           WHERE l.pid = a.pid AND l.locktype = 'relation' \
                             AND l.relation = 'vextrus_events'::regclass \
                             AND l.mode = 'RowExclusiveLock' AND l.granted) \
             LIMIT 1",
        )
        .bind(to_i64(xid))
        .bind(bound.as_secs_f64())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_sqlx)?;
        match ended {
            Some((pid, true)) => {
                tracing::warn!(
                    pid,
                    xid,
                    bound_ms = bound.as_millis() as u64,
                    "vextrus: ended an appending transaction that held the event log's \
                     read horizon longer than max_append_transaction"
                );
                Ok(true)
            }
            Some((pid, false)) => {
                tracing::warn!(
                    pid,
                    xid,
                    "vextrus: could not end an overdue appending transaction (not permitted)"
                );
                Ok(false)
            }
            None => Ok(false),
        }
    }

    /// Reads again after the horizon's holder `xid` was signalled, waiting
    /// (up to about a second) for its session to end, then wakes every
    /// subscriber.
    async fn read_after_ending(
        &self,
        from: GlobalPosition,
        filter: &EventFilter,
        limit: usize,
        xid: u64,
    ) -> Result<GlobalPage> {
        let mut page;
        let mut waited = 0;
        loop {
            let (p, horizon) = self.read_all_once(from, filter, limit).await?;
            page = p;
            waited += 1;
            if (horizon.xid != xid && !horizon.unplaced) || waited >= 500 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if self.config.notify != NotifyMode::Off {
            self.notify_subscribers();
        }
        Ok(page)
    }

    async fn read_all_once(
        &self,
        from: GlobalPosition,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<(GlobalPage, Horizon)> {
        if limit == 0 {
            return Ok((
                GlobalPage {
                    events: Vec::new(),
                    scanned_to: from,
                },
                Horizon::default(),
            ));
        }
        let (category, prefix, types) = filter_params(filter);
        let sql = format!(
            "WITH h AS MATERIALIZED (SELECT * FROM vextrus_log_horizon()), \
             tail AS MATERIALIZED ( \
                SELECT e.transaction_id::text::bigint AS c, e.position AS p \
                FROM vextrus_events e \
                WHERE (e.transaction_id, e.position) > ($1::bigint::text::xid8, $2) \
                  AND e.transaction_id < (SELECT h.horizon FROM h) \
                ORDER BY e.transaction_id DESC, e.position DESC \
                LIMIT 1) \
             SELECT (SELECT tail.c FROM tail), (SELECT tail.p FROM tail), \
                    (SELECT h.unplaced FROM h), {EVENT_COLUMNS}, \
                    (SELECT h.horizon::text::bigint FROM h), \
                    CASE WHEN (SELECT h.horizon FROM h) < pg_snapshot_xmax(pg_current_snapshot()) \
                    THEN (SELECT (extract(epoch FROM clock_timestamp() - a.xact_start) \
                                  * 1000000)::bigint \
                          FROM pg_stat_get_activity(NULL) a \
                          WHERE a.backend_xid = xid((SELECT h.horizon FROM h)) LIMIT 1) END \
             FROM (SELECT NULL) AS one \
             LEFT JOIN LATERAL ( \
                SELECT e.* FROM vextrus_events e \
                WHERE (e.transaction_id, e.position) > ($1::bigint::text::xid8, $2) \
                  AND e.transaction_id < (SELECT h.horizon FROM h) \
                  AND ($3::text IS NULL OR split_part(e.stream_id, '-', 1) = $3) \
                  AND ($4::text IS NULL OR starts_with(e.stream_id, $4)) \
                  AND ($5::text[] IS NULL OR e.event_type = ANY ($5)) \
                ORDER BY e.transaction_id, e.position \
                LIMIT $6 \
             ) e ON true \
             ORDER BY e.transaction_id, e.position"
        );
        let rows = sqlx::query(&sql)
            .bind(to_i64(from.commit))
            .bind(to_i64(from.position))
            .bind(category)
            .bind(prefix)
            .bind(types)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(map_sqlx)?;
        // The last readable row after `from`, whether or not the filter
        // kept it: when the page is not full, everything up to it was seen.
        let (tail, horizon) = match rows.first() {
            Some(r) => {
                let c: Option<i64> = r.try_get(0).map_err(map_sqlx)?;
                let p: Option<i64> = r.try_get(1).map_err(map_sqlx)?;
                let unplaced: Option<bool> = r.try_get(2).map_err(map_sqlx)?;
                let xid: Option<i64> = r.try_get(HORIZON_COLUMN).map_err(map_sqlx)?;
                let held_us: Option<i64> = r.try_get(HORIZON_COLUMN + 1).map_err(map_sqlx)?;
                (
                    c.zip(p)
                        .map(|(c, p)| GlobalPosition::new(to_u64(c), to_u64(p))),
                    Horizon {
                        xid: xid.map_or(0, to_u64),
                        unplaced: unplaced.unwrap_or(false),
                        held: held_us.map(|us| Duration::from_micros(to_u64(us))),
                    },
                )
            }
            None => (None, Horizon::default()),
        };
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let position: Option<i64> = row.try_get(3).map_err(map_sqlx)?;
            if position.is_some() {
                events.push(decode_event_at(row, 3)?);
            }
        }
        let last = events.last().map_or(from, |e| e.position);
        let scanned_to = if events.len() == limit {
            last
        } else {
            last.max(tail.unwrap_or(from))
        };
        Ok((GlobalPage { events, scanned_to }, horizon))
    }

    /// How many readable events lie after `from` and pass `filter`.
    async fn count_after_impl(&self, from: GlobalPosition, filter: &EventFilter) -> Result<u64> {
        let (category, prefix, types) = filter_params(filter);
        let mut attempt = 0;
        loop {
            let (n, unplaced): (i64, bool) = sqlx::query_as(
                "WITH h AS MATERIALIZED (SELECT * FROM vextrus_log_horizon()) \
                 SELECT (SELECT count(*) FROM vextrus_events e \
                   WHERE (e.transaction_id, e.position) > ($1::bigint::text::xid8, $2) \
                     AND e.transaction_id < (SELECT h.horizon FROM h) \
                     AND ($3::text IS NULL OR split_part(e.stream_id, '-', 1) = $3) \
                     AND ($4::text IS NULL OR starts_with(e.stream_id, $4)) \
                     AND ($5::text[] IS NULL OR e.event_type = ANY ($5))), \
                   (SELECT h.unplaced FROM h)",
            )
            .bind(to_i64(from.commit))
            .bind(to_i64(from.position))
            .bind(&category)
            .bind(&prefix)
            .bind(&types)
            .fetch_one(&self.pool)
            .await
            .map_err(map_sqlx)?;
            attempt += 1;
            if !unplaced || attempt >= HORIZON_RETRIES {
                return Ok(to_u64(n));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The age of the oldest event after `from` that a reader could read
    /// now (`None`: nothing unread), by the database clock: the "age of the
    /// oldest unprocessed event" of a projection's lag.
    pub async fn oldest_unread_age(
        &self,
        from: GlobalPosition,
        filter: &EventFilter,
    ) -> Result<Option<Duration>> {
        let (category, prefix, types) = filter_params(filter);
        let secs: Option<f64> = sqlx::query_scalar(
            "WITH h AS MATERIALIZED (SELECT * FROM vextrus_log_horizon()) \
             SELECT extract(epoch FROM now() - min(e.recorded_at))::float8 \
             FROM vextrus_events e \
             WHERE (e.transaction_id, e.position) > ($1::bigint::text::xid8, $2) \
               AND e.transaction_id < (SELECT h.horizon FROM h) \
               AND ($3::text IS NULL OR split_part(e.stream_id, '-', 1) = $3) \
               AND ($4::text IS NULL OR starts_with(e.stream_id, $4)) \
               AND ($5::text[] IS NULL OR e.event_type = ANY ($5))",
        )
        .bind(to_i64(from.commit))
        .bind(to_i64(from.position))
        .bind(category)
        .bind(prefix)
        .bind(types)
        .fetch_one(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
    }
}

/// The column of a global-log read that holds the horizon (after the tail
/// position, the unplaced flag and the event columns); the next one holds
/// how long its transaction has been running.
const HORIZON_COLUMN: usize = 12;

/// The horizon a global-log read used.
#[derive(Debug, Default, Clone, Copy)]
struct Horizon {
    /// The horizon's transaction id (the oldest running transaction of this
    /// database, or the next id to be assigned when none runs).
    xid: u64,
    /// A running transaction that could not be placed in a database held it.
    unplaced: bool,
    /// How long the transaction holding it has been running (`None`: no
    /// running transaction of this database holds it, or it could not be
    /// found).
    held: Option<Duration>,
}

/// How many times a global-log read asks again when an unplaced transaction
/// held its horizon.
const HORIZON_RETRIES: u32 = 5;

/// How many times an append that lost a race for its stream's next version
/// (while its expectation still held) tries again before giving up with
/// [`EventStoreError::Unavailable`].
const MAX_LOST_RACES: u32 = 100;

/// The expected version as the append statements take it: `-1` any, `-3`
/// stream exists, otherwise the exact version (`0`: no stream).
fn expected_code(expected: ExpectedVersion) -> i64 {
    match expected {
        ExpectedVersion::Any => -1,
        ExpectedVersion::StreamExists => -3,
        ExpectedVersion::NoStream => 0,
        ExpectedVersion::Exact(n) => to_i64(n),
    }
}

/// Types a failed append statement: the unique violation of `event_id` (a
/// concurrent transaction stored one of the ids) is told apart.
fn append_error(e: sqlx::Error, stream_id: &StreamId, expected: ExpectedVersion) -> AppendFailure {
    match unique_violation(&e) {
        Some(c) if c == EVENT_ID_KEY => AppendFailure::EventIdTaken,
        Some(c) if c == STREAM_VERSION_KEY => AppendFailure::VersionTaken,
        Some(_) => AppendFailure::Store(EventStoreError::WrongExpectedVersion {
            stream_id: stream_id.clone(),
            expected,
            actual: None,
        }),
        None => AppendFailure::Store(map_sqlx(e)),
    }
}

/// The events' unique `(stream_id, stream_version)` constraint.
const STREAM_VERSION_KEY: &str = "vextrus_events_stream_version_key";

/// The stream's current version, from its events (0: no stream), for the
/// append statements' `cur` CTE; `$1` is the stream.
macro_rules! current_version_cte {
    () => {
        "cur AS (SELECT coalesce(max(e.stream_version), 0) AS v \
         FROM vextrus_events e WHERE e.stream_id = $1)"
    };
}

/// Whether `cur.v` meets the expectation `$7` (see [`expected_code`]).
macro_rules! expectation_met {
    () => {
        "CASE WHEN $7 = -1 THEN true WHEN $7 = -3 THEN cur.v > 0 ELSE cur.v = $7 END"
    };
}

/// A single-event insert: `$1` stream, `$2`..`$6` the event's id, type,
/// schema version, payload and metadata, `$7` the expectation. Inserts at
/// the current version + 1 when the expectation holds; `ON CONFLICT DO
/// NOTHING` makes a concurrent append of that version (or a stored event id)
/// a clean "nothing written" instead of an error.
macro_rules! single_insert {
    () => {
        concat!(
            "INSERT INTO vextrus_events \
             (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata) \
             SELECT $1, cur.v + 1, $2, $3, $4, $5, $6 FROM cur WHERE ",
            expectation_met!(),
            " ON CONFLICT DO NOTHING"
        )
    };
}

/// A single event (see [`single_insert`]).
const APPEND_SINGLE: &str = concat!(
    "WITH ",
    current_version_cte!(),
    " ",
    single_insert!(),
    " RETURNING position, transaction_id::text::bigint, stream_version"
);

/// A single event that also notifies [`NOTIFY_CHANNEL`] in its transaction
/// when it wrote ([`NotifyMode::InTransaction`]).
const APPEND_SINGLE_NOTIFY: &str = concat!(
    "WITH ",
    current_version_cte!(),
    ", ins AS (",
    single_insert!(),
    " RETURNING position, transaction_id, stream_version) \
     SELECT ins.position, ins.transaction_id::text::bigint, ins.stream_version, \
     (SELECT true FROM pg_notify('vextrus_events', '') WHERE ins.position IS NOT NULL) \
     FROM ins"
);

/// A batch append up to its result columns: `$1` stream, `$2`..`$6` the
/// events' columns as arrays, `$7` the expectation, `$8` whether to check
/// first that none of the ids is stored. The first event goes in as a
/// single event's does and claims the version after the current one; the
/// rest follow only if it went in (no other append can hold their versions:
/// it would have had to claim the first one).
macro_rules! batch_insert {
    () => {
        concat!(
            "WITH ",
            current_version_cte!(),
            ", first AS ( \
                INSERT INTO vextrus_events \
                (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata) \
                SELECT $1, cur.v + 1, $2[1], $3[1], $4[1], $5[1], $6[1] FROM cur WHERE ",
            expectation_met!(),
            "   AND NOT ($8 AND EXISTS (SELECT 1 FROM vextrus_events x WHERE x.event_id = ANY ($2))) \
                ON CONFLICT DO NOTHING \
                RETURNING position, transaction_id, stream_version), \
             rest AS ( \
                INSERT INTO vextrus_events \
                (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata) \
                SELECT $1, first.stream_version + b.ord - 1, b.id, b.t, b.sv, b.p, b.m \
                FROM first, unnest($2, $3, $4, $5, $6) WITH ORDINALITY AS b(id, t, sv, p, m, ord) \
                WHERE b.ord > 1 \
                ORDER BY b.ord \
                RETURNING position) \
             SELECT first.position, first.transaction_id::text::bigint, first.stream_version, \
                    (SELECT max(rest.position) FROM rest)"
        )
    };
}

/// A batch (see [`batch_insert`]).
const APPEND_BATCH: &str = concat!(batch_insert!(), " FROM first");

/// A batch that also notifies in its transaction when it wrote.
const APPEND_BATCH_NOTIFY: &str = concat!(
    batch_insert!(),
    ", (SELECT true FROM pg_notify('vextrus_events', '') WHERE first.position IS NOT NULL) \
     FROM first"
);

/// Inserts a single event (see [`APPEND_SINGLE`]); `None`: nothing written.
async fn insert_single(
    conn: &mut PgConnection,
    stream_id: &StreamId,
    expected: ExpectedVersion,
    args: &AppendArgs,
    notify: bool,
) -> std::result::Result<Option<AppendResult>, AppendFailure> {
    let sql = if notify {
        APPEND_SINGLE_NOTIFY
    } else {
        APPEND_SINGLE
    };
    run_single(conn, sql, stream_id, expected, args).await
}

/// Runs a single-event append statement (`$1` stream, `$2`–`$6` the event,
/// `$7` the expectation's code; returning position, commit and version);
/// `None`: nothing written.
async fn run_single(
    conn: &mut PgConnection,
    sql: &'static str,
    stream_id: &StreamId,
    expected: ExpectedVersion,
    args: &AppendArgs,
) -> std::result::Result<Option<AppendResult>, AppendFailure> {
    let row = sqlx::query(sql)
        .bind(stream_id.as_str())
        .bind(args.ids[0])
        .bind(&args.types[0])
        .bind(args.schema_versions[0])
        .bind(&args.payloads[0])
        .bind(&args.metadata[0])
        .bind(expected_code(expected))
        .fetch_optional(conn)
        .await
        .map_err(|e| append_error(e, stream_id, expected))?;
    let Some(row) = row else { return Ok(None) };
    let get = |e: sqlx::Error| AppendFailure::Store(map_sqlx(e));
    let position: i64 = row.try_get(0).map_err(get)?;
    let commit: i64 = row.try_get(1).map_err(get)?;
    let version: i64 = row.try_get(2).map_err(get)?;
    let at = GlobalPosition::new(to_u64(commit), to_u64(position));
    Ok(Some(AppendResult {
        first_version: to_u64(version),
        last_version: to_u64(version),
        first_position: at,
        last_position: at,
    }))
}

/// A single pooled event at an exact expectation `$7` (`0`: no stream):
/// inserts it at version `$7 + 1` if version `$7` is stored (an index probe
/// of that one key instead of `max(stream_version)`), as a plain `INSERT`.
/// Versions stay contiguous because version `n + 1` only goes in while
/// version `n` is visible, as with [`APPEND_SINGLE`]; a stored `$7 + 1` (or
/// event id) is a unique violation, which ends only this autocommit
/// statement and is classified like "nothing written". Without
/// `ON CONFLICT` the insert skips the speculative-insertion protocol (a
/// pre-check of every unique index and a confirmation record); measured
/// about 10% more appends/s server-side (BENCHMARKS.md).
const APPEND_SINGLE_EXACT: &str = "INSERT INTO vextrus_events \
     (stream_id, stream_version, event_id, event_type, schema_version, payload, metadata) \
     SELECT $1, $7 + 1, $2, $3, $4, $5, $6 \
     WHERE $7 = 0 OR EXISTS (SELECT 1 FROM vextrus_events e \
                            WHERE e.stream_id = $1 AND e.stream_version = $7) \
     RETURNING position, transaction_id::text::bigint, stream_version";

/// Inserts a single pooled event at an exact expectation (see
/// [`APPEND_SINGLE_EXACT`]); `None`: nothing written (version `n` not
/// stored).
async fn insert_single_exact(
    conn: &mut PgConnection,
    stream_id: &StreamId,
    expected: ExpectedVersion,
    args: &AppendArgs,
) -> std::result::Result<Option<AppendResult>, AppendFailure> {
    run_single(conn, APPEND_SINGLE_EXACT, stream_id, expected, args).await
}

/// Inserts a batch (see [`APPEND_BATCH`]); `None`: nothing written.
async fn insert_batch(
    conn: &mut PgConnection,
    stream_id: &StreamId,
    expected: ExpectedVersion,
    args: &AppendArgs,
    check_ids: bool,
    notify: bool,
) -> std::result::Result<Option<AppendResult>, AppendFailure> {
    let sql = if notify {
        APPEND_BATCH_NOTIFY
    } else {
        APPEND_BATCH
    };
    let row = sqlx::query(sql)
        .bind(stream_id.as_str())
        .bind(&args.ids)
        .bind(&args.types)
        .bind(&args.schema_versions)
        .bind(&args.payloads)
        .bind(&args.metadata)
        .bind(expected_code(expected))
        .bind(check_ids)
        .fetch_optional(conn)
        .await
        .map_err(|e| append_error(e, stream_id, expected))?;
    let Some(row) = row else { return Ok(None) };
    let get = |e: sqlx::Error| AppendFailure::Store(map_sqlx(e));
    let first: i64 = row.try_get(0).map_err(get)?;
    let commit: i64 = row.try_get(1).map_err(get)?;
    let version: i64 = row.try_get(2).map_err(get)?;
    let last: Option<i64> = row.try_get(3).map_err(get)?;
    let n = args.ids.len() as u64;
    let commit = to_u64(commit);
    Ok(Some(AppendResult {
        first_version: to_u64(version),
        last_version: to_u64(version) + n - 1,
        first_position: GlobalPosition::new(commit, to_u64(first)),
        last_position: GlobalPosition::new(commit, to_u64(last.unwrap_or(first))),
    }))
}

/// Why an append wrote nothing (`vextrus_append_outcome`): the typed
/// conflict or partial duplicate, the original result of an idempotent
/// re-append, or `None` when the expectation still holds (a lost race: try
/// again).
async fn append_outcome(
    conn: &mut PgConnection,
    stream_id: &StreamId,
    expected: ExpectedVersion,
    code: i64,
    args: &AppendArgs,
) -> Result<Option<AppendResult>> {
    let row = sqlx::query(
        "SELECT outcome, stream_version, first_position, first_commit, last_position, \
         last_commit, conflict_event_id FROM vextrus_append_outcome($1, $2, $3)",
    )
    .bind(stream_id.as_str())
    .bind(code)
    .bind(&args.ids)
    .fetch_one(conn)
    .await
    .map_err(map_sqlx)?;
    let outcome: i16 = row.try_get(0).map_err(map_sqlx)?;
    let version: Option<i64> = row.try_get(1).map_err(map_sqlx)?;
    match outcome {
        2 => {
            let n = args.ids.len() as u64;
            let last_version = to_u64(version.unwrap_or_default());
            let pos = |p: usize, c: usize| -> Result<GlobalPosition> {
                let position: Option<i64> = row.try_get(p).map_err(map_sqlx)?;
                let commit: Option<i64> = row.try_get(c).map_err(map_sqlx)?;
                Ok(GlobalPosition::new(
                    to_u64(commit.unwrap_or_default()),
                    to_u64(position.unwrap_or_default()),
                ))
            };
            Ok(Some(AppendResult {
                first_version: last_version + 1 - n,
                last_version,
                first_position: pos(2, 3)?,
                last_position: pos(4, 5)?,
            }))
        }
        1 => Err(EventStoreError::WrongExpectedVersion {
            stream_id: stream_id.clone(),
            expected,
            actual: version.map(to_u64),
        }),
        3 => {
            let id: Option<Uuid> = row.try_get(6).map_err(map_sqlx)?;
            Err(EventStoreError::PartialDuplicate {
                stream_id: stream_id.clone(),
                event_id: id.map_or(args.first_id, EventId::from),
            })
        }
        _ => Ok(None),
    }
}

/// Why an append statement failed.
enum AppendFailure {
    /// A concurrent transaction stored one of the batch's event ids (unique violation).
    EventIdTaken,
    /// Another transaction stored the version the append claimed (unique
    /// violation of `(stream_id, stream_version)`; only a statement without
    /// `ON CONFLICT` raises it).
    VersionTaken,
    /// Anything else, already typed.
    Store(EventStoreError),
}

/// A validated batch as the column arrays the append function takes.
struct AppendArgs {
    first_id: EventId,
    ids: Vec<Uuid>,
    types: Vec<String>,
    schema_versions: Vec<i32>,
    payloads: Vec<serde_json::Value>,
    metadata: Vec<serde_json::Value>,
}

impl AppendArgs {
    fn new(events: &[NewEvent], max_payload: usize) -> Result<Self> {
        validate_batch(events, max_payload)?;
        let mut args = AppendArgs {
            first_id: events[0].event_id,
            ids: Vec::with_capacity(events.len()),
            types: Vec::with_capacity(events.len()),
            schema_versions: Vec::with_capacity(events.len()),
            payloads: Vec::with_capacity(events.len()),
            metadata: Vec::with_capacity(events.len()),
        };
        for e in events {
            args.ids.push(e.event_id.as_uuid());
            args.types.push(e.event_type.clone());
            args.schema_versions
                .push(i32::try_from(e.schema_version).map_err(|_| {
                    EventStoreError::InvalidEvent(format!(
                        "schema version {} is too large",
                        e.schema_version
                    ))
                })?);
            args.payloads.push(e.payload.clone());
            args.metadata.push(serde_json::to_value(&e.metadata)?);
        }
        Ok(args)
    }
}

/// The filter as bind parameters: category, prefix, event types (`None`: no condition).
fn filter_params(filter: &EventFilter) -> (Option<String>, Option<String>, Option<Vec<String>>) {
    let (category, prefix) = match &filter.streams {
        StreamFilter::All => (None, None),
        StreamFilter::Category(c) => (Some(c.clone()), None),
        StreamFilter::Prefix(p) => (None, Some(p.clone())),
    };
    let types = (!filter.event_types.is_empty()).then(|| filter.event_types.clone());
    (category, prefix, types)
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Decodes an event row selected with [`EVENT_COLUMNS`].
pub(crate) fn decode_event(row: &PgRow) -> Result<RecordedEvent> {
    decode_event_at(row, 0)
}

/// Decodes an event row whose [`EVENT_COLUMNS`] start at column `at`.
fn decode_event_at(row: &PgRow, at: usize) -> Result<RecordedEvent> {
    let position: i64 = row.try_get(at).map_err(map_sqlx)?;
    let commit: i64 = row.try_get(at + 1).map_err(map_sqlx)?;
    let stream_id: String = row.try_get(at + 2).map_err(map_sqlx)?;
    let stream_version: i64 = row.try_get(at + 3).map_err(map_sqlx)?;
    let event_type: String = row.try_get(at + 4).map_err(map_sqlx)?;
    let schema_version: i32 = row.try_get(at + 5).map_err(map_sqlx)?;
    let payload: serde_json::Value = row.try_get(at + 6).map_err(map_sqlx)?;
    // Metadata as text, parsed straight into its type (no intermediate Value).
    let metadata: &str = row.try_get(at + 7).map_err(map_sqlx)?;
    let recorded_at: chrono::DateTime<chrono::Utc> = row.try_get(at + 8).map_err(map_sqlx)?;
    let metadata: EventMetadata = serde_json::from_str(metadata)?;
    Ok(RecordedEvent {
        stream_id: StreamId::new(stream_id)?,
        stream_version: to_u64(stream_version),
        position: GlobalPosition::new(to_u64(commit), to_u64(position)),
        event_type,
        schema_version: u32::try_from(schema_version).unwrap_or(0),
        payload,
        metadata,
        recorded_at,
    })
}

impl vextrus_core::EventAppender for PgEventStore {
    async fn append_to_stream(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendResult> {
        use tracing::Instrument;
        let span = vextrus_telemetry::spans::event_append(stream_id, events.len());
        let started = std::time::Instant::now();
        let result = self
            .append_pooled(stream_id, expected, events)
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

impl EventReader for PgEventStore {
    fn read_stream<'a>(
        &'a self,
        stream_id: &'a StreamId,
        options: ReadStreamOptions,
    ) -> EventStream<'a> {
        struct State {
            next: i64,
            remaining: u64,
            done: bool,
        }
        let page_size = self.config.read_page_size as u64;
        let start = match (options.direction, options.from_version) {
            (_, Some(v)) => to_i64(v),
            (ReadDirection::Forwards, None) => 1,
            (ReadDirection::Backwards, None) => i64::MAX,
        };
        let state = State {
            next: start,
            remaining: options.limit.unwrap_or(u64::MAX),
            done: false,
        };
        stream::try_unfold(state, move |mut st| async move {
            if st.done || st.remaining == 0 || st.next < 1 {
                return Ok(None);
            }
            let want = st.remaining.min(page_size);
            let page = self
                .read_stream_page(stream_id, options.direction, st.next, to_i64(want))
                .await?;
            st.remaining -= page.len() as u64;
            if (page.len() as u64) < want {
                st.done = true;
            }
            if let Some(last) = page.last() {
                let v = to_i64(last.stream_version);
                st.next = match options.direction {
                    ReadDirection::Forwards => v.saturating_add(1),
                    ReadDirection::Backwards => v - 1,
                };
            } else {
                st.done = true;
            }
            Ok::<_, EventStoreError>(Some((page, st)))
        })
        .map_ok(|page: Vec<RecordedEvent>| {
            stream::iter(page.into_iter().map(Ok::<_, EventStoreError>))
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
        self.read_all_impl(from, filter, limit).await
    }

    async fn stream_version(&self, stream_id: &StreamId) -> Result<Option<u64>> {
        // The same rule as appends: the stream's version is its last event's.
        let v: Option<i64> = sqlx::query_scalar(
            "SELECT max(e.stream_version) FROM vextrus_events e WHERE e.stream_id = $1",
        )
        .bind(stream_id.as_str())
        .fetch_one(&self.pool)
        .await
        .map_err(map_sqlx)?;
        Ok(v.map(to_u64))
    }

    async fn count_after(&self, from: GlobalPosition, filter: &EventFilter) -> Result<u64> {
        self.count_after_impl(from, filter).await
    }
}
