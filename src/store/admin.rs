//! Admin writes, the audit stream and the invalidation channel in Redis (SPEC §10).
//!
//! An admin write is one script ([`scripts::ADMIN_WRITE`]): the types of every key it touches are
//! checked before anything is written, so a write is applied whole or not at all, together with
//! its audit entry and its invalidation message. The subscription runs on a connection of its own
//! (pub/sub takes the connection over) and pings it every second, so a connection that silently
//! died is replaced within about a second; every (re)subscription tells the caller, who must then
//! forget everything cached (messages sent meanwhile are lost: pub/sub is fire-and-forget).

use std::time::Duration;

use futures_util::StreamExt as _;
use redis::Value;
use serde_json::json;
use tokio::sync::watch;

use super::scripts;
use super::{Patience, RedisStore, StoreError, bytes};

/// The channel every replica listens on for invalidations.
pub const INVALIDATION_CHANNEL: &str = "uma:invalidate";

/// The audit stream.
pub const AUDIT_STREAM: &str = "uma:audit";

/// How often the subscription's connection is pinged; a ping not answered within this replaces it.
const PUBSUB_PING: Duration = Duration::from_secs(1);

/// What kind of value a key written by an admin write must hold (or be absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    String,
    Hash,
    SortedSet,
}

impl KeyKind {
    fn redis_name(self) -> &'static str {
        match self {
            KeyKind::String => "string",
            KeyKind::Hash => "hash",
            KeyKind::SortedSet => "zset",
        }
    }
}

/// One step of an admin write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminOp {
    /// `SET` without a TTL: an operator record.
    Set {
        key: String,
        value: String,
    },
    Del {
        key: String,
    },
    HSet {
        key: String,
        field: String,
        value: String,
    },
    HDel {
        key: String,
        field: String,
    },
    /// Added with score 0, so the set is ordered by member (`ZRANGEBYLEX`).
    ZAdd {
        key: String,
        member: String,
    },
    ZRem {
        key: String,
        member: String,
    },
}

impl AdminOp {
    fn key(&self) -> &str {
        match self {
            AdminOp::Set { key, .. }
            | AdminOp::Del { key }
            | AdminOp::HSet { key, .. }
            | AdminOp::HDel { key, .. }
            | AdminOp::ZAdd { key, .. }
            | AdminOp::ZRem { key, .. } => key,
        }
    }

    fn kind(&self) -> Option<KeyKind> {
        match self {
            AdminOp::Set { .. } => Some(KeyKind::String),
            AdminOp::Del { .. } => None,
            AdminOp::HSet { .. } | AdminOp::HDel { .. } => Some(KeyKind::Hash),
            AdminOp::ZAdd { .. } | AdminOp::ZRem { .. } => Some(KeyKind::SortedSet),
        }
    }
}

/// A whole admin write: its steps, its audit entry, and what to publish.
#[derive(Debug, Clone, Default)]
pub struct AdminWrite {
    pub ops: Vec<AdminOp>,
    /// Field, value pairs of the audit entry.
    pub audit: Vec<(&'static str, String)>,
    pub audit_max_entries: u64,
    /// Messages for [`INVALIDATION_CHANNEL`].
    pub invalidations: Vec<String>,
}

/// One audit entry as read back: its stream id and fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub id: String,
    pub fields: Vec<(String, String)>,
}

impl AdminWrite {
    /// The script's keys and its one JSON argument.
    fn encode(&self) -> (Vec<String>, String) {
        let mut keys: Vec<String> = Vec::new();
        let index = |key: &str, keys: &mut Vec<String>| -> usize {
            match keys.iter().position(|k| k == key) {
                Some(i) => i + 1,
                None => {
                    keys.push(key.to_owned());
                    keys.len()
                }
            }
        };
        let mut types = Vec::new();
        let mut ops = Vec::new();
        for op in &self.ops {
            let i = index(op.key(), &mut keys);
            if let Some(kind) = op.kind() {
                types.push(json!([i, kind.redis_name()]));
            }
            ops.push(match op {
                AdminOp::Set { value, .. } => json!(["set", i, value]),
                AdminOp::Del { .. } => json!(["del", i]),
                AdminOp::HSet { field, value, .. } => json!(["hset", i, field, value]),
                AdminOp::HDel { field, .. } => json!(["hdel", i, field]),
                AdminOp::ZAdd { member, .. } => json!(["zadd", i, member]),
                AdminOp::ZRem { member, .. } => json!(["zrem", i, member]),
            });
        }
        keys.push(AUDIT_STREAM.to_owned());
        let audit: Vec<&str> = self
            .audit
            .iter()
            .flat_map(|(k, v)| [*k, v.as_str()])
            .collect();
        let publish: Vec<_> = self
            .invalidations
            .iter()
            .map(|m| json!([INVALIDATION_CHANNEL, m]))
            .collect();
        let arg = json!({
            "types": types,
            "ops": ops,
            "max": self.audit_max_entries.max(1),
            "audit": audit,
            "publish": publish,
        });
        (keys, arg.to_string())
    }
}

