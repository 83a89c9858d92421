//! [`OutboxRelay`]: claims due messages, publishes them, settles them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use vextrus_kernel::{ErrorKind, HasErrorKind};
use vextrus_resilience::{CircuitBreaker, CircuitBreakerConfig};

use super::error::OutboxError;
use super::message::OutboxMessage;
use super::metrics as m;
use super::store::{
    ClaimRequest, DeadLetterPolicy, DeadLetters, FailureOutcome, OutboxClaimer, OutboxResult,
    PublishFailure,
};
use crate::store::WakeUps;
use crate::transport::{MessageId, OutboundMessage, Transport, TransportError};

/// Capped exponential backoff with full jitter, the same arithmetic as
/// `vextrus_resilience::RetryPolicy`: the cap of attempt `n` is
/// `min(max, min_delay * factor^(n-1))` and the delay is drawn uniformly
/// from `[0, cap]`.
///
/// ```
/// use std::time::Duration;
/// use vextrus_core::outbox::Backoff;
///
/// let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 2.0);
/// assert_eq!(b.cap(1), Duration::from_millis(100));
/// assert_eq!(b.cap(3), Duration::from_millis(400));
/// assert_eq!(b.cap(10), Duration::from_secs(1));
/// assert!(b.delay(3) <= Duration::from_millis(400));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The first cap.
    pub min_delay: Duration,
    /// The largest cap.
    pub max_delay: Duration,
    /// Growth per attempt.
    pub factor: f64,
}

impl Default for Backoff {
    /// 100 ms, doubling, up to 30 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(30), 2.0)
    }
}

impl Backoff {
    /// A backoff from `min_delay`, growing by `factor`, capped at `max_delay`.
    pub fn new(min_delay: Duration, max_delay: Duration, factor: f64) -> Self {
        Self {
            min_delay,
            max_delay,
            factor: factor.max(1.0),
        }
    }

    /// The cap after the `attempt`-th failure (1-based).
    pub fn cap(&self, attempt: u32) -> Duration {
        let exp = self.factor.powi(attempt.saturating_sub(1).min(64) as i32);
        let secs = self.min_delay.as_secs_f64() * exp;
        if !secs.is_finite() || secs >= self.max_delay.as_secs_f64() {
            self.max_delay.max(self.min_delay)
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// A delay drawn uniformly from `[0, cap(attempt)]` (full jitter).
    pub fn delay(&self, attempt: u32) -> Duration {
        let cap = u64::try_from(self.cap(attempt).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::rng().random_range(0..=cap))
    }
}

/// How an [`OutboxRelay`] runs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The relay's name: the prefix of its workers' names (make it unique
    /// per process, e.g. host and pid) and the breaker's and metrics' label.
    pub name: String,
    /// Worker tasks started by [`OutboxRelay::spawn`].
    pub workers: usize,
    /// Messages claimed per batch.
    pub batch_size: usize,
    /// Claim lease (longer than a batch's publish time).
    pub lease: Duration,
    /// Longest sleep between claims when there are no wake-ups.
    pub poll_interval: Duration,
    /// Failed attempts before a message becomes a dead letter.
    pub max_attempts: u32,
    /// Backoff between attempts of one message.
    pub backoff: Backoff,
    /// What a dead letter does to its key.
    pub dead_letter_policy: DeadLetterPolicy,
    /// The circuit breaker in front of the transport.
    pub breaker: CircuitBreakerConfig,
    /// How often backlog gauges are refreshed.
    pub metrics_interval: Duration,
}

impl RelayConfig {
    /// Defaults: 1 worker, batches of 256, lease 30 s, poll every 500 ms,
    /// 10 attempts, [`Backoff::default`], [`DeadLetterPolicy::SkipKey`],
    /// the breaker's defaults, gauges every second.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            workers: 1,
            batch_size: 256,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(500),
            max_attempts: 10,
            backoff: Backoff::default(),
            dead_letter_policy: DeadLetterPolicy::SkipKey,
            breaker: CircuitBreakerConfig::new(),
            metrics_interval: Duration::from_secs(1),
        }
    }
}

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Messages claimed.
    pub claimed: usize,
    /// Confirmed by the broker and marked published.
    pub published: usize,
    /// Failed and rescheduled.
    pub retrying: usize,
    /// Failed and dead-lettered.
    pub dead: usize,
    /// Given back unattempted (an earlier message of the key failed, or the
    /// breaker was open).
    pub released: usize,
    /// The breaker refused the batch.
    pub breaker_open: bool,
}

