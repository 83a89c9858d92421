//! The order-to-cash saga benchmark (issue 5): completed sagas per second on
//! PostgreSQL, with the participants in this process (in-process broker) and
//! over NATS JetStream, beside the bound of the same run.
//!
//! ```text
//! cargo run --release -p vextrus-order-to-cash --example saga_bench
//! ```
//!
//! Each run gets a fresh database (`CREATE DATABASE`, dropped afterwards) on
//! `SAGA_BENCH_PG` (default `postgres://postgres@127.0.0.1:5432`): Sales'
//! event store, the four participants' tables, and the orchestrator's
//! durable saga store ([`PgSagaStore`] over the same database's
//! `vextrus_outbox`), wired from the library's `node` pieces, with no
//! injected faults. One relay (woken by NOTIFY, 500 ms fallback poll)
//! publishes that one outbox table, commands and replies alike: the
//! participants run without relays of their own. `SAGA_BENCH_ORDERS`
//! orders (default 1000) are placed with `SAGA_BENCH_CONCURRENCY` sagas in
//! flight (default 64) by 2 orchestrator workers.
//!
//! Measured per run:
//! - completed sagas/s: orders / (first placement -> last terminal saga);
//! - saga latency p50/p99: `start_with_id` -> the commit of the terminal
//!   transition, observed in process by a wrapper around the saga store (so
//!   the bench itself never polls the database);
//! - transactions per saga: the `xact_commit` delta of the run's database in
//!   `pg_stat_database` over the measured phase (read from another database,
//!   after every pool of the run is closed so every backend has flushed its
//!   counters), divided by the orders;
//! - SQL statements per saga: every `sqlx::query` tracing event (sqlx logs
//!   each statement it executes, `BEGIN` and `COMMIT` included) counted by a
//!   subscriber layer in this process while the orders run, per statement
//!   text, divided by the orders;
//! - CPU: cores used by this process, by PostgreSQL's processes, by
//!   nats-server and by everything else over the measured phase, from
//!   `/proc/<pid>/stat` (Linux);
//! - the bound: in the same run, single-row `INSERT` transactions
//!   (`BEGIN; INSERT; COMMIT` through a sqlx `PgPool`) from 16 and from 32
//!   concurrent tasks on pools of that size for 3 s each; bound = the
//!   higher commits/s / the saga's transactions per saga.
//!
//! `SAGA_BENCH_RUNS` (default 3) runs per transport; `SAGA_BENCH_TRANSPORTS`
//! (default `inprocess,nats`); `SAGA_BENCH_NATS` (default
//! `nats://127.0.0.1:4222`); `SAGA_BENCH_TOP` statement kinds listed per
//! transport (default 25). Exit code 1 if a saga did not complete.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection};
use tokio::sync::{Semaphore, oneshot};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::{Layer, registry::Registry};
use uuid::Uuid;
use vextrus_core::saga::{
    Claim, HistoryEntry, NewSaga, Orchestrator, OrchestratorConfig, SagaError, SagaFilter, SagaId,
    SagaInstance, SagaRegistry, SagaState, SagaStore, SagaTransition,
};
use vextrus_kernel::{AggregateId, CommandContext, Currency, Money, Quantity, Sku};
use vextrus_order_to_cash::accounting::Accounting;
use vextrus_order_to_cash::inventory::{Inventory, StockLine};
use vextrus_order_to_cash::node::{
    Broker, InProcessBroker, NatsBroker, listening_relay_config, start_orchestrator_with,
    start_participant_served_by_shared_relay,
};
use vextrus_order_to_cash::participant::ServeConfig;
use vextrus_order_to_cash::payment::Payment;
use vextrus_order_to_cash::saga::{
    ACCOUNTING, INVENTORY, OrderToCashData, PAYMENT, REPLIES, SAGA_TYPE, SHIPPING, StepPolicy,
    definition,
};
use vextrus_order_to_cash::sales::{OrderCommand, OrderLine, Sales};
use vextrus_order_to_cash::shipping::Shipping;
use vextrus_order_to_cash::{Database, Durability, FaultInjector, IdempotencyKey};
use vextrus_postgres::{PgEventStore, PgOutbox, PgSagaStore};

