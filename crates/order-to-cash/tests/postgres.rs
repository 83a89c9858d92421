//! The participants on PostgreSQL (127.0.0.1:5432, user postgres): the same
//! portable SQL as on SQLite, all four sharing one fresh database. Fails if
//! the server is not there.

mod support;

use std::sync::Arc;

use sqlx::Executor;
use support::*;
use vextrus_kernel::Currency;
use vextrus_order_to_cash::accounting::{Account, Accounting};
use vextrus_order_to_cash::inventory::{Inventory, InventoryReply};
use vextrus_order_to_cash::payment::{Payment, PaymentReply};
use vextrus_order_to_cash::shipping::Shipping;
use vextrus_order_to_cash::{Backend, Database, FaultInjector};

const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A fresh, empty database for this test, and its name.
async fn fresh_database() -> (Database, String) {
    let admin = Database::connect(ADMIN_URL)
        .await
        .expect("PostgreSQL must be running at 127.0.0.1:5432");
    let name = format!("o2c_{}", uuid::Uuid::now_v7().simple());
    admin
        .pool()
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();
    let db = Database::connect(&format!("postgres://postgres@127.0.0.1:5432/{name}"))
        .await
        .unwrap();
    assert_eq!(db.backend(), Backend::Postgres);
    (db, name)
}

/// Drops a test database (after its pool is closed).
async fn drop_database(db: Database, name: &str) {
    db.pool().close().await;
    let admin = Database::connect(ADMIN_URL).await.unwrap();
    admin
        .pool()
        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await
        .unwrap();
}

#[tokio::test]
async fn participants_run_on_postgres() {
    let (db, name) = fresh_database().await;
    let faults = Arc::new(FaultInjector::disabled());
    let inventory = Inventory::new(db.clone(), faults.clone());
    let payment = Payment::new(db.clone(), faults.clone());
    let shipping = Shipping::new(db.clone(), faults.clone());
    let accounting = Accounting::new(db.clone(), faults);
    // Migrating concurrently into one database is safe, and twice is harmless.
    let (a, b, c, d) = tokio::join!(
        inventory.migrate(),
        payment.migrate(),
        shipping.migrate(),
        accounting.migrate()
    );
    assert_eq!(
        (a.unwrap(), b.unwrap(), c.unwrap(), d.unwrap()),
        (1, 1, 1, 1)
    );
    assert_eq!(inventory.migrate().await.unwrap(), 0);

    inventory.receive(&key("po"), line("A", 5)).await.unwrap();
    inventory.receive(&key("po2"), line("A", 5)).await.unwrap();
    let o = order("o1");
    let reply = inventory
        .reserve(&key("r"), &o, vec![line("A", 4)])
        .await
        .unwrap();
    assert_eq!(
        reply,
        InventoryReply::Reserved {
            lines: vec![line("A", 4)]
        }
    );
    assert_eq!(
        inventory
            .reserve(&key("r"), &o, vec![line("A", 4)])
            .await
            .unwrap(),
        reply
    );
    assert!(matches!(
        inventory
            .reserve(&key("r2"), &order("o2"), vec![line("A", 7)])
            .await
            .unwrap(),
        InventoryReply::OutOfStock { .. }
    ));
    inventory.ship(&key("s"), &o).await.unwrap();
    let level = inventory.stock_level(&sku("A")).await.unwrap().unwrap();
    assert_eq!(
        (level.initial, level.on_hand, level.reserved, level.shipped),
        (10, 6, 0, 4)
    );

    assert!(matches!(
        payment.authorize(&key("a"), &o, usd(300)).await.unwrap(),
        PaymentReply::Authorized { .. }
    ));
    payment.capture(&key("c"), &o).await.unwrap();
    shipping
        .create(&key("sh"), &o, vec![line("A", 4)])
        .await
        .unwrap();
    accounting
        .post_invoice(&key("i"), &o, usd(300))
        .await
        .unwrap();
    assert_eq!(
        accounting
            .balance(Account::Receivable, Currency::USD)
            .await
            .unwrap(),
        300
    );
    accounting.reverse_invoice(&key("ri"), &o).await.unwrap();
    payment.refund(&key("rf"), &o).await.unwrap();
    assert_eq!(
        accounting
            .balance(Account::Receivable, Currency::USD)
            .await
            .unwrap(),
        0
    );
    assert_eq!(payment.record(&o).await.unwrap().unwrap().state, "refunded");
    assert!(matches!(
        payment.authorize(&key("a"), &o, usd(301)).await,
        Err(vextrus_order_to_cash::Error::KeyReused { .. })
    ));
    drop((inventory, payment, shipping, accounting));
    drop_database(db, &name).await;
}

