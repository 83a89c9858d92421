//! Error kinds shared by every vextrus crate.
//!
//! Each crate has its own `thiserror` enum, but every error can say which
//! [`ErrorKind`] it is. The kind is what policies act on: the retry layer retries
//! [`ErrorKind::Transient`] errors only, an HTTP layer maps
//! [`ErrorKind::Validation`] to 400 and [`ErrorKind::Conflict`] to 409, and a
//! saga step treats [`ErrorKind::Fatal`] as a business failure.

use std::fmt;

/// What kind of failure an error is, independent of which crate raised it.
///
/// ```
/// use vextrus_kernel::ErrorKind;
///
/// assert!(ErrorKind::Transient.is_retryable());
/// assert!(!ErrorKind::Validation.is_retryable());
/// assert_eq!(ErrorKind::Conflict.to_string(), "conflict");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The input was wrong; retrying the same input fails the same way.
    Validation,
    /// The thing asked for does not exist.
    NotFound,
    /// Someone else changed the state first (optimistic concurrency, a held key).
    Conflict,
    /// A passing fault (network, timeout, overload); the same call may succeed later.
    Transient,
    /// A failure that no retry will mend (a bug, corrupt data, a broken invariant).
    Fatal,
}

impl ErrorKind {
    /// Whether a retry policy should try the same call again.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::Transient)
    }

    /// A stable lower-case name, used in logs, metrics labels and error codes.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Validation => "validation",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Transient => "transient",
            ErrorKind::Fatal => "fatal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Implemented by every vextrus error so that policies can act on its kind.
///
/// ```
/// use vextrus_kernel::{ErrorKind, HasErrorKind};
///
/// #[derive(Debug)]
/// struct Timeout;
/// impl HasErrorKind for Timeout {
///     fn kind(&self) -> ErrorKind { ErrorKind::Transient }
/// }
/// assert!(Timeout.kind().is_retryable());
/// ```
pub trait HasErrorKind {
    /// The kind of this error.
    fn kind(&self) -> ErrorKind;
}
