//! The core engines over JetStream: `OutboxRelay` with three workers keeps
//! each key's order into a stream, and `InboxConsumer` over a
//! `JetStreamSource` applies a message's effect once even when the stream
//! holds a true duplicate (published again after the duplicate window).

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{nats_url, with_stream};
use vextrus_core::BoxError;
use vextrus_core::inbox::{InboxConfig, InboxConsumer, InboxHandler, InboxOutcome, InboxStore};
use vextrus_core::outbox::{
    Backoff, DeadLetters, InMemoryOutbox, InMemoryUnitOfWorkTx, OutboxRelay, OutboxStore,
    RelayConfig,
};
use vextrus_core::transport::{InboundMessage, MessageDelivery, MessageSource, OutboundMessage};
use vextrus_kernel::EventMetadata;
use vextrus_nats::{ConsumerSpec, JetStreamConfig, JetStreamSource, JetStreamTransport};

const KEYS: usize = 50;
const MESSAGES: usize = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relay_workers_keep_each_keys_order_for_20k_messages_on_50_keys() {
    with_stream(|stream| async move {
        let transport = JetStreamTransport::connect(stream.config()).await.unwrap();
        let outbox = InMemoryOutbox::new();
        let destination = stream.subject("orders");
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

        let mut config = RelayConfig::new("order");
        config.workers = 3;
        config.batch_size = 500;
        config.poll_interval = Duration::from_millis(20);
        let relay = OutboxRelay::new(outbox.clone(), transport.clone(), config);
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

        let mut source = JetStreamSource::connect(
            JetStreamConfig::new(nats_url()),
            ConsumerSpec::new(stream.name.clone(), "order-check").with_batch(1000),
        )
        .await
        .unwrap();
        let mut seen = HashSet::new();
        let mut last: HashMap<String, i64> = HashMap::new();
        while seen.len() < MESSAGES {
            let delivery =
                tokio::time::timeout(Duration::from_secs(10), MessageSource::next(&mut source))
                    .await
                    .unwrap_or_else(|_| panic!("only {} of {MESSAGES} arrived", seen.len()))
                    .unwrap()
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
            MessageDelivery::ack(delivery).await.unwrap();
        }
        assert_eq!(last.len(), KEYS);
        assert!(last.values().all(|n| *n as usize == MESSAGES / KEYS - 1));
    })
    .await;
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

#[tokio::test]
async fn the_inbox_applies_a_true_duplicate_once_although_the_window_let_it_through() {
    with_stream(|stream| async move {
        // A window of 200 ms: the second publish of the same id, a second
        // later, is stored again (trap 6: the window is a convenience).
        let transport = JetStreamTransport::connect(
            JetStreamConfig::new(nats_url()).with_stream(
                stream
                    .spec()
                    .with_duplicate_window(Duration::from_millis(200)),
            ),
        )
        .await
        .unwrap();
        let message = OutboundMessage::cloud_events(
            stream.subject("payments"),
            "payment-1",
            "payment.captured",
            1,
            "inbox-test",
            b"{}".to_vec(),
            &EventMetadata::new(),
        );
        use vextrus_core::transport::Transport;
        transport.publish(&message).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        transport.publish(&message).await.unwrap();
        let mut js_stream = transport
            .jetstream()
            .get_stream(&stream.name)
            .await
            .unwrap();
        assert_eq!(
            js_stream.info().await.unwrap().state.messages,
            2,
            "a true duplicate"
        );

        let store = InMemoryOutbox::new();
        let handler = CountingHandler::default();
        let source = JetStreamSource::connect(
            JetStreamConfig::new(nats_url()),
            ConsumerSpec::new(stream.name.clone(), "payments"),
        )
        .await
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
        let first = consumer.process_next().await.unwrap().unwrap();
        let second = consumer.process_next().await.unwrap().unwrap();
        assert_eq!(first, InboxOutcome::Processed);
        assert_eq!(second, InboxOutcome::Duplicate);
        assert_eq!(
            store.document("effects", &message.id.to_string()),
            Some(json!(1)),
            "the effect happened once"
        );
        assert_eq!(*handler.runs.lock().unwrap(), 1);
        assert!(store.is_processed("payments", message.id).await.unwrap());
    })
    .await;
}
