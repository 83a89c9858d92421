//! The main job: place N orders, drive every saga to a terminal state, then
//! measure and check.
//!
//! [`run_demo`] builds the whole system in one process on the embedded
//! default: each participant on its own SQLite file (WAL,
//! `synchronous=NORMAL`: commits survive kill -9), Sales on a
//! [`SqliteEventStore`], the orchestrator on the saga engine's store, and
//! the participants connected to it over the in-process transport
//! ([`InProcessTransport`](vextrus_core::transport::InProcessTransport)), or
//! over NATS JetStream or Kafka when `broker` is set. It
//! stocks the SKUs, places `orders` orders with at most `concurrency` sagas
//! in flight, waits until every saga is terminal (or `deadline` passes),
//! and returns a [`DemoReport`]: outcomes, throughput, saga and per-step
//! latency percentiles, and the [`InvariantReport`].

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteSynchronous};
use vextrus_core::outbox::InMemoryOutbox;
use vextrus_core::saga::{
    HistoryKind, InMemorySagaStore, Orchestrator, OrchestratorConfig, SagaId, SagaRegistry,
    SagaState as EngineState, SagaStore,
};
use vextrus_core::{EventAppender, EventReader, SnapshotStore};
use vextrus_kernel::{AggregateId, CommandContext, Currency, HasErrorKind, Money, Quantity, Sku};
use vextrus_postgres::PgEventStore;
use vextrus_sqlite::SqliteEventStore;

use crate::accounting::Accounting;
use crate::db::{Database, Durability, IdempotencyKey};
use crate::error::{Error, Result};
use crate::faults::{FaultConfig, FaultInjector, InjectedCounts};
use crate::invariants::{InvariantReport, SagaRecord, SagaState, SystemSnapshot, check};
use crate::inventory::{Inventory, StockLine};
use crate::node::{
    Broker, BrokerUrl, InProcessBroker, KafkaBroker, NatsBroker, Role, RunningParticipant,
    start_orchestrator, start_participant,
};
use crate::participant::{Participant, ReplyOutbox, ServeConfig};
use crate::payment::Payment;
use crate::saga::{
    ACCOUNTING, INVENTORY, OrderToCashData, PAYMENT, REPLIES, SAGA_TYPE, SHIPPING, STEPS,
    StepPolicy, definition,
};
use crate::sales::{OrderCommand, OrderLine, Sales};
use crate::shipping::Shipping;

/// How a demo run is set up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DemoConfig {
    /// How many orders to place.
    pub orders: usize,
    /// The seed of every random choice (order contents, injected failures).
    pub seed: u64,
    /// Failure rates.
    pub faults: FaultConfig,
    /// Where the SQLite files go; `None`: a temporary directory, deleted
    /// after the run. Ignored when `database_url` is set.
    pub data_dir: Option<PathBuf>,
    /// A `postgres://` URL: Sales' event store and every participant's
    /// tables go to this database instead of SQLite files. (The saga store
    /// stays in the orchestrator's process until a SQL saga store exists.)
    pub database_url: Option<String>,
    /// How many sagas run at once.
    pub concurrency: usize,
    /// How many SKUs the catalogue has.
    pub skus: usize,
    /// Units of each SKU in stock at the start.
    pub initial_stock: i64,
    /// Orchestrator workers (each claims due sagas; replies are shared).
    pub workers: usize,
    /// Step timeouts and retry budgets.
    #[serde(skip)]
    pub policy: StepPolicy,
    /// Give up waiting for terminal sagas after this long.
    pub deadline: Duration,
    /// Command types forced to fail as business failures (see
    /// [`FaultInjector::force_failure`]); empty for a normal run.
    pub forced_failures: Vec<String>,
    /// Whether the report carries every saga's timeline.
    pub keep_timelines: bool,
    /// The broker: `None` (in this process), `nats://host:port` or
    /// `kafka://host:port` (see [`BrokerUrl`]).
    pub broker: Option<String>,
    /// The namespace of the broker's destinations; processes of one system
    /// share it. `None`: a fresh one per run (so runs never mix).
    pub namespace: Option<String>,
    /// When set, the participants are not started here: they run elsewhere
    /// (`vextrus serve --role ...`) on the same databases and broker.
    pub remote_participants: bool,
}

