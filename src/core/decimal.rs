//! Non-negative decimal numbers kept exactly as written: prices, TDL values, budgets.
//!
//! A price is money: `5e-08` must stay exactly 0.00000005 from the seed to the header and, later,
//! to every sum of costs (SPEC §4, §9). So numbers are read from their decimal text into an integer
//! significand and a power of ten, never through `f64`, and printed back in plain decimal
//! (`0.00000005`, never `5e-08`; `2.0` → `2`).

use std::fmt::Write as _;

/// `significand × 10^-scale`, with trailing zeros of the significand removed (so equal values are
/// equal structs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Decimal {
    significand: u128,
    scale: i32,
}

/// Larger magnitudes are not numbers anyone writes in a seed, and would make huge header values.
const MAX_EXPONENT: i32 = 308;

impl Decimal {
    pub const ZERO: Decimal = Decimal {
        significand: 0,
        scale: 0,
    };

    pub fn from_int(value: u64) -> Decimal {
        Decimal::new(u128::from(value), 0)
    }

    fn new(mut significand: u128, mut scale: i32) -> Decimal {
        if significand == 0 {
            return Decimal::ZERO;
        }
        while significand.is_multiple_of(10) {
            significand /= 10;
            scale -= 1;
        }
        Decimal { significand, scale }
    }

    /// Parses a non-negative decimal literal as YAML and JSON write them: `12`, `0.5`, `.5`, `5.`,
    /// `5e-08`, `1.5E+3`, `+2`. `-0` is zero; other negative values, infinities and NaN are refused.
    pub fn parse(text: &str) -> Result<Decimal, &'static str> {
        let (negative, text) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            _ => (false, text),
        };
        let (mantissa, exponent) = match text.find(['e', 'E']) {
            Some(at) => (&text[..at], Some(&text[at + 1..])),
            None => (text, None),
        };
        let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let digits_ok = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() && fraction.is_empty() || !digits_ok(whole) || !digits_ok(fraction) {
            return Err("must be a number");
        }
        let exponent: i32 = match exponent {
            Some(e)
                if e.trim_start_matches(['+', '-'])
                    .bytes()
                    .all(|b| b.is_ascii_digit()) =>
            {
                e.parse().map_err(|_| "is too large")?
            }
            Some(_) => return Err("must be a number"),
            None => 0,
        };
        let mut significand: u128 = 0;
        for b in whole.bytes().chain(fraction.bytes()) {
            significand = significand
                .checked_mul(10)
                .and_then(|s| s.checked_add(u128::from(b - b'0')))
                .ok_or("has too many digits (at most 38)")?;
        }
        let fraction_len = i32::try_from(fraction.len()).map_err(|_| "has too many digits")?;
        let scale = fraction_len.checked_sub(exponent).ok_or("is too large")?;
        let value = Decimal::new(significand, scale);
        if value.magnitude() > MAX_EXPONENT || value.scale > MAX_EXPONENT + 38 {
            return Err("is too large");
        }
        if negative && value != Decimal::ZERO {
            return Err("must be >= 0");
        }
        Ok(value)
    }

    /// Roughly log10 of the value (the position of its leading digit).
    fn magnitude(&self) -> i32 {
        let digits = self.significand.checked_ilog10().map_or(0, |d| d as i32);
        digits - self.scale
    }

    /// The value as an integer, when it is one that fits.
    pub fn to_u64(&self) -> Option<u64> {
        if self.scale > 0 {
            return None;
        }
        let factor = 10u128.checked_pow(u32::try_from(-self.scale).ok()?)?;
        u64::try_from(self.significand.checked_mul(factor)?).ok()
    }

    /// Digits after the decimal point (`0.00000005` has 8, `2` has 0).
    pub fn decimal_places(&self) -> u32 {
        u32::try_from(self.scale.max(0)).unwrap_or(0)
    }

    /// The value in integer units of `10^-places` (prices in 10⁻¹²), when exact and in range.
    pub fn to_units(&self, places: u32) -> Option<u128> {
        let shift = i32::try_from(places).ok()?.checked_sub(self.scale)?;
        if shift < 0 {
            return None;
        }
        self.significand
            .checked_mul(10u128.checked_pow(u32::try_from(shift).ok()?)?)
    }

    /// Appends the plain decimal form: no exponent, no trailing zeros.
    pub fn write_plain(&self, out: &mut String) {
        let digits = self.significand.to_string();
        if self.scale <= 0 {
            out.push_str(&digits);
            if self.significand != 0 {
                for _ in 0..-self.scale {
                    out.push('0');
                }
            }
            return;
        }
        let scale = self.scale as usize;
        if digits.len() > scale {
            let (whole, fraction) = digits.split_at(digits.len() - scale);
            let _ = write!(out, "{whole}.{fraction}");
        } else {
            out.push_str("0.");
            for _ in 0..scale - digits.len() {
                out.push('0');
            }
            out.push_str(&digits);
        }
    }

    pub fn to_plain(&self) -> String {
        let mut out = String::new();
        self.write_plain(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(text: &str) -> String {
        Decimal::parse(text).unwrap().to_plain()
    }

    #[test]
    fn costs_are_plain_decimal_and_exact() {
        assert_eq!(plain("5e-08"), "0.00000005");
        assert_eq!(plain("0.00000005"), "0.00000005");
        assert_eq!(plain("1.5e-7"), "0.00000015");
        assert_eq!(plain("6.0e-05"), "0.00006");
        assert_eq!(plain("2.0"), "2");
        assert_eq!(plain("0"), "0");
        assert_eq!(plain("0.0"), "0");
        assert_eq!(plain("-0"), "0");
        assert_eq!(plain("0.0000002"), "0.0000002");
        assert_eq!(plain("1e21"), "1000000000000000000000");
        assert_eq!(plain(".5"), "0.5");
        assert_eq!(plain("5."), "5");
        assert_eq!(plain("+1.25E+2"), "125");
        // More digits than an f64 holds, kept exactly.
        assert_eq!(plain("0.123456789012345678901"), "0.123456789012345678901");
        assert_eq!(plain("9007199254740993"), "9007199254740993");
    }

    #[test]
    fn refused_literals() {
        for bad in [
            "-1", "-0.5", "", ".", "1e", "e5", "1.2.3", ".inf", ".nan", "1e400", "0x10", "1_000",
        ] {
            assert!(Decimal::parse(bad).is_err(), "{bad}");
        }
        assert!(Decimal::parse("1234567890123456789012345678901234567890").is_err());
    }

    #[test]
    fn equal_values_are_equal() {
        assert_eq!(
            Decimal::parse("2.50").unwrap(),
            Decimal::parse("25e-1").unwrap()
        );
        assert_eq!(Decimal::parse("3").unwrap(), Decimal::from_int(3));
    }

    #[test]
    fn integers_places_and_units() {
        assert_eq!(Decimal::parse("3.0").unwrap().to_u64(), Some(3));
        assert_eq!(Decimal::parse("1e3").unwrap().to_u64(), Some(1000));
        assert_eq!(Decimal::parse("0.5").unwrap().to_u64(), None);
        assert_eq!(Decimal::parse("1e30").unwrap().to_u64(), None);
        let price = Decimal::parse("5e-08").unwrap();
        assert_eq!(price.decimal_places(), 8);
        assert_eq!(price.to_units(12), Some(50_000));
        assert_eq!(Decimal::parse("1e-13").unwrap().to_units(12), None);
        assert_eq!(Decimal::from_int(2).to_units(12), Some(2_000_000_000_000));
    }
}
