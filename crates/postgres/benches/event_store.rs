//! Event-store throughput on PostgreSQL, each figure beside a raw-SQL
//! baseline measured in the same run through the same driver and pool.
//!
//! Run: `cargo bench -p vextrus-postgres --bench event_store`
//! (`VEXTRUS_BENCH_PG_URL` or `VEXTRUS_TEST_PG_URL` picks the server; the
//! default is `postgres://postgres@127.0.0.1:5432/postgres`; `VEXTRUS_BENCH_RUNS`
//! and `VEXTRUS_BENCH_SECS` change the number and length of runs).
//!
//! It creates a scratch database, runs every measurement `RUNS` times and
//! prints medians as a markdown table (the figures in BENCHMARKS.md), then
//! drops the database. The raw baselines insert and select the very same
//! row shape into a table created `LIKE vextrus_events INCLUDING ALL` (same
//! columns, defaults, indexes), so the ratio is the cost of the store's
//! mechanism: the expected-version check (a look-up on the events' own
//! unique `(stream_id, stream_version)` index), idempotency handling, NOTIFY, the
//! read horizon and metadata decoding.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool, Row};
use vextrus_core::{
    EventAppender, EventFilter, EventReader, ExpectedVersion, GlobalPosition, NewEvent,
    ReadStreamOptions, StreamId, SubscriptionSource,
};
use vextrus_kernel::{ActorId, EventMetadata, TenantId};
use vextrus_postgres::{NotifyMode, PgEventStore, PgStoreConfig};

const READ_STREAM_LEN: u64 = 10_000;
const CATCH_UP_EVENTS: usize = 50_000;
const CATCH_UP_PAGE: usize = 1_000;

