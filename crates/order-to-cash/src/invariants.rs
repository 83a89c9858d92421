//! The business invariants of order-to-cash, checked over a snapshot of
//! every participant's state.
//!
//! [`check`] is a pure function from a [`SystemSnapshot`] to an
//! [`InvariantReport`]; [`SystemSnapshot::collect`] reads one from the live
//! participants. The invariants, precisely:
//!
//! 1. **Every saga is terminal**: [`SagaState::Completed`],
//!    [`SagaState::Compensated`] or [`SagaState::Failed`] (failed with
//!    nothing left to compensate). A saga still running, or stuck in
//!    `CompensationFailed` waiting for an operator, is a violation.
//! 2. **Stock is conserved**: for every SKU, `initial = on_hand + reserved +
//!    shipped`; the `reserved` and `shipped` counters equal the sums of the
//!    reservations in those states; and **no reservation leaks**: a
//!    completed order's reservations are all `shipped`, a cancelled order's
//!    are all `released`.
//! 3. **The ledger balances**: every journal entry, and the whole ledger,
//!    has debits equal to credits in each currency.
//! 4. **Receivables equal captured-but-unsettled payments**: in each
//!    currency, the balance of [`Account::Receivable`] (debits minus credits)
//!    equals the sum over all payments of `captured - refunded - settled`.
//!    (The receivable is owed by the payment processor: see
//!    [`crate::accounting`].) A captured payment whose order was never
//!    invoiced, or an invoice whose payment was refunded without a reversal,
//!    breaks it.
//! 5. **No capture without a shipment**: a payment that is captured or
//!    settled has a shipment in state `created` for its order; a refunded one
//!    had a shipment (now possibly cancelled).
//! 6. **No completed order without an invoice**: every completed order has an
//!    invoice entry that was not reversed, for the order's total.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};
use vextrus_core::{EventAppender, EventReader, SnapshotStore};
use vextrus_kernel::{AggregateId, Money};

use crate::accounting::{Account, Accounting, LedgerLine};
use crate::error::Result;
use crate::inventory::{Inventory, Reservation, StockLevel};
use crate::payment::{Payment, PaymentRecord};
use crate::sales::{OrderStatus, Sales};
use crate::shipping::{ShipmentRecord, Shipping};

/// Where a saga ended (or is).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaState {
    /// Every step succeeded.
    Completed,
    /// A step failed and every completed step was compensated.
    Compensated,
    /// A step failed before anything needed compensating.
    Failed,
    /// A compensation failed past its retry budget: an operator must act.
    CompensationFailed,
    /// Still running (the text says where).
    InProgress(String),
}

impl SagaState {
    /// Whether the saga is done for good.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            SagaState::Completed | SagaState::Compensated | SagaState::Failed
        )
    }
}

/// One saga and the order it drives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaRecord {
    /// The saga's id.
    pub saga_id: String,
    /// The order's id.
    pub order_id: String,
    /// Its state.
    pub state: SagaState,
}

/// One order as Sales sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRecord {
    /// The order's id.
    pub order_id: String,
    /// Its status.
    pub status: OrderStatus,
    /// Its total, if it has a valid one.
    pub total: Option<Money>,
}

/// Everything the invariants are checked over.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemSnapshot {
    /// Every saga.
    pub sagas: Vec<SagaRecord>,
    /// Every order.
    pub orders: Vec<OrderRecord>,
    /// Every SKU's stock.
    pub stock: Vec<StockLevel>,
    /// Every reservation.
    pub reservations: Vec<Reservation>,
    /// Every payment.
    pub payments: Vec<PaymentRecord>,
    /// Every shipment.
    pub shipments: Vec<ShipmentRecord>,
    /// Every ledger line.
    pub ledger: Vec<LedgerLine>,
}

