//! Saga definitions: typed data, ordered steps (local or remote), each with
//! an action, an optional compensation, a timeout and retry policies; and the
//! registry that keeps every version of every definition.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::saga::error::SagaError;
use crate::saga::state::{SagaId, StepKind};

/// What saga data must be: serializable (it is stored with every transition),
/// cloneable and shareable. Implemented for every such type.
pub trait SagaData: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}

impl<T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> SagaData for T {}

/// How one attempt of an action or compensation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome<D> {
    /// Done, with the (possibly updated) saga data.
    Success(D),
    /// Failed for a passing reason: retried per the step's policy.
    RetryableFailure(String),
    /// Refused for a business reason: for an action, compensation starts; for
    /// a compensation, the saga goes to `CompensationFailed` at once.
    BusinessFailure(String),
}

/// Retry policy of one action or compensation: how many attempts, and the
/// exponential backoff between them. Delays become durable due-times in the
/// store, never in-memory sleeps, so a restart keeps them.
///
/// (`vextrus_resilience::RetryPolicy` drives an in-process retry loop with
/// jittered sleeps; a saga needs the delay of attempt *n* as a number to
/// store, hence this small policy.) The growth is vextrus's one backoff
/// formula ([`vextrus_resilience::backoff_cap`]):
/// [`delay_after`](Self::delay_after) is its un-jittered cap,
/// [`jittered_delay_after`](Self::jittered_delay_after) the full-jitter draw
/// under that cap ([`vextrus_resilience::delay_for_attempt`]).
///
/// ```
/// use std::time::Duration;
/// use vextrus_core::saga::StepRetry;
///
/// let p = StepRetry::new(4).backoff(Duration::from_millis(100), 2, Duration::from_millis(300));
/// assert_eq!(p.delay_after(1), Duration::from_millis(100));
/// assert_eq!(p.delay_after(2), Duration::from_millis(200));
/// assert_eq!(p.delay_after(3), Duration::from_millis(300)); // capped
/// assert!(p.can_retry_after(3));
/// assert!(!p.can_retry_after(4));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepRetry {
    /// Total attempts allowed (at least 1).
    pub max_attempts: u32,
    /// The delay after the first failed attempt.
    pub initial_delay: Duration,
    /// The multiplier applied per further failure.
    pub factor: u32,
    /// The largest delay.
    pub max_delay: Duration,
}

impl Default for StepRetry {
    /// 3 attempts, 100 ms doubling up to 10 s.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_delay: Duration::from_millis(100),
            factor: 2,
            max_delay: Duration::from_secs(10),
        }
    }
}

impl StepRetry {
    /// `max_attempts` attempts (at least 1) with the default backoff.
    pub fn new(max_attempts: u32) -> Self {
        Self {
            max_attempts: max_attempts.max(1),
            ..Self::default()
        }
    }

    /// One attempt, no retry.
    pub fn none() -> Self {
        Self::new(1)
    }

    /// Sets the backoff: `initial`, multiplied by `factor` per failure, capped at `max`.
    pub fn backoff(mut self, initial: Duration, factor: u32, max: Duration) -> Self {
        self.initial_delay = initial;
        self.factor = factor.max(1);
        self.max_delay = max;
        self
    }

    /// Whether another attempt is allowed after `attempt` (1-based) failed.
    pub fn can_retry_after(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The delay before the attempt that follows failed attempt `attempt`
    /// (1-based), un-jittered: `min(max_delay, initial_delay *
    /// factor^(attempt-1))`.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        vextrus_resilience::backoff_cap(
            attempt,
            self.initial_delay,
            self.max_delay,
            f64::from(self.factor),
        )
        .min(self.max_delay)
    }

    /// The same delay with full jitter: drawn uniformly from
    /// `[0, delay_after(attempt)]`, so sagas failing together do not retry
    /// together.
    ///
    /// ```
    /// use std::time::Duration;
    /// use vextrus_core::saga::StepRetry;
    ///
    /// let p = StepRetry::new(4).backoff(Duration::from_millis(100), 2, Duration::from_millis(300));
    /// assert!(p.jittered_delay_after(2) <= Duration::from_millis(200));
    /// ```
    pub fn jittered_delay_after(&self, attempt: u32) -> Duration {
        vextrus_resilience::full_jitter(self.delay_after(attempt))
    }
}

