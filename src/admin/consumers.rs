//! Consumers through the admin API: listing, reading, replacing and deleting (SPEC §10).
//!
//! A consumer an operator writes is a Redis record without a TTL, checked by the seed's own
//! validator; deleting a seed consumer leaves a tombstone so neither a reload nor a restart brings
//! it back. Which consumers exist is the union of the running seed and the operator index
//! (`uma:consumers`), less the tombstones (`uma:consumers-deleted`).

use std::sync::Arc;

use serde_json::{Value, json};

use super::keys::KeyInfo;
use super::{Actor, Admin, AdminError, FieldProblem, Params, RawJson, Write};
use crate::core::Consumer;
use crate::lookup::Invalidation;
use crate::seed::record::{self, ConsumerRecord, KeyRecord};
use crate::store::{AdminOp, keys};

/// Consumers per page when `limit` is not given, and the most a page may hold.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// Where a consumer's record, or a key, comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Seed,
    Operator,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Seed => "seed",
            Source::Operator => "operator",
        }
    }
}

impl Admin {
    /// `GET /admin/consumers`: seed and operator consumers in name order, `limit` at a time.
    pub async fn list_consumers(&self, params: &Params) -> Result<Value, AdminError> {
        let limit = page_limit(params.get("limit"))?;
        let prefix = params.get("prefix").map_or("", String::as_str);
        let cursor = params.get("cursor").filter(|c| !c.is_empty());
        let catalog = self.app.catalog.load_full();
        let mut seed: Vec<&str> = catalog
            .by_name
            .keys()
            .map(|n| &**n)
            .filter(|n| n.starts_with(prefix) && cursor.is_none_or(|c| *n > c.as_str()))
            .collect();
        seed.sort_unstable();
        let (operator, deleted) = match self.store_for_read()? {
            Some(store) => {
                // Names with the prefix are one run of the ordered set, from the later of the
                // cursor and the prefix on.
                let low = match cursor {
                    Some(c) if c.as_str() >= prefix => format!("({c}"),
                    _ if prefix.is_empty() => "-".to_owned(),
                    _ => format!("[{prefix}"),
                };
                let operator: Vec<String> = store
                    .members_from(keys::OPERATOR_CONSUMERS, &low, limit + 1)
                    .await
                    .map_err(AdminError::from_store)?
                    .into_iter()
                    .take_while(|n| n.starts_with(prefix))
                    .collect();
                let deleted = store
                    .members_from(keys::DELETED_CONSUMERS, "-", usize::MAX >> 1)
                    .await
                    .map_err(AdminError::from_store)?;
                (operator, deleted)
            }
            None => (Vec::new(), Vec::new()),
        };
        let mut names: Vec<(&str, Source)> = seed
            .into_iter()
            .filter(|n| deleted.binary_search_by(|d| d.as_str().cmp(n)).is_err())
            .map(|n| (n, Source::Seed))
            .collect();
        for name in &operator {
            match names.binary_search_by(|(n, _)| (*n).cmp(name.as_str())) {
                Ok(i) => names[i].1 = Source::Operator,
                Err(i) => names.insert(i, (name.as_str(), Source::Operator)),
            }
        }
        let more = names.len() > limit;
        names.truncate(limit);
        let next = more
            .then(|| names.last().map(|(n, _)| n.to_string()))
            .flatten();
        Ok(json!({
            "consumers": names
                .iter()
                .map(|(n, source)| json!({"username": n, "source": source.as_str()}))
                .collect::<Vec<_>>(),
            "next_cursor": next,
        }))
    }

    /// `GET /admin/consumers/{username}`.
    pub async fn consumer(&self, username: &str) -> Result<RawJson, AdminError> {
        let (consumer, source) = self
            .find_consumer(username)
            .await?
            .ok_or(AdminError::NotFound("No such consumer"))?;
        let keys = self.keys_of(username).await?;
        Ok(consumer_json(&consumer, source, &keys))
    }

    /// `PUT /admin/consumers/{username}`: creates or replaces the operator record (keys untouched).
    pub async fn put_consumer(
        &self,
        actor: &Actor,
        username: &str,
        body: &Value,
    ) -> Result<(bool, RawJson), AdminError> {
        let _one_at_a_time = self.begin_write().await?;
        if !body.is_object() {
            return Err(AdminError::BadRequest(
                "The body must be a JSON object".into(),
            ));
        }
        let consumer =
            record::from_admin_body(&body.to_string(), username).map_err(|problems| {
                AdminError::Invalid {
                    message: "Invalid consumer".into(),
                    problems: problems
                        .into_iter()
                        .map(|p| FieldProblem {
                            field: p.path,
                            reason: p.reason,
                        })
                        .collect(),
                }
            })?;
        let created = self.find_consumer(username).await?.is_none();
        let write = Write {
            action: "consumer.put",
            target: username.to_owned(),
            ops: vec![
                AdminOp::Set {
                    key: keys::consumer_record(username),
                    value: record::to_json(&consumer),
                },
                AdminOp::ZAdd {
                    key: keys::OPERATOR_CONSUMERS.into(),
                    member: username.to_owned(),
                },
                AdminOp::ZRem {
                    key: keys::DELETED_CONSUMERS.into(),
                    member: username.to_owned(),
                },
            ],
            invalidations: vec![Invalidation::Consumer(Arc::from(username))],
        };
        self.apply(actor, write).await?;
        let keys = self.keys_of(username).await?;
        Ok((created, consumer_json(&consumer, Source::Operator, &keys)))
    }

