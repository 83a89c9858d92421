//! Property tests for `Money`: allocation and split always sum to the whole,
//! addition and subtraction are associative within a currency, serde and
//! parse/display round-trip, rounding is exact, and no input makes parsing
//! or arithmetic panic.

use std::cmp::Ordering;

use proptest::prelude::*;
use proptest::sample::select;
use rust_decimal::{Decimal, RoundingStrategy};
use vextrus_kernel::{Currency, Money, MoneyError, RoundingMode};

/// The largest magnitude in minor units: 2^96 - 1.
const MAX_MINOR: i128 = (1 << 96) - 1;

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(384)
}

fn any_currency() -> impl Strategy<Value = Currency> {
    select(Currency::all())
}

fn displayed_currency() -> impl Strategy<Value = Currency> {
    select(vec![
        Currency::BDT,
        Currency::INR,
        Currency::USD,
        Currency::JPY,
        Currency::KWD,
        Currency::EUR,
    ])
}

/// Minor units over the whole range, with small values and the edges well represented.
fn any_minor() -> impl Strategy<Value = i128> {
    prop_oneof![
        3 => -10_000i128..10_000,
        3 => -(1i128 << 64)..(1i128 << 64),
        3 => -MAX_MINOR..=MAX_MINOR,
        1 => select(vec![0, 1, -1, MAX_MINOR, -MAX_MINOR, MAX_MINOR - 1]),
    ]
}

fn any_money() -> impl Strategy<Value = Money> {
    (any_minor(), any_currency())
        .prop_map(|(minor, currency)| Money::try_from_minor(minor, currency).unwrap())
}

fn any_mode() -> impl Strategy<Value = RoundingMode> {
    select(vec![
        RoundingMode::HalfEven,
        RoundingMode::HalfUp,
        RoundingMode::TowardsZero,
        RoundingMode::AwayFromZero,
    ])
}

fn strategy(mode: RoundingMode) -> RoundingStrategy {
    match mode {
        RoundingMode::HalfEven => RoundingStrategy::MidpointNearestEven,
        RoundingMode::HalfUp => RoundingStrategy::MidpointAwayFromZero,
        RoundingMode::TowardsZero => RoundingStrategy::ToZero,
        RoundingMode::AwayFromZero => RoundingStrategy::AwayFromZero,
        other => panic!("no rust_decimal strategy for {other:?}"),
    }
}

fn sum_minor(parts: &[Money]) -> i128 {
    parts.iter().map(Money::to_minor_units).sum()
}

