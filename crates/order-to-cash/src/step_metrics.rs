//! Where a run's time went, per saga step, from the orchestrator's own
//! metrics.
//!
//! The saga engine records every step attempt in the
//! [`vextrus_saga_step_seconds`](vextrus_telemetry::names::SAGA_STEP_SECONDS)
//! histogram, labelled by `step` and `outcome` (local steps timed around the
//! call, remote ones from the command to its reply). [`StepTimings`] collects
//! that histogram per (`step`, `outcome`) and answers p50/p99 per step.
//!
//! It is a `metrics` [`Recorder`] layer: [`StepTimings::layer`] wraps any
//! other recorder (the Prometheus one a service installs) and forwards every
//! call to it, so both see the same samples;
//! [`StepTimings::recorder`] is the layer alone. Install it for a run with
//! [`StepTimings::install_global`] (once per process, when nothing else is
//! installed), beside Prometheus with `vextrus_telemetry::init_layered`
//! (`export` feature): `init_layered(config, Box::new(move |prometheus|
//! Box::new(timings.layer(prometheus))))`, or for one thread with
//! [`metrics::set_default_local_recorder`].
//!
//! Each (`step`, `outcome`) keeps a log-bucketed sketch, not the samples:
//! memory is bounded (at most a few thousand buckets, in practice tens) and a
//! percentile is at most 1% above the true sample it stands for, never above
//! the largest sample.
//!
//! ```
//! use std::time::Duration;
//! use vextrus_order_to_cash::step_metrics::StepTimings;
//! use vextrus_telemetry::names;
//!
//! let timings = StepTimings::new();
//! let recorder = timings.recorder();
//! metrics::with_local_recorder(&recorder, || {
//!     for ms in 1..=100u64 {
//!         metrics::histogram!(names::SAGA_STEP_SECONDS, "step" => "reserve_inventory", "outcome" => "ok")
//!             .record(Duration::from_millis(ms));
//!     }
//! });
//! let reserve = timings.get("reserve_inventory", "ok").unwrap();
//! assert_eq!(reserve.count, 100);
//! assert!(reserve.p50 >= Duration::from_millis(50) && reserve.p50 <= Duration::from_micros(50_500));
//! assert!(reserve.p99 >= Duration::from_millis(99) && reserve.p99 <= Duration::from_millis(100));
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, NoopRecorder, Recorder,
    SharedString, Unit,
};
use vextrus_telemetry::names;

/// Growth between bucket bounds: a reported percentile is at most 1% above
/// the sample it stands for.
const GAMMA: f64 = 1.01;

/// The samples of one (step, outcome), in log buckets.
#[derive(Debug, Clone, Default)]
struct Sketch {
    /// Bucket `i` holds samples in `(GAMMA^(i-1), GAMMA^i]` seconds.
    buckets: BTreeMap<i32, u64>,
    /// Samples of zero (or below: clock skew) seconds.
    zeros: u64,
    count: u64,
    sum: f64,
    max: f64,
}

impl Sketch {
    fn record(&mut self, seconds: f64) {
        if !seconds.is_finite() {
            return;
        }
        self.count += 1;
        if seconds <= 0.0 {
            self.zeros += 1;
            return;
        }
        self.sum += seconds;
        self.max = self.max.max(seconds);
        // ceil(log_gamma(v)); clamped to keep tiny and huge values in range.
        let index = (seconds.ln() / GAMMA.ln()).ceil().clamp(-5_000.0, 5_000.0) as i32;
        *self.buckets.entry(index).or_insert(0) += 1;
    }

    /// The value at percentile `p` (0-100): the upper bound of the bucket
    /// holding the sample of rank `ceil(p/100 * count)`, capped at the
    /// largest sample.
    fn percentile(&self, p: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let rank = rank.min(self.count);
        if rank <= self.zeros {
            return 0.0;
        }
        let mut seen = self.zeros;
        for (&index, &n) in &self.buckets {
            seen += n;
            if seen >= rank {
                return GAMMA.powi(index).min(self.max);
            }
        }
        self.max
    }
}

fn duration(seconds: f64) -> Duration {
    Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX)
}

/// The timing of one saga step with one outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepTiming {
    /// The step's name (the `step` label).
    pub step: String,
    /// `ok`, `conflict`, `error` or `cancelled` (the `outcome` label,
    /// [`vextrus_telemetry::Outcome`]).
    pub outcome: String,
    /// How many attempts were recorded.
    pub count: u64,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// The longest.
    pub max: Duration,
    /// All of them together.
    pub total: Duration,
}

type Sketches = BTreeMap<(String, String), Sketch>;

/// Collects the step-duration histogram per (`step`, `outcome`); cheap to
/// clone (clones share the samples). See the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct StepTimings {
    sketches: Arc<Mutex<Sketches>>,
}

impl StepTimings {
    /// An empty collector.
    pub fn new() -> Self {
        Self::default()
    }

    /// A recorder that collects into `self` and records nothing else.
    pub fn recorder(&self) -> StepTimingsRecorder<NoopRecorder> {
        self.layer(NoopRecorder)
    }

