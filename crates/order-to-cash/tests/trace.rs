//! One trace per order, across NATS JetStream (127.0.0.1:4222,
//! `VEXTRUS_TEST_NATS_URL`): order-to-cash runs with its participants on
//! SQLite files, the orchestrator's commands and the participants' replies
//! going through outboxes, the broker and inboxes, under a tracing subscriber
//! exporting to the OpenTelemetry SDK's in-memory exporter.
//!
//! The order is placed inside a root span; the test then checks, for a
//! completed saga and for one compensated after a forced payment failure,
//! that the placement, the event appends, every step and compensation, every
//! participant's consume span and every reply's consume span share the
//! root's trace id and form one unbroken parent chain back to it, with the
//! hops in the right places:
//!
//! placement -> append; step -> (relay publish, when the relay opens one) ->
//! participant consume -> (publish) -> orchestrator reply consume -> next step.
//!
//! A broker that is down fails the tests.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use sqlx::sqlite::{SqliteConnectOptions, SqliteSynchronous};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use vextrus_core::outbox::InMemoryOutbox;
use vextrus_core::saga::{
    InMemorySagaStore, Orchestrator, OrchestratorConfig, SagaId, SagaRegistry, SagaState, SagaStore,
};
use vextrus_kernel::{AggregateId, CommandContext, Currency, Money, Quantity, Sku};
use vextrus_order_to_cash::accounting::Accounting;
use vextrus_order_to_cash::inventory::{Inventory, StockLine};
use vextrus_order_to_cash::node::{NatsBroker, start_orchestrator, start_participant};
use vextrus_order_to_cash::participant::{Participant, ReplyOutbox, ServeConfig};
use vextrus_order_to_cash::payment::Payment;
use vextrus_order_to_cash::saga::{
    ACCOUNTING, INVENTORY, OrderToCashData, PAYMENT, REPLIES, SAGA_TYPE, SHIPPING, STEPS,
    StepPolicy, definition,
};
use vextrus_order_to_cash::sales::{OrderCommand, OrderLine, Sales};
use vextrus_order_to_cash::shipping::Shipping;
use vextrus_order_to_cash::{Database, Durability, FaultInjector, IdempotencyKey};
use vextrus_sqlite::SqliteEventStore;
use vextrus_telemetry::names;

fn nats_url() -> String {
    std::env::var("VEXTRUS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// The process-wide subscriber (the system's tasks run on every runtime
/// thread) with its in-memory exporter; tests tell their spans apart by
/// trace id.
fn exporter() -> &'static InMemorySpanExporter {
    static TELEMETRY: OnceLock<(SdkTracerProvider, InMemorySpanExporter)> = OnceLock::new();
    &TELEMETRY
        .get_or_init(|| {
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(exporter.clone())
                .build();
            let subscriber = tracing_subscriber::registry()
                .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("trace-test")));
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other global subscriber in this test binary");
            (provider, exporter)
        })
        .1
}

/// Which participant destination a remote step's (or its compensation's)
/// command goes to.
fn destination_of(step: &str) -> Option<&'static str> {
    match step {
        "reserve_inventory" | "dispatch_stock" => Some(INVENTORY),
        "authorize_payment" | "capture_payment" => Some(PAYMENT),
        "create_shipment" => Some(SHIPPING),
        "post_invoice" => Some(ACCOUNTING),
        _ => None,
    }
}

