//! The outbox conformance suite on SQLite (a fresh temporary file per case),
//! plus per-key order with 3 relay workers and 20k messages, and the unit of
//! work with the service's own SQL.

use vextrus_core::inbox::InboxStore;
use vextrus_core::outbox::{OutboxStatus, OutboxStore};
use vextrus_core::transport::{MessageId, OutboundMessage};
use vextrus_core::unit_of_work::UnitOfWork;
use vextrus_core::{EventReader, ExpectedVersion, NewEvent, StreamId};
use vextrus_kernel::EventMetadata;
use vextrus_sqlite::SqliteOutbox;
use vextrus_testkit::outbox::{self as outbox_suite, OutboxBackend};

struct Sqlite3;

impl OutboxBackend for Sqlite3 {
    type Store = SqliteOutbox;

    async fn fresh(&self) -> SqliteOutbox {
        SqliteOutbox::temporary().await.expect("temporary outbox")
    }

    async fn stream_version(&self, store: &SqliteOutbox, stream: &StreamId) -> Option<u64> {
        store.event_store().stream_version(stream).await.unwrap()
    }

    async fn inbox_has(&self, store: &SqliteOutbox, consumer: &str, id: MessageId) -> bool {
        store.is_processed(consumer, id).await.unwrap()
    }
}

macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                outbox_suite::$case(&Sqlite3).await;
            }
        )*
    };
}

cases!(
    enqueue_claim_publish,
    bad_messages_are_rejected,
    failure_backoff_and_dead_letter,
    dead_letter_policy_skip_or_block,
    replay_keeps_id_and_discard,
    retention_purges_only_old_published,
    lease_expiry_hands_over,
    settle_publishes_fails_and_releases,
    relay_retries_and_dead_letters,
    unit_of_work_rollback_leaves_nothing,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_key_order_3_workers_50_keys_20k_messages() {
    outbox_suite::per_key_order_with_concurrent_workers(&Sqlite3, 3, 50, 20_000).await;
}

/// The service's own SQL joins the unit of work: a dropped transaction
/// leaves neither its row, nor the event, nor the message; a committed one
/// leaves all three.
#[tokio::test]
async fn service_sql_commits_and_rolls_back_with_the_unit_of_work() {
    let s = SqliteOutbox::temporary().await.unwrap();
    sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY, status TEXT NOT NULL)")
        .execute(s.pool())
        .await
        .unwrap();
    let stream = StreamId::new("order-1").unwrap();
    let meta = EventMetadata::new();
    let msg = OutboundMessage::cloud_events(
        "orders",
        "order-1",
        "order.placed",
        1,
        "svc",
        b"{}".to_vec(),
        &meta,
    );
    let orders = |s: &SqliteOutbox| {
        let pool = s.pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM orders")
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    for commit in [false, true] {
        let mut tx = s.begin().await.unwrap();
        s.append_in_tx(
            &mut tx,
            &stream,
            ExpectedVersion::NoStream,
            &[NewEvent::new(
                "order.placed",
                serde_json::json!({}),
                meta.clone(),
            )],
        )
        .await
        .unwrap();
        s.enqueue_in_tx(&mut tx, std::slice::from_ref(&msg))
            .await
            .unwrap();
        sqlx::query("INSERT INTO orders (id, status) VALUES ('order-1', 'placed')")
            .execute(tx.conn().unwrap())
            .await
            .unwrap();
        if commit {
            s.commit(tx).await.unwrap();
        } else {
            drop(tx);
            assert_eq!(orders(&s).await, 0);
            assert_eq!(s.event_store().stream_version(&stream).await.unwrap(), None);
            assert!(s.get(msg.id).await.unwrap().is_none());
        }
    }
    assert_eq!(orders(&s).await, 1);
    assert_eq!(
        s.event_store().stream_version(&stream).await.unwrap(),
        Some(1)
    );
    let row = s.get(msg.id).await.unwrap().unwrap();
    assert_eq!((row.status, row.message), (OutboxStatus::Pending, msg));
}
