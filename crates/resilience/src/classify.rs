//! What counts as which kind of failure, kept apart from the policies that act on it.
//!
//! The policies never look at an error themselves: they ask a [`Classifier`]
//! for its [`ErrorKind`] and, optionally, for a server's `Retry-After` hint.
//! The default, [`ByErrorKind`], asks the error itself through
//! [`vextrus_kernel::HasErrorKind`], which every vextrus error implements. Any
//! closure `Fn(&E) -> ErrorKind` is a classifier too, and
//! [`Classifier::with_retry_after`] adds a `Retry-After` reader to one.

use std::fmt;
use std::time::Duration;

use vextrus_kernel::{ErrorKind, HasErrorKind};

use crate::error::ResilienceError;

/// Decides the [`ErrorKind`] of an error, and whether it carries a retry hint.
///
/// ```
/// use std::time::Duration;
/// use vextrus_kernel::ErrorKind;
/// use vextrus_resilience::Classifier;
///
/// struct HttpError { status: u16, retry_after: Option<Duration> }
///
/// let classify = (|e: &HttpError| match e.status {
///     429 | 502..=504 => ErrorKind::Transient,
///     409 => ErrorKind::Conflict,
///     _ => ErrorKind::Fatal,
/// })
/// .with_retry_after(|e: &HttpError| e.retry_after);
///
/// let busy = HttpError { status: 429, retry_after: Some(Duration::from_secs(2)) };
/// assert_eq!(classify.kind(&busy), ErrorKind::Transient);
/// assert_eq!(classify.retry_after(&busy), Some(Duration::from_secs(2)));
/// ```
pub trait Classifier<E> {
    /// The kind of `error`.
    fn kind(&self, error: &E) -> ErrorKind;

    /// How long the server asked the caller to wait before trying again
    /// (an HTTP `Retry-After`, a broker's back-off hint), if it did.
    fn retry_after(&self, error: &E) -> Option<Duration> {
        let _ = error;
        None
    }

    /// This classifier, with `retry_after` read by `read`.
    fn with_retry_after<R>(self, read: R) -> WithRetryAfter<Self, R>
    where
        Self: Sized,
        R: Fn(&E) -> Option<Duration>,
    {
        WithRetryAfter {
            classifier: self,
            read,
        }
    }
}

/// The default classifier: the error says its own kind through
/// [`HasErrorKind`]. It reads no `Retry-After` from plain errors; for a
/// [`ResilienceError`] it passes on the breaker's `retry_in` hint.
///
/// ```
/// use vextrus_kernel::{ErrorKind, HasErrorKind};
/// use vextrus_resilience::{ByErrorKind, Classifier};
///
/// struct Gone;
/// impl HasErrorKind for Gone {
///     fn kind(&self) -> ErrorKind { ErrorKind::NotFound }
/// }
/// assert_eq!(ByErrorKind.kind(&Gone), ErrorKind::NotFound);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByErrorKind;

impl<E: HasErrorKind> Classifier<E> for ByErrorKind {
    fn kind(&self, error: &E) -> ErrorKind {
        error.kind()
    }
}

impl<E, F> Classifier<E> for F
where
    F: Fn(&E) -> ErrorKind,
{
    fn kind(&self, error: &E) -> ErrorKind {
        self(error)
    }
}

/// A classifier with a `Retry-After` reader; made by [`Classifier::with_retry_after`].
#[derive(Clone, Copy)]
pub struct WithRetryAfter<C, R> {
    classifier: C,
    read: R,
}

impl<C: fmt::Debug, R> fmt::Debug for WithRetryAfter<C, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WithRetryAfter")
            .field("classifier", &self.classifier)
            .finish_non_exhaustive()
    }
}

impl<E, C, R> Classifier<E> for WithRetryAfter<C, R>
where
    C: Classifier<E>,
    R: Fn(&E) -> Option<Duration>,
{
    fn kind(&self, error: &E) -> ErrorKind {
        self.classifier.kind(error)
    }

    fn retry_after(&self, error: &E) -> Option<Duration> {
        (self.read)(error)
    }
}

