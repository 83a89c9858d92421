//! The event-store conformance suite: every case is a public async function
//! taking a backend; [`crate::event_store_conformance!`] turns them into tests.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Barrier;
use vextrus_core::{
    BoxError, CheckpointStore, EventAppender, EventFilter, EventReader, EventSourcedRepository,
    EventStoreError, ExpectedVersion, GlobalPosition, NewEvent, Projection, ProjectionBackend,
    ProjectionRunner, ReadStreamOptions, RecordedEvent, Snapshot, SnapshotPolicy, SnapshotStore,
    StreamId, Subscription, SubscriptionOptions, SubscriptionSource, UpcasterRegistry, Upcasting,
};
use vextrus_kernel::{
    ActorId, Aggregate, AggregateId, AggregateRoot, CausationId, CommandContext, DomainEvent,
    EventId, EventMetadata, Repository, RepositoryError, TenantId, TraceContext,
};

/// The maximum payload size the suite configures its stores with.
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024;

/// What a backend provides to run the suite.
///
/// `fresh_store` must return an empty store (its own database or file)
/// configured to reject payloads larger than `max_payload_bytes`. The three
/// `*_read_model` functions let the suite's test projection keep a map of
/// counters through the backend's projection transaction, the way a real
/// projection writes its read model: a SQL backend uses a small table.
pub trait EventStoreBackend: Send + Sync + 'static {
    /// The store under test.
    type Store: EventAppender
        + EventReader
        + SnapshotStore
        + CheckpointStore
        + SubscriptionSource
        + ProjectionBackend
        + Clone
        + Send
        + Sync
        + 'static;

    /// A fresh, empty store.
    fn fresh_store(&self, max_payload_bytes: usize) -> impl Future<Output = Self::Store> + Send;

    /// Adds `delta` to counter `key` of the test read model, inside `tx`.
    fn add_in_tx<'a>(
        tx: &'a mut <Self::Store as ProjectionBackend>::Transaction,
        key: &'a str,
        delta: i64,
    ) -> impl Future<Output = Result<(), BoxError>> + Send + 'a;

    /// Removes every counter of the test read model, inside `tx`.
    fn clear_in_tx(
        tx: &mut <Self::Store as ProjectionBackend>::Transaction,
    ) -> impl Future<Output = Result<(), BoxError>> + Send + '_;

    /// The committed test read model.
    fn read_model(store: &Self::Store) -> impl Future<Output = BTreeMap<String, i64>> + Send + '_;
}

fn sid(s: &str) -> StreamId {
    StreamId::new(s).expect("valid stream id")
}

fn event(event_type: &str, payload: serde_json::Value) -> NewEvent {
    NewEvent::new(event_type, payload, EventMetadata::new())
}

async fn read_all_of<S: EventReader>(store: &S, stream: &StreamId) -> Vec<RecordedEvent> {
    store
        .read_stream(stream, ReadStreamOptions::forwards())
        .try_collect()
        .await
        .expect("read stream")
}

async fn read_log<S: EventReader>(
    store: &S,
    filter: &EventFilter,
    page: usize,
) -> Vec<RecordedEvent> {
    let mut out = Vec::new();
    let mut from = GlobalPosition::START;
    loop {
        let p = store.read_all(from, filter, page).await.expect("read_all");
        assert!(p.scanned_to >= from, "scanned_to must not move backwards");
        assert!(p.events.len() <= page);
        if p.events.is_empty() && p.scanned_to == from {
            return out;
        }
        for e in &p.events {
            assert!(e.position > from && e.position <= p.scanned_to);
        }
        out.extend(p.events);
        from = p.scanned_to;
    }
}

/// Appends one event with every metadata field set and reads it back from
/// the stream and the global log: identical metadata, versions, positions,
/// type, schema version, payload, and a database-clock `recorded_at`.
pub async fn append_and_read_round_trip_keeps_all_metadata<B: EventStoreBackend>(b: &B) {
    let store = b.fresh_store(MAX_PAYLOAD_BYTES).await;
    let s = sid("order-rt1");
    let cause = EventMetadata::new();
    let meta = EventMetadata::caused_by(&cause)
        .with_causation_id(CausationId::new())
        .with_trace_context(
            TraceContext::parse(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Some("vendor=x"),
            )
            .expect("traceparent"),
        )
        .with_tenant(TenantId::new("acme").expect("tenant"))
        .with_actor(ActorId::new("user:7").expect("actor"))
        .with_occurred_at(
            Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5)
                .single()
                .expect("date"),
        );
    let payload =
        json!({"total": "12.50", "lines": [{"sku": "A-1", "qty": 2}], "note": "ünïcode ✓"});
    let e1 = NewEvent::new("order.placed", payload.clone(), meta.clone()).with_schema_version(3);
    let e2 = event("order.paid", json!({}));
    let before = Utc::now() - chrono::Duration::seconds(5);
    let r = store
        .append_to_stream(&s, ExpectedVersion::NoStream, &[e1.clone(), e2.clone()])
        .await
        .expect("append");
    let after = Utc::now() + chrono::Duration::seconds(5);
    assert_eq!((r.first_version, r.last_version), (1, 2));
    assert!(r.first_position < r.last_position);
    assert!(r.first_position > GlobalPosition::START);

    let read = read_all_of(&store, &s).await;
    assert_eq!(read.len(), 2);
    let got = &read[0];
    assert_eq!(got.stream_id, s);
    assert_eq!(got.stream_version, 1);
    assert_eq!(got.position, r.first_position);
    assert_eq!(got.event_type, "order.placed");
    assert_eq!(got.schema_version, 3);
    assert_eq!(got.payload, payload);
    assert_eq!(got.metadata, meta);
    assert_eq!(got.event_id(), e1.event_id);
    assert!(
        got.recorded_at > before && got.recorded_at < after,
        "recorded_at is now-ish"
    );
    assert_eq!(read[1].position, r.last_position);
    assert_eq!(read[1].metadata, e2.metadata);

    let log = read_log(&store, &EventFilter::all(), 10).await;
    assert_eq!(log, read);
    assert_eq!(store.stream_version(&s).await.expect("version"), Some(2));
    assert!(store.stream_exists(&s).await.expect("exists"));
    assert!(
        !store
            .stream_exists(&sid("order-none"))
            .await
            .expect("exists")
    );
}

