//! Allocation by ratios and equal splits that never lose or invent a minor unit.

use rust_decimal::Decimal;

use super::rounding::{mul_div_rem, pow10};
use super::{Money, MoneyError};

impl Money {
    /// Divides the amount into parts proportional to `ratios`, in minor
    /// units, so that the parts always sum to exactly `self`.
    ///
    /// Each part first gets the whole minor units of its exact share
    /// (`amount × ratio / sum of ratios`, rounded towards zero); the minor
    /// units left over (fewer than the number of parts) go one each to the
    /// parts with the largest remainders, earlier parts first on ties
    /// (the largest-remainder or Hamilton method). So every part is within one
    /// minor unit of its exact share, and a zero ratio always gets zero.
    /// Negative amounts are allocated by magnitude and every part is negative.
    ///
    /// Ratios are any [`AllocationRatio`]: the integer types and [`Decimal`]
    /// (`0.7`, `0.3`). They are refused with [`MoneyError::InvalidRatio`] when
    /// there are none, when one is negative, when all are zero, or when they
    /// are too large to add up exactly.
    ///
    /// ```
    /// use vextrus_kernel::{Currency, Money};
    ///
    /// let profit = Money::from_minor(5, Currency::USD); // $0.05
    /// let shares = profit.allocate(&[70u32, 30]).unwrap();
    /// assert_eq!(shares, [Money::from_minor(4, Currency::USD), Money::from_minor(1, Currency::USD)]);
    ///
    /// let invoice = Money::from_minor(100_000, Currency::BDT); // ৳1,000.00
    /// let parts = invoice.allocate(&[1u32, 1, 1]).unwrap();
    /// let shown: Vec<String> = parts.iter().map(ToString::to_string).collect();
    /// assert_eq!(shown, ["৳333.34", "৳333.33", "৳333.33"]);
    /// ```
    pub fn allocate<R: AllocationRatio>(&self, ratios: &[R]) -> Result<Vec<Money>, MoneyError> {
        let weights = integer_weights(ratios)?;
        let total = weights
            .iter()
            .try_fold(0u128, |sum, &w| sum.checked_add(w))
            .ok_or_else(|| {
                MoneyError::InvalidRatio("the ratios are too large to add up exactly".into())
            })?;
        if total == 0 {
            return Err(MoneyError::InvalidRatio(
                "the ratios are all zero; at least one must be positive".into(),
            ));
        }

        let whole = self.to_minor_units().unsigned_abs();
        let mut shares = Vec::with_capacity(weights.len());
        let mut remainders = Vec::with_capacity(weights.len());
        for &weight in &weights {
            // weight <= total, so the quotient is at most `whole` and fits.
            let (share, remainder) =
                mul_div_rem(whole, weight, total).expect("a share is never larger than the whole");
            shares.push(share);
            remainders.push(remainder);
        }
        let handed_out: u128 = shares.iter().sum();
        // Each remainder is below `total`, so fewer units than parts are left.
        let left_over = usize::try_from(whole - handed_out)
            .expect("fewer minor units are left over than there are parts");
        let mut order: Vec<usize> = (0..weights.len()).collect();
        // Stable sort: equal remainders keep their original order.
        order.sort_by(|&a, &b| remainders[b].cmp(&remainders[a]));
        for &index in order.iter().take(left_over) {
            shares[index] += 1;
        }

        let negative = self.is_negative();
        Ok(shares
            .into_iter()
            .map(|share| self.part(share, negative))
            .collect())
    }

    /// Divides the amount into `parts` parts that differ by at most one minor
    /// unit and sum to exactly `self`; the larger parts come first.
    ///
    /// Fails with [`MoneyError::SplitIntoZero`] when `parts` is zero.
    ///
    /// ```
    /// use vextrus_kernel::{Currency, Money};
    ///
    /// let bill = Money::from_minor(1_000, Currency::JPY);
    /// let shown: Vec<String> = bill.split(3).unwrap().iter().map(ToString::to_string).collect();
    /// assert_eq!(shown, ["¥334", "¥333", "¥333"]);
    ///
    /// let refund = Money::from_minor(-100, Currency::USD);
    /// let shown: Vec<String> = refund.split(3).unwrap().iter().map(ToString::to_string).collect();
    /// assert_eq!(shown, ["-$0.34", "-$0.33", "-$0.33"]);
    /// ```
    pub fn split(&self, parts: usize) -> Result<Vec<Money>, MoneyError> {
        if parts == 0 {
            return Err(MoneyError::SplitIntoZero);
        }
        let whole = self.to_minor_units().unsigned_abs();
        let count = parts as u128;
        let (base, extra) = (whole / count, whole % count);
        let negative = self.is_negative();
        Ok((0..count)
            .map(|index| self.part(base + u128::from(index < extra), negative))
            .collect())
    }

    /// A part of `self`: `magnitude` minor units (at most `|self|`) with the sign
    /// of `self`.
    fn part(&self, magnitude: u128, negative: bool) -> Money {
        // magnitude <= |self| <= 2^96 - 1.
        let minor = magnitude as i128;
        Money::from_minor_unchecked(if negative { -minor } else { minor }, self.currency)
    }
}

/// A value [`Money::allocate`] accepts as a ratio.
///
/// Implemented for every primitive integer type and for [`Decimal`]; other
/// ratio types can implement it too. Conversion is fallible so that a `u128`
/// or `i128` beyond `Decimal`'s range is refused with
/// [`MoneyError::InvalidRatio`] instead of panicking.
///
/// ```
/// use rust_decimal::Decimal;
/// use vextrus_kernel::money::AllocationRatio;
///
/// assert_eq!(3u32.to_decimal(), Some(Decimal::from(3)));
/// assert_eq!(u128::MAX.to_decimal(), None);
/// ```
pub trait AllocationRatio: Copy {
    /// The ratio as a `Decimal`, or `None` if it cannot be represented as one.
    fn to_decimal(self) -> Option<Decimal>;
}

