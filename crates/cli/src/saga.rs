//! `vextrus saga list | show | retry | abort`: the operator's view of the
//! saga orchestrator.
//!
//! `retry` and `abort` go through [`Orchestrator::retry`] and
//! [`Orchestrator::abort`]: the saga is claimed like a worker claims it,
//! its next compensations start at once (a local compensation runs in this
//! process, a remote one is queued in the outbox in the same commit) and the
//! workers carry on from there. They need the saga's definition: this binary
//! registers the order-to-cash saga (`order_to_cash` v1), whose local steps
//! (`validate_order`'s compensation, which cancels the order, and
//! `complete_order`) act on the Sales event store.
//!
//! # Where Sales' events are
//!
//! `--sales-database-url` (or `VEXTRUS_SALES_DATABASE_URL`) says where. When
//! it is not given:
//!
//! - a SQLite saga store in a file named
//!   [`ORCHESTRATOR_DB`] with a `sales.db` beside it (the layout `vextrus
//!   demo --data-dir DIR` and `vextrus serve` keep) uses that `sales.db`;
//! - any other saga store uses its own database (PostgreSQL deployments
//!   keep the saga store and Sales in one database).
//!
//! A SQLite sales database must already exist: a missing file is bad input
//! (exit 4), never created empty. Before `retry` or `abort` changes
//! anything, the saga's order must be found in the chosen Sales store:
//! compensating it against a store that does not know the order would
//! record a failure (or, for `complete_order`, act on the wrong store), so
//! that too is bad input, naming the database that was tried. `list` and
//! `show` do not open Sales. The result line of `retry` and `abort` says
//! which Sales database was used (`sales_database`).
//!
//! Exit codes: an unknown or malformed saga id, or an operation that does
//! not apply in the saga's state, is bad input (4). A saga a worker holds a
//! live lease on is **unavailable (5)**: the worker is driving it right now,
//! and the same command succeeds once the lease is let go or expires.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use sqlx::sqlite::SqliteConnectOptions;
use vextrus_core::saga::{
    HistoryEntry, Orchestrator, OrchestratorConfig, SagaError, SagaFilter, SagaId, SagaInstance,
    SagaRegistry, SagaState, SagaStore,
};
use vextrus_core::{EventAppender, EventReader, SnapshotStore};
use vextrus_kernel::AggregateId;
use vextrus_order_to_cash::FaultInjector;
use vextrus_order_to_cash::demo::ORCHESTRATOR_DB;
use vextrus_order_to_cash::saga::{REPLIES, SAGA_TYPE, StepPolicy, definition};
use vextrus_order_to_cash::sales::Sales;
use vextrus_postgres::{PgOutbox, PgSagaStore};
use vextrus_sqlite::SqliteOutbox;
use vextrus_sqlite::saga::SqliteSagaStore;

use crate::backend::{Store, redact};
use crate::exit::BadInput;
use crate::outbox::human_duration;

/// `vextrus saga ...`
#[derive(Debug, Args)]
pub(crate) struct SagaArgs {
    /// `sqlite:PATH` or `postgres://USER@HOST:PORT/DB`.
    #[arg(long, global = true, env = "VEXTRUS_DATABASE_URL", default_value = crate::DEFAULT_DATABASE_URL)]
    database_url: String,
    /// Where participants are asked to reply to the commands `retry` and
    /// `abort` queue (the orchestrator's reply destination).
    #[arg(long, global = true, default_value = REPLIES)]
    reply_to: String,
    /// Where Sales' events are (`sqlite:PATH` or `postgres://...`), for the
    /// order-to-cash saga's local steps that `retry` and `abort` may run.
    /// Default: `sales.db` beside a SQLite `--database-url` file named
    /// `orchestrator.db` (the `vextrus demo --data-dir` layout), else the
    /// `--database-url` database itself. A SQLite file must already exist.
    #[arg(long, global = true, env = "VEXTRUS_SALES_DATABASE_URL")]
    sales_database_url: Option<String>,
    #[command(subcommand)]
    command: SagaCommand,
}