/// The relay engine: workers that claim due messages from an
/// [`OutboxClaimer`], publish them through a [`Transport`] behind a circuit
/// breaker, and mark them published only after the broker confirmed.
///
/// Per-key order: a batch is published in rounds, round `r` holding the
/// `r`-th claimed message of every key, so different keys are pipelined
/// while one key's messages go strictly one after the other; after a
/// failure the key's remaining messages in the batch are released
/// unattempted. A failed message is rescheduled in the store
/// (`next_attempt_at` = now + [`Backoff::delay`]); an error of kind
/// [`ErrorKind::Validation`] (too large, bad headers) dead-letters at once,
/// others after [`RelayConfig::max_attempts`].
///
/// Circuit breaker: one batch is one call; it counts as a failure when it
/// had transient failures and no confirmation at all (the broker looks
/// down). While the breaker is open, claimed batches are released without
/// spending attempts (only the breaker's trial batches spend them), so an
/// outage does not turn the backlog into dead letters; the workers sleep
/// for the breaker's open wait (at most the poll interval) between tries.
///
/// ```
/// use vextrus_core::outbox::{DeadLetters, InMemoryOutbox, OutboxRelay, OutboxStore, RelayConfig};
/// use vextrus_core::transport::{InProcessTransport, OutboundMessage};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let outbox = InMemoryOutbox::new();
/// let broker = InProcessTransport::new();
/// broker.declare("orders");
/// outbox.enqueue(&[OutboundMessage::new("orders", "o-1", b"{}".to_vec())]).await.unwrap();
///
/// let relay = OutboxRelay::new(outbox.clone(), broker.clone(), RelayConfig::new("relay-1"));
/// let report = relay.drain("relay-1-0").await.unwrap();
/// assert_eq!(report.published, 1);
/// assert_eq!(broker.published("orders").len(), 1);
/// assert_eq!(outbox.status().await.unwrap().pending, 0);
/// # });
/// ```
pub struct OutboxRelay<S, T> {
    inner: Arc<RelayInner<S, T>>,
}

struct RelayInner<S, T> {
    store: S,
    transport: T,
    config: RelayConfig,
    breaker: CircuitBreaker,
}

impl<S, T> Clone for OutboxRelay<S, T> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S, T> std::fmt::Debug for OutboxRelay<S, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxRelay")
            .field("config", &self.inner.config)
            .field("breaker", &self.inner.breaker.state())
            .finish()
    }
}

