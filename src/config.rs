//! Service configuration: a TOML file layered with `UMA_` environment variables (SPEC §2).
//!
//! Built-in defaults apply when the default file is missing; an explicitly named file must exist.
//! Unknown keys are errors, so `UMA_REDIS_URL` (one underscore) is reported instead of silently
//! ignored. Semantic checks collect every problem before failing.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use config::builder::DefaultState;
use config::{ConfigError, Source as _, Value, ValueKind};
use serde::Deserialize;

use crate::core::capability::{CapabilityNames, CapabilityRef, DEFAULT_NAMES};
use crate::core::request::ReadRules;
pub use crate::core::request::{EntrySelector, OriginalSource};
use crate::core::routes::{Acl, ConfigRoute};
use crate::core::text::Text;
use crate::problem::Problem;

pub const DEFAULT_CONFIG_PATH: &str = "config/default.toml";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address of the HTTP listener.
    pub listen: String,
    pub redis: RedisSettings,
    pub seed: SeedSettings,
    pub tdl: TdlSettings,
    pub cache: CacheSettings,
    pub server: ServerSettings,
    pub auth: AuthSettings,
    pub limits: LimitsSettings,
    pub usage: UsageSettings,
    pub admin: AdminSettings,
    pub capabilities: CapabilitiesSettings,
    pub log: LogSettings,
    pub routes: Vec<RouteSettings>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// Empty string: no Redis (embedded mode).
    pub url: String,
    pub cache_ttl_secs: u64,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Longest wait for a new connection.
    pub connect_timeout_ms: u64,
    /// Longest wait for any command (including taking a pooled connection); past it Redis is
    /// marked down and skipped until the health check sees it answer.
    pub command_timeout_ms: u64,
    /// How often Redis is checked (PING); an outage or a recovery shows within this plus the timeout.
    pub health_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SeedSettings {
    pub path: PathBuf,
    /// Largest seed file read; a larger one is refused before any byte is read.
    pub max_bytes: u64,
    /// Reload the seed when its file changes (the directory is watched).
    pub watch: bool,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TdlMode {
    Sync,
    Async,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TdlSettings {
    pub timezone: String,
    pub mode: TdlMode,
    pub flush_interval_ms: u64,
    pub retention_days: u32,
    /// Bound on distinct (consumer, entry, day) counters waiting for Redis; increments for new ones
    /// past it are dropped and counted in `uma_tdl_dropped_total`.
    pub max_pending_keys: usize,
    /// Embedded mode: bound on stored (consumer, entry, day) counters; past it the oldest days are
    /// evicted first (`uma_tdl_evicted_total`), so today's counts are never the ones lost.
    pub max_history_keys: usize,
    /// At shutdown, how long the final flush may try.
    pub shutdown_flush_ms: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSettings {
    pub local_ttl_ms: u64,
    /// How long an unknown key is remembered, so a flood of bad keys does not reach Redis.
    pub negative_ttl_ms: u64,
    /// Bound on cached lookups (keys and unknown keys).
    pub max_entries: u64,
    /// How long a cached record may still be served while Redis is unreachable.
    pub stale_ttl_secs: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Worker threads; 0 = one per core.
    pub workers: usize,
    /// A client that has not sent its whole request head by then is disconnected.
    pub header_read_timeout_ms: u64,
    /// A keep-alive or HTTP/2 connection with no request for this long is closed.
    pub idle_timeout_ms: u64,
    /// Open connections past which a new one closes the longest-idle connection (SPEC §2).
    pub max_connections: usize,
    /// On SIGTERM, how long in-flight requests and idle keep-alive connections may take to finish.
    pub shutdown_grace_ms: u64,
}

/// What a replica does with request limits while Redis cannot be asked (SPEC §8.1).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnRedisDown {
    /// Keep enforcing with the count last known plus this replica's own calls since.
    #[default]
    Local,
    /// Calls on entries with limits answer 503.
    Deny,
    /// Limits are not enforced.
    Allow,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSettings {
    pub on_redis_down: OnRedisDown,
}

/// `POST /usage` and the budgets it feeds (SPEC §9).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UsageSettings {
    /// The bearer token `POST /usage` needs; unset (or empty), the endpoint answers 404.
    pub token: Option<String>,
    /// How long a request id is remembered; older records are refused.
    pub dedup_hours: u64,
    /// Largest `POST /usage` body read.
    pub max_body_bytes: u64,
    /// Records kept in memory while Redis cannot take them; past it they are dropped (counted).
    pub max_pending_records: u64,
    /// How often each replica re-reads, from Redis, the totals its budgets are checked against.
    pub budget_refresh_ms: u64,
}

impl Default for UsageSettings {
    fn default() -> Self {
        UsageSettings {
            token: None,
            dedup_hours: 6,
            max_body_bytes: 8 << 20,
            max_pending_records: 1_000_000,
            budget_refresh_ms: 250,
        }
    }
}

/// The admin listener and API (SPEC §10).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// Address of the admin listener; opened only when a token is configured.
    pub listen: String,
    /// The admin bearer token (actor `admin` in the audit trail); at least 32 characters.
    pub token: Option<String>,
    /// A file of tokens, one per line: `TOKEN` (actor `admin`) or `NAME TOKEN`; `#` starts a comment.
    pub token_file: Option<PathBuf>,
    /// Entries the audit stream `uma:audit` keeps (older ones are trimmed).
    pub audit_max_entries: u64,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            listen: "127.0.0.1:8090".into(),
            token: None,
            token_file: None,
            audit_max_entries: 100_000,
        }
    }
}

/// One admin bearer token and the name the audit trail gives whoever presents it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken {
    pub name: String,
    pub token: String,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself: `Loaded` is logged in debug output.
        write!(f, "AdminToken({})", self.name)
    }
}

/// Shortest admin token accepted (SPEC §10).
pub const ADMIN_TOKEN_MIN_CHARS: usize = 32;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    pub original_request: OriginalSource,
    /// The URI decided on when the source set gives none; unset: 400 `Original URI missing`.
    pub default_uri: Option<String>,
    /// Off by default: a client that can send a selector picks its own entry.
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub entry_selectors: Vec<EntrySelector>,
    /// Whether `X-Uma-Route` names the seed route (only for gateways that always set it).
    pub trust_route_header: bool,
    /// When set, `/auth` needs `X-Uma-Gateway: <secret>`.
    pub gateway_secret: Option<String>,
    /// `/auth-body` (SPEC §8.3): the largest body read; a larger one answers 413.
    pub max_body_bytes: u64,
    /// `/auth-body`: a body not complete within this answers 408.
    pub body_timeout_ms: u64,
    /// `/auth-body`: bound on the bytes reserved by the bodies being read at once; past it 503.
    pub max_body_bytes_in_flight: u64,
    /// `/auth-body`: a JSON body without any max-tokens field answers 400.
    pub require_max_tokens: bool,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            original_request: OriginalSource::Auto,
            default_uri: None,
            entry_selectors: Vec::new(),
            trust_route_header: false,
            gateway_secret: None,
            max_body_bytes: 1_048_576,
            body_timeout_ms: 2_000,
            max_body_bytes_in_flight: 67_108_864,
            require_max_tokens: false,
        }
    }
}

/// A list from TOML, or `a,b` from an environment variable (the config crate would need
/// `try_parsing` for lists, which also turns `"0123"` into `123` in every string setting).
fn list_or_comma_separated<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrText {
        List(Vec<String>),
        Text(String),
    }
    let items = match ListOrText::deserialize(deserializer)? {
        ListOrText::List(items) => items,
        ListOrText::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    };
    items
        .into_iter()
        .map(|item| T::deserialize(serde::de::value::StringDeserializer::<D::Error>::new(item)))
        .collect()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `tracing` filter, e.g. `info` or `user_metadata_auth=debug`; `RUST_LOG` overrides it.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

