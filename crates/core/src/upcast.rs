//! Upcasting: turning stored events of an old schema version into the
//! current one on read. Stored data is never rewritten.
//!
//! Register one upcaster per `(event_type, from_version)`; each turns a
//! payload of `from_version` into `from_version + 1`, and the registry chains
//! them until no upcaster applies. Wrap any backend in [`Upcasting`] and every
//! read through it (streams, the global log, hence repositories,
//! subscriptions and projections) returns upcast events.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use serde_json::Value;

use crate::error::{BoxError, EventStoreError, Result};
use crate::store::{
    CheckpointStore, EventAppender, EventReader, EventStream, ProjectionBackend, SnapshotStore,
    SubscriptionSource, WakeUps,
};
use crate::types::{
    AppendResult, EventFilter, ExpectedVersion, GlobalPage, GlobalPosition, NewEvent,
    ReadStreamOptions, RecordedEvent, Snapshot, StreamId,
};

/// One upcasting step: a payload of `from_version` in, `from_version + 1` out.
pub type UpcastFn = Arc<dyn Fn(Value) -> std::result::Result<Value, BoxError> + Send + Sync>;

/// The registered upcasters, keyed by `(event_type, from_version)`.
///
/// ```
/// use serde_json::json;
/// use vextrus_core::upcast::UpcasterRegistry;
///
/// let mut reg = UpcasterRegistry::new();
/// // v1 had `amount` as a number of cents; v2 has a decimal string.
/// reg.register("payment.received", 1, |mut p| {
///     let cents = p["amount"].as_i64().ok_or("amount is not an integer")?;
///     p["amount"] = json!(format!("{}.{:02}", cents / 100, cents % 100));
///     Ok(p)
/// });
/// // v2 -> v3 renamed a field.
/// reg.register("payment.received", 2, |mut p| {
///     let amount = p.as_object_mut().ok_or("not an object")?.remove("amount");
///     p["total"] = amount.unwrap_or_default();
///     Ok(p)
/// });
/// let (payload, version) = reg.upcast_payload("payment.received", 1, json!({"amount": 1234})).unwrap();
/// assert_eq!(version, 3);
/// assert_eq!(payload, json!({"total": "12.34"}));
/// assert_eq!(reg.current_version("payment.received", 1), 3);
/// assert_eq!(reg.current_version("other", 1), 1);
/// ```
#[derive(Clone, Default)]
pub struct UpcasterRegistry {
    steps: HashMap<(String, u32), UpcastFn>,
}

impl std::fmt::Debug for UpcasterRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut keys: Vec<_> = self.steps.keys().collect();
        keys.sort();
        f.debug_struct("UpcasterRegistry")
            .field("steps", &keys)
            .finish()
    }
}

impl UpcasterRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the step from `from_version` to `from_version + 1` of
    /// `event_type`, replacing any earlier one for the same key.
    pub fn register<F>(
        &mut self,
        event_type: impl Into<String>,
        from_version: u32,
        f: F,
    ) -> &mut Self
    where
        F: Fn(Value) -> std::result::Result<Value, BoxError> + Send + Sync + 'static,
    {
        self.steps
            .insert((event_type.into(), from_version), Arc::new(f));
        self
    }

    /// Whether no upcaster is registered.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The version a payload of `version` ends at after every applicable step.
    pub fn current_version(&self, event_type: &str, mut version: u32) -> u32 {
        while version < u32::MAX && self.steps.contains_key(&(event_type.to_owned(), version)) {
            version += 1;
        }
        version
    }

    /// Runs the chain of steps on a payload; returns the new payload and version.
    pub fn upcast_payload(
        &self,
        event_type: &str,
        mut version: u32,
        mut payload: Value,
    ) -> Result<(Value, u32)> {
        let mut key = (event_type.to_owned(), version);
        while version < u32::MAX {
            let Some(step) = self.steps.get(&key) else {
                break;
            };
            payload = step(payload).map_err(|e| EventStoreError::Upcast {
                event_type: event_type.to_owned(),
                from_version: version,
                reason: e.to_string(),
            })?;
            version += 1;
            key.1 = version;
        }
        Ok((payload, version))
    }

    /// Upcasts a recorded event to its current schema version.
    pub fn upcast(&self, mut event: RecordedEvent) -> Result<RecordedEvent> {
        if self.steps.is_empty() {
            return Ok(event);
        }
        let payload = std::mem::take(&mut event.payload);
        let (payload, version) =
            self.upcast_payload(&event.event_type, event.schema_version, payload)?;
        event.payload = payload;
        event.schema_version = version;
        Ok(event)
    }
}

