//! `Money`: exact financial arithmetic in ISO 4217 currencies.
//!
//! A [`Money`] is a [`Decimal`] amount in a [`Currency`]. The choices below
//! are deliberate; each one exists to make a class of accounting bug
//! impossible or loud.
//!
//! - **Amounts always sit at the currency's minor unit.** `Money` holds
//!   exactly [`Currency::minor_units`] decimals (`JPY` 0, `BDT`/`USD` 2,
//!   `KWD` 3). [`Money::new`] refuses amounts with more significant decimals
//!   ([`MoneyError::TooPrecise`]) instead of rounding them silently; rounding
//!   is something the caller asks for, with a [`RoundingMode`], through
//!   [`Money::round`], [`Money::mul_rate`], [`Money::percent`] or
//!   [`Money::convert`]. Because the
//!   scale is fixed, `USD 1.5` and `USD 1.50` are the same value, compare and
//!   hash equal, and always print and serialize as `1.50`.
//! - **One currency at a time.** Adding, subtracting or comparing across
//!   currencies is a [`MoneyError::CurrencyMismatch`] (and `partial_cmp`
//!   returns `None`), never a silent mix. Changing currency is always
//!   explicit: [`Money::convert`] takes the exchange rate (a business fact
//!   with a date and a source, so the caller supplies it) and a rounding mode.
//! - **Never a panic on overflow.** Every operation is checked and returns
//!   [`MoneyError::Overflow`] past 2^96 - 1 minor units (`Decimal`'s mantissa
//!   limit, about 7.9 × 10^26 for two-decimal currencies). Sums and
//!   differences are computed exactly on integer minor units; products with a
//!   rate, percentage or exchange rate are computed exactly in 256-bit integers and rounded
//!   once. `Decimal`'s own multiplication would silently round any product
//!   wider than 96 bits and then be rounded again to the minor unit. The
//!   `+`/`-` operators return a `Result` for the same reason; negation cannot
//!   fail and is a plain [`Neg`].
//! - **Allocation never loses or invents a minor unit.**
//!   [`Money::allocate`] and [`Money::split`] hand out whole minor units by
//!   the largest-remainder method, so the parts always sum to the whole,
//!   including for negative amounts.
//! - **Text is unambiguous.** `Display` writes the currency's symbol when it
//!   is unambiguous (`$1,234.50`, `¥1,235`, `€0.99`) and the code otherwise
//!   (`KWD 1.500`, `CNY 12.00`), with South-Asian lakh/crore grouping for
//!   `BDT` and `INR` (`৳1,23,45,678.50`, `₹12,34,567.00`); negatives are
//!   `-৳1.00` and `KWD -1.500`. [`Money::to_plain_string`] writes the
//!   form meant for logs and files, `BDT 12345678.50`. `FromStr` reads both
//!   forms back, checking digit grouping against the currency's convention.
//! - **JSON never touches a float.** Serde writes
//!   `{"amount":"12.34","currency":"BDT"}` with the amount as a string, and
//!   reading refuses numeric amounts, more decimals than the currency has,
//!   unknown currencies and unknown fields, each with a message naming the
//!   problem.
//! - **Currencies without an ISO minor unit** (`XAU`, `XDR`, `XXX`, …) get
//!   [`Currency::FALLBACK_MINOR_UNITS`] (4) decimals.
//! - **Every error is a validation error** ([`crate::ErrorKind::Validation`]),
//!   overflow included; see [`MoneyError`] for why.
//!
//! ```
//! use rust_decimal::Decimal;
//! use vextrus_kernel::{Currency, Money, RoundingMode};
//!
//! let price = Money::new(Decimal::new(1_234_567_850, 2), Currency::BDT)?;
//! assert_eq!(price.to_string(), "৳1,23,45,678.50");
//! assert_eq!(price.to_plain_string(), "BDT 12345678.50");
//!
//! // 15% VAT, rounded half-even to the paisa.
//! let vat = price.percent(Decimal::new(15, 0), RoundingMode::HalfEven)?;
//! let total = price.checked_add(vat)?;
//! assert_eq!(total.to_string(), "৳1,41,97,530.28");
//!
//! // Three instalments that add up to the total, to the paisa.
//! let parts = total.split(3)?;
//! assert_eq!(parts.iter().map(Money::to_minor_units).sum::<i128>(), total.to_minor_units());
//!
//! // On the wire, the amount is a string.
//! let json = serde_json::to_string(&price).unwrap();
//! assert_eq!(json, r#"{"amount":"12345678.50","currency":"BDT"}"#);
//! assert_eq!(serde_json::from_str::<Money>(&json).unwrap(), price);
//! # Ok::<(), vextrus_kernel::MoneyError>(())
//! ```

