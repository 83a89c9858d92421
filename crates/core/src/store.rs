//! The event store's capability traits, one per capability.
//!
//! A backend implements each trait it supports; engines ask only for what
//! they use (the aggregate repository needs [`EventAppender`] +
//! [`EventReader`] + [`SnapshotStore`], a subscription needs
//! [`SubscriptionSource`], the projection runner [`ProjectionBackend`]).
//!
//! Methods return `impl Future + Send` (native async functions in traits), so
//! the traits are used generically, not as `dyn`. Implement them with plain
//! `async fn`.
//!
//! Backends return events exactly as stored; upcasting happens in core (see
//! [`crate::upcast`]).

use std::future::Future;
use std::time::Duration;

use futures::stream::BoxStream;
use tokio::sync::watch;

use crate::error::Result;
use crate::types::{
    AppendResult, EventFilter, ExpectedVersion, GlobalPage, GlobalPosition, NewEvent,
    ReadStreamOptions, RecordedEvent, Snapshot, StreamId,
};

/// A stream of recorded events, as returned by [`EventReader::read_stream`].
pub type EventStream<'a> = BoxStream<'a, Result<RecordedEvent>>;

/// The default largest payload a store accepts: 1 MiB of JSON text.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// Appends events to a stream, atomically, with optimistic concurrency.
pub trait EventAppender: Send + Sync {
    /// Appends `events` (one or many) to `stream_id` in one atomic write, if
    /// the stream's version matches `expected`.
    ///
    /// Contract every backend keeps (the testkit's conformance suite checks it):
    /// - the batch is validated first ([`crate::validate_batch`]: non-empty,
    ///   valid types, `event_id == metadata.event_id`, payload within the
    ///   store's maximum, no id twice); an invalid batch writes nothing;
    /// - a version mismatch gives [`crate::EventStoreError::WrongExpectedVersion`]
    ///   with the expected and actual versions, and writes nothing;
    /// - idempotent re-append: if the batch's first event id is already stored
    ///   in this stream, and the whole batch's ids are stored at exactly
    ///   consecutive versions from there, the call succeeds with the original
    ///   [`AppendResult`] and writes nothing (when `expected` names a version,
    ///   `NoStream` or `Exact(n)`, the stored batch must start right after it,
    ///   else the call gives `WrongExpectedVersion`); if only some of the ids
    ///   are stored, or the first is stored in another stream, it gives
    ///   [`crate::EventStoreError::PartialDuplicate`] and writes nothing;
    /// - `recorded_at` comes from the database's clock;
    /// - an unreachable or busy database gives
    ///   [`crate::EventStoreError::Unavailable`].
    fn append_to_stream(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> impl Future<Output = Result<AppendResult>> + Send;
}

/// Reads streams and the global log.
pub trait EventReader: Send + Sync {
    /// Reads one stream forwards or backwards from a version, with a limit,
    /// as an async stream. A stream that does not exist reads as empty.
    fn read_stream<'a>(
        &'a self,
        stream_id: &'a StreamId,
        options: ReadStreamOptions,
    ) -> EventStream<'a>;

    /// Reads at most `limit` events of the global log strictly after `from`,
    /// in `(commit, position)` order, that pass `filter`.
    ///
    /// Never returns an event while an event before it in that order could
    /// still commit: a reader that checkpoints the page's
    /// [`GlobalPage::scanned_to`] never skips an event.
    fn read_all(
        &self,
        from: GlobalPosition,
        filter: &EventFilter,
        limit: usize,
    ) -> impl Future<Output = Result<GlobalPage>> + Send;

    /// The stream's current version (its number of events), `None` if it does not exist.
    fn stream_version(
        &self,
        stream_id: &StreamId,
    ) -> impl Future<Output = Result<Option<u64>>> + Send;

    /// Whether the stream has at least one event.
    fn stream_exists(&self, stream_id: &StreamId) -> impl Future<Output = Result<bool>> + Send {
        async move { Ok(self.stream_version(stream_id).await?.is_some()) }
    }

    /// How many events readable by [`EventReader::read_all`] lie strictly
    /// after `from` and pass `filter` (for lag metrics).
    fn count_after(
        &self,
        from: GlobalPosition,
        filter: &EventFilter,
    ) -> impl Future<Output = Result<u64>> + Send;
}

/// Stores the latest snapshot of each stream.
pub trait SnapshotStore: Send + Sync {
    /// Stores `snapshot`, replacing the stream's previous one.
    fn save_snapshot(&self, snapshot: &Snapshot) -> impl Future<Output = Result<()>> + Send;

    /// The stream's latest snapshot, if any.
    fn load_snapshot(
        &self,
        stream_id: &StreamId,
    ) -> impl Future<Output = Result<Option<Snapshot>>> + Send;
}

