//! Rooms, membership, events, state, pagination, redaction — over real HTTP.
mod common;
use common::*;
use serde_json::{json, Value};

fn state(s: &TestServer, tok: &str, room: &str, kind: &str, key: &str) -> (u16, Value) {
    s.req(
        "GET",
        &format!("/_matrix/client/v3/rooms/{}/state/{kind}/{key}", enc(room)),
        Some(tok),
        None,
    )
}

#[test]
fn create_room_with_presets_alias_and_initial_state() {
    let s = TestServer::start();
    let (alice, a) = s.register("alice");
    let (bob, _b) = s.register("bob");
    let room = s.create_room(&a, json!({
        "preset": "public_chat", "name": "Hearth", "topic": "warm", "room_alias_name": "hearth",
        "visibility": "public",
        "initial_state": [{ "type": "m.room.guest_access", "state_key": "", "content": { "guest_access": "can_join" } }],
        "power_level_content_override": { "events_default": 10 },
        "invite": [bob.clone()]
    }));
    assert!(room.starts_with('!') && room.ends_with(":hearth.test"));
    assert_eq!(state(&s, &a, &room, "m.room.name", "").1["name"], "Hearth");
    assert_eq!(state(&s, &a, &room, "m.room.topic", "").1["topic"], "warm");
    assert_eq!(
        state(&s, &a, &room, "m.room.join_rules", "").1["join_rule"],
        "public"
    );
    assert_eq!(
        state(&s, &a, &room, "m.room.guest_access", "").1["guest_access"],
        "can_join",
        "initial_state overrides the preset"
    );
    let pl = state(&s, &a, &room, "m.room.power_levels", "").1;
    assert_eq!(pl["users"][&alice], 100);
    assert_eq!(pl["events_default"], 10);
    assert_eq!(
        state(&s, &a, &room, "m.room.member", &enc(&bob)).1["membership"],
        "invite"
    );
    let create = s.ok(
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.create/?format=event",
            enc(&room)
        ),
        Some(&a),
        None,
    );
    assert_eq!(create["content"]["room_version"], "10");
    assert_eq!(create["sender"], alice);
    // Alias resolves; taken alias is M_ROOM_IN_USE.
    let r = s.ok(
        "GET",
        &format!(
            "/_matrix/client/v3/directory/room/{}",
            enc("#hearth:hearth.test")
        ),
        None,
        None,
    );
    assert_eq!(r["room_id"], room);
    s.err(
        "POST",
        "/_matrix/client/v3/createRoom",
        Some(&a),
        Some(&json!({ "room_alias_name": "hearth" })),
        400,
        "M_ROOM_IN_USE",
    );
    // Public directory lists it.
    let dir = s.ok("GET", "/_matrix/client/v3/publicRooms", None, None);
    assert_eq!(dir["chunk"][0]["room_id"], room);
    assert_eq!(dir["chunk"][0]["name"], "Hearth");
    assert_eq!(dir["chunk"][0]["num_joined_members"], 1);
    // Room versions: explicit 11 works and has no `creator`.
    let r11 = s.create_room(&a, json!({ "room_version": "11" }));
    let c11 = s.ok(
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.create/",
            enc(&r11)
        ),
        Some(&a),
        None,
    );
    assert_eq!(c11["room_version"], "11");
    assert!(c11.get("creator").is_none());
}

