//! A projection worker process for the SIGKILL crash test
//! (`tests/projection_crash.rs`): it runs a projection on a SQLite event
//! store until it is killed, or catches up / rebuilds and exits.
//!
//! Usage: `vextrus-sqlite-projection-worker <database file> run|catch-up|rebuild`
//!
//! The read model counts applications per event id (a double application
//! shows as 2) and keeps a per-stream running sum and last version (a skipped
//! or repeated event changes them).

use std::process::ExitCode;
use std::time::Duration;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Sqlite, Transaction};
use vextrus_core::{BoxError, Projection, ProjectionRunner, RecordedEvent};
use vextrus_sqlite::SqliteEventStore;

struct CrashProjection;

impl Projection<SqliteEventStore> for CrashProjection {
    fn name(&self) -> &str {
        "crash-test"
    }

    async fn apply(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        event: &RecordedEvent,
    ) -> Result<(), BoxError> {
        sqlx::query(
            "INSERT INTO crash_applied (event_id, applications) VALUES (?, 1)
             ON CONFLICT (event_id) DO UPDATE SET applications = applications + 1",
        )
        .bind(event.event_id().to_string())
        .execute(&mut **tx)
        .await?;
        let n = event.payload["n"].as_i64().ok_or("payload has no n")?;
        let version = i64::try_from(event.stream_version)?;
        sqlx::query(
            "INSERT INTO crash_streams (stream_id, total, last_version, events) VALUES (?, ?, ?, 1)
             ON CONFLICT (stream_id) DO UPDATE SET
                 total = total + excluded.total,
                 last_version = excluded.last_version,
                 events = events + 1",
        )
        .bind(event.stream_id.as_str())
        .bind(n)
        .bind(version)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn reset(&self, tx: &mut Transaction<'static, Sqlite>) -> Result<(), BoxError> {
        sqlx::query("DELETE FROM crash_applied")
            .execute(&mut **tx)
            .await?;
        sqlx::query("DELETE FROM crash_streams")
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

async fn run(path: &str, mode: &str) -> Result<(), BoxError> {
    let options = SqliteConnectOptions::new().filename(path);
    let store = SqliteEventStore::connect_with(SqliteEventStore::tune(options), 4).await?;
    let runner = ProjectionRunner::new(store, CrashProjection)
        .with_batch_size(37)
        .with_poll_interval(Duration::from_millis(10));
    match mode {
        "run" => runner.run_until(std::future::pending()).await?,
        "catch-up" => {
            runner.catch_up().await?;
        }
        "rebuild" => {
            runner.rebuild().await?;
        }
        other => return Err(format!("unknown mode {other:?}").into()),
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, path, mode] = args.as_slice() else {
        eprintln!("usage: vextrus-sqlite-projection-worker <database file> run|catch-up|rebuild");
        return ExitCode::from(2);
    };
    match run(path, mode).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("projection worker failed: {e}");
            ExitCode::FAILURE
        }
    }
}
