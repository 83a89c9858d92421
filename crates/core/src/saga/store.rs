//! The saga store contract: what a backend must do, each transition in one
//! transaction.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::saga::error::SagaError;
use crate::saga::state::{
    HistoryEntry, HistoryEvent, SagaCommand, SagaFilter, SagaId, SagaInstance, SagaProgress,
    SagaState,
};

/// A saga to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSaga {
    /// Its id.
    pub id: SagaId,
    /// The definition's type name.
    pub saga_type: String,
    /// The definition version it runs on.
    pub version: u32,
    /// The initial data.
    pub data: Value,
    /// The trace the saga continues (see [`SagaProgress::trace_context`]);
    /// [`Orchestrator::start`](crate::saga::Orchestrator::start) sets it from
    /// the current span.
    pub trace_context: Option<vextrus_kernel::TraceContext>,
}

impl NewSaga {
    /// The progress a store gives the new saga: nothing done yet, and the
    /// trace context to continue.
    pub fn initial_progress(&self) -> SagaProgress {
        SagaProgress {
            trace_context: self.trace_context.clone(),
            ..SagaProgress::default()
        }
    }
}

/// When a worker should next act on the saga; the store turns it into a
/// `due_at` with its own clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Due now.
    Now,
    /// Due this long from now (a retry's backoff, a step's timeout).
    After(Duration),
    /// Nothing scheduled (terminal, or waiting for an operator).
    Never,
    /// Keep the current due time.
    Unchanged,
}

/// What a transition does with the writer's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseUpdate {
    /// Keep it, expiring this long from now (store clock).
    Extend(Duration),
    /// Give it up (the token stays; the next claim increments it).
    Release,
}

/// A claimed saga: the instance as it was when claimed, and the fencing
/// token every write must carry.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    /// The instance (its `fencing_token` equals `token`).
    pub instance: SagaInstance,
    /// The fencing token of this claim.
    pub token: u64,
}

/// One transition: the new state, data and progress, the history entries
/// explaining it, the commands to send and the reply that caused it; all
/// written in ONE transaction, only if `token` is still the saga's fencing
/// token.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaTransition {
    /// The saga.
    pub saga_id: SagaId,
    /// The writer's fencing token.
    pub token: u64,
    /// The worker writing (recorded in the history and the lease).
    pub worker: String,
    /// The new state.
    pub state: SagaState,
    /// The new data.
    pub data: Value,
    /// The new progress.
    pub progress: SagaProgress,
    /// The last failure to show.
    pub last_error: Option<String>,
    /// When it is next due.
    pub wake: Wake,
    /// What happens to the lease.
    pub lease: LeaseUpdate,
    /// Entries appended to the timeline, in order.
    pub history: Vec<HistoryEvent>,
    /// Commands queued in the outbox.
    pub commands: Vec<SagaCommand>,
    /// The reply message that caused this transition: recorded as handled
    /// (the inbox record); if it already was, nothing is written and the
    /// commit fails with [`SagaError::DuplicateMessage`].
    pub inbox_message_id: Option<Uuid>,
}

/// How many sagas of one type are in one state ([`SagaStore::count_by_state`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaCount {
    /// The definition's type name.
    pub saga_type: String,
    /// The state.
    pub state: SagaState,
    /// How many sagas of that type are in it.
    pub count: u64,
}

impl SagaCount {
    /// One row of a SQL store's `GROUP BY saga_type, state` count: the
    /// state as stored text, the count as the database's signed integer.
    ///
    /// ```
    /// use vextrus_core::saga::{SagaCount, SagaState};
    ///
    /// let c = SagaCount::from_row("order".into(), "completed", 3).unwrap();
    /// assert_eq!((c.state, c.count), (SagaState::Completed, 3));
    /// assert!(SagaCount::from_row("order".into(), "nonsense", 1).is_err());
    /// ```
    pub fn from_row(saga_type: String, state: &str, count: i64) -> Result<Self, SagaError> {
        Ok(Self {
            saga_type,
            state: state
                .parse::<SagaState>()
                .map_err(|e| SagaError::backend(format!("stored saga state: {e}")))?,
            count: u64::try_from(count).unwrap_or(0),
        })
    }
}

/// Durable storage of saga instances, their timelines, leases and timers.
///
/// Contract every backend keeps (the testkit's saga suite checks it):
/// - time (`due_at`, lease expiry, history times, ages) is read from the
///   store's own clock — the database's `now()` for SQL backends — never
///   the caller's;
/// - [`commit`](SagaStore::commit) is one transaction: the instance row, the
///   history entries, the outgoing commands and the inbox record are all
///   written or none is;
/// - every claim increments the fencing token; a commit or release with a
///   stale token writes nothing and fails with [`SagaError::Fenced`];
/// - history is append-only.
pub trait SagaStore: Send + Sync {
    /// The store's clock.
    fn now(&self) -> impl Future<Output = Result<DateTime<Utc>, SagaError>> + Send;

