//! A relay process: `OutboxRelay` over a SQLite outbox file, publishing to
//! Kafka, running until it is killed.
//!
//! `kafka_relay_worker <sqlite-url> <brokers> <name>`
//!
//! Used by `tests/relay_crash.rs`, which SIGKILLs it at random points; also a
//! minimal example of wiring a relay process.

use std::time::Duration;

use vextrus_core::outbox::{Backoff, OutboxRelay, RelayConfig};
use vextrus_kafka::{KafkaConfig, KafkaTransport};
use vextrus_sqlite::{SqliteEventStore, SqliteOutbox};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, sqlite_url, brokers, name] = args.as_slice() else {
        return Err("usage: kafka_relay_worker <sqlite-url> <brokers> <name>".into());
    };
    let outbox = SqliteOutbox::new(SqliteEventStore::connect(sqlite_url).await?);
    let transport = KafkaTransport::new(
        KafkaConfig::new(brokers.as_str())
            .with_client_id(name.as_str())
            .with_delivery_timeout(Duration::from_secs(20)),
    )?;
    let mut config = RelayConfig::new(name.clone());
    config.workers = 2;
    config.batch_size = 200;
    // Short leases: a killed worker's claims pass to the next process soon.
    config.lease = Duration::from_secs(1);
    config.poll_interval = Duration::from_millis(20);
    config.max_attempts = 1000;
    config.backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500), 2.0);
    let relay = OutboxRelay::new(outbox, transport, config);
    let _handle = relay.spawn();
    println!("ready");
    std::future::pending::<()>().await;
    Ok(())
}
