//! Value objects: small immutable types that are equal by value and can only
//! be built valid.
//!
//! Every value object here has a validating constructor (`new` and
//! `TryFrom`) that returns a typed [`ValueObjectError`] naming the field and
//! what was wrong, no setters, and a serde implementation that runs the same
//! validation on deserialize, so there is no way — not even through JSON from
//! the database or the wire — to hold an invalid one.
//!
//! The ready-made ones are those ERP services keep needing:
//!
//! | type | what it accepts |
//! |---|---|
//! | [`AggregateId`] | 1..=200 bytes, no whitespace or control characters |
//! | [`Quantity`] | a whole number `0..=i64::MAX` |
//! | [`Sku`] | 1..=64 of `A-Z`, `0-9`, `-`, `_` |
//! | [`EmailAddress`] | a light structural check (see its docs) |
//! | [`NonEmptyText`] | any text that is not blank once trimmed |
//!
//! The field name in an error is the value object's own (`"sku"`, `"email"`);
//! a caller validating a request renames it with
//! [`ValueObjectError::with_field`]:
//!
//! ```
//! use vextrus_kernel::{NonEmptyText, ValueObjectError};
//!
//! let err = NonEmptyText::new("   ").map_err(|e| e.with_field("customer_name")).unwrap_err();
//! assert_eq!(err, ValueObjectError::Empty { field: "customer_name" });
//! assert_eq!(err.to_string(), "customer_name must not be empty");
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{ErrorKind, HasErrorKind};

/// Marker for value objects: immutable values compared by value, never by
/// identity.
///
/// The bounds say what a value object must be (cloneable, equal by value,
/// printable for diagnostics); "immutable" is a convention the type keeps by
/// having no `&mut self` methods and only validating constructors.
///
/// ```
/// use vextrus_kernel::{Sku, ValueObject};
///
/// fn same<V: ValueObject>(a: &V, b: &V) -> bool {
///     a == b
/// }
/// assert!(same(&Sku::new("AB-1").unwrap(), &Sku::new("AB-1").unwrap()));
/// ```
pub trait ValueObject: Clone + Eq + fmt::Debug {}

impl ValueObject for crate::TenantId {}
impl ValueObject for crate::ActorId {}

/// Why a value object could not be built.
///
/// Every variant names the field; all are [`ErrorKind::Validation`] errors.
///
/// ```
/// use vextrus_kernel::{ErrorKind, HasErrorKind, Quantity, ValueObjectError};
///
/// let err = Quantity::try_from(-3_i64).unwrap_err();
/// assert_eq!(err, ValueObjectError::Negative { field: "quantity", value: -3 });
/// assert_eq!(err.kind(), ErrorKind::Validation);
/// assert_eq!(err.field(), "quantity");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValueObjectError {
    /// The value was empty (or only whitespace, where that counts as empty).
    #[error("{field} must not be empty")]
    Empty {
        /// The field.
        field: &'static str,
    },
    /// The value was longer than allowed.
    #[error("{field} is too long: {actual} bytes, at most {max} allowed")]
    TooLong {
        /// The field.
        field: &'static str,
        /// The most bytes allowed.
        max: usize,
        /// The bytes given.
        actual: usize,
    },
    /// The value held a character the field does not allow.
    #[error("{field} contains {character:?}, which is not allowed (allowed: {allowed})")]
    InvalidCharacter {
        /// The field.
        field: &'static str,
        /// The first offending character.
        character: char,
        /// What the field allows.
        allowed: &'static str,
    },
    /// A number that must not be negative was.
    #[error("{field} must not be negative, got {value}")]
    Negative {
        /// The field.
        field: &'static str,
        /// The value given.
        value: i64,
    },
    /// A number was outside the range the field can hold.
    #[error("{field} is out of range: {reason}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The range rule that was broken.
        reason: &'static str,
    },
    /// The value did not have the required structure.
    #[error("{field} is malformed: {reason}")]
    Malformed {
        /// The field.
        field: &'static str,
        /// What was wrong with it.
        reason: &'static str,
    },
}

