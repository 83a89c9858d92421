//! Every metric name, label key, span name and span attribute key vextrus
//! emits, in one place.
//!
//! Dashboards and alerts are written against these strings, so they are
//! part of the public contract: renaming one is a breaking change. Metric
//! names follow Prometheus conventions (`_total` for counters, base units in
//! the name: `_seconds`); attribute keys follow OpenTelemetry semantic
//! conventions where one exists (`messaging.*`) and live under `vextrus.*`
//! otherwise.
//!
//! ```
//! use vextrus_telemetry::names;
//!
//! assert_eq!(names::EVENT_APPEND_SECONDS, "vextrus_event_append_seconds");
//! assert!(names::ALL_METRICS.iter().all(|m| m.name.starts_with("vextrus_")));
//! ```

/// The kind of a metric, as the Prometheus exposition format names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricKind {
    /// A monotonically increasing count.
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A distribution of observations (latencies), exported with buckets.
    Histogram,
}

impl MetricKind {
    /// The Prometheus `# TYPE` name of this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// A metric vextrus emits: its name, kind, unit, labels and meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDef {
    /// The metric name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// The unit, if the value has one.
    pub unit: Option<metrics::Unit>,
    /// The label keys the metric is recorded with.
    pub labels: &'static [&'static str],
    /// What the metric measures (exported as Prometheus `# HELP`).
    pub help: &'static str,
}

// ---------------------------------------------------------------- label keys

/// Label: how an operation ended: `ok`, `conflict`, `error` or `cancelled`
/// (see [`crate::Outcome`]).
pub const LABEL_OUTCOME: &str = "outcome";
/// Label: the outbox relay's name.
pub const LABEL_RELAY: &str = "relay";
/// Label: the inbox consumer's name.
pub const LABEL_CONSUMER: &str = "consumer";
/// Label: a saga's lifecycle state (`running`, `compensating`, `completed`, ...).
pub const LABEL_STATE: &str = "state";
/// Label: the saga type (the orchestration's name, such as `order_to_cash`).
pub const LABEL_SAGA_TYPE: &str = "saga_type";
/// Label: the saga step's name.
pub const LABEL_STEP: &str = "step";
/// Label: the circuit breaker's name.
pub const LABEL_BREAKER: &str = "breaker";
/// Label: the operation a [`crate::timed`] future measured.
pub const LABEL_OPERATION: &str = "operation";
/// Label set on every metric by [`crate::init`]: the service name.
pub const LABEL_SERVICE: &str = "service";

// ----------------------------------------------------------------- event store

/// Counter: event-store append calls (one per `append_to_stream`), by outcome.
pub const EVENT_APPENDS_TOTAL: &str = "vextrus_event_appends_total";
/// Counter: events written by successful appends.
pub const EVENTS_APPENDED_TOTAL: &str = "vextrus_events_appended_total";
/// Histogram (seconds): latency of one append call, by outcome.
pub const EVENT_APPEND_SECONDS: &str = "vextrus_event_append_seconds";

// ---------------------------------------------------------------------- outbox

/// Gauge: outbox messages committed but not yet published.
pub const OUTBOX_BACKLOG: &str = "vextrus_outbox_backlog";
/// Gauge (seconds): age of the oldest pending outbox message (0 when empty).
pub const OUTBOX_OLDEST_PENDING_SECONDS: &str = "vextrus_outbox_oldest_pending_seconds";
/// Histogram (seconds): time the relay spent publishing one claimed batch to
/// the broker (until every confirmation or failure), by outcome.
pub const OUTBOX_PUBLISH_SECONDS: &str = "vextrus_outbox_publish_seconds";
/// Histogram (seconds): from a message's outbox commit to the broker's
/// confirmation, by relay.
pub const OUTBOX_PUBLISH_LATENCY_SECONDS: &str = "vextrus_outbox_publish_latency_seconds";
/// Counter: outbox messages that became dead letters, by relay.
pub const OUTBOX_DEAD_LETTERED_TOTAL: &str = "vextrus_outbox_dead_lettered_total";
/// Counter: outbox messages the relay published and the broker acknowledged.
pub const OUTBOX_PUBLISHED_TOTAL: &str = "vextrus_outbox_published_total";
/// Counter: failed publish attempts (each retry counts).
pub const OUTBOX_PUBLISH_FAILURES_TOTAL: &str = "vextrus_outbox_publish_failures_total";
/// Gauge: outbox messages parked in the dead-letter queue, awaiting redrive.
pub const OUTBOX_DEAD_LETTERS: &str = "vextrus_outbox_dead_letters";

