//! The relay publishes each message inside a `vextrus.outbox.publish` span
//! that continues the trace stored with the message, and hands the transport
//! the publish span's own `traceparent`, so the consumer's span is the
//! publish span's child: spans are captured with the OpenTelemetry SDK's
//! in-memory exporter, in both key-pipelining modes.

use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::layer::SubscriberExt;
use vextrus_core::outbox::{
    InMemoryOutbox, KeyPipelining, OutboxRelay, OutboxStatus, OutboxStore, RelayConfig,
};
use vextrus_core::transport::{
    InProcessTransport, MessageDelivery, MessageSource, OutboundMessage, headers,
};
use vextrus_kernel::{EventMetadata, TraceContext};
use vextrus_telemetry::{names, spans};

const ORDERS: &str = "orders";

/// What one relay run under an in-memory span exporter left: `traced`
/// messages carry the context of a `place_order` span (one per message),
/// `untraced` carry none.
struct Run {
    /// Every finished span.
    spans: Vec<SpanData>,
    /// Per message in enqueue order: (stored traceparent, published traceparent).
    headers: Vec<(Option<String>, Option<String>)>,
    /// The stored rows' traceparent after the relay ran.
    stored_after: Vec<Option<String>>,
}

fn run(mode: KeyPipelining, traced: usize, untraced: usize) -> Run {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _guard = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (headers, stored_after) = rt.block_on(async {
        let outbox = InMemoryOutbox::new();
        let broker = InProcessTransport::new();
        broker.declare(ORDERS);
        let mut sub = broker.subscribe(ORDERS).unwrap();
        let mut messages = Vec::new();
        for i in 0..traced {
            // Each order is placed in its own span; the message stores that
            // span's context, as an event's metadata would.
            let place = tracing::info_span!("place_order", order = i);
            let mut meta = EventMetadata::new();
            meta.trace_context = vextrus_telemetry::trace_context_of(&place);
            assert!(meta.trace_context.is_some(), "the subscriber records spans");
            messages.push(OutboundMessage::cloud_events(
                ORDERS,
                // Two keys, so a key's messages are chained (or batched).
                format!("k{}", i % 2),
                "order.placed",
                1,
                "test",
                b"{}".to_vec(),
                &meta,
            ));
        }
        for i in 0..untraced {
            messages.push(OutboundMessage::new(
                ORDERS,
                format!("u{i}"),
                b"{}".to_vec(),
            ));
        }
        outbox.enqueue(&messages).await.unwrap();
        let mut cfg = RelayConfig::new("traced");
        cfg.key_pipelining = mode;
        // The relay runs outside any span, as its workers do.
        let relay = OutboxRelay::new(outbox.clone(), broker.clone(), cfg);
        let report = relay.drain("traced-0").await.unwrap();
        assert_eq!(report.published, messages.len());
        let published = broker.published(ORDERS);
        assert_eq!(published.len(), messages.len());
        let mut headers = Vec::new();
        let mut stored_after = Vec::new();
        for m in &messages {
            let out = published.iter().find(|p| p.id == m.id).unwrap();
            headers.push((
                m.headers.get(headers::TRACEPARENT).cloned(),
                out.headers.get(headers::TRACEPARENT).cloned(),
            ));
            let row = outbox.get(m.id).await.unwrap().unwrap();
            assert_eq!(row.status, OutboxStatus::Published);
            stored_after.push(row.message.headers.get(headers::TRACEPARENT).cloned());
        }
        // Consume every delivery under a consume span continuing its headers.
        for _ in 0..messages.len() {
            let delivery = sub.next().await.unwrap().expect("a delivery");
            let msg = delivery.message();
            let consume = spans::message_consume(msg.id, ORDERS, &msg.headers);
            consume.in_scope(|| tracing::info!("consumed"));
            drop(consume);
            delivery.ack().await.unwrap();
        }
        (headers, stored_after)
    });
    drop(rt);
    provider.force_flush().unwrap();
    Run {
        spans: exporter.get_finished_spans().unwrap(),
        headers,
        stored_after,
    }
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

fn parse(tp: &str) -> TraceContext {
    TraceContext::parse(tp, None).unwrap()
}

fn span_id_of(tp: &str) -> SpanId {
    SpanId::from_hex(&tp[36..52]).unwrap()
}

fn trace_id_of(tp: &str) -> TraceId {
    TraceId::from_hex(parse(tp).trace_id()).unwrap()
}

fn check(mode: KeyPipelining) {
    let traced = 6;
    let untraced = 2;
    let run = run(mode, traced, untraced);
    let publishes: Vec<&SpanData> = run
        .spans
        .iter()
        .filter(|s| s.name == names::SPAN_OUTBOX_PUBLISH)
        .collect();
    let consumes: Vec<&SpanData> = run
        .spans
        .iter()
        .filter(|s| s.name == names::SPAN_MESSAGE_CONSUME)
        .collect();
    assert_eq!(
        publishes.len(),
        traced + untraced,
        "{mode:?}: one per message"
    );
    assert_eq!(consumes.len(), traced + untraced);

    for (i, (stored, sent)) in run.headers.iter().enumerate() {
        let sent = sent.as_deref().expect("every published message is traced");
        // The publish span named in the sent header.
        let publish = publishes
            .iter()
            .find(|s| s.span_context.span_id() == span_id_of(sent))
            .unwrap_or_else(|| panic!("{mode:?}: message {i}'s traceparent is no publish span"));
        assert_eq!(publish.span_context.trace_id(), trace_id_of(sent));
        let id = attr(publish, names::ATTR_MESSAGE_ID).expect("message id attribute");
        assert_eq!(
            attr(publish, names::ATTR_DESTINATION).as_deref(),
            Some(ORDERS)
        );
        // The consumer's span is the publish span's child.
        let consume = consumes
            .iter()
            .find(|s| attr(s, names::ATTR_MESSAGE_ID).as_deref() == Some(id.as_str()))
            .expect("the message was consumed");
        assert_eq!(
            consume.parent_span_id,
            publish.span_context.span_id(),
            "{mode:?}: consume is a child of publish"
        );
        assert_eq!(
            consume.span_context.trace_id(),
            publish.span_context.trace_id()
        );
        match stored {
            Some(stored) => {
                // The publish continues the stored context: same trace, its
                // parent the span that enqueued the message.
                assert!(i < traced);
                assert_eq!(publish.span_context.trace_id(), trace_id_of(stored));
                assert_eq!(publish.parent_span_id, span_id_of(stored));
                let place = run
                    .spans
                    .iter()
                    .find(|s| s.span_context.span_id() == span_id_of(stored))
                    .expect("the placement span was recorded");
                assert_eq!(place.name, "place_order");
                assert_ne!(sent, stored.as_str(), "the header was re-injected");
                // The stored row keeps its own context.
                assert_eq!(run.stored_after[i].as_deref(), Some(stored.as_str()));
            }
            None => {
                // No stored context: the publish starts a trace of its own.
                assert!(i >= traced);
                assert_eq!(publish.parent_span_id, SpanId::INVALID);
                assert_eq!(run.stored_after[i], None);
            }
        }
    }
    // Traced messages of distinct placements are in distinct traces.
    let mut traces: Vec<TraceId> = publishes
        .iter()
        .map(|s| s.span_context.trace_id())
        .collect();
    traces.sort_by_key(|t| t.to_string());
    traces.dedup();
    assert_eq!(traces.len(), traced + untraced);
}

#[test]
fn one_at_a_time_publish_spans_continue_the_stored_trace_and_parent_the_consumer() {
    check(KeyPipelining::OneAtATime);
}

#[test]
fn batch_publish_spans_continue_the_stored_trace_and_parent_the_consumer() {
    check(KeyPipelining::Batch);
}

#[test]
fn without_a_subscriber_the_message_is_published_unchanged() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tc = TraceContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("vendor=1"),
        )
        .unwrap();
        let mut meta = EventMetadata::new();
        meta.trace_context = Some(tc);
        for mode in [KeyPipelining::OneAtATime, KeyPipelining::Batch] {
            let outbox = InMemoryOutbox::new();
            let broker = InProcessTransport::new();
            broker.declare(ORDERS);
            let m =
                OutboundMessage::cloud_events(ORDERS, "k", "t", 1, "test", b"{}".to_vec(), &meta);
            outbox.enqueue(std::slice::from_ref(&m)).await.unwrap();
            let mut cfg = RelayConfig::new("plain");
            cfg.key_pipelining = mode;
            let relay = OutboxRelay::new(outbox.clone(), broker.clone(), cfg);
            assert_eq!(relay.drain("plain-0").await.unwrap().published, 1);
            let published = broker.published(ORDERS);
            assert_eq!(published.len(), 1);
            assert_eq!(
                published[0].headers, m.headers,
                "{mode:?}: headers as stored"
            );
        }
    });
}