/// The saga workers' fallback poll.
const ORCHESTRATOR_POLL: Duration = Duration::from_millis(500);

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

// ---------------------------------------------------------------------------
// Counting sqlx statements.

/// Counts `sqlx::query` events while `active`, per statement text.
#[derive(Default)]
struct Statements {
    active: AtomicBool,
    total: AtomicU64,
    by_text: Mutex<HashMap<String, u64>>,
}

impl Statements {
    fn start(&self) {
        self.total.store(0, Ordering::SeqCst);
        self.by_text
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.active.store(true, Ordering::SeqCst);
    }

    /// Stops counting; returns the total and the counts per statement.
    fn stop(&self) -> (u64, HashMap<String, u64>) {
        self.active.store(false, Ordering::SeqCst);
        let by = std::mem::take(&mut *self.by_text.lock().unwrap_or_else(|e| e.into_inner()));
        (self.total.load(Ordering::SeqCst), by)
    }
}

/// The subscriber layer feeding [`Statements`]: interested in `sqlx::query`
/// events only, so nothing else is recorded.
struct CountLayer(Arc<Statements>);

#[derive(Default)]
struct StatementText {
    summary: String,
    statement: String,
}

impl Visit for StatementText {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "summary" => self.summary = value.to_owned(),
            "db.statement" => self.statement = value.to_owned(),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "summary" {
            self.summary = format!("{value:?}");
        }
    }
}

/// A statement's text, whitespace collapsed, cut to 110 characters.
fn statement_key(text: &StatementText) -> String {
    let source = if text.statement.trim().is_empty() {
        &text.summary
    } else {
        &text.statement
    };
    let collapsed: Vec<&str> = source.split_whitespace().collect();
    collapsed.join(" ").chars().take(110).collect()
}

impl<S: tracing::Subscriber> Layer<S> for CountLayer {
    fn register_callsite(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if metadata.target() == "sqlx::query" {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn enabled(&self, metadata: &tracing::Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        metadata.target() == "sqlx::query"
    }

    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        if !self.0.active.load(Ordering::Relaxed) {
            return;
        }
        let mut text = StatementText::default();
        event.record(&mut text);
        self.0.total.fetch_add(1, Ordering::Relaxed);
        *self
            .0
            .by_text
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(statement_key(&text))
            .or_insert(0) += 1;
    }
}

// ---------------------------------------------------------------------------
// Observing terminal sagas without polling the database.

type Waiters = Arc<Mutex<HashMap<SagaId, oneshot::Sender<(SagaState, Instant)>>>>;

/// [`PgSagaStore`] with a hook: a commit that leaves a saga terminal (or
/// `CompensationFailed`) tells the saga's waiter, in process.
#[derive(Clone)]
struct Watched {
    inner: PgSagaStore,
    waiters: Waiters,
}

impl Watched {
    fn wait_for(&self, id: SagaId) -> oneshot::Receiver<(SagaState, Instant)> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        rx
    }
}

impl SagaStore for Watched {
    async fn now(&self) -> Result<DateTime<Utc>, SagaError> {
        self.inner.now().await
    }

    async fn create(&self, new: NewSaga) -> Result<SagaInstance, SagaError> {
        self.inner.create(new).await
    }

    async fn load(&self, id: SagaId) -> Result<Option<SagaInstance>, SagaError> {
        self.inner.load(id).await
    }

    async fn history(&self, id: SagaId) -> Result<Vec<HistoryEntry>, SagaError> {
        self.inner.history(id).await
    }

    async fn count_by_state(&self) -> Result<Vec<vextrus_core::saga::SagaCount>, SagaError> {
        self.inner.count_by_state().await
    }

    async fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaInstance>, SagaError> {
        self.inner.list(filter).await
    }