#[derive(Debug, Subcommand)]
enum SagaCommand {
    /// Print sagas as JSON lines, oldest first: id, type, version, state,
    /// step, age, last error, lease.
    List {
        /// Only sagas of this type (e.g. `order_to_cash`).
        #[arg(long = "type")]
        saga_type: Option<String>,
        /// Only sagas in this state (repeatable): running, compensating,
        /// completed, compensated, compensation_failed, failed.
        #[arg(long = "state", value_parser = parse_state)]
        states: Vec<SagaState>,
        /// Only sagas created at least this long ago (`90s`, `10m`, `2h`, `1d`).
        #[arg(long, value_parser = parse_age)]
        older_than: Option<Duration>,
        /// Print at most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Print a saga's timeline: every transition with its time, step, kind
    /// and error.
    Show {
        /// The saga's id (a UUID).
        id: String,
        /// The timeline as JSON lines (one per entry) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Resume a saga in compensation_failed: its remaining compensations get
    /// a fresh retry budget and start now; workers carry on.
    Retry {
        /// The saga's id (a UUID).
        id: String,
    },
    /// Compensate a saga now: a running saga stops and undoes its completed
    /// steps; a compensation_failed one resumes compensating.
    Abort {
        /// The saga's id (a UUID).
        id: String,
        /// Why (recorded in the timeline).
        #[arg(long, default_value = "aborted by an operator")]
        reason: String,
    },
}

fn parse_state(s: &str) -> Result<SagaState, String> {
    s.parse()
}

/// Parses `250ms`, `90s`, `10m`, `2h`, `1d` (a bare number is seconds).
fn parse_age(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("expected a duration such as 90s, 10m, 2h or 1d, got {s:?}"))?;
    let unit_secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "" | "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {s:?}: use ms, s, m, h or d"
            ));
        }
    };
    n.checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("duration {s:?} is too long"))
}

/// Parses a saga id given on the command line.
fn parse_id(s: &str) -> Result<SagaId> {
    s.trim().parse::<SagaId>().map_err(|_| {
        BadInput(format!(
            "malformed saga id {s:?}: expected a UUID such as 01936f0e-7c1a-7000-8000-000000000000"
        ))
        .into()
    })
}

/// The saga id a subcommand names, parsed before any connection is made.
fn command_id(command: &SagaCommand) -> Result<Option<SagaId>> {
    match command {
        SagaCommand::Show { id, .. }
        | SagaCommand::Retry { id }
        | SagaCommand::Abort { id, .. } => parse_id(id).map(Some),
        SagaCommand::List { .. } => Ok(None),
    }
}

/// The file beside a demo's [`ORCHESTRATOR_DB`] that holds Sales' events
/// (the demo opens it as `open_sqlite_events(dir, "sales")`).
const DEMO_SALES_DB: &str = "sales.db";

/// Where Sales' events are, and why (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
enum SalesSource {
    /// The saga store's own database.
    SagaStore,
    /// `--sales-database-url`.
    Given(String),
    /// `sales.db` beside the saga store's `orchestrator.db`.
    DemoLayout(PathBuf),
}

impl SalesSource {
    /// Picks where Sales' events are for the saga store at `database_url`,
    /// given `--sales-database-url` (`given`).
    fn resolve(database_url: &str, given: Option<&str>) -> Self {
        match given {
            Some(url) if url != database_url => return SalesSource::Given(url.to_owned()),
            Some(_) => return SalesSource::SagaStore,
            None => {}
        }
        match sqlite_file(database_url) {
            Some(path)
                if path.file_name() == Some(ORCHESTRATOR_DB.as_ref())
                    && path.with_file_name(DEMO_SALES_DB).is_file() =>
            {
                SalesSource::DemoLayout(path.with_file_name(DEMO_SALES_DB))
            }
            _ => SalesSource::SagaStore,
        }
    }

