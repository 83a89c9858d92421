//! Time any async operation into a histogram and a span with one line.
//!
//! See [`TimedExt`] for an example.
//!
//! [`TimedExt::timed`] labels any completed future `ok`; [`TimedExt::try_timed`]
//! (for futures returning `Result<T, E>` with `E: HasErrorKind`) labels
//! failures `conflict` or `error` and marks the span as failed. A future
//! dropped before completing (a timeout, a cancelled task) is recorded as
//! `cancelled`. The clock starts at the first poll, so time spent waiting to
//! be polled for the first time is not counted.
//!
//! A wrapper rather than an attribute macro: a proc-macro crate would cost
//! every build a compile step for a line of sugar.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use metrics::{IntoLabels, Label};
use tracing::Span;
use vextrus_kernel::HasErrorKind;

use crate::Outcome;
use crate::names;

fn operation_span(operation: &str) -> Span {
    tracing::info_span!(
        "vextrus.timed",
        otel.name = operation,
        vextrus.operation = operation,
        otel.status_code = tracing::field::Empty,
    )
}

pin_project_lite::pin_project! {
    /// A future that records how long its inner future took into a
    /// histogram and polls it inside a span. Made by [`timed`],
    /// [`try_timed`] and [`TimedExt`].
    #[must_use = "futures do nothing unless polled"]
    pub struct Timed<F>
    where
        F: Future,
    {
        #[pin]
        inner: F,
        span: Span,
        metric: &'static str,
        labels: Vec<Label>,
        classify: fn(&F::Output) -> Outcome,
        started: Option<Instant>,
        done: bool,
    }

    impl<F> PinnedDrop for Timed<F>
    where
        F: Future,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !*this.done
                && let Some(started) = this.started.take()
            {
                record(this.metric, std::mem::take(this.labels), Outcome::Cancelled, started);
            }
        }
    }
}

fn record(metric: &'static str, mut labels: Vec<Label>, outcome: Outcome, started: Instant) {
    labels.push(Label::new(names::LABEL_OUTCOME, outcome.as_str()));
    metrics::histogram!(metric, labels).record(started.elapsed());
}

fn always_ok<T>(_: &T) -> Outcome {
    Outcome::Ok
}

impl<F: Future> Timed<F> {
    fn new(
        inner: F,
        span: Span,
        metric: &'static str,
        labels: Vec<Label>,
        classify: fn(&F::Output) -> Outcome,
    ) -> Self {
        Self {
            inner,
            span,
            metric,
            labels,
            classify,
            started: None,
            done: false,
        }
    }

    /// The span the inner future is polled in (to add fields or set a parent
    /// before the first poll).
    pub fn span(&self) -> &Span {
        &self.span
    }
}

impl<F: Future> Future for Timed<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let started = *this.started.get_or_insert_with(Instant::now);
        let _entered = this.span.enter();
        let output = match this.inner.poll(cx) {
            Poll::Ready(output) => output,
            Poll::Pending => return Poll::Pending,
        };
        *this.done = true;
        let outcome = (this.classify)(&output);
        if matches!(outcome, Outcome::Error | Outcome::Conflict) {
            this.span.record("otel.status_code", "error");
        }
        record(this.metric, std::mem::take(this.labels), outcome, started);
        Poll::Ready(output)
    }
}

/// Times `fut` into histogram `metric` with `labels` (plus `outcome`), inside
/// a span exported under the metric's name. Use it for the histograms of
/// [`crate::names`]; for ad-hoc operations [`TimedExt::timed`] is shorter.
///
/// ```
/// use vextrus_telemetry::{names, timed};
///
/// let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// let labels = [(names::LABEL_SAGA_TYPE, "order_to_cash"), (names::LABEL_STEP, "reserve")];
/// let n = rt.block_on(timed(names::SAGA_STEP_SECONDS, &labels, async { 42 }));
/// assert_eq!(n, 42);
/// ```
pub fn timed<F: IntoFuture>(
    metric: &'static str,
    labels: impl IntoLabels,
    fut: F,
) -> Timed<F::IntoFuture> {
    Timed::new(
        fut.into_future(),
        operation_span(metric),
        metric,
        labels.into_labels(),
        always_ok,
    )
}

/// Like [`timed`] for a future returning `Result<T, E>`: the `outcome` label
/// follows the error's kind and failures mark the span as an error.
pub fn try_timed<F, T, E>(
    metric: &'static str,
    labels: impl IntoLabels,
    fut: F,
) -> Timed<F::IntoFuture>
where
    F: IntoFuture<Output = Result<T, E>>,
    E: HasErrorKind,
{
    Timed::new(
        fut.into_future(),
        operation_span(metric),
        metric,
        labels.into_labels(),
        Outcome::of::<T, E>,
    )
}

