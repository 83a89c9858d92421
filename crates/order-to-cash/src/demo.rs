//! The main job: place N orders, drive every saga to a terminal state, then
//! measure and check.
//!
//! [`run_demo`] builds the whole system in one process on the embedded
//! default: each participant on its own SQLite file (WAL,
//! `synchronous=NORMAL`: commits survive kill -9), Sales on a
//! [`SqliteEventStore`], the orchestrator on the durable
//! [`SqliteSagaStore`] in [`ORCHESTRATOR_DB`] (its commands in that file's
//! outbox, relayed after commit; PostgreSQL's [`PgSagaStore`] with
//! `database_url`), and
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
use vextrus_core::outbox::{DeadLetters, OutboxClaimer};
use vextrus_core::saga::{
    HistoryKind, Orchestrator, OrchestratorConfig, SagaId, SagaRegistry, SagaState as EngineState,
    SagaStore,
};
use vextrus_core::{EventAppender, EventReader, SnapshotStore};
use vextrus_kernel::{AggregateId, CommandContext, Currency, HasErrorKind, Money, Quantity, Sku};
use vextrus_postgres::{PgEventStore, PgOutbox, PgSagaStore, PgStoreConfig};
use vextrus_sqlite::saga::SqliteSagaStore;
use vextrus_sqlite::{SqliteEventStore, SqliteOutbox};

