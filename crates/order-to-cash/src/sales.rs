//! Sales: the event-sourced [`Order`] aggregate and the [`Sales`] service
//! that loads and saves it through [`EventSourcedRepository`].
//!
//! An order moves through the saga's steps in order:
//!
//! ```text
//! Placed -> Validated -> Reserved -> Authorized -> Shipped -> Captured -> Invoiced -> Completed
//!    \__________\___________\___________\____________\___________\___________\-> Cancelled
//! ```
//!
//! Every `Mark*` command is idempotent by state: asking for a step the order
//! has already passed records nothing (an empty event list) and succeeds.
//! So Sales needs no idempotency table: the order's stream version is its
//! concurrency token, and a redelivered command finds the step done. Each
//! command is one append (one transaction) to the order's stream.

use serde::{Deserialize, Serialize};
use vextrus_core::{EventAppender, EventReader, EventSourcedRepository, SnapshotStore};
use vextrus_kernel::money::Decimal;
use vextrus_kernel::{
    Aggregate, AggregateId, AggregateRoot, CommandContext, Currency, DomainEvent, Money, Quantity,
    Repository, RepositoryError, RoundingMode, Sku,
};

use crate::error::{Error, Result};
use crate::inventory::StockLine;

/// One line of an order: `quantity` units of `sku` at `unit_price` each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// What.
    pub sku: Sku,
    /// How many.
    pub quantity: Quantity,
    /// The price of one unit.
    pub unit_price: Money,
}

/// Where an order is in its life.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Not placed yet (no events).
    #[default]
    New,
    /// Placed by the customer.
    Placed,
    /// Checked: lines, currency, total.
    Validated,
    /// Stock reserved.
    Reserved,
    /// Payment authorized.
    Authorized,
    /// Shipment booked.
    Shipped,
    /// Payment captured.
    Captured,
    /// Invoice posted.
    Invoiced,
    /// Done (terminal).
    Completed,
    /// Cancelled, everything compensated (terminal).
    Cancelled,
}

impl OrderStatus {
    /// Whether the order can no longer change.
    pub fn is_terminal(self) -> bool {
        matches!(self, OrderStatus::Completed | OrderStatus::Cancelled)
    }
}

/// What an order can be asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum OrderCommand {
    /// Places the order.
    Place {
        /// Who orders.
        customer: String,
        /// The order's currency; every unit price must be in it.
        currency: Currency,
        /// What is ordered.
        lines: Vec<OrderLine>,
    },
    /// Checks the order's business rules.
    Validate,
    /// Records that stock is reserved.
    MarkReserved,
    /// Records that payment is authorized.
    MarkAuthorized {
        /// The payment's id.
        payment_id: String,
    },
    /// Records that a shipment is booked.
    MarkShipped {
        /// The shipment's id.
        shipment_id: String,
    },
    /// Records that payment is captured.
    MarkCaptured,
    /// Records that the invoice is posted.
    MarkInvoiced {
        /// The invoice's journal entry id.
        entry_id: String,
    },
    /// Completes the order.
    Complete,
    /// Cancels the order (after its saga compensated everything).
    Cancel {
        /// Why.
        reason: String,
    },
}

/// What happened to an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OrderEvent {
    /// The order was placed.
    Placed {
        /// Who.
        customer: String,
        /// Its currency.
        currency: Currency,
        /// What.
        lines: Vec<OrderLine>,
    },
    /// The order passed validation.
    Validated {
        /// Its total.
        total: Money,
    },
    /// Stock is reserved.
    Reserved,
    /// Payment is authorized.
    Authorized {
        /// The payment's id.
        payment_id: String,
    },
    /// A shipment is booked.
    Shipped {
        /// The shipment's id.
        shipment_id: String,
    },
    /// Payment is captured.
    Captured,
    /// The invoice is posted.
    Invoiced {
        /// Its journal entry id.
        entry_id: String,
    },
    /// The order is done.
    Completed,
    /// The order is cancelled.
    Cancelled {
        /// Why.
        reason: String,
    },
}

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> &'static str {
        match self {
            OrderEvent::Placed { .. } => "sales.order_placed",
            OrderEvent::Validated { .. } => "sales.order_validated",
            OrderEvent::Reserved => "sales.order_reserved",
            OrderEvent::Authorized { .. } => "sales.order_authorized",
            OrderEvent::Shipped { .. } => "sales.order_shipped",
            OrderEvent::Captured => "sales.order_captured",
            OrderEvent::Invoiced { .. } => "sales.order_invoiced",
            OrderEvent::Completed => "sales.order_completed",
            OrderEvent::Cancelled { .. } => "sales.order_cancelled",
        }
    }
}