impl RedisStore {
    /// Applies an admin write whole, or nothing of it (`Rejected` names a key of the wrong type).
    pub async fn admin_write(&self, write: &AdminWrite) -> Result<(), StoreError> {
        let (keys, arg) = write.encode();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let reply = self
            .script_within(Patience::Bulk, &scripts::ADMIN_WRITE, &keys, &[&arg])
            .await?;
        match reply {
            Value::SimpleString(ok) if ok == "ok" => Ok(()),
            Value::BulkString(ok) if ok == b"ok" => Ok(()),
            Value::Okay => Ok(()),
            Value::Array(parts) if parts.len() == 3 => {
                let text = |v: &Value| {
                    bytes(v)
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default()
                };
                Err(StoreError::Rejected(format!(
                    "{}: {}",
                    text(&parts[1]),
                    text(&parts[2])
                )))
            }
            Value::ServerError(e) => Err(StoreError::Rejected(e.to_string())),
            other => Err(StoreError::Rejected(format!(
                "the admin write answered {other:?}"
            ))),
        }
    }

    /// Appends one audit entry on its own (a reload, a refused write).
    pub async fn append_audit(
        &self,
        fields: &[(&'static str, String)],
        max_entries: u64,
    ) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(AUDIT_STREAM)
            .arg("MAXLEN")
            .arg("~")
            .arg(max_entries.max(1))
            .arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(v.as_str());
        }
        self.run_within(Patience::Bulk, |mut conn| async move {
            cmd.query_async::<Value>(&mut conn).await
        })
        .await
        .map(|_| ())
    }

    /// Audit entries newest first, at most `limit`, strictly after the stream id `after` if given.
    pub async fn read_audit(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditRow>, StoreError> {
        let low = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
        let reply = self
            .run_within(Patience::Bulk, |mut conn| async move {
                redis::cmd("XREVRANGE")
                    .arg(AUDIT_STREAM)
                    .arg("+")
                    .arg(low)
                    .arg("COUNT")
                    .arg(limit)
                    .query_async::<Value>(&mut conn)
                    .await
            })
            .await?;
        parse_stream(reply)
    }

    /// Every field and value of a hash.
    pub async fn hash_all(&self, key: &str) -> Result<Vec<(String, String)>, StoreError> {
        let key = key.to_owned();
        let reply = self
            .run_within(Patience::Bulk, |mut conn| async move {
                redis::cmd("HGETALL")
                    .arg(key)
                    .query_async::<Value>(&mut conn)
                    .await
            })
            .await?;
        pairs(&reply)
    }

    /// Members of a score-0 sorted set from `low` on, in order, at most `limit`. `low` is a
    /// `ZRANGEBYLEX` bound: `-` (the start), `[name` (from it) or `(name` (after it).
    pub async fn members_from(
        &self,
        key: &str,
        low: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let (key, low) = (key.to_owned(), low.to_owned());
        let reply = self
            .run_within(Patience::Bulk, |mut conn| async move {
                redis::cmd("ZRANGEBYLEX")
                    .arg(key)
                    .arg(low)
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit)
                    .query_async::<Value>(&mut conn)
                    .await
            })
            .await?;
        strings(&reply)
    }

    /// Keeps a subscription to [`INVALIDATION_CHANNEL`] until `stopped`: `subscribed` runs after
    /// every (re)subscription, `message` for each message.
    pub async fn run_subscription(
        &self,
        subscribed: impl Fn(),
        message: impl Fn(&str),
        mut stopped: watch::Receiver<bool>,
    ) {
        // Said once per loss, and only while Redis otherwise answers: an outage is the health
        // latch's to say (once, SPEC §2).
        let mut warned = false;
        loop {
            let session = self.subscription(&subscribed, &message);
            let (was_subscribed, ended) = tokio::select! {
                ended = session => ended,
                _ = stopped.wait_for(|s| *s) => return,
            };
            if was_subscribed {
                warned = false;
            }
            if !warned && self.is_up() {
                tracing::warn!(redis = %self.url_for_logs, reason = %ended, "invalidation subscription lost; resubscribing (caches are flushed once it is back)");
                warned = true;
            } else {
                tracing::debug!(reason = %ended, "invalidation subscription not in place; retrying");
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stopped.wait_for(|s| *s) => return,
            }
        }
    }