struct Run {
    state: SagaState,
    saga: SagaId,
    root: SpanData,
    trace: Vec<SpanData>,
    /// Every finished span naming this saga, in any trace.
    saga_spans: Vec<SpanData>,
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

async fn participant_db(dir: &std::path::Path, name: &str) -> Database {
    Database::sqlite_file(&dir.join(format!("{name}.db")), Durability::Normal)
        .await
        .unwrap()
}

/// Places one order inside a root span and drives its saga to a terminal
/// state over NATS; returns the saga's state and its spans once the
/// expected numbers of consume and step spans have finished (or 15 s have
/// passed).
async fn run(scenario: &str, faults: FaultInjector, consumes: usize, steps: usize) -> Run {
    let exporter = exporter();
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(faults);
    let options = SqliteConnectOptions::new()
        .filename(dir.path().join("sales.db"))
        .create_if_missing(true);
    let store = SqliteEventStore::connect_with(
        SqliteEventStore::tune(options).synchronous(SqliteSynchronous::Normal),
        4,
    )
    .await
    .unwrap();
    store.migrate().await.unwrap();
    let sales = Arc::new(Sales::new(store));
    let inventory = Arc::new(Inventory::new(
        participant_db(dir.path(), "inventory").await,
        faults.clone(),
    ));
    let payment = Arc::new(Payment::new(
        participant_db(dir.path(), "payment").await,
        faults.clone(),
    ));
    let shipping = Arc::new(Shipping::new(
        participant_db(dir.path(), "shipping").await,
        faults.clone(),
    ));
    let accounting = Arc::new(Accounting::new(
        participant_db(dir.path(), "accounting").await,
        faults.clone(),
    ));
    inventory.migrate().await.unwrap();
    payment.migrate().await.unwrap();
    shipping.migrate().await.unwrap();
    accounting.migrate().await.unwrap();
    let sku = Sku::new("SKU-0001").unwrap();
    inventory
        .receive(
            &IdempotencyKey::new("initial-stock/0").unwrap(),
            StockLine {
                sku: sku.clone(),
                quantity: Quantity::new(10).unwrap(),
            },
        )
        .await
        .unwrap();

    let namespace = format!("trace-{scenario}-{}", uuid::Uuid::now_v7().simple());
    let broker = NatsBroker::connect(&nats_url(), &namespace)
        .await
        .unwrap_or_else(|e| panic!("NATS JetStream is required at {}: {e}", nats_url()));
    let serve = ServeConfig::default();
    let mut running = Vec::new();
    let outbox = ReplyOutbox::open(inventory.database()).await.unwrap();
    running.push(
        start_participant(&broker, inventory.clone(), &outbox, INVENTORY, serve)
            .await
            .unwrap(),
    );
    let outbox = ReplyOutbox::open(payment.database()).await.unwrap();
    running.push(
        start_participant(&broker, payment.clone(), &outbox, PAYMENT, serve)
            .await
            .unwrap(),
    );
    let outbox = ReplyOutbox::open(shipping.database()).await.unwrap();
    running.push(
        start_participant(&broker, shipping.clone(), &outbox, SHIPPING, serve)
            .await
            .unwrap(),
    );
    let outbox = ReplyOutbox::open(accounting.database()).await.unwrap();
    running.push(
        start_participant(&broker, accounting.clone(), &outbox, ACCOUNTING, serve)
            .await
            .unwrap(),
    );

    let orchestrator_outbox = InMemoryOutbox::new();
    let saga_store = InMemorySagaStore::with_outbox(orchestrator_outbox.clone(), REPLIES);
    let registry = SagaRegistry::new();
    // A generous timeout: no step is retried, so each runs in one span.
    let policy = StepPolicy {
        timeout: Duration::from_secs(30),
        ..StepPolicy::default()
    };
    registry
        .register(definition(sales.clone(), faults.clone(), policy))
        .unwrap();
    let mut config = OrchestratorConfig::worker(format!("trace-{scenario}"));
    config.poll_interval = Duration::from_millis(5);
    let orchestrator = Orchestrator::with_config(saga_store.clone(), registry, config);
    let transport_side = start_orchestrator(&broker, orchestrator.clone(), orchestrator_outbox)
        .await
        .unwrap();
    let stop = Arc::new(tokio::sync::Notify::new());
    let worker = {
        let (o, stop) = (orchestrator.clone(), stop.clone());
        tokio::spawn(async move { o.run(async move { stop.notified().await }).await })
    };

    // The placement: the order's event and the saga's start, in one span.
    let order_id = AggregateId::new(format!("order-{scenario}-1")).unwrap();
    let root = tracing::info_span!("place_order", order = %order_id);
    let saga = async {
        let lines = vec![OrderLine {
            sku: sku.clone(),
            quantity: Quantity::new(1).unwrap(),
            unit_price: Money::from_minor(1_250, Currency::USD),
        }];
        let data = OrderToCashData::for_order(order_id.clone(), &lines);
        let place = OrderCommand::Place {
            customer: "customer-1".into(),
            currency: Currency::USD,
            lines,
        };
        sales
            .execute(&order_id, place, &CommandContext::new())
            .await
            .unwrap();
        orchestrator.start(SAGA_TYPE, &data).await.unwrap()
    }
    .instrument(root)
    .await;

    let started = Instant::now();
    let state = loop {
        let state = saga_store.load(saga).await.unwrap().unwrap().state;
        if state.is_terminal() {
            break state;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "saga {saga} not terminal after 60 s: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };

    // The last reply's consume span ends just after the transition it
    // caused: wait for the expected spans to finish.
    let order = order_id.to_string();
    let collect = || {
        let all = exporter.get_finished_spans().unwrap();
        let root = all
            .iter()
            .find(|s| s.name == "place_order" && attr(s, "order").as_deref() == Some(&*order))
            .cloned();
        (all, root)
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let (all, root) = loop {
        let (all, root) = collect();
        if let Some(r) = &root {
            let trace = r.span_context.trace_id();
            let in_trace = |name: &str| {
                all.iter()
                    .filter(|s| s.span_context.trace_id() == trace && s.name == name)
                    .count()
            };
            let saga_steps =
                in_trace(names::SPAN_SAGA_STEP) + in_trace(names::SPAN_SAGA_COMPENSATION);
            if in_trace(names::SPAN_MESSAGE_CONSUME) >= consumes && saga_steps >= steps {
                break (all, root);
            }
        }
        if Instant::now() > deadline {
            break (all, root);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    stop.notify_waiters();
    worker.abort();
    transport_side.stop().await.unwrap();
    for p in running {
        p.stop().await.unwrap();
    }

    let root = root.expect("the placement span was exported");
    let trace_id = root.span_context.trace_id();
    let saga_text = saga.to_string();
    Run {
        state,
        saga,
        trace: all
            .iter()
            .filter(|s| s.span_context.trace_id() == trace_id)
            .cloned()
            .collect(),
        saga_spans: all
            .iter()
            .filter(|s| attr(s, names::ATTR_SAGA_ID).as_deref() == Some(&*saga_text))
            .cloned()
            .collect(),
        root,
    }
}

/// One trace's spans by id, and parent-link helpers.
struct Tree<'a> {
    spans: &'a [SpanData],
    by_id: HashMap<SpanId, usize>,
}

impl<'a> Tree<'a> {
    fn new(spans: &'a [SpanData]) -> Self {
        let by_id = spans
            .iter()
            .enumerate()
            .map(|(i, s)| (s.span_context.span_id(), i))
            .collect();
        Self { spans, by_id }
    }

    fn named(&self, name: &str) -> Vec<&'a SpanData> {
        self.spans.iter().filter(|s| s.name == name).collect()
    }

    /// The one span `name` of step `step`.
    fn step(&self, name: &str, step: &str) -> &'a SpanData {
        let found: Vec<_> = self
            .named(name)
            .into_iter()
            .filter(|s| attr(s, names::ATTR_SAGA_STEP).as_deref() == Some(step))
            .collect();
        assert_eq!(found.len(), 1, "one {name} span for {step}");
        found[0]
    }

    fn parent(&self, span: &SpanData) -> Option<&'a SpanData> {
        self.by_id
            .get(&span.parent_span_id)
            .map(|&i| &self.spans[i])
    }

    /// The parent, looking through a relay's publish span when there is one
    /// (the broker hop's producer side).
    fn parent_across_publish(&self, span: &SpanData) -> Option<&'a SpanData> {
        let p = self.parent(span)?;
        if p.name == names::SPAN_OUTBOX_PUBLISH {
            self.parent(p)
        } else {
            Some(p)
        }
    }

    /// `span`'s ancestors, nearest first; panics on a link to a span that
    /// was not recorded (a broken chain).
    fn ancestors(&self, span: &SpanData) -> Vec<&'a SpanData> {
        let mut out = Vec::new();
        let mut cur = span;
        while cur.parent_span_id != SpanId::INVALID {
            let parent = self.parent(cur).unwrap_or_else(|| {
                panic!(
                    "span {} has parent {} which was not recorded",
                    cur.name, cur.parent_span_id
                )
            });
            out.push(parent);
            cur = parent;
        }
        out
    }

