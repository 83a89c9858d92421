//! Retry behaviour under a paused tokio clock.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TestError;
use tokio::time::{Instant, sleep};
use tower::{ServiceBuilder, ServiceExt, service_fn};
use vextrus_kernel::ErrorKind;
use vextrus_resilience::{Classifier, RetryEvent, RetryLayer, RetryPolicy, retry};

/// Runs a call that fails with `error` every time, returning how often it ran.
async fn always_failing(policy: &RetryPolicy, error: TestError) -> (usize, TestError) {
    let calls = AtomicUsize::new(0);
    let result: Result<(), TestError> = retry(policy, || {
        calls.fetch_add(1, Ordering::SeqCst);
        let error = error.clone();
        async move { Err(error) }
    })
    .await;
    (calls.load(Ordering::SeqCst), result.unwrap_err())
}

fn recorder() -> (
    Arc<Mutex<Vec<RetryEvent>>>,
    impl Fn(&RetryEvent) + Send + Sync + 'static,
) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    (events, move |event: &RetryEvent| {
        sink.lock().unwrap().push(*event)
    })
}

#[tokio::test(start_paused = true)]
async fn stops_at_once_on_a_non_retryable_kind() {
    let policy = RetryPolicy::new().max_attempts(10);
    for kind in [
        ErrorKind::Validation,
        ErrorKind::Conflict,
        ErrorKind::NotFound,
        ErrorKind::Fatal,
    ] {
        let started = Instant::now();
        let (calls, error) = always_failing(&policy, TestError::of(kind)).await;
        assert_eq!(calls, 1, "{kind} must not be retried");
        assert_eq!(error.kind, kind);
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "no backoff before giving up"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn stops_when_a_retryable_call_turns_non_retryable() {
    let calls = AtomicUsize::new(0);
    let policy = RetryPolicy::new().max_attempts(10);
    let result: Result<(), TestError> = retry(&policy, || {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            Err(if n < 2 {
                TestError::transient()
            } else {
                TestError::of(ErrorKind::Validation)
            })
        }
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(result.unwrap_err().kind, ErrorKind::Validation);
}

#[tokio::test(start_paused = true)]
async fn the_retryable_set_is_configurable() {
    let policy = RetryPolicy::new()
        .max_attempts(3)
        .retry_on([ErrorKind::Transient, ErrorKind::Conflict]);
    let (calls, _) = always_failing(&policy, TestError::of(ErrorKind::Conflict)).await;
    assert_eq!(calls, 3);
    let nothing = RetryPolicy::new().max_attempts(3).retry_on([]);
    let (calls, _) = always_failing(&nothing, TestError::transient()).await;
    assert_eq!(calls, 1);
}

#[tokio::test(start_paused = true)]
async fn respects_the_maximum_number_of_attempts() {
    let (events, hook) = recorder();
    let policy = RetryPolicy::new()
        .max_attempts(4)
        .without_max_elapsed()
        .on_retry(hook);
    let (calls, error) = always_failing(&policy, TestError::transient()).await;
    assert_eq!(calls, 4);
    assert_eq!(error.kind, ErrorKind::Transient);
    let attempts: Vec<usize> = events.lock().unwrap().iter().map(|e| e.attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);
}

#[tokio::test(start_paused = true)]
async fn succeeds_on_a_later_attempt() {
    let calls = AtomicUsize::new(0);
    let policy = RetryPolicy::new().max_attempts(5);
    let value = retry(&policy, || {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < 3 {
                Err(TestError::transient())
            } else {
                Ok(n)
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(value, 3);
}

#[tokio::test(start_paused = true)]
async fn respects_the_maximum_elapsed_time() {
    let (events, hook) = recorder();
    let budget = Duration::from_secs(5);
    let policy = RetryPolicy::new()
        .min_delay(Duration::from_millis(500))
        .max_delay(Duration::from_secs(2))
        .max_attempts(1_000)
        .max_elapsed(budget)
        .on_retry(hook);
    let started = Instant::now();
    let calls = AtomicUsize::new(0);
    let last_start = Mutex::new(Duration::ZERO);
    let result: Result<(), TestError> = retry(&policy, || {
        calls.fetch_add(1, Ordering::SeqCst);
        *last_start.lock().unwrap() = started.elapsed();
        async {
            // Each attempt itself takes a while.
            sleep(Duration::from_millis(300)).await;
            Err(TestError::transient())
        }
    })
    .await;
    assert!(result.is_err());
    let calls = calls.load(Ordering::SeqCst);
    assert!(calls > 1, "it did retry ({calls} calls)");
    assert!(calls < 1_000, "the budget, not the attempts, stopped it");
    let last_start = *last_start.lock().unwrap();
    assert!(
        last_start < budget,
        "attempt started at {last_start:?}, after the budget"
    );
    // It gave up without sleeping past the budget: the total is at most the
    // budget plus the last attempt's own duration.
    assert!(started.elapsed() <= budget + Duration::from_millis(300));
    for event in events.lock().unwrap().iter() {
        assert!(event.elapsed + event.delay < budget);
    }
}

#[tokio::test(start_paused = true)]
async fn delays_stay_within_the_full_jitter_bounds() {
    let (events, hook) = recorder();
    let min = Duration::from_millis(125);
    let max = Duration::from_secs(4);
    let policy = RetryPolicy::new()
        .min_delay(min)
        .factor(2.0)
        .max_delay(max)
        .max_attempts(41)
        .without_max_elapsed()
        .on_retry(hook);
    let mut rounds = 0;
    while rounds < 25 {
        let (calls, _) = always_failing(&policy, TestError::transient()).await;
        assert_eq!(calls, 41);
        rounds += 1;
    }
    let events = events.lock().unwrap();
    assert_eq!(events.len(), 25 * 40);
    let mut below_half = 0;
    let mut above_half = 0;
    for event in events.iter() {
        let exponent = i32::try_from(event.attempt - 1).unwrap().min(10);
        let expected_cap = min.mul_f64(2f64.powi(exponent)).min(max);
        assert_eq!(
            event.cap, expected_cap,
            "cap after attempt {}",
            event.attempt
        );
        assert!(event.jittered <= event.cap, "{event:?}");
        assert_eq!(event.delay, event.jittered, "no Retry-After here");
        if event.jittered < event.cap / 2 {
            below_half += 1;
        } else {
            above_half += 1;
        }
    }
    // Full jitter spreads over the whole [0, cap], not just its upper half
    // (as additive jitter `cap + U[0, cap)` would).
    assert!(
        below_half > 300 && above_half > 300,
        "{below_half} / {above_half}"
    );
}

#[tokio::test(start_paused = true)]
async fn honours_a_servers_retry_after() {
    let (events, hook) = recorder();
    let policy = RetryPolicy::new()
        .min_delay(Duration::from_millis(10))
        .max_delay(Duration::from_millis(10))
        .max_attempts(3)
        .max_elapsed(Duration::from_secs(60))
        .on_retry(hook)
        .classify_with((|e: &TestError| e.kind).with_retry_after(|e: &TestError| e.retry_after));
    let calls = AtomicUsize::new(0);
    let started = Instant::now();
    let result: Result<(), TestError> = policy
        .retry(|| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                Err(TestError {
                    kind: ErrorKind::Transient,
                    retry_after: Some(Duration::from_secs(7)),
                })
            }
        })
        .await;
    assert!(result.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(started.elapsed(), Duration::from_secs(14));
    for event in events.lock().unwrap().iter() {
        assert_eq!(event.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(event.delay, Duration::from_secs(7));
        assert!(event.jittered <= Duration::from_millis(10));
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_beyond_the_budget_ends_the_retries_at_once() {
    let policy = RetryPolicy::new()
        .max_attempts(10)
        .max_elapsed(Duration::from_secs(5))
        .classify_with((|e: &TestError| e.kind).with_retry_after(|e: &TestError| e.retry_after));
    let calls = AtomicUsize::new(0);
    let started = Instant::now();
    let result: Result<(), TestError> = policy
        .retry(|| {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                Err(TestError {
                    kind: ErrorKind::Transient,
                    retry_after: Some(Duration::from_secs(30)),
                })
            }
        })
        .await;
    assert!(result.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn tower_layer_retries_transient_errors_only() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicy::new().max_attempts(3)))
        .service(service_fn(move |kind: ErrorKind| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move { Err::<(), _>(TestError::of(kind)) }
        }));
    let error = svc.clone().oneshot(ErrorKind::Transient).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Transient);
    assert_eq!(calls.swap(0, Ordering::SeqCst), 3);
    let error = svc.oneshot(ErrorKind::Validation).await.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Validation);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn tower_layer_returns_the_first_success() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicy::new().max_attempts(5)))
        .service(service_fn(move |request: &'static str| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err(TestError::transient())
                } else {
                    Ok(format!("{request} on attempt {}", n + 1))
                }
            }
        }));
    assert_eq!(
        svc.oneshot("order-7").await.unwrap(),
        "order-7 on attempt 3"
    );
}

