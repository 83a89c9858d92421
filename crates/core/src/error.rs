//! The one error type of the event store and its engines.

use vextrus_kernel::{ErrorKind, EventId, HasErrorKind};

use crate::types::{ExpectedVersion, StreamId};

/// A boxed error from a backend driver or a projection handler.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`EventStoreError`] as the default error.
pub type Result<T, E = EventStoreError> = std::result::Result<T, E>;

/// Everything that can go wrong when appending, reading, snapshotting,
/// subscribing or projecting.
///
/// Every variant says its [`ErrorKind`] through [`HasErrorKind`], so an HTTP
/// layer can map [`EventStoreError::WrongExpectedVersion`] to 409 and a retry
/// layer retries only [`EventStoreError::Unavailable`].
///
/// ```
/// use vextrus_core::{EventStoreError, ExpectedVersion, StreamId};
/// use vextrus_kernel::{ErrorKind, HasErrorKind};
///
/// let err = EventStoreError::WrongExpectedVersion {
///     stream_id: StreamId::new("order-1").unwrap(),
///     expected: ExpectedVersion::Exact(3),
///     actual: Some(4),
/// };
/// assert_eq!(err.kind(), ErrorKind::Conflict);
/// assert_eq!(err.to_string(), "wrong expected version for stream order-1: expected exact version 3, actual 4");
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventStoreError {
    /// The stream's current version did not match the expected version.
    /// Nothing was written.
    #[error(
        "wrong expected version for stream {stream_id}: expected {expected}, actual {}",
        actual.map_or_else(|| "no stream".to_owned(), |v| v.to_string())
    )]
    WrongExpectedVersion {
        /// The stream appended to.
        stream_id: StreamId,
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The stream's version when the append was tried (`None`: no stream).
        actual: Option<u64>,
    },
    /// A stream id was empty, too long, or held whitespace or control characters.
    #[error("invalid stream id {stream_id:?}: {reason}")]
    InvalidStreamId {
        /// The text given (at most its first 256 characters).
        stream_id: String,
        /// What was wrong.
        reason: &'static str,
    },
    /// An event's payload (as JSON text) was larger than the configured maximum.
    #[error("event payload of {size} bytes is larger than the maximum of {max} bytes")]
    PayloadTooLarge {
        /// The payload's size in bytes.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// An event's metadata was malformed (unparseable, or inconsistent with the event).
    #[error("invalid event metadata: {0}")]
    InvalidMetadata(String),
    /// An event was malformed: empty or overlong type, schema version 0, or an
    /// empty batch.
    #[error("invalid event: {0}")]
    InvalidEvent(String),
    /// Some, but not all, of a batch's event ids are already stored at the
    /// positions the batch would take; or an event id is stored elsewhere.
    /// Nothing was written.
    #[error("event {event_id} of the batch for stream {stream_id} is already stored elsewhere")]
    PartialDuplicate {
        /// The stream appended to.
        stream_id: StreamId,
        /// The first offending event id.
        event_id: EventId,
    },
    /// A payload, snapshot or checkpoint could not be (de)serialized.
    #[error("serialization failed: {0}")]
    Serialization(#[from] serde_json::Error),
    /// An upcaster failed to turn a stored event into the current schema.
    #[error("upcasting {event_type} v{from_version} failed: {reason}")]
    Upcast {
        /// The stored event's type.
        event_type: String,
        /// The schema version the failing upcaster starts from.
        from_version: u32,
        /// What went wrong.
        reason: String,
    },
    /// A projection handler failed; its writes and the checkpoint were rolled back.
    #[error("projection {projection} failed on event at {position}: {source}")]
    Projection {
        /// The projection's name.
        projection: String,
        /// The global position of the event it failed on.
        position: crate::types::GlobalPosition,
        /// The handler's error.
        #[source]
        source: BoxError,
    },
    /// The database could not be reached or was busy; the same call may
    /// succeed later.
    #[error("event store unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// Any other backend failure (a bug, corrupt data, a broken schema).
    #[error("event store backend error: {0}")]
    Backend(#[source] BoxError),
}

impl EventStoreError {
    /// Wraps a backend error that no retry will mend.
    pub fn backend(err: impl Into<BoxError>) -> Self {
        Self::Backend(err.into())
    }

    /// Wraps a backend error that a retry may mend (connection refused, timeout, busy).
    pub fn unavailable(err: impl Into<BoxError>) -> Self {
        Self::Unavailable(err.into())
    }

    /// Whether this is a [`EventStoreError::WrongExpectedVersion`].
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            Self::WrongExpectedVersion { .. } | Self::PartialDuplicate { .. }
        )
    }
}

impl HasErrorKind for EventStoreError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::WrongExpectedVersion { .. } | Self::PartialDuplicate { .. } => {
                ErrorKind::Conflict
            }
            Self::InvalidStreamId { .. }
            | Self::PayloadTooLarge { .. }
            | Self::InvalidMetadata(_)
            | Self::InvalidEvent(_) => ErrorKind::Validation,
            Self::Unavailable(_) => ErrorKind::Transient,
            Self::Projection { source, .. } => {
                // A handler error that knows its kind keeps it; others are fatal.
                if let Some(e) = source.downcast_ref::<EventStoreError>() {
                    e.kind()
                } else {
                    ErrorKind::Fatal
                }
            }
            Self::Serialization(_) | Self::Upcast { .. } | Self::Backend(_) => ErrorKind::Fatal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_policy() {
        let sid = StreamId::new("order-1").unwrap();
        assert_eq!(
            EventStoreError::PartialDuplicate {
                stream_id: sid,
                event_id: EventId::new()
            }
            .kind(),
            ErrorKind::Conflict
        );
        assert_eq!(
            EventStoreError::PayloadTooLarge { size: 2, max: 1 }.kind(),
            ErrorKind::Validation
        );
        assert_eq!(
            EventStoreError::unavailable("down").kind(),
            ErrorKind::Transient
        );
        assert_eq!(EventStoreError::backend("bug").kind(), ErrorKind::Fatal);
        let wrapped = EventStoreError::Projection {
            projection: "p".into(),
            position: crate::types::GlobalPosition::START,
            source: Box::new(EventStoreError::unavailable("down")),
        };
        assert_eq!(wrapped.kind(), ErrorKind::Transient);
    }
}