    fn descends_from(&self, span: &SpanData, ancestor: &SpanData) -> bool {
        self.ancestors(span)
            .iter()
            .any(|a| a.span_context.span_id() == ancestor.span_context.span_id())
    }
}

fn is_reply_consume(span: &SpanData) -> bool {
    span.name == names::SPAN_MESSAGE_CONSUME
        && attr(span, names::ATTR_DESTINATION).is_some_and(|d| d.ends_with(REPLIES))
}

fn participant_destination(span: &SpanData) -> Option<&'static str> {
    if span.name != names::SPAN_MESSAGE_CONSUME {
        return None;
    }
    let d = attr(span, names::ATTR_DESTINATION)?;
    [INVENTORY, PAYMENT, SHIPPING, ACCOUNTING]
        .into_iter()
        .find(|p| d.ends_with(p))
}

/// What holds for every saga: one trace from the placement, an unbroken
/// chain, the placement's append under the root, and every broker hop in
/// its place. Returns the tree.
fn check_common(run: &Run, expect_consumes: usize) -> Tree<'_> {
    let tree = Tree::new(&run.trace);
    let root_id = run.root.span_context.span_id();
    let trace: TraceId = run.root.span_context.trace_id();
    assert_eq!(
        run.root.parent_span_id,
        SpanId::INVALID,
        "the placement is the root"
    );

    // Every span naming this saga (in any trace) is in the root's trace.
    assert!(!run.saga_spans.is_empty());
    for s in &run.saga_spans {
        assert_eq!(
            s.span_context.trace_id(),
            trace,
            "span {} ({:?}) of saga {} is in another trace",
            s.name,
            attr(s, names::ATTR_SAGA_STEP),
            run.saga
        );
    }
    // Every span of the trace descends from the placement, unbroken.
    for s in &run.trace {
        if s.span_context.span_id() != root_id {
            assert_eq!(
                tree.ancestors(s).last().map(|a| a.span_context.span_id()),
                Some(root_id),
                "span {} does not descend from the placement",
                s.name
            );
        }
    }
    // placement -> append
    assert!(
        tree.named(names::SPAN_EVENT_APPEND)
            .iter()
            .any(|a| a.parent_span_id == root_id),
        "the order's append is a child of the placement"
    );

    // The relay's publish spans, where the relay opens them, sit between a
    // step (commands) or a participant's consume span (replies) and the
    // consume span on the other side of the broker.
    let publishes = tree.named(names::SPAN_OUTBOX_PUBLISH);
    for p in &publishes {
        let parent = tree.parent(p).expect("a publish span has a parent");
        assert!(
            parent.name == names::SPAN_SAGA_STEP
                || parent.name == names::SPAN_SAGA_COMPENSATION
                || participant_destination(parent).is_some(),
            "a publish span is a child of {}",
            parent.name
        );
    }
    println!(
        "{} spans in the trace: {} appends, {} publishes, {} consumes, {} steps, {} compensations",
        run.trace.len(),
        tree.named(names::SPAN_EVENT_APPEND).len(),
        publishes.len(),
        tree.named(names::SPAN_MESSAGE_CONSUME).len(),
        tree.named(names::SPAN_SAGA_STEP).len(),
        tree.named(names::SPAN_SAGA_COMPENSATION).len(),
    );

    let consumes = tree.named(names::SPAN_MESSAGE_CONSUME);
    assert_eq!(
        consumes.len(),
        expect_consumes,
        "every command and every reply consumed inside the trace: {:?}",
        consumes
            .iter()
            .map(|c| attr(c, names::ATTR_DESTINATION))
            .collect::<Vec<_>>()
    );
    for c in &consumes {
        if let Some(dest) = participant_destination(c) {
            // step (or compensation) -> [publish] -> participant consume
            let parent = tree
                .parent_across_publish(c)
                .expect("a participant's consume span has a parent in the trace");
            assert!(
                parent.name == names::SPAN_SAGA_STEP
                    || parent.name == names::SPAN_SAGA_COMPENSATION,
                "the consume span at {dest} is a child of {} instead of the dispatching step",
                parent.name
            );
            let step = attr(parent, names::ATTR_SAGA_STEP).unwrap_or_default();
            assert_eq!(
                destination_of(&step),
                Some(dest),
                "the consume span at {dest} sits under step {step}"
            );
        } else {
            // participant consume -> [publish] -> orchestrator reply consume
            assert!(is_reply_consume(c), "unexpected consume span {c:?}");
            let parent = tree
                .parent_across_publish(c)
                .expect("a reply's consume span has a parent in the trace");
            assert!(
                participant_destination(parent).is_some(),
                "the reply's consume span is a child of {} instead of the participant's consume span",
                parent.name
            );
        }
    }
    tree
}

