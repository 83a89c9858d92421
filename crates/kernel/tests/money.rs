//! Behaviour of `Money` and `Currency` through the public API: one test per
//! typed error, display and parsing examples, minor units and rounding.

use std::cmp::Ordering;
use std::collections::HashSet;

use rust_decimal::Decimal;
use vextrus_kernel::money::DigitGrouping;
use vextrus_kernel::{Currency, ErrorKind, HasErrorKind, Money, MoneyError, RoundingMode};

fn dec(text: &str) -> Decimal {
    text.parse().expect("a valid decimal literal")
}

fn money(text: &str) -> Money {
    text.parse().expect("valid money text")
}

// ---- one test per typed error -------------------------------------------

#[test]
fn currency_mismatch_is_a_typed_error_for_every_binary_operation() {
    let usd = Money::from_minor(100, Currency::USD);
    let bdt = Money::from_minor(100, Currency::BDT);
    let expected = MoneyError::CurrencyMismatch {
        left: Currency::USD,
        right: Currency::BDT,
    };
    assert_eq!(usd.checked_add(bdt), Err(expected.clone()));
    assert_eq!(usd.checked_sub(bdt), Err(expected.clone()));
    assert_eq!(usd + bdt, Err(expected.clone()));
    assert_eq!(usd - bdt, Err(expected.clone()));
    assert_eq!(usd.checked_cmp(&bdt), Err(expected.clone()));
    assert_eq!(usd.partial_cmp(&bdt), None);
    assert_ne!(usd, bdt);
    assert_eq!(
        Money::checked_sum(Currency::USD, [usd, bdt]),
        Err(expected.clone())
    );
    assert_eq!(expected.kind(), ErrorKind::Validation);
    assert_eq!(
        expected.to_string(),
        "currency mismatch: cannot combine USD with BDT"
    );
}

#[test]
fn overflow_is_a_typed_error_never_a_panic() {
    let max_minor = (1i128 << 96) - 1;
    let max = Money::try_from_minor(max_minor, Currency::USD).unwrap();
    let one_cent = Money::from_minor(1, Currency::USD);
    let overflow = |operation| MoneyError::Overflow { operation };

    assert_eq!(max.checked_add(one_cent), Err(overflow("checked_add")));
    assert_eq!((-max).checked_sub(one_cent), Err(overflow("checked_sub")));
    assert_eq!(
        max.mul_rate(Decimal::TWO, RoundingMode::HalfEven),
        Err(overflow("mul_rate"))
    );
    assert_eq!(
        max.percent(dec("100.01"), RoundingMode::HalfEven),
        Err(overflow("percent"))
    );
    assert_eq!(
        Money::try_from_minor(max_minor + 1, Currency::USD),
        Err(overflow("try_from_minor"))
    );
    assert_eq!(
        Money::try_from_minor(i128::MIN, Currency::USD),
        Err(overflow("try_from_minor"))
    );
    // Decimal::MAX is a whole number; at two decimals it no longer fits.
    assert_eq!(
        Money::new(Decimal::MAX, Currency::USD),
        Err(overflow("new"))
    );
    assert_eq!(
        Money::round(Decimal::MAX, Currency::USD, RoundingMode::HalfEven),
        Err(overflow("round"))
    );
    assert_eq!(
        "USD 792281625142643375935439503.36".parse::<Money>(),
        Err(overflow("parse"))
    );
    assert_eq!(
        "USD 99999999999999999999999999999999999999999999".parse::<Money>(),
        Err(overflow("parse"))
    );
    // At the boundary everything still works.
    assert_eq!(max.mul_rate(Decimal::ONE, RoundingMode::HalfEven), Ok(max));
    assert_eq!(max.checked_sub(max), Ok(Money::zero(Currency::USD)));
    assert_eq!(
        "USD 792281625142643375935439503.35".parse::<Money>(),
        Ok(max)
    );
    assert_eq!(overflow("parse").kind(), ErrorKind::Validation);
}

