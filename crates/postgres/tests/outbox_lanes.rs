//! The PostgreSQL outbox's lanes (`vextrus_core::outbox::lanes`), on the
//! real server: a batch published whole writes no outbox row, a failure
//! takes its key off the lane without reordering it, a batch released whole
//! writes nothing, an expired lane lease hands over, rows written before
//! lanes still go first, retention follows the lanes' log, and — the
//! property lanes rest on — a cursor never passes a row that commits late.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use sqlx::Row;
use vextrus_core::outbox::{
    ClaimRequest, DeadLetterPolicy, DeadLetters, OutboxClaimer, OutboxRetention, OutboxStatus,
    OutboxStore, PublishFailure, lane_of,
};
use vextrus_core::transport::{MessageId, OutboundMessage};
use vextrus_core::unit_of_work::UnitOfWork;
use vextrus_postgres::PgOutbox;

async fn fresh() -> (common::TestDb, PgOutbox) {
    let (db, store) = common::fresh_store().await;
    (db, PgOutbox::new(store))
}

fn msg(key: &str, n: u32) -> OutboundMessage {
    OutboundMessage::new("orders", key, format!("{key}-{n}").into_bytes())
}

fn req(worker: &str) -> ClaimRequest {
    ClaimRequest {
        worker: worker.into(),
        limit: 100,
        lease: Duration::from_secs(30),
        dead_letter_policy: DeadLetterPolicy::SkipKey,
    }
}

fn ids(rows: &[vextrus_core::outbox::OutboxMessage]) -> Vec<MessageId> {
    rows.iter().map(|m| m.id()).collect()
}

/// Two distinct keys in the same lane.
fn same_lane_keys() -> (String, String) {
    let a = "key-0".to_owned();
    let b = (1..)
        .map(|i| format!("key-{i}"))
        .find(|k| lane_of(k) == lane_of(&a))
        .unwrap();
    (a, b)
}

/// Every outbox row's physical version (`xmin`, `ctid`) and columns: equal
/// snapshots mean no row was written.
async fn snapshot(outbox: &PgOutbox) -> Vec<String> {
    sqlx::query(
        "SELECT sequence, xmin::text, ctid::text, status, lane, published_at::text,
                claimed_by
           FROM vextrus_outbox ORDER BY sequence",
    )
    .fetch_all(outbox.pool())
    .await
    .unwrap()
    .iter()
    .map(|r| {
        format!(
            "{} {} {} {} {:?} {:?} {:?}",
            r.get::<i64, _>(0),
            r.get::<String, _>(1),
            r.get::<String, _>(2),
            r.get::<String, _>(3),
            r.get::<Option<i32>, _>(4),
            r.get::<Option<String>, _>(5),
            r.get::<Option<String>, _>(6),
        )
    })
    .collect()
}

async fn cursor(outbox: &PgOutbox, lane: i32) -> i64 {
    sqlx::query_scalar("SELECT cursor FROM vextrus_outbox_lanes WHERE lane = $1")
        .bind(lane)
        .fetch_one(outbox.pool())
        .await
        .unwrap()
}

fn retry(after: Duration) -> PublishFailure {
    PublishFailure {
        error: "broker said no".into(),
        retry_in: after,
        max_attempts: 5,
        dead_now: false,
    }
}

#[tokio::test]
async fn a_batch_published_whole_writes_no_outbox_row() {
    let (db, outbox) = fresh().await;
    let batch: Vec<_> = (0..20).map(|i| msg(&format!("k{}", i % 5), i)).collect();
    outbox.enqueue(&batch).await.unwrap();
    let claimed = outbox.claim(&req("w1")).await.unwrap();
    assert_eq!(
        ids(&claimed),
        batch.iter().map(|m| m.id).collect::<Vec<_>>()
    );
    let before = snapshot(&outbox).await;
    let outcomes = outbox.settle("w1", &ids(&claimed), &[], &[]).await.unwrap();
    assert!(outcomes.is_empty());
    assert_eq!(snapshot(&outbox).await, before, "no outbox row was written");
    let mut last_of_lane = std::collections::HashMap::new();
    for m in &claimed {
        last_of_lane.insert(lane_of(&m.message.partition_key), m.sequence);
    }
    for (lane, last) in last_of_lane {
        assert_eq!(cursor(&outbox, lane).await as u64, last, "lane {lane}");
    }
    for m in &batch {
        let row = outbox.get(m.id).await.unwrap().unwrap();
        assert_eq!(row.status, OutboxStatus::Published);
        assert!(row.published_at.is_some());
    }
    let status = outbox.status().await.unwrap();
    assert_eq!((status.pending, status.published), (0, 20));
    assert!(outbox.claim(&req("w2")).await.unwrap().is_empty());
    db.drop_db().await;
}

