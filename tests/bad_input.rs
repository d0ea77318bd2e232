//! Bad input never panics the server or yields a 500: every route gets malformed IDs, wrong
//! JSON types, non-JSON and empty bodies, and must answer with a Matrix error (4xx + errcode)
//! or a success, and keep serving.
mod common;
use common::*;
use serde_json::{json, Value};

const BODIES: &[&str] = &[
    "",
    "not json",
    "[]",
    "null",
    "{\"user_id\": 5, \"room_id\": [], \"visibility\": {}, \"typing\": \"yes\", \"timeout\": -1}",
    "{\"auth\": \"x\", \"identifier\": 3, \"password\": null, \"username\": {}}",
    "{\"displayname\": 12, \"avatar_url\": [1], \"actions\": \"x\", \"conditions\": 5, \"pattern\": 1}",
    "{\"room\": {\"timeline\": {\"limit\": \"ten\"}}, \"event_id\": \"no-sigil\"}",
    "{\"initial_state\": [{\"type\": 1}], \"invite\": [\"not-a-user\"], \"room_version\": 99}",
    "{\"name\": 1.5e308, \"body\": \"\\u0000\"}",
];

const IDS: &[&str] = &[
    "",
    "!",
    "%00",
    "not-an-id",
    "%21x%3Ay",
    "@u:hearth.test",
    "$e",
    "%ZZ",
    "..",
    "#a:b:c",
];

fn check(s: &TestServer, method: &str, path: &str, token: &str, body: &str) {
    let (status, v) = s.raw(
        method,
        path,
        Some(token),
        if body.is_empty() && method == "GET" {
            None
        } else {
            Some(body)
        },
    );
    assert!(
        status < 500,
        "{method} {path} body={body:?} -> {status} {v}"
    );
    // The user-interactive-auth 401 carries `flows` and no errcode until a stage failed.
    if status >= 400 && !(status == 401 && v["flows"].is_array()) {
        assert!(
            v["errcode"].as_str().is_some_and(|c| c.starts_with("M_")),
            "{method} {path} body={body:?} -> {status} {v}"
        );
    }
}

