//! The stall bound for any appending transaction
//! ([`PgStoreConfig::max_append_transaction`]): an appender that keeps
//! running statements on another pool is ended once it is older than the
//! bound, its events never appear, other appends flow, and a subscriber is
//! stalled no longer than the bound plus a little.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::watch;
use vextrus_core::{
    EventAppender, EventFilter, EventReader, ExpectedVersion, GlobalPosition, NewEvent,
    RecordedEvent, StreamId, SubscriptionSource,
};
use vextrus_kernel::{EventId, EventMetadata};
use vextrus_postgres::{PgEventStore, PgStoreConfig};

const BOUND: Duration = Duration::from_millis(1000);

fn ev(i: usize) -> NewEvent {
    NewEvent::new("test.appended", json!({ "i": i }), EventMetadata::new())
}

/// A subscriber reading the global log from its checkpoint, waking on
/// NOTIFY or every 5 ms, recording when each event arrived.
struct Subscriber {
    delivered: Arc<Mutex<Vec<(RecordedEvent, Instant)>>>,
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
                let now = Instant::now();
                out.lock()
                    .unwrap()
                    .extend(page.events.iter().cloned().map(|e| (e, now)));
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

    /// When `id` was delivered, if it was.
    fn delivered_at(&self, id: EventId) -> Option<Instant> {
        self.delivered
            .lock()
            .unwrap()
            .iter()
            .find(|(e, _)| e.event_id() == id)
            .map(|(_, at)| *at)
    }

    /// Waits until `id` is delivered (or `max` passes); when it arrived.
    async fn wait_for(&self, id: EventId, max: Duration) -> Option<Instant> {
        let start = Instant::now();
        loop {
            if let Some(at) = self.delivered_at(id) {
                return Some(at);
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
        let delivered = Arc::try_unwrap(self.delivered)
            .unwrap()
            .into_inner()
            .unwrap();
        delivered.into_iter().map(|(e, _)| e).collect()
    }
}

async fn append_one(store: &PgEventStore, stream: &str, i: usize) -> EventId {
    let e = ev(i);
    let id = e.event_id;
    store
        .append_to_stream(&StreamId::new(stream).unwrap(), ExpectedVersion::Any, &[e])
        .await
        .unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_appender_on_another_pool_is_ended_after_the_bound() {
    let db = common::TestDb::create().await;
    let store = db
        .store(PgStoreConfig::default().max_append_transaction(Some(BOUND)))
        .await;
    // The holder's own pool: no idle-in-transaction timeout, no bound of its own.
    let other_pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&db.url)
        .await
        .unwrap();
    let other = PgEventStore::with_config(
        other_pool.clone(),
        PgStoreConfig::default().max_append_transaction(None),
    );
    let sub = Subscriber::start(store.clone()).await;
    let warm = append_one(&store, "warm-1", 0).await;
    assert!(sub.wait_for(warm, Duration::from_secs(10)).await.is_some());

    // The holder appends, then keeps running statements, never idle.
    let began = Instant::now();
    let mut holder = other_pool.begin().await.unwrap();
    let held = ev(0);
    let held_id = held.event_id;
    other
        .append_in_tx(
            &mut holder,
            &StreamId::new("held-1").unwrap(),
            ExpectedVersion::NoStream,
            &[held],
        )
        .await
        .unwrap();
    let busy = tokio::spawn(async move {
        let mut statements = 0u32;
        let err = loop {
            match sqlx::query("SELECT pg_sleep(0.05)")
                .execute(&mut *holder)
                .await
            {
                Ok(_) => statements += 1,
                Err(e) => break e,
            }
            if statements > 400 {
                panic!("the busy appender was never ended");
            }
        };
        let ended = Instant::now();
        let committed = holder.commit().await;
        (err, ended, statements, committed.is_ok())
    });

    // Other appends flow while the holder runs: one every 50 ms.
    let mut later = Vec::new();
    let mut slowest_append = Duration::ZERO;
    while began.elapsed() < BOUND + Duration::from_millis(500) {
        let t = Instant::now();
        let id = append_one(&store, "later-1", later.len()).await;
        slowest_append = slowest_append.max(t.elapsed());
        later.push((id, Instant::now()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (first_later, first_committed) = later[0];
    let delivered = sub
        .wait_for(first_later, Duration::from_secs(30))
        .await
        .expect("an overdue appender must not stall subscribers forever");
    let stall = delivered - first_committed;
    let since_begin = delivered - began;
    let (err, ended, statements, committed) = busy.await.unwrap();
    let holder_ran = ended - began;
    println!(
        "bound {BOUND:?}: holder ended after {holder_ran:?} ({statements} statements, error: {err}); \
         first later event committed {:?} after the holder began, delivered after a stall of \
         {stall:?} ({since_begin:?} after the holder began); slowest other append {slowest_append:?}",
        first_committed - began
    );
    assert!(
        since_begin >= BOUND,
        "held back until the holder was ended ({since_begin:?})"
    );
    assert!(
        since_begin < BOUND + Duration::from_millis(400),
        "subscriber stalled {since_begin:?} after the holder began: within the bound + slack"
    );
    assert!(holder_ran >= BOUND, "not ended before the bound");
    assert!(
        holder_ran < BOUND + Duration::from_millis(400),
        "ended {holder_ran:?} after it began"
    );
    assert!(!committed, "the ended transaction cannot commit");
    assert!(
        slowest_append < BOUND,
        "other appends are not held back ({slowest_append:?})"
    );
    // Every later event arrives; the holder's never does.
    for (id, _) in &later {
        assert!(sub.wait_for(*id, Duration::from_secs(10)).await.is_some());
    }
    let delivered = sub.stop().await;
    let ids: HashSet<EventId> = delivered.iter().map(RecordedEvent::event_id).collect();
    assert_eq!(ids.len(), delivered.len(), "no duplicates");
    assert!(
        !ids.contains(&held_id),
        "the ended appender's event never appears"
    );
    assert_eq!(
        store
            .stream_version(&StreamId::new("held-1").unwrap())
            .await
            .unwrap(),
        None
    );
    let all = store
        .read_all(GlobalPosition::START, &EventFilter::all(), 10_000)
        .await
        .unwrap();
    assert!(all.events.iter().all(|e| e.event_id() != held_id));
    assert_eq!(all.events.len(), later.len() + 1);

    other_pool.close().await;
    store.pool().close().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_did_not_append_is_not_ended() {
    let db = common::TestDb::create().await;
    let store = db
        .store(PgStoreConfig::default().max_append_transaction(Some(Duration::from_millis(200))))
        .await;
    let other_pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    // Holds a transaction id (and so the horizon) but writes no event.
    let mut tx = other_pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *tx)
        .await
        .unwrap();
    let id = append_one(&store, "order-1", 0).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(600) {
        let page = store
            .read_all(GlobalPosition::START, &EventFilter::all(), 10)
            .await
            .unwrap();
        assert!(page.events.is_empty(), "held back by the older transaction");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Still alive: it was not ended.
    sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
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
    other_pool.close().await;
    store.pool().close().await;
    db.drop_db().await;
}
