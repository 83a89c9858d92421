//! Metric names and labels emitted by this crate, all in one place.
//!
//! Metrics go through the [`metrics`](https://docs.rs/metrics) facade: they cost
//! nothing until the application installs a recorder (a Prometheus exporter,
//! an OpenTelemetry bridge). Names follow Prometheus conventions: `_total` for
//! counters, no unit suffix for the state gauge.
//!
//! A circuit breaker resolves its metric handles when it is created, so the
//! recorder must be installed before the first breaker is made (install it
//! first thing in `main`); a breaker made earlier reports to no recorder.
//!
//! | name | type | labels | meaning |
//! | --- | --- | --- | --- |
//! | [`BREAKER_STATE`] | gauge | `breaker` | 0 closed, 1 open, 2 half-open |
//! | [`BREAKER_CALLS_TOTAL`] | counter | `breaker`, `outcome` | calls by outcome: `success`, `failure`, `rejected`, `ignored` |
//! | [`BREAKER_SLOW_CALLS_TOTAL`] | counter | `breaker` | calls slower than the configured slow-call duration |
//! | [`BREAKER_TRANSITIONS_TOTAL`] | counter | `breaker`, `from`, `to` | state changes |
//! | [`RETRIES_TOTAL`] | counter | `kind` | retries scheduled, by the error kind that caused them |
//! | [`RETRY_GIVE_UPS_TOTAL`] | counter | `reason` | failed calls returned without a further retry: `not_retryable`, `max_attempts`, `max_elapsed` |
//! | [`TIMEOUTS_TOTAL`] | counter | (none) | attempts cancelled by a timeout |
//! | [`BULKHEAD_REJECTIONS_TOTAL`] | counter | `reason` | calls turned away by a bulkhead: `queue_full`, `max_wait` |

/// Gauge: the state of a circuit breaker (0 closed, 1 open, 2 half-open).
pub const BREAKER_STATE: &str = "vextrus_resilience_breaker_state";
/// Counter: calls seen by a circuit breaker, labelled by [`LABEL_OUTCOME`].
///
/// `success` and `failure` are recorded outcomes (a validation error is a
/// success for the breaker: the downstream answered correctly), `rejected`
/// calls were refused while open, `ignored` calls finished after the breaker
/// had changed state and so say nothing about the state it is in now.
pub const BREAKER_CALLS_TOTAL: &str = "vextrus_resilience_breaker_calls_total";
/// Counter: calls slower than the breaker's `slow_call_duration`.
pub const BREAKER_SLOW_CALLS_TOTAL: &str = "vextrus_resilience_breaker_slow_calls_total";
/// Counter: circuit breaker state transitions, labelled by [`LABEL_FROM`] and [`LABEL_TO`].
pub const BREAKER_TRANSITIONS_TOTAL: &str = "vextrus_resilience_breaker_transitions_total";
/// Counter: retries scheduled, labelled by the [`LABEL_KIND`] of the error.
pub const RETRIES_TOTAL: &str = "vextrus_resilience_retries_total";
/// Counter: failed calls the retry policy gave back, labelled by [`LABEL_REASON`].
pub const RETRY_GIVE_UPS_TOTAL: &str = "vextrus_resilience_retry_give_ups_total";
/// Counter: attempts cancelled because they ran past their time limit.
pub const TIMEOUTS_TOTAL: &str = "vextrus_resilience_timeouts_total";
/// Counter: calls a bulkhead turned away, labelled by [`LABEL_REASON`].
pub const BULKHEAD_REJECTIONS_TOTAL: &str = "vextrus_resilience_bulkhead_rejections_total";

/// Label: the breaker's name.
pub const LABEL_BREAKER: &str = "breaker";
/// Label: a call's outcome as the breaker recorded it.
pub const LABEL_OUTCOME: &str = "outcome";
/// Label: the state a breaker left.
pub const LABEL_FROM: &str = "from";
/// Label: the state a breaker entered.
pub const LABEL_TO: &str = "to";
/// Label: an [`ErrorKind`](vextrus_kernel::ErrorKind) name.
pub const LABEL_KIND: &str = "kind";
/// Label: why a policy stopped or refused.
pub const LABEL_REASON: &str = "reason";
