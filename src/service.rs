//! Wiring: config + seed → catalog → app → listening server. Used by `serve` and by tests that run
//! the real server in process (with an injected clock) on port 0.
//!
//! Also the background work that keeps Redis in line with the running seed: the seed copies are
//! rewritten at start (and by every seed reload, see `reload`) and retried until every one is
//! written, and `/readyz` is a real latch over it ([`Readiness`]), released once they are (or at
//! once while Redis cannot be reached: an outage never makes the service unready), and closed again
//! when shutdown begins.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::clock::Clock;
use crate::config::Loaded;
use crate::core::body::BodyRules;
use crate::core::decide::{Catalog, Policy};
use crate::http::admin::AdminApp;
use crate::http::body::BodyReader;
use crate::http::{self, App, ServeOptions};
use crate::lookup::{Invalidation, Resolver, seed_copies};
use crate::metrics::{self, Metrics};
use crate::problem::Problem;
use crate::quota::Quotas;
use crate::reload::Reloader;
use crate::seed;
use crate::store::RedisStore;
use crate::tdl::TdlCounters;
use crate::usage::UsageBook;

/// Loads the seed (at `seed_path`, or the config's) and indexes it with the config routes.
pub fn load_catalog(loaded: &Loaded, seed_path: Option<&Path>) -> Result<Catalog, Vec<Problem>> {
    let path = seed_path.unwrap_or(&loaded.settings.seed.path);
    let text = seed::read_file(path, loaded.settings.seed.max_bytes)?;
    let digest = seed_digest(&text);
    catalog_from_text(loaded, path, text, digest)
}

/// SHA-256 of a seed's text: what tells a changed seed file from one written again unchanged.
pub fn seed_digest(text: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes()).into()
}

/// Checks seed `text` read from `path` (its [`seed_digest`] given) and indexes it with the config
/// routes of `loaded`. The text, plain keys and all, is dropped before the catalog is built.
pub fn catalog_from_text(
    loaded: &Loaded,
    path: &Path,
    text: String,
    digest: [u8; 32],
) -> Result<Catalog, Vec<Problem>> {
    let parsed = seed::parse_with(&text, &path.display().to_string(), &loaded.capability_names);
    drop(text);
    let data = parsed?;
    let policy = Policy {
        global: data.global,
        global_acl: data.global_acl,
        global_key_auth: data.global_key_auth,
        global_require_capabilities: data.global_require_capabilities,
        capability_names: loaded.capability_names.clone(),
        ..Policy::build(data.routes, loaded.routes.clone())
    };
    let mut catalog = Catalog::new(data.consumers, policy);
    catalog.seed_digest = Some(digest);
    release_freed_memory();
    Ok(catalog)
}

/// Hands the memory freed after parsing (the seed text and its tree, several times the size of
/// what is kept, or a catalog replaced by a reload) back to the system; glibc would otherwise keep
/// it as resident memory for good.
pub(crate) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it takes no pointers and is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Config routes that pin an id no list of the seed holds: every call on them would be refused.
pub fn pin_warnings(loaded: &Loaded, catalog: &Catalog) -> Vec<String> {
    loaded
        .routes
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let id = r.metadata_id.as_deref()?;
            (!catalog.has_entry(id)).then(|| {
                format!("routes[{i}].metadata_id: `{id}` is in no metadata list of the seed")
            })
        })
        .collect()
}

/// Seed copies written per round trip (halved after a round of failures, so a slow link still
/// gets them through within the command timeout).
const COPY_CHUNK: usize = 200;

/// Longest the seed copies hold readiness back while Redis answers but refuses or delays them:
/// the running seed answers for its keys whether or not they are written (SPEC §3), so a Redis that
/// accepts PINGs but not writes must not keep every replica out of service.
const COPIES_HOLD_READINESS: Duration = Duration::from_secs(30);

/// The `/readyz` latch (SPEC §6): ready once the seed is loaded (it is, before this exists) and,
/// with Redis configured and reachable, its copies have been written; not ready once shutdown
/// began.
#[derive(Debug)]
pub struct Readiness {
    since: Instant,
    copies_written: AtomicBool,
    stopping: AtomicBool,
}

/// What `/readyz` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadyState {
    pub ready: bool,
    pub seed_copies_written: bool,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            since: Instant::now(),
            copies_written: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        }
    }
}

