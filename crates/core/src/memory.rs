//! The in-memory backend: every event-store trait, for tests and for
//! services that run without a database.
//!
//! It keeps the same contract as the SQL backends (the testkit's conformance
//! suite runs on it): expected versions are enforced under one lock,
//! re-appends are idempotent, payloads are size-checked, subscribers are
//! woken on each commit, and projections write to a small staged document
//! store ([`InMemoryTransaction`]) that commits together with their checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::Utc;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::{OwnedMutexGuard, watch};
use vextrus_kernel::EventId;

use crate::error::{EventStoreError, Result};
use crate::store::{
    CheckpointStore, DEFAULT_MAX_PAYLOAD_BYTES, EventAppender, EventReader, EventStream,
    ProjectionBackend, SnapshotStore, SubscriptionSource, WakeUps,
};
use crate::types::{
    AppendResult, EventFilter, ExpectedVersion, GlobalPage, GlobalPosition, NewEvent,
    ReadDirection, ReadStreamOptions, RecordedEvent, Snapshot, StreamId, validate_batch,
};

/// An event store held in memory. Cloning gives another handle to the same store.
///
/// ```
/// use serde_json::json;
/// use vextrus_core::memory::InMemoryEventStore;
/// use vextrus_core::{EventAppender, EventReader, ExpectedVersion, NewEvent, ReadStreamOptions, StreamId};
/// use vextrus_kernel::EventMetadata;
/// use futures::TryStreamExt;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let store = InMemoryEventStore::new();
/// let stream = StreamId::new("order-1").unwrap();
/// let placed = NewEvent::new("order.placed", json!({"total": 10}), EventMetadata::new());
///
/// let r = store.append_to_stream(&stream, ExpectedVersion::NoStream, &[placed.clone()]).await.unwrap();
/// assert_eq!(r.last_version, 1);
///
/// // A second writer that also expected no stream loses.
/// let other = NewEvent::new("order.placed", json!({}), EventMetadata::new());
/// let err = store.append_to_stream(&stream, ExpectedVersion::NoStream, &[other]).await.unwrap_err();
/// assert!(err.is_conflict());
///
/// // Re-appending the same event is idempotent.
/// assert_eq!(store.append_to_stream(&stream, ExpectedVersion::NoStream, &[placed]).await.unwrap(), r);
///
/// let events: Vec<_> = store.read_stream(&stream, ReadStreamOptions::forwards()).try_collect().await.unwrap();
/// assert_eq!(events.len(), 1);
/// assert_eq!(events[0].payload, json!({"total": 10}));
/// # });
/// ```
#[derive(Clone)]
pub struct InMemoryEventStore {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    commits: watch::Sender<u64>,
    max_payload: usize,
    projection_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Default)]
struct State {
    /// The global log; the event at index `i` has position `i + 1`.
    log: Vec<RecordedEvent>,
    /// Log indices of each stream's events, in version order.
    streams: HashMap<StreamId, Vec<usize>>,
    /// Where each event id is stored: its log index.
    event_ids: HashMap<EventId, usize>,
    snapshots: HashMap<StreamId, Snapshot>,
    checkpoints: HashMap<String, GlobalPosition>,
    documents: BTreeMap<(String, String), Value>,
}

impl std::fmt::Debug for InMemoryEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state();
        f.debug_struct("InMemoryEventStore")
            .field("events", &st.log.len())
            .field("streams", &st.streams.len())
            .field("max_payload", &self.inner.max_payload)
            .finish()
    }
}

impl Default for InMemoryEventStore {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryEventStore {
    /// An empty store with the default maximum payload size
    /// ([`DEFAULT_MAX_PAYLOAD_BYTES`]).
    pub fn new() -> Self {
        Self::with_max_payload_bytes(DEFAULT_MAX_PAYLOAD_BYTES)
    }