proptest! {
    #![proptest_config(config())]

    // ---- allocation and split -------------------------------------------------

    #[test]
    fn allocation_sums_to_the_whole(
        money in any_money(),
        ratios in prop::collection::vec(0u32..1_000_000, 1..12),
    ) {
        prop_assume!(ratios.iter().any(|&r| r > 0));
        let parts = money.allocate(&ratios).unwrap();
        prop_assert_eq!(parts.len(), ratios.len());
        prop_assert_eq!(sum_minor(&parts), money.to_minor_units());
        for (part, &ratio) in parts.iter().zip(&ratios) {
            prop_assert_eq!(part.currency(), money.currency());
            prop_assert!(!(part.is_negative() && money.is_positive()));
            prop_assert!(!(part.is_positive() && money.is_negative()));
            if ratio == 0 {
                prop_assert!(part.is_zero());
            }
        }
    }

    #[test]
    fn allocation_respects_ratios_within_one_minor_unit(
        minor in -(1i128 << 80)..(1i128 << 80),
        currency in any_currency(),
        ratios in prop::collection::vec(0u32..100_000, 1..12),
    ) {
        prop_assume!(ratios.iter().any(|&r| r > 0));
        let money = Money::try_from_minor(minor, currency).unwrap();
        let parts = money.allocate(&ratios).unwrap();
        let total: i128 = ratios.iter().map(|&r| i128::from(r)).sum();
        for (part, &ratio) in parts.iter().zip(&ratios) {
            // |part - minor × ratio / total| < 1  <=>  |part × total - minor × ratio| < total
            // (|minor| < 2^80, ratio and total < 2^21: no i128 overflow.)
            let error = part.to_minor_units() * total - minor * i128::from(ratio);
            prop_assert!(error.abs() < total, "part {} for ratio {}/{}", part, ratio, total);
        }
    }

    #[test]
    fn allocation_by_decimal_ratios_sums_to_the_whole(
        money in any_money(),
        ratios in prop::collection::vec((0i64..1_000_000_000, 0u32..=9), 1..8),
    ) {
        let ratios: Vec<Decimal> = ratios.into_iter().map(|(m, s)| Decimal::new(m, s)).collect();
        prop_assume!(ratios.iter().any(|r| !r.is_zero()));
        let parts = money.allocate(&ratios).unwrap();
        prop_assert_eq!(sum_minor(&parts), money.to_minor_units());
    }

    #[test]
    fn split_sums_to_the_whole_and_parts_differ_by_at_most_one_unit(
        money in any_money(),
        n in 1usize..64,
    ) {
        let parts = money.split(n).unwrap();
        prop_assert_eq!(parts.len(), n);
        prop_assert_eq!(sum_minor(&parts), money.to_minor_units());
        let magnitudes: Vec<u128> = parts.iter().map(|p| p.to_minor_units().unsigned_abs()).collect();
        let (min, max) = (magnitudes.iter().min().unwrap(), magnitudes.iter().max().unwrap());
        prop_assert!(max - min <= 1);
        // Larger parts first.
        prop_assert!(magnitudes.windows(2).all(|w| w[0] >= w[1]));
        // Splitting equals allocating by equal ratios.
        prop_assert_eq!(money.allocate(&vec![1u32; n]).unwrap(), parts);
    }

    // ---- addition and subtraction ---------------------------------------------

    #[test]
    fn addition_and_subtraction_are_associative_within_a_currency(
        a in -(1i128 << 94)..(1i128 << 94),
        b in -(1i128 << 94)..(1i128 << 94),
        c in -(1i128 << 94)..(1i128 << 94),
        currency in any_currency(),
    ) {
        // Three values below 2^94 never leave the 2^96 range.
        let [a, b, c] = [a, b, c].map(|m| Money::try_from_minor(m, currency).unwrap());
        prop_assert_eq!(((a + b)? + c)?, (a + (b + c)?)?);
        prop_assert_eq!(((a - b)? - c)?, (a - (b + c)?)?);
        prop_assert_eq!(((a + b)? - c)?, (a + (b - c)?)?);
        prop_assert_eq!(((a + b)? - b)?, a);
        prop_assert_eq!((a + b)?, (b + a)?);
        prop_assert_eq!(Money::checked_sum(currency, [a, b, c])?, ((a + b)? + c)?);
    }

    #[test]
    fn addition_is_exact_or_overflows_over_the_whole_range(a in any_money(), b in any_minor()) {
        let b = Money::try_from_minor(b, a.currency()).unwrap();
        let exact = a.to_minor_units() + b.to_minor_units();
        match a.checked_add(b) {
            Ok(sum) => prop_assert_eq!(sum.to_minor_units(), exact),
            Err(err) => {
                prop_assert_eq!(err, MoneyError::Overflow { operation: "checked_add" });
                prop_assert!(exact.abs() > MAX_MINOR);
            }
        }
        // When both groupings fit, they agree.
        let c = -b;
        if let (Ok(left), Ok(right)) = (a.checked_add(b).and_then(|ab| ab.checked_add(c)), b.checked_add(c).and_then(|bc| a.checked_add(bc))) {
            prop_assert_eq!(left, right);
        }
    }

    #[test]
    fn different_currencies_never_combine(a in any_money(), b in any_money()) {
        prop_assume!(a.currency() != b.currency());
        let mismatch = MoneyError::CurrencyMismatch { left: a.currency(), right: b.currency() };
        prop_assert_eq!(a.checked_add(b), Err(mismatch.clone()));
        prop_assert_eq!(a.checked_sub(b), Err(mismatch.clone()));
        prop_assert_eq!(a.checked_cmp(&b), Err(mismatch));
        prop_assert_eq!(a.partial_cmp(&b), None);
    }

    #[test]
    fn ordering_follows_minor_units(a in any_minor(), b in any_minor(), currency in any_currency()) {
        let (x, y) = (Money::try_from_minor(a, currency).unwrap(), Money::try_from_minor(b, currency).unwrap());
        prop_assert_eq!(x.checked_cmp(&y), Ok(a.cmp(&b)));
        prop_assert_eq!(x.partial_cmp(&y), Some(a.cmp(&b)));
        prop_assert_eq!(x == y, a == b);
        prop_assert_eq!((-x).checked_cmp(&(-y)), Ok(b.cmp(&a)));
        prop_assert_eq!(x.abs().checked_cmp(&Money::zero(currency)), Ok(if a == 0 { Ordering::Equal } else { Ordering::Greater }));
    }

    // ---- rounding, rates and construction ---------------------------------------

    #[test]
    fn round_matches_rust_decimal(
        mantissa in -(1i128 << 90)..(1i128 << 90),
        scale in 0u32..=16,
        currency in any_currency(),
        mode in any_mode(),
    ) {
        let value = Decimal::from_i128_with_scale(mantissa, scale);
        let expected = value.round_dp_with_strategy(currency.minor_units(), strategy(mode));
        match Money::round(value, currency, mode) {
            Ok(rounded) => prop_assert_eq!(rounded.amount(), expected),
            Err(err) => {
                prop_assert_eq!(err, MoneyError::Overflow { operation: "round" });
                // Only whole amounts too large for the currency's scale overflow.
                let needed = expected.mantissa().unsigned_abs() * 10u128.pow(currency.minor_units().saturating_sub(expected.scale()));
                prop_assert!(needed > MAX_MINOR as u128);
            }
        }
    }

    #[test]
    fn mul_rate_and_percent_match_exact_decimal_arithmetic(
        minor in -(1i128 << 40)..(1i128 << 40),
        currency in any_currency(),
        rate_mantissa in -(1i64 << 40)..(1i64 << 40),
        rate_scale in 0u32..=10,
        mode in any_mode(),
    ) {
        // Small enough that Decimal multiplication is exact (< 2^80 × 10^14).
        let money = Money::try_from_minor(minor, currency).unwrap();
        let rate = Decimal::new(rate_mantissa, rate_scale);
        let exact = money.amount().checked_mul(rate).unwrap();
        let expected = exact.round_dp_with_strategy(currency.minor_units(), strategy(mode));
        prop_assert_eq!(money.mul_rate(rate, mode).unwrap().amount(), expected);
        let percent_exact = (exact / Decimal::ONE_HUNDRED).round_dp_with_strategy(currency.minor_units(), strategy(mode));
        prop_assert_eq!(money.percent(rate, mode).unwrap().amount(), percent_exact);
    }

    #[test]
    fn convert_matches_exact_decimal_arithmetic(
        minor in -(1i128 << 40)..(1i128 << 40),
        from in any_currency(),
        to in any_currency(),
        rate_mantissa in 1i64..(1i64 << 40),
        rate_scale in 0u32..=10,
        mode in any_mode(),
    ) {
        let money = Money::try_from_minor(minor, from).unwrap();
        let rate = Decimal::new(rate_mantissa, rate_scale);
        let exact = money.amount().checked_mul(rate).unwrap();
        let expected = exact.round_dp_with_strategy(to.minor_units(), strategy(mode));
        let converted = money.convert(rate, to, mode).unwrap();
        prop_assert_eq!(converted.currency(), to);
        prop_assert_eq!(converted.amount(), expected);
    }

    #[test]
    fn arithmetic_never_panics(
        money in any_money(),
        rate in (any::<i64>(), any::<i64>(), 0u32..=28).prop_map(|(hi, lo, s)| {
            let mantissa = (i128::from(hi) << 32) ^ i128::from(lo);
            Decimal::from_i128_with_scale(mantissa % (1i128 << 95), s)
        }),
        mode in any_mode(),
    ) {
        for result in [money.mul_rate(rate, mode), money.percent(rate, mode), Money::round(rate, money.currency(), mode)] {
            match result {
                Ok(m) => prop_assert_eq!(m.amount().scale(), money.currency().minor_units()),
                Err(MoneyError::Overflow { .. }) => {}
                Err(other) => prop_assert!(false, "unexpected error {}", other),
            }
        }
        for to in [Currency::JPY, Currency::KWD, Currency::XAU] {
            match money.convert(rate, to, mode) {
                Ok(m) => prop_assert_eq!(m.amount().scale(), to.minor_units()),
                Err(MoneyError::Overflow { .. }) => {}
                Err(MoneyError::InvalidRate(_)) => prop_assert!(rate.is_sign_negative() || rate.is_zero()),
                Err(other) => prop_assert!(false, "unexpected error {}", other),
            }
        }
        match Money::new(rate, money.currency()) {
            Ok(m) => prop_assert_eq!(m.amount(), rate),
            Err(MoneyError::TooPrecise { .. } | MoneyError::Overflow { .. }) => {}
            Err(other) => prop_assert!(false, "unexpected error {}", other),
        }
    }

    #[test]
    fn new_accepts_trailing_zeros_and_refuses_extra_digits(
        minor in -(1i128 << 80)..(1i128 << 80),
        currency in any_currency(),
        extra in 1u32..=6,
        digit in 1i128..=9,
    ) {
        let money = Money::try_from_minor(minor, currency).unwrap();
        let scale = currency.minor_units() + extra;
        let shifted = minor * 10i128.pow(extra); // < 2^80 × 10^6 < 2^100: no overflow
        // The same value with `extra` zero decimals appended.
        if let Ok(widened) = Decimal::try_from_i128_with_scale(shifted, scale) {
            prop_assert_eq!(Money::new(widened, currency), Ok(money));
        }
        // One more non-zero digit in the last place is too precise.
        let nudged = shifted + if minor < 0 { -digit } else { digit };
        if let Ok(precise) = Decimal::try_from_i128_with_scale(nudged, scale) {
            let is_too_precise = matches!(
                Money::new(precise, currency),
                Err(MoneyError::TooPrecise { max_decimals, .. }) if max_decimals == currency.minor_units()
            );
            prop_assert!(is_too_precise);
        }
    }

    // ---- serde and text round trips ---------------------------------------------

    #[test]
    fn serde_round_trips(money in any_money()) {
        let json = serde_json::to_string(&money).unwrap();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        prop_assert!(value["amount"].is_string());
        prop_assert_eq!(value["currency"].as_str(), Some(money.currency().code()));
        prop_assert_eq!(serde_json::from_str::<Money>(&json).unwrap(), money);
    }

    #[test]
    fn plain_form_round_trips_for_every_currency(money in any_money()) {
        let text = money.to_plain_string();
        prop_assert!(text.starts_with(money.currency().code()));
        prop_assert!(!text.contains(','));
        prop_assert_eq!(text.parse::<Money>().unwrap(), money);
    }

    #[test]
    fn display_round_trips_for_the_main_currencies(minor in any_minor(), currency in displayed_currency()) {
        let money = Money::try_from_minor(minor, currency).unwrap();
        let text = money.to_string();
        prop_assert_eq!(text.parse::<Money>().unwrap(), money, "{}", text);
    }

    #[test]
    fn display_round_trips_for_every_currency(money in any_money()) {
        let text = money.to_string();
        prop_assert_eq!(text.parse::<Money>().unwrap(), money, "{}", text);
    }

    // ---- hostile input ---------------------------------------------------------------

    #[test]
    fn parsing_arbitrary_text_never_panics(text in any::<String>()) {
        if let Ok(money) = text.parse::<Money>() {
            prop_assert_eq!(money.to_plain_string().parse::<Money>().unwrap(), money);
        }
    }

    #[test]
    fn parsing_money_like_text_never_panics(text in r"-?(USD |BDT |KWD |JPY |[$৳₹¥€£]|[A-Z]{3} )?-?[0-9,.]{0,40}") {
        if let Ok(money) = text.parse::<Money>() {
            prop_assert_eq!(money.to_plain_string().parse::<Money>().unwrap(), money);
        }
    }

    #[test]
    fn deserializing_arbitrary_amounts_never_panics(amount in r"[-+0-9.,eE ]{0,40}", currency in any_currency()) {
        let json = serde_json::json!({ "amount": amount, "currency": currency.code() });
        if let Ok(money) = serde_json::from_value::<Money>(json) {
            prop_assert_eq!(money.currency(), currency);
            prop_assert_eq!(money.amount().scale(), currency.minor_units());
        }
    }
}
