//! ISO 4217 currencies: codes, minor units, symbols and digit grouping.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use iso_currency::Currency as Iso;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::MoneyError;

/// An ISO 4217 currency, such as `BDT`, `USD` or `JPY`.
///
/// A small `Copy` value that knows its code, its number of minor-unit decimals
/// (`JPY` 0, `BDT` and `USD` 2, `KWD` 3), its symbol and the digit grouping its
/// amounts are written with. It parses from and serializes as its three-letter
/// code; codes are case-sensitive (`"usd"` is not a code).
///
/// Currencies for which ISO 4217 defines no minor unit (gold `XAU`, silver
/// `XAG`, the SDR `XDR`, the test code `XTS`, "no currency" `XXX` and a few
/// others) are given [`Currency::FALLBACK_MINOR_UNITS`] decimals, so that a
/// fraction of a troy ounce can be held and allocation still has a smallest
/// unit to hand out; [`Currency::has_iso_minor_unit`] tells them apart.
///
/// ```
/// use vextrus_kernel::Currency;
///
/// let bdt: Currency = "BDT".parse().unwrap();
/// assert_eq!(bdt, Currency::BDT);
/// assert_eq!(bdt.code(), "BDT");
/// assert_eq!(bdt.minor_units(), 2);
/// assert_eq!(bdt.symbol(), "৳");
/// assert_eq!(Currency::JPY.minor_units(), 0);
/// assert_eq!(Currency::KWD.minor_units(), 3);
/// assert!("XYZ".parse::<Currency>().is_err());
/// assert_eq!(serde_json::to_string(&bdt).unwrap(), "\"BDT\"");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency(Iso);

/// How the integer digits of an amount are grouped when displayed.
///
/// ```
/// use vextrus_kernel::Currency;
/// use vextrus_kernel::money::DigitGrouping;
///
/// assert_eq!(Currency::INR.grouping(), DigitGrouping::SouthAsian);
/// assert_eq!(Currency::USD.grouping(), DigitGrouping::Western);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DigitGrouping {
    /// Groups of three: `1,234,567`.
    Western,
    /// The Indian numbering system used for `BDT` and `INR`: the last three
    /// digits, then groups of two (lakh, crore): `12,34,567`.
    SouthAsian,
}

impl DigitGrouping {
    /// A short description used in error messages.
    pub(super) fn describe(self) -> &'static str {
        match self {
            DigitGrouping::Western => "groups of three digits, such as 1,234,567",
            DigitGrouping::SouthAsian => {
                "South-Asian lakh/crore grouping: three digits, then groups of two, such as 12,34,567"
            }
        }
    }
}

impl Currency {
    /// Decimals used for currencies without an ISO 4217 minor unit (`XAU`,
    /// `XAG`, `XPT`, `XPD`, `XDR`, `XTS`, `XXX`, …): 4, the largest minor unit
    /// ISO assigns to any currency (`CLF`, `UYW`).
    pub const FALLBACK_MINOR_UNITS: u32 = 4;

    /// Bangladeshi taka (2 decimals, `৳`, South-Asian grouping).
    pub const BDT: Currency = Currency(Iso::BDT);
    /// Indian rupee (2 decimals, `₹`, South-Asian grouping).
    pub const INR: Currency = Currency(Iso::INR);
    /// United States dollar (2 decimals, `$`).
    pub const USD: Currency = Currency(Iso::USD);
    /// Euro (2 decimals, `€`).
    pub const EUR: Currency = Currency(Iso::EUR);
    /// Pound sterling (2 decimals, `£`).
    pub const GBP: Currency = Currency(Iso::GBP);
    /// Japanese yen (0 decimals, `¥`).
    pub const JPY: Currency = Currency(Iso::JPY);
    /// Chinese yuan renminbi (2 decimals; displayed with its code, as `¥` is the yen's).
    pub const CNY: Currency = Currency(Iso::CNY);
    /// Swiss franc (2 decimals).
    pub const CHF: Currency = Currency(Iso::CHF);
    /// Kuwaiti dinar (3 decimals).
    pub const KWD: Currency = Currency(Iso::KWD);
    /// UAE dirham (2 decimals).
    pub const AED: Currency = Currency(Iso::AED);
    /// Saudi riyal (2 decimals).
    pub const SAR: Currency = Currency(Iso::SAR);
    /// Gold, one troy ounce (no ISO minor unit; [`Currency::FALLBACK_MINOR_UNITS`] decimals).
    pub const XAU: Currency = Currency(Iso::XAU);

