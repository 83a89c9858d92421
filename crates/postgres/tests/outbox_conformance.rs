//! The outbox conformance suite (vextrus-testkit) on PostgreSQL: every case
//! runs against its own fresh database, including per-key order with 3
//! relay workers, 50 keys and 20k messages.

mod common;

use vextrus_core::inbox::InboxStore;
use vextrus_core::transport::MessageId;
use vextrus_core::{EventReader, StreamId};
use vextrus_postgres::{PgOutbox, PgStoreConfig};
use vextrus_testkit::outbox::{self as outbox_suite, OutboxBackend};

struct Pg;

impl OutboxBackend for Pg {
    type Store = PgOutbox;

    async fn fresh(&self) -> PgOutbox {
        let db = common::TestDb::create().await;
        let store = db.store(PgStoreConfig::default()).await;
        let outbox = PgOutbox::new(store);
        // The store's migrations already include the outbox schema.
        assert_eq!(outbox.migrate().await.unwrap(), 0, "nothing left to apply");
        outbox
    }

    async fn stream_version(&self, store: &PgOutbox, stream: &StreamId) -> Option<u64> {
        store.event_store().stream_version(stream).await.unwrap()
    }

    async fn inbox_has(&self, store: &PgOutbox, consumer: &str, id: MessageId) -> bool {
        store.is_processed(consumer, id).await.unwrap()
    }
}

macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                outbox_suite::$case(&Pg).await;
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
    relay_retries_and_dead_letters,
    unit_of_work_rollback_leaves_nothing,
    settle_publishes_fails_and_releases,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_key_order_3_workers_50_keys_20k_messages() {
    outbox_suite::per_key_order_with_concurrent_workers(&Pg, 3, 50, 20_000).await;
}
