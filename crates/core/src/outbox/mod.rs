//! The transactional outbox: messages enqueued in the same transaction as
//! the events and writes that cause them, and relayed to a broker only
//! after that transaction commits.
//!
//! - [`OutboxMessage`]: a row — the [`OutboundMessage`](crate::transport::OutboundMessage)
//!   plus sequence, attempts, next attempt, last error and status.
//! - Traits per capability: [`OutboxStore`] (enqueue, get),
//!   [`OutboxClaimer`] (claim with lease and per-key order, mark published,
//!   mark failed, release, wake-ups), [`DeadLetters`] (status, list, replay,
//!   discard), [`OutboxRetention`]. The [`store`] module documents the claim
//!   rule and what a dead letter does to its key.
//! - [`OutboxRelay`]: N workers that claim, publish through a
//!   [`Transport`](crate::transport::Transport) behind a circuit breaker,
//!   and settle; failures are rescheduled in the store with exponential
//!   backoff and full jitter ([`Backoff`]), so a crash loses nothing.
//! - [`lanes`]: how the SQL outboxes let relays claim and settle a batch
//!   with one lane update instead of two writes per message.
//! - [`InMemoryOutbox`]: every trait here, plus the unit of work and the
//!   inbox, in memory.

pub mod backoff;
pub mod error;
pub mod lanes;
pub mod memory;
pub mod message;
pub mod metrics;
pub mod relay;
pub mod store;

pub use backoff::Backoff;
pub use error::OutboxError;
pub use lanes::{LaneAdvance, LaneLedger, LanePlan, LaneRow, OUTBOX_LANES, lane_of};
pub use memory::{InMemoryOutbox, InMemoryUnitOfWorkTx};
pub use message::{OutboxMessage, OutboxStatus, validate_outbound};
pub use relay::{BatchReport, KeyPipelining, OutboxRelay, RelayConfig, RelayHandle};
pub use store::{
    ClaimRequest, DeadLetterPolicy, DeadLetters, FailureOutcome, OutboxClaimer, OutboxResult,
    OutboxRetention, OutboxStatusReport, OutboxStore, PublishFailure,
};
