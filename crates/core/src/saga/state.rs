//! The durable shape of a saga: its id, state, progress, history, and the
//! messages it sends and receives.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// The id of one saga instance.
///
/// ```
/// use vextrus_core::saga::SagaId;
///
/// let id = SagaId::new();
/// assert_eq!(id.to_string().parse::<SagaId>().unwrap(), id);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SagaId(pub Uuid);

impl SagaId {
    /// A new, time-ordered (UUIDv7) id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id as a UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for SagaId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for SagaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for SagaId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// Where a saga is in its life. See the [module docs](crate::saga) for the
/// state machine.
///
/// ```
/// use vextrus_core::saga::SagaState;
///
/// assert!(SagaState::Compensated.is_terminal());
/// assert!(!SagaState::CompensationFailed.is_terminal());
/// assert_eq!("compensation_failed".parse::<SagaState>().unwrap(), SagaState::CompensationFailed);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaState {
    /// Steps are being executed forwards.
    Running,
    /// Completed steps are being compensated in reverse order.
    Compensating,
    /// Every step succeeded. Terminal.
    Completed,
    /// A step failed (or the saga was aborted) and every compensation that was
    /// needed is confirmed. Terminal.
    Compensated,
    /// A compensation failed past its retry budget (or with a business
    /// failure). Not terminal: it waits for an operator's `retry`.
    CompensationFailed,
    /// A step failed before any step with an effect to undo had completed, so
    /// there was nothing to compensate. Terminal.
    Failed,
}

impl SagaState {
    /// Every state, in declaration order.
    pub const ALL: [SagaState; 6] = [
        SagaState::Running,
        SagaState::Compensating,
        SagaState::Completed,
        SagaState::Compensated,
        SagaState::CompensationFailed,
        SagaState::Failed,
    ];

    /// Whether the saga is finished for good (no worker or operator will
    /// change it again).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            SagaState::Completed | SagaState::Compensated | SagaState::Failed
        )
    }

    /// A stable lower-case name (the one stored by SQL backends).
    pub fn as_str(self) -> &'static str {
        match self {
            SagaState::Running => "running",
            SagaState::Compensating => "compensating",
            SagaState::Completed => "completed",
            SagaState::Compensated => "compensated",
            SagaState::CompensationFailed => "compensation_failed",
            SagaState::Failed => "failed",
        }
    }
}

impl fmt::Display for SagaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SagaState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SagaState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown saga state {s:?}"))
    }
}

/// Whether a step's action or its compensation is meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// The step's forward action.
    Action,
    /// The step's compensation.
    Compensation,
}

impl StepKind {
    /// `"action"` or `"compensation"`.
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Action => "action",
            StepKind::Compensation => "compensation",
        }
    }
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The idempotency key a participant gets for one step's action or
/// compensation: derived from (saga id, step index, kind) only, so every
/// retry and every resend after a timeout carries the same key.
///
/// ```
/// use vextrus_core::saga::{idempotency_key, SagaId, StepKind};
///
/// let id = SagaId::new();
/// assert_eq!(idempotency_key(id, 2, StepKind::Action), format!("saga:{id}:2:action"));
/// assert_ne!(idempotency_key(id, 2, StepKind::Action), idempotency_key(id, 2, StepKind::Compensation));
/// ```
pub fn idempotency_key(saga_id: SagaId, step: usize, kind: StepKind) -> String {
    format!("saga:{saga_id}:{step}:{kind}")
}

