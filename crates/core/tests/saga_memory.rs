//! The saga-store conformance suite on the in-memory backend, alone and
//! sharing the in-memory unit of work's outbox.

use vextrus_core::outbox::InMemoryOutbox;
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

mod with_outbox {
    use super::*;

    struct MemoryWithOutbox;

    impl SagaStoreBackend for MemoryWithOutbox {
        type Store = InMemorySagaStore;

        async fn fresh_store(&self) -> InMemorySagaStore {
            InMemorySagaStore::with_outbox(InMemoryOutbox::new(), "saga.replies")
        }
    }

    vextrus_testkit::saga_store_conformance!(MemoryWithOutbox);
}
