//! The `order_to_cash` saga definition and its destinations.
//!
//! | # | step | kind | action | compensation |
//! |---|---|---|---|---|
//! | 0 | `validate_order` | local (Sales) | validate the order (a rejected order is cancelled) | cancel the order |
//! | 1 | `reserve_inventory` | remote (inventory) | reserve every line, or none | release |
//! | 2 | `authorize_payment` | remote (payment) | authorize the total | void |
//! | 3 | `create_shipment` | remote (shipping) | book the shipment | cancel it |
//! | 4 | `dispatch_stock` | remote (inventory) | reserved -> shipped | release (goods come back) |
//! | 5 | `capture_payment` | remote (payment) | capture | refund |
//! | 6 | `post_invoice` | remote (accounting) | debit receivable, credit revenue | reversing entry |
//! | 7 | `complete_order` | local (Sales) | record the steps and complete the order, one append | - |
//!
//! Sales runs in the orchestrator's process (the order service owns its
//! saga), so its steps are local; the other four participants are remote:
//! the orchestrator's saga store queues a `SagaCommand` in its outbox in the
//! transition's commit, a relay publishes it to the participant's
//! destination, the participant handles it in one transaction of its own
//! database (inbox entry + effect + idempotency key + stored reply + the
//! `SagaReply` in its outbox: [`crate::participant::deliver`]), its relay
//! publishes the reply to [`REPLIES`], and the orchestrator's reply consumer
//! ([`crate::node::serve_replies`]) feeds it to the saga, whose store
//! records the reply's id in the transition's commit. [`crate::node`] runs
//! these parts, alone or together, over any broker.
//!
//! Every compensation accepts "nothing to undo", so the compensation of a
//! step whose reply was lost (a timeout) is always safe.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use vextrus_core::saga::{
    Action, RemoteCommand, SagaDefinition, Step, StepContext, StepOutcome, StepRetry,
};
use vextrus_core::{EventAppender, EventReader, SnapshotStore};
use vextrus_kernel::{AggregateId, CommandContext, HasErrorKind, Money};

use crate::accounting::AccountingCommand;
use crate::error::Error;
use crate::faults::FaultInjector;
use crate::inventory::{InventoryCommand, StockLine};
use crate::payment::PaymentCommand;
use crate::sales::{OrderCommand, OrderError, OrderLine, Sales};
use crate::shipping::ShippingCommand;

/// The saga's type name.
pub const SAGA_TYPE: &str = "order_to_cash";
/// The definition's version.
pub const SAGA_VERSION: u32 = 1;
/// Inventory's command destination.
pub const INVENTORY: &str = "o2c.inventory";
/// Payment's command destination.
pub const PAYMENT: &str = "o2c.payment";
/// Shipping's command destination.
pub const SHIPPING: &str = "o2c.shipping";
/// Accounting's command destination.
pub const ACCOUNTING: &str = "o2c.accounting";
/// Where participants send their replies to the orchestrator.
pub const REPLIES: &str = "o2c.replies";
/// The step names, in order.
pub const STEPS: [&str; 8] = [
    "validate_order",
    "reserve_inventory",
    "authorize_payment",
    "create_shipment",
    "dispatch_stock",
    "capture_payment",
    "post_invoice",
    "complete_order",
];

/// The saga's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderToCashData {
    /// The order (already placed in Sales).
    pub order_id: AggregateId,
    /// What it needs from inventory and shipping.
    pub lines: Vec<StockLine>,
    /// Its total, once validated.
    pub total: Option<Money>,
    /// The payment's id, once authorized.
    pub payment_id: Option<String>,
    /// The shipment's id, once booked.
    pub shipment_id: Option<String>,
    /// The invoice's entry id, once posted.
    pub invoice_entry_id: Option<String>,
}

