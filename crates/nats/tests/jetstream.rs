//! The JetStream transport and source against the real server
//! (`VEXTRUS_TEST_NATS_URL`, default nats://127.0.0.1:4222). Each test uses
//! its own stream and deletes it afterwards. A missing server fails the tests.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::{TestStream, cloud_event_headers, free_port, nats_url, with_stream};
use uuid::Uuid;
use vextrus_core::transport::{
    InboundMessage, MessageDelivery, MessageSource, OutboundMessage, Transport, TransportError,
};
use vextrus_kernel::{ErrorKind, EventMetadata, HasErrorKind, TraceContext};
use vextrus_nats::{
    ConsumerSpec, JetStreamConfig, JetStreamSource, JetStreamTransport, NatsError, PublishRequest,
    StreamSpec,
};

async fn source(stream: &TestStream, durable: &str) -> JetStreamSource {
    JetStreamSource::connect(
        JetStreamConfig::new(nats_url()),
        ConsumerSpec::new(stream.name.clone(), durable).with_ack_wait(Duration::from_secs(5)),
    )
    .await
    .expect("consumer")
}

async fn next(source: &mut JetStreamSource) -> Result<vextrus_nats::Delivery, NatsError> {
    tokio::time::timeout(Duration::from_secs(10), source.next_delivery())
        .await
        .expect("a message within 10 s")
}

#[tokio::test]
async fn a_confirmed_publish_arrives_with_every_header_and_the_id() {
    with_stream(|stream| async move {
        let transport = JetStreamTransport::connect(stream.config()).await.unwrap();
        let id = Uuid::now_v7();
        let headers = cloud_event_headers(id, "order-7");
        let destination = stream.subject("orders.placed");
        let payload = br#"{"order":7,"total":"12.50"}"#;
        let receipt = transport
            .publish_confirmed(
                &PublishRequest::new(id, &destination, payload, &headers)
                    .with_partition_key("order-7"),
            )
            .await
            .unwrap();
        assert_eq!(receipt.stream, stream.name);
        assert_eq!(receipt.sequence, 1);
        assert!(!receipt.duplicate);

        let mut source = source(&stream, "reader").await;
        let delivery = next(&mut source).await.unwrap();
        assert_eq!(delivery.message().id.0, id);
        assert_eq!(delivery.subject(), destination);
        assert_eq!(delivery.message().source, destination);
        assert_eq!(delivery.message().payload, payload);
        assert_eq!(
            delivery.message().headers,
            headers,
            "every header arrives unchanged"
        );
        assert_eq!(delivery.message().partition_key.as_deref(), Some("order-7"));
        assert_eq!(delivery.message().delivery_attempt, 1);
        assert_eq!(delivery.stream_sequence(), 1);
        delivery.ack_confirmed().await.unwrap();

        // The raw NATS message carries the id as Nats-Msg-Id.
        let js = transport.jetstream();
        let raw = js
            .get_stream(&stream.name)
            .await
            .unwrap()
            .get_raw_message(1)
            .await
            .unwrap();
        assert_eq!(
            raw.headers.get("Nats-Msg-Id").unwrap().as_str(),
            id.to_string()
        );
    })
    .await;
}

#[tokio::test]
async fn a_second_publish_with_the_same_id_within_the_window_is_stored_once() {
    with_stream(|stream| async move {
        let transport = JetStreamTransport::connect(
            JetStreamConfig::new(nats_url())
                .with_stream(stream.spec().with_duplicate_window(Duration::from_secs(60))),
        )
        .await
        .unwrap();
        let id = Uuid::now_v7();
        let headers = cloud_event_headers(id, "k");
        let destination = stream.subject("a");
        let request = PublishRequest::new(id, &destination, b"once", &headers);
        let first = transport.publish_confirmed(&request).await.unwrap();
        let second = transport.publish_confirmed(&request).await.unwrap();
        assert!(!first.duplicate);
        assert!(second.duplicate, "the server recognised the id");
        assert_eq!(second.sequence, first.sequence);
        // A pipelined batch repeating the id is confirmed too, and still stores nothing new.
        let results = transport.publish_pipelined(&[request, request]).await;
        assert!(
            results
                .iter()
                .all(|r| r.as_ref().is_ok_and(|r| r.duplicate))
        );
        let mut js_stream = transport
            .jetstream()
            .get_stream(&stream.name)
            .await
            .unwrap();
        assert_eq!(js_stream.info().await.unwrap().state.messages, 1);
    })
    .await;
}