/// What an action or compensation is told about the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepContext {
    /// The saga.
    pub saga_id: SagaId,
    /// The step index.
    pub step: usize,
    /// The step name.
    pub step_name: String,
    /// Action or compensation.
    pub kind: StepKind,
    /// The attempt number (1-based).
    pub attempt: u32,
    /// Stable across attempts: see [`idempotency_key`](crate::saga::idempotency_key).
    pub idempotency_key: String,
}

/// A command a remote step sends to its participant.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteCommand {
    /// The participant's topic or subject.
    pub destination: String,
    /// The command's type name.
    pub command_type: String,
    /// The command's body.
    pub payload: Value,
}

impl RemoteCommand {
    /// A command of `command_type` with `payload`, to `destination`.
    pub fn new(
        destination: impl Into<String>,
        command_type: impl Into<String>,
        payload: Value,
    ) -> Self {
        Self {
            destination: destination.into(),
            command_type: command_type.into(),
            payload,
        }
    }
}

type LocalFn<D> = Arc<dyn Fn(D, StepContext) -> BoxFuture<'static, StepOutcome<D>> + Send + Sync>;
type CommandFn<D> = Arc<dyn Fn(&D, &StepContext) -> RemoteCommand + Send + Sync>;
type ReplyFn<D> = Arc<dyn Fn(D, &Value) -> Result<D, String> + Send + Sync>;

/// An action or a compensation: local (an async function run in the
/// orchestrator's process) or remote (a command to a participant, answered by
/// a reply).
pub struct Action<D> {
    inner: ActionInner<D>,
}

enum ActionInner<D> {
    Local(LocalFn<D>),
    Remote {
        command: CommandFn<D>,
        on_success: ReplyFn<D>,
    },
}

impl<D> Clone for Action<D> {
    fn clone(&self) -> Self {
        let inner = match &self.inner {
            ActionInner::Local(f) => ActionInner::Local(f.clone()),
            ActionInner::Remote {
                command,
                on_success,
            } => ActionInner::Remote {
                command: command.clone(),
                on_success: on_success.clone(),
            },
        };
        Self { inner }
    }
}

impl<D> fmt::Debug for Action<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_remote() {
            "Action::Remote"
        } else {
            "Action::Local"
        })
    }
}

impl<D: SagaData> Action<D> {
    /// A local action: `f(data, ctx)` runs in the orchestrator's process. It
    /// must be idempotent by `ctx.idempotency_key` (a crash can repeat it).
    pub fn local<F, Fut>(f: F) -> Self
    where
        F: Fn(D, StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = StepOutcome<D>> + Send + 'static,
    {
        Self {
            inner: ActionInner::Local(Arc::new(move |d, ctx| f(d, ctx).boxed())),
        }
    }

    /// A remote action whose success reply leaves the data unchanged.
    pub fn remote<F>(command: F) -> Self
    where
        F: Fn(&D, &StepContext) -> RemoteCommand + Send + Sync + 'static,
    {
        Self::remote_with_reply(command, |d, _| Ok(d))
    }

    /// A remote action whose success reply body updates the data through
    /// `on_success` (an `Err` from it counts as a business failure).
    pub fn remote_with_reply<F, R>(command: F, on_success: R) -> Self
    where
        F: Fn(&D, &StepContext) -> RemoteCommand + Send + Sync + 'static,
        R: Fn(D, &Value) -> Result<D, String> + Send + Sync + 'static,
    {
        Self {
            inner: ActionInner::Remote {
                command: Arc::new(command),
                on_success: Arc::new(on_success),
            },
        }
    }
}

impl<D> Action<D> {
    /// Whether this is a remote action.
    pub fn is_remote(&self) -> bool {
        matches!(self.inner, ActionInner::Remote { .. })
    }
}

/// One step of a saga.
///
/// ```
/// use std::time::Duration;
/// use vextrus_core::saga::{Action, RemoteCommand, Step, StepOutcome, StepRetry};
///
/// let reserve: Step<u32> = Step::new(
///     "reserve",
///     Action::remote(|qty: &u32, _ctx| RemoteCommand::new("inventory", "reserve", serde_json::json!({"qty": qty}))),
/// )
/// .compensate_with(Action::remote(|_: &u32, _ctx| RemoteCommand::new("inventory", "release", serde_json::json!({}))))
/// .timeout(Duration::from_secs(5))
/// .retry(StepRetry::new(5));
/// assert!(reserve.has_compensation());
/// ```
#[derive(Debug)]
pub struct Step<D> {
    name: String,
    action: Action<D>,
    compensation: Option<Action<D>>,
    timeout: Duration,
    retry: StepRetry,
    compensation_retry: StepRetry,
}

impl<D> Clone for Step<D> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            action: self.action.clone(),
            compensation: self.compensation.clone(),
            timeout: self.timeout,
            retry: self.retry,
            compensation_retry: self.compensation_retry,
        }
    }
}

