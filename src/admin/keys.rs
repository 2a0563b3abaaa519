//! API keys through the admin API: creation, rotation with a grace period, disabling, expiry and
//! revocation (SPEC §10).
//!
//! A key is 32 bytes from the OS random source, shown once as `uma_` + URL-safe base64 and stored
//! only as its SHA-256 (`uma:key:<sha256>`, a [`KeyRecord`] without a TTL; the consumer's index
//! `uma:consumer-keys:{user}` lists its ids). Expiry is a field of the record, checked on every
//! lookup and bounding every cached copy, so a key stops at its time on every replica without any
//! message. Seed keys are listed too (id `seed-<16 hex of the digest>`); disabling, expiring or
//! revoking one writes an operator override record for it, which wins over the seed.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jiff::{SignedDuration, Timestamp};
use rand::TryRngCore as _;
use rand::rngs::OsRng;
use serde_json::{Map, Value, json};

use super::consumers::Source;
use super::{Actor, Admin, AdminError, FieldProblem, Write};
use crate::core::KeyHash;
use crate::lookup::Invalidation;
use crate::seed::record::{self, KeyRecord, KeyValue};
use crate::store::{AdminOp, keys};

/// Longest grace period a rotation may give the old key (a year).
const MAX_GRACE_SECS: i64 = 31_536_000;
/// Longest key name.
const MAX_NAME_CHARS: usize = 128;

/// One key of a consumer, as listed (never the key itself).
#[derive(Debug, Clone)]
pub struct KeyInfo {
    pub id: String,
    pub hash: KeyHash,
    /// Made by the admin API (`Operator`), or in the running seed, perhaps with an operator's
    /// override (`Seed`).
    pub source: Source,
    pub name: Option<String>,
    pub created: Option<Timestamp>,
    pub expires_at: Option<Timestamp>,
    pub disabled: bool,
}

impl KeyInfo {
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "created": self.created.map(|t| t.to_string()),
            "expires_at": self.expires_at.map(|t| t.to_string()),
            "disabled": self.disabled,
            "source": self.source.as_str(),
        })
    }

    /// The record that keeps this key's state, as an operator record written at `now`.
    pub fn record_at(&self, username: &str, now: Timestamp) -> KeyRecord {
        KeyRecord {
            username: username.to_owned(),
            id: self.id.clone(),
            name: self.name.clone(),
            created: self.created.unwrap_or(now),
            expires_at: self.expires_at,
            disabled: self.disabled,
            revoked: false,
        }
    }

    fn active_at(&self, now: Timestamp) -> bool {
        !self.disabled && self.expires_at.is_none_or(|t| t > now)
    }

    fn target(&self, username: &str) -> String {
        format!("{username}/{}", self.id)
    }
}

/// A key just made: the plain text (shown once) and its digest.
struct NewKey {
    plain: String,
    hash: KeyHash,
    id: String,
}

fn new_key() -> Result<NewKey, AdminError> {
    let mut secret = [0u8; 32];
    let mut id = [0u8; 8];
    OsRng
        .try_fill_bytes(&mut secret)
        .and_then(|()| OsRng.try_fill_bytes(&mut id))
        .map_err(|e| AdminError::Internal(format!("the OS random source failed: {e}")))?;
    let plain = format!("uma_{}", URL_SAFE_NO_PAD.encode(secret));
    Ok(NewKey {
        hash: KeyHash::of(&plain),
        plain,
        id: format!("k_{}", hex::encode(id)),
    })
}

/// A new key for `username` and the record it is stored under.
fn new_key_for(
    username: &str,
    name: Option<String>,
    now: Timestamp,
    expires_at: Option<Timestamp>,
) -> Result<(NewKey, KeyRecord), AdminError> {
    let key = new_key()?;
    let record = KeyRecord {
        username: username.to_owned(),
        id: key.id.clone(),
        name,
        created: now,
        expires_at,
        disabled: false,
        revoked: false,
    };
    Ok((key, record))
}

/// The id a seed key is listed under.
pub fn seed_key_id(hash: &KeyHash) -> String {
    format!("seed-{}", &hash.to_hex()[..16])
}

