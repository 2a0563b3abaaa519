//! Wiring: config + seed → catalog → app → listening server. Used by `serve` and by tests that run
//! the real server in process (with an injected clock) on port 0.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::config::Loaded;
use crate::core::decide::Catalog;
use crate::http::{self, App, ServeOptions};
use crate::metrics::{self, Metrics};
use crate::problem::Problem;
use crate::seed;
use crate::tdl::TdlCounters;

/// Loads the seed (at `seed_path`, or the config's) and indexes it with the config routes.
pub fn load_catalog(loaded: &Loaded, seed_path: Option<&Path>) -> Result<Catalog, Vec<Problem>> {
    let path = seed_path.unwrap_or(&loaded.settings.seed.path);
    let data = seed::load_file(path)?;
    Ok(Catalog::new(
        data.consumers,
        data.routes,
        loaded.routes.clone(),
        data.global,
    ))
}

/// Config routes that pin an id no list of the seed holds: every call on them would be refused.
pub fn pin_warnings(loaded: &Loaded, catalog: &Catalog) -> Vec<String> {
    let mut known: Vec<&str> = Vec::new();
    let mut lists: Vec<_> = catalog
        .consumers
        .iter()
        .filter_map(|c| c.metadata.as_ref())
        .collect();
    lists.extend(catalog.policy.global.as_ref());
    for list in lists {
        known.extend(list.entries().iter().map(|e| &*e.id));
    }
    loaded
        .routes
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let id = r.metadata_id.as_deref()?;
            (!known.contains(&id)).then(|| {
                format!("routes[{i}].metadata_id: `{id}` is in no metadata list of the seed")
            })
        })
        .collect()
}

/// Builds the shared state. Call inside a tokio runtime.
pub fn build_app(loaded: &Loaded, catalog: Catalog, clock: Arc<dyn Clock>) -> Arc<App> {
    let handle = metrics::install();
    let metrics = Metrics::new(handle.clone());
    metrics::spawn_upkeep(handle);
    metrics.loaded(&catalog);
    metrics.redis_up(false);
    let counters = TdlCounters::new(
        loaded.timezone.clone(),
        clock,
        loaded.settings.tdl.retention_days,
    );
    Arc::new(App {
        catalog: ArcSwap::from_pointee(catalog),
        counters,
        metrics,
        timezone_name: loaded.settings.tdl.timezone.clone(),
        // Redis arrives with the Redis tier; until then the URL is read but not used.
        redis_configured: false,
        ready: AtomicBool::new(true),
    })
}

pub fn serve_options(loaded: &Loaded) -> ServeOptions {
    ServeOptions {
        header_read_timeout: Duration::from_millis(loaded.settings.server.header_read_timeout_ms),
        shutdown_grace: Duration::from_millis(loaded.settings.server.shutdown_grace_ms),
    }
}

/// A server running in the current runtime.
pub struct Running {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    /// Binds `loaded.listen` and serves `app` until [`Running::stop`].
    pub async fn start(loaded: &Loaded, app: Arc<App>) -> std::io::Result<Running> {
        let (listener, addr) = http::bind(loaded.listen).await?;
        let (stop, stopped) = oneshot::channel::<()>();
        let options = serve_options(loaded);
        let task = tokio::spawn(http::serve(listener, app.clone(), options, async move {
            let _ = stopped.await;
        }));
        Ok(Running {
            addr,
            app,
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
    }
}