mod allocate;
mod currency;
mod error;
mod format;
mod rounding;
mod serialization;

use std::cmp::Ordering;
use std::ops::{Add, Neg, Sub};

pub use rust_decimal::Decimal;

pub use allocate::AllocationRatio;
pub use currency::{Currency, DigitGrouping};
pub use error::MoneyError;
pub use rounding::RoundingMode;

use rounding::{MAX_MINOR, mul_div_round, pow10};

/// An amount of money in one currency.
///
/// Immutable and `Copy`. The amount always has exactly the currency's
/// [minor units](Currency::minor_units) as its scale; see the
/// [module documentation](self) for the reasons behind each rule.
///
/// ```
/// use rust_decimal::Decimal;
/// use vextrus_kernel::{Currency, Money, MoneyError, RoundingMode};
///
/// let a = Money::new(Decimal::new(1050, 2), Currency::USD)?; // 10.50
/// let b = Money::from_minor(25, Currency::USD);               // 0.25
/// assert_eq!((a + b)?.to_string(), "$10.75");
/// assert_eq!(a.checked_sub(b)?.amount(), Decimal::new(1025, 2));
/// assert!(b < a);
///
/// // Too many decimals is an error, not a silent rounding...
/// let precise = Decimal::new(10_505, 3); // 10.505
/// assert!(matches!(Money::new(precise, Currency::USD), Err(MoneyError::TooPrecise { .. })));
/// // ...rounding is explicit.
/// let rounded = Money::round(precise, Currency::USD, RoundingMode::HalfEven)?;
/// assert_eq!(rounded.to_string(), "$10.50");
///
/// // Currencies never mix.
/// let yen = Money::from_major(100, Currency::JPY);
/// assert!(matches!(a.checked_add(yen), Err(MoneyError::CurrencyMismatch { .. })));
/// assert_eq!(a.partial_cmp(&yen), None);
/// # Ok::<(), MoneyError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    /// Always at scale `currency.minor_units()`.
    amount: Decimal,
    currency: Currency,
}

impl Money {
    /// `amount` in `currency`.
    ///
    /// Fails with [`MoneyError::TooPrecise`] if the amount has more
    /// significant decimals than the currency's minor unit (trailing zeros
    /// are fine: `1.500` USD is `1.50`), and with [`MoneyError::Overflow`] if
    /// the amount in minor units exceeds 2^96 - 1.
    ///
    /// ```
    /// use rust_decimal::Decimal;
    /// use vextrus_kernel::{Currency, Money};
    ///
    /// let m = Money::new(Decimal::new(1500, 3), Currency::USD).unwrap(); // 1.500
    /// assert_eq!(m.amount().to_string(), "1.50");
    /// assert!(Money::new(Decimal::new(1, 1), Currency::JPY).is_err()); // 0.1 yen
    /// ```
    pub fn new(amount: Decimal, currency: Currency) -> Result<Money, MoneyError> {
        let minor_units = currency.minor_units();
        let scale = amount.scale();
        let mantissa = amount.mantissa();
        let minor = if scale > minor_units {
            let divisor = i128::try_from(pow10(scale - minor_units).ok_or_else(overflow_new)?)
                .map_err(|_| overflow_new())?;
            if mantissa % divisor != 0 {
                return Err(MoneyError::TooPrecise {
                    amount: amount.to_string(),
                    currency,
                    max_decimals: minor_units,
                });
            }
            mantissa / divisor
        } else {
            let factor = i128::try_from(pow10(minor_units - scale).ok_or_else(overflow_new)?)
                .map_err(|_| overflow_new())?;
            mantissa.checked_mul(factor).ok_or_else(overflow_new)?
        };
        Money::checked_from_minor(minor, currency, "new")
    }

