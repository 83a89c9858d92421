//! Aggregates: the consistency boundary that turns commands into domain
//! events.
//!
//! The split follows cqrs-es, kept small:
//!
//! - [`Aggregate`] is the business logic only: the state (built by
//!   [`Aggregate::apply`] from events), and [`Aggregate::handle`], a pure
//!   decision from state and command to the events that should happen (or a
//!   business-rule error). No I/O, no clock, no ids.
//! - [`AggregateRoot`] is the bookkeeping around it: the id, the version (how
//!   many events have been applied), the events recorded but not yet saved
//!   with their [`EventMetadata`], and the [`Audit`] trail, which it derives
//!   from event metadata only. Because `apply` is the only way state changes
//!   and the audit depends only on stored metadata, rebuilding a root from its
//!   history ([`AggregateRoot::from_history`]) gives the same state, version
//!   and audit as the live root had.
//!
//! The version works as an optimistic-concurrency token: a root loaded at
//! version `n` that records `k` events is saved by appending them at expected
//! version `n` ([`AggregateRoot::original_version`]); if someone else appended
//! first, the store reports a conflict.

use std::fmt;

use chrono::{DateTime, Utc};

use crate::{
    ActorId, AggregateId, Audit, CausationId, CorrelationId, DomainEvent, Entity, EventId,
    EventMetadata, TenantId, TraceContext,
};

/// The business logic of one aggregate type: decide events from commands,
/// and evolve state from events.
///
/// `Default` is the state before the first event. `handle` must be pure (the
/// same state and command always give the same result) and `apply` must be
/// infallible and deterministic: an event is a fact that already happened, so
/// refusing it is not an option — validation belongs in `handle`.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use vextrus_kernel::{Aggregate, DomainEvent};
///
/// #[derive(Debug, Default, Clone, PartialEq)]
/// struct Counter {
///     value: u32,
/// }
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// enum CounterEvent {
///     Incremented { by: u32 },
/// }
///
/// impl DomainEvent for CounterEvent {
///     fn event_type(&self) -> &'static str {
///         "counter.incremented"
///     }
/// }
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("the counter would overflow")]
/// struct Overflow;
///
/// impl Aggregate for Counter {
///     const TYPE: &'static str = "counter";
///     type Command = u32;
///     type Event = CounterEvent;
///     type Error = Overflow;
///
///     fn handle(&self, by: u32) -> Result<Vec<CounterEvent>, Overflow> {
///         self.value.checked_add(by).ok_or(Overflow)?;
///         Ok(vec![CounterEvent::Incremented { by }])
///     }
///
///     fn apply(&mut self, event: &CounterEvent) {
///         match event {
///             CounterEvent::Incremented { by } => self.value += by,
///         }
///     }
/// }
///
/// let mut counter = Counter::default();
/// for event in counter.handle(5).unwrap() {
///     counter.apply(&event);
/// }
/// assert_eq!(counter.value, 5);
/// assert!(counter.handle(u32::MAX).is_err());
/// ```
pub trait Aggregate: Default + Clone + Send + Sync + 'static {
    /// The aggregate type's stream category, such as `"order"`: a stable,
    /// lower-case name (without `-`, which separates it from the id in the
    /// stream id `"{TYPE}-{id}"`). Never change it once events are stored.
    const TYPE: &'static str;

    /// What callers ask the aggregate to do.
    type Command;

    /// What the aggregate decides happened.
    type Event: DomainEvent;

    /// Why a command was refused (a broken business rule).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decides which events `command` causes in the current state, or refuses
    /// it. Pure: no I/O, no clock, no side effects; an empty `Vec` means "no
    /// change".
    fn handle(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Changes the state by one event. Infallible and deterministic.
    fn apply(&mut self, event: &Self::Event);
}