    /// The database as an operator reads it (passwords redacted).
    fn describe(&self, database_url: &str) -> String {
        match self {
            SalesSource::SagaStore => redact(database_url),
            SalesSource::Given(url) => redact(url),
            SalesSource::DemoLayout(path) => format!("sqlite:{}", path.display()),
        }
    }

    /// Why this database was chosen, for messages.
    fn why(&self) -> &'static str {
        match self {
            SalesSource::SagaStore => "the saga store's own database",
            SalesSource::Given(_) => "--sales-database-url",
            SalesSource::DemoLayout(_) => "the sales.db beside orchestrator.db",
        }
    }

    /// Opens Sales' event store; `saga_db` is the saga store's, reused when
    /// Sales shares its database. A SQLite file that does not exist is bad
    /// input: it is never created.
    async fn open(&self, saga_db: &Store, database_url: &str) -> Result<Store> {
        let url = match self {
            SalesSource::SagaStore => return Ok(saga_db.clone()),
            SalesSource::Given(url) => url.clone(),
            SalesSource::DemoLayout(path) => format!("sqlite:{}", path.display()),
        };
        let described = self.describe(database_url);
        if url.starts_with("sqlite:") {
            let path = sqlite_file(&url).ok_or_else(|| {
                BadInput(format!(
                    "invalid SQLite URL for the sales database: {url:?}"
                ))
            })?;
            if !path.is_file() {
                return Err(BadInput(format!(
                    "the sales database {described} ({}) does not exist: point \
                     --sales-database-url at the database holding Sales' events",
                    self.why()
                ))
                .into());
            }
            // Read-write, never create (the file was just seen to exist).
            let url = if url.contains("mode=") {
                url
            } else if url.contains('?') {
                format!("{url}&mode=rw")
            } else {
                format!("{url}?mode=rw")
            };
            return Store::connect(&url, true)
                .await
                .with_context(|| format!("opening the sales database {described}"));
        }
        Store::connect(&url, false).await.map_err(|e| {
            if missing_pg_database(&e) {
                BadInput(format!(
                    "the sales database {described} ({}) does not exist: point \
                     --sales-database-url at the database holding Sales' events",
                    self.why()
                ))
                .into()
            } else {
                e.context(format!("opening the sales database {described}"))
            }
        })
    }
}

/// The file a `sqlite:` URL names (`None` for another scheme or a malformed
/// URL).
fn sqlite_file(url: &str) -> Option<PathBuf> {
    if !url.starts_with("sqlite:") {
        return None;
    }
    let options = SqliteConnectOptions::from_str(url).ok()?;
    Some(Path::new(options.get_filename()).to_path_buf())
}

/// Whether connecting failed because the PostgreSQL database does not exist
/// (SQLSTATE 3D000).
fn missing_pg_database(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::Database(db)) if db.code().as_deref() == Some("3D000")
        )
    })
}

/// Runs a `saga` subcommand.
pub(crate) async fn run(args: SagaArgs) -> Result<()> {
    // Validate what needs no database first.
    let id = command_id(&args.command)?;
    let store = Store::connect(&args.database_url, true).await?;
    // Only `retry` and `abort` may run a local step; `list` and `show` never
    // open Sales (the saga store's own database stands in, unused).
    let source = match args.command {
        SagaCommand::Retry { .. } | SagaCommand::Abort { .. } => {
            SalesSource::resolve(&args.database_url, args.sales_database_url.as_deref())
        }
        SagaCommand::List { .. } | SagaCommand::Show { .. } => SalesSource::SagaStore,
    };
    let sales_db = source.open(&store, &args.database_url).await?;
    let sales = SalesDb {
        described: source.describe(&args.database_url),
        why: source.why(),
    };
    match store {
        Store::Postgres(events) => {
            let saga = PgSagaStore::new(PgOutbox::new(events), args.reply_to);
            crate::backend::with_store!(sales_db, e => run_on(saga, e.clone(), &sales, args.command, id).await)
        }
        Store::Sqlite(events) => {
            let saga = SqliteSagaStore::new(SqliteOutbox::new(events), args.reply_to);
            crate::backend::with_store!(sales_db, e => run_on(saga, e.clone(), &sales, args.command, id).await)
        }
    }
}

