//! The Kafka transport for vextrus.
//!
//! - [`KafkaTransport`] publishes outbox messages through an idempotent
//!   producer with `acks=all` and resolves each publish only after the
//!   broker's delivery report. The partition key is the record key (so one
//!   key's messages share a partition and keep their order); every header of
//!   the message travels as a Kafka header, which is CloudEvents' binary
//!   content mode (`ce_id`, `ce_type`, `ce_source`, `ce_time`,
//!   `ce_specversion`, `content-type`) plus `correlation_id`,
//!   `causation_id`, `traceparent` and `tracestate`. `ce_id` always carries
//!   the message id, the inbox's de-duplication key. Batches are pipelined:
//!   all records are handed to the producer, then all reports awaited.
//! - [`KafkaSource`] is a consumer-group member with manual offset commits
//!   that yields [`Delivery`]s for the inbox: ack after the consumer's
//!   commit, nack with a delay to retry. Malformed records are copied to a
//!   dead-letter topic, released, logged and counted, never handed to a
//!   handler and never dropped silently.
//! - [`KafkaConfig`] names the brokers and tunes timeouts and sizes,
//!   [`ConsumerSpec`] the consumer group; [`create_topic`] makes a topic
//!   (the producer never auto-creates one).
//!
//! [`KafkaTransport`] implements [`vextrus_core::transport::Transport`] and
//! [`KafkaSource`] implements [`vextrus_core::transport::MessageSource`], so
//! the core's `OutboxRelay` and `InboxConsumer` run on Kafka unchanged.
//!
//! # Errors and retries
//!
//! | failure | [`KafkaError`] | kind | relay does |
//! |---|---|---|---|
//! | broker down, connection lost, no leader | `Unavailable` | transient | retry with backoff |
//! | no delivery report in time | `Timeout` | transient | retry (same id; the inbox absorbs a copy) |
//! | topic missing | `UnknownDestination` | not found | dead letter |
//! | illegal topic name | `InvalidTopic` | validation | dead letter |
//! | key + payload + headers over `message.max.bytes` | `MessageTooLarge` | validation | dead letter |
//! | `ce_id` disagreeing with the id, empty header name | `InvalidHeaders` | validation | dead letter |
//! | any other broker refusal | `Rejected` | fatal | dead letter |
//!
//! # The test broker
//!
//! `scripts/kafka.sh` installs and starts tansu 0.6.0, a Kafka-compatible
//! broker written in Rust. One difference from Apache Kafka matters here:
//! tansu returns no records for a fetch that starts inside a stored record
//! batch (Kafka returns the whole batch and the client skips the records
//! before the offset). A consumer that resumes from a committed offset, or
//! seeks back for a nack, in the middle of a batch then waits. The tests
//! that restart a group member publish one record per batch
//! (`batch.num.messages=1`); on Apache Kafka no such setting is needed.
//!
//! librdkafka is built from source (rdkafka's `cmake-build`): the crate is
//! the feature boundary, so applications that do not speak Kafka do not
//! depend on it. A local Kafka-protocol broker for the tests is started by
//! `scripts/kafka.sh`.
//!
//! Errors are one enum, [`KafkaError`], whose
//! [`kind`](vextrus_kernel::HasErrorKind::kind) tells transient failures
//! (retry) from bad input (dead letter).

mod admin;
mod config;
mod error;
pub mod headers;
pub mod metrics;
mod source;
mod tracker;
mod transport;

pub use admin::create_topic;
pub use config::{DEFAULT_BROKERS, DEFAULT_MAX_MESSAGE_BYTES, KafkaConfig};
pub use error::{BoxError, KafkaError, Result};
pub use source::{ConsumerSpec, Delivery, KafkaSource};
pub use transport::{KafkaTransport, PublishReceipt, PublishRequest};
