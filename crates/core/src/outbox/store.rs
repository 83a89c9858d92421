//! The outbox's traits, one per capability.
//!
//! # Claiming, and per-key order
//!
//! Relay workers share one outbox. [`OutboxClaimer::claim`] hands a worker
//! a batch under a lease judged by the **store's** clock. A message is
//! claimable only if it is the *head* of its partition key — no message of
//! the same key with a lower [`sequence`](super::OutboxMessage::sequence)
//! is still unfinished — and is due (`next_attempt_at <= now`) and not
//! leased to another worker (no claim, or an expired lease). Behind a
//! claimable head, the key's next pending, due messages may be claimed in
//! the same batch, in sequence order. So at any moment at most one worker
//! holds a key, and it publishes the key's messages in order; a crashed
//! worker's lease expires and another worker takes the key over at the
//! same message (a possible duplicate, never a reordering — provided the
//! lease is longer than a batch's publish time).
//!
//! "Unfinished" means pending; with [`DeadLetterPolicy::BlockKey`] a dead
//! letter is unfinished too.
//!
//! On PostgreSQL this is one statement: select heads
//! (`NOT EXISTS (SELECT 1 FROM outbox o2 WHERE o2.partition_key =
//! o.partition_key AND o2.sequence < o.sequence AND o2.status = 'pending')`)
//! that are due and unleased, `FOR UPDATE SKIP LOCKED`, plus their due
//! followers, and set `claimed_by`/`lease_until = now() + lease`. On SQLite
//! the same select and update run under `BEGIN IMMEDIATE`.
//!
//! # Dead letters and the order of a key
//!
//! [`DeadLetterPolicy::SkipKey`] (the default): a dead letter leaves its
//! key's order — the key's later messages keep flowing, and a replayed dead
//! letter is published after them. [`DeadLetterPolicy::BlockKey`]: the key's
//! later messages wait until the dead letter is replayed (then it goes
//! first) or discarded. Other keys are never held up.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::error::OutboxError;
use super::message::OutboxMessage;
use crate::store::WakeUps;
use crate::transport::{MessageId, OutboundMessage};

/// `Result` with [`OutboxError`].
pub type OutboxResult<T> = Result<T, OutboxError>;

/// What a dead letter does to the later messages of its partition key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterPolicy {
    /// Later messages of the key keep flowing (the dead letter leaves the
    /// key's order; a replay publishes it after them).
    #[default]
    SkipKey,
    /// Later messages of the key wait until the dead letter is replayed or
    /// discarded.
    BlockKey,
}

/// A relay worker's request for a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    /// The worker's unique name (tasks of one process and processes on
    /// several machines all need distinct names).
    pub worker: String,
    /// At most this many messages.
    pub limit: usize,
    /// How long the claim holds (store clock) before another worker may
    /// take the messages over.
    pub lease: Duration,
    /// Whether dead letters block their key.
    pub dead_letter_policy: DeadLetterPolicy,
}

/// A failed publish, as the relay reports it to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishFailure {
    /// The error, as text (stored as `last_error`).
    pub error: String,
    /// The backoff before the next attempt (store clock: `next_attempt_at =
    /// now + retry_in`).
    pub retry_in: Duration,
    /// The message becomes dead when its attempts reach this many.
    pub max_attempts: u32,
    /// The error is not retryable: dead letter now.
    pub dead_now: bool,
}

/// What [`OutboxClaimer::mark_failed`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureOutcome {
    /// Pending again, due at `next_attempt_at`.
    Retrying {
        /// Failed attempts so far.
        attempts: u32,
        /// When it is claimable again.
        next_attempt_at: DateTime<Utc>,
    },
    /// A dead letter now.
    Dead {
        /// Failed attempts so far.
        attempts: u32,
    },
    /// The message was no longer pending (already published or settled by
    /// another worker); nothing changed.
    Settled,
}

/// Backlog figures for `vextrus outbox status` and the relay's gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxStatusReport {
    /// Pending messages (claimed or not, due or waiting for a retry).
    pub pending: u64,
    /// Age of the oldest pending message (store clock), if any.
    pub oldest_pending_age: Option<Duration>,
    /// Dead letters.
    pub dead: u64,
    /// Published rows not yet removed by retention.
    pub published: u64,
}

/// Enqueues messages outside a unit of work and reads rows back. (Inside a
/// unit of work: [`crate::unit_of_work::UnitOfWork::enqueue_in_tx`].)
pub trait OutboxStore: Send + Sync {
    /// Enqueues `messages` in one transaction of the store's own, in order.
    /// A message id already stored fails the whole call with
    /// [`OutboxError::DuplicateMessage`]; a malformed message with
    /// [`OutboxError::InvalidMessage`].
    fn enqueue(
        &self,
        messages: &[OutboundMessage],
    ) -> impl Future<Output = OutboxResult<()>> + Send;

