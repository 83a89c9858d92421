//! Payment: authorize, capture, void, refund and settle one payment per
//! order, all amounts [`Money`].
//!
//! - **authorize** holds the order's amount on the customer's card, or
//!   declines ([`PaymentReply::Declined`], a business failure) when the
//!   amount is above [`Payment::AUTHORIZATION_LIMIT_MINOR`] minor units or the
//!   failure injector says so.
//! - **void** (the compensation of authorize) drops the hold; voiding an
//!   order that holds no authorization is a harmless no-op.
//! - **capture** takes the authorized amount.
//! - **refund** (the compensation of capture) gives a captured amount back;
//!   refunding an order with nothing captured is a no-op.
//! - **settle** records that the processor paid a captured amount out to us.
//!
//! Captured-but-unsettled money (`captured - refunded - settled` over all
//! payments) is what Accounting's receivable must equal; see
//! [`crate::invariants`].

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, Row};
use vextrus_kernel::{AggregateId, Currency, Money};

use crate::db::{self, Database, IdempotencyKey, Migration};
use crate::error::{Error, Result};
use crate::faults::FaultInjector;
use crate::participant::Participant;

const P: &str = "payment";

/// Payment's migrations.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "payment",
    sql: include_str!("../migrations/0001_payment.sql"),
}];

/// What payment can be asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum PaymentCommand {
    /// Authorizes `amount` for an order.
    Authorize {
        /// The order.
        order_id: AggregateId,
        /// How much.
        amount: Money,
    },
    /// Drops an authorization (compensation of `Authorize`).
    Void {
        /// The order.
        order_id: AggregateId,
    },
    /// Captures the authorized amount.
    Capture {
        /// The order.
        order_id: AggregateId,
    },
    /// Refunds the captured amount (compensation of `Capture`).
    Refund {
        /// The order.
        order_id: AggregateId,
    },
    /// Records the processor's payout of the captured amount.
    Settle {
        /// The order.
        order_id: AggregateId,
    },
}

/// What payment answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum PaymentReply {
    /// The amount is held.
    Authorized {
        /// The payment's id.
        payment_id: String,
        /// The amount held.
        amount: Money,
    },
    /// A business failure: nothing is held.
    Declined {
        /// Why.
        reason: String,
    },
    /// The hold is dropped (or there was none).
    Voided {
        /// Whether an authorization was dropped by this command.
        dropped: bool,
    },
    /// The amount is taken.
    Captured {
        /// The payment's id.
        payment_id: String,
        /// The amount taken.
        amount: Money,
    },
    /// The captured amount was given back (or nothing was captured).
    Refunded {
        /// The amount given back (zero if nothing was captured).
        amount: Option<Money>,
    },
    /// The processor paid the captured amount out.
    Settled {
        /// The amount paid out.
        amount: Money,
    },
}

/// One payment as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRecord {
    /// The order.
    pub order_id: String,
    /// The payment's id.
    pub payment_id: String,
    /// The currency code.
    pub currency: String,
    /// The authorized amount, minor units.
    pub amount_minor: i64,
    /// `authorized`, `voided`, `captured`, `refunded` or `settled`.
    pub state: String,
    /// Captured, minor units.
    pub captured_minor: i64,
    /// Refunded, minor units.
    pub refunded_minor: i64,
    /// Settled, minor units.
    pub settled_minor: i64,
}

/// The payment participant.
///
/// ```
/// use std::sync::Arc;
/// use vextrus_kernel::{AggregateId, Currency, Money};
/// use vextrus_order_to_cash::payment::{Payment, PaymentReply};
/// use vextrus_order_to_cash::{Database, FaultInjector, IdempotencyKey};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let payment = Payment::new(Database::temporary().await?, Arc::new(FaultInjector::disabled()));
/// payment.migrate().await?;
/// let order = AggregateId::new("o-1")?;
/// let key = |s: &str| IdempotencyKey::new(format!("o-1/{s}")).unwrap();
/// let amount = Money::from_minor(12_50, Currency::USD);
///
/// let reply = payment.authorize(&key("authorize"), &order, amount).await?;
/// assert!(matches!(reply, PaymentReply::Authorized { .. }));
/// let reply = payment.capture(&key("capture"), &order).await?;
/// assert!(matches!(reply, PaymentReply::Captured { amount: a, .. } if a == amount));
/// // The same key again: the same reply, and no second capture.
/// assert_eq!(payment.capture(&key("capture"), &order).await?, reply);
/// assert_eq!(payment.record(&order).await?.unwrap().captured_minor, 1250);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct Payment {
    db: Database,
    faults: Arc<FaultInjector>,
}