/// Every [`ExpectedVersion`] case, and the conflict's expected and actual
/// versions; a failed append writes nothing.
pub async fn expected_version_rules_and_conflict_details<B: EventStoreBackend>(b: &B) {
    let store = b.fresh_store(MAX_PAYLOAD_BYTES).await;
    let s = sid("acct-ev1");
    let conflict = |r: Result<_, EventStoreError>, exp: ExpectedVersion, act: Option<u64>| match r {
        Err(EventStoreError::WrongExpectedVersion {
            stream_id,
            expected,
            actual,
        }) => {
            assert_eq!(stream_id, s);
            assert_eq!(expected, exp);
            assert_eq!(actual, act);
        }
        other => panic!("expected a conflict ({exp:?}, {act:?}), got {other:?}"),
    };
    let one = || vec![event("t", json!({}))];

    conflict(
        store
            .append_to_stream(&s, ExpectedVersion::StreamExists, &one())
            .await,
        ExpectedVersion::StreamExists,
        None,
    );
    conflict(
        store
            .append_to_stream(&s, ExpectedVersion::Exact(1), &one())
            .await,
        ExpectedVersion::Exact(1),
        None,
    );
    assert_eq!(store.stream_version(&s).await.expect("v"), None);

    let r = store
        .append_to_stream(&s, ExpectedVersion::NoStream, &one())
        .await
        .expect("no stream");
    assert_eq!(r.last_version, 1);
    conflict(
        store
            .append_to_stream(&s, ExpectedVersion::NoStream, &one())
            .await,
        ExpectedVersion::NoStream,
        Some(1),
    );
    conflict(
        store
            .append_to_stream(&s, ExpectedVersion::Exact(0), &one())
            .await,
        ExpectedVersion::Exact(0),
        Some(1),
    );
    conflict(
        store
            .append_to_stream(&s, ExpectedVersion::Exact(2), &one())
            .await,
        ExpectedVersion::Exact(2),
        Some(1),
    );

    let r = store
        .append_to_stream(&s, ExpectedVersion::Exact(1), &one())
        .await
        .expect("exact");
    assert_eq!((r.first_version, r.last_version), (2, 2));
    let r = store
        .append_to_stream(&s, ExpectedVersion::StreamExists, &one())
        .await
        .expect("exists");
    assert_eq!(r.last_version, 3);
    let r = store
        .append_to_stream(
            &s,
            ExpectedVersion::Any,
            &[event("t", json!(1)), event("t", json!(2))],
        )
        .await
        .expect("any");
    assert_eq!((r.first_version, r.last_version), (4, 5));
    let fresh = sid("acct-ev2");
    let r = store
        .append_to_stream(&fresh, ExpectedVersion::Any, &one())
        .await
        .expect("any new");
    assert_eq!(r.last_version, 1);
    let r = store
        .append_to_stream(&sid("acct-ev3"), ExpectedVersion::Exact(0), &one())
        .await
        .expect("exact 0");
    assert_eq!(r.last_version, 1);
    conflict(
        store
            .append_to_stream(&s, ExpectedVersion::Exact(4), &one())
            .await,
        ExpectedVersion::Exact(4),
        Some(5),
    );

    let versions: Vec<u64> = read_all_of(&store, &s)
        .await
        .iter()
        .map(|e| e.stream_version)
        .collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5]);
    let err = store
        .append_to_stream(&s, ExpectedVersion::Exact(4), &one())
        .await
        .expect_err("conflict");
    assert_eq!(
        vextrus_kernel::HasErrorKind::kind(&err),
        vextrus_kernel::ErrorKind::Conflict
    );
}

/// 32 writers race 100 rounds at one expected version: exactly one wins each
/// round, the others get a conflict naming the winner's version, and the
/// stream's versions are contiguous with no gaps or duplicates.
pub async fn concurrent_writers_exactly_one_wins_each_round<B: EventStoreBackend>(b: &B) {
    const WRITERS: usize = 32;
    const ROUNDS: u64 = 100;
    let store = b.fresh_store(MAX_PAYLOAD_BYTES).await;
    let s = sid("race-1");
    let mut winners = Vec::new();
    for round in 0..ROUNDS {
        let barrier = Arc::new(Barrier::new(WRITERS));
        let mut tasks = Vec::with_capacity(WRITERS);
        for w in 0..WRITERS {
            let (store, s, barrier) = (store.clone(), s.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                let e = event("race.won", json!({"round": round, "writer": w}));
                let id = e.event_id;
                barrier.wait().await;
                (
                    id,
                    store
                        .append_to_stream(&s, ExpectedVersion::Exact(round), &[e])
                        .await,
                )
            }));
        }
        let mut wins = 0;
        for t in tasks {
            let (id, r) = t.await.expect("task");
            match r {
                Ok(r) => {
                    wins += 1;
                    assert_eq!(r.last_version, round + 1);
                    winners.push(id);
                }
                Err(EventStoreError::WrongExpectedVersion {
                    expected, actual, ..
                }) => {
                    assert_eq!(expected, ExpectedVersion::Exact(round));
                    assert_eq!(actual, Some(round + 1));
                }
                Err(other) => panic!("round {round}: unexpected error {other}"),
            }
        }
        assert_eq!(wins, 1, "round {round}: exactly one writer wins");
    }
    let read = read_all_of(&store, &s).await;
    assert_eq!(read.len() as u64, ROUNDS);
    for (i, e) in read.iter().enumerate() {
        assert_eq!(e.stream_version, i as u64 + 1);
        assert_eq!(e.event_id(), winners[i]);
    }
    let positions: HashSet<_> = read.iter().map(|e| e.position).collect();
    assert_eq!(positions.len(), read.len());
    assert_eq!(
        store
            .count_after(GlobalPosition::START, &EventFilter::all())
            .await
            .expect("count"),
        ROUNDS
    );
}

