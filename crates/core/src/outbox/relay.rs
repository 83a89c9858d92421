//! [`OutboxRelay`]: claims due messages, publishes them, settles them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::future::join_all;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{Instrument, Span};
use vextrus_kernel::{ErrorKind, HasErrorKind};
use vextrus_resilience::{BreakerRegistry, CircuitBreaker, CircuitBreakerConfig};
use vextrus_telemetry::{
    continue_trace, extract_headers_lenient, inject_trace_context, spans, trace_context_of,
};

use super::error::OutboxError;
use super::message::OutboxMessage;
use super::metrics as m;
use super::store::{
    ClaimRequest, DeadLetterPolicy, DeadLetters, FailureOutcome, OutboxClaimer, OutboxResult,
    PublishFailure,
};
use crate::store::WakeUps;
use crate::transport::{MessageId, OutboundMessage, Transport, TransportError};

pub use super::backoff::Backoff;

/// How the relay publishes the messages of one partition key that share a
/// batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum KeyPipelining {
    /// One message of a key in flight at a time: a key's next message is
    /// sent only after the broker confirmed the one before it, while
    /// different keys are in flight together (each key a chain of
    /// [`Transport::publish`] calls, all chains at once). Per-key order on
    /// the broker holds whatever fails and whichever transport is used.
    #[default]
    OneAtATime,
    /// The whole batch goes to [`Transport::publish_batch`] at once, in claim
    /// (sequence) order, so a key's messages are in flight together. For
    /// transports that store what they are given in submission order per
    /// key (`KafkaTransport`: idempotent producer, one partition per key;
    /// `JetStreamTransport`: one connection, acks in order).
    ///
    /// While messages are confirmed, per-key order is the same as with
    /// [`KeyPipelining::OneAtATime`]. When a message fails, its key's later
    /// messages of the batch are released, not marked, even if the broker
    /// confirmed them; so when the broker did store one of them, it is there
    /// *before* the failed message's retry (and again after it, under the
    /// same id: consumers deduplicate). Choose this only when such a
    /// failure also fails the key's later messages (the broker or the
    /// connection is down), or when a rare out-of-order duplicate is
    /// acceptable.
    Batch,
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
    /// How a key's messages of one batch are published.
    pub key_pipelining: KeyPipelining,
    /// The circuit breaker in front of the transport.
    pub breaker: CircuitBreakerConfig,
    /// The name of the downstream the breaker guards, shared through
    /// [`BreakerRegistry::global`]: relays (and any other caller) of one
    /// process naming the same downstream (e.g. `"nats://broker-1"`) share
    /// one breaker, so when it opens for one it is open for all (the
    /// registry keeps the config of whoever made it first). `None` (the
    /// default): the relay has a breaker of its own, `outbox-relay-{name}`.
    pub breaker_name: Option<String>,
    /// How often backlog gauges are refreshed.
    pub metrics_interval: Duration,
}

