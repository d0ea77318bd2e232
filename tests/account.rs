//! Accounts, sessions, devices and error shapes, over real HTTP.
mod common;
use common::*;
use serde_json::json;

#[test]
fn register_uia_login_whoami_logout() {
    let s = TestServer::start();
    // The 401 user-interactive-auth flow.
    let (st, v) = s.req(
        "POST",
        "/_matrix/client/v3/register",
        None,
        Some(&json!({ "username": "alice", "password": "pw" })),
    );
    assert_eq!(st, 401);
    assert_eq!(v["flows"][0]["stages"][0], "m.login.dummy");
    assert!(v["session"].is_string());
    let (alice, token) = s.register("alice");
    assert_eq!(alice, "@alice:hearth.test");
    assert_eq!(
        s.ok(
            "GET",
            "/_matrix/client/v3/account/whoami",
            Some(&token),
            None
        )["user_id"],
        alice
    );
    s.err(
        "POST",
        "/_matrix/client/v3/register",
        None,
        Some(&json!({ "username": "alice", "password": "x", "auth": { "type": "m.login.dummy" } })),
        400,
        "M_USER_IN_USE",
    );
    s.err(
        "POST",
        "/_matrix/client/v3/register",
        None,
        Some(&json!({ "username": "Bad Name!", "auth": { "type": "m.login.dummy" } })),
        400,
        "M_INVALID_USERNAME",
    );
    s.err(
        "GET",
        "/_matrix/client/v3/register/available?username=alice",
        None,
        None,
        400,
        "M_USER_IN_USE",
    );
    assert_eq!(
        s.ok(
            "GET",
            "/_matrix/client/v3/register/available?username=bob",
            None,
            None
        )["available"],
        true
    );

    // Login by localpart and by full user ID; wrong password is M_FORBIDDEN.
    let login = |user: &str, pw: &str| {
        s.req("POST", "/_matrix/client/v3/login", None, Some(&json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": user }, "password": pw })))
    };
    let (st, v) = login("alice", "pw-alice");
    assert_eq!(st, 200, "{v}");
    let t2 = v["access_token"].as_str().unwrap().to_owned();
    assert_ne!(t2, token);
    assert_eq!(login("@alice:hearth.test", "pw-alice").0, 200);
    assert_eq!(login("alice", "wrong").1["errcode"], "M_FORBIDDEN");
    assert_eq!(login("nobody", "x").1["errcode"], "M_FORBIDDEN");
    assert_eq!(
        s.ok("GET", "/_matrix/client/v3/login", None, None)["flows"][0]["type"],
        "m.login.password"
    );

    // Devices: three sessions now.
    let devices = s.ok("GET", "/_matrix/client/v3/devices", Some(&t2), None);
    assert_eq!(devices["devices"].as_array().unwrap().len(), 3);
    let dev = s.ok("GET", "/_matrix/client/v3/account/whoami", Some(&t2), None)["device_id"]
        .as_str()
        .unwrap()
        .to_owned();
    s.ok(
        "PUT",
        &format!("/_matrix/client/v3/devices/{dev}"),
        Some(&t2),
        Some(&json!({ "display_name": "laptop" })),
    );
    assert_eq!(
        s.ok(
            "GET",
            &format!("/_matrix/client/v3/devices/{dev}"),
            Some(&t2),
            None
        )["display_name"],
        "laptop"
    );
    s.err(
        "GET",
        "/_matrix/client/v3/devices/NOPE",
        Some(&t2),
        None,
        404,
        "M_NOT_FOUND",
    );

    // Logout kills exactly that token.
    s.ok(
        "POST",
        "/_matrix/client/v3/logout",
        Some(&token),
        Some(&json!({})),
    );
    s.err(
        "GET",
        "/_matrix/client/v3/account/whoami",
        Some(&token),
        None,
        401,
        "M_UNKNOWN_TOKEN",
    );
    s.ok("GET", "/_matrix/client/v3/account/whoami", Some(&t2), None);
    s.ok(
        "POST",
        "/_matrix/client/v3/logout/all",
        Some(&t2),
        Some(&json!({})),
    );
    s.err(
        "GET",
        "/_matrix/client/v3/account/whoami",
        Some(&t2),
        None,
        401,
        "M_UNKNOWN_TOKEN",
    );
}

#[test]
fn password_change_and_device_delete_need_uia() {
    let s = TestServer::start();
    let (_, token) = s.register("carol");
    let (st, v) = s.req(
        "POST",
        "/_matrix/client/v3/account/password",
        Some(&token),
        Some(&json!({ "new_password": "new" })),
    );
    assert_eq!(st, 401);
    assert_eq!(v["flows"][0]["stages"][0], "m.login.password");
    let auth = json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "carol" }, "password": "wrong" });
    assert_eq!(
        s.req(
            "POST",
            "/_matrix/client/v3/account/password",
            Some(&token),
            Some(&json!({ "new_password": "new", "auth": auth }))
        )
        .0,
        401
    );
    let auth = json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "carol" }, "password": "pw-carol" });
    s.ok(
        "POST",
        "/_matrix/client/v3/account/password",
        Some(&token),
        Some(&json!({ "new_password": "new", "auth": auth })),
    );
    let login = |pw: &str| {
        s.req(
            "POST",
            "/_matrix/client/v3/login",
            None,
            Some(&json!({ "type": "m.login.password", "user": "carol", "password": pw })),
        )
        .0
    };
    assert_eq!(login("pw-carol"), 403);
    assert_eq!(login("new"), 200);
    let dev = s.ok(
        "GET",
        "/_matrix/client/v3/account/whoami",
        Some(&token),
        None,
    )["device_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        s.req(
            "DELETE",
            &format!("/_matrix/client/v3/devices/{dev}"),
            Some(&token),
            Some(&json!({}))
        )
        .0,
        401
    );
    let auth = json!({ "type": "m.login.password", "user": "carol", "password": "new" });
    s.ok(
        "DELETE",
        &format!("/_matrix/client/v3/devices/{dev}"),
        Some(&token),
        Some(&json!({ "auth": auth })),
    );
    s.err(
        "GET",
        "/_matrix/client/v3/account/whoami",
        Some(&token),
        None,
        401,
        "M_UNKNOWN_TOKEN",
    );
}