#[test]
fn membership_join_invite_kick_ban_unban_leave_forget() {
    let s = TestServer::start();
    let (_alice, a) = s.register("alice");
    let (bob, b) = s.register("bob");
    let private = s.create_room(&a, json!({ "preset": "private_chat" }));
    // Invite-only: bob cannot join uninvited.
    s.err(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/join", enc(&private)),
        Some(&b),
        Some(&json!({})),
        403,
        "M_FORBIDDEN",
    );
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/invite", enc(&private)),
        Some(&a),
        Some(&json!({ "user_id": bob })),
    );
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/join/{}", enc(&private)),
        Some(&b),
        Some(&json!({})),
    );
    assert_eq!(
        s.ok("GET", "/_matrix/client/v3/joined_rooms", Some(&b), None)["joined_rooms"],
        json!([private])
    );
    let jm = s.ok(
        "GET",
        &format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&private)),
        Some(&a),
        None,
    );
    assert_eq!(jm["joined"].as_object().unwrap().len(), 2);
    assert_eq!(jm["joined"][&bob]["display_name"], "bob");
    // Bob (power 0) cannot kick alice.
    let alice_id = "@alice:hearth.test";
    s.err(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/kick", enc(&private)),
        Some(&b),
        Some(&json!({ "user_id": alice_id })),
        403,
        "M_FORBIDDEN",
    );
    // Kick, then bob may not rejoin without invite.
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/kick", enc(&private)),
        Some(&a),
        Some(&json!({ "user_id": bob, "reason": "bye" })),
    );
    let m = state(&s, &a, &private, "m.room.member", &enc(&bob)).1;
    assert_eq!(
        (m["membership"].as_str(), m["reason"].as_str()),
        (Some("leave"), Some("bye"))
    );
    s.err(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/join", enc(&private)),
        Some(&b),
        Some(&json!({})),
        403,
        "M_FORBIDDEN",
    );
    // Ban and unban in a public room.
    let public = s.create_room(
        &a,
        json!({ "preset": "public_chat", "room_alias_name": "pub" }),
    );
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/join/{}", enc("#pub:hearth.test")),
        Some(&b),
        Some(&json!({})),
    );
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/ban", enc(&public)),
        Some(&a),
        Some(&json!({ "user_id": bob })),
    );
    s.err(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/join", enc(&public)),
        Some(&b),
        Some(&json!({})),
        403,
        "M_FORBIDDEN",
    );
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/unban", enc(&public)),
        Some(&a),
        Some(&json!({ "user_id": bob })),
    );
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/join", enc(&public)),
        Some(&b),
        Some(&json!({})),
    );
    // Leave then forget; forgetting while joined is refused.
    s.err(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/forget", enc(&public)),
        Some(&b),
        Some(&json!({})),
        400,
        "M_BAD_STATE",
    );
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/leave", enc(&public)),
        Some(&b),
        Some(&json!({})),
    );
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/forget", enc(&public)),
        Some(&b),
        Some(&json!({})),
    );
    assert_eq!(
        s.ok("GET", "/_matrix/client/v3/joined_rooms", Some(&b), None)["joined_rooms"],
        json!([])
    );
    // Unknown room.
    s.err(
        "POST",
        "/_matrix/client/v3/rooms/!missing:hearth.test/join",
        Some(&b),
        Some(&json!({})),
        404,
        "M_NOT_FOUND",
    );
}

#[test]
fn send_is_idempotent_per_device_and_messages_paginate() {
    let s = TestServer::start();
    let (_, a) = s.register("alice");
    let room = s.create_room(&a, json!({}));
    let e1 = s.send(&a, &room, "t1", "one");
    assert!(e1.starts_with('$'));
    assert_eq!(
        s.send(&a, &room, "t1", "one again"),
        e1,
        "a retried txnId returns the same event"
    );
    // Another device of the same user has its own txn namespace.
    let a2 = s.ok(
        "POST",
        "/_matrix/client/v3/login",
        None,
        Some(&json!({ "type": "m.login.password", "user": "alice", "password": "pw-alice" })),
    )["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(s.send(&a2, &room, "t1", "other device"), e1);
    for i in 0..20 {
        s.send(&a, &room, &format!("m{i}"), &format!("msg {i}"));
    }
    // Backwards from the end, 5 at a time, until exhausted.
    let mut seen = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..20 {
        let q = match &from {
            Some(f) => format!("dir=b&limit=5&from={f}"),
            None => "dir=b&limit=5".into(),
        };
        let page = s.ok(
            "GET",
            &format!("/_matrix/client/v3/rooms/{}/messages?{q}", enc(&room)),
            Some(&a),
            None,
        );
        for e in page["chunk"].as_array().unwrap() {
            seen.push(
                e["type"].as_str().unwrap().to_owned()
                    + ":"
                    + e["content"]["body"].as_str().unwrap_or(""),
            );
        }
        match page["end"].as_str() {
            Some(e) => from = Some(e.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.first().unwrap(), "m.room.message:msg 19");
    assert_eq!(
        seen.iter()
            .filter(|x| x.starts_with("m.room.message"))
            .count(),
        22
    );
    assert_eq!(
        seen.last().unwrap(),
        "m.room.create:",
        "pagination reaches the start of the room"
    );
    // Forwards with a type filter.
    let f = enc(&json!({ "types": ["m.room.message"] }).to_string());
    let page = s.ok(
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=f&limit=3&filter={f}",
            enc(&room)
        ),
        Some(&a),
        None,
    );
    let bodies: Vec<&str> = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["content"]["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["one", "other device", "msg 0"]);
    // transaction_id only for the sending device.
    let ev = s.ok(
        "GET",
        &format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&e1)),
        Some(&a),
        None,
    );
    assert_eq!(ev["unsigned"]["transaction_id"], "t1");
    let ev2 = s.ok(
        "GET",
        &format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&e1)),
        Some(&a2),
        None,
    );
    assert!(ev2["unsigned"].get("transaction_id").is_none());
    // Context around an event.
    let ctx = s.ok(
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/context/{}?limit=4",
            enc(&room),
            enc(&e1)
        ),
        Some(&a),
        None,
    );
    assert_eq!(ctx["event"]["event_id"], e1);
    assert_eq!(ctx["events_after"].as_array().unwrap().len(), 2);
    assert_eq!(ctx["events_before"].as_array().unwrap().len(), 2);
    assert!(ctx["state"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["type"] == "m.room.create"));
}

