//! Runtime administration (SPEC §10): consumers and keys as operator records in Redis, the audit
//! trail, the billing export, and the reload entry point the admin API shares with SIGHUP.
//!
//! Every write is validated first (by the seed's own rules), then applied in one Redis transaction
//! that also appends its audit entry and publishes the invalidation, so it is either all there or
//! not at all; Redis unreachable (or embedded mode) refuses the write with 503 instead of applying
//! half of it.

pub mod audit;

use std::sync::Arc;

use http::StatusCode;
use rustc_hash::FxHashMap;
use serde_json::Value;

use crate::http::App;
use crate::store::RedisStore;

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
}

impl AdminError {
    pub fn status(&self) -> StatusCode {
        match self {
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            AdminError::Unavailable | AdminError::Embedded => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
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
    /// The seed reloads `POST /admin/reload` asks for (shared with SIGHUP and the file watch).
    pub reloader: Arc<crate::reload::Reloader>,
}

impl Admin {
    pub async fn list_consumers(&self, _params: &Params) -> Result<Value, AdminError> {
        Err(AdminError::NotFound("Not built yet"))
    }
    pub async fn consumer(&self, _name: &str) -> Result<Value, AdminError> {
        Err(AdminError::NotFound("Not built yet"))
    }
    pub async fn put_consumer(
        &self,
        _actor: &Actor,
        _name: &str,
        _body: &Value,
    ) -> Result<(bool, Value), AdminError> {
        Err(AdminError::NotFound("Not built yet"))
    }
    pub async fn delete_consumer(&self, _actor: &Actor, _name: &str) -> Result<Value, AdminError> {
        Err(AdminError::NotFound("Not built yet"))
    }
    pub async fn create_key(
        &self,
        _actor: &Actor,
        _name: &str,
        _body: &Value,
    ) -> Result<Value, AdminError> {
        Err(AdminError::NotFound("Not built yet"))
    }
    pub async fn rotate_key(
        &self,
        _actor: &Actor,
        _name: &str,
        _id: &str,
        _body: &Value,
    ) -> Result<Value, AdminError> {
        Err(AdminError::NotFound("Not built yet"))
    }
    pub async fn patch_key(
        &self,
        _actor: &Actor,
        _name: &str,
        _id: &str,
        _body: &Value,
    ) -> Result<Value, AdminError> {
        Err(AdminError::NotFound("Not built yet"))
    }
    pub async fn revoke_key(
        &self,
        _actor: &Actor,
        _name: &str,
        _id: &str,
    ) -> Result<Value, AdminError> {
        Err(AdminError::NotFound("Not built yet"))
    }
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
    pub async fn usage_export(&self, _params: &Params, _csv: bool) -> Result<Export, AdminError> {
        Err(AdminError::NotFound("Not built yet"))
    }
    pub async fn audit(&self, _params: &Params) -> Result<Value, AdminError> {
        Err(AdminError::NotFound("Not built yet"))
    }
}
