//! The command line (SPEC §2): `serve` (default), `check`, `hash-key`.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::admin::ReloadTrigger;
use crate::clock::SystemClock;
use crate::config::{Loaded, Settings};
use crate::core::KeyHash;
use crate::core::decide::Catalog;
use crate::problem::Problem;
use crate::service;

#[derive(Debug, Parser)]
#[command(
    name = "user-metadata-auth",
    version,
    about = "Forward-auth for AI gateways: API key -> X-User-* metadata headers"
)]
pub struct Cli {
    /// Configuration file (default: config/default.toml, built-in defaults when it is missing).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service (the default).
    Serve,
    /// Validate config and seed, print a summary or every problem found.
    Check {
        /// Seed file to check instead of the configured `seed.path`.
        #[arg(long, value_name = "FILE")]
        seed: Option<PathBuf>,
    },
    /// Print a key's stored form (lower-case hex SHA-256), for `key_sha256` in the seed.
    /// Give `-` to read the key from standard input, keeping it out of the process list.
    HashKey { key: String },
}

pub fn run() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cli.config.as_deref()),
        Command::Check { seed } => check(cli.config.as_deref(), seed.as_deref()),
        Command::HashKey { key } => hash_key(&key),
    }
}

fn hash_key(key: &str) -> ExitCode {
    let key = if key == "-" {
        let mut input = String::new();
        if let Err(e) = std::io::stdin().read_to_string(&mut input) {
            eprintln!("error: cannot read the key from standard input: {e}");
            return ExitCode::FAILURE;
        }
        input.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        key.to_owned()
    };
    if key.is_empty() {
        eprintln!("error: the key is empty");
        return ExitCode::FAILURE;
    }
    println!("{}", KeyHash::of(&key).to_hex());
    ExitCode::SUCCESS
}

/// Config and seed, with every problem of both collected.
fn load_all(config: Option<&Path>, seed: Option<&Path>) -> Result<(Loaded, Catalog), Vec<Problem>> {
    let loaded = Settings::load(config, None);
    let seed_path = seed
        .map(Path::to_path_buf)
        .or_else(|| loaded.as_ref().ok().map(|l| l.settings.seed.path.clone()));
    let seed_path = seed_path.unwrap_or_else(|| Settings::default().seed.path);
    match loaded {
        Ok(loaded) => {
            let catalog = service::load_catalog(&loaded, Some(&seed_path))?;
            Ok((loaded, catalog))
        }
        Err(mut problems) => {
            // The configured limit is unknown when the config is invalid: the default applies.
            let max_bytes = Settings::default().seed.max_bytes;
            if let Err(seed_problems) = crate::seed::load_file(
                &seed_path,
                &crate::seed::SeedRules {
                    max_bytes,
                    capability_names: Default::default(),
                },
            ) {
                problems.extend(seed_problems);
            }
            Err(problems)
        }
    }
}

fn print_problems(problems: &[Problem]) {
    for problem in problems {
        eprintln!("error: {problem}");
    }
    eprintln!("{} problem(s) found", problems.len());
}

fn summary(loaded: &Loaded, catalog: &Catalog) -> String {
    format!(
        "ok: {} consumers, {} keys, {} metadata entries ({} with limits), {} seed routes, {} config routes (seed {})",
        catalog.consumers.len(),
        catalog.by_key.len(),
        catalog.entry_count(),
        catalog.entries_with_limits(),
        catalog.policy.seed_routes.len(),
        catalog.policy.config_routes.len(),
        loaded.settings.seed.path.display()
    )
}

