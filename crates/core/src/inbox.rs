//! The inbox: a consumer applies each message's effects once, whatever the
//! redeliveries and crashes.
//!
//! [`InboxConsumer`] takes a delivery from a
//! [`MessageSource`], checks its headers,
//! and, in one [`UnitOfWork`] transaction, records `(consumer, message id)`
//! and runs the [`InboxHandler`]. It acknowledges only after the commit. A
//! redelivered message finds its inbox entry and is acknowledged without a
//! second effect. A failing handler's writes are rolled back, the failure
//! is counted in the store ([`InboxStore::record_failure`]) and the message
//! is nacked with backoff; after `max_attempts` it becomes an inbox dead
//! letter and is acknowledged. A message with malformed headers is
//! dead-lettered at once, never handed to the handler.

use std::time::Duration;
use tracing::Instrument;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::BoxError;
use crate::outbox::metrics as m;
use crate::outbox::{Backoff, OutboxError, OutboxResult};
use crate::transport::{Headers, InboundMessage, MessageDelivery, MessageId, MessageSource};
use crate::unit_of_work::{InboxRecord, UnitOfWork};

/// A message an inbox consumer gave up on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxDeadLetter {
    /// The consumer's name.
    pub consumer: String,
    /// The message id.
    pub message_id: MessageId,
    /// The topic or subject it came from.
    pub source: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Its headers.
    pub headers: Headers,
    /// Failed attempts.
    pub attempts: u32,
    /// The last error.
    pub last_error: String,
    /// When it was dead-lettered.
    pub dead_at: DateTime<Utc>,
}

/// What [`InboxStore::record_failure`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxFailure {
    /// Try again (nack); failed attempts so far.
    Retry {
        /// Failed attempts so far.
        attempts: u32,
    },
    /// Dead-lettered; the inbox entry is recorded too, so redeliveries are
    /// duplicates.
    Dead {
        /// Failed attempts so far.
        attempts: u32,
    },
}

/// The inbox's storage: the unit of work (for `record_inbox_in_tx`) plus
/// failure counting and dead letters, kept across redeliveries and crashes.
pub trait InboxStore: UnitOfWork {
    /// Counts a failed attempt of `consumer` on `message` (in a transaction
    /// of its own) and, when the attempts reach `max_attempts` or
    /// `dead_now` is set, stores an [`InboxDeadLetter`] and records the
    /// inbox entry in the same transaction.
    fn record_failure(
        &self,
        consumer: &str,
        message: &InboundMessage,
        error: &str,
        max_attempts: u32,
        dead_now: bool,
    ) -> impl Future<Output = OutboxResult<InboxFailure>> + Send;

    /// Whether `consumer` has recorded message `id` (processed or dead).
    fn is_processed(
        &self,
        consumer: &str,
        id: MessageId,
    ) -> impl Future<Output = OutboxResult<bool>> + Send;

    /// The consumer's dead letters, oldest first.
    fn inbox_dead_letters(
        &self,
        consumer: &str,
    ) -> impl Future<Output = OutboxResult<Vec<InboxDeadLetter>>> + Send;
}

/// Applies one message's effects inside the unit of work's transaction.
/// Its error rolls the transaction back.
pub trait InboxHandler<Tx>: Send + Sync {
    /// Handles `message`, writing through `tx`.
    fn handle(
        &self,
        tx: &mut Tx,
        message: &InboundMessage,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// How an [`InboxConsumer`] behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxConfig {
    /// The consumer's name: the first half of the inbox key.
    pub consumer: String,
    /// Failed attempts before a message is dead-lettered (at least 1).
    pub max_attempts: u32,
    /// The redelivery delay after a failure.
    pub backoff: Backoff,
}

impl InboxConfig {
    /// Defaults: 5 attempts, backoff 100 ms doubling up to 30 s.
    pub fn new(consumer: impl Into<String>) -> Self {
        Self {
            consumer: consumer.into(),
            max_attempts: 5,
            backoff: Backoff::default(),
        }
    }

