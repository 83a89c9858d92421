//! The breaker's state changes and call outcomes reach a metrics recorder
//! under the names documented in `vextrus_resilience::metrics`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use vextrus_resilience::metrics as names;
use vextrus_resilience::{CircuitBreaker, CircuitBreakerConfig, CircuitState, SlidingWindow};

/// Keeps every counter and gauge as an atomic, keyed `name{label=value,...}`.
#[derive(Default)]
struct TestRecorder {
    values: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl TestRecorder {
    fn slot(&self, key: &Key) -> Arc<AtomicU64> {
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        let id = format!("{}{{{}}}", key.name(), labels.join(","));
        Arc::clone(self.values.lock().unwrap().entry(id).or_default())
    }

    fn counter(&self, id: &str) -> u64 {
        self.values
            .lock()
            .unwrap()
            .get(id)
            .map_or(0, |v| v.load(Ordering::SeqCst))
    }

    fn gauge(&self, id: &str) -> f64 {
        f64::from_bits(self.counter(id))
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.slot(key))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.slot(key))
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[test]
fn breaker_reports_state_outcomes_and_transitions() {
    let recorder = TestRecorder::default();
    metrics::with_local_recorder(&recorder, || {
        let breaker = CircuitBreaker::new(
            "metered",
            CircuitBreakerConfig::new()
                .sliding_window(SlidingWindow::Count(4))
                .minimum_calls(2)
                .wait_duration_in_open(Duration::from_secs(3600)),
        );
        let state = format!("{}{{breaker=metered}}", names::BREAKER_STATE);
        assert_eq!(recorder.gauge(&state), 0.0);

        breaker.try_acquire().unwrap().record_success();
        breaker.try_acquire().unwrap().record_failure();
        assert_eq!(breaker.state(), CircuitState::Open);
        assert!(breaker.try_acquire().is_err());

        let calls = |outcome: &str| {
            recorder.counter(&format!(
                "{}{{breaker=metered,outcome={outcome}}}",
                names::BREAKER_CALLS_TOTAL
            ))
        };
        assert_eq!(calls("success"), 1);
        assert_eq!(calls("failure"), 1);
        assert_eq!(calls("rejected"), 1);
        assert_eq!(recorder.gauge(&state), 1.0);
        assert_eq!(
            recorder.counter(&format!(
                "{}{{breaker=metered,from=closed,to=open}}",
                names::BREAKER_TRANSITIONS_TOTAL
            )),
            1
        );
    });
}
