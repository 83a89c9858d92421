//! The transport contract: how an outbox message leaves the service and how
//! a consumer receives one.
//!
//! - [`Transport`] publishes [`OutboundMessage`]s and resolves only after the
//!   broker confirmed each one (durably stored). Implementations: JetStream
//!   (`vextrus-nats`), Kafka (`vextrus-kafka`) and [`InProcessTransport`]
//!   (the embedded default).
//! - [`MessageSource`] yields [`MessageDelivery`]s of [`InboundMessage`]s to
//!   the inbox; a delivery is acknowledged only after the consumer committed.
//! - Messages travel in CloudEvents' binary content mode: the event's
//!   attributes are headers ([`headers::CE_ID`], [`headers::CE_TYPE`], ...),
//!   plus correlation, causation and W3C trace context headers.
//!   [`OutboundMessage::cloud_events`] fills them from an event's
//!   [`EventMetadata`]; [`InboundMessage::validate_headers`] checks them on
//!   receipt.
//!
//! A message's [`MessageId`] is the outbox row's id. It is the
//! de-duplication key everywhere downstream: JetStream's `Nats-Msg-Id`,
//! CloudEvents' `ce_id`, and the inbox key. A retried or replayed message
//! keeps it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vextrus_kernel::{ErrorKind, EventMetadata, HasErrorKind, TraceContext};

use crate::error::BoxError;

pub mod in_process;

pub use in_process::{InProcessDelivery, InProcessSubscription, InProcessTransport};

/// A message's stable id: the outbox row's id, the dedup key everywhere
/// downstream (JetStream `Nats-Msg-Id`, CloudEvents `ce_id`, the inbox key).
///
/// ```
/// use vextrus_core::transport::MessageId;
///
/// let id = MessageId::new();
/// let parsed: MessageId = id.to_string().parse().unwrap();
/// assert_eq!(parsed, id);
/// assert!("not-a-uuid".parse::<MessageId>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(pub Uuid);

impl MessageId {
    /// A new, time-ordered (UUIDv7) id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id as a UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<Uuid> for MessageId {
    fn from(value: Uuid) -> Self {
        Self(value)
    }
}

impl FromStr for MessageId {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| TransportError::InvalidHeaders(format!("not a message id: {s:?}")))
    }
}

/// Message headers: ordered map of header name -> value (ASCII names,
/// lower-case by convention).
pub type Headers = BTreeMap<String, String>;

/// Header names used on the wire (CloudEvents binary content mode plus
/// correlation, causation and W3C trace context).
pub mod headers {
    /// CloudEvents `id`: the [`MessageId`](super::MessageId).
    pub const CE_ID: &str = "ce_id";
    /// CloudEvents `type`: the event type, e.g. `order.placed`.
    pub const CE_TYPE: &str = "ce_type";
    /// CloudEvents `source`: the producing service.
    pub const CE_SOURCE: &str = "ce_source";
    /// CloudEvents `time`: when the event occurred (RFC 3339).
    pub const CE_TIME: &str = "ce_time";
    /// CloudEvents `specversion`; its value is [`CE_SPECVERSION_VALUE`].
    pub const CE_SPECVERSION: &str = "ce_specversion";
    /// The only CloudEvents spec version vextrus speaks.
    pub const CE_SPECVERSION_VALUE: &str = "1.0";
    /// The payload's media type (CloudEvents `datacontenttype` in binary mode).
    pub const CONTENT_TYPE: &str = "content-type";
    /// The default content type: JSON.
    pub const CONTENT_TYPE_JSON: &str = "application/json";
    /// The correlation id shared by one business transaction.
    pub const CORRELATION_ID: &str = "correlation_id";
    /// The id of what caused this message.
    pub const CAUSATION_ID: &str = "causation_id";
    /// W3C `traceparent`.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C `tracestate`.
    pub const TRACESTATE: &str = "tracestate";
    /// The payload's schema version.
    pub const SCHEMA_VERSION: &str = "schema_version";
    /// The ordering key (the aggregate id by default).
    pub const PARTITION_KEY: &str = "partition_key";
}

