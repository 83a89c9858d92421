//! Issue 5's crash test: the orchestrator *process* is killed with SIGKILL at
//! random points, at least 30 times, some of them while sagas are
//! compensating, during a 1,000-order run on PostgreSQL with NATS
//! JetStream, the participants running as separate processes; every saga
//! must end terminal and every business invariant must hold.
//!
//! The system, all built binaries (`vextrus`), on a fresh database and a
//! fresh broker namespace:
//!
//! - four participants, `vextrus serve --role inventory|payment|shipping|
//!   accounting`, never killed;
//! - the orchestrator, `vextrus serve --role orchestrator`, killed with
//!   SIGKILL after a random life (seeded; the seed is printed and can be
//!   given back through `VEXTRUS_CRASH_SEED`) and started again at once;
//! - the placer, `vextrus demo --remote-participants --remote-orchestrator`,
//!   a process too (not the library: it is the command an operator runs,
//!   and its exit code is the invariant check): it places the orders into
//!   the database, waits until every saga is terminal, prints its report
//!   and exits 1 if an invariant fails. If it ends on a database outage
//!   before its report (`unavailable`: the shared server out of
//!   connections, say), it is run again, at most 3 times: a re-run resumes,
//!   placing nothing twice.
//!
//! Default failure injection is on in every process (declined payments,
//! stock out, shipping refusals, participant crashes, delayed replies,
//! invalid orders), so sagas compensate while the orchestrator dies.
//!
//! Right after each kill the test reads `vextrus_sagas`: no process writes
//! a saga's state while no orchestrator runs (the placer only inserts new
//! `running` sagas), so the `compensating` rows it sees are the sagas the
//! dead process left half-compensated. At least one kill must find one, and
//! each of those sagas must end `compensated`. At the end the test reads
//! the table itself: every order has its saga, none non-terminal, none
//! `compensation_failed` (the injected faults cannot cause it: a
//! compensation is never refused by a participant, and a crashed or
//! delayed delivery is retried within the 20-attempt compensation budget).
//!
//! Needs PostgreSQL (`VEXTRUS_TEST_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`, used to create and drop
//! the test database) and NATS JetStream (`VEXTRUS_TEST_NATS_URL`, default
//! `nats://127.0.0.1:4222`). `VEXTRUS_CRASH_ORDERS` and `VEXTRUS_CRASH_KILLS`
//! change the size (defaults 1,000 and 30).

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sqlx::{PgPool, Row};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_vextrus");

/// Each process's pool size: six processes (and the test's own pool) stay
/// well under PostgreSQL's default `max_connections` of 100.
const POOL: &str = "4";

fn pg_admin_url() -> String {
    std::env::var("VEXTRUS_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn nats_url() -> String {
    std::env::var("VEXTRUS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")),
        Err(_) => default,
    }
}

