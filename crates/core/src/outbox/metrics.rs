//! Metric names of the outbox relay and the inbox consumer.
//!
//! Every name is defined once, in [`vextrus_telemetry::names`] (where
//! dashboards, `describe_metrics` and the `/metrics` scrape test see them),
//! and re-exported here for the relay and the inbox. Recorded through the
//! `metrics` facade; install any recorder (for example `vextrus-telemetry`'s
//! Prometheus exporter) to export them.
//!
//! ```
//! use vextrus_core::outbox::metrics;
//!
//! assert_eq!(metrics::OUTBOX_BACKLOG, vextrus_telemetry::names::OUTBOX_BACKLOG);
//! assert_eq!(metrics::OUTBOX_OLDEST_PENDING_AGE_SECONDS, "vextrus_outbox_oldest_pending_seconds");
//! ```

pub use vextrus_telemetry::names::{
    INBOX_MESSAGES_TOTAL, LABEL_CONSUMER, LABEL_KIND, LABEL_OUTCOME, LABEL_RELAY, OUTBOX_BACKLOG,
    OUTBOX_DEAD_LETTERED_TOTAL, OUTBOX_DEAD_LETTERS, OUTBOX_PUBLISH_FAILURES_TOTAL,
    OUTBOX_PUBLISH_LATENCY_SECONDS, OUTBOX_PUBLISH_SECONDS, OUTBOX_PUBLISHED_TOTAL,
};

/// Gauge: age in seconds of the oldest pending message (0 when none): the
/// relay's name for [`vextrus_telemetry::names::OUTBOX_OLDEST_PENDING_SECONDS`].
pub const OUTBOX_OLDEST_PENDING_AGE_SECONDS: &str =
    vextrus_telemetry::names::OUTBOX_OLDEST_PENDING_SECONDS;
