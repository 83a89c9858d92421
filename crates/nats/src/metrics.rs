//! Metric names, in one place.
//!
//! Recorded through the `metrics` facade; they go wherever the application's
//! recorder sends them (vextrus-telemetry installs a Prometheus exporter).

/// Counter: publishes the server confirmed (duplicates included).
pub const PUBLISHED_TOTAL: &str = "vextrus_nats_published_total";
/// Counter: confirmed publishes the server recognised as duplicates.
pub const DUPLICATES_TOTAL: &str = "vextrus_nats_duplicates_total";
/// Counter, label `kind` (the error kind): publishes that failed.
pub const PUBLISH_FAILURES_TOTAL: &str = "vextrus_nats_publish_failures_total";
/// Histogram: seconds from sending a publish to its ack.
pub const PUBLISH_SECONDS: &str = "vextrus_nats_publish_seconds";
/// Counter: received messages whose headers were malformed (terminated and,
/// when a dead-letter subject is set, dead-lettered).
pub const MALFORMED_TOTAL: &str = "vextrus_nats_malformed_messages_total";
/// Counter: messages delivered to a consumer.
pub const DELIVERED_TOTAL: &str = "vextrus_nats_delivered_total";
