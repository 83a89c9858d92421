//! [`InMemoryOutbox`]: the outbox, the inbox and the unit of work in memory.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::watch;

use super::error::OutboxError;
use super::message::{OutboxMessage, OutboxStatus, validate_outbound};
use super::store::{
    ClaimRequest, DeadLetterPolicy, DeadLetters, FailureOutcome, OutboxClaimer, OutboxResult,
    OutboxRetention, OutboxStatusReport, OutboxStore, PublishFailure,
};
use crate::inbox::{InboxDeadLetter, InboxFailure, InboxStore};
use crate::memory::InMemoryEventStore;
use crate::store::{EventAppender, EventReader, WakeUps};
use crate::transport::{InboundMessage, MessageId, OutboundMessage};
use crate::types::{ExpectedVersion, NewEvent, StreamId, validate_batch};
use crate::unit_of_work::{InboxRecord, UnitOfWork};

/// The outbox ([`OutboxStore`], [`OutboxClaimer`], [`DeadLetters`],
/// [`OutboxRetention`]), the inbox ([`InboxStore`]) and the
/// [`UnitOfWork`] over an [`InMemoryEventStore`], in memory.
///
/// Commits are serialized: a unit of work checks every expected version,
/// outbox id and inbox entry first, then applies its appends, messages,
/// inbox entries and documents. Against writers that go through this unit
/// of work that is atomic; an event appended to the inner event store
/// directly between the check and the append can make a multi-stream commit
/// fail half-applied (the SQL backends have real transactions).
///
/// Clones share state. The store clock is `Utc::now()`.
///
/// ```
/// use std::time::Duration;
/// use vextrus_core::outbox::{ClaimRequest, DeadLetterPolicy, InMemoryOutbox, OutboxClaimer, OutboxStore};
/// use vextrus_core::transport::OutboundMessage;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let outbox = InMemoryOutbox::new();
/// let a1 = OutboundMessage::new("orders", "a", b"1".to_vec());
/// let a2 = OutboundMessage::new("orders", "a", b"2".to_vec());
/// outbox.enqueue(&[a1.clone(), a2.clone()]).await.unwrap();
///
/// let req = |w: &str| ClaimRequest { worker: w.into(), limit: 10, lease: Duration::from_secs(30), dead_letter_policy: DeadLetterPolicy::SkipKey };
/// let batch = outbox.claim(&req("w1")).await.unwrap();
/// assert_eq!(batch.iter().map(|m| m.id()).collect::<Vec<_>>(), vec![a1.id, a2.id]);
/// // Key "a" is held by w1: w2 gets nothing.
/// assert!(outbox.claim(&req("w2")).await.unwrap().is_empty());
/// outbox.mark_published(&[a1.id, a2.id]).await.unwrap();
/// # });
/// ```
#[derive(Clone)]
pub struct InMemoryOutbox {
    inner: Arc<Inner>,
}

struct Inner {
    events: InMemoryEventStore,
    state: Mutex<State>,
    commit_lock: tokio::sync::Mutex<()>,
    enqueued: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    next_sequence: u64,
    rows: HashMap<MessageId, Row>,
    by_sequence: BTreeMap<u64, MessageId>,
    /// Unfinished (pending or dead) sequences of each partition key.
    keys: HashMap<String, BTreeSet<u64>>,
    inbox: HashSet<(String, MessageId)>,
    inbox_failures: HashMap<(String, MessageId), u32>,
    inbox_dead: Vec<InboxDeadLetter>,
    documents: BTreeMap<(String, String), Value>,
}

struct Row {
    msg: OutboxMessage,
    claim: Option<(String, DateTime<Utc>)>,
}

impl std::fmt::Debug for InMemoryOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state();
        f.debug_struct("InMemoryOutbox")
            .field("rows", &st.rows.len())
            .field("inbox", &st.inbox.len())
            .finish()
    }
}

impl Default for InMemoryOutbox {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryOutbox {
    /// An empty outbox over a new, empty event store.
    pub fn new() -> Self {
        Self::with_event_store(InMemoryEventStore::new())
    }

