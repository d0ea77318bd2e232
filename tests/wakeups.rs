//! Wake-ups that concern only whom a change concerns, and the sync details that go with them
//! (issue 8, sections 1 and 2).

mod common;

use std::{
    thread,
    time::{Duration, Instant},
};

use common::{enc, timeline_bodies, TestServer};
use serde_json::{json, Value};

fn next(v: &Value) -> String {
    v["next_batch"].as_str().unwrap().to_owned()
}

fn metric(s: &TestServer, name: &str) -> u64 {
    let url = format!("{}/_hearth/metrics", s.base);
    let text = ureq::get(&url).call().unwrap().into_string().unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A long-poll in its own thread: returns (response, how long it took).
fn park(
    base: &str,
    token: &str,
    since: &str,
    timeout_ms: u64,
) -> thread::JoinHandle<(Value, Duration)> {
    let url = format!("{base}/_matrix/client/v3/sync?since={since}&timeout={timeout_ms}");
    let auth = format!("Bearer {token}");
    thread::spawn(move || {
        let t = Instant::now();
        let v: Value = ureq::get(&url)
            .set("Authorization", &auth)
            .timeout(Duration::from_secs(60))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        (v, t.elapsed())
    })
}

#[test]
fn a_message_wakes_the_rooms_members_and_no_bystander() {
    // Presence off: registering 12 bystanders can take longer than presence's 30 s sync window
    // on a loaded machine, and a bystander back from "offline" is rightly woken by its own
    // presence change, which is not what this test counts.
    let s = TestServer::start_with(|c| c.presence.enabled = false);
    let (_, sender) = s.register("sender");
    let (member_id, member) = s.register("member");
    let busy = s.create_room(&sender, json!({ "preset": "public_chat" }));
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/join", enc(&busy)),
        Some(&member),
        Some(&json!({})),
    );
    // Bystanders: each in a quiet room of their own, parked on /sync.
    let mut bystanders = Vec::new();
    for i in 0..12 {
        let (_, t) = s.register(&format!("bystander{i}"));
        s.create_room(&t, json!({ "name": format!("quiet {i}") }));
        let since = next(&s.sync(&t, "timeout=0"));
        bystanders.push((t, since));
    }
    let member_since = next(&s.sync(&member, "timeout=0"));
    let wakeups_before = metric(&s, "hearth_sync_wakeups_total");
    // The bystanders park for longer than the test lasts (parking 13 polls can take seconds
    // on a loaded machine, and a short timeout would end some before the last one parks); the
    // server's shutdown ends them.
    let _parked: Vec<_> = bystanders
        .iter()
        .map(|(t, since)| {
            let url = format!(
                "{}/_matrix/client/v3/sync?since={since}&timeout=60000",
                s.base
            );
            let auth = format!("Bearer {t}");
            thread::spawn(move || {
                let _ = ureq::get(&url)
                    .set("Authorization", &auth)
                    .timeout(Duration::from_secs(90))
                    .call();
            })
        })
        .collect();
    let member_poll = park(&s.base, &member, &member_since, 20_000);
    // 13 polls parked: 13 requests in flight, watching 13 users and 13 rooms.
    wait_until("polls parked", || {
        metric(&s, "hearth_http_requests_in_flight") >= 13
            && metric(&s, "hearth_notify_watched_topics") >= 26
    });
    s.send(&sender, &busy, "t1", "hello members");
    let (v, _) = member_poll.join().unwrap();
    assert_eq!(timeline_bodies(&v, &busy), vec!["hello members"]);
    // Exactly one parked poll was woken, the member's, and the 12 bystanders are still parked
    // a moment later (a woken one would have been counted, and would have answered).
    thread::sleep(Duration::from_millis(300));
    assert_eq!(metric(&s, "hearth_sync_wakeups_total") - wakeups_before, 1);
    assert!(metric(&s, "hearth_http_requests_in_flight") >= 12);
    let _ = member_id;
}

