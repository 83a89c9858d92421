//! Relay crash: a relay process (`examples/relay_worker.rs`: `OutboxRelay`
//! over a SQLite outbox file, publishing to JetStream) is SIGKILLed at random
//! points at least 50 times while 10k messages are enqueued. Afterwards every
//! message is in the stream (0 lost, at least once), and an inbox consumer
//! applies each message's effect exactly once (counted in its own store).

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;
use support::{nats_url, with_stream};
use vextrus_core::BoxError;
use vextrus_core::inbox::{InboxConfig, InboxConsumer, InboxHandler, InboxOutcome};
use vextrus_core::outbox::{
    Backoff, DeadLetters, InMemoryOutbox, InMemoryUnitOfWorkTx, OutboxStore,
};
use vextrus_core::transport::{InboundMessage, MessageId, OutboundMessage};
use vextrus_kernel::EventMetadata;
use vextrus_nats::{ConsumerSpec, JetStreamConfig, JetStreamSource, JetStreamTransport};
use vextrus_sqlite::{SqliteEventStore, SqliteOutbox};

const MESSAGES: usize = 10_000;
const KILLS: usize = 50;

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

#[derive(Clone, Default)]
struct CountingHandler {
    runs: Arc<Mutex<u64>>,
}

impl InboxHandler<InMemoryUnitOfWorkTx> for CountingHandler {
    async fn handle(
        &self,
        tx: &mut InMemoryUnitOfWorkTx,
        message: &InboundMessage,
    ) -> Result<(), BoxError> {
        *self.runs.lock().unwrap() += 1;
        let key = message.id.to_string();
        let count = tx
            .get("effects", &key)
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        tx.put("effects", &key, json!(count + 1));
        Ok(())
    }
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

        // Enqueue 10k messages over ~15 s, in commits of 25.
        let meta = EventMetadata::new();
        let sent: Vec<OutboundMessage> = (0..MESSAGES)
            .map(|i| {
                OutboundMessage::cloud_events(
                    destination.clone(),
                    format!("order-{}", i % 50),
                    "order.placed",
                    1,
                    "crash-test",
                    i.to_string().into_bytes(),
                    &meta,
                )
            })
            .collect();
        let producer = {
            let outbox = outbox.clone();
            let sent = sent.clone();
            tokio::spawn(async move {
                for chunk in sent.chunks(25) {
                    outbox.enqueue(chunk).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(35)).await;
                }
            })
        };

        // Kill the relay at random points while the messages flow.
        let mut published_at_kills = Vec::new();
        for n in 0..KILLS {
            let mut child = spawn_worker(&sqlite_url, &stream.name, &subjects, n);
            let life = rand::rng().random_range(50..400);
            tokio::time::sleep(Duration::from_millis(life)).await;
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            published_at_kills.push(outbox.status().await.unwrap().published);
        }
        producer.await.unwrap();
        assert!(
            published_at_kills.last() > published_at_kills.first(),
            "the killed relays made progress: {published_at_kills:?}"
        );

        // A last relay drains the rest.
        let mut last = spawn_worker(&sqlite_url, &stream.name, &subjects, KILLS);
        // It must keep making progress: fail after 60 s without any.
        let (mut progress_at, mut published) = (Instant::now(), 0);
        loop {
            let status = outbox.status().await.unwrap();
            assert_eq!(status.dead, 0, "no dead letters");
            if status.pending == 0 {
                break;
            }
            if status.published > published {
                (progress_at, published) = (Instant::now(), status.published);
            }
            assert!(
                progress_at.elapsed() < Duration::from_secs(60),
                "no progress for 60 s; {} still pending",
                status.pending
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        last.kill().unwrap();
        last.wait().unwrap();

        // The consumer: every message once, whatever the stream holds.
        let store = InMemoryOutbox::new();
        let handler = CountingHandler::default();
        let source = JetStreamSource::connect(
            JetStreamConfig::new(nats_url()),
            ConsumerSpec::new(stream.name.clone(), "crash-consumer").with_batch(500),
        )
        .await
        .unwrap();
        let mut consumer = InboxConsumer::new(
            store.clone(),
            source,
            handler.clone(),
            InboxConfig::new("crash-consumer").backoff(Backoff::new(
                Duration::from_millis(10),
                Duration::from_millis(100),
                2.0,
            )),
        );
        let (mut processed, mut duplicates) = (0usize, 0usize);
        loop {
            let wait = if processed < MESSAGES { 10 } else { 2 };
            match tokio::time::timeout(Duration::from_secs(wait), consumer.process_next()).await {
                Ok(outcome) => match outcome.unwrap().unwrap() {
                    InboxOutcome::Processed => processed += 1,
                    InboxOutcome::Duplicate => duplicates += 1,
                    other => panic!("unexpected outcome {other:?}"),
                },
                Err(_) if processed < MESSAGES => {
                    panic!("lost {} of {MESSAGES} messages", MESSAGES - processed)
                }
                Err(_) => break,
            }
        }
        assert_eq!(processed, MESSAGES, "each message processed once");
        for message in &sent {
            assert_eq!(
                store.document("effects", &message.id.to_string()),
                Some(json!(1)),
                "effect of {} exactly once",
                message.id
            );
        }
        assert_eq!(*handler.runs.lock().unwrap(), MESSAGES as u64);
        let ids: std::collections::HashSet<MessageId> = sent.iter().map(|m| m.id).collect();
        assert_eq!(ids.len(), MESSAGES);
        println!(
            "{KILLS} kills; published after each: {published_at_kills:?}; \
             consumer: {processed} processed, {duplicates} duplicates"
        );
    })
    .await;
}
