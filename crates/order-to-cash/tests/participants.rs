//! Each participant's commands and compensations, idempotency, and
//! injected failures, on SQLite.

mod support;

use std::sync::Arc;

use support::*;
use vextrus_core::saga::{ReplyOutcome, SagaCommand, SagaId, StepKind, idempotency_key};
use vextrus_core::transport::InboundMessage;
use vextrus_kernel::{Currency, ErrorKind, HasErrorKind};
use vextrus_order_to_cash::accounting::{Account, AccountingReply};
use vextrus_order_to_cash::inventory::InventoryReply;
use vextrus_order_to_cash::participant::{Delivered, deliver};
use vextrus_order_to_cash::payment::PaymentReply;
use vextrus_order_to_cash::shipping::ShippingReply;
use vextrus_order_to_cash::{Error, FaultConfig, Participant};

async fn stocked(w: &World) {
    w.inventory
        .receive(&key("po-a"), line("A", 10))
        .await
        .unwrap();
    w.inventory
        .receive(&key("po-b"), line("B", 3))
        .await
        .unwrap();
}

#[tokio::test]
async fn reserve_is_all_or_nothing_and_release_and_ship_move_stock() {
    let w = world().await;
    stocked(&w).await;

    // B has 3; asking for 4 of B and 2 of A reserves nothing at all.
    let reply = w
        .inventory
        .reserve(&key("o1/r"), &order("o1"), vec![line("A", 2), line("B", 4)])
        .await
        .unwrap();
    assert_eq!(
        reply,
        InventoryReply::OutOfStock {
            sku: sku("B"),
            requested: vextrus_kernel::Quantity::new(4).unwrap(),
            available: vextrus_kernel::Quantity::new(3).unwrap(),
            injected: false,
        }
    );
    let a = w.inventory.stock_level(&sku("A")).await.unwrap().unwrap();
    assert_eq!((a.on_hand, a.reserved), (10, 0));
    assert!(w.inventory.reservations().await.unwrap().is_empty());

    // Duplicate SKUs add up.
    let reply = w
        .inventory
        .reserve(
            &key("o2/r"),
            &order("o2"),
            vec![line("A", 2), line("A", 3), line("B", 1)],
        )
        .await
        .unwrap();
    assert_eq!(
        reply,
        InventoryReply::Reserved {
            lines: vec![line("A", 5), line("B", 1)]
        }
    );
    let a = w.inventory.stock_level(&sku("A")).await.unwrap().unwrap();
    assert_eq!((a.initial, a.on_hand, a.reserved, a.shipped), (10, 5, 5, 0));

    // Ship: reserved -> shipped.
    w.inventory.ship(&key("o2/s"), &order("o2")).await.unwrap();
    let a = w.inventory.stock_level(&sku("A")).await.unwrap().unwrap();
    assert_eq!((a.on_hand, a.reserved, a.shipped), (5, 0, 5));

    // Release after shipping brings the goods back.
    let reply = w
        .inventory
        .release(&key("o2/x"), &order("o2"))
        .await
        .unwrap();
    assert_eq!(
        reply,
        InventoryReply::Released {
            released: vec![],
            returned: vec![line("A", 5), line("B", 1)]
        }
    );
    for level in w.inventory.stock_levels().await.unwrap() {
        assert_eq!(level.on_hand, level.initial, "{level:?}");
        assert_eq!(level.reserved + level.shipped, 0);
    }
    // A released order cannot be reserved or shipped again.
    let err = w
        .inventory
        .reserve(&key("o2/r2"), &order("o2"), vec![line("A", 1)])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Validation);
    assert!(w.inventory.ship(&key("o2/s2"), &order("o2")).await.is_err());

    // Releasing an order that never reserved is a harmless no-op.
    let reply = w
        .inventory
        .release(&key("o9/x"), &order("o9"))
        .await
        .unwrap();
    assert_eq!(
        reply,
        InventoryReply::Released {
            released: vec![],
            returned: vec![]
        }
    );
}

