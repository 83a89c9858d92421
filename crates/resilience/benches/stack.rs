//! The cost of the resilience policies on a hot call that succeeds.
//!
//! Each benchmark awaits one trivial async call that returns `Ok` at once:
//! bare, then through each policy alone, then through the full stack
//! (breaker, retry, timeout, bulkhead), both as async wrappers and as tower
//! services. The difference to `bare` is the policy's overhead per call.
//!
//! Run with `cargo bench -p vextrus-resilience --bench stack`.
//!
//! Figures, with the machine and load they were measured under, are in
//! `crates/resilience/BENCHMARKS.md`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use vextrus_kernel::{ErrorKind, HasErrorKind};
use vextrus_resilience::{
    Bulkhead, BulkheadLayer, CircuitBreaker, CircuitBreakerConfig, CircuitBreakerLayer,
    ResilienceStack, RetryLayer, RetryPolicy, SlidingWindow, TimeoutLayer, retry, timeout,
};

#[derive(Debug, Clone, Copy)]
struct Never;

impl HasErrorKind for Never {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Transient
    }
}

async fn hot_call(n: u64) -> Result<u64, Never> {
    Ok(black_box(n) + 1)
}

fn breaker() -> Arc<CircuitBreaker> {
    Arc::new(CircuitBreaker::new(
        "bench",
        CircuitBreakerConfig::new().sliding_window(SlidingWindow::Count(100)),
    ))
}

fn policies(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    let policy = RetryPolicy::new().max_attempts(3);
    let cb = breaker();
    let timed_cb = Arc::new(CircuitBreaker::new(
        "bench-timed",
        CircuitBreakerConfig::new()
            .sliding_window(SlidingWindow::Time(Duration::from_secs(60)))
            .slow_call_duration(Duration::from_secs(1)),
    ));
    let bulkhead = Bulkhead::new(64, 64);
    let stack = ResilienceStack::new()
        .breaker(breaker())
        .retry(RetryPolicy::new().max_attempts(3))
        .timeout(Duration::from_secs(1))
        .bulkhead(Bulkhead::new(64, 64));

    let mut group = c.benchmark_group("wrapper");
    group.bench_function("bare", |b| b.to_async(&rt).iter(|| hot_call(1)));
    group.bench_function("retry", |b| {
        b.to_async(&rt).iter(|| retry(&policy, || hot_call(1)))
    });
    group.bench_function("breaker_count_window", |b| {
        b.to_async(&rt).iter(|| cb.call(hot_call(1)))
    });
    group.bench_function("breaker_time_window_slow_calls", |b| {
        b.to_async(&rt).iter(|| timed_cb.call(hot_call(1)))
    });
    group.bench_function("timeout", |b| {
        b.to_async(&rt)
            .iter(|| timeout(Duration::from_secs(1), hot_call(1)))
    });
    group.bench_function("bulkhead", |b| {
        b.to_async(&rt).iter(|| bulkhead.call(hot_call(1)))
    });
    group.bench_function("full_stack", |b| {
        b.to_async(&rt).iter(|| stack.call(|| hot_call(1)))
    });
    group.finish();

    let mut group = c.benchmark_group("tower");
    let bare = service_fn(hot_call);
    group.bench_function("bare", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = bare;
            async move { svc.ready().await?.call(1).await }
        })
    });
    let layered = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(breaker()))
        .layer(RetryLayer::new(RetryPolicy::new().max_attempts(3)))
        .layer(TimeoutLayer::new(Duration::from_secs(1)))
        .layer(BulkheadLayer::new(Bulkhead::new(64, 64)))
        .service(service_fn(hot_call));
    group.bench_function("full_stack_layers", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = layered.clone();
            async move { svc.ready().await?.call(1).await }
        })
    });
    let one_layer = ServiceBuilder::new()
        .layer(
            ResilienceStack::new()
                .breaker(breaker())
                .retry(RetryPolicy::new().max_attempts(3))
                .timeout(Duration::from_secs(1))
                .bulkhead(Bulkhead::new(64, 64))
                .layer(),
        )
        .service(service_fn(hot_call));
    group.bench_function("full_stack_one_layer", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = one_layer.clone();
            async move { svc.ready().await?.call(1).await }
        })
    });
    group.finish();
}

criterion_group!(benches, policies);
criterion_main!(benches);