/// Re-appending events whose ids are stored at the same positions succeeds
/// with the original result and writes nothing; overlapping batches and ids
/// stored in another stream give typed errors and write nothing.
pub async fn idempotent_reappend_and_partial_duplicates<B: EventStoreBackend>(b: &B) {
    let store = b.fresh_store(MAX_PAYLOAD_BYTES).await;
    let s = sid("idem-1");
    let batch = vec![
        event("a", json!(1)),
        event("b", json!(2)),
        event("c", json!(3)),
    ];
    let first = store
        .append_to_stream(&s, ExpectedVersion::NoStream, &batch)
        .await
        .expect("append");
    // The same batch again, at the same expected version: same result, no rows.
    let again = store
        .append_to_stream(&s, ExpectedVersion::NoStream, &batch)
        .await
        .expect("re-append");
    assert_eq!(again, first);
    let again = store
        .append_to_stream(&s, ExpectedVersion::Any, &batch)
        .await
        .expect("re-append any");
    assert_eq!(again, first);
    // A tail of the batch re-appended is idempotent too.
    let tail = store
        .append_to_stream(&s, ExpectedVersion::Exact(1), &batch[1..])
        .await
        .expect("tail");
    assert_eq!((tail.first_version, tail.last_version), (2, 3));
    assert_eq!(tail.last_position, first.last_position);
    assert_eq!(read_all_of(&store, &s).await.len(), 3);

    // Stored ids at a different position than expected: a version conflict.
    let r = store
        .append_to_stream(&s, ExpectedVersion::Exact(2), &batch)
        .await;
    assert!(
        matches!(
            r,
            Err(EventStoreError::WrongExpectedVersion {
                actual: Some(3),
                ..
            })
        ),
        "{r:?}"
    );

    // Overlap: stored ids followed by a new one.
    let mut overlap = batch[1..].to_vec();
    overlap.push(event("d", json!(4)));
    let r = store
        .append_to_stream(&s, ExpectedVersion::Any, &overlap)
        .await;
    assert!(
        matches!(r, Err(EventStoreError::PartialDuplicate { .. })),
        "{r:?}"
    );
    // A new event followed by a stored one.
    let r = store
        .append_to_stream(
            &s,
            ExpectedVersion::Exact(3),
            &[event("e", json!(5)), batch[0].clone()],
        )
        .await;
    assert!(
        matches!(r, Err(EventStoreError::PartialDuplicate { .. })),
        "{r:?}"
    );
    // Stored ids appended to another stream.
    let r = store
        .append_to_stream(&sid("idem-2"), ExpectedVersion::Any, &batch)
        .await;
    assert!(
        matches!(r, Err(EventStoreError::PartialDuplicate { .. })),
        "{r:?}"
    );
    assert_eq!(store.stream_version(&sid("idem-2")).await.expect("v"), None);

    let read = read_all_of(&store, &s).await;
    assert_eq!(
        read.iter().map(|e| e.event_id()).collect::<Vec<_>>(),
        batch.iter().map(|e| e.event_id).collect::<Vec<_>>()
    );
    assert_eq!(
        store
            .count_after(GlobalPosition::START, &EventFilter::all())
            .await
            .expect("count"),
        3
    );
}

/// A 100,000-event stream (appended 1,000 at a time) reads back exactly,
/// forwards and backwards, whole and with starts and limits.
pub async fn large_stream_reads_back_exactly<B: EventStoreBackend>(b: &B) {
    const N: u64 = 100_000;
    const BATCH: u64 = 1_000;
    let store = b.fresh_store(MAX_PAYLOAD_BYTES).await;
    let s = sid("big-1");
    let mut ids = Vec::with_capacity(N as usize);
    for chunk in 0..N / BATCH {
        let events: Vec<NewEvent> = (0..BATCH)
            .map(|i| event("big.tick", json!({"i": chunk * BATCH + i})))
            .collect();
        ids.extend(events.iter().map(|e| e.event_id));
        let r = store
            .append_to_stream(&s, ExpectedVersion::Exact(chunk * BATCH), &events)
            .await
            .expect("append batch");
        assert_eq!(r.last_version, (chunk + 1) * BATCH);
    }
    let mut count = 0u64;
    let mut last = GlobalPosition::START;
    let mut stream = store.read_stream(&s, ReadStreamOptions::forwards());
    while let Some(e) = stream.next().await {
        let e = e.expect("event");
        assert_eq!(e.stream_version, count + 1);
        assert_eq!(e.event_id(), ids[count as usize]);
        assert_eq!(e.payload, json!({"i": count}));
        assert!(e.position > last);
        last = e.position;
        count += 1;
    }
    drop(stream);
    assert_eq!(count, N);

    let back: Vec<u64> = store
        .read_stream(&s, ReadStreamOptions::backwards())
        .map_ok(|e| e.stream_version)
        .try_collect()
        .await
        .expect("backwards");
    assert_eq!(back.len() as u64, N);
    assert!(back.iter().copied().eq((1..=N).rev()));

    let some: Vec<u64> = store
        .read_stream(
            &s,
            ReadStreamOptions::backwards().from_version(N - 10).limit(5),
        )
        .map_ok(|e| e.stream_version)
        .try_collect()
        .await
        .expect("backwards limited");
    assert_eq!(some, vec![N - 10, N - 11, N - 12, N - 13, N - 14]);
    let some: Vec<u64> = store
        .read_stream(
            &s,
            ReadStreamOptions::forwards().from_version(50_000).limit(3),
        )
        .map_ok(|e| e.stream_version)
        .try_collect()
        .await
        .expect("forwards limited");
    assert_eq!(some, vec![50_000, 50_001, 50_002]);
    let log = store
        .read_all(GlobalPosition::START, &EventFilter::all(), 2_500)
        .await
        .expect("log");
    assert_eq!(log.events.len(), 2_500);
    assert_eq!(
        store
            .count_after(GlobalPosition::START, &EventFilter::all())
            .await
            .expect("count"),
        N
    );
}

