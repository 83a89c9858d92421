//! Relay throughput and latency to JetStream, from an in-memory, a PostgreSQL
//! and a SQLite outbox, beside the raw async-nats client's rate in the same
//! run (the harness: `vextrus_testkit::relay_bench`).
//!
//! `cargo bench -p vextrus-nats --bench relay` against the server at
//! `VEXTRUS_TEST_NATS_URL` (default nats://127.0.0.1:4222), one file-backed
//! stream, and PostgreSQL at `VEXTRUS_TEST_PG_URL` (default
//! postgres://postgres@127.0.0.1:5432/postgres; each measurement gets a fresh
//! database, dropped at the end). The raw client publishes with the same
//! headers (`Nats-Msg-Id`, CloudEvents) and payload and awaits the same
//! JetStream acks.

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use uuid::Uuid;
use vextrus_core::transport::OutboundMessage;
use vextrus_nats::{JetStreamConfig, JetStreamTransport, StreamSpec};
use vextrus_testkit::relay_bench::{self, BenchBroker};

#[path = "../../testkit/bench_support/sql_outboxes.rs"]
mod sql_outboxes;
use sql_outboxes::{Postgres, Sqlite};

/// Acks awaited per window of the raw pipelined client.
const WINDOW: usize = 4096;

struct JetStream {
    transport: JetStreamTransport,
    js: jetstream::Context,
    stream: String,
    root: String,
}

fn publish_message(m: &OutboundMessage) -> PublishMessage {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", m.id.to_string().as_str());
    headers.insert("Vextrus-Partition-Key", m.partition_key.as_str());
    for (k, v) in &m.headers {
        headers.insert(k.as_str(), v.as_str());
    }
    PublishMessage::build()
        .payload(Bytes::copy_from_slice(&m.payload))
        .headers(headers)
}

impl BenchBroker for JetStream {
    type Transport = JetStreamTransport;

    fn name(&self) -> String {
        "NATS JetStream (file storage)".into()
    }

    fn transport(&self) -> JetStreamTransport {
        self.transport.clone()
    }

    async fn fresh_destination(&self) -> String {
        format!("{}.orders{}", self.root, Uuid::new_v4().simple())
    }

    async fn raw_one_at_a_time(&self, batch: &[OutboundMessage]) {
        for m in batch {
            self.js
                .send_publish(m.destination.clone(), publish_message(m))
                .await
                .expect("send")
                .await
                .expect("ack");
        }
    }

    async fn raw_pipelined(&self, batch: &[OutboundMessage]) {
        for window in batch.chunks(WINDOW) {
            let mut acks = Vec::with_capacity(window.len());
            for m in window {
                acks.push(
                    self.js
                        .send_publish(m.destination.clone(), publish_message(m))
                        .await
                        .expect("send"),
                );
            }
            for ack in futures::future::join_all(acks.into_iter().map(|a| a.into_future())).await {
                ack.expect("ack");
            }
        }
    }

    async fn remove_destination(&self, _destination: &str) {
        let _ = self
            .js
            .get_stream(&self.stream)
            .await
            .expect("stream")
            .purge()
            .await;
    }
}

#[tokio::main]
async fn main() {
    // `cargo test --benches` runs bench targets without `--bench`: skip the
    // measurement there (it needs minutes and the brokers).
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let url =
        std::env::var("VEXTRUS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let tag = Uuid::new_v4().simple().to_string();
    let stream = format!("BENCH_{tag}");
    let root = format!("bench{tag}");
    let transport = JetStreamTransport::connect(
        JetStreamConfig::new(url.as_str())
            .with_stream(StreamSpec::new(stream.clone(), [format!("{root}.>")])),
    )
    .await
    .expect("NATS JetStream must be running");
    let js = transport.jetstream().clone();
    let broker = JetStream {
        transport,
        js: js.clone(),
        stream: stream.clone(),
        root,
    };
    let pg = Postgres::from_env();
    relay_bench::run(&broker, &pg, &Sqlite).await;
    pg.drop_all().await;
    let _ = js.delete_stream(&stream).await;
}