impl ValueObjectError {
    /// The name of the field that was invalid.
    pub fn field(&self) -> &'static str {
        match self {
            ValueObjectError::Empty { field }
            | ValueObjectError::TooLong { field, .. }
            | ValueObjectError::InvalidCharacter { field, .. }
            | ValueObjectError::Negative { field, .. }
            | ValueObjectError::OutOfRange { field, .. }
            | ValueObjectError::Malformed { field, .. } => field,
        }
    }

    /// The same error, naming `field` instead (for example the request field
    /// the value came from).
    pub fn with_field(mut self, field: &'static str) -> Self {
        match &mut self {
            ValueObjectError::Empty { field: f }
            | ValueObjectError::TooLong { field: f, .. }
            | ValueObjectError::InvalidCharacter { field: f, .. }
            | ValueObjectError::Negative { field: f, .. }
            | ValueObjectError::OutOfRange { field: f, .. }
            | ValueObjectError::Malformed { field: f, .. } => *f = field,
        }
        self
    }
}

impl HasErrorKind for ValueObjectError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Validation
    }
}

/// Implements the string plumbing shared by the text value objects:
/// `Display`, `FromStr`, `TryFrom<String>`, `TryFrom<&str>`, `AsRef<str>`,
/// `From<Self> for String` and the marker trait. Serde goes through
/// `TryFrom<String>` (declared on each type), so deserializing validates.
macro_rules! text_value_object {
    ($name:ident) => {
        impl $name {
            /// The value as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The value as an owned `String`.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = ValueObjectError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValueObjectError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = ValueObjectError;
            fn try_from(value: &str) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> Self {
                value.0
            }
        }

        impl ValueObject for $name {}
    };
}

/// The identity of one aggregate instance within its type, such as an order
/// number or a UUID.
///
/// Non-empty, at most [`AggregateId::MAX_LEN`] bytes, with no whitespace or
/// control characters (so it can be put in a stream id, a log line or a
/// message header unquoted). An aggregate's event stream is named
/// `"{TYPE}-{id}"` (see [`AggregateRoot::stream_id`](crate::AggregateRoot::stream_id)).
///
/// ```
/// use vextrus_kernel::AggregateId;
///
/// let id = AggregateId::new("SO-2024-0001").unwrap();
/// assert_eq!(id.as_str(), "SO-2024-0001");
/// assert!(AggregateId::new("").is_err());
/// assert!(AggregateId::new("has space").is_err());
/// // A fresh, time-ordered id when the caller has none:
/// let generated = AggregateId::generate();
/// assert_eq!(generated.as_str().len(), 36);
/// // Deserializing validates too.
/// assert!(serde_json::from_str::<AggregateId>("\"\"").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AggregateId(String);

impl AggregateId {
    /// The longest id accepted, in bytes.
    pub const MAX_LEN: usize = 200;

    /// Validates and wraps an id.
    pub fn new(value: impl Into<String>) -> Result<Self, ValueObjectError> {
        const FIELD: &str = "aggregate_id";
        let value = value.into();
        if value.is_empty() {
            return Err(ValueObjectError::Empty { field: FIELD });
        }
        if value.len() > Self::MAX_LEN {
            return Err(ValueObjectError::TooLong {
                field: FIELD,
                max: Self::MAX_LEN,
                actual: value.len(),
            });
        }
        if let Some(character) = value.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(ValueObjectError::InvalidCharacter {
                field: FIELD,
                character,
                allowed: "any character except whitespace and control characters",
            });
        }
        Ok(Self(value))
    }

    /// A new id from a fresh UUIDv7 (ids generated later sort later).
    pub fn generate() -> Self {
        Self::from(Uuid::now_v7())
    }
}

impl From<Uuid> for AggregateId {
    fn from(value: Uuid) -> Self {
        // A hyphenated UUID is 36 ASCII hex digits and dashes: always valid.
        Self(value.hyphenated().to_string())
    }
}

text_value_object!(AggregateId);

