//! TDL slots and dates through the real server, in process, with an injected clock: a zone with a
//! non-zero offset (Asia/Seoul, UTC+9) and the local day rollover.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;
use user_metadata_auth::clock::ManualClock;
use user_metadata_auth::config::Settings;
use user_metadata_auth::service::{self, Running};

/// The real server on a free port, in a runtime of its own, with the clock the test holds.
struct InProcess {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    fn start(timezone: &str, clock: Arc<ManualClock>) -> InProcess {
        let env: HashMap<String, String> = [
            ("UMA_LISTEN", "127.0.0.1:0".to_owned()),
            ("UMA_REDIS__URL", String::new()),
            ("UMA_TDL__TIMEZONE", timezone.to_owned()),
            (
                "UMA_SEED__PATH",
                manifest_dir()
                    .join("config/seed.yaml")
                    .display()
                    .to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let loaded = Settings::load(Some(&manifest_dir().join("config/default.toml")), Some(env))
            .expect("config");
        let catalog = service::load_catalog(&loaded, None).expect("seed");
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let built = service::build_app(&loaded, catalog, clock);
                let running = Running::start(&loaded, built).await.expect("bind");
                addr_tx.send(running.addr).unwrap();
                let _ = stopped.await;
                running.stop().await;
            });
        });
        let addr = addr_rx.recv().expect("server address");
        InProcess {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn auth(&self, key: &str, uri: &str) -> Response {
        request(
            self.addr,
            "GET",
            "/auth",
            &[("apikey", key), ("X-Forwarded-Uri", uri)],
        )
    }

    fn tdl(&self, key: &str) -> serde_json::Value {
        request(self.addr, "GET", "/api/tdl-matrix", &[("apikey", key)]).json()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn ts(s: &str) -> jiff::Timestamp {
    s.parse().unwrap()
}

fn usage(tdl: &serde_json::Value, id: &str) -> Vec<u64> {
    let entry = tdl["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id)
        .unwrap();
    (1..=12)
        .map(|i| entry["usage"][format!("T{i}")].as_u64().unwrap())
        .collect()
}

#[test]
fn seoul_slots_and_local_midnight() {
    // 14:30 UTC = 23:30 in Seoul: the last slot (T12) of the 27th.
    let clock = Arc::new(ManualClock::new(ts("2026-11-27T14:30:00Z")));
    let server = InProcess::start("Asia/Seoul", clock.clone());
    for _ in 0..2 {
        assert_eq!(server.auth(USER1_KEY, "/midm-base/chat").status, 200);
    }
    let tdl = server.tdl(USER1_KEY);
    assert_eq!(tdl["timezone"], "Asia/Seoul");
    assert_eq!(tdl["date"], "2026-11-27");
    assert_eq!(tdl["slot"], "T12");
    assert_eq!(
        usage(&tdl, "kt-midm-base"),
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    );

    // 15:00 UTC is local midnight: a new day whose T1 starts from zero.
    clock.set(ts("2026-11-27T15:00:00Z"));
    let tdl = server.tdl(USER1_KEY);
    assert_eq!(tdl["date"], "2026-11-28");
    assert_eq!(tdl["slot"], "T1");
    assert_eq!(usage(&tdl, "kt-midm-base").iter().sum::<u64>(), 0);
    assert_eq!(server.auth(USER1_KEY, "/midm-base/chat").status, 200);
    // 03:10 local (18:10 UTC) is T2.
    clock.set(ts("2026-11-27T18:10:00Z"));
    assert_eq!(server.auth(USER1_KEY, "/midm-base/chat").status, 200);
    let tdl = server.tdl(USER1_KEY);
    assert_eq!(tdl["slot"], "T2");
    assert_eq!(
        usage(&tdl, "kt-midm-base"),
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
}

#[test]
fn utc_slot_boundaries() {
    let clock = Arc::new(ManualClock::new(ts("2026-11-27T01:59:59Z")));
    let server = InProcess::start("UTC", clock.clone());
    assert_eq!(server.auth(ADMIN_KEY, "/gpt4o/chat").status, 200);
    clock.set(ts("2026-11-27T02:00:00Z"));
    assert_eq!(server.auth(ADMIN_KEY, "/gpt4o/chat").status, 200);
    assert_eq!(server.auth(ADMIN_KEY, "/gpt4o/chat").status, 200);
    clock.set(ts("2026-11-27T23:59:59Z"));
    assert_eq!(server.auth(ADMIN_KEY, "/gpt4o/chat").status, 200);
    let tdl = server.tdl(ADMIN_KEY);
    assert_eq!(tdl["date"], "2026-11-27");
    assert_eq!(tdl["slot"], "T12");
    assert_eq!(
        usage(&tdl, "azure-gpt4o"),
        [1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    );
    assert_eq!(usage(&tdl, "kt-midm-base"), [0; 12]);
}
