//! Resilience policies for vextrus: retry, circuit breaker, timeout and bulkhead.
//!
//! Each policy works two ways: as a wrapper around any async call, and as a
//! tower [`Layer`](tower::Layer) whose services can be stacked with
//! `tower::ServiceBuilder`.
//!
//! | policy | wrapper | tower layer |
//! | --- | --- | --- |
//! | retry with full-jitter backoff ([`retry`](mod@retry)) | [`retry()`], [`RetryPolicy::retry`] | [`RetryLayer`] |
//! | circuit breaker ([`breaker`]) | [`CircuitBreaker::call`] | [`CircuitBreakerLayer`] |
//! | timeout ([`timeout`](mod@timeout)) | [`timeout()`] | [`TimeoutLayer`] |
//! | bulkhead ([`bulkhead`]) | [`Bulkhead::call`] | [`BulkheadLayer`] |
//! | the backoff formula alone ([`backoff`](mod@backoff)) | [`delay_for_attempt`], [`ExponentialBackoff`] | - |
//! | all of them ([`stack`]) | [`ResilienceStack::call`] | [`ResilienceStack::layer`] |
//!
//! The composed order is `breaker(retry(timeout(bulkhead(call))))`; the
//! [`stack`] module says why.
//!
//! # Errors and their kinds
//!
//! The policies act on an error's [`ErrorKind`](vextrus_kernel::ErrorKind),
//! which a [`Classifier`] reads (by default the error's own
//! [`HasErrorKind`](vextrus_kernel::HasErrorKind)). Only transient errors are
//! retried by default; transient and fatal errors count against a breaker.
//! The policies' own rejections are [`ResilienceError`] variants, all
//! transient; an inner error keeps its kind.
//!
//! # Time
//!
//! Every wait is a `tokio::time` sleep and every clock read a
//! `tokio::time::Instant`, so tests run under `tokio::time::pause()` with no
//! real sleeping.
//!
//! # Metrics
//!
//! Names and labels are in [`mod@metrics`].

pub mod backoff;
pub mod breaker;
pub mod bulkhead;
pub mod classify;
mod error;
pub mod metrics;
pub mod retry;
pub mod stack;
pub mod timeout;

pub use backoff::{ExponentialBackoff, backoff_cap, delay_for_attempt, full_jitter};
pub use breaker::{
    BreakerFuture, BreakerRegistry, BreakerSnapshot, CallPermit, CircuitBreaker,
    CircuitBreakerConfig, CircuitBreakerLayer, CircuitBreakerService, CircuitState, SlidingWindow,
    StateTransition,
};
pub use bulkhead::{Bulkhead, BulkheadFuture, BulkheadLayer, BulkheadPermit, BulkheadService};
pub use classify::{ByErrorKind, Classifier, KindSet, Lifted, WithRetryAfter};
pub use error::ResilienceError;
pub use retry::{Retry, RetryEvent, RetryFuture, RetryLayer, RetryPolicy, retry};
pub use stack::{ResilienceFuture, ResilienceLayer, ResilienceService, ResilienceStack};
pub use timeout::{Timeout, TimeoutFuture, TimeoutLayer, timeout};

/// A `Result` whose error is a [`ResilienceError`].
pub type Result<T, E> = std::result::Result<T, ResilienceError<E>>;