/// For the idempotency key of a step's compensation, the key of the action it
/// compensates (same saga, same step); `None` for any other key.
///
/// A participant uses it to fence a late action: the orchestrator may time a
/// step out and compensate it while the action's command is still on its way
/// (a slow relay, a redelivery, a restarted orchestrator). If the
/// compensation finds nothing to undo, the participant records the action's
/// key as compensated in the same transaction, so the action, when it
/// arrives, is refused instead of taking effect after its own undo (the
/// "suspended action" of TCC; without the fence a late stock reservation or
/// payment capture outlives its compensated saga).
///
/// ```
/// use vextrus_core::saga::{compensated_action_key, idempotency_key, SagaId, StepKind};
///
/// let id = SagaId::new();
/// let comp = idempotency_key(id, 5, StepKind::Compensation);
/// assert_eq!(compensated_action_key(&comp), Some(idempotency_key(id, 5, StepKind::Action)));
/// assert_eq!(compensated_action_key(&idempotency_key(id, 5, StepKind::Action)), None);
/// assert_eq!(compensated_action_key("order-17"), None);
/// assert_eq!(compensated_action_key("saga:not-a-uuid:5:compensation"), None);
/// ```
pub fn compensated_action_key(key: &str) -> Option<String> {
    let rest = key.strip_prefix("saga:")?;
    let head = rest.strip_suffix(":compensation")?;
    let (id, step) = head.rsplit_once(':')?;
    let id: SagaId = id.parse().ok()?;
    let step: usize = step.parse().ok()?;
    Some(idempotency_key(id, step, StepKind::Action))
}

/// An action or compensation that was started and has no recorded result
/// yet: a remote command awaiting its reply, or a local call in progress (or
/// interrupted by a crash). Its deadline is the instance's `due_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    /// The step index.
    pub step: usize,
    /// Action or compensation.
    pub kind: StepKind,
    /// The attempt number (1-based).
    pub attempt: u32,
    /// The id of the command message sent (remote steps only).
    pub message_id: Option<Uuid>,
    /// When the starting worker sent it, by that worker's clock: only for
    /// the step-latency metric (`vextrus_saga_step_seconds`), never for a
    /// decision — timers and leases use the store's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
}

/// How far a saga has got. Stored with the instance and replaced as a whole
/// by every transition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaProgress {
    /// While running: the index of the step being executed (equal to the
    /// number of steps once all are done).
    pub step: usize,
    /// Attempts made so far of the current action or compensation.
    pub attempt: u32,
    /// Indices of the steps whose action succeeded, in order.
    pub completed: Vec<usize>,
    /// While compensating: the steps still to compensate, the current one
    /// first (reverse order of completion).
    pub compensations: Vec<usize>,
    /// The started action or compensation awaiting its result, if any.
    pub in_flight: Option<InFlight>,
    /// The W3C trace context of the span that started the saga (the order's
    /// placement, say). A step driven with no span of its own around it (a
    /// worker resuming the saga, a timer) continues this trace, so one trace
    /// covers the whole business transaction across workers, processes and
    /// restarts. It lives here because every store persists the progress
    /// whole, as the orchestrator wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_context: Option<vextrus_kernel::TraceContext>,
}

/// A worker's lease on a saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The worker holding it.
    pub owner: String,
    /// When it expires, by the store's clock.
    pub expires_at: DateTime<Utc>,
}

/// One saga instance as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaInstance {
    /// Its id.
    pub id: SagaId,
    /// The definition's type name.
    pub saga_type: String,
    /// The definition version it started on (and finishes on).
    pub version: u32,
    /// Its state.
    pub state: SagaState,
    /// The saga data, as JSON.
    pub data: Value,
    /// How far it has got.
    pub progress: SagaProgress,
    /// When a worker should next act on it (a retry, a timeout, or now), by
    /// the store's clock; `None` when nothing is scheduled (terminal, or
    /// waiting for an operator).
    pub due_at: Option<DateTime<Utc>>,
    /// The current lease, if one was taken and not released.
    pub lease: Option<Lease>,
    /// Incremented on every claim; every write must carry the current value.
    pub fencing_token: u64,
    /// The last failure (the reason compensation started, or the last
    /// compensation error).
    pub last_error: Option<String>,
    /// When it was created, by the store's clock.
    pub created_at: DateTime<Utc>,
    /// When it last changed, by the store's clock.
    pub updated_at: DateTime<Utc>,
}