    /// `minor` minor units of `currency` (cents, paisa, fils; whole yen).
    ///
    /// Infallible: every `i64` fits. For wider values use
    /// [`Money::try_from_minor`].
    ///
    /// ```
    /// use vextrus_kernel::{Currency, Money};
    ///
    /// assert_eq!(Money::from_minor(1_500, Currency::KWD).to_string(), "KWD 1.500");
    /// assert_eq!(Money::from_minor(1_500, Currency::JPY).to_string(), "¥1,500");
    /// ```
    pub fn from_minor(minor: i64, currency: Currency) -> Money {
        Money::from_minor_unchecked(i128::from(minor), currency)
    }

    /// `minor` minor units of `currency`, failing with
    /// [`MoneyError::Overflow`] if the magnitude exceeds 2^96 - 1.
    ///
    /// ```
    /// use vextrus_kernel::{Currency, Money};
    ///
    /// assert!(Money::try_from_minor(1 << 90, Currency::USD).is_ok());
    /// assert!(Money::try_from_minor(1 << 96, Currency::USD).is_err());
    /// ```
    pub fn try_from_minor(minor: i128, currency: Currency) -> Result<Money, MoneyError> {
        Money::checked_from_minor(minor, currency, "try_from_minor")
    }

    /// `units` whole units of `currency` (dollars, taka, yen), with zero
    /// minor units.
    ///
    /// ```
    /// use vextrus_kernel::{Currency, Money};
    ///
    /// assert_eq!(Money::from_major(12, Currency::USD).to_string(), "$12.00");
    /// ```
    pub fn from_major(units: i64, currency: Currency) -> Money {
        // minor_units() <= FALLBACK_MINOR_UNITS (4), and 2^63 × 10^4 < 2^96.
        let factor = 10i128.pow(currency.minor_units());
        Money::from_minor_unchecked(i128::from(units) * factor, currency)
    }

    /// Zero in `currency`.
    pub fn zero(currency: Currency) -> Money {
        Money::from_minor_unchecked(0, currency)
    }

    /// Rounds `amount` to `currency`'s minor unit with `mode`.
    ///
    /// Fails only with [`MoneyError::Overflow`], when the rounded amount
    /// exceeds 2^96 - 1 minor units.
    ///
    /// ```
    /// use rust_decimal::Decimal;
    /// use vextrus_kernel::{Currency, Money, RoundingMode};
    ///
    /// let raw = Decimal::new(-2345, 3); // -2.345
    /// let toward = Money::round(raw, Currency::USD, RoundingMode::TowardsZero).unwrap();
    /// let away = Money::round(raw, Currency::USD, RoundingMode::AwayFromZero).unwrap();
    /// assert_eq!(toward.amount(), Decimal::new(-234, 2));
    /// assert_eq!(away.amount(), Decimal::new(-235, 2));
    /// ```
    pub fn round(
        amount: Decimal,
        currency: Currency,
        mode: RoundingMode,
    ) -> Result<Money, MoneyError> {
        const OP: &str = "round";
        let minor_units = currency.minor_units();
        let scale = amount.scale();
        let (factor, divisor) = if scale > minor_units {
            (1, pow10(scale - minor_units))
        } else {
            (
                pow10(minor_units - scale).ok_or(MoneyError::overflow(OP))?,
                Some(1),
            )
        };
        let divisor = divisor.ok_or(MoneyError::overflow(OP))?;
        let magnitude = mul_div_round(amount.mantissa().unsigned_abs(), factor, divisor, mode)
            .ok_or(MoneyError::overflow(OP))?;
        Money::from_magnitude(magnitude, amount.is_sign_negative(), currency, OP)
    }