fn url_for(url: &str, db: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{}", &base[..host_end], db);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

fn new_event(i: u64) -> NewEvent {
    let meta = EventMetadata::new()
        .with_tenant(TenantId::new("acme-bd").expect("tenant"))
        .with_actor(ActorId::new("user:42").expect("actor"));
    NewEvent::new(
        "sales.order_line_added",
        json!({
            "order_id": format!("SO-{i:08}"),
            "sku": "CEM-50KG-OPC",
            "quantity": 12,
            "unit_price": "585.00",
            "currency": "BDT",
            "warehouse": "DHK-02",
        }),
        meta,
    )
}

/// Runs `writers` tasks for `secs`, each calling `op(writer, iteration)`
/// (which returns how many events it wrote) as fast as it can; events/s.
async fn throughput<F, Fut>(writers: usize, secs: f64, op: F) -> f64
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = u64> + Send,
{
    let op = Arc::new(op);
    let total = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (op, total) = (op.clone(), total.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while Instant::now() < deadline {
                total.fetch_add(op(w, i).await, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    total.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Repeats `op` (returning events read) for about `secs`; events/s.
async fn repeat<F, Fut>(secs: f64, op: F) -> f64
where
    F: Fn() -> Fut,
    Fut: Future<Output = u64>,
{
    let start = Instant::now();
    let mut n = 0;
    loop {
        n += op().await;
        if start.elapsed().as_secs_f64() >= secs {
            return n as f64 / start.elapsed().as_secs_f64();
        }
    }
}

async fn raw_insert_one(pool: &PgPool, stream: &str, version: i64, e: &NewEvent) {
    sqlx::query(
        "INSERT INTO raw_events (stream_id, stream_version, event_id, event_type, \
         schema_version, payload, metadata) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(stream)
    .bind(version)
    .bind(e.event_id.as_uuid())
    .bind(&e.event_type)
    .bind(e.schema_version as i32)
    .bind(&e.payload)
    .bind(serde_json::to_value(&e.metadata).expect("metadata"))
    .execute(pool)
    .await
    .expect("raw insert");
}

async fn raw_insert_many(pool: &PgPool, stream: &str, first_version: i64, events: &[NewEvent]) {
    let versions: Vec<i64> = (0..events.len() as i64)
        .map(|i| first_version + i)
        .collect();
    let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.event_id.as_uuid()).collect();
    let types: Vec<String> = events.iter().map(|e| e.event_type.clone()).collect();
    let svs: Vec<i32> = events.iter().map(|e| e.schema_version as i32).collect();
    let payloads: Vec<serde_json::Value> = events.iter().map(|e| e.payload.clone()).collect();
    let metas: Vec<serde_json::Value> = events
        .iter()
        .map(|e| serde_json::to_value(&e.metadata).expect("metadata"))
        .collect();
    sqlx::query(
        "INSERT INTO raw_events (stream_id, stream_version, event_id, event_type, \
         schema_version, payload, metadata) \
         SELECT $1, v, id, t, sv, p, m \
         FROM unnest($2::bigint[], $3::uuid[], $4::text[], $5::int[], $6::jsonb[], $7::jsonb[]) \
              AS b(v, id, t, sv, p, m)",
    )
    .bind(stream)
    .bind(versions)
    .bind(ids)
    .bind(types)
    .bind(svs)
    .bind(payloads)
    .bind(metas)
    .execute(pool)
    .await
    .expect("raw multi-row insert");
}

/// Decodes a raw row of the same columns the store reads, into plain values.
type RawRow = (
    i64,
    i64,
    String,
    i64,
    String,
    i32,
    serde_json::Value,
    serde_json::Value,
    chrono::DateTime<chrono::Utc>,
);

fn decode_raw(r: &sqlx::postgres::PgRow) -> RawRow {
    (
        r.get(0),
        r.get(1),
        r.get(2),
        r.get(3),
        r.get(4),
        r.get(5),
        r.get(6),
        r.get(7),
        r.get(8),
    )
}

struct Results {
    rows: Vec<(String, Vec<f64>)>,
}

impl Results {
    fn push(&mut self, name: &str, v: f64) {
        match self.rows.iter_mut().find(|(n, _)| n == name) {
            Some((_, vs)) => vs.push(v),
            None => self.rows.push((name.to_owned(), vec![v])),
        }
    }

    /// The median of the per-run ratios `a / b` (each pair measured back to
    /// back in one run, so a noisy machine affects both alike).
    fn ratio(&self, a: &str, b: &str) -> f64 {
        let get = |n: &str| {
            self.rows
                .iter()
                .find(|(m, _)| m == n)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let mut r: Vec<f64> = get(a)
            .iter()
            .zip(get(b).iter())
            .map(|(x, y)| x / y)
            .collect();
        r.sort_by(|x, y| x.total_cmp(y));
        if r.is_empty() {
            f64::NAN
        } else {
            r[r.len() / 2]
        }
    }

    fn median(&self, name: &str) -> f64 {
        let mut v = self
            .rows
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        v.sort_by(|a, b| a.total_cmp(b));
        if v.is_empty() {
            f64::NAN
        } else {
            v[v.len() / 2]
        }
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let admin = std::env::var("VEXTRUS_BENCH_PG_URL")
        .or_else(|_| std::env::var("VEXTRUS_TEST_PG_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let runs: usize = std::env::var("VEXTRUS_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let secs: f64 = std::env::var("VEXTRUS_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.5);
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let db = format!("vextrus_bench_{}", uuid::Uuid::now_v7().simple());
    let mut admin_conn = PgConnection::connect(&admin)
        .await
        .expect("PostgreSQL reachable");
    let mut settings = Vec::new();
    for name in [
        "server_version",
        "fsync",
        "synchronous_commit",
        "wal_level",
        "full_page_writes",
        "shared_buffers",
        "max_connections",
    ] {
        let v: String = sqlx::query_scalar(&format!("SHOW {name}"))
            .fetch_one(&mut admin_conn)
            .await
            .expect("SHOW");
        settings.push(format!("{name}={v}"));
    }
    sqlx::Executor::execute(
        &mut admin_conn,
        format!("CREATE DATABASE \"{db}\"").as_str(),
    )
    .await
    .expect("create bench database");
    let url = url_for(&admin, &db);
    println!("# vextrus-postgres event store benchmark");
    println!("server: {}", settings.join(", "));
    println!(
        "runs: {runs}, {secs} s per throughput measurement; cores: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let store = PgEventStore::connect_with(&url, PgStoreConfig::default().max_connections(40))
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");
    let quiet = PgEventStore::with_config(
        store.pool().clone(),
        PgStoreConfig::default().notify(NotifyMode::InTransaction),
    );
    let silent = PgEventStore::with_config(
        store.pool().clone(),
        PgStoreConfig::default().notify(NotifyMode::Off),
    );
    let pool = store.pool().clone();
    sqlx::Executor::execute(
        &pool,
        "CREATE TABLE raw_events (LIKE vextrus_events INCLUDING ALL)",
    )
    .await
    .expect("raw table");

    // Fixed data for the read measurements: a 10k-event stream, and enough
    // events in the log for the catch-up measurement.
    let read_stream = StreamId::new("read-1").expect("stream id");
    for chunk in 0..READ_STREAM_LEN / 100 {
        let events: Vec<NewEvent> = (0..100).map(|i| new_event(chunk * 100 + i)).collect();
        store
            .append_to_stream(&read_stream, ExpectedVersion::Exact(chunk * 100), &events)
            .await
            .expect("seed");
    }
    let seeded = READ_STREAM_LEN as usize;
    for chunk in 0..(CATCH_UP_EVENTS.saturating_sub(seeded) / 100) as u64 {
        let s = StreamId::new(format!("seed-{}", chunk % 100)).expect("stream id");
        let events: Vec<NewEvent> = (0..100).map(new_event).collect();
        store
            .append_to_stream(&s, ExpectedVersion::Any, &events)
            .await
            .expect("seed");
    }

    let mut results = Results { rows: Vec::new() };
    let run_id = Arc::new(AtomicU64::new(0));
    for run in 0..runs {
        run_id.store(run as u64, Ordering::SeqCst);
        // Single-event appends, 1 / 8 / 32 writers, each on its own stream at
        // its exact expected version; raw: one INSERT per event.
        for writers in [1usize, 8, 32] {
            let versions: Arc<Vec<AtomicU64>> =
                Arc::new((0..writers).map(|_| AtomicU64::new(0)).collect());
            let (st, vs) = (store.clone(), versions.clone());
            let v = throughput(writers, secs, move |w, i| {
                let (st, vs) = (st.clone(), vs.clone());
                async move {
                    let s = StreamId::new(format!("one{writers}-r{run}-w{w}")).expect("id");
                    let expected = vs[w].load(Ordering::Relaxed);
                    let r = st
                        .append_to_stream(&s, ExpectedVersion::Exact(expected), &[new_event(i)])
                        .await
                        .expect("append");
                    vs[w].store(r.last_version, Ordering::Relaxed);
                    1
                }
            })
            .await;
            results.push(&format!("append 1 event, {writers} writers"), v);
            let p = pool.clone();
            let v = throughput(writers, secs, move |w, i| {
                let p = p.clone();
                async move {
                    raw_insert_one(
                        &p,
                        &format!("one{writers}-r{run}-w{w}"),
                        i as i64 + 1,
                        &new_event(i),
                    )
                    .await;
                    1
                }
            })
            .await;
            results.push(&format!("raw INSERT 1 row, {writers} writers"), v);
        }
        // The same at 32 writers with NOTIFY inside each append's transaction.
        let versions: Arc<Vec<AtomicU64>> = Arc::new((0..32).map(|_| AtomicU64::new(0)).collect());
        let (st, vs) = (quiet.clone(), versions.clone());
        let v = throughput(32, secs, move |w, i| {
            let (st, vs) = (st.clone(), vs.clone());
            async move {
                let s = StreamId::new(format!("quiet-r{run}-w{w}")).expect("id");
                let expected = vs[w].load(Ordering::Relaxed);
                let r = st
                    .append_to_stream(&s, ExpectedVersion::Exact(expected), &[new_event(i)])
                    .await
                    .expect("append");
                vs[w].store(r.last_version, Ordering::Relaxed);
                1
            }
        })
        .await;
        results.push("append 1 event, 32 writers, NOTIFY in transaction", v);
        // And without any NOTIFY.
        let versions: Arc<Vec<AtomicU64>> = Arc::new((0..32).map(|_| AtomicU64::new(0)).collect());
        let (st, vs) = (silent.clone(), versions.clone());
        let v = throughput(32, secs, move |w, i| {
            let (st, vs) = (st.clone(), vs.clone());
            async move {
                let s = StreamId::new(format!("silent-r{run}-w{w}")).expect("id");
                let expected = vs[w].load(Ordering::Relaxed);
                let r = st
                    .append_to_stream(&s, ExpectedVersion::Exact(expected), &[new_event(i)])
                    .await
                    .expect("append");
                vs[w].store(r.last_version, Ordering::Relaxed);
                1
            }
        })
        .await;
        results.push("append 1 event, 32 writers, NOTIFY off", v);

        // 100-event appends, 8 writers.
        let versions: Arc<Vec<AtomicU64>> = Arc::new((0..8).map(|_| AtomicU64::new(0)).collect());
        let (st, vs) = (store.clone(), versions.clone());
        let v = throughput(8, secs, move |w, i| {
            let (st, vs) = (st.clone(), vs.clone());
            async move {
                let s = StreamId::new(format!("hundred-r{run}-w{w}")).expect("id");
                let events: Vec<NewEvent> = (0..100).map(|k| new_event(i * 100 + k)).collect();
                let expected = vs[w].load(Ordering::Relaxed);
                let r = st
                    .append_to_stream(&s, ExpectedVersion::Exact(expected), &events)
                    .await
                    .expect("append");
                vs[w].store(r.last_version, Ordering::Relaxed);
                100
            }
        })
        .await;
        results.push("append 100 events, 8 writers (events/s)", v);
        let p = pool.clone();
        let v = throughput(8, secs, move |w, i| {
            let p = p.clone();
            async move {
                let events: Vec<NewEvent> = (0..100).map(|k| new_event(i * 100 + k)).collect();
                raw_insert_many(
                    &p,
                    &format!("hundred-r{run}-w{w}"),
                    i as i64 * 100 + 1,
                    &events,
                )
                .await;
                100
            }
        })
        .await;
        results.push("raw INSERT 100 rows, 8 writers (rows/s)", v);

        // Reading the 10k-event stream.
        let v = repeat(secs, || async {
            let n = store
                .read_stream(&read_stream, ReadStreamOptions::forwards())
                .try_fold(0u64, |n, _| async move { Ok(n + 1) })
                .await
                .expect("read");
            assert_eq!(n, READ_STREAM_LEN);
            n
        })
        .await;
        results.push("read 10k-event stream (events/s)", v);
        let v = repeat(secs, || async {
            let rows = sqlx::query(
                "SELECT position, transaction_id::text::bigint, stream_id, stream_version, \
                 event_type, schema_version, payload, metadata, recorded_at \
                 FROM vextrus_events WHERE stream_id = $1 ORDER BY stream_version",
            )
            .bind(read_stream.as_str())
            .fetch_all(&pool)
            .await
            .expect("raw read");
            let decoded: Vec<RawRow> = rows.iter().map(decode_raw).collect();
            assert_eq!(decoded.len() as u64, READ_STREAM_LEN);
            decoded.len() as u64
        })
        .await;
        results.push("raw SELECT 10k rows by stream (rows/s)", v);

        // Global-log catch-up: the first 50k events, pages of 1,000.
        let v = repeat(secs, || async {
            let mut from = GlobalPosition::START;
            let mut n = 0;
            while n < CATCH_UP_EVENTS {
                let page = store
                    .read_all(from, &EventFilter::all(), CATCH_UP_PAGE)
                    .await
                    .expect("read_all");
                n += page.events.len();
                from = page.scanned_to;
            }
            n as u64
        })
        .await;
        results.push("global-log catch-up, pages of 1,000 (events/s)", v);
        let v = repeat(secs, || async {
            let mut from = 0i64;
            let mut n = 0;
            while n < CATCH_UP_EVENTS {
                let rows = sqlx::query(
                    "SELECT position, transaction_id::text::bigint, stream_id, stream_version, \
                     event_type, schema_version, payload, metadata, recorded_at \
                     FROM vextrus_events WHERE position > $1 ORDER BY position LIMIT $2",
                )
                .bind(from)
                .bind(CATCH_UP_PAGE as i64)
                .fetch_all(&pool)
                .await
                .expect("raw page");
                let decoded: Vec<RawRow> = rows.iter().map(decode_raw).collect();
                n += decoded.len();
                from = decoded.last().map_or(from, |r| r.0);
            }
            n as u64
        })
        .await;
        results.push("raw keyset SELECT by position, pages of 1,000 (rows/s)", v);
        let v = repeat(secs, || async {
            let (mut c, mut p) = (0i64, 0i64);
            let mut n = 0;
            while n < CATCH_UP_EVENTS {
                let rows = sqlx::query(
                    "SELECT e.position, e.transaction_id::text::bigint AS commit_id, e.stream_id, \
                     e.stream_version, e.event_type, e.schema_version, e.payload, e.metadata, \
                     e.recorded_at \
                     FROM vextrus_events e \
                     WHERE (e.transaction_id, e.position) > ($1::bigint::text::xid8, $2) \
                       AND e.transaction_id < (SELECT horizon FROM vextrus_log_horizon()) \
                     ORDER BY e.transaction_id, e.position LIMIT $3",
                )
                .bind(c)
                .bind(p)
                .bind(CATCH_UP_PAGE as i64)
                .fetch_all(&pool)
                .await
                .expect("raw xid page");
                let decoded: Vec<RawRow> = rows.iter().map(decode_raw).collect();
                n += decoded.len();
                if let Some(last) = decoded.last() {
                    (c, p) = (last.1, last.0);
                }
            }
            n as u64
        })
        .await;
        results.push(
            "raw SELECT by (xid, position) below the horizon (rows/s)",
            v,
        );
        eprintln!("run {} of {runs} done", run + 1);
    }

    let ratio = |a: &str, b: &str| results.ratio(a, b);
    println!();
    println!(
        "| measurement | vextrus (median) | raw SQL baseline (median) | ratio (median of per-run ratios) | goal |"
    );
    println!("|---|---:|---:|---:|---:|");
    for w in [1, 8, 32] {
        let a = format!("append 1 event, {w} writers");
        let b = format!("raw INSERT 1 row, {w} writers");
        let goal = if w == 32 { ">= 0.85" } else { "" };
        println!(
            "| single-event appends/s, {w} writer(s) | {:.0} | {:.0} | {:.2} | {goal} |",
            results.median(&a),
            results.median(&b),
            ratio(&a, &b)
        );
    }
    let (a, b) = (
        "append 1 event, 32 writers, NOTIFY in transaction",
        "raw INSERT 1 row, 32 writers",
    );
    println!(
        "| single-event appends/s, 32 writers, NotifyMode::InTransaction | {:.0} | {:.0} | {:.2} | |",
        results.median(a),
        results.median(b),
        ratio(a, b)
    );
    let (a, b) = (
        "append 1 event, 32 writers, NOTIFY off",
        "raw INSERT 1 row, 32 writers",
    );
    println!(
        "| single-event appends/s, 32 writers, NotifyMode::Off | {:.0} | {:.0} | {:.2} | |",
        results.median(a),
        results.median(b),
        ratio(a, b)
    );
    let (a, b) = (
        "append 100 events, 8 writers (events/s)",
        "raw INSERT 100 rows, 8 writers (rows/s)",
    );
    println!(
        "| 100-event appends, 8 writers (events/s) | {:.0} | {:.0} | {:.2} | >= 0.7 |",
        results.median(a),
        results.median(b),
        ratio(a, b)
    );
    let (a, b) = (
        "read 10k-event stream (events/s)",
        "raw SELECT 10k rows by stream (rows/s)",
    );
    println!(
        "| read a 10k-event stream (events/s) | {:.0} | {:.0} | {:.2} | |",
        results.median(a),
        results.median(b),
        ratio(a, b)
    );
    let (a, b) = (
        "global-log catch-up, pages of 1,000 (events/s)",
        "raw keyset SELECT by position, pages of 1,000 (rows/s)",
    );
    println!(
        "| global-log catch-up (events/s) | {:.0} | {:.0} | {:.2} | >= 0.8 |",
        results.median(a),
        results.median(b),
        ratio(a, b)
    );
    let (a, b) = (
        "raw SELECT by (xid, position) below the horizon (rows/s)",
        "raw keyset SELECT by position, pages of 1,000 (rows/s)",
    );
    println!(
        "| ordering cost: raw (xid, position) + horizon vs raw position order | {:.0} | {:.0} | {:.2} | |",
        results.median(a),
        results.median(b),
        ratio(a, b)
    );
    println!();
    println!("all runs (events/s):");
    for (name, vs) in &results.rows {
        let list: Vec<String> = vs.iter().map(|v| format!("{v:.0}")).collect();
        println!("- {name}: {}", list.join(", "));
    }
    // Subscriber lag under a long transaction (once): a transaction that
    // appended stays open for 500 ms while a writer appends every 10 ms; the
    // subscriber's worst lag from commit to delivery.
    let lag = long_transaction_lag(&store, Duration::from_millis(500), false).await;
    // The same with an appender that never finishes and keeps running
    // statements on its own connection, under a 1 s
    // `max_append_transaction`: the reader ends it after the bound.
    let bound = Duration::from_secs(1);
    let bounded = PgEventStore::with_config(
        store.pool().clone(),
        PgStoreConfig::default().max_append_transaction(Some(bound)),
    );
    let busy_lag = long_transaction_lag(&bounded, bound, true).await;

    println!();
    println!(
        "subscriber lag while a 500 ms transaction is open: max {:?}, median {:?} (events committed during the hold wait for it)",
        lag.0, lag.1
    );
    println!(
        "subscriber lag while an appender on another connection keeps running statements, max_append_transaction {bound:?}: max {:?}, median {:?} (the reader ends it after the bound)",
        busy_lag.0, busy_lag.1
    );
    println!();

    store.pool().close().await;
    sqlx::Executor::execute(
        &mut admin_conn,
        format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)").as_str(),
    )
    .await
    .expect("drop bench database");
}

/// Worst and median delay between an event's commit and its delivery to a
/// subscriber, while one transaction that appended stays open for `hold`
/// and commits; or, with `busy`, while one that appended on its own
/// connection keeps running statements until it is ended (`hold` is then
/// the store's `max_append_transaction`).
async fn long_transaction_lag(
    store: &PgEventStore,
    hold: Duration,
    busy: bool,
) -> (Duration, Duration) {
    let mut from = GlobalPosition::START;
    loop {
        let page = store
            .read_all(from, &EventFilter::all(), 10_000)
            .await
            .expect("tail");
        from = page.scanned_to;
        if page.events.is_empty() {
            break;
        }
    }
    let (tx_done, mut rx_done) = tokio::sync::watch::channel(false);
    let commits: Arc<std::sync::Mutex<Vec<(vextrus_kernel::EventId, Instant)>>> = Arc::default();
    let writer = {
        let (store, commits) = (store.clone(), commits.clone());
        tokio::spawn(async move {
            let s = StreamId::new("lag-writer").expect("id");
            let start = Instant::now();
            let mut i = 0;
            while start.elapsed() < hold * 2 {
                let e = new_event(i);
                let id = e.event_id;
                store
                    .append_to_stream(&s, ExpectedVersion::Any, &[e])
                    .await
                    .expect("append");
                commits.lock().expect("lock").push((id, Instant::now()));
                i += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tx_done.send_replace(true);
        })
    };
    let holder = {
        let store = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(hold / 4).await;
            if busy {
                // A connection of its own, taken out of the pool (the
                // reader ends its session).
                let mut conn = store.pool().acquire().await.expect("connect").detach();
                let mut tx = conn.begin().await.expect("begin");
                store
                    .append_in_tx(
                        &mut tx,
                        &StreamId::new("lag-busy-holder").expect("id"),
                        ExpectedVersion::Any,
                        &[new_event(0)],
                    )
                    .await
                    .expect("held append");
                let started = Instant::now();
                while sqlx::query("SELECT pg_sleep(0.05)")
                    .execute(&mut *tx)
                    .await
                    .is_ok()
                {
                    assert!(
                        started.elapsed() < hold * 10,
                        "the busy holder was not ended"
                    );
                }
                return;
            }
            let mut tx = store.pool().begin().await.expect("begin");
            store
                .append_in_tx(
                    &mut tx,
                    &StreamId::new("lag-holder").expect("id"),
                    ExpectedVersion::Any,
                    &[new_event(0)],
                )
                .await
                .expect("held append");
            tokio::time::sleep(hold).await;
            tx.commit().await.expect("commit");
        })
    };
    let mut wake = store.wake_ups().await.expect("wake-ups");
    let mut delivered = std::collections::HashMap::new();
    loop {
        let page = store
            .read_all(from, &EventFilter::all(), 1000)
            .await
            .expect("read");
        let now = Instant::now();
        for e in &page.events {
            delivered.insert(e.event_id(), now);
        }
        from = page.scanned_to;
        if *rx_done.borrow_and_update() && page.events.is_empty() {
            let all_in = commits
                .lock()
                .expect("lock")
                .iter()
                .all(|(id, _)| delivered.contains_key(id));
            if all_in {
                break;
            }
        }
        wake.wait(Duration::from_millis(5)).await;
    }
    writer.await.expect("writer");
    holder.await.expect("holder");
    let mut lags: Vec<Duration> = commits
        .lock()
        .expect("lock")
        .iter()
        .map(|(id, at)| delivered[id].saturating_duration_since(*at))
        .collect();
    lags.sort();
    (lags[lags.len() - 1], lags[lags.len() / 2])
}
