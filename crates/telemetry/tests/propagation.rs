//! Trace context injected by a producer and extracted by a consumer keeps
//! the trace id and makes the consumer's span a child of the producer's;
//! malformed headers never panic. Spans are captured with the SDK's
//! in-memory exporter under a scoped (not global) subscriber.

use std::collections::HashMap;

use opentelemetry::trace::{SpanId, Status, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::layer::SubscriberExt;
use vextrus_kernel::{ErrorKind, EventMetadata, HasErrorKind, TraceContext};
use vextrus_telemetry::{
    TelemetryError, TimedExt, continue_trace, current_trace_context, extract_headers,
    inject_headers, inject_into_metadata, inject_trace_context, names, spans, trace_context_of,
};

/// Runs `f` under a subscriber whose OpenTelemetry layer exports to memory,
/// and returns the finished spans.
fn capture(f: impl FnOnce()) -> Vec<SpanData> {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::with_default(subscriber, f);
    provider.force_flush().unwrap();
    exporter.get_finished_spans().unwrap()
}

fn find<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span {name}"))
}

#[test]
fn headers_carry_the_trace_from_producer_to_consumer() {
    let mut map_headers: HashMap<String, String> = HashMap::new();
    let mut vec_headers: Vec<(String, String)> = Vec::new();
    let mut produced: Option<TraceContext> = None;
    let spans = capture(|| {
        let producer = tracing::info_span!("producer");
        producer.in_scope(|| {
            produced = current_trace_context();
            assert!(inject_headers(&mut map_headers));
            assert!(inject_headers(&mut vec_headers));
        });
        assert_eq!(trace_context_of(&producer), produced);
        drop(producer);
        assert_eq!(current_trace_context(), None, "outside every span");

        let from_map = spans::message_consume("m-1", "orders", &map_headers);
        from_map.in_scope(|| {});
        let from_vec = spans::message_consume("m-2", "orders", &vec_headers);
        from_vec.in_scope(|| {});
    });
    let produced = produced.expect("a producer span has a trace context");
    assert_eq!(map_headers["traceparent"], produced.traceparent());

    let producer = find(&spans, "producer");
    assert_eq!(
        producer.span_context.trace_id().to_string(),
        produced.trace_id()
    );
    assert_eq!(
        producer.span_context.span_id().to_string(),
        produced.parent_id()
    );
    let consumers: Vec<_> = spans
        .iter()
        .filter(|s| s.name == names::SPAN_MESSAGE_CONSUME)
        .collect();
    assert_eq!(consumers.len(), 2);
    for consumer in consumers {
        assert_eq!(
            consumer.span_context.trace_id(),
            producer.span_context.trace_id()
        );
        assert_eq!(consumer.parent_span_id, producer.span_context.span_id());
        assert!(consumer.parent_span_is_remote);
        assert_eq!(consumer.span_kind, opentelemetry::trace::SpanKind::Consumer);
    }
}

#[test]
fn metadata_carries_the_trace_from_append_to_relay_and_reply() {
    let mut placed = EventMetadata::new();
    let mut reply_headers: Vec<(String, String)> = Vec::new();
    let spans = capture(|| {
        spans::event_append("order-1", 1).in_scope(|| assert!(inject_into_metadata(&mut placed)));

        // Events caused by `placed` inherit its context; the relay continues it.
        let reserved = EventMetadata::caused_by(&placed);
        let publish =
            spans::outbox_publish("m-1", "inventory.commands", reserved.trace_context.as_ref());
        let mut headers = HashMap::new();
        publish.in_scope(|| inject_headers(&mut headers));

        // The participant replies from inside its consume span; the
        // orchestrator's next step continues from the reply's headers.
        spans::message_consume("m-1", "inventory.commands", &headers)
            .in_scope(|| inject_headers(&mut reply_headers));
        let reply_tc = extract_headers(&reply_headers).unwrap().unwrap();
        spans::saga_step("saga-1", "order_to_cash", "charge_payment", Some(&reply_tc))
            .in_scope(|| {});
    });
    let append = find(&spans, names::SPAN_EVENT_APPEND);
    let publish = find(&spans, names::SPAN_OUTBOX_PUBLISH);
    let consume = find(&spans, names::SPAN_MESSAGE_CONSUME);
    let step = find(&spans, names::SPAN_SAGA_STEP);
    let trace = append.span_context.trace_id();
    for s in [publish, consume, step] {
        assert_eq!(s.span_context.trace_id(), trace, "{}", s.name);
    }
    assert_eq!(append.parent_span_id, SpanId::INVALID);
    assert_eq!(publish.parent_span_id, append.span_context.span_id());
    assert_eq!(consume.parent_span_id, publish.span_context.span_id());
    assert_eq!(step.parent_span_id, consume.span_context.span_id());
    assert_eq!(
        placed.trace_context.as_ref().unwrap().trace_id(),
        trace.to_string()
    );
}

