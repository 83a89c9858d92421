//! Serde: `{"amount":"12.34","currency":"BDT"}`, with the amount as a string.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::ser::{SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};

use super::{Currency, Money};

impl Serialize for Money {
    /// Writes `{"amount":"12.34","currency":"BDT"}`: the amount as a string
    /// with exactly the currency's decimals (`"1235"` for yen, `"1.500"` for
    /// Kuwaiti dinar), so no reader ever sees a float.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut state = serializer.serialize_struct("Money", 2)?;
        state.serialize_field("amount", &self.plain_amount())?;
        state.serialize_field("currency", &self.currency)?;
        state.end()
    }
}

impl<'de> Deserialize<'de> for Money {
    /// Reads `{"amount":"12.34","currency":"BDT"}`. Refused, with a message
    /// naming the problem: a numeric amount (`12.34` rather than `"12.34"`),
    /// an amount with more decimals than the currency allows, digit grouping
    /// or symbols in the amount, an unknown currency, a missing or unknown
    /// field.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let Wire { amount, currency } = Wire::deserialize(deserializer)?;
        Money::parse_plain_amount(&amount.0, currency).map_err(de::Error::custom)
    }
}

/// The wire shape, checked field by field before the amount is parsed.
#[derive(Deserialize)]
#[serde(rename = "Money", deny_unknown_fields)]
struct Wire {
    amount: AmountText,
    currency: Currency,
}

/// An amount that arrived as a string, never as a number.
struct AmountText(String);

impl<'de> Deserialize<'de> for AmountText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;

        impl Visitor<'_> for TextVisitor {
            type Value = AmountText;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "the amount as a decimal string such as \"12.34\" \
                     (numbers are refused: a float cannot hold money exactly)",
                )
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<AmountText, E> {
                Ok(AmountText(text.to_owned()))
            }
        }

        deserializer.deserialize_str(TextVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_amount_as_string_with_the_currency_scale() {
        let json = |m: Money| serde_json::to_string(&m).unwrap();
        assert_eq!(
            json(Money::from_minor(1234, Currency::BDT)),
            r#"{"amount":"12.34","currency":"BDT"}"#
        );
        assert_eq!(
            json(Money::from_minor(1235, Currency::JPY)),
            r#"{"amount":"1235","currency":"JPY"}"#
        );
        assert_eq!(
            json(Money::from_minor(-1500, Currency::KWD)),
            r#"{"amount":"-1.500","currency":"KWD"}"#
        );
    }

    #[test]
    fn numeric_amounts_are_refused_with_a_clear_message() {
        for body in [
            r#"{"amount":12.34,"currency":"USD"}"#,
            r#"{"amount":12,"currency":"USD"}"#,
        ] {
            let err = serde_json::from_str::<Money>(body).unwrap_err().to_string();
            assert!(err.contains("decimal string"), "{err}");
        }
    }

    #[test]
    fn other_bad_bodies_are_refused() {
        let err = |body: &str| serde_json::from_str::<Money>(body).unwrap_err().to_string();
        assert!(err(r#"{"amount":"1.234","currency":"USD"}"#).contains("more decimals than USD"));
        assert!(err(r#"{"amount":"1.00","currency":"XYZ"}"#).contains("unknown currency code"));
        assert!(err(r#"{"amount":"1.00"}"#).contains("missing field `currency`"));
        assert!(err(r#"{"amount":"1.00","currency":"USD","fx":1}"#).contains("unknown field"));
        assert!(err(r#"{"amount":"1,000.00","currency":"USD"}"#).contains("grouping"));
        assert!(err(r#"{"amount":"","currency":"USD"}"#).contains("at least one digit"));
    }
}
