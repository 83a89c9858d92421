//! The one error type of the outbox, the inbox and the unit of work.

use vextrus_kernel::{ErrorKind, HasErrorKind};

use crate::error::{BoxError, EventStoreError};
use crate::transport::{MessageId, TransportError};

/// Everything that can go wrong enqueuing, claiming, relaying, consuming or
/// committing a unit of work.
///
/// ```
/// use vextrus_core::outbox::OutboxError;
/// use vextrus_core::transport::MessageId;
/// use vextrus_kernel::{ErrorKind, HasErrorKind};
///
/// let id = MessageId::new();
/// assert_eq!(OutboxError::NotFound(id).kind(), ErrorKind::NotFound);
/// assert_eq!(OutboxError::DuplicateMessage(id).kind(), ErrorKind::Conflict);
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// The event store refused or failed an append of the unit of work.
    #[error(transparent)]
    EventStore(#[from] EventStoreError),
    /// A transport failed (as seen by the inbox consumer's source).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A message was malformed (empty destination or key, `ce_id` not its id).
    #[error("invalid outbox message: {0}")]
    InvalidMessage(String),
    /// A message id is already stored (outbox), or already recorded by the
    /// same consumer in a concurrent transaction (inbox). Nothing was written.
    #[error("message {0} is already stored")]
    DuplicateMessage(MessageId),
    /// No message with this id.
    #[error("message {0} not found")]
    NotFound(MessageId),
    /// The message is not a dead letter (replay and discard need one).
    #[error("message {0} is not a dead letter")]
    NotDead(MessageId),
    /// An inbox handler failed; its writes were rolled back.
    #[error("handler of consumer {consumer} failed on message {message}: {source}")]
    Handler {
        /// The consumer's name.
        consumer: String,
        /// The message it failed on.
        message: MessageId,
        /// The handler's error.
        #[source]
        source: BoxError,
    },
    /// The database could not be reached or was busy; retry later.
    #[error("outbox store unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// Any other backend failure.
    #[error("outbox backend error: {0}")]
    Backend(#[source] BoxError),
}

impl HasErrorKind for OutboxError {
    fn kind(&self) -> ErrorKind {
        match self {
            OutboxError::EventStore(e) => e.kind(),
            OutboxError::Transport(e) => e.kind(),
            OutboxError::InvalidMessage(_) => ErrorKind::Validation,
            OutboxError::DuplicateMessage(_) | OutboxError::NotDead(_) => ErrorKind::Conflict,
            OutboxError::NotFound(_) => ErrorKind::NotFound,
            OutboxError::Handler { .. } | OutboxError::Backend(_) => ErrorKind::Fatal,
            OutboxError::Unavailable(_) => ErrorKind::Transient,
        }
    }
}