/// A backend whose reads are upcast by a registry; every other capability
/// is passed through unchanged.
///
/// ```
/// use futures::TryStreamExt;
/// use serde_json::json;
/// use vextrus_core::upcast::{Upcasting, UpcasterRegistry};
/// use vextrus_core::{EventAppender, EventReader, ExpectedVersion, InMemoryEventStore, NewEvent, ReadStreamOptions, StreamId};
/// use vextrus_kernel::EventMetadata;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let mut reg = UpcasterRegistry::new();
/// reg.register("greeted", 1, |p| Ok(json!({"name": p["who"], "v2": true})));
/// let store = Upcasting::new(InMemoryEventStore::new(), reg);
/// let s = StreamId::new("greeting-1").unwrap();
/// let old = NewEvent::new("greeted", json!({"who": "ada"}), EventMetadata::new());
/// store.append_to_stream(&s, ExpectedVersion::Any, &[old]).await.unwrap();
/// let read: Vec<_> = store.read_stream(&s, ReadStreamOptions::forwards()).try_collect().await.unwrap();
/// assert_eq!(read[0].schema_version, 2);
/// assert_eq!(read[0].payload, json!({"name": "ada", "v2": true}));
/// // The stored event is untouched.
/// let raw: Vec<_> = store.inner().read_stream(&s, ReadStreamOptions::forwards()).try_collect().await.unwrap();
/// assert_eq!(raw[0].schema_version, 1);
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct Upcasting<S> {
    inner: S,
    registry: Arc<UpcasterRegistry>,
}

impl<S> Upcasting<S> {
    /// Wraps `inner` so that its reads are upcast by `registry`.
    pub fn new(inner: S, registry: UpcasterRegistry) -> Self {
        Self {
            inner,
            registry: Arc::new(registry),
        }
    }

    /// The wrapped backend (reads through it are not upcast).
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The registry.
    pub fn registry(&self) -> &UpcasterRegistry {
        &self.registry
    }
}

impl<S: EventAppender> EventAppender for Upcasting<S> {
    async fn append_to_stream(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendResult> {
        self.inner
            .append_to_stream(stream_id, expected, events)
            .await
    }
}

impl<S: EventReader> EventReader for Upcasting<S> {
    fn read_stream<'a>(
        &'a self,
        stream_id: &'a StreamId,
        options: ReadStreamOptions,
    ) -> EventStream<'a> {
        let reg = self.registry.clone();
        self.inner
            .read_stream(stream_id, options)
            .map(move |r| r.and_then(|e| reg.upcast(e)))
            .boxed()
    }

    async fn read_all(
        &self,
        from: GlobalPosition,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<GlobalPage> {
        let page = self.inner.read_all(from, filter, limit).await?;
        let events = page
            .events
            .into_iter()
            .map(|e| self.registry.upcast(e))
            .collect::<Result<_>>()?;
        Ok(GlobalPage {
            events,
            scanned_to: page.scanned_to,
        })
    }

    async fn stream_version(&self, stream_id: &StreamId) -> Result<Option<u64>> {
        self.inner.stream_version(stream_id).await
    }

    async fn count_after(&self, from: GlobalPosition, filter: &EventFilter) -> Result<u64> {
        self.inner.count_after(from, filter).await
    }
}

impl<S: SnapshotStore> SnapshotStore for Upcasting<S> {
    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        self.inner.save_snapshot(snapshot).await
    }

    async fn load_snapshot(&self, stream_id: &StreamId) -> Result<Option<Snapshot>> {
        self.inner.load_snapshot(stream_id).await
    }
}

impl<S: CheckpointStore> CheckpointStore for Upcasting<S> {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<GlobalPosition>> {
        self.inner.load_checkpoint(name).await
    }

    async fn save_checkpoint(&self, name: &str, position: GlobalPosition) -> Result<()> {
        self.inner.save_checkpoint(name, position).await
    }

    async fn delete_checkpoint(&self, name: &str) -> Result<()> {
        self.inner.delete_checkpoint(name).await
    }
}

impl<S: SubscriptionSource> SubscriptionSource for Upcasting<S> {
    async fn wake_ups(&self) -> Result<WakeUps> {
        self.inner.wake_ups().await
    }
}

impl<S: ProjectionBackend> ProjectionBackend for Upcasting<S> {
    type Transaction = S::Transaction;

    async fn begin_projection(
        &self,
        name: &str,
    ) -> Result<(Self::Transaction, Option<GlobalPosition>)> {
        self.inner.begin_projection(name).await
    }

    async fn commit_projection(
        &self,
        tx: Self::Transaction,
        name: &str,
        checkpoint: Option<GlobalPosition>,
    ) -> Result<()> {
        self.inner.commit_projection(tx, name, checkpoint).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn failing_step_is_a_typed_error() {
        let mut reg = UpcasterRegistry::new();
        reg.register("t", 1, |_| Err("boom".into()));
        let err = reg.upcast_payload("t", 1, json!({})).unwrap_err();
        assert!(matches!(
            err,
            EventStoreError::Upcast {
                from_version: 1,
                ..
            }
        ));
        // Events already at a later version are left alone.
        assert_eq!(reg.upcast_payload("t", 2, json!(1)).unwrap(), (json!(1), 2));
    }
}