    /// An empty outbox over `events`.
    pub fn with_event_store(events: InMemoryEventStore) -> Self {
        let (enqueued, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                events,
                state: Mutex::new(State::default()),
                commit_lock: tokio::sync::Mutex::new(()),
                enqueued,
            }),
        }
    }

    /// The event store units of work append to.
    pub fn event_store(&self) -> &InMemoryEventStore {
        &self.inner.events
    }

    /// A committed document (the service's own data written in a unit of work).
    pub fn document(&self, collection: &str, key: &str) -> Option<Value> {
        self.state()
            .documents
            .get(&(collection.to_owned(), key.to_owned()))
            .cloned()
    }

    /// Every outbox row (any status), in sequence order.
    pub fn rows(&self) -> Vec<OutboxMessage> {
        let st = self.state();
        st.by_sequence
            .values()
            .map(|id| st.rows[id].msg.clone())
            .collect()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every mutation validates first, then applies: a panic cannot leave
        // the state half-updated.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert_messages(st: &mut State, messages: &[OutboundMessage]) {
        for m in messages {
            st.next_sequence += 1;
            let seq = st.next_sequence;
            st.by_sequence.insert(seq, m.id);
            st.keys
                .entry(m.partition_key.clone())
                .or_default()
                .insert(seq);
            st.rows.insert(
                m.id,
                Row {
                    msg: OutboxMessage::pending(m.clone(), seq),
                    claim: None,
                },
            );
        }
    }

    fn check_new_messages(st: &State, messages: &[OutboundMessage]) -> OutboxResult<()> {
        let mut seen = HashSet::new();
        for m in messages {
            validate_outbound(m)?;
            if st.rows.contains_key(&m.id) || !seen.insert(m.id) {
                return Err(OutboxError::DuplicateMessage(m.id));
            }
        }
        Ok(())
    }

    fn notify(&self) {
        self.inner.enqueued.send_modify(|n| *n += 1);
    }

    fn settle(st: &mut State, id: MessageId) {
        if let Some(row) = st.rows.get(&id) {
            let (key, seq) = (row.msg.message.partition_key.clone(), row.msg.sequence);
            if let Some(set) = st.keys.get_mut(&key) {
                set.remove(&seq);
                if set.is_empty() {
                    st.keys.remove(&key);
                }
            }
        }
    }
}

impl OutboxStore for InMemoryOutbox {
    async fn enqueue(&self, messages: &[OutboundMessage]) -> OutboxResult<()> {
        {
            let mut st = self.state();
            Self::check_new_messages(&st, messages)?;
            Self::insert_messages(&mut st, messages);
        }
        self.notify();
        Ok(())
    }

    async fn get(&self, id: MessageId) -> OutboxResult<Option<OutboxMessage>> {
        Ok(self.state().rows.get(&id).map(|r| r.msg.clone()))
    }
}

impl OutboxClaimer for InMemoryOutbox {
    async fn claim(&self, req: &ClaimRequest) -> OutboxResult<Vec<OutboxMessage>> {
        if req.limit == 0 {
            return Ok(Vec::new());
        }
        let now = Utc::now();
        let lease_until =
            now + chrono::Duration::from_std(req.lease).unwrap_or(chrono::Duration::MAX);
        let mut st = self.state();
        let st = &mut *st;
        let free = |row: &Row| {
            row.claim
                .as_ref()
                .is_none_or(|(w, until)| *until <= now || *w == req.worker)
        };
        // Each key's unfinished messages, from its head.
        let mut heads: Vec<(u64, &String)> = Vec::new();
        for (key, seqs) in &st.keys {
            let head = seqs.iter().copied().find(|s| {
                let row = &st.rows[&st.by_sequence[s]];
                row.msg.status == OutboxStatus::Pending
                    || req.dead_letter_policy == DeadLetterPolicy::BlockKey
            });
            if let Some(h) = head {
                heads.push((h, key));
            }
        }
        // Each key's run of claimable messages from its head, at most
        // `per_key` of them (twice the key's fair share of the batch, at
        // least 64); the batch is the runs' first messages in sequence
        // order, so it spreads over the keys rather than holding a few
        // keys' long runs (the same rule as PgOutbox).
        let per_key = req.limit.min(
            req.limit
                .div_ceil(heads.len().max(1))
                .saturating_mul(2)
                .max(64),
        );
        heads.sort_unstable();
        let mut picked: Vec<(u64, MessageId)> = Vec::new();
        // Once `limit` messages are picked, nothing after the last of them
        // can be: keys whose head comes later are not read.
        let mut bound = u64::MAX;
        for (head, key) in heads {
            if head > bound {
                break;
            }
            let mut taken = 0;
            for s in st.keys[key].range(head..) {
                if *s > bound {
                    break;
                }
                let row = &st.rows[&st.by_sequence[s]];
                match row.msg.status {
                    OutboxStatus::Dead if req.dead_letter_policy == DeadLetterPolicy::SkipKey => {
                        continue;
                    }
                    OutboxStatus::Pending => {}
                    _ => break,
                }
                if !free(row) || row.msg.next_attempt_at > now || taken >= per_key {
                    break;
                }
                picked.push((*s, row.msg.id()));
                taken += 1;
            }
            if picked.len() >= req.limit {
                picked.sort_unstable();
                picked.truncate(req.limit);
                bound = picked[req.limit - 1].0;
            }
        }
        picked.sort_unstable();
        picked.truncate(req.limit);
        Ok(picked
            .into_iter()
            .map(|(_, id)| {
                let row = st.rows.get_mut(&id).expect("picked rows exist");
                row.claim = Some((req.worker.clone(), lease_until));
                row.msg.clone()
            })
            .collect())
    }

