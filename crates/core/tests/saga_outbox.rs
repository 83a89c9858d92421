//! Remote saga steps through the real in-memory plumbing: the orchestrator's
//! commands go into its outbox in the transition's commit, an outbox relay
//! publishes them on the in-process transport, a participant consumes them
//! through its inbox and replies through its own outbox, and the
//! orchestrator's inbox consumer feeds the replies to the saga.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use vextrus_core::BoxError;
use vextrus_core::inbox::{InboxConfig, InboxConsumer, InboxHandler, InboxOutcome};
use vextrus_core::outbox::{InMemoryOutbox, InMemoryUnitOfWorkTx, OutboxRelay, RelayConfig};
use vextrus_core::saga::{
    Action, HistoryKind, InMemorySagaStore, Orchestrator, OrchestratorConfig, RemoteCommand,
    ReplyOutcome, SagaCommand, SagaCommandOutbox, SagaDefinition, SagaRegistry, SagaReplyHandler,
    SagaState, SagaStore, Step, StepKind, StepOutcome, idempotency_key,
};
use vextrus_core::transport::{InProcessTransport, InboundMessage, MessageSource, Transport};
use vextrus_core::unit_of_work::UnitOfWork;

const COMMANDS: &str = "inventory.commands";
const REPLIES: &str = "saga.replies";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    sku: String,
    decline_payment: bool,
    reservation: Option<String>,
}

/// The inventory participant: reserve/release keyed by idempotency key,
/// replying through its own outbox in the same transaction.
struct Inventory {
    db: InMemoryOutbox,
}

impl InboxHandler<InMemoryUnitOfWorkTx> for Inventory {
    async fn handle(
        &self,
        tx: &mut InMemoryUnitOfWorkTx,
        message: &InboundMessage,
    ) -> Result<(), BoxError> {
        let (cmd, reply_to) = SagaCommand::from_inbound(message)?;
        let seen = tx.get("applied", &cmd.idempotency_key).is_some();
        let reserved = tx
            .get("stock", "reserved")
            .and_then(|v| v.as_i64())
            .unwrap_or(0);
        let outcome = match cmd.command_type.as_str() {
            "reserve" => {
                if !seen {
                    tx.put("stock", "reserved", json!(reserved + 1));
                }
                ReplyOutcome::Success(json!({"reservation": format!("r-{}", cmd.saga_id)}))
            }
            "release" => {
                if !seen {
                    tx.put("stock", "reserved", json!(reserved - 1));
                }
                ReplyOutcome::Success(json!({}))
            }
            other => ReplyOutcome::BusinessFailure(format!("unknown command {other}")),
        };
        tx.put("applied", &cmd.idempotency_key, json!(true));
        let reply = cmd.reply(outcome).to_outbound(&reply_to)?;
        self.db.enqueue_in_tx(tx, &[reply]).await?;
        Ok(())
    }
}

fn definition() -> SagaDefinition<Order> {
    SagaDefinition::new("order", 1)
        .step(
            Step::new(
                "reserve",
                Action::remote_with_reply(
                    |o: &Order, _ctx| {
                        RemoteCommand::new(COMMANDS, "reserve", json!({"sku": o.sku}))
                    },
                    |mut o: Order, body| {
                        o.reservation = body["reservation"].as_str().map(str::to_owned);
                        Ok(o)
                    },
                ),
            )
            .compensate_with(Action::remote(|o: &Order, _ctx| {
                RemoteCommand::new(COMMANDS, "release", json!({"sku": o.sku}))
            })),
        )
        .step(Step::new(
            "pay",
            Action::local(|o: Order, _ctx| async move {
                if o.decline_payment {
                    StepOutcome::BusinessFailure("card declined".into())
                } else {
                    StepOutcome::Success(o)
                }
            }),
        ))
}

