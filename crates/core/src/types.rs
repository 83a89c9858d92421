//! The values the event store deals in: stream ids, versions, global
//! positions, new and recorded events, read options, filters and snapshots.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use vextrus_kernel::{DomainEvent, EventId, EventMetadata};

use crate::error::{EventStoreError, Result};

/// The id of one event stream, `"{category}-{id}"`, such as `"order-42"`.
///
/// Validated on construction: non-empty, at most [`StreamId::MAX_LEN`] bytes,
/// no whitespace and no control characters. The *category* is the text before
/// the first `-` (the whole id when there is none).
///
/// ```
/// use vextrus_core::StreamId;
///
/// let id = StreamId::new("order-42").unwrap();
/// assert_eq!(id.category(), "order");
/// assert_eq!(id.as_str(), "order-42");
/// assert!(StreamId::new("").is_err());
/// assert!(StreamId::new("order 42").is_err());
/// assert!(StreamId::new("x".repeat(201)).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct StreamId(String);

impl StreamId {
    /// Longest allowed stream id, in bytes.
    pub const MAX_LEN: usize = 200;

    /// Validates and wraps a stream id.
    pub fn new(value: impl Into<String>) -> Result<Self> {
        let value = value.into();
        let bad = |reason| EventStoreError::InvalidStreamId {
            stream_id: value.chars().take(256).collect(),
            reason,
        };
        if value.is_empty() {
            return Err(bad("must not be empty"));
        }
        if value.len() > Self::MAX_LEN {
            return Err(bad("longer than 200 bytes"));
        }
        if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("contains whitespace or a control character"));
        }
        Ok(Self(value))
    }

    /// Builds `"{category}-{id}"`, validating the result.
    pub fn from_parts(category: &str, id: &str) -> Result<Self> {
        if category.is_empty() || category.contains('-') {
            return Err(EventStoreError::InvalidStreamId {
                stream_id: format!("{category}-{id}").chars().take(256).collect(),
                reason: "category must be non-empty and contain no '-'",
            });
        }
        Self::new(format!("{category}-{id}"))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The text before the first `-` (the whole id when there is none).
    pub fn category(&self) -> &str {
        self.0.split_once('-').map_or(self.0.as_str(), |(c, _)| c)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for StreamId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for StreamId {
    type Err = EventStoreError;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

impl TryFrom<String> for StreamId {
    type Error = EventStoreError;
    fn try_from(value: String) -> Result<Self> {
        Self::new(value)
    }
}

impl TryFrom<&str> for StreamId {
    type Error = EventStoreError;
    fn try_from(value: &str) -> Result<Self> {
        Self::new(value)
    }
}

impl<'de> Deserialize<'de> for StreamId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

/// What the caller expects a stream's version to be when appending
/// (optimistic concurrency). Versions are 1-based: a stream with `n` events
/// has version `n`.
///
/// ```
/// use vextrus_core::ExpectedVersion;
///
/// assert!(ExpectedVersion::Any.matches(None));
/// assert!(ExpectedVersion::NoStream.matches(None));
/// assert!(!ExpectedVersion::NoStream.matches(Some(1)));
/// assert!(ExpectedVersion::StreamExists.matches(Some(3)));
/// assert!(ExpectedVersion::Exact(3).matches(Some(3)));
/// assert!(ExpectedVersion::Exact(0).matches(None));
/// assert!(!ExpectedVersion::Exact(2).matches(Some(3)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpectedVersion {
    /// Append whatever the stream's version (no concurrency check).
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must exist (have at least one event).
    StreamExists,
    /// The stream's version must be exactly this (`Exact(0)` = no stream).
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream whose current version is `actual` (`None`: no stream)
    /// satisfies this expectation.
    pub fn matches(self, actual: Option<u64>) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual.is_none(),
            ExpectedVersion::StreamExists => actual.is_some(),
            ExpectedVersion::Exact(0) => actual.is_none(),
            ExpectedVersion::Exact(n) => actual == Some(n),
        }
    }

    /// The version a stream at `actual` would have to be at for an append at
    /// this expectation to land at `actual + 1`; `None` for `Any`/`StreamExists`.
    pub fn exact(self) -> Option<u64> {
        match self {
            ExpectedVersion::NoStream => Some(0),
            ExpectedVersion::Exact(n) => Some(n),
            ExpectedVersion::Any | ExpectedVersion::StreamExists => None,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any version"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::StreamExists => f.write_str("an existing stream"),
            ExpectedVersion::Exact(n) => write!(f, "exact version {n}"),
        }
    }
}

