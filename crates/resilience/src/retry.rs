//! Retry with capped exponential backoff and full jitter.
//!
//! The backoff is vextrus's one formula ([`crate::backoff`]): full jitter, as
//! described in AWS's "Exponential Backoff and Jitter", draws the whole delay
//! uniformly from `[0, cap_n]` with
//! `cap_n = min(max_delay, min_delay * factor^(n-1))` after the `n`-th failed
//! attempt; it spreads competing callers out best and never waits longer than
//! the cap. The issue that asked for this crate suggested `backon` for the
//! arithmetic; it is not used: its builder's jitter is additive,
//! `d + U[0, d)`, which is not full jitter, and the saga engine and the
//! outbox need the cap of attempt `n` as a number to store (a due time),
//! where backon only offers an iterator of delays. The formula is a few lines
//! in [`crate::backoff`]. Everything else here is classification and wiring:
//!
//! - Only errors whose [`ErrorKind`] is in the retryable set are retried, by
//!   default [`ErrorKind::Transient`] alone. [`ErrorKind::Conflict`] is not
//!   retried by default: a conflict means someone else changed the state
//!   first, and sending the same command again fails the same way. The caller
//!   must reload the aggregate and decide again, which a retry layer cannot do.
//! - A server's `Retry-After` (read by the [`Classifier`]) is honoured: the wait
//!   is `max(retry_after, jittered delay)`.
//! - `max_attempts` counts every attempt, the first included.
//! - `max_elapsed` bounds the time from the first attempt's start: a retry is
//!   scheduled only if it would start before the budget runs out, so no
//!   attempt starts after `max_elapsed`, and no wait (not even one asked for
//!   by `Retry-After`) reaches past it; when the next wait would, the last
//!   error is returned at once instead of sleeping only to give up.
//!
//! All waiting is [`tokio::time::sleep`] and all time is
//! [`tokio::time::Instant`], so tests under a paused clock run instantly.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep};
use tower::{Layer, Service};
use vextrus_kernel::ErrorKind;

use crate::backoff::{backoff_cap, full_jitter};
use crate::classify::{ByErrorKind, Classifier, KindSet};
use crate::metrics as names;

/// What the retry policy decided after a failed attempt, reported to the
/// [`RetryPolicy::on_retry`] hook before it sleeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryEvent {
    /// The attempt that just failed, from 1.
    pub attempt: usize,
    /// The kind of its error.
    pub kind: ErrorKind,
    /// The backoff cap for this retry: `min(max_delay, min_delay * factor^(attempt-1))`.
    pub cap: Duration,
    /// The delay drawn uniformly from `[0, cap]` (full jitter).
    pub jittered: Duration,
    /// The server's `Retry-After`, if the classifier found one.
    pub retry_after: Option<Duration>,
    /// How long the policy sleeps: `max(jittered, retry_after)`.
    pub delay: Duration,
    /// Time since the first attempt started.
    pub elapsed: Duration,
}

type Hook = Arc<dyn Fn(&RetryEvent) + Send + Sync>;

/// How to retry: backoff, limits, which kinds to retry, how to classify.
///
/// Built with methods that take and return `self`. Defaults: first delay
/// 100 ms, factor 2, cap 10 s, 3 attempts, 30 s elapsed, retry
/// [`ErrorKind::Transient`] only, classify with [`ByErrorKind`].
///
/// ```
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use std::time::Duration;
/// use vextrus_kernel::{ErrorKind, HasErrorKind};
/// use vextrus_resilience::{RetryPolicy, retry};
///
/// #[derive(Debug)]
/// struct Flaky;
/// impl HasErrorKind for Flaky {
///     fn kind(&self) -> ErrorKind { ErrorKind::Transient }
/// }
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let policy = RetryPolicy::new()
///     .min_delay(Duration::from_millis(50))
///     .max_delay(Duration::from_secs(2))
///     .max_attempts(5)
///     .max_elapsed(Duration::from_secs(10));
///
/// let calls = AtomicU32::new(0);
/// let answer = retry(&policy, || async {
///     if calls.fetch_add(1, Ordering::SeqCst) < 2 { Err(Flaky) } else { Ok(42) }
/// })
/// .await;
/// assert_eq!(answer.unwrap(), 42);
/// assert_eq!(calls.load(Ordering::SeqCst), 3);
/// # }
/// ```
#[derive(Clone)]
pub struct RetryPolicy<C = ByErrorKind> {
    min_delay: Duration,
    max_delay: Duration,
    factor: f32,
    max_attempts: usize,
    max_elapsed: Option<Duration>,
    retry_on: KindSet,
    classifier: C,
    on_retry: Option<Hook>,
}

