//! Display with symbols and digit grouping, the plain `CODE amount` form, and
//! parsing of both.

use std::fmt;
use std::str::FromStr;

use super::currency::DigitGrouping;
use super::rounding::{MAX_MINOR, pow10};
use super::{Currency, Money, MoneyError};

impl Money {
    /// The unambiguous form for logs, files and config: the code, a space,
    /// and the amount without grouping, such as `"BDT 12345678.50"`,
    /// `"JPY 1235"` or `"USD -5.00"`. [`FromStr`] reads it back.
    ///
    /// ```
    /// use vextrus_kernel::{Currency, Money};
    ///
    /// let m = Money::from_minor(-500, Currency::USD);
    /// assert_eq!(m.to_plain_string(), "USD -5.00");
    /// assert_eq!(m.to_plain_string().parse::<Money>().unwrap(), m);
    /// ```
    pub fn to_plain_string(&self) -> String {
        format!("{} {}", self.currency.code(), self.plain_amount())
    }

    /// The amount alone, without grouping: `"12345678.50"`, `"-5.00"`, `"1235"`.
    pub(super) fn plain_amount(&self) -> String {
        let sign = if self.is_negative() { "-" } else { "" };
        format!("{sign}{}", self.digits(None))
    }

    /// The magnitude's digits with the currency's decimals, grouped or not.
    fn digits(&self, grouping: Option<DigitGrouping>) -> String {
        let minor_units = self.currency.minor_units();
        let magnitude = self.to_minor_units().unsigned_abs();
        let unit = pow10(minor_units).expect("minor units are at most 4");
        let integer = (magnitude / unit).to_string();
        let integer = match grouping {
            Some(grouping) => group(&integer, grouping),
            None => integer,
        };
        if minor_units == 0 {
            integer
        } else {
            let fraction = magnitude % unit;
            format!("{integer}.{fraction:0width$}", width = minor_units as usize)
        }
    }

    /// Parses a plain amount (`"-12.5"`, `"1234.50"`; no grouping, no
    /// symbol) in `currency`, as used by the serde form.
    pub(super) fn parse_plain_amount(text: &str, currency: Currency) -> Result<Money, MoneyError> {
        let (negative, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        parse_number(text, digits, negative, currency, None)
    }
}

impl fmt::Display for Money {
    /// Writes the amount for people: the symbol when it is unambiguous
    /// (`$1,234.50`, `৳1,23,45,678.50`, `-₹0.50`, `¥1,235`), otherwise the
    /// code and a space (`KWD 1.500`, `CNY -12.00`); digits grouped by the
    /// currency's [`DigitGrouping`]. Honours width and fill (`{:>12}`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.is_negative() { "-" } else { "" };
        let digits = self.digits(Some(self.currency.grouping()));
        let text = match self.currency.display_symbol() {
            Some(symbol) => format!("{sign}{symbol}{digits}"),
            None => format!("{} {sign}{digits}", self.currency.code()),
        };
        f.pad(&text)
    }
}

impl FromStr for Money {
    type Err = MoneyError;

    /// Reads what [`Display`](fmt::Display) and [`Money::to_plain_string`]
    /// write, ignoring surrounding whitespace:
    ///
    /// - `CODE amount`: `USD 1234.50`, `USD 1,234.50`, `KWD -1.500`,
    ///   `BDT 1,23,45,678.50`;
    /// - `[-]SYMBOL amount` for currencies with a
    ///   [display symbol](Currency::display_symbol): `$1,234.50`, `-৳1.00`,
    ///   `¥1,235`.
    ///
    /// The amount may omit trailing decimals (`USD 12.5`) and may be written
    /// without grouping; if it is grouped, the grouping must follow the
    /// currency's convention (`₹12,34,567.00`, not `₹1,234,567.00`).
    /// Errors: [`MoneyError::UnknownCurrency`] for an unknown code,
    /// [`MoneyError::TooPrecise`] for too many decimals,
    /// [`MoneyError::Overflow`] for an amount out of range, and
    /// [`MoneyError::Parse`] for anything else, saying what was wrong.
    ///
    /// ```
    /// use vextrus_kernel::{Currency, Money, MoneyError};
    ///
    /// let m: Money = "৳1,23,45,678.50".parse().unwrap();
    /// assert_eq!(m, Money::from_minor(1_234_567_850, Currency::BDT));
    /// assert_eq!("BDT 12345678.50".parse::<Money>().unwrap(), m);
    /// assert_eq!("KWD -1.5".parse::<Money>().unwrap(), Money::from_minor(-1_500, Currency::KWD));
    /// assert!(matches!("₹1,234,567.00".parse::<Money>(), Err(MoneyError::Parse { .. })));
    /// ```
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let text = input.trim();
        if text.is_empty() {
            return Err(MoneyError::parse(input, "the text is empty"));
        }
        let bytes = text.as_bytes();
        if bytes.len() >= 4 && bytes[..3].iter().all(u8::is_ascii_uppercase) && bytes[3] == b' ' {
            let currency: Currency = text[..3].parse()?;
            let amount = &text[4..];
            let (negative, digits) = match amount.strip_prefix('-') {
                Some(rest) => (true, rest),
                None => (false, amount),
            };
            return parse_number(input, digits, negative, currency, Some(currency.grouping()));
        }

