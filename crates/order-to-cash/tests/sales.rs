//! The Order aggregate through EventSourcedRepository on SQLite.

use vextrus_core::{EventReader, StreamId};
use vextrus_kernel::{
    AggregateId, CommandContext, Currency, ErrorKind, HasErrorKind, Money, Quantity, Sku,
};
use vextrus_order_to_cash::Error;
use vextrus_order_to_cash::sales::{OrderCommand, OrderError, OrderLine, OrderStatus, Sales};
use vextrus_sqlite::SqliteEventStore;

fn line(sku: &str, n: i64, price: Money) -> OrderLine {
    OrderLine {
        sku: Sku::new(sku).unwrap(),
        quantity: Quantity::new(n).unwrap(),
        unit_price: price,
    }
}

fn place(lines: Vec<OrderLine>) -> OrderCommand {
    OrderCommand::Place {
        customer: "customer-1".into(),
        currency: Currency::BDT,
        lines,
    }
}

#[tokio::test]
async fn an_order_goes_through_every_step_and_survives_a_reload() {
    let store = SqliteEventStore::temporary().await.unwrap();
    let sales = Sales::new(store.clone());
    let id = AggregateId::new("o-1").unwrap();
    let ctx = CommandContext::new();
    let bdt = |m| Money::from_minor(m, Currency::BDT);
    sales
        .execute(
            &id,
            place(vec![line("A", 2, bdt(1_050)), line("B", 1, bdt(99))]),
            &ctx,
        )
        .await
        .unwrap();
    let root = sales
        .execute(&id, OrderCommand::Validate, &ctx)
        .await
        .unwrap();
    assert_eq!(root.state().total().unwrap(), bdt(2_199));

    // Out of order: refused, nothing written.
    let err = sales
        .execute(&id, OrderCommand::MarkCaptured, &ctx)
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        Error::Order(OrderError::IllegalTransition { .. })
    ));
    assert_eq!(err.kind(), ErrorKind::Validation);

    let root = sales
        .execute_all(
            &id,
            vec![
                OrderCommand::MarkReserved,
                OrderCommand::MarkAuthorized {
                    payment_id: "pay-1".into(),
                },
                OrderCommand::MarkShipped {
                    shipment_id: "shp-1".into(),
                },
                OrderCommand::MarkCaptured,
                OrderCommand::MarkInvoiced {
                    entry_id: "je-1".into(),
                },
                OrderCommand::Complete,
            ],
            &ctx,
        )
        .await
        .unwrap();
    assert_eq!(root.state().status, OrderStatus::Completed);
    assert_eq!(root.version(), 8);

    // Redelivered steps change nothing; a completed order cannot be cancelled.
    let again = sales
        .execute(
            &id,
            OrderCommand::MarkShipped {
                shipment_id: "shp-1".into(),
            },
            &ctx,
        )
        .await
        .unwrap();
    assert_eq!(again.version(), 8);
    assert!(
        sales
            .execute(
                &id,
                OrderCommand::Cancel {
                    reason: "late".into()
                },
                &ctx
            )
            .await
            .is_err()
    );

    let stream = StreamId::new("order-o-1").unwrap();
    assert_eq!(store.stream_version(&stream).await.unwrap(), Some(8));

    let reloaded = Sales::new(store).load(&id).await.unwrap().unwrap();
    assert_eq!(reloaded.state(), root.state());
    assert_eq!(reloaded.state().payment_id.as_deref(), Some("pay-1"));
}

#[tokio::test]
async fn validation_rejects_broken_orders_and_cancel_is_final() {
    let store = SqliteEventStore::temporary().await.unwrap();
    let sales = Sales::new(store);
    let ctx = CommandContext::new();
    let cases = [
        ("empty", vec![]),
        (
            "mixed",
            vec![line("A", 1, Money::from_minor(100, Currency::USD))],
        ),
        (
            "zero",
            vec![line("A", 0, Money::from_minor(100, Currency::BDT))],
        ),
        (
            "free",
            vec![line("A", 1, Money::from_minor(0, Currency::BDT))],
        ),
        (
            "huge",
            vec![line("A", 1, Money::from_major(2_000_000, Currency::BDT))],
        ),
    ];
    for (name, lines) in cases {
        let id = AggregateId::new(name).unwrap();
        sales.execute(&id, place(lines), &ctx).await.unwrap();
        let err = sales
            .execute(&id, OrderCommand::Validate, &ctx)
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Order(OrderError::Rejected(_))),
            "{name}: {err}"
        );
        let root = sales
            .execute(
                &id,
                OrderCommand::Cancel {
                    reason: "rejected".into(),
                },
                &ctx,
            )
            .await
            .unwrap();
        assert_eq!(root.state().status, OrderStatus::Cancelled);
        assert_eq!(root.state().cancelled_from, Some(OrderStatus::Placed));
        assert!(
            sales
                .execute(&id, OrderCommand::Validate, &ctx)
                .await
                .is_err()
        );
    }
    // Commands on an unknown order: not found.
    let err = sales
        .execute(
            &AggregateId::new("nope").unwrap(),
            OrderCommand::Validate,
            &ctx,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    // Placing the same order twice is harmless; placing another under its id is refused.
    let id = AggregateId::new("twice").unwrap();
    let lines = vec![line("A", 1, Money::from_minor(100, Currency::BDT))];
    sales
        .execute(&id, place(lines.clone()), &ctx)
        .await
        .unwrap();
    assert_eq!(
        sales
            .execute(&id, place(lines), &ctx)
            .await
            .unwrap()
            .version(),
        1
    );
    assert!(sales.execute(&id, place(vec![]), &ctx).await.is_err());
}