    async fn claim_due(
        &self,
        worker: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Claim>, SagaError> {
        self.inner.claim_due(worker, lease, limit).await
    }

    async fn claim(&self, id: SagaId, worker: &str, lease: Duration) -> Result<Claim, SagaError> {
        self.inner.claim(id, worker, lease).await
    }

    async fn commit(&self, transition: SagaTransition) -> Result<SagaInstance, SagaError> {
        let inst = self.inner.commit(transition).await?;
        Ok(self.watched(inst))
    }

    async fn commit_claiming(
        &self,
        transition: SagaTransition,
        read: &SagaInstance,
        lease: Duration,
    ) -> Result<SagaInstance, SagaError> {
        let inst = self.inner.commit_claiming(transition, read, lease).await?;
        Ok(self.watched(inst))
    }

    async fn release(&self, id: SagaId, token: u64) -> Result<(), SagaError> {
        self.inner.release(id, token).await
    }

    async fn message_handled(&self, message_id: Uuid) -> Result<bool, SagaError> {
        self.inner.message_handled(message_id).await
    }
}

impl Watched {
    /// Tells the saga's waiter if `inst` is terminal (or `CompensationFailed`).
    fn watched(&self, inst: SagaInstance) -> SagaInstance {
        if inst.state.is_terminal() || inst.state == SagaState::CompensationFailed {
            let waiter = self
                .waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&inst.id);
            if let Some(tx) = waiter {
                let _ = tx.send((inst.state, Instant::now()));
            }
        }
        inst
    }
}

// ---------------------------------------------------------------------------
// Settings and results.