impl<D: SagaData> Step<D> {
    /// A step with no compensation (it has no effect to undo), a 30 s
    /// timeout, and default retry policies ([`StepRetry::default`] for the
    /// action, 5 attempts for a compensation).
    pub fn new(name: impl Into<String>, action: Action<D>) -> Self {
        Self {
            name: name.into(),
            action,
            compensation: None,
            timeout: Duration::from_secs(30),
            retry: StepRetry::default(),
            compensation_retry: StepRetry::new(5),
        }
    }

    /// Sets the compensation that undoes this step's action.
    pub fn compensate_with(mut self, compensation: Action<D>) -> Self {
        self.compensation = Some(compensation);
        self
    }

    /// Sets the timeout of each attempt (action and compensation).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the action's retry policy.
    pub fn retry(mut self, retry: StepRetry) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the compensation's retry policy.
    pub fn compensation_retry(mut self, retry: StepRetry) -> Self {
        self.compensation_retry = retry;
        self
    }

    /// The step's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the step has a compensation.
    pub fn has_compensation(&self) -> bool {
        self.compensation.is_some()
    }
}

/// A saga definition: a type name, a version, and ordered steps over data `D`.
///
/// ```
/// use vextrus_core::saga::{Action, SagaDefinition, Step, StepOutcome};
///
/// let def = SagaDefinition::<u32>::new("double", 1)
///     .step(Step::new("double", Action::local(|n: u32, _ctx| async move { StepOutcome::Success(n * 2) })));
/// assert_eq!(def.name(), "double");
/// assert_eq!(def.version(), 1);
/// assert_eq!(def.len(), 1);
/// ```
#[derive(Debug)]
pub struct SagaDefinition<D> {
    name: String,
    version: u32,
    steps: Vec<Step<D>>,
}

impl<D: SagaData> SagaDefinition<D> {
    /// An empty definition of type `name`, version `version` (at least 1).
    pub fn new(name: impl Into<String>, version: u32) -> Self {
        Self {
            name: name.into(),
            version,
            steps: Vec::new(),
        }
    }

    /// Appends a step.
    pub fn step(mut self, step: Step<D>) -> Self {
        self.steps.push(step);
        self
    }

    /// The type name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The number of steps.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether it has no step.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The steps, in order.
    pub fn steps(&self) -> &[Step<D>] {
        &self.steps
    }

    fn validate(&self) -> Result<(), SagaError> {
        let bad = |m: String| Err(SagaError::InvalidDefinition(m));
        if self.name.trim().is_empty() {
            return bad("the type name is empty".into());
        }
        if self.version == 0 {
            return bad(format!("{}: versions start at 1", self.name));
        }
        if self.steps.is_empty() {
            return bad(format!("{} v{}: no step", self.name, self.version));
        }
        let mut names = std::collections::HashSet::new();
        for s in &self.steps {
            if !names.insert(s.name.as_str()) {
                return bad(format!(
                    "{} v{}: step name {:?} used twice",
                    self.name, self.version, s.name
                ));
            }
            if s.timeout.is_zero() {
                return bad(format!(
                    "{}: step {:?} has a zero timeout",
                    self.name, s.name
                ));
            }
        }
        Ok(())
    }
}

/// Static facts about one step, as the engine needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StepInfo {
    pub(crate) name: String,
    pub(crate) timeout: Duration,
    pub(crate) retry: StepRetry,
    pub(crate) compensation_retry: StepRetry,
    pub(crate) has_compensation: bool,
    pub(crate) remote_action: bool,
    pub(crate) remote_compensation: bool,
}