#[test]
fn errors_have_matrix_shape() {
    let s = TestServer::start_with(|c| c.max_request_bytes = 10_000);
    let (_, token) = s.register("dave");
    s.err(
        "GET",
        "/_matrix/client/v3/account/whoami",
        None,
        None,
        401,
        "M_MISSING_TOKEN",
    );
    s.err(
        "GET",
        "/_matrix/client/v3/account/whoami",
        Some("nope"),
        None,
        401,
        "M_UNKNOWN_TOKEN",
    );
    s.err(
        "GET",
        "/_matrix/client/v3/no/such/endpoint",
        Some(&token),
        None,
        404,
        "M_UNRECOGNIZED",
    );
    let (st, v) = s.raw(
        "POST",
        "/_matrix/client/v3/createRoom",
        Some(&token),
        Some("{not json"),
    );
    assert_eq!((st, v["errcode"].as_str()), (400, Some("M_NOT_JSON")));
    let (st, v) = s.raw(
        "POST",
        "/_matrix/client/v3/createRoom",
        Some(&token),
        Some(r#"{"invite": "not a list"}"#),
    );
    assert_eq!(
        (st, v["errcode"].as_str()),
        (400, Some("M_BAD_JSON")),
        "{v}"
    );
    let big = format!("{{\"x\": \"{}\"}}", "a".repeat(20_000));
    let (st, v) = s.raw(
        "POST",
        "/_matrix/client/v3/createRoom",
        Some(&token),
        Some(&big),
    );
    assert_eq!((st, v["errcode"].as_str()), (413, Some("M_TOO_LARGE")));
    s.err(
        "POST",
        "/_matrix/client/v3/createRoom",
        Some(&token),
        Some(&json!({ "room_version": "1" })),
        400,
        "M_UNSUPPORTED_ROOM_VERSION",
    );
    s.err(
        "GET",
        "/_matrix/client/v3/sync?since=garbage",
        Some(&token),
        None,
        400,
        "M_INVALID_PARAM",
    );
    s.err(
        "GET",
        "/_matrix/client/v3/rooms/!nope:hearth.test/messages?dir=x",
        Some(&token),
        None,
        400,
        "M_INVALID_PARAM",
    );
    s.err(
        "GET",
        "/_matrix/client/v3/rooms/!nope:hearth.test/messages?dir=b",
        Some(&token),
        None,
        404,
        "M_NOT_FOUND",
    );
}

#[test]
fn rate_limits_apply_unless_disabled() {
    let s = TestServer::start_with(|c| {
        c.rate_limits.enabled = true;
        c.rate_limits.login = hearth::config::RateLimit {
            per_second: 0.01,
            burst: 2.0,
        };
    });
    s.register("erin");
    let body = json!({ "type": "m.login.password", "user": "erin", "password": "x" });
    assert_eq!(
        s.req("POST", "/_matrix/client/v3/login", None, Some(&body))
            .0,
        403
    );
    assert_eq!(
        s.req("POST", "/_matrix/client/v3/login", None, Some(&body))
            .0,
        403
    );
    let v = s.err(
        "POST",
        "/_matrix/client/v3/login",
        None,
        Some(&body),
        429,
        "M_LIMIT_EXCEEDED",
    );
    assert!(v["retry_after_ms"].as_u64().unwrap() > 0);
}

#[test]
fn registration_closed_and_token() {
    let s = TestServer::start_with(|c| c.registration = hearth::config::Registration::Closed);
    s.err(
        "POST",
        "/_matrix/client/v3/register",
        None,
        Some(&json!({ "username": "x", "auth": { "type": "m.login.dummy" } })),
        403,
        "M_FORBIDDEN",
    );
    let s = TestServer::start_with(|c| {
        c.registration = hearth::config::Registration::Token;
        c.registration_tokens = vec!["sesame".into()];
    });
    let (st, v) = s.req(
        "POST",
        "/_matrix/client/v3/register",
        None,
        Some(&json!({ "username": "x", "password": "p" })),
    );
    assert_eq!(
        (st, v["flows"][0]["stages"][0].as_str()),
        (401, Some("m.login.registration_token"))
    );
    let bad = json!({ "username": "x", "password": "p", "auth": { "type": "m.login.registration_token", "token": "wrong" } });
    assert_eq!(
        s.req("POST", "/_matrix/client/v3/register", None, Some(&bad))
            .0,
        401
    );
    let good = json!({ "username": "x", "password": "p", "auth": { "type": "m.login.registration_token", "token": "sesame" } });
    assert_eq!(
        s.ok("POST", "/_matrix/client/v3/register", None, Some(&good))["user_id"],
        "@x:hearth.test"
    );
}

#[test]
fn data_survives_restart_and_server_name_is_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let token = {
        let hs = hearth::Homeserver::start(config_in(dir.path())).unwrap();
        let base = format!("http://{}", hs.addrs()[0]);
        let v: serde_json::Value = ureq::post(&format!("{base}/_matrix/client/v3/register"))
            .send_json(json!({ "username": "frank", "password": "p", "auth": { "type": "m.login.dummy" } }))
            .unwrap()
            .into_json()
            .unwrap();
        hs.stop().unwrap();
        v["access_token"].as_str().unwrap().to_owned()
    };
    let hs = hearth::Homeserver::start(config_in(dir.path())).unwrap();
    let base = format!("http://{}", hs.addrs()[0]);
    let v: serde_json::Value = ureq::get(&format!("{base}/_matrix/client/v3/account/whoami"))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(v["user_id"], "@frank:hearth.test");
    hs.stop().unwrap();
    let mut other = config_in(dir.path());
    other.server_name = "other.test".into();
    let err = hearth::Homeserver::start(other)
        .err()
        .expect("a different server name must be refused");
    assert!(err.contains("hearth.test"), "{err}");
}

