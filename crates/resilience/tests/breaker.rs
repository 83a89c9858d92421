//! Circuit breaker behaviour under a paused tokio clock.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestError;
use tokio::time::{advance, sleep};
use tower::{ServiceBuilder, ServiceExt, service_fn};
use vextrus_kernel::ErrorKind;
use vextrus_resilience::{
    BreakerRegistry, CircuitBreaker, CircuitBreakerConfig, CircuitBreakerLayer, CircuitState,
    ResilienceError, SlidingWindow,
};

async fn fail(breaker: &CircuitBreaker) {
    let result = breaker
        .call(async { Err::<(), _>(TestError::transient()) })
        .await;
    assert!(matches!(result, Err(ResilienceError::Inner(_))));
}

async fn succeed(breaker: &CircuitBreaker) {
    breaker
        .call(async { Ok::<_, TestError>(()) })
        .await
        .unwrap();
}

/// Window of 10 calls, judged from 5 calls on, opening at 50 % failures.
fn config() -> CircuitBreakerConfig {
    CircuitBreakerConfig::new()
        .sliding_window(SlidingWindow::Count(10))
        .minimum_calls(5)
        .failure_rate_threshold(50.0)
        .wait_duration_in_open(Duration::from_secs(10))
        .permitted_calls_in_half_open(2)
}