/// The context a command runs in, copied into the metadata of every event it
/// causes: correlation, causation, trace context, tenant and actor.
///
/// Each event gets a fresh [`EventId`]; all events of one command share its
/// `occurred_at`, which is the fixed time set here or, if none, the clock
/// when [`AggregateRoot::execute`] ran.
///
/// ```
/// use vextrus_kernel::{ActorId, CommandContext, EventMetadata, TenantId};
///
/// // A command started by a user: a new business transaction.
/// let ctx = CommandContext::new()
///     .with_tenant(TenantId::new("acme").unwrap())
///     .with_actor(ActorId::new("user:7").unwrap());
/// let meta = ctx.event_metadata();
/// assert_eq!(meta.correlation_id, ctx.correlation_id);
/// assert_eq!(meta.actor, ctx.actor);
///
/// // A command sent because of an event (by a saga or policy) stays in the
/// // same business transaction and names that event as its cause.
/// let cause = EventMetadata::new();
/// let follow_up = CommandContext::caused_by(&cause);
/// assert_eq!(follow_up.correlation_id, cause.correlation_id);
/// assert_eq!(follow_up.causation_id.unwrap().as_uuid(), cause.event_id.as_uuid());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandContext {
    /// The business transaction the command belongs to.
    pub correlation_id: CorrelationId,
    /// The event, command or message that caused the command, if any.
    pub causation_id: Option<CausationId>,
    /// The W3C trace context current when the command arrived.
    pub trace_context: Option<TraceContext>,
    /// The tenant the command acts for.
    pub tenant: Option<TenantId>,
    /// Who issued the command.
    pub actor: Option<ActorId>,
    /// A fixed time to stamp the events with; `None` means the clock at
    /// execution.
    pub occurred_at: Option<DateTime<Utc>>,
}

impl CommandContext {
    /// A context that starts a new business transaction: a fresh correlation
    /// id and nothing else.
    pub fn new() -> Self {
        Self {
            correlation_id: CorrelationId::new(),
            causation_id: None,
            trace_context: None,
            tenant: None,
            actor: None,
            occurred_at: None,
        }
    }

    /// A context for a command caused by the event (or message) whose
    /// metadata is `cause`: same correlation id, trace context, tenant and
    /// actor, and `cause`'s event id as causation id.
    pub fn caused_by(cause: &EventMetadata) -> Self {
        Self {
            correlation_id: cause.correlation_id,
            causation_id: Some(CausationId(cause.event_id.as_uuid())),
            trace_context: cause.trace_context.clone(),
            tenant: cause.tenant.clone(),
            actor: cause.actor.clone(),
            occurred_at: None,
        }
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, id: CorrelationId) -> Self {
        self.correlation_id = id;
        self
    }

    /// Sets the causation id.
    pub fn with_causation_id(mut self, id: CausationId) -> Self {
        self.causation_id = Some(id);
        self
    }

    /// Sets the trace context.
    pub fn with_trace_context(mut self, trace_context: TraceContext) -> Self {
        self.trace_context = Some(trace_context);
        self
    }

    /// Sets the tenant.
    pub fn with_tenant(mut self, tenant: TenantId) -> Self {
        self.tenant = Some(tenant);
        self
    }

    /// Sets the actor.
    pub fn with_actor(mut self, actor: ActorId) -> Self {
        self.actor = Some(actor);
        self
    }

    /// Stamps the events with `at` instead of the clock at execution (for
    /// imports, replays of external facts, and deterministic tests).
    pub fn with_occurred_at(mut self, at: DateTime<Utc>) -> Self {
        self.occurred_at = Some(at);
        self
    }

    /// Metadata for one event decided in this context: a fresh event id, and
    /// `occurred_at` set to the fixed time or now.
    pub fn event_metadata(&self) -> EventMetadata {
        self.event_metadata_at(self.occurred_at.unwrap_or_else(Utc::now))
    }

    fn event_metadata_at(&self, occurred_at: DateTime<Utc>) -> EventMetadata {
        EventMetadata {
            event_id: EventId::new(),
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            trace_context: self.trace_context.clone(),
            tenant: self.tenant.clone(),
            actor: self.actor.clone(),
            occurred_at,
        }
    }
}

impl Default for CommandContext {
    fn default() -> Self {
        Self::new()
    }
}

