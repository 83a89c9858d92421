//! The outbox relay benchmark, shared by the broker crates' `relay` benches:
//! relay throughput from an in-memory and from a SQL outbox beside the raw
//! rate of the same broker client in the same run, and commit → broker-ack
//! latency at a fixed rate of half the measured maximum.
//!
//! A bench implements [`BenchBroker`] (its raw client and its
//! [`Transport`]) and [`BenchOutbox`] (a fresh SQL outbox; the broker
//! crates pass PostgreSQL and SQLite) and calls [`run`]. Each run, on a
//! fresh destination:
//!
//! 1. raw publishes awaiting each ack before the next (on a tenth of the
//!    messages);
//! 2. raw publishes pipelined (all sent, acks awaited in windows) — the
//!    figure the relay is compared with;
//! 3. for each [`KeyPipelining`] mode, the [`OutboxRelay`] draining an
//!    in-memory outbox and then each SQL outbox, each holding the run's
//!    messages committed beforehand (enqueue committed → broker ack);
//! 4. after each SQL outbox's drain, commit → ack latency through a fresh
//!    one in the same mode ([`KeyPipelining::OneAtATime`], the default, and
//!    [`KeyPipelining::Batch`]), while messages are committed at half that
//!    outbox's measured maximum (one transaction every [`TICK`], holding the
//!    tick's messages).
//!
//! Figures are medians over the runs; ratios are taken per run, then the
//! median. Settings come from the environment: `VEXTRUS_BENCH_MESSAGES`
//! (default 20000), `VEXTRUS_BENCH_RUNS` (3), `VEXTRUS_BENCH_KEYS` (50
//! partition keys), `VEXTRUS_BENCH_RELAY_WORKERS` (3), batches of
//! `VEXTRUS_BENCH_BATCH` (4096: the raw clients' window of acks in flight,
//! so the relay may have as many messages awaiting acks per worker as the
//! raw client; at 1024 the Kafka relay from PostgreSQL reached 0.09 of raw,
//! at 4096 0.30, same run conditions). Otherwise the relay runs with
//! [`RelayConfig::new`]'s defaults: between empty claims its workers wait for
//! the store's wake-ups (LISTEN/NOTIFY, the in-memory watch) or the 500 ms
//! poll. (A 5 ms poll had idle workers re-run empty claims against the
//! database being measured hundreds of times a second.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vextrus_core::outbox::{
    Backoff, DeadLetters, InMemoryOutbox, KeyPipelining, OutboxClaimer, OutboxRelay, OutboxStore,
    RelayConfig,
};
use vextrus_core::transport::{MessageId, OutboundMessage, Transport, TransportError};
use vextrus_kernel::EventMetadata;

/// How often the latency run commits a transaction of messages.
pub const TICK: Duration = Duration::from_millis(5);

/// The broker side of the benchmark.
pub trait BenchBroker: Sync {
    /// The vextrus transport the relay publishes through.
    type Transport: Transport + Clone + 'static;

    /// The broker's name in the report.
    fn name(&self) -> String;

    /// The transport (same client settings as the raw client).
    fn transport(&self) -> Self::Transport;

    /// A fresh, empty destination for one run.
    fn fresh_destination(&self) -> impl Future<Output = String> + Send;

    /// Publishes `batch` with the raw client, awaiting each ack before the
    /// next publish.
    fn raw_one_at_a_time(&self, batch: &[OutboundMessage]) -> impl Future<Output = ()> + Send;

    /// Publishes `batch` with the raw client: everything sent, acks awaited
    /// in windows; same headers, key and payload as the transport sends.
    fn raw_pipelined(&self, batch: &[OutboundMessage]) -> impl Future<Output = ()> + Send;

    /// Removes a run's destination.
    fn remove_destination(&self, destination: &str) -> impl Future<Output = ()> + Send;
}

/// The SQL outbox the relay drains.
pub trait BenchOutbox: Sync {
    /// The store.
    type Store: OutboxStore + OutboxClaimer + DeadLetters + Clone + 'static;

    /// The store's name in the report.
    fn name(&self) -> String;

