//! The audit trail (SPEC §10): every admin write and every reload, with time, actor, action,
//! target and outcome, in the capped stream `uma:audit` and in the log at `info`.
//!
//! Admin writes append their entry inside their own transaction (see `store::AdminWrite`), so an
//! applied write always has its entry; [`record`] is for what has no transaction of its own — a
//! reload, a refused write — and is best effort: with Redis down the log line is the record.

use jiff::Timestamp;

use crate::store::RedisStore;

/// One audit entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// The admin token's name, `admin` for `admin.token`, or what started a reload (`sighup`, `file`).
    pub actor: String,
    /// `consumer.put`, `consumer.delete`, `key.create`, `key.rotate`, `key.patch`, `key.revoke`,
    /// `seed.reload`.
    pub action: &'static str,
    /// The consumer (`alice`), key (`alice/k_…`) or file the action is about.
    pub target: String,
    /// `ok`, or what went wrong.
    pub outcome: String,
}

impl AuditEntry {
    /// The stream fields, with the time of now.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("time", Timestamp::now().to_string()),
            ("actor", self.actor.clone()),
            ("action", self.action.to_owned()),
            ("target", self.target.clone()),
            ("outcome", self.outcome.clone()),
        ]
    }

    /// The `info` line every entry gets.
    pub fn log(&self) {
        tracing::info!(
            actor = %self.actor,
            action = self.action,
            target = %self.target,
            outcome = %self.outcome,
            "audit"
        );
    }
}

/// Logs `entry` and appends it to the stream when Redis is there.
pub async fn record(store: Option<&RedisStore>, max_entries: u64, entry: &AuditEntry) {
    entry.log();
    if let Some(store) = store.filter(|s| s.is_up())
        && let Err(error) = store.append_audit(&entry.fields(), max_entries).await
    {
        tracing::warn!(%error, action = entry.action, "audit entry not written to Redis (it is in this log)");
    }
}