impl Admin {
    /// Every key of `username` still in force or merely disabled/expired (revoked ones are gone).
    pub(super) async fn keys_of(&self, username: &str) -> Result<Vec<KeyInfo>, AdminError> {
        let catalog = self.app.catalog.load_full();
        let mut seed: Vec<KeyHash> = catalog
            .by_key
            .iter()
            .filter(|(_, c)| *c.username == *username)
            .map(|(hash, _)| *hash)
            .collect();
        seed.sort_unstable();
        let Some(store) = self.store_for_read()? else {
            return Ok(seed.iter().map(|h| seed_key(*h)).collect());
        };
        let mut operator: Vec<(String, KeyHash)> = store
            .hash_all(&keys::consumer_keys(username))
            .await
            .map_err(AdminError::from_store)?
            .into_iter()
            .filter_map(|(id, hex)| Some((id, KeyHash::from_hex(&hex)?)))
            .collect();
        operator.sort();
        let names: Vec<String> = operator
            .iter()
            .map(|(_, h)| h)
            .chain(&seed)
            .map(keys::key_record)
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let records = if names.is_empty() {
            Vec::new()
        } else {
            store
                .get_records(&names)
                .await
                .map_err(AdminError::from_store)?
        };
        let mut records = records.into_iter().map(|r| {
            r.ok()
                .flatten()
                .filter(|r| r.persistent)
                .and_then(|r| record::read_key(&r.value))
        });
        let mut listed = Vec::new();
        for (id, hash) in &operator {
            if let Some(Some(KeyValue::Record(r))) = records.next()
                && r.username == username
                && !r.revoked
            {
                listed.push(KeyInfo {
                    id: id.clone(),
                    hash: *hash,
                    source: Source::Operator,
                    name: r.name,
                    created: Some(r.created),
                    expires_at: r.expires_at,
                    disabled: r.disabled,
                });
            }
        }
        for hash in &seed {
            match records.next().flatten() {
                None => listed.push(seed_key(*hash)),
                Some(KeyValue::Record(r)) if r.username == username && !r.revoked => {
                    listed.push(KeyInfo {
                        expires_at: r.expires_at,
                        disabled: r.disabled,
                        ..seed_key(*hash)
                    });
                }
                // Revoked, or given to another consumer by an operator.
                Some(_) => {}
            }
        }
        Ok(listed)
    }

    async fn key_of(&self, username: &str, id: &str) -> Result<KeyInfo, AdminError> {
        if self.find_consumer(username).await?.is_none() {
            return Err(AdminError::NotFound("No such consumer"));
        }
        self.keys_of(username)
            .await?
            .into_iter()
            .find(|k| k.id == id)
            .ok_or(AdminError::NotFound("No such key"))
    }

    /// `POST /admin/consumers/{username}/keys`.
    pub async fn create_key(
        &self,
        actor: &Actor,
        username: &str,
        body: &Value,
    ) -> Result<Value, AdminError> {
        let _one_at_a_time = self.begin_write().await?;
        let fields = object(body, &["name", "expires_at"])?;
        let name = key_name(&fields)?;
        let now = Timestamp::now();
        let expires_at = future_time(&fields, "expires_at", now)?;
        if self.find_consumer(username).await?.is_none() {
            return Err(AdminError::NotFound("No such consumer"));
        }
        let existing = self.keys_of(username).await?;
        if let Some(name) = &name
            && existing.iter().any(|k| k.name.as_ref() == Some(name))
        {
            return Err(AdminError::Conflict(format!(
                "A key named `{name}` already exists for this consumer"
            )));
        }
        let (key, created) = new_key_for(username, name, now, expires_at)?;
        let write = Write {
            action: "key.create",
            target: format!("{username}/{}", key.id),
            ops: add_key_ops(username, &key, &created),
            invalidations: vec![Invalidation::Key(key.hash)],
        };
        self.apply(actor, write).await?;
        Ok(new_key_json(&key, &created))
    }

    /// `POST /admin/consumers/{username}/keys/{id}/rotate`: a new key; the old one keeps working
    /// for `grace_secs` (default 0: refused at once).
    pub async fn rotate_key(
        &self,
        actor: &Actor,
        username: &str,
        id: &str,
        body: &Value,
    ) -> Result<Value, AdminError> {
        let _one_at_a_time = self.begin_write().await?;
        let fields = object(body, &["grace_secs", "expires_at"])?;
        let grace = grace_secs(&fields)?;
        let now = Timestamp::now();
        let expires_at = future_time(&fields, "expires_at", now)?;
        let old = self.key_of(username, id).await?;
        if !old.active_at(now) {
            return Err(AdminError::Conflict(
                "The key is disabled or expired; only a key in force can be rotated".into(),
            ));
        }
        let (key, created) = new_key_for(username, old.name.clone(), now, expires_at)?;
        let mut ops = add_key_ops(username, &key, &created);
        let old_until = if grace == 0 {
            ops.extend(revoke_ops(username, &old, now));
            now
        } else {
            let until = now
                .checked_add(SignedDuration::from_secs(grace))
                .unwrap_or(now);
            let until = old.expires_at.map_or(until, |t| t.min(until));
            ops.push(AdminOp::Set {
                key: keys::key_record(&old.hash),
                value: KeyRecord {
                    expires_at: Some(until),
                    ..old.record_at(username, now)
                }
                .to_json(),
            });
            until
        };
        let write = Write {
            action: "key.rotate",
            target: old.target(username),
            ops,
            invalidations: vec![Invalidation::Key(key.hash), Invalidation::Key(old.hash)],
        };
        self.apply(actor, write).await?;
        let mut answer = new_key_json(&key, &created);
        answer["replaces"] = json!({"id": old.id, "expires_at": old_until.to_string()});
        Ok(answer)
    }