impl Default for DemoConfig {
    /// 3,000 orders, seed 42, default failure rates, 64 sagas in flight, 20
    /// SKUs with enough stock for most orders, 2 workers, 5 minute deadline.
    fn default() -> Self {
        Self {
            orders: 3_000,
            seed: 42,
            faults: FaultConfig::default(),
            data_dir: None,
            database_url: None,
            concurrency: 64,
            skus: 20,
            initial_stock: 1_000,
            workers: 2,
            policy: StepPolicy::default(),
            deadline: Duration::from_secs(300),
            forced_failures: Vec::new(),
            keep_timelines: false,
            broker: None,
            namespace: None,
            remote_participants: false,
        }
    }
}

/// Progress, reported to the callback while the demo runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DemoProgress {
    /// Orders placed (sagas started).
    pub started: usize,
    /// Sagas that reached a terminal state.
    pub finished: usize,
    /// Orders to place in all.
    pub total: usize,
}

/// Latency percentiles of one step (first start to success).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLatency {
    /// The step's name.
    pub step: String,
    /// How many sagas completed the step.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
}

/// One saga's timeline: the transitions that name a step, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaTimeline {
    /// The saga.
    pub saga_id: String,
    /// Its order.
    pub order_id: String,
    /// Its state at the end.
    pub state: SagaState,
    /// `(transition, step name)`, such as `("compensation_succeeded", "authorize_payment")`.
    pub events: Vec<(String, String)>,
}

/// What a demo run did and whether the invariants held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DemoReport {
    /// The seed used.
    pub seed: u64,
    /// Orders placed.
    pub orders: usize,
    /// Sagas completed.
    pub completed: usize,
    /// Sagas compensated.
    pub compensated: usize,
    /// Sagas failed with nothing to compensate (e.g. rejected orders).
    pub failed: usize,
    /// Sagas not terminal when the run ended (each is also a violation).
    pub not_terminal: usize,
    /// Wall-clock time from the first order to the last terminal saga.
    pub elapsed: Duration,
    /// Terminal sagas per second.
    pub throughput: f64,
    /// Median saga latency (created to last update).
    pub saga_p50: Duration,
    /// 99th-percentile saga latency.
    pub saga_p99: Duration,
    /// Per-step latency, in step order.
    pub steps: Vec<StepLatency>,
    /// Step and compensation timeouts recorded in the sagas' timelines.
    pub timeouts: usize,
    /// Crashes and delayed replies the failure injector caused.
    pub injected: InjectedCounts,
    /// Every saga's timeline, if [`DemoConfig::keep_timelines`] was set.
    pub timelines: Vec<SagaTimeline>,
    /// The invariant check.
    pub invariants: InvariantReport,
}

impl DemoReport {
    /// Whether every invariant held.
    pub fn passed(&self) -> bool {
        self.invariants.is_ok()
    }
}

impl std::fmt::Display for DemoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "orders: {} (seed {})", self.orders, self.seed)?;
        writeln!(
            f,
            "sagas: {} completed, {} compensated, {} failed, {} not terminal",
            self.completed, self.compensated, self.failed, self.not_terminal
        )?;
        writeln!(
            f,
            "elapsed: {:.2} s, throughput: {:.1} sagas/s",
            self.elapsed.as_secs_f64(),
            self.throughput
        )?;
        writeln!(
            f,
            "injected: {} crashes, {} delayed replies; {} step timeouts",
            self.injected.crashes, self.injected.delays, self.timeouts
        )?;
        writeln!(
            f,
            "saga latency: p50 {:.1} ms, p99 {:.1} ms",
            self.saga_p50.as_secs_f64() * 1e3,
            self.saga_p99.as_secs_f64() * 1e3
        )?;
        for s in &self.steps {
            writeln!(
                f,
                "  {:<18} n={:<6} p50 {:>7.1} ms  p99 {:>7.1} ms",
                s.step,
                s.count,
                s.p50.as_secs_f64() * 1e3,
                s.p99.as_secs_f64() * 1e3
            )?;
        }
        write!(f, "{}", self.invariants)
    }
}

