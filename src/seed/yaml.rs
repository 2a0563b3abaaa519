//! A YAML document as a tree of nodes that remember their line.
//!
//! Seed validation must report *every* problem with its line and field path, so the seed is first
//! read into this loose, position-aware tree (no schema, nothing can fail but YAML syntax and
//! duplicate keys) and the schema is then checked by hand in `seed::parse`. serde-saphyr does the
//! parsing: it is pure Rust, refuses duplicate mapping keys and gives `Spanned` positions.

use std::fmt;
use std::marker::PhantomData;

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

/// Parses one YAML document into a [`Node`] tree. A document that is JSON (Kong's declarative
/// format comes as `kong.json` too) takes serde_json's path, many times faster for a large seed;
/// its nodes carry no line (problems still name the field path).
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    if text.trim_start().starts_with('{')
        && let Ok(Plain(node)) = serde_json::from_str::<Plain>(text)
    {
        return Ok(node);
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
    Node {
        line: spanned.referenced.line(),
        value: spanned.value,
    }
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
}

impl<'de> Child<'de> for Spanned<Value> {
    const CHECK_DUPLICATE_KEYS: bool = false;
    fn into_node(self) -> Node {
        into_node(self)
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
    fn json_documents_parse_without_lines() {
        let doc =
            parse(r#"{"a": 1, "b": [0.00000005, "x"], "c": {"d": 12345678901234567890}}"#).unwrap();
        assert_eq!(doc.get("a").unwrap().value, Value::Int(1));
        assert_eq!(doc.get("a").unwrap().line, 0);
        let Value::Seq(items) = &doc.get("b").unwrap().value else {
            panic!()
        };
        assert_eq!(items[0].value, Value::Float(5e-8));
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
    fn quoted_numbers_stay_strings() {
        let doc = parse("a: \"12\"\n").unwrap();
        assert_eq!(doc.get("a").unwrap().value, Value::Str("12".into()));
    }
}
