//! The global log never skips an event that commits out of order
//! (CORRECTNESS.md trap 1), and a held or rolled-back appender stalls
//! subscribers no longer than the configured bound.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sqlx::{Connection, Postgres, Transaction};
use tokio::sync::watch;
use vextrus_core::{
    EventAppender, EventFilter, EventReader, ExpectedVersion, GlobalPosition, NewEvent,
    RecordedEvent, StreamId, SubscriptionSource,
};
use vextrus_kernel::{EventId, EventMetadata};
use vextrus_postgres::{PgEventStore, PgStoreConfig};

fn ev(i: usize) -> NewEvent {
    NewEvent::new("test.appended", json!({ "i": i }), EventMetadata::new())
}

/// A subscriber: reads the global log from its checkpoint (the page's
/// `scanned_to`) as fast as it can, waking on NOTIFY or every 5 ms.
struct Subscriber {
    delivered: Arc<Mutex<Vec<RecordedEvent>>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    async fn start(store: PgEventStore) -> Subscriber {
        let delivered = Arc::new(Mutex::new(Vec::new()));
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let mut wake = store.wake_ups().await.unwrap();
        let out = delivered.clone();
        let task = tokio::spawn(async move {
            let mut from = GlobalPosition::START;
            loop {
                let page = store
                    .read_all(from, &EventFilter::all(), 500)
                    .await
                    .unwrap();
                assert!(page.scanned_to >= from);
                out.lock().unwrap().extend(page.events.iter().cloned());
                from = page.scanned_to;
                if page.events.len() == 500 {
                    continue;
                }
                tokio::select! {
                    _ = wake.wait(Duration::from_millis(5)) => {}
                    _ = stop_rx.changed() => return,
                }
            }
        });
        Subscriber {
            delivered,
            stop: stop_tx,
            task,
        }
    }

