//! Relay crash on Kafka: a relay process (`examples/kafka_relay_worker.rs`:
//! `OutboxRelay` over a SQLite outbox file, publishing to Kafka with the
//! idempotent producer, acks=all) is SIGKILLed at random points at least 50
//! times while 10k messages are enqueued. Afterwards every message is in the
//! topic (0 lost, at least once), and an inbox consumer applies each
//! message's effect exactly once (counted in its own store). The scenario is
//! `vextrus_testkit::relay_crash`, shared with JetStream.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use common::{brokers, source, topic};
use vextrus_sqlite::{SqliteEventStore, SqliteOutbox};
use vextrus_testkit::relay_crash::{CrashScenario, run_relay_crash};

fn worker_binary() -> PathBuf {
    // target/<profile>/deps/relay_crash-<hash> -> target/<profile>/examples/kafka_relay_worker
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples")
        .join("kafka_relay_worker");
    assert!(
        path.exists(),
        "{} is missing: `cargo test -p vextrus-kafka` builds the examples (or run `cargo build -p vextrus-kafka --example kafka_relay_worker` first)",
        path.display()
    );
    path
}

fn spawn_worker(sqlite_url: &str, n: usize) -> Child {
    Command::new(worker_binary())
        .args([sqlite_url, &brokers(), &format!("crash-{n}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the relay worker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_50_times_loses_nothing_and_the_inbox_applies_each_message_once() {
    let destination = topic("relay-crash", 3).await;
    let dir = tempfile::tempdir().unwrap();
    let sqlite_url = format!("sqlite:{}?mode=rwc", dir.path().join("outbox.db").display());
    let outbox = SqliteOutbox::new(SqliteEventStore::connect(&sqlite_url).await.unwrap());
    outbox.migrate().await.unwrap();
    let scenario = CrashScenario::default();
    let report = run_relay_crash(
        &outbox,
        &destination,
        &scenario,
        |n| spawn_worker(&sqlite_url, n),
        || async { source(&destination) },
    )
    .await;
    println!(
        "{} kills; published after each: {:?}; consumer: {} processed, {} duplicates",
        scenario.kills, report.published_at_kills, report.processed, report.duplicates
    );
}
