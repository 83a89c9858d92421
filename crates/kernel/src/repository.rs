//! Repositories: load an aggregate by id, save its new events with an
//! expected version.
//!
//! [`Repository`] is the port services program against. Saving appends the
//! root's uncommitted events at its
//! [`original_version`](crate::AggregateRoot::original_version); if the stream
//! has moved on since the root was loaded, the save fails with
//! [`RepositoryError::Conflict`] and nothing is written, so two commands
//! racing on one aggregate cannot both win. The event-store-backed
//! repository lives with the event store; [`InMemoryRepository`] here is the
//! test double, and it enforces the expected version the same way.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::{Aggregate, AggregateId, AggregateRoot, ErrorKind, EventMetadata, HasErrorKind};

/// Why a repository could not load or save.
///
/// ```
/// use vextrus_kernel::{ErrorKind, HasErrorKind, RepositoryError};
///
/// let conflict = RepositoryError::Conflict { expected: 3, actual: 5 };
/// assert_eq!(conflict.kind(), ErrorKind::Conflict);
/// assert_eq!(conflict.to_string(), "version conflict: expected the stream at version 3, it is at 5");
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepositoryError {
    /// The stream was not at the expected version: someone else saved first.
    /// Reload and retry the command.
    #[error("version conflict: expected the stream at version {expected}, it is at {actual}")]
    Conflict {
        /// The version the save expected (the root's original version).
        expected: u64,
        /// The version the stream is at.
        actual: u64,
    },
    /// An aggregate that had to exist did not.
    #[error("aggregate {id} not found")]
    NotFound {
        /// The id looked for.
        id: AggregateId,
    },
    /// The storage underneath failed (connection, I/O, decoding).
    #[error("repository storage failed: {0}")]
    Storage(#[source] Box<dyn StdError + Send + Sync>),
}

impl RepositoryError {
    /// Wraps a storage error.
    pub fn storage(error: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        RepositoryError::Storage(error.into())
    }
}

impl HasErrorKind for RepositoryError {
    /// `Conflict` is [`ErrorKind::Conflict`], `NotFound` is
    /// [`ErrorKind::NotFound`], and `Storage` is [`ErrorKind::Transient`]:
    /// storage failures are mostly passing (a dropped connection, a timeout),
    /// and a retry policy bounds the attempts for the ones that are not.
    fn kind(&self) -> ErrorKind {
        match self {
            RepositoryError::Conflict { .. } => ErrorKind::Conflict,
            RepositoryError::NotFound { .. } => ErrorKind::NotFound,
            RepositoryError::Storage(_) => ErrorKind::Transient,
        }
    }
}

/// Loads and saves aggregates of type `A`.
///
/// Methods return `Send` futures so services can call them from
/// multi-threaded runtimes; implementations write them as `async fn`.
///
/// ```
/// use vextrus_kernel::{Aggregate, AggregateId, AggregateRoot, CommandContext, Repository, RepositoryError};
///
/// /// Load-or-create, run one command, save: the usual command handler.
/// async fn run<A: Aggregate, R: Repository<A>>(
///     repo: &R,
///     id: AggregateId,
///     command: A::Command,
///     ctx: &CommandContext,
/// ) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
///     let mut root = repo.load(&id).await?.unwrap_or_else(|| AggregateRoot::new(id));
///     root.execute(command, ctx)?;
///     repo.save(&mut root).await?;
///     Ok(root.version())
/// }
/// # let _ = run::<Dummy, vextrus_kernel::InMemoryRepository<Dummy>>;
/// # #[derive(Default, Clone)] struct Dummy;
/// # #[derive(Clone, serde::Serialize, serde::Deserialize)] struct E;
/// # impl vextrus_kernel::DomainEvent for E { fn event_type(&self) -> &'static str { "e" } }
/// # impl Aggregate for Dummy {
/// #     const TYPE: &'static str = "dummy"; type Command = (); type Event = E;
/// #     type Error = std::convert::Infallible;
/// #     fn handle(&self, _: ()) -> Result<Vec<E>, Self::Error> { Ok(vec![E]) }
/// #     fn apply(&mut self, _: &E) {}
/// # }
/// ```
pub trait Repository<A: Aggregate> {
    /// Loads the aggregate with `id` from its full history (or snapshot plus
    /// later events), or `None` if it has no events.
    fn load(
        &self,
        id: &AggregateId,
    ) -> impl Future<Output = Result<Option<AggregateRoot<A>>, RepositoryError>> + Send;

    /// Appends `root`'s uncommitted events at expected version
    /// `root.original_version()`, all or nothing, and on success marks them
    /// committed. Saving a root with no uncommitted events does nothing.
    ///
    /// If the stream is not at the expected version this fails with
    /// [`RepositoryError::Conflict`], writes nothing and leaves `root` as it
    /// was.
    fn save(
        &self,
        root: &mut AggregateRoot<A>,
    ) -> impl Future<Output = Result<(), RepositoryError>> + Send;
}

/// A [`Repository`] that keeps each aggregate's events in memory.
///
/// For tests and examples: it really enforces the expected version, stores
/// the events with their metadata, and rebuilds aggregates from them on load,
/// so code that works against it exercises the same rules as against the
/// event store. Share one between tasks with an `Arc`.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # use vextrus_kernel::{Aggregate, DomainEvent};
/// # #[derive(Debug, Default, Clone, PartialEq)]
/// # struct Counter { value: u32 }
/// # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// # struct Incremented(u32);
/// # impl DomainEvent for Incremented { fn event_type(&self) -> &'static str { "counter.incremented" } }
/// # impl Aggregate for Counter {
/// #     const TYPE: &'static str = "counter";
/// #     type Command = u32;
/// #     type Event = Incremented;
/// #     type Error = std::convert::Infallible;
/// #     fn handle(&self, by: u32) -> Result<Vec<Incremented>, Self::Error> { Ok(vec![Incremented(by)]) }
/// #     fn apply(&mut self, e: &Incremented) { self.value += e.0 }
/// # }
/// use vextrus_kernel::{
///     AggregateId, AggregateRoot, CommandContext, InMemoryRepository, Repository, RepositoryError,
/// };
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let repo = InMemoryRepository::<Counter>::new();
/// let id = AggregateId::new("c1").unwrap();
/// let ctx = CommandContext::new();
///
/// let mut root = AggregateRoot::<Counter>::new(id.clone());
/// root.execute(5, &ctx).unwrap();
/// repo.save(&mut root).await.unwrap();
///
/// // Two handlers load the same version; the first save wins.
/// let mut a = repo.load(&id).await.unwrap().unwrap();
/// let mut b = repo.load(&id).await.unwrap().unwrap();
/// a.execute(1, &ctx).unwrap();
/// b.execute(2, &ctx).unwrap();
/// repo.save(&mut a).await.unwrap();
/// let err = repo.save(&mut b).await.unwrap_err();
/// assert!(matches!(err, RepositoryError::Conflict { expected: 1, actual: 2 }));
///
/// assert_eq!(repo.load(&id).await.unwrap().unwrap().state().value, 6);
/// # });
/// ```
pub struct InMemoryRepository<A: Aggregate> {
    streams: Mutex<Streams<A::Event>>,
}

/// Each aggregate's stored events with their metadata, in stream order.
type Streams<E> = HashMap<AggregateId, Vec<(E, EventMetadata)>>;

impl<A: Aggregate> InMemoryRepository<A> {
    /// An empty repository.
    pub fn new() -> Self {
        Self {
            streams: Mutex::new(HashMap::new()),
        }
    }

    /// The stored events of aggregate `id`, in order (empty if it has none).
    pub fn events(&self, id: &AggregateId) -> Vec<(A::Event, EventMetadata)> {
        self.lock().get(id).cloned().unwrap_or_default()
    }

    /// The ids of every aggregate with stored events, sorted.
    pub fn ids(&self) -> Vec<AggregateId> {
        let mut ids: Vec<AggregateId> = self.lock().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Loads aggregate `id`, failing with [`RepositoryError::NotFound`] if it
    /// has no events.
    pub fn load_existing(&self, id: &AggregateId) -> Result<AggregateRoot<A>, RepositoryError> {
        self.load_sync(id)?
            .ok_or_else(|| RepositoryError::NotFound { id: id.clone() })
    }

    fn lock(&self) -> MutexGuard<'_, Streams<A::Event>> {
        // Every write is a single `extend` after all checks, so a panic in
        // another thread cannot have left a stream half-written: the data
        // behind a poisoned lock is still consistent.
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn load_sync(&self, id: &AggregateId) -> Result<Option<AggregateRoot<A>>, RepositoryError> {
        let streams = self.lock();
        Ok(streams
            .get(id)
            .map(|events| AggregateRoot::from_history(id.clone(), events.iter().cloned())))
    }

    fn save_sync(&self, root: &mut AggregateRoot<A>) -> Result<(), RepositoryError> {
        if !root.has_uncommitted_events() {
            return Ok(());
        }
        let expected = root.original_version();
        {
            let mut streams = self.lock();
            let stream = streams.entry(root.id().clone()).or_default();
            let actual = stream.len() as u64;
            if actual != expected {
                // Do not leave an empty stream behind for a new id.
                if stream.is_empty() {
                    streams.remove(root.id());
                }
                return Err(RepositoryError::Conflict { expected, actual });
            }
            stream.extend(root.uncommitted_events().iter().cloned());
        }
        root.mark_committed();
        Ok(())
    }
}

impl<A: Aggregate> Default for InMemoryRepository<A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: Aggregate> fmt::Debug for InMemoryRepository<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let streams = self.lock();
        f.debug_struct("InMemoryRepository")
            .field("type", &A::TYPE)
            .field("aggregates", &streams.len())
            .field("events", &streams.values().map(Vec::len).sum::<usize>())
            .finish()
    }
}

impl<A: Aggregate> Repository<A> for InMemoryRepository<A> {
    async fn load(&self, id: &AggregateId) -> Result<Option<AggregateRoot<A>>, RepositoryError> {
        self.load_sync(id)
    }

    async fn save(&self, root: &mut AggregateRoot<A>) -> Result<(), RepositoryError> {
        self.save_sync(root)
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    #[test]
    fn error_kinds_and_sources() {
        let id = AggregateId::new("x").unwrap();
        assert_eq!(RepositoryError::NotFound { id }.kind(), ErrorKind::NotFound);
        let storage = RepositoryError::storage(io::Error::other("disk on fire"));
        assert_eq!(storage.kind(), ErrorKind::Transient);
        assert_eq!(storage.source().unwrap().to_string(), "disk on fire");
        assert!(storage.to_string().contains("disk on fire"));
        assert_eq!(
            RepositoryError::Conflict {
                expected: 0,
                actual: 1
            }
            .kind(),
            ErrorKind::Conflict
        );
    }
}
