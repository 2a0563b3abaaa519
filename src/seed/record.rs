//! The consumer record stored in Redis, and the key record that points at it.
//!
//! `uma:consumer:{<username>}` holds one JSON object:
//! `{"username":…,"custom_id":…,"groups":[…],"metadata_list":[{entry},…]}` (`custom_id` and
//! `metadata_list` may be absent or null). It is checked by the seed's own rules, so a record an
//! operator writes by hand is held to the same standard as the seed file; an invalid one is treated as
//! missing. An operator's delete leaves a tombstone, `{"username":…,"deleted":true}`.
//!
//! `uma:key:<sha256>` holds either the username as a plain string (a seed copy, with a TTL, or a
//! hand-written operator pointer without one) or a [`KeyRecord`]: a key the admin API made, or an
//! operator's override of a seed key (disabled, expiring, revoked). Expiry is a field of the record,
//! not a Redis TTL, so "no TTL = an operator's record" (SPEC §3) still tells who owns every key.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::core::Consumer;
use crate::core::format::write_ascii_json_string;
use crate::problem::Problem;

use super::{parse, yaml};

/// The JSON record of a consumer (its own fields and list; route and global lists stay in the seed).
pub fn to_json(consumer: &Consumer) -> String {
    let mut out = String::from("{\"username\":");
    write_ascii_json_string(&mut out, &consumer.username);
    out.push_str(",\"custom_id\":");
    match &consumer.custom_id {
        Some(id) => write_ascii_json_string(&mut out, id),
        None => out.push_str("null"),
    }
    out.push_str(",\"groups\":[");
    for (i, group) in consumer.groups.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_ascii_json_string(&mut out, group);
    }
    out.push_str("],\"tags\":[");
    for (i, tag) in consumer.tags.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_ascii_json_string(&mut out, tag);
    }
    out.push_str("],\"metadata_list\":");
    match &consumer.metadata {
        Some(list) => out.push_str(&list.json()),
        None => out.push_str("null"),
    }
    out.push('}');
    out
}

pub use parse::ConsumerRecord;

/// An operator's key record (JSON, no TTL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    pub username: String,
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    pub created: Timestamp,
    #[serde(default)]
    pub expires_at: Option<Timestamp>,
    #[serde(default)]
    pub disabled: bool,
    /// A revoked seed key (an operator key is revoked by deleting its record).
    #[serde(default)]
    pub revoked: bool,
}

impl KeyRecord {
    /// Whether the key opens anything at `now`: not disabled, revoked or expired.
    pub fn active_at(&self, now: Timestamp) -> bool {
        !self.disabled && !self.revoked && self.expires_at.is_none_or(|t| t > now)
    }

    pub fn to_json(&self) -> String {
        // Plain strings and timestamps only: serialization cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// What a `uma:key:<sha256>` value says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyValue {
    /// A plain username.
    Pointer(String),
    Record(KeyRecord),
}

/// Reads a key record's value; `None` when it is neither a username nor a valid record.
pub fn read_key(text: &str) -> Option<KeyValue> {
    let text = text.trim();
    if text.starts_with('{') {
        return serde_json::from_str(text).ok().map(KeyValue::Record);
    }
    (!text.is_empty()).then(|| KeyValue::Pointer(text.to_owned()))
}

/// Parses and checks a live record; `label` names it in problems (e.g. the Redis key). A tombstone
/// is a problem here: use [`read`] where one may be met.
pub fn from_json(text: &str, label: &str) -> Result<Consumer, Vec<Problem>> {
    match read(text, label)? {
        ConsumerRecord::Live(consumer) => Ok(*consumer),
        ConsumerRecord::Deleted(_) => Err(vec![Problem {
            file: label.to_owned(),
            line: None,
            path: "deleted".into(),
            reason: "a deleted consumer's tombstone".into(),
        }]),
    }
}

/// Parses and checks a record, which may be a tombstone.
pub fn read(text: &str, label: &str) -> Result<ConsumerRecord, Vec<Problem>> {
    parse::consumer_record(&tree(text, label)?, label)
}

/// The tombstone an operator's delete of `username` leaves (SPEC §10).
pub fn tombstone(username: &str) -> String {
    let mut out = String::from("{\"username\":");
    write_ascii_json_string(&mut out, username);
    out.push_str(",\"deleted\":true}");
    out
}

/// Checks an admin API consumer body (JSON text) for `username` by the seed's rules.
pub fn from_admin_body(text: &str, username: &str) -> Result<Consumer, Vec<Problem>> {
    parse::admin_consumer(&tree(text, "body")?, username)
}

fn tree(text: &str, label: &str) -> Result<yaml::Node, Vec<Problem>> {
    yaml::parse(text).map_err(|e| {
        vec![Problem {
            file: label.to_owned(),
            line: e.line,
            path: String::new(),
            reason: e.message,
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed_consumer() -> Consumer {
        let seed = super::super::parse_text(
            &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/seed.yaml"))
                .unwrap(),
            "seed.yaml",
        )
        .unwrap();
        let (consumer, _) = seed.consumers.into_iter().nth(1).unwrap();
        Arc::try_unwrap(consumer).unwrap()
    }

    use std::sync::Arc;

    #[test]
    fn round_trip_keeps_every_header() {
        let original = seed_consumer();
        let json = to_json(&original);
        let back = from_json(&json, "uma:consumer:{admin-client}").unwrap();
        assert_eq!(back.username, original.username);
        assert_eq!(back.identity_headers(), original.identity_headers());
        let (a, b) = (original.metadata.unwrap(), back.metadata.unwrap());
        assert_eq!(a.entries().len(), b.entries().len());
        for (x, y) in a.entries().iter().zip(b.entries()) {
            assert_eq!(x.headers(), y.headers());
        }
    }

    #[test]
    fn a_record_keeps_its_limits() {
        let text = r#"{"username":"op-made","metadata_list":[{"id":"e","provider_name":"p",
            "tdl_matrix":{"T1":[0],"T2":[0],"T3":[0],"T4":[0],"T5":[0],"T6":[0],"T7":[0],"T8":[0],
            "T9":[0],"T10":[0],"T11":[0],"T12":[0]},"capabilities":[1],"max_input_tokens":1,
            "max_output_tokens":1,"input_cost_per_token":5e-08,"output_cost_per_token":0,
            "limits":{"requests_per_minute":60,"requests_per_slot":{"T1":3,"T12":0},
            "requests_per_day":1000,"tokens_per_day":2000000,"cost_per_day":0.000000000001,
            "cost_per_month":100}}]}"#;
        let original = from_json(text, "k").unwrap();
        let limits = |c: &Consumer| {
            c.metadata.as_ref().unwrap().entries()[0]
                .fields
                .limits
                .clone()
        };
        let written = limits(&original).unwrap();
        assert_eq!(written.requests_per_slot.as_ref().unwrap().of(12), Some(0));
        assert_eq!(written.cost_per_day.unwrap().to_units(12), Some(1));
        let back = from_json(&to_json(&original), "k").unwrap();
        assert_eq!(limits(&back), Some(written));
        // A record is held to the seed's rules: 13 decimal places are refused here too.
        let finer = text.replace("0.000000000001", "0.0000000000001");
        let problems = from_json(&finer, "k").unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.path == "metadata_list[0].limits.cost_per_day"
                    && p.reason == "must have at most 12 decimal places"),
            "{problems:?}"
        );
    }

