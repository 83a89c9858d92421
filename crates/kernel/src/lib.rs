//! # vextrus-kernel
//!
//! The domain-driven-design building blocks every vextrus service is made of:
//! entities with audit tracking, aggregate roots that turn commands into
//! domain events, event metadata (ids, correlation, causation, W3C trace
//! context, tenant, actor), value objects, repositories, specifications,
//! `Money`, and the [`ErrorKind`]s every vextrus error is sorted into.

pub mod error;
pub mod event;

pub use error::{ErrorKind, HasErrorKind};
pub use event::*;
