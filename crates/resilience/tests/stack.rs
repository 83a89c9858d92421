//! The composed stack: breaker(retry(timeout(bulkhead(call)))).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::TestError;
use tokio::time::{Instant, sleep};
use tower::{ServiceBuilder, ServiceExt, service_fn};
use vextrus_kernel::{ErrorKind, HasErrorKind};
use vextrus_resilience::{
    Bulkhead, BulkheadLayer, CircuitBreaker, CircuitBreakerConfig, CircuitBreakerLayer,
    CircuitState, ResilienceError, ResilienceStack, RetryLayer, RetryPolicy, SlidingWindow,
    TimeoutLayer,
};

fn breaker(name: &str, minimum_calls: usize) -> Arc<CircuitBreaker> {
    Arc::new(CircuitBreaker::new(
        name,
        CircuitBreakerConfig::new()
            .sliding_window(SlidingWindow::Count(10))
            .minimum_calls(minimum_calls)
            .wait_duration_in_open(Duration::from_secs(30)),
    ))
}

#[tokio::test(start_paused = true)]
async fn the_breaker_sees_one_outcome_per_retried_call() {
    let breaker = breaker("one-outcome", 3);
    let stack = ResilienceStack::new()
        .breaker(Arc::clone(&breaker))
        .retry(RetryPolicy::new().max_attempts(4).without_max_elapsed());
    let calls = AtomicUsize::new(0);
    let result: Result<(), _> = stack
        .call(|| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(TestError::transient()) }
        })
        .await;
    assert!(matches!(result, Err(ResilienceError::Inner(_))));
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    // Four failed attempts, one failed call: below the 3 calls needed.
    assert_eq!(breaker.snapshot().calls, 1);
    assert_eq!(breaker.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_refuses_before_any_attempt() {
    let breaker = breaker("refuses-first", 1);
    breaker.try_acquire().unwrap().record_failure();
    assert_eq!(breaker.state(), CircuitState::Open);
    let stack = ResilienceStack::new()
        .breaker(breaker)
        .retry(RetryPolicy::new().max_attempts(5));
    let calls = AtomicUsize::new(0);
    let started = Instant::now();
    let result = stack
        .call(|| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, TestError>(()) }
        })
        .await;
    assert!(matches!(result, Err(ResilienceError::CircuitOpen { .. })));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn each_attempt_is_timed_out_on_its_own_and_timeouts_are_retried() {
    let stack = ResilienceStack::new()
        .retry(
            RetryPolicy::new()
                .min_delay(Duration::ZERO)
                .max_delay(Duration::ZERO)
                .max_attempts(3),
        )
        .timeout(Duration::from_secs(1));
    let calls = AtomicUsize::new(0);
    let started = Instant::now();
    let result = stack
        .call(|| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                // The first two attempts hang; the third answers in 900 ms,
                // which fits its own limit though not what is left of a
                // shared one.
                let wait = if n < 2 { 60_000 } else { 900 };
                sleep(Duration::from_millis(wait)).await;
                Ok::<_, TestError>(n)
            }
        })
        .await;
    assert_eq!(result.unwrap(), 2);
    assert_eq!(started.elapsed(), Duration::from_millis(2_900));
}

#[tokio::test(start_paused = true)]
async fn a_call_that_keeps_timing_out_fails_with_a_transient_timeout() {
    let breaker = breaker("keeps-timing-out", 1);
    let stack = ResilienceStack::new()
        .breaker(Arc::clone(&breaker))
        .retry(RetryPolicy::new().max_attempts(2))
        .timeout(Duration::from_millis(50));
    let result = stack
        .call(|| async {
            sleep(Duration::from_secs(10)).await;
            Ok::<_, TestError>(())
        })
        .await;
    let error = result.unwrap_err();
    assert!(matches!(error, ResilienceError::Timeout { .. }));
    assert_eq!(error.kind(), ErrorKind::Transient);
    assert_eq!(
        breaker.state(),
        CircuitState::Open,
        "a timeout counts against the downstream"
    );
}

