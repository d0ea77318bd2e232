//! The Synapse peer for federation tests (`../shared/synapse-peer/`): one per test file,
//! shared by its tests, stopped after the last one.
#![allow(dead_code)]

use std::{
    path::PathBuf,
    process::Command,
    sync::{Mutex, OnceLock},
};

pub fn peer_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/synapse-peer")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Synapse for this test file, stopped (and its directory purged) when the process exits.
pub struct Synapse {
    name: String,
    pub port: u16,
}

impl Synapse {
    pub fn start() -> Self {
        let port = free_port();
        let name = format!("hearth-fed-{port}");
        let out = Command::new("bash")
            .arg(peer_dir().join("start.sh"))
            .args([&name, &port.to_string()])
            .env("SYNPEER_RESET", "1")
            .output()
            .expect("synapse-peer/start.sh runs");
        assert!(
            out.status.success(),
            "starting Synapse failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Self { name, port }
    }

    pub fn server_name(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return; // started by scripts/test.sh, which stops it
        }
        let _ = Command::new("bash")
            .arg(peer_dir().join("stop.sh"))
            .arg(&self.name)
            .env("SYNPEER_PURGE", "1")
            .output();
    }
}

/// The Synapse this file's tests share: the one `scripts/test.sh` started (its port in
/// `HEARTH_TEST_SYNAPSE_PORT`, stopped by the script), or else one started here.
pub fn synapse() -> &'static Mutex<Option<Synapse>> {
    static S: OnceLock<Mutex<Option<Synapse>>> = OnceLock::new();
    S.get_or_init(|| {
        let shared = std::env::var("HEARTH_TEST_SYNAPSE_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .map(|port: u16| Synapse {
                name: String::new(),
                port,
            });
        Mutex::new(Some(shared.unwrap_or_else(Synapse::start)))
    })
}

/// Stops a Synapse started here when the last of a file's `n` tests finishes (a test binary
/// has no "after all" hook): each test holds a `Finished(n)`, counted on drop, so a failing
/// test counts too.
pub struct Finished(pub usize);

impl Drop for Finished {
    fn drop(&mut self) {
        static DONE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        if DONE.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == self.0 {
            let taken = synapse().lock().unwrap_or_else(|p| p.into_inner()).take();
            drop(taken);
        }
    }
}
