//! Shipping: one shipment per order, created or refused by the carrier,
//! and cancelled as a compensation.
//!
//! - **create** books a shipment for an order's items, or replies
//!   [`ShippingReply::Refused`] (a business failure) when the failure
//!   injector has the carrier refuse it.
//! - **cancel** (the compensation of create) cancels the shipment; cancelling
//!   an order that has none is a harmless no-op.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, Row};
use vextrus_kernel::AggregateId;

use crate::db::{self, Database, IdempotencyKey, Migration};
use crate::error::{Error, Result};
use crate::faults::FaultInjector;
use crate::inventory::StockLine;
use crate::participant::Participant;

const P: &str = "shipping";

/// Shipping's migrations.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "shipping",
    sql: include_str!("../migrations/0001_shipping.sql"),
}];

/// What shipping can be asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum ShippingCommand {
    /// Books a shipment of `items` for an order.
    Create {
        /// The order.
        order_id: AggregateId,
        /// What to ship.
        items: Vec<StockLine>,
    },
    /// Cancels an order's shipment (compensation of `Create`).
    Cancel {
        /// The order.
        order_id: AggregateId,
    },
}

/// What shipping answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum ShippingReply {
    /// The shipment is booked.
    Created {
        /// Its id.
        shipment_id: String,
    },
    /// A business failure: the carrier refused; nothing is booked.
    Refused {
        /// Why.
        reason: String,
    },
    /// The shipment is cancelled (or there was none).
    Cancelled {
        /// Whether a shipment was cancelled by this command.
        cancelled: bool,
    },
}

/// One shipment as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipmentRecord {
    /// The order.
    pub order_id: String,
    /// The shipment's id.
    pub shipment_id: String,
    /// `created` or `cancelled`.
    pub state: String,
}

/// The shipping participant.
///
/// ```
/// use std::sync::Arc;
/// use vextrus_kernel::{AggregateId, Quantity, Sku};
/// use vextrus_order_to_cash::inventory::StockLine;
/// use vextrus_order_to_cash::shipping::{Shipping, ShippingReply};
/// use vextrus_order_to_cash::{Database, FaultInjector, IdempotencyKey};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let shipping = Shipping::new(Database::temporary().await?, Arc::new(FaultInjector::disabled()));
/// shipping.migrate().await?;
/// let order = AggregateId::new("o-1")?;
/// let items = vec![StockLine { sku: Sku::new("WIDGET")?, quantity: Quantity::new(2)? }];
/// let reply = shipping.create(&IdempotencyKey::new("o-1/ship")?, &order, items).await?;
/// assert!(matches!(reply, ShippingReply::Created { .. }));
/// let reply = shipping.cancel(&IdempotencyKey::new("o-1/unship")?, &order).await?;
/// assert_eq!(reply, ShippingReply::Cancelled { cancelled: true });
/// assert_eq!(shipping.shipments().await?[0].state, "cancelled");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct Shipping {
    db: Database,
    faults: Arc<FaultInjector>,
}

impl Shipping {
    /// Shipping over `db`, consulting `faults`.
    pub fn new(db: Database, faults: Arc<FaultInjector>) -> Self {
        Self { db, faults }
    }

    /// Creates or updates shipping's tables.
    pub async fn migrate(&self) -> Result<usize> {
        db::migrate(&self.db, P, MIGRATIONS).await
    }

    /// Books a shipment.
    pub async fn create(
        &self,
        key: &IdempotencyKey,
        order_id: &AggregateId,
        items: Vec<StockLine>,
    ) -> Result<ShippingReply> {
        let command = ShippingCommand::Create {
            order_id: order_id.clone(),
            items,
        };
        self.handle(key, &command).await
    }

    /// Cancels a shipment (compensation).
    pub async fn cancel(
        &self,
        key: &IdempotencyKey,
        order_id: &AggregateId,
    ) -> Result<ShippingReply> {
        let order_id = order_id.clone();
        self.handle(key, &ShippingCommand::Cancel { order_id })
            .await
    }

    /// Every shipment, by order.
    pub async fn shipments(&self) -> Result<Vec<ShipmentRecord>> {
        let rows = sqlx::query(
            "SELECT order_id, shipment_id, state FROM shipping_shipments ORDER BY order_id",
        )
        .fetch_all(self.db.pool())
        .await
        .map_err(Error::db(P))?;
        rows.iter()
            .map(|r| {
                Ok(ShipmentRecord {
                    order_id: r.try_get(0)?,
                    shipment_id: r.try_get(1)?,
                    state: r.try_get(2)?,
                })
            })
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(Error::db(P))
    }

    async fn load(
        conn: &mut AnyConnection,
        order_id: &AggregateId,
    ) -> Result<Option<(String, String)>> {
        sqlx::query("SELECT shipment_id, state FROM shipping_shipments WHERE order_id = $1")
            .bind(order_id.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(Error::db(P))?
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .transpose()
            .map_err(Error::db(P))
    }
}

impl Participant for Shipping {
    const NAME: &'static str = P;
    type Command = ShippingCommand;
    type Reply = ShippingReply;

    fn business_failure(reply: &ShippingReply) -> Option<String> {
        match reply {
            ShippingReply::Refused { reason } => Some(format!("shipment refused: {reason}")),
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
        command: &ShippingCommand,
    ) -> Result<ShippingReply> {
        match command {
            ShippingCommand::Create { order_id, items } => {
                if items.is_empty() {
                    return Err(Error::invalid(
                        "items",
                        "a shipment needs at least one item",
                    ));
                }
                match Self::load(conn, order_id).await? {
                    Some((shipment_id, state)) if state == "created" => {
                        return Ok(ShippingReply::Created { shipment_id });
                    }
                    Some(_) => {
                        return Err(Error::IllegalState {
                            participant: P,
                            reason: format!("order {order_id}'s shipment was cancelled"),
                        });
                    }
                    None => {}
                }
                if self.faults.shipping_fails(order_id.as_str()) {
                    return Ok(ShippingReply::Refused {
                        reason: "the carrier refused the shipment (injected)".to_owned(),
                    });
                }
                let shipment_id = format!("shp-{}", db::fnv1a_hex(key.as_str()));
                let items_json = serde_json::to_string(items).map_err(|e| Error::Corrupt {
                    participant: P,
                    reason: e.to_string(),
                })?;
                sqlx::query(
                    "INSERT INTO shipping_shipments (order_id, shipment_id, items, state) VALUES ($1, $2, $3, 'created')",
                )
                .bind(order_id.as_str())
                .bind(&shipment_id)
                .bind(items_json)
                .execute(&mut *conn)
                .await
                .map_err(Error::db(P))?;
                Ok(ShippingReply::Created { shipment_id })
            }
            ShippingCommand::Cancel { order_id } => {
                let cancelled = sqlx::query(
                    "UPDATE shipping_shipments SET state = 'cancelled' WHERE order_id = $1 AND state = 'created'",
                )
                .bind(order_id.as_str())
                .execute(&mut *conn)
                .await
                .map_err(Error::db(P))?
                .rows_affected();
                Ok(ShippingReply::Cancelled {
                    cancelled: cancelled == 1,
                })
            }
        }
    }
}
