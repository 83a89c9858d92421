//! Inventory: stock per SKU (on hand, reserved, shipped) and reservations
//! per order.
//!
//! - **reserve** is all-or-nothing per order: either every line is reserved
//!   (on hand -> reserved) or none is, and the reply says which SKU ran out
//!   ([`InventoryReply::OutOfStock`], a business failure).
//! - **release** (the compensation of reserve) returns an order's reserved
//!   units to on hand, and shipped units too (goods coming back); releasing
//!   an order that reserved nothing is a harmless no-op, so the compensation
//!   of a reserve whose reply was lost always succeeds.
//! - **ship** moves an order's reservation from reserved to shipped, when its
//!   shipment is confirmed.
//!
//! Conservation holds after every commit: `initial = on_hand + reserved +
//! shipped` for each SKU, where `initial` counts every unit ever received.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, Row};
use vextrus_kernel::{AggregateId, Quantity, Sku};

use crate::db::{self, Database, IdempotencyKey, Migration};
use crate::error::{Error, Result};
use crate::faults::FaultInjector;
use crate::participant::Participant;

const P: &str = "inventory";

/// Inventory's migrations.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "inventory",
    sql: include_str!("../migrations/0001_inventory.sql"),
}];

/// A quantity of one SKU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLine {
    /// The SKU.
    pub sku: Sku,
    /// How many units.
    pub quantity: Quantity,
}

/// What inventory can be asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum InventoryCommand {
    /// Adds received units of a SKU to on hand (and to its initial count).
    Receive {
        /// What arrived.
        line: StockLine,
    },
    /// Reserves every line of an order, or none.
    Reserve {
        /// The order.
        order_id: AggregateId,
        /// What it needs (a SKU may appear more than once; quantities add up).
        lines: Vec<StockLine>,
    },
    /// Gives an order's reservation back (compensation of `Reserve`).
    Release {
        /// The order.
        order_id: AggregateId,
    },
    /// Moves an order's reservation from reserved to shipped.
    Ship {
        /// The order.
        order_id: AggregateId,
    },
}

/// What inventory answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum InventoryReply {
    /// Units were received; the SKU's level after.
    Received {
        /// The level after receiving.
        level: StockLevel,
    },
    /// Every line is reserved.
    Reserved {
        /// The order's reserved lines (one per SKU).
        lines: Vec<StockLine>,
    },
    /// A business failure: nothing was reserved.
    OutOfStock {
        /// The first SKU that could not be reserved.
        sku: Sku,
        /// How many units the order needs.
        requested: Quantity,
        /// How many were on hand.
        available: Quantity,
        /// Whether the failure injector decided it (the units may be there).
        injected: bool,
    },
    /// The order's units are back on hand.
    Released {
        /// What was released from reserved.
        released: Vec<StockLine>,
        /// What came back from shipped.
        returned: Vec<StockLine>,
    },
    /// The order's reservation is shipped.
    Shipped {
        /// The shipped lines.
        lines: Vec<StockLine>,
    },
}

/// One SKU's stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLevel {
    /// The SKU.
    pub sku: Sku,
    /// Every unit ever received.
    pub initial: i64,
    /// Free to reserve.
    pub on_hand: i64,
    /// Held for orders.
    pub reserved: i64,
    /// Gone out in shipments.
    pub shipped: i64,
}

/// One order's reservation of one SKU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The order.
    pub order_id: String,
    /// The SKU.
    pub sku: String,
    /// Units.
    pub quantity: i64,
    /// `reserved`, `released` or `shipped`.
    pub state: String,
}

/// The inventory participant.
///
/// ```
/// use std::sync::Arc;
/// use vextrus_kernel::{AggregateId, Quantity, Sku};
/// use vextrus_order_to_cash::inventory::{Inventory, InventoryReply, StockLine};
/// use vextrus_order_to_cash::{Database, FaultInjector, IdempotencyKey};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let inventory = Inventory::new(Database::temporary().await?, Arc::new(FaultInjector::disabled()));
/// inventory.migrate().await?;
/// let sku = Sku::new("WIDGET")?;
/// let line = |n| StockLine { sku: sku.clone(), quantity: Quantity::new(n).unwrap() };
/// inventory.receive(&IdempotencyKey::new("po-1")?, line(10)).await?;
///
/// let order = AggregateId::new("o-1")?;
/// let reply = inventory.reserve(&IdempotencyKey::new("o-1/reserve")?, &order, vec![line(4)]).await?;
/// assert!(matches!(reply, InventoryReply::Reserved { .. }));
/// let level = inventory.stock_level(&sku).await?.unwrap();
/// assert_eq!((level.on_hand, level.reserved), (6, 4));
///
/// // Too much for what is left: nothing reserved.
/// let reply = inventory.reserve(&IdempotencyKey::new("o-2/reserve")?, &AggregateId::new("o-2")?, vec![line(7)]).await?;
/// assert!(matches!(reply, InventoryReply::OutOfStock { available, .. } if available.value() == 6));
///
/// inventory.release(&IdempotencyKey::new("o-1/release")?, &order).await?;
/// assert_eq!(inventory.stock_level(&sku).await?.unwrap().on_hand, 10);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct Inventory {
    db: Database,
    faults: Arc<FaultInjector>,
}

