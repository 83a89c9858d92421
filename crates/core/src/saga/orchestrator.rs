//! The orchestrator: claims due sagas, runs or sends their steps, applies
//! replies, and offers the operator API.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use futures::future::join_all;
use serde_json::Value;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::saga::definition::{
    ErasedSaga, Invocation, SagaData, SagaRegistry, StepContext, StepOutcome,
};
use crate::saga::error::SagaError;
use crate::saga::state::{
    HistoryEntry, HistoryEvent, HistoryKind, InFlight, ReplyOutcome, SagaCommand, SagaFilter,
    SagaId, SagaInstance, SagaReply, SagaState, StepKind, idempotency_key,
};
use crate::saga::store::{Claim, LeaseUpdate, NewSaga, SagaStore, SagaTransition, Wake};

/// How an orchestrator worker behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrchestratorConfig {
    /// This worker's name, recorded in leases and history.
    pub worker_id: String,
    /// How long a claim lasts without a write (each write extends it; a local
    /// step's start extends it by the step's timeout too).
    pub lease: Duration,
    /// How many due sagas one [`Orchestrator::run_once`] claims.
    pub batch_size: usize,
    /// How long [`Orchestrator::run`] sleeps when nothing is due.
    pub poll_interval: Duration,
    /// How often [`Orchestrator::run`] sets the
    /// [`vextrus_sagas`](vextrus_telemetry::names::SAGAS) gauge from the
    /// store's counts ([`Orchestrator::record_saga_counts`]); zero never.
    pub metrics_interval: Duration,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        Self {
            worker_id: format!("worker-{}", Uuid::now_v7()),
            lease: Duration::from_secs(30),
            batch_size: 64,
            poll_interval: Duration::from_millis(100),
            metrics_interval: Duration::from_secs(10),
        }
    }
}

impl OrchestratorConfig {
    /// The default configuration with this worker name.
    pub fn worker(worker_id: impl Into<String>) -> Self {
        Self {
            worker_id: worker_id.into(),
            ..Self::default()
        }
    }
}

/// What [`Orchestrator::handle_reply`] did with a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyDisposition {
    /// It was the answer the saga waited for; the saga moved on.
    Applied,
    /// It matched nothing the saga waits for (late, or for another step); it
    /// was recorded as handled and changed nothing else.
    Ignored,
    /// It had been handled before; nothing happened.
    Duplicate,
}

/// A saga and its timeline, as `vextrus saga show` prints it.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaView {
    /// The instance.
    pub instance: SagaInstance,
    /// Every transition, oldest first.
    pub history: Vec<HistoryEntry>,
}

/// How one attempt ended, as the engine sees it.
enum Outcome {
    Success(Value),
    Retryable(String),
    Business(String),
    TimedOut,
}

impl From<StepOutcome<Value>> for Outcome {
    fn from(o: StepOutcome<Value>) -> Self {
        match o {
            StepOutcome::Success(v) => Outcome::Success(v),
            StepOutcome::RetryableFailure(r) => Outcome::Retryable(r),
            StepOutcome::BusinessFailure(r) => Outcome::Business(r),
        }
    }
}

/// Drives sagas stored in `S` with the definitions of a [`SagaRegistry`].
///
/// Any number of orchestrators (in one process or many) can share a store:
/// they split the work through leases, and fencing tokens stop a stale one.
/// See the [module docs](crate::saga) for the design.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use vextrus_core::saga::{
///     Action, InMemorySagaStore, Orchestrator, SagaDefinition, SagaRegistry, SagaState, Step, StepOutcome,
/// };
///
/// #[derive(Clone, Serialize, Deserialize)]
/// struct Transfer { amount: u64, debited: bool, credited: bool }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let registry = SagaRegistry::new();
/// registry.register(
///     SagaDefinition::new("transfer", 1)
///         .step(
///             Step::new("debit", Action::local(|mut t: Transfer, _ctx| async move {
///                 t.debited = true;
///                 StepOutcome::Success(t)
///             }))
///             .compensate_with(Action::local(|mut t: Transfer, _ctx| async move {
///                 t.debited = false;
///                 StepOutcome::Success(t)
///             })),
///         )
///         .step(Step::new("credit", Action::local(|t: Transfer, _ctx| async move {
///             if t.amount > 100 {
///                 StepOutcome::BusinessFailure("limit exceeded".into())
///             } else {
///                 StepOutcome::Success(Transfer { credited: true, ..t })
///             }
///         }))),
/// ).unwrap();
///
/// let orchestrator = Orchestrator::new(InMemorySagaStore::new(), registry);
/// let ok = orchestrator.start("transfer", &Transfer { amount: 10, debited: false, credited: false }).await.unwrap();
/// let too_big = orchestrator.start("transfer", &Transfer { amount: 500, debited: false, credited: false }).await.unwrap();
/// orchestrator.run_until_idle().await.unwrap();
///
/// assert_eq!(orchestrator.show(ok).await.unwrap().instance.state, SagaState::Completed);
/// let view = orchestrator.show(too_big).await.unwrap();
/// assert_eq!(view.instance.state, SagaState::Compensated);
/// assert_eq!(view.instance.data["debited"], false);
/// # });
/// ```
#[derive(Clone)]
pub struct Orchestrator<S> {
    store: S,
    registry: SagaRegistry,
    config: OrchestratorConfig,
    wake_up: Arc<Notify>,
}