/// A position in the global log (all streams, in commit order): the
/// checkpoint subscriptions and projections store.
///
/// Ordered by `(commit, position)`. On PostgreSQL `commit` is the appending
/// transaction's id (`xid8`) and `position` the row's sequence number, because
/// a transaction can take a lower sequence number yet commit later; ordering
/// by the pair is what lets readers never skip such a row. On SQLite and in
/// memory commit order equals position order and `commit == position`.
/// Treat it as opaque: compare, store and pass it back.
///
/// ```
/// use vextrus_core::GlobalPosition;
///
/// let a = GlobalPosition::new(7, 3);
/// let b = GlobalPosition::new(8, 1);
/// assert!(GlobalPosition::START < a && a < b);
/// assert_eq!(a.to_string(), "7:3");
/// assert_eq!("7:3".parse::<GlobalPosition>().unwrap(), a);
/// ```
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct GlobalPosition {
    /// The commit order key (transaction id on PostgreSQL, the position elsewhere).
    pub commit: u64,
    /// The event's sequence number in the log.
    pub position: u64,
}

impl GlobalPosition {
    /// Before the first event: reading from here reads the whole log.
    pub const START: GlobalPosition = GlobalPosition {
        commit: 0,
        position: 0,
    };

    /// A position from its parts.
    pub const fn new(commit: u64, position: u64) -> Self {
        Self { commit, position }
    }
}

impl fmt::Display for GlobalPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.commit, self.position)
    }
}

impl FromStr for GlobalPosition {
    type Err = EventStoreError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || EventStoreError::InvalidEvent(format!("invalid global position {s:?}"));
        let (c, p) = s.split_once(':').ok_or_else(bad)?;
        Ok(Self {
            commit: c.parse().map_err(|_| bad())?,
            position: p.parse().map_err(|_| bad())?,
        })
    }
}

/// An event to append.
///
/// `event_id` must equal `metadata.event_id` (checked on append, so a
/// mismatch is an [`EventStoreError::InvalidMetadata`]); [`NewEvent::from_domain`]
/// and [`NewEvent::new`] keep them equal.
///
/// ```
/// use serde_json::json;
/// use vextrus_core::NewEvent;
/// use vextrus_kernel::EventMetadata;
///
/// let meta = EventMetadata::new();
/// let e = NewEvent::new("order.placed", json!({"total": "10.00"}), meta.clone());
/// assert_eq!(e.event_id, meta.event_id);
/// assert_eq!(e.schema_version, 1);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    /// The event's unique id; re-appending the same id at the same position is idempotent.
    pub event_id: EventId,
    /// The stable type name, such as `"sales.order_placed"`.
    pub event_type: String,
    /// The payload's schema version (1 or more).
    pub schema_version: u32,
    /// The payload.
    pub payload: serde_json::Value,
    /// The kernel's metadata (correlation, causation, trace context, tenant, actor, occurred-at).
    pub metadata: EventMetadata,
}

impl NewEvent {
    /// Longest allowed event type, in bytes.
    pub const MAX_EVENT_TYPE_LEN: usize = 200;

    /// A schema-version-1 event with the id taken from `metadata`. Metadata
    /// without a trace context gets the current span's (if any), so whoever
    /// reads the event later (a projection, a relay) continues this trace.
    pub fn new(
        event_type: impl Into<String>,
        payload: serde_json::Value,
        mut metadata: EventMetadata,
    ) -> Self {
        if metadata.trace_context.is_none() {
            vextrus_telemetry::inject_into_metadata(&mut metadata);
        }
        Self {
            event_id: metadata.event_id,
            event_type: event_type.into(),
            schema_version: 1,
            payload,
            metadata,
        }
    }

    /// Sets the schema version.
    pub fn with_schema_version(mut self, version: u32) -> Self {
        self.schema_version = version;
        self
    }

