//! Header value formatting: the exact text the SPEC pins for numbers and JSON in headers.
//!
//! Gateways copy these values verbatim to upstream services that parse them, so the format is part of
//! the contract: costs in plain decimal (never `5e-8`), integers without a fraction, JSON compact and
//! pure ASCII (non-ASCII escaped as `\uXXXX`). Everything here runs when metadata is loaded, never per
//! request.

use std::fmt::Write as _;

/// A non-negative number from the seed, kept exact when it was written as an integer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Int(u64),
    Float(f64),
}

impl Number {
    /// Appends the number in plain decimal: `5e-08` → `0.00000005`, `2.0` → `2`, `0` → `0`.
    pub fn write_plain(&self, out: &mut String) {
        match *self {
            Number::Int(i) => {
                let _ = write!(out, "{i}");
            }
            // Rust's `Display` for f64 prints the shortest round-tripping digits and never uses
            // exponent notation; `+ 0.0` turns a stray `-0.0` into `0`.
            Number::Float(f) => {
                let _ = write!(out, "{}", f + 0.0);
            }
        }
    }

    pub fn to_plain(&self) -> String {
        let mut out = String::new();
        self.write_plain(&mut out);
        out
    }
}

/// Appends `s` as a JSON string literal that is pure ASCII: quotes, backslashes and control
/// characters escaped, every non-ASCII character as `\uXXXX` (UTF-16 surrogate pairs above U+FFFF).
pub fn write_ascii_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

/// `["a","b"]` with ASCII-only escaping.
pub fn ascii_json_string_array(items: &[String]) -> String {
    let mut out = String::from("[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_ascii_json_string(&mut out, item);
    }
    out.push(']');
    out
}

/// `[1,0.5,3]`: numbers in plain decimal.
pub fn write_number_array(out: &mut String, items: &[Number]) {
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        item.write_plain(out);
    }
    out.push(']');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(n: Number) -> String {
        n.to_plain()
    }

    #[test]
    fn costs_are_plain_decimal() {
        assert_eq!(plain(Number::Float(5e-08)), "0.00000005");
        assert_eq!(plain(Number::Float(1.5e-7)), "0.00000015");
        assert_eq!(plain(Number::Float(6.0e-05)), "0.00006");
        assert_eq!(plain(Number::Float(2.0)), "2");
        assert_eq!(plain(Number::Float(0.0)), "0");
        assert_eq!(plain(Number::Float(-0.0)), "0");
        assert_eq!(plain(Number::Int(0)), "0");
        assert_eq!(plain(Number::Float(0.0000002)), "0.0000002");
        assert_eq!(plain(Number::Float(1e21)), "1000000000000000000000");
    }

    #[test]
    fn large_integers_are_exact() {
        assert_eq!(plain(Number::Int(u64::MAX)), "18446744073709551615");
        assert_eq!(
            plain(Number::Int(9_007_199_254_740_993)),
            "9007199254740993"
        );
    }

    #[test]
    fn korean_tags_are_escaped() {
        let tags = vec!["kt".to_owned(), "믿음".to_owned()];
        assert_eq!(ascii_json_string_array(&tags), r#"["kt","\ubbff\uc74c"]"#);
    }

    #[test]
    fn quotes_backslashes_and_astral_characters() {
        let tags = vec!["a\"b".to_owned(), "c\\d".to_owned(), "😀".to_owned()];
        assert_eq!(
            ascii_json_string_array(&tags),
            r#"["a\"b","c\\d","\ud83d\ude00"]"#
        );
        assert_eq!(ascii_json_string_array(&[]), "[]");
    }

    #[test]
    fn number_arrays_have_no_fractions_for_integers() {
        let mut out = String::new();
        write_number_array(
            &mut out,
            &[Number::Int(3), Number::Float(3.0), Number::Float(0.5)],
        );
        assert_eq!(out, "[3,3,0.5]");
    }
}
