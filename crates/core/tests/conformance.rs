//! The event-store conformance suite on the in-memory backend.

use std::collections::BTreeMap;

use vextrus_core::{BoxError, InMemoryEventStore, InMemoryTransaction};
use vextrus_testkit::EventStoreBackend;

const COLLECTION: &str = "testkit_read_model";

struct Memory;

impl EventStoreBackend for Memory {
    type Store = InMemoryEventStore;

    async fn fresh_store(&self, max_payload_bytes: usize) -> InMemoryEventStore {
        InMemoryEventStore::with_max_payload_bytes(max_payload_bytes)
    }

    async fn add_in_tx(
        tx: &mut InMemoryTransaction,
        key: &str,
        delta: i64,
    ) -> Result<(), BoxError> {
        let n = tx
            .get(COLLECTION, key)
            .and_then(|v| v.as_i64())
            .unwrap_or(0);
        tx.put(COLLECTION, key, serde_json::json!(n + delta));
        Ok(())
    }

    async fn clear_in_tx(tx: &mut InMemoryTransaction) -> Result<(), BoxError> {
        tx.clear(COLLECTION);
        Ok(())
    }

    async fn read_model(store: &InMemoryEventStore) -> BTreeMap<String, i64> {
        store
            .documents(COLLECTION)
            .into_iter()
            .map(|(k, v)| (k, v.as_i64().unwrap_or_default()))
            .collect()
    }
}

vextrus_testkit::event_store_conformance!(Memory);
