//! The transport conformance suite, and [`RecordingTransport`] for relay
//! tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vextrus_core::transport::{
    InboundMessage, MessageDelivery, MessageSource, OutboundMessage, Transport, TransportError,
    headers,
};
use vextrus_kernel::{CausationId, EventMetadata, TraceContext};

type Fault = Arc<dyn Fn(&OutboundMessage) -> Option<TransportError> + Send + Sync>;

/// A transport that records every confirmed message per destination, in
/// confirmation order, and fails publishes a fault function picks.
///
/// ```
/// use vextrus_core::transport::{OutboundMessage, Transport, TransportError};
/// use vextrus_testkit::transport::RecordingTransport;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let t = RecordingTransport::new();
/// t.set_fault(|m| (m.partition_key == "bad").then(|| TransportError::Unavailable("down".into())));
/// t.publish(&OutboundMessage::new("d", "ok", vec![])).await.unwrap();
/// assert!(t.publish(&OutboundMessage::new("d", "bad", vec![])).await.is_err());
/// assert_eq!(t.confirmed("d").len(), 1);
/// # });
/// ```
#[derive(Clone, Default)]
pub struct RecordingTransport {
    log: Arc<Mutex<HashMap<String, Vec<OutboundMessage>>>>,
    fault: Arc<Mutex<Option<Fault>>>,
}

impl std::fmt::Debug for RecordingTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingTransport").finish_non_exhaustive()
    }
}

impl RecordingTransport {
    /// A transport that confirms everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fails every publish for which `fault` returns an error.
    pub fn set_fault(
        &self,
        fault: impl Fn(&OutboundMessage) -> Option<TransportError> + Send + Sync + 'static,
    ) {
        *self.fault.lock().unwrap() = Some(Arc::new(fault));
    }

    /// Confirms everything again.
    pub fn clear_fault(&self) {
        *self.fault.lock().unwrap() = None;
    }

    /// The confirmed messages of `destination`, in confirmation order.
    pub fn confirmed(&self, destination: &str) -> Vec<OutboundMessage> {
        self.log
            .lock()
            .unwrap()
            .get(destination)
            .cloned()
            .unwrap_or_default()
    }

    /// How many messages were confirmed, over all destinations.
    pub fn confirmed_count(&self) -> usize {
        self.log.lock().unwrap().values().map(Vec::len).sum()
    }
}

impl Transport for RecordingTransport {
    async fn publish(&self, message: &OutboundMessage) -> Result<(), TransportError> {
        let fault = self.fault.lock().unwrap().clone();
        if let Some(e) = fault.and_then(|f| f(message)) {
            return Err(e);
        }
        self.log
            .lock()
            .unwrap()
            .entry(message.destination.clone())
            .or_default()
            .push(message.clone());
        Ok(())
    }
}

/// How the transport suite gets a transport and a subscription.
pub trait TransportBackend: Send + Sync {
    /// The transport under test.
    type Transport: Transport;
    /// Its consumer side.
    type Source: MessageSource;

    /// A transport with `destination` declared (created, empty) and a
    /// subscription to it.
    fn setup(
        &self,
        destination: &str,
    ) -> impl Future<Output = (Self::Transport, Self::Source)> + Send;

    /// A destination that does not exist on this transport.
    fn unknown_destination(&self) -> String;

