//! Specifications: truth tables of the combinators, boolean laws as
//! properties, and rules stored dynamically.

use proptest::prelude::*;
use vextrus_kernel::{Specification, all_of, any_of, spec_fn};

/// A constant rule, to drive truth tables.
#[derive(Debug, Clone, Copy)]
struct Const(bool);

impl Specification<()> for Const {
    fn is_satisfied_by(&self, _: &()) -> bool {
        self.0
    }
}

#[test]
fn truth_tables() {
    for a in [false, true] {
        assert_eq!(Const(a).not().is_satisfied_by(&()), !a, "not {a}");
        for b in [false, true] {
            assert_eq!(
                Const(a).and(Const(b)).is_satisfied_by(&()),
                a && b,
                "{a} and {b}"
            );
            assert_eq!(
                Const(a).or(Const(b)).is_satisfied_by(&()),
                a || b,
                "{a} or {b}"
            );
            assert_eq!(all_of([Const(a), Const(b)]).is_satisfied_by(&()), a && b);
            assert_eq!(any_of([Const(a), Const(b)]).is_satisfied_by(&()), a || b);
        }
    }
}

/// A customer as an ERP credit check sees it.
struct Customer {
    credit_limit: u64,
    open_balance: u64,
    blocked: bool,
    country: &'static str,
}

#[test]
fn business_rules_compose() {
    let within_credit = spec_fn(|c: &Customer| c.open_balance <= c.credit_limit);
    let blocked = spec_fn(|c: &Customer| c.blocked);
    let domestic = spec_fn(|c: &Customer| c.country == "BD");
    let may_order = within_credit
        .and(blocked.not())
        .and(domestic.or(spec_fn(|c: &Customer| {
            // Export customers need twice the headroom.
            c.open_balance.saturating_mul(2) <= c.credit_limit
        })));

    let ok = Customer {
        credit_limit: 1000,
        open_balance: 400,
        blocked: false,
        country: "BD",
    };
    let export_tight = Customer {
        credit_limit: 1000,
        open_balance: 600,
        blocked: false,
        country: "IN",
    };
    let export_fine = Customer {
        credit_limit: 1000,
        open_balance: 400,
        blocked: false,
        country: "IN",
    };
    let blocked_one = Customer {
        blocked: true,
        ..ok
    };
    let over = Customer {
        credit_limit: 100,
        open_balance: 400,
        blocked: false,
        country: "BD",
    };

    assert!(may_order.is_satisfied_by(&ok));
    assert!(!may_order.is_satisfied_by(&export_tight));
    assert!(may_order.is_satisfied_by(&export_fine));
    assert!(!may_order.is_satisfied_by(&blocked_one));
    assert!(!may_order.is_satisfied_by(&over));
}

#[test]
fn rules_chosen_at_run_time() {
    // Per-tenant rule sets, assembled from configuration.
    fn rule(name: &str) -> Box<dyn Specification<Customer> + Send + Sync> {
        match name {
            "not_blocked" => Box::new(spec_fn(|c: &Customer| !c.blocked)),
            "domestic" => Box::new(spec_fn(|c: &Customer| c.country == "BD")),
            _ => Box::new(spec_fn(|c: &Customer| c.open_balance <= c.credit_limit)),
        }
    }
    let strict = all_of(["not_blocked", "domestic", "credit"].map(rule));
    let lenient = any_of(["not_blocked", "domestic"].map(rule));
    let export = Customer {
        credit_limit: 10,
        open_balance: 0,
        blocked: false,
        country: "NP",
    };
    assert!(!strict.is_satisfied_by(&export));
    assert!(lenient.is_satisfied_by(&export));

    // Boxed rules compose with static ones.
    let boxed = rule("domestic");
    assert!(
        boxed
            .or(spec_fn(|c: &Customer| c.country == "NP"))
            .is_satisfied_by(&export)
    );
}

fn threshold(min: i64) -> impl Specification<i64> + Clone {
    spec_fn(move |n: &i64| *n >= min)
}

fn multiple_of(m: i64) -> impl Specification<i64> + Clone {
    spec_fn(move |n: &i64| n % m == 0)
}

proptest! {
    #[test]
    fn de_morgan(a in -50_i64..50, m in 1_i64..7, x in -100_i64..100) {
        let p = threshold(a);
        let q = multiple_of(m);
        // not (p and q) == (not p) or (not q)
        prop_assert_eq!(
            p.clone().and(q.clone()).not().is_satisfied_by(&x),
            p.clone().not().or(q.clone().not()).is_satisfied_by(&x)
        );
        // not (p or q) == (not p) and (not q)
        prop_assert_eq!(
            p.clone().or(q.clone()).not().is_satisfied_by(&x),
            p.clone().not().and(q.clone().not()).is_satisfied_by(&x)
        );
        // Double negation, and agreement with the plain boolean expression.
        prop_assert_eq!(p.clone().not().not().is_satisfied_by(&x), p.is_satisfied_by(&x));
        prop_assert_eq!(
            p.clone().and(q.clone()).is_satisfied_by(&x),
            x >= a && x % m == 0
        );
    }

    #[test]
    fn all_of_and_any_of_agree_with_folded_and_or(
        mins in proptest::collection::vec(-20_i64..20, 0..6),
        x in -30_i64..30,
    ) {
        let rules: Vec<Box<dyn Specification<i64>>> =
            mins.iter().map(|&m| Box::new(threshold(m)) as Box<dyn Specification<i64>>).collect();
        let expected_all = mins.iter().all(|&m| x >= m);
        let expected_any = mins.iter().any(|&m| x >= m);
        prop_assert_eq!(all_of(rules).is_satisfied_by(&x), expected_all);
        let rules: Vec<Box<dyn Specification<i64>>> =
            mins.iter().map(|&m| Box::new(threshold(m)) as Box<dyn Specification<i64>>).collect();
        prop_assert_eq!(any_of(rules).is_satisfied_by(&x), expected_any);
    }
}
