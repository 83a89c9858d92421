//! A consumer-group member that yields deliveries for the inbox and commits
//! offsets only when the consumer acks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Header, Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use vextrus_core::transport::{
    InboundMessage, MessageDelivery, MessageId, MessageSource, TransportError,
};

use crate::config::{KafkaConfig, validate_topic};
use crate::error::{KafkaError, Result};
use crate::headers::{
    DEAD_LETTER_OFFSET, DEAD_LETTER_PARTITION, DEAD_LETTER_REASON, DEAD_LETTER_TOPIC,
    from_kafka_headers, raw_copy,
};
use crate::metrics as m;
use crate::tracker::Tracker;

/// Which consumer group reads which topics, and where malformed records go.
///
/// ```
/// use vextrus_kafka::ConsumerSpec;
///
/// let spec = ConsumerSpec::new("billing", ["orders", "payments"])
///     .with_dead_letter_topic("billing.dead-letters");
/// assert_eq!(spec.group_id(), "billing");
/// assert_eq!(spec.topics(), ["orders", "payments"]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    group_id: String,
    topics: Vec<String>,
    dead_letter_topic: Option<String>,
}

impl ConsumerSpec {
    /// Members of consumer group `group_id` reading `topics`.
    pub fn new<I, S>(group_id: impl Into<String>, topics: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            group_id: group_id.into(),
            topics: topics.into_iter().map(Into::into).collect(),
            dead_letter_topic: None,
        }
    }

    /// Copies malformed records to `topic` (with the reason and their origin
    /// as headers) before releasing them.
    pub fn with_dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    /// The consumer group.
    pub fn group_id(&self) -> &str {
        &self.group_id
    }

    /// The topics read.
    pub fn topics(&self) -> &[String] {
        &self.topics
    }

    /// The dead-letter topic, if any.
    pub fn dead_letter_topic(&self) -> Option<&str> {
        self.dead_letter_topic.as_deref()
    }

    fn validate(&self) -> Result<()> {
        if self.group_id.trim().is_empty() {
            return Err(KafkaError::InvalidConfig("empty consumer group id".into()));
        }
        if self.topics.is_empty() {
            return Err(KafkaError::InvalidConfig("no topics to consume".into()));
        }
        for topic in self.topics.iter().chain(&self.dead_letter_topic) {
            validate_topic(topic)?;
        }
        Ok(())
    }
}

/// The consumer's librdkafka context: forgets the bookkeeping of partitions
/// the group takes away, so their offsets are not held back or committed by
/// this member.
struct SourceContext {
    tracker: Arc<Mutex<Tracker>>,
}

impl ClientContext for SourceContext {}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            let mut tracker = self.tracker.lock().unwrap_or_else(PoisonError::into_inner);
            for element in partitions.elements() {
                tracker.revoked(element.topic(), element.partition());
            }
        }
    }
}

type GroupConsumer = StreamConsumer<SourceContext>;

struct Shared {
    consumer: GroupConsumer,
    tracker: Arc<Mutex<Tracker>>,
    timeout: Duration,
}

