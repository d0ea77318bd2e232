//! A real Synapse 1.163 for federation tests (`../shared/synapse-peer/`, loopback, TLS,
//! IP-literal server names), and polling helpers for what it eventually sees.
#![allow(dead_code)]

use std::{path::PathBuf, process::Command, time::Duration};

use serde_json::Value;

use super::fed::curl;

fn peer_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/synapse-peer")
}

/// One Synapse, stopped and its directory purged on drop (unless started by someone else).
pub struct Synapse {
    /// The synapse-peer instance name; empty for a Synapse this process does not own.
    pub name: String,
    pub port: u16,
}

impl Synapse {
    /// A fresh Synapse (new database and keys) on a free port.
    pub fn start() -> Self {
        let port = super::fed::free_port();
        let s = Self {
            name: format!("hearth-fed-{port}"),
            port,
        };
        s.run_start(true);
        s.stop_when_this_process_exits();
        s
    }

    /// A watcher that stops and purges this Synapse once the test process is gone, however
    /// it ends: a run of only some of a file's tests (the last-test count is never reached),
    /// a panic outside a test, a killed run. After a normal end it finds nothing to stop.
    fn stop_when_this_process_exits(&self) {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; SYNPEER_PURGE=1 bash {stop} {name}",
            pid = std::process::id(),
            stop = peer_dir().join("stop.sh").display(),
            name = self.name,
        );
        let spawned = Command::new("setsid")
            .args(["bash", "-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if let Err(e) = spawned {
            eprintln!("no watcher for Synapse {}: {e}", self.name);
        }
    }

    /// A Synapse started by someone else (e.g. `scripts/test.sh`), never stopped here.
    pub fn shared(port: u16) -> Self {
        Self {
            name: String::new(),
            port,
        }
    }

    fn run_start(&self, reset: bool) {
        let mut cmd = Command::new("bash");
        cmd.arg(peer_dir().join("start.sh"))
            .args([&self.name, &self.port.to_string()]);
        if reset {
            cmd.env("SYNPEER_RESET", "1");
        }
        let out = cmd.output().expect("synapse-peer/start.sh runs");
        assert!(
            out.status.success(),
            "starting Synapse failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops it (SIGTERM), keeping its database, keys and config.
    pub fn stop(&self) {
        assert!(!self.name.is_empty(), "not ours to stop");
        let out = Command::new("bash")
            .arg(peer_dir().join("stop.sh"))
            .arg(&self.name)
            .output()
            .expect("synapse-peer/stop.sh runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts it again on the same database, keys and port after [`Synapse::stop`].
    pub fn restart(&self) {
        assert!(!self.name.is_empty(), "not ours to start");
        self.run_start(false);
    }

    /// A public room created on this Synapse by `token`'s user, in room version 10 (Synapse
    /// defaults to 12, which Hearth does not support); its ID.
    pub fn create_public_room(&self, token: &str) -> String {
        super::fed::create_public_room(&self.url(), token, Some("10"))
    }

    pub fn server_name(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Bodies of the `m.room.message` events of a room, oldest first, as `token`'s user sees
    /// them through Synapse's client API (`/messages`, topological order), at most `limit`.
    pub fn bodies(&self, token: &str, room: &str, limit: usize) -> Vec<String> {
        room_bodies(&self.url(), token, room, limit)
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        let _ = Command::new("bash")
            .arg(peer_dir().join("stop.sh"))
            .arg(&self.name)
            .env("SYNPEER_PURGE", "1")
            .output();
    }
}

/// Bodies of the `m.room.message` events of a room, oldest first, through any server's client
/// API (`/messages` backwards from the end, then reversed), at most `limit`.
pub fn room_bodies(base: &str, token: &str, room: &str, limit: usize) -> Vec<String> {
    let (s, v) = curl(
        "GET",
        &format!(
            "{base}/_matrix/client/v3/rooms/{}/messages?dir=b&limit={limit}",
            super::enc(room)
        ),
        Some(token),
        None,
    );
    assert_eq!(s, 200, "/messages at {base}: {v}");
    let mut out: Vec<String> = v["chunk"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter(|e| e["type"] == "m.room.message")
                .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    out.reverse();
    out
}

/// Polls `f` until it returns `Some`, for at most `secs` seconds.
pub fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Timeline events of a room in a sync response.
pub fn timeline(v: &Value, room: &str) -> Vec<Value> {
    v["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The one Synapse of a test file (CI has 2 cores: one Synapse per file, not per test),
/// lent to its tests one at a time. A test binary has no "after all" hook, so each test's
/// [`Turn`] counts itself when dropped (a failing test too) and the last one stops it.
pub struct PerFile {
    synapse: std::sync::OnceLock<std::sync::Mutex<Option<Synapse>>>,
    done: std::sync::atomic::AtomicUsize,
    tests: usize,
    start: fn() -> Synapse,
}

impl PerFile {
    /// `tests`: how many tests of the file take a turn; `start`: how to get the Synapse.
    pub const fn new(tests: usize, start: fn() -> Synapse) -> Self {
        Self {
            synapse: std::sync::OnceLock::new(),
            done: std::sync::atomic::AtomicUsize::new(0),
            tests,
            start,
        }
    }

    /// Waits for the Synapse (started on first use) to be free and lends it.
    pub fn turn(&'static self) -> Turn {
        let guard = self
            .synapse
            .get_or_init(|| std::sync::Mutex::new(Some((self.start)())))
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Turn {
            guard: Some(guard),
            file: self,
        }
    }
}

/// One test's use of its file's Synapse.
pub struct Turn {
    guard: Option<std::sync::MutexGuard<'static, Option<Synapse>>>,
    file: &'static PerFile,
}

impl std::ops::Deref for Turn {
    type Target = Synapse;

    fn deref(&self) -> &Synapse {
        self.guard
            .as_ref()
            .and_then(|g| g.as_ref())
            .expect("the Synapse is stopped after the file's last test")
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let done = self
            .file
            .done
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(mut g) = self.guard.take() {
            if done + 1 == self.file.tests {
                drop(g.take());
            }
        }
    }
}