#[tokio::test]
async fn concurrent_requests_with_one_key_run_once_on_postgres() {
    let (db, name) = fresh_database().await;
    let inventory = Arc::new(Inventory::new(
        db.clone(),
        Arc::new(FaultInjector::disabled()),
    ));
    inventory.migrate().await.unwrap();
    inventory.receive(&key("po"), line("A", 100)).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let inventory = inventory.clone();
        tasks.push(tokio::spawn(async move {
            inventory
                .reserve(&key("same"), &order("o1"), vec![line("A", 3)])
                .await
                .unwrap()
        }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    assert!(replies.windows(2).all(|p| p[0] == p[1]));
    let level = inventory.stock_level(&sku("A")).await.unwrap().unwrap();
    assert_eq!((level.on_hand, level.reserved), (97, 3));
    drop(inventory);
    drop_database(db, &name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_on_postgres_and_keeps_every_invariant() {
    let (db, name) = fresh_database().await;
    let config = vextrus_order_to_cash::demo::DemoConfig {
        orders: 60,
        seed: 5,
        database_url: Some(format!("postgres://postgres@127.0.0.1:5432/{name}")),
        ..Default::default()
    };
    let report = vextrus_order_to_cash::demo::run_demo(config.clone(), None)
        .await
        .unwrap();
    assert!(report.passed(), "{report}");
    assert_eq!(report.not_terminal, 0, "{report}");
    assert_eq!(report.completed + report.compensated + report.failed, 60);
    assert!(report.completed > 0 && report.compensated > 0, "{report}");
    // The same seed on the same database resumes: the orders and sagas
    // (ids derived from the seed) are found, none is placed twice.
    let again = vextrus_order_to_cash::demo::run_demo(config, None)
        .await
        .unwrap();
    assert_same_outcome(&report, &again);
    drop_database(db, &name).await;
}

/// A saga step's action racing its own compensation (the orchestrator timed
/// the step out and compensates while the command is still on its way):
/// whichever commits first, nothing stays reserved — either the release
/// undoes the reservation, or the release fences the key and the late
/// reserve is refused with `Error::Fenced`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_racing_its_compensation_leaves_nothing_reserved_on_postgres() {
    use vextrus_core::saga::{SagaId, StepKind, idempotency_key};
    use vextrus_order_to_cash::{Error, IdempotencyKey};

    let (db, name) = fresh_database().await;
    let inventory = Arc::new(Inventory::new(
        db.clone(),
        Arc::new(FaultInjector::disabled()),
    ));
    inventory.migrate().await.unwrap();
    inventory
        .receive(&key("po"), line("A", 1_000))
        .await
        .unwrap();
    let step_key = |saga, kind| IdempotencyKey::new(idempotency_key(saga, 1, kind)).unwrap();
    let (mut fenced, mut undone) = (0, 0);
    for n in 0..40 {
        let saga = SagaId::new();
        let o = order(&format!("o{n}"));
        let (a, c) = (inventory.clone(), inventory.clone());
        let (ka, kc) = (
            step_key(saga, StepKind::Action),
            step_key(saga, StepKind::Compensation),
        );
        let (o1, o2) = (o.clone(), o.clone());
        let action = tokio::spawn(async move { a.reserve(&ka, &o1, vec![line("A", 2)]).await });
        let compensation = tokio::spawn(async move { c.release(&kc, &o2).await });
        let (action, compensation) = (action.await.unwrap(), compensation.await.unwrap());
        compensation.unwrap();
        match action {
            Ok(InventoryReply::Reserved { .. }) => undone += 1,
            Err(Error::Fenced { .. }) => fenced += 1,
            other => panic!("{other:?}"),
        }
        let level = inventory.stock_level(&sku("A")).await.unwrap().unwrap();
        assert_eq!((level.on_hand, level.reserved), (1_000, 0), "round {n}");
    }
    assert_eq!(fenced + undone, 40);
    drop(inventory);
    drop_database(db, &name).await;
}