impl<S> std::fmt::Debug for Orchestrator<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("config", &self.config)
            .field("registry", &self.registry)
            .finish()
    }
}

impl<S: SagaStore> Orchestrator<S> {
    /// An orchestrator with the default configuration (a unique worker name).
    pub fn new(store: S, registry: SagaRegistry) -> Self {
        Self::with_config(store, registry, OrchestratorConfig::default())
    }

    /// An orchestrator with `config`.
    pub fn with_config(store: S, registry: SagaRegistry, config: OrchestratorConfig) -> Self {
        Self {
            store,
            registry,
            config,
            wake_up: Arc::new(Notify::new()),
        }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The registry.
    pub fn registry(&self) -> &SagaRegistry {
        &self.registry
    }

    /// The configuration.
    pub fn config(&self) -> &OrchestratorConfig {
        &self.config
    }

    /// Starts a saga of `saga_type` on its latest registered version.
    pub async fn start<D: SagaData>(&self, saga_type: &str, data: &D) -> Result<SagaId, SagaError> {
        self.start_with_id(SagaId::new(), saga_type, data).await
    }

    /// Starts a saga with a caller-chosen id (e.g. derived from the business
    /// key). Idempotent: if a saga of the same type already has this id,
    /// nothing happens and the id is returned.
    pub async fn start_with_id<D: SagaData>(
        &self,
        id: SagaId,
        saga_type: &str,
        data: &D,
    ) -> Result<SagaId, SagaError> {
        let version = self.registry.latest_version(saga_type).ok_or_else(|| {
            SagaError::UnknownDefinition {
                saga_type: saga_type.to_owned(),
                version: 0,
            }
        })?;
        let new = NewSaga {
            id,
            saga_type: saga_type.to_owned(),
            version,
            data: serde_json::to_value(data)?,
            trace_context: vextrus_telemetry::current_trace_context(),
        };
        match self.store.create(new).await {
            Ok(_) => {}
            Err(SagaError::AlreadyExists(_)) => {
                let existing = self.store.load(id).await?;
                if existing.is_none_or(|e| e.saga_type != saga_type) {
                    return Err(SagaError::AlreadyExists(id));
                }
            }
            Err(e) => return Err(e),
        }
        self.wake_up.notify_one();
        Ok(id)
    }

    /// Claims the sagas that are due now (up to the batch size) and drives
    /// each as far as it can go without waiting: local steps run, remote
    /// commands are queued, timers that expired fire. Returns how many sagas
    /// were claimed. Errors of single sagas are logged, not returned.
    pub async fn run_once(&self) -> Result<usize, SagaError> {
        let claims = self
            .store
            .claim_due(
                &self.config.worker_id,
                self.config.lease,
                self.config.batch_size,
            )
            .await?;
        let n = claims.len();
        join_all(claims.into_iter().map(|c| self.drive_logged(c))).await;
        Ok(n)
    }

    /// Calls [`run_once`](Self::run_once) until nothing is due.
    pub async fn run_until_idle(&self) -> Result<usize, SagaError> {
        let mut total = 0;
        loop {
            let n = self.run_once().await?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    }

    /// The worker loop: resumes every due, non-terminal saga at once (that
    /// includes the ones an earlier process left behind) and keeps doing so
    /// until `shutdown` completes; sleeps `poll_interval` when idle (or until
    /// a saga is started through this orchestrator). Store errors are logged
    /// and retried after `poll_interval`.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut next_count = tokio::time::Instant::now();
        loop {
            if !self.config.metrics_interval.is_zero() && tokio::time::Instant::now() >= next_count
            {
                next_count = tokio::time::Instant::now() + self.config.metrics_interval;
                if let Err(e) = self.record_saga_counts().await {
                    tracing::warn!(worker = %self.config.worker_id, error = %e, "counting sagas by state failed");
                }
            }
            let idle = tokio::select! {
                _ = &mut shutdown => return,
                r = self.run_once() => match r {
                    Ok(n) => n == 0,
                    Err(e) => {
                        tracing::warn!(worker = %self.config.worker_id, error = %e, "claiming due sagas failed");
                        true
                    }
                },
            };
            if idle {
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(self.config.poll_interval) => {}
                    _ = self.wake_up.notified() => {}
                }
            }
        }
    }

