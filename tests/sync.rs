//! `/sync`, profile, account data, typing, receipts, filters, push rules.
mod common;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn next(v: &Value) -> String {
    v["next_batch"].as_str().unwrap().to_owned()
}

#[test]
fn initial_incremental_limited_and_full_state() {
    let s = TestServer::start();
    let (_, a) = s.register("alice");
    let (bob, b) = s.register("bob");
    let room = s.create_room(&a, json!({ "name": "R", "invite": [bob.clone()] }));
    // Bob sees the invite with stripped state.
    let sb = s.sync(&b, "");
    let inv = &sb["rooms"]["invite"][&room]["invite_state"]["events"];
    assert!(inv
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "R"));
    assert!(inv
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["type"] == "m.room.member"
            && e["state_key"] == bob.as_str()
            && e["content"]["membership"] == "invite"));
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)),
        Some(&b),
        Some(&json!({})),
    );
    let sb2 = s.sync(&b, &format!("since={}", next(&sb)));
    let joined = &sb2["rooms"]["join"][&room];
    let all_events: Vec<&Value> = joined["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .chain(joined["timeline"]["events"].as_array().unwrap())
        .collect();
    assert!(
        all_events.iter().any(|e| e["type"] == "m.room.name"),
        "a newly joined room gets its state"
    );
    assert!(
        all_events.iter().any(|e| e["type"] == "m.room.create"),
        "a newly joined room gets its whole state: {joined}"
    );
    assert_eq!(joined["summary"]["m.joined_member_count"], 2);
    // Initial sync with the default limit of 10.
    for i in 0..15 {
        s.send(&a, &room, &format!("t{i}"), &format!("m{i}"));
    }
    let init = s.sync(&a, "");
    let tl = &init["rooms"]["join"][&room]["timeline"];
    assert_eq!(tl["limited"], true);
    assert_eq!(tl["events"].as_array().unwrap().len(), 10);
    assert_eq!(timeline_bodies(&init, &room).last().unwrap(), "m14");
    assert!(init["rooms"]["join"][&room]["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["type"] == "m.room.create"));
    // prev_batch paginates back from the timeline's start.
    let prev = tl["prev_batch"].as_str().unwrap();
    let page = s.ok(
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1&from={prev}",
            enc(&room)
        ),
        Some(&a),
        None,
    );
    assert_eq!(page["chunk"][0]["content"]["body"], "m4");
    // Incremental: only new events, not limited; nothing new = empty after timeout.
    let since = next(&init);
    s.send(&a, &room, "x1", "new");
    // Let the push evaluator count it for the room's other members first: its write takes a
    // stream position of its own, which would otherwise move the empty response's token.
    std::thread::sleep(Duration::from_millis(500));
    let inc = s.sync(&a, &format!("since={since}"));
    assert_eq!(timeline_bodies(&inc, &room), ["new"]);
    assert_eq!(inc["rooms"]["join"][&room]["timeline"]["limited"], false);
    let empty = s.sync(&a, &format!("since={}&timeout=50", next(&inc)));
    assert!(empty["rooms"]["join"].as_object().unwrap().is_empty());
    assert_eq!(next(&empty), next(&inc));
    // A gap larger than the limit is `limited`, with the state changed in the gap.
    let since = next(&inc);
    s.ok(
        "PUT",
        &format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.topic/",
            enc(&room)
        ),
        Some(&a),
        Some(&json!({ "topic": "gap" })),
    );
    for i in 0..12 {
        s.send(&a, &room, &format!("g{i}"), &format!("g{i}"));
    }
    let gap = s.sync(&a, &format!("since={since}"));
    let j = &gap["rooms"]["join"][&room];
    assert_eq!(j["timeline"]["limited"], true);
    assert!(j["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["type"] == "m.room.topic" && e["content"]["topic"] == "gap"));
    // full_state gives everything again.
    let full = s.sync(&a, &format!("since={}&full_state=true", next(&gap)));
    assert!(
        full["rooms"]["join"][&room]["state"]["events"]
            .as_array()
            .unwrap()
            .len()
            >= 5
    );
}

#[test]
fn long_poll_wakes_on_new_event_and_times_out_otherwise() {
    let s = TestServer::start();
    let (_, a) = s.register("alice");
    let room = s.create_room(&a, json!({}));
    let since = next(&s.sync(&a, ""));
    let t0 = Instant::now();
    let e = s.sync(&a, &format!("since={since}&timeout=300"));
    assert!(
        t0.elapsed() >= Duration::from_millis(280),
        "an empty long-poll waits for its timeout"
    );
    assert!(e["rooms"]["join"].as_object().unwrap().is_empty());
    let base = s.base.clone();
    let tok = a.clone();
    let since2 = since.clone();
    let poller = std::thread::spawn(move || {
        let t = Instant::now();
        let v: Value = ureq::get(&format!(
            "{base}/_matrix/client/v3/sync?since={since2}&timeout=20000"
        ))
        .set("Authorization", &format!("Bearer {tok}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
        (t.elapsed(), v)
    });
    std::thread::sleep(Duration::from_millis(200));
    s.send(&a, &room, "wake", "wake up");
    let (took, v) = poller.join().unwrap();
    assert_eq!(timeline_bodies(&v, &room), ["wake up"]);
    assert!(
        took < Duration::from_secs(5),
        "woken at once, took {took:?}"
    );
}

#[test]
fn leave_section_and_lazy_loading_filter() {
    let s = TestServer::start();
    let (_, a) = s.register("alice");
    let (_, b) = s.register("bob");
    let (_, c) = s.register("carol");
    let room = s.create_room(&a, json!({ "preset": "public_chat" }));
    for t in [&b, &c] {
        s.ok(
            "POST",
            &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)),
            Some(t),
            Some(&json!({})),
        );
    }
    let since = next(&s.sync(&b, ""));
    s.send(&c, &room, "c1", "from carol");
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)),
        Some(&b),
        Some(&json!({})),
    );
    s.send(&a, &room, "a1", "after bob left");
    let v = s.sync(&b, &format!("since={since}"));
    let left = &v["rooms"]["leave"][&room];
    let bodies: Vec<&str> = left["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(
        bodies,
        ["from carol"],
        "the leave section stops at the leave"
    );
    // Lazy loading: only the members of timeline senders (and the user).
    let filter =
        json!({ "room": { "state": { "lazy_load_members": true }, "timeline": { "limit": 1 } } });
    let f = s.ok(
        "POST",
        &format!(
            "/_matrix/client/v3/user/{}/filter",
            enc("@alice:hearth.test")
        ),
        Some(&a),
        Some(&filter),
    )["filter_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        s.ok(
            "GET",
            &format!(
                "/_matrix/client/v3/user/{}/filter/{f}",
                enc("@alice:hearth.test")
            ),
            Some(&a),
            None
        ),
        filter
    );
    let v = s.sync(&a, &format!("filter={f}"));
    let members: Vec<&str> = v["rooms"]["join"][&room]["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.member")
        .map(|e| e["state_key"].as_str().unwrap())
        .collect();
    assert_eq!(
        members,
        ["@alice:hearth.test"],
        "only the sender of the one timeline event"
    );
    let inline = enc(
        &json!({ "room": { "timeline": { "limit": 2, "types": ["m.room.message"] } } }).to_string(),
    );
    let v = s.sync(&a, &format!("filter={inline}"));
    assert_eq!(timeline_bodies(&v, &room), ["from carol", "after bob left"]);
}