impl Readiness {
    pub fn state(&self, store: Option<&RedisStore>) -> ReadyState {
        let written = self.copies_written.load(Ordering::Acquire);
        let ready = !self.stopping.load(Ordering::Acquire)
            && match store {
                None => true,
                // Not before the first health check has said whether Redis is there; then held
                // only while Redis answers (a Redis outage must not stop the service).
                Some(store) => {
                    written
                        || (store.checked() && !store.is_up())
                        || self.since.elapsed() >= COPIES_HOLD_READINESS
                }
            };
        ReadyState {
            ready,
            seed_copies_written: written,
        }
    }

    pub fn seed_copies_written(&self) {
        self.copies_written.store(true, Ordering::Release);
    }

    /// Shutdown began: the gateway should stop sending calls here.
    pub fn begin_shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
    }
}

/// Which routes require which capabilities (SPEC §8.2), one line each, for `check`.
pub fn capability_requirements(catalog: &Catalog) -> Vec<String> {
    let policy = &catalog.policy;
    let names = |indexes: &[usize]| {
        indexes
            .iter()
            .map(|i| policy.capability_names.name(*i))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let seed = policy
        .seed_routes
        .routes()
        .filter(|r| !r.require_capabilities.is_empty())
        .map(|r| {
            format!(
                "seed route `{}` requires {}",
                r.name,
                names(&r.require_capabilities)
            )
        });
    let config = policy
        .config_routes
        .routes()
        .filter(|r| !r.require_capabilities.is_empty())
        .map(|r| {
            format!(
                "config route `{}` requires {}",
                r.prefix,
                names(&r.require_capabilities)
            )
        });
    let global = (!policy.global_require_capabilities.is_empty()).then(|| {
        format!(
            "URIs matching no seed route require {}",
            names(&policy.global_require_capabilities)
        )
    });
    seed.chain(config).chain(global).collect()
}

/// Builds the shared state and starts its background work (Redis health checks, seed copies,
/// the counter flusher). Call inside a tokio runtime; stop with [`Background::stop`].
pub fn build_app(
    loaded: &Loaded,
    catalog: Catalog,
    clock: Arc<dyn Clock>,
) -> (Arc<App>, Background) {
    let handle = metrics::install();
    let metrics = Metrics::new(handle.clone());
    metrics::spawn_upkeep(handle);
    metrics.loaded(&catalog);
    metrics.seed_loaded(jiff::Timestamp::now());
    let settings = &loaded.settings;
    // The URL was checked with the config; a failure here is a bug, reported and survived.
    let store = loaded
        .redis_configured()
        .then(|| {
            RedisStore::new(&settings.redis)
                .map_err(|e| tracing::error!("redis disabled: {e}"))
                .ok()
        })
        .flatten()
        .map(Arc::new);
    ::metrics::gauge!("uma_redis_configured").set(if store.is_some() { 1.0 } else { 0.0 });
    let quotas = Arc::new(Quotas::new(
        loaded.timezone.clone(),
        clock.clone(),
        store.clone(),
        settings.limits.on_redis_down,
    ));
    tokio::spawn(quotas.clone().run_upkeep());
    let usage = Arc::new(UsageBook::new(
        &settings.usage,
        settings.tdl.retention_days,
        loaded.timezone.clone(),
        clock.clone(),
        store.clone(),
        settings.limits.on_redis_down,
    ));
    let counters = Arc::new(TdlCounters::new(
        loaded.timezone.clone(),
        clock,
        &settings.tdl,
        store.clone(),
    ));
    let ready = Arc::new(Readiness::default());
    let app = Arc::new(App {
        catalog: ArcSwap::from_pointee(catalog),
        resolver: Resolver::new(
            store.clone(),
            &settings.cache,
            settings.redis.cache_ttl_secs,
        ),
        counters: counters.clone(),
        quotas,
        store: store.clone(),
        metrics,
        rules: loaded.read_rules(),
        gateway_secret: loaded.gateway_secret().map(|s| s.as_bytes().into()),
        timezone_name: settings.tdl.timezone.clone(),
        sync_wait: Duration::from_millis(
            settings
                .redis
                .command_timeout_ms
                .saturating_mul(2)
                .saturating_add(10),
        ),
        ready: ready.clone(),
        body: BodyReader::new(
            settings.auth.max_body_bytes,
            Duration::from_millis(settings.auth.body_timeout_ms),
            settings.auth.max_body_bytes_in_flight,
            BodyRules {
                require_max_tokens: settings.auth.require_max_tokens,
            },
        ),
        usage: usage.clone(),
        usage_token: settings.usage.token.as_ref().map(|t| t.as_bytes().into()),
        usage_max_body: settings.usage.max_body_bytes,
    });
    // Built off the start path: the first /auth-body call waits for it only if it comes first.
    crate::tokenizer::warm_up();
    let (stop, stopped) = watch::channel(false);
    let mut copies = None;
    if let Some(store) = &store {
        let interval = Duration::from_millis(settings.redis.health_interval_ms);
        // Whatever was published while Redis was away is lost: forget every cached answer.
        let recovered = Arc::downgrade(&app);
        store.spawn_health_loop(interval, move || {
            if let Some(app) = recovered.upgrade() {
                app.resolver.invalidate_all();
            }
        });
        spawn_invalidations(store.clone(), Arc::downgrade(&app), stopped.clone());
        let writer = Arc::new(SeedCopies::new(
            store.clone(),
            settings.redis.cache_ttl_secs,
            interval,
            ready.clone(),
            stopped.clone(),
        ));
        writer.start(app.catalog.load_full());
        copies = Some(writer);
        tokio::spawn(usage.clone().run_writer(stopped.clone()));
        tokio::spawn(counters.clone().run_flusher(stopped));
    }
    let background = Background {
        stop,
        counters,
        usage,
        ready,
        copies,
        final_flush: Duration::from_millis(settings.tdl.shutdown_flush_ms),
    };
    (app, background)
}

/// Keeps the invalidation subscription (SPEC §10): each message forgets what it names, in the
/// shared cache and every thread's copies; every (re)subscription forgets everything, since
/// messages sent while it was away are lost.
fn spawn_invalidations(store: Arc<RedisStore>, app: Weak<App>, stopped: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let subscribed = || {
            if let Some(app) = app.upgrade() {
                app.resolver.invalidate_all();
            }
        };
        let message = |text: &str| {
            let target = Invalidation::parse(text).unwrap_or_else(|| {
                tracing::warn!(
                    message = text,
                    "unknown invalidation message; flushing every cache"
                );
                Invalidation::All
            });
            if let Some(app) = app.upgrade() {
                app.resolver.invalidate(&target);
            }
        };
        store.run_subscription(subscribed, message, stopped).await;
    });
}

