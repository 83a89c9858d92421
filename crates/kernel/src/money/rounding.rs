//! Rounding modes and the exact integer arithmetic behind every rounded result.
//!
//! Amounts are handled as integer counts of minor units (`u128` magnitudes plus
//! a sign). Products such as `amount × rate` can need up to 192 bits before the
//! division that brings them back to the currency's scale, so this module
//! multiplies into 256 bits and divides back exactly; the result is then
//! rounded once, with the chosen mode. Going through `Decimal` multiplication
//! instead would round silently whenever a product needs more than 96 bits and
//! then round a second time to the minor unit (double rounding).

use serde::{Deserialize, Serialize};

/// How a result that falls between two minor units is brought onto one.
///
/// All modes are symmetric around zero: `-2.345` rounds to the negation of
/// what `2.345` rounds to. The default is [`RoundingMode::HalfEven`]
/// (banker's rounding), which does not drift upwards when many values are
/// rounded and summed.
///
/// | value    | `HalfEven` | `HalfUp` | `TowardsZero` | `AwayFromZero` |
/// |----------|-----------:|---------:|--------------:|---------------:|
/// | `2.345`  | `2.34`     | `2.35`   | `2.34`        | `2.35`         |
/// | `2.355`  | `2.36`     | `2.36`   | `2.35`        | `2.36`         |
/// | `-2.345` | `-2.34`    | `-2.35`  | `-2.34`       | `-2.35`        |
/// | `2.341`  | `2.34`     | `2.34`   | `2.34`        | `2.35`         |
///
/// ```
/// use rust_decimal::Decimal;
/// use vextrus_kernel::{Currency, Money, RoundingMode};
///
/// let raw = Decimal::new(2345, 3); // 2.345
/// let even = Money::round(raw, Currency::USD, RoundingMode::HalfEven).unwrap();
/// let up = Money::round(raw, Currency::USD, RoundingMode::HalfUp).unwrap();
/// assert_eq!(even.amount(), Decimal::new(234, 2));
/// assert_eq!(up.amount(), Decimal::new(235, 2));
/// assert_eq!(RoundingMode::default(), RoundingMode::HalfEven);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RoundingMode {
    /// Round to the nearest minor unit; an exact half goes to the even
    /// neighbour (banker's rounding). The default.
    #[default]
    HalfEven,
    /// Round to the nearest minor unit; an exact half goes away from zero
    /// (`2.345 → 2.35`, `-2.345 → -2.35`), as taught in school.
    HalfUp,
    /// Drop the excess digits (truncate): `2.349 → 2.34`, `-2.349 → -2.34`.
    TowardsZero,
    /// Any excess moves the amount to the next minor unit away from zero:
    /// `2.341 → 2.35`, `-2.341 → -2.35`.
    AwayFromZero,
}

/// The largest magnitude a `Decimal` mantissa (and so a `Money` in minor
/// units) can hold: 2^96 - 1.
pub(super) const MAX_MINOR: u128 = (1u128 << 96) - 1;

/// `10^exp`, or `None` when it does not fit in a `u128` (exp > 38).
pub(super) fn pow10(exp: u32) -> Option<u128> {
    10u128.checked_pow(exp)
}

/// `a × b` as a 256-bit number `(high, low)`.
fn mul_wide(a: u128, b: u128) -> (u128, u128) {
    const MASK: u128 = u64::MAX as u128;
    let (a1, a0) = (a >> 64, a & MASK);
    let (b1, b0) = (b >> 64, b & MASK);
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let p11 = a1 * b1;
    // Each term is below 2^64, so the sum is below 3 × 2^64 and cannot overflow.
    let mid = (p00 >> 64) + (p01 & MASK) + (p10 & MASK);
    let low = (p00 & MASK) | (mid << 64);
    let high = p11 + (p01 >> 64) + (p10 >> 64) + (mid >> 64);
    (high, low)
}

/// Divides the 256-bit number `(high, low)` by `d` (non-zero): the quotient as
/// `(high, low)` and the remainder.
fn div_rem_wide(high: u128, low: u128, d: u128) -> ((u128, u128), u128) {
    debug_assert!(d != 0, "division by zero");
    if high == 0 {
        return ((0, low / d), low % d);
    }
    // Binary long division. The remainder stays below `d`; before a shift its
    // top bit may be set, in which case the shifted value is at least 2^128 > d
    // and the subtraction (done modulo 2^128) yields the true, smaller value.
    let (mut q_high, mut q_low, mut rem) = (0u128, 0u128, 0u128);
    for i in (0..256u32).rev() {
        let bit = if i >= 128 {
            (high >> (i - 128)) & 1
        } else {
            (low >> i) & 1
        };
        let carry = rem >> 127;
        rem = (rem << 1) | bit;
        if carry == 1 || rem >= d {
            rem = rem.wrapping_sub(d);
            if i >= 128 {
                q_high |= 1 << (i - 128);
            } else {
                q_low |= 1 << i;
            }
        }
    }
    ((q_high, q_low), rem)
}

/// `a × b / d` as quotient and remainder, or `None` if the quotient does not
/// fit in a `u128`. `d` must be non-zero.
pub(super) fn mul_div_rem(a: u128, b: u128, d: u128) -> Option<(u128, u128)> {
    let (high, low) = mul_wide(a, b);
    let ((q_high, q_low), rem) = div_rem_wide(high, low, d);
    (q_high == 0).then_some((q_low, rem))
}

