//! The outbox conformance suite: enqueue, claim, publish, fail, backoff,
//! dead letters, replay, discard, retention, per-key order under concurrent
//! relay workers, and unit-of-work rollback.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use vextrus_core::outbox::{
    ClaimRequest, DeadLetterPolicy, DeadLetters, FailureOutcome, OutboxClaimer, OutboxError,
    OutboxRelay, OutboxRetention, OutboxStatus, OutboxStore, PublishFailure, RelayConfig,
};
use vextrus_core::transport::{MessageId, OutboundMessage, TransportError};
use vextrus_core::unit_of_work::{InboxRecord, UnitOfWork};
use vextrus_core::{ExpectedVersion, NewEvent, StreamId};
use vextrus_kernel::EventMetadata;

use crate::transport::RecordingTransport;

/// What the outbox suite needs from a backend.
pub trait OutboxBackend: Send + Sync {
    /// The store under test: every outbox trait and the unit of work.
    type Store: OutboxStore
        + OutboxClaimer
        + DeadLetters
        + OutboxRetention
        + UnitOfWork
        + Clone
        + 'static;

    /// A fresh, empty store.
    fn fresh(&self) -> impl Future<Output = Self::Store> + Send;

    /// The committed version of `stream` in the store's event store.
    fn stream_version(
        &self,
        store: &Self::Store,
        stream: &StreamId,
    ) -> impl Future<Output = Option<u64>> + Send;

    /// Whether `consumer` has a committed inbox entry for `id`.
    fn inbox_has(
        &self,
        store: &Self::Store,
        consumer: &str,
        id: MessageId,
    ) -> impl Future<Output = bool> + Send;
}

fn msg(key: &str, i: usize) -> OutboundMessage {
    OutboundMessage::new("orders", key, format!("{i}").into_bytes())
}

fn req(worker: &str, policy: DeadLetterPolicy) -> ClaimRequest {
    ClaimRequest {
        worker: worker.into(),
        limit: 100,
        lease: Duration::from_secs(30),
        dead_letter_policy: policy,
    }
}

fn ids(rows: &[vextrus_core::outbox::OutboxMessage]) -> Vec<MessageId> {
    rows.iter().map(|m| m.id()).collect()
}

fn fail(dead_now: bool, retry_in: Duration, max_attempts: u32) -> PublishFailure {
    PublishFailure {
        error: "broker said no".into(),
        retry_in,
        max_attempts,
        dead_now,
    }
}

/// Enqueued messages are claimed in order, hidden from other workers while
/// claimed, and gone from the backlog once published.
pub async fn enqueue_claim_publish<B: OutboxBackend>(backend: &B) {
    let s = backend.fresh().await;
    let batch = vec![msg("a", 1), msg("b", 2), msg("a", 3)];
    s.enqueue(&batch).await.unwrap();
    let st = s.status().await.unwrap();
    assert_eq!((st.pending, st.dead, st.published), (3, 0, 0));
    assert!(st.oldest_pending_age.is_some());
    let claimed = s
        .claim(&req("w1", DeadLetterPolicy::SkipKey))
        .await
        .unwrap();
    assert_eq!(
        ids(&claimed),
        batch.iter().map(|m| m.id).collect::<Vec<_>>()
    );
    assert_eq!(
        claimed[0].message, batch[0],
        "row keeps the message as enqueued"
    );
    assert!(
        s.claim(&req("w2", DeadLetterPolicy::SkipKey))
            .await
            .unwrap()
            .is_empty()
    );
    s.mark_published(&ids(&claimed)).await.unwrap();
    s.mark_published(&ids(&claimed)).await.unwrap(); // idempotent
    let st = s.status().await.unwrap();
    assert_eq!((st.pending, st.published), (0, 3));
    assert_eq!(st.oldest_pending_age, None);
    let row = s.get(batch[1].id).await.unwrap().unwrap();
    assert_eq!(row.status, OutboxStatus::Published);
    assert!(row.published_at.is_some());
    assert!(
        s.claim(&req("w1", DeadLetterPolicy::SkipKey))
            .await
            .unwrap()
            .is_empty()
    );
}

