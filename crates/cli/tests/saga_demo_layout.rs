//! `vextrus saga retry|abort` on the embedded demo's data directory, where
//! the saga store is `orchestrator.db` and Sales' events are in `sales.db`
//! beside it: the saga's local step (cancelling the order) must act on
//! `sales.db`, never on an empty Sales store inside `orchestrator.db`.
//!
//! The real demo is run into a temporary directory by the binary; two more
//! orders are placed in its `sales.db` and their sagas are driven by the
//! library into `compensation_failed` at `validate_order`'s compensation:
//! their inventory reservation is refused, and the order's cancellation was
//! attempted against `orchestrator.db`'s own (empty) event store, which is
//! what `vextrus saga retry` did before it knew where Sales lives. Then the
//! binary retries one and aborts the other against
//! `sqlite:DIR/orchestrator.db` alone.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;
use vextrus_core::saga::{
    Orchestrator, OrchestratorConfig, ReplyDisposition, ReplyOutcome, SagaId, SagaRegistry,
    SagaReply, SagaState, SagaStore, StepKind,
};
use vextrus_core::{EventAppender, EventReader, SnapshotStore};
use vextrus_kernel::{AggregateId, CommandContext, Currency, Money, Quantity, Sku};
use vextrus_order_to_cash::FaultInjector;
use vextrus_order_to_cash::demo::{ORCHESTRATOR_DB, sqlite_saga_store};
use vextrus_order_to_cash::saga::{OrderToCashData, SAGA_TYPE, StepPolicy, definition};
use vextrus_order_to_cash::sales::{OrderCommand, OrderLine, Sales};
use vextrus_sqlite::SqliteEventStore;
use vextrus_sqlite::saga::SqliteSagaStore;

const BIN: &str = env!("CARGO_BIN_EXE_vextrus");

