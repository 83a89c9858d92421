//! The store's own migrator: versioned `.sql` files under `migrations/`,
//! embedded at compile time and applied in order.
//!
//! All pending migrations run in one `BEGIN IMMEDIATE` transaction (SQLite
//! DDL is transactional), so two processes migrating at once take turns and
//! a failure leaves the schema as it was. Applied versions are recorded in
//! `vextrus_migrations` with a checksum of their text; applying twice is
//! harmless, and a migration edited after it was applied is reported rather
//! than silently skipped.

use sqlx::{Row, SqlitePool};
use vextrus_core::{EventStoreError, Result};

use crate::store::map_sqlx;

/// One versioned migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// Its version (applied in ascending order).
    pub version: i64,
    /// A short name (the file name without the version).
    pub name: &'static str,
    /// The SQL.
    pub sql: &'static str,
}

/// Every migration, in order: the event store (1), then the outbox and
/// inbox (2, [`OUTBOX_MIGRATION`](crate::OUTBOX_MIGRATION)), the saga store
/// (3, [`SAGA_MIGRATION`](crate::saga::SAGA_MIGRATION)), the outbox's lanes
/// (4: a `lane` column on the outbox, the `outbox_lanes` cursors and the
/// `outbox_lane_log` marks; see [`SqliteOutbox`](crate::SqliteOutbox)).
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "event_store",
        sql: include_str!("../migrations/0001_event_store.sql"),
    },
    crate::outbox::OUTBOX_MIGRATION,
    crate::saga::SAGA_MIGRATION,
    Migration {
        version: 4,
        name: "outbox_lanes",
        sql: include_str!("../migrations/0004_outbox_lanes.sql"),
    },
];

/// A stable 64-bit FNV-1a checksum of a migration's text, as hex.
fn checksum(sql: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Applies every migration not yet applied; returns how many it applied.
pub(crate) async fn run(pool: &SqlitePool) -> Result<usize> {
    run_through(pool, i64::MAX).await
}

/// Applies the migrations up to version `last` not yet applied; returns
/// how many it applied.
pub(crate) async fn run_through(pool: &SqlitePool, last: i64) -> Result<usize> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(map_sqlx)?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS vextrus_migrations (
             version    INTEGER PRIMARY KEY,
             name       TEXT NOT NULL,
             checksum   TEXT NOT NULL,
             applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
         )",
    )
    .execute(&mut *tx)
    .await
    .map_err(map_sqlx)?;
    let applied: Vec<(i64, String)> =
        sqlx::query("SELECT version, checksum FROM vextrus_migrations ORDER BY version")
            .fetch_all(&mut *tx)
            .await
            .map_err(map_sqlx)?
            .into_iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(map_sqlx)?;
    let mut count = 0;
    for m in MIGRATIONS.iter().filter(|m| m.version <= last) {
        let sum = checksum(m.sql);
        if let Some((_, stored)) = applied.iter().find(|(v, _)| *v == m.version) {
            if *stored != sum {
                return Err(EventStoreError::backend(format!(
                    "migration {} ({}) was changed after it was applied (checksum {stored}, now {sum})",
                    m.version, m.name
                )));
            }
            continue;
        }
        sqlx::Executor::execute(&mut *tx, m.sql)
            .await
            .map_err(map_sqlx)?;
        sqlx::query("INSERT INTO vextrus_migrations (version, name, checksum) VALUES (?, ?, ?)")
            .bind(m.version)
            .bind(m.name)
            .bind(&sum)
            .execute(&mut *tx)
            .await
            .map_err(map_sqlx)?;
        count += 1;
    }
    tx.commit().await.map_err(map_sqlx)?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_ordered_and_checksums_stable() {
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version < w[1].version));
        assert_eq!(checksum("a"), checksum("a"));
        assert_ne!(checksum("a"), checksum("b"));
    }
}
