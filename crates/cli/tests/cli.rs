//! The `vextrus` binary end to end, against a real SQLite file and the real
//! PostgreSQL server: output, exit codes, and that failed commands write nothing.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

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

fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite:{}", dir.path().join("cli.db").display())
}

const PLACED: &str =
    r#"{"event_type":"order.placed","payload":{"total":{"amount":"1250.00","currency":"BDT"}}}"#;

#[test]
fn help_and_version() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["migrate", "events"] {
        assert!(help.contains(cmd), "{help}");
    }
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("vextrus {}", env!("CARGO_PKG_VERSION"))
    );
    let out = Command::new(BIN).arg("no-such-command").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn sqlite_append_read_and_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite_url(&dir);

    let out = run(
        &db,
        &[
            "events",
            "append",
            "order-1",
            PLACED,
            "--expected-version",
            "no-stream",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let result = &lines(&out)[0];
    assert_eq!(result["first_version"], 1);
    assert_eq!(result["last_version"], 1);

    // Two events from stdin, at the exact version.
    let mut child = Command::new(BIN)
        .args(["events", "append", "order-1", "--expected-version", "1"])
        .env("VEXTRUS_DATABASE_URL", &db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            br#"[{"event_type":"order.paid","payload":{"n":2},"metadata":{"tenant":"acme"}},
                 {"event_type":"order.shipped","payload":{"n":3},"schema_version":2}]"#,
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(lines(&out)[0]["last_version"], 3);

    // A stale expected version is a conflict (exit 3) naming both versions, and writes nothing.
    let out = run(
        &db,
        &[
            "events",
            "append",
            "order-1",
            PLACED,
            "--expected-version",
            "1",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("expected exact version 1, actual 3"),
        "{}",
        stderr(&out)
    );
    let out = run(
        &db,
        &[
            "events",
            "append",
            "order-1",
            PLACED,
            "--expected-version",
            "no-stream",
        ],
    );
    assert_eq!(out.status.code(), Some(3));

    // Bad input (exit 4) writes nothing either.
    for args in [
        vec!["events", "append", "order 1", PLACED],
        vec!["events", "append", "order-1", "{not json"],
        vec![
            "events",
            "append",
            "order-1",
            r#"{"event_type":"x","payload":{},"metadata":{"event_id":"nope"}}"#,
        ],
        vec![
            "events",
            "append",
            "order-1",
            r#"[{"event_type":"ok","payload":{}},{"event_type":"","payload":{}}]"#,
        ],
    ] {
        let out = run(&db, &args);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).starts_with("error: "), "{}", stderr(&out));
    }

    let out = run(&db, &["events", "read", "order-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let events = lines(&out);
    let versions: Vec<u64> = events
        .iter()
        .map(|e| e["stream_version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2, 3]);
    assert_eq!(events[0]["payload"]["total"]["amount"], "1250.00");
    assert_eq!(events[1]["metadata"]["tenant"], "acme");
    assert_eq!(events[2]["schema_version"], 2);
    assert_eq!(
        events[1]["metadata"]["correlation_id"],
        events[2]["metadata"]["correlation_id"]
    );

    let out = run(
        &db,
        &["events", "read", "order-1", "--backwards", "--limit", "2"],
    );
    let versions: Vec<u64> = lines(&out)
        .iter()
        .map(|e| e["stream_version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [3, 2]);
    let out = run(
        &db,
        &["events", "read", "order-1", "--from", "2", "--limit", "1"],
    );
    assert_eq!(lines(&out)[0]["stream_version"], 2);
    // A stream that does not exist reads as empty.
    let out = run(&db, &["events", "read", "order-404"]);
    assert!(out.status.success());
    assert!(lines(&out).is_empty());
}

#[test]
fn sqlite_tail_catches_up_then_follows_live() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite_url(&dir);
    assert!(
        run(&db, &["events", "append", "order-1", PLACED])
            .status
            .success()
    );
    assert!(
        run(
            &db,
            &[
                "events",
                "append",
                "invoice-1",
                r#"{"event_type":"invoice.posted","payload":{}}"#
            ]
        )
        .status
        .success()
    );

    let out = run(&db, &["events", "tail", "--no-follow"]);
    assert_eq!(lines(&out).len(), 2);
    let out = run(
        &db,
        &["events", "tail", "--no-follow", "--category", "invoice"],
    );
    let only = lines(&out);
    assert_eq!(only.len(), 1);
    assert_eq!(only[0]["stream_id"], "invoice-1");
    let out = run(
        &db,
        &[
            "events",
            "tail",
            "--no-follow",
            "--event-type",
            "order.placed",
        ],
    );
    assert_eq!(lines(&out).len(), 1);
    // From a position: only what comes after it.
    let first = lines(&run(
        &db,
        &["events", "tail", "--no-follow", "--limit", "1"],
    ))[0]["position"]
        .clone();
    let from = format!("{}:{}", first["commit"], first["position"]);
    let out = run(&db, &["events", "tail", "--no-follow", "--from", &from]);
    assert_eq!(lines(&out).len(), 1);

    // Follow: the two stored events, then one appended while tail runs.
    let mut tail = Command::new(BIN)
        .args(["events", "tail", "--limit", "3", "--poll-ms", "50"])
        .env("VEXTRUS_DATABASE_URL", &db)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(tail.stdout.take().unwrap());
    let mut line = String::new();
    for _ in 0..2 {
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains("stream_id"), "{line:?}");
    }
    assert!(
        run(&db, &["events", "append", "order-2", PLACED])
            .status
            .success()
    );
    line.clear();
    reader.read_line(&mut line).unwrap();
    let live: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(live["stream_id"], "order-2");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = tail.try_wait().unwrap() {
            assert!(status.success());
            break;
        }
        assert!(Instant::now() < deadline, "tail did not stop after --limit");
        std::thread::sleep(Duration::from_millis(20));
    }
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
fn postgres_migrate_twice_append_read() {
    let name = format!("vextrus_cli_{}", uuid::Uuid::now_v7().simple());
    psql(&format!("CREATE DATABASE {name}"));
    let admin = pg_admin_url();
    let base = admin.rsplit_once('/').unwrap().0;
    let db = format!("{base}/{name}");

    for _ in 0..2 {
        let out = run(&db, &["migrate"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(!lines(&out).is_empty());
    }
    let out = run(
        &db,
        &[
            "events",
            "append",
            "order-9",
            PLACED,
            "--expected-version",
            "no-stream",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(
        &db,
        &[
            "events",
            "append",
            "order-9",
            PLACED,
            "--expected-version",
            "no-stream",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let out = run(&db, &["events", "read", "order-9"]);
    let events = lines(&out);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["event_type"], "order.placed");
    let out = run(&db, &["events", "tail", "--no-follow"]);
    assert_eq!(lines(&out).len(), 1);
    psql(&format!("DROP DATABASE {name} WITH (FORCE)"));
}

#[test]
fn unreachable_database_is_exit_5_and_bad_url_exit_4() {
    let out = run(
        "postgres://postgres@127.0.0.1:1/none",
        &["events", "read", "order-1"],
    );
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("unavailable"), "{}", stderr(&out));
    let out = run("mysql://x", &["events", "read", "order-1"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
}

#[test]
fn demo_runs_order_to_cash_and_checks_invariants() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "demo",
            "--orders",
            "60",
            "--seed",
            "7",
            "--quiet",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("orders: 60 (seed 7)"), "{report}");
    assert!(report.contains("0 not terminal"), "{report}");
    assert!(report.contains("all hold"), "{report}");
    // The report says how long the run took.
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("elapsed: ") && l.contains(" s, throughput: ")),
        "{report}"
    );
    // Per-step time comes from the saga step histogram: every step of a
    // completed order-to-cash saga was timed at least once.
    assert!(report.contains("where the time went"), "{report}");
    for step in ["validate_order", "reserve_inventory", "capture_payment"] {
        assert!(
            report
                .lines()
                .any(|l| l.contains(step) && l.contains(" ok ")),
            "{step} missing from the step table: {report}"
        );
    }
    // Bad flags are bad input, not a crash.
    let out = Command::new(BIN)
        .args(["demo", "--decline-rate", "2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    // A database that cannot be reached is an outage (5), not a failure (1).
    let out = Command::new(BIN)
        .args([
            "demo",
            "--orders",
            "1",
            "--quiet",
            "--database-url",
            "postgres://postgres@127.0.0.1:1/none",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
}
