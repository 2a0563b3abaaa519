//! Wiring: config + seed → catalog → app → listening server. Used by `serve` and by tests that run
//! the real server in process (with an injected clock) on port 0.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::config::Loaded;
use crate::core::decide::{Catalog, Policy};
use crate::http::{self, App, ServeOptions};
use crate::lookup::{Resolver, seed_copies};
use crate::metrics::{self, Metrics};
use crate::problem::Problem;
use crate::seed;
use crate::store::RedisStore;
use crate::tdl::TdlCounters;

/// Loads the seed (at `seed_path`, or the config's) and indexes it with the config routes.
pub fn load_catalog(loaded: &Loaded, seed_path: Option<&Path>) -> Result<Catalog, Vec<Problem>> {
    let path = seed_path.unwrap_or(&loaded.settings.seed.path);
    let data = seed::load_file(path, loaded.settings.seed.max_bytes)?;
    let policy = Policy {
        global: data.global,
        global_acl: data.global_acl,
        global_key_auth: data.global_key_auth,
        ..Policy::build(data.routes, loaded.routes.clone())
    };
    let catalog = Catalog::new(data.consumers, policy);
    release_freed_memory();
    Ok(catalog)
}

/// Hands the memory freed after parsing (the seed text and its tree, several times the size of
/// what is kept) back to the system; glibc would otherwise keep it as resident memory for good.
fn release_freed_memory() {
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
    let counters = Arc::new(TdlCounters::new(
        loaded.timezone.clone(),
        clock,
        &settings.tdl,
        store.clone(),
    ));
    let app = Arc::new(App {
        catalog: ArcSwap::from_pointee(catalog),
        resolver: Resolver::new(
            store.clone(),
            &settings.cache,
            settings.redis.cache_ttl_secs,
        ),
        counters: counters.clone(),
        store: store.clone(),
        metrics,
        rules: loaded.read_rules(),
        gateway_secret: loaded.gateway_secret().map(|s| s.as_bytes().into()),
        timezone_name: settings.tdl.timezone.clone(),
        sync_wait: Duration::from_millis(settings.redis.command_timeout_ms * 2 + 10),
        ready: AtomicBool::new(true),
    });
    let (stop, stopped) = watch::channel(false);
    if let Some(store) = &store {
        let interval = Duration::from_millis(settings.redis.health_interval_ms);
        spawn_redis_upkeep(store, &app, interval, settings.redis.cache_ttl_secs);
        tokio::spawn(counters.clone().run_flusher(stopped));
    }
    let background = Background {
        stop,
        counters,
        final_flush: Duration::from_millis(settings.tdl.shutdown_flush_ms),
    };
    (app, background)
}

/// Health checks; on the first connection, the seed's consumers are rewritten in Redis so a
/// restarted service never serves an older seed than its own.
fn spawn_redis_upkeep(store: &Arc<RedisStore>, app: &Arc<App>, interval: Duration, ttl: u64) {
    let app = Arc::downgrade(app);
    let store_for_copies = store.clone();
    let copied = AtomicBool::new(false);
    store.spawn_health_loop(interval, move || {
        if copied.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(app) = app.upgrade() else { return };
        let items = seed_copies(&app.catalog.load());
        let store = store_for_copies.clone();
        tokio::spawn(async move {
            match store.put_seed_copies(&items, ttl).await {
                Ok(()) => tracing::info!(records = items.len(), "seed copies written to Redis"),
                Err(error) => tracing::warn!(%error, "seed copies not written; lookups write them back one by one"),
            }
        });
    });
}

/// Background work owned by a running service.
pub struct Background {
    stop: watch::Sender<bool>,
    counters: Arc<TdlCounters>,
    final_flush: Duration,
}

impl Background {
    /// Stops the flusher and writes what is pending (trying for at most `tdl.shutdown_flush_ms`).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.counters.final_flush(self.final_flush).await;
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

/// A server running in the current runtime.
pub struct Running {
    pub addr: SocketAddr,
    pub app: Arc<App>,
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
        let task = tokio::spawn(http::serve(listener, app.clone(), options, async move {
            let _ = stopped.await;
        }));
        Ok(Running {
            addr,
            app,
            background,
            stop: Some(stop),
            task,
        })
    }

    /// Graceful stop: returns once connections are drained or the grace period is over.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
        self.background.stop().await;
    }
}
