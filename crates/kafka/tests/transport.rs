//! KafkaTransport against a real Kafka-protocol broker: confirmed publishes
//! that arrive with their key and every header, per-key order, and typed
//! errors for bad input and an unreachable broker.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::{config, source, topic, unique, within};
use vextrus_core::transport::{
    MessageDelivery, MessageSource, OutboundMessage, Transport, TransportError, headers as h,
};
use vextrus_kafka::{KafkaConfig, KafkaError, KafkaTransport, PublishRequest};
use vextrus_kernel::{CausationId, ErrorKind, EventMetadata, HasErrorKind, TraceContext};

fn metadata() -> EventMetadata {
    EventMetadata::new()
        .with_causation_id(CausationId::new())
        .with_trace_context(
            TraceContext::parse(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Some("vendor=1"),
            )
            .unwrap(),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_publish_arrives_with_its_key_payload_and_every_header() {
    let topic = topic("roundtrip", 1).await;
    let transport = KafkaTransport::new(config()).unwrap();
    let message = OutboundMessage::cloud_events(
        &topic,
        "order-42",
        "sales.order_placed",
        2,
        "/sales",
        br#"{"order":42}"#.to_vec(),
        &metadata(),
    );
    within(30, "publish", transport.publish(&message))
        .await
        .unwrap();

    let mut source = source(&topic);
    let delivery = within(30, "receive", MessageSource::next(&mut source))
        .await
        .unwrap()
        .expect("a Kafka source never closes");
    let received = delivery.message();
    assert_eq!(received.id, message.id);
    assert_eq!(received.source, topic);
    assert_eq!(received.partition_key.as_deref(), Some("order-42"));
    assert_eq!(received.payload, message.payload);
    assert_eq!(received.headers, message.headers);
    assert_eq!(received.delivery_attempt, 1);
    for name in [
        h::CE_ID,
        h::CE_TYPE,
        h::CE_SOURCE,
        h::CE_TIME,
        h::CE_SPECVERSION,
        h::CONTENT_TYPE,
        h::CORRELATION_ID,
        h::CAUSATION_ID,
        h::TRACEPARENT,
        h::TRACESTATE,
        h::SCHEMA_VERSION,
    ] {
        assert!(received.header(name).is_some(), "header {name} missing");
    }
    assert_eq!(
        received.header(h::CE_ID),
        Some(message.id.to_string().as_str())
    );
    assert!(received.trace_context().is_some());
    MessageDelivery::ack(delivery).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receipt_names_the_partition_and_offset_the_broker_stored() {
    let topic = topic("receipt", 1).await;
    let transport = KafkaTransport::new(config()).unwrap();
    let headers = BTreeMap::new();
    let mut offsets = Vec::new();
    for i in 0..3u8 {
        let payload = [i];
        let request = PublishRequest::new(uuid::Uuid::now_v7(), &topic, "k", &payload, &headers);
        let receipt = within(30, "publish", transport.publish_confirmed(&request))
            .await
            .unwrap();
        assert_eq!(receipt.partition, 0);
        offsets.push(receipt.offset);
    }
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_keys_messages_arrive_in_the_order_they_were_published() {
    const KEYS: usize = 8;
    const PER_KEY: usize = 60;
    let topic = topic("order", 4).await;
    let transport = KafkaTransport::new(config()).unwrap();
    let mut messages = Vec::new();
    for seq in 0..PER_KEY {
        for key in 0..KEYS {
            let mut m =
                OutboundMessage::new(&topic, format!("key-{key}"), seq.to_string().into_bytes());
            m.headers.insert(h::CE_ID.into(), m.id.to_string());
            messages.push(m);
        }
    }
    // In batches of 100, pipelined.
    for batch in messages.chunks(100) {
        let outcomes = within(60, "batch", transport.publish_batch(batch)).await;
        for outcome in outcomes {
            outcome.unwrap();
        }
    }

    let mut source = source(&topic);
    let mut seen: HashMap<String, Vec<usize>> = HashMap::new();
    let mut partition_of: HashMap<String, i32> = HashMap::new();
    for _ in 0..KEYS * PER_KEY {
        let delivery = within(60, "receive", source.next()).await.unwrap();
        let key = delivery.message().partition_key.clone().unwrap();
        let seq: usize = String::from_utf8(delivery.message().payload.clone())
            .unwrap()
            .parse()
            .unwrap();
        let partition = *partition_of
            .entry(key.clone())
            .or_insert(delivery.partition());
        assert_eq!(partition, delivery.partition(), "{key} moved partitions");
        seen.entry(key).or_default().push(seq);
        delivery.ack().await.unwrap();
    }
    assert_eq!(seen.len(), KEYS);
    for (key, seqs) in seen {
        assert_eq!(seqs, (0..PER_KEY).collect::<Vec<_>>(), "{key} out of order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_that_does_not_exist_is_an_unknown_destination_at_once() {
    let transport = KafkaTransport::new(config()).unwrap();
    let missing = unique("missing");
    let message = OutboundMessage::new(&missing, "k", b"x".to_vec());
    let started = Instant::now();
    let err = within(30, "publish", transport.publish(&message))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, TransportError::UnknownDestination(t) if *t == missing),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );

    // In a batch, only the message to the missing topic fails.
    let good = topic("batch-mixed", 1).await;
    let batch = vec![
        OutboundMessage::new(&good, "k", b"1".to_vec()),
        OutboundMessage::new(&missing, "k", b"2".to_vec()),
        OutboundMessage::new("not a topic", "k", b"3".to_vec()),
        OutboundMessage::new(&good, "k", b"4".to_vec()),
    ];
    let outcomes = within(30, "batch", transport.publish_batch(&batch)).await;
    assert!(outcomes[0].is_ok(), "{:?}", outcomes[0]);
    assert!(matches!(
        outcomes[1],
        Err(TransportError::UnknownDestination(_))
    ));
    assert!(matches!(
        outcomes[2],
        Err(TransportError::UnknownDestination(_))
    ));
    assert!(outcomes[3].is_ok(), "{:?}", outcomes[3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_a_validation_error_and_nothing_is_stored() {
    let topic = topic("oversized", 1).await;
    let transport = KafkaTransport::new(config().with_max_message_bytes(100_000)).unwrap();
    let big = OutboundMessage::new(&topic, "k", vec![7u8; 200_000]);
    let err = within(30, "publish", transport.publish(&big))
        .await
        .unwrap_err();
    match &err {
        TransportError::MessageTooLarge { size, max } => {
            assert!(*size >= 200_000);
            assert_eq!(*max, 100_000);
        }
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    assert_eq!(err.kind(), ErrorKind::Validation);

    // The next message on the topic is the first one stored.
    let small = OutboundMessage::new(&topic, "k", b"small".to_vec());
    within(30, "publish", transport.publish(&small))
        .await
        .unwrap();
    let mut source = source(&topic);
    let delivery = within(30, "receive", source.next()).await.unwrap();
    assert_eq!(delivery.message().id, small.id);
    assert_eq!(delivery.offset(), 0);
    delivery.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_outgoing_headers_are_refused_before_sending() {
    let topic = topic("bad-headers", 1).await;
    let transport = KafkaTransport::new(config()).unwrap();
    let mut wrong_id = OutboundMessage::new(&topic, "k", b"x".to_vec());
    wrong_id
        .headers
        .insert(h::CE_ID.into(), uuid::Uuid::now_v7().to_string());
    let err = transport.publish(&wrong_id).await.unwrap_err();
    assert!(matches!(err, TransportError::InvalidHeaders(_)), "{err:?}");
    let mut empty_name = OutboundMessage::new(&topic, "k", b"x".to_vec());
    empty_name.headers.insert(String::new(), "v".into());
    let err = transport.publish(&empty_name).await.unwrap_err();
    assert!(matches!(err, TransportError::InvalidHeaders(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_a_transient_error_within_a_bounded_time() {
    // Nothing listens on a port we just bound and released.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let transport = KafkaTransport::new(
        KafkaConfig::new(format!("127.0.0.1:{port}"))
            .with_metadata_timeout(Duration::from_secs(2))
            .with_delivery_timeout(Duration::from_secs(3)),
    )
    .unwrap();
    let message = OutboundMessage::new("orders", "k", b"x".to_vec());
    let started = Instant::now();
    let err = within(20, "publish", transport.publish(&message))
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(err.kind().is_retryable(), "{err:?}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");

    let kafka_err = within(
        20,
        "publish",
        transport.publish_confirmed(&PublishRequest::from(&message)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            kafka_err,
            KafkaError::Unavailable { .. } | KafkaError::Timeout(_)
        ),
        "{kafka_err:?}"
    );
    assert_eq!(kafka_err.kind(), ErrorKind::Transient);
}
