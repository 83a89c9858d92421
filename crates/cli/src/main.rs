//! `vextrus`: the command line of the vextrus distributed-transactions
//! foundation.
//!
//! Every subcommand that touches a store takes `--database-url` (or the
//! `VEXTRUS_DATABASE_URL` environment variable): `sqlite:PATH` for the
//! embedded default (the file is created and migrated on first use) or
//! `postgres://...` for PostgreSQL (run `vextrus migrate` once first).
//! Output is JSON lines on stdout; errors go to stderr with a non-zero exit
//! code that says their kind (see [`exit`]).

mod backend;
mod demo;
mod events;
mod exit;
mod outbox;
mod saga;
mod serve;

use clap::{Parser, Subcommand};

/// The default store: a SQLite file in the current directory.
const DEFAULT_DATABASE_URL: &str = "sqlite:vextrus.db";

/// vextrus: event store, outbox, sagas and idempotency for ERP services.
#[derive(Debug, Parser)]
#[command(name = "vextrus", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the store's versioned SQL migrations (applying them twice is harmless).
    Migrate {
        /// `sqlite:PATH` or `postgres://USER@HOST:PORT/DB`.
        #[arg(long, env = "VEXTRUS_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
        database_url: String,
    },
    /// Append, read and follow events.
    Events(events::EventsArgs),
    /// Run the order-to-cash reference system: place orders with injected
    /// failures, drive every saga to a terminal state, report, and check the
    /// business invariants (exit code 1 if any fails). With
    /// `--remote-orchestrator`/`--remote-participants` those parts run as
    /// `vextrus serve` processes.
    Demo(demo::DemoArgs),
    /// Run one part of order-to-cash as its own process (`--role
    /// orchestrator|sales|inventory|payment|shipping|accounting|all`) over
    /// a real broker, until Ctrl-C or SIGTERM. The orchestrator runs the saga
    /// workers, command relay and reply inbox on the durable saga store and
    /// places no orders: `vextrus demo --remote-orchestrator` does.
    Serve(serve::ServeArgs),
    /// Inspect the transactional outbox: status, dead letters, replay, discard.
    Outbox(outbox::OutboxArgs),
    /// Inspect and repair sagas: list, show a timeline, retry, abort.
    Saga(saga::SagaArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return exit::report(&anyhow::Error::new(e)),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Migrate { database_url } => {
                let store = backend::Store::connect(&database_url, false).await?;
                store.migrate().await?;
                println!(
                    "{}",
                    serde_json::json!({"migrated": backend::redact(&database_url)})
                );
                Ok(())
            }
            Command::Events(args) => events::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Serve(args) => serve::run(args).await,
            Command::Outbox(args) => outbox::run(args).await,
            Command::Saga(args) => saga::run(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => exit::report(&e),
    }
}