#[test]
fn invites_account_data_typing_and_receipts_wake_whom_they_concern() {
    let s = TestServer::start();
    let (_, alice) = s.register("alice");
    let (bob_id, bob) = s.register("bob");
    let (_, carol) = s.register("carol");
    let room = s.create_room(&alice, json!({}));
    let mut bob_since = next(&s.sync(&bob, "timeout=0"));
    let carol_since = next(&s.sync(&carol, "timeout=0"));
    let carol_poll = park(&s.base, &carol, &carol_since, 3_000);

    // An invite wakes the invitee, who watches no room of it yet.
    let poll = park(&s.base, &bob, &bob_since, 20_000);
    thread::sleep(Duration::from_millis(200));
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)),
        Some(&alice),
        Some(&json!({ "user_id": bob_id })),
    );
    let (v, took) = poll.join().unwrap();
    assert!(v["rooms"]["invite"].get(&room).is_some(), "{v}");
    assert!(took < Duration::from_secs(10));
    bob_since = next(&v);

    // Joining: bob's own membership change wakes his other device's poll.
    let poll = park(&s.base, &bob, &bob_since, 20_000);
    thread::sleep(Duration::from_millis(200));
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)),
        Some(&bob),
        Some(&json!({})),
    );
    let (v, _) = poll.join().unwrap();
    assert!(v["rooms"]["join"].get(&room).is_some(), "{v}");
    bob_since = next(&v);

    // Global account data wakes its user.
    let poll = park(&s.base, &bob, &bob_since, 20_000);
    thread::sleep(Duration::from_millis(200));
    s.ok(
        "PUT",
        &format!(
            "/_matrix/client/v3/user/{}/account_data/org.example.x",
            enc(&bob_id)
        ),
        Some(&bob),
        Some(&json!({ "a": 1 })),
    );
    let (v, took) = poll.join().unwrap();
    assert_eq!(
        v["account_data"]["events"][0]["type"], "org.example.x",
        "{v}"
    );
    assert!(took < Duration::from_secs(10));
    bob_since = next(&v);

    // Typing in the room wakes its members.
    let poll = park(&s.base, &bob, &bob_since, 20_000);
    thread::sleep(Duration::from_millis(200));
    let alice_id = s.ok(
        "GET",
        "/_matrix/client/v3/account/whoami",
        Some(&alice),
        None,
    )["user_id"]
        .as_str()
        .unwrap()
        .to_owned();
    s.ok(
        "PUT",
        &format!(
            "/_matrix/client/v3/rooms/{}/typing/{}",
            enc(&room),
            enc(&alice_id)
        ),
        Some(&alice),
        Some(&json!({ "typing": true, "timeout": 10000 })),
    );
    let (v, took) = poll.join().unwrap();
    let eph = &v["rooms"]["join"][&room]["ephemeral"]["events"];
    assert_eq!(eph[0]["type"], "m.typing", "{v}");
    assert!(took < Duration::from_secs(10));
    bob_since = next(&v);

    // A receipt wakes the room's members.
    let ev = s.send(&alice, &room, "m1", "read me");
    // Until the push evaluator has counted the message for Bob (its write wakes him too).
    for _ in 0..100 {
        let v = s.sync(&bob, &format!("since={bob_since}&timeout=2000"));
        bob_since = next(&v);
        if v["rooms"]["join"][&room]["unread_notifications"]["notification_count"] == 1 {
            break;
        }
    }
    // The count may have been read after the token was taken: one more sync passes it.
    bob_since = next(&s.sync(&bob, &format!("since={bob_since}&timeout=0")));
    let poll = park(&s.base, &bob, &bob_since, 20_000);
    thread::sleep(Duration::from_millis(200));
    s.ok(
        "POST",
        &format!(
            "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
            enc(&room),
            enc(&ev)
        ),
        Some(&alice),
        Some(&json!({})),
    );
    let (v, took) = poll.join().unwrap();
    let eph = v["rooms"]["join"][&room]["ephemeral"]["events"]
        .as_array()
        .unwrap()
        .clone();
    assert!(eph.iter().any(|e| e["type"] == "m.receipt"), "{v}");
    assert!(took < Duration::from_secs(10));

    // Carol, in none of this, slept through all of it.
    let (v, took) = carol_poll.join().unwrap();
    assert!(
        took >= Duration::from_millis(2_500),
        "carol woke: {took:?} {v}"
    );
}

fn lazy_filter() -> String {
    enc(
        &json!({ "room": { "state": { "lazy_load_members": true }, "timeline": { "limit": 10 } } })
            .to_string(),
    )
}

fn member_keys(sync: &Value, room: &str) -> Vec<String> {
    sync["rooms"]["join"][room]["state"]["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["type"] == "m.room.member")
                .map(|e| e["state_key"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn incremental_lazy_sync_sends_new_senders_members_once_per_device() {
    let s = TestServer::start();
    let (_, alice) = s.register("alice");
    let (_, bob) = s.register("bob");
    let (carol_id, carol) = s.register("carol");
    let room = s.create_room(&alice, json!({ "preset": "public_chat" }));
    for t in [&bob, &carol] {
        s.ok(
            "POST",
            &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)),
            Some(t),
            Some(&json!({})),
        );
    }
    // Push carol's join out of bob's initial timeline.
    for i in 0..12 {
        s.send(&alice, &room, &format!("a{i}"), &format!("alice {i}"));
    }
    let f = lazy_filter();
    let init = s.sync(&bob, &format!("filter={f}&timeout=0"));
    assert!(!member_keys(&init, &room).contains(&carol_id));
    let since = next(&init);

    // Carol speaks: bob's next incremental (not limited) sync carries her member event.
    s.send(&carol, &room, "c1", "carol here");
    let inc = s.sync(&bob, &format!("filter={f}&since={since}&timeout=0"));
    assert_eq!(inc["rooms"]["join"][&room]["timeline"]["limited"], false);
    assert_eq!(timeline_bodies(&inc, &room), vec!["carol here"]);
    assert_eq!(member_keys(&inc, &room), vec![carol_id.clone()], "{inc}");
    let since2 = next(&inc);

    // Once the client has acknowledged it (synced from that response), it is not repeated.
    s.send(&carol, &room, "c2", "carol again");
    let inc2 = s.sync(&bob, &format!("filter={f}&since={since2}&timeout=0"));
    assert_eq!(timeline_bodies(&inc2, &room), vec!["carol again"]);
    assert!(member_keys(&inc2, &room).is_empty(), "{inc2}");

    // A client that lost the response and retries from the older token still gets it.
    let retry = s.sync(&bob, &format!("filter={f}&since={since}&timeout=0"));
    assert_eq!(
        member_keys(&retry, &room),
        vec![carol_id.clone()],
        "{retry}"
    );

    // Another device of bob's knows nothing yet: it gets it too.
    let other = s.ok(
        "POST",
        "/_matrix/client/v3/login",
        None,
        Some(&json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "bob" }, "password": "pw-bob" })),
    )["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let v = s.sync(&other, &format!("filter={f}&since={since}&timeout=0"));
    assert_eq!(member_keys(&v, &room), vec![carol_id], "{v}");
}