    /// `DELETE /admin/consumers/{username}`: the consumer and every key it has, at once.
    pub async fn delete_consumer(
        &self,
        actor: &Actor,
        username: &str,
    ) -> Result<Value, AdminError> {
        let _one_at_a_time = self.begin_write().await?;
        self.find_consumer(username)
            .await?
            .ok_or(AdminError::NotFound("No such consumer"))?;
        let keys = self.keys_of(username).await?;
        let now = jiff::Timestamp::now();
        let mut ops = Vec::new();
        let mut invalidations = vec![Invalidation::Consumer(Arc::from(username))];
        for key in &keys {
            invalidations.push(Invalidation::Key(key.hash));
            ops.push(match key.source {
                Source::Operator => AdminOp::Del {
                    key: keys::key_record(&key.hash),
                },
                // A seed key stays revoked across reloads and restarts.
                Source::Seed => AdminOp::Set {
                    key: keys::key_record(&key.hash),
                    value: KeyRecord {
                        revoked: true,
                        ..key.record_at(username, now)
                    }
                    .to_json(),
                },
            });
        }
        ops.push(AdminOp::Del {
            key: keys::consumer_keys(username),
        });
        let in_seed = self.app.catalog.load().by_name.contains_key(username);
        ops.push(AdminOp::ZRem {
            key: keys::OPERATOR_CONSUMERS.into(),
            member: username.to_owned(),
        });
        if in_seed {
            ops.push(AdminOp::Set {
                key: keys::consumer_record(username),
                value: record::tombstone(username),
            });
            ops.push(AdminOp::ZAdd {
                key: keys::DELETED_CONSUMERS.into(),
                member: username.to_owned(),
            });
        } else {
            ops.push(AdminOp::Del {
                key: keys::consumer_record(username),
            });
        }
        self.apply(
            actor,
            Write {
                action: "consumer.delete",
                target: username.to_owned(),
                ops,
                invalidations,
            },
        )
        .await?;
        Ok(json!({"username": username, "deleted": true, "revoked_keys": keys.len()}))
    }

    /// The consumer named `username` as the service resolves it now: an operator record (unless
    /// a tombstone), else the running seed.
    pub(super) async fn find_consumer(
        &self,
        username: &str,
    ) -> Result<Option<(Arc<Consumer>, Source)>, AdminError> {
        let catalog = self.app.catalog.load_full();
        let Some(store) = self.store_for_read()? else {
            return Ok(catalog
                .by_name
                .get(username)
                .map(|c| (c.clone(), Source::Seed)));
        };
        let name = keys::consumer_record(username);
        let record = store
            .get_record(&name)
            .await
            .map_err(AdminError::from_store)?;
        if let Some(r) = record.filter(|r| r.persistent) {
            match record::read(&r.value, &name) {
                Ok(ConsumerRecord::Live(c)) if *c.username == *username => {
                    return Ok(Some((Arc::from(c), Source::Operator)));
                }
                Ok(ConsumerRecord::Deleted(n)) if n == username => return Ok(None),
                // Unreadable: the lookup treats it as missing, and so does this.
                _ => {}
            }
        }
        Ok(catalog
            .by_name
            .get(username)
            .map(|c| (c.clone(), Source::Seed)))
    }
}

fn page_limit(given: Option<&String>) -> Result<usize, AdminError> {
    match given.filter(|l| !l.is_empty()) {
        None => Ok(DEFAULT_PAGE),
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
            _ => Err(AdminError::BadRequest(format!(
                "limit must be between 1 and {MAX_PAGE}"
            ))),
        },
    }
}

/// A consumer as `GET` answers it: the seed's shapes and names, its source and its keys. The
/// metadata list is the entries' own JSON, spliced in as written: read back through `Value`, its
/// prices would pass through `f64`.
fn consumer_json(consumer: &Consumer, source: Source, keys: &[KeyInfo]) -> RawJson {
    let head = json!({
        "username": &*consumer.username,
        "custom_id": consumer.custom_id,
        "tags": consumer.tags,
        "acls": consumer.groups.iter().map(|g| json!({"group": g})).collect::<Vec<_>>(),
        "source": source.as_str(),
        "keys": keys.iter().map(KeyInfo::to_json).collect::<Vec<_>>(),
    })
    .to_string();
    let metadata = consumer
        .metadata
        .as_ref()
        .map_or_else(|| "null".to_owned(), |list| list.json());
    // `head` is a JSON object: its closing brace is its last byte.
    let open = head.strip_suffix('}').unwrap_or(&head);
    RawJson(format!("{open},\"metadata_list\":{metadata}}}"))
}
