//! The relay → broker → inbox scenarios, for any broker: the core engines
//! ([`OutboxRelay`] publishing, [`InboxConsumer`] consuming) over a real
//! transport.
//!
//! - [`relay_keeps_each_keys_order`]: several relay workers drain an
//!   in-memory outbox, filled while they run, into the destination; a
//!   consumer reading it back sees every message and, per partition key, the
//!   messages in the order they were enqueued.
//! - [`inbox_applies_a_true_duplicate_once`]: the same message is published
//!   twice (as a relay that crashed after the broker stored the message but
//!   before the outbox marked it sent does); the broker holds two records with
//!   one id, and the inbox applies the effect once.
//!
//! The broker-specific parts are passed in: the transport, a fresh
//! destination, and how to open a consumer that reads it from the start.
//! `crates/nats/tests/relay_inbox.rs` and `crates/kafka/tests/relay_inbox.rs`
//! run them. [`CountingHandler`] is the effect counter these scenarios and
//! [`relay_crash`](crate::relay_crash) share.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use vextrus_core::BoxError;
use vextrus_core::inbox::{InboxConfig, InboxConsumer, InboxHandler, InboxOutcome, InboxStore};
use vextrus_core::outbox::{
    Backoff, DeadLetters, InMemoryOutbox, InMemoryUnitOfWorkTx, OutboxRelay, OutboxStore,
    RelayConfig,
};
use vextrus_core::transport::{
    InboundMessage, MessageDelivery, MessageSource, OutboundMessage, Transport,
};
use vextrus_kernel::EventMetadata;

/// The table in the consumer's store where [`CountingHandler`] counts
/// effects, one document per message id.
pub const EFFECTS: &str = "effects";

/// An inbox handler that counts each message's effect in the consumer's own
/// store (inside the inbox transaction, document [`EFFECTS`]/`message id`)
/// and every run of the handler outside it.
///
/// ```
/// use vextrus_core::inbox::InboxHandler;
/// use vextrus_core::outbox::InMemoryOutbox;
/// use vextrus_core::unit_of_work::UnitOfWork;
/// use vextrus_core::transport::{InboundMessage, OutboundMessage};
/// use vextrus_testkit::relay_inbox::{CountingHandler, effect_count};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let handler = CountingHandler::default();
/// let store = InMemoryOutbox::new();
/// let message = OutboundMessage::new("d", "k", vec![]);
/// let mut tx = store.begin().await.unwrap();
/// handler.handle(&mut tx, &InboundMessage::from_outbound(&message, 1)).await.unwrap();
/// store.commit(tx).await.unwrap();
/// assert_eq!(handler.runs(), 1);
/// assert_eq!(effect_count(&store, &message), Some(1));
/// # });
/// ```
#[derive(Clone, Default, Debug)]
pub struct CountingHandler {
    runs: Arc<Mutex<u64>>,
}

impl CountingHandler {
    /// How many times the handler ran (committed or not).
    pub fn runs(&self) -> u64 {
        *self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl InboxHandler<InMemoryUnitOfWorkTx> for CountingHandler {
    async fn handle(
        &self,
        tx: &mut InMemoryUnitOfWorkTx,
        message: &InboundMessage,
    ) -> Result<(), BoxError> {
        *self.runs.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        let key = message.id.to_string();
        let count = tx.get(EFFECTS, &key).and_then(|v| v.as_u64()).unwrap_or(0);
        tx.put(EFFECTS, &key, json!(count + 1));
        Ok(())
    }
}

/// The committed effect count of `message` in `store` (`None`: never
/// applied).
pub fn effect_count(store: &InMemoryOutbox, message: &OutboundMessage) -> Option<u64> {
    store
        .document(EFFECTS, &message.id.to_string())
        .and_then(|v| v.as_u64())
}

/// An inbox consumer named `name` over `source`, writing to a fresh
/// in-memory store through a [`CountingHandler`], with a short backoff (a
/// failure shows quickly). Returns the store and the handler to check
/// effects with.
pub fn counting_consumer<S: MessageSource>(
    name: &str,
    source: S,
) -> (
    InMemoryOutbox,
    CountingHandler,
    InboxConsumer<InMemoryOutbox, S, CountingHandler>,
) {
    let store = InMemoryOutbox::new();
    let handler = CountingHandler::default();
    let consumer = InboxConsumer::new(
        store.clone(),
        source,
        handler.clone(),
        InboxConfig::new(name).backoff(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(100),
            2.0,
        )),
    );
    (store, handler, consumer)
}

/// How big the ordering run is.
#[derive(Debug, Clone)]
pub struct OrderScenario {
    /// Messages enqueued in all.
    pub messages: usize,
    /// Distinct partition keys (message `i` has key `key-{i % keys}`).
    pub keys: usize,
    /// Relay workers.
    pub workers: usize,
    /// Relay claim batch size.
    pub batch_size: usize,
    /// Messages per enqueue commit.
    pub chunk: usize,
    /// Fail if the relay has not drained the outbox by then.
    pub drain_deadline: Duration,
    /// Fail if the consumer waits this long for the next message.
    pub arrival_timeout: Duration,
}

impl Default for OrderScenario {
    /// 20,000 messages on 50 keys, 3 workers claiming 500 at a time,
    /// enqueued in commits of 100 while they run.
    fn default() -> Self {
        Self {
            messages: 20_000,
            keys: 50,
            workers: 3,
            batch_size: 500,
            chunk: 100,
            drain_deadline: Duration::from_secs(180),
            arrival_timeout: Duration::from_secs(30),
        }
    }
}

/// What an ordering run observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderReport {
    /// Distinct messages the consumer received (all of them).
    pub received: usize,
    /// Redeliveries (the same id again) the consumer saw and skipped.
    pub redelivered: usize,
}

