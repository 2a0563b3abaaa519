//! Seed reload (SPEC §10): the one place the running seed is replaced while the service serves.
//!
//! It owns the three triggers — SIGHUP (forwarded by `cli`), `POST /admin/reload` (through
//! [`crate::admin::Admin::reload`]) and, with `seed.watch`, a change of the seed file — and runs
//! their reloads one at a time on a task of its own, so two reloads never race to swap the catalog
//! or to restart the Redis copies: a trigger that comes during a reload makes one more reload
//! after it, however many come ([`Batch`]). The seed's *directory* is watched (notify +
//! notify-debouncer-full, 500 ms), because editors and Kubernetes replace a file by renaming or
//! swapping a symlink (`..data`) rather than writing it; events about other names in the directory
//! are ignored unless the seed path resolves through them ([`resolution_names`]). A file change
//! whose bytes are those of the running seed (SHA-256) is no reload at all.
//!
//! A reload reads and checks the seed exactly as start does (`service::load_catalog`'s steps, off
//! the async workers: a large seed takes seconds). A valid seed replaces the running one in one
//! atomic swap — a request in flight finishes on the catalog it started with — every cached lookup
//! is dropped (so a key removed from the seed is refused at once), the gauges, the pin warnings and
//! the Redis seed copies follow the new seed. An invalid one changes nothing: the last good seed
//! keeps serving, and every problem is logged as `check` prints it. SIGHUP also re-reads the config
//! file and applies its `[[routes]]` and `[capabilities]` (route requirements name capabilities,
//! so the two travel together); any other change of the config needs a restart, and is logged so.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use jiff::Timestamp;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio::sync::{Notify, oneshot, watch};

use crate::admin::ReloadTrigger;
use crate::admin::audit::{self, AuditEntry};
use crate::config::{Loaded, Settings};
use crate::core::decide::Catalog;
use crate::http::App;
use crate::problem::Problem;
use crate::seed;
use crate::service::{self, SeedCopies};

/// Changes of the seed file within this time make one reload.
pub const DEBOUNCE: Duration = Duration::from_millis(500);

/// Symbolic links followed when finding the names the seed path resolves through.
const MAX_LINKS: usize = 40;

/// What a good reload loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedSummary {
    pub consumers: usize,
    pub keys: usize,
    pub entries: usize,
    /// Seed routes and config routes together.
    pub routes: usize,
    pub loaded_at: Timestamp,
}

/// How a reload ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The new seed runs.
    Loaded(SeedSummary),
    /// Only file changes asked, and the file holds the running seed's bytes: nothing was done.
    Unchanged,
    /// The seed (or, on SIGHUP, the config) is invalid: nothing changed. Every problem, as
    /// `check` prints them.
    Invalid(Vec<Problem>),
    /// The service is stopping: no reload was made.
    Stopped,
}

/// The reloads of one running service. Cheap to share; the work runs on the task
/// [`Reloader::start`] spawns, which ends with the service's background work.
pub struct Reloader {
    queue: Arc<Queue>,
}

impl Reloader {
    /// Starts the reload task for `app` (running with `loaded`) and, with `seed.watch`, the
    /// watch of the seed's directory. `copies` is the Redis seed copies' writer (none in embedded
    /// mode); `stopped` turning true ends both.
    pub fn start(
        loaded: &Loaded,
        app: Arc<App>,
        copies: Option<Arc<SeedCopies>>,
        stopped: watch::Receiver<bool>,
    ) -> Arc<Reloader> {
        let queue = Arc::new(Queue::default());
        let watcher = if loaded.settings.seed.watch {
            watch_seed(&loaded.settings.seed.path, queue.clone())
        } else {
            None
        };
        let worker = Worker {
            app,
            loaded: loaded.clone(),
            copies,
            queue: queue.clone(),
        };
        tokio::spawn(worker.run(stopped, watcher));
        Arc::new(Reloader { queue })
    }

