//! End to end on the embedded default: the order-to-cash saga over the
//! in-process transport, SQLite participants, failure injection.

use std::sync::Arc;

use vextrus_order_to_cash::demo::{DemoConfig, run_demo};
use vextrus_order_to_cash::invariants::SagaState;
use vextrus_order_to_cash::payment::Payment;
use vextrus_order_to_cash::saga::STEPS;
use vextrus_order_to_cash::{Database, Durability, FaultConfig, FaultInjector};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_orders_with_default_faults_keep_every_invariant() {
    let config = DemoConfig {
        orders: 200,
        seed: 7,
        ..DemoConfig::default()
    };
    let report = run_demo(config, None).await.unwrap();
    println!("{report}");
    assert!(report.passed(), "{report}");
    assert_eq!(report.not_terminal, 0, "{report}");
    assert_eq!(report.completed + report.compensated + report.failed, 200);
    assert!(report.completed > 0, "{report}");
    assert!(report.compensated > 0, "{report}");
    assert!(report.failed > 0, "{report}");
    // The injected crashes and delayed replies really happened.
    assert!(report.injected.crashes > 0, "{report}");
    assert!(
        report.injected.delays > 0 && report.timeouts > 0,
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_gives_the_same_outcomes() {
    let config = DemoConfig {
        orders: 60,
        seed: 99,
        faults: FaultConfig {
            crash_rate: 0.0,
            timeout_rate: 0.0,
            decline_rate: 0.2,
            ..FaultConfig::default()
        },
        ..DemoConfig::default()
    };
    let a = run_demo(config.clone(), None).await.unwrap();
    let b = run_demo(config, None).await.unwrap();
    assert!(a.passed() && b.passed());
    assert_eq!(
        (a.completed, a.compensated, a.failed),
        (b.completed, b.compensated, b.failed)
    );
}

/// Forcing a business failure at each step compensates exactly the steps
/// completed before it, in reverse order, and every invariant holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_at_each_step_compensates_exactly_the_completed_steps() {
    let forced = [
        "sales.validate",
        "inventory.reserve",
        "payment.authorize",
        "shipping.create",
        "inventory.ship",
        "payment.capture",
        "accounting.post_invoice",
        "sales.complete",
    ];
    for (step, command_type) in forced.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let config = DemoConfig {
            orders: 3,
            seed: 1,
            faults: FaultConfig::none(),
            data_dir: Some(dir.path().to_path_buf()),
            forced_failures: vec![(*command_type).to_owned()],
            keep_timelines: true,
            ..DemoConfig::default()
        };
        let report = run_demo(config, None).await.unwrap();
        assert!(report.passed(), "failing {command_type}: {report}");
        let expected_state = if step == 0 {
            SagaState::Failed
        } else {
            SagaState::Compensated
        };
        let expected: Vec<&str> = STEPS[..step].iter().rev().copied().collect();
        for t in &report.timelines {
            assert_eq!(t.state, expected_state, "failing {command_type}: {t:?}");
            let compensated: Vec<&str> = t
                .events
                .iter()
                .filter(|(kind, _)| kind == "compensation_succeeded")
                .map(|(_, step)| step.as_str())
                .collect();
            assert_eq!(compensated, expected, "failing {command_type}: {t:?}");
            // The failed step itself is never compensated, nor any later one.
            assert!(
                t.events
                    .iter()
                    .filter(|(kind, _)| kind == "compensation_started")
                    .all(|(_, s)| STEPS[..step].contains(&s.as_str())),
                "{t:?}"
            );
        }
        // What payment holds tells which of its compensations ran.
        let payment = Payment::new(
            Database::sqlite_file(&dir.path().join("payment.db"), Durability::Normal)
                .await
                .unwrap(),
            Arc::new(FaultInjector::disabled()),
        );
        let states: Vec<String> = payment
            .records()
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.state)
            .collect();
        let want = match step {
            0..=2 => None,
            3..=5 => Some("voided"),
            _ => Some("refunded"),
        };
        match want {
            None => assert!(states.is_empty(), "failing {command_type}: {states:?}"),
            Some(w) => assert!(
                states.len() == 3 && states.iter().all(|s| s == w),
                "failing {command_type}: {states:?}"
            ),
        }
    }
}
