//! Relay crash on Kafka: a relay process (`examples/kafka_relay_worker.rs`:
//! `OutboxRelay` over a SQLite outbox file, publishing to Kafka with the
//! idempotent producer, acks=all) is SIGKILLed at random points at least 50
//! times while 10k messages are enqueued. Afterwards every message is in the
//! topic (0 lost, at least once), and an inbox consumer applies each
//! message's effect exactly once (counted in its own store). The scenario is
//! `vextrus_testkit::relay_crash`, shared with JetStream.

mod common;

use common::{brokers, source, topic};
use vextrus_sqlite::{SqliteEventStore, SqliteOutbox};
use vextrus_testkit::relay_crash::{CrashScenario, example_binary, run_relay_crash, spawn_quiet};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_50_times_loses_nothing_and_the_inbox_applies_each_message_once() {
    let destination = topic("relay-crash", 3).await;
    let dir = tempfile::tempdir().unwrap();
    let sqlite_url = format!("sqlite:{}?mode=rwc", dir.path().join("outbox.db").display());
    let outbox = SqliteOutbox::new(SqliteEventStore::connect(&sqlite_url).await.unwrap());
    outbox.migrate().await.unwrap();
    let worker = example_binary("vextrus-kafka", "kafka_relay_worker");
    let brokers = brokers();
    let report = run_relay_crash(
        &outbox,
        &destination,
        &CrashScenario::default(),
        |n| spawn_quiet(&worker, &[&sqlite_url, &brokers, &format!("crash-{n}")]),
        || async { source(&destination) },
    )
    .await;
    println!("{report}");
}
