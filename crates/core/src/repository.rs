//! The event-sourced aggregate repository: load = latest snapshot + later
//! events; save = append at the aggregate's original version.

use std::marker::PhantomData;

use futures::TryStreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use vextrus_kernel::{Aggregate, AggregateId, AggregateRoot, Audit, Repository, RepositoryError};

use crate::error::EventStoreError;
use crate::store::{EventAppender, EventReader, SnapshotStore};
use crate::types::{ExpectedVersion, NewEvent, ReadStreamOptions, Snapshot, StreamId};

/// When the repository stores a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SnapshotPolicy {
    /// Never: every load replays the whole stream.
    #[default]
    Never,
    /// After a save that takes the stream past a multiple of `n` events.
    EveryNEvents(u64),
}

impl SnapshotPolicy {
    /// Whether a save that moved the stream from `before` to `after` events
    /// should store a snapshot.
    pub fn should_snapshot(self, before: u64, after: u64) -> bool {
        match self {
            SnapshotPolicy::Never => false,
            SnapshotPolicy::EveryNEvents(0) => false,
            SnapshotPolicy::EveryNEvents(n) => before / n != after / n,
        }
    }
}

/// What a snapshot stores: the state and its audit trail.
#[derive(Serialize, Deserialize)]
struct SnapshotBody<A> {
    state: A,
    audit: Option<Audit>,
}

