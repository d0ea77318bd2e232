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
