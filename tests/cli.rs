//! The `hearth` binary: `user create`, start on flags, clean exit on SIGTERM.
mod common;
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_hearth");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn user_create_then_serve_then_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("h.db");
    let port = free_port();
    let common = [
        "--database",
        db.to_str().unwrap(),
        "--server-name",
        "cli.test",
    ];
    let out = Command::new(BIN)
        .args(common)
        .args(["user", "create", "root", "--password", "pw", "--admin"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("@root:cli.test"));
    let again = Command::new(BIN)
        .args(common)
        .args(["user", "create", "root"])
        .output()
        .unwrap();
    assert!(!again.status.success(), "a duplicate user is refused");

    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(common)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--registration",
            "closed",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let mut up = false;
    while started.elapsed() < Duration::from_secs(10) {
        if ureq::get(&format!("{base}/_matrix/client/versions"))
            .call()
            .is_ok()
        {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(up, "server answered /versions");
    let v: serde_json::Value = ureq::post(&format!("{base}/_matrix/client/v3/login"))
        .send_json(json!({ "type": "m.login.password", "user": "root", "password": "pw" }))
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(v["user_id"], "@root:cli.test");
    let closed = ureq::post(&format!("{base}/_matrix/client/v3/register"))
        .send_json(json!({ "username": "x" }));
    assert!(matches!(closed, Err(ureq::Error::Status(403, _))));
    unsafe { libc_kill(child.id() as i32, 15) };
    let status = child.wait().unwrap();
    assert!(status.success(), "exit 0 after SIGTERM, got {status}");
    // The WAL was checkpointed into the main file on the way out.
    let wal = dir.path().join("h.db-wal");
    assert!(!wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0);
}

#[test]
fn bad_config_is_refused_with_a_message() {
    let out = Command::new(BIN)
        .args([
            "--server-name",
            "not a name!",
            "--database",
            "/nonexistent/x.db",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("server_name"));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("h.toml");
    std::fs::write(&cfg, "unknown_key = 1\n").unwrap();
    let out = Command::new(BIN)
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown"));
}

#[test]
fn open_registration_on_a_public_listener_is_refused_unless_explicit() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("h.db");
    let mut child = Command::new(BIN)
        .args(["--database", db.to_str().unwrap(), "--listen", "0.0.0.0:0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("started with open registration on 0.0.0.0");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("registration = \"token\""), "{err}");
    assert!(!db.exists(), "refused before touching the database");

    // The explicit flag lets it start (port 0 on every interface; stopped at once).
    let port = free_port();
    let mut child = Command::new(BIN)
        .args(["--database", db.to_str().unwrap()])
        .args(["--listen", &format!("0.0.0.0:{port}")])
        .arg("--allow-open-registration-from-anyone-on-the-internet")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut up = false;
    while started.elapsed() < Duration::from_secs(10) {
        if ureq::get(&format!("http://127.0.0.1:{port}/_matrix/client/versions"))
            .call()
            .is_ok()
        {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    unsafe { libc_kill(child.id() as i32, 15) };
    let status = child.wait().unwrap();
    assert!(up, "started with the explicit flag");
    assert!(status.success());
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