#[test]
fn malformed_requests_get_matrix_errors_never_500() {
    let s = TestServer::start();
    let (alice, a) = s.register("alice");
    let room = s.create_room(&a, json!({ "preset": "public_chat" }));
    let ev = s.send(&a, &room, "t", "x");
    let templates = [
        ("POST", "/_matrix/client/v3/createRoom"),
        ("POST", "/_matrix/client/v3/join/{id}"),
        ("POST", "/_matrix/client/v3/knock/{id}"),
        ("POST", "/_matrix/client/v3/rooms/{id}/join"),
        ("POST", "/_matrix/client/v3/rooms/{id}/leave"),
        ("POST", "/_matrix/client/v3/rooms/{id}/forget"),
        ("POST", "/_matrix/client/v3/rooms/{id}/invite"),
        ("POST", "/_matrix/client/v3/rooms/{id}/kick"),
        ("POST", "/_matrix/client/v3/rooms/{id}/ban"),
        ("POST", "/_matrix/client/v3/rooms/{id}/unban"),
        (
            "PUT",
            "/_matrix/client/v3/rooms/{id}/send/m.room.message/{id}",
        ),
        (
            "PUT",
            "/_matrix/client/v3/rooms/{id}/state/m.room.name/{id}",
        ),
        ("GET", "/_matrix/client/v3/rooms/{id}/state/{id}/{id}"),
        ("GET", "/_matrix/client/v3/rooms/{id}/state"),
        ("PUT", "/_matrix/client/v3/rooms/{id}/redact/{id}/{id}"),
        (
            "GET",
            "/_matrix/client/v3/rooms/{id}/messages?dir=b&from={id}&limit={id}&filter={id}",
        ),
        ("GET", "/_matrix/client/v3/rooms/{id}/members?at={id}"),
        ("GET", "/_matrix/client/v3/rooms/{id}/joined_members"),
        ("GET", "/_matrix/client/v3/rooms/{id}/event/{id}"),
        (
            "GET",
            "/_matrix/client/v3/rooms/{id}/context/{id}?limit={id}",
        ),
        (
            "GET",
            "/_matrix/client/v3/sync?since={id}&timeout={id}&filter={id}",
        ),
        ("POST", "/_matrix/client/v3/user/{id}/filter"),
        ("GET", "/_matrix/client/v3/user/{id}/filter/{id}"),
        ("GET", "/_matrix/client/v3/profile/{id}"),
        ("PUT", "/_matrix/client/v3/profile/{id}/displayname"),
        ("PUT", "/_matrix/client/v3/user/{id}/account_data/{id}"),
        (
            "PUT",
            "/_matrix/client/v3/user/{id}/rooms/{id}/account_data/{id}",
        ),
        ("PUT", "/_matrix/client/v3/rooms/{id}/typing/{id}"),
        ("POST", "/_matrix/client/v3/rooms/{id}/receipt/{id}/{id}"),
        ("POST", "/_matrix/client/v3/rooms/{id}/read_markers"),
        ("PUT", "/_matrix/client/v3/pushrules/global/{id}/{id}"),
        ("PUT", "/_matrix/client/v3/pushrules/global/{id}/{id}/{id}"),
        ("GET", "/_matrix/client/v3/directory/room/{id}"),
        ("PUT", "/_matrix/client/v3/directory/room/{id}"),
        ("DELETE", "/_matrix/client/v3/directory/room/{id}"),
        ("PUT", "/_matrix/client/v3/directory/list/room/{id}"),
        ("POST", "/_matrix/client/v3/publicRooms"),
        (
            "GET",
            "/_matrix/client/v3/publicRooms?limit={id}&since={id}",
        ),
        ("POST", "/_matrix/client/v3/user_directory/search"),
        ("POST", "/_matrix/client/v3/search?next_batch={id}"),
        ("GET", "/_matrix/client/v3/voip/turnServer"),
        ("GET", "/_matrix/client/v1/room_summary/{id}?via={id}"),
        ("PUT", "/_matrix/client/v3/devices/{id}"),
        ("DELETE", "/_matrix/client/v3/devices/{id}"),
        ("POST", "/_matrix/client/v3/delete_devices"),
        ("POST", "/_matrix/client/v3/account/password"),
        ("POST", "/_matrix/client/v3/login"),
        ("POST", "/_matrix/client/v3/register"),
        ("GET", "/_matrix/client/v3/register/available?username={id}"),
        ("GET", "/_matrix/client/versions"),
        ("GET", "/.well-known/matrix/client"),
        ("GET", "/_matrix/client/v3/capabilities"),
        ("GET", "/_matrix/client/v3/login"),
        ("GET", "/_matrix/client/v3/account/whoami"),
        ("GET", "/_matrix/client/v3/account/3pid"),
        ("GET", "/_matrix/client/v3/joined_rooms"),
        ("GET", "/_matrix/client/v3/devices"),
        ("GET", "/_matrix/client/v3/devices/{id}"),
        ("GET", "/_matrix/client/v3/rooms/{id}/aliases"),
        ("GET", "/_matrix/client/v3/directory/list/room/{id}"),
        ("GET", "/_matrix/client/v3/profile/{id}/{id}"),
        ("PUT", "/_matrix/client/v3/profile/{id}/avatar_url"),
        ("GET", "/_matrix/client/v3/user/{id}/account_data/{id}"),
        (
            "GET",
            "/_matrix/client/v3/user/{id}/rooms/{id}/account_data/{id}",
        ),
        ("GET", "/_matrix/client/v3/pushers"),
        ("POST", "/_matrix/client/v3/pushers/set"),
        (
            "GET",
            "/_matrix/client/v3/notifications?from={id}&limit={id}&only={id}",
        ),
        ("GET", "/_matrix/client/v3/pushrules/"),
        ("GET", "/_matrix/client/v3/pushrules/global/"),
        ("GET", "/_matrix/client/v3/pushrules/global/{id}/{id}"),
        ("DELETE", "/_matrix/client/v3/pushrules/global/{id}/{id}"),
        ("GET", "/_matrix/client/v3/pushrules/global/{id}/{id}/{id}"),
        (
            "GET",
            "/_matrix/client/v3/rooms/{id}/members?membership={id}&not_membership={id}",
        ),
        (
            "GET",
            "/_matrix/client/v3/rooms/{id}/state/m.room.create/?format={id}",
        ),
        (
            "GET",
            "/_matrix/client/v3/rooms/{id}/messages?dir={id}&to={id}",
        ),
    ];
    let real_ids = [enc(&room), enc(&ev), enc(&alice)];
    for (method, t) in templates {
        for id in IDS
            .iter()
            .map(|s| s.to_string())
            .chain(real_ids.iter().cloned())
        {
            let path = t.replace("{id}", &id);
            for body in BODIES {
                check(&s, method, &path, &a, body);
            }
        }
    }
    // Still serving, and the room is intact.
    assert_eq!(
        s.ok("GET", "/_matrix/client/v3/account/whoami", Some(&a), None)["user_id"],
        alice
    );
    let v: Value = s.ok(
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.create/",
            enc(&room)
        ),
        Some(&a),
        None,
    );
    assert_eq!(v["room_version"], "10");
}

