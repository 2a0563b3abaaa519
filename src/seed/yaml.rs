//! A YAML document as a tree of nodes that remember their line.
//!
//! Seed validation must report *every* problem with its line and field path, so the seed is first
//! read into this loose, position-aware tree (no schema, nothing can fail but YAML syntax and
//! duplicate keys) and the schema is then checked by hand in `seed::parse`. serde-saphyr does the
//! parsing: it is pure Rust, refuses duplicate mapping keys and gives `Spanned` positions.

use std::fmt;

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
    Float(f64),
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

/// Parses one YAML document into a [`Node`] tree.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    if text.trim().is_empty() {
        return Ok(Node {
            line: 1,
            value: Value::Map(Vec::new()),
        });
    }
    match serde_saphyr::from_str::<Spanned<Value>>(text) {
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
    Node {
        line: spanned.referenced.line(),
        value: spanned.value,
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
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
        Ok(Value::Float(v))
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
        Value::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Value>>()? {
            items.push(into_node(item));
        }
        Ok(Value::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<KeyText>()? {
            let value = map.next_value::<Spanned<Value>>()?;
            entries.push((key.0, into_node(value)));
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
            Value::Float(f) => Ok(KeyText(f.to_string())),
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
        assert_eq!(items[1].value, Value::Float(5e-8));
        assert_eq!(items[2].value, Value::Float(6e-5));
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
    fn quoted_numbers_stay_strings() {
        let doc = parse("a: \"12\"\n").unwrap();
        assert_eq!(doc.get("a").unwrap().value, Value::Str("12".into()));
    }
}