    /// Every ISO 4217 currency known to this build, sorted by code.
    ///
    /// ```
    /// use vextrus_kernel::Currency;
    ///
    /// let all = Currency::all();
    /// assert!(all.contains(&Currency::BDT));
    /// assert!(all.windows(2).all(|w| w[0].code() < w[1].code()));
    /// ```
    pub fn all() -> &'static [Currency] {
        &registry().all
    }

    /// The three-letter ISO 4217 code, such as `"USD"`.
    pub fn code(self) -> &'static str {
        self.0.code()
    }

    /// The ISO 4217 numeric code, such as `840` for `USD`.
    pub fn numeric(self) -> u16 {
        self.0.numeric()
    }

    /// The English name, such as `"Bangladeshi taka"`.
    pub fn name(self) -> &'static str {
        registry().entry(self).iso.name()
    }

    /// How many decimals an amount in this currency has: its ISO 4217 minor
    /// unit (exponent), or [`Currency::FALLBACK_MINOR_UNITS`] when ISO defines
    /// none.
    pub fn minor_units(self) -> u32 {
        self.0
            .exponent()
            .map_or(Self::FALLBACK_MINOR_UNITS, u32::from)
    }

    /// Whether ISO 4217 defines a minor unit for this currency (false for
    /// `XAU`, `XDR`, `XXX` and the like).
    pub fn has_iso_minor_unit(self) -> bool {
        self.0.exponent().is_some()
    }

    /// The currency's symbol as listed in the ISO data, such as `"৳"`, `"$"`
    /// (shared by many dollars) or `"¤"` (the generic sign, for currencies
    /// without one of their own).
    pub fn symbol(self) -> &'static str {
        &registry().entry(self).symbol
    }

    /// The symbol [`Money`](super::Money)'s `Display` writes before amounts,
    /// or `None` when amounts are written after the code (`KWD 1.500`).
    ///
    /// A currency displays with its symbol when that symbol is unambiguous, so
    /// that displayed text parses back to the same currency: the symbol is
    /// used by no other current currency (funds, special codes such as `XAU`
    /// and superseded currencies are not counted and always use their code),
    /// or the currency is the symbol's conventional owner (`$` is `USD`, `¥` is
    /// `JPY`, `£` is `GBP`). Symbols in right-to-left scripts (the Arabic
    /// dinar, dirham and riyal signs) are not used either, because mixed with
    /// left-to-right digits they reorder unpredictably on screen; the generic
    /// sign `¤` is never used.
    ///
    /// ```
    /// use vextrus_kernel::Currency;
    ///
    /// assert_eq!(Currency::BDT.display_symbol(), Some("৳"));
    /// assert_eq!(Currency::USD.display_symbol(), Some("$"));
    /// assert_eq!(Currency::CNY.display_symbol(), None); // `¥` is the yen's
    /// assert_eq!(Currency::KWD.display_symbol(), None); // right-to-left
    /// assert_eq!(Currency::XAU.display_symbol(), None); // special
    /// ```
    pub fn display_symbol(self) -> Option<&'static str> {
        let entry = registry().entry(self);
        entry.displays_symbol.then_some(entry.symbol.as_str())
    }

    /// How the integer digits of this currency's amounts are grouped:
    /// [`DigitGrouping::SouthAsian`] for `BDT` and `INR`,
    /// [`DigitGrouping::Western`] for every other currency.
    pub fn grouping(self) -> DigitGrouping {
        match self.0 {
            Iso::BDT | Iso::INR => DigitGrouping::SouthAsian,
            _ => DigitGrouping::Western,
        }
    }

    /// The currency whose [display symbol](Currency::display_symbol) is
    /// exactly `symbol`.
    pub(super) fn from_display_symbol(symbol: &str) -> Option<Currency> {
        registry().by_display_symbol.get(symbol).copied()
    }
}