#[tokio::test(start_paused = true)]
async fn the_waits_between_attempts_are_the_drawn_delays_within_their_caps() {
    // The test above checks the delays the policy reports; this one checks
    // the time that actually passes between attempts on the paused clock.
    let (events, hook) = recorder();
    let min = Duration::from_millis(100);
    let max = Duration::from_millis(1_600);
    let policy = RetryPolicy::new()
        .min_delay(min)
        .factor(2.0)
        .max_delay(max)
        .max_attempts(9)
        .without_max_elapsed()
        .on_retry(hook);
    for _ in 0..20 {
        events.lock().unwrap().clear();
        let starts = Mutex::new(Vec::new());
        let result: Result<(), TestError> = retry(&policy, || {
            starts.lock().unwrap().push(Instant::now());
            async { Err(TestError::transient()) }
        })
        .await;
        assert!(result.is_err());
        let starts = starts.into_inner().unwrap();
        let events = events.lock().unwrap();
        assert_eq!((starts.len(), events.len()), (9, 8));
        for (n, (pair, event)) in starts.windows(2).zip(events.iter()).enumerate() {
            let waited = pair[1] - pair[0];
            // Caps 100, 200, 400, 800 ms, then 1.6 s (max_delay).
            let cap = (min * 2u32.pow(u32::try_from(n).unwrap())).min(max);
            assert_eq!(event.cap, cap);
            assert!(
                event.delay <= cap,
                "drawn {:?} over cap {cap:?}",
                event.delay
            );
            // tokio's timer rounds a deadline up to the next millisecond.
            assert!(
                waited >= event.delay && waited < event.delay + Duration::from_millis(1),
                "attempt {}: waited {waited:?}, drew {:?}",
                n + 1,
                event.delay
            );
            assert!(
                waited <= cap,
                "attempt {}: waited {waited:?} > cap {cap:?}",
                n + 1
            );
        }
    }
}
