//! The one error type of this crate.

use std::time::Duration;

use vextrus_core::transport::TransportError;
use vextrus_kernel::{ErrorKind, HasErrorKind};

/// A boxed cause kept as the [`std::error::Error::source`] of a [`NatsError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Shorthand for results whose error is [`NatsError`].
pub type Result<T, E = NatsError> = std::result::Result<T, E>;

/// Everything that can go wrong talking to NATS JetStream.
///
/// Each variant says its [`ErrorKind`]: a server that cannot be reached, a
/// timed-out publish or a dropped connection is [`ErrorKind::Transient`] (the
/// relay retries it with backoff); a subject no stream covers, an oversized
/// message or malformed headers is [`ErrorKind::Validation`] (retrying the
/// same message fails the same way, so it ends as a dead letter).
///
/// ```
/// use vextrus_kernel::{ErrorKind, HasErrorKind};
/// use vextrus_nats::NatsError;
///
/// let err = NatsError::MessageTooLarge { size: 2_000_000, max: 1_048_576 };
/// assert_eq!(err.kind(), ErrorKind::Validation);
/// assert!(NatsError::Timeout(std::time::Duration::from_secs(5)).kind().is_retryable());
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// The server could not be reached (connect failed, connection lost, not
    /// yet reconnected, or the ack channel broke).
    #[error("NATS unavailable: {reason}")]
    Unavailable {
        /// What failed.
        reason: String,
        /// The client's own error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// The server did not confirm in time. The message may or may not be
    /// stored; publishing it again with the same id is safe (the duplicate
    /// window, then the consumer's inbox, absorbs the copy).
    #[error("NATS did not answer within {0:?}")]
    Timeout(Duration),
    /// No JetStream stream stores the subject (the server answered "no
    /// responders", or no configured stream's subjects match it).
    #[error("no JetStream stream stores subject `{0}`")]
    UnknownDestination(String),
    /// Payload plus headers exceed the server's `max_payload` (or the
    /// stream's `max_msg_size`).
    #[error("message of {size} bytes exceeds the maximum of {max} bytes")]
    MessageTooLarge {
        /// Size of the message (payload plus encoded headers) in bytes.
        size: usize,
        /// The limit it broke.
        max: usize,
    },
    /// The server answered the publish with an error (a stream limit, a
    /// sealed stream, an expectation that failed).
    #[error("JetStream rejected the message: {0}")]
    Rejected(String),
    /// A header name or value cannot travel as a NATS header (control
    /// characters, `:` in a name, an empty name), or a received message's
    /// headers are malformed (missing or unparsable id).
    #[error("invalid headers: {0}")]
    InvalidHeaders(String),
    /// A destination is not a valid NATS subject.
    #[error("invalid subject `{subject}`: {reason}")]
    InvalidSubject {
        /// The subject as given.
        subject: String,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// A configuration value is unusable (checked before any network call).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// Creating, reading or checking a stream failed, or the server's stream
    /// does not match the configuration.
    #[error("stream `{stream}`: {reason}")]
    Stream {
        /// The stream's name.
        stream: String,
        /// What went wrong.
        reason: String,
        /// The client's error, when there is one.
        #[source]
        source: Option<BoxError>,
        /// Whether retrying later may help (the server was unreachable).
        transient: bool,
    },
    /// Creating or reading a consumer, or pulling messages from it, failed.
    #[error("consumer `{consumer}`: {reason}")]
    Consumer {
        /// The durable consumer's name.
        consumer: String,
        /// What went wrong.
        reason: String,
        /// The client's error.
        #[source]
        source: Option<BoxError>,
    },
    /// A received message could not be turned into an inbound message. It
    /// was dead-lettered (when a dead-letter subject is configured) and
    /// terminated, so the server does not redeliver it.
    #[error("malformed message at stream sequence {stream_sequence} on `{subject}`: {reason}")]
    MalformedMessage {
        /// The message's subject.
        subject: String,
        /// The message's stream sequence (0 when unknown).
        stream_sequence: u64,
        /// What was wrong with it.
        reason: String,
    },
    /// Acknowledging (ack, nak, term) a delivery failed; the server will
    /// redeliver it after its ack wait.
    #[error("acknowledgement failed: {0}")]
    Ack(String),
}

impl NatsError {
    pub(crate) fn unavailable(reason: impl Into<String>, source: impl Into<BoxError>) -> Self {
        NatsError::Unavailable {
            reason: reason.into(),
            source: Some(source.into()),
        }
    }
}

/// Every error in the contract's terms, keeping its kind: transient
/// failures stay transient (`Unavailable`, `Timeout`), bad input stays bad
/// input (`UnknownDestination` — an invalid subject too —,
/// `MessageTooLarge`, `InvalidHeaders` — a malformed received message too).
impl From<NatsError> for TransportError {
    fn from(err: NatsError) -> Self {
        match err {
            NatsError::Timeout(_) => TransportError::Timeout,
            NatsError::UnknownDestination(subject) => TransportError::UnknownDestination(subject),
            NatsError::InvalidSubject { subject, .. } => {
                TransportError::UnknownDestination(subject)
            }
            NatsError::MessageTooLarge { size, max } => {
                TransportError::MessageTooLarge { size, max }
            }
            NatsError::Rejected(reason) => TransportError::Rejected(reason),
            NatsError::InvalidHeaders(reason) => TransportError::InvalidHeaders(reason),
            err @ NatsError::MalformedMessage { .. } => {
                TransportError::InvalidHeaders(err.to_string())
            }
            err @ (NatsError::Unavailable { .. }
            | NatsError::Ack(_)
            | NatsError::Consumer { .. }
            | NatsError::Stream {
                transient: true, ..
            }) => TransportError::Unavailable(error_chain(&err)),
            err @ (NatsError::Stream { .. } | NatsError::InvalidConfig(_)) => {
                TransportError::Other(Box::new(err))
            }
        }
    }
}

/// The error's message followed by its sources' messages.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl HasErrorKind for NatsError {
    fn kind(&self) -> ErrorKind {
        match self {
            NatsError::Unavailable { .. } | NatsError::Timeout(_) | NatsError::Ack(_) => {
                ErrorKind::Transient
            }
            NatsError::Consumer { .. } => ErrorKind::Transient,
            NatsError::Stream { transient, .. } => {
                if *transient {
                    ErrorKind::Transient
                } else {
                    ErrorKind::Fatal
                }
            }
            NatsError::UnknownDestination(_) => ErrorKind::NotFound,
            NatsError::MessageTooLarge { .. }
            | NatsError::InvalidHeaders(_)
            | NatsError::InvalidSubject { .. }
            | NatsError::MalformedMessage { .. }
            | NatsError::InvalidConfig(_) => ErrorKind::Validation,
            NatsError::Rejected(_) => ErrorKind::Fatal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_errors_are_retryable_and_input_errors_are_not() {
        let transient = [
            NatsError::Unavailable {
                reason: "down".into(),
                source: None,
            },
            NatsError::Timeout(Duration::from_millis(10)),
            NatsError::Ack("closed".into()),
            NatsError::Stream {
                stream: "S".into(),
                reason: "unreachable".into(),
                source: None,
                transient: true,
            },
        ];
        for err in transient {
            assert!(err.kind().is_retryable(), "{err}");
        }
        let permanent = [
            NatsError::UnknownDestination("x".into()),
            NatsError::MessageTooLarge { size: 2, max: 1 },
            NatsError::InvalidHeaders("bad".into()),
            NatsError::Rejected("sealed".into()),
            NatsError::MalformedMessage {
                subject: "x".into(),
                stream_sequence: 1,
                reason: "no id".into(),
            },
        ];
        for err in permanent {
            assert!(!err.kind().is_retryable(), "{err}");
        }
    }

    #[test]
    fn conversion_to_the_contract_keeps_the_kind() {
        let cases = [
            NatsError::Unavailable {
                reason: "down".into(),
                source: Some("refused".into()),
            },
            NatsError::Timeout(Duration::from_secs(1)),
            NatsError::UnknownDestination("x".into()),
            NatsError::MessageTooLarge { size: 2, max: 1 },
            NatsError::InvalidHeaders("bad".into()),
            NatsError::Rejected("no".into()),
            NatsError::MalformedMessage {
                subject: "s".into(),
                stream_sequence: 3,
                reason: "no id".into(),
            },
            NatsError::Ack("lost".into()),
        ];
        for err in cases {
            let kind = err.kind();
            let converted = TransportError::from(err);
            let expected = if kind == ErrorKind::NotFound {
                ErrorKind::NotFound
            } else {
                kind
            };
            assert_eq!(converted.kind(), expected, "{converted}");
        }
        let unavailable = TransportError::from(NatsError::Unavailable {
            reason: "cannot connect".into(),
            source: Some("connection refused".into()),
        });
        assert!(
            unavailable.to_string().contains("connection refused"),
            "{unavailable}"
        );
        assert!(matches!(
            TransportError::from(NatsError::InvalidSubject {
                subject: "a..b".into(),
                reason: "empty token"
            }),
            TransportError::UnknownDestination(s) if s == "a..b"
        ));
    }

    #[test]
    fn unknown_destination_is_not_found() {
        assert_eq!(
            NatsError::UnknownDestination("orders.x".into()).kind(),
            ErrorKind::NotFound
        );
    }
}