/// A message on its way out: what the relay hands to a [`Transport`].
///
/// ```
/// use serde_json::json;
/// use vextrus_core::transport::{headers, OutboundMessage};
/// use vextrus_kernel::EventMetadata;
///
/// let meta = EventMetadata::new();
/// let msg = OutboundMessage::cloud_events(
///     "orders.events", "order-42", "order.placed", 1, "orders-service",
///     serde_json::to_vec(&json!({"total": 10})).unwrap(), &meta,
/// );
/// assert_eq!(msg.partition_key, "order-42");
/// assert_eq!(msg.headers[headers::CE_ID], msg.id.to_string());
/// assert_eq!(msg.headers[headers::CE_SPECVERSION], "1.0");
/// assert_eq!(msg.headers[headers::CORRELATION_ID], meta.correlation_id.to_string());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboundMessage {
    /// The stable id (dedup key downstream).
    pub id: MessageId,
    /// The topic (Kafka) or subject (NATS).
    pub destination: String,
    /// The ordering key (default: the aggregate id).
    pub partition_key: String,
    /// The bytes on the wire (usually JSON).
    pub payload: Vec<u8>,
    /// Headers: CloudEvents binary mode plus correlation/causation/traceparent.
    pub headers: Headers,
    /// When the message was created (enqueued).
    pub created_at: DateTime<Utc>,
}

impl OutboundMessage {
    /// A message with a fresh id, no headers and `created_at = now`.
    pub fn new(
        destination: impl Into<String>,
        partition_key: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            id: MessageId::new(),
            destination: destination.into(),
            partition_key: partition_key.into(),
            payload: payload.into(),
            headers: Headers::new(),
            created_at: Utc::now(),
        }
    }

    /// A message in CloudEvents binary content mode built from an event's
    /// metadata: a fresh message id, `ce_id` = that id, `ce_type` =
    /// `event_type`, `ce_source` = `source`, `ce_time` = the event's
    /// `occurred_at`, `ce_specversion` = `1.0`, `content-type` = JSON,
    /// `schema_version`, `partition_key`, `correlation_id`, and, when the
    /// metadata has them, `causation_id`, `traceparent` and `tracestate`.
    pub fn cloud_events(
        destination: impl Into<String>,
        partition_key: impl Into<String>,
        event_type: &str,
        schema_version: u32,
        source: &str,
        payload: impl Into<Vec<u8>>,
        metadata: &EventMetadata,
    ) -> Self {
        let mut msg = Self::new(destination, partition_key, payload);
        msg.set_cloud_events_headers(event_type, schema_version, source, metadata);
        msg
    }

    /// Sets the CloudEvents, correlation, causation and trace headers of this
    /// message from `metadata` (see [`OutboundMessage::cloud_events`]);
    /// other headers are kept.
    pub fn set_cloud_events_headers(
        &mut self,
        event_type: &str,
        schema_version: u32,
        source: &str,
        metadata: &EventMetadata,
    ) {
        let h = &mut self.headers;
        h.insert(headers::CE_ID.into(), self.id.to_string());
        h.insert(headers::CE_TYPE.into(), event_type.into());
        h.insert(headers::CE_SOURCE.into(), source.into());
        h.insert(
            headers::CE_TIME.into(),
            metadata
                .occurred_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        );
        h.insert(
            headers::CE_SPECVERSION.into(),
            headers::CE_SPECVERSION_VALUE.into(),
        );
        h.entry(headers::CONTENT_TYPE.into())
            .or_insert_with(|| headers::CONTENT_TYPE_JSON.into());
        h.insert(headers::SCHEMA_VERSION.into(), schema_version.to_string());
        h.insert(headers::PARTITION_KEY.into(), self.partition_key.clone());
        h.insert(
            headers::CORRELATION_ID.into(),
            metadata.correlation_id.to_string(),
        );
        if let Some(c) = metadata.causation_id {
            h.insert(headers::CAUSATION_ID.into(), c.to_string());
        }
        if let Some(tc) = &metadata.trace_context {
            h.insert(headers::TRACEPARENT.into(), tc.traceparent().into());
            if let Some(ts) = tc.tracestate() {
                h.insert(headers::TRACESTATE.into(), ts.into());
            }
        }
    }

    /// The message's size as a broker counts it: payload bytes plus header
    /// names and values.
    pub fn wire_size(&self) -> usize {
        self.payload.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// A message as a consumer receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundMessage {
    /// The stable id (from `ce_id` / `Nats-Msg-Id`): the inbox key.
    pub id: MessageId,
    /// The topic or subject it arrived on.
    pub source: String,
    /// The ordering key, if the broker carried one.
    pub partition_key: Option<String>,
    /// The payload bytes.
    pub payload: Vec<u8>,
    /// The headers as received.
    pub headers: Headers,
    /// Which delivery this is (1 = first).
    pub delivery_attempt: u32,
}

