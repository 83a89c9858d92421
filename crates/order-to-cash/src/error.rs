//! The one error type of the order-to-cash participants.
//!
//! Business outcomes (a declined payment, stock that ran out, a carrier that
//! refused a shipment) are **not** errors: they are replies, stored under the
//! idempotency key like any other reply, so that a retried command gets the
//! same answer. An [`Error`] means the command did not run to its end and
//! nothing it would have written was committed.

use vextrus_kernel::{ErrorKind, HasErrorKind, RepositoryError};

/// `Result` with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a participant's command did not complete (nothing was committed).
///
/// ```
/// use vextrus_kernel::{ErrorKind, HasErrorKind};
/// use vextrus_order_to_cash::Error;
///
/// let crash = Error::InjectedCrash { participant: "payment", key: "o-1/authorize".into() };
/// assert_eq!(crash.kind(), ErrorKind::Transient);
/// assert!(crash.to_string().contains("payment"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database failed (connection, I/O, busy, decoding). Nothing was
    /// committed; the same command may succeed later.
    #[error("{participant} database error: {source}")]
    Database {
        /// Which participant's store failed.
        participant: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The Sales event store failed or refused a save.
    #[error("sales repository error: {0}")]
    Repository(#[from] RepositoryError),
    /// An order refused a command (a broken business rule or a step out of
    /// order).
    #[error(transparent)]
    Order(#[from] crate::sales::OrderError),
    /// A command's input was wrong (empty idempotency key, negative amount,
    /// a currency other than the order's, an unknown order).
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field or argument at fault.
        field: &'static str,
        /// What was wrong with it.
        reason: String,
    },
    /// The idempotency key was used before for a different request.
    #[error("idempotency key {key:?} was used for a different request at {participant}")]
    KeyReused {
        /// The participant that holds the key.
        participant: &'static str,
        /// The key.
        key: String,
    },
    /// A saga step's action arrived after its compensation, which found
    /// nothing to undo and fenced the action's key: the action must not run
    /// now (its saga has moved on), and nothing was written.
    #[error(
        "{participant}: idempotency key {key:?} was compensated before its action arrived; the action is refused"
    )]
    Fenced {
        /// The participant that holds the fence.
        participant: &'static str,
        /// The action's key.
        key: String,
    },
    /// A command that needs earlier state found none (capturing an order
    /// that was never authorized, completing an unknown order).
    #[error("{participant}: {what} not found")]
    NotFound {
        /// The participant asked.
        participant: &'static str,
        /// What was looked for.
        what: String,
    },
    /// The command does not fit the current state (capturing a voided
    /// payment, completing an order that was never invoiced).
    #[error("{participant}: {reason}")]
    IllegalState {
        /// The participant asked.
        participant: &'static str,
        /// Why the command cannot run now.
        reason: String,
    },
    /// A journal entry's debits and credits differ in some currency.
    #[error(
        "journal entry is not balanced in {currency}: debits {debits}, credits {credits} (minor units)"
    )]
    Unbalanced {
        /// The currency code.
        currency: String,
        /// Sum of debits in minor units.
        debits: i128,
        /// Sum of credits in minor units.
        credits: i128,
    },
    /// The failure injector crashed the handler before it committed (the
    /// message would be redelivered).
    #[error("injected crash in {participant} while handling {key}")]
    InjectedCrash {
        /// The participant that crashed.
        participant: &'static str,
        /// The idempotency key of the command it was handling.
        key: String,
    },
    /// Stored data could not be read back (a corrupt reply, an unknown state).
    #[error("{participant}: corrupt stored data: {reason}")]
    Corrupt {
        /// The participant whose store holds it.
        participant: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The outbox, the inbox or a relay failed.
    #[error("outbox: {0}")]
    Outbox(#[from] vextrus_core::outbox::OutboxError),
    /// A broker failed (connecting, declaring, publishing, receiving).
    #[error("transport: {0}")]
    Transport(#[from] vextrus_core::transport::TransportError),
    /// The saga engine or its store failed.
    #[error("saga: {0}")]
    Saga(#[from] vextrus_core::saga::SagaError),
}

impl Error {
    pub(crate) fn db(participant: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
        move |source| Error::Database {
            participant,
            source,
        }
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
        Error::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

impl HasErrorKind for Error {
    /// Database errors and injected crashes are [`ErrorKind::Transient`]
    /// (redeliver the command); a reused key or a concurrent save is
    /// [`ErrorKind::Conflict`]; corrupt data is [`ErrorKind::Fatal`].
    fn kind(&self) -> ErrorKind {
        match self {
            Error::Database { .. } | Error::InjectedCrash { .. } => ErrorKind::Transient,
            Error::Repository(e) => e.kind(),
            Error::Order(_)
            | Error::Invalid { .. }
            | Error::Unbalanced { .. }
            | Error::IllegalState { .. } => ErrorKind::Validation,
            Error::KeyReused { .. } | Error::Fenced { .. } => ErrorKind::Conflict,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::Corrupt { .. } => ErrorKind::Fatal,
            Error::Outbox(e) => e.kind(),
            Error::Transport(e) => e.kind(),
            Error::Saga(e) => e.kind(),
        }
    }
}
