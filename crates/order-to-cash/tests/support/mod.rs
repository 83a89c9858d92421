//! Shared test fixtures: participants on fresh stores, and checks of demo
//! reports.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;

use vextrus_kernel::{AggregateId, Currency, Money, Quantity, Sku};
use vextrus_order_to_cash::accounting::Accounting;
use vextrus_order_to_cash::demo::DemoReport;
use vextrus_order_to_cash::inventory::{Inventory, StockLine};
use vextrus_order_to_cash::payment::Payment;
use vextrus_order_to_cash::shipping::Shipping;
use vextrus_order_to_cash::{Database, FaultConfig, FaultInjector, IdempotencyKey};

pub struct World {
    pub inventory: Inventory,
    pub payment: Payment,
    pub shipping: Shipping,
    pub accounting: Accounting,
}

pub async fn world_with(faults: FaultInjector) -> World {
    let faults = Arc::new(faults);
    let world = World {
        inventory: Inventory::new(Database::temporary().await.unwrap(), faults.clone()),
        payment: Payment::new(Database::temporary().await.unwrap(), faults.clone()),
        shipping: Shipping::new(Database::temporary().await.unwrap(), faults.clone()),
        accounting: Accounting::new(Database::temporary().await.unwrap(), faults),
    };
    world.inventory.migrate().await.unwrap();
    world.payment.migrate().await.unwrap();
    world.shipping.migrate().await.unwrap();
    world.accounting.migrate().await.unwrap();
    world
}

pub async fn world() -> World {
    world_with(FaultInjector::disabled()).await
}

pub fn key(s: &str) -> IdempotencyKey {
    IdempotencyKey::new(s).unwrap()
}

pub fn order(s: &str) -> AggregateId {
    AggregateId::new(s).unwrap()
}

pub fn sku(s: &str) -> Sku {
    Sku::new(s).unwrap()
}

pub fn line(s: &str, n: i64) -> StockLine {
    StockLine {
        sku: sku(s),
        quantity: Quantity::new(n).unwrap(),
    }
}

pub fn usd(minor: i64) -> Money {
    Money::from_minor(minor, Currency::USD)
}

pub fn only(config: FaultConfig) -> FaultInjector {
    FaultInjector::new(11, config)
}

/// Asserts that `again`, the demo run a second time with `first`'s seed on
/// the same databases, found the orders and sagas `first` placed (their ids
/// derive from the seed) and placed none twice: it passes and reports the
/// same orders and outcomes.
pub fn assert_same_outcome(first: &DemoReport, again: &DemoReport) {
    assert!(again.passed(), "{again}");
    assert_eq!(
        (
            again.orders,
            again.completed,
            again.compensated,
            again.failed
        ),
        (
            first.orders,
            first.completed,
            first.compensated,
            first.failed
        ),
        "{again}"
    );
}