#[tokio::test(start_paused = true)]
async fn the_bulkhead_slot_is_not_held_while_the_retry_sleeps() {
    let bulkhead = Bulkhead::new(1, 0);
    let stack = ResilienceStack::new()
        .retry(
            RetryPolicy::new()
                .min_delay(Duration::from_secs(10))
                .max_delay(Duration::from_secs(10))
                .max_attempts(2)
                .without_max_elapsed(),
        )
        .bulkhead(bulkhead.clone());
    let first_failed = Arc::new(tokio::sync::Notify::new());
    let signal = Arc::clone(&first_failed);
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let retrying = tokio::spawn(async move {
        stack
            .call(|| {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let signal = Arc::clone(&signal);
                async move {
                    if n == 0 {
                        signal.notify_one();
                        Err(TestError::transient())
                    } else {
                        Ok(n)
                    }
                }
            })
            .await
    });
    first_failed.notified().await;
    tokio::task::yield_now().await;
    // The retrying call is asleep in its backoff: its slot is free.
    assert_eq!(bulkhead.available(), 1);
    assert_eq!(retrying.await.unwrap().unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn validation_errors_pass_through_unretried_and_do_not_trip_the_breaker() {
    let breaker = breaker("validation", 1);
    let stack = ResilienceStack::new()
        .breaker(Arc::clone(&breaker))
        .retry(RetryPolicy::new().max_attempts(5))
        .timeout(Duration::from_secs(1))
        .bulkhead(Bulkhead::new(4, 4));
    let calls = AtomicUsize::new(0);
    let error = stack
        .call(|| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(TestError::of(ErrorKind::Validation)) }
        })
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Validation);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(breaker.state(), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn tower_layers_in_the_documented_order() {
    let breaker = breaker("tower-order", 3);
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let svc = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(Arc::clone(&breaker)))
        .layer(RetryLayer::new(RetryPolicy::new().max_attempts(3)))
        .layer(TimeoutLayer::new(Duration::from_millis(100)))
        .layer(BulkheadLayer::new(Bulkhead::new(2, 2)))
        .service(service_fn(move |hang: bool| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if hang {
                    sleep(Duration::from_secs(60)).await;
                }
                Ok::<_, TestError>("done")
            }
        }));
    assert_eq!(svc.clone().oneshot(false).await.unwrap(), "done");
    let error = svc.clone().oneshot(true).await.unwrap_err();
    // Breaker(Retry(Timeout(..))): the timeout is two levels in.
    assert!(matches!(error.flatten(), ResilienceError::Timeout { .. }));
    assert_eq!(calls.load(Ordering::SeqCst), 1 + 3);
    // One outcome per call, not per attempt: 2 of the 3 calls needed.
    assert_eq!(breaker.snapshot().calls, 2);
    assert_eq!(breaker.state(), CircuitState::Closed);
    assert!(svc.clone().oneshot(true).await.is_err());
    // 2 failed calls of 3: 67 %, over the 50 % threshold.
    assert_eq!(breaker.state(), CircuitState::Open);
    let refused = svc.oneshot(false).await.unwrap_err();
    assert!(matches!(refused, ResilienceError::CircuitOpen { .. }));
}

#[tokio::test(start_paused = true)]
async fn the_stack_as_one_tower_layer_has_a_flat_error() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let svc = ServiceBuilder::new()
        .layer(
            ResilienceStack::new()
                .breaker(breaker("one-layer", 5))
                .retry(RetryPolicy::new().max_attempts(3))
                .timeout(Duration::from_millis(100))
                .bulkhead(Bulkhead::new(1, 1))
                .layer(),
        )
        .service(service_fn(move |n: u32| {
            let attempt = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if attempt == 0 {
                    Err(TestError::transient())
                } else {
                    Ok(n * 2)
                }
            }
        }));
    assert_eq!(svc.clone().oneshot(21).await.unwrap(), 42);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let hanging = ServiceBuilder::new()
        .layer(
            ResilienceStack::new()
                .timeout(Duration::from_millis(100))
                .layer(),
        )
        .service(service_fn(|_: ()| async {
            sleep(Duration::from_secs(5)).await;
            Ok::<_, TestError>(())
        }));
    assert!(matches!(
        hanging.oneshot(()).await,
        Err(ResilienceError::Timeout { .. })
    ));
}