impl<C: fmt::Debug> fmt::Debug for RetryPolicy<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("min_delay", &self.min_delay)
            .field("max_delay", &self.max_delay)
            .field("factor", &self.factor)
            .field("max_attempts", &self.max_attempts)
            .field("max_elapsed", &self.max_elapsed)
            .field("retry_on", &self.retry_on)
            .field("classifier", &self.classifier)
            .field("on_retry", &self.on_retry.is_some())
            .finish()
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryPolicy {
    /// A policy with the defaults listed on [`RetryPolicy`].
    pub fn new() -> Self {
        RetryPolicy {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            factor: 2.0,
            max_attempts: 3,
            max_elapsed: Some(Duration::from_secs(30)),
            retry_on: KindSet::EMPTY.with(ErrorKind::Transient),
            classifier: ByErrorKind,
            on_retry: None,
        }
    }
}

impl<C> RetryPolicy<C> {
    /// The cap of the first retry's delay (the delay after the first failure
    /// is drawn from `[0, min_delay]`).
    pub fn min_delay(mut self, min_delay: Duration) -> Self {
        self.min_delay = min_delay;
        self
    }

    /// The largest cap any retry's delay can have.
    pub fn max_delay(mut self, max_delay: Duration) -> Self {
        self.max_delay = max_delay;
        self
    }

    /// How much the cap grows after each failure; values below 1 are taken as 1.
    pub fn factor(mut self, factor: f32) -> Self {
        self.factor = if factor.is_finite() {
            factor.max(1.0)
        } else {
            1.0
        };
        self
    }

    /// The most attempts in all, the first included; 0 is taken as 1 (no retry).
    pub fn max_attempts(mut self, max_attempts: usize) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// The time budget from the first attempt's start; no attempt starts after it.
    pub fn max_elapsed(mut self, max_elapsed: Duration) -> Self {
        self.max_elapsed = Some(max_elapsed);
        self
    }

    /// No time budget: only `max_attempts` limits the retries.
    pub fn without_max_elapsed(mut self) -> Self {
        self.max_elapsed = None;
        self
    }

    /// Which error kinds are retried (replaces the default `{Transient}`).
    ///
    /// Adding [`ErrorKind::Conflict`] is only right when the operation itself
    /// reloads state on every attempt (it is a closure that re-reads the
    /// aggregate before deciding); a fixed command replayed against changed
    /// state keeps conflicting.
    pub fn retry_on(mut self, kinds: impl IntoIterator<Item = ErrorKind>) -> Self {
        self.retry_on = KindSet::of(kinds);
        self
    }

    /// A hook called before each retry's sleep with what was decided, after
    /// the policy's own tracing event. Use it for metrics per call site, or
    /// in tests to see the delays.
    pub fn on_retry(mut self, hook: impl Fn(&RetryEvent) + Send + Sync + 'static) -> Self {
        self.on_retry = Some(Arc::new(hook));
        self
    }

    /// The same policy with another classifier.
    pub fn classify_with<C2>(self, classifier: C2) -> RetryPolicy<C2> {
        RetryPolicy {
            min_delay: self.min_delay,
            max_delay: self.max_delay,
            factor: self.factor,
            max_attempts: self.max_attempts,
            max_elapsed: self.max_elapsed,
            retry_on: self.retry_on,
            classifier,
            on_retry: self.on_retry,
        }
    }

    /// The classifier this policy uses.
    pub fn classifier(&self) -> &C {
        &self.classifier
    }