    /// Reloads and waits for the outcome (the reload this call joined, when one was waiting to
    /// start). `actor` is who asked, for the audit trail.
    pub async fn reload(&self, trigger: ReloadTrigger, actor: &str) -> ReloadOutcome {
        let (answer, outcome) = oneshot::channel();
        self.queue.push(trigger, actor, Some(answer));
        outcome.await.unwrap_or(ReloadOutcome::Stopped)
    }

    /// Asks for a reload without waiting for it (a signal, a file change).
    pub fn request(&self, trigger: ReloadTrigger) {
        self.queue.push(trigger, trigger.as_str(), None);
    }
}

/// The reload to run next: what every trigger since the last one started asked for, together.
#[derive(Debug, Default)]
struct Batch {
    /// A SIGHUP asked: re-read the config file's routes too.
    config: bool,
    /// SIGHUP or the API asked: reload even a seed whose bytes are the running one's.
    force: bool,
    /// Who asked, in order, each once.
    actors: Vec<String>,
    /// Callers waiting for the outcome.
    waiters: Vec<oneshot::Sender<ReloadOutcome>>,
}

impl Batch {
    fn add(
        &mut self,
        trigger: ReloadTrigger,
        actor: &str,
        waiter: Option<oneshot::Sender<ReloadOutcome>>,
    ) {
        self.config |= trigger == ReloadTrigger::Signal;
        self.force |= trigger != ReloadTrigger::FileChange;
        if !self.actors.iter().any(|a| a == actor) {
            self.actors.push(actor.to_owned());
        }
        self.waiters.extend(waiter);
    }

    /// The audit trail's actor: who asked (`sighup`, `file`, a token's name), comma-separated
    /// when several triggers made this one reload.
    fn actor(&self) -> String {
        self.actors.join(",")
    }

    fn answer(self, outcome: &ReloadOutcome) {
        for waiter in self.waiters {
            let _ = waiter.send(outcome.clone());
        }
    }
}

/// Triggers waiting for the reload task; at most one reload waits, however many triggers come.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    wake: Notify,
}

#[derive(Default)]
struct QueueState {
    next: Option<Batch>,
    closed: bool,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(
        &self,
        trigger: ReloadTrigger,
        actor: &str,
        waiter: Option<oneshot::Sender<ReloadOutcome>>,
    ) {
        let mut state = self.lock();
        if state.closed {
            if let Some(waiter) = waiter {
                let _ = waiter.send(ReloadOutcome::Stopped);
            }
            return;
        }
        state
            .next
            .get_or_insert_with(Batch::default)
            .add(trigger, actor, waiter);
        drop(state);
        self.wake.notify_one();
    }

    fn take(&self) -> Option<Batch> {
        self.lock().next.take()
    }

    /// No more reloads: waiting callers are told, later ones are told at once.
    fn close(&self) {
        let waiting = {
            let mut state = self.lock();
            state.closed = true;
            state.next.take()
        };
        if let Some(batch) = waiting {
            batch.answer(&ReloadOutcome::Stopped);
        }
    }
}

/// The reload task's state: the running config (whose routes SIGHUP may replace) and what a
/// reload updates.
struct Worker {
    app: Arc<App>,
    loaded: Loaded,
    copies: Option<Arc<SeedCopies>>,
    queue: Arc<Queue>,
}

impl Worker {
    async fn run(mut self, mut stopped: watch::Receiver<bool>, watcher: Option<SeedWatcher>) {
        // Watching ends with this task.
        let _watcher = watcher;
        loop {
            if let Some(batch) = self.queue.take() {
                let outcome = tokio::select! {
                    outcome = self.reload(&batch) => outcome,
                    // Only between steps: what a reload changes, it changes without waiting.
                    _ = stopped.wait_for(|s| *s) => {
                        batch.answer(&ReloadOutcome::Stopped);
                        break;
                    }
                };
                self.audit(&batch, &outcome).await;
                batch.answer(&outcome);
                continue;
            }
            tokio::select! {
                () = self.queue.wake.notified() => {}
                _ = stopped.wait_for(|s| *s) => break,
            }
        }
        self.queue.close();
    }