/// What happened, in one history entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryKind {
    /// The saga was created.
    SagaStarted,
    /// A step's action was started (its intent recorded; for a remote step,
    /// its command queued in the same transaction).
    StepStarted,
    /// A step's action succeeded.
    StepSucceeded,
    /// An attempt of a step's action failed.
    StepFailed,
    /// An attempt of a step's action got no result before its timeout.
    StepTimedOut,
    /// A retry was scheduled (the entry's attempt is the one that failed).
    RetryScheduled,
    /// The saga switched to compensating (the entry's error says why).
    CompensationRequired,
    /// A compensation was started.
    CompensationStarted,
    /// A compensation was confirmed.
    CompensationSucceeded,
    /// An attempt of a compensation failed.
    CompensationAttemptFailed,
    /// An attempt of a compensation got no result before its timeout.
    CompensationTimedOut,
    /// Every step succeeded.
    SagaCompleted,
    /// Every needed compensation is confirmed.
    SagaCompensated,
    /// A step failed with nothing to compensate.
    SagaFailed,
    /// A compensation failed for good; the saga waits for an operator.
    SagaCompensationFailed,
    /// An operator asked to retry the failed compensation.
    OperatorRetry,
    /// An operator asked to abort (compensate now).
    OperatorAbort,
    /// A reply that did not match what the saga waits for was consumed
    /// without effect (a late or duplicate answer).
    ReplyIgnored,
}

impl HistoryKind {
    /// A stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            HistoryKind::SagaStarted => "saga_started",
            HistoryKind::StepStarted => "step_started",
            HistoryKind::StepSucceeded => "step_succeeded",
            HistoryKind::StepFailed => "step_failed",
            HistoryKind::StepTimedOut => "step_timed_out",
            HistoryKind::RetryScheduled => "retry_scheduled",
            HistoryKind::CompensationRequired => "compensation_required",
            HistoryKind::CompensationStarted => "compensation_started",
            HistoryKind::CompensationSucceeded => "compensation_succeeded",
            HistoryKind::CompensationAttemptFailed => "compensation_attempt_failed",
            HistoryKind::CompensationTimedOut => "compensation_timed_out",
            HistoryKind::SagaCompleted => "saga_completed",
            HistoryKind::SagaCompensated => "saga_compensated",
            HistoryKind::SagaFailed => "saga_failed",
            HistoryKind::SagaCompensationFailed => "saga_compensation_failed",
            HistoryKind::OperatorRetry => "operator_retry",
            HistoryKind::OperatorAbort => "operator_abort",
            HistoryKind::ReplyIgnored => "reply_ignored",
        }
    }
}

impl fmt::Display for HistoryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A history entry as written by a transition (the store adds its time,
/// sequence number and worker).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEvent {
    /// What happened.
    pub kind: HistoryKind,
    /// The step concerned, if any.
    pub step: Option<usize>,
    /// The step's name, if any.
    pub step_name: Option<String>,
    /// The attempt concerned, if any.
    pub attempt: Option<u32>,
    /// The error, for failures.
    pub error: Option<String>,
}

impl HistoryEvent {
    /// An entry about the saga as a whole.
    pub fn saga(kind: HistoryKind) -> Self {
        Self {
            kind,
            step: None,
            step_name: None,
            attempt: None,
            error: None,
        }
    }

    /// An entry about one step.
    pub fn step(kind: HistoryKind, step: usize, name: &str, attempt: Option<u32>) -> Self {
        Self {
            kind,
            step: Some(step),
            step_name: Some(name.to_owned()),
            attempt,
            error: None,
        }
    }

    /// The same entry with an error.
    pub fn with_error(mut self, error: impl Into<String>) -> Self {
        self.error = Some(error.into());
        self
    }
}

/// One entry of a saga's append-only timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// 1-based position in the saga's timeline.
    pub seq: u64,
    /// When it was recorded, by the store's clock.
    pub at: DateTime<Utc>,
    /// The worker whose transition recorded it (`None` for starts).
    pub worker: Option<String>,
    /// What happened.
    #[serde(flatten)]
    pub event: HistoryEvent,
}