/// A `[[routes]]` table.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RouteSettings {
    pub prefix: String,
    pub metadata_id: Option<String>,
    pub allow_groups: Vec<String>,
    pub deny_groups: Vec<String>,
    /// Capabilities the chosen entry must have: names of `capabilities.names` or indexes.
    pub require_capabilities: Vec<CapabilityRef>,
}

/// `[capabilities]`: what each capability flag of an entry is called (SPEC §8.2).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CapabilitiesSettings {
    pub names: Vec<String>,
}

impl Default for CapabilitiesSettings {
    fn default() -> Self {
        CapabilitiesSettings {
            names: DEFAULT_NAMES.iter().map(|n| n.to_string()).collect(),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: "127.0.0.1:8089".into(),
            redis: RedisSettings::default(),
            seed: SeedSettings::default(),
            tdl: TdlSettings::default(),
            cache: CacheSettings::default(),
            server: ServerSettings::default(),
            auth: AuthSettings::default(),
            limits: LimitsSettings::default(),
            usage: UsageSettings::default(),
            admin: AdminSettings::default(),
            capabilities: CapabilitiesSettings::default(),
            log: LogSettings::default(),
            routes: Vec::new(),
        }
    }
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            url: "redis://127.0.0.1:6379".into(),
            cache_ttl_secs: 3600,
            pool_size: 16,
            connect_timeout_ms: 100,
            command_timeout_ms: 50,
            health_interval_ms: 250,
        }
    }
}

impl Default for SeedSettings {
    fn default() -> Self {
        SeedSettings {
            path: PathBuf::from("config/seed.yaml"),
            max_bytes: 536_870_912,
            watch: true,
        }
    }
}

impl Default for TdlSettings {
    fn default() -> Self {
        TdlSettings {
            timezone: "UTC".into(),
            mode: TdlMode::Async,
            flush_interval_ms: 100,
            retention_days: 35,
            max_pending_keys: 100_000,
            max_history_keys: 1_000_000,
            shutdown_flush_ms: 5_000,
        }
    }
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            local_ttl_ms: 5000,
            negative_ttl_ms: 1000,
            max_entries: 100_000,
            stale_ttl_secs: 86_400,
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            workers: 0,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_connections: 10_000,
            shutdown_grace_ms: 5_000,
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// Settings checked and turned into what the service runs with.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub settings: Settings,
    pub listen: SocketAddr,
    pub timezone: jiff::tz::TimeZone,
    pub routes: Vec<ConfigRoute>,
    /// `capabilities.names`, checked: what route requirements and refusals call each flag.
    pub capability_names: CapabilityNames,
    /// The file the settings came from, when there was one.
    pub source: Option<PathBuf>,
    /// The admin listener's address and tokens; `None` when no token is set (listener closed).
    pub admin: Option<AdminAccess>,
}

/// What the admin listener runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminAccess {
    pub listen: SocketAddr,
    pub tokens: Vec<AdminToken>,
}

/// The range of one numeric setting (SPEC §2). `check`, and so `serve`, refuses a value outside it
/// with the same message, so no later arithmetic, library call or allocation sized by a setting
/// can panic or overflow on a configured value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// Setting path, e.g. `tdl.retention_days`.
    pub path: &'static str,
    pub min: u64,
    pub max: u64,
    /// The maximum in words (`1 hour`) where the number alone is hard to read; may be empty.
    pub max_in_words: &'static str,
}

impl Bound {
    const fn new(path: &'static str, min: u64, max: u64, max_in_words: &'static str) -> Bound {
        Bound {
            path,
            min,
            max,
            max_in_words,
        }
    }

    pub fn contains(&self, value: u64) -> bool {
        (self.min..=self.max).contains(&value)
    }

    /// The one message every out-of-range value gets.
    pub fn message(&self, value: u64) -> String {
        let words = if self.max_in_words.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.max_in_words)
        };
        format!(
            "must be between {} and {}{words}; got {value}",
            self.min, self.max
        )
    }
}

/// The ranges of every numeric setting. Maxima are far above any sensible value and far below
/// what breaks: the reason for each is on its line.
pub mod bounds {
    use super::Bound;

    const HOUR_MS: u64 = 3_600_000;
    const DAY_MS: u64 = 24 * HOUR_MS;
    const YEAR_SECS: u64 = 365 * 86_400;
    const YEAR_MS: u64 = YEAR_SECS * 1000;

    /// `SETEX` refuses 0; a year keeps `EXPIRE` arithmetic small.
    pub const REDIS_CACHE_TTL_SECS: Bound =
        Bound::new("redis.cache_ttl_secs", 1, YEAR_SECS, "1 year");
    /// An empty pool never hands out a connection.
    pub const REDIS_POOL_SIZE: Bound = Bound::new("redis.pool_size", 1, 1024, "");
    pub const REDIS_CONNECT_TIMEOUT_MS: Bound =
        Bound::new("redis.connect_timeout_ms", 1, HOUR_MS, "1 hour");
    /// The sync-mode wait is `2 × this + 10 ms` (service.rs): an hour cannot overflow it.
    pub const REDIS_COMMAND_TIMEOUT_MS: Bound =
        Bound::new("redis.command_timeout_ms", 1, HOUR_MS, "1 hour");
    pub const REDIS_HEALTH_INTERVAL_MS: Bound =
        Bound::new("redis.health_interval_ms", 1, HOUR_MS, "1 hour");
    /// The seed is read into memory whole; 16 GiB is already more than a pod should hold.
    pub const SEED_MAX_BYTES: Bound = Bound::new("seed.max_bytes", 1, 16 << 30, "16 GiB");
    pub const TDL_FLUSH_INTERVAL_MS: Bound =
        Bound::new("tdl.flush_interval_ms", 1, HOUR_MS, "1 hour");
    /// jiff spans hold at most ~7.3 million days; pruning subtracts this many days.
    pub const TDL_RETENTION_DAYS: Bound = Bound::new("tdl.retention_days", 1, 3650, "10 years");
    /// 0 would drop every increment; the maximum bounds the memory of an outage.
    pub const TDL_MAX_PENDING_KEYS: Bound =
        Bound::new("tdl.max_pending_keys", 1, 100_000_000, "100 million");
    pub const TDL_MAX_HISTORY_KEYS: Bound =
        Bound::new("tdl.max_history_keys", 1, 100_000_000, "100 million");
    pub const TDL_SHUTDOWN_FLUSH_MS: Bound =
        Bound::new("tdl.shutdown_flush_ms", 1, HOUR_MS, "1 hour");
    /// 0 = ask Redis on every call. moka refuses a lifetime over 1000 years (fresh + stale).
    pub const CACHE_LOCAL_TTL_MS: Bound = Bound::new("cache.local_ttl_ms", 0, YEAR_MS, "1 year");
    /// 0 = unknown keys are not remembered.
    pub const CACHE_NEGATIVE_TTL_MS: Bound =
        Bound::new("cache.negative_ttl_ms", 0, YEAR_MS, "1 year");
    /// 0 would cache nothing, so nothing could be served while Redis is down.
    pub const CACHE_MAX_ENTRIES: Bound =
        Bound::new("cache.max_entries", 1, 100_000_000, "100 million");
    /// 0 = nothing stale is served during an outage.
    pub const CACHE_STALE_TTL_SECS: Bound =
        Bound::new("cache.stale_ttl_secs", 0, YEAR_SECS, "1 year");
    /// 0 = one per core; each worker is an OS thread (100000 of them abort the process).
    pub const SERVER_WORKERS: Bound = Bound::new("server.workers", 0, 1024, "");
    /// 0 would close every connection whose request head arrives in more than one packet.
    pub const SERVER_HEADER_READ_TIMEOUT_MS: Bound =
        Bound::new("server.header_read_timeout_ms", 1, HOUR_MS, "1 hour");
    pub const SERVER_IDLE_TIMEOUT_MS: Bound =
        Bound::new("server.idle_timeout_ms", 1, DAY_MS, "1 day");
    /// 0 would refuse every connection; a million is beyond usual descriptor limits.
    pub const SERVER_MAX_CONNECTIONS: Bound =
        Bound::new("server.max_connections", 1, 1_000_000, "1 million");
    pub const SERVER_SHUTDOWN_GRACE_MS: Bound =
        Bound::new("server.shutdown_grace_ms", 1, HOUR_MS, "1 hour");
    /// A body is held in memory whole while it is inspected; 1 GiB is far past any prompt.
    pub const AUTH_MAX_BODY_BYTES: Bound = Bound::new("auth.max_body_bytes", 1, 1 << 30, "1 GiB");
    /// A week of request ids is already a large set per busy consumer (README sizes it).
    pub const USAGE_DEDUP_HOURS: Bound = Bound::new("usage.dedup_hours", 1, 168, "1 week");
    /// 1000 Kong log objects with their headers fit well within 256 MiB.
    pub const USAGE_MAX_BODY_BYTES: Bound =
        Bound::new("usage.max_body_bytes", 1024, 256 << 20, "256 MiB");
    pub const USAGE_MAX_PENDING_RECORDS: Bound =
        Bound::new("usage.max_pending_records", 1, 100_000_000, "");
    /// Budgets must be seen within a second on every replica (SPEC §9).
    pub const USAGE_BUDGET_REFRESH_MS: Bound = Bound::new("usage.budget_refresh_ms", 10, 1000, "");
    /// `XADD … MAXLEN ~` needs at least one; ten million entries is a few GB of Redis.
    pub const ADMIN_AUDIT_MAX_ENTRIES: Bound =
        Bound::new("admin.audit_max_entries", 1, 10_000_000, "10 million");
    pub const AUTH_BODY_TIMEOUT_MS: Bound =
        Bound::new("auth.body_timeout_ms", 1, HOUR_MS, "1 hour");
    /// The memory all bodies being read may take together; 16 GiB is more than a pod should hold.
    pub const AUTH_MAX_BODY_BYTES_IN_FLIGHT: Bound =
        Bound::new("auth.max_body_bytes_in_flight", 1, 16 << 30, "16 GiB");

