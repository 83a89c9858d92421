//! Confirmed publishes through an idempotent, `acks=all` producer.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use uuid::Uuid;
use vextrus_core::transport::{OutboundMessage, Transport, TransportError};
use vextrus_kernel::HasErrorKind;

use crate::config::{KafkaConfig, validate_topic};
use crate::error::{Class, KafkaError, Result, classify};
use crate::headers::to_kafka_headers;
use crate::metrics as m;

/// One message to publish, borrowed from the caller (an outbox row).
///
/// The id travels as the `ce_id` header (the inbox's de-duplication key), the
/// partition key as the record key (so one key's messages share a partition
/// and keep their order), every header as a Kafka header.
#[derive(Debug, Clone, Copy)]
pub struct PublishRequest<'a> {
    /// The message id.
    pub id: Uuid,
    /// The topic.
    pub destination: &'a str,
    /// The record key (by default the aggregate id).
    pub partition_key: &'a str,
    /// The payload.
    pub payload: &'a [u8],
    /// The headers (CloudEvents binary mode and the tracing headers).
    pub headers: &'a BTreeMap<String, String>,
    /// When the message was created; becomes the record's timestamp (the
    /// producer's clock when `None`).
    pub created_at: Option<DateTime<Utc>>,
}

impl<'a> PublishRequest<'a> {
    /// A request to publish `payload` to `destination` keyed by
    /// `partition_key`.
    pub fn new(
        id: Uuid,
        destination: &'a str,
        partition_key: &'a str,
        payload: &'a [u8],
        headers: &'a BTreeMap<String, String>,
    ) -> Self {
        Self {
            id,
            destination,
            partition_key,
            payload,
            headers,
            created_at: None,
        }
    }

    /// Sets the record timestamp to the message's creation time.
    pub fn with_created_at(mut self, created_at: DateTime<Utc>) -> Self {
        self.created_at = Some(created_at);
        self
    }
}

/// Where the broker stored a confirmed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishReceipt {
    /// The partition.
    pub partition: i32,
    /// The offset within the partition.
    pub offset: i64,
}

/// Publishes outbox messages to Kafka and resolves each publish only after
/// the broker confirmed it (`acks=all`: every in-sync replica has it).
///
/// The producer is idempotent (`enable.idempotence=true`): librdkafka's own
/// retries after a lost response never write a second copy, and per-partition
/// order holds across those retries. A relay that crashes after the broker
/// stored a message but before the outbox marked it sent publishes it again
/// under the same id; the consumer's inbox absorbs that copy.
///
/// Topics are never auto-created: the first publish to a topic asks the
/// cluster for its metadata and a missing topic is
/// [`KafkaError::UnknownDestination`] at once, not after the delivery
/// timeout. Known topics are cached.
///
/// ```no_run
/// # async fn demo() -> Result<(), vextrus_kafka::KafkaError> {
/// use std::collections::BTreeMap;
/// use vextrus_kafka::{KafkaConfig, KafkaTransport, PublishRequest};
///
/// let transport = KafkaTransport::new(KafkaConfig::new("127.0.0.1:9092"))?;
/// let headers = BTreeMap::from([("ce_type".to_owned(), "sales.order_placed".to_owned())]);
/// let id = uuid::Uuid::now_v7();
/// let receipt = transport
///     .publish_confirmed(&PublishRequest::new(id, "orders", "order-42", b"{}", &headers))
///     .await?;
/// println!("stored at partition {} offset {}", receipt.partition, receipt.offset);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct KafkaTransport {
    producer: FutureProducer,
    config: KafkaConfig,
    known_topics: Arc<Mutex<HashSet<String>>>,
}

impl std::fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTransport")
            .field("brokers", &self.config.brokers())
            .finish_non_exhaustive()
    }
}

/// A message handed to the producer, waiting for its delivery report.
struct Pending<'a> {
    future: DeliveryFuture,
    sent: Sent<'a>,
}

/// What the delivery report of a [`Pending`] message is judged with.
struct Sent<'a> {
    topic: &'a str,
    size: usize,
    started: Instant,
}