fn check(config: Option<&Path>, seed: Option<&Path>) -> ExitCode {
    match load_all(config, seed) {
        Ok((mut loaded, catalog)) => {
            if let Some(seed) = seed {
                loaded.settings.seed.path = seed.to_path_buf();
            }
            for warning in service::pin_warnings(&loaded, &catalog) {
                eprintln!("warning: {warning}");
            }
            println!("{}", summary(&loaded, &catalog));
            for line in service::capability_requirements(&catalog) {
                println!("  {line}");
            }
            ExitCode::SUCCESS
        }
        Err(problems) => {
            print_problems(&problems);
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Option<&Path>) -> ExitCode {
    let (loaded, catalog) = match load_all(config, None) {
        Ok(pair) => pair,
        Err(problems) => {
            print_problems(&problems);
            return ExitCode::FAILURE;
        }
    };
    crate::logging::init(&loaded.settings.log);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if loaded.settings.server.workers > 0 {
        runtime.worker_threads(loaded.settings.server.workers);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve_until_signal(loaded, catalog))
}

async fn serve_until_signal(loaded: Loaded, catalog: Catalog) -> ExitCode {
    for warning in service::pin_warnings(&loaded, &catalog) {
        tracing::warn!("{warning}");
    }
    tracing::info!("{}", summary(&loaded, &catalog));
    if !loaded.redis_configured() {
        tracing::info!("redis.url is empty: embedded mode (seed, in-process cache and counters)");
    }
    let shutdown = shutdown_signal();
    let hangup = keep_serving_on_other_signals();
    let (app, background) = service::build_app(&loaded, catalog, Arc::new(SystemClock));
    let reloader = service::start_reloader(&loaded, &app, &background);
    if let Some(mut hangup) = hangup {
        let reloader = reloader.clone();
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the config file's routes and the seed");
                reloader.request(ReloadTrigger::Signal);
            }
        });
    }
    let (listener, addr) = match crate::http::bind(loaded.listen).await {
        Ok(bound) => bound,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", loaded.listen);
            return ExitCode::FAILURE;
        }
    };
    // Bound before the service says it listens: a taken admin port is an exit, not a half start.
    let admin = match service::build_admin(&loaded, &app, &reloader) {
        Some((listen, admin)) => match crate::http::bind(listen).await {
            Ok((admin_listener, admin_addr)) => Some((admin_listener, admin_addr, admin)),
            Err(e) => {
                eprintln!("error: cannot listen on {listen} (admin.listen): {e}");
                return ExitCode::FAILURE;
            }
        },
        None => {
            match &loaded.settings.admin.token_file {
                // Allowed (an optional Kubernetes Secret not created), but said: a mistyped path
                // would otherwise close the admin API without a word.
                Some(path) => tracing::warn!(
                    token_file = %path.display(),
                    "admin.token_file does not exist and admin.token is not set: admin API closed"
                ),
                None => tracing::info!(
                    "no admin token set (admin.token, admin.token_file): admin API closed"
                ),
            }
            None
        }
    };
    tracing::info!(%addr, "listening");
    let options = service::serve_options(&loaded);
    let (stopping, mut stop_admin) = tokio::sync::watch::channel(false);
    let admin = admin.map(|(admin_listener, admin_addr, admin)| {
        tracing::info!(addr = %admin_addr, "admin API open");
        tokio::spawn(crate::http::serve(
            admin_listener,
            admin,
            options,
            async move {
                let _ = stop_admin.wait_for(|s| *s).await;
            },
        ))
    });
    let draining = app.clone();
    let shutdown = async move {
        shutdown.await;
        // Not ready from the signal on, so a load balancer stops sending while connections drain.
        draining.ready.begin_shutdown();
        let _ = stopping.send(true);
    };
    crate::http::serve(listener, app, options, shutdown).await;
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    background.stop().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// SIGTERM or SIGINT. The handlers are installed here, before the listener is announced, so a
/// signal sent as soon as the service says it listens is never lost to the default action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        match (terminate, interrupt) {
            (Ok(mut terminate), Ok(mut interrupt)) => tokio::select! {
                _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
            },
            _ => {
                tracing::warn!("cannot install signal handlers; stop with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
}

/// SIGHUP, SIGUSR1 and SIGUSR2 never stop the service (SPEC §2), yet their default action is to
/// kill the process, counters unflushed. Handled here, before the listener is announced, for the
/// same reason as [`shutdown_signal`]: SIGUSR1 and SIGUSR2 are logged and ignored; SIGHUP's
/// stream is returned for the reloader (SPEC §10), which exists only once the service is built —
/// a SIGHUP received meanwhile waits in it.
fn keep_serving_on_other_signals() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    let hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => Some(hangup),
        Err(error) => {
            tracing::warn!(%error, "cannot handle SIGHUP; it would stop the service (reload with POST /admin/reload)");
            None
        }
    };
    let signals = [
        (SignalKind::user_defined1(), "SIGUSR1: ignored"),
        (SignalKind::user_defined2(), "SIGUSR2: ignored"),
    ];
    for (kind, message) in signals {
        match signal(kind) {
            Ok(mut received) => {
                tokio::spawn(async move {
                    while received.recv().await.is_some() {
                        tracing::info!("{message}");
                    }
                });
            }
            Err(error) => {
                tracing::warn!(%error, "cannot handle a signal; it would stop the service: {message}")
            }
        }
    }
    hangup
}
