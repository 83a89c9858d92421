//! [`JetStreamTransport`]: confirmed publishes into JetStream streams.

use std::collections::BTreeMap;
use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{
    self,
    context::{PublishAckFuture, PublishErrorKind},
    message::PublishMessage,
    stream::{Config as StreamConfig, StorageType},
};
use bytes::Bytes;
use futures::future::join_all;
use uuid::Uuid;
use vextrus_core::transport::{OutboundMessage, Transport, TransportError};

use crate::config::{JetStreamConfig, StreamSpec, StreamStorage, validate_subject};
use crate::error::{NatsError, Result};
use crate::headers::{to_nats_headers, wire_size};
use crate::metrics as m;

/// One message to publish: what the transport needs from an outbox row.
///
/// ```
/// use std::collections::BTreeMap;
/// use vextrus_nats::PublishRequest;
///
/// let headers = BTreeMap::from([("ce_type".to_owned(), "OrderPlaced".to_owned())]);
/// let request = PublishRequest::new(uuid::Uuid::now_v7(), "orders.placed", b"{}", &headers)
///     .with_partition_key("order-42");
/// assert_eq!(request.destination, "orders.placed");
/// assert_eq!(request.partition_key, Some("order-42"));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct PublishRequest<'a> {
    /// The message id; it travels as `Nats-Msg-Id` and is the de-duplication
    /// key downstream.
    pub id: Uuid,
    /// The destination, turned into the subject by
    /// [`JetStreamConfig::subject_for`].
    pub destination: &'a str,
    /// The partition key; it travels in the `Vextrus-Partition-Key`
    /// envelope header.
    pub partition_key: Option<&'a str>,
    /// The payload, sent as is.
    pub payload: &'a [u8],
    /// Every header of the message, sent as NATS headers.
    pub headers: &'a BTreeMap<String, String>,
}

impl<'a> PublishRequest<'a> {
    /// Bundles a message's parts.
    pub fn new(
        id: Uuid,
        destination: &'a str,
        payload: &'a [u8],
        headers: &'a BTreeMap<String, String>,
    ) -> Self {
        PublishRequest {
            id,
            destination,
            partition_key: None,
            payload,
            headers,
        }
    }

    /// Sets the partition key.
    pub fn with_partition_key(mut self, key: &'a str) -> Self {
        self.partition_key = Some(key);
        self
    }

    /// The request for an outbox message.
    pub fn from_outbound(message: &'a OutboundMessage) -> Self {
        PublishRequest {
            id: message.id.0,
            destination: &message.destination,
            partition_key: Some(&message.partition_key),
            payload: &message.payload,
            headers: &message.headers,
        }
    }
}

/// The server's confirmation of a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishReceipt {
    /// The stream that stored the message.
    pub stream: String,
    /// Its sequence in that stream (for a duplicate: the original's).
    pub sequence: u64,
    /// Whether the server recognised the id within the duplicate window and
    /// kept the earlier copy; a duplicate still counts as confirmed.
    pub duplicate: bool,
}

/// Publishes messages into JetStream and resolves each publish only after the
/// server's `PublishAck`.
///
/// Every message carries `Nats-Msg-Id` = its id and all of its headers
/// (CloudEvents binary mode). A publish the server answers as a duplicate
/// (same id within the stream's duplicate window) is confirmed, not an error.
/// Cloning is cheap: clones share one connection.
///
/// Errors are typed ([`NatsError`]): a subject no stream stores is
/// [`UnknownDestination`](NatsError::UnknownDestination), a message over the
/// server's `max_payload` is [`MessageTooLarge`](NatsError::MessageTooLarge)
/// (checked before sending), a lost connection or missing ack is
/// [`Unavailable`](NatsError::Unavailable) or [`Timeout`](NatsError::Timeout)
/// (transient: publish again with the same id).
///
/// ```no_run
/// # async fn demo() -> Result<(), vextrus_nats::NatsError> {
/// use std::collections::BTreeMap;
/// use vextrus_nats::{JetStreamConfig, JetStreamTransport, PublishRequest, StreamSpec};
///
/// let transport = JetStreamTransport::connect(
///     JetStreamConfig::new("nats://127.0.0.1:4222")
///         .with_stream(StreamSpec::new("ORDERS", ["orders.>"])),
/// )
/// .await?;
/// let headers = BTreeMap::from([("ce_type".to_owned(), "OrderPlaced".to_owned())]);
/// let receipt = transport
///     .publish_confirmed(&PublishRequest::new(uuid::Uuid::now_v7(), "orders.placed", b"{}", &headers))
///     .await?;
/// assert!(!receipt.duplicate);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct JetStreamTransport {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    context: jetstream::Context,
    config: JetStreamConfig,
    /// Unconfirmed publishes in flight, across every caller. A pipelined
    /// chunk takes all its permits at once: callers holding part of the
    /// context's own ack permits while waiting for more could deadlock each
    /// other.
    inflight: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for JetStreamTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamTransport")
            .field("url", &self.inner.config.url)
            .field("streams", &self.inner.config.streams)
            .finish_non_exhaustive()
    }
}