#[test]
fn outsiders_see_nothing_and_leavers_see_until_they_left() {
    let s = TestServer::start();
    let (_, a) = s.register("alice");
    let (_, b) = s.register("bob");
    let (_, c) = s.register("carol");
    let room = s.create_room(&a, json!({ "preset": "public_chat" }));
    let before = s.send(&a, &room, "1", "before");
    s.err(
        "GET",
        &format!("/_matrix/client/v3/rooms/{}/messages?dir=b", enc(&room)),
        Some(&c),
        None,
        403,
        "M_FORBIDDEN",
    );
    s.err(
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/event/{}",
            enc(&room),
            enc(&before)
        ),
        Some(&c),
        None,
        403,
        "M_FORBIDDEN",
    );
    s.err(
        "GET",
        &format!("/_matrix/client/v3/rooms/{}/state", enc(&room)),
        Some(&c),
        None,
        403,
        "M_FORBIDDEN",
    );
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)),
        Some(&b),
        Some(&json!({})),
    );
    s.send(&a, &room, "2", "while bob was in");
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)),
        Some(&b),
        Some(&json!({})),
    );
    let after = s.send(&a, &room, "3", "after bob left");
    s.err(
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/event/{}",
            enc(&room),
            enc(&after)
        ),
        Some(&b),
        None,
        404,
        "M_NOT_FOUND",
    );
    let page = s.ok(
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50",
            enc(&room)
        ),
        Some(&b),
        None,
    );
    let bodies: Vec<&str> = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(bodies, ["while bob was in", "before"]);
    // Bob (no longer joined) cannot send.
    let path = format!(
        "/_matrix/client/v3/rooms/{}/send/m.room.message/x",
        enc(&room)
    );
    s.err(
        "PUT",
        &path,
        Some(&b),
        Some(&json!({ "body": "hi" })),
        403,
        "M_FORBIDDEN",
    );
}

#[test]
fn state_power_levels_and_redaction() {
    let s = TestServer::start();
    let (_, a) = s.register("alice");
    let (bob, b) = s.register("bob");
    let room = s.create_room(&a, json!({ "preset": "public_chat" }));
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)),
        Some(&b),
        Some(&json!({})),
    );
    // Bob lacks power for the name; alice sets it and the previous content shows in unsigned.
    s.err(
        "PUT",
        &format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(&room)),
        Some(&b),
        Some(&json!({ "name": "bob's" })),
        403,
        "M_FORBIDDEN",
    );
    s.ok(
        "PUT",
        &format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(&room)),
        Some(&a),
        Some(&json!({ "name": "first" })),
    );
    s.ok(
        "PUT",
        &format!("/_matrix/client/v3/rooms/{}/state/m.room.name", enc(&room)),
        Some(&a),
        Some(&json!({ "name": "second" })),
    );
    let ev = s.ok(
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.name/?format=event",
            enc(&room)
        ),
        Some(&a),
        None,
    );
    assert_eq!(ev["content"]["name"], "second");
    assert_eq!(ev["unsigned"]["prev_content"]["name"], "first");
    let all = s.ok(
        "GET",
        &format!("/_matrix/client/v3/rooms/{}/state", enc(&room)),
        Some(&b),
        None,
    );
    assert!(all
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "second"));
    s.err(
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.avatar/",
            enc(&room)
        ),
        Some(&a),
        None,
        404,
        "M_NOT_FOUND",
    );
    // canonical_alias must point at a real alias of this room.
    s.err(
        "PUT",
        &format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.canonical_alias/",
            enc(&room)
        ),
        Some(&a),
        Some(&json!({ "alias": "#nope:hearth.test" })),
        400,
        "M_BAD_ALIAS",
    );
    // Redaction: bob may redact his own message but not alice's.
    let mine = s.send(&b, &room, "b1", "secret");
    let hers = s.send(&a, &room, "a1", "hers");
    s.err(
        "PUT",
        &format!(
            "/_matrix/client/v3/rooms/{}/redact/{}/r1",
            enc(&room),
            enc(&hers)
        ),
        Some(&b),
        Some(&json!({})),
        403,
        "M_FORBIDDEN",
    );
    s.ok(
        "PUT",
        &format!(
            "/_matrix/client/v3/rooms/{}/redact/{}/r2",
            enc(&room),
            enc(&mine)
        ),
        Some(&b),
        Some(&json!({ "reason": "oops" })),
    );
    let ev = s.ok(
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/event/{}",
            enc(&room),
            enc(&mine)
        ),
        Some(&a),
        None,
    );
    assert_eq!(ev["content"], json!({}), "redacted content is stripped");
    assert_eq!(
        ev["unsigned"]["redacted_because"]["content"]["reason"],
        "oops"
    );
    // Alice (power 100) may redact bob's.
    let other = s.send(&b, &room, "b2", "another");
    s.ok(
        "PUT",
        &format!(
            "/_matrix/client/v3/rooms/{}/redact/{}/r3",
            enc(&room),
            enc(&other)
        ),
        Some(&a),
        Some(&json!({})),
    );
    // Members list with a membership filter.
    let m = s.ok(
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/members?membership=join",
            enc(&room)
        ),
        Some(&a),
        None,
    );
    let users: Vec<&str> = m["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state_key"].as_str().unwrap())
        .collect();
    assert!(users.contains(&bob.as_str()) && users.len() == 2);
}

