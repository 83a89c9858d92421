//! A time limit on one call.
//!
//! When the limit passes, the call's future is dropped (so the call is
//! cancelled at its next await point) and the caller gets
//! [`ResilienceError::Timeout`], which is [`Transient`]: a retry around the
//! timeout may try again, and each attempt gets the full limit anew.
//!
//! [`Transient`]: vextrus_kernel::ErrorKind::Transient

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Sleep, sleep};
use tower::{Layer, Service};

use crate::error::ResilienceError;
use crate::metrics as names;

/// Runs `future` for at most `after`.
///
/// ```
/// use std::time::Duration;
/// use vextrus_resilience::{ResilienceError, timeout};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let slow = async {
///     tokio::time::sleep(Duration::from_secs(5)).await;
///     Ok::<_, std::io::Error>("late")
/// };
/// let result = timeout(Duration::from_secs(1), slow).await;
/// assert!(matches!(result, Err(ResilienceError::Timeout { .. })));
/// # }
/// ```
pub fn timeout<F, T, E>(after: Duration, future: F) -> TimeoutFuture<F>
where
    F: Future<Output = Result<T, E>>,
{
    TimeoutFuture::new(after, future)
}

pin_project! {
    /// A future with a time limit; made by [`timeout`] and by the [`Timeout`] service.
    #[must_use = "futures do nothing unless polled"]
    pub struct TimeoutFuture<F> {
        #[pin]
        future: F,
        #[pin]
        sleep: Sleep,
        after: Duration,
    }
}

impl<F> TimeoutFuture<F> {
    fn new(after: Duration, future: F) -> Self {
        TimeoutFuture {
            future,
            sleep: sleep(after),
            after,
        }
    }
}

impl<F> fmt::Debug for TimeoutFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimeoutFuture")
            .field("after", &self.after)
            .finish_non_exhaustive()
    }
}

impl<F, T, E> Future for TimeoutFuture<F>
where
    F: Future<Output = Result<T, E>>,
{
    type Output = Result<T, ResilienceError<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // The call first: a call that is ready when its limit also is has won.
        if let Poll::Ready(result) = this.future.poll(cx) {
            return Poll::Ready(result.map_err(ResilienceError::Inner));
        }
        match this.sleep.poll(cx) {
            Poll::Ready(()) => {
                tracing::debug!(after = ?this.after, "call timed out");
                ::metrics::counter!(names::TIMEOUTS_TOTAL).increment(1);
                Poll::Ready(Err(ResilienceError::Timeout { after: *this.after }))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A tower layer that puts a time limit on each call of its service.
///
/// ```
/// use std::time::Duration;
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
/// use vextrus_resilience::{ResilienceError, TimeoutLayer};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let svc = ServiceBuilder::new()
///     .layer(TimeoutLayer::new(Duration::from_millis(100)))
///     .service(service_fn(|wait: u64| async move {
///         tokio::time::sleep(Duration::from_millis(wait)).await;
///         Ok::<_, std::io::Error>(wait)
///     }));
/// assert_eq!(svc.clone().oneshot(10).await.unwrap(), 10);
/// assert!(matches!(svc.oneshot(500).await, Err(ResilienceError::Timeout { .. })));
/// # }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    after: Duration,
}

impl TimeoutLayer {
    /// A layer that limits each call to `after`.
    pub fn new(after: Duration) -> Self {
        TimeoutLayer { after }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout::new(inner, self.after)
    }
}

/// The service made by [`TimeoutLayer`].
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    after: Duration,
}

impl<S> Timeout<S> {
    /// Wraps `inner`, limiting each call to `after`.
    pub fn new(inner: S, after: Duration) -> Self {
        Timeout { inner, after }
    }
}

impl<S, Req> Service<Req> for Timeout<S>
where
    S: Service<Req>,
{
    type Response = S::Response;
    type Error = ResilienceError<S::Error>;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(ResilienceError::Inner)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        TimeoutFuture::new(self.after, self.inner.call(request))
    }
}