/// One aggregate instance: its id, its state, its version, the events it
/// has recorded but not yet saved, and its [`Audit`] trail.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # use vextrus_kernel::{Aggregate, DomainEvent};
/// # #[derive(Debug, Default, Clone, PartialEq)]
/// # struct Counter { value: u32 }
/// # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// # enum CounterEvent { Incremented { by: u32 } }
/// # impl DomainEvent for CounterEvent {
/// #     fn event_type(&self) -> &'static str { "counter.incremented" }
/// # }
/// # #[derive(Debug, thiserror::Error)]
/// # #[error("the counter would overflow")]
/// # struct Overflow;
/// # impl Aggregate for Counter {
/// #     const TYPE: &'static str = "counter";
/// #     type Command = u32;
/// #     type Event = CounterEvent;
/// #     type Error = Overflow;
/// #     fn handle(&self, by: u32) -> Result<Vec<CounterEvent>, Overflow> {
/// #         self.value.checked_add(by).ok_or(Overflow)?;
/// #         Ok(vec![CounterEvent::Incremented { by }])
/// #     }
/// #     fn apply(&mut self, event: &CounterEvent) {
/// #         match event { CounterEvent::Incremented { by } => self.value += by }
/// #     }
/// # }
/// use vextrus_kernel::{ActorId, AggregateId, AggregateRoot, CommandContext, Entity};
///
/// let ctx = CommandContext::new().with_actor(ActorId::new("user:1").unwrap());
/// let mut root = AggregateRoot::<Counter>::new(AggregateId::new("c1").unwrap());
/// assert_eq!(root.stream_id(), "counter-c1");
///
/// let recorded = root.execute(2, &ctx).unwrap();
/// assert_eq!(recorded.len(), 1);
/// root.execute(3, &ctx).unwrap();
/// assert_eq!(root.state().value, 5);
/// assert_eq!((root.version(), root.original_version()), (2, 0));
/// assert_eq!(root.audit().unwrap().created_by.as_ref().unwrap().as_str(), "user:1");
///
/// // A refused command changes nothing.
/// assert!(root.execute(u32::MAX, &ctx).is_err());
/// assert_eq!((root.version(), root.uncommitted_events().len()), (2, 2));
///
/// // Rebuilding from the recorded events gives the same aggregate.
/// let history = root.take_uncommitted();
/// let rebuilt = AggregateRoot::<Counter>::from_history(root.id().clone(), history);
/// assert_eq!(rebuilt, root);
/// ```
#[derive(Clone)]
pub struct AggregateRoot<A: Aggregate> {
    id: AggregateId,
    state: A,
    version: u64,
    audit: Option<Audit>,
    uncommitted: Vec<(A::Event, EventMetadata)>,
}

impl<A: Aggregate> AggregateRoot<A> {
    /// A new aggregate with no events: default state, version 0, no audit.
    pub fn new(id: AggregateId) -> Self {
        Self {
            id,
            state: A::default(),
            version: 0,
            audit: None,
            uncommitted: Vec::new(),
        }
    }

    /// Rebuilds an aggregate from its stored events, in stream order. The
    /// result has no uncommitted events.
    pub fn from_history(
        id: AggregateId,
        history: impl IntoIterator<Item = (A::Event, EventMetadata)>,
    ) -> Self {
        let mut root = Self::new(id);
        root.apply_history(history);
        root
    }

    /// Restores an aggregate from a snapshot taken at `version` (so that only
    /// later events need [`apply_history`](Self::apply_history)).
    ///
    /// `version` is what the event store checks appends against, so it wins:
    /// the restored audit's `version` is set to it (for a snapshot taken from
    /// a root they are equal anyway).
    pub fn restore(id: AggregateId, state: A, version: u64, audit: Audit) -> Self {
        Self {
            id,
            state,
            version,
            audit: Some(Audit { version, ..audit }),
            uncommitted: Vec::new(),
        }
    }

    /// Applies already-stored events, in stream order, after the ones this
    /// root has applied: each changes the state, adds one to the version and
    /// updates the audit trail, but is not recorded as uncommitted.
    ///
    /// For loading (after [`new`](Self::new) or [`restore`](Self::restore)),
    /// before any command is executed: stored history must not be applied
    /// on top of events that have not been saved yet.
    pub fn apply_history(&mut self, history: impl IntoIterator<Item = (A::Event, EventMetadata)>) {
        for (event, metadata) in history {
            self.apply_one(&event, &metadata);
        }
    }

    /// Handles `command` and, if the aggregate accepts it, applies the events
    /// it decided and records them as uncommitted, each with metadata from
    /// `ctx` (a fresh event id each, the same `occurred_at` for all).
    ///
    /// Returns the events just recorded. If the aggregate refuses the
    /// command, nothing changes: state, version, audit and uncommitted events
    /// are as they were.
    pub fn execute(
        &mut self,
        command: A::Command,
        ctx: &CommandContext,
    ) -> Result<&[(A::Event, EventMetadata)], A::Error> {
        let events = self.state.handle(command)?;
        let occurred_at = ctx.occurred_at.unwrap_or_else(Utc::now);
        let first_new = self.uncommitted.len();
        self.uncommitted.reserve(events.len());
        for event in events {
            let metadata = ctx.event_metadata_at(occurred_at);
            self.apply_one(&event, &metadata);
            self.uncommitted.push((event, metadata));
        }
        Ok(&self.uncommitted[first_new..])
    }