#[derive(Debug, Clone)]
struct Settings {
    pg: String,
    nats: String,
    orders: usize,
    concurrency: usize,
    runs: usize,
    transports: Vec<String>,
    top: usize,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Settings {
    fn from_env() -> Self {
        Self {
            pg: env_or(
                "SAGA_BENCH_PG",
                "postgres://postgres@127.0.0.1:5432".to_owned(),
            )
            .trim_end_matches('/')
            .to_owned(),
            nats: env_or("SAGA_BENCH_NATS", "nats://127.0.0.1:4222".to_owned()),
            orders: env_or("SAGA_BENCH_ORDERS", 1000usize).max(1),
            concurrency: env_or("SAGA_BENCH_CONCURRENCY", 64usize).max(1),
            runs: env_or("SAGA_BENCH_RUNS", 3usize).max(1),
            transports: env_or("SAGA_BENCH_TRANSPORTS", "inprocess,nats".to_owned())
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            top: env_or("SAGA_BENCH_TOP", 25usize),
        }
    }
}

/// One run's numbers.
#[derive(Debug, Clone, Default)]
struct RunResult {
    completed: usize,
    not_completed: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    xacts: u64,
    statements: u64,
    commits: u64,
    idle_xacts_per_s: f64,
    idle_statements_per_s: f64,
    raw16: f64,
    raw32: f64,
    /// Cores used during the measured phase: bench, PostgreSQL, NATS, other.
    cpu: (f64, f64, f64, f64),
    by_text: HashMap<String, u64>,
}

impl RunResult {
    fn orders(&self) -> f64 {
        (self.completed + self.not_completed).max(1) as f64
    }
    fn rate(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn xacts_per_saga(&self) -> f64 {
        self.xacts as f64 / self.orders()
    }
    fn statements_per_saga(&self) -> f64 {
        self.statements as f64 / self.orders()
    }
    fn commits_per_saga(&self) -> f64 {
        self.commits as f64 / self.orders()
    }
    fn raw(&self) -> f64 {
        self.raw16.max(self.raw32)
    }
    fn bound(&self) -> f64 {
        self.raw() / self.xacts_per_saga().max(1e-9)
    }
    fn ratio(&self) -> f64 {
        self.rate() / self.bound().max(1e-9)
    }
    /// The bound counting only explicit transactions (`COMMIT`s), not
    /// autocommit statements.
    fn bound_tx(&self) -> f64 {
        self.raw() / self.commits_per_saga().max(1e-9)
    }
    fn ratio_tx(&self) -> f64 {
        self.rate() / self.bound_tx().max(1e-9)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

// ---------------------------------------------------------------------------
// Where the CPU goes.

/// CPU time (clock ticks) per group: this process, PostgreSQL's processes,
/// nats-server, everything else; from `/proc/<pid>/stat` (Linux; empty
/// elsewhere). Processes that start and end between two snapshots are
/// missed.
#[derive(Debug, Clone, Copy, Default)]
struct CpuTicks {
    bench: u64,
    postgres: u64,
    nats: u64,
    other: u64,
}

impl CpuTicks {
    fn now() -> HashMap<u32, (String, u64)> {
        let mut out = HashMap::new();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return out;
        };
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let comm = stat[open + 1..close].to_owned();
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            // utime and stime: fields 14 and 15 of stat, 11 and 12 after comm.
            let ticks = fields
                .get(11)
                .zip(fields.get(12))
                .and_then(|(u, s)| Some(u.parse::<u64>().ok()? + s.parse::<u64>().ok()?))
                .unwrap_or(0);
            out.insert(pid, (comm, ticks));
        }
        out
    }

    /// The ticks spent between two snapshots, per group.
    fn between(a: &HashMap<u32, (String, u64)>, b: &HashMap<u32, (String, u64)>) -> Self {
        let me = std::process::id();
        let mut t = CpuTicks::default();
        for (pid, (comm, ticks)) in b {
            let before = match a.get(pid) {
                Some((c, v)) if c == comm => *v,
                _ => 0,
            };
            let d = ticks.saturating_sub(before);
            if *pid == me {
                t.bench += d;
            } else if comm == "postgres" || comm == "postmaster" {
                t.postgres += d;
            } else if comm.starts_with("nats-server") {
                t.nats += d;
            } else {
                t.other += d;
            }
        }
        t
    }

    /// Cores used over `elapsed`: (bench, postgres, nats, other).
    fn cores(&self, elapsed: Duration) -> (f64, f64, f64, f64) {
        // Linux reports in USER_HZ, 100 on every common configuration.
        let per = |v: u64| v as f64 / 100.0 / elapsed.as_secs_f64().max(1e-9);
        (
            per(self.bench),
            per(self.postgres),
            per(self.nats),
            per(self.other),
        )
    }
}

// ---------------------------------------------------------------------------
// PostgreSQL helpers.

async fn admin(settings: &Settings) -> Res<PgConnection> {
    Ok(PgConnection::connect(&format!("{}/postgres", settings.pg)).await?)
}

/// Committed and rolled back transactions of `db` so far.
async fn xacts(conn: &mut PgConnection, db: &str) -> Res<(u64, u64)> {
    // A fresh snapshot of the statistics each time.
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *conn)
        .await?;
    let (c, r): (i64, i64) = sqlx::query_as(
        "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = $1",
    )
    .bind(db)
    .fetch_one(&mut *conn)
    .await?;
    Ok((u64::try_from(c).unwrap_or(0), u64::try_from(r).unwrap_or(0)))
}

/// Commits/s of single-row INSERT transactions from `tasks` tasks on a pool
/// of that size, for `window`. The pool checks connections before use as
/// the saga's pools do (a ping only after a second idle), so the baseline
/// pays the same per-acquire cost as the transactions it is compared with.
async fn raw_commit_rate(url: &str, tasks: u32, window: Duration) -> Res<f64> {
    let pool = vextrus_postgres::ping_idle_connections(
        sqlx::postgres::PgPoolOptions::new(),
        vextrus_postgres::PgStoreConfig::default().ping_idle_after,
    )
    .max_connections(tasks)
    .min_connections(tasks)
    .connect(url)
    .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_raw_commit (id bigserial PRIMARY KEY, task int NOT NULL, payload text NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let began = Instant::now();
    let mut handles = Vec::new();
    for task in 0..tasks {
        let pool = pool.clone();
        let stop = stop.clone();
        let commits = commits.clone();
        handles.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut tx = pool.begin().await?;
                sqlx::query("INSERT INTO bench_raw_commit (task, payload) VALUES ($1, $2)")
                    .bind(task as i32)
                    .bind("x")
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                commits.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, sqlx::Error>(())
        }));
    }
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.await??;
    }
    let rate = commits.load(Ordering::Relaxed) as f64 / began.elapsed().as_secs_f64();
    pool.close().await;
    Ok(rate)
}