impl SystemSnapshot {
    /// Reads the participants' state. Orders are read for `order_ids` (the
    /// event store has no list of orders); `sagas` come from the saga store.
    pub async fn collect<S>(
        sagas: Vec<SagaRecord>,
        order_ids: &[AggregateId],
        sales: &Sales<S>,
        inventory: &Inventory,
        payment: &Payment,
        shipping: &Shipping,
        accounting: &Accounting,
    ) -> Result<Self>
    where
        S: EventAppender + EventReader + SnapshotStore,
    {
        let mut orders = Vec::with_capacity(order_ids.len());
        for id in order_ids {
            if let Some(root) = sales.load(id).await? {
                let state = root.state();
                orders.push(OrderRecord {
                    order_id: id.as_str().to_owned(),
                    status: state.status,
                    total: state.total().ok(),
                });
            }
        }
        Ok(Self {
            sagas,
            orders,
            stock: inventory.stock_levels().await?,
            reservations: inventory.reservations().await?,
            payments: payment.records().await?,
            shipments: shipping.shipments().await?,
            ledger: accounting.lines().await?,
        })
    }
}

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "violation", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Violation {
    /// A saga is not terminal.
    SagaNotTerminal {
        /// The saga.
        saga_id: String,
        /// Its state.
        state: SagaState,
    },
    /// `initial != on_hand + reserved + shipped` for a SKU.
    StockNotConserved {
        /// The SKU.
        sku: String,
        /// Units ever received.
        initial: i64,
        /// On hand.
        on_hand: i64,
        /// Reserved.
        reserved: i64,
        /// Shipped.
        shipped: i64,
    },
    /// A SKU's `reserved` or `shipped` counter differs from its reservations.
    StockCounterMismatch {
        /// The SKU.
        sku: String,
        /// `reserved` or `shipped`.
        counter: String,
        /// The counter's value.
        counter_value: i64,
        /// The sum over reservations in that state.
        reservations: i64,
    },
    /// A terminal order's reservation is in the wrong state (a completed
    /// order's not shipped, a cancelled order's not released).
    LeakedReservation {
        /// The order.
        order_id: String,
        /// The SKU.
        sku: String,
        /// The reservation's state.
        state: String,
        /// The order's status.
        order_status: OrderStatus,
    },
    /// A journal entry's debits differ from its credits.
    EntryUnbalanced {
        /// The entry.
        entry_id: String,
        /// The currency.
        currency: String,
        /// Debits, minor units.
        debits: i128,
        /// Credits, minor units.
        credits: i128,
    },
    /// The whole ledger's debits differ from its credits in a currency.
    LedgerUnbalanced {
        /// The currency.
        currency: String,
        /// Debits, minor units.
        debits: i128,
        /// Credits, minor units.
        credits: i128,
    },
    /// The receivable balance differs from captured-but-unsettled payments.
    ReceivableMismatch {
        /// The currency.
        currency: String,
        /// Receivable balance, minor units.
        receivable: i128,
        /// Captured - refunded - settled, minor units.
        captured_unsettled: i128,
    },
    /// A payment was captured without a shipment.
    CaptureWithoutShipment {
        /// The order.
        order_id: String,
        /// The payment's state.
        payment_state: String,
        /// The shipment's state, if there is one.
        shipment_state: Option<String>,
    },
    /// A completed order has no (unreversed) invoice for its total.
    CompletedWithoutInvoice {
        /// The order.
        order_id: String,
        /// What is wrong.
        detail: String,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::SagaNotTerminal { saga_id, state } => {
                write!(f, "saga {saga_id} is not terminal: {state:?}")
            }
            Violation::StockNotConserved {
                sku,
                initial,
                on_hand,
                reserved,
                shipped,
            } => write!(
                f,
                "stock of {sku} not conserved: initial {initial} != on hand {on_hand} + reserved {reserved} + shipped {shipped}"
            ),
            Violation::StockCounterMismatch {
                sku,
                counter,
                counter_value,
                reservations,
            } => write!(
                f,
                "stock of {sku}: {counter} counter is {counter_value}, its reservations sum to {reservations}"
            ),
            Violation::LeakedReservation {
                order_id,
                sku,
                state,
                order_status,
            } => write!(
                f,
                "order {order_id} is {order_status:?} but its reservation of {sku} is {state}"
            ),
            Violation::EntryUnbalanced {
                entry_id,
                currency,
                debits,
                credits,
            } => write!(
                f,
                "journal entry {entry_id} unbalanced in {currency}: debits {debits} != credits {credits}"
            ),
            Violation::LedgerUnbalanced {
                currency,
                debits,
                credits,
            } => write!(
                f,
                "ledger unbalanced in {currency}: debits {debits} != credits {credits}"
            ),
            Violation::ReceivableMismatch {
                currency,
                receivable,
                captured_unsettled,
            } => write!(
                f,
                "receivable in {currency} is {receivable}, captured-but-unsettled payments are {captured_unsettled}"
            ),
            Violation::CaptureWithoutShipment {
                order_id,
                payment_state,
                shipment_state,
            } => write!(
                f,
                "order {order_id}'s payment is {payment_state} but its shipment is {}",
                shipment_state.as_deref().unwrap_or("missing")
            ),
            Violation::CompletedWithoutInvoice { order_id, detail } => {
                write!(f, "completed order {order_id} without an invoice: {detail}")
            }
        }
    }
}

