//! `vextrus saga` end to end: order-to-cash sagas are started and driven
//! through the library (an orchestrator, participants' replies fed by hand),
//! one into `compensation_failed`; then the built binary is run against the
//! same database and its effects are checked through the library.

use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;
use vextrus_core::saga::{
    Orchestrator, OrchestratorConfig, ReplyDisposition, ReplyOutcome, SagaId, SagaRegistry,
    SagaReply, SagaState, SagaStore, StepKind,
};
use vextrus_core::{EventAppender, EventReader, SnapshotStore};
use vextrus_kernel::{AggregateId, CommandContext, Currency, Money, Quantity, Sku};
use vextrus_order_to_cash::FaultInjector;
use vextrus_order_to_cash::saga::{OrderToCashData, SAGA_TYPE, StepPolicy, definition};
use vextrus_order_to_cash::sales::{OrderCommand, OrderLine, Sales};

const BIN: &str = env!("CARGO_BIN_EXE_vextrus");

fn run(db: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("VEXTRUS_DATABASE_URL", db)
        .output()
        .expect("run vextrus")
}

fn lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(db: &str, args: &[&str]) -> Vec<Value> {
    let out = run(db, args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    lines(&out)
}

fn fails(db: &str, args: &[&str], code: i32, needle: &str) {
    let out = run(db, args);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
    assert!(
        stderr(&out).contains(needle),
        "{args:?}: {needle:?} not in {}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty(), "{args:?}: printed on failure");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn ids(sagas: &[Value]) -> Vec<String> {
    sagas
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Places an order in Sales and returns the saga data for it.
async fn place<E>(sales: &Sales<E>, n: u32) -> OrderToCashData
where
    E: EventAppender + EventReader + SnapshotStore + Send + Sync + 'static,
{
    let order_id = AggregateId::new(format!("order-{n}")).unwrap();
    let line = OrderLine {
        sku: Sku::new("SKU-0001").unwrap(),
        quantity: Quantity::new(2).unwrap(),
        unit_price: Money::from_minor(1_250, Currency::USD),
    };
    let place = OrderCommand::Place {
        customer: format!("customer-{n}"),
        currency: Currency::USD,
        lines: vec![line.clone()],
    };
    sales
        .execute(&order_id, place, &CommandContext::new())
        .await
        .unwrap();
    OrderToCashData::for_order(order_id, &[line])
}

fn reply(saga: SagaId, step: usize, kind: StepKind, outcome: ReplyOutcome) -> SagaReply {
    SagaReply {
        message_id: Uuid::now_v7(),
        saga_id: saga,
        step,
        kind,
        outcome,
    }
}

/// The operator story on `store`, whose database `db` names and which
/// shares it with the Sales event store `events`. `rt` is the runtime the
/// stores' pools were created on.
fn scenario<S, E>(rt: &tokio::runtime::Runtime, db: &str, store: S, events: E)
where
    S: SagaStore + Clone + 'static,
    E: EventAppender + EventReader + SnapshotStore + Clone + Send + Sync + 'static,
{
    let sales = Arc::new(Sales::new(events));
    let registry = SagaRegistry::new();
    let policy = StepPolicy {
        timeout: Duration::from_secs(600),
        ..StepPolicy::default()
    };
    registry
        .register(definition(
            sales.clone(),
            Arc::new(FaultInjector::disabled()),
            policy,
        ))
        .unwrap();
    let orchestrator = Orchestrator::with_config(
        store.clone(),
        registry,
        OrchestratorConfig::worker("test-worker"),
    );
    let applied = |r: SagaReply| {
        let d = rt.block_on(orchestrator.handle_reply(&r)).unwrap();
        assert_eq!(d, ReplyDisposition::Applied, "{r:?}");
    };

    assert!(ok(db, &["saga", "list"]).is_empty());

    // Saga A: validated (local), stock reserved, payment refused; the stock
    // release is refused too: compensation_failed.
    // Saga B: validated, waiting for its reservation.
    let (a, b) = rt.block_on(async {
        let a = orchestrator
            .start(SAGA_TYPE, &place(&sales, 1).await)
            .await
            .unwrap();
        let b = orchestrator
            .start(SAGA_TYPE, &place(&sales, 2).await)
            .await
            .unwrap();
        orchestrator.run_until_idle().await.unwrap();
        (a, b)
    });
    applied(reply(
        a,
        1,
        StepKind::Action,
        ReplyOutcome::Success(json!({})),
    ));
    applied(reply(
        a,
        2,
        StepKind::Action,
        ReplyOutcome::BusinessFailure("card declined".into()),
    ));
    applied(reply(
        a,
        1,
        StepKind::Compensation,
        ReplyOutcome::BusinessFailure("stock already shipped".into()),
    ));
    let (sa, sb) = rt.block_on(async {
        (
            store.load(a).await.unwrap().unwrap(),
            store.load(b).await.unwrap().unwrap(),
        )
    });
    assert_eq!(sa.state, SagaState::CompensationFailed);
    assert_eq!(sb.state, SagaState::Running);
    assert_eq!(sb.progress.step, 1);
    let (a_id, b_id) = (a.to_string(), b.to_string());

    // list: oldest first, with filters.
    let all = ok(db, &["saga", "list"]);
    assert_eq!(ids(&all), [a_id.clone(), b_id.clone()]);
    assert_eq!(all[0]["type"], SAGA_TYPE);
    assert_eq!(all[0]["version"], 1);
    assert_eq!(all[0]["state"], "compensation_failed");
    assert_eq!(all[0]["step"], 2);
    assert!(
        all[0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("stock already shipped")),
        "{}",
        all[0]
    );
    assert!(all[0]["age_ms"].as_u64().is_some_and(|ms| ms < 600_000));
    assert_eq!(all[1]["state"], "running");
    assert_eq!(all[1]["step"], 1);
    assert_eq!(
        ids(&ok(db, &["saga", "list", "--state", "compensation_failed"])),
        [a_id.as_str()]
    );
    assert_eq!(
        ids(&ok(db, &["saga", "list", "--state", "running"])),
        [b_id.as_str()]
    );
    assert_eq!(
        ok(
            db,
            &[
                "saga",
                "list",
                "--state",
                "running",
                "--state",
                "compensation_failed"
            ]
        )
        .len(),
        2
    );
    assert_eq!(ok(db, &["saga", "list", "--type", SAGA_TYPE]).len(), 2);
    assert!(ok(db, &["saga", "list", "--type", "payroll"]).is_empty());
    assert!(ok(db, &["saga", "list", "--older-than", "1h"]).is_empty());
    assert_eq!(ok(db, &["saga", "list", "--older-than", "0s"]).len(), 2);
    assert_eq!(ok(db, &["saga", "list", "--limit", "1"]).len(), 1);
    let out = run(db, &["saga", "list", "--state", "stuck"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = run(db, &["saga", "list", "--older-than", "10x"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // show: the whole timeline, as JSON lines and as text.
    let history = rt.block_on(store.history(a)).unwrap();
    let shown = ok(db, &["saga", "show", &a_id, "--json"]);
    assert_eq!(shown.len(), history.len());
    for (line, entry) in shown.iter().zip(&history) {
        assert_eq!(line["kind"], entry.event.kind.as_str());
        assert_eq!(line["seq"], entry.seq);
        assert_eq!(line["step"], json!(entry.event.step));
        assert_eq!(line["error"], json!(entry.event.error));
        assert!(line["at"].is_string());
    }
    let kinds: Vec<&str> = shown.iter().map(|l| l["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"saga_started"));
    assert_eq!(kinds.last(), Some(&"saga_compensation_failed"));
    assert!(kinds.contains(&"step_failed"), "{kinds:?}");
    let out = run(db, &["saga", "show", &a_id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!(
            "saga {a_id} (order_to_cash v1): compensation_failed, step 2"
        )),
        "{text}"
    );
    assert!(text.contains("authorize_payment"), "{text}");
    assert!(text.contains("error: card declined"), "{text}");
    assert_eq!(text.lines().count(), history.len() + 2, "{text}");

    // Error paths.
    let unknown = SagaId::new().to_string();
    fails(
        db,
        &["saga", "show", &unknown],
        4,
        &format!("no saga with id {unknown}"),
    );
    fails(db, &["saga", "retry", &unknown], 4, "no saga with id");
    fails(db, &["saga", "abort", &unknown], 4, "no saga with id");
    fails(db, &["saga", "show", "nope"], 4, "malformed saga id");
    fails(db, &["saga", "retry", "nope"], 4, "malformed saga id");
    fails(
        db,
        &["saga", "retry", &b_id],
        4,
        &format!("cannot retry saga {b_id} in state running"),
    );
    // A saga a worker holds: exit 5, naming the worker; nothing changes.
    let claim = rt
        .block_on(store.claim(a, "other-worker", Duration::from_secs(300)))
        .unwrap();
    fails(
        db,
        &["saga", "retry", &a_id],
        5,
        "worker other-worker holds its lease",
    );
    fails(db, &["saga", "abort", &a_id], 5, "other-worker");
    let leased = ok(db, &["saga", "list", "--state", "compensation_failed"]);
    assert_eq!(leased[0]["leased_by"], "other-worker");
    rt.block_on(store.release(a, claim.token)).unwrap();
    assert_eq!(
        rt.block_on(store.load(a)).unwrap().unwrap().state,
        SagaState::CompensationFailed
    );

    // retry: A compensates again (the release is sent again) ...
    let retried = ok(db, &["saga", "retry", &a_id]);
    assert_eq!(retried[0]["id"], a_id);
    assert_eq!(retried[0]["state"], "compensating");
    let (sa, history) = rt.block_on(async {
        (
            store.load(a).await.unwrap().unwrap(),
            store.history(a).await.unwrap(),
        )
    });
    assert_eq!(sa.state, SagaState::Compensating);
    let in_flight = sa.progress.in_flight.expect("the release is in flight");
    assert_eq!(
        (in_flight.step, in_flight.kind),
        (1, StepKind::Compensation)
    );
    let kinds: Vec<&str> = history.iter().map(|h| h.event.kind.as_str()).collect();
    let retry_at = kinds
        .iter()
        .position(|k| *k == "operator_retry")
        .expect("operator_retry recorded");
    assert!(
        kinds[..retry_at].contains(&"saga_compensation_failed"),
        "{kinds:?}"
    );
    // ... and once inventory confirms, the workers finish it: compensated,
    // the order cancelled.
    applied(reply(
        a,
        1,
        StepKind::Compensation,
        ReplyOutcome::Success(json!({})),
    ));
    rt.block_on(orchestrator.run_until_idle()).unwrap();
    assert_eq!(
        rt.block_on(store.load(a)).unwrap().unwrap().state,
        SagaState::Compensated
    );
    let order = rt
        .block_on(sales.load(&AggregateId::new("order-1").unwrap()))
        .unwrap()
        .unwrap();
    assert!(
        format!("{:?}", order.state()).contains("Cancelled"),
        "{:?}",
        order.state()
    );
    fails(db, &["saga", "retry", &a_id], 4, "cannot retry saga");
    fails(
        db,
        &["saga", "abort", &a_id],
        4,
        &format!("cannot abort saga {a_id} in state compensated"),
    );

    // abort: B stops and compensates now, the reason on its timeline.
    let aborted = ok(db, &["saga", "abort", &b_id, "--reason", "customer called"]);
    assert_eq!(aborted[0]["state"], "compensating");
    let (sb, history) = rt.block_on(async {
        (
            store.load(b).await.unwrap().unwrap(),
            store.history(b).await.unwrap(),
        )
    });
    assert_eq!(sb.state, SagaState::Compensating);
    let abort = history
        .iter()
        .find(|h| h.event.kind.as_str() == "operator_abort")
        .expect("operator_abort recorded");
    assert_eq!(abort.event.error.as_deref(), Some("customer called"));
    assert_eq!(
        ids(&ok(db, &["saga", "list", "--state", "compensating"])),
        [b_id.as_str()]
    );
}

fn pg_admin_url() -> String {
    std::env::var("VEXTRUS_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn psql(sql: &str) {
    let out = Command::new("psql")
        .args([pg_admin_url().as_str(), "-v", "ON_ERROR_STOP=1", "-qc", sql])
        .output()
        .expect("psql is required for the PostgreSQL CLI test");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn postgres_saga_list_show_retry_abort() {
    let name = format!("vextrus_saga_cli_{}", Uuid::now_v7().simple());
    psql(&format!("CREATE DATABASE {name}"));
    let admin = pg_admin_url();
    let base = admin.rsplit_once('/').unwrap().0;
    let db = format!("{base}/{name}");
    ok(&db, &["migrate"]);
    let rt = rt();
    let (sagas, events) = rt.block_on(async {
        let events = vextrus_postgres::PgEventStore::connect(&db).await.unwrap();
        let outbox = vextrus_postgres::PgOutbox::new(events.clone());
        (
            vextrus_postgres::PgSagaStore::new(outbox, vextrus_order_to_cash::saga::REPLIES),
            events,
        )
    });
    scenario(&rt, &db, sagas, events);
    drop(rt);
    psql(&format!("DROP DATABASE {name} WITH (FORCE)"));
}

#[test]
fn sqlite_saga_list_show_retry_abort() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("sagas.db").display());
    // The binary creates and migrates the file on first use.
    assert!(ok(&db, &["saga", "list"]).is_empty());
    let rt = rt();
    let (sagas, events) = rt.block_on(async {
        let events = vextrus_sqlite::SqliteEventStore::connect(&format!("{db}?mode=rwc"))
            .await
            .unwrap();
        let outbox = vextrus_sqlite::SqliteOutbox::new(events.clone());
        outbox.migrate().await.unwrap();
        (
            vextrus_sqlite::saga::SqliteSagaStore::new(
                outbox,
                vextrus_order_to_cash::saga::REPLIES,
            ),
            events,
        )
    });
    scenario(&rt, &db, sagas, events);
}

#[test]
fn unreachable_database_is_exit_5() {
    let out = run("postgres://postgres@127.0.0.1:1/none", &["saga", "list"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("unavailable"), "{}", stderr(&out));
    // A malformed id is reported before any connection is tried.
    let out = run(
        "postgres://postgres@127.0.0.1:1/none",
        &["saga", "show", "x"],
    );
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
}
