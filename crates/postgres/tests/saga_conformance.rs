//! The saga-store conformance suite on PostgreSQL (a fresh database per
//! case), and what only a SQL store can get wrong: a stale writer or a
//! failing outbox insert leaves instance, timeline and outbox untouched, and
//! timers survive a reconnect.

mod common;

use std::time::Duration;

use serde_json::json;
use vextrus_core::outbox::DeadLetters;
use vextrus_core::saga::{
    HistoryEvent, HistoryKind, LeaseUpdate, NewSaga, SagaCommand, SagaCommandOutbox, SagaError,
    SagaId, SagaState, SagaStore, SagaTransition, StepKind, Wake,
};
use vextrus_postgres::{PgEventStore, PgOutbox, PgSagaStore, PgStoreConfig};
use vextrus_testkit::SagaStoreBackend;

struct Pg;

impl SagaStoreBackend for Pg {
    type Store = PgSagaStore;

    async fn fresh_store(&self) -> PgSagaStore {
        let db = common::TestDb::create().await;
        let store = db.store(PgStoreConfig::default()).await;
        PgSagaStore::new(PgOutbox::new(store), "saga.replies")
    }
}

vextrus_testkit::saga_store_conformance!(Pg);

async fn created(store: &PgSagaStore) -> SagaId {
    let id = SagaId::new();
    store
        .create(NewSaga {
            id,
            saga_type: "t".into(),
            version: 1,
            data: json!({"n": 0}),
            trace_context: None,
        })
        .await
        .unwrap();
    id
}

fn command(saga: SagaId, destination: &str, payload: serde_json::Value) -> SagaCommand {
    SagaCommand {
        message_id: uuid::Uuid::now_v7(),
        saga_id: saga,
        saga_type: "t".into(),
        step: 0,
        step_name: "reserve".into(),
        kind: StepKind::Action,
        attempt: 1,
        idempotency_key: format!("saga:{saga}:0:action"),
        destination: destination.into(),
        command_type: "reserve".into(),
        payload,
    }
}

fn transition(store_token: u64, saga: SagaId, commands: Vec<SagaCommand>) -> SagaTransition {
    SagaTransition {
        saga_id: saga,
        token: store_token,
        worker: "w".into(),
        state: SagaState::Running,
        data: json!({"n": 1}),
        progress: Default::default(),
        last_error: None,
        wake: Wake::After(Duration::from_secs(60)),
        lease: LeaseUpdate::Release,
        history: vec![HistoryEvent::step(
            HistoryKind::StepStarted,
            0,
            "reserve",
            Some(1),
        )],
        commands,
        inbox_message_id: None,
    }
}

#[tokio::test]
async fn migrations_include_the_saga_tables_and_apply_once() {
    assert!(
        vextrus_postgres::MIGRATIONS
            .iter()
            .any(|m| m.version == 3 && m.name == "saga")
    );
    let db = common::TestDb::create().await;
    let store = db.store(PgStoreConfig::default()).await;
    assert_eq!(
        store.migrate().await.unwrap(),
        0,
        "already applied by the test helper"
    );
    let again = PgEventStore::connect(&db.url).await.unwrap();
    assert_eq!(again.migrate().await.unwrap(), 0);
    let sagas = PgSagaStore::new(PgOutbox::new(again), "r");
    created(&sagas).await;
}

#[tokio::test]
async fn a_stale_or_failing_commit_writes_nothing() {
    let store = Pg.fresh_store().await;
    let id = created(&store).await;
    let first = store.claim(id, "a", Duration::from_secs(30)).await.unwrap();
    store.release(id, first.token).await.unwrap();
    let second = store.claim(id, "b", Duration::from_secs(30)).await.unwrap();

    // The stale writer is fenced: nothing of its transition is written.
    let stale = transition(first.token, id, vec![command(id, "inventory", json!({}))]);
    let err = store.commit(stale).await.unwrap_err();
    assert!(matches!(err, SagaError::Fenced { current, .. } if current == second.token));
    // An outgoing command the outbox refuses (no destination) rolls the
    // whole transition back, even with a current token.
    let bad = transition(second.token, id, vec![command(id, "", json!({}))]);
    assert!(store.commit(bad).await.is_err());

    let inst = store.load(id).await.unwrap().unwrap();
    assert_eq!(inst.data, json!({"n": 0}));
    assert_eq!(inst.fencing_token, second.token);
    assert_eq!(
        store.history(id).await.unwrap().len(),
        1,
        "only saga_started"
    );
    assert!(store.pending_commands(10).await.unwrap().is_empty());
    assert_eq!(store.outbox().status().await.unwrap().pending, 0);

    // The good transition writes all of it.
    let good = transition(
        second.token,
        id,
        vec![command(id, "inventory", json!({"sku": "A"}))],
    );
    store.commit(good).await.unwrap();
    assert_eq!(store.history(id).await.unwrap().len(), 2);
    assert_eq!(store.pending_commands(10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn timers_survive_a_reconnect_and_fire_on_the_database_clock() {
    let db = common::TestDb::create().await;
    let id = {
        let store = PgSagaStore::new(PgOutbox::new(db.store(PgStoreConfig::default()).await), "r");
        let id = created(&store).await;
        let c = store.claim(id, "a", Duration::from_secs(30)).await.unwrap();
        let mut t = transition(c.token, id, Vec::new());
        t.wake = Wake::After(Duration::from_millis(400));
        store.commit(t).await.unwrap();
        assert!(
            store
                .claim_due("a", Duration::from_secs(5), 10)
                .await
                .unwrap()
                .is_empty()
        );
        id
    };
    // A new connection pool, as after a restart.
    let store = PgSagaStore::new(
        PgOutbox::new(PgEventStore::connect(&db.url).await.unwrap()),
        "r",
    );
    let inst = store.load(id).await.unwrap().unwrap();
    let due = inst.due_at.unwrap();
    assert!(due > store.now().await.unwrap());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let claims = store
        .claim_due("b", Duration::from_secs(5), 10)
        .await
        .unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].instance.id, id);
}