/// A progress callback.
pub type ProgressFn = Arc<dyn Fn(DemoProgress) + Send + Sync>;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// SplitMix64, for the order generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn sku_name(i: usize) -> Sku {
    // "SKU-0001" is always a valid SKU.
    Sku::new(format!("SKU-{i:04}")).unwrap_or_else(|_| unreachable_sku())
}

fn unreachable_sku() -> Sku {
    Sku::new("SKU").unwrap_or_else(|_| panic!("SKU is a valid SKU"))
}

/// The participants and their stores.
struct System<S> {
    sales: Arc<Sales<S>>,
    inventory: Arc<Inventory>,
    payment: Arc<Payment>,
    shipping: Arc<Shipping>,
    accounting: Arc<Accounting>,
    /// Each participant's reply outbox, in the order inventory, payment,
    /// shipping, accounting.
    outboxes: Vec<ReplyOutbox>,
}

fn store_error(e: vextrus_core::EventStoreError) -> Error {
    Error::Repository(vextrus_kernel::RepositoryError::storage(e))
}

impl<S> System<S> {
    async fn migrate(&mut self) -> Result<()> {
        self.inventory.migrate().await?;
        self.payment.migrate().await?;
        self.shipping.migrate().await?;
        self.accounting.migrate().await?;
        for db in [
            self.inventory.database(),
            self.payment.database(),
            self.shipping.database(),
            self.accounting.database(),
        ] {
            self.outboxes.push(ReplyOutbox::open(db).await?);
        }
        Ok(())
    }

    /// Starts the participants `role` runs on `broker`.
    async fn start_participants<B: Broker>(
        &self,
        broker: &B,
        role: Role,
    ) -> Result<Vec<RunningParticipant>> {
        let serve = ServeConfig::default();
        let mut running = Vec::new();
        if role.runs(Role::Inventory) {
            running.push(
                start_participant(
                    broker,
                    self.inventory.clone(),
                    &self.outboxes[0],
                    INVENTORY,
                    serve,
                )
                .await?,
            );
        }
        if role.runs(Role::Payment) {
            running.push(
                start_participant(
                    broker,
                    self.payment.clone(),
                    &self.outboxes[1],
                    PAYMENT,
                    serve,
                )
                .await?,
            );
        }
        if role.runs(Role::Shipping) {
            running.push(
                start_participant(
                    broker,
                    self.shipping.clone(),
                    &self.outboxes[2],
                    SHIPPING,
                    serve,
                )
                .await?,
            );
        }
        if role.runs(Role::Accounting) {
            running.push(
                start_participant(
                    broker,
                    self.accounting.clone(),
                    &self.outboxes[3],
                    ACCOUNTING,
                    serve,
                )
                .await?,
            );
        }
        Ok(running)
    }
}

async fn build_postgres(url: &str, faults: Arc<FaultInjector>) -> Result<System<PgEventStore>> {
    let store = PgEventStore::connect(url).await.map_err(store_error)?;
    store.migrate().await.map_err(store_error)?;
    let db = Database::connect_with(url, Durability::Full, 16).await?;
    let mut system = System {
        sales: Arc::new(Sales::new(store)),
        inventory: Arc::new(Inventory::new(db.clone(), faults.clone())),
        payment: Arc::new(Payment::new(db.clone(), faults.clone())),
        shipping: Arc::new(Shipping::new(db.clone(), faults.clone())),
        accounting: Arc::new(Accounting::new(db, faults)),
        outboxes: Vec::new(),
    };
    system.migrate().await?;
    Ok(system)
}

async fn build_sqlite(
    dir: &std::path::Path,
    faults: Arc<FaultInjector>,
) -> Result<System<SqliteEventStore>> {
    let db = |name: &str| dir.join(format!("{name}.db"));
    let options = SqliteConnectOptions::new()
        .filename(db("sales"))
        .create_if_missing(true);
    let store = SqliteEventStore::connect_with(
        SqliteEventStore::tune(options).synchronous(SqliteSynchronous::Normal),
        8,
    )
    .await
    .map_err(store_error)?;
    store.migrate().await.map_err(store_error)?;
    let open = |name: &'static str| {
        let path = db(name);
        async move { Database::sqlite_file(&path, Durability::Normal).await }
    };
    let mut system = System {
        sales: Arc::new(Sales::new(store)),
        inventory: Arc::new(Inventory::new(open("inventory").await?, faults.clone())),
        payment: Arc::new(Payment::new(open("payment").await?, faults.clone())),
        shipping: Arc::new(Shipping::new(open("shipping").await?, faults.clone())),
        accounting: Arc::new(Accounting::new(open("accounting").await?, faults)),
        outboxes: Vec::new(),
    };
    system.migrate().await?;
    Ok(system)
}

