//! Metric names of the outbox relay and the inbox consumer, in one place.
//!
//! Recorded through the `metrics` facade; install any recorder (for example
//! `vextrus-telemetry`'s Prometheus exporter) to export them.

/// Gauge: pending messages (including those waiting for a retry).
pub const OUTBOX_BACKLOG: &str = "vextrus_outbox_backlog";
/// Gauge: age in seconds of the oldest pending message (0 when none).
pub const OUTBOX_OLDEST_PENDING_AGE_SECONDS: &str = "vextrus_outbox_oldest_pending_age_seconds";
/// Gauge: dead letters waiting for replay or discard.
pub const OUTBOX_DEAD_LETTERS: &str = "vextrus_outbox_dead_letters";
/// Histogram: seconds from enqueue to the broker's confirmation.
pub const OUTBOX_PUBLISH_LATENCY_SECONDS: &str = "vextrus_outbox_publish_latency_seconds";
/// Counter: messages confirmed by the broker.
pub const OUTBOX_PUBLISHED_TOTAL: &str = "vextrus_outbox_published_total";
/// Counter: failed publish attempts, labelled with [`LABEL_KIND`].
pub const OUTBOX_PUBLISH_FAILURES_TOTAL: &str = "vextrus_outbox_publish_failures_total";
/// Counter: messages that became dead letters.
pub const OUTBOX_DEAD_LETTERED_TOTAL: &str = "vextrus_outbox_dead_lettered_total";
/// Counter: inbox messages handled, labelled with [`LABEL_CONSUMER`] and
/// [`LABEL_OUTCOME`] (`processed`, `duplicate`, `retrying`, `dead_lettered`,
/// `malformed`).
pub const INBOX_MESSAGES_TOTAL: &str = "vextrus_inbox_messages_total";
/// Label: the error kind.
pub const LABEL_KIND: &str = "kind";
/// Label: the relay's name.
pub const LABEL_RELAY: &str = "relay";
/// Label: the inbox consumer's name.
pub const LABEL_CONSUMER: &str = "consumer";
/// Label: what happened to an inbox message.
pub const LABEL_OUTCOME: &str = "outcome";