/// The Sales database a command uses, as messages name it.
struct SalesDb {
    /// Its URL (password redacted).
    described: String,
    /// Why it was chosen.
    why: &'static str,
}

/// Refuses to `operation` the saga `id` when it is an order-to-cash saga
/// whose order the Sales store `sales` does not know: its local steps would
/// act on the wrong store.
async fn check_order_in_sales<S, E>(
    store: &S,
    sales: &Sales<E>,
    db: &SalesDb,
    id: SagaId,
    operation: &str,
) -> Result<()>
where
    S: SagaStore,
    E: EventAppender + EventReader + SnapshotStore + Send + Sync + 'static,
{
    // An unknown saga, or one of another type, is the orchestrator's to report.
    let Some(saga) = store.load(id).await? else {
        return Ok(());
    };
    if saga.saga_type != SAGA_TYPE {
        return Ok(());
    }
    let order = saga
        .data
        .get("order_id")
        .and_then(Value::as_str)
        .and_then(|o| AggregateId::new(o).ok())
        .with_context(|| format!("saga {id} has no valid order_id in its data"))?;
    let found = sales.load(&order).await.with_context(|| {
        format!(
            "reading order {order} from the sales database {}",
            db.described
        )
    })?;
    if found.is_none() {
        return Err(BadInput(format!(
            "cannot {operation} saga {id}: its order {order} is not in the sales database {} \
             ({}); its local steps would act on the wrong store. Point --sales-database-url \
             at the database holding Sales' events",
            db.described, db.why
        ))
        .into());
    }
    Ok(())
}

/// Runs a `saga` subcommand on `store`, with the Sales event store `events`
/// (for the order-to-cash saga's local steps) in the database `sales`.
async fn run_on<S, E>(
    store: S,
    events: E,
    sales: &SalesDb,
    command: SagaCommand,
    id: Option<SagaId>,
) -> Result<()>
where
    S: SagaStore + Clone + 'static,
    E: EventAppender + EventReader + SnapshotStore + Send + Sync + 'static,
{
    let sales_store = Arc::new(Sales::new(events));
    let registry = SagaRegistry::new();
    registry
        .register(definition(
            sales_store.clone(),
            Arc::new(FaultInjector::disabled()),
            StepPolicy::default(),
        ))
        .context("registering the order-to-cash saga")?;
    let config = OrchestratorConfig::worker(format!("vextrus-cli-{}", std::process::id()));
    let orchestrator = Orchestrator::with_config(store.clone(), registry, config);
    let stdout = std::io::stdout();
    match command {
        SagaCommand::List {
            saga_type,
            states,
            older_than,
            limit,
        } => {
            let filter = SagaFilter {
                saga_type,
                states,
                older_than,
                newer_than: None,
                limit,
            };
            let sagas = orchestrator.list(&filter).await?;
            let now = store.now().await?;
            let mut out = std::io::BufWriter::new(stdout.lock());
            for saga in &sagas {
                serde_json::to_writer(&mut out, &summary(saga, now))?;
                out.write_all(b"\n")?;
            }
            out.flush()?;
        }
        SagaCommand::Show { json, .. } => {
            let id = id.expect("parsed before connecting");
            let view = orchestrator
                .show(id)
                .await
                .map_err(|e| operator_error(e, "show"))?;
            let mut out = std::io::BufWriter::new(stdout.lock());
            if json {
                for entry in &view.history {
                    serde_json::to_writer(&mut out, &entry_json(entry))?;
                    out.write_all(b"\n")?;
                }
            } else {
                let now = store.now().await?;
                out.write_all(timeline(&view.instance, &view.history, now).as_bytes())?;
            }
            out.flush()?;
        }
        SagaCommand::Retry { .. } => {
            let id = id.expect("parsed before connecting");
            check_order_in_sales(&store, &sales_store, sales, id, "retry").await?;
            let saga = orchestrator
                .retry(id)
                .await
                .map_err(|e| operator_error(e, "retry"))?;
            let now = store.now().await?;
            println!("{}", with_sales(summary(&saga, now), sales));
        }
        SagaCommand::Abort { reason, .. } => {
            let id = id.expect("parsed before connecting");
            check_order_in_sales(&store, &sales_store, sales, id, "abort").await?;
            let saga = orchestrator
                .abort(id, &reason)
                .await
                .map_err(|e| operator_error(e, "abort"))?;
            let now = store.now().await?;
            println!("{}", with_sales(summary(&saga, now), sales));
        }
    }
    Ok(())
}

