//! The inbox conformance suite (vextrus-testkit) on PostgreSQL: every case
//! runs against its own fresh database; the handler's effect is a row
//! written with SQL in the inbox entry's transaction.

mod common;

use sqlx::{Postgres, Transaction};
use vextrus_postgres::{PgOutbox, PgStoreConfig};
use vextrus_testkit::inbox::{self as inbox_suite, InboxBackend};

struct Pg;

impl InboxBackend for Pg {
    type Store = PgOutbox;

    async fn fresh(&self) -> PgOutbox {
        let db = common::TestDb::create().await;
        let store = db.store(PgStoreConfig::default()).await;
        let inbox = PgOutbox::new(store);
        inbox.migrate().await.unwrap();
        sqlx::query("CREATE TABLE testkit_effects (key text PRIMARY KEY, n bigint NOT NULL)")
            .execute(inbox.pool())
            .await
            .unwrap();
        inbox
    }

    async fn add_effect(&self, tx: &mut Transaction<'static, Postgres>, key: &str) {
        sqlx::query(
            "INSERT INTO testkit_effects (key, n) VALUES ($1, 1) \
             ON CONFLICT (key) DO UPDATE SET n = testkit_effects.n + 1",
        )
        .bind(key)
        .execute(&mut **tx)
        .await
        .unwrap();
    }

    async fn effect(&self, store: &PgOutbox, key: &str) -> u64 {
        let n: Option<i64> = sqlx::query_scalar("SELECT n FROM testkit_effects WHERE key = $1")
            .bind(key)
            .fetch_optional(store.pool())
            .await
            .unwrap();
        n.map_or(0, |n| u64::try_from(n).unwrap())
    }
}

macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                inbox_suite::$case(Pg).await;
            }
        )*
    };
}

cases!(
    duplicate_delivery_has_one_effect,
    failed_handler_rolls_back_then_succeeds,
    failing_message_is_dead_lettered_after_n,
    malformed_message_is_dead_lettered,
);