    /// A fresh, empty, migrated outbox.
    fn fresh(&self) -> impl Future<Output = Self::Store> + Send;
}

/// The benchmark's settings (see the module docs for the environment).
#[derive(Debug, Clone)]
pub struct BenchSettings {
    /// Messages per measurement.
    pub messages: usize,
    /// Runs; figures are medians.
    pub runs: usize,
    /// Partition keys (messages are spread round-robin).
    pub keys: usize,
    /// Relay workers.
    pub workers: usize,
    /// Messages claimed per batch.
    pub batch_size: usize,
}

impl BenchSettings {
    /// The settings from the environment, with the defaults above.
    pub fn from_env() -> Self {
        let var = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
                .max(1)
        };
        Self {
            messages: var("VEXTRUS_BENCH_MESSAGES", 20_000),
            runs: var("VEXTRUS_BENCH_RUNS", 3),
            keys: var("VEXTRUS_BENCH_KEYS", 50),
            workers: var("VEXTRUS_BENCH_RELAY_WORKERS", 3),
            batch_size: var("VEXTRUS_BENCH_BATCH", 4096),
        }
    }

    /// `n` messages to `destination`: CloudEvents headers, a 256-byte JSON
    /// payload, keys `order-0..keys` round-robin.
    pub fn messages(&self, n: usize, destination: &str) -> Vec<OutboundMessage> {
        let meta = EventMetadata::new();
        let payload = format!(
            "{{\"order\":\"{}\",\"lines\":[{}]}}",
            uuid::Uuid::new_v4(),
            "1,".repeat(100)
        );
        (0..n)
            .map(|i| {
                OutboundMessage::cloud_events(
                    destination,
                    format!("order-{}", i % self.keys),
                    "order.placed",
                    1,
                    "bench",
                    payload.clone().into_bytes(),
                    &meta,
                )
            })
            .collect()
    }

    fn relay_config(&self, name: &str, mode: KeyPipelining) -> RelayConfig {
        let mut config = RelayConfig::new(format!("{name}-{}", uuid::Uuid::new_v4().simple()));
        config.workers = self.workers;
        config.batch_size = self.batch_size;
        config.backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(500), 2.0);
        config.key_pipelining = mode;
        config
    }
}

/// Records when the relay saw each message's ack.
#[derive(Clone)]
struct AckClock<T> {
    inner: T,
    acked: Arc<Mutex<HashMap<MessageId, Instant>>>,
}

impl<T: Transport> Transport for AckClock<T> {
    async fn publish(&self, message: &OutboundMessage) -> Result<(), TransportError> {
        let result = self.inner.publish(message).await;
        if result.is_ok() {
            let now = Instant::now();
            self.acked.lock().unwrap().entry(message.id).or_insert(now);
        }
        result
    }

    async fn publish_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<(), TransportError>> {
        let results = self.inner.publish_batch(messages).await;
        let now = Instant::now();
        let mut acked = self.acked.lock().unwrap();
        for (m, r) in messages.iter().zip(&results) {
            if r.is_ok() {
                acked.entry(m.id).or_insert(now);
            }
        }
        results
    }
}

async fn enqueue_all<S: OutboxStore>(store: &S, batch: &[OutboundMessage]) {
    for chunk in batch.chunks(1000) {
        store.enqueue(chunk).await.expect("enqueue");
    }
}