/// Why an order refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OrderError {
    /// The order broke a business rule at placing or validation (a business
    /// failure: the saga cancels the order).
    #[error("order rejected: {0}")]
    Rejected(String),
    /// The command does not fit the order's status.
    #[error("cannot {command} an order that is {status:?}")]
    IllegalTransition {
        /// What was asked.
        command: &'static str,
        /// Where the order is.
        status: OrderStatus,
    },
}

/// The order aggregate's state.
///
/// ```
/// use vextrus_kernel::{Aggregate, Currency, Money, Quantity, Sku};
/// use vextrus_order_to_cash::sales::{Order, OrderCommand, OrderLine, OrderStatus};
///
/// let mut order = Order::default();
/// let line = OrderLine {
///     sku: Sku::new("WIDGET").unwrap(),
///     quantity: Quantity::new(3).unwrap(),
///     unit_price: Money::from_minor(2_50, Currency::USD),
/// };
/// let place = OrderCommand::Place { customer: "c-1".into(), currency: Currency::USD, lines: vec![line] };
/// for command in [place, OrderCommand::Validate] {
///     for event in order.handle(command).unwrap() {
///         order.apply(&event);
///     }
/// }
/// assert_eq!(order.status, OrderStatus::Validated);
/// assert_eq!(order.total().unwrap(), Money::from_minor(7_50, Currency::USD));
/// // Completing now skips steps: refused.
/// assert!(order.handle(OrderCommand::Complete).is_err());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Where the order is.
    pub status: OrderStatus,
    /// Who ordered.
    pub customer: String,
    /// The order's currency (once placed).
    pub currency: Option<Currency>,
    /// What is ordered.
    pub lines: Vec<OrderLine>,
    /// The payment's id, once authorized.
    pub payment_id: Option<String>,
    /// The shipment's id, once shipped.
    pub shipment_id: Option<String>,
    /// The invoice's journal entry id, once invoiced.
    pub invoice_entry_id: Option<String>,
    /// Why it was cancelled, if it was.
    pub cancel_reason: Option<String>,
    /// The status the order was in when it was cancelled.
    pub cancelled_from: Option<OrderStatus>,
}

impl Order {
    /// The largest order total accepted, in major units of its currency.
    pub const MAX_TOTAL_MAJOR: i64 = 1_000_000;

    /// The order's total: the sum of quantity x unit price over its lines.
    pub fn total(&self) -> Result<Money, OrderError> {
        let currency = self
            .currency
            .ok_or_else(|| OrderError::Rejected("the order has no currency".into()))?;
        let mut total = Money::zero(currency);
        for line in &self.lines {
            if line.unit_price.currency() != currency {
                return Err(OrderError::Rejected(format!(
                    "{} is priced in {}, the order is in {currency}",
                    line.sku,
                    line.unit_price.currency()
                )));
            }
            let amount = line
                .unit_price
                .mul_rate(Decimal::from(line.quantity.value()), RoundingMode::HalfEven)
                .and_then(|a| total.checked_add(a))
                .map_err(|e| OrderError::Rejected(e.to_string()))?;
            total = amount;
        }
        Ok(total)
    }

    /// The order's lines as stock lines (for inventory and shipping).
    pub fn stock_lines(&self) -> Vec<StockLine> {
        self.lines
            .iter()
            .map(|l| StockLine {
                sku: l.sku.clone(),
                quantity: l.quantity,
            })
            .collect()
    }

    fn validate(&self) -> Result<Money, OrderError> {
        if self.lines.is_empty() {
            return Err(OrderError::Rejected("the order has no lines".into()));
        }
        if let Some(line) = self.lines.iter().find(|l| l.quantity.is_zero()) {
            return Err(OrderError::Rejected(format!("zero units of {}", line.sku)));
        }
        if let Some(line) = self.lines.iter().find(|l| !l.unit_price.is_positive()) {
            return Err(OrderError::Rejected(format!(
                "{} has no positive price",
                line.sku
            )));
        }
        let total = self.total()?;
        let max = Money::from_major(Self::MAX_TOTAL_MAJOR, total.currency());
        if total > max {
            return Err(OrderError::Rejected(format!(
                "the total {total} is above {max}"
            )));
        }
        Ok(total)
    }