    fn apply_one(&mut self, event: &A::Event, metadata: &EventMetadata) {
        self.state.apply(event);
        self.version += 1;
        Audit::record_event(&mut self.audit, metadata);
    }

    /// The aggregate's id.
    pub fn id(&self) -> &AggregateId {
        &self.id
    }

    /// The event-stream id of an aggregate of this type with id `id`:
    /// `"{TYPE}-{id}"`.
    pub fn stream_id_for(id: &AggregateId) -> String {
        format!("{}-{}", A::TYPE, id)
    }

    /// This aggregate's event-stream id: `"{TYPE}-{id}"`.
    pub fn stream_id(&self) -> String {
        Self::stream_id_for(&self.id)
    }

    /// The current state.
    pub fn state(&self) -> &A {
        &self.state
    }

    /// The current state, consuming the root.
    pub fn into_state(self) -> A {
        self.state
    }

    /// How many events have been applied, saved or not (0 for a new
    /// aggregate).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The version as it was when loaded (or last saved): `version()` minus
    /// the uncommitted events. This is the expected version to append the
    /// uncommitted events at.
    pub fn original_version(&self) -> u64 {
        // `version` counts every uncommitted event, so this cannot underflow.
        self.version - self.uncommitted.len() as u64
    }

    /// The audit trail, or `None` before the first event.
    pub fn audit(&self) -> Option<&Audit> {
        self.audit.as_ref()
    }

    /// The events recorded since loading (or the last save), in order, with
    /// their metadata.
    pub fn uncommitted_events(&self) -> &[(A::Event, EventMetadata)] {
        &self.uncommitted
    }

    /// Whether there are recorded events not yet saved.
    pub fn has_uncommitted_events(&self) -> bool {
        !self.uncommitted.is_empty()
    }

    /// Takes the uncommitted events out, treating them as committed: after
    /// this, [`original_version`](Self::original_version) equals
    /// [`version`](Self::version). Read `original_version` *before* calling
    /// it if it is needed as the expected version; prefer
    /// [`mark_committed`](Self::mark_committed) after a successful save when
    /// the events can be appended by reference.
    pub fn take_uncommitted(&mut self) -> Vec<(A::Event, EventMetadata)> {
        std::mem::take(&mut self.uncommitted)
    }

    /// Forgets the uncommitted events once they have been saved.
    pub fn mark_committed(&mut self) {
        self.uncommitted.clear();
    }
}

impl<A: Aggregate> Entity for AggregateRoot<A> {
    type Id = AggregateId;

    fn id(&self) -> &AggregateId {
        &self.id
    }

    fn audit(&self) -> Option<&Audit> {
        self.audit.as_ref()
    }
}

impl<A> PartialEq for AggregateRoot<A>
where
    A: Aggregate + PartialEq,
    A::Event: PartialEq,
{
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.version == other.version
            && self.state == other.state
            && self.audit == other.audit
            && self.uncommitted == other.uncommitted
    }
}

