//! Relay throughput and latency to JetStream, beside the raw client's rate.
//!
//! `cargo bench -p vextrus-nats --bench relay` against the server at
//! `VEXTRUS_TEST_NATS_URL` (default nats://127.0.0.1:4222). In one run, on
//! one file-backed stream, it measures:
//!
//! 1. raw async-nats JetStream publishes awaiting each ack before the next
//!    (one at a time);
//! 2. raw async-nats publishes pipelined (all sent, then the acks awaited, in
//!    windows of 4096 outstanding acks), same headers and payload;
//!    The same again in rounds of 50 (one message per key, awaiting each
//!    round's acks before the next: the shape of the relay's publishing);
//! 3. the `OutboxRelay` draining an in-memory outbox whose messages were
//!    enqueued (committed) beforehand, through `JetStreamTransport`: enqueue
//!    committed -> broker ack, messages/s;
//!    The relay to an `InProcessTransport` shows the relay's own ceiling
//!    (claim, settle) without a broker;
//! 4. commit -> ack latency (p50/p99) with the relay running while messages
//!    are enqueued at a fixed rate of half the relay's measured maximum.
//!
//! Each figure is the median of `VEXTRUS_BENCH_RUNS` runs (default 3) of
//! `VEXTRUS_BENCH_MESSAGES` messages (default 20000; 50 partition keys,
//! 256-byte JSON payload, CloudEvents headers). The relay runs
//! `VEXTRUS_BENCH_RELAY_WORKERS` workers (default 3, as in the order test),
//! batches of 1024.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use uuid::Uuid;
use vextrus_core::outbox::{
    Backoff, DeadLetters, InMemoryOutbox, OutboxRelay, OutboxStore, RelayConfig,
};
use vextrus_core::transport::{
    InProcessTransport, MessageId, OutboundMessage, Transport, TransportError,
};
use vextrus_kernel::EventMetadata;
use vextrus_nats::{JetStreamConfig, JetStreamTransport, StreamSpec};

const KEYS: usize = 50;
const WINDOW: usize = 4096;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn messages(n: usize, destination: &str) -> Vec<OutboundMessage> {
    let meta = EventMetadata::new();
    let payload = format!(
        "{{\"order\":\"{}\",\"lines\":[{}]}}",
        Uuid::new_v4(),
        "1,".repeat(100)
    );
    (0..n)
        .map(|i| {
            OutboundMessage::cloud_events(
                destination,
                format!("order-{}", i % KEYS),
                "order.placed",
                1,
                "bench",
                payload.clone().into_bytes(),
                &meta,
            )
        })
        .collect()
}

fn nats_headers(message: &OutboundMessage) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", message.id.to_string().as_str());
    headers.insert("Vextrus-Partition-Key", message.partition_key.as_str());
    for (k, v) in &message.headers {
        headers.insert(k.as_str(), v.as_str());
    }
    headers
}

async fn raw_sequential(js: &jetstream::Context, batch: &[OutboundMessage]) -> f64 {
    let start = Instant::now();
    for m in batch {
        js.send_publish(
            m.destination.clone(),
            PublishMessage::build()
                .payload(Bytes::copy_from_slice(&m.payload))
                .headers(nats_headers(m)),
        )
        .await
        .expect("send")
        .await
        .expect("ack");
    }
    batch.len() as f64 / start.elapsed().as_secs_f64()
}

async fn raw_pipelined(js: &jetstream::Context, batch: &[OutboundMessage], window: usize) -> f64 {
    let start = Instant::now();
    for window in batch.chunks(window) {
        let mut acks = Vec::with_capacity(window.len());
        for m in window {
            acks.push(
                js.send_publish(
                    m.destination.clone(),
                    PublishMessage::build()
                        .payload(Bytes::copy_from_slice(&m.payload))
                        .headers(nats_headers(m)),
                )
                .await
                .expect("send"),
            );
        }
        for ack in futures::future::join_all(acks.into_iter().map(|a| a.into_future())).await {
            ack.expect("ack");
        }
    }
    batch.len() as f64 / start.elapsed().as_secs_f64()
}

async fn transport_rounds(transport: &JetStreamTransport, batch: &[OutboundMessage]) -> f64 {
    let start = Instant::now();
    for round in batch.chunks(KEYS) {
        for result in Transport::publish_batch(transport, round).await {
            result.expect("confirmed");
        }
    }
    batch.len() as f64 / start.elapsed().as_secs_f64()
}

/// Records when the relay saw each message's ack.
#[derive(Clone)]
struct AckClock {
    inner: JetStreamTransport,
    acked: Arc<Mutex<HashMap<MessageId, Instant>>>,
}