    async fn mark_published(&self, ids: &[MessageId]) -> OutboxResult<()> {
        let now = Utc::now();
        let mut st = self.state();
        for id in ids {
            let Some(row) = st.rows.get_mut(id) else {
                continue;
            };
            if row.msg.status != OutboxStatus::Pending {
                continue;
            }
            row.msg.status = OutboxStatus::Published;
            row.msg.published_at = Some(now);
            row.claim = None;
            Self::settle(&mut st, *id);
        }
        Ok(())
    }

    async fn mark_failed(
        &self,
        id: MessageId,
        failure: &PublishFailure,
    ) -> OutboxResult<FailureOutcome> {
        let now = Utc::now();
        let mut st = self.state();
        let row = st.rows.get_mut(&id).ok_or(OutboxError::NotFound(id))?;
        if row.msg.status != OutboxStatus::Pending {
            return Ok(FailureOutcome::Settled);
        }
        row.claim = None;
        row.msg.attempts += 1;
        row.msg.last_error = Some(failure.error.clone());
        let attempts = row.msg.attempts;
        if failure.dead_now || attempts >= failure.max_attempts {
            row.msg.status = OutboxStatus::Dead;
            Ok(FailureOutcome::Dead { attempts })
        } else {
            row.msg.next_attempt_at =
                now + chrono::Duration::from_std(failure.retry_in).unwrap_or(chrono::Duration::MAX);
            Ok(FailureOutcome::Retrying {
                attempts,
                next_attempt_at: row.msg.next_attempt_at,
            })
        }
    }

    async fn release(&self, worker: &str, ids: &[MessageId]) -> OutboxResult<()> {
        let mut st = self.state();
        for id in ids {
            if let Some(row) = st.rows.get_mut(id)
                && row.claim.as_ref().is_some_and(|(w, _)| w == worker)
            {
                row.claim = None;
            }
        }
        Ok(())
    }

    async fn wake_ups(&self) -> OutboxResult<WakeUps> {
        Ok(WakeUps::from_watch(self.inner.enqueued.subscribe()))
    }
}

impl DeadLetters for InMemoryOutbox {
    async fn status(&self) -> OutboxResult<OutboxStatusReport> {
        let now = Utc::now();
        let st = self.state();
        let mut r = OutboxStatusReport::default();
        let mut oldest: Option<DateTime<Utc>> = None;
        for row in st.rows.values() {
            match row.msg.status {
                OutboxStatus::Pending => {
                    r.pending += 1;
                    let c = row.msg.message.created_at;
                    oldest = Some(oldest.map_or(c, |o| o.min(c)));
                }
                OutboxStatus::Dead => r.dead += 1,
                OutboxStatus::Published => r.published += 1,
            }
        }
        r.oldest_pending_age = oldest.map(|o| (now - o).to_std().unwrap_or(Duration::ZERO));
        Ok(r)
    }

