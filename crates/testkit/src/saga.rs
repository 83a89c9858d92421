//! The saga-store conformance suite: every case is a public async function
//! taking a backend; [`crate::saga_store_conformance!`] turns them into tests.
//!
//! The cases run real orchestrators over the backend's store with short real
//! durations (timeouts of a few hundred milliseconds), because an SQL
//! backend's timers are judged by the database's clock, which a test cannot
//! pause.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use vextrus_core::saga::{
    Action, HistoryEvent, HistoryKind, LeaseUpdate, NewSaga, Orchestrator, OrchestratorConfig,
    RemoteCommand, ReplyDisposition, ReplyOutcome, SagaCommand, SagaCommandOutbox, SagaCount,
    SagaDefinition, SagaError, SagaFilter, SagaId, SagaInstance, SagaRegistry, SagaState,
    SagaStore, SagaTransition, Step, StepKind, StepOutcome, StepRetry, Wake, idempotency_key,
};

/// What a backend provides to run the suite: a fresh, empty saga store (its
/// own database or file) whose commands can be read from its outbox.
pub trait SagaStoreBackend: Send + Sync + 'static {
    /// The store under test.
    type Store: SagaStore + SagaCommandOutbox + Clone + Send + Sync + 'static;

    /// A fresh, empty store.
    fn fresh_store(&self) -> impl Future<Output = Self::Store> + Send;
}

/// The suite's saga data: where to fail, and what was done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// The step index whose action refuses (business failure), if any.
    pub fail_at: Option<usize>,
    /// Names of the steps done, in order.
    pub done: Vec<String>,
}

impl Order {
    fn ok() -> Self {
        Self {
            fail_at: None,
            done: Vec::new(),
        }
    }
}

type Log = Arc<Mutex<HashMap<SagaId, Vec<String>>>>;

fn record(log: &Log, id: SagaId, what: String) {
    log.lock().unwrap().entry(id).or_default().push(what);
}

fn entries(log: &Log, id: SagaId) -> Vec<String> {
    log.lock().unwrap().get(&id).cloned().unwrap_or_default()
}

fn fast_retry(attempts: u32) -> StepRetry {
    StepRetry::new(attempts).backoff(Duration::from_millis(10), 2, Duration::from_millis(40))
}

/// A local step that records "do-<name>" (or refuses when `fail_at` is its
/// index) and, if `compensable`, a compensation recording "undo-<name>".
fn local_step(name: &str, index: usize, compensable: bool, log: &Log) -> Step<Order> {
    let (n, l) = (name.to_owned(), log.clone());
    let step = Step::new(
        name,
        Action::local(move |mut o: Order, ctx| {
            let (n, l) = (n.clone(), l.clone());
            async move {
                if o.fail_at == Some(index) {
                    record(&l, ctx.saga_id, format!("refuse-{n}"));
                    return StepOutcome::BusinessFailure(format!("{n} refused"));
                }
                record(&l, ctx.saga_id, format!("do-{n}"));
                o.done.push(n);
                StepOutcome::Success(o)
            }
        }),
    )
    .timeout(Duration::from_secs(5))
    .retry(fast_retry(3))
    .compensation_retry(fast_retry(3));
    if !compensable {
        return step;
    }
    let (n, l) = (name.to_owned(), log.clone());
    step.compensate_with(Action::local(move |mut o: Order, ctx| {
        let (n, l) = (n.clone(), l.clone());
        async move {
            record(&l, ctx.saga_id, format!("undo-{n}"));
            o.done.retain(|d| *d != n);
            StepOutcome::Success(o)
        }
    }))
}

/// "validate" (nothing to undo), then "reserve", "authorize", "ship", each
/// compensable.
fn chain(log: &Log) -> SagaDefinition<Order> {
    SagaDefinition::new("chain", 1)
        .step(local_step("validate", 0, false, log))
        .step(local_step("reserve", 1, true, log))
        .step(local_step("authorize", 2, true, log))
        .step(local_step("ship", 3, true, log))
}

fn orchestrator<S: SagaStore + Clone>(
    store: &S,
    registry: &SagaRegistry,
    worker: &str,
) -> Orchestrator<S> {
    let mut config = OrchestratorConfig::worker(worker);
    config.lease = Duration::from_secs(5);
    config.poll_interval = Duration::from_millis(10);
    Orchestrator::with_config(store.clone(), registry.clone(), config)
}

async fn load<S: SagaStore>(store: &S, id: SagaId) -> SagaInstance {
    store.load(id).await.unwrap().expect("saga exists")
}