/// Duplicate ids and malformed messages are typed errors and write nothing.
pub async fn bad_messages_are_rejected<B: OutboxBackend>(backend: &B) {
    let s = backend.fresh().await;
    let m = msg("a", 1);
    s.enqueue(std::slice::from_ref(&m)).await.unwrap();
    let fresh = msg("a", 2);
    let err = s.enqueue(&[fresh.clone(), m.clone()]).await.unwrap_err();
    assert!(
        matches!(err, OutboxError::DuplicateMessage(id) if id == m.id),
        "{err:?}"
    );
    assert!(s.get(fresh.id).await.unwrap().is_none(), "all or nothing");
    let mut empty = msg("a", 3);
    empty.destination.clear();
    assert!(matches!(
        s.enqueue(&[empty]).await,
        Err(OutboxError::InvalidMessage(_))
    ));
    let mut nokey = msg("a", 4);
    nokey.partition_key.clear();
    assert!(matches!(
        s.enqueue(&[nokey]).await,
        Err(OutboxError::InvalidMessage(_))
    ));
    assert_eq!(s.status().await.unwrap().pending, 1);
}

/// A failed message is rescheduled (not claimable before its next attempt,
/// holding back its key), counts attempts, keeps its last error, and dies
/// at the maximum; a non-retryable failure dies at once.
pub async fn failure_backoff_and_dead_letter<B: OutboxBackend>(backend: &B) {
    let s = backend.fresh().await;
    let (a1, a2, b1) = (msg("a", 1), msg("a", 2), msg("b", 1));
    s.enqueue(&[a1.clone(), a2.clone(), b1.clone()])
        .await
        .unwrap();
    let claimed = s.claim(&req("w", DeadLetterPolicy::SkipKey)).await.unwrap();
    assert_eq!(claimed.len(), 3);
    let out = s
        .mark_failed(a1.id, &fail(false, Duration::from_secs(3600), 3))
        .await
        .unwrap();
    assert!(
        matches!(out, FailureOutcome::Retrying { attempts: 1, .. }),
        "{out:?}"
    );
    s.release("w", &[a2.id]).await.unwrap();
    s.mark_published(&[b1.id]).await.unwrap();
    // a1 waits an hour, and a2 waits behind it.
    assert!(
        s.claim(&req("w", DeadLetterPolicy::SkipKey))
            .await
            .unwrap()
            .is_empty()
    );
    let row = s.get(a1.id).await.unwrap().unwrap();
    assert_eq!(row.attempts, 1);
    assert_eq!(row.last_error.as_deref(), Some("broker said no"));
    assert!(row.next_attempt_at > chrono::Utc::now() + chrono::Duration::minutes(59));

    let s = backend.fresh().await;
    let m = msg("a", 1);
    s.enqueue(std::slice::from_ref(&m)).await.unwrap();
    for attempt in 1..=3u32 {
        let c = s.claim(&req("w", DeadLetterPolicy::SkipKey)).await.unwrap();
        assert_eq!(ids(&c), vec![m.id], "attempt {attempt}");
        let out = s
            .mark_failed(m.id, &fail(false, Duration::ZERO, 3))
            .await
            .unwrap();
        if attempt < 3 {
            assert!(
                matches!(out, FailureOutcome::Retrying { attempts, .. } if attempts == attempt)
            );
        } else {
            assert_eq!(out, FailureOutcome::Dead { attempts: 3 });
        }
    }
    assert!(
        s.claim(&req("w", DeadLetterPolicy::SkipKey))
            .await
            .unwrap()
            .is_empty()
    );
    let st = s.status().await.unwrap();
    assert_eq!((st.pending, st.dead), (0, 1));
    let dead = s.dead_letters(10).await.unwrap();
    assert_eq!(ids(&dead), vec![m.id]);
    assert_eq!(dead[0].last_error.as_deref(), Some("broker said no"));
    // Settling a dead message again changes nothing.
    assert_eq!(
        s.mark_failed(m.id, &fail(false, Duration::ZERO, 3))
            .await
            .unwrap(),
        FailureOutcome::Settled
    );

    let n = msg("c", 1);
    s.enqueue(std::slice::from_ref(&n)).await.unwrap();
    s.claim(&req("w", DeadLetterPolicy::SkipKey)).await.unwrap();
    let out = s
        .mark_failed(n.id, &fail(true, Duration::ZERO, 10))
        .await
        .unwrap();
    assert_eq!(out, FailureOutcome::Dead { attempts: 1 });
}

