//! What tracing and metrics cost the event store: single-event appends on
//! PostgreSQL with telemetry off and on, alternated in the same run.
//!
//! Run: `cargo bench -p vextrus-postgres --bench telemetry_cost`
//! (`VEXTRUS_BENCH_PG_URL` or `VEXTRUS_TEST_PG_URL` picks the server;
//! `VEXTRUS_BENCH_RUNS`, default 5, and `VEXTRUS_BENCH_SECS`, default 2, the
//! number and length of the runs; `VEXTRUS_BENCH_WRITERS`, default 8).
//!
//! "On" is what a service gets from `vextrus_telemetry::init`: every span
//! recorded by a `tracing` subscriber with the OpenTelemetry layer (sampling
//! everything, spans handed to a batch exporter, here one that discards them
//! so no network is measured), and every metric recorded by the Prometheus
//! recorder. "Off" is no subscriber and no recorder. The switch is a flag
//! read by the subscriber's filter and by a forwarding recorder, so both
//! modes run in the same process, alternating, and the reported loss is the
//! median of the per-pair ratios.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use serde_json::json;
use sqlx::{Connection, PgConnection};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{Layer, filter};
use vextrus_core::{EventAppender, ExpectedVersion, NewEvent, StreamId};
use vextrus_kernel::EventMetadata;
use vextrus_postgres::{PgEventStore, PgStoreConfig};

static ON: AtomicBool = AtomicBool::new(false);

/// Discards exported spans (the export itself is not what is measured).
#[derive(Debug)]
struct Discard;

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        drop(batch);
        Ok(())
    }
}

/// Forwards to the Prometheus recorder while [`ON`] is set; no-op handles
/// otherwise (the `metrics` macros register on every call, so the switch
/// takes effect at once).
struct Switch(metrics_exporter_prometheus::PrometheusRecorder);

impl Recorder for Switch {
    fn describe_counter(&self, k: KeyName, u: Option<Unit>, d: SharedString) {
        self.0.describe_counter(k, u, d);
    }
    fn describe_gauge(&self, k: KeyName, u: Option<Unit>, d: SharedString) {
        self.0.describe_gauge(k, u, d);
    }
    fn describe_histogram(&self, k: KeyName, u: Option<Unit>, d: SharedString) {
        self.0.describe_histogram(k, u, d);
    }
    fn register_counter(&self, key: &Key, m: &Metadata<'_>) -> Counter {
        if ON.load(Ordering::Relaxed) {
            self.0.register_counter(key, m)
        } else {
            Counter::noop()
        }
    }
    fn register_gauge(&self, key: &Key, m: &Metadata<'_>) -> Gauge {
        if ON.load(Ordering::Relaxed) {
            self.0.register_gauge(key, m)
        } else {
            Gauge::noop()
        }
    }
    fn register_histogram(&self, key: &Key, m: &Metadata<'_>) -> Histogram {
        if ON.load(Ordering::Relaxed) {
            self.0.register_histogram(key, m)
        } else {
            Histogram::noop()
        }
    }
}

fn url_for(url: &str, db: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let base = url.split('?').next().unwrap_or(url);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{}", &base[..host_end], db)
}

fn new_event(i: u64) -> NewEvent {
    NewEvent::new(
        "sales.order_line_added",
        json!({"order_id": format!("SO-{i:08}"), "sku": "CEM-50KG-OPC", "quantity": 12}),
        EventMetadata::new(),
    )
}

/// `writers` tasks appending one event each to their own stream for `secs`,
/// each append inside a command span (as a service handles a command);
/// appends/s.
async fn appends(store: &PgEventStore, writers: usize, secs: f64, tag: &str) -> f64 {
    let total = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (store, total) = (store.clone(), total.clone());
        let stream = StreamId::new(format!("tel-{tag}-{w}")).expect("stream id");
        tasks.push(tokio::spawn(async move {
            let mut version = 0u64;
            while Instant::now() < deadline {
                let expected = if version == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(version)
                };
                let span = tracing::info_span!("command.handle", writer = w);
                let event = span.in_scope(|| new_event(version));
                let r = instrumented(
                    store.append_to_stream(&stream, expected, std::slice::from_ref(&event)),
                    span,
                )
                .await
                .expect("append");
                version = r.last_version;
                total.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    total.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

async fn instrumented<F: Future>(f: F, span: tracing::Span) -> F::Output {
    use tracing::Instrument;
    f.instrument(span).await
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let env = |k: &str| std::env::var(k).ok();
    let admin = env("VEXTRUS_BENCH_PG_URL")
        .or_else(|| env("VEXTRUS_TEST_PG_URL"))
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let runs: usize = env("VEXTRUS_BENCH_RUNS")
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let secs: f64 = env("VEXTRUS_BENCH_SECS")
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let writers: usize = env("VEXTRUS_BENCH_WRITERS")
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);

    // Telemetry installed once, switched by ON.
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(Discard)
        .build();
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("bench"))
        .with_filter(filter::filter_fn(|_| ON.load(Ordering::Relaxed)));
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(otel))
        .expect("install the subscriber");
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(Switch(recorder)).expect("install the recorder");

    let db = format!("vextrus_bench_{}", uuid::Uuid::now_v7().simple());
    let mut admin_conn = PgConnection::connect(&admin)
        .await
        .expect("PostgreSQL reachable");
    sqlx::Executor::execute(
        &mut admin_conn,
        format!("CREATE DATABASE \"{db}\"").as_str(),
    )
    .await
    .expect("create bench database");
    let store = PgEventStore::connect_with(&url_for(&admin, &db), PgStoreConfig::default())
        .await
        .expect("connect");
    store.migrate().await.expect("migrate");

    let (mut off, mut on, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        ON.store(false, Ordering::Relaxed);
        let a = appends(&store, writers, secs, &format!("off{run}")).await;
        ON.store(true, Ordering::Relaxed);
        let b = appends(&store, writers, secs, &format!("on{run}")).await;
        ON.store(false, Ordering::Relaxed);
        eprintln!("run {}: off {a:.0}/s, on {b:.0}/s", run + 1);
        off.push(a);
        on.push(b);
        ratios.push(b / a);
    }
    let scraped = handle.render();
    assert!(
        scraped.contains("vextrus_event_appends_total"),
        "metrics were recorded while on"
    );
    let _ = provider.shutdown();
    drop(store);
    let _ = sqlx::Executor::execute(
        &mut admin_conn,
        format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)").as_str(),
    )
    .await;

    let ratio = median(ratios);
    println!(
        "# telemetry cost on event appends (PostgreSQL, {writers} writers, {runs} runs of {secs} s)"
    );
    println!();
    println!("| telemetry | appends/s (median) |");
    println!("|---|---:|");
    println!("| off (no subscriber, no recorder) | {:.0} |", median(off));
    println!(
        "| on (OpenTelemetry layer + Prometheus recorder) | {:.0} |",
        median(on)
    );
    println!();
    println!(
        "median on/off ratio: {ratio:.3} (throughput loss {:.1}%; goal < 5%)",
        (1.0 - ratio) * 100.0
    );
}
