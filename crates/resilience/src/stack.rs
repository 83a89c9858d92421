//! The policies composed in one documented order.
//!
//! A [`ResilienceStack`] runs one call as
//!
//! ```text
//! breaker( retry( timeout( bulkhead( call ) ) ) )
//! ```
//!
//! from the outside in, and each policy is optional:
//!
//! - **Breaker outermost.** It sees the *final* outcome of a retried call, so
//!   one caller's three attempts against a sick downstream count as one
//!   failure, not three (retries inside the breaker would trip it N times as
//!   fast and let one unlucky caller open it for everybody). While it is open,
//!   the call is refused before any retry or wait, which is what an open
//!   breaker is for.
//! - **Retry inside the breaker.** It retries what the classifier calls
//!   retryable, by default only [`Transient`]: timeouts and bulkhead
//!   rejections are transient, so they are retried with backoff.
//! - **Timeout inside the retry.** Each attempt gets the full time limit anew;
//!   one slow attempt does not eat the budget of the next. The overall budget
//!   is the retry policy's `max_elapsed`.
//! - **Bulkhead innermost.** A slot is held only while an attempt runs, never
//!   while the retry sleeps between attempts, and the wait for a slot counts
//!   against the attempt's time limit, so a caller stuck in a long queue
//!   times out and backs off instead of waiting without end.
//!
//! The breaker counts a call that failed with a timeout or a bulkhead
//! rejection after all retries as a failure (they are [`Transient`]): a
//! downstream so slow that calls pile up or time out is unhealthy.
//!
//! The same order with tower layers (the first layer added is the outermost):
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//! use vextrus_resilience::*;
//!
//! # fn build<S>(svc: S) {
//! let breaker = BreakerRegistry::global().get("ledger");
//! let stack = ServiceBuilder::new()
//!     .layer(CircuitBreakerLayer::new(breaker))
//!     .layer(RetryLayer::new(RetryPolicy::new()))
//!     .layer(TimeoutLayer::new(Duration::from_secs(2)))
//!     .layer(BulkheadLayer::new(Bulkhead::new(32, 64)))
//!     .service(svc);
//! # let _ = stack;
//! # }
//! ```
//!
//! Each layer wraps its inner error in a [`ResilienceError`], so that stack's
//! error is nested; [`ResilienceError::flatten`] removes a level, and
//! [`ResilienceStack::layer`] gives one layer with the whole stack and a flat
//! error.
//!
//! [`Transient`]: vextrus_kernel::ErrorKind::Transient

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service};
use vextrus_kernel::ErrorKind;

use crate::breaker::CircuitBreaker;
use crate::bulkhead::Bulkhead;
use crate::classify::{ByErrorKind, Classifier, Lifted};
use crate::error::ResilienceError;
use crate::retry::RetryPolicy;
use crate::timeout::timeout;

/// Borrows a classifier as a classifier (a blanket impl for `&C` would clash
/// with the one for closures).
struct ByRef<'a, C>(&'a C);

impl<E, C: Classifier<E>> Classifier<E> for ByRef<'_, C> {
    fn kind(&self, error: &E) -> ErrorKind {
        self.0.kind(error)
    }

    fn retry_after(&self, error: &E) -> Option<Duration> {
        self.0.retry_after(error)
    }
}

/// Breaker, retry, timeout and bulkhead around one call, in the order the
/// [module docs](self) give and justify.
///
/// Built with methods that take and return `self`; every policy is optional
/// and an empty stack just runs the call. The stack's classifier (by default
/// [`ByErrorKind`]) decides for both the retry and the breaker; the
/// classifier of the [`RetryPolicy`] given to [`ResilienceStack::retry`] is
/// not used.
///
/// ```
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::time::Duration;
/// use vextrus_kernel::{ErrorKind, HasErrorKind};
/// use vextrus_resilience::*;
///
/// #[derive(Debug)]
/// struct Unavailable;
/// impl HasErrorKind for Unavailable {
///     fn kind(&self) -> ErrorKind { ErrorKind::Transient }
/// }
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let stack = ResilienceStack::new()
///     .breaker(BreakerRegistry::global().get("warehouse"))
///     .retry(RetryPolicy::new().max_attempts(3))
///     .timeout(Duration::from_millis(500))
///     .bulkhead(Bulkhead::new(16, 32));
///
/// let calls = AtomicU32::new(0);
/// let stock = stack
///     .call(|| async {
///         if calls.fetch_add(1, Ordering::SeqCst) == 0 { Err(Unavailable) } else { Ok(12) }
///     })
///     .await;
/// assert_eq!(stock.unwrap(), 12);
/// # }
/// ```
pub struct ResilienceStack<C = ByErrorKind> {
    breaker: Option<Arc<CircuitBreaker>>,
    retry: Option<RetryPolicy<()>>,
    timeout: Option<Duration>,
    bulkhead: Option<Bulkhead>,
    classifier: C,
}