impl<A> fmt::Debug for AggregateRoot<A>
where
    A: Aggregate + fmt::Debug,
    A::Event: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AggregateRoot")
            .field("type", &A::TYPE)
            .field("id", &self.id)
            .field("version", &self.version)
            .field("state", &self.state)
            .field("audit", &self.audit)
            .field("uncommitted", &self.uncommitted)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde::{Deserialize, Serialize};

    use super::*;

    /// A list that refuses duplicates: small enough to test the bookkeeping.
    #[derive(Debug, Default, Clone, PartialEq)]
    struct Tags(Vec<String>);

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Tagged(String);

    impl DomainEvent for Tagged {
        fn event_type(&self) -> &'static str {
            "tags.tagged"
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("duplicate tag")]
    struct Duplicate;

    impl Aggregate for Tags {
        const TYPE: &'static str = "tags";
        type Command = Vec<&'static str>;
        type Event = Tagged;
        type Error = Duplicate;

        fn handle(&self, tags: Vec<&'static str>) -> Result<Vec<Tagged>, Duplicate> {
            if tags.iter().any(|t| self.0.iter().any(|have| have == t)) {
                return Err(Duplicate);
            }
            Ok(tags.into_iter().map(|t| Tagged(t.to_owned())).collect())
        }

        fn apply(&mut self, event: &Tagged) {
            self.0.push(event.0.clone());
        }
    }

    fn id() -> AggregateId {
        AggregateId::new("t-1").unwrap()
    }

    #[test]
    fn execute_stamps_metadata_from_the_context() {
        let at = Utc.with_ymd_and_hms(2025, 5, 1, 12, 0, 0).unwrap();
        let cause = EventMetadata::new().with_tenant(TenantId::new("acme").unwrap());
        let ctx = CommandContext::caused_by(&cause)
            .with_actor(ActorId::new("saga:o2c").unwrap())
            .with_occurred_at(at);
        let mut root = AggregateRoot::<Tags>::new(id());
        let recorded = root.execute(vec!["a", "b"], &ctx).unwrap().to_vec();
        assert_eq!(recorded.len(), 2);
        assert_ne!(recorded[0].1.event_id, recorded[1].1.event_id);
        for (_, meta) in &recorded {
            assert_eq!(meta.correlation_id, cause.correlation_id);
            assert_eq!(
                meta.causation_id,
                Some(CausationId(cause.event_id.as_uuid()))
            );
            assert_eq!(meta.tenant, cause.tenant);
            assert_eq!(meta.actor.as_ref().unwrap().as_str(), "saga:o2c");
            assert_eq!(meta.occurred_at, at);
        }
        // The slice returned is only the new events.
        let more = root.execute(vec!["c"], &ctx).unwrap();
        assert_eq!(more.len(), 1);
        assert_eq!(more[0].0, Tagged("c".into()));
        assert_eq!(root.uncommitted_events().len(), 3);
        assert_eq!(root.audit().unwrap().version, 3);
    }

    #[test]
    fn events_of_one_command_share_occurred_at_from_the_clock() {
        let mut root = AggregateRoot::<Tags>::new(id());
        let before = Utc::now();
        let recorded = root
            .execute(vec!["a", "b", "c"], &CommandContext::new())
            .unwrap();
        let at = recorded[0].1.occurred_at;
        assert!(at >= before && at <= Utc::now());
        assert!(recorded.iter().all(|(_, m)| m.occurred_at == at));
    }

    #[test]
    fn an_empty_decision_changes_nothing() {
        let mut root = AggregateRoot::<Tags>::new(id());
        assert!(
            root.execute(vec![], &CommandContext::new())
                .unwrap()
                .is_empty()
        );
        assert_eq!(root.version(), 0);
        assert!(root.audit().is_none());
        assert!(!root.has_uncommitted_events());
    }

    #[test]
    fn versions_and_commit_bookkeeping() {
        let ctx = CommandContext::new();
        let mut root = AggregateRoot::<Tags>::new(id());
        root.execute(vec!["a", "b"], &ctx).unwrap();
        assert_eq!((root.version(), root.original_version()), (2, 0));
        root.mark_committed();
        assert_eq!((root.version(), root.original_version()), (2, 2));
        root.execute(vec!["c"], &ctx).unwrap();
        assert_eq!((root.version(), root.original_version()), (3, 2));
        let taken = root.take_uncommitted();
        assert_eq!(taken.len(), 1);
        assert_eq!((root.version(), root.original_version()), (3, 3));
        assert_eq!(root.stream_id(), "tags-t-1");
        assert_eq!(AggregateRoot::<Tags>::stream_id_for(&id()), "tags-t-1");
    }

    #[test]
    fn restore_then_apply_history_equals_full_history() {
        let ctx = CommandContext::new().with_actor(ActorId::new("u").unwrap());
        let mut live = AggregateRoot::<Tags>::new(id());
        live.execute(vec!["a", "b"], &ctx).unwrap();
        let ctx2 = CommandContext::new().with_actor(ActorId::new("v").unwrap());
        live.execute(vec!["c"], &ctx2).unwrap();
        let history = live.take_uncommitted();

        let snapshot = AggregateRoot::<Tags>::from_history(id(), history[..2].to_vec());
        let mut restored = AggregateRoot::restore(
            id(),
            snapshot.state().clone(),
            snapshot.version(),
            snapshot.audit().unwrap().clone(),
        );
        restored.apply_history(history[2..].to_vec());
        assert_eq!(restored, live);
        assert_eq!(
            restored
                .audit()
                .unwrap()
                .updated_by
                .as_ref()
                .unwrap()
                .as_str(),
            "v"
        );

        // The store's version wins over a stale audit version.
        let mut stale = snapshot.audit().unwrap().clone();
        stale.version = 99;
        let restored = AggregateRoot::restore(id(), snapshot.state().clone(), 2, stale);
        assert_eq!(restored.audit().unwrap().version, 2);
        assert!(format!("{restored:?}").contains("\"tags\""));
    }
}
