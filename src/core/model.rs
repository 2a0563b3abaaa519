//! The loaded metadata: consumers, their metadata entries and lists, with every header value of an
//! allowed answer computed once at load time.
//!
//! A request only clones ready-made `HeaderValue`s (interned `'static` bytes, so a clone touches no
//! shared reference count), so the hot path formats nothing. Construction is the one place that
//! enforces what every header must satisfy — characters and the size budget under nginx's 4 KiB
//! buffer — for seed consumers and Redis records alike, so an invalid or oversized answer can never
//! be sent.

use std::sync::Arc;

use bytes::Bytes;
use http::header::CACHE_CONTROL;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::decimal::Decimal;
use super::format::{ascii_json_string_array, write_ascii_json_string, write_number_array};
use super::intern::intern;
use super::limits::Limits;
use super::text::is_printable_ascii;

/// The twelve header names of an allowed answer, in the order the SPEC lists them.
pub const METADATA_HEADER_NAMES: [&str; 12] = [
    "x-user-tdl-matrix",
    "x-user-capabilities",
    "x-consumer-id",
    "x-user-max-input-tokens",
    "x-user-max-output-tokens",
    "x-user-input-cost",
    "x-user-output-cost",
    "x-user-provider",
    "x-user-tags",
    "x-consumer-username",
    "x-consumer-custom-id",
    "x-consumer-groups",
];

/// The RateLimit fields of an answer for an entry with limits (SPEC §8.1).
pub const RATE_LIMIT_HEADER_NAMES: [&str; 2] = ["ratelimit-policy", "ratelimit"];

/// Number of slots in a day (`T1`..`T12`).
pub const SLOTS: usize = 12;

/// Header values of one entry: with the identity headers, the names and the answer's other fields
/// (RateLimit, later) they stay well under nginx's default 4 KiB `proxy_buffer_size`.
pub const MAX_ENTRY_HEADER_BYTES: usize = 2560;
/// Header values of a consumer's identity (username, custom_id, groups).
pub const MAX_IDENTITY_HEADER_BYTES: usize = 512;

/// The fields of one `metadata_list` entry, as written in the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryFields {
    pub id: String,
    pub provider_name: String,
    pub tags: Vec<String>,
    pub tdl_matrix: [Vec<Decimal>; SLOTS],
    pub capabilities: Vec<u8>,
    pub max_input_tokens: u64,
    pub max_output_tokens: u64,
    pub input_cost_per_token: Decimal,
    pub output_cost_per_token: Decimal,
    /// SPEC §9 (LiteLLM's name): the price of a cached input token; `None` prices cache reads as
    /// any other input token. Not a header: the seed document's headers stay as they are.
    pub cache_read_input_token_cost: Option<Decimal>,
    /// SPEC §8.1; `None` when the entry has no `limits` block.
    pub limits: Option<Limits>,
    /// SPEC §8.3: the model names `/auth-body` admits (`*` as a trailing wildcard); `None` admits
    /// any model. Never sent as a header (a list of models could outgrow the header budget).
    pub models: Option<Vec<String>>,
}

/// A metadata entry with its precomputed header values and JSON forms.
#[derive(Debug)]
pub struct Entry {
    pub fields: EntryFields,
    pub id: Arc<str>,
    /// Values of the first nine headers of [`METADATA_HEADER_NAMES`].
    headers: [HeaderValue; 9],
    /// Those nine plus `Cache-Control: no-store`, ready to be cloned into an allow answer: a clone
    /// copies two arrays, where building the map would hash and insert every name again.
    answer_headers: HeaderMap,
    /// `{"T1":[..],..,"T12":[..]}`, shared by the header and `/api/tdl-matrix`.
    tdl_json: Bytes,
    /// The entry as a JSON object, for `/api/user-metadata`.
    json: String,
}

/// Why an entry or a consumer cannot be answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidHeader {
    /// A value that cannot be a header value.
    Characters { header: &'static str },
    /// The entry's headers would take this many bytes.
    EntryTooLarge(usize),
    /// The identity headers would take this many bytes.
    IdentityTooLarge(usize),
}

impl std::fmt::Display for InvalidHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InvalidHeader::Characters { header } => write!(f, "cannot be sent as header {header}"),
            InvalidHeader::EntryTooLarge(bytes) => write!(
                f,
                "headers would take {bytes} bytes; at most {MAX_ENTRY_HEADER_BYTES} fit a gateway's header buffer"
            ),
            InvalidHeader::IdentityTooLarge(bytes) => write!(
                f,
                "username, custom_id and groups take {bytes} bytes of headers; at most {MAX_IDENTITY_HEADER_BYTES} fit"
            ),
        }
    }
}