    /// Every numeric setting, in config/default.toml order (README's range table lists them all).
    pub const ALL: [Bound; 28] = [
        REDIS_CACHE_TTL_SECS,
        REDIS_POOL_SIZE,
        REDIS_CONNECT_TIMEOUT_MS,
        REDIS_COMMAND_TIMEOUT_MS,
        REDIS_HEALTH_INTERVAL_MS,
        SEED_MAX_BYTES,
        TDL_FLUSH_INTERVAL_MS,
        TDL_RETENTION_DAYS,
        TDL_MAX_PENDING_KEYS,
        TDL_MAX_HISTORY_KEYS,
        TDL_SHUTDOWN_FLUSH_MS,
        CACHE_LOCAL_TTL_MS,
        CACHE_NEGATIVE_TTL_MS,
        CACHE_MAX_ENTRIES,
        CACHE_STALE_TTL_SECS,
        SERVER_WORKERS,
        SERVER_HEADER_READ_TIMEOUT_MS,
        SERVER_IDLE_TIMEOUT_MS,
        SERVER_MAX_CONNECTIONS,
        SERVER_SHUTDOWN_GRACE_MS,
        AUTH_MAX_BODY_BYTES,
        AUTH_BODY_TIMEOUT_MS,
        AUTH_MAX_BODY_BYTES_IN_FLIGHT,
        USAGE_DEDUP_HOURS,
        USAGE_MAX_BODY_BYTES,
        USAGE_MAX_PENDING_RECORDS,
        USAGE_BUDGET_REFRESH_MS,
        ADMIN_AUDIT_MAX_ENTRIES,
    ];
}

/// How a problem names a value that came from the environment.
fn variable_label(name: &str) -> String {
    format!("environment variable {name}")
}

/// The setting a `UMA_` variable sets, as the config crate reads it: `UMA_REDIS__URL` → `redis.url`.
fn setting_path(name: &str) -> String {
    let lower = name.to_lowercase();
    lower.get(4..).unwrap_or_default().replace("__", ".")
}

/// Variables that kubelet injects for a Service named `uma` while `enableServiceLinks` is on (the
/// default): `UMA_SERVICE_HOST`, `UMA_SERVICE_PORT[_<PORT NAME>]`, `UMA_PORT` and
/// `UMA_PORT_<N>_<PROTO>[_PROTO|_PORT|_ADDR]`. No setting is named `port` or `service_*`, so none of
/// these can be a misspelled setting; refusing them would crash-loop the pod (review D4).
fn is_service_link(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    let rest = upper.strip_prefix("UMA_").unwrap_or(&upper);
    rest == "PORT"
        || rest.starts_with("PORT_")
        || rest == "SERVICE_HOST"
        || rest.starts_with("SERVICE_PORT")
}

/// The `UMA_` variables that are settings, by name (sorted, so problems come in a stable order),
/// from `env` or the process environment; a value that is not UTF-8 is a problem.
fn setting_variables(
    env: Option<HashMap<String, String>>,
) -> (BTreeMap<String, String>, Vec<Problem>) {
    let all: Vec<(OsString, OsString)> = match env {
        Some(map) => map.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
        None => std::env::vars_os().collect(),
    };
    let mut variables = BTreeMap::new();
    let mut problems = Vec::new();
    for (name, value) in all {
        // The config crate matches the prefix case-insensitively and skips non-UTF-8 names.
        let Some(name) = name.to_str() else { continue };
        if !name.to_ascii_uppercase().starts_with("UMA_") || is_service_link(name) {
            continue;
        }
        match value.into_string() {
            Ok(value) => {
                variables.insert(name.to_owned(), value);
            }
            Err(_) => problems.push(Problem {
                file: variable_label(name),
                line: None,
                path: setting_path(name),
                reason: "the value is not valid UTF-8".into(),
            }),
        }
    }
    (variables, problems)
}

fn environment(variables: &BTreeMap<String, String>) -> config::Environment {
    config::Environment::with_prefix("UMA")
        .prefix_separator("_")
        .separator("__")
        .source(Some(variables.clone().into_iter().collect()))
}

fn toml_file(path: &Path) -> config::File<config::FileSourceFile, config::FileFormat> {
    config::File::from(path).format(config::FileFormat::Toml)
}

fn deserialize(builder: config::ConfigBuilder<DefaultState>) -> Result<Settings, ConfigError> {
    builder.build().and_then(config::Config::try_deserialize)
}

/// The reason of a config crate error without its " for key `…` in <origin>" tail: problems name
/// the key and the origin themselves.
fn reason_of(error: &ConfigError) -> String {
    match error {
        ConfigError::Type {
            unexpected,
            expected,
            ..
        } => format!("invalid type: {unexpected}, expected {expected}"),
        ConfigError::At { error, .. } => reason_of(error),
        ConfigError::FileParse { cause, .. } => cause.to_string(),
        other => other.to_string(),
    }
}

/// The key a config crate error names, when it names one.
fn key_of(error: &ConfigError) -> Option<String> {
    match error {
        ConfigError::Type { key, .. } | ConfigError::At { key, .. } => key.clone(),
        _ => None,
    }
}

/// The more precise of the setting tried (`redis.bogus`) and the key the error names: an unknown
/// field is reported at its table (`redis`), an error inside an array deeper (`routes[0]`).
fn problem_path(tried: String, error: &ConfigError) -> String {
    match key_of(error) {
        Some(key) if key.starts_with(&tried) => key,
        _ => tried,
    }
}

