//! Lane/cursor claims on the SQLite outbox (see `vextrus_core::outbox::lanes`):
//! a batch published whole writes no outbox row, a failure sends its row
//! (and, at the next claim, its key's later rows) to the per-row path while
//! other keys keep flowing on the lane, a batch released whole only ends its
//! lease, an expired lease hands the lane over from its cursor, and
//! retention deletes lane rows by their lane's confirmation marks.

use std::time::Duration;

use sqlx::SqlitePool;
use vextrus_core::outbox::{
    ClaimRequest, DeadLetterPolicy, DeadLetters, FailureOutcome, OutboxClaimer, OutboxMessage,
    OutboxRetention, OutboxStatus, OutboxStore, PublishFailure, lane_of,
};
use vextrus_core::transport::{MessageId, OutboundMessage};
use vextrus_sqlite::{SqliteEventStore, SqliteOutbox};

fn req(worker: &str, limit: usize, lease: Duration) -> ClaimRequest {
    ClaimRequest {
        worker: worker.into(),
        limit,
        lease,
        dead_letter_policy: DeadLetterPolicy::SkipKey,
    }
}

fn claim_req(worker: &str) -> ClaimRequest {
    req(worker, 100, Duration::from_secs(30))
}

fn msg(key: &str, i: usize) -> OutboundMessage {
    OutboundMessage::new("orders", key, format!("{i}").into_bytes())
}

fn ids(rows: &[OutboxMessage]) -> Vec<MessageId> {
    rows.iter().map(OutboxMessage::id).collect()
}

/// `n` distinct keys that share one lane.
fn same_lane_keys(n: usize) -> Vec<String> {
    let lane = lane_of("key-0");
    (0..)
        .map(|i| format!("key-{i}"))
        .filter(|k| lane_of(k) == lane)
        .take(n)
        .collect()
}

/// Counts every update of an outbox row (a trigger on the table).
async fn count_row_writes(pool: &SqlitePool) {
    for sql in [
        "CREATE TABLE test_outbox_writes (n INTEGER NOT NULL)",
        "INSERT INTO test_outbox_writes VALUES (0)",
        "CREATE TRIGGER test_outbox_writes_update AFTER UPDATE ON outbox
         BEGIN UPDATE test_outbox_writes SET n = n + 1; END",
    ] {
        sqlx::query(sql).execute(pool).await.unwrap();
    }
}

async fn row_writes(pool: &SqlitePool) -> i64 {
    sqlx::query_scalar("SELECT n FROM test_outbox_writes")
        .fetch_one(pool)
        .await
        .unwrap()
}

type Snapshot = Vec<(i64, String, Option<i64>, Option<i64>, Option<String>, i64)>;

