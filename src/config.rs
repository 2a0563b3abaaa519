//! Service configuration: a TOML file layered with `UMA_` environment variables (SPEC §2).
//!
//! Built-in defaults apply when the default file is missing; an explicitly named file must exist.
//! Unknown keys are errors, so `UMA_REDIS_URL` (one underscore) is reported instead of silently
//! ignored. Semantic checks collect every problem before failing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::core::request::ReadRules;
pub use crate::core::request::{EntrySelector, OriginalSource};
use crate::core::routes::{Acl, ConfigRoute};
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
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            original_request: OriginalSource::Auto,
            default_uri: None,
            entry_selectors: Vec::new(),
            trust_route_header: false,
            gateway_secret: None,
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
    /// The file the settings came from, when there was one.
    pub source: Option<PathBuf>,
}

impl Settings {
    /// Loads `explicit` (must exist) or the default file (may be missing), then `UMA_` variables from
    /// `env` (the process environment when `None`).
    pub fn load(
        explicit: Option<&Path>,
        env: Option<HashMap<String, String>>,
    ) -> Result<Loaded, Vec<Problem>> {
        let (path, required) = match explicit {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let label = path.display().to_string();
        let problem = |reason: String| {
            vec![Problem {
                file: label.clone(),
                line: None,
                path: String::new(),
                reason,
            }]
        };
        let exists = path.is_file();
        if required && !exists {
            return Err(problem("the configuration file does not exist".into()));
        }
        let environment = config::Environment::with_prefix("UMA")
            .prefix_separator("_")
            .separator("__")
            .source(env);
        let mut builder = config::Config::builder();
        if exists {
            builder = builder
                .add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml));
        }
        let settings: Settings = builder
            .add_source(environment)
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|e| problem(e.to_string()))?;
        settings.check(&label, exists.then_some(path))
    }

    fn check(self, label: &str, source: Option<PathBuf>) -> Result<Loaded, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut report = |path: String, reason: String| {
            problems.push(Problem {
                file: label.to_owned(),
                line: None,
                path,
                reason,
            });
        };
        let listen = self.listen.parse::<SocketAddr>();
        if let Err(e) = &listen {
            report(
                "listen".into(),
                format!("`{}` is not an address:port ({e})", self.listen),
            );
        }
        let timezone = jiff::tz::TimeZone::get(&self.tdl.timezone);
        if timezone.is_err() {
            report(
                "tdl.timezone".into(),
                format!("`{}` is not a known IANA time zone", self.tdl.timezone),
            );
        }
        if self.tdl.flush_interval_ms == 0 {
            report("tdl.flush_interval_ms".into(), "must be at least 1".into());
        }
        if self.tdl.retention_days == 0 {
            report("tdl.retention_days".into(), "must be at least 1".into());
        }
        let redis_url = self.redis.url.trim();
        if !redis_url.is_empty()
            && let Err(e) = redis::IntoConnectionInfo::into_connection_info(redis_url)
        {
            report("redis.url".into(), format!("not a Redis URL ({e})"));
        }
        for (key, value) in [
            ("redis.pool_size", self.redis.pool_size as u64),
            ("redis.connect_timeout_ms", self.redis.connect_timeout_ms),
            ("redis.command_timeout_ms", self.redis.command_timeout_ms),
            ("redis.health_interval_ms", self.redis.health_interval_ms),
            ("redis.cache_ttl_secs", self.redis.cache_ttl_secs),
            ("tdl.max_pending_keys", self.tdl.max_pending_keys as u64),
        ] {
            if value == 0 {
                report(key.into(), "must be at least 1".into());
            }
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            report(
                "log.format".into(),
                format!("`{}` must be `text` or `json`", self.log.format),
            );
        }
        if self.seed.path.as_os_str().is_empty() {
            report("seed.path".into(), "must name the seed file".into());
        }
        let mut routes = Vec::new();
        for (i, route) in self.routes.iter().enumerate() {
            let path = format!("routes[{i}]");
            if !route.prefix.starts_with('/') {
                report(
                    format!("{path}.prefix"),
                    format!("`{}` must start with `/`", route.prefix),
                );
            }
            // An empty pin counts as none, as an empty `metadata_id` does in a request.
            if let Some(id) = &route.metadata_id
                && !id.bytes().all(|b| b.is_ascii_graphic())
            {
                report(
                    format!("{path}.metadata_id"),
                    "must be visible ASCII without spaces".into(),
                );
            }
            for (field, groups) in [
                ("allow_groups", &route.allow_groups),
                ("deny_groups", &route.deny_groups),
            ] {
                for (j, group) in groups.iter().enumerate() {
                    if group.is_empty()
                        || group.contains(',')
                        || !group.bytes().all(|b| (0x20..0x7f).contains(&b))
                    {
                        report(
                            format!("{path}.{field}[{j}]"),
                            "must be printable ASCII without a comma".into(),
                        );
                    }
                }
            }
            routes.push(ConfigRoute {
                prefix: route.prefix.clone(),
                metadata_id: route.metadata_id.clone().filter(|id| !id.is_empty()),
                acl: Acl {
                    allow: route.allow_groups.clone(),
                    deny: route.deny_groups.clone(),
                },
            });
        }
        match (listen, timezone, problems.is_empty()) {
            (Ok(listen), Ok(timezone), true) => Ok(Loaded {
                settings: self,
                listen,
                timezone,
                routes,
                source,
            }),
            _ => Err(problems),
        }
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
}
