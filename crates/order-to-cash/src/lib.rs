//! # vextrus-order-to-cash
//!
//! The order-to-cash reference system.
pub mod db;
pub mod error;
pub mod faults;
pub mod inventory;
pub mod participant;

pub use db::{Backend, Database, Durability, IdempotencyKey, Migration};
pub use error::{Error, Result};
pub use faults::{FaultConfig, FaultInjector, InjectedCounts};
pub use participant::Participant;
pub mod accounting;
pub mod payment;
pub mod sales;
pub mod shipping;
pub mod invariants;
pub mod saga;
pub mod demo;