/// Stream reads honour direction, start version and limit; a missing
/// stream reads as empty.
pub async fn stream_reads_with_direction_start_and_limit<B: EventStoreBackend>(b: &B) {
    let store = b.fresh_store(MAX_PAYLOAD_BYTES).await;
    let s = sid("small-1");
    let events: Vec<_> = (1..=10).map(|i| event("t", json!(i))).collect();
    store
        .append_to_stream(&s, ExpectedVersion::NoStream, &events)
        .await
        .expect("append");
    store
        .append_to_stream(
            &sid("small-2"),
            ExpectedVersion::NoStream,
            &[event("t", json!(0))],
        )
        .await
        .expect("other");
    let versions = |o: ReadStreamOptions| {
        let store = store.clone();
        let s = s.clone();
        async move {
            store
                .read_stream(&s, o)
                .map_ok(|e| e.stream_version)
                .try_collect::<Vec<_>>()
                .await
                .expect("read")
        }
    };
    assert_eq!(
        versions(ReadStreamOptions::forwards()).await,
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(
        versions(ReadStreamOptions::forwards().limit(3)).await,
        vec![1, 2, 3]
    );
    assert_eq!(
        versions(ReadStreamOptions::forwards().from_version(9)).await,
        vec![9, 10]
    );
    assert_eq!(
        versions(ReadStreamOptions::forwards().from_version(11)).await,
        Vec::<u64>::new()
    );
    assert_eq!(
        versions(ReadStreamOptions::forwards().limit(0)).await,
        Vec::<u64>::new()
    );
    assert_eq!(
        versions(ReadStreamOptions::backwards().limit(2)).await,
        vec![10, 9]
    );
    assert_eq!(
        versions(ReadStreamOptions::backwards().from_version(3)).await,
        vec![3, 2, 1]
    );
    assert_eq!(
        versions(ReadStreamOptions::backwards().from_version(100).limit(1)).await,
        vec![10]
    );
    assert_eq!(
        versions(ReadStreamOptions::backwards().from_version(0)).await,
        Vec::<u64>::new()
    );
    let missing: Vec<_> = store
        .read_stream(&sid("small-404"), ReadStreamOptions::forwards())
        .try_collect()
        .await
        .expect("missing");
    assert!(missing.is_empty());
}

/// The global log in commit order, paged, and filtered by category, prefix
/// and event type; counts agree with reads.
pub async fn global_log_filters_and_paging<B: EventStoreBackend>(b: &B) {
    let store = b.fresh_store(MAX_PAYLOAD_BYTES).await;
    let plan = [
        ("order-1", "order.placed"),
        ("orders-1", "order.placed"),
        ("invoice-1", "invoice.issued"),
        ("order-2", "order.paid"),
        ("order-1", "order.paid"),
        ("invoice-1", "invoice.paid"),
        ("order-2", "order.placed"),
        ("plain", "x"),
    ];
    let mut ids = Vec::new();
    for (stream, ty) in plan {
        let e = event(ty, json!({"s": stream}));
        ids.push(e.event_id);
        store
            .append_to_stream(&sid(stream), ExpectedVersion::Any, &[e])
            .await
            .expect("append");
    }
    for page in [1, 3, 100] {
        let all = read_log(&store, &EventFilter::all(), page).await;
        assert_eq!(
            all.iter().map(|e| e.event_id()).collect::<Vec<_>>(),
            ids,
            "page {page}"
        );
        assert!(all.windows(2).all(|w| w[0].position < w[1].position));
    }
    let streams_of = |evs: &[RecordedEvent]| {
        evs.iter()
            .map(|e| e.stream_id.to_string())
            .collect::<Vec<_>>()
    };
    let cat = read_log(&store, &EventFilter::category("order"), 2).await;
    assert_eq!(
        streams_of(&cat),
        ["order-1", "order-2", "order-1", "order-2"]
    );
    let pre = read_log(&store, &EventFilter::prefix("order"), 2).await;
    assert_eq!(
        streams_of(&pre),
        ["order-1", "orders-1", "order-2", "order-1", "order-2"]
    );
    let typed = read_log(
        &store,
        &EventFilter::all().with_event_types(["order.paid", "invoice.paid"]),
        1,
    )
    .await;
    assert_eq!(streams_of(&typed), ["order-2", "order-1", "invoice-1"]);
    let both = read_log(
        &store,
        &EventFilter::category("order").with_event_types(["order.placed"]),
        5,
    )
    .await;
    assert_eq!(streams_of(&both), ["order-1", "order-2"]);
    let plain = read_log(&store, &EventFilter::category("plain"), 5).await;
    assert_eq!(streams_of(&plain), ["plain"]);

    assert_eq!(
        store
            .count_after(GlobalPosition::START, &EventFilter::all())
            .await
            .expect("c"),
        8
    );
    assert_eq!(
        store
            .count_after(GlobalPosition::START, &EventFilter::category("order"))
            .await
            .expect("c"),
        4
    );
    let third = read_log(&store, &EventFilter::all(), 10).await[2].position;
    assert_eq!(
        store
            .count_after(third, &EventFilter::all())
            .await
            .expect("c"),
        5
    );
    let rest = store
        .read_all(third, &EventFilter::all(), 100)
        .await
        .expect("rest");
    assert_eq!(rest.events.len(), 5);
    let end = rest.scanned_to;
    let none = store
        .read_all(end, &EventFilter::all(), 100)
        .await
        .expect("end");
    assert!(none.events.is_empty());
    assert!(none.scanned_to >= end);
}

/// Registered upcasters turn stored v1 events into v3 on every read path;
/// the stored events stay v1.
pub async fn upcasting_on_read_leaves_stored_events<B: EventStoreBackend>(b: &B) {
    let raw = b.fresh_store(MAX_PAYLOAD_BYTES).await;
    let mut reg = UpcasterRegistry::new();
    reg.register("customer.registered", 1, |p| {
        let name = p["name"].as_str().ok_or("name missing")?;
        let (first, last) = name.split_once(' ').unwrap_or((name, ""));
        Ok(json!({"first": first, "last": last}))
    });
    reg.register("customer.registered", 2, |mut p| {
        p["country"] = json!("BD");
        Ok(p)
    });
    let store = Upcasting::new(raw.clone(), reg);
    let s = sid("customer-1");
    let v1 = event("customer.registered", json!({"name": "Ada Lovelace"}));
    let v2 = event(
        "customer.registered",
        json!({"first": "Alan", "last": "Turing"}),
    )
    .with_schema_version(2);
    let v3 = event(
        "customer.registered",
        json!({"first": "G", "last": "H", "country": "UK"}),
    )
    .with_schema_version(3);
    let other = event("customer.renamed", json!({"name": "x"}));
    store
        .append_to_stream(&s, ExpectedVersion::NoStream, &[v1, v2, v3, other])
        .await
        .expect("append");

    let read = read_all_of(&store, &s).await;
    assert_eq!(
        read.iter().map(|e| e.schema_version).collect::<Vec<_>>(),
        vec![3, 3, 3, 1]
    );
    assert_eq!(
        read[0].payload,
        json!({"first": "Ada", "last": "Lovelace", "country": "BD"})
    );
    assert_eq!(
        read[1].payload,
        json!({"first": "Alan", "last": "Turing", "country": "BD"})
    );
    assert_eq!(
        read[2].payload,
        json!({"first": "G", "last": "H", "country": "UK"})
    );
    assert_eq!(read[3].payload, json!({"name": "x"}));
    let log = read_log(&store, &EventFilter::all(), 2).await;
    assert_eq!(log, read);
    let stored = read_all_of(&raw, &s).await;
    assert_eq!(
        stored.iter().map(|e| e.schema_version).collect::<Vec<_>>(),
        vec![1, 2, 3, 1]
    );
    assert_eq!(stored[0].payload, json!({"name": "Ada Lovelace"}));

    // A failing upcaster is a typed error, not a panic.
    let mut bad = UpcasterRegistry::new();
    bad.register("customer.renamed", 1, |_| Err("cannot upcast".into()));
    let broken = Upcasting::new(raw, bad);
    let r: Result<Vec<_>, _> = broken
        .read_stream(&s, ReadStreamOptions::forwards())
        .try_collect()
        .await;
    assert!(
        matches!(
            r,
            Err(EventStoreError::Upcast {
                from_version: 1,
                ..
            })
        ),
        "{r:?}"
    );
}

/// The suite's aggregate: a ledger of signed amounts with a business rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// The balance.
    pub balance: i64,
    /// How many entries were posted.
    pub entries: u64,
    /// The largest single entry.
    pub largest: i64,
}

