//! The `order_to_cash` saga definition, and the glue that connects the
//! participants to the orchestrator over a transport.
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
//! the orchestrator queues a [`SagaCommand`] in its outbox, a relay
//! publishes it to the participant's destination, the participant handles it
//! under the command's idempotency key (one transaction: effect + key +
//! stored reply) and publishes a [`SagaReply`], which the orchestrator takes
//! through its inbox ([`Orchestrator::handle_reply`]).
//!
//! Every compensation accepts "nothing to undo", so the compensation of a
//! step whose reply was lost (a timeout) is always safe.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use vextrus_core::saga::{
    Action, Orchestrator, RemoteCommand, ReplyOutcome, SagaCommand, SagaCommandOutbox,
    SagaDefinition, SagaError, SagaReply, SagaStore, Step, StepContext, StepOutcome, StepRetry,
};
use vextrus_core::transport::{
    InProcessTransport, MessageDelivery, MessageId, MessageSource, OutboundMessage, Transport,
};
use vextrus_core::{EventAppender, EventReader, SnapshotStore};
use vextrus_kernel::{AggregateId, CommandContext, HasErrorKind, Money};

use crate::accounting::AccountingCommand;
use crate::db::IdempotencyKey;
use crate::error::Error;
use crate::faults::FaultInjector;
use crate::inventory::{InventoryCommand, StockLine};
use crate::participant::Participant;
use crate::payment::PaymentCommand;
use crate::sales::{OrderCommand, OrderError, Sales};
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

/// Publishes the orchestrator's queued commands to the transport, oldest
/// first, marking them sent only after the transport confirmed them.
/// Returns how many it published.
pub async fn relay_commands<O, T>(
    outbox: &O,
    transport: &T,
    limit: usize,
) -> Result<usize, SagaError>
where
    O: SagaCommandOutbox,
    T: Transport,
{
    let commands = outbox.pending_commands(limit).await?;
    if commands.is_empty() {
        return Ok(0);
    }
    let messages: Vec<OutboundMessage> = commands
        .iter()
        .map(|c| {
            let mut m = OutboundMessage::new(
                c.destination.clone(),
                c.saga_id.as_uuid().to_string(),
                serde_json::to_vec(c).unwrap_or_default(),
            );
            m.id = MessageId(c.message_id);
            m
        })
        .collect();
    let results = transport.publish_batch(&messages).await;
    let sent: Vec<uuid::Uuid> = commands
        .iter()
        .zip(&results)
        .filter(|(_, r)| r.is_ok())
        .map(|(c, _)| c.message_id)
        .collect();
    for (c, r) in commands.iter().zip(&results) {
        if let Err(e) = r {
            tracing::warn!(destination = %c.destination, error = %e, "publishing a saga command failed");
        }
    }
    outbox.mark_sent(&sent).await?;
    Ok(sent.len())
}

/// What a participant does with one delivered command.
#[derive(Debug, Clone, PartialEq)]
pub enum Handled {
    /// Answer with this reply.
    Reply(SagaReply),
    /// The handler failed before commit (crash, database busy): redeliver.
    Redeliver(String),
}

