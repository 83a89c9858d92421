//! Runs the order-to-cash demo and prints its report (the `vextrus demo`
//! command wraps the same library function).
//!
//! `cargo run --release -p vextrus-order-to-cash --example run_demo -- [ORDERS] [SEED]`

use vextrus_order_to_cash::demo::{DemoConfig, run_demo};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let orders = args.next().and_then(|a| a.parse().ok()).unwrap_or(3_000);
    let seed = args.next().and_then(|a| a.parse().ok()).unwrap_or(42);
    let config = DemoConfig {
        orders,
        seed,
        ..DemoConfig::default()
    };
    match run_demo(config, None).await {
        Ok(report) => {
            println!("{report}");
            if !report.passed() {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("demo failed: {e}");
            std::process::exit(2);
        }
    }
}