/// Connects a NATS client with the settings of `config`: a bounded first
/// connect (a closed port fails fast), then endless reconnects backing off up
/// to `max_reconnect_delay`.
pub(crate) async fn connect_client(config: &JetStreamConfig) -> Result<async_nats::Client> {
    let max_delay = config.max_reconnect_delay;
    let mut options = async_nats::ConnectOptions::new()
        .connection_timeout(config.connect_timeout)
        .request_timeout(Some(config.publish_timeout))
        .reconnect_delay_callback(move |attempts| {
            let exp = u32::try_from(attempts.min(16)).unwrap_or(16);
            Duration::from_millis(10)
                .saturating_mul(2u32.saturating_pow(exp))
                .min(max_delay)
        });
    if let Some(name) = &config.name {
        options = options.name(name);
    }
    async_nats::connect_with_options(config.url.as_str(), options)
        .await
        .map_err(|err| NatsError::unavailable(format!("cannot connect to {}", config.url), err))
}

/// A JetStream context whose publishes wait (rather than fail) when
/// `max_ack_inflight` acks are outstanding.
pub(crate) fn context_for(
    client: async_nats::Client,
    config: &JetStreamConfig,
) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(config.publish_timeout)
        .max_ack_inflight(config.max_ack_inflight)
        .backpressure_on_inflight(true)
        .build(client)
}

impl JetStreamTransport {
    /// Connects to the server and ensures (creates or updates) or checks the
    /// declared streams, as
    /// [`JetStreamConfig::with_ensure_streams`] says.
    pub async fn connect(config: JetStreamConfig) -> Result<Self> {
        config.validate()?;
        let client = connect_client(&config).await?;
        let context = context_for(client.clone(), &config);
        let transport = JetStreamTransport {
            inner: Arc::new(Inner {
                client,
                context,
                inflight: Arc::new(tokio::sync::Semaphore::new(config.max_ack_inflight)),
                config,
            }),
        };
        transport.ensure_streams().await?;
        Ok(transport)
    }

    /// Creates or updates every declared stream (ensure mode), or checks that
    /// each exists, stores the declared subjects and has the declared
    /// duplicate window (check mode). Called by [`connect`](Self::connect).
    pub async fn ensure_streams(&self) -> Result<()> {
        for spec in &self.inner.config.streams {
            if self.inner.config.ensure_streams {
                self.inner
                    .context
                    .create_or_update_stream(stream_config(spec))
                    .await
                    .map_err(|err| {
                        let transient = matches!(
                            err.kind(),
                            jetstream::context::CreateStreamErrorKind::TimedOut
                                | jetstream::context::CreateStreamErrorKind::JetStreamUnavailable
                        );
                        NatsError::Stream {
                            stream: spec.name.clone(),
                            reason: "cannot create or update the stream".into(),
                            source: Some(err.into()),
                            transient,
                        }
                    })?;
            } else {
                let mut stream =
                    self.inner
                        .context
                        .get_stream(&spec.name)
                        .await
                        .map_err(|err| {
                            let transient = matches!(
                                err.kind(),
                                jetstream::context::GetStreamErrorKind::Request
                            );
                            NatsError::Stream {
                                stream: spec.name.clone(),
                                reason: "cannot read the stream".into(),
                                source: Some(err.into()),
                                transient,
                            }
                        })?;
                let info = stream.info().await.map_err(|err| NatsError::Stream {
                    stream: spec.name.clone(),
                    reason: "cannot read the stream's info".into(),
                    source: Some(err.into()),
                    transient: true,
                })?;
                check_stream(spec, &info.config)?;
            }
        }
        Ok(())
    }

    /// The configuration this transport was built from.
    pub fn config(&self) -> &JetStreamConfig {
        &self.inner.config
    }