impl PartialOrd for Currency {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Currency {
    /// Currencies order by their code.
    fn cmp(&self, other: &Self) -> Ordering {
        self.code().cmp(other.code())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl fmt::Display for Currency {
    /// Writes the three-letter code.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.code())
    }
}

impl FromStr for Currency {
    type Err = MoneyError;

    /// Parses a three-letter ISO 4217 code; anything else is
    /// [`MoneyError::UnknownCurrency`].
    fn from_str(code: &str) -> Result<Self, Self::Err> {
        Iso::from_code(code)
            .map(Currency)
            .ok_or_else(|| MoneyError::unknown_currency(code))
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.code())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CodeVisitor;

        impl Visitor<'_> for CodeVisitor {
            type Value = Currency;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an ISO 4217 currency code such as \"USD\"")
            }

            fn visit_str<E: de::Error>(self, code: &str) -> Result<Currency, E> {
                code.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_str(CodeVisitor)
    }
}

/// What the registry knows about one currency.
struct Entry {
    iso: Iso,
    symbol: String,
    displays_symbol: bool,
}

/// Per-currency data `iso_currency` only hands out as owned values, computed
/// once: the sorted list of all currencies, their symbols, and which symbols
/// `Display` may use.
struct Registry {
    all: Vec<Currency>,
    /// Indexed by the `iso_currency` enum discriminant.
    entries: Vec<Option<Entry>>,
    by_display_symbol: HashMap<String, Currency>,
}

impl Registry {
    fn entry(&self, currency: Currency) -> &Entry {
        self.entries
            .get(currency.0 as usize)
            .and_then(Option::as_ref)
            .expect("every iso_currency variant has a three-letter code and is in the registry")
    }
}

/// Owners of symbols that several currencies share.
const CONVENTIONAL_OWNERS: [(&str, Iso); 3] = [("$", Iso::USD), ("¥", Iso::JPY), ("£", Iso::GBP)];

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(build_registry)
}

fn build_registry() -> Registry {
    // `iso_currency` only lists its variants with an optional extra
    // dependency; every variant has a three-letter code, so trying all
    // 17,576 codes finds exactly all of them.
    let mut isos = Vec::new();
    for a in b'A'..=b'Z' {
        for b in b'A'..=b'Z' {
            for c in b'A'..=b'Z' {
                let code = [a, b, c];
                let text = std::str::from_utf8(&code).expect("ASCII letters are UTF-8");
                isos.extend(Iso::from_code(text));
            }
        }
    }

    let eligible = |iso: Iso, symbol: &str| {
        !iso.is_special()
            && !iso.is_fund()
            && iso.is_superseded().is_none()
            && !symbol.is_empty()
            && symbol != "¤"
            && !symbol.chars().any(|ch| {
                ch.is_ascii_digit()
                    || ch.is_whitespace()
                    || matches!(ch, '-' | '+' | ',')
                    || is_rtl(ch)
            })
    };
    let mut uses: HashMap<String, usize> = HashMap::new();
    for &iso in &isos {
        let symbol = iso.symbol().symbol;
        if eligible(iso, &symbol) {
            *uses.entry(symbol).or_default() += 1;
        }
    }

    let len = isos.iter().map(|&iso| iso as usize + 1).max().unwrap_or(0);
    let mut entries: Vec<Option<Entry>> = (0..len).map(|_| None).collect();
    let mut by_display_symbol = HashMap::new();
    for &iso in &isos {
        let symbol = iso.symbol().symbol;
        let displays_symbol = eligible(iso, &symbol)
            && (uses.get(&symbol) == Some(&1)
                || CONVENTIONAL_OWNERS.contains(&(symbol.as_str(), iso)));
        if displays_symbol {
            let previous = by_display_symbol.insert(symbol.clone(), Currency(iso));
            debug_assert!(previous.is_none(), "display symbol {symbol:?} used twice");
        }
        entries[iso as usize] = Some(Entry {
            iso,
            symbol,
            displays_symbol,
        });
    }

    let mut all: Vec<Currency> = isos.into_iter().map(Currency).collect();
    all.sort();
    Registry {
        all,
        entries,
        by_display_symbol,
    }
}

