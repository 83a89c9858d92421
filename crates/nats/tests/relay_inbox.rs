//! The core engines over JetStream: `OutboxRelay` with three workers keeps
//! each key's order into a stream, and `InboxConsumer` over a
//! `JetStreamSource` applies a message's effect once even when the stream
//! holds a true duplicate (published again after the duplicate window).
//! The scenarios are `vextrus_testkit::relay_inbox`, shared with Kafka.

mod support;

use std::time::Duration;

use support::{nats_url, with_stream};
use vextrus_nats::{ConsumerSpec, JetStreamConfig, JetStreamSource, JetStreamTransport};
use vextrus_testkit::relay_inbox::{
    OrderScenario, inbox_applies_a_true_duplicate_once, relay_keeps_each_keys_order,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relay_workers_keep_each_keys_order_for_20k_messages_on_50_keys() {
    with_stream(|stream| async move {
        let transport = JetStreamTransport::connect(stream.config()).await.unwrap();
        let report = relay_keeps_each_keys_order(
            transport,
            &stream.subject("orders"),
            &OrderScenario::default(),
            || async {
                JetStreamSource::connect(
                    JetStreamConfig::new(nats_url()),
                    ConsumerSpec::new(stream.name.clone(), "order-check").with_batch(1000),
                )
                .await
                .unwrap()
            },
        )
        .await;
        println!("{report:?}");
    })
    .await;
}

#[tokio::test]
async fn the_inbox_applies_a_true_duplicate_once_although_the_window_let_it_through() {
    with_stream(|stream| async move {
        // A window of 200 ms: the second publish of the same id, a second
        // later, is stored again (trap 6: the window is a convenience).
        let window = stream
            .spec()
            .with_duplicate_window(Duration::from_millis(200));
        let transport =
            JetStreamTransport::connect(JetStreamConfig::new(nats_url()).with_stream(window))
                .await
                .unwrap();
        inbox_applies_a_true_duplicate_once(
            &transport,
            &stream.subject("payments"),
            Duration::from_secs(1),
            || async {
                let stored = transport.jetstream().get_stream(&stream.name).await;
                let count = stored.unwrap().info().await.unwrap().state.messages;
                assert_eq!(count, 2, "a true duplicate");
            },
            || async {
                let consumer = ConsumerSpec::new(stream.name.clone(), "payments");
                JetStreamSource::connect(JetStreamConfig::new(nats_url()), consumer)
                    .await
                    .unwrap()
            },
        )
        .await;
    })
    .await;
}