    /// Reads how many sagas there are per (type, state) from the store and
    /// sets the [`vextrus_sagas`](vextrus_telemetry::names::SAGAS) gauge
    /// for each: every state of every type registered or stored, zero where
    /// none is (so a state that empties reads 0, not its last count).
    /// [`run`](Self::run) calls it every
    /// [`metrics_interval`](OrchestratorConfig::metrics_interval); the
    /// counts come from the store, so every worker and process reports the
    /// same figures.
    pub async fn record_saga_counts(&self) -> Result<Vec<crate::saga::SagaCount>, SagaError> {
        let counts = self.store.count_by_state().await?;
        let mut types: std::collections::BTreeSet<String> = self
            .registry
            .definitions()
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        types.extend(counts.iter().map(|c| c.saga_type.clone()));
        for saga_type in &types {
            for state in SagaState::ALL {
                let n = counts
                    .iter()
                    .find(|c| &c.saga_type == saga_type && c.state == state)
                    .map_or(0, |c| c.count);
                vextrus_telemetry::record::sagas(saga_type, state.as_str(), n);
            }
        }
        Ok(counts)
    }

    /// Feeds a participant's reply to its saga. Call it from the inbox
    /// consumer: the reply's message id is recorded in the same transaction as
    /// the transition it causes, so a redelivered reply is
    /// [`ReplyDisposition::Duplicate`]. After a reply is applied, the saga is
    /// driven on at once (its next local steps run, its next command is
    /// queued).
    ///
    /// Fails with [`SagaError::Leased`] (transient) while another worker
    /// drives the saga: leave the message unacknowledged and redeliver it.
    pub async fn handle_reply(&self, reply: &SagaReply) -> Result<ReplyDisposition, SagaError> {
        // No pre-check and no claim of its own: the saga is read, and the
        // first write claims it (`commit_claiming`: only if nobody claimed
        // it since the read and no live lease is held) and records the
        // reply, whose inbox row makes a redelivery a no-op.
        let inst = self
            .store
            .load(reply.saga_id)
            .await?
            .ok_or(SagaError::NotFound(reply.saga_id))?;
        let token = inst.fencing_token + 1;
        let def = self.registry.get(&inst.saga_type, inst.version)?;
        let expected = cursor(&*def, &inst);
        // Only a remote call is answered by a reply: the one in flight, or
        // (a late success, same idempotency key) one whose retry is pending.
        let remote = def
            .steps()
            .get(reply.step)
            .is_some_and(|s| s.is_remote(reply.kind));
        let in_flight_matches = inst
            .progress
            .in_flight
            .as_ref()
            .is_some_and(|f| f.step == reply.step && f.kind == reply.kind);
        let applies = remote
            && expected == Some((reply.step, reply.kind))
            && (in_flight_matches || matches!(reply.outcome, ReplyOutcome::Success(_)));
        let mut t = if applies {
            let attempt = inst
                .progress
                .in_flight
                .as_ref()
                .map_or(inst.progress.attempt, |f| f.attempt);
            let outcome = match &reply.outcome {
                ReplyOutcome::Success(body) => match reply.kind {
                    StepKind::Action => match def.apply_reply(reply.step, &inst.data, body) {
                        Ok(data) => Outcome::Success(data),
                        Err(e) => Outcome::Business(e),
                    },
                    StepKind::Compensation => Outcome::Success(inst.data.clone()),
                },
                ReplyOutcome::RetryableFailure(r) => Outcome::Retryable(r.clone()),
                ReplyOutcome::BusinessFailure(r) => Outcome::Business(r.clone()),
            };
            if reply.kind == StepKind::Action {
                let sent = inst.progress.in_flight.as_ref().and_then(|f| f.started_at);
                if let Some(sent) = sent {
                    vextrus_telemetry::record::saga_step(
                        &inst.saga_type,
                        def.steps().get(reply.step).map_or("?", |s| s.name.as_str()),
                        (chrono::Utc::now() - sent).to_std().unwrap_or_default(),
                        if matches!(outcome, Outcome::Success(_)) {
                            vextrus_telemetry::Outcome::Ok
                        } else {
                            vextrus_telemetry::Outcome::Error
                        },
                    );
                }
            }
            self.apply_outcome(
                &*def, &inst, token, reply.step, reply.kind, attempt, outcome,
            )
        } else {
            let mut t = self.base(&inst, token);
            let name = def.steps().get(reply.step).map_or("?", |s| s.name.as_str());
            t.history.push(
                HistoryEvent::step(HistoryKind::ReplyIgnored, reply.step, name, None).with_error(
                    format!(
                        "{} reply to the {} in state {} matched nothing awaited",
                        outcome_name(&reply.outcome),
                        reply.kind,
                        inst.state
                    ),
                ),
            );
            t.wake = Wake::Unchanged;
            t.lease = LeaseUpdate::Release;
            t
        };
        t.inbox_message_id = Some(reply.message_id);
        let mut pending = None;
        let mut claiming = Some(inst.clone());
        let driven = match self.settle(&inst, t, &mut pending, &mut claiming).await {
            Ok(_) if !applies => return Ok(ReplyDisposition::Ignored),
            // Applied and due again at once: the reply's transition is
            // committed together with the next start, inside `drive`.
            Ok(next) => self.drive(&*def, next, token, pending, claiming).await,
            Err(e) => Err(e),
        };
        match driven {
            Ok(()) => Ok(ReplyDisposition::Applied),
            // Only the commit carrying the reply (the claiming one) can say
            // so: nothing was written, and nothing is held.
            Err(SagaError::DuplicateMessage(_)) => Ok(ReplyDisposition::Duplicate),
            Err(e) if self.store.message_handled(reply.message_id).await? => {
                // The reply is recorded; what failed came after it.
                tracing::warn!(saga = %reply.saga_id, error = %e, "driving the saga after a reply failed; a worker resumes it");
                Ok(ReplyDisposition::Applied)
            }
            Err(e) => Err(e),
        }
    }

