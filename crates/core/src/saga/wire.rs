//! Saga commands and replies as transport messages, and the inbox handler
//! that feeds replies to the orchestrator.
//!
//! A command travels as an [`OutboundMessage`] whose id is the command's
//! `message_id`, whose payload is the [`SagaCommand`] as JSON, and whose
//! headers are CloudEvents binary mode (`ce_type` = the command type,
//! `correlation_id` = the saga id) plus [`SAGA_ID_HEADER`],
//! [`IDEMPOTENCY_KEY_HEADER`] and [`REPLY_TO_HEADER`]. A reply is the
//! [`SagaReply`] as JSON, its message id the reply's `message_id`.

use vextrus_kernel::{CorrelationId, EventMetadata};

use crate::error::BoxError;
use crate::inbox::InboxHandler;
use crate::saga::error::SagaError;
use crate::saga::orchestrator::{Orchestrator, ReplyDisposition};
use crate::saga::state::{ReplyOutcome, SagaCommand, SagaReply};
use crate::saga::store::SagaStore;
use crate::transport::{InboundMessage, MessageId, OutboundMessage};

/// Header naming the saga a command or reply belongs to.
pub const SAGA_ID_HEADER: &str = "saga_id";
/// Header carrying a command's idempotency key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency_key";
/// Header naming where a participant sends its reply.
pub const REPLY_TO_HEADER: &str = "reply_to";
/// The CloudEvents type of every reply.
pub const REPLY_TYPE: &str = "saga.reply";
/// The CloudEvents source of commands.
pub const ORCHESTRATOR_SOURCE: &str = "vextrus-saga-orchestrator";

/// The metadata of a command or reply: correlated by the saga id, and
/// carrying the current span's trace context (the saga step's span when the
/// orchestrator commits a command, the consume span when a participant
/// replies), so the receiver's spans continue the same trace.
fn metadata(saga: uuid::Uuid) -> EventMetadata {
    let mut metadata = EventMetadata {
        correlation_id: CorrelationId(saga),
        ..EventMetadata::new()
    };
    vextrus_telemetry::inject_into_metadata(&mut metadata);
    metadata
}

impl SagaCommand {
    /// This command as a transport message, asking for the reply on `reply_to`.
    ///
    /// ```
    /// use serde_json::json;
    /// use vextrus_core::saga::{ReplyOutcome, SagaCommand, SagaId, SagaReply, StepKind};
    ///
    /// let cmd = SagaCommand {
    ///     message_id: uuid::Uuid::now_v7(), saga_id: SagaId::new(), saga_type: "o2c".into(),
    ///     step: 1, step_name: "reserve".into(), kind: StepKind::Action, attempt: 1,
    ///     idempotency_key: "k".into(), destination: "inventory".into(),
    ///     command_type: "inventory.reserve".into(), payload: json!({"sku": "A"}),
    /// };
    /// let wire = cmd.to_outbound("saga.replies").unwrap();
    /// assert_eq!(wire.destination, "inventory");
    /// let inbound = vextrus_core::transport::InboundMessage::from_outbound(&wire, 1);
    /// let (back, reply_to) = SagaCommand::from_inbound(&inbound).unwrap();
    /// assert_eq!((back, reply_to.as_str()), (cmd.clone(), "saga.replies"));
    ///
    /// let reply = cmd.reply(ReplyOutcome::Success(json!({})));
    /// let wire = reply.to_outbound("saga.replies").unwrap();
    /// let inbound = vextrus_core::transport::InboundMessage::from_outbound(&wire, 1);
    /// assert_eq!(SagaReply::from_inbound(&inbound).unwrap(), reply);
    /// ```
    pub fn to_outbound(&self, reply_to: &str) -> Result<OutboundMessage, SagaError> {
        let mut msg = OutboundMessage::new(
            self.destination.clone(),
            self.saga_id.to_string(),
            serde_json::to_vec(self)?,
        );
        msg.id = MessageId(self.message_id);
        msg.set_cloud_events_headers(
            &self.command_type,
            1,
            ORCHESTRATOR_SOURCE,
            &metadata(self.saga_id.0),
        );
        msg.headers
            .insert(SAGA_ID_HEADER.into(), self.saga_id.to_string());
        msg.headers
            .insert(IDEMPOTENCY_KEY_HEADER.into(), self.idempotency_key.clone());
        msg.headers.insert(REPLY_TO_HEADER.into(), reply_to.into());
        Ok(msg)
    }