impl OrderToCashData {
    /// The data a saga starts with for an order placed in Sales with
    /// `lines`: what inventory and shipping need of each line, nothing
    /// validated, authorized, shipped or invoiced yet.
    ///
    /// ```
    /// use vextrus_kernel::{AggregateId, Currency, Money, Quantity, Sku};
    /// use vextrus_order_to_cash::saga::OrderToCashData;
    /// use vextrus_order_to_cash::sales::OrderLine;
    ///
    /// let line = OrderLine {
    ///     sku: Sku::new("SKU-0001").unwrap(),
    ///     quantity: Quantity::new(2).unwrap(),
    ///     unit_price: Money::from_minor(1_250, Currency::USD),
    /// };
    /// let data = OrderToCashData::for_order(AggregateId::new("order-1").unwrap(), &[line]);
    /// assert_eq!(data.lines[0].quantity, Quantity::new(2).unwrap());
    /// assert!(data.total.is_none() && data.payment_id.is_none());
    /// ```
    pub fn for_order(order_id: AggregateId, lines: &[OrderLine]) -> Self {
        Self {
            order_id,
            lines: lines
                .iter()
                .map(|l| StockLine {
                    sku: l.sku.clone(),
                    quantity: l.quantity,
                })
                .collect(),
            total: None,
            payment_id: None,
            shipment_id: None,
            invoice_entry_id: None,
        }
    }
}

/// Timeouts and retry budgets of the saga's steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepPolicy {
    /// How long a step waits for its result before it counts as timed out.
    pub timeout: Duration,
    /// Attempts of each action (a timeout or retryable failure uses one).
    pub action_attempts: u32,
    /// Attempts of each compensation.
    pub compensation_attempts: u32,
    /// The first retry's backoff (doubling, at most one second).
    pub backoff: Duration,
}

impl Default for StepPolicy {
    /// 2 s timeout, 5 action attempts, 20 compensation attempts, 50 ms first
    /// backoff.
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            action_attempts: 5,
            compensation_attempts: 20,
            backoff: Duration::from_millis(50),
        }
    }
}

fn payload<T: Serialize>(value: &T) -> Value {
    // Commands are plain data: serializing them cannot fail.
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn remote<C, F>(
    destination: &'static str,
    command_type: &'static str,
    build: F,
) -> Action<OrderToCashData>
where
    C: Serialize,
    F: Fn(&OrderToCashData) -> C + Send + Sync + 'static,
{
    Action::remote(move |d: &OrderToCashData, _ctx: &StepContext| {
        RemoteCommand::new(destination, command_type, payload(&build(d)))
    })
}

fn remote_with<C, F, R>(
    destination: &'static str,
    command_type: &'static str,
    build: F,
    on_reply: R,
) -> Action<OrderToCashData>
where
    C: Serialize,
    F: Fn(&OrderToCashData) -> C + Send + Sync + 'static,
    R: Fn(OrderToCashData, &Value) -> Result<OrderToCashData, String> + Send + Sync + 'static,
{
    Action::remote_with_reply(
        move |d: &OrderToCashData, _ctx: &StepContext| {
            RemoteCommand::new(destination, command_type, payload(&build(d)))
        },
        on_reply,
    )
}

fn reply_field(body: &Value, field: &str) -> Result<String, String> {
    body.get(field)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| format!("reply has no {field}: {body}"))
}

/// Sorts a Sales error into a step outcome.
fn sales_failure<D>(e: Error) -> StepOutcome<D> {
    match e {
        Error::Order(e) => StepOutcome::BusinessFailure(e.to_string()),
        e if e.kind().is_retryable() || e.kind() == vextrus_kernel::ErrorKind::Conflict => {
            StepOutcome::RetryableFailure(e.to_string())
        }
        e => StepOutcome::BusinessFailure(e.to_string()),
    }
}

fn context(ctx: &StepContext) -> CommandContext {
    let mut c = CommandContext::new();
    c.correlation_id = vextrus_kernel::CorrelationId(ctx.saga_id.as_uuid());
    c
}