fn header_value(
    header: &'static str,
    text: impl Into<Bytes>,
) -> Result<HeaderValue, InvalidHeader> {
    let bytes: Bytes = text.into();
    let invalid = || InvalidHeader::Characters { header };
    if !bytes.iter().all(|&b| is_printable_ascii(b)) {
        return Err(invalid());
    }
    HeaderValue::from_maybe_shared(Bytes::from_static(intern(&bytes))).map_err(|_| invalid())
}

impl Entry {
    /// Builds an entry, refusing one whose headers could not be sent or would not fit.
    pub fn new(fields: EntryFields) -> Result<Entry, InvalidHeader> {
        let tdl_json = Bytes::from(tdl_matrix_json(&fields.tdl_matrix));
        let capabilities = format!(
            "[{}]",
            fields
                .capabilities
                .iter()
                .map(u8::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        let headers = [
            header_value(METADATA_HEADER_NAMES[0], tdl_json.clone())?,
            header_value(METADATA_HEADER_NAMES[1], capabilities)?,
            header_value(METADATA_HEADER_NAMES[2], fields.id.clone())?,
            header_value(
                METADATA_HEADER_NAMES[3],
                fields.max_input_tokens.to_string(),
            )?,
            header_value(
                METADATA_HEADER_NAMES[4],
                fields.max_output_tokens.to_string(),
            )?,
            header_value(
                METADATA_HEADER_NAMES[5],
                fields.input_cost_per_token.to_plain(),
            )?,
            header_value(
                METADATA_HEADER_NAMES[6],
                fields.output_cost_per_token.to_plain(),
            )?,
            header_value(METADATA_HEADER_NAMES[7], fields.provider_name.clone())?,
            header_value(
                METADATA_HEADER_NAMES[8],
                ascii_json_string_array(&fields.tags),
            )?,
        ];
        let bytes: usize = headers.iter().map(HeaderValue::len).sum();
        if bytes > MAX_ENTRY_HEADER_BYTES {
            return Err(InvalidHeader::EntryTooLarge(bytes));
        }
        let json = entry_json(&fields, &tdl_json, &headers[1]);
        Ok(Entry {
            id: Arc::from(fields.id.as_str()),
            answer_headers: answer_headers(&headers, fields.limits.is_some()),
            fields,
            headers,
            tdl_json,
            json,
        })
    }

    /// `Cache-Control` and the nine entry headers of an allow answer; the identity headers of the
    /// consumer are added per answer (room for them is reserved).
    pub fn answer_headers(&self) -> &HeaderMap {
        &self.answer_headers
    }

    pub fn headers(&self) -> &[HeaderValue; 9] {
        &self.headers
    }

    /// Total length of the header values, to keep answers under gateways' header buffers.
    pub fn header_bytes(&self) -> usize {
        self.headers.iter().map(HeaderValue::len).sum()
    }

    pub fn tdl_matrix_json(&self) -> &str {
        // Built from a `String` in `new`, so always UTF-8.
        std::str::from_utf8(&self.tdl_json).unwrap_or("null")
    }

    pub fn json(&self) -> &str {
        &self.json
    }
}

fn with_identity(entry_headers: &HeaderMap, identity: &[HeaderValue; 3]) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(16);
    map.extend(
        entry_headers
            .iter()
            .map(|(name, value)| (name.clone(), value.clone())),
    );
    for (name, value) in METADATA_HEADER_NAMES[9..].iter().zip(identity) {
        map.insert(HeaderName::from_static(name), value.clone());
    }
    map
}

/// An entry with `limits` gets the two RateLimit fields as empty placeholders, which every allow
/// answer overwrites in place: inserting them into a cloned map would grow it on every call.
fn answer_headers(values: &[HeaderValue; 9], limited: bool) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(16);
    map.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    for (name, value) in METADATA_HEADER_NAMES.iter().zip(values) {
        map.insert(HeaderName::from_static(name), value.clone());
    }
    if limited {
        for name in RATE_LIMIT_HEADER_NAMES {
            map.insert(HeaderName::from_static(name), HeaderValue::from_static(""));
        }
    }
    map
}

fn tdl_matrix_json(matrix: &[Vec<Decimal>; SLOTS]) -> String {
    let mut out = String::from("{");
    for (slot, values) in matrix.iter().enumerate() {
        if slot > 0 {
            out.push(',');
        }
        out.push_str(&format!("\"T{}\":", slot + 1));
        write_number_array(&mut out, values);
    }
    out.push('}');
    out
}