fn vextrus(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("VEXTRUS_DATABASE_URL")
        .env_remove("VEXTRUS_SALES_DATABASE_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run vextrus")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(args: &[&str]) -> Vec<Value> {
    let out = vextrus(args, &[]);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

fn fails(args: &[&str], env: &[(&str, &str)], code: i32, needles: &[&str]) {
    let out = vextrus(args, env);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
    for needle in needles {
        assert!(
            stderr(&out).contains(needle),
            "{args:?}: {needle:?} not in {}",
            stderr(&out)
        );
    }
    assert!(out.stdout.is_empty(), "{args:?}: printed on failure");
}

/// Every event in the global log of the database at `url`.
fn global_log(url: &str) -> Vec<Value> {
    ok(&["events", "tail", "--no-follow", "--database-url", url])
}

fn sqlite(path: &Path) -> String {
    format!("sqlite:{}", path.display())
}

/// Places `order` in `sales` and returns its saga data.
async fn place<E>(sales: &Sales<E>, order: &str) -> OrderToCashData
where
    E: EventAppender + EventReader + SnapshotStore + Send + Sync + 'static,
{
    let order_id = AggregateId::new(order).unwrap();
    let line = OrderLine {
        sku: Sku::new("SKU-0001").unwrap(),
        quantity: Quantity::new(1).unwrap(),
        unit_price: Money::from_minor(4_200, Currency::USD),
    };
    let place = OrderCommand::Place {
        customer: "customer-ops".into(),
        currency: Currency::USD,
        lines: vec![line.clone()],
    };
    sales
        .execute(&order_id, place, &CommandContext::new())
        .await
        .unwrap();
    OrderToCashData::for_order(order_id, &[line])
}

/// An orchestrator on `store` whose order-to-cash saga acts on `sales`.
fn orchestrator<E>(
    store: &SqliteSagaStore,
    sales: Arc<Sales<E>>,
    worker: &str,
) -> Orchestrator<SqliteSagaStore>
where
    E: EventAppender + EventReader + SnapshotStore + Send + Sync + 'static,
{
    let registry = SagaRegistry::new();
    let policy = StepPolicy {
        timeout: Duration::from_secs(600),
        ..StepPolicy::default()
    };
    registry
        .register(definition(
            sales,
            Arc::new(FaultInjector::disabled()),
            policy,
        ))
        .unwrap();
    Orchestrator::with_config(store.clone(), registry, OrchestratorConfig::worker(worker))
}

/// The event types of `stream` in the event store at `db`, read by the binary.
fn event_types(db: &str, stream: &str) -> Vec<String> {
    ok(&["events", "read", stream, "--database-url", db])
        .iter()
        .map(|e| e["event_type"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn retry_and_abort_on_the_demo_layout_act_on_sales_db() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let dir_arg = dir.display().to_string();
    let demo = vextrus(
        &[
            "demo",
            "--orders",
            "4",
            "--seed",
            "11",
            "--no-faults",
            "--workers",
            "1",
            "--data-dir",
            &dir_arg,
            "--quiet",
        ],
        &[],
    );
    assert!(demo.status.success(), "demo: {}", stderr(&demo));
    let orchestrator_db = sqlite(&dir.join(ORCHESTRATOR_DB));
    let sales_db = sqlite(&dir.join("sales.db"));
    assert!(dir.join("sales.db").is_file());
    let demo_sagas = ok(&["saga", "list", "--database-url", &orchestrator_db]);
    assert_eq!(demo_sagas.len(), 4);
    // The demo keeps no Sales events in the saga store's file.
    assert!(global_log(&orchestrator_db).is_empty());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (store, sales, wrong_sales) = rt.block_on(async {
        let store = sqlite_saga_store(&dir).await.unwrap();
        let sales = SqliteEventStore::connect(&format!("{sales_db}?mode=rw"))
            .await
            .unwrap();
        let wrong = SqliteEventStore::connect(&format!("{orchestrator_db}?mode=rw"))
            .await
            .unwrap();
        (
            store,
            Arc::new(Sales::new(sales)),
            Arc::new(Sales::new(wrong)),
        )
    });
    let right = orchestrator(&store, sales.clone(), "test-worker");
    let wrong = orchestrator(&store, wrong_sales, "wrong-worker");

    // Three sagas validated in sales.db, their reservations refused, and
    // their orders' cancellation tried on orchestrator.db: not found there,
    // so compensation_failed at step 0 (validate_order).
    let orders = ["order-ops-1", "order-ops-2", "order-ops-3"];
    let sagas: Vec<SagaId> = rt.block_on(async {
        let mut ids = Vec::new();
        for order in orders {
            let data = place(&sales, order).await;
            ids.push(right.start(SAGA_TYPE, &data).await.unwrap());
        }
        right.run_until_idle().await.unwrap();
        for &id in &ids {
            let refused = SagaReply {
                message_id: Uuid::now_v7(),
                saga_id: id,
                step: 1,
                kind: StepKind::Action,
                outcome: ReplyOutcome::BusinessFailure("out of stock".into()),
            };
            assert_eq!(
                wrong.handle_reply(&refused).await.unwrap(),
                ReplyDisposition::Applied
            );
            let saga = store.load(id).await.unwrap().unwrap();
            assert_eq!(saga.state, SagaState::CompensationFailed, "{saga:?}");
            assert!(
                saga.last_error.as_deref().is_some_and(|e| e.contains(
                    "compensation of step validate_order failed: sales: order order-ops-"
                ) && e.ends_with("not found")),
                "{saga:?}"
            );
        }
        ids
    });
    let [a, b, c] = [sagas[0], sagas[1], sagas[2]].map(|id| id.to_string());
    for order in orders {
        assert_eq!(
            event_types(&sales_db, &format!("order-{order}")),
            ["sales.order_placed", "sales.order_validated"]
        );
    }

    // Pointed explicitly at orchestrator.db's own events, retry refuses
    // (the order is not there) and changes nothing.
    fails(
        &[
            "saga",
            "retry",
            &c,
            "--database-url",
            &orchestrator_db,
            "--sales-database-url",
            &orchestrator_db,
        ],
        &[],
        4,
        &[
            &format!("its order order-ops-3 is not in the sales database {orchestrator_db}"),
            "--sales-database-url",
        ],
    );
    // A sales database that does not exist is bad input, and is not created.
    let missing = dir.join("missing.db");
    fails(
        &["saga", "abort", &c, "--database-url", &orchestrator_db],
        &[("VEXTRUS_SALES_DATABASE_URL", &sqlite(&missing))],
        4,
        &["the sales database", "missing.db", "does not exist"],
    );
    assert!(!missing.exists());
    let state_of = |id: SagaId| rt.block_on(store.load(id)).unwrap().unwrap().state;
    assert_eq!(state_of(sagas[2]), SagaState::CompensationFailed);
    // `list` and `show` do not open Sales.
    let listed = vextrus(
        &["saga", "list", "--database-url", &orchestrator_db],
        &[("VEXTRUS_SALES_DATABASE_URL", &sqlite(&missing))],
    );
    assert!(listed.status.success(), "{}", stderr(&listed));

    // Given only orchestrator.db, retry and abort find sales.db beside it:
    // the orders are cancelled there and the sagas end compensated.
    let retried = ok(&["saga", "retry", &a, "--database-url", &orchestrator_db]);
    assert_eq!(retried[0]["id"], a);
    assert_eq!(retried[0]["state"], "compensated", "{}", retried[0]);
    assert_eq!(retried[0]["sales_database"], sales_db);
    let aborted = ok(&[
        "saga",
        "abort",
        &b,
        "--reason",
        "customer called",
        "--database-url",
        &orchestrator_db,
    ]);
    assert_eq!(aborted[0]["state"], "compensated", "{}", aborted[0]);
    assert_eq!(aborted[0]["sales_database"], sales_db);
    assert_eq!(state_of(sagas[0]), SagaState::Compensated);
    assert_eq!(state_of(sagas[1]), SagaState::Compensated);
    for order in &orders[..2] {
        assert_eq!(
            event_types(&sales_db, &format!("order-{order}")),
            [
                "sales.order_placed",
                "sales.order_validated",
                "sales.order_cancelled"
            ]
        );
    }
    // The third, given the way explicitly, too.
    let retried = ok(&[
        "saga",
        "retry",
        &c,
        "--database-url",
        &orchestrator_db,
        "--sales-database-url",
        &sales_db,
    ]);
    assert_eq!(retried[0]["state"], "compensated", "{}", retried[0]);
    assert_eq!(
        event_types(&sales_db, "order-order-ops-3").last().unwrap(),
        "sales.order_cancelled"
    );

    // orchestrator.db gained no Sales events.
    for order in orders {
        assert!(event_types(&orchestrator_db, &format!("order-{order}")).is_empty());
    }
    assert!(global_log(&orchestrator_db).is_empty());
    // The demo's own sagas are untouched.
    let after = ok(&["saga", "list", "--database-url", &orchestrator_db]);
    assert_eq!(after.len(), 7);
    assert_eq!(
        after.iter().filter(|s| s["state"] == "completed").count(),
        demo_sagas
            .iter()
            .filter(|s| s["state"] == "completed")
            .count()
    );
}

#[test]
fn a_sales_database_that_does_not_exist_is_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let db = sqlite(&tmp.path().join(ORCHESTRATOR_DB));
    let id = SagaId::new().to_string();
    for command in ["retry", "abort"] {
        fails(
            &[
                "saga",
                command,
                &id,
                "--database-url",
                &db,
                "--sales-database-url",
                "sqlite:/nonexistent/x.db",
            ],
            &[],
            4,
            &["the sales database sqlite:/nonexistent/x.db (--sales-database-url) does not exist"],
        );
    }
    assert!(!Path::new("/nonexistent/x.db").exists());
    // A PostgreSQL database that does not exist is bad input too.
    let pg = std::env::var("VEXTRUS_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let missing = format!(
        "{}/vextrus_no_such_db_{}",
        pg.rsplit_once('/').unwrap().0,
        Uuid::now_v7().simple()
    );
    fails(
        &[
            "saga",
            "retry",
            &id,
            "--database-url",
            &db,
            "--sales-database-url",
            &missing,
        ],
        &[],
        4,
        &["the sales database", "does not exist"],
    );
}
