//! Presence, the client half: `PUT/GET /presence/{userId}/status`, `set_presence` on `/sync`,
//! `m.presence` events in `/sync` for users sharing a room (only what changed since the
//! token), the idle and offline timers on an injected clock, the sync filter, the config
//! switch, persistence across a restart, and no database write per sync.
mod common;
use common::*;
use serde_json::{json, Value};

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn next(sync: &Value) -> String {
    sync["next_batch"].as_str().unwrap().to_owned()
}

/// The content of the last `m.presence` event about `user` in a sync response.
fn presence_of(sync: &Value, user: &str) -> Option<Value> {
    sync["presence"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.presence" && e["sender"] == user)
        .map(|e| e["content"].clone())
        .next_back()
}

fn status_path(user: &str) -> String {
    format!("/_matrix/client/v3/presence/{}/status", enc(user))
}

struct Two {
    s: TestServer,
    clock: std::sync::Arc<ManualClock>,
    alice: String,
    a: String,
    bob: String,
    b: String,
}

/// A server on a manual clock; alice's room with bob joined.
fn two_in_a_room_with(f: impl FnOnce(&mut hearth::Config)) -> Two {
    let clock = ManualClock::new(now_ms());
    let s = TestServer::start_with_clock(f, clock.clone());
    let (alice, a) = s.register("alice");
    let (bob, b) = s.register("bob");
    s.join(&b, &s.create_room(&a, json!({ "preset": "public_chat" })));
    Two {
        s,
        clock,
        alice,
        a,
        bob,
        b,
    }
}

fn two_in_a_room() -> Two {
    two_in_a_room_with(|_| {})
}

/// Waits until `n` requests are in flight (a long-poll parked, plus the metrics request).
fn wait_in_flight(s: &TestServer, n: u64) {
    for _ in 0..200 {
        let text = ureq::get(&format!("{}/_hearth/metrics", s.base))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        let in_flight: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("hearth_http_requests_in_flight "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if in_flight >= n {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("the long-poll never parked");
}

#[test]
fn presence_reaches_a_room_member_and_goes_idle_while_the_client_stays_connected() {
    let t = two_in_a_room();
    let (s, a, b) = (&t.s, t.a.as_str(), t.b.as_str());
    let tb = next(&s.sync(b, "timeout=0"));
    // alice's first sync (set_presence defaults to online) makes her online and active.
    let ta = next(&s.sync(a, "timeout=0"));
    let v = s.sync(b, &format!("since={tb}&timeout=10000"));
    let p = presence_of(&v, &t.alice).expect("alice's presence reaches bob");
    assert_eq!(p["presence"], "online", "{p}");
    assert_eq!(p["currently_active"], true, "{p}");
    assert_eq!(p["last_active_ago"], 0, "{p}");
    let tb = next(&v);
    // Nothing changed since: the next incremental sync has no news about alice.
    let v = s.sync(b, &format!("since={tb}&timeout=0"));
    assert_eq!(presence_of(&v, &t.alice), None, "{v}");
    let tb = next(&v);

    // alice's client stays connected (a long-poll is open) but she does nothing for six
    // minutes: she goes idle, not offline.
    std::thread::scope(|sc| {
        let poll = sc.spawn(|| s.sync(a, &format!("since={ta}&timeout=20000")));
        wait_in_flight(s, 2);
        t.clock.advance(6 * 60 * 1000);
        let v = s.sync(b, &format!("since={tb}&timeout=10000"));
        let p = presence_of(&v, &t.alice).expect("the change to idle reaches bob");
        assert_eq!(p["presence"], "unavailable", "{p}");
        assert_eq!(p["last_active_ago"], 6 * 60 * 1000, "{p}");
        assert!(
            p.get("currently_active").is_none(),
            "only online users have it: {p}"
        );
        // alice's own long-poll was woken by her own change.
        let mine = poll.join().unwrap();
        assert_eq!(
            presence_of(&mine, &t.alice).unwrap()["presence"],
            "unavailable"
        );
    });
}

#[test]
fn a_user_who_stops_syncing_goes_offline_after_thirty_seconds() {
    let t = two_in_a_room();
    let (s, a, b) = (&t.s, t.a.as_str(), t.b.as_str());
    s.sync(a, "timeout=0");
    let v = s.sync(b, "timeout=0");
    assert_eq!(presence_of(&v, &t.alice).unwrap()["presence"], "online");
    let tb = next(&v);
    // 20 s without a sync: still online (no longer currently active? not yet either).
    t.clock.advance(20_000);
    let v = s.sync(b, &format!("since={tb}&timeout=0"));
    assert_eq!(presence_of(&v, &t.alice), None, "{v}");
    let tb = next(&v);
    t.clock.advance(11_000);
    let v = s.sync(b, &format!("since={tb}&timeout=10000"));
    let p = presence_of(&v, &t.alice).expect("alice going offline reaches bob");
    assert_eq!(p["presence"], "offline", "{p}");
    assert_eq!(p["last_active_ago"], 31_000, "{p}");
    let got = get(&t, b).1;
    assert_eq!(got["presence"], "offline", "{got}");
}

#[test]
fn the_status_message_is_kept_by_syncs_and_cleared_by_a_put_without_one() {
    let t = two_in_a_room();
    let (s, a, b) = (&t.s, t.a.as_str(), t.b.as_str());
    let tb = next(&s.sync(b, "timeout=0"));
    assert_eq!(
        put(
            &t,
            a,
            json!({ "presence": "online", "status_msg": "at lunch" })
        )
        .0,
        200
    );
    let v = s.sync(b, &format!("since={tb}&timeout=10000"));
    let p = presence_of(&v, &t.alice).unwrap();
    assert_eq!(
        (p["presence"].clone(), p["status_msg"].clone()),
        (json!("online"), json!("at lunch")),
        "{p}"
    );
    // A sync sets presence but never the status message (Synapse's `is_sync`).
    s.sync(a, "timeout=0");
    let got = get(&t, b).1;
    assert_eq!(got["status_msg"], "at lunch", "{got}");
    assert_eq!(got["currently_active"], true, "{got}");
    assert_eq!(put(&t, a, json!({ "presence": "unavailable" })).0, 200);
    let got = get(&t, b).1;
    assert_eq!(got["presence"], "unavailable", "{got}");
    assert!(got.get("status_msg").is_none(), "{got}");
    // Bad states and bodies are refused.
    expect_err(
        put(&t, a, json!({ "presence": "dancing" })),
        400,
        "M_BAD_JSON",
    );
    expect_err(put(&t, a, json!({ "status_msg": "x" })), 400, "M_BAD_JSON");
}

#[test]
fn presence_is_not_visible_to_a_user_sharing_no_room() {
    let t = two_in_a_room();
    let (s, a, b) = (&t.s, t.a.as_str(), t.b.as_str());
    let (_carol, c) = s.register("carol");
    assert_eq!(
        put(&t, a, json!({ "presence": "online", "status_msg": "hi" })).0,
        200
    );
    let v = s.sync(&c, "timeout=0");
    assert_eq!(presence_of(&v, &t.alice), None, "{v}");
    expect_err(get(&t, &c), 403, "M_FORBIDDEN");
    // Nobody sets someone else's presence.
    expect_err(
        put(&t, b, json!({ "presence": "offline" })),
        403,
        "M_FORBIDDEN",
    );
    assert_eq!(get(&t, a).1["status_msg"], "hi");
    assert_eq!(get(&t, b).1["status_msg"], "hi");
    // bob sees alice and himself in his initial sync.
    let v = s.sync(b, "timeout=0");
    assert!(presence_of(&v, &t.alice).is_some(), "{v}");
    assert!(presence_of(&v, &t.bob).is_some(), "{v}");
}

#[test]
fn set_presence_on_sync_offline_leaves_presence_alone_and_unavailable_sets_it() {
    let t = two_in_a_room();
    let (s, a, b) = (&t.s, t.a.as_str(), t.b.as_str());
    let tb = next(&s.sync(b, "timeout=0"));
    s.sync(a, "timeout=0&set_presence=offline");
    let got = get(&t, b).1;
    assert_eq!(got["presence"], "offline", "{got}");
    let v = s.sync(b, &format!("since={tb}&timeout=0"));
    assert_eq!(presence_of(&v, &t.alice), None, "{v}");
    let tb = next(&v);
    s.sync(a, "timeout=0&set_presence=unavailable");
    let v = s.sync(b, &format!("since={tb}&timeout=10000"));
    assert_eq!(
        presence_of(&v, &t.alice).unwrap()["presence"],
        "unavailable"
    );
    s.err(
        "GET",
        "/_matrix/client/v3/sync?set_presence=dancing",
        Some(a),
        None,
        400,
        "M_INVALID_PARAM",
    );
}

#[test]
fn the_sync_filter_presence_part_is_honoured() {
    let t = two_in_a_room();
    let (s, a, b) = (&t.s, t.a.as_str(), t.b.as_str());
    s.sync(a, "timeout=0");
    let none = enc(&json!({ "presence": { "not_types": ["*"] } }).to_string());
    let v = s.sync(b, &format!("timeout=0&filter={none}"));
    assert_eq!(v["presence"]["events"], json!([]), "{v}");
    let only_bob = enc(&json!({ "presence": { "senders": [t.bob] } }).to_string());
    let v = s.sync(b, &format!("timeout=0&filter={only_bob}"));
    assert!(presence_of(&v, &t.alice).is_none(), "{v}");
    assert!(presence_of(&v, &t.bob).is_some(), "{v}");
}

#[test]
fn with_presence_disabled_updates_are_accepted_and_nothing_is_shared() {
    let t = two_in_a_room_with(|c| c.presence.enabled = false);
    let (s, a, b) = (&t.s, t.a.as_str(), t.b.as_str());
    assert_eq!(
        put(
            &t,
            a,
            json!({ "presence": "online", "status_msg": "hello" })
        )
        .0,
        200
    );
    s.sync(a, "timeout=0");
    let got = get(&t, b).1;
    assert_eq!(got, json!({ "presence": "offline" }));
    let v = s.sync(b, "timeout=0");
    assert_eq!(v["presence"]["events"], json!([]), "{v}");
}

#[test]
fn syncs_cost_no_database_write() {
    let t = two_in_a_room();
    let (s, a) = (&t.s, t.a.as_str());
    let tok = next(&s.sync(a, "timeout=0"));
    let writes = || {
        t.s.hs()
            .app()
            .store
            .writer_stats()
            .writes
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let before = writes();
    for i in 0..5 {
        s.sync(a, &format!("since={tok}&timeout=0"));
        s.sync(a, "timeout=0");
        t.clock.advance(1000 * i);
    }
    assert_eq!(writes(), before, "a sync wrote to the database");
}

#[test]
fn a_restart_keeps_status_messages() {
    let mut t = two_in_a_room();
    let body = json!({ "presence": "unavailable", "status_msg": "gone fishing" });
    assert_eq!(put(&t, &t.a, body).0, 200);
    let hs = t.s.hs.take().unwrap();
    hs.stop().unwrap();
    let config = config_in(t.s.dir.path());
    let hs = hearth::Homeserver::start_with_clock(config, t.clock.clone()).unwrap();
    t.s.base = format!("http://{}", hs.addrs()[0]);
    t.s.hs = Some(hs);
    let got = get(&t, &t.b).1;
    assert_eq!(got["presence"], "unavailable", "{got}");
    assert_eq!(got["status_msg"], "gone fishing", "{got}");
    let v = t.s.sync(&t.b, "timeout=0");
    assert_eq!(
        presence_of(&v, &t.alice).unwrap()["status_msg"],
        "gone fishing"
    );
}

/// alice's `PUT /presence/{userId}/status` with `token`.
fn put(t: &Two, token: &str, body: Value) -> (u16, Value) {
    t.s.req("PUT", &status_path(&t.alice), Some(token), Some(&body))
}

/// `GET /presence/{alice}/status` as `token`'s user.
fn get(t: &Two, token: &str) -> (u16, Value) {
    t.s.req("GET", &status_path(&t.alice), Some(token), None)
}

fn expect_err((status, body): (u16, Value), want: u16, errcode: &str) {
    assert_eq!(
        (status, body["errcode"].as_str()),
        (want, Some(errcode)),
        "{body}"
    );
}

#[test]
fn a_user_joining_a_room_gets_its_members_presence() {
    let t = two_in_a_room();
    let (s, a) = (&t.s, t.a.as_str());
    let (_carol, c) = s.register("carol");
    let tc = next(&s.sync(&c, "timeout=0"));
    assert_eq!(
        put(&t, a, json!({ "presence": "online", "status_msg": "hi" })).0,
        200
    );
    let v = s.sync(&c, &format!("since={tc}&timeout=0"));
    assert_eq!(
        presence_of(&v, &t.alice),
        None,
        "carol shares no room yet: {v}"
    );
    let tc = next(&v);
    // carol joins a room with alice: alice's presence comes with the room, unchanged as it is.
    s.join(&c, &s.create_room(a, json!({ "preset": "public_chat" })));
    let v = s.sync(&c, &format!("since={tc}&timeout=10000"));
    assert_eq!(
        presence_of(&v, &t.alice).unwrap()["status_msg"],
        "hi",
        "{v}"
    );
}