fn merge(lines: &[StockLine]) -> Result<BTreeMap<Sku, Quantity>> {
    let mut merged: BTreeMap<Sku, Quantity> = BTreeMap::new();
    for line in lines {
        if line.quantity.is_zero() {
            return Err(Error::invalid(
                "quantity",
                format!("zero units of {}", line.sku),
            ));
        }
        let entry = merged.entry(line.sku.clone()).or_insert(Quantity::ZERO);
        *entry = entry
            .checked_add(line.quantity)
            .ok_or_else(|| Error::invalid("quantity", "sum overflows"))?;
    }
    Ok(merged)
}

fn to_lines(rows: &[(String, i64)]) -> Result<Vec<StockLine>> {
    rows.iter()
        .map(|(sku, q)| {
            Ok(StockLine {
                sku: Sku::new(sku.clone()).map_err(|e| corrupt(e.to_string()))?,
                quantity: Quantity::new(*q).map_err(|e| corrupt(e.to_string()))?,
            })
        })
        .collect()
}

fn corrupt(reason: String) -> Error {
    Error::Corrupt {
        participant: P,
        reason,
    }
}

impl Inventory {
    /// Inventory over `db`, consulting `faults`.
    pub fn new(db: Database, faults: Arc<FaultInjector>) -> Self {
        Self { db, faults }
    }

    /// Creates or updates inventory's tables.
    pub async fn migrate(&self) -> Result<usize> {
        db::migrate(&self.db, P, MIGRATIONS).await
    }

    /// Receives units of a SKU.
    pub async fn receive(&self, key: &IdempotencyKey, line: StockLine) -> Result<InventoryReply> {
        self.handle(key, &InventoryCommand::Receive { line }).await
    }

    /// Reserves all lines of an order, or none.
    pub async fn reserve(
        &self,
        key: &IdempotencyKey,
        order_id: &AggregateId,
        lines: Vec<StockLine>,
    ) -> Result<InventoryReply> {
        let command = InventoryCommand::Reserve {
            order_id: order_id.clone(),
            lines,
        };
        self.handle(key, &command).await
    }

    /// Releases an order's reservation (compensation).
    pub async fn release(
        &self,
        key: &IdempotencyKey,
        order_id: &AggregateId,
    ) -> Result<InventoryReply> {
        let command = InventoryCommand::Release {
            order_id: order_id.clone(),
        };
        self.handle(key, &command).await
    }

    /// Ships an order's reservation.
    pub async fn ship(
        &self,
        key: &IdempotencyKey,
        order_id: &AggregateId,
    ) -> Result<InventoryReply> {
        let command = InventoryCommand::Ship {
            order_id: order_id.clone(),
        };
        self.handle(key, &command).await
    }

    /// One SKU's level, if the SKU is known.
    pub async fn stock_level(&self, sku: &Sku) -> Result<Option<StockLevel>> {
        let row = sqlx::query(
            "SELECT sku, initial, on_hand, reserved, shipped FROM inventory_stock WHERE sku = $1",
        )
        .bind(sku.as_str())
        .fetch_optional(self.db.pool())
        .await
        .map_err(Error::db(P))?;
        row.map(|r| level_from_row(&r)).transpose()
    }

    /// Every SKU's level, by SKU.
    pub async fn stock_levels(&self) -> Result<Vec<StockLevel>> {
        let rows = sqlx::query(
            "SELECT sku, initial, on_hand, reserved, shipped FROM inventory_stock ORDER BY sku",
        )
        .fetch_all(self.db.pool())
        .await
        .map_err(Error::db(P))?;
        rows.iter().map(level_from_row).collect()
    }

