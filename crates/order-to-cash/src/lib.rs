//! # vextrus-order-to-cash
//!
//! The order-to-cash reference system, built only from vextrus's own parts,
//! and the main job a new user runs first ([`demo::run_demo`], wired to
//! `vextrus demo` by the CLI).
//!
//! ## Participants
//!
//! Each participant has its own store and its own commands and replies; all
//! amounts are [`vextrus_kernel::Money`].
//!
//! - [`sales`]: the event-sourced [`sales::Order`] aggregate, saved through
//!   [`vextrus_core::EventSourcedRepository`] (on SQLite, PostgreSQL or in
//!   memory).
//! - [`inventory`]: stock per SKU (on hand, reserved, shipped); reserve all
//!   or nothing, release, ship.
//! - [`payment`]: authorize (declines by rule or injection), capture, void,
//!   refund, settle.
//! - [`shipping`]: create and cancel shipments.
//! - [`accounting`]: a double-entry ledger, every entry balanced per
//!   currency; invoices, reversals, settlements.
//!
//! Inventory, payment, shipping and accounting keep their state in SQL
//! tables ([`Database`]: portable SQL, SQLite or PostgreSQL, migrations as
//! `.sql` files in `migrations/`). Each command runs in ONE transaction with
//! its idempotency record ([`Participant`]): the key is claimed atomically,
//! the reply stored under it, and a retry with the same key gets the
//! identical reply with no second effect.
//!
//! ## The saga
//!
//! [`saga::definition`] is the `order_to_cash` saga on the vextrus saga
//! engine: validate order -> reserve inventory -> authorize payment ->
//! create shipment -> dispatch stock -> capture payment -> post invoice ->
//! complete, each completed step compensated in reverse order when a later
//! one fails. Remote steps are commands through the orchestrator's outbox;
//! each participant handles a command in one transaction with its inbox
//! entry and its reply, which goes out through the participant's own outbox
//! ([`participant::deliver`], [`participant::serve`]); the orchestrator
//! takes replies through its inbox. [`node`] runs any part (or all of them)
//! over the in-process broker, NATS JetStream or Kafka.
//!
//! ## Failure injection and invariants
//!
//! [`FaultInjector`] decides, from one seed, declined payments, stock
//! reported out, refused shipments, invalid orders, handler crashes before
//! commit and replies held past the step timeout. [`invariants::check`]
//! checks the business invariants over a snapshot of every participant.
//!
//! ```
//! use vextrus_order_to_cash::demo::{DemoConfig, run_demo};
//!
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! let report = run_demo(DemoConfig { orders: 30, seed: 3, ..DemoConfig::default() }, None)
//!     .await
//!     .unwrap();
//! assert_eq!(report.orders, 30);
//! assert!(report.invariants.is_ok(), "{report}");
//! # });
//! ```

pub mod accounting;
pub mod db;
pub mod demo;
pub mod error;
pub mod faults;
pub mod invariants;
pub mod inventory;
pub mod node;
pub mod participant;
pub mod payment;
pub mod saga;
pub mod sales;
pub mod shipping;
pub mod step_metrics;

pub use db::{Backend, Database, Durability, IdempotencyKey, Migration};
pub use error::{Error, Result};
pub use faults::{FaultConfig, FaultInjector, InjectedCounts};
pub use participant::Participant;
pub use step_metrics::{StepTiming, StepTimings};