fn psql(sql: &str) {
    let out = Command::new("psql")
        .args([pg_admin_url().as_str(), "-v", "ON_ERROR_STOP=1", "-qc", sql])
        .output()
        .expect("psql is required for the PostgreSQL crash test");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh database, dropped (with its connections) when this goes away.
struct Database {
    name: String,
    url: String,
}

impl Database {
    fn create() -> Self {
        let name = format!("vextrus_saga_crash_{}", Uuid::now_v7().simple());
        psql(&format!("CREATE DATABASE {name}"));
        let admin = pg_admin_url();
        let base = admin.rsplit_once('/').expect("a database URL").0;
        let url = format!("{base}/{name}");
        Self { name, url }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                pg_admin_url().as_str(),
                "-qc",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .output();
    }
}

/// The child processes of the test; every one still running is killed
/// (SIGKILL) and reaped when this goes away, panics included.
struct Procs {
    logs: PathBuf,
    children: Vec<(String, Child)>,
    spawned: usize,
    /// Each name's latest stdout and stderr log.
    last_logs: Vec<(String, PathBuf, PathBuf)>,
}

impl Procs {
    fn new(logs: &Path) -> Self {
        Self {
            logs: logs.to_path_buf(),
            children: Vec::new(),
            spawned: 0,
            last_logs: Vec::new(),
        }
    }

    /// Starts `vextrus args...` as `name`, its stdout and stderr in the log
    /// directory (`{name}-{n}.out` / `.err`).
    fn spawn(&mut self, name: &str, args: &[String]) {
        self.spawned += 1;
        let out = self.logs.join(format!("{name}-{}.out", self.spawned));
        let err = self.logs.join(format!("{name}-{}.err", self.spawned));
        let child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&out).expect("stdout log"))
            .stderr(File::create(&err).expect("stderr log"))
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        self.children.push((name.to_owned(), child));
        self.last_logs.retain(|(n, _, _)| n != name);
        self.last_logs.push((name.to_owned(), out, err));
    }

    /// What the latest `name` printed: (stdout, stderr).
    fn output(&self, name: &str) -> (String, String) {
        let (_, out, err) = self
            .last_logs
            .iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("no process {name}"));
        (
            std::fs::read_to_string(out).unwrap_or_default(),
            std::fs::read_to_string(err).unwrap_or_default(),
        )
    }

    /// Drops `name`, which has exited, from the processes to kill.
    fn forget(&mut self, name: &str) {
        self.children.retain(|(n, _)| n != name);
    }

    fn find(&mut self, name: &str) -> &mut Child {
        self.children
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c)
            .unwrap_or_else(|| panic!("no process {name}"))
    }

    /// SIGKILLs `name` and reaps it.
    fn kill(&mut self, name: &str) {
        let i = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no process {name}"));
        let (_, mut child) = self.children.remove(i);
        // `Child::kill` is SIGKILL on Unix.
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    /// `name`'s exit status if it has exited.
    fn exited(&mut self, name: &str) -> Option<ExitStatus> {
        self.find(name).try_wait().expect("try_wait")
    }

    /// Panics if a process other than `except` has exited.
    fn assert_alive(&mut self, except: &str) {
        for (name, child) in &mut self.children {
            if name != except
                && let Some(status) = child.try_wait().expect("try_wait")
            {
                panic!("{name} exited unexpectedly: {status}");
            }
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// SplitMix64: the kill schedule, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `low..high` milliseconds.
    fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(low + self.next() % (high - low).max(1))
    }
}

/// The saga table as one kill left it.
struct Census {
    total: i64,
    non_terminal: i64,
    compensating: Vec<Uuid>,
}

async fn census(pool: &PgPool) -> Census {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('public.vextrus_sagas') IS NOT NULL")
        .fetch_one(pool)
        .await
        .expect("catalog");
    if !exists {
        return Census {
            total: 0,
            non_terminal: 0,
            compensating: Vec::new(),
        };
    }
    let row = sqlx::query(
        "SELECT count(*),
                count(*) FILTER (WHERE state NOT IN ('completed', 'compensated', 'failed'))
           FROM vextrus_sagas",
    )
    .fetch_one(pool)
    .await
    .expect("count sagas");
    let compensating =
        sqlx::query_scalar("SELECT id FROM vextrus_sagas WHERE state = 'compensating'")
            .fetch_all(pool)
            .await
            .expect("compensating sagas");
    Census {
        total: row.get(0),
        non_terminal: row.get(1),
        compensating,
    }
}

/// The last lines of every log whose name starts with `prefix`.
fn tails(logs: &Path, prefix: &str) -> String {
    let mut names: Vec<PathBuf> = std::fs::read_dir(logs)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    names.sort();
    let mut out = String::new();
    for path in names {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if !name.starts_with(prefix) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.trim().is_empty() {
            continue;
        }
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(40);
        out.push_str(&format!("--- {name}\n{}\n", lines[from..].join("\n")));
    }
    out
}

#[test]
fn orchestrator_sigkilled_at_random_points_loses_no_saga() {
    let seed = std::env::var("VEXTRUS_CRASH_SEED")
        .ok()
        .map(|v| v.parse::<u64>().expect("VEXTRUS_CRASH_SEED is a number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    let orders = env_number("VEXTRUS_CRASH_ORDERS", 1_000);
    let min_kills = env_number("VEXTRUS_CRASH_KILLS", 30) as usize;
    // The demo's seed (orders and injected faults) follows from ours.
    let demo_seed = seed % 1_000_000;
    println!(
        "saga crash test: seed {seed} (VEXTRUS_CRASH_SEED), {orders} orders, demo seed {demo_seed}"
    );

    let db = Database::create();
    let namespace = format!("crash-{}", Uuid::now_v7().simple());
    let logs = tempfile::tempdir().expect("log dir");
    let common: Vec<String> = [
        "--database-url",
        db.url.as_str(),
        "--broker",
        nats_url().as_str(),
        "--namespace",
        namespace.as_str(),
        "--seed",
        demo_seed.to_string().as_str(),
        "--max-connections",
        POOL,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let with = |head: &[&str]| -> Vec<String> {
        head.iter()
            .map(|s| (*s).to_owned())
            .chain(common.iter().cloned())
            .collect()
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let pool = rt
        .block_on(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(&db.url),
        )
        .expect("connect to the test database");

    let mut procs = Procs::new(logs.path());
    for role in ["inventory", "payment", "shipping", "accounting"] {
        procs.spawn(role, &with(&["serve", "--role", role]));
    }
    procs.spawn("orchestrator", &with(&["serve", "--role", "orchestrator"]));
    let deadline_secs = 600u64;
    let placer_args = with(&[
        "demo",
        "--remote-participants",
        "--remote-orchestrator",
        "--orders",
        &orders.to_string(),
        "--deadline-secs",
        &deadline_secs.to_string(),
        "--quiet",
    ]);
    procs.spawn("placer", &placer_args);

    let started = Instant::now();
    let mut rng = Rng(seed);
    let mut kills = 0usize;
    // Kills that found sagas still to finish (or orders still to place).
    let mut kills_in_flight = 0usize;
    let mut kills_compensating = 0usize;
    let mut compensating_at_kill: BTreeSet<Uuid> = BTreeSet::new();
    // The placer is a client of the database like any other: when it ends
    // on an outage (the shared server refusing connections, say) before
    // printing a report, it is run again, and the run resumes (orders and
    // sagas are keyed by the seed: nothing is placed twice).
    let mut placer_restarts = 0;
    let placer_status = loop {
        if let Some(status) = procs.exited("placer") {
            let (out, err) = procs.output("placer");
            if !status.success()
                && out.trim().is_empty()
                && err.contains("unavailable")
                && placer_restarts < 3
            {
                placer_restarts += 1;
                println!(
                    "placer ended on an outage ({status}), run again: {}",
                    err.trim()
                );
                procs.forget("placer");
                procs.spawn("placer", &placer_args);
                continue;
            }
            break status;
        }
        procs.assert_alive("placer");
        if kills_in_flight >= min_kills {
            // Enough kills: let the last orchestrator finish the run.
            std::thread::sleep(Duration::from_millis(200));
            assert!(
                started.elapsed() < Duration::from_secs(deadline_secs + 60),
                "the placer did not exit within its deadline"
            );
            continue;
        }
        // A random life, then SIGKILL; nothing runs the sagas until the
        // restart after a random gap.
        std::thread::sleep(rng.millis(300, 4_000));
        if procs.exited("placer").is_some() {
            // Handled at the top of the loop.
            continue;
        }
        procs.kill("orchestrator");
        kills += 1;
        let seen = rt.block_on(census(&pool));
        // A kill before the first saga exists (the placer still stocking)
        // or after the last one ended does not count.
        if seen.non_terminal > 0 || (seen.total > 0 && seen.total < orders as i64) {
            kills_in_flight += 1;
        }
        if !seen.compensating.is_empty() {
            kills_compensating += 1;
            compensating_at_kill.extend(seen.compensating.iter().copied());
        }
        println!(
            "kill {kills} at {:.1} s: {} sagas, {} not terminal, {} compensating",
            started.elapsed().as_secs_f64(),
            seen.total,
            seen.non_terminal,
            seen.compensating.len()
        );
        std::thread::sleep(rng.millis(0, 500));
        procs.spawn("orchestrator", &with(&["serve", "--role", "orchestrator"]));
    };
    let elapsed = started.elapsed();
    let placer_out = tails(logs.path(), "placer");
    println!("{placer_out}");
    println!(
        "{kills} kills ({kills_in_flight} with sagas in flight), {kills_compensating} while sagas \
         were compensating ({} sagas), {placer_restarts} placer restarts, run {:.1} s",
        compensating_at_kill.len(),
        elapsed.as_secs_f64()
    );
    assert!(
        placer_status.success(),
        "the placer failed ({placer_status}): every saga terminal and every invariant \
         holding is what it checks; every non-empty log:\n{}",
        tails(logs.path(), "")
    );
    assert!(
        kills_in_flight >= min_kills,
        "only {kills_in_flight} kills landed while sagas were in flight (need {min_kills}): \
         the run finished too fast for the kill schedule"
    );
    assert!(
        kills_compensating >= 1,
        "no kill landed while a saga was compensating"
    );

    // The saga table, read directly.
    let (states, placed_orders): (Vec<(String, i64)>, i64) = rt.block_on(async {
        let states = sqlx::query_as(
            "SELECT state, count(*) FROM vextrus_sagas GROUP BY state ORDER BY state",
        )
        .fetch_all(&pool)
        .await
        .expect("saga states");
        let orders: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT stream_id) FROM vextrus_events WHERE stream_id LIKE 'order-%'",
        )
        .fetch_one(&pool)
        .await
        .expect("orders");
        (states, orders)
    });
    println!("saga states: {states:?}; {placed_orders} order streams");
    let count = |s: &str| {
        states
            .iter()
            .find(|(state, _)| state == s)
            .map_or(0, |(_, n)| *n)
    };
    let total: i64 = states.iter().map(|(_, n)| n).sum();
    assert_eq!(total, orders as i64, "one saga per order: {states:?}");
    assert_eq!(placed_orders, orders as i64, "every order placed once");
    for state in ["running", "compensating", "compensation_failed"] {
        assert_eq!(count(state), 0, "sagas left {state}: {states:?}");
    }
    assert!(
        count("compensated") >= 1 && count("completed") >= 1,
        "faults on: some sagas complete, some compensate: {states:?}"
    );
    let ended: Vec<(Uuid, String)> = rt.block_on(async {
        sqlx::query_as("SELECT id, state FROM vextrus_sagas WHERE id = ANY($1)")
            .bind(compensating_at_kill.iter().copied().collect::<Vec<_>>())
            .fetch_all(&pool)
            .await
            .expect("compensated sagas")
    });
    assert_eq!(ended.len(), compensating_at_kill.len());
    for (id, state) in &ended {
        assert_eq!(
            state, "compensated",
            "saga {id} was compensating at a kill and ended {state}"
        );
    }
    // Orchestrator processes that wrote history: proof the restarts resumed.
    let writers: i64 = rt.block_on(async {
        sqlx::query_scalar(
            "SELECT count(DISTINCT split_part(worker, '-', 3)) FROM vextrus_saga_history
              WHERE worker LIKE 'o2c-worker-%'",
        )
        .fetch_one(&pool)
        .await
        .expect("history writers")
    });
    println!(
        "seed {seed}: {kills} kills, {kills_compensating} with sagas compensating, {writers} \
         orchestrator processes wrote saga history, {:.1} s",
        elapsed.as_secs_f64()
    );
    assert!(
        writers >= 2,
        "the restarted orchestrators resumed nothing ({writers} wrote history)"
    );
    drop(procs);
    drop(pool);
    drop(rt);
    drop(db);
}