    /// The command in an outbound message built by
    /// [`to_outbound`](Self::to_outbound) (for backends that read their
    /// queued commands back from a shared outbox table).
    pub fn from_outbound(message: &OutboundMessage) -> Result<SagaCommand, SagaError> {
        let cmd: SagaCommand = serde_json::from_slice(&message.payload)
            .map_err(|e| SagaError::InvalidMessage(format!("not a saga command: {e}")))?;
        if cmd.message_id != message.id.0 {
            return Err(SagaError::InvalidMessage(format!(
                "message id {} differs from the command's {}",
                message.id, cmd.message_id
            )));
        }
        Ok(cmd)
    }

    /// The command carried by a transport message, and where to reply.
    pub fn from_inbound(message: &InboundMessage) -> Result<(SagaCommand, String), SagaError> {
        let cmd: SagaCommand = serde_json::from_slice(&message.payload)
            .map_err(|e| SagaError::InvalidMessage(format!("not a saga command: {e}")))?;
        if cmd.message_id != message.id.0 {
            return Err(SagaError::InvalidMessage(format!(
                "message id {} differs from the command's {}",
                message.id, cmd.message_id
            )));
        }
        let reply_to = message
            .header(REPLY_TO_HEADER)
            .ok_or_else(|| SagaError::InvalidMessage("no reply_to header".into()))?
            .to_owned();
        Ok((cmd, reply_to))
    }
}

impl SagaReply {
    /// This reply as a transport message to `destination` (the command's
    /// `reply_to`).
    pub fn to_outbound(&self, destination: &str) -> Result<OutboundMessage, SagaError> {
        let mut msg = OutboundMessage::new(
            destination,
            self.saga_id.to_string(),
            serde_json::to_vec(self)?,
        );
        msg.id = MessageId(self.message_id);
        let source = match &self.outcome {
            ReplyOutcome::Success(_) => "saga-participant",
            _ => "saga-participant-failure",
        };
        msg.set_cloud_events_headers(REPLY_TYPE, 1, source, &metadata(self.saga_id.0));
        msg.headers
            .insert(SAGA_ID_HEADER.into(), self.saga_id.to_string());
        Ok(msg)
    }

    /// The reply carried by a transport message (its message id is the
    /// transport's, the inbox key).
    pub fn from_inbound(message: &InboundMessage) -> Result<SagaReply, SagaError> {
        let mut reply: SagaReply = serde_json::from_slice(&message.payload)
            .map_err(|e| SagaError::InvalidMessage(format!("not a saga reply: {e}")))?;
        reply.message_id = message.id.0;
        Ok(reply)
    }
}

/// The orchestrator's [`InboxHandler`]: each delivery on the reply
/// destination is parsed as a [`SagaReply`] and fed to
/// [`Orchestrator::handle_reply`]. It works with any unit of work: the
/// reply's effect is exactly-once because the saga store records the
/// reply's message id in the same transaction as the transition it causes
/// (a redelivery is a `Duplicate` no-op), whatever happens to the inbox
/// consumer's own transaction. A saga leased by another worker is an error,
/// so the consumer redelivers the reply later.
#[derive(Debug, Clone)]
pub struct SagaReplyHandler<S> {
    orchestrator: Orchestrator<S>,
}

impl<S> SagaReplyHandler<S> {
    /// A handler feeding `orchestrator`.
    pub fn new(orchestrator: Orchestrator<S>) -> Self {
        Self { orchestrator }
    }
}

impl<S: SagaStore, Tx: Send> InboxHandler<Tx> for SagaReplyHandler<S> {
    async fn handle(&self, _tx: &mut Tx, message: &InboundMessage) -> Result<(), BoxError> {
        let reply = SagaReply::from_inbound(message)?;
        match self.orchestrator.handle_reply(&reply).await? {
            ReplyDisposition::Applied | ReplyDisposition::Ignored | ReplyDisposition::Duplicate => {
                Ok(())
            }
        }
    }
}