fn saga_error(e: vextrus_core::saga::SagaError) -> Error {
    Error::IllegalState {
        participant: "orchestrator",
        reason: e.to_string(),
    }
}

fn map_state(state: EngineState, step: Option<&str>) -> SagaState {
    match state {
        EngineState::Completed => SagaState::Completed,
        EngineState::Compensated => SagaState::Compensated,
        EngineState::Failed => SagaState::Failed,
        EngineState::CompensationFailed => SagaState::CompensationFailed,
        other => SagaState::InProgress(format!("{other:?} at {}", step.unwrap_or("?"))),
    }
}

/// Places `config.orders` orders and drives every saga to a terminal state
/// on the embedded default; see the [module docs](self).
///
/// ```
/// use vextrus_order_to_cash::demo::{DemoConfig, run_demo};
///
/// # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
/// let config = DemoConfig { orders: 20, ..DemoConfig::default() };
/// let report = run_demo(config, None).await.unwrap();
/// assert_eq!(report.completed + report.compensated + report.failed, 20);
/// assert!(report.passed(), "{report}");
/// # });
/// ```
pub async fn run_demo(config: DemoConfig, progress: Option<ProgressFn>) -> Result<DemoReport> {
    config.faults.validate()?;
    if config.skus == 0 || config.concurrency == 0 || config.workers == 0 {
        return Err(Error::invalid(
            "config",
            "skus, concurrency and workers must be at least 1",
        ));
    }
    let mut injector = FaultInjector::new(config.seed, config.faults);
    for command_type in &config.forced_failures {
        injector = injector.force_failure(command_type.clone());
    }
    let faults = Arc::new(injector);
    let broker = BrokerUrl::parse(config.broker.as_deref())?;
    if let Some(url) = &config.database_url {
        let system = build_postgres(url, faults.clone()).await?;
        return on_broker(config, system, faults, progress, broker).await;
    }
    let temp;
    let dir = match &config.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| Error::Database {
                participant: "demo",
                source: sqlx::Error::Io(e),
            })?;
            d.clone()
        }
        None => {
            temp = tempfile::tempdir().map_err(|e| Error::Database {
                participant: "demo",
                source: sqlx::Error::Io(e),
            })?;
            temp.path().to_path_buf()
        }
    };
    let system = build_sqlite(&dir, faults.clone()).await?;
    on_broker(config, system, faults, progress, broker).await
}

/// Runs the participants of `role` (`inventory`, `payment`, `shipping`,
/// `accounting`, or several through `all`) as a service until `shutdown`
/// resolves: each participant's serving loop and reply relay, on the
/// databases `config` names (`database_url`, or the SQLite files in
/// `data_dir`) and its broker and namespace. Failure injection follows
/// `config.faults` and `config.seed`. An orchestrator placing orders with
/// [`DemoConfig::remote_participants`] set drives them
/// (`vextrus serve --role orchestrator --orders N`).
pub async fn serve_participants(
    config: DemoConfig,
    role: Role,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    config.faults.validate()?;
    if role == Role::Orchestrator {
        return Err(Error::invalid(
            "role",
            "the orchestrator places orders: use run_demo with remote_participants",
        ));
    }
    let Some(namespace) = config.namespace.clone() else {
        return Err(Error::invalid(
            "namespace",
            "processes of one system must share a namespace",
        ));
    };
    let faults = Arc::new(FaultInjector::new(config.seed, config.faults));
    let system = if let Some(url) = &config.database_url {
        PartsOf::Pg(build_postgres(url, faults).await?)
    } else {
        let Some(dir) = &config.data_dir else {
            return Err(Error::invalid(
                "data_dir",
                "a service needs its database: a data directory or a PostgreSQL URL",
            ));
        };
        std::fs::create_dir_all(dir).map_err(|e| Error::Database {
            participant: "serve",
            source: sqlx::Error::Io(e),
        })?;
        PartsOf::Sqlite(build_sqlite(dir, faults).await?)
    };
    let running = match (BrokerUrl::parse(config.broker.as_deref())?, &system) {
        (BrokerUrl::InProcess, _) => {
            return Err(Error::invalid(
                "broker",
                "a service in its own process needs a real broker (nats:// or kafka://)",
            ));
        }
        (BrokerUrl::Nats(url), s) => {
            let broker = NatsBroker::connect(&url, &namespace).await?;
            s.start(&broker, role).await?
        }
        (BrokerUrl::Kafka(brokers), s) => {
            let broker = KafkaBroker::connect(&brokers, &namespace).await?;
            s.start(&broker, role).await?
        }
    };
    tracing::info!(role = role.as_str(), %namespace, parts = running.len(), "serving");
    shutdown.await;
    for p in running {
        p.stop().await?;
    }
    Ok(())
}