/// A TOML syntax error (`TOML parse error at line 3, column 7` + a source snippet + the message)
/// as one problem line: the line number goes to `line`, the snippet is left out.
fn syntax_problem(label: &str, text: &str) -> Problem {
    let mut lines = text.lines();
    let head = lines.next().unwrap_or_default();
    let position = head.rsplit_once(" at line ").and_then(|(_, at)| {
        let (line, column) = at.split_once(", column ")?;
        Some((line.trim().parse::<u64>().ok()?, column.trim().to_owned()))
    });
    // Snippet lines are a gutter (a line number or blanks) and `|`.
    let message: Vec<&str> = lines
        .filter(|l| {
            let rest = l.trim_start_matches(|c: char| c.is_ascii_digit() || c == ' ');
            !rest.is_empty() && !rest.starts_with('|')
        })
        .collect();
    let (line, reason) = match position {
        Some((line, column)) => (
            Some(line),
            format!(
                "TOML syntax error at column {column}: {}",
                message.join("; ")
            ),
        ),
        None => (None, text.replace('\n', "; ")),
    };
    Problem {
        file: label.to_owned(),
        line,
        path: String::new(),
        reason,
    }
}

/// Each setting of a table (nested tables opened up; arrays, `[[routes]]` included, kept whole),
/// sorted by path.
fn leaves(table: config::Map<String, Value>) -> Vec<(String, Value)> {
    fn walk(prefix: &str, table: config::Map<String, Value>, out: &mut Vec<(String, Value)>) {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key
            } else {
                format!("{prefix}.{key}")
            };
            match &value.kind {
                ValueKind::Table(inner) if !inner.is_empty() => walk(&path, inner.clone(), out),
                _ => out.push((path, value)),
            }
        }
    }
    let mut out = Vec::new();
    walk("", table, &mut out);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Problems of the configuration file alone. When it does not deserialize, each of its settings is
/// tried alone over the defaults, so every bad key is reported at once, not only the first one.
fn file_problems(path: &Path, label: &str) -> Vec<Problem> {
    let problem = |key: String, error: &ConfigError| Problem {
        file: label.to_owned(),
        line: None,
        path: problem_path(key, error),
        reason: reason_of(error),
    };
    let config = match config::Config::builder()
        .add_source(toml_file(path))
        .build()
    {
        Ok(config) => config,
        Err(ConfigError::FileParse { cause, .. }) => {
            return vec![syntax_problem(label, &cause.to_string())];
        }
        Err(error) => return vec![problem(String::new(), &error)],
    };
    let whole = match config.clone().try_deserialize::<Settings>() {
        Ok(_) => return Vec::new(),
        Err(error) => error,
    };
    let settings = config.collect().map(leaves).unwrap_or_default();
    let mut problems: Vec<Problem> = Vec::new();
    for (key, value) in settings {
        let alone = config::Config::builder()
            .set_override(key.as_str(), value)
            .and_then(deserialize);
        if let Err(error) = alone {
            let found = problem(key, &error);
            if !problems.contains(&found) {
                problems.push(found);
            }
        }
    }
    if problems.is_empty() {
        problems.push(problem(String::new(), &whole));
    }
    problems
}

/// Problems of the `UMA_` variables: each one tried alone over the defaults, so every bad
/// variable is reported under its own name.
fn variable_problems(variables: &BTreeMap<String, String>) -> Vec<Problem> {
    let together = deserialize(config::Config::builder().add_source(environment(variables)));
    let Err(together) = together else {
        return Vec::new();
    };
    let mut problems = Vec::new();
    for (name, value) in variables {
        let one = BTreeMap::from([(name.clone(), value.clone())]);
        if let Err(error) = deserialize(config::Config::builder().add_source(environment(&one))) {
            problems.push(Problem {
                file: variable_label(name),
                line: None,
                path: problem_path(setting_path(name), &error),
                reason: reason_of(&error),
            });
        }
    }
    if problems.is_empty() {
        problems.push(Problem {
            file: "the environment".into(),
            line: None,
            path: key_of(&together).unwrap_or_default(),
            reason: reason_of(&together),
        });
    }
    problems
}

/// Where the values came from, so a problem names the file or the variable that set the value.
struct Origins {
    /// The configuration file as given (also when it is missing and the defaults apply).
    file: String,
    /// Setting path (`redis.pool_size`) → the `UMA_` variable that set it.
    variables: HashMap<String, String>,
}

impl Origins {
    fn of(&self, path: &str) -> String {
        match self.variables.get(path) {
            Some(name) => variable_label(name),
            None => self.file.clone(),
        }
    }
}

/// The configuration file to read, and whether it exists (the default one may be missing).
fn config_file(explicit: Option<&Path>) -> Result<(PathBuf, bool), Vec<Problem>> {
    let (path, required) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    let problem = |reason: String| {
        vec![Problem {
            file: path.display().to_string(),
            line: None,
            path: String::new(),
            reason,
        }]
    };
    // A FIFO or a device would make the read below hang or never end.
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_file() => Ok((path, true)),
        Ok(meta) => Err(problem(format!(
            "not a regular file ({})",
            crate::seed::file_type_name(meta.file_type())
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok((path, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(problem("the configuration file does not exist".into()))
        }
        Err(e) => Err(problem(format!("cannot read the configuration file: {e}"))),
    }
}

impl Settings {
    /// Loads `explicit` (must exist) or the default file (may be missing), then `UMA_` variables from
    /// `env` (the process environment when `None`). Kubernetes service links are ignored. Problems
    /// name the file or the variable the value came from, and all of them are reported at once.
    pub fn load(
        explicit: Option<&Path>,
        env: Option<HashMap<String, String>>,
    ) -> Result<Loaded, Vec<Problem>> {
        let (path, exists) = config_file(explicit)?;
        let label = path.display().to_string();
        let (variables, mut problems) = setting_variables(env);
        if exists {
            problems.extend(file_problems(&path, &label));
        }
        problems.extend(variable_problems(&variables));
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut builder = config::Config::builder();
        if exists {
            builder = builder.add_source(toml_file(&path));
        }
        // Each source deserialized on its own, so a failure here comes from their combination.
        let settings = deserialize(builder.add_source(environment(&variables))).map_err(|e| {
            vec![Problem {
                file: format!("{label} with the environment"),
                line: None,
                path: key_of(&e).unwrap_or_default(),
                reason: reason_of(&e),
            }]
        })?;
        let origins = Origins {
            file: label,
            variables: variables
                .into_keys()
                .map(|name| (setting_path(&name), name))
                .collect(),
        };
        settings.check(&origins, exists.then_some(path))
    }

    /// Semantic checks of every section; every problem is collected before failing.
    fn check(mut self, origins: &Origins, source: Option<PathBuf>) -> Result<Loaded, Vec<Problem>> {
        // An empty value (e.g. `UMA_AUTH__GATEWAY_SECRET=` in a manifest) means "not set".
        self.auth.gateway_secret = self.auth.gateway_secret.filter(|s| !s.is_empty());
        self.auth.default_uri = self.auth.default_uri.filter(|s| !s.is_empty());
        self.usage.token = self.usage.token.filter(|s| !s.is_empty());
        self.admin.token = self.admin.token.filter(|s| !s.is_empty());
        self.admin.token_file = self.admin.token_file.filter(|p| !p.as_os_str().is_empty());
        let mut checker = Checker {
            origins,
            problems: Vec::new(),
        };
        let listen = checker.listen(&self.listen);
        check_redis(&mut checker, &self.redis);
        check_seed(&mut checker, &self.seed);
        let timezone = check_tdl(&mut checker, &self.tdl);
        check_cache(&mut checker, &self.cache);
        check_server(&mut checker, &self.server);
        check_auth(&mut checker, &self.auth);
        check_usage(&mut checker, &self.usage);
        let admin = check_admin(&mut checker, &self.admin);
        check_log(&mut checker, &self.log);
        let capability_names = check_capabilities(&mut checker, &self.capabilities);
        let routes = check_routes(&mut checker, &self.routes, &capability_names);
        match (listen, timezone) {
            (Some(listen), Some(timezone)) if checker.problems.is_empty() => Ok(Loaded {
                settings: self,
                listen,
                timezone,
                routes,
                capability_names,
                source,
                admin,
            }),
            _ => Err(checker.problems),
        }
    }
}

/// Collects semantic problems, each naming where its value came from.
struct Checker<'a> {
    origins: &'a Origins,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn report(&mut self, path: &str, reason: String) {
        self.problems.push(Problem {
            file: self.origins.of(path),
            line: None,
            path: path.to_owned(),
            reason,
        });
    }

    fn range(&mut self, bound: Bound, value: impl TryInto<u64>) {
        // Only a usize wider than 64 bits could fail to convert: out of every range.
        let value = value.try_into().unwrap_or(u64::MAX);
        if !bound.contains(value) {
            self.report(bound.path, bound.message(value));
        }
    }

    fn listen(&mut self, listen: &str) -> Option<SocketAddr> {
        match listen.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(e) => {
                self.report(
                    "listen",
                    format!("`{}` is not an address:port ({e})", listen.escape_debug()),
                );
                None
            }
        }
    }
}