    /// The underlying NATS client (for subscriptions, health checks).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// The underlying JetStream context (for stream administration).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.context
    }

    /// Whether the client is connected right now.
    pub fn is_connected(&self) -> bool {
        self.inner.client.connection_state() == State::Connected
    }

    /// Publishes one message and waits for the server's ack.
    pub async fn publish_confirmed(&self, request: &PublishRequest<'_>) -> Result<PublishReceipt> {
        let _permit = self.permits(1).await?;
        let start = std::time::Instant::now();
        let result = match self.send(request).await {
            Ok(ack) => self.await_ack(request, ack).await,
            Err(err) => Err(err),
        };
        record(&result, start);
        result
    }

    /// Publishes messages pipelined: sends up to `max_ack_inflight` publishes
    /// without waiting, then awaits their acks together, and so on. The
    /// result at index `i` is the outcome of `requests[i]`.
    ///
    /// Messages go out in order over one connection, so the server stores
    /// those it accepts in order. A failed message does not stop the others:
    /// a later message with the same partition key may be stored although an
    /// earlier one failed. The relay, which knows the keys, decides what to
    /// do with such a key (it holds the key's later messages back until the
    /// failed one is confirmed or dead-lettered).
    pub async fn publish_pipelined(
        &self,
        requests: &[PublishRequest<'_>],
    ) -> Vec<Result<PublishReceipt>> {
        let mut results = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(self.inner.config.max_ack_inflight) {
            let _permits = match self.permits(chunk.len()).await {
                Ok(permits) => permits,
                Err(err) => {
                    results.extend(chunk.iter().map(|_| {
                        Err(NatsError::Unavailable {
                            reason: err.to_string(),
                            source: None,
                        })
                    }));
                    continue;
                }
            };
            let start = std::time::Instant::now();
            let mut pending = Vec::with_capacity(chunk.len());
            for request in chunk {
                pending.push(self.send(request).await);
            }
            let acks = join_all(chunk.iter().zip(pending).map(|(request, sent)| async move {
                match sent {
                    Ok(ack) => self.await_ack(request, ack).await,
                    Err(err) => Err(err),
                }
            }))
            .await;
            for result in acks {
                record(&result, start);
                results.push(result);
            }
        }
        results
    }

    async fn permits(&self, n: usize) -> Result<tokio::sync::SemaphorePermit<'_>> {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.inner
            .inflight
            .acquire_many(n)
            .await
            .map_err(|err| NatsError::unavailable("the transport is closed", err))
    }

    /// Validates the message and hands it to the connection; the returned
    /// future resolves with the server's ack.
    async fn send(&self, request: &PublishRequest<'_>) -> Result<PublishAckFuture> {
        let config = &self.inner.config;
        let subject = config.subject_for(request.destination);
        validate_subject(&subject, false)?;
        let spec = if config.streams.is_empty() {
            None
        } else {
            Some(
                config
                    .stream_for_subject(&subject)
                    .ok_or_else(|| NatsError::UnknownDestination(subject.clone()))?,
            )
        };
        let headers = to_nats_headers(&request.id, request.partition_key, request.headers)?;
        let size = wire_size(&headers, request.payload.len());
        let server_max = self.inner.client.max_payload();
        if server_max > 0 && size > server_max {
            return Err(NatsError::MessageTooLarge {
                size,
                max: server_max,
            });
        }
        if let Some(stream_max) = spec
            .and_then(|s| s.max_message_size)
            .and_then(|m| usize::try_from(m).ok())
            && size > stream_max
        {
            return Err(NatsError::MessageTooLarge {
                size,
                max: stream_max,
            });
        }
        let state = self.inner.client.connection_state();
        if state != State::Connected {
            return Err(NatsError::Unavailable {
                reason: format!("not connected to {} ({state})", config.url),
                source: None,
            });
        }
        let publish = PublishMessage::build()
            .payload(Bytes::copy_from_slice(request.payload))
            .headers(headers);
        self.inner
            .context
            .send_publish(subject.clone(), publish)
            .await
            .map_err(|err| self.map_publish_error(&subject, size, err))
    }

    async fn await_ack(
        &self,
        request: &PublishRequest<'_>,
        ack: PublishAckFuture,
    ) -> Result<PublishReceipt> {
        let subject = self.inner.config.subject_for(request.destination);
        match ack.await {
            Ok(ack) => Ok(PublishReceipt {
                stream: ack.stream,
                sequence: ack.sequence,
                duplicate: ack.duplicate,
            }),
            Err(err) => Err(self.map_publish_error(&subject, request.payload.len(), err)),
        }
    }

    fn map_publish_error(
        &self,
        subject: &str,
        size: usize,
        err: jetstream::context::PublishError,
    ) -> NatsError {
        match err.kind() {
            PublishErrorKind::StreamNotFound => NatsError::UnknownDestination(subject.to_owned()),
            PublishErrorKind::TimedOut => NatsError::Timeout(self.inner.config.publish_timeout),
            PublishErrorKind::BrokenPipe | PublishErrorKind::MaxAckPending => {
                NatsError::unavailable("the connection dropped before the ack", err)
            }
            PublishErrorKind::MaxPayloadExceeded => NatsError::MessageTooLarge {
                size,
                max: self.inner.client.max_payload(),
            },
            PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => {
                NatsError::Rejected(err.to_string())
            }
            _ => match err
                .source()
                .and_then(|source| source.downcast_ref::<jetstream::Error>())
            {
                Some(api)
                    if api.error_code() == jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM =>
                {
                    NatsError::MessageTooLarge {
                        size,
                        max: self
                            .inner
                            .config
                            .stream_for_subject(subject)
                            .and_then(|s| s.max_message_size)
                            .and_then(|m| usize::try_from(m).ok())
                            .unwrap_or(0),
                    }
                }
                Some(api) => NatsError::Rejected(api.to_string()),
                None => NatsError::unavailable("publish failed", err),
            },
        }
    }
}