fn corrupt(reason: String) -> Error {
    Error::Corrupt {
        participant: P,
        reason,
    }
}

fn money(minor: i64, currency: &str) -> Result<Money> {
    let currency: Currency = currency
        .parse()
        .map_err(|e: vextrus_kernel::MoneyError| corrupt(e.to_string()))?;
    Ok(Money::from_minor(minor, currency))
}

pub(crate) fn minor_i64(amount: &Money, field: &'static str) -> Result<i64> {
    i64::try_from(amount.to_minor_units())
        .map_err(|_| Error::invalid(field, format!("{amount} does not fit 64-bit minor units")))
}

impl Payment {
    /// Authorizations above this many minor units are declined.
    pub const AUTHORIZATION_LIMIT_MINOR: i64 = 10_000_000;

    /// Payment over `db`, consulting `faults`.
    pub fn new(db: Database, faults: Arc<FaultInjector>) -> Self {
        Self { db, faults }
    }

    /// Creates or updates payment's tables.
    pub async fn migrate(&self) -> Result<usize> {
        db::migrate(&self.db, P, MIGRATIONS).await
    }

    /// Authorizes `amount` for an order.
    pub async fn authorize(
        &self,
        key: &IdempotencyKey,
        order_id: &AggregateId,
        amount: Money,
    ) -> Result<PaymentReply> {
        let command = PaymentCommand::Authorize {
            order_id: order_id.clone(),
            amount,
        };
        self.handle(key, &command).await
    }

    /// Voids an order's authorization (compensation).
    pub async fn void(&self, key: &IdempotencyKey, order_id: &AggregateId) -> Result<PaymentReply> {
        let order_id = order_id.clone();
        self.handle(key, &PaymentCommand::Void { order_id }).await
    }

    /// Captures an order's authorization.
    pub async fn capture(
        &self,
        key: &IdempotencyKey,
        order_id: &AggregateId,
    ) -> Result<PaymentReply> {
        let order_id = order_id.clone();
        self.handle(key, &PaymentCommand::Capture { order_id })
            .await
    }

    /// Refunds an order's capture (compensation).
    pub async fn refund(
        &self,
        key: &IdempotencyKey,
        order_id: &AggregateId,
    ) -> Result<PaymentReply> {
        let order_id = order_id.clone();
        self.handle(key, &PaymentCommand::Refund { order_id }).await
    }

    /// Settles an order's capture.
    pub async fn settle(
        &self,
        key: &IdempotencyKey,
        order_id: &AggregateId,
    ) -> Result<PaymentReply> {
        let order_id = order_id.clone();
        self.handle(key, &PaymentCommand::Settle { order_id }).await
    }

    /// One order's payment, if it has one.
    pub async fn record(&self, order_id: &AggregateId) -> Result<Option<PaymentRecord>> {
        let mut conn = self.db.pool().acquire().await.map_err(Error::db(P))?;
        Self::load(&mut conn, order_id).await
    }

    /// Every payment, by order.
    pub async fn records(&self) -> Result<Vec<PaymentRecord>> {
        let rows = sqlx::query(
            "SELECT order_id, payment_id, currency, amount_minor, state, captured_minor, refunded_minor, settled_minor
             FROM payment_payments ORDER BY order_id",
        )
        .fetch_all(self.db.pool())
        .await
        .map_err(Error::db(P))?;
        rows.iter().map(record_from_row).collect()
    }

    /// How many authorizations were declined.
    pub async fn declines(&self) -> Result<i64> {
        sqlx::query("SELECT CAST(COUNT(*) AS BIGINT) FROM payment_declines")
            .fetch_one(self.db.pool())
            .await
            .and_then(|r| r.try_get(0))
            .map_err(Error::db(P))
    }