impl RelayConfig {
    /// Defaults: 1 worker, batches of 256, lease 30 s, poll every 500 ms,
    /// 10 attempts, [`Backoff::default`], [`DeadLetterPolicy::SkipKey`],
    /// [`KeyPipelining::OneAtATime`], the breaker's defaults, gauges every
    /// second.
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
            key_pipelining: KeyPipelining::OneAtATime,
            breaker: CircuitBreakerConfig::new(),
            breaker_name: None,
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
/// Per-key order: the store hands a key to one worker at a time (see
/// [`super::store`]); within a batch, keys are published concurrently and a
/// key's messages in sequence order, as [`RelayConfig::key_pipelining`]
/// says (by default one at a time per key). After a failure the key's
/// remaining messages in the batch are released unmarked.
///
/// Settling: one batch is settled with one [`OutboxClaimer::settle`]: every
/// confirmed message published, each failed one recorded (as
/// [`OutboxClaimer::mark_failed`]) and the rest released. A failed message
/// is rescheduled in the store (`next_attempt_at` = now +
/// [`Backoff::delay`]); an error of kind [`ErrorKind::Validation`] (too
/// large, bad headers) dead-letters at once, others after
/// [`RelayConfig::max_attempts`].
///
/// Pipelining: each worker of [`OutboxRelay::spawn`] claims its next batch
/// while the current one is published and settled. The two batches are
/// claimed under two names, the worker's name and `{worker}#2`, alternately,
/// so a worker never re-claims (as its own) messages it is still
/// publishing; the store's per-key rule keeps their keys apart.
///
/// Tracing: each message is published inside a
/// [`vextrus_telemetry::spans::outbox_publish`] span whose parent is the
/// trace context stored in the message's `traceparent`/`tracestate` headers
/// (the span that enqueued it). When an OpenTelemetry layer records the
/// span, the message goes to the transport with the publish span's own
/// context in those headers, so the consumer's span is the publish span's
/// child in the same trace; the stored row is not changed. With
/// [`KeyPipelining::Batch`] every message's span covers the whole
/// [`Transport::publish_batch`] call. Without an interested subscriber the
/// spans are disabled and cost nothing beyond the check.
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
    breaker: Arc<CircuitBreaker>,
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

/// One message's publish outcome: `None` when it was not attempted.
type Outcome = Option<Result<(), TransportError>>;

impl<S, T> OutboxRelay<S, T>
where
    S: OutboxClaimer + DeadLetters + 'static,
    T: Transport + 'static,
{
    /// A relay over `store` and `transport`.
    pub fn new(store: S, transport: T, config: RelayConfig) -> Self {
        let breaker = match &config.breaker_name {
            Some(name) => {
                BreakerRegistry::global().get_or_create_with(name, || config.breaker.clone())
            }
            None => Arc::new(CircuitBreaker::new(
                format!("outbox-relay-{}", config.name),
                config.breaker.clone(),
            )),
        };
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
        let batch = self.claim(worker).await?;
        self.publish_and_settle(worker, batch).await
    }

    async fn claim(&self, worker: &str) -> OutboxResult<Vec<OutboxMessage>> {
        let cfg = &self.inner.config;
        self.inner
            .store
            .claim(&ClaimRequest {
                worker: worker.to_owned(),
                limit: cfg.batch_size.max(1),
                lease: cfg.lease,
                dead_letter_policy: cfg.dead_letter_policy,
            })
            .await
    }

    /// Publishes a batch `worker` claimed and settles it.
    async fn publish_and_settle(
        &self,
        worker: &str,
        batch: Vec<OutboxMessage>,
    ) -> OutboxResult<BatchReport> {
        let inner = &*self.inner;
        let cfg = &inner.config;
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
        // The messages move into the publish (no copy of payload or
        // headers); what the settle needs of each is kept beside them.
        let attempts: Vec<u32> = batch.iter().map(|m| m.attempts).collect();
        let mut messages: Vec<OutboundMessage> = batch.into_iter().map(|m| m.message).collect();
        let publishing = std::time::Instant::now();
        let outcomes = match cfg.key_pipelining {
            KeyPipelining::OneAtATime => self.publish_chains(&mut messages).await,
            KeyPipelining::Batch => self.publish_whole(&mut messages).await,
        };
        let all_ok = outcomes.iter().all(|o| matches!(o, Some(Ok(()))));
        // Per message, the relay counts published and failed below; the
        // batch's publish time goes to the histogram, by outcome.
        ::metrics::histogram!(m::OUTBOX_PUBLISH_SECONDS,
            m::LABEL_OUTCOME => if all_ok { "ok" } else { "error" })
        .record(publishing.elapsed().as_secs_f64());
        let now = Utc::now();

        // Walk the batch in sequence order: a key's first failure blocks the
        // key; its later messages are released whatever their outcome.
        let mut blocked: HashSet<&str> = HashSet::new();
        let mut confirmed = Vec::with_capacity(messages.len());
        let mut latencies = Vec::with_capacity(messages.len());
        let mut failed = Vec::new();
        let mut released = Vec::new();
        // The batch counts against the breaker only when the broker looks
        // down: transient failures and not one confirmation. A rejection of
        // one message, or a few flaky publishes among confirmed ones, say
        // nothing of the broker (counting them would open the breaker at a
        // 2% failure rate, since nearly every large batch has one).
        let mut transient = false;
        for ((msg, attempts), outcome) in messages.iter().zip(attempts).zip(outcomes) {
            let key = msg.partition_key.as_str();
            if blocked.contains(key) {
                released.push(msg.id);
                continue;
            }
            match outcome {
                Some(Ok(())) => {
                    confirmed.push(msg.id);
                    let latency = (now - msg.created_at).to_std().unwrap_or(Duration::ZERO);
                    latencies.push(latency.as_secs_f64());
                }
                Some(Err(e)) => {
                    transient |= e.kind() == ErrorKind::Transient;
                    blocked.insert(key);
                    failed.push((msg.id, attempts, e));
                }
                None => released.push(msg.id),
            }
        }
        if !latencies.is_empty() {
            // One histogram handle for the batch (a handle per message
            // would build the relay label each time).
            let histogram = ::metrics::histogram!(m::OUTBOX_PUBLISH_LATENCY_SECONDS,
                m::LABEL_RELAY => cfg.name.clone());
            for latency in latencies {
                histogram.record(latency);
            }
        }
        let failures: Vec<(MessageId, PublishFailure)> = failed
            .iter()
            .map(|(id, attempts, e)| {
                let kind = e.kind();
                ::metrics::counter!(m::OUTBOX_PUBLISH_FAILURES_TOTAL,
                    m::LABEL_RELAY => cfg.name.clone(), m::LABEL_KIND => kind.as_str())
                .increment(1);
                let failure = PublishFailure {
                    error: e.to_string(),
                    retry_in: cfg.backoff.delay(attempts + 1),
                    max_attempts: cfg.max_attempts.max(1),
                    dead_now: kind == ErrorKind::Validation,
                };
                (*id, failure)
            })
            .collect();
        // One call settles the batch (one transaction where the store can).
        let settled = inner
            .store
            .settle(worker, &confirmed, &failures, &released)
            .await?;
        if !confirmed.is_empty() {
            ::metrics::counter!(m::OUTBOX_PUBLISHED_TOTAL, m::LABEL_RELAY => cfg.name.clone())
                .increment(confirmed.len() as u64);
            report.published = confirmed.len();
        }
        for ((id, _, e), outcome) in failed.iter().zip(settled) {
            match outcome {
                FailureOutcome::Retrying { attempts, .. } => {
                    tracing::debug!(id = %id, attempts, error = %e, "publish failed; rescheduled");
                    report.retrying += 1;
                }
                FailureOutcome::Dead { attempts } => {
                    tracing::warn!(id = %id, attempts, error = %e, "outbox message dead-lettered");
                    ::metrics::counter!(m::OUTBOX_DEAD_LETTERED_TOTAL, m::LABEL_RELAY => cfg.name.clone())
                        .increment(1);
                    report.dead += 1;
                }
                FailureOutcome::Settled => {}
            }
        }
        report.released = released.len();
        if transient && report.published == 0 {
            permit.record_error_kind(ErrorKind::Transient);
        } else {
            permit.record_success();
        }
        Ok(report)
    }

    /// [`KeyPipelining::OneAtATime`]: one chain of publishes per key, every
    /// chain at once; a chain stops at its first failure. The messages move
    /// into their chains and come back in `batch`'s order.
    async fn publish_chains(&self, batch: &mut Vec<OutboundMessage>) -> Vec<Outcome> {
        let total = batch.len();
        let mut chains: Vec<Vec<(usize, OutboundMessage)>> = Vec::new();
        let mut chain_of: HashMap<String, usize> = HashMap::new();
        for (i, msg) in std::mem::take(batch).into_iter().enumerate() {
            let c = match chain_of.get(msg.partition_key.as_str()) {
                Some(&c) => c,
                None => {
                    chain_of.insert(msg.partition_key.clone(), chains.len());
                    chains.push(Vec::new());
                    chains.len() - 1
                }
            };
            chains[c].push((i, msg));
        }
        let transport = &self.inner.transport;
        let done = join_all(chains.into_iter().map(|chain| async move {
            let mut out = Vec::with_capacity(chain.len());
            let mut stopped = false;
            for (i, mut msg) in chain {
                if stopped {
                    out.push((i, msg, None));
                    continue;
                }
                let span = publish_span(&mut msg);
                let result = transport.publish(&msg).instrument(span).await;
                stopped = result.is_err();
                out.push((i, msg, Some(result)));
            }
            out
        }))
        .await;
        let mut slots: Vec<Option<(OutboundMessage, Outcome)>> = (0..total).map(|_| None).collect();
        for (i, msg, outcome) in done.into_iter().flatten() {
            slots[i] = Some((msg, outcome));
        }
        let mut outcomes = Vec::with_capacity(total);
        for (msg, outcome) in slots.into_iter().flatten() {
            batch.push(msg);
            outcomes.push(outcome);
        }
        outcomes
    }

    /// [`KeyPipelining::Batch`]: the whole batch in one
    /// [`Transport::publish_batch`], in sequence order.
    async fn publish_whole(&self, batch: &mut [OutboundMessage]) -> Vec<Outcome> {
        let spans: Vec<Span> = batch.iter_mut().map(publish_span).collect();
        // Each message's span lasts from here to the batch's confirmation.
        let results = self.inner.transport.publish_batch(batch).await;
        drop(spans);
        let mut results = results.into_iter();
        (0..batch.len())
            .map(|_| {
                Some(results.next().unwrap_or_else(|| {
                    Err(TransportError::Other(
                        "the transport returned fewer results than messages".into(),
                    ))
                }))
            })
            .collect()
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
    /// there is work (claiming the next batch, as `{name}-{i}#2` every other
    /// time, while the current one is published), then waits for a wake-up
    /// or the poll interval. Stop them with [`RelayHandle::shutdown`]: each
    /// finishes its batch first and gives back the one it claimed ahead.
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
        // Two claim names: the batch in flight holds one, the next claim
        // uses the other (a store hands a worker its own claims back).
        let lanes = [worker.to_owned(), format!("{worker}#2")];
        let mut lane = 0;
        // A batch claimed under `lanes[lane]` while the last one was published.
        let mut ahead: Option<Vec<OutboxMessage>> = None;
        let mut gauges_at = Instant::now();
        while !*stopped.borrow() {
            if gauges_at.elapsed() >= cfg.metrics_interval {
                gauges_at = Instant::now();
                if let Err(e) = self.record_gauges().await {
                    tracing::debug!(worker, error = %e, "outbox status unavailable");
                }
            }
            let batch = match ahead.take() {
                Some(batch) => batch,
                None => match self.claim(&lanes[lane]).await {
                    Ok(batch) => batch,
                    Err(e) => {
                        tracing::warn!(worker, error = %e, "outbox claim failed");
                        pause(cfg.poll_interval, stopped).await;
                        continue;
                    }
                },
            };
            if batch.is_empty() {
                tokio::select! {
                    _ = wake.wait(cfg.poll_interval) => {}
                    _ = stopped.changed() => {}
                }
                continue;
            }
            let next = 1 - lane;
            let (done, claimed) = tokio::join!(
                self.publish_and_settle(&lanes[lane], batch),
                self.claim(&lanes[next]),
            );
            lane = next;
            match claimed {
                Ok(batch) if !batch.is_empty() => ahead = Some(batch),
                Ok(_) => {}
                Err(e) => tracing::warn!(worker, error = %e, "outbox claim failed"),
            }
            match done {
                Ok(r) if r.breaker_open => {
                    let wait = cfg
                        .breaker
                        .get_wait_duration_in_open()
                        .min(cfg.poll_interval);
                    pause(wait, stopped).await;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(worker, error = %e, "relay batch failed");
                    pause(cfg.poll_interval, stopped).await;
                }
            }
        }
        if let Some(batch) = ahead {
            let ids: Vec<MessageId> = batch.iter().map(OutboxMessage::id).collect();
            if let Err(e) = self.inner.store.release(&lanes[lane], &ids).await {
                tracing::warn!(worker, error = %e, "could not give back a claimed batch; its lease will expire");
            }
        }
    }
}

/// The publish span of one message. When the span is recorded (an
/// OpenTelemetry layer is interested), it continues the trace stored in the
/// message's headers and its own `traceparent` (and `tracestate`) replace
/// them, so that a consumer's span becomes a child of the publish. Without
/// an interested subscriber the span is disabled and the message is left
/// as it is: nothing is parsed or copied.
fn publish_span(message: &mut OutboundMessage) -> Span {
    let span = spans::outbox_publish(message.id, &message.destination, None);
    if span.is_disabled() {
        return span;
    }
    if let Some(parent) = extract_headers_lenient(&message.headers) {
        // The span was just created and not entered: this cannot fail.
        if let Err(e) = continue_trace(&span, &parent) {
            tracing::debug!(id = %message.id, error = %e, "cannot continue the stored trace");
        }
    }
    if let Some(tc) = trace_context_of(&span) {
        inject_trace_context(&tc, &mut message.headers);
    }
    span
}

/// Sleeps for `duration` or until the stop signal.
async fn pause(duration: Duration, stopped: &mut watch::Receiver<bool>) {
    tokio::select! {
        () = tokio::time::sleep(duration) => {}
        _ = stopped.changed() => {}
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
    use crate::outbox::{InMemoryOutbox, OutboxStatus, OutboxStore};
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

    /// Records confirmed messages in order; fails each id in `fail` once.
    #[derive(Default)]
    struct Scripted {
        fail: std::sync::Mutex<HashSet<MessageId>>,
        log: std::sync::Mutex<Vec<OutboundMessage>>,
    }

    impl Scripted {
        fn failing(ids: &[MessageId]) -> Arc<Self> {
            let s = Self::default();
            s.fail.lock().unwrap().extend(ids.iter().copied());
            Arc::new(s)
        }

        fn logged(&self) -> Vec<MessageId> {
            self.log.lock().unwrap().iter().map(|m| m.id).collect()
        }
    }

    impl Transport for Scripted {
        async fn publish(&self, m: &OutboundMessage) -> Result<(), TransportError> {
            if self.fail.lock().unwrap().remove(&m.id) {
                return Err(TransportError::Unavailable("flaky".into()));
            }
            self.log.lock().unwrap().push(m.clone());
            Ok(())
        }
    }

    fn immediate(name: &str, pipelining: KeyPipelining) -> RelayConfig {
        let mut cfg = RelayConfig::new(name);
        cfg.backoff = Backoff::new(Duration::ZERO, Duration::ZERO, 1.0);
        cfg.key_pipelining = pipelining;
        cfg
    }

    #[tokio::test]
    async fn one_at_a_time_stops_a_key_at_its_failure_and_settles_once() {
        let outbox = InMemoryOutbox::new();
        let msgs: Vec<OutboundMessage> = ["a", "a", "a", "b", "b"]
            .iter()
            .map(|k| OutboundMessage::new("orders", *k, vec![]))
            .collect();
        outbox.enqueue(&msgs).await.unwrap();
        let ids: Vec<MessageId> = msgs.iter().map(|m| m.id).collect();
        let broker = Scripted::failing(&[ids[1]]);
        let relay = OutboxRelay::new(
            outbox.clone(),
            broker.clone(),
            immediate("chains", KeyPipelining::OneAtATime),
        );
        let r = relay.relay_once("w").await.unwrap();
        assert_eq!(
            (r.claimed, r.published, r.retrying, r.released),
            (5, 3, 1, 1)
        );
        let mut first = broker.logged();
        first.sort();
        let mut want = vec![ids[0], ids[3], ids[4]];
        want.sort();
        assert_eq!(first, want, "a's third message was never sent");
        assert_eq!(outbox.get(ids[2]).await.unwrap().unwrap().attempts, 0);
        relay.drain("w").await.unwrap();
        let a: Vec<MessageId> = broker
            .logged()
            .into_iter()
            .filter(|id| ids[..3].contains(id))
            .collect();
        assert_eq!(a, ids[..3].to_vec(), "key a in order, once each");
        assert_eq!(outbox.status().await.unwrap().pending, 0);
    }

    #[tokio::test]
    async fn batch_pipelining_releases_a_failed_keys_later_messages_unmarked() {
        let outbox = InMemoryOutbox::new();
        let msgs: Vec<OutboundMessage> = ["a", "b", "a", "a"]
            .iter()
            .map(|k| OutboundMessage::new("orders", *k, vec![]))
            .collect();
        outbox.enqueue(&msgs).await.unwrap();
        let ids: Vec<MessageId> = msgs.iter().map(|m| m.id).collect();
        let broker = Scripted::failing(&[ids[2]]);
        let relay = OutboxRelay::new(
            outbox.clone(),
            broker.clone(),
            immediate("batch", KeyPipelining::Batch),
        );
        let r = relay.relay_once("w").await.unwrap();
        assert_eq!(
            (r.claimed, r.published, r.retrying, r.released),
            (4, 2, 1, 1)
        );
        // The whole batch went out in sequence order; a's last message was
        // confirmed by the broker but is not marked: it waits for a's retry.
        assert_eq!(broker.logged(), vec![ids[0], ids[1], ids[3]]);
        let last = outbox.get(ids[3]).await.unwrap().unwrap();
        assert_eq!((last.status, last.attempts), (OutboxStatus::Pending, 0));
        assert_eq!(
            outbox.get(ids[0]).await.unwrap().unwrap().status,
            OutboxStatus::Published
        );
        relay.drain("w").await.unwrap();
        assert_eq!(
            broker.logged(),
            vec![ids[0], ids[1], ids[3], ids[2], ids[3]],
            "the retry, then the released message again"
        );
        assert_eq!(outbox.status().await.unwrap().pending, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_workers_keep_key_order_without_duplicates() {
        let outbox = InMemoryOutbox::new();
        let broker = Arc::new(Scripted::default());
        let mut cfg = immediate("lanes", KeyPipelining::OneAtATime);
        cfg.workers = 2;
        cfg.batch_size = 16;
        cfg.poll_interval = Duration::from_millis(5);
        let relay = OutboxRelay::new(outbox.clone(), broker.clone(), cfg);
        let mut want: HashMap<String, Vec<MessageId>> = HashMap::new();
        let msgs: Vec<OutboundMessage> = (0..600)
            .map(|i| OutboundMessage::new("orders", format!("k{}", i % 20), vec![]))
            .collect();
        // Every 7th message fails once.
        broker
            .fail
            .lock()
            .unwrap()
            .extend(msgs.iter().step_by(7).map(|m| m.id));
        for m in &msgs {
            want.entry(m.partition_key.clone()).or_default().push(m.id);
        }
        let handle = relay.spawn();
        for chunk in msgs.chunks(50) {
            outbox.enqueue(chunk).await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while outbox.status().await.unwrap().pending > 0 {
            assert!(Instant::now() < deadline, "relay stalled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        handle.shutdown().await.unwrap();
        let log = broker.log.lock().unwrap().clone();
        assert_eq!(log.len(), msgs.len(), "no duplicates");
        let mut seen: HashMap<String, Vec<MessageId>> = HashMap::new();
        for m in log {
            seen.entry(m.partition_key.clone()).or_default().push(m.id);
        }
        assert_eq!(seen, want);
    }

    #[tokio::test]
    async fn shutdown_gives_back_the_batch_claimed_ahead() {
        let outbox = InMemoryOutbox::new();
        let broker = InProcessTransport::new();
        broker.declare("orders");
        let mut cfg = RelayConfig::new("ahead");
        cfg.batch_size = 1;
        let relay = OutboxRelay::new(outbox.clone(), broker.clone(), cfg);
        let handle = relay.spawn();
        outbox
            .enqueue(&[
                OutboundMessage::new("orders", "a", vec![]),
                OutboundMessage::new("orders", "b", vec![]),
                OutboundMessage::new("orders", "c", vec![]),
            ])
            .await
            .unwrap();
        while broker.published("orders").is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        handle.shutdown().await.unwrap();
        // Whatever was not published is claimable by anyone at once.
        let left = outbox.status().await.unwrap().pending as usize;
        let other = OutboxRelay::new(outbox.clone(), broker.clone(), RelayConfig::new("other"));
        assert_eq!(other.drain("other-0").await.unwrap().published, left);
        assert_eq!(broker.published("orders").len(), 3);
    }

    struct Flaky;

    impl Transport for Flaky {
        async fn publish(&self, _m: &OutboundMessage) -> Result<(), TransportError> {
            Err(TransportError::Unavailable("down".into()))
        }
    }
}