/// [`Ledger`]'s events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LedgerEvent {
    /// An amount was posted.
    Posted {
        /// The signed amount.
        amount: i64,
    },
}

impl DomainEvent for LedgerEvent {
    fn event_type(&self) -> &'static str {
        "ledger.posted"
    }
}

/// [`Ledger`]'s error: the posting would take the balance below zero.
#[derive(Debug)]
pub struct Overdrawn;

impl std::fmt::Display for Overdrawn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the ledger would go below zero")
    }
}

impl std::error::Error for Overdrawn {}

impl Aggregate for Ledger {
    const TYPE: &'static str = "ledger";
    type Command = Vec<i64>;
    type Event = LedgerEvent;
    type Error = Overdrawn;

    fn handle(&self, amounts: Vec<i64>) -> Result<Vec<LedgerEvent>, Overdrawn> {
        if self.balance + amounts.iter().sum::<i64>() < 0 {
            return Err(Overdrawn);
        }
        Ok(amounts
            .into_iter()
            .map(|amount| LedgerEvent::Posted { amount })
            .collect())
    }

    fn apply(&mut self, event: &LedgerEvent) {
        let LedgerEvent::Posted { amount } = event;
        self.balance += amount;
        self.entries += 1;
        self.largest = self.largest.max(*amount);
    }
}

fn ctx(i: u64) -> CommandContext {
    CommandContext::new()
        .with_actor(ActorId::new(format!("user:{}", i % 3)).expect("actor"))
        .with_occurred_at(
            Utc.timestamp_opt(1_700_000_000 + i as i64, 0)
                .single()
                .expect("time"),
        )
}

