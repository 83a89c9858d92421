//! Test databases: each test gets a fresh database on the real server.
#![allow(dead_code)]

use sqlx::{Connection, PgConnection};
use vextrus_postgres::{PgEventStore, PgStoreConfig};

/// The server's admin URL (`VEXTRUS_TEST_PG_URL` overrides).
pub(crate) fn admin_url() -> String {
    std::env::var("VEXTRUS_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `url` with its database name replaced by `db`.
pub(crate) fn url_for(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_part_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{}", &base[..host_part_end], db);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A fresh, empty database `vextrus_t_<uuid>`, dropped by [`TestDb::drop_db`].
/// Panics (failing the test) if the server is unreachable.
pub(crate) struct TestDb {
    pub(crate) name: String,
    pub(crate) url: String,
}

impl TestDb {
    pub(crate) async fn create() -> TestDb {
        let admin = admin_url();
        // UUIDv7: the name carries its creation time, so leftovers can be found.
        let name = format!("vextrus_t_{}", uuid::Uuid::now_v7().simple());
        let mut conn = PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL is required at {admin}: {e}"));
        drop_leftovers(&mut conn).await;
        sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE \"{name}\"").as_str())
            .await
            .unwrap();
        conn.close().await.ok();
        let url = url_for(&admin, &name);
        TestDb { name, url }
    }

    /// A migrated store on this database.
    pub(crate) async fn store(&self, config: PgStoreConfig) -> PgEventStore {
        let store = PgEventStore::connect_with(&self.url, config).await.unwrap();
        store.migrate().await.unwrap();
        store
    }

    /// Drops the database, ending any session still connected to it.
    pub(crate) async fn drop_db(self) {
        let mut conn = PgConnection::connect(&admin_url()).await.unwrap();
        sqlx::Executor::execute(
            &mut conn,
            format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name).as_str(),
        )
        .await
        .unwrap();
        conn.close().await.ok();
    }
}

/// Drops test databases older than an hour that a test could not drop (the
/// conformance suite's stores have no teardown), once per test process.
async fn drop_leftovers(conn: &mut PgConnection) {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if DONE.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE datname LIKE 'vextrus\\_t\\_%'",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let now_ms = chrono::Utc::now().timestamp_millis();
    for name in names {
        let Some(hex) = name.strip_prefix("vextrus_t_").and_then(|h| h.get(..12)) else {
            continue;
        };
        let Ok(created_ms) = i64::from_str_radix(hex, 16) else {
            continue;
        };
        if now_ms - created_ms > 3_600_000 {
            sqlx::Executor::execute(
                &mut *conn,
                format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str(),
            )
            .await
            .ok();
        }
    }
}

/// A fresh database and a migrated store on it, with the default configuration.
pub(crate) async fn fresh_store() -> (TestDb, PgEventStore) {
    let db = TestDb::create().await;
    let store = db.store(PgStoreConfig::default()).await;
    (db, store)
}

#[test]
fn url_for_replaces_the_database() {
    assert_eq!(
        url_for("postgres://u@h:5432/postgres", "x"),
        "postgres://u@h:5432/x"
    );
    assert_eq!(
        url_for("postgres://u@h:5432/postgres?sslmode=disable", "x"),
        "postgres://u@h:5432/x?sslmode=disable"
    );
    assert_eq!(url_for("postgres://u@h:5432", "x"), "postgres://u@h:5432/x");
}