/// Runs the orchestrators until `pred` holds for saga `id` (or panics after `max`).
async fn drive_until<S: SagaStore>(
    orchestrators: &[&Orchestrator<S>],
    id: SagaId,
    max: Duration,
    pred: impl Fn(&SagaInstance) -> bool,
) -> SagaInstance {
    let deadline = Instant::now() + max;
    loop {
        for o in orchestrators {
            o.run_once().await.unwrap();
        }
        let inst = load(orchestrators[0].store(), id).await;
        if pred(&inst) {
            return inst;
        }
        assert!(
            Instant::now() < deadline,
            "saga {id} did not reach the expected state in {max:?}: {inst:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn kinds<S: SagaStore>(store: &S, id: SagaId) -> Vec<HistoryKind> {
    store
        .history(id)
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.event.kind)
        .collect()
}

/// All local steps succeed: the saga completes, each step ran once, in
/// order, and the timeline records every transition with consecutive
/// sequence numbers and non-decreasing times.
pub async fn happy_path_completes<B: SagaStoreBackend>(backend: &B) {
    let store = backend.fresh_store().await;
    let log = Log::default();
    let registry = SagaRegistry::new();
    registry.register(chain(&log)).unwrap();
    let orch = orchestrator(&store, &registry, "w1");
    let id = orch.start("chain", &Order::ok()).await.unwrap();
    orch.run_until_idle().await.unwrap();

    let inst = load(&store, id).await;
    assert_eq!(inst.state, SagaState::Completed);
    assert_eq!(inst.version, 1);
    assert_eq!(inst.due_at, None);
    assert_eq!(inst.lease, None);
    let data: Order = serde_json::from_value(inst.data).unwrap();
    assert_eq!(data.done, ["validate", "reserve", "authorize", "ship"]);
    assert_eq!(
        entries(&log, id),
        ["do-validate", "do-reserve", "do-authorize", "do-ship"]
    );
    let history = store.history(id).await.unwrap();
    let mut expected = vec![HistoryKind::SagaStarted];
    for _ in 0..4 {
        expected.extend([HistoryKind::StepStarted, HistoryKind::StepSucceeded]);
    }
    expected.push(HistoryKind::SagaCompleted);
    assert_eq!(
        history.iter().map(|h| h.event.kind).collect::<Vec<_>>(),
        expected
    );
    for (i, h) in history.iter().enumerate() {
        assert_eq!(h.seq, i as u64 + 1);
        if i > 0 {
            assert!(h.at >= history[i - 1].at);
            assert_eq!(h.worker.as_deref(), Some("w1"));
        }
    }
    assert_eq!(history[1].event.step_name.as_deref(), Some("validate"));
    assert_eq!(history[1].event.attempt, Some(1));
    // Nothing left to do.
    assert_eq!(orch.run_once().await.unwrap(), 0);
}

/// `count_by_state` counts the sagas per (type, state), leaving out pairs
/// with none, sorted by type then state name; the orchestrator's
/// `record_saga_counts` reports the same figures.
pub async fn counts_by_state<B: SagaStoreBackend>(backend: &B) {
    let store = backend.fresh_store().await;
    assert_eq!(store.count_by_state().await.unwrap(), Vec::new());
    let log = Log::default();
    let registry = SagaRegistry::new();
    registry.register(chain(&log)).unwrap();
    let orch = orchestrator(&store, &registry, "w1");
    orch.start("chain", &Order::ok()).await.unwrap();
    orch.start("chain", &Order::ok()).await.unwrap();
    orch.run_until_idle().await.unwrap();
    orch.start("chain", &Order::ok()).await.unwrap();
    let expected = vec![
        SagaCount {
            saga_type: "chain".into(),
            state: SagaState::Completed,
            count: 2,
        },
        SagaCount {
            saga_type: "chain".into(),
            state: SagaState::Running,
            count: 1,
        },
    ];
    assert_eq!(store.count_by_state().await.unwrap(), expected);
    assert_eq!(orch.record_saga_counts().await.unwrap(), expected);
}

/// A business failure at each step compensates exactly the completed steps
/// that have a compensation, in reverse order; with nothing to undo the saga
/// is `Failed`, otherwise `Compensated`.
pub async fn failure_at_each_step_compensates_completed_steps_in_reverse<B: SagaStoreBackend>(
    backend: &B,
) {
    let store = backend.fresh_store().await;
    let log = Log::default();
    let registry = SagaRegistry::new();
    registry.register(chain(&log)).unwrap();
    let orch = orchestrator(&store, &registry, "w1");
    let names = ["validate", "reserve", "authorize", "ship"];
    let mut ids = Vec::new();
    for k in 0..names.len() {
        let order = Order {
            fail_at: Some(k),
            done: Vec::new(),
        };
        ids.push(orch.start("chain", &order).await.unwrap());
    }
    orch.run_until_idle().await.unwrap();

    for (k, id) in ids.into_iter().enumerate() {
        let inst = load(&store, id).await;
        let mut expected: Vec<String> = names[..k].iter().map(|n| format!("do-{n}")).collect();
        expected.push(format!("refuse-{}", names[k]));
        // "validate" (index 0) has no compensation.
        expected.extend(names[1..k.max(1)].iter().rev().map(|n| format!("undo-{n}")));
        assert_eq!(entries(&log, id), expected, "failure at step {k}");
        let want = if k <= 1 {
            SagaState::Failed
        } else {
            SagaState::Compensated
        };
        assert_eq!(inst.state, want, "failure at step {k}");
        assert!(inst.state.is_terminal());
        assert!(
            inst.last_error
                .as_deref()
                .is_some_and(|e| e.contains(&format!("{} refused", names[k]))),
            "{:?}",
            inst.last_error
        );
        let data: Order = serde_json::from_value(inst.data).unwrap();
        let kept: Vec<&str> = if k <= 1 {
            names[..k].to_vec()
        } else {
            vec!["validate"]
        };
        assert_eq!(data.done, kept, "failure at step {k}");
        let h = kinds(&store, id).await;
        let last = if k <= 1 {
            HistoryKind::SagaFailed
        } else {
            HistoryKind::SagaCompensated
        };
        assert_eq!(h.last(), Some(&last));
        assert_eq!(
            h.iter()
                .filter(|k| **k == HistoryKind::CompensationSucceeded)
                .count(),
            k.saturating_sub(1)
        );
    }
}

/// A compensation that keeps failing is retried with backoff up to its
/// budget, then leaves the saga in the visible, non-terminal
/// `CompensationFailed` state that no worker touches; after the fault is
/// mended, an operator's retry finishes the compensation.
pub async fn compensation_failure_then_operator_retry<B: SagaStoreBackend>(backend: &B) {
    let store = backend.fresh_store().await;
    let log = Log::default();
    let broken = Arc::new(AtomicBool::new(true));
    let attempts = Arc::new(AtomicU32::new(0));
    let (b, a, l) = (broken.clone(), attempts.clone(), log.clone());
    let fragile = Step::new(
        "reserve",
        Action::local(|o: Order, _ctx| async move { StepOutcome::Success(o) }),
    )
    .compensation_retry(fast_retry(3))
    .compensate_with(Action::local(move |o: Order, ctx| {
        let (b, a, l) = (b.clone(), a.clone(), l.clone());
        async move {
            a.fetch_add(1, Ordering::SeqCst);
            if b.load(Ordering::SeqCst) {
                return StepOutcome::RetryableFailure("inventory unreachable".into());
            }
            record(&l, ctx.saga_id, "undo-reserve".into());
            StepOutcome::Success(o)
        }
    }));
    let registry = SagaRegistry::new();
    registry
        .register(
            SagaDefinition::new("fragile", 1)
                .step(fragile)
                .step(local_step("pay", 1, false, &log)),
        )
        .unwrap();
    let orch = orchestrator(&store, &registry, "w1");
    let id = orch
        .start(
            "fragile",
            &Order {
                fail_at: Some(1),
                done: Vec::new(),
            },
        )
        .await
        .unwrap();
    let inst = drive_until(&[&orch], id, Duration::from_secs(10), |i| {
        i.state != SagaState::Running && i.state != SagaState::Compensating
    })
    .await;
    assert_eq!(inst.state, SagaState::CompensationFailed);
    assert!(!inst.state.is_terminal());
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(inst.due_at, None);
    assert!(
        inst.last_error
            .as_deref()
            .is_some_and(|e| e.contains("inventory unreachable")),
        "{:?}",
        inst.last_error
    );
    let h = kinds(&store, id).await;
    assert_eq!(
        h.iter()
            .filter(|k| **k == HistoryKind::CompensationAttemptFailed)
            .count(),
        3
    );
    assert_eq!(
        h.iter()
            .filter(|k| **k == HistoryKind::RetryScheduled)
            .count(),
        2
    );
    assert!(!h.contains(&HistoryKind::SagaCompensated));

    // Visible to operators, left alone by workers.
    let failed = orch
        .list(&SagaFilter::default().state(SagaState::CompensationFailed))
        .await
        .unwrap();
    assert_eq!(failed.iter().map(|i| i.id).collect::<Vec<_>>(), [id]);
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(orch.run_once().await.unwrap(), 0);
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    // Abort on a CompensationFailed saga resumes compensating with a fresh
    // budget; still broken, it ends in CompensationFailed again. (Abort
    // drives the saga while it is due, and a retry's full-jitter delay can
    // be shorter than a store round trip, so abort may return after any
    // number of the fresh attempts, the last one included.)
    let inst = orch.abort(id, "still failing").await.unwrap();
    assert!(
        matches!(
            inst.state,
            SagaState::Compensating | SagaState::CompensationFailed
        ),
        "{:?}",
        inst.state
    );
    assert!(attempts.load(Ordering::SeqCst) > 3, "abort attempted again");
    let inst = drive_until(&[&orch], id, Duration::from_secs(10), |i| {
        i.state == SagaState::CompensationFailed
    })
    .await;
    assert_eq!(inst.due_at, None);
    assert_eq!(attempts.load(Ordering::SeqCst), 6);

    broken.store(false, Ordering::SeqCst);
    let inst = orch.retry(id).await.unwrap();
    assert_eq!(inst.state, SagaState::Compensated);
    assert_eq!(entries(&log, id), ["refuse-pay", "undo-reserve"]);
    let h = kinds(&store, id).await;
    assert!(h.contains(&HistoryKind::OperatorRetry));
    assert!(h.contains(&HistoryKind::OperatorAbort));
    assert_eq!(h.last(), Some(&HistoryKind::SagaCompensated));
    assert!(matches!(
        orch.retry(id).await,
        Err(SagaError::InvalidState {
            state: SagaState::Compensated,
            ..
        })
    ));
}

fn remote_def(name: &str, version: u32, timeout: Duration, log: &Log) -> SagaDefinition<Order> {
    let l = log.clone();
    SagaDefinition::new(name, version)
        .step(local_step("validate", 0, false, log))
        .step(
            Step::new(
                "reserve",
                Action::remote_with_reply(
                    |o: &Order, ctx| {
                        RemoteCommand::new(
                            "inventory",
                            "reserve",
                            json!({"key": ctx.idempotency_key, "done": o.done}),
                        )
                    },
                    |mut o: Order, body| {
                        let r = body["reservation"].as_str().ok_or("no reservation")?;
                        o.done.push(format!("reserve:{r}"));
                        Ok(o)
                    },
                ),
            )
            .timeout(timeout)
            .retry(fast_retry(2))
            .compensation_retry(fast_retry(3))
            .compensate_with(Action::local(move |o: Order, ctx| {
                let l = l.clone();
                async move {
                    record(
                        &l,
                        ctx.saga_id,
                        format!("undo-reserve:{}", ctx.idempotency_key),
                    );
                    StepOutcome::Success(o)
                }
            })),
        )
        .step(local_step("ship", 2, true, log))
}

async fn pending_for<S: SagaCommandOutbox>(store: &S, id: SagaId) -> Vec<SagaCommand> {
    store
        .pending_commands(1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.saga_id == id)
        .collect()
}

/// A remote step's command is queued with the "started" transition; the
/// reply moves the saga on and updates its data; a redelivered reply is a
/// duplicate, a reply to something not awaited is ignored (and recorded).
pub async fn remote_step_round_trip<B: SagaStoreBackend>(backend: &B) {
    let store = backend.fresh_store().await;
    let log = Log::default();
    let registry = SagaRegistry::new();
    registry
        .register(remote_def("remote", 1, Duration::from_secs(30), &log))
        .unwrap();
    let orch = orchestrator(&store, &registry, "w1");
    let id = orch.start("remote", &Order::ok()).await.unwrap();
    orch.run_until_idle().await.unwrap();

    let inst = load(&store, id).await;
    assert_eq!(inst.state, SagaState::Running);
    assert_eq!(inst.lease, None, "waiting for a reply holds no lease");
    let in_flight = inst.progress.in_flight.clone().expect("awaiting the reply");
    let cmds = pending_for(&store, id).await;
    assert_eq!(cmds.len(), 1);
    let cmd = &cmds[0];
    assert_eq!(in_flight.message_id, Some(cmd.message_id));
    assert_eq!(cmd.destination, "inventory");
    assert_eq!(cmd.command_type, "reserve");
    assert_eq!((cmd.step, cmd.kind, cmd.attempt), (1, StepKind::Action, 1));
    assert_eq!(
        cmd.idempotency_key,
        idempotency_key(id, 1, StepKind::Action)
    );
    assert_eq!(cmd.payload["key"], json!(cmd.idempotency_key));
    assert_eq!(cmd.payload["done"], json!(["validate"]));
    store.mark_sent(&[cmd.message_id]).await.unwrap();
    assert!(pending_for(&store, id).await.is_empty());

    // A reply for a step not awaited changes nothing but is consumed.
    let stray = SagaCommand {
        step: 2,
        ..cmd.clone()
    }
    .reply(ReplyOutcome::Success(json!({})));
    assert_eq!(
        orch.handle_reply(&stray).await.unwrap(),
        ReplyDisposition::Ignored
    );
    assert_eq!(load(&store, id).await.progress, inst.progress);
    assert_eq!(
        orch.handle_reply(&stray).await.unwrap(),
        ReplyDisposition::Duplicate
    );

    let reply = cmd.reply(ReplyOutcome::Success(json!({"reservation": "r-7"})));
    assert_eq!(
        orch.handle_reply(&reply).await.unwrap(),
        ReplyDisposition::Applied
    );
    // The reply drove the saga on: the local "ship" step ran at once.
    let inst = load(&store, id).await;
    assert_eq!(inst.state, SagaState::Completed);
    let data: Order = serde_json::from_value(inst.data).unwrap();
    assert_eq!(data.done, ["validate", "reserve:r-7", "ship"]);
    assert_eq!(
        orch.handle_reply(&reply).await.unwrap(),
        ReplyDisposition::Duplicate
    );
    let h = kinds(&store, id).await;
    assert!(h.contains(&HistoryKind::ReplyIgnored));
    assert_eq!(h.last(), Some(&HistoryKind::SagaCompleted));

    // A business failure reply compensates what was done before it.
    let id2 = orch.start("remote", &Order::ok()).await.unwrap();
    orch.run_until_idle().await.unwrap();
    let cmd2 = pending_for(&store, id2).await.remove(0);
    let refuse = cmd2.reply(ReplyOutcome::BusinessFailure("out of stock".into()));
    assert_eq!(
        orch.handle_reply(&refuse).await.unwrap(),
        ReplyDisposition::Applied
    );
    let inst2 = load(&store, id2).await;
    // Only "validate" completed, and it has nothing to undo.
    assert_eq!(inst2.state, SagaState::Failed);
    assert!(inst2.last_error.unwrap().contains("out of stock"));
    assert!(entries(&log, id2).iter().all(|e| !e.starts_with("undo")));
}

/// A remote step's timeout is a durable timer: after the orchestrator that
/// sent the command is gone, a new one on the same store fires it, resends
/// the command with the same idempotency key, and when the budget is spent
/// compensates (the timed-out step first: its effect is unknown).
pub async fn timeouts_fire_from_durable_timers_after_restart<B: SagaStoreBackend>(backend: &B) {
    let store = backend.fresh_store().await;
    let log = Log::default();
    let registry = SagaRegistry::new();
    let timeout = Duration::from_millis(300);
    registry
        .register(remote_def("remote", 1, timeout, &log))
        .unwrap();

    // Two sagas: one will get a late-but-valid reply, one never will.
    let (answered, silent) = {
        let first = orchestrator(&store, &registry, "before-restart");
        let a = first.start("remote", &Order::ok()).await.unwrap();
        let s = first.start("remote", &Order::ok()).await.unwrap();
        first.run_until_idle().await.unwrap();
        (a, s)
        // `first` is dropped here: the process "dies".
    };
    assert_eq!(pending_for(&store, answered).await.len(), 1);
    let first_cmd = pending_for(&store, answered).await.remove(0);

    // Nothing fires before the deadline.
    let second = orchestrator(&store, &registry, "after-restart");
    assert_eq!(second.run_once().await.unwrap(), 0);
    tokio::time::sleep(timeout + Duration::from_millis(50)).await;

    // After it, the new worker resends with the same key.
    let inst = drive_until(&[&second], answered, Duration::from_secs(10), |i| {
        i.progress.attempt == 2 && i.progress.in_flight.is_some()
    })
    .await;
    assert_eq!(inst.state, SagaState::Running);
    let cmds = pending_for(&store, answered).await;
    assert_eq!(cmds.len(), 2);
    assert_eq!(cmds[1].attempt, 2);
    assert_eq!(cmds[1].idempotency_key, cmds[0].idempotency_key);
    assert_ne!(cmds[1].message_id, cmds[0].message_id);
    let h = kinds(&store, answered).await;
    assert!(h.contains(&HistoryKind::StepTimedOut));
    assert!(h.contains(&HistoryKind::RetryScheduled));

    // The participant answers (it keyed its work by the idempotency key, so
    // answering the first send is as good as answering the second).
    let reply = first_cmd.reply(ReplyOutcome::Success(json!({"reservation": "r-1"})));
    assert_eq!(
        second.handle_reply(&reply).await.unwrap(),
        ReplyDisposition::Applied
    );
    assert_eq!(load(&store, answered).await.state, SagaState::Completed);

    // The silent one times out twice (its budget) and is compensated,
    // starting with the step whose effect is unknown.
    let inst = drive_until(&[&second], silent, Duration::from_secs(10), |i| {
        i.state.is_terminal()
    })
    .await;
    assert_eq!(inst.state, SagaState::Compensated);
    assert_eq!(pending_for(&store, silent).await.len(), 2);
    assert_eq!(
        entries(&log, silent),
        [
            "do-validate".to_owned(),
            format!(
                "undo-reserve:{}",
                idempotency_key(silent, 1, StepKind::Compensation)
            )
        ]
    );
    let h = kinds(&store, silent).await;
    assert_eq!(
        h.iter()
            .filter(|k| **k == HistoryKind::StepTimedOut)
            .count(),
        2
    );
    assert!(h.contains(&HistoryKind::CompensationRequired));
}

/// A worker that crashes in the middle of a local step is replaced: once
/// its lease and the step's timeout have passed, another worker finds the
/// started-but-unfinished step, counts it as timed out, and retries it with
/// the same idempotency key.
pub async fn crash_mid_local_step_is_resumed<B: SagaStoreBackend>(backend: &B) {
    let store = backend.fresh_store().await;
    let calls = Arc::new(Mutex::new(Vec::<(u32, String)>::new()));
    let c = calls.clone();
    let registry = SagaRegistry::new();
    registry
        .register(
            SagaDefinition::new("slow", 1).step(
                Step::new(
                    "charge",
                    Action::local(move |o: Order, ctx| {
                        let c = c.clone();
                        async move {
                            c.lock().unwrap().push((ctx.attempt, ctx.idempotency_key));
                            if ctx.attempt == 1 {
                                // Hangs: the worker will be killed meanwhile.
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                            }
                            StepOutcome::Success(o)
                        }
                    }),
                )
                .timeout(Duration::from_millis(300))
                .retry(fast_retry(3)),
            ),
        )
        .unwrap();
    let mut config = OrchestratorConfig::worker("doomed");
    config.lease = Duration::from_millis(100);
    let doomed = Orchestrator::with_config(store.clone(), registry.clone(), config);
    let id = doomed.start("slow", &Order::ok()).await.unwrap();
    let task = tokio::spawn(async move { doomed.run_once().await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while calls.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the step never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    task.abort(); // kill -9, as far as the store can tell
    let _ = task.await;

    let inst = load(&store, id).await;
    assert!(inst.progress.in_flight.is_some(), "the intent was recorded");
    let survivor = orchestrator(&store, &registry, "survivor");
    assert_eq!(
        survivor.run_once().await.unwrap(),
        0,
        "the dead worker's lease still holds"
    );
    let inst = drive_until(&[&survivor], id, Duration::from_secs(10), |i| {
        i.state.is_terminal()
    })
    .await;
    assert_eq!(inst.state, SagaState::Completed);
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].0, 1);
    assert_eq!(calls[1].0, 2);
    assert_eq!(calls[0].1, calls[1].1);
    assert!(kinds(&store, id).await.contains(&HistoryKind::StepTimedOut));
}

fn probe_transition(inst: &SagaInstance, token: u64, worker: &str) -> SagaTransition {
    SagaTransition {
        saga_id: inst.id,
        token,
        worker: worker.to_owned(),
        state: SagaState::Compensating,
        data: json!({"written_by": worker}),
        progress: inst.progress.clone(),
        last_error: None,
        wake: Wake::Never,
        lease: LeaseUpdate::Release,
        history: vec![HistoryEvent::saga(HistoryKind::OperatorAbort).with_error(worker)],
        commands: Vec::new(),
        inbox_message_id: None,
    }
}

/// A saga of type `t`, version 1, with empty data, for the store-level
/// cases that need no definition.
fn probe_saga(id: SagaId) -> NewSaga {
    NewSaga {
        id,
        saga_type: "t".into(),
        version: 1,
        data: json!({}),
        trace_context: None,
    }
}

/// Leases and fencing: a live lease keeps other claimers out; once it
/// expires another worker claims with a higher token, and the stale
/// worker's writes are rejected with `Fenced`, writing nothing.
pub async fn stale_worker_is_fenced<B: SagaStoreBackend>(backend: &B) {
    let store = backend.fresh_store().await;
    let id = SagaId::new();
    store.create(probe_saga(id)).await.unwrap();
    assert!(matches!(
        store.create(probe_saga(id)).await,
        Err(SagaError::AlreadyExists(_))
    ));

    let lease = Duration::from_millis(200);
    let a = store.claim_due("a", lease, 10).await.unwrap();
    assert_eq!(a.len(), 1);
    let a = a.into_iter().next().unwrap();
    assert_eq!(a.instance.fencing_token, a.token);
    assert!(store.claim_due("b", lease, 10).await.unwrap().is_empty());
    assert!(matches!(
        store.claim(id, "b", lease).await,
        Err(SagaError::Leased { .. })
    ));

    tokio::time::sleep(lease + Duration::from_millis(50)).await;
    let b = store
        .claim_due("b", Duration::from_secs(5), 10)
        .await
        .unwrap();
    assert_eq!(b.len(), 1);
    let b = b.into_iter().next().unwrap();
    assert!(b.token > a.token);

    let history_before = store.history(id).await.unwrap();
    let err = store
        .commit(probe_transition(&a.instance, a.token, "a"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, SagaError::Fenced { token, current, .. } if token == a.token && current == b.token),
        "{err:?}"
    );
    assert!(store.release(id, a.token).await.unwrap_err().is_fenced());
    let inst = load(&store, id).await;
    assert_eq!(inst.state, SagaState::Running);
    assert_eq!(inst.data, json!({}));
    assert_eq!(store.history(id).await.unwrap(), history_before);

    let inst = store
        .commit(probe_transition(&b.instance, b.token, "b"))
        .await
        .unwrap();
    assert_eq!(inst.state, SagaState::Compensating);
    assert_eq!(inst.data, json!({"written_by": "b"}));
    assert_eq!(inst.lease, None);
    assert_eq!(inst.due_at, None);
    let h = store.history(id).await.unwrap();
    assert_eq!(h.len(), history_before.len() + 1);
    assert_eq!(h.last().unwrap().worker.as_deref(), Some("b"));
    // Not due (no timer): no worker claims it.
    assert!(store.claim_due("c", lease, 10).await.unwrap().is_empty());
}

/// A write that claims ([`SagaStore::commit_claiming`], how replies are
/// handled): it applies only if nobody claimed the saga since it was read
/// and no live lease is held; otherwise it writes nothing (`Fenced`,
/// `Leased`). A reply recorded before is `DuplicateMessage` and writes
/// nothing either.
pub async fn claiming_commit_is_fenced<B: SagaStoreBackend>(backend: &B) {
    let store = backend.fresh_store().await;
    let id = SagaId::new();
    store.create(probe_saga(id)).await.unwrap();
    let lease = Duration::from_secs(30);
    let read = load(&store, id).await;
    let reply = uuid::Uuid::now_v7();
    let mut t = probe_transition(&read, read.fencing_token + 1, "r1");
    t.wake = Wake::Now;
    t.inbox_message_id = Some(reply);
    let inst = store.commit_claiming(t, &read, lease).await.unwrap();
    assert_eq!(inst.fencing_token, read.fencing_token + 1);
    assert_eq!(inst.data, json!({"written_by": "r1"}));
    assert_eq!(inst.lease, None);
    assert!(store.message_handled(reply).await.unwrap());

    // A second writer that read the same version is fenced.
    let err = store
        .commit_claiming(
            probe_transition(&read, read.fencing_token + 1, "r2"),
            &read,
            lease,
        )
        .await
        .unwrap_err();
    assert!(err.is_fenced(), "{err:?}");
    assert_eq!(load(&store, id).await.data, json!({"written_by": "r1"}));

    // A live lease keeps a claiming writer out, even with a current read.
    let a = store.claim(id, "a", lease).await.unwrap();
    let err = store
        .commit_claiming(
            probe_transition(&a.instance, a.token + 1, "r3"),
            &a.instance,
            lease,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, SagaError::Leased { .. }), "{err:?}");
    // The lease holder's token is still current; it commits and lets go.
    // The token does not move, but a writer holding the read from before
    // that commit is stale and is fenced.
    store
        .commit(probe_transition(&a.instance, a.token, "a"))
        .await
        .unwrap();
    let history = store.history(id).await.unwrap();
    let err = store
        .commit_claiming(
            probe_transition(&a.instance, a.token + 1, "stale"),
            &a.instance,
            lease,
        )
        .await
        .unwrap_err();
    assert!(err.is_fenced(), "{err:?}");
    assert_eq!(load(&store, id).await.data, json!({"written_by": "a"}));
    assert_eq!(store.history(id).await.unwrap(), history);

    // The reply handled before: nothing written, nothing held.
    let read = load(&store, id).await;
    let mut t = probe_transition(&read, read.fencing_token + 1, "r4");
    t.inbox_message_id = Some(reply);
    assert!(matches!(
        store.commit_claiming(t, &read, lease).await,
        Err(SagaError::DuplicateMessage(m)) if m == reply
    ));
    let now = load(&store, id).await;
    assert_eq!(now.data, json!({"written_by": "a"}));
    assert_eq!(now.lease, None);
    assert_eq!(store.history(id).await.unwrap(), history);

    // A fresh reply on a fresh read applies, and a claim after it fences
    // a writer still holding that read.
    let mut t = probe_transition(&now, now.fencing_token + 1, "r5");
    t.inbox_message_id = Some(uuid::Uuid::now_v7());
    t.lease = LeaseUpdate::Extend(lease);
    let inst = store.commit_claiming(t, &now, lease).await.unwrap();
    assert_eq!(inst.lease.as_ref().map(|l| l.owner.as_str()), Some("r5"));
    assert!(matches!(
        store.claim(id, "b", lease).await,
        Err(SagaError::Leased { .. })
    ));
    assert_eq!(store.history(id).await.unwrap().len(), history.len() + 1);
}

