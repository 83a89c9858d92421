//! The append rule on PostgreSQL: a stream's version is read from its
//! events' unique `(stream_id, stream_version)` key (schema version 5).
//! Races that the expectation still allows (`Any`, `StreamExists`) are won
//! on a later try, batches stay whole and contiguous, every path (pooled
//! single events, pooled batches, appends in a caller's transaction) obeys
//! the same rule, and a database written by the old rule (a version row per
//! stream) keeps working after the migration.

mod common;

use std::collections::HashSet;

use serde_json::json;
use sqlx::Connection;
use vextrus_core::{
    EventAppender, EventReader, EventStoreError, ExpectedVersion, NewEvent, StreamId,
};
use vextrus_kernel::EventMetadata;
use vextrus_postgres::{NotifyMode, PgEventStore, PgStoreConfig};

fn ev(n: u64) -> NewEvent {
    NewEvent::new("t", json!({ "n": n }), EventMetadata::new())
}

/// The stream's versions in order, checked to be exactly 1..=n.
async fn assert_contiguous(store: &PgEventStore, s: &StreamId) -> i64 {
    let versions: Vec<i64> = sqlx::query_scalar(
        "SELECT stream_version FROM vextrus_events WHERE stream_id = $1 ORDER BY stream_version",
    )
    .bind(s.as_str())
    .fetch_all(store.pool())
    .await
    .unwrap();
    let n = versions.len() as i64;
    assert_eq!(versions, (1..=n).collect::<Vec<_>>(), "versions contiguous");
    n
}

fn small_pool() -> PgStoreConfig {
    PgStoreConfig::default().max_connections(16)
}

#[tokio::test]
async fn racing_any_and_stream_exists_appends_all_land_contiguously() {
    let db = common::TestDb::create().await;
    let store = db.store(small_pool()).await;
    let s = StreamId::new("race-1").unwrap();
    store
        .append_to_stream(&s, ExpectedVersion::NoStream, &[ev(0)])
        .await
        .unwrap();
    // 16 writers x 25 appends each, half `Any`, half `StreamExists`, single
    // events and batches of 3 mixed: every append must succeed (a lost race
    // is retried), and the stream must end with every event exactly once.
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let store = store.clone();
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            for i in 0..25u64 {
                let expected = if w % 2 == 0 {
                    ExpectedVersion::Any
                } else {
                    ExpectedVersion::StreamExists
                };
                let batch: Vec<NewEvent> = if i % 3 == 0 {
                    (0..3).map(|k| ev(w * 1000 + i * 10 + k)).collect()
                } else {
                    vec![ev(w * 1000 + i * 10)]
                };
                let r = store.append_to_stream(&s, expected, &batch).await.unwrap();
                assert_eq!(r.last_version - r.first_version + 1, batch.len() as u64);
                results.push((r.first_version, r.last_version));
            }
            results
        }));
    }
    let mut ranges = Vec::new();
    for t in tasks {
        ranges.extend(t.await.unwrap());
    }
    let n = assert_contiguous(&store, &s).await;
    // Each append got its own versions; together with the first event they
    // cover the stream.
    ranges.sort_unstable();
    let mut next = 2;
    for (first, last) in ranges {
        assert_eq!(first, next, "no two appends share a version");
        next = last + 1;
    }
    assert_eq!(next - 1, n as u64);
    assert_eq!(store.stream_version(&s).await.unwrap(), Some(n as u64));
    // A batch's events sit together: same transaction, consecutive versions.
    let split: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT transaction_id FROM vextrus_events \
         WHERE stream_id = $1 GROUP BY transaction_id \
         HAVING max(stream_version) - min(stream_version) + 1 <> count(*)) x",
    )
    .bind(s.as_str())
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(split, 0, "every batch is contiguous");
    store.pool().close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn racing_exact_batches_have_one_winner_and_typed_conflicts() {
    let db = common::TestDb::create().await;
    let store = db.store(small_pool()).await;
    let s = StreamId::new("race-2").unwrap();
    for round in 0..20u64 {
        let mut tasks = Vec::new();
        for w in 0..8u64 {
            let store = store.clone();
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                // Batches of 1 to 4 events at the same expected version.
                let batch: Vec<NewEvent> = (0..=(w % 4)).map(|k| ev(round * 100 + k)).collect();
                let expected = if round == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(round_base(&store, &s).await)
                };
                (expected, store.append_to_stream(&s, expected, &batch).await)
            }));
        }
        let mut wins = 0;
        for t in tasks {
            match t.await.unwrap() {
                (_, Ok(_)) => wins += 1,
                (expected, Err(EventStoreError::WrongExpectedVersion { actual, .. })) => {
                    // The actual version is the stream's, never the expected one.
                    let expected_v = match expected {
                        ExpectedVersion::Exact(n) => Some(n),
                        _ => None,
                    };
                    assert!(actual.is_some());
                    assert_ne!(actual, expected_v.or(Some(0)));
                }
                (_, Err(e)) => panic!("unexpected error {e}"),
            }
        }
        // Writers that read the version after the round's winner committed
        // may win too (at the next version); at least one wins, and the
        // stream stays contiguous.
        assert!(wins >= 1);
        assert_contiguous(&store, &s).await;
    }
    store.pool().close().await;
    db.drop_db().await;
}