#[tokio::test]
async fn a_failure_leaves_its_lane_and_its_key_stays_in_order() {
    let (db, outbox) = fresh().await;
    let (a, b) = same_lane_keys();
    let (a1, b1, a2, b2) = (msg(&a, 1), msg(&b, 1), msg(&a, 2), msg(&b, 2));
    outbox
        .enqueue(&[a1.clone(), b1.clone(), a2.clone(), b2.clone()])
        .await
        .unwrap();
    let claimed = outbox.claim(&req("w1")).await.unwrap();
    assert_eq!(ids(&claimed), vec![a1.id, b1.id, a2.id, b2.id]);
    // a1 fails, so the relay releases a2; b's messages are confirmed.
    let outcomes = outbox
        .settle(
            "w1",
            &[b1.id, b2.id],
            &[(a1.id, retry(Duration::from_millis(300)))],
            &[a2.id],
        )
        .await
        .unwrap();
    assert!(matches!(
        outcomes[0],
        vextrus_core::outbox::FailureOutcome::Retrying { attempts: 1, .. }
    ));
    for id in [b1.id, b2.id] {
        assert_eq!(
            outbox.get(id).await.unwrap().unwrap().status,
            OutboxStatus::Published
        );
    }
    let r1 = outbox.get(a1.id).await.unwrap().unwrap();
    assert_eq!((r1.status, r1.attempts), (OutboxStatus::Pending, 1));
    // Another key keeps flowing on the lane; a2 waits behind a1's retry.
    let b3 = msg(&b, 3);
    outbox.enqueue(std::slice::from_ref(&b3)).await.unwrap();
    let next = outbox.claim(&req("w2")).await.unwrap();
    assert_eq!(ids(&next), vec![b3.id], "a2 is held behind a1");
    outbox.settle("w2", &[b3.id], &[], &[]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let retried = outbox.claim(&req("w3")).await.unwrap();
    assert_eq!(ids(&retried), vec![a1.id, a2.id], "a1 first, then a2");
    outbox
        .settle("w3", &[a1.id, a2.id], &[], &[])
        .await
        .unwrap();
    let status = outbox.status().await.unwrap();
    assert_eq!((status.pending, status.published, status.dead), (0, 5, 0));
    db.drop_db().await;
}

#[tokio::test]
async fn a_batch_released_whole_writes_nothing_and_is_claimed_again() {
    let (db, outbox) = fresh().await;
    let batch: Vec<_> = (0..6).map(|i| msg(&format!("r{i}"), i)).collect();
    outbox.enqueue(&batch).await.unwrap();
    let claimed = outbox.claim(&req("w1")).await.unwrap();
    assert_eq!(claimed.len(), 6);
    let before = snapshot(&outbox).await;
    outbox.settle("w1", &[], &[], &ids(&claimed)).await.unwrap();
    assert_eq!(snapshot(&outbox).await, before);
    let again = outbox.claim(&req("w2")).await.unwrap();
    assert_eq!(ids(&again), ids(&claimed));
    db.drop_db().await;
}

#[tokio::test]
async fn an_expired_lane_lease_hands_over_and_the_late_settle_changes_nothing() {
    let (db, outbox) = fresh().await;
    let (m1, m2) = (msg("h", 1), msg("h", 2));
    outbox.enqueue(&[m1.clone(), m2.clone()]).await.unwrap();
    let mut short = req("w1");
    short.lease = Duration::from_millis(1500);
    assert_eq!(
        ids(&outbox.claim(&short).await.unwrap()),
        vec![m1.id, m2.id]
    );
    assert!(outbox.claim(&req("w2")).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(
        ids(&outbox.claim(&req("w2")).await.unwrap()),
        vec![m1.id, m2.id]
    );
    // w1 wakes up and settles its stale claim: nothing moves.
    let before = snapshot(&outbox).await;
    outbox
        .settle("w1", &[m1.id, m2.id], &[], &[])
        .await
        .unwrap();
    assert_eq!(snapshot(&outbox).await, before);
    assert_eq!(cursor(&outbox, lane_of("h")).await, 0);
    assert!(
        outbox.claim(&req("w3")).await.unwrap().is_empty(),
        "w2 holds it"
    );
    outbox
        .settle("w2", &[m1.id, m2.id], &[], &[])
        .await
        .unwrap();
    assert_eq!(
        outbox.get(m2.id).await.unwrap().unwrap().status,
        OutboxStatus::Published
    );
    db.drop_db().await;
}

#[tokio::test]
async fn rows_written_before_lanes_go_first_and_the_migration_reapplies() {
    let (db, outbox) = fresh().await;
    // Rows as releases before lanes wrote them: no lane.
    let old: Vec<OutboundMessage> = vec![msg("p", 1), msg("q", 1)];
    for m in &old {
        sqlx::query(
            "INSERT INTO vextrus_outbox (id, destination, partition_key, payload, headers,
                                         created_at, created_at_ns, next_attempt_at)
             VALUES ($1, $2, $3, $4, '{}'::jsonb, $5, $6, now())",
        )
        .bind(m.id.as_uuid())
        .bind(&m.destination)
        .bind(&m.partition_key)
        .bind(&m.payload)
        .bind(m.created_at)
        .bind(m.created_at.timestamp_nanos_opt().unwrap())
        .execute(outbox.pool())
        .await
        .unwrap();
    }
    // Re-applying the lanes migration is harmless.
    sqlx::raw_sql(vextrus_postgres::OUTBOX_LANES_MIGRATION.sql)
        .execute(outbox.pool())
        .await
        .unwrap();
    assert_eq!(outbox.migrate().await.unwrap(), 0);
    let (p2, r1) = (msg("p", 2), msg("r", 1));
    outbox.enqueue(&[p2.clone(), r1.clone()]).await.unwrap();
    // The old rows and r1 now; p2 waits for its key's older row.
    let first = outbox.claim(&req("w1")).await.unwrap();
    assert_eq!(ids(&first), vec![old[0].id, old[1].id, r1.id]);
    outbox.settle("w1", &ids(&first), &[], &[]).await.unwrap();
    let second = outbox.claim(&req("w1")).await.unwrap();
    assert_eq!(ids(&second), vec![p2.id]);
    outbox.settle("w1", &[p2.id], &[], &[]).await.unwrap();
    assert_eq!(outbox.status().await.unwrap().published, 4);
    db.drop_db().await;
}

#[tokio::test]
async fn the_headers_migration_turns_stored_jsonb_headers_into_json_text() {
    let (db, outbox) = fresh().await;
    // A table as migration 6 left it: headers in `jsonb`, with rows in it.
    sqlx::query("ALTER TABLE vextrus_outbox ALTER COLUMN headers TYPE jsonb")
        .execute(outbox.pool())
        .await
        .unwrap();
    let mut m = msg("hdr", 1);
    m.headers.insert("tenant".into(), "acme \"north\"".into());
    m.headers.insert("ce_type".into(), "order.placed".into());
    outbox.enqueue(std::slice::from_ref(&m)).await.unwrap();
    let kind = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT data_type FROM information_schema.columns
              WHERE table_name = 'vextrus_outbox' AND column_name = 'headers'",
        )
        .fetch_one(outbox.pool())
        .await
        .unwrap()
    };
    assert_eq!(kind().await, "jsonb");
    // Applied (and applied again): the column is `json`, the row intact.
    for _ in 0..2 {
        sqlx::raw_sql(vextrus_postgres::OUTBOX_HEADERS_MIGRATION.sql)
            .execute(outbox.pool())
            .await
            .unwrap();
    }
    assert_eq!(kind().await, "json");
    let claimed = outbox.claim(&req("w")).await.unwrap();
    assert_eq!(ids(&claimed), vec![m.id]);
    assert_eq!(claimed[0].message.headers, m.headers);
    db.drop_db().await;
}

