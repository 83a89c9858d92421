//! KafkaSource against a real Kafka-protocol broker: offsets are committed
//! only by acks, nacks and dropped deliveries bring the record back in
//! order, and malformed records are dead-lettered, counted and released,
//! never handed out and never a panic.

mod common;

use std::time::Duration;

use common::{config, topic, unique, within};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use vextrus_core::transport::{OutboundMessage, Transport, TransportError, headers as h};
use vextrus_kafka::{ConsumerSpec, KafkaError, KafkaSource, KafkaTransport, headers as kh};

fn message(topic: &str, key: &str, body: &str) -> OutboundMessage {
    let mut m = OutboundMessage::new(topic, key, body.as_bytes().to_vec());
    m.headers.insert(h::CE_ID.into(), m.id.to_string());
    m
}

async fn publish_all(transport: &KafkaTransport, messages: &[OutboundMessage]) {
    for outcome in within(30, "publish", transport.publish_batch(messages)).await {
        outcome.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_are_committed_only_by_acks() {
    let topic = topic("acks", 1).await;
    // One record per batch: tansu 0.6.0 returns nothing for a fetch that
    // starts inside a stored record batch (Kafka returns the batch and the
    // client skips the records before the offset), so a member resuming at
    // a committed offset in the middle of a batch would wait forever.
    let transport = KafkaTransport::new(config().with_property("batch.num.messages", "1")).unwrap();
    let messages: Vec<_> = (0..3)
        .map(|i| message(&topic, "k", &i.to_string()))
        .collect();
    publish_all(&transport, &messages).await;

    let group = unique("group");
    {
        let mut source =
            KafkaSource::connect(config(), ConsumerSpec::new(&group, [&topic])).unwrap();
        for expected in &messages[..2] {
            let delivery = within(30, "receive", source.next()).await.unwrap();
            assert_eq!(delivery.message().id, expected.id);
            delivery.ack().await.unwrap();
        }
        // The third is received but the "handler" never commits: no ack
        // (dropping it only rewinds this member; nothing is committed).
        let third = within(30, "receive", source.next()).await.unwrap();
        assert_eq!(third.message().id, messages[2].id);
        drop(third);
    }
    // A new member of the group starts after the last acked record.
    let mut source = KafkaSource::connect(config(), ConsumerSpec::new(&group, [&topic])).unwrap();
    let delivery = within(60, "receive after restart", source.next())
        .await
        .unwrap();
    assert_eq!(delivery.message().id, messages[2].id);
    delivery.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_brings_the_record_back_after_the_delay_and_later_ones_wait() {
    let topic = topic("nack", 1).await;
    let transport = KafkaTransport::new(config()).unwrap();
    let messages = vec![
        message(&topic, "k", "first"),
        message(&topic, "k", "second"),
    ];
    publish_all(&transport, &messages).await;

    let mut source = common::source(&topic);
    let first = within(30, "receive", source.next()).await.unwrap();
    assert_eq!(first.message().id, messages[0].id);
    assert_eq!(first.message().delivery_attempt, 1);
    let nacked_at = std::time::Instant::now();
    first.nack(Duration::from_millis(500)).await.unwrap();

    let again = within(30, "redelivery", source.next()).await.unwrap();
    assert!(nacked_at.elapsed() >= Duration::from_millis(450));
    assert_eq!(again.message().id, messages[0].id, "order kept");
    assert_eq!(again.message().delivery_attempt, 2);
    again.ack().await.unwrap();

    let second = within(30, "receive", source.next()).await.unwrap();
    assert_eq!(second.message().id, messages[1].id);
    assert_eq!(second.message().delivery_attempt, 1);
    second.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_dropped_unsettled_comes_again() {
    let topic = topic("dropped", 1).await;
    let transport = KafkaTransport::new(config()).unwrap();
    let messages = vec![message(&topic, "k", "a"), message(&topic, "k", "b")];
    publish_all(&transport, &messages).await;

    let mut source = common::source(&topic);
    let first = within(30, "receive", source.next()).await.unwrap();
    assert_eq!(first.message().id, messages[0].id);
    drop(first);
    let again = within(30, "redelivery", source.next()).await.unwrap();
    assert_eq!(again.message().id, messages[0].id);
    assert_eq!(again.message().delivery_attempt, 2);
    again.ack().await.unwrap();
    let second = within(30, "receive", source.next()).await.unwrap();
    assert_eq!(second.message().id, messages[1].id);
    second.ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_are_dead_lettered_counted_and_skipped() {
    let topic = topic("malformed", 1).await;
    let dlq = topic_named(&format!("{topic}.dlq")).await;
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .create()
        .unwrap();
    let good_id = uuid::Uuid::now_v7();
    let good_id_text = good_id.to_string();
    let bad_time_id = uuid::Uuid::now_v7().to_string();
    let cases: Vec<(&str, Option<OwnedHeaders>)> = vec![
        ("no headers", None),
        (
            "ce_id not a uuid",
            Some(OwnedHeaders::new().insert(Header {
                key: h::CE_ID,
                value: Some("order-1"),
            })),
        ),
        (
            "ce_time not rfc3339",
            Some(
                OwnedHeaders::new()
                    .insert(Header {
                        key: h::CE_ID,
                        value: Some(bad_time_id.as_str()),
                    })
                    .insert(Header {
                        key: h::CE_TIME,
                        value: Some("yesterday"),
                    }),
            ),
        ),
        (
            "header value not utf-8",
            Some(
                OwnedHeaders::new()
                    .insert(Header {
                        key: h::CE_ID,
                        value: Some(uuid::Uuid::now_v7().to_string().as_str()),
                    })
                    .insert(Header {
                        key: h::CE_TYPE,
                        value: Some(&[0xff_u8, 0xfe][..]),
                    }),
            ),
        ),
        (
            "good",
            Some(OwnedHeaders::new().insert(Header {
                key: h::CE_ID,
                value: Some(good_id_text.as_str()),
            })),
        ),
    ];
    for (body, headers) in &cases {
        let mut record: FutureRecord<'_, str, str> =
            FutureRecord::to(&topic).key("k").payload(body);
        if let Some(headers) = headers {
            record = record.headers(headers.clone());
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(err, _)| err)
            .unwrap();
    }

    let mut source = KafkaSource::connect(
        config(),
        ConsumerSpec::new(unique("group"), [&topic]).with_dead_letter_topic(&dlq),
    )
    .unwrap();
    for (body, _) in &cases[..4] {
        let err = within(30, "receive", source.next()).await.unwrap_err();
        assert!(
            matches!(err, KafkaError::MalformedMessage { .. }),
            "{body}: {err:?}"
        );
        assert!(!vextrus_kernel::HasErrorKind::kind(&err).is_retryable());
    }
    let good = within(30, "receive", source.next()).await.unwrap();
    assert_eq!(good.message().id.as_uuid(), good_id);
    assert_eq!(good.message().payload, b"good");
    good.ack().await.unwrap();
    assert_eq!(source.malformed_count(), 4);

    // Through the contract, a malformed record is InvalidHeaders.
    let map = TransportError::from(KafkaError::MalformedMessage {
        topic: topic.clone(),
        partition: 0,
        offset: 0,
        reason: "x".into(),
    });
    assert!(matches!(map, TransportError::InvalidHeaders(_)));

    // Every malformed record is on the dead-letter topic, as it was, with
    // the reason and its origin.
    let reader: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .set("group.id", unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    reader.subscribe(&[&dlq]).unwrap();
    for (index, (body, _)) in cases[..4].iter().enumerate() {
        let record = within(30, "dead letter", reader.recv()).await.unwrap();
        assert_eq!(record.payload(), Some(body.as_bytes()));
        assert_eq!(record.key(), Some(&b"k"[..]));
        let headers = record.headers().expect("dead letters carry headers");
        let find = |name: &str| {
            headers
                .iter()
                .find(|header| header.key == name)
                .and_then(|header| header.value)
                .map(|value| String::from_utf8_lossy(value).into_owned())
        };
        assert!(find(kh::DEAD_LETTER_REASON).is_some_and(|r| !r.is_empty()));
        assert_eq!(find(kh::DEAD_LETTER_TOPIC).as_deref(), Some(topic.as_str()));
        assert_eq!(find(kh::DEAD_LETTER_PARTITION).as_deref(), Some("0"));
        assert_eq!(
            find(kh::DEAD_LETTER_OFFSET).as_deref(),
            Some(index.to_string().as_str())
        );
    }
}

async fn topic_named(name: &str) -> String {
    vextrus_kafka::create_topic(&config(), name, 1)
        .await
        .unwrap();
    name.to_owned()
}
