//! Exact money for tests: prices from their decimal text into integers of 10⁻¹², and back into
//! the plain decimal strings SPEC §9 prints, so expected sums are computed without any float.

/// One unit of price in 10⁻¹².
pub const UNIT: u128 = 1_000_000_000_000;

/// A price written in decimal text (`3e-8`, `0.000000075`, `2`) in units of 10⁻¹².
pub fn units(price: &str) -> u128 {
    let (mantissa, exponent) = match price.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().expect("exponent")),
        None => (price, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits: u128 = format!("{int}{frac}").parse().expect("digits");
    let shift = 12 - frac.len() as i32 + exponent;
    assert!(shift >= 0, "{price} has more than 12 decimal places");
    digits * 10u128.pow(shift as u32)
}

/// Units of 10⁻¹² as SPEC §9 prints them: plain decimal, no exponent, no trailing zeros.
pub fn decimal(units: u128) -> String {
    let (int, frac) = (units / UNIT, units % UNIT);
    if frac == 0 {
        int.to_string()
    } else {
        format!("{int}.{}", format!("{frac:012}").trim_end_matches('0'))
    }
}