    /// Sets the attempts before dead-lettering.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Sets the backoff.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }
}

/// What happened to one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxOutcome {
    /// Handled and committed, then acknowledged.
    Processed,
    /// Already processed: acknowledged without running the handler.
    Duplicate,
    /// The handler failed; nacked for redelivery.
    Retrying {
        /// Failed attempts so far.
        attempts: u32,
    },
    /// Given up on: dead-lettered and acknowledged.
    DeadLettered {
        /// Failed attempts.
        attempts: u32,
    },
    /// Malformed headers: dead-lettered and acknowledged without running
    /// the handler.
    Malformed,
}

impl InboxOutcome {
    fn label(self) -> &'static str {
        match self {
            InboxOutcome::Processed => "processed",
            InboxOutcome::Duplicate => "duplicate",
            InboxOutcome::Retrying { .. } => "retrying",
            InboxOutcome::DeadLettered { .. } => "dead_lettered",
            InboxOutcome::Malformed => "malformed",
        }
    }
}

/// Runs an [`InboxHandler`] over a [`MessageSource`] with exactly-once
/// effects (see the module docs).
///
/// ```
/// use serde_json::json;
/// use vextrus_core::BoxError;
/// use vextrus_core::inbox::{InboxConfig, InboxConsumer, InboxHandler, InboxOutcome};
/// use vextrus_core::outbox::{InMemoryOutbox, InMemoryUnitOfWorkTx};
/// use vextrus_core::transport::{InProcessTransport, InboundMessage, OutboundMessage, Transport};
/// use vextrus_kernel::EventMetadata;
///
/// struct Count;
/// impl InboxHandler<InMemoryUnitOfWorkTx> for Count {
///     async fn handle(&self, tx: &mut InMemoryUnitOfWorkTx, _m: &InboundMessage) -> Result<(), BoxError> {
///         let n = tx.get("counts", "n").and_then(|v| v.as_u64()).unwrap_or(0);
///         tx.put("counts", "n", json!(n + 1));
///         Ok(())
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let broker = InProcessTransport::new();
/// broker.declare("orders");
/// let msg = OutboundMessage::cloud_events("orders", "o-1", "order.placed", 1, "svc", b"{}".to_vec(), &EventMetadata::new());
/// broker.publish(&msg).await.unwrap();
/// broker.publish(&msg).await.unwrap(); // a duplicate delivery
///
/// let db = InMemoryOutbox::new();
/// let mut consumer = InboxConsumer::new(db.clone(), broker.subscribe("orders").unwrap(), Count, InboxConfig::new("billing"));
/// assert_eq!(consumer.process_next().await.unwrap(), Some(InboxOutcome::Processed));
/// assert_eq!(consumer.process_next().await.unwrap(), Some(InboxOutcome::Duplicate));
/// assert_eq!(db.document("counts", "n"), Some(json!(1)));
/// # });
/// ```
#[derive(Debug)]
pub struct InboxConsumer<U, S, H> {
    store: U,
    source: S,
    handler: H,
    config: InboxConfig,
}