    async fn dead_letters(&self, limit: usize) -> OutboxResult<Vec<OutboxMessage>> {
        let st = self.state();
        Ok(st
            .by_sequence
            .values()
            .map(|id| &st.rows[id].msg)
            .filter(|m| m.status == OutboxStatus::Dead)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn replay(&self, id: MessageId) -> OutboxResult<()> {
        {
            let mut st = self.state();
            let row = st.rows.get_mut(&id).ok_or(OutboxError::NotFound(id))?;
            if row.msg.status != OutboxStatus::Dead {
                return Err(OutboxError::NotDead(id));
            }
            row.msg.status = OutboxStatus::Pending;
            row.msg.attempts = 0;
            row.msg.next_attempt_at = Utc::now();
            row.claim = None;
        }
        self.notify();
        Ok(())
    }

    async fn replay_all(&self) -> OutboxResult<u64> {
        let ids: Vec<MessageId> = {
            let st = self.state();
            st.rows
                .values()
                .filter(|r| r.msg.status == OutboxStatus::Dead)
                .map(|r| r.msg.id())
                .collect()
        };
        for id in &ids {
            self.replay(*id).await?;
        }
        Ok(ids.len() as u64)
    }

    async fn discard(&self, id: MessageId) -> OutboxResult<()> {
        let mut st = self.state();
        let row = st.rows.get(&id).ok_or(OutboxError::NotFound(id))?;
        if row.msg.status != OutboxStatus::Dead {
            return Err(OutboxError::NotDead(id));
        }
        let seq = row.msg.sequence;
        Self::settle(&mut st, id);
        st.rows.remove(&id);
        st.by_sequence.remove(&seq);
        drop(st);
        self.notify();
        Ok(())
    }
}

impl OutboxRetention for InMemoryOutbox {
    async fn purge_published(&self, older_than: Duration) -> OutboxResult<u64> {
        let cutoff =
            Utc::now() - chrono::Duration::from_std(older_than).unwrap_or(chrono::Duration::MAX);
        let mut st = self.state();
        let old: Vec<(MessageId, u64)> = st
            .rows
            .values()
            .filter(|r| {
                r.msg.status == OutboxStatus::Published
                    && r.msg.published_at.is_some_and(|p| p <= cutoff)
            })
            .map(|r| (r.msg.id(), r.msg.sequence))
            .collect();
        for (id, seq) in &old {
            st.rows.remove(id);
            st.by_sequence.remove(seq);
        }
        Ok(old.len() as u64)
    }
}

/// A unit-of-work transaction on [`InMemoryOutbox`]: appends, messages,
/// inbox entries and document writes are staged here and applied by
/// [`UnitOfWork::commit`]; dropping it discards them.
pub struct InMemoryUnitOfWorkTx {
    store: InMemoryOutbox,
    appends: Vec<(StreamId, ExpectedVersion, Vec<NewEvent>)>,
    messages: Vec<OutboundMessage>,
    inbox: Vec<(String, MessageId)>,
    documents: BTreeMap<(String, String), Option<Value>>,
}

impl std::fmt::Debug for InMemoryUnitOfWorkTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryUnitOfWorkTx")
            .field("appends", &self.appends.len())
            .field("messages", &self.messages.len())
            .field("inbox", &self.inbox.len())
            .field("documents", &self.documents.len())
            .finish()
    }
}

impl InMemoryUnitOfWorkTx {
    /// Reads a document as this transaction sees it (its own writes first).
    pub fn get(&self, collection: &str, key: &str) -> Option<Value> {
        let k = (collection.to_owned(), key.to_owned());
        match self.documents.get(&k) {
            Some(v) => v.clone(),
            None => self.store.state().documents.get(&k).cloned(),
        }
    }

    /// Writes a document.
    pub fn put(&mut self, collection: &str, key: &str, value: Value) {
        self.documents
            .insert((collection.to_owned(), key.to_owned()), Some(value));
    }

    /// Deletes a document.
    pub fn delete(&mut self, collection: &str, key: &str) {
        self.documents
            .insert((collection.to_owned(), key.to_owned()), None);
    }
}

impl UnitOfWork for InMemoryOutbox {
    type Transaction = InMemoryUnitOfWorkTx;

    async fn begin(&self) -> OutboxResult<InMemoryUnitOfWorkTx> {
        Ok(InMemoryUnitOfWorkTx {
            store: self.clone(),
            appends: Vec::new(),
            messages: Vec::new(),
            inbox: Vec::new(),
            documents: BTreeMap::new(),
        })
    }