    /// Serializes a domain event, taking its type and schema version from the
    /// [`DomainEvent`] impl and its id from `metadata` (given the current
    /// span's trace context if it has none, as [`NewEvent::new`] does).
    pub fn from_domain<E: DomainEvent>(event: &E, mut metadata: EventMetadata) -> Result<Self> {
        if metadata.trace_context.is_none() {
            vextrus_telemetry::inject_into_metadata(&mut metadata);
        }
        Ok(Self {
            event_id: metadata.event_id,
            event_type: event.event_type().to_owned(),
            schema_version: event.schema_version(),
            payload: serde_json::to_value(event)?,
            metadata,
        })
    }

    /// Builds an event from untrusted parts: metadata as JSON (as a CLI or an
    /// HTTP API receives it). Malformed metadata gives
    /// [`EventStoreError::InvalidMetadata`].
    pub fn from_json_parts(
        event_type: impl Into<String>,
        schema_version: u32,
        payload: serde_json::Value,
        metadata: serde_json::Value,
    ) -> Result<Self> {
        let metadata: EventMetadata = serde_json::from_value(metadata)
            .map_err(|e| EventStoreError::InvalidMetadata(e.to_string()))?;
        let event = Self {
            event_id: metadata.event_id,
            event_type: event_type.into(),
            schema_version,
            payload,
            metadata,
        };
        event.validate(usize::MAX)?;
        Ok(event)
    }

    /// The payload's size as compact JSON text, in bytes.
    pub fn payload_size(&self) -> Result<usize> {
        struct Counter(usize);
        impl std::io::Write for Counter {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0 += buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut c = Counter(0);
        serde_json::to_writer(&mut c, &self.payload)?;
        Ok(c.0)
    }

    /// Checks what every backend checks before writing anything: the type is
    /// non-empty, at most [`NewEvent::MAX_EVENT_TYPE_LEN`] bytes and free of
    /// control characters and whitespace, the schema version is at least 1,
    /// `event_id == metadata.event_id`, and the payload is at most
    /// `max_payload` bytes of JSON.
    pub fn validate(&self, max_payload: usize) -> Result<()> {
        if self.event_type.is_empty()
            || self.event_type.len() > Self::MAX_EVENT_TYPE_LEN
            || self
                .event_type
                .chars()
                .any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(EventStoreError::InvalidEvent(format!(
                "event type {:?} must be 1..=200 bytes without whitespace or control characters",
                self.event_type.chars().take(64).collect::<String>()
            )));
        }
        if self.schema_version == 0 {
            return Err(EventStoreError::InvalidEvent(
                "schema version must be at least 1".into(),
            ));
        }
        if self.event_id != self.metadata.event_id {
            return Err(EventStoreError::InvalidMetadata(format!(
                "event id {} differs from metadata.event_id {}",
                self.event_id, self.metadata.event_id
            )));
        }
        let size = self.payload_size()?;
        if size > max_payload {
            return Err(EventStoreError::PayloadTooLarge {
                size,
                max: max_payload,
            });
        }
        Ok(())
    }
}

/// Validates a whole batch before any backend writes: non-empty, each event
/// valid, and no event id twice in the batch.
pub fn validate_batch(events: &[NewEvent], max_payload: usize) -> Result<()> {
    if events.is_empty() {
        return Err(EventStoreError::InvalidEvent(
            "an append needs at least one event".into(),
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(events.len());
    for e in events {
        e.validate(max_payload)?;
        if !seen.insert(e.event_id) {
            return Err(EventStoreError::InvalidEvent(format!(
                "event id {} appears twice in one batch",
                e.event_id
            )));
        }
    }
    Ok(())
}

/// An event as stored, read back from a stream or the global log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// The stream it belongs to.
    pub stream_id: StreamId,
    /// Its 1-based version within the stream.
    pub stream_version: u64,
    /// Its position in the global log.
    pub position: GlobalPosition,
    /// The stable type name.
    pub event_type: String,
    /// The payload's schema version (after upcasting, if read through an upcaster).
    pub schema_version: u32,
    /// The payload.
    pub payload: serde_json::Value,
    /// The metadata appended with it.
    pub metadata: EventMetadata,
    /// When the store recorded it, by the database's clock.
    pub recorded_at: DateTime<Utc>,
}

impl RecordedEvent {
    /// The event's id (from its metadata).
    pub fn event_id(&self) -> EventId {
        self.metadata.event_id
    }

    /// Deserializes the payload into a domain event.
    pub fn decode<E: DomainEvent>(&self) -> Result<E> {
        Ok(serde_json::from_value(self.payload.clone())?)
    }
}

/// What a successful append wrote (or, for an idempotent re-append, what the
/// original append wrote).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AppendResult {
    /// The stream version of the batch's first event.
    pub first_version: u64,
    /// The stream version of the batch's last event: the stream's version
    /// after the append, and the expected version for the next one.
    pub last_version: u64,
    /// The global position of the batch's first event.
    pub first_position: GlobalPosition,
    /// The global position of the batch's last event.
    pub last_position: GlobalPosition,
}

/// Which way to read a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReadDirection {
    /// Oldest first.
    Forwards,
    /// Newest first.
    Backwards,
}