/// The writer of the seed's copies in Redis: one run at a time, started for the seed loaded at
/// start and restarted by every reload for the new one (see [`spawn_seed_copies`]).
pub struct SeedCopies {
    store: Arc<RedisStore>,
    ttl: u64,
    poll: Duration,
    ready: Arc<Readiness>,
    stopped: watch::Receiver<bool>,
    current: std::sync::Mutex<Option<CopyRun>>,
}

impl SeedCopies {
    pub fn new(
        store: Arc<RedisStore>,
        ttl: u64,
        poll: Duration,
        ready: Arc<Readiness>,
        stopped: watch::Receiver<bool>,
    ) -> SeedCopies {
        SeedCopies {
            store,
            ttl,
            poll,
            ready,
            stopped,
            current: std::sync::Mutex::default(),
        }
    }

    /// Writes `catalog`'s copies, cancelling the run for an earlier catalog (its round trip in
    /// flight lands first, so no copy of the older seed is written after one of this one).
    pub fn start(&self, catalog: Arc<Catalog>) {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let previous = current.take();
        *current = Some(spawn_seed_copies(
            self.store.clone(),
            catalog,
            self.ttl,
            self.poll,
            self.ready.clone(),
            self.stopped.clone(),
            previous,
        ));
    }
}

/// One run of the seed copies' writer; [`spawn_seed_copies`] cancels it when it is given it.
pub struct CopyRun {
    cancel: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Rewrites the seed's copies in Redis (SETEX; operator records are left alone) so a restarted
/// service never leaves an older seed's copies behind, retrying what was not written until all of
/// it is: a failed chunk neither stops the others nor is forgotten. Meanwhile lookups never take a
/// copy over the running seed, so this only decides when `/readyz` lets traffic in (the first
/// run; the latch stays released through reloads).
///
/// `previous`, the run for an earlier seed, is told to stop and waited for before anything is
/// written: it stops between round trips, and a reload's copies then overwrite what it wrote.
pub fn spawn_seed_copies(
    store: Arc<RedisStore>,
    catalog: Arc<Catalog>,
    ttl: u64,
    poll: Duration,
    ready: Arc<Readiness>,
    mut stopped: watch::Receiver<bool>,
    previous: Option<CopyRun>,
) -> CopyRun {
    let (cancel, mut cancelled) = watch::channel(false);
    let task = tokio::spawn(async move {
        if let Some(previous) = previous {
            let _ = previous.cancel.send(true);
            let _ = previous.task.await;
        }
        let Ok(mut left) = tokio::task::spawn_blocking(move || seed_copies(&catalog)).await else {
            return;
        };
        let total = left.len();
        let pending = ::metrics::gauge!("uma_redis_seed_copies_pending");
        let poll = poll.max(Duration::from_millis(10));
        let (mut chunk, mut backoff, mut warned) = (COPY_CHUNK, poll, false);
        loop {
            if *cancelled.borrow() {
                return;
            }
            pending.set(left.len() as f64);
            if left.is_empty() {
                ready.seed_copies_written();
                tracing::info!(records = total, "seed copies written to Redis");
                return;
            }
            if !store.is_up() {
                // Written once the health loop sees Redis again.
                tokio::select! {
                    () = tokio::time::sleep(poll) => {}
                    _ = stopped.changed() => return,
                    _ = cancelled.changed() => return,
                }
                continue;
            }
            // A chunk per round trip, so a newer seed's run takes over between two of them.
            let mut failed = Vec::new();
            for (n, part) in left.chunks(chunk).enumerate() {
                if *cancelled.borrow() {
                    return;
                }
                let first = n * chunk;
                let missed = store.put_seed_copies(part, ttl, chunk).await;
                failed.extend(missed.into_iter().map(|i| first + i));
            }
            if failed.len() < left.len() {
                backoff = poll;
            }
            if !failed.is_empty() {
                if !warned {
                    warned = true;
                    tracing::warn!(
                        left = failed.len(),
                        of = total,
                        "seed copies not all written to Redis; retrying until they are (the running seed answers for its keys meanwhile)"
                    );
                }
                chunk = (chunk / 2).max(10);
            }
            let mut tried = std::mem::take(&mut left);
            left = failed
                .into_iter()
                .filter_map(|i| tried.get_mut(i).map(std::mem::take))
                .collect();
            if !left.is_empty() {
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stopped.changed() => return,
                    _ = cancelled.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    });
    CopyRun { cancel, task }
}

/// Background work owned by a running service.
pub struct Background {
    stop: watch::Sender<bool>,
    counters: Arc<TdlCounters>,
    usage: Arc<UsageBook>,
    ready: Arc<Readiness>,
    /// The seed copies' writer, with Redis configured; a reload restarts it.
    copies: Option<Arc<SeedCopies>>,
    final_flush: Duration,
}

impl Background {
    /// Turns true when [`Background::stop`] begins (or the service is gone).
    pub fn stopped(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    pub fn seed_copies(&self) -> Option<Arc<SeedCopies>> {
        self.copies.clone()
    }

    /// Stops the writers and writes what is pending, counters and usage records side by side
    /// (each trying for at most `tdl.shutdown_flush_ms`).
    pub async fn stop(self) {
        self.ready.begin_shutdown();
        let _ = self.stop.send(true);
        tokio::join!(
            self.counters.final_flush(self.final_flush),
            self.usage.final_flush(self.final_flush)
        );
    }
}

pub fn serve_options(loaded: &Loaded) -> ServeOptions {
    ServeOptions {
        header_read_timeout: Duration::from_millis(loaded.settings.server.header_read_timeout_ms),
        idle_timeout: Duration::from_millis(loaded.settings.server.idle_timeout_ms),
        max_connections: loaded.settings.server.max_connections,
        shutdown_grace: Duration::from_millis(loaded.settings.server.shutdown_grace_ms),
    }
}

/// Starts the seed reloads (SPEC §10) of the service built by [`build_app`]: SIGHUP (the caller
/// forwards it), `POST /admin/reload` and, with `seed.watch`, changes of the seed file. They stop
/// with the background work.
pub fn start_reloader(loaded: &Loaded, app: &Arc<App>, background: &Background) -> Arc<Reloader> {
    Reloader::start(
        loaded,
        app.clone(),
        background.seed_copies(),
        background.stopped(),
    )
}

/// The admin API over `app`, when `loaded` configures a token (SPEC §10).
pub fn build_admin(
    loaded: &Loaded,
    app: &Arc<App>,
    reloader: &Arc<Reloader>,
) -> Option<(SocketAddr, Arc<AdminApp>)> {
    let access = loaded.admin.as_ref()?;
    let admin = Admin {
        app: app.clone(),
        store: app.store.clone(),
        audit_max_entries: loaded.settings.admin.audit_max_entries,
        writes: tokio::sync::Mutex::new(()),
        reloader: reloader.clone(),
    };
    Some((
        access.listen,
        Arc::new(AdminApp::new(Arc::new(admin), access.tokens.clone())),
    ))
}

/// A server running in the current runtime.
pub struct Running {
    pub addr: SocketAddr,
    /// The admin listener's address, when it is open.
    pub admin_addr: Option<SocketAddr>,
    pub app: Arc<App>,
    /// The reloads of this server's seed (its file is watched when `seed.watch` is on).
    pub reloader: Arc<Reloader>,
    background: Background,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    /// Binds `loaded.listen` and serves `app` until [`Running::stop`].
    pub async fn start(
        loaded: &Loaded,
        (app, background): (Arc<App>, Background),
    ) -> std::io::Result<Running> {
        let (listener, addr) = http::bind(loaded.listen).await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let options = serve_options(loaded);
        let (admin_stop, admin_stopped) = watch::channel(false);
        let reloader = start_reloader(loaded, &app, &background);
        let admin_addr = match build_admin(loaded, &app, &reloader) {
            Some((listen, admin)) => {
                let (admin_listener, admin_addr) = http::bind(listen).await?;
                let mut stopped = admin_stopped;
                tokio::spawn(http::serve(admin_listener, admin, options, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                }));
                Some(admin_addr)
            }
            None => None,
        };
        let task = tokio::spawn(http::serve(listener, app.clone(), options, async move {
            let _ = stopped.await;
            let _ = admin_stop.send(true);
        }));
        Ok(Running {
            addr,
            admin_addr,
            app,
            reloader,
            background,
            stop: Some(stop),
            task,
        })
    }

    /// Graceful stop: returns once connections are drained or the grace period is over.
    /// `/readyz` answers not ready from the start of it.
    pub async fn stop(mut self) {
        self.app.ready.begin_shutdown();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
        self.background.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::config::{RedisSettings, Settings};

    #[tokio::test]
    async fn readiness_waits_for_the_first_check_but_not_for_an_outage() {
        let settings = RedisSettings {
            url: "redis://127.0.0.1:1".into(),
            ..RedisSettings::default()
        };
        let store = RedisStore::new(&settings).unwrap();
        let ready = Readiness::default();
        let state = ready.state(Some(&store));
        assert!(!state.ready, "before the first health check");
        assert!(store.ping().await.is_err());
        let state = ready.state(Some(&store));
        assert!(state.ready, "redis down is no reason to be unready");
        assert!(!state.seed_copies_written);
        ready.seed_copies_written();
        assert!(ready.state(Some(&store)).seed_copies_written);
        ready.begin_shutdown();
        assert!(!ready.state(Some(&store)).ready);
    }

    #[tokio::test]
    async fn stopping_the_background_work_closes_readiness() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let env = [
            ("UMA_REDIS__URL", String::new()),
            (
                "UMA_SEED__PATH",
                dir.join("config/seed.yaml").display().to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let loaded = Settings::load(Some(&dir.join("config/default.toml")), Some(env)).unwrap();
        let catalog = load_catalog(&loaded, None).unwrap();
        let (app, background) = build_app(&loaded, catalog, Arc::new(SystemClock));
        assert!(app.ready.state(None).ready, "embedded: ready once built");
        background.stop().await;
        assert!(
            !app.ready.state(None).ready,
            "not ready once shutdown began"
        );
    }
}