    async fn commit(&self, tx: InMemoryUnitOfWorkTx) -> OutboxResult<()> {
        let _serial = self.inner.commit_lock.lock().await;
        // Check everything first.
        {
            let st = self.state();
            Self::check_new_messages(&st, &tx.messages)?;
            let mut seen = HashSet::new();
            for entry in &tx.inbox {
                if st.inbox.contains(entry) || !seen.insert(entry) {
                    return Err(OutboxError::DuplicateMessage(entry.1));
                }
            }
        }
        let mut versions: HashMap<&StreamId, Option<u64>> = HashMap::new();
        for (stream, expected, events) in &tx.appends {
            let current = match versions.get(stream) {
                Some(v) => *v,
                None => self.inner.events.stream_version(stream).await?,
            };
            if !expected.matches(current) {
                return Err(crate::error::EventStoreError::WrongExpectedVersion {
                    stream_id: stream.clone(),
                    expected: *expected,
                    actual: current,
                }
                .into());
            }
            versions.insert(stream, Some(current.unwrap_or(0) + events.len() as u64));
        }
        // Then apply.
        for (stream, expected, events) in &tx.appends {
            self.inner
                .events
                .append_to_stream(stream, *expected, events)
                .await?;
        }
        {
            let mut st = self.state();
            Self::insert_messages(&mut st, &tx.messages);
            st.inbox.extend(tx.inbox.iter().cloned());
            for (k, v) in tx.documents.iter() {
                match v {
                    Some(v) => st.documents.insert(k.clone(), v.clone()),
                    None => st.documents.remove(k),
                };
            }
        }
        if !tx.messages.is_empty() {
            self.notify();
        }
        Ok(())
    }

    async fn append_in_tx(
        &self,
        tx: &mut InMemoryUnitOfWorkTx,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> OutboxResult<()> {
        validate_batch(events, self.inner.events.max_payload_bytes())?;
        tx.appends
            .push((stream_id.clone(), expected, events.to_vec()));
        Ok(())
    }

    async fn enqueue_in_tx(
        &self,
        tx: &mut InMemoryUnitOfWorkTx,
        messages: &[OutboundMessage],
    ) -> OutboxResult<()> {
        for m in messages {
            validate_outbound(m)?;
        }
        tx.messages.extend_from_slice(messages);
        Ok(())
    }

    async fn record_inbox_in_tx(
        &self,
        tx: &mut InMemoryUnitOfWorkTx,
        consumer: &str,
        id: MessageId,
    ) -> OutboxResult<InboxRecord> {
        let key = (consumer.to_owned(), id);
        if tx.inbox.contains(&key) || self.state().inbox.contains(&key) {
            return Ok(InboxRecord::Duplicate);
        }
        tx.inbox.push(key);
        Ok(InboxRecord::New)
    }
}

impl InboxStore for InMemoryOutbox {
    async fn record_failure(
        &self,
        consumer: &str,
        message: &InboundMessage,
        error: &str,
        max_attempts: u32,
        dead_now: bool,
    ) -> OutboxResult<InboxFailure> {
        let key = (consumer.to_owned(), message.id);
        let mut st = self.state();
        let attempts = {
            let n = st.inbox_failures.entry(key.clone()).or_insert(0);
            *n += 1;
            *n
        };
        if !dead_now && attempts < max_attempts {
            return Ok(InboxFailure::Retry { attempts });
        }
        if st.inbox.insert(key) {
            st.inbox_dead.push(InboxDeadLetter {
                consumer: consumer.to_owned(),
                message_id: message.id,
                source: message.source.clone(),
                payload: message.payload.clone(),
                headers: message.headers.clone(),
                attempts,
                last_error: error.to_owned(),
                dead_at: Utc::now(),
            });
        }
        Ok(InboxFailure::Dead { attempts })
    }

    async fn is_processed(&self, consumer: &str, id: MessageId) -> OutboxResult<bool> {
        Ok(self.state().inbox.contains(&(consumer.to_owned(), id)))
    }

    async fn inbox_dead_letters(&self, consumer: &str) -> OutboxResult<Vec<InboxDeadLetter>> {
        Ok(self
            .state()
            .inbox_dead
            .iter()
            .filter(|d| d.consumer == consumer)
            .cloned()
            .collect())
    }
}
