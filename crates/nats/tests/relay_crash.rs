//! Relay crash: a relay process (`examples/relay_worker.rs`: `OutboxRelay`
//! over a SQLite outbox file, publishing to JetStream) is SIGKILLed at random
//! points at least 50 times while 10k messages are enqueued. Afterwards every
//! message is in the stream (0 lost, at least once), and an inbox consumer
//! applies each message's effect exactly once (counted in its own store).
//! The scenario itself is `vextrus_testkit::relay_crash`, shared with Kafka.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use support::{nats_url, with_stream};
use vextrus_nats::{ConsumerSpec, JetStreamConfig, JetStreamSource, JetStreamTransport};
use vextrus_sqlite::{SqliteEventStore, SqliteOutbox};
use vextrus_testkit::relay_crash::{CrashScenario, run_relay_crash};

fn worker_binary() -> PathBuf {
    // target/<profile>/deps/relay_crash-<hash> -> target/<profile>/examples/relay_worker
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples")
        .join("relay_worker");
    assert!(
        path.exists(),
        "{} is missing: `cargo test -p vextrus-nats` builds the examples (or run `cargo build -p vextrus-nats --example relay_worker` first)",
        path.display()
    );
    path
}

fn spawn_worker(sqlite_url: &str, stream: &str, subjects: &str, n: usize) -> Child {
    Command::new(worker_binary())
        .args([
            sqlite_url,
            &nats_url(),
            stream,
            subjects,
            &format!("crash-{n}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the relay worker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_50_times_loses_nothing_and_the_inbox_applies_each_message_once() {
    with_stream(|stream| async move {
        // The stream exists before the workers start (they only check it).
        JetStreamTransport::connect(stream.config()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sqlite_url = format!("sqlite:{}?mode=rwc", dir.path().join("outbox.db").display());
        let outbox = SqliteOutbox::new(SqliteEventStore::connect(&sqlite_url).await.unwrap());
        outbox.migrate().await.unwrap();
        let subjects = format!("{}.>", stream.root);
        let destination = stream.subject("orders");
        let scenario = CrashScenario::default();
        let report = run_relay_crash(
            &outbox,
            &destination,
            &scenario,
            |n| spawn_worker(&sqlite_url, &stream.name, &subjects, n),
            || async {
                JetStreamSource::connect(
                    JetStreamConfig::new(nats_url()),
                    ConsumerSpec::new(stream.name.clone(), "crash-consumer").with_batch(500),
                )
                .await
                .unwrap()
            },
        )
        .await;
        println!(
            "{} kills; published after each: {:?}; consumer: {} processed, {} duplicates",
            scenario.kills, report.published_at_kills, report.processed, report.duplicates
        );
    })
    .await;
}