/// With [`DeadLetterPolicy::SkipKey`] a key's later messages flow past its
/// dead letter; with [`DeadLetterPolicy::BlockKey`] they wait until it is
/// replayed (then it goes first) or discarded. Other keys flow either way.
pub async fn dead_letter_policy_skip_or_block<B: OutboxBackend>(backend: &B) {
    let s = backend.fresh().await;
    let (a1, a2, b1) = (msg("a", 1), msg("a", 2), msg("b", 1));
    s.enqueue(&[a1.clone(), a2.clone(), b1.clone()])
        .await
        .unwrap();
    s.claim(&req("w", DeadLetterPolicy::SkipKey)).await.unwrap();
    s.mark_failed(a1.id, &fail(true, Duration::ZERO, 5))
        .await
        .unwrap();
    s.release("w", &[a2.id, b1.id]).await.unwrap();

    let blocked = s
        .claim(&req("w", DeadLetterPolicy::BlockKey))
        .await
        .unwrap();
    assert_eq!(
        ids(&blocked),
        vec![b1.id],
        "BlockKey: a2 waits behind dead a1"
    );
    s.release("w", &[b1.id]).await.unwrap();
    let flowing = s.claim(&req("w", DeadLetterPolicy::SkipKey)).await.unwrap();
    assert_eq!(ids(&flowing), vec![a2.id, b1.id], "SkipKey: a2 flows");
    s.release("w", &ids(&flowing)).await.unwrap();

    // Replay under BlockKey: a1 goes first again, then a2.
    s.replay(a1.id).await.unwrap();
    let c = s
        .claim(&req("w", DeadLetterPolicy::BlockKey))
        .await
        .unwrap();
    assert_eq!(ids(&c), vec![a1.id, a2.id, b1.id]);
    s.mark_published(&ids(&c)).await.unwrap();

    // Discard unblocks a key.
    let s = backend.fresh().await;
    let (c1, c2) = (msg("c", 1), msg("c", 2));
    s.enqueue(&[c1.clone(), c2.clone()]).await.unwrap();
    s.claim(&req("w", DeadLetterPolicy::BlockKey))
        .await
        .unwrap();
    s.mark_failed(c1.id, &fail(true, Duration::ZERO, 5))
        .await
        .unwrap();
    s.release("w", &[c2.id]).await.unwrap();
    assert!(
        s.claim(&req("w", DeadLetterPolicy::BlockKey))
            .await
            .unwrap()
            .is_empty()
    );
    s.discard(c1.id).await.unwrap();
    assert!(s.get(c1.id).await.unwrap().is_none());
    let c = s
        .claim(&req("w", DeadLetterPolicy::BlockKey))
        .await
        .unwrap();
    assert_eq!(ids(&c), vec![c2.id]);
}