impl KafkaTransport {
    /// Builds the producer. No network call happens here: brokers are
    /// contacted by the first publish.
    pub fn new(config: KafkaConfig) -> Result<Self> {
        config.validate()?;
        let producer: FutureProducer = config.producer_config().create().map_err(|err| {
            KafkaError::InvalidConfig(format!("cannot create the producer: {err}"))
        })?;
        Ok(Self {
            producer,
            config,
            known_topics: Arc::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// The underlying librdkafka producer.
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Publishes one message and waits for the broker's confirmation.
    pub async fn publish_confirmed(&self, request: &PublishRequest<'_>) -> Result<PublishReceipt> {
        self.ensure_topic(request.destination).await?;
        let pending = self.enqueue(request).await?;
        self.await_delivery(pending).await
    }

    /// Publishes many messages: all are handed to the producer first (so they
    /// travel in batches), then every confirmation is awaited. Results come
    /// back in the order of `requests`; messages with one partition key keep
    /// their order on the broker.
    pub async fn publish_pipelined(
        &self,
        requests: &[PublishRequest<'_>],
    ) -> Vec<Result<PublishReceipt>> {
        let mut checked: BTreeMap<&str, Option<KafkaError>> = BTreeMap::new();
        for request in requests {
            if !checked.contains_key(request.destination) {
                let outcome = self.ensure_topic(request.destination).await.err();
                checked.insert(request.destination, outcome);
            }
        }
        let mut sent = Vec::with_capacity(requests.len());
        let mut results: Vec<Option<Result<PublishReceipt>>> = Vec::with_capacity(requests.len());
        let mut waiting = FuturesUnordered::new();
        for (i, request) in requests.iter().enumerate() {
            let outcome = match checked.get(request.destination).and_then(Option::as_ref) {
                Some(err) => Err(copy_error(err)),
                None => self.enqueue(request).await,
            };
            match outcome {
                Ok(pending) => {
                    waiting.push(pending.future.map(move |report| (i, report)));
                    sent.push(Some(pending.sent));
                    results.push(None);
                }
                Err(err) => {
                    sent.push(None);
                    results.push(Some(Err(err)));
                }
            }
        }
        // One deadline for the whole batch rather than a timer per message.
        let deadline = tokio::time::sleep(self.report_deadline());
        tokio::pin!(deadline);
        let mut delivered = Deliveries::default();
        loop {
            tokio::select! {
                next = waiting.next() => match next {
                    Some((i, report)) => {
                        if let Some(meta) = &sent[i] {
                            results[i] = Some(self.judge(meta, Ok(report), &mut delivered));
                        }
                    }
                    None => break,
                },
                () = &mut deadline => break,
            }
        }
        let outcomes = results
            .into_iter()
            .zip(&sent)
            .map(|(result, meta)| match (result, meta) {
                (Some(result), _) => result,
                (None, Some(meta)) => self.judge(meta, Err(()), &mut delivered),
                (None, None) => Err(KafkaError::Timeout(self.config.delivery_timeout())),
            })
            .collect();
        delivered.record();
        outcomes
    }

    /// Waits until every message handed to the producer has a delivery
    /// report, or `timeout` passes.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|err| KafkaError::Unavailable {
                reason: format!("flush task failed: {err}"),
                source: None,
            })?
            .map_err(|err| KafkaError::from_publish(err, "*", 0, 0, timeout))
    }

    /// Checks that `topic` exists (once; then cached).
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        validate_topic(topic)?;
        if self.known(topic) {
            return Ok(());
        }
        let producer = self.producer.clone();
        let timeout = self.config.metadata_timeout();
        let name = topic.to_owned();
        let metadata = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(Some(&name), timeout)
        })
        .await
        .map_err(|err| KafkaError::Unavailable {
            reason: format!("metadata task failed: {err}"),
            source: None,
        })?
        .map_err(|err| KafkaError::Unavailable {
            reason: format!("cannot read metadata of topic `{topic}`: {err}"),
            source: Some(Box::new(err)),
        })?;
        let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Err(KafkaError::UnknownDestination(topic.to_owned()));
        };
        if let Some(err) = found.error() {
            let code = RDKafkaErrorCode::from(err);
            return Err(match classify(code) {
                Class::UnknownTopic => KafkaError::UnknownDestination(topic.to_owned()),
                Class::Timeout | Class::Unavailable => KafkaError::Unavailable {
                    reason: format!("topic `{topic}` is not available: {code}"),
                    source: None,
                },
                Class::TooLarge | Class::Rejected => KafkaError::Rejected {
                    reason: format!("metadata of topic `{topic}`: {code}"),
                    source: None,
                },
            });
        }
        if found.partitions().is_empty() {
            return Err(KafkaError::UnknownDestination(topic.to_owned()));
        }
        self.known_topics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(topic.to_owned());
        Ok(())
    }

    fn known(&self, topic: &str) -> bool {
        self.known_topics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(topic)
    }

    fn forget(&self, topic: &str) {
        self.known_topics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(topic);
    }

    /// Hands one message to the producer (waiting while its queue is full,
    /// up to the delivery timeout).
    async fn enqueue<'a>(&self, request: &PublishRequest<'a>) -> Result<Pending<'a>> {
        let outcome = self.try_enqueue(request).await;
        if let Err(err) = &outcome {
            metrics::counter!(m::PUBLISH_FAILURES_TOTAL, "kind" => err.kind().as_str())
                .increment(1);
        }
        outcome
    }

    async fn try_enqueue<'a>(&self, request: &PublishRequest<'a>) -> Result<Pending<'a>> {
        validate_topic(request.destination)?;
        let (headers, header_size) = to_kafka_headers(&request.id, request.headers)?;
        let size = request.payload.len() + request.partition_key.len() + header_size;
        let max = self.config.max_message_bytes();
        if size > max {
            return Err(KafkaError::MessageTooLarge { size, max });
        }
        let mut record = FutureRecord::to(request.destination)
            .key(request.partition_key)
            .payload(request.payload)
            .headers(headers);
        if let Some(created_at) = request.created_at {
            record = record.timestamp(created_at.timestamp_millis());
        }
        let timeout = self.config.delivery_timeout();
        let deadline = Instant::now() + timeout;
        let started = Instant::now();
        loop {
            match self.producer.send_result(record) {
                Ok(future) => {
                    return Ok(Pending {
                        future,
                        sent: Sent {
                            topic: request.destination,
                            size,
                            started,
                        },
                    });
                }
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    if Instant::now() >= deadline {
                        return Err(KafkaError::Timeout(timeout));
                    }
                    record = back;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((err, _)) => {
                    return Err(KafkaError::from_publish(
                        err,
                        request.destination,
                        size,
                        max,
                        timeout,
                    ));
                }
            }
        }
    }

    /// How long a delivery report may take: librdkafka reports every
    /// message within `message.timeout.ms`; the margin only guards against
    /// a report that never comes.
    fn report_deadline(&self) -> Duration {
        self.config.delivery_timeout() + Duration::from_secs(5)
    }

    async fn await_delivery(&self, pending: Pending<'_>) -> Result<PublishReceipt> {
        let report = tokio::time::timeout(self.report_deadline(), pending.future)
            .await
            .map_err(|_| ());
        let mut delivered = Deliveries::default();
        let outcome = self.judge(&pending.sent, report, &mut delivered);
        delivered.record();
        outcome
    }

    /// The outcome of one message from its delivery report (`Err(())`: none
    /// came in time); successes are tallied in `delivered`, failures counted
    /// at once.
    fn judge(
        &self,
        sent: &Sent<'_>,
        report: std::result::Result<
            std::result::Result<OwnedDeliveryResult, futures::channel::oneshot::Canceled>,
            (),
        >,
        delivered: &mut Deliveries,
    ) -> Result<PublishReceipt> {
        let timeout = self.config.delivery_timeout();
        let outcome = match report {
            Err(()) => Err(KafkaError::Timeout(timeout)),
            Ok(Err(_canceled)) => Err(KafkaError::Unavailable {
                reason: "the producer was dropped before the delivery report".into(),
                source: None,
            }),
            Ok(Ok(Ok(delivery))) => Ok(PublishReceipt {
                partition: delivery.partition,
                offset: delivery.offset,
            }),
            Ok(Ok(Err((err, _message)))) => {
                let err = KafkaError::from_publish(
                    err,
                    sent.topic,
                    sent.size,
                    self.config.max_message_bytes(),
                    timeout,
                );
                if matches!(err, KafkaError::UnknownDestination(_)) {
                    self.forget(sent.topic);
                }
                Err(err)
            }
        };
        match &outcome {
            Ok(_) => delivered.push(sent.started.elapsed()),
            Err(err) => {
                metrics::counter!(m::PUBLISH_FAILURES_TOTAL, "kind" => err.kind().as_str())
                    .increment(1);
            }
        }
        outcome
    }
}

