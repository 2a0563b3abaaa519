//! Header value formatting: the exact text the SPEC pins for numbers and JSON in headers.
//!
//! Gateways copy these values verbatim to upstream services that parse them, so the format is part of
//! the contract: costs in plain decimal (never `5e-8`), integers without a fraction, JSON compact and
//! pure ASCII (non-ASCII escaped as `\uXXXX`). Everything here runs when metadata is loaded, never per
//! request.

use std::fmt::Write as _;

use super::decimal::Decimal;

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
pub fn write_number_array(out: &mut String, items: &[Decimal]) {
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
        let numbers = ["3", "3.0", "0.5"].map(|t| Decimal::parse(t).unwrap());
        write_number_array(&mut out, &numbers);
        assert_eq!(out, "[3,3,0.5]");
    }
}