fn sku(i: usize) -> Res<Sku> {
    Ok(Sku::new(format!("SKU-{i:04}"))?)
}

/// SplitMix64 for order contents.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n.max(1)
    }
}

const SKUS: usize = 20;

/// The order `n`: its Place command and its stock lines.
fn order(rng: &mut Rng, n: usize) -> Res<(AggregateId, OrderCommand, Vec<StockLine>)> {
    let currencies = [Currency::USD, Currency::EUR, Currency::BDT];
    let currency = currencies[rng.below(3) as usize];
    let mut lines = Vec::new();
    for _ in 0..1 + rng.below(3) {
        lines.push(OrderLine {
            sku: sku(rng.below(SKUS as u64) as usize)?,
            quantity: Quantity::new(1 + rng.below(3) as i64)?,
            unit_price: Money::from_minor(100 + rng.below(20_000) as i64, currency),
        });
    }
    let stock = lines
        .iter()
        .map(|l| StockLine {
            sku: l.sku.clone(),
            quantity: l.quantity,
        })
        .collect();
    let place = OrderCommand::Place {
        customer: format!("customer-{}", rng.below(500)),
        currency,
        lines,
    };
    Ok((AggregateId::new(format!("order-{n:06}"))?, place, stock))
}

// ---------------------------------------------------------------------------
// One run.

async fn one_run(settings: &Settings, transport: &str, run: usize) -> Res<RunResult> {
    let dbname = format!(
        "saga_bench_{}_{}_{run}",
        std::process::id(),
        transport.replace(|c: char| !c.is_ascii_alphanumeric(), "")
    );
    let mut admin = admin(settings).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {dbname}"))
        .execute(&mut admin)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {dbname}"))
        .execute(&mut admin)
        .await?;
    let url = format!("{}/{dbname}", settings.pg);
    let result = match transport {
        "inprocess" => measure(settings, &url, &dbname, &mut admin, InProcessBroker::new()).await,
        "nats" => {
            let namespace = format!("sagabench{}x{run}", Uuid::now_v7().simple());
            let broker = NatsBroker::connect(&settings.nats, &namespace).await?;
            measure(settings, &url, &dbname, &mut admin, broker).await
        }
        other => Err(format!("unknown transport {other:?} (inprocess, nats)").into()),
    };
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {dbname} WITH (FORCE)"))
        .execute(&mut admin)
        .await;
    result
}