/// One delivery of a record, with the handle to acknowledge it.
///
/// [`ack`](Self::ack) only after the consumer's transaction committed (the
/// handler's writes and the inbox row): it commits the partition's offset
/// past this record, and past every earlier record once those are acked too.
/// [`nack`](Self::nack) asks for the record again after a delay; because
/// Kafka keeps order per partition, the partition is paused and re-read from
/// this record, so later records of the same keys wait behind it.
/// A delivery dropped without either is taken back the same way (at once):
/// the record comes again from this consumer.
pub struct Delivery {
    message: InboundMessage,
    partition: i32,
    offset: i64,
    shared: Arc<Shared>,
    settled: bool,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.message.id)
            .field("topic", &self.message.source)
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .field("partition_key", &self.message.partition_key)
            .field("delivery_attempt", &self.message.delivery_attempt)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// The message: id (from `ce_id`), source (the topic), partition key (the
    /// record key), payload, every header, and which delivery of the record
    /// this is in this process (1 for the first; the inbox keeps the durable
    /// count).
    pub fn message(&self) -> &InboundMessage {
        &self.message
    }

    /// The partition the record came from.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// The record's offset within its partition.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// Marks the record done and commits the partition's new position
    /// (synchronously: when this returns `Ok`, the group coordinator has it).
    pub async fn ack(mut self) -> Result<()> {
        self.settled = true;
        release(
            &self.shared,
            &self.message.source,
            self.partition,
            self.offset,
        )
        .await
    }

    /// Releases the record without handling it (after the inbox dead-lettered
    /// it): the same as [`ack`](Self::ack) on Kafka.
    pub async fn term(self) -> Result<()> {
        self.ack().await
    }

    /// Asks for the record again after `delay`: the partition is paused,
    /// rewound to this record and resumed after the delay.
    pub async fn nack(mut self, delay: Duration) -> Result<()> {
        self.settled = true;
        let shared = Arc::clone(&self.shared);
        let (topic, partition, offset) = (self.message.source.clone(), self.partition, self.offset);
        shared
            .tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .nacked(&topic, partition, offset);
        let mut list = TopicPartitionList::new();
        list.add_partition(&topic, partition);
        let pause = !delay.is_zero();
        let worker = Arc::clone(&shared);
        let paused = list.clone();
        tokio::task::spawn_blocking(move || {
            if pause {
                worker
                    .consumer
                    .pause(&paused)
                    .map_err(|err| KafkaError::commit("pausing for a nack failed", err))?;
            }
            worker
                .consumer
                .seek(&topic, partition, Offset::Offset(offset), worker.timeout)
                .map_err(|err| KafkaError::commit("seeking back for a nack failed", err))
        })
        .await
        .map_err(|err| KafkaError::Commit {
            reason: format!("nack task failed: {err}"),
            source: None,
        })??;
        if pause {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Err(err) = shared.consumer.resume(&list) {
                    tracing::warn!(error = %err, "resuming a partition after a nack failed");
                }
            });
        }
        Ok(())
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let topic = &self.message.source;
        self.shared
            .tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .nacked(topic, self.partition, self.offset);
        // A zero timeout makes the seek asynchronous: no blocking in drop.
        if let Err(err) = self.shared.consumer.seek(
            topic,
            self.partition,
            Offset::Offset(self.offset),
            Duration::ZERO,
        ) {
            tracing::warn!(error = %err, topic = %topic, partition = self.partition, offset = self.offset,
                "rewinding after an unsettled delivery failed; the record comes again after a restart or rebalance");
        }
    }
}

impl MessageDelivery for Delivery {
    fn message(&self) -> &InboundMessage {
        &self.message
    }

    async fn ack(self) -> Result<(), TransportError> {
        Delivery::ack(self).await.map_err(TransportError::from)
    }

    async fn nack(self, delay: Duration) -> Result<(), TransportError> {
        Delivery::nack(self, delay)
            .await
            .map_err(TransportError::from)
    }
}

/// Commits past `offset` when the partition's position moves.
async fn release(shared: &Arc<Shared>, topic: &str, partition: i32, offset: i64) -> Result<()> {
    let position = shared
        .tracker
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .acked(topic, partition, offset);
    let Some(position) = position else {
        return Ok(());
    };
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, partition, Offset::Offset(position))
        .map_err(|err| KafkaError::commit("building the commit", err))?;
    let worker = Arc::clone(shared);
    let outcome =
        tokio::task::spawn_blocking(move || worker.consumer.commit(&list, CommitMode::Sync))
            .await
            .map_err(|err| KafkaError::Commit {
                reason: format!("commit task failed: {err}"),
                source: None,
            })?;
    match outcome {
        Ok(()) => {
            shared
                .tracker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .committed(topic, partition, position);
            Ok(())
        }
        Err(err) => {
            metrics::counter!(m::COMMIT_FAILURES_TOTAL).increment(1);
            Err(KafkaError::commit(
                format!("committing {topic}[{partition}]@{position}"),
                err,
            ))
        }
    }
}