use crate::accounting::Accounting;
use crate::db::{Database, Durability, IdempotencyKey};
use crate::error::{Error, Result};
use crate::faults::{FaultConfig, FaultInjector, InjectedCounts};
use crate::invariants::{InvariantReport, SagaRecord, SagaState, SystemSnapshot, check};
use crate::inventory::{Inventory, StockLine};
use crate::node::{
    Broker, BrokerUrl, InProcessBroker, KafkaBroker, NatsBroker, Role, RunningOrchestrator,
    RunningParticipant, start_orchestrator, start_participant,
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
    /// tables and the orchestrator's saga store go to this database instead
    /// of SQLite files.
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
    /// When set, the orchestrator is not started here: it runs elsewhere
    /// ([`serve_orchestrator`], `vextrus serve --role orchestrator`) on the
    /// same database. This process only places the orders (each order and
    /// its started saga written to the database), waits until every saga
    /// is terminal, and checks.
    pub remote_orchestrator: bool,
    /// The size of each PostgreSQL pool this process opens (Sales' event
    /// store, the participants' database, the saga store); `None`: the
    /// stores' defaults (32, 16, 32). Several processes of one system on
    /// one server need it smaller than `max_connections` allows.
    pub max_connections: Option<u32>,
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
            remote_orchestrator: false,
            max_connections: None,
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

async fn build_postgres(
    url: &str,
    faults: Arc<FaultInjector>,
    max_connections: Option<u32>,
) -> Result<System<PgEventStore>> {
    let store = open_pg_events(url, max_connections).await?;
    let db = Database::connect_with(url, Durability::Full, max_connections.unwrap_or(16)).await?;
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

async fn open_pg_events(url: &str, max_connections: Option<u32>) -> Result<PgEventStore> {
    let mut pg = PgStoreConfig::default();
    if let Some(n) = max_connections {
        pg = pg.max_connections(n);
    }
    let store = PgEventStore::connect_with(url, pg)
        .await
        .map_err(store_error)?;
    store.migrate().await.map_err(store_error)?;
    Ok(store)
}

/// An event store on `dir/{name}.db` (WAL, `synchronous=NORMAL`), migrated.
async fn open_sqlite_events(dir: &std::path::Path, name: &str) -> Result<SqliteEventStore> {
    let options = SqliteConnectOptions::new()
        .filename(dir.join(format!("{name}.db")))
        .create_if_missing(true);
    let store = SqliteEventStore::connect_with(
        SqliteEventStore::tune(options).synchronous(SqliteSynchronous::Normal),
        8,
    )
    .await
    .map_err(store_error)?;
    store.migrate().await.map_err(store_error)?;
    Ok(store)
}

async fn build_sqlite(
    dir: &std::path::Path,
    faults: Arc<FaultInjector>,
) -> Result<System<SqliteEventStore>> {
    let open = |name: &'static str| {
        let path = dir.join(format!("{name}.db"));
        async move { Database::sqlite_file(&path, Durability::Normal).await }
    };
    let mut system = System {
        sales: Arc::new(Sales::new(open_sqlite_events(dir, "sales").await?)),
        inventory: Arc::new(Inventory::new(open("inventory").await?, faults.clone())),
        payment: Arc::new(Payment::new(open("payment").await?, faults.clone())),
        shipping: Arc::new(Shipping::new(open("shipping").await?, faults.clone())),
        accounting: Arc::new(Accounting::new(open("accounting").await?, faults)),
        outboxes: Vec::new(),
    };
    system.migrate().await?;
    Ok(system)
}

/// The file of the orchestrator's saga store in a data directory: saga
/// instances, their history, the reply inbox and the outbox of commands.
pub const ORCHESTRATOR_DB: &str = "orchestrator.db";

/// The orchestrator's saga store on SQLite: [`ORCHESTRATOR_DB`] in `dir`
/// (WAL, `synchronous=NORMAL`, as every demo file), migrated. Its
/// transitions, the command relay's claims and the workers' claims take
/// turns on one [`SqliteOutbox`].
pub async fn sqlite_saga_store(dir: &std::path::Path) -> Result<SqliteSagaStore> {
    let events = open_sqlite_events(dir, ORCHESTRATOR_DB.trim_end_matches(".db")).await?;
    let store = SqliteSagaStore::new(SqliteOutbox::new(events), REPLIES);
    store.migrate().await.map_err(saga_error)?;
    Ok(store)
}

/// The orchestrator's saga store on PostgreSQL at `url` (its own pool),
/// migrated.
pub async fn pg_saga_store(url: &str) -> Result<PgSagaStore> {
    pg_saga_store_sized(url, None).await
}

/// [`pg_saga_store`] with a pool of `max_connections` (`None`: the default).
async fn pg_saga_store_sized(url: &str, max_connections: Option<u32>) -> Result<PgSagaStore> {
    Ok(PgSagaStore::new(
        PgOutbox::new(open_pg_events(url, max_connections).await?),
        REPLIES,
    ))
}

/// A durable saga store and the outbox its transitions write commands to.
trait DurableSagaStore: SagaStore + Clone + Send + Sync + 'static {
    type Outbox: OutboxClaimer + DeadLetters + Clone + Send + Sync + 'static;
    fn command_outbox(&self) -> Self::Outbox;

    /// Which of `ids` are terminal. The default loads each saga; a store
    /// that can read them all at once says so in one query (the placer
    /// asks every few milliseconds for every saga in flight).
    fn terminal_among(
        &self,
        ids: &[SagaId],
    ) -> impl std::future::Future<Output = Result<Vec<SagaId>>> + Send {
        async move {
            let mut done = Vec::new();
            for id in ids {
                if let Some(inst) = self.load(*id).await.map_err(saga_error)?
                    && inst.state.is_terminal()
                {
                    done.push(*id);
                }
            }
            Ok(done)
        }
    }
}

impl DurableSagaStore for SqliteSagaStore {
    type Outbox = SqliteOutbox;
    fn command_outbox(&self) -> SqliteOutbox {
        self.outbox().clone()
    }

    async fn terminal_among(&self, ids: &[SagaId]) -> Result<Vec<SagaId>> {
        Ok(self
            .states_of(ids)
            .await
            .map_err(saga_error)?
            .into_iter()
            .filter(|(_, state)| state.is_terminal())
            .map(|(id, _)| id)
            .collect())
    }
}

impl DurableSagaStore for PgSagaStore {
    type Outbox = PgOutbox;
    fn command_outbox(&self) -> PgOutbox {
        self.outbox().clone()
    }
}