#[test]
fn full_state_with_since_keeps_the_timeline_bounded() {
    let s = TestServer::start();
    let (_, alice) = s.register("alice");
    let room = s.create_room(&alice, json!({ "name": "bounded" }));
    for i in 0..3 {
        s.send(&alice, &room, &format!("o{i}"), &format!("old {i}"));
    }
    let since = next(&s.sync(&alice, "timeout=0"));
    s.send(&alice, &room, "n1", "new");
    let v = s.sync(&alice, &format!("since={since}&full_state=true&timeout=0"));
    let r = &v["rooms"]["join"][&room];
    assert_eq!(timeline_bodies(&v, &room), vec!["new"], "{v}");
    let types: Vec<&str> = r["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    for t in [
        "m.room.create",
        "m.room.power_levels",
        "m.room.name",
        "m.room.member",
    ] {
        assert!(types.contains(&t), "{t} missing from full state: {types:?}");
    }
    // With nothing new, full_state still gives every joined room with its whole state.
    let since = next(&v);
    let v = s.sync(&alice, &format!("since={since}&full_state=true&timeout=0"));
    assert!(timeline_bodies(&v, &room).is_empty());
    assert!(
        v["rooms"]["join"][&room]["state"]["events"]
            .as_array()
            .unwrap()
            .len()
            >= 4
    );
}

#[test]
fn account_data_is_bounded_by_the_responses_upper_position() {
    let s = TestServer::start();
    let (user_id, tok) = s.register("dana");
    let app = s.hs().app().clone();
    let before = app.notifier.marks();
    s.ok(
        "PUT",
        &format!(
            "/_matrix/client/v3/user/{}/account_data/org.example.late",
            enc(&user_id)
        ),
        Some(&tok),
        Some(&json!({ "v": 1 })),
    );
    let after = app.notifier.marks();
    assert!(after.pos > before.pos);
    let who = hearth::http::Authed {
        user_id: user_id.as_str().try_into().unwrap(),
        device_id: "DEV".into(),
        token_hash: String::new(),
    };
    let filter = hearth::http::sync::SyncFilter {
        timeline_limit: 10,
        ..Default::default()
    };
    let types = |since: Option<hearth::notify::Marks>, upto: hearth::notify::Marks| {
        let out = smol::block_on(hearth::http::sync::compute(
            &app,
            &who,
            since.map(Into::into),
            upto.into(),
            &filter,
            false,
        ))
        .unwrap();
        out.body["account_data"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    // A response that covers up to `before` must not carry what was written after it...
    assert!(!types(None, before).contains(&"org.example.late".to_owned()));
    // ...because the next one, from `before`, carries it (once).
    assert_eq!(types(Some(before), after), vec!["org.example.late"]);
}

#[test]
fn sync_parameters_are_parsed_by_the_spec_types() {
    let s = TestServer::start();
    let (_, tok) = s.register("erin");
    for q in [
        "timeout=abc",
        "full_state=maybe",
        "set_presence=dancing",
        "since=garbage",
    ] {
        let (status, v) = s.req(
            "GET",
            &format!("/_matrix/client/v3/sync?{q}"),
            Some(&tok),
            None,
        );
        assert_eq!(
            (status, v["errcode"].as_str()),
            (400, Some("M_INVALID_PARAM")),
            "{q}: {v}"
        );
    }
    let (status, v) = s.req(
        "GET",
        &format!("/_matrix/client/v3/sync?filter={}", enc("{\"room\": 5}")),
        Some(&tok),
        None,
    );
    assert_eq!(status, 400, "{v}");
    // Valid ones still work.
    s.sync(&tok, "timeout=0&full_state=true&set_presence=offline");
}