/// Snapshots store and replace per stream; an aggregate loaded through a
/// snapshotting repository equals the one replayed from all events (state,
/// version, audit); a stale save conflicts with the right versions.
pub async fn snapshots_and_repository_equal_full_replay<B: EventStoreBackend>(b: &B) {
    let store = b.fresh_store(MAX_PAYLOAD_BYTES).await;
    let s = sid("snapshot-raw");
    assert_eq!(store.load_snapshot(&s).await.expect("load"), None);
    let mut snap = Snapshot {
        stream_id: s.clone(),
        stream_version: 3,
        snapshot_version: 2,
        state: json!({"a": 1}),
    };
    store.save_snapshot(&snap).await.expect("save");
    assert_eq!(
        store.load_snapshot(&s).await.expect("load"),
        Some(snap.clone())
    );
    snap.stream_version = 7;
    snap.state = json!({"a": 2});
    store.save_snapshot(&snap).await.expect("replace");
    assert_eq!(store.load_snapshot(&s).await.expect("load"), Some(snap));

    let snapshotting = EventSourcedRepository::<Ledger, _>::new(store.clone())
        .with_snapshots(SnapshotPolicy::EveryNEvents(5), 1);
    let replaying = EventSourcedRepository::<Ledger, _>::new(store.clone());
    let id = AggregateId::new("L-1").expect("id");
    assert!(snapshotting.load(&id).await.expect("load").is_none());
    let mut root = AggregateRoot::<Ledger>::new(id.clone());
    for i in 0..24u64 {
        let amounts = if i % 4 == 0 {
            vec![i as i64, 1, 2]
        } else {
            vec![i as i64]
        };
        root.execute(amounts, &ctx(i)).expect("execute");
        snapshotting.save(&mut root).await.expect("save");
    }
    assert!(root.execute(vec![-1_000_000], &ctx(99)).is_err());
    let stream = EventSourcedRepository::<Ledger, B::Store>::stream_id(&id).expect("stream id");
    let taken = store
        .load_snapshot(&stream)
        .await
        .expect("load")
        .expect("a snapshot was taken");
    assert_eq!((taken.stream_version, root.version()), (35, 36));
    let from_snapshot = snapshotting.load(&id).await.expect("load").expect("exists");
    let replayed = replaying.load(&id).await.expect("load").expect("exists");
    assert_eq!(replayed.version(), root.version());
    assert_eq!(from_snapshot, replayed);
    assert_eq!(from_snapshot.state(), root.state());
    assert_eq!(from_snapshot.audit(), root.audit());

    let mut a = snapshotting.load(&id).await.expect("load").expect("exists");
    let mut c = replaying.load(&id).await.expect("load").expect("exists");
    a.execute(vec![1], &ctx(100)).expect("a");
    c.execute(vec![2], &ctx(101)).expect("c");
    snapshotting.save(&mut a).await.expect("first save wins");
    match replaying.save(&mut c).await {
        Err(RepositoryError::Conflict { expected, actual }) => {
            assert_eq!(expected, root.version());
            assert_eq!(actual, root.version() + 1);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(
        c.has_uncommitted_events(),
        "a failed save leaves the root as it was"
    );
}

/// A snapshot of another schema version is ignored (loading replays the
/// events); one of the expected version is used.
pub async fn stale_snapshot_is_ignored<B: EventStoreBackend>(b: &B) {
    let store = b.fresh_store(MAX_PAYLOAD_BYTES).await;
    let repo_v2 = EventSourcedRepository::<Ledger, _>::new(store.clone())
        .with_snapshots(SnapshotPolicy::EveryNEvents(1_000), 2);
    let id = AggregateId::new("L-2").expect("id");
    let mut root = AggregateRoot::<Ledger>::new(id.clone());
    root.execute(vec![10, 20, 30], &ctx(1)).expect("execute");
    repo_v2.save(&mut root).await.expect("save");
    let stream = EventSourcedRepository::<Ledger, B::Store>::stream_id(&id).expect("stream id");
    let audit = serde_json::to_value(root.audit()).expect("audit");
    // A snapshot of schema version 1 with a deliberately different state.
    let stale = Snapshot {
        stream_id: stream.clone(),
        stream_version: 2,
        snapshot_version: 1,
        state: json!({"state": {"balance": 999, "entries": 2, "largest": 999}, "audit": audit}),
    };
    store.save_snapshot(&stale).await.expect("save snapshot");
    let loaded = repo_v2.load(&id).await.expect("load").expect("exists");
    assert_eq!(
        loaded.state(),
        root.state(),
        "the stale snapshot is ignored"
    );
    assert_eq!(loaded.version(), 3);
    // A repository expecting version 1 does use it (and replays event 3 on top).
    let repo_v1 = EventSourcedRepository::<Ledger, _>::new(store.clone())
        .with_snapshots(SnapshotPolicy::EveryNEvents(1_000), 1);
    let from_v1 = repo_v1.load(&id).await.expect("load").expect("exists");
    assert_eq!(from_v1.state().balance, 999 + 30);
    assert_eq!(from_v1.version(), 3);
    // An unreadable snapshot of the right version is ignored too.
    let garbage = Snapshot {
        snapshot_version: 2,
        state: json!("garbage"),
        ..stale
    };
    store.save_snapshot(&garbage).await.expect("save snapshot");
    assert_eq!(
        repo_v2
            .load(&id)
            .await
            .expect("load")
            .expect("exists")
            .state(),
        root.state()
    );
}

/// Checkpoints store, replace, load and delete by name.
pub async fn checkpoints_store_load_delete<B: EventStoreBackend>(b: &B) {
    let store = b.fresh_store(MAX_PAYLOAD_BYTES).await;
    assert_eq!(store.load_checkpoint("a").await.expect("load"), None);
    store
        .save_checkpoint("a", GlobalPosition::new(5, 4))
        .await
        .expect("save");
    store
        .save_checkpoint("b", GlobalPosition::new(1, 1))
        .await
        .expect("save");
    store
        .save_checkpoint("a", GlobalPosition::new(u64::MAX >> 1, 9))
        .await
        .expect("replace");
    assert_eq!(
        store.load_checkpoint("a").await.expect("load"),
        Some(GlobalPosition::new(u64::MAX >> 1, 9))
    );
    assert_eq!(
        store.load_checkpoint("b").await.expect("load"),
        Some(GlobalPosition::new(1, 1))
    );
    store.delete_checkpoint("a").await.expect("delete");
    store
        .delete_checkpoint("missing")
        .await
        .expect("delete missing");
    assert_eq!(store.load_checkpoint("a").await.expect("load"), None);
}

/// A subscription delivers the stored events (catch-up), then events
/// appended later (live), in order, each once.
pub async fn subscription_catches_up_then_goes_live<B: EventStoreBackend>(b: &B) {
    let store = b.fresh_store(MAX_PAYLOAD_BYTES).await;
    let mut expected = Vec::new();
    for i in 0..25 {
        let e = event("tick", json!(i));
        expected.push(e.event_id);
        store
            .append_to_stream(&sid(&format!("sub-{}", i % 3)), ExpectedVersion::Any, &[e])
            .await
            .expect("append");
    }
    let opts = SubscriptionOptions::default()
        .with_batch_size(7)
        .with_poll_interval(Duration::from_millis(50));
    let mut sub = Subscription::new(store.clone(), GlobalPosition::START, opts).into_stream();
    let mut got = Vec::new();
    let deadline = Duration::from_secs(20);
    while got.len() < 25 {
        let e = tokio::time::timeout(deadline, sub.next())
            .await
            .expect("catch-up in time");
        got.push(e.expect("stream is endless").expect("event").event_id());
    }
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..15 {
                let e = event("tick", json!(100 + i));
                ids.push(e.event_id);
                store
                    .append_to_stream(&sid("sub-live"), ExpectedVersion::Any, &[e])
                    .await
                    .expect("append");
                if i % 5 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            ids
        })
    };
    while got.len() < 40 {
        let e = tokio::time::timeout(deadline, sub.next())
            .await
            .expect("live event in time");
        got.push(e.expect("stream is endless").expect("event").event_id());
    }
    expected.extend(writer.await.expect("writer"));
    assert_eq!(got, expected);
    // Nothing more arrives.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), sub.next())
            .await
            .is_err()
    );

    // A subscription from a checkpoint starts after it, filtered.
    let log = read_log(&store, &EventFilter::all(), 100).await;
    let opts = SubscriptionOptions::default()
        .with_filter(EventFilter::category("sub").with_event_types(["tick"]))
        .with_poll_interval(Duration::from_millis(50));
    let mut sub = Subscription::new(store.clone(), log[29].position, opts).into_stream();
    let first = tokio::time::timeout(deadline, sub.next())
        .await
        .expect("in time")
        .expect("item")
        .expect("event");
    assert_eq!(first.event_id(), log[30].event_id());
}