/// Every outbox row as stored: sequence, status, lane, published_at,
/// claimed_by, attempts.
async fn snapshot(pool: &SqlitePool) -> Snapshot {
    sqlx::query_as(
        "SELECT sequence, status, lane, published_at, claimed_by, attempts
           FROM outbox ORDER BY sequence",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A lane's cursor and holder.
async fn lane_state(pool: &SqlitePool, lane: i32) -> (i64, Option<String>) {
    sqlx::query_as("SELECT cursor, claimed_by FROM outbox_lanes WHERE lane = ?")
        .bind(lane)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The stored lane of a row (NULL: on the per-row path).
async fn lane_column(pool: &SqlitePool, id: MessageId) -> Option<i32> {
    sqlx::query_scalar("SELECT lane FROM outbox WHERE id = ?")
        .bind(id.to_string())
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_batch_published_whole_writes_no_outbox_row() {
    let s = SqliteOutbox::temporary().await.unwrap();
    let batch: Vec<_> = (0..12).map(|i| msg(&format!("k{}", i % 4), i)).collect();
    s.enqueue(&batch).await.unwrap();
    count_row_writes(s.pool()).await;
    let claimed = s.claim(&claim_req("w1")).await.unwrap();
    assert_eq!(
        ids(&claimed),
        batch.iter().map(|m| m.id).collect::<Vec<_>>()
    );
    assert!(claimed.iter().all(|m| m.status == OutboxStatus::Pending));
    let before = snapshot(s.pool()).await;
    assert!(
        before.iter().all(|r| r.1 == "pending" && r.2.is_some()),
        "every row is a pending lane row: {before:?}"
    );
    let outcomes = s.settle("w1", &ids(&claimed), &[], &[]).await.unwrap();
    assert!(outcomes.is_empty());
    assert_eq!(snapshot(s.pool()).await, before, "no outbox row changed");
    assert_eq!(row_writes(s.pool()).await, 0, "no outbox row was written");
    // Each lane's cursor is its last row, and the lane is free again.
    for key in ["k0", "k1", "k2", "k3"] {
        let last = claimed
            .iter()
            .filter(|m| lane_of(&m.message.partition_key) == lane_of(key))
            .map(|m| m.sequence)
            .max()
            .unwrap();
        let (cursor, holder) = lane_state(s.pool(), lane_of(key)).await;
        assert_eq!((cursor, holder), (i64::try_from(last).unwrap(), None));
    }
    for m in &batch {
        let row = s.get(m.id).await.unwrap().unwrap();
        assert_eq!(row.status, OutboxStatus::Published, "{}", m.id);
        assert!(row.published_at.is_some());
        assert_eq!(row.message, *m);
    }
    let st = s.status().await.unwrap();
    assert_eq!((st.pending, st.published, st.dead), (0, 12, 0));
    assert_eq!(st.oldest_pending_age, None);
    assert!(
        s.rows()
            .await
            .unwrap()
            .iter()
            .all(|r| r.status == OutboxStatus::Published)
    );
    assert!(s.claim(&claim_req("w2")).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_failure_mid_lane_goes_per_row_and_its_key_waits_for_it() {
    let s = SqliteOutbox::temporary().await.unwrap();
    let keys = same_lane_keys(2);
    let (x, y) = (keys[0].as_str(), keys[1].as_str());
    let lane = lane_of(x);
    let (x1, y1, x2, y2, x3) = (msg(x, 1), msg(y, 1), msg(x, 2), msg(y, 2), msg(x, 3));
    s.enqueue(&[x1.clone(), y1.clone(), x2.clone(), y2.clone(), x3.clone()])
        .await
        .unwrap();
    let first = s.claim(&claim_req("w1")).await.unwrap();
    assert_eq!(ids(&first), vec![x1.id, y1.id, x2.id, y2.id, x3.id]);
    // As the relay settles it: x2 failed, so x3 is released; y2 confirmed.
    let retry = PublishFailure {
        error: "broker said no".into(),
        retry_in: Duration::ZERO,
        max_attempts: 5,
        dead_now: false,
    };
    let outcomes = s
        .settle(
            "w1",
            &[x1.id, y1.id, y2.id],
            &[(x2.id, retry.clone())],
            &[x3.id],
        )
        .await
        .unwrap();
    assert!(
        matches!(
            outcomes.as_slice(),
            [FailureOutcome::Retrying { attempts: 1, .. }]
        ),
        "{outcomes:?}"
    );
    // The cursor stops before the failure; the failed row left the lane
    // with one attempt; y2, published after it, was written on its own row;
    // x3 stays in the lane, unpublished.
    let seq = |m: &OutboundMessage| {
        let s = s.clone();
        let id = m.id;
        async move { s.get(id).await.unwrap().unwrap().sequence }
    };
    assert_eq!(
        lane_state(s.pool(), lane).await,
        (i64::try_from(seq(&y1).await).unwrap(), None)
    );
    let rx2 = s.get(x2.id).await.unwrap().unwrap();
    assert_eq!((rx2.status, rx2.attempts), (OutboxStatus::Pending, 1));
    assert_eq!(lane_column(s.pool(), x2.id).await, None);
    assert_eq!(
        s.get(y2.id).await.unwrap().unwrap().status,
        OutboxStatus::Published
    );
    assert_eq!(lane_column(s.pool(), y2.id).await, None);
    assert_eq!(
        s.get(x3.id).await.unwrap().unwrap().status,
        OutboxStatus::Pending
    );
    assert_eq!(lane_column(s.pool(), x3.id).await, Some(lane));

    // New rows of both keys. The next claim takes the retry per row, and
    // y3 on the lane; x3 and x4 leave the lane behind the retry.
    let (y3, x4) = (msg(y, 3), msg(x, 4));
    s.enqueue(&[y3.clone(), x4.clone()]).await.unwrap();
    let second = s.claim(&claim_req("w2")).await.unwrap();
    assert_eq!(ids(&second), vec![x2.id, y3.id]);
    assert_eq!(lane_column(s.pool(), x3.id).await, None, "x3 diverted");
    assert_eq!(lane_column(s.pool(), x4.id).await, None, "x4 diverted");
    assert_eq!(lane_column(s.pool(), y3.id).await, Some(lane), "y3 flows");
    s.settle("w2", &[x2.id, y3.id], &[], &[]).await.unwrap();
    assert_eq!(
        lane_state(s.pool(), lane).await,
        (i64::try_from(seq(&y3).await).unwrap(), None),
        "the cursor passed y3 (and the diverted x3)"
    );
    let y3_row = s.get(y3.id).await.unwrap().unwrap();
    assert_eq!(y3_row.status, OutboxStatus::Published);
    assert_eq!(lane_column(s.pool(), y3.id).await, Some(lane), "by cursor");
    // Only then x's later rows, in order, per row.
    let third = s.claim(&claim_req("w1")).await.unwrap();
    assert_eq!(ids(&third), vec![x3.id, x4.id]);
    s.settle("w1", &ids(&third), &[], &[]).await.unwrap();
    let st = s.status().await.unwrap();
    assert_eq!((st.pending, st.published, st.dead), (0, 7, 0));
    assert!(s.claim(&claim_req("w1")).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_batch_released_whole_writes_no_outbox_row_and_goes_to_another_worker() {
    let s = SqliteOutbox::temporary().await.unwrap();
    let batch: Vec<_> = (0..6).map(|i| msg(&format!("r{}", i % 3), i)).collect();
    s.enqueue(&batch).await.unwrap();
    count_row_writes(s.pool()).await;
    let claimed = s.claim(&claim_req("w1")).await.unwrap();
    assert_eq!(claimed.len(), 6);
    assert!(
        s.claim(&claim_req("w2")).await.unwrap().is_empty(),
        "the lanes are leased to w1"
    );
    let before = snapshot(s.pool()).await;
    // What the relay does when its breaker is open.
    s.release("w1", &ids(&claimed)).await.unwrap();
    assert_eq!(snapshot(s.pool()).await, before);
    assert_eq!(row_writes(s.pool()).await, 0, "no outbox row was written");
    for key in ["r0", "r1", "r2"] {
        assert_eq!(lane_state(s.pool(), lane_of(key)).await, (0, None));
    }
    let again = s.claim(&claim_req("w2")).await.unwrap();
    assert_eq!(ids(&again), ids(&claimed));
    s.settle("w2", &ids(&again), &[], &[]).await.unwrap();
    assert_eq!(s.status().await.unwrap().published, 6);
    assert_eq!(row_writes(s.pool()).await, 0);
}

/// Two outboxes over one file: two processes, each with its own ledger.
async fn two_processes() -> (tempfile::TempDir, SqliteOutbox, SqliteOutbox) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}?mode=rwc", dir.path().join("outbox.db").display());
    let a = SqliteOutbox::new(SqliteEventStore::connect(&url).await.unwrap());
    a.migrate().await.unwrap();
    let b = SqliteOutbox::new(SqliteEventStore::connect(&url).await.unwrap());
    (dir, a, b)
}

#[tokio::test]
async fn an_expired_lane_is_claimed_again_from_its_cursor_and_the_late_settle_changes_nothing() {
    let (_dir, a, b) = two_processes().await;
    let batch: Vec<_> = (0..4).map(|i| msg("order-1", i)).collect();
    let lane = lane_of("order-1");
    a.enqueue(&batch).await.unwrap();
    let short = req("a-w1", 100, Duration::from_millis(200));
    let first = a.claim(&short).await.unwrap();
    assert_eq!(first.len(), 4);
    assert!(b.claim(&claim_req("b-w1")).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Process b takes the lane over at its cursor: the same rows.
    let second = b.claim(&claim_req("b-w1")).await.unwrap();
    assert_eq!(ids(&second), ids(&first));
    assert_eq!(
        lane_state(a.pool(), lane).await,
        (0, Some("b-w1".to_owned()))
    );
    count_row_writes(a.pool()).await;
    let before = snapshot(a.pool()).await;
    // a's late settle (its ledger still thinks it holds the lane): published,
    // and a failure, all too late.
    let late = a
        .settle(
            "a-w1",
            &ids(&first[..3]),
            &[(
                first[3].id(),
                PublishFailure {
                    error: "late".into(),
                    retry_in: Duration::ZERO,
                    max_attempts: 1,
                    dead_now: true,
                },
            )],
            &[],
        )
        .await
        .unwrap();
    assert_eq!(late, vec![FailureOutcome::Settled]);
    assert_eq!(snapshot(a.pool()).await, before);
    assert_eq!(row_writes(a.pool()).await, 0);
    assert_eq!(
        lane_state(a.pool(), lane).await,
        (0, Some("b-w1".to_owned())),
        "the cursor did not move and b still holds the lane"
    );
    assert_eq!(
        a.get(first[0].id()).await.unwrap().unwrap().status,
        OutboxStatus::Pending
    );
    // b publishes: now they are.
    b.settle("b-w1", &ids(&second), &[], &[]).await.unwrap();
    let last = i64::try_from(second[3].sequence).unwrap();
    assert_eq!(lane_state(a.pool(), lane).await, (last, None));
    assert_eq!(a.status().await.unwrap().published, 4);

    // In one process: a worker's lease runs out, another worker of the same
    // process re-claims; the first one's late settle and release change
    // nothing.
    let s = SqliteOutbox::temporary().await.unwrap();
    let batch: Vec<_> = (0..3).map(|i| msg("order-2", i)).collect();
    s.enqueue(&batch).await.unwrap();
    let first = s
        .claim(&req("w1", 100, Duration::from_millis(200)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = s.claim(&claim_req("w2")).await.unwrap();
    assert_eq!(ids(&second), ids(&first));
    count_row_writes(s.pool()).await;
    s.settle("w1", &ids(&first[..2]), &[], &[first[2].id()])
        .await
        .unwrap();
    s.release("w1", &ids(&first)).await.unwrap();
    assert_eq!(row_writes(s.pool()).await, 0);
    assert_eq!(
        lane_state(s.pool(), lane_of("order-2")).await,
        (0, Some("w2".to_owned()))
    );
    s.settle("w2", &ids(&second), &[], &[]).await.unwrap();
    assert_eq!(s.status().await.unwrap().published, 3);
    assert_eq!(row_writes(s.pool()).await, 0);
}

#[tokio::test]
async fn retention_deletes_lane_rows_confirmed_before_the_cutoff_only() {
    let s = SqliteOutbox::temporary().await.unwrap();
    let (k1, k2) = (msg("k", 1), msg("k", 2));
    s.enqueue(&[k1.clone(), k2.clone()]).await.unwrap();
    let c = s.claim(&claim_req("w")).await.unwrap();
    s.settle("w", &ids(&c), &[], &[]).await.unwrap();
    // A message published without a claim goes on its own row.
    let solo = msg("solo", 1);
    s.enqueue(std::slice::from_ref(&solo)).await.unwrap();
    s.mark_published(&[solo.id]).await.unwrap();
    assert_eq!(lane_column(s.pool(), solo.id).await, None);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Later: k3 confirmed now, k4 still pending, in the same lane.
    let (k3, k4) = (msg("k", 3), msg("k", 4));
    s.enqueue(std::slice::from_ref(&k3)).await.unwrap();
    let c = s.claim(&claim_req("w")).await.unwrap();
    assert_eq!(ids(&c), vec![k3.id]);
    s.settle("w", &[k3.id], &[], &[]).await.unwrap();
    s.enqueue(std::slice::from_ref(&k4)).await.unwrap();
    let k3_at = s.get(k3.id).await.unwrap().unwrap().published_at.unwrap();
    let k1_at = s.get(k1.id).await.unwrap().unwrap().published_at.unwrap();
    assert!(k3_at > k1_at, "each row has its own lane mark's time");

    assert_eq!(
        s.purge_published(Duration::from_secs(3600)).await.unwrap(),
        0
    );
    assert_eq!(
        s.purge_published(Duration::from_millis(150)).await.unwrap(),
        3,
        "k1, k2 and the solo row"
    );
    for gone in [k1.id, k2.id, solo.id] {
        assert!(s.get(gone).await.unwrap().is_none());
    }
    let r3 = s.get(k3.id).await.unwrap().unwrap();
    assert_eq!(
        (r3.status, r3.published_at),
        (OutboxStatus::Published, Some(k3_at))
    );
    assert_eq!(
        s.get(k4.id).await.unwrap().unwrap().status,
        OutboxStatus::Pending
    );
    let marks: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox_lane_log")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(marks, 1, "the old mark went with its rows");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        s.purge_published(Duration::from_millis(1)).await.unwrap(),
        1
    );
    assert!(s.get(k3.id).await.unwrap().is_none());
    assert!(s.get(k4.id).await.unwrap().is_some(), "pending kept");
    let st = s.status().await.unwrap();
    assert_eq!((st.pending, st.published), (1, 0));
}

#[tokio::test]
async fn leased_counts_per_row_claims_and_the_rows_of_leased_lanes() {
    let s = SqliteOutbox::temporary().await.unwrap();
    let (a1, a2, b1, d1) = (msg("a", 1), msg("a", 2), msg("b", 1), msg("d", 1));
    s.enqueue(&[a1.clone(), a2.clone(), b1.clone(), d1.clone()])
        .await
        .unwrap();
    assert_eq!(s.leased().await.unwrap(), 0);
    s.claim(&claim_req("w1")).await.unwrap();
    assert_eq!(s.leased().await.unwrap(), 4);
    // a1 published, a2 given back (lane a settled); b1 fails for a retry
    // in an hour (off its lane, unclaimed); d1 stays leased.
    s.mark_published(&[a1.id]).await.unwrap();
    s.release("w1", &[a2.id]).await.unwrap();
    let later = PublishFailure {
        error: "no".into(),
        retry_in: Duration::from_secs(3600),
        max_attempts: 5,
        dead_now: false,
    };
    s.mark_failed(b1.id, &later).await.unwrap();
    assert_eq!(s.leased().await.unwrap(), 1, "d1");
    // a2 again, and a retry claimed on the per-row path.
    let c = s.claim(&claim_req("w2")).await.unwrap();
    assert_eq!(ids(&c), vec![a2.id]);
    assert_eq!(s.leased().await.unwrap(), 2);
    s.release("w2", &[a2.id]).await.unwrap();
    s.release("w1", &[d1.id]).await.unwrap();
    assert_eq!(s.leased().await.unwrap(), 0);
    let retry_now = PublishFailure {
        retry_in: Duration::ZERO,
        ..later
    };
    let c = s.claim(&claim_req("w3")).await.unwrap();
    assert_eq!(ids(&c), vec![a2.id, d1.id]);
    s.settle("w3", &ids(&c), &[], &[]).await.unwrap();
    sqlx::query("UPDATE outbox SET next_attempt_at = NULL WHERE id = ?")
        .bind(b1.id.to_string())
        .execute(s.pool())
        .await
        .unwrap();
    let c = s.claim(&claim_req("w3")).await.unwrap();
    assert_eq!(ids(&c), vec![b1.id], "the retry, per row");
    assert_eq!(s.leased().await.unwrap(), 1);
    s.mark_failed(b1.id, &retry_now).await.unwrap();
    assert_eq!(s.leased().await.unwrap(), 0);
}
