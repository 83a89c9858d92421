//! The in-memory saga store: every [`SagaStore`] rule under one lock.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::outbox::{InMemoryOutbox, OutboxClaimer, OutboxError, OutboxStatus};
use crate::saga::error::SagaError;
use crate::saga::state::{
    HistoryEntry, HistoryEvent, HistoryKind, Lease, SagaCommand, SagaFilter, SagaId, SagaInstance,
    SagaState,
};
use crate::saga::store::{
    Claim, LeaseUpdate, NewSaga, SagaCommandOutbox, SagaCount, SagaStore, SagaTransition, Wake,
};
use crate::saga::wire::SAGA_ID_HEADER;
use crate::transport::MessageId;
use crate::unit_of_work::UnitOfWork;
use vextrus_kernel::{ErrorKind, HasErrorKind};

/// A saga store held in memory. Cloning gives another handle to the same
/// store, so a "restarted" orchestrator can be built on it.
///
/// Its clock is `tokio::time`: the wall-clock time at creation plus the
/// elapsed `tokio::time::Instant`, so timers and leases follow a paused,
/// advanced test clock. Each commit (instance, history, outgoing commands,
/// inbox record) happens under one lock: all or nothing.
///
/// ```
/// use std::time::Duration;
/// use serde_json::json;
/// use vextrus_core::saga::{InMemorySagaStore, NewSaga, SagaId, SagaState, SagaStore};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let store = InMemorySagaStore::new();
/// let id = SagaId::new();
/// store.create(NewSaga { id, saga_type: "t".into(), version: 1, data: json!({}), trace_context: None }).await.unwrap();
///
/// let first = store.claim(id, "worker-a", Duration::from_secs(10)).await.unwrap();
/// // worker-a holds a live lease: worker-b cannot claim
/// assert!(store.claim(id, "worker-b", Duration::from_secs(10)).await.is_err());
/// store.release(id, first.token).await.unwrap();
/// let second = store.claim(id, "worker-b", Duration::from_secs(10)).await.unwrap();
/// assert_eq!(second.token, first.token + 1);
/// // worker-a's token is stale now
/// assert!(store.release(id, first.token).await.unwrap_err().is_fenced());
/// assert_eq!(store.load(id).await.unwrap().unwrap().state, SagaState::Running);
/// # });
/// ```
#[derive(Clone)]
pub struct InMemorySagaStore {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Held by claims and commits, so a token checked by a commit stays
    /// current until the commit is applied (also across the outbox write).
    write_lock: tokio::sync::Mutex<()>,
    /// Where commands go when the store shares the in-memory unit of work:
    /// the outbox and the reply destination named in each command.
    outbox: Option<(InMemoryOutbox, String)>,
    base_utc: DateTime<Utc>,
    base_instant: tokio::time::Instant,
}

#[derive(Default)]
struct State {
    sagas: HashMap<SagaId, SagaInstance>,
    history: HashMap<SagaId, Vec<HistoryEntry>>,
    outbox: Vec<(SagaCommand, bool)>,
    inbox: HashSet<Uuid>,
}

impl std::fmt::Debug for InMemorySagaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("InMemorySagaStore")
            .field("sagas", &st.sagas.len())
            .field("outbox", &st.outbox.len())
            .field("inbox", &st.inbox.len())
            .finish()
    }
}

