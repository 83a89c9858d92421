//! Specifications: business rules as composable predicates.
//!
//! A [`Specification`] says whether a candidate satisfies a rule ("the order
//! is over the credit limit", "the customer is a wholesale account").
//! Rules combine with [`and`](Specification::and), [`or`](Specification::or)
//! and [`not`](Specification::not) into new rules, and any rule can be boxed
//! (`Box<dyn Specification<T>>`) to be chosen or stored at run time. The
//! combinators are plain structs, so a statically composed rule costs no
//! allocation and is inlined like a hand-written condition.
//!
//! ```
//! use vextrus_kernel::{Specification, spec_fn};
//!
//! struct Order {
//!     total: u32,
//!     customer_blocked: bool,
//! }
//!
//! let large = spec_fn(|o: &Order| o.total > 10_000);
//! let blocked = spec_fn(|o: &Order| o.customer_blocked);
//! let needs_approval = large.or(blocked);
//! let auto_release = needs_approval.not();
//!
//! assert!(auto_release.is_satisfied_by(&Order { total: 500, customer_blocked: false }));
//! assert!(!auto_release.is_satisfied_by(&Order { total: 50_000, customer_blocked: false }));
//! assert!(!auto_release.is_satisfied_by(&Order { total: 500, customer_blocked: true }));
//! ```

use std::rc::Rc;
use std::sync::Arc;

/// A rule that a candidate of type `T` does or does not satisfy.
///
/// Implement it for a named rule type, or use [`spec_fn`] for a closure. It is
/// implemented for `&S`, `Box<S>`, `Rc<S>` and `Arc<S>` of any specification
/// `S` (sized or `dyn`), so rules can be stored dynamically:
///
/// ```
/// use vextrus_kernel::{Specification, spec_fn};
///
/// struct AtLeast(i64);
/// impl Specification<i64> for AtLeast {
///     fn is_satisfied_by(&self, n: &i64) -> bool {
///         *n >= self.0
///     }
/// }
///
/// let rules: Vec<Box<dyn Specification<i64> + Send + Sync>> =
///     vec![Box::new(AtLeast(0)), Box::new(spec_fn(|n: &i64| n % 2 == 0))];
/// let all = |n: i64| rules.iter().all(|r| r.is_satisfied_by(&n));
/// assert!(all(4));
/// assert!(!all(3));
/// assert!(!all(-2));
///
/// // A boxed rule composes like any other.
/// let rule: Box<dyn Specification<i64>> = Box::new(AtLeast(10));
/// assert!(rule.and(AtLeast(20).not()).is_satisfied_by(&15));
/// ```
pub trait Specification<T: ?Sized> {
    /// Whether `candidate` satisfies the rule.
    fn is_satisfied_by(&self, candidate: &T) -> bool;

    /// A rule satisfied when both `self` and `other` are (evaluated left to
    /// right, stopping early).
    fn and<S>(self, other: S) -> And<Self, S>
    where
        Self: Sized,
        S: Specification<T>,
    {
        And {
            left: self,
            right: other,
        }
    }

    /// A rule satisfied when `self` or `other` is (evaluated left to right,
    /// stopping early).
    fn or<S>(self, other: S) -> Or<Self, S>
    where
        Self: Sized,
        S: Specification<T>,
    {
        Or {
            left: self,
            right: other,
        }
    }

    /// A rule satisfied exactly when `self` is not.
    fn not(self) -> Not<Self>
    where
        Self: Sized,
    {
        Not { inner: self }
    }
}

/// Both rules must hold. Built by [`Specification::and`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct And<L, R> {
    left: L,
    right: R,
}

impl<T: ?Sized, L: Specification<T>, R: Specification<T>> Specification<T> for And<L, R> {
    fn is_satisfied_by(&self, candidate: &T) -> bool {
        self.left.is_satisfied_by(candidate) && self.right.is_satisfied_by(candidate)
    }
}

/// At least one rule must hold. Built by [`Specification::or`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Or<L, R> {
    left: L,
    right: R,
}

impl<T: ?Sized, L: Specification<T>, R: Specification<T>> Specification<T> for Or<L, R> {
    fn is_satisfied_by(&self, candidate: &T) -> bool {
        self.left.is_satisfied_by(candidate) || self.right.is_satisfied_by(candidate)
    }
}

/// The rule must not hold. Built by [`Specification::not`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Not<S> {
    inner: S,
}

impl<T: ?Sized, S: Specification<T>> Specification<T> for Not<S> {
    fn is_satisfied_by(&self, candidate: &T) -> bool {
        !self.inner.is_satisfied_by(candidate)
    }
}

/// A rule given by a closure. Built by [`spec_fn`].
///
/// A wrapper rather than an implementation for every `Fn(&T) -> bool`,
/// because that blanket implementation would overlap the ones for `&S` and
/// `Box<S>`.
#[derive(Clone, Copy)]
pub struct FnSpec<F> {
    predicate: F,
}

impl<F> std::fmt::Debug for FnSpec<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnSpec(..)")
    }
}

