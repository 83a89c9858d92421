//! `init` with an OTLP endpoint exports spans over OTLP/HTTP (protobuf): an
//! in-test receiver decodes `ExportTraceServiceRequest`s and checks span
//! names, attributes, kinds and parent/child links across append, outbox
//! publish, consume and saga step, and that dropping the guard flushes.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use vextrus_kernel::EventMetadata;
use vextrus_telemetry::{
    TelemetryConfig, TimedExt, init, inject_headers, inject_into_metadata, names, spans,
};

/// One request the receiver got.
struct Received {
    method: String,
    path: String,
    content_type: Option<String>,
    body: Vec<u8>,
}

/// A minimal OTLP/HTTP receiver: HTTP/1.1 with keep-alive, answers 200 with
/// an empty `ExportTraceServiceResponse` and hands every request to the test.
fn start_receiver() -> (SocketAddr, mpsc::Receiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let tx = tx.clone();
            std::thread::spawn(move || serve_connection(stream, tx));
        }
    });
    (addr, rx)
}

fn serve_connection(stream: TcpStream, tx: mpsc::Sender<Received>) {
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        let mut headers = HashMap::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (k, v) = line.split_once(':').unwrap();
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
        let len: usize = headers
            .get("content-length")
            .map(|v| v.parse().unwrap())
            .unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        writer
            .write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
            )
            .unwrap();
        let _ = tx.send(Received {
            method,
            path,
            content_type: headers.get("content-type").cloned(),
            body,
        });
    }
}

fn spans_of(request: &Received) -> (Vec<KeyValue>, Vec<Span>) {
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/v1/traces");
    assert_eq!(
        request.content_type.as_deref(),
        Some("application/x-protobuf")
    );
    let decoded = ExportTraceServiceRequest::decode(request.body.as_slice()).unwrap();
    let mut resource = Vec::new();
    let mut spans = Vec::new();
    for rs in decoded.resource_spans {
        resource.extend(rs.resource.map(|r| r.attributes).unwrap_or_default());
        for ss in rs.scope_spans {
            spans.extend(ss.spans);
        }
    }
    (resource, spans)
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn string_attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attr(attrs, key) {
        Some(any_value::Value::StringValue(s)) => Some(s),
        _ => None,
    }
}

fn find<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span {name} in {:?}", names_of(spans)))
}

fn names_of(spans: &[Span]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}

/// Waits for requests until `want` spans have arrived.
fn collect(rx: &mpsc::Receiver<Received>, want: usize) -> (Vec<KeyValue>, Vec<Span>) {
    let mut resource = Vec::new();
    let mut spans = Vec::new();
    while spans.len() < want {
        let request = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("only {:?} arrived", names_of(&spans)));
        let (r, s) = spans_of(&request);
        resource = r;
        spans.extend(s);
    }
    (resource, spans)
}

#[test]
fn spans_reach_an_otlp_receiver_with_attributes_and_parent_links() {
    let (addr, rx) = start_receiver();
    let guard = init(
        TelemetryConfig::new("otlp-test")
            .with_env_filter("info")
            .with_otlp_endpoint(format!("http://{addr}/")),
    )
    .unwrap();

    // The deciding service appends an event; its metadata carries the trace.
    let mut metadata = EventMetadata::new();
    let append = spans::event_append("order-42", 2);
    assert!(append.in_scope(|| inject_into_metadata(&mut metadata)));
    drop(append);

    // The relay publishes later, continuing the stored trace.
    let mut headers: Vec<(String, String)> = Vec::new();
    let publish = spans::outbox_publish("msg-1", "sales.orders", metadata.trace_context.as_ref());
    assert!(publish.in_scope(|| inject_headers(&mut headers)));
    drop(publish);

    // A participant consumes it and runs a saga step.
    let consume = spans::message_consume("msg-1", "sales.orders", &headers);
    consume.in_scope(|| {
        let step = spans::saga_step("saga-7", "order_to_cash", "reserve_stock", None);
        step.in_scope(|| tracing::info!("reserving stock"));
    });
    drop(consume);

    // A timed operation, outside any span: a trace of its own.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(
        async { tokio::time::sleep(Duration::from_millis(1)).await }.timed("inventory.reserve"),
    );

    guard.force_flush().unwrap();
    let (resource, spans) = collect(&rx, 5);

    assert_eq!(string_attr(&resource, "service.name"), Some("otlp-test"));

    let append = find(&spans, names::SPAN_EVENT_APPEND);
    let publish = find(&spans, names::SPAN_OUTBOX_PUBLISH);
    let consume = find(&spans, names::SPAN_MESSAGE_CONSUME);
    let step = find(&spans, names::SPAN_SAGA_STEP);
    let timed = find(&spans, "inventory.reserve");

    // One trace from append to saga step, each span the child of the one before.
    for s in [publish, consume, step] {
        assert_eq!(s.trace_id, append.trace_id, "{}", s.name);
    }
    assert!(append.parent_span_id.is_empty(), "append is the root");
    assert_eq!(publish.parent_span_id, append.span_id);
    assert_eq!(consume.parent_span_id, publish.span_id);
    assert_eq!(step.parent_span_id, consume.span_id);
    assert_ne!(timed.trace_id, append.trace_id);

    // The stored trace context is the append span's.
    let stored = metadata.trace_context.as_ref().unwrap();
    assert_eq!(stored.trace_id(), hex(&append.trace_id));
    assert_eq!(stored.parent_id(), hex(&append.span_id));

    // Kinds and attributes.
    assert_eq!(publish.kind, SpanKind::Producer as i32);
    assert_eq!(consume.kind, SpanKind::Consumer as i32);
    assert_eq!(
        string_attr(&append.attributes, names::ATTR_STREAM_ID),
        Some("order-42")
    );
    assert_eq!(
        attr(&append.attributes, names::ATTR_EVENT_COUNT),
        Some(&any_value::Value::IntValue(2))
    );
    for s in [publish, consume] {
        assert_eq!(
            string_attr(&s.attributes, names::ATTR_MESSAGE_ID),
            Some("msg-1")
        );
        assert_eq!(
            string_attr(&s.attributes, names::ATTR_DESTINATION),
            Some("sales.orders")
        );
    }
    assert_eq!(
        string_attr(&step.attributes, names::ATTR_SAGA_ID),
        Some("saga-7")
    );
    assert_eq!(
        string_attr(&step.attributes, names::ATTR_SAGA_TYPE),
        Some("order_to_cash")
    );
    assert_eq!(
        string_attr(&step.attributes, names::ATTR_SAGA_STEP),
        Some("reserve_stock")
    );
    assert_eq!(
        string_attr(&timed.attributes, names::ATTR_OPERATION),
        Some("inventory.reserve")
    );
    assert!(
        step.events.iter().any(|e| e.name == "reserving stock"),
        "log events inside a span are exported as span events"
    );

    // Dropping the guard flushes what is still buffered.
    tracing::info_span!("last.words").in_scope(|| {});
    drop(guard);
    let (_, spans) = collect(&rx, 1);
    assert_eq!(names_of(&spans), ["last.words"]);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