/// The [`Transport`] the outbox relay drives: `publish` resolves after the
/// server's ack; `publish_batch` pipelines (see
/// [`JetStreamTransport::publish_pipelined`]).
impl Transport for JetStreamTransport {
    async fn publish(&self, message: &OutboundMessage) -> Result<(), TransportError> {
        self.publish_confirmed(&PublishRequest::from_outbound(message))
            .await
            .map(|_| ())
            .map_err(TransportError::from)
    }

    async fn publish_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<(), TransportError>> {
        let requests: Vec<_> = messages.iter().map(PublishRequest::from_outbound).collect();
        self.publish_pipelined(&requests)
            .await
            .into_iter()
            .map(|result| result.map(|_| ()).map_err(TransportError::from))
            .collect()
    }
}

fn record(result: &Result<PublishReceipt>, start: std::time::Instant) {
    match result {
        Ok(receipt) => {
            metrics::histogram!(m::PUBLISH_SECONDS).record(start.elapsed().as_secs_f64());
            metrics::counter!(m::PUBLISHED_TOTAL).increment(1);
            if receipt.duplicate {
                metrics::counter!(m::DUPLICATES_TOTAL).increment(1);
            }
        }
        Err(err) => {
            use vextrus_kernel::HasErrorKind;
            metrics::counter!(m::PUBLISH_FAILURES_TOTAL, "kind" => err.kind().as_str())
                .increment(1);
        }
    }
}

fn stream_config(spec: &StreamSpec) -> StreamConfig {
    StreamConfig {
        name: spec.name.clone(),
        subjects: spec.subjects.clone(),
        duplicate_window: spec.duplicate_window,
        max_age: spec.max_age,
        storage: match spec.storage {
            StreamStorage::File => StorageType::File,
            StreamStorage::Memory => StorageType::Memory,
        },
        num_replicas: spec.replicas,
        max_message_size: spec.max_message_size.unwrap_or(-1),
        ..Default::default()
    }
}

fn check_stream(spec: &StreamSpec, actual: &StreamConfig) -> Result<()> {
    let mismatch = |reason: String| NatsError::Stream {
        stream: spec.name.clone(),
        reason,
        source: None,
        transient: false,
    };
    for subject in &spec.subjects {
        if !actual.subjects.contains(subject) {
            return Err(mismatch(format!(
                "stores {:?}, not the declared subject `{subject}`",
                actual.subjects
            )));
        }
    }
    if actual.duplicate_window != spec.duplicate_window {
        return Err(mismatch(format!(
            "has a duplicate window of {:?}, not the declared {:?}",
            actual.duplicate_window, spec.duplicate_window
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_config_carries_the_spec() {
        let spec = StreamSpec::new("S", ["s.>"])
            .with_duplicate_window(Duration::from_secs(30))
            .with_storage(StreamStorage::Memory)
            .with_max_message_size(1024);
        let config = stream_config(&spec);
        assert_eq!(config.name, "S");
        assert_eq!(config.subjects, vec!["s.>".to_owned()]);
        assert_eq!(config.duplicate_window, Duration::from_secs(30));
        assert_eq!(config.storage, StorageType::Memory);
        assert_eq!(config.max_message_size, 1024);
        assert!(check_stream(&spec, &config).is_ok());
    }

    #[test]
    fn check_mode_reports_a_drifted_stream() {
        let spec = StreamSpec::new("S", ["s.>"]);
        let mut actual = stream_config(&spec);
        actual.subjects = vec!["other.>".into()];
        assert!(matches!(
            check_stream(&spec, &actual),
            Err(NatsError::Stream { .. })
        ));
        let mut actual = stream_config(&spec);
        actual.duplicate_window = Duration::from_secs(1);
        assert!(matches!(
            check_stream(&spec, &actual),
            Err(NatsError::Stream { .. })
        ));
    }
}
