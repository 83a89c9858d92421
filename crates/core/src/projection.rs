//! Projections: read models fed from the global log, whose writes commit in
//! the same transaction as their checkpoint.

use std::future::Future;

use crate::error::BoxError;
use crate::store::ProjectionBackend;
use crate::types::{EventFilter, RecordedEvent};

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
    ) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Empties the read model (for a rebuild), writing only through `tx`.
    fn reset(&self, tx: &mut B::Transaction) -> impl Future<Output = Result<(), BoxError>> + Send;
}
