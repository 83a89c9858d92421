//! Relay throughput and latency to Kafka, from an in-memory, a PostgreSQL
//! and a SQLite outbox, beside the raw rdkafka producer's rate in the same run
//! (the harness: `vextrus_testkit::relay_bench`).
//!
//! `cargo bench -p vextrus-kafka --bench relay` against the broker at
//! `VEXTRUS_TEST_KAFKA_BROKERS` (default 127.0.0.1:9092; `scripts/kafka.sh`
//! starts one), a fresh 6-partition topic per run, and PostgreSQL at
//! `VEXTRUS_TEST_PG_URL` (default postgres://postgres@127.0.0.1:5432/postgres;
//! each measurement gets a fresh database, dropped at the end). The raw
//! client is a second `KafkaTransport`'s own producer (idempotent,
//! `acks=all`, linger 1 ms), sending the same key, headers and payload.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use uuid::Uuid;
use vextrus_core::transport::OutboundMessage;
use vextrus_kafka::{KafkaConfig, KafkaTransport, create_topic};
use vextrus_testkit::relay_bench::{self, BenchBroker};

#[path = "../../testkit/bench_support/sql_outboxes.rs"]
mod sql_outboxes;
use sql_outboxes::{Postgres, Sqlite};

/// Delivery reports awaited per window of the raw pipelined client.
const WINDOW: usize = 4096;
const PARTITIONS: i32 = 6;

struct Kafka {
    config: KafkaConfig,
    transport: KafkaTransport,
    producer: FutureProducer,
}

fn record(m: &OutboundMessage) -> FutureRecord<'_, str, [u8]> {
    let mut headers = OwnedHeaders::new_with_capacity(m.headers.len() + 1);
    let id = m.id.to_string();
    if !m.headers.contains_key("ce_id") {
        headers = headers.insert(Header {
            key: "ce_id",
            value: Some(id.as_str()),
        });
    }
    for (k, v) in &m.headers {
        headers = headers.insert(Header {
            key: k.as_str(),
            value: Some(v.as_str()),
        });
    }
    FutureRecord::to(&m.destination)
        .key(m.partition_key.as_str())
        .payload(m.payload.as_slice())
        .headers(headers)
        .timestamp(m.created_at.timestamp_millis())
}

impl BenchBroker for Kafka {
    type Transport = KafkaTransport;

    fn name(&self) -> String {
        format!("Kafka ({}, {PARTITIONS} partitions)", self.config.brokers())
    }

    fn transport(&self) -> KafkaTransport {
        self.transport.clone()
    }

    async fn fresh_destination(&self) -> String {
        let topic = format!("bench-{}", Uuid::now_v7().simple());
        create_topic(&self.config, &topic, PARTITIONS)
            .await
            .expect("a Kafka broker must be running (scripts/kafka.sh)");
        topic
    }

    async fn raw_one_at_a_time(&self, batch: &[OutboundMessage]) {
        for m in batch {
            self.producer
                .send(record(m), Duration::from_secs(30))
                .await
                .map_err(|(err, _)| err)
                .expect("delivery");
        }
    }

    async fn raw_pipelined(&self, batch: &[OutboundMessage]) {
        for window in batch.chunks(WINDOW) {
            let mut reports = Vec::with_capacity(window.len());
            for m in window {
                let mut rec = record(m);
                loop {
                    match self.producer.send_result(rec) {
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
    }

    async fn remove_destination(&self, _destination: &str) {
        // Topics are left to the broker's retention (the crate has no
        // topic deletion); each run writes a fresh one.
    }
}

#[tokio::main]
async fn main() {
    // `cargo test --benches` runs bench targets without `--bench`: skip the
    // measurement there (it needs minutes and the brokers).
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let brokers =
        std::env::var("VEXTRUS_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let config = KafkaConfig::new(brokers.as_str()).with_client_id("vextrus-bench");
    let transport = KafkaTransport::new(config.clone()).expect("producer");
    // The raw client: the transport's own producer settings, without the
    // transport around it.
    let raw = KafkaTransport::new(config.clone()).expect("producer");
    let broker = Kafka {
        config,
        transport,
        producer: raw.producer().clone(),
    };
    let pg = Postgres::from_env();
    relay_bench::run(&broker, &pg, &Sqlite).await;
    pg.drop_all().await;
}