    /// One subscription, until its connection fails; returns whether it was in place, and why it
    /// ended.
    async fn subscription(
        &self,
        subscribed: &impl Fn(),
        message: &impl Fn(&str),
    ) -> (bool, String) {
        let connect = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(INVALIDATION_CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = match tokio::time::timeout(PUBSUB_PING, connect).await {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(e)) => return (false, e.to_string()),
            Err(_) => return (false, "no answer within 1s".into()),
        };
        tracing::debug!("subscribed to {INVALIDATION_CHANNEL}");
        let subscribed_gauge = metrics::gauge!("uma_invalidation_subscribed");
        let received = metrics::counter!("uma_invalidation_messages_total");
        metrics::counter!("uma_invalidation_resubscribes_total").increment(1);
        subscribed_gauge.set(1.0);
        self.subscribed
            .store(true, std::sync::atomic::Ordering::Release);
        subscribed();
        let ended = self.listen(pubsub, message, &received).await;
        subscribed_gauge.set(0.0);
        self.subscribed
            .store(false, std::sync::atomic::Ordering::Release);
        (true, ended)
    }

    /// Whether the invalidation subscription is in place now.
    pub fn subscribed(&self) -> bool {
        self.subscribed.load(std::sync::atomic::Ordering::Acquire)
    }

    async fn listen(
        &self,
        pubsub: redis::aio::PubSub,
        message: &impl Fn(&str),
        received: &metrics::Counter,
    ) -> String {
        let (mut sink, mut stream) = pubsub.split();
        let mut ping = tokio::time::interval(PUBSUB_PING);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                next = stream.next() => match next {
                    Some(msg) => match std::str::from_utf8(msg.get_payload_bytes()) {
                        Ok(text) => {
                            received.increment(1);
                            message(text);
                        }
                        Err(_) => tracing::warn!("invalidation message is not UTF-8; ignored"),
                    },
                    None => return "the connection closed".into(),
                },
                _ = ping.tick() => {
                    match tokio::time::timeout(PUBSUB_PING, sink.ping::<Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return e.to_string(),
                        Err(_) => return "no answer to PING within 1s".into(),
                    }
                }
            }
        }
    }
}

fn strings(reply: &Value) -> Result<Vec<String>, StoreError> {
    match reply {
        Value::Array(items) => items
            .iter()
            .map(|v| {
                bytes(v)
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .ok_or_else(|| StoreError::Rejected(format!("not a string: {v:?}")))
            })
            .collect(),
        Value::ServerError(e) => Err(StoreError::Rejected(e.to_string())),
        other => Err(StoreError::Rejected(format!("not a list: {other:?}"))),
    }
}

fn pairs(reply: &Value) -> Result<Vec<(String, String)>, StoreError> {
    match reply {
        Value::Map(items) => items
            .iter()
            .map(|(k, v)| Ok((string(k)?, string(v)?)))
            .collect(),
        _ => {
            let flat = strings(reply)?;
            Ok(flat
                .chunks_exact(2)
                .map(|c| (c[0].clone(), c[1].clone()))
                .collect())
        }
    }
}

fn string(v: &Value) -> Result<String, StoreError> {
    bytes(v)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .ok_or_else(|| StoreError::Rejected(format!("not a string: {v:?}")))
}

fn parse_stream(reply: Value) -> Result<Vec<AuditRow>, StoreError> {
    let Value::Array(entries) = reply else {
        return match reply {
            Value::ServerError(e) => Err(StoreError::Rejected(e.to_string())),
            Value::Nil => Ok(Vec::new()),
            other => Err(StoreError::Rejected(format!(
                "XREVRANGE answered {other:?}"
            ))),
        };
    };
    entries
        .into_iter()
        .map(|entry| match entry {
            Value::Array(parts) if parts.len() == 2 => Ok(AuditRow {
                id: string(&parts[0])?,
                fields: pairs(&parts[1])?,
            }),
            other => Err(StoreError::Rejected(format!(
                "not a stream entry: {other:?}"
            ))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_declares_each_key_once_and_the_audit_stream_last() {
        let write = AdminWrite {
            ops: vec![
                AdminOp::Set {
                    key: "uma:consumer:{u}".into(),
                    value: "{}".into(),
                },
                AdminOp::HSet {
                    key: "uma:consumer-keys:{u}".into(),
                    field: "k1".into(),
                    value: "ab".into(),
                },
                AdminOp::HDel {
                    key: "uma:consumer-keys:{u}".into(),
                    field: "k0".into(),
                },
            ],
            audit: vec![("action", "key.create".into())],
            audit_max_entries: 10,
            invalidations: vec!["consumer u".into()],
        };
        let (keys, arg) = write.encode();
        assert_eq!(
            keys,
            ["uma:consumer:{u}", "uma:consumer-keys:{u}", AUDIT_STREAM]
        );
        let arg: serde_json::Value = serde_json::from_str(&arg).unwrap();
        assert_eq!(
            arg["types"],
            json!([[1, "string"], [2, "hash"], [2, "hash"]])
        );
        assert_eq!(arg["ops"][2], json!(["hdel", 2, "k0"]));
        assert_eq!(
            arg["publish"],
            json!([[INVALIDATION_CHANNEL, "consumer u"]])
        );
        assert_eq!(arg["audit"], json!(["action", "key.create"]));
    }
}