impl Default for InMemorySagaStore {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemorySagaStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::build(None)
    }

    /// A store whose commits enqueue their commands in `outbox` (as
    /// [`SagaCommand::to_outbound`] messages asking for replies on
    /// `reply_to`), in one unit-of-work transaction committed under the
    /// store's write lock before the transition is applied: a transition
    /// that is not written enqueues nothing, and one that is written has its
    /// command in the outbox for the relay. [`SagaCommandOutbox`] then
    /// reads the saga commands among the outbox's pending rows.
    pub fn with_outbox(outbox: InMemoryOutbox, reply_to: impl Into<String>) -> Self {
        Self::build(Some((outbox, reply_to.into())))
    }

    fn build(outbox: Option<(InMemoryOutbox, String)>) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                write_lock: tokio::sync::Mutex::new(()),
                outbox,
                base_utc: Utc::now(),
                base_instant: tokio::time::Instant::now(),
            }),
        }
    }

    /// Every command ever queued (here or handed to the outbox), in queue order.
    pub fn all_commands(&self) -> Vec<SagaCommand> {
        self.lock().outbox.iter().map(|(c, _)| c.clone()).collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn clock(&self) -> DateTime<Utc> {
        let elapsed =
            tokio::time::Instant::now().saturating_duration_since(self.inner.base_instant);
        self.inner.base_utc + chrono::Duration::from_std(elapsed).unwrap_or(chrono::TimeDelta::MAX)
    }
}

fn outbox_error(e: OutboxError) -> SagaError {
    match e.kind() {
        ErrorKind::Transient => SagaError::unavailable(e),
        _ => SagaError::backend(e),
    }
}

fn add(now: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(d).unwrap_or(chrono::TimeDelta::MAX)
}

fn lease_live(inst: &SagaInstance, now: DateTime<Utc>) -> bool {
    inst.lease.as_ref().is_some_and(|l| l.expires_at > now)
}

fn take_claim(inst: &mut SagaInstance, worker: &str, lease: Duration, now: DateTime<Utc>) -> Claim {
    inst.fencing_token += 1;
    inst.lease = Some(Lease {
        owner: worker.to_owned(),
        expires_at: add(now, lease),
    });
    Claim {
        instance: inst.clone(),
        token: inst.fencing_token,
    }
}

fn check_token(inst: &SagaInstance, token: u64) -> Result<(), SagaError> {
    if inst.fencing_token != token {
        return Err(SagaError::Fenced {
            saga_id: inst.id,
            token,
            current: inst.fencing_token,
        });
    }
    Ok(())
}

impl SagaStore for InMemorySagaStore {
    async fn now(&self) -> Result<DateTime<Utc>, SagaError> {
        Ok(self.clock())
    }

    async fn create(&self, new: NewSaga) -> Result<SagaInstance, SagaError> {
        let now = self.clock();
        let mut st = self.lock();
        if st.sagas.contains_key(&new.id) {
            return Err(SagaError::AlreadyExists(new.id));
        }
        let progress = new.initial_progress();
        let inst = SagaInstance {
            id: new.id,
            saga_type: new.saga_type,
            version: new.version,
            state: SagaState::Running,
            data: new.data,
            progress,
            due_at: Some(now),
            lease: None,
            fencing_token: 0,
            last_error: None,
            created_at: now,
            updated_at: now,
        };
        st.sagas.insert(new.id, inst.clone());
        st.history.insert(
            new.id,
            vec![HistoryEntry {
                seq: 1,
                at: now,
                worker: None,
                event: HistoryEvent::saga(HistoryKind::SagaStarted),
            }],
        );
        Ok(inst)
    }

    async fn load(&self, id: SagaId) -> Result<Option<SagaInstance>, SagaError> {
        Ok(self.lock().sagas.get(&id).cloned())
    }

    async fn history(&self, id: SagaId) -> Result<Vec<HistoryEntry>, SagaError> {
        Ok(self.lock().history.get(&id).cloned().unwrap_or_default())
    }

