//! A circuit breaker's state changes are logged: opening at `warn`, the rest
//! at `info`, each naming the breaker, the states and the rates that decided.
//! (Events and metrics are checked in `breaker.rs` and `metrics.rs`.)

mod common;

use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TestError;
use tokio::time::advance;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};
use vextrus_resilience::{CircuitBreaker, CircuitBreakerConfig, CircuitState, SlidingWindow};

/// One log event: its level and its fields as `name=value` pairs.
#[derive(Debug, Clone)]
struct Logged {
    level: Level,
    fields: String,
}

/// A subscriber that keeps every event from this crate.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Logged>>>);

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }
}

impl Subscriber for Capture {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.target().starts_with("vextrus_resilience")
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        self.0.lock().unwrap().push(Logged {
            level: *event.metadata().level(),
            fields: fields.0,
        });
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

#[tokio::test(start_paused = true)]
async fn every_transition_is_logged_with_its_breaker_states_and_rates() {
    let capture = Capture::default();
    let _default = tracing::subscriber::set_default(capture.clone());

    let breaker = CircuitBreaker::new(
        "ledger-logs",
        CircuitBreakerConfig::new()
            .sliding_window(SlidingWindow::Count(4))
            .minimum_calls(4)
            .failure_rate_threshold(50.0)
            .wait_duration_in_open(Duration::from_secs(5))
            .permitted_calls_in_half_open(1),
    );
    for ok in [true, false, true, false] {
        let _ = breaker
            .call(async move {
                if ok {
                    Ok(())
                } else {
                    Err(TestError::transient())
                }
            })
            .await;
    }
    assert_eq!(breaker.state(), CircuitState::Open);
    advance(Duration::from_secs(5)).await;
    breaker
        .call(async { Ok::<_, TestError>(()) })
        .await
        .unwrap();
    assert_eq!(breaker.state(), CircuitState::Closed);

    let logged: Vec<Logged> = capture
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.fields.contains("circuit breaker"))
        .cloned()
        .collect();
    assert_eq!(logged.len(), 3, "{logged:#?}");

    let opened = &logged[0];
    assert_eq!(opened.level, Level::WARN);
    for part in [
        "message=circuit breaker opened",
        "breaker=ledger-logs",
        "from=closed",
        "to=open",
        "failure_rate=Some(50.0)",
        "wait=5s",
    ] {
        assert!(opened.fields.contains(part), "{part} not in {opened:?}");
    }

    let half_open = &logged[1];
    assert_eq!(half_open.level, Level::INFO);
    for part in [
        "message=circuit breaker changed state",
        "breaker=ledger-logs",
        "from=open",
        "to=half_open",
        // The wait ran out: no rate decided this one.
        "failure_rate=None",
    ] {
        assert!(
            half_open.fields.contains(part),
            "{part} not in {half_open:?}"
        );
    }

    let closed = &logged[2];
    assert_eq!(closed.level, Level::INFO);
    for part in [
        "breaker=ledger-logs",
        "from=half_open",
        "to=closed",
        "failure_rate=Some(0.0)",
    ] {
        assert!(closed.fields.contains(part), "{part} not in {closed:?}");
    }
}