#[tokio::test]
async fn same_key_twice_has_one_effect_and_the_identical_reply() {
    let w = world().await;
    stocked(&w).await;
    let k = key("saga-1/reserve/action");
    let first = w
        .inventory
        .reserve(&k, &order("o1"), vec![line("A", 4)])
        .await
        .unwrap();
    let second = w
        .inventory
        .reserve(&k, &order("o1"), vec![line("A", 4)])
        .await
        .unwrap();
    assert_eq!(first, second);
    let a = w.inventory.stock_level(&sku("A")).await.unwrap().unwrap();
    assert_eq!((a.on_hand, a.reserved), (6, 4));

    // A stored business failure is replayed too, even after stock arrives.
    let k2 = key("saga-2/reserve/action");
    let refused = w
        .inventory
        .reserve(&k2, &order("o2"), vec![line("B", 9)])
        .await
        .unwrap();
    assert!(matches!(refused, InventoryReply::OutOfStock { .. }));
    w.inventory
        .receive(&key("po-b2"), line("B", 20))
        .await
        .unwrap();
    let again = w
        .inventory
        .reserve(&k2, &order("o2"), vec![line("B", 9)])
        .await
        .unwrap();
    assert_eq!(again, refused);

    // The same key for another request is refused, and changes nothing.
    let err = w
        .inventory
        .reserve(&k, &order("o1"), vec![line("A", 5)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::KeyReused {
                participant: "inventory",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Conflict);
    let a = w.inventory.stock_level(&sku("A")).await.unwrap().unwrap();
    assert_eq!((a.on_hand, a.reserved), (6, 4));

    // Payment, shipping and accounting honour keys the same way.
    let pk = key("saga-1/authorize/action");
    let p1 = w
        .payment
        .authorize(&pk, &order("o1"), usd(500))
        .await
        .unwrap();
    let p2 = w
        .payment
        .authorize(&pk, &order("o1"), usd(500))
        .await
        .unwrap();
    assert_eq!(p1, p2);
    let ck = key("saga-1/capture/action");
    let c1 = w.payment.capture(&ck, &order("o1")).await.unwrap();
    assert_eq!(w.payment.capture(&ck, &order("o1")).await.unwrap(), c1);
    let sk = key("saga-1/ship/action");
    let s1 = w
        .shipping
        .create(&sk, &order("o1"), vec![line("A", 4)])
        .await
        .unwrap();
    assert_eq!(
        w.shipping
            .create(&sk, &order("o1"), vec![line("A", 4)])
            .await
            .unwrap(),
        s1
    );
    assert_eq!(w.shipping.shipments().await.unwrap().len(), 1);
    let ik = key("saga-1/invoice/action");
    let i1 = w
        .accounting
        .post_invoice(&ik, &order("o1"), usd(500))
        .await
        .unwrap();
    assert_eq!(
        w.accounting
            .post_invoice(&ik, &order("o1"), usd(500))
            .await
            .unwrap(),
        i1
    );
    assert_eq!(
        w.accounting
            .balance(Account::Receivable, Currency::USD)
            .await
            .unwrap(),
        500
    );
    assert_eq!(w.accounting.idempotency_keys().await.unwrap(), 1);
}

#[tokio::test]
async fn concurrent_requests_with_one_key_run_once() {
    let w = Arc::new(world().await);
    stocked(&w).await;
    let k = key("saga-c/reserve/action");
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let w = w.clone();
        let k = k.clone();
        tasks.push(tokio::spawn(async move {
            w.inventory
                .reserve(&k, &order("oc"), vec![line("A", 3)])
                .await
                .unwrap()
        }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    assert!(replies.windows(2).all(|p| p[0] == p[1]));
    let a = w.inventory.stock_level(&sku("A")).await.unwrap().unwrap();
    assert_eq!((a.on_hand, a.reserved), (7, 3));
}

#[tokio::test]
async fn payment_authorize_capture_void_refund_settle() {
    let w = world().await;
    let o = order("o1");
    let auth = w
        .payment
        .authorize(&key("a"), &o, usd(1_000))
        .await
        .unwrap();
    let PaymentReply::Authorized { payment_id, amount } = auth else {
        panic!("{auth:?}")
    };
    assert!(payment_id.starts_with("pay-"));
    assert_eq!(amount, usd(1_000));

    // Void drops the hold; voiding again is a no-op; a voided payment cannot be captured.
    assert_eq!(
        w.payment.void(&key("v"), &o).await.unwrap(),
        PaymentReply::Voided { dropped: true }
    );
    assert_eq!(
        w.payment.void(&key("v2"), &o).await.unwrap(),
        PaymentReply::Voided { dropped: false }
    );
    assert!(w.payment.capture(&key("c"), &o).await.is_err());

    // Capture then refund; refunding with nothing captured is a no-op.
    let o2 = order("o2");
    w.payment
        .authorize(&key("a2"), &o2, usd(250))
        .await
        .unwrap();
    assert!(matches!(
        w.payment.capture(&key("c2"), &o2).await.unwrap(),
        PaymentReply::Captured { amount, .. } if amount == usd(250)
    ));
    // Voiding a captured payment is refused: refund comes first.
    assert!(w.payment.void(&key("v3"), &o2).await.is_err());
    assert_eq!(
        w.payment.refund(&key("r2"), &o2).await.unwrap(),
        PaymentReply::Refunded {
            amount: Some(usd(250))
        }
    );
    assert_eq!(
        w.payment.refund(&key("r9"), &order("o9")).await.unwrap(),
        PaymentReply::Refunded { amount: None }
    );
    let rec = w.payment.record(&o2).await.unwrap().unwrap();
    assert_eq!(
        (rec.state.as_str(), rec.captured_minor, rec.refunded_minor),
        ("refunded", 250, 250)
    );

    // Capture without an authorization: not found.
    let err = w
        .payment
        .capture(&key("c9"), &order("o9"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);

    // Settle.
    let o3 = order("o3");
    w.payment.authorize(&key("a3"), &o3, usd(75)).await.unwrap();
    w.payment.capture(&key("c3"), &o3).await.unwrap();
    assert_eq!(
        w.payment.settle(&key("s3"), &o3).await.unwrap(),
        PaymentReply::Settled { amount: usd(75) }
    );

    // Above the limit: declined (a reply, not an error), nothing held.
    let big = usd(vextrus_order_to_cash::payment::Payment::AUTHORIZATION_LIMIT_MINOR + 1);
    assert!(matches!(
        w.payment
            .authorize(&key("a4"), &order("o4"), big)
            .await
            .unwrap(),
        PaymentReply::Declined { .. }
    ));
    assert!(w.payment.record(&order("o4")).await.unwrap().is_none());
    assert_eq!(w.payment.declines().await.unwrap(), 1);
    // Negative or zero amounts are invalid input.
    let err = w
        .payment
        .authorize(&key("a5"), &order("o5"), usd(0))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Validation);
}

#[tokio::test]
async fn shipping_create_cancel_and_refusal() {
    let w = world_with(only(FaultConfig {
        shipping_failure_rate: 1.0,
        ..FaultConfig::none()
    }))
    .await;
    let reply = w
        .shipping
        .create(&key("s1"), &order("o1"), vec![line("A", 1)])
        .await
        .unwrap();
    assert!(matches!(reply, ShippingReply::Refused { .. }));
    assert!(w.shipping.shipments().await.unwrap().is_empty());
    assert_eq!(
        w.shipping.cancel(&key("x1"), &order("o1")).await.unwrap(),
        ShippingReply::Cancelled { cancelled: false }
    );

    let w = world().await;
    let ShippingReply::Created { shipment_id } = w
        .shipping
        .create(&key("s1"), &order("o1"), vec![line("A", 1)])
        .await
        .unwrap()
    else {
        panic!("not created")
    };
    // Another key for the same order finds the same shipment.
    assert_eq!(
        w.shipping
            .create(&key("s1b"), &order("o1"), vec![line("A", 1)])
            .await
            .unwrap(),
        ShippingReply::Created {
            shipment_id: shipment_id.clone()
        }
    );
    assert_eq!(
        w.shipping.cancel(&key("x1"), &order("o1")).await.unwrap(),
        ShippingReply::Cancelled { cancelled: true }
    );
    assert!(
        w.shipping
            .create(&key("s1c"), &order("o1"), vec![line("A", 1)])
            .await
            .is_err()
    );
    assert!(
        w.shipping
            .create(&key("s2"), &order("o2"), vec![])
            .await
            .is_err()
    );
}

#[tokio::test]
async fn ledger_balances_and_reversals_undo_invoices() {
    let w = world().await;
    let o = order("o1");
    let AccountingReply::Invoiced { entry_id, .. } = w
        .accounting
        .post_invoice(&key("i1"), &o, usd(1_234))
        .await
        .unwrap()
    else {
        panic!()
    };
    // Another key for the same order: the same invoice, not a second one.
    assert_eq!(
        w.accounting
            .post_invoice(&key("i1b"), &o, usd(1_234))
            .await
            .unwrap(),
        AccountingReply::Invoiced {
            entry_id: entry_id.clone(),
            amount: usd(1_234)
        }
    );
    assert!(
        w.accounting
            .post_invoice(&key("i1c"), &o, usd(1))
            .await
            .is_err()
    );
    w.accounting
        .record_settlement(&key("st1"), &o, usd(1_234))
        .await
        .unwrap();
    assert_eq!(
        w.accounting
            .balance(Account::Cash, Currency::USD)
            .await
            .unwrap(),
        1_234
    );
    assert_eq!(
        w.accounting
            .balance(Account::Receivable, Currency::USD)
            .await
            .unwrap(),
        0
    );

    let o2 = order("o2");
    w.accounting
        .post_invoice(&key("i2"), &o2, usd(500))
        .await
        .unwrap();
    let AccountingReply::Reversed { entry_id: Some(_) } = w
        .accounting
        .reverse_invoice(&key("rv2"), &o2)
        .await
        .unwrap()
    else {
        panic!()
    };
    // Reversing again, or reversing nothing, is a no-op.
    assert_eq!(
        w.accounting
            .reverse_invoice(&key("rv2b"), &o2)
            .await
            .unwrap(),
        AccountingReply::Reversed { entry_id: None }
    );
    assert!(
        w.accounting
            .post_invoice(&key("i2b"), &o2, usd(500))
            .await
            .is_err()
    );
    assert_eq!(
        w.accounting
            .balance(Account::Revenue, Currency::USD)
            .await
            .unwrap(),
        -1_234
    );

    let lines = w.accounting.lines().await.unwrap();
    let debits: i64 = lines.iter().map(|l| l.debit_minor).sum();
    let credits: i64 = lines.iter().map(|l| l.credit_minor).sum();
    assert_eq!(debits, credits);
    assert_eq!(lines.len(), 8);
}

#[tokio::test]
async fn an_injected_crash_writes_nothing_and_a_redelivery_succeeds() {
    let w = world_with(only(FaultConfig {
        crash_rate: 1.0,
        ..FaultConfig::none()
    }))
    .await;
    let err = w
        .payment
        .authorize(&key("a"), &order("o1"), usd(10))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InjectedCrash { .. }));
    assert_eq!(err.kind(), ErrorKind::Transient);
    assert!(w.payment.record(&order("o1")).await.unwrap().is_none());
    assert_eq!(w.payment.idempotency_keys().await.unwrap(), 0);

    // At 50% some delivery gets through, and only one effect is recorded.
    let w = world_with(only(FaultConfig {
        crash_rate: 0.5,
        ..FaultConfig::none()
    }))
    .await;
    let mut reply = None;
    for _ in 0..40 {
        if let Ok(r) = w.payment.authorize(&key("a"), &order("o1"), usd(10)).await {
            reply = Some(r);
            break;
        }
    }
    assert!(matches!(reply, Some(PaymentReply::Authorized { .. })));
    assert_eq!(w.payment.idempotency_keys().await.unwrap(), 1);
}

#[tokio::test]
async fn injected_business_failures_are_stored_replies() {
    let w = world_with(only(FaultConfig {
        decline_rate: 1.0,
        out_of_stock_rate: 1.0,
        ..FaultConfig::none()
    }))
    .await;
    stocked(&w).await;
    let reply = w
        .inventory
        .reserve(&key("r"), &order("o1"), vec![line("A", 1)])
        .await
        .unwrap();
    assert!(matches!(
        reply,
        InventoryReply::OutOfStock { injected: true, .. }
    ));
    let reply = w
        .payment
        .authorize(&key("a"), &order("o1"), usd(10))
        .await
        .unwrap();
    assert!(matches!(reply, PaymentReply::Declined { .. }));
    assert_eq!(w.inventory.idempotency_keys().await.unwrap(), 3);
}

#[tokio::test]
async fn delayed_replies_still_commit_first() {
    let w = world_with(only(FaultConfig {
        timeout_rate: 1.0,
        timeout_delay: std::time::Duration::from_millis(50),
        ..FaultConfig::none()
    }))
    .await;
    let started = std::time::Instant::now();
    w.shipping
        .create(&key("s"), &order("o1"), vec![line("A", 1)])
        .await
        .unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_millis(50));
    // Only the first reply is held.
    let started = std::time::Instant::now();
    w.shipping
        .create(&key("s"), &order("o1"), vec![line("A", 1)])
        .await
        .unwrap();
    assert!(started.elapsed() < std::time::Duration::from_millis(50));
    assert_eq!(w.shipping.shipments().await.unwrap().len(), 1);
}

#[tokio::test]
async fn migrations_are_idempotent() {
    let w = world().await;
    assert_eq!(w.inventory.migrate().await.unwrap(), 0);
    assert_eq!(w.accounting.migrate().await.unwrap(), 0);
}

/// How many units of `sku` are reserved.
async fn reserved(w: &World, s: &str) -> i64 {
    w.inventory
        .stock_level(&sku(s))
        .await
        .unwrap()
        .unwrap()
        .reserved
}

/// The key a saga's step gets from the orchestrator.
fn step_key(saga: SagaId, step: usize, kind: StepKind) -> vextrus_order_to_cash::IdempotencyKey {
    vextrus_order_to_cash::IdempotencyKey::new(idempotency_key(saga, step, kind)).unwrap()
}

#[tokio::test]
async fn a_compensation_that_finds_nothing_fences_its_late_action() {
    let w = world().await;
    stocked(&w).await;
    let saga = SagaId::new();
    let o = order("o1");

    // Step 1 (reserve) timed out; its compensation arrives first, finds no
    // reservation, and fences the action: the late reserve takes nothing.
    w.inventory
        .release(&step_key(saga, 1, StepKind::Compensation), &o)
        .await
        .unwrap();
    for _ in 0..2 {
        let err = w
            .inventory
            .reserve(&step_key(saga, 1, StepKind::Action), &o, vec![line("A", 2)])
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Fenced { .. }), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Conflict);
    }
    let a = w.inventory.stock_level(&sku("A")).await.unwrap().unwrap();
    assert_eq!((a.on_hand, a.reserved), (10, 0));
    assert!(w.inventory.reservations().await.unwrap().is_empty());

    // Payment: authorized (step 2); the capture (step 5) timed out and its
    // refund found nothing captured; the late capture is refused, so the void
    // of step 2 still drops the hold (without the fence it was refused, and
    // the saga ended CompensationFailed with the money taken).
    w.payment
        .authorize(&step_key(saga, 2, StepKind::Action), &o, usd(500))
        .await
        .unwrap();
    assert_eq!(
        w.payment
            .refund(&step_key(saga, 5, StepKind::Compensation), &o)
            .await
            .unwrap(),
        PaymentReply::Refunded { amount: None }
    );
    let err = w
        .payment
        .capture(&step_key(saga, 5, StepKind::Action), &o)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Fenced { .. }), "{err:?}");
    assert_eq!(
        w.payment
            .void(&step_key(saga, 2, StepKind::Compensation), &o)
            .await
            .unwrap(),
        PaymentReply::Voided { dropped: true }
    );
    let rec = w.payment.record(&o).await.unwrap().unwrap();
    assert_eq!((rec.state.as_str(), rec.captured_minor), ("voided", 0));

    // An action that ran first is not fenced: its compensation undoes it.
    let o2 = order("o2");
    let saga2 = SagaId::new();
    w.inventory
        .reserve(
            &step_key(saga2, 1, StepKind::Action),
            &o2,
            vec![line("A", 3)],
        )
        .await
        .unwrap();
    assert_eq!(reserved(&w, "A").await, 3);
    w.inventory
        .release(&step_key(saga2, 1, StepKind::Compensation), &o2)
        .await
        .unwrap();
    assert_eq!(reserved(&w, "A").await, 0);
    // Fences are not counted as keys: 2 receipts + release, authorize,
    // refund, void + reserve, release.
    assert_eq!(w.inventory.idempotency_keys().await.unwrap(), 5);
    assert_eq!(w.payment.idempotency_keys().await.unwrap(), 3);
}