    /// An empty store that rejects payloads larger than `max` bytes of JSON.
    pub fn with_max_payload_bytes(max: usize) -> Self {
        let (commits, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                commits,
                max_payload: max,
                projection_locks: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The configured maximum payload size in bytes.
    pub fn max_payload_bytes(&self) -> usize {
        self.inner.max_payload
    }

    /// The total number of events stored.
    pub fn len(&self) -> usize {
        self.state().log.len()
    }

    /// Whether no event is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A committed projection document, if present.
    pub fn document(&self, collection: &str, key: &str) -> Option<Value> {
        self.state()
            .documents
            .get(&(collection.to_owned(), key.to_owned()))
            .cloned()
    }

    /// All committed documents of a collection, ordered by key.
    pub fn documents(&self, collection: &str) -> Vec<(String, Value)> {
        self.state()
            .documents
            .range((collection.to_owned(), String::new())..)
            .take_while(|((c, _), _)| c == collection)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated:
        // every mutation below validates first and then only pushes.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn append_locked(
        &self,
        st: &mut State,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendResult> {
        validate_batch(events, self.inner.max_payload)?;
        let current = st.streams.get(stream_id).map(|v| v.len() as u64);

        // Idempotent re-append: the first id is already stored.
        if let Some(&idx) = st.event_ids.get(&events[0].event_id) {
            let first = &st.log[idx];
            if &first.stream_id != stream_id {
                return Err(EventStoreError::PartialDuplicate {
                    stream_id: stream_id.clone(),
                    event_id: events[0].event_id,
                });
            }
            let v0 = first.stream_version;
            if let Some(n) = expected.exact()
                && v0 != n + 1
            {
                return Err(EventStoreError::WrongExpectedVersion {
                    stream_id: stream_id.clone(),
                    expected,
                    actual: current,
                });
            }
            let indices = &st.streams[stream_id];
            for (i, e) in events.iter().enumerate() {
                let same = indices
                    .get((v0 - 1) as usize + i)
                    .is_some_and(|&ix| st.log[ix].metadata.event_id == e.event_id);
                if !same {
                    return Err(EventStoreError::PartialDuplicate {
                        stream_id: stream_id.clone(),
                        event_id: e.event_id,
                    });
                }
            }
            let last = &st.log[indices[(v0 - 1) as usize + events.len() - 1]];
            return Ok(AppendResult {
                first_version: v0,
                last_version: last.stream_version,
                first_position: first.position,
                last_position: last.position,
            });
        }
        if let Some(e) = events
            .iter()
            .find(|e| st.event_ids.contains_key(&e.event_id))
        {
            return Err(EventStoreError::PartialDuplicate {
                stream_id: stream_id.clone(),
                event_id: e.event_id,
            });
        }
        if !expected.matches(current) {
            return Err(EventStoreError::WrongExpectedVersion {
                stream_id: stream_id.clone(),
                expected,
                actual: current,
            });
        }

        let now = Utc::now();
        let base = current.unwrap_or(0);
        let mut indices = Vec::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            let idx = st.log.len();
            let pos = idx as u64 + 1;
            st.log.push(RecordedEvent {
                stream_id: stream_id.clone(),
                stream_version: base + 1 + i as u64,
                position: GlobalPosition::new(pos, pos),
                event_type: e.event_type.clone(),
                schema_version: e.schema_version,
                payload: e.payload.clone(),
                metadata: e.metadata.clone(),
                recorded_at: now,
            });
            st.event_ids.insert(e.event_id, idx);
            indices.push(idx);
        }
        let first = st.log[indices[0]].position;
        let last = st.log[indices[indices.len() - 1]].position;
        st.streams
            .entry(stream_id.clone())
            .or_default()
            .extend(indices);
        Ok(AppendResult {
            first_version: base + 1,
            last_version: base + events.len() as u64,
            first_position: first,
            last_position: last,
        })
    }
}

impl EventAppender for InMemoryEventStore {
    async fn append_to_stream(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendResult> {
        let span = vextrus_telemetry::spans::event_append(stream_id, events.len());
        let _entered = span.enter();
        let started = std::time::Instant::now();
        let result = {
            let mut st = self.state();
            self.append_locked(&mut st, stream_id, expected, events)
        };
        vextrus_telemetry::record::event_append(
            events.len() as u64,
            started.elapsed(),
            vextrus_telemetry::Outcome::of(&result),
        );
        let result = result?;
        self.inner.commits.send_modify(|n| *n = n.wrapping_add(1));
        Ok(result)
    }
}

impl EventReader for InMemoryEventStore {
    fn read_stream<'a>(
        &'a self,
        stream_id: &'a StreamId,
        options: ReadStreamOptions,
    ) -> EventStream<'a> {
        let events: Vec<RecordedEvent> = {
            let st = self.state();
            let Some(indices) = st.streams.get(stream_id) else {
                return futures::stream::empty().boxed();
            };
            let limit = options
                .limit
                .map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
            let pick = |&ix: &usize| st.log[ix].clone();
            match options.direction {
                ReadDirection::Forwards => {
                    let start = options
                        .from_version
                        .map_or(0, |v| v.saturating_sub(1) as usize);
                    indices.iter().skip(start).take(limit).map(pick).collect()
                }
                ReadDirection::Backwards => {
                    let end = options
                        .from_version
                        .map_or(indices.len(), |v| (v as usize).min(indices.len()));
                    indices[..end].iter().rev().take(limit).map(pick).collect()
                }
            }
        };
        futures::stream::iter(events.into_iter().map(Ok)).boxed()
    }

    async fn read_all(
        &self,
        from: GlobalPosition,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<GlobalPage> {
        let st = self.state();
        let start = usize::try_from(from.position)
            .unwrap_or(usize::MAX)
            .min(st.log.len());
        let mut events = Vec::new();
        let mut scanned_to = from;
        for e in &st.log[start..] {
            if events.len() >= limit {
                break;
            }
            scanned_to = e.position;
            if filter.matches(&e.stream_id, &e.event_type) {
                events.push(e.clone());
            }
        }
        Ok(GlobalPage { events, scanned_to })
    }

    async fn stream_version(&self, stream_id: &StreamId) -> Result<Option<u64>> {
        Ok(self.state().streams.get(stream_id).map(|v| v.len() as u64))
    }

    async fn count_after(&self, from: GlobalPosition, filter: &EventFilter) -> Result<u64> {
        let st = self.state();
        let start = usize::try_from(from.position)
            .unwrap_or(usize::MAX)
            .min(st.log.len());
        Ok(st.log[start..]
            .iter()
            .filter(|e| filter.matches(&e.stream_id, &e.event_type))
            .count() as u64)
    }
}

impl SnapshotStore for InMemoryEventStore {
    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        self.state()
            .snapshots
            .insert(snapshot.stream_id.clone(), snapshot.clone());
        Ok(())
    }

    async fn load_snapshot(&self, stream_id: &StreamId) -> Result<Option<Snapshot>> {
        Ok(self.state().snapshots.get(stream_id).cloned())
    }
}

impl CheckpointStore for InMemoryEventStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<GlobalPosition>> {
        Ok(self.state().checkpoints.get(name).copied())
    }

