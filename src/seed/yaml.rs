//! A YAML document as a tree of nodes that remember their line.
//!
//! Seed validation must report *every* problem with its line and field path, so the seed is first
//! read into this loose, position-aware tree (no schema, nothing can fail but YAML syntax and
//! duplicate keys) and the schema is then checked by hand in `seed::parse`. serde-saphyr does the
//! parsing: it is pure Rust, refuses duplicate mapping keys and gives `Spanned` positions.
//!
//! A number with a fraction or an exponent keeps the text it was written with: serde hands a
//! visitor only an `f64`, and a price must stay the exact decimal of the seed (SPEC §9). YAML
//! floats are cut from the source at their span; for JSON, where serde_json gives no positions, the
//! document is scanned once for the number literals serde_json will hand out as floats, in order.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::rc::Rc;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// One YAML value with the line (1-based) where it was written; 0 when unknown.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub line: u64,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    /// Integers keep their exact value (no float round trip for large token limits).
    Int(i128),
    /// A number with a fraction or exponent, as written (`5e-08`).
    Float(Box<str>),
    Str(String),
    Seq(Vec<Node>),
    /// Mapping keys in document order; keys are stringified scalars.
    Map(Vec<(String, Node)>),
}

impl Value {
    /// What the value is, for messages like "expected a list, found a string".
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) | Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

impl Node {
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

/// A YAML syntax error, with its position when the parser knows it.
#[derive(Debug)]
pub struct SyntaxError {
    pub line: Option<u64>,
    pub column: Option<u64>,
    pub message: String,
}

/// Parses one YAML document into a [`Node`] tree. A document that is JSON (Kong's declarative
/// format comes as `kong.json` too) takes serde_json's path, many times faster for a large seed;
/// its nodes carry no line (problems still name the field path).
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    if text.trim_start().starts_with('{') {
        let _literals = LiteralSource::json(text);
        if let Ok(Plain(node)) = serde_json::from_str::<Plain>(text) {
            return Ok(node);
        }
    }
    if text.trim().is_empty() {
        return Ok(Node {
            line: 1,
            value: Value::Map(Vec::new()),
        });
    }
    // The parser's default budget (250,000 nodes) fits configuration files, not a seed of 100,000
    // consumers; these limits still stop a runaway document.
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_nodes: 50_000_000,
            max_events: 100_000_000,
            max_total_scalar_bytes: 1 << 30,
        },
    };
    let _literals = LiteralSource::yaml(text);
    match serde_saphyr::from_str_with_options::<Spanned<Value>>(text, options) {
        Ok(spanned) => Ok(into_node(spanned)),
        Err(err) => {
            let location = err.location();
            Err(SyntaxError {
                line: location.as_ref().map(|l| l.line()).filter(|l| *l > 0),
                column: location.as_ref().map(|l| l.column()).filter(|c| *c > 0),
                message: first_line(&err.to_string()),
            })
        }
    }
}

/// The parser's own words without its position prefix (we print the position ourselves) and without
/// advice about its Rust API, which means nothing to an operator.
fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or(message).trim();
    let line = line.strip_prefix("error:").unwrap_or(line).trim_start();
    let line = match line
        .strip_prefix("line ")
        .and_then(|rest| rest.split_once(": "))
    {
        Some((position, rest)) if position.contains("column") => rest,
        _ => line,
    };
    line.split(", set DuplicateKeyPolicy")
        .next()
        .unwrap_or(line)
        .to_owned()
}

fn into_node(spanned: Spanned<Value>) -> Node {
    let value = match spanned.value {
        Value::Float(fallback) => {
            let span = spanned.referenced.span();
            let written = span
                .byte_offset()
                .zip(span.byte_len())
                .and_then(|(offset, len)| LiteralSource::yaml_slice(offset, len));
            Value::Float(written.unwrap_or(fallback))
        }
        other => other,
    };
    Node {
        line: spanned.referenced.line(),
        value,
    }
}

/// Where float literals come from while one document is parsed on this thread.
enum Literals {
    None,
    /// The YAML text, cut at each float's span.
    Yaml(Rc<str>),
    /// JSON float literals in document order, taken one per `visit_f64`.
    Json(VecDeque<Box<str>>),
}

