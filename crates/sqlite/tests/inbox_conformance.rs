//! The inbox conformance suite on SQLite (a fresh temporary file per case):
//! the handler's effect is a counter row written through the unit of
//! work's transaction.

use vextrus_sqlite::{SqliteOutbox, SqliteUnitOfWorkTx};
use vextrus_testkit::inbox::{self as inbox_suite, InboxBackend};

struct Sqlite3;

impl InboxBackend for Sqlite3 {
    type Store = SqliteOutbox;

    async fn fresh(&self) -> SqliteOutbox {
        let s = SqliteOutbox::temporary().await.expect("temporary outbox");
        sqlx::query("CREATE TABLE effects (key TEXT PRIMARY KEY, n INTEGER NOT NULL)")
            .execute(s.pool())
            .await
            .expect("effects table");
        s
    }

    async fn add_effect(&self, tx: &mut SqliteUnitOfWorkTx, key: &str) {
        sqlx::query(
            "INSERT INTO effects (key, n) VALUES (?, 1)
             ON CONFLICT (key) DO UPDATE SET n = n + 1",
        )
        .bind(key)
        .execute(tx.conn().expect("open transaction"))
        .await
        .expect("effect written");
    }

    async fn effect(&self, store: &SqliteOutbox, key: &str) -> u64 {
        let n: Option<i64> = sqlx::query_scalar("SELECT n FROM effects WHERE key = ?")
            .bind(key)
            .fetch_optional(store.pool())
            .await
            .expect("effect read");
        n.map_or(0, |n| u64::try_from(n).unwrap_or_default())
    }
}

macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                inbox_suite::$case(Sqlite3).await;
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
