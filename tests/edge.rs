//! The edges of the client API: unknown paths and methods, what `/versions` claims, URLs
//! Hearth gives out, client addresses behind proxies, oversized request heads.
mod common;
use common::*;

#[test]
fn unknown_path_is_404_and_known_path_with_other_method_is_405() {
    let s = TestServer::start();
    s.err(
        "DELETE",
        "/_matrix/client/v3/createRoom",
        None,
        None,
        405,
        "M_UNRECOGNIZED",
    );
    s.err(
        "GET",
        "/_matrix/client/v3/createRoom",
        None,
        None,
        405,
        "M_UNRECOGNIZED",
    );
    s.err(
        "GET",
        "/_matrix/client/v3/nonexistent",
        None,
        None,
        404,
        "M_UNRECOGNIZED",
    );
    s.err("POST", "/nowhere", None, None, 404, "M_UNRECOGNIZED");
}

/// v1.11 made authenticated media (`/_matrix/client/v1/media/*`) required: a server may only
/// claim v1.11 or later if it serves it. Holds both before and after media lands.
#[test]
fn versions_claims_v1_11_only_with_authenticated_media() {
    let s = TestServer::start();
    let v = s.ok("GET", "/_matrix/client/versions", None, None);
    let versions: Vec<&str> = v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let (_, token) = s.register("media");
    let (status, _) = s.req("GET", "/_matrix/client/v1/media/config", Some(&token), None);
    // Claimed versions at or after v1.11 ("v1.N" with N >= 11, and any v2+).
    let late: Vec<&&str> = versions
        .iter()
        .filter(|v| {
            let Some(rest) = v.strip_prefix('v') else {
                return false;
            };
            let mut parts = rest.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
            let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
            major > 1 || major == 1 && minor >= 11
        })
        .collect();
    assert_eq!(
        status == 404,
        late.is_empty(),
        "claims {late:?} while GET /_matrix/client/v1/media/config -> {status}"
    );
    assert!(versions.contains(&"v1.10"), "{versions:?}");
}

#[test]
fn well_known_uses_public_baseurl_or_the_request_host() {
    let s = TestServer::start();
    let v = s.ok("GET", "/.well-known/matrix/client", None, None);
    assert_eq!(v["m.homeserver"]["base_url"], s.base);
    let s = TestServer::start_with(|c| {
        c.public_baseurl = Some("https://matrix.example.org/".into());
    });
    let v = s.ok("GET", "/.well-known/matrix/client", None, None);
    assert_eq!(v["m.homeserver"]["base_url"], "https://matrix.example.org");
}

/// POST /login (a wrong password) with an `X-Forwarded-For` header; returns the status.
fn login_from(s: &TestServer, forwarded_for: &str) -> u16 {
    let r = ureq::post(&format!("{}/_matrix/client/v3/login", s.base))
        .set("X-Forwarded-For", forwarded_for)
        .send_json(serde_json::json!({
            "type": "m.login.password",
            "identifier": { "type": "m.id.user", "user": "nobody" },
            "password": "wrong"
        }));
    match r {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("{e}"),
    }
}

fn strict_login_limit(c: &mut hearth::Config) {
    c.rate_limits.enabled = true;
    c.rate_limits.login = hearth::config::RateLimit {
        per_second: 0.001,
        burst: 2.0,
    };
}

#[test]
fn forwarded_for_picks_the_rate_limit_bucket_only_from_a_trusted_proxy() {
    let s = TestServer::start_with(|c| {
        strict_login_limit(c);
        c.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    });
    for _ in 0..2 {
        assert_ne!(login_from(&s, "203.0.113.1"), 429);
    }
    assert_eq!(
        login_from(&s, "203.0.113.1"),
        429,
        "203.0.113.1 used its burst"
    );
    // Another client behind the same proxy has its own bucket; what a client prepends is
    // ignored (the proxy appended the real address on the right).
    assert_ne!(login_from(&s, "203.0.113.2"), 429);
    assert_eq!(login_from(&s, "203.0.113.2, 203.0.113.1"), 429);
    assert_ne!(login_from(&s, "203.0.113.1, 203.0.113.2"), 429);
}

#[test]
fn forwarded_for_is_ignored_from_an_untrusted_peer() {
    let s = TestServer::start_with(strict_login_limit);
    for _ in 0..2 {
        assert_ne!(login_from(&s, "203.0.113.1"), 429);
    }
    // The header does not move a client out of its (the peer's) bucket.
    assert_eq!(login_from(&s, "203.0.113.2"), 429);
    assert_eq!(login_from(&s, "198.51.100.9"), 429);
}

/// Sends `head` (a whole request head) on a fresh connection and reads until the server
/// closes; returns (status, JSON body).
fn raw_exchange(s: &TestServer, head: &str) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let addr = s.hs().addrs()[0];
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    c.write_all(head.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!("reading the answer: {e} (got {out:?})"),
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|b| b.1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or_default())
}

#[test]
fn oversized_request_line_or_headers_get_a_matrix_error() {
    let s = TestServer::start();
    let room = format!("!{}:hearth.test", "a".repeat(10_000));
    let (status, body) = raw_exchange(
        &s,
        &format!(
            "GET /_matrix/client/v3/rooms/{}/state HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            enc(&room)
        ),
    );
    assert_eq!(
        (status, body["errcode"].as_str()),
        (414, Some("M_TOO_LARGE")),
        "{body}"
    );
    let (status, body) = raw_exchange(
        &s,
        &format!(
            "GET /_matrix/client/v3/account/whoami HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            "t".repeat(10_000)
        ),
    );
    assert_eq!(
        (status, body["errcode"].as_str()),
        (431, Some("M_TOO_LARGE")),
        "{body}"
    );
    // A long-ish token is still served (and answered as a token, not as a size problem).
    let (status, body) = raw_exchange(
        &s,
        &format!(
            "GET /_matrix/client/v3/account/whoami HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            "t".repeat(2_000)
        ),
    );
    assert_eq!(
        (status, body["errcode"].as_str()),
        (401, Some("M_UNKNOWN_TOKEN")),
        "{body}"
    );
    // The server still serves.
    s.ok("GET", "/_matrix/client/versions", None, None);
}

#[test]
fn a_non_ascii_header_value_gets_an_error_not_a_panic() {
    let s = TestServer::start();
    let (status, body) = raw_exchange(
        &s,
        "GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\nX-Client-Name: caf\u{e9}\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(
        (status, body["errcode"].as_str()),
        (400, Some("M_UNKNOWN")),
        "{body}"
    );
    // The server is fine and the next request is served.
    let (status, _) = raw_exchange(
        &s,
        "GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200);
}

#[test]
fn well_known_server_delegates_only_when_configured() {
    let s = TestServer::start();
    s.err(
        "GET",
        "/.well-known/matrix/server",
        None,
        None,
        404,
        "M_NOT_FOUND",
    );
    let s = TestServer::start_with(|c| {
        c.federation.well_known_server = Some("matrix.example.org:443".into());
    });
    let v = s.ok("GET", "/.well-known/matrix/server", None, None);
    assert_eq!(v["m.server"], "matrix.example.org:443");
}