/// Whether `ch` belongs to a right-to-left script (Hebrew, Arabic, Syriac,
/// Thaana, N'Ko and their presentation forms).
fn is_rtl(ch: char) -> bool {
    matches!(u32::from(ch), 0x0590..=0x08FF | 0xFB1D..=0xFDFF | 0xFE70..=0xFEFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_holds_every_iso_currency_once() {
        let all = Currency::all();
        // iso_currency 0.7 lists 183 codes (current, fund, special and superseded).
        assert_eq!(all.len(), 183);
        assert!(all.windows(2).all(|w| w[0].code() < w[1].code()));
        for &currency in all {
            assert_eq!(currency.code().parse::<Currency>(), Ok(currency));
            assert_eq!(currency.code().len(), 3);
            assert!(!currency.name().is_empty());
            assert!(!currency.symbol().is_empty());
            assert!(currency.minor_units() <= Currency::FALLBACK_MINOR_UNITS);
        }
    }

    #[test]
    fn minor_units_follow_iso_with_a_fallback() {
        assert_eq!(Currency::JPY.minor_units(), 0);
        assert_eq!(Currency::BDT.minor_units(), 2);
        assert_eq!(Currency::USD.minor_units(), 2);
        assert_eq!(Currency::KWD.minor_units(), 3);
        assert!(Currency::KWD.has_iso_minor_unit());
        assert_eq!(Currency::XAU.minor_units(), Currency::FALLBACK_MINOR_UNITS);
        assert!(!Currency::XAU.has_iso_minor_unit());
        assert_eq!(Currency::BDT.numeric(), 50);
        assert_eq!(Currency::BDT.name(), "Bangladeshi taka");
    }

    #[test]
    fn display_symbols_are_unambiguous() {
        let mut seen = HashMap::new();
        for &currency in Currency::all() {
            if let Some(symbol) = currency.display_symbol() {
                assert_eq!(seen.insert(symbol, currency), None, "{symbol} shared");
                assert_eq!(Currency::from_display_symbol(symbol), Some(currency));
                assert!(!symbol.contains(|ch: char| ch.is_ascii_digit() || ch.is_whitespace()));
            }
        }
        let expected = [
            ("৳", "BDT"),
            ("₹", "INR"),
            ("$", "USD"),
            ("€", "EUR"),
            ("£", "GBP"),
        ];
        for (symbol, code) in expected {
            assert_eq!(seen.get(symbol).map(|c| c.code()), Some(code));
        }
        assert_eq!(seen.get("¥"), Some(&Currency::JPY));
        // Shared, right-to-left, generic or special symbols fall back to the code.
        for code in [
            "CNY", "AUD", "KWD", "SAR", "XAU", "XXX", "CHF", "SEK", "BOV", "BGN",
        ] {
            let currency: Currency = code.parse().unwrap();
            assert_eq!(currency.display_symbol(), None, "{code}");
        }
    }

    #[test]
    fn codes_are_case_sensitive_and_errors_name_the_input() {
        assert_eq!(
            "usd".parse::<Currency>(),
            Err(MoneyError::UnknownCurrency("usd".into()))
        );
        assert!(" USD".parse::<Currency>().is_err());
        assert!("".parse::<Currency>().is_err());
    }

    #[test]
    fn currencies_order_by_code_and_display_as_code() {
        assert!(Currency::BDT < Currency::USD);
        assert_eq!(Currency::USD.to_string(), "USD");
        assert_eq!(format!("{:?}", Currency::USD), "USD");
        assert_eq!(format!("[{:>5}]", Currency::USD), "[  USD]");
    }

    #[test]
    fn serde_uses_the_code() {
        assert_eq!(serde_json::to_string(&Currency::KWD).unwrap(), "\"KWD\"");
        assert_eq!(
            serde_json::from_str::<Currency>("\"KWD\"").unwrap(),
            Currency::KWD
        );
        let err = serde_json::from_str::<Currency>("\"KWX\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains(r#"unknown currency code "KWX""#), "{err}");
        assert!(serde_json::from_str::<Currency>("414").is_err());
    }
}
