//! `vextrus outbox` end to end: messages are enqueued and driven into dead
//! letters through the library, then the built binary is run against the
//! same SQLite file or PostgreSQL database, and its effects are checked
//! through the library again.

use std::process::{Command, Output};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use vextrus_core::outbox::{
    ClaimRequest, DeadLetterPolicy, DeadLetters, FailureOutcome, OutboxClaimer, OutboxStatus,
    OutboxStore, PublishFailure,
};
use vextrus_core::transport::{MessageId, OutboundMessage};

const BIN: &str = env!("CARGO_BIN_EXE_vextrus");

fn run(db: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("VEXTRUS_DATABASE_URL", db)
        .output()
        .expect("run vextrus")
}

fn lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs and expects success; returns the JSON lines.
fn ok(db: &str, args: &[&str]) -> Vec<Value> {
    let out = run(db, args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    lines(&out)
}

/// Runs and expects exit `code` with `needle` in stderr and nothing on stdout.
fn fails(db: &str, args: &[&str], code: i32, needle: &str) {
    let out = run(db, args);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
    assert!(
        stderr(&out).contains(needle),
        "{args:?}: {needle:?} not in {}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty(), "{args:?}: printed on failure");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn dead_now(error: &str) -> PublishFailure {
    PublishFailure {
        error: error.to_owned(),
        retry_in: Duration::ZERO,
        max_attempts: 5,
        dead_now: true,
    }
}

/// A dead letter's `dead_since`.
fn since(row: &Value) -> DateTime<Utc> {
    serde_json::from_value(row["dead_since"].clone())
        .unwrap_or_else(|err| panic!("dead_since in {row}: {err}"))
}

/// Bytes that are not UTF-8, and their base64.
const BINARY: &[u8] = &[0xff, 0xfe, 0x00, 0x80];
const BINARY_B64: &str = "//4AgA==";

/// The whole operator story on one outbox whose database `db` names.
/// `rt` is the runtime `outbox`'s pool was created on.
fn scenario<O>(rt: &tokio::runtime::Runtime, db: &str, outbox: &O)
where
    O: OutboxStore + OutboxClaimer + DeadLetters,
{
    let a1 = OutboundMessage::new("orders", "a", b"{\"n\":1}".to_vec());
    let a2 = OutboundMessage::new("orders", "a", b"{\"n\":2}".to_vec());
    let mut b1 = OutboundMessage::new("orders", "b", b"{\"n\":3}".to_vec());
    b1.headers.insert("tenant".into(), "acme".into());
    let c1 = OutboundMessage::new("orders-bin", "c", BINARY.to_vec());
    let d1 = OutboundMessage::new("orders", "d", b"{\"n\":5}".to_vec());
    let all = [a1.clone(), a2.clone(), b1.clone(), c1.clone(), d1.clone()];

    // Empty outbox.
    let status = &ok(db, &["outbox", "status", "--json"])[0];
    assert_eq!(status["pending"], 0);
    assert_eq!(status["dead"], 0);
    assert_eq!(status["oldest_pending_age_ms"], Value::Null);
    assert!(ok(db, &["outbox", "dead-letters"]).is_empty());

    let (c1_due_from, c1_due_to) = rt.block_on(async {
        outbox.enqueue(&all).await.unwrap();
        let batch = outbox
            .claim(&ClaimRequest {
                worker: "w1".into(),
                limit: 10,
                lease: Duration::from_secs(300),
                dead_letter_policy: DeadLetterPolicy::SkipKey,
            })
            .await
            .unwrap();
        let claimed: Vec<MessageId> = batch.iter().map(|m| m.id()).collect();
        for head in [a1.id, b1.id, c1.id, d1.id] {
            assert!(claimed.contains(&head), "head {head} not claimed");
        }
        // a1 published; a2 given back; b1 dead at once; c1 dead after 3
        // attempts; d1 stays leased to w1.
        outbox.mark_published(&[a1.id]).await.unwrap();
        outbox.release("w1", &[a2.id]).await.unwrap();
        assert!(matches!(
            outbox
                .mark_failed(b1.id, &dead_now("broker said no"))
                .await
                .unwrap(),
            FailureOutcome::Dead { attempts: 1 }
        ));
        let retry = |n| PublishFailure {
            error: format!("timeout #{n}"),
            retry_in: Duration::ZERO,
            max_attempts: 3,
            dead_now: false,
        };
        assert!(matches!(
            outbox.mark_failed(c1.id, &retry(1)).await.unwrap(),
            FailureOutcome::Retrying { .. }
        ));
        // The second failure makes the third (fatal) attempt due now.
        let due_from = Utc::now();
        assert!(matches!(
            outbox.mark_failed(c1.id, &retry(2)).await.unwrap(),
            FailureOutcome::Retrying { .. }
        ));
        let due_to = Utc::now();
        assert!(matches!(
            outbox.mark_failed(c1.id, &retry(3)).await.unwrap(),
            FailureOutcome::Dead { attempts: 3 }
        ));
        (due_from, due_to)
    });

    // Status: exact numbers, as JSON and as a table.
    let status = &ok(db, &["outbox", "status", "--json"])[0];
    assert_eq!(status["pending"], 2, "{status}");
    assert_eq!(status["leased"], 1, "{status}");
    assert_eq!(status["dead"], 2, "{status}");
    assert_eq!(status["published"], 1, "{status}");
    let age = status["oldest_pending_age_ms"].as_u64().expect("an age");
    assert!(age < 120_000, "{status}");
    let out = run(db, &["outbox", "status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    for row in [
        "pending (backlog)       2\n",
        "leased (in flight)      1\n",
        "dead letters            2\n",
        "published (retained)    1\n",
    ] {
        assert!(table.contains(row), "{row:?} not in\n{table}");
    }

    // Dead letters: exactly b1 then c1, with their details.
    let listed_from = Utc::now();
    let dead = ok(db, &["outbox", "dead-letters"]);
    let listed_to = Utc::now();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(dead[0]["id"], b1.id.to_string());
    assert_eq!(dead[0]["destination"], "orders");
    assert_eq!(dead[0]["partition_key"], "b");
    assert_eq!(dead[0]["attempts"], 1);
    assert_eq!(dead[0]["last_error"], "broker said no");
    assert_eq!(dead[0]["headers"]["tenant"], "acme");
    assert_eq!(dead[0]["payload"], "{\"n\":3}");
    assert_eq!(dead[0]["payload_encoding"], "utf8");
    // Dead since: b1 died on its first attempt, due when it was created;
    // c1 on its third, due when its second failure was recorded.
    let b1_since = since(&dead[0]);
    assert!(
        (b1_since - b1.created_at).num_microseconds().unwrap().abs() <= 1,
        "b1 dead since {b1_since}, created {}",
        b1.created_at
    );
    let c1_since = since(&dead[1]);
    // SQLite's clock (julianday('now')) is rounded to the millisecond, so the
    // recorded time may lie up to half a millisecond outside the window.
    let resolution = chrono::Duration::milliseconds(1);
    assert!(
        c1_due_from - resolution <= c1_since && c1_since <= c1_due_to + resolution,
        "c1 dead since {c1_since}, not within {c1_due_from}..{c1_due_to}"
    );
    for (row, since) in [(&dead[0], b1_since), (&dead[1], c1_since)] {
        let ms = row["dead_for_ms"].as_i64().expect("dead_for_ms");
        assert!(
            (listed_from - since).num_milliseconds() - 1 <= ms
                && ms <= (listed_to - since).num_milliseconds() + 1,
            "dead for {ms} ms, since {since}, listed {listed_from}..{listed_to}"
        );
        assert!(row["dead_for"].as_str().is_some_and(|s| !s.is_empty()));
        assert_eq!(row["last_attempt_due_at"], row["dead_since"]);
    }
    assert!(b1_since <= c1_since);
    assert_eq!(
        dead[1]["created_at"],
        serde_json::to_value(c1.created_at).unwrap()
    );
    assert_eq!(dead[1]["id"], c1.id.to_string());
    assert_eq!(dead[1]["attempts"], 3);
    assert_eq!(dead[1]["last_error"], "timeout #3");
    assert_eq!(dead[1]["payload"], BINARY_B64);
    assert_eq!(dead[1]["payload_encoding"], "base64");
    let only = ok(
        db,
        &["outbox", "dead-letters", "--destination", "orders-bin"],
    );
    assert_eq!(only.len(), 1);
    assert_eq!(only[0]["id"], c1.id.to_string());
    let first = ok(db, &["outbox", "dead-letters", "--limit", "1"]);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["id"], b1.id.to_string());
    assert!(ok(db, &["outbox", "dead-letters", "--destination", "nowhere"]).is_empty());

    // Replay one: the same id is pending again, attempts reset, error kept.
    let b1_id = b1.id.to_string();
    let replayed = ok(db, &["outbox", "replay", &b1_id]);
    assert_eq!(replayed[0]["replayed"], 1);
    assert_eq!(replayed[0]["id"], b1_id);
    rt.block_on(async {
        let row = outbox.get(b1.id).await.unwrap().expect("b1 still stored");
        assert_eq!(row.id(), b1.id);
        assert_eq!(row.status, OutboxStatus::Pending);
        assert_eq!(row.attempts, 0);
        assert_eq!(row.message.payload, b"{\"n\":3}");
        assert_eq!(row.last_error.as_deref(), Some("broker said no"));
    });
    let status = &ok(db, &["outbox", "status", "--json"])[0];
    assert_eq!(
        (&status["pending"], &status["dead"]),
        (&3.into(), &1.into())
    );

    // Error paths of replay.
    fails(
        db,
        &["outbox", "replay", &b1_id],
        3,
        &format!("message {b1_id} is pending, not a dead letter"),
    );
    let unknown = MessageId::new().to_string();
    fails(
        db,
        &["outbox", "replay", &unknown],
        4,
        &format!("no dead letter with id {unknown}"),
    );
    fails(db, &["outbox", "replay", "nope"], 4, "malformed message id");
    fails(
        db,
        &["outbox", "replay"],
        2,
        "required arguments were not provided",
    );
    fails(
        db,
        &["outbox", "replay", &b1_id, "--all"],
        2,
        "cannot be used",
    );

    // Replay --all: b1 dead again plus c1.
    rt.block_on(async {
        outbox
            .mark_failed(b1.id, &dead_now("still no"))
            .await
            .unwrap();
    });
    assert_eq!(ok(db, &["outbox", "replay", "--all"])[0]["replayed"], 2);
    assert_eq!(ok(db, &["outbox", "replay", "--all"])[0]["replayed"], 0);
    rt.block_on(async {
        for id in [b1.id, c1.id] {
            let row = outbox.get(id).await.unwrap().unwrap();
            assert_eq!((row.status, row.attempts), (OutboxStatus::Pending, 0));
        }
    });
    assert!(ok(db, &["outbox", "dead-letters"]).is_empty());

    // Discard: only a dead letter, and it is gone.
    rt.block_on(async {
        outbox.mark_failed(c1.id, &dead_now("gone")).await.unwrap();
    });
    let c1_id = c1.id.to_string();
    let a1_id = a1.id.to_string();
    fails(
        db,
        &["outbox", "discard", &a1_id],
        3,
        &format!(
            "message {a1_id} is published, not a dead letter: only dead letters can be discarded"
        ),
    );
    fails(
        db,
        &["outbox", "discard", &b1_id],
        3,
        "is pending, not a dead letter",
    );
    fails(
        db,
        &["outbox", "discard", &unknown],
        4,
        "no dead letter with id",
    );
    fails(
        db,
        &["outbox", "discard", "12345"],
        4,
        "malformed message id",
    );
    let discarded = ok(db, &["outbox", "discard", &c1_id]);
    assert_eq!(discarded[0]["discarded"], 1);
    assert_eq!(discarded[0]["id"], c1_id);
    rt.block_on(async {
        assert!(outbox.get(c1.id).await.unwrap().is_none());
        // Nothing else was touched.
        assert_eq!(
            outbox.get(a1.id).await.unwrap().unwrap().status,
            OutboxStatus::Published
        );
        assert_eq!(
            outbox.get(d1.id).await.unwrap().unwrap().status,
            OutboxStatus::Pending
        );
    });
    fails(
        db,
        &["outbox", "discard", &c1_id],
        4,
        "no dead letter with id",
    );
    let status = &ok(db, &["outbox", "status", "--json"])[0];
    assert_eq!(status["pending"], 3, "{status}");
    assert_eq!(status["dead"], 0, "{status}");
    assert_eq!(status["published"], 1, "{status}");
}

#[test]
fn sqlite_outbox_status_dead_letters_replay_discard() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("outbox.db").display());
    // The binary creates and migrates the file on first use.
    let status = &ok(&db, &["outbox", "status", "--json"])[0];
    assert_eq!(status["pending"], 0);
    let rt = rt();
    let outbox = rt.block_on(async {
        let url = format!("{db}?mode=rwc");
        let events = vextrus_sqlite::SqliteEventStore::connect(&url)
            .await
            .unwrap();
        let outbox = vextrus_sqlite::SqliteOutbox::new(events);
        outbox.migrate().await.unwrap();
        outbox
    });
    scenario(&rt, &db, &outbox);
}

