//! Timeout and bulkhead behaviour under a paused tokio clock.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestError;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep};
use tower::{ServiceBuilder, ServiceExt, service_fn};
use vextrus_kernel::{ErrorKind, HasErrorKind};
use vextrus_resilience::{Bulkhead, BulkheadLayer, ResilienceError, TimeoutLayer, timeout};

#[tokio::test(start_paused = true)]
async fn timeout_fires_after_the_limit_and_is_transient() {
    let started = Instant::now();
    let result = timeout(Duration::from_secs(2), async {
        sleep(Duration::from_secs(60)).await;
        Ok::<_, TestError>(())
    })
    .await;
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    let error = result.unwrap_err();
    assert!(matches!(error, ResilienceError::Timeout { after } if after == Duration::from_secs(2)));
    assert_eq!(error.kind(), ErrorKind::Transient);
}

#[tokio::test(start_paused = true)]
async fn timeout_passes_results_and_errors_through() {
    let ok = timeout(Duration::from_secs(1), async { Ok::<_, TestError>(5) }).await;
    assert_eq!(ok.unwrap(), 5);
    let err = timeout(Duration::from_secs(1), async {
        Err::<(), _>(TestError::of(ErrorKind::Conflict))
    })
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert_eq!(err.into_inner(), Some(TestError::of(ErrorKind::Conflict)));
}

#[tokio::test(start_paused = true)]
async fn timeout_layer_fires_through_tower() {
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_millis(100)))
        .service(service_fn(|wait: u64| async move {
            sleep(Duration::from_millis(wait)).await;
            Ok::<_, TestError>(wait)
        }));
    assert_eq!(svc.clone().oneshot(99).await.unwrap(), 99);
    let started = Instant::now();
    assert!(matches!(
        svc.oneshot(10_000).await,
        Err(ResilienceError::Timeout { .. })
    ));
    assert_eq!(started.elapsed(), Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn bulkhead_rejects_at_once_when_slots_and_queue_are_full() {
    let bulkhead = Bulkhead::new(2, 1);
    let release = Arc::new(Notify::new());
    let mut running = Vec::new();
    // Two run, one waits.
    for _ in 0..3 {
        let bulkhead = bulkhead.clone();
        let release = Arc::clone(&release);
        running.push(tokio::spawn(async move {
            bulkhead
                .call(async move {
                    release.notified().await;
                    Ok::<_, TestError>(())
                })
                .await
        }));
    }
    tokio::task::yield_now().await;
    assert_eq!(bulkhead.available(), 0);
    assert_eq!(bulkhead.queued(), 1);

    let started = Instant::now();
    let refused = bulkhead.call(async { Ok::<_, TestError>(()) }).await;
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "rejected without waiting"
    );
    match refused {
        Err(
            error @ ResilienceError::BulkheadFull {
                max_concurrent: 2,
                max_queue: 1,
                ..
            },
        ) => assert_eq!(error.kind(), ErrorKind::Transient),
        other => panic!("expected BulkheadFull, got {other:?}"),
    }

    // Let them all finish: the queued one gets its turn.
    for _ in 0..3 {
        release.notify_one();
        tokio::task::yield_now().await;
    }
    for task in running {
        task.await.unwrap().unwrap();
    }
    assert_eq!(bulkhead.available(), 2);
    assert_eq!(bulkhead.queued(), 0);
}

#[tokio::test(start_paused = true)]
async fn bulkhead_turns_a_caller_away_after_max_wait() {
    let bulkhead = Bulkhead::new(1, 4).max_wait(Duration::from_secs(3));
    let held = bulkhead.acquire().await.unwrap();
    let started = Instant::now();
    let refused = bulkhead.call(async { Ok::<_, TestError>(()) }).await;
    assert_eq!(started.elapsed(), Duration::from_secs(3));
    assert!(matches!(
        refused,
        Err(ResilienceError::BulkheadFull { waited, .. }) if waited == Duration::from_secs(3)
    ));
    assert_eq!(bulkhead.queued(), 0);
    drop(held);
    bulkhead
        .call(async { Ok::<_, TestError>(()) })
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn bulkhead_layer_queues_then_rejects() {
    let release = Arc::new(Notify::new());
    let gate = Arc::clone(&release);
    let svc = ServiceBuilder::new()
        .layer(BulkheadLayer::new(Bulkhead::new(1, 1)))
        .service(service_fn(move |n: u32| {
            let gate = Arc::clone(&gate);
            async move {
                gate.notified().await;
                Ok::<_, TestError>(n)
            }
        }));
    let first = tokio::spawn(svc.clone().oneshot(1));
    tokio::task::yield_now().await;
    let second = tokio::spawn(svc.clone().oneshot(2));
    tokio::task::yield_now().await;
    let third = svc.clone().oneshot(3).await;
    assert!(matches!(third, Err(ResilienceError::BulkheadFull { .. })));

    release.notify_one();
    assert_eq!(first.await.unwrap().unwrap(), 1);
    tokio::task::yield_now().await;
    release.notify_one();
    assert_eq!(second.await.unwrap().unwrap(), 2);
}
