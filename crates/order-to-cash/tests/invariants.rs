//! The invariant checker: clean data from real participants passes, and
//! each invariant, broken on purpose, is caught.

mod support;

use support::*;
use vextrus_core::InMemoryEventStore;
use vextrus_kernel::{CommandContext, Currency};
use vextrus_order_to_cash::accounting::LedgerLine;
use vextrus_order_to_cash::invariants::{
    OrderRecord, SagaRecord, SagaState, SystemSnapshot, Violation, check,
};
use vextrus_order_to_cash::sales::{OrderCommand, OrderLine, OrderStatus, Sales};

/// Drives one order to completion and one to full compensation by hand,
/// through the participants, and returns the snapshot.
async fn clean_snapshot() -> SystemSnapshot {
    let w = world().await;
    let sales = Sales::new(InMemoryEventStore::new());
    let ctx = CommandContext::new();
    w.inventory
        .receive(&key("po"), line("A", 10))
        .await
        .unwrap();
    for (id, complete) in [("done", true), ("undone", false)] {
        let o = order(id);
        let k = |s: &str| key(&format!("{id}/{s}"));
        let place = OrderCommand::Place {
            customer: "c".into(),
            currency: Currency::USD,
            lines: vec![OrderLine {
                sku: sku("A"),
                quantity: vextrus_kernel::Quantity::new(2).unwrap(),
                unit_price: usd(150),
            }],
        };
        sales.execute(&o, place, &ctx).await.unwrap();
        sales
            .execute(&o, OrderCommand::Validate, &ctx)
            .await
            .unwrap();
        w.inventory
            .reserve(&k("reserve"), &o, vec![line("A", 2)])
            .await
            .unwrap();
        w.payment
            .authorize(&k("authorize"), &o, usd(300))
            .await
            .unwrap();
        w.shipping
            .create(&k("ship"), &o, vec![line("A", 2)])
            .await
            .unwrap();
        w.inventory.ship(&k("dispatch"), &o).await.unwrap();
        w.payment.capture(&k("capture"), &o).await.unwrap();
        w.accounting
            .post_invoice(&k("invoice"), &o, usd(300))
            .await
            .unwrap();
        if complete {
            let marks = vec![
                OrderCommand::MarkReserved,
                OrderCommand::MarkAuthorized {
                    payment_id: "p".into(),
                },
                OrderCommand::MarkShipped {
                    shipment_id: "s".into(),
                },
                OrderCommand::MarkCaptured,
                OrderCommand::MarkInvoiced {
                    entry_id: "e".into(),
                },
                OrderCommand::Complete,
            ];
            sales.execute_all(&o, marks, &ctx).await.unwrap();
        } else {
            // Compensate everything, in reverse order.
            w.accounting
                .reverse_invoice(&k("uninvoice"), &o)
                .await
                .unwrap();
            w.payment.refund(&k("refund"), &o).await.unwrap();
            w.inventory.release(&k("return"), &o).await.unwrap();
            w.shipping.cancel(&k("unship"), &o).await.unwrap();
            w.payment.void(&k("void"), &o).await.unwrap();
            w.inventory.release(&k("release"), &o).await.unwrap();
            let cancel = OrderCommand::Cancel {
                reason: "test".into(),
            };
            sales.execute(&o, cancel, &ctx).await.unwrap();
        }
    }
    let sagas = vec![
        SagaRecord {
            saga_id: "s1".into(),
            order_id: "done".into(),
            state: SagaState::Completed,
        },
        SagaRecord {
            saga_id: "s2".into(),
            order_id: "undone".into(),
            state: SagaState::Compensated,
        },
    ];
    SystemSnapshot::collect(
        sagas,
        &[order("done"), order("undone")],
        &sales,
        &w.inventory,
        &w.payment,
        &w.shipping,
        &w.accounting,
    )
    .await
    .unwrap()
}

fn only_violation(snapshot: &SystemSnapshot) -> Violation {
    let report = check(snapshot);
    assert_eq!(report.violations.len(), 1, "{report}");
    report.violations[0].clone()
}

#[tokio::test]
async fn clean_data_passes() {
    let s = clean_snapshot().await;
    let report = check(&s);
    assert!(report.is_ok(), "{report}");
    assert_eq!(
        (report.sagas, report.orders, report.skus, report.payments),
        (2, 2, 1, 2)
    );
    assert_eq!(report.entries, 3); // two invoices and one reversal
    assert!(report.to_string().ends_with("all hold"));
    let statuses: Vec<OrderStatus> = s.orders.iter().map(|o| o.status).collect();
    assert_eq!(statuses, [OrderStatus::Completed, OrderStatus::Cancelled]);
}

#[tokio::test]
async fn a_saga_not_terminal_is_caught() {
    let mut s = clean_snapshot().await;
    s.sagas[1].state = SagaState::CompensationFailed;
    assert!(matches!(
        only_violation(&s),
        Violation::SagaNotTerminal { .. }
    ));
    s.sagas[1].state = SagaState::InProgress("Running at capture_payment".into());
    assert!(matches!(
        only_violation(&s),
        Violation::SagaNotTerminal { .. }
    ));
}

#[tokio::test]
async fn lost_or_invented_stock_is_caught() {
    let mut s = clean_snapshot().await;
    s.stock[0].on_hand -= 1;
    assert!(matches!(
        only_violation(&s),
        Violation::StockNotConserved { .. }
    ));

    // A counter that moved without its reservation.
    let mut s = clean_snapshot().await;
    s.stock[0].on_hand -= 1;
    s.stock[0].reserved += 1;
    assert!(matches!(
        only_violation(&s),
        Violation::StockCounterMismatch { ref counter, .. } if counter == "reserved"
    ));
}