fn pg_admin_url() -> String {
    std::env::var("VEXTRUS_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn psql(sql: &str) {
    let out = Command::new("psql")
        .args([pg_admin_url().as_str(), "-v", "ON_ERROR_STOP=1", "-qc", sql])
        .output()
        .expect("psql is required for the PostgreSQL CLI test");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn postgres_outbox_status_dead_letters_replay_discard() {
    let name = format!("vextrus_outbox_cli_{}", uuid::Uuid::now_v7().simple());
    psql(&format!("CREATE DATABASE {name}"));
    let admin = pg_admin_url();
    let base = admin.rsplit_once('/').unwrap().0;
    let db = format!("{base}/{name}");
    ok(&db, &["migrate"]);
    let rt = rt();
    let outbox = rt.block_on(async {
        let store = vextrus_postgres::PgEventStore::connect(&db).await.unwrap();
        vextrus_postgres::PgOutbox::new(store)
    });
    scenario(&rt, &db, &outbox);
    drop(outbox);
    drop(rt);
    psql(&format!("DROP DATABASE {name} WITH (FORCE)"));
}

#[test]
fn unreachable_database_is_exit_5() {
    // Every subcommand connects the same way; the connect timeout makes
    // each try take seconds, so one subcommand stands for all.
    let out = run(
        "postgres://postgres@127.0.0.1:1/none",
        &["outbox", "status"],
    );
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("unavailable"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    // A malformed id is reported before any connection is tried.
    let out = run(
        "postgres://postgres@127.0.0.1:1/none",
        &["outbox", "discard", "x"],
    );
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
}