impl InboundMessage {
    /// The inbound view of an outbound message, as a broker would deliver it
    /// the `delivery_attempt`-th time.
    pub fn from_outbound(message: &OutboundMessage, delivery_attempt: u32) -> Self {
        Self {
            id: message.id,
            source: message.destination.clone(),
            partition_key: Some(message.partition_key.clone()),
            payload: message.payload.clone(),
            headers: message.headers.clone(),
            delivery_attempt,
        }
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// Checks the headers a consumer relies on and returns a typed
    /// [`TransportError::InvalidHeaders`] when one is wrong:
    /// `ce_id` must be present and equal to [`InboundMessage::id`];
    /// `ce_specversion`, if present, must be `1.0`; `ce_time`, if present,
    /// must be RFC 3339; `correlation_id` and `causation_id`, if present,
    /// must be UUIDs; `traceparent`/`tracestate`, if present, must be valid
    /// W3C trace context; `schema_version`, if present, a positive integer;
    /// and every header name must be non-empty printable ASCII and every
    /// value free of control characters.
    ///
    /// ```
    /// use vextrus_core::transport::{headers, InboundMessage, OutboundMessage};
    /// use vextrus_kernel::EventMetadata;
    ///
    /// let out = OutboundMessage::cloud_events("s", "k", "t", 1, "svc", b"{}".to_vec(), &EventMetadata::new());
    /// let mut msg = InboundMessage::from_outbound(&out, 1);
    /// assert!(msg.validate_headers().is_ok());
    /// msg.headers.insert(headers::TRACEPARENT.into(), "garbage".into());
    /// assert!(msg.validate_headers().is_err());
    /// ```
    pub fn validate_headers(&self) -> Result<(), TransportError> {
        let bad = |s: String| Err(TransportError::InvalidHeaders(s));
        for (k, v) in &self.headers {
            if k.is_empty() || !k.bytes().all(|b| b.is_ascii_graphic()) {
                return bad(format!("header name {k:?} is not printable ASCII"));
            }
            if v.chars().any(char::is_control) {
                return bad(format!("header {k} holds a control character"));
            }
        }
        match self.header(headers::CE_ID) {
            None => return bad("missing ce_id".into()),
            Some(ce_id) => match Uuid::parse_str(ce_id) {
                Ok(u) if u == self.id.0 => {}
                Ok(_) => {
                    return bad(format!(
                        "ce_id {ce_id} does not match message id {}",
                        self.id
                    ));
                }
                Err(_) => return bad(format!("ce_id {ce_id:?} is not a UUID")),
            },
        }
        if let Some(v) = self.header(headers::CE_SPECVERSION)
            && v != headers::CE_SPECVERSION_VALUE
        {
            return bad(format!("unsupported ce_specversion {v:?}"));
        }
        if let Some(v) = self.header(headers::CE_TIME)
            && DateTime::parse_from_rfc3339(v).is_err()
        {
            return bad(format!("ce_time {v:?} is not RFC 3339"));
        }
        for name in [headers::CORRELATION_ID, headers::CAUSATION_ID] {
            if let Some(v) = self.header(name)
                && Uuid::parse_str(v).is_err()
            {
                return bad(format!("{name} {v:?} is not a UUID"));
            }
        }
        if let Some(v) = self.header(headers::SCHEMA_VERSION)
            && !v.parse::<u32>().is_ok_and(|n| n > 0)
        {
            return bad(format!("schema_version {v:?} is not a positive integer"));
        }
        match (
            self.header(headers::TRACEPARENT),
            self.header(headers::TRACESTATE),
        ) {
            (Some(tp), ts) => {
                if let Err(e) = TraceContext::parse(tp, ts) {
                    return bad(e.to_string());
                }
            }
            (None, Some(_)) => return bad("tracestate without traceparent".into()),
            (None, None) => {}
        }
        Ok(())
    }

    /// The W3C trace context carried by the headers, if valid.
    pub fn trace_context(&self) -> Option<TraceContext> {
        TraceContext::parse(
            self.header(headers::TRACEPARENT)?,
            self.header(headers::TRACESTATE),
        )
        .ok()
    }
}

/// Publishes outbox messages to a broker.
///
/// Implementations: JetStream, Kafka, and [`InProcessTransport`].
pub trait Transport: Send + Sync {
    /// Publishes one message and resolves only after the broker confirmed it
    /// (durably stored); an error means "not confirmed" (it may still have
    /// been stored: callers retry with the same id).
    fn publish(
        &self,
        message: &OutboundMessage,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Publishes several (the relay's batch), in order; per-message results,
    /// same guarantee. Default: sequential publish.
    fn publish_batch(
        &self,
        messages: &[OutboundMessage],
    ) -> impl Future<Output = Vec<Result<(), TransportError>>> + Send {
        async move {
            let mut out = Vec::with_capacity(messages.len());
            for m in messages {
                out.push(self.publish(m).await);
            }
            out
        }
    }
}

impl<T: Transport> Transport for std::sync::Arc<T> {
    fn publish(
        &self,
        message: &OutboundMessage,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        (**self).publish(message)
    }

    fn publish_batch(
        &self,
        messages: &[OutboundMessage],
    ) -> impl Future<Output = Vec<Result<(), TransportError>>> + Send {
        (**self).publish_batch(messages)
    }
}

/// Where an inbox consumer gets its messages from (a JetStream pull
/// consumer, a Kafka consumer group, an [`InProcessSubscription`]).
pub trait MessageSource: Send {
    /// One received message, to be acknowledged or negatively acknowledged.
    type Delivery: MessageDelivery;

    /// Waits for the next message; `Ok(None)` means the source is closed.
    fn next(
        &mut self,
    ) -> impl Future<Output = Result<Option<Self::Delivery>, TransportError>> + Send;
}

/// One delivery of an [`InboundMessage`]; the broker redelivers it unless
/// it is acknowledged.
pub trait MessageDelivery: Send {
    /// The message.
    fn message(&self) -> &InboundMessage;

    /// Acknowledges the message: it is done and will not be redelivered.
    fn ack(self) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Asks for redelivery after `delay`.
    fn nack(self, delay: Duration) -> impl Future<Output = Result<(), TransportError>> + Send;
}

/// Everything that can go wrong publishing or receiving a message.
///
/// ```
/// use vextrus_core::transport::TransportError;
/// use vextrus_kernel::{ErrorKind, HasErrorKind};
///
/// assert_eq!(TransportError::Unavailable("down".into()).kind(), ErrorKind::Transient);
/// assert_eq!(TransportError::MessageTooLarge { size: 10, max: 5 }.kind(), ErrorKind::Validation);
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// No such topic/subject (or it is not declared on this transport).
    #[error("unknown destination {0:?}")]
    UnknownDestination(String),
    /// The message is larger than the broker accepts.
    #[error("message of {size} bytes is larger than the maximum of {max} bytes")]
    MessageTooLarge {
        /// The message's size in bytes.
        size: usize,
        /// The broker's maximum.
        max: usize,
    },
    /// The broker said no.
    #[error("broker rejected the message: {0}")]
    Rejected(String),
    /// The broker could not be reached; the same call may succeed later.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// No confirmation in time (the message may still have been stored).
    #[error("timed out waiting for the broker's confirmation")]
    Timeout,
    /// Headers were missing or malformed.
    #[error("invalid headers: {0}")]
    InvalidHeaders(String),
    /// Anything else.
    #[error("transport error: {0}")]
    Other(#[source] BoxError),
}

impl HasErrorKind for TransportError {
    fn kind(&self) -> ErrorKind {
        match self {
            TransportError::UnknownDestination(_) => ErrorKind::NotFound,
            TransportError::MessageTooLarge { .. } | TransportError::InvalidHeaders(_) => {
                ErrorKind::Validation
            }
            TransportError::Rejected(_) | TransportError::Other(_) => ErrorKind::Fatal,
            TransportError::Unavailable(_) | TransportError::Timeout => ErrorKind::Transient,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vextrus_kernel::CausationId;

    fn meta() -> EventMetadata {
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

    #[test]
    fn cloud_events_headers_are_complete_and_validate() {
        let m = meta();
        let out =
            OutboundMessage::cloud_events("d", "k", "order.placed", 2, "svc", b"{}".to_vec(), &m);
        let h = &out.headers;
        assert_eq!(h[headers::CE_TYPE], "order.placed");
        assert_eq!(h[headers::CE_SOURCE], "svc");
        assert_eq!(h[headers::SCHEMA_VERSION], "2");
        assert_eq!(
            h[headers::CAUSATION_ID],
            m.causation_id.unwrap().to_string()
        );
        assert_eq!(h[headers::TRACESTATE], "vendor=1");
        assert_eq!(h[headers::CONTENT_TYPE], headers::CONTENT_TYPE_JSON);
        let inbound = InboundMessage::from_outbound(&out, 1);
        inbound.validate_headers().unwrap();
        assert_eq!(inbound.trace_context(), m.trace_context);
    }

    #[test]
    fn malformed_headers_are_typed_errors() {
        let out = OutboundMessage::cloud_events("d", "k", "t", 1, "svc", vec![], &meta());
        let base = InboundMessage::from_outbound(&out, 1);
        type Mutation = Box<dyn Fn(&mut InboundMessage)>;
        let cases: Vec<Mutation> = vec![
            Box::new(|m| {
                m.headers.remove(headers::CE_ID);
            }),
            Box::new(|m| {
                m.headers
                    .insert(headers::CE_ID.into(), MessageId::new().to_string());
            }),
            Box::new(|m| {
                m.headers.insert(headers::CE_ID.into(), "x".into());
            }),
            Box::new(|m| {
                m.headers
                    .insert(headers::CE_SPECVERSION.into(), "0.3".into());
            }),
            Box::new(|m| {
                m.headers
                    .insert(headers::CE_TIME.into(), "yesterday".into());
            }),
            Box::new(|m| {
                m.headers
                    .insert(headers::CORRELATION_ID.into(), "nope".into());
            }),
            Box::new(|m| {
                m.headers.insert(headers::SCHEMA_VERSION.into(), "0".into());
            }),
            Box::new(|m| {
                m.headers
                    .insert(headers::TRACEPARENT.into(), "00-bad".into());
            }),
            Box::new(|m| {
                m.headers.remove(headers::TRACEPARENT);
            }),
            Box::new(|m| {
                m.headers.insert("bad name".into(), "v".into());
            }),
            Box::new(|m| {
                m.headers.insert("x".into(), "a\nb".into());
            }),
        ];
        for (i, f) in cases.iter().enumerate() {
            let mut m = base.clone();
            f(&mut m);
            let err = m.validate_headers().unwrap_err();
            assert!(
                matches!(err, TransportError::InvalidHeaders(_)),
                "case {i}: {err}"
            );
            assert_eq!(err.kind(), ErrorKind::Validation);
        }
    }

    #[test]
    fn error_kinds() {
        assert_eq!(TransportError::Timeout.kind(), ErrorKind::Transient);
        assert_eq!(
            TransportError::Rejected("x".into()).kind(),
            ErrorKind::Fatal
        );
        assert_eq!(
            TransportError::UnknownDestination("x".into()).kind(),
            ErrorKind::NotFound
        );
        assert_eq!(TransportError::Other("x".into()).kind(), ErrorKind::Fatal);
    }

    #[test]
    fn wire_size_counts_payload_and_headers() {
        let mut m = OutboundMessage::new("d", "k", vec![0u8; 10]);
        m.headers.insert("ab".into(), "cde".into());
        assert_eq!(m.wire_size(), 15);
    }
}