thread_local! {
    static LITERALS: RefCell<Literals> = const { RefCell::new(Literals::None) };
}

/// Sets this thread's literal source for one parse; dropping it clears the source.
struct LiteralSource;

impl LiteralSource {
    fn yaml(text: &str) -> LiteralSource {
        LITERALS.with(|l| *l.borrow_mut() = Literals::Yaml(Rc::from(text)));
        LiteralSource
    }

    fn json(text: &str) -> LiteralSource {
        LITERALS.with(|l| *l.borrow_mut() = Literals::Json(json_float_literals(text)));
        LiteralSource
    }

    fn yaml_slice(offset: u64, len: u64) -> Option<Box<str>> {
        LITERALS.with(|l| match &*l.borrow() {
            Literals::Yaml(text) => {
                let start = usize::try_from(offset).ok()?;
                let end = start.checked_add(usize::try_from(len).ok()?)?;
                let written = text.get(start..end)?.trim();
                is_number_literal(written).then(|| written.into())
            }
            _ => None,
        })
    }

    /// The next JSON float literal, or the shortest text of `value` if the scan and the parser
    /// ever disagreed.
    fn next_json(value: f64) -> Box<str> {
        LITERALS
            .with(|l| match &mut *l.borrow_mut() {
                Literals::Json(queue) => queue.pop_front(),
                _ => None,
            })
            .unwrap_or_else(|| value.to_string().into())
    }
}

impl Drop for LiteralSource {
    fn drop(&mut self) {
        LITERALS.with(|l| *l.borrow_mut() = Literals::None);
    }
}

/// A YAML float token such as `5e-08`, `.5` or `-1.0` (not `.inf`, a tag or a quoted string).
fn is_number_literal(text: &str) -> bool {
    !text.is_empty() && text.bytes().any(|b| b.is_ascii_digit()) && text.bytes().all(is_number_byte)
}

fn is_number_byte(b: u8) -> bool {
    b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-')
}

/// Every number literal of a JSON text that serde_json reads as an `f64`: one with a fraction or
/// an exponent, or an integer too large for 64 bits. Strings are skipped, escapes included.
fn json_float_literals(text: &str) -> VecDeque<Box<str>> {
    let bytes = text.as_bytes();
    let mut out = VecDeque::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len() && is_number_byte(bytes[i]) {
                    i += 1;
                }
                let literal = &text[start..i];
                let integer = literal.parse::<u64>().is_ok() || literal.parse::<i64>().is_ok();
                if !integer {
                    out.push_back(literal.into());
                }
            }
            _ => i += 1,
        }
    }
    out
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor::<Spanned<Value>>(PhantomData))
    }
}

/// How a child node is read: with its position (YAML, through serde-saphyr) or without (JSON).
trait Child<'de>: Deserialize<'de> {
    /// serde-saphyr already refuses duplicate keys; serde_json would keep the last one silently.
    const CHECK_DUPLICATE_KEYS: bool;
    fn into_node(self) -> Node;
    /// The text of a float the parser read as `value`.
    fn float(value: f64) -> Box<str>;
}

impl<'de> Child<'de> for Spanned<Value> {
    const CHECK_DUPLICATE_KEYS: bool = false;
    fn into_node(self) -> Node {
        into_node(self)
    }
    /// Replaced by the source text in [`into_node`], where the span is known.
    fn float(value: f64) -> Box<str> {
        value.to_string().into()
    }
}

/// A node read without position (line 0: unknown).
struct Plain(Node);

impl<'de> Deserialize<'de> for Plain {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = deserializer.deserialize_any(ValueVisitor::<Plain>(PhantomData))?;
        Ok(Plain(Node { line: 0, value }))
    }
}

impl<'de> Child<'de> for Plain {
    const CHECK_DUPLICATE_KEYS: bool = true;
    fn into_node(self) -> Node {
        self.0
    }
    fn float(value: f64) -> Box<str> {
        LiteralSource::next_json(value)
    }
}

struct ValueVisitor<C>(PhantomData<C>);