#[test]
fn profile_account_data_typing_receipts() {
    let s = TestServer::start();
    let (alice, a) = s.register("alice");
    let (_, b) = s.register("bob");
    let room = s.create_room(&a, json!({ "preset": "public_chat" }));
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)),
        Some(&b),
        Some(&json!({})),
    );
    let since = next(&s.sync(&b, ""));
    // Profile: stored, readable, and copied into a member event.
    s.ok(
        "PUT",
        &format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice)),
        Some(&a),
        Some(&json!({ "displayname": "Alice A" })),
    );
    assert_eq!(
        s.ok(
            "GET",
            &format!("/_matrix/client/v3/profile/{}", enc(&alice)),
            None,
            None
        )["displayname"],
        "Alice A"
    );
    s.err(
        "PUT",
        &format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice)),
        Some(&b),
        Some(&json!({ "displayname": "x" })),
        403,
        "M_FORBIDDEN",
    );
    let m = s.ok(
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.member/{}",
            enc(&room),
            enc(&alice)
        ),
        Some(&b),
        None,
    );
    assert_eq!(m["displayname"], "Alice A");
    // Typing and receipts reach bob's sync as ephemeral events.
    s.ok(
        "PUT",
        &format!(
            "/_matrix/client/v3/rooms/{}/typing/{}",
            enc(&room),
            enc(&alice)
        ),
        Some(&a),
        Some(&json!({ "typing": true, "timeout": 10000 })),
    );
    let ev = s.send(&a, &room, "r", "read me");
    s.ok(
        "POST",
        &format!(
            "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
            enc(&room),
            enc(&ev)
        ),
        Some(&b),
        Some(&json!({})),
    );
    let v = s.sync(&b, &format!("since={since}"));
    let eph = v["rooms"]["join"][&room]["ephemeral"]["events"]
        .as_array()
        .unwrap()
        .clone();
    let typing = eph
        .iter()
        .find(|e| e["type"] == "m.typing")
        .expect("typing");
    assert_eq!(typing["content"]["user_ids"], json!([alice]));
    let rec = eph
        .iter()
        .find(|e| e["type"] == "m.receipt")
        .expect("receipt");
    assert!(rec["content"][&ev]["m.read"]["@bob:hearth.test"]["ts"].is_u64());
    // Stopping typing wakes a long-poll with an empty list.
    let since = next(&v);
    s.ok(
        "PUT",
        &format!(
            "/_matrix/client/v3/rooms/{}/typing/{}",
            enc(&room),
            enc(&alice)
        ),
        Some(&a),
        Some(&json!({ "typing": false })),
    );
    let v = s.sync(&b, &format!("since={since}&timeout=5000"));
    let eph = &v["rooms"]["join"][&room]["ephemeral"]["events"];
    assert_eq!(eph[0]["content"]["user_ids"], json!([]));
    // Account data, global and per room; read markers set m.fully_read.
    let since = next(&s.sync(&a, ""));
    s.ok(
        "PUT",
        &format!(
            "/_matrix/client/v3/user/{}/account_data/org.example.x",
            enc(&alice)
        ),
        Some(&a),
        Some(&json!({ "k": 1 })),
    );
    s.ok(
        "PUT",
        &format!(
            "/_matrix/client/v3/user/{}/rooms/{}/account_data/m.tag",
            enc(&alice),
            enc(&room)
        ),
        Some(&a),
        Some(&json!({ "tags": {} })),
    );
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/read_markers", enc(&room)),
        Some(&a),
        Some(&json!({ "m.fully_read": ev })),
    );
    assert_eq!(
        s.ok(
            "GET",
            &format!(
                "/_matrix/client/v3/user/{}/account_data/org.example.x",
                enc(&alice)
            ),
            Some(&a),
            None
        )["k"],
        1
    );
    s.err(
        "GET",
        &format!("/_matrix/client/v3/user/{}/account_data/none", enc(&alice)),
        Some(&a),
        None,
        404,
        "M_NOT_FOUND",
    );
    let v = s.sync(&a, &format!("since={since}"));
    assert!(v["account_data"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["type"] == "org.example.x"));
    let rad = v["rooms"]["join"][&room]["account_data"]["events"]
        .as_array()
        .unwrap();
    assert!(rad.iter().any(|e| e["type"] == "m.tag"));
    assert!(rad
        .iter()
        .any(|e| e["type"] == "m.fully_read" && e["content"]["event_id"] == ev));
}

