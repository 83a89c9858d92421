//! Projection crash test: a projection worker process is killed with
//! SIGKILL at random points, again and again, while 20,000 events are
//! appended; afterwards every event has been applied exactly once and the
//! read model equals a fresh rebuild.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;
use sqlx::Row;
use vextrus_core::{
    CheckpointStore, EventAppender, EventFilter, EventReader, ExpectedVersion, GlobalPosition,
    NewEvent, StreamId,
};
use vextrus_kernel::EventMetadata;
use vextrus_sqlite::SqliteEventStore;

const EVENTS: usize = 20_000;
const BATCH: usize = 10;
const MIN_KILLS: usize = 20;

fn worker(path: &str, mode: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vextrus-sqlite-projection-worker"))
        .args([path, mode])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn worker")
}

async fn read_model(
    store: &SqliteEventStore,
) -> (BTreeMap<String, i64>, Vec<(String, i64, i64, i64)>) {
    let applied = sqlx::query("SELECT event_id, applications FROM crash_applied")
        .fetch_all(store.pool())
        .await
        .expect("applied")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let streams = sqlx::query(
        "SELECT stream_id, total, last_version, events FROM crash_streams ORDER BY stream_id",
    )
    .fetch_all(store.pool())
    .await
    .expect("streams")
    .into_iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect();
    (applied, streams)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_projection_neither_loses_nor_double_applies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("crash.db");
    let path_str = path.to_str().expect("utf-8 path").to_owned();
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true);
    let store = SqliteEventStore::connect_with(SqliteEventStore::tune(options), 4)
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    sqlx::raw_sql(
        "CREATE TABLE crash_applied (event_id TEXT PRIMARY KEY, applications INTEGER NOT NULL);
         CREATE TABLE crash_streams (stream_id TEXT PRIMARY KEY, total INTEGER NOT NULL,
                                     last_version INTEGER NOT NULL, events INTEGER NOT NULL);",
    )
    .execute(store.pool())
    .await
    .expect("read model tables");

    let started = Instant::now();
    let appender = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut expected: BTreeMap<String, (i64, i64)> = BTreeMap::new();
            for b in 0..EVENTS / BATCH {
                let stream = format!("crash-{}", b % 37);
                let events: Vec<NewEvent> = (0..BATCH)
                    .map(|i| {
                        let n = (b * BATCH + i) as i64;
                        NewEvent::new("crash.tick", json!({"n": n}), EventMetadata::new())
                    })
                    .collect();
                let r = store
                    .append_to_stream(
                        &StreamId::new(stream.clone()).expect("stream id"),
                        ExpectedVersion::Any,
                        &events,
                    )
                    .await
                    .expect("append");
                let e = expected.entry(stream).or_default();
                e.0 += (0..BATCH).map(|i| (b * BATCH + i) as i64).sum::<i64>();
                e.1 = i64::try_from(r.last_version).expect("version");
            }
            expected
        })
    };

    let mut kills = 0;
    let mut rng = rand::rng();
    while kills < MIN_KILLS || !appender.is_finished() {
        let mut child = worker(&path_str, "run");
        let alive = Duration::from_millis(rng.random_range(30..400));
        tokio::time::sleep(alive).await;
        // Child::kill sends SIGKILL on Unix: no chance to clean up.
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        kills += 1;
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "crash test is taking too long"
        );
    }
    let expected = appender.await.expect("appender");
    let checkpoint_before = store
        .load_checkpoint("crash-test")
        .await
        .expect("checkpoint");
    eprintln!(
        "killed the worker {kills} times in {:?}; its checkpoint then: {checkpoint_before:?}",
        started.elapsed()
    );

    let status = worker(&path_str, "catch-up")
        .wait()
        .expect("catch-up worker");
    assert!(status.success(), "catch-up worker failed");
    let total = store
        .count_after(GlobalPosition::START, &EventFilter::all())
        .await
        .expect("count");
    assert_eq!(total, EVENTS as u64);
    let (applied, streams) = read_model(&store).await;
    assert_eq!(applied.len(), EVENTS, "every event applied");
    assert!(applied.values().all(|&n| n == 1), "no event applied twice");
    let all_ids: Vec<String> = {
        let page = store
            .read_all(GlobalPosition::START, &EventFilter::all(), EVENTS + 1)
            .await
            .expect("log");
        page.events
            .iter()
            .map(|e| e.event_id().to_string())
            .collect()
    };
    assert!(all_ids.iter().all(|id| applied.contains_key(id)));
    for (stream, total, last_version, events) in &streams {
        let (want_total, want_version) = expected[stream];
        assert_eq!(
            (*total, *last_version, *events),
            (want_total, want_version, want_version),
            "{stream}"
        );
    }

    let status = worker(&path_str, "rebuild").wait().expect("rebuild worker");
    assert!(status.success(), "rebuild worker failed");
    let rebuilt = read_model(&store).await;
    assert_eq!(
        rebuilt,
        (applied, streams),
        "read model equals a fresh rebuild"
    );
}