/// The suite's projection: counts applications per event id (so a double
/// application shows), and can be told to fail on the n-th event it sees.
pub struct CountingProjection<B> {
    fail_at: AtomicUsize,
    seen: AtomicUsize,
    _backend: std::marker::PhantomData<fn() -> B>,
}

impl<B> CountingProjection<B> {
    /// A projection that fails on the `fail_at`-th event it is handed (1-based; 0: never).
    pub fn new(fail_at: usize) -> Self {
        Self {
            fail_at: AtomicUsize::new(fail_at),
            seen: AtomicUsize::new(0),
            _backend: std::marker::PhantomData,
        }
    }

    /// Stops failing.
    pub fn heal(&self) {
        self.fail_at.store(0, Ordering::SeqCst);
    }
}

impl<B: EventStoreBackend> Projection<B::Store> for CountingProjection<B> {
    fn name(&self) -> &str {
        "testkit-counting"
    }

    async fn apply(
        &self,
        tx: &mut <B::Store as ProjectionBackend>::Transaction,
        event: &RecordedEvent,
    ) -> Result<(), BoxError> {
        let n = self.seen.fetch_add(1, Ordering::SeqCst) + 1;
        B::add_in_tx(tx, &event.event_id().to_string(), 1).await?;
        B::add_in_tx(tx, "total", 1).await?;
        if n == self.fail_at.load(Ordering::SeqCst) {
            return Err(format!("deliberate failure on event {n}").into());
        }
        Ok(())
    }

    async fn reset(
        &self,
        tx: &mut <B::Store as ProjectionBackend>::Transaction,
    ) -> Result<(), BoxError> {
        B::clear_in_tx(tx).await
    }
}

async fn append_spread<S: EventAppender>(store: &S, n: usize) -> Vec<EventId> {
    let mut ids = Vec::new();
    for i in 0..n {
        let e = event("proj.tick", json!(i));
        ids.push(e.event_id);
        store
            .append_to_stream(&sid(&format!("proj-{}", i % 4)), ExpectedVersion::Any, &[e])
            .await
            .expect("append");
    }
    ids
}

/// A handler failing mid-batch leaves neither its writes nor the
/// checkpoint of that batch; earlier batches stay; after the fault is
/// mended the projection completes with every event applied exactly once.
pub async fn projection_failure_rolls_back_writes_and_checkpoint<B: EventStoreBackend>(b: &B) {
    let store = b.fresh_store(MAX_PAYLOAD_BYTES).await;
    let ids = append_spread(&store, 10).await;
    let log = read_log(&store, &EventFilter::all(), 100).await;

    // Batches of 4: events 1-4 commit, event 7 fails in the batch 5-8.
    let runner =
        ProjectionRunner::new(store.clone(), CountingProjection::<B>::new(7)).with_batch_size(4);
    let r = runner.run_batch().await.expect("first batch");
    assert_eq!((r.applied, r.checkpoint), (4, Some(log[3].position)));
    let err = runner.run_batch().await.expect_err("second batch fails");
    assert!(
        matches!(&err, EventStoreError::Projection { position, .. } if *position == log[6].position),
        "{err}"
    );
    let model = B::read_model(&store).await;
    assert_eq!(
        model.get("total"),
        Some(&4),
        "the failed batch's writes are rolled back"
    );
    assert_eq!(model.len(), 5);
    assert_eq!(
        store.load_checkpoint("testkit-counting").await.expect("cp"),
        Some(log[3].position)
    );
    let lag = runner.lag().await.expect("lag");
    assert_eq!(lag.events_behind, 6);
    assert!(lag.oldest_unprocessed_age.is_some());

    runner.projection().heal();
    assert_eq!(runner.catch_up().await.expect("catch up"), 6);
    let model = B::read_model(&store).await;
    assert_eq!(model.get("total"), Some(&10));
    for id in &ids {
        assert_eq!(
            model.get(&id.to_string()),
            Some(&1),
            "event {id} applied exactly once"
        );
    }
    assert_eq!(
        store.load_checkpoint("testkit-counting").await.expect("cp"),
        Some(log[9].position)
    );
    let r = runner.run_batch().await.expect("idle batch");
    assert!(!r.advanced && r.applied == 0);
    let lag = runner.lag().await.expect("lag");
    assert_eq!((lag.events_behind, lag.oldest_unprocessed_age), (0, None));
}