/// A system on either backend.
enum PartsOf {
    Sqlite(System<SqliteEventStore>),
    Pg(System<PgEventStore>),
}

impl PartsOf {
    async fn start<B: Broker>(&self, broker: &B, role: Role) -> Result<Vec<RunningParticipant>> {
        match self {
            PartsOf::Sqlite(s) => s.start_participants(broker, role).await,
            PartsOf::Pg(s) => s.start_participants(broker, role).await,
        }
    }
}

/// A fresh namespace for a run that was given none.
fn namespace(config: &DemoConfig) -> String {
    config
        .namespace
        .clone()
        .unwrap_or_else(|| format!("o2c-{}", uuid::Uuid::now_v7().simple()))
}

async fn on_broker<S>(
    config: DemoConfig,
    system: System<S>,
    faults: Arc<FaultInjector>,
    progress: Option<ProgressFn>,
    broker: BrokerUrl,
) -> Result<DemoReport>
where
    S: EventAppender + EventReader + SnapshotStore + Send + Sync + 'static,
{
    match broker {
        BrokerUrl::InProcess => {
            if config.remote_participants {
                return Err(Error::invalid(
                    "broker",
                    "participants in other processes need a real broker (nats:// or kafka://)",
                ));
            }
            drive(config, system, faults, progress, InProcessBroker::new()).await
        }
        BrokerUrl::Nats(url) => {
            let broker = NatsBroker::connect(&url, &namespace(&config)).await?;
            drive(config, system, faults, progress, broker).await
        }
        BrokerUrl::Kafka(brokers) => {
            let broker = KafkaBroker::connect(&brokers, &namespace(&config)).await?;
            drive(config, system, faults, progress, broker).await
        }
    }
}

