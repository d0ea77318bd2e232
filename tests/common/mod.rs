//! Shared test harness: a real server on an ephemeral port in a temp directory, and a tiny
//! JSON client.
#![allow(dead_code)]

pub mod fed;
pub mod front;
pub mod synapse;

use std::time::Duration;

use serde_json::{json, Value};

pub struct TestServer {
    pub hs: Option<hearth::Homeserver>,
    pub base: String,
    pub dir: tempfile::TempDir,
}

pub fn config_in(dir: &std::path::Path) -> hearth::Config {
    let mut c = hearth::Config {
        database: dir.join("hearth.db"),
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        server_name: "hearth.test".into(),
        ..Default::default()
    };
    c.rate_limits.enabled = false;
    c
}

impl TestServer {
    pub fn start() -> Self {
        Self::start_with(|_| {})
    }

    pub fn start_with(f: impl FnOnce(&mut hearth::Config)) -> Self {
        Self::start_with_clock(f, std::sync::Arc::new(hearth::SystemClock))
    }

    /// A server whose clock the test sets (see [`ManualClock`]).
    pub fn start_with_clock(
        f: impl FnOnce(&mut hearth::Config),
        clock: std::sync::Arc<dyn hearth::Clock>,
    ) -> Self {
        let _ = env_logger::builder().is_test(true).try_init();
        let dir = tempfile::tempdir().unwrap();
        let mut c = config_in(dir.path());
        f(&mut c);
        let hs = hearth::Homeserver::start_with_clock(c, clock).unwrap();
        let base = format!("http://{}", hs.addrs()[0]);
        Self {
            hs: Some(hs),
            base,
            dir,
        }
    }

    pub fn hs(&self) -> &hearth::Homeserver {
        self.hs.as_ref().unwrap()
    }

    /// Any request; returns (status, JSON body or Null).
    pub fn req(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        self.raw(method, path, token, body.map(|b| b.to_string()).as_deref())
    }

    pub fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, Value) {
        let url = format!("{}{}", self.base, path);
        let mut r = ureq::request(method, &url).timeout(Duration::from_secs(60));
        if let Some(t) = token {
            r = r.set("Authorization", &format!("Bearer {t}"));
        }
        let res = match body {
            Some(b) => r.set("Content-Type", "application/json").send_string(b),
            None => r.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let text = resp.into_string().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Expects 200 and returns the body.
    pub fn ok(&self, method: &str, path: &str, token: Option<&str>, body: Option<&Value>) -> Value {
        let (s, v) = self.req(method, path, token, body);
        assert_eq!(s, 200, "{method} {path} -> {s} {v}");
        v
    }

    /// Expects an error status and errcode.
    pub fn err(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        status: u16,
        errcode: &str,
    ) -> Value {
        let (s, v) = self.req(method, path, token, body);
        assert_eq!(
            (s, v["errcode"].as_str().unwrap_or("")),
            (status, errcode),
            "{method} {path} -> {s} {v}"
        );
        v
    }

    /// Registers `name` with password `pw-<name>`; returns (user_id, access_token).
    pub fn register(&self, name: &str) -> (String, String) {
        let v = self.ok(
            "POST",
            "/_matrix/client/v3/register",
            None,
            Some(&json!({ "username": name, "password": format!("pw-{name}"), "auth": { "type": "m.login.dummy" } })),
        );
        (
            v["user_id"].as_str().unwrap().to_owned(),
            v["access_token"].as_str().unwrap().to_owned(),
        )
    }

    pub fn create_room(&self, token: &str, body: Value) -> String {
        self.ok(
            "POST",
            "/_matrix/client/v3/createRoom",
            Some(token),
            Some(&body),
        )["room_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// `token`'s user joins `room`.
    pub fn join(&self, token: &str, room: &str) {
        let path = format!("/_matrix/client/v3/join/{}", enc(room));
        self.ok("POST", &path, Some(token), Some(&json!({})));
    }

    pub fn send(&self, token: &str, room: &str, txn: &str, body: &str) -> String {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            enc(room)
        );
        self.ok(
            "PUT",
            &path,
            Some(token),
            Some(&json!({ "msgtype": "m.text", "body": body })),
        )["event_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub fn sync(&self, token: &str, query: &str) -> Value {
        self.ok(
            "GET",
            &format!("/_matrix/client/v3/sync?{query}"),
            Some(token),
            None,
        )
    }
}

/// A clock the test moves by hand (expiries without sleeping).
pub struct ManualClock(pub std::sync::atomic::AtomicU64);

impl ManualClock {
    pub fn new(ms: u64) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self(std::sync::atomic::AtomicU64::new(ms)))
    }
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl hearth::Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Percent-encodes a path segment.
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Bodies of the timeline events of a joined room in a sync response.
pub fn timeline_bodies(sync: &Value, room: &str) -> Vec<String> {
    sync["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