#[tokio::test]
async fn a_subject_no_stream_stores_is_an_unknown_destination() {
    with_stream(|stream| async move {
        // Declared streams: checked before sending.
        let transport = JetStreamTransport::connect(stream.config()).await.unwrap();
        let headers = BTreeMap::new();
        let elsewhere = format!("nowhere{}.x", Uuid::new_v4().simple());
        let err = transport
            .publish_confirmed(&PublishRequest::new(
                Uuid::now_v7(),
                &elsewhere,
                b"x",
                &headers,
            ))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, NatsError::UnknownDestination(s) if *s == elsewhere),
            "{err}"
        );
        assert!(!err.kind().is_retryable());

        // No declared streams: the server answers "no responders".
        let undeclared = JetStreamTransport::connect(JetStreamConfig::new(nats_url()))
            .await
            .unwrap();
        let start = Instant::now();
        let err = undeclared
            .publish_confirmed(&PublishRequest::new(
                Uuid::now_v7(),
                &elsewhere,
                b"x",
                &headers,
            ))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, NatsError::UnknownDestination(s) if *s == elsewhere),
            "{err}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "answered, not timed out"
        );

        // A destination that is no valid subject is refused as well.
        let err = transport
            .publish_confirmed(&PublishRequest::new(Uuid::now_v7(), "a..b", b"x", &headers))
            .await
            .unwrap_err();
        assert!(matches!(err, NatsError::InvalidSubject { .. }), "{err}");
    })
    .await;
}

#[tokio::test]
async fn an_oversized_message_is_refused_with_its_size_and_the_limit() {
    with_stream(|stream| async move {
        let transport = JetStreamTransport::connect(stream.config()).await.unwrap();
        let max = transport.client().max_payload();
        assert!(max > 0);
        let payload = vec![b'x'; max + 1];
        let headers = BTreeMap::new();
        let destination = stream.subject("big");
        let err = transport
            .publish_confirmed(&PublishRequest::new(
                Uuid::now_v7(),
                &destination,
                &payload,
                &headers,
            ))
            .await
            .unwrap_err();
        match err {
            NatsError::MessageTooLarge { size, max: limit } => {
                assert!(size > max);
                assert_eq!(limit, max);
            }
            other => panic!("expected MessageTooLarge, got {other}"),
        }
        // The same through a pipelined batch, beside a message that fits.
        let small = PublishRequest::new(Uuid::now_v7(), &destination, b"fits", &headers);
        let big = PublishRequest::new(Uuid::now_v7(), &destination, &payload, &headers);
        let results = transport.publish_pipelined(&[big, small]).await;
        assert!(matches!(results[0], Err(NatsError::MessageTooLarge { .. })));
        assert!(results[1].is_ok());
    })
    .await;
}