/// How to read one stream: direction, starting version (inclusive), limit.
///
/// ```
/// use vextrus_core::{ReadDirection, ReadStreamOptions};
///
/// let o = ReadStreamOptions::backwards().from_version(10).limit(5);
/// assert_eq!(o.direction, ReadDirection::Backwards);
/// // Backwards from 10, five events: versions 10, 9, 8, 7, 6.
/// assert!(o.includes(10) && o.includes(6) && !o.includes(11));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReadStreamOptions {
    /// Oldest or newest first.
    pub direction: ReadDirection,
    /// The first version to read (inclusive). `None`: the stream's start when
    /// reading forwards, its end when reading backwards.
    pub from_version: Option<u64>,
    /// Read at most this many events (`None`: all).
    pub limit: Option<u64>,
}

impl ReadStreamOptions {
    /// The whole stream, oldest first.
    pub fn forwards() -> Self {
        Self {
            direction: ReadDirection::Forwards,
            from_version: None,
            limit: None,
        }
    }

    /// The whole stream, newest first.
    pub fn backwards() -> Self {
        Self {
            direction: ReadDirection::Backwards,
            from_version: None,
            limit: None,
        }
    }

    /// Starts at this version (inclusive).
    pub fn from_version(mut self, version: u64) -> Self {
        self.from_version = Some(version);
        self
    }

    /// Reads at most `limit` events.
    pub fn limit(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Whether a version is on the near side of the start (ignores the limit).
    pub fn includes(&self, version: u64) -> bool {
        match (self.direction, self.from_version) {
            (_, None) => true,
            (ReadDirection::Forwards, Some(from)) => version >= from,
            (ReadDirection::Backwards, Some(from)) => version <= from,
        }
    }
}

impl Default for ReadStreamOptions {
    fn default() -> Self {
        Self::forwards()
    }
}

/// Which streams a global-log read includes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamFilter {
    /// Every stream.
    #[default]
    All,
    /// Streams of exactly this category (the text before the first `-`).
    Category(String),
    /// Streams whose id starts with this prefix.
    Prefix(String),
}

/// A filter on the global log: by stream category or prefix, and by event type.
///
/// ```
/// use vextrus_core::{EventFilter, StreamId};
///
/// let f = EventFilter::category("order").with_event_types(["order.placed"]);
/// let order = StreamId::new("order-1").unwrap();
/// let orders = StreamId::new("orders-1").unwrap();
/// assert!(f.matches(&order, "order.placed"));
/// assert!(!f.matches(&order, "order.cancelled"));
/// assert!(!f.matches(&orders, "order.placed"));
/// assert!(EventFilter::prefix("order").matches(&orders, "x"));
/// assert!(EventFilter::all().matches(&orders, "x"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct EventFilter {
    /// Which streams.
    pub streams: StreamFilter,
    /// Which event types (empty: all).
    pub event_types: Vec<String>,
}

impl EventFilter {
    /// Everything.
    pub fn all() -> Self {
        Self::default()
    }

    /// Streams of one category.
    pub fn category(category: impl Into<String>) -> Self {
        Self {
            streams: StreamFilter::Category(category.into()),
            event_types: Vec::new(),
        }
    }

    /// Streams whose id starts with `prefix`.
    pub fn prefix(prefix: impl Into<String>) -> Self {
        Self {
            streams: StreamFilter::Prefix(prefix.into()),
            event_types: Vec::new(),
        }
    }

