//! A relay process: `OutboxRelay` over a SQLite outbox file, publishing to
//! JetStream, running until it is killed.
//!
//! `relay_worker <sqlite-url> <nats-url> <stream> <subject-pattern> <name>`
//!
//! Used by `tests/relay_crash.rs`, which SIGKILLs it at random points; also a
//! minimal example of wiring a relay process.

use std::time::Duration;

use vextrus_core::outbox::{Backoff, OutboxRelay, RelayConfig};
use vextrus_nats::{JetStreamConfig, JetStreamTransport, StreamSpec};
use vextrus_sqlite::{SqliteEventStore, SqliteOutbox};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, sqlite_url, nats_url, stream, subjects, name] = args.as_slice() else {
        return Err(
            "usage: relay_worker <sqlite-url> <nats-url> <stream> <subject-pattern> <name>".into(),
        );
    };
    let outbox = SqliteOutbox::new(SqliteEventStore::connect(sqlite_url).await?);
    let transport = JetStreamTransport::connect(
        JetStreamConfig::new(nats_url.as_str())
            .with_stream(StreamSpec::new(stream.clone(), [subjects.clone()]))
            .with_ensure_streams(false),
    )
    .await?;
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
