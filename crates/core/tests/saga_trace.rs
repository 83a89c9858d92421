//! One trace covers a saga from the span that started it to its last step,
//! across the orchestrator's outbox, the transport, a participant's inbox
//! and outbox, and the orchestrator's inbox: spans are captured with the
//! OpenTelemetry SDK's in-memory exporter, and every span's parent chain is
//! checked, for a completed saga and for a compensated one.

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use vextrus_core::BoxError;
use vextrus_core::inbox::{InboxConfig, InboxConsumer, InboxHandler, InboxOutcome};
use vextrus_core::outbox::{InMemoryOutbox, InMemoryUnitOfWorkTx, OutboxRelay, RelayConfig};
use vextrus_core::saga::{
    Action, InMemorySagaStore, Orchestrator, OrchestratorConfig, RemoteCommand, ReplyOutcome,
    SagaCommand, SagaDefinition, SagaId, SagaRegistry, SagaReplyHandler, SagaState, SagaStore,
    Step, StepOutcome,
};
use vextrus_core::transport::{InProcessTransport, InboundMessage, MessageSource};
use vextrus_core::unit_of_work::UnitOfWork;
use vextrus_telemetry::names;

const COMMANDS: &str = "inventory.commands";
const REPLIES: &str = "saga.replies";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    decline: bool,
}

/// Reserves (or refuses) and replies through its own outbox, opening a span
/// of its own inside the consume span, as a participant's work would.
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
        let work = tracing::info_span!("inventory.work", command = %cmd.command_type);
        let reply = work.in_scope(|| cmd.reply(ReplyOutcome::Success(json!({}))));
        let out = async { reply.to_outbound(&reply_to) }
            .instrument(work)
            .await?;
        self.db.enqueue_in_tx(tx, &[out]).await?;
        Ok(())
    }
}

fn definition() -> SagaDefinition<Order> {
    SagaDefinition::new("traced", 1)
        .step(
            Step::new(
                "validate",
                Action::local(|o: Order, _ctx| {
                    async move { StepOutcome::Success(o) }
                        .instrument(tracing::info_span!("validate.work"))
                }),
            )
            .compensate_with(Action::local(|o: Order, _ctx| async move {
                StepOutcome::Success(o)
            })),
        )
        .step(
            Step::new(
                "reserve",
                Action::remote(|_o: &Order, _ctx| {
                    RemoteCommand::new(COMMANDS, "reserve", json!({}))
                }),
            )
            .compensate_with(Action::remote(|_o: &Order, _ctx| {
                RemoteCommand::new(COMMANDS, "release", json!({}))
            })),
        )
        .step(Step::new(
            "complete",
            Action::local(|o: Order, _ctx| async move {
                if o.decline {
                    StepOutcome::BusinessFailure("declined".into())
                } else {
                    StepOutcome::Success(o)
                }
            }),
        ))
}

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

/// Runs one saga (declined or not) through the whole plumbing under a
/// subscriber exporting to memory and a local metrics recorder; returns the
/// saga's final state, the finished spans and the rendered metrics.
fn run(decline: bool) -> (SagaState, Vec<SpanData>, String) {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    let _metrics_guard = metrics::set_default_local_recorder(&recorder);
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _guard = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let state = rt.block_on(async {
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
        let orch_relay = OutboxRelay::new(orch_db.clone(), broker.clone(), RelayConfig::new("o"));
        let mut replies = InboxConsumer::new(
            orch_db.clone(),
            broker.subscribe(REPLIES).unwrap(),
            SagaReplyHandler::new(orch.clone()),
            InboxConfig::new("orchestrator"),
        );
        let inv_db = InMemoryOutbox::new();
        let inv_relay = OutboxRelay::new(inv_db.clone(), broker.clone(), RelayConfig::new("i"));
        let mut commands = InboxConsumer::new(
            inv_db.clone(),
            broker.subscribe(COMMANDS).unwrap(),
            Inventory { db: inv_db.clone() },
            InboxConfig::new("inventory"),
        );

        // The order is placed inside a span; the saga starts there and is
        // then driven by a worker outside any span.
        let id: SagaId = orch
            .start("traced", &Order { decline })
            .instrument(tracing::info_span!("place_order"))
            .await
            .unwrap();
        for _ in 0..20 {
            orch.run_until_idle().await.unwrap();
            orch_relay.drain("o-r").await.unwrap();
            pump(&mut commands).await;
            inv_relay.drain("i-r").await.unwrap();
            pump(&mut replies).await;
            let state = store.load(id).await.unwrap().unwrap().state;
            if state.is_terminal() {
                return state;
            }
        }
        panic!("the saga did not finish");
    });
    drop(rt);
    provider.force_flush().unwrap();
    (
        state,
        exporter.get_finished_spans().unwrap(),
        metrics.render(),
    )
}

/// The spans by id, and helpers to walk parent links.
struct Tree {
    spans: Vec<SpanData>,
    by_id: HashMap<SpanId, usize>,
}

impl Tree {
    fn new(spans: Vec<SpanData>) -> Self {
        let by_id = spans
            .iter()
            .enumerate()
            .map(|(i, s)| (s.span_context.span_id(), i))
            .collect();
        Self { spans, by_id }
    }

    fn named(&self, name: &str) -> Vec<&SpanData> {
        self.spans.iter().filter(|s| s.name == name).collect()
    }

    fn step(&self, span_name: &str, step: &str) -> Vec<&SpanData> {
        self.named(span_name)
            .into_iter()
            .filter(|s| {
                s.attributes
                    .iter()
                    .any(|kv| kv.key.as_str() == "vextrus.saga.step" && kv.value.as_str() == step)
            })
            .collect()
    }