/// A consumer-group member (manual offset commits) that yields
/// [`Delivery`]s for the inbox.
///
/// Offsets are committed only by [`Delivery::ack`], so a record is never
/// skipped because the process died between receiving it and committing the
/// consumer's transaction: it comes again, and the inbox makes the second
/// delivery harmless. A record whose headers are malformed (no `ce_id`, an
/// id that is not a UUID, a value that is not UTF-8, a key that is not
/// UTF-8) is never handed to a handler and never silently dropped: it is
/// copied to the dead-letter topic (if set), released, logged, counted
/// ([`malformed_count`](Self::malformed_count)), and [`next`](Self::next)
/// returns [`KafkaError::MalformedMessage`] for it; the following call goes
/// on with the next record.
///
/// ```no_run
/// # async fn demo() -> Result<(), vextrus_kafka::KafkaError> {
/// use vextrus_kafka::{ConsumerSpec, KafkaConfig, KafkaSource};
///
/// let mut source = KafkaSource::connect(
///     KafkaConfig::new("127.0.0.1:9092"),
///     ConsumerSpec::new("billing", ["orders"]),
/// )?;
/// let delivery = source.next().await?;
/// // ... run the handler and commit its transaction with the inbox row, then:
/// delivery.ack().await?;
/// # Ok(()) }
/// ```
pub struct KafkaSource {
    shared: Arc<Shared>,
    spec: ConsumerSpec,
    dead_letters: Option<FutureProducer>,
    malformed: AtomicU64,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("spec", &self.spec)
            .field("malformed", &self.malformed_count())
            .finish_non_exhaustive()
    }
}

