//! The crate's one error type.

use std::sync::Arc;
use std::time::Duration;

use vextrus_kernel::{ErrorKind, HasErrorKind};

use crate::breaker::CircuitState;

/// An error from a resilience policy, or the error of the call it guarded.
///
/// Every rejection that the policies raise themselves ([`Timeout`],
/// [`BulkheadFull`], [`CircuitOpen`]) is [`ErrorKind::Transient`]: the same call
/// may well succeed a little later. The kind of an [`Inner`] error passes through
/// unchanged, so a validation error stays a validation error after it crossed
/// the whole stack.
///
/// [`Timeout`]: ResilienceError::Timeout
/// [`BulkheadFull`]: ResilienceError::BulkheadFull
/// [`CircuitOpen`]: ResilienceError::CircuitOpen
/// [`Inner`]: ResilienceError::Inner
///
/// ```
/// use std::time::Duration;
/// use vextrus_kernel::{ErrorKind, HasErrorKind};
/// use vextrus_resilience::ResilienceError;
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("bad input")]
/// struct BadInput;
/// impl HasErrorKind for BadInput {
///     fn kind(&self) -> ErrorKind { ErrorKind::Validation }
/// }
///
/// let timed_out: ResilienceError<BadInput> =
///     ResilienceError::Timeout { after: Duration::from_millis(250) };
/// assert_eq!(timed_out.kind(), ErrorKind::Transient);
///
/// let inner = ResilienceError::Inner(BadInput);
/// assert_eq!(inner.kind(), ErrorKind::Validation);
/// assert!(inner.into_inner().is_some());
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResilienceError<E> {
    /// The guarded call itself failed.
    #[error(transparent)]
    Inner(E),
    /// One attempt took longer than its time limit and was cancelled.
    #[error("call timed out after {after:?}")]
    Timeout {
        /// The time limit that was exceeded.
        after: Duration,
    },
    /// The bulkhead had every slot busy and its waiting queue full, or the
    /// call waited in the queue longer than the bulkhead's maximum wait.
    #[error(
        "bulkhead full: {max_concurrent} calls running and {max_queue} waiting (waited {waited:?})"
    )]
    BulkheadFull {
        /// How many calls the bulkhead lets run at once.
        max_concurrent: usize,
        /// How many calls may wait for a slot.
        max_queue: usize,
        /// How long this call waited before it was turned away (zero when the
        /// queue was already full).
        waited: Duration,
    },
    /// The circuit breaker refused the call without running it.
    #[error("circuit breaker `{name}` is {state}; retry in {retry_in:?}")]
    CircuitOpen {
        /// The breaker's name (one breaker guards one downstream).
        name: Arc<str>,
        /// The state that refused the call: open, or half-open with every
        /// trial slot taken.
        state: CircuitState,
        /// How long until the breaker will let a trial call through (zero when
        /// it is half-open and a decision is due as soon as the trials end).
        retry_in: Duration,
    },
}

impl<E> ResilienceError<E> {
    /// The inner error, if this is one; `None` for a policy's own rejection.
    pub fn into_inner(self) -> Option<E> {
        match self {
            ResilienceError::Inner(e) => Some(e),
            _ => None,
        }
    }

    /// A borrowed inner error, if this is one.
    pub fn inner(&self) -> Option<&E> {
        match self {
            ResilienceError::Inner(e) => Some(e),
            _ => None,
        }
    }