    /// Creates a saga in state `Running`, due now, with a `saga_started`
    /// history entry. Fails with [`SagaError::AlreadyExists`] if the id is taken.
    fn create(&self, new: NewSaga) -> impl Future<Output = Result<SagaInstance, SagaError>> + Send;

    /// One saga, if it exists.
    fn load(
        &self,
        id: SagaId,
    ) -> impl Future<Output = Result<Option<SagaInstance>, SagaError>> + Send;

    /// A saga's full timeline, oldest first.
    fn history(
        &self,
        id: SagaId,
    ) -> impl Future<Output = Result<Vec<HistoryEntry>, SagaError>> + Send;

    /// How many sagas there are per (type, state), for the
    /// [`vextrus_sagas`](vextrus_telemetry::names::SAGAS) gauge and for
    /// operators; pairs with no saga are left out.
    fn count_by_state(&self) -> impl Future<Output = Result<Vec<SagaCount>, SagaError>> + Send;

    /// Sagas passing `filter`, oldest first.
    fn list(
        &self,
        filter: &SagaFilter,
    ) -> impl Future<Output = Result<Vec<SagaInstance>, SagaError>> + Send;

    /// Claims up to `limit` sagas that are not terminal, are due
    /// (`due_at <= now`) and carry no live lease: each gets a lease for
    /// `worker` expiring `lease` from now and a new fencing token. Two
    /// concurrent callers never get the same saga.
    fn claim_due(
        &self,
        worker: &str,
        lease: Duration,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Claim>, SagaError>> + Send;

    /// Claims one saga whatever its due time (for replies and operator
    /// operations). Fails with [`SagaError::Leased`] if a live lease is held
    /// (by any worker, the caller included), [`SagaError::NotFound`] if it does not exist.
    fn claim(
        &self,
        id: SagaId,
        worker: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, SagaError>> + Send;

    /// Writes one transition atomically, if `transition.token` is current.
    fn commit(
        &self,
        transition: SagaTransition,
    ) -> impl Future<Output = Result<SagaInstance, SagaError>> + Send;

    /// Gives up the lease, if `token` is current.
    fn release(&self, id: SagaId, token: u64)
    -> impl Future<Output = Result<(), SagaError>> + Send;

    /// Claims the saga and writes `transition` as one step, if nothing has
    /// changed since it was read as `read`: the saga's fencing token must
    /// still be `transition.token - 1` and its `updated_at`, state and
    /// progress those of `read` (else [`SagaError::Fenced`], nothing
    /// written; a commit does not move the token, so the token alone would
    /// let a stale read through), and it must carry no live lease (else
    /// [`SagaError::Leased`]); the
    /// write then sets the token to `transition.token`, as a
    /// [`claim`](SagaStore::claim) would, and applies the transition as
    /// [`commit`](SagaStore::commit) does (the same inbox rule and lease
    /// update). So a reply is handled on a plain [`load`](SagaStore::load)
    /// without a claim of its own, and two workers still never drive one saga
    /// at once: whoever claims first fences the other.
    ///
    /// The default claims (with `lease`) and then commits, releasing the
    /// claim if the token moved in between or the commit fails; SQL stores
    /// override it with one guarded write.
    fn commit_claiming(
        &self,
        transition: SagaTransition,
        read: &SagaInstance,
        lease: Duration,
    ) -> impl Future<Output = Result<SagaInstance, SagaError>> + Send {
        async move {
            let id = transition.saga_id;
            let claim = self.claim(id, &transition.worker, lease).await?;
            let now = &claim.instance;
            let unchanged = now.updated_at == read.updated_at
                && now.state == read.state
                && now.progress == read.progress;
            if claim.token != transition.token || !unchanged {
                let _ = self.release(id, claim.token).await;
                return Err(SagaError::Fenced {
                    saga_id: id,
                    token: transition.token,
                    current: claim.token,
                });
            }
            let token = claim.token;
            match self.commit(transition).await {
                Ok(inst) => Ok(inst),
                Err(e) => {
                    if !e.is_fenced() {
                        let _ = self.release(id, token).await;
                    }
                    Err(e)
                }
            }
        }
    }

    /// Whether the reply message `message_id` was already handled.
    fn message_handled(
        &self,
        message_id: Uuid,
    ) -> impl Future<Output = Result<bool, SagaError>> + Send;
}

/// The outgoing side: commands queued by commits, waiting for a relay to
/// publish them. A backend whose commands go to a shared outbox table
/// implements this over that table.
pub trait SagaCommandOutbox: Send + Sync {
    /// Up to `limit` queued commands not yet marked sent, oldest first.
    fn pending_commands(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<SagaCommand>, SagaError>> + Send;

    /// Marks commands sent (after the broker confirmed them).
    fn mark_sent(&self, message_ids: &[Uuid])
    -> impl Future<Output = Result<(), SagaError>> + Send;
}
