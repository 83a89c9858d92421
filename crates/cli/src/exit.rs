//! Exit codes: the kind of the error, so scripts can tell a conflict from bad
//! input from an outage.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | any other failure (fatal, not found) |
//! | 2 | command-line usage error (from clap) |
//! | 3 | conflict: wrong expected version, duplicate, not a dead letter |
//! | 4 | bad input: invalid stream id, malformed JSON or metadata, oversized payload |
//! | 5 | unavailable: the database could not be reached, or a saga is leased by the worker driving it; retrying may help |

use std::process::ExitCode;

use vextrus_kernel::{ErrorKind, HasErrorKind};

/// Exit code for a conflict.
pub(crate) const CONFLICT: u8 = 3;
/// Exit code for bad input.
pub(crate) const BAD_INPUT: u8 = 4;
/// Exit code for an unreachable database.
pub(crate) const UNAVAILABLE: u8 = 5;

/// Bad input the CLI itself detected (before any store saw it).
#[derive(Debug)]
pub(crate) struct BadInput(pub(crate) String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// The kind of an error chain: the first vextrus error found in it.
fn kind_of(err: &anyhow::Error) -> Option<ErrorKind> {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<vextrus_core::EventStoreError>() {
            return Some(e.kind());
        }
        if let Some(e) = cause.downcast_ref::<vextrus_core::outbox::OutboxError>() {
            return Some(e.kind());
        }
        if let Some(e) = cause.downcast_ref::<vextrus_core::saga::SagaError>() {
            return Some(e.kind());
        }
        // `vextrus demo` and `serve`: the order-to-cash error keeps the kind
        // of what failed under it (an unreachable database is Transient).
        if let Some(e) = cause.downcast_ref::<vextrus_order_to_cash::Error>() {
            return Some(e.kind());
        }
        if cause.downcast_ref::<BadInput>().is_some() {
            return Some(ErrorKind::Validation);
        }
        if cause.downcast_ref::<serde_json::Error>().is_some() {
            return Some(ErrorKind::Validation);
        }
    }
    None
}

/// Prints the error chain to stderr and returns the exit code for its kind.
pub(crate) fn report(err: &anyhow::Error) -> ExitCode {
    eprintln!("error: {err:#}");
    ExitCode::from(match kind_of(err) {
        Some(ErrorKind::Conflict) => CONFLICT,
        Some(ErrorKind::Validation) => BAD_INPUT,
        Some(ErrorKind::Transient) => UNAVAILABLE,
        _ => 1,
    })
}