/// Runs the ordering scenario; panics (failing the test) on a dead letter,
/// a drain past the deadline, a missing message, a foreign message, or a
/// key's messages out of order, and returns what it saw.
///
/// - `transport`: the relay's transport;
/// - `destination`: a fresh topic or subject (several partitions, where the
///   broker has them, make the per-key order worth checking);
/// - `open_source()`: a consumer of `destination` that reads it from the start.
pub async fn relay_keeps_each_keys_order<T, F, Fut, S>(
    transport: T,
    destination: &str,
    scenario: &OrderScenario,
    open_source: F,
) -> OrderReport
where
    T: Transport + Clone + 'static,
    F: FnOnce() -> Fut,
    Fut: Future<Output = S>,
    S: MessageSource,
{
    let keys = scenario.keys.max(1);
    assert_eq!(scenario.messages % keys, 0, "whole rounds over the keys");
    let meta = EventMetadata::new();
    let sent: Vec<OutboundMessage> = (0..scenario.messages)
        .map(|i| {
            OutboundMessage::cloud_events(
                destination,
                format!("key-{}", i % keys),
                "order.placed",
                1,
                "order-test",
                (i / keys).to_string().into_bytes(),
                &meta,
            )
        })
        .collect();

    let outbox = InMemoryOutbox::new();
    let mut config = RelayConfig::new("order");
    config.workers = scenario.workers;
    config.batch_size = scenario.batch_size;
    config.poll_interval = Duration::from_millis(20);
    let handle = OutboxRelay::new(outbox.clone(), transport, config).spawn();
    // Enqueue while the workers run.
    for chunk in sent.chunks(scenario.chunk.max(1)) {
        outbox.enqueue(chunk).await.expect("enqueue");
    }
    let deadline = Instant::now() + scenario.drain_deadline;
    loop {
        let status = outbox.status().await.expect("status");
        assert_eq!(status.dead, 0, "no dead letters");
        if status.pending == 0 {
            assert_eq!(status.published, scenario.messages as u64);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} still pending after {:?}",
            status.pending,
            scenario.drain_deadline
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    handle.shutdown().await.expect("relay shutdown");

    let ids: HashSet<_> = sent.iter().map(|m| m.id).collect();
    let mut source = open_source().await;
    let mut seen = HashSet::new();
    let mut redelivered = 0;
    let mut last: HashMap<String, i64> = HashMap::new();
    while seen.len() < scenario.messages {
        let delivery = tokio::time::timeout(scenario.arrival_timeout, source.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {} arrived", seen.len(), scenario.messages))
            .expect("receive")
            .expect("source open");
        let message = delivery.message();
        assert!(ids.contains(&message.id), "a message nobody sent");
        if seen.insert(message.id) {
            let key = message.partition_key.clone().expect("a partition key");
            let n: i64 = std::str::from_utf8(&message.payload)
                .expect("utf-8 payload")
                .parse()
                .expect("numeric payload");
            let previous = last.insert(key.clone(), n).unwrap_or(-1);
            assert_eq!(n, previous + 1, "key {key}: {n} after {previous}");
        } else {
            redelivered += 1;
        }
        delivery.ack().await.expect("ack");
    }
    assert_eq!(last.len(), keys, "every key arrived");
    assert!(
        last.values()
            .all(|n| *n as usize == scenario.messages / keys - 1),
        "every key's last message arrived last"
    );
    OrderReport {
        received: seen.len(),
        redelivered,
    }
}

/// Runs the duplicate scenario and returns the message it published twice;
/// panics (failing the test) unless the inbox processes the first record,
/// reports the second as a duplicate, applies the effect once, runs the
/// handler once and marks the id processed.
///
/// - `transport`: publishes the message, twice, `republish_after` apart
///   (JetStream: longer than the stream's duplicate window, so the broker
///   stores both);
/// - `stored()`: runs after both publishes; a broker that can count its
///   records asserts there that it holds two;
/// - `open_source()`: a consumer of `destination` that reads it from the start.
pub async fn inbox_applies_a_true_duplicate_once<T, C, CFut, F, Fut, S>(
    transport: &T,
    destination: &str,
    republish_after: Duration,
    stored: C,
    open_source: F,
) -> OutboundMessage
where
    T: Transport,
    C: FnOnce() -> CFut,
    CFut: Future<Output = ()>,
    F: FnOnce() -> Fut,
    Fut: Future<Output = S>,
    S: MessageSource,
{
    let message = OutboundMessage::cloud_events(
        destination,
        "payment-1",
        "payment.captured",
        1,
        "inbox-test",
        b"{}".to_vec(),
        &EventMetadata::new(),
    );
    transport.publish(&message).await.expect("first publish");
    tokio::time::sleep(republish_after).await;
    transport.publish(&message).await.expect("second publish");
    stored().await;

    let (store, handler, mut consumer) = counting_consumer("payments", open_source().await);
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(30), consumer.process_next())
            .await
            .expect("a record within 30 s")
            .expect("consume")
            .expect("source open")
    };
    assert_eq!(next().await, InboxOutcome::Processed, "the first record");
    assert_eq!(next().await, InboxOutcome::Duplicate, "the second record");
    assert_eq!(
        effect_count(&store, &message),
        Some(1),
        "the effect happened once"
    );
    assert_eq!(handler.runs(), 1, "the handler ran once");
    assert!(
        store
            .is_processed("payments", message.id)
            .await
            .expect("is_processed")
    );
    message
}
