//! Client details the matrix-rust-sdk depends on (issue 14): the inviter in an invite's
//! stripped state, alias deletion updating `m.room.canonical_alias`, room summaries, joining a
//! room nobody is in, and long-polls that return a leave at once.
mod common;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn directory(alias: &str) -> String {
    format!("/_matrix/client/v3/directory/room/{}", enc(alias))
}

fn canonical(room: &str) -> String {
    format!(
        "/_matrix/client/v3/rooms/{}/state/m.room.canonical_alias/",
        enc(room)
    )
}

fn invite(s: &TestServer, tok: &str, room: &str, user: &str) {
    let path = format!("/_matrix/client/v3/rooms/{}/invite", enc(room));
    s.ok("POST", &path, Some(tok), Some(&json!({ "user_id": user })));
}

fn join(s: &TestServer, tok: &str, room: &str) {
    let path = format!("/_matrix/client/v3/join/{}", enc(room));
    s.ok("POST", &path, Some(tok), Some(&json!({})));
}

fn leave(s: &TestServer, tok: &str, room: &str) {
    let path = format!("/_matrix/client/v3/rooms/{}/leave", enc(room));
    s.ok("POST", &path, Some(tok), Some(&json!({})));
}

fn invite_state(sync: &Value, room: &str) -> Vec<Value> {
    sync["rooms"]["invite"][room]["invite_state"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn invite_state_carries_the_inviters_member_event() {
    let s = TestServer::start();
    let (alice, a) = s.register("alice");
    let (bob, b) = s.register("bob");
    let room = s.create_room(&a, json!({ "name": "Den", "topic": "warm" }));
    invite(&s, &a, &room, &bob);
    let events = invite_state(&s.sync(&b, "timeout=0"), &room);
    let member = |who: &str| {
        events
            .iter()
            .find(|e| e["type"] == "m.room.member" && e["state_key"] == who)
            .cloned()
    };
    let inviter = member(&alice).expect("the inviter's member event is in invite_state");
    assert_eq!(inviter["content"]["membership"], "join");
    assert_eq!(inviter["sender"], alice);
    let own = member(&bob).expect("the invitee's own invite is in invite_state");
    assert_eq!(own["content"]["membership"], "invite");
    assert_eq!(own["sender"], alice);
    for kind in [
        "m.room.create",
        "m.room.join_rules",
        "m.room.name",
        "m.room.topic",
    ] {
        assert!(
            events.iter().any(|e| e["type"] == kind),
            "{kind} in {events:?}"
        );
    }
}

#[test]
fn deleting_an_alias_removes_it_from_the_canonical_alias_event() {
    let s = TestServer::start();
    let (_alice, a) = s.register("alice");
    let room = s.create_room(
        &a,
        json!({ "preset": "public_chat", "visibility": "public", "room_alias_name": "main", "name": "Den" }),
    );
    let put = |alias: &str| {
        s.ok(
            "PUT",
            &directory(alias),
            Some(&a),
            Some(&json!({ "room_id": room })),
        )
    };
    put("#alt:hearth.test");
    put("#other:hearth.test");
    let path = canonical(&room);
    s.ok(
        "PUT",
        &path,
        Some(&a),
        Some(&json!({ "alias": "#main:hearth.test", "alt_aliases": ["#alt:hearth.test", "#other:hearth.test"] })),
    );
    let search = |term: &str| {
        s.ok(
            "POST",
            "/_matrix/client/v3/publicRooms",
            Some(&a),
            Some(&json!({ "filter": { "generic_search_term": term } })),
        )["chunk"]
            .as_array()
            .map(Vec::len)
            .unwrap_or(0)
    };
    assert_eq!(search("#main:hearth.test"), 1, "found by its alias");

    // Deleting the main alias clears `alias`; deleting an alt alias drops it from the list.
    s.ok("DELETE", &directory("#main:hearth.test"), Some(&a), None);
    let c = s.ok("GET", &path, Some(&a), None);
    assert!(c.get("alias").is_none(), "alias removed: {c}");
    assert_eq!(
        c["alt_aliases"],
        json!(["#alt:hearth.test", "#other:hearth.test"])
    );
    assert_eq!(
        search("#main:hearth.test"),
        0,
        "no longer found by the deleted alias"
    );

    s.ok("DELETE", &directory("#alt:hearth.test"), Some(&a), None);
    let c = s.ok("GET", &path, Some(&a), None);
    assert_eq!(c["alt_aliases"], json!(["#other:hearth.test"]));

    // An alias the event does not name changes nothing: no new state event.
    put("#spare:hearth.test");
    let before = s.ok("GET", &format!("{path}?format=event"), Some(&a), None)["event_id"].clone();
    s.ok("DELETE", &directory("#spare:hearth.test"), Some(&a), None);
    let after = s.ok("GET", &format!("{path}?format=event"), Some(&a), None)["event_id"].clone();
    assert_eq!(before, after);
}

#[test]
fn deleting_an_alias_without_power_leaves_the_event_alone() {
    let s = TestServer::start();
    let (_alice, a) = s.register("alice");
    let (bob, b) = s.register("bob");
    let room = s.create_room(&a, json!({ "preset": "public_chat" }));
    join(&s, &b, &room);
    // Bob creates an alias (he may: he is in the room) and Alice makes it canonical.
    s.ok(
        "PUT",
        &directory("#bobs:hearth.test"),
        Some(&b),
        Some(&json!({ "room_id": room })),
    );
    let path = canonical(&room);
    s.ok(
        "PUT",
        &path,
        Some(&a),
        Some(&json!({ "alias": "#bobs:hearth.test" })),
    );
    // Bob (power 0) deletes his own alias: allowed, but he may not send the state event.
    s.ok("DELETE", &directory("#bobs:hearth.test"), Some(&b), None);
    let c = s.ok("GET", &path, Some(&a), None);
    assert_eq!(c["alias"], "#bobs:hearth.test", "{bob} could not change it");
}

fn summary(s: &TestServer, tok: Option<&str>, room: &str) -> (u16, Value) {
    s.req(
        "GET",
        &format!("/_matrix/client/v1/room_summary/{}", enc(room)),
        tok,
        None,
    )
}

#[test]
fn room_summary_for_rooms_the_user_may_see() {
    let s = TestServer::start();
    let (_alice, a) = s.register("alice");
    let (bob, b) = s.register("bob");
    let (_carol, c) = s.register("carol");
    let public = s.create_room(
        &a,
        json!({ "preset": "public_chat", "name": "Open", "topic": "all welcome", "room_alias_name": "open" }),
    );
    s.ok(
        "PUT",
        &format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.avatar/",
            enc(&public)
        ),
        Some(&a),
        Some(&json!({ "url": "mxc://hearth.test/abc" })),
    );
    let v = {
        let (st, v) = summary(&s, Some(&c), &public);
        assert_eq!(st, 200, "{v}");
        v
    };
    assert_eq!(v["room_id"], public);
    assert_eq!(v["name"], "Open");
    assert_eq!(v["topic"], "all welcome");
    assert_eq!(v["avatar_url"], "mxc://hearth.test/abc");
    assert_eq!(v["canonical_alias"], "#open:hearth.test");
    assert_eq!(v["num_joined_members"], 1);
    assert_eq!(v["join_rule"], "public");
    assert_eq!(v["guest_can_join"], false);
    assert_eq!(v["world_readable"], false);
    assert_eq!(v["room_version"], "10");
    assert!(v.get("membership").is_none(), "carol is not in it: {v}");
    assert!(v.get("encryption").is_none());
    // By alias, and under the unstable path the SDK uses.
    let (st, by_alias) = summary(&s, Some(&c), "#open:hearth.test");
    assert_eq!((st, &by_alias["room_id"]), (200, &json!(public)));
    let (st, nheko) = s.req(
        "GET",
        &format!(
            "/_matrix/client/unstable/im.nheko.summary/summary/{}",
            enc(&public)
        ),
        Some(&c),
        None,
    );
    assert_eq!((st, &nheko["room_id"]), (200, &json!(public)));
    assert_eq!(summary(&s, Some(&a), &public).1["membership"], "join");

    // A private, encrypted room: hidden from outsiders (404), visible to the invited.
    let private = s.create_room(
        &a,
        json!({ "preset": "private_chat", "name": "Closed",
                 "initial_state": [{ "type": "m.room.encryption", "state_key": "",
                                     "content": { "algorithm": "m.megolm.v1.aes-sha2" } }] }),
    );
    let (st, e) = summary(&s, Some(&c), &private);
    assert_eq!((st, e["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    invite(&s, &a, &private, &bob);
    let (st, v) = summary(&s, Some(&b), &private);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["membership"], "invite");
    assert_eq!(v["join_rule"], "invite");
    assert_eq!(v["encryption"], "m.megolm.v1.aes-sha2");
    // Unknown rooms and aliases are 404 too.
    let (st, _) = summary(&s, Some(&c), "!nope:hearth.test");
    assert_eq!(st, 404);
    let (st, _) = summary(&s, Some(&c), "#nope:hearth.test");
    assert_eq!(st, 404);
    let (st, _) = summary(&s, Some(&c), "not a room");
    assert_eq!(st, 400);
}

#[test]
fn joining_a_room_everyone_left_is_not_found() {
    let s = TestServer::start();
    let (_alice, a) = s.register("alice");
    let (bob, b) = s.register("bob");
    let room = s.create_room(&a, json!({ "preset": "private_chat" }));
    invite(&s, &a, &room, &bob);
    leave(&s, &a, &room);
    // Bob still holds an invite, but nobody is left to authorise his join.
    s.err(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)),
        Some(&b),
        Some(&json!({})),
        404,
        "M_NOT_FOUND",
    );
    s.err(
        "POST",
        &format!("/_matrix/client/v3/join/{}", enc(&room)),
        Some(&b),
        Some(&json!({})),
        404,
        "M_NOT_FOUND",
    );
}

/// Runs `act` while a long-poll of `tok` from `since` is parked; returns the poll's answer and
/// how long it took.
fn poll_around(s: &TestServer, tok: &str, since: &str, act: impl FnOnce()) -> (Value, Duration) {
    let start = Instant::now();
    std::thread::scope(|scope| {
        let poll = scope.spawn(|| s.sync(tok, &format!("since={since}&timeout=20000")));
        std::thread::sleep(Duration::from_millis(300));
        act();
        let v = poll.join().expect("poll thread");
        (v, start.elapsed())
    })
}

#[test]
fn long_poll_returns_the_leave_at_once() {
    let s = TestServer::start();
    let (_alice, a) = s.register("alice");
    let (bob, b) = s.register("bob");
    let room = s.create_room(&a, json!({ "preset": "public_chat" }));
    let invited = s.create_room(&a, json!({ "preset": "private_chat" }));
    join(&s, &b, &room);
    invite(&s, &a, &invited, &bob);
    let first = s.sync(&b, "timeout=0");
    assert!(first["rooms"]["join"].get(&room).is_some());
    assert!(first["rooms"]["invite"].get(&invited).is_some());
    let since = first["next_batch"].as_str().unwrap().to_owned();

    // Leaving a joined room.
    let (v, took) = poll_around(&s, &b, &since, || {
        leave(&s, &b, &room);
    });
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(
        v["rooms"]["leave"][&room]["timeline"]["events"]
            .as_array()
            .and_then(|a| a.last())
            .map(|e| e["content"]["membership"].clone()),
        Some(json!("leave")),
        "{v}"
    );
    let since = v["next_batch"].as_str().unwrap().to_owned();

    // Rejecting an invite.
    let (v, took) = poll_around(&s, &b, &since, || {
        leave(&s, &b, &invited);
    });
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(v["rooms"]["leave"].get(&invited).is_some(), "{v}");
}

/// The matrix-rust-sdk declines an invite by leaving and at once forgetting the room, then
/// waits for the leave on its long-poll. Synapse sends a leave that is new since the token
/// even when the room is forgotten (forgotten rooms are left out of initial syncs only); so
/// must Hearth, or the poll waits its full timeout and the app shows the invite still there.
#[test]
fn a_declined_and_forgotten_invite_still_comes_down_the_long_poll() {
    let s = TestServer::start();
    let (_alice, a) = s.register("alice");
    let (bob, b) = s.register("bob");
    let room = s.create_room(&a, json!({ "preset": "private_chat" }));
    invite(&s, &a, &room, &bob);
    let first = s.sync(&b, "timeout=0");
    assert!(first["rooms"]["invite"].get(&room).is_some());
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let forget = format!("/_matrix/client/v3/rooms/{}/forget", enc(&room));
    let (v, took) = poll_around(&s, &b, &since, || {
        leave(&s, &b, &room);
        s.ok("POST", &forget, Some(&b), Some(&json!({})));
    });
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(v["rooms"]["leave"].get(&room).is_some(), "{v}");
    // Once sent, the leave is not sent again, and an initial sync leaves the room out even
    // when asked for left rooms.
    let next = v["next_batch"].as_str().unwrap();
    let again = s.sync(&b, &format!("since={next}&timeout=0"));
    assert!(again["rooms"]["leave"].get(&room).is_none(), "{again}");
    let filter = enc(&json!({ "room": { "include_leave": true } }).to_string());
    let initial = s.sync(&b, &format!("timeout=0&filter={filter}"));
    assert!(initial["rooms"]["leave"].get(&room).is_none(), "{initial}");
}
