//! `vextrus demo`: the order-to-cash reference system, on the embedded
//! default (SQLite files and the in-process transport; nothing to install)
//! or on PostgreSQL (`--database-url`) and NATS or Kafka (`--broker`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vextrus_order_to_cash::demo::{DemoConfig, DemoProgress, run_demo};
use vextrus_order_to_cash::faults::FaultConfig;

use crate::exit::BadInput;

/// `vextrus demo ...`
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// How many orders to place.
    #[arg(long, default_value_t = 3_000)]
    orders: usize,
    /// Seed of every random choice (orders and injected failures): the same
    /// seed gives the same outcomes.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Share of payments the payment service declines (0..=1).
    #[arg(long)]
    decline_rate: Option<f64>,
    /// Share of reservations the inventory service reports out of stock
    /// (real shortages still happen when stock runs out).
    #[arg(long)]
    out_of_stock_rate: Option<f64>,
    /// Share of shipments the shipping service refuses.
    #[arg(long)]
    shipping_failure_rate: Option<f64>,
    /// Share of participant commands that crash before commit (the message is redelivered).
    #[arg(long)]
    crash_rate: Option<f64>,
    /// Share of participant replies delayed past the step timeout.
    #[arg(long)]
    timeout_rate: Option<f64>,
    /// Share of orders that fail validation.
    #[arg(long)]
    invalid_order_rate: Option<f64>,
    /// Inject no failures at all.
    #[arg(long, conflicts_with_all = ["decline_rate", "out_of_stock_rate", "shipping_failure_rate", "crash_rate", "timeout_rate", "invalid_order_rate"])]
    no_faults: bool,
    /// Sagas in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Orchestrator workers sharing the sagas.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Keep the participants' SQLite files here (default: a temporary directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Run Sales and every participant on this PostgreSQL database
    /// (`postgres://...`) instead of SQLite files. The saga store stays in the
    /// orchestrator's process for now.
    #[arg(long)]
    database_url: Option<String>,
    /// The broker commands and replies travel through: `nats://HOST:PORT`
    /// (JetStream) or `kafka://HOST:PORT`; default: in this process.
    #[arg(long)]
    broker: Option<String>,
    /// The namespace of the broker's destinations, shared by the processes
    /// of one system (default: a fresh one per demo run).
    #[arg(long)]
    namespace: Option<String>,
    /// Give up waiting for terminal sagas after this many seconds.
    #[arg(long, default_value_t = 300)]
    deadline_secs: u64,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

impl DemoArgs {
    pub(crate) fn config(&self) -> Result<DemoConfig> {
        if self.orders == 0 {
            bail!(BadInput("--orders must be at least 1".into()));
        }
        if self.concurrency == 0 || self.workers == 0 {
            bail!(BadInput(
                "--concurrency and --workers must be at least 1".into()
            ));
        }
        let mut faults = if self.no_faults {
            FaultConfig::none()
        } else {
            FaultConfig::default()
        };
        let rates = [
            (self.decline_rate, &mut faults.decline_rate),
            (self.out_of_stock_rate, &mut faults.out_of_stock_rate),
            (
                self.shipping_failure_rate,
                &mut faults.shipping_failure_rate,
            ),
            (self.crash_rate, &mut faults.crash_rate),
            (self.timeout_rate, &mut faults.timeout_rate),
            (self.invalid_order_rate, &mut faults.invalid_order_rate),
        ];
        for (given, slot) in rates {
            if let Some(rate) = given {
                *slot = rate;
            }
        }
        faults.validate().map_err(|e| BadInput(e.to_string()))?;
        Ok(DemoConfig {
            orders: self.orders,
            seed: self.seed,
            faults,
            data_dir: self.data_dir.clone(),
            database_url: self.database_url.clone(),
            broker: self.broker.clone(),
            namespace: self.namespace.clone(),
            concurrency: self.concurrency,
            workers: self.workers,
            deadline: Duration::from_secs(self.deadline_secs),
            ..DemoConfig::default()
        })
    }
}

/// Runs the demo, prints its report, and fails if an invariant does not hold.
pub(crate) async fn run(args: DemoArgs) -> Result<()> {
    let config = args.config()?;
    run_config(config, args.quiet).await
}

/// Runs `config` with a progress bar (unless `quiet`), prints the report,
/// and fails if an invariant does not hold.
pub(crate) async fn run_config(config: DemoConfig, quiet: bool) -> Result<()> {
    let bar = ProgressBar::new(config.orders as u64);
    if quiet {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} sagas terminal {msg}",
        )
        .map_err(|e| anyhow::anyhow!("progress template: {e}"))?
        .progress_chars("=> "),
    );
    let progress_bar = bar.clone();
    let progress = Arc::new(move |p: DemoProgress| {
        progress_bar.set_length(p.total as u64);
        progress_bar.set_position(p.finished as u64);
        progress_bar.set_message(format!("({} placed)", p.started));
    });
    let report = run_demo(config, Some(progress)).await?;
    bar.finish_and_clear();
    println!("{report}");
    if !report.passed() {
        bail!("business invariants failed: see the report above");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::DemoArgs;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: DemoArgs,
    }

    fn parse(args: &[&str]) -> DemoArgs {
        Wrapper::try_parse_from(std::iter::once("demo").chain(args.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn rates_override_the_defaults_and_are_validated() {
        let c = parse(&["--orders", "10", "--decline-rate", "0.5"])
            .config()
            .unwrap();
        assert_eq!(c.orders, 10);
        assert_eq!(c.faults.decline_rate, 0.5);
        assert!(parse(&["--decline-rate", "1.5"]).config().is_err());
        assert!(parse(&["--orders", "0"]).config().is_err());
        let none = parse(&["--no-faults"]).config().unwrap();
        assert_eq!(none.faults.crash_rate, 0.0);
        let b = parse(&["--broker", "nats://127.0.0.1:4222", "--namespace", "n1"])
            .config()
            .unwrap();
        assert_eq!(b.broker.as_deref(), Some("nats://127.0.0.1:4222"));
        assert_eq!(b.namespace.as_deref(), Some("n1"));
    }
}
