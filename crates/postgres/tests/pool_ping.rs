//! The acquire check of `PgStoreConfig::ping_idle_after`: a connection idle
//! in the pool at least that long is pinged before it is handed out (a dead
//! one is replaced and the caller never sees it); one used more recently is
//! handed out without the round trip, so if it died in between, its next
//! statement fails once and the pool replaces it.

mod common;

use std::time::Duration;

use sqlx::{Connection, PgConnection};
use vextrus_postgres::{PgEventStore, PgStoreConfig};

async fn backend_pid(store: &PgEventStore) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(store.pool())
        .await
}

/// Ends the session of `pid` from a connection of its own, and waits until
/// the server no longer lists it.
async fn terminate(url: &str, pid: i32) {
    let mut admin = PgConnection::connect(url).await.unwrap();
    let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert!(ended, "backend {pid} was not signalled");
    for _ in 0..100 {
        let alive: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
                .bind(pid)
                .fetch_one(&mut admin)
                .await
                .unwrap();
        if !alive {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("backend {pid} is still there");
}

/// A one-connection store with `ping_idle_after = ping` whose connection's
/// session was just ended by the server; the ended session's pid.
async fn store_with_dead_connection(ping: Option<Duration>) -> (common::TestDb, PgEventStore, i32) {
    let db = common::TestDb::create().await;
    let config = PgStoreConfig::default()
        .max_connections(1)
        .ping_idle_after(ping);
    let store = db.store(config).await;
    let pid = backend_pid(&store).await.unwrap();
    terminate(&db.url, pid).await;
    (db, store, pid)
}

async fn teardown(db: common::TestDb, store: PgEventStore) {
    store.pool().close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn an_idle_connection_is_pinged_and_a_dead_one_replaced_before_use() {
    let (db, store, first) = store_with_dead_connection(Some(Duration::from_millis(200))).await;
    // Idle longer than the threshold: the acquire pings, finds the
    // connection dead and opens another; the statement succeeds.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = backend_pid(&store)
        .await
        .expect("the dead connection was replaced before use");
    assert_ne!(first, second, "a new session serves the statement");
    teardown(db, store).await;
}

#[tokio::test]
async fn a_recently_used_connection_is_handed_out_without_a_ping() {
    let (db, store, first) = store_with_dead_connection(Some(Duration::from_secs(60))).await;
    // Used less than a minute ago: no ping, so the statement meets the dead
    // session and fails (an I/O error, as a broken connection's statement
    // would) ...
    let err = backend_pid(&store)
        .await
        .expect_err("no ping: the dead session is used");
    assert!(
        matches!(err, sqlx::Error::Io(_) | sqlx::Error::Database(_)),
        "unexpected error: {err:?}"
    );
    // ... and the broken connection never returns to the pool.
    let second = backend_pid(&store).await.expect("a fresh connection");
    assert_ne!(first, second);
    teardown(db, store).await;
}

#[tokio::test]
async fn none_pings_on_every_acquire() {
    let (db, store, first) = store_with_dead_connection(None).await;
    let second = backend_pid(&store)
        .await
        .expect("pinged at once: the dead connection was replaced");
    assert_ne!(first, second);
    teardown(db, store).await;
}
