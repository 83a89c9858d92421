//! SQLite-specific behaviour: migrations, unreachable and busy databases,
//! the unit of work in a caller's transaction, and the gap-free global log
//! under concurrent writers.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use sqlx::sqlite::SqliteConnectOptions;
use vextrus_core::{
    EventAppender, EventFilter, EventReader, EventStoreError, ExpectedVersion, GlobalPosition,
    NewEvent, SnapshotStore, StreamId, Subscription, SubscriptionOptions,
};
use vextrus_kernel::{ErrorKind, EventMetadata, HasErrorKind};
use vextrus_sqlite::SqliteEventStore;

fn event(n: i64) -> NewEvent {
    NewEvent::new("t", json!({"n": n}), EventMetadata::new())
}

fn sid(s: &str) -> StreamId {
    StreamId::new(s).expect("stream id")
}

async fn open(path: &std::path::Path, busy: Duration) -> SqliteEventStore {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true);
    SqliteEventStore::connect_with(SqliteEventStore::tune(options).busy_timeout(busy), 4)
        .await
        .expect("connect")
}

#[tokio::test]
async fn migrating_twice_or_concurrently_is_harmless() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.db");
    let a = open(&path, Duration::from_secs(5)).await;
    let b = open(&path, Duration::from_secs(5)).await;
    let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
    let applied = ra.expect("a") + rb.expect("b");
    assert_eq!(
        applied,
        vextrus_sqlite::migrate::MIGRATIONS.len(),
        "each migration applied once"
    );
    assert_eq!(a.migrate().await.expect("again"), 0);
    a.append_to_stream(&sid("m-1"), ExpectedVersion::NoStream, &[event(1)])
        .await
        .expect("append");
    assert_eq!(b.migrate().await.expect("again"), 0);
    assert_eq!(
        a.stream_version(&sid("m-1")).await.expect("v"),
        Some(1),
        "data survives"
    );

    // A migration whose recorded checksum differs is reported, not skipped.
    sqlx::query("UPDATE vextrus_migrations SET checksum = 'edited' WHERE version = 1")
        .execute(a.pool())
        .await
        .expect("tamper");
    let err = a.migrate().await.expect_err("edited migration");
    assert_eq!(err.kind(), ErrorKind::Fatal);
}

#[tokio::test]
async fn unreachable_database_is_a_transient_typed_error() {
    let err = SqliteEventStore::connect("sqlite:/nonexistent-vextrus-dir/sub/events.db?mode=rwc")
        .await
        .expect_err("cannot open");
    assert!(matches!(err, EventStoreError::Unavailable(_)), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Transient);
    let err = SqliteEventStore::connect("sqlite:x.db?mode=bogus")
        .await
        .expect_err("bad url");
    assert_eq!(err.kind(), ErrorKind::Validation);
}

#[tokio::test]
async fn busy_database_gives_unavailable_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("busy.db");
    let holder = open(&path, Duration::from_secs(5)).await;
    holder.migrate().await.expect("migrate");
    let impatient = open(&path, Duration::from_millis(100)).await;
    let s = sid("busy-1");

    let mut tx = holder.begin().await.expect("begin");
    holder
        .append_in_tx(&mut tx, &s, ExpectedVersion::NoStream, &[event(1)])
        .await
        .expect("in tx");
    let err = impatient
        .append_to_stream(&s, ExpectedVersion::Any, &[event(2)])
        .await
        .expect_err("the write lock is held");
    assert!(matches!(err, EventStoreError::Unavailable(_)), "{err:?}");
    assert!(err.kind().is_retryable());
    // Readers are not blocked by the writer (WAL), and see nothing uncommitted.
    assert_eq!(impatient.stream_version(&s).await.expect("read"), None);
    tx.commit().await.expect("commit");
    let r = impatient
        .append_to_stream(&s, ExpectedVersion::Exact(1), &[event(2)])
        .await
        .expect("retry");
    assert_eq!(r.last_version, 2);
}