#[tokio::test]
async fn a_stream_message_size_limit_enforced_by_the_server_is_message_too_large() {
    with_stream(|stream| async move {
        // The stream has a 1 KiB limit the transport was not told about, so
        // the server's rejection is what reports it.
        let limited = JetStreamTransport::connect(
            JetStreamConfig::new(nats_url()).with_stream(stream.spec().with_max_message_size(1024)),
        )
        .await
        .unwrap();
        drop(limited);
        let transport = JetStreamTransport::connect(JetStreamConfig::new(nats_url()))
            .await
            .unwrap();
        let headers = BTreeMap::new();
        let destination = stream.subject("big");
        let err = transport
            .publish_confirmed(&PublishRequest::new(
                Uuid::now_v7(),
                &destination,
                &[0u8; 4096],
                &headers,
            ))
            .await
            .unwrap_err();
        assert!(matches!(err, NatsError::MessageTooLarge { .. }), "{err}");
        assert_eq!(err.kind(), ErrorKind::Validation);
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_server_is_a_fast_transient_error() {
    let start = Instant::now();
    let err = JetStreamTransport::connect(
        JetStreamConfig::new(format!("nats://127.0.0.1:{}", free_port()))
            .with_stream(StreamSpec::new("NEVER", ["never.>"])),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, NatsError::Unavailable { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::Transient);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn headers_nats_cannot_carry_are_typed_errors() {
    with_stream(|stream| async move {
        let transport = JetStreamTransport::connect(stream.config()).await.unwrap();
        let destination = stream.subject("h");
        for (name, value) in [("bad:name", "v"), ("ok", "two\r\nlines")] {
            let headers = BTreeMap::from([(name.to_owned(), value.to_owned())]);
            let err = transport
                .publish_confirmed(&PublishRequest::new(
                    Uuid::now_v7(),
                    &destination,
                    b"x",
                    &headers,
                ))
                .await
                .unwrap_err();
            assert!(matches!(err, NatsError::InvalidHeaders(_)), "{err}");
        }
        let mut js_stream = transport
            .jetstream()
            .get_stream(&stream.name)
            .await
            .unwrap();
        assert_eq!(
            js_stream.info().await.unwrap().state.messages,
            0,
            "nothing was sent"
        );
    })
    .await;
}

#[tokio::test]
async fn a_pipelined_batch_is_confirmed_and_stored_in_order() {
    with_stream(|stream| async move {
        let transport = JetStreamTransport::connect(
            JetStreamConfig::new(nats_url())
                .with_stream(stream.spec())
                .with_max_ack_inflight(300),
        )
        .await
        .unwrap();
        let destination = stream.subject("batch");
        let ids: Vec<Uuid> = (0..1000).map(|_| Uuid::now_v7()).collect();
        let headers: Vec<_> = ids
            .iter()
            .map(|id| cloud_event_headers(*id, &format!("key-{}", id.as_u128() % 7)))
            .collect();
        let payloads: Vec<Vec<u8>> = (0..ids.len()).map(|i| i.to_string().into_bytes()).collect();
        let requests: Vec<_> = ids
            .iter()
            .zip(&headers)
            .zip(&payloads)
            .map(|((id, h), p)| PublishRequest::new(*id, &destination, p, h))
            .collect();
        let results = transport.publish_pipelined(&requests).await;
        let sequences: Vec<u64> = results.into_iter().map(|r| r.unwrap().sequence).collect();
        assert_eq!(
            sequences,
            (1..=1000).collect::<Vec<u64>>(),
            "stored in the order sent"
        );

        let mut source = source(&stream, "in-order").await;
        for (i, id) in ids.iter().enumerate() {
            let delivery = next(&mut source).await.unwrap();
            assert_eq!(delivery.message().id.0, *id, "message {i}");
            assert_eq!(delivery.message().payload, payloads[i]);
            delivery.ack_confirmed().await.unwrap();
        }
    })
    .await;
}

#[tokio::test]
async fn malformed_messages_are_terminated_dead_lettered_and_counted_not_dropped() {
    with_stream(|stream| async move {
        let transport = JetStreamTransport::connect(stream.config()).await.unwrap();
        let client = transport.client().clone();
        let js = async_nats::jetstream::new(client);
        let destination = stream.subject("in");
        // No headers at all, then an id that is no UUID, then a good message.
        js.publish(destination.clone(), "no headers".into())
            .await
            .unwrap()
            .await
            .unwrap();
        let mut bad = async_nats::HeaderMap::new();
        bad.insert("Nats-Msg-Id", "definitely-not-a-uuid");
        js.publish_with_headers(destination.clone(), bad, "bad id".into())
            .await
            .unwrap()
            .await
            .unwrap();
        let good_id = Uuid::now_v7();
        let headers = cloud_event_headers(good_id, "k");
        transport
            .publish_confirmed(&PublishRequest::new(
                good_id,
                &destination,
                b"good",
                &headers,
            ))
            .await
            .unwrap();

        let dlq = stream.subject("dlq");
        let mut source = JetStreamSource::connect(
            JetStreamConfig::new(nats_url()),
            ConsumerSpec::new(stream.name.clone(), "strict")
                .with_filter_subject(destination.clone())
                .with_dead_letter_subject(dlq.clone()),
        )
        .await
        .unwrap();
        for expected_sequence in [1u64, 2] {
            match next(&mut source).await {
                Err(NatsError::MalformedMessage {
                    stream_sequence, ..
                }) => assert_eq!(stream_sequence, expected_sequence),
                other => panic!("expected MalformedMessage, got {other:?}"),
            }
        }
        let delivery = next(&mut source).await.unwrap();
        assert_eq!(delivery.message().id.0, good_id);
        delivery.ack_confirmed().await.unwrap();
        assert_eq!(source.malformed_count(), 2);

        // Both malformed messages were copied to the dead-letter subject with the reason.
        // The copies carry the originals' headers (here: none usable), so read
        // them raw from the stream.
        let js_stream = js.get_stream(&stream.name).await.unwrap();
        let mut copies = Vec::new();
        for sequence in 4..=5 {
            let raw = js_stream.get_raw_message(sequence).await.unwrap();
            assert_eq!(raw.subject.as_str(), dlq);
            copies.push(raw);
        }
        let payloads: Vec<_> = copies.iter().map(|c| c.payload.to_vec()).collect();
        assert_eq!(payloads, vec![b"no headers".to_vec(), b"bad id".to_vec()]);
        for copy in &copies {
            assert!(copy.headers.get("vextrus_dead_letter_reason").is_some());
            assert_eq!(
                copy.headers
                    .get("vextrus_original_subject")
                    .unwrap()
                    .as_str(),
                destination
            );
        }
        // The terminated originals are not redelivered.
        let again = tokio::time::timeout(Duration::from_secs(2), source.next_delivery()).await;
        assert!(again.is_err(), "nothing more to deliver: {again:?}");
    })
    .await;
}

#[tokio::test]
async fn a_nacked_message_comes_again_with_the_next_attempt_number() {
    with_stream(|stream| async move {
        let transport = JetStreamTransport::connect(stream.config()).await.unwrap();
        let id = Uuid::now_v7();
        let headers = cloud_event_headers(id, "k");
        let destination = stream.subject("retry");
        transport
            .publish_confirmed(&PublishRequest::new(id, &destination, b"p", &headers))
            .await
            .unwrap();
        let mut source = source(&stream, "retrying").await;
        let first = next(&mut source).await.unwrap();
        assert_eq!(first.message().delivery_attempt, 1);
        let nacked_at = Instant::now();
        first.nack_after(Duration::from_millis(300)).await.unwrap();
        let second = next(&mut source).await.unwrap();
        assert!(
            nacked_at.elapsed() >= Duration::from_millis(250),
            "the delay held"
        );
        assert_eq!(second.message().id.0, id);
        assert_eq!(second.message().delivery_attempt, 2);
        second.ack_confirmed().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn check_mode_refuses_a_missing_stream() {
    let stream = TestStream::new();
    let err = JetStreamTransport::connect(stream.config().with_ensure_streams(false))
        .await
        .unwrap_err();
    assert!(matches!(err, NatsError::Stream { .. }), "{err}");
}

#[tokio::test]
async fn through_the_contract_a_message_arrives_as_the_inbound_view_of_what_was_sent() {
    with_stream(|stream| async move {
        // With a prefix, destinations are relative to the stream's root.
        let config = stream.config().with_subject_prefix(stream.root.clone());
        let transport = JetStreamTransport::connect(config.clone()).await.unwrap();
        let meta = EventMetadata::new().with_trace_context(
            TraceContext::parse(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Some("vextrus=1"),
            )
            .unwrap(),
        );
        let mut messages: Vec<OutboundMessage> = (0..5)
            .map(|i| {
                OutboundMessage::cloud_events(
                    "orders.placed",
                    format!("order-{}", i % 2),
                    "order.placed",
                    1,
                    "sales",
                    format!("{{\"n\":{i}}}").into_bytes(),
                    &meta,
                )
            })
            .collect();
        // A message with no headers at all travels too: the id and the key
        // go in the envelope.
        messages.push(OutboundMessage::new(
            "orders.placed",
            "k",
            b"plain".to_vec(),
        ));

        Transport::publish(&transport, &messages[0]).await.unwrap();
        let rest = Transport::publish_batch(&transport, &messages[1..]).await;
        assert!(rest.iter().all(Result::is_ok), "{rest:?}");

        let mut source =
            JetStreamSource::connect(config, ConsumerSpec::new(stream.name.clone(), "contract"))
                .await
                .unwrap();
        for sent in &messages {
            let delivery =
                tokio::time::timeout(Duration::from_secs(10), MessageSource::next(&mut source))
                    .await
                    .expect("a message within 10 s")
                    .unwrap()
                    .expect("the source stays open");
            assert_eq!(delivery.message(), &InboundMessage::from_outbound(sent, 1));
            assert_eq!(delivery.subject(), stream.subject("orders.placed"));
            MessageDelivery::ack(delivery).await.unwrap();
        }

        // Errors come in the contract's terms.
        let err = Transport::publish(&transport, &OutboundMessage::new("a..b", "k", Vec::new()))
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransportError::UnknownDestination(_)),
            "{err}"
        );
        let huge = OutboundMessage::new(
            "orders.placed",
            "k",
            vec![0u8; transport.client().max_payload() + 1],
        );
        let err = Transport::publish(&transport, &huge).await.unwrap_err();
        assert!(
            matches!(err, TransportError::MessageTooLarge { .. }),
            "{err}"
        );
    })
    .await;
}

#[tokio::test]
async fn through_the_contract_a_malformed_message_is_invalid_headers_and_a_nack_redelivers() {
    with_stream(|stream| async move {
        let transport = JetStreamTransport::connect(stream.config()).await.unwrap();
        let destination = stream.subject("contract");
        let mut broken = async_nats::HeaderMap::new();
        broken.insert("Nats-Msg-Id", Uuid::now_v7().to_string());
        broken.insert("traceparent", "not a trace context");
        let js = transport.jetstream();
        js.publish_with_headers(destination.clone(), broken, "x".into())
            .await
            .unwrap()
            .await
            .unwrap();
        let good = OutboundMessage::new(destination.clone(), "k", b"good".to_vec());
        Transport::publish(&transport, &good).await.unwrap();

        let mut source = source(&stream, "contract-errors").await;
        let err = MessageSource::next(&mut source).await.unwrap_err();
        assert!(matches!(err, TransportError::InvalidHeaders(_)), "{err}");
        assert_eq!(source.malformed_count(), 1);
        let first = MessageSource::next(&mut source).await.unwrap().unwrap();
        assert_eq!(first.message().id, good.id);
        MessageDelivery::nack(first, Duration::from_millis(100))
            .await
            .unwrap();
        let again = MessageSource::next(&mut source).await.unwrap().unwrap();
        assert_eq!(again.message().id, good.id);
        assert_eq!(again.message().delivery_attempt, 2);
        MessageDelivery::ack(again).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pipelined_batches_beyond_the_inflight_limit_all_complete() {
    with_stream(|stream| async move {
        let transport = JetStreamTransport::connect(stream.config().with_max_ack_inflight(100))
            .await
            .unwrap();
        let destination = stream.subject("concurrent");
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let transport = transport.clone();
                let destination = destination.clone();
                tokio::spawn(async move {
                    let messages: Vec<OutboundMessage> = (0..250)
                        .map(|i| {
                            OutboundMessage::new(destination.clone(), format!("k{i}"), vec![1])
                        })
                        .collect();
                    Transport::publish_batch(&transport, &messages).await
                })
            })
            .collect();
        let results =
            tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(tasks))
                .await
                .expect("no deadlock between callers sharing the inflight limit");
        for result in results {
            assert!(result.unwrap().iter().all(Result::is_ok));
        }
        let mut js_stream = transport
            .jetstream()
            .get_stream(&stream.name)
            .await
            .unwrap();
        assert_eq!(js_stream.info().await.unwrap().state.messages, 1000);
    })
    .await;
}