/// A non-negative whole quantity of something (units on hand, units ordered).
///
/// Held as an `i64` that is never negative, so every `Quantity` fits a SQL
/// `BIGINT` and a JSON integer exactly. Arithmetic is checked: adding past
/// `i64::MAX` or subtracting below zero gives `None` rather than wrapping.
///
/// ```
/// use vextrus_kernel::{Quantity, ValueObjectError};
///
/// let on_hand = Quantity::try_from(10_i64).unwrap();
/// let ordered = Quantity::new(4).unwrap();
/// assert_eq!(on_hand.checked_sub(ordered), Some(Quantity::new(6).unwrap()));
/// assert_eq!(ordered.checked_sub(on_hand), None); // would go negative
/// assert!(matches!(Quantity::try_from(-1_i64), Err(ValueObjectError::Negative { value: -1, .. })));
/// // JSON is a plain integer, validated on the way in.
/// assert_eq!(serde_json::to_string(&on_hand).unwrap(), "10");
/// assert!(serde_json::from_str::<Quantity>("-5").is_err());
/// ```
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(try_from = "i64", into = "i64")]
pub struct Quantity(i64);

impl Quantity {
    const FIELD: &'static str = "quantity";

    /// Nothing.
    pub const ZERO: Quantity = Quantity(0);

    /// The largest quantity that can be held.
    pub const MAX: Quantity = Quantity(i64::MAX);

    /// Validates a quantity: it must not be negative.
    pub fn new(value: i64) -> Result<Self, ValueObjectError> {
        if value < 0 {
            return Err(ValueObjectError::Negative {
                field: Self::FIELD,
                value,
            });
        }
        Ok(Self(value))
    }

    /// The quantity as an `i64` (never negative).
    pub const fn value(self) -> i64 {
        self.0
    }

    /// Whether the quantity is zero.
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// `self + other`, or `None` if the sum would exceed [`Quantity::MAX`].
    pub fn checked_add(self, other: Quantity) -> Option<Quantity> {
        self.0.checked_add(other.0).map(Quantity)
    }

    /// `self - other`, or `None` if the difference would be negative.
    pub fn checked_sub(self, other: Quantity) -> Option<Quantity> {
        // Both are non-negative, so the subtraction itself cannot overflow.
        let difference = self.0 - other.0;
        (difference >= 0).then_some(Quantity(difference))
    }
}

impl TryFrom<i64> for Quantity {
    type Error = ValueObjectError;
    fn try_from(value: i64) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl TryFrom<u64> for Quantity {
    type Error = ValueObjectError;
    fn try_from(value: u64) -> Result<Self, Self::Error> {
        i64::try_from(value)
            .map(Quantity)
            .map_err(|_| ValueObjectError::OutOfRange {
                field: Self::FIELD,
                reason: "larger than i64::MAX",
            })
    }
}

impl From<u32> for Quantity {
    fn from(value: u32) -> Self {
        Quantity(i64::from(value))
    }
}

impl From<Quantity> for i64 {
    fn from(value: Quantity) -> Self {
        value.0
    }
}

impl From<Quantity> for u64 {
    fn from(value: Quantity) -> Self {
        // Never negative, so the conversion is exact.
        value.0.unsigned_abs()
    }
}

impl FromStr for Quantity {
    type Err = ValueObjectError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let value: i64 = s.trim().parse().map_err(|_| ValueObjectError::Malformed {
            field: Self::FIELD,
            reason: "not a whole number in the i64 range",
        })?;
        Self::new(value)
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl ValueObject for Quantity {}

/// A stock-keeping unit code: 1 to 64 of uppercase ASCII letters, digits,
/// `-` and `_`.
///
/// Lower-case input is rejected rather than silently upper-cased, so the code
/// a user typed and the code stored are never different strings; upper-case
/// it first if that is what the caller wants.
///
/// ```
/// use vextrus_kernel::{Sku, ValueObjectError};
///
/// let sku = Sku::new("WIDGET-42_BLUE").unwrap();
/// assert_eq!(sku.to_string(), "WIDGET-42_BLUE");
/// assert!(matches!(
///     Sku::new("widget"),
///     Err(ValueObjectError::InvalidCharacter { character: 'w', .. })
/// ));
/// assert!(Sku::new("x".repeat(65).to_uppercase()).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sku(String);

impl Sku {
    /// The longest code accepted, in bytes.
    pub const MAX_LEN: usize = 64;

