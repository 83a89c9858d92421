//! Broker outage: a private `nats-server` (its own port and store dir, never
//! the shared one) is stopped for at least 30 s while messages are enqueued
//! and the relay runs, then restarted on the same port and store. The
//! backlog grows while it is down, then drains; every message id reaches the
//! stream (0 lost).

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use support::PrivateServer;
use vextrus_core::outbox::{
    Backoff, DeadLetters, InMemoryOutbox, OutboxRelay, OutboxStore, RelayConfig,
};
use vextrus_core::transport::{MessageDelivery, MessageSource, OutboundMessage};
use vextrus_kernel::EventMetadata;
use vextrus_nats::{
    ConsumerSpec, JetStreamConfig, JetStreamSource, JetStreamTransport, StreamSpec,
};

const OUTAGE: Duration = Duration::from_secs(32);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_grows_while_the_server_is_down_then_drains_with_nothing_lost() {
    let store = tempfile::tempdir().unwrap();
    let mut server = PrivateServer::start(store.path());
    let config = JetStreamConfig::new(server.url())
        .with_stream(StreamSpec::new("OUTAGE", ["outage.>"]))
        .with_publish_timeout(Duration::from_secs(1))
        .with_max_reconnect_delay(Duration::from_millis(250));
    let transport = JetStreamTransport::connect(config.clone()).await.unwrap();

    let outbox = InMemoryOutbox::new();
    let mut relay_config = RelayConfig::new("outage");
    relay_config.workers = 2;
    relay_config.poll_interval = Duration::from_millis(50);
    // Retry forever in spirit: a minute-long outage must not dead-letter.
    relay_config.max_attempts = 10_000;
    relay_config.backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1), 2.0);
    let relay = OutboxRelay::new(outbox.clone(), transport.clone(), relay_config);
    let handle = relay.spawn();

    let meta = EventMetadata::new();
    let mut sent = Vec::new();
    let enqueue = |outbox: InMemoryOutbox, count: usize, sent: &mut Vec<OutboundMessage>| {
        let batch: Vec<_> = (0..count)
            .map(|i| {
                OutboundMessage::cloud_events(
                    "outage.orders",
                    format!("order-{}", (sent.len() + i) % 20),
                    "order.placed",
                    1,
                    "outage-test",
                    format!("{{\"n\":{}}}", sent.len() + i).into_bytes(),
                    &meta,
                )
            })
            .collect();
        sent.extend(batch.iter().cloned());
        async move { outbox.enqueue(&batch).await.unwrap() }
    };

    // Before: messages flow.
    for _ in 0..20 {
        enqueue(outbox.clone(), 25, &mut sent).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The outage: keep enqueueing while the server is down.
    server.stop();
    let down_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let backlog_early = outbox.status().await.unwrap().pending;
    while down_at.elapsed() < OUTAGE {
        enqueue(outbox.clone(), 25, &mut sent).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let backlog_late = outbox.status().await.unwrap().pending;
    assert!(
        backlog_late > backlog_early + 1000,
        "the backlog grows while the broker is down: {backlog_early} -> {backlog_late}"
    );
    assert!(!transport.is_connected());

    // Back: same port, same store.
    server.restart();
    let up_at = Instant::now();
    for _ in 0..20 {
        enqueue(outbox.clone(), 25, &mut sent).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = outbox.status().await.unwrap();
        assert_eq!(status.dead, 0, "nothing dead-lettered by an outage");
        if status.pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backlog did not drain: {} pending",
            status.pending
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained_in = up_at.elapsed();
    handle.shutdown().await.unwrap();

    // Every id is in the stream (duplicates allowed: at least once).
    let mut source = JetStreamSource::connect(
        JetStreamConfig::new(server.url()),
        ConsumerSpec::new("OUTAGE", "outage-check").with_batch(1000),
    )
    .await
    .unwrap();
    let expected: HashSet<_> = sent.iter().map(|m| m.id).collect();
    let mut seen = HashSet::new();
    let mut deliveries = 0usize;
    while seen.len() < expected.len() {
        let delivery =
            tokio::time::timeout(Duration::from_secs(10), MessageSource::next(&mut source))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "lost {} of {} messages",
                        expected.len() - seen.len(),
                        expected.len()
                    )
                })
                .unwrap()
                .unwrap();
        deliveries += 1;
        seen.insert(delivery.message().id);
        MessageDelivery::ack(delivery).await.unwrap();
    }
    assert_eq!(seen, expected, "0 lost");
    println!(
        "outage {:?}: backlog {backlog_early} -> {backlog_late}, drained {} messages in {drained_in:?} after restart, {deliveries} stored",
        OUTAGE,
        expected.len()
    );
}