/// The outcome of [`check`]: what was looked at and what is broken.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvariantReport {
    /// Sagas checked.
    pub sagas: usize,
    /// Orders checked.
    pub orders: usize,
    /// SKUs checked.
    pub skus: usize,
    /// Journal entries checked.
    pub entries: usize,
    /// Payments checked.
    pub payments: usize,
    /// Every violation found (empty: all invariants hold).
    pub violations: Vec<Violation>,
}

impl InvariantReport {
    /// Whether every invariant holds.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for InvariantReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invariants over {} sagas, {} orders, {} SKUs, {} journal entries, {} payments: ",
            self.sagas, self.orders, self.skus, self.entries, self.payments
        )?;
        if self.is_ok() {
            return f.write_str("all hold");
        }
        write!(f, "{} violated", self.violations.len())?;
        for v in &self.violations {
            write!(f, "\n  - {v}")?;
        }
        Ok(())
    }
}

/// Checks every invariant over `snapshot`.
///
/// ```
/// use vextrus_order_to_cash::invariants::{check, SagaRecord, SagaState, SystemSnapshot, Violation};
///
/// let mut snapshot = SystemSnapshot::default();
/// assert!(check(&snapshot).is_ok());
/// snapshot.sagas.push(SagaRecord {
///     saga_id: "s-1".into(),
///     order_id: "o-1".into(),
///     state: SagaState::InProgress("capture_payment".into()),
/// });
/// let report = check(&snapshot);
/// assert!(matches!(report.violations[..], [Violation::SagaNotTerminal { .. }]));
/// ```
pub fn check(snapshot: &SystemSnapshot) -> InvariantReport {
    let mut v = Vec::new();
    check_sagas(snapshot, &mut v);
    check_stock(snapshot, &mut v);
    let entries = check_ledger(snapshot, &mut v);
    check_receivables(snapshot, &mut v);
    check_captures(snapshot, &mut v);
    check_invoices(snapshot, &mut v);
    InvariantReport {
        sagas: snapshot.sagas.len(),
        orders: snapshot.orders.len(),
        skus: snapshot.stock.len(),
        entries,
        payments: snapshot.payments.len(),
        violations: v,
    }
}

fn check_sagas(s: &SystemSnapshot, v: &mut Vec<Violation>) {
    for saga in &s.sagas {
        if !saga.state.is_terminal() {
            v.push(Violation::SagaNotTerminal {
                saga_id: saga.saga_id.clone(),
                state: saga.state.clone(),
            });
        }
    }
}

fn check_stock(s: &SystemSnapshot, v: &mut Vec<Violation>) {
    let mut sums: HashMap<(&str, &str), i64> = HashMap::new();
    for r in &s.reservations {
        *sums.entry((r.sku.as_str(), r.state.as_str())).or_default() += r.quantity;
    }
    for level in &s.stock {
        let sum =
            i128::from(level.on_hand) + i128::from(level.reserved) + i128::from(level.shipped);
        if i128::from(level.initial) != sum {
            v.push(Violation::StockNotConserved {
                sku: level.sku.to_string(),
                initial: level.initial,
                on_hand: level.on_hand,
                reserved: level.reserved,
                shipped: level.shipped,
            });
        }
        for (counter, value) in [("reserved", level.reserved), ("shipped", level.shipped)] {
            let reservations = sums
                .get(&(level.sku.as_str(), counter))
                .copied()
                .unwrap_or(0);
            if reservations != value {
                v.push(Violation::StockCounterMismatch {
                    sku: level.sku.to_string(),
                    counter: counter.to_owned(),
                    counter_value: value,
                    reservations,
                });
            }
        }
    }
    let status: HashMap<&str, OrderStatus> = s
        .orders
        .iter()
        .map(|o| (o.order_id.as_str(), o.status))
        .collect();
    for r in &s.reservations {
        let Some(&order_status) = status.get(r.order_id.as_str()) else {
            continue;
        };
        let expected = match order_status {
            OrderStatus::Completed => "shipped",
            OrderStatus::Cancelled => "released",
            _ => continue,
        };
        if r.state != expected {
            v.push(Violation::LeakedReservation {
                order_id: r.order_id.clone(),
                sku: r.sku.clone(),
                state: r.state.clone(),
                order_status,
            });
        }
    }
}

