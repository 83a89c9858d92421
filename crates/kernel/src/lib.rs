//! # vextrus-kernel
//!
//! The domain-driven-design building blocks every vextrus service is made of:
//! entities with audit tracking, aggregate roots that turn commands into
//! domain events, event metadata (ids, correlation, causation, W3C trace
//! context, tenant, actor), value objects, repositories, specifications,
//! `Money`, and the [`ErrorKind`]s every vextrus error is sorted into.

pub mod aggregate;
pub mod entity;
pub mod error;
pub mod event;
pub mod money;
pub mod repository;
pub mod specification;
pub mod value_object;

pub use error::{ErrorKind, HasErrorKind};
pub use event::*;
pub use money::{Currency, Money, MoneyError, RoundingMode};

pub use aggregate::{Aggregate, AggregateRoot, CommandContext};
pub use entity::{Audit, Entity};
pub use repository::{InMemoryRepository, Repository, RepositoryError};
pub use specification::{
    AllOf, And, AnyOf, FnSpec, Not, Or, Specification, all_of, any_of, spec_fn,
};
pub use value_object::{
    AggregateId, EmailAddress, NonEmptyText, Quantity, Sku, ValueObject, ValueObjectError,
};
