//! The event-store conformance suite (vextrus-testkit) on PostgreSQL: every
//! case runs against its own fresh database.

mod common;

use std::collections::BTreeMap;

use sqlx::{Postgres, Transaction};
use vextrus_core::BoxError;
use vextrus_postgres::{PgEventStore, PgStoreConfig};
use vextrus_testkit::EventStoreBackend;

struct Pg;

impl EventStoreBackend for Pg {
    type Store = PgEventStore;

    async fn fresh_store(&self, max_payload_bytes: usize) -> PgEventStore {
        let db = common::TestDb::create().await;
        let store = db
            .store(PgStoreConfig::default().max_payload_bytes(max_payload_bytes))
            .await;
        sqlx::query(
            "CREATE TABLE testkit_read_model (key text PRIMARY KEY, value bigint NOT NULL)",
        )
        .execute(store.pool())
        .await
        .unwrap();
        store
    }

    async fn add_in_tx(
        tx: &mut Transaction<'static, Postgres>,
        key: &str,
        delta: i64,
    ) -> Result<(), BoxError> {
        sqlx::query(
            "INSERT INTO testkit_read_model (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = testkit_read_model.value + EXCLUDED.value",
        )
        .bind(key)
        .bind(delta)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn clear_in_tx(tx: &mut Transaction<'static, Postgres>) -> Result<(), BoxError> {
        sqlx::query("DELETE FROM testkit_read_model")
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn read_model(store: &PgEventStore) -> BTreeMap<String, i64> {
        sqlx::query_as::<_, (String, i64)>("SELECT key, value FROM testkit_read_model")
            .fetch_all(store.pool())
            .await
            .unwrap()
            .into_iter()
            .collect()
    }
}

vextrus_testkit::event_store_conformance!(Pg);