#[test]
fn push_rules_default_and_edit() {
    let s = TestServer::start();
    let (_, a) = s.register("alice");
    let all = s.ok("GET", "/_matrix/client/v3/pushrules/", Some(&a), None);
    assert!(all["global"]["override"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["rule_id"] == ".m.rule.master"));
    assert!(all["global"]["underride"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["rule_id"] == ".m.rule.message"));
    s.ok(
        "PUT",
        "/_matrix/client/v3/pushrules/global/content/cats",
        Some(&a),
        Some(&json!({ "pattern": "cat", "actions": ["notify"] })),
    );
    assert_eq!(
        s.ok(
            "GET",
            "/_matrix/client/v3/pushrules/global/content/cats",
            Some(&a),
            None
        )["pattern"],
        "cat"
    );
    s.ok(
        "PUT",
        "/_matrix/client/v3/pushrules/global/override/.m.rule.master/enabled",
        Some(&a),
        Some(&json!({ "enabled": true })),
    );
    assert_eq!(
        s.ok(
            "GET",
            "/_matrix/client/v3/pushrules/global/override/.m.rule.master/enabled",
            Some(&a),
            None
        )["enabled"],
        true
    );
    s.ok(
        "DELETE",
        "/_matrix/client/v3/pushrules/global/content/cats",
        Some(&a),
        None,
    );
    s.err(
        "GET",
        "/_matrix/client/v3/pushrules/global/content/cats",
        Some(&a),
        None,
        404,
        "M_NOT_FOUND",
    );
    s.err(
        "PUT",
        "/_matrix/client/v3/pushrules/global/override/.m.rule.custom",
        Some(&a),
        Some(&json!({ "actions": [] })),
        400,
        "M_BAD_JSON",
    );
}

