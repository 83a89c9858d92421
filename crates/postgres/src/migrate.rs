//! The store's own migrator: versioned SQL files embedded at compile time,
//! applied in order, each in its own transaction, under an advisory lock so
//! that two processes migrating at once take turns.

use sqlx::{Connection, PgPool};
use vextrus_core::{EventStoreError, Result};

use crate::error::map_sqlx;

/// One versioned migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its version (applied in ascending order).
    pub version: i64,
    /// A short name (the file name without the version).
    pub name: &'static str,
    /// The SQL.
    pub sql: &'static str,
}

/// Every migration, in order: the event store (1), then the outbox and
/// inbox (2, [`OUTBOX_MIGRATION`](crate::OUTBOX_MIGRATION)), the saga tables
/// (3, [`SAGA_MIGRATION`](crate::SAGA_MIGRATION)), the event store's
/// stream versions read from its events (5), the outbox's lanes (6,
/// [`OUTBOX_LANES_MIGRATION`](crate::OUTBOX_LANES_MIGRATION)) and its
/// headers as `json` (7,
/// [`OUTBOX_HEADERS_MIGRATION`](crate::OUTBOX_HEADERS_MIGRATION)).
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "event_store",
        sql: include_str!("../migrations/0001_event_store.sql"),
    },
    crate::outbox::OUTBOX_MIGRATION,
    crate::saga::SAGA_MIGRATION,
    Migration {
        version: 5,
        name: "event_store_versions",
        sql: include_str!("../migrations/0005_event_store_versions.sql"),
    },
    crate::outbox::OUTBOX_LANES_MIGRATION,
    crate::outbox::OUTBOX_HEADERS_MIGRATION,
];

/// The advisory lock key the migrator holds (`hashtext('vextrus_migrate')`-like
/// constant, fixed so that every process agrees).
const MIGRATE_LOCK_KEY: i64 = 0x7665_7874_7275_7301;

/// A stable 64-bit FNV-1a checksum of a migration's text, stored with it so
/// that an edited, already-applied migration is detected.
fn checksum(sql: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(h.to_ne_bytes())
}

/// Applies every migration not yet applied; returns how many it applied.
pub(crate) async fn run(pool: &PgPool) -> Result<usize> {
    let mut conn = pool.acquire().await.map_err(map_sqlx)?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATE_LOCK_KEY)
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx)?;
    let result = apply_all(&mut conn).await;
    let unlock = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATE_LOCK_KEY)
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx);
    let applied = result?;
    unlock?;
    Ok(applied)
}

async fn apply_all(conn: &mut sqlx::PgConnection) -> Result<usize> {
    sqlx::Executor::execute(
        &mut *conn,
        "CREATE TABLE IF NOT EXISTS vextrus_schema_migrations (
            version    bigint PRIMARY KEY,
            name       text        NOT NULL,
            checksum   bigint      NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await
    .map_err(map_sqlx)?;
    let applied: Vec<(i64, i64)> =
        sqlx::query_as("SELECT version, checksum FROM vextrus_schema_migrations")
            .fetch_all(&mut *conn)
            .await
            .map_err(map_sqlx)?;
    let mut count = 0;
    for m in MIGRATIONS {
        let sum = checksum(m.sql);
        if let Some((_, stored)) = applied.iter().find(|(v, _)| *v == m.version) {
            if *stored != sum {
                return Err(EventStoreError::backend(format!(
                    "migration {} ({}) was changed after it was applied",
                    m.version, m.name
                )));
            }
            continue;
        }
        let mut tx = conn.begin().await.map_err(map_sqlx)?;
        sqlx::Executor::execute(&mut *tx, m.sql)
            .await
            .map_err(map_sqlx)?;
        sqlx::query(
            "INSERT INTO vextrus_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
        )
        .bind(m.version)
        .bind(m.name)
        .bind(sum)
        .execute(&mut *tx)
        .await
        .map_err(map_sqlx)?;
        tx.commit().await.map_err(map_sqlx)?;
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_ordered_and_checksums_stable() {
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version < w[1].version));
        assert_eq!(checksum("abc"), checksum("abc"));
        assert_ne!(checksum("abc"), checksum("abd"));
    }
}