    /// Only these event types.
    pub fn with_event_types<I, S>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.event_types = types.into_iter().map(Into::into).collect();
        self
    }

    /// Whether an event of `event_type` in `stream_id` passes the filter.
    pub fn matches(&self, stream_id: &StreamId, event_type: &str) -> bool {
        let stream_ok = match &self.streams {
            StreamFilter::All => true,
            StreamFilter::Category(c) => stream_id.category() == c,
            StreamFilter::Prefix(p) => stream_id.as_str().starts_with(p.as_str()),
        };
        stream_ok
            && (self.event_types.is_empty() || self.event_types.iter().any(|t| t == event_type))
    }

    /// Whether the filter lets everything through.
    pub fn is_all(&self) -> bool {
        self.streams == StreamFilter::All && self.event_types.is_empty()
    }
}

/// One page of the global log.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GlobalPage {
    /// The events, in `(commit, position)` order, all after the requested position.
    pub events: Vec<RecordedEvent>,
    /// How far the read examined the log: a later read from here skips
    /// nothing that the filter lets through. At least the last event's
    /// position; may be further (when a filter dropped events past it), and
    /// never beyond a row that could still commit.
    pub scanned_to: GlobalPosition,
}

/// A stored snapshot of an aggregate's state at one stream version.
///
/// `snapshot_version` is the version of the *state's* schema; a repository
/// ignores a snapshot whose version differs from the one it expects, and
/// replays from events instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The stream the snapshot summarizes.
    pub stream_id: StreamId,
    /// The stream version the state includes (all events up to and including it).
    pub stream_version: u64,
    /// The schema version of `state`.
    pub snapshot_version: u32,
    /// The serialized state.
    pub state: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stream_id_rejects_bad_input() {
        for bad in ["", " a", "a\tb", "a\u{0}b", "a\nb"] {
            assert!(matches!(
                StreamId::new(bad),
                Err(EventStoreError::InvalidStreamId { .. })
            ));
        }
        assert!(StreamId::new("x".repeat(200)).is_ok());
        assert_eq!(StreamId::new("plain").unwrap().category(), "plain");
        assert_eq!(StreamId::new("a-b-c").unwrap().category(), "a");
        assert!(StreamId::from_parts("a-b", "c").is_err());
        assert_eq!(
            StreamId::from_parts("order", "1").unwrap().as_str(),
            "order-1"
        );
        assert!(serde_json::from_str::<StreamId>("\"a b\"").is_err());
    }

    #[test]
    fn validate_catches_each_problem() {
        let ok = NewEvent::new("t", json!({"a": 1}), EventMetadata::new());
        assert!(ok.validate(100).is_ok());
        assert!(matches!(
            ok.validate(3),
            Err(EventStoreError::PayloadTooLarge { size: 7, max: 3 })
        ));
        let mut e = ok.clone();
        e.event_type = String::new();
        assert!(matches!(
            e.validate(100),
            Err(EventStoreError::InvalidEvent(_))
        ));
        let mut e = ok.clone();
        e.schema_version = 0;
        assert!(matches!(
            e.validate(100),
            Err(EventStoreError::InvalidEvent(_))
        ));
        let mut e = ok.clone();
        e.event_id = EventId::new();
        assert!(matches!(
            e.validate(100),
            Err(EventStoreError::InvalidMetadata(_))
        ));
        assert!(validate_batch(&[], 10).is_err());
        assert!(validate_batch(&[ok.clone(), ok], 100).is_err());
    }

    #[test]
    fn from_json_parts_types_malformed_metadata() {
        let r = NewEvent::from_json_parts("t", 1, json!({}), json!({"event_id": "nope"}));
        assert!(matches!(r, Err(EventStoreError::InvalidMetadata(_))));
        let meta = serde_json::to_value(EventMetadata::new()).unwrap();
        assert!(NewEvent::from_json_parts("t", 2, json!({}), meta).is_ok());
    }

    #[test]
    fn global_position_orders_by_commit_first() {
        let mut v = vec![
            GlobalPosition::new(2, 1),
            GlobalPosition::new(1, 9),
            GlobalPosition::START,
        ];
        v.sort();
        assert_eq!(
            v,
            vec![
                GlobalPosition::START,
                GlobalPosition::new(1, 9),
                GlobalPosition::new(2, 1)
            ]
        );
        assert!("1".parse::<GlobalPosition>().is_err());
    }
}
