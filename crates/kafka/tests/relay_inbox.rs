//! The core engines over Kafka: `OutboxRelay` with three workers keeps each
//! key's order into a 6-partition topic, and `InboxConsumer` over a
//! `KafkaSource` applies a message's effect once although the topic holds a
//! true duplicate (the same message published twice). The scenarios are
//! `vextrus_testkit::relay_inbox`, shared with JetStream.

mod common;

use std::time::Duration;

use common::{config, source, topic};
use vextrus_kafka::KafkaTransport;
use vextrus_testkit::relay_inbox::{
    OrderScenario, inbox_applies_a_true_duplicate_once, relay_keeps_each_keys_order,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relay_workers_keep_each_keys_order_for_20k_messages_on_50_keys() {
    let destination = topic("relay-order", 6).await;
    let transport = KafkaTransport::new(config()).unwrap();
    let report = relay_keeps_each_keys_order(
        transport,
        &destination,
        &OrderScenario::default(),
        || async { source(&destination) },
    )
    .await;
    println!("{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_applies_a_true_duplicate_once() {
    let destination = topic("inbox-dup", 1).await;
    let transport = KafkaTransport::new(config()).unwrap();
    // No window to wait out: Kafka stores both records of the same id.
    inbox_applies_a_true_duplicate_once(
        &transport,
        &destination,
        Duration::ZERO,
        || async {},
        || async { source(&destination) },
    )
    .await;
}