// ------------------------------------------------------------------- consumers

/// Histogram (seconds): time to handle one consumed message, by outcome.
pub const MESSAGE_CONSUME_SECONDS: &str = "vextrus_message_consume_seconds";
/// Counter: inbox messages handled, by consumer and outcome (`processed`,
/// `duplicate`, `retrying`, `dead_lettered`, `malformed`).
pub const INBOX_MESSAGES_TOTAL: &str = "vextrus_inbox_messages_total";

// ----------------------------------------------------------------------- sagas

/// Gauge: saga instances, by saga type and state.
pub const SAGAS: &str = "vextrus_sagas";
/// Histogram (seconds): latency of one saga step, by saga type, step and outcome.
pub const SAGA_STEP_SECONDS: &str = "vextrus_saga_step_seconds";
/// Counter: compensations run, by saga type and the step compensated.
pub const SAGA_COMPENSATIONS_TOTAL: &str = "vextrus_saga_compensations_total";

// ------------------------------------------------------------------ resilience

// The resilience policies record their own metrics (vextrus-resilience does
// not depend on this crate); the names are defined once, there, and listed
// here so that dashboards, `describe_metrics` and the scrape test see them.
pub use vextrus_resilience::metrics::{
    BREAKER_CALLS_TOTAL, BREAKER_SLOW_CALLS_TOTAL, BREAKER_STATE, BREAKER_TRANSITIONS_TOTAL,
    BULKHEAD_REJECTIONS_TOTAL, LABEL_FROM, LABEL_KIND, LABEL_REASON, LABEL_TO, RETRIES_TOTAL,
    RETRY_GIVE_UPS_TOTAL, TIMEOUTS_TOTAL,
};

// ---------------------------------------------------------------------- timing

/// Histogram (seconds): any operation timed with [`crate::timed`] or
/// [`crate::TimedExt`], by operation and outcome.
pub const OPERATION_SECONDS: &str = "vextrus_operation_seconds";