#[tokio::test]
async fn retention_deletes_lane_rows_confirmed_before_the_cutoff() {
    let (db, outbox) = fresh().await;
    let early: Vec<_> = (0..4).map(|i| msg("ret", i)).collect();
    outbox.enqueue(&early).await.unwrap();
    let c = outbox.claim(&req("w")).await.unwrap();
    outbox.settle("w", &ids(&c), &[], &[]).await.unwrap();
    assert_eq!(
        outbox
            .purge_published(Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let late = msg("ret", 9);
    outbox.enqueue(std::slice::from_ref(&late)).await.unwrap();
    let c = outbox.claim(&req("w")).await.unwrap();
    outbox.settle("w", &ids(&c), &[], &[]).await.unwrap();
    assert_eq!(
        outbox
            .purge_published(Duration::from_millis(400))
            .await
            .unwrap(),
        4
    );
    assert!(outbox.get(early[0].id).await.unwrap().is_none());
    let kept = outbox.get(late.id).await.unwrap().unwrap();
    assert_eq!(kept.status, OutboxStatus::Published);
    assert!(kept.published_at.is_some(), "its log mark is kept");
    db.drop_db().await;
}

/// Writers enqueue to six keys of one lane in
/// transactions that stay open a while after the enqueue, so sequences
/// commit out of order across lanes, while a worker claims and settles
/// everything it sees. Every message must be claimed: a cursor that passed
/// a row committing later would mark it published without anyone claiming
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cursor_never_passes_a_row_that_commits_late() {
    let (db, outbox) = fresh().await;
    let writers = 8;
    let per_writer = 40;
    // Six keys of one lane: their rows share the lane's cursor.
    let keys: Vec<String> = (0..)
        .map(|i| format!("late-{i}"))
        .filter(|k| lane_of(k) == lane_of("late-0"))
        .take(6)
        .collect();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (outbox, keys) = (outbox.clone(), keys.clone());
        tasks.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for i in 0..per_writer {
                let m = msg(&keys[(w + i) % keys.len()], i as u32);
                let mut tx = outbox.begin().await.unwrap();
                outbox
                    .enqueue_in_tx(&mut tx, std::slice::from_ref(&m))
                    .await
                    .unwrap();
                // Hold the transaction open for 0-4 ms after the enqueue.
                tokio::time::sleep(Duration::from_micros(((w * 7 + i * 13) % 5) as u64 * 1000))
                    .await;
                outbox.commit(tx).await.unwrap();
                sent.push(m.id);
            }
            sent
        }));
    }
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let claimer = {
        let (outbox, done) = (outbox.clone(), done.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                // Read the flag before claiming: once it is set, every
                // message is committed, and an empty claim after that with
                // nothing pending means the end.
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                let batch = outbox.claim(&req("relay")).await.unwrap();
                if batch.is_empty() {
                    if finished && outbox.status().await.unwrap().pending == 0 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                outbox
                    .settle("relay", &ids(&batch), &[], &[])
                    .await
                    .unwrap();
                seen.extend(ids(&batch));
            }
            seen
        })
    };
    let mut sent = HashSet::new();
    for t in tasks {
        sent.extend(t.await.unwrap());
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = claimer.await.unwrap();
    let seen_set: HashSet<MessageId> = seen.iter().copied().collect();
    assert_eq!(seen.len(), seen_set.len(), "no message claimed twice");
    let missed: Vec<_> = sent.difference(&seen_set).collect();
    assert!(
        missed.is_empty(),
        "{} of {} messages were never claimed",
        missed.len(),
        sent.len()
    );
    assert_eq!(outbox.status().await.unwrap().published, sent.len() as u64);
    db.drop_db().await;
}