    /// Moves forward to `target` from exactly `from`; a no-op if the order is
    /// already at or past `target` (and not cancelled).
    fn step(
        &self,
        command: &'static str,
        from: OrderStatus,
        target: OrderStatus,
        event: OrderEvent,
    ) -> Result<Vec<OrderEvent>, OrderError> {
        if self.status == from {
            Ok(vec![event])
        } else if self.status >= target && self.status != OrderStatus::Cancelled {
            Ok(vec![])
        } else {
            Err(OrderError::IllegalTransition {
                command,
                status: self.status,
            })
        }
    }
}

impl Aggregate for Order {
    const TYPE: &'static str = "order";
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;

    fn handle(&self, command: OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        use OrderStatus as S;
        match command {
            OrderCommand::Place {
                customer,
                currency,
                lines,
            } => {
                if self.status != S::New {
                    let same = self.customer == customer
                        && self.currency == Some(currency)
                        && self.lines == lines;
                    return if same {
                        Ok(vec![])
                    } else {
                        Err(OrderError::IllegalTransition {
                            command: "place",
                            status: self.status,
                        })
                    };
                }
                if customer.trim().is_empty() {
                    return Err(OrderError::Rejected("no customer".into()));
                }
                Ok(vec![OrderEvent::Placed {
                    customer,
                    currency,
                    lines,
                }])
            }
            OrderCommand::Validate => {
                if self.status == S::Placed {
                    let total = self.validate()?;
                    Ok(vec![OrderEvent::Validated { total }])
                } else if self.status >= S::Validated && self.status != S::Cancelled {
                    Ok(vec![])
                } else {
                    Err(OrderError::IllegalTransition {
                        command: "validate",
                        status: self.status,
                    })
                }
            }
            OrderCommand::MarkReserved => self.step(
                "mark reserved",
                S::Validated,
                S::Reserved,
                OrderEvent::Reserved,
            ),
            OrderCommand::MarkAuthorized { payment_id } => self.step(
                "mark authorized",
                S::Reserved,
                S::Authorized,
                OrderEvent::Authorized { payment_id },
            ),
            OrderCommand::MarkShipped { shipment_id } => self.step(
                "mark shipped",
                S::Authorized,
                S::Shipped,
                OrderEvent::Shipped { shipment_id },
            ),
            OrderCommand::MarkCaptured => self.step(
                "mark captured",
                S::Shipped,
                S::Captured,
                OrderEvent::Captured,
            ),
            OrderCommand::MarkInvoiced { entry_id } => self.step(
                "mark invoiced",
                S::Captured,
                S::Invoiced,
                OrderEvent::Invoiced { entry_id },
            ),
            OrderCommand::Complete => {
                if self.status == S::Completed {
                    Ok(vec![])
                } else if self.status == S::Invoiced {
                    Ok(vec![OrderEvent::Completed])
                } else {
                    Err(OrderError::IllegalTransition {
                        command: "complete",
                        status: self.status,
                    })
                }
            }
            OrderCommand::Cancel { reason } => match self.status {
                S::Cancelled => Ok(vec![]),
                S::Completed | S::New => Err(OrderError::IllegalTransition {
                    command: "cancel",
                    status: self.status,
                }),
                _ => Ok(vec![OrderEvent::Cancelled { reason }]),
            },
        }
    }

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::Placed {
                customer,
                currency,
                lines,
            } => {
                self.status = OrderStatus::Placed;
                self.customer = customer.clone();
                self.currency = Some(*currency);
                self.lines = lines.clone();
            }
            OrderEvent::Validated { .. } => self.status = OrderStatus::Validated,
            OrderEvent::Reserved => self.status = OrderStatus::Reserved,
            OrderEvent::Authorized { payment_id } => {
                self.status = OrderStatus::Authorized;
                self.payment_id = Some(payment_id.clone());
            }
            OrderEvent::Shipped { shipment_id } => {
                self.status = OrderStatus::Shipped;
                self.shipment_id = Some(shipment_id.clone());
            }
            OrderEvent::Captured => self.status = OrderStatus::Captured,
            OrderEvent::Invoiced { entry_id } => {
                self.status = OrderStatus::Invoiced;
                self.invoice_entry_id = Some(entry_id.clone());
            }
            OrderEvent::Completed => self.status = OrderStatus::Completed,
            OrderEvent::Cancelled { reason } => {
                self.cancelled_from = Some(self.status);
                self.status = OrderStatus::Cancelled;
                self.cancel_reason = Some(reason.clone());
            }
        }
    }
}