    /// Sagas passing `filter` (`vextrus saga list`).
    pub async fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaInstance>, SagaError> {
        self.store.list(filter).await
    }

    /// A saga and its timeline (`vextrus saga show`).
    pub async fn show(&self, id: SagaId) -> Result<SagaView, SagaError> {
        let instance = self.store.load(id).await?.ok_or(SagaError::NotFound(id))?;
        let history = self.store.history(id).await?;
        Ok(SagaView { instance, history })
    }

    /// Resumes a saga in `CompensationFailed` (`vextrus saga retry`): its
    /// remaining compensations get a fresh retry budget and run at once.
    /// Returns the saga as it stands afterwards.
    pub async fn retry(&self, id: SagaId) -> Result<SagaInstance, SagaError> {
        let Claim {
            instance: inst,
            token,
        } = self
            .store
            .claim(id, &self.config.worker_id, self.config.lease)
            .await?;
        if inst.state != SagaState::CompensationFailed {
            self.store.release(id, token).await?;
            return Err(SagaError::InvalidState {
                saga_id: id,
                state: inst.state,
                operation: "retry",
            });
        }
        let def = self.definition_or_release(&inst, token).await?;
        let mut t = self.base(&inst, token);
        t.state = SagaState::Compensating;
        t.progress.attempt = 0;
        t.progress.in_flight = None;
        t.history
            .push(HistoryEvent::saga(HistoryKind::OperatorRetry));
        let mut pending = None;
        let inst = self.settle(&inst, t, &mut pending, &mut None).await?;
        self.drive(&*def, inst, token, pending, None).await?;
        self.store.load(id).await?.ok_or(SagaError::NotFound(id))
    }

    /// Compensates a saga now (`vextrus saga abort`): a running saga stops
    /// and compensates its completed steps (and the step in progress, whose
    /// effect is uncertain); a `CompensationFailed` one resumes compensating;
    /// a compensating one is left as it is. Terminal sagas are refused.
    /// Returns the saga as it stands afterwards.
    pub async fn abort(&self, id: SagaId, reason: &str) -> Result<SagaInstance, SagaError> {
        let Claim {
            instance: inst,
            token,
        } = self
            .store
            .claim(id, &self.config.worker_id, self.config.lease)
            .await?;
        if inst.state.is_terminal() {
            self.store.release(id, token).await?;
            return Err(SagaError::InvalidState {
                saga_id: id,
                state: inst.state,
                operation: "abort",
            });
        }
        if inst.state == SagaState::Compensating {
            self.store.release(id, token).await?;
            return Ok(inst);
        }
        let def = self.definition_or_release(&inst, token).await?;
        let mut t = self.base(&inst, token);
        t.history
            .push(HistoryEvent::saga(HistoryKind::OperatorAbort).with_error(reason));
        if inst.state == SagaState::Running {
            let step = inst.progress.step;
            let uncertain = (inst.progress.attempt > 0).then_some(step);
            begin_compensation(&mut t, &*def, format!("aborted: {reason}"), uncertain);
        } else {
            t.state = SagaState::Compensating;
            t.progress.attempt = 0;
            t.progress.in_flight = None;
        }
        let mut pending = None;
        let inst = self.settle(&inst, t, &mut pending, &mut None).await?;
        self.drive(&*def, inst, token, pending, None).await?;
        self.store.load(id).await?.ok_or(SagaError::NotFound(id))
    }

    async fn definition_or_release(
        &self,
        inst: &SagaInstance,
        token: u64,
    ) -> Result<Arc<dyn ErasedSaga>, SagaError> {
        match self.registry.get(&inst.saga_type, inst.version) {
            Ok(d) => Ok(d),
            Err(e) => {
                self.store.release(inst.id, token).await?;
                Err(e)
            }
        }
    }