/// Every metric above, with kind, unit, labels and help text.
///
/// [`crate::init`] registers the help texts and units with the metrics
/// recorder ([`describe_metrics`]); tests use the list to check a scrape.
pub const ALL_METRICS: &[MetricDef] = &[
    MetricDef {
        name: EVENT_APPENDS_TOTAL,
        kind: MetricKind::Counter,
        unit: None,
        labels: &[LABEL_OUTCOME],
        help: "Event-store append calls, by outcome.",
    },
    MetricDef {
        name: EVENTS_APPENDED_TOTAL,
        kind: MetricKind::Counter,
        unit: None,
        labels: &[],
        help: "Events written by successful appends.",
    },
    MetricDef {
        name: EVENT_APPEND_SECONDS,
        kind: MetricKind::Histogram,
        unit: Some(metrics::Unit::Seconds),
        labels: &[LABEL_OUTCOME],
        help: "Latency of one event-store append call.",
    },
    MetricDef {
        name: OUTBOX_BACKLOG,
        kind: MetricKind::Gauge,
        unit: None,
        labels: &[],
        help: "Outbox messages committed but not yet published.",
    },
    MetricDef {
        name: OUTBOX_OLDEST_PENDING_SECONDS,
        kind: MetricKind::Gauge,
        unit: Some(metrics::Unit::Seconds),
        labels: &[],
        help: "Age of the oldest pending outbox message (0 when the outbox is empty).",
    },
    MetricDef {
        name: OUTBOX_PUBLISH_SECONDS,
        kind: MetricKind::Histogram,
        unit: Some(metrics::Unit::Seconds),
        labels: &[LABEL_OUTCOME],
        help: "Time the relay spent publishing one claimed batch to the broker.",
    },
    MetricDef {
        name: OUTBOX_PUBLISH_LATENCY_SECONDS,
        kind: MetricKind::Histogram,
        unit: Some(metrics::Unit::Seconds),
        labels: &[LABEL_RELAY],
        help: "Seconds from a message's outbox commit to the broker's confirmation.",
    },
    MetricDef {
        name: OUTBOX_DEAD_LETTERED_TOTAL,
        kind: MetricKind::Counter,
        unit: None,
        labels: &[LABEL_RELAY],
        help: "Outbox messages that became dead letters.",
    },
    MetricDef {
        name: INBOX_MESSAGES_TOTAL,
        kind: MetricKind::Counter,
        unit: None,
        labels: &[LABEL_CONSUMER, LABEL_OUTCOME],
        help: "Inbox messages handled, by consumer and outcome.",
    },
    MetricDef {
        name: OUTBOX_PUBLISHED_TOTAL,
        kind: MetricKind::Counter,
        unit: None,
        labels: &[],
        help: "Outbox messages published and acknowledged by the broker.",
    },
    MetricDef {
        name: OUTBOX_PUBLISH_FAILURES_TOTAL,
        kind: MetricKind::Counter,
        unit: None,
        labels: &[],
        help: "Failed outbox publish attempts (each retry counts).",
    },
    MetricDef {
        name: OUTBOX_DEAD_LETTERS,
        kind: MetricKind::Gauge,
        unit: None,
        labels: &[],
        help: "Outbox messages parked in the dead-letter queue.",
    },
    MetricDef {
        name: MESSAGE_CONSUME_SECONDS,
        kind: MetricKind::Histogram,
        unit: Some(metrics::Unit::Seconds),
        labels: &[LABEL_OUTCOME],
        help: "Time to handle one consumed message.",
    },
    MetricDef {
        name: SAGAS,
        kind: MetricKind::Gauge,
        unit: None,
        labels: &[LABEL_SAGA_TYPE, LABEL_STATE],
        help: "Saga instances, by saga type and state.",
    },
    MetricDef {
        name: SAGA_STEP_SECONDS,
        kind: MetricKind::Histogram,
        unit: Some(metrics::Unit::Seconds),
        labels: &[LABEL_SAGA_TYPE, LABEL_STEP, LABEL_OUTCOME],
        help: "Latency of one saga step.",
    },
    MetricDef {
        name: SAGA_COMPENSATIONS_TOTAL,
        kind: MetricKind::Counter,
        unit: None,
        labels: &[LABEL_SAGA_TYPE, LABEL_STEP],
        help: "Saga compensations run, by saga type and compensated step.",
    },
    MetricDef {
        name: BREAKER_STATE,
        kind: MetricKind::Gauge,
        unit: None,
        labels: &[LABEL_BREAKER],
        help: "Circuit breaker state: 0 closed, 1 open, 2 half-open.",
    },
    MetricDef {
        name: BREAKER_CALLS_TOTAL,
        kind: MetricKind::Counter,
        unit: None,
        labels: &[LABEL_BREAKER, LABEL_OUTCOME],
        help: "Calls seen by a circuit breaker: success, failure, rejected or ignored.",
    },
    MetricDef {
        name: BREAKER_SLOW_CALLS_TOTAL,
        kind: MetricKind::Counter,
        unit: None,
        labels: &[LABEL_BREAKER],
        help: "Calls slower than the breaker's slow-call duration.",
    },
    MetricDef {
        name: BREAKER_TRANSITIONS_TOTAL,
        kind: MetricKind::Counter,
        unit: None,
        labels: &[LABEL_BREAKER, LABEL_FROM, LABEL_TO],
        help: "Circuit breaker state changes.",
    },
    MetricDef {
        name: RETRIES_TOTAL,
        kind: MetricKind::Counter,
        unit: None,
        labels: &[LABEL_KIND],
        help: "Retries scheduled, by the kind of the error that caused them.",
    },
    MetricDef {
        name: RETRY_GIVE_UPS_TOTAL,
        kind: MetricKind::Counter,
        unit: None,
        labels: &[LABEL_REASON],
        help: "Failed calls returned without a further retry: not_retryable, max_attempts or max_elapsed.",
    },
    MetricDef {
        name: TIMEOUTS_TOTAL,
        kind: MetricKind::Counter,
        unit: None,
        labels: &[],
        help: "Attempts cancelled by a timeout.",
    },
    MetricDef {
        name: BULKHEAD_REJECTIONS_TOTAL,
        kind: MetricKind::Counter,
        unit: None,
        labels: &[LABEL_REASON],
        help: "Calls a bulkhead turned away: queue_full or max_wait.",
    },
    MetricDef {
        name: OPERATION_SECONDS,
        kind: MetricKind::Histogram,
        unit: Some(metrics::Unit::Seconds),
        labels: &[LABEL_OPERATION, LABEL_OUTCOME],
        help: "Latency of an operation timed with vextrus_telemetry::timed.",
    },
];

