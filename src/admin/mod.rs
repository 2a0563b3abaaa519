//! Runtime administration (SPEC §10): consumers and keys as operator records in Redis, the audit
//! trail, the billing export, and the reload entry point the admin API shares with SIGHUP.
//!
//! Every write is validated first (by the seed's own rules), then applied in one Redis transaction
//! that also appends its audit entry and publishes the invalidation, so it is either all there or
//! not at all; Redis unreachable (or embedded mode) refuses the write with 503 instead of applying
//! half of it.

pub mod audit;
mod consumers;
pub mod export;
mod keys;

use std::sync::Arc;

use http::StatusCode;
use rustc_hash::FxHashMap;
use serde_json::Value;

use crate::http::App;
use crate::lookup::Invalidation;
use crate::store::{AdminOp, AdminWrite, RedisStore, StoreError};
use audit::AuditEntry;

/// Who made a change: the admin token's name (`admin` for `admin.token`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(pub String);

/// What started a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadTrigger {
    Signal,
    Api,
    FileChange,
}

impl ReloadTrigger {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadTrigger::Signal => "sighup",
            ReloadTrigger::Api => "api",
            ReloadTrigger::FileChange => "file",
        }
    }
}

/// One validation problem of an admin body, by field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    pub field: String,
    pub reason: String,
}

/// Why an admin call failed; [`crate::http::admin::error_answer`] turns it into the answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    BadRequest(String),
    #[error("The request body is too large")]
    TooLarge,
    #[error("{0}")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("{message}")]
    Invalid {
        message: String,
        problems: Vec<FieldProblem>,
    },
    #[error("Redis is unavailable: admin writes need Redis and were not applied")]
    Unavailable,
    #[error("Embedded mode (no Redis): admin writes need Redis")]
    Embedded,
    #[error("Embedded mode (no Redis): the audit trail is only in the log")]
    EmbeddedAudit,
    /// Redis refused the write as a whole (a key of the wrong type): nothing was applied.
    #[error("Redis refused the write, nothing was applied: {0}")]
    Refused(String),
    #[error("{0}")]
    Internal(String),
}

