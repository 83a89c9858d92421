//! `vextrus saga list | show | retry | abort`: the operator's view of the
//! saga orchestrator.
//!
//! `retry` and `abort` go through [`Orchestrator::retry`] and
//! [`Orchestrator::abort`]: the saga is claimed like a worker claims it,
//! its next compensations start at once (a local compensation runs in this
//! process, a remote one is queued in the outbox in the same commit) and the
//! workers carry on from there. They need the saga's definition: this binary
//! registers the order-to-cash saga (`order_to_cash` v1), whose local steps
//! act on the Sales event store of the same database.
//!
//! Exit codes: an unknown or malformed saga id, or an operation that does
//! not apply in the saga's state, is bad input (4). A saga a worker holds a
//! live lease on is **unavailable (5)**: the worker is driving it right now,
//! and the same command succeeds once the lease is let go or expires.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use vextrus_core::saga::{
    HistoryEntry, Orchestrator, OrchestratorConfig, SagaError, SagaFilter, SagaId, SagaInstance,
    SagaRegistry, SagaState, SagaStore,
};
use vextrus_core::{EventAppender, EventReader, SnapshotStore};
use vextrus_order_to_cash::FaultInjector;
use vextrus_order_to_cash::saga::{REPLIES, StepPolicy, definition};
use vextrus_order_to_cash::sales::Sales;
use vextrus_postgres::{PgOutbox, PgSagaStore};
use vextrus_sqlite::SqliteOutbox;
use vextrus_sqlite::saga::SqliteSagaStore;

use crate::backend::Store;
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

/// Runs a `saga` subcommand.
pub(crate) async fn run(args: SagaArgs) -> Result<()> {
    // Validate what needs no database first.
    let id = command_id(&args.command)?;
    match Store::connect(&args.database_url, true).await? {
        Store::Postgres(events) => {
            let store = PgSagaStore::new(PgOutbox::new(events.clone()), args.reply_to);
            run_on(store, events, args.command, id).await
        }
        Store::Sqlite(events) => {
            let store = SqliteSagaStore::new(SqliteOutbox::new(events.clone()), args.reply_to);
            run_on(store, events, args.command, id).await
        }
    }
}

/// Runs a `saga` subcommand on `store`, whose database also holds the Sales
/// event store `events` (for the order-to-cash saga's local steps).
async fn run_on<S, E>(store: S, events: E, command: SagaCommand, id: Option<SagaId>) -> Result<()>
where
    S: SagaStore + Clone + 'static,
    E: EventAppender + EventReader + SnapshotStore + Send + Sync + 'static,
{
    let registry = SagaRegistry::new();
    registry
        .register(definition(
            Arc::new(Sales::new(events)),
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
            let saga = orchestrator
                .retry(id)
                .await
                .map_err(|e| operator_error(e, "retry"))?;
            let now = store.now().await?;
            println!("{}", summary(&saga, now));
        }
        SagaCommand::Abort { reason, .. } => {
            let id = id.expect("parsed before connecting");
            let saga = orchestrator
                .abort(id, &reason)
                .await
                .map_err(|e| operator_error(e, "abort"))?;
            let now = store.now().await?;
            println!("{}", summary(&saga, now));
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
