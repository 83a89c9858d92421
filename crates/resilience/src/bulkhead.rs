//! A concurrency limit with a bounded waiting queue.
//!
//! At most `max_concurrent` calls run at once; up to `max_queue` more wait
//! (first come, first served: tokio's semaphore is fair) and any call beyond
//! that is turned away at once with [`ResilienceError::BulkheadFull`], which is
//! [`Transient`]. With [`Bulkhead::max_wait`], a call that waited that long
//! for a slot is turned away too. The point is that one slow downstream can
//! tie up at most `max_concurrent + max_queue` of the process's tasks.
//!
//! [`Transient`]: vextrus_kernel::ErrorKind::Transient

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::error::ResilienceError;
use crate::metrics as names;

/// A concurrency limit with a bounded queue; cheap to clone (clones share the limit).
///
/// ```
/// use vextrus_resilience::{Bulkhead, ResilienceError};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let bulkhead = Bulkhead::new(1, 0);
/// let held = bulkhead.acquire().await.unwrap();
/// // The only slot is taken and nobody may wait: turned away at once.
/// let refused = bulkhead.call(async { Ok::<_, std::io::Error>(()) }).await;
/// assert!(matches!(refused, Err(ResilienceError::BulkheadFull { .. })));
/// drop(held);
/// assert_eq!(bulkhead.call(async { Ok::<_, std::io::Error>(5) }).await.unwrap(), 5);
/// # }
/// ```
#[derive(Clone)]
pub struct Bulkhead {
    shared: Arc<Shared>,
    max_concurrent: usize,
    max_queue: usize,
    max_wait: Option<Duration>,
}

struct Shared {
    semaphore: Arc<Semaphore>,
    queued: AtomicUsize,
}

impl fmt::Debug for Bulkhead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bulkhead")
            .field("max_concurrent", &self.max_concurrent)
            .field("max_queue", &self.max_queue)
            .field("max_wait", &self.max_wait)
            .field("available", &self.available())
            .field("queued", &self.queued())
            .finish()
    }
}

/// A slot in a [`Bulkhead`]; the slot is free again when this is dropped.
#[derive(Debug)]
#[must_use = "the bulkhead slot is released as soon as the permit is dropped"]
pub struct BulkheadPermit {
    _permit: OwnedSemaphorePermit,
}

/// Counts a caller in the queue and out again, however it leaves (also when
/// its future is dropped while waiting).
struct QueuedGuard<'a>(&'a AtomicUsize);

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Bulkhead {
    /// At most `max_concurrent` calls at once (0 is taken as 1), and at most
    /// `max_queue` waiting for a slot.
    pub fn new(max_concurrent: usize, max_queue: usize) -> Self {
        let max_concurrent = max_concurrent.clamp(1, Semaphore::MAX_PERMITS);
        Bulkhead {
            shared: Arc::new(Shared {
                semaphore: Arc::new(Semaphore::new(max_concurrent)),
                queued: AtomicUsize::new(0),
            }),
            max_concurrent,
            max_queue,
            max_wait: None,
        }
    }

    /// Turn a queued call away after it waited `max_wait` for a slot.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = Some(max_wait);
        self
    }

    /// Free slots now.
    pub fn available(&self) -> usize {
        self.shared.semaphore.available_permits()
    }

    /// Calls waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Acquire)
    }

    /// Takes a slot: at once if one is free, else after waiting in the queue,
    /// or fails with [`ResilienceError::BulkheadFull`] if the queue is full or
    /// the wait runs past `max_wait`.
    pub async fn acquire(&self) -> Result<BulkheadPermit, ResilienceError<Infallible>> {
        if let Some(permit) = self.try_acquire_now() {
            return Ok(permit);
        }
        self.acquire_queued().await
    }

    fn try_acquire_now(&self) -> Option<BulkheadPermit> {
        Arc::clone(&self.shared.semaphore)
            .try_acquire_owned()
            .ok()
            .map(|permit| BulkheadPermit { _permit: permit })
    }

    async fn acquire_queued(&self) -> Result<BulkheadPermit, ResilienceError<Infallible>> {
        let ahead = self.shared.queued.fetch_add(1, Ordering::AcqRel);
        let _in_queue = QueuedGuard(&self.shared.queued);
        if ahead >= self.max_queue {
            return Err(self.rejected("queue_full", Duration::ZERO));
        }
        let started = Instant::now();
        let acquire = Arc::clone(&self.shared.semaphore).acquire_owned();
        let acquired = match self.max_wait {
            None => acquire.await,
            Some(max_wait) => match tokio::time::timeout(max_wait, acquire).await {
                Ok(acquired) => acquired,
                Err(_) => return Err(self.rejected("max_wait", started.elapsed())),
            },
        };
        // The semaphore is never closed, so acquiring only fails if that ever
        // changes; then the call is turned away like any other.
        acquired
            .map(|permit| BulkheadPermit { _permit: permit })
            .map_err(|_| self.rejected("closed", started.elapsed()))
    }

    fn rejected(&self, reason: &'static str, waited: Duration) -> ResilienceError<Infallible> {
        tracing::debug!(
            max_concurrent = self.max_concurrent,
            max_queue = self.max_queue,
            ?waited,
            reason,
            "bulkhead turned a call away"
        );
        ::metrics::counter!(names::BULKHEAD_REJECTIONS_TOTAL, names::LABEL_REASON => reason)
            .increment(1);
        ResilienceError::BulkheadFull {
            max_concurrent: self.max_concurrent,
            max_queue: self.max_queue,
            waited,
        }
    }

    /// Runs `future` in a slot, holding the slot until it finishes.
    pub async fn call<F, T, E>(&self, future: F) -> Result<T, ResilienceError<E>>
    where
        F: Future<Output = Result<T, E>>,
    {
        let _permit = self
            .acquire()
            .await
            .map_err(|e| e.map_inner(|never| match never {}))?;
        future.await.map_err(ResilienceError::Inner)
    }
}

