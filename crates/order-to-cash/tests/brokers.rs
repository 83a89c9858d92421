//! The demo over real brokers: NATS JetStream (127.0.0.1:4222,
//! `VEXTRUS_TEST_NATS_URL`) and a Kafka-protocol broker (127.0.0.1:9092,
//! `VEXTRUS_TEST_KAFKA_BROKERS`; `scripts/kafka.sh` starts tansu), with the
//! participants on SQLite files and on PostgreSQL (127.0.0.1:5432,
//! `VEXTRUS_TEST_PG_URL`). Commands and replies travel through the outboxes,
//! the broker and the inboxes; with the default failure injection
//! (declines, shortages, refused shipments, crashes before commit, slow
//! participants) every saga ends terminal and every invariant holds. A
//! broker or database that is down fails the tests.

use sqlx::{Connection, Executor, PgConnection};
use vextrus_order_to_cash::demo::{DemoConfig, DemoReport, run_demo};

fn nats_url() -> String {
    std::env::var("VEXTRUS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn kafka_url() -> String {
    let brokers =
        std::env::var("VEXTRUS_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    format!("kafka://{brokers}")
}

fn pg_admin() -> String {
    std::env::var("VEXTRUS_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh database; returns its URL and name.
async fn fresh_pg() -> (String, String) {
    let admin = pg_admin();
    let mut conn = PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL is required at {admin}: {e}"));
    let name = format!("o2c_b_{}", uuid::Uuid::now_v7().simple());
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();
    let (base, _) = admin.rsplit_once('/').unwrap();
    (format!("{base}/{name}"), name)
}

async fn drop_pg(name: &str) {
    let mut conn = PgConnection::connect(&pg_admin()).await.unwrap();
    conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await
        .unwrap();
}

async fn run(broker: String, database_url: Option<String>, orders: usize, seed: u64) -> DemoReport {
    let config = DemoConfig {
        orders,
        seed,
        broker: Some(broker),
        database_url,
        ..DemoConfig::default()
    };
    let report = run_demo(config, None).await.unwrap();
    println!("{report}");
    assert!(report.passed(), "{report}");
    assert_eq!(report.not_terminal, 0, "{report}");
    assert_eq!(
        report.completed + report.compensated + report.failed,
        orders
    );
    assert!(report.completed > 0 && report.compensated > 0, "{report}");
    assert!(report.injected.crashes > 0, "{report}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_on_sqlite() {
    run(nats_url(), None, 300, 11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_on_postgres() {
    let (url, name) = fresh_pg().await;
    run(nats_url(), Some(url), 300, 12).await;
    drop_pg(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_on_sqlite() {
    run(kafka_url(), None, 300, 13).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_on_postgres() {
    let (url, name) = fresh_pg().await;
    run(kafka_url(), Some(url), 300, 14).await;
    drop_pg(&name).await;
}
