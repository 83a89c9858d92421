//! Picks the store backend from the `--database-url` scheme.

use anyhow::{Result, bail};
use vextrus_postgres::PgEventStore;
use vextrus_sqlite::SqliteEventStore;

use crate::exit::BadInput;

/// An event store on one of the SQL backends.
///
/// The store traits use `async fn` (not object-safe), so the CLI dispatches
/// with [`with_store!`] instead of a trait object: each command is generic
/// over the traits and compiled once per backend.
#[derive(Debug, Clone)]
pub(crate) enum Store {
    /// The embedded default.
    Sqlite(SqliteEventStore),
    /// PostgreSQL.
    Postgres(PgEventStore),
}

/// Runs `$body` with `$s` bound to the concrete store inside `$store`.
macro_rules! with_store {
    ($store:expr, $s:ident => $body:expr) => {
        match &$store {
            $crate::backend::Store::Sqlite($s) => $body,
            $crate::backend::Store::Postgres($s) => $body,
        }
    };
}
pub(crate) use with_store;

impl Store {
    /// Connects to the store at `url`. With `auto_migrate`, a SQLite store is
    /// created and migrated on first use (the embedded default needs no
    /// setup); PostgreSQL is migrated only by `vextrus migrate`.
    pub(crate) async fn connect(url: &str, auto_migrate: bool) -> Result<Self> {
        if url.starts_with("sqlite:") {
            // The embedded default creates its file on first use.
            let url = if url.contains("mode=") {
                url.to_owned()
            } else if url.contains('?') {
                format!("{url}&mode=rwc")
            } else {
                format!("{url}?mode=rwc")
            };
            let store = SqliteEventStore::connect(&url).await?;
            if auto_migrate {
                store.migrate().await?;
            }
            Ok(Store::Sqlite(store))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Store::Postgres(PgEventStore::connect(url).await?))
        } else {
            bail!(BadInput(format!(
                "unsupported database URL {:?}: use sqlite:PATH or postgres://USER@HOST:PORT/DB",
                redact(url)
            )))
        }
    }

    /// Applies the backend's migrations.
    pub(crate) async fn migrate(&self) -> Result<()> {
        match self {
            Store::Sqlite(s) => {
                s.migrate().await?;
            }
            Store::Postgres(s) => {
                s.migrate().await?;
            }
        }
        Ok(())
    }
}

/// The URL without its password, for messages.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite:vextrus.db"), "sqlite:vextrus.db");
    }
}