    async fn drive_logged(&self, claim: Claim) {
        let id = claim.instance.id;
        let res = match self
            .definition_or_release(&claim.instance, claim.token)
            .await
        {
            Ok(def) => {
                self.drive(&*def, claim.instance, claim.token, None, None)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            if e.is_fenced() {
                tracing::warn!(saga = %id, worker = %self.config.worker_id, error = %e, "lost the saga to another worker");
            } else {
                tracing::warn!(saga = %id, worker = %self.config.worker_id, error = %e, "driving the saga failed");
                // Best effort: let another worker take it without waiting for the lease.
                let _ = self.store.release(id, claim.token).await;
            }
        }
    }

    /// Whether a worker should act on the saga now.
    async fn is_due(&self, inst: &SagaInstance) -> Result<bool, SagaError> {
        match inst.due_at {
            None => Ok(false),
            Some(d) if d <= inst.updated_at => Ok(true),
            Some(d) => Ok(d <= self.store.now().await?),
        }
    }

    /// Drives a claimed saga until it must wait (for a reply, a retry's
    /// backoff, an operator) or is terminal; then releases the lease.
    ///
    /// `pending` is a transition not yet committed whose saga is due now
    /// (`inst` is its preview): it is committed together with the start of
    /// the next action or compensation, so a step costs one commit, not two.
    /// With `claiming` (the instance as read), the saga is not claimed yet
    /// (`token` is the token the claim will give): the first write claims
    /// it ([`SagaStore::commit_claiming`]).
    async fn drive(
        &self,
        def: &dyn ErasedSaga,
        mut inst: SagaInstance,
        token: u64,
        mut pending: Option<SagaTransition>,
        mut claiming: Option<SagaInstance>,
    ) -> Result<(), SagaError> {
        loop {
            if pending.is_none() {
                let waiting = matches!(inst.state, SagaState::CompensationFailed)
                    || inst.state.is_terminal()
                    || !self.is_due(&inst).await?;
                if waiting {
                    if inst.lease.is_some() && claiming.is_none() {
                        self.store.release(inst.id, token).await?;
                    }
                    return Ok(());
                }
            }
            let Some((step, kind)) = cursor(def, &inst) else {
                // Every step done (or every compensation confirmed).
                let mut t = pending.take().unwrap_or_else(|| self.base(&inst, token));
                finish(&mut t, &inst);
                self.write(t, &mut claiming).await?;
                return Ok(());
            };
            if let Some(f) = inst.progress.in_flight.clone() {
                // Started, no result, and its deadline has passed: timed out
                // (also how a crash during a local call is recovered).
                let t =
                    self.apply_outcome(def, &inst, token, step, kind, f.attempt, Outcome::TimedOut);
                inst = self.settle(&inst, t, &mut pending, &mut claiming).await?;
                continue;
            }
            let attempt = inst.progress.attempt + 1;
            let info = &def.steps()[step];
            let ctx = StepContext {
                saga_id: inst.id,
                step,
                step_name: info.name.clone(),
                kind,
                attempt,
                idempotency_key: idempotency_key(inst.id, step, kind),
            };
            let started_kind = match kind {
                StepKind::Action => HistoryKind::StepStarted,
                StepKind::Compensation => HistoryKind::CompensationStarted,
            };
            let mut t = pending.take().unwrap_or_else(|| self.base(&inst, token));
            t.progress.attempt = attempt;
            t.wake = Wake::After(info.timeout);
            t.history.push(HistoryEvent::step(
                started_kind,
                step,
                &info.name,
                Some(attempt),
            ));
            let span = step_span(&inst, &info.name, kind);
            // Invoked inside the step's span, so spans the step's code opens
            // as it builds its future or command are the step's children.
            match span.in_scope(|| def.invoke(step, kind, &inst.data, ctx.clone())) {
                Invocation::Remote(cmd) => {
                    let message_id = Uuid::now_v7();
                    t.progress.in_flight = Some(InFlight {
                        step,
                        kind,
                        attempt,
                        message_id: Some(message_id),
                        started_at: Some(chrono::Utc::now()),
                    });
                    t.commands.push(SagaCommand {
                        message_id,
                        saga_id: inst.id,
                        saga_type: inst.saga_type.clone(),
                        step,
                        step_name: info.name.clone(),
                        kind,
                        attempt,
                        idempotency_key: ctx.idempotency_key,
                        destination: cmd.destination,
                        command_type: cmd.command_type,
                        payload: cmd.payload,
                    });
                    t.lease = LeaseUpdate::Release;
                    // Committed inside the step's span: the queued command
                    // carries its trace context to the participant.
                    self.write(t, &mut claiming).instrument(span).await?;
                    return Ok(());
                }
                Invocation::Local(fut) => {
                    t.progress.in_flight = Some(InFlight {
                        step,
                        kind,
                        attempt,
                        message_id: None,
                        started_at: None,
                    });
                    t.lease = LeaseUpdate::Extend(info.timeout + self.config.lease);
                    let started = self
                        .write(t, &mut claiming)
                        .instrument(span.clone())
                        .await?;
                    let clock = std::time::Instant::now();
                    let outcome = match tokio::time::timeout(info.timeout, fut)
                        .instrument(span)
                        .await
                    {
                        Ok(o) => Outcome::from(o),
                        Err(_) => Outcome::TimedOut,
                    };
                    if kind == StepKind::Action {
                        vextrus_telemetry::record::saga_step(
                            &inst.saga_type,
                            &info.name,
                            clock.elapsed(),
                            if matches!(outcome, Outcome::Success(_)) {
                                vextrus_telemetry::Outcome::Ok
                            } else {
                                vextrus_telemetry::Outcome::Error
                            },
                        );
                    }
                    let t = self.apply_outcome(def, &started, token, step, kind, attempt, outcome);
                    inst = self
                        .settle(&started, t, &mut pending, &mut claiming)
                        .await?;
                }
            }
        }
    }

    /// Commits `t`, unless the saga is due again at once and not finished:
    /// then `t` becomes `pending` (committed with the next start) and the
    /// preview of `inst` after `t` is returned.
    async fn settle(
        &self,
        inst: &SagaInstance,
        t: SagaTransition,
        pending: &mut Option<SagaTransition>,
        claiming: &mut Option<SagaInstance>,
    ) -> Result<SagaInstance, SagaError> {
        if !continues_now(&t) {
            return self.write(t, claiming).await;
        }
        let preview = preview(inst, &t);
        *pending = Some(t);
        Ok(preview)
    }

    /// Commits `t`; the first write of a `claiming` drive claims the saga
    /// with it ([`SagaStore::commit_claiming`]), the later ones hold that claim.
    async fn write(
        &self,
        t: SagaTransition,
        claiming: &mut Option<SagaInstance>,
    ) -> Result<SagaInstance, SagaError> {
        if let Some(read) = claiming.take() {
            self.store
                .commit_claiming(t, &read, self.config.lease)
                .await
        } else {
            self.store.commit(t).await
        }
    }

    /// A transition that keeps everything as it is and extends the lease.
    fn base(&self, inst: &SagaInstance, token: u64) -> SagaTransition {
        SagaTransition {
            saga_id: inst.id,
            token,
            worker: self.config.worker_id.clone(),
            state: inst.state,
            data: inst.data.clone(),
            progress: inst.progress.clone(),
            last_error: inst.last_error.clone(),
            wake: Wake::Now,
            lease: LeaseUpdate::Extend(self.config.lease),
            history: Vec::new(),
            commands: Vec::new(),
            inbox_message_id: None,
        }
    }

    /// The transition recording how attempt `attempt` of (`step`, `kind`) ended.
    #[allow(clippy::too_many_arguments)]
    fn apply_outcome(
        &self,
        def: &dyn ErasedSaga,
        inst: &SagaInstance,
        token: u64,
        step: usize,
        kind: StepKind,
        attempt: u32,
        outcome: Outcome,
    ) -> SagaTransition {
        let info = &def.steps()[step];
        let mut t = self.base(inst, token);
        t.progress.in_flight = None;
        t.progress.attempt = attempt;
        let (error, retryable, timed_out) = match outcome {
            Outcome::Success(data) => {
                t.data = data;
                t.progress.attempt = 0;
                match kind {
                    StepKind::Action => {
                        t.progress.completed.push(step);
                        t.progress.step = step + 1;
                        t.history.push(HistoryEvent::step(
                            HistoryKind::StepSucceeded,
                            step,
                            &info.name,
                            Some(attempt),
                        ));
                    }
                    StepKind::Compensation => {
                        t.progress.compensations.retain(|s| *s != step);
                        t.history.push(HistoryEvent::step(
                            HistoryKind::CompensationSucceeded,
                            step,
                            &info.name,
                            Some(attempt),
                        ));
                    }
                }
                if cursor_of(def, t.state, &t.progress).is_none() {
                    finish(&mut t, inst);
                }
                return t;
            }
            Outcome::Retryable(r) => (r, true, false),
            Outcome::Business(r) => (r, false, false),
            Outcome::TimedOut => (format!("no result within {:?}", info.timeout), true, true),
        };
        let failed_kind = match (kind, timed_out) {
            (StepKind::Action, false) => HistoryKind::StepFailed,
            (StepKind::Action, true) => HistoryKind::StepTimedOut,
            (StepKind::Compensation, false) => HistoryKind::CompensationAttemptFailed,
            (StepKind::Compensation, true) => HistoryKind::CompensationTimedOut,
        };
        t.history.push(
            HistoryEvent::step(failed_kind, step, &info.name, Some(attempt)).with_error(&error),
        );
        let policy = info.policy(kind);
        if retryable && policy.can_retry_after(attempt) {
            let delay = policy.jittered_delay_after(attempt);
            t.history.push(
                HistoryEvent::step(HistoryKind::RetryScheduled, step, &info.name, Some(attempt))
                    .with_error(format!("next attempt in {delay:?}")),
            );
            t.last_error = Some(error);
            t.wake = Wake::After(delay);
            t.lease = LeaseUpdate::Release;
            return t;
        }
        let reason = if retryable {
            format!(
                "{kind} of step {} failed after {attempt} attempts: {error}",
                info.name
            )
        } else {
            format!("{kind} of step {} failed: {error}", info.name)
        };
        match kind {
            StepKind::Action => {
                begin_compensation(&mut t, def, reason, timed_out.then_some(step));
            }
            StepKind::Compensation => {
                t.state = SagaState::CompensationFailed;
                t.history.push(
                    HistoryEvent::saga(HistoryKind::SagaCompensationFailed).with_error(&reason),
                );
                t.last_error = Some(reason);
                t.wake = Wake::Never;
                t.lease = LeaseUpdate::Release;
            }
        }
        t
    }
}

/// Whether a transition leaves the saga due at once and still moving, so it
/// can be committed together with the next start.
fn continues_now(t: &SagaTransition) -> bool {
    t.wake == Wake::Now
        && matches!(t.state, SagaState::Running | SagaState::Compensating)
        && t.commands.is_empty()
}

/// `inst` as it will be once `t` is committed.
fn preview(inst: &SagaInstance, t: &SagaTransition) -> SagaInstance {
    SagaInstance {
        state: t.state,
        data: t.data.clone(),
        progress: t.progress.clone(),
        last_error: t.last_error.clone(),
        ..inst.clone()
    }
}

fn outcome_name(o: &ReplyOutcome) -> &'static str {
    match o {
        ReplyOutcome::Success(_) => "success",
        ReplyOutcome::RetryableFailure(_) => "retryable failure",
        ReplyOutcome::BusinessFailure(_) => "business failure",
    }
}

