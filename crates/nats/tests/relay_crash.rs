//! Relay crash: a relay process (`examples/relay_worker.rs`: `OutboxRelay`
//! over a SQLite outbox file, publishing to JetStream) is SIGKILLed at random
//! points at least 50 times while 10k messages are enqueued. Afterwards every
//! message is in the stream (0 lost, at least once), and an inbox consumer
//! applies each message's effect exactly once (counted in its own store).
//! The scenario itself is `vextrus_testkit::relay_crash`, shared with Kafka.

mod support;

use support::{nats_url, with_stream};
use vextrus_nats::{ConsumerSpec, JetStreamConfig, JetStreamSource, JetStreamTransport};
use vextrus_sqlite::{SqliteEventStore, SqliteOutbox};
use vextrus_testkit::relay_crash::{CrashScenario, example_binary, run_relay_crash, spawn_quiet};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_50_times_loses_nothing_and_the_inbox_applies_each_message_once() {
    with_stream(|stream| async move {
        // The stream exists before the workers start (they only check it).
        JetStreamTransport::connect(stream.config()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sqlite_url = format!("sqlite:{}?mode=rwc", dir.path().join("outbox.db").display());
        let outbox = SqliteOutbox::new(SqliteEventStore::connect(&sqlite_url).await.unwrap());
        outbox.migrate().await.unwrap();
        let worker = example_binary("vextrus-nats", "relay_worker");
        let (nats, subjects) = (nats_url(), format!("{}.>", stream.root));
        let report = run_relay_crash(
            &outbox,
            &stream.subject("orders"),
            &CrashScenario::default(),
            |n| {
                let name = format!("crash-{n}");
                spawn_quiet(
                    &worker,
                    &[&sqlite_url, &nats, &stream.name, &subjects, &name],
                )
            },
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
        println!("{report}");
    })
    .await;
}