    /// The transport's maximum message size in bytes.
    fn max_message_bytes(&self) -> usize;
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn sample(destination: &str, key: &str, payload: Vec<u8>) -> OutboundMessage {
    let meta = EventMetadata::new()
        .with_causation_id(CausationId::new())
        .with_trace_context(
            TraceContext::parse(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Some("vx=1"),
            )
            .unwrap(),
        );
    OutboundMessage::cloud_events(
        destination,
        key,
        "order.placed",
        3,
        "testkit",
        payload,
        &meta,
    )
}

async fn receive<S: MessageSource>(source: &mut S) -> S::Delivery {
    tokio::time::timeout(Duration::from_secs(10), source.next())
        .await
        .expect("a message within 10 s")
        .expect("the source works")
        .expect("the source is open")
}

/// Publishes 20 messages on two keys; each publish is confirmed, and the
/// subscription receives all of them with ids, payloads and keys intact and
/// each key's messages in order.
pub async fn publish_confirm_receive<B: TransportBackend>(backend: &B) {
    let dest = unique("vx-suite");
    let (transport, mut source) = backend.setup(&dest).await;
    let sent: Vec<OutboundMessage> = (0..20)
        .map(|i| {
            sample(
                &dest,
                if i % 2 == 0 { "a" } else { "b" },
                format!("{i}").into_bytes(),
            )
        })
        .collect();
    for r in transport.publish_batch(&sent).await {
        r.expect("confirmed");
    }
    let mut got: Vec<InboundMessage> = Vec::new();
    while got.len() < sent.len() {
        let d = receive(&mut source).await;
        got.push(d.message().clone());
        d.ack().await.expect("ack");
    }
    for key in ["a", "b"] {
        let want: Vec<_> = sent
            .iter()
            .filter(|m| m.partition_key == key)
            .map(|m| m.id)
            .collect();
        let have: Vec<_> = got
            .iter()
            .filter(|m| m.header(headers::PARTITION_KEY) == Some(key))
            .map(|m| m.id)
            .collect();
        assert_eq!(have, want, "key {key} in order");
    }
    for m in &got {
        let s = sent.iter().find(|s| s.id == m.id).expect("sent");
        assert_eq!(m.payload, s.payload);
        assert_eq!(m.source, dest);
    }
}

/// Publishing to a destination that does not exist is
/// [`TransportError::UnknownDestination`] (or another non-transient typed
/// error), never a silent success.
pub async fn unknown_destination_is_typed<B: TransportBackend>(backend: &B) {
    let dest = unique("vx-suite");
    let (transport, _source) = backend.setup(&dest).await;
    let err = transport
        .publish(&sample(&backend.unknown_destination(), "k", b"{}".to_vec()))
        .await
        .expect_err("unknown destination must fail");
    assert!(
        matches!(
            err,
            TransportError::UnknownDestination(_) | TransportError::Rejected(_)
        ),
        "{err:?}"
    );
}

/// A message over the maximum size is [`TransportError::MessageTooLarge`]
/// and nothing is delivered; one under it goes through.
pub async fn oversized_message_is_typed<B: TransportBackend>(backend: &B) {
    let dest = unique("vx-suite");
    let (transport, mut source) = backend.setup(&dest).await;
    let max = backend.max_message_bytes();
    let big = sample(&dest, "k", vec![b'x'; max + 1]);
    let err = transport.publish(&big).await.expect_err("too large");
    assert!(
        matches!(err, TransportError::MessageTooLarge { .. }),
        "{err:?}"
    );
    let small = sample(&dest, "k", b"ok".to_vec());
    transport.publish(&small).await.expect("small message");
    let d = receive(&mut source).await;
    assert_eq!(
        d.message().id,
        small.id,
        "the oversized message was not delivered"
    );
    d.ack().await.expect("ack");
}

/// CloudEvents binary-mode headers, correlation, causation and trace
/// context survive the trip, and the received message validates.
pub async fn headers_round_trip<B: TransportBackend>(backend: &B) {
    let dest = unique("vx-suite");
    let (transport, mut source) = backend.setup(&dest).await;
    let sent = sample(&dest, "order-7", br#"{"total":1}"#.to_vec());
    transport.publish(&sent).await.expect("confirmed");
    let d = receive(&mut source).await;
    let got = d.message();
    assert_eq!(got.id, sent.id);
    got.validate_headers().expect("valid headers");
    for name in [
        headers::CE_ID,
        headers::CE_TYPE,
        headers::CE_SOURCE,
        headers::CE_TIME,
        headers::CE_SPECVERSION,
        headers::CONTENT_TYPE,
        headers::CORRELATION_ID,
        headers::CAUSATION_ID,
        headers::TRACEPARENT,
        headers::TRACESTATE,
        headers::SCHEMA_VERSION,
    ] {
        assert_eq!(
            got.header(name),
            sent.headers.get(name).map(String::as_str),
            "header {name}"
        );
    }
    assert_eq!(
        got.trace_context().unwrap().trace_id(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    d.ack().await.expect("ack");
}

/// A delivery nacked is delivered again, with a higher attempt number.
pub async fn nack_redelivers<B: TransportBackend>(backend: &B) {
    let dest = unique("vx-suite");
    let (transport, mut source) = backend.setup(&dest).await;
    let sent = sample(&dest, "k", b"{}".to_vec());
    transport.publish(&sent).await.expect("confirmed");
    let d = receive(&mut source).await;
    assert_eq!(d.message().delivery_attempt, 1);
    d.nack(Duration::from_millis(10)).await.expect("nack");
    let d = receive(&mut source).await;
    assert_eq!(d.message().id, sent.id);
    assert!(d.message().delivery_attempt >= 2);
    d.ack().await.expect("ack");
}