async fn round_base(store: &PgEventStore, s: &StreamId) -> u64 {
    store.stream_version(s).await.unwrap().unwrap_or(0)
}

#[tokio::test]
async fn in_transaction_appends_follow_the_same_rule() {
    let db = common::TestDb::create().await;
    let store = db.store(small_pool()).await;
    let s = StreamId::new("tx-1").unwrap();
    let mut tx = store.pool().begin().await.unwrap();
    let r = store
        .append_in_tx(&mut tx, &s, ExpectedVersion::NoStream, &[ev(1), ev(2)])
        .await
        .unwrap();
    assert_eq!((r.first_version, r.last_version), (1, 2));
    // A conflict inside the transaction leaves it usable.
    let err = store
        .append_in_tx(&mut tx, &s, ExpectedVersion::Exact(1), &[ev(3), ev(4)])
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        EventStoreError::WrongExpectedVersion {
            actual: Some(2),
            ..
        }
    ));
    // A batch one of whose later ids is stored (committed) elsewhere is a
    // partial duplicate, found before anything is written: tx still usable.
    let other = StreamId::new("tx-other").unwrap();
    let taken = ev(99);
    store
        .append_to_stream(
            &other,
            ExpectedVersion::NoStream,
            std::slice::from_ref(&taken),
        )
        .await
        .unwrap();
    let err = store
        .append_in_tx(
            &mut tx,
            &s,
            ExpectedVersion::Exact(2),
            &[ev(5), taken.clone()],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, EventStoreError::PartialDuplicate { .. }),
        "{err}"
    );
    let r = store
        .append_in_tx(&mut tx, &s, ExpectedVersion::Exact(2), &[ev(6)])
        .await
        .unwrap();
    assert_eq!(r.last_version, 3);
    tx.commit().await.unwrap();
    assert_eq!(store.stream_version(&s).await.unwrap(), Some(3));

    // A pooled append racing an open transaction's append at the same
    // version waits for it and then reports the conflict with the version
    // the transaction committed.
    let mut tx = store.pool().begin().await.unwrap();
    store
        .append_in_tx(&mut tx, &s, ExpectedVersion::Exact(3), &[ev(7)])
        .await
        .unwrap();
    let racer = {
        let store = store.clone();
        let s = s.clone();
        tokio::spawn(async move {
            store
                .append_to_stream(&s, ExpectedVersion::Exact(3), &[ev(8), ev(9)])
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        !racer.is_finished(),
        "the racer waits for the open transaction"
    );
    tx.commit().await.unwrap();
    let err = racer.await.unwrap().unwrap_err();
    assert!(matches!(
        err,
        EventStoreError::WrongExpectedVersion {
            actual: Some(4),
            ..
        }
    ));
    // ...and when the transaction rolls back instead, the racer wins.
    let mut tx = store.pool().begin().await.unwrap();
    store
        .append_in_tx(&mut tx, &s, ExpectedVersion::Exact(4), &[ev(10)])
        .await
        .unwrap();
    let racer = {
        let store = store.clone();
        let s = s.clone();
        tokio::spawn(async move {
            store
                .append_to_stream(&s, ExpectedVersion::Exact(4), &[ev(11), ev(12)])
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    tx.rollback().await.unwrap();
    let r = racer.await.unwrap().unwrap();
    assert_eq!((r.first_version, r.last_version), (5, 6));
    assert_eq!(assert_contiguous(&store, &s).await, 6);
    store.pool().close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn idempotent_reappend_of_a_racing_batch_and_notify_in_transaction() {
    let db = common::TestDb::create().await;
    let store = db
        .store(small_pool().notify(NotifyMode::InTransaction))
        .await;
    let s = StreamId::new("idem-race").unwrap();
    // The very same batch sent by 8 writers at once: all succeed with the
    // same result, stored once.
    let batch: Vec<NewEvent> = (0..3).map(ev).collect();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        let s = s.clone();
        let batch = batch.clone();
        tasks.push(tokio::spawn(async move {
            store
                .append_to_stream(&s, ExpectedVersion::NoStream, &batch)
                .await
        }));
    }
    let mut results = HashSet::new();
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        results.insert((
            r.first_version,
            r.last_version,
            r.first_position,
            r.last_position,
        ));
    }
    assert_eq!(results.len(), 1, "every writer got the original result");
    assert_eq!(assert_contiguous(&store, &s).await, 3);
    store.pool().close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_database_written_by_the_version_row_rule_keeps_working() {
    let db = common::TestDb::create().await;
    // Schema version 1 as an older vextrus left it, with streams appended
    // through its function (which kept a version row per stream).
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::Executor::execute(&mut conn, vextrus_postgres::MIGRATIONS[0].sql)
        .await
        .unwrap();
    for (stream, n) in [("old-1", 3i64), ("old-2", 1)] {
        for k in 0..n {
            let id = uuid::Uuid::now_v7();
            let meta = serde_json::to_value(EventMetadata::new()).unwrap();
            let outcome: i16 = sqlx::query_scalar(
                "SELECT outcome FROM vextrus_append($1, $2, ARRAY[$3::uuid], ARRAY['t'], \
                 ARRAY[1], ARRAY[$4::jsonb], ARRAY[$5::jsonb], false, true)",
            )
            .bind(stream)
            .bind(if k == 0 { -2i64 } else { k })
            .bind(id)
            .bind(json!({ "k": k }))
            .bind(meta)
            .fetch_one(&mut conn)
            .await
            .unwrap();
            assert_eq!(outcome, 0);
        }
    }
    conn.close().await.unwrap();

    let store = PgEventStore::connect_with(&db.url, small_pool())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    assert_eq!(
        store.migrate().await.unwrap(),
        0,
        "applying again is harmless"
    );
    let gone: Option<String> = sqlx::query_scalar("SELECT to_regclass('vextrus_streams')::text")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(gone, None, "the version rows are no longer kept");
    let old1 = StreamId::new("old-1").unwrap();
    let old2 = StreamId::new("old-2").unwrap();
    assert_eq!(store.stream_version(&old1).await.unwrap(), Some(3));
    assert_eq!(store.stream_version(&old2).await.unwrap(), Some(1));
    let err = store
        .append_to_stream(&old1, ExpectedVersion::Exact(2), &[ev(1)])
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        EventStoreError::WrongExpectedVersion {
            actual: Some(3),
            ..
        }
    ));
    let r = store
        .append_to_stream(&old1, ExpectedVersion::Exact(3), &[ev(2), ev(3)])
        .await
        .unwrap();
    assert_eq!((r.first_version, r.last_version), (4, 5));
    store
        .append_to_stream(&old2, ExpectedVersion::StreamExists, &[ev(4)])
        .await
        .unwrap();
    assert!(matches!(
        store
            .append_to_stream(&old2, ExpectedVersion::NoStream, &[ev(5)])
            .await,
        Err(EventStoreError::WrongExpectedVersion {
            actual: Some(2),
            ..
        })
    ));
    assert_eq!(assert_contiguous(&store, &old1).await, 5);
    assert_eq!(assert_contiguous(&store, &old2).await, 2);
    store.pool().close().await;
    db.drop_db().await;
}

#[tokio::test]
async fn notify_in_transaction_is_sent_by_the_append_statement() {
    let db = common::TestDb::create().await;
    let store = db
        .store(small_pool().notify(NotifyMode::InTransaction))
        .await;
    let mut listener = sqlx::postgres::PgListener::connect(&db.url).await.unwrap();
    listener
        .listen(vextrus_postgres::NOTIFY_CHANNEL)
        .await
        .unwrap();
    let wait = std::time::Duration::from_secs(5);
    let s = StreamId::new("notify-1").unwrap();
    // A pooled single event and a pooled batch each notify once.
    store
        .append_to_stream(&s, ExpectedVersion::NoStream, &[ev(1)])
        .await
        .unwrap();
    tokio::time::timeout(wait, listener.recv())
        .await
        .expect("single event notified")
        .unwrap();
    store
        .append_to_stream(&s, ExpectedVersion::Exact(1), &[ev(2), ev(3)])
        .await
        .unwrap();
    tokio::time::timeout(wait, listener.recv())
        .await
        .expect("batch notified")
        .unwrap();
    // A conflict writes nothing and sends nothing.
    store
        .append_to_stream(&s, ExpectedVersion::Exact(1), &[ev(4)])
        .await
        .unwrap_err();
    // Inside a caller's transaction: delivered at its commit, not before.
    let mut tx = store.pool().begin().await.unwrap();
    store
        .append_in_tx(&mut tx, &s, ExpectedVersion::Exact(3), &[ev(5)])
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), listener.recv())
            .await
            .is_err(),
        "nothing before the commit (and nothing from the conflict)"
    );
    tx.commit().await.unwrap();
    tokio::time::timeout(wait, listener.recv())
        .await
        .expect("in-transaction append notified at commit")
        .unwrap();
    listener.unlisten_all().await.ok();
    drop(listener);
    store.pool().close().await;
    db.drop_db().await;
}