async fn measure<B: Broker>(
    settings: &Settings,
    url: &str,
    dbname: &str,
    admin: &mut PgConnection,
    broker: B,
) -> Res<RunResult> {
    let counter = statements();
    // The stores, as run_demo builds them on PostgreSQL, plus the durable
    // saga store over the same database's outbox.
    let store = PgEventStore::connect(url).await?;
    store.migrate().await?;
    let outbox = PgOutbox::new(store.clone());
    outbox.migrate().await?;
    let sagas = Watched {
        inner: PgSagaStore::new(outbox.clone(), REPLIES),
        waiters: Arc::default(),
    };
    let faults = Arc::new(FaultInjector::disabled());
    let db = Database::connect_with(url, Durability::Full, 16).await?;
    let sales = Arc::new(Sales::new(store.clone()));
    let inventory = Arc::new(Inventory::new(db.clone(), faults.clone()));
    let payment = Arc::new(Payment::new(db.clone(), faults.clone()));
    let shipping = Arc::new(Shipping::new(db.clone(), faults.clone()));
    let accounting = Arc::new(Accounting::new(db.clone(), faults.clone()));
    inventory.migrate().await?;
    payment.migrate().await?;
    shipping.migrate().await?;
    accounting.migrate().await?;
    for i in 0..SKUS {
        let line = StockLine {
            sku: sku(i)?,
            quantity: Quantity::new(1_000_000)?,
        };
        inventory
            .receive(&IdempotencyKey::new(format!("initial-stock/{i}"))?, line)
            .await?;
    }

    let registry = SagaRegistry::new();
    registry.register(definition(
        sales.clone(),
        faults.clone(),
        StepPolicy::default(),
    ))?;
    let serve = ServeConfig::default();
    // One database, one outbox table: the orchestrator's relay publishes
    // the participants' replies too (one relay per database, not per role).
    let participants = vec![
        start_participant_served_by_shared_relay(&broker, inventory, INVENTORY, serve).await?,
        start_participant_served_by_shared_relay(&broker, payment, PAYMENT, serve).await?,
        start_participant_served_by_shared_relay(&broker, shipping, SHIPPING, serve).await?,
        start_participant_served_by_shared_relay(&broker, accounting, ACCOUNTING, serve).await?,
    ];
    let orchestrators: Vec<Orchestrator<Watched>> = (0..2)
        .map(|i| {
            let mut c = OrchestratorConfig::worker(format!("bench-worker-{i}"));
            c.batch_size = settings.concurrency.max(16);
            // Starts wake the worker at once; replies drive their sagas
            // on; the poll only finds timers (none without faults) and
            // sagas a dead worker left.
            c.poll_interval = ORCHESTRATOR_POLL;
            Orchestrator::with_config(sagas.clone(), registry.clone(), c)
        })
        .collect();
    let transport_side = start_orchestrator_with(
        &broker,
        orchestrators[0].clone(),
        outbox,
        // The one relay of the run's database: commands and replies.
        listening_relay_config(format!("bench-relay-{}", std::process::id())),
    )
    .await?;
    let stop = Arc::new(tokio::sync::Notify::new());
    let workers: Vec<_> = orchestrators
        .iter()
        .cloned()
        .map(|o| {
            let stop = stop.clone();
            tokio::spawn(async move { o.run(async move { stop.notified().await }).await })
        })
        .collect();

    // The idle cost: what the running system does with nothing to do.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let idle_window = Duration::from_secs(3);
    let (x0, _) = xacts(admin, dbname).await?;
    counter.start();
    tokio::time::sleep(idle_window).await;
    let (idle_statements, _) = counter.stop();
    let (x1, _) = xacts(admin, dbname).await?;
    let idle_xacts_per_s = x1.saturating_sub(x0) as f64 / idle_window.as_secs_f64();
    let idle_statements_per_s = idle_statements as f64 / idle_window.as_secs_f64();

    // The measured phase.
    let (start_xacts, start_rollbacks) = xacts(admin, dbname).await?;
    counter.start();
    let cpu_before = CpuTicks::now();
    let began = Instant::now();
    let gate = Arc::new(Semaphore::new(settings.concurrency));
    let mut rng = Rng(0x5a6a_6265_6e63_6821);
    let mut tasks = Vec::with_capacity(settings.orders);
    for n in 0..settings.orders {
        let (order_id, place, lines) = order(&mut rng, n)?;
        let permit = gate.clone().acquire_owned().await?;
        let sales = sales.clone();
        let orchestrator = orchestrators[n % orchestrators.len()].clone();
        let sagas = sagas.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            sales
                .execute(&order_id, place, &CommandContext::new())
                .await?;
            let data = OrderToCashData {
                order_id,
                lines,
                total: None,
                payment_id: None,
                shipment_id: None,
                invoice_entry_id: None,
            };
            let id = SagaId::new();
            let done = sagas.wait_for(id);
            let started = Instant::now();
            orchestrator.start_with_id(id, SAGA_TYPE, &data).await?;
            let (state, at) = tokio::time::timeout(Duration::from_secs(120), done).await??;
            Ok::<_, BoxError>((state, at.duration_since(started), at))
        }));
    }
    let mut latencies = Vec::with_capacity(settings.orders);
    let (mut completed, mut not_completed) = (0, 0);
    let mut last = began;
    for t in tasks {
        match t.await? {
            Ok((state, latency, at)) => {
                if state == SagaState::Completed {
                    completed += 1;
                } else {
                    not_completed += 1;
                    eprintln!("a saga ended {state:?}");
                }
                latencies.push(latency);
                last = last.max(at);
            }
            Err(e) => {
                not_completed += 1;
                eprintln!("a saga did not finish: {e}");
            }
        }
    }
    let elapsed = last.duration_since(began);
    let cpu = CpuTicks::between(&cpu_before, &CpuTicks::now()).cores(began.elapsed());
    let (statements, by_text) = counter.stop();

    // Stop everything, close every pool (each backend flushes its counters
    // when its connection ends), then read the transactions.
    stop.notify_waiters();
    for w in workers {
        w.abort();
    }
    transport_side.stop().await?;
    for p in participants {
        p.stop().await?;
    }
    store.pool().close().await;
    db.pool().close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (end_xacts, end_rollbacks) = xacts(admin, dbname).await?;
    // The work after the last saga (stopping) ran at most at the idle rate.
    let tail = last.elapsed().as_secs_f64() * idle_xacts_per_s;
    let xacts = (end_xacts.saturating_sub(start_xacts) as f64 - tail).max(0.0) as u64;
    let commits: u64 = by_text
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("COMMIT"))
        .map(|(_, v)| *v)
        .sum();
    // sqlx sends BEGIN without logging it: one per COMMIT or rollback.
    let rollbacks = end_rollbacks.saturating_sub(start_rollbacks);
    let mut by_text = by_text;
    by_text.insert(
        "BEGIN (not logged by sqlx: one per COMMIT and per rollback)".into(),
        commits + rollbacks,
    );
    let statements = statements + commits + rollbacks;

    // The bound, in the same run and database.
    let raw16 = raw_commit_rate(url, 16, Duration::from_secs(3)).await?;
    let raw32 = raw_commit_rate(url, 32, Duration::from_secs(3)).await?;

    latencies.sort();
    Ok(RunResult {
        completed,
        not_completed,
        elapsed,
        p50: percentile(&latencies, 50.0),
        p99: percentile(&latencies, 99.0),
        xacts,
        statements,
        commits,
        idle_xacts_per_s,
        idle_statements_per_s,
        raw16,
        raw32,
        cpu,
        by_text,
    })
}

