//! The body checks of `/auth-body` (SPEC §8.3): what a JSON request body asks for — its model,
//! its output tokens, its input text — held against the chosen entry.
//!
//! Pure: bytes in, `Ok(input tokens)` or a [`Refusal`] out. Reading the body (bounds, timeout,
//! the in-flight budget) is the HTTP adapter's; the tokenizer comes in behind [`CountTokens`], so
//! every rule here is unit-tested with a stand-in counter.
//!
//! - **Untrusted input.** Only the top-level fields that are inspected are kept (as
//!   `serde_json::Value`, or raw text for `tools`); everything else is skipped without being built.
//!   serde_json's recursion limit turns a deeply nested body into an error, which reads as "not
//!   JSON", as do truncated and non-UTF-8 bodies: never a panic.
//! - **Duplicate fields.** An inspected top-level field given twice is refused as not valid JSON
//!   (RFC 7493 I-JSON), whatever the `Content-Type`: parsers disagree on which copy wins, so a
//!   client could show us one `model` or `max_tokens` and the upstream another.
//! - **Order.** SPEC §4's table puts every 400 (not JSON, an invalid token field, a missing
//!   `max_tokens`) before the 403s (model, then output tokens), and those before the 413 of input
//!   tokens; §8.3 defers to that table.
//! - **Counting.** Each text is counted on its own and the counts summed, with no per-message
//!   overhead; token ids in `prompt` or `input` count one each; a tool definition counts as its
//!   compact JSON text, in the order the client wrote it.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize as _;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

use super::model::EntryFields;
use super::refusal::{BadBody, Refusal};

/// Counts tokens of one text (o200k_base in the service; anything in tests).
pub trait CountTokens {
    fn count(&self, text: &str) -> u64;
}

/// The `[auth]` settings the checks follow.
#[derive(Debug, Clone, Copy, Default)]
pub struct BodyRules {
    /// `auth.require_max_tokens`.
    pub require_max_tokens: bool,
}

/// Whether a `Content-Type` is `application/json`, with any parameters (`; charset=utf-8`).
pub fn is_json_content_type(value: &[u8]) -> bool {
    let essence = value.split(|&b| b == b';').next().unwrap_or_default();
    essence
        .trim_ascii()
        .eq_ignore_ascii_case(b"application/json")
}

/// Runs every body check; `Ok` carries the input tokens counted (0 when the body is not a JSON
/// object, and so passes uninspected).
pub fn inspect(
    body: &[u8],
    json_type: bool,
    entry: &EntryFields,
    rules: BodyRules,
    counter: &dyn CountTokens,
) -> Result<u64, Refusal> {
    let Some(request) = parse(body, json_type)? else {
        return Ok(0);
    };
    let output = request.output_tokens()?;
    if output.is_none() && rules.require_max_tokens {
        return Err(Refusal::BadBody(BadBody::MaxTokensRequired));
    }
    request.check_model(entry.models.as_deref())?;
    if output.is_some_and(|o| o > entry.max_output_tokens) {
        return Err(Refusal::OutputTokens(entry.max_output_tokens));
    }
    let count = request.input_tokens(counter);
    if count > entry.max_input_tokens {
        return Err(Refusal::InputTokens {
            count,
            limit: entry.max_input_tokens,
        });
    }
    Ok(count)
}

/// The body as a request to inspect: `None` when it is not a JSON object (and may pass).
pub fn parse(body: &[u8], json_type: bool) -> Result<Option<Request<'_>>, Refusal> {
    // No body at all is nothing to inspect, whatever the Content-Type says (a GET).
    if body.is_empty() {
        return Ok(None);
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let parsed = Parsed::deserialize(&mut deserializer).and_then(|p| {
        deserializer.end()?;
        Ok(p)
    });
    match parsed {
        Ok(Parsed::Object(request)) if request.duplicate => Err(Refusal::BadBody(BadBody::NotJson)),
        Ok(Parsed::Object(request)) => Ok(Some(*request)),
        Ok(Parsed::Other) => Ok(None),
        Err(_) if json_type => Err(Refusal::BadBody(BadBody::NotJson)),
        Err(_) => Ok(None),
    }
}

