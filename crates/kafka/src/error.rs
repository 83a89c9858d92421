//! The one error type of this crate, and how librdkafka's error codes map
//! onto it.

use std::time::Duration;

use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use vextrus_core::transport::TransportError;
use vextrus_kernel::{ErrorKind, HasErrorKind};

/// A boxed cause kept as the [`std::error::Error::source`] of a [`KafkaError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Shorthand for results whose error is [`KafkaError`].
pub type Result<T, E = KafkaError> = std::result::Result<T, E>;

/// Everything that can go wrong talking to a Kafka cluster.
///
/// Each variant says its [`ErrorKind`]: a broker that cannot be reached, a
/// delivery that timed out, a leader election or a failed offset commit is
/// [`ErrorKind::Transient`] (the relay retries it with backoff); a topic that
/// does not exist is [`ErrorKind::NotFound`]; an oversized message, an
/// invalid topic name or malformed headers is [`ErrorKind::Validation`]
/// (retrying the same message fails the same way, so it ends as a dead
/// letter); any other refusal by the broker is [`ErrorKind::Fatal`].
///
/// ```
/// use vextrus_kafka::KafkaError;
/// use vextrus_kernel::{ErrorKind, HasErrorKind};
///
/// let err = KafkaError::MessageTooLarge { size: 2_000_000, max: 1_000_000 };
/// assert_eq!(err.kind(), ErrorKind::Validation);
/// assert!(KafkaError::Timeout(std::time::Duration::from_secs(5)).kind().is_retryable());
/// assert_eq!(KafkaError::UnknownDestination("orders".into()).kind(), ErrorKind::NotFound);
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaError {
    /// No broker could be reached, the connection broke, or the partition
    /// has no leader right now.
    #[error("Kafka unavailable: {reason}")]
    Unavailable {
        /// What failed.
        reason: String,
        /// librdkafka's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// The broker did not confirm in time. The message may or may not be
    /// stored; publishing it again with the same id is safe (the consumer's
    /// inbox absorbs the copy).
    #[error("Kafka did not confirm within {0:?}")]
    Timeout(Duration),
    /// The topic does not exist (topics are never auto-created by this
    /// crate's producer).
    #[error("topic `{0}` does not exist")]
    UnknownDestination(String),
    /// The destination is not a legal Kafka topic name.
    #[error("invalid topic name `{topic}`: {reason}")]
    InvalidTopic {
        /// The topic as given.
        topic: String,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// Key, payload and headers exceed the producer's (or the broker's)
    /// maximum message size.
    #[error("message of {size} bytes exceeds the maximum of {max} bytes")]
    MessageTooLarge {
        /// Size of the message (key, payload and headers) in bytes.
        size: usize,
        /// The limit it broke (0 when only the broker knows it).
        max: usize,
    },
    /// The broker refused the message for a reason no retry mends
    /// (authorization, policy, a corrupt record).
    #[error("Kafka rejected the message: {reason}")]
    Rejected {
        /// What the broker said.
        reason: String,
        /// librdkafka's error.
        #[source]
        source: Option<BoxError>,
    },
    /// A header of an outgoing message cannot travel (an empty name, a
    /// `ce_id` that disagrees with the message id), or a received message's
    /// headers are malformed (no `ce_id`, an id that is not a UUID, a value
    /// that is not UTF-8).
    #[error("invalid headers: {0}")]
    InvalidHeaders(String),
    /// A configuration value is unusable (checked before any network call).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A received message could not be turned into a delivery. It was copied
    /// to the dead-letter topic (when one is configured) and its offset was
    /// released, so it is never handed to a handler and never silently lost.
    #[error("malformed message at {topic}[{partition}]@{offset}: {reason}")]
    MalformedMessage {
        /// The topic it arrived on.
        topic: String,
        /// Its partition.
        partition: i32,
        /// Its offset.
        offset: i64,
        /// What was wrong with it.
        reason: String,
    },
    /// Receiving from the consumer group failed (a rebalance, a lost
    /// coordinator, a broker that went away).
    #[error("consumer: {reason}")]
    Consumer {
        /// What failed.
        reason: String,
        /// librdkafka's error.
        #[source]
        source: Option<BoxError>,
    },
    /// Committing an offset (an ack) or seeking back (a nack) failed; the
    /// message will be delivered again after a restart or rebalance.
    #[error("offset commit failed: {reason}")]
    Commit {
        /// What failed.
        reason: String,
        /// librdkafka's error.
        #[source]
        source: Option<BoxError>,
    },
}

impl HasErrorKind for KafkaError {
    fn kind(&self) -> ErrorKind {
        match self {
            KafkaError::Unavailable { .. }
            | KafkaError::Timeout(_)
            | KafkaError::Consumer { .. }
            | KafkaError::Commit { .. } => ErrorKind::Transient,
            KafkaError::UnknownDestination(_) => ErrorKind::NotFound,
            KafkaError::InvalidTopic { .. }
            | KafkaError::MessageTooLarge { .. }
            | KafkaError::InvalidHeaders(_)
            | KafkaError::InvalidConfig(_)
            | KafkaError::MalformedMessage { .. } => ErrorKind::Validation,
            KafkaError::Rejected { .. } => ErrorKind::Fatal,
        }
    }
}

/// The transport contract's view of a Kafka error: the same kind, with the
/// detail in the message (and the cause kept for [`TransportError::Other`]).
/// An invalid topic name is an unknown destination; consumer and commit
/// failures are [`TransportError::Unavailable`]; a malformed received record
/// is [`TransportError::InvalidHeaders`].
impl From<KafkaError> for TransportError {
    fn from(err: KafkaError) -> Self {
        match err {
            KafkaError::Timeout(_) => TransportError::Timeout,
            KafkaError::UnknownDestination(topic) => TransportError::UnknownDestination(topic),
            KafkaError::InvalidTopic { topic, reason } => {
                TransportError::UnknownDestination(format!("{topic} ({reason})"))
            }
            KafkaError::MessageTooLarge { size, max } => {
                TransportError::MessageTooLarge { size, max }
            }
            KafkaError::InvalidHeaders(detail) => TransportError::InvalidHeaders(detail),
            err @ KafkaError::MalformedMessage { .. } => {
                TransportError::InvalidHeaders(err.to_string())
            }
            err @ KafkaError::Rejected { .. } => TransportError::Rejected(err.to_string()),
            err @ (KafkaError::Unavailable { .. }
            | KafkaError::Consumer { .. }
            | KafkaError::Commit { .. }) => TransportError::Unavailable(err.to_string()),
            err @ KafkaError::InvalidConfig(_) => TransportError::Other(Box::new(err)),
        }
    }
}

/// How one librdkafka error code is classified when a publish fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    Timeout,
    Unavailable,
    UnknownTopic,
    TooLarge,
    Rejected,
}

/// The class of a librdkafka error code. Codes not listed are refusals
/// (`Rejected`): the safe default is a dead letter an operator can replay,
/// not an endless retry.
pub(crate) fn classify(code: RDKafkaErrorCode) -> Class {
    use RDKafkaErrorCode as C;
    match code {
        C::MessageTimedOut | C::RequestTimedOut | C::OperationTimedOut | C::TimedOutQueue => {
            Class::Timeout
        }
        C::AllBrokersDown
        | C::BrokerTransportFailure
        | C::BrokerDestroy
        | C::DestroyBroker
        | C::Resolve
        | C::NetworkException
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::BrokerNotAvailable
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::QueueFull
        | C::KafkaStorageError
        | C::NotCoordinator
        | C::CoordinatorNotAvailable
        | C::CoordinatorLoadInProgress
        | C::FencedLeaderEpoch
        | C::OutOfOrderSequenceNumber
        | C::Fail => Class::Unavailable,
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition => Class::UnknownTopic,
        C::MessageSizeTooLarge | C::InvalidMessageSize => Class::TooLarge,
        _ => Class::Rejected,
    }
}

impl KafkaError {
    /// Maps a failed publish of `size` bytes to `topic` onto a typed error.
    pub(crate) fn from_publish(
        err: RdKafkaError,
        topic: &str,
        size: usize,
        max: usize,
        timeout: Duration,
    ) -> Self {
        let Some(code) = err.rdkafka_error_code() else {
            return KafkaError::Rejected {
                reason: err.to_string(),
                source: Some(Box::new(err)),
            };
        };
        match classify(code) {
            Class::Timeout => KafkaError::Timeout(timeout),
            Class::Unavailable => KafkaError::Unavailable {
                reason: format!("publish to `{topic}` failed: {err}"),
                source: Some(Box::new(err)),
            },
            Class::UnknownTopic => KafkaError::UnknownDestination(topic.to_owned()),
            Class::TooLarge => KafkaError::MessageTooLarge { size, max },
            Class::Rejected => KafkaError::Rejected {
                reason: format!("publish to `{topic}` refused: {err}"),
                source: Some(Box::new(err)),
            },
        }
    }

    /// Wraps a consumer-side error (receive, seek).
    pub(crate) fn consumer(reason: impl Into<String>, err: RdKafkaError) -> Self {
        KafkaError::Consumer {
            reason: format!("{}: {err}", reason.into()),
            source: Some(Box::new(err)),
        }
    }

    /// Wraps a failed offset commit.
    pub(crate) fn commit(reason: impl Into<String>, err: RdKafkaError) -> Self {
        KafkaError::Commit {
            reason: format!("{}: {err}", reason.into()),
            source: Some(Box::new(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_errors_are_retryable_and_input_errors_are_not() {
        let transient = [
            KafkaError::Unavailable {
                reason: "down".into(),
                source: None,
            },
            KafkaError::Timeout(Duration::from_millis(10)),
            KafkaError::Consumer {
                reason: "rebalance".into(),
                source: None,
            },
            KafkaError::Commit {
                reason: "coordinator moved".into(),
                source: None,
            },
        ];
        for err in transient {
            assert!(err.kind().is_retryable(), "{err}");
        }
        let permanent = [
            KafkaError::UnknownDestination("x".into()),
            KafkaError::InvalidTopic {
                topic: "a b".into(),
                reason: "space",
            },
            KafkaError::MessageTooLarge { size: 2, max: 1 },
            KafkaError::InvalidHeaders("bad".into()),
            KafkaError::InvalidConfig("bad".into()),
            KafkaError::Rejected {
                reason: "policy".into(),
                source: None,
            },
            KafkaError::MalformedMessage {
                topic: "t".into(),
                partition: 0,
                offset: 1,
                reason: "no ce_id".into(),
            },
        ];
        for err in permanent {
            assert!(!err.kind().is_retryable(), "{err}");
        }
    }

    #[test]
    fn librdkafka_codes_map_to_typed_errors() {
        let timeout = Duration::from_secs(3);
        let map = |code| {
            KafkaError::from_publish(RdKafkaError::MessageProduction(code), "t", 9, 5, timeout)
        };
        assert!(matches!(
            map(RDKafkaErrorCode::MessageTimedOut),
            KafkaError::Timeout(d) if d == timeout
        ));
        assert!(matches!(
            map(RDKafkaErrorCode::AllBrokersDown),
            KafkaError::Unavailable { .. }
        ));
        assert!(matches!(
            map(RDKafkaErrorCode::NotLeaderForPartition),
            KafkaError::Unavailable { .. }
        ));
        assert!(matches!(
            map(RDKafkaErrorCode::UnknownTopicOrPartition),
            KafkaError::UnknownDestination(t) if t == "t"
        ));
        assert!(matches!(
            map(RDKafkaErrorCode::MessageSizeTooLarge),
            KafkaError::MessageTooLarge { size: 9, max: 5 }
        ));
        let rejected = map(RDKafkaErrorCode::TopicAuthorizationFailed);
        assert!(matches!(rejected, KafkaError::Rejected { .. }));
        assert_eq!(rejected.kind(), ErrorKind::Fatal);
        assert!(std::error::Error::source(&rejected).is_some());
    }

    #[test]
    fn transport_errors_keep_the_kind() {
        let errors = [
            KafkaError::Unavailable {
                reason: "down".into(),
                source: None,
            },
            KafkaError::Timeout(Duration::from_secs(1)),
            KafkaError::UnknownDestination("t".into()),
            KafkaError::MessageTooLarge { size: 2, max: 1 },
            KafkaError::InvalidHeaders("x".into()),
            KafkaError::Rejected {
                reason: "policy".into(),
                source: None,
            },
            KafkaError::Commit {
                reason: "moved".into(),
                source: None,
            },
            KafkaError::MalformedMessage {
                topic: "t".into(),
                partition: 0,
                offset: 0,
                reason: "no ce_id".into(),
            },
        ];
        for err in errors {
            let kind = err.kind();
            let text = err.to_string();
            let mapped = TransportError::from(err);
            assert_eq!(mapped.kind(), kind, "{text}");
        }
        assert!(matches!(
            TransportError::from(KafkaError::InvalidTopic {
                topic: "a b".into(),
                reason: "space"
            }),
            TransportError::UnknownDestination(_)
        ));
        assert!(matches!(
            TransportError::from(KafkaError::MessageTooLarge { size: 9, max: 5 }),
            TransportError::MessageTooLarge { size: 9, max: 5 }
        ));
    }
}
