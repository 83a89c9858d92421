//! One function per measurement, so every crate records the metrics of
//! [`crate::names`] with the same labels.
//!
//! They go through the `metrics` facade: without an installed recorder they
//! cost almost nothing and record nothing.
//!
//! ```
//! use std::time::Duration;
//! use vextrus_telemetry::{record, Outcome};
//!
//! record::event_append(3, Duration::from_millis(4), Outcome::Ok);
//! record::outbox_backlog(12, Duration::from_secs(2));
//! ```

use std::time::Duration;

use metrics::{counter, gauge, histogram};
use vextrus_kernel::{ErrorKind, HasErrorKind};

use crate::names;

/// How an operation ended, as the `outcome` label says it.
///
/// ```
/// use vextrus_kernel::ErrorKind;
/// use vextrus_telemetry::Outcome;
///
/// assert_eq!(Outcome::from_kind(ErrorKind::Conflict), Outcome::Conflict);
/// assert_eq!(Outcome::from_kind(ErrorKind::Transient).as_str(), "error");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// It succeeded.
    Ok,
    /// It lost an optimistic-concurrency race or hit a held key.
    Conflict,
    /// It failed otherwise.
    Error,
    /// It was dropped before finishing (a timeout, a cancelled task).
    Cancelled,
}

impl Outcome {
    /// The label value: `ok`, `conflict`, `error` or `cancelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Conflict => "conflict",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
        }
    }

    /// The outcome of a failure of kind `kind`.
    pub fn from_kind(kind: ErrorKind) -> Self {
        match kind {
            ErrorKind::Conflict => Outcome::Conflict,
            _ => Outcome::Error,
        }
    }

    /// The outcome of `result`.
    pub fn of<T, E: HasErrorKind>(result: &Result<T, E>) -> Self {
        match result {
            Ok(_) => Outcome::Ok,
            Err(e) => Outcome::from_kind(e.kind()),
        }
    }
}

/// One append call that took `elapsed` and wrote `events` events (counted
/// only when `outcome` is [`Outcome::Ok`]).
pub fn event_append(events: u64, elapsed: Duration, outcome: Outcome) {
    let o = outcome.as_str();
    counter!(names::EVENT_APPENDS_TOTAL, names::LABEL_OUTCOME => o).increment(1);
    histogram!(names::EVENT_APPEND_SECONDS, names::LABEL_OUTCOME => o).record(elapsed);
    if outcome == Outcome::Ok {
        counter!(names::EVENTS_APPENDED_TOTAL).increment(events);
    }
}

/// The outbox's current backlog: `pending` messages, the oldest `oldest` old.
pub fn outbox_backlog(pending: u64, oldest: Duration) {
    gauge!(names::OUTBOX_BACKLOG).set(pending as f64);
    gauge!(names::OUTBOX_OLDEST_PENDING_SECONDS).set(oldest.as_secs_f64());
}

/// One publish attempt that took `elapsed`.
pub fn outbox_publish(elapsed: Duration, outcome: Outcome) {
    histogram!(names::OUTBOX_PUBLISH_SECONDS, names::LABEL_OUTCOME => outcome.as_str())
        .record(elapsed);
    if outcome == Outcome::Ok {
        counter!(names::OUTBOX_PUBLISHED_TOTAL).increment(1);
    } else {
        counter!(names::OUTBOX_PUBLISH_FAILURES_TOTAL).increment(1);
    }
}

/// The number of messages now in the outbox's dead-letter queue.
pub fn outbox_dead_letters(count: u64) {
    gauge!(names::OUTBOX_DEAD_LETTERS).set(count as f64);
}

/// One consumed message handled in `elapsed`.
pub fn message_consume(elapsed: Duration, outcome: Outcome) {
    histogram!(names::MESSAGE_CONSUME_SECONDS, names::LABEL_OUTCOME => outcome.as_str())
        .record(elapsed);
}

/// The number of sagas of type `saga_type` now in state `state`.
pub fn sagas(saga_type: &str, state: &str, count: u64) {
    gauge!(
        names::SAGAS,
        names::LABEL_SAGA_TYPE => saga_type.to_owned(),
        names::LABEL_STATE => state.to_owned()
    )
    .set(count as f64);
}

/// One saga step that took `elapsed`.
pub fn saga_step(saga_type: &str, step: &str, elapsed: Duration, outcome: Outcome) {
    histogram!(
        names::SAGA_STEP_SECONDS,
        names::LABEL_SAGA_TYPE => saga_type.to_owned(),
        names::LABEL_STEP => step.to_owned(),
        names::LABEL_OUTCOME => outcome.as_str()
    )
    .record(elapsed);
}

/// One compensation of step `step`.
pub fn saga_compensation(saga_type: &str, step: &str) {
    counter!(
        names::SAGA_COMPENSATIONS_TOTAL,
        names::LABEL_SAGA_TYPE => saga_type.to_owned(),
        names::LABEL_STEP => step.to_owned()
    )
    .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E(ErrorKind);
    impl HasErrorKind for E {
        fn kind(&self) -> ErrorKind {
            self.0
        }
    }

    #[test]
    fn outcomes_follow_error_kinds() {
        assert_eq!(Outcome::of::<(), E>(&Ok(())), Outcome::Ok);
        assert_eq!(
            Outcome::of::<(), _>(&Err(E(ErrorKind::Conflict))),
            Outcome::Conflict
        );
        assert_eq!(
            Outcome::of::<(), _>(&Err(E(ErrorKind::Fatal))),
            Outcome::Error
        );
        assert_eq!(Outcome::Cancelled.as_str(), "cancelled");
    }

    #[test]
    fn recording_reaches_the_recorder_with_the_documented_labels() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            event_append(3, Duration::from_millis(2), Outcome::Ok);
            event_append(1, Duration::from_millis(2), Outcome::Conflict);
            saga_compensation("order_to_cash", "reserve_stock");
        });
        let text = handle.render();
        assert!(
            text.contains("vextrus_event_appends_total{outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("vextrus_event_appends_total{outcome=\"conflict\"} 1"));
        assert!(text.contains("vextrus_events_appended_total 3"));
        assert!(text.contains(
            "vextrus_saga_compensations_total{saga_type=\"order_to_cash\",step=\"reserve_stock\"} 1"
        ));
    }
}