/// Makes a saga error an operator can act on say so.
fn operator_error(e: SagaError, operation: &str) -> anyhow::Error {
    match e {
        SagaError::NotFound(id) => BadInput(format!("no saga with id {id}")).into(),
        SagaError::Leased { ref owner, saga_id } => {
            let owner = owner.clone();
            anyhow::Error::new(e).context(format!(
                "cannot {operation} saga {saga_id} now: worker {owner} holds its lease and is \
                 driving it; try again once the lease is let go or expires"
            ))
        }
        SagaError::UnknownDefinition { .. } => anyhow::Error::new(e).context(format!(
            "cannot {operation} this saga: this vextrus binary knows only the order_to_cash saga"
        )),
        e => e.into(),
    }
}

/// A `retry` or `abort` result with the Sales database it used.
fn with_sales(mut result: Value, sales: &SalesDb) -> Value {
    if let Value::Object(map) = &mut result {
        map.insert("sales_database".into(), json!(sales.described));
    }
    result
}

/// The age of something created at `at`, by the store's clock `now`.
fn age(at: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (now - at).to_std().unwrap_or_default()
}

/// One saga as a JSON object (`list`, and the result of `retry`/`abort`).
fn summary(saga: &SagaInstance, now: DateTime<Utc>) -> Value {
    let age = age(saga.created_at, now);
    json!({
        "id": saga.id.to_string(),
        "type": saga.saga_type,
        "version": saga.version,
        "state": saga.state.as_str(),
        "step": saga.progress.step,
        "attempt": saga.progress.attempt,
        "age_ms": u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
        "age": human_duration(age),
        "last_error": saga.last_error,
        "created_at": saga.created_at,
        "updated_at": saga.updated_at,
        "due_at": saga.due_at,
        "leased_by": saga.lease.as_ref().filter(|l| l.expires_at > now).map(|l| l.owner.as_str()),
    })
}

/// One timeline entry as a JSON object.
fn entry_json(entry: &HistoryEntry) -> Value {
    json!({
        "seq": entry.seq,
        "at": entry.at,
        "kind": entry.event.kind.as_str(),
        "step": entry.event.step,
        "step_name": entry.event.step_name,
        "attempt": entry.event.attempt,
        "error": entry.event.error,
        "worker": entry.worker,
    })
}

