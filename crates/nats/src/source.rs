//! [`JetStreamSource`]: a durable pull consumer that feeds the inbox.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
    message::Acker,
};
use futures::StreamExt;
use vextrus_core::transport::{
    InboundMessage, MessageDelivery, MessageId, MessageSource, TransportError,
};

use crate::config::{JetStreamConfig, validate_subject};
use crate::error::{NatsError, Result};
use crate::headers::{
    CE_ID, DEAD_LETTER_REASON, DEAD_LETTER_SEQUENCE, DEAD_LETTER_SUBJECT, NATS_MSG_ID,
    from_nats_headers,
};
use crate::metrics as m;
use crate::transport::{connect_client, context_for};

/// How a [`JetStreamSource`] consumes a stream.
///
/// ```
/// use std::time::Duration;
/// use vextrus_nats::ConsumerSpec;
///
/// let spec = ConsumerSpec::new("ORDERS", "billing")
///     .with_filter_subject("orders.placed")
///     .with_ack_wait(Duration::from_secs(10))
///     .with_max_deliver(10)
///     .with_dead_letter_subject("dlq.billing");
/// assert_eq!(spec.durable_name(), "billing");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    pub(crate) stream: String,
    pub(crate) durable_name: String,
    pub(crate) filter_subject: Option<String>,
    pub(crate) ack_wait: Duration,
    pub(crate) max_deliver: i64,
    pub(crate) max_ack_pending: i64,
    pub(crate) batch: usize,
    pub(crate) dead_letter_subject: Option<String>,
}

impl ConsumerSpec {
    /// A durable consumer named `durable_name` on `stream`: all subjects,
    /// explicit acks, 30 s ack wait, at most 20 deliveries of a message,
    /// 1000 unacknowledged messages at once, pulls of 256.
    ///
    /// Keep `max_deliver` above the inbox's own attempt limit, so the inbox
    /// sees a failing message's last attempt and dead-letters it itself.
    pub fn new(stream: impl Into<String>, durable_name: impl Into<String>) -> Self {
        ConsumerSpec {
            stream: stream.into(),
            durable_name: durable_name.into(),
            filter_subject: None,
            ack_wait: Duration::from_secs(30),
            max_deliver: 20,
            max_ack_pending: 1000,
            batch: 256,
            dead_letter_subject: None,
        }
    }

    /// Consumes only messages whose subject matches `subject` (wildcards
    /// allowed).
    pub fn with_filter_subject(mut self, subject: impl Into<String>) -> Self {
        self.filter_subject = Some(subject.into());
        self
    }

    /// How long the server waits for an ack before it redelivers.
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// How many times the server delivers a message at most (`-1`: no limit).
    pub fn with_max_deliver(mut self, max_deliver: i64) -> Self {
        self.max_deliver = max_deliver;
        self
    }

    /// How many delivered, unacknowledged messages the consumer may hold.
    pub fn with_max_ack_pending(mut self, max_ack_pending: i64) -> Self {
        self.max_ack_pending = max_ack_pending;
        self
    }

    /// How many messages one pull asks for.
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Where malformed messages are copied before they are terminated (the
    /// subject must be stored by some stream). Without one, a malformed
    /// message is terminated, logged and counted, and stays in its stream.
    pub fn with_dead_letter_subject(mut self, subject: impl Into<String>) -> Self {
        self.dead_letter_subject = Some(subject.into());
        self
    }

    /// The stream's name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The durable consumer's name.
    pub fn durable_name(&self) -> &str {
        &self.durable_name
    }

    fn consumer_config(&self) -> pull::Config {
        pull::Config {
            durable_name: Some(self.durable_name.clone()),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver,
            max_ack_pending: self.max_ack_pending,
            filter_subject: self.filter_subject.clone().unwrap_or_default(),
            ..Default::default()
        }
    }
}

/// One delivery of a message from JetStream, with the handle to acknowledge
/// it.
///
/// Acknowledge ([`MessageDelivery::ack`]) only after the consumer's
/// transaction committed; [`MessageDelivery::nack`] asks for a redelivery
/// after a delay. A delivery dropped unacknowledged is redelivered after the
/// ack wait.
pub struct Delivery {
    message: InboundMessage,
    subject: String,
    stream_sequence: u64,
    acker: Acker,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.message.id)
            .field("subject", &self.subject)
            .field("partition_key", &self.message.partition_key)
            .field("delivery_attempt", &self.message.delivery_attempt)
            .field("stream_sequence", &self.stream_sequence)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// The message (its `source` is the destination it was published to:
    /// the subject without the configured prefix).
    pub fn message(&self) -> &InboundMessage {
        &self.message
    }