/// The inspected top-level fields of a JSON object body.
#[derive(Debug, Default)]
pub struct Request<'a> {
    model: Option<Value>,
    /// `max_completion_tokens`, `max_tokens`, `max_output_tokens`.
    max: [Option<Value>; 3],
    n: Option<Value>,
    system: Option<Value>,
    instructions: Option<Value>,
    messages: Option<Value>,
    prompt: Option<Value>,
    input: Option<Value>,
    tools: Option<&'a RawValue>,
    duplicate: bool,
}

impl Request<'_> {
    /// The largest output asked for (each present field times `n`), `None` when no field is
    /// present. `null` counts as absent, as it does for the APIs.
    fn output_tokens(&self) -> Result<Option<u64>, Refusal> {
        let n = token_field(self.n.as_ref())?.unwrap_or(1).max(1);
        let mut largest = None;
        for field in &self.max {
            if let Some(asked) = token_field(field.as_ref())? {
                largest = largest.max(Some(asked.saturating_mul(n)));
            }
        }
        Ok(largest)
    }

    fn check_model(&self, models: Option<&[String]>) -> Result<(), Refusal> {
        let Some(models) = models else {
            return Ok(());
        };
        let named: Cow<str> = match &self.model {
            Some(Value::String(model)) if model_allowed(models, model) => return Ok(()),
            Some(Value::String(model)) => Cow::Borrowed(model),
            // A body that names no model cannot be shown to use an allowed one.
            None | Some(Value::Null) => Cow::Borrowed("(none)"),
            Some(other) => Cow::Owned(other.to_string()),
        };
        Err(Refusal::model_not_allowed(&named))
    }

    /// Every input text counted on its own, plus the token ids given as numbers.
    pub fn input_tokens(&self, counter: &dyn CountTokens) -> u64 {
        let mut total = 0u64;
        let mut add = |text: &str| total = total.saturating_add(counter.count(text));
        let mut ids = 0u64;
        for field in [&self.system, &self.instructions].into_iter().flatten() {
            parts_text(field, &mut add);
        }
        if let Some(Value::Array(messages)) = &self.messages {
            for message in messages {
                message_text(message, &mut add);
            }
        }
        for field in [&self.prompt, &self.input].into_iter().flatten() {
            ids = ids.saturating_add(prompt_or_input(field, &mut add));
        }
        if let Some(tools) = self.tools {
            tools_text(tools, &mut add);
        }
        total.saturating_add(ids)
    }
}

/// `*` as a trailing wildcard; otherwise an exact, case-sensitive name.
pub fn model_allowed(models: &[String], model: &str) -> bool {
    models
        .iter()
        .any(|allowed| match allowed.strip_suffix('*') {
            Some(prefix) => model.starts_with(prefix),
            None => allowed == model,
        })
}

/// A token field (`max_*`, `n`): absent or `null` → `None`; a non-negative integer → its value;
/// anything else (a string, a fraction, a negative number) is refused.
fn token_field(value: Option<&Value>) -> Result<Option<u64>, Refusal> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_u64()
            .map(Some)
            .ok_or(Refusal::BadBody(BadBody::InvalidMaxTokens)),
    }
}