/// Several workers share many sagas: no saga ever has two step executions
/// at once, every step runs exactly once, every saga completes.
pub async fn concurrent_workers_never_drive_one_saga_at_once<B: SagaStoreBackend>(backend: &B) {
    let store = backend.fresh_store().await;
    let active = Arc::new(Mutex::new(HashSet::<SagaId>::new()));
    let overlaps = Arc::new(AtomicU32::new(0));
    let log = Log::default();
    let step = |name: &'static str| {
        let (active, overlaps, log) = (active.clone(), overlaps.clone(), log.clone());
        Step::new(
            name,
            Action::local(move |mut o: Order, ctx| {
                let (active, overlaps, log) = (active.clone(), overlaps.clone(), log.clone());
                async move {
                    if !active.lock().unwrap().insert(ctx.saga_id) {
                        overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    record(&log, ctx.saga_id, name.to_owned());
                    active.lock().unwrap().remove(&ctx.saga_id);
                    o.done.push(name.to_owned());
                    StepOutcome::Success(o)
                }
            }),
        )
    };
    let registry = SagaRegistry::new();
    registry
        .register(
            SagaDefinition::new("busy", 1)
                .step(step("one"))
                .step(step("two"))
                .step(step("three")),
        )
        .unwrap();
    let workers: Vec<_> = (0..4)
        .map(|i| {
            let mut config = OrchestratorConfig::worker(format!("w{i}"));
            config.batch_size = 3;
            config.poll_interval = Duration::from_millis(5);
            Orchestrator::with_config(store.clone(), registry.clone(), config)
        })
        .collect();
    let mut ids = Vec::new();
    for _ in 0..30 {
        ids.push(workers[0].start("busy", &Order::ok()).await.unwrap());
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let handles: Vec<_> = workers
        .into_iter()
        .map(|w| {
            let mut rx = stop_rx.clone();
            tokio::spawn(async move {
                w.run(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await;
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let open = store
            .list(&SagaFilter::default().saga_type("busy"))
            .await
            .unwrap()
            .into_iter()
            .filter(|i| !i.state.is_terminal())
            .count();
        if open == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{open} sagas still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_tx.send(true).unwrap();
    for h in handles {
        h.await.unwrap();
    }
    assert_eq!(overlaps.load(Ordering::SeqCst), 0);
    let mut workers_seen = HashSet::new();
    for id in ids {
        assert_eq!(load(&store, id).await.state, SagaState::Completed);
        assert_eq!(entries(&log, id), ["one", "two", "three"]);
        for h in store.history(id).await.unwrap() {
            if let Some(w) = h.worker {
                workers_seen.insert(w);
            }
        }
    }
    assert!(
        workers_seen.len() > 1,
        "the work was shared: {workers_seen:?}"
    );
}

/// A saga finishes on the definition version it started on, even after a
/// newer version is registered (and an orchestrator restarted); new sagas
/// start on the newest version.
pub async fn running_instance_finishes_on_its_version<B: SagaStoreBackend>(backend: &B) {
    let store = backend.fresh_store().await;
    let log = Log::default();
    let registry = SagaRegistry::new();
    registry
        .register(remote_def("versioned", 1, Duration::from_secs(30), &log))
        .unwrap();
    let old = orchestrator(&store, &registry, "old");
    let id1 = old.start("versioned", &Order::ok()).await.unwrap();
    old.run_until_idle().await.unwrap();
    let cmd = pending_for(&store, id1).await.remove(0);

    registry
        .register(
            SagaDefinition::new("versioned", 2)
                .step(local_step("check", 0, false, &log))
                .step(local_step("book", 1, true, &log)),
        )
        .unwrap();
    let new = orchestrator(&store, &registry, "new");
    let id2 = new.start("versioned", &Order::ok()).await.unwrap();
    new.run_until_idle().await.unwrap();
    assert_eq!(
        new.handle_reply(&cmd.reply(ReplyOutcome::Success(json!({"reservation": "r"}))))
            .await
            .unwrap(),
        ReplyDisposition::Applied
    );

    let v1 = load(&store, id1).await;
    assert_eq!((v1.version, v1.state), (1, SagaState::Completed));
    assert_eq!(entries(&log, id1), ["do-validate", "do-ship"]);
    let v2 = load(&store, id2).await;
    assert_eq!((v2.version, v2.state), (2, SagaState::Completed));
    assert_eq!(entries(&log, id2), ["do-check", "do-book"]);

    // A saga whose version is unknown to an orchestrator is left untouched.
    let only_v2 = SagaRegistry::new();
    only_v2
        .register(SagaDefinition::new("versioned", 2).step(local_step("check", 0, false, &log)))
        .unwrap();
    let stranger = orchestrator(&store, &only_v2, "stranger");
    let id3 = old.start("versioned", &Order::ok()).await.unwrap();
    assert_eq!(load(&store, id3).await.version, 2);
    let id4 = SagaId::new();
    store
        .create(NewSaga {
            id: id4,
            saga_type: "versioned".into(),
            version: 1,
            data: serde_json::to_value(Order::ok()).unwrap(),
            trace_context: None,
        })
        .await
        .unwrap();
    stranger.run_once().await.unwrap();
    let inst4 = load(&store, id4).await;
    assert_eq!(inst4.state, SagaState::Running);
    assert_eq!(inst4.progress.attempt, 0);
    assert!(matches!(
        stranger.abort(id4, "x").await,
        Err(SagaError::UnknownDefinition { version: 1, .. })
    ));
}

/// Every attempt of an action sees the same idempotency key, and the
/// compensation a different, equally stable one.
pub async fn idempotency_keys_are_stable_across_retries<B: SagaStoreBackend>(backend: &B) {
    let store = backend.fresh_store().await;
    let seen = Arc::new(Mutex::new(Vec::<(StepKind, u32, String)>::new()));
    let (s1, s2) = (seen.clone(), seen.clone());
    let registry = SagaRegistry::new();
    registry
        .register(
            SagaDefinition::new("flaky", 1)
                .step(
                    Step::new(
                        "debit",
                        Action::local(move |o: Order, ctx| {
                            let s = s1.clone();
                            async move {
                                s.lock().unwrap().push((
                                    ctx.kind,
                                    ctx.attempt,
                                    ctx.idempotency_key,
                                ));
                                if ctx.attempt < 3 {
                                    StepOutcome::RetryableFailure("busy".into())
                                } else {
                                    StepOutcome::Success(o)
                                }
                            }
                        }),
                    )
                    .retry(fast_retry(3))
                    .compensation_retry(fast_retry(3))
                    .compensate_with(Action::local(move |o: Order, ctx| {
                        let s = s2.clone();
                        async move {
                            s.lock()
                                .unwrap()
                                .push((ctx.kind, ctx.attempt, ctx.idempotency_key));
                            if ctx.attempt < 2 {
                                StepOutcome::RetryableFailure("busy".into())
                            } else {
                                StepOutcome::Success(o)
                            }
                        }
                    })),
                )
                .step(Step::new(
                    "credit",
                    Action::local(|_o: Order, _ctx| async move {
                        StepOutcome::BusinessFailure("account closed".into())
                    }),
                )),
        )
        .unwrap();
    let orch = orchestrator(&store, &registry, "w1");
    let id = orch.start("flaky", &Order::ok()).await.unwrap();
    let inst = drive_until(&[&orch], id, Duration::from_secs(10), |i| {
        i.state.is_terminal()
    })
    .await;
    assert_eq!(inst.state, SagaState::Compensated);
    let action_key = idempotency_key(id, 0, StepKind::Action);
    let comp_key = idempotency_key(id, 0, StepKind::Compensation);
    assert_eq!(
        seen.lock().unwrap().clone(),
        vec![
            (StepKind::Action, 1, action_key.clone()),
            (StepKind::Action, 2, action_key.clone()),
            (StepKind::Action, 3, action_key),
            (StepKind::Compensation, 1, comp_key.clone()),
            (StepKind::Compensation, 2, comp_key),
        ]
    );
}

/// The operator API: list filters by type, state and age; show returns the
/// timeline; abort compensates a running saga (including the step awaiting
/// its reply) and refuses terminal ones; retry refuses what is not
/// `CompensationFailed`.
pub async fn operator_list_show_abort<B: SagaStoreBackend>(backend: &B) {
    let store = backend.fresh_store().await;
    let log = Log::default();
    let registry = SagaRegistry::new();
    registry
        .register(remote_def("remote", 1, Duration::from_secs(30), &log))
        .unwrap();
    registry.register(chain(&log)).unwrap();
    let orch = orchestrator(&store, &registry, "op");
    let done = orch.start("chain", &Order::ok()).await.unwrap();
    let waiting = orch.start("remote", &Order::ok()).await.unwrap();
    orch.run_until_idle().await.unwrap();

    let all = orch.list(&SagaFilter::default()).await.unwrap();
    assert_eq!(
        all.iter().map(|i| i.id).collect::<Vec<_>>(),
        [done, waiting]
    );
    let running = orch
        .list(&SagaFilter::default().state(SagaState::Running))
        .await
        .unwrap();
    assert_eq!(running.iter().map(|i| i.id).collect::<Vec<_>>(), [waiting]);
    let chains = orch
        .list(&SagaFilter::default().saga_type("chain"))
        .await
        .unwrap();
    assert_eq!(chains.iter().map(|i| i.id).collect::<Vec<_>>(), [done]);
    let either = orch
        .list(
            &SagaFilter::default()
                .state(SagaState::Completed)
                .state(SagaState::Running)
                .limit(1),
        )
        .await
        .unwrap();
    assert_eq!(either.len(), 1);
    assert!(
        orch.list(&SagaFilter::default().older_than(Duration::from_secs(3600)))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        orch.list(&SagaFilter::default().newer_than(Duration::from_secs(3600)))
            .await
            .unwrap()
            .len(),
        2
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(
        orch.list(&SagaFilter::default().older_than(Duration::from_millis(100)))
            .await
            .unwrap()
            .len(),
        2
    );

    let view = orch.show(done).await.unwrap();
    assert_eq!(view.instance.state, SagaState::Completed);
    assert_eq!(
        view.history.first().unwrap().event.kind,
        HistoryKind::SagaStarted
    );
    assert_eq!(
        view.history.last().unwrap().event.kind,
        HistoryKind::SagaCompleted
    );
    assert!(matches!(
        orch.show(SagaId::new()).await,
        Err(SagaError::NotFound(_))
    ));

    assert!(matches!(
        orch.abort(done, "too late").await,
        Err(SagaError::InvalidState {
            operation: "abort",
            ..
        })
    ));
    assert!(matches!(
        orch.retry(waiting).await,
        Err(SagaError::InvalidState {
            operation: "retry",
            state: SagaState::Running,
            ..
        })
    ));
    let cmd = pending_for(&store, waiting).await.remove(0);
    let inst = orch.abort(waiting, "customer cancelled").await.unwrap();
    assert_eq!(inst.state, SagaState::Compensated);
    assert_eq!(
        entries(&log, waiting),
        [
            "do-validate".to_owned(),
            format!(
                "undo-reserve:{}",
                idempotency_key(waiting, 1, StepKind::Compensation)
            )
        ]
    );
    let view = orch.show(waiting).await.unwrap();
    let abort = view
        .history
        .iter()
        .find(|h| h.event.kind == HistoryKind::OperatorAbort)
        .unwrap();
    assert_eq!(abort.event.error.as_deref(), Some("customer cancelled"));
    // The late reply to the aborted step is consumed without effect.
    assert_eq!(
        orch.handle_reply(&cmd.reply(ReplyOutcome::Success(json!({"reservation": "r"}))))
            .await
            .unwrap(),
        ReplyDisposition::Ignored
    );
    assert_eq!(load(&store, waiting).await.state, SagaState::Compensated);
}

/// The trace context a saga is created with is kept with its progress,
/// through claims and commits, so a step driven later by any worker
/// continues the trace that started the saga.
pub async fn trace_context_is_kept_with_the_progress<B: SagaStoreBackend>(backend: &B) {
    let store = backend.fresh_store().await;
    let tc = vextrus_kernel::TraceContext::parse(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        Some("vendor=1"),
    )
    .unwrap();
    let id = SagaId::new();
    store
        .create(NewSaga {
            id,
            saga_type: "traced".into(),
            version: 1,
            data: json!({}),
            trace_context: Some(tc.clone()),
        })
        .await
        .unwrap();
    assert_eq!(
        load(&store, id).await.progress.trace_context,
        Some(tc.clone())
    );
    let claim = store.claim(id, "w", Duration::from_secs(5)).await.unwrap();
    assert_eq!(claim.instance.progress.trace_context, Some(tc.clone()));
    let mut progress = claim.instance.progress.clone();
    progress.step = 1;
    store
        .commit(SagaTransition {
            saga_id: id,
            token: claim.token,
            worker: "w".into(),
            state: SagaState::Running,
            data: json!({"n": 1}),
            progress,
            last_error: None,
            wake: Wake::Now,
            lease: LeaseUpdate::Release,
            history: Vec::new(),
            commands: Vec::new(),
            inbox_message_id: None,
        })
        .await
        .unwrap();
    let after = load(&store, id).await;
    assert_eq!(after.progress.step, 1);
    assert_eq!(after.progress.trace_context, Some(tc));
}

/// Expands to one `#[tokio::test]` per saga-store conformance case, each
/// running against the given backend expression (a [`SagaStoreBackend`]).
/// The calling crate needs `tokio` (with `macros` and `rt-multi-thread`) as
/// a dev-dependency.
#[macro_export]
macro_rules! saga_store_conformance {
    ($backend:expr) => {
        $crate::saga_store_conformance!(@cases $backend;
            happy_path_completes,
            failure_at_each_step_compensates_completed_steps_in_reverse,
            compensation_failure_then_operator_retry,
            remote_step_round_trip,
            timeouts_fire_from_durable_timers_after_restart,
            crash_mid_local_step_is_resumed,
            stale_worker_is_fenced,
            claiming_commit_is_fenced,
            concurrent_workers_never_drive_one_saga_at_once,
            running_instance_finishes_on_its_version,
            idempotency_keys_are_stable_across_retries,
            operator_list_show_abort,
            trace_context_is_kept_with_the_progress,
            counts_by_state,
        );
    };
    (@cases $backend:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let backend = $backend;
                $crate::saga::$case(&backend).await;
            }
        )*
    };
}