    /// A recorder that collects into `self` and forwards every call,
    /// unchanged, to `inner` (such as the Prometheus recorder), so both
    /// coexist behind one global recorder:
    ///
    /// ```
    /// use vextrus_order_to_cash::step_metrics::StepTimings;
    ///
    /// let timings = StepTimings::new();
    /// let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    /// let handle = prometheus.handle();
    /// let layered = timings.layer(prometheus);
    /// metrics::with_local_recorder(&layered, || {
    ///     vextrus_telemetry::record::saga_step(
    ///         "order_to_cash",
    ///         "post_invoice",
    ///         std::time::Duration::from_millis(3),
    ///         vextrus_telemetry::record::Outcome::Ok,
    ///     );
    /// });
    /// assert_eq!(timings.get("post_invoice", "ok").unwrap().count, 1);
    /// assert!(handle.render().contains("vextrus_saga_step_seconds"));
    /// ```
    pub fn layer<R: Recorder>(&self, inner: R) -> StepTimingsRecorder<R> {
        StepTimingsRecorder {
            timings: self.clone(),
            inner,
        }
    }

    /// Installs [`StepTimings::recorder`] as the process's global recorder.
    /// Fails (returning nothing installed) when a global recorder is already
    /// set; then wrap that one with [`StepTimings::layer`] where it is built.
    pub fn install_global(&self) -> Result<(), StepTimingsError> {
        metrics::set_global_recorder(self.recorder())
            .map_err(|_| StepTimingsError::RecorderAlreadySet)
    }

    fn lock(&self) -> MutexGuard<'_, Sketches> {
        // A panic while recording leaves a sketch at worst one sample short.
        self.sketches.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, step: &str, outcome: &str, seconds: f64) {
        if !seconds.is_finite() {
            return;
        }
        self.lock()
            .entry((step.to_owned(), outcome.to_owned()))
            .or_default()
            .record(seconds);
    }

    /// The timing of `step` with `outcome`, if any attempt was recorded.
    pub fn get(&self, step: &str, outcome: &str) -> Option<StepTiming> {
        let sketches = self.lock();
        sketches
            .get(&(step.to_owned(), outcome.to_owned()))
            .map(|s| timing(step, outcome, s))
    }

    /// Every (step, outcome) recorded, sorted by step then outcome.
    pub fn all(&self) -> Vec<StepTiming> {
        self.lock()
            .iter()
            .map(|((step, outcome), s)| timing(step, outcome, s))
            .collect()
    }

    /// The steps named in `order` (such as
    /// [`crate::saga::STEPS`]), each with its outcomes sorted, then any
    /// other recorded step.
    pub fn in_order(&self, order: &[&str]) -> Vec<StepTiming> {
        let mut all = self.all();
        let rank = |step: &str| order.iter().position(|s| *s == step).unwrap_or(order.len());
        all.sort_by(|a, b| {
            (rank(&a.step), &a.step, &a.outcome).cmp(&(rank(&b.step), &b.step, &b.outcome))
        });
        all
    }

    /// Forgets every sample.
    pub fn reset(&self) {
        self.lock().clear();
    }
}

fn timing(step: &str, outcome: &str, s: &Sketch) -> StepTiming {
    StepTiming {
        step: step.to_owned(),
        outcome: outcome.to_owned(),
        count: s.count,
        p50: duration(s.percentile(50.0)),
        p99: duration(s.percentile(99.0)),
        max: duration(s.max),
        total: duration(s.sum),
    }
}

/// What can go wrong with [`StepTimings`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StepTimingsError {
    /// A global `metrics` recorder was already installed.
    #[error("a global metrics recorder is already installed: wrap it with StepTimings::layer")]
    RecorderAlreadySet,
}

impl vextrus_kernel::HasErrorKind for StepTimingsError {
    fn kind(&self) -> vextrus_kernel::ErrorKind {
        vextrus_kernel::ErrorKind::Fatal
    }
}

/// The `metrics` recorder of a [`StepTimings`]: the
/// `vextrus_saga_step_seconds` histogram is collected (and forwarded), every
/// other call only forwarded to `R`.
#[derive(Debug)]
pub struct StepTimingsRecorder<R> {
    timings: StepTimings,
    inner: R,
}

impl<R> StepTimingsRecorder<R> {
    /// The collector this recorder fills.
    pub fn timings(&self) -> &StepTimings {
        &self.timings
    }
}

/// One (step, outcome)'s histogram handle: records into the sketch and into
/// the inner recorder's handle.
struct Tee {
    timings: StepTimings,
    step: String,
    outcome: String,
    inner: Histogram,
}

impl HistogramFn for Tee {
    fn record(&self, value: f64) {
        self.inner.record(value);
        self.timings.record(&self.step, &self.outcome, value);
    }
}

