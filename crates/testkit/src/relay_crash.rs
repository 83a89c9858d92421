//! The relay crash scenario, for any broker: relay *processes* are killed
//! with SIGKILL at random points while messages are enqueued, then a last
//! relay drains the outbox and an inbox consumer reads everything back.
//!
//! What it proves: 0 messages lost (the outbox ends with nothing pending and
//! no dead letters, and the consumer sees every id), delivery at least once
//! (duplicates are counted, not failed), and with the inbox each message's
//! effect applied exactly once (counted in the consumer's own store).
//!
//! The broker-specific parts are passed in: how to start a relay worker
//! process over the outbox, and how to open a consumer on the destination.
//! `crates/nats/tests/relay_crash.rs` and `crates/kafka/tests/relay_crash.rs`
//! run it.

use std::collections::HashSet;
use std::future::Future;
use std::ops::Range;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use vextrus_core::inbox::InboxOutcome;
use vextrus_core::outbox::{DeadLetters, OutboxStore};
use vextrus_core::transport::{MessageId, MessageSource, OutboundMessage};
use vextrus_kernel::EventMetadata;

use crate::relay_inbox::{counting_consumer, effect_count};

/// How big the run is.
#[derive(Debug, Clone)]
pub struct CrashScenario {
    /// Messages enqueued in all.
    pub messages: usize,
    /// Relay processes killed while they flow.
    pub kills: usize,
    /// Distinct partition keys.
    pub keys: usize,
    /// Messages per enqueue commit.
    pub chunk: usize,
    /// Pause between enqueue commits.
    pub enqueue_pause: Duration,
    /// How long each killed relay lives, in milliseconds (drawn uniformly).
    pub life_ms: Range<u64>,
    /// Fail if the last relay makes no progress for this long.
    pub stall: Duration,
}

impl Default for CrashScenario {
    /// 10,000 messages over 50 keys in commits of 25, 50 kills after
    /// 50–400 ms of life each.
    fn default() -> Self {
        Self {
            messages: 10_000,
            kills: 50,
            keys: 50,
            chunk: 25,
            enqueue_pause: Duration::from_millis(35),
            life_ms: 50..400,
            stall: Duration::from_secs(60),
        }
    }
}

/// What a crash run observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashReport {
    /// Published rows in the outbox after each kill (progress under fire).
    pub published_at_kills: Vec<u64>,
    /// Messages the consumer processed (their effect applied).
    pub processed: usize,
    /// Redeliveries the inbox absorbed.
    pub duplicates: usize,
}

impl std::fmt::Display for CrashReport {
    /// `N kills; published after each: [..]; consumer: P processed, D duplicates`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} kills; published after each: {:?}; consumer: {} processed, {} duplicates",
            self.published_at_kills.len(),
            self.published_at_kills,
            self.processed,
            self.duplicates
        )
    }
}

/// The path of example `name` of package `package`, built beside the
/// running test binary (`target/<profile>/deps/<test>-<hash>` →
/// `target/<profile>/examples/<name>`); panics, saying how to build it, when
/// it is missing. `cargo test -p <package>` builds the examples.
pub fn example_binary(package: &str, name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps")
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: `cargo test -p {package}` builds the examples (or run `cargo build -p {package} --example {name}` first)",
        path.display()
    );
    path
}

/// Starts `binary` with `args`, its output discarded: one relay worker
/// process for [`run_relay_crash`].
pub fn spawn_quiet(binary: &std::path::Path, args: &[&str]) -> Child {
    std::process::Command::new(binary)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|err| panic!("start {}: {err}", binary.display()))
}

fn random_life(range: &Range<u64>) -> Duration {
    use rand::Rng;
    let end = range.end.max(range.start + 1);
    Duration::from_millis(rand::rng().random_range(range.start..end))
}