/// A saga engine or saga store failure, kind kept (a database outage stays
/// [`Transient`](vextrus_kernel::ErrorKind::Transient): the CLI exits 5).
fn saga_error(e: vextrus_core::saga::SagaError) -> Error {
    Error::Saga(e)
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
    let faults = Arc::new(injector(&config));
    let broker = BrokerUrl::parse(config.broker.as_deref())?;
    if let Some(url) = &config.database_url {
        let system = build_postgres(url, faults.clone(), config.max_connections).await?;
        let store = pg_saga_store_sized(url, config.max_connections).await?;
        return on_broker(config, system, store, faults, progress, broker).await;
    }
    let temp;
    let dir = match &config.data_dir {
        Some(d) => {
            create_dir(d, "demo")?;
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
    let store = sqlite_saga_store(&dir).await?;
    on_broker(config, system, store, faults, progress, broker).await
}

fn injector(config: &DemoConfig) -> FaultInjector {
    let mut injector = FaultInjector::new(config.seed, config.faults);
    for command_type in &config.forced_failures {
        injector = injector.force_failure(command_type.clone());
    }
    injector
}

fn create_dir(dir: &std::path::Path, participant: &'static str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Database {
        participant,
        source: sqlx::Error::Io(e),
    })
}

/// The namespace a service must be given.
fn service_namespace(config: &DemoConfig) -> Result<String> {
    config.namespace.clone().ok_or_else(|| {
        Error::invalid(
            "namespace",
            "processes of one system must share a namespace",
        )
    })
}