    /// The server's or breaker's hint of when to try again, if there is one.
    ///
    /// For [`ResilienceError::CircuitOpen`] it is the time left until the
    /// breaker admits trial calls; the retry policy honours it like a
    /// `Retry-After` header.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ResilienceError::CircuitOpen { retry_in, .. } => Some(*retry_in),
            _ => None,
        }
    }

    /// Maps the inner error, leaving a policy's own rejection as it is.
    pub fn map_inner<F, E2>(self, f: F) -> ResilienceError<E2>
    where
        F: FnOnce(E) -> E2,
    {
        match self {
            ResilienceError::Inner(e) => ResilienceError::Inner(f(e)),
            ResilienceError::Timeout { after } => ResilienceError::Timeout { after },
            ResilienceError::BulkheadFull {
                max_concurrent,
                max_queue,
                waited,
            } => ResilienceError::BulkheadFull {
                max_concurrent,
                max_queue,
                waited,
            },
            ResilienceError::CircuitOpen {
                name,
                state,
                retry_in,
            } => ResilienceError::CircuitOpen {
                name,
                state,
                retry_in,
            },
        }
    }

    /// The kind of this error, using `inner_kind` for an inner error.
    pub(crate) fn kind_with(&self, inner_kind: impl FnOnce(&E) -> ErrorKind) -> ErrorKind {
        match self {
            ResilienceError::Inner(e) => inner_kind(e),
            _ => ErrorKind::Transient,
        }
    }
}

impl<E> ResilienceError<ResilienceError<E>> {
    /// Removes one level of nesting.
    ///
    /// Stacking tower layers nests errors (a breaker around a timeout gives
    /// `ResilienceError<ResilienceError<E>>`); this makes it flat again:
    ///
    /// ```
    /// use std::time::Duration;
    /// use vextrus_resilience::ResilienceError;
    ///
    /// let nested: ResilienceError<ResilienceError<std::io::Error>> =
    ///     ResilienceError::Inner(ResilienceError::Timeout { after: Duration::from_secs(1) });
    /// assert!(matches!(nested.flatten(), ResilienceError::Timeout { .. }));
    /// ```
    pub fn flatten(self) -> ResilienceError<E> {
        match self {
            ResilienceError::Inner(inner) => inner,
            ResilienceError::Timeout { after } => ResilienceError::Timeout { after },
            ResilienceError::BulkheadFull {
                max_concurrent,
                max_queue,
                waited,
            } => ResilienceError::BulkheadFull {
                max_concurrent,
                max_queue,
                waited,
            },
            ResilienceError::CircuitOpen {
                name,
                state,
                retry_in,
            } => ResilienceError::CircuitOpen {
                name,
                state,
                retry_in,
            },
        }
    }
}

impl<E: HasErrorKind> HasErrorKind for ResilienceError<E> {
    fn kind(&self) -> ErrorKind {
        self.kind_with(HasErrorKind::kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("conflict")]
    struct Conflict;
    impl HasErrorKind for Conflict {
        fn kind(&self) -> ErrorKind {
            ErrorKind::Conflict
        }
    }

    #[test]
    fn rejections_are_transient_and_inner_kind_passes_through() {
        let open: ResilienceError<Conflict> = ResilienceError::CircuitOpen {
            name: "payments".into(),
            state: CircuitState::Open,
            retry_in: Duration::from_secs(3),
        };
        assert_eq!(open.kind(), ErrorKind::Transient);
        assert_eq!(open.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(ResilienceError::Inner(Conflict).kind(), ErrorKind::Conflict);
        let full: ResilienceError<Conflict> = ResilienceError::BulkheadFull {
            max_concurrent: 1,
            max_queue: 0,
            waited: Duration::ZERO,
        };
        assert_eq!(full.kind(), ErrorKind::Transient);
        assert!(full.to_string().contains("bulkhead full"));
    }

    #[test]
    fn flatten_keeps_inner_and_rejections() {
        let nested: ResilienceError<ResilienceError<Conflict>> =
            ResilienceError::Inner(ResilienceError::Inner(Conflict));
        assert_eq!(nested.flatten().kind(), ErrorKind::Conflict);
        let outer: ResilienceError<ResilienceError<Conflict>> = ResilienceError::CircuitOpen {
            name: "x".into(),
            state: CircuitState::Open,
            retry_in: Duration::ZERO,
        };
        assert!(matches!(
            outer.flatten(),
            ResilienceError::CircuitOpen { .. }
        ));
    }
}