    fn ids(&self) -> Vec<EventId> {
        self.delivered
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.event_id())
            .collect()
    }

    /// Waits until every id in `ids` was delivered, or `max` passed.
    async fn wait_for(&self, ids: &HashSet<EventId>, max: Duration) -> Option<Duration> {
        let start = Instant::now();
        loop {
            let seen: HashSet<EventId> = self.ids().into_iter().collect();
            if ids.is_subset(&seen) {
                return Some(start.elapsed());
            }
            if start.elapsed() > max {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn stop(self) -> Vec<RecordedEvent> {
        self.stop.send_replace(true);
        self.task.await.unwrap();
        Arc::try_unwrap(self.delivered)
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

/// One step of a writer transaction's script.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// `BEGIN` and, for some writers, take a transaction id at once
    /// (`pg_current_xact_id()`), so its id is lower than a writer that
    /// appends (takes its position) first but begins later.
    Begin { early_xid: bool },
    /// Append one or more events to the writer's own stream.
    Append,
    /// `COMMIT`, or `ROLLBACK`.
    Finish { commit: bool },
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_never_skips_or_duplicates_out_of_order_commits() {
    const INTERLEAVINGS: usize = 500;
    let db = common::TestDb::create().await;
    let store = db.store(PgStoreConfig::default().max_connections(16)).await;
    let seed: u64 = rand::rng().random();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let sub = Subscriber::start(store.clone()).await;
    let mut committed: HashSet<EventId> = HashSet::new();
    let mut rolled_back: HashSet<EventId> = HashSet::new();
    let mut held_back = 0usize;

    for round in 0..INTERLEAVINGS {
        let writers = rng.random_range(2..=4usize);
        // Each writer: Begin, Append (1..=2 times), Finish; the scripts are
        // interleaved at random, keeping each writer's own order.
        let mut scripts: Vec<Vec<Step>> = (0..writers)
            .map(|_| {
                let mut s = vec![Step::Begin {
                    early_xid: rng.random_bool(0.4),
                }];
                for _ in 0..rng.random_range(1..=2) {
                    s.push(Step::Append);
                }
                s.push(Step::Finish {
                    commit: rng.random_bool(0.8),
                });
                s.reverse();
                s
            })
            .collect();
        let mut txs: Vec<Option<Transaction<'static, Postgres>>> =
            (0..writers).map(|_| None).collect();
        let mut versions = vec![0u64; writers];
        let mut pending: Vec<Vec<EventId>> = vec![Vec::new(); writers];
        while scripts.iter().any(|s| !s.is_empty()) {
            let live: Vec<usize> = (0..writers).filter(|w| !scripts[*w].is_empty()).collect();
            let w = live[rng.random_range(0..live.len())];
            let stream = StreamId::new(format!("w{w}-r{round}")).unwrap();
            match scripts[w].pop().unwrap() {
                Step::Begin { early_xid } => {
                    let mut tx = store.pool().begin().await.unwrap();
                    if early_xid {
                        sqlx::query("SELECT pg_current_xact_id()")
                            .execute(&mut *tx)
                            .await
                            .unwrap();
                    }
                    txs[w] = Some(tx);
                }
                Step::Append => {
                    let n = rng.random_range(1..=3);
                    let batch: Vec<NewEvent> = (0..n).map(ev).collect();
                    let tx = txs[w].as_mut().unwrap();
                    let r = store
                        .append_in_tx(tx, &stream, ExpectedVersion::Exact(versions[w]), &batch)
                        .await
                        .unwrap();
                    versions[w] = r.last_version;
                    pending[w].extend(batch.iter().map(|e| e.event_id));
                }
                Step::Finish { commit } => {
                    let tx = txs[w].take().unwrap();
                    if commit {
                        tx.commit().await.unwrap();
                        committed.extend(pending[w].drain(..));
                    } else {
                        tx.rollback().await.unwrap();
                        rolled_back.extend(pending[w].drain(..));
                    }
                }
            }
            // Sometimes let the subscriber run ahead while transactions are open.
            if rng.random_bool(0.3) {
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..3))).await;
                if txs.iter().any(Option::is_some) {
                    held_back += 1;
                }
            }
        }
        // Every round: the subscriber catches up on everything committed so far.
        if round % 50 == 49 {
            assert!(
                sub.wait_for(&committed, Duration::from_secs(30))
                    .await
                    .is_some(),
                "round {round}: subscriber did not catch up (seed {seed})"
            );
        }
    }
    assert!(
        sub.wait_for(&committed, Duration::from_secs(30))
            .await
            .is_some(),
        "seed {seed}"
    );
    let delivered = sub.stop().await;

    let ids: Vec<EventId> = delivered.iter().map(RecordedEvent::event_id).collect();
    let unique: HashSet<EventId> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "0 duplicated (seed {seed})");
    assert_eq!(
        unique, committed,
        "every committed event delivered, 0 skipped (seed {seed})"
    );
    assert!(
        unique.is_disjoint(&rolled_back),
        "nothing rolled back delivered (seed {seed})"
    );
    assert!(
        delivered.windows(2).all(|w| w[0].position < w[1].position),
        "delivered in (commit, position) order (seed {seed})"
    );
    // The scenario really exercised out-of-order commits: some event with a
    // lower position was delivered after one with a higher position.
    let out_of_order = delivered
        .windows(2)
        .filter(|w| w[0].position.position > w[1].position.position)
        .count();
    println!(
        "{INTERLEAVINGS} interleavings: {} events committed, {} rolled back, {} delivered, \
         {out_of_order} delivered after a higher position, subscriber ran with writers open {held_back} times",
        committed.len(),
        rolled_back.len(),
        delivered.len()
    );
    assert!(
        out_of_order > 0,
        "the interleavings produced out-of-order commits"
    );
    store.pool().close().await;
    db.drop_db().await;
}

