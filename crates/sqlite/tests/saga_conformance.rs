//! The saga-store conformance suite on SQLite (a fresh temporary file per
//! case), and the SQLite store's own guarantees: migrations, fencing and
//! rollback of whole transitions, durable timers across a reopen.

use std::time::Duration;

use serde_json::json;
use uuid::Uuid;
use vextrus_core::outbox::{OutboxStatus, OutboxStore};
use vextrus_core::saga::{
    Claim, HistoryEvent, HistoryKind, LeaseUpdate, NewSaga, SagaCommand, SagaCommandOutbox,
    SagaError, SagaId, SagaState, SagaStore, SagaTransition, StepKind, Wake, idempotency_key,
};
use vextrus_core::transport::{MessageId, OutboundMessage};
use vextrus_sqlite::migrate::MIGRATIONS;
use vextrus_sqlite::saga::{SAGA_MIGRATION, SqliteSagaStore};
use vextrus_sqlite::{SqliteEventStore, SqliteOutbox};
use vextrus_testkit::SagaStoreBackend;

struct Sqlite;

impl SagaStoreBackend for Sqlite {
    type Store = SqliteSagaStore;

    async fn fresh_store(&self) -> SqliteSagaStore {
        let outbox = SqliteOutbox::temporary().await.expect("temporary outbox");
        SqliteSagaStore::new(outbox, "saga.replies")
    }
}

vextrus_testkit::saga_store_conformance!(Sqlite);

const LEASE: Duration = Duration::from_secs(30);

async fn store() -> SqliteSagaStore {
    Sqlite.fresh_store().await
}

async fn created(store: &SqliteSagaStore) -> SagaId {
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
        .expect("create");
    id
}

fn transition(claim: &Claim, wake: Wake) -> SagaTransition {
    SagaTransition {
        saga_id: claim.instance.id,
        token: claim.token,
        worker: "w".into(),
        state: SagaState::Compensating,
        data: json!({"n": 1}),
        progress: claim.instance.progress.clone(),
        last_error: Some("boom".into()),
        wake,
        lease: LeaseUpdate::Release,
        history: vec![
            HistoryEvent::step(HistoryKind::StepStarted, 0, "reserve", Some(1)),
            HistoryEvent::saga(HistoryKind::CompensationRequired).with_error("boom"),
        ],
        commands: Vec::new(),
        inbox_message_id: None,
    }
}

fn command(saga_id: SagaId) -> SagaCommand {
    SagaCommand {
        message_id: Uuid::now_v7(),
        saga_id,
        saga_type: "t".into(),
        step: 0,
        step_name: "reserve".into(),
        kind: StepKind::Action,
        attempt: 1,
        idempotency_key: idempotency_key(saga_id, 0, StepKind::Action),
        destination: "inventory".into(),
        command_type: "inventory.reserve".into(),
        payload: json!({"sku": "A"}),
    }
}

/// Everything a transition may write, to compare before and after.
async fn snapshot(
    store: &SqliteSagaStore,
    id: SagaId,
    reply: Uuid,
) -> (
    Option<vextrus_core::saga::SagaInstance>,
    Vec<vextrus_core::saga::HistoryEntry>,
    Vec<MessageId>,
    bool,
) {
    (
        store.load(id).await.unwrap(),
        store.history(id).await.unwrap(),
        store
            .outbox()
            .rows()
            .await
            .unwrap()
            .iter()
            .map(|r| r.id())
            .collect(),
        store.message_handled(reply).await.unwrap(),
    )
}