impl<S, T> OutboxRelay<S, T>
where
    S: OutboxClaimer + DeadLetters + 'static,
    T: Transport + 'static,
{
    /// A relay over `store` and `transport`.
    pub fn new(store: S, transport: T, config: RelayConfig) -> Self {
        let breaker = CircuitBreaker::new(
            format!("outbox-relay-{}", config.name),
            config.breaker.clone(),
        );
        Self {
            inner: Arc::new(RelayInner {
                store,
                transport,
                config,
                breaker,
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RelayConfig {
        &self.inner.config
    }

    /// The circuit breaker in front of the transport.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.inner.breaker
    }

    /// Claims one batch as `worker`, publishes it and settles it.
    pub async fn relay_once(&self, worker: &str) -> OutboxResult<BatchReport> {
        let inner = &*self.inner;
        let cfg = &inner.config;
        let batch = inner
            .store
            .claim(&ClaimRequest {
                worker: worker.to_owned(),
                limit: cfg.batch_size.max(1),
                lease: cfg.lease,
                dead_letter_policy: cfg.dead_letter_policy,
            })
            .await?;
        let mut report = BatchReport {
            claimed: batch.len(),
            ..BatchReport::default()
        };
        if batch.is_empty() {
            return Ok(report);
        }
        let Ok(permit) = inner.breaker.try_acquire() else {
            let ids: Vec<MessageId> = batch.iter().map(OutboxMessage::id).collect();
            inner.store.release(worker, &ids).await?;
            report.released = ids.len();
            report.breaker_open = true;
            return Ok(report);
        };

        // Rounds: the r-th message of every key.
        let mut rounds: Vec<Vec<&OutboxMessage>> = Vec::new();
        let mut depth: HashMap<&str, usize> = HashMap::new();
        for msg in &batch {
            let d = depth.entry(msg.message.partition_key.as_str()).or_insert(0);
            if rounds.len() <= *d {
                rounds.push(Vec::new());
            }
            rounds[*d].push(msg);
            *d += 1;
        }
        let mut blocked: HashSet<&str> = HashSet::new();
        let mut released = Vec::new();
        // The batch counts against the breaker only when the broker looks
        // down: transient failures and not one confirmation. A rejection of
        // one message, or a few flaky publishes among confirmed ones, say
        // nothing of the broker (counting them would open the breaker at a
        // 2% failure rate, since nearly every large batch has one).
        let mut transient = false;
        let missing =
            TransportError::Other("the transport returned fewer results than messages".into());
        for round in rounds {
            let (go, stop): (Vec<&OutboxMessage>, Vec<&OutboxMessage>) = round
                .into_iter()
                .partition(|m| !blocked.contains(m.message.partition_key.as_str()));
            released.extend(stop.iter().map(|m| m.id()));
            if go.is_empty() {
                continue;
            }
            let out: Vec<OutboundMessage> = go.iter().map(|m| m.message.clone()).collect();
            let results = inner.transport.publish_batch(&out).await;
            let mut ok = Vec::with_capacity(go.len());
            let now = Utc::now();
            for (i, msg) in go.iter().enumerate() {
                let result = match results.get(i) {
                    Some(Ok(())) => Ok(()),
                    Some(Err(e)) => Err(e),
                    None => Err(&missing),
                };
                match result {
                    Ok(()) => {
                        ok.push(msg.id());
                        let latency = (now - msg.message.created_at)
                            .to_std()
                            .unwrap_or(Duration::ZERO);
                        ::metrics::histogram!(m::OUTBOX_PUBLISH_LATENCY_SECONDS, m::LABEL_RELAY => cfg.name.clone())
                            .record(latency.as_secs_f64());
                    }
                    Err(e) => {
                        let kind = e.kind();
                        transient |= kind == ErrorKind::Transient;
                        blocked.insert(msg.message.partition_key.as_str());
                        ::metrics::counter!(m::OUTBOX_PUBLISH_FAILURES_TOTAL,
                            m::LABEL_RELAY => cfg.name.clone(), m::LABEL_KIND => kind.as_str())
                        .increment(1);
                        let failure = PublishFailure {
                            error: e.to_string(),
                            retry_in: cfg.backoff.delay(msg.attempts + 1),
                            max_attempts: cfg.max_attempts.max(1),
                            dead_now: kind == ErrorKind::Validation,
                        };
                        match inner.store.mark_failed(msg.id(), &failure).await? {
                            FailureOutcome::Retrying { attempts, .. } => {
                                tracing::debug!(id = %msg.id(), attempts, error = %e, "publish failed; rescheduled");
                                report.retrying += 1;
                            }
                            FailureOutcome::Dead { attempts } => {
                                tracing::warn!(id = %msg.id(), attempts, error = %e, "outbox message dead-lettered");
                                ::metrics::counter!(m::OUTBOX_DEAD_LETTERED_TOTAL, m::LABEL_RELAY => cfg.name.clone())
                                    .increment(1);
                                report.dead += 1;
                            }
                            FailureOutcome::Settled => {}
                        }
                    }
                }
            }
            if !ok.is_empty() {
                inner.store.mark_published(&ok).await?;
                ::metrics::counter!(m::OUTBOX_PUBLISHED_TOTAL, m::LABEL_RELAY => cfg.name.clone())
                    .increment(ok.len() as u64);
                report.published += ok.len();
            }
        }
        if !released.is_empty() {
            inner.store.release(worker, &released).await?;
            report.released = released.len();
        }
        if transient && report.published == 0 {
            permit.record_error_kind(ErrorKind::Transient);
        } else {
            permit.record_success();
        }
        Ok(report)
    }

    /// Runs batches as `worker` until a claim comes back empty; the sum of
    /// their reports. Stops early (returning what it did) if the breaker
    /// refuses a batch.
    pub async fn drain(&self, worker: &str) -> OutboxResult<BatchReport> {
        let mut total = BatchReport::default();
        loop {
            let r = self.relay_once(worker).await?;
            total.claimed += r.claimed;
            total.published += r.published;
            total.retrying += r.retrying;
            total.dead += r.dead;
            total.released += r.released;
            total.breaker_open |= r.breaker_open;
            if r.claimed == 0 || r.breaker_open {
                return Ok(total);
            }
        }
    }

    /// Refreshes the backlog gauges from [`DeadLetters::status`].
    pub async fn record_gauges(&self) -> OutboxResult<()> {
        let s = self.inner.store.status().await?;
        let relay = self.inner.config.name.clone();
        ::metrics::gauge!(m::OUTBOX_BACKLOG, m::LABEL_RELAY => relay.clone()).set(s.pending as f64);
        ::metrics::gauge!(m::OUTBOX_DEAD_LETTERS, m::LABEL_RELAY => relay.clone())
            .set(s.dead as f64);
        ::metrics::gauge!(m::OUTBOX_OLDEST_PENDING_AGE_SECONDS, m::LABEL_RELAY => relay)
            .set(s.oldest_pending_age.map_or(0.0, |d| d.as_secs_f64()));
        Ok(())
    }

    /// Starts [`RelayConfig::workers`] worker tasks, named
    /// `{name}-{i}`. Each claims and publishes batches back to back while
    /// there is work, then waits for a wake-up or the poll interval. Stop
    /// them with [`RelayHandle::shutdown`]: each finishes its batch first.
    pub fn spawn(&self) -> RelayHandle {
        let (stop, stopped) = watch::channel(false);
        let tasks = (0..self.inner.config.workers.max(1))
            .map(|i| {
                let relay = self.clone();
                let mut stopped = stopped.clone();
                let worker = format!("{}-{i}", relay.inner.config.name);
                tokio::spawn(async move { relay.worker_loop(&worker, &mut stopped).await })
            })
            .collect();
        RelayHandle { stop, tasks }
    }

    async fn worker_loop(&self, worker: &str, stopped: &mut watch::Receiver<bool>) {
        let cfg = &self.inner.config;
        let mut wake = match self.inner.store.wake_ups().await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(worker, error = %e, "no wake-ups; polling only");
                WakeUps::polling()
            }
        };
        let mut gauges_at = Instant::now();
        while !*stopped.borrow() {
            if gauges_at.elapsed() >= cfg.metrics_interval {
                gauges_at = Instant::now();
                if let Err(e) = self.record_gauges().await {
                    tracing::debug!(worker, error = %e, "outbox status unavailable");
                }
            }
            let pause = match self.relay_once(worker).await {
                Ok(r) if r.breaker_open => Some(
                    cfg.breaker
                        .get_wait_duration_in_open()
                        .min(cfg.poll_interval),
                ),
                // A full or partly failed batch: go again at once.
                Ok(r) if r.claimed > 0 => None,
                Ok(_) => {
                    tokio::select! {
                        _ = wake.wait(cfg.poll_interval) => {}
                        _ = stopped.changed() => {}
                    }
                    None
                }
                Err(e) => {
                    tracing::warn!(worker, error = %e, "relay batch failed");
                    Some(cfg.poll_interval)
                }
            };
            if let Some(p) = pause {
                tokio::select! {
                    () = tokio::time::sleep(p) => {}
                    _ = stopped.changed() => {}
                }
            }
        }
    }
}

/// The running workers of [`OutboxRelay::spawn`].
#[derive(Debug)]
pub struct RelayHandle {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RelayHandle {
    /// Asks every worker to stop after its current batch and waits for them.
    pub async fn shutdown(self) -> Result<(), OutboxError> {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.await.map_err(|e| OutboxError::Backend(Box::new(e)))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{InMemoryOutbox, OutboxStore};
    use crate::transport::InProcessTransport;

    #[test]
    fn backoff_caps_grow_and_jitter_stays_under_cap() {
        let b = Backoff::new(Duration::from_millis(10), Duration::from_millis(100), 3.0);
        assert_eq!(b.cap(0), Duration::from_millis(10));
        assert_eq!(b.cap(2), Duration::from_millis(30));
        assert_eq!(b.cap(3), Duration::from_millis(90));
        assert_eq!(b.cap(4), Duration::from_millis(100));
        assert_eq!(b.cap(u32::MAX), Duration::from_millis(100));
        for n in 1..20 {
            assert!(b.delay(n) <= b.cap(n));
        }
    }

    #[tokio::test]
    async fn open_breaker_releases_the_batch_without_attempts() {
        let outbox = InMemoryOutbox::new();
        let broker = InProcessTransport::new(); // "orders" undeclared: every publish fails
        let mut cfg = RelayConfig::new("breaker");
        cfg.breaker = CircuitBreakerConfig::new()
            .minimum_calls(1)
            .failure_rate_threshold(50.0)
            .failure_kinds([ErrorKind::NotFound])
            .wait_duration_in_open(Duration::from_secs(3600));
        let relay = OutboxRelay::new(outbox.clone(), broker, cfg);
        let a = OutboundMessage::new("orders", "a", vec![]);
        outbox.enqueue(std::slice::from_ref(&a)).await.unwrap();
        // NotFound is not transient: it never opens the breaker.
        let r = relay.relay_once("w").await.unwrap();
        assert_eq!((r.retrying, r.breaker_open), (1, false));
        assert_eq!(
            relay.breaker().state(),
            vextrus_resilience::CircuitState::Closed
        );

        let outbox = InMemoryOutbox::new();
        let mut cfg = RelayConfig::new("breaker-2");
        cfg.breaker = CircuitBreakerConfig::new()
            .minimum_calls(1)
            .wait_duration_in_open(Duration::from_secs(3600));
        let relay = OutboxRelay::new(outbox.clone(), Flaky, cfg);
        outbox
            .enqueue(&[
                OutboundMessage::new("orders", "a", vec![]),
                OutboundMessage::new("orders", "b", vec![]),
            ])
            .await
            .unwrap();
        let r = relay.relay_once("w").await.unwrap();
        assert_eq!(r.retrying, 2);
        assert_eq!(
            relay.breaker().state(),
            vextrus_resilience::CircuitState::Open
        );
        // Make them due again: the open breaker gives the batch back untouched.
        for m in outbox.rows() {
            outbox
                .mark_failed(
                    m.id(),
                    &PublishFailure {
                        error: "x".into(),
                        retry_in: Duration::ZERO,
                        max_attempts: 10,
                        dead_now: false,
                    },
                )
                .await
                .unwrap();
        }
        let r = relay.relay_once("w").await.unwrap();
        assert!(r.breaker_open);
        assert_eq!((r.claimed, r.released, r.retrying), (2, 2, 0));
        assert!(
            outbox.rows().iter().all(|m| m.attempts == 2),
            "no attempt was spent"
        );
        assert_eq!(
            relay.relay_once("w2").await.unwrap().claimed,
            2,
            "released, claimable"
        );
    }

    struct Flaky;

    impl Transport for Flaky {
        async fn publish(&self, _m: &OutboundMessage) -> Result<(), TransportError> {
            Err(TransportError::Unavailable("down".into()))
        }
    }
}