/// Runs the scenario; panics (failing the test) on any loss, dead letter,
/// stall or double effect, and returns what it saw.
///
/// - `outbox`: the outbox the relay processes read (a SQLite file, say);
/// - `destination`: the topic or subject the messages go to;
/// - `spawn_worker(n)`: starts relay process number `n` over `outbox`;
/// - `open_source()`: a consumer of `destination` that reads it from the start.
pub async fn run_relay_crash<O, W, F, Fut, S>(
    outbox: &O,
    destination: &str,
    scenario: &CrashScenario,
    mut spawn_worker: W,
    open_source: F,
) -> CrashReport
where
    O: OutboxStore + DeadLetters + Clone + Send + Sync + 'static,
    W: FnMut(usize) -> Child,
    F: FnOnce() -> Fut,
    Fut: Future<Output = S>,
    S: MessageSource,
{
    let meta = EventMetadata::new();
    let sent: Vec<OutboundMessage> = (0..scenario.messages)
        .map(|i| {
            OutboundMessage::cloud_events(
                destination,
                format!("order-{}", i % scenario.keys.max(1)),
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
        let (chunk, pause) = (scenario.chunk.max(1), scenario.enqueue_pause);
        tokio::spawn(async move {
            for part in sent.chunks(chunk) {
                outbox.enqueue(part).await.expect("enqueue");
                tokio::time::sleep(pause).await;
            }
        })
    };

    // Kill relays at random points while the messages flow.
    let mut published_at_kills = Vec::with_capacity(scenario.kills);
    for n in 0..scenario.kills {
        let mut child = spawn_worker(n);
        tokio::time::sleep(random_life(&scenario.life_ms)).await;
        child.kill().expect("SIGKILL the relay");
        child.wait().expect("reap the relay");
        published_at_kills.push(outbox.status().await.expect("status").published);
    }
    producer.await.expect("the producer finished");
    assert!(
        published_at_kills.last() > published_at_kills.first(),
        "the killed relays made progress: {published_at_kills:?}"
    );

    // A last relay drains the rest, making progress all along.
    let mut last = spawn_worker(scenario.kills);
    let (mut progress_at, mut published) = (Instant::now(), 0);
    loop {
        let status = outbox.status().await.expect("status");
        assert_eq!(status.dead, 0, "no dead letters");
        if status.pending == 0 {
            break;
        }
        if status.published > published {
            (progress_at, published) = (Instant::now(), status.published);
        }
        assert!(
            progress_at.elapsed() < scenario.stall,
            "no progress for {:?}; {} still pending",
            scenario.stall,
            status.pending
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last.kill().expect("stop the last relay");
    last.wait().expect("reap the last relay");

    // The consumer: every message, its effect once.
    let (store, handler, mut consumer) = counting_consumer("crash-consumer", open_source().await);
    let (mut processed, mut duplicates) = (0usize, 0usize);
    loop {
        let wait = if processed < scenario.messages { 20 } else { 2 };
        match tokio::time::timeout(Duration::from_secs(wait), consumer.process_next()).await {
            Ok(outcome) => match outcome.expect("consume").expect("source open") {
                InboxOutcome::Processed => processed += 1,
                InboxOutcome::Duplicate => duplicates += 1,
                other => panic!("unexpected outcome {other:?}"),
            },
            Err(_) if processed < scenario.messages => panic!(
                "lost {} of {} messages",
                scenario.messages - processed,
                scenario.messages
            ),
            Err(_) => break,
        }
    }
    assert_eq!(processed, scenario.messages, "each message processed once");
    for message in &sent {
        assert_eq!(
            effect_count(&store, message),
            Some(1),
            "effect of {} exactly once",
            message.id
        );
    }
    assert_eq!(handler.runs(), scenario.messages as u64);
    let ids: HashSet<MessageId> = sent.iter().map(|m| m.id).collect();
    assert_eq!(ids.len(), scenario.messages);
    CrashReport {
        published_at_kills,
        processed,
        duplicates,
    }
}