/// Runs one saga command against `participant` and says how to answer.
///
/// A decoded command runs under its idempotency key. A business-failure
/// reply becomes [`ReplyOutcome::BusinessFailure`]; a transient error
/// (injected crash, busy database) asks for redelivery; any other error (a
/// command that cannot apply, a malformed payload) is a business failure,
/// since no retry would mend it.
pub async fn handle_command<P: Participant>(participant: &P, command: &SagaCommand) -> Handled {
    let decoded = serde_json::from_value::<P::Command>(command.payload.clone())
        .map_err(|e| format!("malformed {} command: {e}", command.command_type))
        .and_then(|c| {
            IdempotencyKey::new(command.idempotency_key.clone())
                .map(|k| (k, c))
                .map_err(|e| e.to_string())
        });
    let (key, cmd) = match decoded {
        Ok(v) => v,
        Err(e) => return Handled::Reply(command.reply(ReplyOutcome::BusinessFailure(e))),
    };
    if participant.faults().forces(&command.command_type) {
        return Handled::Reply(command.reply(ReplyOutcome::BusinessFailure(format!(
            "{} failed (forced)",
            command.command_type
        ))));
    }
    match participant.handle(&key, &cmd).await {
        Ok(reply) => {
            let outcome = match P::business_failure(&reply) {
                Some(reason) => ReplyOutcome::BusinessFailure(reason),
                None => ReplyOutcome::Success(serde_json::to_value(&reply).unwrap_or(Value::Null)),
            };
            Handled::Reply(command.reply(outcome))
        }
        Err(e) if e.kind().is_retryable() => Handled::Redeliver(e.to_string()),
        Err(e) => Handled::Reply(command.reply(ReplyOutcome::BusinessFailure(e.to_string()))),
    }
}

/// Serves `participant` on `destination` of an in-process transport until
/// the task is dropped: each command is handled on its own task, and its
/// reply published to [`REPLIES`] before the command is acknowledged; a
/// command whose handler failed before commit is redelivered after
/// `redeliver_after`.
pub async fn serve_participant<P>(
    participant: Arc<P>,
    transport: InProcessTransport,
    destination: &str,
    redeliver_after: Duration,
) -> Result<(), vextrus_core::transport::TransportError>
where
    P: Participant + 'static,
{
    let mut source = transport.subscribe(destination)?;
    while let Some(delivery) = source.next().await? {
        let participant = participant.clone();
        let transport = transport.clone();
        tokio::spawn(async move {
            let command: SagaCommand = match serde_json::from_slice(&delivery.message().payload) {
                Ok(c) => c,
                Err(e) => {
                    // Poison: nothing to reply to. Drop it (acknowledged).
                    tracing::error!(error = %e, "undecodable saga command dropped");
                    let _ = delivery.ack().await;
                    return;
                }
            };
            match handle_command(&*participant, &command).await {
                Handled::Reply(reply) => {
                    let mut m = OutboundMessage::new(
                        REPLIES,
                        reply.saga_id.as_uuid().to_string(),
                        serde_json::to_vec(&reply).unwrap_or_default(),
                    );
                    m.id = MessageId(reply.message_id);
                    match transport.publish(&m).await {
                        Ok(()) => {
                            let _ = delivery.ack().await;
                        }
                        Err(_) => {
                            let _ = delivery.nack(redeliver_after).await;
                        }
                    }
                }
                Handled::Redeliver(_) => {
                    let _ = delivery.nack(redeliver_after).await;
                }
            }
        });
    }
    Ok(())
}

/// Feeds replies from [`REPLIES`] into the orchestrator until the task is
/// dropped. A reply the orchestrator cannot take now (another worker holds
/// the saga's lease) is redelivered after `redeliver_after`.
pub async fn serve_replies<S>(
    orchestrator: Orchestrator<S>,
    transport: InProcessTransport,
    redeliver_after: Duration,
) -> Result<(), vextrus_core::transport::TransportError>
where
    S: SagaStore + Clone + 'static,
{
    let mut source = transport.subscribe(REPLIES)?;
    while let Some(delivery) = source.next().await? {
        let orchestrator = orchestrator.clone();
        tokio::spawn(async move {
            let reply: SagaReply = match serde_json::from_slice(&delivery.message().payload) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "undecodable saga reply dropped");
                    let _ = delivery.ack().await;
                    return;
                }
            };
            match orchestrator.handle_reply(&reply).await {
                Ok(_) | Err(SagaError::DuplicateMessage(_)) => {
                    let _ = delivery.ack().await;
                }
                Err(e) if e.kind().is_retryable() || matches!(e, SagaError::Fenced { .. }) => {
                    let _ = delivery.nack(redeliver_after).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, saga = %reply.saga_id.as_uuid(), "saga reply not applied");
                    let _ = delivery.ack().await;
                }
            }
        });
    }
    Ok(())
}