fn entry_json(fields: &EntryFields, tdl_json: &Bytes, capabilities: &HeaderValue) -> String {
    let mut out = String::from("{\"id\":");
    write_ascii_json_string(&mut out, &fields.id);
    out.push_str(",\"provider_name\":");
    write_ascii_json_string(&mut out, &fields.provider_name);
    out.push_str(",\"tags\":");
    out.push_str(&ascii_json_string_array(&fields.tags));
    out.push_str(",\"tdl_matrix\":");
    out.push_str(std::str::from_utf8(tdl_json).unwrap_or("null"));
    out.push_str(",\"capabilities\":");
    out.push_str(capabilities.to_str().unwrap_or("[]"));
    out.push_str(&format!(
        ",\"max_input_tokens\":{},\"max_output_tokens\":{}",
        fields.max_input_tokens, fields.max_output_tokens
    ));
    out.push_str(",\"input_cost_per_token\":");
    fields.input_cost_per_token.write_plain(&mut out);
    out.push_str(",\"output_cost_per_token\":");
    fields.output_cost_per_token.write_plain(&mut out);
    if let Some(price) = &fields.cache_read_input_token_cost {
        out.push_str(",\"cache_read_input_token_cost\":");
        price.write_plain(&mut out);
    }
    if let Some(limits) = &fields.limits {
        out.push_str(",\"limits\":");
        limits.write_json(&mut out);
    }
    if let Some(models) = &fields.models {
        out.push_str(",\"models\":");
        out.push_str(&ascii_json_string_array(models));
    }
    out.push('}');
    out
}

/// One `metadata_list`: entries in configured order, ids unique.
#[derive(Debug, Default)]
pub struct MetadataList {
    entries: Vec<Arc<Entry>>,
}

impl MetadataList {
    pub fn new(entries: Vec<Arc<Entry>>) -> MetadataList {
        MetadataList { entries }
    }

    pub fn entries(&self) -> &[Arc<Entry>] {
        &self.entries
    }

    pub fn first(&self) -> Option<&Arc<Entry>> {
        self.entries.first()
    }

    /// Lists are a handful of entries: a linear scan beats hashing.
    pub fn find(&self, id: &str) -> Option<&Arc<Entry>> {
        self.entries.iter().find(|e| &*e.id == id)
    }

    /// `[{..},{..}]` for `/api/user-metadata`.
    pub fn json(&self) -> String {
        let mut out = String::from("[");
        for (i, entry) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(entry.json());
        }
        out.push(']');
        out
    }
}

/// A consumer (Kong's notion): identity, ACL groups, and its own metadata list if it has one.
#[derive(Debug, Clone)]
pub struct Consumer {
    pub username: Arc<str>,
    pub custom_id: Option<String>,
    pub groups: Vec<String>,
    pub metadata: Option<Arc<MetadataList>>,
    /// The consumer's own tags (Kong's consumer `tags`): kept for the admin API, sent nowhere.
    pub tags: Vec<String>,
    /// Values of the last three headers of [`METADATA_HEADER_NAMES`].
    identity: [HeaderValue; 3],
    /// The complete allow-answer headers for each entry of the consumer's own list (the usual
    /// case), so such an answer is one map clone.
    own_answers: Vec<HeaderMap>,
}

impl Consumer {
    /// Builds a consumer, refusing one whose identity headers could not be sent or would not fit.
    pub fn new(
        username: String,
        custom_id: Option<String>,
        groups: Vec<String>,
        metadata: Option<Arc<MetadataList>>,
    ) -> Result<Consumer, InvalidHeader> {
        let identity = [
            header_value(METADATA_HEADER_NAMES[9], username.clone())?,
            header_value(
                METADATA_HEADER_NAMES[10],
                custom_id.clone().unwrap_or_default(),
            )?,
            header_value(METADATA_HEADER_NAMES[11], groups.join(", "))?,
        ];
        let bytes: usize = identity.iter().map(HeaderValue::len).sum();
        if bytes > MAX_IDENTITY_HEADER_BYTES {
            return Err(InvalidHeader::IdentityTooLarge(bytes));
        }
        let own_answers = metadata
            .iter()
            .flat_map(|list| list.entries())
            .map(|entry| with_identity(entry.answer_headers(), &identity))
            .collect();
        Ok(Consumer {
            username: Arc::from(username),
            custom_id,
            groups,
            metadata,
            tags: Vec::new(),
            identity,
            own_answers,
        })
    }