#[test]
fn events_are_signed_pdus_with_reference_hash_ids() {
    let s = TestServer::start();
    let (_, a) = s.register("alice");
    let room = s.create_room(&a, json!({}));
    let id = s.send(&a, &room, "x", "signed");
    let app = s.hs().app().clone();
    let id2 = id.clone();
    let (json, version): (String, String) = smol::block_on(app.store.read(move |c| {
        let row = hearth::store::queries::get_event(c, &id2)?.unwrap();
        Ok((row.json, "10".to_owned()))
    }))
    .unwrap();
    let obj: ruma::CanonicalJsonObject = serde_json::from_str(&json).unwrap();
    let rules = ruma::RoomVersionId::try_from(version.as_str())
        .unwrap()
        .rules()
        .unwrap();
    let hash = ruma::signatures::reference_hash(&obj, &rules).unwrap();
    assert_eq!(format!("${hash}"), id, "event ID is the reference hash");
    // Verify the signature with the server's public key.
    let key = &app.local.key.pair;
    let pubkey = ruma::serde::Base64::new(key.public_key().to_vec());
    let mut keys = std::collections::BTreeMap::new();
    keys.insert(format!("ed25519:{}", key.version()), pubkey);
    let mut map = ruma::signatures::PublicKeyMap::new();
    map.insert("hearth.test".to_owned(), keys);
    let verified = ruma::signatures::verify_event(&map, &obj, &rules).unwrap();
    assert_eq!(verified, ruma::signatures::Verified::All);
    // Tampering breaks it.
    let mut bad = obj.clone();
    bad.insert(
        "depth".into(),
        ruma::CanonicalJsonValue::Integer(ruma::Int::from(99u32)),
    );
    assert!(ruma::signatures::verify_event(&map, &bad, &rules).is_err());
}

#[test]
fn oversized_events_are_refused() {
    let s = TestServer::start();
    let (_, a) = s.register("alice");
    let room = s.create_room(&a, json!({}));
    let big = "x".repeat(70_000);
    let path = format!(
        "/_matrix/client/v3/rooms/{}/send/m.room.message/big",
        enc(&room)
    );
    s.err(
        "PUT",
        &path,
        Some(&a),
        Some(&json!({ "msgtype": "m.text", "body": big })),
        413,
        "M_TOO_LARGE",
    );
    let path = format!(
        "/_matrix/client/v3/rooms/{}/send/m.room.message/float",
        enc(&room)
    );
    s.err(
        "PUT",
        &path,
        Some(&a),
        Some(&json!({ "n": 1.5 })),
        400,
        "M_BAD_JSON",
    );
    // Nothing was stored for either.
    let page = s.ok(
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50",
            enc(&room)
        ),
        Some(&a),
        None,
    );
    assert!(page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["type"] != "m.room.message"));
}
