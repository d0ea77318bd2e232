//! `POST /search` (room events over the FTS5 index) and `GET /voip/turnServer`.

mod common;

use std::collections::BTreeSet;

use base64::Engine;
use common::{enc, ManualClock, TestServer};
use serde_json::{json, Value};

const SEARCH: &str = "/_matrix/client/v3/search";

/// Runs a search for `term` with extra criteria merged into `room_events`.
fn search(s: &TestServer, token: &str, term: &str, extra: Value) -> Value {
    search_from(s, token, term, extra, None)
}

fn search_from(
    s: &TestServer,
    token: &str,
    term: &str,
    extra: Value,
    next_batch: Option<&str>,
) -> Value {
    let mut crit = json!({ "search_term": term });
    if let (Some(c), Some(e)) = (crit.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    let path = match next_batch {
        Some(b) => format!("{SEARCH}?next_batch={}", enc(b)),
        None => SEARCH.to_owned(),
    };
    s.ok(
        "POST",
        &path,
        Some(token),
        Some(&json!({ "search_categories": { "room_events": crit } })),
    )["search_categories"]["room_events"]
        .clone()
}

/// The event IDs of a search answer, in order.
fn ids(res: &Value) -> Vec<String> {
    res["results"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| r["result"]["event_id"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn bodies(res: &Value) -> Vec<String> {
    res["results"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    let c = &r["result"]["content"];
                    c["body"]
                        .as_str()
                        .or(c["name"].as_str())
                        .or(c["topic"].as_str())
                        .unwrap_or_default()
                        .to_owned()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn put(s: &TestServer, token: &str, room: &str, kind: &str, txn: &str, content: Value) -> String {
    s.ok(
        "PUT",
        &format!("/_matrix/client/v3/rooms/{}/send/{kind}/{txn}", enc(room)),
        Some(token),
        Some(&content),
    )["event_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn join(s: &TestServer, token: &str, room: &str) {
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/join/{}", enc(room)),
        Some(token),
        Some(&json!({})),
    );
}

#[test]
fn search_finds_words_by_key_with_highlights_not_in_encrypted_events() {
    let s = TestServer::start();
    let (_, alice) = s.register("alice");
    let room = s.create_room(
        &alice,
        json!({ "name": "Cooking club", "topic": "Recipes for everyone" }),
    );
    let baking = s.send(&alice, &room, "t1", "I love baking bread");
    s.send(&alice, &room, "t2", "the weather is nice");
    let baked = s.send(&alice, &room, "t3", "Baked potatoes, anyone?");
    // Ciphertext is opaque to the server: nothing of it is indexed.
    put(
        &s,
        &alice,
        &room,
        "m.room.encrypted",
        "t4",
        json!({ "algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "bake bread", "sender_key": "k", "session_id": "s", "device_id": "D" }),
    );

    // Stemming and prefixes: "bake" finds "baking" and "Baked".
    let res = search(&s, &alice, "bake", json!({}));
    let found: BTreeSet<String> = ids(&res).into_iter().collect();
    assert_eq!(found, BTreeSet::from([baking.clone(), baked.clone()]));
    assert_eq!(res["count"], 2);
    let hl: BTreeSet<String> = res["highlights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(hl, BTreeSet::from(["Baked".into(), "baking".into()]));
    let first = &res["results"][0];
    assert_eq!(first["result"]["room_id"], room.as_str());
    assert!(first["rank"].as_f64().unwrap() > 0.0, "{first}");
    assert!(first.get("context").is_none(), "no context unless asked");

    // Both words must be there (AND), unless `or` is said.
    assert_eq!(
        ids(&search(&s, &alice, "bread potatoes", json!({}))),
        Vec::<String>::new()
    );
    assert_eq!(
        search(&s, &alice, "bread or potatoes", json!({}))["count"],
        2
    );
    assert_eq!(
        ids(&search(&s, &alice, "bake -bread", json!({}))),
        vec![baked.clone()]
    );
    assert_eq!(
        ids(&search(&s, &alice, "\"baking bread\"", json!({}))),
        vec![baking]
    );

    // The room name and topic are indexed under their keys; `keys` narrows.
    assert_eq!(
        bodies(&search(&s, &alice, "cooking", json!({}))),
        vec!["Cooking club"]
    );
    assert_eq!(
        bodies(&search(&s, &alice, "recipes", json!({}))),
        vec!["Recipes for everyone"]
    );
    assert_eq!(
        search(
            &s,
            &alice,
            "cooking",
            json!({ "keys": ["content.body", "content.topic"] })
        )["count"],
        0
    );
    assert_eq!(
        search(&s, &alice, "cooking", json!({ "keys": ["content.name"] }))["count"],
        1
    );
    // Filter types narrow too; an unknown key matches nothing (as Synapse).
    assert_eq!(
        search(
            &s,
            &alice,
            "cooking",
            json!({ "filter": { "types": ["m.room.message"] } })
        )["count"],
        0
    );
    assert_eq!(
        search(&s, &alice, "bake", json!({ "keys": ["content.other"] }))["count"],
        0
    );
    // Nothing searchable in the term: no results, not an error; FTS5 syntax is taken
    // literally.
    for term in [
        " -- ",
        "_",
        "__ _",
        "\"",
        "*",
        "NEAR(a b)",
        "a AND",
        "^x",
        "\u{301}",
        "x:y",
    ] {
        let res = search(&s, &alice, term, json!({}));
        assert!(res["count"].as_u64().is_some(), "{term:?}: {res}");
    }
    assert_eq!(search(&s, &alice, " -- ", json!({}))["count"], 0);
    // The sender filter.
    assert_eq!(
        search(
            &s,
            &alice,
            "bake",
            json!({ "filter": { "not_senders": ["@alice:hearth.test"] } })
        )["count"],
        0
    );
}

#[test]
fn rank_puts_the_best_match_first_and_recent_the_newest() {
    let s = TestServer::start();
    let (_, alice) = s.register("alice");
    let room = s.create_room(&alice, json!({}));
    let dense = s.send(&alice, &room, "a", "apple apple apple");
    let sparse = s.send(
        &alice,
        &room,
        "b",
        "one apple among a great many other words that dilute how relevant this one is",
    );
    let newest = s.send(
        &alice,
        &room,
        "c",
        "an apple and a pear and some more words here",
    );
    let rank = search(&s, &alice, "apple", json!({}));
    assert_eq!(ids(&rank)[0], dense, "rank is the default order");
    let r: Vec<f64> = rank["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["rank"].as_f64().unwrap())
        .collect();
    assert!(r.windows(2).all(|w| w[0] >= w[1]), "ranks descend: {r:?}");
    let recent = search(&s, &alice, "apple", json!({ "order_by": "recent" }));
    assert_eq!(ids(&recent), vec![newest, sparse, dense]);
}

#[test]
fn pagination_with_next_batch_returns_every_result_once() {
    let s = TestServer::start();
    let (_, alice) = s.register("alice");
    let room = s.create_room(&alice, json!({}));
    let other = s.create_room(&alice, json!({}));
    let mut sent = BTreeSet::new();
    for i in 0..23 {
        // Two rooms, and repeated words so ranks tie.
        let r = if i % 3 == 0 { &other } else { &room };
        let body = format!("page {} {}", i, "filler ".repeat(i % 4));
        sent.insert(s.send(&alice, r, &format!("p{i}"), &body));
    }
    s.send(&alice, &room, "x", "unrelated");
    for order in ["rank", "recent"] {
        let mut seen = Vec::new();
        let mut batch: Option<String> = None;
        for _ in 0..10 {
            let res = search_from(
                &s,
                &alice,
                "page",
                json!({ "order_by": order, "filter": { "limit": 5 } }),
                batch.as_deref(),
            );
            assert_eq!(res["count"], 23, "{order}: count is of all results");
            let page = ids(&res);
            assert!(page.len() <= 5);
            seen.extend(page);
            match res["next_batch"].as_str() {
                Some(b) => batch = Some(b.to_owned()),
                None => break,
            }
        }
        let unique: BTreeSet<String> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "{order}: no result twice");
        assert_eq!(unique, sent, "{order}: every result once");
    }
    // Filters: only one room, or all but it.
    let only = search(
        &s,
        &alice,
        "page",
        json!({ "filter": { "rooms": [other], "limit": 50 } }),
    );
    assert_eq!(only["count"], 8);
    assert!(only.get("next_batch").is_none());
    let not = search(
        &s,
        &alice,
        "page",
        json!({ "filter": { "not_rooms": [other] } }),
    );
    assert_eq!(not["count"], 15);
    assert_eq!(ids(&not).len(), 10, "the default limit is 10");
}

#[test]
fn only_what_the_user_may_see_is_found() {
    let s = TestServer::start();
    let (_, alice) = s.register("alice");
    let (_, bob) = s.register("bob");
    let (_, carol) = s.register("carol");
    let room = s.create_room(
        &alice,
        json!({ "preset": "public_chat", "initial_state": [{ "type": "m.room.history_visibility", "state_key": "", "content": { "history_visibility": "joined" } }] }),
    );
    s.send(&alice, &room, "1", "secret before bob joined");
    // Not in the room: nothing, even when naming it.
    assert_eq!(search(&s, &bob, "secret", json!({}))["count"], 0);
    assert_eq!(
        ids(&search(
            &s,
            &bob,
            "secret",
            json!({ "filter": { "rooms": [room] } })
        )),
        Vec::<String>::new()
    );
    join(&s, &bob, &room);
    let during = s.send(&alice, &room, "2", "secret while bob is here");
    // History visibility `joined`: what was said before bob joined stays hidden.
    assert_eq!(
        ids(&search(&s, &bob, "secret", json!({}))),
        vec![during.clone()]
    );
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)),
        Some(&bob),
        Some(&json!({})),
    );
    s.send(&alice, &room, "3", "secret after bob left");
    // After leaving: what bob could read is still found, nothing later.
    assert_eq!(ids(&search(&s, &bob, "secret", json!({}))), vec![during]);
    assert_eq!(search(&s, &alice, "secret", json!({}))["count"], 3);
    // A user who never joined finds nothing.
    assert_eq!(search(&s, &carol, "secret", json!({}))["count"], 0);
}

#[test]
fn redaction_removes_the_text_from_the_index() {
    let s = TestServer::start();
    let (_, alice) = s.register("alice");
    let room = s.create_room(&alice, json!({}));
    let gone = s.send(&alice, &room, "1", "embarrassing typo");
    let kept = s.send(&alice, &room, "2", "another typo");
    assert_eq!(search(&s, &alice, "typo", json!({}))["count"], 2);
    s.ok(
        "PUT",
        &format!(
            "/_matrix/client/v3/rooms/{}/redact/{}/r1",
            enc(&room),
            enc(&gone)
        ),
        Some(&alice),
        Some(&json!({})),
    );
    let res = search(&s, &alice, "typo", json!({}));
    assert_eq!(ids(&res), vec![kept]);
    assert_eq!(res["count"], 1);
    assert_eq!(search(&s, &alice, "embarrassing", json!({}))["count"], 0);
}

#[test]
fn event_context_profiles_state_and_groups() {
    let s = TestServer::start();
    let (alice_id, alice) = s.register("alice");
    s.ok(
        "PUT",
        &format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice_id)),
        Some(&alice),
        Some(&json!({ "displayname": "Alice A." })),
    );
    let room = s.create_room(&alice, json!({ "name": "Context room" }));
    let m: Vec<String> = ["one", "two", "needle three", "four", "five"]
        .iter()
        .enumerate()
        .map(|(i, b)| s.send(&alice, &room, &format!("c{i}"), b))
        .collect();
    let res = search(
        &s,
        &alice,
        "needle",
        json!({
            "event_context": { "before_limit": 1, "after_limit": 2, "include_profile": true },
            "include_state": true,
            "groupings": { "group_by": [{ "key": "room_id" }, { "key": "sender" }] },
        }),
    );
    let r = &res["results"][0];
    assert_eq!(r["result"]["event_id"], m[2].as_str());
    let ctx = &r["context"];
    let ev_ids = |k: &str| -> Vec<String> {
        ctx[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ev_ids("events_before"), vec![m[1].clone()]);
    assert_eq!(ev_ids("events_after"), vec![m[3].clone(), m[4].clone()]);
    assert_eq!(ctx["profile_info"][&alice_id]["displayname"], "Alice A.");
    // The tokens page on with /messages.
    let start = ctx["start"].as_str().unwrap();
    let older = s.ok(
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1&from={}",
            enc(&room),
            enc(start)
        ),
        Some(&alice),
        None,
    );
    assert_eq!(older["chunk"][0]["event_id"], m[0].as_str());
    // include_state: the room's state, with its name.
    let state = res["state"][&room].as_array().unwrap();
    assert!(state
        .iter()
        .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Context room"));
    // Groups.
    assert_eq!(
        res["groups"]["room_id"][&room]["results"],
        json!([m[2].clone()])
    );
    assert_eq!(
        res["groups"]["sender"][&alice_id]["results"],
        json!([m[2].clone()])
    );
}

#[test]
fn bad_requests_get_matrix_errors() {
    let s = TestServer::start();
    let (_, alice) = s.register("alice");
    let bad = |body: Value, status: u16, code: &str| {
        s.err("POST", SEARCH, Some(&alice), Some(&body), status, code);
    };
    bad(json!({}), 400, "M_BAD_JSON");
    bad(json!({ "search_categories": {} }), 400, "M_BAD_JSON");
    bad(
        json!({ "search_categories": { "messages": { "search_term": "x" } } }),
        400,
        "M_BAD_JSON",
    );
    bad(
        json!({ "search_categories": { "room_events": {} } }),
        400,
        "M_BAD_JSON",
    );
    bad(
        json!({ "search_categories": { "room_events": { "search_term": 5 } } }),
        400,
        "M_BAD_JSON",
    );
    bad(
        json!({ "search_categories": { "room_events": { "search_term": "x", "order_by": "loudest" } } }),
        400,
        "M_BAD_JSON",
    );
    bad(
        json!({ "search_categories": { "room_events": { "search_term": "x", "groupings": { "group_by": [{ "key": "colour" }] } } } }),
        400,
        "M_BAD_JSON",
    );
    let ok_body = json!({ "search_categories": { "room_events": { "search_term": "x", "order_by": "recent" } } });
    s.err(
        "POST",
        &format!("{SEARCH}?next_batch=k5"),
        Some(&alice),
        Some(&ok_body),
        400,
        "M_INVALID_PARAM",
    );
    s.err(
        "POST",
        &format!("{SEARCH}?next_batch=t1_x"),
        Some(&alice),
        Some(&ok_body),
        400,
        "M_INVALID_PARAM",
    );
    s.err("POST", SEARCH, None, Some(&ok_body), 401, "M_MISSING_TOKEN");
    let (st, _) = s.raw("POST", SEARCH, Some(&alice), Some("{not json"));
    assert_eq!(st, 400);
}

#[test]
fn received_and_backfilled_events_are_searchable() {
    use common::fed;
    let a = fed::Hearth::start();
    let b = fed::Hearth::start();
    let (_, alice) = fed::register(&a.url(), "alice");
    let (_, bob) = fed::register(&b.url(), "bob");
    let post = |base: &str, tok: &str, path: &str, body: Value| {
        let (st, v) = fed::curl("POST", &format!("{base}{path}"), Some(tok), Some(&body));
        assert_eq!(st, 200, "{path}: {v}");
        v
    };
    let room = post(
        &a.url(),
        &alice,
        "/_matrix/client/v3/createRoom",
        json!({ "preset": "public_chat" }),
    )["room_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let send = |txn: &str, text: &str| {
        let (st, v) = fed::curl(
            "PUT",
            &format!(
                "{}/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
                a.url(),
                enc(&room)
            ),
            Some(&alice),
            Some(&json!({ "msgtype": "m.text", "body": text })),
        );
        assert_eq!(st, 200, "{v}");
    };
    for i in 0..30 {
        send(&format!("h{i}"), &format!("ancient scroll {i}"));
    }
    post(
        &b.url(),
        &bob,
        &format!(
            "/_matrix/client/v3/join/{}?server_name={}",
            enc(&room),
            enc(&a.server_name())
        ),
        json!({}),
    );
    let count = |term: &str| {
        post(
            &b.url(),
            &bob,
            "/_matrix/client/v3/search",
            json!({ "search_categories": { "room_events": { "search_term": term } } }),
        )["search_categories"]["room_events"]["count"]
            .as_u64()
            .unwrap()
    };
    // A PDU received over federation is indexed in its own commit.
    send("live", "fresh parchment");
    let mut found = 0;
    for _ in 0..100 {
        found = count("parchment");
        if found == 1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(found, 1, "the received message is found");
    // History from before bob's server joined is found once backfilled (/messages fetches it).
    for _ in 0..10 {
        let (st, v) = fed::curl(
            "GET",
            &format!(
                "{}/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50",
                b.url(),
                enc(&room)
            ),
            Some(&bob),
            None,
        );
        assert_eq!(st, 200, "{v}");
        if count("scroll") == 30 {
            break;
        }
    }
    assert_eq!(count("scroll"), 30, "every backfilled message is found");
}

// ------------------------------------------------------------------------------ TURN

const TURN: &str = "/_matrix/client/v3/voip/turnServer";

#[test]
fn turn_credentials_from_a_shared_secret_verify_with_it() {
    let clock = ManualClock::new(1_800_000_000_250);
    let s = TestServer::start_with_clock(
        |c| {
            c.turn.turn_uris = vec![
                "turn:turn.example.org:3478?transport=udp".into(),
                "turns:turn.example.org:5349".into(),
            ];
            c.turn.turn_shared_secret = Some("coturn-static-auth-secret".into());
            c.turn.turn_user_lifetime = Some(hearth::config::Lifetime(
                std::time::Duration::from_secs(7200),
            ));
        },
        clock.clone(),
    );
    let (alice_id, alice) = s.register("alice");
    let v = s.ok("GET", TURN, Some(&alice), None);
    assert_eq!(v["ttl"], 7200);
    assert_eq!(v["uris"][1], "turns:turn.example.org:5349");
    let username = v["username"].as_str().unwrap();
    let expiry = (1_800_000_000_250u64 + 7_200_000) / 1000;
    assert_eq!(username, format!("{expiry}:{alice_id}"));
    // What coturn does with `use-auth-secret`: HMAC-SHA1 of the username with the secret,
    // base64.
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        b"coturn-static-auth-secret",
    );
    let password = base64::engine::general_purpose::STANDARD
        .decode(v["password"].as_str().unwrap())
        .unwrap();
    ring::hmac::verify(&key, username.as_bytes(), &password).expect("HMAC verifies");
    assert!(ring::hmac::verify(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, b"other"),
        username.as_bytes(),
        &password
    )
    .is_err());
    // Later, a later expiry.
    clock.advance(60_000);
    let later = s.ok("GET", TURN, Some(&alice), None);
    assert_eq!(
        later["username"].as_str().unwrap(),
        format!("{}:{alice_id}", expiry + 60)
    );
    s.err("GET", TURN, None, None, 401, "M_MISSING_TOKEN");
}

#[test]
fn turn_static_credentials_and_none_configured() {
    let s = TestServer::start_with(|c| {
        c.turn.turn_uris = vec!["turn:192.0.2.7:3478".into()];
        c.turn.turn_username = Some("hearth".into());
        c.turn.turn_password = Some("pa55".into());
    });
    let (_, alice) = s.register("alice");
    assert_eq!(
        s.ok("GET", TURN, Some(&alice), None),
        json!({ "username": "hearth", "password": "pa55", "uris": ["turn:192.0.2.7:3478"], "ttl": 3600 })
    );
    let none = TestServer::start();
    let (_, bob) = none.register("bob");
    assert_eq!(none.ok("GET", TURN, Some(&bob), None), json!({}));
}