    /// `PATCH /admin/consumers/{username}/keys/{id}`: `disabled`, `expires_at` (null clears it).
    pub async fn patch_key(
        &self,
        actor: &Actor,
        username: &str,
        id: &str,
        body: &Value,
    ) -> Result<Value, AdminError> {
        let _one_at_a_time = self.begin_write().await?;
        let fields = object(body, &["disabled", "expires_at"])?;
        let disabled = match fields.get("disabled") {
            None => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => return Err(invalid("disabled", "must be true or false")),
        };
        let expires_at = match fields.get("expires_at") {
            None => None,
            Some(Value::Null) => Some(None),
            Some(Value::String(text)) => {
                Some(Some(text.parse::<Timestamp>().map_err(|_| {
                    invalid("expires_at", "must be an RFC 3339 time")
                })?))
            }
            Some(_) => return Err(invalid("expires_at", "must be an RFC 3339 time or null")),
        };
        let mut key = self.key_of(username, id).await?;
        if let Some(disabled) = disabled {
            key.disabled = disabled;
        }
        if let Some(expires_at) = expires_at {
            key.expires_at = expires_at;
        }
        let now = Timestamp::now();
        let write = Write {
            action: "key.patch",
            target: key.target(username),
            ops: vec![AdminOp::Set {
                key: keys::key_record(&key.hash),
                value: key.record_at(username, now).to_json(),
            }],
            invalidations: vec![Invalidation::Key(key.hash)],
        };
        self.apply(actor, write).await?;
        Ok(key.to_json())
    }

    /// `DELETE /admin/consumers/{username}/keys/{id}`.
    pub async fn revoke_key(
        &self,
        actor: &Actor,
        username: &str,
        id: &str,
    ) -> Result<Value, AdminError> {
        let _one_at_a_time = self.begin_write().await?;
        let key = self.key_of(username, id).await?;
        let write = Write {
            action: "key.revoke",
            target: key.target(username),
            ops: revoke_ops(username, &key, Timestamp::now()),
            invalidations: vec![Invalidation::Key(key.hash)],
        };
        self.apply(actor, write).await?;
        Ok(json!({"id": key.id, "revoked": true}))
    }
}

fn seed_key(hash: KeyHash) -> KeyInfo {
    KeyInfo {
        id: seed_key_id(&hash),
        hash,
        source: Source::Seed,
        name: None,
        created: None,
        expires_at: None,
        disabled: false,
    }
}

fn add_key_ops(username: &str, key: &NewKey, record: &KeyRecord) -> Vec<AdminOp> {
    vec![
        AdminOp::Set {
            key: keys::key_record(&key.hash),
            value: record.to_json(),
        },
        AdminOp::HSet {
            key: keys::consumer_keys(username),
            field: key.id.clone(),
            value: key.hash.to_hex(),
        },
    ]
}

/// An operator key's record goes; a seed key gets a revoked override (the seed still lists it).
fn revoke_ops(username: &str, key: &KeyInfo, now: Timestamp) -> Vec<AdminOp> {
    match key.source {
        Source::Operator => vec![
            AdminOp::Del {
                key: keys::key_record(&key.hash),
            },
            AdminOp::HDel {
                key: keys::consumer_keys(username),
                field: key.id.clone(),
            },
        ],
        Source::Seed => vec![AdminOp::Set {
            key: keys::key_record(&key.hash),
            value: KeyRecord {
                revoked: true,
                ..key.record_at(username, now)
            }
            .to_json(),
        }],
    }
}

fn new_key_json(key: &NewKey, record: &KeyRecord) -> Value {
    json!({
        "id": key.id,
        "key": key.plain,
        "name": record.name,
        "created": record.created.to_string(),
        "expires_at": record.expires_at.map(|t| t.to_string()),
    })
}