/// A logout that commits while another request's `auth()` has read the token from the
/// database but not yet cached it must win: the token stays revoked. The interleaving is
/// forced by polling `auth_token` by hand: first poll (database read sent off), logout over
/// HTTP, second poll (auth finishes with what it read before the logout).
#[test]
fn logout_during_an_auth_read_is_not_undone_by_the_cache() {
    let s = TestServer::start();
    let app = s.hs().app().clone();
    for attempt in 0.. {
        assert!(attempt < 50, "never saw the read finish before the logout");
        let (_, token) = s.register(&format!("racer{attempt}"));
        let mut fut = Box::pin(hearth::http::auth_token(&app, &token));
        // Sends the database read to the blocking pool.
        if smol::block_on(futures_lite::future::poll_once(&mut fut)).is_some() {
            continue; // finished at once: not the interleaving under test
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        s.ok(
            "POST",
            "/_matrix/client/v3/logout",
            Some(&token),
            Some(&json!({})),
        );
        let read = smol::block_on(fut);
        if read.is_err() {
            continue; // the read ran after the logout committed: not the interleaving
        }
        // auth() read the token before the logout committed; the revocation must still hold.
        s.err(
            "GET",
            "/_matrix/client/v3/account/whoami",
            Some(&token),
            None,
            401,
            "M_UNKNOWN_TOKEN",
        );
        break;
    }
}