/// Sends raw bytes as a JSON body; returns (status, errcode).
fn raw_bytes(s: &TestServer, method: &str, path: &str, token: &str, body: &[u8]) -> (u16, String) {
    let r = ureq::request(method, &format!("{}{}", s.base, path))
        .set("Authorization", &format!("Bearer {token}"))
        .set("Content-Type", "application/json");
    let resp = match r.send_bytes(body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let status = resp.status();
    let v: Value =
        serde_json::from_str(&resp.into_string().unwrap_or_default()).unwrap_or(Value::Null);
    (status, v["errcode"].as_str().unwrap_or("").to_owned())
}

/// Collects every mismatch, so one run lists all the cases that are wrong.
#[derive(Default)]
struct Expect(Vec<String>);

impl Expect {
    /// `errcode` empty: any errcode, only the status is checked.
    fn req(
        &mut self,
        s: &TestServer,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        (status, errcode): (u16, &str),
    ) {
        let (got, v) = s.req(method, path, token, body);
        let code = v["errcode"].as_str().unwrap_or("");
        if got != status || (!errcode.is_empty() && code != errcode) {
            let body = body.map(|b| b.to_string()).unwrap_or_default();
            let body: String = body.chars().take(120).collect();
            let path: String = path.chars().take(120).collect();
            self.0.push(format!(
                "{method} {path} {body} -> {got} {code}, want {status} {errcode}"
            ));
        }
    }

    fn check(self) {
        assert!(self.0.is_empty(), "\n{}", self.0.join("\n"));
    }
}

/// Each of these is a specific defect: the exact status and errcode are the spec's (and
/// Synapse's): `M_NOT_JSON` for a body that is not JSON, `M_BAD_JSON` for JSON of the wrong
/// shape (including unknown enum values in a body), `M_INVALID_PARAM` for bad query or path
/// parameters, 400 for identifiers, event types and state keys over 255 bytes.
fn setup() -> (TestServer, String, String, String, Expect) {
    let s = TestServer::start();
    let (alice, a) = s.register("alice");
    let room = s.create_room(&a, json!({ "preset": "public_chat" }));
    (s, alice, a, room, Expect::default())
}

const CREATE: &str = "/_matrix/client/v3/createRoom";

#[test]
fn create_room_bad_input_gets_the_exact_error() {
    let (s, _alice, a, room, mut e) = setup();
    let r = enc(&room);
    let create = CREATE;
    let bad_create = [
        json!({ "preset": "no_such_preset" }),
        json!({ "visibility": "weird" }),
        json!({ "power_level_content_override": "str" }),
        json!({ "power_level_content_override": { "ban": "not a number" } }),
        json!({ "initial_state": [1, 2] }),
        json!({ "initial_state": [{ "type": 1, "state_key": "", "content": {} }] }),
        json!({ "initial_state": [{ "type": "m.room.topic", "state_key": 5, "content": {} }] }),
        json!({ "initial_state": [{ "type": "m.room.topic", "state_key": "", "content": "x" }] }),
        json!({ "initial_state": "x" }),
        json!({ "creation_content": "x" }),
        json!({ "creation_content": { "m.federate": "yes" } }),
        json!({ "invite": "@bob:hearth.test" }),
        json!({ "name": 5 }),
        json!({ "is_direct": "yes" }),
    ];
    for body in &bad_create {
        e.req(
            &s,
            "POST",
            create,
            Some(&a),
            Some(body),
            (400, "M_BAD_JSON"),
        );
    }
    // Not UTF-8, not JSON.
    let send = format!("/_matrix/client/v3/rooms/{r}/send/m.room.message/t1");
    for (method, path, bytes) in [
        ("POST", create, &[0x7b, 0xff, 0x7d][..]),
        ("POST", create, b"{\"name\": \"\xff\"}"),
        ("POST", create, b"not json"),
        ("PUT", &send, &[0x7b, 0xff, 0x7d]),
    ] {
        let got = raw_bytes(&s, method, path, &a, bytes);
        if got != (400, "M_NOT_JSON".to_owned()) {
            e.0.push(format!(
                "{method} {path} {bytes:?} -> {got:?}, want 400 M_NOT_JSON"
            ));
        }
    }
    let long_key = "k".repeat(1000);
    let long_type = "t".repeat(300);
    for body in [
        json!({ "initial_state": [{ "type": "m.room.topic", "state_key": long_key, "content": {} }] }),
        json!({ "initial_state": [{ "type": long_type, "state_key": "", "content": {} }] }),
        json!({ "room_alias_name": "a".repeat(300) }),
    ] {
        e.req(&s, "POST", create, Some(&a), Some(&body), (400, ""));
    }
    // Nothing of those created a room.
    let joined = s.ok("GET", "/_matrix/client/v3/joined_rooms", Some(&a), None);
    if joined["joined_rooms"].as_array().map(Vec::len) != Some(1) {
        e.0.push(format!("rooms were created: {joined}"));
    }
    e.check();
}

#[test]
fn room_and_event_bad_input_gets_the_exact_error() {
    let (s, alice, a, room, mut e) = setup();
    let r = enc(&room);

    // Unknown enum values in queries.
    for q in [
        "dir=x",
        "dir=b&membership=weird",
        "dir=b&not_membership=weird",
    ] {
        let ep = if q.contains("member") {
            "members"
        } else {
            "messages"
        };
        e.req(
            &s,
            "GET",
            &format!("/_matrix/client/v3/rooms/{r}/{ep}?{q}"),
            Some(&a),
            None,
            (400, "M_INVALID_PARAM"),
        );
    }
    // Unknown enum values in bodies.
    e.req(
        &s,
        "PUT",
        &format!("/_matrix/client/v3/directory/list/room/{r}"),
        Some(&a),
        Some(&json!({ "visibility": "weird" })),
        (400, "M_BAD_JSON"),
    );

    // Identifiers, event types and state keys longer than the spec's 255 bytes.
    let long_key = "k".repeat(1000);
    let long_type = "t".repeat(300);
    let long_alias = enc(&format!("#{}:hearth.test", "a".repeat(300)));
    let body = json!({ "topic": "x", "room_id": room });
    for (method, path) in [
        (
            "PUT",
            format!("/_matrix/client/v3/rooms/{r}/state/m.room.topic/{long_key}"),
        ),
        (
            "PUT",
            format!("/_matrix/client/v3/rooms/{r}/state/{long_type}/"),
        ),
        (
            "PUT",
            format!("/_matrix/client/v3/rooms/{r}/send/{long_type}/t2"),
        ),
        (
            "PUT",
            format!(
                "/_matrix/client/v3/user/{}/account_data/{long_type}",
                enc(&alice)
            ),
        ),
        (
            "PUT",
            format!("/_matrix/client/v3/directory/room/{long_alias}"),
        ),
        ("POST", format!("/_matrix/client/v3/join/{long_alias}")),
    ] {
        e.req(&s, method, &path, Some(&a), Some(&body), (400, ""));
    }
    // Nothing was stored under a long state key or type.
    let state = s.ok(
        "GET",
        &format!("/_matrix/client/v3/rooms/{r}/state"),
        Some(&a),
        None,
    );
    for ev in state.as_array().into_iter().flatten() {
        let (t, k) = (ev["type"].as_str(), ev["state_key"].as_str());
        if t.is_none_or(|t| t.len() > 255) || k.is_none_or(|k| k.len() > 255) {
            let show = |s: Option<&str>| s.map(|s| s.chars().take(40).collect::<String>());
            e.0.push(format!("stored: {:?} {:?}", show(t), show(k)));
        }
    }
    e.check();
}

#[test]
fn register_bad_input_gets_the_exact_error() {
    let s = TestServer::start();
    let mut e = Expect::default();
    // /register: `auth` must be an object.
    for auth in [json!("str"), json!(5), json!([])] {
        e.req(
            &s,
            "POST",
            "/_matrix/client/v3/register",
            None,
            Some(&json!({ "username": "carol", "password": "pw-carol", "auth": auth })),
            (400, "M_BAD_JSON"),
        );
    }
    let reg = "/_matrix/client/v3/register";
    for (path, body, want) in [
        (
            reg.to_owned(),
            json!({ "username": "bad1", "inhibit_login": "yes", "auth": { "type": "m.login.dummy" } }),
            (400, "M_BAD_JSON"),
        ),
        (
            reg.to_owned(),
            json!({ "username": "bad2", "device_id": 5, "auth": { "type": "m.login.dummy" } }),
            (400, "M_BAD_JSON"),
        ),
        (
            format!("{reg}?kind=weird"),
            json!({ "username": "bad3", "auth": { "type": "m.login.dummy" } }),
            (400, "M_INVALID_PARAM"),
        ),
        // No `type` (ruma's login parser would panic on it): Synapse's answer.
        (
            "/_matrix/client/v3/login".to_owned(),
            json!({ "password": "x" }),
            (400, "M_UNKNOWN"),
        ),
        (
            "/_matrix/client/v3/login".to_owned(),
            json!({ "type": "m.login.password", "identifier": "alice", "password": "x" }),
            (400, "M_BAD_JSON"),
        ),
    ] {
        e.req(&s, "POST", &path, None, Some(&body), want);
    }
    let (_, t) = s.register("dave");
    for (method, path, body) in [
        (
            "POST",
            "/_matrix/client/v3/account/password",
            json!({ "new_password": "n", "logout_devices": "no" }),
        ),
        (
            "POST",
            "/_matrix/client/v3/delete_devices",
            json!({ "devices": [5] }),
        ),
        (
            "PUT",
            "/_matrix/client/v3/devices/ABC",
            json!({ "display_name": 5 }),
        ),
        (
            "DELETE",
            "/_matrix/client/v3/devices/ABC",
            json!({ "auth": "str" }),
        ),
    ] {
        e.req(&s, method, path, Some(&t), Some(&body), (400, "M_BAD_JSON"));
    }
    // A session-only auth dict (polling) gets the 401 with the flows.
    let (status, v) = s.req(
        "POST",
        reg,
        None,
        Some(&json!({ "username": "erin", "auth": { "session": "abc" } })),
    );
    if status != 401 || !v["flows"].is_array() {
        e.0.push(format!("register with a session only -> {status} {v}"));
    }
    // ... while a missing `auth` still gets the user-interactive-auth 401 with its flows.
    let (status, v) = s.req(
        "POST",
        "/_matrix/client/v3/register",
        None,
        Some(&json!({ "username": "carol", "password": "pw-carol" })),
    );
    if status != 401 || !v["flows"].is_array() {
        e.0.push(format!("register without auth -> {status} {v}"));
    }
    e.check();
}

#[test]
fn user_data_bad_input_gets_the_exact_error() {
    let (s, alice, a, room, mut e) = setup();
    let (r, u) = (enc(&room), enc(&alice));
    let ev = s.send(&a, &room, "t1", "x");
    let v3 = "/_matrix/client/v3";
    for (method, path, body, want) in [
        // A read marker that is not an event ID is refused, not ignored.
        (
            "POST",
            format!("{v3}/rooms/{r}/read_markers"),
            json!({ "m.read": 5 }),
            (400, "M_BAD_JSON"),
        ),
        (
            "POST",
            format!("{v3}/rooms/{r}/read_markers"),
            json!({ "m.fully_read": "not-an-event-id" }),
            (400, "M_BAD_JSON"),
        ),
        (
            "POST",
            format!("{v3}/rooms/{r}/receipt/m.weird/{}", enc(&ev)),
            json!({}),
            (400, "M_INVALID_PARAM"),
        ),
        (
            "POST",
            format!("{v3}/rooms/{r}/receipt/m.read/{}", enc(&ev)),
            json!({ "thread_id": 5 }),
            (400, "M_BAD_JSON"),
        ),
        (
            "POST",
            format!("{v3}/rooms/{r}/receipt/m.read/{}", enc(&ev)),
            json!({ "thread_id": "neither main nor an event" }),
            (400, "M_BAD_JSON"),
        ),
        (
            "PUT",
            format!("{v3}/rooms/{r}/typing/{u}"),
            json!({ "typing": "yes" }),
            (400, "M_BAD_JSON"),
        ),
        (
            "PUT",
            format!("{v3}/rooms/{r}/typing/{u}"),
            json!({ "typing": true, "timeout": "long" }),
            (400, "M_BAD_JSON"),
        ),
        (
            "PUT",
            format!("{v3}/profile/{u}/displayname"),
            json!({ "displayname": 12 }),
            (400, "M_BAD_JSON"),
        ),
        (
            "POST",
            format!("{v3}/user_directory/search"),
            json!({ "search_term": "a", "limit": "ten" }),
            (400, "M_BAD_JSON"),
        ),
        (
            "POST",
            format!("{v3}/user/{u}/filter"),
            json!({ "room": { "timeline": { "limit": "ten" } } }),
            (400, "M_BAD_JSON"),
        ),
        (
            "POST",
            format!("{v3}/user/{u}/filter"),
            json!({ "event_format": "weird" }),
            (400, "M_BAD_JSON"),
        ),
        (
            "PUT",
            format!("{v3}/pushrules/global/weird/myrule"),
            json!({ "actions": [] }),
            (400, "M_INVALID_PARAM"),
        ),
        (
            "PUT",
            format!("{v3}/pushrules/global/content/myrule"),
            json!({ "actions": [], "pattern": 5 }),
            (400, "M_BAD_JSON"),
        ),
        (
            "PUT",
            format!("{v3}/pushrules/global/override/.m.rule.master/enabled"),
            json!({ "enabled": "yes" }),
            (400, "M_BAD_JSON"),
        ),
        (
            "POST",
            format!("{v3}/publicRooms"),
            json!({ "limit": "ten" }),
            (400, "M_BAD_JSON"),
        ),
        (
            "POST",
            format!("{v3}/rooms/{r}/kick"),
            json!({ "user_id": 5 }),
            (400, "M_BAD_JSON"),
        ),
        (
            "POST",
            format!("{v3}/rooms/{r}/leave"),
            json!({ "reason": 5 }),
            (400, "M_BAD_JSON"),
        ),
    ] {
        e.req(&s, method, &path, Some(&a), Some(&body), want);
    }
    e.req(
        &s,
        "GET",
        &format!("{v3}/publicRooms?limit=ten"),
        None,
        None,
        (400, "M_INVALID_PARAM"),
    );
    // The valid forms still work.
    s.ok(
        "PUT",
        &format!("{v3}/rooms/{r}/typing/{u}"),
        Some(&a),
        Some(&json!({ "typing": true })),
    );
    s.ok(
        "POST",
        &format!("{v3}/rooms/{r}/receipt/m.read/{}", enc(&ev)),
        Some(&a),
        Some(&json!({ "thread_id": "main" })),
    );
    e.check();
}

#[test]
fn event_bad_input_gets_the_exact_error() {
    let (s, _alice, a, room, mut e) = setup();
    let r = enc(&room);
    let ev = enc(&s.send(&a, &room, "t1", "x"));
    let v3 = "/_matrix/client/v3";
    for (method, path, body, want) in [
        (
            "PUT",
            format!("{v3}/rooms/{r}/redact/{ev}/t2"),
            Some(json!({ "reason": 5 })),
            (400, "M_BAD_JSON"),
        ),
        (
            "PUT",
            format!("{v3}/rooms/{r}/redact/not-an-event/t3"),
            Some(json!({})),
            (400, "M_INVALID_PARAM"),
        ),
        (
            "GET",
            format!("{v3}/rooms/{r}/state/m.room.create/?format=weird"),
            None,
            (400, "M_INVALID_PARAM"),
        ),
        (
            "GET",
            format!("{v3}/rooms/{r}/messages?dir=b&limit=ten"),
            None,
            (400, "M_INVALID_PARAM"),
        ),
        (
            "GET",
            format!("{v3}/rooms/{r}/messages"),
            None,
            (400, "M_INVALID_PARAM"),
        ),
        (
            "GET",
            format!("{v3}/rooms/{r}/context/{ev}?limit=-1"),
            None,
            (400, "M_INVALID_PARAM"),
        ),
        (
            "GET",
            format!("{v3}/rooms/{r}/event/not-an-event"),
            None,
            (400, "M_INVALID_PARAM"),
        ),
        (
            "PUT",
            format!("{v3}/rooms/{r}/state/m.room.canonical_alias/"),
            Some(json!({ "alias": "#nowhere:hearth.test" })),
            (400, "M_BAD_ALIAS"),
        ),
    ] {
        e.req(&s, method, &path, Some(&a), body.as_ref(), want);
    }
    for body in ["[]", "5", "\"x\""] {
        let got = raw_bytes(
            &s,
            "PUT",
            &format!("{v3}/rooms/{r}/send/m.room.message/t4"),
            &a,
            body.as_bytes(),
        );
        if got != (400, "M_BAD_JSON".to_owned()) {
            e.0.push(format!("send {body} -> {got:?}, want 400 M_BAD_JSON"));
        }
    }
    // The state routes without a state key still mean the empty one.
    s.ok(
        "PUT",
        &format!("{v3}/rooms/{r}/state/m.room.topic"),
        Some(&a),
        Some(&json!({ "topic": "t" })),
    );
    let v = s.ok(
        "GET",
        &format!("{v3}/rooms/{r}/state/m.room.topic?format=event"),
        Some(&a),
        None,
    );
    assert_eq!(
        (v["state_key"].as_str(), v["content"]["topic"].as_str()),
        (Some(""), Some("t"))
    );
    e.check();
}