    async fn count_by_state(&self) -> Result<Vec<SagaCount>, SagaError> {
        let st = self.lock();
        let mut counts: std::collections::BTreeMap<(String, &'static str), (SagaState, u64)> =
            std::collections::BTreeMap::new();
        for i in st.sagas.values() {
            counts
                .entry((i.saga_type.clone(), i.state.as_str()))
                .or_insert((i.state, 0))
                .1 += 1;
        }
        Ok(counts
            .into_iter()
            .map(|((saga_type, _), (state, count))| SagaCount {
                saga_type,
                state,
                count,
            })
            .collect())
    }

    async fn list(&self, filter: &SagaFilter) -> Result<Vec<SagaInstance>, SagaError> {
        let now = self.clock();
        let st = self.lock();
        let mut out: Vec<_> = st
            .sagas
            .values()
            .filter(|i| filter.matches(i, now))
            .cloned()
            .collect();
        out.sort_by_key(|i| (i.created_at, i.id));
        out.truncate(filter.limit);
        Ok(out)
    }

    async fn claim_due(
        &self,
        worker: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Claim>, SagaError> {
        let _w = self.inner.write_lock.lock().await;
        let now = self.clock();
        let mut st = self.lock();
        let mut due: Vec<_> = st
            .sagas
            .values()
            .filter(|i| {
                !i.state.is_terminal() && i.due_at.is_some_and(|d| d <= now) && !lease_live(i, now)
            })
            .map(|i| (i.due_at, i.id))
            .collect();
        due.sort();
        due.truncate(limit);
        let mut claims = Vec::with_capacity(due.len());
        for (_, id) in due {
            if let Some(inst) = st.sagas.get_mut(&id) {
                claims.push(take_claim(inst, worker, lease, now));
            }
        }
        Ok(claims)
    }

    async fn claim(&self, id: SagaId, worker: &str, lease: Duration) -> Result<Claim, SagaError> {
        let _w = self.inner.write_lock.lock().await;
        let now = self.clock();
        let mut st = self.lock();
        let inst = st.sagas.get_mut(&id).ok_or(SagaError::NotFound(id))?;
        if lease_live(inst, now) {
            let owner = inst
                .lease
                .as_ref()
                .map(|l| l.owner.clone())
                .unwrap_or_default();
            return Err(SagaError::Leased { saga_id: id, owner });
        }
        Ok(take_claim(inst, worker, lease, now))
    }

    async fn commit(&self, t: SagaTransition) -> Result<SagaInstance, SagaError> {
        let _w = self.inner.write_lock.lock().await;
        {
            let st = self.lock();
            let inst = st
                .sagas
                .get(&t.saga_id)
                .ok_or(SagaError::NotFound(t.saga_id))?;
            check_token(inst, t.token)?;
            if let Some(m) = t.inbox_message_id
                && st.inbox.contains(&m)
            {
                return Err(SagaError::DuplicateMessage(m));
            }
        }
        // Checked, and nothing can claim meanwhile (the write lock): hand the
        // commands to the outbox's unit of work, then apply the rest.
        let handed_over = match &self.inner.outbox {
            Some((outbox, reply_to)) if !t.commands.is_empty() => {
                let messages = t
                    .commands
                    .iter()
                    .map(|c| c.to_outbound(reply_to))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut tx = outbox.begin().await.map_err(outbox_error)?;
                outbox
                    .enqueue_in_tx(&mut tx, &messages)
                    .await
                    .map_err(outbox_error)?;
                outbox.commit(tx).await.map_err(outbox_error)?;
                true
            }
            _ => false,
        };
        let now = self.clock();
        let mut guard = self.lock();
        let st = &mut *guard;
        // Everything checked: apply all parts together.
        if let Some(m) = t.inbox_message_id {
            st.inbox.insert(m);
        }
        let inst = st
            .sagas
            .get_mut(&t.saga_id)
            .ok_or(SagaError::NotFound(t.saga_id))?;
        inst.state = t.state;
        inst.data = t.data;
        inst.progress = t.progress;
        inst.last_error = t.last_error;
        inst.updated_at = now;
        inst.due_at = match t.wake {
            Wake::Now => Some(now),
            Wake::After(d) => Some(add(now, d)),
            Wake::Never => None,
            Wake::Unchanged => inst.due_at,
        };
        inst.lease = match t.lease {
            LeaseUpdate::Extend(d) => Some(Lease {
                owner: t.worker.clone(),
                expires_at: add(now, d),
            }),
            LeaseUpdate::Release => None,
        };
        let out = inst.clone();
        let history = st.history.entry(t.saga_id).or_default();
        for event in t.history {
            let seq = history.len() as u64 + 1;
            history.push(HistoryEntry {
                seq,
                at: now,
                worker: Some(t.worker.clone()),
                event,
            });
        }
        st.outbox
            .extend(t.commands.into_iter().map(|c| (c, handed_over)));
        Ok(out)
    }

    async fn release(&self, id: SagaId, token: u64) -> Result<(), SagaError> {
        let _w = self.inner.write_lock.lock().await;
        let mut st = self.lock();
        let inst = st.sagas.get_mut(&id).ok_or(SagaError::NotFound(id))?;
        check_token(inst, token)?;
        inst.lease = None;
        Ok(())
    }

    async fn message_handled(&self, message_id: Uuid) -> Result<bool, SagaError> {
        Ok(self.lock().inbox.contains(&message_id))
    }
}

/// Without an outbox: the store's own command queue. With one
/// ([`InMemorySagaStore::with_outbox`]): the saga commands among the
/// outbox's pending rows, and `mark_sent` marks them published there.
impl SagaCommandOutbox for InMemorySagaStore {
    async fn pending_commands(&self, limit: usize) -> Result<Vec<SagaCommand>, SagaError> {
        if let Some((outbox, _)) = &self.inner.outbox {
            return Ok(outbox
                .rows()
                .into_iter()
                .filter(|r| {
                    r.status == OutboxStatus::Pending
                        && r.message.headers.contains_key(SAGA_ID_HEADER)
                })
                .filter_map(|r| SagaCommand::from_outbound(&r.message).ok())
                .take(limit)
                .collect());
        }
        Ok(self
            .lock()
            .outbox
            .iter()
            .filter(|(_, sent)| !sent)
            .take(limit)
            .map(|(c, _)| c.clone())
            .collect())
    }

    async fn mark_sent(&self, message_ids: &[Uuid]) -> Result<(), SagaError> {
        if let Some((outbox, _)) = &self.inner.outbox {
            let ids: Vec<MessageId> = message_ids.iter().map(|u| MessageId(*u)).collect();
            return outbox.mark_published(&ids).await.map_err(outbox_error);
        }
        let ids: HashSet<_> = message_ids.iter().collect();
        for (c, sent) in self.lock().outbox.iter_mut() {
            if ids.contains(&c.message_id) {
                *sent = true;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::saga::state::{HistoryEvent, StepKind};

    async fn created(store: &InMemorySagaStore) -> SagaId {
        let id = SagaId::new();
        store
            .create(NewSaga {
                id,
                saga_type: "t".into(),
                version: 1,
                data: json!({"n": 0}),
                trace_context: None,
            })
            .await
            .unwrap();
        id
    }

    fn transition(claim: &Claim, wake: Wake) -> SagaTransition {
        SagaTransition {
            saga_id: claim.instance.id,
            token: claim.token,
            worker: "w".into(),
            state: SagaState::Running,
            data: json!({"n": 1}),
            progress: claim.instance.progress.clone(),
            last_error: None,
            wake,
            lease: LeaseUpdate::Release,
            history: vec![HistoryEvent::saga(HistoryKind::OperatorRetry)],
            commands: Vec::new(),
            inbox_message_id: None,
        }
    }

    fn command(saga_id: SagaId) -> SagaCommand {
        SagaCommand {
            message_id: Uuid::now_v7(),
            saga_id,
            saga_type: "t".into(),
            step: 0,
            step_name: "s".into(),
            kind: StepKind::Action,
            attempt: 1,
            idempotency_key: crate::saga::idempotency_key(saga_id, 0, StepKind::Action),
            destination: "inventory".into(),
            command_type: "reserve".into(),
            payload: json!({}),
        }
    }

    #[tokio::test]
    async fn a_duplicate_reply_writes_nothing() {
        let store = InMemorySagaStore::new();
        let id = created(&store).await;
        let m = Uuid::now_v7();
        let c = store.claim(id, "w", Duration::from_secs(5)).await.unwrap();
        let mut t = transition(&c, Wake::Now);
        t.inbox_message_id = Some(m);
        store.commit(t).await.unwrap();
        assert!(store.message_handled(m).await.unwrap());

        let c = store.claim(id, "w", Duration::from_secs(5)).await.unwrap();
        let mut t = transition(&c, Wake::Never);
        t.inbox_message_id = Some(m);
        t.data = json!({"n": 2});
        t.commands.push(command(id));
        let before = (
            store.load(id).await.unwrap(),
            store.history(id).await.unwrap(),
        );
        assert!(matches!(
            store.commit(t).await,
            Err(SagaError::DuplicateMessage(x)) if x == m
        ));
        let after = (
            store.load(id).await.unwrap(),
            store.history(id).await.unwrap(),
        );
        assert_eq!(before, after);
        assert!(store.all_commands().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn timers_and_leases_follow_the_store_clock() {
        let store = InMemorySagaStore::new();
        let id = created(&store).await;
        let c = store
            .claim_due("w", Duration::from_secs(5), 10)
            .await
            .unwrap();
        assert_eq!(c.len(), 1);
        let inst = store
            .commit(transition(&c[0], Wake::After(Duration::from_secs(60))))
            .await
            .unwrap();
        assert_eq!(
            inst.due_at.unwrap() - inst.updated_at,
            chrono::Duration::seconds(60)
        );
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(
            store
                .claim_due("w", Duration::from_secs(5), 10)
                .await
                .unwrap()
                .is_empty()
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        let c = store
            .claim_due("w", Duration::from_secs(5), 10)
            .await
            .unwrap();
        assert_eq!(c.len(), 1);

        // Leased: nobody else; after expiry: someone else, with a new token.
        assert!(store.claim(id, "x", Duration::from_secs(5)).await.is_err());
        tokio::time::advance(Duration::from_secs(5)).await;
        let x = store.claim(id, "x", Duration::from_secs(5)).await.unwrap();
        assert_eq!(x.token, c[0].token + 1);

        // Unchanged keeps the due time.
        let mut t = transition(&x, Wake::Unchanged);
        t.lease = LeaseUpdate::Extend(Duration::from_secs(1));
        let inst = store.commit(t).await.unwrap();
        assert_eq!(inst.due_at, x.instance.due_at);
        assert_eq!(inst.lease.unwrap().owner, "w");
    }

    #[tokio::test]
    async fn commands_reach_the_shared_outbox_only_with_their_transition() {
        let outbox = InMemoryOutbox::new();
        let store = InMemorySagaStore::with_outbox(outbox.clone(), "replies");
        let id = created(&store).await;
        let stale = store.claim(id, "a", Duration::ZERO).await.unwrap();
        let fresh = store.claim(id, "b", Duration::from_secs(5)).await.unwrap();

        let mut t = transition(&stale, Wake::Now);
        t.commands.push(command(id));
        assert!(store.commit(t).await.unwrap_err().is_fenced());
        assert!(outbox.rows().is_empty());

        let cmd = command(id);
        let mut t = transition(&fresh, Wake::Now);
        t.commands.push(cmd.clone());
        store.commit(t).await.unwrap();
        let rows = outbox.rows();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].id().0, cmd.message_id);
        assert_eq!(rows[0].message.headers["reply_to"], "replies");
        assert_eq!(store.pending_commands(10).await.unwrap(), vec![cmd.clone()]);
        store.mark_sent(&[cmd.message_id]).await.unwrap();
        assert!(store.pending_commands(10).await.unwrap().is_empty());
        assert_eq!(outbox.rows()[0].status, OutboxStatus::Published);
        assert_eq!(store.all_commands(), vec![cmd]);
    }
}
