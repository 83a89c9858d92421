//! # vextrus-testkit
//!
//! The conformance suites every vextrus backend runs. A backend's tests
//! implement [`EventStoreBackend`] (how to get a fresh, empty store, and how a
//! projection writes a tiny test read model through the backend's
//! transaction) and call every case with one line:
//!
//! ```text
//! vextrus_testkit::event_store_conformance!(MyBackend::new());
//! ```
//!
//! which expands to one `#[tokio::test]` per case in [`event_store`], so a
//! failure names the case. The cases are public async functions, so a backend
//! can also call them one by one.

pub mod event_store;
pub mod inbox;
pub mod outbox;
pub mod relay_bench;
pub mod relay_crash;
pub mod relay_inbox;
pub mod saga;
pub mod transport;

pub use event_store::EventStoreBackend;
pub use saga::SagaStoreBackend;

/// Expands to one `#[tokio::test]` per event-store conformance case, each
/// running against a fresh store from the given backend expression (an
/// [`EventStoreBackend`]). The calling crate needs `tokio` (with `macros`
/// and `rt-multi-thread`) as a dev-dependency.
#[macro_export]
macro_rules! event_store_conformance {
    ($backend:expr) => {
        $crate::event_store_conformance!(@cases $backend;
            append_and_read_round_trip_keeps_all_metadata,
            expected_version_rules_and_conflict_details,
            concurrent_writers_exactly_one_wins_each_round,
            idempotent_reappend_and_partial_duplicates,
            large_stream_reads_back_exactly,
            stream_reads_with_direction_start_and_limit,
            global_log_filters_and_paging,
            upcasting_on_read_leaves_stored_events,
            snapshots_and_repository_equal_full_replay,
            stale_snapshot_is_ignored,
            checkpoints_store_load_delete,
            subscription_catches_up_then_goes_live,
            projection_failure_rolls_back_writes_and_checkpoint,
            projection_rebuild_equals_incremental,
            bad_input_is_typed_and_writes_nothing,
        );
    };
    (@cases $backend:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let backend = $backend;
                $crate::event_store::$case(&backend).await;
            }
        )*
    };
}