fn check_redis(c: &mut Checker, redis: &RedisSettings) {
    let url = redis.url.trim();
    if !url.is_empty()
        && let Err(e) = redis::IntoConnectionInfo::into_connection_info(url)
    {
        c.report("redis.url", format!("not a Redis URL ({e})"));
    }
    c.range(bounds::REDIS_CACHE_TTL_SECS, redis.cache_ttl_secs);
    c.range(bounds::REDIS_POOL_SIZE, redis.pool_size);
    c.range(bounds::REDIS_CONNECT_TIMEOUT_MS, redis.connect_timeout_ms);
    c.range(bounds::REDIS_COMMAND_TIMEOUT_MS, redis.command_timeout_ms);
    c.range(bounds::REDIS_HEALTH_INTERVAL_MS, redis.health_interval_ms);
}

fn check_seed(c: &mut Checker, seed: &SeedSettings) {
    if seed.path.as_os_str().is_empty() {
        c.report("seed.path", "must name the seed file".into());
    }
    c.range(bounds::SEED_MAX_BYTES, seed.max_bytes);
}

fn check_tdl(c: &mut Checker, tdl: &TdlSettings) -> Option<jiff::tz::TimeZone> {
    let timezone = jiff::tz::TimeZone::get(&tdl.timezone).ok();
    if timezone.is_none() {
        c.report(
            "tdl.timezone",
            format!(
                "`{}` is not a known IANA time zone",
                tdl.timezone.escape_debug()
            ),
        );
    }
    c.range(bounds::TDL_FLUSH_INTERVAL_MS, tdl.flush_interval_ms);
    c.range(bounds::TDL_RETENTION_DAYS, tdl.retention_days);
    c.range(bounds::TDL_MAX_PENDING_KEYS, tdl.max_pending_keys);
    c.range(bounds::TDL_MAX_HISTORY_KEYS, tdl.max_history_keys);
    c.range(bounds::TDL_SHUTDOWN_FLUSH_MS, tdl.shutdown_flush_ms);
    timezone
}

fn check_cache(c: &mut Checker, cache: &CacheSettings) {
    c.range(bounds::CACHE_LOCAL_TTL_MS, cache.local_ttl_ms);
    c.range(bounds::CACHE_NEGATIVE_TTL_MS, cache.negative_ttl_ms);
    c.range(bounds::CACHE_MAX_ENTRIES, cache.max_entries);
    c.range(bounds::CACHE_STALE_TTL_SECS, cache.stale_ttl_secs);
}

fn check_server(c: &mut Checker, server: &ServerSettings) {
    c.range(bounds::SERVER_WORKERS, server.workers);
    c.range(
        bounds::SERVER_HEADER_READ_TIMEOUT_MS,
        server.header_read_timeout_ms,
    );
    c.range(bounds::SERVER_IDLE_TIMEOUT_MS, server.idle_timeout_ms);
    c.range(bounds::SERVER_MAX_CONNECTIONS, server.max_connections);
    c.range(bounds::SERVER_SHUTDOWN_GRACE_MS, server.shutdown_grace_ms);
}

fn check_auth(c: &mut Checker, auth: &AuthSettings) {
    check_body_limits(c, auth);
    if let Some(uri) = &auth.default_uri
        && !(uri.starts_with('/') && uri.bytes().all(|b| b.is_ascii_graphic()))
    {
        c.report(
            "auth.default_uri",
            format!(
                "`{}` must start with `/` and be visible ASCII without spaces",
                uri.escape_debug()
            ),
        );
    }
    // Compared with a header value, which cannot hold control bytes and loses surrounding
    // spaces: such a secret would refuse every gateway. The secret itself is never printed.
    if let Some(secret) = &auth.gateway_secret
        && (!secret.bytes().all(|b| (0x20..0x7f).contains(&b))
            || secret.starts_with(' ')
            || secret.ends_with(' '))
    {
        c.report(
            "auth.gateway_secret",
            "must be printable ASCII without leading or trailing spaces".into(),
        );
    }
}

fn check_usage(c: &mut Checker, usage: &UsageSettings) {
    c.range(bounds::USAGE_DEDUP_HOURS, usage.dedup_hours);
    c.range(bounds::USAGE_MAX_BODY_BYTES, usage.max_body_bytes);
    c.range(bounds::USAGE_MAX_PENDING_RECORDS, usage.max_pending_records);
    c.range(bounds::USAGE_BUDGET_REFRESH_MS, usage.budget_refresh_ms);
    // Compared with an `Authorization` header value; never printed.
    if let Some(token) = &usage.token
        && !token.bytes().all(|b| b.is_ascii_graphic())
    {
        c.report("usage.token", "must be visible ASCII without spaces".into());
    }
}

/// `/auth-body`'s bounds (SPEC §8.3). `max_body_bytes` above the in-flight budget is allowed: a
/// reservation is capped at the budget, so one body at a time still fits.
fn check_admin(c: &mut Checker, admin: &AdminSettings) -> Option<AdminAccess> {
    c.range(bounds::ADMIN_AUDIT_MAX_ENTRIES, admin.audit_max_entries);
    let mut tokens = Vec::new();
    if let Some(token) = &admin.token {
        tokens.push(AdminToken {
            name: "admin".into(),
            token: token.clone(),
        });
    }
    if let Some(path) = &admin.token_file {
        match read_admin_tokens(path) {
            Ok(more) => tokens.extend(more),
            // A file that is not there holds no token, so the admin API stays closed: Kubernetes
            // mounts an optional Secret that does not exist as an empty directory, and the pod
            // must start without it (deploy/kubernetes/). A file that is there must be valid.
            Err(_) if is_missing(path) => {}
            Err(reason) => c.report("admin.token_file", reason),
        }
    }
    for t in &tokens {
        let field = if admin.token.as_deref() == Some(t.token.as_str()) && t.name == "admin" {
            "admin.token"
        } else {
            "admin.token_file"
        };
        if t.token.chars().count() < ADMIN_TOKEN_MIN_CHARS {
            c.report(
                field,
                format!(
                    "a token must have at least {ADMIN_TOKEN_MIN_CHARS} characters (token `{}`)",
                    t.name
                ),
            );
        } else if !t.token.bytes().all(|b| b.is_ascii_graphic()) {
            c.report(
                field,
                format!("token `{}` must be visible ASCII without spaces", t.name),
            );
        }
    }
    let listen = match admin.listen.parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(e) => {
            c.report(
                "admin.listen",
                format!(
                    "`{}` is not an address:port ({e})",
                    admin.listen.escape_debug()
                ),
            );
            None
        }
    };
    if tokens.is_empty() {
        return None;
    }
    Some(AdminAccess {
        listen: listen?,
        tokens,
    })
}