impl StepInfo {
    pub(crate) fn is_remote(&self, kind: StepKind) -> bool {
        match kind {
            StepKind::Action => self.remote_action,
            StepKind::Compensation => self.remote_compensation,
        }
    }

    pub(crate) fn policy(&self, kind: StepKind) -> StepRetry {
        match kind {
            StepKind::Action => self.retry,
            StepKind::Compensation => self.compensation_retry,
        }
    }
}

/// How the engine runs one action or compensation.
pub(crate) enum Invocation {
    /// Run this future (a local call).
    Local(BoxFuture<'static, StepOutcome<Value>>),
    /// Send this command (a remote call).
    Remote(RemoteCommand),
}

/// A definition with its data type erased to JSON, so the orchestrator and
/// the registry need no type parameter.
pub(crate) trait ErasedSaga: Send + Sync {
    fn steps(&self) -> &[StepInfo];
    fn invoke(&self, step: usize, kind: StepKind, data: &Value, ctx: StepContext) -> Invocation;
    fn apply_reply(&self, step: usize, data: &Value, body: &Value) -> Result<Value, String>;
}

struct Erased<D> {
    def: SagaDefinition<D>,
    info: Vec<StepInfo>,
}

fn to_value<D: Serialize>(d: &D) -> StepOutcome<Value> {
    match serde_json::to_value(d) {
        Ok(v) => StepOutcome::Success(v),
        Err(e) => StepOutcome::BusinessFailure(format!("saga data could not be serialized: {e}")),
    }
}

impl<D: SagaData> ErasedSaga for Erased<D> {
    fn steps(&self) -> &[StepInfo] {
        &self.info
    }

    fn invoke(&self, step: usize, kind: StepKind, data: &Value, ctx: StepContext) -> Invocation {
        let s = &self.def.steps[step];
        let action = match kind {
            StepKind::Action => &s.action,
            StepKind::Compensation => match &s.compensation {
                Some(c) => c,
                None => {
                    return Invocation::Local(
                        async { StepOutcome::BusinessFailure("step has no compensation".into()) }
                            .boxed(),
                    );
                }
            },
        };
        let data: D = match serde_json::from_value(data.clone()) {
            Ok(d) => d,
            Err(e) => {
                let msg = format!("saga data could not be deserialized: {e}");
                return Invocation::Local(async move { StepOutcome::BusinessFailure(msg) }.boxed());
            }
        };
        match &action.inner {
            ActionInner::Local(f) => {
                let fut = f(data, ctx);
                Invocation::Local(
                    async move {
                        match fut.await {
                            StepOutcome::Success(d) => to_value(&d),
                            StepOutcome::RetryableFailure(r) => StepOutcome::RetryableFailure(r),
                            StepOutcome::BusinessFailure(r) => StepOutcome::BusinessFailure(r),
                        }
                    }
                    .boxed(),
                )
            }
            ActionInner::Remote { command, .. } => Invocation::Remote(command(&data, &ctx)),
        }
    }

    fn apply_reply(&self, step: usize, data: &Value, body: &Value) -> Result<Value, String> {
        let ActionInner::Remote { on_success, .. } = &self.def.steps[step].action.inner else {
            return Ok(data.clone());
        };
        let d: D = serde_json::from_value(data.clone())
            .map_err(|e| format!("saga data could not be deserialized: {e}"))?;
        let d = on_success(d, body)?;
        serde_json::to_value(&d).map_err(|e| format!("saga data could not be serialized: {e}"))
    }
}

type Definitions = BTreeMap<(String, u32), Arc<dyn ErasedSaga>>;

/// Every registered definition, by type name and version. Cloning gives
/// another handle to the same registry.
///
/// ```
/// use vextrus_core::saga::{Action, SagaDefinition, SagaRegistry, Step, StepOutcome};
///
/// let registry = SagaRegistry::new();
/// let step = || Step::new("noop", Action::local(|n: u32, _ctx| async move { StepOutcome::Success(n) }));
/// registry.register(SagaDefinition::new("s", 1).step(step())).unwrap();
/// registry.register(SagaDefinition::new("s", 2).step(step())).unwrap();
/// assert_eq!(registry.latest_version("s"), Some(2));
/// assert!(registry.register(SagaDefinition::new("s", 2).step(step())).is_err());
/// ```
#[derive(Clone, Default)]
pub struct SagaRegistry {
    defs: Arc<RwLock<Definitions>>,
}

impl fmt::Debug for SagaRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.definitions()).finish()
    }
}