fn check_ledger(s: &SystemSnapshot, v: &mut Vec<Violation>) -> usize {
    let mut per_entry: BTreeMap<(&str, &str), (i128, i128)> = BTreeMap::new();
    let mut total: BTreeMap<&str, (i128, i128)> = BTreeMap::new();
    let mut entries = BTreeSet::new();
    for line in &s.ledger {
        entries.insert(line.entry_id.as_str());
        for map_entry in [
            per_entry
                .entry((line.entry_id.as_str(), line.currency.as_str()))
                .or_default(),
            total.entry(line.currency.as_str()).or_default(),
        ] {
            map_entry.0 += i128::from(line.debit_minor);
            map_entry.1 += i128::from(line.credit_minor);
        }
    }
    for ((entry_id, currency), (debits, credits)) in per_entry {
        if debits != credits {
            v.push(Violation::EntryUnbalanced {
                entry_id: entry_id.to_owned(),
                currency: currency.to_owned(),
                debits,
                credits,
            });
        }
    }
    for (currency, (debits, credits)) in total {
        if debits != credits {
            v.push(Violation::LedgerUnbalanced {
                currency: currency.to_owned(),
                debits,
                credits,
            });
        }
    }
    entries.len()
}

fn check_receivables(s: &SystemSnapshot, v: &mut Vec<Violation>) {
    let mut sides: BTreeMap<&str, (i128, i128)> = BTreeMap::new();
    for line in s
        .ledger
        .iter()
        .filter(|l| l.account == Account::Receivable.as_str())
    {
        sides.entry(line.currency.as_str()).or_default().0 +=
            i128::from(line.debit_minor) - i128::from(line.credit_minor);
    }
    for p in &s.payments {
        sides.entry(p.currency.as_str()).or_default().1 += i128::from(p.captured_minor)
            - i128::from(p.refunded_minor)
            - i128::from(p.settled_minor);
    }
    for (currency, (receivable, captured_unsettled)) in sides {
        if receivable != captured_unsettled {
            v.push(Violation::ReceivableMismatch {
                currency: currency.to_owned(),
                receivable,
                captured_unsettled,
            });
        }
    }
}

fn check_captures(s: &SystemSnapshot, v: &mut Vec<Violation>) {
    let shipments: HashMap<&str, &str> = s
        .shipments
        .iter()
        .map(|sh| (sh.order_id.as_str(), sh.state.as_str()))
        .collect();
    for p in s.payments.iter().filter(|p| p.captured_minor > 0) {
        let shipment = shipments.get(p.order_id.as_str()).copied();
        let ok = match p.state.as_str() {
            "refunded" => shipment.is_some(),
            _ => shipment == Some("created"),
        };
        if !ok {
            v.push(Violation::CaptureWithoutShipment {
                order_id: p.order_id.clone(),
                payment_state: p.state.clone(),
                shipment_state: shipment.map(str::to_owned),
            });
        }
    }
}

fn check_invoices(s: &SystemSnapshot, v: &mut Vec<Violation>) {
    let reversed: BTreeSet<&str> = s
        .ledger
        .iter()
        .filter_map(|l| l.reverses.as_deref())
        .collect();
    // Per order: the receivable debit of each unreversed invoice entry.
    let mut invoices: HashMap<&str, Vec<(&str, i64)>> = HashMap::new();
    for l in s.ledger.iter().filter(|l| {
        l.kind == "invoice"
            && l.account == Account::Receivable.as_str()
            && !reversed.contains(l.entry_id.as_str())
    }) {
        invoices
            .entry(l.order_id.as_str())
            .or_default()
            .push((l.currency.as_str(), l.debit_minor));
    }
    for o in s
        .orders
        .iter()
        .filter(|o| o.status == OrderStatus::Completed)
    {
        let detail = match (
            invoices.get(o.order_id.as_str()).map(Vec::as_slice),
            &o.total,
        ) {
            (None | Some([]), _) => Some("no unreversed invoice entry".to_owned()),
            (Some([(currency, minor)]), Some(total)) => {
                let same = *currency == total.currency().code()
                    && i128::from(*minor) == total.to_minor_units();
                (!same).then(|| {
                    format!("invoiced {currency} {minor} minor units, the order's total is {total}")
                })
            }
            (Some([_]), None) => Some("the order has no valid total".to_owned()),
            (Some(many), _) => Some(format!("{} unreversed invoices", many.len())),
        };
        if let Some(detail) = detail {
            v.push(Violation::CompletedWithoutInvoice {
                order_id: o.order_id.clone(),
                detail,
            });
        }
    }
}
