//! Harness for federation tests: a Hearth serving TLS under an IP-literal server name, and
//! curl for HTTPS requests to self-signed peers.
#![allow(dead_code)]

use std::process::Command;

use serde_json::{json, Value};

/// A self-signed certificate for 127.0.0.1 (P-256), made with the machine's openssl:
/// (certificate path, key path) inside `dir`.
pub fn self_signed_cert(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1"])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is installed");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    (cert, key)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// curl for one HTTPS request to a self-signed peer, with the method and token set.
pub fn curl_command(method: &str, token: Option<&str>) -> Command {
    let mut cmd = Command::new("curl");
    cmd.args(["-sk", "--max-time", "60", "-X", method]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    cmd
}

/// One HTTPS request with curl (self-signed peers): (status, JSON body).
pub fn curl(method: &str, url: &str, token: Option<&str>, body: Option<&Value>) -> (u16, Value) {
    let mut cmd = curl_command(method, token);
    cmd.args(["-w", "\n%{http_code}"]);
    if let Some(b) = body {
        cmd.args([
            "-H",
            "Content-Type: application/json",
            "--data",
            &b.to_string(),
        ]);
    }
    let out = cmd.arg(url).output().expect("curl runs");
    status_and_json(&out.stdout)
}

/// curl's output with `-w "\n%{http_code}"`: (status, JSON body or Null).
fn status_and_json(stdout: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// One HTTPS request with curl, with these headers and these exact body bytes (which need
/// not be JSON): (status, JSON body or Null).
pub fn curl_raw(method: &str, url: &str, headers: &[String], body: &[u8]) -> (u16, Value) {
    use std::io::Write;
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sk",
        "--max-time",
        "60",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
    ]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let mut child = cmd
        .args(["--data-binary", "@-"])
        .arg(url)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl runs");
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().expect("curl runs");
    status_and_json(&out.stdout)
}

/// One HTTPS request with curl, body as bytes (media): (status, body). `upload` is sent as
/// an `image/png` body.
pub fn curl_bytes(method: &str, url: &str, token: &str, upload: Option<&[u8]>) -> (u16, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("body");
    let mut cmd = curl_command(method, Some(token));
    cmd.args(["-w", "%{http_code}", "-o"]).arg(&out);
    if let Some(b) = upload {
        let file = dir.path().join("upload");
        std::fs::write(&file, b).unwrap();
        cmd.args(["-H", "Content-Type: image/png", "--data-binary"])
            .arg(format!("@{}", file.display()));
    }
    let res = cmd.arg(url).output().expect("curl runs");
    let status = String::from_utf8_lossy(&res.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (status, std::fs::read(&out).unwrap_or_default())
}

pub fn register(base: &str, name: &str) -> (String, String) {
    let (s, v) = curl(
        "POST",
        &format!("{base}/_matrix/client/v3/register"),
        None,
        Some(
            &json!({ "username": name, "password": format!("pw-{name}-long-enough"), "auth": { "type": "m.login.dummy" } }),
        ),
    );
    assert_eq!(s, 200, "register {name} at {base}: {v}");
    (
        v["user_id"].as_str().unwrap().to_owned(),
        v["access_token"].as_str().unwrap().to_owned(),
    )
}

/// A public room created on the server at `base` by `token`'s user, in room `version` if
/// given; its ID.
pub fn create_public_room(base: &str, token: &str, version: Option<&str>) -> String {
    let mut body = json!({ "preset": "public_chat" });
    if let Some(v) = version {
        body["room_version"] = v.into();
    }
    let (s, v) = curl(
        "POST",
        &format!("{base}/_matrix/client/v3/createRoom"),
        Some(token),
        Some(&body),
    );
    assert_eq!(s, 200, "{v}");
    v["room_id"].as_str().unwrap().to_owned()
}

/// `/joined_members` on `base`, given up after `secs` seconds: None if it did not answer.
pub fn joined_members_within(
    base: &str,
    token: &str,
    room: &str,
    secs: u64,
) -> Option<Vec<String>> {
    let out = curl_command("GET", Some(token))
        .args(["--max-time", &secs.to_string(), "-w", "\n%{http_code}"])
        .arg(format!(
            "{base}/_matrix/client/v3/rooms/{}/joined_members",
            super::enc(room)
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n')?;
    if code != "200" {
        return None;
    }
    let v: Value = serde_json::from_str(body).ok()?;
    let mut m: Vec<String> = v["joined"].as_object()?.keys().cloned().collect();
    m.sort();
    Some(m)
}

/// Hashes and signs `obj` with `app`'s key, as its origin server would: its event ID.
pub fn sign_as(
    app: &hearth::App,
    obj: &mut ruma::CanonicalJsonObject,
    rules: &ruma::room_version_rules::RoomVersionRules,
) -> String {
    ruma::signatures::hash_and_sign_event(
        app.server_name.as_str(),
        &app.local.key.pair,
        obj,
        &rules.redaction,
    )
    .unwrap();
    format!("${}", ruma::signatures::reference_hash(obj, rules).unwrap())
}

/// A Hearth serving TLS on a fixed port, with `127.0.0.1:PORT` as its server name.
pub struct Hearth {
    pub hs: hearth::Homeserver,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Hearth {
    pub fn start() -> Self {
        Self::start_with("127.0.0.1", |_| {})
    }

    /// A Hearth named `host:PORT` (e.g. `localhost`, which server ACLs can tell apart from
    /// the IP literals), with `tweak` applied to its config.
    pub fn start_with(host: &str, tweak: impl FnOnce(&mut hearth::Config)) -> Self {
        let _ = env_logger::builder().is_test(true).try_init();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed_cert(dir.path());
        let port = free_port();
        let mut c = super::config_in(dir.path());
        c.server_name = format!("127.0.0.1:{port}");
        c.listen = vec![format!("127.0.0.1:{port}").parse().unwrap()];
        c.tls_cert = Some(cert);
        c.tls_key = Some(key);
        c.federation.verify_certificates = false;
        c.server_name = format!("{host}:{port}");
        tweak(&mut c);
        let hs = hearth::Homeserver::start(c).unwrap();
        Self {
            hs,
            port,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

impl Hearth {
    pub fn server_name(&self) -> String {
        self.hs.server_name().to_owned()
    }
}

/// A Hearth run as its own process (the `hearth` binary), so a test can SIGKILL it and start
/// it again on the same database, key and port.
pub struct HearthProcess {
    pub port: u16,
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
}

impl HearthProcess {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        self_signed_cert(dir.path());
        let mut h = Self {
            port: free_port(),
            child: None,
            dir,
        };
        h.spawn();
        h
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("hearth.log"))
            .unwrap();
        let addr = format!("127.0.0.1:{}", self.port);
        let child = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .arg("--database")
            .arg(d.join("hearth.db"))
            .arg("--tls-cert")
            .arg(d.join("cert.pem"))
            .arg("--tls-key")
            .arg(d.join("key.pem"))
            .args(["--listen", &addr, "--server-name", &addr])
            .args(["--no-rate-limit", "--insecure-federation-tls"])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the hearth binary starts");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while curl(
            "GET",
            &format!("{}/_matrix/client/versions", self.url()),
            None,
            None,
        )
        .0 != 200
        {
            assert!(
                std::time::Instant::now() < deadline,
                "hearth did not start: {}",
                self.log_tail()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// SIGKILL: no shutdown, no checkpoint, whatever was in flight is cut off.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL on Unix
            c.wait().unwrap();
        }
    }

    /// Starts it again on the same database and port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        self.spawn();
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn server_name(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Its database file (to read while it is down).
    pub fn db_path(&self) -> std::path::PathBuf {
        self.dir.path().join("hearth.db")
    }

    /// Rows waiting in its federation outbox, read from its database while it is down.
    pub fn outbox_rows(&self) -> i64 {
        assert!(self.child.is_none(), "stop it first");
        let c = rusqlite::Connection::open(self.dir.path().join("hearth.db")).unwrap();
        c.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
            .unwrap()
    }

    /// Its database, opened while it is down.
    pub fn db(&self) -> rusqlite::Connection {
        assert!(self.child.is_none(), "stop it first");
        rusqlite::Connection::open(self.dir.path().join("hearth.db")).unwrap()
    }

    /// Its whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hearth.log")).unwrap_or_default()
    }

    /// The end of its log (for failure messages).
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("hearth.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for HearthProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