/// The `order_to_cash` saga over `sales`, with `policy` on every step.
///
/// ```
/// use std::sync::Arc;
/// use vextrus_core::InMemoryEventStore;
/// use vextrus_core::saga::SagaRegistry;
/// use vextrus_order_to_cash::sales::Sales;
/// use vextrus_order_to_cash::saga::{definition, StepPolicy, SAGA_TYPE, STEPS};
///
/// use vextrus_order_to_cash::FaultInjector;
///
/// let sales = Arc::new(Sales::new(InMemoryEventStore::new()));
/// let def = definition(sales, Arc::new(FaultInjector::disabled()), StepPolicy::default());
/// assert_eq!(def.name(), SAGA_TYPE);
/// let names: Vec<&str> = def.steps().iter().map(|s| s.name()).collect();
/// assert_eq!(names, STEPS);
/// assert!(!def.steps()[7].has_compensation());
/// SagaRegistry::new().register(def).unwrap();
/// ```
pub fn definition<S>(
    sales: Arc<Sales<S>>,
    faults: Arc<FaultInjector>,
    policy: StepPolicy,
) -> SagaDefinition<OrderToCashData>
where
    S: EventAppender + EventReader + SnapshotStore + Send + Sync + 'static,
{
    let retry =
        StepRetry::new(policy.action_attempts).backoff(policy.backoff, 2, Duration::from_secs(1));
    let comp_retry = StepRetry::new(policy.compensation_attempts).backoff(
        policy.backoff,
        2,
        Duration::from_secs(1),
    );
    let step = |name: &str, action: Action<OrderToCashData>| {
        Step::new(name, action)
            .timeout(policy.timeout)
            .retry(retry)
            .compensation_retry(comp_retry)
    };

    let validate = {
        let (sales, faults) = (sales.clone(), faults.clone());
        Action::local(move |mut d: OrderToCashData, ctx: StepContext| {
            let (sales, faults) = (sales.clone(), faults.clone());
            async move {
                if faults.forces("sales.validate") {
                    return StepOutcome::BusinessFailure("sales.validate failed (forced)".into());
                }
                let cctx = context(&ctx);
                match sales
                    .execute(&d.order_id, OrderCommand::Validate, &cctx)
                    .await
                {
                    Ok(root) => match root.state().total() {
                        Ok(total) => {
                            d.total = Some(total);
                            StepOutcome::Success(d)
                        }
                        Err(e) => StepOutcome::BusinessFailure(e.to_string()),
                    },
                    Err(Error::Order(OrderError::Rejected(reason))) => {
                        // A rejected order is cancelled here: the saga ends
                        // Failed with nothing to compensate.
                        let cancel = OrderCommand::Cancel {
                            reason: format!("rejected: {reason}"),
                        };
                        match sales.execute(&d.order_id, cancel, &cctx).await {
                            Ok(_) => {
                                StepOutcome::BusinessFailure(format!("order rejected: {reason}"))
                            }
                            Err(e) => sales_failure(e),
                        }
                    }
                    Err(e) => sales_failure(e),
                }
            }
        })
    };
    let cancel = {
        let sales = sales.clone();
        Action::local(move |d: OrderToCashData, ctx: StepContext| {
            let sales = sales.clone();
            async move {
                let command = OrderCommand::Cancel {
                    reason: "saga compensated".to_owned(),
                };
                match sales.execute(&d.order_id, command, &context(&ctx)).await {
                    Ok(_) => StepOutcome::Success(d),
                    Err(e) => sales_failure(e),
                }
            }
        })
    };
    let complete = {
        let (sales, faults) = (sales.clone(), faults.clone());
        Action::local(move |d: OrderToCashData, ctx: StepContext| {
            let (sales, faults) = (sales.clone(), faults.clone());
            async move {
                if faults.forces("sales.complete") {
                    return StepOutcome::BusinessFailure("sales.complete failed (forced)".into());
                }
                let (Some(payment_id), Some(shipment_id), Some(entry_id)) = (
                    d.payment_id.clone(),
                    d.shipment_id.clone(),
                    d.invoice_entry_id.clone(),
                ) else {
                    return StepOutcome::BusinessFailure(
                        "the saga data lacks a payment, shipment or invoice id".into(),
                    );
                };
                let commands = vec![
                    OrderCommand::MarkReserved,
                    OrderCommand::MarkAuthorized { payment_id },
                    OrderCommand::MarkShipped { shipment_id },
                    OrderCommand::MarkCaptured,
                    OrderCommand::MarkInvoiced { entry_id },
                    OrderCommand::Complete,
                ];
                match sales
                    .execute_all(&d.order_id, commands, &context(&ctx))
                    .await
                {
                    Ok(_) => StepOutcome::Success(d),
                    Err(e) => sales_failure(e),
                }
            }
        })
    };

    SagaDefinition::new(SAGA_TYPE, SAGA_VERSION)
        .step(step(STEPS[0], validate).compensate_with(cancel))
        .step(
            step(
                STEPS[1],
                remote(INVENTORY, "inventory.reserve", |d: &OrderToCashData| {
                    InventoryCommand::Reserve {
                        order_id: d.order_id.clone(),
                        lines: d.lines.clone(),
                    }
                }),
            )
            .compensate_with(remote(
                INVENTORY,
                "inventory.release",
                |d: &OrderToCashData| InventoryCommand::Release {
                    order_id: d.order_id.clone(),
                },
            )),
        )
        .step(
            step(
                STEPS[2],
                remote_with(
                    PAYMENT,
                    "payment.authorize",
                    |d: &OrderToCashData| PaymentCommand::Authorize {
                        order_id: d.order_id.clone(),
                        // Validated before this step: the total is set.
                        amount: d
                            .total
                            .unwrap_or_else(|| Money::zero(vextrus_kernel::Currency::XAU)),
                    },
                    |mut d, body| {
                        d.payment_id = Some(reply_field(body, "payment_id")?);
                        Ok(d)
                    },
                ),
            )
            .compensate_with(remote(PAYMENT, "payment.void", |d: &OrderToCashData| {
                PaymentCommand::Void {
                    order_id: d.order_id.clone(),
                }
            })),
        )
        .step(
            step(
                STEPS[3],
                remote_with(
                    SHIPPING,
                    "shipping.create",
                    |d: &OrderToCashData| ShippingCommand::Create {
                        order_id: d.order_id.clone(),
                        items: d.lines.clone(),
                    },
                    |mut d, body| {
                        d.shipment_id = Some(reply_field(body, "shipment_id")?);
                        Ok(d)
                    },
                ),
            )
            .compensate_with(remote(
                SHIPPING,
                "shipping.cancel",
                |d: &OrderToCashData| ShippingCommand::Cancel {
                    order_id: d.order_id.clone(),
                },
            )),
        )
        .step(
            step(
                STEPS[4],
                remote(INVENTORY, "inventory.ship", |d: &OrderToCashData| {
                    InventoryCommand::Ship {
                        order_id: d.order_id.clone(),
                    }
                }),
            )
            .compensate_with(remote(
                INVENTORY,
                "inventory.release",
                |d: &OrderToCashData| InventoryCommand::Release {
                    order_id: d.order_id.clone(),
                },
            )),
        )
        .step(
            step(
                STEPS[5],
                remote(PAYMENT, "payment.capture", |d: &OrderToCashData| {
                    PaymentCommand::Capture {
                        order_id: d.order_id.clone(),
                    }
                }),
            )
            .compensate_with(remote(
                PAYMENT,
                "payment.refund",
                |d: &OrderToCashData| PaymentCommand::Refund {
                    order_id: d.order_id.clone(),
                },
            )),
        )
        .step(
            step(
                STEPS[6],
                remote_with(
                    ACCOUNTING,
                    "accounting.post_invoice",
                    |d: &OrderToCashData| AccountingCommand::PostInvoice {
                        order_id: d.order_id.clone(),
                        amount: d
                            .total
                            .unwrap_or_else(|| Money::zero(vextrus_kernel::Currency::XAU)),
                    },
                    |mut d, body| {
                        d.invoice_entry_id = Some(reply_field(body, "entry_id")?);
                        Ok(d)
                    },
                ),
            )
            .compensate_with(remote(
                ACCOUNTING,
                "accounting.reverse_invoice",
                |d: &OrderToCashData| AccountingCommand::ReverseInvoice {
                    order_id: d.order_id.clone(),
                },
            )),
        )
        .step(step(STEPS[7], complete))
}