impl<R: Recorder> Recorder for StepTimingsRecorder<R> {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_histogram(key, unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.inner.register_counter(key, metadata)
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.inner.register_gauge(key, metadata)
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        let inner = self.inner.register_histogram(key, metadata);
        if key.name() != names::SAGA_STEP_SECONDS {
            return inner;
        }
        let label = |name: &str| {
            key.labels()
                .find(|l| l.key() == name)
                .map_or_else(String::new, |l| l.value().to_owned())
        };
        Histogram::from_arc(Arc::new(Tee {
            timings: self.timings.clone(),
            step: label(names::LABEL_STEP),
            outcome: label(names::LABEL_OUTCOME),
            inner,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vextrus_telemetry::record::{Outcome, saga_step};

    #[test]
    fn real_histogram_calls_yield_p50_and_p99_per_step_and_outcome() {
        let timings = StepTimings::new();
        let recorder = timings.recorder();
        metrics::with_local_recorder(&recorder, || {
            // reserve: 1..=1000 ms, ok; two of 2 s cancelled (timed out)
            for ms in 1..=1_000u64 {
                saga_step(
                    "order_to_cash",
                    "reserve_inventory",
                    Duration::from_millis(ms),
                    Outcome::Ok,
                );
            }
            for _ in 0..2 {
                saga_step(
                    "order_to_cash",
                    "reserve_inventory",
                    Duration::from_secs(2),
                    Outcome::Cancelled,
                );
            }
            // validate: always 4 ms, through the macro directly
            for _ in 0..10 {
                metrics::histogram!(
                    names::SAGA_STEP_SECONDS,
                    names::LABEL_SAGA_TYPE => "order_to_cash",
                    names::LABEL_STEP => "validate_order",
                    names::LABEL_OUTCOME => "ok"
                )
                .record(0.004);
            }
            // other metrics are not collected
            metrics::histogram!(names::EVENT_APPEND_SECONDS).record(9.0);
            metrics::histogram!(names::SAGA_STEP_SECONDS, "step" => "x").record(f64::NAN);
        });

        let reserve = timings.get("reserve_inventory", "ok").unwrap();
        assert_eq!(reserve.count, 1_000);
        // the sample of rank ceil(p * n), or the next one (float rounding
        // of p * n), reported at most 1% high
        let within = |got: Duration, want_ms: f64| {
            let got = got.as_secs_f64() * 1e3;
            got >= want_ms && got <= (want_ms + 1.0) * GAMMA
        };
        assert!(within(reserve.p50, 500.0), "{reserve:?}");
        assert!(within(reserve.p99, 990.0), "{reserve:?}");
        assert_eq!(reserve.max, Duration::from_secs(1));
        assert!(
            (reserve.total.as_secs_f64() - 500.5).abs() < 1e-6,
            "{reserve:?}"
        );

        let timeouts = timings.get("reserve_inventory", "cancelled").unwrap();
        assert_eq!(
            (timeouts.count, timeouts.p50, timeouts.p99),
            (2, Duration::from_secs(2), Duration::from_secs(2))
        );

        let validate = timings.get("validate_order", "ok").unwrap();
        assert_eq!(validate.p50, Duration::from_millis(4));
        assert_eq!(validate.p99, Duration::from_millis(4));

        // NaN is not a sample; the event-append histogram is not a step.
        assert!(timings.get("x", "").is_none());
        let steps: Vec<_> = timings
            .in_order(&crate::saga::STEPS)
            .into_iter()
            .map(|t| (t.step, t.outcome))
            .collect();
        assert_eq!(
            steps,
            vec![
                ("validate_order".to_owned(), "ok".to_owned()),
                ("reserve_inventory".to_owned(), "cancelled".to_owned()),
                ("reserve_inventory".to_owned(), "ok".to_owned()),
            ]
        );
        timings.reset();
        assert!(timings.all().is_empty());
    }

    #[test]
    fn the_layer_forwards_everything_to_the_inner_recorder() {
        let timings = StepTimings::new();
        let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = prometheus.handle();
        let layered = timings.layer(prometheus);
        metrics::with_local_recorder(&layered, || {
            saga_step(
                "order_to_cash",
                "capture_payment",
                Duration::from_millis(7),
                Outcome::Error,
            );
            metrics::counter!("o2c_test_total").increment(3);
        });
        let text = handle.render();
        assert!(
            text.contains(
                "vextrus_saga_step_seconds_count{saga_type=\"order_to_cash\",step=\"capture_payment\",outcome=\"error\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("o2c_test_total 3"), "{text}");
        let capture = timings.get("capture_payment", "error").unwrap();
        assert_eq!(capture.count, 1);
        assert_eq!(capture.p99, Duration::from_millis(7));
        assert!(layered.timings().get("capture_payment", "ok").is_none());
    }

    #[test]
    fn empty_and_zero_samples() {
        let mut s = Sketch::default();
        assert_eq!(s.percentile(50.0), 0.0);
        s.record(0.0);
        s.record(0.0);
        s.record(1.0);
        assert_eq!(s.count, 3);
        assert_eq!(s.percentile(50.0), 0.0);
        assert_eq!(s.percentile(99.0), 1.0);
    }
}