    /// Every reservation, by order and SKU.
    pub async fn reservations(&self) -> Result<Vec<Reservation>> {
        let rows = sqlx::query(
            "SELECT order_id, sku, quantity, state FROM inventory_reservations ORDER BY order_id, sku",
        )
        .fetch_all(self.db.pool())
        .await
        .map_err(Error::db(P))?;
        rows.iter()
            .map(|r| {
                Ok(Reservation {
                    order_id: r.try_get(0)?,
                    sku: r.try_get(1)?,
                    quantity: r.try_get(2)?,
                    state: r.try_get(3)?,
                })
            })
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(Error::db(P))
    }

    async fn order_rows(
        conn: &mut AnyConnection,
        order_id: &AggregateId,
    ) -> Result<Vec<(String, i64, String)>> {
        let rows = sqlx::query(
            "SELECT sku, quantity, state FROM inventory_reservations WHERE order_id = $1 ORDER BY sku",
        )
        .bind(order_id.as_str())
        .fetch_all(&mut *conn)
        .await
        .map_err(Error::db(P))?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(Error::db(P))
    }

    async fn apply_receive(conn: &mut AnyConnection, line: &StockLine) -> Result<InventoryReply> {
        let q = line.quantity.value();
        sqlx::query(
            "INSERT INTO inventory_stock (sku, initial, on_hand, reserved, shipped) VALUES ($1, $2, $2, 0, 0)
             ON CONFLICT (sku) DO UPDATE SET initial = inventory_stock.initial + $2,
                                             on_hand = inventory_stock.on_hand + $2",
        )
        .bind(line.sku.as_str())
        .bind(q)
        .execute(&mut *conn)
        .await
        .map_err(Error::db(P))?;
        let row = sqlx::query(
            "SELECT sku, initial, on_hand, reserved, shipped FROM inventory_stock WHERE sku = $1",
        )
        .bind(line.sku.as_str())
        .fetch_one(&mut *conn)
        .await
        .map_err(Error::db(P))?;
        Ok(InventoryReply::Received {
            level: level_from_row(&row)?,
        })
    }

    async fn apply_reserve(
        &self,
        conn: &mut AnyConnection,
        order_id: &AggregateId,
        lines: &[StockLine],
    ) -> Result<InventoryReply> {
        let merged = merge(lines)?;
        let Some((first_sku, first_q)) = merged.iter().next() else {
            return Err(Error::invalid(
                "lines",
                "an order must reserve at least one line",
            ));
        };
        let existing = Self::order_rows(conn, order_id).await?;
        if !existing.is_empty() {
            if existing.iter().any(|(_, _, state)| state == "released") {
                return Err(Error::IllegalState {
                    participant: P,
                    reason: format!(
                        "order {order_id}'s reservation was released; it cannot be reserved again"
                    ),
                });
            }
            let rows: Vec<(String, i64)> = existing.into_iter().map(|(s, q, _)| (s, q)).collect();
            return Ok(InventoryReply::Reserved {
                lines: to_lines(&rows)?,
            });
        }
        if self.faults.out_of_stock(order_id.as_str()) {
            return Ok(InventoryReply::OutOfStock {
                sku: first_sku.clone(),
                requested: *first_q,
                available: Quantity::ZERO,
                injected: true,
            });
        }
        for (sku, q) in &merged {
            let on_hand: Option<i64> =
                sqlx::query("SELECT on_hand FROM inventory_stock WHERE sku = $1")
                    .bind(sku.as_str())
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(Error::db(P))?
                    .map(|r| r.try_get(0))
                    .transpose()
                    .map_err(Error::db(P))?;
            let available = on_hand.unwrap_or(0);
            if available < q.value() {
                return Ok(InventoryReply::OutOfStock {
                    sku: sku.clone(),
                    requested: *q,
                    available: Quantity::new(available).map_err(|e| corrupt(e.to_string()))?,
                    injected: false,
                });
            }
        }
        for (sku, q) in &merged {
            let updated = sqlx::query(
                "UPDATE inventory_stock SET on_hand = on_hand - $1, reserved = reserved + $1
                 WHERE sku = $2 AND on_hand >= $1",
            )
            .bind(q.value())
            .bind(sku.as_str())
            .execute(&mut *conn)
            .await
            .map_err(Error::db(P))?
            .rows_affected();
            if updated != 1 {
                // Only possible if another writer changed the row inside our
                // transaction, which the write lock rules out: a bug.
                return Err(corrupt(format!(
                    "stock of {sku} changed during a reservation"
                )));
            }
            sqlx::query(
                "INSERT INTO inventory_reservations (order_id, sku, quantity, state) VALUES ($1, $2, $3, 'reserved')",
            )
            .bind(order_id.as_str())
            .bind(sku.as_str())
            .bind(q.value())
            .execute(&mut *conn)
            .await
            .map_err(Error::db(P))?;
        }
        Ok(InventoryReply::Reserved {
            lines: merged
                .into_iter()
                .map(|(sku, quantity)| StockLine { sku, quantity })
                .collect(),
        })
    }

