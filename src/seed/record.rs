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
    fn minimal_and_invalid_records() {
        let c = from_json(r#"{"username":"op-made"}"#, "k").unwrap();
        assert!(c.metadata.is_none() && c.groups.is_empty());
        assert!(from_json("{not json", "k").is_err());
        assert!(from_json(r#"{"username":"x","extra":1}"#, "k").is_err());
        assert!(from_json(r#"{"username":"x","metadata_list":[{"id":"a"}]}"#, "k").is_err());
        assert!(from_json(r#""just a string""#, "k").is_err());
    }
}