impl KafkaSource {
    /// Joins the consumer group and subscribes to the spec's topics. The
    /// group's partitions are assigned by the first [`next`](Self::next)
    /// calls; a group with no committed offset starts at the earliest record.
    pub fn connect(config: KafkaConfig, spec: ConsumerSpec) -> Result<Self> {
        config.validate()?;
        spec.validate()?;
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let context = SourceContext {
            tracker: Arc::clone(&tracker),
        };
        let consumer: GroupConsumer = config
            .consumer_config(&spec.group_id)
            .create_with_context(context)
            .map_err(|err| {
                KafkaError::InvalidConfig(format!("cannot create the consumer: {err}"))
            })?;
        let topics: Vec<&str> = spec.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|err| KafkaError::consumer("subscribing failed", err))?;
        let dead_letters = match &spec.dead_letter_topic {
            Some(_) => Some(config.producer_config().create().map_err(|err| {
                KafkaError::InvalidConfig(format!("cannot create the dead-letter producer: {err}"))
            })?),
            None => None,
        };
        Ok(Self {
            shared: Arc::new(Shared {
                consumer,
                tracker,
                timeout: config.delivery_timeout(),
            }),
            spec,
            dead_letters,
            malformed: AtomicU64::new(0),
        })
    }

    /// The spec this source was built from.
    pub fn spec(&self) -> &ConsumerSpec {
        &self.spec
    }

    /// How many malformed records this source has released.
    pub fn malformed_count(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }

    /// Waits for the next record. A receive failure (a broker that went
    /// away, a rebalance error) is a transient [`KafkaError::Consumer`]; call
    /// again to go on.
    pub async fn next(&mut self) -> Result<Delivery> {
        let message = self
            .shared
            .consumer
            .recv()
            .await
            .map_err(|err| KafkaError::consumer("receiving failed", err))?
            .detach();
        self.accept(message).await
    }

    async fn accept(&self, message: OwnedMessage) -> Result<Delivery> {
        let topic = message.topic().to_owned();
        let (partition, offset) = (message.partition(), message.offset());
        let delivery_attempt = self
            .shared
            .tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .delivered(&topic, partition, offset);
        let decoded = from_kafka_headers(message.headers()).and_then(|decoded| {
            let key = match message.key() {
                None => None,
                Some(key) => Some(
                    std::str::from_utf8(key)
                        .map_err(|err| {
                            KafkaError::InvalidHeaders(format!("record key is not UTF-8: {err}"))
                        })?
                        .to_owned(),
                ),
            };
            Ok((decoded, key))
        });
        match decoded {
            Ok((decoded, partition_key)) => {
                let inbound = InboundMessage {
                    id: MessageId(decoded.id),
                    source: topic,
                    partition_key,
                    payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    headers: decoded.headers,
                    delivery_attempt,
                };
                if let Err(err) = inbound.validate_headers() {
                    return self.reject(&message, err.to_string()).await;
                }
                metrics::counter!(m::DELIVERED_TOTAL).increment(1);
                Ok(Delivery {
                    message: inbound,
                    partition,
                    offset,
                    shared: Arc::clone(&self.shared),
                    settled: false,
                })
            }
            Err(err) => self.reject(&message, err.to_string()).await,
        }
    }

    /// Dead-letters (when configured) and releases a malformed record.
    async fn reject(&self, message: &OwnedMessage, reason: String) -> Result<Delivery> {
        let topic = message.topic().to_owned();
        let (partition, offset) = (message.partition(), message.offset());
        if let (Some(producer), Some(dlq)) = (&self.dead_letters, &self.spec.dead_letter_topic)
            && let Err(err) = self.dead_letter(producer, dlq, message, &reason).await
        {
            // Not copied: rewind so it comes again rather than lose it.
            self.shared
                .tracker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .nacked(&topic, partition, offset);
            let worker = Arc::clone(&self.shared);
            let seek_topic = topic.clone();
            let _ = tokio::task::spawn_blocking(move || {
                worker.consumer.seek(
                    &seek_topic,
                    partition,
                    Offset::Offset(offset),
                    worker.timeout,
                )
            })
            .await;
            return Err(err);
        }
        release(&self.shared, &topic, partition, offset).await?;
        self.malformed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::MALFORMED_TOTAL).increment(1);
        tracing::error!(
            topic = %topic,
            partition,
            offset,
            group = %self.spec.group_id,
            reason = %reason,
            "malformed record released"
        );
        Err(KafkaError::MalformedMessage {
            topic,
            partition,
            offset,
            reason,
        })
    }

    async fn dead_letter(
        &self,
        producer: &FutureProducer,
        dlq: &str,
        message: &OwnedMessage,
        reason: &str,
    ) -> Result<()> {
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let headers = raw_copy(message.headers())
            .insert(Header {
                key: DEAD_LETTER_REASON,
                value: Some(reason),
            })
            .insert(Header {
                key: DEAD_LETTER_TOPIC,
                value: Some(message.topic()),
            })
            .insert(Header {
                key: DEAD_LETTER_PARTITION,
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: DEAD_LETTER_OFFSET,
                value: Some(offset.as_str()),
            });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(dlq).headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        let size = message.payload().map_or(0, <[u8]>::len) + message.key().map_or(0, <[u8]>::len);
        producer
            .send(record, self.shared.timeout)
            .await
            .map(|_| ())
            .map_err(|(err, _)| KafkaError::from_publish(err, dlq, size, 0, self.shared.timeout))
    }
}

impl MessageSource for KafkaSource {
    type Delivery = Delivery;

    /// Waits for the next record. A Kafka consumer never closes on its own,
    /// so this never returns `Ok(None)`. A malformed record is
    /// [`TransportError::InvalidHeaders`] (already dead-lettered and
    /// released); a receive failure is [`TransportError::Unavailable`].
    async fn next(&mut self) -> Result<Option<Delivery>, TransportError> {
        KafkaSource::next(self)
            .await
            .map(Some)
            .map_err(TransportError::from)
    }
}