    async fn apply_release(
        conn: &mut AnyConnection,
        order_id: &AggregateId,
    ) -> Result<InventoryReply> {
        let rows = Self::order_rows(conn, order_id).await?;
        let mut released = Vec::new();
        let mut returned = Vec::new();
        for (sku, q, state) in rows {
            let sql = match state.as_str() {
                "reserved" => {
                    "UPDATE inventory_stock SET on_hand = on_hand + $1, reserved = reserved - $1 WHERE sku = $2"
                }
                "shipped" => {
                    "UPDATE inventory_stock SET on_hand = on_hand + $1, shipped = shipped - $1 WHERE sku = $2"
                }
                _ => continue,
            };
            sqlx::query(sql)
                .bind(q)
                .bind(&sku)
                .execute(&mut *conn)
                .await
                .map_err(Error::db(P))?;
            if state == "reserved" {
                released.push((sku, q));
            } else {
                returned.push((sku, q));
            }
        }
        if !released.is_empty() || !returned.is_empty() {
            sqlx::query("UPDATE inventory_reservations SET state = 'released' WHERE order_id = $1")
                .bind(order_id.as_str())
                .execute(&mut *conn)
                .await
                .map_err(Error::db(P))?;
        }
        Ok(InventoryReply::Released {
            released: to_lines(&released)?,
            returned: to_lines(&returned)?,
        })
    }

    async fn apply_ship(
        conn: &mut AnyConnection,
        order_id: &AggregateId,
    ) -> Result<InventoryReply> {
        let rows = Self::order_rows(conn, order_id).await?;
        if rows.is_empty() || rows.iter().any(|(_, _, s)| s == "released") {
            return Err(Error::IllegalState {
                participant: P,
                reason: format!("order {order_id} holds no reservation to ship"),
            });
        }
        for (sku, q, state) in &rows {
            if state == "reserved" {
                sqlx::query(
                    "UPDATE inventory_stock SET reserved = reserved - $1, shipped = shipped + $1 WHERE sku = $2",
                )
                .bind(*q)
                .bind(sku)
                .execute(&mut *conn)
                .await
                .map_err(Error::db(P))?;
            }
        }
        sqlx::query("UPDATE inventory_reservations SET state = 'shipped' WHERE order_id = $1")
            .bind(order_id.as_str())
            .execute(&mut *conn)
            .await
            .map_err(Error::db(P))?;
        let lines: Vec<(String, i64)> = rows.into_iter().map(|(s, q, _)| (s, q)).collect();
        Ok(InventoryReply::Shipped {
            lines: to_lines(&lines)?,
        })
    }
}

fn level_from_row(r: &sqlx::any::AnyRow) -> Result<StockLevel> {
    let sku: String = r.try_get(0).map_err(Error::db(P))?;
    Ok(StockLevel {
        sku: Sku::new(sku).map_err(|e| corrupt(e.to_string()))?,
        initial: r.try_get(1).map_err(Error::db(P))?,
        on_hand: r.try_get(2).map_err(Error::db(P))?,
        reserved: r.try_get(3).map_err(Error::db(P))?,
        shipped: r.try_get(4).map_err(Error::db(P))?,
    })
}

impl Participant for Inventory {
    const NAME: &'static str = P;
    type Command = InventoryCommand;
    type Reply = InventoryReply;

    fn business_failure(reply: &InventoryReply) -> Option<String> {
        match reply {
            InventoryReply::OutOfStock {
                sku,
                requested,
                available,
                injected,
            } => Some(format!(
                "out of stock: {sku} needs {requested}, {available} on hand{}",
                if *injected { " (injected)" } else { "" }
            )),
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
        _key: &IdempotencyKey,
        command: &InventoryCommand,
    ) -> Result<InventoryReply> {
        match command {
            InventoryCommand::Receive { line } => Self::apply_receive(conn, line).await,
            InventoryCommand::Reserve { order_id, lines } => {
                self.apply_reserve(conn, order_id, lines).await
            }
            InventoryCommand::Release { order_id } => Self::apply_release(conn, order_id).await,
            InventoryCommand::Ship { order_id } => Self::apply_ship(conn, order_id).await,
        }
    }
}
