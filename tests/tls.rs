//! `--tls-cert/--tls-key`: every listener speaks TLS (rustls). Uses the machine's `openssl` to
//! make a self-signed certificate and `curl` as an independent TLS client.
mod common;
use std::process::Command;

#[test]
fn serves_the_client_api_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ed25519",
            "-nodes",
            "-days",
            "1",
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
    let mut c = common::config_in(dir.path());
    c.tls_cert = Some(cert.clone());
    c.tls_key = Some(key);
    let hs = hearth::Homeserver::start(c).unwrap();
    let url = format!(
        "https://127.0.0.1:{}/_matrix/client/versions",
        hs.addrs()[0].port()
    );
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&cert)
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["versions"].as_array().unwrap().len() > 3);
    // An oversized head gets its Matrix error over TLS too.
    let big = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(&cert)
        .arg("-H")
        .arg(format!("Authorization: Bearer {}", "t".repeat(10_000)))
        .arg(url.replace("versions", "v3/account/whoami"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&big.stdout);
    assert!(
        text.ends_with("\n431"),
        "{text} {}",
        String::from_utf8_lossy(&big.stderr)
    );
    assert!(text.contains("M_TOO_LARGE"), "{text}");
    // Plain HTTP on the TLS port is refused, not served.
    let plain = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(url.replace("https", "http"))
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("versions"));
    hs.stop().unwrap();
}

/// Without `public_baseurl`, a server that speaks TLS itself advertises an `https` base URL.
#[test]
fn well_known_says_https_when_serving_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let ok = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ed25519", "-nodes", "-days", "1"])
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
    assert!(ok.status.success());
    let mut c = common::config_in(dir.path());
    c.tls_cert = Some(cert.clone());
    c.tls_key = Some(key);
    let hs = hearth::Homeserver::start(c).unwrap();
    let port = hs.addrs()[0].port();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&cert)
        .arg(format!(
            "https://127.0.0.1:{port}/.well-known/matrix/client"
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["m.homeserver"]["base_url"],
        format!("https://127.0.0.1:{port}")
    );
    hs.stop().unwrap();
}

#[test]
fn half_a_tls_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = common::config_in(dir.path());
    c.tls_cert = Some(dir.path().join("cert.pem"));
    assert!(hearth::Homeserver::start(c).is_err());
}