/// Replay keeps the message id and resets attempts; replaying or
/// discarding something that is not a dead letter is a typed error;
/// `replay_all` replays every dead letter.
pub async fn replay_keeps_id_and_discard<B: OutboxBackend>(backend: &B) {
    let s = backend.fresh().await;
    let batch: Vec<_> = (0..3).map(|i| msg(&format!("k{i}"), i)).collect();
    s.enqueue(&batch).await.unwrap();
    s.claim(&req("w", DeadLetterPolicy::SkipKey)).await.unwrap();
    for m in &batch {
        s.mark_failed(m.id, &fail(true, Duration::ZERO, 5))
            .await
            .unwrap();
    }
    assert_eq!(s.status().await.unwrap().dead, 3);
    s.replay(batch[0].id).await.unwrap();
    let row = s.get(batch[0].id).await.unwrap().unwrap();
    assert_eq!((row.status, row.attempts), (OutboxStatus::Pending, 0));
    assert_eq!(row.message, batch[0], "same id, same message");
    let c = s.claim(&req("w", DeadLetterPolicy::SkipKey)).await.unwrap();
    assert_eq!(ids(&c), vec![batch[0].id]);
    assert!(matches!(
        s.replay(batch[0].id).await,
        Err(OutboxError::NotDead(_))
    ));
    assert!(matches!(
        s.discard(batch[0].id).await,
        Err(OutboxError::NotDead(_))
    ));
    let unknown = MessageId::new();
    assert!(matches!(
        s.replay(unknown).await,
        Err(OutboxError::NotFound(_))
    ));
    assert!(matches!(
        s.discard(unknown).await,
        Err(OutboxError::NotFound(_))
    ));
    assert_eq!(s.replay_all().await.unwrap(), 2);
    assert_eq!(s.status().await.unwrap().dead, 0);
    assert_eq!(s.status().await.unwrap().pending, 3);
}

/// Retention deletes published rows older than the cut-off and nothing else.
pub async fn retention_purges_only_old_published<B: OutboxBackend>(backend: &B) {
    let s = backend.fresh().await;
    let (p, q, d) = (msg("a", 1), msg("b", 1), msg("c", 1));
    s.enqueue(&[p.clone(), q.clone(), d.clone()]).await.unwrap();
    s.claim(&req("w", DeadLetterPolicy::SkipKey)).await.unwrap();
    s.mark_published(&[p.id]).await.unwrap();
    s.mark_failed(d.id, &fail(true, Duration::ZERO, 1))
        .await
        .unwrap();
    assert_eq!(
        s.purge_published(Duration::from_secs(3600)).await.unwrap(),
        0
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        s.purge_published(Duration::from_millis(1)).await.unwrap(),
        1
    );
    assert!(s.get(p.id).await.unwrap().is_none());
    assert!(s.get(q.id).await.unwrap().is_some(), "pending kept");
    assert!(s.get(d.id).await.unwrap().is_some(), "dead kept");
}