    #[test]
    fn tombstones_and_key_records() {
        match read(&tombstone("gone"), "k").unwrap() {
            ConsumerRecord::Deleted(name) => assert_eq!(name, "gone"),
            ConsumerRecord::Live(_) => panic!("a tombstone read as a consumer"),
        }
        assert!(from_json(&tombstone("gone"), "k").is_err());
        assert!(read(r#"{"username":"x","deleted":true,"groups":[]}"#, "k").is_err());
        let record = KeyRecord {
            username: "u".into(),
            id: "k_1".into(),
            name: Some("main".into()),
            created: "2026-12-01T00:00:00Z".parse().unwrap(),
            expires_at: Some("2026-12-02T00:00:00Z".parse().unwrap()),
            disabled: false,
            revoked: false,
        };
        let Some(KeyValue::Record(back)) = read_key(&record.to_json()) else {
            panic!("not read back");
        };
        assert_eq!(back, record);
        assert!(record.active_at("2026-12-01T23:59:59Z".parse().unwrap()));
        assert!(!record.active_at("2026-12-02T00:00:00Z".parse().unwrap()));
        assert!(
            !KeyRecord {
                disabled: true,
                ..record.clone()
            }
            .active_at(record.created)
        );
        assert_eq!(read_key(" alice "), Some(KeyValue::Pointer("alice".into())));
        assert_eq!(
            read_key(r#"{"username":"u"}"#),
            None,
            "a broken record is no pointer"
        );
    }

    #[test]
    fn admin_bodies_are_checked_by_the_seed_rules_with_body_paths() {
        let problems = from_admin_body(
            r#"{"username":"other","custom_id":"a\nb","acls":[{"group":"a,b"},{"grp":"x"}],
                "metadata_list":[{"id":"e","provider_name":"p","capabilities":[2]}],"bogus":1}"#,
            "alice",
        )
        .unwrap_err();
        let fields: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        for field in [
            "username",
            "custom_id",
            "acls[0].group",
            "acls[1].grp",
            "metadata_list[0].tdl_matrix",
            "metadata_list[0].capabilities[0]",
            "bogus",
        ] {
            assert!(fields.contains(&field), "{field} missing from {fields:?}");
        }
        let ok = from_admin_body(r#"{"acls":[{"group":"g"}],"tags":["t"]}"#, "alice").unwrap();
        assert_eq!(
            (&*ok.username, ok.groups.as_slice()),
            ("alice", &["g".to_owned()][..])
        );
        assert_eq!(ok.tags, ["t"]);
        let back = from_json(&to_json(&ok), "k").unwrap();
        assert_eq!(back.tags, ["t"]);
        assert!(from_admin_body("{}", "bad{name}").is_err());
    }

    #[test]
    fn minimal_and_invalid_records() {
        let c = from_json(r#"{"username":"op-made"}"#, "k").unwrap();
        assert!(c.metadata.is_none() && c.groups.is_empty());
        assert!(from_json("{not json", "k").is_err());
        assert!(from_json(r#"{"username":"x","extra":1}"#, "k").is_err());
        assert!(from_json(r#"{"username":"x","metadata_list":[{"id":"a"}]}"#, "k").is_err());
        assert!(from_json(r#""just a string""#, "k").is_err());
    }
}