#[test]
fn unknown_currency_is_a_typed_error() {
    let expected = MoneyError::UnknownCurrency("XYZ".into());
    assert_eq!("XYZ".parse::<Currency>(), Err(expected.clone()));
    assert_eq!("XYZ 1.00".parse::<Money>(), Err(expected.clone()));
    let json = r#"{"amount":"1.00","currency":"XYZ"}"#;
    let err = serde_json::from_str::<Money>(json).unwrap_err().to_string();
    assert!(err.contains(r#"unknown currency code "XYZ""#), "{err}");
    assert_eq!(expected.kind(), ErrorKind::Validation);
}

#[test]
fn split_into_zero_parts_is_a_typed_error() {
    let m = Money::from_minor(100, Currency::EUR);
    assert_eq!(m.split(0), Err(MoneyError::SplitIntoZero));
    assert_eq!(
        Money::zero(Currency::EUR).split(0),
        Err(MoneyError::SplitIntoZero)
    );
    assert_eq!(MoneyError::SplitIntoZero.kind(), ErrorKind::Validation);
}

#[test]
fn invalid_ratios_are_a_typed_error() {
    let m = Money::from_minor(100, Currency::EUR);
    let reason = |result: Result<Vec<Money>, MoneyError>| match result {
        Err(MoneyError::InvalidRatio(reason)) => reason,
        other => panic!("expected InvalidRatio, got {other:?}"),
    };
    assert_eq!(reason(m.allocate::<u32>(&[])), "no ratios were given");
    assert_eq!(
        reason(m.allocate(&[0u32, 0, 0])),
        "the ratios are all zero; at least one must be positive"
    );
    assert_eq!(
        reason(m.allocate(&[3i64, -1, 2])),
        "ratio -1 at index 1 is negative"
    );
    assert_eq!(
        reason(m.allocate(&[dec("0.5"), dec("-0.5")])),
        "ratio -0.5 at index 1 is negative"
    );
    assert!(
        reason(m.allocate(&[Decimal::MAX, dec("0.0000000000000000000000000001")]))
            .contains("too large")
    );
    assert!(reason(m.allocate(&[u128::MAX])).contains("too large"));
    let mut huge = vec![Decimal::MAX; 5];
    huge.push(dec("0.000000001"));
    assert!(reason(m.allocate(&huge)).contains("too large to add up"));
    assert_eq!(
        MoneyError::InvalidRatio(String::new()).kind(),
        ErrorKind::Validation
    );
}

#[test]
fn invalid_exchange_rate_is_a_typed_error() {
    let usd = Money::from_minor(1_000, Currency::USD);
    for rate in [Decimal::ZERO, dec("-121.5"), dec("-0.0001")] {
        let err = usd
            .convert(rate, Currency::BDT, RoundingMode::HalfEven)
            .unwrap_err();
        assert_eq!(
            err,
            MoneyError::InvalidRate(format!(
                "the exchange rate from USD to BDT must be positive, not {rate}"
            ))
        );
        assert_eq!(err.kind(), ErrorKind::Validation);
    }
    let max = Money::try_from_minor((1 << 96) - 1, Currency::JPY).unwrap();
    assert_eq!(
        max.convert(Decimal::ONE, Currency::USD, RoundingMode::HalfEven),
        Err(MoneyError::Overflow {
            operation: "convert"
        })
    );
}

#[test]
fn conversion_rounds_once_into_the_target_minor_unit() {
    let kwd = Money::from_minor(1_234, Currency::KWD); // KWD 1.234
    // 1 KWD = 3.2567 USD: 4.0187678 USD
    let usd = kwd
        .convert(dec("3.2567"), Currency::USD, RoundingMode::HalfEven)
        .unwrap();
    assert_eq!(usd.to_string(), "$4.02");
    let usd = kwd
        .convert(dec("3.2567"), Currency::USD, RoundingMode::TowardsZero)
        .unwrap();
    assert_eq!(usd.to_string(), "$4.01");
    // Negative amounts convert to negative amounts.
    let refund = Money::from_minor(-500, Currency::EUR);
    let bdt = refund
        .convert(dec("130"), Currency::BDT, RoundingMode::HalfEven)
        .unwrap();
    assert_eq!(bdt.to_string(), "-৳650.00");
    // JPY (no decimals) to KWD (three).
    let yen = Money::from_minor(1_000, Currency::JPY);
    let dinar = yen
        .convert(dec("0.00205"), Currency::KWD, RoundingMode::HalfUp)
        .unwrap();
    assert_eq!(dinar.to_string(), "KWD 2.050");
}

#[test]
fn too_precise_is_a_typed_error() {
    let expected = MoneyError::TooPrecise {
        amount: "1.234".into(),
        currency: Currency::USD,
        max_decimals: 2,
    };
    assert_eq!(
        Money::new(dec("1.234"), Currency::USD),
        Err(expected.clone())
    );
    assert_eq!("USD 1.234".parse::<Money>(), Err(expected.clone()));
    assert_eq!("$1.234".parse::<Money>(), Err(expected.clone()));
    assert_eq!(
        expected.to_string(),
        "1.234 has more decimals than USD allows (at most 2)"
    );
    assert_eq!(
        Money::new(dec("0.5"), Currency::JPY),
        Err(MoneyError::TooPrecise {
            amount: "0.5".into(),
            currency: Currency::JPY,
            max_decimals: 0,
        })
    );
    // Trailing zeros are not extra precision.
    assert_eq!(
        Money::new(dec("1.2300"), Currency::USD),
        Ok(Money::from_minor(123, Currency::USD))
    );
    assert_eq!(money("¥1,235.000"), Money::from_minor(1235, Currency::JPY));
    assert_eq!(expected.kind(), ErrorKind::Validation);
}

#[test]
fn parse_errors_say_what_was_wrong() {
    let reason = |text: &str| match text.parse::<Money>() {
        Err(MoneyError::Parse { input, reason }) => {
            assert_eq!(input, text, "the input is echoed");
            reason
        }
        other => panic!("expected a parse error for {text:?}, got {other:?}"),
    };
    assert_eq!(reason(""), "the text is empty");
    assert_eq!(reason("$"), "there are no digits");
    assert!(reason("12.34").contains("currency is missing"));
    assert!(reason("USD12.34").contains("not a currency code followed by a space"));
    assert!(reason("¤12.34").contains("unambiguous currency symbol"));
    assert!(reason("A$12.34").contains("\"A$\""));
    assert!(reason("$1,234,56.00").contains("groups of three"));
    assert!(reason("₹1,234,567.00").contains("lakh/crore"));
    assert!(reason("৳123,456.00").contains("lakh/crore"));
    assert!(reason("$01,234.00").contains("convention"));
    assert!(reason("$1.2.3").contains("second decimal point"));
    assert!(reason("$1.").contains("after the decimal point"));
    assert!(reason("USD .5").contains("before any decimal point"));
    // Symbols may end in a dot (`Rf.`, `B/.`), so `$.5` reads as the symbol `$.`.
    assert!(reason("$.5").contains("\"$.\""));
    assert!(reason("$1e5").contains("unexpected character 'e'"));
    assert!(reason("USD +1.00").contains("unexpected character '+'"));
    assert!(reason("USD --1.00").contains("unexpected character '-'"));
    assert!(reason("$-1.00").contains("\"$-\""));
    assert!(reason("USD 1 000").contains("unexpected character ' '"));
    let MoneyError::Parse { input, .. } = format!("USD {}", "x".repeat(500))
        .parse::<Money>()
        .unwrap_err()
    else {
        panic!("expected a parse error");
    };
    assert!(input.chars().count() <= 65, "long input is cut short");
    assert_eq!(
        MoneyError::Parse {
            input: String::new(),
            reason: String::new()
        }
        .kind(),
        ErrorKind::Validation
    );
}

// ---- display and parsing ----------------------------------------------------

#[test]
fn south_asian_grouping_for_taka_and_rupees() {
    let cases = [
        (1_234_567_850, Currency::BDT, "৳1,23,45,678.50"),
        (123_456_700, Currency::INR, "₹12,34,567.00"),
        (99_900, Currency::BDT, "৳999.00"),
        (100_000, Currency::BDT, "৳1,000.00"),
        (10_000_000, Currency::BDT, "৳1,00,000.00"),
        (1_000_000_000, Currency::INR, "₹1,00,00,000.00"),
        (-100, Currency::BDT, "-৳1.00"),
        (-1_234_567_850, Currency::BDT, "-৳1,23,45,678.50"),
        (-50, Currency::INR, "-₹0.50"),
        (0, Currency::BDT, "৳0.00"),
        (1, Currency::INR, "₹0.01"),
    ];
    for (minor, currency, text) in cases {
        let m = Money::from_minor(minor, currency);
        assert_eq!(m.to_string(), text);
        assert_eq!(money(text), m, "{text} parses back");
    }
    assert_eq!(Currency::BDT.grouping(), DigitGrouping::SouthAsian);
    assert_eq!(Currency::INR.grouping(), DigitGrouping::SouthAsian);
}

#[test]
fn western_grouping_symbols_and_codes() {
    let cases = [
        (123_450, Currency::USD, "$1,234.50"),
        (123_456_789, Currency::USD, "$1,234,567.89"),
        (1_235, Currency::JPY, "¥1,235"),
        (-1_000_000, Currency::JPY, "-¥1,000,000"),
        (99, Currency::EUR, "€0.99"),
        (100_000, Currency::GBP, "£1,000.00"),
        (1_500, Currency::KWD, "KWD 1.500"),
        (-1_234_500, Currency::KWD, "KWD -1,234.500"),
        (1_200, Currency::CNY, "CNY 12.00"),
        (1_234_567, Currency::XAU, "XAU 123.4567"),
    ];
    for (minor, currency, text) in cases {
        let m = Money::from_minor(minor, currency);
        assert_eq!(m.to_string(), text);
        assert_eq!(money(text), m, "{text} parses back");
    }
    assert_eq!(
        format!("[{:>12}]", Money::from_minor(150, Currency::USD)),
        "[       $1.50]"
    );
}

#[test]
fn plain_form_is_code_space_amount() {
    let cases = [
        (1_234_567_850, Currency::BDT, "BDT 12345678.50"),
        (1_235, Currency::JPY, "JPY 1235"),
        (-1_500, Currency::KWD, "KWD -1.500"),
        (-500, Currency::USD, "USD -5.00"),
        (0, Currency::XAU, "XAU 0.0000"),
    ];
    for (minor, currency, text) in cases {
        let m = Money::from_minor(minor, currency);
        assert_eq!(m.to_plain_string(), text);
        assert_eq!(money(text), m);
    }
}

#[test]
fn parsing_accepts_reasonable_variations() {
    let usd = |minor| Money::from_minor(minor, Currency::USD);
    assert_eq!(money("  $1,234.50\n"), usd(123_450));
    assert_eq!(money("$1234.50"), usd(123_450));
    assert_eq!(money("USD 1,234.5"), usd(123_450));
    assert_eq!(money("USD 12"), usd(1_200));
    assert_eq!(money("USD -0.00"), usd(0));
    assert_eq!(money("BDT 1,23,45,678.50"), money("৳1,23,45,678.50"));
    assert_eq!(money("INR 1234567"), money("₹12,34,567.00"));
    // Another currency's symbol maps to that currency, never to a default.
    assert_eq!(money("R$10.00").currency(), "BRL".parse().unwrap());
    assert_eq!(money("$U10.00").currency(), "UYU".parse().unwrap());
}

// ---- minor units, construction and arithmetic -----------------------------

#[test]
fn each_currency_has_its_own_minor_units() {
    let yen = Money::new(dec("1235"), Currency::JPY).unwrap();
    assert_eq!(yen.amount().scale(), 0);
    assert_eq!(yen.to_minor_units(), 1235);

    let dinar = Money::new(dec("1.5"), Currency::KWD).unwrap();
    assert_eq!(dinar.amount().scale(), 3);
    assert_eq!(dinar.amount().to_string(), "1.500");
    assert_eq!(dinar.to_minor_units(), 1500);
    assert_eq!(Money::from_major(2, Currency::KWD).to_minor_units(), 2000);

    let taka = Money::new(dec("7"), Currency::BDT).unwrap();
    assert_eq!(taka.amount().to_string(), "7.00");
    assert_eq!(Money::from_major(2, Currency::JPY).to_minor_units(), 2);
}

#[test]
fn equal_values_compare_and_hash_equal_whatever_their_written_scale() {
    let a = Money::new(dec("1.5"), Currency::USD).unwrap();
    let b = Money::new(dec("1.50"), Currency::USD).unwrap();
    let c = Money::new(dec("1.5000"), Currency::USD).unwrap();
    assert_eq!(a, b);
    assert_eq!(b, c);
    let set: HashSet<Money> = [a, b, c].into_iter().collect();
    assert_eq!(set.len(), 1);
    assert_eq!(a.checked_cmp(&c), Ok(Ordering::Equal));
    assert_eq!(a.partial_cmp(&c), Some(Ordering::Equal));
}

#[test]
fn comparison_within_one_currency() {
    let small = Money::from_minor(-5, Currency::EUR);
    let large = Money::from_minor(5, Currency::EUR);
    assert!(small < large);
    assert!(large >= small);
    assert_eq!(small.checked_cmp(&large), Ok(Ordering::Less));
    let mixed = Money::from_minor(5, Currency::GBP);
    // Across currencies every comparison operator is false.
    let (less, greater, equal) = (large < mixed, large > mixed, large == mixed);
    assert!(!less && !greater && !equal);
    assert_eq!(large.partial_cmp(&mixed), None);
}

#[test]
fn sign_helpers_and_negation() {
    let m = Money::from_minor(-250, Currency::USD);
    assert!(m.is_negative() && !m.is_positive() && !m.is_zero());
    assert_eq!(m.abs(), Money::from_minor(250, Currency::USD));
    assert_eq!(-m, Money::from_minor(250, Currency::USD));
    assert_eq!(-Money::zero(Currency::USD), Money::zero(Currency::USD));
    assert_eq!((-Money::zero(Currency::USD)).to_string(), "$0.00");
    assert!(Money::zero(Currency::JPY).is_zero());
    assert_eq!(
        Money::checked_sum(Currency::USD, std::iter::empty()),
        Ok(Money::zero(Currency::USD))
    );
}

// ---- rounding ----------------------------------------------------------------

#[test]
fn rounding_mode_table() {
    use RoundingMode::{AwayFromZero, HalfEven, HalfUp, TowardsZero};
    let cases = [
        ("2.345", HalfEven, "2.34"),
        ("2.345", HalfUp, "2.35"),
        ("2.345", TowardsZero, "2.34"),
        ("2.345", AwayFromZero, "2.35"),
        ("2.355", HalfEven, "2.36"),
        ("2.355", HalfUp, "2.36"),
        ("-2.345", HalfEven, "-2.34"),
        ("-2.345", HalfUp, "-2.35"),
        ("-2.345", TowardsZero, "-2.34"),
        ("-2.345", AwayFromZero, "-2.35"),
        ("2.341", HalfEven, "2.34"),
        ("2.341", HalfUp, "2.34"),
        ("2.341", TowardsZero, "2.34"),
        ("2.341", AwayFromZero, "2.35"),
        ("2.349", TowardsZero, "2.34"),
        ("2.3450000001", HalfEven, "2.35"),
        ("-0.001", AwayFromZero, "-0.01"),
        ("-0.001", HalfEven, "0.00"),
        ("7", HalfEven, "7.00"),
    ];
    for (value, mode, expected) in cases {
        let rounded = Money::round(dec(value), Currency::USD, mode).unwrap();
        assert_eq!(rounded.amount().to_string(), expected, "{value} {mode:?}");
    }
    // To whole yen and to fils.
    let yen = Money::round(dec("2.5"), Currency::JPY, RoundingMode::HalfEven).unwrap();
    assert_eq!(yen.to_string(), "¥2");
    let fils = Money::round(dec("0.0005"), Currency::KWD, RoundingMode::HalfUp).unwrap();
    assert_eq!(fils.to_string(), "KWD 0.001");
    assert_eq!(RoundingMode::default(), RoundingMode::HalfEven);
}

#[test]
fn rates_and_percentages_round_once_with_the_chosen_mode() {
    let price = Money::from_minor(1_999, Currency::USD); // 19.99
    // 19.99 × 1.075 = 21.48925
    assert_eq!(
        price
            .mul_rate(dec("1.075"), RoundingMode::HalfEven)
            .unwrap()
            .to_string(),
        "$21.49"
    );
    assert_eq!(
        price
            .mul_rate(dec("1.075"), RoundingMode::TowardsZero)
            .unwrap()
            .to_string(),
        "$21.48"
    );
    // A negative rate flips the sign.
    assert_eq!(
        price
            .mul_rate(dec("-0.5"), RoundingMode::HalfUp)
            .unwrap()
            .to_string(),
        "-$10.00"
    );
    // 7.5% of 19.99 = 1.49925
    assert_eq!(
        price
            .percent(dec("7.5"), RoundingMode::HalfEven)
            .unwrap()
            .to_string(),
        "$1.50"
    );
    assert_eq!(
        price
            .percent(dec("7.5"), RoundingMode::TowardsZero)
            .unwrap()
            .to_string(),
        "$1.49"
    );
    // A rate with 28 decimals on a large amount: the exact product needs more
    // than 96 bits, and is still rounded exactly once.
    let big = Money::try_from_minor(10i128.pow(26), Currency::USD).unwrap();
    let third = dec("0.3333333333333333333333333333");
    let expected = 10i128.pow(26) / 3; // 3.33…e25, the 28-digit rate truncates below 0.5
    assert_eq!(
        big.mul_rate(third, RoundingMode::HalfEven)
            .unwrap()
            .to_minor_units(),
        expected
    );
    // Half a yen, half-even: to the even neighbour.
    let yen = Money::from_minor(5, Currency::JPY);
    assert_eq!(
        yen.percent(dec("50"), RoundingMode::HalfEven)
            .unwrap()
            .to_minor_units(),
        2
    );
    assert_eq!(
        yen.percent(dec("50"), RoundingMode::HalfUp)
            .unwrap()
            .to_minor_units(),
        3
    );
}

// ---- allocation ----------------------------------------------------------------

#[test]
fn allocation_and_split_examples() {
    let m = Money::from_minor(100, Currency::USD);
    let minor = |parts: Vec<Money>| parts.iter().map(Money::to_minor_units).collect::<Vec<_>>();
    assert_eq!(minor(m.allocate(&[1u32, 1, 1]).unwrap()), [34, 33, 33]);
    assert_eq!(
        minor(m.allocate(&[dec("0.7"), dec("0.2"), dec("0.1")]).unwrap()),
        [70, 20, 10]
    );
    assert_eq!(minor((-m).allocate(&[1u32, 2]).unwrap()), [-33, -67]);
    assert_eq!(minor(m.split(3).unwrap()), [34, 33, 33]);
    assert_eq!(minor(Money::zero(Currency::USD).split(2).unwrap()), [0, 0]);
    // ৳12,345.00 is correct lakh grouping (twelve thousand three hundred forty-five).
    assert_eq!(
        money("৳12,345.00"),
        Money::from_minor(1_234_500, Currency::BDT)
    );
    assert_eq!(minor(m.split(1).unwrap()), [100]);
    let kwd = Money::from_minor(1_000, Currency::KWD).split(3).unwrap();
    assert_eq!(
        kwd.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["KWD 0.334", "KWD 0.333", "KWD 0.333"]
    );
    assert!(kwd.iter().all(|p| p.currency() == Currency::KWD));
}

// ---- serde ---------------------------------------------------------------------

#[test]
fn serde_shape_is_amount_string_and_code() {
    let m = money("৳1,23,45,678.50");
    let json = serde_json::to_value(m).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"amount": "12345678.50", "currency": "BDT"})
    );
    assert_eq!(serde_json::from_value::<Money>(json).unwrap(), m);
    // Fewer decimals than the currency has are fine; the value is what counts.
    let short: Money = serde_json::from_str(r#"{"currency":"USD","amount":"5.5"}"#).unwrap();
    assert_eq!(short, Money::from_minor(550, Currency::USD));
    let float = serde_json::from_str::<Money>(r#"{"amount":0.1,"currency":"USD"}"#)
        .unwrap_err()
        .to_string();
    assert!(
        float.contains("invalid type: floating point `0.1`"),
        "{float}"
    );
    assert!(float.contains("decimal string"), "{float}");
}