/// A [`Repository`] over an event store.
///
/// Each aggregate is the stream `"{A::TYPE}-{id}"`. `load` reads the latest
/// snapshot (if its `snapshot_version` is the one this repository expects;
/// a stale one is ignored) and the events after it; `save` appends the
/// uncommitted events at `root.original_version()`, so a concurrent writer
/// makes it fail with [`RepositoryError::Conflict`], and then stores a
/// snapshot if the [`SnapshotPolicy`] says so. A failed snapshot write is
/// logged and does not fail the save: the events are the truth.
///
/// Reads go through the store given; wrap it in [`crate::Upcasting`] to
/// upcast old events.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use vextrus_core::{EventSourcedRepository, InMemoryEventStore, SnapshotPolicy};
/// use vextrus_kernel::{Aggregate, AggregateId, AggregateRoot, CommandContext, DomainEvent, Repository};
///
/// #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
/// struct Tally { total: u64 }
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// struct Added(u64);
/// impl DomainEvent for Added { fn event_type(&self) -> &'static str { "tally.added" } }
/// impl Aggregate for Tally {
///     const TYPE: &'static str = "tally";
///     type Command = u64;
///     type Event = Added;
///     type Error = std::convert::Infallible;
///     fn handle(&self, n: u64) -> Result<Vec<Added>, Self::Error> { Ok(vec![Added(n)]) }
///     fn apply(&mut self, e: &Added) { self.total += e.0 }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let repo = EventSourcedRepository::<Tally, _>::new(InMemoryEventStore::new())
///     .with_snapshots(SnapshotPolicy::EveryNEvents(2), 1);
/// let id = AggregateId::new("t1").unwrap();
/// let mut root = AggregateRoot::<Tally>::new(id.clone());
/// for n in 1..=5 {
///     root.execute(n, &CommandContext::new()).unwrap();
///     repo.save(&mut root).await.unwrap();
/// }
/// let loaded = repo.load(&id).await.unwrap().unwrap();
/// assert_eq!(loaded.state().total, 15);
/// assert_eq!(loaded.version(), 5);
///
/// // A stale copy cannot overwrite newer events.
/// let mut stale = AggregateRoot::<Tally>::new(id.clone());
/// stale.execute(1, &CommandContext::new()).unwrap();
/// assert!(repo.save(&mut stale).await.is_err());
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct EventSourcedRepository<A, S> {
    store: S,
    policy: SnapshotPolicy,
    snapshot_version: u32,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A, S> EventSourcedRepository<A, S>
where
    A: Aggregate + Serialize + DeserializeOwned,
    S: EventAppender + EventReader + SnapshotStore,
{
    /// A repository that never snapshots.
    pub fn new(store: S) -> Self {
        Self {
            store,
            policy: SnapshotPolicy::Never,
            snapshot_version: 1,
            _aggregate: PhantomData,
        }
    }

    /// Turns on snapshots: `policy` says when, `snapshot_version` is the
    /// schema version of `A`'s serialized state (bump it when `A`'s shape
    /// changes, and older snapshots are ignored).
    pub fn with_snapshots(mut self, policy: SnapshotPolicy, snapshot_version: u32) -> Self {
        self.policy = policy;
        self.snapshot_version = snapshot_version;
        self
    }

    /// The underlying store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The stream id of an aggregate.
    pub fn stream_id(id: &AggregateId) -> Result<StreamId, EventStoreError> {
        StreamId::new(AggregateRoot::<A>::stream_id_for(id))
    }

    async fn usable_snapshot(
        &self,
        stream: &StreamId,
    ) -> Result<Option<(u64, SnapshotBody<A>)>, EventStoreError> {
        if self.policy == SnapshotPolicy::Never {
            return Ok(None);
        }
        let Some(snapshot) = self.store.load_snapshot(stream).await? else {
            return Ok(None);
        };
        if snapshot.snapshot_version != self.snapshot_version {
            tracing::debug!(stream = %stream, stored = snapshot.snapshot_version, expected = self.snapshot_version, "ignoring stale snapshot");
            return Ok(None);
        }
        match serde_json::from_value::<SnapshotBody<A>>(snapshot.state) {
            Ok(body) if body.audit.is_some() => Ok(Some((snapshot.stream_version, body))),
            Ok(_) => Ok(None),
            Err(e) => {
                tracing::warn!(stream = %stream, error = %e, "ignoring unreadable snapshot; replaying events");
                Ok(None)
            }
        }
    }

    async fn load_inner(
        &self,
        id: &AggregateId,
    ) -> Result<Option<AggregateRoot<A>>, EventStoreError> {
        let stream = Self::stream_id(id)?;
        let snapshot = self.usable_snapshot(&stream).await?;
        let from = snapshot.as_ref().map_or(1, |(v, _)| v + 1);
        let events: Vec<_> = self
            .store
            .read_stream(&stream, ReadStreamOptions::forwards().from_version(from))
            .try_collect()
            .await?;
        let history = events
            .into_iter()
            .map(|e| Ok((e.decode::<A::Event>()?, e.metadata)))
            .collect::<Result<Vec<_>, EventStoreError>>()?;
        let mut root = match snapshot {
            Some((
                version,
                SnapshotBody {
                    state,
                    audit: Some(audit),
                },
            )) => AggregateRoot::restore(id.clone(), state, version, audit),
            _ if history.is_empty() => return Ok(None),
            _ => AggregateRoot::new(id.clone()),
        };
        root.apply_history(history);
        Ok(Some(root))
    }

    async fn save_inner(&self, root: &mut AggregateRoot<A>) -> Result<(), RepositoryError> {
        if !root.has_uncommitted_events() {
            return Ok(());
        }
        let stream = Self::stream_id(root.id()).map_err(RepositoryError::storage)?;
        let expected = root.original_version();
        let events = root
            .uncommitted_events()
            .iter()
            .map(|(e, m)| NewEvent::from_domain(e, m.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(RepositoryError::storage)?;
        match self
            .store
            .append_to_stream(&stream, ExpectedVersion::Exact(expected), &events)
            .await
        {
            Ok(_) => {}
            Err(EventStoreError::WrongExpectedVersion { actual, .. }) => {
                return Err(RepositoryError::Conflict {
                    expected,
                    actual: actual.unwrap_or(0),
                });
            }
            Err(e) => return Err(RepositoryError::storage(e)),
        }
        root.mark_committed();
        if self.policy.should_snapshot(expected, root.version()) {
            let body = SnapshotBody {
                state: root.state().clone(),
                audit: root.audit().cloned(),
            };
            let stored = match serde_json::to_value(&body) {
                Ok(state) => {
                    let snapshot = Snapshot {
                        stream_id: stream.clone(),
                        stream_version: root.version(),
                        snapshot_version: self.snapshot_version,
                        state,
                    };
                    self.store.save_snapshot(&snapshot).await
                }
                Err(e) => Err(e.into()),
            };
            if let Err(e) = stored {
                tracing::warn!(stream = %stream, error = %e, "snapshot not stored; loads replay events");
            }
        }
        Ok(())
    }
}

impl<A, S> Repository<A> for EventSourcedRepository<A, S>
where
    A: Aggregate + Serialize + DeserializeOwned,
    A::Event: Send,
    S: EventAppender + EventReader + SnapshotStore,
{
    async fn load(&self, id: &AggregateId) -> Result<Option<AggregateRoot<A>>, RepositoryError> {
        self.load_inner(id).await.map_err(RepositoryError::storage)
    }

    async fn save(&self, root: &mut AggregateRoot<A>) -> Result<(), RepositoryError> {
        self.save_inner(root).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_crosses_multiples() {
        let p = SnapshotPolicy::EveryNEvents(5);
        assert!(!p.should_snapshot(0, 4));
        assert!(p.should_snapshot(4, 5));
        assert!(p.should_snapshot(3, 12));
        assert!(!p.should_snapshot(5, 9));
        assert!(!SnapshotPolicy::EveryNEvents(0).should_snapshot(0, 100));
        assert!(!SnapshotPolicy::Never.should_snapshot(0, 100));
    }
}