impl<'de, C: Child<'de>> Visitor<'de> for ValueVisitor<C> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        i128::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::custom("integer too large"))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(C::float(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<C>()? {
            items.push(item.into_node());
        }
        Ok(Value::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<KeyText>()? {
            if C::CHECK_DUPLICATE_KEYS && entries.iter().any(|(k, _): &(String, Node)| *k == key.0)
            {
                return Err(de::Error::custom(format!(
                    "duplicate mapping key: {}",
                    key.0
                )));
            }
            let value = map.next_value::<C>()?;
            entries.push((key.0, value.into_node()));
        }
        Ok(Value::Map(entries))
    }
}

/// A mapping key as text: Kong's YAML only has scalar keys (`T1`, `username`, …).
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        match value {
            Value::Str(s) => Ok(KeyText(s)),
            Value::Int(i) => Ok(KeyText(i.to_string())),
            Value::Float(f) => Ok(KeyText(f.into())),
            Value::Bool(b) => Ok(KeyText(b.to_string())),
            Value::Null => Ok(KeyText("null".to_owned())),
            other => Err(de::Error::custom(format!(
                "mapping keys must be scalars, found {}",
                other.kind()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_lines_numbers_and_order() {
        let doc = parse("a: 1\nb:\n  - x\n  - 5e-08\n  - 6.0e-05\nc: {d: 12345678901234567890}\n")
            .unwrap();
        let b = doc.get("b").unwrap();
        assert_eq!(b.line, 3);
        let Value::Seq(items) = &b.value else {
            panic!("{b:?}")
        };
        assert_eq!(
            items[0],
            Node {
                line: 3,
                value: Value::Str("x".into())
            }
        );
        assert_eq!(items[1].value, Value::Float("5e-08".into()));
        assert_eq!(items[2].value, Value::Float("6.0e-05".into()));
        assert_eq!(items[2].line, 5);
        assert_eq!(
            doc.get("c").unwrap().get("d").unwrap().value,
            Value::Int(12345678901234567890)
        );
    }

    #[test]
    fn syntax_error_has_line() {
        let err = parse("a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert!(err.line.is_some(), "{err:?}");
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let err = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(err.message, "duplicate mapping key: a");
        assert_eq!(err.line, Some(3));
    }

    #[test]
    fn json_documents_parse_without_lines() {
        let doc =
            parse(r#"{"a": 1, "b": [0.00000005, "x"], "c": {"d": 12345678901234567890}}"#).unwrap();
        assert_eq!(doc.get("a").unwrap().value, Value::Int(1));
        assert_eq!(doc.get("a").unwrap().line, 0);
        let Value::Seq(items) = &doc.get("b").unwrap().value else {
            panic!()
        };
        assert_eq!(items[0].value, Value::Float("0.00000005".into()));
        assert_eq!(
            doc.get("c").unwrap().get("d").unwrap().value,
            Value::Int(12345678901234567890)
        );
    }

    #[test]
    fn json_duplicate_keys_are_refused() {
        // The JSON path refuses the duplicate; the YAML parser then reports it with its line.
        let err = parse("{\"a\": 1,\n \"a\": 2}").unwrap_err();
        assert!(err.message.contains("duplicate"), "{err:?}");
    }

    #[test]
    fn json_floats_keep_their_text_past_strings_and_big_integers() {
        let text = r#"{"s": "1.5 \" 2.5", "a": 0.000000050000000001, "b": 123456789012345678901234, "c": -1e-3, "d": 7}"#;
        let doc = parse(text).unwrap();
        let value = |k: &str| doc.get(k).unwrap().value.clone();
        assert_eq!(value("a"), Value::Float("0.000000050000000001".into()));
        assert_eq!(value("b"), Value::Float("123456789012345678901234".into()));
        assert_eq!(value("c"), Value::Float("-1e-3".into()));
        assert_eq!(value("d"), Value::Int(7));
    }

    #[test]
    fn yaml_floats_keep_their_text() {
        let doc = parse("a: 0.000000050000000001\nb: [1.50, 2e3]\n").unwrap();
        assert_eq!(
            doc.get("a").unwrap().value,
            Value::Float("0.000000050000000001".into())
        );
        let Value::Seq(items) = &doc.get("b").unwrap().value else {
            panic!()
        };
        assert_eq!(items[0].value, Value::Float("1.50".into()));
    }

    #[test]
    fn quoted_numbers_stay_strings() {
        let doc = parse("a: \"12\"\n").unwrap();
        assert_eq!(doc.get("a").unwrap().value, Value::Str("12".into()));
    }
}