/// `system`, `instructions`, a message's `content`: a string, or parts with a `text`.
fn parts_text(value: &Value, add: &mut impl FnMut(&str)) {
    match value {
        Value::String(text) => add(text),
        Value::Array(parts) => {
            for part in parts {
                match part {
                    Value::String(text) => add(text),
                    Value::Object(part) => {
                        if let Some(Value::String(text)) = part.get("text") {
                            add(text);
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// A message: its `content`, a string or parts of type `text` / `input_text`.
fn message_text(message: &Value, add: &mut impl FnMut(&str)) {
    match message.get("content") {
        Some(Value::String(text)) => add(text),
        Some(Value::Array(parts)) => {
            for part in parts {
                let typed = part.get("type").and_then(Value::as_str);
                if matches!(typed, Some("text" | "input_text"))
                    && let Some(Value::String(text)) = part.get("text")
                {
                    add(text);
                }
            }
        }
        _ => {}
    }
}

/// `prompt` or `input`: a string; or a list of strings, token ids, lists of token ids, or (for
/// `input`) items shaped like messages. Returns the token ids found.
fn prompt_or_input(value: &Value, add: &mut impl FnMut(&str)) -> u64 {
    match value {
        Value::String(text) => {
            add(text);
            0
        }
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => {
                    add(text);
                    0
                }
                Value::Number(_) => 1,
                Value::Array(ids) => ids.iter().filter(|id| id.is_number()).count() as u64,
                Value::Object(_) => {
                    message_text(item, add);
                    0
                }
                _ => 0,
            })
            .fold(0u64, u64::saturating_add),
        _ => 0,
    }
}

/// Each tool definition as its compact JSON text (all of `tools` when it is not a list).
fn tools_text(tools: &RawValue, add: &mut impl FnMut(&str)) {
    match serde_json::from_str::<Vec<&RawValue>>(tools.get()) {
        Ok(definitions) => {
            for definition in definitions {
                add(&compact(definition.get()));
            }
        }
        Err(_) => add(&compact(tools.get())),
    }
}

/// Valid JSON text without the whitespace between tokens (strings kept byte for byte).
pub fn compact(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            out.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            in_string = c == '"';
            out.push(c);
        }
    }
    out
}

/// A body: a JSON object with its inspected fields, or any other JSON value.
enum Parsed<'a> {
    Object(Box<Request<'a>>),
    Other,
}

/// The top-level fields that are inspected; every other name is skipped unbuilt.
enum Field {
    Model,
    Max(usize),
    N,
    System,
    Instructions,
    Messages,
    Prompt,
    Input,
    Tools,
    Other,
}

impl Field {
    fn named(name: &str) -> Field {
        match name {
            "model" => Field::Model,
            "max_completion_tokens" => Field::Max(0),
            "max_tokens" => Field::Max(1),
            "max_output_tokens" => Field::Max(2),
            "n" => Field::N,
            "system" => Field::System,
            "instructions" => Field::Instructions,
            "messages" => Field::Messages,
            "prompt" => Field::Prompt,
            "input" => Field::Input,
            "tools" => Field::Tools,
            _ => Field::Other,
        }
    }
}

impl<'de> de::Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Field, D::Error> {
        struct Names;
        impl Visitor<'_> for Names {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<Field, E> {
                Ok(Field::named(name))
            }
        }
        deserializer.deserialize_str(Names)
    }
}

impl<'de: 'a, 'a> de::Deserialize<'de> for Parsed<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Parsed<'a>, D::Error> {
        deserializer.deserialize_any(Body)
    }
}

struct Body;

/// Keeps `value` in `slot`, marking the request when the field was given before.
fn keep<T>(slot: &mut Option<T>, value: T, duplicate: &mut bool) {
    *duplicate |= slot.is_some();
    *slot = Some(value);
}

