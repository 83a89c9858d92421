//! The core engines over Kafka: `OutboxRelay` with three workers keeps each
//! key's order into a 6-partition topic, and `InboxConsumer` over a
//! `KafkaSource` applies a message's effect once although the topic holds a
//! true duplicate (the same message published twice).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{config, topic, unique, within};
use serde_json::json;
use vextrus_core::BoxError;
use vextrus_core::inbox::{InboxConfig, InboxConsumer, InboxHandler, InboxOutcome, InboxStore};
use vextrus_core::outbox::{
    Backoff, DeadLetters, InMemoryOutbox, InMemoryUnitOfWorkTx, OutboxRelay, OutboxStore,
    RelayConfig,
};
use vextrus_core::transport::{InboundMessage, OutboundMessage, Transport};
use vextrus_kafka::{ConsumerSpec, KafkaSource, KafkaTransport};
use vextrus_kernel::EventMetadata;

const KEYS: usize = 50;
const MESSAGES: usize = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relay_workers_keep_each_keys_order_for_20k_messages_on_50_keys() {
    let destination = topic("relay-order", 6).await;
    let transport = KafkaTransport::new(config()).unwrap();
    let outbox = InMemoryOutbox::new();
    let meta = EventMetadata::new();
    let sent: Vec<OutboundMessage> = (0..MESSAGES)
        .map(|i| {
            OutboundMessage::cloud_events(
                destination.clone(),
                format!("key-{}", i % KEYS),
                "order.placed",
                1,
                "order-test",
                (i / KEYS).to_string().into_bytes(),
                &meta,
            )
        })
        .collect();

    let mut relay_config = RelayConfig::new("order");
    relay_config.workers = 3;
    relay_config.batch_size = 500;
    relay_config.poll_interval = Duration::from_millis(20);
    let relay = OutboxRelay::new(outbox.clone(), transport.clone(), relay_config);
    let handle = relay.spawn();
    // Enqueue while the workers run, in commits of 100.
    for chunk in sent.chunks(100) {
        outbox.enqueue(chunk).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let status = outbox.status().await.unwrap();
        assert_eq!(status.dead, 0);
        if status.pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} still pending",
            status.pending
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    handle.shutdown().await.unwrap();

    let mut source = common::source(&destination);
    let mut seen = HashSet::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    while seen.len() < MESSAGES {
        let delivery = tokio::time::timeout(Duration::from_secs(30), source.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {MESSAGES} arrived", seen.len()))
            .unwrap();
        let message = delivery.message();
        if seen.insert(message.id) {
            let key = message.partition_key.clone().unwrap();
            let n: i64 = std::str::from_utf8(&message.payload)
                .unwrap()
                .parse()
                .unwrap();
            let previous = last.insert(key.clone(), n).unwrap_or(-1);
            assert_eq!(n, previous + 1, "key {key}: {n} after {previous}");
        }
        delivery.ack().await.unwrap();
    }
    assert_eq!(last.len(), KEYS);
    assert!(last.values().all(|n| *n as usize == MESSAGES / KEYS - 1));
}

/// Counts each message's effect in the consumer's own store (inside the
/// inbox transaction) and every handler run outside it.
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
async fn the_inbox_applies_a_true_duplicate_once() {
    let destination = topic("inbox-dup", 1).await;
    let transport = KafkaTransport::new(config()).unwrap();
    let message = OutboundMessage::cloud_events(
        destination.clone(),
        "payment-1",
        "payment.captured",
        1,
        "inbox-test",
        b"{}".to_vec(),
        &EventMetadata::new(),
    );
    // A relay that crashed after the broker stored the message but before
    // the outbox marked it sent publishes it again: two records, one id.
    transport.publish(&message).await.unwrap();
    transport.publish(&message).await.unwrap();

    let store = InMemoryOutbox::new();
    let handler = CountingHandler::default();
    let source = KafkaSource::connect(
        config(),
        ConsumerSpec::new(unique("payments"), [&destination]),
    )
    .unwrap();
    let mut consumer = InboxConsumer::new(
        store.clone(),
        source,
        handler.clone(),
        InboxConfig::new("payments").backoff(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(50),
            2.0,
        )),
    );
    let first = within(30, "first", consumer.process_next())
        .await
        .unwrap()
        .unwrap();
    let second = within(30, "second", consumer.process_next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, InboxOutcome::Processed);
    assert_eq!(second, InboxOutcome::Duplicate);
    assert_eq!(
        store.document("effects", &message.id.to_string()),
        Some(json!(1)),
        "the effect happened once"
    );
    assert_eq!(*handler.runs.lock().unwrap(), 1);
    assert!(store.is_processed("payments", message.id).await.unwrap());
}
