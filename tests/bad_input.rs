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
        ("PUT", "/_matrix/client/v3/devices/{id}"),
        ("DELETE", "/_matrix/client/v3/devices/{id}"),
        ("POST", "/_matrix/client/v3/delete_devices"),
        ("POST", "/_matrix/client/v3/account/password"),
        ("POST", "/_matrix/client/v3/login"),
        ("POST", "/_matrix/client/v3/register"),
        ("GET", "/_matrix/client/v3/register/available?username={id}"),
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