/// Whether nothing is at `path` (a dangling symlink included: a Secret's `..data` link that points
/// nowhere yet).
fn is_missing(path: &Path) -> bool {
    matches!(std::fs::metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}

/// `admin.token_file`: one token per line, `TOKEN` (named `admin`) or `NAME TOKEN`; blank lines
/// and `#` comments skipped. The reason never quotes a line (it may hold a token).
pub fn read_admin_tokens(path: &Path) -> Result<Vec<AdminToken>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let mut tokens = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let (name, token) = match (words.next(), words.next(), words.next()) {
            (Some(token), None, None) => ("admin", token),
            (Some(name), Some(token), None) => (name, token),
            _ => {
                return Err(format!("line {}: expected `TOKEN` or `NAME TOKEN`", n + 1));
            }
        };
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
        {
            return Err(format!(
                "line {}: a token name may hold letters, digits and `-_.@`",
                n + 1
            ));
        }
        tokens.push(AdminToken {
            name: name.to_owned(),
            token: token.to_owned(),
        });
    }
    if tokens.is_empty() {
        return Err(format!("`{}` holds no token", path.display()));
    }
    Ok(tokens)
}

fn check_body_limits(c: &mut Checker, auth: &AuthSettings) {
    c.range(bounds::AUTH_MAX_BODY_BYTES, auth.max_body_bytes);
    c.range(bounds::AUTH_BODY_TIMEOUT_MS, auth.body_timeout_ms);
    c.range(
        bounds::AUTH_MAX_BODY_BYTES_IN_FLIGHT,
        auth.max_body_bytes_in_flight,
    );
}

fn check_log(c: &mut Checker, log: &LogSettings) {
    if !matches!(log.format.as_str(), "text" | "json") {
        c.report(
            "log.format",
            format!("`{}` must be `text` or `json`", log.format.escape_debug()),
        );
    }
}

/// Names must be visible ASCII and distinct: a route names a capability by them.
fn check_capabilities(c: &mut Checker, capabilities: &CapabilitiesSettings) -> CapabilityNames {
    for (i, name) in capabilities.names.iter().enumerate() {
        let path = format!("capabilities.names[{i}]");
        let checked = if name.is_empty() {
            Err("must not be empty")
        } else {
            Text::Visible.check(name)
        };
        if let Err(reason) = checked {
            c.report(&path, reason.into());
        } else if capabilities.names[..i].contains(name) {
            c.report(&path, format!("duplicate name `{name}`"));
        }
    }
    CapabilityNames::new(capabilities.names.clone())
}

fn check_routes(
    c: &mut Checker,
    routes: &[RouteSettings],
    names: &CapabilityNames,
) -> Vec<ConfigRoute> {
    routes
        .iter()
        .enumerate()
        .map(|(i, route)| check_route(c, &format!("routes[{i}]"), route, names))
        .collect()
}

fn check_route(
    c: &mut Checker,
    path: &str,
    route: &RouteSettings,
    names: &CapabilityNames,
) -> ConfigRoute {
    let mut require_capabilities = Vec::new();
    for (j, reference) in route.require_capabilities.iter().enumerate() {
        match names.resolve(reference) {
            Ok(index) => require_capabilities.push(index),
            Err(reason) => c.report(&format!("{path}.require_capabilities[{j}]"), reason),
        }
    }
    if !route.prefix.starts_with('/') {
        c.report(
            &format!("{path}.prefix"),
            format!("`{}` must start with `/`", route.prefix.escape_debug()),
        );
    }
    // An empty pin counts as none, as an empty `metadata_id` does in a request.
    if let Some(id) = route.metadata_id.as_deref().filter(|id| !id.is_empty())
        && let Err(reason) = Text::Visible.check(id)
    {
        c.report(&format!("{path}.metadata_id"), reason.into());
    }
    for (field, groups) in [
        ("allow_groups", &route.allow_groups),
        ("deny_groups", &route.deny_groups),
    ] {
        for (j, group) in groups.iter().enumerate() {
            let checked = if group.is_empty() {
                Err("must not be empty")
            } else {
                Text::Group.check(group)
            };
            if let Err(reason) = checked {
                c.report(&format!("{path}.{field}[{j}]"), reason.into());
            }
        }
    }
    ConfigRoute {
        prefix: route.prefix.clone(),
        metadata_id: route.metadata_id.clone().filter(|id| !id.is_empty()),
        acl: Acl {
            allow: route.allow_groups.clone(),
            deny: route.deny_groups.clone(),
        },
        require_capabilities,
    }
}

impl Loaded {
    pub fn redis_configured(&self) -> bool {
        !self.settings.redis.url.trim().is_empty()
    }

    /// How `/auth` requests are read (SPEC §4), from `[auth]`.
    pub fn read_rules(&self) -> ReadRules {
        let auth = &self.settings.auth;
        ReadRules {
            source: auth.original_request,
            default_uri: auth.default_uri.clone().filter(|u| !u.is_empty()),
            query_selector: auth.entry_selectors.contains(&EntrySelector::Query),
            header_selector: auth.entry_selectors.contains(&EntrySelector::Header),
            trust_route_header: auth.trust_route_header,
        }
    }

    /// `auth.gateway_secret`, when set to something.
    pub fn gateway_secret(&self) -> Option<&str> {
        self.settings
            .auth
            .gateway_secret
            .as_deref()
            .filter(|s| !s.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn defaults_match_the_spec() {
        let s = Settings::default();
        assert_eq!(s.listen, "127.0.0.1:8089");
        assert_eq!(s.redis.url, "redis://127.0.0.1:6379");
        assert_eq!(s.redis.cache_ttl_secs, 3600);
        assert_eq!(s.seed.path, PathBuf::from("config/seed.yaml"));
        assert_eq!(s.tdl.timezone, "UTC");
        assert_eq!(s.tdl.mode, TdlMode::Async);
        assert_eq!(s.tdl.flush_interval_ms, 100);
        assert_eq!(s.cache.local_ttl_ms, 5000);
    }

    #[test]
    fn environment_overrides_file() {
        let (_dir, path) = write("listen = \"127.0.0.1:9000\"\n[tdl]\ntimezone = \"Asia/Seoul\"\n");
        let loaded = Settings::load(
            Some(&path),
            env(&[
                ("UMA_REDIS__URL", ""),
                ("UMA_LISTEN", "127.0.0.1:9100"),
                ("UMA_TDL__MODE", "sync"),
                ("UMA_CACHE__LOCAL_TTL_MS", "250"),
            ]),
        )
        .unwrap();
        assert_eq!(loaded.listen.port(), 9100);
        assert_eq!(loaded.settings.tdl.timezone, "Asia/Seoul");
        assert_eq!(loaded.settings.tdl.mode, TdlMode::Sync);
        assert_eq!(loaded.settings.cache.local_ttl_ms, 250);
        assert!(!loaded.redis_configured());
    }

    #[test]
    fn routes_tables() {
        let (_dir, path) = write(
            "[[routes]]\nprefix = \"/gpt4o/\"\nmetadata_id = \"azure-gpt4o\"\nallow_groups = [\"a\"]\n",
        );
        let loaded = Settings::load(Some(&path), env(&[])).unwrap();
        assert_eq!(loaded.routes[0].metadata_id.as_deref(), Some("azure-gpt4o"));
        assert_eq!(loaded.routes[0].acl.allow, ["a"]);
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = Settings::load(Some(Path::new("/nonexistent/uma.toml")), env(&[])).unwrap_err();
        assert!(err[0].reason.contains("does not exist"), "{err:?}");
    }

    #[test]
    fn every_semantic_problem_is_reported() {
        let (_dir, path) = write(
            "listen = \"nowhere\"\n[tdl]\ntimezone = \"Mars/Base\"\n[[routes]]\nprefix = \"gpt\"\nallow_groups = [\"a,b\"]\n",
        );
        let err = Settings::load(Some(&path), env(&[])).unwrap_err();
        let paths: Vec<&str> = err.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "listen",
                "tdl.timezone",
                "routes[0].prefix",
                "routes[0].allow_groups[0]"
            ]
        );
    }