    /// The amount, with exactly [`Currency::minor_units`] decimals.
    pub fn amount(&self) -> Decimal {
        self.amount
    }

    /// The currency.
    pub fn currency(&self) -> Currency {
        self.currency
    }

    /// The amount in minor units: `USD 12.34` is `1234`, `JPY 500` is `500`.
    pub fn to_minor_units(&self) -> i128 {
        self.amount.mantissa()
    }

    /// Whether the amount is zero.
    pub fn is_zero(&self) -> bool {
        self.amount.is_zero()
    }

    /// Whether the amount is greater than zero.
    pub fn is_positive(&self) -> bool {
        self.to_minor_units() > 0
    }

    /// Whether the amount is less than zero.
    pub fn is_negative(&self) -> bool {
        self.to_minor_units() < 0
    }

    /// The amount without its sign.
    pub fn abs(&self) -> Money {
        Money::from_minor_unchecked(self.to_minor_units().abs(), self.currency)
    }

    /// `self + other`, or [`MoneyError::CurrencyMismatch`] /
    /// [`MoneyError::Overflow`].
    ///
    /// ```
    /// use vextrus_kernel::{Currency, Money};
    ///
    /// let sum = Money::from_minor(150, Currency::INR)
    ///     .checked_add(Money::from_minor(-200, Currency::INR))
    ///     .unwrap();
    /// assert_eq!(sum.to_string(), "-₹0.50");
    /// ```
    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(&other)?;
        // Both sides are below 2^96 in magnitude, so i128 cannot overflow here;
        // the range check happens in `checked_from_minor`.
        let minor = self.to_minor_units() + other.to_minor_units();
        Money::checked_from_minor(minor, self.currency, "checked_add")
    }

    /// `self - other`, or [`MoneyError::CurrencyMismatch`] /
    /// [`MoneyError::Overflow`].
    pub fn checked_sub(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(&other)?;
        let minor = self.to_minor_units() - other.to_minor_units();
        Money::checked_from_minor(minor, self.currency, "checked_sub")
    }

    /// The sum of `items`, all in `currency` (zero if there are none).
    ///
    /// ```
    /// use vextrus_kernel::{Currency, Money};
    ///
    /// let lines = [Money::from_minor(1_000, Currency::EUR), Money::from_minor(250, Currency::EUR)];
    /// let total = Money::checked_sum(Currency::EUR, lines).unwrap();
    /// assert_eq!(total.to_string(), "€12.50");
    /// ```
    pub fn checked_sum<I>(currency: Currency, items: I) -> Result<Money, MoneyError>
    where
        I: IntoIterator<Item = Money>,
    {
        items
            .into_iter()
            .try_fold(Money::zero(currency), Money::checked_add)
    }

    /// `self × rate`, rounded once to the minor unit with `mode`.
    ///
    /// The product is computed exactly, however many digits `rate` has, so the
    /// only rounding is the one asked for. Fails with
    /// [`MoneyError::Overflow`] if the result does not fit.
    ///
    /// ```
    /// use rust_decimal::Decimal;
    /// use vextrus_kernel::{Currency, Money, RoundingMode};
    ///
    /// let unit_price = Money::from_minor(333, Currency::USD); // 3.33
    /// let rate = Decimal::new(15, 1);                          // × 1.5 = 4.995
    /// assert_eq!(unit_price.mul_rate(rate, RoundingMode::HalfEven).unwrap().to_string(), "$5.00");
    /// assert_eq!(unit_price.mul_rate(rate, RoundingMode::TowardsZero).unwrap().to_string(), "$4.99");
    /// ```
    pub fn mul_rate(self, rate: Decimal, mode: RoundingMode) -> Result<Money, MoneyError> {
        self.scaled(rate, rate.scale(), mode, "mul_rate")
    }

    /// `percent`% of `self` (`self × percent / 100`), rounded once to the
    /// minor unit with `mode`.
    ///
    /// ```
    /// use rust_decimal::Decimal;
    /// use vextrus_kernel::{Currency, Money, RoundingMode};
    ///
    /// let net = Money::from_minor(1_999, Currency::EUR);           // 19.99
    /// let vat = net.percent(Decimal::new(19, 0), RoundingMode::HalfUp).unwrap(); // 3.7981
    /// assert_eq!(vat.to_string(), "€3.80");
    /// ```
    pub fn percent(self, percent: Decimal, mode: RoundingMode) -> Result<Money, MoneyError> {
        // percent has at most 28 decimals, so 10^(28 + 2) fits in a u128.
        self.scaled(percent, percent.scale() + 2, mode, "percent")
    }

    /// `self` converted into `to` at `rate`, rounded once to `to`'s minor
    /// unit with `mode`.
    ///
    /// `rate` is how many units of `to` one unit of `self`'s currency is
    /// worth: converting USD to BDT at `121.5` turns `$10.00` into
    /// `৳1,215.00`. The product is exact, as in [`Money::mul_rate`]. A rate
    /// that is zero or negative is refused with [`MoneyError::InvalidRate`];
    /// a result beyond the representable range is [`MoneyError::Overflow`].
    ///
    /// ```
    /// use rust_decimal::Decimal;
    /// use vextrus_kernel::{Currency, Money, RoundingMode};
    ///
    /// let usd = Money::from_minor(1_000, Currency::USD);              // $10.00
    /// let rate = Decimal::new(1215, 1);                               // 1 USD = 121.5 BDT
    /// let bdt = usd.convert(rate, Currency::BDT, RoundingMode::HalfEven).unwrap();
    /// assert_eq!(bdt.to_string(), "৳1,215.00");
    ///
    /// // Into a currency without decimals, the rounding mode decides.
    /// let yen_rate = Decimal::new(15_075, 2);                         // 1 USD = 150.75 JPY
    /// let cents = Money::from_minor(10, Currency::USD);                // $0.10 = ¥15.075
    /// let yen = cents.convert(yen_rate, Currency::JPY, RoundingMode::HalfEven).unwrap();
    /// assert_eq!(yen.to_string(), "¥15");
    /// ```
    pub fn convert(
        self,
        rate: Decimal,
        to: Currency,
        mode: RoundingMode,
    ) -> Result<Money, MoneyError> {
        const OP: &str = "convert";
        if rate.is_sign_negative() || rate.is_zero() {
            return Err(MoneyError::InvalidRate(format!(
                "the exchange rate from {} to {to} must be positive, not {rate}",
                self.currency
            )));
        }
        // In `to`'s minor units: minor × rate × 10^to_units / 10^from_units,
        // where rate = mantissa / 10^scale.
        let factor = pow10(to.minor_units())
            .and_then(|unit| rate.mantissa().unsigned_abs().checked_mul(unit))
            .ok_or(MoneyError::overflow(OP))?;
        let divisor =
            pow10(self.currency.minor_units() + rate.scale()).ok_or(MoneyError::overflow(OP))?;
        let magnitude = mul_div_round(self.to_minor_units().unsigned_abs(), factor, divisor, mode)
            .ok_or(MoneyError::overflow(OP))?;
        Money::from_magnitude(magnitude, self.is_negative(), to, OP)
    }

    /// Compares two amounts of one currency, or fails with
    /// [`MoneyError::CurrencyMismatch`].
    ///
    /// ```
    /// use std::cmp::Ordering;
    /// use vextrus_kernel::{Currency, Money};
    ///
    /// let a = Money::from_minor(100, Currency::USD);
    /// assert_eq!(a.checked_cmp(&Money::from_minor(99, Currency::USD)), Ok(Ordering::Greater));
    /// assert!(a.checked_cmp(&Money::from_minor(100, Currency::EUR)).is_err());
    /// ```
    pub fn checked_cmp(&self, other: &Money) -> Result<Ordering, MoneyError> {
        self.same_currency(other)?;
        Ok(self.to_minor_units().cmp(&other.to_minor_units()))
    }

    /// `self × factor / 10^divisor_exp`, rounded with `mode`.
    fn scaled(
        self,
        factor: Decimal,
        divisor_exp: u32,
        mode: RoundingMode,
        op: &'static str,
    ) -> Result<Money, MoneyError> {
        let divisor = pow10(divisor_exp).ok_or(MoneyError::overflow(op))?;
        let magnitude = mul_div_round(
            self.to_minor_units().unsigned_abs(),
            factor.mantissa().unsigned_abs(),
            divisor,
            mode,
        )
        .ok_or(MoneyError::overflow(op))?;
        let negative = (self.to_minor_units() < 0) != factor.is_sign_negative();
        Money::from_magnitude(magnitude, negative, self.currency, op)
    }

    fn same_currency(&self, other: &Money) -> Result<(), MoneyError> {
        if self.currency == other.currency {
            Ok(())
        } else {
            Err(MoneyError::CurrencyMismatch {
                left: self.currency,
                right: other.currency,
            })
        }
    }

    /// A money value from a magnitude in minor units and a sign.
    fn from_magnitude(
        magnitude: u128,
        negative: bool,
        currency: Currency,
        op: &'static str,
    ) -> Result<Money, MoneyError> {
        if magnitude > MAX_MINOR {
            return Err(MoneyError::overflow(op));
        }
        // magnitude <= 2^96 - 1 fits in an i128.
        let minor = magnitude as i128;
        Ok(Money::from_minor_unchecked(
            if negative { -minor } else { minor },
            currency,
        ))
    }

    fn checked_from_minor(
        minor: i128,
        currency: Currency,
        op: &'static str,
    ) -> Result<Money, MoneyError> {
        if minor.unsigned_abs() > MAX_MINOR {
            return Err(MoneyError::overflow(op));
        }
        Ok(Money::from_minor_unchecked(minor, currency))
    }

    /// Callers guarantee `|minor| <= 2^96 - 1`; the scale is at most 4.
    fn from_minor_unchecked(minor: i128, currency: Currency) -> Money {
        debug_assert!(minor.unsigned_abs() <= MAX_MINOR);
        Money {
            amount: Decimal::from_i128_with_scale(minor, currency.minor_units()),
            currency,
        }
    }
}

fn overflow_new() -> MoneyError {
    MoneyError::overflow("new")
}

impl PartialOrd for Money {
    /// Orders amounts of one currency; amounts in different currencies are
    /// not comparable (`None`). Use [`Money::checked_cmp`] to get an error
    /// instead.
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        self.checked_cmp(other).ok()
    }
}

impl Add for Money {
    type Output = Result<Money, MoneyError>;

    /// [`Money::checked_add`] as an operator: `(a + b)?`.
    fn add(self, other: Money) -> Self::Output {
        self.checked_add(other)
    }
}

impl Sub for Money {
    type Output = Result<Money, MoneyError>;

    /// [`Money::checked_sub`] as an operator: `(a - b)?`.
    fn sub(self, other: Money) -> Self::Output {
        self.checked_sub(other)
    }
}

impl Neg for Money {
    type Output = Money;

    /// The amount with its sign flipped. Cannot overflow: the representable
    /// range is symmetric around zero.
    fn neg(self) -> Money {
        Money::from_minor_unchecked(-self.to_minor_units(), self.currency)
    }
}