/// Stores named checkpoints (global positions) outside of any projection
/// transaction, for subscribers that keep their effects elsewhere.
pub trait CheckpointStore: Send + Sync {
    /// The stored checkpoint of `name`, if any.
    fn load_checkpoint(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<GlobalPosition>>> + Send;

    /// Stores `position` as the checkpoint of `name`.
    fn save_checkpoint(
        &self,
        name: &str,
        position: GlobalPosition,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Forgets the checkpoint of `name` (the next read starts from the beginning).
    fn delete_checkpoint(&self, name: &str) -> impl Future<Output = Result<()>> + Send;
}

/// A source of live subscriptions: the global log ([`EventReader::read_all`])
/// plus wake-ups when new events may have been committed.
pub trait SubscriptionSource: EventReader {
    /// A wake-up signal for one subscriber. Backends that can notify (memory:
    /// an in-process channel; PostgreSQL: LISTEN/NOTIFY) return
    /// [`WakeUps::from_watch`]; others return [`WakeUps::polling`] and
    /// subscribers poll at their interval.
    fn wake_ups(&self) -> impl Future<Output = Result<WakeUps>> + Send {
        async { Ok(WakeUps::polling()) }
    }
}

/// A subscriber's wake-up signal: waits until new events may be available,
/// or the poll interval passed.
///
/// Backed by a [`watch`] channel whose value a backend bumps after each
/// commit; a change that happens between a read and the next
/// [`WakeUps::wait`] is not lost (the receiver remembers what it has seen).
///
/// ```
/// use std::time::Duration;
/// use vextrus_core::WakeUps;
///
/// # tokio_test_block(async {
/// let (tx, rx) = tokio::sync::watch::channel(0u64);
/// let mut w = WakeUps::from_watch(rx);
/// tx.send_modify(|v| *v += 1);
/// assert!(w.wait(Duration::from_secs(60)).await); // woken at once
/// assert!(!WakeUps::polling().wait(Duration::from_millis(1)).await); // timed out
/// # });
/// # fn tokio_test_block(f: impl std::future::Future<Output = ()>) {
/// #     tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct WakeUps {
    rx: Option<watch::Receiver<u64>>,
}

impl WakeUps {
    /// No notifications: every wait lasts the whole poll interval.
    pub fn polling() -> Self {
        Self { rx: None }
    }

    /// Wake-ups from a channel whose value changes after commits.
    pub fn from_watch(mut rx: watch::Receiver<u64>) -> Self {
        rx.mark_unchanged();
        Self { rx: Some(rx) }
    }

    /// Waits until woken (returns `true`) or `max` passed (returns `false`).
    /// A closed channel degrades to polling.
    pub async fn wait(&mut self, max: Duration) -> bool {
        match &mut self.rx {
            None => {
                tokio::time::sleep(max).await;
                false
            }
            Some(rx) => match tokio::time::timeout(max, rx.changed()).await {
                Ok(Ok(())) => {
                    rx.mark_unchanged();
                    true
                }
                Ok(Err(_closed)) => {
                    self.rx = None;
                    tokio::time::sleep(max).await;
                    false
                }
                Err(_elapsed) => false,
            },
        }
    }
}

/// What a backend offers the [`crate::ProjectionRunner`]: a transaction in
/// which a projection's handler writes its read model and the runner stores
/// the projection's checkpoint, committed together.
///
/// The runner calls [`ProjectionBackend::begin_projection`], reads a batch of
/// events, hands each to the handler with `&mut Self::Transaction`, then
/// calls [`ProjectionBackend::commit_projection`] with the new checkpoint. If
/// anything fails, the runner drops the transaction, which must roll back
/// every write made in it. So a crash at any point neither loses an event
/// nor applies one twice.
///
/// On SQL backends `Transaction` is the driver's transaction (for example
/// `sqlx::Transaction<'static, Sqlite>`), so a handler writes with plain SQL;
/// in memory it is [`crate::memory::InMemoryTransaction`], a staged document
/// store.
pub trait ProjectionBackend: SubscriptionSource {
    /// The open transaction handed to projection handlers. Dropping it
    /// without [`ProjectionBackend::commit_projection`] rolls it back.
    type Transaction: Send;

    /// Begins a transaction, locks the checkpoint of projection `name` for
    /// it (so two runners of one projection take turns instead of applying a
    /// batch twice), and returns the stored checkpoint (`None`: from the start).
    fn begin_projection(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<(Self::Transaction, Option<GlobalPosition>)>> + Send;

    /// Stores `checkpoint` as projection `name`'s checkpoint inside `tx`
    /// (`None`: deletes it), then commits `tx`.
    fn commit_projection(
        &self,
        tx: Self::Transaction,
        name: &str,
        checkpoint: Option<GlobalPosition>,
    ) -> impl Future<Output = Result<()>> + Send;
}
