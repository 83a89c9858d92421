//! The demo over real brokers: NATS JetStream (127.0.0.1:4222,
//! `VEXTRUS_TEST_NATS_URL`) and a Kafka-protocol broker (127.0.0.1:9092,
//! `VEXTRUS_TEST_KAFKA_BROKERS`; `scripts/kafka.sh` starts tansu), with the
//! participants on SQLite files and on PostgreSQL (127.0.0.1:5432,
//! `VEXTRUS_TEST_PG_URL`). Commands and replies travel through the outboxes,
//! the broker and the inboxes; with the default failure injection
//! (declines, shortages, refused shipments, crashes before commit, slow
//! participants) every saga ends terminal and every invariant holds. A
//! broker or database that is down fails the tests.

mod support;

use sqlx::{Connection, Executor, PgConnection};
use support::assert_same_outcome;
use vextrus_order_to_cash::demo::{DemoConfig, DemoReport, run_demo, serve_orchestrator};

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
        // Small pools: the test server is shared with other suites.
        max_connections: database_url.as_ref().map(|_| 8),
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

/// The PostgreSQL tests take turns: each runs a whole system (sales, four
/// participants with their reply outboxes, the orchestrator), whose pools
/// together would crowd the server's connection slots (100 by default) if
/// the three ran at once; the SQLite ones run beside them.
static PG_TURN: std::sync::LazyLock<tokio::sync::Mutex<()>> =
    std::sync::LazyLock::new(|| tokio::sync::Mutex::new(()));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_on_sqlite() {
    run(nats_url(), None, 300, 11).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_on_postgres() {
    let _turn = PG_TURN.lock().await;
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
    let _turn = PG_TURN.lock().await;
    let (url, name) = fresh_pg().await;
    run(kafka_url(), Some(url), 300, 14).await;
    drop_pg(&name).await;
}

/// The orchestrator as its own service ([`serve_orchestrator`], what `vextrus
/// serve --role orchestrator` runs) over PostgreSQL and NATS, while a demo
/// with `remote_orchestrator` places the orders: the service is stopped
/// mid-run (sagas in flight, commands and replies in transit) and started
/// again, and every saga still ends terminal with every invariant holding
/// (the SIGKILL version runs `vextrus serve` processes).
/// Running the demo again with the same seed places nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_orchestrator_restarted_mid_run_loses_nothing() {
    let _turn = PG_TURN.lock().await;
    let (url, name) = fresh_pg().await;
    let config = DemoConfig {
        orders: 150,
        seed: 15,
        broker: Some(nats_url()),
        database_url: Some(url),
        max_connections: Some(8),
        namespace: Some(format!("o2c-remote-{}", uuid::Uuid::now_v7().simple())),
        ..DemoConfig::default()
    };
    let serve = |config: DemoConfig| {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve_orchestrator(config, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap()
        });
        (stop, task)
    };
    let (stop_first, first) = serve(config.clone());
    let placing = {
        let config = DemoConfig {
            remote_orchestrator: true,
            ..config.clone()
        };
        tokio::spawn(run_demo(config, None))
    };
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let _ = stop_first.send(());
    first.await.unwrap();
    let (stop_second, second) = serve(config.clone());
    let report = placing.await.unwrap().unwrap();
    println!("{report}");
    assert!(report.passed(), "{report}");
    assert_eq!(report.not_terminal, 0, "{report}");
    assert_eq!(report.orders, 150);
    assert_eq!(
        report.completed + report.compensated + report.failed,
        150,
        "{report}"
    );

    // Same seed, same database: the orders and sagas are found, not placed again.
    let again = run_demo(
        DemoConfig {
            remote_orchestrator: true,
            ..config
        },
        None,
    )
    .await
    .unwrap();
    assert_same_outcome(&report, &again);
    let _ = stop_second.send(());
    second.await.unwrap();
    drop_pg(&name).await;
}