/// What the saga works on next: the step's action while running, the front
/// compensation while compensating; `None` when there is nothing left.
fn cursor(def: &dyn ErasedSaga, inst: &SagaInstance) -> Option<(usize, StepKind)> {
    cursor_of(def, inst.state, &inst.progress)
}

fn cursor_of(
    def: &dyn ErasedSaga,
    state: SagaState,
    progress: &crate::saga::state::SagaProgress,
) -> Option<(usize, StepKind)> {
    match state {
        SagaState::Running => {
            (progress.step < def.steps().len()).then_some((progress.step, StepKind::Action))
        }
        SagaState::Compensating => progress
            .compensations
            .first()
            .map(|s| (*s, StepKind::Compensation)),
        _ => None,
    }
}

/// Turns `t` into the final transition of a saga with nothing left to do.
fn finish(t: &mut SagaTransition, inst: &SagaInstance) {
    let (state, kind) = match inst.state {
        SagaState::Running => (SagaState::Completed, HistoryKind::SagaCompleted),
        _ => (SagaState::Compensated, HistoryKind::SagaCompensated),
    };
    t.state = state;
    t.history.push(HistoryEvent::saga(kind));
    t.wake = Wake::Never;
    t.lease = LeaseUpdate::Release;
}

/// Switches `t` to compensation: completed steps with a compensation, in
/// reverse order, preceded by `uncertain` (a step whose effect is unknown
/// because it timed out or was interrupted) if it has a compensation. With
/// nothing to compensate, the saga is `Failed`.
fn begin_compensation(
    t: &mut SagaTransition,
    def: &dyn ErasedSaga,
    reason: String,
    uncertain: Option<usize>,
) {
    let steps = def.steps();
    let mut comps: Vec<usize> = t
        .progress
        .completed
        .iter()
        .rev()
        .copied()
        .filter(|s| steps[*s].has_compensation)
        .collect();
    if let Some(u) = uncertain
        && steps[u].has_compensation
        && !t.progress.completed.contains(&u)
    {
        comps.insert(0, u);
    }
    t.progress.compensations = comps;
    t.progress.attempt = 0;
    t.progress.in_flight = None;
    if t.progress.compensations.is_empty() {
        t.state = SagaState::Failed;
        t.history
            .push(HistoryEvent::saga(HistoryKind::SagaFailed).with_error(&reason));
        t.wake = Wake::Never;
        t.lease = LeaseUpdate::Release;
    } else {
        t.state = SagaState::Compensating;
        t.history
            .push(HistoryEvent::saga(HistoryKind::CompensationRequired).with_error(&reason));
        t.wake = Wake::Now;
    }
    t.last_error = Some(reason);
}

