//! The stored outbox message and its status.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::error::OutboxError;
use crate::transport::{MessageId, OutboundMessage, headers};

/// Where an outbox message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxStatus {
    /// Waiting to be published (possibly claimed by a relay worker, possibly
    /// waiting for its next attempt).
    Pending,
    /// Confirmed by the broker.
    Published,
    /// Gave up after too many attempts or a non-retryable error; kept with
    /// its last error until replayed or discarded.
    Dead,
}

impl OutboxStatus {
    /// The status as stored in SQL backends: `pending`, `published`, `dead`.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxStatus::Pending => "pending",
            OutboxStatus::Published => "published",
            OutboxStatus::Dead => "dead",
        }
    }

    /// Parses [`OutboxStatus::as_str`]'s output.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(OutboxStatus::Pending),
            "published" => Some(OutboxStatus::Published),
            "dead" => Some(OutboxStatus::Dead),
            _ => None,
        }
    }
}

/// An outbox row: the message plus its delivery bookkeeping.
///
/// ```
/// use vextrus_core::outbox::{OutboxMessage, OutboxStatus};
/// use vextrus_core::transport::OutboundMessage;
///
/// let row = OutboxMessage::pending(OutboundMessage::new("orders", "order-1", b"{}".to_vec()), 1);
/// assert_eq!(row.status, OutboxStatus::Pending);
/// assert_eq!(row.attempts, 0);
/// assert_eq!(row.message.partition_key, "order-1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxMessage {
    /// The message itself: id, destination, partition key, payload,
    /// headers, created-at.
    pub message: OutboundMessage,
    /// Enqueue order across the whole outbox (a database sequence): the
    /// order each partition key's messages are published in.
    pub sequence: u64,
    /// Failed publish attempts so far.
    pub attempts: u32,
    /// Not claimable before this instant (backoff after a failure).
    pub next_attempt_at: DateTime<Utc>,
    /// The last publish error, if any.
    pub last_error: Option<String>,
    /// Pending, published or dead.
    pub status: OutboxStatus,
    /// When the broker confirmed it.
    pub published_at: Option<DateTime<Utc>>,
}

impl OutboxMessage {
    /// A freshly enqueued row: pending, no attempts, due at its `created_at`.
    pub fn pending(message: OutboundMessage, sequence: u64) -> Self {
        Self {
            next_attempt_at: message.created_at,
            message,
            sequence,
            attempts: 0,
            last_error: None,
            status: OutboxStatus::Pending,
            published_at: None,
        }
    }

    /// The message id.
    pub fn id(&self) -> MessageId {
        self.message.id
    }
}

/// Checks a message before it is enqueued: a non-empty destination and
/// partition key without control characters, and a `ce_id` header, if
/// present, equal to the message id. Every backend calls this.
pub fn validate_outbound(message: &OutboundMessage) -> Result<(), OutboxError> {
    let bad = |s: String| Err(OutboxError::InvalidMessage(s));
    if message.destination.is_empty() || message.destination.chars().any(char::is_control) {
        return bad(format!(
            "message {}: empty or malformed destination",
            message.id
        ));
    }
    if message.partition_key.is_empty() || message.partition_key.chars().any(char::is_control) {
        return bad(format!(
            "message {}: empty or malformed partition key",
            message.id
        ));
    }
    if let Some(ce_id) = message.headers.get(headers::CE_ID)
        && *ce_id != message.id.to_string()
    {
        return bad(format!(
            "message {}: ce_id {ce_id} differs from the id",
            message.id
        ));
    }
    Ok(())
}