/// A rebuild (reset + checkpoint deleted in one transaction, then replay)
/// ends in the same read model as incremental processing; live processing
/// with `run_until` picks up new events.
pub async fn projection_rebuild_equals_incremental<B: EventStoreBackend>(b: &B) {
    let store = b.fresh_store(MAX_PAYLOAD_BYTES).await;
    append_spread(&store, 30).await;
    let runner = Arc::new(
        ProjectionRunner::new(store.clone(), CountingProjection::<B>::new(0))
            .with_batch_size(7)
            .with_poll_interval(Duration::from_millis(50)),
    );
    assert_eq!(runner.lag().await.expect("lag").events_behind, 30);
    assert_eq!(runner.catch_up().await.expect("catch up"), 30);
    let incremental = B::read_model(&store).await;
    assert_eq!(incremental.get("total"), Some(&30));
    assert_eq!(runner.rebuild().await.expect("rebuild"), 30);
    assert_eq!(B::read_model(&store).await, incremental);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let live = {
        let runner = runner.clone();
        tokio::spawn(async move {
            runner
                .run_until(async { stop_rx.await.unwrap_or(()) })
                .await
        })
    };
    append_spread(&store, 5).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if B::read_model(&store).await.get("total") == Some(&35) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "live projection did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_tx.send(()).expect("stop");
    live.await.expect("task").expect("run_until");
    let model = B::read_model(&store).await;
    assert!(
        model
            .iter()
            .filter(|(k, _)| *k != "total")
            .all(|(_, v)| *v == 1)
    );
}

/// Oversized payloads, invalid stream ids, malformed metadata and malformed
/// batches give typed errors, and nothing of the batch is written.
pub async fn bad_input_is_typed_and_writes_nothing<B: EventStoreBackend>(b: &B) {
    use vextrus_kernel::{ErrorKind, HasErrorKind};
    let store = b.fresh_store(MAX_PAYLOAD_BYTES).await;
    let s = sid("bad-1");
    let big = event("t", json!({"blob": "x".repeat(MAX_PAYLOAD_BYTES)}));
    let r = store
        .append_to_stream(&s, ExpectedVersion::Any, &[event("t", json!(1)), big])
        .await;
    match r {
        Err(e @ EventStoreError::PayloadTooLarge { size, max }) => {
            assert_eq!(max, MAX_PAYLOAD_BYTES);
            assert!(size > max);
            assert_eq!(e.kind(), ErrorKind::Validation);
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    let at_limit = event("t", json!("x".repeat(MAX_PAYLOAD_BYTES - 2)));
    assert_eq!(at_limit.payload_size().expect("size"), MAX_PAYLOAD_BYTES);

    for bad in ["", "has space", "tab\there", "nul\0", &"x".repeat(201)] {
        let e = StreamId::new(bad).expect_err("invalid stream id");
        assert!(matches!(e, EventStoreError::InvalidStreamId { .. }));
        assert_eq!(e.kind(), ErrorKind::Validation);
    }

    let meta = json!({"event_id": "not-a-uuid", "correlation_id": EventId::new(), "occurred_at": "2026-01-01T00:00:00Z"});
    let e = NewEvent::from_json_parts("t", 1, json!({}), meta).expect_err("malformed metadata");
    assert!(matches!(e, EventStoreError::InvalidMetadata(_)), "{e}");
    let mut tp = serde_json::to_value(EventMetadata::new()).expect("meta");
    tp["trace_context"] = json!({"traceparent": "garbage"});
    // A trace context is validated when built, not when deserialized, so the
    // suite only requires that parsing never panics.
    let _ = NewEvent::from_json_parts("t", 1, json!({}), tp);

    let mut mismatched = event("t", json!(1));
    mismatched.event_id = EventId::new();
    let r = store
        .append_to_stream(
            &s,
            ExpectedVersion::Any,
            &[event("t", json!(0)), mismatched],
        )
        .await;
    assert!(
        matches!(r, Err(EventStoreError::InvalidMetadata(_))),
        "{r:?}"
    );

    let r = store.append_to_stream(&s, ExpectedVersion::Any, &[]).await;
    assert!(matches!(r, Err(EventStoreError::InvalidEvent(_))), "{r:?}");
    let dup = event("t", json!(1));
    let r = store
        .append_to_stream(&s, ExpectedVersion::Any, &[dup.clone(), dup])
        .await;
    assert!(matches!(r, Err(EventStoreError::InvalidEvent(_))), "{r:?}");
    let r = store
        .append_to_stream(&s, ExpectedVersion::Any, &[event("", json!(1))])
        .await;
    assert!(matches!(r, Err(EventStoreError::InvalidEvent(_))), "{r:?}");
    let r = store
        .append_to_stream(
            &s,
            ExpectedVersion::Any,
            &[event("t", json!(1)).with_schema_version(0)],
        )
        .await;
    assert!(matches!(r, Err(EventStoreError::InvalidEvent(_))), "{r:?}");

    assert_eq!(store.stream_version(&s).await.expect("v"), None);
    assert_eq!(
        store
            .count_after(GlobalPosition::START, &EventFilter::all())
            .await
            .expect("count"),
        0
    );
    // The store still works after the rejected input.
    store
        .append_to_stream(&s, ExpectedVersion::NoStream, &[event("t", json!(1))])
        .await
        .expect("append");
    assert_eq!(store.stream_version(&s).await.expect("v"), Some(1));
}