/// Lifts a classifier of `E` to one of [`ResilienceError<E>`]: an inner error
/// is asked of the wrapped classifier, a policy's rejection is transient and
/// carries its own retry hint.
#[derive(Debug, Clone, Copy)]
pub struct Lifted<C>(pub C);

impl<E, C: Classifier<E>> Classifier<ResilienceError<E>> for Lifted<C> {
    fn kind(&self, error: &ResilienceError<E>) -> ErrorKind {
        error.kind_with(|e| self.0.kind(e))
    }

    fn retry_after(&self, error: &ResilienceError<E>) -> Option<Duration> {
        match error {
            ResilienceError::Inner(e) => self.0.retry_after(e),
            other => other.retry_after(),
        }
    }
}

/// A small set of [`ErrorKind`]s, copied cheaply and tested in one branch.
///
/// ```
/// use vextrus_kernel::ErrorKind;
/// use vextrus_resilience::KindSet;
///
/// let set = KindSet::of([ErrorKind::Transient, ErrorKind::Conflict]);
/// assert!(set.contains(ErrorKind::Conflict));
/// assert!(!set.contains(ErrorKind::Validation));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct KindSet(u8);

impl KindSet {
    /// The empty set.
    pub const EMPTY: KindSet = KindSet(0);

    /// The set of the given kinds.
    pub fn of(kinds: impl IntoIterator<Item = ErrorKind>) -> Self {
        kinds.into_iter().fold(KindSet::EMPTY, KindSet::with)
    }

    /// This set with `kind` added.
    pub fn with(self, kind: ErrorKind) -> Self {
        KindSet(self.0 | Self::bit(kind))
    }

    /// Whether `kind` is in the set.
    pub fn contains(self, kind: ErrorKind) -> bool {
        self.0 & Self::bit(kind) != 0
    }

    fn bit(kind: ErrorKind) -> u8 {
        match kind {
            ErrorKind::Validation => 1,
            ErrorKind::NotFound => 1 << 1,
            ErrorKind::Conflict => 1 << 2,
            ErrorKind::Transient => 1 << 3,
            ErrorKind::Fatal => 1 << 4,
            // A kind added to the kernel later is in no set until this match
            // learns it: never retried, never counted as a downstream failure.
            _ => 0,
        }
    }

    const ALL: [ErrorKind; 5] = [
        ErrorKind::Validation,
        ErrorKind::NotFound,
        ErrorKind::Conflict,
        ErrorKind::Transient,
        ErrorKind::Fatal,
    ];
}

impl fmt::Debug for KindSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(Self::ALL.iter().filter(|k| self.contains(**k)))
            .finish()
    }
}

impl FromIterator<ErrorKind> for KindSet {
    fn from_iter<I: IntoIterator<Item = ErrorKind>>(iter: I) -> Self {
        KindSet::of(iter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closures_classify_and_lifted_passes_inner_kind() {
        let by_len = |e: &String| {
            if e.is_empty() {
                ErrorKind::Validation
            } else {
                ErrorKind::Transient
            }
        };
        assert_eq!(by_len.kind(&String::new()), ErrorKind::Validation);
        let lifted = Lifted(by_len);
        assert_eq!(
            lifted.kind(&ResilienceError::Inner(String::new())),
            ErrorKind::Validation
        );
        assert_eq!(
            lifted.kind(&ResilienceError::<String>::Timeout {
                after: Duration::from_secs(1)
            }),
            ErrorKind::Transient
        );
    }

    #[test]
    fn kind_set_debug_lists_members() {
        let set = KindSet::of([ErrorKind::Fatal, ErrorKind::Transient]);
        assert_eq!(format!("{set:?}"), "{Transient, Fatal}");
        assert_eq!(KindSet::EMPTY, KindSet::default());
    }
}