/// `next` follows the reply to `previous`: it is a child of the reply's
/// consume span at the orchestrator, which descends from `previous`.
fn follows_reply(tree: &Tree<'_>, previous: &SpanData, next: &SpanData) {
    let consume = tree.parent(next).expect("the step has a parent");
    assert!(
        is_reply_consume(consume),
        "{} {:?} is a child of {} instead of the reply's consume span",
        next.name,
        attr(next, names::ATTR_SAGA_STEP),
        consume.name
    );
    assert!(
        tree.descends_from(consume, previous),
        "the reply before {:?} does not descend from {:?}",
        attr(next, names::ATTR_SAGA_STEP),
        attr(previous, names::ATTR_SAGA_STEP)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_order_is_one_trace_across_nats() {
    // 6 remote steps: a command and a reply consumed for each.
    let run = run("completed", FaultInjector::disabled(), 12, STEPS.len()).await;
    assert_eq!(run.state, SagaState::Completed);
    let tree = check_common(&run, 12);
    let root_id = run.root.span_context.span_id();

    let steps: Vec<&SpanData> = STEPS
        .iter()
        .map(|s| tree.step(names::SPAN_SAGA_STEP, s))
        .collect();
    assert!(tree.named(names::SPAN_SAGA_COMPENSATION).is_empty());
    // The first step is driven by a worker: it continues the placement's
    // stored context.
    assert_eq!(steps[0].parent_span_id, root_id);
    // Each remote step's command was consumed at its participant under it.
    for (i, name) in STEPS.iter().enumerate() {
        if let Some(dest) = destination_of(name) {
            let at_participant = tree
                .named(names::SPAN_MESSAGE_CONSUME)
                .into_iter()
                .filter(|c| participant_destination(c) == Some(dest))
                .filter(|c| {
                    tree.parent_across_publish(c)
                        .map(|p| p.span_context.span_id())
                        == Some(steps[i].span_context.span_id())
                })
                .count();
            assert_eq!(at_participant, 1, "{name}'s command consumed once under it");
        }
    }
    // Every step after a remote one follows its reply.
    for i in 2..STEPS.len() {
        follows_reply(&tree, steps[i - 1], steps[i]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensated_order_is_one_trace_including_its_compensations() {
    // reserve, authorize (declined) and release: a command and a reply each.
    let faults = FaultInjector::disabled().force_failure("payment.authorize");
    let run = run("compensated", faults, 6, 5).await;
    assert_eq!(run.state, SagaState::Compensated);
    let tree = check_common(&run, 6);

    let validate = tree.step(names::SPAN_SAGA_STEP, "validate_order");
    let reserve = tree.step(names::SPAN_SAGA_STEP, "reserve_inventory");
    let authorize = tree.step(names::SPAN_SAGA_STEP, "authorize_payment");
    assert_eq!(
        tree.named(names::SPAN_SAGA_STEP).len(),
        3,
        "no step after the decline"
    );
    let release = tree.step(names::SPAN_SAGA_COMPENSATION, "reserve_inventory");
    let cancel = tree.step(names::SPAN_SAGA_COMPENSATION, "validate_order");
    assert_eq!(tree.named(names::SPAN_SAGA_COMPENSATION).len(), 2);
    assert_eq!(validate.parent_span_id, run.root.span_context.span_id());

    follows_reply(&tree, reserve, authorize);
    // The decline's reply starts the compensation of reserve_inventory ...
    follows_reply(&tree, authorize, release);
    // ... whose release command is consumed at inventory under it ...
    let released = tree
        .named(names::SPAN_MESSAGE_CONSUME)
        .into_iter()
        .filter(|c| {
            tree.parent_across_publish(c)
                .map(|p| p.span_context.span_id())
                == Some(release.span_context.span_id())
        })
        .count();
    assert_eq!(
        released, 1,
        "the release was consumed under its compensation"
    );
    // ... and its reply leads to the cancel of the order.
    follows_reply(&tree, release, cancel);
    assert!(release.start_time <= cancel.start_time);
}