impl<U, S, H> InboxConsumer<U, S, H>
where
    U: InboxStore,
    S: MessageSource,
    H: InboxHandler<U::Transaction>,
{
    /// A consumer of `source` writing through `store`.
    pub fn new(store: U, source: S, handler: H, config: InboxConfig) -> Self {
        Self {
            store,
            source,
            handler,
            config,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &InboxConfig {
        &self.config
    }

    /// Waits for the next delivery and handles it; `Ok(None)` when the
    /// source is closed. A store error leaves the delivery unacknowledged
    /// (nacked after the backoff's first delay), so it comes back.
    pub async fn process_next(&mut self) -> OutboxResult<Option<InboxOutcome>> {
        let Some(delivery) = self.source.next().await? else {
            return Ok(None);
        };
        // The handler's spans (and whatever it sends on) continue the trace
        // the message carries.
        let message = delivery.message();
        let span = vextrus_telemetry::spans::message_consume(
            message.id,
            &message.source,
            &message.headers,
        );
        let started = std::time::Instant::now();
        let handled = self.handle(&delivery).instrument(span).await;
        vextrus_telemetry::record::message_consume(
            started.elapsed(),
            match &handled {
                Ok((InboxOutcome::Processed | InboxOutcome::Duplicate, _)) => {
                    vextrus_telemetry::Outcome::Ok
                }
                Ok(_) | Err(_) => vextrus_telemetry::Outcome::Error,
            },
        );
        match handled {
            Ok((outcome, ack)) => {
                match ack {
                    Ack::Ack => delivery.ack().await?,
                    Ack::Nack(d) => delivery.nack(d).await?,
                }
                ::metrics::counter!(m::INBOX_MESSAGES_TOTAL,
                    m::LABEL_CONSUMER => self.config.consumer.clone(),
                    m::LABEL_OUTCOME => outcome.label())
                .increment(1);
                Ok(Some(outcome))
            }
            Err(e) => {
                let _ = delivery.nack(self.config.backoff.delay(1)).await;
                Err(e)
            }
        }
    }

    /// Processes deliveries until `shutdown` resolves or the source closes;
    /// store errors are logged and the loop goes on (the delivery comes
    /// back). Returns how many deliveries were handled.
    pub async fn run_until(&mut self, shutdown: impl Future<Output = ()>) -> u64 {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut n = 0;
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return n,
                r = self.process_next() => match r {
                    Ok(Some(_)) => n += 1,
                    Ok(None) => return n,
                    Err(e) => {
                        tracing::warn!(consumer = %self.config.consumer, error = %e, "inbox consumer failed; message will be redelivered");
                        tokio::time::sleep(self.config.backoff.delay(1)).await;
                    }
                },
            }
        }
    }

    async fn handle(&self, delivery: &S::Delivery) -> OutboxResult<(InboxOutcome, Ack)> {
        let msg = delivery.message();
        let consumer = self.config.consumer.as_str();
        if let Err(e) = msg.validate_headers() {
            tracing::warn!(consumer, id = %msg.id, error = %e, "malformed message dead-lettered");
            self.store
                .record_failure(
                    consumer,
                    msg,
                    &e.to_string(),
                    self.config.max_attempts,
                    true,
                )
                .await?;
            return Ok((InboxOutcome::Malformed, Ack::Ack));
        }
        let mut tx = self.store.begin().await?;
        if self
            .store
            .record_inbox_in_tx(&mut tx, consumer, msg.id)
            .await?
            == InboxRecord::Duplicate
        {
            drop(tx);
            return Ok((InboxOutcome::Duplicate, Ack::Ack));
        }
        let error = match self.handler.handle(&mut tx, msg).await {
            Ok(()) => match self.store.commit(tx).await {
                Ok(()) => return Ok((InboxOutcome::Processed, Ack::Ack)),
                Err(OutboxError::DuplicateMessage(_)) => {
                    return Ok((InboxOutcome::Duplicate, Ack::Ack));
                }
                Err(e) => return Err(e),
            },
            Err(e) => {
                drop(tx);
                e.to_string()
            }
        };
        tracing::debug!(consumer, id = %msg.id, %error, "inbox handler failed");
        match self
            .store
            .record_failure(consumer, msg, &error, self.config.max_attempts, false)
            .await?
        {
            InboxFailure::Retry { attempts } => Ok((
                InboxOutcome::Retrying { attempts },
                Ack::Nack(self.config.backoff.delay(attempts)),
            )),
            InboxFailure::Dead { attempts } => {
                tracing::warn!(consumer, id = %msg.id, attempts, %error, "inbox message dead-lettered");
                Ok((InboxOutcome::DeadLettered { attempts }, Ack::Ack))
            }
        }
    }
}

enum Ack {
    Ack,
    Nack(Duration),
}