    async fn reload(&mut self, batch: &Batch) -> ReloadOutcome {
        tracing::debug!(by = %batch.actor(), "reloading the seed");
        let mut next = self.loaded.clone();
        if batch.config {
            // The file the service started with, and the process environment, as at start.
            let source = self.loaded.source.clone();
            let read =
                tokio::task::spawn_blocking(move || Settings::load(source.as_deref(), None)).await;
            match read {
                Ok(Ok(config)) => {
                    let sections = restart_sections(&self.loaded, &config);
                    if !sections.is_empty() {
                        tracing::warn!(
                            sections = %sections.join(", "),
                            "config file changed in {}: that needs a restart (SIGHUP applies only routes and capabilities); the running values are kept",
                            sections.join(", ")
                        );
                    }
                    take_routes(&mut next, config);
                }
                Ok(Err(problems)) => {
                    return self.refused(
                        batch,
                        problems,
                        "config reload failed: the running config routes and seed are kept",
                    );
                }
                Err(error) => {
                    let problem = self.internal_problem(&error);
                    return self.refused(batch, vec![problem], "config reload failed");
                }
            }
        }
        let running = if batch.force {
            None
        } else {
            self.app.catalog.load().seed_digest
        };
        let read = tokio::task::spawn_blocking(move || {
            let catalog = read_catalog(&next, running);
            (next, catalog)
        })
        .await;
        match read {
            Ok((_, Ok(None))) => {
                tracing::debug!("seed file written with the running seed's bytes: not reloaded");
                ReloadOutcome::Unchanged
            }
            Ok((next, Ok(Some(catalog)))) => {
                ReloadOutcome::Loaded(self.apply(catalog, next, batch))
            }
            Ok((_, Err(problems))) => self.refused(
                batch,
                problems,
                "seed reload failed: the running seed is kept",
            ),
            Err(error) => {
                let problem = self.internal_problem(&error);
                self.refused(
                    batch,
                    vec![problem],
                    "seed reload failed: the running seed is kept",
                )
            }
        }
    }

    /// Puts `catalog` in force: no step waits, so a stop never leaves half of it done.
    fn apply(&mut self, catalog: Catalog, loaded: Loaded, batch: &Batch) -> SeedSummary {
        let policy = &catalog.policy;
        let summary = SeedSummary {
            consumers: catalog.consumers.len(),
            keys: catalog.by_key.len(),
            entries: catalog.entry_count(),
            routes: policy.seed_routes.len() + policy.config_routes.len(),
            loaded_at: Timestamp::now(),
        };
        let (seed_routes, config_routes) = (policy.seed_routes.len(), policy.config_routes.len());
        let catalog = Arc::new(catalog);
        let replaced = self.app.catalog.swap(catalog.clone());
        self.app.resolver.invalidate_all();
        let metrics = &self.app.metrics;
        metrics.loaded(&catalog);
        metrics.seed_loaded(summary.loaded_at);
        for warning in service::pin_warnings(&loaded, &catalog) {
            tracing::warn!("{warning}");
        }
        if let Some(copies) = &self.copies {
            copies.start(catalog);
        }
        metrics.seed_reloaded("ok");
        tracing::info!(
            by = %batch.actor(),
            consumers = summary.consumers,
            keys = summary.keys,
            entries = summary.entries,
            seed_routes,
            config_routes,
            interned_header_bytes = crate::core::intern::interned_bytes(),
            "seed reloaded (seed {})",
            loaded.settings.seed.path.display()
        );
        self.loaded = loaded;
        // Freed once the last request on it is done, and off the async workers when that is now.
        tokio::task::spawn_blocking(move || {
            drop(replaced);
            service::release_freed_memory();
        });
        summary
    }

    fn refused(&self, batch: &Batch, problems: Vec<Problem>, what: &str) -> ReloadOutcome {
        for problem in &problems {
            tracing::error!("{problem}");
        }
        tracing::error!(
            by = %batch.actor(),
            problems = problems.len(),
            "{what} ({} problem(s))",
            problems.len()
        );
        self.app.metrics.seed_reloaded("error");
        ReloadOutcome::Invalid(problems)
    }