/// The span of one attempt of (`step`, `kind`): a child of the current span
/// when there is one (the consume span of the reply that moved the saga on),
/// otherwise continuing the trace the saga was started in (a worker or a
/// timer driving it). A compensation is counted as it starts.
fn step_span(inst: &SagaInstance, step_name: &str, kind: StepKind) -> tracing::Span {
    let parent = if vextrus_telemetry::current_trace_context().is_some() {
        None
    } else {
        inst.progress.trace_context.as_ref()
    };
    match kind {
        StepKind::Action => {
            vextrus_telemetry::spans::saga_step(inst.id, &inst.saga_type, step_name, parent)
        }
        StepKind::Compensation => {
            vextrus_telemetry::record::saga_compensation(&inst.saga_type, step_name);
            vextrus_telemetry::spans::saga_compensation(inst.id, &inst.saga_type, step_name, parent)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::saga::definition::{Action, SagaDefinition, Step};
    use crate::saga::memory::InMemorySagaStore;

    fn registry() -> SagaRegistry {
        let r = SagaRegistry::new();
        r.register(
            SagaDefinition::new("local", 1)
                .step(Step::new(
                    "a",
                    Action::local(|n: u32, _ctx| async move { StepOutcome::Success(n + 1) }),
                ))
                .step(
                    Step::new(
                        "b",
                        Action::local(|n: u32, _ctx| async move { StepOutcome::Success(n + 1) }),
                    )
                    .compensate_with(Action::local(
                        |n: u32, _ctx| async move { StepOutcome::Success(n - 1) },
                    )),
                ),
        )
        .unwrap();
        r
    }

    /// Counts commits, delegating everything to the in-memory store.
    #[derive(Clone, Default)]
    struct Counting {
        inner: InMemorySagaStore,
        commits: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl SagaStore for Counting {
        async fn now(&self) -> Result<chrono::DateTime<chrono::Utc>, SagaError> {
            self.inner.now().await
        }
        async fn create(&self, new: NewSaga) -> Result<SagaInstance, SagaError> {
            self.inner.create(new).await
        }
        async fn load(&self, id: SagaId) -> Result<Option<SagaInstance>, SagaError> {
            self.inner.load(id).await
        }
        async fn history(&self, id: SagaId) -> Result<Vec<HistoryEntry>, SagaError> {
            self.inner.history(id).await
        }
        async fn count_by_state(&self) -> Result<Vec<crate::saga::SagaCount>, SagaError> {
            self.inner.count_by_state().await
        }
        async fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaInstance>, SagaError> {
            self.inner.list(filter).await
        }
        async fn claim_due(
            &self,
            worker: &str,
            lease: Duration,
            limit: usize,
        ) -> Result<Vec<Claim>, SagaError> {
            self.inner.claim_due(worker, lease, limit).await
        }
        async fn claim(
            &self,
            id: SagaId,
            worker: &str,
            lease: Duration,
        ) -> Result<Claim, SagaError> {
            self.inner.claim(id, worker, lease).await
        }
        async fn commit(&self, t: SagaTransition) -> Result<SagaInstance, SagaError> {
            self.commits
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.commit(t).await
        }
        async fn release(&self, id: SagaId, token: u64) -> Result<(), SagaError> {
            self.inner.release(id, token).await
        }
        async fn message_handled(&self, message_id: Uuid) -> Result<bool, SagaError> {
            self.inner.message_handled(message_id).await
        }
    }

    #[tokio::test]
    async fn each_step_costs_one_commit() {
        let store = Counting::default();
        let orch = Orchestrator::new(store.clone(), registry());
        let id = orch.start("local", &0u32).await.unwrap();
        orch.run_until_idle().await.unwrap();
        let view = orch.show(id).await.unwrap();
        assert_eq!(view.instance.state, SagaState::Completed);
        // start a; a succeeded + start b; b succeeded + saga completed.
        assert_eq!(store.commits.load(std::sync::atomic::Ordering::SeqCst), 3);
        let kinds: Vec<_> = view.history.iter().map(|h| h.event.kind).collect();
        assert_eq!(
            kinds,
            [
                HistoryKind::SagaStarted,
                HistoryKind::StepStarted,
                HistoryKind::StepSucceeded,
                HistoryKind::StepStarted,
                HistoryKind::StepSucceeded,
                HistoryKind::SagaCompleted
            ]
        );
    }

    #[tokio::test]
    async fn a_reply_never_answers_a_local_step() {
        let orch = Orchestrator::new(InMemorySagaStore::new(), registry());
        let id = orch.start("local", &0u32).await.unwrap();
        let forged = SagaReply {
            message_id: Uuid::now_v7(),
            saga_id: id,
            step: 0,
            kind: StepKind::Action,
            outcome: ReplyOutcome::Success(json!({})),
        };
        assert_eq!(
            orch.handle_reply(&forged).await.unwrap(),
            ReplyDisposition::Ignored
        );
        let inst = orch.show(id).await.unwrap().instance;
        assert_eq!(inst.progress.step, 0);
        assert_eq!(inst.data, json!(0));
        assert!(inst.lease.is_none(), "the reply's claim was released");
        orch.run_until_idle().await.unwrap();
        let inst = orch.show(id).await.unwrap().instance;
        assert_eq!((inst.state, inst.data), (SagaState::Completed, json!(2)));
    }

    #[tokio::test]
    async fn aborting_before_anything_to_undo_fails_the_saga() {
        let orch = Orchestrator::new(InMemorySagaStore::new(), registry());
        let id = orch.start("local", &0u32).await.unwrap();
        let inst = orch.abort(id, "changed my mind").await.unwrap();
        assert_eq!(inst.state, SagaState::Failed);
        assert_eq!(inst.last_error.as_deref(), Some("aborted: changed my mind"));
        assert_eq!(orch.run_until_idle().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn start_with_id_is_idempotent_per_type() {
        let orch = Orchestrator::new(InMemorySagaStore::new(), registry());
        let id = SagaId::new();
        assert_eq!(orch.start_with_id(id, "local", &5u32).await.unwrap(), id);
        assert_eq!(orch.start_with_id(id, "local", &9u32).await.unwrap(), id);
        assert_eq!(orch.show(id).await.unwrap().instance.data, json!(5));
        assert!(matches!(
            orch.start("missing", &1u32).await,
            Err(SagaError::UnknownDefinition { version: 0, .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn run_stops_on_shutdown_and_drives_what_is_due() {
        let orch = Orchestrator::new(InMemorySagaStore::new(), registry());
        let id = orch.start("local", &1u32).await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let worker = orch.clone();
        let task = tokio::spawn(async move {
            worker
                .run(async move {
                    let _ = rx.await;
                })
                .await;
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            orch.show(id).await.unwrap().instance.state,
            SagaState::Completed
        );
        tx.send(()).unwrap();
        task.await.unwrap();
    }
}