    /// Runs `op` until it succeeds, fails with a kind that is not retried, or
    /// a limit is reached; returns its last result.
    pub async fn retry<T, E, F, Fut>(&self, op: F) -> Result<T, E>
    where
        C: Classifier<E>,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run_with(&self.classifier, op).await
    }

    /// [`RetryPolicy::retry`] with an explicit classifier (the stack passes a
    /// lifted one that understands its own rejections).
    pub(crate) async fn run_with<T, E, K, F, Fut>(&self, classifier: &K, mut op: F) -> Result<T, E>
    where
        K: Classifier<E>,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut state = RetryState::start();
        loop {
            let error = match op().await {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            match self.decide(classifier, &error, &mut state) {
                Some(delay) => sleep(delay).await,
                None => return Err(error),
            }
        }
    }

    /// After a failed attempt: the delay before the next one, or `None` to stop.
    fn decide<E, K: Classifier<E>>(
        &self,
        classifier: &K,
        error: &E,
        state: &mut RetryState,
    ) -> Option<Duration> {
        let attempt = state.attempt;
        let kind = classifier.kind(error);
        if !self.retry_on.contains(kind) {
            tracing::debug!(attempt, %kind, "not retrying: error kind is not retryable");
            give_up("not_retryable");
            return None;
        }
        if attempt >= self.max_attempts {
            tracing::debug!(attempt, %kind, "not retrying: maximum attempts reached");
            give_up("max_attempts");
            return None;
        }
        let cap = backoff_cap(
            u32::try_from(attempt).unwrap_or(u32::MAX),
            self.min_delay,
            self.max_delay,
            f64::from(self.factor),
        );
        let jittered = full_jitter(cap);
        let retry_after = classifier.retry_after(error);
        let delay = retry_after.map_or(jittered, |ra| ra.max(jittered));
        let elapsed = state.started.elapsed();
        if let Some(budget) = self.max_elapsed
            && elapsed.saturating_add(delay) >= budget
        {
            tracing::debug!(
                attempt, %kind, ?delay, ?elapsed, ?budget,
                "not retrying: next attempt would start after the time budget"
            );
            give_up("max_elapsed");
            return None;
        }
        state.attempt += 1;
        let event = RetryEvent {
            attempt,
            kind,
            cap,
            jittered,
            retry_after,
            delay,
            elapsed,
        };
        tracing::debug!(attempt, %kind, ?delay, ?retry_after, "retrying after a failed attempt");
        ::metrics::counter!(names::RETRIES_TOTAL, names::LABEL_KIND => kind.as_str()).increment(1);
        if let Some(hook) = &self.on_retry {
            hook(&event);
        }
        Some(delay)
    }
}

fn give_up(reason: &'static str) {
    ::metrics::counter!(names::RETRY_GIVE_UPS_TOTAL, names::LABEL_REASON => reason).increment(1);
}

/// Where one retried call is: which attempt, and since when.
#[derive(Debug)]
struct RetryState {
    attempt: usize,
    started: Instant,
}

impl RetryState {
    fn start() -> Self {
        RetryState {
            attempt: 1,
            started: Instant::now(),
        }
    }
}

/// Runs `op` under `policy`: `retry(&policy, || async { ... }).await`.
///
/// See [`RetryPolicy`] for an example and the module docs for the rules.
pub async fn retry<T, E, C, F, Fut>(policy: &RetryPolicy<C>, op: F) -> Result<T, E>
where
    C: Classifier<E>,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    policy.retry(op).await
}

/// A tower layer that retries its service's calls under a [`RetryPolicy`].
///
/// The request must be `Clone` (each attempt sends a copy) and so must the
/// service (each call keeps a copy to call again, as tower's own retry does).
/// Before each retry the kept copy is made ready again; an error from its
/// `poll_ready` ends the call at once, unretried (a service that cannot get
/// ready is not a failed attempt to classify).
///
/// ```
/// use std::time::Duration;
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
/// use vextrus_kernel::{ErrorKind, HasErrorKind};
/// use vextrus_resilience::{RetryLayer, RetryPolicy};
///
/// #[derive(Debug)]
/// struct Busy;
/// impl HasErrorKind for Busy {
///     fn kind(&self) -> ErrorKind { ErrorKind::Transient }
/// }
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let svc = ServiceBuilder::new()
///     .layer(RetryLayer::new(RetryPolicy::new().max_attempts(2)))
///     .service(service_fn(|n: u32| async move { if n > 0 { Ok(n) } else { Err(Busy) } }));
/// assert_eq!(svc.clone().oneshot(7).await.unwrap(), 7);
/// assert!(svc.oneshot(0).await.is_err());
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RetryLayer<C = ByErrorKind> {
    policy: Arc<RetryPolicy<C>>,
}