#[test]
fn versions_capabilities_metrics() {
    let s = TestServer::start();
    let (_, a) = s.register("alice");
    assert!(
        s.ok("GET", "/_matrix/client/versions", None, None)["versions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "v1.10")
    );
    let caps = s.ok("GET", "/_matrix/client/v3/capabilities", Some(&a), None);
    assert_eq!(caps["capabilities"]["m.room_versions"]["default"], "10");
    assert_eq!(
        caps["capabilities"]["m.room_versions"]["available"]["11"],
        "stable"
    );
    let text = ureq::get(&format!("{}/_hearth/metrics", s.base))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(text.contains("hearth_http_requests_in_flight 1"), "{text}");
    assert!(text.contains("hearth_http_requests_cancelled_total 0"));
    assert_eq!(
        s.ok("GET", "/_matrix/client/v3/pushers", Some(&a), None),
        json!({ "pushers": [] })
    );
    assert_eq!(
        s.ok("GET", "/_matrix/client/v3/account/3pid", Some(&a), None),
        json!({ "threepids": [] })
    );
    s.err(
        "GET",
        "/_matrix/client/v3/pushers",
        None,
        None,
        401,
        "M_MISSING_TOKEN",
    );
    // r0 aliases still work.
    assert_eq!(
        s.ok("GET", "/_matrix/client/r0/account/whoami", Some(&a), None)["user_id"],
        "@alice:hearth.test"
    );
}

#[test]
fn typing_expires_and_wakes_long_polls() {
    let s = TestServer::start();
    let (alice, a) = s.register("alice");
    let room = s.create_room(&a, json!({}));
    s.ok(
        "PUT",
        &format!(
            "/_matrix/client/v3/rooms/{}/typing/{}",
            enc(&room),
            enc(&alice)
        ),
        Some(&a),
        Some(&json!({ "typing": true, "timeout": 300 })),
    );
    let v = s.sync(&a, "");
    assert_eq!(
        v["rooms"]["join"][&room]["ephemeral"]["events"][0]["content"]["user_ids"],
        json!([alice])
    );
    let t = Instant::now();
    let v = s.sync(&a, &format!("since={}&timeout=10000", next(&v)));
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "woken by the expiry, not the long-poll timeout"
    );
    assert_eq!(
        v["rooms"]["join"][&room]["ephemeral"]["events"][0]["content"]["user_ids"],
        json!([])
    );
}

#[test]
fn a_rejected_invite_reveals_no_history() {
    let s = TestServer::start();
    let (_, a) = s.register("alice");
    let (bob, b) = s.register("bob");
    let room = s.create_room(
        &a,
        json!({ "preset": "private_chat", "name": "secret room" }),
    );
    s.send(&a, &room, "1", "secret message");
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)),
        Some(&a),
        Some(&json!({ "user_id": bob })),
    );
    let since = next(&s.sync(&b, ""));
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)),
        Some(&b),
        Some(&json!({})),
    );
    let v = s.sync(&b, &format!("since={since}"));
    let left = &v["rooms"]["leave"][&room];
    let events = left["timeline"]["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{left}");
    assert_eq!(events[0]["content"]["membership"], "leave");
    assert!(left["state"]["events"].as_array().unwrap().is_empty());
}

#[test]
fn user_directory_finds_people_in_shared_and_public_rooms() {
    let s = TestServer::start();
    let (_, a) = s.register("alice");
    let (_, b) = s.register("bob");
    let (_, _c) = s.register("bobby");
    let search = |tok: &str, term: &str| -> Vec<String> {
        let v = s.ok(
            "POST",
            "/_matrix/client/v3/user_directory/search",
            Some(tok),
            Some(&json!({ "search_term": term })),
        );
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["user_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(search(&a, "bob").is_empty(), "no shared or public room yet");
    let room = s.create_room(&a, json!({ "preset": "private_chat" }));
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)),
        Some(&a),
        Some(&json!({ "user_id": "@bob:hearth.test" })),
    );
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)),
        Some(&b),
        Some(&json!({})),
    );
    assert_eq!(
        search(&a, "BOB"),
        ["@bob:hearth.test"],
        "bobby shares no room with alice"
    );
    s.err(
        "POST",
        "/_matrix/client/v3/user_directory/search",
        Some(&a),
        Some(&json!({})),
        400,
        "M_BAD_JSON",
    );
}
