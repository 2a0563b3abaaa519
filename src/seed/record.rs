//! The consumer record stored in Redis, and the key record that points at it.
//!
//! `uma:consumer:{<username>}` holds one JSON object:
//! `{"username":…,"custom_id":…,"groups":[…],"metadata_list":[{entry},…]}` (`custom_id` and
//! `metadata_list` may be absent or null). It is checked by the seed's own rules, so a record an
//! operator writes by hand is held to the same standard as the seed file; an invalid one is treated as
//! missing. `uma:key:<sha256>` holds the username as a plain string.

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
    out.push_str("],\"metadata_list\":");
    match &consumer.metadata {
        Some(list) => out.push_str(&list.json()),
        None => out.push_str("null"),
    }
    out.push('}');
    out
}

/// Parses and checks a record; `label` names it in problems (e.g. the Redis key).
pub fn from_json(text: &str, label: &str) -> Result<Consumer, Vec<Problem>> {
    let root = yaml::parse(text).map_err(|e| {
        vec![Problem {
            file: label.to_owned(),
            line: e.line,
            path: String::new(),
            reason: e.message,
        }]
    })?;
    parse::consumer_record(&root, label)
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
    fn minimal_and_invalid_records() {
        let c = from_json(r#"{"username":"op-made"}"#, "k").unwrap();
        assert!(c.metadata.is_none() && c.groups.is_empty());
        assert!(from_json("{not json", "k").is_err());
        assert!(from_json(r#"{"username":"x","extra":1}"#, "k").is_err());
        assert!(from_json(r#"{"username":"x","metadata_list":[{"id":"a"}]}"#, "k").is_err());
        assert!(from_json(r#""just a string""#, "k").is_err());
    }
}