impl AllocationRatio for Decimal {
    fn to_decimal(self) -> Option<Decimal> {
        Some(self)
    }
}

macro_rules! small_integer_ratio {
    ($($t:ty),*) => {$(
        impl AllocationRatio for $t {
            fn to_decimal(self) -> Option<Decimal> {
                Some(Decimal::from(self))
            }
        }
    )*};
}

small_integer_ratio!(u8, u16, u32, u64, usize, i8, i16, i32, i64, isize);

impl AllocationRatio for i128 {
    fn to_decimal(self) -> Option<Decimal> {
        Decimal::try_from_i128_with_scale(self, 0).ok()
    }
}

impl AllocationRatio for u128 {
    fn to_decimal(self) -> Option<Decimal> {
        i128::try_from(self).ok()?.to_decimal()
    }
}

/// The ratios as non-negative integers with the same proportions (scaled to
/// a common number of decimals).
fn integer_weights<R: AllocationRatio>(ratios: &[R]) -> Result<Vec<u128>, MoneyError> {
    if ratios.is_empty() {
        return Err(MoneyError::InvalidRatio("no ratios were given".into()));
    }
    let ratios = ratios
        .iter()
        .enumerate()
        .map(|(index, ratio)| {
            ratio.to_decimal().ok_or_else(|| {
                MoneyError::InvalidRatio(format!(
                    "ratio at index {index} is too large (a ratio must stay below 2^96)"
                ))
            })
        })
        .collect::<Result<Vec<Decimal>, MoneyError>>()?;
    if let Some((index, ratio)) = ratios
        .iter()
        .enumerate()
        .find(|(_, r)| r.is_sign_negative() && !r.is_zero())
    {
        return Err(MoneyError::InvalidRatio(format!(
            "ratio {ratio} at index {index} is negative"
        )));
    }
    let scale = ratios.iter().map(Decimal::scale).max().unwrap_or(0);
    ratios
        .iter()
        .map(|ratio| {
            pow10(scale - ratio.scale())
                .and_then(|factor| ratio.mantissa().unsigned_abs().checked_mul(factor))
                .ok_or_else(|| {
                    MoneyError::InvalidRatio(format!(
                        "ratio {ratio} is too large to combine exactly with ratios of {scale} decimals"
                    ))
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Currency;

    fn minor(parts: &[Money]) -> Vec<i128> {
        parts.iter().map(Money::to_minor_units).collect()
    }

    #[test]
    fn decimal_ratios_are_brought_to_a_common_scale() {
        let weights =
            integer_weights(&[Decimal::new(7, 1), Decimal::new(25, 2), Decimal::ONE]).unwrap();
        assert_eq!(weights, [70, 25, 100]);
    }

    #[test]
    fn zero_ratios_get_nothing_even_with_units_left_over() {
        let m = Money::from_minor(10, Currency::USD);
        assert_eq!(minor(&m.allocate(&[0u32, 1, 0, 2]).unwrap()), [0, 3, 0, 7]);
    }

    #[test]
    fn ties_go_to_earlier_parts() {
        let m = Money::from_minor(2, Currency::USD);
        assert_eq!(minor(&m.allocate(&[1u32, 1, 1]).unwrap()), [1, 1, 0]);
    }

    #[test]
    fn the_largest_remainder_wins_over_position() {
        // 10 × [1, 2] / 3 = [3.33.., 6.66..]: the second part gets the unit.
        let m = Money::from_minor(10, Currency::USD);
        assert_eq!(minor(&m.allocate(&[1u32, 2]).unwrap()), [3, 7]);
    }

    #[test]
    fn the_largest_amount_allocates_exactly() {
        let max = Money::try_from_minor((1i128 << 96) - 1, Currency::USD).unwrap();
        let parts = max.allocate(&[u32::MAX, 1, 7]).unwrap();
        assert_eq!(minor(&parts).iter().sum::<i128>(), max.to_minor_units());
        let parts = (-max).split(7).unwrap();
        assert_eq!(minor(&parts).iter().sum::<i128>(), -max.to_minor_units());
    }

    #[test]
    fn ratios_too_large_to_combine_or_add_are_refused() {
        let m = Money::from_minor(10, Currency::USD);
        let err = m
            .allocate(&[Decimal::MAX, Decimal::new(1, 28)])
            .unwrap_err();
        assert!(
            matches!(&err, MoneyError::InvalidRatio(r) if r.contains("combine")),
            "{err}"
        );
        // Each weight is about 7.9e37 and fits a u128; five of them do not.
        let mut ratios = vec![Decimal::MAX; 5];
        ratios.push(Decimal::new(1, 9));
        let err = m.allocate(&ratios).unwrap_err();
        assert!(
            matches!(&err, MoneyError::InvalidRatio(r) if r.contains("add up")),
            "{err}"
        );
        let err = m.allocate(&[u128::MAX]).unwrap_err();
        assert!(
            matches!(&err, MoneyError::InvalidRatio(r) if r.contains("below 2^96")),
            "{err}"
        );
        assert_eq!(
            m.allocate(&[i128::from(i64::MAX) * 1000, 1]).unwrap()[1],
            Money::zero(Currency::USD)
        );
    }
}