    /// The full NATS subject it arrived on.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The message's sequence in its stream.
    pub fn stream_sequence(&self) -> u64 {
        self.stream_sequence
    }

    /// Acknowledges the message and waits for the server to confirm, so the
    /// caller knows it will not come again (unless the confirmation is lost,
    /// which the inbox absorbs).
    pub async fn ack_confirmed(&self) -> Result<()> {
        self.acker
            .double_ack()
            .await
            .map_err(|err| NatsError::Ack(format!("ack of {} failed: {err}", self.message.id)))
    }

    /// Asks the server to deliver the message again after `delay`.
    pub async fn nack_after(&self, delay: Duration) -> Result<()> {
        self.acker
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(|err| NatsError::Ack(format!("nak of {} failed: {err}", self.message.id)))
    }

    /// Tells the server never to deliver the message again (after the inbox
    /// dead-lettered it).
    pub async fn term(&self) -> Result<()> {
        self.acker
            .ack_with(AckKind::Term)
            .await
            .map_err(|err| NatsError::Ack(format!("term of {} failed: {err}", self.message.id)))
    }

    /// Extends the ack wait while a slow handler still works.
    pub async fn in_progress(&self) -> Result<()> {
        self.acker
            .ack_with(AckKind::Progress)
            .await
            .map_err(|err| NatsError::Ack(format!("progress of {} failed: {err}", self.message.id)))
    }
}

impl MessageDelivery for Delivery {
    fn message(&self) -> &InboundMessage {
        &self.message
    }

    async fn ack(self) -> std::result::Result<(), TransportError> {
        self.ack_confirmed().await.map_err(TransportError::from)
    }

    async fn nack(self, delay: Duration) -> std::result::Result<(), TransportError> {
        self.nack_after(delay).await.map_err(TransportError::from)
    }
}

/// A durable JetStream pull consumer (explicit acks) that yields
/// [`Delivery`]s.
///
/// The consumer is created if missing and updated to the spec if it exists.
/// A message whose headers are malformed (no id, an id that is not a UUID,
/// `Nats-Msg-Id` and `ce_id` disagreeing) is never handed to the handler and
/// never silently dropped: it is copied to the dead-letter subject (if set),
/// terminated, logged, counted ([`malformed_count`](Self::malformed_count)),
/// and [`next_delivery`](Self::next_delivery) returns
/// [`NatsError::MalformedMessage`] for it (through [`MessageSource::next`]:
/// [`TransportError::InvalidHeaders`]); the following call goes on with the
/// next message. Headers are checked with
/// [`InboundMessage::validate_headers`], except that a missing `ce_id` is
/// accepted when `Nats-Msg-Id` carries the id.
///
/// ```no_run
/// # async fn demo() -> Result<(), vextrus_nats::NatsError> {
/// use vextrus_nats::{ConsumerSpec, JetStreamConfig, JetStreamSource};
///
/// let mut source = JetStreamSource::connect(
///     JetStreamConfig::new("nats://127.0.0.1:4222"),
///     ConsumerSpec::new("ORDERS", "billing"),
/// )
/// .await?;
/// let delivery = source.next_delivery().await?;
/// println!("{:?}", delivery.message().id);
/// // ... run the handler and commit its transaction with the inbox row, then:
/// delivery.ack_confirmed().await?;
/// # Ok(()) }
/// ```
pub struct JetStreamSource {
    context: jetstream::Context,
    consumer: PullConsumer,
    messages: Option<pull::Stream>,
    spec: ConsumerSpec,
    subject_prefix: Option<String>,
    malformed: Arc<AtomicU64>,
}