    #[test]
    fn redis_settings_are_checked() {
        let err = Settings::load(
            None,
            env(&[
                ("UMA_REDIS__URL", "http://nope"),
                ("UMA_REDIS__POOL_SIZE", "0"),
            ]),
        )
        .unwrap_err();
        let paths: Vec<&str> = err.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["redis.url", "redis.pool_size"]);
    }

    #[test]
    fn auth_settings_from_file_and_environment() {
        let (_dir, path) =
            write("[auth]\noriginal_request = \"original\"\nentry_selectors = [\"header\"]\n");
        let loaded = Settings::load(Some(&path), env(&[])).unwrap();
        assert_eq!(
            loaded.settings.auth.original_request,
            OriginalSource::Original
        );
        assert_eq!(
            loaded.settings.auth.entry_selectors,
            [EntrySelector::Header]
        );
        let loaded = Settings::load(
            None,
            env(&[
                ("UMA_AUTH__ENTRY_SELECTORS", "query, header"),
                ("UMA_AUTH__GATEWAY_SECRET", "0123"),
            ]),
        )
        .unwrap();
        assert_eq!(
            loaded.settings.auth.entry_selectors,
            [EntrySelector::Query, EntrySelector::Header]
        );
        assert_eq!(loaded.settings.auth.gateway_secret.as_deref(), Some("0123"));
        assert!(Settings::load(None, env(&[("UMA_AUTH__ENTRY_SELECTORS", "cookie")])).is_err());
    }

    #[test]
    fn misspelled_keys_are_refused() {
        let err = Settings::load(None, env(&[("UMA_REDIS_URL", "redis://x")])).unwrap_err();
        assert!(err[0].reason.contains("redis_url"), "{err:?}");
        let (_dir, path) = write("[tdl]\nmode = \"sometimes\"\n");
        assert!(Settings::load(Some(&path), env(&[])).is_err());
    }

    /// The variable that sets a setting path: `tdl.retention_days` → `UMA_TDL__RETENTION_DAYS`.
    fn variable(path: &str) -> String {
        format!("UMA_{}", path.replace('.', "__").to_ascii_uppercase())
    }

    /// Loads an empty config file with `pairs` as the environment.
    fn load_env(pairs: &[(&str, &str)]) -> Result<Loaded, Vec<Problem>> {
        let (_dir, path) = write("");
        Settings::load(Some(&path), env(pairs))
    }

    fn assert_refused(bound: Bound, value: &str, reason: &str) {
        let name = variable(bound.path);
        let err = load_env(&[(&name, value)]).expect_err(&format!("{name}={value} accepted"));
        assert_eq!(err.len(), 1, "{err:?}");
        assert_eq!(err[0].file, format!("environment variable {name}"));
        assert_eq!(err[0].path, bound.path);
        assert!(err[0].reason.contains(reason), "{name}={value}: {err:?}");
    }

    #[test]
    fn every_numeric_setting_has_its_bounds_enforced() {
        for bound in bounds::ALL {
            let name = variable(bound.path);
            for ok in [bound.min, bound.max] {
                let loaded = load_env(&[(&name, &ok.to_string())]);
                assert!(loaded.is_ok(), "{name}={ok}: {:?}", loaded.err());
            }
            let above = bound.max + 1;
            assert_refused(bound, &above.to_string(), &bound.message(above));
            match bound.min.checked_sub(1) {
                Some(below) => assert_refused(bound, &below.to_string(), &bound.message(below)),
                // No unsigned setting takes a negative number.
                None => assert_refused(bound, "-1", "invalid"),
            }
        }
    }

    #[test]
    fn the_range_message_names_the_range_and_the_value() {
        let err = load_env(&[("UMA_TDL__RETENTION_DAYS", "100000000")]).unwrap_err();
        assert_eq!(
            err[0].to_string(),
            "environment variable UMA_TDL__RETENTION_DAYS: tdl.retention_days: \
             must be between 1 and 3650 (10 years); got 100000000"
        );
    }

    #[test]
    fn an_out_of_range_value_in_the_file_names_the_file() {
        let (_dir, path) = write("[server]\nworkers = 100000\nheader_read_timeout_ms = 0\n");
        let err = Settings::load(Some(&path), env(&[])).unwrap_err();
        let label = path.display().to_string();
        let found: Vec<(&str, &str)> = err
            .iter()
            .map(|p| (p.file.as_str(), p.path.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                (label.as_str(), "server.workers"),
                (label.as_str(), "server.header_read_timeout_ms")
            ]
        );
        // The environment wins, and then the problem is the variable's.
        let err = Settings::load(
            Some(&path),
            env(&[
                ("UMA_SERVER__WORKERS", "2000"),
                ("UMA_SERVER__HEADER_READ_TIMEOUT_MS", "1"),
            ]),
        )
        .unwrap_err();
        assert_eq!(err.len(), 1, "{err:?}");
        assert_eq!(err[0].file, "environment variable UMA_SERVER__WORKERS");
    }

    /// The leaves of config/default.toml that are integers: every one must have a bound.
    #[test]
    fn every_integer_of_the_default_file_has_a_bound() {
        let config = config::Config::builder()
            .add_source(toml_file(Path::new(DEFAULT_CONFIG_PATH)))
            .build()
            .unwrap();
        let settings = leaves(config.collect().unwrap());
        let integers: std::collections::BTreeSet<String> = settings
            .into_iter()
            .filter(|(_, v)| matches!(v.kind, ValueKind::I64(_) | ValueKind::U64(_)))
            .map(|(k, _)| k)
            .collect();
        let bounded: std::collections::BTreeSet<String> =
            bounds::ALL.iter().map(|b| b.path.to_owned()).collect();
        assert_eq!(integers, bounded);
        for bound in bounds::ALL {
            let default = config.get::<u64>(bound.path).unwrap();
            assert!(bound.contains(default), "{}: default {default}", bound.path);
        }
    }

    /// The maxima against the code that panicked or overflowed with larger values (review D9).
    #[test]
    fn the_maxima_stay_clear_of_known_panics() {
        // moka refuses a time to live over 1000 years: the real cache builder, both maxima.
        let cache = CacheSettings {
            local_ttl_ms: bounds::CACHE_LOCAL_TTL_MS.max,
            negative_ttl_ms: bounds::CACHE_NEGATIVE_TTL_MS.max,
            max_entries: bounds::CACHE_MAX_ENTRIES.max,
            stale_ttl_secs: bounds::CACHE_STALE_TTL_SECS.max,
        };
        let _ = crate::lookup::Resolver::new(None, &cache, bounds::REDIS_CACHE_TTL_SECS.max);
        // tdl.rs prunes with `Span::days(retention_days - 1)`, which panics past ~7.3 million.
        let days = i64::try_from(bounds::TDL_RETENTION_DAYS.max).unwrap() - 1;
        assert!(jiff::Span::new().try_days(days).is_ok());
        // service.rs waits `command_timeout_ms * 2 + 10` in sync mode.
        let wait = bounds::REDIS_COMMAND_TIMEOUT_MS.max.checked_mul(2);
        assert!(wait.and_then(|w| w.checked_add(10)).is_some());
        for (name, value) in [
            ("UMA_TDL__RETENTION_DAYS", "100000000"),
            ("UMA_CACHE__STALE_TTL_SECS", "100000000000"),
            ("UMA_SERVER__WORKERS", "100000"),
            ("UMA_REDIS__COMMAND_TIMEOUT_MS", "18446744073709551615"),
        ] {
            let err = load_env(&[(name, value)]).unwrap_err();
            assert!(err[0].reason.starts_with("must be between"), "{err:?}");
        }
    }

    #[test]
    fn kubernetes_service_links_are_ignored() {
        let links = [
            ("UMA_PORT", "tcp://10.0.0.1:8089"),
            ("UMA_SERVICE_HOST", "10.0.0.1"),
            ("UMA_SERVICE_PORT", "8089"),
            ("UMA_SERVICE_PORT_HTTP", "8089"),
            ("UMA_PORT_8089_TCP", "tcp://10.0.0.1:8089"),
            ("UMA_PORT_8089_TCP_PROTO", "tcp"),
            ("UMA_PORT_8089_TCP_PORT", "8089"),
            ("UMA_PORT_8089_TCP_ADDR", "10.0.0.1"),
        ];
        let loaded = load_env(&links).unwrap();
        assert_eq!(loaded.settings, Settings::default());
        // A typo next to them is still refused, under its own name.
        let mut with_typo = links.to_vec();
        with_typo.push(("UMA_REDIS_URL", "x"));
        let err = load_env(&with_typo).unwrap_err();
        assert_eq!(err.len(), 1, "{err:?}");
        assert_eq!(err[0].file, "environment variable UMA_REDIS_URL");
        assert!(
            err[0].reason.contains("unknown field `redis_url`"),
            "{err:?}"
        );
        // Unknown keys in the file stay errors, service-link-like or not.
        let (_dir, path) = write("port = 8089\n");
        let err = Settings::load(Some(&path), env(&[])).unwrap_err();
        assert!(err[0].reason.contains("unknown field `port`"), "{err:?}");
    }

    #[test]
    fn every_bad_key_of_the_file_and_the_environment_is_reported_at_once() {
        let (_dir, path) = write(
            "[redis]\npool_size = \"many\"\nbogus = 1\n[tdl]\nmode = \"sometimes\"\n[[routes]]\nprefix = \"/a\"\nzzz = 1\n",
        );
        let err = Settings::load(
            Some(&path),
            env(&[
                ("UMA_CACHE__MAX_ENTRIES", "lots"),
                ("UMA_REDIS_URL", "redis://x"),
            ]),
        )
        .unwrap_err();
        let label = path.display().to_string();
        let found: Vec<(String, &str)> = err
            .iter()
            .map(|p| (p.file.replace(&label, "FILE"), p.path.as_str()))
            .collect();
        let expected: Vec<(String, &str)> = [
            ("FILE", "redis.bogus"),
            ("FILE", "redis.pool_size"),
            ("FILE", "routes[0]"),
            ("FILE", "tdl.mode"),
            (
                "environment variable UMA_CACHE__MAX_ENTRIES",
                "cache.max_entries",
            ),
            ("environment variable UMA_REDIS_URL", "redis_url"),
        ]
        .into_iter()
        .map(|(f, p)| (f.to_owned(), p))
        .collect();
        assert_eq!(found, expected, "{err:?}");
        assert!(err[0].reason.contains("unknown field `bogus`"), "{err:?}");
        assert!(err[1].reason.contains("invalid type"), "{err:?}");
        assert!(
            !err[1].reason.contains(&label),
            "the file is named once: {err:?}"
        );
    }

    #[test]
    fn a_toml_syntax_error_names_its_line() {
        let (_dir, path) = write("listen = \"127.0.0.1:8089\"\n[redis\n");
        let err = Settings::load(Some(&path), env(&[])).unwrap_err();
        assert_eq!(err.len(), 1, "{err:?}");
        assert_eq!(err[0].line, Some(2), "{err:?}");
        assert!(err[0].reason.starts_with("TOML syntax error"), "{err:?}");
        assert!(!err[0].reason.contains('\n'), "{err:?}");
    }

    #[test]
    fn a_config_path_that_is_not_a_regular_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = Settings::load(Some(dir.path()), env(&[])).unwrap_err();
        assert_eq!(err[0].reason, "not a regular file (a directory)");
        let err = Settings::load(Some(Path::new("/dev/null")), env(&[])).unwrap_err();
        assert_eq!(err[0].reason, "not a regular file (a character device)");
    }

    #[test]
    fn empty_auth_strings_count_as_unset() {
        let loaded = load_env(&[
            ("UMA_AUTH__GATEWAY_SECRET", ""),
            ("UMA_AUTH__DEFAULT_URI", ""),
        ])
        .unwrap();
        assert_eq!(loaded.settings.auth.gateway_secret, None);
        assert_eq!(loaded.settings.auth.default_uri, None);
        let (_dir, path) = write("[auth]\ngateway_secret = \"\"\ndefault_uri = \"/\"\n");
        let loaded = Settings::load(Some(&path), env(&[])).unwrap();
        assert_eq!(loaded.settings.auth.gateway_secret, None);
        assert_eq!(loaded.settings.auth.default_uri.as_deref(), Some("/"));
    }

    #[test]
    fn auth_strings_are_checked() {
        let err = load_env(&[
            ("UMA_AUTH__DEFAULT_URI", "v1/chat"),
            ("UMA_AUTH__GATEWAY_SECRET", " s3cret-value"),
        ])
        .unwrap_err();
        let paths: Vec<&str> = err.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["auth.default_uri", "auth.gateway_secret"]);
        assert!(err[0].reason.contains("must start with `/`"), "{err:?}");
        assert!(
            !err.iter().any(|p| p.to_string().contains("s3cret")),
            "the secret is never printed: {err:?}"
        );
        assert!(load_env(&[("UMA_AUTH__DEFAULT_URI", "/v1/chat?x=1")]).is_ok());
    }

    #[test]
    fn a_missing_admin_token_file_leaves_the_admin_api_closed_and_a_bad_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("uma-admin/token");
        let missing = missing.to_str().unwrap();
        let loaded = load_env(&[("UMA_ADMIN__TOKEN_FILE", missing)]).unwrap();
        assert!(loaded.admin.is_none(), "no token: closed");
        // The admin.token still opens it.
        let token = "t".repeat(ADMIN_TOKEN_MIN_CHARS);
        let loaded = load_env(&[
            ("UMA_ADMIN__TOKEN_FILE", missing),
            ("UMA_ADMIN__TOKEN", token.as_str()),
        ])
        .unwrap();
        assert_eq!(loaded.admin.map(|a| a.tokens.len()), Some(1));
        // A file that is there is read, and must hold a valid token.
        let present = dir.path().join("tokens");
        std::fs::write(&present, "# nothing yet\n").unwrap();
        let err = load_env(&[("UMA_ADMIN__TOKEN_FILE", present.to_str().unwrap())]).unwrap_err();
        assert_eq!(err[0].path, "admin.token_file", "{err:?}");
        std::fs::write(&present, format!("ops {token}\n")).unwrap();
        let loaded = load_env(&[("UMA_ADMIN__TOKEN_FILE", present.to_str().unwrap())]).unwrap();
        assert_eq!(
            loaded.admin.map(|a| a.tokens[0].name.clone()).as_deref(),
            Some("ops")
        );
    }
}