    async fn load(
        conn: &mut AnyConnection,
        order_id: &AggregateId,
    ) -> Result<Option<PaymentRecord>> {
        let row = sqlx::query(
            "SELECT order_id, payment_id, currency, amount_minor, state, captured_minor, refunded_minor, settled_minor
             FROM payment_payments WHERE order_id = $1",
        )
        .bind(order_id.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(Error::db(P))?;
        row.as_ref().map(record_from_row).transpose()
    }

    async fn set_state(
        conn: &mut AnyConnection,
        order_id: &AggregateId,
        sql: &'static str,
    ) -> Result<()> {
        sqlx::query(sql)
            .bind(order_id.as_str())
            .execute(&mut *conn)
            .await
            .map_err(Error::db(P))?;
        Ok(())
    }

    async fn apply_authorize(
        &self,
        conn: &mut AnyConnection,
        key: &IdempotencyKey,
        order_id: &AggregateId,
        amount: &Money,
    ) -> Result<PaymentReply> {
        if !amount.is_positive() {
            return Err(Error::invalid(
                "amount",
                format!("{amount} is not positive"),
            ));
        }
        let minor = minor_i64(amount, "amount")?;
        if let Some(existing) = Self::load(conn, order_id).await? {
            if existing.amount_minor != minor || existing.currency != amount.currency().code() {
                return Err(Error::IllegalState {
                    participant: P,
                    reason: format!("order {order_id} already has a payment of another amount"),
                });
            }
            return match existing.state.as_str() {
                "authorized" | "captured" | "settled" => Ok(PaymentReply::Authorized {
                    payment_id: existing.payment_id,
                    amount: *amount,
                }),
                state => Err(Error::IllegalState {
                    participant: P,
                    reason: format!(
                        "order {order_id}'s payment is {state}; it cannot be authorized again"
                    ),
                }),
            };
        }
        let reason = if minor > Self::AUTHORIZATION_LIMIT_MINOR {
            Some(format!("{amount} is above the authorization limit"))
        } else if self.faults.declines(order_id.as_str()) {
            Some("card declined by the issuer (injected)".to_owned())
        } else {
            None
        };
        if let Some(reason) = reason {
            sqlx::query(
                "INSERT INTO payment_declines (order_id, reason) VALUES ($1, $2)
                 ON CONFLICT (order_id) DO UPDATE SET reason = excluded.reason",
            )
            .bind(order_id.as_str())
            .bind(&reason)
            .execute(&mut *conn)
            .await
            .map_err(Error::db(P))?;
            return Ok(PaymentReply::Declined { reason });
        }
        let payment_id = format!("pay-{}", db::fnv1a_hex(key.as_str()));
        sqlx::query(
            "INSERT INTO payment_payments (order_id, payment_id, currency, amount_minor, state)
             VALUES ($1, $2, $3, $4, 'authorized')",
        )
        .bind(order_id.as_str())
        .bind(&payment_id)
        .bind(amount.currency().code())
        .bind(minor)
        .execute(&mut *conn)
        .await
        .map_err(Error::db(P))?;
        Ok(PaymentReply::Authorized {
            payment_id,
            amount: *amount,
        })
    }

    async fn apply_void(conn: &mut AnyConnection, order_id: &AggregateId) -> Result<PaymentReply> {
        match Self::load(conn, order_id).await? {
            Some(p) if p.state == "authorized" => {
                Self::set_state(
                    conn,
                    order_id,
                    "UPDATE payment_payments SET state = 'voided' WHERE order_id = $1",
                )
                .await?;
                Ok(PaymentReply::Voided { dropped: true })
            }
            Some(p) if p.state == "captured" || p.state == "settled" => Err(Error::IllegalState {
                participant: P,
                reason: format!(
                    "order {order_id}'s payment is {}; refund it before voiding",
                    p.state
                ),
            }),
            _ => Ok(PaymentReply::Voided { dropped: false }),
        }
    }

    async fn apply_capture(
        conn: &mut AnyConnection,
        order_id: &AggregateId,
    ) -> Result<PaymentReply> {
        let Some(p) = Self::load(conn, order_id).await? else {
            return Err(Error::NotFound {
                participant: P,
                what: format!("authorization of order {order_id}"),
            });
        };
        match p.state.as_str() {
            "authorized" => {
                Self::set_state(
                    conn,
                    order_id,
                    "UPDATE payment_payments SET state = 'captured', captured_minor = amount_minor WHERE order_id = $1",
                )
                .await?;
            }
            "captured" | "settled" => {}
            state => {
                return Err(Error::IllegalState {
                    participant: P,
                    reason: format!("order {order_id}'s payment is {state}; it cannot be captured"),
                });
            }
        }
        Ok(PaymentReply::Captured {
            payment_id: p.payment_id,
            amount: money(p.amount_minor, &p.currency)?,
        })
    }

    async fn apply_refund(
        conn: &mut AnyConnection,
        order_id: &AggregateId,
    ) -> Result<PaymentReply> {
        match Self::load(conn, order_id).await? {
            Some(p) if p.state == "captured" => {
                Self::set_state(
                    conn,
                    order_id,
                    "UPDATE payment_payments SET state = 'refunded', refunded_minor = captured_minor WHERE order_id = $1",
                )
                .await?;
                Ok(PaymentReply::Refunded {
                    amount: Some(money(p.captured_minor, &p.currency)?),
                })
            }
            Some(p) if p.state == "settled" => Err(Error::IllegalState {
                participant: P,
                reason: format!(
                    "order {order_id}'s payment is settled; refunds after settlement are not modelled"
                ),
            }),
            _ => Ok(PaymentReply::Refunded { amount: None }),
        }
    }

    async fn apply_settle(
        conn: &mut AnyConnection,
        order_id: &AggregateId,
    ) -> Result<PaymentReply> {
        match Self::load(conn, order_id).await? {
            Some(p) if p.state == "captured" => {
                Self::set_state(
                    conn,
                    order_id,
                    "UPDATE payment_payments SET state = 'settled', settled_minor = captured_minor WHERE order_id = $1",
                )
                .await?;
                Ok(PaymentReply::Settled {
                    amount: money(p.captured_minor, &p.currency)?,
                })
            }
            Some(p) if p.state == "settled" => Ok(PaymentReply::Settled {
                amount: money(p.settled_minor, &p.currency)?,
            }),
            _ => Err(Error::IllegalState {
                participant: P,
                reason: format!("order {order_id} has no captured payment to settle"),
            }),
        }
    }
}

fn record_from_row(r: &sqlx::any::AnyRow) -> Result<PaymentRecord> {
    (|| {
        Ok(PaymentRecord {
            order_id: r.try_get(0)?,
            payment_id: r.try_get(1)?,
            currency: r.try_get(2)?,
            amount_minor: r.try_get(3)?,
            state: r.try_get(4)?,
            captured_minor: r.try_get(5)?,
            refunded_minor: r.try_get(6)?,
            settled_minor: r.try_get(7)?,
        })
    })()
    .map_err(Error::db(P))
}

impl Participant for Payment {
    const NAME: &'static str = P;
    type Command = PaymentCommand;
    type Reply = PaymentReply;

    fn business_failure(reply: &PaymentReply) -> Option<String> {
        match reply {
            PaymentReply::Declined { reason } => Some(format!("payment declined: {reason}")),
            _ => None,
        }
    }

    fn database(&self) -> &Database {
        &self.db
    }

    fn faults(&self) -> &Arc<FaultInjector> {
        &self.faults
    }

    async fn apply(
        &self,
        conn: &mut AnyConnection,
        key: &IdempotencyKey,
        command: &PaymentCommand,
    ) -> Result<PaymentReply> {
        match command {
            PaymentCommand::Authorize { order_id, amount } => {
                self.apply_authorize(conn, key, order_id, amount).await
            }
            PaymentCommand::Void { order_id } => Self::apply_void(conn, order_id).await,
            PaymentCommand::Capture { order_id } => Self::apply_capture(conn, order_id).await,
            PaymentCommand::Refund { order_id } => Self::apply_refund(conn, order_id).await,
            PaymentCommand::Settle { order_id } => Self::apply_settle(conn, order_id).await,
        }
    }
}