        let (negative, rest) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let Some(start) = rest.find(|ch: char| ch.is_ascii_digit()) else {
            return Err(MoneyError::parse(input, "there are no digits"));
        };
        let symbol = &rest[..start];
        if symbol.is_empty() {
            return Err(MoneyError::parse(
                input,
                "the currency is missing: write a code (\"USD 12.34\") or a symbol (\"$12.34\")",
            ));
        }
        let currency = Currency::from_display_symbol(symbol).ok_or_else(|| {
            MoneyError::parse(
                input,
                format!(
                    "{symbol:?} is not a currency code followed by a space, nor an unambiguous \
                     currency symbol; write the code form, such as \"USD 12.34\""
                ),
            )
        })?;
        parse_number(
            input,
            &rest[start..],
            negative,
            currency,
            Some(currency.grouping()),
        )
    }
}

/// Groups the digits of `integer` (ASCII digits, no sign) with commas.
fn group(integer: &str, grouping: DigitGrouping) -> String {
    let group_len = match grouping {
        DigitGrouping::Western => 3,
        DigitGrouping::SouthAsian => 2,
    };
    if integer.len() <= 3 {
        return integer.to_owned();
    }
    let (mut rest, last) = integer.split_at(integer.len() - 3);
    let mut groups = vec![last];
    while rest.len() > group_len {
        let (head, tail) = rest.split_at(rest.len() - group_len);
        groups.push(tail);
        rest = head;
    }
    groups.push(rest);
    groups.reverse();
    groups.join(",")
}

/// Whether the comma-separated `groups` of an integer follow `grouping`.
fn grouping_is_valid(groups: &[&str], grouping: DigitGrouping) -> bool {
    let (first_max, middle_len) = match grouping {
        DigitGrouping::Western => (3, 3),
        DigitGrouping::SouthAsian => (2, 2),
    };
    let Some((last, init)) = groups.split_last() else {
        return false;
    };
    let Some((first, middle)) = init.split_first() else {
        return false;
    };
    // The last group has three digits; the groups before it have three
    // (Western) or two (South-Asian) digits, except the first, which may be
    // shorter but not empty and does not start with a zero.
    let first_ok = (1..=first_max).contains(&first.len()) && !first.starts_with('0');
    first_ok && middle.iter().all(|g| g.len() == middle_len) && last.len() == 3
}

