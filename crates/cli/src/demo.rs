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
use vextrus_order_to_cash::saga::STEPS;
use vextrus_order_to_cash::step_metrics::{StepTiming, StepTimings};

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
    /// Keep the SQLite files here (default: a temporary directory): one per
    /// participant, `sales.db`, and `orchestrator.db` (the saga store, its
    /// command outbox and reply inbox).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Run Sales, the saga store and every participant on this PostgreSQL
    /// database (`postgres://...`) instead of SQLite files.
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
    /// The participants run elsewhere (`vextrus serve --role inventory|payment|
    /// shipping|accounting`) on the same databases, broker and namespace.
    #[arg(long)]
    remote_participants: bool,
    /// The orchestrator runs elsewhere (`vextrus serve --role orchestrator`)
    /// on the same database, broker and namespace: this process only places
    /// the orders (orders and started sagas written to the database), waits
    /// until every saga is terminal and checks the invariants. Running it
    /// again with the same seed on the same database places nothing twice:
    /// it waits for the sagas already started.
    #[arg(long)]
    remote_orchestrator: bool,
    /// The size of each PostgreSQL pool this process opens (default: the
    /// stores' own, up to 32): several processes of one system on one
    /// server must stay under its `max_connections` together.
    #[arg(long)]
    max_connections: Option<u32>,
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
        if self.remote_participants || self.remote_orchestrator {
            if self.broker.is_none() || self.namespace.is_none() {
                bail!(BadInput(
                    "--remote-participants/--remote-orchestrator need the --broker and --namespace the other processes use".into()
                ));
            }
            if self.database_url.is_none() && self.data_dir.is_none() {
                bail!(BadInput(
                    "--remote-participants/--remote-orchestrator need the --database-url or --data-dir the other processes use".into()
                ));
            }
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
            remote_participants: self.remote_participants,
            remote_orchestrator: self.remote_orchestrator,
            max_connections: self.max_connections,
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
async fn run_config(config: DemoConfig, quiet: bool) -> Result<()> {
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
    // Where the time went comes from the orchestrator's own
    // `vextrus_saga_step_seconds` histogram, not from the sagas' timelines.
    // A process that already has a recorder (none in the CLI today) simply
    // prints no such table.
    let timings = StepTimings::new();
    let timed = timings.install_global().is_ok();
    let remote_orchestrator = config.remote_orchestrator;
    let report = run_demo(config, Some(progress)).await?;
    bar.finish_and_clear();
    println!("{report}");
    if timed && !remote_orchestrator {
        print!("{}", step_table(&timings.in_order(&STEPS)));
    }
    if !report.passed() {
        bail!("business invariants failed: see the report above");
    }
    Ok(())
}

/// The per-step table printed after the report: attempts, p50, p99 and
/// total time of each (step, outcome), in saga order.
fn step_table(timings: &[StepTiming]) -> String {
    use std::fmt::Write as _;
    let mut out = String::from("where the time went (vextrus_saga_step_seconds, per attempt):\n");
    if timings.is_empty() {
        out.push_str("  no step was timed in this process\n");
    }
    for t in timings {
        let _ = writeln!(
            out,
            "  {:<22} {:<9} n={:<6} p50 {:>8.1} ms  p99 {:>8.1} ms  total {:>8.1} s",
            t.step,
            t.outcome,
            t.count,
            t.p50.as_secs_f64() * 1e3,
            t.p99.as_secs_f64() * 1e3,
            t.total.as_secs_f64()
        );
    }
    out
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
        assert!(!b.remote_participants && !b.remote_orchestrator);
        assert!(parse(&["--remote-orchestrator"]).config().is_err());
        let r = parse(&[
            "--remote-participants",
            "--remote-orchestrator",
            "--broker",
            "nats://127.0.0.1:4222",
            "--namespace",
            "n1",
            "--database-url",
            "postgres://x@127.0.0.1/db",
        ])
        .config()
        .unwrap();
        assert!(r.remote_participants && r.remote_orchestrator);
    }

    #[test]
    fn the_step_table_lists_each_step_and_outcome() {
        use std::time::Duration;
        let t = |step: &str, outcome: &str, ms: u64| super::StepTiming {
            step: step.into(),
            outcome: outcome.into(),
            count: 3,
            p50: Duration::from_millis(ms),
            p99: Duration::from_millis(ms * 2),
            max: Duration::from_millis(ms * 2),
            total: Duration::from_millis(ms * 3),
        };
        let table = super::step_table(&[
            t("reserve_inventory", "ok", 12),
            t("capture_payment", "error", 40),
        ]);
        assert!(table.starts_with("where the time went"), "{table}");
        assert!(table.contains("reserve_inventory"), "{table}");
        assert!(table.contains("p50     12.0 ms"), "{table}");
        assert!(table.contains("p99     80.0 ms"), "{table}");
        assert!(table.contains("capture_payment        error"), "{table}");
        assert!(super::step_table(&[]).contains("no step was timed"));
    }
}
