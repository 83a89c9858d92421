//! Event-store throughput on SQLite, each figure beside a raw-SQL baseline
//! of the same row shape through the same driver and pool.
//!
//! Run: `cargo run --release -p vextrus-sqlite --example bench`
//! (optional argument: `normal` for `synchronous=NORMAL`; default `FULL`).
//!
//! Each measurement runs for a fixed time; every figure is the median of
//! several runs. The database is a fresh file in a temporary directory, in
//! WAL mode.

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use serde_json::json;
use sqlx::sqlite::{SqliteConnectOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite, SqlitePool};
use vextrus_core::{
    EventAppender, EventFilter, EventReader, ExpectedVersion, GlobalPosition, NewEvent,
    ReadStreamOptions, StreamId,
};
use vextrus_kernel::EventMetadata;
use vextrus_sqlite::SqliteEventStore;

const RUNS: usize = 5;
const RUN_TIME: Duration = Duration::from_millis(1200);

/// A stored event row as plain columns (the raw read baseline).
type RawEventRow = (String, i64, i64, String, i64, String, String, String);

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn new_event(i: u64) -> NewEvent {
    NewEvent::new(
        "bench.ticked",
        json!({"i": i, "sku": "SKU-123", "qty": 3, "price": "19.99"}),
        EventMetadata::new(),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One raw row of the same shape the store writes.
struct RawRow {
    stream_id: String,
    version: i64,
    event_id: String,
    payload: String,
    metadata: String,
}

fn raw_row(stream: &str, version: i64, i: u64) -> RawRow {
    let e = new_event(i);
    RawRow {
        stream_id: stream.to_owned(),
        version,
        event_id: e.event_id.to_string(),
        payload: e.payload.to_string(),
        metadata: serde_json::to_string(&e.metadata).unwrap_or_default(),
    }
}

async fn raw_insert(pool: &SqlitePool, rows: Vec<RawRow>) -> BoxResult<()> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let mut qb = QueryBuilder::<Sqlite>::new(
        "INSERT INTO raw_events (stream_id, category, stream_version, event_id, event_type, schema_version, payload, metadata) ",
    );
    qb.push_values(rows, |mut b, r| {
        b.push_bind(r.stream_id)
            .push_bind("raw")
            .push_bind(r.version)
            .push_bind(r.event_id)
            .push_bind("bench.ticked")
            .push_bind(1_i64)
            .push_bind(r.payload)
            .push_bind(r.metadata);
    });
    qb.build().execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

/// Runs `writers` tasks for RUN_TIME; each calls `op(writer, n)` and returns
/// how many events it wrote. Returns events per second.
async fn throughput<F, Fut>(writers: usize, op: F) -> BoxResult<f64>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = BoxResult<u64>> + Send,
{
    let start = Instant::now();
    let deadline = start + RUN_TIME;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut events = 0u64;
            while Instant::now() < deadline {
                events += op(w, n).await?;
                n += 1;
            }
            Ok::<u64, Box<dyn std::error::Error + Send + Sync>>(events)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

async fn fresh(sync: SqliteSynchronous) -> BoxResult<(tempfile::TempDir, SqliteEventStore)> {
    let dir = tempfile::tempdir()?;
    let options = SqliteConnectOptions::new()
        .filename(dir.path().join("bench.db"))
        .create_if_missing(true);
    let store =
        SqliteEventStore::connect_with(SqliteEventStore::tune(options).synchronous(sync), 40)
            .await?;
    store.migrate().await?;
    sqlx::raw_sql(
        "CREATE TABLE raw_events (
            position INTEGER PRIMARY KEY AUTOINCREMENT, stream_id TEXT NOT NULL, category TEXT NOT NULL,
            stream_version INTEGER NOT NULL, event_id TEXT NOT NULL, event_type TEXT NOT NULL,
            schema_version INTEGER NOT NULL, payload TEXT NOT NULL, metadata TEXT NOT NULL,
            recorded_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
            UNIQUE (stream_id, stream_version), UNIQUE (event_id));",
    )
    .execute(store.pool())
    .await?;
    Ok((dir, store))
}

fn report(name: &str, ours: f64, raw: f64) {
    println!(
        "| {name} | {ours:>10.0} | {raw:>10.0} | {:>5.2} |",
        ours / raw
    );
}

#[tokio::main]
async fn main() -> BoxResult<()> {
    let sync = match std::env::args().nth(1).as_deref() {
        Some("normal") => SqliteSynchronous::Normal,
        _ => SqliteSynchronous::Full,
    };
    println!(
        "SQLite {} | journal_mode=WAL, synchronous={sync:?} | median of {RUNS} runs of {RUN_TIME:?}",
        sqlite_version().await?
    );
    println!();
    println!("| measurement | vextrus (events/s) | raw SQL (events/s) | ratio |");
    println!("|---|---:|---:|---:|");

    for writers in [1usize, 8, 32] {
        let (mut ours, mut raw) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let (_dir, store) = fresh(sync).await?;
            let s = store.clone();
            ours.push(
                throughput(writers, move |w, n| {
                    let s = s.clone();
                    async move {
                        let stream = StreamId::new(format!("bench-{w}"))?;
                        s.append_to_stream(&stream, ExpectedVersion::Exact(n), &[new_event(n)])
                            .await?;
                        Ok(1)
                    }
                })
                .await?,
            );
            let pool = store.pool().clone();
            raw.push(
                throughput(writers, move |w, n| {
                    let pool = pool.clone();
                    async move {
                        raw_insert(&pool, vec![raw_row(&format!("raw-{w}"), n as i64 + 1, n)])
                            .await?;
                        Ok(1)
                    }
                })
                .await?,
            );
        }
        report(
            &format!("single-event appends, {writers} writer(s)"),
            median(ours),
            median(raw),
        );
    }

    {
        let (mut ours, mut raw) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let (_dir, store) = fresh(sync).await?;
            let s = store.clone();
            ours.push(
                throughput(1, move |_, n| {
                    let s = s.clone();
                    async move {
                        let events: Vec<_> = (0..100).map(|i| new_event(n * 100 + i)).collect();
                        s.append_to_stream(
                            &StreamId::new("batch-1")?,
                            ExpectedVersion::Exact(n * 100),
                            &events,
                        )
                        .await?;
                        Ok(100)
                    }
                })
                .await?,
            );
            let pool = store.pool().clone();
            raw.push(
                throughput(1, move |_, n| {
                    let pool = pool.clone();
                    async move {
                        let rows = (0..100)
                            .map(|i| raw_row("raw-batch", (n * 100 + i + 1) as i64, i))
                            .collect();
                        raw_insert(&pool, rows).await?;
                        Ok(100)
                    }
                })
                .await?,
            );
        }
        report("100-event appends", median(ours), median(raw));
    }

    // Reads: a 10k-event stream, and catch-up over a 50k-event log.
    let (_dir, store) = fresh(sync).await?;
    let stream = StreamId::new("read-1")?;
    for b in 0..100u64 {
        let events: Vec<_> = (0..100).map(|i| new_event(b * 100 + i)).collect();
        store
            .append_to_stream(&stream, ExpectedVersion::Exact(b * 100), &events)
            .await?;
    }
    for b in 0..400u64 {
        let events: Vec<_> = (0..100).map(|i| new_event(b * 100 + i)).collect();
        store
            .append_to_stream(
                &StreamId::new(format!("log-{}", b % 50))?,
                ExpectedVersion::Any,
                &events,
            )
            .await?;
    }
    let total_log = 50_000.0;
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let t = Instant::now();
        let n = store
            .read_stream(&stream, ReadStreamOptions::forwards())
            .try_fold(0u64, |n, _| async move { Ok(n + 1) })
            .await?;
        assert_eq!(n, 10_000);
        ours.push(n as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let rows: Vec<RawEventRow> = sqlx::query_as(
            "SELECT stream_id, stream_version, position, event_type, schema_version, payload, metadata, recorded_at
             FROM events WHERE stream_id = ? ORDER BY stream_version",
        )
        .bind(stream.as_str())
        .fetch_all(store.pool())
        .await?;
        assert_eq!(rows.len(), 10_000);
        raw.push(rows.len() as f64 / t.elapsed().as_secs_f64());
    }
    report("read a 10k-event stream", median(ours), median(raw));

    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let t = Instant::now();
        let mut from = GlobalPosition::START;
        let mut n = 0usize;
        loop {
            let page = store.read_all(from, &EventFilter::all(), 1_000).await?;
            if page.events.is_empty() && page.scanned_to == from {
                break;
            }
            n += page.events.len();
            from = page.scanned_to;
        }
        assert_eq!(n as f64, total_log);
        ours.push(n as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut after = 0i64;
        let mut n = 0usize;
        loop {
            let rows: Vec<RawEventRow> = sqlx::query_as(
                "SELECT stream_id, stream_version, position, event_type, schema_version, payload, metadata, recorded_at
                 FROM events WHERE position > ? ORDER BY position LIMIT 1000",
            )
            .bind(after)
            .fetch_all(store.pool())
            .await?;
            let Some(last) = rows.last() else { break };
            after = last.2;
            n += rows.len();
        }
        raw.push(n as f64 / t.elapsed().as_secs_f64());
    }
    report(
        "global-log catch-up (pages of 1,000)",
        median(ours),
        median(raw),
    );
    Ok(())
}

async fn sqlite_version() -> BoxResult<String> {
    let pool = SqlitePool::connect("sqlite::memory:").await?;
    let v: String = sqlx::query_scalar("SELECT sqlite_version()")
        .fetch_one(&pool)
        .await?;
    Ok(v)
}