#[tokio::test]
async fn a_fenced_action_is_answered_with_a_business_failure() {
    let w = world().await;
    // The inbox and the reply outbox.
    vextrus_order_to_cash::participant::ReplyOutbox::open(w.payment.database())
        .await
        .unwrap();
    let saga = SagaId::new();
    let o = order("o1");
    w.payment
        .authorize(&step_key(saga, 2, StepKind::Action), &o, usd(500))
        .await
        .unwrap();
    w.payment
        .refund(&step_key(saga, 5, StepKind::Compensation), &o)
        .await
        .unwrap();
    let command = SagaCommand {
        message_id: uuid::Uuid::now_v7(),
        saga_id: saga,
        saga_type: "order_to_cash".into(),
        step: 5,
        step_name: "capture_payment".into(),
        kind: StepKind::Action,
        attempt: 1,
        idempotency_key: idempotency_key(saga, 5, StepKind::Action),
        destination: "o2c.payment".into(),
        command_type: "payment.capture".into(),
        payload: serde_json::to_value(vextrus_order_to_cash::payment::PaymentCommand::Capture {
            order_id: o.clone(),
        })
        .unwrap(),
    };
    let message = InboundMessage::from_outbound(&command.to_outbound("o2c.replies").unwrap(), 1);
    let delivered = deliver(&w.payment, &message).await.unwrap();
    let Delivered::Replied(reply) = delivered else {
        panic!("{delivered:?}")
    };
    let ReplyOutcome::BusinessFailure(reason) = &reply.outcome else {
        panic!("{reply:?}")
    };
    assert!(reason.contains("compensated before"), "{reason}");
    // Redelivered: the inbox absorbs it.
    assert_eq!(
        deliver(&w.payment, &message).await.unwrap(),
        Delivered::Duplicate
    );
    let rec = w.payment.record(&o).await.unwrap().unwrap();
    assert_eq!((rec.state.as_str(), rec.captured_minor), ("authorized", 0));
}
