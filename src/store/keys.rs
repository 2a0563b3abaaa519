//! Redis key names. Everything lives under `uma:`; API keys appear only as SHA-256 digests.
//!
//! Keys that belong to one consumer carry the username as a Cluster hash tag (`{…}`), so the
//! consumer record, its counters and its batch ledger share one slot and one script may touch them.

use jiff::civil::Date;

use crate::core::KeyHash;

/// `uma:key:<sha256 hex>` → the username the key belongs to (a plain string).
pub fn key_record(hash: &KeyHash) -> String {
    format!("uma:key:{}", hash.to_hex())
}

/// `uma:consumer:{<username>}` → the consumer record (JSON, see `seed::record`).
pub fn consumer_record(username: &str) -> String {
    format!("uma:consumer:{{{username}}}")
}

/// `uma:tdl:{<username>}:<entry id>:<YYYY-MM-DD>` → hash `T1`..`T12` of allowed calls.
pub fn tdl_counter(username: &str, entry: &str, date: Date) -> String {
    format!("uma:tdl:{{{username}}}:{entry}:{date}")
}

/// The parts of [`tdl_counter`] around the entry id, for a script that finds entry ids in the
/// day's index: `prefix + entry + suffix` is the counter's key.
pub fn tdl_counter_affixes(username: &str, date: Date) -> (String, String) {
    (format!("uma:tdl:{{{username}}}:"), format!(":{date}"))
}

/// `uma:tdl-entries:{<username>}:<YYYY-MM-DD>` → set of entry ids used that day.
pub fn tdl_entries(username: &str, date: Date) -> String {
    format!("uma:tdl-entries:{{{username}}}:{date}")
}

/// `uma:tdl-applied:{<username>}:<instance>` → the last batch sequence of one service process
/// applied for the consumer (the exactly-once ledger). One key per process, with a TTL of its own,
/// so the ledgers of processes long gone expire instead of piling up in one structure.
pub fn tdl_applied(username: &str, instance: &str) -> String {
    format!("uma:tdl-applied:{{{username}}}:{instance}")
}

/// `uma:quota:{<username>}:<entry id>:<window>` → hash of reserved request quota (SPEC §8.1):
/// `total` and one field per replica. The window suffix (`m:<minute>`, `s:<date>:T<n>`, `d:<date>`)
/// is recognisable from the end, so entry ids holding `:` cannot make two keys meet.
pub fn quota(username: &str, entry: &str, window: &crate::core::window::WindowId) -> String {
    format!("uma:quota:{{{username}}}:{entry}:{}", window.key_suffix())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let h = KeyHash::of("abc");
        assert_eq!(
            key_record(&h),
            "uma:key:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            consumer_record("user1-client"),
            "uma:consumer:{user1-client}"
        );
        let d = jiff::civil::date(2026, 11, 27);
        assert_eq!(
            tdl_counter("u", "kt-midm-base", d),
            "uma:tdl:{u}:kt-midm-base:2026-11-27"
        );
        assert_eq!(tdl_entries("u", d), "uma:tdl-entries:{u}:2026-11-27");
        assert_eq!(tdl_applied("u", "0a1b"), "uma:tdl-applied:{u}:0a1b");
        let (prefix, suffix) = tdl_counter_affixes("u", d);
        assert_eq!(
            format!("{prefix}kt-midm-base{suffix}"),
            tdl_counter("u", "kt-midm-base", d)
        );
    }
}
