//! Projections: read models fed from the global log, whose writes commit in
//! the same transaction as their checkpoint.

use std::future::Future;
use std::time::Duration;

use chrono::Utc;

use crate::error::{BoxError, EventStoreError, Result};
use crate::store::{CheckpointStore, ProjectionBackend};
use crate::types::{EventFilter, GlobalPosition, RecordedEvent};

/// A projection: turns events of the global log into a read model, writing
/// through the backend's transaction so that its writes and its checkpoint
/// commit together.
///
/// A projection is written for one backend `B` (its read model lives there):
/// on SQLite its handler gets `&mut sqlx::Transaction<'static, Sqlite>` and
/// writes with SQL; in memory it gets the in-memory store's staged
/// transaction. Implement the methods with plain `async fn`.
pub trait Projection<B: ProjectionBackend>: Send + Sync {
    /// The projection's stable name; its checkpoint is stored under it.
    fn name(&self) -> &str;

    /// Which events the projection wants (default: all).
    fn filter(&self) -> EventFilter {
        EventFilter::all()
    }

    /// Applies one event to the read model, writing only through `tx`.
    /// An error rolls back the whole batch and its checkpoint.
    fn apply(
        &self,
        tx: &mut B::Transaction,
        event: &RecordedEvent,
    ) -> impl Future<Output = std::result::Result<(), BoxError>> + Send;

    /// Empties the read model (for a rebuild), writing only through `tx`.
    fn reset(
        &self,
        tx: &mut B::Transaction,
    ) -> impl Future<Output = std::result::Result<(), BoxError>> + Send;
}

/// Where a projection stands relative to the head of the global log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectionLag {
    /// The projection's stored checkpoint (`None`: it has processed nothing).
    pub checkpoint: Option<GlobalPosition>,
    /// Events after the checkpoint that the projection's filter lets through.
    pub events_behind: u64,
    /// How long ago the oldest unprocessed event was recorded (by the
    /// database clock, compared with this process's clock); `None` when
    /// caught up.
    pub oldest_unprocessed_age: Option<Duration>,
}

/// What one [`ProjectionRunner::run_batch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchReport {
    /// Events handed to the projection and committed.
    pub applied: usize,
    /// The checkpoint after the batch.
    pub checkpoint: Option<GlobalPosition>,
    /// Whether the checkpoint moved (false: nothing new to read).
    pub advanced: bool,
}

/// Feeds the global log into a [`Projection`], committing the projection's
/// writes and its checkpoint in one backend transaction per batch.
///
/// A crash at any point leaves either the whole batch (writes and
/// checkpoint) or none of it, so no event is lost or applied twice; two
/// runners of one projection take turns on the checkpoint's lock.
///
/// ```
/// use serde_json::json;
/// use vextrus_core::{BoxError, EventAppender, ExpectedVersion, InMemoryEventStore, InMemoryTransaction, NewEvent, Projection, ProjectionRunner, RecordedEvent, StreamId};
/// use vextrus_kernel::EventMetadata;
///
/// /// Counts events per stream.
/// struct Counts;
/// impl Projection<InMemoryEventStore> for Counts {
///     fn name(&self) -> &str { "counts" }
///     async fn apply(&self, tx: &mut InMemoryTransaction, e: &RecordedEvent) -> Result<(), BoxError> {
///         let n = tx.get("counts", e.stream_id.as_str()).and_then(|v| v.as_u64()).unwrap_or(0);
///         tx.put("counts", e.stream_id.as_str(), json!(n + 1));
///         Ok(())
///     }
///     async fn reset(&self, tx: &mut InMemoryTransaction) -> Result<(), BoxError> {
///         tx.clear("counts");
///         Ok(())
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
/// let store = InMemoryEventStore::new();
/// let s = StreamId::new("order-1").unwrap();
/// let evs: Vec<_> = (0..3).map(|_| NewEvent::new("t", json!({}), EventMetadata::new())).collect();
/// store.append_to_stream(&s, ExpectedVersion::Any, &evs).await.unwrap();
///
/// let runner = ProjectionRunner::new(store.clone(), Counts);
/// assert_eq!(runner.catch_up().await.unwrap(), 3);
/// assert_eq!(store.document("counts", "order-1"), Some(json!(3)));
/// assert_eq!(runner.lag().await.unwrap().events_behind, 0);
/// // A rebuild starts from scratch and ends in the same state.
/// runner.rebuild().await.unwrap();
/// assert_eq!(store.document("counts", "order-1"), Some(json!(3)));
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct ProjectionRunner<B, P> {
    backend: B,
    projection: P,
    batch_size: usize,
    poll_interval: Duration,
}

