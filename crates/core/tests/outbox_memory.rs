//! The outbox, inbox and transport conformance suites on the in-memory
//! backend and the in-process transport.

use vextrus_core::inbox::InboxStore;
use vextrus_core::outbox::{InMemoryOutbox, InMemoryUnitOfWorkTx, OutboxRelay, RelayConfig};
use vextrus_core::transport::{
    InProcessSubscription, InProcessTransport, MessageId, OutboundMessage,
};
use vextrus_core::unit_of_work::UnitOfWork;
use vextrus_core::{EventReader, StreamId};
use vextrus_testkit::inbox::InboxBackend;
use vextrus_testkit::outbox::OutboxBackend;
use vextrus_testkit::transport::{self as transport_suite, TransportBackend};

struct Memory;

impl OutboxBackend for Memory {
    type Store = InMemoryOutbox;

    async fn fresh(&self) -> InMemoryOutbox {
        InMemoryOutbox::new()
    }

    async fn stream_version(&self, store: &InMemoryOutbox, stream: &StreamId) -> Option<u64> {
        store.event_store().stream_version(stream).await.unwrap()
    }

    async fn inbox_has(&self, store: &InMemoryOutbox, consumer: &str, id: MessageId) -> bool {
        store.is_processed(consumer, id).await.unwrap()
    }
}

impl InboxBackend for Memory {
    type Store = InMemoryOutbox;

    async fn fresh(&self) -> InMemoryOutbox {
        InMemoryOutbox::new()
    }

    async fn add_effect(&self, tx: &mut InMemoryUnitOfWorkTx, key: &str) {
        let n = tx.get("effects", key).and_then(|v| v.as_u64()).unwrap_or(0);
        tx.put("effects", key, serde_json::json!(n + 1));
    }

    async fn effect(&self, store: &InMemoryOutbox, key: &str) -> u64 {
        store
            .document("effects", key)
            .and_then(|v| v.as_u64())
            .unwrap_or(0)
    }
}

const MAX: usize = 4096;

struct InProcess;

impl TransportBackend for InProcess {
    type Transport = InProcessTransport;
    type Source = InProcessSubscription;

    async fn setup(&self, destination: &str) -> (InProcessTransport, InProcessSubscription) {
        let t = InProcessTransport::with_max_size(MAX);
        t.declare(destination);
        let s = t.subscribe(destination).unwrap();
        (t, s)
    }

    fn unknown_destination(&self) -> String {
        "no-such-destination".into()
    }

    fn max_message_bytes(&self) -> usize {
        MAX
    }
}

macro_rules! cases {
    ($suite:ident, $backend:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                $suite::$case(&$backend).await;
            }
        )*
    };
}

/// The outbox suite; the per-key order case at full size: 3 relay workers,
/// 50 keys, 20k messages.
mod outbox {
    use super::*;
    vextrus_testkit::outbox_conformance!(Memory, 20_000);
}

mod transport {
    use super::*;
    cases!(transport_suite, InProcess;
        publish_confirm_receive,
        unknown_destination_is_typed,
        oversized_message_is_typed,
        headers_round_trip,
        nack_redelivers,
    );
}

mod inbox {
    use super::*;
    vextrus_testkit::inbox_conformance!(Memory);
}

/// End to end: units of work commit events and messages; the relay
/// (woken by the commit) publishes them to the in-process broker; an inbox
/// consumer applies each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unit_of_work_to_relay_to_inbox_end_to_end() {
    use vextrus_core::inbox::{InboxConfig, InboxConsumer, InboxHandler};
    use vextrus_core::transport::InboundMessage;
    use vextrus_core::{BoxError, ExpectedVersion, NewEvent};
    use vextrus_kernel::EventMetadata;

    struct Apply;
    impl InboxHandler<InMemoryUnitOfWorkTx> for Apply {
        async fn handle(
            &self,
            tx: &mut InMemoryUnitOfWorkTx,
            m: &InboundMessage,
        ) -> Result<(), BoxError> {
            let n = tx.get("seen", "n").and_then(|v| v.as_u64()).unwrap_or(0);
            tx.put("seen", "n", serde_json::json!(n + 1));
            tx.put("seen", &m.id.to_string(), serde_json::json!(true));
            Ok(())
        }
    }

    let producer = InMemoryOutbox::new();
    let broker = InProcessTransport::new();
    broker.declare("orders");
    let mut cfg = RelayConfig::new("e2e");
    cfg.workers = 2;
    cfg.poll_interval = std::time::Duration::from_secs(5); // wake-ups must do the work
    let relay = OutboxRelay::new(producer.clone(), broker.clone(), cfg).spawn();

    for i in 0..100 {
        let stream = StreamId::new(format!("order-{i}")).unwrap();
        let meta = EventMetadata::new();
        let mut tx = producer.begin().await.unwrap();
        producer
            .append_in_tx(
                &mut tx,
                &stream,
                ExpectedVersion::NoStream,
                &[NewEvent::new(
                    "order.placed",
                    serde_json::json!({"i": i}),
                    meta.clone(),
                )],
            )
            .await
            .unwrap();
        let msg = OutboundMessage::cloud_events(
            "orders",
            stream.as_str(),
            "order.placed",
            1,
            "orders",
            serde_json::to_vec(&serde_json::json!({"i": i})).unwrap(),
            &meta,
        );
        producer.enqueue_in_tx(&mut tx, &[msg]).await.unwrap();
        producer.commit(tx).await.unwrap();
    }

    let consumer_db = InMemoryOutbox::new();
    let mut consumer = InboxConsumer::new(
        consumer_db.clone(),
        broker.subscribe("orders").unwrap(),
        Apply,
        InboxConfig::new("projector"),
    );
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    let done = consumer
        .run_until(async {
            while consumer_db.document("seen", "n") != Some(serde_json::json!(100)) {
                assert!(tokio::time::Instant::now() < deadline, "relay too slow");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await;
    assert!(done >= 100);
    relay.shutdown().await.unwrap();
    assert_eq!(producer.event_store().len(), 100);
    assert_eq!(broker.published("orders").len(), 100);
}
