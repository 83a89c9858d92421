//! Where the cluster is and how the producer and consumer behave.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;

use crate::error::{KafkaError, Result};

/// The brokers a local test run uses (`scripts/kafka.sh` starts one there).
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";

/// librdkafka's default maximum message size (`message.max.bytes`).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_000_000;

/// How to reach a Kafka cluster, shared by [`KafkaTransport`](crate::KafkaTransport)
/// and [`KafkaSource`](crate::KafkaSource).
///
/// The producer is always idempotent with `acks=all`; the settings here are
/// the ones an operator tunes. Any other librdkafka property can be set with
/// [`with_property`](Self::with_property) (applied last, so it wins).
///
/// ```
/// use std::time::Duration;
/// use vextrus_kafka::KafkaConfig;
///
/// let config = KafkaConfig::new("broker-1:9092,broker-2:9092")
///     .with_client_id("billing")
///     .with_delivery_timeout(Duration::from_secs(10))
///     .with_property("compression.type", "none");
/// assert_eq!(config.brokers(), "broker-1:9092,broker-2:9092");
/// assert!(config.validate().is_ok());
/// assert!(KafkaConfig::new("").validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    brokers: String,
    client_id: String,
    delivery_timeout: Duration,
    metadata_timeout: Duration,
    linger: Duration,
    max_message_bytes: usize,
    properties: BTreeMap<String, String>,
}

impl KafkaConfig {
    /// A configuration for the comma-separated `brokers` (`bootstrap.servers`)
    /// with the defaults: client id `vextrus`, delivery timeout 30 s,
    /// metadata timeout 10 s, linger 1 ms, maximum message 1,000,000 bytes.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            client_id: "vextrus".into(),
            delivery_timeout: Duration::from_secs(30),
            metadata_timeout: Duration::from_secs(10),
            linger: Duration::from_millis(1),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            properties: BTreeMap::new(),
        }
    }

    /// Sets the `client.id` the brokers log.
    pub fn with_client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = client_id.into();
        self
    }

    /// How long a publish may wait for the broker's confirmation, retries
    /// included (`message.timeout.ms`). After it the publish fails with
    /// [`KafkaError::Timeout`]. Also bounds ack and nack round trips.
    pub fn with_delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout;
        self
    }

    /// How long looking up a topic's metadata may take before the publish
    /// fails with [`KafkaError::Unavailable`].
    pub fn with_metadata_timeout(mut self, timeout: Duration) -> Self {
        self.metadata_timeout = timeout;
        self
    }

    /// How long the producer waits to fill a batch (`linger.ms`).
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// The largest message (key, payload and headers) the producer sends
    /// (`message.max.bytes`); larger ones fail with
    /// [`KafkaError::MessageTooLarge`] before any network call.
    pub fn with_max_message_bytes(mut self, max: usize) -> Self {
        self.max_message_bytes = max;
        self
    }

    /// Sets any librdkafka property, overriding this crate's choice.
    pub fn with_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(name.into(), value.into());
        self
    }

    /// The bootstrap brokers.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// The delivery timeout.
    pub fn delivery_timeout(&self) -> Duration {
        self.delivery_timeout
    }

    /// The metadata timeout.
    pub fn metadata_timeout(&self) -> Duration {
        self.metadata_timeout
    }

    /// The maximum message size in bytes.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// Checks the values before any client is built.
    pub fn validate(&self) -> Result<()> {
        if self.brokers.trim().is_empty() {
            return Err(KafkaError::InvalidConfig("no brokers given".into()));
        }
        if self.delivery_timeout.is_zero() || self.metadata_timeout.is_zero() {
            return Err(KafkaError::InvalidConfig(
                "timeouts must be greater than zero".into(),
            ));
        }
        if self.max_message_bytes < 1000 {
            return Err(KafkaError::InvalidConfig(format!(
                "max_message_bytes {} is below librdkafka's minimum of 1000",
                self.max_message_bytes
            )));
        }
        Ok(())
    }

    /// The producer's librdkafka configuration.
    pub(crate) fn producer_config(&self) -> ClientConfig {
        let mut config = self.common();
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("allow.auto.create.topics", "false")
            // Java's partitioner: the same key lands on the same partition
            // whether a Java or a Rust producer wrote it.
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", millis(self.delivery_timeout))
            .set("linger.ms", millis(self.linger))
            .set("message.max.bytes", self.max_message_bytes.to_string());
        self.apply_properties(&mut config);
        config
    }

    /// A consumer-group member's librdkafka configuration: offsets are
    /// committed by hand only.
    pub(crate) fn consumer_config(&self, group_id: &str) -> ClientConfig {
        let mut config = self.common();
        config
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("allow.auto.create.topics", "false");
        self.apply_properties(&mut config);
        config
    }

    fn common(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id)
            .set(
                "socket.timeout.ms",
                millis(self.metadata_timeout.max(Duration::from_millis(10))),
            );
        config
    }

    fn apply_properties(&self, config: &mut ClientConfig) {
        for (name, value) in &self.properties {
            config.set(name, value);
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self::new(DEFAULT_BROKERS)
    }
}

fn millis(duration: Duration) -> String {
    duration.as_millis().max(1).to_string()
}

/// Checks a topic name the way Kafka does: 1 to 249 characters from
/// `[A-Za-z0-9._-]`, and not `.` or `..`.
pub(crate) fn validate_topic(topic: &str) -> Result<()> {
    let invalid = |reason| {
        Err(KafkaError::InvalidTopic {
            topic: topic.to_owned(),
            reason,
        })
    };
    if topic.is_empty() {
        return invalid("empty");
    }
    if topic.len() > 249 {
        return invalid("longer than 249 characters");
    }
    if topic == "." || topic == ".." {
        return invalid("`.` and `..` are reserved");
    }
    if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return invalid("only ASCII letters, digits, `.`, `_` and `-` are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_producer_is_idempotent_with_acks_all_and_properties_win() {
        let config = KafkaConfig::new("b:1")
            .with_delivery_timeout(Duration::from_millis(1500))
            .with_property("linger.ms", "7");
        let producer = config.producer_config();
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        assert_eq!(producer.get("acks"), Some("all"));
        assert_eq!(producer.get("message.timeout.ms"), Some("1500"));
        assert_eq!(producer.get("linger.ms"), Some("7"));
        assert_eq!(producer.get("allow.auto.create.topics"), Some("false"));
        let consumer = config.consumer_config("g");
        assert_eq!(consumer.get("group.id"), Some("g"));
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"));
        assert_eq!(consumer.get("enable.auto.offset.store"), Some("false"));
    }

    #[test]
    fn bad_configurations_are_refused() {
        assert!(KafkaConfig::new(" ").validate().is_err());
        assert!(
            KafkaConfig::default()
                .with_delivery_timeout(Duration::ZERO)
                .validate()
                .is_err()
        );
        assert!(
            KafkaConfig::default()
                .with_max_message_bytes(10)
                .validate()
                .is_err()
        );
    }

    #[test]
    fn topic_names_follow_kafka_rules() {
        for ok in ["orders", "sales.order-placed_v1", "A"] {
            assert!(validate_topic(ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(250);
        for bad in ["", ".", "..", "a b", "orders/1", "ü", long.as_str()] {
            assert!(
                matches!(validate_topic(bad), Err(KafkaError::InvalidTopic { .. })),
                "{bad}"
            );
        }
    }
}