/// Confirmed publishes of one call, recorded in the metrics at once (one
/// counter update per batch, not per message).
#[derive(Default)]
struct Deliveries {
    latencies: Vec<f64>,
}

impl Deliveries {
    fn push(&mut self, latency: Duration) {
        self.latencies.push(latency.as_secs_f64());
    }

    fn record(self) {
        if self.latencies.is_empty() {
            return;
        }
        metrics::counter!(m::PUBLISHED_TOTAL).increment(self.latencies.len() as u64);
        let histogram = metrics::histogram!(m::PUBLISH_SECONDS);
        for latency in self.latencies {
            histogram.record(latency);
        }
    }
}

impl<'a> From<&'a OutboundMessage> for PublishRequest<'a> {
    fn from(message: &'a OutboundMessage) -> Self {
        PublishRequest::new(
            message.id.as_uuid(),
            &message.destination,
            &message.partition_key,
            &message.payload,
            &message.headers,
        )
        .with_created_at(message.created_at)
    }
}

/// The transport contract: a publish resolves after the broker's delivery
/// report; a batch is pipelined and keeps per-key order.
impl Transport for KafkaTransport {
    async fn publish(&self, message: &OutboundMessage) -> Result<(), TransportError> {
        self.publish_confirmed(&PublishRequest::from(message))
            .await
            .map(|_| ())
            .map_err(TransportError::from)
    }

