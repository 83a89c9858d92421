//! The saga engine's error type.

use uuid::Uuid;
use vextrus_kernel::{ErrorKind, HasErrorKind};

use crate::error::BoxError;
use crate::saga::state::{SagaId, SagaState};

/// Everything that can go wrong when defining, storing or driving sagas.
///
/// ```
/// use vextrus_core::saga::{SagaError, SagaId};
/// use vextrus_kernel::{ErrorKind, HasErrorKind};
///
/// let err = SagaError::Fenced { saga_id: SagaId::new(), token: 3, current: 4 };
/// assert_eq!(err.kind(), ErrorKind::Conflict);
/// assert!(err.is_fenced());
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SagaError {
    /// The writer's fencing token is stale: another worker claimed the saga
    /// since. Nothing was written.
    #[error(
        "saga {saga_id}: write with fencing token {token} rejected, current token is {current}"
    )]
    Fenced {
        /// The saga.
        saga_id: SagaId,
        /// The token the writer held.
        token: u64,
        /// The saga's current token.
        current: u64,
    },
    /// Another worker holds a live lease on the saga; try again later.
    #[error("saga {saga_id} is leased by worker {owner}")]
    Leased {
        /// The saga.
        saga_id: SagaId,
        /// The worker holding the lease.
        owner: String,
    },
    /// No saga with this id.
    #[error("saga {0} not found")]
    NotFound(SagaId),
    /// A saga with this id already exists (with another type).
    #[error("saga {0} already exists")]
    AlreadyExists(SagaId),
    /// The reply message was already handled (its inbox record exists).
    #[error("message {0} was already handled")]
    DuplicateMessage(Uuid),
    /// No definition of this type and version is registered.
    #[error("no saga definition {saga_type} v{version} is registered")]
    UnknownDefinition {
        /// The type name.
        saga_type: String,
        /// The version (0: any version).
        version: u32,
    },
    /// A definition was malformed or registered twice.
    #[error("invalid saga definition: {0}")]
    InvalidDefinition(String),
    /// An operator operation does not apply in the saga's state.
    #[error("cannot {operation} saga {saga_id} in state {state}")]
    InvalidState {
        /// The saga.
        saga_id: SagaId,
        /// Its state.
        state: SagaState,
        /// What was asked.
        operation: &'static str,
    },
    /// A command or reply message was malformed (not a saga message).
    #[error("invalid saga message: {0}")]
    InvalidMessage(String),
    /// Saga data or a stored record could not be (de)serialized.
    #[error("saga serialization failed: {0}")]
    Serialization(#[from] serde_json::Error),
    /// The store could not be reached or was busy; the same call may succeed later.
    #[error("saga store unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// Any other backend failure.
    #[error("saga store backend error: {0}")]
    Backend(#[source] BoxError),
}

impl SagaError {
    /// Wraps a backend error that no retry will mend.
    pub fn backend(err: impl Into<BoxError>) -> Self {
        Self::Backend(err.into())
    }

    /// Wraps a backend error that a retry may mend.
    pub fn unavailable(err: impl Into<BoxError>) -> Self {
        Self::Unavailable(err.into())
    }

    /// Whether this is [`SagaError::Fenced`].
    pub fn is_fenced(&self) -> bool {
        matches!(self, Self::Fenced { .. })
    }
}

impl HasErrorKind for SagaError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Fenced { .. } | Self::AlreadyExists(_) | Self::DuplicateMessage(_) => {
                ErrorKind::Conflict
            }
            Self::Leased { .. } | Self::Unavailable(_) => ErrorKind::Transient,
            Self::NotFound(_) | Self::UnknownDefinition { .. } => ErrorKind::NotFound,
            Self::InvalidDefinition(_) | Self::InvalidState { .. } | Self::InvalidMessage(_) => {
                ErrorKind::Validation
            }
            Self::Serialization(_) | Self::Backend(_) => ErrorKind::Fatal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_policy() {
        let id = SagaId::new();
        assert_eq!(
            SagaError::Leased {
                saga_id: id,
                owner: "w".into()
            }
            .kind(),
            ErrorKind::Transient
        );
        assert_eq!(SagaError::NotFound(id).kind(), ErrorKind::NotFound);
        assert_eq!(
            SagaError::InvalidState {
                saga_id: id,
                state: SagaState::Completed,
                operation: "abort"
            }
            .kind(),
            ErrorKind::Validation
        );
        assert_eq!(SagaError::backend("bug").kind(), ErrorKind::Fatal);
        assert_eq!(
            SagaError::DuplicateMessage(Uuid::nil()).kind(),
            ErrorKind::Conflict
        );
    }
}