#[test]
fn malformed_headers_start_a_new_trace_without_panicking() {
    let garbage: Vec<Vec<(String, String)>> = vec![
        vec![("traceparent".into(), "".into())],
        vec![("traceparent".into(), "00-not-hex-01".into())],
        vec![(
            "traceparent".into(),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01".into(),
        )],
        vec![(
            "traceparent".into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\u{0}".into(),
        )],
        vec![("traceparent".into(), "é".repeat(200))],
    ];
    for headers in &garbage {
        assert!(
            matches!(
                extract_headers(headers),
                Err(TelemetryError::InvalidTraceContext(_))
            ),
            "{headers:?}"
        );
    }
    let spans = capture(|| {
        for (i, headers) in garbage.iter().enumerate() {
            spans::message_consume(i, "orders", headers).in_scope(|| {});
        }
    });
    assert_eq!(spans.len(), garbage.len());
    for s in &spans {
        assert_eq!(s.parent_span_id, SpanId::INVALID, "a new root span");
        assert!(s.span_context.is_valid());
    }
}

#[test]
fn a_started_span_cannot_be_reparented() {
    let tc = TraceContext::parse(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        None,
    )
    .unwrap();
    let mut result = None;
    let spans = capture(|| {
        let span = tracing::info_span!("late");
        span.in_scope(|| {});
        result = Some(continue_trace(&span, &tc));
    });
    let err = result.unwrap().unwrap_err();
    assert!(matches!(err, TelemetryError::SpanAlreadyStarted));
    assert_eq!(err.kind(), ErrorKind::Fatal);
    assert_ne!(
        find(&spans, "late").span_context.trace_id().to_string(),
        tc.trace_id()
    );
}

#[test]
fn stored_context_can_be_written_to_headers_verbatim() {
    let tc = TraceContext::parse(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        Some("vendor=1"),
    )
    .unwrap();
    let mut headers: Vec<(String, String)> = Vec::new();
    inject_trace_context(&tc, &mut headers);
    assert_eq!(extract_headers(&headers).unwrap(), Some(tc.clone()));

    // An unsampled parent: the consumer span continues the trace but is not
    // recorded, and the trace state survives.
    let mut forwarded: Vec<(String, String)> = Vec::new();
    let spans = capture(|| {
        spans::message_consume("m", "orders", &headers).in_scope(|| inject_headers(&mut forwarded));
    });
    assert!(spans.is_empty());
    let forwarded = extract_headers(&forwarded).unwrap().unwrap();
    assert_eq!(forwarded.trace_id(), tc.trace_id());
    assert_eq!(forwarded.tracestate(), Some("vendor=1"));
    assert!(!forwarded.sampled());
}

#[derive(Debug)]
struct Boom;
impl HasErrorKind for Boom {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Fatal
    }
}

#[test]
fn timed_futures_are_spans_named_after_the_operation() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let spans = capture(|| {
        rt.block_on(async {
            let parent = tracing::info_span!("handler");
            let _ = tracing::Instrument::instrument(
                async {
                    async { 1 }.timed("pricing.quote").await;
                    let _: Result<(), Boom> = async { Err(Boom) }.try_timed("payment.charge").await;
                },
                parent,
            )
            .await;
        });
    });
    let handler = find(&spans, "handler");
    let quote = find(&spans, "pricing.quote");
    let charge = find(&spans, "payment.charge");
    assert_eq!(quote.parent_span_id, handler.span_context.span_id());
    assert_eq!(charge.parent_span_id, handler.span_context.span_id());
    assert_eq!(quote.status, Status::Unset);
    assert!(matches!(charge.status, Status::Error { .. }));
    assert!(
        quote
            .attributes
            .iter()
            .any(|kv| kv.key.as_str() == names::ATTR_OPERATION
                && kv.value.as_str() == "pricing.quote")
    );
}