    /// A reload step that did not finish (it panicked): reported as the reload's problem.
    fn internal_problem(&self, error: &tokio::task::JoinError) -> Problem {
        Problem {
            file: self.loaded.settings.seed.path.display().to_string(),
            line: None,
            path: String::new(),
            reason: format!("the reload did not finish: {error}"),
        }
    }

    async fn audit(&self, batch: &Batch, outcome: &ReloadOutcome) {
        let outcome = match outcome {
            ReloadOutcome::Loaded(_) => "ok".to_owned(),
            ReloadOutcome::Invalid(problems) => format!("error: {} problem(s)", problems.len()),
            ReloadOutcome::Unchanged | ReloadOutcome::Stopped => return,
        };
        let entry = AuditEntry {
            actor: batch.actor(),
            action: "seed.reload",
            target: self.loaded.settings.seed.path.display().to_string(),
            outcome,
        };
        audit::record(
            self.app.store.as_deref(),
            self.loaded.settings.admin.audit_max_entries,
            &entry,
        )
        .await;
    }
}

/// Reads and checks the seed of `loaded` as start does; `Ok(None)` when its bytes hash to
/// `running` (the running seed's digest, given when an unchanged file needs no reload).
fn read_catalog(
    loaded: &Loaded,
    running: Option<[u8; 32]>,
) -> Result<Option<Catalog>, Vec<Problem>> {
    let path = &loaded.settings.seed.path;
    let text = seed::read_file(path, loaded.settings.seed.max_bytes)?;
    let digest = service::seed_digest(&text);
    if running == Some(digest) {
        return Ok(None);
    }
    service::catalog_from_text(loaded, path, text, digest).map(Some)
}

/// Takes what a SIGHUP applies from a re-read `config`: its routes and the capability names they
/// are resolved with.
fn take_routes(running: &mut Loaded, config: Loaded) {
    running.routes = config.routes;
    running.capability_names = config.capability_names;
    running.settings.routes = config.settings.routes;
    running.settings.capabilities = config.settings.capabilities;
}

/// The config sections (top-level keys) that differ between the running config and a re-read
/// one, other than those a SIGHUP applies (`routes`, `capabilities`): each needs a restart.
/// `admin` also counts the tokens read from `admin.token_file`.
pub fn restart_sections(running: &Loaded, config: &Loaded) -> Vec<&'static str> {
    let old = &running.settings;
    // Named field by field: a new section cannot be forgotten here.
    let Settings {
        listen,
        redis,
        seed,
        tdl,
        cache,
        server,
        auth,
        limits,
        usage,
        admin,
        capabilities: _,
        log,
        routes: _,
    } = &config.settings;
    [
        ("listen", *listen != old.listen),
        ("redis", *redis != old.redis),
        ("seed", *seed != old.seed),
        ("tdl", *tdl != old.tdl),
        ("cache", *cache != old.cache),
        ("server", *server != old.server),
        ("auth", *auth != old.auth),
        ("limits", *limits != old.limits),
        ("usage", *usage != old.usage),
        (
            "admin",
            *admin != old.admin || config.admin != running.admin,
        ),
        ("log", *log != old.log),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

type SeedWatcher = Debouncer<RecommendedWatcher, RecommendedCache>;

/// Watches the directory of `seed` and asks `queue` for a reload after changes that concern it.
/// `None` (said at `warn`) when the directory cannot be watched: SIGHUP and the API still reload.
fn watch_seed(seed: &Path, queue: Arc<Queue>) -> Option<SeedWatcher> {
    let path = match std::path::absolute(seed) {
        Ok(path) => path,
        Err(error) => {
            tracing::warn!(%error, seed = %seed.display(), "seed.watch: cannot tell the seed's directory; reload with SIGHUP or POST /admin/reload");
            return None;
        }
    };
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        tracing::warn!(seed = %seed.display(), "seed.watch: the seed path names no file in a directory; reload with SIGHUP or POST /admin/reload");
        return None;
    };
    let (dir, name) = (dir.to_path_buf(), name.to_os_string());
    let (events_dir, events_name) = (dir.clone(), name.clone());
    let handler = move |result: DebounceEventResult| match result {
        Ok(events) => {
            // Looked up again each time: a swap may have changed what the path resolves through.
            let names = resolution_names(&events_dir, &events_name);
            if events
                .iter()
                .any(|e| concerns_seed(&e.event, &events_dir, &names))
            {
                queue.push(
                    ReloadTrigger::FileChange,
                    ReloadTrigger::FileChange.as_str(),
                    None,
                );
            }
        }
        Err(errors) => {
            for error in errors {
                tracing::warn!(%error, "seed.watch: watching the seed's directory failed");
            }
        }
    };
    let mut debouncer = match new_debouncer(DEBOUNCE, None, handler) {
        Ok(debouncer) => debouncer,
        Err(error) => {
            tracing::warn!(%error, "seed.watch: cannot watch files; reload with SIGHUP or POST /admin/reload");
            return None;
        }
    };
    if let Err(error) = debouncer.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!(%error, dir = %dir.display(), "seed.watch: cannot watch the seed's directory; reload with SIGHUP or POST /admin/reload");
        return None;
    }
    tracing::info!(dir = %dir.display(), "seed.watch: watching the seed's directory");
    Some(debouncer)
}

