//! Relay throughput and latency to Kafka, beside the raw client's rate.
//!
//! `cargo bench -p vextrus-kafka --bench relay` against the broker at
//! `VEXTRUS_TEST_KAFKA_BROKERS` (default 127.0.0.1:9092; `scripts/kafka.sh`
//! starts one). In one run, on one fresh 6-partition topic, with the same
//! producer settings everywhere (idempotent, `acks=all`, linger 1 ms), it
//! measures:
//!
//! 1. raw rdkafka `FutureProducer` sends awaiting each delivery report
//!    before the next (one at a time);
//! 2. raw rdkafka sends pipelined (all handed to the producer, then the
//!    reports awaited, in windows of 4096), same key, headers and payload;
//! 3. the `OutboxRelay` draining an in-memory outbox whose messages were
//!    enqueued (committed) beforehand, through `KafkaTransport`: enqueue
//!    committed -> broker ack, messages/s;
//! 4. commit -> ack latency (p50/p99) with the relay running while messages
//!    are enqueued at a fixed rate of half the relay's measured maximum.
//!
//! Each figure is the median of `VEXTRUS_BENCH_RUNS` runs (default 3) of
//! `VEXTRUS_BENCH_MESSAGES` messages (default 20000; 50 partition keys,
//! 256-byte JSON payload, CloudEvents headers).

#![allow(missing_docs)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use uuid::Uuid;
use vextrus_core::outbox::{
    Backoff, DeadLetters, InMemoryOutbox, OutboxRelay, OutboxStore, RelayConfig,
};
use vextrus_core::transport::{MessageId, OutboundMessage, Transport, TransportError};
use vextrus_kafka::{KafkaConfig, KafkaTransport, create_topic};
use vextrus_kernel::EventMetadata;

const KEYS: usize = 50;
const WINDOW: usize = 4096;
const PARTITIONS: i32 = 6;

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

fn kafka_headers(message: &OutboundMessage) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(message.headers.len());
    for (k, v) in &message.headers {
        headers = headers.insert(Header {
            key: k.as_str(),
            value: Some(v.as_str()),
        });
    }
    headers
}

fn record(m: &OutboundMessage) -> FutureRecord<'_, str, [u8]> {
    FutureRecord::to(&m.destination)
        .key(m.partition_key.as_str())
        .payload(m.payload.as_slice())
        .headers(kafka_headers(m))
}

async fn raw_sequential(producer: &FutureProducer, batch: &[OutboundMessage]) -> f64 {
    let start = Instant::now();
    for m in batch {
        producer
            .send(record(m), Duration::from_secs(30))
            .await
            .map_err(|(err, _)| err)
            .expect("delivery");
    }
    batch.len() as f64 / start.elapsed().as_secs_f64()
}

async fn raw_pipelined(producer: &FutureProducer, batch: &[OutboundMessage], window: usize) -> f64 {
    let start = Instant::now();
    for window in batch.chunks(window) {
        let mut reports = Vec::with_capacity(window.len());
        for m in window {
            let mut rec = record(m);
            loop {
                match producer.send_result(rec) {
                    Ok(report) => break reports.push(report),
                    Err((_, back)) => {
                        rec = back;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        }
        for report in futures::future::join_all(reports).await {
            report
                .expect("report")
                .map_err(|(err, _)| err)
                .expect("delivery");
        }
    }
    batch.len() as f64 / start.elapsed().as_secs_f64()
}

/// `KafkaTransport::publish_batch` in the relay's rounds (one message per
/// key, each round's reports awaited before the next): the transport's own
/// cost beside the raw client's rounds.
async fn transport_rounds(transport: &KafkaTransport, batch: &[OutboundMessage]) -> f64 {
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
    inner: KafkaTransport,
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
    config.workers = 1;
    config.batch_size = 1024;
    config.poll_interval = Duration::from_millis(5);
    config.backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(500), 2.0);
    config
}

async fn relay_throughput(transport: &KafkaTransport, batch: &[OutboundMessage]) -> f64 {
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
    transport: &KafkaTransport,
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
    // `cargo test --benches` lists or runs us briefly; only `cargo bench` measures.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let brokers =
        std::env::var("VEXTRUS_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let n = env_usize("VEXTRUS_BENCH_MESSAGES", 20_000);
    let runs = env_usize("VEXTRUS_BENCH_RUNS", 3).max(1);
    let config = KafkaConfig::new(brokers.as_str()).with_client_id("vextrus-bench");
    let transport = KafkaTransport::new(config.clone()).expect("producer");
    // The raw client: the transport's own producer settings (idempotent,
    // acks=all, linger 1 ms), without the transport around it.
    let raw = KafkaTransport::new(config.clone()).expect("producer");
    let producer = raw.producer().clone();

    let (mut seq, mut pipe, mut rounds, mut via_transport, mut relay, mut p50s, mut p99s) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for run in 1..=runs {
        let topic = format!("bench-{}", Uuid::now_v7().simple());
        create_topic(&config, &topic, PARTITIONS)
            .await
            .expect("a Kafka broker must be running (scripts/kafka.sh)");
        let seq_batch = messages((n / 10).max(1), &topic);
        seq.push(raw_sequential(&producer, &seq_batch).await);
        pipe.push(raw_pipelined(&producer, &messages(n, &topic), WINDOW).await);
        rounds.push(raw_pipelined(&producer, &messages(n, &topic), KEYS).await);
        via_transport.push(transport_rounds(&transport, &messages(n, &topic)).await);
        relay.push(relay_throughput(&transport, &messages(n, &topic)).await);
        let half = relay.last().copied().unwrap_or(1000.0) / 2.0;
        let latency_count = ((half * 5.0) as usize).clamp(500, n);
        let (p50, p99) = relay_latency(&transport, &messages(latency_count, &topic), half).await;
        p50s.push(p50);
        p99s.push(p99);
        println!(
            "run {run}: raw one-at-a-time {:.0} msg/s, raw pipelined {:.0} msg/s, raw rounds {:.0} msg/s, \
             transport rounds {:.0} msg/s, relay {:.0} msg/s, at {:.0} msg/s commit->ack p50 {:.2} ms p99 {:.2} ms",
            seq[run - 1],
            pipe[run - 1],
            rounds[run - 1],
            via_transport[run - 1],
            relay[run - 1],
            half,
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
        );
    }
    let (seq, pipe, rounds, via_transport, relay) = (
        median(seq),
        median(pipe),
        median(rounds),
        median(via_transport),
        median(relay),
    );
    let (p50, p99) = (median_duration(p50s), median_duration(p99s));
    println!();
    println!(
        "Kafka ({brokers}), {n} messages, {KEYS} keys, {PARTITIONS} partitions, medians of {runs} runs:"
    );
    println!("  raw produce, report awaited one at a time : {seq:>10.0} msg/s");
    println!("  raw produce, pipelined reports            : {pipe:>10.0} msg/s");
    println!(
        "  raw produce, pipelined in rounds of {KEYS}     : {rounds:>10.0} msg/s  (the relay's round: one message per key)"
    );
    println!(
        "  KafkaTransport::publish_batch, same rounds: {via_transport:>10.0} msg/s  (the transport's own cost)"
    );
    println!(
        "  relay (in-memory outbox -> Kafka)         : {relay:>10.0} msg/s  ({:.2} of raw pipelined)",
        relay / pipe
    );
    println!(
        "  commit -> ack at {:.0} msg/s               : p50 {:.2} ms, p99 {:.2} ms",
        relay / 2.0,
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
}