#[tokio::test]
async fn a_leaked_reservation_is_caught() {
    // The cancelled order still holds its reservation.
    let mut s = clean_snapshot().await;
    let r = s
        .reservations
        .iter_mut()
        .find(|r| r.order_id == "undone")
        .unwrap();
    r.state = "reserved".into();
    let q = r.quantity;
    s.stock[0].on_hand -= q;
    s.stock[0].reserved += q;
    assert!(matches!(
        only_violation(&s),
        Violation::LeakedReservation {
            order_status: OrderStatus::Cancelled,
            ..
        }
    ));

    // The completed order's stock never left.
    let mut s = clean_snapshot().await;
    let r = s
        .reservations
        .iter_mut()
        .find(|r| r.order_id == "done")
        .unwrap();
    r.state = "reserved".into();
    let q = r.quantity;
    s.stock[0].shipped -= q;
    s.stock[0].reserved += q;
    assert!(matches!(
        only_violation(&s),
        Violation::LeakedReservation {
            order_status: OrderStatus::Completed,
            ..
        }
    ));
}

#[tokio::test]
async fn an_unbalanced_ledger_is_caught() {
    let mut s = clean_snapshot().await;
    let revenue = s
        .ledger
        .iter_mut()
        .find(|l| l.account == "revenue" && l.kind == "invoice" && l.order_id == "done")
        .unwrap();
    revenue.credit_minor -= 1;
    let report = check(&s);
    assert!(
        report
            .violations
            .iter()
            .any(|v| matches!(v, Violation::EntryUnbalanced { .. })),
        "{report}"
    );
    assert!(
        report
            .violations
            .iter()
            .any(|v| matches!(v, Violation::LedgerUnbalanced { .. })),
        "{report}"
    );

    // Balanced per entry overall but not within one currency.
    let mut s = clean_snapshot().await;
    let receivable = s
        .ledger
        .iter_mut()
        .find(|l| l.account == "receivable" && l.kind == "invoice" && l.order_id == "done")
        .unwrap();
    receivable.currency = "EUR".into();
    let report = check(&s);
    assert!(
        report.violations.iter().any(
            |v| matches!(v, Violation::LedgerUnbalanced { currency, .. } if currency == "EUR")
        ),
        "{report}"
    );
}

#[tokio::test]
async fn receivables_that_disagree_with_captured_payments_are_caught() {
    // A capture that was never invoiced.
    let mut s = clean_snapshot().await;
    let p = s
        .payments
        .iter_mut()
        .find(|p| p.order_id == "undone")
        .unwrap();
    p.state = "captured".into();
    p.refunded_minor = 0;
    s.shipments
        .iter_mut()
        .find(|x| x.order_id == "undone")
        .unwrap()
        .state = "created".into();
    assert!(matches!(
        only_violation(&s),
        Violation::ReceivableMismatch {
            receivable: 300,
            captured_unsettled: 600,
            ..
        }
    ));

    // A settlement recorded by accounting but not by payment.
    let mut s = clean_snapshot().await;
    for (account, debit, credit) in [("cash", 300, 0), ("receivable", 0, 300)] {
        s.ledger.push(LedgerLine {
            entry_id: "je-settle".into(),
            order_id: "done".into(),
            kind: "settlement".into(),
            reverses: None,
            account: account.into(),
            currency: "USD".into(),
            debit_minor: debit,
            credit_minor: credit,
        });
    }
    assert!(matches!(
        only_violation(&s),
        Violation::ReceivableMismatch { receivable: 0, .. }
    ));
}

#[tokio::test]
async fn a_capture_without_a_shipment_is_caught() {
    let mut s = clean_snapshot().await;
    s.shipments.retain(|x| x.order_id != "done");
    assert!(matches!(
        only_violation(&s),
        Violation::CaptureWithoutShipment {
            shipment_state: None,
            ..
        }
    ));
    let mut s = clean_snapshot().await;
    s.shipments
        .iter_mut()
        .find(|x| x.order_id == "done")
        .unwrap()
        .state = "cancelled".into();
    assert!(matches!(
        only_violation(&s),
        Violation::CaptureWithoutShipment { .. }
    ));
}

#[tokio::test]
async fn a_completed_order_without_its_invoice_is_caught() {
    // The invoice was reversed (and the receivable with it).
    let mut s = clean_snapshot().await;
    let undone_reversal: Vec<LedgerLine> = s
        .ledger
        .iter()
        .filter(|l| l.kind == "reversal")
        .cloned()
        .collect();
    let invoice_id = s
        .ledger
        .iter()
        .find(|l| l.kind == "invoice" && l.order_id == "done")
        .unwrap()
        .entry_id
        .clone();
    for mut l in undone_reversal {
        l.entry_id = "je-rev-done".into();
        l.order_id = "done".into();
        l.reverses = Some(invoice_id.clone());
        s.ledger.push(l);
    }
    // Keep receivables consistent so that only the invoice check fires.
    s.payments
        .iter_mut()
        .find(|p| p.order_id == "done")
        .unwrap()
        .settled_minor = 300;
    s.payments
        .iter_mut()
        .find(|p| p.order_id == "done")
        .unwrap()
        .state = "settled".into();
    assert!(matches!(
        only_violation(&s),
        Violation::CompletedWithoutInvoice { .. }
    ));

    // An invoice for the wrong amount.
    let mut s = clean_snapshot().await;
    s.orders[0] = OrderRecord {
        total: Some(usd(301)),
        ..s.orders[0].clone()
    };
    let v = only_violation(&s);
    assert!(
        matches!(v, Violation::CompletedWithoutInvoice { .. }),
        "{v}"
    );
    assert!(v.to_string().contains("total"));
}