/// Handles what arrives within a short wait; the outcomes.
async fn pump<U, S, H>(consumer: &mut InboxConsumer<U, S, H>) -> Vec<InboxOutcome>
where
    U: vextrus_core::inbox::InboxStore,
    S: MessageSource,
    H: InboxHandler<U::Transaction>,
{
    let mut out = Vec::new();
    while let Ok(r) = tokio::time::timeout(Duration::from_millis(20), consumer.process_next()).await
    {
        out.push(r.unwrap().expect("source open"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_steps_round_trip_through_outbox_transport_and_inbox() {
    let broker = InProcessTransport::new();
    broker.declare(COMMANDS);
    broker.declare(REPLIES);

    let orch_db = InMemoryOutbox::new();
    let store = InMemorySagaStore::with_outbox(orch_db.clone(), REPLIES);
    let registry = SagaRegistry::new();
    registry.register(definition()).unwrap();
    let orch = Orchestrator::with_config(
        store.clone(),
        registry,
        OrchestratorConfig::worker("orchestrator-1"),
    );
    let orch_relay = OutboxRelay::new(orch_db.clone(), broker.clone(), RelayConfig::new("orch"));
    let mut replies = InboxConsumer::new(
        orch_db.clone(),
        broker.subscribe(REPLIES).unwrap(),
        SagaReplyHandler::new(orch.clone()),
        InboxConfig::new("orchestrator"),
    );

    let inv_db = InMemoryOutbox::new();
    let inv_relay = OutboxRelay::new(inv_db.clone(), broker.clone(), RelayConfig::new("inv"));
    let mut commands = InboxConsumer::new(
        inv_db.clone(),
        broker.subscribe(COMMANDS).unwrap(),
        Inventory { db: inv_db.clone() },
        InboxConfig::new("inventory"),
    );

    let order = |decline| Order {
        sku: "A-1".into(),
        decline_payment: decline,
        reservation: None,
    };
    let ok = orch.start("order", &order(false)).await.unwrap();
    let declined = orch.start("order", &order(true)).await.unwrap();

    // The "started" transitions put the commands in the orchestrator's outbox.
    orch.run_until_idle().await.unwrap();
    assert_eq!(orch_db.rows().len(), 2);
    assert_eq!(store.pending_commands(10).await.unwrap().len(), 2);
    let first_cmd = store
        .all_commands()
        .into_iter()
        .find(|c| c.saga_id == ok)
        .unwrap();
    assert_eq!(
        first_cmd.idempotency_key,
        idempotency_key(ok, 0, StepKind::Action)
    );

    for _ in 0..10 {
        orch.run_until_idle().await.unwrap();
        orch_relay.drain("orch-r").await.unwrap();
        pump(&mut commands).await;
        inv_relay.drain("inv-r").await.unwrap();
        pump(&mut replies).await;
        let mut done = true;
        for id in [ok, declined] {
            done &= store.load(id).await.unwrap().unwrap().state.is_terminal();
        }
        if done {
            break;
        }
    }

    let view = orch.show(ok).await.unwrap();
    assert_eq!(view.instance.state, SagaState::Completed);
    assert_eq!(view.instance.data["reservation"], json!(format!("r-{ok}")));
    let view = orch.show(declined).await.unwrap();
    assert_eq!(view.instance.state, SagaState::Compensated);
    assert!(
        view.history
            .iter()
            .any(|h| h.event.kind == HistoryKind::CompensationSucceeded
                && h.event.step_name.as_deref() == Some("reserve"))
    );
    // reserve, reserve, release: all through the outbox, all published.
    let sent: Vec<_> = broker.published(COMMANDS);
    assert_eq!(sent.len(), 3);
    assert_eq!(orch_db.rows().len(), 3);
    // One reservation left: the declined order's was released.
    assert_eq!(inv_db.document("stock", "reserved"), Some(json!(1)));

    // Redelivered command and reply: no second effect anywhere.
    broker.publish(&sent[0]).await.unwrap();
    assert_eq!(pump(&mut commands).await, [InboxOutcome::Duplicate]);
    let reply = broker.published(REPLIES)[0].clone();
    broker.publish(&reply).await.unwrap();
    assert_eq!(pump(&mut replies).await, [InboxOutcome::Duplicate]);
    assert_eq!(inv_db.document("stock", "reserved"), Some(json!(1)));
    assert_eq!(
        orch.show(ok).await.unwrap().instance.state,
        SagaState::Completed
    );
}
