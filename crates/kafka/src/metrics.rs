//! Metric names, in one place.
//!
//! Recorded through the `metrics` facade; they go wherever the application's
//! recorder sends them (vextrus-telemetry installs a Prometheus exporter).

/// Counter: publishes the broker confirmed.
pub const PUBLISHED_TOTAL: &str = "vextrus_kafka_published_total";
/// Counter, label `kind` (the error kind): publishes that failed.
pub const PUBLISH_FAILURES_TOTAL: &str = "vextrus_kafka_publish_failures_total";
/// Histogram: seconds from handing a record to the producer to its delivery
/// report.
pub const PUBLISH_SECONDS: &str = "vextrus_kafka_publish_seconds";
/// Counter: received records whose headers were malformed (released and,
/// when a dead-letter topic is set, dead-lettered).
pub const MALFORMED_TOTAL: &str = "vextrus_kafka_malformed_messages_total";
/// Counter: messages handed to a consumer.
pub const DELIVERED_TOTAL: &str = "vextrus_kafka_delivered_total";
/// Counter: offset commits (acks) that failed.
pub const COMMIT_FAILURES_TOTAL: &str = "vextrus_kafka_commit_failures_total";
