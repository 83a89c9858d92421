//! The one error type of the money module.

use crate::{ErrorKind, HasErrorKind};

use super::Currency;

/// Longest piece of caller input copied into an error message (in characters).
const MAX_ECHOED_INPUT: usize = 64;

/// Everything that can go wrong with [`Money`](super::Money) and
/// [`Currency`].
///
/// Every variant is [`ErrorKind::Validation`]: each one is caused by the
/// values passed in (mixed currencies, an unknown code, a malformed string, an
/// amount beyond the representable range) and fails the same way on every
/// retry, so an HTTP layer answers 400 and a retry layer gives up at once.
/// That includes [`MoneyError::Overflow`]: amounts beyond roughly 7.9 × 10^28
/// minor units come from bad input (or corrupt data upstream), not from a
/// failure of this code, and reporting them as `Fatal` would turn a
/// client's absurd amount into a server error.
///
/// ```
/// use vextrus_kernel::{Currency, ErrorKind, HasErrorKind, Money, MoneyError};
///
/// let usd = Money::from_minor(100, Currency::USD);
/// let eur = Money::from_minor(100, Currency::EUR);
/// let err = usd.checked_add(eur).unwrap_err();
/// assert_eq!(
///     err,
///     MoneyError::CurrencyMismatch { left: Currency::USD, right: Currency::EUR }
/// );
/// assert_eq!(err.kind(), ErrorKind::Validation);
/// assert_eq!(err.to_string(), "currency mismatch: cannot combine USD with EUR");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MoneyError {
    /// Two amounts in different currencies were added, subtracted or compared.
    #[error("currency mismatch: cannot combine {left} with {right}")]
    CurrencyMismatch {
        /// The currency of the left-hand (receiving) amount.
        left: Currency,
        /// The currency of the right-hand amount.
        right: Currency,
    },
    /// The result does not fit: its magnitude exceeds 2^96 - 1 minor units
    /// (about 7.9 × 10^26 for a two-decimal currency).
    #[error("arithmetic overflow in {operation}: the result exceeds 2^96 - 1 minor units")]
    Overflow {
        /// The operation that overflowed, such as `"checked_add"` or `"parse"`.
        operation: &'static str,
    },
    /// A currency code that is not in ISO 4217 (codes are three upper-case
    /// letters, such as `USD`).
    #[error("unknown currency code {0:?}: expected an ISO 4217 code such as \"USD\"")]
    UnknownCurrency(String),
    /// [`Money::split`](super::Money::split) was asked for zero parts.
    #[error("cannot split money into zero parts")]
    SplitIntoZero,
    /// [`Money::allocate`](super::Money::allocate) was given no ratios,
    /// a negative ratio, ratios that are all zero, or ratios too large to add up.
    #[error("invalid allocation ratios: {0}")]
    InvalidRatio(String),
    /// [`Money::convert`](super::Money::convert) was given an exchange rate
    /// that is zero or negative.
    #[error("invalid exchange rate: {0}")]
    InvalidRate(String),
    /// An amount has more (non-zero) decimals than its currency's minor unit;
    /// use [`Money::round`](super::Money::round) to round it explicitly.
    #[error("{amount} has more decimals than {currency} allows (at most {max_decimals})")]
    TooPrecise {
        /// The amount as it was given.
        amount: String,
        /// The currency it was meant for.
        currency: Currency,
        /// The number of decimals the currency allows.
        max_decimals: u32,
    },
    /// Text that is not a money amount in a form [`Money`](super::Money)
    /// parses.
    #[error("cannot parse money from {input:?}: {reason}")]
    Parse {
        /// The text that was given (cut to its first 64 characters).
        input: String,
        /// What was wrong with it.
        reason: String,
    },
}

impl MoneyError {
    /// A [`MoneyError::Parse`] for `input`, cutting long input short.
    pub(super) fn parse(input: &str, reason: impl Into<String>) -> Self {
        MoneyError::Parse {
            input: echo(input),
            reason: reason.into(),
        }
    }

    /// A [`MoneyError::UnknownCurrency`] for `code`, cutting long input short.
    pub(super) fn unknown_currency(code: &str) -> Self {
        MoneyError::UnknownCurrency(echo(code))
    }

    /// A [`MoneyError::Overflow`] in `operation`.
    pub(super) fn overflow(operation: &'static str) -> Self {
        MoneyError::Overflow { operation }
    }
}

impl HasErrorKind for MoneyError {
    fn kind(&self) -> ErrorKind {
        match self {
            MoneyError::CurrencyMismatch { .. }
            | MoneyError::Overflow { .. }
            | MoneyError::UnknownCurrency(_)
            | MoneyError::SplitIntoZero
            | MoneyError::InvalidRatio(_)
            | MoneyError::InvalidRate(_)
            | MoneyError::TooPrecise { .. }
            | MoneyError::Parse { .. } => ErrorKind::Validation,
        }
    }
}

/// Caller input as it may appear in an error: at most [`MAX_ECHOED_INPUT`]
/// characters, with `…` marking a cut.
fn echo(input: &str) -> String {
    match input.char_indices().nth(MAX_ECHOED_INPUT) {
        Some((cut, _)) => format!("{}…", &input[..cut]),
        None => input.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_input_is_cut_on_a_character_boundary() {
        let long = "৳".repeat(100);
        let MoneyError::Parse { input, .. } = MoneyError::parse(&long, "bad") else {
            panic!("expected a parse error");
        };
        assert_eq!(input.chars().count(), MAX_ECHOED_INPUT + 1);
        assert!(input.ends_with('…'));
        assert_eq!(echo("USD"), "USD");
    }
}
