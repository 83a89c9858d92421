//! The inbox conformance suite: dedup (a message twice has one effect),
//! rollback of a failing handler's writes, dead letter after N failures,
//! malformed messages dead-lettered without running the handler.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use vextrus_core::BoxError;
use vextrus_core::inbox::{InboxConfig, InboxConsumer, InboxHandler, InboxOutcome, InboxStore};
use vextrus_core::outbox::Backoff;
use vextrus_core::transport::{
    InProcessTransport, InboundMessage, OutboundMessage, Transport, headers,
};
use vextrus_core::unit_of_work::UnitOfWork;
use vextrus_kernel::EventMetadata;

/// What the inbox suite needs from a backend: a store, and a tiny "effect"
/// the handler writes through the backend's transaction.
pub trait InboxBackend: Send + Sync + 'static {
    /// The store under test.
    type Store: InboxStore + Clone + 'static;

    /// A fresh, empty store.
    fn fresh(&self) -> impl Future<Output = Self::Store> + Send;

    /// Adds one to counter `key` inside `tx` (the handler's own write).
    fn add_effect(
        &self,
        tx: &mut <Self::Store as UnitOfWork>::Transaction,
        key: &str,
    ) -> impl Future<Output = ()> + Send;

    /// The committed value of counter `key` (0 if absent).
    fn effect(&self, store: &Self::Store, key: &str) -> impl Future<Output = u64> + Send;
}

/// A handler that adds one to the counter named by the message's partition
/// key, then fails while `fail_first` is above zero.
struct Counting<B> {
    backend: Arc<B>,
    fail_first: AtomicU32,
    calls: Arc<AtomicU32>,
}

impl<B: InboxBackend> InboxHandler<<B::Store as UnitOfWork>::Transaction> for Counting<B> {
    async fn handle(
        &self,
        tx: &mut <B::Store as UnitOfWork>::Transaction,
        message: &InboundMessage,
    ) -> Result<(), BoxError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let key = message.partition_key.clone().unwrap_or_default();
        self.backend.add_effect(tx, &key).await;
        let left = self.fail_first.load(Ordering::SeqCst);
        if left > 0 {
            self.fail_first.store(left - 1, Ordering::SeqCst);
            return Err("handler failed on purpose".into());
        }
        Ok(())
    }
}

fn broker() -> (InProcessTransport, String) {
    let t = InProcessTransport::new();
    let d = format!("inbox-{}", uuid::Uuid::new_v4().simple());
    t.declare(&d);
    (t, d)
}

fn message(dest: &str, key: &str) -> OutboundMessage {
    OutboundMessage::cloud_events(
        dest,
        key,
        "order.placed",
        1,
        "testkit",
        b"{}".to_vec(),
        &EventMetadata::new(),
    )
}

fn config(name: &str, attempts: u32) -> InboxConfig {
    InboxConfig::new(name)
        .max_attempts(attempts)
        .backoff(Backoff::new(
            Duration::from_millis(1),
            Duration::from_millis(2),
            2.0,
        ))
}

async fn next<U, S, H>(c: &mut InboxConsumer<U, S, H>) -> InboxOutcome
where
    U: InboxStore,
    S: vextrus_core::transport::MessageSource,
    H: InboxHandler<U::Transaction>,
{
    tokio::time::timeout(Duration::from_secs(10), c.process_next())
        .await
        .expect("a delivery within 10 s")
        .expect("no store error")
        .expect("source open")
}

/// The same message delivered twice (a broker redelivery or a relay
/// duplicate) has one effect; the second delivery is acknowledged as a
/// duplicate without running the handler. Another consumer still sees it.
pub async fn duplicate_delivery_has_one_effect<B: InboxBackend>(backend: B) {
    let backend = Arc::new(backend);
    let store = backend.fresh().await;
    let (t, dest) = broker();
    let m = message(&dest, "dup");
    t.publish(&m).await.unwrap();
    t.publish(&m).await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let handler = Counting {
        backend: backend.clone(),
        fail_first: AtomicU32::new(0),
        calls: calls.clone(),
    };
    let mut c = InboxConsumer::new(
        store.clone(),
        t.subscribe(&dest).unwrap(),
        handler,
        config("billing", 3),
    );
    assert_eq!(next(&mut c).await, InboxOutcome::Processed);
    assert_eq!(next(&mut c).await, InboxOutcome::Duplicate);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(backend.effect(&store, "dup").await, 1);
    assert!(store.is_processed("billing", m.id).await.unwrap());
    assert!(!store.is_processed("shipping", m.id).await.unwrap());

    let handler = Counting {
        backend: backend.clone(),
        fail_first: AtomicU32::new(0),
        calls,
    };
    let mut other = InboxConsumer::new(
        store.clone(),
        t.subscribe(&dest).unwrap(),
        handler,
        config("shipping", 3),
    );
    assert_eq!(next(&mut other).await, InboxOutcome::Processed);
    assert_eq!(next(&mut other).await, InboxOutcome::Duplicate);
    assert_eq!(
        backend.effect(&store, "dup").await,
        2,
        "one effect per consumer"
    );
}

