//! A projection worker process is killed with SIGKILL at random points, at
//! least 20 times, while 20,000 events are appended. Its read model and
//! checkpoint commit in one transaction per batch, so at the end every event
//! was applied exactly once and the read model equals a fresh rebuild.
//!
//! The worker is this very test binary, re-run with
//! `VEXTRUS_CRASH_WORKER_URL` set: then the test below runs the projection
//! until it is killed instead of orchestrating.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use rand::Rng;
use serde_json::json;
use sqlx::{Postgres, Transaction};
use vextrus_core::{
    BoxError, EventAppender, ExpectedVersion, NewEvent, Projection, ProjectionRunner,
    RecordedEvent, StreamId,
};
use vextrus_kernel::EventMetadata;
use vextrus_postgres::{PgEventStore, PgStoreConfig};

const WORKER_ENV: &str = "VEXTRUS_CRASH_WORKER_URL";
const EVENTS: usize = 20_000;
const KILLS: usize = 20;

/// Counts applications per event id (a double application shows as 2) and
/// keeps per-stream totals of the payloads.
struct Totals;

impl Projection<PgEventStore> for Totals {
    fn name(&self) -> &str {
        "crash_totals"
    }

    async fn apply(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        event: &RecordedEvent,
    ) -> Result<(), BoxError> {
        let amount = event.payload["amount"].as_i64().unwrap_or(0);
        sqlx::query(
            "INSERT INTO crash_applied (event_id, times) VALUES ($1, 1) \
             ON CONFLICT (event_id) DO UPDATE SET times = crash_applied.times + 1",
        )
        .bind(event.event_id().as_uuid())
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "INSERT INTO crash_totals (stream_id, events, amount) VALUES ($1, 1, $2) \
             ON CONFLICT (stream_id) DO UPDATE SET events = crash_totals.events + 1, \
               amount = crash_totals.amount + EXCLUDED.amount",
        )
        .bind(event.stream_id.as_str())
        .bind(amount)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn reset(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), BoxError> {
        sqlx::query("DELETE FROM crash_applied")
            .execute(&mut **tx)
            .await?;
        sqlx::query("DELETE FROM crash_totals")
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

fn runner(store: PgEventStore) -> ProjectionRunner<PgEventStore, Totals> {
    ProjectionRunner::new(store, Totals)
        .with_batch_size(50)
        .with_poll_interval(Duration::from_millis(20))
}

async fn read_model(store: &PgEventStore) -> BTreeMap<String, (i64, i64)> {
    sqlx::query_as::<_, (String, i64, i64)>("SELECT stream_id, events, amount FROM crash_totals")
        .fetch_all(store.pool())
        .await
        .unwrap()
        .into_iter()
        .map(|(s, e, a)| (s, (e, a)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_worker_killed_at_random_points_applies_each_event_once() {
    if let Ok(url) = std::env::var(WORKER_ENV) {
        // Worker mode: project until killed.
        let store = PgEventStore::connect_with(&url, PgStoreConfig::default().max_connections(4))
            .await
            .unwrap();
        runner(store)
            .run_until(std::future::pending())
            .await
            .unwrap();
        return;
    }

    let db = common::TestDb::create().await;
    let store = db.store(PgStoreConfig::default()).await;
    for ddl in [
        "CREATE TABLE crash_applied (event_id uuid PRIMARY KEY, times int NOT NULL)",
        "CREATE TABLE crash_totals (stream_id text PRIMARY KEY, events bigint NOT NULL, amount bigint NOT NULL)",
    ] {
        sqlx::query(ddl).execute(store.pool()).await.unwrap();
    }

    // 4 writers append 20,000 events in batches of 1..=10 to 50 streams.
    let appender = {
        let store = store.clone();
        tokio::spawn(async move {
            let per_writer = EVENTS / 4;
            let mut tasks = Vec::new();
            for w in 0..4 {
                let store = store.clone();
                tasks.push(tokio::spawn(async move {
                    let mut written = 0;
                    let mut i = 0u64;
                    while written < per_writer {
                        let n = rand::rng().random_range(1..=10).min(per_writer - written);
                        let events: Vec<NewEvent> = (0..n)
                            .map(|k| {
                                NewEvent::new(
                                    "crash.amount",
                                    json!({ "amount": (i as usize + k) % 97 }),
                                    EventMetadata::new(),
                                )
                            })
                            .collect();
                        let s =
                            StreamId::new(format!("acct-{}", (w * 13 + i as usize) % 50)).unwrap();
                        store
                            .append_to_stream(&s, ExpectedVersion::Any, &events)
                            .await
                            .unwrap();
                        written += n;
                        i += 1;
                        if i.is_multiple_of(20) {
                            tokio::time::sleep(Duration::from_millis(15)).await;
                        }
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        })
    };

    // Start the worker, let it run 50..400 ms, SIGKILL it; again and again
    // while the appends go on, and at least KILLS times.
    let exe = std::env::current_exe().unwrap();
    let mut kills = 0;
    let mut killed_with_progress = 0;
    let mut last_checkpoint = None;
    while kills < KILLS || !appender.is_finished() {
        let mut child = tokio::process::Command::new(&exe)
            .args([
                "projection_worker_killed_at_random_points_applies_each_event_once",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WORKER_ENV, &db.url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let ms = rand::rng().random_range(50..400);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        child.start_kill().unwrap(); // SIGKILL
        let status = child.wait().await.unwrap();
        assert!(!status.success(), "the worker was killed, not finished");
        kills += 1;
        let cp = vextrus_core::CheckpointStore::load_checkpoint(&store, "crash_totals")
            .await
            .unwrap();
        if cp != last_checkpoint {
            killed_with_progress += 1;
        }
        last_checkpoint = cp;
        assert!(kills < 500, "appends did not finish");
    }
    appender.await.unwrap();

    // A last, unkilled run catches up.
    let r = runner(store.clone());
    r.catch_up().await.unwrap();
    let applied: Vec<(uuid::Uuid, i32)> =
        sqlx::query_as("SELECT event_id, times FROM crash_applied")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(applied.len(), EVENTS, "every event applied");
    let twice = applied.iter().filter(|(_, t)| *t != 1).count();
    assert_eq!(twice, 0, "no event applied twice");
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM vextrus_events e JOIN crash_applied a USING (event_id)",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(
        stored as usize, EVENTS,
        "the applied ids are exactly the stored ones"
    );
    assert_eq!(r.lag().await.unwrap().events_behind, 0);

    let incremental = read_model(&store).await;
    assert_eq!(r.rebuild().await.unwrap(), EVENTS as u64);
    assert_eq!(
        read_model(&store).await,
        incremental,
        "read model equals a fresh rebuild"
    );
    println!(
        "{kills} SIGKILLs ({killed_with_progress} after the worker had committed progress), \
         {EVENTS} events, each applied once; read model equals a rebuild"
    );
    assert!(
        killed_with_progress >= KILLS / 2,
        "the kills landed while the worker was working"
    );
    store.pool().close().await;
    db.drop_db().await;
}