/// `.timed("op")` and `.try_timed("op")` on any future: times it into
/// [`names::OPERATION_SECONDS`] with label `operation="op"`, inside a span
/// exported as `op`. A future dropped before it completes is recorded as
/// `cancelled`; the clock starts at the first poll.
///
/// ```
/// use vextrus_kernel::{ErrorKind, HasErrorKind};
/// use vextrus_telemetry::TimedExt;
///
/// #[derive(Debug)]
/// struct OutOfStock;
/// impl HasErrorKind for OutOfStock {
///     fn kind(&self) -> ErrorKind { ErrorKind::Conflict }
/// }
/// async fn reserve_stock(qty: u32) -> Result<u32, OutOfStock> {
///     if qty <= 3 { Ok(qty) } else { Err(OutOfStock) }
/// }
///
/// let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// // vextrus_operation_seconds{operation="inventory.reserve",outcome="ok"}
/// let reserved = rt.block_on(reserve_stock(2).try_timed("inventory.reserve"));
/// assert_eq!(reserved.unwrap(), 2);
/// // ... outcome="conflict", and the span is marked as failed.
/// assert!(rt.block_on(reserve_stock(9).try_timed("inventory.reserve")).is_err());
/// // Any future, whatever it returns:
/// assert_eq!(rt.block_on(async { 42 }.timed("pricing.quote")), 42);
/// ```
pub trait TimedExt: Future + Sized {
    /// Times this future; any completion counts as `ok`.
    fn timed(self, operation: &'static str) -> Timed<Self> {
        Timed::new(
            self,
            operation_span(operation),
            names::OPERATION_SECONDS,
            vec![Label::new(names::LABEL_OPERATION, operation)],
            always_ok,
        )
    }

    /// Times this `Result`-returning future; errors are labelled by kind and
    /// mark the span as failed.
    fn try_timed<T, E>(self, operation: &'static str) -> Timed<Self>
    where
        Self: Future<Output = Result<T, E>>,
        E: HasErrorKind,
    {
        Timed::new(
            self,
            operation_span(operation),
            names::OPERATION_SECONDS,
            vec![Label::new(names::LABEL_OPERATION, operation)],
            Outcome::of::<T, E>,
        )
    }
}

impl<F: Future> TimedExt for F {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use vextrus_kernel::ErrorKind;

    #[derive(Debug)]
    struct Busy;
    impl HasErrorKind for Busy {
        fn kind(&self) -> ErrorKind {
            ErrorKind::Conflict
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    #[test]
    fn records_ok_error_and_cancelled_outcomes() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let rt = runtime();
        metrics::with_local_recorder(&recorder, || {
            rt.block_on(async {
                let v = async {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    7
                }
                .timed("unit.sleep")
                .await;
                assert_eq!(v, 7);
                let r: Result<(), Busy> = async { Err(Busy) }.try_timed("unit.busy").await;
                assert!(r.is_err());
                // Polled once, then dropped by the timeout: cancelled.
                let slow = std::future::pending::<()>().timed("unit.slow");
                assert!(
                    tokio::time::timeout(Duration::from_millis(5), slow)
                        .await
                        .is_err()
                );
                // Never polled: nothing recorded.
                drop(async {}.timed("unit.never"));
                let labels = [(names::LABEL_STEP, "s1")];
                timed(names::SAGA_STEP_SECONDS, &labels, async {}).await;
            })
        });
        let text = handle.render();
        assert!(
            text.contains(
                "vextrus_operation_seconds_count{operation=\"unit.sleep\",outcome=\"ok\"} 1"
            ),
            "{text}"
        );
        let sum_line = text
            .lines()
            .find(|l| l.starts_with("vextrus_operation_seconds_sum{operation=\"unit.sleep\""))
            .unwrap();
        let sum: f64 = sum_line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(sum >= 0.02, "{sum_line}");
        assert!(text.contains(
            "vextrus_operation_seconds_count{operation=\"unit.busy\",outcome=\"conflict\"} 1"
        ));
        assert!(text.contains(
            "vextrus_operation_seconds_count{operation=\"unit.slow\",outcome=\"cancelled\"} 1"
        ));
        assert!(!text.contains("unit.never"));
        assert!(text.contains("vextrus_saga_step_seconds_count{step=\"s1\",outcome=\"ok\"} 1"));
    }
}