#[tokio::test]
async fn unit_of_work_commits_or_discards_everything_together() {
    let store = SqliteEventStore::temporary().await.expect("store");
    sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY, status TEXT NOT NULL)")
        .execute(store.pool())
        .await
        .expect("table");
    let s = sid("order-uow");

    // Rolled back: neither the events, the snapshot, the checkpoint nor the row.
    let mut tx = store.begin().await.expect("begin");
    store
        .append_in_tx(
            &mut tx,
            &s,
            ExpectedVersion::NoStream,
            &[event(1), event(2)],
        )
        .await
        .expect("append");
    sqlx::query("INSERT INTO orders VALUES ('uow', 'placed')")
        .execute(&mut *tx)
        .await
        .expect("row");
    let snap = vextrus_core::Snapshot {
        stream_id: s.clone(),
        stream_version: 2,
        snapshot_version: 1,
        state: json!({"status": "placed"}),
    };
    store
        .save_snapshot_in_tx(&mut tx, &snap)
        .await
        .expect("snapshot");
    store
        .save_checkpoint_in_tx(&mut tx, "uow", Some(GlobalPosition::new(2, 2)))
        .await
        .expect("cp");
    drop(tx);
    assert_eq!(store.stream_version(&s).await.expect("v"), None);
    assert_eq!(store.load_snapshot(&s).await.expect("snapshot"), None);
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders")
        .fetch_one(store.pool())
        .await
        .expect("count");
    assert_eq!(rows, 0);

    // A conflict inside the unit of work leaves the transaction usable and writes nothing.
    let mut tx = store.begin().await.expect("begin");
    let err = store
        .append_in_tx(&mut tx, &s, ExpectedVersion::Exact(5), &[event(1)])
        .await
        .expect_err("conflict");
    assert!(matches!(
        err,
        EventStoreError::WrongExpectedVersion { actual: None, .. }
    ));
    store
        .append_in_tx(
            &mut tx,
            &s,
            ExpectedVersion::NoStream,
            &[event(1), event(2)],
        )
        .await
        .expect("append");
    sqlx::query("INSERT INTO orders VALUES ('uow', 'placed')")
        .execute(&mut *tx)
        .await
        .expect("row");
    store
        .save_snapshot_in_tx(&mut tx, &snap)
        .await
        .expect("snapshot");
    tx.commit().await.expect("commit");
    store.notify_committed();
    assert_eq!(store.stream_version(&s).await.expect("v"), Some(2));
    assert_eq!(store.load_snapshot(&s).await.expect("snapshot"), Some(snap));
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders")
        .fetch_one(store.pool())
        .await
        .expect("count");
    assert_eq!(rows, 1);
}

/// Concurrent writers (each append in its own `BEGIN IMMEDIATE` transaction)
/// and a live subscriber: the subscriber receives every position exactly
/// once, in order, with no gap: SQLite hands out positions in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn global_log_is_gap_free_under_concurrent_writers() {
    const WRITERS: usize = 8;
    const APPENDS: usize = 60;
    let store = SqliteEventStore::temporary().await.expect("store");
    let opts = SubscriptionOptions::default()
        .with_batch_size(17)
        .with_poll_interval(Duration::from_millis(5));
    let mut sub = Subscription::new(store.clone(), GlobalPosition::START, opts).into_stream();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..APPENDS {
                let batch: Vec<_> = (0..(i % 3 + 1))
                    .map(|k| event((i * 10 + k) as i64))
                    .collect();
                store
                    .append_to_stream(&sid(&format!("gap-{w}")), ExpectedVersion::Any, &batch)
                    .await
                    .expect("append");
            }
        }));
    }
    let total = WRITERS * (0..APPENDS).map(|i| i % 3 + 1).sum::<usize>();
    let mut next = 1u64;
    while (next as usize) <= total {
        let e = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .expect("event in time")
            .expect("endless")
            .expect("event");
        assert_eq!(
            e.position,
            GlobalPosition::new(next, next),
            "positions arrive in order, no gaps"
        );
        next += 1;
    }
    for w in writers {
        w.await.expect("writer");
    }
    let count = store
        .count_after(GlobalPosition::START, &EventFilter::all())
        .await
        .expect("count");
    assert_eq!(count as usize, total);
}