/// A rule from a closure.
///
/// ```
/// use vextrus_kernel::{Specification, spec_fn};
///
/// let even = spec_fn(|n: &u32| n % 2 == 0);
/// assert!(even.is_satisfied_by(&4));
/// ```
pub fn spec_fn<T: ?Sized, F: Fn(&T) -> bool>(predicate: F) -> FnSpec<F> {
    FnSpec { predicate }
}

impl<T: ?Sized, F: Fn(&T) -> bool> Specification<T> for FnSpec<F> {
    fn is_satisfied_by(&self, candidate: &T) -> bool {
        (self.predicate)(candidate)
    }
}

/// Every rule in the list must hold (true for an empty list). Built by
/// [`all_of`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllOf<S> {
    rules: Vec<S>,
}

/// A rule satisfied when every rule in `rules` is: for rule sets assembled at
/// run time, such as per-tenant validation rules.
///
/// ```
/// use vextrus_kernel::{Specification, all_of, spec_fn};
///
/// let rules: Vec<Box<dyn Specification<str>>> = vec![
///     Box::new(spec_fn(|s: &str| !s.is_empty())),
///     Box::new(spec_fn(|s: &str| s.len() <= 8)),
/// ];
/// let valid_code = all_of(rules);
/// assert!(valid_code.is_satisfied_by("ABC"));
/// assert!(!valid_code.is_satisfied_by(""));
/// ```
pub fn all_of<S>(rules: impl IntoIterator<Item = S>) -> AllOf<S> {
    AllOf {
        rules: rules.into_iter().collect(),
    }
}

impl<T: ?Sized, S: Specification<T>> Specification<T> for AllOf<S> {
    fn is_satisfied_by(&self, candidate: &T) -> bool {
        self.rules
            .iter()
            .all(|rule| rule.is_satisfied_by(candidate))
    }
}

/// At least one rule in the list must hold (false for an empty list). Built
/// by [`any_of`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnyOf<S> {
    rules: Vec<S>,
}

/// A rule satisfied when at least one rule in `rules` is.
///
/// ```
/// use vextrus_kernel::{Specification, any_of, spec_fn};
///
/// // ISO weekday numbers; one closure type, so the rules fit in one array.
/// let weekend = any_of([6_u8, 7].map(|day| spec_fn(move |d: &u8| *d == day)));
/// assert!(weekend.is_satisfied_by(&7));
/// assert!(!weekend.is_satisfied_by(&3));
/// ```
pub fn any_of<S>(rules: impl IntoIterator<Item = S>) -> AnyOf<S> {
    AnyOf {
        rules: rules.into_iter().collect(),
    }
}

impl<T: ?Sized, S: Specification<T>> Specification<T> for AnyOf<S> {
    fn is_satisfied_by(&self, candidate: &T) -> bool {
        self.rules
            .iter()
            .any(|rule| rule.is_satisfied_by(candidate))
    }
}

impl<T: ?Sized, S: Specification<T> + ?Sized> Specification<T> for &S {
    fn is_satisfied_by(&self, candidate: &T) -> bool {
        (**self).is_satisfied_by(candidate)
    }
}

impl<T: ?Sized, S: Specification<T> + ?Sized> Specification<T> for Box<S> {
    fn is_satisfied_by(&self, candidate: &T) -> bool {
        (**self).is_satisfied_by(candidate)
    }
}

impl<T: ?Sized, S: Specification<T> + ?Sized> Specification<T> for Rc<S> {
    fn is_satisfied_by(&self, candidate: &T) -> bool {
        (**self).is_satisfied_by(candidate)
    }
}

impl<T: ?Sized, S: Specification<T> + ?Sized> Specification<T> for Arc<S> {
    fn is_satisfied_by(&self, candidate: &T) -> bool {
        (**self).is_satisfied_by(candidate)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[test]
    fn and_or_stop_early() {
        let calls = Cell::new(0);
        let counted = spec_fn(|_: &()| {
            calls.set(calls.get() + 1);
            true
        });
        let yes = spec_fn(|_: &()| true);
        let no = spec_fn(|_: &()| false);
        assert!(!no.and(&counted).is_satisfied_by(&()));
        assert!(yes.or(&counted).is_satisfied_by(&()));
        assert_eq!(calls.get(), 0);
        assert!(yes.and(&counted).is_satisfied_by(&()));
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn empty_lists() {
        type IntRule = Box<dyn Specification<i32>>;
        let none: Vec<IntRule> = Vec::new();
        assert!(all_of(Vec::<IntRule>::new()).is_satisfied_by(&1));
        assert!(!any_of(none).is_satisfied_by(&1));
    }

    #[test]
    fn shared_rules_through_rc_and_arc() {
        let positive = Arc::new(spec_fn(|n: &i32| *n > 0));
        let local: Rc<dyn Specification<i32>> = Rc::new(spec_fn(|n: &i32| *n < 10));
        let between = Arc::clone(&positive).and(local);
        assert!(between.is_satisfied_by(&5));
        assert!(!between.is_satisfied_by(&10));
        assert!(positive.is_satisfied_by(&1));
        assert_eq!(format!("{:?}", spec_fn(|_: &i32| true)), "FnSpec(..)");
    }
}
