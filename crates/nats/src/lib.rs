//! The NATS JetStream transport for vextrus.
//!
//! - [`JetStreamTransport`] publishes outbox messages into JetStream and
//!   resolves each publish only after the server's ack. The message id travels
//!   as `Nats-Msg-Id` (JetStream's de-duplication key) and every header of the
//!   message travels as a NATS header, which is CloudEvents' binary content
//!   mode (`ce_id`, `ce_type`, `ce_source`, `ce_time`, `ce_specversion`,
//!   `content-type`) plus `correlation_id`, `causation_id`, `traceparent`,
//!   `tracestate` and `partition_key`. Batches are pipelined: all publishes
//!   are sent, then all acks awaited.
//! - [`JetStreamSource`] is a durable pull consumer with explicit acks that
//!   yields [`Delivery`]s for the inbox: acknowledge after the consumer's
//!   commit, nack with a delay to retry. Malformed messages are terminated
//!   (and copied to a dead-letter subject), logged and counted, never handed
//!   to a handler and never dropped silently.
//! - [`JetStreamConfig`] and [`StreamSpec`] name the server and the streams
//!   (subjects and duplicate window), [`ConsumerSpec`] the consumer.
//!
//! The duplicate window is a convenience: a relay paused longer than it
//! publishes a true duplicate, so exactly-once effects come from the inbox.
//!
//! # Testing
//!
//! The integration tests need NATS with JetStream at
//! `VEXTRUS_TEST_NATS_URL` (default `nats://127.0.0.1:4222`) and fail when
//! it is missing; each test makes its own stream and deletes it. The outage
//! test starts a `nats-server` of its own (`/usr/sbin/nats-server`, or
//! `VEXTRUS_NATS_SERVER`) on a free port. `cargo bench -p vextrus-nats
//! --bench relay` compares the relay's throughput with the raw client's.
//!
//! Errors are one enum, [`NatsError`], whose
//! [`kind`](vextrus_kernel::HasErrorKind::kind) tells transient failures
//! (retry) from bad input (dead letter).

mod config;
mod error;
pub mod headers;
pub mod metrics;
mod source;
mod transport;

pub use config::{
    DEFAULT_DUPLICATE_WINDOW, DEFAULT_URL, JetStreamConfig, StreamSpec, StreamStorage,
};
pub use error::{BoxError, NatsError, Result};
pub use source::{ConsumerSpec, Delivery, JetStreamSource};
pub use transport::{JetStreamTransport, PublishReceipt, PublishRequest};
