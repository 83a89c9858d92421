//! The event-store conformance suite on SQLite (a fresh temporary file per case).

use std::collections::BTreeMap;

use sqlx::{Row, Sqlite, Transaction};
use vextrus_core::BoxError;
use vextrus_sqlite::SqliteEventStore;
use vextrus_testkit::EventStoreBackend;

struct Sqlite3;

impl EventStoreBackend for Sqlite3 {
    type Store = SqliteEventStore;

    async fn fresh_store(&self, max_payload_bytes: usize) -> SqliteEventStore {
        let store = SqliteEventStore::temporary()
            .await
            .expect("temporary store")
            .with_max_payload_bytes(max_payload_bytes);
        sqlx::query(
            "CREATE TABLE testkit_read_model (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        )
        .execute(store.pool())
        .await
        .expect("read model table");
        store
    }

    async fn add_in_tx(
        tx: &mut Transaction<'static, Sqlite>,
        key: &str,
        delta: i64,
    ) -> Result<(), BoxError> {
        sqlx::query(
            "INSERT INTO testkit_read_model (key, value) VALUES (?, ?)
             ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
        )
        .bind(key)
        .bind(delta)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn clear_in_tx(tx: &mut Transaction<'static, Sqlite>) -> Result<(), BoxError> {
        sqlx::query("DELETE FROM testkit_read_model")
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn read_model(store: &SqliteEventStore) -> BTreeMap<String, i64> {
        sqlx::query("SELECT key, value FROM testkit_read_model")
            .fetch_all(store.pool())
            .await
            .expect("read model")
            .into_iter()
            .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
            .collect()
    }
}

vextrus_testkit::event_store_conformance!(Sqlite3);