/// `a × b / d` rounded to an integer with `mode` (magnitudes; every mode is
/// symmetric around zero so the sign does not matter), or `None` if it does
/// not fit in a `u128`. `d` must be non-zero.
pub(super) fn mul_div_round(a: u128, b: u128, d: u128, mode: RoundingMode) -> Option<u128> {
    let (q, rem) = mul_div_rem(a, b, d)?;
    // rem < d, so `d - rem` cannot underflow; comparing rem with d - rem
    // compares the fraction rem/d with one half without overflowing.
    let round_up = match mode {
        RoundingMode::TowardsZero => false,
        RoundingMode::AwayFromZero => rem != 0,
        RoundingMode::HalfUp => rem != 0 && rem >= d - rem,
        RoundingMode::HalfEven => rem > d - rem || (rem == d - rem && q % 2 == 1),
    };
    if round_up { q.checked_add(1) } else { Some(q) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rust_decimal::{Decimal, RoundingStrategy};

    #[test]
    fn wide_multiplication_matches_known_products() {
        assert_eq!(mul_wide(0, u128::MAX), (0, 0));
        assert_eq!(mul_wide(u128::MAX, 1), (0, u128::MAX));
        // (2^128 - 1)^2 = 2^256 - 2^129 + 1
        assert_eq!(mul_wide(u128::MAX, u128::MAX), (u128::MAX - 1, 1));
        assert_eq!(mul_wide(1 << 64, 1 << 64), (1, 0));
    }

    #[test]
    fn wide_division_handles_divisors_with_the_top_bit_set() {
        let d = u128::MAX - 4;
        // (d × 7 + 3) / d = 7 remainder 3
        let (high, low) = mul_wide(d, 7);
        let (low, carry) = low.overflowing_add(3);
        let high = high + u128::from(carry);
        assert_eq!(div_rem_wide(high, low, d), ((0, 7), 3));
    }

    #[test]
    fn quotient_too_wide_is_reported() {
        assert_eq!(mul_div_rem(u128::MAX, u128::MAX, 3), None);
        assert_eq!(
            mul_div_rem(u128::MAX, u128::MAX, u128::MAX),
            Some((u128::MAX, 0))
        );
    }

    #[test]
    fn rounding_an_exact_half_follows_the_mode() {
        // 2345 / 10 = 234.5
        assert_eq!(
            mul_div_round(2345, 1, 10, RoundingMode::HalfEven),
            Some(234)
        );
        assert_eq!(
            mul_div_round(2355, 1, 10, RoundingMode::HalfEven),
            Some(236)
        );
        assert_eq!(mul_div_round(2345, 1, 10, RoundingMode::HalfUp), Some(235));
        assert_eq!(
            mul_div_round(2345, 1, 10, RoundingMode::TowardsZero),
            Some(234)
        );
        assert_eq!(
            mul_div_round(2341, 1, 10, RoundingMode::AwayFromZero),
            Some(235)
        );
        assert_eq!(
            mul_div_round(2340, 1, 10, RoundingMode::AwayFromZero),
            Some(234)
        );
        assert_eq!(mul_div_round(u128::MAX, 3, 2, RoundingMode::HalfUp), None);
    }

    fn strategy(mode: RoundingMode) -> RoundingStrategy {
        match mode {
            RoundingMode::HalfEven => RoundingStrategy::MidpointNearestEven,
            RoundingMode::HalfUp => RoundingStrategy::MidpointAwayFromZero,
            RoundingMode::TowardsZero => RoundingStrategy::ToZero,
            RoundingMode::AwayFromZero => RoundingStrategy::AwayFromZero,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Our rounding agrees with rust_decimal's for every mode on values
        /// rust_decimal can represent exactly.
        #[test]
        fn rounding_agrees_with_rust_decimal(
            mantissa in -(1i128 << 90)..(1i128 << 90),
            scale in 0u32..=12,
            dp in 0u32..=4,
            mode in prop_oneof![
                Just(RoundingMode::HalfEven),
                Just(RoundingMode::HalfUp),
                Just(RoundingMode::TowardsZero),
                Just(RoundingMode::AwayFromZero),
            ],
        ) {
            prop_assume!(scale > dp);
            let value = Decimal::from_i128_with_scale(mantissa, scale);
            let expected = value.round_dp_with_strategy(dp, strategy(mode));
            let divisor = pow10(scale - dp).unwrap();
            let magnitude = mul_div_round(mantissa.unsigned_abs(), 1, divisor, mode).unwrap();
            let signed = i128::try_from(magnitude).unwrap() * mantissa.signum();
            prop_assert_eq!(Decimal::from_i128_with_scale(signed, dp), expected);
        }

        /// a × b / d reconstructs exactly: q × d + rem == a × b.
        #[test]
        fn division_is_exact(a in any::<u128>(), b in any::<u128>(), d in 1u128..) {
            let (high, low) = mul_wide(a, b);
            let ((q_high, q_low), rem) = div_rem_wide(high, low, d);
            prop_assert!(rem < d);
            // q × d + rem, computed in 256 bits, must give back (high, low).
            let (h1, l1) = mul_wide(q_low, d);
            let (h2, l2) = mul_wide(q_high, d);
            // q × d <= a × b < 2^256, so q_high × d × 2^128 must not reach 2^256.
            prop_assert_eq!(h2, 0);
            let (low_sum, carry) = l1.overflowing_add(rem);
            prop_assert_eq!(low_sum, low);
            let high_sum = h1.checked_add(l2).and_then(|h| h.checked_add(u128::from(carry)));
            prop_assert_eq!(high_sum, Some(high));
        }
    }
}