/// A command to a participant, queued in the outbox by the transition that
/// starts a remote action or compensation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaCommand {
    /// This message's id (new for each send; a resend gets a new id but the
    /// same idempotency key).
    pub message_id: Uuid,
    /// The saga.
    pub saga_id: SagaId,
    /// The saga's type name.
    pub saga_type: String,
    /// The step index.
    pub step: usize,
    /// The step's name.
    pub step_name: String,
    /// Action or compensation.
    pub kind: StepKind,
    /// The attempt number (1-based).
    pub attempt: u32,
    /// Stable across retries: see [`idempotency_key`].
    pub idempotency_key: String,
    /// Where to send it (a participant's topic or subject).
    pub destination: String,
    /// The command's type name.
    pub command_type: String,
    /// The command's body.
    pub payload: Value,
}

impl SagaCommand {
    /// The reply to this command with the given outcome (a fresh message id).
    pub fn reply(&self, outcome: ReplyOutcome) -> SagaReply {
        SagaReply {
            message_id: Uuid::now_v7(),
            saga_id: self.saga_id,
            step: self.step,
            kind: self.kind,
            outcome,
        }
    }
}

/// How a participant answered a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "body", rename_all = "snake_case")]
pub enum ReplyOutcome {
    /// Done; the body is handed to the step's reply handler.
    Success(Value),
    /// Failed for a passing reason; the step's retry policy applies.
    RetryableFailure(String),
    /// Refused for a business reason; compensation starts (for a
    /// compensation: the saga goes to `CompensationFailed`).
    BusinessFailure(String),
}

/// A participant's reply, as the orchestrator's inbox consumer hands it to
/// [`Orchestrator::handle_reply`](crate::saga::Orchestrator::handle_reply).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaReply {
    /// The reply message's id: recorded in the same transaction as the
    /// transition it causes, so a redelivered reply has no second effect.
    pub message_id: Uuid,
    /// The saga.
    pub saga_id: SagaId,
    /// The step answered.
    pub step: usize,
    /// Action or compensation.
    pub kind: StepKind,
    /// The answer.
    pub outcome: ReplyOutcome,
}

/// Which sagas [`SagaStore::list`](crate::saga::SagaStore::list) returns.
///
/// ```
/// use std::time::Duration;
/// use vextrus_core::saga::{SagaFilter, SagaState};
///
/// let f = SagaFilter::default()
///     .saga_type("order_to_cash")
///     .state(SagaState::CompensationFailed)
///     .older_than(Duration::from_secs(60));
/// assert_eq!(f.states, vec![SagaState::CompensationFailed]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaFilter {
    /// Only this type, if set.
    pub saga_type: Option<String>,
    /// Only these states, if not empty.
    pub states: Vec<SagaState>,
    /// Only sagas created at least this long ago (by the store's clock).
    pub older_than: Option<Duration>,
    /// Only sagas created at most this long ago (by the store's clock).
    pub newer_than: Option<Duration>,
    /// At most this many, oldest first.
    pub limit: usize,
}

impl Default for SagaFilter {
    fn default() -> Self {
        Self {
            saga_type: None,
            states: Vec::new(),
            older_than: None,
            newer_than: None,
            limit: 1000,
        }
    }
}

impl SagaFilter {
    /// Only sagas of this type.
    pub fn saga_type(mut self, saga_type: impl Into<String>) -> Self {
        self.saga_type = Some(saga_type.into());
        self
    }

    /// Also sagas in this state (the first call restricts to it).
    pub fn state(mut self, state: SagaState) -> Self {
        self.states.push(state);
        self
    }

    /// Only sagas created at least `age` ago.
    pub fn older_than(mut self, age: Duration) -> Self {
        self.older_than = Some(age);
        self
    }

    /// Only sagas created at most `age` ago.
    pub fn newer_than(mut self, age: Duration) -> Self {
        self.newer_than = Some(age);
        self
    }

    /// At most `limit` sagas.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// Whether `instance` passes the filter at store time `now` (the limit
    /// aside). Backends may use this or translate the filter to a query.
    pub fn matches(&self, instance: &SagaInstance, now: DateTime<Utc>) -> bool {
        let age = (now - instance.created_at).to_std().unwrap_or_default();
        self.saga_type
            .as_ref()
            .is_none_or(|t| *t == instance.saga_type)
            && (self.states.is_empty() || self.states.contains(&instance.state))
            && self.older_than.is_none_or(|d| age >= d)
            && self.newer_than.is_none_or(|d| age <= d)
    }
}