impl std::fmt::Debug for JetStreamSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamSource")
            .field("spec", &self.spec)
            .field("malformed", &self.malformed_count())
            .finish_non_exhaustive()
    }
}

impl JetStreamSource {
    /// Connects and creates (or updates) the durable consumer. The stream
    /// must exist.
    pub async fn connect(config: JetStreamConfig, spec: ConsumerSpec) -> Result<Self> {
        config.validate()?;
        if let Some(filter) = &spec.filter_subject {
            validate_subject(filter, true)?;
        }
        if let Some(dlq) = &spec.dead_letter_subject {
            validate_subject(dlq, false)?;
        }
        let client = connect_client(&config).await?;
        let context = context_for(client, &config);
        let mut source = Self::with_context(context, spec).await?;
        source.subject_prefix = config.subject_prefix.clone();
        Ok(source)
    }

    /// Builds the source on an existing JetStream context (sharing its
    /// connection).
    pub async fn with_context(context: jetstream::Context, spec: ConsumerSpec) -> Result<Self> {
        let consumer_error =
            |reason: &str, err: Box<dyn std::error::Error + Send + Sync>| NatsError::Consumer {
                consumer: spec.durable_name.clone(),
                reason: reason.to_owned(),
                source: Some(err),
            };
        let stream = context.get_stream(&spec.stream).await.map_err(|err| {
            consumer_error(&format!("cannot read stream `{}`", spec.stream), err.into())
        })?;
        let consumer: PullConsumer = match stream
            .get_consumer::<pull::Config>(&spec.durable_name)
            .await
        {
            Ok(consumer) => {
                let wanted = spec.consumer_config();
                let current = &consumer.cached_info().config;
                if current.ack_wait != wanted.ack_wait
                    || current.max_deliver != wanted.max_deliver
                    || current.max_ack_pending != wanted.max_ack_pending
                {
                    // Servers from 2.9 on apply a create with a changed
                    // config to an existing durable as an update.
                    stream.create_consumer(wanted).await.map_err(|err| {
                        consumer_error("cannot update the consumer to the spec", err.into())
                    })?
                } else {
                    consumer
                }
            }
            Err(_) => stream
                .create_consumer(spec.consumer_config())
                .await
                .map_err(|err| consumer_error("cannot create the consumer", err.into()))?,
        };
        Ok(JetStreamSource {
            context,
            consumer,
            messages: None,
            spec,
            subject_prefix: None,
            malformed: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The consumer's spec.
    pub fn spec(&self) -> &ConsumerSpec {
        &self.spec
    }

    /// How many malformed messages this source terminated so far.
    pub fn malformed_count(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }

    /// Waits for the next message. Transient pull failures (a missed
    /// heartbeat while the server is away) are retried inside; the call
    /// returns once a message arrives, or with an error for a malformed
    /// message or a consumer that no longer exists.
    pub async fn next_delivery(&mut self) -> Result<Delivery> {
        loop {
            if self.messages.is_none() {
                let messages = self
                    .consumer
                    .stream()
                    .max_messages_per_batch(self.spec.batch)
                    .heartbeat(Duration::from_secs(5))
                    .expires(Duration::from_secs(30))
                    .messages()
                    .await
                    .map_err(|err| NatsError::Consumer {
                        consumer: self.spec.durable_name.clone(),
                        reason: "cannot start pulling".into(),
                        source: Some(err.into()),
                    });
                match messages {
                    Ok(messages) => self.messages = Some(messages),
                    Err(err) => {
                        tracing::warn!(error = %err, "pull failed; retrying in 1 s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            let Some(messages) = self.messages.as_mut() else {
                continue;
            };
            match messages.next().await {
                Some(Ok(message)) => return self.accept(message).await,
                Some(Err(err)) => {
                    use async_nats::jetstream::consumer::pull::MessagesErrorKind;
                    if matches!(err.kind(), MessagesErrorKind::ConsumerDeleted) {
                        self.messages = None;
                        return Err(NatsError::Consumer {
                            consumer: self.spec.durable_name.clone(),
                            reason: "the consumer was deleted".into(),
                            source: Some(err.into()),
                        });
                    }
                    tracing::debug!(error = %err, "pull interrupted; continuing");
                }
                None => self.messages = None,
            }
        }
    }

    async fn accept(&self, message: jetstream::Message) -> Result<Delivery> {
        let (stream_sequence, delivered) = match message.info() {
            Ok(info) => (info.stream_sequence, info.delivered),
            Err(_) => (0, 1),
        };
        let (message, acker) = message.split();
        let subject = message.subject.to_string();
        let decoded = from_nats_headers(message.headers.as_ref()).and_then(|decoded| {
            let inbound = InboundMessage {
                id: MessageId(decoded.id),
                source: self.destination_of(&subject),
                partition_key: decoded.partition_key,
                payload: message.payload.to_vec(),
                headers: decoded.headers,
                delivery_attempt: u32::try_from(delivered.max(1)).unwrap_or(u32::MAX),
            };
            validate(&inbound)?;
            Ok(inbound)
        });
        match decoded {
            Ok(inbound) => {
                metrics::counter!(m::DELIVERED_TOTAL).increment(1);
                Ok(Delivery {
                    message: inbound,
                    subject,
                    stream_sequence,
                    acker,
                })
            }
            Err(err) => {
                let reason = err.to_string();
                if let Some(dlq) = &self.spec.dead_letter_subject
                    && let Err(dlq_err) = self
                        .dead_letter(dlq, &subject, stream_sequence, &reason, &message)
                        .await
                {
                    // Not copied: leave it for a redelivery rather than lose it.
                    let _ = acker
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                    return Err(dlq_err);
                }
                if let Err(term_err) = acker.ack_with(AckKind::Term).await {
                    tracing::warn!(error = %term_err, "terminating a malformed message failed; it will be redelivered");
                }
                self.malformed.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::MALFORMED_TOTAL).increment(1);
                tracing::error!(
                    subject = %subject,
                    stream_sequence,
                    consumer = %self.spec.durable_name,
                    reason = %reason,
                    "malformed message terminated"
                );
                Err(NatsError::MalformedMessage {
                    subject,
                    stream_sequence,
                    reason,
                })
            }
        }
    }

    /// The destination a subject was published to: the subject without the
    /// configured prefix.
    fn destination_of(&self, subject: &str) -> String {
        match &self.subject_prefix {
            Some(prefix) => subject
                .strip_prefix(prefix.as_str())
                .and_then(|rest| rest.strip_prefix('.'))
                .unwrap_or(subject)
                .to_owned(),
            None => subject.to_owned(),
        }
    }

    async fn dead_letter(
        &self,
        dlq: &str,
        subject: &str,
        stream_sequence: u64,
        reason: &str,
        message: &async_nats::Message,
    ) -> Result<()> {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(original) = &message.headers {
            for (name, values) in original.iter() {
                if AsRef::<str>::as_ref(name) == NATS_MSG_ID {
                    continue;
                }
                for value in values {
                    headers.append(name.clone(), value.clone());
                }
            }
        }
        // The reason comes from our own error text; strip line breaks so it
        // is a valid header value.
        let reason = reason.replace(['\r', '\n'], " ");
        let extra = BTreeMap::from([
            (DEAD_LETTER_REASON.to_owned(), reason),
            (DEAD_LETTER_SUBJECT.to_owned(), subject.to_owned()),
            (DEAD_LETTER_SEQUENCE.to_owned(), stream_sequence.to_string()),
        ]);
        for (name, value) in extra {
            let value = async_nats::HeaderValue::from_str(&value)
                .map_err(|err| NatsError::InvalidHeaders(err.to_string()))?;
            headers.insert(name.as_str(), value);
        }
        // The copy's de-duplication id is its origin, so a redelivered
        // malformed message (its termination lost) is not copied twice.
        headers.insert(
            NATS_MSG_ID,
            format!(
                "{}-{}-{stream_sequence}",
                self.spec.stream, self.spec.durable_name
            )
            .as_str(),
        );
        let ack = self
            .context
            .publish_with_headers(dlq.to_owned(), headers, message.payload.clone())
            .await
            .map_err(|err| NatsError::unavailable(format!("cannot dead-letter to `{dlq}`"), err))?;
        ack.await.map_err(|err| {
            NatsError::unavailable(format!("dead letter to `{dlq}` not confirmed"), err)
        })?;
        Ok(())
    }
}

impl MessageSource for JetStreamSource {
    type Delivery = Delivery;

    /// The next valid message. A malformed one is
    /// [`TransportError::InvalidHeaders`] (already terminated and, with a
    /// dead-letter subject, copied there); the source never closes by
    /// itself, so this never returns `Ok(None)`.
    async fn next(&mut self) -> std::result::Result<Option<Delivery>, TransportError> {
        self.next_delivery()
            .await
            .map(Some)
            .map_err(TransportError::from)
    }
}

/// [`InboundMessage::validate_headers`], accepting a missing `ce_id` (the id
/// came in `Nats-Msg-Id`).
fn validate(message: &InboundMessage) -> Result<()> {
    let result = if message.headers.contains_key(CE_ID) {
        message.validate_headers()
    } else {
        let mut with_id = message.clone();
        with_id
            .headers
            .insert(CE_ID.to_owned(), message.id.to_string());
        with_id.validate_headers()
    };
    result.map_err(|err| match err {
        TransportError::InvalidHeaders(reason) => NatsError::InvalidHeaders(reason),
        other => NatsError::InvalidHeaders(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbound(headers: &[(&str, &str)]) -> InboundMessage {
        InboundMessage {
            id: MessageId(uuid::Uuid::parse_str("0190a0f2-8d2c-7c4e-9a57-6f3c2b1a0d9e").unwrap()),
            source: "s".into(),
            partition_key: None,
            payload: Vec::new(),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            delivery_attempt: 1,
        }
    }

    #[test]
    fn validation_accepts_a_missing_ce_id_but_not_bad_headers() {
        assert!(validate(&inbound(&[])).is_ok());
        assert!(
            validate(&inbound(&[(
                "ce_id",
                "0190a0f2-8d2c-7c4e-9a57-6f3c2b1a0d9e"
            )]))
            .is_ok()
        );
        for bad in [
            ("traceparent", "garbage"),
            ("correlation_id", "nope"),
            ("ce_time", "yesterday"),
            ("ce_specversion", "0.3"),
        ] {
            assert!(
                matches!(
                    validate(&inbound(&[bad])),
                    Err(NatsError::InvalidHeaders(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn consumer_config_is_durable_with_explicit_acks() {
        let spec = ConsumerSpec::new("S", "c")
            .with_filter_subject("s.a")
            .with_ack_wait(Duration::from_secs(3))
            .with_max_deliver(7);
        let config = spec.consumer_config();
        assert_eq!(config.durable_name.as_deref(), Some("c"));
        assert_eq!(config.ack_policy, AckPolicy::Explicit);
        assert_eq!(config.ack_wait, Duration::from_secs(3));
        assert_eq!(config.max_deliver, 7);
        assert_eq!(config.filter_subject, "s.a");
    }
}