/// The Sales service: runs [`OrderCommand`]s against orders stored in an
/// event store through [`EventSourcedRepository`].
///
/// ```
/// use vextrus_core::InMemoryEventStore;
/// use vextrus_kernel::{AggregateId, CommandContext, Currency, Money, Quantity, Sku};
/// use vextrus_order_to_cash::sales::{OrderCommand, OrderLine, OrderStatus, Sales};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let sales = Sales::new(InMemoryEventStore::new());
/// let id = AggregateId::new("o-1")?;
/// let line = OrderLine { sku: Sku::new("WIDGET")?, quantity: Quantity::new(1)?, unit_price: Money::from_minor(100, Currency::BDT) };
/// let ctx = CommandContext::new();
/// sales.execute(&id, OrderCommand::Place { customer: "c-1".into(), currency: Currency::BDT, lines: vec![line] }, &ctx).await?;
/// sales.execute(&id, OrderCommand::Validate, &ctx).await?;
/// // A redelivered command finds the step done: no new event.
/// let order = sales.execute(&id, OrderCommand::Validate, &ctx).await?;
/// assert_eq!(order.state().status, OrderStatus::Validated);
/// assert_eq!(order.version(), 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct Sales<S> {
    repo: EventSourcedRepository<Order, S>,
}

impl<S> Sales<S>
where
    S: EventAppender + EventReader + SnapshotStore,
{
    /// How often a command is retried after a concurrent save.
    const CONFLICT_RETRIES: usize = 5;

    /// Sales over an event store.
    pub fn new(store: S) -> Self {
        Self {
            repo: EventSourcedRepository::new(store),
        }
    }

    /// The repository.
    pub fn repository(&self) -> &EventSourcedRepository<Order, S> {
        &self.repo
    }

    /// Loads an order.
    pub async fn load(&self, id: &AggregateId) -> Result<Option<AggregateRoot<Order>>> {
        Ok(self.repo.load(id).await?)
    }

    /// Runs several commands on the order `id` in order and saves all their
    /// events in ONE append (one transaction): either all of them are
    /// recorded or none is. A concurrent save is retried on the reloaded
    /// order.
    pub async fn execute_all(
        &self,
        id: &AggregateId,
        commands: Vec<OrderCommand>,
        ctx: &CommandContext,
    ) -> Result<AggregateRoot<Order>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some(mut root) = self.repo.load(id).await? else {
                return Err(Error::NotFound {
                    participant: "sales",
                    what: format!("order {id}"),
                });
            };
            for command in commands.iter().cloned() {
                root.execute(command, ctx)?;
            }
            if !root.has_uncommitted_events() {
                return Ok(root);
            }
            match self.repo.save(&mut root).await {
                Ok(()) => return Ok(root),
                Err(RepositoryError::Conflict { .. }) if attempt < Self::CONFLICT_RETRIES => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Runs `command` on the order `id` (a new one for `Place`), saving its
    /// events in one append. A concurrent save is retried on the reloaded
    /// order; a refusal is [`Error::Order`].
    pub async fn execute(
        &self,
        id: &AggregateId,
        command: OrderCommand,
        ctx: &CommandContext,
    ) -> Result<AggregateRoot<Order>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut root = match self.repo.load(id).await? {
                Some(root) => root,
                None if matches!(command, OrderCommand::Place { .. }) => {
                    AggregateRoot::new(id.clone())
                }
                None => {
                    return Err(Error::NotFound {
                        participant: "sales",
                        what: format!("order {id}"),
                    });
                }
            };
            root.execute(command.clone(), ctx)?;
            if !root.has_uncommitted_events() {
                return Ok(root);
            }
            match self.repo.save(&mut root).await {
                Ok(()) => return Ok(root),
                Err(RepositoryError::Conflict { .. }) if attempt < Self::CONFLICT_RETRIES => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}