/// Appends one event on its own and returns its id.
async fn append_one(store: &PgEventStore, stream: &str) -> EventId {
    let e = ev(0);
    let id = e.event_id;
    store
        .append_to_stream(&StreamId::new(stream).unwrap(), ExpectedVersion::Any, &[e])
        .await
        .unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_and_rolled_back_appenders_stall_subscribers_within_the_bound() {
    const BOUND: Duration = Duration::from_secs(1);
    let db = common::TestDb::create().await;
    let store = db
        .store(PgStoreConfig::default().idle_in_transaction_timeout(Some(BOUND)))
        .await;
    let sub = Subscriber::start(store.clone()).await;
    let warm = append_one(&store, "warm-1").await;
    assert!(
        sub.wait_for(&HashSet::from([warm]), Duration::from_secs(10))
            .await
            .is_some()
    );

    // 1. A holder appends, then rolls back after 300 ms: the later event
    //    arrives right after the rollback.
    let mut holder = store.pool().begin().await.unwrap();
    let held = ev(0);
    let held_id = held.event_id;
    store
        .append_in_tx(
            &mut holder,
            &StreamId::new("held-1").unwrap(),
            ExpectedVersion::Any,
            &[held],
        )
        .await
        .unwrap();
    let later = append_one(&store, "later-1").await;
    let committed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !sub.ids().contains(&later),
        "held back while the holder is open"
    );
    let rolled_back_at = Instant::now();
    holder.rollback().await.unwrap();
    assert!(
        sub.wait_for(&HashSet::from([later]), Duration::from_secs(10))
            .await
            .is_some()
    );
    let after_rollback = rolled_back_at.elapsed();
    let stall = committed_at.elapsed();
    println!(
        "rolled back after 300 ms: stall {stall:?}, delivered {after_rollback:?} after the rollback"
    );
    assert!(after_rollback < Duration::from_millis(500));

    // 2. A holder appends and is abandoned (never commits): the server ends
    //    its idle session after BOUND, rolling it back; the subscriber is
    //    stalled no longer than BOUND plus a poll.
    let mut abandoned = store.pool().begin().await.unwrap();
    let lost = ev(0);
    let lost_id = lost.event_id;
    store
        .append_in_tx(
            &mut abandoned,
            &StreamId::new("abandoned-1").unwrap(),
            ExpectedVersion::Any,
            &[lost],
        )
        .await
        .unwrap();
    let idle_since = Instant::now();
    let later = append_one(&store, "later-2").await;
    let waited = sub
        .wait_for(&HashSet::from([later]), Duration::from_secs(30))
        .await
        .expect("an abandoned appender must not stall subscribers forever");
    let stall = idle_since.elapsed();
    println!(
        "abandoned appender (bound {BOUND:?}): subscriber stalled {stall:?} (waited {waited:?})"
    );
    assert!(
        stall >= BOUND - Duration::from_millis(50),
        "held back until the server ended it"
    );
    assert!(
        stall < BOUND + Duration::from_millis(1500),
        "stall {stall:?} within the bound"
    );
    // The abandoned transaction is gone: committing it fails.
    assert!(abandoned.commit().await.is_err());

    let delivered = sub.stop().await;
    let ids: HashSet<EventId> = delivered.iter().map(RecordedEvent::event_id).collect();
    assert!(!ids.contains(&held_id) && !ids.contains(&lost_id));
    assert_eq!(ids.len(), delivered.len());
    store.pool().close().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_in_another_database_does_not_stall_readers() {
    let db = common::TestDb::create().await;
    let other = common::TestDb::create().await;
    let store = db.store(PgStoreConfig::default()).await;
    // A transaction in another database takes a transaction id and stays open.
    let mut other_conn = sqlx::PgConnection::connect(&other.url).await.unwrap();
    let mut other_tx = sqlx::Connection::begin(&mut other_conn).await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *other_tx)
        .await
        .unwrap();

    let id = append_one(&store, "order-1").await;
    let page = store
        .read_all(GlobalPosition::START, &EventFilter::all(), 10)
        .await
        .unwrap();
    assert_eq!(
        page.events
            .iter()
            .map(RecordedEvent::event_id)
            .collect::<Vec<_>>(),
        vec![id]
    );
    assert_eq!(
        store
            .count_after(GlobalPosition::START, &EventFilter::all())
            .await
            .unwrap(),
        1
    );

    // The same transaction in *this* database does hold readers back.
    let mut tx = store.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *tx)
        .await
        .unwrap();
    let second = append_one(&store, "order-2").await;
    let page = store
        .read_all(page.scanned_to, &EventFilter::all(), 10)
        .await
        .unwrap();
    assert!(
        page.events.is_empty(),
        "held back by an older open transaction of this database"
    );
    tx.rollback().await.unwrap();
    let page = store
        .read_all(page.scanned_to, &EventFilter::all(), 10)
        .await
        .unwrap();
    assert_eq!(
        page.events
            .iter()
            .map(RecordedEvent::event_id)
            .collect::<Vec<_>>(),
        vec![second]
    );

    other_tx.rollback().await.unwrap();
    sqlx::Connection::close(other_conn).await.ok();
    store.pool().close().await;
    db.drop_db().await;
    other.drop_db().await;
}