impl<B, P> ProjectionRunner<B, P>
where
    B: ProjectionBackend,
    P: Projection<B>,
{
    /// A runner with batches of 500 events and a 250 ms poll interval.
    pub fn new(backend: B, projection: P) -> Self {
        Self {
            backend,
            projection,
            batch_size: 500,
            poll_interval: Duration::from_millis(250),
        }
    }

    /// Sets how many events one transaction applies (at least 1).
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Sets the longest wait between polls in [`ProjectionRunner::run_until`].
    pub fn with_poll_interval(mut self, poll_interval: Duration) -> Self {
        self.poll_interval = poll_interval;
        self
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// Applies one batch: begins a transaction, reads the events after the
    /// stored checkpoint, applies each, stores the new checkpoint and
    /// commits. Any failure rolls everything back.
    pub async fn run_batch(&self) -> Result<BatchReport> {
        let name = self.projection.name();
        let (mut tx, checkpoint) = self.backend.begin_projection(name).await?;
        let from = checkpoint.unwrap_or(GlobalPosition::START);
        let page = self
            .backend
            .read_all(from, &self.projection.filter(), self.batch_size)
            .await?;
        if page.events.is_empty() && page.scanned_to <= from {
            // Nothing new: dropping the transaction rolls it back.
            return Ok(BatchReport {
                applied: 0,
                checkpoint,
                advanced: false,
            });
        }
        for event in &page.events {
            self.projection
                .apply(&mut tx, event)
                .await
                .map_err(|source| EventStoreError::Projection {
                    projection: name.to_owned(),
                    position: event.position,
                    source,
                })?;
        }
        let next = page.scanned_to.max(from);
        self.backend.commit_projection(tx, name, Some(next)).await?;
        Ok(BatchReport {
            applied: page.events.len(),
            checkpoint: Some(next),
            advanced: true,
        })
    }

    /// Runs batches until the projection has caught up with the log; returns
    /// how many events it applied.
    pub async fn catch_up(&self) -> Result<u64> {
        let mut total = 0u64;
        loop {
            let r = self.run_batch().await?;
            total += r.applied as u64;
            if !r.advanced {
                return Ok(total);
            }
        }
    }

    /// Catches up, then follows the log live (woken by the backend's
    /// [`crate::WakeUps`], polling at the poll interval) until `shutdown`
    /// completes. Returns the first error.
    pub async fn run_until(&self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let mut wake = self.backend.wake_ups().await?;
        let work = async {
            loop {
                let r = self.run_batch().await?;
                if !r.advanced {
                    wake.wait(self.poll_interval).await;
                }
            }
        };
        tokio::select! {
            r = work => r,
            () = shutdown => Ok(()),
        }
    }

    /// Rebuilds the read model from the start of the log: empties it with
    /// [`Projection::reset`] and deletes the checkpoint in one transaction,
    /// then catches up. Returns how many events were applied.
    pub async fn rebuild(&self) -> Result<u64> {
        let name = self.projection.name();
        let (mut tx, _) = self.backend.begin_projection(name).await?;
        self.projection
            .reset(&mut tx)
            .await
            .map_err(|source| EventStoreError::Projection {
                projection: name.to_owned(),
                position: GlobalPosition::START,
                source,
            })?;
        self.backend.commit_projection(tx, name, None).await?;
        self.catch_up().await
    }

    /// How far behind the head of the log the projection is.
    pub async fn lag(&self) -> Result<ProjectionLag>
    where
        B: CheckpointStore,
    {
        let checkpoint = self.backend.load_checkpoint(self.projection.name()).await?;
        let from = checkpoint.unwrap_or(GlobalPosition::START);
        let filter = self.projection.filter();
        let events_behind = self.backend.count_after(from, &filter).await?;
        let oldest_unprocessed_age = if events_behind == 0 {
            None
        } else {
            self.backend
                .read_all(from, &filter, 1)
                .await?
                .events
                .first()
                .map(|e| {
                    (Utc::now() - e.recorded_at)
                        .to_std()
                        .unwrap_or(Duration::ZERO)
                })
        };
        Ok(ProjectionLag {
            checkpoint,
            events_behind,
            oldest_unprocessed_age,
        })
    }
}
