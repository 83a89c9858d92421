//! PostgreSQL-specific behaviour: migrations, unreachable databases, bad
//! input leaving nothing written, appends inside a caller's transaction,
//! wake-ups, projection transactions.

mod common;

use std::time::Duration;

use futures::TryStreamExt;
use serde_json::json;
use vextrus_core::{
    CheckpointStore, EventAppender, EventFilter, EventReader, EventStoreError, ExpectedVersion,
    GlobalPosition, NewEvent, ProjectionBackend, ReadStreamOptions, StreamId, SubscriptionSource,
};
use vextrus_kernel::{ErrorKind, EventMetadata, HasErrorKind};
use vextrus_postgres::{PgEventStore, PgStoreConfig};

fn ev(t: &str, payload: serde_json::Value) -> NewEvent {
    NewEvent::new(t, payload, EventMetadata::new())
}

async fn event_rows(store: &PgEventStore) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM vextrus_events")
        .fetch_one(store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn migrating_twice_and_concurrently_is_harmless() {
    let db = common::TestDb::create().await;
    let a = PgEventStore::connect(&db.url).await.unwrap();
    let b = PgEventStore::connect(&db.url).await.unwrap();
    let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(
        ra + rb,
        vextrus_postgres::MIGRATIONS.len(),
        "each migration applied once"
    );
    assert_eq!(a.migrate().await.unwrap(), 0);
    // The schema works after all that.
    let s = StreamId::new("order-1").unwrap();
    a.append_to_stream(&s, ExpectedVersion::NoStream, &[ev("t", json!({}))])
        .await
        .unwrap();
    assert_eq!(b.stream_version(&s).await.unwrap(), Some(1));
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM vextrus_schema_migrations")
        .fetch_one(a.pool())
        .await
        .unwrap();
    assert_eq!(applied, vextrus_postgres::MIGRATIONS.len() as i64);
    a.pool().close().await;
    b.pool().close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn unreachable_database_is_a_transient_error() {
    // Nothing listens on port 1.
    let err = PgEventStore::connect("postgres://postgres@127.0.0.1:1/test")
        .await
        .unwrap_err();
    assert!(matches!(err, EventStoreError::Unavailable(_)), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Transient);

    // A store whose pool went away mid-life: typed as unavailable too.
    let (db, store) = common::fresh_store().await;
    store.pool().close().await;
    let s = StreamId::new("order-1").unwrap();
    let err = store
        .append_to_stream(&s, ExpectedVersion::Any, &[ev("t", json!({}))])
        .await;
    assert!(
        matches!(err, Err(EventStoreError::Unavailable(_))),
        "{err:?}"
    );
    let err = store
        .read_all(GlobalPosition::START, &EventFilter::all(), 10)
        .await;
    assert!(
        matches!(err, Err(EventStoreError::Unavailable(_))),
        "{err:?}"
    );
    db.drop_db().await;
}

#[tokio::test]
async fn bad_input_is_typed_and_writes_nothing() {
    let db = common::TestDb::create().await;
    let store = db
        .store(PgStoreConfig::default().max_payload_bytes(100))
        .await;
    let s = StreamId::new("order-1").unwrap();
    let big = ev("t", json!({"blob": "x".repeat(200)}));
    let err = store
        .append_to_stream(&s, ExpectedVersion::Any, &[ev("t", json!({})), big])
        .await
        .unwrap_err();
    assert!(
        matches!(err, EventStoreError::PayloadTooLarge { max: 100, .. }),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Validation);

    let mut mismatched = ev("t", json!({}));
    mismatched.metadata.event_id = vextrus_kernel::EventId::new();
    let err = store
        .append_to_stream(&s, ExpectedVersion::Any, &[mismatched])
        .await
        .unwrap_err();
    assert!(
        matches!(err, EventStoreError::InvalidMetadata(_)),
        "{err:?}"
    );

    assert!(matches!(
        StreamId::new("bad id"),
        Err(EventStoreError::InvalidStreamId { .. })
    ));
    assert_eq!(event_rows(&store).await, 0);
    assert_eq!(store.stream_version(&s).await.unwrap(), None);

    // Rows whose stored metadata is malformed (written by hand, bypassing the
    // store) read back as a typed error, not a panic.
    sqlx::query(
        "INSERT INTO vextrus_events (stream_id, stream_version, event_id, event_type, \
         schema_version, payload, metadata) VALUES ('bad-1', 1, gen_random_uuid(), 't', 1, '{}', '{\"x\":1}')",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let bad = StreamId::new("bad-1").unwrap();
    let r: Result<Vec<_>, _> = store
        .read_stream(&bad, ReadStreamOptions::forwards())
        .try_collect()
        .await;
    assert!(matches!(r, Err(EventStoreError::Serialization(_))), "{r:?}");
    store.pool().close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn append_in_tx_commits_and_rolls_back_with_the_caller() {
    let (db, store) = common::fresh_store().await;
    let s = StreamId::new("order-1").unwrap();
    sqlx::query("CREATE TABLE service_rows (id int PRIMARY KEY)")
        .execute(store.pool())
        .await
        .unwrap();

    // Rolled back: neither the events nor the service's row exist.
    let mut tx = store.pool().begin().await.unwrap();
    sqlx::query("INSERT INTO service_rows VALUES (1)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let r = store
        .append_in_tx(
            &mut tx,
            &s,
            ExpectedVersion::NoStream,
            &[ev("t", json!({}))],
        )
        .await
        .unwrap();
    assert_eq!(r.last_version, 1);
    // A conflict inside the transaction leaves it usable.
    let err = store
        .append_in_tx(
            &mut tx,
            &s,
            ExpectedVersion::NoStream,
            &[ev("t", json!({}))],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            EventStoreError::WrongExpectedVersion {
                actual: Some(1),
                ..
            }
        ),
        "{err:?}"
    );
    tx.rollback().await.unwrap();
    assert_eq!(store.stream_version(&s).await.unwrap(), None);
    assert_eq!(event_rows(&store).await, 0);

    // Committed: both.
    let mut tx = store.pool().begin().await.unwrap();
    sqlx::query("INSERT INTO service_rows VALUES (1)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let batch = [ev("a", json!({"n": 1})), ev("b", json!({"n": 2}))];
    let r = store
        .append_in_tx(&mut tx, &s, ExpectedVersion::NoStream, &batch)
        .await
        .unwrap();
    // Re-appending in the same transaction is idempotent.
    let again = store
        .append_in_tx(&mut tx, &s, ExpectedVersion::NoStream, &batch)
        .await
        .unwrap();
    assert_eq!(r, again);
    tx.commit().await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM service_rows")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(rows, 1);
    let read: Vec<_> = store
        .read_stream(&s, ReadStreamOptions::forwards())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(read.len(), 2);
    assert_eq!(read[0].position, r.first_position);
    assert_eq!(read[1].position, r.last_position);
    assert_eq!(
        r.first_position.commit, r.last_position.commit,
        "one transaction"
    );
    store.pool().close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn recorded_at_comes_from_the_database_clock() {
    let (db, store) = common::fresh_store().await;
    let s = StreamId::new("order-1").unwrap();
    let mut e = ev("t", json!({}));
    e.metadata.occurred_at = chrono::DateTime::from_timestamp(0, 0).unwrap();
    store
        .append_to_stream(&s, ExpectedVersion::Any, &[e])
        .await
        .unwrap();
    let db_now: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(store.pool())
        .await
        .unwrap();
    let read: Vec<_> = store
        .read_stream(&s, ReadStreamOptions::forwards())
        .try_collect()
        .await
        .unwrap();
    assert!((db_now - read[0].recorded_at).num_seconds().abs() < 60);
    assert_eq!(read[0].metadata.occurred_at.timestamp(), 0);
    store.pool().close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn notify_wakes_subscribers() {
    let (db, store) = common::fresh_store().await;
    let mut wake = store.wake_ups().await.unwrap();
    // Let the listener start (its first bump), then drain it.
    wake.wait(Duration::from_secs(5)).await;
    let s = StreamId::new("order-1").unwrap();
    let appender = store.clone();
    let s2 = s.clone();
    let task = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        appender
            .append_to_stream(&s2, ExpectedVersion::Any, &[ev("t", json!({}))])
            .await
            .unwrap();
    });
    let started = std::time::Instant::now();
    assert!(
        wake.wait(Duration::from_secs(10)).await,
        "woken by NOTIFY, not by the timeout"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    task.await.unwrap();
    let page = store
        .read_all(GlobalPosition::START, &EventFilter::all(), 10)
        .await
        .unwrap();
    assert_eq!(page.events.len(), 1);
    store.pool().close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn projection_writes_and_checkpoint_commit_together() {
    let (db, store) = common::fresh_store().await;
    sqlx::query("CREATE TABLE totals (stream_id text PRIMARY KEY, n int NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    let s = StreamId::new("order-1").unwrap();
    store
        .append_to_stream(
            &s,
            ExpectedVersion::Any,
            &[ev("t", json!({})), ev("t", json!({}))],
        )
        .await
        .unwrap();

    // A batch whose transaction is dropped leaves neither writes nor checkpoint.
    let (mut tx, cp) = store.begin_projection("totals").await.unwrap();
    assert_eq!(cp, None);
    sqlx::query("INSERT INTO totals VALUES ('order-1', 2)")
        .execute(&mut *tx)
        .await
        .unwrap();
    drop(tx);
    assert_eq!(store.load_checkpoint("totals").await.unwrap(), None);

    let page = store
        .read_all(GlobalPosition::START, &EventFilter::all(), 10)
        .await
        .unwrap();
    let (mut tx, _) = store.begin_projection("totals").await.unwrap();
    sqlx::query("INSERT INTO totals VALUES ('order-1', 2)")
        .execute(&mut *tx)
        .await
        .unwrap();
    store
        .commit_projection(tx, "totals", Some(page.scanned_to))
        .await
        .unwrap();
    assert_eq!(
        store.load_checkpoint("totals").await.unwrap(),
        Some(page.scanned_to)
    );
    let n: i32 = sqlx::query_scalar("SELECT n FROM totals")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(n, 2);

    // Two runners of one projection take turns on its lock.
    let (tx1, _) = store.begin_projection("totals").await.unwrap();
    let other = store.clone();
    let second = tokio::spawn(async move {
        let (tx2, cp) = other.begin_projection("totals").await.unwrap();
        other.commit_projection(tx2, "totals", cp).await.unwrap();
        std::time::Instant::now()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let released = std::time::Instant::now();
    store.commit_projection(tx1, "totals", None).await.unwrap();
    assert!(
        second.await.unwrap() >= released,
        "the second runner waited for the first"
    );
    assert_eq!(store.load_checkpoint("totals").await.unwrap(), None);
    store.pool().close().await;
    db.drop_db().await;
}