fn invalid(field: &str, reason: &str) -> AdminError {
    AdminError::Invalid {
        message: "Invalid request".into(),
        problems: vec![FieldProblem {
            field: field.into(),
            reason: reason.into(),
        }],
    }
}

/// The body's fields, refusing any not in `known` (every one at once).
fn object(body: &Value, known: &[&str]) -> Result<Map<String, Value>, AdminError> {
    let Value::Object(fields) = body else {
        return Err(AdminError::BadRequest(
            "The body must be a JSON object".into(),
        ));
    };
    let problems: Vec<FieldProblem> = fields
        .keys()
        .filter(|k| !known.contains(&k.as_str()))
        .map(|k| FieldProblem {
            field: k.clone(),
            reason: "unknown field".into(),
        })
        .collect();
    if problems.is_empty() {
        Ok(fields.clone())
    } else {
        Err(AdminError::Invalid {
            message: "Invalid request".into(),
            problems,
        })
    }
}

fn key_name(fields: &Map<String, Value>) -> Result<Option<String>, AdminError> {
    match fields.get("name") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(name))
            if !name.is_empty()
                && name.chars().count() <= MAX_NAME_CHARS
                && !name.chars().any(char::is_control) =>
        {
            Ok(Some(name.clone()))
        }
        Some(_) => Err(invalid(
            "name",
            "must be a non-empty string of at most 128 characters without control characters",
        )),
    }
}

/// An optional RFC 3339 time that must lie after `now`.
fn future_time(
    fields: &Map<String, Value>,
    field: &str,
    now: Timestamp,
) -> Result<Option<Timestamp>, AdminError> {
    match fields.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => match text.parse::<Timestamp>() {
            Ok(t) if t > now => Ok(Some(t)),
            Ok(_) => Err(invalid(field, "must be in the future")),
            Err(_) => Err(invalid(field, "must be an RFC 3339 time")),
        },
        Some(_) => Err(invalid(field, "must be an RFC 3339 time")),
    }
}

fn grace_secs(fields: &Map<String, Value>) -> Result<i64, AdminError> {
    match fields.get("grace_secs") {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(secs) if (0..=MAX_GRACE_SECS).contains(&secs) => Ok(secs),
            _ => Err(invalid(
                "grace_secs",
                "must be an integer from 0 to 31536000",
            )),
        },
        Some(_) => Err(invalid(
            "grace_secs",
            "must be an integer from 0 to 31536000",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_url_safe_and_long_enough() {
        let a = new_key().unwrap();
        let b = new_key().unwrap();
        assert_ne!(a.plain, b.plain);
        assert_ne!(a.id, b.id);
        let body = a.plain.strip_prefix("uma_").unwrap();
        assert_eq!(body.len(), 43, "32 bytes of base64url without padding");
        assert!(
            body.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        assert_eq!(a.hash, KeyHash::of(&a.plain));
    }

    #[test]
    fn body_checks_name_every_field() {
        let now = Timestamp::now();
        let body = json!({"grace_secs": -1, "bogus": 1});
        match object(&body, &["grace_secs"]) {
            Err(AdminError::Invalid { problems, .. }) => assert_eq!(problems[0].field, "bogus"),
            other => panic!("{other:?}"),
        }
        let fields = object(&json!({"grace_secs": -1}), &["grace_secs"]).unwrap();
        assert!(grace_secs(&fields).is_err());
        let fields = object(&json!({"grace_secs": 30}), &["grace_secs"]).unwrap();
        assert_eq!(grace_secs(&fields).unwrap(), 30);
        let past = object(
            &json!({"expires_at": "2001-01-01T00:00:00Z"}),
            &["expires_at"],
        )
        .unwrap();
        assert!(future_time(&past, "expires_at", now).is_err());
        let junk = object(&json!({"expires_at": "tomorrow"}), &["expires_at"]).unwrap();
        assert!(future_time(&junk, "expires_at", now).is_err());
        let later = object(
            &json!({"expires_at": "2999-01-01T00:00:00Z"}),
            &["expires_at"],
        )
        .unwrap();
        assert!(future_time(&later, "expires_at", now).unwrap().is_some());
        assert!(key_name(&object(&json!({"name": ""}), &["name"]).unwrap()).is_err());
        assert!(object(&json!([1]), &["name"]).is_err());
    }

    #[test]
    fn seed_key_ids_show_only_a_prefix_of_the_digest() {
        let hash = KeyHash::of("user1-secret-key-12345");
        let id = seed_key_id(&hash);
        assert_eq!(id.len(), "seed-".len() + 16);
        assert!(hash.to_hex().starts_with(&id[5..]));
    }
}