/// A failing handler's writes are rolled back; the message is redelivered
/// and its effect happens once when the handler finally succeeds.
pub async fn failed_handler_rolls_back_then_succeeds<B: InboxBackend>(backend: B) {
    let backend = Arc::new(backend);
    let store = backend.fresh().await;
    let (t, dest) = broker();
    let m = message(&dest, "flaky");
    t.publish(&m).await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let handler = Counting {
        backend: backend.clone(),
        fail_first: AtomicU32::new(2),
        calls: calls.clone(),
    };
    let mut c = InboxConsumer::new(
        store.clone(),
        t.subscribe(&dest).unwrap(),
        handler,
        config("billing", 5),
    );
    assert_eq!(next(&mut c).await, InboxOutcome::Retrying { attempts: 1 });
    assert_eq!(backend.effect(&store, "flaky").await, 0, "rolled back");
    assert_eq!(next(&mut c).await, InboxOutcome::Retrying { attempts: 2 });
    assert_eq!(next(&mut c).await, InboxOutcome::Processed);
    assert_eq!(backend.effect(&store, "flaky").await, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(
        store
            .inbox_dead_letters("billing")
            .await
            .unwrap()
            .is_empty()
    );
}

/// A message that keeps failing is dead-lettered after `max_attempts`,
/// with its last error, and acknowledged; a later redelivery is a
/// duplicate; its effect never happens.
pub async fn failing_message_is_dead_lettered_after_n<B: InboxBackend>(backend: B) {
    let backend = Arc::new(backend);
    let store = backend.fresh().await;
    let (t, dest) = broker();
    let m = message(&dest, "poison");
    t.publish(&m).await.unwrap();
    let handler = Counting {
        backend: backend.clone(),
        fail_first: AtomicU32::new(u32::MAX),
        calls: Arc::default(),
    };
    let mut c = InboxConsumer::new(
        store.clone(),
        t.subscribe(&dest).unwrap(),
        handler,
        config("billing", 3),
    );
    assert_eq!(next(&mut c).await, InboxOutcome::Retrying { attempts: 1 });
    assert_eq!(next(&mut c).await, InboxOutcome::Retrying { attempts: 2 });
    assert_eq!(
        next(&mut c).await,
        InboxOutcome::DeadLettered { attempts: 3 }
    );
    let dead = store.inbox_dead_letters("billing").await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id, m.id);
    assert_eq!(dead[0].attempts, 3);
    assert!(dead[0].last_error.contains("on purpose"));
    assert_eq!(dead[0].payload, m.payload);
    assert_eq!(backend.effect(&store, "poison").await, 0);
    t.publish(&m).await.unwrap();
    assert_eq!(next(&mut c).await, InboxOutcome::Duplicate);
}

/// A message with malformed headers is dead-lettered at once and
/// acknowledged; the handler never runs.
pub async fn malformed_message_is_dead_lettered<B: InboxBackend>(backend: B) {
    let backend = Arc::new(backend);
    let store = backend.fresh().await;
    let (t, dest) = broker();
    let mut m = message(&dest, "bad");
    m.headers
        .insert(headers::TRACEPARENT.into(), "not-a-traceparent".into());
    t.publish(&m).await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let handler = Counting {
        backend: backend.clone(),
        fail_first: AtomicU32::new(0),
        calls: calls.clone(),
    };
    let mut c = InboxConsumer::new(
        store.clone(),
        t.subscribe(&dest).unwrap(),
        handler,
        config("billing", 3),
    );
    assert_eq!(next(&mut c).await, InboxOutcome::Malformed);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let dead = store.inbox_dead_letters("billing").await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].last_error.contains("traceparent"),
        "{}",
        dead[0].last_error
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(50), c.process_next())
            .await
            .is_err(),
        "acknowledged: no redelivery"
    );
}

/// Expands to one `#[tokio::test]` per inbox conformance case, each
/// running against the given [`InboxBackend`] expression.
///
/// The in-memory backend, as `crates/core/tests/outbox_memory.rs` runs it
/// (in a test target, each case is a `#[tokio::test]`):
///
/// ```
/// use vextrus_core::outbox::{InMemoryOutbox, InMemoryUnitOfWorkTx};
/// use vextrus_testkit::inbox::InboxBackend;
///
/// struct Memory;
///
/// impl InboxBackend for Memory {
///     type Store = InMemoryOutbox;
///
///     async fn fresh(&self) -> InMemoryOutbox {
///         InMemoryOutbox::new()
///     }
///
///     async fn add_effect(&self, tx: &mut InMemoryUnitOfWorkTx, key: &str) {
///         let n = tx.get("effects", key).and_then(|v| v.as_u64()).unwrap_or(0);
///         tx.put("effects", key, serde_json::json!(n + 1));
///     }
///
///     async fn effect(&self, store: &InMemoryOutbox, key: &str) -> u64 {
///         store.document("effects", key).and_then(|v| v.as_u64()).unwrap_or(0)
///     }
/// }
///
/// vextrus_testkit::inbox_conformance!(Memory);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! inbox_conformance {
    ($backend:expr) => {
        $crate::inbox_conformance!(@cases $backend;
            duplicate_delivery_has_one_effect,
            failed_handler_rolls_back_then_succeeds,
            failing_message_is_dead_lettered_after_n,
            malformed_message_is_dead_lettered,
        );
    };
    (@cases $backend:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                $crate::inbox::$case($backend).await;
            }
        )*
    };
}