impl<C: Clone> Clone for ResilienceStack<C> {
    fn clone(&self) -> Self {
        ResilienceStack {
            breaker: self.breaker.clone(),
            retry: self.retry.clone(),
            timeout: self.timeout,
            bulkhead: self.bulkhead.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<C: fmt::Debug> fmt::Debug for ResilienceStack<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResilienceStack")
            .field(
                "breaker",
                &self.breaker.as_ref().map(|b| b.name().to_owned()),
            )
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .field("bulkhead", &self.bulkhead)
            .field("classifier", &self.classifier)
            .finish()
    }
}

impl Default for ResilienceStack {
    fn default() -> Self {
        Self::new()
    }
}

impl ResilienceStack {
    /// An empty stack classifying errors by their own kind.
    pub fn new() -> Self {
        ResilienceStack {
            breaker: None,
            retry: None,
            timeout: None,
            bulkhead: None,
            classifier: ByErrorKind,
        }
    }
}

impl<C> ResilienceStack<C> {
    /// Guard the calls with `breaker` (outermost).
    pub fn breaker(mut self, breaker: Arc<CircuitBreaker>) -> Self {
        self.breaker = Some(breaker);
        self
    }

    /// Retry the calls under `policy` (inside the breaker); the policy's own
    /// classifier is replaced by the stack's.
    pub fn retry<D>(mut self, policy: RetryPolicy<D>) -> Self {
        self.retry = Some(policy.classify_with(()));
        self
    }

    /// Limit each attempt to `after` (inside the retry).
    pub fn timeout(mut self, after: Duration) -> Self {
        self.timeout = Some(after);
        self
    }

    /// Run each attempt in a slot of `bulkhead` (innermost).
    pub fn bulkhead(mut self, bulkhead: Bulkhead) -> Self {
        self.bulkhead = Some(bulkhead);
        self
    }

    /// The same stack with another classifier, for both retry and breaker.
    pub fn classify_with<C2>(self, classifier: C2) -> ResilienceStack<C2> {
        ResilienceStack {
            breaker: self.breaker,
            retry: self.retry,
            timeout: self.timeout,
            bulkhead: self.bulkhead,
            classifier,
        }
    }

    /// Runs the call made by `op` (once per attempt) through the stack.
    pub async fn call<T, E, F, Fut>(&self, mut op: F) -> Result<T, ResilienceError<E>>
    where
        C: Classifier<E>,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let classifier = Lifted(ByRef(&self.classifier));
        let permit = match &self.breaker {
            Some(breaker) => Some(
                breaker
                    .try_acquire()
                    .map_err(|e| e.map_inner(|never| match never {}))?,
            ),
            None => None,
        };
        let result = match &self.retry {
            Some(policy) => policy.run_with(&classifier, || self.attempt(op())).await,
            None => self.attempt(op()).await,
        };
        if let Some(permit) = permit {
            permit.record_result(&result, &classifier);
        }
        result
    }