    async fn save_checkpoint(&self, name: &str, position: GlobalPosition) -> Result<()> {
        self.state().checkpoints.insert(name.to_owned(), position);
        Ok(())
    }

    async fn delete_checkpoint(&self, name: &str) -> Result<()> {
        self.state().checkpoints.remove(name);
        Ok(())
    }
}

impl SubscriptionSource for InMemoryEventStore {
    async fn wake_ups(&self) -> Result<WakeUps> {
        Ok(WakeUps::from_watch(self.inner.commits.subscribe()))
    }
}

/// A projection transaction on the in-memory store: document writes are
/// staged here and applied, together with the checkpoint, by
/// [`ProjectionBackend::commit_projection`]. Dropping it discards them.
///
/// Documents are JSON values keyed by `(collection, key)`, readable after
/// commit with [`InMemoryEventStore::document`] and
/// [`InMemoryEventStore::documents`].
pub struct InMemoryTransaction {
    store: InMemoryEventStore,
    staged: BTreeMap<(String, String), Option<Value>>,
    _lock: OwnedMutexGuard<()>,
}

impl std::fmt::Debug for InMemoryTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryTransaction")
            .field("staged", &self.staged.len())
            .finish()
    }
}

impl InMemoryTransaction {
    /// Reads a document as this transaction sees it (its own writes first).
    pub fn get(&self, collection: &str, key: &str) -> Option<Value> {
        let k = (collection.to_owned(), key.to_owned());
        match self.staged.get(&k) {
            Some(v) => v.clone(),
            None => self.store.state().documents.get(&k).cloned(),
        }
    }

    /// Writes a document.
    pub fn put(&mut self, collection: &str, key: &str, value: Value) {
        self.staged
            .insert((collection.to_owned(), key.to_owned()), Some(value));
    }

    /// Deletes a document.
    pub fn delete(&mut self, collection: &str, key: &str) {
        self.staged
            .insert((collection.to_owned(), key.to_owned()), None);
    }

    /// Deletes every document of a collection (committed and staged).
    pub fn clear(&mut self, collection: &str) {
        let committed: Vec<String> = self
            .store
            .documents(collection)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        for k in committed {
            self.delete(collection, &k);
        }
        for ((c, _), v) in self.staged.iter_mut() {
            if c == collection {
                *v = None;
            }
        }
    }
}

impl ProjectionBackend for InMemoryEventStore {
    type Transaction = InMemoryTransaction;

    async fn begin_projection(
        &self,
        name: &str,
    ) -> Result<(InMemoryTransaction, Option<GlobalPosition>)> {
        let lock = {
            let mut locks = self
                .inner
                .projection_locks
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            locks.entry(name.to_owned()).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        let checkpoint = self.state().checkpoints.get(name).copied();
        Ok((
            InMemoryTransaction {
                store: self.clone(),
                staged: BTreeMap::new(),
                _lock: guard,
            },
            checkpoint,
        ))
    }

    async fn commit_projection(
        &self,
        tx: InMemoryTransaction,
        name: &str,
        checkpoint: Option<GlobalPosition>,
    ) -> Result<()> {
        let mut st = self.state();
        for (k, v) in tx.staged {
            match v {
                Some(v) => st.documents.insert(k, v),
                None => st.documents.remove(&k),
            };
        }
        match checkpoint {
            Some(p) => st.checkpoints.insert(name.to_owned(), p),
            None => st.checkpoints.remove(name),
        };
        Ok(())
    }
}