impl<'de> Visitor<'de> for Body {
    type Value = Parsed<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Parsed<'de>, M::Error> {
        let mut r = Request::default();
        let dup = &mut r.duplicate;
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Model => keep(&mut r.model, map.next_value()?, dup),
                Field::Max(i) => keep(&mut r.max[i], map.next_value()?, dup),
                Field::N => keep(&mut r.n, map.next_value()?, dup),
                Field::System => keep(&mut r.system, map.next_value()?, dup),
                Field::Instructions => keep(&mut r.instructions, map.next_value()?, dup),
                Field::Messages => keep(&mut r.messages, map.next_value()?, dup),
                Field::Prompt => keep(&mut r.prompt, map.next_value()?, dup),
                Field::Input => keep(&mut r.input, map.next_value()?, dup),
                Field::Tools => keep(&mut r.tools, map.next_value()?, dup),
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Parsed::Object(Box::new(r)))
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Parsed<'de>, S::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Parsed::Other)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Parsed<'de>, E> {
        Ok(Parsed::Other)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Parsed<'de>, E> {
        Ok(Parsed::Other)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Parsed<'de>, E> {
        Ok(Parsed::Other)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Parsed<'de>, E> {
        Ok(Parsed::Other)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Parsed<'de>, E> {
        Ok(Parsed::Other)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Parsed<'de>, E> {
        Ok(Parsed::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::tests::sample_fields;

    /// One token per whitespace-separated word: easy to reason about in tests.
    struct Words;
    impl CountTokens for Words {
        fn count(&self, text: &str) -> u64 {
            text.split_whitespace().count() as u64
        }
    }

    fn entry(models: Option<&[&str]>) -> EntryFields {
        let mut fields = sample_fields("e");
        fields.max_input_tokens = 10;
        fields.max_output_tokens = 100;
        fields.models = models.map(|m| m.iter().map(|s| (*s).to_owned()).collect());
        fields
    }

    fn run(body: &str, models: Option<&[&str]>) -> Result<u64, Refusal> {
        inspect(
            body.as_bytes(),
            true,
            &entry(models),
            BodyRules::default(),
            &Words,
        )
    }

    fn required(body: &str) -> Result<u64, Refusal> {
        let rules = BodyRules {
            require_max_tokens: true,
        };
        inspect(body.as_bytes(), true, &entry(None), rules, &Words)
    }

    const INVALID: Refusal = Refusal::BadBody(BadBody::InvalidMaxTokens);
    const NOT_JSON: Refusal = Refusal::BadBody(BadBody::NotJson);

    #[test]
    fn content_types() {
        for yes in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            " application/json ;x=y",
        ] {
            assert!(is_json_content_type(yes.as_bytes()), "{yes}");
        }
        for no in [
            "text/plain",
            "application/json-seq",
            "application/jsonx",
            "",
        ] {
            assert!(!is_json_content_type(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn models_match_exactly_or_by_trailing_wildcard() {
        let models = ["gpt-4o", "gpt-4.1*"].map(str::to_owned);
        assert!(model_allowed(&models, "gpt-4o"));
        assert!(!model_allowed(&models, "gpt-4o-mini"));
        assert!(!model_allowed(&models, "GPT-4o"));
        assert!(model_allowed(&models, "gpt-4.1"));
        assert!(model_allowed(&models, "gpt-4.1-nano"));
        assert!(model_allowed(&["*".to_owned()], "anything"));
    }

    #[test]
    fn the_model_check() {
        let models = Some(&["gpt-4o", "claude-*"][..]);
        assert_eq!(run(r#"{"model":"gpt-4o"}"#, models), Ok(0));
        assert_eq!(run(r#"{"model":"claude-3-opus"}"#, models), Ok(0));
        assert_eq!(
            run(r#"{"model":"gpt-5"}"#, models),
            Err(Refusal::model_not_allowed("gpt-5"))
        );
        assert_eq!(
            run(r#"{"messages":[]}"#, models),
            Err(Refusal::model_not_allowed("(none)"))
        );
        assert_eq!(
            run(r#"{"model":7}"#, models),
            Err(Refusal::model_not_allowed("7"))
        );
        // No `models` on the entry: any model.
        assert_eq!(run(r#"{"model":"gpt-5"}"#, None), Ok(0));
    }

    #[test]
    fn every_output_field_counts_and_n_multiplies() {
        for field in ["max_completion_tokens", "max_tokens", "max_output_tokens"] {
            assert_eq!(
                run(&format!(r#"{{"{field}":100}}"#), None),
                Ok(0),
                "{field}"
            );
            assert_eq!(
                run(&format!(r#"{{"{field}":101}}"#), None),
                Err(Refusal::OutputTokens(100)),
                "{field}"
            );
            assert_eq!(run(&format!(r#"{{"{field}":50,"n":2}}"#), None), Ok(0));
            assert_eq!(
                run(&format!(r#"{{"{field}":51,"n":2}}"#), None),
                Err(Refusal::OutputTokens(100))
            );
        }
        // All present fields must be within the limit, whichever the API reads.
        assert_eq!(
            run(r#"{"max_completion_tokens":10,"max_tokens":1000}"#, None),
            Err(Refusal::OutputTokens(100))
        );
        assert_eq!(
            run(r#"{"max_completion_tokens":1000,"max_tokens":10}"#, None),
            Err(Refusal::OutputTokens(100))
        );
        assert_eq!(run(r#"{"max_tokens":100,"n":1}"#, None), Ok(0));
        assert_eq!(run(r#"{"max_tokens":100,"n":0}"#, None), Ok(0));
        assert_eq!(run(r#"{"max_tokens":null}"#, None), Ok(0));
        // Saturates instead of overflowing.
        assert_eq!(
            run(r#"{"max_tokens":18446744073709551615,"n":3}"#, None),
            Err(Refusal::OutputTokens(100))
        );
    }

    #[test]
    fn invalid_token_fields_are_400_before_any_403() {
        for bad in [
            r#"{"max_tokens":"100"}"#,
            r#"{"max_tokens":-1}"#,
            r#"{"max_tokens":1.5}"#,
            r#"{"max_tokens":1e3}"#,
            r#"{"max_output_tokens":[1]}"#,
            r#"{"max_tokens":10,"n":"2"}"#,
            r#"{"max_tokens":10,"n":-2}"#,
        ] {
            assert_eq!(run(bad, None), Err(INVALID), "{bad}");
        }
        // SPEC §4's order: the 400 wins over the model's 403.
        assert_eq!(
            run(r#"{"model":"x","max_tokens":"a"}"#, Some(&["y"])),
            Err(INVALID)
        );
    }

    #[test]
    fn max_tokens_can_be_required() {
        assert_eq!(
            required(r#"{"messages":[]}"#),
            Err(Refusal::BadBody(BadBody::MaxTokensRequired))
        );
        assert_eq!(
            required(r#"{"max_tokens":null}"#),
            Err(Refusal::BadBody(BadBody::MaxTokensRequired))
        );
        assert_eq!(required(r#"{"max_output_tokens":5}"#), Ok(0));
        // Not a JSON object: nothing to require it of.
        assert_eq!(
            inspect(
                b"plain",
                false,
                &entry(None),
                BodyRules {
                    require_max_tokens: true
                },
                &Words
            ),
            Ok(0)
        );
    }

    #[test]
    fn every_input_field_is_counted() {
        let body = r#"{
            "system": "one two",
            "instructions": [{"type":"text","text":"three"}, "four"],
            "messages": [
                {"role":"user","content":"five six"},
                {"role":"user","content":[
                    {"type":"text","text":"seven"},
                    {"type":"input_text","text":"eight"},
                    {"type":"image_url","image_url":{"url":"not counted"}},
                    {"type":"output_text","text":"not counted"}
                ]},
                {"role":"assistant"}
            ]
        }"#;
        let request = parse(body.as_bytes(), true).unwrap().unwrap();
        assert_eq!(request.input_tokens(&Words), 8);
        let prompt = r#"{"prompt":["one two", "three"], "input":"four"}"#;
        let request = parse(prompt.as_bytes(), true).unwrap().unwrap();
        assert_eq!(request.input_tokens(&Words), 4);
        // Token ids count one each, in a list or a list of lists.
        let ids = r#"{"prompt":[1,2,3], "input":[[4,5],[6]]}"#;
        assert_eq!(
            parse(ids.as_bytes(), true)
                .unwrap()
                .unwrap()
                .input_tokens(&Words),
            6
        );
        // Responses API: input items shaped like messages.
        let items = r#"{"input":[{"role":"user","content":[{"type":"input_text","text":"a b c"}]},
            {"type":"message","role":"user","content":"d"}]}"#;
        assert_eq!(
            parse(items.as_bytes(), true)
                .unwrap()
                .unwrap()
                .input_tokens(&Words),
            4
        );
    }

    #[test]
    fn tools_count_as_their_compact_json_in_written_order() {
        struct Text(std::cell::RefCell<Vec<String>>);
        impl CountTokens for Text {
            fn count(&self, text: &str) -> u64 {
                self.0.borrow_mut().push(text.to_owned());
                1
            }
        }
        let body = r#"{"tools":[ {"type": "function", "function": {"name": "f", "description": "a \" b"}},
            {"b": 1, "a": [1, 2]} ]}"#;
        let seen = Text(Default::default());
        let request = parse(body.as_bytes(), true).unwrap().unwrap();
        assert_eq!(request.input_tokens(&seen), 2);
        assert_eq!(
            *seen.0.borrow(),
            [
                r#"{"type":"function","function":{"name":"f","description":"a \" b"}}"#,
                r#"{"b":1,"a":[1,2]}"#
            ]
        );
    }

    #[test]
    fn input_over_the_limit_is_413_with_the_count() {
        let body = r#"{"messages":[{"role":"user","content":"1 2 3 4 5 6 7 8 9 10 11"}]}"#;
        assert_eq!(
            run(body, None),
            Err(Refusal::InputTokens {
                count: 11,
                limit: 10
            })
        );
        let at_limit = r#"{"messages":[{"role":"user","content":"1 2 3 4 5 6 7 8 9 10"}]}"#;
        assert_eq!(run(at_limit, None), Ok(10));
        // The output check comes first.
        let both = r#"{"max_tokens":101,"prompt":"1 2 3 4 5 6 7 8 9 10 11"}"#;
        assert_eq!(run(both, None), Err(Refusal::OutputTokens(100)));
    }

    #[test]
    fn what_is_not_a_json_object() {
        let lenient =
            |body: &[u8]| inspect(body, false, &entry(None), BodyRules::default(), &Words);
        let strict = |body: &[u8]| inspect(body, true, &entry(None), BodyRules::default(), &Words);
        let deep = "[".repeat(100_000);
        let deep_object = format!("{{\"messages\":{}", "[".repeat(10_000));
        let not_json: [&[u8]; 7] = [
            b"{\"model\":",
            b"not json",
            b"{\"a\":1} trailing",
            b"{\"messages\":\"\xff\xfe\"}",
            deep.as_bytes(),
            deep_object.as_bytes(),
            b"{\"a\":1,}",
        ];
        for body in not_json {
            assert_eq!(
                strict(body),
                Err(NOT_JSON),
                "{:?}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(lenient(body), Ok(0));
        }
        // Valid JSON that is no object, and no body at all, pass uninspected.
        for body in [&b"[1,2]"[..], b"\"text\"", b"42", b"null", b""] {
            assert_eq!(strict(body), Ok(0));
        }
        // A JSON object is inspected whatever the Content-Type.
        assert_eq!(
            lenient(br#"{"max_tokens":1000}"#),
            Err(Refusal::OutputTokens(100))
        );
    }

    #[test]
    fn an_inspected_field_given_twice_is_refused_whatever_the_content_type() {
        for body in [
            r#"{"model":"a","model":"b"}"#,
            r#"{"max_tokens":1,"max_tokens":1000}"#,
            r#"{"messages":[],"messages":[]}"#,
        ] {
            let lenient = inspect(
                body.as_bytes(),
                false,
                &entry(None),
                BodyRules::default(),
                &Words,
            );
            assert_eq!(lenient, Err(NOT_JSON), "{body}");
        }
        // Other fields may repeat: they are not inspected.
        assert_eq!(run(r#"{"user":"a","user":"b"}"#, None), Ok(0));
    }

    #[test]
    fn compact_keeps_strings_exactly() {
        assert_eq!(
            compact(r#"{ "a" : "x  y\\" , "b":[ 1 , 2 ] }"#),
            r#"{"a":"x  y\\","b":[1,2]}"#
        );
        assert_eq!(compact("\"\\\"  \""), "\"\\\"  \"");
    }
}