/// Whether a file event in `dir` may have changed the seed: it names one of `names` (see
/// [`resolution_names`]) or says events were lost. Reads (opening, closing unwritten) never do —
/// a reload's own read of the seed must not ask for another.
pub fn concerns_seed(event: &notify::Event, dir: &Path, names: &HashSet<OsString>) -> bool {
    if event.need_rescan() {
        return true;
    }
    if let EventKind::Access(kind) = event.kind
        && kind != AccessKind::Close(AccessMode::Write)
    {
        return false;
    }
    event.paths.iter().any(|path| {
        path.parent() == Some(dir) && path.file_name().is_some_and(|n| names.contains(n))
    })
}

/// The names in `dir` that the path `dir/name` resolves through: `name` itself and, where it is a
/// symbolic link into `dir`, each link on the way — for a Kubernetes ConfigMap volume
/// (`seed.yaml -> ..data/seed.yaml`, `..data -> ..2026_01_01_…`) `seed.yaml`, `..data` and the
/// current timestamped directory, so the `..data` swap is seen and other files are not.
pub fn resolution_names(dir: &Path, name: &OsStr) -> HashSet<OsString> {
    let mut names = HashSet::new();
    let mut next = Some(PathBuf::from(name));
    for _ in 0..MAX_LINKS {
        let Some(relative) = next.take() else {
            break;
        };
        let mut components = relative
            .components()
            .skip_while(|c| matches!(c, Component::CurDir));
        let Some(Component::Normal(first)) = components.next() else {
            break;
        };
        names.insert(first.to_os_string());
        let Ok(target) = std::fs::read_link(dir.join(first)) else {
            break;
        };
        let rest: PathBuf = components.collect();
        let resolved = if target.is_absolute() {
            target
        } else {
            dir.join(target)
        }
        .join(rest);
        next = resolved.strip_prefix(dir).ok().map(Path::to_path_buf);
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, Flag, ModifyKind, RenameMode};
    use notify::{Event, EventKind};

    fn event(kind: EventKind, paths: &[&Path]) -> Event {
        Event {
            kind,
            paths: paths.iter().map(|p| p.to_path_buf()).collect(),
            attrs: Default::default(),
        }
    }

    fn names(list: &[&str]) -> HashSet<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn only_events_about_the_names_the_seed_resolves_through_count() {
        let dir = Path::new("/etc/uma");
        let watched = names(&["seed.yaml", "..data"]);
        let seed = dir.join("seed.yaml");
        let data = dir.join("..data");
        let other = dir.join("notes.txt");
        let write = EventKind::Modify(ModifyKind::Data(DataChange::Content));
        assert!(concerns_seed(&event(write, &[&seed]), dir, &watched));
        assert!(!concerns_seed(&event(write, &[&other]), dir, &watched));
        // An editor's rename swap: `seed.yaml.tmp` → `seed.yaml`.
        let tmp = dir.join("seed.yaml.tmp");
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        assert!(concerns_seed(&event(rename, &[&tmp, &seed]), dir, &watched));
        assert!(!concerns_seed(
            &event(EventKind::Create(CreateKind::File), &[&tmp]),
            dir,
            &watched
        ));
        // The ConfigMap swap: `..data_tmp` renamed over `..data`.
        let data_tmp = dir.join("..data_tmp");
        assert!(concerns_seed(
            &event(rename, &[&data_tmp, &data]),
            dir,
            &watched
        ));
        assert!(concerns_seed(
            &event(EventKind::Create(CreateKind::Any), &[&data]),
            dir,
            &watched
        ));
        // The same name in another directory is another file.
        let elsewhere = Path::new("/etc/other/seed.yaml");
        assert!(!concerns_seed(&event(write, &[elsewhere]), dir, &watched));
    }

    #[test]
    fn reads_of_the_seed_never_ask_for_a_reload_but_a_closed_write_does() {
        let dir = Path::new("/srv");
        let seed = dir.join("seed.yaml");
        let watched = names(&["seed.yaml"]);
        for kind in [
            AccessKind::Open(AccessMode::Any),
            AccessKind::Read,
            AccessKind::Close(AccessMode::Read),
            AccessKind::Any,
        ] {
            assert!(
                !concerns_seed(&event(EventKind::Access(kind), &[&seed]), dir, &watched),
                "{kind:?}"
            );
        }
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert!(concerns_seed(&event(closed, &[&seed]), dir, &watched));
        let removed = EventKind::Remove(notify::event::RemoveKind::File);
        assert!(concerns_seed(&event(removed, &[&seed]), dir, &watched));
    }

    #[test]
    fn lost_events_count_as_a_change() {
        let dir = Path::new("/srv");
        let lost = Event::new(EventKind::Other).set_flag(Flag::Rescan);
        assert!(concerns_seed(&lost, dir, &names(&["seed.yaml"])));
        assert!(!concerns_seed(
            &Event::new(EventKind::Other),
            dir,
            &names(&["seed.yaml"])
        ));
    }

    #[test]
    fn a_plain_file_resolves_through_its_own_name_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("seed.yaml"), "consumers: []\n").unwrap();
        assert_eq!(
            resolution_names(dir.path(), OsStr::new("seed.yaml")),
            names(&["seed.yaml"])
        );
        // A missing file too (it may be created later).
        assert_eq!(
            resolution_names(dir.path(), OsStr::new("absent.yaml")),
            names(&["absent.yaml"])
        );
    }

    #[test]
    fn a_configmap_volume_resolves_through_data_and_the_current_directory() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("..2026_01_01_a")).unwrap();
        std::fs::write(root.join("..2026_01_01_a/seed.yaml"), "a").unwrap();
        symlink("..2026_01_01_a", root.join("..data")).unwrap();
        symlink("..data/seed.yaml", root.join("seed.yaml")).unwrap();
        std::fs::write(root.join("other.yaml"), "x").unwrap();
        assert_eq!(
            resolution_names(root, OsStr::new("seed.yaml")),
            names(&["seed.yaml", "..data", "..2026_01_01_a"])
        );
        // The swap Kubernetes makes: a new directory, `..data_tmp` renamed over `..data`.
        std::fs::create_dir(root.join("..2026_01_02_b")).unwrap();
        std::fs::write(root.join("..2026_01_02_b/seed.yaml"), "b").unwrap();
        symlink("..2026_01_02_b", root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        assert_eq!(
            resolution_names(root, OsStr::new("seed.yaml")),
            names(&["seed.yaml", "..data", "..2026_01_02_b"])
        );
    }

    #[test]
    fn links_out_of_the_directory_and_loops_end() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        symlink("/etc/hostname", root.join("seed.yaml")).unwrap();
        assert_eq!(
            resolution_names(root, OsStr::new("seed.yaml")),
            names(&["seed.yaml"])
        );
        symlink("b", root.join("a")).unwrap();
        symlink("a", root.join("b")).unwrap();
        assert_eq!(resolution_names(root, OsStr::new("a")), names(&["a", "b"]));
    }

    #[test]
    fn triggers_that_wait_together_make_one_reload() {
        let queue = Queue::default();
        assert!(queue.take().is_none());
        queue.push(ReloadTrigger::FileChange, "file", None);
        queue.push(ReloadTrigger::FileChange, "file", None);
        let batch = queue.take().expect("a reload waits");
        assert!(!batch.force, "a file change skips an unchanged seed");
        assert!(!batch.config, "a file change keeps the running config");
        assert_eq!(batch.actor(), "file");
        assert!(queue.take().is_none(), "taken once");

        let (first, first_outcome) = oneshot::channel();
        let (second, second_outcome) = oneshot::channel();
        queue.push(ReloadTrigger::FileChange, "file", None);
        queue.push(ReloadTrigger::Api, "ops", Some(first));
        queue.push(ReloadTrigger::Signal, "sighup", None);
        queue.push(ReloadTrigger::Api, "ops", Some(second));
        let batch = queue.take().expect("a reload waits");
        assert!(batch.force && batch.config);
        assert_eq!(batch.actor(), "file,ops,sighup");
        batch.answer(&ReloadOutcome::Unchanged);
        assert_eq!(first_outcome.blocking_recv(), Ok(ReloadOutcome::Unchanged));
        assert_eq!(second_outcome.blocking_recv(), Ok(ReloadOutcome::Unchanged));
    }

    #[test]
    fn a_closed_queue_answers_stopped() {
        let queue = Queue::default();
        let (waiting, waiting_outcome) = oneshot::channel();
        queue.push(ReloadTrigger::Api, "ops", Some(waiting));
        queue.close();
        assert_eq!(waiting_outcome.blocking_recv(), Ok(ReloadOutcome::Stopped));
        let (late, late_outcome) = oneshot::channel();
        queue.push(ReloadTrigger::Api, "ops", Some(late));
        assert_eq!(late_outcome.blocking_recv(), Ok(ReloadOutcome::Stopped));
        assert!(queue.take().is_none());
    }

    fn load(dir: &Path, toml: &str) -> Loaded {
        let path = dir.join("config.toml");
        std::fs::write(&path, toml).unwrap();
        Settings::load(Some(&path), Some(Default::default())).expect("config")
    }

    #[test]
    fn only_sections_a_sighup_does_not_apply_need_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let base = "[cache]\nlocal_ttl_ms = 100\n";
        let running = load(dir.path(), base);
        let same = load(dir.path(), base);
        assert!(restart_sections(&running, &same).is_empty());
        let routes = load(
            dir.path(),
            "[cache]\nlocal_ttl_ms = 100\n[capabilities]\nnames = [\"a\", \"b\"]\n[[routes]]\nprefix = \"/x\"\nrequire_capabilities = [\"b\"]\n",
        );
        assert!(restart_sections(&running, &routes).is_empty());
        let mut next = running.clone();
        take_routes(&mut next, routes);
        assert_eq!(next.routes.len(), 1);
        assert_eq!(next.routes[0].require_capabilities, vec![1]);
        assert_eq!(next.settings.cache, running.settings.cache);
        let other = load(
            dir.path(),
            "listen = \"127.0.0.1:9\"\n[cache]\nlocal_ttl_ms = 200\n[log]\nlevel = \"debug\"\n",
        );
        assert_eq!(
            restart_sections(&running, &other),
            vec!["listen", "cache", "log"]
        );
    }
}