#[tokio::test(start_paused = true)]
async fn does_not_open_before_the_minimum_number_of_calls() {
    let breaker = CircuitBreaker::new("min-calls", config());
    for _ in 0..4 {
        fail(&breaker).await;
    }
    // 100 % failures, but only 4 of the 5 calls needed to judge.
    assert_eq!(breaker.state(), CircuitState::Closed);
    assert_eq!(breaker.snapshot().failures, 4);
    fail(&breaker).await;
    assert_eq!(breaker.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn opens_exactly_at_the_failure_rate_threshold() {
    let breaker = CircuitBreaker::new("threshold", config());
    // 3 successes and 2 failures: 5 calls judged at 40 %, below 50 %.
    for _ in 0..3 {
        succeed(&breaker).await;
    }
    fail(&breaker).await;
    fail(&breaker).await;
    assert_eq!(breaker.state(), CircuitState::Closed);
    // 3 failures of 6 calls: 50 %, at the threshold.
    fail(&breaker).await;
    assert_eq!(breaker.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn rejects_while_open_with_a_retry_hint_and_without_running_the_call() {
    let breaker = CircuitBreaker::new("rejects", config());
    for _ in 0..5 {
        fail(&breaker).await;
    }
    assert_eq!(breaker.state(), CircuitState::Open);
    advance(Duration::from_secs(4)).await;

    let mut ran = false;
    let result = breaker
        .call(async {
            ran = true;
            Ok::<_, TestError>(())
        })
        .await;
    assert!(!ran, "an open breaker must not run the call");
    match result {
        Err(ResilienceError::CircuitOpen {
            name,
            state,
            retry_in,
        }) => {
            assert_eq!(&*name, "rejects");
            assert_eq!(state, CircuitState::Open);
            assert_eq!(retry_in, Duration::from_secs(6));
        }
        other => panic!("expected CircuitOpen, got {other:?}"),
    }
    use vextrus_kernel::HasErrorKind;
    let refused: ResilienceError<TestError> = breaker
        .call(async { Ok::<_, TestError>(()) })
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Transient);
    assert_eq!(refused.retry_after(), Some(Duration::from_secs(6)));
    assert_eq!(breaker.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn successful_trials_close_it() {
    let breaker = CircuitBreaker::new("closes", config());
    let mut transitions = breaker.subscribe();
    for _ in 0..5 {
        fail(&breaker).await;
    }
    advance(Duration::from_secs(10)).await;
    succeed(&breaker).await;
    assert_eq!(breaker.state(), CircuitState::HalfOpen);
    succeed(&breaker).await;
    assert_eq!(breaker.state(), CircuitState::Closed);
    // The window starts empty again: one failure does not reopen it.
    fail(&breaker).await;
    assert_eq!(breaker.state(), CircuitState::Closed);

    let seen: Vec<(CircuitState, CircuitState)> =
        std::iter::from_fn(|| transitions.try_recv().ok())
            .map(|t| (t.from, t.to))
            .collect();
    assert_eq!(
        seen,
        vec![
            (CircuitState::Closed, CircuitState::Open),
            (CircuitState::Open, CircuitState::HalfOpen),
            (CircuitState::HalfOpen, CircuitState::Closed),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_trial_reopens_it_for_another_wait() {
    let breaker = CircuitBreaker::new("reopens", config().permitted_calls_in_half_open(1));
    for _ in 0..5 {
        fail(&breaker).await;
    }
    advance(Duration::from_secs(10)).await;
    fail(&breaker).await;
    assert_eq!(breaker.state(), CircuitState::Open);
    match breaker.call(async { Ok::<_, TestError>(()) }).await {
        Err(ResilienceError::CircuitOpen { retry_in, .. }) => {
            assert_eq!(retry_in, Duration::from_secs(10));
        }
        other => panic!("expected CircuitOpen, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_only_the_permitted_trials() {
    let breaker = Arc::new(CircuitBreaker::new("trials", config()));
    for _ in 0..5 {
        fail(&breaker).await;
    }
    advance(Duration::from_secs(10)).await;
    let first = breaker.try_acquire().unwrap();
    let second = breaker.try_acquire().unwrap();
    match breaker.try_acquire() {
        Err(ResilienceError::CircuitOpen {
            state, retry_in, ..
        }) => {
            assert_eq!(state, CircuitState::HalfOpen);
            assert_eq!(retry_in, Duration::ZERO);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    first.record_success();
    assert_eq!(breaker.state(), CircuitState::HalfOpen);
    second.record_failure();
    // One of two trials failed: 50 %, at the threshold, so it reopens.
    assert_eq!(breaker.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn slow_calls_count_when_configured() {
    let slow_config = config()
        .slow_call_duration(Duration::from_millis(500))
        .slow_call_rate_threshold(60.0);
    let watched = CircuitBreaker::new("slow-watched", slow_config);
    let unwatched = CircuitBreaker::new("slow-unwatched", config());

    for breaker in [&watched, &unwatched] {
        for _ in 0..5 {
            breaker
                .call(async {
                    sleep(Duration::from_secs(1)).await;
                    Ok::<_, TestError>(())
                })
                .await
                .unwrap();
        }
    }
    // Five successful but slow calls: 100 % slow.
    assert_eq!(watched.state(), CircuitState::Open);
    assert_eq!(unwatched.state(), CircuitState::Closed);
    assert_eq!(unwatched.snapshot().slow_calls, 0);
}

#[tokio::test(start_paused = true)]
async fn calls_at_the_slow_limit_are_not_slow() {
    let breaker = CircuitBreaker::new(
        "slow-limit",
        config()
            .slow_call_duration(Duration::from_millis(500))
            .slow_call_rate_threshold(50.0),
    );
    for _ in 0..5 {
        breaker
            .call(async {
                sleep(Duration::from_millis(500)).await;
                Ok::<_, TestError>(())
            })
            .await
            .unwrap();
    }
    assert_eq!(breaker.state(), CircuitState::Closed);
    assert_eq!(breaker.snapshot().slow_calls, 0);
}

#[tokio::test(start_paused = true)]
async fn caller_errors_do_not_count_as_downstream_failures() {
    let breaker = CircuitBreaker::new("caller-errors", config());
    for kind in [
        ErrorKind::Validation,
        ErrorKind::Conflict,
        ErrorKind::NotFound,
        ErrorKind::Validation,
        ErrorKind::Validation,
        ErrorKind::Validation,
    ] {
        let result = breaker
            .call(async { Err::<(), _>(TestError::of(kind)) })
            .await;
        assert_eq!(result.unwrap_err().into_inner(), Some(TestError::of(kind)));
    }
    assert_eq!(breaker.state(), CircuitState::Closed);
    let snapshot = breaker.snapshot();
    assert_eq!((snapshot.calls, snapshot.failures), (6, 0));

    // Fatal errors do count.
    for _ in 0..6 {
        let _ = breaker
            .call(async { Err::<(), _>(TestError::of(ErrorKind::Fatal)) })
            .await;
    }
    assert_eq!(breaker.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn time_window_only_judges_the_last_seconds() {
    let breaker = CircuitBreaker::new(
        "time-window",
        CircuitBreakerConfig::new()
            .sliding_window(SlidingWindow::Time(Duration::from_secs(10)))
            .minimum_calls(4)
            .failure_rate_threshold(50.0),
    );
    for _ in 0..3 {
        fail(&breaker).await;
    }
    // Those failures leave the window before the fourth call arrives.
    advance(Duration::from_secs(11)).await;
    fail(&breaker).await;
    assert_eq!(breaker.state(), CircuitState::Closed);
    assert_eq!(breaker.snapshot().calls, 1);
    for _ in 0..3 {
        fail(&breaker).await;
    }
    assert_eq!(breaker.state(), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn outcomes_from_before_a_transition_are_ignored() {
    let breaker = CircuitBreaker::new("stale", config());
    let early = breaker.try_acquire().unwrap();
    for _ in 0..5 {
        fail(&breaker).await;
    }
    assert_eq!(breaker.state(), CircuitState::Open);
    advance(Duration::from_secs(10)).await;
    succeed(&breaker).await;
    assert_eq!(breaker.state(), CircuitState::HalfOpen);
    // Admitted while closed, finished in half-open: not a trial.
    early.record_failure();
    assert_eq!(breaker.snapshot().calls, 1);
    assert_eq!(breaker.state(), CircuitState::HalfOpen);
}

#[test]
fn registry_hands_every_caller_the_same_breaker() {
    let registry = BreakerRegistry::new(config());
    let a = registry.get("inventory");
    let b =
        registry.get_or_create_with("inventory", || CircuitBreakerConfig::new().minimum_calls(1));
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(b.config().get_minimum_calls(), 5, "the first config wins");
    assert!(registry.find("payments").is_none());
    registry.get("payments");
    let names: Vec<String> = registry.all().iter().map(|b| b.name().to_owned()).collect();
    assert_eq!(names, ["inventory", "payments"]);

    let global = BreakerRegistry::global().get("registry-test");
    assert!(Arc::ptr_eq(
        &global,
        &BreakerRegistry::global().find("registry-test").unwrap()
    ));
}

#[tokio::test(start_paused = true)]
async fn tower_layer_records_outcomes_and_refuses_while_open() {
    let breaker = Arc::new(CircuitBreaker::new("tower-breaker", config()));
    let svc = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(Arc::clone(&breaker)))
        .service(service_fn(|ok: bool| async move {
            if ok {
                Ok(())
            } else {
                Err(TestError::transient())
            }
        }));
    for _ in 0..5 {
        let result = svc.clone().oneshot(false).await;
        assert!(matches!(result, Err(ResilienceError::Inner(_))));
    }
    assert_eq!(breaker.state(), CircuitState::Open);
    let refused = svc.clone().oneshot(true).await;
    assert!(matches!(refused, Err(ResilienceError::CircuitOpen { .. })));

    advance(Duration::from_secs(10)).await;
    svc.clone().oneshot(true).await.unwrap();
    svc.oneshot(true).await.unwrap();
    assert_eq!(breaker.state(), CircuitState::Closed);
}