/// A claim's lease holds off other workers until it expires; then another
/// worker takes the key over at the same message.
pub async fn lease_expiry_hands_over<B: OutboxBackend>(backend: &B) {
    let s = backend.fresh().await;
    let (a1, a2) = (msg("a", 1), msg("a", 2));
    s.enqueue(&[a1.clone(), a2.clone()]).await.unwrap();
    let mut short = req("w1", DeadLetterPolicy::SkipKey);
    short.lease = Duration::from_millis(200);
    short.limit = 1;
    assert_eq!(ids(&s.claim(&short).await.unwrap()), vec![a1.id]);
    assert!(
        s.claim(&req("w2", DeadLetterPolicy::SkipKey))
            .await
            .unwrap()
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let c = s
        .claim(&req("w2", DeadLetterPolicy::SkipKey))
        .await
        .unwrap();
    assert_eq!(ids(&c), vec![a1.id, a2.id]);
    // The first worker's late release does not steal w2's claim.
    s.release("w1", &[a1.id]).await.unwrap();
    assert!(
        s.claim(&req("w3", DeadLetterPolicy::SkipKey))
            .await
            .unwrap()
            .is_empty()
    );
}

/// [`OutboxClaimer::settle`] settles a batch at once: published rows are
/// published, each failure is recorded as `mark_failed` would (outcomes in
/// the order given), released rows are claimable again by others, a release
/// in another worker's name changes nothing, and a failure of a row that is
/// no longer pending is `Settled` (of an unknown id, `NotFound`).
pub async fn settle_publishes_fails_and_releases<B: OutboxBackend>(backend: &B) {
    let s = backend.fresh().await;
    let (a, b, c, d, e) = (
        msg("a", 1),
        msg("b", 1),
        msg("c", 1),
        msg("d", 1),
        msg("e", 1),
    );
    s.enqueue(&[a.clone(), b.clone(), c.clone(), d.clone(), e.clone()])
        .await
        .unwrap();
    let claimed = s
        .claim(&req("w1", DeadLetterPolicy::SkipKey))
        .await
        .unwrap();
    assert_eq!(ids(&claimed), vec![a.id, b.id, c.id, d.id, e.id]);
    let outcomes = s
        .settle(
            "w1",
            &[a.id],
            &[
                (b.id, fail(false, Duration::from_secs(3600), 5)),
                (c.id, fail(true, Duration::ZERO, 5)),
            ],
            &[d.id],
        )
        .await
        .unwrap();
    assert!(
        matches!(
            outcomes.as_slice(),
            [
                FailureOutcome::Retrying { attempts: 1, .. },
                FailureOutcome::Dead { attempts: 1 }
            ]
        ),
        "{outcomes:?}"
    );
    let row = |id| {
        let s = s.clone();
        async move { s.get(id).await.unwrap().unwrap() }
    };
    assert_eq!(row(a.id).await.status, OutboxStatus::Published);
    assert!(row(a.id).await.published_at.is_some());
    let rb = row(b.id).await;
    assert_eq!((rb.status, rb.attempts), (OutboxStatus::Pending, 1));
    assert_eq!(rb.last_error.as_deref(), Some("broker said no"));
    assert_eq!(row(c.id).await.status, OutboxStatus::Dead);
    // w2's release of e (held by w1) changes nothing; d is free again, b is
    // waiting for its retry.
    s.settle("w2", &[], &[], &[e.id]).await.unwrap();
    let again = s
        .claim(&req("w2", DeadLetterPolicy::SkipKey))
        .await
        .unwrap();
    assert_eq!(ids(&again), vec![d.id]);
    // A failure reported for a row no longer pending, or for no row at all.
    let late = s
        .settle("w1", &[], &[(a.id, fail(false, Duration::ZERO, 5))], &[])
        .await
        .unwrap();
    assert_eq!(late, vec![FailureOutcome::Settled]);
    let unknown = MessageId::new();
    assert!(matches!(
        s.settle("w1", &[], &[(unknown, fail(false, Duration::ZERO, 5))], &[])
            .await,
        Err(OutboxError::NotFound(id)) if id == unknown
    ));
    // Nothing to settle is a no-op.
    assert!(s.settle("w1", &[], &[], &[]).await.unwrap().is_empty());
    assert_eq!(row(a.id).await.attempts, 0);
}

/// Per-key order: `workers` relay workers share one outbox holding
/// `messages` messages on `keys` keys while the transport fails about one
/// publish in 50 (transiently); every message is confirmed, and each key's
/// confirmed messages are in enqueue order, with no duplicates.
pub async fn per_key_order_with_concurrent_workers<B: OutboxBackend>(
    backend: &B,
    workers: usize,
    keys: usize,
    messages: usize,
) {
    let s = backend.fresh().await;
    let transport = RecordingTransport::new();
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let c = counter.clone();
    transport.set_fault(move |_| {
        (c.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 50 == 49)
            .then(|| TransportError::Unavailable("flaky".into()))
    });
    let mut cfg = RelayConfig::new(format!("order-{}", uuid::Uuid::new_v4().simple()));
    cfg.workers = workers;
    cfg.batch_size = 200;
    cfg.poll_interval = Duration::from_millis(20);
    cfg.max_attempts = 1000;
    cfg.backoff = vextrus_core::outbox::Backoff::new(
        Duration::from_millis(1),
        Duration::from_millis(20),
        2.0,
    );
    cfg.breaker = vextrus_resilience::CircuitBreakerConfig::new().failure_rate_threshold(100.0);
    let relay = OutboxRelay::new(s.clone(), transport.clone(), cfg);
    let handle = relay.spawn();
    let mut expected: HashMap<String, Vec<MessageId>> = HashMap::new();
    let chunk = 500;
    let mut i = 0;
    while i < messages {
        let batch: Vec<OutboundMessage> = (i..(i + chunk).min(messages))
            .map(|n| msg(&format!("key-{}", n % keys), n))
            .collect();
        for m in &batch {
            expected
                .entry(m.partition_key.clone())
                .or_default()
                .push(m.id);
        }
        s.enqueue(&batch).await.unwrap();
        i += chunk;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while transport.confirmed_count() < messages {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {messages} confirmed",
            transport.confirmed_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle.shutdown().await.unwrap();
    let confirmed = transport.confirmed("orders");
    assert_eq!(confirmed.len(), messages, "no duplicates");
    let mut seen: HashMap<String, Vec<MessageId>> = HashMap::new();
    for m in confirmed {
        seen.entry(m.partition_key.clone()).or_default().push(m.id);
    }
    assert_eq!(seen.len(), keys);
    for (key, want) in &expected {
        assert_eq!(seen.get(key), Some(want), "order of {key}");
    }
    let st = s.status().await.unwrap();
    assert_eq!((st.pending, st.dead), (0, 0));
    assert!(
        counter.load(std::sync::atomic::Ordering::Relaxed) > messages as u64,
        "faults happened"
    );
}

/// The relay publishes, retries transient failures from the store's
/// backoff, and dead-letters a validation failure at once without holding
/// up other keys.
pub async fn relay_retries_and_dead_letters<B: OutboxBackend>(backend: &B) {
    let s = backend.fresh().await;
    let transport = RecordingTransport::new();
    let (big, ok, flaky) = (msg("big", 1), msg("ok", 1), msg("flaky", 1));
    let big_id = big.id;
    let flaky_id = flaky.id;
    let tries = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let t2 = tries.clone();
    transport.set_fault(move |m| {
        if m.id == big_id {
            Some(TransportError::MessageTooLarge { size: 2, max: 1 })
        } else if m.id == flaky_id && t2.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
            Some(TransportError::Timeout)
        } else {
            None
        }
    });
    s.enqueue(&[big.clone(), ok.clone(), flaky.clone()])
        .await
        .unwrap();
    let mut cfg = RelayConfig::new("retry");
    cfg.backoff =
        vextrus_core::outbox::Backoff::new(Duration::from_millis(1), Duration::from_millis(5), 2.0);
    let relay = OutboxRelay::new(s.clone(), transport.clone(), cfg);
    let r = relay.relay_once("retry-0").await.unwrap();
    assert_eq!((r.claimed, r.published, r.retrying, r.dead), (3, 1, 1, 1));
    for _ in 0..200 {
        relay.drain("retry-0").await.unwrap();
        if s.status().await.unwrap().pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let row = s.get(flaky.id).await.unwrap().unwrap();
    assert_eq!((row.status, row.attempts), (OutboxStatus::Published, 2));
    let dead = s.get(big.id).await.unwrap().unwrap();
    assert_eq!(dead.status, OutboxStatus::Dead);
    assert!(dead.last_error.unwrap().contains("larger than"));
    assert_eq!(transport.confirmed("orders").len(), 2);
}

/// A unit of work that is dropped, or whose commit fails, leaves no event,
/// no outbox message and no inbox entry; a committed one leaves all three.
pub async fn unit_of_work_rollback_leaves_nothing<B: OutboxBackend>(backend: &B) {
    let s = backend.fresh().await;
    let stream = StreamId::new(format!("order-{}", uuid::Uuid::new_v4().simple())).unwrap();
    let event = || NewEvent::new("order.placed", json!({"n": 1}), EventMetadata::new());
    let (m1, in1) = (msg("a", 1), MessageId::new());

    let mut tx = s.begin().await.unwrap();
    s.append_in_tx(&mut tx, &stream, ExpectedVersion::NoStream, &[event()])
        .await
        .unwrap();
    s.enqueue_in_tx(&mut tx, std::slice::from_ref(&m1))
        .await
        .unwrap();
    assert_eq!(
        s.record_inbox_in_tx(&mut tx, "c", in1).await.unwrap(),
        InboxRecord::New
    );
    drop(tx);
    assert_eq!(backend.stream_version(&s, &stream).await, None);
    assert!(s.get(m1.id).await.unwrap().is_none());
    assert!(!backend.inbox_has(&s, "c", in1).await);

    // Commit.
    let mut tx = s.begin().await.unwrap();
    s.append_in_tx(&mut tx, &stream, ExpectedVersion::NoStream, &[event()])
        .await
        .unwrap();
    s.enqueue_in_tx(&mut tx, std::slice::from_ref(&m1))
        .await
        .unwrap();
    s.record_inbox_in_tx(&mut tx, "c", in1).await.unwrap();
    s.commit(tx).await.unwrap();
    assert_eq!(backend.stream_version(&s, &stream).await, Some(1));
    assert!(s.get(m1.id).await.unwrap().is_some());
    assert!(backend.inbox_has(&s, "c", in1).await);

    // A failing commit (version conflict) leaves nothing either.
    let (m2, in2) = (msg("a", 2), MessageId::new());
    let mut tx = s.begin().await.unwrap();
    s.enqueue_in_tx(&mut tx, std::slice::from_ref(&m2))
        .await
        .unwrap();
    s.record_inbox_in_tx(&mut tx, "c", in2).await.unwrap();
    let appended = s
        .append_in_tx(&mut tx, &stream, ExpectedVersion::NoStream, &[event()])
        .await;
    let result = match appended {
        Ok(()) => s.commit(tx).await,
        Err(e) => Err(e),
    };
    let err = result.expect_err("conflict");
    assert!(
        matches!(err, OutboxError::EventStore(ref e) if e.is_conflict()),
        "{err:?}"
    );
    assert_eq!(backend.stream_version(&s, &stream).await, Some(1));
    assert!(s.get(m2.id).await.unwrap().is_none());
    assert!(!backend.inbox_has(&s, "c", in2).await);

    // The inbox entry is now a duplicate.
    let mut tx = s.begin().await.unwrap();
    assert_eq!(
        s.record_inbox_in_tx(&mut tx, "c", in1).await.unwrap(),
        InboxRecord::Duplicate
    );
    assert_eq!(
        s.record_inbox_in_tx(&mut tx, "other", in1).await.unwrap(),
        InboxRecord::New
    );
}

/// Expands to one `#[tokio::test]` per outbox conformance case, each
/// running against the given [`OutboxBackend`] expression; the per-key
/// order case runs 3 workers, 50 keys and the given number of messages.
///
/// The in-memory backend, as `crates/core/tests/outbox_memory.rs` runs it
/// (in a test target, each case is a `#[tokio::test]`):
///
/// ```
/// use vextrus_core::inbox::InboxStore;
/// use vextrus_core::outbox::InMemoryOutbox;
/// use vextrus_core::transport::MessageId;
/// use vextrus_core::{EventReader, StreamId};
/// use vextrus_testkit::outbox::OutboxBackend;
///
/// struct Memory;
///
/// impl OutboxBackend for Memory {
///     type Store = InMemoryOutbox;
///
///     async fn fresh(&self) -> InMemoryOutbox {
///         InMemoryOutbox::new()
///     }
///
///     async fn stream_version(&self, store: &InMemoryOutbox, stream: &StreamId) -> Option<u64> {
///         store.event_store().stream_version(stream).await.unwrap()
///     }
///
///     async fn inbox_has(&self, store: &InMemoryOutbox, consumer: &str, id: MessageId) -> bool {
///         store.is_processed(consumer, id).await.unwrap()
///     }
/// }
///
/// vextrus_testkit::outbox_conformance!(Memory, 20_000);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! outbox_conformance {
    ($backend:expr, $order_messages:expr) => {
        $crate::outbox_conformance!(@cases $backend;
            enqueue_claim_publish,
            bad_messages_are_rejected,
            failure_backoff_and_dead_letter,
            dead_letter_policy_skip_or_block,
            replay_keeps_id_and_discard,
            retention_purges_only_old_published,
            lease_expiry_hands_over,
            relay_retries_and_dead_letters,
            unit_of_work_rollback_leaves_nothing,
            settle_publishes_fails_and_releases,
        );

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn per_key_order_with_concurrent_workers() {
            let backend = $backend;
            $crate::outbox::per_key_order_with_concurrent_workers(&backend, 3, 50, $order_messages)
                .await;
        }
    };
    (@cases $backend:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let backend = $backend;
                $crate::outbox::$case(&backend).await;
            }
        )*
    };
}