impl SagaRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a definition. Errors if it is malformed, or if its (type,
    /// version) is already registered: a version, once used, never changes.
    pub fn register<D: SagaData>(&self, def: SagaDefinition<D>) -> Result<(), SagaError> {
        def.validate()?;
        let info = def
            .steps
            .iter()
            .map(|s| StepInfo {
                name: s.name.clone(),
                timeout: s.timeout,
                retry: s.retry,
                compensation_retry: s.compensation_retry,
                has_compensation: s.compensation.is_some(),
                remote_action: s.action.is_remote(),
                remote_compensation: s.compensation.as_ref().is_some_and(Action::is_remote),
            })
            .collect();
        let key = (def.name.clone(), def.version);
        let mut defs = self.defs.write().unwrap_or_else(|p| p.into_inner());
        if defs.contains_key(&key) {
            return Err(SagaError::InvalidDefinition(format!(
                "{} v{} is already registered",
                key.0, key.1
            )));
        }
        defs.insert(key, Arc::new(Erased { def, info }));
        Ok(())
    }

    /// The highest registered version of `saga_type`.
    pub fn latest_version(&self, saga_type: &str) -> Option<u32> {
        self.defs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .range((saga_type.to_owned(), 0)..=(saga_type.to_owned(), u32::MAX))
            .next_back()
            .map(|((_, v), _)| *v)
    }

    /// Every registered (type, version), sorted.
    pub fn definitions(&self) -> Vec<(String, u32)> {
        self.defs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    pub(crate) fn get(
        &self,
        saga_type: &str,
        version: u32,
    ) -> Result<Arc<dyn ErasedSaga>, SagaError> {
        self.defs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(saga_type.to_owned(), version))
            .cloned()
            .ok_or_else(|| SagaError::UnknownDefinition {
                saga_type: saga_type.to_owned(),
                version,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noop() -> Action<u32> {
        Action::local(|n: u32, _ctx| async move { StepOutcome::Success(n) })
    }

    #[test]
    fn malformed_definitions_are_rejected() {
        let r = SagaRegistry::new();
        assert!(r.register(SagaDefinition::<u32>::new("empty", 1)).is_err());
        assert!(
            r.register(SagaDefinition::new("v0", 0).step(Step::new("a", noop())))
                .is_err()
        );
        assert!(
            r.register(
                SagaDefinition::new("dup", 1)
                    .step(Step::new("a", noop()))
                    .step(Step::new("a", noop()))
            )
            .is_err()
        );
        assert!(
            r.register(
                SagaDefinition::new("t", 1).step(Step::new("a", noop()).timeout(Duration::ZERO))
            )
            .is_err()
        );
        assert!(r.definitions().is_empty());
    }

    #[test]
    fn backoff_grows_and_caps() {
        let p = StepRetry::new(10).backoff(Duration::from_millis(10), 3, Duration::from_secs(1));
        let delays: Vec<_> = (1..=6).map(|a| p.delay_after(a).as_millis()).collect();
        assert_eq!(delays, vec![10, 30, 90, 270, 810, 1000]);
        assert_eq!(p.delay_after(u32::MAX), Duration::from_secs(1));
        assert_eq!(StepRetry::new(0).max_attempts, 1);
    }

    #[test]
    fn step_retry_uses_the_shared_formula() {
        let p = StepRetry::new(10).backoff(Duration::from_millis(10), 3, Duration::from_secs(1));
        let shared = vextrus_resilience::ExponentialBackoff::new(
            Duration::from_millis(10),
            Duration::from_secs(1),
            3.0,
        );
        for a in 1..=40 {
            assert_eq!(p.delay_after(a), shared.cap(a), "attempt {a}");
            assert!(p.jittered_delay_after(a) <= p.delay_after(a));
        }
    }
}