    async fn publish_batch(&self, messages: &[OutboundMessage]) -> Vec<Result<(), TransportError>> {
        let requests: Vec<PublishRequest<'_>> = messages.iter().map(PublishRequest::from).collect();
        self.publish_pipelined(&requests)
            .await
            .into_iter()
            .map(|outcome| outcome.map(|_| ()).map_err(TransportError::from))
            .collect()
    }
}

/// The same error again, for every message of a batch whose topic failed
/// its check (the boxed cause is not cloneable and is dropped).
fn copy_error(err: &KafkaError) -> KafkaError {
    match err {
        KafkaError::Unavailable { reason, .. } => KafkaError::Unavailable {
            reason: reason.clone(),
            source: None,
        },
        KafkaError::Timeout(d) => KafkaError::Timeout(*d),
        KafkaError::UnknownDestination(t) => KafkaError::UnknownDestination(t.clone()),
        KafkaError::InvalidTopic { topic, reason } => KafkaError::InvalidTopic {
            topic: topic.clone(),
            reason,
        },
        KafkaError::MessageTooLarge { size, max } => KafkaError::MessageTooLarge {
            size: *size,
            max: *max,
        },
        KafkaError::InvalidHeaders(s) => KafkaError::InvalidHeaders(s.clone()),
        KafkaError::InvalidConfig(s) => KafkaError::InvalidConfig(s.clone()),
        KafkaError::Rejected { reason, .. } => KafkaError::Rejected {
            reason: reason.clone(),
            source: None,
        },
        // Not raised by a topic check; kept as a refusal with the message.
        other => KafkaError::Rejected {
            reason: other.to_string(),
            source: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copied_errors_keep_their_kind() {
        let errors = [
            KafkaError::Unavailable {
                reason: "x".into(),
                source: None,
            },
            KafkaError::Timeout(Duration::from_secs(1)),
            KafkaError::UnknownDestination("t".into()),
            KafkaError::InvalidTopic {
                topic: "a b".into(),
                reason: "space",
            },
            KafkaError::Rejected {
                reason: "no".into(),
                source: None,
            },
        ];
        for err in errors {
            assert_eq!(copy_error(&err).kind(), err.kind(), "{err}");
            assert_eq!(copy_error(&err).to_string(), err.to_string());
        }
    }

    #[tokio::test]
    async fn oversized_and_badly_addressed_messages_fail_before_any_network_call() {
        // Nothing listens on port 1: these must fail without trying.
        let transport =
            KafkaTransport::new(KafkaConfig::new("127.0.0.1:1").with_max_message_bytes(1000))
                .unwrap();
        let headers = BTreeMap::new();
        let big = vec![0u8; 2000];
        let request = PublishRequest::new(Uuid::now_v7(), "t", "k", &big, &headers);
        match transport.try_enqueue(&request).await {
            Err(KafkaError::MessageTooLarge { size, max: 1000 }) => assert!(size > 2000),
            other => panic!("expected MessageTooLarge, got {:?}", other.map(|_| ())),
        }
        let request = PublishRequest::new(Uuid::now_v7(), "not a topic", "k", b"x", &headers);
        assert!(matches!(
            transport.publish_confirmed(&request).await,
            Err(KafkaError::InvalidTopic { .. })
        ));
    }
}