    /// `Cache-Control` and all twelve headers of an allow answer giving `entry` to this consumer.
    pub fn answer_headers(&self, entry: &Arc<Entry>) -> HeaderMap {
        let own = self
            .metadata
            .as_ref()
            .and_then(|l| l.entries().iter().position(|e| Arc::ptr_eq(e, entry)));
        match own.and_then(|i| self.own_answers.get(i)) {
            Some(headers) => headers.clone(),
            // An entry of a route or the global list: joined per answer.
            None => with_identity(entry.answer_headers(), &self.identity),
        }
    }

    pub fn identity_headers(&self) -> &[HeaderValue; 3] {
        &self.identity
    }

    pub fn identity_bytes(&self) -> usize {
        self.identity.iter().map(HeaderValue::len).sum()
    }

    pub fn in_any_group(&self, groups: &[String]) -> bool {
        self.groups.iter().any(|g| groups.contains(g))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample_fields(id: &str) -> EntryFields {
        let row: Vec<Decimal> = [0, 0, 0, 0, 0, 3, 0, 0, 0, 0]
            .into_iter()
            .map(Decimal::from_int)
            .collect();
        EntryFields {
            id: id.to_owned(),
            provider_name: "kt".to_owned(),
            tags: vec!["kt".to_owned(), "믿음".to_owned()],
            tdl_matrix: std::array::from_fn(|_| row.clone()),
            capabilities: vec![1, 1, 0, 0, 0],
            max_input_tokens: 50000,
            max_output_tokens: 20000,
            input_cost_per_token: Decimal::parse("5e-08").unwrap(),
            output_cost_per_token: Decimal::parse("0.0000002").unwrap(),
            limits: None,
            models: None,
            cache_read_input_token_cost: None,
        }
    }

    #[test]
    fn entry_headers_match_the_seed_document() {
        let entry = Entry::new(sample_fields("kt-midm-base")).unwrap();
        let h: Vec<&str> = entry
            .headers()
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        let row = "[0,0,0,0,0,3,0,0,0,0]";
        let matrix: Vec<String> = (1..=12).map(|i| format!("\"T{i}\":{row}")).collect();
        assert_eq!(h[0], format!("{{{}}}", matrix.join(",")));
        assert_eq!(h[1], "[1,1,0,0,0]");
        assert_eq!(h[2], "kt-midm-base");
        assert_eq!(h[3], "50000");
        assert_eq!(h[4], "20000");
        assert_eq!(h[5], "0.00000005");
        assert_eq!(h[6], "0.0000002");
        assert_eq!(h[7], "kt");
        assert_eq!(h[8], r#"["kt","\ubbff\uc74c"]"#);
    }

    #[test]
    fn matrix_keys_are_in_numeric_order() {
        let entry = Entry::new(sample_fields("x")).unwrap();
        let json = entry.tdl_matrix_json();
        let t2 = json.find("\"T2\"").unwrap();
        let t10 = json.find("\"T10\"").unwrap();
        let t12 = json.find("\"T12\"").unwrap();
        assert!(t2 < t10 && t10 < t12);
        let parsed: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(parsed["T12"][5], 3);
    }

    #[test]
    fn entry_json_round_trips() {
        let entry = Entry::new(sample_fields("x")).unwrap();
        let parsed: serde_json::Value = serde_json::from_str(entry.json()).unwrap();
        assert_eq!(parsed["tags"][1], "믿음");
        assert_eq!(parsed["input_cost_per_token"], 5e-8);
        assert_eq!(parsed["max_output_tokens"], 20000);
    }

    #[test]
    fn identity_headers() {
        let c = Consumer::new(
            "user1-client".into(),
            None,
            vec!["a".into(), "b".into()],
            None,
        )
        .unwrap();
        let h: Vec<&str> = c
            .identity_headers()
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(h, ["user1-client", "", "a, b"]);
    }

    #[test]
    fn control_characters_never_reach_a_header() {
        let mut fields = sample_fields("x");
        fields.provider_name = "k\nt".into();
        assert_eq!(
            Entry::new(fields).unwrap_err(),
            InvalidHeader::Characters {
                header: "x-user-provider"
            }
        );
    }

    #[test]
    fn oversized_answers_are_refused_by_the_constructors() {
        let mut fields = sample_fields("x");
        fields.tags = (0..400).map(|i| format!("tag-{i}")).collect();
        assert!(matches!(
            Entry::new(fields),
            Err(InvalidHeader::EntryTooLarge(_))
        ));
        let groups = (0..300).map(|i| format!("group-{i}")).collect();
        let consumer = Consumer::new("u".into(), None, groups, None);
        assert!(matches!(consumer, Err(InvalidHeader::IdentityTooLarge(_))));
    }
}
