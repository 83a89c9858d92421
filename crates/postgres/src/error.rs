//! Mapping driver errors to [`EventStoreError`] by SQLSTATE and error kind,
//! never by message text.

use vextrus_core::EventStoreError;

/// SQLSTATE of a unique violation.
pub(crate) const UNIQUE_VIOLATION: &str = "23505";

/// The unique constraint on `vextrus_events.event_id`.
pub(crate) const EVENT_ID_KEY: &str = "vextrus_events_event_id_key";

/// Whether a SQLSTATE means "the same call may succeed later": serialization
/// failure, deadlock, connection exceptions, admin shutdown / crash
/// recovery / cannot connect now, too many connections, idle-in-transaction
/// timeout, query cancelled (statement timeout).
fn is_transient_sqlstate(code: &str) -> bool {
    matches!(
        code,
        "40001" | "40P01" | "53300" | "57014" | "25P03" | "57P01" | "57P02" | "57P03"
    ) || code.starts_with("08")
}

/// Maps a driver error to the store's error: unreachable, timed-out, busy or
/// restarting databases are [`EventStoreError::Unavailable`] (transient);
/// everything else is [`EventStoreError::Backend`].
pub(crate) fn map_sqlx(err: sqlx::Error) -> EventStoreError {
    let transient = match &err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| is_transient_sqlstate(&c)),
        _ => false,
    };
    if transient {
        EventStoreError::unavailable(err)
    } else {
        EventStoreError::backend(err)
    }
}

/// The unique constraint a driver error violated, if it is a unique violation.
pub(crate) fn unique_violation(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) if db.code().as_deref() == Some(UNIQUE_VIOLATION) => {
            Some(db.constraint().unwrap_or_default().to_owned())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use vextrus_kernel::{ErrorKind, HasErrorKind};

    use super::*;

    #[test]
    fn pool_and_io_failures_are_transient() {
        assert_eq!(
            map_sqlx(sqlx::Error::PoolTimedOut).kind(),
            ErrorKind::Transient
        );
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(map_sqlx(sqlx::Error::Io(io)).kind(), ErrorKind::Transient);
        assert_eq!(map_sqlx(sqlx::Error::RowNotFound).kind(), ErrorKind::Fatal);
        assert!(unique_violation(&sqlx::Error::RowNotFound).is_none());
    }

    #[test]
    fn sqlstates_classify() {
        for code in ["40001", "40P01", "08006", "57P01", "53300", "25P03"] {
            assert!(is_transient_sqlstate(code), "{code}");
        }
        for code in ["23505", "42P01", "22P02"] {
            assert!(!is_transient_sqlstate(code), "{code}");
        }
    }
}
