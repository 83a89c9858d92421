//! The saga-store conformance suite on the in-memory backend.

use vextrus_core::saga::InMemorySagaStore;
use vextrus_testkit::SagaStoreBackend;

struct Memory;

impl SagaStoreBackend for Memory {
    type Store = InMemorySagaStore;

    async fn fresh_store(&self) -> InMemorySagaStore {
        InMemorySagaStore::new()
    }
}

vextrus_testkit::saga_store_conformance!(Memory);