impl<C> RetryLayer<C> {
    /// A layer applying `policy`.
    pub fn new(policy: RetryPolicy<C>) -> Self {
        RetryLayer {
            policy: Arc::new(policy),
        }
    }
}

impl<S, C> Layer<S> for RetryLayer<C> {
    type Service = Retry<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            policy: Arc::clone(&self.policy),
        }
    }
}

/// The service made by [`RetryLayer`].
#[derive(Debug, Clone)]
pub struct Retry<S, C = ByErrorKind> {
    inner: S,
    policy: Arc<RetryPolicy<C>>,
}

impl<S, C> Retry<S, C> {
    /// Wraps `inner` with `policy`.
    pub fn new(inner: S, policy: RetryPolicy<C>) -> Self {
        Retry {
            inner,
            policy: Arc::new(policy),
        }
    }
}

impl<S, C, Req> Service<Req> for Retry<S, C>
where
    S: Service<Req> + Clone,
    Req: Clone,
    C: Classifier<S::Error>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RetryFuture<S, Req, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let service = self.inner.clone();
        let future = self.inner.call(request.clone());
        RetryFuture {
            state: RetryStep::Calling { future },
            service,
            request,
            policy: Arc::clone(&self.policy),
            retry: RetryState::start(),
        }
    }
}

pin_project! {
    #[project = RetryStepProj]
    enum RetryStep<F> {
        Calling { #[pin] future: F },
        Sleeping { #[pin] sleep: Sleep },
        Readying,
    }
}

pin_project! {
    /// The response future of [`Retry`].
    pub struct RetryFuture<S, Req, C>
    where
        S: Service<Req>,
    {
        #[pin]
        state: RetryStep<S::Future>,
        service: S,
        request: Req,
        policy: Arc<RetryPolicy<C>>,
        retry: RetryState,
    }
}

impl<S, Req, C> fmt::Debug for RetryFuture<S, Req, C>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryFuture")
            .field("attempt", &self.retry.attempt)
            .finish_non_exhaustive()
    }
}

impl<S, Req, C> Future for RetryFuture<S, Req, C>
where
    S: Service<Req>,
    Req: Clone,
    C: Classifier<S::Error>,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                RetryStepProj::Calling { future } => match ready!(future.poll(cx)) {
                    Ok(response) => return Poll::Ready(Ok(response)),
                    Err(error) => {
                        match this
                            .policy
                            .decide(&this.policy.classifier, &error, this.retry)
                        {
                            Some(delay) => this.state.set(RetryStep::Sleeping {
                                sleep: sleep(delay),
                            }),
                            None => return Poll::Ready(Err(error)),
                        }
                    }
                },
                RetryStepProj::Sleeping { sleep } => {
                    ready!(sleep.poll(cx));
                    this.state.set(RetryStep::Readying);
                }
                RetryStepProj::Readying => {
                    ready!(this.service.poll_ready(cx))?;
                    let future = this.service.call(this.request.clone());
                    this.state.set(RetryStep::Calling { future });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct E(ErrorKind);
    impl vextrus_kernel::HasErrorKind for E {
        fn kind(&self) -> ErrorKind {
            self.0
        }
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_caps_grow_by_factor_up_to_max_delay() {
        let caps = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&caps);
        let policy = RetryPolicy::new()
            .min_delay(Duration::from_millis(125))
            .factor(2.0)
            .max_delay(Duration::from_secs(1))
            .max_attempts(6)
            .without_max_elapsed()
            .on_retry(move |e| seen.lock().unwrap().push(e.cap));
        let result: Result<(), E> = policy
            .retry(|| async { Err(E(ErrorKind::Transient)) })
            .await;
        assert_eq!(result, Err(E(ErrorKind::Transient)));
        assert_eq!(
            *caps.lock().unwrap(),
            vec![
                Duration::from_millis(125),
                Duration::from_millis(250),
                Duration::from_millis(500),
                Duration::from_secs(1),
                Duration::from_secs(1),
            ]
        );
    }

    #[test]
    fn full_jitter_of_zero_is_zero() {
        assert_eq!(full_jitter(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn builder_clamps_nonsense() {
        let policy = RetryPolicy::new().factor(0.5).max_attempts(0);
        assert_eq!(policy.factor, 1.0);
        assert_eq!(policy.max_attempts, 1);
        assert_eq!(RetryPolicy::new().factor(f32::NAN).factor, 1.0);
    }
}