async fn drive<S, B>(
    config: DemoConfig,
    system: System<S>,
    faults: Arc<FaultInjector>,
    progress: Option<ProgressFn>,
    broker: B,
) -> Result<DemoReport>
where
    S: EventAppender + EventReader + SnapshotStore + Send + Sync + 'static,
    B: Broker,
{
    // Order ids are derived from the seed, so a store that already holds
    // this seed's orders cannot be reused: say so instead of mixing runs.
    let first = AggregateId::new(format!("order-{}-{:06}", config.seed, 0))
        .map_err(|e| Error::invalid("order id", e.to_string()))?;
    if system.sales.load(&first).await?.is_some() {
        return Err(Error::invalid(
            "database",
            format!(
                "it already holds the orders of seed {}: use a fresh database or data directory, or another seed",
                config.seed
            ),
        ));
    }

    // Stock every SKU (keys make a re-run on the same files harmless).
    for i in 0..config.skus {
        let line = StockLine {
            sku: sku_name(i),
            quantity: Quantity::new(config.initial_stock.max(0))
                .map_err(|e| Error::invalid("initial_stock", e.to_string()))?,
        };
        let key = IdempotencyKey::new(format!("initial-stock/{i}"))?;
        // Stocking meets the same injected crashes: redeliver until done.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match system.inventory.receive(&key, line.clone()).await {
                Ok(_) => break,
                Err(e) if e.kind().is_retryable() && attempts < 100 => {}
                Err(e) => return Err(e),
            }
        }
    }

    // The saga store writes each transition's command into its outbox in
    // the same commit; a relay publishes them, the reply inbox takes the
    // participants' replies.
    let outbox = InMemoryOutbox::new();
    let store = InMemorySagaStore::with_outbox(outbox.clone(), REPLIES);
    let registry = SagaRegistry::new();
    registry
        .register(definition(
            system.sales.clone(),
            faults.clone(),
            config.policy,
        ))
        .map_err(saga_error)?;
    let participants = if config.remote_participants {
        Vec::new()
    } else {
        system.start_participants(&broker, Role::All).await?
    };
    let orchestrators: Vec<Orchestrator<InMemorySagaStore>> = (0..config.workers)
        .map(|i| {
            let mut c = OrchestratorConfig::worker(format!("demo-worker-{i}"));
            c.batch_size = config.concurrency.max(16);
            c.poll_interval = Duration::from_millis(5);
            Orchestrator::with_config(store.clone(), registry.clone(), c)
        })
        .collect();
    let transport_side =
        start_orchestrator(&broker, orchestrators[0].clone(), outbox.clone()).await?;
    let stop = Arc::new(tokio::sync::Notify::new());
    let workers: Vec<_> = orchestrators
        .iter()
        .cloned()
        .map(|o| {
            let stop = stop.clone();
            tokio::spawn(async move { o.run(async move { stop.notified().await }).await })
        })
        .collect();

    // Place orders, keeping `concurrency` sagas in flight.
    let mut rng = Rng(config.seed ^ 0x6f72_6465_7273);
    let currencies = [Currency::USD, Currency::EUR, Currency::BDT];
    let started_at = Instant::now();
    let mut in_flight: Vec<SagaId> = Vec::new();
    let mut all: Vec<(SagaId, AggregateId)> = Vec::with_capacity(config.orders);
    let mut finished = 0usize;
    let mut last_finish = started_at;
    let orchestrator = orchestrators[0].clone();
    loop {
        while in_flight.len() < config.concurrency && all.len() < config.orders {
            let n = all.len();
            let order_id = AggregateId::new(format!("order-{}-{n:06}", config.seed))
                .map_err(|e| Error::invalid("order id", e.to_string()))?;
            let currency = currencies[rng.below(currencies.len() as u64) as usize];
            let line_count = 1 + rng.below(3) as usize;
            let mut lines = Vec::with_capacity(line_count);
            let invalid = faults.invalid_order(order_id.as_str());
            for i in 0..line_count {
                let price = 100 + rng.below(20_000) as i64;
                // An invalid order prices its first line in a currency
                // other than the order's: validation rejects it.
                let line_currency = if invalid && i == 0 {
                    if currency == Currency::USD {
                        Currency::EUR
                    } else {
                        Currency::USD
                    }
                } else {
                    currency
                };
                lines.push(OrderLine {
                    sku: sku_name(rng.below(config.skus as u64) as usize),
                    quantity: Quantity::new(1 + rng.below(3) as i64)
                        .map_err(|e| Error::invalid("quantity", e.to_string()))?,
                    unit_price: Money::from_minor(price, line_currency),
                });
            }
            let stock_lines = lines
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
            system
                .sales
                .execute(&order_id, place, &CommandContext::new())
                .await?;
            let data = OrderToCashData {
                order_id: order_id.clone(),
                lines: stock_lines,
                total: None,
                payment_id: None,
                shipment_id: None,
                invoice_entry_id: None,
            };
            let id = orchestrator
                .start(SAGA_TYPE, &data)
                .await
                .map_err(saga_error)?;
            in_flight.push(id);
            all.push((id, order_id));
        }
        let mut still = Vec::with_capacity(in_flight.len());
        for id in in_flight.drain(..) {
            match store.load(id).await.map_err(saga_error)? {
                Some(inst) if inst.state.is_terminal() => {
                    finished += 1;
                    last_finish = Instant::now();
                }
                _ => still.push(id),
            }
        }
        in_flight = still;
        if let Some(cb) = &progress {
            cb(DemoProgress {
                started: all.len(),
                finished,
                total: config.orders,
            });
        }
        if in_flight.is_empty() && all.len() >= config.orders {
            break;
        }
        if started_at.elapsed() > config.deadline {
            tracing::warn!(in_flight = in_flight.len(), "demo deadline passed");
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = last_finish.duration_since(started_at);

    // Stop everything before reading the final state.
    stop.notify_waiters();
    for w in workers {
        w.abort();
    }
    transport_side.stop().await?;
    for p in participants {
        p.stop().await?;
    }

    // Outcomes and latencies.
    let (mut completed, mut compensated, mut failed, mut not_terminal) = (0, 0, 0, 0);
    let mut saga_latency = Vec::with_capacity(all.len());
    let mut step_latency: BTreeMap<usize, Vec<Duration>> = BTreeMap::new();
    let mut records = Vec::with_capacity(all.len());
    let mut timelines = Vec::new();
    let mut timeouts = 0;
    for (id, order_id) in &all {
        let view = orchestrator.show(*id).await.map_err(saga_error)?;
        let inst = &view.instance;
        match inst.state {
            EngineState::Completed => completed += 1,
            EngineState::Compensated => compensated += 1,
            EngineState::Failed => failed += 1,
            _ => not_terminal += 1,
        }
        if inst.state.is_terminal() {
            saga_latency.push(
                (inst.updated_at - inst.created_at)
                    .to_std()
                    .unwrap_or_default(),
            );
        }
        let mut first_start: HashMap<usize, chrono::DateTime<chrono::Utc>> = HashMap::new();
        let mut events = Vec::new();
        for h in &view.history {
            if matches!(
                h.event.kind,
                HistoryKind::StepTimedOut | HistoryKind::CompensationTimedOut
            ) {
                timeouts += 1;
            }
            let Some(step) = h.event.step else { continue };
            if config.keep_timelines {
                let kind = serde_json::to_value(h.event.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_else(|| format!("{:?}", h.event.kind));
                events.push((kind, STEPS.get(step).copied().unwrap_or("?").to_owned()));
            }
            match h.event.kind {
                HistoryKind::StepStarted => {
                    first_start.entry(step).or_insert(h.at);
                }
                HistoryKind::StepSucceeded => {
                    if let Some(start) = first_start.get(&step) {
                        step_latency
                            .entry(step)
                            .or_default()
                            .push((h.at - *start).to_std().unwrap_or_default());
                    }
                }
                _ => {}
            }
        }
        let step_name = inst
            .progress
            .in_flight
            .as_ref()
            .and_then(|f| STEPS.get(f.step).copied());
        let record = SagaRecord {
            saga_id: id.as_uuid().to_string(),
            order_id: order_id.as_str().to_owned(),
            state: map_state(inst.state, step_name),
        };
        if config.keep_timelines {
            timelines.push(SagaTimeline {
                saga_id: record.saga_id.clone(),
                order_id: record.order_id.clone(),
                state: record.state.clone(),
                events,
            });
        }
        records.push(record);
    }
    saga_latency.sort();
    let steps = step_latency
        .into_iter()
        .map(|(i, mut v)| {
            v.sort();
            StepLatency {
                step: STEPS.get(i).copied().unwrap_or("?").to_owned(),
                count: v.len(),
                p50: percentile(&v, 50.0),
                p99: percentile(&v, 99.0),
            }
        })
        .collect();

    let order_ids: Vec<AggregateId> = all.iter().map(|(_, o)| o.clone()).collect();
    let snapshot = SystemSnapshot::collect(
        records,
        &order_ids,
        &system.sales,
        &system.inventory,
        &system.payment,
        &system.shipping,
        &system.accounting,
    )
    .await?;
    let invariants = check(&snapshot);
    let terminal = completed + compensated + failed;
    Ok(DemoReport {
        seed: config.seed,
        orders: all.len(),
        completed,
        compensated,
        failed,
        not_terminal,
        elapsed,
        throughput: if elapsed.is_zero() {
            0.0
        } else {
            terminal as f64 / elapsed.as_secs_f64()
        },
        saga_p50: percentile(&saga_latency, 50.0),
        saga_p99: percentile(&saga_latency, 99.0),
        steps,
        timeouts,
        injected: faults.injected(),
        timelines,
        invariants,
    })
}