#[tokio::test]
async fn saga_migration_is_version_3_and_applying_twice_is_harmless() {
    assert!(MIGRATIONS.contains(&SAGA_MIGRATION));
    assert_eq!(SAGA_MIGRATION.version, 3);
    let all: Vec<i64> = MIGRATIONS.iter().map(|m| m.version).collect();

    let store = store().await;
    // temporary() applied everything: nothing left, twice over.
    assert_eq!(store.migrate().await.unwrap(), 0);
    assert_eq!(store.migrate().await.unwrap(), 0);
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM vextrus_migrations ORDER BY version")
            .fetch_all(store.outbox().pool())
            .await
            .unwrap();
    assert_eq!(versions, all, "every migration recorded once");

    // The tables work after the second run, and history is append-only.
    let id = created(&store).await;
    assert_eq!(store.history(id).await.unwrap().len(), 1);
    let update = sqlx::query("UPDATE saga_history SET worker = 'x'")
        .execute(store.outbox().pool())
        .await;
    assert!(update.is_err(), "history rows must not change");
    let delete = sqlx::query("DELETE FROM saga_history")
        .execute(store.outbox().pool())
        .await;
    assert!(delete.is_err(), "history rows must not be deleted");
    assert_eq!(store.history(id).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_stale_token_writes_nothing() {
    let store = store().await;
    let id = created(&store).await;
    let stale = store.claim(id, "a", Duration::ZERO).await.unwrap();
    let fresh = store.claim(id, "b", LEASE).await.unwrap();
    assert_eq!(fresh.token, stale.token + 1);

    let reply = Uuid::now_v7();
    let before = snapshot(&store, id, reply).await;
    let mut t = transition(&stale, Wake::Now);
    t.commands.push(command(id));
    t.inbox_message_id = Some(reply);
    match store.commit(t).await {
        Err(SagaError::Fenced {
            saga_id,
            token,
            current,
        }) => {
            assert_eq!((saga_id, token, current), (id, stale.token, fresh.token));
        }
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert_eq!(snapshot(&store, id, reply).await, before);
    assert!(store.pending_commands(10).await.unwrap().is_empty());
    assert!(
        store
            .release(id, stale.token)
            .await
            .unwrap_err()
            .is_fenced()
    );

    // The current holder writes everything in one go.
    let cmd = command(id);
    let mut t = transition(&fresh, Wake::After(Duration::from_secs(60)));
    t.commands.push(cmd.clone());
    t.inbox_message_id = Some(reply);
    let inst = store.commit(t).await.unwrap();
    assert_eq!(inst.state, SagaState::Compensating);
    assert_eq!(inst.last_error.as_deref(), Some("boom"));
    assert!(inst.lease.is_none());
    assert_eq!(
        inst.due_at.unwrap() - inst.updated_at,
        chrono::Duration::seconds(60)
    );
    let history = store.history(id).await.unwrap();
    assert_eq!(history.iter().map(|h| h.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(history[1..].iter().all(|h| h.at == inst.updated_at));
    assert!(store.message_handled(reply).await.unwrap());
    let rows = store.outbox().rows().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].id(), MessageId(cmd.message_id));
    assert_eq!(rows[0].message.headers["reply_to"], "saga.replies");
    assert_eq!(store.pending_commands(10).await.unwrap(), vec![cmd.clone()]);
    store.mark_sent(&[cmd.message_id]).await.unwrap();
    assert!(store.pending_commands(10).await.unwrap().is_empty());
    assert_eq!(
        store.outbox().rows().await.unwrap()[0].status,
        OutboxStatus::Published
    );

    // The same reply again: nothing written.
    let again = store.claim(id, "b", LEASE).await.unwrap();
    let before = snapshot(&store, id, reply).await;
    let mut t = transition(&again, Wake::Now);
    t.inbox_message_id = Some(reply);
    t.commands.push(command(id));
    assert!(matches!(
        store.commit(t).await,
        Err(SagaError::DuplicateMessage(m)) if m == reply
    ));
    assert_eq!(snapshot(&store, id, reply).await, before);
}

#[tokio::test]
async fn a_failing_outbox_insert_rolls_the_whole_transition_back() {
    let store = store().await;
    let id = created(&store).await;
    let claim = store.claim(id, "w", LEASE).await.unwrap();
    let reply = Uuid::now_v7();
    let before = snapshot(&store, id, reply).await;

    // An invalid command message (no destination).
    let mut bad = command(id);
    bad.destination = String::new();
    let mut t = transition(&claim, Wake::Now);
    t.commands = vec![command(id), bad];
    t.inbox_message_id = Some(reply);
    assert!(matches!(
        store.commit(t).await,
        Err(SagaError::InvalidMessage(_))
    ));
    assert_eq!(snapshot(&store, id, reply).await, before);

    // A command whose id the outbox already holds: the instance update and
    // the history insert ran before the outbox insert failed, and are undone.
    let taken = command(id);
    let mut other = OutboundMessage::new("elsewhere", "k", b"x".to_vec());
    other.id = MessageId(taken.message_id);
    store.outbox().enqueue(&[other]).await.unwrap();
    let before = snapshot(&store, id, reply).await;
    let mut t = transition(&claim, Wake::Now);
    t.commands = vec![taken];
    t.inbox_message_id = Some(reply);
    let err = store.commit(t).await.unwrap_err();
    assert!(matches!(err, SagaError::Backend(_)), "{err:?}");
    assert_eq!(snapshot(&store, id, reply).await, before);
    assert_eq!(store.history(id).await.unwrap().len(), 1);

    // Nothing was taken from the claim: the same token still writes.
    let mut t = transition(&claim, Wake::Now);
    t.commands = vec![command(id)];
    t.inbox_message_id = Some(reply);
    store.commit(t).await.unwrap();
    assert_eq!(store.history(id).await.unwrap().len(), 3);
    assert_eq!(store.outbox().rows().await.unwrap().len(), 2);
}

#[tokio::test]
async fn durable_timers_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}?mode=rwc", dir.path().join("saga.db").display());
    let open = || async {
        let events = SqliteEventStore::connect(&url).await.unwrap();
        let store = SqliteSagaStore::new(SqliteOutbox::new(events), "saga.replies");
        store.migrate().await.unwrap();
        store
    };
    let wait = Duration::from_millis(1500);

    let (id, token, due_at) = {
        let store = open().await;
        let id = created(&store).await;
        let claims = store.claim_due("before", LEASE, 10).await.unwrap();
        assert_eq!(claims.len(), 1);
        let inst = store
            .commit(transition(&claims[0], Wake::After(wait)))
            .await
            .unwrap();
        (id, claims[0].token, inst.due_at.unwrap())
        // The store (and its pool) is dropped here: the process "dies".
    };

    let store = open().await;
    let inst = store.load(id).await.unwrap().unwrap();
    assert_eq!(inst.due_at, Some(due_at));
    assert_eq!(inst.state, SagaState::Compensating);
    assert!(store.now().await.unwrap() < due_at);
    assert!(
        store
            .claim_due("after", LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Due by the database clock: claimable, with the next token.
    while store.now().await.unwrap() < due_at {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let claims = store.claim_due("after", LEASE, 10).await.unwrap();
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].instance.id, id);
    assert_eq!(claims[0].token, token + 1);
    assert_eq!(claims[0].instance.lease.as_ref().unwrap().owner, "after");
    // Leased now: a second worker gets nothing.
    assert!(
        store
            .claim_due("other", LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.history(id).await.unwrap().len(), 3);
}

#[tokio::test]
async fn claim_due_hands_each_saga_to_one_caller_in_due_order() {
    let store = store().await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(created(&store).await);
    }
    let mut tasks = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let claims = store.claim_due(&format!("w{w}"), LEASE, 3).await.unwrap();
                if claims.is_empty() {
                    return got;
                }
                got.extend(claims.into_iter().map(|c| c.instance.id));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    ids.sort();
    assert_eq!(all, ids);

    // A terminal saga is never claimed by claim_due; claim still fails for a
    // missing one with NotFound.
    let fresh = created(&store).await;
    let c = store.claim(fresh, "w", Duration::ZERO).await.unwrap();
    let mut t = transition(&c, Wake::Now);
    t.state = SagaState::Completed;
    store.commit(t).await.unwrap();
    assert!(store.claim_due("w", LEASE, 10).await.unwrap().is_empty());
    assert!(matches!(
        store.claim(SagaId::new(), "w", LEASE).await,
        Err(SagaError::NotFound(_))
    ));
    assert!(matches!(
        store.create(NewSaga {
            id: fresh,
            saga_type: "t".into(),
            version: 1,
            data: json!({}),
            trace_context: None,
        })
        .await,
        Err(SagaError::AlreadyExists(x)) if x == fresh
    ));
}