/// The saga and its timeline as text.
fn timeline(saga: &SagaInstance, history: &[HistoryEntry], now: DateTime<Utc>) -> String {
    let mut text = format!(
        "saga {} ({} v{}): {}, step {}, age {}\n",
        saga.id,
        saga.saga_type,
        saga.version,
        saga.state,
        saga.progress.step,
        human_duration(age(saga.created_at, now)),
    );
    if let Some(error) = &saga.last_error {
        text.push_str(&format!("last error: {error}\n"));
    }
    if let Some(lease) = saga.lease.as_ref().filter(|l| l.expires_at > now) {
        text.push_str(&format!(
            "leased by {} until {}\n",
            lease.owner,
            lease
                .expires_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        ));
    }
    for entry in history {
        let e = &entry.event;
        let step = match (e.step, e.step_name.as_deref()) {
            (Some(n), Some(name)) => format!("{n} {name}"),
            (Some(n), None) => n.to_string(),
            _ => "-".to_owned(),
        };
        text.push_str(&format!(
            "{}  {:<28} {:<24}",
            entry
                .at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            e.kind.as_str(),
            step
        ));
        if let Some(attempt) = e.attempt {
            text.push_str(&format!(" attempt {attempt}"));
        }
        if let Some(error) = &e.error {
            text.push_str(&format!(" error: {error}"));
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse_in_every_unit() {
        assert_eq!(parse_age("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_age("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_age("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_age("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_age("2h").unwrap(), Duration::from_secs(7_200));
        assert_eq!(parse_age("1d").unwrap(), Duration::from_secs(86_400));
        for bad in ["", "m", "10x", "-1m", "1.5h"] {
            assert!(parse_age(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn states_parse_as_stored() {
        assert_eq!(
            parse_state("compensation_failed").unwrap(),
            SagaState::CompensationFailed
        );
        assert!(parse_state("stuck").is_err());
    }

    #[test]
    fn malformed_and_unknown_ids_are_bad_input() {
        let err = parse_id("nope").unwrap_err();
        assert!(err.downcast_ref::<BadInput>().is_some());
        let id = SagaId::new();
        let err = operator_error(SagaError::NotFound(id), "retry");
        assert_eq!(err.to_string(), format!("no saga with id {id}"));
        assert!(err.downcast_ref::<BadInput>().is_some());
    }

    #[test]
    fn sales_is_beside_a_demo_orchestrator_db_else_in_the_saga_store() {
        let dir = tempfile::tempdir().unwrap();
        let orchestrator = format!("sqlite:{}", dir.path().join(ORCHESTRATOR_DB).display());
        // No sales.db beside it yet: the saga store's own database.
        assert_eq!(
            SalesSource::resolve(&orchestrator, None),
            SalesSource::SagaStore
        );
        let sales = dir.path().join(DEMO_SALES_DB);
        std::fs::write(&sales, b"").unwrap();
        assert_eq!(
            SalesSource::resolve(&orchestrator, None),
            SalesSource::DemoLayout(sales.clone())
        );
        assert_eq!(
            SalesSource::resolve(&format!("{orchestrator}?mode=rwc"), None),
            SalesSource::DemoLayout(sales.clone())
        );
        // Another file name in the same directory is not the demo layout.
        let other = format!("sqlite:{}", dir.path().join("sagas.db").display());
        assert_eq!(SalesSource::resolve(&other, None), SalesSource::SagaStore);
        let pg = "postgres://u:secret@h:5432/db";
        assert_eq!(SalesSource::resolve(pg, None), SalesSource::SagaStore);
        // Given explicitly: that database, whatever the layout.
        assert_eq!(
            SalesSource::resolve(&orchestrator, Some(pg)),
            SalesSource::Given(pg.to_owned())
        );
        assert_eq!(
            SalesSource::resolve(&orchestrator, Some(&orchestrator)),
            SalesSource::SagaStore
        );
        assert_eq!(
            SalesSource::Given(pg.to_owned()).describe(&orchestrator),
            "postgres://u:***@h:5432/db"
        );
    }

    #[test]
    fn a_leased_saga_names_its_worker() {
        let id = SagaId::new();
        let err = operator_error(
            SagaError::Leased {
                saga_id: id,
                owner: "worker-7".into(),
            },
            "abort",
        );
        let text = format!("{err:#}");
        assert!(
            text.contains(&format!("cannot abort saga {id} now: worker worker-7")),
            "{text}"
        );
        assert!(err.downcast_ref::<SagaError>().is_some());
    }
}