/// Parses the unsigned amount `digits` (the sign is already stripped) in
/// `currency`. `grouping` is the accepted comma grouping, if any.
fn parse_number(
    input: &str,
    digits: &str,
    negative: bool,
    currency: Currency,
    grouping: Option<DigitGrouping>,
) -> Result<Money, MoneyError> {
    let (integer, fraction) = match digits.split_once('.') {
        Some((integer, fraction)) => (integer, Some(fraction)),
        None => (digits, None),
    };
    if integer.is_empty() {
        return Err(MoneyError::parse(
            input,
            "the amount needs at least one digit before any decimal point",
        ));
    }
    if let Some(bad) = digits
        .chars()
        .find(|&ch| !ch.is_ascii_digit() && ch != '.' && ch != ',')
    {
        return Err(MoneyError::parse(
            input,
            format!("unexpected character {bad:?} in the amount"),
        ));
    }
    let integer_digits = if integer.contains(',') {
        let Some(grouping) = grouping else {
            return Err(MoneyError::parse(
                input,
                "digit grouping is not allowed here: write the amount without commas",
            ));
        };
        let groups: Vec<&str> = integer.split(',').collect();
        if !grouping_is_valid(&groups, grouping) {
            return Err(MoneyError::parse(
                input,
                format!(
                    "the digit grouping does not follow {}'s convention ({})",
                    currency.code(),
                    grouping.describe()
                ),
            ));
        }
        groups.concat()
    } else {
        integer.to_owned()
    };
    let fraction = match fraction {
        None => "",
        Some("") => {
            return Err(MoneyError::parse(
                input,
                "the amount needs at least one digit after the decimal point",
            ));
        }
        Some(fraction) if fraction.contains(['.', ',']) => {
            return Err(MoneyError::parse(
                input,
                "the decimals contain a second decimal point or a comma",
            ));
        }
        Some(fraction) => fraction,
    };

    let minor_units = currency.minor_units();
    let significant = fraction.trim_end_matches('0');
    if significant.len() > minor_units as usize {
        return Err(MoneyError::TooPrecise {
            amount: format!("{}{digits}", if negative { "-" } else { "" }),
            currency,
            max_decimals: minor_units,
        });
    }
    let overflow = || MoneyError::overflow("parse");
    let mut magnitude: u128 = 0;
    let padding = minor_units as usize - significant.len();
    let all_digits = integer_digits
        .bytes()
        .chain(significant.bytes())
        .chain(std::iter::repeat_n(b'0', padding));
    for byte in all_digits {
        magnitude = magnitude
            .checked_mul(10)
            .and_then(|m| m.checked_add(u128::from(byte - b'0')))
            .filter(|&m| m <= MAX_MINOR)
            .ok_or_else(overflow)?;
    }
    Money::from_magnitude(magnitude, negative, currency, "parse")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn western_grouping() {
        assert_eq!(group("1", DigitGrouping::Western), "1");
        assert_eq!(group("999", DigitGrouping::Western), "999");
        assert_eq!(group("1000", DigitGrouping::Western), "1,000");
        assert_eq!(group("1234567", DigitGrouping::Western), "1,234,567");
        assert_eq!(group("123456789", DigitGrouping::Western), "123,456,789");
    }

    #[test]
    fn south_asian_grouping() {
        assert_eq!(group("999", DigitGrouping::SouthAsian), "999");
        assert_eq!(group("1000", DigitGrouping::SouthAsian), "1,000");
        assert_eq!(group("100000", DigitGrouping::SouthAsian), "1,00,000");
        assert_eq!(group("1234567", DigitGrouping::SouthAsian), "12,34,567");
        assert_eq!(group("12345678", DigitGrouping::SouthAsian), "1,23,45,678");
        assert_eq!(
            group("123456789", DigitGrouping::SouthAsian),
            "12,34,56,789"
        );
    }

    #[test]
    fn grouping_validation() {
        let western = DigitGrouping::Western;
        let south_asian = DigitGrouping::SouthAsian;
        assert!(grouping_is_valid(&["1", "234", "567"], western));
        assert!(grouping_is_valid(&["123", "456"], western));
        assert!(!grouping_is_valid(&["1234", "567"], western));
        assert!(!grouping_is_valid(&["1", "23", "567"], western));
        assert!(!grouping_is_valid(&["0", "567"], western));
        assert!(!grouping_is_valid(&["1", "56"], western));
        assert!(!grouping_is_valid(&["", "567"], western));
        assert!(grouping_is_valid(&["1", "23", "45", "678"], south_asian));
        assert!(grouping_is_valid(&["12", "345"], south_asian));
        assert!(!grouping_is_valid(&["123", "456"], south_asian));
        assert!(!grouping_is_valid(&["1", "234", "567"], south_asian));
        assert!(!grouping_is_valid(&["567"], south_asian));
    }

    #[test]
    fn plain_amount_has_no_grouping_and_keeps_the_scale() {
        let m = Money::from_minor(-1_234_567_850, Currency::BDT);
        assert_eq!(m.plain_amount(), "-12345678.50");
        assert_eq!(Money::from_minor(7, Currency::KWD).plain_amount(), "0.007");
        assert_eq!(
            Money::from_minor(1235, Currency::JPY).plain_amount(),
            "1235"
        );
    }

    #[test]
    fn plain_amounts_refuse_grouping_and_symbols() {
        assert!(Money::parse_plain_amount("1,234.50", Currency::USD).is_err());
        assert!(Money::parse_plain_amount("$1.00", Currency::USD).is_err());
        assert!(Money::parse_plain_amount("+1.00", Currency::USD).is_err());
        assert!(Money::parse_plain_amount("1e3", Currency::USD).is_err());
        assert_eq!(
            Money::parse_plain_amount("-0.5", Currency::USD).unwrap(),
            Money::from_minor(-50, Currency::USD)
        );
    }
}