impl AdminError {
    pub fn status(&self) -> StatusCode {
        match self {
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            AdminError::Unavailable | AdminError::Embedded | AdminError::EmbeddedAudit => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AdminError::Refused(_) => StatusCode::CONFLICT,
            AdminError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A Redis failure of an admin call.
    pub fn from_store(error: StoreError) -> AdminError {
        match error {
            StoreError::Unavailable(_) | StoreError::NoScript => AdminError::Unavailable,
            StoreError::Rejected(reason) => AdminError::Refused(reason),
        }
    }
}

/// An answer that is already JSON text (kept as written: see `consumers::consumer_json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawJson(pub String);

/// One admin write: its steps, what it invalidates, and how the audit trail names it.
struct Write {
    action: &'static str,
    target: String,
    ops: Vec<AdminOp>,
    invalidations: Vec<Invalidation>,
}

/// The billing export in the format asked for.
pub enum Export {
    Json(Value),
    Csv(String),
}

pub type Params = FxHashMap<String, String>;

/// The admin operations over the running service.
pub struct Admin {
    pub app: Arc<App>,
    pub store: Option<Arc<RedisStore>>,
    /// `admin.audit_max_entries`.
    pub audit_max_entries: u64,
    /// Admin writes of this replica, one at a time: each reads what it checks and then writes,
    /// and two of them interleaved could both pass a check only one should.
    pub writes: tokio::sync::Mutex<()>,
    /// The seed reloads `POST /admin/reload` asks for (shared with SIGHUP and the file watch).
    pub reloader: Arc<crate::reload::Reloader>,
}

/// Audit entries per page when `limit` is not given, and the most a page may hold.
const AUDIT_PAGE: usize = 100;
const AUDIT_MAX_PAGE: usize = 1000;

impl Admin {
    /// Redis for a write, or why there is none.
    fn store_for_write(&self) -> Result<&Arc<RedisStore>, AdminError> {
        match &self.store {
            None => Err(AdminError::Embedded),
            Some(store) if !store.is_up() => Err(AdminError::Unavailable),
            Some(store) => Ok(store),
        }
    }

    /// Starts an admin write: refused at once without Redis, else this replica's turn (held for
    /// the returned guard's life, so what the write checks is not changed under it from here).
    async fn begin_write(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, AdminError> {
        self.store_for_write()?;
        Ok(self.writes.lock().await)
    }

    /// Redis for a read (`None` in embedded mode: the seed is all there is).
    fn store_for_read(&self) -> Result<Option<&Arc<RedisStore>>, AdminError> {
        match &self.store {
            None => Ok(None),
            Some(store) if !store.is_up() => Err(AdminError::Unavailable),
            Some(store) => Ok(Some(store)),
        }
    }

    /// Applies `write` whole with its audit entry and invalidations, then forgets here at once
    /// what it changed (the other replicas hear it on the channel).
    async fn apply(&self, actor: &Actor, write: Write) -> Result<(), AdminError> {
        let store = self.store_for_write()?;
        let entry = AuditEntry {
            actor: actor.0.clone(),
            action: write.action,
            target: write.target,
            outcome: "ok".into(),
        };
        let stored = AdminWrite {
            ops: write.ops,
            audit: entry.fields(),
            audit_max_entries: self.audit_max_entries,
            invalidations: write
                .invalidations
                .iter()
                .map(Invalidation::message)
                .collect(),
        };
        if let Err(error) = store.admin_write(&stored).await {
            let error = AdminError::from_store(error);
            AuditEntry {
                outcome: format!("error: {error}"),
                ..entry
            }
            .log();
            return Err(error);
        }
        entry.log();
        for target in &write.invalidations {
            self.app.resolver.invalidate(target);
        }
        Ok(())
    }

    /// `GET /admin/audit?since=&limit=`: newest first; `since` is an entry id (newer ones only).
    pub async fn audit(&self, params: &Params) -> Result<Value, AdminError> {
        let limit = match params.get("limit").filter(|l| !l.is_empty()) {
            None => AUDIT_PAGE,
            Some(text) => match text.parse::<usize>() {
                Ok(n) if (1..=AUDIT_MAX_PAGE).contains(&n) => n,
                _ => {
                    return Err(AdminError::BadRequest(format!(
                        "limit must be between 1 and {AUDIT_MAX_PAGE}"
                    )));
                }
            },
        };
        let since = params.get("since").filter(|s| !s.is_empty());
        if let Some(id) = since
            && !is_stream_id(id)
        {
            return Err(AdminError::BadRequest(
                "since must be an audit entry id (`<ms>-<n>`)".into(),
            ));
        }
        let store = match self.store_for_read()? {
            Some(store) => store,
            None => return Err(AdminError::EmbeddedAudit),
        };
        let rows = store
            .read_audit(since.map(String::as_str), limit)
            .await
            .map_err(AdminError::from_store)?;
        let entries: Vec<Value> = rows
            .into_iter()
            .map(|row| {
                let mut entry = serde_json::Map::new();
                entry.insert("id".into(), Value::String(row.id));
                for (k, v) in row.fields {
                    entry.insert(k, Value::String(v));
                }
                Value::Object(entry)
            })
            .collect();
        Ok(serde_json::json!({ "entries": entries }))
    }
}

fn is_stream_id(id: &str) -> bool {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    !ms.is_empty()
        && ms.bytes().all(|b| b.is_ascii_digit())
        && !seq.is_empty()
        && seq.bytes().all(|b| b.is_ascii_digit())
}

impl Admin {
    /// Reloads the seed now and answers with how it went (SPEC §10): 200 with what runs, or 422
    /// with every problem of a seed that was refused (the running one is kept).
    pub async fn reload(&self, actor: &Actor, trigger: ReloadTrigger) -> (StatusCode, Value) {
        use crate::reload::ReloadOutcome;
        use serde_json::json;
        match self.reloader.reload(trigger, &actor.0).await {
            ReloadOutcome::Loaded(seed) => (
                StatusCode::OK,
                json!({
                    "result": "ok",
                    "consumers": seed.consumers,
                    "keys": seed.keys,
                    "entries": seed.entries,
                    "routes": seed.routes,
                    "loaded_at": seed.loaded_at.to_string(),
                }),
            ),
            ReloadOutcome::Invalid(problems) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({
                    "result": "error",
                    "message": "The seed is invalid; the running seed is kept",
                    "problems": problems
                        .iter()
                        .map(|p| json!({
                            "file": p.file,
                            "line": p.line,
                            "field": p.path,
                            "reason": p.reason,
                        }))
                        .collect::<Vec<_>>(),
                }),
            ),
            // Only a file change can find the seed unchanged; this reload always reads it.
            ReloadOutcome::Unchanged => (StatusCode::OK, json!({"result": "unchanged"})),
            ReloadOutcome::Stopped => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"message": "The service is stopping; the seed was not reloaded"}),
            ),
        }
    }
    pub async fn usage_export(&self, params: &Params, csv: bool) -> Result<Export, AdminError> {
        export::usage_export(&self.app, params, csv).await
    }
}
