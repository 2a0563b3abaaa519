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

/// `uma:consumer-keys:{<username>}` → hash key id → SHA-256 hex of each key the admin API made
/// for the consumer (their records are under [`key_record`]).
pub fn consumer_keys(username: &str) -> String {
    format!("uma:consumer-keys:{{{username}}}")
}

/// `uma:consumers` → sorted set (score 0, ordered by name) of consumers with an operator record.
pub const OPERATOR_CONSUMERS: &str = "uma:consumers";

/// `uma:consumers-deleted` → sorted set of seed consumers an operator deleted (tombstones).
pub const DELETED_CONSUMERS: &str = "uma:consumers-deleted";

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

/// `uma:usage:{<username>}:<entry id>:<YYYY-MM-DD>` → hash of a day's usage sums (SPEC §9):
/// `T<n>:i`, `T<n>:o` (tokens), `T<n>:c`, `T<n>:C` (cost in 10⁻¹² and in whole units) per slot, and
/// the same under `d:` for the whole day.
pub fn usage_day(username: &str, entry: &str, date: Date) -> String {
    format!("uma:usage:{{{username}}}:{entry}:{date}")
}

/// The parts of [`usage_day`] around the entry id.
pub fn usage_day_affixes(username: &str, date: Date) -> (String, String) {
    (format!("uma:usage:{{{username}}}:"), format!(":{date}"))
}

/// `uma:usage-month:{<username>}:<entry id>:<YYYY-MM>` → hash `i`, `o`, `c`, `C`: the month of
/// `date` (kept 13 months).
pub fn usage_month(username: &str, entry: &str, date: Date) -> String {
    format!("uma:usage-month:{{{username}}}:{entry}:{}", month(date))
}

/// The parts of [`usage_month`] around the entry id.
pub fn usage_month_affixes(username: &str, date: Date) -> (String, String) {
    (
        format!("uma:usage-month:{{{username}}}:"),
        format!(":{}", month(date)),
    )
}

/// `uma:usage-entries:{<username>}:<YYYY-MM-DD>` → set of entry ids with records that day.
pub fn usage_entries(username: &str, date: Date) -> String {
    format!("uma:usage-entries:{{{username}}}:{date}")
}

/// `uma:usage-seen:{<username>}` → sorted set of request-id digests (16 bytes), scored by the
/// time (ms) after which each may be forgotten less the dedup window.
pub fn usage_seen(username: &str) -> String {
    format!("uma:usage-seen:{{{username}}}")
}

/// `uma:usage-batch:{<username>}:<batch id>` → what the script answered for that batch, so a
/// retry after a timeout gets the same answer (and changes nothing).
pub fn usage_batch(username: &str, batch: &str) -> String {
    format!("uma:usage-batch:{{{username}}}:{batch}")
}

fn month(date: Date) -> String {
    format!("{:04}-{:02}", date.year(), date.month())
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
        assert_eq!(usage_day("u", "e", d), "uma:usage:{u}:e:2026-11-27");
        assert_eq!(usage_month("u", "e", d), "uma:usage-month:{u}:e:2026-11");
        let (prefix, suffix) = usage_month_affixes("u", d);
        assert_eq!(format!("{prefix}e{suffix}"), usage_month("u", "e", d));
        let (prefix, suffix) = tdl_counter_affixes("u", d);
        assert_eq!(
            format!("{prefix}kt-midm-base{suffix}"),
            tdl_counter("u", "kt-midm-base", d)
        );
    }
}
