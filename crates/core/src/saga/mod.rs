//! The durable saga orchestrator.
//!
//! A saga is a business transaction over several services: ordered steps,
//! each with an action and (if it has an effect to undo) a compensation. The
//! orchestrator runs the actions in order; when one fails for good it runs
//! the compensations of the completed steps in reverse order. Every
//! transition is stored before the engine moves on, so a crash anywhere
//! loses nothing: another worker resumes the saga where it stood.
//!
//! # Pieces
//!
//! - [`SagaDefinition`] (type name, version, [`Step`]s over typed data `D`),
//!   kept by version in a [`SagaRegistry`]. An instance records the version
//!   it started on and always finishes on it, so registering v2 never
//!   changes a running v1 saga.
//! - [`Action`]: local (an async fn run by the orchestrator, given the data
//!   and a [`StepContext`] with the idempotency key) or remote (a
//!   [`RemoteCommand`] queued as a [`SagaCommand`] in the outbox; the
//!   participant answers with a [`SagaReply`]).
//! - [`SagaStore`] (instances, timeline, leases, timers; one transaction per
//!   transition) and [`SagaCommandOutbox`] (the queued commands);
//!   [`InMemorySagaStore`] implements both.
//! - On the wire ([`SagaCommand::to_outbound`], [`SagaReply::from_inbound`],
//!   [`SagaReplyHandler`]): commands are outbox messages (CloudEvents
//!   headers plus [`SAGA_ID_HEADER`], [`IDEMPOTENCY_KEY_HEADER`],
//!   [`REPLY_TO_HEADER`]); participants reply through their own outbox; the
//!   orchestrator's [`InboxConsumer`](crate::inbox::InboxConsumer) hands
//!   replies to [`SagaReplyHandler`]. [`InMemorySagaStore::with_outbox`]
//!   enqueues commands in an [`InMemoryOutbox`](crate::outbox::InMemoryOutbox)
//!   as part of the commit; an SQL backend does it with `enqueue_in_tx` on the
//!   transaction that updates the saga row.
//! - [`Orchestrator`]: the worker ([`Orchestrator::run`],
//!   [`Orchestrator::run_once`]), the reply entry point
//!   ([`Orchestrator::handle_reply`]) and the operator API
//!   ([`list`](Orchestrator::list), [`show`](Orchestrator::show),
//!   [`retry`](Orchestrator::retry), [`abort`](Orchestrator::abort)).
//!
//! # State machine
//!
//! ```text
//!                 step ok (next step)
//!                 ┌─────┐
//!                 │     ▼
//! start ──► Running ────────── last step ok ─────────► Completed
//!              │  ▲
//!              │  └── retryable failure / timeout with attempts left:
//!              │      retry scheduled (durable due time, same idempotency key)
//!              │
//!              │ business failure, attempts exhausted, or operator abort
//!              ├── nothing to compensate ─────────────► Failed
//!              ▼
//!         Compensating ── every compensation confirmed ─► Compensated
//!              │  ▲   (reverse order; each retried with backoff)
//!              │  │
//!              │  └── operator retry / abort
//!              ▼
//!      CompensationFailed   (not terminal; no timer; waits for an operator)
//! ```
//!
//! `Completed`, `Compensated` and `Failed` are terminal. `Failed` means a
//! step failed before any step with a compensation had completed: nothing
//! had to be undone (for example an order rejected by its validation step).
//! A step with no compensation is one with no effect to undo; it is skipped
//! when compensating. A compensation that ends in a business failure (the
//! participant says it cannot be undone) goes to `CompensationFailed` at
//! once; a retryable one is retried until its budget is spent, then goes
//! there too. A saga is never `Compensated` before every needed
//! compensation has been confirmed.
//!
//! When an action *times out* for good (or a running saga is aborted while a
//! step is being attempted), its effect is unknown; if the step has a
//! compensation, that compensation runs first, before those of the
//! completed steps. Compensations must therefore accept "nothing to undo"
//! (the participant keys them by their idempotency key). A business
//! failure is a definite "not done": only completed steps are compensated.
//!
//! # One transaction per transition
//!
//! Each change — step started (intent recorded before acting), succeeded,
//! failed, timed out, retry scheduled; compensation started, succeeded,
//! failed; saga completed, compensated, failed, compensation-failed — is one
//! [`SagaTransition`], committed by [`SagaStore::commit`] in ONE transaction
//! with: the new state, data and progress; its timeline entries (the
//! append-only history: time, step, attempt, error, worker); the outgoing
//! command of a remote step; and the inbox record of the reply that caused
//! it. A reply is therefore applied exactly once, and a command is queued
//! exactly when its "started" transition is. A transition after which the
//! saga is due at once (a step succeeded, compensation required) is written
//! in the same transaction as the next "started" one, so a step costs one
//! commit; the intent of every call is still stored before the call is made.
//!
//! # Idempotency keys
//!
//! Every action and compensation gets [`idempotency_key`]`(saga, step,
//! kind)`. It does not depend on the attempt, so a retry, a resend after a
//! timeout, or a repeat after a crash has no second effect at a participant
//! that honours it.
//!
//! # Leases and fencing
//!
//! A worker drives a saga only under a claim: [`SagaStore::claim_due`] (due,
//! non-terminal, no live lease) or [`SagaStore::claim`] (one saga, for
//! replies and operators). A claim sets a lease expiring by the store's clock
//! and increments the saga's fencing token; every commit and release
//! carries the token and is rejected with [`SagaError::Fenced`] if another
//! claim happened since. A worker that stalls past its lease (GC pause,
//! partition) therefore cannot write once another has taken over: no saga
//! is ever driven by two workers at once. (The token, not the clock,
//! decides: a worker whose lease lapsed may still write as long as nobody
//! else has claimed the saga, which is safe.) Each commit extends the lease; the
//! start of a local step extends it by the step's timeout.
//!
//! # Timers
//!
//! A saga's `due_at` is its one durable timer, computed and judged by the
//! store's clock ([`Wake`] is relative; the store adds its own `now`): now
//! for work ready to run, now + backoff for a scheduled retry, now +
//! timeout for a started action or compensation. A started call whose
//! deadline passes without a result is a timeout, handled by its retry
//! policy — a remote command is resent with the same idempotency key. Since
//! timers live in the store, they fire after any restart: a worker's
//! [`run`](Orchestrator::run) claims every due, non-terminal saga at start-up
//! and continuously.

mod definition;
mod error;
mod memory;
mod orchestrator;
mod state;
mod store;
mod wire;

pub use definition::{
    Action, RemoteCommand, SagaData, SagaDefinition, SagaRegistry, Step, StepContext, StepOutcome,
    StepRetry,
};
pub use error::SagaError;
pub use memory::InMemorySagaStore;
pub use orchestrator::{Orchestrator, OrchestratorConfig, ReplyDisposition, SagaView};
pub use state::{
    HistoryEntry, HistoryEvent, HistoryKind, InFlight, Lease, ReplyOutcome, SagaCommand,
    SagaFilter, SagaId, SagaInstance, SagaProgress, SagaReply, SagaState, StepKind,
    compensated_action_key, idempotency_key,
};
pub use store::{
    Claim, LeaseUpdate, NewSaga, SagaCommandOutbox, SagaCount, SagaStore, SagaTransition, Wake,
};
pub use wire::{
    IDEMPOTENCY_KEY_HEADER, ORCHESTRATOR_SOURCE, REPLY_TO_HEADER, REPLY_TYPE, SAGA_ID_HEADER,
    SagaReplyHandler,
};