    /// One attempt: the bulkhead slot inside the time limit.
    async fn attempt<T, E, Fut>(&self, call: Fut) -> Result<T, ResilienceError<E>>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        let guarded = async {
            let _slot = match &self.bulkhead {
                Some(bulkhead) => Some(
                    bulkhead
                        .acquire()
                        .await
                        .map_err(|e| e.map_inner(|never| match never {}))?,
                ),
                None => None,
            };
            call.await.map_err(ResilienceError::Inner)
        };
        match self.timeout {
            Some(after) => timeout(after, guarded)
                .await
                .map_err(ResilienceError::flatten),
            None => guarded.await,
        }
    }

    /// The whole stack as one tower layer whose services have a flat
    /// [`ResilienceError`].
    ///
    /// Its service calls the inner service once per attempt (a fresh clone,
    /// made ready, given a clone of the request), so both must be `Clone`. Each
    /// call allocates one boxed future; the per-policy layers
    /// ([`CircuitBreakerLayer`](crate::CircuitBreakerLayer) and friends) do
    /// not, at the price of a nested error.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower::{ServiceBuilder, ServiceExt, service_fn};
    /// use vextrus_kernel::ErrorKind;
    /// use vextrus_resilience::{ResilienceError, ResilienceStack, RetryPolicy};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let stack = ResilienceStack::new()
    ///     .classify_with(|_: &std::io::Error| ErrorKind::Transient)
    ///     .retry(RetryPolicy::new().max_attempts(2))
    ///     .timeout(Duration::from_millis(100));
    /// let svc = ServiceBuilder::new()
    ///     .layer(stack.layer())
    ///     .service(service_fn(|ms: u64| async move {
    ///         tokio::time::sleep(Duration::from_millis(ms)).await;
    ///         Ok::<_, std::io::Error>(ms)
    ///     }));
    /// assert_eq!(svc.clone().oneshot(10).await.unwrap(), 10);
    /// assert!(matches!(svc.oneshot(1_000).await, Err(ResilienceError::Timeout { .. })));
    /// # }
    /// ```
    pub fn layer(self) -> ResilienceLayer<C> {
        ResilienceLayer {
            stack: Arc::new(self),
        }
    }
}

/// The whole [`ResilienceStack`] as one tower layer; see [`ResilienceStack::layer`].
pub struct ResilienceLayer<C = ByErrorKind> {
    stack: Arc<ResilienceStack<C>>,
}

impl<C> Clone for ResilienceLayer<C> {
    fn clone(&self) -> Self {
        ResilienceLayer {
            stack: Arc::clone(&self.stack),
        }
    }
}

impl<C: fmt::Debug> fmt::Debug for ResilienceLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ResilienceLayer").field(&self.stack).finish()
    }
}

impl<S, C> Layer<S> for ResilienceLayer<C> {
    type Service = ResilienceService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        ResilienceService {
            inner,
            stack: Arc::clone(&self.stack),
        }
    }
}

/// The service made by [`ResilienceLayer`].
pub struct ResilienceService<S, C = ByErrorKind> {
    inner: S,
    stack: Arc<ResilienceStack<C>>,
}

impl<S: Clone, C> Clone for ResilienceService<S, C> {
    fn clone(&self) -> Self {
        ResilienceService {
            inner: self.inner.clone(),
            stack: Arc::clone(&self.stack),
        }
    }
}

impl<S: fmt::Debug, C: fmt::Debug> fmt::Debug for ResilienceService<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResilienceService")
            .field("inner", &self.inner)
            .field("stack", &self.stack)
            .finish()
    }
}

/// The boxed response future of [`ResilienceService`].
pub type ResilienceFuture<T, E> =
    Pin<Box<dyn Future<Output = Result<T, ResilienceError<E>>> + Send + 'static>>;

impl<S, C, Req> Service<Req> for ResilienceService<S, C>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: Send,
    Req: Clone + Send + 'static,
    C: Classifier<S::Error> + Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = ResilienceError<S::Error>;
    type Future = ResilienceFuture<S::Response, S::Error>;

    /// Always ready: each attempt makes its own clone of the inner service
    /// ready, inside the stack's timeout.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let stack = Arc::clone(&self.stack);
        let service = self.inner.clone();
        Box::pin(async move {
            stack
                .call(move || {
                    let mut service = service.clone();
                    let request = request.clone();
                    async move {
                        std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
                        service.call(request).await
                    }
                })
                .await
        })
    }
}