    /// Validates and wraps a code.
    pub fn new(value: impl Into<String>) -> Result<Self, ValueObjectError> {
        const FIELD: &str = "sku";
        let value = value.into();
        if value.is_empty() {
            return Err(ValueObjectError::Empty { field: FIELD });
        }
        if value.len() > Self::MAX_LEN {
            return Err(ValueObjectError::TooLong {
                field: FIELD,
                max: Self::MAX_LEN,
                actual: value.len(),
            });
        }
        if let Some(character) = value
            .chars()
            .find(|c| !matches!(c, 'A'..='Z' | '0'..='9' | '-' | '_'))
        {
            return Err(ValueObjectError::InvalidCharacter {
                field: FIELD,
                character,
                allowed: "uppercase A-Z, digits 0-9, '-' and '_'",
            });
        }
        Ok(Self(value))
    }
}

text_value_object!(Sku);

/// An e-mail address, checked lightly.
///
/// This is a structural check, not RFC 5322 (which allows quoted local parts,
/// comments and IP-literal domains that no ERP form should accept), and not a
/// proof that the mailbox exists. It accepts an address when:
///
/// - it is at most 254 bytes and has no whitespace or control characters;
/// - it has exactly one `@`, with a local part of 1..=64 bytes before it that
///   neither starts nor ends with `.` nor holds `..`;
/// - the domain after it has at least two dot-separated labels, each 1..=63
///   letters (Unicode letters allowed), digits or `-`, not starting or ending
///   with `-`.
///
/// The domain is lower-cased (domains are case-insensitive), the local part is
/// kept as given (it may legally be case-sensitive), so `Ada@Example.COM` and
/// `Ada@example.com` are equal values.
///
/// ```
/// use vextrus_kernel::EmailAddress;
///
/// let email = EmailAddress::new("Ada.Lovelace@Example.COM").unwrap();
/// assert_eq!(email.as_str(), "Ada.Lovelace@example.com");
/// assert_eq!(email.local_part(), "Ada.Lovelace");
/// assert_eq!(email.domain(), "example.com");
/// for bad in ["", "no-at-sign", "a@b", "two@@example.com", "a b@example.com", ".a@example.com"] {
///     assert!(EmailAddress::new(bad).is_err(), "{bad}");
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EmailAddress(String);

impl EmailAddress {
    /// The longest address accepted, in bytes (the SMTP path limit).
    pub const MAX_LEN: usize = 254;

    /// The longest local part accepted, in bytes.
    pub const MAX_LOCAL_LEN: usize = 64;

    /// Validates an address and lower-cases its domain.
    pub fn new(value: impl Into<String>) -> Result<Self, ValueObjectError> {
        const FIELD: &str = "email";
        let malformed = |reason| ValueObjectError::Malformed {
            field: FIELD,
            reason,
        };
        let value = value.into();
        if value.is_empty() {
            return Err(ValueObjectError::Empty { field: FIELD });
        }
        if value.len() > Self::MAX_LEN {
            return Err(ValueObjectError::TooLong {
                field: FIELD,
                max: Self::MAX_LEN,
                actual: value.len(),
            });
        }
        if let Some(character) = value.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(ValueObjectError::InvalidCharacter {
                field: FIELD,
                character,
                allowed: "no whitespace or control characters",
            });
        }
        let mut parts = value.split('@');
        let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(malformed("must contain exactly one '@'"));
        };
        if local.is_empty() {
            return Err(malformed("nothing before the '@'"));
        }
        if local.len() > Self::MAX_LOCAL_LEN {
            return Err(malformed("the part before the '@' is longer than 64 bytes"));
        }
        if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
            return Err(malformed("the part before the '@' has a misplaced '.'"));
        }
        if domain.is_empty() {
            return Err(malformed("nothing after the '@'"));
        }
        let labels: Vec<&str> = domain.split('.').collect();
        if labels.len() < 2 {
            return Err(malformed(
                "the domain needs at least two labels, like example.com",
            ));
        }
        for label in labels {
            if label.is_empty() || label.len() > 63 {
                return Err(malformed("each domain label must be 1 to 63 bytes"));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(malformed("a domain label must not start or end with '-'"));
            }
            if let Some(character) = label.chars().find(|c| !(c.is_alphanumeric() || *c == '-')) {
                return Err(ValueObjectError::InvalidCharacter {
                    field: FIELD,
                    character,
                    allowed: "letters, digits, '-' and '.' in the domain",
                });
            }
        }
        Ok(Self(format!("{local}@{}", domain.to_lowercase())))
    }

    /// The part before the `@`.
    pub fn local_part(&self) -> &str {
        self.0.rsplit_once('@').map_or("", |(local, _)| local)
    }

    /// The (lower-cased) part after the `@`.
    pub fn domain(&self) -> &str {
        self.0.rsplit_once('@').map_or("", |(_, domain)| domain)
    }
}