/// Registers the help text and unit of every metric in [`ALL_METRICS`] with
/// the installed `metrics` recorder. [`crate::init`] calls it; call it
/// yourself only when you install a recorder of your own.
pub fn describe_metrics() {
    for m in ALL_METRICS {
        match (m.kind, m.unit) {
            (MetricKind::Counter, Some(u)) => metrics::describe_counter!(m.name, u, m.help),
            (MetricKind::Counter, None) => metrics::describe_counter!(m.name, m.help),
            (MetricKind::Gauge, Some(u)) => metrics::describe_gauge!(m.name, u, m.help),
            (MetricKind::Gauge, None) => metrics::describe_gauge!(m.name, m.help),
            (MetricKind::Histogram, Some(u)) => metrics::describe_histogram!(m.name, u, m.help),
            (MetricKind::Histogram, None) => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

// ---------------------------------------------------------------- span names

/// Span: one event-store append (`append_to_stream`).
pub const SPAN_EVENT_APPEND: &str = "vextrus.event.append";
/// Span: the outbox relay publishing one message to the broker (kind producer).
pub const SPAN_OUTBOX_PUBLISH: &str = "vextrus.outbox.publish";
/// Span: a participant or orchestrator handling one consumed message (kind consumer).
pub const SPAN_MESSAGE_CONSUME: &str = "vextrus.message.consume";
/// Span: one forward step of a saga.
pub const SPAN_SAGA_STEP: &str = "vextrus.saga.step";
/// Span: one compensation of a saga step.
pub const SPAN_SAGA_COMPENSATION: &str = "vextrus.saga.compensate";
/// Span (tracing name): an operation timed with [`crate::timed`]. Exported to
/// OpenTelemetry under the operation's own name.
pub const SPAN_TIMED: &str = "vextrus.timed";

/// Every span name above.
pub const ALL_SPANS: &[&str] = &[
    SPAN_EVENT_APPEND,
    SPAN_OUTBOX_PUBLISH,
    SPAN_MESSAGE_CONSUME,
    SPAN_SAGA_STEP,
    SPAN_SAGA_COMPENSATION,
    SPAN_TIMED,
];

// ------------------------------------------------------- span attribute keys

/// Attribute: the saga instance id.
pub const ATTR_SAGA_ID: &str = "vextrus.saga.id";
/// Attribute: the saga type.
pub const ATTR_SAGA_TYPE: &str = "vextrus.saga.type";
/// Attribute: the saga step's name.
pub const ATTR_SAGA_STEP: &str = "vextrus.saga.step";
/// Attribute: the event stream id.
pub const ATTR_STREAM_ID: &str = "vextrus.stream.id";
/// Attribute: how many events one append wrote.
pub const ATTR_EVENT_COUNT: &str = "vextrus.event.count";
/// Attribute: the correlation id of the business transaction.
pub const ATTR_CORRELATION_ID: &str = "vextrus.correlation.id";
/// Attribute: the operation a timed span measured.
pub const ATTR_OPERATION: &str = "vextrus.operation";
/// Attribute (OpenTelemetry semantic convention): the message id.
pub const ATTR_MESSAGE_ID: &str = "messaging.message.id";
/// Attribute (OpenTelemetry semantic convention): the subject, topic or queue.
pub const ATTR_DESTINATION: &str = "messaging.destination.name";
/// Attribute (OpenTelemetry semantic convention): the broker (`nats`, `kafka`).
pub const ATTR_MESSAGING_SYSTEM: &str = "messaging.system";

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn metric_names_are_unique_and_follow_prometheus_conventions() {
        let mut seen = HashSet::new();
        for m in ALL_METRICS {
            assert!(seen.insert(m.name), "duplicate metric {}", m.name);
            assert!(m.name.starts_with("vextrus_"), "{}", m.name);
            assert!(
                m.name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{}",
                m.name
            );
            assert_eq!(
                m.name.ends_with("_total"),
                m.kind == MetricKind::Counter,
                "only counters end in _total: {}",
                m.name
            );
            assert_eq!(
                m.name.ends_with("_seconds"),
                m.unit == Some(metrics::Unit::Seconds),
                "{}",
                m.name
            );
            assert!(!m.help.is_empty());
        }
        let spans: HashSet<_> = ALL_SPANS.iter().collect();
        assert_eq!(spans.len(), ALL_SPANS.len());
    }
}