    fn parent(&self, span: &SpanData) -> Option<&SpanData> {
        self.by_id
            .get(&span.parent_span_id)
            .map(|&i| &self.spans[i])
    }

    /// The names of `span`'s ancestors, nearest first; panics on a parent
    /// link to a span that was not recorded (a broken chain).
    fn ancestors(&self, span: &SpanData) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = span;
        while cur.parent_span_id != SpanId::INVALID {
            let parent = self.parent(cur).unwrap_or_else(|| {
                panic!(
                    "span {} has parent {} which was not recorded",
                    cur.name, cur.parent_span_id
                )
            });
            out.push(parent.name.to_string());
            cur = parent;
        }
        out
    }
}

fn check_one_trace(tree: &Tree) -> TraceId {
    let root = tree.named("place_order");
    assert_eq!(root.len(), 1, "one placement span");
    let trace = root[0].span_context.trace_id();
    for s in &tree.spans {
        assert_eq!(
            s.span_context.trace_id(),
            trace,
            "span {} is in another trace",
            s.name
        );
        if s.name != "place_order" {
            assert_eq!(
                tree.ancestors(s).last().map(String::as_str),
                Some("place_order"),
                "span {} does not descend from the placement",
                s.name
            );
        }
    }
    trace
}

#[test]
fn a_completed_saga_is_one_trace_across_outbox_transport_and_inbox() {
    let (state, spans, metrics) = run(false);
    assert_eq!(state, SagaState::Completed);
    // Every step's latency reached the step histogram: the local ones timed
    // around the call, the remote one from its command to its reply.
    for step in ["validate", "reserve", "complete"] {
        let line = format!(
            "vextrus_saga_step_seconds_count{{saga_type=\"traced\",step=\"{step}\",outcome=\"ok\"}} 1"
        );
        assert!(metrics.contains(&line), "{line} missing from\n{metrics}");
    }
    let tree = Tree::new(spans);
    check_one_trace(&tree);

    // validate runs in a worker, outside any span: it continues the stored
    // placement context, and its own work is inside it.
    let validate = tree.step(names::SPAN_SAGA_STEP, "validate");
    assert_eq!(validate.len(), 1);
    assert_eq!(tree.parent(validate[0]).unwrap().name, "place_order");
    let work = tree.named("validate.work");
    assert_eq!(tree.parent(work[0]).unwrap().name, names::SPAN_SAGA_STEP);

    // The command's consume span at the participant descends from the
    // reserve step's span (across the outbox and the transport), and the
    // participant's own work is inside it.
    let reserve = tree.step(names::SPAN_SAGA_STEP, "reserve");
    assert_eq!(reserve.len(), 1);
    let consumes = tree.named(names::SPAN_MESSAGE_CONSUME);
    assert_eq!(
        consumes.len(),
        2,
        "one command consumed, one reply consumed"
    );
    let at_participant = consumes
        .iter()
        .find(|s| {
            tree.named("inventory.work")
                .iter()
                .any(|w| w.parent_span_id == s.span_context.span_id())
        })
        .expect("the participant's work is inside a consume span");
    let mut up = *at_participant;
    let mut reached_step = false;
    while let Some(p) = tree.parent(up) {
        if p.span_context.span_id() == reserve[0].span_context.span_id() {
            reached_step = true;
            break;
        }
        up = p;
    }
    assert!(
        reached_step,
        "the participant's consume span descends from the reserve step"
    );

    // The reply's consume span at the orchestrator descends from the
    // participant's work, and the next step (complete) is its child.
    let at_orchestrator = consumes
        .iter()
        .find(|s| s.span_context.span_id() != at_participant.span_context.span_id())
        .unwrap();
    assert!(
        tree.ancestors(at_orchestrator)
            .contains(&"inventory.work".to_owned()),
        "{:?}",
        tree.ancestors(at_orchestrator)
    );
    let complete = tree.step(names::SPAN_SAGA_STEP, "complete");
    assert_eq!(complete.len(), 1);
    assert_eq!(
        complete[0].parent_span_id,
        at_orchestrator.span_context.span_id(),
        "the step after a reply is a child of the reply's consume span"
    );
}

#[test]
fn a_compensated_saga_is_one_trace_including_its_compensations() {
    let (state, spans, metrics) = run(true);
    assert_eq!(state, SagaState::Compensated);
    for step in ["reserve", "validate"] {
        let line =
            format!("vextrus_saga_compensations_total{{saga_type=\"traced\",step=\"{step}\"}} 1");
        assert!(metrics.contains(&line), "{line} missing from\n{metrics}");
    }
    let tree = Tree::new(spans);
    check_one_trace(&tree);
    // reserve (remote) and validate (local) are compensated, in that order,
    // and both compensation spans are in the trace.
    let release = tree.step(names::SPAN_SAGA_COMPENSATION, "reserve");
    assert_eq!(release.len(), 1);
    let undo_validate = tree.step(names::SPAN_SAGA_COMPENSATION, "validate");
    assert_eq!(undo_validate.len(), 1);
    assert!(release[0].start_time <= undo_validate[0].start_time);
    // The release command was consumed at the participant under the
    // compensation's span: four consumes in all (reserve and release at the
    // participant, their two replies at the orchestrator).
    assert_eq!(tree.named(names::SPAN_MESSAGE_CONSUME).len(), 4);
    let releases_consumed = tree
        .named("inventory.work")
        .into_iter()
        .filter(|w| {
            tree.ancestors(w)
                .contains(&names::SPAN_SAGA_COMPENSATION.to_owned())
        })
        .count();
    assert_eq!(
        releases_consumed, 1,
        "the release ran under the compensation's trace"
    );
}