    /// One row by id.
    fn get(
        &self,
        id: MessageId,
    ) -> impl Future<Output = OutboxResult<Option<OutboxMessage>>> + Send;
}

/// What relay workers need: claim, settle, release, wake up. See the module
/// docs for the claim rule.
pub trait OutboxClaimer: Send + Sync {
    /// Claims up to `request.limit` due messages for `request.worker`,
    /// ordered by sequence, obeying the per-key rule.
    fn claim(
        &self,
        request: &ClaimRequest,
    ) -> impl Future<Output = OutboxResult<Vec<OutboxMessage>>> + Send;

    /// Marks messages published (the broker confirmed them) and clears their
    /// claim. Idempotent; a message no longer pending is left alone.
    fn mark_published(&self, ids: &[MessageId]) -> impl Future<Output = OutboxResult<()>> + Send;

    /// Records a failed attempt: `attempts + 1`, `last_error`, and either
    /// `next_attempt_at = now + retry_in` or dead (when `dead_now` or the
    /// attempts reach `max_attempts`). Clears the claim.
    fn mark_failed(
        &self,
        id: MessageId,
        failure: &PublishFailure,
    ) -> impl Future<Output = OutboxResult<FailureOutcome>> + Send;

    /// Gives back claims `worker` holds without an attempt (its breaker is
    /// open, or an earlier message of the key failed in the same batch).
    fn release(
        &self,
        worker: &str,
        ids: &[MessageId],
    ) -> impl Future<Output = OutboxResult<()>> + Send;

    /// Settles one batch `worker` claimed, as the relay does after each
    /// publish: marks `published` published, records each of `failed` as
    /// [`mark_failed`](Self::mark_failed) does, and gives `released` back;
    /// returns the failures' outcomes, in the order of `failed`. The
    /// default calls those three methods in that order; a store may do it
    /// all in one transaction (PostgreSQL does, in one statement).
    fn settle(
        &self,
        worker: &str,
        published: &[MessageId],
        failed: &[(MessageId, PublishFailure)],
        released: &[MessageId],
    ) -> impl Future<Output = OutboxResult<Vec<FailureOutcome>>> + Send {
        async move {
            if !published.is_empty() {
                self.mark_published(published).await?;
            }
            let mut outcomes = Vec::with_capacity(failed.len());
            for (id, failure) in failed {
                outcomes.push(self.mark_failed(*id, failure).await?);
            }
            if !released.is_empty() {
                self.release(worker, released).await?;
            }
            Ok(outcomes)
        }
    }

    /// Wake-ups after enqueues: PostgreSQL uses LISTEN/NOTIFY, memory a
    /// watch channel; the default is polling only.
    fn wake_ups(&self) -> impl Future<Output = OutboxResult<WakeUps>> + Send {
        async { Ok(WakeUps::polling()) }
    }
}

/// Dead letters and status: what `vextrus outbox status|dead-letters|replay|discard` call.
pub trait DeadLetters: Send + Sync {
    /// Backlog, oldest pending age, dead letters.
    fn status(&self) -> impl Future<Output = OutboxResult<OutboxStatusReport>> + Send;

    /// Up to `limit` dead letters, oldest sequence first.
    fn dead_letters(
        &self,
        limit: usize,
    ) -> impl Future<Output = OutboxResult<Vec<OutboxMessage>>> + Send;

    /// Makes a dead letter pending again, due now, attempts 0, same id (its
    /// `last_error` is kept for the record). [`OutboxError::NotFound`] or
    /// [`OutboxError::NotDead`] otherwise.
    fn replay(&self, id: MessageId) -> impl Future<Output = OutboxResult<()>> + Send;

    /// Replays every dead letter; returns how many.
    fn replay_all(&self) -> impl Future<Output = OutboxResult<u64>> + Send;

    /// Deletes a dead letter for good. [`OutboxError::NotFound`] or
    /// [`OutboxError::NotDead`] otherwise.
    fn discard(&self, id: MessageId) -> impl Future<Output = OutboxResult<()>> + Send;
}

/// Retention of published rows.
pub trait OutboxRetention: Send + Sync {
    /// Deletes published rows confirmed more than `older_than` ago (store
    /// clock); returns how many. Pending and dead rows are never touched.
    fn purge_published(
        &self,
        older_than: Duration,
    ) -> impl Future<Output = OutboxResult<u64>> + Send;
}