/// Waits until `clock` saw `n` acks, then until `store` has nothing
/// pending and no dead letter. (Acks are counted in memory: polling the
/// store's status while the relay runs would load the database the relay
/// measures.)
async fn wait_for_acks<S, T>(store: &S, clock: &AckClock<T>, n: usize)
where
    S: DeadLetters,
{
    let deadline = Instant::now() + Duration::from_secs(600);
    while clock.acked.lock().unwrap().len() < n {
        assert!(Instant::now() < deadline, "the relay stalled");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    loop {
        let status = store.status().await.expect("status");
        assert_eq!(status.dead, 0, "no dead letters in a benchmark");
        if status.pending == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "the relay stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Drains `store` (holding `n` committed messages) with a relay: msg/s
/// from the start to the last broker ack.
async fn relay_rate<S, T>(
    settings: &BenchSettings,
    store: &S,
    transport: &T,
    n: usize,
    mode: KeyPipelining,
) -> f64
where
    S: OutboxStore + OutboxClaimer + DeadLetters + Clone + 'static,
    T: Transport + Clone + 'static,
{
    let clock = AckClock {
        inner: transport.clone(),
        acked: Arc::default(),
    };
    let relay = OutboxRelay::new(
        store.clone(),
        clock.clone(),
        settings.relay_config("bench", mode),
    );
    let start = Instant::now();
    let handle = relay.spawn();
    wait_for_acks(store, &clock, n).await;
    let last = clock
        .acked
        .lock()
        .unwrap()
        .values()
        .max()
        .copied()
        .expect("acks");
    handle.shutdown().await.expect("shutdown");
    n as f64 / last.duration_since(start).as_secs_f64()
}

/// Commits `batch` at `rate` msg/s (one transaction per [`TICK`]) while a
/// relay publishes; commit → ack p50 and p99.
async fn relay_latency<S, T>(
    settings: &BenchSettings,
    store: &S,
    transport: &T,
    batch: &[OutboundMessage],
    rate: f64,
    mode: KeyPipelining,
) -> (Duration, Duration)
where
    S: OutboxStore + OutboxClaimer + DeadLetters + Clone + 'static,
    T: Transport + Clone + 'static,
{
    let clock = AckClock {
        inner: transport.clone(),
        acked: Arc::default(),
    };
    let relay = OutboxRelay::new(
        store.clone(),
        clock.clone(),
        settings.relay_config("bench-latency", mode),
    );
    let handle = relay.spawn();
    let per_tick = (rate * TICK.as_secs_f64()).max(1.0);
    let mut committed: HashMap<MessageId, Instant> = HashMap::with_capacity(batch.len());
    let start = Instant::now();
    let mut sent = 0usize;
    let mut tick = 0u32;
    while sent < batch.len() {
        tick += 1;
        tokio::time::sleep_until((start + TICK * tick).into()).await;
        let upto = ((per_tick * f64::from(tick)) as usize).min(batch.len());
        if upto <= sent {
            continue;
        }
        store.enqueue(&batch[sent..upto]).await.expect("enqueue");
        let at = Instant::now();
        committed.extend(batch[sent..upto].iter().map(|m| (m.id, at)));
        sent = upto;
    }
    wait_for_acks(store, &clock, batch.len()).await;
    handle.shutdown().await.expect("shutdown");
    let acked = clock.acked.lock().unwrap();
    let mut latencies: Vec<Duration> = committed
        .iter()
        .map(|(id, at)| acked[id].saturating_duration_since(*at))
        .collect();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    (pct(0.50), pct(0.99))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    xs[xs.len() / 2]
}

fn ms(d: f64) -> String {
    format!("{:.1} ms", d * 1e3)
}

/// One SQL outbox's figures in one mode, over the runs.
#[derive(Default)]
struct SqlFigures {
    rate: Vec<f64>,
    ratio: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    half: Vec<f64>,
}

/// One mode's figures, over the runs.
#[derive(Default)]
struct ModeFigures {
    memory: Vec<f64>,
    memory_ratio: Vec<f64>,
    first: SqlFigures,
    second: SqlFigures,
}

/// Drains a fresh `sql` outbox holding `n` committed messages, then measures
/// commit → ack at half the rate reached; records both in `f` (ratios to
/// `raw`) and prints them.
#[allow(clippy::too_many_arguments)]
async fn measure_sql<O, T>(
    s: &BenchSettings,
    sql: &O,
    transport: &T,
    destination: &str,
    mode: KeyPipelining,
    raw: f64,
    f: &mut SqlFigures,
) where
    O: BenchOutbox,
    T: Transport + Clone + 'static,
{
    let n = s.messages;
    let store = sql.fresh().await;
    enqueue_all(&store, &s.messages(n, destination)).await;
    let q = relay_rate(s, &store, transport, n, mode).await;
    let half = q / 2.0;
    let count = ((half * 5.0) as usize).clamp(500, n);
    let store = sql.fresh().await;
    let (p50, p99) = relay_latency(
        s,
        &store,
        transport,
        &s.messages(count, destination),
        half,
        mode,
    )
    .await;
    println!(
        "    from {}: {q:.0} msg/s ({:.2} of raw); at {half:.0} msg/s commit->ack p50 {} p99 {}",
        sql.name(),
        q / raw,
        ms(p50.as_secs_f64()),
        ms(p99.as_secs_f64()),
    );
    f.rate.push(q);
    f.ratio.push(q / raw);
    f.p50.push(p50.as_secs_f64());
    f.p99.push(p99.as_secs_f64());
    f.half.push(half);
}

fn print_sql(name: &str, f: SqlFigures) {
    println!(
        "    from {:<27}: {:>8.0} msg/s  ({:.2} of raw pipelined)",
        name,
        median(f.rate),
        median(f.ratio)
    );
    println!(
        "      commit -> ack at {:>6.0} msg/s : p50 {}, p99 {}",
        median(f.half),
        ms(median(f.p50)),
        ms(median(f.p99))
    );
}

/// Runs the benchmark over two SQL outboxes (PostgreSQL and SQLite in the
/// broker crates' benches) and prints each run and the medians. Every run
/// measures the raw client first, then, per [`KeyPipelining`] mode, the relay
/// from memory, from `first` and from `second`, so each ratio has its own
/// raw figure of the same run.
pub async fn run<B: BenchBroker, P: BenchOutbox, Q: BenchOutbox>(
    broker: &B,
    first: &P,
    second: &Q,
) {
    let s = BenchSettings::from_env();
    let n = s.messages;
    let transport = broker.transport();
    let modes = [KeyPipelining::OneAtATime, KeyPipelining::Batch];
    let (mut one, mut pipe) = (vec![], vec![]);
    let mut figures: Vec<ModeFigures> = modes.iter().map(|_| ModeFigures::default()).collect();
    for run in 1..=s.runs {
        let destination = broker.fresh_destination().await;
        let batch = s.messages((n / 10).max(1), &destination);
        let start = Instant::now();
        broker.raw_one_at_a_time(&batch).await;
        one.push(batch.len() as f64 / start.elapsed().as_secs_f64());
        let batch = s.messages(n, &destination);
        let start = Instant::now();
        broker.raw_pipelined(&batch).await;
        let raw = n as f64 / start.elapsed().as_secs_f64();
        pipe.push(raw);
        println!(
            "run {run}: raw one at a time {:.0} msg/s, raw pipelined {raw:.0} msg/s",
            one[run - 1]
        );
        for (mode, f) in modes.iter().zip(figures.iter_mut()) {
            let memory = InMemoryOutbox::new();
            enqueue_all(&memory, &s.messages(n, &destination)).await;
            let m = relay_rate(&s, &memory, &transport, n, *mode).await;
            println!(
                "  {mode:?}: relay from memory {m:.0} msg/s ({:.2} of raw)",
                m / raw
            );
            f.memory.push(m);
            f.memory_ratio.push(m / raw);
            measure_sql(
                &s,
                first,
                &transport,
                &destination,
                *mode,
                raw,
                &mut f.first,
            )
            .await;
            measure_sql(
                &s,
                second,
                &transport,
                &destination,
                *mode,
                raw,
                &mut f.second,
            )
            .await;
        }
        broker.remove_destination(&destination).await;
    }
    println!();
    println!(
        "{}: {n} messages, {} keys, {} relay workers, batches of {}, medians of {} runs",
        broker.name(),
        s.keys,
        s.workers,
        s.batch_size,
        s.runs
    );
    println!(
        "  raw, ack awaited one at a time : {:>8.0} msg/s",
        median(one)
    );
    println!(
        "  raw, pipelined acks            : {:>8.0} msg/s",
        median(pipe)
    );
    for (mode, f) in modes.iter().zip(figures) {
        println!("  relay, {mode:?}:");
        println!(
            "    from the in-memory outbox      : {:>8.0} msg/s  ({:.2} of raw pipelined)",
            median(f.memory),
            median(f.memory_ratio)
        );
        print_sql(&first.name(), f.first);
        print_sql(&second.name(), f.second);
    }
}