/// A tower layer that limits how many calls of its service run at once.
///
/// The service must be `Clone`: a call that has to wait for a slot keeps the
/// service it was made ready on and calls it once the slot is free.
///
/// ```
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
/// use vextrus_resilience::{Bulkhead, BulkheadLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let svc = ServiceBuilder::new()
///     .layer(BulkheadLayer::new(Bulkhead::new(8, 16)))
///     .service(service_fn(|n: u32| async move { Ok::<_, std::io::Error>(n * 2) }));
/// assert_eq!(svc.oneshot(21).await.unwrap(), 42);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct BulkheadLayer {
    bulkhead: Bulkhead,
}

impl BulkheadLayer {
    /// A layer whose services all share `bulkhead`.
    pub fn new(bulkhead: Bulkhead) -> Self {
        BulkheadLayer { bulkhead }
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = BulkheadService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BulkheadService {
            inner,
            bulkhead: self.bulkhead.clone(),
        }
    }
}

/// The service made by [`BulkheadLayer`].
#[derive(Debug, Clone)]
pub struct BulkheadService<S> {
    inner: S,
    bulkhead: Bulkhead,
}

impl<S> BulkheadService<S> {
    /// Wraps `inner` with `bulkhead`.
    pub fn new(inner: S, bulkhead: Bulkhead) -> Self {
        BulkheadService { inner, bulkhead }
    }
}

type AcquireFuture =
    Pin<Box<dyn Future<Output = Result<BulkheadPermit, ResilienceError<Infallible>>> + Send>>;

impl<S, Req> Service<Req> for BulkheadService<S>
where
    S: Service<Req> + Clone,
{
    type Response = S::Response;
    type Error = ResilienceError<S::Error>;
    type Future = BulkheadFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(ResilienceError::Inner)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        if let Some(permit) = self.bulkhead.try_acquire_now() {
            return BulkheadFuture {
                state: BulkheadStep::Running {
                    future: self.inner.call(request),
                    permit: Some(permit),
                },
            };
        }
        // No slot free: wait for one, keeping the service that is ready now
        // (and leaving a fresh clone behind for the next call).
        let fresh = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, fresh);
        let bulkhead = self.bulkhead.clone();
        BulkheadFuture {
            state: BulkheadStep::Waiting {
                acquire: Box::pin(async move { bulkhead.acquire_queued().await }),
                pending: Some((ready, request)),
            },
        }
    }
}

pin_project! {
    #[project = BulkheadStepProj]
    enum BulkheadStep<S, Req, F> {
        Waiting { acquire: AcquireFuture, pending: Option<(S, Req)> },
        Running { #[pin] future: F, permit: Option<BulkheadPermit> },
    }
}

pin_project! {
    /// The response future of [`BulkheadService`].
    pub struct BulkheadFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: BulkheadStep<S, Req, S::Future>,
    }
}

impl<S, Req> fmt::Debug for BulkheadFuture<S, Req>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BulkheadFuture").finish_non_exhaustive()
    }
}

impl<S, Req> Future for BulkheadFuture<S, Req>
where
    S: Service<Req>,
{
    type Output = Result<S::Response, ResilienceError<S::Error>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                BulkheadStepProj::Waiting { acquire, pending } => {
                    let permit = match ready!(acquire.as_mut().poll(cx)) {
                        Ok(permit) => permit,
                        Err(rejected) => {
                            return Poll::Ready(Err(rejected.map_inner(|never| match never {})));
                        }
                    };
                    let Some((mut service, request)) = pending.take() else {
                        unreachable!("`pending` is only emptied here, when leaving `Waiting`");
                    };
                    let future = service.call(request);
                    this.state.set(BulkheadStep::Running {
                        future,
                        permit: Some(permit),
                    });
                }
                BulkheadStepProj::Running { future, permit } => {
                    let result = ready!(future.poll(cx));
                    // Free the slot as soon as the call is done, not when the
                    // caller gets round to dropping this future.
                    permit.take();
                    return Poll::Ready(result.map_err(ResilienceError::Inner));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_counter_is_released_when_a_waiter_is_cancelled() {
        let bulkhead = Bulkhead::new(1, 1);
        let held = bulkhead.acquire().await.unwrap();
        let mut waiter = Box::pin(bulkhead.acquire());
        assert!(futures_poll_once(waiter.as_mut()).await.is_none());
        assert_eq!(bulkhead.queued(), 1);
        drop(waiter);
        assert_eq!(bulkhead.queued(), 0);
        drop(held);
        assert_eq!(bulkhead.available(), 1);
    }

    async fn futures_poll_once<F: Future + Unpin>(mut f: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut f).poll(cx) {
                Poll::Ready(v) => Some(v),
                Poll::Pending => None,
            })
        })
        .await
    }
}