impl Transport for AckClock {
    async fn publish(&self, message: &OutboundMessage) -> Result<(), TransportError> {
        let result = self.inner.publish(message).await;
        if result.is_ok() {
            self.acked
                .lock()
                .unwrap()
                .insert(message.id, Instant::now());
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

fn relay_config(name: &str) -> RelayConfig {
    let mut config = RelayConfig::new(name);
    config.workers = env_usize("VEXTRUS_BENCH_RELAY_WORKERS", 3).max(1);
    config.batch_size = 1024;
    config.poll_interval = Duration::from_millis(5);
    config.backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(500), 2.0);
    config
}

async fn relay_throughput<T>(transport: &T, batch: &[OutboundMessage]) -> f64
where
    T: Transport + Clone + 'static,
{
    let outbox = InMemoryOutbox::new();
    for chunk in batch.chunks(1000) {
        outbox.enqueue(chunk).await.expect("enqueue");
    }
    let relay = OutboxRelay::new(outbox.clone(), transport.clone(), relay_config("bench"));
    let start = Instant::now();
    let handle = relay.spawn();
    loop {
        let status = outbox.status().await.expect("status");
        assert_eq!(status.dead, 0, "no dead letters in a benchmark");
        if status.pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = batch.len() as f64 / start.elapsed().as_secs_f64();
    handle.shutdown().await.expect("shutdown");
    rate
}

async fn relay_latency(
    transport: &JetStreamTransport,
    batch: &[OutboundMessage],
    rate: f64,
) -> (Duration, Duration) {
    let outbox = InMemoryOutbox::new();
    let clock = AckClock {
        inner: transport.clone(),
        acked: Arc::default(),
    };
    let relay = OutboxRelay::new(outbox.clone(), clock.clone(), relay_config("bench-latency"));
    let handle = relay.spawn();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut committed = HashMap::with_capacity(batch.len());
    let start = Instant::now();
    for (i, m) in batch.iter().enumerate() {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        outbox
            .enqueue(std::slice::from_ref(m))
            .await
            .expect("enqueue");
        committed.insert(m.id, Instant::now());
    }
    while outbox.status().await.expect("status").pending > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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

fn median_duration(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not run us long.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let url =
        std::env::var("VEXTRUS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let n = env_usize("VEXTRUS_BENCH_MESSAGES", 20_000);
    let runs = env_usize("VEXTRUS_BENCH_RUNS", 3).max(1);
    let tag = Uuid::new_v4().simple().to_string();
    let stream_name = format!("BENCH_{tag}");
    let root = format!("bench{tag}");
    let destination = format!("{root}.orders");
    let transport = JetStreamTransport::connect(
        JetStreamConfig::new(url.as_str())
            .with_stream(StreamSpec::new(stream_name.clone(), [format!("{root}.>")])),
    )
    .await
    .expect("NATS JetStream must be running");
    let js = transport.jetstream().clone();

    let in_process = InProcessTransport::new();
    in_process.declare(&destination);
    let (mut seq, mut pipe, mut rounds, mut via_transport, mut relay, mut ceiling) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut p50s, mut p99s) = (vec![], vec![]);
    for run in 1..=runs {
        let seq_batch = messages((n / 4).max(1), &destination);
        seq.push(raw_sequential(&js, &seq_batch).await);
        pipe.push(raw_pipelined(&js, &messages(n, &destination), WINDOW).await);
        rounds.push(raw_pipelined(&js, &messages(n, &destination), KEYS).await);
        via_transport.push(transport_rounds(&transport, &messages(n, &destination)).await);
        relay.push(relay_throughput(&transport, &messages(n, &destination)).await);
        ceiling.push(relay_throughput(&in_process, &messages(n, &destination)).await);
        let half = relay.last().copied().unwrap_or(1000.0) / 2.0;
        let latency_count = ((half * 5.0) as usize).clamp(500, n);
        let (p50, p99) =
            relay_latency(&transport, &messages(latency_count, &destination), half).await;
        p50s.push(p50);
        p99s.push(p99);
        println!(
            "run {run}: raw one-at-a-time {:.0} msg/s, raw pipelined {:.0} msg/s, relay {:.0} msg/s, \
             at {:.0} msg/s commit->ack p50 {:.2} ms p99 {:.2} ms",
            seq[run - 1],
            pipe[run - 1],
            relay[run - 1],
            half,
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
        );
        let _ = js
            .get_stream(&stream_name)
            .await
            .expect("stream")
            .purge()
            .await;
    }
    let (seq, pipe, rounds, via_transport, relay, ceiling) = (
        median(seq),
        median(pipe),
        median(rounds),
        median(via_transport),
        median(relay),
        median(ceiling),
    );
    let (p50, p99) = (median_duration(p50s), median_duration(p99s));
    println!();
    println!(
        "JetStream, {n} messages, {KEYS} keys, {} relay workers, medians of {runs} runs:",
        env_usize("VEXTRUS_BENCH_RELAY_WORKERS", 3).max(1)
    );
    println!("  raw publish, ack awaited one at a time : {seq:>10.0} msg/s");
    println!("  raw publish, pipelined acks            : {pipe:>10.0} msg/s");
    println!(
        "  raw publish, pipelined in rounds of {KEYS} : {rounds:>10.0} msg/s  (the relay's round: one message per key)"
    );
    println!(
        "  JetStreamTransport::publish_batch, same rounds: {via_transport:>8.0} msg/s  (the transport's own cost)"
    );
    println!(
        "  relay (in-memory outbox -> JetStream)  : {relay:>10.0} msg/s  ({:.2} of raw pipelined)",
        relay / pipe
    );
    println!("  relay to in-process (relay's ceiling)  : {ceiling:>10.0} msg/s");
    println!(
        "  commit -> ack at {:.0} msg/s            : p50 {:.2} ms, p99 {:.2} ms",
        relay / 2.0,
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
    let _ = js.delete_stream(&stream_name).await;
}
