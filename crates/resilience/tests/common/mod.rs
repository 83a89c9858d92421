//! Helpers shared by the integration tests.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use vextrus_kernel::{ErrorKind, HasErrorKind};

/// A test error of a chosen kind, optionally with a server's retry hint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("test error ({kind})")]
pub struct TestError {
    pub kind: ErrorKind,
    pub retry_after: Option<Duration>,
}

impl TestError {
    pub fn of(kind: ErrorKind) -> Self {
        TestError {
            kind,
            retry_after: None,
        }
    }

    pub fn transient() -> Self {
        Self::of(ErrorKind::Transient)
    }
}

impl HasErrorKind for TestError {
    fn kind(&self) -> ErrorKind {
        self.kind
    }
}