/// Runs the participants of `role` (`inventory`, `payment`, `shipping`,
/// `accounting`, or several through `all`) as a service until `shutdown`
/// resolves: each participant's serving loop and reply relay, on the
/// databases `config` names (`database_url`, or the SQLite files in
/// `data_dir`) and its broker and namespace. Failure injection follows
/// `config.faults` and `config.seed`. The orchestrator runs as
/// [`serve_orchestrator`]; a demo with [`DemoConfig::remote_participants`]
/// set places the orders.
pub async fn serve_participants(
    config: DemoConfig,
    role: Role,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    config.faults.validate()?;
    if role == Role::Orchestrator {
        return Err(Error::invalid(
            "role",
            "the orchestrator is served by serve_orchestrator",
        ));
    }
    let namespace = service_namespace(&config)?;
    let faults = Arc::new(FaultInjector::new(config.seed, config.faults));
    let system = if let Some(url) = &config.database_url {
        PartsOf::Pg(build_postgres(url, faults, config.max_connections).await?)
    } else {
        let Some(dir) = &config.data_dir else {
            return Err(Error::invalid(
                "data_dir",
                "a service needs its database: a data directory or a PostgreSQL URL",
            ));
        };
        create_dir(dir, "serve")?;
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

/// Runs the orchestrator as a service until `shutdown` resolves: the saga
/// workers ([`DemoConfig::workers`] of them), the relay of the saga store's
/// outbox (commands) and the reply inbox, over the durable saga store
/// ([`pg_saga_store`] on `database_url`, or [`sqlite_saga_store`] in
/// `data_dir`) and Sales (the saga's local steps) on the same database or
/// data directory. It places no orders: a demo with
/// [`DemoConfig::remote_orchestrator`] set writes them (orders and started
/// sagas) to the database. At start every non-terminal saga whose lease
/// has expired or was never taken is resumed; a process killed at any
/// instruction loses nothing, because every transition, its outgoing
/// command and the reply that caused it commit in one transaction.
pub async fn serve_orchestrator(
    config: DemoConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    config.faults.validate()?;
    if config.workers == 0 {
        return Err(Error::invalid("workers", "must be at least 1"));
    }
    let namespace = service_namespace(&config)?;
    let faults = Arc::new(injector(&config));
    if let Some(url) = &config.database_url {
        let sales = Arc::new(Sales::new(
            open_pg_events(url, config.max_connections).await?,
        ));
        let store = pg_saga_store_sized(url, config.max_connections).await?;
        return orchestrator_on(config, sales, store, faults, namespace, shutdown).await;
    }
    let Some(dir) = config.data_dir.clone() else {
        return Err(Error::invalid(
            "data_dir",
            "a service needs its database: a data directory or a PostgreSQL URL",
        ));
    };
    create_dir(&dir, "serve")?;
    let sales = Arc::new(Sales::new(open_sqlite_events(&dir, "sales").await?));
    let store = sqlite_saga_store(&dir).await?;
    orchestrator_on(config, sales, store, faults, namespace, shutdown).await
}

async fn orchestrator_on<S, St>(
    config: DemoConfig,
    sales: Arc<Sales<S>>,
    store: St,
    faults: Arc<FaultInjector>,
    namespace: String,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()>
where
    S: EventAppender + EventReader + SnapshotStore + Send + Sync + 'static,
    St: DurableSagaStore,
{
    let registry = registry(sales, faults, config.policy)?;
    let service = match BrokerUrl::parse(config.broker.as_deref())? {
        BrokerUrl::InProcess => {
            return Err(Error::invalid(
                "broker",
                "a service in its own process needs a real broker (nats:// or kafka://)",
            ));
        }
        BrokerUrl::Nats(url) => {
            let broker = NatsBroker::connect(&url, &namespace).await?;
            OrchestratorService::start(&broker, store, registry, &config).await?
        }
        BrokerUrl::Kafka(brokers) => {
            let broker = KafkaBroker::connect(&brokers, &namespace).await?;
            OrchestratorService::start(&broker, store, registry, &config).await?
        }
    };
    tracing::info!(role = "orchestrator", %namespace, workers = config.workers, "serving");
    shutdown.await;
    service.stop().await
}

fn registry<S>(
    sales: Arc<Sales<S>>,
    faults: Arc<FaultInjector>,
    policy: StepPolicy,
) -> Result<SagaRegistry>
where
    S: EventAppender + EventReader + SnapshotStore + Send + Sync + 'static,
{
    let registry = SagaRegistry::new();
    registry
        .register(definition(sales, faults, policy))
        .map_err(saga_error)?;
    Ok(registry)
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

async fn on_broker<S, St>(
    config: DemoConfig,
    system: System<S>,
    store: St,
    faults: Arc<FaultInjector>,
    progress: Option<ProgressFn>,
    broker: BrokerUrl,
) -> Result<DemoReport>
where
    S: EventAppender + EventReader + SnapshotStore + Send + Sync + 'static,
    St: DurableSagaStore,
{
    match broker {
        BrokerUrl::InProcess => {
            if config.remote_participants || config.remote_orchestrator {
                return Err(Error::invalid(
                    "broker",
                    "parts in other processes need a real broker (nats:// or kafka://)",
                ));
            }
            drive(
                config,
                system,
                store,
                faults,
                progress,
                InProcessBroker::new(),
            )
            .await
        }
        BrokerUrl::Nats(url) => {
            let broker = NatsBroker::connect(&url, &namespace(&config)).await?;
            drive(config, system, store, faults, progress, broker).await
        }
        BrokerUrl::Kafka(brokers) => {
            let broker = KafkaBroker::connect(&brokers, &namespace(&config)).await?;
            drive(config, system, store, faults, progress, broker).await
        }
    }
}

/// The orchestrator's running parts: saga workers, the command relay and
/// the reply inbox.
struct OrchestratorService<St: SagaStore> {
    /// The first worker's orchestrator (sagas started through it wake it).
    orchestrator: Orchestrator<St>,
    transport: RunningOrchestrator,
    stop: tokio::sync::watch::Sender<bool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl<St: DurableSagaStore> OrchestratorService<St> {
    async fn start<B: Broker>(
        broker: &B,
        store: St,
        registry: SagaRegistry,
        config: &DemoConfig,
    ) -> Result<Self> {
        let run = uuid::Uuid::now_v7().simple().to_string();
        let orchestrators: Vec<Orchestrator<St>> = (0..config.workers.max(1))
            .map(|i| {
                // A fresh worker name per process: a restarted service
                // never mistakes a dead process's leases for its own.
                let mut c = OrchestratorConfig::worker(format!("o2c-worker-{run}-{i}"));
                c.batch_size = config.concurrency.max(16);
                c.poll_interval = Duration::from_millis(5);
                c.lease = ORCHESTRATOR_LEASE;
                Orchestrator::with_config(store.clone(), registry.clone(), c)
            })
            .collect();
        let transport =
            start_orchestrator(broker, orchestrators[0].clone(), store.command_outbox()).await?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let workers = orchestrators
            .iter()
            .cloned()
            .map(|o| {
                let mut stopped = stopped.clone();
                tokio::spawn(async move {
                    o.run(async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    })
                    .await
                })
            })
            .collect();
        Ok(Self {
            orchestrator: orchestrators[0].clone(),
            transport,
            stop,
            workers,
        })
    }

    /// Stops the workers (after their current batch), the relay and the
    /// reply inbox.
    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        for w in self.workers {
            let _ = w.await;
        }
        self.transport.stop().await
    }
}

/// The lease of the demo's saga workers: how long a saga claimed by a
/// killed orchestrator waits before another worker resumes it.
pub const ORCHESTRATOR_LEASE: Duration = Duration::from_secs(10);

/// The saga of an order: its id is derived from the order id, so placing
/// the same order again starts nothing new.
pub fn saga_id_for(order_id: &AggregateId) -> SagaId {
    // Two FNV-1a 64 hashes (different offsets) of the order id, as a
    // version-8 (custom) UUID.
    let hash = |offset: u64| {
        order_id.as_str().bytes().fold(offset, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let (hi, lo) = (hash(0xcbf2_9ce4_8422_2325), hash(0x6c62_272e_07bb_0142));
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&hi.to_be_bytes());
    bytes[8..].copy_from_slice(&lo.to_be_bytes());
    SagaId(uuid::Builder::from_custom_bytes(bytes).into_uuid())
}

/// Stocks every SKU (idempotency keys make a re-run on the same databases
/// harmless).
async fn stock<S>(config: &DemoConfig, system: &System<S>) -> Result<()> {
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
    Ok(())
}

async fn drive<S, St, B>(
    config: DemoConfig,
    system: System<S>,
    store: St,
    faults: Arc<FaultInjector>,
    progress: Option<ProgressFn>,
    broker: B,
) -> Result<DemoReport>
where
    S: EventAppender + EventReader + SnapshotStore + Send + Sync + 'static,
    St: DurableSagaStore,
    B: Broker,
{
    stock(&config, &system).await?;
    let registry = registry(system.sales.clone(), faults.clone(), config.policy)?;
    let participants = if config.remote_participants {
        Vec::new()
    } else {
        system.start_participants(&broker, Role::All).await?
    };
    let service = if config.remote_orchestrator {
        None
    } else {
        Some(OrchestratorService::start(&broker, store.clone(), registry.clone(), &config).await?)
    };
    // Sagas are started through the first worker (which wakes at once), or,
    // when the orchestrator runs elsewhere, written to the store for it.
    let orchestrator = match &service {
        Some(s) => s.orchestrator.clone(),
        None => Orchestrator::with_config(
            store.clone(),
            registry,
            OrchestratorConfig::worker(format!("o2c-placer-{}", uuid::Uuid::now_v7().simple())),
        ),
    };
    let placed = place_and_wait(&config, &system, &faults, progress.as_ref(), &orchestrator).await;

    // Stop everything before reading the final state.
    if let Some(service) = service {
        service.stop().await?;
    }
    for p in participants {
        p.stop().await?;
    }
    let (all, elapsed) = placed?;
    report(&config, &system, &faults, &orchestrator, &all, elapsed).await
}

/// Places the orders (skipping those already placed: a re-run resumes),
/// keeping `concurrency` sagas in flight, and waits until every saga is
/// terminal or the deadline passes. Returns every (saga, order) and the
/// time from the start to the last saga seen terminal.
async fn place_and_wait<S, St>(
    config: &DemoConfig,
    system: &System<S>,
    faults: &FaultInjector,
    progress: Option<&ProgressFn>,
    orchestrator: &Orchestrator<St>,
) -> Result<(Vec<(SagaId, AggregateId)>, Duration)>
where
    S: EventAppender + EventReader + SnapshotStore + Send + Sync + 'static,
    St: DurableSagaStore,
{
    let store = orchestrator.store();
    let mut rng = Rng(config.seed ^ 0x6f72_6465_7273);
    let currencies = [Currency::USD, Currency::EUR, Currency::BDT];
    let started_at = Instant::now();
    let mut in_flight: Vec<SagaId> = Vec::new();
    let mut all: Vec<(SagaId, AggregateId)> = Vec::with_capacity(config.orders);
    let mut finished = 0usize;
    let mut last_finish = started_at;
    loop {
        while in_flight.len() < config.concurrency && all.len() < config.orders {
            let n = all.len();
            let order_id = AggregateId::new(format!("order-{}-{n:06}", config.seed))
                .map_err(|e| Error::invalid("order id", e.to_string()))?;
            // The order's contents are drawn even when it was placed
            // before, so the generator stays in step with the first run.
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
            let data = OrderToCashData::for_order(order_id.clone(), &lines);
            let customer = format!("customer-{}", rng.below(500));
            if system.sales.load(&order_id).await?.is_none() {
                let place = OrderCommand::Place {
                    customer,
                    currency,
                    lines,
                };
                system
                    .sales
                    .execute(&order_id, place, &CommandContext::new())
                    .await?;
            }
            // Idempotent: the saga of an order already started stays as it is.
            let id = orchestrator
                .start_with_id(saga_id_for(&order_id), SAGA_TYPE, &data)
                .await
                .map_err(saga_error)?;
            in_flight.push(id);
            all.push((id, order_id));
        }
        let done = store.terminal_among(&in_flight).await?;
        if !done.is_empty() {
            finished += done.len();
            last_finish = Instant::now();
            in_flight.retain(|id| !done.contains(id));
        }
        if let Some(cb) = progress {
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
    Ok((all, last_finish.duration_since(started_at)))
}

/// Outcomes, latencies and the invariant check of the sagas in `all`.
async fn report<S, St>(
    config: &DemoConfig,
    system: &System<S>,
    faults: &FaultInjector,
    orchestrator: &Orchestrator<St>,
    all: &[(SagaId, AggregateId)],
    elapsed: Duration,
) -> Result<DemoReport>
where
    S: EventAppender + EventReader + SnapshotStore + Send + Sync + 'static,
    St: SagaStore + Clone + Send + Sync + 'static,
{
    // Outcomes and latencies.
    let (mut completed, mut compensated, mut failed, mut not_terminal) = (0, 0, 0, 0);
    let mut saga_latency = Vec::with_capacity(all.len());
    let mut step_latency: BTreeMap<usize, Vec<Duration>> = BTreeMap::new();
    let mut records = Vec::with_capacity(all.len());
    let mut timelines = Vec::new();
    let mut timeouts = 0;
    for (id, order_id) in all {
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

#[cfg(test)]
mod tests {
    use vextrus_core::saga::SagaError;
    use vextrus_kernel::{ErrorKind, HasErrorKind};

    use super::*;

    #[test]
    fn saga_errors_keep_their_kind() {
        let outage = saga_error(SagaError::unavailable("connection refused"));
        assert_eq!(outage.kind(), ErrorKind::Transient);
        assert!(
            outage.to_string().contains("connection refused"),
            "{outage}"
        );
        let missing = saga_error(SagaError::NotFound(SagaId::new()));
        assert_eq!(
            missing.kind(),
            SagaError::NotFound(SagaId::new()).kind(),
            "{missing}"
        );
    }
}