fn statements() -> Arc<Statements> {
    static COUNTER: std::sync::OnceLock<Arc<Statements>> = std::sync::OnceLock::new();
    COUNTER
        .get_or_init(|| {
            let counter = Arc::new(Statements::default());
            let subscriber = Registry::default().with(CountLayer(counter.clone()));
            tracing::subscriber::set_global_default(subscriber)
                .unwrap_or_else(|e| panic!("the bench installs the only subscriber: {e}"));
            counter
        })
        .clone()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn server_settings(settings: &Settings) -> Res<String> {
    let mut admin = admin(settings).await?;
    let mut out = Vec::new();
    for name in [
        "server_version",
        "synchronous_commit",
        "fsync",
        "wal_sync_method",
        "shared_buffers",
        "max_connections",
    ] {
        let v: String = sqlx::query_scalar(&format!("SHOW {name}"))
            .fetch_one(&mut admin)
            .await?;
        out.push(format!("{name}={v}"));
    }
    Ok(out.join(" "))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

#[tokio::main]
async fn main() -> Res<()> {
    let settings = Settings::from_env();
    statements();
    println!(
        "saga_bench: {} orders, {} in flight, {} runs per transport; {}; cpus {}; load average {}",
        settings.orders,
        settings.concurrency,
        settings.runs,
        server_settings(&settings).await?,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    println!(
        "{:<9} {:>3} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8} {:>6} {:>8} {:>7} {:>9} {:>6} cpu bench/pg/nats/other",
        "transport",
        "run",
        "done",
        "sagas/s",
        "p50 ms",
        "p99 ms",
        "xact/sg",
        "stmt/sg",
        "COMMIT/sg",
        "raw16 c/s",
        "raw32 c/s",
        "bound",
        "ratio",
        "bound_tx",
        "ratio_tx",
        "idle x/s",
        "load1",
    );
    let mut failed = false;
    for transport in &settings.transports {
        let mut results = Vec::new();
        for run in 0..settings.runs {
            let r = one_run(&settings, transport, run).await?;
            failed |= r.not_completed > 0;
            println!(
                "{:<9} {:>3} {:>6} {:>8.1} {:>8.1} {:>8.1} {:>8.2} {:>8.2} {:>9.2} {:>9.0} {:>9.0} {:>8.1} {:>6.3} {:>8.1} {:>7.3} {:>9.0} {:>6} {:.2}/{:.2}/{:.2}/{:.2}",
                transport,
                run,
                r.completed,
                r.rate(),
                ms(r.p50),
                ms(r.p99),
                r.xacts_per_saga(),
                r.statements_per_saga(),
                r.commits_per_saga(),
                r.raw16,
                r.raw32,
                r.bound(),
                r.ratio(),
                r.bound_tx(),
                r.ratio_tx(),
                r.idle_xacts_per_s,
                load_average().split(' ').next().unwrap_or("?"),
                r.cpu.0,
                r.cpu.1,
                r.cpu.2,
                r.cpu.3,
            );
            results.push(r);
        }
        let med = |f: &dyn Fn(&RunResult) -> f64| median(results.iter().map(f).collect());
        println!(
            "{:<9} med {:>6} {:>8.1} {:>8.1} {:>8.1} {:>8.2} {:>8.2} {:>9.2} {:>9.0} {:>9.0} {:>8.1} {:>6.3} {:>8.1} {:>7.3} {:>9.0}   (idle statements/s {:.0}; idle polling at that rate over the run: {:.1} statements/saga, {:.1} xacts/saga)",
            transport,
            "",
            med(&|r| r.rate()),
            med(&|r| ms(r.p50)),
            med(&|r| ms(r.p99)),
            med(&|r| r.xacts_per_saga()),
            med(&|r| r.statements_per_saga()),
            med(&|r| r.commits_per_saga()),
            med(&|r| r.raw16),
            med(&|r| r.raw32),
            med(&|r| r.bound()),
            med(&|r| r.ratio()),
            med(&|r| r.bound_tx()),
            med(&|r| r.ratio_tx()),
            med(&|r| r.idle_xacts_per_s),
            med(&|r| r.idle_statements_per_s),
            med(&|r| r.idle_statements_per_s * r.elapsed.as_secs_f64() / r.orders()),
            med(&|r| r.idle_xacts_per_s * r.elapsed.as_secs_f64() / r.orders()),
        );
        // Where the statements go: per saga, summed over this transport's runs.
        let mut total: HashMap<String, u64> = HashMap::new();
        let mut orders = 0.0;
        for r in &results {
            orders += r.orders();
            for (k, v) in &r.by_text {
                *total.entry(k.clone()).or_insert(0) += v;
            }
        }
        let mut rows: Vec<_> = total.into_iter().collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.1));
        println!("  statements per saga ({transport}, all runs):");
        for (text, n) in rows.iter().take(settings.top) {
            println!("  {:>7.2}  {text}", *n as f64 / orders);
        }
        let rest: u64 = rows.iter().skip(settings.top).map(|(_, n)| n).sum();
        println!("  {:>7.2}  (the rest)", rest as f64 / orders);
    }
    if failed {
        std::process::exit(1);
    }
    Ok(())
}