text_value_object!(EmailAddress);

/// Text that is not blank: leading and trailing whitespace is trimmed, and
/// what is left must not be empty.
///
/// For names, titles, descriptions and reasons that a form must not leave
/// empty. Length limits differ per field, so none is imposed here.
///
/// ```
/// use vextrus_kernel::NonEmptyText;
///
/// let name = NonEmptyText::new("  Acme Trading Ltd.\n").unwrap();
/// assert_eq!(name.as_str(), "Acme Trading Ltd.");
/// assert!(NonEmptyText::new(" \t ").is_err());
/// assert!(serde_json::from_str::<NonEmptyText>("\"  \"").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NonEmptyText(String);

impl NonEmptyText {
    /// Trims `value` and checks that something is left.
    pub fn new(value: impl Into<String>) -> Result<Self, ValueObjectError> {
        let value = value.into();
        let trimmed = value.trim();
        if trimmed.is_empty() {
            return Err(ValueObjectError::Empty { field: "text" });
        }
        if trimmed.len() == value.len() {
            Ok(Self(value))
        } else {
            Ok(Self(trimmed.to_owned()))
        }
    }
}

text_value_object!(NonEmptyText);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregate_id_limits() {
        assert!(AggregateId::new("a".repeat(200)).is_ok());
        assert_eq!(
            AggregateId::new("a".repeat(201)),
            Err(ValueObjectError::TooLong {
                field: "aggregate_id",
                max: 200,
                actual: 201
            })
        );
        assert!(matches!(
            AggregateId::new("a\u{7}b"),
            Err(ValueObjectError::InvalidCharacter {
                character: '\u{7}',
                ..
            })
        ));
        assert!(matches!(
            AggregateId::new("tab\there"),
            Err(ValueObjectError::InvalidCharacter {
                character: '\t',
                ..
            })
        ));
        // Unicode that is neither whitespace nor control is allowed.
        assert!(AggregateId::new("অর্ডার-১").is_ok());
        let uuid = Uuid::now_v7();
        assert_eq!(AggregateId::from(uuid).as_str(), uuid.to_string());
        assert!(AggregateId::generate() < AggregateId::generate());
    }

    #[test]
    fn text_value_objects_round_trip_and_validate_through_serde() {
        let id: AggregateId = serde_json::from_str("\"order-1\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"order-1\"");
        assert!(serde_json::from_str::<AggregateId>("\"a b\"").is_err());

        let sku: Sku = serde_json::from_str("\"AB_1\"").unwrap();
        assert_eq!(sku.as_str(), "AB_1");
        assert!(serde_json::from_str::<Sku>("\"ab\"").is_err());

        let email: EmailAddress = serde_json::from_str("\"x@EXAMPLE.org\"").unwrap();
        assert_eq!(serde_json::to_string(&email).unwrap(), "\"x@example.org\"");
        assert!(serde_json::from_str::<EmailAddress>("\"x@example\"").is_err());

        let text: NonEmptyText = serde_json::from_str("\" hi \"").unwrap();
        assert_eq!(text.as_str(), "hi");
        assert!(serde_json::from_str::<NonEmptyText>("\"\"").is_err());
        // A non-string is rejected too.
        assert!(serde_json::from_str::<Sku>("42").is_err());
    }

    #[test]
    fn sku_rules() {
        assert!(Sku::new("A").is_ok());
        assert!(Sku::new("Z".repeat(64)).is_ok());
        assert!(matches!(
            Sku::new("Z".repeat(65)),
            Err(ValueObjectError::TooLong { .. })
        ));
        assert_eq!(Sku::new(""), Err(ValueObjectError::Empty { field: "sku" }));
        for bad in ["A B", "A.B", "A/B", "É"] {
            assert!(
                matches!(
                    Sku::new(bad),
                    Err(ValueObjectError::InvalidCharacter { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(
            "AB-9".parse::<Sku>().unwrap(),
            Sku::try_from("AB-9").unwrap()
        );
    }

    #[test]
    fn email_rules() {
        let ok = [
            "a@b.co",
            "first.last+tag@sub.example.com",
            "user@bücher.de",
            "o'brien@example.ie",
        ];
        for good in ok {
            assert!(EmailAddress::new(good).is_ok(), "{good}");
        }
        let cases: [(&str, &str); 9] = [
            ("@example.com", "nothing before"),
            ("a@", "nothing after"),
            ("a@b@example.com", "exactly one"),
            ("a..b@example.com", "misplaced"),
            ("a.@example.com", "misplaced"),
            ("a@example..com", "1 to 63"),
            ("a@-example.com", "start or end"),
            ("a@example", "two labels"),
            ("a@exa_mple.com", "allowed"),
        ];
        for (bad, why) in cases {
            let err = EmailAddress::new(bad).unwrap_err();
            assert!(err.to_string().contains(why), "{bad}: {err}");
            assert_eq!(err.field(), "email");
        }
        let long_local = format!("{}@example.com", "a".repeat(65));
        assert!(EmailAddress::new(long_local).is_err());
        let too_long = format!("a@{}.com", "b".repeat(251));
        assert!(matches!(
            EmailAddress::new(too_long),
            Err(ValueObjectError::TooLong { .. })
        ));
        assert_eq!(
            EmailAddress::new("Ada@Example.COM").unwrap(),
            EmailAddress::new("Ada@example.com").unwrap()
        );
        assert_ne!(
            EmailAddress::new("ada@example.com").unwrap(),
            EmailAddress::new("Ada@example.com").unwrap()
        );
    }

    #[test]
    fn quantity_arithmetic_and_conversions() {
        let three = Quantity::new(3).unwrap();
        assert_eq!(
            three.checked_add(Quantity::from(2_u32)),
            Some(Quantity::new(5).unwrap())
        );
        assert_eq!(Quantity::MAX.checked_add(Quantity::from(1_u32)), None);
        assert_eq!(three.checked_sub(three), Some(Quantity::ZERO));
        assert!(three.checked_sub(three).unwrap().is_zero());
        assert_eq!(Quantity::ZERO.checked_sub(Quantity::MAX), None);
        assert_eq!(
            Quantity::MAX.checked_sub(Quantity::ZERO),
            Some(Quantity::MAX)
        );
        assert_eq!(
            Quantity::try_from(u64::MAX),
            Err(ValueObjectError::OutOfRange {
                field: "quantity",
                reason: "larger than i64::MAX"
            })
        );
        assert_eq!(Quantity::try_from(7_u64).unwrap().value(), 7);
        assert_eq!(u64::from(Quantity::MAX), i64::MAX as u64);
        assert_eq!(i64::from(three), 3);
        assert_eq!(" 12 ".parse::<Quantity>().unwrap().value(), 12);
        assert!(matches!(
            "-1".parse::<Quantity>(),
            Err(ValueObjectError::Negative { .. })
        ));
        assert!(matches!(
            "1.5".parse::<Quantity>(),
            Err(ValueObjectError::Malformed { .. })
        ));
        assert_eq!(three.to_string(), "3");
        assert!(serde_json::from_str::<Quantity>("1.5").is_err());
        assert!(serde_json::from_str::<Quantity>("\"3\"").is_err());
        assert_eq!(serde_json::from_str::<Quantity>("3").unwrap(), three);
    }

    /// `new` accepts `s` exactly when deserializing the JSON string `s` does,
    /// and an accepted value survives JSON and `Display`/`FromStr` unchanged.
    fn construction_and_serde_agree<V>(s: &str) -> Result<(), proptest::test_runner::TestCaseError>
    where
        V: FromStr<Err = ValueObjectError>
            + TryFrom<String, Error = ValueObjectError>
            + fmt::Display
            + Serialize
            + for<'de> Deserialize<'de>
            + ValueObject,
    {
        use proptest::prelude::*;
        let built = V::try_from(s.to_owned());
        let json = serde_json::to_string(s).unwrap();
        let decoded = serde_json::from_str::<V>(&json);
        prop_assert_eq!(built.is_ok(), decoded.is_ok());
        if let Ok(value) = built {
            prop_assert_eq!(&decoded.unwrap(), &value);
            let again: V = serde_json::from_str(&serde_json::to_string(&value).unwrap()).unwrap();
            prop_assert_eq!(&again, &value);
            prop_assert_eq!(&value.to_string().parse::<V>().unwrap(), &value);
        }
        Ok(())
    }

    proptest::proptest! {
        #[test]
        fn text_objects_cannot_be_built_invalid(s in "\\PC{0,80}|[A-Za-z0-9_.@ -]{0,20}") {
            construction_and_serde_agree::<AggregateId>(&s)?;
            construction_and_serde_agree::<Sku>(&s)?;
            construction_and_serde_agree::<EmailAddress>(&s)?;
            construction_and_serde_agree::<NonEmptyText>(&s)?;
        }

        #[test]
        fn accepted_values_obey_their_rules(s in "\\PC{0,80}|[A-Z0-9_a-z-]{0,70}") {
            if let Ok(sku) = Sku::new(s.as_str()) {
                proptest::prop_assert!((1..=64).contains(&sku.as_str().len()));
                proptest::prop_assert!(
                    sku.as_str().bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
                );
            }
            if let Ok(id) = AggregateId::new(s.as_str()) {
                proptest::prop_assert!(!id.as_str().is_empty() && id.as_str().len() <= 200);
                proptest::prop_assert!(!id.as_str().chars().any(char::is_whitespace));
            }
            if let Ok(text) = NonEmptyText::new(s.as_str()) {
                proptest::prop_assert_eq!(text.as_str(), s.trim());
            }
        }

        #[test]
        fn quantity_arithmetic_matches_wide_integers(a in 0_i64..=i64::MAX, b in 0_i64..=i64::MAX, small in 0_i64..1000) {
            let (qa, qb) = (Quantity::new(a).unwrap(), Quantity::new(b).unwrap());
            let sum = i128::from(a) + i128::from(b);
            proptest::prop_assert_eq!(qa.checked_add(qb).map(i64::from).map(i128::from), (sum <= i128::from(i64::MAX)).then_some(sum));
            let difference = i128::from(a) - i128::from(b);
            proptest::prop_assert_eq!(qa.checked_sub(qb).map(i64::from).map(i128::from), (difference >= 0).then_some(difference));
            // Near each other too, where subtraction usually succeeds.
            let near = Quantity::new(a.saturating_sub(small)).unwrap();
            proptest::prop_assert_eq!(qa.checked_sub(near).and_then(|d| d.checked_add(near)), Some(qa));
            proptest::prop_assert_eq!(Quantity::try_from(-1 - small).unwrap_err().field(), "quantity");
        }
    }

    #[test]
    fn errors_are_validation_and_can_be_renamed() {
        let errors = [
            ValueObjectError::Empty { field: "a" },
            ValueObjectError::TooLong {
                field: "a",
                max: 1,
                actual: 2,
            },
            ValueObjectError::InvalidCharacter {
                field: "a",
                character: 'x',
                allowed: "y",
            },
            ValueObjectError::Negative {
                field: "a",
                value: -1,
            },
            ValueObjectError::OutOfRange {
                field: "a",
                reason: "r",
            },
            ValueObjectError::Malformed {
                field: "a",
                reason: "r",
            },
        ];
        for err in errors {
            assert_eq!(err.kind(), ErrorKind::Validation);
            let renamed = err.clone().with_field("line_qty");
            assert_eq!(renamed.field(), "line_qty");
            assert!(renamed.to_string().starts_with("line_qty"), "{renamed}");
            assert_eq!(err.field(), "a");
        }
    }
}
