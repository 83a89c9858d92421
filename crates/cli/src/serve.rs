//! `vextrus serve --role R`: one part of the order-to-cash system as its own
//! process.
//!
//! - `inventory`, `payment`, `shipping`, `accounting` (or several at once
//!   with `all`): the participant's serving loop (commands through its inbox,
//!   replies through its outbox) and its reply relay, until Ctrl-C or
//!   SIGTERM.
//! - `orchestrator` (or `sales`): the saga workers (`--workers`), the relay
//!   of the saga store's command outbox and the reply inbox, over the
//!   durable saga store (PostgreSQL with `--database-url`, or
//!   `orchestrator.db` in `--data-dir`) with Sales (the saga's local steps)
//!   on the same database or directory; until Ctrl-C or SIGTERM. It places
//!   no orders and resumes every non-terminal saga at start: SIGKILL it at
//!   any moment and start it again, nothing is lost. Orders come from
//!   `vextrus demo --remote-orchestrator [--remote-participants]` with the
//!   same database, broker, namespace and seed, which places them, waits
//!   until every saga is terminal, prints the report and checks the
//!   invariants (exit code 1 if one fails).
//!
//! Every process of one system names the same databases (`--database-url
//! postgres://...`, or the same `--data-dir` of SQLite files), the same
//! `--broker`, the same `--namespace` and the same `--seed` (failure
//! injection is derived from it).

use anyhow::{Result, bail};
use clap::Args;
use vextrus_order_to_cash::demo::{serve_orchestrator, serve_participants};
use vextrus_order_to_cash::node::Role;

use crate::demo::DemoArgs;
use crate::exit::BadInput;

/// `vextrus serve ...`
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// orchestrator (alias sales), inventory, payment, shipping, accounting or all.
    #[arg(long)]
    role: String,
    /// Seed, failure rates, databases, broker and namespace, as for
    /// `vextrus demo` (`--workers` and `--concurrency`, the saga workers'
    /// claim batch, matter to the orchestrator; `--orders` to no service).
    #[command(flatten)]
    run: DemoArgs,
}

/// Waits for Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs the role.
pub(crate) async fn run(args: ServeArgs) -> Result<()> {
    let role: Role = args
        .role
        .parse()
        .map_err(|e: vextrus_order_to_cash::Error| BadInput(e.to_string()))?;
    let config = args.run.config()?;
    if config.broker.is_none() {
        bail!(BadInput(
            "--broker is required: nats://HOST:PORT or kafka://HOST:PORT".into()
        ));
    }
    if config.namespace.is_none() {
        bail!(BadInput(
            "--namespace is required: every process of one system names the same".into()
        ));
    }
    if config.database_url.is_none() && config.data_dir.is_none() {
        bail!(BadInput(
            "--database-url postgres://... or --data-dir DIR is required".into()
        ));
    }
    match role {
        Role::Orchestrator => {
            serve_orchestrator(config, shutdown_signal()).await?;
            Ok(())
        }
        role => {
            serve_participants(config, role, shutdown_signal()).await?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::ServeArgs;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: ServeArgs,
    }

    #[tokio::test]
    async fn a_service_needs_a_role_a_broker_a_namespace_and_a_database() {
        let parse = |args: &[&str]| {
            Wrapper::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))
                .unwrap()
                .args
        };
        let e = super::run(parse(&["--role", "billing"])).await.unwrap_err();
        assert!(e.to_string().contains("billing"), "{e}");
        let e = super::run(parse(&["--role", "payment"])).await.unwrap_err();
        assert!(e.to_string().contains("--broker"), "{e}");
        let e = super::run(parse(&[
            "--role",
            "payment",
            "--broker",
            "nats://127.0.0.1:4222",
        ]))
        .await
        .unwrap_err();
        assert!(e.to_string().contains("--namespace"), "{e}");
        let e = super::run(parse(&[
            "--role",
            "payment",
            "--broker",
            "nats://127.0.0.1:4222",
            "--namespace",
            "n",
        ]))
        .await
        .unwrap_err();
        assert!(e.to_string().contains("--data-dir"), "{e}");
    }
}
